//! `keepalive auto`: how many idle connections an upstream keeps, from
//! what its recent load used, in safe Rust.
//!
//! The cache of an auto upstream is sized at the ceiling (`max=`) and keeps
//! every connection a request frees, as `keepalive max` would: a connection
//! exists only because a request needed it, so the idle connections after
//! a burst are the burst's peak of connections in use, kept for the next
//! burst. What sizes the cache to the load is the decay: every interval
//! (`decay=`), each worker looks at its idle connections and closes those
//! above its estimate of the idle connections the load needs, oldest
//! first.
//!
//! The estimate, as HAProxy's (`srv_cleanup_idle_conns`): at each tick,
//! `recent` is the number of idle connections a request used since the
//! previous tick (stored since, or still idle but having carried a request
//! since: see [`Marks`]), and
//!
//! ```text
//! estimate = max(recent, (estimate + recent) / 2)
//! ```
//!
//! so it follows a rising load at once and halves towards a falling one;
//! the idle connections above it are closed. Idle connections no request
//! used during a whole interval are the only ones closed (those a request
//! used are at least `recent`, and the estimate is never below it), and
//! since the cache's LRU list is in the order connections were stored, the
//! oldest are exactly those: after the load stops, the idle connections
//! halve each interval, down to none.
//!
//! Requests take the most recently stored connection of their bucket
//! (LIFO), so a steady load of `k` requests at a time keeps using the same
//! `k` connections, and the others are left unused for whole intervals:
//! `recent` measures the recent peak of connections in use, not the number
//! of connections that happened to be touched.

/// Default ceiling of `keepalive auto` (`max=`): idle connections a worker
/// keeps at most for one upstream.
pub const DEFAULT_MAX: usize = 1024;

/// Default decay interval (`decay=`), in milliseconds.
pub const DEFAULT_DECAY_MS: u64 = 1000;

/// Shortest and longest decay intervals accepted, in milliseconds.
pub const MIN_DECAY_MS: u64 = 10;
pub const MAX_DECAY_MS: u64 = 3_600_000;

/// The estimate of one upstream in one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimator {
    estimate: usize,
}

impl Estimator {
    pub const fn new() -> Self {
        Estimator { estimate: 0 }
    }

    /// The estimate after the last tick: idle connections the recent load
    /// needs.
    pub fn estimate(&self) -> usize {
        self.estimate
    }

    /// One tick: `idle` connections are idle now, `unused` of them carried
    /// no request since the previous tick. Returns how many of the oldest
    /// idle connections to close (never more than `unused`).
    pub fn tick(&mut self, idle: usize, unused: usize) -> usize {
        let unused = unused.min(idle);
        let recent = idle - unused;
        let halfway = (self.estimate / 2).saturating_add(recent / 2) + (self.estimate & recent & 1);
        self.estimate = recent.max(halfway);
        idle - self.estimate.min(idle)
    }
}

/// What a tick remembers of an idle connection: which connection sat in a
/// slot, and how many requests it had carried, at the previous tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Mark {
    tick: u32,
    conn: usize,
    requests: u64,
}

/// The idle connections seen at the previous tick, by slot of the cache:
/// one that is still idle in the same slot, the same connection with the
/// same count of requests, carried no request in between. (A connection
/// taken for a request and stored back into the same slot has carried one
/// more request; one that left the cache and a new one in its slot is
/// another connection.) Sized with the cache, at configuration time.
#[derive(Debug)]
pub struct Marks {
    tick: u32,
    marks: Box<[Mark]>,
}

impl Marks {
    /// Marks for a cache of `capacity` slots; `None` without the memory.
    pub fn new(capacity: usize) -> Option<Self> {
        Some(Marks {
            tick: 1,
            marks: crate::cache::boxed_slice(capacity, |_| Mark::default())?,
        })
    }

    /// Bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.marks.len() * size_of::<Mark>()
    }

    /// Starts a new tick: what [`Marks::observe`] records from now on is
    /// compared at the next one.
    pub fn next_tick(&mut self) {
        self.tick = self.tick.wrapping_add(1);
        if self.tick == 0 {
            // Marks of 2^32 ticks ago must not match: forget them all.
            self.marks.fill(Mark::default());
            self.tick = 1;
        }
    }

    /// Records connection `conn` (any identity: in the module its serial
    /// number and address) idle in
    /// `slot` after carrying `requests` requests; returns whether it was
    /// idle there, unused, at the previous tick.
    pub fn observe(&mut self, slot: usize, conn: usize, requests: u64) -> bool {
        let Some(mark) = self.marks.get_mut(slot) else {
            return false;
        };
        let unused = mark.tick == self.tick.wrapping_sub(1)
            && mark.conn == conn
            && mark.requests == requests;
        *mark = Mark {
            tick: self.tick,
            conn,
            requests,
        };
        unused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_a_rise_at_once_and_halves_towards_a_fall() {
        let mut e = Estimator::new();
        // A burst's 200 connections, all used in the last interval.
        assert_eq!(e.tick(200, 0), 0);
        assert_eq!(e.estimate(), 200);
        // The load stops: nothing used, half of the surplus closed.
        assert_eq!(e.tick(200, 200), 100);
        assert_eq!(e.estimate(), 100);
        assert_eq!(e.tick(100, 100), 50);
        assert_eq!(e.tick(50, 50), 25);
        assert_eq!(e.tick(25, 25), 13);
        assert_eq!(e.estimate(), 12);
        // Down to none.
        let mut idle = 12;
        for _ in 0..10 {
            idle -= e.tick(idle, idle);
        }
        assert_eq!(idle, 0);
        assert_eq!(e.estimate(), 0);
    }

    #[test]
    fn a_tick_in_the_middle_of_a_burst_only_delays_the_halving() {
        let mut e = Estimator::new();
        // One of a burst's 8 stored at the tick, the 7 others after it.
        assert_eq!(e.tick(1, 0), 0);
        // The one is unused since: the estimate follows the 7 at once.
        assert_eq!(e.tick(8, 1), 1);
        let mut idle = 7;
        let mut seen = vec![idle];
        while idle > 0 {
            idle -= e.tick(idle, idle);
            seen.push(idle);
        }
        assert_eq!(seen, [7, 3, 1, 0]);
    }

    #[test]
    fn a_steady_small_load_keeps_its_connections() {
        let mut e = Estimator::new();
        e.tick(200, 0);
        // 10 at a time after a burst of 200: 190 unused each interval.
        let mut idle = 200;
        for _ in 0..20 {
            idle -= e.tick(idle, idle - 10);
        }
        assert_eq!(idle, 10);
        assert_eq!(e.estimate(), 10);
    }

    #[test]
    fn only_unused_connections_are_closed() {
        let mut e = Estimator::new();
        e.tick(1000, 0);
        for (idle, unused) in [(1000, 1), (900, 899), (10, 3), (0, 0), (5, 9)] {
            assert!(e.tick(idle, unused) <= unused.min(idle));
            assert!(e.estimate() >= idle - unused.min(idle));
        }
    }

    /// A model: connections stored in order, some used each interval; the
    /// marks must tell exactly the unused ones, and the estimator close
    /// only those, oldest first.
    #[test]
    fn marks_and_estimator_against_a_model() {
        // Slot i holds connection id conns[i] with requests reqs[i], or
        // nothing; `stored` is the LRU order (oldest first).
        let capacity = 64;
        let mut marks = Marks::new(capacity).expect("memory");
        let mut e = Estimator::new();
        let mut slots: Vec<Option<(usize, u64)>> = vec![None; capacity];
        let mut order: Vec<usize> = Vec::new();
        let mut next_id = 1;
        let mut rng = 0x1234_5678_u64;
        let mut rand = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut used_since_tick = vec![false; capacity];
        for round in 0..400 {
            // Load: a peak that rises and falls.
            let load = if (round / 40) % 2 == 0 { 40 } else { 5 };
            for _ in 0..load {
                // Take the most recent connection (LIFO) or open one,
                // then store it back.
                let taken = order.pop();
                let (slot, id, reqs) = match taken {
                    Some(slot) => {
                        let (id, reqs) = slots[slot].take().expect("stored");
                        (slot, id, reqs + 1)
                    }
                    None => {
                        let slot = (0..capacity).find(|&s| slots[s].is_none()).expect("room");
                        next_id += 1;
                        (slot, next_id, 1)
                    }
                };
                // Stored back into any free slot.
                let slot = if rand(2) == 0 {
                    slot
                } else {
                    (0..capacity).find(|&s| slots[s].is_none()).expect("room")
                };
                slots[slot] = Some((id, reqs));
                used_since_tick[slot] = true;
                order.push(slot);
            }
            // Extra concurrency: `load` requests at once open new
            // connections beyond the idle ones.
            while order.len() < load.min(capacity) {
                let slot = (0..capacity).find(|&s| slots[s].is_none()).expect("room");
                next_id += 1;
                slots[slot] = Some((next_id, 1));
                used_since_tick[slot] = true;
                order.push(slot);
            }
            // The tick: LRU from the oldest.
            marks.next_tick();
            let mut unused = 0;
            let mut first_recent = None;
            for (pos, &slot) in order.iter().enumerate() {
                let (id, reqs) = slots[slot].expect("stored");
                let was_unused = marks.observe(slot, id, reqs);
                if round > 0 {
                    assert_eq!(was_unused, !used_since_tick[slot], "round {round}");
                }
                if was_unused {
                    unused += 1;
                    assert!(first_recent.is_none(), "unused ones are the oldest");
                } else if first_recent.is_none() {
                    first_recent = Some(pos);
                }
            }
            let close = e.tick(order.len(), unused);
            assert!(close <= unused);
            for _ in 0..close {
                let slot = order.remove(0);
                slots[slot] = None;
            }
            used_since_tick.fill(false);
        }
        // The load ends at 5 at a time: the estimate came down to it.
        assert!(e.estimate() <= 10, "estimate {}", e.estimate());
    }

    #[test]
    fn a_new_connection_in_a_slot_is_not_unused() {
        let mut marks = Marks::new(4).expect("memory");
        marks.next_tick();
        assert!(!marks.observe(0, 100, 1));
        marks.next_tick();
        assert!(marks.observe(0, 100, 1));
        marks.next_tick();
        // Another connection in the slot, or the same one used again.
        assert!(!marks.observe(0, 200, 1));
        marks.next_tick();
        assert!(!marks.observe(0, 200, 2));
        // Not seen at the previous tick: not unused.
        marks.next_tick();
        marks.next_tick();
        assert!(!marks.observe(0, 200, 2));
        assert!(!marks.observe(9, 1, 1));
    }
}
