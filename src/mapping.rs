//! Memory mapped from the kernel at configuration time, resident only
//! where it is written: the room of the upstreams' caches for the long
//! part of their addresses (TLS identities, see the core's
//! `cache::Overflow`).
//!
//! Every upstream needs that room if it may be reached over TLS, which the
//! configuration does not tell (`proxy_pass https://$name` chooses at
//! request time). Mapped rather than allocated, it costs an upstream that
//! is never reached over TLS address space only: the pages are the
//! kernel's zero page until a TLS connection is kept, and then only those
//! of the buckets written.
//!
//! Ownership: one [`Arena`] per configuration (in the module's main
//! configuration) owns the mappings; each cache holds a [`Region`] of it,
//! carved at configuration time, never freed alone. The arena is created
//! with the http main configuration, before any cache, so the pool's
//! cleanups (last registered, first run) drop the caches before the arena
//! unmaps: no region outlives its mapping. The master maps with the
//! configuration; workers inherit the mappings (private: each writes its
//! own copy of a page it touches).

use core::ptr::{self, NonNull};

/// Bytes mapped at once: the regions of many upstreams share a mapping
/// (one `mmap` for thousands of upstreams, not one each).
const CHUNK: usize = 64 << 20;

/// The mappings of one configuration, carved into regions.
#[derive(Default)]
pub struct Arena {
    chunks: Vec<Mapping>,
    /// Bytes of the last chunk given out.
    used: usize,
}

impl Arena {
    /// `len` zeroed bytes, none resident until written, for as long as the
    /// arena lives; `None` if the kernel refuses the address space.
    pub fn carve(&mut self, len: usize) -> Option<Region> {
        if len == 0 {
            return Some(Region {
                base: NonNull::dangling(),
                len: 0,
            });
        }
        // Eight-byte aligned, as the heap's would be.
        let start = self.used.next_multiple_of(8);
        let fits = self
            .chunks
            .last()
            .is_some_and(|chunk| start.checked_add(len).is_some_and(|end| end <= chunk.len));
        let start = if fits {
            start
        } else {
            self.chunks.try_reserve(1).ok()?;
            self.chunks.push(Mapping::zeroed(len.max(CHUNK))?);
            0
        };
        let chunk = self.chunks.last()?;
        self.used = start + len;
        // SAFETY: `start + len` is within the chunk (checked above, or the
        // chunk was mapped for at least `len`).
        let base = unsafe { chunk.base.add(start) };
        Some(Region { base, len })
    }
}

/// A cache's part of an [`Arena`]: plain bytes, unmapped with the arena.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes of a live mapping (the arena outlives every
        // cache, see the header), given to this region alone; or none, at
        // a dangling, aligned pointer.
        unsafe { core::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for Region {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, borrowed mutably through `self` alone.
        unsafe { core::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

impl core::fmt::Debug for Region {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Region({} bytes)", self.len)
    }
}

/// Anonymous private memory of a fixed length, zeroed, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// `len` (not 0) bytes of zeroed memory, none of it resident yet;
    /// `None` if the kernel refuses the address space.
    fn zeroed(len: usize) -> Option<Mapping> {
        // SAFETY: a new anonymous mapping, placed by the kernel; nothing
        // else refers to its range.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        // Transparent huge pages would make the first byte written fault
        // in 2 MiB where a bucket needs a few hundred bytes (THP is
        // "always" on some systems). Advice only: its failure changes
        // nothing else.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
        Some(Mapping {
            base: NonNull::new(base.cast())?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `zeroed`, unmapped once; no region
        // of it is used after (see the header).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
