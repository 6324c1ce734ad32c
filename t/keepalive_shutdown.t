#!/usr/bin/perl

# Tests for upstream keepalive: graceful shutdown.  Idle upstream
# connections are closed as soon as the worker starts shutting down, even
# with a long keepalive_timeout, and a request still running then completes
# but leaves no new idle connection behind.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Time::HiRes qw/ time /;

use Test::Nginx qw/ :DEFAULT http_start http_end /;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_wait backend_log_lines /;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $module = slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 4;
        keepalive_timeout 60s;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}

EOF

my $log = $t->testdir() . '/backend.log';

$t->run_daemon(\&http_backend, port(8081), log => $log);
$t->run();
$t->waitforsocket('127.0.0.1:' . port(8081));

$t->plan(9);

###############################################################################

# two requests at once: the short one leaves its connection idle, the long
# one is still running when nginx is told to quit

my $short = http_start("GET /sleep/300 HTTP/1.0\r\nHost: localhost\r\n\r\n");
my $long = http_start("GET /sleep/2000 HTTP/1.0\r\nHost: localhost\r\n\r\n");

my $r = $short ? http_end($short) : undef;
my $idle = conn_of($r) // 'none';

like($r, qr/^HTTP\/1.1 200 /, 'short request');

backend_log_wait($log, qr{uri=/sleep/2000$}, 1);
my ($busy) = map { /^request conn=(\d+) / ? $1 : () }
	grep { m{uri=/sleep/2000$} } backend_log_lines($log);
$busy //= 'none';

isnt($busy, $idle, 'long request on another connection');
is(backend_log_count($log, qr/^close /), 0, 'no connection closed yet');

# graceful shutdown; stop() waits until nginx has exited

my $start = time();
$t->stop();
my $elapsed = time() - $start;

$r = $long ? http_end($long) : undef;

like($r, qr/^HTTP\/1.1 200 /, 'long request completed during shutdown');
is(conn_of($r), $busy, 'long request connection');

# a connection left idle would have held the worker for keepalive_timeout
# (60s); the bound is generous, the failure it catches is a minute long

ok($elapsed < 10, 'nginx exited without waiting for keepalive_timeout')
	or diag("stop took $elapsed seconds");

backend_log_wait($log, qr/^close /, 2);

is(join(',', grep { /^close / } backend_log_lines($log)),
	"close conn=$idle reason=eof,close conn=$busy reason=eof",
	'idle connection closed first, then the one in use, by nginx');

SKIP: {
skip 'keepalive_slice module not loaded', 2 unless $module;
skip 'no debug log', 2 unless $t->has_module('debug');

my $e = $t->read_file('error.log');

like($e, qr/free keepalive slice peer: not saving: exiting/,
	'module: connection not kept while exiting');
like($e, qr/gracefully shutting down(?:.*\n)*?.*keepalive slice close handler/,
	'module: idle connection closed by the close handler at shutdown');

}

###############################################################################
