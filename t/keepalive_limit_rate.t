#!/usr/bin/perl

# Tests for upstream keepalive with proxy_limit_rate.  A response read
# under proxy_limit_rate leaves the upstream read event "delayed"; if the
# connection is kept that way, the next request on it takes its read timer
# for a rate limiting delay and stalls until proxy_read_timeout.  The
# keepalive module must clear the flag when it keeps the connection.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use Time::HiRes qw/ time /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# proxy_read_timeout is longer than the 8 seconds Test::Nginx's http()
# waits for a response: a stalled request fails outright

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 1;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 10s;
            proxy_limit_rate 40000;
        }
    }
}

EOF

my $blog = $t->testdir() . '/backend.log';

$t->run_daemon(\&http_backend, port(8081), log => $blog);
$t->run()->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start backend";

$t->plan(9);

###############################################################################

# the body is larger than the first read into proxy_buffer_size, so the
# rest is read through the rate limited pipe

my $big = http_get('/big/30000');
like($big, qr/200 OK.*\r\n\r\nx{30000}$/s, 'rate limited response');

# then requests on the same connection, each well under the limit

my $start = time();
my $r = http_get('/small');
my $elapsed = time() - $start;

like($r, qr/^conn=1 req=2 .* uri=\/small body=0$/m, 'next request: response');
is(conn_of($r), conn_of($big), 'next request: connection reused');
cmp_ok($elapsed, '<', 5, 'next request: no stall until proxy_read_timeout');

$start = time();
my $r2 = http_get('/small2');
$elapsed = time() - $start;

like($r2, qr/^conn=1 req=3 .* uri=\/small2 body=0$/m, 'third request: response');
cmp_ok($elapsed, '<', 5, 'third request: no stall');

# once more with a rate limited response in between: the delayed flag is
# cleared every time the connection is kept

like(http_get('/big/30000'), qr/200 OK.*\r\n\r\nx{30000}$/s,
	'rate limited response again');
like(http_get('/small3'), qr/^conn=1 req=5 .* uri=\/small3 body=0$/m,
	'request after it');

is(backend_log_count($blog, qr/^accept /), 1, 'one backend connection');

###############################################################################
