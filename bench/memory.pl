#!/usr/bin/perl
#
# make bench-memory: resident memory of nginx with many upstreams, nginx's
# own keepalive against this module's, and how long `nginx -t` takes.
#
# For each row a configuration of BENCH_MEMORY_UPSTREAMS upstreams (2000;
# 200 for keepalive 1024) of one server each, every one with the row's
# `keepalive` line, is started with objs/nginx, one worker, once without
# the module (nginx's own keepalive) and once with it.  Read after start,
# from /proc: VmRSS of the worker and of the master.  `nginx -t` of the
# same configuration is run BENCH_MEMORY_RUNS (5) times 10 times, the
# median of its CPU time (user and system) per run kept.
# Printed and written to bench/results/memory-<date>-<HHMM>.md and
# memory-latest.md.
#
# Figures are printed and written, never asserted: the script says whether
# the targets hold (worker, unsliced: keepalive 32 and 256 at most 1.15
# times nginx's own, keepalive 1 at most 1.1; nginx -t at most 1.2).
#
# Run as root or not: perl bench/memory.pl.  BENCH_MEMORY_KEEP=1 keeps the
# scratch directory.

use v5.36;
use strict;
use warnings;

use FindBin;
use POSIX qw(strftime);
use Time::HiRes qw(time sleep);

use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in scratch_dir spawn stop wait_port
	free_ports write_file);

my $UPSTREAMS = $ENV{BENCH_MEMORY_UPSTREAMS} // 2000;
my $RUNS      = $ENV{BENCH_MEMORY_RUNS}      // 5;
my $BATCH     = 10;

$| = 1;
$SIG{PIPE} = 'IGNORE';
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
my $tmp = scratch_dir('nginx-keepalive-slice-memory', 'BENCH_MEMORY_KEEP');
chmod 0755, $tmp;
($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);
my $user = $> == 0 ? 'user root;' : '';

# [ keepalive line, upstreams, nginx's own has it ]
my @ROWS = (
	[ 'keepalive 1;',   $UPSTREAMS,      1 ],
	[ 'keepalive 32;',  $UPSTREAMS,      1 ],
	[ 'keepalive 256;', $UPSTREAMS,      1 ],
	[ 'keepalive 256 slice_key=$host slice_conn=4;', $UPSTREAMS, 0 ],
	[ 'keepalive 1024;', int($UPSTREAMS / 10), 1 ],
);

my @results;
for my $row (@ROWS) {
	my ($line, $n, $stock) = @$row;
	my %r = (line => $line, upstreams => $n);
	$r{own}  = measure('own',  $line, $n, 0) if $stock;
	$r{ours} = measure('ours', $line, $n, 1);
	push @results, \%r;
	printf "%-48s %5d upstreams: worker %s, master %s, nginx -t %s\n",
		"`$line`", $n,
		pair($r{own}{worker}, $r{ours}{worker}, '%.1f MB', 1024),
		pair($r{own}{master}, $r{ours}{master}, '%.1f MB', 1024),
		pair($r{own}{test}, $r{ours}{test}, '%.0f ms', 1 / 1000);
}

report(\@results);

###############################################################################

# "own -> ours (ratio)" or "ours" alone.
sub pair ($own, $ours, $format, $div) {
	my $o = sprintf $format, $ours / $div;
	return $o unless defined $own;
	return sprintf "$format / %s (%.2fx)", $own / $div, $o, $ours / $own;
}

sub config ($name, $line, $n, $module) {
	my $dir = "$tmp/$name";
	mkdir $dir unless -d $dir;
	my ($port) = free_ports(1);
	my $upstreams = join '', map {
		sprintf "    upstream u%d { server 127.0.%d.%d:%d; %s }\n",
			$_, 1 + int($_ / 250), 1 + $_ % 250, 10000 + $_ % 50000, $line
	} 1 .. $n;
	my $load = $module ? "load_module $SO;\n" : '';
	write_file("$dir/nginx.conf", <<"EOF");
${load}daemon off;
master_process on;
worker_processes 1;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
$user
events { worker_connections 1024; }
http {
    access_log off;
$upstreams
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://u1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
	return ($dir, $port);
}

sub parent ($pid) {
	open my $fh, '<', "/proc/$pid/stat" or return 0;
	my $stat = <$fh> // return 0;
	# The command name, in parentheses, may hold spaces.
	return $stat =~ /\) \S+ (\d+)/ ? $1 : 0;
}

sub vmrss ($pid) {
	open my $fh, '<', "/proc/$pid/status" or die "/proc/$pid/status: $!\n";
	while (<$fh>) {
		return $1 if /^VmRSS:\s+(\d+) kB/;
	}
	die "no VmRSS for $pid\n";
}

# Worker and master VmRSS (kB) after start, and nginx -t's median (s).
sub measure ($name, $line, $n, $module) {
	my ($dir, $port) = config($name, $line, $n, $module);
	my @cmd = ($NGINX, '-p', $dir, '-c', "$dir/nginx.conf", '-e', "$dir/error.log");

	# CPU time (user and system), which the machine's other load disturbs
	# much less than the wall clock; counted in clock ticks (10 ms), so
	# per batch of $BATCH runs.
	my @times;
	for (1 .. $RUNS) {
		my ($u0, $s0) = (times)[2, 3];
		for (1 .. $BATCH) {
			system("@cmd -t -q >/dev/null 2>&1") == 0
				or die "nginx -t failed for `$line`:\n" . `@cmd -t 2>&1`;
		}
		my ($u1, $s1) = (times)[2, 3];
		push @times, ($u1 - $u0 + $s1 - $s0) / $BATCH;
	}
	@times = sort { $a <=> $b } @times;

	unlink "$dir/nginx.pid";
	my $master = spawn("nginx ($name)", "$dir/stderr.log", @cmd);
	wait_port($port, "nginx ($name)", "$dir/error.log", "$dir/stderr.log");
	my $worker;
	for (1 .. 100) {
		opendir my $proc, '/proc' or die "/proc: $!\n";
		($worker) = grep { /^\d+$/ && parent($_) == $master } readdir $proc;
		last if $worker;
		sleep 0.1;
	}
	die "no worker of nginx ($name)\n" unless $worker;
	# The worker has initialised once it accepts; a moment more for the
	# master to settle.
	sleep 1;
	my %r = (worker => vmrss($worker), master => vmrss($master),
		test => $times[$#times / 2]);
	stop($master);
	return \%r;
}

sub report ($rows) {
	my $date = strftime('%Y-%m-%d', gmtime);
	my $md = "# Resident memory with many upstreams ($date)\n\n"
		. "objs/nginx, one worker, each upstream one server with the row's"
		. " `keepalive` line; VmRSS after start; `nginx -t`: CPU time (user"
		. " and system) per run, the median of $RUNS batches of $BATCH runs."
		. " nginx's own: the same binary without the module.\n\n"
		. "| `keepalive` in every upstream | upstreams | worker, nginx's own |"
		. " worker, this module | ratio | master, nginx's own |"
		. " master, this module | `nginx -t`, nginx's own | this module | ratio |\n"
		. "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
	my @targets;
	for my $r (@$rows) {
		my ($own, $ours) = ($r->{own}, $r->{ours});
		my $mb = sub ($kb) { defined $kb ? sprintf('%.1f MB', $kb / 1024) : '-' };
		my $ms = sub ($s) { defined $s ? sprintf('%.0f ms', $s * 1000) : '-' };
		my $ratio = sub ($x, $y) { $x && $y ? sprintf('%.2f', $y / $x) : '-' };
		$md .= sprintf "| `%s` | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			$r->{line}, $r->{upstreams}, $mb->($own->{worker}),
			$mb->($ours->{worker}), $ratio->($own->{worker}, $ours->{worker}),
			$mb->($own->{master}), $mb->($ours->{master}),
			$ms->($own->{test}), $ms->($ours->{test}),
			$ratio->($own->{test}, $ours->{test});
		next unless $own && $r->{line} =~ /^keepalive (\d+);$/;
		my $limit = $1 == 1 ? 1.1 : 1.15;
		my $w = $ours->{worker} / $own->{worker};
		push @targets, sprintf "- `%s`, %d upstreams: worker %.2fx nginx's own"
			. " (target: at most %.2f): %s", $r->{line}, $r->{upstreams}, $w,
			$limit, $w <= $limit ? 'met' : 'NOT met';
		my $t = $ours->{test} / $own->{test};
		push @targets, sprintf "- `%s`, %d upstreams: `nginx -t` %.2fx nginx's"
			. " own (target: at most 1.2): %s", $r->{line}, $r->{upstreams}, $t,
			$t <= 1.2 ? 'met' : 'NOT met';
	}
	$md .= "\nTargets:\n\n" . join("\n", @targets) . "\n";
	print "\n$md";
	my $dir = "$FindBin::Bin/results";
	my $stamp = strftime('%Y-%m-%d-%H%M', gmtime);
	write_file("$dir/memory-$stamp.md", $md);
	write_file("$dir/memory-latest.md", $md);
	print "written: bench/results/memory-$stamp.md, memory-latest.md\n";
}
