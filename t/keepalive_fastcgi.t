#!/usr/bin/perl

# Tests for upstream keepalive: fastcgi_pass to an upstream with keepalive.
# With "fastcgi_keep_conn on" the backend connection is reused by the
# following requests; without it nginx asks the backend to close the
# connection after each request (no FCGI_KEEP_CONN), and it is not kept.
# A Keep-Alive header from the application (about its client's
# connection, not nginx's) is not a hint for the backend connection.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use Test::Nginx;
use Test::Nginx::Backend qw/ fastcgi_backend conn_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http fastcgi upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream keep {
        server 127.0.0.1:8081;
        keepalive 1;
    }

    upstream nokeep {
        server 127.0.0.1:8081;
        keepalive 1;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /keep/ {
            fastcgi_pass keep;
            fastcgi_keep_conn on;
            fastcgi_param REQUEST_URI $request_uri;
        }

        location /nokeep/ {
            fastcgi_pass nokeep;
            fastcgi_param REQUEST_URI $request_uri;
        }
    }
}

EOF

my $blog = $t->testdir() . '/backend.log';

$t->run_daemon(\&fastcgi_backend, port(8081), log => $blog);
$t->run()->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start fastcgi backend";

$t->plan(17);

my $ours = slice_module();

###############################################################################

# fastcgi_keep_conn on: one backend connection for all requests

my @r = map { http_get("/keep/$_") } 1 .. 3;

like($r[0], qr/^X-Request: 1\r?$/m, 'keep_conn: first request');
like($r[0], qr/^conn=1 req=1 uri=\/keep\/1$/m, 'keep_conn: first body');
is(conn_of($r[1]) // 'none', 1, 'keep_conn: second request reused');
like($r[1], qr/^X-Request: 2\r?$/m, 'keep_conn: second request number');
is(conn_of($r[2]) // 'none', 1, 'keep_conn: third request reused');
like($r[2], qr/^conn=1 req=3 uri=\/keep\/3$/m, 'keep_conn: third body');

is(backend_log_count($blog, qr/^accept /), 1, 'keep_conn: one connection');
is(backend_log_count($blog, qr/^close conn=1 /), 0,
	'keep_conn: connection still open');

# without fastcgi_keep_conn: the backend closes after each request, and
# nginx does not keep (nor reuse) the connection

my @n = map { http_get("/nokeep/$_") } 1 .. 2;

like($n[0], qr/^X-Request: 1\r?$/m, 'no keep_conn: first request');
like($n[1], qr/^X-Request: 1\r?$/m, 'no keep_conn: second request new');
is(join(' ', map { conn_of($_) // 'none' } @n), '2 3',
	'no keep_conn: not reused');
like($n[1], qr/^conn=3 req=1 uri=\/nokeep\/2$/m, 'no keep_conn: body');

is(backend_log_wait($blog, qr/^close conn=[23] reason=close-requested/, 2),
	2, 'no keep_conn: connections closed as requested');

# only our module logs these

SKIP: {
skip 'module not loaded', 2 unless $ours;

my $log = $t->read_file('error.log');

is(() = $log =~ /get keepalive slice peer: using connection/g, 2,
	'module: two reuses');
# the backend's close may already have been read (eof) when nginx frees
# the peer, or not yet (the response then is not keepalive)

is(() = $log =~ /free keepalive slice peer: not saving: (?:response not keepalive|connection error)/g,
	2, 'module: no keep_conn not saved');

}

# a FastCGI application's Keep-Alive header is not the backend's hint:
# "max=0" there does not stop reuse

@r = map { http_get("/keep/x?ka=max%3D0") } 1 .. 2;
is(join(' ', map { conn_of($_) // 'none' } @r), '1 1',
	'Keep-Alive from the application: connection still reused');
is(backend_log_count($blog, qr/^close conn=1 /), 0,
	'Keep-Alive from the application: connection still open');

###############################################################################
