package Test::Nginx::Backend;

# Upstream servers for the test suite.
#
# The point of these backends is to make upstream connection reuse
# OBSERVABLE: every connection gets a number (1, 2, 3... in order of
# arrival, per daemon), and every response says which connection and which
# request on that connection served it.  Optionally every accept, request
# and close is appended to a log file, so a test can count how many
# connections nginx opened and closed.
#
# A connection is numbered (and "accept conn=N" logged) when its first
# bytes arrive rather than at accept() time: a readiness probe such as
# Test::Nginx's waitforsocket() connects and closes without sending
# anything, and must not shift the numbers or counts that tests check.
# Such silent connections are not logged at all.  For nginx, which sends
# its request right after connecting, this is the same as accept order.
#
# Both servers run a single-process IO::Select event loop, because nginx
# keeps several idle keepalive connections open at the same time and a
# blocking one-connection-at-a-time server would deadlock the tests.
#
# Typical use from a test:
#
#   $t->run_daemon(\&http_backend, port(8081), log => $t->testdir . '/b.log');
#   $t->run();
#   $t->waitforsocket('127.0.0.1:' . port(8081));
#   my $r = http_get('/');
#   is(conn_of($r), 1, 'first connection');
#
# This module deliberately knows nothing about Test::Nginx internals: it
# only takes a port number.

use warnings;
use strict;

use Exporter qw/ import /;
use Errno qw/ EAGAIN EWOULDBLOCK EINTR /;
use IO::Select;
use IO::Socket::INET;
use Socket qw/ SOL_SOCKET SO_LINGER /;
use Time::HiRes qw/ time sleep /;

our @EXPORT = qw/ http_backend fastcgi_backend conn_of backend_log_count /;
our @EXPORT_OK = (@EXPORT, qw/ backend_log_wait backend_log_lines req_of /);

###############################################################################
# Helpers for tests.

# Number of lines in the backend log $path matching $regex (a qr// or a
# string).  A missing log file simply means nothing happened yet: 0.
sub backend_log_count {
	my ($path, $regex) = @_;

	open my $fh, '<', $path or return 0;
	my $n = grep { /$regex/ } <$fh>;
	close $fh;
	return $n;
}

# Closes are logged asynchronously with respect to the responses a test
# sees, so polling is the race-free way to wait for them.  Waits until at
# least $count lines match (or $timeout seconds, default 5, pass) and
# returns the last count seen.
sub backend_log_wait {
	my ($path, $regex, $count, $timeout) = @_;

	my $deadline = time() + ($timeout // 5);
	while (1) {
		my $n = backend_log_count($path, $regex);
		return $n if $n >= $count || time() >= $deadline;
		sleep 0.05;
	}
}

# The lines of the backend log $path, without line ends, for tests that
# look at their order.  Like backend_log_count(), a missing log file means
# nothing happened yet: no lines.
sub backend_log_lines {
	my ($path) = @_;

	open my $fh, '<', $path or return ();
	chomp(my @lines = <$fh>);
	close $fh;
	return @lines;
}

# The X-Connection value of a raw HTTP response string, or undef.  Only the
# header part is looked at, so a body mentioning the header cannot fool it.
sub conn_of {
	my ($response) = @_;

	return undef unless defined $response;
	my ($head) = split /\r?\n\r?\n/, $response, 2;
	return undef unless defined $head;
	return $head =~ /^X-Connection:[ \t]*(\d+)/mi ? $1 : undef;
}

# The X-Request value (the request's number on its connection) of a raw
# HTTP response string, or undef; the header part only, as for conn_of().
sub req_of {
	my ($response) = @_;

	return undef unless defined $response;
	my ($head) = split /\r?\n\r?\n/, $response, 2;
	return undef unless defined $head;
	return $head =~ /^X-Request:\s*(\d+)/mi ? $1 : undef;
}

###############################################################################
# The shared event loop.
#
# A connection is a hash:
#   sock, id, nreq        socket, connection number (undef until the first
#                         bytes arrive), requests seen
#   inbuf, outbuf         bytes read but not parsed / not yet written
#   close_after_write     reason to log once outbuf is drained (no further
#                         input is processed once this is set)
#   deadline, on_deadline a one-shot timer (used for /sleep)
#   closed                set once the socket is gone, so callers deeper in
#                         the stack know to stop touching it

sub _serve {
	my ($port, $opts, $on_input) = @_;

	# A peer closing while we write must be an error return, not a signal
	# that kills the daemon.
	$SIG{PIPE} = 'IGNORE';

	my $listener = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => '127.0.0.1',
		LocalPort => $port,
		Listen => 128,
		ReuseAddr => 1,
	) or die "Can't create listening socket 127.0.0.1:$port: $!\n";
	$listener->blocking(0);

	my $srv = {
		port => $port,
		opts => $opts,
		log => $opts->{log},
		readers => IO::Select->new($listener),
		conns => {},	# keyed by the socket ref stringified
		nconn => 0,
	};

	while (1) {
		my $writers = IO::Select->new(
			map { $_->{sock} }
			grep { length $_->{outbuf} } values %{$srv->{conns}});

		my ($r, $w) = IO::Select->select($srv->{readers}, $writers, undef,
			_next_timeout($srv));

		for my $sock (@{$w || []}) {
			my $c = $srv->{conns}{$sock} or next;
			_flush($srv, $c);
		}

		for my $sock (@{$r || []}) {
			if ($sock == $listener) {
				_accept($srv, $listener);
				next;
			}

			# The connection may have been closed earlier in this pass.
			my $c = $srv->{conns}{$sock} or next;
			_read($srv, $c, $on_input);
		}

		_run_timers($srv);
	}
}

sub _accept {
	my ($srv, $listener) = @_;

	# Non-blocking listener: drain every pending connection now, so that
	# numbering follows the kernel's accept order.
	while (my $sock = $listener->accept()) {
		$sock->blocking(0);

		# The id is assigned on first data, see the top of the file.
		my $c = {
			sock => $sock,
			id => undef,
			nreq => 0,
			inbuf => '',
			outbuf => '',
		};

		$srv->{conns}{$sock} = $c;
		$srv->{readers}->add($sock);
	}
}

sub _read {
	my ($srv, $c, $on_input) = @_;

	my $n = sysread($c->{sock}, my $buf, 65536);

	if (!defined $n) {
		return if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR};

		# Typically ECONNRESET: the peer went away with data unread.
		# Still the peer's doing, hence the "eof" prefix.
		_close($srv, $c, 'eof-reset');
		return;
	}

	if ($n == 0) {
		_close($srv, $c, 'eof');
		return;
	}

	if (!defined $c->{id}) {
		$c->{id} = ++$srv->{nconn};
		_log($srv, "accept conn=$c->{id}");
	}

	# Once a response that ends the connection is queued, anything the
	# peer still sends is irrelevant: read it only to notice its close.
	return if defined $c->{close_after_write};

	# strict => 1: bytes of a request that came while the previous one
	# was not answered yet (nginx never pipelines to a backend: two users
	# of one connection at once) are logged and the connection reset.
	if ($srv->{opts}{strict} && ($c->{waiting} || length($c->{outbuf} // ''))) {
		_log($srv, "overlap conn=$c->{id}");
		_close($srv, $c, 'overlap', 1);
		return;
	}

	$c->{inbuf} .= $buf;
	$on_input->($srv, $c);
}

# Queue bytes and try to write them right away; what the socket does not
# take now is written when select() says it is writable, so a slow reader
# (nginx's proxy_limit_rate) never blocks the other connections.
sub _send {
	my ($srv, $c, $data) = @_;

	$c->{outbuf} .= $data;
	_flush($srv, $c);
}

sub _flush {
	my ($srv, $c) = @_;

	while (length $c->{outbuf}) {
		my $n = syswrite($c->{sock}, $c->{outbuf});

		if (!defined $n) {
			return if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR};
			_close($srv, $c, 'eof-reset');	# EPIPE / ECONNRESET
			return;
		}

		substr($c->{outbuf}, 0, $n, '');
	}

	if (defined $c->{close_after_write}) {
		_close($srv, $c, $c->{close_after_write});
	}
}

# $reset: abort the connection so that the peer gets an RST instead of a
# FIN, as a backend that refuses to serve the connection would.
sub _close {
	my ($srv, $c, $reason, $reset) = @_;

	return if $c->{closed};
	$c->{closed} = 1;

	# The /sleep timer closure refers to $c: break the cycle.
	delete $c->{on_deadline};
	delete $c->{deadline};

	my $sock = $c->{sock};
	$srv->{readers}->remove($sock);
	delete $srv->{conns}{$sock};

	if ($reset) {
		setsockopt($sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
	}

	close $sock;
	_log($srv, "close conn=$c->{id} reason=$reason") if defined $c->{id};
}

sub _set_timer {
	my ($c, $delay, $cb) = @_;

	$c->{deadline} = time() + $delay;
	$c->{on_deadline} = $cb;
}

sub _next_timeout {
	my ($srv) = @_;

	my @deadlines = grep { defined }
		map { $_->{deadline} } values %{$srv->{conns}};
	return undef unless @deadlines;

	my ($first) = sort { $a <=> $b } @deadlines;
	my $timeout = $first - time();
	return $timeout > 0 ? $timeout : 0;
}

sub _run_timers {
	my ($srv) = @_;

	my $now = time();
	for my $c (values %{$srv->{conns}}) {
		next if $c->{closed};
		next unless defined $c->{deadline} && $c->{deadline} <= $now;

		delete $c->{deadline};
		my $cb = delete $c->{on_deadline};
		$cb->();
	}
}

# One line per event, appended and flushed at once.  The file is reopened
# for every line so that a test may remove or truncate it between phases
# without the daemon writing into a deleted inode.
sub _log {
	my ($srv, $line) = @_;

	return unless defined $srv->{log};

	open my $fh, '>>', $srv->{log}
		or die "Can't open backend log $srv->{log}: $!\n";
	print $fh "$line\n";
	close $fh;
}

###############################################################################
# HTTP/1.1 backend.
#
# URI controls (path prefix, query ignored):
#   /close...      respond with "Connection: close", then close
#   /sleep/<ms>... respond after <ms> milliseconds, without blocking others
#   /big/<bytes>...  body of exactly <bytes> 'x' bytes, still keepalive
#   /early...      respond as soon as the headers are read; the body (if it
#                  ever arrives) is read and discarded, the connection kept
#   /nolength...   no Content-Length, not chunked: body ends with the close
#   /hang...       the request is read (and logged) but never answered; the
#                  connection stays open until the peer closes it
#   /dropnext...   answered normally (keep-alive), but the NEXT request on
#                  this connection is read, logged and then dropped: the
#                  connection is closed (FIN) without a response, as by a
#                  backend whose idle timeout fired just as the request came
#   .../idle/<act>/<ms>...  (anywhere in the path, e.g. /sleep/100/idle/fin/0)
#                  after the response, once the connection has been idle for
#                  <ms> milliseconds (no further request started), the
#                  backend acts on it: fin = close (FIN), rst = reset (RST,
#                  SO_LINGER 0), data = send the unsolicited bytes "XX" and
#                  keep the connection.  Logged as "close conn=N
#                  reason=idle-fin|idle-rst" or "unsolicited conn=N"; if a
#                  new request came first: "idle-busy conn=N act=<act>"
#   ...?ka=<value>[&ka=<value>...]  the response carries a "Keep-Alive:
#                  <value>" header for each ka= (percent-decoded, "+" is a
#                  space), as Apache and Node send their idle timeout
#
# Options:
#   log => $path      event log, see above
#   strict => 1       a request arriving on a connection before the previous
#                     one was answered (during /sleep) is logged as
#                     "overlap conn=N" and the connection reset
#   vhost_bind => 1   emulate Apache mpm-itk: the first request's Host binds
#                     the connection; a request for another Host on it is
#                     not answered, the connection is reset
#   drop_idle => $s   a backend whose idle timeout ($s seconds) fires just
#                     as a request arrives, without closing idle
#                     connections by itself: a request arriving on a
#                     connection idle $s seconds or more since its last
#                     response is read, logged and dropped (closed without
#                     an answer), logged as "close conn=N reason=drop-idle"
#
# Close reasons logged: eof (peer closed), eof-reset (peer reset, or a write
# failed), close-requested (/close, "Connection: close", HTTP/1.0 without
# keep-alive), nolength (/nolength response complete), reset-vhost,
# bad-request, drop-next, idle-fin, idle-rst.

sub http_backend {
	my ($port, %opts) = @_;

	_serve($port, \%opts, \&_http_input);
}

# Parse and serve as many complete requests as the input buffer holds.
# Requests on one connection are strictly sequential: while a response is
# delayed (/sleep), later pipelined input waits in the buffer.
sub _http_input {
	my ($srv, $c) = @_;

	while (!$c->{closed} && !$c->{waiting}
		&& !defined $c->{close_after_write})
	{
		my $req = $c->{req};

		if (!$req) {
			$req = _http_parse_head($srv, $c) or return;
			$c->{req} = $req;

			return unless _http_start($srv, $c, $req);
		}

		return unless _http_read_body($c, $req);

		delete $c->{req};
		_http_respond($srv, $c, $req) unless $req->{answered};
	}
}

# Returns the request (without its body) once the whole header block is in
# the buffer, undef otherwise (or after rejecting a malformed request).
sub _http_parse_head {
	my ($srv, $c) = @_;

	# Empty lines before a request line are allowed (RFC 9112, 2.2).
	$c->{inbuf} =~ s/\A(?:\r?\n)+//;
	return undef unless $c->{inbuf} =~ s/\A(.*?)\r?\n\r?\n//s;

	my ($line, @lines) = split /\r?\n/, $1;
	my ($method, $uri, $version) =
		$line =~ m{^(\S+)[ \t]+(\S+)[ \t]+HTTP/(\d+\.\d+)[ \t]*$};

	if (!defined $method) {
		$c->{close_after_write} = 'bad-request';
		_send($srv, $c, "HTTP/1.1 400 Bad Request\r\n"
			. "Content-Length: 0\r\nConnection: close\r\n\r\n");
		return undef;
	}

	my %h;
	for (@lines) {
		next unless /^([^:\s]+):[ \t]*(.*?)[ \t]*$/;
		my $name = lc $1;
		$h{$name} = defined $h{$name} ? "$h{$name}, $2" : $2;
	}

	my $conn = lc($h{connection} // '');
	my $keepalive = $version eq '1.0'
		? $conn =~ /\bkeep-alive\b/
		: $conn !~ /\bclose\b/;

	(my $path = $uri) =~ s/\?.*//s;

	return {
		method => $method,
		uri => $uri,
		path => $path,
		version => $version,
		host => $h{host} // '',
		keepalive => $keepalive ? 1 : 0,
		chunked => ($h{'transfer-encoding'} // '') =~ /\bchunked\b/i
			? 1 : 0,
		remaining => $h{'content-length'} // 0,	# body bytes still due
		body_len => 0,
		chunk_state => 'size',
	};
}

# Everything that happens as soon as the headers are known.  Returns false
# if the connection is gone.
sub _http_start {
	my ($srv, $c, $req) = @_;

	if ($srv->{opts}{vhost_bind}) {
		my $host = lc $req->{host};

		if (!defined $c->{bound_host}) {
			$c->{bound_host} = $host;

		} elsif ($c->{bound_host} ne $host) {
			# An mpm-itk child has already switched to the first
			# vhost's uid and cannot serve another one: it drops
			# the connection without a response.
			_close($srv, $c, 'reset-vhost', 1);
			return 0;
		}
	}

	$c->{nreq}++;
	$req->{n} = $c->{nreq};
	_log($srv, "request conn=$c->{id} req=$req->{n}"
		. " host=$req->{host} uri=$req->{uri}");

	if (defined $srv->{opts}{drop_idle} && defined $c->{idle_since}
		&& time() - $c->{idle_since} >= $srv->{opts}{drop_idle})
	{
		_close($srv, $c, 'drop-idle');
		return 0;
	}

	if ($c->{drop_next}) {
		# /dropnext on the previous request: the request was read,
		# it is dropped without an answer.
		_close($srv, $c, 'drop-next');
		return 0;
	}

	if ($req->{path} =~ m{^/early}) {
		# Answer before the body: the body is still consumed (and
		# discarded) by _http_read_body, so the connection stays
		# usable; deciding not to reuse it is nginx's job.
		$req->{answered} = 1;
		_http_respond($srv, $c, $req);
	}

	return !$c->{closed};
}

# Consume body bytes from the buffer.  Only the length is kept: bodies can
# be large and nothing needs their content.  True once the body is complete.
sub _http_read_body {
	my ($c, $req) = @_;

	if (!$req->{chunked}) {
		my $n = length $c->{inbuf};
		$n = $req->{remaining} if $n > $req->{remaining};

		substr($c->{inbuf}, 0, $n, '');
		$req->{remaining} -= $n;
		$req->{body_len} += $n;

		return $req->{remaining} == 0;
	}

	while (1) {
		my $state = $req->{chunk_state};

		if ($state eq 'size') {
			return 0 unless $c->{inbuf} =~
				s/\A([0-9a-fA-F]+)[^\r\n]*\r?\n//;

			$req->{remaining} = hex $1;
			$req->{chunk_state} =
				$req->{remaining} ? 'data' : 'trailer';

		} elsif ($state eq 'data') {
			my $n = length $c->{inbuf};
			return 0 unless $n;
			$n = $req->{remaining} if $n > $req->{remaining};

			substr($c->{inbuf}, 0, $n, '');
			$req->{remaining} -= $n;
			$req->{body_len} += $n;

			$req->{chunk_state} = 'crlf' unless $req->{remaining};

		} elsif ($state eq 'crlf') {
			return 0 unless $c->{inbuf} =~ s/\A\r?\n//;
			$req->{chunk_state} = 'size';

		} else {
			# Trailer fields, up to and including an empty line.
			return 0 unless $c->{inbuf} =~ s/\A([^\r\n]*)\r?\n//;
			return 1 if $1 eq '';
		}
	}
}

sub _http_respond {
	my ($srv, $c, $req) = @_;

	my $path = $req->{path};

	if ($path =~ m{^/hang}) {
		# Never answered: "waiting" also keeps later input unparsed.
		$c->{waiting} = 1;
		return;
	}

	if ($path =~ m{^/sleep/(\d+)} && !$req->{slept}) {
		# Park this connection only; the select loop wakes us up.
		my $ms = $1;
		$req->{slept} = 1;
		$c->{waiting} = 1;

		_set_timer($c, $ms / 1000, sub {
			$c->{waiting} = 0;
			_http_respond($srv, $c, $req);
			_http_input($srv, $c);	# pipelined input, if any
		});
		return;
	}

	my $close = $req->{keepalive} ? undef : 'close-requested';
	my $length = 1;
	my $body;

	my $info = "conn=$c->{id} req=$req->{n} host=$req->{host}"
		. " port=$srv->{port} uri=$req->{uri}";

	if ($path =~ m{^/close}) {
		$close = 'close-requested';
		$body = "$info body=$req->{body_len}\n";

	} elsif ($path =~ m{^/big/(\d+)}) {
		$body = 'x' x $1;

	} elsif ($path =~ m{^/early}) {
		# The body has not been read, so its length is unknown.
		$body = "early $info\n";

	} elsif ($path =~ m{^/nolength}) {
		$length = 0;
		$close = 'nolength';
		$body = "$info body=$req->{body_len}\n";

	} else {
		$body = "$info body=$req->{body_len}\n";
	}

	my $head = "HTTP/1.1 200 OK\r\n"
		. "Content-Type: text/plain\r\n"
		. "X-Connection: $c->{id}\r\n"
		. "X-Request: $req->{n}\r\n"
		. "X-Host: $req->{host}\r\n"
		. "X-Port: $srv->{port}\r\n";

	$head .= "X-Bound-Host: $c->{bound_host}\r\n"
		if defined $c->{bound_host};

	my ($query) = $req->{uri} =~ /\?(.*)/s;
	for (split /&/, $query // '') {
		next unless s/^ka=//;
		tr/+/ /;
		s/%([0-9a-fA-F]{2})/chr hex $1/ge;
		$head .= "Keep-Alive: $_\r\n";
	}

	if ($length) {
		$head .= 'Content-Length: ' . length($body) . "\r\n"
			. 'Connection: ' . ($close ? 'close' : 'keep-alive')
			. "\r\n";
	}

	# Without a length the close delimits the body; no Connection header
	# either, so that nginx has to notice the missing length by itself.

	$body = '' if $req->{method} eq 'HEAD';

	$c->{close_after_write} = $close if $close;
	$c->{drop_next} = 1 if !$close && $path =~ m{^/dropnext};
	_send($srv, $c, "$head\r\n$body");
	$c->{idle_since} = time();

	if (!$close && !$c->{closed} && $path =~ m{/idle/(fin|rst|data)/(\d+)}) {
		_http_idle_act($srv, $c, $1, $2 / 1000, $c->{nreq});
	}
}

# /idle/<act>/<ms>: acts on the connection once it has been idle for $delay
# seconds after the response to request number $nreq.  The response must
# have left the buffer first; a request that started since then cancels
# the action.
sub _http_idle_act {
	my ($srv, $c, $act, $delay, $nreq) = @_;

	_set_timer($c, $delay, sub {
		return if $c->{closed};

		if ($c->{nreq} != $nreq || $c->{req} || $c->{waiting}
			|| length $c->{inbuf})
		{
			_log($srv, "idle-busy conn=$c->{id} act=$act");
			return;
		}

		if (length $c->{outbuf}) {
			_http_idle_act($srv, $c, $act, 0.01, $nreq);
			return;
		}

		if ($act eq 'data') {
			_log($srv, "unsolicited conn=$c->{id}");
			_send($srv, $c, 'XX');

		} else {
			_close($srv, $c, "idle-$act", $act eq 'rst');
		}
	});
}

###############################################################################
# FastCGI responder.
#
# Records: BEGIN_REQUEST (flags & FCGI_KEEP_CONN: keep the connection after
# END_REQUEST, otherwise close it), PARAMS until an empty record, STDIN
# until an empty record; then STDOUT, an empty STDOUT and END_REQUEST.
#
# Options: log => $path, as for http_backend.  REQUEST_URI's ?ka=<value>
# adds a Keep-Alive header to the response, as for http_backend.
#
# Close reasons logged: eof, eof-reset, close-requested (no FCGI_KEEP_CONN).

use constant {
	FCGI_VERSION_1 => 1,

	FCGI_BEGIN_REQUEST => 1,
	FCGI_ABORT_REQUEST => 2,
	FCGI_END_REQUEST => 3,
	FCGI_PARAMS => 4,
	FCGI_STDIN => 5,
	FCGI_STDOUT => 6,
	FCGI_GET_VALUES => 9,
	FCGI_GET_VALUES_RESULT => 10,
	FCGI_UNKNOWN_TYPE => 11,

	FCGI_KEEP_CONN => 1,
	FCGI_RESPONDER => 1,

	FCGI_REQUEST_COMPLETE => 0,
	FCGI_UNKNOWN_ROLE => 3,
};

sub fastcgi_backend {
	my ($port, %opts) = @_;

	_serve($port, \%opts, \&_fcgi_input);
}

sub _fcgi_record {
	my ($type, $id, $content) = @_;

	$content //= '';
	return pack('CCnnCx', FCGI_VERSION_1, $type, $id, length $content, 0)
		. $content;
}

sub _fcgi_input {
	my ($srv, $c) = @_;

	while (!$c->{closed} && !defined $c->{close_after_write}
		&& length $c->{inbuf} >= 8)
	{
		my (undef, $type, $id, $clen, $plen) =
			unpack 'CCnnC', $c->{inbuf};
		return if length $c->{inbuf} < 8 + $clen + $plen;

		my $content = substr($c->{inbuf}, 8, $clen);
		substr($c->{inbuf}, 0, 8 + $clen + $plen, '');

		my $r = $c->{fcgi}{$id};

		if ($type == FCGI_BEGIN_REQUEST) {
			my ($role, $flags) = unpack 'nC', $content;

			$c->{fcgi}{$id} = {
				keep => $flags & FCGI_KEEP_CONN,
				params => '',
				stdin_len => 0,
			};

			if ($role != FCGI_RESPONDER) {
				_fcgi_end($srv, $c, $id, FCGI_UNKNOWN_ROLE);
			}

		} elsif ($type == FCGI_ABORT_REQUEST) {
			_fcgi_end($srv, $c, $id, FCGI_REQUEST_COMPLETE) if $r;

		} elsif ($type == FCGI_PARAMS) {
			next unless $r;

			# A name-value pair may span records: parse only once
			# the stream is complete (empty record).
			if ($clen) {
				$r->{params} .= $content;
			} else {
				$r->{env} = _fcgi_parse_params($r->{params});
			}

		} elsif ($type == FCGI_STDIN) {
			next unless $r;

			if ($clen) {
				$r->{stdin_len} += $clen;
			} else {
				_fcgi_respond($srv, $c, $id, $r);
			}

		} elsif ($type == FCGI_GET_VALUES) {
			# Management record: answering with no values is valid
			# and tells the peer to assume defaults.
			_send($srv, $c, _fcgi_record(FCGI_GET_VALUES_RESULT, 0));

		} elsif ($id == 0) {
			_send($srv, $c, _fcgi_record(FCGI_UNKNOWN_TYPE, 0,
				pack('Cx7', $type)));
		}
	}
}

sub _fcgi_parse_params {
	my ($data) = @_;

	my %env;
	my $pos = 0;

	# Lengths are one byte, or four with the high bit set.
	my $len = sub {
		my $b = unpack 'C', substr($data, $pos, 1);
		if ($b < 128) {
			$pos += 1;
			return $b;
		}
		my $l = unpack('N', substr($data, $pos, 4)) & 0x7fffffff;
		$pos += 4;
		return $l;
	};

	while ($pos < length $data) {
		my $nlen = $len->();
		my $vlen = $len->();
		my $name = substr($data, $pos, $nlen);
		my $value = substr($data, $pos + $nlen, $vlen);
		$pos += $nlen + $vlen;
		$env{$name} = $value;
	}

	return \%env;
}

sub _fcgi_respond {
	my ($srv, $c, $id, $r) = @_;

	my $env = $r->{env} // {};
	my $uri = $env->{REQUEST_URI} // '';
	my $host = $env->{HTTP_HOST} // '';

	my $n = ++$c->{nreq};
	_log($srv, "request conn=$c->{id} req=$n host=$host uri=$uri");

	# ?ka=<value>: a Keep-Alive header, as for http_backend (a FastCGI
	# application's header speaks of its client's connection)
	my $ka = '';
	my ($query) = $uri =~ /\?(.*)/s;
	for (split /&/, $query // '') {
		next unless s/^ka=//;
		tr/+/ /;
		s/%([0-9a-fA-F]{2})/chr hex $1/ge;
		$ka .= "Keep-Alive: $_\r\n";
	}

	my $out = "Status: 200 OK\r\n"
		. "X-Connection: $c->{id}\r\n"
		. "X-Request: $n\r\n"
		. "Content-Type: text/plain\r\n"
		. $ka
		. "\r\n"
		. "conn=$c->{id} req=$n uri=$uri\n";

	my $data = '';
	for (my $off = 0; $off < length $out; $off += 65535) {
		$data .= _fcgi_record(FCGI_STDOUT, $id, substr($out, $off, 65535));
	}
	$data .= _fcgi_record(FCGI_STDOUT, $id);

	_send($srv, $c, $data);
	_fcgi_end($srv, $c, $id, FCGI_REQUEST_COMPLETE);
}

sub _fcgi_end {
	my ($srv, $c, $id, $status) = @_;

	return if $c->{closed};

	my $r = delete $c->{fcgi}{$id};
	$c->{close_after_write} = 'close-requested' unless $r && $r->{keep};

	_send($srv, $c, _fcgi_record(FCGI_END_REQUEST, $id,
		pack('NCx3', 0, $status)));
}

1;

###############################################################################
