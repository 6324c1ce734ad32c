#!/usr/bin/perl

# Tests for upstream keepalive: the pool of slice buckets (slice_poolsize).
# A bucket stays its key's while its connections are busy; a key that needs
# a bucket when none is free takes the least valuable one (emptied by the
# backend's close, timeout or eviction first, then the oldest key seen
# once), closing its idle connections, never a bucket of a key in steady
# use; slice_poolsize=0; a full cache with a full pool; key truncation
# (slice_keylen).  Keys seen once at full speed: t/slice_flood.t.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx qw/ :DEFAULT http_end /;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_get_host parallel_get header_of
	errlog_count errlog_delta errlog_wait slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u_pool {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=2 slice_poolsize=2;
        keepalive_timeout 1s;
    }

    upstream u_take {
        server 127.0.0.1:8082;
        keepalive 8 slice_key=$host slice_conn=2 slice_poolsize=2;
    }

    upstream u_evict {
        server 127.0.0.1:8083;
        keepalive 2 slice_key=$host slice_conn=2 slice_poolsize=2;
    }

    upstream u_len {
        server 127.0.0.1:8084;
        keepalive 8 slice_key=$host slice_conn=2 slice_keylen=4;
    }

    upstream u_def {
        server 127.0.0.1:8085;
        keepalive 30 slice_key=$host slice_conn=1;
    }

    upstream u_def40 {
        server 127.0.0.1:8086;
        keepalive 8 slice_key=$host slice_conn=1;
    }

    upstream u_bclose {
        server 127.0.0.1:8087;
        keepalive 8 slice_key=$host slice_conn=2 slice_poolsize=1;
        keepalive_timeout 60s;
    }

    upstream u_zero {
        server 127.0.0.1:8088;
        keepalive 8 slice_key=$host slice_conn=2 slice_poolsize=0;
    }

    upstream u_full {
        server 127.0.0.1:8089;
        keepalive 2 slice_key=$host slice_conn=2 slice_poolsize=2;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;

        location /pool/  { proxy_pass http://u_pool/; }
        location /take/  { proxy_pass http://u_take/; }
        location /evict/ { proxy_pass http://u_evict/; }
        location /len/   { proxy_pass http://u_len/; }
        location /def/   { proxy_pass http://u_def/; }
        location /def40/ { proxy_pass http://u_def40/; }
        location /bclose/ { proxy_pass http://u_bclose/; }
        location /zero/  { proxy_pass http://u_zero/; }
        location /full/  { proxy_pass http://u_full/; }
    }

    # the backend of u_bclose: closes idle connections itself after 1s,
    # long before the upstream's keepalive_timeout

    server {
        listen       127.0.0.1:8087;
        server_name  localhost;

        keepalive_timeout 1s;

        location / {
            add_header X-Conn $connection always;
            return 200 "backend $host $uri\n";
        }
    }
}

EOF

my $d = $t->testdir();
my @ports = (8081 .. 8086, 8088, 8089);

for my $p (@ports) {
	$t->run_daemon(\&http_backend, port($p), log => "$d/b$p.log");
}

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for @ports, 8087;

$t->plan(58);

###############################################################################

sub conn {
	return conn_of(http_get_host(@_)) // 0;
}

my ($n, @c);

# A key took the bucket of another key, closing $n idle connections of it
# (a debug line).
sub took {
	my ($key, $n) = @_;
	return qr/keepalive slice: key "\Q$key\E" took the bucket of another key, $n idle connections closed/;
}

# The backend's connection number for u_bclose; a response without it
# compares equal to nothing (two failed requests must not look like one
# reused connection).
sub bconn {
	my ($host, $name) = @_;
	return header_of(http_get_host($host, '/bclose/x'), 'X-Conn')
		// "$name: no X-Conn";
}

###############################################################################

# a bucket whose idle connection the backend closed is the first a new key
# takes, and nothing is closed for it: poolsize 1, a holds the only
# bucket; once the backend (keepalive_timeout 1s) closed a's idle
# connection, b takes a's bucket

# (first in this file: nothing else has an idle connection on a timer yet,
# so the close handler run counted below is a's)

my $ca = bconn('a.example', 'a1');
my $closes = errlog_count($t, qr/keepalive slice close handler/);
is(bconn('a.example', 'a2'), $ca, 'backend close: a reuses');

# the backend's connections are numbered like its log lines (*N)

like($ca, qr/^\d+$/, 'backend close: backend connection number');
is(errlog_wait($t, qr/\*$ca close http connection:/, 1), 1,
	'backend close: backend closed a\'s idle connection');
is(errlog_wait($t, qr/keepalive slice close handler/, $closes + 1),
	$closes + 1, 'backend close: idle connection closed in the upstream');

my @cb;
$n = errlog_delta($t, took('b.example', 0), sub {
	@cb = map { bconn('b.example', "b$_") } 1 .. 3;
});
ok($cb[0] ne $ca, 'backend close: b opens a new connection');
is("@cb[1, 2]", "$cb[0] $cb[0]", 'backend close: b kept and reused');
is($n, 1, 'backend close: b took a\'s empty bucket, closing nothing');

# now b holds the only bucket: a, back, takes it, closing b's connection

my ($ca2, $ca3);
$n = errlog_delta($t, took('a.example', 1), sub {
	$ca2 = bconn('a.example', 'a3');
	$ca3 = bconn('a.example', 'a4');
});
ok($ca2 ne $ca && $ca2 ne $cb[0], 'backend close: a opens a new connection');
is($ca3, $ca2, 'backend close: a kept and reused');
is($n, 1, 'backend close: a took b\'s bucket, one connection closed');

# poolsize 2: a third key takes the bucket of the oldest key seen once,
# whose idle connection is closed; the pool holds two keys at once

is(conn('a.example', '/pool/x'), 1, 'pool: a opens');
is(conn('b.example', '/pool/x'), 2, 'pool: b opens');

$n = errlog_delta($t, took('c.example', 1), sub {
	@c = map { conn('c.example', '/pool/x') } 1 .. 2;
});
is("@c", '3 3', 'pool: c kept and reused while the pool is full');
is($n, 1, 'pool: c took a bucket');
is(backend_log_wait("$d/b8081.log", qr/^close conn=1 /, 1), 1,
	'pool: a\'s connection closed');
is(backend_log_count("$d/b8081.log", qr/^close conn=[23] /), 0,
	'pool: b\'s and c\'s connections open');

is(conn('b.example', '/pool/x'), 2, 'pool: b still reuses');
is(conn('c.example', '/pool/x'), 3, 'pool: c still reuses');

# keepalive_timeout 1s: b's and c's idle connections go away; their
# buckets, empty, are taken first, closing nothing

is(backend_log_wait("$d/b8081.log", qr/^close conn=[23] reason=eof$/, 2, 6),
	2, 'pool: idle b and c timed out');

$n = errlog_delta($t, took('d.example', 0), sub {
	@c = map { conn('d.example', '/pool/x') } 1 .. 3;
});
is("@c", '4 4 4', 'pool: d kept and reused after the timeout');
is($n, 1, 'pool: d took an emptied bucket');

# a bucket stays its key's while its only connection is busy; a key in
# steady use (a, found in its bucket twice more) keeps its bucket when a
# new key needs one: c takes the bucket of b (seen once), and a's
# connection, coming back, finds a's bucket

is(conn('a.example', '/take/x'), 1, 'take: a opens');
is(conn('b.example', '/take/x'), 2, 'take: b opens');
is(conn('a.example', '/take/x'), 1, 'take: a reuses');

my ($ra, $rc);
$n = errlog_delta($t, took('c.example', 1), sub {
	my $sa = http_get_host('a.example', '/take/sleep/800', start => 1);
	select undef, undef, undef, 0.2;
	$rc = http_get_host('c.example', '/take/sleep/50');
	$ra = http_end($sa);
});

is(conn_of($ra), 1, 'take: a reused its connection');
is(conn_of($rc), 3, 'take: c opened one meanwhile');
is($n, 1, 'take: c took a bucket');
is(backend_log_wait("$d/b8082.log", qr/^close conn=2 /, 1), 1,
	'take: b\'s connection closed');
is(conn('a.example', '/take/x'), 1, 'take: a\'s connection back in a\'s bucket');
is(conn('c.example', '/take/x'), 3, 'take: c kept');

# a bucket whose last connection is evicted is the first taken

is(conn('a.example', '/evict/x'), 1, 'evict: a opens');
is(conn('b.example', '/evict/x'), 2, 'evict: b opens');

# two b requests at once: one reuses 2, one opens 3; storing both evicts a

my @b = sort map { conn_of($_) // 0 }
	parallel_get('b.example', ('/evict/sleep/200') x 2);
is("@b", '2 3', 'evict: b twice in parallel');
is(backend_log_wait("$d/b8083.log", qr/^close conn=1 /, 1), 1,
	'evict: a evicted');

$n = errlog_delta($t, took('c.example', 0), sub {
	@c = map { conn('c.example', '/evict/x') } 1 .. 2;
});
is("@c", '4 4', 'evict: c kept in the bucket a left');
is($n, 1, 'evict: c took a\'s empty bucket, closing nothing');

# slice_keylen=4: keys equal in the first 4 bytes share a bucket

my $r = http_get_host('abcd1.example', '/len/x');
is(conn_of($r), 1, 'keylen: abcd1 opens');
$r = http_get_host('abcd2.example', '/len/x');
is(conn_of($r), 1, 'keylen: abcd2 shares the bucket');
like($r, qr/^X-Host: abcd2\.example\r?$/m, 'keylen: with its own host');
is(conn('abce.example', '/len/x'), 2, 'keylen: abce does not');
is(conn('abcd1.example', '/len/x'), 1, 'keylen: abcd1 again');

# defaults: 20 buckets, keys cut to 40 bytes

my @h = map { conn(sprintf('h%02d.example', $_), '/def/x') } 1 .. 20;
is("@h", join(' ', 1 .. 20), 'default poolsize: 20 hosts');

$n = errlog_delta($t, took('h21.example', 1), sub {
	@h = map { conn('h21.example', '/def/x') } 1 .. 2;
});
is("@h  $n", '21 21  1', 'default poolsize: 21st key takes the oldest bucket');
is(backend_log_wait("$d/b8085.log", qr/^close conn=1 /, 1), 1,
	'default poolsize: h01\'s connection closed');
is(conn('h02.example', '/def/x'), 2, 'default poolsize: h02 still reuses');

my $k = 'k' x 39;
@h = map { conn($_, '/def40/x') }
	("${k}k.one.example", "${k}k.two.example", "${k}j.one.example");
is("@h", '1 1 2', 'default keylen: 40 bytes compared');

# slice_poolsize=0 is accepted and keeps nothing

my @z;
$n = errlog_delta($t,
	qr/\[info\].*keepalive: connection not kept, no bucket for key "a\.example" \(slice_poolsize=0\)/,
	sub { @z = map { conn('a.example', '/zero/x') } 1 .. 3; });
is("@z", '1 2 3', 'poolsize 0: never reused');
is($n, 3, 'poolsize 0: no bucket logged');
is(backend_log_wait("$d/b8088.log", qr/^close conn=[123] reason=eof$/, 3), 3,
	'poolsize 0: connections closed');

# cache full (keepalive 2) and pool full (2 buckets) at once: a third key
# takes the bucket of the oldest key seen once; closing its connection
# makes room in the cache, and nothing else is evicted

is(conn('a.example', '/full/x'), 1, 'full: a opens');
is(conn('b.example', '/full/x'), 2, 'full: b opens');

my $evicted;
$n = errlog_delta($t, took('c.example', 1), sub {
	$evicted = errlog_delta($t, qr/keepalive slice: evicting connection/,
		sub { @c = map { conn('c.example', '/full/x') } 1 .. 2; });
});
is("@c", '3 3', 'full: c kept and reused');
is($n, 1, 'full: c took a bucket');
is($evicted, 1, 'full: one connection closed');
is(backend_log_wait("$d/b8089.log", qr/^close conn=1 /, 1), 1,
	'full: a\'s connection closed');

is(conn('b.example', '/full/x'), 2, 'full: b still reuses');
is(conn('c.example', '/full/x'), 3, 'full: c still reuses');
is(backend_log_count("$d/b8089.log", qr/^close conn=[23] /), 0,
	'full: b and c connections open');

###############################################################################
