#!/usr/bin/perl

# Tests for upstream keepalive, fault injection on the backend side: the
# backend closes a connection right after answering with keep-alive, or
# drops the next request on it (the race keepalive_timeout exists for: a
# GET is retried on a new connection, a POST is answered 502, as by nginx's
# own module); the backend goes away and comes back; a server marked down
# by max_fails recovers; a backend that accepts and never answers (504, the
# connection is not kept).  No request fails that nginx's own module would
# have served, and afterwards the cache holds the right connections.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use POSIX ();
use Time::HiRes qw/ sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_wait backend_log_lines req_of /;
use Test::Nginx::Keepalive qw/ http_post_host status_of header_of errlog_count errlog_wait slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $ours = slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u_race {
        server 127.0.0.1:8081;
        keepalive 2;
    }

    upstream u_away {
        server 127.0.0.1:8082;
        keepalive 2;
    }

    upstream u_fails {
        server 127.0.0.1:8083 max_fails=1 fail_timeout=1s;
        server 127.0.0.1:8084;
        keepalive 4;
    }

    upstream u_hang {
        server 127.0.0.1:8085;
        keepalive 2;
    }

    upstream u_kt {
        server 127.0.0.1:8086;
        keepalive 2;
        keepalive_timeout 300ms;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /race/  { proxy_pass http://u_race/; }
        location /away/  { proxy_pass http://u_away/; }
        location /fails/ { proxy_pass http://u_fails/; }
        location /kt/    { proxy_pass http://u_kt/; }

        location /hang/ {
            proxy_pass http://u_hang/;
            proxy_read_timeout 1s;
        }
    }
}

EOF

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/race.log");
$t->run_daemon(\&http_backend, port(8084), log => "$d/fails-b.log");
$t->run_daemon(\&http_backend, port(8085), log => "$d/hang.log");
$t->run_daemon(\&http_backend, port(8086), log => "$d/kt.log");
$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for 8081, 8084, 8085, 8086;

# backends this file stops and starts again itself (its own children only)

my %backend;

sub backend_start {
	my ($t, $port, $log) = @_;

	my $pid = fork() // die "Can't fork backend: $!\n";
	if ($pid == 0) {
		http_backend(port($port), log => $log);
		POSIX::_exit(0);
	}

	$backend{$port} = $pid;
	$t->waitforsocket('127.0.0.1:' . port($port))
		or die "backend $port did not start\n";
}

sub backend_stop {
	my ($port) = @_;
	my $pid = delete $backend{$port} or return;
	kill 'TERM', $pid;
	waitpid $pid, 0;
}

END {
	local $?;
	backend_stop($_) for keys %backend;
}

backend_start($t, 8082, "$d/away-1.log");
backend_start($t, 8083, "$d/fails-a1.log");

$t->plan(49);

###############################################################################

my $handler = qr/keepalive (?:slice )?close handler/;
my $closed = qr/upstream prematurely closed connection/;
my $refused = qr/connect\(\) failed \(111: Connection refused\)/;
my $reset = qr/Connection reset|Broken pipe/;
my $not_failed = qr/free keepalive slice peer: not saving: peer failed/;

# (1) the backend drops the next request on an idle connection: nginx took
# the cached connection, which failed before any response; a GET is
# retried on a new connection, a POST is not (non-idempotent): 502

my $rlog = "$d/race.log";
my ($e_closed, $e_failed) = (errlog_count($t, $closed),
	errlog_count($t, $not_failed));

my $r = http_get('/race/dropnext');
is(conn_of($r), 1, 'race: connection 1 kept');

$r = http_get('/race/get');
is(status_of($r) // 'none', 200, 'race: GET answered');
is(conn_of($r) . '/' . req_of($r), '2/1', 'race: GET retried on a new connection');
is(backend_log_count($rlog, qr/^request conn=1 req=2 .* uri=\/get$/), 1,
	'race: GET tried on the cached connection first');
is(backend_log_wait($rlog, qr/^close conn=1 reason=drop-next$/, 1), 1,
	'race: which the backend dropped');
is(errlog_count($t, $closed) - $e_closed, 1, 'race: prematurely closed logged');

$r = http_get('/race/dropnext');
is(conn_of($r), 2, 'race: connection 2 reused');

$r = http_post_host('localhost', '/race/post', 'body');
is(status_of($r) // 'none', 502, 'race: POST on the dropped connection 502');
is(backend_log_count($rlog, qr/ uri=\/post$/), 1, 'race: POST not retried');
is(backend_log_wait($rlog, qr/^close conn=2 reason=drop-next$/, 1), 1,
	'race: connection 2 dropped');

$r = http_get('/race/x');
is(conn_of($r) . '/' . req_of($r), '3/1', 'race: next request on a new one');

SKIP: {
skip 'keepalive_slice module not loaded', 1 unless $ours;

is(errlog_count($t, $not_failed) - $e_failed, 2,
	'module: failed cached connections not kept');

}

# (2) the backend closes right after answering with keep-alive: every
# request is answered, each on a connection of its own; whether nginx
# notices the close before the next request (close handler) or only when
# it tries the connection (then retries), is a race, as with nginx's own
# module

my @r = map { http_get("/race/idle/fin/0/$_") } 1 .. 20;
my %conns = map { (conn_of($_) // 'none') => 1 } @r;

is(scalar(grep { (status_of($_) // 0) == 200 } @r), 20,
	'close after answer: all answered');
is(scalar(keys %conns), 20, 'close after answer: 20 connections');
is(backend_log_wait($rlog, qr/reason=idle-fin$/, 20), 20,
	'close after answer: each closed by the backend');

# (3) the backend goes away (its idle connection with it) and comes back

my $e_dead = errlog_count($t, qr/$closed|$reset/);

is(conn_of(http_get('/away/x')) . '/' . conn_of(http_get('/away/x')), '1/1',
	'away: connection reused');

my $handled = errlog_count($t, $handler);
my $e_refused = errlog_count($t, $refused);
backend_stop(8082);

is(errlog_wait($t, $handler, $handled + 1) - $handled, 1,
	'away: idle connection closed when the backend went away');

$r = http_get('/away/x');
is(status_of($r) // 'none', 502, 'away: backend down: 502');
is(errlog_count($t, $refused) - $e_refused, 1, 'away: connection refused');

backend_start($t, 8082, "$d/away-2.log");

$r = http_get('/away/x');
is(status_of($r) // 'none', 200, 'away: backend back: 200');
is(conn_of($r) . '/' . req_of($r), '1/1', 'away: new connection');
$r = http_get('/away/x');
is(conn_of($r) . '/' . req_of($r), '1/2', 'away: new connection reused');

is(errlog_count($t, qr/$closed|$reset/) - $e_dead, 0,
	'away: no dead connection tried');

# (4) a server marked down by max_fails, and recovered

my ($pa, $pb) = (port(8083), port(8084));

sub fails_get {
	my @r = map { http_get('/fails/x') } 1 .. $_[0];
	return (
		join(',', map { status_of($_) // 'none' } @r),
		join(',', map { (header_of($_, 'X-Port') // 0) == $pa ? 'A' : 'B' }
			@r),
	);
}

my ($st, $ports) = fails_get(4);
is($st, '200,200,200,200', 'fails: all answered');
is(join(',', sort split /,/, $ports), 'A,A,B,B', 'fails: both servers');
is(backend_log_count("$d/fails-a1.log", qr/^request conn=1 req=2 /), 1,
	'fails: A connection reused');

$handled = errlog_count($t, $handler);
$e_refused = errlog_count($t, $refused);
my $e_disabled = errlog_count($t, qr/upstream server temporarily disabled/);

backend_stop(8083);

is(errlog_wait($t, $handler, $handled + 1) - $handled, 1,
	'fails: idle A connection closed when A went away');

($st, $ports) = fails_get(4);
is($st, '200,200,200,200', 'fails: A down: all answered');
is($ports, 'B,B,B,B', 'fails: A down: served by B');
is(errlog_count($t, $refused) - $e_refused, 1, 'fails: A tried once');
is(errlog_count($t, qr/upstream server temporarily disabled/) - $e_disabled,
	1, 'fails: A marked down');
is(backend_log_count("$d/fails-b.log", qr/^accept /), 1,
	'fails: B connection reused all along');

backend_start($t, 8083, "$d/fails-a2.log");

# fail_timeout=1s (nginx counts it in whole seconds): A is tried again
# after one or two seconds; until then B serves

my @st;
for (1 .. 40) {
	($st, $ports) = fails_get(1);
	push @st, $st;
	last if $ports eq 'A';
	sleep 0.1;
}

is($ports, 'A', 'fails: A back: tried again');

($st, $ports) = fails_get(4);
is(join(',', @st, $st), join(',', ('200') x (@st + 4)),
	'fails: A back: all answered');
is(backend_log_count("$d/fails-a2.log", qr/^request conn=1 req=2 /), 1,
	'fails: A recovered, its new connection reused');
is(backend_log_count("$d/fails-a2.log", qr/^accept /), 1,
	'fails: A recovered, one connection');
is(errlog_count($t, $refused) - $e_refused, 1, 'fails: A not failing again');

# (5) a backend that accepts and never answers: read timeout, 504, the
# connection is not kept

my $hlog = "$d/hang.log";
my $e_timeout = errlog_count($t, qr/upstream timed out/);
$e_failed = errlog_count($t, $not_failed);

is(conn_of(http_get('/hang/x')), 1, 'hang: connection 1 kept');

$r = http_get('/hang/hang');
is(status_of($r) // 'none', 504, 'hang: 504');
is(backend_log_count($hlog, qr/^request conn=1 req=2 .* uri=\/hang$/), 1,
	'hang: on the cached connection');
is(errlog_count($t, qr/upstream timed out/) - $e_timeout, 1,
	'hang: upstream timed out');
is(backend_log_wait($hlog, qr/^close conn=1 reason=eof$/, 1), 1,
	'hang: connection closed by nginx');

$r = http_get('/hang/x');
is(conn_of($r) . '/' . req_of($r), '2/1', 'hang: next request on a new one');

SKIP: {
skip 'keepalive_slice module not loaded', 1 unless $ours;

is(errlog_count($t, $not_failed) - $e_failed, 1,
	'module: timed out connection not kept');

}

# (6) keepalive_timeout shorter than the backend's own idle timeout: nginx
# closes first, the backend never closes a connection nginx may reuse

my $klog = "$d/kt.log";
$handled = errlog_count($t, $handler);

is(conn_of(http_get('/kt/idle/fin/1000')), 1, 'timeout: connection 1 kept');
is(backend_log_wait($klog, qr/^close conn=1 /, 1), 1, 'timeout: closed');
is(backend_log_count($klog, qr/^close conn=1 reason=eof$/), 1,
	'timeout: by nginx, before the backend');
is(errlog_count($t, $handler) - $handled, 1, 'timeout: close handler');

$r = http_get('/kt/x');
is(conn_of($r) . '/' . req_of($r), '2/1', 'timeout: next request on a new one');

###############################################################################
