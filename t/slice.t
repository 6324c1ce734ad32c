#!/usr/bin/perl

# Tests for upstream keepalive: slicing of the idle connection cache by key
# (slice_key, slice_conn), per-host reuse, mpm-itk style backends, local,
# several servers, buffered and unbuffered responses, the global limit,
# the key evaluated once per request even when the request tries two
# servers.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_get_host http_post_host parallel_get
	status_of header_of errlog_count errlog_delta slice_module /;

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

    upstream u_host {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_three {
        server 127.0.0.1:8094;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_bind {
        server 127.0.0.1:8082;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_plain {
        server 127.0.0.1:8083;
        keepalive 8;
    }

    upstream u_conn1 {
        server 127.0.0.1:8084;
        keepalive 8 slice_key=$host slice_conn=1;
    }

    upstream u_conn0 {
        server 127.0.0.1:8085;
        keepalive 8 slice_key=$host slice_conn=0;
    }

    upstream u_pair {
        server 127.0.0.1:8086;
        server 127.0.0.1:8087;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_local {
        server 127.0.0.1:8088;
        keepalive 8 local slice_key=$host slice_conn=2;
    }

    upstream u_key {
        server 127.0.0.1:8089;
        keepalive 8 slice_key=$host:$server_port slice_conn=2;
    }

    upstream u_tenant {
        server 127.0.0.1:8095;
        keepalive 8 slice_key=tenant-$http_x_tenant slice_conn=2;
    }

    upstream u_buf {
        server 127.0.0.1:8092;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_lru {
        server 127.0.0.1:8093;
        keepalive 2 slice_key=$host slice_conn=2;
    }

    # nothing listens on 8097: every request tries it first (max_fails=0
    # never takes it out of rotation), then goes on to the backup

    upstream u_retry {
        server 127.0.0.1:8097 max_fails=0;
        server 127.0.0.1:8096 backup;
        keepalive 8 slice_key=$host slice_conn=2;
    }

    server {
        listen       127.0.0.1:8080;
        listen       127.0.0.1:8091;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;

        location /host/   { proxy_pass http://u_host/; }
        location /three/  { proxy_pass http://u_three/; }
        location /bind/   { proxy_pass http://u_bind/; }
        location /plain/  { proxy_pass http://u_plain/; }
        location /conn1/  { proxy_pass http://u_conn1/; }
        location /conn0/  { proxy_pass http://u_conn0/; }

        location /pair/ {
            proxy_pass http://u_pair/;
            add_header X-Upstream-Addr $upstream_addr always;
        }

        location /l1/     { proxy_pass http://u_local/; }
        location /l2/     { proxy_pass http://u_local/; }
        location /key/    { proxy_pass http://u_key/; }
        location /tenant/ { proxy_pass http://u_tenant/; }
        location /buf/    { proxy_pass http://u_buf/; }

        location /unbuf/ {
            proxy_pass http://u_buf/;
            proxy_buffering off;
        }

        location /lru/    { proxy_pass http://u_lru/; }

        location /retry/ {
            proxy_pass http://u_retry/;
            proxy_next_upstream error;
        }
    }
}

EOF

my $d = $t->testdir();
my %backends = (
	8081 => {}, 8082 => { vhost_bind => 1 }, 8083 => { vhost_bind => 1 },
	8084 => {}, 8085 => {}, 8086 => {}, 8087 => {}, 8088 => {},
	8089 => {}, 8092 => {}, 8093 => {}, 8094 => {}, 8095 => {},
	8096 => {},
);

for my $p (sort keys %backends) {
	$t->run_daemon(\&http_backend, port($p), log => "$d/b$p.log",
		%{$backends{$p}});
}

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for sort keys %backends;

$t->plan(57);

###############################################################################

# Sends requests for the hosts in @order to $prefix and checks that the
# connection numbers map one-to-one to hosts: a connection is only ever
# used for the host that opened it, and (requests being sequential) each
# host reuses one connection.  Returns a description of what went wrong,
# or '' if nothing did.
sub one_to_one {
	my ($prefix, @order) = @_;

	my (%conn2host, %host2conn, @bad);

	for my $host (@order) {
		my $r = http_get_host($host, "$prefix/x");
		my $c = conn_of($r);

		if ((status_of($r) // 0) != 200 || !defined $c) {
			push @bad, "$host: no response";
			next;
		}

		my $seen = header_of($r, 'X-Host');
		push @bad, "$host: backend saw $seen" if $seen ne $host;

		$conn2host{$c}{$host}++;
		$host2conn{$host}{$c}++;
	}

	for my $c (sort keys %conn2host) {
		my @h = sort keys %{$conn2host{$c}};
		push @bad, "conn $c used for @h" if @h > 1;
	}

	for my $h (sort keys %host2conn) {
		my @c = sort keys %{$host2conn{$h}};
		push @bad, "$h used conns @c" if @c != 1;
	}

	return join('; ', @bad);
}

###############################################################################

# per-host reuse, two hosts interleaved

my @two = (('a.example', 'b.example') x 6);
is(one_to_one('/host', @two), '', 'two hosts: one connection each');
is(backend_log_count("$d/b8081.log", qr/^accept /), 2,
	'two hosts: two connections opened');
like(http_get_host('a.example', '/host/x'), qr/^X-Request: 7\r?$/m,
	'two hosts: seventh request on the same connection');

like($t->read_file('error.log'), qr/keepalive slice key: "b\.example"/,
	'slice key logged');

# three hosts

my @three = (('c.example', 'd.example', 'e.example') x 5);
is(one_to_one('/three', @three), '', 'three hosts: one connection each');
is(backend_log_count("$d/b8094.log", qr/^accept /), 3,
	'three hosts: three connections opened');

# mpm-itk emulation: a connection bound to one host is reset when used for
# another; with slicing that never happens

my @bind_hosts = ('a.example', 'b.example', 'c.example');

sub mixed {
	my ($prefix, $n) = @_;
	my (@status, %post_status);

	for my $i (0 .. $n - 1) {
		my $host = $bind_hosts[$i % 3];
		my $r;

		if ($i % 2) {
			$r = http_post_host($host, "$prefix/x",
				'body-' x ($i + 1));
			$post_status{status_of($r) // 0}++;
		} else {
			$r = http_get_host($host, "$prefix/x");
		}

		push @status, status_of($r) // 0;
	}

	return (\@status, \%post_status);
}

my $log_before = length($t->read_file('error.log'));
my ($st) = mixed('/bind', 30);

is(scalar(grep { $_ != 200 } @$st), 0, 'vhost bind sliced: all 200');
is(backend_log_count("$d/b8082.log", qr/reset-vhost/), 0,
	'vhost bind sliced: no resets');
is(backend_log_count("$d/b8082.log", qr/^accept /), 3,
	'vhost bind sliced: one connection per host');
is(backend_log_count("$d/b8082.log", qr/^request /), 30,
	'vhost bind sliced: all requests reached the backend');
unlike(substr($t->read_file('error.log'), $log_before),
	qr/upstream prematurely closed|recv\(\) failed|\[error\]/,
	'vhost bind sliced: no upstream errors');

# the same traffic without slicing: connections go to the wrong host

$log_before = length($t->read_file('error.log'));
my ($pst, $ppost) = mixed('/plain', 30);

ok(($ppost->{502} || 0) > 0, 'vhost bind plain: POST gets 502');
like(substr($t->read_file('error.log'), $log_before),
	qr/upstream prematurely closed|recv\(\) failed|writev\(\) failed/,
	'vhost bind plain: upstream error logged');
ok(backend_log_count("$d/b8083.log", qr/reset-vhost/) > 0,
	'vhost bind plain: backend reset connections');

# slice_conn=1: two requests at once for one host, only one connection kept

my @r = parallel_get('a.example', ('/conn1/sleep/300') x 2);
my @first = sort map { conn_of($_) // 0 } @r;
is("@first", '1 2', 'slice_conn=1: two connections in parallel');

like($t->read_file('error.log'),
	qr/\[info\].*keepalive: connection not kept, bucket for key "a\.example" is full \(1 idle connections\)/,
	'slice_conn=1: bucket full logged');
is(backend_log_wait("$d/b8084.log", qr/^close /, 1), 1,
	'slice_conn=1: one connection closed');

my ($closed) = grep { backend_log_count("$d/b8084.log",
	qr/^close conn=$_ reason=eof$/) } (1, 2);
my $kept = defined $closed ? 3 - $closed : 0;

@r = parallel_get('a.example', ('/conn1/sleep/300') x 2);
my @second = sort map { conn_of($_) // 0 } @r;
is("@second", "$kept 3", 'slice_conn=1: one reused, one new');

# slice_conn=0: nothing kept

my @c0 = map { conn_of(http_get_host('a.example', '/conn0/x')) // 0 } 1 .. 3;
is("@c0", '1 2 3', 'slice_conn=0: never reused');
like($t->read_file('error.log'),
	qr/\[info\].*keepalive: connection not kept, bucket limit for key "a\.example" is 0/,
	'slice_conn=0: logged');
is(backend_log_wait("$d/b8085.log", qr/^close /, 3), 3,
	'slice_conn=0: all closed');

# two servers, same key: separate buckets

my (@mismatch, %pair_conns, %ports);

for (1 .. 10) {
	my $r = http_get_host('a.example', '/pair/x');
	my $port = header_of($r, 'X-Port') // 'none';
	my $ua = header_of($r, 'X-Upstream-Addr') // 'none';
	push @mismatch, "$port via $ua" unless $ua eq "127.0.0.1:$port";
	$pair_conns{$port}{conn_of($r) // 0}++;
	$ports{$port}++;
}

is(join(', ', @mismatch), '', 'two servers: connection to the chosen server');
is(join(' ', map { "$_=$ports{$_}" } sort { $a <=> $b } keys %ports),
	join(' ', map { port($_) . '=5' } sort { port($a) <=> port($b) }
		(8086, 8087)),
	'two servers: balanced');
is(join(' ', map { scalar keys %{$pair_conns{port($_)}} } 8086, 8087),
	'1 1', 'two servers: one connection each, reused');

# local: same host in two locations gets two connections

# (the backend numbers connections in order, so the numbers are exact: a
# failed request, with no X-Connection, cannot match another one)

my @loc = map { conn_of(http_get_host('a.example', $_)) // 'none' }
	('/l1/x', '/l2/x', '/l1/x', '/l2/x', '/l1/x');
is("@loc[0, 1]", '1 2', 'local: locations do not share');
is($loc[2], 1, 'local: first location reuses');
is($loc[3], 2, 'local: second location reuses');
is($loc[4], 1, 'local: first location reuses again');
is(conn_of(http_get_host('b.example', '/l1/x')) // 'none', 3,
	'local: other host, new connection');

# key with variables and text: $host:$server_port

my $k1 = conn_of(http_get_host('a.example', '/key/x')) // 'none';
my $k2 = conn_of(http_get_host('a.example', '/key/x',
	PeerAddr => '127.0.0.1:' . port(8091))) // 'none';
my $k3 = conn_of(http_get_host('a.example', '/key/x')) // 'none';
my $k4 = conn_of(http_get_host('a.example', '/key/x',
	PeerAddr => '127.0.0.1:' . port(8091))) // 'none';

is("$k1 $k2", '1 2', 'key host:port: other port, other connection');
is($k3, 1, 'key host:port: first port reuses');
is($k4, 2, 'key host:port: second port reuses');
my $p8091 = port(8091);
like($t->read_file('error.log'), qr/keepalive slice key: "a\.example:$p8091"/,
	'key host:port: evaluated');

# key from a header, not the host

sub tenant {
	my ($host, $tenant) = @_;
	return conn_of(http_get_host($host, '/tenant/x',
		headers => [ "X-Tenant: $tenant" ])) // 'none';
}

my $t1 = tenant('a.example', 'one');
my $t2 = tenant('b.example', 'one');
my $t3 = tenant('a.example', 'two');
my $t4 = tenant('b.example', 'two');

is("$t1 $t2", '1 1', 'key tenant: same tenant, other host, reused');
is($t3, 2, 'key tenant: other tenant, other connection');
is($t4, 2, 'key tenant: second tenant reused');
like($t->read_file('error.log'), qr/keepalive slice key: "tenant-two"/,
	'key tenant: evaluated');

# buffered and unbuffered responses

for my $loc ('buf', 'unbuf') {
	my (%map, @bad);

	for my $host (('a.example', 'b.example') x 3) {
		my $r = http_get_host($host, "/$loc/big/100000");
		push @bad, "$host: " . (status_of($r) // 0)
			unless (status_of($r) // 0) == 200
				&& $r =~ /\r?\n\r?\n(x+)\z/
				&& length($1) == 100000;
		$map{$host}{conn_of($r) // 0}++;
	}

	is(join(', ', @bad), '', "$loc: responses complete");

	my @ca = keys %{$map{'a.example'}};
	my @cb = keys %{$map{'b.example'}};
	ok(@ca == 1 && @cb == 1 && $ca[0] != $cb[0],
		"$loc: per host reuse (a: @ca, b: @cb)");
}

# unbuffered reuses the connections buffered left behind (same buckets)

is(backend_log_count("$d/b8092.log", qr/^accept /), 2,
	'buffered and unbuffered: two connections in total');

# global limit across buckets: keepalive 2, three hosts, LRU eviction

my $la = conn_of(http_get_host('a.example', '/lru/x')) // 0;
my $lb2 = conn_of(http_get_host('b.example', '/lru/x')) // 0;

my $lc;
my $evicted = errlog_delta($t, qr/keepalive slice: evicting connection/,
	sub { $lc = conn_of(http_get_host('c.example', '/lru/x')) // 0 });

is("$la $lb2 $lc", '1 2 3', 'lru: three connections');
is($evicted, 1, 'lru: eviction logged');
is(backend_log_wait("$d/b8093.log", qr/^close conn=1 /, 1), 1,
	'lru: oldest (a) closed');

is(conn_of(http_get_host('b.example', '/lru/x')), 2, 'lru: b reuses');
is(conn_of(http_get_host('c.example', '/lru/x')), 3, 'lru: c reuses');
is(conn_of(http_get_host('a.example', '/lru/x')), 4,
	'lru: evicted a opens new');

# a's connection evicted b's (now the least recently used)

is(backend_log_wait("$d/b8093.log", qr/^close conn=2 /, 1), 1,
	'lru: then b evicted');
is(conn_of(http_get_host('c.example', '/lru/x')), 3, 'lru: c still reuses');
is(conn_of(http_get_host('a.example', '/lru/x')), 4,
	'lru: a reuses its new one');

# the key is evaluated once per request, when the balancer's peer data is
# set up, not on each try nor when the connection is freed: every request
# below tries two servers (8097 refuses the connection) and logs one key;
# the connection to the backup is kept in the key's bucket and reused by
# the host's next request

my %retry_re = (
	key => qr/keepalive slice key: /,
	tries => qr/get keepalive slice peer$/m,
	refused => qr/connect\(\) failed \(111: Connection refused\)/,
	reused => qr/get keepalive slice peer: using connection/,
);
my (@retry_conns, %retry);

for my $host (qw/ a.example a.example b.example a.example b.example /) {
	my %before = map { $_ => errlog_count($t, $retry_re{$_}) }
		keys %retry_re;
	my $r = http_get_host($host, '/retry/x');
	push @retry_conns, conn_of($r) // 'none';
	push @{$retry{$_}}, errlog_count($t, $retry_re{$_}) - $before{$_}
		for keys %retry_re;
}

is("@{$retry{refused}}", '1 1 1 1 1', 'retry: first server refused');
is("@{$retry{tries}}", '2 2 2 2 2', 'retry: two tries per request');
is("@{$retry{key}}", '1 1 1 1 1', 'retry: key evaluated once per request');
is("@retry_conns", '1 1 2 1 2', 'retry: connections kept per host');
is("@{$retry{reused}}", '0 1 0 1 1', 'retry: reused on the second try');
is(backend_log_count("$d/b8096.log", qr/^accept /), 2,
	'retry: two connections opened');

###############################################################################
