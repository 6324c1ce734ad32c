#!/usr/bin/perl
#
# make bench-auto: `keepalive auto` against fixed `keepalive N`, nginx's own
# and ours, under the load that makes a fixed N wrong.
#
# A front objs/nginx (one worker) proxies to a backend objs/nginx (one
# worker) answering 200 "ok"; each configuration has a backend port of its
# own, and the backend logs the port of the first request of each
# connection: one line per upstream connection opened. The front has
# proxy_ignore_client_abort on: wrk ends a run with every client's request
# in flight, and the front would otherwise close the upstream connection of
# each, so that every phase of the bursty load would start from nothing
# whatever the cache kept.
#
# 1. Steady load, as the issue's table: wrk -t2 -c200 -d3s from a fresh
#    front (cold cache: the connections the run opens are counted), for
#    `keepalive 16` and `keepalive 1024`, nginx's own and ours, and
#    `keepalive auto`. BENCH_AUTO_ROUNDS rounds (forward, then backward);
#    req/s are medians, new connections per 1,000 requests over all rounds.
# 2. Bursty load: 200 clients for 2 s, then 10 for 2 s, repeated for 20 s,
#    from a fresh front; new connections per 1,000 requests; then, 10 s
#    after the load stops, the idle connections as the status page says
#    (ours) and as the backend sees them (its established connections on
#    that configuration's port, by ss). keepalive_requests 10000000 there:
#    with nginx's 1000, connections that reach it in a lull are not kept,
#    and the next request takes another idle one, which drains the fixed
#    counts' idle connections as the decay would.
#
# Writes bench/results/auto-<date>-<HHMM>.md and auto-latest.md, prints the
# same Markdown. Nothing is asserted: the issue's targets are shown as met
# or not.
#
#   BENCH_AUTO_ROUNDS    rounds of the steady table (3)
#   BENCH_AUTO_DURATION  seconds of a steady run (3)
#   BENCH_AUTO_CYCLES    bursty cycles of 2 s + 2 s (5: 20 s)
#   BENCH_AUTO_SETTLE    seconds after the bursty load before counting (10)
#   BENCH_RESULTS        output directory; BENCH_KEEP=1 keeps the scratch dir

use v5.36;
use strict;
use warnings;

use FindBin;
use POSIX qw(strftime);
use List::Util qw(sum min);
use IO::Socket::INET;
use JSON::PP qw(decode_json);
use Time::HiRes qw(sleep time);

use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in find_program scratch_dir spawn track untrack
	wait_port stop free_ports write_file run_nginx counting_backend_conf);

my $ROUNDS   = $ENV{BENCH_AUTO_ROUNDS}   // 3;
my $DURATION = $ENV{BENCH_AUTO_DURATION} // 3;
my $CYCLES   = $ENV{BENCH_AUTO_CYCLES}   // 5;
my $SETTLE   = $ENV{BENCH_AUTO_SETTLE}   // 10;
# keepalive_requests of the bursty runs: high enough that no connection is
# renewed, so that what the table shows is the cache's doing alone.
my $BURSTY_REQUESTS = 10_000_000;
my $RESULTS  = $ENV{BENCH_RESULTS}       // "$FindBin::Bin/results";

$| = 1;
$SIG{PIPE} = 'IGNORE';
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
my $WRK = find_program('wrk')
	or die "wrk not found: apt-get install wrk (make deps-bench)\n";
my $SS = find_program('ss') or die "ss not found (iproute2)\n";
my $tmp = scratch_dir('nginx-keepalive-slice-bench-auto', 'BENCH_KEEP');
($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);
my $USER = $> == 0 ? 'user root;' : '';

my @CONFIGS = (
	{ id => 'stock16',   kind => 'stock', line => 'keepalive 16;',
		label => '`keepalive 16`, nginx\'s own' },
	{ id => 'ours16',    kind => 'ours',  line => 'keepalive 16;',
		label => '`keepalive 16`, this module' },
	{ id => 'stock1024', kind => 'stock', line => 'keepalive 1024;',
		label => '`keepalive 1024`, nginx\'s own' },
	{ id => 'ours1024',  kind => 'ours',  line => 'keepalive 1024;',
		label => '`keepalive 1024`, this module' },
	{ id => 'auto',      kind => 'ours',  line => 'keepalive auto;',
		label => '`keepalive auto`, this module' },
);
my %CONFIG = map { $_->{id} => $_ } @CONFIGS;

my ($front_port, $status_port, @backend_ports) = free_ports(2 + @CONFIGS);
$_->{backend} = shift @backend_ports for @CONFIGS;

###############################################################################
# Backend.

start_nginx('backend', $CONFIGS[0]{backend}, counting_backend_conf(
	user => $USER, prefix => "$tmp/backend", connections => 32768,
	log => '$server_port', ports => [map { $_->{backend} } @CONFIGS]));

###############################################################################
# A fresh front for one configuration: started, used, stopped.

my $fronts = 0;

sub start_front ($c, $extra = '') {
	my $name = sprintf 'front-%s-%d', $c->{id}, ++$fronts;
	my $load = $c->{kind} eq 'ours' ? "load_module $SO;" : '';
	my $status = $c->{kind} eq 'ours' ? <<"EOF" : '';
    server {
        listen 127.0.0.1:$status_port;
        location / {
            keepalive_status;
        }
    }
EOF
	return start_nginx($name, $front_port, <<"EOF");
$load
$USER
worker_processes 1;
error_log $tmp/$name/logs/error.log warn;
events {
    worker_connections 16384;
}
http {
    access_log off;
    upstream u {
        server 127.0.0.1:$c->{backend};
        $c->{line}
        $extra
    }
    server {
        listen 127.0.0.1:$front_port;
        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ignore_client_abort on;
        }
    }
$status}
EOF
}

my $machine = machine();
print "make bench-auto: one worker, wrk -t2, through objs/nginx to an objs/nginx"
	. " backend\n$machine\n";

# 1. Steady.

for my $round (1 .. $ROUNDS) {
	print "steady round $round/$ROUNDS:";
	my @order = $round % 2 ? @CONFIGS : reverse @CONFIGS;
	for my $c (@order) {
		my $pid = start_front($c);
		my $before = opened($c);
		my $r = run_wrk(200, $DURATION);
		stop($pid);
		$r->{conns} = opened($c) - $before;
		push @{ $c->{steady} }, $r;
		printf ' %s=%.0f', $c->{id}, $r->{rps};
	}
	print "\n";
}

# 2. Bursty.

for my $c (@CONFIGS) {
	print "bursty $c->{id}:";
	my $pid = start_front($c, "keepalive_requests $BURSTY_REQUESTS;");
	my $before = opened($c);
	my ($requests, $errors) = (0, 0);
	for (1 .. $CYCLES) {
		for my $clients (200, 10) {
			my $r = run_wrk($clients, 2);
			$requests += $r->{requests};
			$errors += $r->{errors};
		}
		print '.';
	}
	my $conns = opened($c) - $before;
	sleep $SETTLE;
	my $idle = $c->{kind} eq 'ours' ? status_idle() : undef;
	my $backend = established($c->{backend});
	stop($pid);
	$c->{bursty} = { requests => $requests, errors => $errors, conns => $conns,
		idle => $idle, backend => $backend };
	printf " %d requests, %d connections, idle %s, backend %d\n", $requests,
		$conns, $idle // '-', $backend;
}

###############################################################################
# The tables.

for my $c (@CONFIGS) {
	my @r = @{ $c->{steady} };
	$c->{rps} = median(map { $_->{rps} } @r);
	my $req = sum(map { $_->{requests} } @r);
	$c->{per1k} = $req ? 1000 * sum(map { $_->{conns} } @r) / $req : 0;
	$c->{errors} = sum(map { $_->{errors} } @r);
}

my $date = strftime('%Y-%m-%d', localtime);
my $stamp = strftime('%Y-%m-%d-%H%M', localtime($^T));
my $md = "# make bench-auto, $date\n\n"
	. "Machine: $machine. One front worker (objs/nginx, nginx 1.28.3,"
	. " --with-debug, error_log warn), one backend worker answering 200"
	. " \"ok\"; each configuration from a fresh front (cold cache), its own"
	. " backend port; upstream connections counted at the backend (first"
	. " request of each connection). The machine is shared: compare"
	. " configurations of one run.\n\n"
	. "## Steady load: wrk -t2 -c200 -d${DURATION}s, $ROUNDS rounds\n\n"
	. "| upstream | requests/s (median) | new upstream connections per 1,000 requests | errors |\n"
	. "|---|---:|---:|---:|\n";
for my $c (@CONFIGS) {
	$md .= sprintf "| %s | %.0f | %.1f | %d |\n", $c->{label}, $c->{rps},
		$c->{per1k}, $c->{errors};
}
my $au = $CONFIG{auto};
# Per round, auto against each keepalive 1024 run next to it (the run
# order alternates), and the median of those ratios: the machine's load
# changes from one run to the next more than these configurations differ.
my %per_round;
for my $k ('ours1024', 'stock1024') {
	$per_round{$k} = [ map {
		my $x = $CONFIG{$k}{steady}[$_]{rps};
		$x ? $au->{steady}[$_]{rps} / $x : 0
	} 0 .. $ROUNDS - 1 ];
}
$md .= sprintf "\n`keepalive auto`: %.1f new connections per 1,000 requests"
	. " (target at most 5: %s).\n", $au->{per1k}, $au->{per1k} <= 5 ? 'met' : 'NOT met';
for my $k ('ours1024', 'stock1024') {
	my $m = median(@{ $per_round{$k} });
	$md .= sprintf "`keepalive auto` / %s, req/s per round: %s; median %.3f"
		. " (target at least 0.95: %s).\n", $CONFIG{$k}{label},
		join(', ', map { sprintf '%.3f', $_ } @{ $per_round{$k} }), $m,
		$m >= 0.95 ? 'met' : 'NOT met';
}

my $cycle_s = 4 * $CYCLES;
$md .= "\n## Bursty load: 200 clients for 2 s, then 10 for 2 s, for $cycle_s s;"
	. " idle connections ${SETTLE} s after the load stops\n\n"
	. "`keepalive_requests $BURSTY_REQUESTS` (no renewal: nginx's 1000 would"
	. " drain the idle connections of a fixed count in the lulls, as"
	. " requests take idle ones in place of those renewed).\n\n"
	. "| upstream | requests | new upstream connections per 1,000 requests"
	. " | idle, status page | idle, backend's established connections | errors |\n"
	. "|---|---:|---:|---:|---:|---:|\n";
for my $c (@CONFIGS) {
	my $r = $c->{bursty};
	$md .= sprintf "| %s | %d | %.1f | %s | %d | %d |\n", $c->{label},
		$r->{requests}, $r->{requests} ? 1000 * $r->{conns} / $r->{requests} : 0,
		$r->{idle} // '-', $r->{backend}, $r->{errors};
}
my $bu = $au->{bursty};
my $b1k = $bu->{requests} ? 1000 * $bu->{conns} / $bu->{requests} : 0;
$md .= sprintf "\n`keepalive auto`: %.1f new connections per 1,000 requests"
	. " (target at most 10: %s); %s idle by the status page, %d at the backend"
	. " (target at most 20, agreeing: %s).\n",
	$b1k, $b1k <= 10 ? 'met' : 'NOT met',
	$bu->{idle} // '?', $bu->{backend},
	(defined $bu->{idle} && $bu->{idle} <= 20 && $bu->{backend} <= 20
		&& $bu->{idle} == $bu->{backend}) ? 'met' : 'NOT met';

print "\n$md";
mkdir $RESULTS unless -d $RESULTS;
write_file("$RESULTS/auto-$stamp.md", $md);
write_file("$RESULTS/auto-latest.md", $md);
print "\nwritten: $RESULTS/auto-$stamp.md, $RESULTS/auto-latest.md\n";

###############################################################################

sub run_wrk ($clients, $duration) {
	my $pid = open(my $fh, '-|') // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		open STDERR, '>&', \*STDOUT;
		exec $WRK, '-t2', "-c$clients", "-d${duration}s",
			"http://127.0.0.1:$front_port/"
			or print "exec $WRK: $!\n";
		POSIX::_exit(127);
	}
	track($pid, 'wrk');
	my $out = do { local $/; <$fh> };
	close $fh;
	untrack($pid);
	die "wrk failed:\n$out" if $? || !length $out;
	my %r;
	$r{rps}      = $out =~ /^Requests\/sec:\s*([\d.]+)/m ? $1 : 0;
	$r{requests} = $out =~ /^\s*(\d+) requests in/m ? $1 : 0;
	$r{errors}   = 0;
	$r{errors}  += $1 if $out =~ /Non-2xx or 3xx responses:\s*(\d+)/;
	if ($out =~ /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/) {
		$r{errors} += $1 + $2 + $3 + $4;
	}
	return \%r;
}

# Upstream connections the backend has seen opened on the port of $c.
sub opened ($c) {
	open my $fh, '<', "$tmp/backend/logs/connections.log" or return 0;
	my $n = 0;
	while (<$fh>) {
		$n++ if /^$c->{backend}$/;
	}
	return $n;
}

# Connections the backend holds established on $port.
sub established ($port) {
	my @lines = `$SS -Htn state established '( sport = :$port )' 2>/dev/null`;
	return scalar @lines;
}

# The idle connections of upstream "u" on the front's status page.
sub status_idle {
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$status_port",
		Timeout => 5) or return undef;
	print $s "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
	my $r = do { local $/; <$s> } // '';
	my ($body) = (split /\r\n\r\n/, $r, 2)[1];
	my $json = eval { decode_json($body // '') } or return undef;
	return $json->{upstreams}{u}{idle};
}

sub median (@v) {
	@v = sort { $a <=> $b } @v;
	return 0 unless @v;
	return @v % 2 ? $v[$#v / 2] : ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}

sub machine {
	my $model = '';
	if (open my $fh, '<', '/proc/cpuinfo') {
		($model) = map { /^model name\s*:\s*(.*)/ ? $1 : () } <$fh>;
	}
	my $n = 0;
	if (open my $fh, '<', '/proc/cpuinfo') {
		$n = grep { /^processor\s*:/ } <$fh>;
	}
	return join ', ', grep { length } ($model // 'unknown CPU'), "$n CPUs";
}

sub start_nginx ($name, $port, $conf) {
	return run_nginx($NGINX, "$tmp/$name", $port, $conf);
}
