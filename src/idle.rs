//! The idle connections of one upstream in one worker: the cache that
//! holds them, and the handlers of a connection while it is idle.
//!
//! A kept connection is *parked*: out of any request, its read event
//! watched for the backend's close (or unexpected data), its timer set to
//! `keepalive_timeout`, its log the cycle's, and `c->data` pointing at its
//! slot's handle, so that the close handler finds the slot without a
//! search. Taking it for a request *unparks* it.

use core::ptr::{self, NonNull};

#[cfg(ngx_feature = "http_ssl")]
use ngx::ffi::ngx_ssl_shutdown;
use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_connection_t, ngx_current_msec, ngx_cycle,
    ngx_del_timer, ngx_destroy_pool, ngx_event_t, ngx_handle_read_event, ngx_log_t, ngx_msec_t,
    ngx_socket_errno, NGX_EAGAIN,
};

use ngx::core::Status;

use keepalive_slice_core::args::MAX_CONNECTIONS;
use keepalive_slice_core::cache::{boxed_slice, IdleCache, Shape};
use keepalive_slice_core::identity::TlsAddresses;
use keepalive_slice_core::registry::Ticket;
use keepalive_slice_core::stats::{Closed, Counter, UpstreamStats};

use crate::log::debug_http;
use crate::mapping::Region;
use crate::share;

/// What a connection carries of its backend's `Keep-Alive` hints (see
/// `hint`), in one `u32` (the peer data's and the idle connection's
/// handle's): flags in the low bits, the carried request limit above them.
///
/// In the peer data: the response has a `Keep-Alive` header.
pub const HEADER: u32 = 1;
/// The connection carries a request limit (`max`), in the bits from
/// `CARRIED_SHIFT` up.
pub const CARRIED: u32 = 2;
/// In an idle connection's handle: its idle timer is the hint's, shorter
/// than `keepalive_timeout`.
pub const TIMER: u32 = 4;
/// Free peer looks at the hint at all.
pub const HINTED: u32 = HEADER | CARRIED;
pub const CARRIED_SHIFT: u32 = 4;
/// The largest request limit a connection carries: a larger one (268
/// million requests on one connection) is not carried, and
/// `keepalive_requests` alone applies, as without a hint.
pub const MAX_CARRIED: u32 = u32::MAX >> CARRIED_SHIFT;

/// What an idle connection is kept with.
#[derive(Clone, Copy)]
pub struct IdleHint {
    /// The idle timer.
    pub timeout: ngx_msec_t,
    /// For its handle: `CARRIED` and the limit, `TIMER`.
    pub packed: u32,
}

impl IdleHint {
    /// Without a hint: `keepalive_timeout`, nothing carried.
    #[inline(always)]
    pub fn none(keepalive_timeout: ngx_msec_t) -> Self {
        IdleHint {
            timeout: keepalive_timeout,
            packed: 0,
        }
    }
}

/// Where an idle connection sits: `c->data` of an idle connection points
/// at its handle, so the close handler finds its slot without a search.
pub struct SlotHandle {
    idle: *mut IdleState,
    /// (`u32`: `MAX_CONNECTIONS` slots at most.)
    slot: u32,
    /// What the connection keeps of its backend's `Keep-Alive` headers
    /// (`IdleHint::packed`).
    pub hint: u32,
    /// The connection is published to the other workers (see `share`):
    /// withdrawn before this worker uses or closes it.
    pub ticket: Option<Ticket>,
}

impl SlotHandle {
    /// Whether the connection in this slot is still this worker's to use
    /// or close: never published, or withdrawn now. `false`: another
    /// worker took it (the caller drops it, `share::drop_taken`).
    #[inline(always)]
    pub fn withdraw(&mut self) -> bool {
        match self.ticket {
            None => true,
            Some(ticket) => {
                self.ticket = None;
                share::withdraw(ticket)
            }
        }
    }
}

// A handle per connection of every cache, allocated with the configuration
// (docs/directives.md, "Limits and memory").
const _: () = assert!(MAX_CONNECTIONS <= u32::MAX as usize && size_of::<SlotHandle>() <= 40);

/// One upstream's idle connections in this worker (the configuration is
/// copied into each worker by fork, and with it this state).
pub struct IdleState {
    pub cache: IdleCache<NonNull<ngx_connection_t>, Region>,
    /// One per slot of the cache, in the same order.
    pub handles: Box<[SlotHandle]>,
    /// This worker's counters for the upstream (the status page).
    pub stats: UpstreamStats,
    /// The configuration uses `$upstream_keepalive_*`: record each try.
    pub log_tries: bool,
    /// What the connection being freed is kept with: set by free peer when
    /// a hint decided it, back to none after.
    pub next: IdleHint,
    /// Random, per upstream and configuration: part of the stamp of the
    /// TLS sessions saved through this upstream (see `session`).
    #[cfg_attr(not(ngx_feature = "http_ssl"), allow(dead_code))]
    pub session_nonce: u64,
    /// `keepalive_share on` and this worker shares (cleared at init
    /// process otherwise): its plain connections are published to the
    /// other workers and it takes theirs.
    pub share: bool,
    /// The upstream's identity in the registry (its configuration's
    /// address: the same in every worker of one configuration).
    pub upstream: usize,
    /// The TLS addresses of its connections built so far (see `tls`).
    pub tls_addresses: TlsAddresses,
}

impl IdleState {
    /// The state of a cache of `shape`, connections kept for
    /// `keepalive_timeout` without a hint, the long part of its addresses
    /// in `overflow` (of `shape.overflow_len()` bytes); `None` if the
    /// memory is not there. Its handles point at it once it has its final
    /// address ([`IdleState::bind_handles`]).
    pub fn new(shape: Shape, overflow: Region, keepalive_timeout: ngx_msec_t) -> Option<Self> {
        let cache = IdleCache::shaped(shape, overflow)?;
        let capacity = shape.capacity;
        let handles = boxed_slice(capacity, |slot| SlotHandle {
            idle: ptr::null_mut(),
            slot: slot as u32,
            hint: 0,
            ticket: None,
        })?;
        Some(IdleState {
            cache,
            handles,
            stats: UpstreamStats::new(),
            log_tries: false,
            next: IdleHint::none(keepalive_timeout),
            session_nonce: session_nonce(),
            share: false,
            upstream: 0,
            tls_addresses: TlsAddresses::default(),
        })
    }

    /// Points every handle at `idle`, the state's final address.
    pub fn bind_handles(idle: *mut IdleState) {
        // SAFETY: `idle` is a live state that nothing else is using.
        let state = unsafe { &mut *idle };
        for handle in state.handles.iter_mut() {
            handle.idle = idle;
        }
    }

    /// Idle connections the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.handles.len()
    }

    /// Bytes of memory held, fixed by the configuration.
    pub fn memory_bytes(&self) -> usize {
        self.cache.memory_bytes() + self.handles.len() * size_of::<SlotHandle>()
    }

    /// Counts an event that may have changed the buckets in use.
    #[inline]
    pub fn count(&mut self, counter: Counter) {
        self.stats
            .count_with_buckets(counter, self.cache.buckets_in_use());
    }
}

/// A nonce of its own for each upstream of each configuration: 64 random
/// bits from the kernel once per process, mixed with a count of the
/// upstreams (splitmix64's step: distinct for distinct counts), so that
/// thousands of upstreams cost one `getrandom` call, not one each.
fn session_nonce() -> u64 {
    use core::sync::atomic::{AtomicU64, Ordering};
    static SEED: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    // Configurations are read on one thread: no race to choose the seed.
    let mut seed = SEED.load(Ordering::Relaxed);
    if seed == 0 {
        seed = random_seed() | 1;
        SEED.store(seed, Ordering::Relaxed);
    }
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits from the kernel. Not from std's `RandomState`: its keys
/// live in a thread-local, and the first use of the module's dynamic TLS
/// makes LeakSanitizer's thread scan crash at exit in a dlopen()ed module
/// (seen on nginx 1.31.4, "DTLS ... Tracer caught signal 11").
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        return u64::from_ne_bytes(bytes);
    }
    // No getrandom(2) (Linux before 3.17): the nonce only has to differ
    // between configurations, which time and process do well enough.
    // SAFETY: reading nginx's clock and process id, set at start.
    unsafe { (ngx_current_msec as u64).rotate_left(32) ^ ngx::ffi::ngx_pid as u64 }
}

/// Parks connection `c`, just stored in `handle`'s slot, for
/// `timeout` milliseconds (`keepalive_timeout`, or shorter by a hint).
///
/// # Safety
/// `c` is a live connection, out of its request, and `handle` its slot's.
#[inline(always)]
pub unsafe fn park(c: *mut ngx_connection_t, handle: *mut SlotHandle, timeout: ngx_msec_t) {
    // SAFETY: see above.
    unsafe {
        let (rev, wev) = ((*c).read, (*c).write);
        // A connection stored while rate limited (proxy_limit_rate) would
        // otherwise treat its next read timer as a delay timer and stall.
        (*rev).set_delayed(0);
        ngx_add_timer(rev, timeout);
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

/// Unparks connection `c`, just taken from the cache, for a request
/// logging to `log`.
///
/// # Safety
/// `c` is a live connection the cache held.
#[inline(always)]
pub unsafe fn unpark(c: *mut ngx_connection_t, log: *mut ngx_log_t) {
    // SAFETY: see above.
    unsafe {
        (*c).set_idle(0);
        (*c).sent = 0;
        (*c).data = ptr::null_mut();
        set_log(c, log);

        if (*(*c).read).timer_set() != 0 {
            ngx_del_timer((*c).read);
        }
    }
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

unsafe extern "C" fn dummy_handler(ev: *mut ngx_event_t) {
    // SAFETY: nginx passes a live event.
    unsafe {
        debug_http!((*ev).log, "keepalive slice dummy handler");
    }
}

/// Read event on an idle connection: the backend closed it, sent
/// something unexpected, it timed out, or nginx is shutting down
/// (`c->close`, set by the idle-connection sweep).
unsafe extern "C" fn close_handler(ev: *mut ngx_event_t) {
    // SAFETY: ev belongs to an idle connection whose data is a SlotHandle.
    unsafe {
        debug_http!((*ev).log, "keepalive slice close handler");

        let c = (*ev).data as *mut ngx_connection_t;
        let handle = &mut *((*c).data as *mut SlotHandle);

        // Taken by another worker: its traffic woke this one (or the
        // timer did); the registry says so before the socket is looked at,
        // and the taker's bytes are never "unexpected data".
        if handle.ticket.is_some_and(|t| !share::published(t)) {
            handle.ticket = None;
            (*handle.idle).cache.remove(handle.slot as usize);
            share::drop_taken(c);
            return;
        }

        let reason = if (*c).close() != 0 {
            Closed::Shutdown
        } else if (*(*c).read).timedout() != 0 {
            let handle = &*((*c).data as *const SlotHandle);
            if handle.hint & TIMER != 0 {
                Closed::HintTimeout
            } else {
                Closed::Timeout
            }
        } else {
            let mut buf = [0u8; 1];
            let n = libc::recv((*c).fd, buf.as_mut_ptr().cast(), 1, libc::MSG_PEEK);
            if n == -1 && ngx_socket_errno() == NGX_EAGAIN as i32 {
                // A stale event: keeping `ready` would hide a later close
                // by the backend until the connection is reused.
                (*ev).set_ready(0);
                if ngx_handle_read_event((*c).read, 0) == Status::NGX_OK.0 {
                    // Still idle, and still published.
                    return;
                }
                Closed::Error
            } else if n > 0 {
                Closed::UnexpectedData
            } else {
                // EOF, or an error such as a reset: the server's doing.
                Closed::Server
            }
        };

        let idle = &mut *handle.idle;
        idle.cache.remove(handle.slot as usize);
        // Taken since the look above: the bytes seen were the taker's.
        if !handle.withdraw() {
            share::drop_taken(c);
            return;
        }
        idle.count(Counter::Closed(reason));
        share::before_close(c);
        close_connection(c);
    }
}

/// Closes an idle connection that left the cache (evicted, or its bucket
/// given to another key): withdrawn first; one another worker took is
/// only dropped (`false`: it left as the taker's reuse, not as closed).
///
/// # Safety
/// `c` must be a live idle connection no longer referenced by the cache.
pub unsafe fn close_idle(c: *mut ngx_connection_t) -> bool {
    // SAFETY: see above; an idle connection's data is its slot's handle.
    unsafe {
        let handle = &mut *((*c).data as *mut SlotHandle);
        if !handle.withdraw() {
            share::drop_taken(c);
            return false;
        }
        share::before_close(c);
        close_connection(c);
        true
    }
}

/// Closes an idle connection: SSL is shut down without waiting for or
/// sending close_notify (the backend may be gone already).
///
/// # Safety
/// `c` must be a live connection no longer referenced by the cache.
pub unsafe extern "C" fn close_connection(c: *mut ngx_connection_t) {
    // SAFETY: see above.
    unsafe {
        #[cfg(ngx_feature = "http_ssl")]
        if !(*c).ssl.is_null() {
            (*(*c).ssl).set_no_wait_shutdown(1);
            (*(*c).ssl).set_no_send_shutdown(1);
            if ngx_ssl_shutdown(c) == Status::NGX_AGAIN.0 {
                (*(*c).ssl).handler = Some(close_connection);
                return;
            }
        }

        ngx_destroy_pool((*c).pool);
        ngx_close_connection(c);
    }
}
