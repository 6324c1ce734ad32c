//! Reads what a request's upstream connection is bound to (see the core's
//! `identity`) from nginx: the protocol handler, and for TLS the same
//! values nginx itself uses when it opens the connection
//! (`ngx_http_upstream_ssl_init_connection()`).

use core::ffi::CStr;
use core::fmt;

use ngx::ffi::{ngx_cycle, ngx_http_request_t, ngx_http_upstream_t, ngx_peer_connection_t};
#[cfg(ngx_feature = "http_ssl")]
use ngx::ffi::{ngx_http_complex_value, ngx_http_complex_value_t, ngx_pnalloc, ngx_str_t};

#[cfg(ngx_feature = "http_ssl")]
use ngx::core::Status;

#[cfg(ngx_feature = "http_ssl")]
use keepalive_slice_core::identity::{same_name, tls_address, TlsIdentity, MAX_ADDR_LEN};
use keepalive_slice_core::identity::{tls_name, tls_part, Describe, Escaped, TlsAddresses};

/// The protocol a request speaks to its upstream: its `create_request`,
/// which each upstream module sets to its own (proxy over HTTP/1.x, proxy
/// over HTTP/2, gRPC, FastCGI, uwsgi, SCGI, memcached) before the
/// balancer's init peer runs. One word, stable for the cycle.
///
/// # Safety
/// `u` must be the live upstream of a request.
pub unsafe fn protocol(u: *const ngx_http_upstream_t) -> usize {
    // SAFETY: see above.
    unsafe { (*u).create_request.map_or(0, |f| f as usize) }
}

/// The address a request's connection is kept under: its server's socket
/// address, and for TLS its TLS identity too (`identity::tls_address`).
pub enum TlsKey {
    /// A plain connection: the socket address alone.
    Plain,
    /// A TLS connection: its address is found or built by
    /// [`TlsKey::evaluate`] for each try.
    Tls(TlsState),
}

/// Without TLS (nginx built without `http_ssl`), only `Failed` is made.
#[cfg_attr(not(ngx_feature = "http_ssl"), allow(dead_code))]
pub enum TlsState {
    /// `len` bytes at `addr`: an address the upstream keeps for the cycle
    /// (`identity::TlsAddresses`), whose connections are keyed by their
    /// socket address and the kept address's `id` as their tag, or (`id`
    /// 0) one built for this try in the request pool, which is their key.
    Ready {
        addr: *const u8,
        len: usize,
        id: usize,
    },
    /// Not evaluated yet, or evaluating failed: neither taken nor kept.
    Failed,
    /// Longer than a bucket holds: neither taken nor kept.
    TooLong(usize),
}

impl TlsKey {
    /// The key of request `r`: `Plain` unless its upstream is TLS (nothing
    /// is allocated: see [`TlsKey::evaluate`]).
    ///
    /// # Safety
    /// `r` and `u` must be live, `u` the request's upstream.
    #[inline]
    pub unsafe fn new(r: *mut ngx_http_request_t, u: *const ngx_http_upstream_t) -> Self {
        #[cfg(ngx_feature = "http_ssl")]
        // SAFETY: see above.
        unsafe {
            if (*u).ssl() != 0 {
                return TlsKey::Tls(TlsState::Failed);
            }
        }
        let _ = (r, u);
        TlsKey::Plain
    }

    /// The TLS address of the current try, `None` if plain or unusable.
    #[inline]
    fn tls_address(&self) -> Option<&[u8]> {
        match self {
            TlsKey::Tls(TlsState::Ready { addr, len, .. }) => {
                // SAFETY: `len` bytes at `addr` were found or written by
                // evaluate(), in memory that outlives the request (the
                // upstream's, for the cycle) or lives as long as its pool.
                Some(unsafe { core::slice::from_raw_parts(*addr, *len) })
            }
            _ => None,
        }
    }

    /// The address and tag the connection in `pc` is kept under (`tag`:
    /// the request's bucket tag), `None` when it cannot be (the TLS
    /// identity failed or does not fit).
    ///
    /// # Safety
    /// `pc` must hold the balancer's choice for this try.
    #[inline]
    pub unsafe fn key(
        &self,
        pc: *const ngx_peer_connection_t,
        tag: usize,
    ) -> Option<(&[u8], usize)> {
        match self {
            // SAFETY: see above.
            TlsKey::Plain => Some((unsafe { sockaddr(pc) }, tag)),
            TlsKey::Tls(TlsState::Ready { id, .. }) if *id != 0 => {
                // SAFETY: as above.
                Some((unsafe { sockaddr(pc) }, *id))
            }
            TlsKey::Tls(_) => self.tls_address().map(|addr| (addr, tag)),
        }
    }

    /// The TLS identity of the current try (empty for a plain connection
    /// or one without a usable identity), for the debug log.
    pub fn identity(&self) -> &[u8] {
        self.identity_checked().unwrap_or_default()
    }

    /// The TLS identity of the current try, `None` when there is none to
    /// use (plain, not evaluated, failed, too long).
    pub fn identity_checked(&self) -> Option<&[u8]> {
        self.tls_address().map(tls_part)
    }

    /// The name nginx sends or verifies for this identity.
    pub fn name(&self) -> Option<&[u8]> {
        self.tls_address().and_then(tls_name)
    }

    /// The address and tag the connection of this try is kept under (the
    /// balancer has chosen the server in `pc`; `tag` is the request's
    /// bucket tag): for TLS, the identity is read first, from the values
    /// nginx will use if it opens a new one, and its address found among
    /// those the upstream keeps (`kept`) or built (see [`TlsKey::key`]).
    /// `None` when the connection cannot be kept or taken.
    ///
    /// # Safety
    /// `r` and `u` must be live, `u` the request's upstream and `pc` its
    /// peer, `kept` its upstream's; the address lives as long as the
    /// request's pool and `pc`'s choice.
    #[inline(always)]
    pub unsafe fn evaluate<'a>(
        &mut self,
        r: *mut ngx_http_request_t,
        u: *mut ngx_http_upstream_t,
        pc: *const ngx_peer_connection_t,
        tag: usize,
        kept: &mut TlsAddresses,
    ) -> Option<(&'a [u8], usize)> {
        match self {
            // SAFETY: see above.
            TlsKey::Plain => Some((unsafe { sockaddr(pc) }, tag)),
            // SAFETY: see above.
            TlsKey::Tls(_) => unsafe { evaluate_tls(self, r, u, pc, tag, kept) },
        }
    }
}

/// The socket address the balancer chose.
///
/// # Safety
/// `pc` must hold the balancer's choice, which outlives `'a`.
#[inline]
pub unsafe fn sockaddr<'a>(pc: *const ngx_peer_connection_t) -> &'a [u8] {
    // SAFETY: see above.
    unsafe { core::slice::from_raw_parts((*pc).sockaddr as *const u8, (*pc).socklen as usize) }
}

/// [`TlsKey::evaluate`] of a TLS key, without asking whether it is one (a
/// plain key given here becomes a TLS key): `key` becomes the address
/// found or built. Without a variable client certificate, the identity of a
/// location, server and name (as read) is always the same: its address is
/// built once and kept by the upstream (`kept`), found again by comparing
/// the name. Otherwise (or when `kept` is full) it is built per try into
/// the request pool, at its own length.
///
/// # Safety
/// As for [`TlsKey::evaluate`].
#[inline(always)]
pub unsafe fn evaluate_tls<'a>(
    key: &mut TlsKey,
    r: *mut ngx_http_request_t,
    u: *mut ngx_http_upstream_t,
    pc: *const ngx_peer_connection_t,
    tag: usize,
    kept: &mut TlsAddresses,
) -> Option<(&'a [u8], usize)> {
    #[cfg(ngx_feature = "http_ssl")]
    // SAFETY: see above.
    unsafe {
        let sock = sockaddr(pc);
        // The address found last, if its location and server are this
        // try's, without reading the rest: a location's settings and its
        // static certificate do not change (a location with a variable one
        // has no address kept). Whether a name is used is one of those
        // settings (`Values::read`): an address built without one is of a
        // location that uses none. Otherwise the upstream's name
        // (`u->ssl_name`) or a name without variables is compared; a
        // variable name is evaluated first.
        if let Some(found) = kept.recent((*u).conf as usize, tag, sock) {
            let same = match found.name {
                None => true,
                Some((name, len)) => {
                    // SAFETY: an entry's name, kept for the cycle.
                    let name = core::slice::from_raw_parts(name, len);
                    let conf = &*(*u).conf;
                    // A name without variables is its value, as
                    // ngx_http_complex_value() gives it.
                    let ssl_name = if conf.ssl_name.is_null() {
                        Some((*u).ssl_name.as_bytes())
                    } else if (*conf.ssl_name).lengths.is_null() {
                        Some((*conf.ssl_name).value.as_bytes())
                    } else {
                        None
                    };
                    matches!(ssl_name, Some(s) if same_name(name, s))
                }
            };
            if same {
                *key = TlsKey::Tls(TlsState::Ready {
                    addr: found.addr,
                    len: found.len,
                    id: found.id,
                });
                return Some((sock, found.id));
            }
        }
        let mut state = TlsState::Failed;
        let found = evaluate_read(&mut state, r, u, sock, tag, kept);
        *key = TlsKey::Tls(state);
        found
    }
    #[cfg(not(ngx_feature = "http_ssl"))]
    {
        *key = TlsKey::Tls(TlsState::Failed);
        let _ = (r, u, pc, tag, kept);
        None
    }
}

/// [`evaluate_tls`] past the address found last: the values read, the
/// address found or built.
///
/// # Safety
/// As for [`TlsKey::evaluate`].
#[cfg(ngx_feature = "http_ssl")]
#[inline(never)]
unsafe fn evaluate_read<'a>(
    state: &mut TlsState,
    r: *mut ngx_http_request_t,
    u: *mut ngx_http_upstream_t,
    sock: &'a [u8],
    tag: usize,
    kept: &mut TlsAddresses,
) -> Option<(&'a [u8], usize)> {
    // SAFETY: see above.
    unsafe { read_identity(state, r, u, sock, tag, kept) };
    match *state {
        TlsState::Ready { id, .. } if id != 0 => Some((sock, id)),
        TlsState::Ready { addr, len, .. } => {
            // SAFETY: as in `TlsKey::tls_address`.
            Some((unsafe { core::slice::from_raw_parts(addr, len) }, tag))
        }
        _ => None,
    }
}

/// [`evaluate_read`]'s state: the identity read, its address found or
/// built.
///
/// # Safety
/// As for [`TlsKey::evaluate`].
#[cfg(ngx_feature = "http_ssl")]
#[inline(always)]
unsafe fn read_identity(
    state: &mut TlsState,
    r: *mut ngx_http_request_t,
    u: *mut ngx_http_upstream_t,
    sock: &[u8],
    tag: usize,
    kept: &mut TlsAddresses,
) {
    *state = TlsState::Failed;
    // SAFETY: see above.
    unsafe {
        let Some(values) = Values::read(r, u) else {
            return;
        };
        let id = values.identity();
        if values.certificate.is_none() {
            match kept.get((*u).conf as usize, tag, sock, &id) {
                Ok(Some(found)) => {
                    *state = TlsState::Ready {
                        addr: found.addr.as_ptr(),
                        len: found.addr.len(),
                        id: found.id,
                    };
                    return;
                }
                Ok(None) => {}
                Err(too_long) => {
                    *state = TlsState::TooLong(too_long.len);
                    return;
                }
            }
        }
        build_tls(state, r, sock, &id);
    }
}

/// The address of identity `id` built for this try, in the request pool.
///
/// # Safety
/// `r` must be live.
#[cfg(ngx_feature = "http_ssl")]
#[inline(never)]
unsafe fn build_tls(
    state: &mut TlsState,
    r: *mut ngx_http_request_t,
    sock: &[u8],
    id: &TlsIdentity,
) {
    let mut out = [0u8; MAX_ADDR_LEN];
    *state = match tls_address(sock, id, &mut out) {
        Ok(len) => {
            // SAFETY: r is live; the copy lives as long as its pool.
            let addr = unsafe { ngx_pnalloc((*r).pool, len) } as *mut u8;
            if addr.is_null() {
                return;
            }
            // SAFETY: `len` bytes, written above, into as many.
            unsafe { core::ptr::copy_nonoverlapping(out.as_ptr(), addr, len) };
            TlsState::Ready { addr, len, id: 0 }
        }
        Err(too_long) => TlsState::TooLong(too_long.len),
    };
}

/// The values of `ngx_http_upstream_ssl_init_connection()`, evaluated.
#[cfg(ngx_feature = "http_ssl")]
struct Values {
    context: usize,
    verify: bool,
    server_name: bool,
    name: Option<ngx_str_t>,
    certificate: Option<(ngx_str_t, ngx_str_t)>,
}

#[cfg(ngx_feature = "http_ssl")]
impl Values {
    /// `None` if a value cannot be evaluated (nginx would then fail the
    /// connection itself).
    ///
    /// # Safety
    /// `r` and `u` must be live, `u` the request's upstream.
    #[inline(always)]
    unsafe fn read(r: *mut ngx_http_request_t, u: *mut ngx_http_upstream_t) -> Option<Self> {
        // SAFETY: u->conf is the location's upstream configuration; its
        // complex values are evaluated as nginx does.
        unsafe {
            let conf = &*(*u).conf;
            let verify = conf.ssl_verify != 0;
            let server_name = conf.ssl_server_name != 0;

            // ngx_http_upstream_ssl_name(): called when either is on
            let name = if verify || server_name {
                if conf.ssl_name.is_null() {
                    Some((*u).ssl_name)
                } else {
                    Some(evaluate(r, conf.ssl_name)?)
                }
            } else {
                None
            };

            // ngx_http_upstream_ssl_certificate(): a variable certificate;
            // a static one is part of the SSL context (the only kind
            // before nginx 1.21.0)
            #[cfg(ngx_api = "upstream_ssl_certificate")]
            let certificate = {
                let cert = conf.ssl_certificate;
                let key = conf.ssl_certificate_key;
                if !cert.is_null()
                    && (*cert).value.len != 0
                    && (!(*cert).lengths.is_null() || (!key.is_null() && !(*key).lengths.is_null()))
                {
                    let cert = evaluate(r, cert)?;
                    // nginx evaluates the key only for a non-empty certificate
                    let key = match cert.as_bytes().first() {
                        Some(&b) if b != 0 && !key.is_null() => evaluate(r, key)?,
                        _ => ngx_str_t::empty(),
                    };
                    Some((cert, key))
                } else {
                    None
                }
            };
            #[cfg(not(ngx_api = "upstream_ssl_certificate"))]
            let certificate = None;

            Some(Values {
                context: conf.ssl as usize,
                verify,
                server_name,
                name,
                certificate,
            })
        }
    }

    #[inline(always)]
    fn identity(&self) -> TlsIdentity<'_> {
        TlsIdentity {
            context: self.context,
            verify: self.verify,
            server_name: self.server_name,
            name: self.name.as_ref().map(|n| n.as_bytes()),
            certificate: self
                .certificate
                .as_ref()
                .map(|(c, k)| (c.as_bytes(), k.as_bytes())),
        }
    }
}

/// # Safety
/// `r` must be live and `cv` a complex value of its configuration.
#[cfg(ngx_feature = "http_ssl")]
unsafe fn evaluate(
    r: *mut ngx_http_request_t,
    cv: *mut ngx_http_complex_value_t,
) -> Option<ngx_str_t> {
    let mut value = ngx_str_t::empty();
    // SAFETY: see above; the value lives in the request pool.
    (unsafe { ngx_http_complex_value(r, cv, &mut value) } == Status::NGX_OK.0).then_some(value)
}

/// The module that speaks the request's protocol, for the debug log:
/// nginx's upstream modules tag their output chain with themselves
/// (`u->output.tag`); the tag is only read as a module if it is one of the
/// cycle's.
///
/// # Safety
/// `u` must be live.
pub unsafe fn protocol_module(u: *const ngx_http_upstream_t) -> Option<&'static CStr> {
    // SAFETY: the cycle's module list is NULL-terminated and lives as long
    // as the cycle; a module's name is a static C string.
    unsafe {
        let tag = (*u).output.tag;
        let modules = (*ngx_cycle).modules;
        if tag.is_null() || modules.is_null() {
            return None;
        }
        let mut m = modules;
        while !(*m).is_null() {
            if (*m).cast() == tag && !(**m).name.is_null() {
                return Some(CStr::from_ptr((**m).name));
            }
            m = m.add(1);
        }
        None
    }
}

/// A connection's identity for the debug log: protocol, TLS identity (SNI,
/// verification, certificate) and slice key.
pub struct Identity<'a> {
    pub module: Option<&'static CStr>,
    pub protocol: usize,
    pub tls: &'a [u8],
    pub slice: Option<&'a [u8]>,
}

impl fmt::Display for Identity<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.module {
            Some(name) => write!(f, "{}", Escaped(name.to_bytes()))?,
            None => write!(f, "protocol {:#x}", self.protocol)?,
        }
        write!(f, ", {}", Describe(self.tls))?;
        if let Some(slice) = self.slice {
            write!(f, ", key \"{}\"", Escaped(slice))?;
        }
        Ok(())
    }
}
