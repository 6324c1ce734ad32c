#!/usr/bin/perl

# Tests for upstream keepalive: 10,000 distinct slice keys through a pool
# of 20 buckets.  Every request is answered; buckets go back to the pool
# (connections evicted from a cache of 16 release theirs, so no key is ever
# refused a bucket); a key that comes back while its connection is cached
# reuses it; the worker's memory (RSS) stays flat once warmed up.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use IO::Select;
use IO::Socket::INET;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend backend_log_count backend_log_wait /;
use Test::Nginx::Keepalive qw/ errlog_count slice_module /;
use Test::Nginx::Load qw/ worker_pids proc_rss_kb /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'keepalive_slice module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

# 11,000 requests: the debug log of each would be most of the run time and
# hundreds of megabytes; the requests log at "info" (the level of the
# slicing refusals), nginx itself at debug as in every test

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 16 slice_key=$host slice_conn=1 slice_poolsize=20;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        error_log error.log info;
        access_log off;
        keepalive_requests 100000;

        location / {
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }
    }
}

EOF

my $blog = $t->testdir() . '/backend.log';

$t->run_daemon(\&http_backend, port(8081), log => $blog);
$t->run()->waitforsocket('127.0.0.1:' . port(8081));

$t->plan(8);

###############################################################################

my %worker = worker_pids($t);
my ($worker) = keys %worker;

# keys k1 .. k10000, and after every 10th key the key of 5 requests
# earlier again: it is among the 16 most recently cached, so its
# connection must be reused

my $distinct = 10000;
my $batch = 100;

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080))
	or die "Can't connect to nginx: $!\n";
$s->blocking(0);

my (%conn_of_key, @rss);
my ($answered, $repeats, $reused) = (0, 0, 0);

for (my $i = 1; $i <= $distinct; $i += $batch) {
	my @keys;
	for my $k ($i .. $i + $batch - 1) {
		push @keys, "k$k";
		push @keys, 'k' . ($k - 5) if $k % 10 == 0;
	}

	my @r = pipeline($s, map {
		"GET /$_ HTTP/1.1\r\nHost: $_.example\r\n\r\n" } @keys);

	for my $n (0 .. $#keys) {
		my $r = $r[$n] // '';
		next unless $r =~ m{^HTTP/1.1 200 .*^X-Connection: (\d+)\r$}ms;
		$answered++;

		my $key = $keys[$n];
		if (exists $conn_of_key{$key}) {
			$repeats++;
			$reused++ if $conn_of_key{$key} == $1;
			delete $conn_of_key{$key};
		} else {
			$conn_of_key{$key} = $1;
		}
	}

	# forget keys that can no longer be cached (the map stays small)
	delete $conn_of_key{'k' . ($_ - 20)} for $i .. $i + $batch - 1;

	my $done = $i + $batch - 1;
	push @rss, proc_rss_kb($worker) // 0 if $done % 1000 == 0;
}

close $s;

my $total = $distinct + $distinct / 10;

is($answered, $total, 'every request answered');
is($repeats, $distinct / 10, 'repeated keys');
is($reused, $distinct / 10, 'repeated keys reused their connection');

# one connection per distinct key, and nginx closed all but the cached 16
# (evicted: their buckets went back to the pool)

is(backend_log_count($blog, qr/^accept /), $distinct, 'connections opened');
is(backend_log_wait($blog, qr/^close .* reason=eof$/, $distinct - 16),
	$distinct - 16, 'connections evicted');

is(errlog_count($t, qr/connection not kept/), 0, 'no key refused a bucket');

# worker memory: after warm-up (the 2nd thousand), flat to the last

diag("worker VmRSS kB per 1000 keys: @rss");

my $growth = $rss[-1] - $rss[1];
ok($rss[1] > 0 && $growth < 512, 'worker RSS flat after warm-up')
	or diag("grew $growth kB");

is(scalar(keys %{{ worker_pids($t) }}), 1, 'worker still running');

###############################################################################

# Writes all requests, then reads as many responses (each with a
# Content-Length); nginx answers pipelined requests in order.  Bounded by
# a 10s timeout without progress.

sub pipeline {
	my ($s, @req) = @_;

	my $out = join '', @req;
	my $in = '';
	my @r;

	my $sel = IO::Select->new($s);

	# a write after nginx closed the connection must fail, not kill the
	# test (which would leave nginx and the backend running)

	local $SIG{PIPE} = 'IGNORE';

	while (@r < @req) {
		my ($rd, $wr) = IO::Select->select($sel,
			length $out ? $sel : undef, undef, 10);
		last unless $rd || $wr;

		if ($wr && @$wr) {
			my $n = syswrite($s, $out);
			substr($out, 0, $n, '') if $n;
		}

		if ($rd && @$rd) {
			my $n = sysread($s, $in, 65536, length $in);
			last unless $n;
		}

		while ($in =~ /\A(.*?\r\n\r\n)/s) {
			my $head = $1;
			my ($len) = $head =~ /^Content-Length: (\d+)\r$/mi;
			last unless defined $len;
			last if length $in < length($head) + $len;
			push @r, substr($in, 0, length($head) + $len, '');
		}
	}

	return @r;
}

###############################################################################
