package Demo::Processes;

# What demo/demo.pl (make demo) and bench/bench.pl (make bench) share: they
# start servers from objs/ in a scratch directory, wait for them, and must
# stop every process they started, and only those, however they end
# (normal exit, die, Ctrl-C).  Both scripts had their own copies of this;
# it is kept here once so that the two cannot drift apart.
#
# The scripts load it with
#
#   use FindBin;
#   use lib "$FindBin::Bin/../demo/lib";
#   use Demo::Processes qw/ ... /;
#
# and make SIGINT and SIGTERM die(), so that the END block below runs:
#
#   $SIG{INT} = $SIG{TERM} = sub { die "interrupted\n" };

use v5.36;
use strict;
use warnings;

use Exporter qw(import);

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(remove_tree);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(
	objs copies_in find_program scratch_dir
	spawn track untrack wait_port stop
	free_ports write_file
	run_nginx counting_backend_conf
);

my $MODULE = 'ngx_http_upstream_keepalive_slice_module';
my $ROOT   = abs_path(dirname(__FILE__) . '/../../..');    # the repository

# Loaded by the script's main process, before it forks anything: the END
# block below is for that process only (forked children leave with
# POSIX::_exit or exec).
my $MAIN_PID = $$;

my %children;    # pid => name, of the processes we started (and only those)
my ($tmp, $keep_var);

END {
	# local $? keeps the exit status the script chose.
	local $?;
	cleanup() if $$ == $MAIN_PID;
}

###############################################################################
# Where things are.

# objs/nginx and the module built by make build, or die.
sub objs () {
	my $nginx = "$ROOT/objs/nginx";
	my $so    = "$ROOT/objs/$MODULE.so";
	-x $nginx && -f $so
		or die "objs/nginx or objs/$MODULE.so missing: run make build\n";
	return ($nginx, $so);
}

# Copies of @files in $dir, in the same order.  A long run (bench,
# profile) uses copies, so that a `make build` meanwhile cannot change the
# binary or the module under its running nginx.
sub copies_in ($dir, @files) {
	my @copies;
	for my $f (@files) {
		(my $copy = $f) =~ s{.*/}{$dir/};
		system('cp', $f, $copy) == 0 or die "cp $f: $!\n";
		push @copies, $copy;
	}
	return @copies;
}

# The first executable $name in $PATH or, after those, in @more_dirs.
sub find_program ($name, @more_dirs) {
	return (grep { -x } map { "$_/$name" } split(/:/, $ENV{PATH}),
		@more_dirs)[0];
}

# A new temporary directory, removed at the end unless the environment
# variable $keep says otherwise (then its path is printed).
sub scratch_dir ($name, $keep) {
	$keep_var = $keep;
	$tmp = tempdir("$name-XXXXXX", DIR => '/tmp');
	return $tmp;
}

###############################################################################
# Processes.

# Starts @cmd with its output appended to $log; returns the pid.
sub spawn ($name, $log, @cmd) {
	my $pid = fork() // die "fork: $!\n";
	if ($pid == 0) {
		$SIG{INT} = $SIG{TERM} = 'DEFAULT';
		# A process group of its own: Apache's prefork sends SIGTERM to its
		# whole process group when it stops, which would otherwise be ours;
		# and Ctrl-C then reaches only the script, which stops the servers.
		POSIX::setpgid(0, 0);
		open STDIN, '<', '/dev/null';
		open STDOUT, '>>', $log;
		open STDERR, '>&', \*STDOUT;
		exec { $cmd[0] } @cmd or print STDERR "exec $cmd[0]: $!\n";
		POSIX::_exit(127);
	}
	$children{$pid} = $name;
	return $pid;
}

# For a process the script forked itself: stopped too if the script ends
# before it does.  untrack() once the script has reaped it.
sub track ($pid, $name) {
	$children{$pid} = $name;
}

sub untrack ($pid) {
	delete $children{$pid};
}

# Waits until something listens on $port; dies, with the end of @logs,
# when one of our processes exits meanwhile or after 10 seconds.
sub wait_port ($port, $name, @logs) {
	for (1 .. 100) {
		my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port",
			Timeout => 1);
		if ($s) {
			close $s;
			return;
		}
		for my $pid (keys %children) {
			next unless waitpid($pid, POSIX::WNOHANG()) == $pid;
			my $who = delete $children{$pid};
			die "$who exited during startup:\n" . join '', map { tail($_) } @logs;
		}
		sleep 0.1;
	}
	die "$name does not listen on port $port:\n" . join '', map { tail($_) } @logs;
}

# Graceful stop (QUIT) of one process we started; KILL after 10 seconds.
sub stop ($pid, $sig = 'QUIT') {
	return unless delete $children{$pid};
	kill $sig, $pid;
	my $deadline = time + 10;
	while (waitpid($pid, POSIX::WNOHANG()) == 0) {
		if (time > $deadline) {
			kill 'KILL', $pid;
			waitpid($pid, 0);
			last;
		}
		sleep 0.05;
	}
}

# At the end: stops what is still running, removes the scratch directory.
sub cleanup {
	# A second Ctrl-C must not leave servers behind half-way.
	local $SIG{INT} = local $SIG{TERM} = 'IGNORE';

	# Only the processes we started, by pid.  nginx and Apache stop their
	# own workers and children on TERM.
	kill 'TERM', keys %children if %children;
	my $deadline = time + 10;
	while (%children && time < $deadline) {
		for my $pid (keys %children) {
			delete $children{$pid} if waitpid($pid, POSIX::WNOHANG()) != 0;
		}
		sleep 0.1 if %children;
	}
	if (%children) {
		kill 'KILL', keys %children;
		waitpid($_, 0) for keys %children;
		%children = ();
	}

	return unless defined $tmp && -d $tmp;
	if ($ENV{$keep_var}) {
		print "kept: $tmp\n";
	} else {
		remove_tree($tmp);
	}
}

###############################################################################
# Ports and files.

# The kernel hands out free ports for port 0; all are held until the last
# is chosen so that none is handed out twice.  The short window until the
# servers bind them is acceptable here.
sub free_ports ($n) {
	my @s = map {
		IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
			Listen => 1, ReuseAddr => 1) or die "bind: $!\n"
	} 1 .. $n;
	return map { $_->sockport } @s;
}

sub write_file ($file, $content) {
	open my $fh, '>', $file or die "open $file: $!\n";
	print $fh $content;
	close $fh or die "close $file: $!\n";
}

# run_nginx($nginx, $prefix, $port, $conf, @wrap): $nginx with $conf (in
# the foreground, its pid file added) under the prefix $prefix, which is
# made with its logs/; the soft limit on open files raised to the hard one
# (the benchmarks hold thousands of connections, 1024 is common); @wrap
# runs it (taskset, say).  Its pid, once it accepts on $port (it binds
# every port at once).
sub run_nginx ($nginx, $prefix, $port, $conf, @wrap) {
	mkdir $prefix or die "mkdir $prefix: $!\n";
	mkdir "$prefix/logs" or die "mkdir $prefix/logs: $!\n";
	write_file("$prefix/nginx.conf",
		"daemon off;\npid $prefix/logs/nginx.pid;\n$conf");
	my $name = 'nginx ' . (split m{/}, $prefix)[-1];
	my $pid = spawn($name, "$prefix/logs/stderr.log",
		@wrap, '/bin/sh', '-c', 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"', 'sh',
		$nginx, '-p', "$prefix/", '-c', "$prefix/nginx.conf");
	wait_port($port, $name, "$prefix/logs/stderr.log", "$prefix/logs/error.log");
	return $pid;
}

# counting_backend_conf(%o): the nginx.conf of a benchmark's backend, one
# worker answering 200 "ok" on every port of $o{ports}.  It logs only the
# first request of each connection ($o{log}: its fields), so that
# $o{prefix}/logs/connections.log has a line per upstream connection
# opened; its own keepalive limits are raised so that it never closes
# first.  $o{user}: a user line (as root), $o{connections}: its
# worker_connections.
sub counting_backend_conf (%o) {
	my $listen = join '', map { "        listen 127.0.0.1:$_;\n" } @{ $o{ports} };
	return <<"EOF";
$o{user}
worker_processes 1;
error_log $o{prefix}/logs/error.log warn;

events {
    worker_connections $o{connections};
}

http {
    map \$connection_requests \$first_request {
        1        1;
        default  0;
    }
    log_format conn '$o{log}';
    access_log $o{prefix}/logs/connections.log conn if=\$first_request;
    keepalive_requests 10000000;
    keepalive_timeout 600s;

    server {
$listen
        location / {
            return 200 "ok\\n";
        }
    }
}
EOF
}

# The last 20 lines of $file, under its name, for error messages.
sub tail ($file) {
	open my $fh, '<', $file or return '';
	my @lines = <$fh>;
	splice @lines, 0, @lines - 20 if @lines > 20;
	return join '', "--- $file\n", @lines;
}

1;
