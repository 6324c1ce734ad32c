package Test::Nginx;

# Generic helper for nginx tests.
#
# This is an independent implementation of the interface of the Test::Nginx
# module shipped with nginx's own test suite ("nginx-tests", lib/Test/Nginx.pm).
# Test files written for that library are meant to run unchanged with this
# one and vice versa, so names, signatures, defaults and the observable
# behaviour (config macros, port mapping, the two extra tests run when the
# object goes away, reload() returning right after the signal) follow the
# original.  Where this module does more (a clearer error from run(),
# try_run() after plan()), the additions are supersets that a test written
# for the original cannot tell apart; a test that passes here and fails
# there (or the other way round) is a bug in one of the two.
#
# Nothing in here may know about the project using it: project-specific
# helpers belong in Test::Nginx::* modules next to this file.
#
# Typical use:
#
#   my $t = Test::Nginx->new()->has(qw/http proxy/)->plan(2);
#   $t->write_file_expand('nginx.conf', <<'EOF');
#   %%TEST_GLOBALS%%
#   daemon off;
#   events {
#   }
#   http {
#       %%TEST_GLOBALS_HTTP%%
#       server {
#           listen 127.0.0.1:8080;
#           ...
#       }
#   }
#   EOF
#   $t->run();
#   like(http_get('/'), qr/200 OK/, 'request');
#
# Environment:
#
#   TEST_NGINX_BINARY        nginx binary (default ../nginx/objs/nginx)
#   TEST_NGINX_GLOBALS       appended to %%TEST_GLOBALS%% (main context)
#   TEST_NGINX_GLOBALS_HTTP  appended to %%TEST_GLOBALS_HTTP%%
#   TEST_NGINX_GLOBALS_STREAM  appended to %%TEST_GLOBALS_STREAM%%
#   TEST_NGINX_MODULES       directory with dynamic modules (default: the
#                            directory of the binary)
#   TEST_NGINX_VERBOSE       log requests and responses (log_in/log_out)
#   TEST_NGINX_LEAVE         keep the temporary test directory
#   TEST_NGINX_CATLOG        print error.log when the test finishes

###############################################################################

use warnings;
use strict;

use base qw/ Exporter /;

our @EXPORT = qw/ log_in log_out http http_get http_head port /;
our @EXPORT_OK = qw/
	http_gzip_request http_gzip_like http_start http_end http_content
	log_core
/;
our %EXPORT_TAGS = (
	gzip => [ qw/ http_gzip_request http_gzip_like / ]
);

###############################################################################

use File::Path qw/ rmtree /;
use File::Spec qw//;
use File::Temp qw/ tempdir /;
use IO::Socket::INET;
use POSIX qw/ WNOHANG /;
# Loaded before our own END block is compiled, so that END block runs
# before Test::Builder's (END blocks run in reverse order of compilation).
use Test::More qw//;

###############################################################################

our $NGINX = defined $ENV{TEST_NGINX_BINARY} ? $ENV{TEST_NGINX_BINARY}
	: '../nginx/objs/nginx';

# Logical port number => { port => real port, socket => lock socket }.
# Package-global like in the original: port() is a plain function that
# test files call without an object.
our %ports = ();

###############################################################################

sub new {
	my $self = {};
	bless $self;

	$self->{_pid} = $$;
	$self->{_alerts} = 1;
	$self->{_errors_skip} = {};

	$self->{_testdir} = tempdir(
		'nginx-test-XXXXXXXXXX',
		TMPDIR => 1,
		CLEANUP => !$ENV{TEST_NGINX_LEAVE}
	)
		or die "Can't create temp directory: $!\n";
	$self->{_testdir} =~ s!\\!/!g if $^O eq 'MSWin32';

	Test::More::BAIL_OUT("no $NGINX binary found")
		unless -x $NGINX;

	return $self;
}

sub DESTROY {
	my ($self) = @_;
	$self->_finalize();
}

# Everything done when a test file is over: stop nginx and the daemons,
# check error.log, clean up.  As in the original this happens when the
# object goes away, which must be before the test file ends: an object
# that outlives it (e.g. $t used inside a named sub, which keeps it alive
# until global destruction) is destroyed after Test::Builder has checked
# the plan, so the file fails with the two final checks missing, under
# either library.  Then nginx is still stopped and the reason is said.
sub _finalize {
	my ($self) = @_;
	local $?;
	local $@;

	return if $self->{_finalized};

	# a forked child (run_daemon) inherits the object: only the process
	# that created it may stop nginx and remove the directory

	return if !defined $self->{_pid} || $self->{_pid} != $$;
	$self->{_finalized} = 1;

	$self->stop();
	$self->stop_daemons();

	my $log = $self->_read_log();

	if (${^GLOBAL_PHASE} eq 'DESTRUCT') {
		print STDERR "# Test::Nginx object destroyed after the test file"
			. " ended (still referenced, e.g. by a named sub):"
			. " the final checks could not run\n";
		eval { rmtree($self->{_testdir}); } if !$ENV{TEST_NGINX_LEAVE};
		return;
	}

	my $builder = Test::More->builder;
	my $check = $self->_room_for_checks();

	if ($check) {

		# todo_start() rather than the original's "local $TODO", which
		# Test::Builder only finds in the package of the caller

		$builder->todo_start('alerts') unless $self->{_alerts};

		my @alerts = $self->_errors($log, 'alert');
		Test::More::is(join("\n", @alerts), '', 'no alerts');

		$builder->todo_end() unless $self->{_alerts};
	}

	if ($check) {
		# ASan/LSan reports reach error.log because nginx redirects
		# its stderr there; UBSan reports look like
		# "file.c:12:3: runtime error: ..."

		my @errors = $log =~ /^.*(?:Sanitizer|\S+:\d+:\d+: runtime error:).*$/gm;
		Test::More::is(join("\n", @errors), '', 'no sanitizer errors');
	}

	if (!$check && $builder->current_test) {
		# no room in the plan (done_testing() or a plan of its own),
		# but alerts shouldn't go unnoticed

		$builder->diag("error.log: $_") for $self->_errors($log, 'alert');
	}

	if ($ENV{TEST_NGINX_CATLOG}) {
		print STDERR $log;
	}

	if (!$ENV{TEST_NGINX_LEAVE}) {
		eval { rmtree($self->{_testdir}); };
	}
}

# The two final checks run whenever the file has a plan, as in nginx's own
# library: a file that ran more tests than it planned (leaving no room for
# them) then fails with a plan mismatch instead of silently skipping them.
sub _room_for_checks {
	my $builder = Test::More->builder;
	return $builder->expected_tests;
}

sub _read_log {
	my ($self) = @_;
	my $log = eval { $self->read_file('error.log') };
	return defined $log ? $log : '';
}

# Lines of the given level in the log, minus those skip_errors_check()
# asked to ignore.
sub _errors {
	my ($self, $log, $level) = @_;

	my @lines = $log =~ /^.*\[\Q$level\E\].*$/gm;
	my $skip = $self->{_errors_skip}{$level};

	return @lines unless defined $skip;
	return () unless @$skip;

	return grep { my $l = $_; !grep { $l =~ $_ } @$skip } @lines;
}

###############################################################################

# Skips the whole test file unless every feature is available.
sub has($;) {
	my ($self, @features) = @_;

	foreach my $feature (@features) {
		Test::More::plan(skip_all => "no $feature available")
			unless $self->has_module($feature)
			or $self->has_feature($feature);
	}

	return $self;
}

sub _configure_args {
	my ($self) = @_;

	$self->{_configure_args} = `\Q$NGINX\E -V 2>&1`
		if !defined $self->{_configure_args};

	return $self->{_configure_args};
}

# Modules built unless "--without-<prefix>_<name>_module" is given.
my @default_http = qw/
	charset gzip ssi userid access auth_basic mirror autoindex geo map
	split_clients referer rewrite proxy fastcgi uwsgi scgi grpc memcached
	limit_conn limit_req empty_gif browser upstream_hash upstream_ip_hash
	upstream_least_conn upstream_random upstream_keepalive upstream_zone
/;
my @default_stream = qw/
	access geo limit_conn map pass return set split_clients
	upstream_hash upstream_least_conn upstream_random upstream_zone
/;
my @default_mail = qw/ pop3 imap smtp /;

# Features whose configure switch doesn't follow the general rule.
my %special = (
	sni	=> qr/TLS SNI support enabled/,
	http	=> qr/^(?!.*--without-http(?!\S))/s,
	cache	=> qr/^(?!.*--without-http-cache)/s,
	pcre	=> qr/^(?!.*--without-pcre(?!\S))/s,
	debug	=> qr/--with-debug(?!\S)/,
	ssl	=> qr/--with-http_ssl_module/,
);

# Dynamic modules loaded by "load_module" in TEST_NGINX_GLOBALS count too.
my %dynamic = (
	# a module loaded dynamically in place of one built without
	upstream_keepalive	=> 'ngx_http_upstream_keepalive',
	http_geoip	=> 'ngx_http_geoip_module',
	image_filter	=> 'ngx_http_image_filter_module',
	perl		=> 'ngx_http_perl_module',
	xslt		=> 'ngx_http_xslt_filter_module',
	mail		=> 'ngx_mail_module',
	stream		=> 'ngx_stream_module',
	stream_geoip	=> 'ngx_stream_geoip_module',
);

# True if nginx was built with the feature.  The general rule, as in the
# original: modules built by default are there unless configure was given
# --without-..._module; others need --with-..._module (or --with-X for
# things like "stream", "mail", "threads", "debug").  Anything else is
# matched as a regular expression against "nginx -V" output, which is what
# the original does for names it doesn't know.
sub has_module($) {
	my ($self, $feature) = @_;

	my $args = $self->_configure_args();
	my $re;

	if (defined $special{$feature}) {
		$re = $special{$feature};

	} elsif (grep { $_ eq $feature } @default_http) {
		$re = qr/^(?!.*--without-http_\Q$feature\E_mod)/s;

	} elsif ($feature =~ /^stream_(.+)$/
		and grep { $_ eq $1 } @default_stream)
	{
		$re = qr/^(?!.*--without-stream_\Q$1\E_mod)/s;

	} elsif (grep { $_ eq $feature } @default_mail) {
		$re = qr/^(?!.*--without-mail_\Q$feature\E_mod)/s;
	}

	if (defined $re) {
		return 1 if $args =~ $re;

	} else {
		return 1 if $args =~ /--with-(?:http_)?\Q$feature\E(?:_module)?
			(?:=\S+)?(?!\S)/x;

		# only for things that aren't plain names: "stream_ssl" must
		# not be found in "--with-stream_ssl_preread_module"

		return 1 if $feature =~ /\W/ && eval { $args =~ /$feature/ };
	}

	my $module = $dynamic{$feature};
	if (defined $module && defined $ENV{TEST_NGINX_GLOBALS}) {
		return 1 if $ENV{TEST_NGINX_GLOBALS}
			=~ /load_module\s+[^;]*\Q$module\E[-\w]*\.so\s*;/;
	}

	return 0;
}

# Features of the platform or of the Perl side rather than of nginx.
sub has_feature($) {
	my ($self, $feature) = @_;

	if ($feature eq 'symlink' || $feature eq 'unix'
		|| $feature eq 'udp')
	{
		return $^O ne 'MSWin32';
	}

	# IO::Socket::SSL, and what the installed version of it can do

	my %socket_ssl = (
		socket_ssl		=> sub { 1 },
		socket_ssl_sni		=> sub { IO::Socket::SSL->can_client_sni() },
		socket_ssl_alpn		=> sub { IO::Socket::SSL->can_alpn() },
		socket_ssl_sslversion	=> sub { IO::Socket::SSL->can('get_sslversion') },
		socket_ssl_reused	=> sub { IO::Socket::SSL->can('get_session_reused') },
	);

	if (my $can = $socket_ssl{$feature}) {
		return eval { require IO::Socket::SSL; $can->() } ? 1 : 0;
	}

	if ($feature eq 'cryptx') {
		eval { require Crypt::Misc; };
		return !$@;
	}

	# "openssl:1.1.1", "libressl:3.5.0": the library nginx was built with,
	# at least that version

	if ($feature =~ /^(openssl|libressl|boringssl):([0-9.]+)([a-z]*)$/i) {
		my ($library, $need, $patch) = ($1, $2, $3);

		return 0 unless $self->_configure_args()
			=~ /with \Q$library\E ([0-9.]+)([a-z]*)/i;
		my ($v, $p) = ($1, $2);

		my $cmp = _version_cmp($v, $need);
		return $cmp > 0 || ($cmp == 0 && $p ge $patch) ? 1 : 0;
	}

	return 0;
}

sub _version_cmp {
	my ($have, $need) = @_;
	my @h = split /\./, $have;
	my @n = split /\./, $need;

	while (@h || @n) {
		my $h = shift(@h) || 0;
		my $n = shift(@n) || 0;
		return $h <=> $n if $h != $n;
	}

	return 0;
}

# True if nginx is at least the given version ("1.25.3").
sub has_version($) {
	my ($self, $need) = @_;

	$self->_configure_args() =~ m!nginx version: [^/\s]*/([0-9.]+)!
		or return 0;

	return _version_cmp($1, $need) >= 0 ? 1 : 0;
}

# Skips the whole test file unless the program is found in PATH.
sub has_daemon($) {
	my ($self, $daemon) = @_;

	Test::More::plan(skip_all => "$daemon not found")
		unless _in_path($daemon);

	return $self;
}

sub _in_path {
	my ($program) = @_;

	return -x $program if $program =~ m!/!;

	for my $dir (File::Spec->path()) {
		my $path = File::Spec->catfile($dir, $program);
		return 1 if -f $path && -x _;
		return 1 if $^O eq 'MSWin32' && -f "$path.exe";
	}

	return 0;
}

# Runs nginx, and skips the whole test file if it doesn't start (typically:
# a directive the binary doesn't know).  Normally called before plan(); if
# the plan is already out, the remaining tests are reported as skipped.
sub try_run($$) {
	my ($self, $message) = @_;

	# nginx reports config errors on stderr as well; a skipped test
	# shouldn't look like a failure in the output

	open my $olderr, '>&', \*STDERR or die "Can't dup STDERR: $!\n";
	close STDERR;
	open STDERR, '>', File::Spec->devnull();
	eval { $self->run(); };
	my $error = $@;
	open STDERR, '>&', $olderr;

	return $self unless $error;

	if ($ENV{TEST_NGINX_VERBOSE}) {
		log_core($self->_read_log());
	}

	my $builder = Test::More->builder;

	if ($builder->has_plan) {
		my $left = ($builder->expected_tests || 0)
			- $builder->current_test - 2;
		$builder->skip($message) for 1 .. $left;
		exit 0;
	}

	Test::More::plan(skip_all => $message);
	return $self;
}

# Plans two more tests than asked: "no alerts" and "no sanitizer errors",
# run when the object goes away.
sub plan($) {
	my ($self, $plan) = @_;

	Test::More::plan(tests => $plan + 2);

	return $self;
}

# Alerts are expected (known bug): the "no alerts" test becomes TODO.
sub todo_alerts() {
	my ($self) = @_;

	$self->{_alerts} = 0;

	return $self;
}

# skip_errors_check($level, @patterns): error.log lines of that level
# ("alert") matching any of the patterns don't fail the final check; with
# no patterns, no line of that level does.
sub skip_errors_check {
	my ($self, $level, @patterns) = @_;

	$level = 'alert' unless defined $level;
	$self->{_errors_skip}{$level} = [ map { qr/$_/ } @patterns ];

	return $self;
}

###############################################################################

# Starts nginx with the config in <testdir>/nginx.conf and waits until it
# has written its pid file (it listens by then).
#
# As in the original, an optional argument names a config file to expand
# into nginx.conf first.  Arguments starting with "-" are passed to nginx
# as extra command line options.
sub run(;$) {
	my ($self, @args) = @_;

	my $testdir = $self->{_testdir};

	my @extra = grep { /^-/ } @args;
	my ($conf) = grep { !/^-/ } @args;

	if (defined $conf) {
		open my $fh, '<', $conf or die "Can't open $conf: $!\n";
		local $/;
		$self->write_file_expand('nginx.conf', scalar <$fh>);
		close $fh;
	}

	my $pidfile = "$testdir/nginx.pid";
	my $offset = -s "$testdir/error.log" || 0;

	my @cmd = ($NGINX, $self->_nginx_args(), @extra);

	my $pid = fork();
	die "Unable to fork(): $!\n" unless defined $pid;

	if ($pid == 0) {
		exec(@cmd)
			or print STDERR "Unable to exec($NGINX): $!\n";
		POSIX::_exit(1);
	}

	# wait for the pid file, or for nginx to fail; exiting with 0 means
	# it daemonized ("daemon on"), and the daemon writes the pid file

	my ($exited, $status) = (0, 0);

	for (1 .. 50) {
		last if -e $pidfile;

		if (!$exited && waitpid($pid, WNOHANG) == $pid) {
			($exited, $status) = (1, $?);
			last if $status != 0;
		}

		select undef, undef, undef, 0.1;
	}

	if (!-e $pidfile) {
		# still running without a pid file: hung, don't leave it behind

		if (!$exited) {
			kill 'TERM', $pid;
			_wait_exit($pid, 50) or kill 'KILL', $pid;
			waitpid($pid, 0);
		}

		my $log = substr($self->_read_log(), $offset);
		my @why = $log =~ /^.*\[(?:emerg|alert|crit)\].*$/gm;
		my $why = @why ? join("\n", @why) : 'see error.log in ' . $testdir;

		die "Can't start nginx"
			. ($exited ? ' (exit code ' . ($status >> 8) . ')' : '')
			. ": $why\n";
	}

	$self->{_nginx_pid} = $pid;
	$self->{_started} = 1;
	return $self;
}

sub _nginx_args {
	my ($self) = @_;
	my $testdir = $self->{_testdir};

	# configs that don't use %%TEST_GLOBALS%% still get the pid file and
	# the error log in the test directory

	my @globals = $self->{_test_globals} ?
		() : ('-g', "pid $testdir/nginx.pid; "
		. "error_log $testdir/error.log debug;");

	my @error = $self->has_version('1.19.5') ? ('-e', 'error.log') : ();

	return ('-p', "$testdir/", '-c', 'nginx.conf', @error, @globals);
}

sub _master_pid {
	my ($self) = @_;

	my $pid = eval { $self->read_file('nginx.pid') };
	$pid = $self->{_nginx_pid} unless defined $pid && $pid =~ /(\d+)/;
	return defined $pid && $pid =~ /(\d+)/ ? $1 : undef;
}

# Reloads the configuration with SIGHUP and returns at once, as the
# original does: requests sent right after it may still be served by an
# old worker with the old configuration.  A test that needs the new one in
# effect waits for it itself (Test::Nginx::Keepalive's reload_wait()).
sub reload() {
	my ($self) = @_;

	return $self unless $self->{_started};

	my $pid = $self->_master_pid();
	return $self unless defined $pid;

	if ($^O eq 'MSWin32') {
		system($NGINX, $self->_nginx_args(), '-s', 'reload') == 0
			or die "system() failed: $?\n";
		return $self;
	}

	kill 'HUP', $pid;

	return $self;
}

# Stops nginx gracefully (SIGQUIT), waiting up to 90 seconds before
# resorting to SIGTERM.
sub stop() {
	my ($self) = @_;

	return $self unless $self->{_started};

	my $pid = $self->_master_pid();

	if (defined $pid) {
		if ($^O eq 'MSWin32') {
			system($NGINX, $self->_nginx_args(), '-s', 'stop');
		} else {
			kill 'QUIT', $pid;
		}

		my $exited = _wait_exit($pid, 900);

		if (!$exited) {
			kill 'TERM', $pid;
			_wait_exit($pid, 50) or kill 'KILL', $pid;
			_wait_exit($pid, 50);
		}
	}

	# reap our own child if nginx daemonized (then it is not $pid)

	waitpid($self->{_nginx_pid}, WNOHANG) if defined $self->{_nginx_pid};

	$self->{_started} = 0;

	return $self;
}

# Waits up to $tries * 0.1s for a process to exit; works for our children
# (reaped) and for others such as a daemonized nginx (polled).
sub _wait_exit {
	my ($pid, $tries) = @_;

	for (1 .. $tries) {
		my $r = waitpid($pid, WNOHANG);
		return 1 if $r == $pid;
		return 1 if $r == -1 && !kill(0, $pid);
		select undef, undef, undef, 0.1;
	}

	return 0;
}

# Starts a helper server: fork, then call the code ref with @args, or exec
# the program with @args.  Killed with SIGTERM by stop_daemons().
sub run_daemon($;@) {
	my ($self, $code, @args) = @_;

	my $pid = fork();
	die "Can't fork daemon: $!\n" unless defined $pid;

	if ($pid == 0) {
		if (ref($code) eq 'CODE') {
			$code->(@args);
			exit 0;
		} else {
			exec($code, @args)
				or print STDERR "Unable to exec($code): $!\n";
			POSIX::_exit(1);
		}
	}

	$self->{_daemons} = [] unless defined $self->{_daemons};
	push @{$self->{_daemons}}, $pid;

	return $self;
}

sub stop_daemons() {
	my ($self) = @_;

	while ($self->{_daemons} && scalar @{$self->{_daemons}}) {
		my $p = shift @{$self->{_daemons}};
		kill $^O eq 'MSWin32' ? 9 : 'TERM', $p;

		if (!_wait_exit($p, 50)) {
			kill 'KILL', $p;
			waitpid($p, 0);
		}
	}

	return $self;
}

# Waits up to 5 seconds for "host:port" to accept connections.
sub waitforsocket($) {
	my ($self, $peer) = @_;

	for (1 .. 50) {
		my $s = IO::Socket::INET->new(
			Proto => 'tcp',
			PeerAddr => $peer
		);

		return 1 if defined $s;

		select undef, undef, undef, 0.1;
	}

	return undef;
}

# Waits up to 5 seconds for the file to appear; with $pid, gives up early
# (returning 0) once that process has exited.
sub waitforfile($;$) {
	my ($self, $file, $pid) = @_;
	my $exited;

	for (1 .. 50) {
		return 1 if -e $file;
		return 0 if $exited;
		$exited = waitpid($pid, WNOHANG) != 0 if $pid;
		select undef, undef, undef, 0.1;
	}

	return undef;
}

# The configuration as nginx sees it ("nginx -T").
sub dump_config() {
	my ($self) = @_;

	my @args = map { quotemeta } $self->_nginx_args();
	my @out;

	for (1 .. 50) {
		@out = `\Q$NGINX\E @args -T 2>&1`;
		last if $? == 0;
		select undef, undef, undef, 0.1;
	}

	return join '', @out;
}

###############################################################################

sub testdir() {
	my ($self) = @_;
	return $self->{_testdir};
}

# Reads a file from the test directory (name relative to it).
sub read_file($) {
	my ($self, $name) = @_;
	local $/;

	open my $fh, '<', $self->{_testdir} . '/' . $name
		or die "Can't open $name: $!";
	binmode $fh;
	my $content = <$fh>;
	close $fh;

	return defined $content ? $content : '';
}

sub write_file($$) {
	my ($self, $name, $content) = @_;

	open my $fh, '>', $self->{_testdir} . '/' . $name
		or die "Can't create $name: $!";
	binmode $fh;
	print $fh $content;
	close $fh;

	return $self;
}

# Writes a file after expanding the test macros and mapping every
# 127.0.0.1:8NNN (and [::1]:8NNN) to the port port(8NNN) picked for this
# test, so that test files can run in parallel (prove -j).
sub write_file_expand($$) {
	my ($self, $name, $content) = @_;

	# a config with its own "user" directive must not get a second one
	# from %%TEST_GLOBALS%% (which adds "user root;" when run as root)

	my $globals = $self->test_globals();
	$globals =~ s/^user root;\n//m if $content =~ /^\s*user\s/m;

	$content =~ s/%%TEST_GLOBALS%%/$globals/gms;
	$content =~ s/%%TEST_GLOBALS_HTTP%%/$self->test_globals_http()/gmse;
	$content =~ s/%%TEST_GLOBALS_STREAM%%/$self->test_globals_stream()/gmse;
	$content =~ s/%%TESTDIR%%/$self->{_testdir}/gms;

	$content =~ s/127\.0\.0\.1:(8\d\d\d)(?!\d)/'127.0.0.1:' . port($1)/gmse;
	$content =~ s/\[::1\]:(8\d\d\d)(?!\d)/'[::1]:' . port($1)/gmse;

	$content =~ s/%%PORT_(\d+)%%/port($1)/gmse;
	$content =~ s/%%PORT_(\d+)_UDP%%/port($1, udp => 1)/gmse;

	return $self->write_file($name, $content);
}

# %%TEST_GLOBALS%%: main-context directives every test config needs.
sub test_globals() {
	my ($self) = @_;

	return $self->{_test_globals}
		if defined $self->{_test_globals};

	my $s = '';

	$s .= "pid $self->{_testdir}/nginx.pid;\n";

	# "debug" so that tests can look for debug lines (only effective
	# when nginx is built --with-debug)

	$s .= "error_log $self->{_testdir}/error.log debug;\n";

	# Started as root, nginx runs its workers as "nobody", who can't even
	# enter the test directory (tempdir() makes it mode 0700): serving
	# files or writing temp files there would fail.  Tests run as root
	# only in containers and CI, so keep the workers root as well.

	$s .= "user root;\n"
		if $> == 0 && $^O ne 'MSWin32'
		&& ($ENV{TEST_NGINX_GLOBALS} || '') !~ /(?:^|[;{}\s])user\s/;

	$s .= $ENV{TEST_NGINX_GLOBALS}
		if $ENV{TEST_NGINX_GLOBALS};

	$s .= $self->test_globals_modules();
	$s .= $self->test_globals_perl5lib() if $s !~ /env PERL5LIB/;

	$self->{_test_globals} = $s;
}

# load_module lines for the modules the binary was built with as dynamic
# ones (they live next to the binary in objs/).
sub test_globals_modules() {
	my ($self) = @_;

	my $modules = $ENV{TEST_NGINX_MODULES};

	if (!defined $modules) {
		my ($volume, $dir) = File::Spec->splitpath($NGINX);
		$modules = File::Spec->catpath($volume, $dir, '');
	}

	$modules = File::Spec->rel2abs($modules);
	$modules =~ s!\\!/!g if $^O eq 'MSWin32';

	my $args = $self->_configure_args();
	my $s = '';

	my @dynamic = (
		[ qr/--with-http_geoip_module=dynamic/, 'ngx_http_geoip_module' ],
		[ qr/--with-http_image_filter_module=dynamic/,
			'ngx_http_image_filter_module' ],
		[ qr/--with-http_perl_module=dynamic/, 'ngx_http_perl_module' ],
		[ qr/--with-http_xslt_module=dynamic/,
			'ngx_http_xslt_filter_module' ],
		[ qr/--with-mail=dynamic/, 'ngx_mail_module' ],
		[ qr/--with-stream=dynamic/, 'ngx_stream_module' ],
		[ qr/--with-stream_geoip_module=dynamic/,
			'ngx_stream_geoip_module' ],
	);

	for my $d (@dynamic) {
		my ($re, $module) = @$d;
		$s .= "load_module $modules/$module.so;\n" if $args =~ $re;
	}

	return $s;
}

# The embedded perl module must find its Perl part in the build tree.
sub test_globals_perl5lib() {
	my ($self) = @_;

	return '' unless $self->has_module('perl');

	my ($volume, $dir) = File::Spec->splitpath($NGINX);
	my $objs = File::Spec->catpath($volume, $dir, '');

	$objs = File::Spec->rel2abs($objs);
	$objs =~ s!\\!/!g if $^O eq 'MSWin32';

	return "env PERL5LIB=$objs/src/http/modules/perl:"
		. "$objs/src/http/modules/perl/blib/arch;\n";
}

# %%TEST_GLOBALS_HTTP%%: keeps every file nginx writes in the test dir.
sub test_globals_http() {
	my ($self) = @_;

	return $self->{_test_globals_http}
		if defined $self->{_test_globals_http};

	my $s = '';

	$s .= "root $self->{_testdir};\n";
	$s .= "access_log $self->{_testdir}/access.log;\n";
	$s .= "client_body_temp_path $self->{_testdir}/client_body_temp;\n";

	$s .= "fastcgi_temp_path $self->{_testdir}/fastcgi_temp;\n"
		if $self->has_module('fastcgi');

	$s .= "proxy_temp_path $self->{_testdir}/proxy_temp;\n"
		if $self->has_module('proxy');

	$s .= "uwsgi_temp_path $self->{_testdir}/uwsgi_temp;\n"
		if $self->has_module('uwsgi');

	$s .= "scgi_temp_path $self->{_testdir}/scgi_temp;\n"
		if $self->has_module('scgi');

	$s .= $ENV{TEST_NGINX_GLOBALS_HTTP}
		if $ENV{TEST_NGINX_GLOBALS_HTTP};

	$self->{_test_globals_http} = $s;
}

# %%TEST_GLOBALS_STREAM%%
sub test_globals_stream() {
	my ($self) = @_;

	return $self->{_test_globals_stream}
		if defined $self->{_test_globals_stream};

	my $s = '';

	$s .= $ENV{TEST_NGINX_GLOBALS_STREAM}
		if $ENV{TEST_NGINX_GLOBALS_STREAM};

	$self->{_test_globals_stream} = $s;
}

###############################################################################

# port($n, %opts): the real port standing for the logical port $n (usually
# 8080, 8081...) in this test; the same number every time.  The literal
# port is tried first, then random ones from the same block of 500.
#
# The chosen port is verified free by binding it, and then "locked" by
# keeping a socket of the other protocol (UDP for a TCP port) bound to it
# for the life of the test: nginx itself can then bind the port, while
# another test running in parallel, doing the same check, finds it taken.
#
# Options: udp => 1 (a UDP port, locked with TCP), socket => 1 (return the
# lock socket instead of the number).  Callable as $t->port($n) too.
sub port {
	shift if @_ && (ref $_[0] || $_[0] eq __PACKAGE__);
	my ($num, %opts) = @_;
	my ($sock, $lock, $port);

	if (!defined $ports{$num}) {
		my $socket = sub {
			IO::Socket::INET->new(
				Proto => 'tcp',
				LocalAddr => '127.0.0.1:' . shift,
				Listen => 1,
				Reuse => ($^O ne 'MSWin32'),
			);
		};

		my $socketl = sub {
			IO::Socket::INET->new(
				Proto => 'udp',
				LocalAddr => '127.0.0.1:' . shift,
			);
		};

		($socket, $socketl) = ($socketl, $socket) if $opts{udp};

		$port = $num;

		for (1 .. 10) {
			$port = int($num / 500) * 500 + int(rand(500))
				unless $_ == 1;

			$lock = $socketl->($port) or next;
			$sock = $socket->($port) and last;
			undef $lock;
		}

		die "Port limit exceeded" unless defined $lock and defined $sock;

		$ports{$num} = {
			port => $port,
			socket => $lock
		};
	}

	return $ports{$num}{socket} if $opts{socket};
	return $ports{$num}{port};
}

###############################################################################

# Request/response logging, on when TEST_NGINX_VERBOSE is set.  Lines are
# "# "-prefixed TAP comments on the diagnostics handle (stderr), with
# unprintable bytes escaped; long messages are cut at 2048 bytes.
sub log_core {
	my ($prefix, $msg) = @_;
	($prefix, $msg) = ('', $prefix) unless defined $msg;
	$prefix .= ' ' if length $prefix;

	$msg = '' unless defined $msg;

	if (length $msg > 2048) {
		$msg = substr($msg, 0, 2048)
			. "(...logged only 2048 of " . length($msg)
			. " bytes)";
	}

	$msg =~ s/^/# $prefix/gm;
	$msg =~ s/([^\x20-\x7e])/sprintf('\\x%02x', ord($1)) . (($1 eq "\n") ? "\n" : '')/gmxe;
	$msg .= "\n" unless $msg =~ /\n\Z/;

	my $fh = Test::More->builder->failure_output;
	print $fh $msg;
}

sub log_out {
	return unless $ENV{TEST_NGINX_VERBOSE};
	log_core('>>', @_);
}

sub log_in {
	return unless $ENV{TEST_NGINX_VERBOSE};
	log_core('<<', @_);
}

###############################################################################

sub http_get($;%) {
	my ($url, %extra) = @_;
	return http(<<EOF, %extra);
GET $url HTTP/1.0
Host: localhost

EOF
}

sub http_head($;%) {
	my ($url, %extra) = @_;
	return http(<<EOF, %extra);
HEAD $url HTTP/1.0
Host: localhost

EOF
}

# http($request, %extra): sends a raw request and returns the whole
# response (read until the server closes), or undef on error or timeout.
# With start => 1, returns the socket right after sending instead (finish
# with http_end).  Other options: socket => an already connected socket,
# body => sent after the request (after sleep => seconds, if given),
# aborted => don't send the body, SSL => 1 (TLS over port(8443) unless
# PeerAddr says otherwise); everything else goes to IO::Socket::INET->new
# (e.g. PeerAddr, default 127.0.0.1:port(8080)) and IO::Socket::SSL.
sub http($;%) {
	my ($request, %extra) = @_;

	my $s = http_start($request, %extra);

	return $s if $extra{start} or !defined $s;
	return http_end($s);
}

sub http_start($;%) {
	my ($request, %extra) = @_;
	my $s;

	my $port = $extra{SSL} ? 8443 : 8080;

	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		local $SIG{PIPE} = sub { die "sigpipe\n" };
		alarm(8);

		$s = $extra{socket} || IO::Socket::INET->new(
			Proto => 'tcp',
			PeerAddr => '127.0.0.1:' . port($port),
			%extra
		)
			or die "Can't connect to nginx: $!\n";

		if ($extra{SSL}) {
			require IO::Socket::SSL;
			IO::Socket::SSL->start_SSL(
				$s,
				SSL_verify_mode =>
					IO::Socket::SSL::SSL_VERIFY_NONE(),
				%extra
			)
				or die IO::Socket::SSL->errstr() . "\n";

			log_in("ssl cipher: " . $s->get_cipher());
			log_in("ssl cert: " . ($s->peer_certificate('issuer')
				// ''));
		}

		log_out($request);
		$s->print($request);

		select undef, undef, undef, $extra{sleep} if $extra{sleep};

		if ($extra{body} && !$extra{aborted}) {
			log_out($extra{body});
			$s->print($extra{body});
		}

		alarm(0);
	};
	alarm(0);
	if ($@) {
		log_in("died: $@");
		return undef;
	}

	return $s;
}

sub http_end($;%) {
	my ($s) = @_;
	my $reply;

	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		local $SIG{PIPE} = sub { die "sigpipe\n" };
		alarm(8);

		local $/;
		$reply = $s->getline();

		$s->close();

		alarm(0);
	};
	alarm(0);
	if ($@) {
		log_in("died: $@");
		return undef;
	}

	log_in($reply);
	return $reply;
}

# The body of a response, with chunked transfer encoding undone; a missing
# last chunk is flagged by appending "[no-last-chunk]".
sub http_content {
	my ($text) = @_;

	return undef if !defined $text;

	if ($text !~ /(.*?)\x0d\x0a?\x0d\x0a?(.*)/ms) {
		return undef;
	}

	my ($headers, $body) = ($1, $2);

	if ($headers !~ /Transfer-Encoding: chunked/i) {
		return $body;
	}

	my $content = '';
	my $len = -1;

	while ($body =~ /\G\x0d?\x0a?([0-9a-f]+)\x0d\x0a?/gcmsi) {
		$len = hex($1);
		$content .= substr($body, pos($body), $len);
		pos($body) += $len;
	}

	if ($len != 0) {
		$content .= '[no-last-chunk]';
	}

	return $content;
}

sub http_gzip_request {
	my ($url) = @_;
	return http(<<EOF);
GET $url HTTP/1.1
Host: localhost
Connection: close
Accept-Encoding: gzip

EOF
}

# like() on the gunzipped body of a response (skipped without
# IO::Uncompress::Gunzip).
sub http_gzip_like {
	my ($text, $re, $name) = @_;

	SKIP: {
		eval { require IO::Uncompress::Gunzip; };
		Test::More::skip(
			"IO::Uncompress::Gunzip not installed", 1) if $@;

		my $in = http_content($text);
		my $out;

		IO::Uncompress::Gunzip::gunzip(\$in => \$out);

		Test::More->builder->like($out, $re, $name);
	}
}

###############################################################################

1;

###############################################################################
