#!/usr/bin/perl
#
# make bench: what slicing costs in throughput, measured with wrk.
#
# A front nginx from objs/ (with the module) proxies to a backend nginx from
# objs/ that answers every request with a small 200.  The fronts have
# upstreams that differ only in their keepalive line:
#
#   none      no keepalive: a new backend connection per request
#   stock     keepalive 64;  in a second front WITHOUT the module (nginx's own)
#   drop-in   keepalive 64;                                  (stock behaviour)
#   sliced    keepalive 64 slice_key=$host slice_conn=16;
#
# wrk runs against each in turn with the same Lua script, which gives every
# request one of four Host values, so the sliced upstream keeps four buckets
# in use.  The figures are printed, never asserted: they depend on the
# machine.
#
# Run: perl bench/bench.pl (from anywhere; objs/ is found beside bench/)
# BENCH_DURATION (seconds, 10), BENCH_CONNECTIONS (32), BENCH_THREADS (2)
# change the wrk run; BENCH_KEEP=1 keeps the temporary directory.

use v5.36;
use strict;
use warnings;

use FindBin;
use POSIX ();

# The process management demo/demo.pl uses too.
use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs find_program scratch_dir spawn track untrack
	wait_port stop free_ports write_file);

my $DURATION    = $ENV{BENCH_DURATION}    // 10;
my $CONNECTIONS = $ENV{BENCH_CONNECTIONS} // 32;
my $THREADS     = $ENV{BENCH_THREADS}     // 2;
my @HOSTS       = qw(a.bench b.bench c.bench d.bench);

$| = 1;
$SIG{PIPE} = 'IGNORE';
# die() unwinds to the END block of Demo::Processes, which stops what we
# started.
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
my $WRK = find_program('wrk')
	or die "wrk not found: apt-get install wrk\n";

my $tmp = scratch_dir('nginx-keepalive-slice-bench', 'BENCH_KEEP');

# Workers run as nobody by default when started as root and could not
# write into the temporary directory.
my $USER = $> == 0 ? 'user root;' : '';

my @CONFIGS = (
	{ name => 'none',    ka => '' },
	{ name => 'stock',   ka => 'keepalive 64;', stock => 1 },
	{ name => 'drop-in', ka => 'keepalive 64;' },
	{ name => 'sliced',  ka => 'keepalive 64 slice_key=$host slice_conn=16;' },
);
my @ports = free_ports(2 * @CONFIGS);
for my $c (@CONFIGS) {
	$c->{front}   = shift @ports;
	$c->{backend} = shift @ports;
}

###############################################################################
# Backend: one nginx answering 200 "ok", one port per configuration so that
# its access log tells the configurations apart.  It logs $connection (the
# connection's serial number) to count the connections the front opened.
# Its own keepalive limits are raised so that it never closes first.

my $backend_listen = join "\n", map { "        listen 127.0.0.1:$_->{backend};" }
	@CONFIGS;

my $backend = start_nginx('backend', <<"EOF");
$USER
worker_processes 1;
error_log $tmp/backend/logs/error.log warn;

events {
    worker_connections 4096;
}

http {
    log_format conn '\$server_port \$connection';
    access_log $tmp/backend/logs/access.log conn buffer=256k;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    server {
$backend_listen

        location / {
            return 200 "ok\\n";
        }
    }
}
EOF

###############################################################################
# Front: the module loaded, one upstream and one server per configuration,
# identical but for the keepalive line.

my %front_servers = (module => '', stock => '');
for my $c (@CONFIGS) {
	(my $up = $c->{name}) =~ tr/-/_/;
	$front_servers{$c->{stock} ? 'stock' : 'module'} .= <<"EOF";
    upstream $up {
        server 127.0.0.1:$c->{backend};
        $c->{ka}
    }

    server {
        listen 127.0.0.1:$c->{front};

        location / {
            proxy_pass http://$up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }

EOF
}

# The stock row runs in a front of its own, without load_module: nginx's
# own module, for comparison with the drop-in row.
for my $kind ('module', 'stock') {
	my $load = $kind eq 'module' ? "load_module $SO;" : '';
	start_nginx("front-$kind", <<"EOF");
$USER
worker_processes 1;
error_log $tmp/front-$kind/logs/error.log warn;

$load

events {
    worker_connections 4096;
}

http {
    access_log off;

$front_servers{$kind}}
EOF
}

###############################################################################
# wrk.

my $lua = "$tmp/hosts.lua";
write_file($lua, <<"EOF");
-- One of four Host values per request, at random.
local hosts = { ${\ join ', ', map { "\"$_\"" } @HOSTS } }

request = function()
    wrk.headers["Host"] = hosts[math.random(#hosts)]
    return wrk.format()
end
EOF

printf "wrk -t%d -c%d -d%ds, Host one of %s, through objs/nginx (1 worker)\n"
	. "to an objs/nginx backend (1 worker) answering 200 \"ok\"\n",
	$THREADS, $CONNECTIONS, $DURATION, join(', ', @HOSTS);

for my $c (@CONFIGS) {
	print "  running $c->{name} ...\n";
	my $out = run_wrk($c);
	$c->{rps}      = $out =~ /^Requests\/sec:\s*([\d.]+)/m ? $1 : 0;
	$c->{latency}  = $out =~ /^\s*Latency\s+(\S+)/m ? $1 : '-';
	$c->{requests} = $out =~ /^\s*(\d+) requests in/m ? $1 : 0;
	$c->{errors}   = 0;
	$c->{errors}  += $1 if $out =~ /Non-2xx or 3xx responses:\s*(\d+)/;
	if ($out =~ /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/) {
		$c->{errors} += $1 + $2 + $3 + $4;
	}
	write_file("$tmp/wrk-$c->{name}.out", $out);
}

# The backend writes its buffered access log when it exits.
stop($backend);
count_connections();

###############################################################################
# Table.

my @head = ('configuration', 'requests/s', 'avg latency', 'errors',
	'backend connections');
my @rows = map {
	[ ($_->{ka} || 'no keepalive') . ($_->{stock} ? ' (nginx\'s own)' : ''), sprintf('%.0f', $_->{rps}), $_->{latency},
		$_->{errors}, $_->{connections} ]
} @CONFIGS;

my @w = map { length } @head;
for my $r (@rows) {
	$w[$_] = length $r->[$_] > $w[$_] ? length $r->[$_] : $w[$_] for 0 .. $#$r;
}
my $fmt = "%-$w[0]s" . join('', map { "  %$w[$_]s" } 1 .. $#w) . "\n";

print "\n";
printf $fmt, @head;
printf $fmt, map { '-' x $_ } @w;
printf $fmt, @$_ for @rows;

# nginx renews an upstream connection after keepalive_requests (1000 by
# default) requests, hence more backend connections than wrk has.
print "\none run each, so compare with care: repeat to see the spread."
	. "\nbackend connections: opened by the front; with keepalive, nginx"
	. " renews one\nafter keepalive_requests (default 1000) requests.\n";

# Errors in the front's log would make the figures meaningless.
my @problems = grep { /\[(?:error|crit|alert|emerg)\]/ }
	map { split /^/, slurp("$tmp/front-$_/logs/error.log") } 'module', 'stock';
if (@problems) {
	printf "\nthe front nginx logged %d errors, e.g.:\n%s", scalar @problems,
		join '', @problems[ 0 .. ($#problems < 2 ? $#problems : 2) ];
}

###############################################################################

sub run_wrk ($c) {
	my $pid = open(my $fh, '-|') // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		open STDERR, '>&', \*STDOUT;
		exec $WRK, "-t$THREADS", "-c$CONNECTIONS", "-d${DURATION}s",
			'-s', $lua, "http://127.0.0.1:$c->{front}/"
			or print "exec $WRK: $!\n";
		POSIX::_exit(127);
	}
	track($pid, 'wrk');
	my $out = do { local $/; <$fh> };
	close $fh;
	untrack($pid);
	die "wrk failed:\n$out" if $? || !length $out;
	return $out;
}

sub count_connections {
	my %port = map { $_->{backend} => $_ } @CONFIGS;
	my %seen;
	open my $fh, '<', "$tmp/backend/logs/access.log" or die "open: $!\n";
	while (<$fh>) {
		my ($port, $conn) = split;
		my $c = $port{$port} or next;
		$c->{connections}++ unless $seen{"$port $conn"}++;
	}
	$_->{connections} //= 0 for @CONFIGS;
}

sub start_nginx ($name, $conf) {
	my $prefix = "$tmp/$name";
	mkdir $prefix or die "mkdir $prefix: $!\n";
	mkdir "$prefix/logs" or die "mkdir $prefix/logs: $!\n";
	write_file("$prefix/nginx.conf",
		"daemon off;\npid $prefix/logs/nginx.pid;\n$conf");

	my $pid = spawn("nginx $name", "$prefix/logs/stderr.log",
		$NGINX, '-p', "$prefix/", '-c', "$prefix/nginx.conf");

	# Ready when it accepts on its first port; it binds them all at once.
	my ($port) = $conf =~ /listen 127\.0\.0\.1:(\d+)/;
	wait_port($port, "nginx $name",
		"$prefix/logs/stderr.log", "$prefix/logs/error.log");
	return $pid;
}

sub slurp ($file) {
	open my $fh, '<', $file or return '';
	local $/;
	return <$fh>;
}
