#!/usr/bin/perl

# Tests for upstream keepalive: the close handler of idle connections.
# An idle connection closed by the backend is noticed and dropped at once,
# so the next request does not try it; an idle connection on which the
# backend sends unexpected data is closed and not reused either.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use IO::Socket::INET;
use Time::HiRes qw/ sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ header_of errlog_wait slice_module /;

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

    upstream closing {
        server 127.0.0.1:8081;
        keepalive 1;
    }

    upstream garbage {
        server 127.0.0.1:8082;
        keepalive 1;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /closing/ {
            proxy_pass http://closing;
        }

        location /garbage/ {
            proxy_pass http://garbage;
        }
    }

    # backend that closes idle client connections after 1 second

    server {
        listen       127.0.0.1:8081;
        server_name  localhost;

        keepalive_timeout 1s;

        location / {
            add_header X-Conn $connection always;
            add_header X-Requests $connection_requests always;
            return 200 "backend $uri\n";
        }
    }
}

EOF

my $glog = $t->testdir() . '/garbage.log';

$t->run_daemon(\&garbage_daemon, port(8082), $glog);
$t->run()->waitforsocket('127.0.0.1:' . port(8082))
	or die "Can't start garbage daemon";

$t->plan(17);

my $ours = slice_module();

###############################################################################

# (a) the backend closes the idle connection (keepalive_timeout 1s on the
# backend server, nginx's upstream keepalive_timeout is the default 60s)

my $r1 = http_get('/closing/1');
my $r2 = http_get('/closing/2');

is(header_of($r2, 'X-Conn') // 'r2: no X-Conn',
	header_of($r1, 'X-Conn') // 'r1: no X-Conn',
	'closing: reused while open');
is(header_of($r2, 'X-Requests'), 2, 'closing: second request on it');

# the backend server (same error.log) closes it after 1s; nginx's close
# handler sees the close in the same worker right after (polled for: the
# timer fires whenever the worker gets to it)

my $c1 = header_of($r1, 'X-Conn') // 'none';

errlog_wait($t, qr/\*$c1 close http connection/, 1);
errlog_wait($t, qr/keepalive slice close handler/, 1) if $ours;

like($t->read_file('error.log'), qr/\*$c1 close http connection/,
	'closing: backend keepalive timeout');

# only our module logs this: the close handler noticed it at once

SKIP: {
skip 'module not loaded', 1 unless $ours;

is(() = $t->read_file('error.log') =~ /keepalive slice close handler/g, 1,
	'closing: module close handler');

}

my $r3 = http_get('/closing/3');

like($r3, qr/200 OK.*backend \/closing\/3$/s, 'closing: next request 200');
isnt(header_of($r3, 'X-Conn'), $c1, 'closing: new connection');
is(header_of($r3, 'X-Requests'), 1, 'closing: first request on it');

# nginx did not try the closed connection first (it would have to retry
# after "upstream prematurely closed connection" or a failed send)

unlike($t->read_file('error.log'),
	qr/\[error\].*(?:prematurely closed|failed \(\d+: (?:Broken pipe|Connection reset))/,
	'closing: dead connection not tried');

# (b) the backend sends 2 unexpected bytes on the idle connection, 300ms
# after a complete response: nginx closes it, the next request uses a new
# connection

my $g1 = http_get('/garbage/1');

like($g1, qr/200 OK.*\r\n\r\nok$/s, 'garbage: response');
is(conn_of($g1), 1, 'garbage: first connection');

is(backend_log_wait($glog, qr/^garbage conn=1$/, 1), 1, 'garbage: sent');
is(backend_log_wait($glog, qr/^close conn=1$/, 1), 1,
	'garbage: connection closed by nginx');

SKIP: {
skip 'module not loaded', 1 unless $ours;

is(() = $t->read_file('error.log') =~ /keepalive slice close handler/g, 2,
	'garbage: module close handler');

}

my $g2 = http_get('/garbage/2');

like($g2, qr/200 OK.*\r\n\r\nok$/s, 'garbage: next request 200');
is(conn_of($g2), 2, 'garbage: new connection');

unlike($t->read_file('error.log'), qr/\[error\]/, 'no errors');

# only our module logs this

SKIP: {
skip 'module not loaded', 1 unless $ours;

is(() = $t->read_file('error.log')
	=~ /get keepalive slice peer: using connection/g, 1,
	'module: only the live connection reused');

}

###############################################################################

# HTTP/1.1 backend, one connection at a time: answers every request with
# "ok" (Content-Length: 2, keep-alive), then sends "XX" 300ms later.
# Logs "accept conn=N", "request conn=N", "garbage conn=N", "close conn=N";
# connections closed without sending anything (waitforsocket) are not
# counted.

sub garbage_daemon {
	my ($port, $log) = @_;

	$SIG{PIPE} = 'IGNORE';

	my $server = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => "127.0.0.1:$port",
		Listen => 5,
		Reuse => 1,
	) or die "Can't create listening socket: $!\n";

	my $logline = sub {
		open my $fh, '>>', $log or die "Can't open $log: $!\n";
		print $fh "$_[0]\n";
		close $fh;
	};

	my $n = 0;

	while (my $client = $server->accept()) {
		$client->autoflush(1);

		my ($id, $buf) = (undef, '');

		while (1) {
			my $got = $client->sysread($buf, 4096, length $buf);
			last unless $got;

			if (!defined $id) {
				$id = ++$n;
				$logline->("accept conn=$id");
			}

			next unless $buf =~ s/\A.*?\r\n\r\n//s;

			$logline->("request conn=$id");

			$client->syswrite("HTTP/1.1 200 OK\r\n"
				. "X-Connection: $id\r\n"
				. "Content-Length: 2\r\n"
				. "Connection: keep-alive\r\n\r\n"
				. "ok") or last;

			sleep 0.3;

			$client->syswrite("XX") or last;
			$logline->("garbage conn=$id");
		}

		$logline->("close conn=$id") if defined $id;
		close $client;
	}
}

###############################################################################
