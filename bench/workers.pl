#!/usr/bin/perl
#
# make bench-workers: upstream connection reuse against the number of
# nginx workers, with idle connections shared between workers and
# without (keepalive_share off).
#
# One Apache (prefork, KeepAliveTimeout 5, as commonly deployed), 20
# name-based vhosts.  For each row a fresh objs/nginx with N workers
# (listen ... reuseport: fresh client connections spread over the
# workers), and a client that sends BENCH_WORKERS_RATE requests a second
# (20), each on a fresh client connection, for BENCH_WORKERS_DURATION
# seconds (20), rotating over the vhosts.  Apache's access log tells the
# upstream connections apart (the prefork child's pid and nginx's port,
# %P %{remote}p).  Printed per row: requests, failures, upstream
# connections, reuse (1 - connections / requests); written to
# bench/results/workers-<date>-<HHMM>.md and workers-latest.md.
#
# Figures are printed and written, never asserted: the script says
# whether the targets hold (sliced: 8 workers reuse at least 0.9 of one
# worker's; unsliced: 8 workers open no more than twice one worker's
# connections plus 2).
#
# Run as root: perl bench/workers.pl.  BENCH_WORKERS (1,2,4,8),
# BENCH_WORKERS_KEEP=1 keeps the scratch directory.

use v5.36;
use strict;
use warnings;

use FindBin;
use IO::Socket::INET;
use POSIX qw(strftime);
use Time::HiRes qw(time sleep);

use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in find_program scratch_dir spawn stop
	wait_port free_ports write_file);

my $DURATION = $ENV{BENCH_WORKERS_DURATION} // 20;
my $RATE     = $ENV{BENCH_WORKERS_RATE}     // 20;
my @WORKERS  = split /,/, ($ENV{BENCH_WORKERS} // '1,2,4,8');
my $VHOSTS   = 20;

$| = 1;
$SIG{PIPE} = 'IGNORE';
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
my $APACHE = find_program('apache2', '/usr/sbin')
	or die "apache2 not found: apt-get install apache2\n";
my $MODDIR = '/usr/lib/apache2/modules';
$> == 0 or die "run as root (Apache starts as root, nginx as user root)\n";

my $tmp = scratch_dir('nginx-keepalive-slice-workers', 'BENCH_WORKERS_KEEP');
chmod 0755, $tmp;
($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);

my ($apache_port, $nginx_port) = free_ports(2);
my @hosts = map { "v$_.bench" } 1 .. $VHOSTS;

start_apache();

my @CONFIGS = (
	[ sliced   => 'keepalive 64 slice_key=$host slice_conn=4;' ],
	[ unsliced => 'keepalive 64;' ],
);

my @rows;
for my $config (@CONFIGS) {
	my ($name, $line) = @$config;
	for my $workers (@WORKERS) {
		# One worker has nobody to share with: one row.
		for my $share ($workers == 1 ? ('-') : ('on', 'off')) {
			my $row = run_row($name, $line, $workers, $share);
			push @rows, $row;
			printf "%-8s %d worker%s share %-3s: %4d requests, %d failed, "
				. "%3d upstream connections, reuse %.3f\n",
				$name, $workers, $workers == 1 ? ' ' : 's', $share,
				$row->{requests}, $row->{failed}, $row->{connections},
				$row->{reuse};
		}
	}
}

report(\@rows);

###############################################################################

sub start_apache {
	my $dir = "$tmp/apache";
	mkdir $dir or die "mkdir $dir: $!\n";
	mkdir "$tmp/www";
	write_file("$tmp/www/index.html", "hello\n");
	chmod 0644, "$tmp/www/index.html";
	my $vhosts = join '', map { <<"EOF" } @hosts;
<VirtualHost *:*>
    ServerName $_
    DocumentRoot $tmp/www
</VirtualHost>
EOF
	write_file("$dir/httpd.conf", <<"EOF");
ServerRoot $dir
ServerName localhost
DefaultRuntimeDir $dir
PidFile $dir/httpd.pid
ErrorLog $dir/error.log
LogLevel warn

LoadModule mpm_prefork_module $MODDIR/mod_mpm_prefork.so
LoadModule authz_core_module  $MODDIR/mod_authz_core.so
LoadModule mime_module        $MODDIR/mod_mime.so
LoadModule dir_module         $MODDIR/mod_dir.so

User www-data
Group www-data

Listen 127.0.0.1:$apache_port

KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 5

StartServers 100
MinSpareServers 32
MaxSpareServers 200
ServerLimit 300
MaxRequestWorkers 300
MaxConnectionsPerChild 0

TypesConfig /etc/mime.types
DirectoryIndex index.html

LogFormat "%P %{remote}p %v %>s" bench
CustomLog $dir/access.log bench

<Directory />
    Require all granted
</Directory>

$vhosts
EOF
	spawn('apache', "$dir/stderr.log", $APACHE, '-f', "$dir/httpd.conf",
		'-DFOREGROUND');
	wait_port($apache_port, 'apache', "$dir/error.log", "$dir/stderr.log");
}

sub run_row ($name, $line, $workers, $share) {
	my $prefix = "$tmp/nginx-$name-$workers-$share";
	mkdir $prefix;
	mkdir "$prefix/logs";
	my $share_line = $share eq 'off' ? 'keepalive_share off;' : '';
	write_file("$prefix/nginx.conf", <<"EOF");
daemon off;
user root;
worker_processes $workers;
pid $prefix/logs/nginx.pid;
error_log $prefix/logs/error.log notice;
load_module $SO;

events {
    worker_connections 1024;
}

http {
    access_log off;

    upstream apache {
        server 127.0.0.1:$apache_port;
        $line
        $share_line
        keepalive_timeout 60s;
    }

    server {
        listen 127.0.0.1:$nginx_port reuseport;

        location / {
            proxy_pass http://apache;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF
	my $pid = spawn("nginx $name $workers", "$prefix/logs/stderr.log",
		$NGINX, '-p', $prefix, '-c', "$prefix/nginx.conf");
	wait_port($nginx_port, 'nginx', "$prefix/logs/error.log");
	sleep 0.5;

	my $log = "$tmp/apache/access.log";
	my $offset = -s $log // 0;
	my ($requests, $failed) = (0, 0);
	my $start = time;
	my $n = 0;
	while (time - $start < $DURATION) {
		my $due = $start + $n / $RATE;
		sleep($due - time) if $due > time;
		my $host = $hosts[$n % @hosts];
		$n++;
		$requests++;
		$failed++ unless get($host);
	}
	stop($pid);

	my %conns;
	open my $fh, '<', $log or die "$log: $!\n";
	seek $fh, $offset, 0;
	while (<$fh>) {
		my ($child, $port) = split;
		$conns{"$child:$port"}++;
	}
	close $fh;
	my $connections = keys %conns;
	return {
		name => $name, workers => $workers, share => $share,
		requests => $requests, failed => $failed,
		connections => $connections,
		reuse => $requests ? 1 - $connections / $requests : 0,
	};
}

# One GET on a fresh connection; true on a 200.
sub get ($host) {
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$nginx_port",
		Timeout => 5) or return 0;
	print $s "GET / HTTP/1.0\r\nHost: $host\r\n\r\n";
	my $status = <$s> // '';
	1 while <$s>;
	close $s;
	return $status =~ m{^HTTP/1\.\d 200 };
}

sub report ($rows) {
	my $date = strftime('%Y-%m-%d', gmtime);
	my $md = "# Upstream connection reuse by number of workers ($date)\n\n"
		. "Apache prefork, KeepAliveTimeout 5; $VHOSTS vhosts; $RATE requests/s,"
		. " each on a fresh client connection, ${DURATION} s per row;"
		. " `listen ... reuseport`; upstream connections counted in Apache's"
		. " access log (child pid and nginx's port).\n\n"
		. "| configuration | workers | keepalive_share | requests | failed |"
		. " upstream connections | reuse |\n|---|---:|---|---:|---:|---:|---:|\n";
	for my $r (@$rows) {
		$md .= sprintf "| %s | %d | %s | %d | %d | %d | %.3f |\n",
			$r->{name}, $r->{workers}, $r->{share}, $r->{requests},
			$r->{failed}, $r->{connections}, $r->{reuse};
	}
	my ($one_sliced) = grep { $_->{name} eq 'sliced' && $_->{workers} == 1 } @$rows;
	my ($eight_sliced) = grep { $_->{name} eq 'sliced' && $_->{workers} == 8
		&& $_->{share} eq 'on' } @$rows;
	my ($one_plain) = grep { $_->{name} eq 'unsliced' && $_->{workers} == 1 } @$rows;
	my ($eight_plain) = grep { $_->{name} eq 'unsliced' && $_->{workers} == 8
		&& $_->{share} eq 'on' } @$rows;
	$md .= "\nTargets:\n\n";
	if ($one_sliced && $eight_sliced) {
		my $ratio = $one_sliced->{reuse} ? $eight_sliced->{reuse} / $one_sliced->{reuse} : 0;
		$md .= sprintf "- sliced, 8 workers sharing: reuse %.3f, %.3f of one"
			. " worker's %.3f (target: at least 0.9): %s\n",
			$eight_sliced->{reuse}, $ratio, $one_sliced->{reuse},
			$ratio >= 0.9 ? 'met' : 'NOT met';
	}
	if ($one_plain && $eight_plain) {
		my $bound = 2 * $one_plain->{connections} + 2;
		$md .= sprintf "- unsliced, 8 workers sharing: %d connections, one"
			. " worker %d (target: at most %d): %s\n",
			$eight_plain->{connections}, $one_plain->{connections}, $bound,
			$eight_plain->{connections} <= $bound ? 'met' : 'NOT met';
	}
	print "\n$md";
	my $dir = "$FindBin::Bin/results";
	my $stamp = strftime('%Y-%m-%d-%H%M', gmtime);
	write_file("$dir/workers-$stamp.md", $md);
	write_file("$dir/workers-latest.md", $md);
	print "\nwritten: $dir/workers-$stamp.md\n";
}
