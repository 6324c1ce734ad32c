#!/usr/bin/perl

# Tests for idle connections shared between workers, when workers go: a
# worker killed with SIGKILL under load costs only the requests it had in
# flight, and its idle connections are never taken by another worker
# (their entries are dropped, or freed by the worker that replaces it);
# ten reloads under load lose no request.  Four workers; the backend
# resets any connection that gets a request before it answered the one
# before (two workers on one connection).

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend backend_log_count /;
use Test::Nginx::Keepalive qw/ reload_wait slice_module /;
use Test::Nginx::Load qw/ load_start load_stop worker_pids /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'the module is not loaded') unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 4;

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

    # the requests' debug log apart: error.log, which the test library
    # scans at the end, stays small
    error_log share.log debug;

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        keepalive_requests 100000;

        location / {
            proxy_pass http://u/;
        }

        location /status {
            keepalive_status;
        }
    }
}

EOF

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/u.log", strict => 1);
$t->run();
$t->waitforsocket('127.0.0.1:' . port(8081));

# The master reports the killed worker: an [alert] expected here, any
# other checked below.
if ($t->can('skip_errors_check')) {
	$t->skip_errors_check('alert', qr/exited on signal 9/);
} else {
	$t->todo_alerts();
}

$t->plan(10);

# Lines of error.log and share.log from the byte offsets in $from (a
# hash by name, from offsets()) on that match $re, read line by line.
sub log_lines {
	my ($from, $re) = @_;
	my @lines;
	for my $name (qw/ error.log share.log /) {
		open my $fh, '<', "$d/$name" or next;
		seek $fh, $from->{$name} // 0, 0;
		while (my $line = <$fh>) {
			push @lines, $line if $line =~ $re;
		}
		close $fh;
	}
	return @lines;
}

sub offsets {
	return { map { $_ => -s "$d/$_" // 0 } qw/ error.log share.log / };
}

###############################################################################

my $CLIENTS = 6;

# SIGKILL: a worker that holds idle connections dies.

my $load = load_start($t, clients => $CLIENTS, uri => '/sleep/2/%c/%n',
	max_seconds => 20, pause => 0.005);
sleep 1;

my @workers = worker_pids($t);
my $victim = $workers[0];
my $offset = offsets();
kill 'KILL', $victim;
sleep 1.5;

my $res = load_stop($load);

cmp_ok($res->{ok}, '>', 50, 'kill: requests served');
cmp_ok($res->{failed}, '<=', $CLIENTS,
	'kill: failed requests no more than those in flight');
is(scalar(log_lines($offset, qr/took connection fd \d+ of worker pid $victim /)), 0,
	'kill: no connection of the killed worker taken');
cmp_ok(scalar(log_lines($offset, qr/worker pid $victim gone/)), '>', 0,
	'kill: its entries dropped or freed');

# Ten reloads under load.

$load = load_start($t, clients => $CLIENTS, uri => '/sleep/2/%c/%n',
	max_seconds => 60, pause => 0.005);
sleep 0.5;

my $reloaded = 0;
for (1 .. 10) {
	$reloaded++ if reload_wait($t);
	sleep 0.2;
}

$res = load_stop($load);

is($reloaded, 10, 'reloads: all done');
cmp_ok($res->{ok}, '>', 50, 'reloads: requests served');
is($res->{failed}, 0, 'reloads: no request lost')
	or diag(join "\n", @{$res->{errors}}[0 .. 4]);

is(backend_log_count("$d/u.log", qr/^overlap/), 0,
	'no connection used by two workers at once');

cmp_ok(scalar(log_lines({}, qr/keepalive share: worker pid \d+ took connection/)),
	'>', 0, 'connections taken from other workers');
is(join('', log_lines({}, qr/\[alert\]/)) =~ s/.*exited on signal 9\n//gr, '',
	'no alert but the killed worker\'s');

###############################################################################
