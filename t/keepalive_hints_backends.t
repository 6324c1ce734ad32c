#!/usr/bin/perl

# Tests for upstream keepalive: real backends' Keep-Alive headers.  Apache
# (KeepAliveTimeout 2, MaxKeepAliveRequests 4: "Keep-Alive: timeout=2,
# max=4", counting down) and Node's http server (keepAliveTimeout 2000:
# "Keep-Alive: timeout=2") behind nginx, POSTs every 0.5-3 s from a few
# clients: every one answered 200, none sent on a connection idle longer
# than the hint less keepalive_hint_margin (1 s), as the backends' own logs
# tell (Apache: %{remote}p %k %{begin:usec}t %{end:usec}t; Node: its socket
# ids and times), and connections reused meanwhile.
#
# A few seconds here (TEST_NGINX_HINTS_DURATION, seconds per backend,
# default 4); `make test-backends` runs a minute.  Apache sends its header
# only to a request that asks for keep-alive ("Connection: keep-alive").

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Socket::INET;
use JSON::PP qw/ decode_json /;
use POSIX ();
use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_post_host status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded') unless slice_module();

my $APACHE = (grep { -x } '/usr/sbin/apache2')[0];
my $MODDIR = '/usr/lib/apache2/modules';
my ($NODE) = grep { -x } map { ("$_/node", "$_/nodejs") }
	split(/:/, $ENV{PATH} // ''), '/usr/bin';
$APACHE = undef unless $APACHE && -f "$MODDIR/mod_reflector.so";

plan(skip_all => 'neither apache2 (with mod_reflector) nor node (nodejs) '
	. 'installed: apt-get install apache2 nodejs')
	unless $APACHE || $NODE;

my $DURATION = $ENV{TEST_NGINX_HINTS_DURATION} // 4;
my $CLIENTS = 4;
my $HINT_MS = 2000;
my $MARGIN_MS = 1000;
# nginx's idle timer and event loop: a request may leave a moment after
# the timer is due
my $SLACK_MS = 250;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream apache {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream node {
        server 127.0.0.1:8082;
        keepalive 16;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        # Apache sends Keep-Alive only to a request that asks for it
        proxy_set_header Connection keep-alive;

        location /apache/ {
            proxy_pass http://apache/;
        }

        location /node/ {
            proxy_pass http://node/;
        }

        location = /status {
            keepalive_status;
        }
    }
}

EOF

my $d = $t->testdir();

if ($APACHE) {
	my $port = port(8081);
	$t->write_file('httpd.conf', <<"EOF");
ServerRoot $d
ServerName localhost
DefaultRuntimeDir $d
PidFile $d/httpd.pid
ErrorLog $d/apache_error.log
LogLevel warn

LoadModule mpm_prefork_module $MODDIR/mod_mpm_prefork.so
LoadModule authz_core_module  $MODDIR/mod_authz_core.so
LoadModule reflector_module   $MODDIR/mod_reflector.so

User www-data
Group www-data

Listen 127.0.0.1:$port

KeepAlive On
KeepAliveTimeout 2
MaxKeepAliveRequests 4

StartServers 20
MinSpareServers 10
MaxSpareServers 40
ServerLimit 60
MaxRequestWorkers 60

LogFormat "%{remote}p %k %X %{begin:usec}t %{end:usec}t %>s %m %U" hints
CustomLog $d/apache_access.log hints

<Location />
    Require all granted
    SetHandler reflector
</Location>
EOF

	# a process group of its own: prefork signals its whole group when
	# it stops
	$t->run_daemon(sub {
		POSIX::setpgid(0, 0);
		open STDERR, '>>', "$d/apache_stderr.log";
		exec $APACHE, '-f', "$d/httpd.conf", '-DFOREGROUND';
	});
}

if ($NODE) {
	$t->write_file('server.js', <<'EOF');
// Logs each request: its socket's id, its number on the socket, and how
// long the socket was idle before it (ms since the previous response
// finished), as the backend sees it.
const http = require('http');
const fs = require('fs');
const { performance } = require('perf_hooks');
const [port, logPath] = process.argv.slice(2);
const log = fs.openSync(logPath, 'a');
let sockets = 0;
const server = http.createServer((req, res) => {
	const s = req.socket;
	const now = performance.now();
	const idle = s.lastEnd === undefined ? -1 : now - s.lastEnd;
	s.nreq += 1;
	const n = s.nreq;
	req.resume();
	req.on('end', () => {
		res.setHeader('X-Connection', s.id);
		res.end('ok\n');
	});
	res.on('finish', () => {
		s.lastEnd = performance.now();
		fs.writeSync(log, `conn=${s.id} req=${n} idle_ms=${idle.toFixed(1)} `
			+ `status=${res.statusCode}\n`);
	});
});
server.on('connection', (s) => {
	s.id = ++sockets;
	s.nreq = 0;
	s.on('close', () => fs.writeSync(log, `close conn=${s.id}\n`));
});
server.keepAliveTimeout = 2000;
server.listen(+port, '127.0.0.1');
EOF

	$t->run_daemon($NODE, "$d/server.js", port(8082), "$d/node.log");
}

$t->run();

$t->waitforsocket('127.0.0.1:' . port(8081)) if $APACHE;
$t->waitforsocket('127.0.0.1:' . port(8082)) if $NODE;

$t->plan(14);

###############################################################################

# A raw request straight to a backend: its response head.
sub direct {
	my ($port, $connection) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 5)
		or return '';
	print $s "POST / HTTP/1.1\r\nHost: localhost\r\n"
		. ($connection ? "Connection: $connection\r\n" : '')
		. "Content-Length: 2\r\n\r\nok";
	my $head = '';
	while (<$s>) {
		last if /^\r?$/;
		$head .= $_;
	}
	return $head;
}

# $CLIENTS clients POST to $uri for $DURATION seconds, each pausing
# 0.5-3 s between its requests; returns the statuses.
sub traffic {
	my ($uri) = @_;
	my $results = "$d/results" . int(rand(1e9));
	my @pids;
	for my $client (1 .. $CLIENTS) {
		my $pid = fork() // die "fork: $!";
		if ($pid == 0) {
			srand($client * 7919 + $$);
			my $end = time() + $DURATION;
			my @status;
			while (time() < $end) {
				my $r = http_post_host('localhost', $uri, 'x' x 100);
				push @status, status_of($r) // 'none';
				sleep 0.5 + rand(2.5);
			}
			open my $fh, '>>', $results or POSIX::_exit(1);
			print $fh "$_\n" for @status;
			close $fh;
			POSIX::_exit(0);
		}
		push @pids, $pid;
	}
	waitpid($_, 0) for @pids;
	open my $fh, '<', $results or return ();
	chomp(my @status = <$fh>);
	return @status;
}

sub counters {
	my ($name) = @_;
	my $r = http_get('/status');
	my ($body) = $r =~ /\r\n\r\n(.*)/s;
	my $json = eval { decode_json($body // '') } // {};
	return $json->{upstreams}{$name} // {};
}

# The counters of upstream $name once $done says they are (for at most 5
# s): the idle connections the traffic left are closed by the hint's timer
# (1 s) at the latest, which may not have fired yet when the traffic ends
# (4 clients rarely leave a connection idle that long meanwhile).
sub counters_once {
	my ($name, $done) = @_;
	my $c = counters($name);
	for (1 .. 50) {
		last if $done->($c);
		sleep 0.1;
		$c = counters($name);
	}
	return $c;
}

sub nginx_errors {
	my ($t) = @_;
	return scalar(() = $t->read_file('error.log')
		=~ /\[(warn|error|crit|alert|emerg)\]/g);
}

my $bound = $HINT_MS - $MARGIN_MS + $SLACK_MS;

SKIP: {
skip 'apache2 (with mod_reflector) not installed: apt-get install apache2', 7
	unless $APACHE;

like(direct(port(8081), 'keep-alive'), qr/^Keep-Alive: timeout=2, max=4\r?$/m,
	'apache: Keep-Alive header to "Connection: keep-alive"');
unlike(direct(port(8081)), qr/^Keep-Alive:/mi,
	'apache: no Keep-Alive header otherwise');

my @status = traffic('/apache/');
my $failed = grep { $_ ne '200' } @status;
is($failed, 0, 'apache: ' . scalar(@status) . ' POSTs, none failed')
	or diag("statuses: @status");

# Apache's log: per connection (client port, %k: 0 on its first
# request), the idle time before each request it served again
my (%end, @idle);
open my $fh, '<', "$d/apache_access.log" or die "apache log: $!";
while (<$fh>) {
	my ($peer, $k, undef, $begin, $end, $code, $method) = split;
	next unless $method eq 'POST' && $peer;
	push @idle, ($begin - $end{$peer}) / 1000 if $k > 0 && $end{$peer};
	$end{$peer} = $end;
}
close $fh;
my ($max) = sort { $b <=> $a } @idle, 0;
cmp_ok(scalar(@idle), '>', 0, 'apache: connections reused ('
	. scalar(@idle) . ' times)');
cmp_ok($max, '<=', $bound, sprintf('apache: longest idle before a reuse'
	. ' %.0f ms, at most the hint less the margin', $max));
# A connection left idle for certain: the traffic may have used every
# connection up to Apache's max (its last response closes it) without
# leaving one idle longer than the hint allows.  A request after it leaves
# its connection idle, unless it was that connection's last: then another.
for (1 .. 3) {
	last if (counters('apache')->{idle} // 0) > 0;
	http_post_host('localhost', '/apache/', 'x' x 100);
}
my $hinted = sub {
	my ($c) = @_;
	return ($c->{closed}{hint_timeout} // 0) + ($c->{not_kept}{keepalive_hint} // 0);
};
my $c = counters_once('apache', $hinted);
cmp_ok($hinted->($c), '>', 0, 'apache: the hint closed or refused connections')
	or diag(explain($c));
is(nginx_errors($t), 0, 'apache: nothing logged above info by nginx');

}

SKIP: {
skip 'node (nodejs) not installed: apt-get install nodejs', 7 unless $NODE;

like(direct(port(8082), 'keep-alive'), qr/^Keep-Alive: timeout=2\r?$/mi,
	'node: Keep-Alive header');

my @status = traffic('/node/');
my $failed = grep { $_ ne '200' } @status;
is($failed, 0, 'node: ' . scalar(@status) . ' POSTs, none failed')
	or diag("statuses: @status");

my @idle;
open my $fh, '<', "$d/node.log" or die "node log: $!";
while (<$fh>) {
	push @idle, $1 if /^conn=\d+ req=(?:[2-9]|\d\d+) idle_ms=([\d.]+)/;
}
close $fh;
my ($max) = sort { $b <=> $a } @idle, 0;
cmp_ok(scalar(@idle), '>', 0, 'node: connections reused ('
	. scalar(@idle) . ' times)');
cmp_ok($max, '<=', $bound, sprintf('node: longest idle before a reuse'
	. ' %.0f ms, at most the hint less the margin', $max));
my $c = counters_once('node', sub { $_[0]{closed}{hint_timeout} });
cmp_ok($c->{closed}{hint_timeout} // 0, '>', 0,
	'node: the hint closed connections');
is($c->{closed}{timeout} // 0, 0, 'node: none closed by keepalive_timeout');
is(nginx_errors($t), 0, 'node: nothing logged above info by nginx');

}

###############################################################################
