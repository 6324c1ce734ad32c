#!/usr/bin/perl
#
# make bench-flood: busy Hosts beside random Host values.
#
# The scenario: a front objs/nginx (one worker) proxies to one
# backend objs/nginx; wrk with 8 connections sends requests for 5 busy
# Hosts in turn for BENCH_FLOOD_DURATION (10) seconds, with nothing else
# (quiet), with a trickle of 45 requests for random Hosts, one every 0.2 s
# (trickle), or with one more connection sending random Hosts at full speed
# (flood). Two fronts:
#
#   ours sliced   keepalive 32 slice_key=$host slice_conn=4;  (slice_poolsize 20)
#   stock         keepalive 32;  nginx's own, unsliced cache
#
# Reported per front and traffic: the busy Hosts' requests per second, and
# the upstream connections opened for them, counted at the backend, which
# logs the first request of each connection with its Host. nginx renews an
# upstream connection after keepalive_requests (1000) requests, hence about
# one per 1000 requests at best.
#
# Writes bench/results/flood-<date>-<HHMM>.md and flood-latest.md, prints the
# same Markdown. Nothing is asserted.
#
# Run: perl bench/flood.pl (make bench-flood builds first)
#   BENCH_FLOOD_DURATION  seconds per run (10)
#   BENCH_FLOOD_ROUNDS    runs per front and traffic, medians shown (1)
#   BENCH_NGINX, BENCH_SO other builds (e.g. the module of another branch)
#   BENCH_KEEP=1          keeps the temporary directory

use v5.36;
use strict;
use warnings;

use FindBin;
use IO::Socket::INET;
use POSIX qw(strftime);
use List::Util qw(sum);
use Time::HiRes qw(time sleep);

use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in find_program scratch_dir spawn track untrack
	wait_port stop free_ports write_file run_nginx counting_backend_conf);

my $DURATION = $ENV{BENCH_FLOOD_DURATION} // 10;
my $ROUNDS   = $ENV{BENCH_FLOOD_ROUNDS}   // 1;
my $RESULTS  = $ENV{BENCH_RESULTS}        // "$FindBin::Bin/results";
my @BUSY     = map { "busy$_.bench" } 1 .. 5;
my $TRICKLE  = 45;
my $TRICKLE_EVERY = 0.2;

$| = 1;
$SIG{PIPE} = 'IGNORE';
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
$NGINX = $ENV{BENCH_NGINX} if $ENV{BENCH_NGINX};
$SO    = $ENV{BENCH_SO}    if $ENV{BENCH_SO};
my $WRK = find_program('wrk')
	or die "wrk not found: apt-get install wrk (make deps-bench)\n";

my $tmp = scratch_dir('nginx-keepalive-slice-flood', 'BENCH_KEEP');
($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);
my $USER = $> == 0 ? 'user root;' : '';

my ($backend_port, $ours_port, $stock_port) = free_ports(3);
my %port = (ours => $ours_port, stock => $stock_port);
my @FRONTS = (
	{ name => 'ours', label => 'ours sliced `keepalive 32 slice_key=$host slice_conn=4`',
		load => "load_module $SO;", keepalive => 'keepalive 32 slice_key=$host slice_conn=4;' },
	{ name => 'stock', label => 'stock `keepalive 32` (unsliced)',
		load => '', keepalive => 'keepalive 32;' },
);
my @TRAFFIC = (
	{ name => 'quiet',   label => 'busy Hosts only' },
	{ name => 'trickle', label => "+ $TRICKLE random Hosts, one every ${TRICKLE_EVERY} s" },
	{ name => 'flood',   label => '+ 1 connection of random Hosts at full speed' },
);

###############################################################################
# Backend: logs the first request of each connection, with its Host.

start_nginx('backend', $backend_port, counting_backend_conf(
	user => $USER, prefix => "$tmp/backend", connections => 65536,
	log => '$connection $host', ports => [$backend_port]));

# Fronts: started afresh for each run (an empty cache, as after a restart),
# so that what a run leaves in the cache (idle connections of random Hosts,
# held for keepalive_timeout) cannot change the next one.

for my $f (@FRONTS) {
	$f->{port} = $port{ $f->{name} };
	$f->{conf} = <<"EOF";
$f->{load}
$USER
worker_processes 1;
error_log logs/error.log warn;

events {
    worker_connections 65536;
}

http {
    access_log off;

    upstream u {
        server 127.0.0.1:$backend_port;
        $f->{keepalive}
        keepalive_timeout 600s;
    }

    server {
        listen 127.0.0.1:$f->{port};

        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF
}

###############################################################################
# wrk scripts: the busy Hosts in turn; a new random Host for every request.

my $hosts = join ', ', map { "\"$_\"" } @BUSY;
write_file("$tmp/busy.lua", <<"EOF");
local hosts = { $hosts }
local reqs = {}
local i = 0

init = function(args)
    for k, h in ipairs(hosts) do
        reqs[k] = wrk.format(nil, nil, { Host = h })
    end
end

request = function()
    i = i % #reqs + 1
    return reqs[i]
end
EOF

write_file("$tmp/random.lua", <<'EOF');
local n = 0
local id = 0

init = function(args)
    math.randomseed(os.time())
    id = math.random(1, 1000000000)
end

request = function()
    n = n + 1
    return wrk.format(nil, nil, { Host = string.format("r%d-%d.random.bench", id, n) })
end
EOF

###############################################################################
# Runs.

printf "make bench-flood: wrk -t2 -c8 -d%ds over %d busy Hosts through objs/nginx"
	. " (1 worker) to an objs/nginx backend, %d round(s)\n", $DURATION, scalar @BUSY, $ROUNDS;


my %runs;
for my $round (1 .. $ROUNDS) {
	for my $tr (@TRAFFIC) {
		for my $f ($round % 2 ? @FRONTS : reverse @FRONTS) {
			my $r = run_traffic($f, $tr, $DURATION);
			push @{ $runs{"$f->{name}-$tr->{name}"} }, $r;
			printf "%-6s %-8s busy %8.0f req/s, %6d busy-Host connections, %6d random-Host requests\n",
				$f->{name}, $tr->{name}, $r->{rps}, $r->{busy_conns}, $r->{random};
		}
	}
}

###############################################################################
# The table.

my $date = strftime('%Y-%m-%d', localtime);
my $md = "# make bench-flood, $date\n\n"
	. "Busy Hosts beside random Host values. `wrk -t2 -c8 -d${DURATION}s`"
	. " sends requests for " . scalar(@BUSY) . " busy Hosts in turn through a front"
	. " objs/nginx (1 worker) to one backend objs/nginx; beside them nothing, a"
	. " trickle of $TRICKLE requests with random Hosts (one every ${TRICKLE_EVERY} s), or"
	. " one more connection sending random Hosts at full speed. Busy-Host upstream"
	. " connections are counted at the backend (first request of each connection)."
	. " Each run on a new front, after 1 s of busy Hosts alone."
	. " $ROUNDS round(s), medians. nginx renews an upstream connection after"
	. " `keepalive_requests` (1000) requests: about one per 1000 requests at best.\n\n"
	. "| front | traffic | busy req/s | busy requests | busy-Host upstream connections"
	. " | vs quiet | per 10k busy requests | random-Host requests |\n"
	. "|---|---|---:|---:|---:|---:|---:|---:|\n";
for my $f (@FRONTS) {
	my $quiet;
	for my $tr (@TRAFFIC) {
		my @r = @{ $runs{"$f->{name}-$tr->{name}"} };
		my %m = map { my $k = $_; $k => median(map { $_->{$k} } @r) }
			qw(rps requests busy_conns random);
		$quiet //= $m{busy_conns};
		$md .= sprintf "| %s | %s | %.0f | %.0f | %.0f | %.2fx | %.1f | %.0f |\n",
			$f->{label}, $tr->{label}, $m{rps}, $m{requests}, $m{busy_conns},
			$quiet ? $m{busy_conns} / $quiet : 0,
			$m{requests} ? 10000 * $m{busy_conns} / $m{requests} : 0, $m{random};
	}
}

my @problems = grep { /\[(?:error|crit|alert|emerg)\]/ }
	map { split /^/, slurp($_) } glob "$tmp/front-*/logs/error.log";
$md .= sprintf "\nThe fronts logged %d errors, e.g.:\n\n```\n%s```\n",
	scalar @problems, join '', @problems[0 .. ($#problems < 2 ? $#problems : 2)]
	if @problems;

print "\n$md";
mkdir $RESULTS unless -d $RESULTS;
my $stamp = strftime('%Y-%m-%d-%H%M', localtime($^T));
write_file("$RESULTS/flood-$stamp.md", $md);
write_file("$RESULTS/flood-latest.md", $md);
print "\nwritten: $RESULTS/flood-$stamp.md, $RESULTS/flood-latest.md\n";

###############################################################################

# One run of $traffic through a new front $f for $duration seconds, after
# a second of busy Hosts alone (untimed: the Hosts in steady use exist
# before the random ones come).
sub run_traffic ($f, $traffic, $duration) {
	my $front = start_nginx("front-$f->{name}-" . ++$f->{started}, $f->{port}, $f->{conf});
	wrk_busy($f->{port}, 1);
	my %seen = busy_lines();
	my (@pids, $flood_out);

	if ($traffic->{name} eq 'flood') {
		$flood_out = "$tmp/flood.out";
		push @pids, spawn('wrk flood', $flood_out, $WRK, '-t1', '-c1', "-d${duration}s",
			'-s', "$tmp/random.lua", "http://127.0.0.1:$f->{port}/");
	} elsif ($traffic->{name} eq 'trickle') {
		push @pids, trickle($f->{port}, $duration);
	}

	my $out = wrk_busy($f->{port}, $duration);

	for my $pid (@pids) {
		waitpid $pid, 0;
		untrack($pid);
	}
	stop($front);

	my %r;
	$r{rps}      = $out =~ /^Requests\/sec:\s*([\d.]+)/m ? $1 : 0;
	$r{requests} = $out =~ /^\s*(\d+) requests in/m ? $1 : 0;
	my %now = busy_lines();
	$r{busy_conns} = $now{busy} - $seen{busy};
	# random-Host requests sent: by wrk, or by the trickle
	$r{random} = 0;
	if ($flood_out) {
		my $fo = slurp($flood_out);
		unlink $flood_out;
		$r{random} = $1 if $fo =~ /^\s*(\d+) requests in/m;
	} elsif ($traffic->{name} eq 'trickle') {
		$r{random} = slurp("$tmp/trickle.out") =~ tr/\n//;
		unlink "$tmp/trickle.out";
	}
	return \%r;
}

sub wrk_busy ($port, $duration) {
	my $pid = open(my $fh, '-|') // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		open STDERR, '>&', \*STDOUT;
		exec $WRK, '-t2', '-c8', "-d${duration}s", '-s', "$tmp/busy.lua",
			"http://127.0.0.1:$port/" or print "exec $WRK: $!\n";
		POSIX::_exit(127);
	}
	track($pid, 'wrk');
	my $out = do { local $/; <$fh> };
	close $fh;
	untrack($pid);
	die "wrk failed:\n$out" if $? || !length $out;
	return $out;
}

# A child sending $TRICKLE requests with random Hosts, one every
# $TRICKLE_EVERY seconds, each on a connection of its own.
sub trickle ($port, $duration) {
	my $pid = fork() // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		my $start = time;
		for my $n (1 .. $TRICKLE) {
			last if time - $start > $duration;
			my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 5);
			if ($s) {
				printf $s "GET / HTTP/1.0\r\nHost: r%d-%d.trickle.bench\r\n\r\n", $$, $n;
				my $status = <$s> // '';
				1 while <$s>;
				close $s;
				if (open my $log, '>>', "$tmp/trickle.out") {
					print $log $status =~ /^HTTP\/1\.\d 200/ ? "ok\n" : "failed\n";
				}
			}
			sleep $TRICKLE_EVERY;
		}
		POSIX::_exit(0);
	}
	track($pid, 'trickle');
	return $pid;
}

# Lines of the backend's connection log: connections opened for busy Hosts.
sub busy_lines () {
	my %n = (busy => 0);
	open my $fh, '<', "$tmp/backend/logs/connections.log" or return %n;
	while (my $line = <$fh>) {
		$n{busy}++ if $line =~ / busy\d\.bench$/;
	}
	return %n;
}

sub median (@v) {
	@v = sort { $a <=> $b } @v;
	return 0 unless @v;
	return @v % 2 ? $v[$#v / 2] : ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}

sub start_nginx ($name, $port, $conf) {
	return run_nginx($NGINX, "$tmp/$name", $port, $conf);
}

sub slurp ($file) {
	open my $fh, '<', $file or return '';
	local $/;
	return <$fh>;
}
