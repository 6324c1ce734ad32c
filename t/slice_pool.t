#!/usr/bin/perl

# Tests for upstream keepalive: the pool of slice buckets (slice_poolsize),
# buckets returning to the pool when their last idle connection leaves
# (timeout, close by the backend, reuse, eviction), slice_poolsize=0, a
# full cache with a full pool, and key truncation (slice_keylen).

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

$t->plan(54);

###############################################################################

sub conn {
	return conn_of(http_get_host(@_)) // 0;
}

my ($n, @c);

sub no_bucket {
	my ($key, $n) = @_;
	$n //= 2;
	return qr/\[info\].*keepalive: connection not kept, no free bucket for key "\Q$key\E" \(slice_poolsize=$n in use\)/;
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

# a bucket goes back to the pool when the backend closes its idle
# connection: poolsize 1, a holds the only bucket, b's connections are
# not kept; once the backend (keepalive_timeout 1s) closed a's idle
# connection, b's connection is kept

# (first in this file: nothing else has an idle connection on a timer yet,
# so the close handler run counted below is a's)

my $ca = bconn('a.example', 'a1');
my ($cb1, $cb2);

$n = errlog_delta($t, no_bucket('b.example', 1), sub {
	$cb1 = bconn('b.example', 'b1');
	$cb2 = bconn('b.example', 'b2');
});
ok($cb1 ne $ca && $cb2 ne $ca && $cb1 ne $cb2,
	'backend close: b not kept while a holds the bucket');
is($n, 2, 'backend close: no free bucket for b logged');

my $closes = errlog_count($t, qr/keepalive slice close handler/);
is(bconn('a.example', 'a2'), $ca, 'backend close: a reuses');

# the backend's connections are numbered like its log lines (*N)

like($ca, qr/^\d+$/, 'backend close: backend connection number');
is(errlog_wait($t, qr/\*$ca close http connection:/, 1), 1,
	'backend close: backend closed a\'s idle connection');
is(errlog_wait($t, qr/keepalive slice close handler/, $closes + 1),
	$closes + 1, 'backend close: idle connection closed in the upstream');

my @cb;
$n = errlog_delta($t, no_bucket('b.example', 1), sub {
	@cb = map { bconn('b.example', "b$_") } 3 .. 5;
});
ok($cb[0] ne $ca && $cb[0] ne $cb1 && $cb[0] ne $cb2,
	'backend close: b opens a new connection');
is("@cb[1, 2]", "$cb[0] $cb[0]", 'backend close: b kept and reused');
is($n, 0, 'backend close: no refusal for b');

# now b holds the only bucket

my ($ca2, $ca3);
$n = errlog_delta($t, no_bucket('a.example', 1), sub {
	$ca2 = bconn('a.example', 'a3');
	$ca3 = bconn('a.example', 'a4');
});
ok($ca2 ne $ca && $ca2 ne $cb[0] && $ca3 ne $ca2,
	'backend close: a not kept while b holds the bucket');
is($n, 2, 'backend close: no free bucket for a logged');

# poolsize 2: a third key finds no bucket while two keys hold idle
# connections; once those time out, its connections are kept again

is(conn('a.example', '/pool/x'), 1, 'pool: a opens');
is(conn('b.example', '/pool/x'), 2, 'pool: b opens');

$n = errlog_delta($t, no_bucket('c.example'), sub {
	@c = map { conn('c.example', '/pool/x') } 1 .. 2;
});
is("@c", '3 4', 'pool: c not reused while the pool is full');
is($n, 2, 'pool: no free bucket logged');
is(backend_log_wait("$d/b8081.log", qr/^close conn=[34] /, 2), 2,
	'pool: c connections closed');

is(conn('a.example', '/pool/x'), 1, 'pool: a still reuses');
is(conn('b.example', '/pool/x'), 2, 'pool: b still reuses');

# keepalive_timeout 1s: a's and b's idle connections go away

is(backend_log_wait("$d/b8081.log", qr/^close conn=[12] reason=eof$/, 2, 6),
	2, 'pool: idle a and b timed out');

$n = errlog_delta($t, no_bucket('c.example'), sub {
	@c = map { conn('c.example', '/pool/x') } 1 .. 3;
});
is("@c", '5 5 5', 'pool: c kept and reused after the timeout');
is($n, 0, 'pool: no refusal after the timeout');

# a bucket is released when its only connection is taken for reuse: while
# a's connection is busy, c may take a's bucket

is(conn('a.example', '/take/x'), 1, 'take: a opens');
is(conn('b.example', '/take/x'), 2, 'take: b opens');

my ($ra, $rc);
$n = errlog_delta($t, no_bucket('a.example'), sub {
	my $sa = http_get_host('a.example', '/take/sleep/800', start => 1);
	select undef, undef, undef, 0.2;
	$rc = http_get_host('c.example', '/take/sleep/50');
	$ra = http_end($sa);
});

is(conn_of($ra), 1, 'take: a reused its connection');
is(conn_of($rc), 3, 'take: c opened one meanwhile');
is($n, 1, 'take: a found no bucket when done');
is(conn('c.example', '/take/x'), 3, 'take: c was kept in a\'s bucket');
is(backend_log_wait("$d/b8082.log", qr/^close conn=1 /, 1), 1,
	'take: a\'s connection closed');

# a bucket is released when its last connection is evicted

is(conn('a.example', '/evict/x'), 1, 'evict: a opens');
is(conn('b.example', '/evict/x'), 2, 'evict: b opens');

# two b requests at once: one reuses 2, one opens 3; storing both evicts a

my @b = sort map { conn_of($_) // 0 }
	parallel_get('b.example', ('/evict/sleep/200') x 2);
is("@b", '2 3', 'evict: b twice in parallel');
is(backend_log_wait("$d/b8083.log", qr/^close conn=1 /, 1), 1,
	'evict: a evicted');

$n = errlog_delta($t, no_bucket('c.example'), sub {
	@c = map { conn('c.example', '/evict/x') } 1 .. 2;
});
is("@c", '4 4', 'evict: c kept in the bucket a left');
is($n, 0, 'evict: no refusal');

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

$n = errlog_delta($t, no_bucket('h21.example', 20), sub {
	@h = map { conn('h21.example', '/def/x') } 1 .. 2;
});
is("@h  $n", '21 22  2', 'default poolsize: 21st key finds no bucket');

my $k = 'k' x 39;
@h = map { conn($_, '/def40/x') }
	("${k}k.one.example", "${k}k.two.example", "${k}j.one.example");
is("@h", '1 1 2', 'default keylen: 40 bytes compared');

# slice_poolsize=0 is accepted and keeps nothing

my @z;
$n = errlog_delta($t, no_bucket('a.example', 0), sub {
	@z = map { conn('a.example', '/zero/x') } 1 .. 3;
});
is("@z", '1 2 3', 'poolsize 0: never reused');
is($n, 3, 'poolsize 0: no free bucket logged');
is(backend_log_wait("$d/b8088.log", qr/^close conn=[123] reason=eof$/, 3), 3,
	'poolsize 0: connections closed');

# cache full (keepalive 2) and pool full (2 buckets) at once: a connection
# for a third key is not kept, and nothing is evicted for it

is(conn('a.example', '/full/x'), 1, 'full: a opens');
is(conn('b.example', '/full/x'), 2, 'full: b opens');

my $evicted;
$n = errlog_delta($t, no_bucket('c.example'), sub {
	$evicted = errlog_delta($t, qr/keepalive slice: evicting connection/,
		sub { @c = map { conn('c.example', '/full/x') } 1 .. 2; });
});
is("@c", '3 4', 'full: c not kept');
is($n, 2, 'full: no free bucket logged');
is($evicted, 0, 'full: nothing evicted');
is(backend_log_wait("$d/b8089.log", qr/^close conn=[34] /, 2), 2,
	'full: c connections closed');

is(conn('a.example', '/full/x'), 1, 'full: a still reuses');
is(conn('b.example', '/full/x'), 2, 'full: b still reuses');
is(backend_log_count("$d/b8089.log", qr/^close conn=[12] /), 0,
	'full: a and b connections open');

###############################################################################
