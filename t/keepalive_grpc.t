#!/usr/bin/perl

# Tests for upstream keepalive: grpc_pass.  The grpc module marks an HTTP/2
# upstream connection keepalive-able at the end of each stream; the idle
# connection is reused, and with slicing only for its own Host.  The
# backend is an HTTP/2 server block of the same nginx reporting its
# $connection and $connection_requests.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_get_host header_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_v2 grpc upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream shared {
        server 127.0.0.1:8081;
        keepalive 4;
    }

    upstream sliced {
        server 127.0.0.1:8082;
        %%SLICED%%
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        grpc_set_header Host $host;

        location /shared/ {
            grpc_pass grpc://shared;
        }

        location /sliced/ {
            grpc_pass grpc://sliced;
        }
    }

    server {
        listen       127.0.0.1:8081%%LISTEN_HTTP2%%;
        listen       127.0.0.1:8082%%LISTEN_HTTP2%%;
        %%HTTP2_ON%%
        server_name  localhost;

        location / {
            add_header X-Conn $connection;
            add_header X-Requests $connection_requests;
            return 200 "host=$host\n";
        }
    }
}

EOF

# slice parameters exist only with the module; stock nginx gets plain
# keepalive there and the sliced checks are skipped

my $module = slice_module();
my $conf = $t->read_file('nginx.conf');
my $sliced = $module ? 'keepalive 4 slice_key=$host slice_conn=1;' : 'keepalive 4;';
$conf =~ s/%%SLICED%%/$sliced/;

# "http2 on" since 1.25.1, "listen ... http2" before (Debian's 1.22)

my $http2_on = $t->has_version('1.25.1');
$conf =~ s/%%LISTEN_HTTP2%%/$http2_on ? '' : ' http2'/ge;
$conf =~ s/%%HTTP2_ON%%/$http2_on ? 'http2 on;' : ''/ge;
$t->write_file('nginx.conf', $conf);

$t->try_run('no grpc')->plan(9);

###############################################################################

# one backend connection serves every request, one stream after another

my @shared = map { http_get_host('localhost', '/shared/') } 1 .. 3;

is(join(' ', map { header_of($_, 'X-Requests') // 'none' } @shared), '1 2 3',
	'grpc: one connection, streams 1 2 3');
is(scalar(keys %{{ map { (header_of($_, 'X-Conn') // 'none') => 1 } @shared }}),
	1, 'grpc: the same backend connection');
like($shared[2], qr/host=localhost/, 'grpc: response body');

SKIP: {
skip 'keepalive_slice module not loaded', 6 unless $module;

# a and b interleaved: each host keeps its own HTTP/2 connection

my @r = map { http_get_host("$_.example", '/sliced/') } qw/ a b a b a /;
my @conn = map { header_of($_, 'X-Conn') // 'none' } @r;

isnt($conn[0], $conn[1], 'sliced grpc: a and b on different connections');
is("@conn[0, 2, 4]", join(' ', ($conn[0]) x 3), 'sliced grpc: a reuses its own');
is("@conn[1, 3]", join(' ', ($conn[1]) x 2), 'sliced grpc: b reuses its own');
is(join(' ', map { header_of($_, 'X-Requests') // 'none' } @r), '1 1 2 2 3',
	'sliced grpc: streams per connection');
like($r[3], qr/host=b\.example/, 'sliced grpc: b answered for b');

like($t->read_file('error.log'), qr/get keepalive slice peer: using connection/,
	'sliced grpc: reused by the module');

}

###############################################################################
