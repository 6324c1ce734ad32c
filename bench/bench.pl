#!/usr/bin/perl
#
# make bench: throughput, latency and upstream connections of this module
# against nginx's own keepalive, measured with wrk.
#
# Front nginxes from objs/ proxy to one backend nginx from objs/ that answers
# every request with a small 200.  Four fronts: with and without our module
# (load_module), each with one worker and with several.  Configurations:
#
#   none          no keepalive                       (front without the module)
#   stock         keepalive 64;  nginx's own module  (front without the module)
#   ours          keepalive 64;  this module         (front with the module)
#   ours sliced   keepalive 64 slice_key=$host slice_conn=8;  16 Host values
#   stock sliced  nginx's own keepalive 64, the same 16-Host traffic
#   512 servers   upstream of 512 servers (one backend port each), random,
#                 keepalive 4096, stock and ours (one worker)
#
# The machine is shared and noisy, so nothing is run once: BENCH_ROUNDS
# rounds each run every configuration of a group back to back, forward in
# odd rounds and backward in even ones (ABBA), ours next to stock; the
# ratios ours/stock are taken within a round (alternating A/B pairs) and
# reported as their median.  Figures per configuration are medians over the
# rounds.  Besides req/s, the front's CPU time per request (schedstat of
# its workers) is compared: other load disturbs it much less.
#
# Upstream connections opened are counted at the backend: it logs the first
# request of each connection ($connection_requests = 1) only.
#
# Writes bench/results/<date>-<HHMM>.md and bench/results/latest.md, prints the
# same Markdown.  Nothing is asserted: the targets are shown as met or not.
#
# Run: perl bench/bench.pl (make bench builds first)
#   BENCH_DURATION  seconds per wrk run (3)      BENCH_ROUNDS  rounds (11)
#   BENCH_CONNECTIONS  wrk -c (32)               BENCH_THREADS wrk -t (2)
#   BENCH_WORKERS   workers of the "several" fronts (number of CPUs, >= 2)
#   BENCH_GROUPS    which groups, e.g. "1w,512" (all: 1w,Nw,512)
#   BENCH_PIN=1     front nginxes on CPU 0, backend and wrk on CPU 1
#                   (taskset): the front alone on its CPU is the bottleneck,
#                   so req/s measures its cost with less scheduler noise
#   BENCH_RESULTS   output directory (bench/results); BENCH_KEEP=1 keeps
#                   the temporary directory

use v5.36;
use strict;
use warnings;

use FindBin;
use POSIX qw(strftime);
use List::Util qw(sum max min);

# The process management demo/demo.pl uses too.
use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in find_program scratch_dir spawn track untrack
	wait_port stop free_ports write_file run_nginx counting_backend_conf);

my $DURATION    = $ENV{BENCH_DURATION}    // 3;
my $ROUNDS      = $ENV{BENCH_ROUNDS}      // 11;
my $PIN         = $ENV{BENCH_PIN};
my $TASKSET     = $PIN ? (find_program('taskset')
	// die "taskset not found (util-linux)\n") : undef;

# The command prefix that pins a process to $cpu under BENCH_PIN.
sub pinned ($cpu) { return $PIN ? ($TASKSET, '-c', $cpu) : () }
my $CONNECTIONS = $ENV{BENCH_CONNECTIONS} // 32;
my $THREADS     = $ENV{BENCH_THREADS}     // 2;
my $NCPU        = cpus();
my $WORKERS     = $ENV{BENCH_WORKERS}     // max(2, $NCPU);
my %GROUPS      = map { $_ => 1 } split /,/, ($ENV{BENCH_GROUPS} // '1w,Nw,512');
my $RESULTS     = $ENV{BENCH_RESULTS}     // "$FindBin::Bin/results";
my $SERVERS     = 512;

$| = 1;
$SIG{PIPE} = 'IGNORE';
# die() unwinds to the END block of Demo::Processes, which stops what we
# started.
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
# Other builds: BENCH_NGINX, BENCH_SO (e.g. target/release/lib...so).
$NGINX = $ENV{BENCH_NGINX} if $ENV{BENCH_NGINX};
$SO    = $ENV{BENCH_SO}    if $ENV{BENCH_SO};
my $WRK = find_program('wrk')
	or die "wrk not found: apt-get install wrk (make deps-bench)\n";

my $tmp = scratch_dir('nginx-keepalive-slice-bench', 'BENCH_KEEP');

($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);

# Workers run as nobody by default when started as root and could not
# write into the temporary directory.
my $USER = $> == 0 ? 'user root;' : '';

###############################################################################
# Ports: one per front server, one per plain backend, 512 for the upstream
# of 512 servers.

my @HOSTS16 = map { sprintf 'h%02d.bench', $_ } 1 .. 16;

my %FRONT;    # "stock-1" => { workers, servers => [ { port, upstream } ] }
my @ports = free_ports(4 * 4 + 1 + $SERVERS);
my $backend_port = shift @ports;
my @server_ports = splice @ports, 0, $SERVERS;

# What each front serves: name => keepalive line.
my %UPSTREAM = (
	none   => '',
	plain  => 'keepalive 64;',
	sliced => 'keepalive 64 slice_key=$host slice_conn=8;',
	many   => 'keepalive 4096;',
);

for my $kind ('stock', 'ours') {
	for my $w (1, $WORKERS) {
		my $f = $FRONT{"$kind-$w"} = { kind => $kind, workers => $w };
		my @ups = $kind eq 'stock' ? ('none', 'plain') : ('plain', 'sliced');
		push @ups, 'many' if $w == 1;
		$f->{port}{$_} = shift @ports for @ups;
	}
}

# Configurations: label, group, front, upstream, Host values.
my @CONFIGS = (
	map({
		my ($g, $w) = @$_;
		(
			{ id => "none-$g",   group => $g, front => "stock-$w", up => 'none',
				label => 'no keepalive', hosts => 1 },
			{ id => "sliced-$g", group => $g, front => "ours-$w",  up => 'sliced',
				label => 'ours sliced `slice_key=$host slice_conn=8`, 16 hosts', hosts => 16 },
			{ id => "stock-$g",  group => $g, front => "stock-$w", up => 'plain',
				label => 'stock `keepalive 64`', hosts => 1 },
			{ id => "ours-$g",   group => $g, front => "ours-$w",  up => 'plain',
				label => 'ours `keepalive 64`', hosts => 1 },
			{ id => "stock16-$g", group => $g, front => "stock-$w", up => 'plain',
				label => 'stock `keepalive 64`, same 16-host traffic', hosts => 16 },
		)
	} ['1w', 1], ['Nw', $WORKERS]),
	{ id => 'stock-512', group => '512', front => 'stock-1', up => 'many',
		label => "stock, $SERVERS servers `random` `keepalive 4096`", hosts => 1 },
	{ id => 'ours-512',  group => '512', front => 'ours-1',  up => 'many',
		label => "ours, $SERVERS servers `random` `keepalive 4096`", hosts => 1 },
);
@CONFIGS = grep { $GROUPS{ $_->{group} } } @CONFIGS;
my %CONFIG = map { $_->{id} => $_ } @CONFIGS;
# Table order (run order is chosen for the A/B pairs).
my %ORDER = (none => 0, stock => 1, ours => 2, sliced => 3, stock16 => 4);
$_->{order} = $ORDER{ ($_->{id} =~ /^([a-z0-9]+)-/)[0] } // 0 for @CONFIGS;
my @GROUP_ORDER = grep { $GROUPS{$_} } qw(1w Nw 512);

###############################################################################
# Backend: one nginx answering 200 "ok" on one port for the one-server
# upstreams and on 512 more for the 512-server upstream.  It logs only the
# first request of each connection, so its log has one line per upstream
# connection opened.  Its own keepalive limits are raised so that it never
# closes first.

start_nginx('backend', $backend_port, counting_backend_conf(
	user => $USER, prefix => "$tmp/backend", connections => 32768,
	log => '$connection', ports => [$backend_port, @server_ports]));

###############################################################################
# Fronts: identical but for the keepalive lines and load_module.

my $many_servers = join '', map { "        server 127.0.0.1:$_;\n" } @server_ports;

for my $name (sort keys %FRONT) {
	my $f = $FRONT{$name};
	my $servers = '';
	for my $up (sort keys %{ $f->{port} }) {
		my $members = $up eq 'many'
			? "        random;\n$many_servers"
			: "        server 127.0.0.1:$backend_port;\n";
		my $ka = $UPSTREAM{$up};
		$ka .= "\n        keepalive_timeout 600s;" if $ka;
		$servers .= <<"EOF";
    upstream $up {
$members        $ka
    }

    server {
        listen 127.0.0.1:$f->{port}{$up};

        location / {
            proxy_pass http://$up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }

EOF
	}
	my $load = $f->{kind} eq 'ours' ? "load_module $SO;" : '';
	my ($first) = sort { $a <=> $b } values %{ $f->{port} };
	$f->{pid} = start_nginx("front-$name", $first, <<"EOF");
$load
$USER
worker_processes $f->{workers};
error_log $tmp/front-$name/logs/error.log warn;

events {
    worker_connections 16384;
}

http {
    access_log off;

$servers}
EOF
}

###############################################################################
# wrk: pre-formatted requests, Host rotated over 1 or 16 values, the same
# Lua mechanics for every configuration.

for my $n (1, 16) {
	my @h = $n == 1 ? ('localhost') : @HOSTS16;
	my $list = join ', ', map { "\"$_\"" } @h;
	write_file("$tmp/hosts$n.lua", <<"EOF");
-- Host rotated over $n value(s), requests formatted once.
local hosts = { $list }
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
}

my $machine = machine();
printf "make bench: wrk -t%d -c%d -d%ds, %d rounds, through objs/nginx to an"
	. " objs/nginx backend\n%s\n", $THREADS, $CONNECTIONS, $DURATION,
	$ROUNDS, $machine;

# Warm-up: every configuration once, untimed (fills the idle caches; the
# 512-server one needs longer to reach its steady state).
print "warm-up ...\n";
for my $c (@CONFIGS) {
	run_wrk($c, $c->{group} eq '512' ? 2 * $DURATION : 1);
}

my $load_start = loadavg();
my $conn_seen = count_lines();
for my $round (1 .. $ROUNDS) {
	print "round $round/$ROUNDS:";
	for my $g (@GROUP_ORDER) {
		my @in = grep { $_->{group} eq $g } @CONFIGS;
		# Forward, then backward (ABBA): the compared configurations run
		# next to each other, and neither always runs first.
		@in = reverse @in unless $round % 2;
		for my $c (@in) {
			my $front = $FRONT{ $c->{front} };
			my $cpu = cpu_ns($front->{pid});
			my $r = run_wrk($c, $DURATION);
			$r->{cpu} = cpu_ns($front->{pid}) - $cpu;
			my $lines = count_lines();
			$r->{conns} = $lines - $conn_seen;
			$conn_seen = $lines;
			$c->{runs}[ $round - 1 ] = $r;
			printf " %s=%.0f", $c->{id}, $r->{rps};
		}
	}
	print "\n";
}

###############################################################################
# Figures and the table.

for my $c (@CONFIGS) {
	my @r = @{ $c->{runs} };
	$c->{rps}  = median(map { $_->{rps} } @r);
	$c->{p50}  = median(map { $_->{p50} } @r);
	$c->{p99}  = median(map { $_->{p99} } @r);
	my $req = sum(map { $_->{requests} } @r);
	$c->{per10k} = $req ? 10000 * sum(map { $_->{conns} } @r) / $req : 0;
	$c->{cpu_us} = median(map { $_->{requests} ? $_->{cpu} / 1000 / $_->{requests} : 0 } @r);
	$c->{errors} = sum(map { $_->{errors} } @r);
}

my @RATIOS = (
	[ '1w', 'ours-1w', 'stock-1w', 'ours / stock, `keepalive 64`, 1 worker', 0.98 ],
	[ '1w', 'sliced-1w', 'stock-1w', 'ours sliced (16 hosts) / stock plain, 1 worker', 0.95 ],
	[ '1w', 'stock16-1w', 'stock-1w', 'stock with 16-host traffic / stock plain, 1 worker', undef ],
	[ 'Nw', 'ours-Nw', 'stock-Nw', "ours / stock, `keepalive 64`, $WORKERS workers", 0.98 ],
	[ 'Nw', 'sliced-Nw', 'stock-Nw', "ours sliced (16 hosts) / stock plain, $WORKERS workers", 0.95 ],
	[ '512', 'ours-512', 'stock-512', "ours / stock, $SERVERS servers `random` `keepalive 4096`", 1.08 ],
);

my $date = strftime('%Y-%m-%d', localtime);
# One file per run (several runs a day are usual on a noisy machine).
my $stamp = strftime('%Y-%m-%d-%H%M', localtime($^T));
my $md = "# make bench, $date\n\n"
	. "Machine: $machine; load average $load_start at the start, "
	. loadavg() . " at the end (other work on the machine).\n"
	. "`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency` through a front"
	. " objs/nginx (nginx 1.28.3, --with-debug, error_log warn) to a backend"
	. " objs/nginx (1 worker) answering 200 \"ok\". $ROUNDS rounds; each round"
	. " runs every configuration of a group back to back, forward and"
	. " backward in turn (ABBA). req/s, p50 and p99 are medians over the rounds; upstream"
	. " connections are counted at the backend (first request of each"
	. " connection) per 10,000 requests over all rounds. nginx renews an"
	. " upstream connection after `keepalive_requests` (1000) requests, hence"
	. " ~10 per 10k at best. The machine is shared with other work: compare"
	. " the ratios, taken within a round, rather than absolute figures.\n";

my %GROUP_TITLE = (
	'1w'  => 'One worker',
	'Nw'  => "$WORKERS workers",
	'512' => "$SERVERS servers, `random`, `keepalive 4096` (one worker)",
);
for my $g (@GROUP_ORDER) {
	$md .= "\n## $GROUP_TITLE{$g}\n\n"
		. "| configuration | req/s | p50 ms | p99 ms | front CPU µs/req | upstream conns / 10k req | errors |\n"
		. "|---|---:|---:|---:|---:|---:|---:|\n";
	for my $c (sort { $a->{order} <=> $b->{order} } grep { $_->{group} eq $g } @CONFIGS) {
		$md .= sprintf "| %s | %.0f | %.3f | %.3f | %.2f | %.1f | %d |\n", $c->{label},
			$c->{rps}, $c->{p50}, $c->{p99}, $c->{cpu_us}, $c->{per10k}, $c->{errors};
	}
}

$md .= "\n## Ratios (per round, A and B run back to back)\n\n"
	. "| comparison | median | min | max | target | met |\n"
	. "|---|---:|---:|---:|---:|---|\n";
for my $r (@RATIOS) {
	my ($g, $x, $y, $label, $target) = @$r;
	next unless $GROUPS{$g};
	my @q = map { $_->[1]{rps} ? $_->[0]{rps} / $_->[1]{rps} : 0 }
		map { [ $CONFIG{$x}{runs}[$_], $CONFIG{$y}{runs}[$_] ] } 0 .. $ROUNDS - 1;
	my $m = median(@q);
	$md .= sprintf "| %s | %.3f | %.3f | %.3f | %s | %s |\n", $label, $m,
		min(@q), max(@q), defined $target ? ">= $target" : '-',
		defined $target ? ($m >= $target ? 'yes' : 'NO') : '-';
	# The same comparison by front CPU time per request (B/A: above 1 means
	# A needs less CPU), far less sensitive to other load than req/s.
	my @e = map { cpu_per_req($_->[0]) ? cpu_per_req($_->[1]) / cpu_per_req($_->[0]) : 0 }
		map { [ $CONFIG{$x}{runs}[$_], $CONFIG{$y}{runs}[$_] ] } 0 .. $ROUNDS - 1;
	$m = median(@e);
	$md .= sprintf "| %s, by front CPU per request (B/A) | %.3f | %.3f | %.3f | %s | %s |\n",
		$label, $m, min(@e), max(@e), defined $target ? ">= $target" : '-',
		defined $target ? ($m >= $target ? 'yes' : 'NO') : '-';
}
for my $g (grep { $GROUPS{$_} } qw(1w Nw)) {
	my ($s, $p) = ($CONFIG{"sliced-$g"}, $CONFIG{"ours-$g"});
	my $q = $p->{per10k} ? $s->{per10k} / $p->{per10k} : 0;
	$md .= sprintf "| upstream conns per 10k, sliced / ours plain, %s | %.2f | | | <= 1.1 | %s |\n",
		$g eq '1w' ? '1 worker' : "$WORKERS workers", $q, $q <= 1.1 ? 'yes' : 'NO';
}

# Errors in the fronts' logs would make the figures meaningless.
my @problems = grep { /\[(?:error|crit|alert|emerg)\]/ }
	map { split /^/, slurp("$tmp/front-$_/logs/error.log") } sort keys %FRONT;
if (@problems) {
	$md .= sprintf "\nThe fronts logged %d errors, e.g.:\n\n```\n%s```\n",
		scalar @problems, join '', @problems[ 0 .. min(2, $#problems) ];
}

print "\n$md";
mkdir $RESULTS unless -d $RESULTS;
write_file("$RESULTS/$stamp.md", $md);
write_file("$RESULTS/latest.md", $md);
print "\nwritten: $RESULTS/$stamp.md, $RESULTS/latest.md\n";

###############################################################################

sub run_wrk ($c, $duration) {
	my $port = $FRONT{ $c->{front} }{port}{ $c->{up} };
	my $pid = open(my $fh, '-|') // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		open STDERR, '>&', \*STDOUT;
		exec pinned(1), $WRK, "-t$THREADS", "-c$CONNECTIONS", "-d${duration}s", '--latency',
			'-s', "$tmp/hosts$c->{hosts}.lua", "http://127.0.0.1:$port/"
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
	$r{p50}      = $out =~ /^\s*50%\s+([\d.]+\w+)/m ? ms($1) : 0;
	$r{p99}      = $out =~ /^\s*99%\s+([\d.]+\w+)/m ? ms($1) : 0;
	$r{errors}   = 0;
	$r{errors}  += $1 if $out =~ /Non-2xx or 3xx responses:\s*(\d+)/;
	if ($out =~ /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/) {
		$r{errors} += $1 + $2 + $3 + $4;
	}
	return \%r;
}

sub cpu_per_req ($r) {
	return $r->{requests} ? $r->{cpu} / $r->{requests} : 0;
}

# CPU time (ns) used so far by the workers of the nginx master $pid, from
# /proc/<pid>/schedstat (its first field), summed over the workers.
sub cpu_ns ($master) {
	my $ns = 0;
	for my $stat (glob '/proc/[0-9]*/stat') {
		open my $fh, '<', $stat or next;
		my $line = <$fh> // next;
		# pid (comm) state ppid ...
		my ($pid, $ppid) = $line =~ /^(\d+) \(.*\) \S+ (\d+)/ or next;
		next unless $ppid == $master;
		open my $sf, '<', "/proc/$pid/schedstat" or next;
		my ($run) = split ' ', (<$sf> // '0');
		$ns += $run;
	}
	return $ns;
}

# wrk's "680.00us", "1.50ms", "2.00s" in milliseconds.
sub ms ($v) {
	my ($n, $u) = $v =~ /^([\d.]+)(\w+)$/ or return 0;
	return $n / 1000 if $u eq 'us';
	return $n * 1000 if $u eq 's';
	return $n * 60000 if $u eq 'm';
	return $n;
}

# Lines in the backend's connection log (one per upstream connection).
sub count_lines {
	open my $fh, '<', "$tmp/backend/logs/connections.log" or return 0;
	my $n = 0;
	$n += tr/\n// while sysread $fh, $_, 1 << 16;
	return $n;
}

sub median (@v) {
	@v = sort { $a <=> $b } @v;
	return 0 unless @v;
	return @v % 2 ? $v[$#v / 2] : ($v[@v / 2 - 1] + $v[@v / 2]) / 2;
}

sub loadavg {
	open my $fh, '<', '/proc/loadavg' or return '?';
	return (split ' ', <$fh> // '?')[0];
}

sub cpus {
	open my $fh, '<', '/proc/cpuinfo' or return 1;
	my $n = grep { /^processor\s*:/ } <$fh>;
	return $n || 1;
}

sub machine {
	my $model = '';
	if (open my $fh, '<', '/proc/cpuinfo') {
		($model) = map { /^model name\s*:\s*(.*)/ ? $1 : () } <$fh>;
	}
	chomp(my $kernel = `uname -sr 2>/dev/null` // '');
	my $mem = '';
	if (open my $fh, '<', '/proc/meminfo') {
		($mem) = map { /^MemTotal:\s*(\d+)/ ? sprintf('%.0f GB RAM', $1 / 1048576) : () } <$fh>;
	}
	return join ', ', grep { length } ($model // 'unknown CPU'), "$NCPU CPUs",
		$mem, $kernel;
}

sub start_nginx ($name, $port, $conf) {
	return run_nginx($NGINX, "$tmp/$name", $port, $conf,
		pinned($name =~ /^front/ ? 0 : 1));
}

sub slurp ($file) {
	open my $fh, '<', $file or return '';
	local $/;
	return <$fh>;
}
