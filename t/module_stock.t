#!/usr/bin/perl

# Tests for the keepalive slice module: in every upstream where the module
# handles "keepalive", nginx's own keepalive cache is switched off, so that
# one cache only holds the connections (from nginx 1.29.7 the stock module
# would otherwise enable itself there and take them all).  Explicit
# upstreams without the directive: from 1.29.7, where nginx caches them by
# default, the module takes them over with nginx's defaults (and the stock
# cache is off there too; t/keepalive_default.t checks the behaviour);
# before 1.29.7 nothing caches them, and the module leaves them alone.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of /;
use Test::Nginx::Keepalive qw/ reload_wait slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded') unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream plain {
        server 127.0.0.1:8081;
        keepalive 4;
    }

    upstream sliced {
        server 127.0.0.1:8081;
        keepalive 4 slice_key=$host slice_conn=2;
    }

    upstream none {
        server 127.0.0.1:8081;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /plain/ {
            proxy_pass http://plain;
        }

        location /sliced/ {
            proxy_pass http://sliced;
        }
    }
}

EOF

$t->run_daemon(\&http_backend, port(8081));
$t->run()->waitforsocket('127.0.0.1:' . port(8081));
$t->plan(6);

###############################################################################

# Configuration-time debug lines reach error.log on a reload (at the first
# start nginx logs at "notice" until the configuration is read).

reload_wait($t);

my $stock = `$Test::Nginx::NGINX -V 2>&1` !~ /--without-http_upstream_keepalive_module/;
my $log = $t->read_file('error.log');
my @off = $log =~ /nginx's own keepalive cache off in upstream "(\w+)"/g;

is(join(',', sort @off), $stock ? 'plain,sliced' : '',
	$stock ? 'stock cache off where the module keeps connections'
		: 'no stock module, nothing to switch off');
unlike($log, qr/off in upstream "none"/, 'upstream without keepalive: no keepalive line to switch');

my @default = $log =~ /upstream "(\w+)" without keepalive served as nginx's default/g;

if ($stock && $t->has_version('1.29.7')) {
	is(join(',', @default), 'none',
		'nginx 1.29.7+: the upstream without keepalive served by the module');
} else {
	is(join(',', @default), '', $stock
		? 'before nginx 1.29.7: the upstream without keepalive left alone'
		: 'no stock module: no default cache to take over');
}

# and the connections are this module's: reused through it

my $c1 = conn_of(http_get('/plain/1'));
my $c2 = conn_of(http_get('/plain/2'));
is($c2, $c1, 'plain upstream reuses its connection');
like($t->read_file('error.log'),
	qr/get keepalive slice peer: using connection/, 'reused by this module');
unlike($t->read_file('error.log'), qr/get keepalive peer: using connection/,
	'never by the stock cache');

###############################################################################
