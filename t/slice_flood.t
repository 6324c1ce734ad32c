#!/usr/bin/perl

# Tests for upstream keepalive: random Host values do not cost the Hosts in
# steady use their connections (issue 15).
#
# Three upstreams configured alike, as in the issue (keepalive 32
# slice_key=$host slice_conn=4, 20 buckets), each with its own backend.
# Four clients send the same traffic to the three: rounds of one request
# per upstream, for five busy Hosts in turn.  Beside them, a client sends
# requests with a new random Host each, one every 10 ms to the second
# upstream (trickle) and back to back to the third (flood).  The backends
# number their connections: the busy Hosts' connection counts in the
# trickle and the flood stay within twice the count without random Hosts
# (on the cache before issue 15, in one run: 15, 873 and 3687, and every
# connection of a random Host refused).  All loops are bounded by a
# request count and a deadline.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend backend_log_lines /;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'keepalive_slice module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# thousands of requests: they log at "info" (the level of the slicing
# refusals), nginx itself at debug as in every test

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream quiet {
        server 127.0.0.1:8081;
        keepalive 32 slice_key=$host slice_conn=4;
    }

    upstream trickle {
        server 127.0.0.1:8082;
        keepalive 32 slice_key=$host slice_conn=4;
    }

    upstream flood {
        server 127.0.0.1:8083;
        keepalive 32 slice_key=$host slice_conn=4;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        error_log error.log info;
        access_log off;
        keepalive_requests 100000;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;

        location /quiet/   { proxy_pass http://quiet/; }
        location /trickle/ { proxy_pass http://trickle/; }
        location /flood/   { proxy_pass http://flood/; }
    }
}

EOF

my $d = $t->testdir();
my %port = (quiet => 8081, trickle => 8082, flood => 8083);

$t->run_daemon(\&http_backend, port($port{$_}), log => "$d/$_.log")
	for keys %port;
$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for values %port;

$t->plan(11);

###############################################################################

my @busy = map { "busy$_.example" } 1 .. 5;
my $clients = 4;
my $rounds = 1000;
my $stop = "$d/stop";

my %kids;
END { local $?; kill 'TERM', keys %kids; waitpid $_, 0 for keys %kids; }

# the busy clients: 1000 rounds each, a round being one request to each
# upstream for the next busy Host

for my $c (1 .. $clients) {
	spawn("busy$c", sub {
		my ($i) = @_;
		return if $i >= 3 * $rounds;
		my $host = $busy[($c + int($i / 3)) % @busy];
		my $up = (qw/ quiet trickle flood /)[$i % 3];
		return ("/$up/x", $host);
	});
}

# random Hosts: a new one for every request, until the busy clients are
# done (at most 20,000 requests, 60 s)

for my $up (qw/ trickle flood /) {
	spawn($up, sub {
		my ($i) = @_;
		return if -e $stop || $i >= 20000;
		sleep 0.01 if $up eq 'trickle';
		return ("/$up/x", sprintf('r%d-%06d.random.example', $$, $i));
	});
}

my %r = map { $_ => finish($_) } map { "busy$_" } 1 .. $clients;

open my $fh, '>', $stop or die "Can't create $stop: $!\n";
close $fh;

$r{$_} = finish($_) for qw/ trickle flood /;

my ($busy_ok, $busy_failed) = (0, 0);
for my $c (1 .. $clients) {
	$busy_ok += $r{"busy$c"}{ok};
	$busy_failed += $r{"busy$c"}{failed};
}

is($busy_ok, $clients * $rounds * 3, 'busy Hosts: every request answered');
is($busy_failed, 0, 'busy Hosts: no failed request');
is($r{trickle}{failed} + $r{flood}{failed}, 0, 'random Hosts: no failed request');

# the random Hosts were there all along: each one a key the pool had to
# find a bucket for, well over its 20 buckets; the flood several times the
# trickle (about ten times on an idle machine, eight seen on a loaded one:
# the flood sends back to back, so its rate is the machine's)

cmp_ok($r{trickle}{ok}, '>=', 20, 'trickle: random Hosts sent');
cmp_ok($r{flood}{ok}, '>=', 4 * $r{trickle}{ok}, 'flood: random Hosts sent');

# connections the busy Hosts used, at each backend (a connection only ever
# serves one Host)

my %conns = map { $_ => busy_conns("$d/$_.log") } keys %port;

diag("busy Hosts' upstream connections: quiet $conns{quiet}, trickle"
	. " $conns{trickle} (random Hosts: $r{trickle}{ok}), flood"
	. " $conns{flood} (random Hosts: $r{flood}{ok})");

cmp_ok($conns{quiet}, '>=', scalar @busy, 'quiet: a connection per busy Host');
cmp_ok($conns{quiet}, '<=', $clients * $rounds / 4, 'quiet: connections reused');
cmp_ok($conns{trickle}, '<=', 2 * $conns{quiet}, 'trickle: at most twice the connections');
cmp_ok($conns{flood}, '<=', 2 * $conns{quiet}, 'flood: at most twice the connections');

# the random Hosts' connections were kept too (a bucket each, taken from
# one another), not refused

is(random_reused("$d/flood.log"), 0, 'flood: random Hosts never reused');
cmp_ok(scalar(() = $t->read_file('error.log') =~ /connection not kept/g),
	'==', 0, 'no connection refused');

###############################################################################

# The number of distinct backend connections that served a busy Host.
sub busy_conns {
	my ($log) = @_;
	my %seen;
	for (backend_log_lines($log)) {
		$seen{$1} = 1 if /^request conn=(\d+) req=\d+ host=busy\d\.example /;
	}
	return scalar keys %seen;
}

# Requests for random Hosts on a connection that served another request
# before: none, since each random Host is new.
sub random_reused {
	my ($log) = @_;
	return scalar grep { /^request conn=\d+ req=(\d+) host=r\S+ / && $1 > 1 }
		backend_log_lines($log);
}

# spawn($name, $next): a client process with one keep-alive connection to
# nginx (reopened if nginx closes it), sending the requests $next->($i)
# returns, ($uri, $host), until it returns nothing, or for 60 s at most.
# Its counts go to "$name.result" in the test directory.
sub spawn {
	my ($name, $next) = @_;

	my $pid = fork() // die "Can't fork: $!\n";
	if ($pid) {
		$kids{$pid} = $name;
		return;
	}

	%kids = ();
	$SIG{PIPE} = 'IGNORE';
	srand($$);

	my ($ok, $failed, $s) = (0, 0);
	my $deadline = time() + 60;

	for (my $i = 0; time() < $deadline; $i++) {
		my ($uri, $host) = $next->($i) or last;
		$s //= IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080),
			Timeout => 10);
		my $r = $s && exchange($s, "GET $uri HTTP/1.1\r\nHost: $host\r\n\r\n");
		if (defined $r && $r =~ m{^HTTP/1\.1 200 }) {
			$ok++;
		} else {
			$failed++;
			undef $s;
		}
		undef $s if defined $r && $r =~ /^Connection: close\r$/mi;
	}

	open my $out, '>', "$d/$name.result" or POSIX::_exit(1);
	print $out "$ok $failed\n";
	close $out;
	POSIX::_exit(0);
}

# Waits for the client $name and returns its counts.
sub finish {
	my ($name) = @_;
	my ($pid) = grep { $kids{$_} eq $name } keys %kids;
	waitpid $pid, 0;
	delete $kids{$pid};
	open my $in, '<', "$d/$name.result" or return { ok => 0, failed => 1 };
	my ($ok, $failed) = split ' ', <$in> // '0 1';
	return { ok => $ok, failed => $failed };
}

# One request on $s, one response (with a Content-Length) back, or undef
# after 10 s without progress.
sub exchange {
	my ($s, $request) = @_;

	defined syswrite($s, $request) or return undef;

	my $sel = IO::Select->new($s);
	my $buf = '';
	while ($sel->can_read(10)) {
		sysread($s, $buf, 65536, length $buf) or return undef;
		next unless $buf =~ /\r\n\r\n/;
		my ($head, $body) = split /\r\n\r\n/, $buf, 2;
		my ($len) = $head =~ /^Content-Length: (\d+)\r?$/mi;
		return $buf if defined $len && length $body >= $len;
	}
	return undef;
}

###############################################################################
