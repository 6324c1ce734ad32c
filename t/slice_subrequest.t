#!/usr/bin/perl

# Tests for upstream keepalive: sliced idle connections used by subrequests
# (SSI includes), which take the parent request's host bucket.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend backend_log_count /;
use Test::Nginx::Keepalive qw/ http_get_host status_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy ssi upstream_keepalive/);
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

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            ssi on;
            default_type text/html;
        }

        location /proxy/ {
            proxy_pass http://u/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }
    }
}

EOF

$t->write_file('seq.html',
	'<!--# include virtual="/proxy/one" wait="yes" -->'
	. '<!--# include virtual="/proxy/two" wait="yes" -->');
$t->write_file('par.html',
	'<!--# include virtual="/proxy/one" -->'
	. '<!--# include virtual="/proxy/two" -->');

my $d = $t->testdir();

$t->run_daemon(\&http_backend, port(8081), log => "$d/backend.log",
	vhost_bind => 1);
$t->run()->waitforsocket('127.0.0.1:' . port(8081));

$t->plan(21);

###############################################################################

# Requests the page for the host; returns the status, the hosts the backend
# saw and the connections it used for the includes (in order).
sub page {
	my ($host, $uri) = @_;

	my $r = http_get_host($host, $uri) // '';
	my (@conns, @hosts);

	while ($r =~ /conn=(\d+) req=\d+ host=(\S*) port=\d+ uri=\/(one|two)/g) {
		push @conns, $1;
		push @hosts, $2;
	}

	return (status_of($r) // 0, join(' ', @hosts), @conns);
}

sub keys_logged {
	my ($t) = @_;
	return [ $t->read_file('error.log') =~ /keepalive slice key: "([^"]*)"/g ];
}

###############################################################################

# sequential includes: the second one reuses the first one's connection

my ($st, $hosts, @a) = page('a.example', '/seq.html');
is($st, 200, 'seq a: 200');
is($hosts, 'a.example a.example', 'seq a: includes for a');
is("@a", '1 1', 'seq a: second include reuses the connection');

my @before = @{keys_logged($t)};
($st, $hosts, my @b) = page('b.example', '/seq.html');
my @after = @{keys_logged($t)};
is("$st $hosts", '200 b.example b.example', 'seq b: includes for b');
is("@b", '2 2', 'seq b: own connection, reused');
is(join(' ', @after[@before .. $#after]), 'b.example b.example',
	'seq b: subrequests evaluate the parent\'s host');

($st, $hosts, @a) = page('a.example', '/seq.html');
is("$st $hosts", '200 a.example a.example', 'seq a again: 200');
is("@a", '1 1', 'seq a again: a\'s connection');

# parallel includes: two connections in flight, both kept (slice_conn=2)

($st, $hosts, my @c) = page('c.example', '/par.html');
is("$st $hosts", '200 c.example c.example', 'par c: includes for c');

# a's and b's connections are 1 and 2, so c's two are 3 and 4

is(join(' ', sort { $a <=> $b } @c), '3 4',
	'par c: two new connections, not a\'s or b\'s');
my %c = map { $_ => 1 } @c;

($st, $hosts, my @c2) = page('c.example', '/par.html');
is("$st $hosts", '200 c.example c.example', 'par c again: 200');
is(join(' ', sort { $a <=> $b } @c2), '3 4',
	'par c again: both of c\'s connections reused');

($st, $hosts, @b) = page('b.example', '/par.html');
is("$st $hosts", '200 b.example b.example', 'par b: 200');
is(scalar(grep { $_ == 1 || $c{$_} } @b), 0,
	'par b: not a\'s or c\'s connections');
ok(grep({ $_ == 2 } @b), 'par b: b\'s connection reused');

($st, $hosts, @a) = page('a.example', '/par.html');
is("$st $hosts", '200 a.example a.example', 'par a: 200');
ok(grep({ $_ == 1 } @a), 'par a: a\'s connection reused');

# the mpm-itk style backend never saw a host change on a connection

my $blog = $t->read_file('backend.log');
is(backend_log_count("$d/backend.log", qr/reset-vhost/), 0, 'no resets');
is(backend_log_count("$d/backend.log", qr/^request /), 14,
	'all includes reached the backend');

my %conn_hosts;
$conn_hosts{$1}{$2} = 1 while $blog =~ /^request conn=(\d+) req=\d+ host=(\S*)/gm;
is(join(', ', map { "$_: " . join(' ', sort keys %{$conn_hosts{$_}}) }
	grep { keys %{$conn_hosts{$_}} > 1 } sort keys %conn_hosts), '',
	'one host per connection');

unlike($t->read_file('error.log'),
	qr/upstream prematurely closed|recv\(\) failed|\[error\]/,
	'no upstream errors');

###############################################################################
