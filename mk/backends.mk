# Real backends' Keep-Alive headers (keepalive_hints).
#
#   make test-backends  Apache (KeepAliveTimeout 2, MaxKeepAliveRequests 4)
#                       and Node's http server (keepAliveTimeout 2000)
#                       behind objs/nginx, POSTs every 0.5-3 s from four
#                       clients for HINTS_DURATION seconds per backend
#                       (default 30): none failed, none sent on a
#                       connection idle longer than the hint less the
#                       margin (the backends' own logs). t/ runs the same
#                       file for 4 s per backend.
.PHONY: test-backends

BACKEND_PACKAGES = apache2 nodejs
HINTS_DURATION ?= 30

test-backends: deps build
	@sh .ci/packages $(BACKEND_PACKAGES)
	TEST_NGINX_HINTS_DURATION=$(HINTS_DURATION) \
	TEST_NGINX_BINARY=$(CURDIR)/objs/nginx \
	TEST_NGINX_GLOBALS="$(TEST_GLOBALS) $(TEST_NGINX_GLOBALS)" \
	PERL5LIB=$(TEST_PERL5LIB) \
	prove -v t/keepalive_hints_backends.t
