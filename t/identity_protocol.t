#!/usr/bin/perl

# Tests for upstream keepalive: an idle connection is only reused by a
# request of the protocol that opened it.  Locations proxying over
# HTTP/1.1, over HTTP/2 (proxy_http_version 2, nginx 1.29.4 and later) and
# gRPC to one upstream address, requests alternating: each location keeps
# its own connection, every request is answered over its own protocol,
# and no connection is ever handed to the wrong protocol (which nginx
# logs as an upstream error, and retries on a new connection, or answers
# 502 or 504).
#
# The backend is a server block of the same nginx that speaks HTTP/1.1 and
# HTTP/2 without TLS on one port (nginx 1.25.1 and later) and reports the
# protocol and the connection of each request.
#
# With nginx's own keepalive module the scenario assertions fail: the
# HTTP/1.1 connection is handed to the gRPC request and the other way
# round.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_get_host status_of header_of errlog_count
	slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http http_v2 proxy grpc upstream_keepalive/);

# the backend needs HTTP/1.1 and HTTP/2 without TLS on one port

plan(skip_all => 'HTTP/1.1 and HTTP/2 on one plain port need nginx 1.25.1')
	unless $t->has_version('1.25.1');

# proxy_http_version 2 exists since 1.29.4 (first stable: 1.30)

my $h2 = $t->has_version('1.29.4');

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

    upstream u_sliced {
        server 127.0.0.1:8081;
        %%SLICED%%
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_set_header Host $host;
        grpc_set_header Host $host;

        location /h1/ {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /grpc/ {
            grpc_pass grpc://u;
        }

        location /sliced/h1/ {
            proxy_pass http://u_sliced;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /sliced/grpc/ {
            grpc_pass grpc://u_sliced;
        }

        %%H2%%
    }

    server {
        listen       127.0.0.1:8081;
        server_name  localhost;
        http2 on;

        location / {
            add_header X-Conn $connection always;
            add_header X-Proto $server_protocol always;
            return 200 "backend $host\n";
        }
    }
}

EOF

my $module = slice_module();
my $conf = $t->read_file('nginx.conf');
my $sliced = $module ? 'keepalive 16 slice_key=$host slice_conn=2;' : 'keepalive 16;';
$conf =~ s/%%SLICED%%/$sliced/;
$conf =~ s/%%H2%%/$h2 ? <<'H2' : ''/e;
location /h2/ {
            proxy_pass http://u;
            proxy_http_version 2;
        }

        location /sliced/h2/ {
            proxy_pass http://u_sliced;
            proxy_http_version 2;
        }
H2
$t->write_file('nginx.conf', $conf);

$t->run()->plan(12);

###############################################################################

my %proto = (h1 => 'HTTP/1.1', h2 => 'HTTP/2.0', grpc => 'HTTP/2.0');

# Requests to $prefix/<kind>/ in the order of @kinds; returns per kind the
# list of connections, and what went wrong ('' if nothing did).
sub alternate {
	my ($prefix, $hosts, @kinds) = @_;
	my (%conns, @bad);

	my $n = 0;
	for my $kind (@kinds) {
		my $host = $hosts->[$n++ % @$hosts];
		my $r = http_get_host($host, "$prefix/$kind/");
		my $status = status_of($r) // 'none';
		my $p = header_of($r, 'X-Proto') // 'none';
		push @bad, "$kind $host: $status" if $status ne '200';
		push @bad, "$kind $host: $p" if $status eq '200' && $p ne $proto{$kind};
		push @{$conns{"$kind $host"}}, header_of($r, 'X-Conn') // 'none';
	}

	return (\%conns, join('; ', @bad));
}

sub distinct {
	my (@list) = @_;
	return scalar keys %{{ map { $_ => 1 } @list }};
}

my $errors = qr/upstream prematurely closed|upstream sent|no connection data found|upstream timed out/;

###############################################################################

# HTTP/1.1 and gRPC to one address

my $before = errlog_count($t, $errors);
my ($c, $bad) = alternate('', ['localhost'], (qw/ h1 grpc /) x 4);

is($bad, '', 'h1 and grpc: each answered over its own protocol');
is(distinct(@{$c->{'h1 localhost'}}) . ' ' . distinct(@{$c->{'grpc localhost'}}),
	'1 1', 'h1 and grpc: each reuses one connection');
isnt($c->{'h1 localhost'}[0], $c->{'grpc localhost'}[0],
	'h1 and grpc: not shared');
is(errlog_count($t, $errors) - $before, 0, 'h1 and grpc: no upstream errors');

# sliced by $host as well

SKIP: {
skip 'slice parameters need the keepalive_slice module', 2 unless $module;

$before = errlog_count($t, $errors);
($c, $bad) = alternate('/sliced', ['a.test', 'a.test', 'b.test', 'b.test'],
	(qw/ h1 grpc /) x 6);

is($bad, '', 'sliced h1 and grpc: each answered over its own protocol');
is(join(' ', map { distinct(@{$c->{$_}}) } sort keys %$c)
	. ' ' . distinct(map { @$_ } values %$c)
	. ' ' . (errlog_count($t, $errors) - $before),
	'1 1 1 1 4 0', 'sliced h1 and grpc: one connection per host and protocol');

}

# HTTP/1.1, HTTP/2 and gRPC to one address

SKIP: {
skip 'proxy_http_version 2 needs nginx 1.29.4', 6 unless $h2;

$before = errlog_count($t, $errors);
($c, $bad) = alternate('', ['localhost'], (qw/ h1 h2 grpc h2 /) x 3);

is($bad, '', 'h1, h2 and grpc: each answered over its own protocol');
is(join(' ', map { distinct(@{$c->{"$_ localhost"}}) } qw/ h1 h2 grpc /),
	'1 1 1', 'h1, h2 and grpc: each reuses one connection');
is(distinct(map { $c->{"$_ localhost"}[0] } qw/ h1 h2 grpc /), 3,
	'h1, h2 and grpc: not shared');
is(errlog_count($t, $errors) - $before, 0, 'h1, h2 and grpc: no upstream errors');

skip 'slice parameters need the keepalive_slice module', 2 unless $module;

$before = errlog_count($t, $errors);
($c, $bad) = alternate('/sliced', ['a.test', 'b.test'], (qw/ h2 h2 h1 h1 /) x 3);

is($bad, '', 'sliced h1 and h2: each answered over its own protocol');
is(join(' ', map { distinct(@{$c->{$_}}) } sort keys %$c)
	. ' ' . (errlog_count($t, $errors) - $before),
	'1 1 1 1 0', 'sliced h1 and h2: one connection per host and protocol');

}

###############################################################################
