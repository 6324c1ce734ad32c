# Debian package for the system's nginx.
#
#   make deb       objs/libnginx-mod-http-upstream-keepalive-slice_<version>_<arch>.deb
#                  for the nginx installed from the system's packages:
#                  debian/rules clean, then binary (debhelper and nginx-dev's
#                  dh_nginx), packaging the debian-module build, the one
#                  "make test NGINX=system" runs the suites against. The
#                  version is Cargo.toml's; debian/changelog must have an
#                  entry for it.
#   make test-deb  (as root) t/deb/package.t: lintian; apt-get install of the
#                  package into this machine's nginx, nginx -t, the system
#                  nginx started with a sliced upstream, per-Host reuse seen
#                  in the backend's connection ids; remove and purge, nginx
#                  still starts, nothing of the module left; a copy of the
#                  package declaring another nginx ABI refused by apt, before
#                  and while the real one is installed. Leaves the machine's
#                  nginx packages, /etc/nginx/modules-enabled and
#                  /usr/lib/nginx/modules as it found them (~10 s).
.PHONY: deb test-deb deb-deps

DEB_PACKAGE = libnginx-mod-http-upstream-keepalive-slice
DEB_TOOLS   = debhelper dpkg-dev lintian
# Expanded only in the recipes below, after deb-deps installed dpkg-dev.
DEB_VERSION = $(shell dpkg-parsechangelog -SVersion)
DEB_FILE    = objs/$(DEB_PACKAGE)_$(DEB_VERSION)_$(shell dpkg --print-architecture).deb
CRATE_VERSION = $(shell $(CARGO) metadata --no-deps --format-version 1 \
	| perl -MJSON::PP -0777 -ne 'print decode_json($$_)->{packages}[0]{version}')

deb-deps: deps
	@sh .ci/packages $(DEBIAN_PACKAGES) $(DEB_TOOLS)

deb: deb-deps
	@if [ "$(DEB_VERSION)" != "$(CRATE_VERSION)" ]; then \
		echo "debian/changelog is at $(DEB_VERSION), Cargo.toml at $(CRATE_VERSION):" \
			"add a debian/changelog entry (dch -v $(CRATE_VERSION))" >&2; \
		exit 1; \
	fi
	dpkg-checkbuilddeps
	mkdir -p objs
	rm -f objs/$(DEB_PACKAGE)_*.deb
	debian/rules clean
	debian/rules binary DEB_DESTDIR=$(CURDIR)/objs
	@ls -l $(DEB_FILE)

test-deb: deb
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test-deb installs and removes a package: run it as root" >&2; exit 1; \
	fi
	TEST_DEB=$(DEB_FILE) TEST_DEB_VERSION=$(CRATE_VERSION) \
	PERL5LIB=$(CURDIR)/t/lib prove -v t/deb/package.t
