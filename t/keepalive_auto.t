#!/usr/bin/perl

# Tests for "keepalive auto": a burst's connections are kept (growth, seen
# as the backend's connection numbers and the idle gauge), the idle ones
# no request uses are closed by half each decay interval down to what the
# load uses (decay, seen as the backend's closes and the status page's
# "decay" count), the ceiling max= caps the cache, the status page and
# Prometheus show the estimate and the ceiling, and bad values fail
# "nginx -t" with an [emerg] naming them.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use JSON::PP qw/ decode_json /;
use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count
	backend_log_lines /;
use Test::Nginx::Keepalive qw/ parallel_get status_of nginx_test_config
	slice_module body_of prometheus_samples /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# One worker. u_grow and u_max decay once an hour: within the test their
# idle connections are what free peer kept. u_decay decays every 300ms,
# u_steady every second (a request at least every second keeps its
# connection in use however loaded the machine is).

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;

    upstream u_grow {
        server 127.0.0.1:8081;
        keepalive auto decay=1h;
    }

    upstream u_decay {
        server 127.0.0.1:8082;
        keepalive auto decay=300ms;
    }

    upstream u_steady {
        server 127.0.0.1:8083;
        keepalive auto decay=1s;
    }

    upstream u_max {
        server 127.0.0.1:8084;
        keepalive auto max=3 decay=1h;
    }

    upstream u_sliced {
        server 127.0.0.1:8085;
        keepalive auto decay=1h slice_key=$host;
    }

    upstream u_fixed {
        server 127.0.0.1:8086;
        keepalive 4;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /grow/   { proxy_pass http://u_grow/; }
        location /decay/  { proxy_pass http://u_decay/; }
        location /steady/ { proxy_pass http://u_steady/; }
        location /max/    { proxy_pass http://u_max/; }
        location /fixed/  { proxy_pass http://u_fixed/; }

        location /sliced/ { proxy_pass http://u_sliced/; }

        location /status {
            keepalive_status;
        }
    }
}

EOF

my $d = $t->testdir();
my @ports = (8081 .. 8086);
$t->run_daemon(\&http_backend, port($_), log => "$d/b$_.log") for @ports;

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for @ports;

$t->plan(37);

###############################################################################

sub blog { "$d/b$_[0].log" }

sub status { eval { decode_json(body_of(http_get('/status'))) } }

sub up { (status() // {})->{upstreams}{$_[0]} // {} }

# Polls until $code returns true (or $timeout seconds pass); returns its
# last result.
sub wait_for {
	my ($code, $timeout) = @_;
	my $deadline = time() + ($timeout // 10);
	while (1) {
		my $ok = $code->();
		return $ok if $ok || time() >= $deadline;
		sleep 0.05;
	}
}

sub accepted { backend_log_count(blog($_[0]), qr/^accept /) }
sub closed { backend_log_count(blog($_[0]), qr/^close /) }
sub open_conns { accepted($_[0]) - closed($_[0]) }

# $n requests at once, each held 300ms by the backend: $n connections in
# use together. Returns the backend's connection numbers.
sub burst {
	my ($prefix, $n, $host) = @_;
	my @r = parallel_get($host // 'localhost', ("/$prefix/sleep/300") x $n);
	return map { conn_of($_) // 'none' } @r;
}

sub distinct { my %h = map { $_ => 1 } @_; scalar keys %h }

###############################################################################

# Growth: a burst of 8 leaves 8 idle connections, and the next burst of 8
# takes them all (no new connection).

my @first = burst('grow', 8);
is(distinct(@first), 8, 'grow: a burst of 8 uses 8 connections');
wait_for(sub { up('u_grow')->{idle} == 8 });
is(up('u_grow')->{idle}, 8, 'grow: all 8 kept idle');
is(open_conns(8081), 8, 'grow: the backend has 8 open');
my @second = burst('grow', 8);
is(accepted(8081), 8, 'grow: the next burst opens none');
is(distinct(@second), 8, 'grow: and uses the 8 kept');
is(up('u_grow')->{evicted}, 0, 'grow: none evicted');

# The status page: the ceiling and the estimate of an auto upstream only.

my $s = status();
is($s->{upstreams}{u_grow}{auto_limit}, 1024, 'status: default ceiling 1024');
ok(exists $s->{upstreams}{u_grow}{auto_estimate}, 'status: estimate shown');
ok(!exists $s->{upstreams}{u_fixed}{auto_limit},
	'status: no ceiling for keepalive N');
is($s->{upstreams}{u_max}{auto_limit}, 3, 'status: max=3');

# The ceiling: a burst of 6 keeps 3, the least recently stored evicted.

burst('max', 6);
wait_for(sub { up('u_max')->{evicted} == 3 });
is(up('u_max')->{idle}, 3, 'max: 3 kept');
is(up('u_max')->{evicted}, 3, 'max: 3 evicted');
wait_for(sub { open_conns(8084) == 3 });
is(open_conns(8084), 3, 'max: the backend has 3 open');

# Sliced without slice_conn: a key's bucket takes its whole burst.

burst('sliced', 5, 'a.example');
wait_for(sub { up('u_sliced')->{idle} == 5 });
is(up('u_sliced')->{idle}, 5, 'sliced: a key keeps its burst of 5');
burst('sliced', 5, 'a.example');
is(accepted(8085), 5, 'sliced: the next burst of the key opens none');

# Decay: after a burst of 8 and no load, the idle connections halve every
# interval, closed by the module ("decay"), down to none.

burst('decay', 8);
my (%seen, @order, $max_estimate);
wait_for(sub {
	my $u = up('u_decay');
	my $idle = $u->{idle} // -1;
	push @order, $idle unless @order && $order[-1] == $idle;
	$max_estimate = $u->{auto_estimate}
		if ($u->{auto_estimate} // 0) > ($max_estimate // 0);
	return $idle == 0;
}, 30);
is($order[-1], 0, 'decay: all idle connections closed once unused');
# By halves (8 4 2 1 0) when the first tick after the burst saw all 8
# stored; had it come while only some were, the first step is smaller
# (8 7 3 1 0). Either way gradually: not all at once.
cmp_ok(scalar(grep { $_ > 0 && $_ < 8 } @order), '>=', 1,
	'decay: gradual (' . join(' ', @order) . ')');
is(join(' ', @order), join(' ', sort { $b <=> $a } @order),
	'decay: never up again');
my $u = up('u_decay');
is($u->{closed}{decay}, 8, 'decay: 8 closed as "decay"');
is($u->{closed}{timeout}, 0, 'decay: not by keepalive_timeout');
wait_for(sub { closed(8082) == 8 });
is(closed(8082), 8, 'decay: the backend saw the 8 closes');
cmp_ok($max_estimate // 0, '>', 0, 'decay: the estimate rose with the burst');
cmp_ok($max_estimate // 0, '<=', 8, 'decay: no higher than the burst');
is($u->{auto_estimate}, 0, 'decay: the estimate fell to 0');

# A steady load of one request at a time after a burst of 6: the unused
# five are closed, the one in use never is.

burst('steady', 6);
my @conns;
wait_for(sub {
	my $r = http_get('/steady/x');
	push @conns, conn_of($r) // 'none';
	return up('u_steady')->{idle} == 1 && closed(8083) == 5;
}, 30);
is(closed(8083), 5, 'steady: the 5 unused closed');
is(up('u_steady')->{idle}, 1, 'steady: 1 idle left');
is(distinct(@conns), 1, 'steady: the one in use was never closed');
my @closes = grep { /^close / } backend_log_lines(blog(8083));
is(scalar(grep { /conn=$conns[0]\b/ } @closes), 0,
	'steady: the backend never closed it');

# Prometheus, parsed by prometheus_client.

my ($samples, $parsed) =
	prometheus_samples($t, body_of(http_get('/status?format=prometheus')));
ok($samples, 'prometheus: parsed by prometheus_client') or diag($parsed);
$samples //= [];
my %value = map {
	my ($family, $type, $name, $labels, $v) = @$_;
	(join(',', $name, map { "$_=$labels->{$_}" } sort keys %$labels) => $v)
} @$samples;
is($value{'nginx_upstream_keepalive_auto_limit,upstream=u_max'}, 3,
	'prometheus: ceiling');
is($value{'nginx_upstream_keepalive_auto_estimate,upstream=u_decay'}, 0,
	'prometheus: estimate');
is($value{'nginx_upstream_keepalive_closed_total,reason=decay,upstream=u_decay'},
	8, 'prometheus: closed by decay');
ok(!exists $value{'nginx_upstream_keepalive_auto_limit,upstream=u_fixed'},
	'prometheus: no ceiling for keepalive N');

###############################################################################

# Bad values: "nginx -t" fails with an [emerg] naming them.  ($t is an
# argument: a named sub that closes over it keeps the object alive until
# global destruction, and the final checks could not run.)

sub bad {
	my ($t, $line, $re, $name) = @_;
	(my $conf = $t->read_file('nginx.conf'))
		=~ s/keepalive auto decay=1h;/$line/;
	# nginx_test_config() removes the pid file "nginx -t" writes, which
	# is the running nginx's here: kept for stopping it at the end.
	my $pid = $t->read_file('nginx.pid');
	my ($status, $out) = nginx_test_config($t, 'bad.conf', $conf,
		'error.log');
	$t->write_file('nginx.pid', $pid);
	subtest $name => sub {
		plan(tests => 2);
		isnt($status, 0, 'nginx -t fails');
		like($out, qr/\[emerg\] $re/, 'emerg message');
	};
}

bad($t, 'keepalive auto max=lots;',
	qr/invalid value "lots" of "max" in "keepalive" directive/, 'max=lots');
bad($t, 'keepalive auto max=0;',
	qr/invalid value "max=0" in "keepalive" directive, must be at least 1/,
	'max=0');
bad($t, 'keepalive auto decay=soon;',
	qr/invalid value "soon" of "decay" in "keepalive" directive/,
	'decay=soon');
bad($t, 'keepalive 8 max=16;', qr/"max" requires "auto" in "keepalive" directive/,
	'max= without auto');

###############################################################################
