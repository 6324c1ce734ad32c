#!/usr/bin/perl

# make test-deb: the Debian package built by "make deb", installed into this
# machine's nginx the way an operator would (apt-get install ./x.deb), run,
# removed and purged; and a copy of it declaring another nginx ABI, which
# apt must refuse, on a machine without the module and as an upgrade of it.
#
# Needs root: it changes the machine's packages while it runs, and leaves
# them, /etc/nginx/modules-enabled and /usr/lib/nginx/modules as it found
# them (checked at the end; an END block purges the package if a failure
# stopped the test half-way). It starts /usr/sbin/nginx itself, on ports of
# its own, with its own pid file and logs; never the nginx service.
#
# Not in t/*.t, so not run by "make test": it is run by "make test-deb",
#
#   TEST_DEB=objs/libnginx-mod-..._<version>_<arch>.deb \
#   TEST_DEB_VERSION=<Cargo.toml's version> prove -v t/deb/package.t

###############################################################################

use warnings;
use strict;

use Test::More;

use Cwd qw/ abs_path /;
use File::Temp qw/ tempdir /;

use FindBin;

# The system's nginx, with only what /etc/nginx/modules-enabled loads: no
# module paths or globals from the environment of a "make test".
BEGIN {
	$ENV{TEST_NGINX_BINARY} = '/usr/sbin/nginx';
	delete @ENV{qw/ TEST_NGINX_GLOBALS TEST_NGINX_MODULES
		TEST_NGINX_GLOBALS_HTTP /};
}

use lib "$FindBin::Bin/../lib";
use Test::Nginx;
use Test::Nginx::Backend qw/ http_backend conn_of /;
use Test::Nginx::Keepalive qw/ http_get_host status_of /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $PKG       = 'libnginx-mod-http-upstream-keepalive-slice';
my $SO        = '/usr/lib/nginx/modules/ngx_http_upstream_keepalive_slice_module.so';
my $AVAILABLE = '/usr/share/nginx/modules-available/mod-http-upstream-keepalive-slice.conf';
my $ENABLED   = '/etc/nginx/modules-enabled/50-mod-http-upstream-keepalive-slice.conf';
my $LOAD      = "load_module modules/ngx_http_upstream_keepalive_slice_module.so;\n";
my $SUBSTVARS = '/usr/share/nginx/src/debian/libnginx-mod.abisubstvars';
my $NGINX     = '/usr/sbin/nginx';

# An nginx ABI no nginx package has: the "other nginx" of the bad input.
my $OTHER_ABI = 'nginx-abi-0.0.0-0';

my @APT = (qw/ apt-get -y --no-install-recommends /,
	'-o', 'DPkg::Lock::Timeout=300');
$ENV{DEBIAN_FRONTEND} = 'noninteractive';

BAIL_OUT('run as root (make test-deb): it installs a package') if $> != 0;

my $deb = $ENV{TEST_DEB} // '';
BAIL_OUT("TEST_DEB=$deb: no such package file (make deb)") unless -f $deb;
$deb = abs_path($deb);

my $version = $ENV{TEST_DEB_VERSION}
	or BAIL_OUT('TEST_DEB_VERSION (Cargo.toml\'s version) not set');

BAIL_OUT("$PKG is installed ("
	. status() . "): remove it first, this test installs and purges it")
	if status() ne '';

my $before = machine_state();

###############################################################################
# Helpers.

# run(@cmd): exit status and output (stdout and stderr) of a command.
sub run {
	my $cmd = join ' ', map { /^[\w\/.,:=+@%-]+$/ ? $_ : "'" . s/'/'\\''/gr . "'" } @_;
	my $out = `$cmd 2>&1`;
	return ($? >> 8 || ($? & 127), $out);
}

sub output { (run(@_))[1] }

# dpkg's status of the package: '' when dpkg knows nothing of it (never
# installed, or purged), else e.g. "ii 0.1.0" or "rc 0.1.0".
sub status {
	my ($rc, $out) = run(qw/ dpkg-query -W -f /,
		'${db:Status-Abbrev}${Version}', $PKG);
	return '' if $rc != 0;
	$out =~ s/\s+/ /g;
	$out =~ s/^\s+|\s+$//g;
	return $out =~ /^un\b/ ? '' : $out;
}

sub slurp {
	my ($path) = @_;
	open my $fh, '<', $path or return undef;
	local $/;
	return scalar <$fh>;
}

# What the test must leave as it found it: the nginx packages (other
# helpers may install unrelated ones meanwhile), the enabled modules (names
# and link targets), the modules directory.
sub machine_state {
	my $s = join '', grep { /nginx/ } split /^/,
		output(qw/ dpkg-query -W -f /, '${Package} ${Version} ${db:Status-Abbrev}\n');
	for my $dir ('/etc/nginx/modules-enabled', '/usr/lib/nginx/modules') {
		opendir my $dh, $dir or next;
		for my $e (sort grep { !/^\.\.?$/ } readdir $dh) {
			my $link = readlink "$dir/$e";
			$s .= "$dir/$e" . (defined $link ? " -> $link" : '') . "\n";
		}
	}
	return $s;
}

# nginx -t of the machine's own configuration (/etc/nginx/nginx.conf).
sub nginx_t {
	my ($name) = @_;
	my ($rc, $out) = run($NGINX, '-t');
	is($rc, 0, "$name: nginx -t of /etc/nginx/nginx.conf passes")
		or diag($out);
	return $out;
}

# The configuration a test nginx runs: the machine's enabled modules, loaded
# the way /etc/nginx/nginx.conf loads them (no load_module of our own), and
# an upstream with the given keepalive line to the backend on port 8081.
sub nginx_conf {
	my ($keepalive) = @_;
	return <<"EOF";
user root;
pid %%TESTDIR%%/nginx.pid;
error_log %%TESTDIR%%/error.log info;
include /etc/nginx/modules-enabled/*.conf;

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream backend {
        server 127.0.0.1:8081;
        $keepalive;
    }

    server {
        listen 127.0.0.1:8080;
        server_name localhost;

        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

# A test nginx directory with nginx_conf($keepalive). The package's
# "load_module modules/...so;" is relative to nginx's prefix, which Debian's
# nginx has in /usr/share/nginx, where "modules" is a link to
# /usr/lib/nginx/modules; the test's nginx runs with its own directory as
# prefix, which gets the same link.
sub test_nginx {
	my ($keepalive) = @_;
	my $t = Test::Nginx->new();
	symlink('/usr/lib/nginx/modules', $t->testdir() . '/modules')
		or die "symlink: $!\n";
	$t->write_file_expand('nginx.conf', nginx_conf($keepalive));
	return $t;
}

# Starts the system nginx with nginx_conf($keepalive) and the backend, sends
# a.example, b.example, a.example... (three each, one after the other) and
# returns the backend's connection id for each host, and the nginx object.
sub run_nginx {
	my ($name, $keepalive) = @_;

	my $t = test_nginx($keepalive);
	$t->run_daemon(\&http_backend, port(8081));
	$t->waitforsocket('127.0.0.1:' . port(8081))
		or die "backend did not start\n";
	$t->run();

	my %conns;
	for (1 .. 3) {
		for my $host (qw/ a.example b.example /) {
			my $r = http_get_host($host, '/');
			is(status_of($r), 200, "$name: $host answered");
			push @{$conns{$host}}, conn_of($r) // 'none';
		}
	}

	return ($t, \%conns);
}

# No [alert], [crit] or [emerg] in a test nginx's error.log.
sub log_clean {
	my ($t, $name) = @_;
	my $log = $t->read_file('error.log');
	my @bad = $log =~ /^.*\[(?:alert|crit|emerg)\].*$/mg;
	is(join("\n", @bad), '', "$name: no alert, crit or emerg in error.log");
	return $log;
}

# apt-get install of a package file; its exit status and output.
sub apt_install {
	my ($file) = @_;
	return run(@APT, 'install', $file);
}

###############################################################################
# The package file.

my %field = map { $_ => output(qw/ dpkg-deb -f /, $deb, $_) =~ s/\s+$//r }
	qw/ Package Version Architecture Depends /;

my ($abi) = (slurp($SUBSTVARS) // '') =~ /^nginx:abi=(\S+)$/m;
BAIL_OUT("no nginx:abi in $SUBSTVARS (nginx-dev)") unless $abi;

is($field{Package}, $PKG, 'package name');
is($field{Version}, $version, "version is Cargo.toml's");
is($field{Architecture}, output(qw/ dpkg --print-architecture /) =~ s/\s+$//r,
	'architecture of this machine');
ok((grep { $_ eq $abi } split /,\s*/, $field{Depends}),
	"Depends: $abi, nginx-dev's ABI") or diag("Depends: $field{Depends}");

my ($provider) = grep { my ($p, $prov) = split / /, $_, 2;
	grep { /^\Q$abi\E(?:\s|$)/ } split /,\s*/, $prov // '' }
	split /\n/, output(qw/ dpkg-query -W -f /, '${Package} ${Provides}\n');
ok($provider, "the installed nginx provides $abi")
	or BAIL_OUT("no installed package provides $abi: nginx-dev and nginx differ");

my $contents = output(qw/ dpkg-deb -c /, $deb);
like($contents, qr{ \./\Q${\ substr($SO, 1)}\E$}m, "ships $SO");
is(output('sh', '-c', "dpkg-deb --fsys-tarfile '$deb' | tar -xOf - .$AVAILABLE"), $LOAD,
	"ships $AVAILABLE with its load_module line");

# The documentation: the README, the directives' reference and the
# project's changes (CHANGELOG.md, compressed or not as dh_compress sees
# fit), beside the Debian changelog of a native package, which must stay
# debian/changelog and not be replaced by CHANGELOG.md.
my $DOC = "usr/share/doc/$PKG";
for my $doc (qw/ README.md CHANGELOG.md directives.md /) {
	like($contents, qr{ \./\Q$DOC/$doc\E(?:\.gz)?$}m, "ships $DOC/$doc");
}
like(output('sh', '-c', "dpkg-deb --fsys-tarfile '$deb' | tar -xOf - ./$DOC/changelog.gz | zcat"),
	qr/^nginx-keepalive-slice \(\Q$version\E\) /,
	"$DOC/changelog.gz is the Debian changelog");

# lintian: no error, warning or info tag (those explained in
# docs/install.md are overridden in debian/*.lintian-overrides, with the reason). Its
# "running with root privileges" complaint goes to stderr.
my $lintian = `lintian --display-info --fail-on error,warning,info '$deb' 2>/dev/null`;
is($? >> 8, 0, 'lintian passes');
is($lintian, '', 'lintian: no tags');

###############################################################################
# Bad input: a copy of the package declaring another nginx ABI, as a package
# built for another nginx would. apt must refuse it, leaving nginx alone.

my $tmp = tempdir('test-deb-XXXXXXXX', TMPDIR => 1, CLEANUP => 1);
my $other = "$tmp/${PKG}_$version+otherabi.deb";
{
	my ($rc, $out) = run(qw/ dpkg-deb -R /, $deb, "$tmp/root");
	die "dpkg-deb -R: $out" if $rc;
	my $control = slurp("$tmp/root/DEBIAN/control");
	$control =~ s/^(Depends:.*?)\Q$abi\E/$1$OTHER_ABI/m or die "no $abi in control";
	$control =~ s/^Version: .*$/Version: $version+otherabi/m;
	open my $fh, '>', "$tmp/root/DEBIAN/control" or die "$!";
	print $fh $control;
	close $fh;
	($rc, $out) = run(qw/ dpkg-deb --root-owner-group -b /, "$tmp/root", $other);
	die "dpkg-deb -b: $out" if $rc;
}
like(output(qw/ dpkg-deb -f /, $other, 'Depends'), qr/\Q$OTHER_ABI\E/,
	"the other package depends on $OTHER_ABI");
{
	my ($providers) = output(qw/ apt-cache showpkg /, $OTHER_ABI)
		=~ /^Reverse Provides:[^\n]*\n(.*)\z/ms;
	is($providers // '', '', "no package known to apt provides $OTHER_ABI");
}

{
	my ($rc, $out) = apt_install($other);
	isnt($rc, 0, 'other ABI: apt-get install refused');
	like($out, qr/\Q$PKG\E : Depends: \Q$OTHER_ABI\E but it is not installable/,
		'other ABI: refused for the nginx ABI') or diag($out);
	is(status(), '', 'other ABI: not installed');
	ok(!-e $SO && !-l $ENABLED, 'other ABI: no module, no modules-enabled link');
	nginx_t('other ABI');
}

###############################################################################
# Install.

{
	my ($rc, $out) = apt_install($deb);
	is($rc, 0, 'apt-get install ./' . ($deb =~ s{.*/}{}r)) or diag($out);
	like(status(), qr/^ii \Q$version\E$/, 'installed');

	# The maintainer scripts ask for an nginx reload through the
	# nginx-reload trigger, as Debian's own module packages do: the nginx
	# package handles it, reloading only a running nginx service, after
	# testing its configuration (init script) or by nginx -s reload
	# (systemd), which keeps the old configuration if the new one fails.
	my ($interested) = (slurp('/var/lib/dpkg/triggers/nginx-reload') // '')
		=~ /^([\w.+-]+)/;
	ok($interested, 'a package (nginx) handles the nginx-reload trigger');
	like($out, qr/^Processing triggers for \Q${\ ($interested \/\/ 'nginx')}\E /m,
		'nginx-reload trigger processed');
}

ok(-f $SO, "module in $SO");
is(readlink($ENABLED), $AVAILABLE, "enabled: $ENABLED -> $AVAILABLE");
is(slurp($ENABLED), $LOAD, 'enabled: the load_module line');

nginx_t('installed');
{
	my $dump = output($NGINX, '-T');
	my @loads = $dump =~ /^\s*load_module\s+\S*ngx_http_upstream_keepalive_slice_module\.so/mg;
	is(scalar @loads, 1, 'nginx -T: the module is loaded once');
	like($dump, qr/^# configuration file \Q$ENABLED\E:\n\Q$LOAD\E/m,
		"nginx -T: loaded by $ENABLED");
}

###############################################################################
# The system nginx with a sliced upstream: each Host keeps its own upstream
# connection (a.example always the first, b.example the second). nginx's own
# keepalive, which would be used without the module, would reuse the first
# connection for both (checked after removal below).

{
	my ($t, $conns) = run_nginx('sliced', 'keepalive 8 slice_key=$host slice_conn=2');
	is_deeply($conns, { 'a.example' => [1, 1, 1], 'b.example' => [2, 2, 2] },
		'sliced: one upstream connection per Host, reused');
	$t->stop();
	my $log = log_clean($t, 'sliced');
	my ($nginx_version) = output($NGINX, '-v') =~ m{nginx/(\S+)};
	like($log, qr/keepalive slice module \Q$version\E \(built for nginx \Q$nginx_version\E\)/,
		"the packaged module $version, built for nginx $nginx_version, loaded");
}

###############################################################################
# Bad input while installed: the other-ABI copy as an upgrade is refused too,
# and the installed package stays as it was.

{
	my ($rc, $out) = apt_install($other);
	isnt($rc, 0, 'other ABI as an upgrade: refused');
	like($out, qr/Depends: \Q$OTHER_ABI\E but it is not installable/,
		'other ABI as an upgrade: refused for the nginx ABI') or diag($out);
	like(status(), qr/^ii \Q$version\E$/, 'other ABI as an upgrade: still installed');
	my ($vrc, $vout) = run(qw/ dpkg --verify /, $PKG);
	ok($vrc == 0 && $vout eq '', 'other ABI as an upgrade: installed files intact')
		or diag($vout);
	nginx_t('other ABI as an upgrade');
}

###############################################################################
# Remove: the module is no longer loaded, nginx still starts. Debian's
# module packages (dh_nginx) keep a disabled "<link>.removed" after a
# remove, so that reinstalling enables the module again; nginx only
# includes *.conf.

{
	my ($rc, $out) = run(@APT, 'remove', $PKG);
	is($rc, 0, "apt-get remove $PKG") or diag($out);
}

like(status(), qr/^rc /, 'removed: dpkg keeps it for a purge (config-files)');
ok(!-e $SO, 'removed: no module');
ok(!-e $ENABLED && !-l $ENABLED, 'removed: no modules-enabled link');
is(readlink("$ENABLED.removed"), $AVAILABLE,
	'removed: the .removed marker of dh_nginx (not included by nginx)');
ok(!-e $AVAILABLE, "removed: no $AVAILABLE");
{
	my $out = nginx_t('removed');
	unlike(output($NGINX, '-T'), qr/keepalive_slice/, 'removed: nginx -T: no trace of the module');
}

{
	my $t = test_nginx('keepalive 8 slice_key=$host slice_conn=2');
	# nginx's own [emerg] on stderr would look like a failure; the
	# message is in $@ too.
	open my $stderr, '>&', \*STDERR or die "dup: $!\n";
	open STDERR, '>', '/dev/null' or die "/dev/null: $!\n";
	eval { $t->run(); };
	open STDERR, '>&', $stderr or die "dup: $!\n";
	like($@, qr/\[emerg\].*(?:"keepalive" directive|slice_key)/,
		'removed: slice_key refused, by the stock keepalive');
}

{
	my ($t, $conns) = run_nginx('removed', 'keepalive 8');
	is_deeply($conns, { 'a.example' => [1, 1, 1], 'b.example' => [1, 1, 1] },
		'removed: nginx starts, stock keepalive shares the connection');
	$t->stop();
	unlike(log_clean($t, 'removed'), qr/keepalive slice module/,
		'removed: the module is not loaded');
}

###############################################################################
# Installed again after a remove: enabled again, as dh_nginx's scripts do
# (an administrator's own disabling, a link removed by hand, is kept).

{
	my ($rc, $out) = apt_install($deb);
	is($rc, 0, 'installed again') or diag($out);
	is(readlink($ENABLED), $AVAILABLE, 'installed again: enabled');
	ok(!-l "$ENABLED.removed", 'installed again: no .removed marker');
	nginx_t('installed again');
}

# An administrator who disabled the module (removed the link) keeps it
# disabled when the package is installed over itself (as by an upgrade).
{
	unlink($ENABLED) or die "unlink $ENABLED: $!\n";
	my ($rc, $out) = run(@APT, '--reinstall', 'install', $deb);
	is($rc, 0, 'disabled by hand, reinstalled') or diag($out);
	ok(!-e $ENABLED && !-l $ENABLED, 'disabled by hand, reinstalled: still disabled');
	unlike(output($NGINX, '-T'), qr/keepalive_slice/,
		'disabled by hand, reinstalled: nginx -T: not loaded');
}

###############################################################################
# Purge: no trace at all.

{
	my ($rc, $out) = run(@APT, 'purge', $PKG);
	is($rc, 0, "apt-get purge $PKG") or diag($out);
}

is(status(), '', 'purged: dpkg knows nothing of it');
is(join(' ', grep { /keepalive-slice/ } glob('/etc/nginx/modules-enabled/* /etc/nginx/modules-enabled/.*')),
	'', 'purged: nothing in modules-enabled');
is(join(' ', grep { -e "/$_" || -l "/$_" } $contents =~ m{^-\S+ .* \./(\S+)$}mg),
	'', 'purged: none of the package\'s files left');
nginx_t('purged');

is(machine_state(), $before,
	'packages, modules-enabled and modules as before the test');

done_testing();

###############################################################################

# A failure half-way must not leave the package installed.
END {
	local $?;
	if ($> == 0 && $PKG && status() ne '') {
		diag("purging $PKG left by the test");
		system(@APT, '-qq', 'purge', $PKG);
	}
}

###############################################################################
