#!/usr/bin/perl

# Tests for upstream keepalive: the backend's Keep-Alive response header
# (keepalive_hints, keepalive_hint_margin).  A backend that says
# "Keep-Alive: timeout=3" and drops a request arriving on a connection idle
# 3 s or more: POST, 3.5 s quiet, POST is answered 200 on a new connection
# (and 502 with "keepalive_hints off", as by nginx's own module).  A hint
# only shortens keepalive_timeout, never lengthens it; "max" limits the
# requests of the connection, and travels with it; a hint that says no
# reuse ("max=0", a timeout not above the margin) is counted as not_kept
# "keepalive_hint", a timer it shortened as closed "hint_timeout"; every
# malformed header changes nothing, and nothing is logged above info.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use JSON::PP qw/ decode_json /;
use Time::HiRes qw/ sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_post_host status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded') unless slice_module();

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
    }

    upstream off {
        server 127.0.0.1:8082;
        keepalive 4;
        keepalive_hints off;
    }

    upstream short {
        server 127.0.0.1:8083;
        keepalive 4;
        keepalive_timeout 2s;
    }

    upstream nomargin {
        server 127.0.0.1:8084;
        keepalive 4;
        keepalive_hint_margin 0;
    }

    upstream bad {
        server 127.0.0.1:8085;
        keepalive 4;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /u/ {
            proxy_pass http://u/;
        }

        location /off/ {
            proxy_pass http://off/;
        }

        location /short/ {
            proxy_pass http://short/;
        }

        location /nomargin/ {
            proxy_pass http://nomargin/;
        }

        location /bad/ {
            proxy_pass http://bad/;
        }

        location = /status {
            keepalive_status;
        }
    }
}

EOF

my $d = $t->testdir();

# the backends of u and off give a connection up after 3 s idle, without
# closing it: only the hint can tell nginx
$t->run_daemon(\&http_backend, port(8081), log => "$d/u.log", drop_idle => 3);
$t->run_daemon(\&http_backend, port(8082), log => "$d/off.log", drop_idle => 3);
$t->run_daemon(\&http_backend, port(8083), log => "$d/short.log");
$t->run_daemon(\&http_backend, port(8084), log => "$d/nomargin.log");
$t->run_daemon(\&http_backend, port(8085), log => "$d/bad.log");

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8085;

$t->plan(42);

###############################################################################

sub get {
	my ($uri) = @_;
	return http_get($uri);
}

sub post {
	my ($uri) = @_;
	return http_post_host('localhost', $uri, 'body');
}

sub counters {
	my ($name) = @_;
	my $r = http_get('/status');
	my ($body) = $r =~ /\r\n\r\n(.*)/s;
	my $json = eval { decode_json($body // '') } // {};
	return $json->{upstreams}{$name} // {};
}

# the idle-close race: POST, 3.5 s quiet, POST; and a hint above
# keepalive_timeout (2s) after 2.5 s, in the same quiet

my $r = post('/u/?ka=timeout%3D3');
is(conn_of($r), 1, 'race: first POST');
$r = post('/off/?ka=timeout%3D3');
is(conn_of($r), 1, 'hints off: first POST');
$r = get('/short/?ka=timeout%3D300');
is(conn_of($r), 1, 'hint above keepalive_timeout: first request');

sleep 3.5;

$r = post('/u/?ka=timeout%3D3');
is(status_of($r) // 'none', 200, 'race: second POST answered');
is(conn_of($r), 2, 'race: second POST on a new connection');
is(backend_log_count("$d/u.log", qr/reason=drop-idle/), 0,
	'race: no request dropped');

$r = post('/off/?ka=timeout%3D3');
is(status_of($r) // 'none', 502, 'hints off: second POST 502, as nginx');
# the backend logs the close after closing: nginx may answer first
is(backend_log_wait("$d/off.log", qr/^close conn=1 reason=drop-idle/, 1), 1,
	'hints off: sent on the connection the backend gave up');

$r = get('/short/?ka=timeout%3D300');
is(conn_of($r), 2, 'hint above keepalive_timeout: not reused after 2.5 s');

is(counters('u')->{closed}{hint_timeout}, 1, 'race: closed hint_timeout');
is(counters('u')->{closed}{timeout}, 0, 'race: not closed timeout');
is(counters('short')->{closed}{timeout}, 1,
	'hint above keepalive_timeout: closed timeout');
is(counters('short')->{closed}{hint_timeout}, 0,
	'hint above keepalive_timeout: not closed hint_timeout');

# a long hint does not stop reuse

$r = get('/u/?ka=timeout%3D30');
my $conn = conn_of($r);
sleep 0.5;
$r = get('/u/?ka=timeout%3D30');
is(conn_of($r), $conn, 'timeout=30: reused after 0.5 s');

# max=M: M more requests on the connection, then a new one; the limit
# stays with the connection through responses without a header

$r = get('/u/?ka=max%3D2');
$conn = conn_of($r);
my @r = map { get('/u/') } 1 .. 3;
is(join(' ', map { conn_of($_) // 'none' } @r),
	join(' ', $conn, $conn, $conn + 1),
	'max=2: two more requests, then a new connection');

# the smaller of max and keepalive_requests wins, a later max cannot lift
# an earlier one

$r = get('/u/?ka=max%3D1');
$conn = conn_of($r);
@r = map { get('/u/?ka=max%3D100') } 1 .. 2;
is(join(' ', map { conn_of($_) // 'none' } @r), join(' ', $conn, $conn + 1),
	'max=1, then max=100: one more request');

my $before = counters('u')->{not_kept}{keepalive_hint};

$r = get('/u/?ka=max%3D0');
$conn = conn_of($r);
$r = get('/u/');
is(conn_of($r), $conn + 1, 'max=0: not kept');

$r = get('/u/?ka=timeout%3D1');
$conn = conn_of($r);
$r = get('/u/');
is(conn_of($r), $conn + 1, 'timeout=1, not above the margin: not kept');

is(counters('u')->{not_kept}{keepalive_hint} - $before, 2,
	'max=0, timeout=1: counted as not_kept keepalive_hint');

my $prom = http_get('/status?format=prometheus');
like($prom, qr/^nginx_upstream_keepalive_closed_total\{upstream="u",reason="hint_timeout"\} 1$/m,
	'prometheus: closed hint_timeout');
like($prom, qr/^nginx_upstream_keepalive_not_kept_total\{upstream="u",reason="keepalive_hint"\} [1-9]\d*$/m,
	'prometheus: not_kept keepalive_hint');

$r = get('/u/?ka=Timeout+%3D+%221%22+,+MAX=9');
$conn = conn_of($r);
$r = get('/u/');
is(conn_of($r), $conn + 1, 'case, spaces, quotes: timeout=1 read');

$r = get('/u/?ka=timeout%3D1,+x-ext%3Dy');
$conn = conn_of($r);
$r = get('/u/');
is(conn_of($r), $conn + 1, 'an unknown parameter ignored by itself');

# keepalive_hint_margin 0: timeout=1 is kept (for 1 s)

$r = get('/nomargin/?ka=timeout%3D1');
$r = get('/nomargin/');
is(conn_of($r), 1, 'margin 0: timeout=1 kept');

# malformed hints change nothing: each would refuse reuse if it were read
# (timeout=1 or max=0), and the connection is reused as without a header

my $warnings = () = $t->read_file('error.log') =~ /\[(warn|error|crit|alert|emerg)\]/g;

my @bad = (
	'',
	'timeout=1,+timeout=1',
	'timeout=-1',
	'timeout=abc',
	'timeout=',
	'timeout=1.5',
	'max=0,+max=0',
	'max=99999999999999999999',
	'timeout=1+max=0',
	'timeout=1;max=0',
	'timeout=%221',
	'timeout=1,+' . ('x' x 300),
);

$r = get('/bad/');
$conn = conn_of($r);

for my $bad (@bad) {
	$r = get("/bad/?ka=$bad");
	is(conn_of($r), $conn, "malformed \"$bad\": reused")
		unless length $bad > 40;
	is(conn_of($r), $conn, "malformed: oversized: reused")
		if length $bad > 40;
}

# two Keep-Alive headers, each alone would refuse reuse

$r = get('/bad/?ka=max%3D0&ka=max%3D0');
is(conn_of($r), $conn, 'two Keep-Alive headers: ignored');
$r = get('/bad/');
is(conn_of($r), $conn, 'malformed hints: connection still reused');

is(counters('bad')->{not_kept}{keepalive_hint}, 0,
	'malformed hints: nothing not_kept');

my $now = () = $t->read_file('error.log') =~ /\[(warn|error|crit|alert|emerg)\]/g;
is($now - $warnings, 0, 'malformed hints: nothing logged above info');

SKIP: {
skip 'no debug log', 2 unless $t->has_module('debug');

my $log = $t->read_file('error.log');
like($log, qr/keepalive hint "timeout=abc" ignored: "timeout" is not a number/,
	'debug: a malformed hint ignored');
like($log, qr/keepalive hint "timeout=3": idle timer 2000 ms \(shortened/,
	'debug: a hint shortened the timer');

}

###############################################################################
