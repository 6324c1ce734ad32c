use warnings; use strict;
use Test::More;
use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx::Backend qw/ http_backend fastcgi_backend conn_of backend_log_count /;

# Tests of the test backends themselves, without nginx: the nginx tests
# rely on their connection numbering and URI controls, so those must be
# right before any nginx behaviour is judged by them.

use Errno qw/ ECONNRESET /;
use File::Temp qw/ tempdir /;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw/ time sleep /;

$SIG{PIPE} = 'IGNORE';

my $dir = tempdir(CLEANUP => 1);
my @pids;

END {
	# waitpid() sets $?, which would become the test's exit status.
	local $?;

	# Only our own backend children.
	kill 'TERM', @pids if @pids;
	waitpid $_, 0 for @pids;
}

###############################################################################
# Helpers.

# The kernel hands out a free port for port 0; the small window before the
# backend binds it again is acceptable for a test.
sub free_port {
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
		Listen => 1, ReuseAddr => 1) or die "Can't bind: $!\n";
	my $port = $s->sockport();
	close $s;
	return $port;
}

# Forks $code->($port, %opts) and waits until it listens.  The readiness
# probe connects without sending anything, which the backends by design do
# not count as a connection.
sub start_backend {
	my ($code, %opts) = @_;

	my $port = free_port();
	my $pid = fork() // die "fork: $!\n";

	if ($pid == 0) {
		eval { $code->($port, %opts) };
		warn $@ if $@;
		POSIX::_exit(1);	# no END blocks / Test::More in the child
	}

	push @pids, $pid;

	for (1 .. 100) {
		my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port");
		if ($s) {
			close $s;
			return $port;
		}
		sleep 0.05;
	}

	die "backend on port $port did not start\n";
}

sub conn {
	my ($port) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port")
		or die "Can't connect to $port: $!\n";
	return $s;
}

sub req {
	my ($uri, %h) = @_;

	my $host = delete $h{Host} // 'localhost';
	my $version = delete $h{version} // '1.1';
	my $method = delete $h{method} // 'GET';

	return "$method $uri HTTP/$version\r\nHost: $host\r\n"
		. join('', map { "$_: $h{$_}\r\n" } sort keys %h) . "\r\n";
}

# Reads one response: headers, then Content-Length bytes, or until EOF if
# there is no length.  Returns what was read (undef if nothing) before the
# timeout.
sub read_response {
	my ($s, $timeout) = @_;

	my $deadline = time() + ($timeout // 3);
	my $sel = IO::Select->new($s);
	my $buf = '';

	while (1) {
		if ($buf =~ /\A(.*?\r\n\r\n)/s) {
			my $hlen = length $1;
			if ($1 =~ /^Content-Length:\s*(\d+)/mi) {
				return $buf if length($buf) >= $hlen + $1;
			}
		}

		my $left = $deadline - time();
		last if $left <= 0;
		next unless $sel->can_read($left);

		my $n = sysread($s, $buf, 65536, length $buf);
		last unless $n;
	}

	return length $buf ? $buf : undef;
}

# 'eof', 'reset' or 'open' (nothing within the timeout), consuming any
# data in between.
sub sock_state {
	my ($s, $timeout) = @_;

	my $sel = IO::Select->new($s);
	my $deadline = time() + ($timeout // 2);

	while ((my $left = $deadline - time()) > 0) {
		next unless $sel->can_read($left);
		my $n = sysread($s, my $buf, 65536);
		return 'reset' if !defined $n && $! == ECONNRESET;
		return 'eof' if !defined $n || $n == 0;
	}

	return 'open';
}

sub header {
	my ($r, $name) = @_;
	return undef unless defined $r;
	my ($head) = split /\r\n\r\n/, $r, 2;
	return $head =~ /^\Q$name\E:[ \t]*(.*?)\r?$/mi ? $1 : undef;
}

sub body {
	my ($r) = @_;
	return undef unless defined $r;
	return (split /\r\n\r\n/, $r, 2)[1];
}

# Closes are logged asynchronously: poll for them.
sub log_wait {
	my ($log, $re, $count) = @_;

	for (1 .. 100) {
		my $n = backend_log_count($log, $re);
		return $n if $n >= $count;
		sleep 0.05;
	}
	return backend_log_count($log, $re);
}

###############################################################################
# conn_of

is(conn_of("HTTP/1.1 200 OK\r\nX-Connection: 7\r\n\r\nbody"), 7,
	'conn_of');
is(conn_of("HTTP/1.1 200 OK\r\n\r\nX-Connection: 7\r\n"), undef,
	'conn_of ignores body');
is(conn_of(undef), undef, 'conn_of undef');

###############################################################################
# HTTP backend

my $log = "$dir/http.log";
my $port = start_backend(\&http_backend, log => $log);

# Keepalive: two requests on one socket.

my $a = conn($port);
print $a req('/one?x=1', Host => 'a.example');
my $r = read_response($a);

is(conn_of($r), 1, 'first socket is connection 1');
is(header($r, 'X-Request'), 1, 'first request');
is(header($r, 'X-Host'), 'a.example', 'X-Host');
is(header($r, 'X-Port'), $port, 'X-Port');
is(header($r, 'Connection'), 'keep-alive', 'keep-alive');
is(body($r), "conn=1 req=1 host=a.example port=$port uri=/one?x=1 body=0\n",
	'body');

print $a req('/two', Host => 'a.example');
$r = read_response($a);

is(conn_of($r), 1, 'same connection');
is(header($r, 'X-Request'), 2, 'second request');

# A second socket, open at the same time as the first: both are served.

my $b = conn($port);
print $b req('/', Host => 'b.example');
$r = read_response($b);

is(conn_of($r), 2, 'second socket is connection 2');
is(header($r, 'X-Request'), 1, 'second socket first request');

print $a req('/three', Host => 'a.example');
$r = read_response($a);
like($r, qr/conn=1 req=3 /, 'first socket still served');

# Request bodies: Content-Length and chunked.

print $b "POST /post HTTP/1.1\r\nHost: b.example\r\nContent-Length: 5\r\n"
	. "\r\nhello";
$r = read_response($b);
like($r, qr/conn=2 req=2 .* body=5\n/, 'content-length body');

print $b "POST /chunked HTTP/1.1\r\nHost: b.example\r\n"
	. "Transfer-Encoding: chunked\r\n\r\n"
	. "5\r\nhello\r\n" . "a;ext=1\r\n0123456789\r\n" . "0\r\nX-T: 1\r\n\r\n";
$r = read_response($b);
like($r, qr/conn=2 req=3 .* body=15\n/, 'chunked body');

# Split into small writes: the backend must buffer partial input.

for my $piece ("GET /spl", "it HTTP/1.1\r\nHo", "st: b.example\r\n", "\r\n") {
	print $b $piece;
	$b->flush();
	sleep 0.05;
}
$r = read_response($b);
like($r, qr/conn=2 req=4 .* uri=\/split /, 'request split over writes');

# Peer close is logged as eof.

close $a;
close $b;
is(log_wait($log, qr/^close conn=[12] reason=eof$/, 2), 2, 'eof logged');

# /close

my $s = conn($port);
print $s req('/close');
$r = read_response($s);
is(header($r, 'Connection'), 'close', '/close Connection: close');
like($r, qr/conn=3 req=1 /, '/close served');
is(sock_state($s), 'eof', '/close closed');
is(log_wait($log, qr/^close conn=3 reason=close-requested$/, 1), 1,
	'/close logged');

# Client-requested close and HTTP/1.0.

$s = conn($port);
print $s req('/', Connection => 'close');
$r = read_response($s);
is(header($r, 'Connection'), 'close', 'Connection: close requested');
is(sock_state($s), 'eof', 'closed on request');

$s = conn($port);
print $s req('/', version => '1.0');
$r = read_response($s);
is(header($r, 'Connection'), 'close', 'HTTP/1.0 close');
is(sock_state($s), 'eof', 'HTTP/1.0 closed');

$s = conn($port);
print $s req('/', version => '1.0', Connection => 'keep-alive');
$r = read_response($s);
is(header($r, 'Connection'), 'keep-alive', 'HTTP/1.0 keep-alive');
print $s req('/', version => '1.0', Connection => 'keep-alive');
is(header(read_response($s), 'X-Request'), 2, 'HTTP/1.0 keep-alive reused');
close $s;

# /sleep does not block other connections.  The sleep is long compared
# with the bounds below, so that a loaded machine does not fail them.

my $slow = conn($port);
my $start = time();
print $slow req('/sleep/1000');

$s = conn($port);
print $s req('/fast');
$r = read_response($s);
my $fast = time() - $start;
ok(defined $r && $fast < 0.5, "other connection not delayed ($fast s)");

# (not sock_state(): it reads and discards data, so it would say 'open'
# even if the response had come)

ok(!IO::Select->new($slow)->can_read(0.1), 'sleeping request not answered yet');

$r = read_response($slow);
my $slept = time() - $start;
like($r, qr/uri=\/sleep\/1000 /, '/sleep answered');
ok($slept >= 1, "/sleep waited ($slept s)");

print $slow req('/after-sleep');
like(read_response($slow), qr/req=2 /, 'keepalive after /sleep');
close $slow;
close $s;

# /big

$s = conn($port);
print $s req('/big/100000');
$r = read_response($s, 5);
is(header($r, 'Content-Length'), 100000, '/big Content-Length');
is(length(body($r)), 100000, '/big body length');
is(body($r), 'x' x 100000, '/big body');

print $s req('/');
like(read_response($s), qr/req=2 /, 'keepalive after /big');
close $s;

# A reader that does not read a big body must not block other
# connections: the output is buffered and written as the socket allows.

my $stalled = conn($port);
print $stalled req('/big/20000000');
sleep 0.2;

$s = conn($port);
$start = time();
print $s req('/while-stalled');
$r = read_response($s, 2);
my $took = time() - $start;
ok(defined $r && $took < 0.5, "not blocked by a slow reader ($took s)");
close $s;
close $stalled;

# /early answers before the body is sent; the body is then discarded and
# the connection stays usable.

$s = conn($port);
my $len = 1000000;
print $s "POST /early HTTP/1.1\r\nHost: localhost\r\n"
	. "Content-Length: $len\r\n\r\n";
$r = read_response($s, 2);
like(body($r), qr/^early conn=\d+ req=1 /, '/early answered before body');
is(header($r, 'Connection'), 'keep-alive', '/early keep-alive');

print $s 'y' x $len;
print $s req('/after-early');
like(read_response($s), qr/req=2 .*uri=\/after-early /,
	'body discarded after /early');
close $s;

# /nolength: no Content-Length, body ends with the close.

$s = conn($port);
print $s req('/nolength');
$r = read_response($s);
is(header($r, 'Content-Length'), undef, '/nolength no Content-Length');
is(header($r, 'Transfer-Encoding'), undef, '/nolength not chunked');
like(body($r), qr/uri=\/nolength /, '/nolength body until close');
is(sock_state($s), 'eof', '/nolength closed');

# HEAD: headers only.

$s = conn($port);
print $s req('/', method => 'HEAD');
$r = read_response($s, 0.5);
is(body($r), '', 'HEAD without body');
close $s;

# Log lines.

my $accepts = backend_log_count($log, qr/^accept conn=\d+$/);
is(log_wait($log, qr/^close conn=/, $accepts), $accepts,
	'every logged connection closed');
is(backend_log_count($log, qr/^request conn=1 req=1 host=a\.example uri=\/one\?x=1$/),
	1, 'request logged');
is(backend_log_count("$dir/missing.log", qr/./), 0, 'missing log counts 0');

###############################################################################
# vhost_bind: the first Host binds the connection, another one resets it.

my $vlog = "$dir/vhost.log";
my $vport = start_backend(\&http_backend, vhost_bind => 1, log => $vlog);

$s = conn($vport);
print $s req('/', Host => 'a.example');
$r = read_response($s);
is(header($r, 'X-Bound-Host'), 'a.example', 'vhost bound');

print $s req('/', Host => 'A.example');
$r = read_response($s);
is(header($r, 'X-Request'), 2, 'same host (case-insensitive) served');

print $s req('/', Host => 'b.example');
is(sock_state($s), 'reset', 'other host: connection reset');
is(log_wait($vlog, qr/^close conn=1 reason=reset-vhost$/, 1), 1,
	'reset-vhost logged');
is(backend_log_count($vlog, qr/^request /), 2, 'other host not answered');

$s = conn($vport);
print $s req('/', Host => 'b.example');
$r = read_response($s);
is(conn_of($r), 2, 'new connection for other host');
is(header($r, 'X-Bound-Host'), 'b.example', 'new connection bound');
close $s;

###############################################################################
# FastCGI backend

sub fcgi_record {
	my ($type, $id, $content) = @_;
	$content //= '';
	return pack('CCnnCx', 1, $type, $id, length $content, 0) . $content;
}

sub fcgi_params {
	my (%p) = @_;
	my $out = '';
	for my $k (sort keys %p) {
		for my $l (length $k, length $p{$k}) {
			$out .= $l < 128 ? pack('C', $l) : pack('N', $l | 0x80000000);
		}
		$out .= $k . $p{$k};
	}
	return $out;
}

sub fcgi_request {
	my ($uri, $keep, $stdin) = @_;

	return fcgi_record(1, 1, pack('nCx5', 1, $keep ? 1 : 0))
		. fcgi_record(4, 1, fcgi_params(REQUEST_URI => $uri,
			HTTP_HOST => 'f.example', LONG => 'v' x 300))
		. fcgi_record(4, 1)
		. (defined $stdin ? fcgi_record(5, 1, $stdin) : '')
		. fcgi_record(5, 1);
}

# Reads records up to END_REQUEST; returns (stdout, end_request content).
sub fcgi_response {
	my ($s) = @_;

	my $sel = IO::Select->new($s);
	my ($buf, $stdout) = ('', '');

	while ($sel->can_read(3)) {
		last unless sysread($s, $buf, 65536, length $buf);

		while (length $buf >= 8) {
			my (undef, $type, $id, $clen, $plen) = unpack 'CCnnC', $buf;
			last if length $buf < 8 + $clen + $plen;
			my $content = substr($buf, 8, $clen);
			substr($buf, 0, 8 + $clen + $plen, '');

			$stdout .= $content if $type == 6;
			return ($stdout, $content) if $type == 3;
		}
	}

	return ($stdout, undef);
}

my $flog = "$dir/fcgi.log";
my $fport = start_backend(\&fastcgi_backend, log => $flog);

$s = conn($fport);
print $s fcgi_request('/f1?q', 1);
my ($out, $end) = fcgi_response($s);

like($out, qr/^Status: 200 OK\r\n/, 'fastcgi status');
is(conn_of($out), 1, 'fastcgi X-Connection');
like($out, qr/\r\nX-Request: 1\r\n/, 'fastcgi X-Request');
like($out, qr/\r\n\r\nconn=1 req=1 uri=\/f1\?q\n\z/, 'fastcgi body');
is($end, pack('NCx3', 0, 0), 'fastcgi END_REQUEST complete');

print $s fcgi_request('/f2', 1, 'stdin data');
($out, $end) = fcgi_response($s);
like($out, qr/conn=1 req=2 uri=\/f2\n/, 'fastcgi keep_conn reused');
is(sock_state($s, 0.2), 'open', 'fastcgi keep_conn kept open');

print $s fcgi_request('/f3', 0);
($out, $end) = fcgi_response($s);
like($out, qr/conn=1 req=3 uri=\/f3\n/, 'fastcgi without keep_conn');
is(sock_state($s), 'eof', 'fastcgi closed without keep_conn');
is(log_wait($flog, qr/^close conn=1 reason=close-requested$/, 1), 1,
	'fastcgi close logged');
is(backend_log_count($flog, qr/^request conn=1 req=2 host=f\.example uri=\/f2$/),
	1, 'fastcgi request logged');

$s = conn($fport);
print $s fcgi_request('/g', 1);
($out) = fcgi_response($s);
like($out, qr/conn=2 req=1 /, 'fastcgi second connection');
close $s;
is(log_wait($flog, qr/^close conn=2 reason=eof$/, 1), 1, 'fastcgi eof logged');

done_testing();

###############################################################################
