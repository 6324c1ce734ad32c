#!/usr/bin/perl

# Tests for upstream keepalive: an idle TLS connection is only reused by a
# request that would have opened it the same way.  A connection carries
# the SNI name it sent, the name and trusted certificates it was verified
# with and whether it was verified at all; a request for another name, or
# from a location with other verification settings, gets a connection of
# its own, and the same status it gets on a fresh connection.  Requests
# with the same TLS identity share connections as before, across
# locations too, sliced and unsliced.  TLS sessions follow the same rule:
# a new connection does not resume a session verified under other settings
# (its stored verification result would stand for its own), with and
# without an upstream zone, where sessions are kept serialized.
#
# The backend is a TLS server block of the same nginx with a certificate
# valid for a.test only, answering for a.test and b.test and reporting the
# SNI name it received, whether the session was resumed and its
# connection number.
#
# With nginx's own keepalive module the scenario assertions fail: it hands
# a.test's verified connection to b.test (200 instead of 502), sends b.test
# over a connection whose SNI was a.test, lets an unverified connection
# serve a location that verifies, and lets a location resume the session
# another location verified with other trusted certificates (200 instead
# of 502).

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_get_host status_of header_of
	ssl_certificates slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()
	->has(qw/http http_ssl proxy upstream_keepalive upstream_zone/)
	->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_verify {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_settings {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_sliced {
        server 127.0.0.1:8081;
        %%SLICED%%
    }

    # every request on a new connection, resuming a session if it may

    upstream u_sessions {
        server 127.0.0.1:8081;
        keepalive 16;
        keepalive_requests 1;
    }

    upstream u_sessions_zone {
        zone sessions 64k;
        server 127.0.0.1:8081;
        keepalive 16;
        keepalive_requests 1;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;

        # the certificate is valid for a.test only

        location /verify/ {
            proxy_pass https://u_verify;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate a.test.crt;
            proxy_ssl_name $host;
            proxy_ssl_server_name on;
        }

        # SNI of the request's own Host, no verification; two locations
        # with the same TLS settings

        location /sni/ {
            proxy_pass https://u;
            proxy_ssl_name $host;
            proxy_ssl_server_name on;
        }

        location /sni2/ {
            proxy_pass https://u;
            proxy_ssl_name $host;
            proxy_ssl_server_name on;
        }

        location /sliced/ {
            proxy_pass https://u_sliced;
            proxy_ssl_name $host;
            proxy_ssl_server_name on;
        }

        # no verification, then verification against a certificate that
        # did not issue the backend's: never a 200

        location /off/ {
            proxy_pass https://u_settings;
            proxy_ssl_verify off;
        }

        location /on/ {
            proxy_pass https://u_settings;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate other.crt;
            proxy_ssl_name a.test;
        }

        # a session verified with the issuer trusted, then a location that
        # does not trust it

        location /sessions/trusted/ {
            proxy_pass https://u_sessions;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate a.test.crt;
            proxy_ssl_name a.test;
        }

        location /sessions/untrusted/ {
            proxy_pass https://u_sessions;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate other.crt;
            proxy_ssl_name a.test;
        }

        location /zone/trusted/ {
            proxy_pass https://u_sessions_zone;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate a.test.crt;
            proxy_ssl_name a.test;
        }

        location /zone/untrusted/ {
            proxy_pass https://u_sessions_zone;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate other.crt;
            proxy_ssl_name a.test;
        }
    }

    server {
        listen       127.0.0.1:8081 ssl;
        server_name  a.test b.test;

        ssl_certificate a.test.crt;
        ssl_certificate_key a.test.key;
        ssl_session_cache shared:SSL:1m;

        location / {
            add_header X-Conn $connection always;
            add_header X-SNI "sni:$ssl_server_name" always;
            add_header X-Reused $ssl_session_reused always;
            return 200 "backend $host\n";
        }
    }
}

EOF

# slice parameters exist only with this module; nginx's own gets the same
# upstream unsliced

my $module = slice_module();
my $conf = $t->read_file('nginx.conf');
my $sliced = $module ? 'keepalive 16 slice_key=$host slice_conn=4;' : 'keepalive 16;';
$conf =~ s/%%SLICED%%/$sliced/;
$t->write_file('nginx.conf', $conf);

ssl_certificates($t, 'a.test', 'other');

$t->run()->plan(24);

###############################################################################

sub get {
	my ($host, $uri) = @_;
	my $r = http_get_host($host, $uri);
	return {
		status => status_of($r) // 'none',
		conn => header_of($r, 'X-Conn') // 'none',
		sni => header_of($r, 'X-SNI') // 'none',
		reused => header_of($r, 'X-Reused') // 'none',
	};
}

sub statuses {
	return join ' ', map { $_->{status} } @_;
}

###############################################################################

# verification bypass: b.test fails verification on a fresh connection;
# once a.test's verified connection is idle, b.test still fails

my @v = map { get($_, '/verify/') } qw/ b.test a.test b.test a.test b.test /;

is($v[0]{status}, 502, 'verify: b.test on a fresh connection');
is($v[1]{status}, 200, 'verify: a.test');
is($v[2]{status}, 502, 'verify: b.test with a.test idle, as on a fresh one');
is($v[3]{status}, 200, 'verify: a.test again');
is($v[3]{conn}, $v[1]{conn}, 'verify: a.test reuses its verified connection');
is($v[4]{status}, 502, 'verify: b.test again');

# SNI: every response reports the SNI of its own Host

my @hosts = (qw/ a.test b.test /) x 10;
my @s = map { get($_, '/sni/') } @hosts;

is(join(' ', map { $_->{sni} } @s), join(' ', map { "sni:$_" } @hosts),
	'sni: each request sent with its own name');
is(statuses(@s), join(' ', ('200') x 20), 'sni: all answered');

my @a = map { $s[2 * $_]{conn} } 0 .. 9;
my @b = map { $s[2 * $_ + 1]{conn} } 0 .. 9;

is("@a", join(' ', ($a[0]) x 10), 'sni: a.test reuses one connection');
is("@b", join(' ', ($b[0]) x 10), 'sni: b.test reuses one connection');
isnt($a[0], $b[0], 'sni: a.test and b.test do not share');

# the same TLS identity from another location shares the connection: the
# locations inherit one SSL context (since nginx 1.23.1; before, every
# location made its own, and a connection verified under one context is
# not handed to another)

my @s2 = map { get($_, '/sni2/') } qw/ a.test b.test /;

if ($t->has_version('1.23.1')) {
	is($s2[0]{conn}, $a[0], 'same identity, other location: a.test connection reused');
	is($s2[1]{conn}, $b[0], 'same identity, other location: b.test connection reused');
} else {
	isnt($s2[0]{conn}, $a[0], 'other SSL context: a.test connection not reused');
	isnt($s2[1]{conn}, $b[0], 'other SSL context: b.test connection not reused');
}
is(join(' ', map { $_->{sni} } @s2), 'sni:a.test sni:b.test',
	'same identity, other location: names');

# verification off, then on: the location that verifies never gets the
# unverified connection

my @o = (get('a.test', '/on/'), get('a.test', '/off/'), get('a.test', '/on/'),
	get('a.test', '/off/'), get('a.test', '/on/'));

is($o[0]{status}, 502, 'settings: verifying location on a fresh connection');
is(statuses(@o[1, 3]), '200 200', 'settings: location without verification');
is(statuses(@o[2, 4]), '502 502',
	'settings: verifying location after the unverified one');
is($o[3]{conn}, $o[1]{conn}, 'settings: unverified connection reused by its location');

# sessions: the location that does not trust the issuer never resumes the
# session verified by the one that does (its stored result is "verified")

for my $prefix ('/sessions', '/zone') {
	my @r = map { get('a.test', "$prefix/$_/") }
		qw/ trusted trusted untrusted untrusted /;
	is(join(' ', map { "$_->{status}$_->{reused}" } @r),
		'200. 200r 502none 502none',
		"$prefix: resumed by the same settings only");
}

# sliced by $host: one connection per host, each with its own name

SKIP: {
skip 'slice parameters need the keepalive_slice module', 3 unless $module;

my @l = map { get($_, '/sliced/') } (qw/ a.test b.test /) x 4;
my %conns;
push @{$conns{$_->{sni}}}, $_->{conn} for @l;

is(join(' ', sort keys %conns), 'sni:a.test sni:b.test', 'sliced: names');
is(join(' ', map { scalar keys %{{ map { $_ => 1 } @{$conns{$_}} }} }
	sort keys %conns), '1 1', 'sliced: one connection per host');
isnt($conns{'sni:a.test'}[0], $conns{'sni:b.test'}[0], 'sliced: not shared');

}

# the debug log says which identity a connection has, on reuse and keep

SKIP: {
skip 'identity in the debug log needs the keepalive_slice module', 1
	unless $module;
skip 'no debug log', 1 unless $t->has_module('debug');

my $log = $t->read_file('error.log');
ok($log =~ /using connection \S+: ngx_http_proxy_module, tls ctx 0x[0-9a-f]+ verify off server_name on name "b\.test"/
	&& $log =~ /saving connection \S+: ngx_http_proxy_module, tls ctx 0x[0-9a-f]+ verify on server_name on name "a\.test"/
	&& $log =~ /saving connection \S+: ngx_http_proxy_module, tls ctx 0x[0-9a-f]+ verify off server_name on name "a\.test", key "a\.test"/
	&& $log =~ /no idle connection for ngx_http_proxy_module, tls ctx 0x[0-9a-f]+ verify on server_name on name "b\.test"/,
	'debug log: identity on reuse and keep');

}

###############################################################################
