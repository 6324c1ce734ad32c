#!/usr/bin/perl

# Tests for the keepalive slice module: the startup notice.  Once per
# configuration load, in the master (not once per worker), the module says
# which version is loaded and which nginx it was built for.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ reload_wait slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);
$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

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
            proxy_pass http://u;
        }
    }
}

EOF

$t->run()->plan(5);

###############################################################################

# The version the module reports is the one this source tree declares, and
# the nginx it names is the nginx running it.

open my $fh, '<', "$FindBin::Bin/../Cargo.toml" or die "Cargo.toml: $!\n";
my ($version) = join('', <$fh>) =~ /^version\s*=\s*"([^"]+)"/m
	or die "no version in Cargo.toml\n";
close $fh;
my ($nginx) = `$Test::Nginx::NGINX -v 2>&1` =~ m{nginx/(\d+\.\d+\.\d+)}
	or die "no version from nginx -v\n";

my $notice = qr/\[notice\] \d+#\d+: keepalive slice module (\S+) \(built for nginx (\S+)\)/;

my @notices = $t->read_file('error.log') =~ /($notice)/g;
my ($loaded, $built_for) = @notices[1, 2];
is(@notices / 3, 1, 'one notice for the start, not one per worker');
is($loaded, $version, 'module version is Cargo.toml\'s');
is($built_for, $nginx, 'built for the nginx that runs it');

my $master = $t->read_file('nginx.pid') =~ /(\d+)/ ? $1 : 'none';
like($t->read_file('error.log'), qr/\[notice\] $master#\d+: keepalive slice module/,
	'logged by the master');

reload_wait($t);

@notices = $t->read_file('error.log') =~ /($notice)/g;
is(@notices / 3, 2, 'one more notice for the reload');

###############################################################################
