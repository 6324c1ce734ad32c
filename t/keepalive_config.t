#!/usr/bin/perl

# Tests for upstream keepalive: configuration.  Bad "keepalive",
# "keepalive_timeout", "keepalive_time", "keepalive_requests",
# "keepalive_hints" and "keepalive_hint_margin" in
# upstream{} make "nginx -t" fail with an [emerg] naming the directive and
# the value; good ones pass, in any order inside upstream{}, and the
# client side keepalive_* directives at http/server/location level are
# left to nginx's core module.  Needs this module: the messages, "local",
# "keepalive 0" and the slice parameters are its own.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count /;
use Test::Nginx::Keepalive qw/ nginx_test_config slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

###############################################################################

# A complete configuration around an upstream{} block body and, optionally,
# extra directives for the http, server and location levels.

sub conf {
	my ($upstream, %extra) = @_;

	my $http = $extra{http} // '';
	my $server = $extra{server} // '';
	my $location = $extra{location} // '';

	return <<"EOF";

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    $http

    upstream u {
        server 127.0.0.1:8081;
        $upstream
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        $server

        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";

            $location
        }
    }
}

EOF
}

# Runs "nginx -t" on the configuration, written to a file of its own;
# returns the exit status and what nginx printed.  nginx logs into the
# test's error.log, which Test::Nginx checks for alerts at the end.

my $n = 0;

sub test_conf {
	my ($t, $conf) = @_;
	return nginx_test_config($t, 'test' . ++$n . '.conf', $conf,
		'error.log');
}

# "nginx -t" must fail, with the [emerg] line matching $re.

sub bad {
	my ($t, $upstream, $re, $name, %extra) = @_;

	my ($status, $out) = test_conf($t, conf($upstream, %extra));

	subtest $name => sub {
		plan(tests => 2);
		isnt($status, 0, 'nginx -t fails');
		like($out, qr/\[emerg\] $re/, 'emerg message');
	};
}

# "nginx -t" must succeed.

sub good {
	my ($t, $name, $upstream, %extra) = @_;

	my ($status, $out) = test_conf($t, conf($upstream, %extra));

	subtest $name => sub {
		plan(tests => 2);
		is($status, 0, 'nginx -t succeeds');
		like($out, qr/test is successful/, 'nginx says so');
	};
}

###############################################################################

$t->plan(34);

# bad values

bad($t, 'keepalive abc;',
	qr/invalid value "abc" in "keepalive" directive/,
	'keepalive abc');
bad($t, 'keepalive -1;',
	qr/invalid value "-1" in "keepalive" directive/,
	'keepalive -1');
bad($t, 'keepalive 8 foo;',
	qr/invalid parameter "foo" in "keepalive" directive/,
	'keepalive 8 foo');
bad($t, 'keepalive 8 local local;',
	qr/duplicate parameter "local" in "keepalive" directive/,
	'keepalive 8 local local');
bad($t, "keepalive 8;\n keepalive 4;",
	qr/"keepalive" directive is duplicate/,
	'keepalive twice');
bad($t, 'keepalive;',
	qr/invalid number of arguments in "keepalive" directive/,
	'keepalive without arguments');
bad($t, "keepalive 8;\n keepalive_timeout abc;",
	qr/"keepalive_timeout" directive invalid value/,
	'keepalive_timeout abc');
bad($t, "keepalive 8;\n keepalive_time 1x;",
	qr/"keepalive_time" directive invalid value/,
	'keepalive_time 1x');
bad($t, "keepalive 8;\n keepalive_requests abc;",
	qr/"keepalive_requests" directive invalid number/,
	'keepalive_requests abc');

bad($t, "keepalive 8;\n keepalive_hints maybe;",
	qr/invalid value "maybe" in "keepalive_hints" directive, it must be "on" or "off"/,
	'keepalive_hints maybe');
bad($t, "keepalive 8;\n keepalive_hint_margin abc;",
	qr/invalid value "abc" in "keepalive_hint_margin" directive/,
	'keepalive_hint_margin abc');
bad($t, "keepalive 8;\n keepalive_hint_margin -1s;",
	qr/invalid value "-1s" in "keepalive_hint_margin" directive/,
	'keepalive_hint_margin -1s');
bad($t, "keepalive 8;\n keepalive_hints on;\n keepalive_hints off;",
	qr/"keepalive_hints" directive is duplicate/,
	'keepalive_hints twice');
bad($t, "keepalive 8;\n keepalive_hint_margin 1s;\n keepalive_hint_margin 2s;",
	qr/"keepalive_hint_margin" directive is duplicate/,
	'keepalive_hint_margin twice');
bad($t, "keepalive 8;\n keepalive_hint_margin;",
	qr/invalid number of arguments in "keepalive_hint_margin" directive/,
	'keepalive_hint_margin without a value');
bad($t, 'keepalive 8;',
	qr/"keepalive_hints" directive is not allowed here/,
	'keepalive_hints outside upstream{}', location => 'keepalive_hints off;');

# good values

good($t, 'keepalive_hints, keepalive_hint_margin',
	"keepalive 8;\n keepalive_hints off;\n keepalive_hint_margin 500ms;");
good($t, 'keepalive_hint_margin 0 before keepalive',
	"keepalive_hint_margin 0;\n keepalive_hints on;\n keepalive 8;");

good($t, 'keepalive 0', 'keepalive 0;');
good($t, 'keepalive 16 local', 'keepalive 16 local;');
good($t, 'keepalive_* after keepalive',
	"keepalive 8;\n keepalive_timeout 30s;\n keepalive_requests 10;\n"
	. " keepalive_time 1h;");
good($t, 'keepalive_* before keepalive',
	"keepalive_timeout 30s;\n keepalive_requests 10;\n"
	. " keepalive_time 1h;\n keepalive 8;");
good($t, 'keepalive_* without keepalive',
	"keepalive_timeout 30s;\n keepalive_requests 10;\n keepalive_time 1h;");
good($t, 'slice parameters', 'keepalive 8 slice_key=$host slice_conn=2;');

my $client = 'keepalive_timeout 30s 20s; keepalive_requests 50; '
	. 'keepalive_time 10m;';

good($t, 'client side keepalive_* at every level', 'keepalive 8;',
	http => $client, server => $client, location => $client);

# the module is the one handling "keepalive": without it, nginx's own
# module refuses the slice parameters (on every version: it takes one
# argument, or two from 1.29.7 on), and an nginx built
# --without-http_upstream_keepalive_module knows no "keepalive" at all.
# "local" is nginx's own from 1.29.7 on, accepted without the module
# there, and refused before.  A module linked in with --add-module cannot
# be left out.

SKIP: {
	skip 'module linked into nginx, cannot be left out', 4
		unless ($ENV{TEST_NGINX_GLOBALS} // '') =~ /keepalive_slice/;

	my $globals = $t->test_globals();
	$globals =~ s/load_module\s+\S*keepalive_slice\S*\s*;//g;

	my $without_module = sub {
		(my $conf = conf(shift))
			=~ s/%%TEST_GLOBALS%%/%%TEST_GLOBALS%%\n%%NO_MODULE%%/;
		$conf =~ s/%%TEST_GLOBALS%%\n%%NO_MODULE%%/$globals/;
		return test_conf($t, $conf);
	};

	my $stock = `$Test::Nginx::NGINX -V 2>&1`
		!~ /--without-http_upstream_keepalive_module/;
	my $refused = qr/\[emerg\] (invalid number of arguments in|unknown directive) "keepalive"/;

	my ($status, $out) = $without_module->(
		'keepalive 8 slice_key=$host slice_conn=2;');

	like($out, $refused, 'without the module: slice parameters refused');
	isnt($status, 0, 'without the module: nginx -t fails');

	($status, $out) = $without_module->('keepalive 8 local;');

	if ($stock && $t->has_version('1.29.7')) {
		is($status, 0, 'without the module: "local" is nginx\'s own '
			. 'from 1.29.7, accepted');
		unlike($out, qr/\[emerg\]/, 'without the module: no emerg');
	} else {
		like($out, $refused, 'without the module: "local" refused '
			. ($stock ? 'before nginx 1.29.7' : 'without the stock module'));
		isnt($status, 0, 'without the module: "local" fails nginx -t');
	}
}

# at run time: keepalive_requests given before keepalive takes effect, and
# the client side directives are nginx's own (Keep-Alive: timeout=20)

$t->write_file_expand('nginx.conf', conf(
	"keepalive_requests 2;\n keepalive_timeout 30s;\n keepalive 8;",
	location => 'keepalive_timeout 30s 20s;'));

my $blog = $t->testdir() . '/backend.log';

$t->run_daemon(\&http_backend, port(8081), log => $blog);
$t->run()->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start backend";

my @r = map { http_get("/$_") } 1 .. 3;

is(join(' ', map { conn_of($_) // 'none' } @r[0, 1]), '1 1',
	'keepalive_requests first: reused');
like($r[1], qr/^X-Request: 2\r?$/m, 'keepalive_requests first: 2 requests');
is(conn_of($r[2]) // 'none', 2,
	'keepalive_requests first: then a new connection');
like($t->read_file('error.log'),
	qr/not saving: keepalive_requests reached/,
	'keepalive_requests first: module log');

my $r = http(<<EOF);
GET /a HTTP/1.1
Host: localhost

GET /b HTTP/1.1
Host: localhost
Connection: close

EOF

like($r, qr/^Keep-Alive: timeout=20\r?$/m,
	'client keepalive_timeout header');

###############################################################################
