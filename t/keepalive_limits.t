#!/usr/bin/perl

# Tests for upstream keepalive: the limits of an upstream's idle
# connections, keepalive_requests, keepalive_time, keepalive_timeout and
# their defaults, and the same-named client side directives at http, server
# and location level, which must keep working (and stay separate from the
# upstream ones) when the keepalive module is replaced.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count
	backend_log_wait /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    # client side: must not leak into the upstream connections
    keepalive_time 1s;

    upstream requests {
        server 127.0.0.1:8081;
        keepalive 2;
        keepalive_requests 3;
    }

    upstream time {
        server 127.0.0.1:8082;
        keepalive 2;
        keepalive_time 1s;
    }

    upstream timeout {
        server 127.0.0.1:8083;
        keepalive 2;
        keepalive_timeout 1s;
    }

    upstream defaults {
        server 127.0.0.1:8084;
        keepalive 2;
    }

    upstream client {
        server 127.0.0.1:8085;
        keepalive 2;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /requests/ {
            proxy_pass http://requests/;
        }

        location /time/ {
            proxy_pass http://time/;
        }

        location /timeout/ {
            proxy_pass http://timeout/;
        }

        location /defaults/ {
            proxy_pass http://defaults/;
            access_log off;

            # 1001 requests: keep error.log small (checked below)
            error_log %%TESTDIR%%/defaults.error.log notice;
        }
    }

    # client side keepalive directives at server and location level

    server {
        listen       127.0.0.1:8086;
        server_name  localhost;

        keepalive_requests 2;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /req/ {
            proxy_pass http://client/;
        }

        location /nokeep/ {
            keepalive_timeout 0;
            proxy_pass http://client/;
        }

        location /ktime/ {
            keepalive_requests 100;
            proxy_pass http://client/;
        }
    }
}

EOF

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/requests.log");
$t->run_daemon(\&http_backend, port(8082), log => "$d/time.log");
$t->run_daemon(\&http_backend, port(8083), log => "$d/timeout.log");
$t->run_daemon(\&http_backend, port(8084));
$t->run_daemon(\&http_backend, port(8085));

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8085;

$t->plan(24);

###############################################################################

# The tests that need time overlap: the waits for keepalive_time,
# keepalive_timeout and the default timeout run at the same time.

# default keepalive_requests is 1000: the 1001st request opens a new
# connection (the 1000th request on a connection is the last)

my %conns;
for (1 .. 1001) {
	$conns{conn_of(http_get('/defaults/')) // 'none'}++;
}

is(join(',', map { "$_=$conns{$_}" } sort keys %conns), '1=1000,2=1',
	'defaults: 1000 requests per connection');

my $defaults_idle = time();

# keepalive_requests 3: nginx closes the connection after its 3rd request

my @r = map { http_get('/requests/') } 1 .. 4;

is(join(' ', map { conn_of($_) // 'none' } @r), '1 1 1 2',
	'keepalive_requests: 4th request on a new connection');
is(join(' ', map { req_of($_) // 'none' } @r), '1 2 3 1',
	'keepalive_requests: request counters');
is(backend_log_wait("$d/requests.log", qr/^close conn=1 reason=eof$/, 1), 1,
	'keepalive_requests: connection closed by nginx');

# keepalive_time 1s: checked when the connection is freed, so a request
# made after 1s still reuses it, but it is not kept afterwards

my $time_start = time();
my @time = (http_get('/time/'));

# keepalive_timeout 1s: reused while idle for less than that

my @timeout = (http_get('/timeout/'), http_get('/timeout/'));

is(join(' ', map { conn_of($_) // 'none' } @timeout), '1 1',
	'keepalive_timeout: reused before the timeout');

# client side keepalive_time (http level, 1s): first response on a
# keepalive connection

my $ks = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8086));
print $ks "GET /ktime/ HTTP/1.1\r\nHost: localhost\r\n\r\n" if $ks;
my $k1 = read_response($ks);

like($k1, qr/^HTTP\/1.1 200 .*^Connection: keep-alive\r$/ms,
	'client keepalive_time: connection kept at first');

# client side keepalive_requests 2 (server level): of three pipelined
# requests, only two are answered and the second closes the connection

my $r = http(
	"GET /req/ HTTP/1.1\r\nHost: localhost\r\n\r\n" x 2
	. "GET /req/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
	PeerAddr => '127.0.0.1:' . port(8086));

is(count_responses($r), 2, 'client keepalive_requests: 2 responses');
like(last_response($r), qr/^Connection: close\r$/m,
	'client keepalive_requests: connection closed');

# client side keepalive_timeout 0 (location level): no client keepalive

$r = http(
	"GET /nokeep/ HTTP/1.1\r\nHost: localhost\r\n\r\n"
	. "GET /nokeep/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
	PeerAddr => '127.0.0.1:' . port(8086));

is(count_responses($r), 1, 'client keepalive_timeout 0: 1 response');
like($r, qr/^Connection: close\r$/m,
	'client keepalive_timeout 0: connection closed');

# wait until the "time" connection is older than 1s

sleep(1.3 - (time() - $time_start)) if time() - $time_start < 1.3;

push @time, http_get('/time/'), http_get('/time/');

is(join(' ', map { conn_of($_) // 'none' } @time), '1 1 2',
	'keepalive_time: not kept after 1s');
is(join(' ', map { req_of($_) // 'none' } @time), '1 2 1',
	'keepalive_time: request counters');
is(backend_log_wait("$d/time.log", qr/^close conn=1 reason=eof$/, 1), 1,
	'keepalive_time: connection closed by nginx');

# keepalive_timeout: the idle connection is closed by nginx after 1s

is(backend_log_wait("$d/timeout.log", qr/^close conn=1 reason=eof$/, 1, 5), 1,
	'keepalive_timeout: idle connection closed by nginx');

my $tr = http_get('/timeout/');

like($tr, qr/^HTTP\/1.1 200 /, 'keepalive_timeout: next request');
is(conn_of($tr), 2, 'keepalive_timeout: next request on a new connection');

# client side keepalive_time: the second request, made after 1s, is the
# last on the connection

print $ks "GET /ktime/ HTTP/1.1\r\nHost: localhost\r\n\r\n" if $ks;
my $k2 = read_response($ks);

like($k2, qr/^HTTP\/1.1 200 .*^Connection: close\r$/ms,
	'client keepalive_time: connection not kept after 1s');
ok(closed($ks), 'client keepalive_time: connection closed by nginx');

# the client side directives do not apply to upstream connections: all the
# requests above used one upstream connection

$r = http_get('/req/', PeerAddr => '127.0.0.1:' . port(8086));

is(conn_of($r), 1, 'client directives: upstream connection still reused');
is(req_of($r), 6, 'client directives: upstream request counter');

# the default keepalive_timeout (60s) keeps a connection idle for 2s; the
# default keepalive_time (1h) is not replaced by the http level 1s

sleep(2.1 - (time() - $defaults_idle)) if time() - $defaults_idle < 2.1;

$r = http_get('/defaults/');

is(conn_of($r), 2, 'defaults: reused after 2s idle');
is(req_of($r), 2, 'defaults: request counter');

# "close" lines of the backends above, nothing else closed before the end

is(backend_log_count("$d/requests.log", qr/^close /), 1,
	'keepalive_requests: only one connection closed');

is(join("\n", $t->read_file('defaults.error.log')
	=~ /^.*\[(?:alert|crit|emerg)\].*$/mg), '',
	'defaults: no alerts in the location error log');

###############################################################################

sub count_responses {
	my ($r) = @_;
	return 0 unless defined $r;
	my @n = $r =~ /^HTTP\/1\.1 200 /mg;
	return scalar @n;
}

sub last_response {
	my ($r) = @_;
	return '' unless defined $r;
	my @parts = split /(?=^HTTP\/1\.1 )/m, $r;
	return $parts[-1];
}

# one response with Content-Length from a keepalive socket, without waiting
# for the connection to close

sub read_response {
	my ($s) = @_;
	return undef unless $s;

	my $buf = '';
	my $sel = IO::Select->new($s);
	my $deadline = time() + 5;

	while (time() < $deadline) {
		if ($buf =~ /\A(.*?\r\n\r\n)/s) {
			my $hlen = length $1;
			my ($len) = $1 =~ /^Content-Length:\s*(\d+)/mi;
			return $buf if defined $len && length($buf) >= $hlen + $len;
		}

		last unless $sel->can_read($deadline - time());
		my $n = sysread($s, $buf, 65536, length $buf);
		last unless $n;
	}

	return $buf;
}

# true if the peer closed the socket (EOF within 5 seconds)

sub closed {
	my ($s) = @_;
	return 0 unless $s;
	return 0 unless IO::Select->new($s)->can_read(5);
	my $n = sysread($s, my $buf, 1);
	return defined $n && $n == 0;
}

###############################################################################
