# Performance. Figures are printed and written, never asserted
# (docs/performance.md).
#
#   make bench          wrk through objs/nginx: no keepalive, nginx's own
#                       keepalive, ours plain and sliced, 1 and N workers,
#                       512 servers with random; alternating rounds, median
#                       ratios; writes bench/results/<date>-<HHMM>.md, latest.md
#                       (~7 min; BENCH_ROUNDS, BENCH_DURATION, ... in
#                       bench/bench.pl)
#   make bench-micro    ns per get+free pair of the idle cache at N = 16,
#                       1024, 65536 (core/benches/cache.rs, ~10 s once built)
#   make bench-profile  callgrind instructions per request, ours vs stock
#                       (bench/profile.pl, ~2 min)
#   make bench-flood    busy Hosts beside a trickle and a flood of random Host
#                       values, ours sliced vs nginx's unsliced
#                       cache: busy req/s and upstream connections; writes
#                       bench/results/flood-<date>-<HHMM>.md, flood-latest.md
#                       (~1 min 10 s; BENCH_FLOOD_DURATION, BENCH_FLOOD_ROUNDS
#                       in bench/flood.pl)
#   make bench-auto     keepalive auto against keepalive 16 and 1024, nginx's
#                       own and ours: wrk -c200 from a cold cache, and a
#                       bursty load (200 clients 2 s, 10 clients 2 s, for
#                       20 s; idle connections 10 s later, status page and
#                       backend); writes bench/results/auto-<date>-<HHMM>.md,
#                       auto-latest.md (~3 min; BENCH_AUTO_* in bench/auto.pl)
#   make bench-workers  upstream connections and reuse with 1, 2, 4, 8
#                       workers, sliced and unsliced, keepalive_share on
#                       and off, against Apache prefork (KeepAliveTimeout
#                       5), each request on a fresh client connection;
#                       writes bench/results/workers-<date>-<HHMM>.md,
#                       workers-latest.md (~5 min; BENCH_WORKERS_DURATION,
#                       BENCH_WORKERS_RATE, BENCH_WORKERS in
#                       bench/workers.pl)
#   make bench-memory   resident memory of worker and master with 2,000
#                       upstreams of one server (200 for keepalive 1024),
#                       nginx's own keepalive against this module's, and
#                       nginx -t's time; writes
#                       bench/results/memory-<date>-<HHMM>.md,
#                       memory-latest.md (~1 min; BENCH_MEMORY_UPSTREAMS,
#                       BENCH_MEMORY_RUNS in bench/memory.pl)
.PHONY: bench bench-micro bench-profile bench-flood bench-auto bench-workers bench-memory

bench: deps deps-bench build
	perl bench/bench.pl

bench-micro:
	$(CARGO) bench -p keepalive-slice-core --bench cache

bench-profile: deps build
	@sh .ci/packages valgrind
	perl bench/profile.pl

bench-flood: deps deps-bench build
	perl bench/flood.pl

bench-auto: deps deps-bench build
	perl bench/auto.pl

bench-workers: deps build
	@sh .ci/packages apache2
	perl bench/workers.pl

bench-memory: deps build
	perl bench/memory.pl
