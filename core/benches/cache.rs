//! Microbenchmark of the idle-connection cache (`core/src/cache/`): nanoseconds
//! per get+free pair as the module makes it: `find` and `take_from` (get
//! peer), then `store_at` with the bucket found (free peer); the miss row
//! with `take` and `store`. For caches of N = 16, 1024 and 65536 idle
//! connections.
//!
//! Run: `make bench-micro` or `cargo bench -p keepalive-slice-core --bench cache`. Prints a Markdown
//! table; the figures are never asserted (no timing in tests).
//!
//! The benchmark links the core crate, which has no nginx dependency:
//! the code measured is the code the module ships.

use std::hint::black_box;
use std::time::Instant;

use keepalive_slice_core::cache::{BucketKey, IdleCache};

/// The cache sizes measured: a small upstream, a large one, the largest allowed.
const SIZES: [usize; 3] = [16, 1024, 65536];

/// Pairs per timed run, and timed runs per figure. The fastest run is
/// printed: the machine is shared, and other processes only ever add time.
const PAIRS: usize = 1 << 20;
const RUNS: usize = 7;

/// A `struct sockaddr_in` as nginx hands it to the balancer (16 bytes):
/// AF_INET, port, 127.x.y.1.
fn sockaddr(server: usize) -> [u8; 16] {
    let port = 10000 + (server % 50000) as u16;
    let p = port.to_be_bytes();
    [
        2,
        0,
        p[0],
        p[1],
        127,
        (server >> 16) as u8,
        (server >> 8) as u8,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]
}

/// xorshift64: cheap, deterministic choice of server or key.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

struct Scenario {
    name: &'static str,
    what: &'static str,
    /// Builds the cache for N and returns a closure doing `pairs` pairs,
    /// which reports how many takes hit.
    run: fn(usize, usize) -> (f64, usize),
}

fn unsliced(n: usize) -> IdleCache<u64> {
    IdleCache::unsliced(n).expect("cache")
}

/// Evicted connections are only counted (nginx closes them).
fn close(c: u64) {
    black_box(c);
}

fn key(addr: &[u8]) -> BucketKey<'_> {
    BucketKey {
        addr,
        slice: b"",
        tag: 0,
    }
}

/// Times `pairs` calls of `pair` (each returns whether its take hit).
fn timed(pairs: usize, mut pair: impl FnMut(usize) -> bool) -> (f64, usize) {
    let mut hits = 0;
    let start = Instant::now();
    for i in 0..pairs {
        hits += usize::from(black_box(pair(black_box(i))));
    }
    let ns = start.elapsed().as_nanos() as f64 / pairs as f64;
    (ns, hits)
}

/// One server, N idle connections to it: every get finds one (the most
/// recent), every free puts it back. The common case of `keepalive N`.
fn hit_one_server(n: usize, pairs: usize) -> (f64, usize) {
    let mut cache = unsliced(n);
    let a = sockaddr(0);
    for c in 0..n as u64 {
        cache.store(&key(&a), c, usize::MAX, close).unwrap();
    }
    timed(pairs, |_| {
        let k = key(black_box(&a));
        let found = cache.find(&k);
        let c = found.and_then(|b| cache.take_from(b)).unwrap();
        cache.store_at(found, &k, c, usize::MAX, close).unwrap();
        true
    })
}

/// The cache is full of connections to server A; each get asks for a
/// server with nothing idle (miss, a new connection is opened), and its
/// free stores that connection, evicting the least recently stored one.
fn miss_evict(n: usize, pairs: usize) -> (f64, usize) {
    let mut cache = unsliced(n);
    let a = sockaddr(0);
    let b = sockaddr(1);
    for c in 0..n as u64 {
        cache.store(&key(&a), c, usize::MAX, close).unwrap();
    }
    timed(pairs, |i| {
        let hit = cache.take(&key(black_box(&b))).is_some();
        let stored = cache.store(&key(black_box(&a)), i as u64, usize::MAX, close);
        black_box(stored.unwrap().slot);
        hit
    })
}

/// `random` over 1024 servers with `keepalive N`: the N idle connections
/// are spread over the servers; each request picks a server at random,
/// takes one of its idle connections if there is one (else opens a new
/// one), and stores it back, evicting the LRU one when the cache is full.
fn random_1024_servers(n: usize, pairs: usize) -> (f64, usize) {
    const SERVERS: usize = 1024;
    let addrs: Vec<[u8; 16]> = (0..SERVERS).map(sockaddr).collect();
    let mut cache = unsliced(n);
    for c in 0..n {
        cache
            .store(&key(&addrs[c % SERVERS]), c as u64, usize::MAX, close)
            .unwrap();
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let choices: Vec<u16> = (0..4096).map(|_| rng.next(SERVERS) as u16).collect();
    timed(pairs, |i| {
        let k = key(&addrs[choices[i & 4095] as usize]);
        let found = cache.find(&k);
        let (c, hit) = match found.and_then(|b| cache.take_from(b)) {
            Some(c) => (c, true),
            None => (i as u64, false),
        };
        black_box(
            cache
                .store_at(found, &k, c, usize::MAX, close)
                .unwrap()
                .slot,
        );
        hit
    })
}

/// Sliced: one server, `slice_key=$host` with 1024 hosts (`slice_poolsize`
/// 1024, keys like "host-0123.example.com" cut to 64 bytes), `slice_conn` =
/// N/1024 (at least 1). Requests pick a host at random.
fn sliced_1024_hosts(n: usize, pairs: usize) -> (f64, usize) {
    const HOSTS: usize = 1024;
    let limit = (n / HOSTS).max(1);
    let hosts: Vec<String> = (0..HOSTS)
        .map(|h| format!("host-{h:04}.example.com"))
        .collect();
    let a = sockaddr(0);
    let mut cache = IdleCache::new(n, HOSTS, 64).expect("cache");
    for c in 0..n {
        let k = BucketKey {
            addr: &a,
            slice: hosts[c % HOSTS].as_bytes(),
            tag: 0,
        };
        // Beyond the per-host limit the store is refused, as in nginx.
        let _ = cache.store(&k, c as u64, limit, close);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let choices: Vec<u16> = (0..4096).map(|_| rng.next(HOSTS) as u16).collect();
    timed(pairs, |i| {
        let k = BucketKey {
            addr: &a,
            slice: hosts[choices[i & 4095] as usize].as_bytes(),
            tag: 0,
        };
        let found = cache.find(&k);
        let (c, hit) = match found.and_then(|b| cache.take_from(b)) {
            Some(c) => (c, true),
            None => (i as u64, false),
        };
        black_box(cache.store_at(found, &k, c, limit, close).ok());
        hit
    })
}

fn main() {
    // `cargo bench` passes --bench; a filter argument picks scenarios.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let pairs = std::env::var("MICRO_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PAIRS);

    let scenarios = [
        Scenario {
            name: "hit, 1 server",
            what: "N idle to one server; take finds the most recent, store puts it back",
            run: hit_one_server,
        },
        Scenario {
            name: "miss + evict",
            what: "take finds nothing; store of the new connection evicts the LRU one",
            run: miss_evict,
        },
        Scenario {
            name: "random, 1024 servers",
            what: "N idle spread over 1024 servers, server chosen at random",
            run: random_1024_servers,
        },
        Scenario {
            name: "sliced, 1024 hosts",
            what: "one server, 1024 slice keys, slice_conn=max(1,N/1024), key at random",
            run: sliced_1024_hosts,
        },
    ];

    println!(
        "ns per get+free pair (find+take_from+store_at on IdleCache; miss: take+store), best of {RUNS} runs of {pairs} pairs\n"
    );
    print!("| scenario |");
    for n in SIZES {
        print!(" N={n} |");
    }
    println!(" N=65536 / N=16 | hits at N=16 / 1024 / 65536 |");
    println!("|---|{}---|---|", "---:|".repeat(SIZES.len()));
    for s in &scenarios {
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        let mut ns = Vec::new();
        let mut hits = Vec::new();
        for n in SIZES {
            let mut runs: Vec<(f64, usize)> = (0..RUNS).map(|_| (s.run)(n, pairs)).collect();
            runs.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (t, h) = runs[0];
            ns.push(t);
            hits.push(format!("{:.0}%", 100.0 * h as f64 / pairs as f64));
        }
        print!("| {} |", s.name);
        for t in &ns {
            print!(" {t:.1} |");
        }
        println!(" {:.2}x | {} |", ns[2] / ns[0], hits.join(" / "));
    }
    println!();
    for s in &scenarios {
        println!("- {}: {}", s.name, s.what);
    }
}
