#!/usr/bin/perl

# Tests for upstream keepalive, fault injection on idle cached connections:
# the backend closes (FIN), resets (RST) or sends unsolicited bytes on a
# connection sitting in the cache.  The connection leaves the cache at once
# (the next request does not try it: no error, a new connection), and its
# bucket is freed (with slice_poolsize=1, another key is kept afterwards;
# the same key is kept again).  Without the module the same configuration
# minus the slice_* parameters runs against nginx's own module and must
# give the same connection numbers.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_get_host parallel_get status_of
	errlog_count errlog_wait slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $ours = slice_module();

# nginx's own module knows no slice_* parameters; with it, u_slice is a
# plain cache, which gives the same connection numbers in this sequence
my $slice = $ours ? 'slice_key=$host slice_conn=1 slice_poolsize=1' : '';

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u_idle {
        server 127.0.0.1:8081;
        keepalive 2;
    }

    upstream u_slice {
        server 127.0.0.1:8082;
        keepalive 4 $slice;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /i/ {
            proxy_pass http://u_idle/;
        }

        location /s/ {
            proxy_pass http://u_slice/;
        }
    }
}

EOF

my $d = $t->testdir();
my ($ilog, $slog) = ("$d/idle.log", "$d/slice.log");

$t->run_daemon(\&http_backend, port(8081), log => $ilog);
$t->run_daemon(\&http_backend, port(8082), log => $slog);
$t->run();
$t->waitforsocket('127.0.0.1:' . port(8081));
$t->waitforsocket('127.0.0.1:' . port(8082));

$t->plan(35);

###############################################################################

# the close handler of either module, and only ours
my $handler = qr/keepalive (?:slice )?close handler/;
my $reuse = qr/get keepalive (?:slice )?peer: using connection/;

# errors nginx logs when it tries a connection the backend has closed
my $dead = qr/\[error\].*(?:prematurely closed|Connection reset|Broken pipe|invalid header)/;

# (1) unsliced cache with two idle connections; the one the backend kills
# is the most recently stored, so a cache that kept it would hand it out
# first (LIFO)

for my $act (qw/ fin rst data /) {
	my $handled = errlog_count($t, $handler);

	my ($keep, $kill) = parallel_get('localhost',
		'/i/sleep/50/x', "/i/sleep/300/idle/$act/200");
	my ($ck, $cx) = (conn_of($keep) // 'none', conn_of($kill) // 'none');

	is(status_of($kill) // 'none', 200, "$act: response before the fault");
	isnt($ck, $cx, "$act: two connections cached");

	# the backend acts 200ms after the response; nginx notices at once
	# (FIN, RST, data: read event -> close handler)

	my $what = $act eq 'data' ? qr/^unsolicited conn=$cx$/
		: qr/^close conn=$cx reason=idle-$act$/;
	backend_log_wait($ilog, $what, 1);
	# nginx closes with the unsolicited bytes unread: a reset
	backend_log_wait($ilog, qr/^close conn=$cx reason=eof/, 1)
		if $act eq 'data';

	is(errlog_wait($t, $handler, $handled + 1) - $handled, 1,
		"$act: close handler ran");

	my $reused = errlog_count($t, $reuse);
	my $r = http_get('/i/x');

	is(conn_of($r), $ck, "$act: next request on the surviving connection");
	is(errlog_count($t, $reuse) - $reused, 1, "$act: it was a cached one");
}

is(backend_log_count($ilog, qr/^close conn=\d+ reason=eof/), 1,
	'data: the connection with unsolicited bytes closed by nginx');
is(backend_log_count($ilog, qr/^idle-busy/), 0, 'faults hit idle connections');

is(errlog_count($t, $dead), 0, 'no dead connection tried');

# (2) sliced cache, one idle connection per key, a pool of one bucket: a
# connection that leaves the cache must give its bucket back, or no other
# key is kept afterwards (and the same key not either: its bucket is full)

sub sget {
	my ($host, $uri) = @_;
	return conn_of(http_get_host($host, "/s$uri")) // 'none';
}

sub wait_closed {
	my ($t, $re, $handled) = @_;
	backend_log_wait($slog, $re, 1);
	return errlog_wait($t, $handler, $handled + 1) - $handled;
}

my $handled = errlog_count($t, $handler);

is(sget('a.example', '/idle/fin/200'), 1, 'slice fin: a opens 1');
is(wait_closed($t, qr/^close conn=1 reason=idle-fin$/, $handled), 1,
	'slice fin: close handler');
is(sget('b.example', '/x'), 2, 'slice fin: b opens 2');
is(sget('b.example', '/x'), 2, 'slice fin: b kept in the freed bucket');

$handled = errlog_count($t, $handler);

is(sget('b.example', '/idle/rst/200'), 2, 'slice rst: b reuses 2');
is(wait_closed($t, qr/^close conn=2 reason=idle-rst$/, $handled), 1,
	'slice rst: close handler');
is(sget('a.example', '/x'), 3, 'slice rst: a opens 3');
is(sget('a.example', '/x'), 3, 'slice rst: a kept in the freed bucket');

$handled = errlog_count($t, $handler);

is(sget('a.example', '/idle/data/200'), 3, 'slice data: a reuses 3');
backend_log_wait($slog, qr/^unsolicited conn=3$/, 1);
is(wait_closed($t, qr/^close conn=3 reason=eof/, $handled), 1,
	'slice data: close handler closed it');
is(sget('a.example', '/x'), 4, 'slice data: a opens 4');
is(sget('a.example', '/x'), 4, 'slice data: same key kept again');

is(backend_log_count($slog, qr/^accept /), 4, 'slice: 4 connections in all');
is(backend_log_count($slog, qr/^idle-busy/), 0,
	'slice: faults hit idle connections');

is(errlog_count($t, $dead), 0, 'slice: no dead connection tried');

SKIP: {
skip 'keepalive_slice module not loaded', 2 unless $ours;

is(errlog_count($t, qr/connection not kept/), 0,
	'module: no connection refused');
is(errlog_count($t, qr/keepalive slice close handler/), 6,
	'module: the close handler of this module, once per fault');

}

###############################################################################
