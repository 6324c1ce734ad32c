#!/usr/bin/perl

# Tests for upstream keepalive with load balancing: the balancer (round
# robin, hash, ip_hash, least_conn, random) always chooses the server
# first, and only an idle connection to that very server is reused.  A
# balancer placed after "keepalive" replaces it, as with nginx's own module.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ errlog_delta /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive
	upstream_hash upstream_ip_hash upstream_least_conn upstream_random/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream rr {
        server 127.0.0.1:8081;
        server 127.0.0.1:8082;
        keepalive 4;
    }

    upstream hash {
        hash $arg_k;
        server 127.0.0.1:8083;
        server 127.0.0.1:8084;
        keepalive 4;
    }

    # the same balancer without keepalive, for reference
    upstream hash_ref {
        hash $arg_k;
        server 127.0.0.1:8083;
        server 127.0.0.1:8084;
    }

    upstream ip_hash {
        ip_hash;
        server 127.0.0.1:8085;
        server 127.0.0.1:8086;
        keepalive 4;
    }

    upstream least_conn {
        least_conn;
        server 127.0.0.1:8087;
        server 127.0.0.1:8088;
        keepalive 4;
    }

    upstream random {
        random;
        server 127.0.0.1:8089;
        server 127.0.0.1:8090;
        keepalive 4;
    }

    # a balancer after keepalive takes the place keepalive had wrapped
    # (nginx warns "load balancing method redefined"): nothing is kept
    upstream hash_after {
        server 127.0.0.1:8091;
        keepalive 4;
        hash $arg_k;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /rr/ {
            proxy_pass http://rr/;
        }

        location /hash/ {
            proxy_pass http://hash/;
        }

        location /hash_ref/ {
            proxy_pass http://hash_ref/;
        }

        location /ip_hash/ {
            proxy_pass http://ip_hash/;
        }

        location /least_conn/ {
            proxy_pass http://least_conn/;
        }

        location /random/ {
            proxy_pass http://random/;
        }

        location /hash_after/ {
            proxy_pass http://hash_after/;
        }
    }
}

EOF

my $d = $t->testdir();

for my $p (8081 .. 8091) {
	$t->run_daemon(\&http_backend, port($p), log => "$d/$p.log");
}

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8091;

$t->plan(24);

###############################################################################

# Requests are sequential, so at most one connection per server is busy at
# a time: with every connection reused, each backend sees exactly one.

# round robin: requests alternate between the servers although an idle
# connection to the other server is there each time, i.e. the balancer is
# asked first; each server's connection serves only that server's requests

my @r = map { http_get('/rr/') } 1 .. 6;

is(join(' ', map { port_name($_) } @r), '8081 8082 8081 8082 8081 8082',
	'round robin: servers alternate');
is(join(' ', map { conn_of($_) // 'none' } @r), '1 1 1 1 1 1',
	'round robin: one connection per server');
is(join(' ', map { req_of($_) // 'none' } @r), '1 1 2 2 3 3',
	'round robin: connections reused');
is(accepts(8081, 8082), '1 1', 'round robin: one connection opened per server');

# hash: a key always goes to the same server; its connection is reused

my (%first, %again);
my @keys = qw/ a b c d e f g h /;

for my $k (@keys) {
	$first{$k} = port_name(http_get("/hash/?k=$k"));
}

my @hr;
for my $k (@keys) {
	my $h = http_get("/hash/?k=$k");
	push @hr, $h;
	$again{$k} = port_name($h);
}

is(join(' ', map { $again{$_} } @keys), join(' ', map { $first{$_} } @keys),
	'hash: each key stays on its server');
is(join(' ', sort { $a <=> $b } keys %{{ map { $_ => 1 } values %first }}),
	'8083 8084', 'hash: both servers used');
is(join(' ', map { conn_of($_) // 'none' } @hr), '1 1 1 1 1 1 1 1',
	'hash: one connection per server');
is(accepts(8083, 8084), '1 1', 'hash: one connection opened per server');
is(requests(8083) + requests(8084), 16, 'hash: all requests seen');

# the same keys without keepalive go to the same servers: the keepalive
# cache never overrides the balancer's choice

my %ref = map { $_ => port_name(http_get("/hash_ref/?k=$_")) } @keys;

is(join(' ', map { $first{$_} } @keys), join(' ', map { $ref{$_} } @keys),
	'hash: servers chosen as without keepalive');

# ip_hash: all requests from 127.0.0.1 go to one server, on one connection

@r = map { http_get('/ip_hash/') } 1 .. 4;

my %ports = map { port_name($_) => 1 } @r;
is(scalar keys %ports, 1, 'ip_hash: one server');
is(join(' ', map { req_of($_) // 'none' } @r), '1 2 3 4',
	'ip_hash: connection reused');
is(accepts(8085, 8086), (keys %ports)[0] eq '8085' ? '1 0' : '0 1',
	'ip_hash: one connection opened');

# least_conn: with no request active, the servers alternate

@r = map { http_get('/least_conn/') } 1 .. 6;

is(join(' ', map { port_name($_) } @r), '8087 8088 8087 8088 8087 8088',
	'least_conn: servers alternate');
is(join(' ', map { req_of($_) // 'none' } @r), '1 1 2 2 3 3',
	'least_conn: connections reused');
is(accepts(8087, 8088), '1 1', 'least_conn: one connection opened per server');

# random: whatever server is chosen, its own connection is reused

@r = map { http_get('/random/') } 1 .. 20;

my %seen;
my $ok = 1;

for my $x (@r) {
	my $p = port_name($x);
	$seen{$p}++;
	$ok = 0 unless (req_of($x) // 0) == $seen{$p}
		&& (conn_of($x) // 0) == 1;
}

ok($ok, 'random: each server\'s connection reused');
is(join(' ', sort keys %seen), '8089 8090', 'random: both servers used');
is(requests(8089) + requests(8090), 20, 'random: all requests seen');

# hash after keepalive: the balancer replaced the keepalive wrapper at
# configuration time, so no request goes through a keepalive peer (nginx's
# module logs "get keepalive peer", this one "get keepalive slice peer")
# and every request opens a connection of its own, closed after it

like($t->read_file('error.log'),
	qr/\[warn\].*load balancing method redefined/,
	'hash after keepalive: redefined warning');

my $peers = errlog_delta($t, qr/get keepalive (?:slice )?peer/, sub {
	@r = map { http_get('/hash_after/?k=a') } 1 .. 3;
});

is(join(' ', map { conn_of($_) // 'none' } @r), '1 2 3',
	'hash after keepalive: connections not reused');
is(join(' ', map { req_of($_) // 'none' } @r), '1 1 1',
	'hash after keepalive: one request per connection');
is($peers, 0, 'hash after keepalive: keepalive peer not used');
is(backend_log_wait("$d/8091.log", qr/^close conn=[123] reason=eof$/, 3), 3,
	'hash after keepalive: connections closed');

###############################################################################

# the logical port (8081...) of the backend that answered

sub port_name {
	my ($r) = @_;
	return 'none' unless defined $r;
	my ($head) = split /\r?\n\r?\n/, $r, 2;
	my ($p) = $head =~ /^X-Port:\s*(\d+)/mi or return 'none';
	for my $n (8081 .. 8091) {
		return $n if port($n) == $p;
	}
	return 'none';
}

sub accepts {
	return join ' ', map { backend_log_count("$d/$_.log", qr/^accept /) } @_;
}

sub requests {
	my ($p) = @_;
	return backend_log_count("$d/$p.log", qr/^request /);
}

###############################################################################
