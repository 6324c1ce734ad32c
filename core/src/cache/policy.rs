//! Which bucket a new key takes and which connection makes room: the
//! S3-FIFO-like policy described in the cache's documentation (probation,
//! protected, ghosts; the spare list of an unsliced cache).

use core::num::NonZeroU32;

use super::{
    Bucket, BucketKey, IdleCache, Overflow, EMPTY, HITS_TO_PROTECT, NIL, NO_ADDR, NO_LIST,
    PROBATION, PROTECTED, SPARE, VICTIM_STEPS,
};

impl<C: Copy, O: Overflow> IdleCache<C, O> {
    /// A bucket for `key`, which has none: a free one, or the bucket of a
    /// less valuable key, whose idle connections go to `evicted`
    /// (`reclaimed` then says how many). The new bucket is in no list yet.
    /// NIL when the pool has no bucket to give.
    #[inline(always)]
    pub(super) fn acquire_bucket(
        &mut self,
        key: &BucketKey,
        hash: u32,
        evicted: &mut impl FnMut(C),
        reclaimed: &mut Option<usize>,
    ) -> u32 {
        let b = match self.make_bucket() {
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
            b => b,
        };
        let i = b as usize;

        let slice = self.cut(key.slice);
        self.put_addr(i, key.addr);
        self.slices[i * self.keylen..i * self.keylen + slice.len()].copy_from_slice(slice);

        // A free bucket holds no connection and is in no list (`unchain`,
        // `unlink`): only the key and the request count are new.
        let addr_len = self.kept_len(key.addr);
        let chain = self.chain(hash);
        let bucket = &mut self.buckets[i];
        bucket.hash = hash;
        bucket.tag = key.tag;
        bucket.chain_next = self.table[chain];
        bucket.slice_len = slice.len() as u16;
        bucket.addr_len = addr_len;
        bucket.hits = 0;
        self.table[chain] = b;
        if self.sliced {
            self.buckets_in_use += 1;
        }
        b
    }

    /// A new bucket, free, in no list and no chain, while the pool has room
    /// for one; NIL once `poolsize` are made. Made on demand, so that the
    /// memory of buckets no key needed is never written: an unsliced cache
    /// of N connections to one server makes one bucket per protocol and
    /// TLS identity, not N + 1.
    #[inline(never)]
    pub(super) fn make_bucket(&mut self) -> u32 {
        let b = self.buckets.len();
        if b >= self.poolsize {
            return NIL;
        }
        // Within the room reserved: these never reallocate.
        self.buckets.push(Bucket {
            hash: 0,
            tag: 0,
            chain_next: NIL,
            head: NIL,
            tail: NIL,
            count: 0,
            prev: NIL,
            next: NIL,
            generation: NonZeroU32::MIN,
            slice_len: 0,
            addr_len: NO_ADDR,
            list: NO_LIST,
            hits: 0,
        });
        self.addrs.resize(self.addrs.len() + self.room as usize, 0);
        self.slices.resize(self.slices.len() + self.keylen, 0);
        b as u32
    }

    /// The oldest spare bucket (unsliced): buckets of the spare list that
    /// hold connections again leave it on the way. Amortised O(1): a bucket
    /// enters the list once each time it is emptied.
    #[inline(always)]
    pub(super) fn spare_bucket(&mut self) -> u32 {
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
    pub(super) fn take_from_another_key(
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
    pub(super) fn victim(&mut self) -> u32 {
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
    pub(super) fn evict_one(&mut self, evicted: &mut impl FnMut(C)) {
        if let Some(c) = self.remove(self.eviction_slot() as usize) {
            evicted(c);
        }
    }

    /// The connection evicted when the cache is full: the least recently
    /// stored one, unless it belongs to a protected key while the oldest
    /// bucket of probation holds connections; then the least recently
    /// stored of those. Connections of keys seen once thus make room for
    /// each other, not for keys in steady use.
    pub(super) fn eviction_slot(&self) -> u32 {
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
    pub(super) fn ghost_of(&self, hash: u32) -> Option<(usize, u32)> {
        if self.ghosts.is_empty() {
            return None;
        }
        // The index from the high bits (the chain takes the low ones).
        let i = hash.rotate_left(16) as usize & (self.ghosts.len() - 1);
        Some((i, hash | 1))
    }

    /// Whether a key with `hash` lost its bucket in probation lately (and
    /// forgets it).
    pub(super) fn is_ghost(&mut self, hash: u32) -> bool {
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
    pub(super) fn reclaim(&mut self, b: u32, evicted: &mut impl FnMut(C)) -> usize {
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
}
