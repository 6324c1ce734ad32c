#!/usr/bin/perl

# Tests for upstream keepalive: HTTP/2 upstreams ("proxy_http_version 2",
# nginx 1.29.4 and later, stable from 1.30).  Idle HTTP/2 connections are
# kept and reused through this module as HTTP/1.1 ones are: reuse,
# keepalive_requests, slicing by Host, and the default cache of an upstream
# without "keepalive" (1.29.7+).  The backend is nginx itself, speaking
# HTTP/2 without TLS (h2c, "http2 on"), reporting the connection
# ($connection, $connection_requests) and the protocol of each request.
# Older nginx refuses "proxy_http_version 2", which is what is checked
# there.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ conn_of /;
use Test::Nginx::Keepalive qw/ http_get_host header_of status_of
	nginx_test_config slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'keepalive_slice module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy http_v2 upstream_keepalive/);

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream h2 {
        server 127.0.0.1:8081;
        keepalive 8;
    }

    upstream h2_requests {
        server 127.0.0.1:8081;
        keepalive 8;
        keepalive_requests 3;
    }

    upstream h2_sliced {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=1;
    }

    upstream h2_default {
        server 127.0.0.1:8081;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 2;

        location /plain/ {
            proxy_pass http://h2;
        }

        location /requests/ {
            proxy_pass http://h2_requests;
        }

        location /sliced/ {
            proxy_pass http://h2_sliced;
            proxy_set_header Host $host;
        }

        location /default/ {
            proxy_pass http://h2_default;
        }
    }

    server {
        listen       127.0.0.1:8081;
        server_name  localhost;

        http2 on;

        location / {
            add_header X-Connection $connection always;
            add_header X-Connection-Requests $connection_requests always;
            add_header X-Protocol $server_protocol always;
            add_header X-Host $host always;
            return 200 "ok\n";
        }
    }
}

EOF

# HTTP/2 to upstreams came with nginx 1.29.4: before it, "2" is not a
# value of proxy_http_version, and there is nothing more to test here

if (!$t->has_version('1.29.4')) {
	$t->plan(2);

	my ($rc, $out) = nginx_test_config($t, 'h2.conf', $conf);
	my @lines = split /\n/, $t->read_file('h2.conf');
	my ($line) = grep { $lines[$_ - 1] =~ /proxy_http_version 2;/ }
		1 .. @lines;

	isnt($rc, 0, 'proxy_http_version 2 refused before nginx 1.29.4');
	like($out, qr/\[emerg\] invalid value "2" in \S+h2\.conf:$line\b/,
		'proxy_http_version 2: invalid value before nginx 1.29.4');
	exit;
}

$t->write_file_expand('nginx.conf', $conf);
$t->run();

$t->plan(14);

###############################################################################

sub get {
	my ($uri, $host) = @_;
	my $r = http_get_host($host // 'localhost', $uri);
	return {
		status => status_of($r) // 'none',
		conn => conn_of($r) // 'none',
		requests => header_of($r, 'X-Connection-Requests') // 'none',
		proto => header_of($r, 'X-Protocol') // 'none',
		host => header_of($r, 'X-Host') // 'none',
	};
}

# distinct values of @_ numbered in order of appearance: "1 1 2" for
# connection ids that are equal, equal, then new

sub pattern {
	my %seen;
	my $n = 0;
	return join ' ', map { $seen{$_} //= ++$n } @_;
}

# reuse: every request on one HTTP/2 connection

my @r = map { get("/plain/$_") } 1 .. 4;

is(join(' ', map { $_->{status} } @r), '200 200 200 200', 'h2: all 200');
is(join(' ', map { $_->{proto} } @r), join(' ', ('HTTP/2.0') x 4),
	'h2: the backend got HTTP/2');
is(pattern(map { $_->{conn} } @r), '1 1 1 1', 'h2: one connection reused');
is(join(' ', map { $_->{requests} } @r), '1 2 3 4',
	'h2: request 1 to 4 of that connection, says the backend');

# keepalive_requests 3: not kept after its third request

@r = map { get("/requests/$_") } 1 .. 7;

is(pattern(map { $_->{conn} } @r), '1 1 1 2 2 2 3',
	'h2: keepalive_requests 3');

# sliced by Host: one connection per Host, each reused for its own Host only

@r = map { get("/sliced/$_->[1]", $_->[0]) }
	[ 'a.example', 1 ], [ 'b.example', 2 ], [ 'a.example', 3 ],
	[ 'b.example', 4 ], [ 'a.example', 5 ];

is(join(' ', map { $_->{host} } @r),
	'a.example b.example a.example b.example a.example',
	'h2 sliced: each Host reached the backend');
is(pattern(map { $_->{conn} } @r), '1 2 1 2 1',
	'h2 sliced: a connection per Host, reused by its own Host');

# an upstream without "keepalive": nginx's default cache from 1.29.7 (32,
# local), served by this module

@r = map { get("/default/$_") } 1 .. 3;

if ($t->has_version('1.29.7')) {
	is(pattern(map { $_->{conn} } @r), '1 1 1',
		'h2 without keepalive: reused (default from nginx 1.29.7)');
} else {
	is(pattern(map { $_->{conn} } @r), '1 2 3',
		'h2 without keepalive: not kept before nginx 1.29.7');
}
is(join(' ', map { $_->{status} } @r), '200 200 200',
	'h2 without keepalive: all 200');

# through this module, never nginx's own cache, and nginx always found the
# HTTP/2 state of the connection it was given

my $log = $t->read_file('error.log');
my $default_reuses = $t->has_version('1.29.7') ? 2 : 0;

SKIP: {
skip 'no --with-debug', 3 unless $t->has_module('debug');

# plain 3, requests 2+2, sliced 3, default 2 (1.29.7+)
is(() = $log =~ /get keepalive slice peer: using connection/g,
	10 + $default_reuses, 'h2: reused by this module');
is(() = $log =~ /get keepalive peer: using connection/g, 0,
	'h2: not by the stock cache');
is(() = $log =~ /free keepalive slice peer: not saving: keepalive_requests reached/g,
	2, 'h2: not kept when keepalive_requests reached');

}

is(() = $log =~ /no connection data found for keepalive http2 connection/g, 0,
	'h2: HTTP/2 state found on every reused connection');
is(() = $log =~ /\[(?:error|crit)\]/g, 0, 'h2: no errors');

###############################################################################
