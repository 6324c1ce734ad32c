# Memory checking: the whole t/ suite under AddressSanitizer
# (docs/testing.md).
#
#   make test-asan     builds target/nginx-asan: the vendored nginx 1.28.3
#                      compiled by clang with -fsanitize=address and
#                      NGX_DEBUG_PALLOC (every pool allocation a malloc of
#                      its own, so ASan sees its bounds), patched with
#                      nginx-patches/*.patch if any; the module built against
#                      it with rustc's -Zsanitizer=address (its own loads and
#                      stores checked; its heap is libc malloc, intercepted
#                      anyway); then prove t/ against them. Fails on any
#                      failed test and on any sanitizer report, wherever it
#                      went (see t/memcheck/scan). Rebuilds nginx only when
#                      the flags or the patches change (~35-60 s on 2 cores),
#                      the module with cargo (~25-60 s); the suite ~30 s.
#                      MEMCHECK_TESTS="t/a.t t/b.t" runs a subset.
#   make test-asan NGINX=1.31.4 [NGINX_TARBALLS=DIR]
#                      the same with another nginx release (its tarball as
#                      for make test NGINX=..., mk/versions.mk), built in
#                      target/nginx-asan-1.31.4
#   make memcheck-build   only the two builds
#
# Knobs: MEMCHECK_RUST_ASAN=0 builds the module without instrumentation
# (for a toolchain whose rustc lacks the sanitizer runtime); ASAN_OPTIONS
# from the environment are appended to MEMCHECK_ASAN_OPTIONS.
.PHONY: test-asan memcheck-build

MEMCHECK_DIR       = $(CURDIR)/target/nginx-asan$(if $(NGINX_RELEASE),-$(NGINX_RELEASE))
MEMCHECK_PACKAGES  = clang libclang-rt-dev patch
MEMCHECK_CC_OPT    = -fsanitize=address -fno-omit-frame-pointer -g -O1 -DNGX_DEBUG_PALLOC=1
MEMCHECK_CONFIGURE = --with-cc=clang --with-cc-opt='$(MEMCHECK_CC_OPT)' \
	--with-ld-opt=-fsanitize=address --with-compat --with-debug \
	--with-http_ssl_module --with-http_v2_module --with-threads
MEMCHECK_RUST_ASAN ?= 1
MEMCHECK_TARGET    = $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')

# halt_on_error (the default) ends the process at its first report, which
# is written to stderr: nginx has dup2()ed its error log there, so the
# report lands in error.log, where Test::Nginx's "no sanitizer errors"
# check and t/memcheck/scan find it. Leaks are checked at every exit, less
# nginx's own by-design ones (t/memcheck/lsan.supp). The quarantine of
# freed memory is 16 MB rather than 256: the memory freed by the last few
# hundred requests (use-after-free stays detected), small enough that
# t/fault_keys.t's "worker RSS flat after warm-up" (11,000 requests, ~26 KB
# freed each under NGX_DEBUG_PALLOC) sees a flat RSS and not the
# quarantine filling up.
MEMCHECK_ASAN_OPTIONS = detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:quarantine_size_mb=16
MEMCHECK_LSAN_OPTIONS = suppressions=$(CURDIR)/t/memcheck/lsan.supp:print_suppressions=0

ifeq ($(MEMCHECK_RUST_ASAN),1)
MEMCHECK_SO  = $(MEMCHECK_DIR)/cargo/$(MEMCHECK_TARGET)/release/lib$(MODULE).so
# -Zsanitizer is unstable: RUSTC_BOOTSTRAP lets the stable rustc use it.
# An explicit --target keeps the flag off build scripts and proc macros.
MEMCHECK_CARGO_ENV  = RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address"
MEMCHECK_CARGO_ARGS = --target $(MEMCHECK_TARGET)
else
MEMCHECK_SO  = $(MEMCHECK_DIR)/cargo/release/lib$(MODULE).so
endif

# The nginx source: the bundled tree, or with NGINX=X.Y.Z that release's
# tarball (nginx-tarball in mk/versions.mk fetches or finds it).
ifneq ($(NGINX_RELEASE),)
MEMCHECK_SOURCE_DEP = nginx-tarball
MEMCHECK_SOURCE_ID  = $$(cksum < $(VERSION_TARBALL))
MEMCHECK_COPY       = $(call nginx_extract,$(MEMCHECK_DIR)/nginx)
else
MEMCHECK_SOURCE_ID  = $(NGINX_VENDORED_SRC)
MEMCHECK_COPY       = cp -r $(NGINX_VENDORED_SRC) $(MEMCHECK_DIR)/nginx
endif

memcheck-build: deps $(MEMCHECK_SOURCE_DEP)
	@sh .ci/packages $(MEMCHECK_PACKAGES)
	set -e; \
	stamp="$(MEMCHECK_CONFIGURE) $(MEMCHECK_SOURCE_ID) $$(cat nginx-patches/*.patch 2>/dev/null | cksum)"; \
	if [ ! -x $(MEMCHECK_DIR)/nginx/objs/nginx ] \
		|| [ "$$(cat $(MEMCHECK_DIR)/nginx.stamp 2>/dev/null)" != "$$stamp" ]; then \
		rm -rf $(MEMCHECK_DIR)/nginx $(MEMCHECK_DIR)/nginx.stamp; mkdir -p $(MEMCHECK_DIR); \
		$(MEMCHECK_COPY); \
		for p in nginx-patches/*.patch; do \
			[ -f "$$p" ] || continue; echo "applying $$p"; \
			patch -d $(MEMCHECK_DIR)/nginx -p1 --forward < $$p; \
		done; \
		cd $(MEMCHECK_DIR)/nginx; \
		$(call nginx_configure,$(MEMCHECK_CONFIGURE)) > configure.log; \
		$(MAKE) -j2 > make.log 2>&1 || { tail -n 30 make.log; exit 1; }; \
		echo "$$stamp" > $(MEMCHECK_DIR)/nginx.stamp; \
	fi
	$(MEMCHECK_CARGO_ENV) $(call module_for,$(MEMCHECK_DIR)/nginx,$(MEMCHECK_DIR)/cargo) \
		$(MEMCHECK_CARGO_ARGS)
	@$(MEMCHECK_DIR)/nginx/objs/nginx -V 2>&1 | sed -n 's/^built by/nginx-asan built by/p'

# Test directories go to $(MEMCHECK_DIR)/tmp and are kept (TEST_NGINX_LEAVE)
# so that t/memcheck/scan can read every log of every test, including
# files without the final check; they are removed after a clean run.
# When a report makes workers die, tests write to sockets nginx closed:
# SIGPIPE is ignored (inherited by prove and the tests), or a test killed by
# it would leave its nginx and backends holding prove's output open, and
# prove waiting for them. MEMCHECK_TIMEOUT bounds the whole run anyway; an
# nginx still running from one of the run's test directories afterwards
# (pid file there) is stopped.
MEMCHECK_TIMEOUT ?= 1200

test-asan: memcheck-build
	rm -rf $(MEMCHECK_DIR)/tmp $(MEMCHECK_DIR)/reports
	mkdir -p $(MEMCHECK_DIR)/tmp $(MEMCHECK_DIR)/reports
	set +e; trap '' PIPE; \
	MEMCHECK_NGINX=$(MEMCHECK_DIR)/nginx/objs/nginx \
	MEMCHECK_REPORTS=$(MEMCHECK_DIR)/reports \
	ASAN_OPTIONS="$(MEMCHECK_ASAN_OPTIONS)$${ASAN_OPTIONS:+:$$ASAN_OPTIONS}" \
	LSAN_OPTIONS="$(MEMCHECK_LSAN_OPTIONS)$${LSAN_OPTIONS:+:$$LSAN_OPTIONS}" \
	TEST_NGINX_MEMCHECK=asan \
	TMPDIR=$(MEMCHECK_DIR)/tmp TEST_NGINX_LEAVE=1 \
	TEST_NGINX_BINARY=$(CURDIR)/t/memcheck/nginx \
	TEST_NGINX_GLOBALS="load_module $(MEMCHECK_SO); $(ROOT_GLOBALS) $(TEST_NGINX_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
		timeout -k 10 $(MEMCHECK_TIMEOUT) prove -j$(PROVE_JOBS) $(or $(MEMCHECK_TESTS),t/); \
	rc=$$?; \
	for f in $(MEMCHECK_DIR)/tmp/*/nginx.pid; do \
		[ -f "$$f" ] && pid=$$(cat "$$f") && [ -n "$$pid" ] \
		&& grep -qsaF "$${f%/*}/" /proc/$$pid/cmdline \
		&& kill -TERM "$$pid" && echo "memcheck: stopped nginx left running in $${f%/*}"; \
	done; \
	sh t/memcheck/scan $(MEMCHECK_DIR)/tmp $(MEMCHECK_DIR)/reports || rc=1; \
	if [ $$rc = 0 ]; then rm -rf $(MEMCHECK_DIR)/tmp; fi; \
	exit $$rc
