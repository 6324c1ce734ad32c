#!/usr/bin/perl

# Tests for upstream keepalive: per-bucket limit from a variable
# (slice_dyn), its precedence over slice_conn, and values that are not
# usable limits.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ http_get_host parallel_get status_of
	errlog_delta slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy map upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    map $host $conn {
        hostnames;
        default      0;
        *.allow.com  2;
        x.bad.com    abc;
        y.empty.com  "";
    }

    upstream u_dyn {
        server 127.0.0.1:8081;
        keepalive 30 slice_key=$host slice_dyn=$conn;
    }

    upstream u_hdr {
        server 127.0.0.1:8082;
        keepalive 30 slice_key=$host slice_dyn=$http_x_limit;
    }

    upstream u_both {
        server 127.0.0.1:8083;
        keepalive 30 slice_key=$host slice_conn=5 slice_dyn=$conn;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;

        location /dyn/  { proxy_pass http://u_dyn/; }
        location /hdr/  { proxy_pass http://u_hdr/; }
        location /both/ { proxy_pass http://u_both/; }
    }
}

EOF

my $d = $t->testdir();

for my $p (8081, 8082, 8083) {
	$t->run_daemon(\&http_backend, port($p), log => "$d/b$p.log");
}

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for 8081, 8082, 8083;

$t->plan(30);

###############################################################################

# The connections of $n requests for $host and $uri sent at once, in
# ascending order.
sub parallel_conns {
	my ($host, $uri, $n) = @_;
	return sort { $a <=> $b }
		map { conn_of($_) // 0 } parallel_get($host, ($uri) x $n);
}

my $full2 = qr/\[info\].*keepalive: connection not kept, bucket for key "a\.allow\.com" is full \(2 idle connections\)/;
my $zero = qr/\[info\].*keepalive: connection not kept, bucket limit for key "other\.com" is 0/;

###############################################################################

# limit 2 from the map: reused

my @seq = map { conn_of(http_get_host('a.allow.com', '/dyn/x')) // 0 }
	1 .. 3;
is("@seq", '1 1 1', 'dyn 2: sequential requests reuse');

my @par;
my $n = errlog_delta($t, $full2, sub {
	@par = parallel_conns('a.allow.com', '/dyn/sleep/300', 3)
});
is("@par", '1 2 3', 'dyn 2: three in parallel');
is($n, 1, 'dyn 2: third connection not kept, limit 2 logged');
is(backend_log_wait("$d/b8081.log", qr/^close /, 1), 1,
	'dyn 2: one connection closed');

my @again = parallel_conns('a.allow.com', '/dyn/sleep/100', 2);
is(backend_log_count("$d/b8081.log", qr/^accept /), 3,
	'dyn 2: two kept connections reused in parallel');
my @kept = grep { !backend_log_count("$d/b8081.log", qr/^close conn=$_ /) }
	1 .. 3;
is("@again", "@kept", 'dyn 2: reused ones were not the closed one');

# the default, 0: never kept

my @zero;
$n = errlog_delta($t, $zero, sub {
	@zero = map { conn_of(http_get_host('other.com', '/dyn/x')) // 0 }
		1 .. 2
});
is("@zero", '4 5', 'dyn 0: not reused');
is($n, 2, 'dyn 0: logged for each');

# not a number, and empty: not kept, one warning per request, the request
# itself unaffected

for my $case ([ 'abc', 'x.bad.com', 'abc', '6 7' ],
	[ 'empty', 'y.empty.com', '', '8 9' ])
{
	my ($label, $host, $value, $conns) = @$case;
	my $warn = qr/\[warn\].*keepalive: "slice_dyn" variable "\$conn" is "\Q$value\E", not a number, connection not kept/;
	my @r;
	$n = errlog_delta($t, $warn, sub {
		@r = map { http_get_host($host, '/dyn/x') } 1 .. 2
	});
	is(join(' ', map { status_of($_) // 0 } @r), '200 200',
		"dyn $label: requests 200");
	is(join(' ', map { conn_of($_) // 0 } @r), $conns, "dyn $label: not reused");
	is($n, 2, "dyn $label: one warning per request");
}

is(backend_log_wait("$d/b8081.log", qr/^close /, 7), 7,
	'dyn: refused connections closed');

# variable not found (header absent)

my $warn_nf = qr/\[warn\].*keepalive: "slice_dyn" variable "\$http_x_limit" not found, connection not kept/;
my @nf;
$n = errlog_delta($t, $warn_nf, sub {
	@nf = map { http_get_host('a.example', '/hdr/x') } 1 .. 2
});
is(join(' ', map { status_of($_) // 0 } @nf), '200 200',
	'not found: requests 200');
is(join(' ', map { conn_of($_) // 0 } @nf), '1 2', 'not found: not reused');
is($n, 2, 'not found: one warning per request');

# ... and with the header: its value is the limit

my @hdr = map { conn_of(http_get_host('a.example', '/hdr/x',
	headers => [ 'X-Limit: 1' ])) // 0 } 1 .. 3;
is("@hdr", '3 3 3', 'header limit 1: reused');

$n = errlog_delta($t, qr/\[info\].*bucket limit for key "b\.example" is 0/,
	sub {
		@hdr = map { conn_of(http_get_host('b.example', '/hdr/x',
			headers => [ 'X-Limit: 0' ])) // 0 } 1 .. 2
	});
is("@hdr", '4 5', 'header limit 0: not reused');
is($n, 2, 'header limit 0: logged');

# the limit is read when the connection is freed, for that request:
# a request with limit 0 for a host whose bucket holds a connection takes
# it and does not put it back

is(conn_of(http_get_host('a.example', '/hdr/x',
	headers => [ 'X-Limit: 0' ])), 3,
	'header limit 0: takes the idle connection');
is(backend_log_wait("$d/b8082.log", qr/^close conn=3 /, 1), 1,
	'header limit 0: and closes it');

# slice_dyn wins over slice_conn=5

my @both;
$n = errlog_delta($t, $zero, sub {
	@both = map { conn_of(http_get_host('other.com', '/both/x')) // 0 }
		1 .. 2
});
is("@both", '1 2', 'both, dyn 0: not reused despite slice_conn=5');
is($n, 2, 'both, dyn 0: logged');

is(conn_of(http_get_host('a.allow.com', '/both/x')), 3, 'both, dyn 2: first');
is(conn_of(http_get_host('a.allow.com', '/both/x')), 3, 'both, dyn 2: reused');

$n = errlog_delta($t, $full2, sub {
	@par = parallel_conns('a.allow.com', '/both/sleep/300', 3)
});
is("@par", '3 4 5', 'both, dyn 2: three in parallel');
is($n, 1, 'both, dyn 2: limit 2, not 5');
is(backend_log_wait("$d/b8083.log", qr/^close /, 3), 3,
	'both: refused connections closed');

###############################################################################
