#!/usr/bin/perl

# Tests for idle connections shared between workers: with four workers,
# a connection one worker opened and kept carries requests accepted by
# the others (workers told apart by $pid, connections by the backend's
# numbers); never two workers on one connection at once (the backend
# resets a connection that gets a request before it answered the one
# before); a moved connection closed by keepalive_requests reaches the
# backend as a FIN at once, even while the worker that first held it is
# stopped and still has its descriptor; `keepalive_share off` keeps each
# worker's connections its own.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Socket::INET;
use Time::HiRes qw/ time sleep /;

use Test::Nginx qw/ :DEFAULT http_start http_end /;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ header_of status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $module = slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

plan(skip_all => 'the module is not loaded') unless $module;

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 4;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 8;
        keepalive_timeout 30s;
    }

    upstream unshared {
        server 127.0.0.1:8082;
        keepalive 8;
        keepalive_timeout 30s;
        keepalive_share off;
    }

    upstream limited {
        server 127.0.0.1:8083;
        keepalive 8;
        keepalive_timeout 30s;
        keepalive_requests 2;
    }

    log_format share '$pid $upstream_keepalive_reused $request_uri';
    access_log access.log share;

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    add_header X-Worker $pid always;
    add_header X-Reused $upstream_keepalive_reused always;

    server {
        # each worker its own listening socket: fresh client connections
        # spread over the workers
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /u/ {
            proxy_pass http://u/;
        }

        location /unshared/ {
            proxy_pass http://unshared/;
        }

        location /limited/ {
            proxy_pass http://limited/;
        }

        location /status {
            keepalive_status;
        }
    }
}

EOF

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/u.log", strict => 1);
$t->run_daemon(\&http_backend, port(8082), log => "$d/unshared.log");
$t->run_daemon(\&http_backend, port(8083), log => "$d/limited.log");

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8083;

$t->plan(13);

###############################################################################

# Requests one after the other, each on a fresh client connection: which
# worker served it, on which backend connection.
sub sequential {
	my ($uri, $n) = @_;
	my (%pids_of_conn, %pids, @reused);
	for (1 .. $n) {
		my $r = http_get($uri);
		my ($pid, $conn) = (header_of($r, 'X-Worker'), conn_of($r));
		next unless defined $pid && defined $conn;
		$pids{$pid}++;
		$pids_of_conn{$conn}{$pid}++;
		push @reused, header_of($r, 'X-Reused') // '';
	}
	return (\%pids, \%pids_of_conn, \@reused);
}

my ($pids, $conns, $reused) = sequential('/u/', 40);

cmp_ok(keys %$pids, '>=', 2, 'requests served by several workers');
cmp_ok(keys %$conns, '<=', 2, 'one connection or two for all workers');
ok((grep { keys %{$conns->{$_}} >= 2 } keys %$conns),
	'a connection carried requests of several workers');
ok((grep { $_ eq 'w' } @$reused), '$upstream_keepalive_reused: "w"');

# keepalive_share off: each worker opens its own.

($pids, $conns) = sequential('/unshared/', 40);

is(scalar(grep { keys %{$conns->{$_}} >= 2 } keys %$conns), 0,
	'share off: no connection carried requests of two workers');
is(scalar(keys %$conns), scalar(keys %$pids),
	'share off: a connection per worker');

# Fifty clients at once, each request held by the backend for a moment:
# a request on a connection another worker is using would be an overlap.

my $deadline = time() + 3;
my ($ok, $bad) = (0, 0);
while (time() < $deadline) {
	my @s = map { http_start("GET /u/sleep/20 HTTP/1.0\r\nHost: localhost\r\n\r\n") } 1 .. 50;
	for my $s (@s) {
		my $r = defined $s ? http_end($s) : undef;
		(status_of($r) // 0) == 200 ? $ok++ : $bad++;
	}
}

cmp_ok($ok, '>', 0, 'concurrent: requests served');
is($bad, 0, 'concurrent: no request failed');
is(backend_log_count("$d/u.log", qr/^overlap/), 0,
	'concurrent: no connection used by two workers at once');

my $status = http_get('/status');
my ($taken) = $status =~ /"u":\{.*?"shared_taken":(\d+)/s;
cmp_ok($taken // 0, '>', 0, 'status: connections taken from other workers');

# keepalive_requests 2 on a connection that moved: the worker that opened
# it is stopped (its descriptor stays open), another worker takes the
# connection for its second request and closes it: the backend sees the
# FIN at once.

my $r = http_get('/limited/');
my $owner = header_of($r, 'X-Worker');
my $first = conn_of($r);

kill 'STOP', $owner;

my $closed;
my $stop = time() + 5;
while (time() < $stop) {
	# A client connection hashed to the stopped worker waits: give up on
	# it quickly.
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080),
		Timeout => 1) or next;
	print $s "GET /limited/ HTTP/1.0\r\nHost: localhost\r\n\r\n";
	my $resp = '';
	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm 1;
		while (<$s>) { $resp .= $_ }
		alarm 0;
	};
	alarm 0;
	close $s;
	next unless (conn_of($resp) // 0) == $first;
	$closed = time();
	last;
}

ok($closed, 'limited: the moved connection carried its second request');
is(backend_log_wait("$d/limited.log", qr/^close conn=$first reason=eof$/, 1, 1),
	1, 'limited: FIN within a second, the first worker stopped');

kill 'CONT', $owner;

unlike($t->read_file('error.log'), qr/\[notice\].*keepalive share/,
	'no notice of a refused transport');

###############################################################################
