//! The per-upstream cache of idle connections, in safe Rust.
//!
//! Everything is sized when the configuration is read and never grows: an
//! arena of `capacity` [`IdleSlot`]s linked by index into one global LRU list
//! and into per-[`Bucket`] lists, a pool of buckets with their key storage,
//! and a chained hash table over the buckets. A bucket is the set of idle
//! connections that one request may take: same server address, same slice
//! key (when sliced), same location tag (with `local`). Every operation is
//! O(1) expected (the spare list below: amortised); nothing scans the
//! whole cache.
//!
//! Unsliced, as in nginx's own cache: `capacity` + 1 buckets (by server
//! address and location tag), so a connection always finds a bucket, and
//! only the LRU eviction of connections closes any. A bucket whose last
//! idle connection leaves is *spare*: it stays in the table under its key,
//! so the connection that comes back (a request takes it, then stores it)
//! finds it again without hashing a key into a new bucket, and it is
//! given to a new key, the one spare longest first, only when no bucket is
//! free. Spare buckets count as free (`buckets_in_use`). A bucket that
//! holds connections again stays in the spare list until a new key looks
//! there, and the bucket found last is tried before hashing: a request to
//! a lone server neither hashes nor moves a bucket between lists.
//!
//! Sliced, the key comes from the client (`$host`), so keys seen once must
//! not push out keys in steady use. A bucket belongs to its key until the
//! pool needs it for another key: it stays in the table, empty, while its
//! connections are taken (they will come back to it). The buckets are
//! managed as in S3-FIFO (Yang et al., SOSP 2023), which requests only
//! touch through a counter:
//!
//! - *probation*: a FIFO queue of new keys, with a separate FIFO of
//!   probation buckets whose idle connections were all closed (evicted,
//!   timed out, closed by the server): those go first;
//! - *protected*: keys requested twice more while in probation (moved there
//!   when they reach the end of probation), and keys coming back soon after
//!   losing their bucket in probation (a "ghost", a fingerprint of the key
//!   in a small direct-mapped table); a CLOCK: a bucket at the end goes
//!   round again, one count of requests fewer, as long as it has any.
//!
//! A new key takes a free bucket, else a closed-empty bucket of probation,
//! else, while probation holds at least 1/5 of the pool, the oldest bucket
//! of probation (promoting the ones requested twice instead), else the
//! first protected bucket not requested for a whole round. Its idle
//! connections are closed. Keys seen once, however fast they come, thus
//! only take buckets from each other. When the cache of connections is
//! full, the least recently stored connection is evicted, unless it is a
//! protected key's: then probation's oldest bucket gives one up, if it has
//! any.
//!
//! The cache does not know what a connection is (`C` is an nginx connection
//! pointer in the module and an integer in the unit tests), so it can be
//! tested without nginx.

/// Longest socket address; `sockaddr_un` (110 bytes) is the largest.
pub const MAX_SOCKADDR_LEN: usize = 128;

/// Longest TLS identity of a connection (see `identity`): its SNI name,
/// verification settings and client certificate. Any host name up to 245
/// bytes fits, or a name and variable certificate paths together.
pub const MAX_TLS_IDENTITY: usize = 256;

/// Longest address a bucket keeps: a socket address, or for a TLS
/// connection a 4-byte header, the socket address and its TLS identity.
pub const MAX_ADDR_LEN: usize = 4 + MAX_SOCKADDR_LEN + MAX_TLS_IDENTITY;

/// Where a bucket's address goes when it is longer than the cache's
/// inline room (a TLS address: socket address and TLS identity): `room`
/// bytes per bucket inline, with the bucket records, and a longer address
/// whole in the *overflow*, a separate store of [`Shape::overflow_len`]
/// bytes that the owner provides. The module maps it from the kernel at
/// configuration time, so that it is resident only where a long address
/// was written: an upstream that never keeps one holds none of it.
///
/// `AsRef`/`AsMut` of bytes: a `Box<[u8]>` in the tests, a mapping in the
/// module. A store shorter than asked for holds no long address: such
/// connections are not kept ([`Refusal::Unusable`]).
pub trait Overflow: AsRef<[u8]> + AsMut<[u8]> {}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Overflow for T {}

/// The sizes of a cache, fixed at configuration time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Idle connections held at most.
    pub capacity: usize,
    /// Buckets: sliced, `slice_poolsize` (at most 2N + 1); unsliced N + 1.
    pub buckets: usize,
    /// Slice key bytes kept per bucket (0 unsliced).
    pub keylen: usize,
    pub sliced: bool,
    /// Address bytes kept inline per bucket: the longest socket address
    /// the upstream's servers have (16 for IPv4 alone), at most
    /// [`MAX_ADDR_LEN`]; longer addresses are kept whole in the overflow.
    pub room: usize,
}

impl Shape {
    /// A sliced cache of `capacity` connections in `poolsize` buckets of
    /// `keylen` key bytes, with room for the longest address inline.
    pub fn sliced(capacity: usize, poolsize: usize, keylen: usize) -> Shape {
        Shape {
            capacity,
            buckets: poolsize,
            keylen,
            sliced: true,
            room: MAX_ADDR_LEN,
        }
    }

    /// An unsliced cache of `capacity` connections (N + 1 buckets), with
    /// room for the longest address inline.
    pub fn unsliced(capacity: usize) -> Shape {
        Shape {
            capacity,
            buckets: capacity.saturating_add(1),
            keylen: 0,
            sliced: false,
            room: MAX_ADDR_LEN,
        }
    }

    /// The same with `room` address bytes inline (at most MAX_ADDR_LEN).
    pub fn with_room(self, room: usize) -> Shape {
        Shape {
            room: room.min(MAX_ADDR_LEN),
            ..self
        }
    }

    /// Bytes of overflow a cache of this shape uses at most: room for the
    /// longest address per bucket (an address longer than the inline room
    /// is kept there whole, compared in one piece); none when every
    /// address fits inline.
    pub fn overflow_len(&self) -> Option<usize> {
        if self.room >= MAX_ADDR_LEN {
            return Some(0);
        }
        self.buckets.checked_mul(MAX_ADDR_LEN)
    }
}

use core::num::NonZeroU32;

use hash::{same, Mix};

mod hash;
mod policy;

const NIL: u32 = u32::MAX;

/// The address length of a bucket that no key owns: longer than any.
const NO_ADDR: u16 = u16::MAX;

/// Set in a bucket's address length when the address is longer than the
/// inline room and kept in the overflow: such a length equals no key's,
/// so a comparison of lengths alone tells a plain key (every request to a
/// lone server) that the bucket's address is not inline.
const LONG: u16 = 0x8000;

/// The lists of buckets (`Bucket::list`), each a FIFO from head (newest)
/// to tail (next to go).
const PROTECTED: u8 = 0;
/// New keys.
const PROBATION: u8 = 1;
/// Probation buckets whose idle connections were all closed.
const EMPTY: u8 = 2;
/// Unsliced buckets without idle connections, still under their key.
const SPARE: u8 = 3;
/// Free, or holding connections in an unsliced cache.
const NO_LIST: u8 = 4;

/// Requests counted per bucket (saturating), and how many of them, in
/// probation, make a key protected.
const MAX_HITS: u8 = 3;
const HITS_TO_PROTECT: u8 = 2;

/// At most this many buckets are moved (promoted, or sent round in
/// protected) to find the one a new key takes: O(1) whatever the pool.
const VICTIM_STEPS: usize = 16;

/// What identifies a bucket: the server address as nginx stores it (for a
/// TLS connection followed by its TLS identity, `identity::tls_address`),
/// the evaluated slice key (empty when not sliced) and a tag: the location
/// with `local`, otherwise the protocol handler.
#[derive(Clone, Copy, Debug)]
pub struct BucketKey<'a> {
    pub addr: &'a [u8],
    pub slice: &'a [u8],
    pub tag: usize,
}

/// Why a connection was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The per-bucket limit is 0.
    ZeroLimit,
    /// Its bucket already holds as many idle connections as allowed.
    BucketFull { limit: usize },
    /// It needs a bucket and the pool has none at all (`slice_poolsize=0`).
    NoBuckets,
    /// The cache holds no connections at all (`keepalive 0`), or the
    /// address is longer than [`MAX_ADDR_LEN`] (or than the inline room,
    /// without an overflow).
    Unusable,
}

/// Where a stored connection went, and whether its key took the bucket of
/// another key (with how many idle connections of that key were closed).
/// The connections evicted are handed to the caller of [`IdleCache::store`]
/// one by one, for closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    pub slot: usize,
    pub reclaimed: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
struct IdleSlot<C> {
    conn: Option<C>,
    bucket: u32,
    /// Global LRU list: head is the most recently stored.
    lru_prev: u32,
    lru_next: u32,
    /// The bucket's own list (also most recent first); `bucket_next` doubles
    /// as the free-list link while the slot is unused.
    bucket_prev: u32,
    bucket_next: u32,
}

/// A bucket found for a key: a request takes from it in get peer and
/// stores into it in free peer without hashing and looking the key up
/// again. The bucket may change keys in between (its connections closed,
/// or taken by another key): it is used only if it has not left that key
/// since, which its generation tells without comparing the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketRef {
    /// The bucket's index.
    index: u32,
    /// The bucket's generation when it was found (never 0: an
    /// `Option<BucketRef>` takes eight bytes).
    generation: NonZeroU32,
}

impl BucketRef {
    fn bucket(self) -> u32 {
        self.index
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    hash: u32,
    tag: usize,
    /// Next bucket in the same hash chain, or in the free list.
    chain_next: u32,
    /// Most and least recently stored slots of this bucket.
    head: u32,
    tail: u32,
    count: u32,
    /// Neighbours in its list, towards the head and the tail.
    prev: u32,
    next: u32,
    /// Counts the keys the bucket has left (`unchain`): a `BucketRef` of
    /// the same generation still holds its key. (A stale reference could
    /// match again only after 2^32 changes of this one bucket's key within
    /// one try of one request.)
    generation: NonZeroU32,
    slice_len: u16,
    /// The address's length; with `LONG` set, in the overflow.
    addr_len: u16,
    list: u8,
    /// Requests that found this bucket (at most MAX_HITS): in probation
    /// since it entered, in protected since it last went round.
    hits: u8,
}

/// Head (newest), tail (next to go) and length of a bucket list.
#[derive(Clone, Copy, Debug)]
struct Ends {
    head: u32,
    tail: u32,
    len: u32,
}

/// The idle-connection cache of one upstream in one worker.
#[derive(Debug)]
pub struct IdleCache<C, O = Box<[u8]>> {
    slots: Box<[IdleSlot<C>]>,
    /// The buckets made so far, in room reserved for `poolsize`; a new key
    /// makes one while there is room, and a bucket once made is never
    /// freed (an emptied one stays in the table, or is taken over).
    buckets: Vec<Bucket>,
    /// `room` bytes of address per bucket made; longer addresses whole in
    /// `overflow`, at `MAX_ADDR_LEN` bytes per bucket.
    addrs: Vec<u8>,
    /// (`u16`, as `b` is `u32`: the offset of a bucket's address cannot
    /// overflow, and the plain path checks nothing for it.)
    room: u16,
    overflow: O,
    /// `keylen` bytes of slice key per bucket made.
    slices: Vec<u8>,
    keylen: usize,
    poolsize: usize,
    table: Box<[u32]>,
    lru_head: u32,
    lru_tail: u32,
    free_slot: u32,
    buckets_in_use: usize,
    /// Buckets stay their keys' when emptied, managed in `lists`.
    sliced: bool,
    /// Unsliced: the bucket found last, tried before the key is hashed (an
    /// upstream of one server has one bucket per protocol and identity);
    /// NIL before any.
    recent: u32,
    /// PROTECTED, PROBATION and EMPTY (sliced only), SPARE (unsliced only).
    lists: [Ends; 4],
    /// New keys take probation's buckets while it has this many.
    probation_min: u32,
    /// Fingerprints of keys whose bucket was taken from them in probation,
    /// indexed by hash (sliced only).
    ghosts: Box<[u32]>,
}

impl<C: Copy> IdleCache<C> {
    /// A sliced cache: `capacity` idle connections spread over at most
    /// `poolsize` buckets, slice keys cut to `keylen` bytes; probation
    /// keeps at least 1/5 of the buckets, protected the rest. Every
    /// address is kept inline.
    ///
    /// `None` if the sizes are beyond what the index links can address or
    /// the memory cannot be allocated: the configuration is refused, nginx
    /// does not abort.
    pub fn new(capacity: usize, poolsize: usize, keylen: usize) -> Option<Self> {
        Self::shaped(Shape::sliced(capacity, poolsize, keylen), Box::default())
    }

    /// An unsliced cache, as nginx's own: buckets by server address (and
    /// location tag) only, `capacity` + 1 of them, spare when emptied.
    pub fn unsliced(capacity: usize) -> Option<Self> {
        capacity.checked_add(1)?;
        Self::shaped(Shape::unsliced(capacity), Box::default())
    }
}

impl<C: Copy, O: Overflow> IdleCache<C, O> {
    /// A cache of `shape`, its addresses beyond `shape.room` bytes kept in
    /// `overflow` (which should hold [`Shape::overflow_len`] bytes; a
    /// shorter one keeps no longer address). `None` as for
    /// [`IdleCache::new`].
    pub fn shaped(shape: Shape, overflow: O) -> Option<Self> {
        let Shape {
            capacity,
            buckets: poolsize,
            keylen,
            sliced,
            room,
        } = shape;
        if capacity >= NIL as usize
            || poolsize >= NIL as usize
            || keylen > u16::MAX as usize
            || room > MAX_ADDR_LEN
        {
            return None;
        }
        let link = |i: usize, n: usize| if i + 1 < n { (i + 1) as u32 } else { NIL };

        let slots = boxed_slice(capacity, |i| IdleSlot {
            conn: None,
            bucket: NIL,
            lru_prev: NIL,
            lru_next: NIL,
            bucket_prev: NIL,
            bucket_next: link(i, capacity),
        })?;

        // Buckets are made as keys need them (see `make_bucket`), in
        // memory reserved here: pages of it never written are never
        // resident, so a cache uses the memory of the keys it has seen.
        let buckets = reserved(poolsize)?;
        let addrs = reserved(poolsize.checked_mul(room)?)?;
        let slices = reserved(poolsize.checked_mul(keylen)?)?;

        // Load factor at most 1/2, power of two so a mask picks the chain.
        let table_len = poolsize.checked_mul(2)?.checked_next_power_of_two()?.max(1);
        let no_list = Ends {
            head: NIL,
            tail: NIL,
            len: 0,
        };

        Some(IdleCache {
            slots,
            buckets,
            addrs,
            room: room as u16,
            overflow,
            slices,
            keylen,
            poolsize,
            table: boxed_slice(table_len, |_| NIL)?,
            lru_head: NIL,
            lru_tail: NIL,
            free_slot: if capacity > 0 { 0 } else { NIL },
            buckets_in_use: 0,
            sliced,
            recent: NIL,
            lists: [no_list; 4],
            probation_min: (poolsize / 5).max(1) as u32,
            ghosts: boxed_slice(if sliced { table_len } else { 0 }, |_| 0)?,
        })
    }

    /// Bytes allocated for this cache: everything it will ever use, sized
    /// with the configuration (docs/directives.md, "Limits and memory"),
    /// but for the overflow, which its owner provides.
    pub fn memory_bytes(&self) -> usize {
        use core::mem::size_of;
        self.slots.len() * size_of::<IdleSlot<C>>()
            + self.poolsize * (size_of::<Bucket>() + self.room as usize + self.keylen)
            + self.table.len() * size_of::<u32>()
            + self.ghosts.len() * size_of::<u32>()
    }

    /// Idle connections held, counted along the LRU list: O(n), for tests
    /// (the cache keeps no count it does not need).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let mut n = 0;
        let mut slot = self.lru_head;
        while slot != NIL {
            n += 1;
            slot = self.slots[slot as usize].lru_next;
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.lru_head == NIL
    }

    /// Buckets owned by a key, holding idle connections or not (unsliced:
    /// holding idle connections; spare ones are free).
    pub fn buckets_in_use(&self) -> usize {
        self.buckets_in_use
    }

    /// Idle connections in the bucket of `key`.
    pub fn bucket_len(&self, key: &BucketKey) -> usize {
        match self.find_bucket(key, self.hash(key)) {
            NIL => 0,
            b => self.buckets[b as usize].count as usize,
        }
    }

    /// Whether `key` owns a bucket, empty or not (unsliced: one holding
    /// idle connections).
    pub fn has_bucket(&self, key: &BucketKey) -> bool {
        match self.find_bucket(key, self.hash(key)) {
            NIL => false,
            b => self.sliced || self.buckets[b as usize].count > 0,
        }
    }

    /// Takes the most recently stored connection of `key`'s bucket.
    /// Sliced, finding the bucket counts as a request of the key, even when
    /// it is empty, and the bucket stays the key's when its last connection
    /// is taken.
    #[inline]
    pub fn take(&mut self, key: &BucketKey) -> Option<C> {
        let found = self.find(key)?;
        self.take_from(found)
    }

    /// The bucket `key` owns, if any, for [`IdleCache::take_from`] and
    /// [`IdleCache::store_at`].
    #[inline]
    pub fn find(&mut self, key: &BucketKey) -> Option<BucketRef> {
        if self.sliced {
            return self.bucket_ref(self.find_bucket(key, self.hash(key)));
        }
        // The bucket found last, if it still holds the key (a bucket that
        // changed keys, or is free, does not).
        let b = self.recent;
        if let Some(bucket) = self.buckets.get(b as usize) {
            if self.holds_in(bucket, b, key) {
                return Some(BucketRef {
                    index: b,
                    generation: bucket.generation,
                });
            }
        }
        self.find_hashed(key)
    }

    /// [`IdleCache::find`] by the key's hash, without trying the bucket
    /// found last first (unsliced: after [`IdleCache::take_recent`]).
    #[inline(always)]
    pub fn find_hashed(&mut self, key: &BucketKey) -> Option<BucketRef> {
        let b = self.find_bucket(key, self.hash(key));
        if b != NIL && !self.sliced {
            self.recent = b;
        }
        self.bucket_ref(b)
    }

    /// Unsliced, for a key without a slice key: [`IdleCache::find`] when
    /// the bucket found last is the key's (every request to a lone
    /// server), without building the key. `None` otherwise: the caller
    /// then finds the bucket by the whole key ([`IdleCache::find_hashed`]),
    /// as it does for an address kept in the overflow.
    #[inline(always)]
    pub fn recent(&self, addr: &[u8], tag: usize) -> Option<BucketRef> {
        if self.sliced {
            return None;
        }
        let b = self.recent;
        let bucket = self.buckets.get(b as usize)?;
        // A free bucket's address length is NO_ADDR, and a long address's
        // has LONG: no socket address has either, and an equal length is
        // an inline address.
        if bucket.tag != tag
            || bucket.addr_len as usize != addr.len()
            || !self.same_inline(b, bucket.addr_len, addr)
        {
            return None;
        }
        Some(BucketRef {
            index: b,
            generation: bucket.generation,
        })
    }

    /// [`IdleCache::recent`] and [`IdleCache::take_from`] the bucket at
    /// once: the bucket, and a connection taken from it.
    #[inline(always)]
    pub fn take_recent(&mut self, addr: &[u8], tag: usize) -> Option<(BucketRef, Option<C>)> {
        let found = self.recent(addr, tag)?;
        let head = self.buckets.get(found.bucket() as usize)?.head;
        Some((found, self.unlink_slot(head as usize, false)))
    }

    /// A reference to bucket `b` as it is now; `None` for NIL.
    #[inline(always)]
    fn bucket_ref(&self, b: u32) -> Option<BucketRef> {
        let generation = self.buckets.get(b as usize)?.generation;
        Some(BucketRef {
            index: b,
            generation,
        })
    }

    /// [`IdleCache::take`] from the bucket just found for the key.
    #[inline(always)]
    pub fn take_from(&mut self, found: BucketRef) -> Option<C> {
        let b = found.bucket();
        let bucket = self.buckets.get_mut(b as usize)?;
        if self.sliced {
            bucket.hits = (bucket.hits + 1).min(MAX_HITS);
        }
        // An empty bucket's head is NIL, which is no slot.
        let slot = bucket.head;
        self.unlink_slot(slot as usize, false)
    }

    /// Stores `conn` in `key`'s bucket, which may hold at most `limit` idle
    /// connections. A key without a bucket takes a free one or the bucket
    /// of a less valuable key (see the module's documentation); when the
    /// cache is full, a connection is evicted. Each connection pushed out
    /// is passed to `evicted`, for closing, before this returns.
    #[inline]
    pub fn store(
        &mut self,
        key: &BucketKey,
        conn: C,
        limit: usize,
        evicted: impl FnMut(C),
    ) -> Result<Stored, Refusal> {
        self.store_at(None, key, conn, limit, evicted)
    }

    /// [`IdleCache::store_at`] without the key, in the common case: the
    /// key still owns bucket `known` (found for it by [`IdleCache::find`])
    /// and there is a free slot. Returns the slot, or why the connection
    /// was refused; `None` when the key is needed (the bucket changed keys,
    /// or room must be made): then `store_at` does all.
    #[inline(always)]
    pub fn store_known(
        &mut self,
        known: BucketRef,
        conn: C,
        limit: usize,
    ) -> Option<Result<usize, Refusal>> {
        let b = known.bucket();
        let bucket = self.buckets.get(b as usize)?;
        if bucket.generation != known.generation || self.free_slot == NIL {
            return None;
        }
        // One comparison for both refusals (unsliced, the limit is
        // usize::MAX: never).
        if bucket.count as usize >= limit {
            return Some(Err(if limit == 0 {
                Refusal::ZeroLimit
            } else {
                Refusal::BucketFull { limit }
            }));
        }
        let list = bucket.list;
        let slot = self.link_slot(b, conn);
        if self.sliced && list == EMPTY {
            self.move_to_front(b, PROBATION);
        }
        Some(Ok(slot as usize))
    }

    /// [`IdleCache::store`], with the bucket `known` found earlier for the
    /// same key (by [`IdleCache::find`] with an equal key: it is not
    /// compared again): if the key still owns it, the key is not looked up
    /// again.
    #[inline]
    pub fn store_at(
        &mut self,
        known: Option<BucketRef>,
        key: &BucketKey,
        conn: C,
        limit: usize,
        mut evicted: impl FnMut(C),
    ) -> Result<Stored, Refusal> {
        if let Some(done) = known.and_then(|r| self.store_known(r, conn, limit)) {
            debug_assert!(known.is_some_and(|r| self.holds(r.bucket(), key)));
            return done.map(|slot| Stored {
                slot,
                reclaimed: None,
            });
        }
        // A bucket the key still owns: the cache holds connections and the
        // address fits (the key was stored before).
        let owned = known.and_then(|r| {
            let b = r.bucket();
            let bucket = self.buckets.get(b as usize)?;
            debug_assert!(bucket.generation != r.generation || self.holds(b, key));
            (bucket.generation == r.generation).then_some((b, bucket.hash))
        });
        let (found, hash) = match owned {
            Some(found) => found,
            None => {
                if self.slots.is_empty() || !self.fits(key.addr) {
                    return Err(Refusal::Unusable);
                }
                self.look_up(key)
            }
        };
        if limit == 0 {
            return Err(Refusal::ZeroLimit);
        }
        // (Unsliced, the limit is the whole cache: not compared.)
        if limit != usize::MAX
            && found != NIL
            && self.buckets[found as usize].count as usize >= limit
        {
            return Err(Refusal::BucketFull { limit });
        }
        let mut reclaimed = None;
        let b = if found != NIL && self.free_slot != NIL {
            found
        } else {
            match self.make_room(key, hash, found, &mut evicted, &mut reclaimed) {
                NIL => return Err(Refusal::NoBuckets),
                b => b,
            }
        };

        let list = self.buckets[b as usize].list;
        let slot = self.link_slot(b, conn);

        if self.sliced {
            if found == NIL {
                // A key coming back soon after losing its bucket in
                // probation was in use: protected at once.
                let to = if self.is_ghost(hash) {
                    PROTECTED
                } else {
                    PROBATION
                };
                self.push_front(b, to);
            } else if list == EMPTY {
                self.move_to_front(b, PROBATION);
            }
        }

        Ok(Stored {
            slot: slot as usize,
            reclaimed,
        })
    }

    /// Links `conn` into a free slot (there must be one) at the head of
    /// bucket `b` and of the LRU list; returns the slot.
    #[inline(always)]
    fn link_slot(&mut self, b: u32, conn: C) -> u32 {
        // Borrowed apart, as in `unlink_slot`.
        let slots = &mut *self.slots;
        let bucket = &mut self.buckets[b as usize];
        let slot = self.free_slot;
        let old_head = bucket.head;
        let lru_head = self.lru_head;
        {
            let s = &mut slots[slot as usize];
            self.free_slot = s.bucket_next;
            s.conn = Some(conn);
            s.bucket = b;
            s.bucket_prev = NIL;
            s.bucket_next = old_head;
            s.lru_prev = NIL;
            s.lru_next = lru_head;
        }
        match old_head {
            NIL => {
                bucket.tail = slot;
                if !self.sliced {
                    // Unsliced, a bucket in use is one holding
                    // connections. A spare one stays in the spare list,
                    // which `acquire_bucket` skips it in: a connection that
                    // leaves and comes back (every request to a lone
                    // server) moves no bucket between lists.
                    self.buckets_in_use += 1;
                }
            }
            h => slots[h as usize].bucket_prev = slot,
        }
        bucket.head = slot;
        bucket.count += 1;

        match lru_head {
            NIL => self.lru_tail = slot,
            h => slots[h as usize].lru_prev = slot,
        }
        self.lru_head = slot;
        slot
    }

    /// Removes the connection in `slot` (closed by the backend, timed out,
    /// closed at shutdown, or evicted). Unsliced, its bucket goes back to
    /// the pool when this was its last connection; sliced, it stays its
    /// key's, and in probation it is the first to go when a new key needs
    /// one. `None` if the slot was already free.
    pub fn remove(&mut self, slot: usize) -> Option<C> {
        self.unlink_slot(slot, true)
    }

    /// The bucket for the connection `store` keeps, when the key has none
    /// or the cache is full: a free or reclaimed bucket (see
    /// `acquire_bucket`), and a free slot. NIL when there is no bucket.
    #[inline(always)]
    fn make_room(
        &mut self,
        key: &BucketKey,
        hash: u32,
        found: u32,
        evicted: &mut impl FnMut(C),
        reclaimed: &mut Option<usize>,
    ) -> u32 {
        if self.sliced {
            // Taking a bucket from another key may free slots; if not, a
            // connection is evicted (buckets stay owned when emptied).
            let b = match found {
                NIL => self.acquire_bucket(key, hash, evicted, reclaimed),
                b => b,
            };
            if b != NIL && self.free_slot == NIL {
                self.evict_one(evicted);
            }
            b
        } else {
            // As nginx: the least recently stored connection goes first; if
            // it was the last of `found`, that bucket is spare, still the
            // key's.
            if self.free_slot == NIL {
                if let Some(c) = self.remove(self.lru_tail as usize) {
                    evicted(c);
                }
            }
            match found {
                NIL => self.acquire_bucket(key, hash, evicted, reclaimed),
                b => b,
            }
        }
    }

    /// Unlinks the connection in `slot` from the LRU list and its bucket,
    /// and frees the slot; `closed` unless taken for a request (or leaving
    /// with its bucket). `None` if there is no such connection.
    #[inline(always)]
    fn unlink_slot(&mut self, slot: usize, closed: bool) -> Option<C> {
        // The arrays borrowed apart from the rest: their pointers and
        // lengths are loaded once, and a bound checked once holds.
        let slots = &mut *self.slots;
        let s = *slots.get(slot)?;
        let conn = s.conn?;
        let slot = slot as u32;

        match s.lru_prev {
            NIL => self.lru_head = s.lru_next,
            p => slots[p as usize].lru_next = s.lru_next,
        }
        match s.lru_next {
            NIL => self.lru_tail = s.lru_prev,
            n => slots[n as usize].lru_prev = s.lru_prev,
        }

        let b = s.bucket as usize;
        let bucket = &mut self.buckets[b];
        match s.bucket_prev {
            NIL => bucket.head = s.bucket_next,
            p => slots[p as usize].bucket_next = s.bucket_next,
        }
        match s.bucket_next {
            NIL => bucket.tail = s.bucket_prev,
            n => slots[n as usize].bucket_prev = s.bucket_prev,
        }
        bucket.count -= 1;
        let emptied = bucket.count == 0;
        let list = bucket.list;

        // A free slot is one without a connection; its other links are
        // written when it is stored into again.
        let free = &mut slots[slot as usize];
        free.conn = None;
        free.bucket_next = self.free_slot;
        self.free_slot = slot;

        if emptied {
            self.emptied(b as u32, list, closed);
        }
        Some(conn)
    }

    /// Bucket `b` lost its last idle connection. It stays its key's:
    /// unsliced, as a spare bucket; sliced, in its list, and in probation,
    /// when its connections were closed rather than taken, it goes first.
    #[inline(always)]
    fn emptied(&mut self, b: u32, list: u8, closed: bool) {
        if !self.sliced {
            // Already there if it was spare before its last connection.
            if list != SPARE {
                self.push_front(b, SPARE);
            }
            self.buckets_in_use -= 1;
        } else if closed && list == PROBATION {
            self.move_to_front(b, EMPTY);
        }
    }

    #[inline(always)]
    fn hash(&self, key: &BucketKey) -> u32 {
        // Eight bytes at a time (FxHash's step), both lengths mixed in
        // first so that address and key cannot run into each other. No
        // per-process seed: a chain never holds more than the pool's
        // buckets, whatever the keys. (Byte-at-a-time FNV cost ~25
        // dependent multiplies for a sockaddr_in alone.)
        let slice = self.cut(key.slice);
        let mut h = Mix(key.tag as u64);
        h.word(key.addr.len() as u64 | (slice.len() as u64) << 32);
        h.bytes(key.addr);
        h.bytes(slice);
        // The table index takes the low bits; fold the well-mixed high half
        // of the last product into them (32 bits kept: a bucket record
        // stays 48 bytes).
        (h.0 ^ (h.0 >> 32)) as u32
    }

    /// The slice key as the cache keeps it: cut to `keylen` bytes (none
    /// unsliced; said first so that code which knows the cache unsliced
    /// drops the rest).
    #[inline(always)]
    fn cut<'k>(&self, slice: &'k [u8]) -> &'k [u8] {
        if !self.sliced {
            return &[];
        }
        &slice[..slice.len().min(self.keylen)]
    }

    #[inline(always)]
    fn chain(&self, hash: u32) -> usize {
        (hash as usize) & (self.table.len() - 1)
    }

    /// Whether bucket `b`, whose address length is `len` (as the bucket
    /// keeps it), has address `addr`: inline, or with `LONG` whole in the
    /// overflow.
    #[inline(always)]
    fn same_addr(&self, b: u32, len: u16, addr: &[u8]) -> bool {
        if len & LONG == 0 {
            return self.same_inline(b, len, addr);
        }
        // (A free bucket's NO_ADDR has LONG too, and a length beyond any
        // address kept.)
        let (start, len) = (b as usize * MAX_ADDR_LEN, (len & !LONG) as usize);
        len <= MAX_ADDR_LEN
            && self
                .overflow
                .as_ref()
                .get(start..start + len)
                .is_some_and(|kept| same(kept, addr))
    }

    /// [`IdleCache::same_addr`] for a bucket whose address is inline
    /// (`len` without `LONG`).
    #[inline(always)]
    fn same_inline(&self, b: u32, len: u16, addr: &[u8]) -> bool {
        let start = b as usize * self.room as usize;
        same(&self.addrs[start..start + len as usize], addr)
    }

    /// The address length a bucket keeps for `addr`: with `LONG` when it
    /// is longer than the inline room; `NO_ADDR` (no bucket's) beyond the
    /// longest address kept.
    #[inline(always)]
    fn kept_len(&self, addr: &[u8]) -> u16 {
        match addr.len() {
            n if n <= self.room as usize => n as u16,
            n if n <= MAX_ADDR_LEN => LONG | n as u16,
            _ => NO_ADDR,
        }
    }

    /// Whether an address of this length can be kept: inline, or in an
    /// overflow that is there.
    fn fits(&self, addr: &[u8]) -> bool {
        addr.len() <= self.room as usize
            || (addr.len() <= MAX_ADDR_LEN
                && self.overflow.as_ref().len() >= self.poolsize * MAX_ADDR_LEN)
    }

    /// Writes `addr` as bucket `b`'s (it [`IdleCache::fits`]).
    fn put_addr(&mut self, b: usize, addr: &[u8]) {
        if addr.len() <= self.room as usize {
            let start = b * self.room as usize;
            self.addrs[start..start + addr.len()].copy_from_slice(addr);
        } else {
            let start = b * MAX_ADDR_LEN;
            self.overflow.as_mut()[start..start + addr.len()].copy_from_slice(addr);
        }
    }

    /// Whether bucket `b`'s slice key is `slice` (already cut); an
    /// unsliced key, empty, is compared by its length alone.
    #[inline(always)]
    fn same_slice(&self, b: usize, slice: &[u8]) -> bool {
        // Unsliced, every bucket's slice key is empty, as every key's.
        if !self.sliced {
            return true;
        }
        if slice.is_empty() {
            return self.buckets[b].slice_len == 0;
        }
        same(self.slice_of(b), slice)
    }

    #[inline(always)]
    fn slice_of(&self, b: usize) -> &[u8] {
        let start = b * self.keylen;
        &self.slices[start..start + self.buckets[b].slice_len as usize]
    }

    /// Whether bucket `b`, in the table (a free bucket's address is
    /// `NO_ADDR`, which no key has), holds `key`. The hash is not
    /// compared: `key` is assumed to have it when it matches.
    #[inline(always)]
    fn holds(&self, b: u32, key: &BucketKey) -> bool {
        self.holds_in(&self.buckets[b as usize], b, key)
    }

    /// [`IdleCache::holds`] with bucket `b` at hand.
    #[inline(always)]
    fn holds_in(&self, bucket: &Bucket, b: u32, key: &BucketKey) -> bool {
        bucket.tag == key.tag
            // Equal lengths are kept alike, inline or long.
            && (bucket.addr_len & !LONG) as usize == key.addr.len()
            && self.same_addr(b, bucket.addr_len, key.addr)
            && self.same_slice(b as usize, self.cut(key.slice))
    }

    #[inline(always)]
    fn find_bucket(&self, key: &BucketKey, hash: u32) -> u32 {
        // The first of the chain inline (a chain is one bucket long, or
        // empty, at a load of at most 1/2), the others out of line.
        let first = self.table[self.chain(hash)];
        if first == NIL || self.is_bucket_of(first, key, hash) {
            return first;
        }
        self.find_further(first, key, hash)
    }

    /// The bucket of `key` (NIL if none) and its hash, out of line: free
    /// peer stores into the bucket get peer found, and looks up only when
    /// there was none.
    #[inline(never)]
    fn look_up(&self, key: &BucketKey) -> (u32, u32) {
        let hash = self.hash(key);
        (self.find_bucket(key, hash), hash)
    }

    /// [`IdleCache::find_bucket`] past bucket `b` of the chain: the hashes
    /// compared in a tight loop, a key only where the hash is the same.
    #[inline(never)]
    fn find_further(&self, mut b: u32, key: &BucketKey, hash: u32) -> u32 {
        loop {
            b = self.buckets[b as usize].chain_next;
            if b == NIL || (self.buckets[b as usize].hash == hash && self.has_key(b, key)) {
                return b;
            }
        }
    }

    /// [`IdleCache::is_bucket_of`] once the hash is the same, out of line:
    /// see `find_further`.
    #[inline(never)]
    fn has_key(&self, b: u32, key: &BucketKey) -> bool {
        let bucket = &self.buckets[b as usize];
        bucket.tag == key.tag
            && self.same_addr(b, bucket.addr_len, key.addr)
            && self.same_slice(b as usize, self.cut(key.slice))
    }

    /// Whether bucket `b`, in the table, is the bucket of `key`, whose
    /// hash is `hash`.
    #[inline(always)]
    fn is_bucket_of(&self, b: u32, key: &BucketKey, hash: u32) -> bool {
        let bucket = &self.buckets[b as usize];
        bucket.hash == hash
            && bucket.tag == key.tag
            && self.same_addr(b, bucket.addr_len, key.addr)
            && self.same_slice(b as usize, self.cut(key.slice))
    }

    /// Takes `b`, which holds no connection any more, out of its hash
    /// chain: its key owns it no more.
    #[inline(always)]
    fn unchain(&mut self, b: u32) {
        self.buckets[b as usize].addr_len = NO_ADDR;
        let generation = &mut self.buckets[b as usize].generation;
        *generation = generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        let chain = self.chain(self.buckets[b as usize].hash);
        let next = self.buckets[b as usize].chain_next;
        if self.table[chain] == b {
            self.table[chain] = next;
        } else {
            let mut p = self.table[chain];
            while self.buckets[p as usize].chain_next != b {
                p = self.buckets[p as usize].chain_next;
            }
            self.buckets[p as usize].chain_next = next;
        }
    }

    #[inline(always)]
    fn move_to_front(&mut self, b: u32, list: u8) {
        self.unlink(b);
        self.push_front(b, list);
    }

    #[inline(always)]
    fn push_front(&mut self, b: u32, list: u8) {
        let ends = &mut self.lists[list as usize];
        let old = ends.head;
        ends.head = b;
        if old == NIL {
            ends.tail = b;
        }
        ends.len += 1;
        if old != NIL {
            self.buckets[old as usize].prev = b;
        }
        let bucket = &mut self.buckets[b as usize];
        bucket.prev = NIL;
        bucket.next = old;
        bucket.list = list;
    }

    #[inline(always)]
    fn unlink(&mut self, b: u32) {
        let Bucket {
            prev, next, list, ..
        } = self.buckets[b as usize];
        if list == NO_LIST {
            return;
        }
        let ends = &mut self.lists[list as usize];
        ends.len -= 1;
        match prev {
            NIL => ends.head = next,
            p => self.buckets[p as usize].next = next,
        }
        match next {
            NIL => self.lists[list as usize].tail = prev,
            n => self.buckets[n as usize].prev = prev,
        }
        let bucket = &mut self.buckets[b as usize];
        bucket.prev = NIL;
        bucket.next = NIL;
        bucket.list = NO_LIST;
    }

    /// The slot of the least recently stored idle connection, if any
    /// (where the decay of `keepalive auto` closes from).
    pub fn oldest(&self) -> Option<usize> {
        (self.lru_tail != NIL).then_some(self.lru_tail as usize)
    }

    /// Calls `f(slot, connection)` for every idle connection, the least
    /// recently stored first: O(idle connections), for the decay of
    /// `keepalive auto` (once an interval, never per request).
    pub fn for_each_oldest_first(&self, mut f: impl FnMut(usize, C)) {
        let mut slot = self.lru_tail;
        while let Some(s) = self.slots.get(slot as usize) {
            if let Some(conn) = s.conn {
                f(slot as usize, conn);
            }
            slot = s.lru_prev;
        }
    }
}

/// Room for `n` elements, none there yet; `None` if the memory is not
/// there.
fn reserved<T>(n: usize) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    Some(v)
}

/// `n` elements made by `make`, or `None` if the memory is not there.
pub fn boxed_slice<T>(n: usize, make: impl FnMut(usize) -> T) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.extend((0..n).map(make));
    Some(v.into_boxed_slice())
}

#[cfg(test)]
mod tests;
