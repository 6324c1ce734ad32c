#!/usr/bin/perl

# Tests for upstream keepalive: the "local" parameter (nginx 1.29.7), an
# idle connection is only reused by requests of the location that opened
# it; without "local" locations share the idle connections.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count /;
use Test::Nginx::Keepalive qw/ status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# nginx's own module has "local" from 1.29.7 on: without this module the
# file tests that one, and before 1.29.7 there is nothing to test

plan(skip_all => 'keepalive_slice module not loaded, no "local" in nginx '
	. 'before 1.29.7')
	unless slice_module() or $t->has_version('1.29.7');
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream local {
        server 127.0.0.1:8081;
        keepalive 4 local;
    }

    upstream shared {
        server 127.0.0.1:8082;
        keepalive 4;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /a/ {
            proxy_pass http://local;
        }

        location /b/ {
            proxy_pass http://local;
        }

        location /sa/ {
            proxy_pass http://shared;
        }

        location /sb/ {
            proxy_pass http://shared;
        }
    }
}

EOF

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/local.log");
$t->run_daemon(\&http_backend, port(8082), log => "$d/shared.log");

$t->run();

$t->waitforsocket('127.0.0.1:' . port($_)) for 8081 .. 8082;

$t->plan(8);

###############################################################################

# "local": /b/ does not take the connection /a/ left idle, each location
# reuses its own

my @r = map { http_get($_) } qw{ /a/ /b/ /a/ /b/ /a/ };

is(join(' ', map { status_of($_) // 'none' } @r), '200 200 200 200 200',
	'local: all 200');
is(join(' ', map { conn_of($_) // 'none' } @r), '1 2 1 2 1',
	'local: one connection per location');
is(join(' ', map { req_of($_) // 'none' } @r), '1 1 2 2 3',
	'local: each location reuses its own connection');
is(backend_log_count("$d/local.log", qr/^accept /), 2,
	'local: two connections opened');
is(backend_log_count("$d/local.log", qr/^close /), 0,
	'local: none closed');

# without "local": the locations share the idle connection

@r = map { http_get($_) } qw{ /sa/ /sb/ /sa/ /sb/ };

is(join(' ', map { conn_of($_) // 'none' } @r), '1 1 1 1',
	'shared: one connection for both locations');
is(join(' ', map { req_of($_) // 'none' } @r), '1 2 3 4',
	'shared: request counters');
is(backend_log_count("$d/shared.log", qr/^accept /), 1,
	'shared: one connection opened');

###############################################################################
