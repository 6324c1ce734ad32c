#!/usr/bin/perl

# Tests for upstream keepalive: memcached_pass to an upstream with keepalive,
# against a real memcached.  memcached's own "stats" show how many
# connections nginx opened: with keepalive one for all requests, without
# keepalive one per request.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }

use IO::Socket::INET;

use Test::Nginx;
use Test::Nginx::Keepalive qw/ slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http memcached upstream_keepalive/)
	->has_daemon('memcached');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream memd {
        server 127.0.0.1:8081;
        keepalive 1;
    }

    upstream memd_default {
        server 127.0.0.1:8081;
    }

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            set $memcached_key $uri;
            memcached_pass memd;
        }

        location ~ ^/nokeep(/.*)$ {
            set $memcached_key $1;
            memcached_pass 127.0.0.1:8081;
        }

        location ~ ^/default(/.*)$ {
            set $memcached_key $1;
            memcached_pass memd_default;
        }
    }
}

EOF

# memcached refuses to run as root unless told which user to be

my @memd = ('-l', '127.0.0.1', '-p', port(8081), '-U', '0');
push @memd, '-u', 'root' if $> == 0;

$t->run_daemon('memcached', @memd);
$t->run()->waitforsocket('127.0.0.1:' . port(8081))
	or die "Can't start memcached";

$t->plan(22);

my $ours = slice_module();

# nginx 1.29.7 and later keep connections by default for an explicit
# upstream without "keepalive" (32, local); older versions keep none there
my $default_keeps = $t->has_version('1.29.7')
	&& `$Test::Nginx::NGINX -V 2>&1`
		!~ /--without-http_upstream_keepalive_module/;

###############################################################################

# one connection of our own for setting keys and reading stats, kept open
# for the whole test so that it counts once in total_connections

my $memd = IO::Socket::INET->new(
	Proto => 'tcp',
	PeerAddr => '127.0.0.1:' . port(8081),
) or die "Can't connect to memcached: $!\n";

sub memd_cmd {
	my ($cmd, $end) = @_;
	my $reply = '';

	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm(5);
		$memd->syswrite($cmd);
		while ($reply !~ $end) {
			$memd->sysread($reply, 4096, length $reply) or last;
		}
		alarm(0);
	};
	alarm(0);

	return $reply;
}

sub memd_set {
	my ($key, $value) = @_;
	return memd_cmd("set $key 0 0 " . length($value) . "\r\n$value\r\n",
		qr/\r\n\z/);
}

sub memd_stats {
	my $reply = memd_cmd("stats\r\n", qr/^END\r\n\z/m);
	my %stats = $reply =~ /^STAT (\S+) (\S+)\r$/mg;
	return \%stats;
}

is(memd_set('/', 'SEE-THIS'), "STORED\r\n", 'set /');
is(memd_set('/big', 'x' x 10000), "STORED\r\n", 'set /big');

my $before = memd_stats();
ok(defined $before->{total_connections}, 'memcached stats');

# with keepalive: several requests, hits and a miss, over one connection

like(http_get('/'), qr/200 OK.*SEE-THIS$/s, 'keepalive: first request');
like(http_get('/'), qr/200 OK.*SEE-THIS$/s, 'keepalive: second request');
like(http_get('/big'), qr/200 OK.*\r\n\r\nx{10000}$/s,
	'keepalive: big value');
like(http_get('/missing'), qr/404 Not Found/, 'keepalive: miss');
like(http_get('/'), qr/200 OK.*SEE-THIS$/s, 'keepalive: after a miss');

my $after = memd_stats();

is($after->{total_connections} - $before->{total_connections}, 1,
	'keepalive: one connection opened for 5 requests');
is($after->{curr_connections} - $before->{curr_connections}, 1,
	'keepalive: connection kept open');
is($after->{cmd_get} - $before->{cmd_get}, 5, 'keepalive: 5 gets served');

# without keepalive (an implicit upstream: never cached, by any nginx),
# for comparison: a connection per request

like(http_get('/nokeep/'), qr/200 OK.*SEE-THIS$/s, 'no keepalive: first');
like(http_get('/nokeep/'), qr/200 OK.*SEE-THIS$/s, 'no keepalive: second');
like(http_get('/nokeep/'), qr/200 OK.*SEE-THIS$/s, 'no keepalive: third');

my $nokeep = memd_stats();

is($nokeep->{total_connections} - $after->{total_connections}, 3,
	'no keepalive: 3 connections for 3 requests');

# an explicit upstream without "keepalive": what this nginx does by default

like(http_get('/default/'), qr/200 OK.*SEE-THIS$/s, 'default: first');
like(http_get('/default/'), qr/200 OK.*SEE-THIS$/s, 'default: second');
like(http_get('/default/'), qr/200 OK.*SEE-THIS$/s, 'default: third');

my $default = memd_stats();

if ($default_keeps) {
	is($default->{total_connections} - $nokeep->{total_connections}, 1,
		'default: one connection for 3 requests (kept by default '
		. 'from nginx 1.29.7)');
} else {
	is($default->{total_connections} - $nokeep->{total_connections}, 3,
		'default: 3 connections for 3 requests (nothing kept by '
		. 'default before nginx 1.29.7)');
}

# and the cached connection is still good afterwards

like(http_get('/'), qr/200 OK.*SEE-THIS$/s, 'keepalive: once more');

my $last = memd_stats();

is($last->{total_connections} - $default->{total_connections}, 0,
	'keepalive: still the same connection');

# only our module logs this: the 4 later requests of the first series and
# the last one took the idle connection from its cache, and from nginx
# 1.29.7 on the 2 later requests to the upstream without "keepalive" too
# (the module serves it, in place of nginx's default cache)

SKIP: {
skip 'module not loaded', 1 unless $ours;

is(() = $t->read_file('error.log')
	=~ /get keepalive slice peer: using connection/g,
	$default_keeps ? 7 : 5,
	$default_keeps ? 'module: 7 reuses, 2 by default (nginx 1.29.7+)'
		: 'module: 5 reuses, none by default (before nginx 1.29.7)');

}

###############################################################################
