#!/usr/bin/perl

# Tests for keepalive_status: the module's counters, summed over two
# workers, checked against what the backends saw (connections opened,
# requests per connection, closes and their reasons) and against nginx's
# error log; the JSON parsed with JSON::PP and the Prometheus text parsed
# with Python's prometheus_client; counters kept across a reload, with the
# old workers' idle connections counted as closed at shutdown; access
# control, methods and formats.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use JSON::PP qw/ decode_json /;
use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count
	backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_get_host parallel_get status_of header_of
	errlog_count slice_module body_of prometheus_samples /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# Two workers, each with its own listening socket (reuseport): every new
# client connection goes to one of them, as the kernel hashes it. Each
# worker keeps its own idle connections (keepalive_share off), so that the
# numbers can be checked worker by worker; t/share.t counts what sharing
# does.

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    add_header X-Worker $pid always;

    upstream u_host {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=2;
        keepalive_share off;
    }

    upstream u_conn1 {
        server 127.0.0.1:8082;
        keepalive 8 slice_key=$host slice_conn=1;
        keepalive_share off;
    }

    upstream u_conn0 {
        server 127.0.0.1:8083;
        keepalive 8 slice_key=$host slice_conn=0;
        keepalive_share off;
    }

    upstream u_evict {
        server 127.0.0.1:8084;
        keepalive 1 slice_key=$host slice_conn=1;
        keepalive_share off;
    }

    upstream u_timeout {
        server 127.0.0.1:8085;
        keepalive 8;
        keepalive_share off;
        keepalive_timeout 1s;
    }

    upstream u_server {
        server 127.0.0.1:8086;
        keepalive 8;
        keepalive_share off;
    }

    upstream u_requests {
        server 127.0.0.1:8087;
        keepalive 8;
        keepalive_share off;
        keepalive_requests 3;
    }

    upstream u_time {
        server 127.0.0.1:8088;
        keepalive 8;
        keepalive_share off;
        keepalive_time 1s;
    }

    upstream u_close {
        server 127.0.0.1:8089;
        keepalive 8;
        keepalive_share off;
    }

    # nothing listens on 8097: every request fails there first, then
    # goes on to the backup
    upstream u_retry {
        server 127.0.0.1:8097 max_fails=0;
        server 127.0.0.1:8090 backup;
        keepalive 8;
        keepalive_share off;
    }

    upstream u_pool {
        server 127.0.0.1:8091;
        keepalive 8 slice_key=$host slice_conn=2 slice_poolsize=1;
        keepalive_share off;
    }

    # operator text in a label value
    upstream "we\"ird\\name" {
        server 127.0.0.1:8081;
        keepalive 2;
        keepalive_share off;
    }

    # not ours: not on the status page
    upstream u_stock {
        server 127.0.0.1:8081;
    }

%%EXTRA_UPSTREAM%%

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /host/     { proxy_pass http://u_host/; }
        location /conn1/    { proxy_pass http://u_conn1/; }
        location /conn0/    { proxy_pass http://u_conn0/; }
        location /evict/    { proxy_pass http://u_evict/; }
        location /timeout/  { proxy_pass http://u_timeout/; }
        location /server/   { proxy_pass http://u_server/; }
        location /requests/ { proxy_pass http://u_requests/; }
        location /time/     { proxy_pass http://u_time/; }
        location /close/    { proxy_pass http://u_close/close; }
        location /pool/     { proxy_pass http://u_pool/; }
        location /stock/    { proxy_pass http://u_stock/; }

        location /retry/ {
            proxy_pass http://u_retry/;
            proxy_next_upstream error;
        }

        location /status {
            keepalive_status;
        }

        location /status-denied {
            keepalive_status;
            deny all;
        }
    }
}

EOF

(my $first = $conf) =~ s/%%EXTRA_UPSTREAM%%\n//;
$t->write_file_expand('nginx.conf', $first);

my $d = $t->testdir();
my @ports = (8081 .. 8091);
$t->run_daemon(\&http_backend, port($_), log => "$d/b$_.log") for @ports;

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for @ports;

$t->plan(71);

###############################################################################

sub blog { "$d/b$_[0].log" }

# The status page as JSON, and the worker that answered.
sub status_json {
	my $r = http_get('/status');
	my $json = eval { decode_json(body_of($r)) };
	return ($json, header_of($r, 'X-Worker'));
}

sub status { (status_json())[0] }

sub up {
	my ($name) = @_;
	return status()->{upstreams}{$name};
}

sub sum_of { my $s = 0; $s += $_ for values %{$_[0]}; $s }

# Polls until $code returns true (or $timeout seconds, default 5, pass);
# returns its last result.
sub wait_for {
	my ($code, $timeout) = @_;
	my $deadline = time() + ($timeout // 5);
	while (1) {
		my $ok = $code->();
		return $ok if $ok || time() >= $deadline;
		sleep 0.05;
	}
}

# Backend connections still open: accepted and not closed.
sub open_conns {
	my ($port) = @_;
	return backend_log_count(blog($port), qr/^accept /)
		- backend_log_count(blog($port), qr/^close /);
}

###############################################################################

# Sequential traffic for three hosts, each request on a new client
# connection, so that both workers serve some.  A worker opens one
# connection per host and reuses it: the backend numbers connections and
# the requests on each.

my (%workers, %pairs, $requests, $first_requests);

for my $i (0 .. 59) {
	my $host = (qw/ a.example b.example c.example /)[$i % 3];
	my $r = http_get_host($host, '/host/x');
	next unless (status_of($r) // 0) == 200;
	$requests++;
	my $w = header_of($r, 'X-Worker') // 'none';
	$workers{$w}++;
	$pairs{"$w $host"}{conn_of($r) // 'none'}++;
	$first_requests++ if (req_of($r) // 0) == 1;
}

is($requests, 60, 'traffic: all answered');
is(scalar keys %workers, 2, 'traffic: both workers served');

my $opened = backend_log_count(blog(8081), qr/^accept /);
is($opened, scalar keys %pairs, 'traffic: one connection per worker and host');
is($first_requests, $opened, 'traffic: each opened connection served a first request');

my ($s, $by) = status_json();
my $u = $s->{upstreams}{u_host};
ok($u, 'json: parses, has u_host');
is($u->{missed}, $opened, 'u_host: missed = connections the backend accepted');
is($u->{reused}, $requests - $opened, 'u_host: reused = requests on old connections');
is($u->{kept}, $requests, 'u_host: every connection kept');
is(sum_of($u->{not_kept}), 0, 'u_host: none refused');
is($u->{idle}, open_conns(8081), 'u_host: idle = backend connections open');
is($u->{buckets}, $opened, 'u_host: a bucket per worker and host');

# Each worker answers the status page with the same numbers: the counters
# are in shared memory, summed over the workers.

my %by_worker;
wait_for(sub {
	my ($json, $w) = status_json();
	$by_worker{$w // 'none'} = JSON::PP->new->canonical->encode($json);
	return keys %by_worker >= 2;
}, 10);
is(scalar keys %by_worker, 2, 'status: answered by both workers');
my %distinct = map { $_ => 1 } values %by_worker;
is(scalar keys %distinct, 1, 'status: both workers report the same numbers');

is($s->{module_version}, '0.1.0', 'json: module version');
like($s->{nginx_version}, qr/^\d+\.\d+\.\d+$/, 'json: nginx version');
# An upstream without keepalive is ours from nginx 1.29.7, where nginx
# itself caches its connections by default (32, local); before, nothing
# keeps them and the page leaves it out.
if ($t->has_version('1.29.7')
	&& `$Test::Nginx::NGINX -V 2>&1`
		!~ /--without-http_upstream_keepalive_module/)
{
	ok(exists $s->{upstreams}{u_stock},
		'json: upstream without keepalive listed (cached by default from 1.29.7)');
} else {
	ok(!exists $s->{upstreams}{u_stock},
		'json: upstream without keepalive absent (not cached before 1.29.7)');
}
ok(exists $s->{upstreams}{"we\"ird\\name"}, 'json: operator text as a key');

# No $upstream_keepalive_* in this configuration: tries are not recorded.

unlike($t->read_file('error.log'), qr/keepalive slice: try \d+ recorded/,
	'variables unused: tries not recorded');

###############################################################################

# Not kept, by reason, each checked against what nginx logged or what the
# backend saw.

# slice_conn=1: three requests for one host at once; at least two of them
# are in one worker, which can keep only one of its connections.

parallel_get('a.example', ('/conn1/sleep/1000') x 3);
my $full = errlog_count($t, qr/bucket for key "a\.example" is full/);
wait_for(sub { backend_log_count(blog(8082), qr/^close /) >= $full });
$u = up('u_conn1');
ok($full > 0, 'bucket_full: refusals logged');
is($u->{not_kept}{bucket_full}, $full, 'bucket_full: counted as logged');
is($u->{not_kept}{bucket_full}, backend_log_count(blog(8082), qr/^close /),
	'bucket_full: = connections the backend saw closed');
is($u->{kept} + $u->{not_kept}{bucket_full}, 3, 'bucket_full: three released');

# slice_conn=0: nothing kept

http_get_host('a.example', '/conn0/x') for 1 .. 3;
$u = up('u_conn0');
is($u->{not_kept}{limit_zero}, 3, 'limit_zero: three');
is($u->{missed}, backend_log_count(blog(8083), qr/^accept /),
	'limit_zero: every request opened a connection');

# keepalive 1: a worker that serves both hosts evicts one for the other

http_get_host((qw/ a.example b.example /)[$_ % 2], '/evict/x') for 0 .. 19;
$u = up('u_evict');
ok($u->{evicted} > 0, 'evicted: some');
is(backend_log_wait(blog(8084), qr/^close /, $u->{evicted}), $u->{evicted},
	'evicted: = connections the backend saw closed');
ok($u->{idle} <= 2, 'evicted: at most one idle connection per worker');
is($u->{idle}, open_conns(8084), 'evicted: idle = backend connections open');

# keepalive_requests 3: the third request on a connection closes it

my @reqs = map { req_of(http_get_host('a.example', '/requests/x')) // 0 }
	1 .. 12;
my $third = grep { $_ == 3 } @reqs;
$u = up('u_requests');
ok($third > 0, 'keepalive_requests: some connections reached 3');
is($u->{not_kept}{keepalive_requests}, $third,
	'keepalive_requests: = connections that served their third request');
is($u->{not_kept}{keepalive_requests},
	backend_log_wait(blog(8087), qr/^close /, $third),
	'keepalive_requests: = connections the backend saw closed');

# keepalive_time 1s: a response that takes longer ends the connection

http_get_host('a.example', '/time/sleep/1200');
http_get_host('a.example', '/time/x');
$u = up('u_time');
is($u->{not_kept}{keepalive_time}, 1, 'keepalive_time: one');
is($u->{kept}, 1, 'keepalive_time: the fresh one kept');

# Connection: close from the backend

http_get_host('a.example', '/close/') for 1 .. 2;
is(up('u_close')->{not_kept}{response_not_keepalive}, 2,
	'response_not_keepalive: two');

# a try that failed (connection refused), then one that worked

for (1 .. 4) {
	http_get_host('a.example', '/retry/x');
}
$u = up('u_retry');
is($u->{not_kept}{error}, 4, 'error: the failed tries');
is($u->{reused} + $u->{missed}, 8, 'error: two tries per request');
is($u->{kept}, 4, 'error: the backup\'s connections kept');

# slice_poolsize=1: a worker holding one host's bucket gives it to the
# other host, closing the idle connection in it: counted as evicted, never
# as not kept (no_free_bucket is left for slice_poolsize=0).  Twenty
# requests alternating over two workers: some worker sees both hosts.

http_get_host((qw/ a.example b.example /)[$_ % 2], '/pool/x') for 0 .. 19;
$u = up('u_pool');
is($u->{not_kept}{no_free_bucket}, 0, 'pool of one: no connection refused');
is($u->{kept}, 20, 'pool of one: every connection kept');
ok($u->{evicted} > 0, "pool of one: the other host's connection evicted");

###############################################################################

# Closed while idle, by reason.

http_get_host('a.example', '/timeout/x');
backend_log_wait(blog(8085), qr/^close /, 1);
is(wait_for(sub { up('u_timeout')->{closed}{timeout} }), 1,
	'closed timeout: one, after keepalive_timeout');
is(backend_log_count(blog(8085), qr/^close .*reason=eof/), 1,
	'closed timeout: nginx closed it');

http_get_host('a.example', '/server/idle/fin/100');
backend_log_wait(blog(8086), qr/reason=idle-fin/, 1);
is(wait_for(sub { up('u_server')->{closed}{closed_by_server} }), 1,
	'closed_by_server: the backend closed it');

http_get_host('a.example', '/server/idle/rst/100');
backend_log_wait(blog(8086), qr/reason=idle-rst/, 1);
ok(wait_for(sub { up('u_server')->{closed}{closed_by_server} == 2 }),
	'closed_by_server: reset by the backend too');

http_get_host('a.example', '/server/idle/data/100');
backend_log_wait(blog(8086), qr/^unsolicited /, 1);
is(wait_for(sub { up('u_server')->{closed}{unexpected_data} }), 1,
	'unexpected_data: bytes nobody asked for');
is(up('u_server')->{idle}, 0, 'closed: nothing idle left');
ok(wait_for(sub { open_conns(8086) == 0 }), 'closed: the backend agrees');

###############################################################################

# Every connection released is kept or not, and every try reused one or
# missed; idle connections are those kept that have not left.

$s = status();
my @bad;
for my $name (sort keys %{$s->{upstreams}}) {
	my $v = $s->{upstreams}{$name};
	my $released = $v->{kept} + sum_of($v->{not_kept});
	my $tries = $v->{reused} + $v->{missed};
	push @bad, "$name: $tries tries, $released released"
		if $tries != $released;
}
is(join('; ', @bad), '', 'all upstreams: tries = connections released');

###############################################################################

# The same numbers in the Prometheus text format, read by a real parser.

my $r = http_get('/status?format=prometheus');
like($r, qr{^Content-Type: text/plain; version=0\.0\.4; charset=utf-8\r?$}m,
	'prometheus: content type');
$s = status();

my ($samples, $parsed) = prometheus_samples($t, body_of($r));
ok($samples, 'prometheus: parsed by prometheus_client') or diag($parsed);
$samples //= [];

my %type = map { $_->[0] => $_->[1] } @$samples;
is(join(' ', map { $type{"nginx_upstream_keepalive_$_"} // 'none' }
	qw/ idle buckets reused missed kept not_kept evicted closed /),
	'gauge gauge counter counter counter counter counter counter',
	'prometheus: metric types');

my (%prom, @mismatch);
for my $x (@$samples) {
	my ($family, undef, $name, $labels, $value) = @$x;
	next unless defined $labels->{upstream};
	my $key = $family =~ s/^nginx_upstream_keepalive_//r;
	my $json = $s->{upstreams}{$labels->{upstream}};
	my $want = !$json ? undef
		: defined $labels->{reason} ? $json->{$key}{$labels->{reason}}
		: $json->{$key};
	push @mismatch, "$name $labels->{upstream} "
		. ($labels->{reason} // '') . ": $value vs " . ($want // 'none')
		unless defined $want && $want == $value;
	$prom{$labels->{upstream}}++;
}
is(join('; ', @mismatch), '', 'prometheus: every sample as in the JSON');
is(join(' ', sort keys %prom), join(' ', sort keys %{$s->{upstreams}}),
	'prometheus: every upstream');
ok($prom{"we\"ird\\name"}, 'prometheus: operator text escaped and read back');
like($r, qr/^nginx_upstream_keepalive_reused_total\{upstream="u_host"\} \d+\r?$/m,
	'prometheus: counter names');
like($r, qr/^nginx_upstream_keepalive_module_info\{module_version="0\.1\.0",nginx_version="[\d.]+"\} 1\r?$/m,
	'prometheus: versions');

###############################################################################

# Access control, methods, formats.

like(http_get('/status-denied'), qr/^HTTP\/1\.\d 403/, 'allow/deny apply');
like(http("POST /status HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
	qr/^HTTP\/1\.\d 405/, 'POST not allowed');
like(http_get('/status?format=xml'), qr/^HTTP\/1\.\d 400/, 'unknown format');
like(http_get('/status?format=json'), qr/^Content-Type: application\/json\r?$/m,
	'format=json');
$r = http_head('/status');
like($r, qr/^HTTP\/1\.\d 200/, 'HEAD');
is(body_of($r), '', 'HEAD: no body');

# pipelined requests each get their body (nginx 1.30+ bindings misplace
# r->header_only onto r->pipeline)

$r = http("GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"
	. "GET /status?format=prometheus HTTP/1.1\r\nHost: localhost\r\n"
	. "Connection: close\r\n\r\n");
ok($r =~ /"module_version":"0\.1\.0"/ && $r =~ /^nginx_upstream_keepalive_module_info\{/m,
	'pipelined: both bodies');

###############################################################################

# A reload keeps the counters (the zone and every name in it are kept); the
# old workers close their idle connections as they leave, counted as
# closed at shutdown; a new upstream appears.

$s = status();
my $before = $s->{upstreams}{u_host};
my $old_idle = $before->{idle};

(my $second = $conf) =~ s/%%EXTRA_UPSTREAM%%/    upstream u_added {
        server 127.0.0.1:8081;
        keepalive 4;
        keepalive_share off;
    }/;
$t->write_file_expand('nginx.conf', $second);
$t->reload();

my $new = wait_for(sub {
	my $v = status()->{upstreams};
	return $v->{u_added} && $v->{u_host}{closed}{shutdown} >= $old_idle
		&& $v;
}, 15);
ok($new && $new->{u_added}, 'reload: new upstream listed');
is($new->{u_host}{closed}{shutdown}, $old_idle,
	'reload: old workers\' idle connections closed at shutdown');
is($new->{u_host}{reused}, $before->{reused}, 'reload: reused kept');
is($new->{u_host}{missed}, $before->{missed}, 'reload: missed kept');
is($new->{u_host}{kept}, $before->{kept}, 'reload: kept kept');
is($new->{u_host}{idle}, 0, 'reload: nothing idle');
is(open_conns(8081), 0, 'reload: the backend agrees');

http_get_host('a.example', '/host/x');
is(up('u_host')->{missed}, $before->{missed} + 1,
	'reload: new workers count on');

###############################################################################
