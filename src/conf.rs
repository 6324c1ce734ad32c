//! The module's configuration: what the directives fill in for an upstream
//! (`KeepaliveConf`), and what the status page and the variables need
//! across upstreams (`MainConf`), with their defaults.

use core::ptr;

use ngx::core::Status;
use ngx::ffi::{
    ngx_flag_t, ngx_http_complex_value_t, ngx_http_request_t, ngx_http_upstream_init_pt,
    ngx_http_upstream_srv_conf_t, ngx_http_variable_t, ngx_int_t, ngx_msec_t, ngx_str_t,
    ngx_uint_t,
};

use keepalive_slice_core::stats::Geometry;

use crate::auto::AutoState;
use crate::idle::IdleState;
use crate::mapping::Arena;
use crate::share;

/// nginx's `NGX_CONF_UNSET_UINT` and `NGX_CONF_UNSET_MSEC`, which the
/// bindings do not carry: what the slot setters find unset.
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
///
/// # Safety
/// Never dereferences its arguments.
pub unsafe extern "C" fn no_init_peer(
    _r: *mut ngx_http_request_t,
    _us: *mut ngx_http_upstream_srv_conf_t,
) -> ngx_int_t {
    Status::NGX_ERROR.0
}

/// Server (upstream) configuration. The `ngx_conf_set_*_slot` fields
/// keep nginx's types so the stock slot setters can fill them.
pub struct KeepaliveConf {
    pub requests: ngx_uint_t,
    pub time: ngx_msec_t,
    pub timeout: ngx_msec_t,
    /// `keepalive_hints` (a backend's `Keep-Alive` header read) and
    /// `keepalive_hint_margin`.
    pub hints: ngx_flag_t,
    pub hint_margin: ngx_msec_t,
    /// `keepalive_share on|off` (nginx's flag setter): idle connections
    /// shared with the other workers (on by default).
    pub share: ngx_flag_t,

    /// `keepalive` was given in this upstream (for "is duplicate").
    pub configured: bool,
    pub max_cached: usize,
    pub local: bool,
    pub slice: Option<SliceConf>,
    /// `keepalive auto`: the decay interval (`max_cached` is the ceiling).
    pub auto: Option<ngx_msec_t>,

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
            share: NGX_CONF_UNSET,
            configured: false,
            max_cached: 0,
            local: false,
            slice: None,
            auto: None,
            original_init_upstream: None,
            original_init_peer: no_init_peer,
            idle: ptr::null_mut(),
        }
    }

    /// Fills in the defaults of the `keepalive_*` directives, as nginx does
    /// when the upstream is initialised.
    pub fn apply_defaults(&mut self) {
        if self.requests == NGX_CONF_UNSET_UINT {
            self.requests = DEFAULT_REQUESTS;
        }
        if self.time == NGX_CONF_UNSET_MSEC {
            self.time = DEFAULT_TIME;
        }
        if self.timeout == NGX_CONF_UNSET_MSEC {
            self.timeout = DEFAULT_TIMEOUT;
        }
        if self.hints == NGX_CONF_UNSET {
            self.hints = 1;
        }
        if self.hint_margin == NGX_CONF_UNSET_MSEC {
            self.hint_margin = DEFAULT_HINT_MARGIN;
        }
        if self.share == NGX_CONF_UNSET {
            self.share = 1;
        }
    }
}

/// An upstream this module serves, as the report names it.
pub struct Served {
    pub name: Vec<u8>,
    pub idle: *mut IdleState,
    /// `keepalive auto`: its decay (null otherwise).
    pub auto: *mut AutoState,
}

/// The module's http main configuration: what the status page and the
/// variables need across upstreams, for one cycle.
pub struct MainConf {
    pub served: Vec<Served>,
    /// The layout of the counters' zone, planned at postconfiguration.
    pub geometry: Geometry,
    /// `$upstream_keepalive_*` as nginx registered them (set in
    /// preconfiguration, read once the configuration is complete).
    pub variables: Vec<*mut ngx_http_variable_t>,
    /// The zone of idle connections shared between workers.
    pub share: share::Zone,
    /// The caches' room for long addresses (TLS), mapped for the
    /// configuration; created before the caches, dropped after them.
    pub overflow: Arena,
}

impl MainConf {
    pub fn new() -> Self {
        MainConf {
            served: Vec::new(),
            geometry: Geometry {
                capacity: 0,
                slots: 1,
                arena: 0,
            },
            variables: Vec::new(),
            share: share::Zone::new(),
            overflow: Arena::default(),
        }
    }
}
