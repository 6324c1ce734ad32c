//! What the cache did, counted per upstream and summed over all workers:
//! the counter set, the table that holds it in shared memory, and the
//! per-worker handle the hot path counts through. Plain Rust: the table
//! lives in whatever memory it is given (an nginx shared zone in the
//! module, a `Vec` in the unit tests).
//!
//! # The table
//!
//! One table per nginx instance, in a shared zone the module adds itself.
//! Each upstream has an entry, found by name, so that a reload which keeps
//! the zone keeps every upstream's numbers, whatever else changed. An
//! entry holds one [`WorkerCounters`] block per slot; a worker counts in
//! slot `ngx_worker % slots` only, so that workers do not contend for one
//! cache line on every request. All counting is an atomic add (old and new
//! workers may share a slot during a reload): no locks.
//!
//! Names are only ever added, by the master while it reads a new
//! configuration (workers never read or write them); when the names of
//! the old table and of the new configuration no longer fit, [`plan`]
//! asks for a zone of another size, which nginx creates anew: counters
//! start from zero again, as after a restart.
//!
//! # Gauges
//!
//! Idle connections are not counted separately: every connection stored
//! in the cache leaves it exactly once, taken by a request, evicted or
//! closed while idle, so `idle = kept - reused - evicted - closed`. Buckets
//! in use are published by each worker as a difference against what it
//! last published, after each store and close (not after a take, whose
//! bucket usually comes back a moment later when the connection is kept
//! again): the gauge lags by the requests in flight, and costs nothing
//! while the number of buckets does not change.

use core::mem::size_of;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Why a connection was not kept when its request released it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotKept {
    /// Its bucket already held `slice_conn` (or `slice_dyn`) connections.
    BucketFull,
    /// It needed a new bucket and all `slice_poolsize` were in use.
    NoFreeBucket,
    /// The bucket limit was 0 (`slice_conn=0`, or `slice_dyn` said 0).
    LimitZero,
    /// The connection had carried `keepalive_requests` requests.
    Requests,
    /// The connection was older than `keepalive_time`.
    Time,
    /// The upstream response did not allow keeping the connection.
    ResponseNotKeepalive,
    /// The response came before the request body was fully sent.
    RequestBodyUnsent,
    /// nginx is shutting down.
    Shutdown,
    /// The try failed, the connection saw an error, or a value needed to
    /// keep it (the slice key, `slice_dyn`) could not be had.
    Error,
    /// The backend's `Keep-Alive` header said no further request: its
    /// `timeout` not above `keepalive_hint_margin`, or its `max` used up.
    KeepaliveHint,
}

impl NotKept {
    pub const ALL: [NotKept; 10] = [
        NotKept::BucketFull,
        NotKept::NoFreeBucket,
        NotKept::LimitZero,
        NotKept::Requests,
        NotKept::Time,
        NotKept::ResponseNotKeepalive,
        NotKept::RequestBodyUnsent,
        NotKept::Shutdown,
        NotKept::Error,
        NotKept::KeepaliveHint,
    ];

    /// The `reason` label and JSON key.
    pub const fn label(self) -> &'static str {
        match self {
            NotKept::BucketFull => "bucket_full",
            NotKept::NoFreeBucket => "no_free_bucket",
            NotKept::LimitZero => "limit_zero",
            NotKept::Requests => "keepalive_requests",
            NotKept::Time => "keepalive_time",
            NotKept::ResponseNotKeepalive => "response_not_keepalive",
            NotKept::RequestBodyUnsent => "request_body_unsent",
            NotKept::Shutdown => "shutdown",
            NotKept::Error => "error",
            NotKept::KeepaliveHint => "keepalive_hint",
        }
    }
}

/// Why an idle connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// `keepalive_timeout` passed.
    Timeout,
    /// The server closed or reset it.
    Server,
    /// The server sent bytes nobody asked for.
    UnexpectedData,
    /// nginx is shutting down (or the worker is leaving after a reload).
    Shutdown,
    /// The event could not be re-armed.
    Error,
    /// The idle timer the backend's `Keep-Alive: timeout` shortened
    /// (below `keepalive_timeout`) passed.
    HintTimeout,
    /// `keepalive auto` closed it: no request used it for a whole decay
    /// interval and the estimate was below the idle connections.
    Decay,
}

impl Closed {
    pub const ALL: [Closed; 7] = [
        Closed::Timeout,
        Closed::Server,
        Closed::UnexpectedData,
        Closed::Shutdown,
        Closed::Error,
        Closed::HintTimeout,
        Closed::Decay,
    ];

    /// The `reason` label and JSON key.
    pub const fn label(self) -> &'static str {
        match self {
            Closed::Timeout => "timeout",
            Closed::Server => "closed_by_server",
            Closed::UnexpectedData => "unexpected_data",
            Closed::Shutdown => "shutdown",
            Closed::Error => "error",
            Closed::HintTimeout => "hint_timeout",
            Closed::Decay => "decay",
        }
    }
}

/// An event the cache counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A try took a cached connection.
    Reused,
    /// A try found none (and opened a new connection).
    Missed,
    /// A connection was stored in the cache.
    Kept,
    /// An idle connection was closed to make room (LRU).
    Evicted,
    NotKept(NotKept),
    Closed(Closed),
    /// A try took an idle connection from another worker (counted as
    /// `Reused` too).
    SharedTaken,
    /// A try claimed another worker's idle connection but could not have
    /// it (the worker was gone, the socket not the same, the kernel
    /// refused).
    ShareFailed,
}

// Positions in a WorkerCounters block. Adding a counter: a variant above,
// a position here, and a line in `Counter::index`; the unit tests check
// that positions are distinct and all used. A counter for connections that
// leave the cache must also go into `Snapshot::idle`.
const REUSED: usize = 0;
const MISSED: usize = 1;
const KEPT: usize = 2;
const EVICTED: usize = 3;
/// The buckets gauge: the sum of what workers published (wrapping, signed).
const BUCKETS: usize = 4;
const NOT_KEPT: usize = 5;
const CLOSED: usize = NOT_KEPT + NotKept::ALL.len();
const SHARED_TAKEN: usize = CLOSED + Closed::ALL.len();
const SHARE_FAILED: usize = SHARED_TAKEN + 1;
/// `keepalive auto`'s gauges, published as the buckets are: the estimate
/// and the ceiling (`max=`) of each worker, summed.
const AUTO_ESTIMATE: usize = SHARE_FAILED + 1;
const AUTO_LIMIT: usize = AUTO_ESTIMATE + 1;
/// Values in a WorkerCounters block.
pub const VALUES: usize = AUTO_LIMIT + 1;

impl Counter {
    #[inline]
    pub const fn index(self) -> usize {
        match self {
            Counter::Reused => REUSED,
            Counter::Missed => MISSED,
            Counter::Kept => KEPT,
            Counter::Evicted => EVICTED,
            Counter::NotKept(reason) => NOT_KEPT + reason as usize,
            Counter::Closed(reason) => CLOSED + reason as usize,
            Counter::SharedTaken => SHARED_TAKEN,
            Counter::ShareFailed => SHARE_FAILED,
        }
    }
}

/// One worker slot of one upstream: its own cache lines.
#[repr(C, align(64))]
pub struct WorkerCounters {
    values: [AtomicU64; VALUES],
}

impl WorkerCounters {
    #[inline]
    fn add(&self, index: usize, n: u64) {
        if let Some(value) = self.values.get(index) {
            value.fetch_add(n, Relaxed);
        }
    }
}

/// The sum of an upstream's counters over all slots, at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    values: [u64; VALUES],
}

impl Snapshot {
    pub const fn zero() -> Self {
        Snapshot {
            values: [0; VALUES],
        }
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter.index()]
    }

    /// Idle connections now: every kept connection leaves the cache once.
    pub fn idle(&self) -> u64 {
        let left = Closed::ALL.iter().fold(
            self.values[REUSED].wrapping_add(self.values[EVICTED]),
            |sum, &reason| sum.wrapping_add(self.get(Counter::Closed(reason))),
        );
        // Counters are read one by one while workers count: a take may be
        // seen before its store. Never report less than nothing.
        clamp_signed(self.values[KEPT].wrapping_sub(left))
    }

    /// Buckets in use now.
    pub fn buckets(&self) -> u64 {
        clamp_signed(self.values[BUCKETS])
    }

    /// `keepalive auto`: the workers' estimates, summed.
    pub fn auto_estimate(&self) -> u64 {
        clamp_signed(self.values[AUTO_ESTIMATE])
    }

    /// `keepalive auto`: the workers' ceilings, summed.
    pub fn auto_limit(&self) -> u64 {
        clamp_signed(self.values[AUTO_LIMIT])
    }

    /// For tests: a snapshot with `keepalive auto`'s gauges.
    pub fn with_auto(mut self, estimate: u64, limit: u64) -> Self {
        self.values[AUTO_ESTIMATE] = estimate;
        self.values[AUTO_LIMIT] = limit;
        self
    }

    /// For tests: a snapshot with `counter` set to `n`.
    pub fn with(mut self, counter: Counter, n: u64) -> Self {
        self.values[counter.index()] = n;
        self
    }

    /// For tests: a snapshot whose buckets gauge is `n`.
    pub fn with_buckets(mut self, n: u64) -> Self {
        self.values[BUCKETS] = n;
        self
    }
}

/// A wrapping sum read as signed, negatives as 0.
fn clamp_signed(v: u64) -> u64 {
    if (v as i64) < 0 {
        0
    } else {
        v
    }
}

/// An upstream's entry: `slots` blocks of counters in shared memory.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    first: NonNull<WorkerCounters>,
    slots: usize,
}

impl Entry {
    /// The block a worker counts in.
    pub fn slot(&self, worker: usize) -> &WorkerCounters {
        // SAFETY: an Entry is only made by Table::entry, for `slots`
        // consecutive blocks that live as long as the table's memory.
        unsafe { &*self.first.as_ptr().add(worker % self.slots) }
    }

    /// The counters summed over all slots.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::zero();
        for slot in 0..self.slots {
            for (sum, value) in snapshot.values.iter_mut().zip(&self.slot(slot).values) {
                *sum = sum.wrapping_add(value.load(Relaxed));
            }
        }
        snapshot
    }
}

/// Where an upstream counts before it has a slot of its own (the master
/// while it reads the configuration, or no zone): counts nobody reads. A
/// block rather than no block at all: the hot path counts without asking.
static UNATTACHED: WorkerCounters = WorkerCounters {
    values: [const { AtomicU64::new(0) }; VALUES],
};

/// The counting side of one upstream in one worker: process-local, kept
/// beside the worker's idle cache.
#[derive(Debug)]
pub struct UpstreamStats {
    entry: Option<Entry>,
    /// This worker's block, from `start_worker` on; `UNATTACHED` before.
    mine: NonNull<WorkerCounters>,
    /// Buckets in use as this worker last published them.
    published_buckets: usize,
    /// `keepalive auto`'s estimate and ceiling, as last published.
    published_auto: (usize, usize),
}

impl UpstreamStats {
    pub fn new() -> Self {
        UpstreamStats {
            entry: None,
            mine: NonNull::from(&UNATTACHED),
            published_buckets: 0,
            published_auto: (0, 0),
        }
    }

    /// Binds the upstream to its entry (the master, when the zone is set up).
    pub fn attach(&mut self, entry: Entry) {
        self.entry = Some(entry);
    }

    pub fn entry(&self) -> Option<Entry> {
        self.entry
    }

    /// Picks this worker's slot (each worker, when it starts).
    pub fn start_worker(&mut self, worker: usize) {
        self.mine = match self.entry {
            Some(entry) => NonNull::from(entry.slot(worker)),
            None => NonNull::from(&UNATTACHED),
        };
    }

    /// Counts one event.
    #[inline]
    pub fn count(&self, counter: Counter) {
        // SAFETY: `mine` points into the entry's live shared memory, or
        // at `UNATTACHED`.
        unsafe { self.mine.as_ref() }.add(counter.index(), 1);
    }

    /// Counts one event and publishes the worker's buckets in use.
    #[inline]
    pub fn count_with_buckets(&mut self, counter: Counter, buckets: usize) {
        // SAFETY: as in `count`.
        let mine = unsafe { self.mine.as_ref() };
        mine.add(counter.index(), 1);
        if buckets != self.published_buckets {
            let delta = (buckets as u64).wrapping_sub(self.published_buckets as u64);
            mine.add(BUCKETS, delta);
            self.published_buckets = buckets;
        }
    }
}

impl UpstreamStats {
    /// Publishes this worker's `keepalive auto` estimate and ceiling (0 and
    /// 0 when it leaves), as differences against what it published last.
    pub fn publish_auto(&mut self, estimate: usize, limit: usize) {
        // SAFETY: as in `count`.
        let mine = unsafe { self.mine.as_ref() };
        let (old_estimate, old_limit) = self.published_auto;
        mine.add(
            AUTO_ESTIMATE,
            (estimate as u64).wrapping_sub(old_estimate as u64),
        );
        mine.add(AUTO_LIMIT, (limit as u64).wrapping_sub(old_limit as u64));
        self.published_auto = (estimate, limit);
    }
}

impl Default for UpstreamStats {
    fn default() -> Self {
        Self::new()
    }
}

/// The shape of a table: how many upstreams, worker slots and name bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub capacity: usize,
    pub slots: usize,
    pub arena: usize,
}

const MAGIC: u64 = u64::from_le_bytes(*b"KASLICE1");
/// Changes whenever the layout of a block does, so that a table written
/// by another build is never read as this one's.
const LAYOUT: u64 = VALUES as u64 | (size_of::<WorkerCounters>() as u64) << 16 | 1 << 32;
const MIN_CAPACITY: usize = 32;
const MIN_ARENA: usize = 4096;
/// Most worker slots per entry; more workers share them.
pub const MAX_SLOTS: usize = 16;

#[repr(C)]
struct Header {
    magic: u64,
    layout: u64,
    capacity: u32,
    slots: u32,
    arena: u32,
    _reserved: u32,
    /// Entries in use and name bytes in use; only the master writes them.
    used: AtomicU32,
    arena_used: AtomicU32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct NameRef {
    offset: u32,
    len: u32,
}

fn align_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Geometry {
    /// Room for `names` and as many again, in whole powers of two.
    pub fn for_names(names: &[&[u8]], slots: usize) -> Geometry {
        let bytes: usize = names.iter().map(|n| n.len()).sum();
        let capacity = (2 * names.len()).max(MIN_CAPACITY).next_power_of_two();
        Geometry {
            capacity,
            slots: slots.clamp(1, MAX_SLOTS),
            arena: (2 * bytes)
                .max(capacity * 32)
                .max(MIN_ARENA)
                .next_power_of_two(),
        }
    }

    fn names_offset() -> usize {
        align_up(size_of::<Header>(), 8)
    }

    fn counters_offset(&self) -> usize {
        align_up(
            Self::names_offset() + self.capacity * size_of::<NameRef>(),
            64,
        )
    }

    fn arena_offset(&self) -> usize {
        self.counters_offset() + self.capacity * self.slots * size_of::<WorkerCounters>()
    }

    /// Bytes of a table of this shape.
    pub fn table_bytes(&self) -> usize {
        self.arena_offset() + self.arena
    }

    /// Bytes of an nginx shared zone that holds a table of this shape in
    /// one allocation from the zone's slab pool: the table in whole pages,
    /// plus the pool's own header, slot lists and one 32-byte (at most)
    /// descriptor per page, plus a page lost to alignment.
    pub fn zone_bytes(&self, page: usize) -> usize {
        let table_pages = self.table_bytes().div_ceil(page);
        let metadata = 2048 + (table_pages + 8) * 32;
        (table_pages + metadata.div_ceil(page) + 1) * page
    }
}

/// The shape of the table for the names of a new configuration, given the
/// table the running configuration uses (if any): the old shape while the
/// old names and the new ones fit in it together (nginx then keeps the
/// zone, and the counters with it), otherwise a shape whose zone differs
/// in size (nginx then makes a new zone).
pub fn plan(old: Option<&Table>, names: &[&[u8]], slots: usize, page: usize) -> Geometry {
    let mut fresh = Geometry::for_names(names, slots);
    let Some(old) = old else {
        return fresh;
    };
    let kept = old.geometry();
    if kept.slots == fresh.slots {
        let (mut count, mut bytes) = (old.len(), old.arena_used());
        for (i, name) in names.iter().enumerate() {
            let repeated = names[..i].contains(name);
            if !repeated && old.find(name).is_none() {
                count += 1;
                bytes += name.len();
            }
        }
        if count <= kept.capacity && bytes <= kept.arena {
            return kept;
        }
    }
    while fresh.zone_bytes(page) == kept.zone_bytes(page) {
        fresh.capacity *= 2;
    }
    fresh
}

/// A table in memory the caller provides and keeps alive (an nginx shared
/// zone, mapped at the same address in every process).
#[derive(Debug)]
pub struct Table {
    base: NonNull<u8>,
    geometry: Geometry,
}

impl Table {
    /// Writes an empty table of shape `geometry` at `base`.
    ///
    /// # Safety
    /// `base` must point to `len` writable bytes that no one else uses
    /// yet, and outlive every use of the table and its entries.
    pub unsafe fn format(base: *mut u8, len: usize, geometry: Geometry) -> Option<Table> {
        let base = NonNull::new(base)?;
        if base.as_ptr() as usize % 64 != 0
            || len < geometry.table_bytes()
            || geometry.capacity > u32::MAX as usize
            || geometry.arena > u32::MAX as usize
            || !(1..=MAX_SLOTS).contains(&geometry.slots)
        {
            return None;
        }
        // SAFETY: the caller gives us the memory; zero bytes are a valid
        // value of every type in the table.
        unsafe {
            base.as_ptr().write_bytes(0, geometry.table_bytes());
            base.as_ptr().cast::<Header>().write(Header {
                magic: MAGIC,
                layout: LAYOUT,
                capacity: geometry.capacity as u32,
                slots: geometry.slots as u32,
                arena: geometry.arena as u32,
                _reserved: 0,
                used: AtomicU32::new(0),
                arena_used: AtomicU32::new(0),
            });
        }
        Some(Table { base, geometry })
    }

    /// The table another configuration formatted at `base`, if it is one
    /// of this build's and lies within `len` bytes.
    ///
    /// # Safety
    /// `base` must point to `len` readable bytes that outlive the table.
    pub unsafe fn open(base: *mut u8, len: usize) -> Option<Table> {
        let base = NonNull::new(base)?;
        if base.as_ptr() as usize % 64 != 0 || len < size_of::<Header>() {
            return None;
        }
        // SAFETY: at least a header's bytes are readable, and aligned.
        let header = unsafe { &*base.as_ptr().cast::<Header>() };
        if header.magic != MAGIC || header.layout != LAYOUT {
            return None;
        }
        let geometry = Geometry {
            capacity: header.capacity as usize,
            slots: header.slots as usize,
            arena: header.arena as usize,
        };
        if !(1..=MAX_SLOTS).contains(&geometry.slots)
            || len < geometry.table_bytes()
            || header.used.load(Relaxed) as usize > geometry.capacity
            || header.arena_used.load(Relaxed) as usize > geometry.arena
        {
            return None;
        }
        let table = Table { base, geometry };
        let arena_used = table.arena_used();
        for i in 0..table.len() {
            let name = table.name_ref(i);
            if name.offset as usize + name.len as usize > arena_used {
                return None;
            }
        }
        Some(table)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn header(&self) -> &Header {
        // SAFETY: format/open checked the memory holds a header.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.header().used.load(Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn arena_used(&self) -> usize {
        self.header().arena_used.load(Relaxed) as usize
    }

    fn name_ref(&self, i: usize) -> NameRef {
        debug_assert!(i < self.geometry.capacity);
        // SAFETY: i < capacity, and the name array follows the header.
        unsafe {
            *self
                .base
                .as_ptr()
                .add(Geometry::names_offset())
                .cast::<NameRef>()
                .add(i)
        }
    }

    /// The name of entry `i` (< len).
    pub fn name(&self, i: usize) -> &[u8] {
        let name = self.name_ref(i);
        // SAFETY: open/add keep every name within the arena in use.
        unsafe {
            core::slice::from_raw_parts(
                self.base
                    .as_ptr()
                    .add(self.geometry.arena_offset() + name.offset as usize),
                name.len as usize,
            )
        }
    }

    /// The entry named `name`, if there is one.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        (0..self.len()).find(|&i| self.name(i) == name)
    }

    /// The entry named `name`, added if there is none yet; `None` when the
    /// table is full.
    ///
    /// # Safety
    /// Only one process at a time may add (nginx's master, while it reads
    /// a configuration); workers only count.
    pub unsafe fn find_or_add(&self, name: &[u8]) -> Option<usize> {
        if let Some(i) = self.find(name) {
            return Some(i);
        }
        // SAFETY: as the caller promises; `name` is not in the table.
        unsafe { self.add(name) }
    }

    /// Adds the entry `name`, which the table does not have.
    ///
    /// # Safety
    /// As for [`Table::find_or_add`].
    unsafe fn add(&self, name: &[u8]) -> Option<usize> {
        let (i, offset) = (self.len(), self.arena_used());
        if i >= self.geometry.capacity || offset + name.len() > self.geometry.arena {
            return None;
        }
        // SAFETY: entry i and the name bytes are within the table and not
        // yet in use by anyone; `used` is raised last.
        unsafe {
            let arena = self.base.as_ptr().add(self.geometry.arena_offset());
            core::ptr::copy_nonoverlapping(name.as_ptr(), arena.add(offset), name.len());
            self.base
                .as_ptr()
                .add(Geometry::names_offset())
                .cast::<NameRef>()
                .add(i)
                .write(NameRef {
                    offset: offset as u32,
                    len: name.len() as u32,
                });
        }
        let header = self.header();
        header
            .arena_used
            .store((offset + name.len()) as u32, Relaxed);
        header.used.store(i as u32 + 1, Relaxed);
        Some(i)
    }

    /// [`Table::find_or_add`] for many names at once, in their order:
    /// the names found by a sorted index rather than one scan per name (a
    /// configuration of thousands of upstreams would take O(n²) compares
    /// at every start and reload).
    ///
    /// # Safety
    /// As for [`Table::find_or_add`].
    pub unsafe fn find_or_add_all<'n>(
        &self,
        names: impl IntoIterator<Item = &'n [u8]>,
    ) -> Vec<Option<usize>> {
        let mut index: std::collections::BTreeMap<Vec<u8>, usize> = (0..self.len())
            .map(|i| (self.name(i).to_vec(), i))
            .collect();
        names
            .into_iter()
            .map(|name| {
                if let Some(&i) = index.get(name) {
                    return Some(i);
                }
                // SAFETY: as the caller promises; `name` is not in the table.
                let i = unsafe { self.add(name) }?;
                index.insert(name.to_vec(), i);
                Some(i)
            })
            .collect()
    }

    /// Entry `i` (< len).
    pub fn entry(&self, i: usize) -> Option<Entry> {
        if i >= self.len() {
            return None;
        }
        // SAFETY: the blocks of entry i lie within the table.
        let first = unsafe {
            self.base
                .as_ptr()
                .add(self.geometry.counters_offset())
                .cast::<WorkerCounters>()
                .add(i * self.geometry.slots)
        };
        Some(Entry {
            first: NonNull::new(first)?,
            slots: self.geometry.slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory for a table, 64-byte aligned, as a slab pool page would be.
    fn memory(bytes: usize) -> Vec<WorkerCounters> {
        (0..bytes.div_ceil(size_of::<WorkerCounters>()))
            .map(|_| WorkerCounters {
                values: core::array::from_fn(|_| AtomicU64::new(0)),
            })
            .collect()
    }

    fn table(mem: &mut [WorkerCounters], g: Geometry) -> Table {
        let len = size_of_val(mem);
        // SAFETY: `mem` is this test's own, outlives the table, and is
        // `len` bytes long.
        unsafe { Table::format(mem.as_mut_ptr().cast(), len, g) }.unwrap()
    }

    fn reopen(mem: &mut [WorkerCounters]) -> Option<Table> {
        let len = size_of_val(mem);
        // SAFETY: as in `table`.
        unsafe { Table::open(mem.as_mut_ptr().cast(), len) }
    }

    /// `find_or_add` from the test, the only process adding.
    fn add(t: &Table, name: &[u8]) -> Option<usize> {
        // SAFETY: a test is one process, and nothing else adds to `t`.
        unsafe { t.find_or_add(name) }
    }

    #[test]
    fn names_added_at_once_are_found_as_one_at_a_time() {
        let g = Geometry::for_names(&[b"a", b"bb", b"c"], 2);
        let mut mem = memory(g.table_bytes());
        let t = table(&mut mem, g);
        assert_eq!(add(&t, b"bb"), Some(0));
        let names: [&[u8]; 5] = [b"a", b"bb", b"c", b"a", b"bb"];
        // SAFETY: as in `add`.
        let found = unsafe { t.find_or_add_all(names) };
        assert_eq!(found, [Some(1), Some(0), Some(2), Some(1), Some(0)]);
        assert_eq!(t.len(), 3);
        for (name, i) in names.iter().zip(found) {
            assert_eq!(t.find(name), i);
        }
    }

    fn all_counters() -> Vec<Counter> {
        let mut all = vec![
            Counter::Reused,
            Counter::Missed,
            Counter::Kept,
            Counter::Evicted,
        ];
        all.extend(NotKept::ALL.map(Counter::NotKept));
        all.extend(Closed::ALL.map(Counter::Closed));
        all.extend([Counter::SharedTaken, Counter::ShareFailed]);
        all
    }

    #[test]
    fn every_counter_has_its_own_value() {
        let mut seen: Vec<usize> = all_counters().iter().map(|c| c.index()).collect();
        seen.extend([BUCKETS, AUTO_ESTIMATE, AUTO_LIMIT]);
        seen.sort();
        assert_eq!(seen, (0..VALUES).collect::<Vec<_>>());
        for (i, reason) in NotKept::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "NotKept::ALL in declaration order");
        }
        for (i, reason) in Closed::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "Closed::ALL in declaration order");
        }
        let mut labels: Vec<&str> = NotKept::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), NotKept::ALL.len());
    }

    #[test]
    fn a_block_is_its_own_cache_lines() {
        assert_eq!(size_of::<WorkerCounters>() % 64, 0);
        assert!(size_of::<WorkerCounters>() >= VALUES * 8);
    }

    #[test]
    fn workers_count_in_their_slots_and_are_summed() {
        let g = Geometry {
            capacity: 4,
            slots: 2,
            arena: 64,
        };
        let mut mem = memory(g.table_bytes());
        let t = table(&mut mem, g);
        let e = add(&t, b"u").unwrap();
        let entry = t.entry(e).unwrap();

        let mut w0 = UpstreamStats::new();
        let mut w1 = UpstreamStats::new();
        let mut w2 = UpstreamStats::new();
        let idle = UpstreamStats::new();
        for (w, n) in [(&mut w0, 0), (&mut w1, 1), (&mut w2, 2)] {
            w.attach(entry);
            w.start_worker(n);
        }
        // No entry: counted nowhere that is read.
        idle.count(Counter::Kept);

        w0.count(Counter::Missed);
        w0.count_with_buckets(Counter::Kept, 1);
        w1.count(Counter::Missed);
        w1.count_with_buckets(Counter::Kept, 1);
        w1.count(Counter::Reused);
        w1.count_with_buckets(Counter::Kept, 1);
        // worker 2 shares slot 0 with worker 0
        w2.count(Counter::Missed);
        w2.count_with_buckets(Counter::NotKept(NotKept::BucketFull), 0);

        let s = entry.snapshot();
        assert_eq!(s.get(Counter::Missed), 3);
        assert_eq!(s.get(Counter::Reused), 1);
        assert_eq!(s.get(Counter::Kept), 3);
        assert_eq!(s.get(Counter::NotKept(NotKept::BucketFull)), 1);
        assert_eq!(s.idle(), 2);
        assert_eq!(s.buckets(), 2);
        assert_eq!((s.auto_estimate(), s.auto_limit()), (0, 0));
        // keepalive auto's gauges: published by differences, summed
        w0.publish_auto(5, 64);
        w1.publish_auto(7, 64);
        w1.publish_auto(3, 64);
        let a = entry.snapshot();
        assert_eq!((a.auto_estimate(), a.auto_limit()), (8, 128));
        w0.publish_auto(0, 0);
        w1.publish_auto(0, 0);
        let a = entry.snapshot();
        assert_eq!((a.auto_estimate(), a.auto_limit()), (0, 0));
        // the slots really are separate
        assert_eq!(entry.slot(1).values[MISSED].load(Relaxed), 1);
        assert_eq!(entry.slot(0).values[MISSED].load(Relaxed), 2);

        // connections leave: one evicted, one closed by the server, and
        // worker 1's bucket goes with it
        w0.count_with_buckets(Counter::Evicted, 0);
        w1.count_with_buckets(Counter::Closed(Closed::Server), 0);
        let s = entry.snapshot();
        assert_eq!((s.idle(), s.buckets()), (0, 0));
    }

    #[test]
    fn gauges_never_go_below_zero() {
        let s = Snapshot::zero().with(Counter::Reused, 1);
        assert_eq!(s.idle(), 0);
        let s = Snapshot::zero().with_buckets(u64::MAX);
        assert_eq!(s.buckets(), 0);
    }

    #[test]
    fn names_are_found_again_after_reopening() {
        let g = Geometry::for_names(&[b"a", b"b"], 2);
        let mut mem = memory(g.table_bytes());
        let t = table(&mut mem, g);
        let a = add(&t, b"alpha").unwrap();
        let b = add(&t, b"beta").unwrap();
        assert_eq!(add(&t, b"alpha"), Some(a));
        assert_ne!(a, b);
        t.entry(b).unwrap().slot(1).add(KEPT, 5);

        let t = reopen(&mut mem).unwrap();
        assert_eq!(t.geometry(), g);
        assert_eq!((t.find(b"alpha"), t.find(b"beta")), (Some(a), Some(b)));
        assert_eq!(t.find(b"gamma"), None);
        assert_eq!(t.entry(b).unwrap().snapshot().get(Counter::Kept), 5);
        assert_eq!(t.entry(a).unwrap().snapshot().get(Counter::Kept), 0);
        assert!(t.entry(2).is_none());
    }

    #[test]
    fn a_full_table_refuses_new_names() {
        let g = Geometry {
            capacity: 2,
            slots: 1,
            arena: 8,
        };
        let mut mem = memory(g.table_bytes());
        let t = table(&mut mem, g);
        assert!(add(&t, b"abcdefghi").is_none(), "arena");
        assert!(add(&t, b"one").is_some());
        assert!(add(&t, b"two").is_some());
        assert!(add(&t, b"six").is_none(), "capacity");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn foreign_or_damaged_memory_is_not_a_table() {
        let g = Geometry::for_names(&[], 1);
        let mut mem = memory(g.table_bytes());
        assert!(reopen(&mut mem).is_none(), "zeroes");
        let t = table(&mut mem, g);
        add(&t, b"x").unwrap();
        // SAFETY: fewer bytes than `mem` holds.
        assert!(unsafe { Table::open(mem.as_mut_ptr().cast(), g.table_bytes() - 1) }.is_none());
        // a name pointing beyond the arena in use
        // SAFETY: the first name record lies within `mem`.
        unsafe {
            let names = mem.as_mut_ptr().cast::<u8>().add(Geometry::names_offset());
            names.cast::<NameRef>().write(NameRef { offset: 1, len: 1 });
        }
        assert!(reopen(&mut mem).is_none());
    }

    #[test]
    fn plan_keeps_the_zone_while_the_names_fit() {
        const PAGE: usize = 4096;
        let names: Vec<Vec<u8>> = (0..10).map(|i| format!("u{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        let g = plan(None, &refs, 2, PAGE);
        assert_eq!(g.capacity, 32);
        let mut mem = memory(g.zone_bytes(PAGE));
        let t = table(&mut mem, g);
        for n in &refs {
            add(&t, n).unwrap();
        }

        // same names, some new ones, names repeated: the same zone
        let mut more = refs.clone();
        more.extend_from_slice(&[b"new1", b"new2", b"u3", b"new1"]);
        assert_eq!(plan(Some(&t), &more, 2, PAGE), g);

        // other worker slots: another zone
        let other = plan(Some(&t), &refs, 4, PAGE);
        assert_ne!(other.zone_bytes(PAGE), g.zone_bytes(PAGE));

        // old and new names together overflow: another zone, even though
        // the new configuration alone would get the same shape
        for i in 0..22 {
            add(&t, format!("old{i}").as_bytes()).unwrap();
        }
        let fresh: Vec<&[u8]> = vec![b"n1", b"n2", b"n3"];
        let next = plan(Some(&t), &fresh, 2, PAGE);
        assert_ne!(next.zone_bytes(PAGE), g.zone_bytes(PAGE));
        assert!(next.capacity >= fresh.len());
    }

    #[test]
    fn zone_sizes_grow_with_the_table() {
        const PAGE: usize = 4096;
        for n in [0usize, 1, 17, 100, 1000, 5000] {
            let names: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("upstream-{i}").into_bytes())
                .collect();
            let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
            for slots in [1, 2, 16] {
                let g = Geometry::for_names(&refs, slots);
                assert!(
                    g.capacity >= 2 * n && g.arena >= 2 * names.iter().map(Vec::len).sum::<usize>()
                );
                let zone = g.zone_bytes(PAGE);
                assert!(zone >= g.table_bytes() + 2 * PAGE, "{n} {slots}");
                assert_eq!(zone % PAGE, 0);
            }
        }
        // the figure of docs/directives.md: 2 workers, up to 16 upstreams, one zone of
        // a few pages
        assert!(Geometry::for_names(&[b"u"], 2).zone_bytes(PAGE) <= 32 * PAGE);
    }
}
