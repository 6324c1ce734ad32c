#!/usr/bin/perl

# Tests for upstream keepalive: many TLS names on one upstream.  With
# proxy_ssl_name $host each Host is a TLS identity of its own; the module
# keeps the addresses of the first 32 identities of an upstream and builds
# the others per try (kept then in the room of the cache for long
# addresses).  Past the 32 as before them, every request is sent with its
# own SNI name and reuses a connection of its own name, never another's.
#
# The backend is a TLS server block of the same nginx answering for any
# name and reporting the SNI name it received and its connection number.
#
# With nginx's own keepalive module the assertions fail: it reuses the
# connection opened for one name for the next name's request.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_get_host status_of header_of
	ssl_certificates /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()
	->has(qw/http http_ssl proxy upstream_keepalive/)
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
        keepalive 64;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            proxy_pass https://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_name $host;
            proxy_ssl_server_name on;
        }
    }

    server {
        listen       127.0.0.1:8081 ssl;
        server_name  _;

        ssl_certificate a.test.crt;
        ssl_certificate_key a.test.key;

        location / {
            add_header X-Conn $connection always;
            add_header X-SNI "sni:$ssl_server_name" always;
            return 200 "backend $host\n";
        }
    }
}

EOF

ssl_certificates($t, 'a.test');

$t->run()->plan(5);

###############################################################################

sub get {
	my ($host) = @_;
	my $r = http_get_host($host, '/');
	return {
		status => status_of($r) // 'none',
		conn => header_of($r, 'X-Conn') // 'none',
		sni => header_of($r, 'X-SNI') // 'none',
	};
}

# 48 names, each twice in a row of rounds: the second round finds each
# name's own idle connection, kept (the first 32) or built per try (the
# other 16)

my @hosts = map { "h$_.test" } 1 .. 48;
my @first = map { get($_) } @hosts;
my @second = map { get($_) } @hosts;

is(join(' ', map { $_->{status} } @first, @second),
	join(' ', ('200') x 96), 'all answered');
is(join(' ', map { $_->{sni} } @first), join(' ', map { "sni:$_" } @hosts),
	'first round: each request sent with its own name');
is(join(' ', map { $_->{sni} } @second), join(' ', map { "sni:$_" } @hosts),
	'second round: each request sent with its own name');

my %distinct = map { $_->{conn} => 1 } @first;
is(scalar keys %distinct, 48, 'first round: a connection per name');

my @mismatch = grep { $first[$_]{conn} ne $second[$_]{conn} } 0 .. $#hosts;
is("@mismatch", '', 'second round: each name reuses its own connection');

###############################################################################
