//! What an upstream connection is bound to, beyond its server address, in
//! plain Rust (the values are read from the request by `identity_ffi`).
//!
//! A connection is opened by one protocol handler (proxy over HTTP/1.x,
//! proxy over HTTP/2, gRPC, FastCGI, ...) and, over TLS, with one SNI name,
//! one verification of the server's certificate and possibly one client
//! certificate. Reusing it for a request that would have opened it
//! differently is wrong: a request for `b.test` on a connection verified
//! for `a.test` skips its own verification, a request without a client
//! certificate travels authenticated as someone else, an HTTP/1.1 request
//! on an HTTP/2 connection hangs. So every bucket of the idle cache is
//! keyed by this identity too, and requests share connections only when
//! their identities are equal, byte for byte (never a hash: the SNI name
//! is often the client's `Host`).
//!
//! The protocol is a word (the handler's `create_request`, see
//! `identity_ffi`), the bucket's tag unless `local` gives it the location
//! (whose handler fixes the protocol). The TLS part is a byte string built
//! here and appended to the server address ([`tls_address`]), so that a
//! plain connection's key is exactly what it was:
//!
//! ```text
//! context  8 bytes   the location's SSL context (ngx_ssl_t *): trusted
//!                    CAs, CRLs, verify depth, static client certificate,
//!                    protocols, ciphers all live in it
//! flags    1 byte    verify, server_name, name present, certificate present
//! name     2 + n     the name sent as SNI and/or verified, port stripped
//! cert     2 + n     a variable client certificate, as evaluated
//! key      2 + n     and its key
//! ```
//!
//! Length prefixes make the encoding injective: equal bytes mean equal
//! values, field by field.

use core::fmt;

pub use crate::cache::{MAX_ADDR_LEN, MAX_TLS_IDENTITY};

/// The first two bytes of a TLS address, where a socket address has its
/// family: no system has a family 0xffff (Linux has fewer than 64), so a
/// TLS address never equals a plain socket address.
const TLS_MARK: [u8; 2] = [0xff, 0xff];
const TLS_ADDRESS_HEADER: usize = 4;

const VERIFY: u8 = 1;
const SERVER_NAME: u8 = 2;
const HAS_NAME: u8 = 4;
const HAS_CERTIFICATE: u8 = 8;
const HEADER: usize = 9;

/// The TLS settings and per-request values that make one connection
/// differ from another to the same server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsIdentity<'a> {
    /// The location's SSL context, an address: contexts are shared by
    /// locations that inherit their SSL settings, distinct otherwise.
    pub context: usize,
    /// `*_ssl_verify on`.
    pub verify: bool,
    /// `*_ssl_server_name on`.
    pub server_name: bool,
    /// The evaluated `*_ssl_name` (or the upstream's name), as nginx takes
    /// it before stripping a port. Ignored unless `verify` or
    /// `server_name`: nginx then neither sends nor checks it.
    pub name: Option<&'a [u8]>,
    /// A variable `*_ssl_certificate` and its key, as evaluated (nginx's
    /// values end in a NUL). An empty certificate presents none.
    pub certificate: Option<(&'a [u8], &'a [u8])>,
}

/// The identity does not fit the bytes available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLong {
    pub len: usize,
}

impl TlsIdentity<'_> {
    /// The name nginx sends and verifies, exactly as
    /// `ngx_http_upstream_ssl_name()` computes it, or `None` when it uses
    /// none.
    #[inline]
    pub fn effective_name(&self) -> Option<&[u8]> {
        if !(self.verify || self.server_name) {
            return None;
        }
        self.name.map(strip_port)
    }

    /// The client certificate and key presented, `None` if none is (an
    /// empty evaluated certificate, as nginx decides by its first byte).
    pub fn effective_certificate(&self) -> Option<(&[u8], &[u8])> {
        self.certificate
            .filter(|(cert, _)| cert.first().is_some_and(|&b| b != 0))
    }

    /// Writes the identity into `out`; returns its length.
    #[inline]
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooLong> {
        let name = self.effective_name();
        let certificate = self.effective_certificate();

        let len = HEADER
            + name.map_or(0, |n| 2 + n.len())
            + certificate.map_or(0, |(c, k)| 4 + c.len() + k.len());
        let fields = [name, certificate.map(|c| c.0), certificate.map(|c| c.1)];
        if len > out.len()
            || fields
                .iter()
                .flatten()
                .any(|f| f.len() > usize::from(u16::MAX))
        {
            return Err(TooLong { len });
        }

        let mut flags = 0;
        for (on, bit) in [
            (self.verify, VERIFY),
            (self.server_name, SERVER_NAME),
            (name.is_some(), HAS_NAME),
            (certificate.is_some(), HAS_CERTIFICATE),
        ] {
            if on {
                flags |= bit;
            }
        }

        let mut w = Writer { out, at: 0 };
        w.put(&(self.context as u64).to_le_bytes());
        w.put(&[flags]);
        for field in fields.into_iter().flatten() {
            w.put(&(field.len() as u16).to_le_bytes());
            w.put(field);
        }
        Ok(w.at)
    }
}

/// The address a TLS connection is kept under: the mark, the socket
/// address's length (2 bytes), the socket address, then its TLS identity
/// (which may use all the room the socket address leaves, at least
/// [`MAX_TLS_IDENTITY`] bytes). Returns its length in `out`.
#[inline]
pub fn tls_address(sockaddr: &[u8], id: &TlsIdentity, out: &mut [u8]) -> Result<usize, TooLong> {
    let head = TLS_ADDRESS_HEADER + sockaddr.len();
    let socklen = u16::try_from(sockaddr.len()).map_err(|_| TooLong { len: head })?;
    let Some((front, rest)) = out.split_at_mut_checked(head) else {
        return Err(TooLong { len: head });
    };
    let mut w = Writer { out: front, at: 0 };
    w.put(&TLS_MARK);
    w.put(&socklen.to_le_bytes());
    w.put(sockaddr);
    id.encode(rest)
        .map(|len| head + len)
        .map_err(|e| TooLong { len: e.len })
}

/// The TLS identity in an address made by [`tls_address`]; empty for a
/// plain socket address.
#[inline]
pub fn tls_part(addr: &[u8]) -> &[u8] {
    match addr {
        [m0, m1, l0, l1, rest @ ..] if [*m0, *m1] == TLS_MARK => rest
            .get(usize::from(u16::from_le_bytes([*l0, *l1]))..)
            .unwrap_or_default(),
        _ => &[],
    }
}

/// The TLS name encoded in an address made by [`tls_address`], `None`
/// when the identity holds none (or `addr` is a plain socket address).
#[inline]
pub fn tls_name(addr: &[u8]) -> Option<&[u8]> {
    let mut r = Reader(tls_part(addr));
    let (_, flags) = (r.take(8)?, r.take(1)?);
    if flags.first()? & HAS_NAME == 0 {
        return None;
    }
    r.field()
}

/// How many built TLS addresses an upstream keeps per worker
/// ([`TlsAddresses`]); the identities past them are built per try.
pub const MAX_TLS_ADDRESSES: usize = 32;

/// TLS addresses built once and kept for the cycle, per upstream and
/// worker: the address of a location (its upstream configuration, `conf`),
/// a server's socket address and the name nginx uses, when nothing else
/// of the identity can change per request (no variable client
/// certificate). The name is compared as read, byte for byte, so a
/// variable name finds the address of its own value only. Entries are
/// never changed nor dropped before the cycle's end: a request keeps the
/// address it found, without copying it.
pub struct TlsAddresses {
    /// Room for `MAX_TLS_ADDRESSES`, reserved at the first: an entry's
    /// address is its identity's id, and must not move (the vector never
    /// grows past its room, so never reallocates).
    entries: Vec<TlsEntry>,
    /// The entry found last: every try of a lone server and location.
    recent: usize,
    /// What [`TlsAddresses::recent`] compares and gives of that entry,
    /// copied beside the entries: such a try reads no entry.
    last: Last,
}

impl Default for TlsAddresses {
    fn default() -> Self {
        TlsAddresses {
            entries: Vec::new(),
            recent: 0,
            last: Last::NONE,
        }
    }
}

/// The entry found last, as [`TlsAddresses::recent`] compares it.
#[derive(Clone, Copy)]
struct Last {
    conf: usize,
    tag: usize,
    /// `usize::MAX` (no socket address's length) before the first entry.
    socklen: usize,
    /// As the entry's `head`, in two words (a `u128` would align the idle
    /// state that holds this to 16 bytes, beyond what nginx's pools give).
    head: [u64; 2],
    found: Found,
}

impl Last {
    const NONE: Last = Last {
        conf: 0,
        tag: 0,
        socklen: usize::MAX,
        head: [0; 2],
        found: Found {
            addr: core::ptr::null(),
            len: 0,
            name: None,
            id: 0,
        },
    };
}

/// An address kept, as [`TlsAddresses::recent`] gives it: where its bytes
/// and the name it was built for are, and its id (as [`Kept`]'s). They are
/// an entry's: neither changed, moved nor dropped before the
/// `TlsAddresses` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// `len` bytes: the TLS address ([`tls_address`]).
    pub addr: *const u8,
    pub len: usize,
    /// The name as read (where, and its length), `None` when nginx uses
    /// none.
    pub name: Option<(*const u8, usize)>,
    pub id: usize,
}

/// An address kept, for [`TlsAddresses::get`] and
/// [`TlsAddresses::recent`]: its bytes, the name (as read) it was built
/// for, and the id of its bucket tag and TLS identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept<'a> {
    /// The TLS address ([`tls_address`]).
    pub addr: &'a [u8],
    pub name: Option<&'a [u8]>,
    /// Equal for two addresses exactly when their bucket tags and TLS
    /// identities (not their socket addresses) are equal; never the
    /// address of anything else alive (it is an entry's), so never a
    /// plain connection's tag (a protocol handler or a location
    /// configuration): a TLS connection can be keyed by its socket address
    /// and this id as its tag.
    pub id: usize,
}

struct TlsEntry {
    /// The first entry's id of its tag and identity.
    id: usize,
    tag: usize,
    conf: usize,
    /// The name as read, `None` when nginx uses none.
    name: Option<Box<[u8]>>,
    /// The socket address's length: the address holds it at offset 4.
    socklen: usize,
    /// A 16-byte socket address (`sockaddr_in`) as one word, 0 otherwise.
    head: u128,
    addr: Box<[u8]>,
}

/// A 16-byte socket address as one word.
#[inline(always)]
fn head16(sockaddr: &[u8]) -> Option<u128> {
    match sockaddr.first_chunk::<16>() {
        Some(head) if sockaddr.len() == 16 => Some(u128::from_ne_bytes(*head)),
        _ => None,
    }
}

/// A `u128` as two words.
#[inline(always)]
fn words(x: u128) -> [u64; 2] {
    [x as u64, (x >> 64) as u64]
}

impl TlsEntry {
    #[inline(always)]
    fn is(&self, conf: usize, tag: usize, sockaddr: &[u8], name: Option<&[u8]>) -> bool {
        self.is_of(conf, tag, sockaddr) && self.name.as_deref() == name
    }

    #[inline(always)]
    fn last(&self) -> Last {
        Last {
            conf: self.conf,
            tag: self.tag,
            socklen: self.socklen,
            head: words(self.head),
            found: Found {
                addr: self.addr.as_ptr(),
                len: self.addr.len(),
                name: self.name.as_deref().map(|n| (n.as_ptr(), n.len())),
                id: self.id,
            },
        }
    }

    #[inline(always)]
    fn kept(&self) -> Kept<'_> {
        Kept {
            addr: &self.addr,
            name: self.name.as_deref(),
            id: self.id,
        }
    }

    /// Whether this is an address of `conf` (and `tag`) to `sockaddr`.
    #[inline(always)]
    fn is_of(&self, conf: usize, tag: usize, sockaddr: &[u8]) -> bool {
        if self.conf != conf || self.tag != tag || self.socklen != sockaddr.len() {
            return false;
        }
        match head16(sockaddr) {
            Some(head) => head == self.head,
            None => {
                self.addr
                    .get(TLS_ADDRESS_HEADER..TLS_ADDRESS_HEADER + sockaddr.len())
                    == Some(sockaddr)
            }
        }
    }
}

impl TlsAddresses {
    /// The address of `conf`'s connections to `sockaddr` under the TLS
    /// identity `id` (whose name, as read, is `id.name`): found, or built
    /// and kept if there is room. `Ok(None)`: no room, build it per try.
    /// `tag` is the bucket tag of `conf`'s connections (a function of
    /// `conf`: its protocol handler, or itself with `local`).
    #[inline]
    pub fn get(
        &mut self,
        conf: usize,
        tag: usize,
        sockaddr: &[u8],
        id: &TlsIdentity,
    ) -> Result<Option<Kept<'_>>, TooLong> {
        let hit = self
            .entries
            .get(self.recent)
            .is_some_and(|e| e.is(conf, tag, sockaddr, id.name));
        if hit {
            return Ok(self.entries.get(self.recent).map(|e| e.kept()));
        }
        self.get_further(conf, tag, sockaddr, id)
    }

    #[inline(never)]
    fn get_further(
        &mut self,
        conf: usize,
        tag: usize,
        sockaddr: &[u8],
        id: &TlsIdentity,
    ) -> Result<Option<Kept<'_>>, TooLong> {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.is(conf, tag, sockaddr, id.name))
        {
            self.found(i);
            return Ok(self.entries.get(i).map(|e| e.kept()));
        }
        if self.entries.len() >= MAX_TLS_ADDRESSES {
            return Ok(None);
        }
        let mut out = [0u8; MAX_ADDR_LEN];
        let len = tls_address(sockaddr, id, &mut out)?;
        // Out of memory, the address is built per try, as past the room:
        // allocations here are fallible (once per address, at its first
        // use; never per request).
        if self.entries.capacity() == 0
            && self.entries.try_reserve_exact(MAX_TLS_ADDRESSES).is_err()
        {
            return Ok(None);
        }
        let (Some(addr), Some(name)) = (
            boxed_copy(out.get(..len).unwrap_or_default()),
            match id.name {
                Some(name) => boxed_copy(name).map(Some),
                None => Some(None),
            },
        ) else {
            return Ok(None);
        };
        // The id of an equal tag and identity kept before, or its own.
        let same = self
            .entries
            .iter()
            .find(|e| e.tag == tag && tls_part(&e.addr) == tls_part(&addr))
            .map(|e| e.id);
        self.entries.push(TlsEntry {
            id: 0,
            tag,
            conf,
            name,
            socklen: sockaddr.len(),
            head: head16(sockaddr).unwrap_or(0),
            addr,
        });
        let entry = self.entries.last_mut();
        if let Some(entry) = entry {
            entry.id = same.unwrap_or(&*entry as *const TlsEntry as usize);
        }
        self.found(self.entries.len() - 1);
        Ok(self.entries.last().map(|e| e.kept()))
    }

    /// Entry `i` is the one found last.
    fn found(&mut self, i: usize) {
        if let Some(e) = self.entries.get(i) {
            self.recent = i;
            self.last = e.last();
        }
    }

    /// The address found last, if it is `conf`'s (and `tag`'s) to
    /// `sockaddr`, and the name (as read) it was built for: the caller
    /// compares the name, or knows it cannot differ (`conf` uses none, or
    /// a constant one). A 16-byte socket address (`sockaddr_in`) is
    /// compared with the copy alone.
    #[inline(always)]
    pub fn recent(&self, conf: usize, tag: usize, sockaddr: &[u8]) -> Option<Found> {
        let last = &self.last;
        if last.conf != conf || last.tag != tag || last.socklen != sockaddr.len() {
            return None;
        }
        let same = match head16(sockaddr) {
            Some(head) => words(head) == last.head,
            None => self
                .entries
                .get(self.recent)
                .is_some_and(|e| e.is_of(conf, tag, sockaddr)),
        };
        same.then_some(last.found)
    }

    /// The addresses kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `bytes` in a box of their own, or `None` if the memory is not there.
fn boxed_copy(bytes: &[u8]) -> Option<Box<[u8]>> {
    let mut v = Vec::new();
    v.try_reserve_exact(bytes.len()).ok()?;
    v.extend_from_slice(bytes);
    Some(v.into_boxed_slice())
}

/// Whether `a` and `b` are the same bytes, compared inline a word at a
/// time (the last word overlapping the one before), without a `memcmp`
/// call: a TLS name, compared on every try, is short, and a call would make
/// the caller save its registers around it.
#[inline(always)]
pub fn same_name(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if b.len() != len {
        return false;
    }
    if len < 8 {
        if len < 4 {
            return a.iter().zip(b).all(|(x, y)| x == y);
        }
        let half = |s: &[u8], at: usize| {
            s.get(at..at + 4)
                .and_then(|w| w.first_chunk::<4>())
                .map(|w| u32::from_ne_bytes(*w))
        };
        return half(a, 0) == half(b, 0) && half(a, len - 4) == half(b, len - 4);
    }
    let word = |s: &[u8], at: usize| {
        s.get(at..at + 8)
            .and_then(|w| w.first_chunk::<8>())
            .map(|w| u64::from_ne_bytes(*w))
    };
    let mut at = 0;
    while at + 8 < len {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    word(a, len - 8) == word(b, len - 8)
}

/// Longest stamp of a TLS session ([`session_stamp`]).
pub const MAX_SESSION_STAMP: usize = 16 + MAX_ADDR_LEN;

/// What a TLS session is stamped with when a request saves it, so that
/// only requests of the same identity resume it: a per-upstream,
/// per-configuration nonce (sessions may outlive a reload in an upstream
/// zone, where the addresses of SSL contexts may be reused), the bucket tag
/// (protocol, or location with `local`) and the TLS identity.
#[inline]
pub fn session_stamp(nonce: u64, tag: usize, identity: &[u8], out: &mut [u8]) -> Option<usize> {
    let len = 16 + identity.len();
    let out = out.get_mut(..len)?;
    let mut w = Writer { out, at: 0 };
    w.put(&nonce.to_le_bytes());
    w.put(&(tag as u64).to_le_bytes());
    w.put(identity);
    Some(len)
}

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    /// Copies `bytes` on (the caller checked the total length).
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        if let Some(dst) = self.out.get_mut(self.at..end) {
            dst.copy_from_slice(bytes);
        }
        self.at = end;
    }
}

/// The name without a port, as `ngx_http_upstream_ssl_name()` strips it: up
/// to the first `:`, or the first `:` after the `]` of a bracketed IPv6
/// address.
pub fn strip_port(name: &[u8]) -> &[u8] {
    let from = match name.first() {
        Some(b'[') => memchr::memchr(b']', name).unwrap_or(0),
        _ => 0,
    };
    match name.get(from..).and_then(|rest| memchr::memchr(b':', rest)) {
        Some(colon) => name.get(..from + colon).unwrap_or(name),
        None => name,
    }
}

/// An encoded TLS identity, decoded for the debug log: what the connection
/// was opened with (`tls off` for none).
pub struct Describe<'a>(pub &'a [u8]);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("tls off");
        }
        let mut r = Reader(self.0);
        let (Some(context), Some(&[flags])) = (r.take(8), r.take(1)) else {
            return f.write_str("tls (malformed)");
        };
        let context = u64::from_le_bytes(context.try_into().unwrap_or_default());
        let on = |bit| if flags & bit != 0 { "on" } else { "off" };
        write!(
            f,
            "tls ctx {context:#x} verify {} server_name {}",
            on(VERIFY),
            on(SERVER_NAME)
        )?;
        if flags & HAS_NAME != 0 {
            write!(f, " name \"{}\"", Escaped(r.field().unwrap_or_default()))?;
        }
        if flags & HAS_CERTIFICATE != 0 {
            let cert = r.field().unwrap_or_default();
            let key = r.field().unwrap_or_default();
            write!(
                f,
                " certificate \"{}\" key \"{}\"",
                Escaped(cert),
                Escaped(key)
            )?;
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn field(&mut self) -> Option<&'a [u8]> {
        let len = self.take(2)?;
        let len = u16::from_le_bytes([*len.first()?, *len.get(1)?]);
        self.take(usize::from(len))
    }
}

/// Bytes for a log line: printable ASCII as is, anything else (the NUL
/// nginx ends file names with, control bytes a client sent) escaped.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = match self.0.split_last() {
            Some((0, rest)) => rest,
            _ => self.0,
        };
        for &b in bytes {
            if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls<'a>(name: Option<&'a [u8]>) -> TlsIdentity<'a> {
        TlsIdentity {
            context: 0x1000,
            verify: true,
            server_name: true,
            name,
            certificate: None,
        }
    }

    fn bytes(id: &TlsIdentity) -> Vec<u8> {
        let mut out = [0u8; MAX_TLS_IDENTITY];
        let len = id.encode(&mut out).unwrap();
        out[..len].to_vec()
    }

    #[test]
    fn strips_the_port_as_nginx_does() {
        for (name, stripped) in [
            (&b"a.test"[..], &b"a.test"[..]),
            (b"a.test:8443", b"a.test"),
            (b"a.test:", b"a.test"),
            (b":443", b""),
            (b"", b""),
            (b"[::1]", b"[::1]"),
            (b"[::1]:443", b"[::1]"),
            (b"[::1", b"["),
            (b"a:b:c", b"a"),
        ] {
            assert_eq!(
                strip_port(name),
                stripped,
                "{:?}",
                String::from_utf8_lossy(name)
            );
            // nginx strips again on a retry: the result must not change
            assert_eq!(strip_port(strip_port(name)), strip_port(name));
        }
    }

    #[test]
    fn every_part_counts() {
        let base = tls(Some(b"a.test"));
        let variants = [
            TlsIdentity {
                context: 0x2000,
                ..base
            },
            TlsIdentity {
                verify: false,
                ..base
            },
            TlsIdentity {
                server_name: false,
                ..base
            },
            TlsIdentity {
                name: Some(b"b.test"),
                ..base
            },
            TlsIdentity {
                name: Some(b"a.tes"),
                ..base
            },
            TlsIdentity { name: None, ..base },
            TlsIdentity {
                certificate: Some((b"a.crt\0", b"a.key\0")),
                ..base
            },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(bytes(&base), bytes(v), "variant {i}");
        }
        let with_cert = variants[6];
        assert_ne!(
            bytes(&with_cert),
            bytes(&TlsIdentity {
                certificate: Some((b"a.crt\0", b"b.key\0")),
                ..base
            })
        );
        assert_eq!(bytes(&base), bytes(&tls(Some(b"a.test"))));
    }

    /// Length prefixes: moving bytes from one field to the next never
    /// gives the same encoding.
    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = TlsIdentity {
            certificate: Some((b"ab\0", b"c\0")),
            ..tls(Some(b"x"))
        };
        let b = TlsIdentity {
            certificate: Some((b"a\0", b"bc\0")),
            ..tls(Some(b"x"))
        };
        assert_ne!(bytes(&a), bytes(&b));
        let c = TlsIdentity {
            certificate: Some((b"x\0", b"k\0")),
            ..tls(Some(b""))
        };
        let d = TlsIdentity {
            certificate: Some((b"x\0", b"k\0")),
            ..tls(Some(b"x"))
        };
        assert_ne!(bytes(&c), bytes(&d));
    }

    #[test]
    fn what_nginx_ignores_does_not_count() {
        // no verification and no SNI: nginx never looks at the name
        let off = TlsIdentity {
            verify: false,
            server_name: false,
            ..tls(Some(b"a.test"))
        };
        assert_eq!(
            bytes(&off),
            bytes(&TlsIdentity {
                name: Some(b"b.test"),
                ..off
            })
        );
        assert_eq!(off.effective_name(), None);
        // the port is not part of the name
        let base = tls(Some(b"a.test"));
        assert_eq!(bytes(&base), bytes(&tls(Some(b"a.test:8443"))));
        // an empty certificate presents none, whatever the key
        assert_eq!(
            bytes(&base),
            bytes(&TlsIdentity {
                certificate: Some((b"\0", b"k\0")),
                ..base
            })
        );
        assert_eq!(
            bytes(&base),
            bytes(&TlsIdentity {
                certificate: Some((b"", b"")),
                ..base
            })
        );
    }

    #[test]
    fn too_long_is_refused() {
        let long = [b'a'; MAX_TLS_IDENTITY];
        let id = tls(Some(&long));
        let mut out = [0u8; MAX_TLS_IDENTITY];
        assert_eq!(
            id.encode(&mut out),
            Err(TooLong {
                len: HEADER + 2 + MAX_TLS_IDENTITY
            })
        );
        let fits = &long[..MAX_TLS_IDENTITY - HEADER - 2];
        assert_eq!(tls(Some(fits)).encode(&mut out), Ok(MAX_TLS_IDENTITY));
        let huge = vec![b'a'; 70_000];
        let mut big = vec![0u8; 80_000];
        assert!(tls(Some(&huge)).encode(&mut big).is_err());
    }

    fn address(sockaddr: &[u8], id: &TlsIdentity) -> Vec<u8> {
        let mut out = [0u8; MAX_ADDR_LEN];
        let len = tls_address(sockaddr, id, &mut out).unwrap();
        out[..len].to_vec()
    }

    const SIN: &[u8] = &[2, 0, 0x1f, 0x90, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    const SIN6: &[u8] = &[
        10, 0, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
    ];

    #[test]
    fn tls_addresses_are_distinct_from_plain_and_each_other() {
        let id = tls(Some(b"a.test"));
        let a = address(SIN, &id);
        // a plain socket address starts with its family, never the mark
        assert_ne!(&a[..2], &SIN[..2]);
        assert_ne!(&a[..2], &SIN6[..2]);
        assert_eq!(tls_part(&a), bytes(&id));
        assert_eq!(tls_part(SIN), b"");
        assert_eq!(tls_part(SIN6), b"");
        // the socket address length is in the header: where the socket
        // address ends and the identity begins is never in doubt
        let short = address(&SIN[..15], &id);
        assert_eq!(&short[..4], &[0xff, 0xff, 15, 0]);
        assert_eq!(&a[..4], &[0xff, 0xff, 16, 0]);
        assert_eq!(tls_part(&short), bytes(&id));
        assert_ne!(address(SIN, &id), address(SIN6, &id));
        assert_ne!(address(SIN, &id), address(SIN, &tls(Some(b"b.test"))));
        assert_eq!(address(SIN, &id), address(SIN, &tls(Some(b"a.test:443"))));
    }

    #[test]
    fn tls_address_uses_the_room_the_socket_address_leaves() {
        let room = MAX_ADDR_LEN - 4 - SIN.len() - HEADER - 2;
        let name = vec![b'n'; room];
        let mut out = [0u8; MAX_ADDR_LEN];
        assert_eq!(
            tls_address(SIN, &tls(Some(&name)), &mut out),
            Ok(MAX_ADDR_LEN)
        );
        let name = vec![b'n'; room + 1];
        assert!(tls_address(SIN, &tls(Some(&name)), &mut out).is_err());
        // the longest socket address still leaves MAX_TLS_IDENTITY bytes
        let sun = [1u8; 128];
        let name = vec![b'n'; MAX_TLS_IDENTITY - HEADER - 2];
        assert!(tls_address(&sun, &tls(Some(&name)), &mut out).is_ok());
        assert!(tls_address(&[0u8; MAX_ADDR_LEN], &tls(None), &mut out).is_err());
    }

    #[test]
    fn session_stamps_hold_every_part() {
        let stamp = |nonce, tag, id: &[u8]| {
            let mut out = [0u8; MAX_SESSION_STAMP];
            let len = session_stamp(nonce, tag, id, &mut out).unwrap();
            out[..len].to_vec()
        };
        let id = bytes(&tls(Some(b"a.test")));
        let other = bytes(&tls(Some(b"b.test")));
        assert_eq!(stamp(1, 2, &id), stamp(1, 2, &id));
        assert_ne!(stamp(1, 2, &id), stamp(3, 2, &id));
        assert_ne!(stamp(1, 2, &id), stamp(1, 3, &id));
        assert_ne!(stamp(1, 2, &id), stamp(1, 2, &other));
        let longest = [0u8; MAX_ADDR_LEN];
        assert!(session_stamp(1, 2, &longest, &mut [0u8; MAX_SESSION_STAMP]).is_some());
        assert!(session_stamp(1, 2, &longest, &mut [0u8; MAX_SESSION_STAMP - 1]).is_none());
    }

    #[test]
    fn names_are_read_back() {
        let a = address(SIN, &tls(Some(b"a.test:8443")));
        assert_eq!(tls_name(&a), Some(&b"a.test"[..]));
        assert_eq!(tls_name(&address(SIN, &tls(None))), None);
        assert_eq!(tls_name(SIN), None);
        let off = TlsIdentity {
            verify: false,
            server_name: false,
            ..tls(Some(b"a"))
        };
        assert_eq!(tls_name(&address(SIN, &off)), None);
    }

    #[test]
    fn names_are_compared_as_bytes() {
        let base: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for len in 0..base.len() {
            let a = &base[..len];
            assert!(same_name(a, a), "{len}");
            let copy = a.to_vec();
            assert!(same_name(a, &copy), "{len}");
            assert!(!same_name(a, &base[..len + 1]), "{len}");
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!same_name(a, &b), "{len} {at}");
            }
        }
    }

    #[test]
    fn kept_addresses_are_those_built() {
        let mut kept = TlsAddresses::default();
        let ids = [
            tls(Some(b"a.test")),
            tls(Some(b"b.test")),
            tls(Some(b"a.test:443")),
            tls(None),
        ];
        for round in 0..2 {
            for (conf, sockaddr) in [(1, SIN), (2, SIN), (1, SIN6)] {
                for id in &ids {
                    let got = kept.get(conf, 7, sockaddr, id).unwrap().unwrap();
                    assert_eq!(got.addr, address(sockaddr, id), "round {round}");
                    assert_eq!(got.name, id.name);
                }
            }
        }
        // one per location, server and name as read
        assert_eq!(kept.len(), 12);
        // the last found: its location, server and name
        let last = kept.get(2, 7, SIN6, &ids[1]).unwrap().unwrap();
        assert_eq!(last.name, Some(&b"b.test"[..]));
        let last_name = last.name.map(|n| (n.as_ptr(), n.len()));
        let last = (last.addr.as_ptr(), last.addr.len(), last.id);
        let recent = kept.recent(2, 7, SIN6).unwrap();
        assert_eq!((recent.addr, recent.len, recent.id), last);
        assert_eq!(recent.name, last_name);
        // the copy follows the entry found: a 16-byte address compared
        // with the copy alone
        let first = kept.get(1, 7, SIN, &ids[0]).unwrap().unwrap();
        let first = (first.addr.as_ptr(), first.id);
        let recent = kept.recent(1, 7, SIN).unwrap();
        assert_eq!((recent.addr, recent.id), first);
        assert_eq!(kept.recent(2, 7, SIN6), None);
        assert_eq!(kept.recent(1, 7, SIN6), None);
        let mut other = SIN.to_vec();
        other[7] ^= 1;
        assert_eq!(kept.recent(1, 7, &other), None);
        let _ = kept.get(2, 7, SIN6, &ids[1]);
        assert_eq!(kept.recent(1, 7, SIN6), None);
        assert_eq!(kept.recent(2, 8, SIN6), None);
        assert_eq!(kept.recent(2, 7, SIN), None);
        assert_eq!(kept.recent(2, 7, &SIN6[..27]), None);
        // full: built per try by the caller
        for i in 0..MAX_TLS_ADDRESSES {
            let _ = kept.get(100 + i, 7, SIN, &ids[0]);
        }
        assert_eq!(kept.len(), MAX_TLS_ADDRESSES);
        assert_eq!(kept.get(1000, 7, SIN, &ids[0]), Ok(None));
        assert_eq!(
            kept.get(1, 7, SIN, &ids[1]).unwrap().unwrap().addr,
            &address(SIN, &ids[1])[..]
        );
        let long = [b'a'; MAX_ADDR_LEN];
        let mut fresh = TlsAddresses::default();
        assert_eq!(fresh.recent(0, 0, &[]), None);
        assert!(fresh.get(1, 7, SIN, &tls(Some(&long))).is_err());
        assert!(fresh.is_empty());
    }

    /// Ids are equal exactly when tags and identities are: other servers
    /// and other locations of the same identity share them.
    #[test]
    fn ids_are_those_of_tag_and_identity() {
        let mut kept = TlsAddresses::default();
        let mut id = |conf, tag, sockaddr, name: &'static [u8]| {
            kept.get(conf, tag, sockaddr, &tls(Some(name)))
                .unwrap()
                .unwrap()
                .id
        };
        let a = id(1, 7, SIN, b"a.test");
        assert_eq!(id(1, 7, SIN6, b"a.test"), a);
        assert_eq!(id(2, 7, SIN, b"a.test"), a);
        assert_eq!(id(2, 7, SIN, b"a.test:443"), a);
        assert_ne!(id(1, 7, SIN, b"b.test"), a);
        assert_ne!(id(3, 8, SIN, b"a.test"), a);
        assert_eq!(id(1, 7, SIN, b"a.test"), a);
        let distinct: std::collections::HashSet<_> =
            [a, id(1, 7, SIN, b"b.test"), id(3, 8, SIN, b"a.test")].into();
        assert_eq!(distinct.len(), 3);
        // an id is never a small number (a tag of another kind)
        assert!(a > 4096);
    }

    #[test]
    fn describes_what_it_encodes() {
        assert_eq!(Describe(b"").to_string(), "tls off");
        let id = TlsIdentity {
            certificate: Some((b"t\"a.crt\0", b"ta.key\0")),
            ..tls(Some(b"a.test:443"))
        };
        assert_eq!(
            Describe(&bytes(&id)).to_string(),
            "tls ctx 0x1000 verify on server_name on name \"a.test\" \
             certificate \"t\\x22a.crt\" key \"ta.key\""
        );
        let off = TlsIdentity {
            verify: false,
            server_name: false,
            ..tls(Some(b"a"))
        };
        assert_eq!(
            Describe(&bytes(&off)).to_string(),
            "tls ctx 0x1000 verify off server_name off"
        );
        assert_eq!(Describe(b"\x01").to_string(), "tls (malformed)");
    }
}
