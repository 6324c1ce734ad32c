#!/usr/bin/perl

# Tests for idle connections shared between workers, where the kernel
# refuses the transport: nginx runs under a seccomp filter that answers
# pidfd_getfd(2) with EPERM (as a container runtime's profile may).  Each
# worker logs one notice and keeps its idle connections its own, and
# requests are served as without sharing.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Config;
use File::Temp qw/ tempdir /;

use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of /;
use Test::Nginx::Keepalive qw/ header_of slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'the module is not loaded') unless slice_module();
# The filter below is written for x86_64 system call numbers.
plan(skip_all => 'seccomp filter for x86_64 only')
	unless $Config{archname} =~ /^x86_64-linux/;

# nginx started through a wrapper that installs the filter, then execs it.
my $wrapdir = tempdir(CLEANUP => 1);
my $wrapper = "$wrapdir/nginx";
my $real = $Test::Nginx::NGINX;
open my $fh, '>', $wrapper or die "$wrapper: $!\n";
print $fh <<"EOF";
#!$^X
# PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP (SECCOMP_MODE_FILTER):
# pidfd_getfd (438) -> EPERM, everything else allowed.
my \@prog = (
	[ 0x20, 0, 0, 4 ],              # ld arch
	[ 0x15, 0, 3, 0xc000003e ],     # x86_64? else allow
	[ 0x20, 0, 0, 0 ],              # ld nr
	[ 0x15, 0, 1, 438 ],            # pidfd_getfd?
	[ 0x06, 0, 0, 0x00050001 ],     # ret ERRNO(EPERM)
	[ 0x06, 0, 0, 0x7fff0000 ],     # ret ALLOW
);
my \$filter = join '', map { pack 'SCCL', \@\$_ } \@prog;
my \$fprog = pack 'Sx6P', scalar(\@prog), \$filter;
syscall(157, 38, 1, 0, 0, 0) == 0 or die "PR_SET_NO_NEW_PRIVS: \$!\\n";
syscall(157, 22, 2, \$fprog) == 0 or die "PR_SET_SECCOMP: \$!\\n";
exec { '$real' } '$real', \@ARGV or die "exec: \$!\\n";
EOF
close $fh;
chmod 0755, $wrapper;
$Test::Nginx::NGINX = $wrapper;

my $t = Test::Nginx->new()->has(qw/http proxy upstream_keepalive/);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 4;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream u {
        server 127.0.0.1:8081;
        keepalive 8;
        keepalive_timeout 30s;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    add_header X-Worker $pid always;
    add_header X-Reused $upstream_keepalive_reused always;

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location / {
            proxy_pass http://u/;
        }
    }
}

EOF

$t->run_daemon(\&http_backend, port(8081));
$t->run();
$t->waitforsocket('127.0.0.1:' . port(8081));

$t->plan(5);

###############################################################################

my (%pids, %pids_of_conn, %reused, $ok);
for (1 .. 40) {
	my $r = http_get('/');
	my ($pid, $conn) = (header_of($r, 'X-Worker'), conn_of($r));
	next unless defined $pid && defined $conn;
	$ok++;
	$pids{$pid}++;
	$pids_of_conn{$conn}{$pid}++;
	$reused{header_of($r, 'X-Reused') // ''}++;
}

is($ok, 40, 'requests served');
cmp_ok(keys %pids, '>=', 2, 'by several workers');
is(scalar(grep { keys %{$pids_of_conn{$_}} >= 2 } keys %pids_of_conn), 0,
	'no connection carried requests of two workers');
ok(!$reused{w} && $reused{r}, 'connections reused, each by its worker only');

my @notices = $t->read_file('error.log')
	=~ /\[notice\].*keepalive share: pidfd_getfd\(\) not available \(Operation not permitted\)/g;
is(scalar(@notices), 4, 'a notice from each worker');

###############################################################################
