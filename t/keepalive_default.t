#!/usr/bin/perl

# Tests for upstream keepalive: explicit upstreams without a "keepalive"
# line.  nginx 1.29.7 and later keep their idle connections by default
# (32 per worker, "local"), with whatever keepalive_timeout,
# keepalive_requests and keepalive_time say in the upstream; older nginx
# keeps none there.  With this module loaded those upstreams must behave
# exactly as nginx's default of the version running, and on 1.29.7+ the
# module serves them itself (nginx's own cache holds nothing).  Implicit
# upstreams (proxy_pass to an address) are never cached, by any version.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream plain {
        server 127.0.0.1:8081;
    }

    upstream requests {
        server 127.0.0.1:8082;
        keepalive_requests 2;
    }

    upstream timeout {
        server 127.0.0.1:8083;
        keepalive_timeout 1s;
    }

    upstream time {
        server 127.0.0.1:8084;
        keepalive_time 1s;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        # HTTP/1.1 without "Connection: close" on every version (1.29.7
        # made it proxy's default): only nginx's cache decides on reuse

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /a/ {
            proxy_pass http://plain;
        }

        location /b/ {
            proxy_pass http://plain;
        }

        location /requests/ {
            proxy_pass http://requests;
        }

        location /timeout/ {
            proxy_pass http://timeout;
        }

        location /time/ {
            proxy_pass http://time;
        }

        location /implicit/ {
            proxy_pass http://127.0.0.1:8085;
        }
    }
}

EOF

my $d = $t->testdir();

for my $port (8081 .. 8085) {
	$t->run_daemon(\&http_backend, port($port), log => "$d/b$port.log");
}
$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8085;

$t->plan(14);

# What this nginx does by default, and who does it: the stock module from
# 1.29.7 on (not when nginx was built without it), this module in its
# place when loaded.

my $default = $t->has_version('1.29.7')
	&& `$Test::Nginx::NGINX -V 2>&1`
		!~ /--without-http_upstream_keepalive_module/;
my $ours = slice_module();

my $v = $default ? 'kept by default from nginx 1.29.7'
	: 'not kept by default before nginx 1.29.7';

sub conns {
	return join ' ', map { conn_of(http_get($_)) // 'none' } @_;
}

###############################################################################

# an upstream with nothing about keepalive in it: reused (by the location
# that opened the connection: "local"), or a connection per request

is(conns('/a/1', '/a/2', '/a/3'), $default ? '1 1 1' : '1 2 3',
	"no keepalive line: $v");
is(conns('/b/1', '/b/2', '/a/4'), $default ? '2 2 1' : '4 5 6',
	"no keepalive line: another location, another connection ('local')");

# keepalive_requests written in the upstream

is(conns(map { "/requests/$_" } 1 .. 5), $default ? '1 1 2 2 3' : '1 2 3 4 5',
	$default ? 'keepalive_requests 2 in the upstream applies'
		: "keepalive_requests: $v");

# keepalive_timeout written in the upstream: nginx closes the idle
# connection after 1s (the default, 60s, would keep it for this test's
# whole run); before 1.29.7 nginx closes it after the response

is(conns('/timeout/1'), '1', 'keepalive_timeout: first connection');
is(backend_log_wait("$d/b8083.log", qr/^close conn=1 reason=eof/, 1, 10), 1,
	$default ? 'keepalive_timeout 1s in the upstream applies: nginx closed'
		. ' the idle connection' : "keepalive_timeout: $v, closed");
is(conns('/timeout/2'), '2', 'keepalive_timeout: then a new connection');

# keepalive_time written in the upstream: a connection older than 1s is
# not kept after its request

is(conns('/time/1'), '1', 'keepalive_time: first connection');
select undef, undef, undef, 1.2;
is(conns('/time/2', '/time/3'), $default ? '1 2' : '2 3',
	$default ? 'keepalive_time 1s in the upstream applies: reused once,'
		. ' then too old to keep' : "keepalive_time: $v");

# an implicit upstream: never kept

is(conns('/implicit/1', '/implicit/2'), '1 2', 'implicit upstream: not kept');
is(backend_log_wait("$d/b8085.log", qr/^close conn=\d+ reason=eof/, 2), 2,
	'implicit upstream: both connections closed by nginx');

# who keeps them: with this module loaded, this module (its debug lines),
# and never nginx's own cache (its debug lines), on every version

my $log = $t->read_file('error.log');

SKIP: {
skip 'module not loaded', 3 unless $ours;
skip 'no --with-debug', 3 unless $t->has_module('debug');

# reuses: plain 2+1+1, requests 1+1, time 1
is(() = $log =~ /get keepalive slice peer: using connection/g,
	$default ? 7 : 0,
	$default ? 'module: served the upstreams without keepalive'
		: 'module: nothing kept without keepalive before 1.29.7');
is(() = $log =~ /get keepalive peer: using connection/g, 0,
	'stock cache: no connection taken');
is(() = $log =~ /free keepalive peer: saving connection/g, 0,
	'stock cache: no connection kept');

}

# the connections that a request did not take back stayed open, and no more

my $closed = $default ? backend_log_count("$d/b8081.log", qr/^close conn=/)
	: backend_log_wait("$d/b8081.log", qr/^close conn=/, 6);
is($closed, $default ? 0 : 6,
	$default ? 'no keepalive line: idle connections still open'
		: 'no keepalive line: every connection closed');

###############################################################################
