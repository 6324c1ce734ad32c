#!/usr/bin/perl

# Tests for upstream keepalive: an SSL upstream.  The idle SSL connection is
# reused, and once it is gone (keepalive_requests reached, or closed by
# keepalive_timeout) the new connection resumes the SSL session: the
# session callbacks (set_session/save_session) reach the balancer through
# the keepalive module.  Idle SSL connections are closed without alerts,
# including at shutdown.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use Test::Nginx;
use Test::Nginx::Keepalive qw/ header_of errlog_wait ssl_certificates
	ssl_idle_closed slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_ssl proxy upstream_keepalive/)
	->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 1;
        keepalive_requests 2;
    }

    upstream u_timeout {
        server 127.0.0.1:8081;
        keepalive 1;
        keepalive_timeout 1s;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_ssl_session_reuse on;

        location / {
            proxy_pass https://u;
        }

        location /timeout/ {
            proxy_pass https://u_timeout;
        }
    }

    server {
        listen       127.0.0.1:8081 ssl;
        server_name  localhost;

        ssl_certificate localhost.crt;
        ssl_certificate_key localhost.key;
        ssl_session_cache shared:SSL:1m;

        location / {
            add_header X-Conn $connection always;
            add_header X-Requests $connection_requests always;
            add_header X-Reused $ssl_session_reused always;
            return 200 "backend $uri\n";
        }
    }
}

EOF

ssl_certificates($t, 'localhost');

$t->run()->plan(18);

my $ours = slice_module();

# The backend's connection number; a response without it compares equal to
# nothing (two failed requests must not look like one reused connection).
sub conn_id {
	my ($r, $name) = @_;
	return header_of($r, 'X-Conn') // "$name: no X-Conn";
}

###############################################################################

# keepalive_requests 2: two requests on the first connection, which is
# then closed; the next connection resumes the session

my $r1 = http_get('/1');
my $r2 = http_get('/2');
my $r3 = http_get('/3');
my $r4 = http_get('/4');

like($r1, qr/200 OK.*backend \/1$/s, 'first request');
is(header_of($r1, 'X-Reused'), '.', 'first connection: new session');

is(conn_id($r2, 'r2'), conn_id($r1, 'r1'), 'second request: reused');
is(header_of($r2, 'X-Requests'), 2, 'second request: 2nd on the connection');

isnt(header_of($r3, 'X-Conn'), header_of($r1, 'X-Conn'),
	'keepalive_requests: new connection');
is(header_of($r3, 'X-Requests'), 1, 'new connection: 1st request');
is(header_of($r3, 'X-Reused'), 'r', 'new connection: session resumed');

is(conn_id($r4, 'r4'), conn_id($r3, 'r3'), 'resumed connection reused');
like($r4, qr/200 OK.*backend \/4$/s, 'resumed connection: response');

# and a third connection, left idle until nginx exits

my $r5 = http_get('/5');
is(header_of($r5, 'X-Reused'), 'r', 'third connection: session resumed');

# keepalive_timeout: the idle SSL connection is closed by nginx after 1s,
# the next request resumes the session on a new connection

my $t1 = http_get('/timeout/1');
my $t2 = http_get('/timeout/2');

is(conn_id($t2, 't2'), conn_id($t1, 't1'), 'timeout: reused before timeout');

# the backend server (same error.log) saw nginx close the idle connection
# (polled for: nginx's timer fires whenever the worker gets to it)

my $c1 = header_of($t1, 'X-Conn') // 'none';
my ($closed, $logged) = ssl_idle_closed($t, $c1);
errlog_wait($t, $closed, 1);
like($t->read_file('error.log'), $closed,
	"timeout: idle connection closed by nginx (backend logs $logged)");

my $t3 = http_get('/timeout/3');

like($t3, qr/200 OK.*backend \/timeout\/3$/s, 'timeout: request after idle');
isnt(header_of($t3, 'X-Conn'), header_of($t1, 'X-Conn'),
	'timeout: new connection');
is(header_of($t3, 'X-Reused'), 'r', 'timeout: session resumed');

# only our module logs these

SKIP: {
skip 'module not loaded', 2 unless $ours;

my $log = $t->read_file('error.log');

is(() = $log =~ /get keepalive slice peer: using connection/g, 3,
	'module: 3 reuses');
like($log, qr/keepalive slice close handler/, 'module: close handler');

}

# at exit, nginx closes the idle SSL connections left in both upstreams;
# "no alerts" (added by Test::Nginx) checks that this went quietly

$t->stop();

SKIP: {
skip 'module not loaded', 1 unless $ours;

# one close for the timeout above, two at exit

is(() = $t->read_file('error.log') =~ /keepalive slice close handler/g, 3,
	'module: idle connections closed at exit');

}

###############################################################################
