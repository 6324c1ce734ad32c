#!/usr/bin/perl

# Tests for upstream keepalive: connections that must not be kept for
# reuse, after a read timeout (failed peer), an invalid (too big) response
# header (failed peer), a backend "Connection: close" (also from a backend
# that leaves the closing to nginx), a response that came before the whole
# request body was sent, and a response without length.  Each time the next
# request must get a new connection, and succeed.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw/ time /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $module = slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# a Host header the backend echoes in X-Host, longer than proxy_buffer_size

my $long = 'h' x 1500;

(my $conf = <<'EOF') =~ s/%%LONG%%/$long/;

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 4;
    }

    # answers "Connection: close" but leaves the closing to nginx
    upstream lazy {
        server 127.0.0.1:8082;
        keepalive 4;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        # a connection wrongly kept after /early would make the next
        # request wait for the rest of the body: fail within 3s, not 60s
        proxy_read_timeout 3s;

        location / {
            proxy_pass http://u;
        }

        location /timeout/ {
            proxy_read_timeout 500ms;
            proxy_pass http://u/sleep/;
        }

        location /bighdr/ {
            proxy_buffer_size 1k;
            proxy_set_header Host %%LONG%%;
            proxy_set_header Connection "";
            proxy_pass http://u/;
        }

        location /lazy/ {
            proxy_pass http://lazy/;
        }

        location /early {
            proxy_request_buffering off;
            proxy_pass http://u;
        }
    }
}

EOF

$t->write_file_expand('nginx.conf', $conf);

my $d = $t->testdir();
my $log = "$d/backend.log";

$t->run_daemon(\&http_backend, port(8081), log => $log);
$t->run_daemon(\&lazy_close_backend, port(8082));

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8082;

$t->plan(29);

###############################################################################

# Every scenario starts with one idle connection (made by a plain request),
# which the failing request reuses; since the cache then holds nothing, the
# request after it must open a new connection.

my $r = http_get('/warm');

is(conn_of($r), 1, 'first connection');

# read timeout: 504, the peer failed

$r = http_get('/timeout/1500');

like($r, qr/^HTTP\/1.1 504 /, 'timeout: 504');
is(backend_log_count($log, qr{^request conn=1 req=2 .* uri=/sleep/1500$}), 1,
	'timeout: on the reused connection');

$r = http_get('/warm');

like($r, qr/^HTTP\/1.1 200 /, 'after timeout: 200');
is(conn_of($r), 2, 'after timeout: new connection');
is(backend_log_wait($log, qr/^close conn=1 reason=eof$/, 1), 1,
	'after timeout: timed out connection closed');

# invalid header: "upstream sent too big header", 502, the peer failed

$r = http_get('/bighdr/');

like($r, qr/^HTTP\/1.1 502 /, 'invalid header: 502');
is(backend_log_count($log, qr{^request conn=2 req=2 host=h+ uri=/$}), 1,
	'invalid header: on the reused connection');

$r = http_get('/warm');

like($r, qr/^HTTP\/1.1 200 /, 'after invalid header: 200');
is(conn_of($r), 3, 'after invalid header: new connection');
is(backend_log_wait($log, qr/^close conn=2 reason=eof/, 1), 1,
	'after invalid header: connection closed');

# the backend answers "Connection: close"

$r = http_get('/close');

like($r, qr/^HTTP\/1.1 200 /, 'close: 200');
is(conn_of($r), 3, 'close: on the reused connection');

$r = http_get('/warm');

like($r, qr/^HTTP\/1.1 200 /, 'after close: 200');
is(conn_of($r), 4, 'after close: new connection');

# "Connection: close" from a backend that does not close the connection
# itself: only nginx's decision not to keep it prevents reuse

my @lazy = map { http_get('/lazy/') } 1 .. 3;

is(join(' ', map { $_ =~ /^HTTP\/1.1 (\d+) / ? $1 : 'none' } @lazy),
	'200 200 200', 'close, connection left open: 200');
is(join(' ', map { conn_of($_) // 'none' } @lazy), '1 2 3',
	'close, connection left open: new connection each time');

# the response comes before the request body was sent: the client sends
# only part of a declared 100000 byte body, nginx (proxy_request_buffering
# off) passes on what it has, the backend answers at once; the rest of the
# body is never sent, so the connection is out of sync and cannot be kept

$r = early_partial_body('/early', 100000, 1000);

like($r, qr/^HTTP\/1.1 200 .*^early conn=4 req=2 /ms,
	'early response: 200 on the reused connection');

$r = http_get('/warm');

like($r, qr/^HTTP\/1.1 200 /, 'after early response: 200');
is(conn_of($r), 5, 'after early response: new connection');
is(backend_log_wait($log, qr/^close conn=4 reason=eof/, 1), 1,
	'after early response: connection closed');

# response without length: delimited by the close

$r = http_get('/nolength');

like($r, qr/^HTTP\/1.1 200 .*^conn=5 req=2 /ms,
	'no length: 200 on the reused connection');

$r = http_get('/warm');

like($r, qr/^HTTP\/1.1 200 /, 'after no length: 200');
is(conn_of($r), 6, 'after no length: new connection');

# and the last connection is kept as usual

$r = http_get('/warm');

is(conn_of($r), 6, 'connection kept after a normal response');

# no request was sent on a connection the backend had closed

my $closed = qr/upstream prematurely closed/;
my $reset = qr/reset by peer\) while (?:reading response header|sending request)/;

unlike($t->read_file('error.log'), qr/$closed|$reset/,
	'no stale connection used');

# why the connections were not kept, as logged by the keepalive_slice module

SKIP: {
skip 'keepalive_slice module not loaded', 3 unless $module;
skip 'no debug log', 3 unless $t->has_module('debug');

my $e = $t->read_file('error.log');

is(count($e, qr/free keepalive slice peer: not saving: peer failed/), 2,
	'module: peer failed (timeout, invalid header)');
is(count($e, qr/free keepalive slice peer: not saving: request body not sent/),
	1, 'module: request body not sent');
is(count($e, qr/free keepalive slice peer: not saving: (?:response not keepalive|connection error)/), 5,
	'module: response not keepalive (close, lazy close, no length)');

}

###############################################################################

# A minimal HTTP/1.1 server: every response says "Connection: close", yet
# the connection is only closed when nginx closes it.  Connections are
# numbered in the order of their first request (X-Connection).

sub lazy_close_backend {
	my ($port) = @_;

	$SIG{PIPE} = 'IGNORE';

	my $server = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => "127.0.0.1:$port",
		Listen => 16,
		Reuse => 1
	)
		or die "Can't create listening socket: $!\n";

	my $sel = IO::Select->new($server);
	my (%buf, %id);
	my $n = 0;

	while (1) {
		for my $s ($sel->can_read()) {
			if ($s == $server) {
				my $c = $server->accept() or next;
				$sel->add($c);
				$buf{$c} = '';
				next;
			}

			my $r = sysread($s, $buf{$s}, 65536, length $buf{$s});

			if (!$r) {
				$sel->remove($s);
				delete $buf{$s};
				delete $id{$s};
				close $s;
				next;
			}

			while ($buf{$s} =~ s/\A.*?\r\n\r\n//s) {
				$id{$s} //= ++$n;
				my $body = "conn=$id{$s}\n";
				syswrite($s, "HTTP/1.1 200 OK\r\n"
					. "Connection: close\r\n"
					. "X-Connection: $id{$s}\r\n"
					. "Content-Length: " . length($body) . "\r\n"
					. "\r\n" . $body);
			}
		}
	}
}

sub count {
	my ($s, $re) = @_;
	my @m = $s =~ /$re/g;
	return scalar @m;
}

# POST with a Content-Length of $total, of which only $sent bytes are sent;
# returns the response (read until nginx closes the connection)

sub early_partial_body {
	my ($uri, $total, $sent) = @_;

	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080))
		or return undef;

	print $s "POST $uri HTTP/1.0\r\nHost: localhost\r\n"
		. "Content-Length: $total\r\n\r\n" . ('x' x $sent);

	my $buf = '';
	my $sel = IO::Select->new($s);
	my $deadline = time() + 8;

	while (time() < $deadline) {
		last unless $sel->can_read($deadline - time());
		my $n = sysread($s, $buf, 65536, length $buf);
		last unless $n;
	}

	close $s;
	return $buf;
}

###############################################################################
