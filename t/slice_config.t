#!/usr/bin/perl

# Tests for upstream keepalive: configuration of the slice_* parameters,
# bad values rejected by "nginx -t" with an [emerg] naming them, and the
# valid forms (the fork's examples, any order, with local) accepted.

###############################################################################

use warnings;
use strict;

use Test::More;

use FindBin;
BEGIN { push @INC, "$FindBin::Bin/lib"; }   # ours unless PERL5LIB names nginx's own library

use Test::Nginx;
use Test::Nginx::Keepalive qw/ nginx_test_config slice_module /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'module not loaded')
	unless slice_module();

my $t = Test::Nginx->new()->has(qw/http proxy map upstream_keepalive/);

my $conf = <<'EOF';

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    map $host $conn {
        default  2;
    }

    upstream u {
        server 127.0.0.1:8081;
        %%KEEPALIVE%%
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

my $n = 0;

# Writes a config with the given keepalive line, runs "nginx -t" on it and
# returns its exit status and everything it printed, followed by what it
# logged (each check has its own error log).
sub check {
	my ($t, $keepalive) = @_;

	(my $c = $conf) =~ s/%%KEEPALIVE%%/$keepalive/;
	my $name = 'check' . ++$n;

	my ($rc, $out) = nginx_test_config($t, "$name.conf", $c, "$name.log");
	$out .= eval { $t->read_file("$name.log") } // '';

	return ($rc, $out);
}

my @bad = (
	# limits and key go together

	[ 'keepalive 8 slice_key=$host;',
		qr/"slice_key" requires "slice_conn" or "slice_dyn" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_conn=1;',
		qr/"slice_conn" requires "slice_key" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_dyn=$conn;',
		qr/"slice_dyn" requires "slice_key" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_poolsize=3;',
		qr/"slice_poolsize" requires "slice_key" in "keepalive" directive/ ],
	[ 'keepalive 8 local slice_keylen=4;',
		qr/"slice_keylen" requires "slice_key" in "keepalive" directive/ ],

	# numbers

	[ 'keepalive 8 slice_key=$host slice_conn=abc;',
		qr/invalid value "abc" of "slice_conn" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=-1;',
		qr/invalid value "-1" of "slice_conn" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=;',
		qr/invalid value "" of "slice_conn" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_poolsize=ten;',
		qr/invalid value "ten" of "slice_poolsize" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_poolsize=-5;',
		qr/invalid value "-5" of "slice_poolsize" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_keylen=4k;',
		qr/invalid value "4k" of "slice_keylen" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_keylen=-4;',
		qr/invalid value "-4" of "slice_keylen" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_keylen=0;',
		qr/invalid value "slice_keylen=0" in "keepalive" directive, must be at least 1/ ],

	# absurd sizes are refused, naming the limit, before any memory is
	# allocated for them

	[ 'keepalive 100000000;',
		qr/invalid value "100000000" in "keepalive" directive, the maximum is 65536/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=65537;',
		qr/invalid value "65537" of "slice_conn" in "keepalive" directive, the maximum is 65536/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_poolsize=65537;',
		qr/invalid value "65537" of "slice_poolsize" in "keepalive" directive, the maximum is 65536/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_keylen=1048576;',
		qr/invalid value "1048576" of "slice_keylen" in "keepalive" directive, the maximum is 1024/ ],

	# slice_dyn takes a variable, and it must exist

	[ 'keepalive 8 slice_key=$host slice_dyn=conn;',
		qr/invalid value "slice_dyn=conn" in "keepalive" directive, must be a variable/ ],
	[ 'keepalive 8 slice_key=$host slice_dyn=$nonexistent_variable_xyz;',
		qr/unknown "nonexistent_variable_xyz" variable/ ],

	# the key

	[ 'keepalive 8 slice_key= slice_conn=1;',
		qr/empty "slice_key" value in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=${host slice_conn=1;',
		qr/the closing bracket in "host" variable is missing/ ],

	# duplicates and unknown parameters

	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_conn=2;',
		qr/duplicate parameter "slice_conn" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_key=$uri;',
		qr/duplicate parameter "slice_key" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_dyn=$conn slice_dyn=$conn;',
		qr/duplicate parameter "slice_dyn" in "keepalive" directive/ ],
	[ 'keepalive 8 local slice_key=$host slice_conn=1 local;',
		qr/duplicate parameter "local" in "keepalive" directive/ ],
	[ 'keepalive 8 slice_key=$host slice_conn=1 slice_foo=1;',
		qr/invalid parameter "slice_foo=1" in "keepalive" directive/ ],
);

my @good = (
	# the fork's examples, verbatim

	'keepalive 30 slice_key=$host slice_conn=2;',
	'keepalive 30 slice_key=$host slice_dyn=$conn;',

	# any order, with local, keys with text

	'keepalive 4 slice_keylen=8 local slice_poolsize=3 slice_conn=0 '
		. 'slice_key=$host:x;',
	'keepalive 16 local slice_key=$server_name:$server_port '
		. 'slice_dyn=$conn slice_conn=5 slice_poolsize=1 slice_keylen=1;',
	'keepalive 8 slice_conn=1 slice_key=fixed;',

	# the largest sizes allowed
	'keepalive 65536 slice_key=$host slice_conn=65536 '
		. 'slice_poolsize=65536 slice_keylen=1024;',
);

$t->plan(2 * @bad + @good);

###############################################################################

for my $case (@bad) {
	my ($line, $re) = @$case;
	my ($rc, $out) = check($t, $line);

	isnt($rc, 0, "fails: $line");
	like($out, qr/\[emerg\].*$re/, "emerg: $line");
}

for my $line (@good) {
	my ($rc, $out) = check($t, $line);
	like("$rc $out", qr/^0 .*test is successful/s, "valid: $line");
}

###############################################################################
