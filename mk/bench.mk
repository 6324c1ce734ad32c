# make bench: wrk throughput through objs/nginx (see bench/bench.pl).
.PHONY: bench
bench: deps deps-bench build
	perl bench/bench.pl
