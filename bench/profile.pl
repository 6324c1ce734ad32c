#!/usr/bin/perl
#
# make bench-profile: instructions per proxied request, ours against
# nginx's own keepalive, counted by valgrind --tool=callgrind (exact and
# unaffected by other load on the machine, unlike wall-clock figures).
#
# For each configuration a front objs/nginx (master_process off, one
# process) runs under callgrind and proxies to a backend objs/nginx.  A
# client sends warm-up requests, the counters are zeroed
# (callgrind_control -z), PROFILE_REQUESTS requests are sent one after the
# other on keepalive client connections, and the counters are dumped
# (callgrind_control -d).  Reported per request: all instructions of the
# front, and the inclusive cost of the keepalive hot path, init peer + get
# peer + free peer (each includes the wrapped balancer's own callback, the
# same round-robin or random code for both modules).
#
# Run: perl bench/profile.pl
#   PROFILE_REQUESTS (2000), PROFILE_KEEP=1 keeps the directory (and the
#   callgrind.out files, for callgrind_annotate/kcachegrind),
#   PROFILE_CALLGRIND_ARGS (e.g. --dump-instr=yes, for per-instruction
#   counts), PROFILE_PORT (fixed ports from there on, see below),
#   PROFILE_ONLY (a regexp on the configuration names)

use v5.36;
use strict;
use warnings;

use FindBin;
use IO::Socket::INET;
use List::Util qw(sum);
use POSIX qw(strftime);

use lib "$FindBin::Bin/../demo/lib";
use Demo::Processes qw(objs copies_in find_program scratch_dir spawn stop wait_port
	free_ports write_file);

my $REQUESTS = $ENV{PROFILE_REQUESTS} // 2000;
# PROFILE_WRK=C: wrk -cC for 10 s instead of sequential requests (the idle
# caches then hold as many connections as under load).
my $WRK      = $ENV{PROFILE_WRK};
my $ONLY     = $ENV{PROFILE_ONLY};    # a regexp on the configuration names
my $WARMUP   = 600;
my $SERVERS  = 512;

$| = 1;
$SIG{PIPE} = 'IGNORE';
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

my ($NGINX, $SO) = objs();
# Other builds: BENCH_NGINX, BENCH_SO (e.g. target/release/lib...so).
$NGINX = $ENV{BENCH_NGINX} if $ENV{BENCH_NGINX};
$SO    = $ENV{BENCH_SO}    if $ENV{BENCH_SO};
find_program('valgrind') && find_program('callgrind_control')
	or die "valgrind not found: apt-get install valgrind\n";
my $tmp = scratch_dir('nginx-keepalive-slice-profile', 'PROFILE_KEEP');

($NGINX, $SO) = copies_in($tmp, $NGINX, $SO);
my $USER = $> == 0 ? 'user root;' : '';

# PROFILE_PORT=P: ports P, P+1, ... instead of free ones. The sliced rows
# depend on the ports (a port is part of each hashed key, and how many of
# the 16 keys share a hash chain changes with it): two builds compare
# exactly only on the same ports.
my @ports = $ENV{PROFILE_PORT}
	? map { $ENV{PROFILE_PORT} + $_ } 0 .. 2 + $SERVERS
	: free_ports(3 + $SERVERS);
my ($front_port, $backend_port, $tls_port) = splice @ports, 0, 3;
my @server_ports = @ports;

my @HOSTS16 = map { sprintf 'h%02d.bench', $_ } 1 .. 16;

my %STOCK_HOT = (
	init => 'ngx_http_upstream_init_keepalive_peer',
	get  => 'ngx_http_upstream_get_keepalive_peer',
	free => 'ngx_http_upstream_free_keepalive_peer',
);
my %OURS_HOT = (
	init => 'ngx_http_upstream_keepalive_slice_module::peer::init_peer',
	get  => 'ngx_http_upstream_keepalive_slice_module::peer::get_peer',
	free => 'ngx_http_upstream_keepalive_slice_module::peer::free_peer',
);

# `base`: the configuration of nginx's own module each is compared with
# (the ratio of hot paths and the difference of totals).
my @CONFIGS = (
	{ name => 'stock `keepalive 64`', kind => 'stock', ka => 'keepalive 64;', hosts => 1 },
	{ name => 'ours `keepalive 64`', kind => 'ours', ka => 'keepalive 64;', hosts => 1 },
	{ name => 'ours `keepalive 64 local`', kind => 'ours', ka => 'keepalive 64 local;', hosts => 1 },
	{ name => 'ours sliced `slice_key=$host slice_conn=8`, 16 hosts', kind => 'ours',
		ka => 'keepalive 64 slice_key=$host slice_conn=8;', hosts => 16 },
	{ name => 'stock TLS upstream `keepalive 64`', kind => 'stock', ka => 'keepalive 64;',
		hosts => 1, tls => 1 },
	{ name => 'ours TLS upstream `keepalive 64`', kind => 'ours', ka => 'keepalive 64;',
		hosts => 1, tls => 1, base => 'stock TLS upstream `keepalive 64`' },
	# SNI: the name is part of the identity, compared on every try.
	{ name => 'stock TLS upstream, `proxy_ssl_server_name on`', kind => 'stock',
		ka => 'keepalive 64;', hosts => 1, tls => 1, proxy => 'proxy_ssl_server_name on;' },
	{ name => 'ours TLS upstream, `proxy_ssl_server_name on`', kind => 'ours',
		ka => 'keepalive 64;', hosts => 1, tls => 1, proxy => 'proxy_ssl_server_name on;',
		base => 'stock TLS upstream, `proxy_ssl_server_name on`' },
	{ name => "stock, $SERVERS servers `random` `keepalive 4096`", kind => 'stock',
		ka => 'keepalive 4096;', many => 1, hosts => 1 },
	{ name => "ours, $SERVERS servers `random` `keepalive 4096`", kind => 'ours',
		ka => 'keepalive 4096;', many => 1, hosts => 1,
		base => "stock, $SERVERS servers `random` `keepalive 4096`" },
	# The cost of a backend's Keep-Alive header (keepalive_hints): read
	# and honoured on every response, and with the hints off.
	{ name => 'stock, backend sends `Keep-Alive: timeout=30, max=1000000`', kind => 'stock',
		ka => 'keepalive 64;', hosts => 1, path => '/hint' },
	{ name => 'ours, backend sends `Keep-Alive: timeout=30, max=1000000`', kind => 'ours',
		ka => 'keepalive 64;', hosts => 1, path => '/hint',
		base => 'stock, backend sends `Keep-Alive: timeout=30, max=1000000`' },
	{ name => 'ours `keepalive_hints off`, backend sends `Keep-Alive`', kind => 'ours',
		ka => 'keepalive 64; keepalive_hints off;', hosts => 1, path => '/hint',
		base => 'stock, backend sends `Keep-Alive: timeout=30, max=1000000`' },
	# The cost of $upstream_keepalive_*: the same access log line with and
	# without them (the difference is recording the tries and printing).
	{ name => 'ours sliced, access log', kind => 'ours', log => 'plain',
		ka => 'keepalive 64 slice_key=$host slice_conn=8;', hosts => 16 },
	{ name => 'ours sliced, access log with `$upstream_keepalive_*`', kind => 'ours',
		log => 'variables', ka => 'keepalive 64 slice_key=$host slice_conn=8;', hosts => 16 },
);

my %LOG_FORMAT = (
	plain => '$remote_addr $host $upstream_addr $upstream_status',
	variables => '$remote_addr $host $upstream_addr $upstream_status'
		. ' $upstream_keepalive_reused $upstream_keepalive_requests $upstream_keepalive_key',
);

###############################################################################

my $listen = join '', map { "        listen 127.0.0.1:$_;\n" } $backend_port, @server_ports;
# The TLS backend's certificate, made for this run.
system('openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost'
	. " -keyout $tmp/cert.key -out $tmp/cert.pem >/dev/null 2>&1") == 0
	or die "openssl req failed\n";
$listen .= "        listen 127.0.0.1:$tls_port ssl;\n"
	. "        ssl_certificate $tmp/cert.pem;\n"
	. "        ssl_certificate_key $tmp/cert.key;\n";
my $backend = start_nginx('backend', $backend_port, [], <<"EOF");
$USER
worker_processes 1;
error_log $tmp/backend/logs/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    server {
$listen        location / { return 200 "ok\\n"; }
        location /hint {
            add_header Keep-Alive "timeout=30, max=1000000";
            return 200 "ok\\n";
        }
    }
}
EOF

my $i = 0;
@CONFIGS = grep { $_->{name} =~ /$ONLY/ } @CONFIGS if $ONLY;
for my $c (@CONFIGS) {
	$i++;
	my $members = $c->{many}
		? "        random;\n" . join('', map { "        server 127.0.0.1:$_;\n" } @server_ports)
		: "        server 127.0.0.1:" . ($c->{tls} ? $tls_port : $backend_port) . ";\n";
	my $scheme = $c->{tls} ? 'https' : 'http';
	my $path = $c->{path} // '';
	my $proxy = $c->{proxy} // '';
	my $load = $c->{kind} eq 'ours' ? "load_module $SO;" : '';
	my $out = "$tmp/callgrind.out.$i";
	my $log = $c->{log}
		? "log_format f '$LOG_FORMAT{$c->{log}}';\n    access_log $tmp/front$i/logs/access.log f;"
		: 'access_log off;';
	print "profiling $c->{name} ...\n";
	my $pid = start_nginx("front$i", $front_port,
		[ 'valgrind', '--tool=callgrind', "--callgrind-out-file=$out",
			split(' ', $ENV{PROFILE_CALLGRIND_ARGS} // '') ], <<"EOF");
$load
$USER
master_process off;
worker_processes 1;
error_log $tmp/front$i/logs/error.log warn;
events { worker_connections 16384; }
http {
    $log
    upstream u {
$members        $c->{ka}
    }
    server {
        listen 127.0.0.1:$front_port;
        location / {
            proxy_pass $scheme://u$path;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $proxy
        }
    }
}
EOF
	# The 512-server cache needs many requests to fill (one idle
	# connection per server at least).
	my $n = $REQUESTS;
	if ($WRK) {
		wrk($c->{hosts}, 10);
		system("callgrind_control -z $pid >/dev/null") == 0 or die "callgrind_control -z failed\n";
		$n = wrk($c->{hosts}, 10);
	} else {
		client($c->{hosts}, $c->{many} ? 4 * $WARMUP : $WARMUP);
		system("callgrind_control -z $pid >/dev/null") == 0 or die "callgrind_control -z failed\n";
		client($c->{hosts}, $n);
	}
	system("callgrind_control -d $pid >/dev/null") == 0 or die "callgrind_control -d failed\n";
	stop($pid, 'TERM');

	my ($dump) = sort glob("$out.*");
	$dump //= $out;
	my %cost = inclusive($dump);
	my $hot = $c->{kind} eq 'ours' ? \%OURS_HOT : \%STOCK_HOT;
	$c->{total} = ($cost{TOTAL} // 0) / $n;
	$c->{$_} = ($cost{ $hot->{$_} } // 0) / $n for qw(init get free);
	$c->{hot} = $c->{init} + $c->{get} + $c->{free};
	# No cost at all: the callbacks were not found in the profile.
	$c->{total} && $c->{hot} or die "no profile of the hot path for $c->{name}\n";
}
stop($backend);

###############################################################################

my $date = strftime('%Y-%m-%d', localtime);
my $how = $WRK ? "wrk -c$WRK for 10 s after 10 s of warm-up"
	: "$REQUESTS sequential requests after warm-up";
my $md = "Instructions per request (callgrind, $how; objs/nginx --with-debug, error_log warn; $date). init/get/free"
	. " are inclusive: they contain the balancer's own callbacks. The ratio and the total's"
	. " difference are against nginx's own module in the same configuration (unsliced, one"
	. " server, for the sliced and `local` rows).\n\n"
	. "| configuration | front total | vs stock | init peer | get peer | free peer | hot path | ratio to stock |\n"
	. "|---|---:|---:|---:|---:|---:|---:|---:|\n";
my %by_name = map { $_->{name} => $_ } @CONFIGS;
for my $c (@CONFIGS) {
	my $base = $c->{kind} eq 'stock' ? $c : $by_name{ $c->{base} // 'stock `keepalive 64`' };
	my ($vs, $ratio) = ('n/a', 'n/a');
	if ($base) {
		$vs = sprintf '%+.2f%%', 100 * ($c->{total} / $base->{total} - 1);
		$ratio = sprintf '%.3fx', $c->{hot} / $base->{hot};
	}
	$md .= sprintf "| %s | %.0f | %s | %.0f | %.0f | %.0f | %.0f | %s |\n", $c->{name},
		$c->{total}, $vs, $c->{init}, $c->{get}, $c->{free}, $c->{hot}, $ratio;
}
print "\n$md";
# profile-latest.md holds whole runs of this build: a run of some rows
# (PROFILE_ONLY), or of another build (BENCH_SO, BENCH_NGINX), is printed
# only.
if (defined $ONLY || $ENV{BENCH_SO} || $ENV{BENCH_NGINX}) {
	print "\nnot written: profile-latest.md holds whole runs of objs/\n";
	exit 0;
}
my $results = "$FindBin::Bin/results";
mkdir $results unless -d $results;
write_file("$results/profile-latest.md", $md);
print "\nwritten: $results/profile-latest.md\n";

###############################################################################

# Inclusive instruction counts per function (and TOTAL) of a callgrind dump.
sub inclusive ($file) {
	my $out = `callgrind_annotate --inclusive=yes --threshold=100 '$file' 2>/dev/null`;
	my %cost;
	for (split /\n/, $out) {
		if (/^\s*([\d,]+)\s+.*PROGRAM TOTALS/) {
			($cost{TOTAL} = $1) =~ tr/,//d;
		} elsif (/^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(?:\*\s+)?[^:]*:(\S+)/) {
			(my $n = $1) =~ tr/,//d;
			my $f = $2;
			$cost{$f} //= $n;
		}
	}
	return %cost;
}

# $n requests, one after the other, on keepalive connections (reopened
# when the front closes one, after keepalive_requests).
sub client ($hosts, $n) {
	my @h = $hosts == 1 ? ('localhost') : @HOSTS16;
	my $s;
	for my $k (0 .. $n - 1) {
		$s //= IO::Socket::INET->new(PeerAddr => "127.0.0.1:$front_port",
			Timeout => 30) or die "connect: $!\n";
		my $host = $h[ $k % @h ];
		print $s "GET / HTTP/1.1\r\nHost: $host\r\n\r\n";
		my $head = '';
		while ($head !~ /\r\n\r\n/) {
			my $got = sysread($s, $head, 4096, length $head);
			die "front closed the connection\n" unless $got;
		}
		my ($len) = $head =~ /^Content-Length:\s*(\d+)/mi;
		my ($h, $body) = split /\r\n\r\n/, $head, 2;
		while (length($body) < ($len // 0)) {
			sysread($s, $body, 4096, length $body) or last;
		}
		die "unexpected response: $h\n" unless $h =~ m{^HTTP/1\.1 200};
		undef $s if $h =~ /^Connection:\s*close/mi;
	}
}

# wrk -c$WRK for $seconds; returns the requests completed.
sub wrk ($hosts, $seconds) {
	my $lua = "$tmp/hosts$hosts.lua";
	unless (-f $lua) {
		my @h = $hosts == 1 ? ('localhost') : @HOSTS16;
		my $list = join ', ', map { "\"$_\"" } @h;
		write_file($lua, "local hosts = { $list }\nlocal reqs = {}\nlocal i = 0\n"
			. "init = function(args)\n  for k, h in ipairs(hosts) do reqs[k] = wrk.format(nil, nil, { Host = h }) end\nend\n"
			. "request = function()\n  i = i % #reqs + 1\n  return reqs[i]\nend\n");
	}
	my $out = `wrk -t1 -c$WRK -d${seconds}s --timeout 10s -s $lua http://127.0.0.1:$front_port/ 2>&1`;
	my ($n) = $out =~ /(\d+) requests in/ or die "wrk failed:\n$out";
	return $n;
}

sub start_nginx ($name, $port, $wrap, $conf) {
	my $prefix = "$tmp/$name";
	mkdir $prefix or die "mkdir $prefix: $!\n";
	mkdir "$prefix/logs" or die "mkdir $prefix/logs: $!\n";
	write_file("$prefix/nginx.conf",
		"daemon off;\npid $prefix/logs/nginx.pid;\n$conf");
	my $pid = spawn("nginx $name", "$prefix/logs/stderr.log",
		'/bin/sh', '-c', 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"', 'sh',
		@$wrap, $NGINX, '-p', "$prefix/", '-c', "$prefix/nginx.conf");
	wait_port($port, "nginx $name",
		"$prefix/logs/stderr.log", "$prefix/logs/error.log");
	return $pid;
}
