#!/usr/bin/perl

# Tests for upstream keepalive: an idle TLS connection that presented a
# client certificate is only reused by requests that present the same
# one, and a connection that presented none only by requests that present
# none.  Locations with and without proxy_ssl_certificate to one upstream,
# in both orders, and a certificate chosen per request by a variable.  The
# same holds for TLS sessions: a new connection only resumes a session
# saved by a request that presented the same certificate (the backend
# takes the client certificate from the resumed session).
#
# The backend is a TLS server block of the same nginx that asks for a
# client certificate (ssl_verify_client optional_no_ca) and reports the
# subject it received, whether the session was resumed and its connection
# number.
#
# With nginx's own keepalive module the scenario assertions fail: the
# connection that presented tenant-a's certificate serves the location
# without one, and the other way round; and a new connection resumes the
# session of the other location.

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

my $t = Test::Nginx->new()->has(qw/http http_ssl proxy map upstream_keepalive/)
	->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u_first {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_second {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_var {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    upstream u_long {
        server 127.0.0.1:8081;
        keepalive 16;
    }

    # every request on a new connection, resuming a session if it may

    upstream u_sessions {
        server 127.0.0.1:8081;
        keepalive 16;
        keepalive_requests 1;
    }

    map $host $tenant_crt {
        a.test  tenant-a.crt;
        b.test  tenant-b.crt;
        default "";
    }

    map $host $tenant_key {
        a.test  tenant-a.key;
        b.test  tenant-b.key;
        default "";
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /first/cert/ {
            proxy_pass https://u_first;
            proxy_ssl_certificate tenant-a.crt;
            proxy_ssl_certificate_key tenant-a.key;
        }

        location /first/none/ {
            proxy_pass https://u_first;
        }

        location /second/cert/ {
            proxy_pass https://u_second;
            proxy_ssl_certificate tenant-a.crt;
            proxy_ssl_certificate_key tenant-a.key;
        }

        location /second/none/ {
            proxy_pass https://u_second;
        }

        location /sessions/cert/ {
            proxy_pass https://u_sessions;
            proxy_ssl_certificate tenant-a.crt;
            proxy_ssl_certificate_key tenant-a.key;
        }

        location /sessions/none/ {
            proxy_pass https://u_sessions;
        }

%%VARIABLE_CERTIFICATES%%
    }

    server {
        listen       127.0.0.1:8081 ssl;
        server_name  localhost;

        ssl_certificate localhost.crt;
        ssl_certificate_key localhost.key;
        ssl_verify_client optional_no_ca;
        ssl_session_cache shared:SSL:1m;

        location / {
            add_header X-Conn $connection always;
            add_header X-DN "dn:$ssl_client_s_dn" always;
            add_header X-Reused $ssl_session_reused always;
            return 200 "backend\n";
        }
    }
}

EOF

# proxy_ssl_certificate takes variables from nginx 1.21.0 on; before, the
# certificate is part of the SSL context, which the identity already has

my $variables = $t->has_version('1.21.0');

my $var_locations = <<'EOF';

        location /var/ {
            proxy_pass https://u_var;
            proxy_ssl_certificate $tenant_crt;
            proxy_ssl_certificate_key $tenant_key;
        }

        # certificate paths too long for the room a bucket keeps for the
        # identity: the connection is not kept, the request unaffected

        location /long/ {
            set $long_crt %%LONG%%tenant-a.crt;
            set $long_key %%LONG%%tenant-a.key;
            proxy_pass https://u_long;
            proxy_ssl_certificate $long_crt;
            proxy_ssl_certificate_key $long_key;
        }
EOF

my $conf = $t->read_file('nginx.conf');
my $long = './' x 100;
$conf =~ s/%%VARIABLE_CERTIFICATES%%\n/$variables ? $var_locations : ''/e;
$conf =~ s/%%LONG%%/$long/g;
$t->write_file('nginx.conf', $conf);

ssl_certificates($t, 'localhost', 'tenant-a', 'tenant-b');

$t->run()->plan(16);

###############################################################################

sub get {
	my ($host, $uri) = @_;
	my $r = http_get_host($host, $uri);
	return {
		status => status_of($r) // 'none',
		conn => header_of($r, 'X-Conn') // 'none',
		dn => header_of($r, 'X-DN') // 'none',
		reused => header_of($r, 'X-Reused') // 'none',
	};
}

sub dns {
	return join ' ', map { $_->{dn} } @_;
}

sub conns {
	return join ' ', map { $_->{conn} } @_;
}

###############################################################################

# with a certificate first, then without, alternating

my @f = map { get('localhost', "/first/$_/") } (qw/ cert none /) x 3;

is(dns(@f), join(' ', ('dn:CN=tenant-a', 'dn:') x 3),
	'certificate first: each location presents its own');
is(conns(@f[0, 2, 4]), join(' ', ($f[0]{conn}) x 3),
	'certificate first: its connection reused');
is(conns(@f[1, 3, 5]), join(' ', ($f[1]{conn}) x 3),
	'certificate first: the other location\'s connection reused');
isnt($f[0]{conn}, $f[1]{conn}, 'certificate first: not shared');

# without a certificate first

my @s = map { get('localhost', "/second/$_/") } (qw/ none cert /) x 3;

is(dns(@s), join(' ', ('dn:', 'dn:CN=tenant-a') x 3),
	'no certificate first: each location presents its own');
isnt($s[0]{conn}, $s[1]{conn}, 'no certificate first: not shared');
is(conns(@s[1, 3, 5]), join(' ', ($s[1]{conn}) x 3),
	'no certificate first: the certificate\'s connection reused');

# a certificate chosen per request: tenant-a, tenant-b, none

SKIP: {
skip 'variables in proxy_ssl_certificate need nginx 1.21.0', 3 unless $variables;

my @v = map { get($_, '/var/') } (qw/ a.test b.test c.test /) x 3;

is(dns(@v), join(' ', ('dn:CN=tenant-a', 'dn:CN=tenant-b', 'dn:') x 3),
	'variable certificate: each request presents its own');

my %by_dn;
$by_dn{$_->{dn}}{$_->{conn}} = 1 for @v;

is(join(' ', map { scalar keys %{$by_dn{$_}} } sort keys %by_dn), '1 1 1',
	'variable certificate: one connection per certificate');
is(scalar keys %{{ map { $_->{conn} => 1 } @v }}, 3,
	'variable certificate: three connections');

}

# sessions: the balancer keeps the session of the last handshake; a new
# connection resumes it only if it was saved with the same certificate

my @n = map { get('localhost', "/sessions/$_/") } qw/ cert cert none none cert none /;

is(dns(@n), join(' ', ('dn:CN=tenant-a') x 2, ('dn:') x 2, 'dn:CN=tenant-a', 'dn:'),
	'sessions: each location presents its own certificate');
is(join(' ', map { $_->{reused} } @n), '. r . r . .',
	'sessions: resumed only after the same location');
is(scalar keys %{{ map { $_->{conn} => 1 } @n }}, 6, 'sessions: new connections');

# an identity too long to keep: every request answered, on a new connection

SKIP: {
skip 'variables in proxy_ssl_certificate need nginx 1.21.0', 3 unless $variables;

my @l = map { get('localhost', '/long/') } 1 .. 3;

is(join(' ', map { "$_->{status} $_->{dn}" } @l),
	join(' ', ('200 dn:CN=tenant-a') x 3), 'long identity: answered');
is(scalar keys %{{ map { $_->{conn} => 1 } @l }}, 3,
	'long identity: connections not kept');

SKIP: {
skip 'its log line needs the keepalive_slice module', 1 unless slice_module();

like($t->read_file('error.log'),
	qr/\[info\].*connection not kept, its address and TLS identity .* take \d+ bytes, more than the 388/,
	'long identity: logged at info');

}

}

###############################################################################
