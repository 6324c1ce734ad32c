//! The registry of idle connections shared between the workers of one
//! nginx: a table in shared memory, in plain Rust on atomics (an nginx
//! shared zone in the module, a `Vec` in the unit tests).
//!
//! A worker that keeps a connection idle *publishes* it here (its owner's
//! identity, the owner's descriptor number, the socket's inode, the
//! connection's bucket key, `requests` and `start_time`). A worker whose
//! own cache has nothing for a request's bucket *claims* a matching entry
//! and copies the descriptor out of the owner with `pidfd_getfd(2)` (the
//! module's `share`). The socket is then the taker's; the owner's copy is
//! a stale descriptor it closes as soon as it notices.
//!
//! # The ownership protocol
//!
//! Each entry has a state word: a state and a version that grows by one
//! on every transition, so a word never comes back (no ABA):
//!
//! ```text
//!   FREE --publish (owner, CAS)--> WRITING --(owner, store)--> IDLE(v)
//!   IDLE(v) --withdraw (owner, CAS)--> FREE
//!   IDLE(v) --claim (any other worker, CAS)--> CLAIMED --finish (claimer)--> FREE
//! ```
//!
//! 1. Only the owner writes an entry's record, between FREE and IDLE
//!    (WRITING is its alone); a claimer reads it only after its claim
//!    succeeded (acquire on the CAS, release on the store of IDLE).
//! 2. A connection is used by one worker at a time. The owner keeps the
//!    ticket `IDLE(v)` of what it published, and before it uses, closes
//!    or evicts that connection it must *withdraw* it: a CAS from
//!    `IDLE(v)`. If that fails, another worker claimed it: the owner must
//!    not use it, must not `shutdown()` it (the taker's socket), and must
//!    remove it from its event loop (`EPOLL_CTL_DEL`: an epoll
//!    registration belongs to the open file description, which the taker
//!    still holds) before closing its descriptor. A worker learns of a
//!    take from its connection's idle read event (the taker's traffic
//!    wakes every epoll that watches the socket; the close handler asks
//!    the registry before it looks at the socket, so the taker's traffic
//!    is never "unexpected data") or, at the latest, its timer
//!    (`keepalive_timeout`).
//! 3. A claimer that copied the descriptor checks the socket's inode
//!    (and device) against the record: a descriptor number the owner
//!    reused can never hand over another socket. The claimer then
//!    finishes (FREE) whether the copy worked or not; an entry whose
//!    owner could not give it (gone, `ESRCH`/`EBADF`) is thereby dropped.
//!    A claimer that was refused by the kernel (`EPERM`, `ENOSYS`) puts
//!    the entry back (`IDLE(v)` again: the owner's view is unchanged)
//!    and stops sharing.
//! 4. Owners are registered in slots with an incarnation number, unique
//!    for the table's life. A worker that exits retires its slot; a
//!    claimer drops, without any system call, an entry whose owner slot
//!    no longer holds that incarnation. A worker that died without
//!    retiring (SIGKILL) leaves entries that fail the copy (its
//!    descriptors are gone) and are dropped; a worker that starts retires
//!    the slots of owners that are gone and frees their entries.
//! 5. Keys carry a configuration generation (one per configuration
//!    load, from the table) and the upstream's identity in that
//!    configuration: workers of another configuration never match.
//! 6. A connection that moved keeps, in the taker, a mark: when the taker
//!    finally closes it, it calls `shutdown(SHUT_RDWR)` first, so the
//!    backend sees a FIN whatever stale descriptors other workers still
//!    hold for a moment.
//!
//! Entries are found by the key's hash: an entry lives within
//! [`WINDOW`] places of its hash's home, so publishing and claiming are
//! bounded scans of one array of words. A connection finding no place is
//! simply not published (it stays its worker's).

use core::cell::UnsafeCell;
use core::mem::size_of;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

/// Key bytes an entry holds (socket address, then slice key).
pub const KEY_BYTES: usize = 184;
/// Owner slots: more workers (old and new generations together) than
/// this are never published for.
pub const MAX_OWNERS: usize = 512;
/// Most entries of a registry.
pub const MAX_CAPACITY: usize = 1 << 15;
/// How far from its home an entry may sit.
pub const WINDOW: usize = 32;

const MAGIC: u64 = u64::from_le_bytes(*b"KASHARE1");

const FREE: u64 = 0;
const WRITING: u64 = 1;
const IDLE: u64 = 2;
const CLAIMED: u64 = 3;

const fn word(state: u64, version: u64) -> u64 {
    version << 2 | state
}
const fn state_of(w: u64) -> u64 {
    w & 3
}
const fn version_of(w: u64) -> u64 {
    w >> 2
}
/// The word after `w`, in `state`.
const fn next(w: u64, state: u64) -> u64 {
    word(state, version_of(w) + 1)
}

/// What a connection is, as a claimer matches it: the configuration
/// generation and upstream, the bucket tag, the address and slice key.
#[derive(Clone, Copy, Debug)]
pub struct Key<'a> {
    pub generation: u64,
    pub upstream: u64,
    pub tag: u64,
    pub addr: &'a [u8],
    pub slice: &'a [u8],
}

impl Key<'_> {
    /// Whether the key fits an entry.
    pub fn fits(&self) -> bool {
        self.addr.len() + self.slice.len() <= KEY_BYTES && self.addr.len() <= u16::MAX as usize
    }

    /// 64 bits of FNV-1a over every part, never 0.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.generation.to_le_bytes());
        eat(&self.upstream.to_le_bytes());
        eat(&self.tag.to_le_bytes());
        eat(&(self.addr.len() as u64).to_le_bytes());
        eat(self.addr);
        eat(self.slice);
        h | 1
    }
}

/// Who owns an entry: an owner slot and the incarnation that held it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerId {
    pub slot: u32,
    pub incarnation: u64,
}

/// What a connection is besides its key, as the owner publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub pid: u32,
    pub fd: i32,
    pub dev: u64,
    pub ino: u64,
    pub requests: u64,
    pub start_time: u64,
}

/// An entry's record (plain data; see rule 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    generation: u64,
    upstream: u64,
    tag: u64,
    owner: OwnerId,
    socket: Socket,
    addr_len: u16,
    slice_len: u16,
    key: [u8; KEY_BYTES],
}

impl Record {
    fn matches(&self, key: &Key) -> bool {
        let addr_len = self.addr_len as usize;
        let len = addr_len + self.slice_len as usize;
        self.generation == key.generation
            && self.upstream == key.upstream
            && self.tag == key.tag
            && addr_len == key.addr.len()
            && self.slice_len as usize == key.slice.len()
            && self.key.get(..addr_len) == Some(key.addr)
            && self.key.get(addr_len..len) == Some(key.slice)
    }
}

#[repr(C)]
struct Header {
    magic: u64,
    capacity: u64,
    /// Incarnations handed out, and configuration generations.
    incarnations: AtomicU64,
    generations: AtomicU64,
}

/// An owner slot: `incarnation << 1 | alive`, and the pid holding it.
#[repr(C)]
struct Owner {
    word: AtomicU64,
    pid: AtomicU64,
}

#[repr(C)]
struct Index {
    word: AtomicU64,
    hash: AtomicU64,
}

/// The owner's receipt for a published connection: the entry and the
/// word `IDLE(v)` it left there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub index: u32,
    pub word: u64,
}

/// A claimed entry: its record, the claimer's to read, until `finish`
/// (or `restore`).
#[derive(Clone, Copy, Debug)]
pub struct Claim {
    pub index: u32,
    /// The word the claim left (CLAIMED), and the one it took (IDLE(v)).
    claimed: u64,
    idle: u64,
    pub owner: OwnerId,
    pub socket: Socket,
}

/// Why nothing was claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Scan {
    /// Entries of owners that are gone, dropped on the way.
    pub dropped: u32,
}

/// A registry in memory it was given.
#[derive(Clone, Copy, Debug)]
pub struct Registry {
    base: NonNull<u8>,
    capacity: usize,
}

// SAFETY: all shared state is reached through atomics; records are read
// and written under the protocol's exclusive states.
unsafe impl Send for Registry {}
// SAFETY: as above.
unsafe impl Sync for Registry {}

fn align_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Registry {
    fn owners_offset() -> usize {
        align_up(size_of::<Header>(), 64)
    }
    fn index_offset() -> usize {
        Self::owners_offset() + MAX_OWNERS * size_of::<Owner>()
    }
    fn records_offset(capacity: usize) -> usize {
        align_up(Self::index_offset() + capacity * size_of::<Index>(), 64)
    }

    /// Bytes of a registry of `capacity` entries (a power of two).
    pub fn bytes_for(capacity: usize) -> usize {
        Self::records_offset(capacity) + capacity * size_of::<UnsafeCell<Record>>()
    }

    /// The capacity for `connections` idle connections in all workers: a
    /// power of two, twice as many, at least `WINDOW`, at most
    /// [`MAX_CAPACITY`] (about 9 MB; connections beyond stay unpublished).
    pub fn capacity_for(connections: usize) -> usize {
        connections
            .saturating_mul(2)
            .clamp(WINDOW, MAX_CAPACITY)
            .next_power_of_two()
    }

    /// Lays out an empty registry of `capacity` entries in `bytes` bytes at
    /// `memory` (8-aligned, zeroed or not): zeroed first.
    ///
    /// # Safety
    /// `memory` must be valid for `bytes` bytes for as long as any copy of
    /// the returned registry is used, and used by nothing else.
    pub unsafe fn format(memory: *mut u8, bytes: usize, capacity: usize) -> Option<Registry> {
        if memory.is_null() || !Self::can_hold(memory, bytes, capacity) {
            return None;
        }
        // SAFETY: the caller gives the memory, at least `bytes_for` long.
        unsafe {
            core::ptr::write_bytes(memory, 0, Self::bytes_for(capacity));
            Self::format_zeroed(memory, bytes, capacity)
        }
    }

    /// [`Registry::format`] for memory known to be zeroed (fresh pages of
    /// a new shared zone): only the header is written, so that the
    /// registry's pages become resident as entries are used, not all at
    /// start (up to 9 MB, in the master and in `nginx -t`).
    ///
    /// # Safety
    /// As for [`Registry::format`], and every byte of the memory is 0.
    pub unsafe fn format_zeroed(
        memory: *mut u8,
        bytes: usize,
        capacity: usize,
    ) -> Option<Registry> {
        let base = NonNull::new(memory)?;
        if !Self::can_hold(memory, bytes, capacity) {
            return None;
        }
        // SAFETY: the caller gives the memory, zeroed: an empty registry
        // but for its header.
        unsafe {
            let header = memory.cast::<Header>();
            (*header).capacity = capacity as u64;
            (*header).magic = MAGIC;
        }
        Some(Registry { base, capacity })
    }

    /// Whether `bytes` bytes at `memory` can hold a registry of `capacity`.
    fn can_hold(memory: *mut u8, bytes: usize, capacity: usize) -> bool {
        capacity.is_power_of_two()
            && capacity >= WINDOW
            && bytes >= Self::bytes_for(capacity)
            && memory as usize % 64 == 0
    }

    /// A registry laid out before in `bytes` bytes at `memory`.
    ///
    /// # Safety
    /// As for [`Registry::format`], for memory formatted by it.
    pub unsafe fn open(memory: *mut u8, bytes: usize) -> Option<Registry> {
        let base = NonNull::new(memory)?;
        if bytes < size_of::<Header>() || memory as usize % 64 != 0 {
            return None;
        }
        // SAFETY: see above.
        let (magic, capacity) = unsafe {
            let header = memory.cast::<Header>();
            ((*header).magic, (*header).capacity as usize)
        };
        (magic == MAGIC && capacity.is_power_of_two() && bytes >= Self::bytes_for(capacity))
            .then_some(Registry { base, capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn header(&self) -> &Header {
        // SAFETY: the header is at the base (see `format`).
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    fn owner(&self, slot: usize) -> Option<&Owner> {
        if slot >= MAX_OWNERS {
            return None;
        }
        // SAFETY: slot is in bounds of the owner array.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(Self::owners_offset())
                .cast::<Owner>()
                .add(slot)
        })
    }

    fn index(&self, i: usize) -> &Index {
        let i = i & (self.capacity - 1);
        // SAFETY: i is masked into the index array.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(Self::index_offset())
                .cast::<Index>()
                .add(i)
        }
    }

    fn record(&self, i: usize) -> *mut Record {
        let i = i & (self.capacity - 1);
        // SAFETY: i is masked into the record array.
        unsafe {
            self.base
                .as_ptr()
                .add(Self::records_offset(self.capacity))
                .cast::<UnsafeCell<Record>>()
                .add(i)
                .cast::<Record>()
        }
    }

    /// A new configuration generation (the master, per configuration load).
    pub fn next_generation(&self) -> u64 {
        self.header().generations.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Registers a worker of process `pid`. Slots of owners that are gone
    /// (`alive(pid)` false, or this very pid, reused) are retired first
    /// and their entries freed. `None` when every slot is taken.
    pub fn register(&self, pid: u32, alive: impl Fn(u32) -> bool) -> Option<OwnerId> {
        self.register_with(pid, alive, |_, _| {})
    }

    /// [`Registry::register`], calling `retired(pid, entries freed)` for
    /// each owner found gone.
    pub fn register_with(
        &self,
        pid: u32,
        alive: impl Fn(u32) -> bool,
        mut retired: impl FnMut(u32, usize),
    ) -> Option<OwnerId> {
        for slot in 0..MAX_OWNERS {
            let Some(owner) = self.owner(slot) else { break };
            let w = owner.word.load(Ordering::Acquire);
            if w & 1 == 0 {
                continue;
            }
            let holder = owner.pid.load(Ordering::Acquire) as u32;
            if holder != 0 && (holder == pid || !alive(holder)) {
                self.retire(OwnerId {
                    slot: slot as u32,
                    incarnation: w >> 1,
                });
                retired(holder, self.free_entries_of(slot as u32));
            }
        }
        let incarnation = self.header().incarnations.fetch_add(1, Ordering::AcqRel) + 1;
        for slot in 0..MAX_OWNERS {
            let Some(owner) = self.owner(slot) else { break };
            let w = owner.word.load(Ordering::Acquire);
            if w & 1 != 0 {
                continue;
            }
            owner.pid.store(0, Ordering::Release);
            if owner
                .word
                .compare_exchange(w, incarnation << 1 | 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                owner.pid.store(u64::from(pid), Ordering::Release);
                return Some(OwnerId {
                    slot: slot as u32,
                    incarnation,
                });
            }
        }
        None
    }

    /// The owner is leaving: its entries are never claimed again.
    pub fn retire(&self, id: OwnerId) {
        if let Some(owner) = self.owner(id.slot as usize) {
            let _ = owner.word.compare_exchange(
                id.incarnation << 1 | 1,
                id.incarnation << 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Whether `id` still holds its slot.
    pub fn alive(&self, id: OwnerId) -> bool {
        self.owner(id.slot as usize)
            .is_some_and(|o| o.word.load(Ordering::Acquire) == id.incarnation << 1 | 1)
    }

    /// Frees the idle entries of a retired slot; how many.
    fn free_entries_of(&self, slot: u32) -> usize {
        let mut freed = 0;
        for i in 0..self.capacity {
            let index = self.index(i);
            let w = index.word.load(Ordering::Acquire);
            if state_of(w) != IDLE {
                continue;
            }
            // Claimed first (exclusive), so that the record can be read.
            if index
                .word
                .compare_exchange(w, next(w, CLAIMED), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // SAFETY: claimed: the record is this thread's to read.
            let owner = unsafe { (*self.record(i)).owner };
            let claimed = next(w, CLAIMED);
            let back = if owner.slot == slot {
                freed += 1;
                next(claimed, FREE)
            } else {
                w
            };
            index.word.store(back, Ordering::Release);
        }
        freed
    }

    /// Publishes a connection of `owner`. `None`: no room near its home,
    /// or a key that does not fit; the connection stays unpublished.
    pub fn publish(&self, owner: OwnerId, key: &Key, socket: Socket) -> Option<Ticket> {
        if !key.fits() {
            return None;
        }
        let hash = key.hash();
        let home = hash as usize;
        for step in 0..WINDOW {
            let i = home.wrapping_add(step);
            let index = self.index(i);
            let w = index.word.load(Ordering::Relaxed);
            if state_of(w) != FREE {
                continue;
            }
            let writing = next(w, WRITING);
            if index
                .word
                .compare_exchange(w, writing, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let mut bytes = [0u8; KEY_BYTES];
            let addr_len = key.addr.len();
            if let Some(dst) = bytes.get_mut(..addr_len) {
                dst.copy_from_slice(key.addr);
            }
            if let Some(dst) = bytes.get_mut(addr_len..addr_len + key.slice.len()) {
                dst.copy_from_slice(key.slice);
            }
            // SAFETY: WRITING: the record is ours alone (rule 1).
            unsafe {
                self.record(i).write(Record {
                    generation: key.generation,
                    upstream: key.upstream,
                    tag: key.tag,
                    owner,
                    socket,
                    addr_len: addr_len as u16,
                    slice_len: key.slice.len() as u16,
                    key: bytes,
                });
            }
            index.hash.store(hash, Ordering::Relaxed);
            let idle = next(writing, IDLE);
            index.word.store(idle, Ordering::Release);
            return Some(Ticket {
                index: (i & (self.capacity - 1)) as u32,
                word: idle,
            });
        }
        None
    }

    /// The owner takes its connection back (to use or close it). `false`:
    /// another worker claimed it (rule 2).
    pub fn withdraw(&self, ticket: Ticket) -> bool {
        self.index(ticket.index as usize)
            .word
            .compare_exchange(
                ticket.word,
                next(ticket.word, FREE),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Whether the connection of `ticket` is still published, unclaimed.
    pub fn published(&self, ticket: Ticket) -> bool {
        self.index(ticket.index as usize)
            .word
            .load(Ordering::Acquire)
            == ticket.word
    }

    /// Claims an idle entry of `key` owned by another than `me`. Entries
    /// of owners that are gone are dropped on the way (counted in `scan`).
    pub fn claim(&self, me: OwnerId, key: &Key, scan: &mut Scan) -> Option<Claim> {
        if !key.fits() {
            return None;
        }
        let hash = key.hash();
        let home = hash as usize;
        for step in 0..WINDOW {
            let i = home.wrapping_add(step);
            let index = self.index(i);
            let w = index.word.load(Ordering::Acquire);
            if state_of(w) != IDLE || index.hash.load(Ordering::Relaxed) != hash {
                continue;
            }
            let claimed = next(w, CLAIMED);
            if index
                .word
                .compare_exchange(w, claimed, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: claimed: the record is ours to read (rule 1).
            let record = unsafe { self.record(i).read() };
            if !record.matches(key) || record.owner.slot == me.slot {
                // Not ours to take after all: back as it was.
                index.word.store(w, Ordering::Release);
                continue;
            }
            if !self.alive(record.owner) {
                index.word.store(next(claimed, FREE), Ordering::Release);
                scan.dropped += 1;
                continue;
            }
            return Some(Claim {
                index: (i & (self.capacity - 1)) as u32,
                claimed,
                idle: w,
                owner: record.owner,
                socket: record.socket,
            });
        }
        None
    }

    /// The claimer is done with the entry (it has the connection, or the
    /// owner could not give it): free for anyone to publish into.
    pub fn finish(&self, claim: Claim) {
        self.index(claim.index as usize)
            .word
            .store(next(claim.claimed, FREE), Ordering::Release);
    }

    /// The claimer was refused by the kernel: the entry is put back as it
    /// was, the owner's ticket valid again.
    pub fn restore(&self, claim: Claim) {
        self.index(claim.index as usize)
            .word
            .store(claim.idle, Ordering::Release);
    }

    /// Idle entries now (for tests and the debug log).
    pub fn idle_entries(&self) -> usize {
        (0..self.capacity)
            .filter(|&i| state_of(self.index(i).word.load(Ordering::Relaxed)) == IDLE)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    struct Mem {
        buf: Vec<u64>,
    }

    fn registry(capacity: usize) -> (Mem, Registry) {
        let bytes = Registry::bytes_for(capacity) + 64;
        let mut mem = Mem {
            buf: vec![0xa5a5_a5a5_a5a5_a5a5; bytes / 8 + 1],
        };
        let p = mem.buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer has 64 bytes to spare for the alignment.
        let aligned = unsafe { p.add(p.align_offset(64)) };
        let bytes = Registry::bytes_for(capacity);
        // SAFETY: the buffer outlives the registry (returned with it).
        let r = unsafe { Registry::format(aligned, bytes, capacity) }.unwrap();
        (mem, r)
    }

    fn key<'a>(addr: &'a [u8], slice: &'a [u8]) -> Key<'a> {
        Key {
            generation: 1,
            upstream: 0x1000,
            tag: 7,
            addr,
            slice,
        }
    }

    fn socket(fd: i32) -> Socket {
        Socket {
            pid: 100,
            fd,
            dev: 8,
            ino: 1000 + fd as u64,
            requests: 3,
            start_time: 42,
        }
    }

    #[test]
    fn publish_then_claim_by_another_then_owner_sees_it_taken() {
        let (_m, r) = registry(64);
        publish_then_claim(r);
    }

    /// The same on memory that was zeroed (a new zone), laid out without
    /// writing more than the header: every empty entry reads as free.
    #[test]
    fn a_registry_on_zeroed_memory_is_the_same() {
        let capacity = 64;
        let mut mem = Mem {
            buf: vec![0; (Registry::bytes_for(capacity) + 64) / 8 + 1],
        };
        let p = mem.buf.as_mut_ptr() as *mut u8;
        // SAFETY: the buffer has 64 bytes to spare for the alignment, and
        // outlives the registry.
        let r = unsafe {
            let aligned = p.add(p.align_offset(64));
            Registry::format_zeroed(aligned, Registry::bytes_for(capacity), capacity)
        }
        .unwrap();
        publish_then_claim(r);
    }

    fn publish_then_claim(r: Registry) {
        let a = r.register(100, |_| true).unwrap();
        let b = r.register(200, |_| true).unwrap();
        let t = r.publish(a, &key(b"addr", b"x"), socket(5)).unwrap();
        assert!(r.published(t));
        // The owner itself does not claim its own entry.
        assert!(r
            .claim(a, &key(b"addr", b"x"), &mut Scan::default())
            .is_none());
        // Another key, another address: no match.
        assert!(r
            .claim(b, &key(b"addr", b"y"), &mut Scan::default())
            .is_none());
        assert!(r
            .claim(b, &key(b"addr2", b"x"), &mut Scan::default())
            .is_none());
        let mut other_gen = key(b"addr", b"x");
        other_gen.generation = 2;
        assert!(r.claim(b, &other_gen, &mut Scan::default()).is_none());
        assert!(r.published(t), "failed matches leave the entry as it was");

        let c = r
            .claim(b, &key(b"addr", b"x"), &mut Scan::default())
            .unwrap();
        assert_eq!(c.socket, socket(5));
        assert_eq!(c.owner, a);
        assert!(!r.published(t));
        assert!(!r.withdraw(t), "the owner cannot take back a claimed entry");
        // Nobody else can claim it twice.
        assert!(r
            .claim(b, &key(b"addr", b"x"), &mut Scan::default())
            .is_none());
        r.finish(c);
        assert!(!r.withdraw(t), "nor once the claimer is done with it");
        assert_eq!(r.idle_entries(), 0);
    }

    #[test]
    fn owner_withdraws_before_any_claim() {
        let (_m, r) = registry(64);
        let a = r.register(100, |_| true).unwrap();
        let b = r.register(200, |_| true).unwrap();
        let t = r.publish(a, &key(b"addr", b""), socket(5)).unwrap();
        assert!(r.withdraw(t));
        assert!(!r.withdraw(t), "a ticket withdraws once");
        assert!(r
            .claim(b, &key(b"addr", b""), &mut Scan::default())
            .is_none());
        // The entry is free again, and a new ticket differs.
        let t2 = r.publish(a, &key(b"addr", b""), socket(5)).unwrap();
        assert_ne!(t, t2);
        assert!(!r.withdraw(t));
        assert!(r.withdraw(t2));
    }

    #[test]
    fn restore_gives_the_owner_its_ticket_back() {
        let (_m, r) = registry(64);
        let a = r.register(100, |_| true).unwrap();
        let b = r.register(200, |_| true).unwrap();
        let t = r.publish(a, &key(b"k", b""), socket(9)).unwrap();
        let c = r.claim(b, &key(b"k", b""), &mut Scan::default()).unwrap();
        r.restore(c);
        assert!(r.published(t));
        assert!(r.withdraw(t));
    }

    #[test]
    fn retired_and_dead_owners_entries_are_never_claimed() {
        let (_m, r) = registry(64);
        let a = r.register(100, |_| true).unwrap();
        let b = r.register(200, |_| true).unwrap();
        r.publish(a, &key(b"k", b""), socket(1)).unwrap();
        r.retire(a);
        let mut scan = Scan::default();
        assert!(r.claim(b, &key(b"k", b""), &mut scan).is_none());
        assert_eq!(scan.dropped, 1);
        assert_eq!(r.idle_entries(), 0);

        // A worker killed without retiring: the next worker to start
        // finds its pid gone and frees its entries.
        let d = r.register(300, |_| true).unwrap();
        r.publish(d, &key(b"k", b""), socket(2)).unwrap();
        r.publish(d, &key(b"j", b""), socket(3)).unwrap();
        let mut seen = vec![];
        let e = r
            .register_with(400, |pid| pid != 300, |pid, n| seen.push((pid, n)))
            .unwrap();
        assert_eq!(seen, [(300, 2)]);
        assert!(!r.alive(d));
        assert!(r.alive(e) && r.alive(b));
        assert_eq!(r.idle_entries(), 0);
        assert!(r.claim(e, &key(b"k", b""), &mut Scan::default()).is_none());

        // A pid reused by a new worker retires the old holder's slot.
        let f = r.register(200, |_| true).unwrap();
        assert!(!r.alive(b));
        assert_ne!(f, b);
    }

    #[test]
    fn full_window_is_refused_not_overwritten() {
        let (_m, r) = registry(WINDOW);
        let a = r.register(1, |_| true).unwrap();
        let tickets: Vec<_> = (0..WINDOW)
            .map(|fd| r.publish(a, &key(b"k", b""), socket(fd as i32)).unwrap())
            .collect();
        assert!(r.publish(a, &key(b"k", b""), socket(99)).is_none());
        assert!(tickets.iter().all(|&t| r.published(t)));
    }

    #[test]
    fn long_keys_are_not_published() {
        let (_m, r) = registry(WINDOW);
        let a = r.register(1, |_| true).unwrap();
        let long = [b'x'; KEY_BYTES];
        assert!(r.publish(a, &key(b"a", &long), socket(1)).is_none());
        assert!(r.publish(a, &key(b"", &long), socket(1)).is_some());
    }

    #[test]
    fn open_sees_the_same_table() {
        let (m, r) = registry(32);
        let a = r.register(1, |_| true).unwrap();
        let b = r.register(2, |_| true).unwrap();
        r.publish(a, &key(b"k", b"s"), socket(4)).unwrap();
        let base = r.base.as_ptr();
        // SAFETY: the same memory, alive while `m` is.
        let again = unsafe { Registry::open(base, Registry::bytes_for(32)) }.unwrap();
        assert!(again
            .claim(b, &key(b"k", b"s"), &mut Scan::default())
            .is_some());
        // SAFETY: as above.
        assert!(unsafe { Registry::open(base, 8) }.is_none());
        drop(m);
    }

    /// Owners publish tokens and take them back (withdraw) while claimers
    /// take them: every token must end with exactly one user.
    #[test]
    fn hammer_no_connection_is_ever_used_twice() {
        const OWNERS: usize = 3;
        const TAKERS: usize = 3;
        const ROUNDS: usize = 20_000;
        let (_m, r) = registry(64);
        let tokens = ROUNDS * OWNERS;
        let users: Arc<Vec<AtomicU32>> = Arc::new((0..tokens).map(|_| AtomicU32::new(0)).collect());
        let ids: Vec<OwnerId> = (0..OWNERS + TAKERS)
            .map(|n| r.register(n as u32 + 1, |_| true).unwrap())
            .collect();
        std::thread::scope(|s| {
            for (o, &id) in ids.iter().enumerate().take(OWNERS) {
                let users = users.clone();
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        let token = (round * OWNERS + o) as i32;
                        let addr = [(round % 3) as u8];
                        let Some(t) = r.publish(id, &key(&addr, b""), socket(token)) else {
                            users[token as usize].fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        if round % 2 == 0 {
                            std::hint::spin_loop();
                        }
                        if r.withdraw(t) {
                            users[token as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            for &id in ids.iter().skip(OWNERS) {
                let users = users.clone();
                s.spawn(move || {
                    for round in 0..ROUNDS * 2 {
                        let addr = [(round % 3) as u8];
                        if let Some(c) = r.claim(id, &key(&addr, b""), &mut Scan::default()) {
                            users[c.socket.fd as usize].fetch_add(1, Ordering::Relaxed);
                            r.finish(c);
                        }
                    }
                });
            }
        });
        // Entries left published were neither withdrawn nor claimed.
        let left = r.idle_entries();
        let used: Vec<u32> = users.iter().map(|u| u.load(Ordering::Relaxed)).collect();
        assert!(used.iter().all(|&n| n <= 1), "a token used twice");
        assert_eq!(used.iter().filter(|&&n| n == 0).count(), left);
    }
}
