//! The configuration of an upstream served by this module: the types the
//! directives fill, their defaults, and the lookup from an upstream to its
//! configuration. `module` (the directives) and `peer` (the callbacks) both
//! depend on this file and not on each other's internals.

use core::ffi::c_void;
use core::ptr;

use ngx::ffi::{
    ngx_conf_t, ngx_flag_t, ngx_http_complex_value_t, ngx_http_request_t,
    ngx_http_upstream_init_pt, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_msec_t,
    ngx_pool_cleanup_add, ngx_str_t, ngx_uint_t,
};

use crate::module::ngx_http_upstream_keepalive_slice_module;
use crate::peer::IdleState;

pub const NGX_OK: ngx_int_t = ngx::ffi::NGX_OK as ngx_int_t;
pub const NGX_ERROR: ngx_int_t = ngx::ffi::NGX_ERROR as ngx_int_t;
pub const NGX_CONF_UNSET_UINT: ngx_uint_t = ngx_uint_t::MAX;
pub const NGX_CONF_UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;
pub const NGX_CONF_UNSET: ngx_flag_t = -1;

/// nginx 1.29.7's default for an explicit upstream without `keepalive`
/// (with `local`).
pub const DEFAULT_CACHED: usize = 32;
const DEFAULT_REQUESTS: ngx_uint_t = 1000;
const DEFAULT_TIME: ngx_msec_t = 3_600_000;
const DEFAULT_TIMEOUT: ngx_msec_t = 60_000;
/// Node's http.Agent's margin below a backend's `Keep-Alive: timeout`.
const DEFAULT_HINT_MARGIN: ngx_msec_t = 1000;

/// The slicing part of an upstream's configuration.
pub struct SliceConf {
    /// `slice_key`, evaluated once per request in init peer.
    pub key: *mut ngx_http_complex_value_t,
    /// The index of the variable `slice_key` consists of, if it is one
    /// variable alone (`$host`): read directly, as the script would.
    pub key_var: Option<ngx_uint_t>,
    /// `slice_key` is `$host` alone: its value is read as nginx's own
    /// `$host` handler reads it, without the variable machinery.
    pub key_is_host: bool,
    /// `slice_conn`: fixed idle connections per bucket.
    pub conn: Option<usize>,
    /// `slice_dyn`: index of the variable read at free time; wins over conn.
    pub dyn_index: Option<ngx_uint_t>,
    pub dyn_name: ngx_str_t,
    pub poolsize: usize,
    pub keylen: usize,
}

pub type InitPeer =
    unsafe extern "C" fn(*mut ngx_http_request_t, *mut ngx_http_upstream_srv_conf_t) -> ngx_int_t;

/// The init peer of a balancer that has none (none of nginx's; nginx's own
/// module would call a null pointer): the request fails.
pub unsafe extern "C" fn no_init_peer(
    _r: *mut ngx_http_request_t,
    _us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    NGX_ERROR
}

/// Server (upstream) configuration. The `ngx_conf_set_*_slot`
/// fields keep nginx's types so the stock slot setters can fill them.
pub struct KeepaliveConf {
    pub requests: ngx_uint_t,
    pub time: ngx_msec_t,
    pub timeout: ngx_msec_t,
    /// `keepalive_hints` (a backend's `Keep-Alive` header read) and
    /// `keepalive_hint_margin`.
    pub hints: ngx_flag_t,
    pub hint_margin: ngx_msec_t,

    /// `keepalive` was given in this upstream (for "is duplicate").
    pub configured: bool,
    pub max_cached: usize,
    pub local: bool,
    pub slice: Option<SliceConf>,

    pub original_init_upstream: ngx_http_upstream_init_pt,
    /// The balancer's init peer (`no_init_peer` until it is known), called
    /// without asking.
    pub original_init_peer: InitPeer,

    /// The worker's idle cache, created with the configuration and freed
    /// with the cycle's pool.
    pub idle: *mut IdleState,
}

impl KeepaliveConf {
    pub fn new() -> Self {
        KeepaliveConf {
            requests: NGX_CONF_UNSET_UINT,
            time: NGX_CONF_UNSET_MSEC,
            timeout: NGX_CONF_UNSET_MSEC,
            hints: NGX_CONF_UNSET,
            hint_margin: NGX_CONF_UNSET_MSEC,
            configured: false,
            max_cached: 0,
            local: false,
            slice: None,
            original_init_upstream: None,
            original_init_peer: no_init_peer,
            idle: ptr::null_mut(),
        }
    }
}


/// The configuration of upstream `us` (ours, whether or not `keepalive`
/// was written in it).
///
/// # Safety
/// `us` must be a live upstream of the current cycle.
pub unsafe fn srv_conf(us: *mut ngx_http_upstream_srv_conf_t) -> *mut KeepaliveConf {
    // SAFETY: srv_conf is indexed by ctx_index, as for every http module.
    unsafe {
        *(*us)
            .srv_conf
            .add(ngx_http_upstream_keepalive_slice_module.ctx_index) as *mut KeepaliveConf
    }
}

/// Fills in the defaults of the `keepalive_*` directives, as nginx does when
/// the upstream is initialised.
pub fn apply_defaults(kcf: &mut KeepaliveConf) {
    if kcf.requests == NGX_CONF_UNSET_UINT {
        kcf.requests = DEFAULT_REQUESTS;
    }
    if kcf.time == NGX_CONF_UNSET_MSEC {
        kcf.time = DEFAULT_TIME;
    }
    if kcf.timeout == NGX_CONF_UNSET_MSEC {
        kcf.timeout = DEFAULT_TIMEOUT;
    }
    if kcf.hints == NGX_CONF_UNSET {
        kcf.hints = 1;
    }
    if kcf.hint_margin == NGX_CONF_UNSET_MSEC {
        kcf.hint_margin = DEFAULT_HINT_MARGIN;
    }
}

/// Registers `drop` of a boxed value with the configuration pool, so the
/// value is freed with the cycle (reloads do not leak).
///
/// # Safety
/// `cf` must be the live configuration.
pub unsafe fn free_with_cycle<T>(cf: *mut ngx_conf_t, value: Box<T>) -> Option<*mut T> {
    unsafe extern "C" fn drop_boxed<T>(data: *mut c_void) {
        // SAFETY: data came from Box::into_raw below and is dropped once.
        drop(unsafe { Box::from_raw(data as *mut T) });
    }

    // SAFETY: the cleanup entry is owned by the pool.
    unsafe {
        let cln = ngx_pool_cleanup_add((*cf).pool, 0);
        if cln.is_null() {
            return None;
        }
        let raw = Box::into_raw(value);
        (*cln).handler = Some(drop_boxed::<T>);
        (*cln).data = raw.cast();
        Some(raw)
    }
}
