//! A backend's `Keep-Alive` header in nginx (see the core's `keepalive_hint` for what
//! it means and how it is read): where the header is found, and what a
//! connection carries of it.
//!
//! # Where the header is found
//!
//! nginx looks every upstream response header up in the upstream module's
//! `headers_in_hash` (built in its `init_main_conf` from the static table
//! `ngx_http_upstream_headers_in[]`) and calls the entry's handler as it
//! parses the header (`hh->handler(r, h, hh->offset)`, the same from
//! nginx 1.18 to 1.31 at least); `Keep-Alive`'s handler ignores it. Our
//! `init_main_conf` runs after the upstream module's: it points this
//! cycle's hash entry for `keep-alive` at a copy of nginx's entry (from
//! the cycle's pool) whose handler is ours, which calls nginx's first. So
//! a response without the header costs nothing at all: no scan of the
//! headers in free peer. nginx's static table is never written: after a
//! reload without this module the module is unloaded, and the next
//! cycle's hash is built from the table again.
//!
//! The handler only sets a flag in the request's peer data (`HEADER`);
//! free peer, seeing it, finds the header in the response's header list
//! (out of line: only responses with the header pay for it) and parses
//! it, so that two headers are told apart from one. It does so only when
//! the request is proxied over HTTP/1.x (`proxy_pass`, the proxy module's
//! output tag): FastCGI, uwsgi and SCGI headers come from the application
//! and speak of its client connection, not of the connection to nginx,
//! and HTTP/2 (gRPC, `proxy_http_version 2`) forbids the header;
//! memcached has no headers. And only when the request's peer is ours and
//! its upstream reads hints: the recorder `hook_header` is given
//! (`peer::record_hint`) decides.
//!
//! # What a connection carries
//!
//! One `u32` (`HEADER`, `CARRIED` and its limit, `TIMER`; see
//! `idle::IdleHint`), in the peer data while the connection is busy and in
//! its slot's handle while it is idle: get peer copies it from the handle,
//! keep back into it.

use core::ffi::{c_char, c_void, CStr};
use core::ptr;

use ngx::core::{NgxStr, Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_t, ngx_connection_t, ngx_hash_elt_t, ngx_hash_find, ngx_hash_key,
    ngx_http_request_t, ngx_http_upstream_header_t, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_t, ngx_int_t, ngx_log_t, ngx_module_t, ngx_msec_t, ngx_parse_time,
    ngx_pcalloc, ngx_str_t, ngx_table_elt_t, ngx_uint_t, NGX_LOG_EMERG, NGX_LOG_NOTICE,
};
use ngx::{ngx_conf_log_error, ngx_log_debug_mask, ngx_log_error};

use keepalive_slice_core::keepalive_hint::{
    decide as decide_hint, parse, Allowed, Decision, Defect, Hint, NoReuse, NO_LIMIT,
};

use crate::conf::{KeepaliveConf, NGX_CONF_UNSET_MSEC};
use crate::idle::{IdleHint, CARRIED, CARRIED_SHIFT, HEADER, MAX_CARRIED, TIMER};

/// Tells the request's peer that its response has a `Keep-Alive` header
/// (`peer::record_hint`).
pub type RecordHint = unsafe fn(*mut ngx_http_upstream_t);

/// Our entry for `keep-alive` in a cycle's `headers_in_hash`: a copy of
/// nginx's whose handler is ours and whose `offset` (what nginx passes the
/// handler) is this entry's address.
#[repr(C)]
struct Hook {
    header: ngx_http_upstream_header_t,
    /// nginx's entry, whose handler is called first.
    original: *const ngx_http_upstream_header_t,
    /// The output tag of requests proxied over HTTP/1.x.
    proxy: *const ngx_module_t,
    /// Called for a response of a request proxied over HTTP/1.x.
    record: RecordHint,
}

const NAME: &[u8] = b"keep-alive";

/// Hooks the `Keep-Alive` header of this cycle (from our `init_main_conf`,
/// after the upstream module built its hash). Without the proxy module,
/// or an entry for the header (never seen: the table has had it since
/// 0.x), hints are not read, with a notice.
///
/// # Safety
/// `cf` is the http block's live configuration, `umcf` its upstream
/// main conf with `headers_in_hash` built.
pub unsafe fn hook_header(
    cf: *mut ngx_conf_t,
    umcf: *mut ngx_http_upstream_main_conf_t,
    record: RecordHint,
) -> ngx_int_t {
    // SAFETY: see above; the hash is walked as ngx_hash_find() walks it.
    unsafe {
        let Some(proxy) = module_named((*cf).cycle, c"ngx_http_proxy_module") else {
            return Status::NGX_OK.0;
        };
        let hash = ptr::addr_of_mut!((*umcf).headers_in_hash);
        let key = ngx_hash_key(NAME.as_ptr().cast_mut(), NAME.len());
        let Some(elt) = hash_elt(hash, key) else {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                (*cf).log,
                "keepalive slice: no \"Keep-Alive\" entry in the upstream headers, \
                 backends' Keep-Alive headers are not read"
            );
            return Status::NGX_OK.0;
        };
        let original = (*elt).value as *const ngx_http_upstream_header_t;
        if original.is_null() {
            return Status::NGX_OK.0;
        }
        let hook = ngx_pcalloc((*cf).pool, size_of::<Hook>()) as *mut Hook;
        if hook.is_null() {
            return Status::NGX_ERROR.0;
        }
        hook.write(Hook {
            header: ngx_http_upstream_header_t {
                handler: Some(keepalive_header),
                offset: hook as ngx_uint_t,
                ..*original
            },
            original,
            proxy,
            record,
        });
        (*elt).value = hook.cast();
        let found = ngx_hash_find(hash, key, NAME.as_ptr().cast_mut(), NAME.len());
        if found != hook.cast() {
            // The walk found another entry than nginx's lookup does: put
            // it back, hints are not read.
            (*elt).value = original.cast_mut().cast();
            ngx_log_error!(
                NGX_LOG_NOTICE,
                (*cf).log,
                "keepalive slice: the upstream headers hash is not as expected, \
                 backends' Keep-Alive headers are not read"
            );
            return Status::NGX_OK.0;
        }
        ngx_log_debug_mask!(
            DebugMask::Http,
            (*cf).log,
            "keepalive slice: backends' Keep-Alive headers read"
        );
    }
    Status::NGX_OK.0
}

/// The element of `hash` named `keep-alive`, as `ngx_hash_find()` finds
/// it: the bucket `key % size`, elements of a pointer, a length and the
/// lowercase name, each aligned to a pointer, up to a null value.
///
/// # Safety
/// `hash` must be a built nginx hash.
unsafe fn hash_elt(
    hash: *mut ngx::ffi::ngx_hash_t,
    key: ngx_uint_t,
) -> Option<*mut ngx_hash_elt_t> {
    // SAFETY: see above.
    unsafe {
        let size = (*hash).size;
        if (*hash).buckets.is_null() || size == 0 {
            return None;
        }
        let mut elt = *(*hash).buckets.add(key % size);
        if elt.is_null() {
            return None;
        }
        while !(*elt).value.is_null() {
            let len = usize::from((*elt).len);
            let name = ptr::addr_of!((*elt).name).cast::<u8>();
            if core::slice::from_raw_parts(name, len) == NAME {
                return Some(elt);
            }
            let next = name as usize + len;
            let align = size_of::<*mut c_void>();
            elt = (next.div_ceil(align) * align) as *mut ngx_hash_elt_t;
        }
        None
    }
}

/// A module of the cycle, by name.
///
/// # Safety
/// `cycle` is a live cycle whose module list is set.
unsafe fn module_named(
    cycle: *mut ngx::ffi::ngx_cycle_t,
    name: &CStr,
) -> Option<*const ngx_module_t> {
    // SAFETY: cycle->modules is NULL-terminated; names are C strings.
    unsafe {
        let mut m = (*cycle).modules;
        if m.is_null() {
            return None;
        }
        while !(*m).is_null() {
            if !(**m).name.is_null() && CStr::from_ptr((**m).name) == name {
                return Some(*m);
            }
            m = m.add(1);
        }
        None
    }
}

/// The `Keep-Alive` header's handler, called as nginx parses the header.
unsafe extern "C" fn keepalive_header(
    r: *mut ngx_http_request_t,
    h: *mut ngx_table_elt_t,
    offset: ngx_uint_t,
) -> ngx_int_t {
    // SAFETY: offset is our Hook (see hook_header), live for the cycle;
    // r is the request whose upstream sent the header.
    unsafe {
        let hook = offset as *const Hook;
        if hook.is_null() {
            return Status::NGX_OK.0;
        }
        let original = (*hook).original;
        if let Some(handler) = (*original).handler {
            let rc = handler(r, h, (*original).offset);
            if rc != Status::NGX_OK.0 {
                return rc;
            }
        }
        let u = (*r).upstream;
        if u.is_null() || (*u).output.tag.cast_const() != (*hook).proxy.cast() {
            return Status::NGX_OK.0;
        }
        ((*hook).record)(u);
    }
    Status::NGX_OK.0
}

/// What the response's `Keep-Alive` header (with `HEADER` in `hint`)
/// and the limit the connection carries (`CARRIED`) allow connection `c`
/// of upstream `u`: the requests it may have carried to be kept, and what
/// it is kept with. Said in the debug log.
///
/// # Safety
/// `u` is the live request's upstream, `c` its connection or null; `log`
/// is live.
#[cold]
#[inline(never)]
pub unsafe fn decide(
    hint: u32,
    u: *const ngx_http_upstream_t,
    c: *const ngx_connection_t,
    kcf: &KeepaliveConf,
    log: *mut ngx_log_t,
) -> (ngx_uint_t, IdleHint) {
    // SAFETY: see above.
    unsafe {
        let requests = if c.is_null() { 0 } else { (*c).requests as u64 };
        let allowed = Allowed {
            requests: kcf.requests as u64,
            timeout_ms: kcf.timeout as u64,
            margin_ms: kcf.hint_margin as u64,
        };
        let carried = if hint & CARRIED != 0 {
            hint >> CARRIED_SHIFT
        } else {
            NO_LIMIT
        };
        let (value, parsed) = if hint & HEADER != 0 {
            header(u)
        } else {
            (&[][..], None)
        };
        let parsed = match parsed {
            Some(Ok(h)) => Some(h),
            Some(Err(defect)) => {
                ignored(log, value, defect);
                None
            }
            None => None,
        };
        let d = decide_hint(parsed.as_ref(), carried, requests, &allowed);
        if hint & HEADER != 0 || d.no_reuse.is_some() {
            said(log, value, &d, &allowed);
        }
        let mut packed = if d.timer_shortened { TIMER } else { 0 };
        if d.carried <= MAX_CARRIED {
            packed |= CARRIED | d.carried << CARRIED_SHIFT;
        }
        // Never above keepalive_requests and keepalive_timeout.
        let idle = IdleHint {
            timeout: d.timeout_ms as ngx_msec_t,
            packed,
        };
        (d.requests as ngx_uint_t, idle)
    }
}

/// The response's `Keep-Alive` header, parsed: the first one's value, and
/// `None` if there is none (a response of a try that failed before its
/// header). Only responses with the header get here (the handler saw it).
///
/// # Safety
/// `u` is a live upstream.
unsafe fn header<'a>(u: *const ngx_http_upstream_t) -> (&'a [u8], Option<Result<Hint, Defect>>) {
    // SAFETY: the header list of the response, in the request's pool.
    unsafe {
        let mut found: Option<&[u8]> = None;
        let mut part = ptr::addr_of!((*u).headers_in.headers.part);
        while !part.is_null() {
            let elts = (*part).elts as *const ngx_table_elt_t;
            for i in 0..(*part).nelts {
                let h = &*elts.add(i);
                if h.hash == 0 || h.key.len != NAME.len() || h.lowcase_key.is_null() {
                    continue;
                }
                if core::slice::from_raw_parts(h.lowcase_key, NAME.len()) != NAME {
                    continue;
                }
                if let Some(first) = found {
                    return (first, Some(Err(Defect::MoreThanOneHeader)));
                }
                found = Some(h.value.as_bytes());
            }
            part = (*part).next;
        }
        match found {
            Some(value) => (value, Some(parse(value))),
            None => (&[], None),
        }
    }
}

/// What a hint did, in the debug log.
fn said(log: *mut ngx_log_t, value: &[u8], d: &Decision, allowed: &Allowed) {
    ngx_log_debug_mask!(
        DebugMask::Http,
        log,
        "keepalive hint \"{}\": idle timer {} ms{}, requests limited to {} \
         (keepalive_requests {}, carried {}){}",
        NgxStr::from_bytes(value),
        d.timeout_ms,
        if d.timer_shortened {
            " (shortened from keepalive_timeout)"
        } else {
            ""
        },
        d.requests,
        allowed.requests,
        Carried(d.carried),
        match d.no_reuse {
            Some(NoReuse::Timeout) => ", no reuse: timeout not above keepalive_hint_margin",
            Some(NoReuse::Max) => ", no reuse: max used up",
            None => "",
        }
    );
}

/// A carried limit in the debug log.
struct Carried(u32);

impl core::fmt::Display for Carried {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            NO_LIMIT => write!(f, "none"),
            n => write!(f, "{n}"),
        }
    }
}

fn ignored(log: *mut ngx_log_t, value: &[u8], defect: Defect) {
    ngx_log_debug_mask!(
        DebugMask::Http,
        log,
        "keepalive hint \"{}\" ignored: {}",
        NgxStr::from_bytes(value),
        defect
    );
}

/// `keepalive_hint_margin time;`: as nginx's msec slot, naming the value
/// when it is not a time.
pub extern "C" fn margin_directive(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our srv conf and the parsed arguments (TAKE1).
    unsafe {
        let kcf = &mut *(conf as *mut KeepaliveConf);
        if kcf.hint_margin != NGX_CONF_UNSET_MSEC {
            return c"is duplicate".as_ptr().cast_mut();
        }
        let args = (*(*cf).args).as_slice::<ngx_str_t>();
        let Some(&value) = args.get(1) else {
            return NGX_CONF_ERROR;
        };
        let mut parsed = value;
        let ms = ngx_parse_time(&mut parsed, 0);
        if ms == Status::NGX_ERROR.0 {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{}\" in \"keepalive_hint_margin\" directive, \
                 it must be a time (1s, 500ms)",
                NgxStr::from_bytes(value.as_bytes())
            );
            return NGX_CONF_ERROR;
        }
        kcf.hint_margin = ms as ngx_msec_t;
    }
    NGX_CONF_OK
}
