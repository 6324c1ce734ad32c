# Other nginx releases (docs/install.md).
#
#   make test NGINX=1.31.4                    the whole suite against nginx 1.31.4,
#                                             downloaded from nginx.org
#   make test NGINX=1.30.4 NGINX_TARBALLS=DIR the same from DIR/nginx-1.30.4.tar.gz
#                                             (CI: ../shared/nginx; either layout,
#                                             ./configure or auto/configure)
#   make test NGINX=1.28.3                    the bundled nginx, as plain make test
#   make test NGINX=system                    Debian's packaged nginx (Makefile)
#   make test TEST_NGINX_LIB=DIR              any of the above with nginx's own
#                                             Test::Nginx (DIR/Test/Nginx.pm) ahead
#                                             of t/lib (CI: ../shared/nginx-tests/lib)
#   make test-too-old NGINX_TARBALLS=DIR      nginx 1.18.0 (older than the oldest
#                                             supported, 1.20.1) refused before
#                                             anything is built (~5 s)
#
# Releases before 1.21.5 are built with PCRE 1 (libpcre3-dev, installed
# for them), before 1.21.2 without -Werror for OpenSSL 3.0's deprecations.
#
# The release is built in target/nginx-X.Y.Z/ (configured as the bundled one
# is: nginx-sys's flags, --with-compat, --with-debug), once per source and
# flags; the module is built against it with cargo in
# target/nginx-versions-cargo/ (one directory for every release, so the
# dependencies compile once) and copied next to that nginx.
.PHONY: test-version nginx-tarball nginx-version-build

# The oldest nginx the module supports. Before 1.19.10 nginx has no
# keepalive_time, nor the connection start time (c->start_time) that the
# module measures it from; 1.20.1 (RHEL 9's) is the oldest release the
# suites run against. make test NGINX=X.Y.Z and make build against an older
# tree stop before building anything, the "config" file (nginx's own
# build) and build.rs refuse it too.
NGINX_OLDEST     = 1.20.1
NGINX_OLDEST_NUM = 1020001

# $(call nginx_refuse_older,VERSION,VERSION_NUM): shell code that fails
# with a message naming the oldest supported nginx if VERSION_NUM (nginx.h's
# nginx_version, 1.20.1 is 1020001) is older.
nginx_refuse_older = if [ "$(2)" -lt $(NGINX_OLDEST_NUM) ]; then \
	echo "nginx $(1) is too old: this module supports nginx $(NGINX_OLDEST) and later." >&2; \
	echo "  Before 1.19.10 nginx has no keepalive_time, nor the connection start time" >&2; \
	echo "  the module measures it from; $(NGINX_OLDEST) is the oldest release it is tested with." >&2; \
	exit 1; fi

# $(call nginx_tree_check,SOURCE_DIR): the same for the nginx source tree in
# SOURCE_DIR (its src/core/nginx.h; nothing if it has none, nginx-sys then
# says what is wrong with the directory).
nginx_tree_check = n=$$(sed -n 's/^\#define nginx_version *//p' $(1)/src/core/nginx.h 2>/dev/null); \
	v=$$(sed -n 's/^\#define NGINX_VERSION *"\(.*\)"/\1/p' $(1)/src/core/nginx.h 2>/dev/null); \
	if [ -n "$$n" ]; then $(call nginx_refuse_older,$$v,$$n); fi

# NGINX=X.Y.Z as nginx.h's nginx_version, and $(call nginx_before,NUM): "yes"
# when that release is older than NUM.
NGINX_VERSION_NUM := $(shell echo '$(NGINX)' | awk -F. 'NF == 3 { printf "%d%03d%03d", $$1, $$2, $$3 }')
nginx_before = $(if $(NGINX_VERSION_NUM),$(shell [ $(NGINX_VERSION_NUM) -lt $(1) ] && echo yes))

# Configured as nginx-sys configures the bundled nginx (its
# NGINX_CONFIGURE_BASE) plus .cargo/config.toml's --with-debug: the suites
# read the debug log, speak HTTP/2 and TLS to backends, and check stream.
NGINX_CONFIGURE = --with-compat --with-debug --with-http_realip_module \
	--with-http_ssl_module --with-http_v2_module --with-stream \
	--with-stream_realip_module --with-stream_ssl_module --with-threads

# Before 1.21.2 ("OpenSSL 3.0 compatibility") nginx calls functions that
# OpenSSL 3.0 (bookworm's) deprecates, and builds with -Werror.
NGINX_CONFIGURE += $(if $(call nginx_before,1021002),--with-cc-opt=-Wno-deprecated-declarations)

# Before 1.21.5 nginx only knows PCRE 1 (libpcre3-dev), later ones PCRE2
# (libpcre2-dev, in BUILD_PACKAGES); the rewrite module needs one of them.
VERSION_PACKAGES = $(if $(call nginx_before,1021005),libpcre3-dev)

NGINX_URL         = https://nginx.org/download/nginx-$(NGINX).tar.gz
VERSION_DIR       = $(CURDIR)/target/nginx-$(NGINX)
VERSION_SRC       = $(VERSION_DIR)/nginx
VERSION_CARGO     = $(CURDIR)/target/nginx-versions-cargo
VERSION_SO        = $(VERSION_DIR)/$(MODULE).so
# Where the tarball is read from: NGINX_TARBALLS, or a download kept here.
VERSION_TARBALL   = $(if $(NGINX_TARBALLS),$(abspath $(NGINX_TARBALLS))/nginx-$(NGINX).tar.gz,$(VERSION_DIR)/download/nginx-$(NGINX).tar.gz)

# The tarball of release $(NGINX): from NGINX_TARBALLS (checked against its
# SHA256SUMS when there is one), else from nginx.org; else a message naming
# both ways.
nginx-tarball:
	@case "$(NGINX)" in \
	[0-9]*.[0-9]*.[0-9]*) ;; \
	*) echo "NGINX=$(NGINX): expected a release number such as 1.30.4, or \"system\"" >&2; exit 2;; \
	esac
	@$(call nginx_refuse_older,$(NGINX),$(NGINX_VERSION_NUM))
ifdef NGINX_TARBALLS
	@test -f $(VERSION_TARBALL) || { \
		echo "nginx $(NGINX): no $(VERSION_TARBALL)." >&2; \
		echo "  Put nginx-$(NGINX).tar.gz in $(NGINX_TARBALLS), or leave NGINX_TARBALLS unset" >&2; \
		echo "  to download $(NGINX_URL)." >&2; exit 1; }
	@if [ -f $(dir $(VERSION_TARBALL))SHA256SUMS ] \
		&& grep -q ' nginx-$(NGINX).tar.gz$$' $(dir $(VERSION_TARBALL))SHA256SUMS; then \
		cd $(dir $(VERSION_TARBALL)) && grep ' nginx-$(NGINX).tar.gz$$' SHA256SUMS \
			| sha256sum -c --quiet - || exit 1; \
	fi
else
	@if [ ! -f $(VERSION_TARBALL) ]; then \
		mkdir -p $(dir $(VERSION_TARBALL)); \
		echo "downloading $(NGINX_URL)"; \
		if curl -fsSL --retry 2 -o $(VERSION_TARBALL).part $(NGINX_URL) \
			|| wget -q -O $(VERSION_TARBALL).part $(NGINX_URL); then \
			mv $(VERSION_TARBALL).part $(VERSION_TARBALL); \
		else \
			rm -f $(VERSION_TARBALL).part; \
			echo "nginx $(NGINX): cannot download $(NGINX_URL)." >&2; \
			echo "  Either let this machine reach nginx.org, or put nginx-$(NGINX).tar.gz" >&2; \
			echo "  (nginx.org's or the repository's layout) in a directory and run" >&2; \
			echo "  make test NGINX=$(NGINX) NGINX_TARBALLS=that/directory" >&2; \
			exit 1; \
		fi; \
	fi
endif

# $(call nginx_extract,DEST): a fresh tree of the tarball in DEST, whichever
# top directory and layout it has.
nginx_extract = rm -rf $(1) && mkdir -p $(1) && tar -xzf $(VERSION_TARBALL) -C $(1) --strip-components=1

# nginx.org's tarballs have ./configure, the repository's auto/configure.
nginx_configure = if [ -x ./configure ]; then ./configure $(1); else ./auto/configure $(1); fi

# nginx itself, rebuilt only when the tarball or the flags change.
nginx-version-build: nginx-tarball
	@sh .ci/packages $(VERSION_PACKAGES)
	set -e; \
	stamp="$(NGINX_CONFIGURE) $$(cksum < $(VERSION_TARBALL))"; \
	if [ ! -x $(VERSION_SRC)/objs/nginx ] \
		|| [ "$$(cat $(VERSION_DIR)/nginx.stamp 2>/dev/null)" != "$$stamp" ]; then \
		rm -f $(VERSION_DIR)/nginx.stamp; \
		$(call nginx_extract,$(VERSION_SRC)); \
		cd $(VERSION_SRC); \
		echo "nginx $(NGINX): configure, make (log in $(VERSION_SRC))"; \
		$(call nginx_configure,$(NGINX_CONFIGURE)) > configure.log 2>&1 \
			|| { tail -n 30 configure.log; exit 1; }; \
		$(MAKE) -j2 > make.log 2>&1 || { tail -n 30 make.log; exit 1; }; \
		echo "$$stamp" > $(VERSION_DIR)/nginx.stamp; \
	fi
	$(call module_for,$(VERSION_SRC),$(VERSION_CARGO))
	cp -f $(VERSION_CARGO)/release/lib$(MODULE).so $(VERSION_SO)
	@$(VERSION_SRC)/objs/nginx -v

test-version: deps nginx-version-build
	TEST_NGINX_BINARY=$(VERSION_SRC)/objs/nginx \
	TEST_NGINX_GLOBALS="load_module $(VERSION_SO); $(ROOT_GLOBALS) $(TEST_NGINX_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
	prove -j$(PROVE_JOBS) t/

# make test-too-old NGINX_TARBALLS=DIR [NGINX_TOO_OLD=1.18.0]: an nginx older
# than NGINX_OLDEST is refused by each way of building the module, with the
# message naming the oldest supported nginx, before anything is configured
# or compiled: make test NGINX=..., make build against its source tree,
# and nginx's own configure --add-dynamic-module (the "config" file).
NGINX_TOO_OLD ?= 1.18.0
TOO_OLD_DIR    = $(CURDIR)/target/nginx-too-old
.PHONY: test-too-old

test-too-old:
	@test -n "$(NGINX_TARBALLS)" || { echo "make test-too-old: NGINX_TARBALLS=DIR, with" \
		"nginx-$(NGINX_TOO_OLD).tar.gz in it" >&2; exit 2; }
	@set -e; d=$(TOO_OLD_DIR); src=$$d/nginx; \
	rm -rf $$d $(CURDIR)/target/nginx-$(NGINX_TOO_OLD); mkdir -p $$src; \
	tar -xzf $(abspath $(NGINX_TARBALLS))/nginx-$(NGINX_TOO_OLD).tar.gz -C $$src --strip-components=1; \
	refused() { \
		what=$$1; built=$$2; shift 2; start=$$(date +%s); \
		if "$$@" > $$d/out 2>&1; then cat $$d/out; echo "FAIL $$what: not refused" >&2; exit 1; fi; \
		if ! grep -q "supports nginx $(NGINX_OLDEST) and later" $$d/out; then \
			cat $$d/out; echo "FAIL $$what: no message naming nginx $(NGINX_OLDEST)" >&2; exit 1; fi; \
		if grep -q "$$built" $$d/out; then \
			cat $$d/out; echo "FAIL $$what: refused only after building" >&2; exit 1; fi; \
		echo "ok $$what: refused after $$(( $$(date +%s) - start )) s"; \
	}; \
	refused "make test NGINX=$(NGINX_TOO_OLD)" 'Compiling\|^checking for\|^cc ' \
		$(MAKE) --no-print-directory test NGINX=$(NGINX_TOO_OLD) NGINX_TARBALLS=$(NGINX_TARBALLS); \
	test ! -e $(CURDIR)/target/nginx-$(NGINX_TOO_OLD) \
		|| { echo "FAIL make test NGINX=$(NGINX_TOO_OLD): target/nginx-$(NGINX_TOO_OLD) created" >&2; exit 1; }; \
	refused "make build NGINX_SOURCE_DIR=<nginx $(NGINX_TOO_OLD)>" 'Compiling\|^cc ' \
		$(MAKE) --no-print-directory build NGINX_SOURCE_DIR=$$src NGINX_BUILD_DIR=$$src/objs; \
	refused "configure --add-dynamic-module (nginx $(NGINX_TOO_OLD))" 'Compiling\|^cc ' \
		sh -c "cd $$src && ./auto/configure --with-compat --add-dynamic-module=$(CURDIR)"; \
	test ! -e $$src/objs/Makefile \
		|| { echo "FAIL configure: objs/Makefile written" >&2; exit 1; }; \
	rm -rf $$d
