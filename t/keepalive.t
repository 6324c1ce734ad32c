#!/usr/bin/perl

# Tests for upstream keepalive: basic reuse of idle connections, several
# idle connections at once, LRU eviction when the cache is full, the per
# request reset of the connection's byte counter ($upstream_bytes_sent),
# "keepalive 0", and proof that the directive is handled by the
# keepalive_slice module rather than by nginx's own keepalive module.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count
	backend_log_wait backend_log_lines /;
use Test::Nginx::Keepalive qw/ parallel_get status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

# "keepalive 0" is an nginx 1.29.7 feature: stock 1.28 rejects it, so that
# part of the configuration (and the tests proving which module handled the
# directive) exists only when the keepalive_slice module is loaded.

my $module = slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format bytes '$uri conn=$upstream_http_x_connection '
                     'req=$upstream_http_x_request '
                     'sent=$upstream_bytes_sent';

    upstream basic {
        server 127.0.0.1:8081;
        keepalive 2;
    }

    upstream lru {
        server 127.0.0.1:8082;
        keepalive 2;
    }

    upstream bytes {
        server 127.0.0.1:8083;
        keepalive 1;
    }

%%ZERO_UPSTREAM%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /basic/ {
            proxy_pass http://basic/;
        }

        location /lru/ {
            proxy_pass http://lru/;
        }

        location /bytes/ {
            proxy_pass http://bytes/;
            access_log %%TESTDIR%%/bytes.log bytes;
        }

%%ZERO_LOCATION%%
    }
}

EOF

my ($zu, $zl) = ('', '');

if ($module) {
	$zu = <<'EOF';
    upstream zero {
        server 127.0.0.1:8084;
        keepalive 0;
    }
EOF
	$zl = <<'EOF';
        location /zero/ {
            proxy_pass http://zero/;
        }
EOF
}

$conf =~ s/%%ZERO_UPSTREAM%%/$zu/;
$conf =~ s/%%ZERO_LOCATION%%/$zl/;

$t->write_file_expand('nginx.conf', $conf);

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/basic.log");
$t->run_daemon(\&http_backend, port(8082), log => "$d/lru.log");
$t->run_daemon(\&http_backend, port(8083), log => "$d/bytes.log.backend");
$t->run_daemon(\&http_backend, port(8084), log => "$d/zero.log");

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8084;

$t->plan(21);

###############################################################################

# basic reuse: sequential requests share one connection

my @r = map { http_get('/basic/') } 1 .. 3;

is(join(' ', map { status_of($_) // 'none' } @r), '200 200 200',
	'basic: all 200');
is(join(' ', map { conn_of($_) // 'none' } @r), '1 1 1',
	'basic: one connection for sequential requests');
is(join(' ', map { req_of($_) // 'none' } @r), '1 2 3',
	'basic: request counter on the connection grows');

# two requests at the same time: the idle connection is taken by one of
# them, the other opens a second one; afterwards both are idle and both
# are reused by the next two simultaneous requests

my @pair = parallel_get('localhost', '/basic/sleep/300', '/basic/sleep/300');

is(join(' ', sort map { conn_of($_) // 'none' } @pair), '1 2',
	'basic: simultaneous requests use two connections');

@pair = parallel_get('localhost', '/basic/sleep/300', '/basic/sleep/300');

is(join(' ', sort map { conn_of($_) // 'none' } @pair), '1 2',
	'basic: both idle connections reused');
is(backend_log_count("$d/basic.log", qr/^accept /), 2,
	'basic: no other connection opened');
is(backend_log_count("$d/basic.log", qr/^close /), 0,
	'basic: no connection closed');

# LRU eviction with "keepalive 2": three connections become idle one after
# the other (the backend answers after 200, 500 and 800 ms); storing the
# third evicts the least recently used one, the 200 ms one

my @lru = parallel_get('localhost',
	'/lru/sleep/200', '/lru/sleep/500', '/lru/sleep/800');
my ($c200, $c500, $c800) = map { conn_of($_) // 'none' } @lru;

is(join(' ', sort($c200, $c500, $c800)), '1 2 3',
	'lru: three connections');

backend_log_wait("$d/lru.log", qr/^close /, 1);

is(join(',', grep { /^close / } backend_log_lines("$d/lru.log")),
	"close conn=$c200 reason=eof",
	'lru: least recently used connection closed');

@pair = parallel_get('localhost', '/lru/sleep/300', '/lru/sleep/300');

is(join(' ', sort map { conn_of($_) // 'none' } @pair),
	join(' ', sort($c500, $c800)),
	'lru: the two most recently used connections reused');
is(backend_log_count("$d/lru.log", qr/^accept /), 3,
	'lru: no new connection');

# c->sent is reset when a connection is reused, so $upstream_bytes_sent is
# per request (nginx computes it from c->sent at finalization), not the
# total sent over the connection

http_get('/bytes/same');
http_get('/bytes/same');

my ($b1, $b2);

for (1 .. 50) {
	my $log = -e "$d/bytes.log" ? $t->read_file('bytes.log') : '';
	($b1) = $log =~ m!^/bytes/same conn=1 req=1 sent=(\d+)$!m;
	($b2) = $log =~ m!^/bytes/same conn=1 req=2 sent=(\d+)$!m;
	last if defined $b1 && defined $b2;
	select undef, undef, undef, 0.1;
}

ok(defined $b1 && $b1 > 0, 'bytes sent: first request logged');
is($b2, $b1, 'bytes sent: same count for the same request on reused connection');

# keepalive 0 (nginx 1.29.7): keepalive disabled for the upstream

SKIP: {
skip 'keepalive_slice module not loaded', 3 unless $module;

@r = map { http_get('/zero/') } 1 .. 3;

is(join(' ', map { status_of($_) // 'none' } @r), '200 200 200',
	'keepalive 0: all 200');
is(join(' ', map { conn_of($_) // 'none' } @r), '1 2 3',
	'keepalive 0: new connection for each request');
is(backend_log_wait("$d/zero.log", qr/^close conn=\d+ reason=eof/, 3), 3,
	'keepalive 0: each connection closed by nginx');

}

# our module, not nginx's own, handled the directive

SKIP: {
skip 'keepalive_slice module not loaded', 5 unless $module;
skip 'no debug log', 5 unless $t->has_module('debug');

my $log = $t->read_file('error.log');

like($log, qr/get keepalive slice peer: using connection/,
	'module: reuse logged by keepalive_slice');
like($log, qr/free keepalive slice peer: saving connection/,
	'module: saving logged by keepalive_slice');
like($log, qr/keepalive slice: evicting connection/,
	'module: eviction logged by keepalive_slice');
unlike($log, qr/get keepalive peer/, 'module: stock get peer not called');
unlike($log, qr/free keepalive peer/, 'module: stock free peer not called');

}

###############################################################################
