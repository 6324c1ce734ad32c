//! The nginx module: its exported tables, the directives and the server
//! configuration of an upstream.
//!
//! Exporting `ngx_module_order` makes nginx insert this module before
//! `ngx_http_upstream_keepalive_module`, so `keepalive` and friends inside
//! `upstream {}` reach us first (nginx takes the first module whose command
//! matches name and context). Outside `upstream {}` our commands do not
//! match the context, so the client-side `keepalive_*` directives of the
//! http core module keep working untouched.

use core::ffi::{c_char, c_void};
use core::mem::offset_of;
use core::ptr;

use ngx::ffi::{
    ngx_command_t, ngx_conf_set_flag_slot, ngx_conf_set_msec_slot, ngx_conf_set_num_slot, ngx_conf_t, ngx_cycle_t,
    ngx_http_compile_complex_value, ngx_http_compile_complex_value_t, ngx_http_complex_value_t,
    ngx_http_conf_ctx_t, ngx_http_get_variable_index, ngx_http_module_t,
    ngx_http_upstream_init_round_robin, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_module_t,
    ngx_pcalloc, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE1,
    NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF_OFFSET, NGX_HTTP_UPS_CONF, NGX_LOG_EMERG, NGX_LOG_NOTICE,
};
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error, ngx_string};

use crate::args::{parse_keepalive, single_variable, ArgError};
use crate::conf::{
    free_with_cycle, srv_conf, KeepaliveConf, SliceConf, DEFAULT_CACHED, NGX_CONF_UNSET_UINT,
    NGX_ERROR, NGX_OK,
};
use crate::status::MainConf;
use crate::{hint_ffi, peer, status, variables};

const NGX_CONF_ERROR: *mut c_char = usize::MAX as *mut c_char;

static mut COMMANDS: [ngx_command_t; 8] = [
    ngx_command_t {
        name: ngx_string!("keepalive"),
        type_: (NGX_HTTP_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(keepalive_directive),
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
        set: Some(hint_ffi::margin_directive),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
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
    init_main_conf: Some(init_main_conf),
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
    create_loc_conf: None,
    merge_loc_conf: None,
};

#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_upstream_keepalive_slice_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of!(MODULE_CTX) as *mut c_void,
    // nginx reads the command table during configuration, on one thread.
    commands: ptr::addr_of_mut!(COMMANDS) as *mut ngx_command_t,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    ..ngx_module_t::default()
};

/// This module's version, as `[notice]` startup lines name it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    NGX_OK
}

/// Each worker (or the single process) picks its counter slots.
unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx calls init_process with the worker's cycle.
    unsafe { status::start_worker(cycle) };
    NGX_OK
}

/// The `$upstream_keepalive_*` variables exist before any directive may
/// use them.
unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls preconfiguration with the live configuration.
    unsafe { variables::register(cf) }
}

/// Every upstream is initialised: the counters' zone can be sized.
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls postconfiguration with the live configuration.
    unsafe { status::add_zone(cf) }
}

unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: cf is the live configuration; the conf is freed with the
    // cycle's pool.
    unsafe { free_with_cycle(cf, Box::new(MainConf::new())) }
        .map_or(ptr::null_mut(), |conf| conf.cast())
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

unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: cf is the live configuration; the pool memory is suitably
    // aligned for any type and lives as long as the cycle.
    unsafe {
        let conf = ngx_pcalloc((*cf).pool, size_of::<KeepaliveConf>()) as *mut KeepaliveConf;
        if conf.is_null() {
            return ptr::null_mut();
        }
        conf.write(KeepaliveConf::new());
        conf.cast()
    }
}

/// Argument `i` of the directive being parsed.
///
/// # Safety
/// `cf` must be the live configuration inside a directive handler.
unsafe fn conf_args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: cf->args is an array of ngx_str_t filled by the parser.
    unsafe { (*(*cf).args).as_slice() }
}

fn emerg(cf: *mut ngx_conf_t, err: &ArgError) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{err}");
    NGX_CONF_ERROR
}

extern "C" fn keepalive_directive(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our srv conf created by create_srv_conf.
    let kcf = unsafe { &mut *(conf as *mut KeepaliveConf) };

    if kcf.configured {
        return c"is duplicate".as_ptr() as *mut c_char;
    }

    // SAFETY: called by the configuration parser with cf valid.
    let values = unsafe { conf_args(cf) };
    let args: Vec<&[u8]> = values
        .get(1..)
        .unwrap_or_default()
        .iter()
        .map(|v| v.as_bytes())
        .collect();

    let parsed = match parse_keepalive(&args) {
        Ok(parsed) => parsed,
        Err(err) => return emerg(cf, &err),
    };

    kcf.configured = true;
    kcf.max_cached = parsed.connections;
    kcf.local = parsed.local;

    if let Some(slice) = parsed.slice {
        let key = match compile_key(cf, slice.key) {
            Some(key) => key,
            None => return NGX_CONF_ERROR,
        };
        let key_var = match single_variable(slice.key) {
            Some(name) => match variable_index(cf, name) {
                Some(found) => Some(found.0),
                None => return NGX_CONF_ERROR,
            },
            None => None,
        };
        // Variable names are not case-sensitive.
        let key_is_host = single_variable(slice.key).is_some_and(|name| name.eq_ignore_ascii_case(b"host"));
        let (dyn_index, dyn_name) = match slice.dyn_var {
            Some(name) => match variable_index(cf, name) {
                Some(found) => (Some(found.0), found.1),
                None => return NGX_CONF_ERROR,
            },
            None => (None, ngx_str_t::empty()),
        };
        kcf.slice = Some(SliceConf {
            key,
            key_var,
            key_is_host,
            conn: slice.conn,
            dyn_index,
            dyn_name,
            poolsize: slice.poolsize,
            keylen: slice.keylen,
        });
    }

    // SAFETY: the directive is only allowed in upstream{}, whose context
    // holds the upstream module's srv conf.
    let uscf = unsafe { upstream_srv_conf(cf) };

    disable_stock_cache(cf, uscf);

    if kcf.max_cached == 0 {
        // keepalive 0: this upstream keeps nothing, as in nginx 1.29.7.
        return ptr::null_mut();
    }

    // SAFETY: uscf is the upstream being configured.
    unsafe {
        kcf.original_init_upstream = (*uscf)
            .peer
            .init_upstream
            .or(Some(ngx_http_upstream_init_round_robin));
        (*uscf).peer.init_upstream = Some(peer::init_upstream);
    }

    ptr::null_mut()
}

/// The upstream module's conf of the `upstream {}` block being parsed.
///
/// # Safety
/// `cf` must be inside an `upstream {}` block.
unsafe fn upstream_srv_conf(cf: *mut ngx_conf_t) -> *mut ngx_http_upstream_srv_conf_t {
    // SAFETY: in upstream{} cf->ctx is an ngx_http_conf_ctx_t.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        *(*ctx).srv_conf.add(ngx_http_upstream_module.ctx_index)
            as *mut ngx_http_upstream_srv_conf_t
    }
}

/// Switches nginx's own keepalive cache off for this upstream.
///
/// From nginx 1.29.7 the stock module enables itself for every upstream
/// whose `max_cached` is not 0 (from its `init_main_conf`, after parsing),
/// and would then wrap ours and take every connection. Its server conf has
/// begun with `ngx_uint_t max_cached` since 1.1.4, so writing 0 there is the
/// switch. Before 1.29.7 the value is 0 already, because the stock directive
/// never ran, so the write is harmless and is done on every version: the
/// module list is searched by name, there is no link-time dependency on the
/// stock module, and nothing happens when it is not compiled in.
fn disable_stock_cache(cf: *mut ngx_conf_t, uscf: *mut ngx_http_upstream_srv_conf_t) {
    // SAFETY: cf is the live configuration, uscf one of its upstreams.
    unsafe {
        let Some(max_cached) = stock_max_cached(cf, uscf) else {
            return;
        };
        *max_cached = 0;
        ngx_log_debug_mask!(
            DebugMask::Http,
            (*cf).log,
            "keepalive slice: nginx's own keepalive cache off in upstream \"{}\"",
            (*uscf).host
        );
    }
}

/// The `max_cached` field of the stock module's conf of this upstream, if
/// that module is compiled in (found by name, see `disable_stock_cache`).
///
/// # Safety
/// `cf` is the live configuration, `uscf` an explicit upstream of it.
unsafe fn stock_max_cached(
    cf: *mut ngx_conf_t,
    uscf: *mut ngx_http_upstream_srv_conf_t,
) -> Option<*mut ngx_uint_t> {
    // SAFETY: walks cycle->modules (NULL-terminated) and indexes the
    // upstream's srv_conf array by a module's ctx_index, as nginx does.
    unsafe {
        let mut m = (*(*cf).cycle).modules;
        while !(*m).is_null() {
            let module = *m;
            if module.cast_const() != ptr::addr_of!(ngx_http_upstream_keepalive_slice_module)
                && !(*module).name.is_null()
                && core::ffi::CStr::from_ptr((*module).name)
                    == c"ngx_http_upstream_keepalive_module"
            {
                let conf = *(*uscf).srv_conf.add((*module).ctx_index) as *mut ngx_uint_t;
                return (!conf.is_null()).then_some(conf);
            }
            m = m.add(1);
        }
        None
    }
}

/// After every upstream is initialised (the upstream module's
/// `init_main_conf` ran before ours) and before the stock keepalive module's
/// `init_main_conf`: takes over the upstreams nginx would cache by default.
///
/// nginx 1.29.7 and later keep idle connections for every explicit upstream
/// without a `keepalive` line (32, `local`, and whatever `keepalive_timeout`,
/// `keepalive_requests`, `keepalive_time` say there, which are ours to
/// parse). Those upstreams get the same from this module instead, and the
/// stock cache is switched off there, so one cache, ours, serves every
/// upstream. Whether this nginx caches by default is probed, not taken from
/// the version it was built for: the stock module leaves its `max_cached`
/// unset (`NGX_CONF_UNSET_UINT`) only where a default applies; older ones
/// start it at 0 (nothing kept, by nginx or by us), and without the stock
/// module nothing is kept by default either.
unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, _conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is the http block's configuration; the upstream module's
    // main conf lists every upstream, explicit ones with their srv_conf.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add(ngx_http_upstream_module.ctx_index)
            as *mut ngx_http_upstream_main_conf_t;
        if umcf.is_null() {
            return ptr::null_mut();
        }
        if hint_ffi::hook_header(cf, umcf) != NGX_OK {
            return NGX_CONF_ERROR;
        }
        let upstreams = &(*umcf).upstreams;
        let uscfp = upstreams.elts as *const *mut ngx_http_upstream_srv_conf_t;
        for i in 0..upstreams.nelts {
            let uscf = *uscfp.add(i);
            // Implicit upstreams (proxy_pass to an address) have no
            // srv_conf and no cache, in nginx as here.
            if (*uscf).srv_conf.is_null() {
                continue;
            }
            let kcf = &mut *srv_conf(uscf);
            if kcf.configured {
                continue;
            }
            let Some(stock) = stock_max_cached(cf, uscf) else {
                return ptr::null_mut();
            };
            if *stock != NGX_CONF_UNSET_UINT {
                continue;
            }
            *stock = 0;
            kcf.max_cached = DEFAULT_CACHED;
            kcf.local = true;
            ngx_log_debug_mask!(
                DebugMask::Http,
                (*cf).log,
                "keepalive slice: upstream \"{}\" without keepalive served as nginx's \
                 default ({} connections, local)",
                (*uscf).host,
                DEFAULT_CACHED
            );
            if peer::init_keepalive(cf, uscf) != NGX_OK {
                return NGX_CONF_ERROR;
            }
        }
    }
    ptr::null_mut()
}

fn compile_key(cf: *mut ngx_conf_t, key: &[u8]) -> Option<*mut ngx_http_complex_value_t> {
    // SAFETY: allocations from the configuration pool; the compiler reads
    // `value` and fills `cv`.
    unsafe {
        let pool = (*cf).pool;
        let cv = ngx_pcalloc(pool, size_of::<ngx_http_complex_value_t>())
            as *mut ngx_http_complex_value_t;
        let value = ngx_pcalloc(pool, size_of::<ngx_str_t>()) as *mut ngx_str_t;
        if cv.is_null() || value.is_null() {
            return None;
        }
        *value = ngx_str_t::from_bytes(pool, key)?;

        let mut ccv: ngx_http_compile_complex_value_t = core::mem::zeroed();
        ccv.cf = cf;
        ccv.value = value;
        ccv.complex_value = cv;
        if ngx_http_compile_complex_value(&mut ccv) != NGX_OK {
            return None;
        }
        Some(cv)
    }
}

fn variable_index(cf: *mut ngx_conf_t, name: &[u8]) -> Option<(ngx_uint_t, ngx_str_t)> {
    // SAFETY: the name is copied into the configuration pool; nginx logs
    // "unknown variable" itself at the end of configuration if needed.
    unsafe {
        let mut name = ngx_str_t::from_bytes((*cf).pool, name)?;
        let index = ngx_http_get_variable_index(cf, &mut name);
        if index == NGX_ERROR {
            return None;
        }
        Some((index as ngx_uint_t, name))
    }
}
