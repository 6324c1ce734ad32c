#!/usr/bin/perl
#
# make demo: the failure this module exists for, shown on a real Apache.
#
# Apache with mpm-itk switches a connection's process to the vhost's user
# (AssignUserID) on the first request.  It cannot switch back, so when a
# kept-alive connection is then used for another vhost, itk closes it.
# nginx's stock keepalive cache is keyed by server address only and hands a
# connection that served a.demo to a request for b.demo: GETs are retried
# on a new connection (an [error] line each), POSTs are not idempotent and
# are answered 502.
#
# This script starts one Apache (mpm-itk, three vhosts, each its own user)
# and two nginx from objs/, both loading the module:
#
#   shared   keepalive 32;                                 (stock behaviour)
#   sliced   keepalive 32 slice_key=$host slice_conn=8;
#
# sends the same mix of GETs and POSTs over the three vhosts through each,
# and prints what happened, with the module's status page (keepalive_status)
# before and after the sliced run, checked against Apache's own log.  Exit status 0 when the sliced instance had no
# failed request and reused more than 90% of its upstream connections.
#
# Run as root: perl demo/demo.pl (from anywhere; objs/ is found beside demo/)
# DEMO_KEEP=1 keeps the temporary directory (configs, logs) for a look.
# DEMO_REQUESTS and DEMO_CLIENTS change the traffic (3000 requests, 8 clients).

use v5.36;
use strict;
use warnings;

use FindBin;
use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use POSIX ();
use Time::HiRes qw(time sleep);

use lib "$FindBin::Bin/lib";
use Demo::Processes qw(objs find_program scratch_dir spawn track untrack
	wait_port free_ports write_file);

my $REQUESTS = $ENV{DEMO_REQUESTS} // 3000;
my $CLIENTS  = $ENV{DEMO_CLIENTS}  // 8;
my $TIMEOUT  = 10;    # seconds to wait for any single answer

# Three name-based vhosts, each run by a different system user that exists
# on every Debian system, so that itk really has to change uid/gid.
my @VHOSTS = (
	[ 'a.demo', 'www-data', 'www-data' ],
	[ 'b.demo', 'nobody',   'nogroup' ],
	[ 'c.demo', 'daemon',   'daemon' ],
);
my @HOSTS = map { $_->[0] } @VHOSTS;

$| = 1;
$SIG{PIPE} = 'IGNORE';
# die() unwinds to the END block of Demo::Processes, which stops what we
# started (forked client workers leave with POSIX::_exit).
$SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

###############################################################################
# Preconditions.

my ($NGINX, $SO) = objs();
$> == 0
	or die "run as root: mpm-itk has to switch to the vhosts' users\n";

my $APACHE = find_program('apache2', '/usr/sbin')
	or die "apache2 not found: apt-get install apache2 libapache2-mpm-itk\n";
my $MODDIR = '/usr/lib/apache2/modules';
-f "$MODDIR/mpm_itk.so"
	or die "$MODDIR/mpm_itk.so not found: apt-get install libapache2-mpm-itk\n";

for my $v (@VHOSTS) {
	defined getpwnam($v->[1]) && defined getgrnam($v->[2])
		or die "user $v->[1] / group $v->[2] missing\n";
}

# The vhosts' users must be able to reach their document roots in here.
my $tmp = scratch_dir('nginx-keepalive-slice-demo', 'DEMO_KEEP');
chmod 0755, $tmp or die "chmod $tmp: $!\n";

###############################################################################
# Apache.

my %port;
@port{qw(apache_shared apache_sliced nginx_shared nginx_sliced)} = free_ports(4);

start_apache();
check_apache();

###############################################################################
# nginx: same configuration but for the keepalive line, each instance with
# its own Apache port so that Apache's access log tells them apart.

my @INSTANCES = (
	{
		name  => 'shared',
		title => 'one idle cache per server, as stock nginx',
		ka    => 'keepalive 32;',
		port  => $port{nginx_shared},
		up    => $port{apache_shared},
	},
	{
		name  => 'sliced',
		title => 'one idle cache per server and $host',
		ka    => 'keepalive 32 slice_key=$host slice_conn=8;',
		port  => $port{nginx_sliced},
		up    => $port{apache_sliced},
	},
);

start_nginx($_) for @INSTANCES;

###############################################################################
# The same traffic through both, one after the other so that they do not
# compete for the CPU.

my $apache_log = "$tmp/apache/access.log";

printf "\n%d requests per instance from %d concurrent keep-alive clients:\n"
	. "GET / and (one in three) POST /post, over %s\n",
	$REQUESTS, $CLIENTS, join(', ', @HOSTS);

my ($shared, $sliced) = @INSTANCES;

for my $inst (@INSTANCES) {
	$inst->{log_offset} = -s $apache_log // 0;
	show_status($inst, 'before the run') if $inst == $sliced;
	run_traffic($inst);
}

for my $inst (@INSTANCES) {
	collect_stats($inst);
	print_table($inst);
}

show_status($sliced, 'after the run');
show_scrape($sliced);

my $ok = $sliced->{failed} == 0 && $sliced->{wrong} == 0
	&& $sliced->{reuse} > 0.90;

print "\n";
if ($ok && $shared->{failed} > 0) {
	printf "verdict: one cache per server failed %d of %d requests (%s);"
		. " sliced by \$host failed none, %.1f%% connection reuse.\n",
		$shared->{failed}, $REQUESTS, failure_kinds($shared),
		100 * $sliced->{reuse};
} elsif ($ok) {
	printf "verdict: sliced instance OK (no failures, %.1f%% reuse), but the"
		. " stock-style instance did not fail this time: the problem did"
		. " not reproduce.\n", 100 * $sliced->{reuse};
} else {
	printf "verdict: FAILED: the sliced instance had %d failed requests,"
		. " %d wrong bodies and %.1f%% reuse (expected 0, 0 and more than"
		. " 90%%).\n", $sliced->{failed}, $sliced->{wrong},
		100 * $sliced->{reuse};
	print "         logs: $tmp (kept)\n";
	$ENV{DEMO_KEEP} = 1;
}

exit($ok ? 0 : 1);

###############################################################################
# Apache.

sub start_apache {
	my $dir = "$tmp/apache";
	mkdir $dir or die "mkdir $dir: $!\n";

	my $vhosts = '';
	for my $v (@VHOSTS) {
		my ($host, $user, $group) = @$v;
		my $docroot = "$tmp/www/$host";
		mkpath_world($docroot);
		write_file("$docroot/index.html", "hello from $host\n");
		chmod 0644, "$docroot/index.html";

		# mod_reflector answers POST /post with 200 and the request body,
		# served by the vhost's user like anything else under itk (a static
		# file would answer POST with 405).
		$vhosts .= <<"EOF";
<VirtualHost *:*>
    ServerName $host
    DocumentRoot $docroot
    AssignUserID $user $group
    <Location /post>
        SetHandler reflector
    </Location>
</VirtualHost>
EOF
	}

	# Not the system configuration and not systemd: everything Apache
	# needs is in here.  Modules are loaded by absolute path.
	# - KeepAlive as an Apache in production has it: the idle
	#   connections nginx caches must stay open on Apache's side.
	# - itk forks a process per connection, and the prefork child it forks
	#   from stays busy as long as that connection is kept alive.  Both
	#   nginx caches (up to 32 idle connections each) hold children, and
	#   prefork adds missing ones only slowly (1, 2, 4, ... per second):
	#   start with enough for both so that neither run waits for them.
	# - LimitUIDRange/LimitGIDRange: itk restricts setuid()/setgid() with
	#   seccomp to these ranges; they must cover the vhosts' users
	#   (nobody is 65534).
	# - The log tells the nginx instances apart by Apache's port (%{local}p)
	#   and connections apart by itk's per-connection process id and the
	#   client port (%P, %{remote}p).
	write_file("$dir/httpd.conf", <<"EOF");
ServerRoot $dir
ServerName localhost
DefaultRuntimeDir $dir
PidFile $dir/httpd.pid
ErrorLog $dir/error.log
LogLevel warn

LoadModule mpm_prefork_module $MODDIR/mod_mpm_prefork.so
LoadModule mpm_itk_module     $MODDIR/mpm_itk.so
LoadModule authz_core_module  $MODDIR/mod_authz_core.so
LoadModule mime_module        $MODDIR/mod_mime.so
LoadModule dir_module         $MODDIR/mod_dir.so
LoadModule reflector_module   $MODDIR/mod_reflector.so

User www-data
Group www-data

Listen 127.0.0.1:$port{apache_shared}
Listen 127.0.0.1:$port{apache_sliced}

KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30

StartServers 80
MinSpareServers 16
MaxSpareServers 100
ServerLimit 160
MaxRequestWorkers 160
MaxConnectionsPerChild 0

LimitUIDRange 0 65534
LimitGIDRange 0 65534

TypesConfig /etc/mime.types
DirectoryIndex index.html

LogFormat "%{local}p %P %{remote}p %v %m %U %>s" demo
CustomLog $dir/access.log demo

<Directory />
    Require all granted
</Directory>

$vhosts
EOF

	spawn('apache', "$dir/stderr.log",
		$APACHE, '-f', "$dir/httpd.conf", '-DFOREGROUND');

	for my $p ($port{apache_shared}, $port{apache_sliced}) {
		wait_port($p, 'apache', "$dir/error.log", "$dir/stderr.log");
	}
}

# Apache must answer every vhost on both ports, and itk must really close
# a kept-alive connection that switches vhost: without that there is
# nothing to demonstrate.
sub check_apache {
	for my $p ($port{apache_shared}, $port{apache_sliced}) {
		for my $host (@HOSTS) {
			for my $req ([ GET => '/', undef ], [ POST => '/post', "x=$host" ]) {
				my ($method, $path, $body) = @$req;
				my $s = connect_port($p) or die "apache: connect $p: $!\n";
				my ($status, $got) = exchange($s, $method, $host, $path, $body);
				my $want = $body // "hello from $host\n";
				defined $status && $status eq '200' && $got eq $want
					or die "apache: $method $host$path on port $p: "
						. ($status // 'no answer')
						. ", see $tmp/apache/error.log\n";
			}
		}
	}

	my $s = connect_port($port{apache_shared}) or die "apache: connect: $!\n";
	my ($first) = exchange($s, 'GET', $HOSTS[0], '/');
	my ($second) = exchange($s, 'GET', $HOSTS[1], '/');
	($first // '') eq '200'
		or die "apache: GET $HOSTS[0]: " . ($first // 'no answer') . "\n";
	!defined $second
		or die "apache: mpm-itk answered $HOSTS[1] ($second) on a connection"
			. " that had served $HOSTS[0] instead of closing it:"
			. " the failure would not reproduce (is mpm-itk loaded, is"
			. " Apache started as root?)\n";

	print "apache $APACHE with mpm-itk: vhosts "
		. join(', ', map { "$_->[0] ($_->[1])" } @VHOSTS) . "\n"
		. "  checked: a kept-alive connection that served $HOSTS[0] is closed"
		. " when asked for $HOSTS[1]\n";
}

###############################################################################
# nginx.

sub start_nginx ($inst) {
	my $prefix = "$tmp/nginx-$inst->{name}";
	mkdir $prefix or die "mkdir $prefix: $!\n";
	mkdir "$prefix/logs" or die "mkdir $prefix/logs: $!\n";
	$inst->{prefix} = $prefix;

	# user root: the default worker user (nobody) could not write here.
	# $upstream_status shows retries: "502, 200" is a GET that failed on a
	# cached connection and succeeded on a new one.
	write_file("$prefix/nginx.conf", <<"EOF");
daemon off;
user root;
worker_processes 4;
pid $prefix/logs/nginx.pid;
error_log $prefix/logs/error.log info;

load_module $SO;

events {
    worker_connections 1024;
}

http {
    log_format demo '\$host \$request_method \$status "\$upstream_status"';
    access_log $prefix/logs/access.log demo;

    upstream apache {
        server 127.0.0.1:$inst->{up};
        $inst->{ka}
    }

    server {
        listen 127.0.0.1:$inst->{port};

        # the module's counters; access control is nginx's own
        location = /keepalive-status {
            keepalive_status;
            allow 127.0.0.1;
            deny all;
        }

        location / {
            proxy_pass http://apache;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
        }
    }
}
EOF

	spawn("nginx-$inst->{name}", "$prefix/logs/stderr.log",
		$NGINX, '-p', "$prefix/", '-c', "$prefix/nginx.conf");
	wait_port($inst->{port}, "nginx ($inst->{name})",
		"$prefix/logs/error.log", "$prefix/logs/stderr.log");

	print "nginx $inst->{name}: $inst->{ka}\n";
}

###############################################################################
# Traffic: $CLIENTS forked workers, each on its own keep-alive connection to
# nginx, request $i going to worker $i % $CLIENTS.  Each worker writes one
# line per request to its own file.

sub request_for ($i) {
	my $host = $HOSTS[ $i % @HOSTS ];
	# One in three is a POST, and every vhost gets its share of them.
	return int($i / @HOSTS) % 3 == 2
		? ('POST', $host, '/post', "n=$i&vhost=$host")
		: ('GET', $host, '/', undef);
}

sub run_traffic ($inst) {
	my $start = time;
	my @pids;

	for my $w (0 .. $CLIENTS - 1) {
		my $pid = fork() // die "fork: $!\n";
		if ($pid == 0) {
			$SIG{INT} = $SIG{TERM} = 'DEFAULT';
			# A backend that stopped answering must not keep us forever.
			$SIG{ALRM} = sub { die "client $w: out of time\n" };
			alarm(90 + int($REQUESTS / 50));
			my $ok = eval { client_worker($inst, $w); 1 };
			warn $@ unless $ok;
			POSIX::_exit($ok ? 0 : 1);
		}
		push @pids, $pid;
		track($pid, "client $w");    # stopped too if we are interrupted
	}

	my $bad = 0;
	for my $pid (@pids) {
		waitpid($pid, 0);
		$bad++ if $?;
		untrack($pid);
	}
	die "$bad client workers failed\n" if $bad;

	$inst->{elapsed} = time - $start;
}

sub client_worker ($inst, $w) {
	open my $out, '>', "$tmp/results-$inst->{name}-$w"
		or die "open: $!\n";
	my $s;

	for (my $i = $w; $i < $REQUESTS; $i += $CLIENTS) {
		my ($method, $host, $path, $body) = request_for($i);

		$s //= connect_port($inst->{port})
			or die "connect to nginx $inst->{name}: $!\n";
		my ($status, $got, $keep) = exchange($s, $method, $host, $path, $body);

		# No answer at all counts as a failure too (status 000).
		$status //= '000';
		my $want = $body // "hello from $host\n";
		my $wrong = $status =~ /^2/ && $got ne $want ? 1 : 0;

		print $out "$method $host $status $wrong\n";
		undef $s unless $keep && $status ne '000';
	}

	close $out or die "close: $!\n";
}

###############################################################################
# Results.

sub collect_stats ($inst) {
	my $n = $inst->{name};

	# What the clients saw.
	my %failed_by;
	$inst->{requests} = $inst->{failed} = $inst->{wrong} = 0;
	for my $w (0 .. $CLIENTS - 1) {
		open my $in, '<', "$tmp/results-$n-$w" or die "open: $!\n";
		while (<$in>) {
			my ($method, $host, $status, $wrong) = split;
			$inst->{requests}++;
			$inst->{wrong} += $wrong;
			next if $status =~ /^2/;
			$inst->{failed}++;
			$failed_by{"$status to $method"}++;
		}
	}
	$inst->{failed_by} = \%failed_by;

	# nginx: [error] lines by kind, and requests it had to retry.
	my %errors;
	open my $el, '<', "$inst->{prefix}/logs/error.log" or die "open: $!\n";
	while (<$el>) {
		next unless /\[error\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client:|$)/;
		my $kind = $1;
		$kind =~ s/ while .*//;
		$errors{$kind}++;
	}
	$inst->{errors} = \%errors;

	$inst->{retried} = 0;
	open my $al, '<', "$inst->{prefix}/logs/access.log" or die "open: $!\n";
	while (<$al>) {
		$inst->{retried}++ if /"[^"]*,[^"]*"$/;
	}

	# Apache: requests it answered and distinct connections they came on,
	# for this instance's port, from this instance's run on.
	my %conns;
	$inst->{upstream_requests} = 0;
	open my $ap, '<', $apache_log or die "open $apache_log: $!\n";
	seek $ap, $inst->{log_offset}, 0;
	while (<$ap>) {
		my ($port, $pid, $rport) = split;
		next unless $port == $inst->{up};
		$inst->{upstream_requests}++;
		$conns{"$pid:$rport"} = 1;
	}
	$inst->{opened} = keys %conns;

	# The module's own account of the same traffic.
	$inst->{status} = status_page($inst);
	$inst->{reuse} = $inst->{upstream_requests}
		? 1 - $inst->{opened} / $inst->{upstream_requests}
		: 0;
}

sub sum_values ($h) {
	my $n = 0;
	$n += $_ for values %$h;
	return $n;
}

# The status page of an instance: its upstream's numbers (JSON), or the
# page as it comes with $format = 'prometheus'.
sub status_page ($inst, $format = 'json') {
	my $s = connect_port($inst->{port}) or return;
	my $query = $format eq 'json' ? '' : "?format=$format";
	my ($status, $body) = exchange($s, 'GET', 'localhost',
		"/keepalive-status$query");
	return unless ($status // '') eq '200';
	return $body unless $format eq 'json';
	my $json = eval { JSON::PP::decode_json($body) } or return;
	return $json->{upstreams}{apache};
}

sub show_status ($inst, $when) {
	my $s = connect_port($inst->{port}) or die "connect: $!\n";
	my ($status, $body) = exchange($s, 'GET', 'localhost', '/keepalive-status');
	($status // '') eq '200'
		or die "nginx $inst->{name}: /keepalive-status: " . ($status // 'no answer') . "\n";
	printf "\nstatus page of nginx %s %s (GET /keepalive-status):\n%s",
		$inst->{name}, $when, $body;
}

# The Prometheus scrape, without the zero samples of the reasons.
sub show_scrape ($inst) {
	my $text = status_page($inst, 'prometheus')
		// die "nginx $inst->{name}: no Prometheus scrape\n";
	my @lines = grep { !/^#/ && !/reason="[^"]*"\} 0$/ } split /\n/, $text;
	printf "\nits Prometheus scrape (GET /keepalive-status?format=prometheus),"
		. " reasons at 0 left out:\n%s\n", join("\n", @lines);
}

sub failure_kinds ($inst) {
	my $f = $inst->{failed_by};
	return join ', ', map { "$_: $f->{$_}" }
		sort { $f->{$b} <=> $f->{$a} || $a cmp $b } keys %$f;
}

sub print_table ($inst) {
	my $errors = $inst->{errors};
	my @kinds = sort { $errors->{$b} <=> $errors->{$a} || $a cmp $b }
		keys %$errors;
	my $nerr = 0;
	$nerr += $_ for values %$errors;

	my @rows = (
		[ 'requests', $inst->{requests} ],
		[ 'non-2xx responses', $inst->{failed},
			$inst->{failed} ? failure_kinds($inst) : '' ],
		[ 'upstream errors logged', $nerr,
			@kinds ? "$errors->{$kinds[0]} \"$kinds[0]\"" : '' ],
		(map { [ '', '', "$errors->{$_} \"$_\"" ] } @kinds[ 1 .. $#kinds ]),
		[ 'requests retried by nginx', $inst->{retried} ],
		[ 'upstream requests', $inst->{upstream_requests},
			'answered by Apache' ],
		[ 'upstream connections opened', $inst->{opened} ],
		[ 'reuse ratio', sprintf('%.1f%%', 100 * $inst->{reuse}),
			'1 - connections / upstream requests' ],
		[ 'requests per second',
			sprintf('%.0f', $inst->{requests} / $inst->{elapsed}) ],
	);
	push @rows, [ 'wrong response bodies', $inst->{wrong} ] if $inst->{wrong};
	if (my $u = $inst->{status}) {
		my $nk = join ', ', map { "$_ $u->{not_kept}{$_}" }
			grep { $u->{not_kept}{$_} } sort keys %{$u->{not_kept}};
		push @rows,
			[ 'keepalive_status: missed', $u->{missed},
				'tries that opened a connection' ],
			[ '                  reused', $u->{reused},
				'tries on a cached connection' ],
			[ '                  not kept', sum_values($u->{not_kept}), $nk ];
	}

	printf "\n%s: %s  (%s)\n", $inst->{name}, $inst->{ka}, $inst->{title};
	for my $r (@rows) {
		my ($label, $value, $note) = @$r;
		my $line = sprintf "  %-28s %7s", $label, $value;
		$line .= "  $note" if defined $note && length $note;
		print "$line\n";
	}
}

###############################################################################
# HTTP client: one request, one response, on a blocking socket with a
# timeout.  Returns (status, body, keep-alive), or nothing when the peer
# closed or reset the connection before a complete response.

sub exchange ($s, $method, $host, $path, $body = undef) {
	my $req = "$method $path HTTP/1.1\r\nHost: $host\r\n";
	$req .= "Content-Type: application/x-www-form-urlencoded\r\n"
		. "Content-Length: " . length($body) . "\r\n" if defined $body;
	$req .= "\r\n" . ($body // '');

	defined syswrite($s, $req) or return;

	my $buf = '';
	my $read = sub {
		IO::Select->new($s)->can_read($TIMEOUT) or return 0;
		return sysread($s, $buf, 65536, length $buf) // 0;
	};

	my $end;
	until (($end = index($buf, "\r\n\r\n")) >= 0) {
		$read->() or return;
	}
	my $head = substr($buf, 0, $end);
	$buf = substr($buf, $end + 4);

	my ($status) = $head =~ m{^HTTP/1\.[01] (\d{3})} or return;
	my $keep = $head !~ /^Connection:\s*close/mi;

	if ($head =~ /^Content-Length:\s*(\d+)/mi) {
		my $len = $1;
		while (length $buf < $len) {
			$read->() or return;
		}
		return ($status, substr($buf, 0, $len), $keep);
	}

	if ($head =~ /^Transfer-Encoding:\s*chunked/mi) {
		my $out = '';
		while (1) {
			my ($line, $size);
			until (($line, $size) = $buf =~ /^(([0-9a-fA-F]+)[^\r]*\r\n)/) {
				$read->() or return;
			}
			$size = hex $size;
			my $need = length($line) + $size + 2;
			while (length $buf < $need) {
				$read->() or return;
			}
			$out .= substr($buf, length $line, $size);
			$buf = substr($buf, $need);
			# Trailers are not expected from nginx or Apache here.
			return ($status, $out, $keep) if $size == 0;
		}
	}

	# Neither: the body ends with the connection.
	1 while $read->();
	return ($status, $buf, 0);
}

###############################################################################
# Sockets and files.

sub connect_port ($port) {
	return IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port",
		Timeout => $TIMEOUT);
}

sub mkpath_world ($dir) {
	my $path = '';
	for my $part (grep { length } split m{/}, substr($dir, length $tmp)) {
		$path .= "/$part";
		mkdir "$tmp$path" or $!{EEXIST} or die "mkdir $tmp$path: $!\n";
		chmod 0755, "$tmp$path";
	}
}
