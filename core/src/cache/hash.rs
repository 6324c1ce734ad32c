//! Hashing and comparing keys a word at a time: bucket keys are short
//! (a socket address, a host name), so the usual byte loops would cost
//! more than the lookup.

/// The hash state: FxHash's step (rotate, xor, multiply) per 64-bit word.
pub(super) struct Mix(pub(super) u64);

impl Mix {
    #[inline]
    pub(super) fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    pub(super) fn bytes(&mut self, bytes: &[u8]) {
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
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
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
