//! `$upstream_keepalive_reused`, `$upstream_keepalive_requests` and
//! `$upstream_keepalive_key`: one value per upstream try, joined as nginx
//! joins `$upstream_status`.
//!
//! Tries are only recorded when the configuration references one of the
//! variables (nginx marks a variable "indexed" when a directive compiles
//! it: `log_format`, `add_header`, `map`, `if`, ...); requests of other
//! configurations pay one test of a flag per try. A record goes into a
//! small array from the request pool, found through a pool cleanup entry
//! as nginx's realip module finds its context, because the request's
//! module contexts are cleared by an internal redirect while its upstream
//! states, whose " : " separators the variables follow, are not.

use core::ffi::c_void;
use core::ptr;

use ngx::ffi::{
    __BindgenBitfieldUnit, ngx_array_create, ngx_array_push, ngx_array_t, ngx_conf_t, ngx_cycle_t,
    ngx_http_add_variable, ngx_http_request_t, ngx_http_upstream_state_t,
    ngx_http_variable_value_t, ngx_int_t, ngx_pnalloc, ngx_pool_cleanup_add, ngx_str_t, ngx_uint_t,
    NGX_HTTP_VAR_INDEXED, NGX_HTTP_VAR_NOCACHEABLE,
};

use ngx::core::Status;
use ngx::http::HttpModuleMainConf;
use ngx::ngx_log_debug_mask;

use keepalive_slice_core::report::{join_tries, Length, TryField, TryRecord, Writer};

use crate::module::Module;

const VARIABLES: [(&str, TryField); 3] = [
    ("upstream_keepalive_reused", TryField::Reused),
    ("upstream_keepalive_requests", TryField::Requests),
    ("upstream_keepalive_key", TryField::Key),
];

/// The key of a try as logged: bytes in the request pool.
#[derive(Clone, Copy)]
struct LoggedKey(ngx_str_t);

impl AsRef<[u8]> for LoggedKey {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

type Try = TryRecord<LoggedKey>;

/// A request's tries, in a pool cleanup entry of its pool.
struct TryLog {
    request: *mut ngx_http_request_t,
    tries: *mut ngx_array_t,
}

/// Marks our cleanup entries; there is nothing to clean up.
unsafe extern "C" fn try_log_marker(_data: *mut c_void) {}

/// Registers the variables (preconfiguration).
///
/// # Safety
/// `cf` must be the live configuration at preconfiguration.
pub unsafe fn register(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx copies the name; the variable lives with the cycle.
    unsafe {
        let Some(mcf) = Module::main_conf_mut(&*cf) else {
            return Status::NGX_ERROR.0;
        };
        for (name, field) in VARIABLES {
            let mut name = ngx_str_t {
                len: name.len(),
                data: name.as_ptr().cast_mut(),
            };
            let v = ngx_http_add_variable(cf, &mut name, NGX_HTTP_VAR_NOCACHEABLE as ngx_uint_t);
            if v.is_null() {
                return Status::NGX_ERROR.0;
            }
            (*v).get_handler = Some(variable);
            (*v).data = field as usize;
            mcf.variables.push(v);
        }
    }
    Status::NGX_OK.0
}

/// Turns recording on for every upstream of the cycle if the configuration
/// references a variable (init_module: variables are resolved by then).
///
/// # Safety
/// `cycle` must be the new cycle.
pub unsafe fn enable_recording(cycle: *mut ngx_cycle_t) {
    // SAFETY: the variables and idle states live with the cycle.
    unsafe {
        let Some(mcf) = Module::main_conf(&*cycle) else {
            return;
        };
        let used = mcf
            .variables
            .iter()
            .any(|&v| (*v).flags & NGX_HTTP_VAR_INDEXED as ngx_uint_t != 0);
        for served in &mcf.served {
            (*served.idle).log_tries = used;
        }
        if used {
            ngx_log_debug_mask!(
                DebugMask::Core,
                (*cycle).log,
                "keepalive slice: $upstream_keepalive_* in use, recording upstream tries"
            );
        }
    }
}

/// `r`'s try log, if it has one.
///
/// # Safety
/// `r` must be a live request.
unsafe fn find_log(r: *mut ngx_http_request_t) -> *mut TryLog {
    // SAFETY: walks the pool's cleanup list; entries with our marker hold
    // a TryLog.
    unsafe {
        let mut cln = (*(*r).pool).cleanup;
        while !cln.is_null() {
            if (*cln).handler.map(|h| h as *const ()) == Some(try_log_marker as *const ()) {
                let log = (*cln).data as *mut TryLog;
                if (*log).request == r {
                    return log;
                }
            }
            cln = (*cln).next;
        }
        ptr::null_mut()
    }
}

/// `r`'s try log, created if needed; null if the pool is out of memory.
///
/// # Safety
/// `r` must be a live request.
unsafe fn log_of(r: *mut ngx_http_request_t) -> *mut TryLog {
    // SAFETY: allocations from the request pool, freed with it.
    unsafe {
        let log = find_log(r);
        if !log.is_null() {
            return log;
        }
        let tries = ngx_array_create((*r).pool, 2, size_of::<Try>());
        let cln = ngx_pool_cleanup_add((*r).pool, size_of::<TryLog>());
        if tries.is_null() || cln.is_null() {
            return ptr::null_mut();
        }
        let log = (*cln).data as *mut TryLog;
        log.write(TryLog { request: r, tries });
        (*cln).handler = Some(try_log_marker);
        log
    }
}

/// Records the try nginx is making now (get peer, once the balancer chose).
/// On failure the try is simply not recorded: its values show "-".
///
/// # Safety
/// `r` must be a live request whose upstream is connecting.
pub unsafe fn record_try(
    r: *mut ngx_http_request_t,
    reused: bool,
    shared: bool,
    requests: ngx_uint_t,
    key: ngx_str_t,
) {
    // SAFETY: upstream_states is the request's array of tries, the current
    // one last (ngx_http_upstream_connect pushes it before get peer).
    unsafe {
        let states = (*r).upstream_states;
        if states.is_null() || (*states).nelts == 0 {
            return;
        }
        let log = log_of(r);
        if log.is_null() {
            return;
        }
        let slot = ngx_array_push((*log).tries) as *mut Try;
        if slot.is_null() {
            return;
        }
        slot.write(Try {
            state: (*states).nelts - 1,
            reused,
            shared,
            requests: requests as u64,
            key: LoggedKey(key),
        });
        ngx_log_debug_mask!(
            DebugMask::Http,
            (*(*r).connection).log,
            "keepalive slice: try {} recorded",
            (*states).nelts - 1
        );
    }
}

unsafe extern "C" fn variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_http_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live request and its variable value; the
    // states and tries arrays belong to the request.
    unsafe {
        let v = &mut *v;
        let states = (*r).upstream_states;
        if states.is_null() || (*states).nelts == 0 {
            set_value(v, ptr::null_mut(), 0, true);
            return Status::NGX_OK.0;
        }
        let field = match data {
            d if d == TryField::Reused as usize => TryField::Reused,
            d if d == TryField::Requests as usize => TryField::Requests,
            _ => TryField::Key,
        };
        let state = (*states).as_slice::<ngx_http_upstream_state_t>();
        let has_peer = |i: usize| state.get(i).is_some_and(|s| !s.peer.is_null());
        let log = find_log(r);
        let tries: &[Try] = if log.is_null() {
            &[]
        } else {
            (*(*log).tries).as_slice::<Try>()
        };

        // One try, of ours: its value as it is (the common case).
        if let ([only], [_]) = (tries, state) {
            if only.state == 0 {
                match field {
                    TryField::Reused => {
                        let flag: &'static [u8] = match (only.reused, only.shared) {
                            (true, true) => b"w",
                            (true, false) => b"r",
                            _ => b".",
                        };
                        // nginx only reads variable values.
                        set_value(v, flag.as_ptr().cast_mut(), 1, false);
                        return Status::NGX_OK.0;
                    }
                    TryField::Key => {
                        set_value(v, only.key.0.data, only.key.0.len, false);
                        return Status::NGX_OK.0;
                    }
                    TryField::Requests => {}
                }
            }
        }

        let mut length = Length::default();
        join_tries(field, state.len(), has_peer, tries, &mut length);
        let p = ngx_pnalloc((*r).pool, length.0.max(1)) as *mut u8;
        if p.is_null() {
            return Status::NGX_ERROR.0;
        }
        let buf = core::slice::from_raw_parts_mut(p, length.0);
        let mut writer = Writer::new(buf);
        join_tries(field, state.len(), has_peer, tries, &mut writer);
        set_value(v, p, writer.len, false);
    }
    Status::NGX_OK.0
}

/// Fills a variable value: valid, cacheable, found or not. The flags and
/// the length share one 32-bit word; bindgen's setters write it a bit at
/// a time (~300 instructions for the 28-bit length), so on little-endian
/// machines the word is written at once, in bindgen's own bit order
/// (`len` bits 0-27, `valid` 28, `no_cacheable` 29, `not_found` 30,
/// `escape` 31).
fn set_value(v: &mut ngx_http_variable_value_t, data: *mut u8, len: usize, not_found: bool) {
    v.data = data;
    #[cfg(target_endian = "little")]
    {
        let word = (len as u32 & 0x0fff_ffff) | 1 << 28 | u32::from(not_found) << 30;
        v._bitfield_1 = __BindgenBitfieldUnit::new(word.to_le_bytes());
    }
    #[cfg(not(target_endian = "little"))]
    {
        v.set_len(len as u32);
        v.set_valid(1);
        v.set_no_cacheable(0);
        v.set_not_found(u32::from(not_found));
        v.set_escape(0);
    }
}
