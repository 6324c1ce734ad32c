#!/usr/bin/perl

# Tests for upstream keepalive: slicing with an SSL upstream.  Each host
# reuses its own idle SSL connection, never another host's; SSL sessions
# stay per server (the balancer's), so a host's first connection and a
# connection opened after an idle one was closed resume the session.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ http_get_host status_of header_of
	errlog_wait ssl_certificates ssl_idle_closed slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http http_ssl proxy upstream_keepalive/)
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
        keepalive 8 slice_key=$host slice_conn=2;
    }

    upstream u_timeout {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=2;
        keepalive_timeout 1s;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_ssl_session_reuse on;

        location / {
            proxy_pass https://u;
        }

        location /timeout/ {
            proxy_pass https://u_timeout;
        }
    }

    server {
        listen       127.0.0.1:8081 ssl;
        server_name  localhost;

        ssl_certificate localhost.crt;
        ssl_certificate_key localhost.key;
        ssl_session_cache shared:SSL:1m;

        location / {
            add_header X-Conn $connection always;
            add_header X-Requests $connection_requests always;
            add_header X-Reused $ssl_session_reused always;
            add_header X-Host $host always;
            return 200 "backend $host $uri\n";
        }
    }
}

EOF

ssl_certificates($t, 'localhost');

$t->run()->plan(16);

###############################################################################

# Sends a request for each host in @order to $prefix and returns, per host,
# the list of [ connection, request number on it, session reused ] of its
# responses, and a description of what went wrong ('' if nothing did).
# A response without X-Conn cannot pass for a reused connection.
sub per_host {
	my ($prefix, @order) = @_;
	my (%seen, @bad);
	my $n = 0;

	for my $host (@order) {
		$n++;
		my $r = http_get_host($host, "$prefix/x");

		if ((status_of($r) // 0) != 200) {
			push @bad, "$host: " . (status_of($r) // 'no response');
			next;
		}

		my $saw = header_of($r, 'X-Host') // 'none';
		push @bad, "$host: backend saw $saw" if $saw ne $host;

		push @{$seen{$host}}, [
			header_of($r, 'X-Conn') // "$host: no X-Conn ($n)",
			header_of($r, 'X-Requests') // 'none',
			header_of($r, 'X-Reused') // 'none',
		];
	}

	return (\%seen, join('; ', @bad));
}

sub conns {
	my ($list) = @_;
	return join ' ', map { $_->[0] } @$list;
}

sub requests {
	my ($list) = @_;
	return join ' ', map { $_->[1] } @$list;
}

###############################################################################

# two hosts interleaved: each reuses its own SSL connection

my ($s, $bad) = per_host('', ('a.example', 'b.example') x 4);
my ($ra, $rb) = @$s{'a.example', 'b.example'};

is($bad, '', 'interleaved: responses from the right host');

my ($ca, $cb) = ($ra->[0][0], $rb->[0][0]);

is(conns($ra), "$ca $ca $ca $ca", 'interleaved: a reuses one connection');
is(conns($rb), "$cb $cb $cb $cb", 'interleaved: b reuses one connection');
isnt($ca, $cb, 'interleaved: a and b do not share');
is(requests($ra) . ', ' . requests($rb), '1 2 3 4, 1 2 3 4',
	'interleaved: each connection serves its host\'s requests only');

# a's connection negotiated a new session; b's first connection resumed
# it: sessions are the balancer's, per server, not per bucket

is($ra->[0][2], '.', 'interleaved: a, new session');
is($rb->[0][2], 'r', 'interleaved: b, session resumed');

# keepalive_timeout 1s: once the idle SSL connections are closed, each
# host's next connection resumes the session, and is again its own

($s, $bad) = per_host('/timeout', ('a.example', 'b.example') x 2);
my ($ta, $tb) = @$s{'a.example', 'b.example'};
my ($ta1, $tb1) = ($ta->[0][0], $tb->[0][0]);

is($bad, '', 'timeout: responses before the timeout');
ok(conns($ta) eq "$ta1 $ta1" && conns($tb) eq "$tb1 $tb1" && $ta1 ne $tb1,
	'timeout: a and b reuse their own connections');

# the backend server (same error.log) saw nginx close both idle
# connections (polled for: nginx's timer fires whenever the worker gets
# to it)

my ($closed, $logged) = (0);
for my $c ($ta1, $tb1) {
	my $re;
	($re, $logged) = ssl_idle_closed($t, $c);
	$closed += errlog_wait($t, $re, 1);
}
is($closed, 2, "timeout: idle connections closed by nginx (backend logs $logged)");

($s, $bad) = per_host('/timeout', ('a.example', 'b.example') x 3);
my ($na, $nb) = @$s{'a.example', 'b.example'};
my ($na1, $nb1) = ($na->[0][0], $nb->[0][0]);

is($bad, '', 'timeout: responses after the timeout');
ok($na1 ne $ta1 && $na1 ne $tb1 && $nb1 ne $ta1 && $nb1 ne $tb1,
	'timeout: new connections');
is($na->[0][2] . ' ' . $nb->[0][2], 'r r', 'timeout: sessions resumed');
is(conns($na), "$na1 $na1 $na1", 'timeout: a reuses its new connection');
is(conns($nb), "$nb1 $nb1 $nb1", 'timeout: b reuses its new connection');
is(requests($na) . ', ' . requests($nb), '1 2 3, 1 2 3',
	'timeout: not shared');

###############################################################################
