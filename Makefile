# nginx-keepalive-slice
#
#   make build   objs/nginx (the vendored nginx 1.28.3, --with-compat --with-debug)
#                and objs/ngx_http_upstream_keepalive_slice_module.so built against it
#   make test    unit tests of the core crate, then the Test::Nginx suites in t/
#                against objs/
#   make unit    the core crate's unit tests alone (no nginx, no libclang)
#   make check   rustfmt --check of every .rs file in the repository and
#                cargo clippy -D warnings on the workspace
#   make demo    real Apache mpm-itk behind stock-style and sliced keepalive
#   make bench   wrk throughput, stock keepalive vs. this module
#   make test-without-stock   the suites against nginx built without the stock module
#   make test-without-ssl     the suites against nginx built without TLS
#   make test-debian          the suites against Debian's packaged nginx (1.22.1 on bookworm)
#                             (also: make test NGINX=system)
#   make test-nginx-build     nginx's own build system: --add-dynamic-module and
#                             --add-module builds of the vendored source, smoke-tested
#   make test NGINX=1.31.4 [NGINX_TARBALLS=DIR]
#                             the suites against another nginx release (mk/versions.mk),
#                             1.20.1 or later: older ones are refused at once
#   make test TEST_NGINX_LIB=DIR   the suites under nginx's own Test::Nginx library
#   make test-backends        real Apache and Node behind nginx, their Keep-Alive
#                             headers honoured (mk/backends.mk, ~1 min)
#
# Your own nginx instead of the vendored one (configured --with-compat):
#   make build NGINX_SOURCE_DIR=/path/to/nginx NGINX_BUILD_DIR=/path/to/nginx/objs

MODULE      = ngx_http_upstream_keepalive_slice_module

# NGINX=... (system, 1.31.4) chooses the nginx to test; it must not reach
# nginx's environment, where NGINX lists the sockets inherited across a
# binary upgrade ("invalid socket number" otherwise).
unexport NGINX
CARGO      ?= cargo
PROVE_JOBS ?= 2

# Debian packages the build and the tests need (bindgen needs libclang).
BUILD_PACKAGES = make gcc libc6-dev libclang-dev libpcre2-dev libssl-dev zlib1g-dev
TEST_PACKAGES  = perl libio-socket-ssl-perl memcached openssl python3-prometheus-client
DEMO_PACKAGES  = apache2 libapache2-mpm-itk curl
BENCH_PACKAGES = wrk

ifdef NGINX_BUILD_DIR
CARGO_FLAGS = --release --no-default-features --features export-modules
NGINX_BINARY_SRC = $(NGINX_BUILD_DIR)/nginx
export NGINX_BUILD_DIR
ifdef NGINX_SOURCE_DIR
export NGINX_SOURCE_DIR
endif
else
CARGO_FLAGS = --release
# nginx-sys builds the vendored nginx in its build-script output directory;
# the newest one is the one this build linked against.
NGINX_BINARY_SRC = $$(ls -t target/release/build/nginx-sys-*/out/objs/nginx | head -n 1)
endif

# Workers run as nobody by default and could not read the test directory.
ifeq ($(shell id -u),0)
ROOT_GLOBALS = user root;
endif
TEST_GLOBALS = load_module $(CURDIR)/objs/$(MODULE).so; $(ROOT_GLOBALS)

.PHONY: all build test unit prove check demo bench deps deps-demo deps-bench clean \
	test-without-stock test-without-ssl test-debian debian-module test-nginx-build

all: build

deps:
	@sh .ci/packages $(BUILD_PACKAGES) $(TEST_PACKAGES)

deps-demo:
	@sh .ci/packages $(DEMO_PACKAGES)

deps-bench:
	@sh .ci/packages $(BENCH_PACKAGES)

build:
ifdef NGINX_BUILD_DIR
	@$(call nginx_tree_check,$(or $(NGINX_SOURCE_DIR),$(NGINX_BUILD_DIR)/..))
endif
	$(CARGO) build $(CARGO_FLAGS)
	mkdir -p objs
	# cp then mv: a running nginx that mapped the old files keeps them
	# (cp alone would rewrite them in place under it).
	cp -f $(NGINX_BINARY_SRC) objs/nginx.tmp && mv -f objs/nginx.tmp objs/nginx
	cp -f target/release/lib$(MODULE).so objs/$(MODULE).so.tmp \
		&& mv -f objs/$(MODULE).so.tmp objs/$(MODULE).so
	@objs/nginx -V 2>&1 | head -n 1

# The pure core alone: its tests build neither nginx nor bindgen.
unit:
	$(CARGO) test --release -p keepalive-slice-core

# The Test::Nginx the suites use: ours (t/lib), or with TEST_NGINX_LIB=DIR
# nginx's own library from DIR ahead of it (t/lib/Test/Nginx/*.pm, this
# project's helpers, still come from t/lib).
TEST_PERL5LIB = $(if $(TEST_NGINX_LIB),$(abspath $(TEST_NGINX_LIB)):)$(CURDIR)/t/lib$${PERL5LIB:+:$$PERL5LIB}

prove:
	TEST_NGINX_BINARY=$(CURDIR)/objs/nginx \
	TEST_NGINX_GLOBALS="$(TEST_GLOBALS) $(TEST_NGINX_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
	prove -j$(PROVE_JOBS) t/

# The nginx release bundled with the nginx-src crate (its version is
# "<crate>+<nginx>"), and NGINX_RELEASE: the release NGINX=X.Y.Z names when
# it is another one (empty for the bundled one, for "system" and unset).
NGINX_BUNDLED_VERSION = $(shell sed -n '/^name = "nginx-src"$$/{n;s/^version = ".*+\(.*\)"$$/\1/p}' Cargo.lock)
NGINX_RELEASE = $(if $(filter-out system,$(NGINX)),$(filter-out $(NGINX_BUNDLED_VERSION),$(NGINX)))

# make test NGINX=system: the same, against the nginx installed by the
# system's packages (Debian's) instead of the vendored one; NGINX=X.Y.Z:
# against that nginx release (mk/versions.mk); NGINX=<the bundled version>
# is plain make test.
ifeq ($(NGINX),system)
test: deps unit test-debian
else ifneq ($(NGINX_RELEASE),)
test: nginx-tarball deps unit test-version
else
test: deps build unit prove
endif

# The nginx source tree bundled with the nginx-src crate (what objs/nginx is
# built from), for the targets that configure nginx themselves.
NGINX_VENDORED_SRC = $(shell $(CARGO) metadata --format-version 1 | perl -MJSON::PP -0777 -ne \
	'for (@{decode_json($$_)->{packages}}) { print "$$1/nginx" \
	if $$_->{name} eq "nginx-src" && $$_->{manifest_path} =~ m{(.*)/Cargo.toml$$} }')

# $(call module_for,NGINX_TREE,CARGO_TARGET_DIR): the cargo command that
# builds the module against a configured nginx tree other than the vendored
# one (environment variables or flags may precede or follow it).
module_for = NGINX_SOURCE_DIR=$(1) NGINX_BUILD_DIR=$(1)/objs CARGO_TARGET_DIR=$(2) \
	$(CARGO) build --release --no-default-features --features export-modules

# $(call test_built,DIR,CONFIGURE): every suite against the vendored nginx
# configured with CONFIGURE in DIR (built once), with the module built
# against that nginx.
test_built = set -e; \
	if [ ! -x $(1)/objs/nginx ]; then \
		rm -rf $(1); cp -r $(NGINX_VENDORED_SRC) $(1); \
		cd $(1) && ./auto/configure $(2) > configure.log \
		&& $(MAKE) -j2 > make.log; cd $(CURDIR); \
	fi; \
	$(call module_for,$(1),$(1)/cargo); \
	TEST_NGINX_BINARY=$(1)/objs/nginx \
	TEST_NGINX_GLOBALS="load_module $(1)/cargo/release/lib$(MODULE).so; $(ROOT_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
	prove -j$(PROVE_JOBS) t/

# The same suites against an nginx built --without-http_upstream_keepalive_module:
# the module must not depend on the stock one being there.
WITHOUT_DIR = $(CURDIR)/target/nginx-without-stock
WITHOUT_CONFIGURE = --with-compat --with-debug --with-http_ssl_module \
	--with-http_v2_module --with-threads --without-http_upstream_keepalive_module

test-without-stock: deps
	$(call test_built,$(WITHOUT_DIR),$(WITHOUT_CONFIGURE))

# And against an nginx without TLS, as nginx's configure builds it unless
# told --with-http_ssl_module: the module compiles without its TLS code
# (the session hooks, the TLS identity), and the suites that need TLS
# say they are skipped.
WITHOUT_SSL_DIR = $(CURDIR)/target/nginx-without-ssl
WITHOUT_SSL_CONFIGURE = --with-compat --with-debug --with-http_v2_module --with-threads

test-without-ssl: deps
	$(call test_built,$(WITHOUT_SSL_DIR),$(WITHOUT_SSL_CONFIGURE))

# The nginx people already run: Debian's packaged nginx (/usr/sbin/nginx),
# with the module built against Debian's nginx-dev tree configured with the
# package's own flags. Test::Nginx loads the package's dynamic modules from
# TEST_NGINX_MODULES, as nginx's own test library does.
DEBIAN_PACKAGES = nginx-core nginx-dev libnginx-mod-http-perl
DEBIAN_DIR = $(CURDIR)/target/nginx-debian

DEBIAN_SO  = $(DEBIAN_DIR)/$(MODULE).so

# The module for Debian's nginx, which test-debian runs and make deb
# packages: a copy of nginx-dev's tree configured with its conf_flags
# (configured again only when nginx-dev's version changes), the module
# built against it, $(DEBIAN_SO).
debian-module: deps
	@sh .ci/packages $(DEBIAN_PACKAGES)
	set -e; stamp="$$(dpkg-query -W -f='$${Version}' nginx-dev)"; \
	if [ ! -f $(DEBIAN_DIR)/src/objs/ngx_auto_config.h ] \
		|| [ "$$(cat $(DEBIAN_DIR)/src.stamp 2>/dev/null)" != "$$stamp" ]; then \
		rm -rf $(DEBIAN_DIR)/src $(DEBIAN_DIR)/src.stamp; mkdir -p $(DEBIAN_DIR); \
		cp -r /usr/share/nginx/src $(DEBIAN_DIR)/src; \
		cd $(DEBIAN_DIR)/src; \
		bash -c '. ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}"' > configure.log; \
		echo "$$stamp" > $(DEBIAN_DIR)/src.stamp; \
	fi
	$(call module_for,$(DEBIAN_DIR)/src,$(DEBIAN_DIR)/cargo)
	cp -f $(DEBIAN_DIR)/cargo/release/lib$(MODULE).so $(DEBIAN_SO)

test-debian: debian-module
	TEST_NGINX_BINARY=/usr/sbin/nginx \
	TEST_NGINX_MODULES=/usr/lib/nginx/modules \
	TEST_NGINX_GLOBALS="load_module $(DEBIAN_SO); $(ROOT_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
	prove -j$(PROVE_JOBS) t/

# nginx's own build system (the "config" file): a copy of the vendored
# source configured once with --add-dynamic-module and once with
# --add-module, each built by nginx's make (which runs cargo), then a smoke
# subset of the suites against each. The statically linked module must own
# "keepalive" ahead of the stock module it is linked beside.
ADDON_DIR    = $(CURDIR)/target/nginx-build
ADDON_SMOKE  = t/keepalive.t t/keepalive_config.t t/slice.t t/slice_config.t t/module_version.t
ADDON_CONFIGURE = --with-debug --with-http_ssl_module --with-http_v2_module

test-nginx-build: deps
	set -e; \
	for kind in dynamic static; do \
		rm -rf $(ADDON_DIR)/$$kind; mkdir -p $(ADDON_DIR); \
		cp -r $(NGINX_VENDORED_SRC) $(ADDON_DIR)/$$kind; \
	done
	cd $(ADDON_DIR)/dynamic && ./auto/configure $(ADDON_CONFIGURE) --with-compat \
		--add-dynamic-module=$(CURDIR) > configure.log && $(MAKE) -j2 > make.log 2>&1
	cd $(ADDON_DIR)/static && ./auto/configure $(ADDON_CONFIGURE) \
		--add-module=$(CURDIR) > configure.log && $(MAKE) -j2 > make.log 2>&1
	test -f $(ADDON_DIR)/dynamic/objs/$(MODULE).so
	grep -q '&$(MODULE),' $(ADDON_DIR)/static/objs/ngx_modules.c
	perl -0777 -ne 'exit !(/&$(MODULE),.*&ngx_http_upstream_keepalive_module,/s)' \
		$(ADDON_DIR)/static/objs/ngx_modules.c
	TEST_NGINX_BINARY=$(ADDON_DIR)/dynamic/objs/nginx \
	TEST_NGINX_GLOBALS="load_module $(ADDON_DIR)/dynamic/objs/$(MODULE).so; $(ROOT_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) prove -j$(PROVE_JOBS) $(ADDON_SMOKE)
	TEST_NGINX_BINARY=$(ADDON_DIR)/static/objs/nginx \
	TEST_NGINX_GLOBALS="$(ROOT_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) prove -j$(PROVE_JOBS) $(ADDON_SMOKE)

# Every .rs file git knows (or would add), not only those cargo reaches
# through a crate's module tree: a file rustfmt cannot see through cargo
# fails here too.
RUST_FILES = $(shell git ls-files --cached --others --exclude-standard '*.rs')

check:
	$(CARGO) fmt --all --check
	rustfmt --check --config-path rustfmt.toml $(RUST_FILES)
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

demo: deps deps-demo build
	perl demo/demo.pl

# Further targets, one file per concern (bench, memory checking, ...).
-include mk/*.mk

clean:
	$(CARGO) clean
	rm -rf objs
