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

use core::num::NonZeroU32;

const NIL: u32 = u32::MAX;

/// The address length of a bucket that no key owns: longer than any.
const NO_ADDR: u16 = u16::MAX;

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
    /// The cache holds no connections at all (`keepalive 0`) or the address
    /// is longer than [`MAX_ADDR_LEN`].
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
    /// The bucket's index + 1 (an `Option<BucketRef>` takes eight bytes).
    index_1: NonZeroU32,
    /// The bucket's generation when it was found.
    generation: u32,
}

impl BucketRef {
    fn bucket(self) -> u32 {
        self.index_1.get() - 1
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
    generation: u32,
    slice_len: u16,
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
pub struct IdleCache<C> {
    slots: Box<[IdleSlot<C>]>,
    buckets: Box<[Bucket]>,
    addrs: Box<[u8]>,
    slices: Box<[u8]>,
    keylen: usize,
    table: Box<[u32]>,
    lru_head: u32,
    lru_tail: u32,
    free_slot: u32,
    free_bucket: u32,
    buckets_in_use: usize,
    /// Buckets stay their keys' when emptied, managed in `lists`.
    sliced: bool,
    /// Unsliced: the bucket found last, tried before the key is hashed (an
    /// upstream of one server has one bucket per protocol and identity).
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
    /// keeps at least 1/5 of the buckets, protected the rest.
    ///
    /// `None` if the sizes are beyond what the index links can address or
    /// the memory cannot be allocated: the configuration is refused, nginx
    /// does not abort.
    pub fn new(capacity: usize, poolsize: usize, keylen: usize) -> Option<Self> {
        Self::with_buckets(capacity, poolsize, keylen, true)
    }

    /// An unsliced cache, as nginx's own: buckets by server address (and
    /// location tag) only, `capacity` + 1 of them, spare when emptied.
    pub fn unsliced(capacity: usize) -> Option<Self> {
        Self::with_buckets(capacity, capacity.checked_add(1)?, 0, false)
    }

    fn with_buckets(capacity: usize, poolsize: usize, keylen: usize, sliced: bool) -> Option<Self> {
        if capacity >= NIL as usize || poolsize >= NIL as usize || keylen > u16::MAX as usize {
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

        let buckets = boxed_slice(poolsize, |i| Bucket {
            hash: 0,
            tag: 0,
            chain_next: link(i, poolsize),
            head: NIL,
            tail: NIL,
            count: 0,
            prev: NIL,
            next: NIL,
            generation: 0,
            slice_len: 0,
            addr_len: NO_ADDR,
            list: NO_LIST,
            hits: 0,
        })?;

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
            addrs: boxed_slice(poolsize.checked_mul(MAX_ADDR_LEN)?, |_| 0)?,
            slices: boxed_slice(poolsize.checked_mul(keylen)?, |_| 0)?,
            keylen,
            table: boxed_slice(table_len, |_| NIL)?,
            lru_head: NIL,
            lru_tail: NIL,
            free_slot: if capacity > 0 { 0 } else { NIL },
            free_bucket: if poolsize > 0 { 0 } else { NIL },
            buckets_in_use: 0,
            sliced,
            recent: NIL,
            lists: [no_list; 4],
            probation_min: (poolsize / 5).max(1) as u32,
            ghosts: boxed_slice(if sliced { table_len } else { 0 }, |_| 0)?,
        })
    }

    /// Bytes allocated for this cache: everything it will ever use, sized
    /// with the configuration (the README's "Limits and memory").
    pub fn memory_bytes(&self) -> usize {
        use core::mem::size_of;
        self.slots.len() * size_of::<IdleSlot<C>>()
            + self.buckets.len() * size_of::<Bucket>()
            + self.addrs.len()
            + self.slices.len()
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
        let recent = self.recent;
        if recent != NIL && self.holds(recent, key) {
            return self.bucket_ref(recent);
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
    /// then finds the bucket by the whole key ([`IdleCache::find_hashed`]).
    #[inline(always)]
    pub fn recent(&self, addr: &[u8], tag: usize) -> Option<BucketRef> {
        if self.sliced {
            return None;
        }
        let b = self.recent;
        let bucket = self.buckets.get(b as usize)?;
        // A free bucket's address length is NO_ADDR: no key has it.
        if bucket.tag != tag
            || bucket.addr_len as usize != addr.len()
            || !same(self.addr_of(b as usize), addr)
        {
            return None;
        }
        Some(BucketRef {
            index_1: NonZeroU32::new(b.wrapping_add(1))?,
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
        NonZeroU32::new(b.wrapping_add(1)).map(|index_1| BucketRef {
            index_1,
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
                if self.slots.is_empty() || key.addr.len() > MAX_ADDR_LEN {
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

    #[inline(always)]
    fn addr_of(&self, b: usize) -> &[u8] {
        let start = b * MAX_ADDR_LEN;
        &self.addrs[start..start + self.buckets[b].addr_len as usize]
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
        let bucket = &self.buckets[b as usize];
        bucket.tag == key.tag
            && bucket.addr_len as usize == key.addr.len()
            && same(self.addr_of(b as usize), key.addr)
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
        self.buckets[b as usize].tag == key.tag
            && same(self.addr_of(b as usize), key.addr)
            && self.same_slice(b as usize, self.cut(key.slice))
    }

    /// Whether bucket `b`, in the table, is the bucket of `key`, whose
    /// hash is `hash`.
    #[inline(always)]
    fn is_bucket_of(&self, b: u32, key: &BucketKey, hash: u32) -> bool {
        let bucket = &self.buckets[b as usize];
        bucket.hash == hash
            && bucket.tag == key.tag
            && same(self.addr_of(b as usize), key.addr)
            && self.same_slice(b as usize, self.cut(key.slice))
    }

    /// A bucket for `key`, which has none: a free one, or the bucket of a
    /// less valuable key, whose idle connections go to `evicted`
    /// (`reclaimed` then says how many). The new bucket is in no list yet.
    /// NIL when the pool has no bucket to give.
    #[inline(always)]
    fn acquire_bucket(
        &mut self,
        key: &BucketKey,
        hash: u32,
        evicted: &mut impl FnMut(C),
        reclaimed: &mut Option<usize>,
    ) -> u32 {
        let b = match self.free_bucket {
            NIL if !self.sliced => match self.spare_bucket() {
                // Cannot happen: N + 1 buckets, at most N with connections.
                NIL => return NIL,
                spare => {
                    self.unlink(spare);
                    self.unchain(spare);
                    spare
                }
            },
            NIL => match self.take_from_another_key(evicted, reclaimed) {
                NIL => return NIL,
                victim => victim,
            },
            b => {
                self.free_bucket = self.buckets[b as usize].chain_next;
                b
            }
        };
        let i = b as usize;

        let slice = self.cut(key.slice);
        self.addrs[i * MAX_ADDR_LEN..i * MAX_ADDR_LEN + key.addr.len()].copy_from_slice(key.addr);
        self.slices[i * self.keylen..i * self.keylen + slice.len()].copy_from_slice(slice);

        // A free bucket holds no connection and is in no list (`unchain`,
        // `unlink`): only the key and the request count are new.
        let chain = self.chain(hash);
        let bucket = &mut self.buckets[i];
        bucket.hash = hash;
        bucket.tag = key.tag;
        bucket.chain_next = self.table[chain];
        bucket.slice_len = slice.len() as u16;
        bucket.addr_len = key.addr.len() as u16;
        bucket.hits = 0;
        self.table[chain] = b;
        if self.sliced {
            self.buckets_in_use += 1;
        }
        b
    }

    /// The oldest spare bucket (unsliced): buckets of the spare list that
    /// hold connections again leave it on the way. Amortised O(1): a bucket
    /// enters the list once each time it is emptied.
    #[inline(always)]
    fn spare_bucket(&mut self) -> u32 {
        loop {
            let b = self.lists[SPARE as usize].tail;
            if b == NIL || self.buckets[b as usize].count == 0 {
                return b;
            }
            self.unlink(b);
        }
    }

    /// No bucket is free: the victim's, its idle connections closed, or
    /// NIL.
    #[cold]
    #[inline(never)]
    fn take_from_another_key(
        &mut self,
        evicted: &mut impl FnMut(C),
        reclaimed: &mut Option<usize>,
    ) -> u32 {
        let victim = self.victim();
        if victim != NIL {
            *reclaimed = Some(self.reclaim(victim, evicted));
        }
        victim
    }

    /// The bucket a new key takes when none is free (see the module's
    /// documentation), or NIL when there is none to take (`poolsize` 0,
    /// or unsliced, where it cannot happen).
    #[inline(never)]
    fn victim(&mut self) -> u32 {
        let closed = self.lists[EMPTY as usize].tail;
        if closed != NIL {
            return closed;
        }
        for _ in 0..VICTIM_STEPS {
            let probation = self.lists[PROBATION as usize].tail;
            let protected = self.lists[PROTECTED as usize].tail;
            if probation != NIL
                && (self.lists[PROBATION as usize].len >= self.probation_min || protected == NIL)
            {
                if self.buckets[probation as usize].hits < HITS_TO_PROTECT {
                    return probation;
                }
                self.move_to_front(probation, PROTECTED);
            } else if protected != NIL {
                if self.buckets[protected as usize].hits == 0 {
                    return protected;
                }
                self.buckets[protected as usize].hits -= 1;
                self.move_to_front(protected, PROTECTED);
            } else {
                return NIL;
            }
        }
        // Every bucket looked at was in use: the next one goes all the same.
        match self.lists[PROBATION as usize].tail {
            NIL => self.lists[PROTECTED as usize].tail,
            b => b,
        }
    }

    /// Evicts a connection to free a slot (see `eviction_slot`).
    #[inline]
    fn evict_one(&mut self, evicted: &mut impl FnMut(C)) {
        if let Some(c) = self.remove(self.eviction_slot() as usize) {
            evicted(c);
        }
    }

    /// The connection evicted when the cache is full: the least recently
    /// stored one, unless it belongs to a protected key while the oldest
    /// bucket of probation holds connections; then the least recently
    /// stored of those. Connections of keys seen once thus make room for
    /// each other, not for keys in steady use.
    fn eviction_slot(&self) -> u32 {
        let oldest = self.lru_tail;
        let b = self.slots[oldest as usize].bucket;
        if self.buckets[b as usize].list == PROTECTED {
            let probation = self.lists[PROBATION as usize].tail;
            if probation != NIL && self.buckets[probation as usize].tail != NIL {
                return self.buckets[probation as usize].tail;
            }
        }
        oldest
    }

    /// Where the ghost of the key with `hash` is kept, and its fingerprint
    /// (never 0, the mark of an empty entry).
    fn ghost_of(&self, hash: u32) -> Option<(usize, u32)> {
        if self.ghosts.is_empty() {
            return None;
        }
        // The index from the high bits (the chain takes the low ones).
        let i = hash.rotate_left(16) as usize & (self.ghosts.len() - 1);
        Some((i, hash | 1))
    }

    /// Whether a key with `hash` lost its bucket in probation lately (and
    /// forgets it).
    fn is_ghost(&mut self, hash: u32) -> bool {
        match self.ghost_of(hash) {
            Some((i, print)) if self.ghosts[i] == print => {
                self.ghosts[i] = 0;
                true
            }
            _ => false,
        }
    }

    /// Takes bucket `b` from its key: its connections go to `evicted`, it
    /// leaves its list (a ghost stays, from probation) and its hash chain.
    /// Returns how many connections were closed.
    #[inline(never)]
    fn reclaim(&mut self, b: u32, evicted: &mut impl FnMut(C)) -> usize {
        let mut closed = 0;
        // Head first, until the head is NIL (no slot). Not `closed`: the
        // bucket leaves its list anyway.
        while let Some(c) = self.unlink_slot(self.buckets[b as usize].head as usize, false) {
            evicted(c);
            closed += 1;
        }
        if self.buckets[b as usize].list != PROTECTED {
            if let Some((i, print)) = self.ghost_of(self.buckets[b as usize].hash) {
                self.ghosts[i] = print;
            }
        }
        self.unlink(b);
        self.unchain(b);
        self.buckets_in_use -= 1;
        closed
    }

    /// Takes `b`, which holds no connection any more, out of its hash
    /// chain: its key owns it no more.
    #[inline(always)]
    fn unchain(&mut self, b: u32) {
        self.buckets[b as usize].addr_len = NO_ADDR;
        let generation = &mut self.buckets[b as usize].generation;
        *generation = generation.wrapping_add(1);
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
}

/// The hash state: FxHash's step (rotate, xor, multiply) per 64-bit word.
struct Mix(u64);

impl Mix {
    #[inline]
    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        // The common lengths without a loop: no key, a sockaddr_in, a
        // host name of up to 16 bytes (as two words, overlapping).
        match bytes.len() {
            0 => return,
            1..=8 => {
                self.word(last_word(bytes));
                return;
            }
            9..=16 => {
                self.word(word(bytes.get(..8).unwrap_or_default()));
                self.word(last_word(bytes));
                return;
            }
            _ => {}
        }
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.word(word(chunk));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The last eight bytes, overlapping the chunk before (the
            // length was mixed in first), or the short key whole.
            self.word(last_word(bytes));
        }
    }
}

/// Byte equality, eight bytes at a time, inline, and never a `memcmp` call.
/// An unsliced cache compares two empty slice keys on every lookup, both
/// with dangling (unmapped) pointers; glibc's AVX-512 `memcmp`, which `==`
/// on slices calls even for length 0, does a masked load there, and a masked
/// load touching an unmapped page takes a microcode assist of hundreds of
/// cycles (measured: 335 ns per get+free pair instead of ~40 ns). Addresses
/// are 16 or 28 bytes and keys short, where a call costs more than the
/// comparison anyway.
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // The common length without a loop: a sockaddr_in.
    if a.len() == 16 {
        if let (Some(a), Some(b)) = (a.first_chunk::<16>(), b.first_chunk::<16>()) {
            return u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b);
        }
    }
    // Short keys (host names) as one or two words, overlapping.
    if a.len() < 16 {
        let first = |s: &[u8]| s.get(..8).map_or(0, word);
        return first(a) == first(b) && last_word(a) == last_word(b);
    }
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in (&mut x).zip(&mut y) {
        if word(p) != word(q) {
            return false;
        }
    }
    // The rest, as the last eight bytes (overlapping) or the short key
    // whole, in one comparison.
    x.remainder().is_empty() || last_word(a) == last_word(b)
}

/// A chunk of exactly eight bytes as a word (anything else reads as 0).
#[inline]
fn word(chunk: &[u8]) -> u64 {
    <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes)
}

/// The last eight bytes of `bytes` as a word, or, shorter, all of them
/// zero-padded (read as two overlapping halves, without a byte loop).
#[inline(always)]
fn last_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    if let Some(last) = n.checked_sub(8).and_then(|start| bytes.get(start..)) {
        return word(last);
    }
    let half = |start: usize, len: usize| -> u64 {
        bytes.get(start..start + len).map_or(0, |b| {
            let mut w = [0u8; 4];
            w[..len].copy_from_slice(b);
            u64::from(u32::from_le_bytes(w))
        })
    };
    match n {
        0 => 0,
        1..=3 => {
            // first, middle and last byte (some the same)
            let (f, m, l) = (bytes[0], bytes[n / 2], bytes[n - 1]);
            u64::from(f) | u64::from(m) << 8 | u64::from(l) << 16
        }
        // two overlapping 4-byte reads cover 4 to 7 bytes
        _ => half(0, 4) | half(n - 4, 4) << 32,
    }
}

/// `n` elements made by `make`, or `None` if the memory is not there.
pub fn boxed_slice<T>(n: usize, make: impl FnMut(usize) -> T) -> Option<Box<[T]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.extend((0..n).map(make));
    Some(v.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_is_fixed_by_the_configuration() {
        type Pointer = *mut u8;
        let bytes = |n, pool, keylen| {
            IdleCache::<Pointer>::new(n, pool, keylen)
                .unwrap()
                .memory_bytes()
        };
        // Each connection costs its slot; each bucket its record, the
        // longest address (socket address and TLS identity) and the key
        // bytes (7 and 6 buckets share a table of 16 links).
        let slot = bytes(2, 1, 0) - bytes(1, 1, 0);
        let bucket_and_key = bytes(1, 7, 1) - bytes(1, 6, 1);
        assert_eq!(
            bytes(1, 8, 41) - bytes(1, 8, 40),
            8,
            "8 buckets, 1 key byte each"
        );
        assert!(slot <= 48, "{slot} bytes per connection slot");
        assert!(bucket_and_key <= 48 + MAX_ADDR_LEN + 1, "{bucket_and_key}");
        // Sliced caches also keep a ghost table (4 bytes a hash link).
        let unsliced = IdleCache::<Pointer>::unsliced(1024).unwrap().memory_bytes();
        assert_eq!(bytes(1024, 1025, 0) - unsliced, 4096 * 4);

        // The README's figures: an unsliced keepalive 1024 (a bucket per
        // connection) stays under 512 KiB, the sliced defaults under 64 KiB,
        // and the largest sizes the directive accepts are bounded (sliced:
        // at most 2N+1 buckets).
        assert!(unsliced < 512 << 10);
        assert!(bytes(1024, 20, 40) < 64 << 10);
        assert!(bytes(1 << 16, (1 << 16) + 1, 0) < 32 << 20);
        assert!(bytes(1 << 16, 1 << 16, 1024) < 96 << 20);
    }

    use super::*;

    const A: &[u8] = &[2, 0, 0x1f, 0x90, 127, 0, 0, 1];
    const B: &[u8] = &[2, 0, 0x1f, 0x91, 127, 0, 0, 1];

    fn key<'a>(addr: &'a [u8], slice: &'a [u8]) -> BucketKey<'a> {
        BucketKey {
            addr,
            slice,
            tag: 0,
        }
    }

    fn unsliced(capacity: usize) -> IdleCache<u32> {
        IdleCache::unsliced(capacity).unwrap()
    }

    /// What `store` did: where the connection went, whether a bucket was
    /// taken from another key, and the connections evicted, in order.
    #[derive(Debug, PartialEq, Eq)]
    struct Put {
        slot: usize,
        reclaimed: Option<usize>,
        evicted: Vec<u32>,
    }

    fn put(
        cache: &mut IdleCache<u32>,
        k: &BucketKey,
        conn: u32,
        limit: usize,
    ) -> Result<Put, Refusal> {
        put_at(cache, None, k, conn, limit)
    }

    fn put_at(
        cache: &mut IdleCache<u32>,
        known: Option<BucketRef>,
        k: &BucketKey,
        conn: u32,
        limit: usize,
    ) -> Result<Put, Refusal> {
        let mut evicted = Vec::new();
        let stored = cache.store_at(known, k, conn, limit, |c| evicted.push(c))?;
        Ok(Put {
            slot: stored.slot,
            reclaimed: stored.reclaimed,
            evicted,
        })
    }

    impl<C: Copy> IdleCache<C> {
        /// The slice keys of a bucket list, most recent first.
        fn keys_of(&self, list: u8) -> Vec<Vec<u8>> {
            let mut keys = Vec::new();
            let mut b = self.lists[list as usize].head;
            while b != NIL {
                keys.push(self.slice_of(b as usize).to_vec());
                b = self.buckets[b as usize].next;
            }
            assert_eq!(keys.len(), self.lists[list as usize].len as usize);
            keys
        }

        fn list_of(&self, k: &BucketKey) -> Option<u8> {
            match self.find_bucket(k, self.hash(k)) {
                NIL => None,
                b => Some(self.buckets[b as usize].list),
            }
        }
    }

    #[test]
    fn takes_only_from_the_same_address() {
        let mut cache = unsliced(4);
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(B, b"")), None);
        assert_eq!(cache.take(&key(A, b"")), Some(1));
        assert_eq!(cache.take(&key(A, b"")), None);
        assert!(cache.is_empty());
        // Unsliced, an empty bucket is spare: not in use.
        assert_eq!(cache.buckets_in_use(), 0);
        assert!(!cache.has_bucket(&key(A, b"")));
    }

    /// A spare bucket is its key's again when a connection comes back, and
    /// goes to a new key, the oldest first, only when none is free.
    #[test]
    fn spare_buckets_go_to_new_keys_oldest_first() {
        let mut cache = unsliced(1);
        let c = [2, 0, 0, 9, 127, 0, 0, 1];
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(A, b"")), Some(1));
        put(&mut cache, &key(B, b""), 2, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(B, b"")), Some(2));
        // Both buckets spare, none free: A's is the oldest.
        put(&mut cache, &key(&c, b""), 3, usize::MAX).unwrap();
        assert_eq!(cache.buckets_in_use(), 1);
        assert_eq!(
            cache.find_bucket(&key(A, b""), cache.hash(&key(A, b""))),
            NIL
        );
        assert_ne!(
            cache.find_bucket(&key(B, b""), cache.hash(&key(B, b""))),
            NIL
        );
        assert_eq!(cache.take(&key(&c, b"")), Some(3));
        // B's spare bucket is B's again.
        put(&mut cache, &key(B, b""), 4, usize::MAX).unwrap();
        assert_eq!(cache.bucket_len(&key(B, b"")), 1);
        assert_eq!(cache.take(&key(B, b"")), Some(4));
    }

    /// Free peer stores into the bucket get peer found without the key
    /// only while the key owns it and a slot is free; otherwise the key is
    /// needed (`None`), and a refusal is the same as with the key.
    #[test]
    fn stores_without_the_key_only_into_the_keys_own_bucket() {
        let mut cache = unsliced(2);
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        let a = cache.find(&key(A, b"")).unwrap();
        assert_eq!(cache.take_from(a), Some(1));
        assert!(matches!(cache.store_known(a, 1, usize::MAX), Some(Ok(_))));
        assert_eq!(cache.bucket_len(&key(A, b"")), 1);
        // Full: room must be made, by the key.
        put(&mut cache, &key(B, b""), 2, usize::MAX).unwrap();
        assert_eq!(cache.store_known(a, 3, usize::MAX), None);
        // A's only connection evicted, its spare bucket then given to C:
        // the reference is stale.
        let c = [2, 0, 0, 9, 127, 0, 0, 1];
        assert_eq!(
            put(&mut cache, &key(&c, b""), 3, usize::MAX)
                .unwrap()
                .evicted,
            [1]
        );
        assert_eq!(cache.take(&key(B, b"")), Some(2));
        put(&mut cache, &key(B, b""), 2, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(&c, b"")), Some(3));
        put(
            &mut cache,
            &key(&[2, 0, 0, 8, 127, 0, 0, 1], b""),
            4,
            usize::MAX,
        )
        .unwrap();
        assert!(!cache.has_bucket(&key(A, b"")));
        assert_eq!(cache.store_known(a, 5, usize::MAX), None);

        let mut sliced = IdleCache::new(4, 4, 8).unwrap();
        let k = key(A, b"k");
        sliced.store(&k, 1, 1, |_| {}).unwrap();
        let found = sliced.find(&k).unwrap();
        assert_eq!(
            sliced.store_known(found, 2, 0),
            Some(Err(Refusal::ZeroLimit))
        );
        assert_eq!(
            sliced.store_known(found, 2, 1),
            Some(Err(Refusal::BucketFull { limit: 1 }))
        );
        assert!(matches!(sliced.store_known(found, 2, 2), Some(Ok(_))));
        assert_eq!(sliced.bucket_len(&k), 2);
    }

    /// Unsliced, the bucket found last is found again without the key
    /// only for the same address and tag, and only while it holds them.
    #[test]
    fn the_recent_bucket_only_for_its_own_key() {
        let mut cache = unsliced(1);
        assert_eq!(cache.recent(A, 0), None);
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        let a = cache.find_hashed(&key(A, b"")).unwrap();
        assert_eq!(cache.recent(A, 0), Some(a));
        assert_eq!(cache.recent(B, 0), None);
        assert_eq!(cache.recent(A, 1), None);
        assert_eq!(cache.recent(&A[..7], 0), None);
        // A's connection evicted, its spare bucket given to B (and a
        // third key's): not A's any more.
        put(&mut cache, &key(B, b""), 2, usize::MAX).unwrap();
        put(
            &mut cache,
            &key(&[2, 0, 0, 9, 127, 0, 0, 1], b""),
            3,
            usize::MAX,
        )
        .unwrap();
        assert!(!cache.has_bucket(&key(A, b"")));
        assert_eq!(cache.recent(A, 0), None);
        // Sliced: never.
        let mut sliced = IdleCache::new(2, 2, 8).unwrap();
        sliced.store(&key(A, b""), 1, 1, |_| {}).unwrap();
        assert!(sliced.find(&key(A, b"")).is_some());
        assert_eq!(sliced.recent(A, 0), None);
    }

    #[test]
    fn takes_the_most_recent_of_a_bucket() {
        let mut cache = unsliced(4);
        for c in 1..=3 {
            put(&mut cache, &key(A, b""), c, usize::MAX).unwrap();
        }
        assert_eq!(cache.take(&key(A, b"")), Some(3));
        assert_eq!(cache.take(&key(A, b"")), Some(2));
    }

    #[test]
    fn evicts_the_least_recently_stored_when_full() {
        let mut cache = unsliced(2);
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        put(&mut cache, &key(B, b""), 2, usize::MAX).unwrap();
        let stored = put(&mut cache, &key(B, b""), 3, usize::MAX).unwrap();
        assert_eq!(stored.evicted, [1]);
        assert_eq!(stored.reclaimed, None);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.take(&key(A, b"")), None);
        assert_eq!(cache.bucket_len(&key(B, b"")), 2);
    }

    #[test]
    fn eviction_that_empties_the_target_bucket_still_stores() {
        let mut cache = unsliced(1);
        put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        let stored = put(&mut cache, &key(A, b""), 2, usize::MAX).unwrap();
        assert_eq!(stored.evicted, [1]);
        assert_eq!(cache.take(&key(A, b"")), Some(2));
    }

    /// Unsliced: N + 1 buckets for N connections, spare when emptied, so
    /// a new address always finds a free or spare bucket and only the LRU
    /// eviction closes connections, as in nginx's own cache.
    #[test]
    fn unsliced_cache_never_closes_a_connection_for_a_bucket() {
        let mut cache = unsliced(3);
        let (mut evicted, mut taken) = (Vec::new(), 0);
        for port in 0..50u8 {
            let addr = [2, 0, 0, port, 127, 0, 0, 1];
            if port % 3 == 0 {
                // some addresses are used again, as a balancer would
                let again = [2, 0, 0, port / 2, 127, 0, 0, 1];
                taken += usize::from(cache.take(&key(&again, b"")).is_some());
            }
            let full = cache.len() == 3;
            let stored = put(&mut cache, &key(&addr, b""), u32::from(port), usize::MAX).unwrap();
            assert_eq!(stored.reclaimed, None, "port {port}");
            assert_eq!(stored.evicted.len(), usize::from(full), "port {port}");
            evicted.extend(stored.evicted);
        }
        assert_eq!(evicted.len() + taken + cache.len(), 50);
        assert!(evicted.windows(2).all(|w| w[0] < w[1]), "LRU order");
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.buckets_in_use(), 3);
    }

    #[test]
    fn slices_by_key_within_an_address() {
        let mut cache = IdleCache::new(8, 4, 40).unwrap();
        put(&mut cache, &key(A, b"a.example"), 1, 2).unwrap();
        put(&mut cache, &key(A, b"b.example"), 2, 2).unwrap();
        assert_eq!(cache.take(&key(A, b"c.example")), None);
        assert_eq!(cache.take(&key(B, b"a.example")), None);
        assert_eq!(cache.take(&key(A, b"b.example")), Some(2));
        assert_eq!(cache.take(&key(A, b"a.example")), Some(1));
    }

    #[test]
    fn local_tag_separates_buckets() {
        let mut cache = unsliced(4);
        let one = BucketKey {
            addr: A,
            slice: b"",
            tag: 1,
        };
        let two = BucketKey {
            addr: A,
            slice: b"",
            tag: 2,
        };
        put(&mut cache, &one, 1, usize::MAX).unwrap();
        assert_eq!(cache.take(&two), None);
        assert_eq!(cache.take(&one), Some(1));
    }

    #[test]
    fn refuses_beyond_the_bucket_limit() {
        let mut cache = IdleCache::new(8, 4, 40).unwrap();
        put(&mut cache, &key(A, b"a"), 1, 2).unwrap();
        put(&mut cache, &key(A, b"a"), 2, 2).unwrap();
        assert_eq!(
            put(&mut cache, &key(A, b"a"), 3, 2),
            Err(Refusal::BucketFull { limit: 2 })
        );
        assert_eq!(
            put(&mut cache, &key(A, b"b"), 4, 0),
            Err(Refusal::ZeroLimit)
        );
        assert_eq!(cache.len(), 2);
    }

    /// A key requested `n` times, each request taking a connection if
    /// there is one and leaving it (or a new one, `conn`) back.
    fn request(cache: &mut IdleCache<u32>, k: &BucketKey, conn: u32, n: usize) {
        for _ in 0..n {
            let c = cache.take(k).unwrap_or(conn);
            put(cache, k, c, 4).unwrap();
        }
    }

    /// The bucket life cycle: a key keeps its bucket while its connection
    /// is busy, and the connection coming back finds it.
    #[test]
    fn a_bucket_stays_with_its_key_while_its_connection_is_busy() {
        let mut cache = IdleCache::new(8, 3, 40).unwrap();
        put(&mut cache, &key(A, b"a"), 1, 4).unwrap();
        put(&mut cache, &key(A, b"b"), 2, 4).unwrap();
        assert_eq!(cache.list_of(&key(A, b"a")), Some(PROBATION));

        // a's connection leaves for a request: a's bucket stays, empty
        assert_eq!(cache.take(&key(A, b"a")), Some(1));
        assert!(cache.has_bucket(&key(A, b"a")));
        assert_eq!(cache.bucket_len(&key(A, b"a")), 0);
        assert_eq!(cache.list_of(&key(A, b"a")), Some(PROBATION));
        assert_eq!(cache.buckets_in_use(), 2);

        // a third key takes the free bucket, and a's connection comes back
        // into a's bucket
        assert_eq!(
            put(&mut cache, &key(A, b"c"), 3, 4).unwrap().reclaimed,
            None
        );
        let back = put(&mut cache, &key(A, b"a"), 1, 4).unwrap();
        assert_eq!((back.reclaimed, back.evicted.len()), (None, 0));
        assert_eq!(cache.take(&key(A, b"a")), Some(1));
    }

    /// Buckets whose idle connections were all closed are the first taken,
    /// before older keys holding connections. A key that comes back soon
    /// after losing its bucket is a ghost: it was in use, and is protected.
    #[test]
    fn closed_empty_buckets_go_first_and_ghosts_return_protected() {
        let mut cache = IdleCache::new(8, 3, 40).unwrap();
        put(&mut cache, &key(A, b"a"), 1, 4).unwrap();
        put(&mut cache, &key(A, b"b"), 2, 4).unwrap();
        let c = put(&mut cache, &key(A, b"c"), 3, 4).unwrap();
        // the server closes c's idle connection: c keeps its bucket, empty
        assert_eq!(cache.remove(c.slot), Some(3));
        assert_eq!(cache.list_of(&key(A, b"c")), Some(EMPTY));
        assert_eq!(cache.buckets_in_use(), 3);
        // d takes c's bucket, though a is older: no connection closed
        let d = put(&mut cache, &key(A, b"d"), 4, 4).unwrap();
        assert_eq!((d.reclaimed, d.evicted.len()), (Some(0), 0));
        assert!(!cache.has_bucket(&key(A, b"c")));
        // then the oldest of probation (a) goes, its connection closed
        let e = put(&mut cache, &key(A, b"e"), 5, 4).unwrap();
        assert_eq!((e.reclaimed, e.evicted), (Some(1), vec![1]));
        // a, back, takes b's bucket and is protected
        let back = put(&mut cache, &key(A, b"a"), 6, 4).unwrap();
        assert_eq!((back.reclaimed, back.evicted), (Some(1), vec![2]));
        assert_eq!(cache.list_of(&key(A, b"a")), Some(PROTECTED));
        // from now on new keys take probation's buckets, never a's
        for (i, k) in [b"f", b"g", b"h", b"i"].iter().enumerate() {
            put(&mut cache, &key(A, *k), 10 + i as u32, 4).unwrap();
            assert_eq!(cache.bucket_len(&key(A, b"a")), 1);
            assert_eq!(cache.list_of(&key(A, b"a")), Some(PROTECTED));
        }
    }

    /// A bucket taken from another key closes all of its idle connections
    /// (the caller gets each of them).
    #[test]
    fn a_bucket_taken_closes_all_its_connections() {
        let mut cache = IdleCache::new(8, 1, 40).unwrap();
        for c in 1..=3 {
            put(&mut cache, &key(A, b"a"), c, 4).unwrap();
        }
        let b = put(&mut cache, &key(A, b"b"), 4, 4).unwrap();
        assert_eq!(b.reclaimed, Some(3));
        assert_eq!(b.evicted, [3, 2, 1]);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.take(&key(A, b"a")), None);
        assert_eq!(cache.take(&key(A, b"b")), Some(4));
    }

    /// Keys seen once take buckets from each other, never from keys in
    /// steady use, however many of them come.
    #[test]
    fn keys_seen_once_do_not_push_out_keys_in_use() {
        let mut cache = IdleCache::new(32, 20, 40).unwrap();
        let busy: Vec<Vec<u8>> = (0..5).map(|i| format!("busy{i}").into_bytes()).collect();
        for (i, k) in busy.iter().enumerate() {
            put(&mut cache, &key(A, k), 2 * i as u32, 4).unwrap();
            put(&mut cache, &key(A, k), 2 * i as u32 + 1, 4).unwrap();
            // two more requests: in steady use
            request(&mut cache, &key(A, k), 0, 2);
        }
        let mut conn = 100;
        for one in 0..10_000u32 {
            let k = format!("once{one}");
            assert_eq!(cache.take(&key(A, k.as_bytes())), None);
            conn += 1;
            let stored = put(&mut cache, &key(A, k.as_bytes()), conn, 4).unwrap();
            assert!(stored.evicted.iter().all(|&c| c > 100), "{stored:?}");
        }
        for k in &busy {
            assert_eq!(cache.bucket_len(&key(A, k)), 2);
            assert_eq!(cache.list_of(&key(A, k)), Some(PROTECTED));
        }
        assert_eq!(cache.buckets_in_use(), 20);
    }

    /// Even with every connection of the busy keys in flight (their buckets
    /// empty), keys seen once do not take those buckets, and with the cache
    /// full of the busy keys' idle connections, keys seen once evict each
    /// other's connections, not theirs.
    #[test]
    fn busy_keys_with_every_connection_in_flight_keep_their_buckets() {
        let mut cache = IdleCache::new(12, 20, 40).unwrap();
        let busy: Vec<Vec<u8>> = (0..5).map(|i| format!("busy{i}").into_bytes()).collect();
        for (i, k) in busy.iter().enumerate() {
            put(&mut cache, &key(A, k), i as u32, 4).unwrap();
            put(&mut cache, &key(A, k), 10 + i as u32, 4).unwrap();
            request(&mut cache, &key(A, k), 0, 2);
        }
        let mut conn = 100;
        for round in 0..1000 {
            // every busy key's connections leave, then one-off keys come
            let mut in_flight = Vec::new();
            for k in &busy {
                while let Some(c) = cache.take(&key(A, k)) {
                    in_flight.push((k, c));
                }
            }
            assert_eq!(in_flight.len(), 10, "round {round}");
            for _ in 0..30 {
                conn += 1;
                let k = format!("once{conn}");
                put(&mut cache, &key(A, k.as_bytes()), conn, 4).unwrap();
            }
            for &(k, c) in &in_flight {
                let back = put(&mut cache, &key(A, k), c, 4).unwrap();
                assert_eq!(back.reclaimed, None, "round {round}");
                assert!(back.evicted.iter().all(|&c| c >= 100), "round {round}");
            }
        }
    }

    /// Keys requested twice more while in probation are promoted when they
    /// reach its end, instead of losing their bucket; keys seen once go.
    #[test]
    fn keys_in_use_are_promoted_at_the_end_of_probation() {
        let mut cache = IdleCache::new(16, 5, 40).unwrap();
        let keys = |list: &[&[u8]]| list.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
        for (i, k) in [b"a", b"b", b"c", b"d", b"e"].iter().enumerate() {
            put(&mut cache, &key(A, *k), i as u32, 4).unwrap();
        }
        request(&mut cache, &key(A, b"a"), 0, 2);
        request(&mut cache, &key(A, b"b"), 0, 2);
        request(&mut cache, &key(A, b"c"), 0, 1);
        // requests move nothing
        assert_eq!(
            cache.keys_of(PROBATION),
            keys(&[b"e", b"d", b"c", b"b", b"a"])
        );
        // f: a and b are promoted, c (requested once) goes
        let f = put(&mut cache, &key(A, b"f"), 20, 4).unwrap();
        assert_eq!((f.reclaimed, f.evicted), (Some(1), vec![2]));
        assert_eq!(cache.keys_of(PROTECTED), keys(&[b"b", b"a"]));
        assert_eq!(cache.keys_of(PROBATION), keys(&[b"f", b"e", b"d"]));
    }

    /// Protected is a CLOCK: when probation is down to 1/5 of the pool, a
    /// new key takes the first protected bucket not requested since it
    /// last went round; requested ones go round again.
    #[test]
    fn protected_buckets_go_round_while_requested() {
        let mut cache = IdleCache::new(8, 2, 40).unwrap();
        let keys = |list: &[&[u8]]| list.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
        put(&mut cache, &key(A, b"a"), 1, 4).unwrap();
        request(&mut cache, &key(A, b"a"), 0, 3);
        put(&mut cache, &key(A, b"b"), 2, 4).unwrap();
        // c: a (requested 3 times) is promoted, b goes (and is a ghost)
        let c = put(&mut cache, &key(A, b"c"), 3, 4).unwrap();
        assert_eq!(c.evicted, [2]);
        assert_eq!(cache.keys_of(PROTECTED), keys(&[b"a"]));
        // b comes back: protected at once, c goes
        let b = put(&mut cache, &key(A, b"b"), 4, 4).unwrap();
        assert_eq!(b.evicted, [3]);
        assert_eq!(cache.keys_of(PROTECTED), keys(&[b"b", b"a"]));
        assert!(cache.keys_of(PROBATION).is_empty());
        // d: probation is empty; a (3 requests) goes round, b (none since
        // it came back) goes
        let d = put(&mut cache, &key(A, b"d"), 5, 4).unwrap();
        assert_eq!(d.evicted, [4]);
        assert_eq!(cache.keys_of(PROTECTED), keys(&[b"a"]));
        assert_eq!(cache.buckets[0].hits + cache.buckets[1].hits, 2);
    }

    /// Keys seen twice (a scan with short-range repeats) stay in probation:
    /// the whole pool serves them in LRU order, as before.
    #[test]
    fn keys_seen_twice_are_not_promoted() {
        let mut cache = IdleCache::new(16, 20, 40).unwrap();
        let name = |k: u32| format!("k{k}");
        let mut reused = 0;
        for k in 1..=2000u32 {
            let n = name(k);
            assert_eq!(cache.take(&key(A, n.as_bytes())), None);
            put(&mut cache, &key(A, n.as_bytes()), k, 1).unwrap();
            if k % 10 == 0 {
                let again = name(k - 5);
                let c = cache.take(&key(A, again.as_bytes()));
                reused += usize::from(c == Some(k - 5));
                put(&mut cache, &key(A, again.as_bytes()), k - 5, 1).unwrap();
            }
        }
        assert_eq!(reused, 200);
        assert_eq!(cache.lists[PROTECTED as usize].len, 0);
    }

    #[test]
    fn slice_poolsize_zero_keeps_nothing() {
        let mut cache = IdleCache::new(8, 0, 40).unwrap();
        assert_eq!(
            put(&mut cache, &key(A, b"a"), 1, 4),
            Err(Refusal::NoBuckets)
        );
        assert_eq!(cache.take(&key(A, b"a")), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn eviction_updates_the_evicted_bucket() {
        let mut cache = IdleCache::new(2, 4, 40).unwrap();
        put(&mut cache, &key(A, b"a"), 1, 2).unwrap();
        put(&mut cache, &key(A, b"a"), 2, 2).unwrap();
        let stored = put(&mut cache, &key(A, b"b"), 3, 2).unwrap();
        assert_eq!(stored.evicted, [1]);
        assert_eq!(cache.bucket_len(&key(A, b"a")), 1);
        // Bucket a has room again; the cache is full, so the oldest (2) goes.
        let stored = put(&mut cache, &key(A, b"a"), 4, 2).unwrap();
        assert_eq!(stored.evicted, [2]);
        assert_eq!(cache.bucket_len(&key(A, b"a")), 1);
        assert_eq!(cache.bucket_len(&key(A, b"b")), 1);
    }

    #[test]
    fn keys_are_cut_to_keylen() {
        let mut cache = IdleCache::new(4, 4, 4).unwrap();
        put(&mut cache, &key(A, b"abcdXXX"), 1, 4).unwrap();
        assert_eq!(cache.take(&key(A, b"abcdYYY")), Some(1));
        put(&mut cache, &key(A, b"abc"), 2, 4).unwrap();
        assert_eq!(cache.take(&key(A, b"abcd")), None);
    }

    #[test]
    fn remove_of_a_free_slot_is_harmless() {
        let mut cache = unsliced(2);
        let s = put(&mut cache, &key(A, b""), 1, usize::MAX).unwrap();
        assert_eq!(cache.remove(s.slot), Some(1));
        assert_eq!(cache.remove(s.slot), None);
        assert_eq!(cache.remove(99), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn addresses_beyond_the_longest_are_not_kept() {
        let mut cache = unsliced(2);
        let long = [7u8; MAX_ADDR_LEN + 1];
        assert_eq!(
            put(&mut cache, &key(&long, b""), 1, usize::MAX),
            Err(Refusal::Unusable)
        );
        assert_eq!(cache.take(&key(&long, b"")), None);
        put(&mut cache, &key(&long[..MAX_ADDR_LEN], b""), 2, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(&long[..MAX_ADDR_LEN], b"")), Some(2));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut cache: IdleCache<u32> = unsliced(0);
        assert_eq!(
            put(&mut cache, &key(A, b""), 1, usize::MAX),
            Err(Refusal::Unusable)
        );
    }

    #[test]
    fn impossible_sizes_are_refused_not_aborted() {
        assert!(IdleCache::<u32>::new(usize::MAX, 1, 0).is_none());
        assert!(IdleCache::<u32>::new(1, usize::MAX, 0).is_none());
        assert!(IdleCache::<u32>::new(1, 1 << 31, usize::MAX).is_none());
        assert!(IdleCache::<u32>::new(1, 1 << 20, 1 << 50).is_none());
        assert!(IdleCache::<u32>::unsliced(usize::MAX).is_none());
    }

    /// Addresses and keys are hashed and compared eight bytes at a time,
    /// with shortcuts for 0 and 16 bytes: a difference in any byte, at any
    /// length, still makes another bucket.
    #[test]
    fn every_byte_of_address_and_key_counts() {
        for len in [
            1usize,
            7,
            8,
            9,
            15,
            16,
            17,
            28,
            110,
            128,
            255,
            256,
            300,
            MAX_ADDR_LEN,
        ] {
            let addr: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for i in 0..len {
                let mut other = addr.clone();
                other[i] ^= 0x80;
                // The hash alone would tell these apart: `same` must too.
                assert!(!same(&addr, &other), "len {len} byte {i}");
                assert!(same(&addr, &addr.clone()));
                let mut cache = unsliced(2);
                put(&mut cache, &key(&addr, b""), 1, usize::MAX).unwrap();
                assert_eq!(cache.take(&key(&other, b"")), None, "len {len} byte {i}");
                assert_eq!(cache.take(&key(&addr, b"")), Some(1));
            }
        }
        for len in [1usize, 8, 16, 21, 40] {
            let slice: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for i in 0..len {
                let mut other = slice.clone();
                other[i] = b'-';
                assert!(!same(&slice, &other), "len {len} byte {i}");
                let mut cache = IdleCache::new(2, 2, 64).unwrap();
                put(&mut cache, &key(A, &slice), 1, 2).unwrap();
                assert_eq!(cache.take(&key(A, &other)), None, "len {len} byte {i}");
                assert_eq!(cache.take(&key(A, &slice[..len - 1])), None);
                assert_eq!(cache.take(&key(A, &slice)), Some(1));
            }
        }
    }

    /// The policy restated naively: vectors searched and shifted, newest
    /// first, no links.
    struct Model {
        sliced: bool,
        capacity: usize,
        poolsize: usize,
        probation_min: usize,
        /// (conn, key, slot), most recently stored first.
        conns: Vec<(u32, usize, usize)>,
        /// Sliced: PROTECTED, PROBATION, EMPTY: keys, newest first.
        lists: [Vec<usize>; 3],
        hits: Vec<u8>,
        /// Ghost table: (index, key) of keys that lost a probation bucket;
        /// the index is the cache's (keys may collide there).
        ghosts: Vec<(usize, usize)>,
    }

    impl Model {
        fn count(&self, k: usize) -> usize {
            self.conns.iter().filter(|m| m.1 == k).count()
        }

        fn list(&self, k: usize) -> Option<u8> {
            (0..3u8).find(|&l| self.lists[l as usize].contains(&k))
        }

        fn owned(&self, k: usize) -> bool {
            if self.sliced {
                self.list(k).is_some()
            } else {
                self.count(k) > 0
            }
        }

        fn in_use(&self, nkeys: usize) -> usize {
            (0..nkeys).filter(|&k| self.owned(k)).count()
        }

        fn move_front(&mut self, k: usize, list: u8) {
            for l in &mut self.lists {
                l.retain(|&x| x != k);
            }
            self.lists[list as usize].insert(0, k);
        }

        /// Removes a connection closed or evicted.
        fn remove_at(&mut self, i: usize) -> u32 {
            let (c, k, _) = self.conns.remove(i);
            if self.count(k) == 0 && self.list(k) == Some(PROBATION) {
                self.move_front(k, EMPTY);
            }
            c
        }

        fn take(&mut self, k: usize) -> Option<u32> {
            if !self.owned(k) {
                return None;
            }
            if self.sliced {
                self.hits[k] = (self.hits[k] + 1).min(MAX_HITS);
            }
            let i = self.conns.iter().position(|m| m.1 == k)?;
            Some(self.conns.remove(i).0)
        }

        fn victim(&mut self) -> Option<usize> {
            if let Some(&k) = self.lists[EMPTY as usize].last() {
                return Some(k);
            }
            for _ in 0..VICTIM_STEPS {
                let p = self.lists[PROBATION as usize].last().copied();
                let q = self.lists[PROTECTED as usize].last().copied();
                match (p, q) {
                    (Some(p), _)
                        if self.lists[PROBATION as usize].len() >= self.probation_min
                            || q.is_none() =>
                    {
                        if self.hits[p] < HITS_TO_PROTECT {
                            return Some(p);
                        }
                        self.move_front(p, PROTECTED);
                    }
                    (_, Some(q)) => {
                        if self.hits[q] == 0 {
                            return Some(q);
                        }
                        self.hits[q] -= 1;
                        self.move_front(q, PROTECTED);
                    }
                    _ => return None,
                }
            }
            let p = self.lists[PROBATION as usize].last();
            p.or(self.lists[PROTECTED as usize].last()).copied()
        }

        /// The expected reclaimed count and evicted connections (the slot
        /// is the cache's, recorded after). `ghost_index` is where the
        /// cache keeps a key's ghost.
        fn store(
            &mut self,
            k: usize,
            conn: u32,
            limit: usize,
            nkeys: usize,
            ghost_index: impl Fn(usize) -> Option<usize>,
        ) -> Result<(Option<usize>, Vec<u32>), Refusal> {
            let owned = self.owned(k);
            if owned && self.count(k) >= limit {
                return Err(Refusal::BucketFull { limit });
            }
            let mut evicted = Vec::new();
            let mut reclaimed = None;
            if !owned && self.in_use(nkeys) == self.poolsize {
                let v = self.victim().ok_or(Refusal::NoBuckets)?;
                // most recently stored first, as the bucket's own list
                while let Some(i) = self.conns.iter().position(|m| m.1 == v) {
                    evicted.push(self.conns.remove(i).0);
                }
                reclaimed = Some(evicted.len());
                if self.list(v) != Some(PROTECTED) {
                    if let Some(g) = ghost_index(v) {
                        self.ghosts.retain(|&(i, _)| i != g);
                        self.ghosts.push((g, v));
                    }
                }
                for l in &mut self.lists {
                    l.retain(|&x| x != v);
                }
            }
            if !owned {
                self.hits[k] = 0;
            }
            if self.conns.len() == self.capacity {
                let mut i = self.conns.len() - 1;
                let oldest = self.conns[i].1;
                if let Some(&p) = self.lists[PROBATION as usize].last() {
                    if self.list(oldest) == Some(PROTECTED) && self.count(p) > 0 {
                        i = self.conns.iter().rposition(|m| m.1 == p).unwrap();
                    }
                }
                evicted.push(self.remove_at(i));
            }
            self.conns.insert(0, (conn, k, usize::MAX));
            if !self.sliced {
                return Ok((reclaimed, evicted));
            }
            if !owned {
                let ghost = ghost_index(k).filter(|&g| self.ghosts.contains(&(g, k)));
                if let Some(g) = ghost {
                    self.ghosts.retain(|&(i, _)| i != g);
                    self.lists[PROTECTED as usize].insert(0, k);
                } else {
                    self.lists[PROBATION as usize].insert(0, k);
                }
            } else if self.list(k) == Some(EMPTY) {
                self.move_front(k, PROBATION);
            }
            Ok((reclaimed, evicted))
        }
    }

    /// A model check: random operations (take, store, remove) on small
    /// caches and on the naive model agree on every result, on the buckets
    /// owned and on the order of every list.
    #[test]
    fn agrees_with_a_naive_model() {
        for (capacity, poolsize, limit, nkeys, sliced) in [
            (6usize, 3usize, 3usize, 4usize, true),
            (6, 5, 2, 8, true),
            (4, 10, 4, 12, true),
            (3, 1, 3, 3, true),
            (8, 12, 3, 16, true),
            (5, 6, usize::MAX, 9, false),
        ] {
            model_check(capacity, poolsize, limit, nkeys, sliced);
        }
    }

    fn model_check(capacity: usize, poolsize: usize, limit: usize, nkeys: usize, sliced: bool) {
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let names: Vec<Vec<u8>> = (0..nkeys).map(|k| vec![b'a' + k as u8]).collect();
        // Unsliced caches tell buckets apart by address.
        let addrs: Vec<[u8; 8]> = (0..nkeys)
            .map(|k| [2, 0, 0, k as u8, 127, 0, 0, 1])
            .collect();
        let bk = |k: usize| {
            if sliced {
                key(A, &names[k])
            } else {
                key(&addrs[k], b"")
            }
        };
        let mut cache = if sliced {
            IdleCache::new(capacity, poolsize, 8).unwrap()
        } else {
            IdleCache::unsliced(capacity).unwrap()
        };
        let mut model = Model {
            sliced,
            capacity,
            poolsize: cache.buckets.len(),
            probation_min: (poolsize / 5).max(1),
            conns: Vec::new(),
            lists: [Vec::new(), Vec::new(), Vec::new()],
            hits: vec![0; nkeys],
            ghosts: Vec::new(),
        };
        let ghost_index: Vec<Option<usize>> = (0..nkeys)
            .map(|k| cache.ghost_of(cache.hash(&bk(k))).map(|g| g.0))
            .collect();
        // The bucket each key found when it last took, as a request carries
        // it from get peer to free peer; often stale by the time it stores.
        let mut found: Vec<Option<BucketRef>> = vec![None; nkeys];
        for conn in 0..20_000u32 {
            // Skewed towards a few keys, so that some are in steady use.
            let k = match next() % 4 {
                0 => (next() % nkeys as u64) as usize,
                _ => (next() % (nkeys as u64).div_ceil(3)) as usize,
            };
            match next() % 3 {
                0 => {
                    found[k] = cache.find(&bk(k));
                    let taken = found[k].and_then(|b| cache.take_from(b));
                    assert_eq!(taken, model.take(k), "take {k}");
                }
                1 => {
                    let expect = model.store(k, conn, limit, nkeys, |k| ghost_index[k]);
                    match put_at(&mut cache, found[k], &bk(k), conn, limit) {
                        Ok(got) => {
                            let (reclaimed, evicted) = expect.unwrap();
                            assert_eq!(
                                (got.reclaimed, got.evicted),
                                (reclaimed, evicted),
                                "store {k} at op {conn}"
                            );
                            model.conns[0].2 = got.slot;
                        }
                        Err(refusal) => assert_eq!(Err(refusal), expect.map(|_| ())),
                    }
                }
                _ => {
                    if !model.conns.is_empty() {
                        let i = (next() as usize) % model.conns.len();
                        let slot = model.conns[i].2;
                        let c = model.remove_at(i);
                        assert_eq!(cache.remove(slot), Some(c));
                    }
                }
            }
            assert_eq!(cache.len(), model.conns.len());
            assert_eq!(cache.buckets_in_use(), model.in_use(nkeys));
            assert!(cache.buckets_in_use() <= model.poolsize);
            for list in [PROTECTED, PROBATION, EMPTY] {
                let expect: Vec<Vec<u8>> = model.lists[list as usize]
                    .iter()
                    .map(|&k| names[k].clone())
                    .collect();
                assert_eq!(cache.keys_of(list), expect, "list {list} after op {conn}");
            }
            for k in 0..nkeys {
                assert_eq!(cache.bucket_len(&bk(k)), model.count(k));
                assert_eq!(cache.has_bucket(&bk(k)), model.owned(k));
            }
        }
    }

    /// What a trace did for its busy keys.
    #[derive(Debug, Clone, Copy)]
    struct TraceResult {
        requests: u32,
        hits: u32,
        opened: u32,
    }

    impl TraceResult {
        fn hit_ratio(&self) -> f64 {
            f64::from(self.hits) / f64::from(self.requests)
        }
    }

    /// A deterministic trace of the scenario (`keepalive 32
    /// slice_key=$host slice_conn=4`, 20 buckets): 8 clients, each sending
    /// requests for 5 busy keys in turn, a request's connection busy until
    /// its client is picked again; beside them, `one_off_per_100` requests
    /// per 100 busy requests for keys never seen before (each taking
    /// nothing and leaving its new connection). Fixed seed, xorshift.
    fn busy_trace(one_off_per_100: u32) -> TraceResult {
        const CLIENTS: usize = 8;
        const BUSY: usize = 5;
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let busy: Vec<Vec<u8>> = (0..BUSY)
            .map(|i| format!("busy{i}.example").into_bytes())
            .collect();
        let mut cache: IdleCache<u32> = IdleCache::new(32, 20, 40).unwrap();
        let mut in_flight: [Option<(usize, u32)>; CLIENTS] = [None; CLIENTS];
        let mut turn = [0usize; CLIENTS];
        let (mut conns, mut one_offs, mut owed) = (0u32, 0u32, 0u32);
        let mut result = TraceResult {
            requests: 0,
            hits: 0,
            opened: 0,
        };
        while result.requests < 200_000 {
            let c = (next() % CLIENTS as u64) as usize;
            match in_flight[c].take() {
                Some((k, conn)) => {
                    // refused (bucket full): the connection is closed
                    let _ = cache.store(&key(A, &busy[k]), conn, 4, |_| {});
                }
                None => {
                    let k = (c + turn[c]) % BUSY;
                    turn[c] += 1;
                    result.requests += 1;
                    let conn = match cache.take(&key(A, &busy[k])) {
                        Some(conn) => {
                            result.hits += 1;
                            conn
                        }
                        None => {
                            result.opened += 1;
                            conns += 1;
                            conns
                        }
                    };
                    in_flight[c] = Some((k, conn));

                    owed += one_off_per_100;
                    while owed >= 100 {
                        owed -= 100;
                        one_offs += 1;
                        conns += 1;
                        let name = format!("{:x}.random.example", next() ^ u64::from(one_offs));
                        assert_eq!(cache.take(&key(A, name.as_bytes())), None);
                        cache
                            .store(&key(A, name.as_bytes()), conns, 4, |_| {})
                            .unwrap();
                    }
                }
            }
        }
        result
    }

    /// The measure, in the cache alone: busy keys keep their hit
    /// ratio, and open at most twice the connections, whatever the stream
    /// of one-off keys beside them (a trickle, as many as busy requests,
    /// ten times as many).
    #[test]
    fn one_off_keys_do_not_cost_busy_keys_their_connections() {
        let quiet = busy_trace(0);
        println!(
            "busy keys alone: hit ratio {:.4}, {} connections opened for {} requests",
            quiet.hit_ratio(),
            quiet.opened,
            quiet.requests
        );
        assert!(quiet.hit_ratio() > 0.9, "{quiet:?}");
        for one_off_per_100 in [1, 100, 1000] {
            let flood = busy_trace(one_off_per_100);
            println!(
                "with {one_off_per_100} one-off keys per 100 busy requests: hit ratio {:.4}, \
                 {} connections opened",
                flood.hit_ratio(),
                flood.opened
            );
            assert!(
                flood.hit_ratio() >= quiet.hit_ratio() - 0.005,
                "{one_off_per_100}/100: {flood:?}, alone {quiet:?}"
            );
            assert!(
                flood.opened <= 2 * quiet.opened,
                "{one_off_per_100}/100: {flood:?}, alone {quiet:?}"
            );
        }
    }
}
