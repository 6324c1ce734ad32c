#!/usr/bin/perl

# Tests for $upstream_keepalive_reused, $upstream_keepalive_requests and
# $upstream_keepalive_key: per request, in a response header and in the
# access log, checked against the backend's own numbering of connections
# and of the requests on each; one value per try as $upstream_addr has
# them (", " between tries, " : " across an internal redirect, "-" for an
# upstream that is not ours); the key cut to slice_keylen; and tries
# recorded only because the configuration uses the variables.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Time::HiRes qw/ time sleep /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of req_of backend_log_count /;
use Test::Nginx::Keepalive qw/ http_get_host status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
# Each worker keeps its own idle connections (keepalive_share off in every
# upstream): a reused connection shows "r", as checked against the backend;
# t/share.t checks "w".
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format ka '$request_uri|$upstream_addr|$upstream_status|'
                  '$upstream_keepalive_reused|$upstream_keepalive_requests|'
                  '$upstream_keepalive_key|'
                  '$upstream_http_x_connection|$upstream_http_x_request';

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;

    add_header X-Reused $upstream_keepalive_reused always;
    add_header X-Requests $upstream_keepalive_requests always;
    add_header X-Key "[$upstream_keepalive_key]" always;
    add_header X-Addr $upstream_addr always;

    upstream u_host {
        server 127.0.0.1:8081;
        keepalive 8 slice_key=$host slice_conn=2;
        keepalive_share off;
    }

    upstream u_plain {
        server 127.0.0.1:8082;
        keepalive 8;
        keepalive_share off;
    }

    upstream u_cut {
        server 127.0.0.1:8083;
        keepalive 8 slice_key=$host slice_conn=2 slice_keylen=4;
        keepalive_share off;
    }

    upstream u_retry {
        server 127.0.0.1:8097 max_fails=0;
        server 127.0.0.1:8084 backup;
        keepalive 8;
        keepalive_share off;
    }

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        access_log ka.log ka;

        location /host/  { proxy_pass http://u_host/; }
        location /plain/ { proxy_pass http://u_plain/; }
        location /cut/   { proxy_pass http://u_cut/; }

        location /retry/ {
            proxy_pass http://u_retry/;
            proxy_next_upstream error;
        }

        # nginx's own proxying to an address: not ours
        location /stock/ {
            proxy_pass http://127.0.0.1:8085/;
        }

        # a 404 from an upstream that is not ours, then ours
        location /redirect/ {
            proxy_pass http://127.0.0.1:8080/notfound;
            proxy_intercept_errors on;
            error_page 404 = /host/after-redirect;
        }

        location /notfound {
            access_log off;
            return 404;
        }

        location /local {
            return 200 "no upstream\n";
        }
    }
}

EOF

my $d = $t->testdir();
my @ports = (8081 .. 8085);
$t->run_daemon(\&http_backend, port($_), log => "$d/b$_.log") for @ports;

$t->run();
$t->waitforsocket('127.0.0.1:' . port($_)) for @ports;

$t->plan(23);

###############################################################################

sub hdr {
	my ($r, $name) = @_;
	my ($head) = split /\r?\n\r?\n/, $r // '', 2;
	return $head =~ /^\Q$name\E: ?([^\r\n]*)\r?$/mi ? $1 : undef;
}

# What the backend says about the connection of a response, and what the
# variables say, for comparison: "r|7|a.example" means reused, the 7th
# request on its connection, key a.example.
sub expected {
	my ($r, $key) = @_;
	my $n = req_of($r) // 0;
	return ($n > 1 ? 'r' : '.') . "|$n|[$key]";
}

sub seen {
	my ($r) = @_;
	return join '|', map { hdr($r, $_) // 'none' }
		qw/ X-Reused X-Requests X-Key /;
}

###############################################################################

# Through both workers, three hosts: each response's variables say what the
# backend says about its connection.

my (@bad, %workers, $reused);
for my $i (0 .. 29) {
	my $host = (qw/ a.example b.example c.example /)[$i % 3];
	my $r = http_get_host($host, "/host/$i");
	my ($want, $got) = (expected($r, $host), seen($r));
	push @bad, "$i: backend $want, variables $got" if $want ne $got;
	$reused++ if $got =~ /^r/;
}
is(join('; ', @bad), '', 'sliced: reused, requests and key per response');
is($reused, 30 - backend_log_count("$d/b8081.log", qr/^accept /),
	'sliced: reused for every request but the first on a connection');

# The access log says the same: one line per request, the backend's
# connection and request number logged beside the variables.

my @lines = grep { m{^/host/\d+\|} } split /\n/, $t->read_file('ka.log');
is(scalar @lines, 30, 'access log: a line per request');
@bad = ();
for (@lines) {
	my ($uri, $addr, $status, $ru, $rq, $key, $conn, $n) = split /\|/;
	my $host = (qw/ a.example b.example c.example /)[($uri =~ /(\d+)/)[0] % 3];
	push @bad, "$uri: $ru $rq $key vs conn $conn req $n"
		unless $ru eq ($n > 1 ? 'r' : '.') && $rq eq $n && $key eq $host;
}
is(join('; ', @bad), '', 'access log: variables match the backend');

# An unsliced upstream: the key is empty.

@bad = ();
for (1 .. 6) {
	my $r = http_get_host('a.example', '/plain/x');
	push @bad, seen($r) if seen($r) ne expected($r, '');
}
is(join('; ', @bad), '', 'unsliced: empty key');

my $r;

# The key as the cache compares it: cut to slice_keylen.

$r = http_get_host('abcdefgh.example', '/cut/x');
is(hdr($r, 'X-Key'), '[abcd]', 'key cut to slice_keylen');

# Two tries: the first server refuses, the backup answers.

$r = http_get_host('a.example', '/retry/x');
like(hdr($r, 'X-Addr'), qr/^127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+$/, 'retry: two tries');
my $n = req_of($r) // 0;
is(hdr($r, 'X-Reused'), '., ' . ($n > 1 ? 'r' : '.'), 'retry: reused per try');
is(hdr($r, 'X-Requests'), "1, $n", 'retry: requests per try');
is(hdr($r, 'X-Key'), '[, ]', 'retry: a key per try');

# Not ours: nginx's own upstream, a value per try all the same.

$r = http_get_host('a.example', '/stock/x');
is(status_of($r), 200, 'not ours: proxied');
is(seen($r), '-|-|[-]', 'not ours: "-"');

# An internal redirect from an upstream that is not ours to ours: the
# values follow $upstream_addr's " : ".

$r = http_get_host('a.example', '/redirect/x');
$n = req_of($r) // 0;
like(hdr($r, 'X-Addr'), qr/^127\.0\.0\.1:\d+ : 127\.0\.0\.1:\d+$/,
	'redirect: " : " in $upstream_addr');
is(hdr($r, 'X-Reused'), '- : ' . ($n > 1 ? 'r' : '.'), 'redirect: reused');
is(hdr($r, 'X-Requests'), "- : $n", 'redirect: requests');
is(hdr($r, 'X-Key'), '[- : a.example]', 'redirect: key');

my ($line) = grep { m{^/redirect/x\|} } split /\n/, $t->read_file('ka.log');
like($line // '', qr/\|- : [.r]\|- : \d+\|- : a\.example\|/,
	'redirect: in the access log');

# No upstream at all: not found.

$r = http_get('/local');
is(seen($r), 'none|none|[]', 'no upstream: not found');
($line) = grep { m{^/local\|} } split /\n/, $t->read_file('ka.log');
like($line // '', qr{^/local\|-\|-\|-\|-\|-\|-\|-$}, 'no upstream: "-" in the log');

# The configuration uses the variables, so tries are recorded (a
# configuration that does not, as keepalive_status.t's, says nothing).

like($t->read_file('error.log'),
	qr/\$upstream_keepalive_\* in use, recording upstream tries/,
	'recording switched on by the configuration');
is(() = $t->read_file('error.log') =~ /keepalive slice: try \d+ recorded/g,
	30 + 6 + 1 + 2 + 1, 'a record per try of ours');

# slice_key=$host is $host's value as nginx makes it: the Host header
# lowercased and without its port, or without one (HTTP/1.0) the server's
# name.

$r = http_get_host('B.Example:8080', '/host/x');
is(hdr($r, 'X-Key'), '[b.example]', '$host key: the host name of the Host header');
$r = http("GET /host/x HTTP/1.0\r\n\r\n");
is(hdr($r, 'X-Key'), '[localhost]', '$host key: the server name without a Host header');

###############################################################################
