//! nginx-keepalive-slice: a drop-in replacement for nginx's upstream
//! `keepalive` directive whose idle-connection cache can be sliced by a
//! per-request key (usually `$host`).
//!
//! This crate is the nginx module: thin FFI glue around the pure core
//! (`keepalive_slice_core`: the cache, the directive parser, identities,
//! counters and their renderers). Its files are layered bottom-up, each
//! using only those below it:
//!
//! - `log`: logging macros that keep formatting off the hot path;
//! - `mapping`: memory mapped at configuration time, resident as written
//!   (the room of a cache's TLS addresses);
//! - `share`: idle connections shared between the workers (the registry's
//!   zone, the descriptor hand-over);
//! - `idle`: one upstream's idle connections in a worker, and the handlers
//!   of a connection while it is idle;
//! - `auto`: the decay timer of `keepalive auto`;
//! - `conf`: the configuration types and their defaults;
//! - `module`: the module static as the layers above know it, and the
//!   typed accessors of its configurations;
//! - `tls`, `session`: what a request's connection is bound to, as nginx
//!   holds it; TLS sessions stamped with it;
//! - `hint`: a backend's `Keep-Alive` header, found as nginx parses it;
//! - `variables`: `$upstream_keepalive_*`;
//! - `peer`: the per-request callbacks (init, get, free peer);
//! - `status`: the counters' shared zone and `keepalive_status`;
//! - `directives`: `keepalive` and the upstreams nginx caches by default;
//! - this file, the composition root: the module static, its context and
//!   command table, and the tables a dynamic module exports.

// The glue runs inside nginx: a panic there would abort the worker
// (panic = "abort"; unwinding into C is never possible). Nothing on that
// path may panic, and clippy holds the glue to it.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::todo,
    clippy::unimplemented,
    clippy::unreachable,
    clippy::indexing_slicing
)]

mod auto;
mod conf;
mod directives;
mod hint;
mod idle;
mod log;
mod mapping;
mod module;
mod peer;
#[cfg(ngx_feature = "http_ssl")]
mod session;
mod share;
mod status;
mod tls;
mod variables;

use core::ffi::{c_char, c_void};
use core::mem::offset_of;
use core::ptr;

use ngx::core::Status;
use ngx::ffi::{
    ngx_command_t, ngx_conf_set_flag_slot, ngx_conf_set_msec_slot, ngx_conf_set_num_slot,
    ngx_conf_t, ngx_cycle_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPS_CONF,
    NGX_LOG_NOTICE,
};
use ngx::{ngx_log_error, ngx_string};

use crate::conf::{KeepaliveConf, MainConf};
use crate::module::{Module, VERSION};
use ngx::http::HttpModuleMainConf;

static mut COMMANDS: [ngx_command_t; 9] = [
    ngx_command_t {
        name: ngx_string!("keepalive"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(directives::keepalive_directive),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_time"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(KeepaliveConf, time),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_timeout"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(KeepaliveConf, timeout),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_requests"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(ngx_conf_set_num_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(KeepaliveConf, requests),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_hints"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_FLAG) as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(KeepaliveConf, hints),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_hint_margin"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(hint::margin_directive),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_share"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_FLAG) as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(KeepaliveConf, share),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("keepalive_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(status::keepalive_status_directive),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

static MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(preconfiguration),
    postconfiguration: Some(postconfiguration),
    create_main_conf: Some(create_main_conf),
    init_main_conf: Some(directives::init_main_conf),
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

/// The module (declared for the layers above in `module`).
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_upstream_keepalive_slice_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(MODULE_CTX) as *mut c_void,
    // nginx reads the command table during configuration, on one thread.
    commands: ptr::addr_of_mut!(COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

/// Says once per configuration load (start, reload, `nginx -t`), in the
/// master, which version of the module is loaded and which nginx it was
/// built for, so operators can tell what they run. Workers stay silent.
unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx calls init_module with the new, valid cycle.
    let log = unsafe { (*cycle).log };
    let built_for = ngx::ffi::NGINX_VERSION.to_str().unwrap_or("?");
    ngx_log_error!(
        NGX_LOG_NOTICE,
        log,
        "keepalive slice module {VERSION} (built for nginx {built_for})"
    );
    // SAFETY: the cycle is complete: its variables are resolved.
    unsafe { variables::enable_recording(cycle) };
    Status::NGX_OK.0
}

/// Each worker (or the single process) picks its counter slots.
unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx calls init_process with the worker's cycle.
    unsafe {
        status::start_worker(cycle);
        if let Some(mcf) = Module::main_conf(&*cycle) {
            share::start_worker(cycle, &mcf.share);
            // Not sharing (one worker, no transport): the hot path asks
            // the upstream's flag alone.
            if !share::active() {
                for served in &mcf.served {
                    (*served.idle).share = false;
                }
            }
        }
    }
    Status::NGX_OK.0
}

/// A worker leaving: its shared idle connections are never taken again.
unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    share::exit_worker();
    // SAFETY: nginx calls exit_process with the worker's cycle.
    unsafe { status::exit_worker(cycle) };
}

/// The `$upstream_keepalive_*` variables exist before any directive may
/// use them.
unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls preconfiguration with the live configuration.
    unsafe { variables::register(cf) }
}

/// Every upstream is initialised: the counters' zone can be sized.
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls postconfiguration with the live configuration;
    // the served upstreams' idle states live as long as it.
    unsafe {
        if status::add_zone(cf) != Status::NGX_OK.0 {
            return Status::NGX_ERROR.0;
        }
        let Some(mcf) = Module::main_conf_mut(&*cf) else {
            return Status::NGX_ERROR.0;
        };
        let connections: usize = mcf
            .served
            .iter()
            .filter(|s| (*s.idle).share)
            .map(|s| (*s.idle).capacity())
            .sum();
        share::add_zone(
            cf,
            ptr::addr_of_mut!(mcf.share),
            connections,
            module::zone_tag(),
        )
    }
}

unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: cf is the live configuration; the conf is dropped with the
    // cycle's pool.
    unsafe { module::allocate((*cf).pool, MainConf::new()) }.map_or(ptr::null_mut(), |p| p.cast())
}

unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as for create_main_conf.
    unsafe { module::allocate((*cf).pool, KeepaliveConf::new()) }
        .map_or(ptr::null_mut(), |p| p.cast())
}

/// A `*const` that may live in a static: the tables below are read-only
/// data that nginx only reads, on the configuration thread.
#[cfg(feature = "export-modules")]
#[repr(transparent)]
pub struct Exported<T>(pub T);
// SAFETY: see above; nothing ever writes through these pointers.
#[cfg(feature = "export-modules")]
unsafe impl<T> Sync for Exported<T> {}

#[cfg(feature = "export-modules")]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static ngx_modules: Exported<[*const ngx_module_t; 2]> = Exported([
    // nginx owns the module struct from here on.
    ptr::addr_of!(ngx_http_upstream_keepalive_slice_module),
    ptr::null(),
]);

#[cfg(feature = "export-modules")]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static ngx_module_names: Exported<[*const c_char; 2]> = Exported([
    c"ngx_http_upstream_keepalive_slice_module".as_ptr(),
    ptr::null(),
]);

/// "Put this module before ngx_http_upstream_keepalive_module": nginx looks
/// the name up, so this is harmless when that module is not compiled in.
#[cfg(feature = "export-modules")]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static ngx_module_order: Exported<[*const c_char; 3]> = Exported([
    c"ngx_http_upstream_keepalive_slice_module".as_ptr(),
    c"ngx_http_upstream_keepalive_module".as_ptr(),
    ptr::null(),
]);
