//! The directives of an upstream: `keepalive` with its slicing
//! parameters (the `keepalive_*` slots are nginx's own setters, see the
//! command table in `lib.rs`), and at `init_main_conf` the upstreams nginx
//! 1.29.7 and later cache without a `keepalive` line and the hook of the
//! backends' `Keep-Alive` header (`hint`).
//!
//! `keepalive` and friends reach this module before nginx's own keepalive
//! module because the module is ordered before it (`ngx_module_order`, or
//! its place in the static module list): nginx takes the first module whose
//! command matches name and context. Outside `upstream {}` the commands do
//! not match the context, so the client-side `keepalive_*` directives of
//! the http core module keep working untouched.

use core::ffi::{c_char, c_void, CStr};
use core::ptr;

use ngx::core::{Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_http_compile_complex_value, ngx_http_compile_complex_value_t,
    ngx_http_complex_value_t, ngx_http_get_variable_index, ngx_http_upstream_init_round_robin,
    ngx_http_upstream_srv_conf_t, ngx_msec_t, ngx_pcalloc, ngx_str_t, ngx_uint_t, NGX_LOG_EMERG,
};
use ngx::http::{HttpModule, HttpModuleMainConf, HttpModuleServerConf, NgxHttpUpstreamModule};
use ngx::{ngx_conf_log_error, ngx_log_debug_mask};

use keepalive_slice_core::args::{parse_keepalive, single_variable, ArgError};

use crate::conf::{KeepaliveConf, SliceConf, DEFAULT_CACHED, NGX_CONF_UNSET_UINT};
use crate::module::Module;
use crate::{hint, peer};

/// The arguments of the directive being parsed, its name first.
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

/// `keepalive N [local] [slice_key=... slice_conn=... ...]` in `upstream {}`.
pub extern "C" fn keepalive_directive(
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
    kcf.auto = parsed.auto.map(|ms| ms as ngx_msec_t);

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
        let key_is_host =
            single_variable(slice.key).is_some_and(|name| name.eq_ignore_ascii_case(b"host"));
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
            // With auto and neither slice_conn nor slice_dyn, a bucket may
            // hold up to the ceiling: the decay sizes each key's share.
            conn: match (slice.conn, slice.dyn_var, parsed.auto) {
                (None, None, Some(_)) => Some(parsed.connections),
                (conn, _, _) => conn,
            },
            dyn_index,
            dyn_name,
            poolsize: slice.poolsize,
            keylen: slice.keylen,
        });
    }

    // SAFETY: the directive is only allowed in upstream{}, whose context
    // holds the upstream module's srv conf.
    let Some(uscf) = (unsafe { NgxHttpUpstreamModule::server_conf_mut(&*cf) }).map(ptr::from_mut)
    else {
        return NGX_CONF_ERROR;
    };

    disable_stock_cache(cf, uscf);

    if kcf.max_cached == 0 {
        // keepalive 0: this upstream keeps nothing, as in nginx 1.29.7.
        return NGX_CONF_OK;
    }

    // SAFETY: uscf is the upstream being configured.
    unsafe {
        kcf.original_init_upstream = (*uscf)
            .peer
            .init_upstream
            .or(Some(ngx_http_upstream_init_round_robin));
        (*uscf).peer.init_upstream = Some(peer::init_upstream);
    }

    NGX_CONF_OK
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
            if !ptr::eq(module, Module::module())
                && !(*module).name.is_null()
                && CStr::from_ptr((*module).name) == c"ngx_http_upstream_keepalive_module"
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
pub unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, _conf: *mut c_void) -> *mut c_char {
    // SAFETY: cf is the http block's configuration; the upstream module's
    // main conf lists every upstream, explicit ones with their srv_conf.
    unsafe {
        let Some(umcf) = NgxHttpUpstreamModule::main_conf_mut(&*cf) else {
            return NGX_CONF_OK;
        };
        if hint::hook_header(cf, umcf, peer::record_hint) != Status::NGX_OK.0 {
            return NGX_CONF_ERROR;
        }
        for &uscf in umcf
            .upstreams
            .as_slice::<*mut ngx_http_upstream_srv_conf_t>()
        {
            // Implicit upstreams (proxy_pass to an address) have no
            // srv_conf and no cache, in nginx as here.
            let Some(kcf) = Module::server_conf_mut(&*uscf) else {
                continue;
            };
            if kcf.configured {
                continue;
            }
            let Some(stock) = stock_max_cached(cf, uscf) else {
                return NGX_CONF_OK;
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
            if peer::init_keepalive(cf, uscf) != Status::NGX_OK.0 {
                return NGX_CONF_ERROR;
            }
        }
    }
    NGX_CONF_OK
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
        if ngx_http_compile_complex_value(&mut ccv) != Status::NGX_OK.0 {
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
        if index == Status::NGX_ERROR.0 {
            return None;
        }
        Some((index as ngx_uint_t, name))
    }
}
