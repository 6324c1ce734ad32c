//! Per-request callbacks and idle-connection handlers, one small function
//! per callback as in nginx's own `ngx_http_upstream_keepalive_module.c`.
//!
//! The balancer is always asked first; only then is an idle connection to
//! that exact server address, opened for the same protocol and TLS
//! identity (see `identity`), and with the same slice key and location
//! (with `local`) taken from the cache.

use core::ffi::c_void;
use core::ptr::{self, NonNull};

use ngx::core::{NgxStr, Status};
use ngx::ffi::{
    ngx_conf_t, ngx_connection_t, ngx_current_msec, ngx_event_free_peer_pt,
    ngx_event_notify_peer_pt, ngx_exiting, ngx_handle_read_event, ngx_http_complex_value,
    ngx_http_core_module, ngx_http_core_srv_conf_t, ngx_http_get_flushed_variable,
    ngx_http_request_t, ngx_http_upstream_server_t, ngx_http_upstream_srv_conf_t,
    ngx_http_upstream_t, ngx_int_t, ngx_log_t, ngx_palloc, ngx_peer_connection_t, ngx_pnalloc,
    ngx_str_t, ngx_terminate, ngx_uint_t, NGX_LOG_EMERG, NGX_LOG_INFO, NGX_LOG_WARN,
};
#[cfg(ngx_feature = "http_ssl")]
use ngx::ffi::{ngx_event_save_peer_session_pt, ngx_event_set_peer_session_pt};
use ngx::http::{HttpModuleMainConf, HttpModuleServerConf};

use keepalive_slice_core::args::parse_number;
use keepalive_slice_core::cache::{BucketKey, BucketRef, Refusal, Shape, MAX_SOCKADDR_LEN};
use keepalive_slice_core::identity::MAX_ADDR_LEN;
#[cfg(ngx_feature = "http_ssl")]
use keepalive_slice_core::identity::{session_stamp, MAX_SESSION_STAMP};
use keepalive_slice_core::stats::{Counter, NotKept};

use crate::conf::{no_init_peer, KeepaliveConf, SliceConf};
use crate::hint;
use crate::idle::{self, IdleHint, IdleState, SlotHandle, CARRIED, HEADER, HINTED};
use crate::log::{debug_http, debug_http_if, debugging, log_error};
use crate::module::{allocate, served_conf, Module};
#[cfg(ngx_feature = "http_ssl")]
use crate::session;
use crate::share;
use crate::tls::{self, protocol, protocol_module, sockaddr, Identity, TlsKey, TlsState};
use crate::variables::{self, TryLog, TRY_LOG_SIZE};

/// Per-request peer data, from the request pool.
struct PeerData {
    conf: *const KeepaliveConf,
    /// The request (its upstream is `upstream()`: one field fewer of the
    /// request pool).
    request: *mut ngx_http_request_t,
    /// The wrapped balancer's own data.
    data: *mut c_void,
    /// The evaluated key, empty unless `slice_state` is `Key` (two fields
    /// rather than an enum: eight bytes fewer of the request pool).
    slice_key: ngx_str_t,
    slice_state: SliceState,
    /// Free peer keeps this try's connection without the TLS and
    /// bucket-limit checks (`keep`): a plain unsliced request's every try
    /// (init peer), or an unsliced TLS try that reused a connection kept
    /// under its identity (get peer).
    keep_unchecked: bool,
    /// What the connection is bound to beyond its socket address: the
    /// bucket tag (the protocol handler, or with `local` the location,
    /// whose handler fixes the protocol), and for TLS the identity of the
    /// current try.
    tag: usize,
    tls: TlsKey,
    /// The bucket of this try's key, found in get peer: free peer stores
    /// into it without looking the key up again (if it still holds it).
    bucket: Option<BucketRef>,
    /// The connection's hint as its handle had it (set by get peer), and
    /// `idle::HEADER` when the response has a `Keep-Alive` header (set by
    /// `record_hint`).
    hint: u32,

    /// The balancer's get (called without asking: every balancer has
    /// one) and free.
    original_get_peer: GetPeer,
    original_free_peer: ngx_event_free_peer_pt,
    original_notify: ngx_event_notify_peer_pt,
    #[cfg(ngx_feature = "http_ssl")]
    original_set_session: ngx_event_set_peer_session_pt,
    #[cfg(ngx_feature = "http_ssl")]
    original_save_session: ngx_event_save_peer_session_pt,
}

/// The try log allocated after `kp` by init peer when its upstream's
/// `log_tries` is set (fixed for the cycle, as `kp.conf`).
#[inline(always)]
fn try_log(kp: *const PeerData) -> *mut TryLog {
    kp.wrapping_add(1).cast_mut().cast()
}

/// nginx's `NGX_PEER_FAILED`, in the type of free peer's `state`.
const NGX_PEER_FAILED: ngx_uint_t = ngx::ffi::NGX_PEER_FAILED as ngx_uint_t;

type GetPeer = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void) -> ngx_int_t;

// Peer data comes from the request pool, per request: a few bytes more
// can move a request's pool across a block, and cost it a malloc and a
// free (see bench-profile: the sliced rows once, and the responses with a
// Keep-Alive header until the upstream was no longer a field of its own).
const _: () = assert!(size_of::<PeerData>() <= 136);

/// How get peer finds a try's bucket, fixed by init peer.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Route {
    /// A plain connection, unsliced: its socket address and tag, the
    /// bucket found last first (a lone server's every request).
    Plain,
    /// A TLS connection, unsliced: as `Plain`, once its TLS identity has
    /// given the address and tag it is kept under (`TlsKey::evaluate`).
    Tls,
    /// Sliced (or the key failed): by the whole key.
    Keyed,
}

/// get peer of each `Route`.
const PLAIN_GET_PEER: GetPeer = get_peer::<{ Route::Plain as u8 }>;
const TLS_GET_PEER: GetPeer = get_peer::<{ Route::Tls as u8 }>;
const KEYED_GET_PEER: GetPeer = get_peer::<{ Route::Keyed as u8 }>;

/// The request's `slice_key`, evaluated once in init peer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SliceState {
    Unsliced,
    Key,
    /// Evaluation failed: the request neither takes nor leaves an idle
    /// connection, and is otherwise unaffected.
    Failed,
}

impl PeerData {
    /// The request's upstream.
    #[inline(always)]
    fn upstream(&self) -> *mut ngx_http_upstream_t {
        // SAFETY: the request outlives its peer data (its pool's).
        unsafe { (*self.request).upstream }
    }

    /// The bucket of this request's connection to `addr` under `tag` (see
    /// `TlsKey::evaluate`).
    fn bucket_key<'a>(&'a self, (addr, tag): (&'a [u8], usize)) -> Option<BucketKey<'a>> {
        let slice = match self.slice_state {
            SliceState::Unsliced => &[][..],
            SliceState::Key => self.slice_key.as_bytes(),
            SliceState::Failed => return None,
        };
        Some(BucketKey { addr, slice, tag })
    }

    /// The stamp of the TLS sessions of this request's identity, written
    /// into `buf`; `None` without a usable identity.
    #[cfg(ngx_feature = "http_ssl")]
    fn session_stamp<'b>(&self, buf: &'b mut [u8]) -> Option<&'b [u8]> {
        let identity = self.tls.identity_checked()?;
        // SAFETY: the idle state lives as long as the configuration.
        let nonce = unsafe { (*(*self.conf).idle).session_nonce };
        let len = session_stamp(nonce, self.tag, identity, buf)?;
        buf.get(..len)
    }

    /// The identity of this request's connections, for the debug log.
    ///
    /// # Safety
    /// `upstream` must be live.
    unsafe fn identity(&self) -> Identity<'_> {
        Identity {
            // SAFETY: see above.
            module: unsafe { protocol_module(self.upstream()) },
            // SAFETY: as above.
            protocol: unsafe { protocol(self.upstream()) },
            tls: self.tls.identity(),
            slice: (self.slice_state == SliceState::Key).then(|| self.slice_key.as_bytes()),
        }
    }

    /// The slice key as the cache compares it (cut to `slice_keylen`),
    /// for `$upstream_keepalive_key`.
    fn logged_key(&self) -> ngx_str_t {
        // SAFETY: conf is the upstream's configuration, live for the cycle.
        let slice = unsafe { &(*self.conf).slice };
        match (self.slice_state, slice) {
            (SliceState::Key, Some(slice)) => ngx_str_t {
                len: self.slice_key.len.min(slice.keylen),
                data: self.slice_key.data,
            },
            _ => ngx_str_t::empty(),
        }
    }
}

/// `init_upstream` of an upstream with a `keepalive` line: the balancer's
/// own `init_upstream` first, then the cache in front of it.
///
/// # Safety
/// nginx calls it with the live configuration and an upstream of it.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: called by nginx for the upstream whose init_upstream we set.
    unsafe {
        debug_http!((*cf).log, "init keepalive slice");

        let Some(init) = Module::server_conf(&*us).and_then(|kcf| kcf.original_init_upstream)
        else {
            return Status::NGX_ERROR.0;
        };
        if init(cf, us) != Status::NGX_OK.0 {
            return Status::NGX_ERROR.0;
        }
        init_keepalive(cf, us)
    }
}

/// Puts the idle cache in front of an upstream whose balancer is already
/// initialised: wraps its `peer.init` and creates the cache. Called by
/// `init_upstream` above, and at `init_main_conf` for the upstreams
/// without `keepalive` that nginx 1.29.7+ would cache by default.
///
/// # Safety
/// `cf` is the live configuration, `us` an upstream of it whose
/// `peer.init` is set and whose conf of this module is filled in.
pub unsafe fn init_keepalive(
    cf: *mut ngx_conf_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: see above.
    unsafe {
        let Some(kcf) = Module::server_conf_mut(&*us) else {
            return Status::NGX_ERROR.0;
        };
        kcf.apply_defaults();

        kcf.original_init_peer = (*us).peer.init.unwrap_or(no_init_peer);
        (*us).peer.init = Some(init_peer);

        // A bucket stays its key's while the key's connections are busy,
        // so buckets may outnumber idle connections: every idle connection
        // in a bucket of its own, as many keys again whose connections are
        // all busy, and one for a new key. A larger slice_poolsize
        // allocates no more.
        let most_useful = kcf.max_cached.saturating_mul(2).saturating_add(1);
        let shape = match kcf.slice.as_ref() {
            Some(slice) => Shape::sliced(
                kcf.max_cached,
                slice.poolsize.min(most_useful),
                slice.keylen,
            ),
            None => Shape::unsliced(kcf.max_cached),
        }
        .with_room(address_room(us));
        let overflow = Module::main_conf_mut(&*cf)
            .zip(shape.overflow_len())
            .and_then(|(mcf, len)| mcf.overflow.carve(len));
        let Some(state) =
            overflow.and_then(|overflow| IdleState::new(shape, overflow, kcf.timeout))
        else {
            log_error!(
                NGX_LOG_EMERG,
                (*cf).log,
                "keepalive: cannot allocate a cache of {} connections in {} buckets \
                 of {} key bytes",
                kcf.max_cached,
                shape.buckets,
                shape.keylen
            );
            return Status::NGX_ERROR.0;
        };
        debug_http!(
            (*cf).log,
            "init keepalive slice: {} connections, {} buckets of {} key bytes, {} bytes",
            kcf.max_cached,
            shape.buckets,
            shape.keylen,
            state.memory_bytes()
        );
        let Some(idle) = allocate((*cf).pool, state) else {
            return Status::NGX_ERROR.0;
        };
        IdleState::bind_handles(idle);
        (*idle).share = kcf.share != 0;
        (*idle).upstream = ptr::from_ref(kcf) as usize;
        kcf.idle = idle;
    }
    Status::NGX_OK.0
}

/// The socket address bytes a bucket keeps inline: the longest address of
/// the upstream's servers, as nginx resolved them at configuration time.
/// An upstream whose addresses may change at run time (a `zone`, with
/// `resolve`) or that lists no servers gets room for any socket address.
/// Longer addresses, TLS ones, are kept whole in the cache's overflow.
///
/// # Safety
/// `us` is an upstream of the live configuration.
unsafe fn address_room(us: *const ngx_http_upstream_srv_conf_t) -> usize {
    // SAFETY: the servers array and each server's addresses are the
    // configuration's, filled in while it was read.
    unsafe {
        if !(*us).shm_zone.is_null() || (*us).servers.is_null() {
            return MAX_SOCKADDR_LEN;
        }
        let servers = &*(*us).servers;
        if servers.elts.is_null() || servers.nelts == 0 {
            return MAX_SOCKADDR_LEN;
        }
        let servers = core::slice::from_raw_parts(
            servers.elts as *const ngx_http_upstream_server_t,
            servers.nelts,
        );
        let mut room = 0;
        for server in servers {
            if server.addrs.is_null() || server.naddrs == 0 {
                return MAX_SOCKADDR_LEN;
            }
            for addr in core::slice::from_raw_parts(server.addrs, server.naddrs) {
                room = room.max(addr.socklen as usize);
            }
        }
        match room {
            0 => MAX_SOCKADDR_LEN,
            room => room.min(MAX_SOCKADDR_LEN),
        }
    }
}

/// `init peer`: once per request; evaluates the slice key.
unsafe extern "C" fn init_peer(
    r: *mut ngx_http_request_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: r and us are live; r->upstream was created by the caller.
    unsafe {
        let log = (*(*r).connection).log;
        debug_http!(log, "init keepalive slice peer");

        let kcf = served_conf(us);
        // With $upstream_keepalive_* in use, the tries are logged right
        // after the peer data (`try_log`).
        let log_tries = (*(*kcf).idle).log_tries;
        let size = size_of::<PeerData>() + if log_tries { TRY_LOG_SIZE } else { 0 };
        let kp = ngx_palloc((*r).pool, size) as *mut PeerData;
        if kp.is_null() {
            return Status::NGX_ERROR.0;
        }
        if log_tries {
            variables::start_log(r, try_log(kp));
        }

        if ((*kcf).original_init_peer)(r, us) != Status::NGX_OK.0 {
            return Status::NGX_ERROR.0;
        }

        let mut slice_key = ngx_str_t::empty();
        let slice_state = match &(*kcf).slice {
            Some(slice) => {
                let key = &mut slice_key;
                if evaluate_key(r, slice, key) {
                    debug_http!(
                        log,
                        "keepalive slice key: \"{}\"",
                        NgxStr::from_bytes(key.as_bytes())
                    );
                    SliceState::Key
                } else {
                    log_error!(
                        NGX_LOG_WARN,
                        log,
                        "keepalive: cannot evaluate \"slice_key\", idle connections not used"
                    );
                    *key = ngx_str_t::empty();
                    SliceState::Failed
                }
            }
            None => SliceState::Unsliced,
        };

        let u = (*r).upstream;
        let pc = ptr::addr_of_mut!((*u).peer);
        let tls = TlsKey::new(r, u);
        let (route, route_get_peer) = if slice_state != SliceState::Unsliced {
            (Route::Keyed, KEYED_GET_PEER)
        } else if matches!(tls, TlsKey::Plain) {
            (Route::Plain, PLAIN_GET_PEER)
        } else {
            (Route::Tls, TLS_GET_PEER)
        };
        // Every balancer has one: nginx calls it without asking.
        let Some(get) = (*pc).get else {
            return Status::NGX_ERROR.0;
        };
        kp.write(PeerData {
            conf: kcf,
            request: r,
            data: (*pc).data,
            slice_key,
            slice_state,
            // A location has one protocol handler: with `local`, the
            // location's upstream conf separates protocols too.
            tag: if (*kcf).local {
                (*u).conf as usize
            } else {
                protocol(u)
            },
            keep_unchecked: route == Route::Plain,
            tls,
            bucket: None,
            hint: 0,
            original_get_peer: get,
            original_free_peer: (*pc).free,
            original_notify: (*pc).notify,
            #[cfg(ngx_feature = "http_ssl")]
            original_set_session: (*pc).set_session,
            #[cfg(ngx_feature = "http_ssl")]
            original_save_session: (*pc).save_session,
        });

        (*pc).data = kp.cast();
        (*pc).get = Some(route_get_peer);
        (*pc).free = Some(free_peer);
        if (*pc).notify.is_some() {
            (*pc).notify = Some(notify_peer);
        }
        #[cfg(ngx_feature = "http_ssl")]
        {
            (*pc).set_session = Some(set_session);
            (*pc).save_session = Some(save_session);
        }
    }
    Status::NGX_OK.0
}

/// Evaluates the request's `slice_key` into `key` (from the request pool).
/// A key of one variable alone is that variable's value, as nginx's script
/// would make it (flushed if not cacheable; empty if not found); any other
/// runs the complex value. A cacheable variable's value stays the
/// request's (`$host`: the Host header or the server name) and is not
/// copied; one evaluated anew each time is, as the script would.
///
/// # Safety
/// `r` must be live, `slice` its upstream's.
#[inline]
unsafe fn evaluate_key(r: *mut ngx_http_request_t, slice: &SliceConf, key: &mut ngx_str_t) -> bool {
    // SAFETY: see above.
    unsafe {
        if slice.key_is_host {
            *key = host(r);
            return true;
        }
        let Some(index) = slice.key_var else {
            return ngx_http_complex_value(r, slice.key, key) == Status::NGX_OK.0;
        };
        let vv = ngx_http_get_flushed_variable(r, index);
        if vv.is_null() || (*vv).not_found() != 0 || (*vv).len() == 0 {
            return true;
        }
        let len = (*vv).len() as usize;
        if (*vv).no_cacheable() == 0 {
            *key = ngx_str_t {
                len,
                data: (*vv).data,
            };
            return true;
        }
        let data = ngx_pnalloc((*r).pool, len) as *mut u8;
        if data.is_null() {
            return false;
        }
        ptr::copy_nonoverlapping((*vv).data, data, len);
        *key = ngx_str_t { len, data };
        true
    }
}

/// The value of `$host`, read as nginx's own handler of the variable
/// (`ngx_http_variable_host()`, the same in every release since 0.8)
/// reads it: the request's validated host name, or the server's name
/// without one. Not through the variable, whose lookup and flags cost four
/// times as much (and which nothing else may read in this request); not
/// copied, as a cacheable variable's value is not.
///
/// # Safety
/// `r` must be live.
#[inline]
unsafe fn host(r: *mut ngx_http_request_t) -> ngx_str_t {
    // SAFETY: see above; a request's srv_conf holds the core module's.
    unsafe {
        let server = (*r).headers_in.server;
        if server.len != 0 {
            return server;
        }
        let cscf =
            *(*r).srv_conf.add(ngx_http_core_module.ctx_index) as *const ngx_http_core_srv_conf_t;
        if cscf.is_null() {
            return ngx_str_t::empty();
        }
        (*cscf).server_name
    }
}

/// `get peer`: the balancer chooses, then an idle connection to exactly
/// that choice is reused if there is one. One function per `Route`
/// (`ROUTE`, chosen by init peer): each way compiled on its own, so that
/// none pays for another's registers.
unsafe extern "C" fn get_peer<const ROUTE: u8>(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: data is our PeerData set in init_peer; pc is the request's.
    unsafe {
        let kp = &mut *(data as *mut PeerData);
        debug_http!((*pc).log, "get keepalive slice peer");

        let rc = (kp.original_get_peer)(pc, kp.data);
        if rc != Status::NGX_OK.0 {
            // Free peer stores into no bucket for this try, and checks
            // what it is given.
            kp.bucket = None;
            if ROUTE == Route::Tls as u8 {
                kp.keep_unchecked = false;
            }
            return rc;
        }

        let idle = &mut *(*kp.conf).idle;
        let taken = if ROUTE == Route::Keyed as u8 {
            // Per try: a TLS name may depend on the server chosen.
            let u = kp.upstream();
            let addr = kp
                .tls
                .evaluate(kp.request, u, pc, kp.tag, &mut idle.tls_addresses);
            kp.bucket = match addr.and_then(|key| kp.bucket_key(key)) {
                Some(key) => idle.cache.find(&key),
                None => None,
            };
            kp.bucket.and_then(|b| idle.cache.take_from(b))
        } else {
            // Unsliced: to the server of the last request first (a lone
            // server's every request), else by the key's hash. A TLS
            // identity is evaluated per try: its name may depend on the
            // server chosen.
            let key = if ROUTE == Route::Plain as u8 {
                Some((sockaddr(pc), kp.tag))
            } else {
                // Route::Tls: the key is TLS (init peer).
                let kept = &mut idle.tls_addresses;
                let u = kp.upstream();
                tls::evaluate_tls(&mut kp.tls, kp.request, u, pc, kp.tag, kept)
            };
            match key {
                None => {
                    kp.bucket = None;
                    None
                }
                Some((addr, tag)) => match idle.cache.take_recent(addr, tag) {
                    Some((bucket, taken)) => {
                        kp.bucket = Some(bucket);
                        taken
                    }
                    None => {
                        kp.bucket = idle.cache.find_hashed(&BucketKey {
                            addr,
                            slice: &[],
                            tag,
                        });
                        kp.bucket.and_then(|b| idle.cache.take_from(b))
                    }
                },
            }
        };
        // A published connection is withdrawn before it is used; one
        // another worker took meanwhile is dropped, and the next tried.
        // `share`: set only while this worker shares (one worker: never).
        let mut taken = taken;
        if idle.share {
            while let Some(c) = taken {
                let handle = (*c.as_ptr()).data as *mut SlotHandle;
                if (*handle).withdraw() {
                    break;
                }
                share::drop_taken(c.as_ptr());
                taken = kp.bucket.and_then(|b| idle.cache.take_from(b));
            }
        }
        if ROUTE == Route::Tls as u8 {
            // Reused: nginx opened it with this identity, and checked it
            // when it was kept.
            kp.keep_unchecked = taken.is_some();
        }
        let taken = taken.map(NonNull::as_ptr);
        // What a reused connection carries of its backend's hints (its
        // handle is still its data); a new one, or one taken from another
        // worker, carries nothing.
        kp.hint = match taken {
            Some(c) => (*((*c).data as *const SlotHandle)).hint,
            None => 0,
        };
        let kp = &*kp;
        let mut taken = taken;
        let mut shared = false;
        if taken.is_none() && idle.share {
            taken = take_shared(kp, pc, idle);
            shared = taken.is_some();
        }
        idle.stats.count(match taken {
            Some(_) => Counter::Reused,
            None => Counter::Missed,
        });
        if idle.log_tries {
            // nginx counts this request on the connection right after.
            let requests = taken.map_or(1, |c| (*c).requests + 1);
            variables::record_try(
                try_log(kp),
                kp.request,
                taken.is_some(),
                shared,
                requests,
                kp.logged_key(),
            );
        }
        let Some(c) = taken else {
            debug_http!(
                (*pc).log,
                "get keepalive slice peer: no idle connection for {}",
                kp.identity()
            );
            return Status::NGX_OK.0;
        };
        if shared {
            (*pc).connection = c;
            (*pc).set_cached(1);
            return Status::NGX_DONE.0;
        }

        debug_http!(
            (*pc).log,
            "get keepalive slice peer: using connection {:p}: {}",
            c,
            kp.identity()
        );

        idle::unpark(c, (*pc).log);

        (*pc).connection = c;
        (*pc).set_cached(1);
    }
    Status::NGX_DONE.0
}

/// Whether this request's connections may move between workers: plain
/// (no TLS), of a protocol whose whole state is the socket, with a key.
///
/// # Safety
/// The request of `kp` must be live.
#[inline]
unsafe fn shareable(kp: &PeerData) -> bool {
    // SAFETY: see above.
    unsafe {
        matches!(kp.tls, TlsKey::Plain)
            && kp.slice_state != SliceState::Failed
            && share::shareable_module((*kp.upstream()).output.tag)
    }
}

/// After a local miss: an idle connection of the request's bucket that
/// another worker holds, if there is one.
///
/// # Safety
/// `pc` and `kp` belong to a live request whose balancer chose a server.
#[inline(never)]
unsafe fn take_shared(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    idle: &mut IdleState,
) -> Option<*mut ngx_connection_t> {
    // SAFETY: see above.
    unsafe {
        if !shareable(kp) {
            return None;
        }
        let slice = kp.logged_key();
        let key = share::key(kp.conf as usize, kp.tag, sockaddr(pc), slice.as_bytes())?;
        let taken = share::take(&key, pc);
        for _ in 0..taken.failed {
            idle.stats.count(Counter::ShareFailed);
        }
        let c = taken.connection?;
        idle.stats.count(Counter::SharedTaken);
        debug_http!(
            (*pc).log,
            "get keepalive slice peer: using connection {:p} of another worker: {}",
            c,
            kp.identity()
        );
        Some(c)
    }
}

/// Publishes a connection just kept, for the other workers.
///
/// # Safety
/// `c` is the request's connection, just stored in `handle`'s slot.
#[inline(never)]
unsafe fn publish(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    c: *mut ngx_connection_t,
    handle: *mut SlotHandle,
) {
    // SAFETY: see above.
    unsafe {
        if !shareable(kp) {
            return;
        }
        let slice = kp.logged_key();
        if let Some(key) = share::key(kp.conf as usize, kp.tag, sockaddr(pc), slice.as_bytes()) {
            (*handle).ticket = share::publish(c, &key);
        }
    }
}

/// Whether the connection can be kept, before the cache is even asked:
/// the same checks as [`unkeepable`], which says why not (out of line),
/// and the read event armed.
///
/// # Safety
/// `pc` and `kp` must belong to a live request.
#[inline(always)]
unsafe fn keepable(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    state: ngx_uint_t,
) -> Option<NonNull<ngx_connection_t>> {
    // SAFETY: see above.
    unsafe {
        let conn = NonNull::new((*pc).connection)?;
        if state & NGX_PEER_FAILED != 0 {
            return None;
        }
        let c = conn.as_ptr();
        let u = kp.upstream();
        let (rev, wev) = ((*c).read, (*c).write);
        let kcf = &*kp.conf;
        let usable = (*u).keepalive() != 0
            && (*rev).eof() == 0
            && (*rev).error() == 0
            && (*rev).timedout() == 0
            && (*wev).error() == 0
            && (*wev).timedout() == 0
            && (*c).requests < kcf.requests
            && ngx_current_msec.wrapping_sub((*c).start_time) <= kcf.time
            && (*u).request_body_sent() != 0
            // Graceful shutdown must not create new idle connections.
            && ngx_terminate == 0
            && ngx_exiting == 0;
        (usable && ngx_handle_read_event(rev, 0) == Status::NGX_OK.0).then_some(conn)
    }
}

/// Why [`keepable`] said no: the first of its checks that fails, in the
/// order the status page counts them, or the read event. `requests` is
/// the most requests the connection may have carried: `keepalive_requests`,
/// or fewer when the backend's `Keep-Alive` header says so (`free_hinted`).
///
/// # Safety
/// As for [`keepable`], called right after it (or instead of it, when the
/// hint says no).
unsafe fn unkeepable(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    state: ngx_uint_t,
    requests: ngx_uint_t,
) -> (NotKept, &'static str) {
    // SAFETY: see above.
    unsafe {
        let c = (*pc).connection;
        if state & NGX_PEER_FAILED != 0 || c.is_null() {
            return (NotKept::Error, "peer failed");
        }
        // Before the connection's own state: a backend that answers
        // "Connection: close" often sends its FIN with the response, and
        // its reason is the response, not an error.
        let u = kp.upstream();
        if (*u).keepalive() == 0 {
            return (NotKept::ResponseNotKeepalive, "response not keepalive");
        }
        let (rev, wev) = ((*c).read, (*c).write);
        if (*rev).eof() != 0
            || (*rev).error() != 0
            || (*rev).timedout() != 0
            || (*wev).error() != 0
            || (*wev).timedout() != 0
        {
            return (NotKept::Error, "connection error");
        }
        let kcf = &*kp.conf;
        if (*c).requests >= kcf.requests {
            return (NotKept::Requests, "keepalive_requests reached");
        }
        if (*c).requests >= requests {
            return (
                NotKept::KeepaliveHint,
                "the backend's Keep-Alive header: no reuse",
            );
        }
        if ngx_current_msec.wrapping_sub((*c).start_time) > kcf.time {
            return (NotKept::Time, "keepalive_time reached");
        }
        if (*u).request_body_sent() == 0 {
            return (NotKept::RequestBodyUnsent, "request body not sent");
        }
        if ngx_terminate != 0 || ngx_exiting != 0 {
            return (NotKept::Shutdown, "exiting");
        }
        // All else passed: ngx_handle_read_event() failed.
        (NotKept::Error, "read event")
    }
}

/// The connection is not kept: logged and counted.
///
/// # Safety
/// As for [`unkeepable`].
#[cold]
#[inline(never)]
unsafe fn not_kept(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    state: ngx_uint_t,
    requests: ngx_uint_t,
) {
    // SAFETY: see above.
    unsafe {
        let (reason, text) = unkeepable(kp, pc, state, requests);
        debug_http!((*pc).log, "free keepalive slice peer: not saving: {}", text);
        (*(*kp.conf).idle).count(Counter::NotKept(reason));
    }
}

/// The per-bucket limit for this request: `slice_dyn` (read now) wins over
/// `slice_conn`; unsliced buckets are only bound by the cache itself.
///
/// # Safety
/// The request of `kp` must be live.
#[inline(always)]
unsafe fn bucket_limit(kp: &PeerData, log: *mut ngx_log_t) -> Option<usize> {
    // SAFETY: see above.
    unsafe {
        let Some(slice) = &(*kp.conf).slice else {
            return Some(usize::MAX);
        };
        let Some(index) = slice.dyn_index else {
            return slice.conn;
        };
        let vv = ngx_http_get_flushed_variable(kp.request, index);
        if vv.is_null() || (*vv).not_found() != 0 {
            log_error!(
                NGX_LOG_WARN,
                log,
                "keepalive: \"slice_dyn\" variable \"${}\" not found, connection not kept",
                NgxStr::from_bytes(slice.dyn_name.as_bytes())
            );
            return None;
        }
        let value = core::slice::from_raw_parts((*vv).data, (*vv).len() as usize);
        match parse_number(value) {
            Some(n) => Some(n),
            None => {
                log_error!(NGX_LOG_WARN, log, "keepalive: \"slice_dyn\" variable \"${}\" is \"{}\", not a number, connection not kept", NgxStr::from_bytes(slice.dyn_name.as_bytes()), NgxStr::from_bytes(value));
                None
            }
        }
    }
}

/// `free peer`: keeps the connection if it can be reused, then hands the
/// peer back to the balancer.
unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    // SAFETY: data is our PeerData; pc is the request's peer connection.
    unsafe {
        let kp = &*(data as *const PeerData);
        let log = (*pc).log;
        let debug = debugging(log);
        debug_http_if!(debug, log, "free keepalive slice peer");

        if kp.hint & HINTED != 0 {
            free_hinted(kp, pc, state, log, debug);
        } else if let Some(conn) = keepable(kp, pc, state) {
            keep(kp, pc, conn, log, debug);
        } else {
            not_kept(kp, pc, state, (*kp.conf).requests);
            unkept(pc);
        }

        if let Some(free) = kp.original_free_peer {
            free(pc, kp.data, state);
        }
    }
}

/// [`free_peer`] of a try whose response has a `Keep-Alive` header, or
/// whose connection carries a request limit from an earlier one: not
/// kept if the hint says no further request, otherwise kept with what
/// the hint says (`IdleState::next`, for [`keep`]).
///
/// # Safety
/// As for [`keepable`].
#[cold]
#[inline(never)]
unsafe fn free_hinted(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    state: ngx_uint_t,
    log: *mut ngx_log_t,
    debug: bool,
) {
    // SAFETY: see above.
    unsafe {
        let c = (*pc).connection;
        let kcf = &*kp.conf;
        let (requests, next) = hint::decide(kp.hint, kp.upstream(), c, kcf, log);
        if !c.is_null() && (*c).requests >= requests {
            not_kept(kp, pc, state, requests);
            unkept(pc);
        } else if let Some(conn) = keepable(kp, pc, state) {
            (*kcf.idle).next = next;
            keep(kp, pc, conn, log, debug);
            (*kcf.idle).next = IdleHint::none(kcf.timeout);
        } else {
            not_kept(kp, pc, state, kcf.requests);
            unkept(pc);
        }
    }
}

/// The `Keep-Alive` header handler's way in (`hint::hook_header`): tells
/// free peer the response has the header, if the request's peer is ours
/// and its upstream reads hints (`keepalive_hints`).
///
/// # Safety
/// `u` is a live upstream whose response is being parsed.
pub unsafe fn record_hint(u: *mut ngx_http_upstream_t) {
    // SAFETY: see above; a peer whose free is ours has our PeerData.
    unsafe {
        let ours: unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t) =
            free_peer;
        if (*u).peer.free.map(|f| f as usize) != Some(ours as usize) {
            return;
        }
        let kp = &mut *((*u).peer.data as *mut PeerData);
        if (*kp.conf).hints == 0 {
            return;
        }
        kp.hint |= HEADER;
    }
}

/// Stores the request's connection in its bucket, or logs why not.
///
/// # Safety
/// `pc` holds a keepable connection of the live request of `kp`.
#[inline(always)]
unsafe fn keep(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    conn: NonNull<ngx_connection_t>,
    log: *mut ngx_log_t,
    debug: bool,
) {
    // SAFETY: see above.
    unsafe {
        let c = conn.as_ptr();
        let idle = &mut *(*kp.conf).idle;
        // Plain and unsliced, or reused under its TLS identity: nothing to
        // check, no bucket limit.
        let limit = if kp.keep_unchecked {
            usize::MAX
        } else {
            if !tls_keepable(kp, pc, log) {
                idle.count(Counter::NotKept(NotKept::Error));
                unkept(pc);
                return;
            }
            let Some(limit) = bucket_limit(kp, log) else {
                idle.count(Counter::NotKept(NotKept::Error));
                unkept(pc);
                return;
            };
            limit
        };

        // Into the bucket get peer found, without the key, if it can be;
        // otherwise by the key, out of line.
        let slot = match kp
            .bucket
            .and_then(|b| idle.cache.store_known(b, conn, limit))
        {
            Some(Ok(slot)) => slot,
            Some(Err(refusal)) => {
                refused(kp, idle, log, &refusal);
                unkept(pc);
                return;
            }
            None => match store_by_key(kp, pc, conn, idle, limit, log) {
                Some(slot) => slot,
                None => {
                    unkept(pc);
                    return;
                }
            },
        };

        // The cache hands out slots of its own arena, which `handles`
        // mirrors; were that ever broken, the connection is not kept
        // (upstream closes it) rather than the worker stopping.
        let Some(handle) = idle.handles.get_mut(slot).map(ptr::from_mut) else {
            idle.cache.remove(slot);
            idle.count(Counter::NotKept(NotKept::Error));
            unkept(pc);
            return;
        };
        // keepalive_timeout, or the hint's (free_hinted).
        let next = idle.next;
        (*handle).hint = next.packed;
        idle.count(Counter::Kept);

        debug_http_if!(
            debug,
            log,
            "free keepalive slice peer: saving connection {:p}: {}",
            c,
            kp.identity()
        );

        // A request limit from the backend's Keep-Alive header stays with
        // the connection's handle in this worker, which the registry does
        // not carry: such a connection is not offered to the others.
        if idle.share && next.packed & CARRIED == 0 {
            publish(kp, pc, c, handle.cast());
        }
        (*pc).connection = ptr::null_mut();
        idle::park(c, handle.cast(), next.timeout);
    }
}

/// The request's connection is not kept: nginx closes it next; one that
/// moved here from another worker is shut down first (see `share`).
///
/// # Safety
/// `pc` is the request's peer connection.
#[cold]
#[inline(never)]
unsafe fn unkept(pc: *mut ngx_peer_connection_t) {
    // SAFETY: see above.
    unsafe {
        if share::active() && !(*pc).connection.is_null() {
            share::before_close((*pc).connection);
        }
    }
}

/// [`keep`] by the connection's key: the bucket get peer found is not the
/// key's any more, or there was none, or room must be made. Returns the
/// slot, or `None` (logged and counted) when the connection is not kept.
///
/// # Safety
/// As for [`keep`].
#[inline(never)]
unsafe fn store_by_key(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    conn: NonNull<ngx_connection_t>,
    idle: &mut IdleState,
    limit: usize,
    log: *mut ngx_log_t,
) -> Option<usize> {
    // SAFETY: see above.
    unsafe {
        let Some(key) = kp.tls.key(pc, kp.tag).and_then(|key| kp.bucket_key(key)) else {
            idle.count(Counter::NotKept(NotKept::Error));
            return None;
        };

        // Connections pushed out to make room: the least recently stored
        // one when the cache is full, or those of the key whose bucket this
        // key takes.
        let stats = &idle.stats;
        let evict = |evicted: NonNull<ngx_connection_t>| {
            debug_http!(log, "keepalive slice: evicting connection {:p}", evicted);
            // One another worker took counts as its reuse only.
            if idle::close_idle(evicted.as_ptr()) {
                stats.count(Counter::Evicted);
            }
        };
        let stored = match idle.cache.store_at(kp.bucket, &key, conn, limit, evict) {
            Ok(stored) => stored,
            Err(refusal) => {
                refused(kp, idle, log, &refusal);
                return None;
            }
        };

        if let Some(closed) = stored.reclaimed {
            debug_http!(
                log,
                "keepalive slice: key \"{}\" took the bucket of another key, {} idle connections closed",
                NgxStr::from_bytes(key.slice),
                closed
            );
        }
        Some(stored.slot)
    }
}

/// The cache refused the connection: logged and counted.
#[cold]
#[inline(never)]
fn refused(kp: &PeerData, idle: &mut IdleState, log: *mut ngx_log_t, refusal: &Refusal) {
    let slice = match kp.slice_state {
        SliceState::Key => kp.slice_key.as_bytes(),
        _ => &[],
    };
    log_refusal(log, refusal, slice);
    idle.count(Counter::NotKept(not_kept_because(refusal)));
}

/// The status page's reason for a refusal of the cache.
fn not_kept_because(refusal: &Refusal) -> NotKept {
    match refusal {
        Refusal::ZeroLimit => NotKept::LimitZero,
        Refusal::BucketFull { .. } => NotKept::BucketFull,
        Refusal::NoBuckets => NotKept::NoFreeBucket,
        Refusal::Unusable => NotKept::Error,
    }
}

/// Whether the request's TLS identity can key its connection: it fits a
/// bucket, and a connection nginx has just opened used the name the
/// identity holds (nginx evaluated it again, after get peer; a variable
/// that changed in between must not file the connection under the wrong
/// name).
///
/// # Safety
/// `pc` holds a connection of the live request of `kp`.
#[inline(always)]
unsafe fn tls_keepable(kp: &PeerData, pc: *mut ngx_peer_connection_t, log: *mut ngx_log_t) -> bool {
    let TlsKey::Tls(state) = &kp.tls else {
        return true;
    };
    match state {
        TlsState::Ready { .. } => {}
        TlsState::Failed => return false,
        TlsState::TooLong(len) => {
            log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, its address and TLS identity (name, \
                 client certificate) take {len} bytes, more than the {MAX_ADDR_LEN} a bucket holds"
            );
            return false;
        }
    }
    // SAFETY: u is the request's upstream; a connection nginx opened for
    // this try (not cached) went through ngx_http_upstream_ssl_name().
    unsafe {
        if (*pc).cached() == 0 {
            if let Some(name) = kp.tls.name() {
                if (*kp.upstream()).ssl_name.as_bytes() != name {
                    log_error!(
                        NGX_LOG_INFO,
                        log,
                        "keepalive: connection not kept, nginx opened it with TLS name \"{}\", \
                         not \"{}\" as evaluated for its key",
                        NgxStr::from_bytes((*kp.upstream()).ssl_name.as_bytes()),
                        NgxStr::from_bytes(name)
                    );
                    return false;
                }
            }
        }
    }
    true
}

fn log_refusal(log: *mut ngx_log_t, refusal: &Refusal, key: &[u8]) {
    let key = NgxStr::from_bytes(key);
    match refusal {
        Refusal::ZeroLimit => {
            log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, bucket limit for key \"{key}\" is 0"
            );
        }
        Refusal::BucketFull { limit } => {
            log_error!(NGX_LOG_INFO, log, "keepalive: connection not kept, bucket for key \"{key}\" is full ({limit} idle connections)");
        }
        Refusal::NoBuckets => {
            log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, no bucket for key \"{key}\" (slice_poolsize=0)"
            );
        }
        Refusal::Unusable => {
            log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, unusable server address"
            );
        }
    }
}

unsafe extern "C" fn notify_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    // SAFETY: installed only when the balancer had a notify callback.
    unsafe {
        let kp = &*(data as *const PeerData);
        if let Some(notify) = kp.original_notify {
            notify(pc, kp.data, kind);
        }
    }
}

/// `set session`: the balancer's session is resumed only if a request of
/// this identity saved it (see `session`).
#[cfg(ngx_feature = "http_ssl")]
unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is our PeerData; pc holds the new TLS connection.
    unsafe {
        let kp = &*(data as *const PeerData);
        let mut buf = [0u8; MAX_SESSION_STAMP];
        let (Some(set), Some(stamp)) = (kp.original_set_session, kp.session_stamp(&mut buf)) else {
            return Status::NGX_OK.0;
        };
        let rc = set(pc, kp.data);
        if rc == Status::NGX_OK.0 {
            session::resume_only_own((*pc).connection, stamp, (*pc).log);
        }
        rc
    }
}

/// `save session`: the session is stamped with this request's identity
/// before the balancer keeps it; one that cannot be stamped is not kept.
#[cfg(ngx_feature = "http_ssl")]
unsafe extern "C" fn save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: data is our PeerData; pc holds the request's TLS connection.
    unsafe {
        let kp = &*(data as *const PeerData);
        let mut buf = [0u8; MAX_SESSION_STAMP];
        let (Some(save), Some(stamp)) = (kp.original_save_session, kp.session_stamp(&mut buf))
        else {
            return;
        };
        if session::stamp((*pc).connection, stamp) {
            save(pc, kp.data);
        }
    }
}
