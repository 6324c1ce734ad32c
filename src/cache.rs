//! The per-upstream cache of idle connections, in safe Rust.
//!
//! Everything is sized when the configuration is read and never grows: an
//! arena of `capacity` [`IdleSlot`]s linked by index into one global LRU list
//! and into per-[`Bucket`] lists, a pool of buckets with their key storage,
//! and a chained hash table over the buckets. A bucket is the set of idle
//! connections that one request may take: same server address, same slice
//! key (when sliced), same location tag (with `local`). Every operation is
//! O(1) expected; nothing scans the whole cache.
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

const NIL: u32 = u32::MAX;

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
    /// It needs a new bucket and all `poolsize` buckets are in use.
    PoolExhausted { poolsize: usize },
    /// The cache holds no connections at all (`keepalive 0`) or the address
    /// is longer than [`MAX_ADDR_LEN`].
    Unusable,
}

/// Where a stored connection went, and which connection the LRU eviction
/// pushed out to make room (the caller closes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored<C> {
    pub slot: usize,
    pub evicted: Option<C>,
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

#[derive(Clone, Copy, Debug)]
struct Bucket {
    hash: u64,
    tag: usize,
    addr_len: u16,
    slice_len: u32,
    /// Next bucket in the same hash chain, or in the free list.
    chain_next: u32,
    /// Most recently stored slot of this bucket.
    head: u32,
    count: u32,
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
    len: usize,
    buckets_in_use: usize,
}

impl<C: Copy> IdleCache<C> {
    /// A cache of `capacity` idle connections spread over at most
    /// `poolsize` buckets, slice keys cut to `keylen` bytes.
    ///
    /// Without slicing, pass `poolsize` = `capacity + 1` and `keylen` = 0:
    /// every stored connection then finds a bucket even when all others sit
    /// in distinct buckets, as in nginx's own cache.
    ///
    /// `None` if the sizes are beyond what the index links can address or
    /// the memory cannot be allocated: the configuration is refused, nginx
    /// does not abort.
    pub fn new(capacity: usize, poolsize: usize, keylen: usize) -> Option<Self> {
        if capacity >= NIL as usize || poolsize >= NIL as usize {
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
            addr_len: 0,
            slice_len: 0,
            chain_next: link(i, poolsize),
            head: NIL,
            count: 0,
        })?;

        // Load factor at most 1/2, power of two so a mask picks the chain.
        let table_len = poolsize.checked_mul(2)?.checked_next_power_of_two()?.max(1);

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
            len: 0,
            buckets_in_use: 0,
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
    }

    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buckets holding at least one idle connection.
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

    /// Takes the most recently stored connection of `key`'s bucket.
    pub fn take(&mut self, key: &BucketKey) -> Option<C> {
        let b = self.find_bucket(key, self.hash(key));
        if b == NIL {
            return None;
        }
        let slot = self.buckets[b as usize].head;
        self.remove(slot as usize)
    }

    /// Stores `conn` in `key`'s bucket, which may hold at most `limit` idle
    /// connections. When the cache is full, the least recently stored
    /// connection of any bucket is evicted and returned for closing.
    pub fn store(&mut self, key: &BucketKey, conn: C, limit: usize) -> Result<Stored<C>, Refusal> {
        if self.slots.is_empty() || key.addr.len() > MAX_ADDR_LEN {
            return Err(Refusal::Unusable);
        }
        if limit == 0 {
            return Err(Refusal::ZeroLimit);
        }

        let hash = self.hash(key);
        let found = self.find_bucket(key, hash);
        if found != NIL && self.buckets[found as usize].count as usize >= limit {
            return Err(Refusal::BucketFull { limit });
        }
        if found == NIL && self.free_bucket == NIL {
            return Err(Refusal::PoolExhausted {
                poolsize: self.buckets.len(),
            });
        }

        // Evicting may empty and release the very bucket we are about to
        // use, so the bucket is looked up again afterwards.
        let evicted = if self.free_slot == NIL {
            let tail = self.lru_tail as usize;
            self.remove(tail)
        } else {
            None
        };

        let b = match found {
            NIL => self.acquire_bucket(key, hash),
            b if evicted.is_some() => match self.find_bucket(key, hash) {
                NIL => self.acquire_bucket(key, hash),
                _ => b,
            },
            b => b,
        };

        let slot = self.free_slot;
        self.free_slot = self.slots[slot as usize].bucket_next;

        let old_head = self.buckets[b as usize].head;
        let lru_head = self.lru_head;
        {
            let s = &mut self.slots[slot as usize];
            s.conn = Some(conn);
            s.bucket = b;
            s.bucket_prev = NIL;
            s.bucket_next = old_head;
            s.lru_prev = NIL;
            s.lru_next = lru_head;
        }
        if old_head != NIL {
            self.slots[old_head as usize].bucket_prev = slot;
        }
        self.buckets[b as usize].head = slot;
        self.buckets[b as usize].count += 1;

        if lru_head != NIL {
            self.slots[lru_head as usize].lru_prev = slot;
        } else {
            self.lru_tail = slot;
        }
        self.lru_head = slot;
        self.len += 1;

        Ok(Stored {
            slot: slot as usize,
            evicted,
        })
    }

    /// Removes the connection in `slot` (closed by the backend, timed out,
    /// or closed at shutdown). Its bucket goes back to the pool when this
    /// was its last connection. `None` if the slot was already free.
    pub fn remove(&mut self, slot: usize) -> Option<C> {
        let s = *self.slots.get(slot)?;
        let conn = s.conn?;
        let slot = slot as u32;

        match s.lru_prev {
            NIL => self.lru_head = s.lru_next,
            p => self.slots[p as usize].lru_next = s.lru_next,
        }
        match s.lru_next {
            NIL => self.lru_tail = s.lru_prev,
            n => self.slots[n as usize].lru_prev = s.lru_prev,
        }

        let b = s.bucket as usize;
        match s.bucket_prev {
            NIL => self.buckets[b].head = s.bucket_next,
            p => self.slots[p as usize].bucket_next = s.bucket_next,
        }
        if s.bucket_next != NIL {
            self.slots[s.bucket_next as usize].bucket_prev = s.bucket_prev;
        }
        self.buckets[b].count -= 1;
        if self.buckets[b].count == 0 {
            self.release_bucket(b as u32);
        }

        let free = &mut self.slots[slot as usize];
        free.conn = None;
        free.bucket = NIL;
        free.lru_prev = NIL;
        free.lru_next = NIL;
        free.bucket_prev = NIL;
        free.bucket_next = self.free_slot;
        self.free_slot = slot;
        self.len -= 1;

        Some(conn)
    }

    #[inline]
    fn hash(&self, key: &BucketKey) -> u64 {
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
        // of the last product into them.
        h.0 ^ (h.0 >> 32)
    }

    fn cut<'k>(&self, slice: &'k [u8]) -> &'k [u8] {
        &slice[..slice.len().min(self.keylen)]
    }

    fn chain(&self, hash: u64) -> usize {
        (hash as usize) & (self.table.len() - 1)
    }

    fn addr_of(&self, b: usize) -> &[u8] {
        let start = b * MAX_ADDR_LEN;
        &self.addrs[start..start + self.buckets[b].addr_len as usize]
    }

    fn slice_of(&self, b: usize) -> &[u8] {
        let start = b * self.keylen;
        &self.slices[start..start + self.buckets[b].slice_len as usize]
    }

    #[inline]
    fn find_bucket(&self, key: &BucketKey, hash: u64) -> u32 {
        let slice = self.cut(key.slice);
        let mut b = self.table[self.chain(hash)];
        while b != NIL {
            let bucket = &self.buckets[b as usize];
            if bucket.hash == hash
                && bucket.tag == key.tag
                && same(self.addr_of(b as usize), key.addr)
                && same(self.slice_of(b as usize), slice)
            {
                return b;
            }
            b = bucket.chain_next;
        }
        NIL
    }

    fn acquire_bucket(&mut self, key: &BucketKey, hash: u64) -> u32 {
        let b = self.free_bucket;
        let i = b as usize;
        self.free_bucket = self.buckets[i].chain_next;

        let slice = self.cut(key.slice);
        self.addrs[i * MAX_ADDR_LEN..i * MAX_ADDR_LEN + key.addr.len()].copy_from_slice(key.addr);
        self.slices[i * self.keylen..i * self.keylen + slice.len()].copy_from_slice(slice);

        let chain = self.chain(hash);
        self.buckets[i] = Bucket {
            hash,
            tag: key.tag,
            addr_len: key.addr.len() as u16,
            slice_len: slice.len() as u32,
            chain_next: self.table[chain],
            head: NIL,
            count: 0,
        };
        self.table[chain] = b;
        self.buckets_in_use += 1;
        b
    }

    fn release_bucket(&mut self, b: u32) {
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
        self.buckets[b as usize].chain_next = self.free_bucket;
        self.buckets[b as usize].head = NIL;
        self.free_bucket = b;
        self.buckets_in_use -= 1;
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
        // The common lengths without a loop: no key, and a sockaddr_in.
        match bytes.len() {
            0 => return,
            16 => {
                self.word(word(&bytes[..8]));
                self.word(word(&bytes[8..]));
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
            self.word(tail_word(rest));
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
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // The common lengths without a loop: no key, and a sockaddr_in.
    match a.len() {
        0 => return true,
        16 => {
            return word(&a[..8]) == word(&b[..8]) && word(&a[8..16]) == word(&b[8..16]);
        }
        _ => {}
    }
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in (&mut x).zip(&mut y) {
        if word(p) != word(q) {
            return false;
        }
    }
    x.remainder().iter().zip(y.remainder()).all(|(p, q)| p == q)
}

/// A chunk of exactly eight bytes as a word (anything else reads as 0).
#[inline]
fn word(chunk: &[u8]) -> u64 {
    <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes)
}

/// The last, shorter chunk as a zero-padded word.
#[inline]
fn tail_word(rest: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    for (d, s) in w.iter_mut().zip(rest) {
        *d = *s;
    }
    u64::from_le_bytes(w)
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
        assert!(bucket_and_key <= 64 + MAX_ADDR_LEN + 1, "{bucket_and_key}");

        // The README's figures: an unsliced keepalive 1024 (a bucket per
        // connection) stays under 512 KiB, the sliced defaults under 64 KiB,
        // and the largest sizes the directive accepts are bounded.
        assert!(bytes(1024, 1025, 0) < 512 << 10);
        assert!(bytes(1024, 20, 40) < 64 << 10);
        assert!(bytes(1 << 16, (1 << 16) + 1, 0) < 32 << 20);
        assert!(bytes(1 << 16, (1 << 16) + 1, 1024) < 96 << 20);
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
        IdleCache::new(capacity, capacity + 1, 0).unwrap()
    }

    #[test]
    fn takes_only_from_the_same_address() {
        let mut cache = unsliced(4);
        cache.store(&key(A, b""), 1, usize::MAX).unwrap();
        assert_eq!(cache.take(&key(B, b"")), None);
        assert_eq!(cache.take(&key(A, b"")), Some(1));
        assert_eq!(cache.take(&key(A, b"")), None);
        assert!(cache.is_empty());
        assert_eq!(cache.buckets_in_use(), 0);
    }

    #[test]
    fn takes_the_most_recent_of_a_bucket() {
        let mut cache = unsliced(4);
        for c in 1..=3 {
            cache.store(&key(A, b""), c, usize::MAX).unwrap();
        }
        assert_eq!(cache.take(&key(A, b"")), Some(3));
        assert_eq!(cache.take(&key(A, b"")), Some(2));
    }

    #[test]
    fn evicts_the_least_recently_stored_when_full() {
        let mut cache = unsliced(2);
        cache.store(&key(A, b""), 1, usize::MAX).unwrap();
        cache.store(&key(B, b""), 2, usize::MAX).unwrap();
        let stored = cache.store(&key(B, b""), 3, usize::MAX).unwrap();
        assert_eq!(stored.evicted, Some(1));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.take(&key(A, b"")), None);
        assert_eq!(cache.bucket_len(&key(B, b"")), 2);
    }

    #[test]
    fn eviction_that_empties_the_target_bucket_still_stores() {
        let mut cache = unsliced(1);
        cache.store(&key(A, b""), 1, usize::MAX).unwrap();
        let stored = cache.store(&key(A, b""), 2, usize::MAX).unwrap();
        assert_eq!(stored.evicted, Some(1));
        assert_eq!(cache.take(&key(A, b"")), Some(2));
    }

    #[test]
    fn unsliced_cache_never_runs_out_of_buckets() {
        let mut cache = unsliced(3);
        for port in 0..50u8 {
            let addr = [2, 0, 0, port, 127, 0, 0, 1];
            cache
                .store(&key(&addr, b""), u32::from(port), usize::MAX)
                .unwrap();
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.buckets_in_use(), 3);
    }

    #[test]
    fn slices_by_key_within_an_address() {
        let mut cache = IdleCache::new(8, 4, 40).unwrap();
        cache.store(&key(A, b"a.example"), 1, 2).unwrap();
        cache.store(&key(A, b"b.example"), 2, 2).unwrap();
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
        cache.store(&one, 1, usize::MAX).unwrap();
        assert_eq!(cache.take(&two), None);
        assert_eq!(cache.take(&one), Some(1));
    }

    #[test]
    fn refuses_beyond_the_bucket_limit() {
        let mut cache = IdleCache::new(8, 4, 40).unwrap();
        cache.store(&key(A, b"a"), 1, 2).unwrap();
        cache.store(&key(A, b"a"), 2, 2).unwrap();
        assert_eq!(
            cache.store(&key(A, b"a"), 3, 2),
            Err(Refusal::BucketFull { limit: 2 })
        );
        assert_eq!(cache.store(&key(A, b"b"), 4, 0), Err(Refusal::ZeroLimit));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn pool_exhaustion_then_recovery() {
        let mut cache = IdleCache::new(8, 2, 40).unwrap();
        let a = cache.store(&key(A, b"a"), 1, 4).unwrap();
        let b = cache.store(&key(A, b"b"), 2, 4).unwrap();
        assert_eq!(
            cache.store(&key(A, b"c"), 3, 4),
            Err(Refusal::PoolExhausted { poolsize: 2 })
        );
        // The backend closes both idle connections: their buckets return.
        assert_eq!(cache.remove(a.slot), Some(1));
        assert_eq!(cache.remove(b.slot), Some(2));
        assert_eq!(cache.buckets_in_use(), 0);
        cache.store(&key(A, b"c"), 3, 4).unwrap();
        assert_eq!(cache.take(&key(A, b"c")), Some(3));
    }

    #[test]
    fn eviction_updates_the_evicted_bucket() {
        let mut cache = IdleCache::new(2, 4, 40).unwrap();
        cache.store(&key(A, b"a"), 1, 2).unwrap();
        cache.store(&key(A, b"a"), 2, 2).unwrap();
        let stored = cache.store(&key(A, b"b"), 3, 2).unwrap();
        assert_eq!(stored.evicted, Some(1));
        assert_eq!(cache.bucket_len(&key(A, b"a")), 1);
        // Bucket a has room again; the cache is full, so the oldest (2) goes.
        let stored = cache.store(&key(A, b"a"), 4, 2).unwrap();
        assert_eq!(stored.evicted, Some(2));
        assert_eq!(cache.bucket_len(&key(A, b"a")), 1);
        assert_eq!(cache.bucket_len(&key(A, b"b")), 1);
    }

    #[test]
    fn keys_are_cut_to_keylen() {
        let mut cache = IdleCache::new(4, 4, 4).unwrap();
        cache.store(&key(A, b"abcdXXX"), 1, 4).unwrap();
        assert_eq!(cache.take(&key(A, b"abcdYYY")), Some(1));
        cache.store(&key(A, b"abc"), 2, 4).unwrap();
        assert_eq!(cache.take(&key(A, b"abcd")), None);
    }

    #[test]
    fn remove_of_a_free_slot_is_harmless() {
        let mut cache = unsliced(2);
        let s = cache.store(&key(A, b""), 1, usize::MAX).unwrap();
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
            cache.store(&key(&long, b""), 1, usize::MAX),
            Err(Refusal::Unusable)
        );
        assert_eq!(cache.take(&key(&long, b"")), None);
        cache
            .store(&key(&long[..MAX_ADDR_LEN], b""), 2, usize::MAX)
            .unwrap();
        assert_eq!(cache.take(&key(&long[..MAX_ADDR_LEN], b"")), Some(2));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let mut cache: IdleCache<u32> = IdleCache::new(0, 1, 0).unwrap();
        assert_eq!(
            cache.store(&key(A, b""), 1, usize::MAX),
            Err(Refusal::Unusable)
        );
    }

    #[test]
    fn impossible_sizes_are_refused_not_aborted() {
        assert!(IdleCache::<u32>::new(usize::MAX, 1, 0).is_none());
        assert!(IdleCache::<u32>::new(1, usize::MAX, 0).is_none());
        assert!(IdleCache::<u32>::new(1, 1 << 31, usize::MAX).is_none());
        assert!(IdleCache::<u32>::new(1, 1 << 20, 1 << 50).is_none());
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
                cache.store(&key(&addr, b""), 1, usize::MAX).unwrap();
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
                cache.store(&key(A, &slice), 1, 2).unwrap();
                assert_eq!(cache.take(&key(A, &other)), None, "len {len} byte {i}");
                assert_eq!(cache.take(&key(A, &slice[..len - 1])), None);
                assert_eq!(cache.take(&key(A, &slice)), Some(1));
            }
        }
    }

    /// A model check: random operations against a naive list agree.
    #[test]
    fn agrees_with_a_naive_model() {
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let keys: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
        let (capacity, poolsize, limit) = (6usize, 3usize, 3usize);
        let mut cache = IdleCache::new(capacity, poolsize, 8).unwrap();
        // model: (conn, key index, slot), most recent first
        let mut model: Vec<(u32, usize, usize)> = Vec::new();
        for conn in 0..20_000u32 {
            let k = (next() % 4) as usize;
            let bk = key(A, keys[k]);
            match next() % 3 {
                0 => {
                    let expect = model.iter().position(|&(_, mk, _)| mk == k);
                    let got = cache.take(&bk);
                    assert_eq!(got, expect.map(|i| model.remove(i).0));
                }
                1 => {
                    let in_bucket = model.iter().filter(|&&(_, mk, _)| mk == k).count();
                    let mut distinct: Vec<usize> = model.iter().map(|m| m.1).collect();
                    distinct.sort();
                    distinct.dedup();
                    let result = cache.store(&bk, conn, limit);
                    if in_bucket >= limit {
                        assert_eq!(result, Err(Refusal::BucketFull { limit }));
                    } else if in_bucket == 0 && distinct.len() >= poolsize {
                        assert_eq!(result, Err(Refusal::PoolExhausted { poolsize }));
                    } else {
                        let stored = result.unwrap();
                        let evicted = if model.len() == capacity {
                            model.pop().map(|m| m.0)
                        } else {
                            None
                        };
                        assert_eq!(stored.evicted, evicted);
                        model.insert(0, (conn, k, stored.slot));
                    }
                }
                _ => {
                    if !model.is_empty() {
                        let i = (next() as usize) % model.len();
                        let (c, _, slot) = model.remove(i);
                        assert_eq!(cache.remove(slot), Some(c));
                    }
                }
            }
            assert_eq!(cache.len(), model.len());
            let mut distinct: Vec<usize> = model.iter().map(|m| m.1).collect();
            distinct.sort();
            distinct.dedup();
            assert_eq!(cache.buckets_in_use(), distinct.len());
        }
    }
}
