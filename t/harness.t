#!/usr/bin/perl

# Self-test of the test harness (Test::Nginx).
#
# Uses only the public interface of nginx-tests' Test::Nginx, so it passes
# with our t/lib/Test/Nginx.pm and with nginx's own library alike (put the
# latter first with PERL5LIB=/path/to/nginx-tests/lib).  Several copies
# run with "prove -j" must not disturb each other (port mapping).

use warnings; use strict;
use Test::More;
use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library
use Test::Nginx qw/ :DEFAULT http_end /;

use IO::Socket::INET;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy rewrite/)->plan(17);

my $config = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass http://127.0.0.1:8081;
        }

        location /daemon {
            proxy_pass http://127.0.0.1:8082;
        }

        location /version {
            return 200 "version %%VERSION%%";
        }
    }

    server {
        listen       127.0.0.1:8081;
        server_name  localhost;

        location / {
            return 200 "backend $connection port $server_port";
        }
    }
}

EOF

(my $c = $config) =~ s/%%VERSION%%/one/;
$t->write_file_expand('nginx.conf', $c);

$t->run_daemon(\&daemon, port(8082));
$t->run();
ok($t->waitforsocket('127.0.0.1:' . port(8082)), 'daemon listens');

###############################################################################

# port mapping: the config's 127.0.0.1:8081 became 127.0.0.1:port(8081)

my $p = port(8081);
like($p, qr/^\d+$/, 'port() is a number');
is(port(8081), $p, 'port() is stable');
isnt(port(8080), $p, 'ports differ');
like($t->read_file('nginx.conf'), qr/127\.0\.0\.1:$p;/, 'config port mapped');

# requests

my $r = http_get('/');
like($r, qr!^HTTP/1\.1 200 OK!, 'http_get status');
like($r, qr/\x0d\x0a\x0d\x0abackend \d+ port $p\z/, 'http_get body from backend');

$r = http_head('/');
like($r, qr!^HTTP/1\.1 200 OK!, 'http_head status');
unlike($r, qr/backend/, 'http_head no body');

my $s = http(<<EOF, start => 1);
GET / HTTP/1.0
Host: localhost

EOF
ok($s, 'http start => 1 returns a socket');
like(http_end($s), qr/200 OK.*backend/s, 'http_end reads the response');

like(http_get('/daemon'), qr/200 OK.*from daemon/s, 'proxied to run_daemon');

# error_log is at debug level (the binary is expected to be --with-debug)

SKIP: {
skip 'no --with-debug', 1 unless $t->has_module('debug');

like($t->read_file('error.log'), qr/\[debug\]/, 'debug lines in error.log');

}

# reload: the new config comes into effect (nginx's own library returns
# right after the signal, so wait for the new workers a little)

like(http_get('/version'), qr/version one/, 'before reload');

($c = $config) =~ s/%%VERSION%%/two/;
$t->write_file_expand('nginx.conf', $c);
$t->reload();

my $version = '';
for (1 .. 50) {
	$version = http_get('/version');
	last if $version =~ /version two/;
	select undef, undef, undef, 0.1;
}

like($version, qr/version two/, 'after reload');

like($t->read_file('error.log'), qr/reconfiguring/, 'reload in error.log');

# testdir() is where %%TEST_GLOBALS%% put nginx's pid file

ok(-f $t->testdir() . '/nginx.pid', 'testdir');

###############################################################################

# A minimal HTTP/1.0 server: answers every request and closes.

sub daemon {
	my ($port) = @_;

	my $server = IO::Socket::INET->new(
		Proto => 'tcp',
		LocalAddr => "127.0.0.1:$port",
		Listen => 5,
		Reuse => 1
	)
		or die "Can't create listening socket: $!\n";

	local $SIG{PIPE} = 'IGNORE';

	while (my $client = $server->accept()) {
		$client->autoflush(1);

		my $headers = '';
		while (<$client>) {
			$headers .= $_;
			last if /^\x0d?\x0a?$/;
		}
		next unless $headers;

		print $client "HTTP/1.0 200 OK\x0d\x0a"
			. "Content-Type: text/plain\x0d\x0a"
			. "Connection: close\x0d\x0a\x0d\x0a"
			. "from daemon";
		close $client;
	}
}

###############################################################################
