package Test::Nginx::Keepalive;

# Helpers shared by this project's keepalive*.t and slice*.t suites.
#
# Several test files had grown their own copies of these small subs; they
# live here once so that a fix or a change of convention reaches every
# file.  What stays in each .t, by nginx-tests convention, is everything
# that describes the test: the configuration, the backends it starts and
# the assertions.
#
# Only Test::Nginx's public API is used (http, http_start, http_end,
# $t->testdir, $t->read_file, $t->write_file, $t->write_file_expand), so
# the suites keep running with nginx's own lib/Test/Nginx.pm in place of
# ours.  Subs that need the test's Test::Nginx object take it as their
# first argument.
#
# Typical use, after "use Test::Nginx ...;":
#
#   use Test::Nginx::Keepalive qw/ http_get_host status_of errlog_delta /;
#
#   my $r = http_get_host('a.example', '/x');
#   is(status_of($r) // 'none', 200, 'a.example');

use warnings;
use strict;

use Exporter qw/ import /;
use JSON::PP ();
use Time::HiRes qw/ time /;

use Test::Nginx qw/ :DEFAULT http_start http_end /;

our @EXPORT_OK = qw/
	http_get_host http_post_host parallel_get
	status_of header_of body_of
	errlog_count errlog_delta errlog_wait
	nginx_test_config
	reload_wait
	ssl_certificates ssl_idle_closed
	slice_module
	prometheus_samples
/;

###############################################################################
# Requests with a Host header.
#
# Test::Nginx's http_get() always sends "Host: localhost"; the slicing
# tests key idle connections by $host, so they need to choose it.  The
# requests are HTTP/1.0 with CRLF line ends, as the test files wrote them
# by hand.

sub _get_request {
	my ($host, $uri, @headers) = @_;
	return "GET $uri HTTP/1.0\r\nHost: $host\r\n"
		. join('', map { "$_\r\n" } @headers) . "\r\n";
}

# http_get_host($host, $uri, %extra): GET $uri with "Host: $host" and the
# response, as http() returns it.  headers => [ 'Name: value', ... ] adds
# request headers; everything else in %extra goes to http() (PeerAddr,
# start => 1, ...).
sub http_get_host {
	my ($host, $uri, %extra) = @_;
	my $headers = delete $extra{headers} // [];
	return http(_get_request($host, $uri, @$headers), %extra);
}

# http_post_host($host, $uri, $body, %extra): the same for a POST of $body.
sub http_post_host {
	my ($host, $uri, $body, %extra) = @_;
	return http("POST $uri HTTP/1.0\r\nHost: $host\r\n"
		. 'Content-Length: ' . length($body) . "\r\n\r\n" . $body, %extra);
}

# parallel_get($host, @uris): sends a GET for each URI at once, then
# collects the responses, in the order of the URIs (undef for one that
# failed).  While they are all in flight, each request needs an upstream
# connection of its own.
sub parallel_get {
	my ($host, @uris) = @_;
	my @s = map { http_start(_get_request($host, $_)) } @uris;
	return map { defined $_ ? http_end($_) : undef } @s;
}

###############################################################################
# Responses.
#
# Like Test::Nginx::Backend's conn_of(), these return undef for "nothing
# there", and each test file says what that looks like in its output
# (status_of($r) // 'none', status_of($r) // 0).  Only the header part of
# a response is looked at, so a body cannot fool them.

# The status code of a raw HTTP response string, or undef.
sub status_of {
	my ($r) = @_;
	return defined $r && $r =~ m{^HTTP/1\.\d (\d{3})} ? $1 : undef;
}

# The body of a raw HTTP response string, or undef.
sub body_of {
	my ($r) = @_;
	return (split /\r?\n\r?\n/, $r // '', 2)[1];
}

# The value of the response header $name (case-insensitive): one word,
# alone on its line; undef if the header is missing or its value is not a
# single word.
sub header_of {
	my ($r, $name) = @_;
	return undef unless defined $r;
	my ($head) = split /\r?\n\r?\n/, $r, 2;
	return undef unless defined $head;
	return $head =~ /^\Q$name\E: (\S+)\r?$/mi ? $1 : undef;
}

###############################################################################
# nginx's error.log.
#
# The log only grows and is shared by everything a test file does, so what
# one step logged is the difference of two counts.

# Number of matches of $re in the test's error.log.  The log is matched as
# one string: a qr// with ^ or $ needs its own /m, or it matches nothing.
sub errlog_count {
	my ($t, $re) = @_;
	return scalar(() = $t->read_file('error.log') =~ /$re/gm);
}

# Runs $code and returns how many more matches of $re error.log has after
# it than before.
sub errlog_delta {
	my ($t, $re, $code) = @_;
	my $before = errlog_count($t, $re);
	$code->();
	return errlog_count($t, $re) - $before;
}

# What nginx logs on a timer (keepalive_timeout and the like) appears at
# a time the test does not control: polling is the race-free way to wait
# for it.  Waits until error.log has at least $count matches of $re (or
# $timeout seconds, default 5, pass) and returns the last count seen.
sub errlog_wait {
	my ($t, $re, $count, $timeout) = @_;

	my $deadline = time() + ($timeout // 5);
	while (1) {
		my $n = errlog_count($t, $re);
		return $n if $n >= $count || time() >= $deadline;
		select undef, undef, undef, 0.05;
	}
}

###############################################################################
# Configuration checks with "nginx -t".

# The binary Test::Nginx runs, chosen by the same rule: Test::Nginx's own
# variable for it is not part of its API.
my $NGINX = defined $ENV{TEST_NGINX_BINARY} ? $ENV{TEST_NGINX_BINARY}
	: '../nginx/objs/nginx';

# nginx_test_config($t, $file, $conf, $error_log): writes $conf as $file
# into the test directory, with the %%TEST_GLOBALS%% macros expanded like
# $t->write_file_expand() does, and runs "nginx -t" on it.  nginx logs
# into $error_log (relative to the test directory; default error.log, the
# one Test::Nginx checks for alerts at the end).  Returns the exit status
# and everything nginx printed.
sub nginx_test_config {
	my ($t, $file, $conf, $error_log) = @_;

	my $d = $t->testdir();
	$error_log //= 'error.log';

	$t->write_file_expand($file, $conf);

	my $out = `\Q$NGINX\E -t -p $d/ -c $file -e $error_log 2>&1`;
	my $status = $? >> 8;

	# "nginx -t" writes the pid file (%%TEST_GLOBALS%% puts it into the
	# test directory), which would make a later $t->run() believe that
	# nginx has already started

	unlink "$d/nginx.pid";

	return ($status, $out);
}

###############################################################################
# Reloads.

# reload_wait($t, $timeout): $t->reload(), then waits until the reload took
# effect: new workers are running and every old one has stopped accepting
# connections (it is gone, or "shutting down"), or nginx refused the new
# configuration ([emerg]).  Test::Nginx's reload() only sends the signal,
# in nginx's library and in ours alike, so requests sent right after it
# may still reach an old worker.  Returns true once done, false after
# $timeout seconds (default 10).
sub reload_wait {
	my ($t, $timeout) = @_;

	my $offset = length($t->read_file('error.log') // '');
	my %old = map { $_ => 1 } _workers($t);

	$t->reload();

	my $deadline = time() + ($timeout // 10);
	while (time() < $deadline) {
		select undef, undef, undef, 0.05;

		my $log = substr($t->read_file('error.log'), $offset);
		return 0 if $log =~ /\[emerg\]/;

		my %now = map { $_ => 1 } _workers($t);
		my $started = grep { !$old{$_} } keys %now;
		my $old_accepting = grep { $now{$_} } keys %old;

		return 1 if $started && !$old_accepting;
	}

	return 0;
}

# Worker processes of $t's nginx that accept connections (not shutting
# down), from /proc.
sub _workers {
	my ($t) = @_;

	my ($master) = (eval { $t->read_file('nginx.pid') } // '') =~ /(\d+)/
		or return ();
	my @w;

	opendir(my $dh, '/proc') or return ();
	for my $p (grep { /^\d+$/ } readdir $dh) {
		open my $fh, '<', "/proc/$p/stat" or next;
		my $stat = <$fh> // '';
		close $fh;
		next unless $stat =~ /\)\s+(\S+)\s+(\d+)/ && $2 == $master;
		next if $1 eq 'Z';

		open $fh, '<', "/proc/$p/cmdline" or next;
		my $cmd = do { local $/; <$fh> } // '';
		close $fh;
		push @w, $p if $cmd =~ /worker process/ && $cmd !~ /shutting down/;
	}
	closedir $dh;

	return @w;
}

###############################################################################
# Is this project's module in the nginx under test?
#
# Assertions on what only this module does (its debug lines, slicing, its
# configuration errors) run when it is: loaded with load_module from
# TEST_NGINX_GLOBALS, or linked in with --add-module=DIR, DIR being a tree
# whose "config" names the module.  Without it the same files test nginx's
# own keepalive module, the drop-in reference.

my $slice_module;

sub slice_module {
	return $slice_module if defined $slice_module;

	$slice_module = 0;
	return $slice_module = 1
		if ($ENV{TEST_NGINX_GLOBALS} // '') =~ /keepalive_slice/;

	my $v = `\Q$NGINX\E -V 2>&1`;
	for my $dir ($v =~ /--add-module=(\S+)/g) {
		open my $fh, '<', "$dir/config" or next;
		local $/;
		my $config = <$fh>;
		close $fh;
		return $slice_module = 1
			if $config =~ /^ngx_addon_name=ngx_http_upstream_keepalive_slice_module$/m;
	}
	return $slice_module;
}

###############################################################################
# SSL upstreams.

# ssl_idle_closed($t, $conn): what a TLS server block of the nginx under
# test logs when the client closes its idle keep-alive connection $conn
# (nginx's upstream keepalive closes without a close_notify, as the stock
# module does), and the name of that behaviour for an assertion: a regex
# and a string.  nginx 1.21.2 and later, and any nginx with an OpenSSL
# before 3.0, log "client ... closed keepalive connection" at info; before
# 1.21.2 (no SSL_OP_IGNORE_UNEXPECTED_EOF) nginx with OpenSSL 3 reports
# the missing close_notify, "SSL_read() failed (... unexpected eof while
# reading) while keepalive", at crit.
sub ssl_idle_closed {
	my ($t, $conn) = @_;

	if (!$t->has_version('1.21.2') && $t->has_module('built with OpenSSL [3-9]')) {
		return (qr/\*$conn SSL_read\(\) failed \(SSL: .*unexpected eof while reading\) while keepalive, client: 127\.0\.0\.1,/,
			'OpenSSL 3 "unexpected eof" while keepalive before nginx 1.21.2');
	}
	return (qr/\*$conn client 127\.0\.0\.1 closed keepalive connection/,
		'"closed keepalive connection"');
}

# ssl_certificates($t, @names): a self-signed certificate and its key for
# each name, written as <name>.crt and <name>.key into the test directory
# (for "ssl_certificate <name>.crt;" in a server block of the test's
# nginx.conf).  Dies if openssl fails; openssl's output goes to
# openssl.out in the test directory.
sub ssl_certificates {
	my ($t, @names) = @_;

	my $d = $t->testdir();

	$t->write_file('openssl.conf', <<EOF);
[ req ]
default_bits = 2048
encrypt_key = no
distinguished_name = req_distinguished_name
[ req_distinguished_name ]
EOF

	foreach my $name (@names) {
		system('openssl req -x509 -new '
			. "-config $d/openssl.conf -subj /CN=$name/ "
			. "-out $d/$name.crt -keyout $d/$name.key "
			. ">>$d/openssl.out 2>&1") == 0
			or die "Can't create certificate for $name: $!\n";
	}
}

###############################################################################
# The Prometheus text format, read by a real parser: prometheus_client, for
# Debian's own python3 (python3-prometheus-client), which may not be the
# first python3 on PATH.

my $PYTHON = '/usr/bin/python3';

# prometheus_samples($t, $text): the samples of $text as prometheus_client
# parses them, each [family, type, sample name, {labels}, value]; undef if
# it cannot (the parser's output, or why it did not run, as the second
# value).
sub prometheus_samples {
	my ($t, $text) = @_;

	my $d = $t->testdir();
	$t->write_file('prometheus_parse.py', <<'EOF');
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        out.append([family.name, family.type, sample.name, sample.labels,
                    sample.value])
print(json.dumps(out))
EOF
	$t->write_file('prometheus.txt', $text // '');
	my $out = `$PYTHON $d/prometheus_parse.py < $d/prometheus.txt 2>&1`;
	my $samples = eval { JSON::PP::decode_json($out) };
	return ($samples, "$PYTHON with prometheus_client: $out");
}

###############################################################################

1;

###############################################################################
