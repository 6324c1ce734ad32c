#!/usr/bin/perl

# Tests for upstream keepalive: reload and shutdown under load.  While
# forked keep-alive clients send requests (2ms apart), nginx is reloaded
# (HUP) ten times, then stopped (QUIT).  No client request fails; after
# each reload the old worker finishes the request it was serving, keeps no
# new idle connection, closes its idle upstream connections and exits
# right after its last request (not after keepalive_timeout, 30s); the
# file descriptors of the new workers and of the master stay the same from
# reload to reload.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Time::HiRes qw/ time sleep /;

use Test::Nginx qw/ :DEFAULT http_start http_end /;
use Test::Nginx::Backend qw/ http_backend backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ status_of header_of slice_module /;
use Test::Nginx::Load qw/ load_start load_stop master_pid worker_pids
	proc_alive proc_fds /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $ours = slice_module();

plan(skip_all => 'no /proc') unless -d '/proc/self/fd';

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# the load requests (port 8080) log at "notice" into their own file (their
# debug log would be tens of megabytes); the requests this file follows one
# by one (/slow/, port 8082), and nginx itself, log at debug into error.log

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 8;
        keepalive_timeout 30s;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    add_header X-Worker $pid always;
    access_log off;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        error_log load.log notice;
        keepalive_requests 100000;

        location / {
            proxy_pass http://u/;
        }
    }

    server {
        listen       127.0.0.1:8082;
        server_name  localhost;

        location /slow/ {
            proxy_pass http://u/sleep/1000/;
        }
    }
}

EOF

my $blog = $t->testdir() . '/backend.log';

$t->run_daemon(\&http_backend, port(8081), log => $blog);
$t->run()->waitforsocket('127.0.0.1:' . port(8081));

$t->plan(21);

###############################################################################

my $reloads = 10;
my $clients = 3;

# living workers not shutting down
sub workers {
	my ($t) = @_;
	my %w = worker_pids($t);
	return grep { $w{$_} !~ /shutting down/ } keys %w;
}

# waits until $code returns true, at most $timeout seconds
sub poll {
	my ($code, $timeout) = @_;
	my $deadline = time() + $timeout;
	while (time() < $deadline) {
		return 1 if $code->();
		sleep 0.01;
	}
	return $code->();
}

# nginx creates its pid file before it writes the number into it: a read
# in between (seen on a loaded machine) finds no master and no workers.
poll(sub { defined master_pid($t) }, 5);
my $master = master_pid($t);
my @first = workers($t);

my $load = load_start($t, clients => $clients, uri => '/load/%c/%n',
	pause => 0.002, max_seconds => 90);

sleep 0.3;

my (@gen, @slow, %exit, %fds, %master_fds);

for my $i (1 .. $reloads) {
	my @old = workers($t);

	# a request in flight at the reload (for a second: the reload itself
	# may take hundreds of milliseconds on a busy machine): the old worker
	# must finish it, and must not keep its connection afterwards

	my $s = http_start("GET /slow/$i HTTP/1.0\r\nHost: localhost\r\n\r\n",
	PeerAddr => '127.0.0.1:' . port(8082));
	backend_log_wait($blog, qr{ uri=/sleep/1000/$i$}, 1);

	$t->reload();

	my %old = map { $_ => 1 } @old;
	my @new;
	poll(sub { @new = grep { !$old{$_} } workers($t); @new }, 5);

	my $r = $s ? http_end($s) : undef;
	my $done = time();
	push @slow, {
		status => status_of($r) // 'none',
		worker => header_of($r, 'X-Worker') // 'none',
		time => $done,
	};

	# the old workers exit: the time each is first seen gone

	my $gone = poll(sub {
		for my $p (grep { !$exit{$_} } @old) {
			$exit{$p} = time() unless proc_alive($p);
		}
		!grep { !$exit{$_} } @old;
	}, 10);

	push @gen, { old => \@old, new => \@new };

	# an old worker still there would wait for keepalive_timeout (30s):
	# no point in going on
	last unless $gone;

	# the new worker under load (since the reload), once the old one is
	# gone

	$fds{$_} = proc_fds($_) for @new;
	$master_fds{$i} = proc_fds($master);
}

my $res = load_stop($load);

# graceful shutdown with a request in flight and idle connections cached

my @last = workers($t);
my $s = http_start("GET /slow/quit HTTP/1.0\r\nHost: localhost\r\n\r\n",
	PeerAddr => '127.0.0.1:' . port(8082));
backend_log_wait($blog, qr{ uri=/sleep/1000/quit$}, 1);

my $start = time();
$t->stop();
my $stopped = time() - $start;

my $r = $s ? http_end($s) : undef;

###############################################################################

# the load

diag(sprintf('load: %d requests, %d ok, %d failed, %d retried on a '
	. 'closed keep-alive connection', @$res{qw/ requests ok failed retried /}));
diag("load: $_") for @{$res->{errors}};

is($res->{failed}, 0, 'load: no failed requests');
cmp_ok($res->{ok}, '>=', 100, 'load: requests served');

my @all = (@first, map { @{$_->{new}} } @gen);
diag('load: requests served by each worker generation: '
	. join(' ', map { $res->{served}{$_} // 0 } @all));

is(scalar(grep { $res->{served}{$_} } @all), $reloads + 1,
	'load: every worker generation served load requests');

is(scalar(grep { @{$_->{new}} == 1 } @gen), $reloads,
	'reload: a new worker each time');

# the requests in flight at each reload

is(join(',', map { $_->{status} } @slow), join(',', ('200') x $reloads),
	'reload: requests in flight completed');
is(scalar(grep { $slow[$_ - 1]{worker} eq ($gen[$_ - 1]{old}[0] // '') }
	1 .. @gen),
	$reloads, 'reload: by the old worker');

# the old workers exit right after their last request, within a second
# (measured: a few ms): with an idle upstream connection
# left open they would wait for keepalive_timeout (30s)

my @delay;
for my $i (1 .. @gen) {
	my $p = $gen[$i - 1]{old}[0];
	my $last = $slow[$i - 1]{time};
	$last = $res->{last}{$p}
		if ($res->{last}{$p} // 0) > $last;
	push @delay, defined $exit{$p} ? $exit{$p} - $last : 999;
}

diag('reload: old worker exit after its last request (s): '
	. join(' ', map { sprintf '%.3f', $_ } @delay));

is(scalar(grep { $_ < 1 } @delay), $reloads,
	'reload: old workers exited within 1s of their last request');

# debug log of each old worker after it began shutting down: no
# connection kept, idle ones closed

my $e = $t->read_file('error.log');

my ($freed, $saved, $handled, $exiting) = (0, 0, 0, 0);

for my $g (@gen) {
	my $p = $g->{old}[0];

	my $from = index($e, " $p#$p: gracefully shutting down\n");
	next if $from < 0;

	for (grep { index($_, " $p#$p: ") >= 0 }
		split /\n/, substr($e, $from))
	{
		$freed++ if /free keepalive (?:slice )?peer$/;
		$saved++ if /free keepalive (?:slice )?peer: saving/;
		$handled++ if /: keepalive (?:slice )?close handler$/;
		$exiting++ if /free keepalive slice peer: not saving: exiting$/;
	}
}

cmp_ok($freed, '>=', $reloads, 'reload: connections freed while exiting');
is($saved, 0, 'reload: none kept while exiting');
cmp_ok($handled, '>=', 1, 'reload: idle connections closed while exiting');

SKIP: {
skip 'keepalive_slice module not loaded', 1 unless $ours;

cmp_ok($exiting, '>=', $reloads, 'module: not saving: exiting');

}

# file descriptors: the same from reload to reload

my @new = map { $_->{new}[0] } @gen;
my @f = map { $fds{$_} // { total => -1, listen => -1, other => -1,
	socket => -1 } } @new;

diag('new workers: fds (listen/other/socket): '
	. join(' ', map { "$_->{listen}/$_->{other}/$_->{socket}" } @f));
diag('master: fds after each reload: '
	. join(' ', map { $master_fds{$_}{total} // -1 } 1 .. @gen));

is(scalar(grep { $_->{listen} == $f[0]{listen} } @f), $reloads,
	'fds: listening sockets the same in each new worker');
is(scalar(grep { $_->{other} == $f[0]{other} } @f), $reloads,
	'fds: files, pipes, epoll the same in each new worker');
cmp_ok($f[0]{other}, '>', 0, 'fds: counted');

# the other sockets: client connections, upstream connections (busy or
# idle), channels; bounded by the load, whatever happened before

is(scalar(grep { $_->{socket} >= 0 && $_->{socket} <= 2 * $clients + 8 + 4 }
	@f), $reloads, 'fds: connections bounded in each new worker');

is(scalar(grep { ($master_fds{$_}{total} // -1) == $master_fds{1}{total} }
	1 .. @gen), $reloads, 'fds: master the same after each reload');

# QUIT: the request in flight completes, nginx exits at once, every
# upstream connection is closed

like($r, qr/^HTTP\/1.1 200 /, 'quit: request in flight completed');
ok($stopped < 10, 'quit: nginx exited without waiting for keepalive_timeout')
	or diag("stop took $stopped seconds");
ok(!proc_alive($master) && !(grep { proc_alive($_) } @last),
	'quit: master and worker gone');

my $accepted = backend_log_count($blog, qr/^accept /);
is(backend_log_wait($blog, qr/^close /, $accepted), $accepted,
	'quit: all upstream connections closed');

my $l = $t->read_file('load.log');
unlike($l, qr/\[(?:alert|crit|emerg|error)\]/, 'load log: no errors');

###############################################################################
