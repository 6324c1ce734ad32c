package Test::Nginx::Load;

# A bounded HTTP load loop and /proc helpers for the reliability tests
# (reload under load, memory of a worker over many requests).
#
# The load: forked clients, each with one keep-alive HTTP/1.1 connection to
# nginx, send GETs back to back until the test stops them, or until a
# deadline or a request count is reached (the loops always end by
# themselves).  A client retries a request once, on a new connection, if a
# REUSED connection was closed before any byte of the response came back:
# that is what HTTP clients do when a server closes an idle keep-alive
# connection just as a request is sent (RFC 9112, 9.3.1), and what nginx
# does to idle client connections when a worker shuts down.  Any other
# outcome counts as a failed request: no response, a partial one, a status
# other than 200, a failed connect, or a failed retry.
#
# Typical use:
#
#   my $load = load_start($t, clients => 4, uri => '/load/%c/%n');
#   ... reloads ...
#   my $res = load_stop($load);
#   is($res->{failed}, 0, 'no failed requests');
#
# Every response's "X-Worker" header (e.g. "add_header X-Worker $pid
# always;" in nginx.conf) is recorded: $res->{last}{$pid} is the time of
# the last response a worker served, $res->{served}{$pid} how many.
#
# Only Test::Nginx's public API is used ($t->testdir and port()).

use warnings;
use strict;

use Exporter qw/ import /;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw/ time sleep /;

use Test::Nginx qw/ port /;

our @EXPORT_OK = qw/
	load_start load_stop
	master_pid worker_pids proc_alive proc_rss_kb proc_fds
/;

my %clients;	# pid => 1, our own children only

END {
	local $?;
	kill 'TERM', keys %clients if %clients;
	waitpid $_, 0 for keys %clients;
}

###############################################################################
# The load loop.

# load_start($t, %opts): forks the clients and returns a handle for
# load_stop().  Options:
#   clients => N          number of clients (default 4)
#   port => P             nginx's port (default port(8080))
#   uri => '/x/%c/%n'     %c: client number, %n: request number
#   max_seconds => S      each client stops after S seconds (default 60)
#   max_requests => N     ... or after N requests (default 1000000)
#   timeout => S          per request (default 10)
#   pause => S            between requests of a client (default 0)
sub load_start {
	my ($t, %opts) = @_;

	my $load = {
		dir => $t->testdir(),
		tag => 'load' . int(rand(1e9)),
		clients => $opts{clients} // 4,
		pids => [],
	};
	$load->{stop} = "$load->{dir}/$load->{tag}.stop";

	for my $n (1 .. $load->{clients}) {
		my $pid = fork() // die "Can't fork load client: $!\n";

		if ($pid == 0) {
			%clients = ();
			my $res = eval { _client($load, $n, %opts) }
				// { failed => 1, errors => ["client died: $@"] };
			_write_result("$load->{dir}/$load->{tag}.$n", $res);
			POSIX::_exit(0);
		}

		$clients{$pid} = 1;
		push @{$load->{pids}}, $pid;
	}

	return $load;
}

# load_stop($load): tells the clients to stop, waits for them (each ends
# its current request first) and returns the sums of their results:
#   { requests, ok, failed, retried, errors => [...],
#     last => { worker pid => time }, served => { worker pid => count } }
sub load_stop {
	my ($load) = @_;

	open my $fh, '>', $load->{stop} or die "Can't create stop file: $!\n";
	close $fh;

	for my $pid (@{$load->{pids}}) {
		waitpid $pid, 0;
		delete $clients{$pid};
	}

	my %sum = (requests => 0, ok => 0, failed => 0, retried => 0,
		errors => [], last => {}, served => {});

	for my $n (1 .. $load->{clients}) {
		my $file = "$load->{dir}/$load->{tag}.$n";
		open my $in, '<', $file or do {
			$sum{failed}++;
			push @{$sum{errors}}, "client $n: no result";
			next;
		};

		while (my $line = <$in>) {
			chomp $line;
			my ($k, @v) = split / /, $line, 3;
			if ($k eq 'error') {
				push @{$sum{errors}}, "client $n: $v[0] $v[1]";
			} elsif ($k eq 'last') {
				$sum{last}{$v[0]} = $v[1]
					if ($sum{last}{$v[0]} // 0) < $v[1];
			} elsif ($k eq 'served') {
				$sum{served}{$v[0]} += $v[1];
			} else {
				$sum{$k} += $v[0];
			}
		}
		close $in;
	}

	return \%sum;
}

sub _write_result {
	my ($file, $res) = @_;

	open my $out, '>', "$file.tmp" or return;
	for my $k (qw/ requests ok failed retried /) {
		print $out "$k " . ($res->{$k} // 0) . "\n";
	}
	print $out "error $_\n" for @{$res->{errors} // []};
	print $out "last $_ $res->{last}{$_}\n" for keys %{$res->{last} // {}};
	print $out "served $_ $res->{served}{$_}\n"
		for keys %{$res->{served} // {}};
	close $out;
	rename "$file.tmp", $file;
}

sub _client {
	my ($load, $n, %opts) = @_;

	$SIG{PIPE} = 'IGNORE';

	my $port = $opts{port} // port(8080);
	my $uri = $opts{uri} // '/load/%c/%n';
	my $deadline = time() + ($opts{max_seconds} // 60);
	my $max = $opts{max_requests} // 1000000;
	my $timeout = $opts{timeout} // 10;
	my $pause = $opts{pause} // 0;

	my %res = (requests => 0, ok => 0, failed => 0, retried => 0,
		errors => [], last => {}, served => {});
	my ($sock, $reused);

	my $fail = sub {
		$res{failed}++;
		push @{$res{errors}}, "$_[0] $_[1]" if @{$res{errors}} < 20;
	};

	while (!-e $load->{stop} && time() < $deadline && $res{requests} < $max) {
		sleep $pause if $pause && $res{requests};

		(my $u = $uri) =~ s/%c/$n/g;
		$u =~ s/%n/$res{requests}/g;
		my $request = "GET $u HTTP/1.1\r\nHost: localhost\r\n\r\n";

		$res{requests}++;

		for my $attempt (1, 2) {
			if (!$sock) {
				$sock = IO::Socket::INET->new(
					PeerAddr => "127.0.0.1:$port",
					Timeout => $timeout,
				);
				if (!$sock) {
					$fail->($u, "connect: $!");
					last;
				}
				$reused = 0;
			}

			my ($r, $err, $got) = _exchange($sock, $request, $timeout);

			if (defined $err) {
				close $sock;
				undef $sock;

				# closed before the response: retry once
				if ($reused && !$got && $attempt == 1) {
					$res{retried}++;
					next;
				}

				$fail->($u, $err);
				last;
			}

			my ($status) = $r =~ m{^HTTP/1\.\d (\d{3})};
			my ($worker) = $r =~ /^X-Worker: (\d+)\r$/mi;

			if (defined $worker) {
				$res{last}{$worker} = time();
				$res{served}{$worker}++;
			}

			if (($status // 0) == 200) {
				$res{ok}++;
			} else {
				$fail->($u, 'status ' . ($status // 'none'));
			}

			if ($r =~ /^Connection: close\r$/mi) {
				close $sock;
				undef $sock;
			} else {
				$reused = 1;
			}

			last;
		}
	}

	close $sock if $sock;
	return \%res;
}

# Sends one request and reads one response (Content-Length or chunked
# bodies are not needed: every response here has a Content-Length).
# Returns (response, undef, 1) or (undef, error, whether any byte came).
sub _exchange {
	my ($sock, $request, $timeout) = @_;

	my $n = syswrite($sock, $request);
	return (undef, "write: $!", 0) unless defined $n && $n == length $request;

	my $sel = IO::Select->new($sock);
	my $buf = '';
	my $need;

	while (1) {
		if (!defined $need && $buf =~ /\r\n\r\n/) {
			my ($head) = split /\r\n\r\n/, $buf, 2;
			my ($len) = $head =~ /^Content-Length: (\d+)\r?$/mi;
			return (undef, 'no content length', 1) unless defined $len;
			$need = length($head) + 4 + $len;
		}

		return ($buf, undef, 1) if defined $need && length $buf >= $need;

		return (undef, 'timeout', length $buf ? 1 : 0)
			unless $sel->can_read($timeout);

		my $got = sysread($sock, $buf, 65536, length $buf);

		return (undef, "read: $!", length $buf ? 1 : 0) unless defined $got;
		return (undef, 'eof', length $buf ? 1 : 0) if $got == 0;
	}
}

###############################################################################
# Processes.

# The master's pid, from the nginx.pid the test configuration writes into
# the test directory (%%TEST_GLOBALS%%).
sub master_pid {
	my ($t) = @_;

	open my $fh, '<', $t->testdir() . '/nginx.pid' or return undef;
	my $pid = <$fh>;
	close $fh;
	return defined $pid && $pid =~ /(\d+)/ ? $1 : undef;
}

# The master's living children: (pid => command line), e.g.
# "nginx: worker process" or "nginx: worker process is shutting down".
sub worker_pids {
	my ($t) = @_;

	my $master = master_pid($t) // return ();
	my %w;

	opendir(my $dh, '/proc') or return ();
	for my $p (grep { /^\d+$/ } readdir $dh) {
		my $stat = _slurp("/proc/$p/stat") // next;
		next unless $stat =~ /\)\s+(\S+)\s+(\d+)/ && $2 == $master;
		next if $1 eq 'Z';
		my $cmd = _slurp("/proc/$p/cmdline") // '';
		$cmd =~ s/\0+$//;
		$w{$p} = $cmd;
	}
	closedir $dh;

	return %w;
}

# True while $pid exists and is not a zombie.
sub proc_alive {
	my ($pid) = @_;
	my $stat = _slurp("/proc/$pid/stat") // return 0;
	return $stat =~ /\)\s+Z\s/ ? 0 : 1;
}

# VmRSS of $pid in kB, undef if unknown.
sub proc_rss_kb {
	my ($pid) = @_;
	my $status = _slurp("/proc/$pid/status") // return undef;
	return $status =~ /^VmRSS:\s+(\d+)\s+kB/m ? $1 : undef;
}

# The open file descriptors of $pid, by kind:
#   { total, listen (listening TCP sockets), socket (other sockets),
#     other (files, pipes, eventfd, epoll ...) }
sub proc_fds {
	my ($pid) = @_;

	my %listen;
	for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
		open my $fh, '<', $f or next;
		while (my $line = <$fh>) {
			my @f = split ' ', $line;
			$listen{$f[9]} = 1 if defined $f[3] && $f[3] eq '0A';
		}
		close $fh;
	}

	my %n = (total => 0, listen => 0, socket => 0, other => 0);

	opendir(my $dh, "/proc/$pid/fd") or return undef;
	for my $fd (grep { /^\d+$/ } readdir $dh) {
		my $l = readlink("/proc/$pid/fd/$fd") // next;
		$n{total}++;
		if ($l =~ /^socket:\[(\d+)\]$/) {
			$n{$listen{$1} ? 'listen' : 'socket'}++;
		} else {
			$n{other}++;
		}
	}
	closedir $dh;

	return \%n;
}

sub _slurp {
	my ($file) = @_;
	open my $fh, '<', $file or return undef;
	local $/;
	my $s = <$fh>;
	close $fh;
	return $s;
}

1;

###############################################################################
