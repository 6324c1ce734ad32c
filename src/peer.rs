//! Per-request callbacks and idle-connection handlers, one small function
//! per callback as in nginx's own `ngx_http_upstream_keepalive_module.c`.
//!
//! The balancer is always asked first; only then is an idle connection to
//! that exact server address (and slice key, and location with `local`)
//! taken from the cache.

use core::ffi::c_void;
use core::ptr;

use ngx::core::NgxStr;
use ngx::ffi::{
    ngx_close_connection, ngx_conf_t, ngx_connection_t, ngx_current_msec, ngx_cycle, ngx_del_timer,
    ngx_destroy_pool, ngx_event_free_peer_pt, ngx_event_get_peer_pt, ngx_event_notify_peer_pt,
    ngx_event_t, ngx_exiting, ngx_handle_read_event, ngx_http_complex_value,
    ngx_http_get_flushed_variable, ngx_http_request_t, ngx_http_upstream_srv_conf_t,
    ngx_http_upstream_t, ngx_int_t, ngx_log_t, ngx_palloc, ngx_peer_connection_t, ngx_socket_errno,
    ngx_str_t, ngx_terminate, ngx_uint_t, NGX_EAGAIN, NGX_LOG_EMERG, NGX_LOG_INFO, NGX_LOG_WARN,
};
#[cfg(ngx_feature = "http_ssl")]
use ngx::ffi::{ngx_event_save_peer_session_pt, ngx_event_set_peer_session_pt, ngx_ssl_shutdown};
use ngx::{ngx_log_debug_mask, ngx_log_error};

use crate::args::parse_number;
use crate::cache::{boxed_slice, BucketKey, IdleCache, Refusal};
use crate::module::{
    apply_defaults, free_with_cycle, ngx_http_upstream_keepalive_slice_module, KeepaliveConf,
    NGX_ERROR, NGX_OK,
};

const NGX_DONE: ngx_int_t = ngx::ffi::NGX_DONE as ngx_int_t;
const NGX_AGAIN: ngx_int_t = ngx::ffi::NGX_AGAIN as ngx_int_t;
const NGX_PEER_FAILED: ngx_uint_t = ngx::ffi::NGX_PEER_FAILED as ngx_uint_t;

/// Where an idle connection sits: `c->data` of an idle connection points
/// at its handle, so the close handler finds its slot without a search.
pub struct SlotHandle {
    idle: *mut IdleState,
    slot: usize,
}

/// One upstream's idle connections in this worker (the configuration is
/// copied into each worker by fork, and with it this state).
pub struct IdleState {
    cache: IdleCache<*mut ngx_connection_t>,
    handles: Box<[SlotHandle]>,
}

/// Per-request peer data, from the request pool.
struct PeerData {
    conf: *mut KeepaliveConf,
    upstream: *mut ngx_http_upstream_t,
    request: *mut ngx_http_request_t,
    /// The wrapped balancer's own data.
    data: *mut c_void,
    slice_key: SliceKey,

    original_get_peer: ngx_event_get_peer_pt,
    original_free_peer: ngx_event_free_peer_pt,
    original_notify: ngx_event_notify_peer_pt,
    #[cfg(ngx_feature = "http_ssl")]
    original_set_session: ngx_event_set_peer_session_pt,
    #[cfg(ngx_feature = "http_ssl")]
    original_save_session: ngx_event_save_peer_session_pt,
}

/// The request's `slice_key`, evaluated once in init peer.
enum SliceKey {
    Unsliced,
    Key(ngx_str_t),
    /// Evaluation failed: the request neither takes nor leaves an idle
    /// connection, and is otherwise unaffected.
    Failed,
}

impl PeerData {
    /// The bucket this request's connections belong to.
    ///
    /// # Safety
    /// `pc` must hold the address chosen by the balancer, and `upstream`
    /// must be live.
    unsafe fn bucket_key(&self, pc: *mut ngx_peer_connection_t) -> Option<BucketKey<'_>> {
        let slice = match &self.slice_key {
            SliceKey::Unsliced => &[][..],
            SliceKey::Key(key) => key.as_bytes(),
            SliceKey::Failed => return None,
        };
        // SAFETY: sockaddr/socklen describe the balancer's choice; u->conf
        // is the location's upstream conf, stable for the cycle.
        unsafe {
            let addr =
                core::slice::from_raw_parts((*pc).sockaddr as *const u8, (*pc).socklen as usize);
            let tag = if (*self.conf).local {
                (*self.upstream).conf as usize
            } else {
                0
            };
            Some(BucketKey { addr, slice, tag })
        }
    }
}

/// `init_upstream`: wraps the balancer's and creates the idle cache.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: called by nginx for the upstream whose init_upstream we set.
    unsafe {
        ngx_log_debug_mask!(DebugMask::Http, (*cf).log, "init keepalive slice");

        let kcf = &mut *srv_conf(us);
        apply_defaults(kcf);

        let Some(init) = kcf.original_init_upstream else {
            return NGX_ERROR;
        };
        if init(cf, us) != NGX_OK {
            return NGX_ERROR;
        }

        kcf.original_init_peer = (*us).peer.init;
        (*us).peer.init = Some(init_peer);

        // A bucket stays its key's while the key's connections are busy,
        // so buckets may outnumber idle connections: every idle connection
        // in a bucket of its own, as many keys again whose connections are
        // all busy, and one for a new key. A larger slice_poolsize
        // allocates no more.
        let most_useful = kcf.max_cached.saturating_mul(2).saturating_add(1);
        let (poolsize, keylen, cache) = match &kcf.slice {
            Some(slice) => {
                let poolsize = slice.poolsize.min(most_useful);
                let cache = IdleCache::new(kcf.max_cached, poolsize, slice.keylen);
                (poolsize, slice.keylen, cache)
            }
            None => (
                kcf.max_cached.saturating_add(1),
                0,
                IdleCache::unsliced(kcf.max_cached),
            ),
        };
        let handles = boxed_slice(kcf.max_cached, |slot| SlotHandle {
            idle: ptr::null_mut(),
            slot,
        });
        let (Some(cache), Some(handles)) = (cache, handles) else {
            ngx_log_error!(
                NGX_LOG_EMERG,
                (*cf).log,
                "keepalive: cannot allocate a cache of {} connections in {} buckets \
                 of {} key bytes",
                kcf.max_cached,
                poolsize,
                keylen
            );
            return NGX_ERROR;
        };
        ngx_log_debug_mask!(
            DebugMask::Http,
            (*cf).log,
            "init keepalive slice: {} connections, {} buckets of {} key bytes, {} bytes",
            kcf.max_cached,
            poolsize,
            keylen,
            cache.memory_bytes() + handles.len() * size_of::<SlotHandle>()
        );
        let Some(idle) = free_with_cycle(cf, Box::new(IdleState { cache, handles })) else {
            return NGX_ERROR;
        };
        for handle in (*idle).handles.iter_mut() {
            handle.idle = idle;
        }
        kcf.idle = idle;
    }
    NGX_OK
}

/// # Safety
/// `us` must be an upstream configured with this module's `keepalive`.
unsafe fn srv_conf(us: *mut ngx_http_upstream_srv_conf_t) -> *mut KeepaliveConf {
    // SAFETY: srv_conf is indexed by ctx_index, as for every http module.
    unsafe {
        *(*us)
            .srv_conf
            .add(ngx_http_upstream_keepalive_slice_module.ctx_index) as *mut KeepaliveConf
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
        ngx_log_debug_mask!(DebugMask::Http, log, "init keepalive slice peer");

        let kcf = srv_conf(us);
        let kp = ngx_palloc((*r).pool, size_of::<PeerData>()) as *mut PeerData;
        if kp.is_null() {
            return NGX_ERROR;
        }

        let Some(init) = (*kcf).original_init_peer else {
            return NGX_ERROR;
        };
        if init(r, us) != NGX_OK {
            return NGX_ERROR;
        }

        let slice_key = match &(*kcf).slice {
            Some(slice) => {
                let mut key = ngx_str_t::empty();
                if ngx_http_complex_value(r, slice.key, &mut key) == NGX_OK {
                    ngx_log_debug_mask!(
                        DebugMask::Http,
                        log,
                        "keepalive slice key: \"{}\"",
                        NgxStr::from_bytes(key.as_bytes())
                    );
                    SliceKey::Key(key)
                } else {
                    ngx_log_error!(
                        NGX_LOG_WARN,
                        log,
                        "keepalive: cannot evaluate \"slice_key\", idle connections not used"
                    );
                    SliceKey::Failed
                }
            }
            None => SliceKey::Unsliced,
        };

        let u = (*r).upstream;
        let pc = ptr::addr_of_mut!((*u).peer);
        kp.write(PeerData {
            conf: kcf,
            upstream: u,
            request: r,
            data: (*pc).data,
            slice_key,
            original_get_peer: (*pc).get,
            original_free_peer: (*pc).free,
            original_notify: (*pc).notify,
            #[cfg(ngx_feature = "http_ssl")]
            original_set_session: (*pc).set_session,
            #[cfg(ngx_feature = "http_ssl")]
            original_save_session: (*pc).save_session,
        });

        (*pc).data = kp.cast();
        (*pc).get = Some(get_peer);
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
    NGX_OK
}

/// `get peer`: the balancer chooses, then an idle connection to exactly
/// that choice is reused if there is one.
unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is our PeerData set in init_peer; pc is the request's.
    unsafe {
        let kp = &*(data as *const PeerData);
        ngx_log_debug_mask!(DebugMask::Http, (*pc).log, "get keepalive slice peer");

        let Some(get) = kp.original_get_peer else {
            return NGX_ERROR;
        };
        let rc = get(pc, kp.data);
        if rc != NGX_OK {
            return rc;
        }

        let Some(key) = kp.bucket_key(pc) else {
            return NGX_OK;
        };
        let idle = &mut *(*kp.conf).idle;
        let Some(c) = idle.cache.take(&key) else {
            return NGX_OK;
        };

        ngx_log_debug_mask!(
            DebugMask::Http,
            (*pc).log,
            "get keepalive slice peer: using connection {:p}",
            c
        );

        (*c).set_idle(0);
        (*c).sent = 0;
        (*c).data = ptr::null_mut();
        set_log(c, (*pc).log);

        if (*(*c).read).timer_set() != 0 {
            ngx_del_timer((*c).read);
        }

        (*pc).connection = c;
        (*pc).set_cached(1);
    }
    NGX_DONE
}

/// Points the connection's logs at a request, or back at the cycle.
///
/// # Safety
/// `c` must be a live connection.
unsafe fn set_log(c: *mut ngx_connection_t, log: *mut ngx_log_t) {
    // SAFETY: see above.
    unsafe {
        (*c).log = log;
        (*(*c).read).log = log;
        (*(*c).write).log = log;
        (*(*c).pool).log = log;
    }
}

/// Why a connection cannot be kept, before the cache is even asked.
///
/// # Safety
/// `pc` and `kp` must belong to a live request.
unsafe fn unkeepable(
    kp: &PeerData,
    pc: *mut ngx_peer_connection_t,
    state: ngx_uint_t,
) -> Option<&'static str> {
    // SAFETY: see above.
    unsafe {
        let c = (*pc).connection;
        if state & NGX_PEER_FAILED != 0 || c.is_null() {
            return Some("peer failed");
        }
        let (rev, wev) = ((*c).read, (*c).write);
        if (*rev).eof() != 0
            || (*rev).error() != 0
            || (*rev).timedout() != 0
            || (*wev).error() != 0
            || (*wev).timedout() != 0
        {
            return Some("connection error");
        }
        let kcf = &*kp.conf;
        if (*c).requests >= kcf.requests {
            return Some("keepalive_requests reached");
        }
        if ngx_current_msec.wrapping_sub((*c).start_time) > kcf.time {
            return Some("keepalive_time reached");
        }
        let u = kp.upstream;
        if (*u).keepalive() == 0 {
            return Some("response not keepalive");
        }
        if (*u).request_body_sent() == 0 {
            return Some("request body not sent");
        }
        // Graceful shutdown must not create new idle connections.
        if ngx_terminate != 0 || ngx_exiting != 0 {
            return Some("exiting");
        }
        if ngx_handle_read_event(rev, 0) != NGX_OK {
            return Some("read event");
        }
        None
    }
}

/// The per-bucket limit for this request: `slice_dyn` (read now) wins over
/// `slice_conn`; unsliced buckets are only bound by the cache itself.
///
/// # Safety
/// The request of `kp` must be live.
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
            ngx_log_error!(
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
                ngx_log_error!(NGX_LOG_WARN, log, "keepalive: \"slice_dyn\" variable \"${}\" is \"{}\", not a number, connection not kept", NgxStr::from_bytes(slice.dyn_name.as_bytes()), NgxStr::from_bytes(value));
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
        ngx_log_debug_mask!(DebugMask::Http, log, "free keepalive slice peer");

        if let Some(reason) = unkeepable(kp, pc, state) {
            ngx_log_debug_mask!(
                DebugMask::Http,
                log,
                "free keepalive slice peer: not saving: {}",
                reason
            );
        } else {
            keep(kp, pc, log);
        }

        if let Some(free) = kp.original_free_peer {
            free(pc, kp.data, state);
        }
    }
}

/// Stores the request's connection in its bucket, or logs why not.
///
/// # Safety
/// `pc` holds a keepable connection of the live request of `kp`.
unsafe fn keep(kp: &PeerData, pc: *mut ngx_peer_connection_t, log: *mut ngx_log_t) {
    // SAFETY: see above.
    unsafe {
        let c = (*pc).connection;
        let Some(key) = kp.bucket_key(pc) else {
            return;
        };
        let Some(limit) = bucket_limit(kp, log) else {
            return;
        };
        let idle = &mut *(*kp.conf).idle;

        // Connections pushed out to make room: the least recently stored
        // one when the cache is full, or those of the key whose bucket this
        // key takes.
        let evict = |evicted: *mut ngx_connection_t| {
            ngx_log_debug_mask!(
                DebugMask::Http,
                log,
                "keepalive slice: evicting connection {:p}",
                evicted
            );
            close_connection(evicted);
        };
        let stored = match idle.cache.store(&key, c, limit, evict) {
            Ok(stored) => stored,
            Err(refusal) => {
                log_refusal(log, &refusal, key.slice);
                return;
            }
        };

        if let Some(closed) = stored.reclaimed {
            ngx_log_debug_mask!(
                DebugMask::Http,
                log,
                "keepalive slice: key \"{}\" took the bucket of another key, {} idle connections closed",
                NgxStr::from_bytes(key.slice),
                closed
            );
        }

        // The cache hands out slots of its own arena, which `handles`
        // mirrors; were that ever broken, the connection is not kept
        // (upstream closes it) rather than the worker stopping.
        let Some(handle) = idle.handles.get_mut(stored.slot).map(ptr::from_mut) else {
            idle.cache.remove(stored.slot);
            return;
        };

        ngx_log_debug_mask!(
            DebugMask::Http,
            log,
            "free keepalive slice peer: saving connection {:p}",
            c
        );

        (*pc).connection = ptr::null_mut();

        let (rev, wev) = ((*c).read, (*c).write);
        // A connection stored while rate limited (proxy_limit_rate) would
        // otherwise treat its next read timer as a delay timer and stall.
        (*rev).set_delayed(0);
        ngx::ffi::ngx_add_timer(rev, (*kp.conf).timeout);
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
        (*wev).handler = Some(dummy_handler);
        (*rev).handler = Some(close_handler);

        (*c).data = handle.cast();
        (*c).set_idle(1);
        set_log(c, (*ngx_cycle).log);

        if (*rev).ready() != 0 {
            close_handler(rev);
        }
    }
}

fn log_refusal(log: *mut ngx_log_t, refusal: &Refusal, key: &[u8]) {
    let key = NgxStr::from_bytes(key);
    match refusal {
        Refusal::ZeroLimit => {
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, bucket limit for key \"{key}\" is 0"
            );
        }
        Refusal::BucketFull { limit } => {
            ngx_log_error!(NGX_LOG_INFO, log, "keepalive: connection not kept, bucket for key \"{key}\" is full ({limit} idle connections)");
        }
        Refusal::NoBuckets => {
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, no bucket for key \"{key}\" (slice_poolsize=0)"
            );
        }
        Refusal::Unusable => {
            ngx_log_error!(
                NGX_LOG_INFO,
                log,
                "keepalive: connection not kept, unusable server address"
            );
        }
    }
}

unsafe extern "C" fn dummy_handler(ev: *mut ngx_event_t) {
    // SAFETY: nginx passes a live event.
    unsafe {
        ngx_log_debug_mask!(DebugMask::Http, (*ev).log, "keepalive slice dummy handler");
    }
}

/// Read event on an idle connection: the backend closed it, sent
/// something unexpected, it timed out, or nginx is shutting down
/// (`c->close`, set by the idle-connection sweep).
unsafe extern "C" fn close_handler(ev: *mut ngx_event_t) {
    // SAFETY: ev belongs to an idle connection whose data is a SlotHandle.
    unsafe {
        ngx_log_debug_mask!(DebugMask::Http, (*ev).log, "keepalive slice close handler");

        let c = (*ev).data as *mut ngx_connection_t;

        if (*c).close() == 0 && (*(*c).read).timedout() == 0 {
            let mut buf = [0u8; 1];
            let n = libc::recv((*c).fd, buf.as_mut_ptr().cast(), 1, libc::MSG_PEEK);
            if n == -1 && ngx_socket_errno() == NGX_EAGAIN as i32 {
                // A stale event: keeping `ready` would hide a later close
                // by the backend until the connection is reused.
                (*ev).set_ready(0);
                if ngx_handle_read_event((*c).read, 0) == NGX_OK {
                    return;
                }
            }
        }

        let handle = &*((*c).data as *const SlotHandle);
        (*handle.idle).cache.remove(handle.slot);
        close_connection(c);
    }
}

/// Closes an idle connection: SSL is shut down without waiting for or
/// sending close_notify (the backend may be gone already).
unsafe extern "C" fn close_connection(c: *mut ngx_connection_t) {
    // SAFETY: c is a live connection no longer referenced by the cache.
    unsafe {
        #[cfg(ngx_feature = "http_ssl")]
        if !(*c).ssl.is_null() {
            (*(*c).ssl).set_no_wait_shutdown(1);
            (*(*c).ssl).set_no_send_shutdown(1);
            if ngx_ssl_shutdown(c) == NGX_AGAIN {
                (*(*c).ssl).handler = Some(close_connection);
                return;
            }
        }

        ngx_destroy_pool((*c).pool);
        ngx_close_connection(c);
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

#[cfg(ngx_feature = "http_ssl")]
unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: data is our PeerData.
    unsafe {
        let kp = &*(data as *const PeerData);
        match kp.original_set_session {
            Some(set) => set(pc, kp.data),
            None => NGX_OK,
        }
    }
}

#[cfg(ngx_feature = "http_ssl")]
unsafe extern "C" fn save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: data is our PeerData.
    unsafe {
        let kp = &*(data as *const PeerData);
        if let Some(save) = kp.original_save_session {
            save(pc, kp.data);
        }
    }
}
