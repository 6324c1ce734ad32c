//! `$upstream_keepalive_reused`, `$upstream_keepalive_requests` and
//! `$upstream_keepalive_key`: one value per upstream try, joined as nginx
//! joins `$upstream_status`.
//!
//! Tries are only recorded when the configuration references one of the
//! variables (nginx marks a variable "indexed" when a directive compiles
//! it: `log_format`, `add_header`, `map`, `if`, ...); requests of other
//! configurations pay one test of a flag per try. A record goes into a
//! small array allocated with the request's peer data (nothing allocated
//! per try), found through a pool cleanup entry of its own, as nginx's
//! realip module finds its context, because the request's module contexts
//! are cleared by an internal redirect while its upstream states, whose
//! " : " separators the variables follow, are not.

use core::ffi::c_void;
use core::mem::MaybeUninit;
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

use ngx::ffi::{
    __BindgenBitfieldUnit, ngx_conf_t, ngx_cycle_t, ngx_http_add_variable, ngx_http_conf_ctx_t,
    ngx_http_core_module, ngx_http_module, ngx_http_request_t, ngx_http_upstream_state_t,
    ngx_http_variable_value_t, ngx_int_t, ngx_palloc, ngx_pnalloc, ngx_pool_cleanup_t, ngx_pool_t,
    ngx_str_t, ngx_uint_t, NGX_HTTP_VAR_INDEXED, NGX_HTTP_VAR_NOCACHEABLE,
};

use ngx::core::Status;
use ngx::http::HttpModuleMainConf;
use ngx::ngx_log_debug_mask;

use keepalive_slice_core::report::{decimal, join_tries, Length, TryField, TryRecord, Writer};

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

/// Tries recorded without an allocation of their own (a try more goes
/// into the pool, as nginx grows an array).
const INLINE_TRIES: usize = 1;

/// The tries of one upstream of a request, in the same allocation as the
/// request's peer data (init peer allocates [`TRY_LOG_SIZE`] bytes more
/// when recording is on). It is found again through its own pool cleanup
/// entry, linked into the request pool's list as `ngx_pool_cleanup_add()`
/// links one (without allocating it): the request's module contexts are
/// cleared by an internal redirect, its upstream states and pool are not.
#[repr(C)]
pub struct TryLog {
    cleanup: ngx_pool_cleanup_t,
    request: *mut ngx_http_request_t,
    /// `inline` at first, grown in the pool (doubled) when full.
    tries: *mut Try,
    len: u32,
    cap: u32,
    inline: [MaybeUninit<Try>; INLINE_TRIES],
    /// `$upstream_keepalive_requests` of a lone try, formatted here.
    digits: [u8; 20],
}

/// The bytes init peer allocates after its peer data for a [`TryLog`].
pub const TRY_LOG_SIZE: usize = size_of::<TryLog>();

/// Marks our cleanup entries; there is nothing to clean up. Never
/// inlined: [`start_log`] is, and a copy of its own in another codegen
/// unit would have another address than the one looked for.
#[inline(never)]
unsafe extern "C" fn try_log_marker(_data: *mut c_void) {}

/// Starts the try log of `r`'s upstream at `log` ([`TRY_LOG_SIZE`] bytes
/// of `r`'s pool, 8-aligned): linked into the pool's cleanup list, empty.
///
/// # Safety
/// `r` must be live and `log` as above, for as long as the pool.
#[inline]
pub unsafe fn start_log(r: *mut ngx_http_request_t, log: *mut TryLog) {
    // SAFETY: see above; the entry lives as long as the pool, whose
    // destruction runs (and only runs) the no-op marker.
    unsafe {
        let pool = (*r).pool;
        let inline = ptr::addr_of_mut!((*log).inline).cast::<Try>();
        ptr::addr_of_mut!((*log).cleanup).write(ngx_pool_cleanup_t {
            handler: Some(try_log_marker),
            data: log.cast(),
            next: (*pool).cleanup,
        });
        ptr::addr_of_mut!((*log).request).write(r);
        ptr::addr_of_mut!((*log).tries).write(inline);
        ptr::addr_of_mut!((*log).len).write(0);
        ptr::addr_of_mut!((*log).cap).write(INLINE_TRIES as u32);
        (*pool).cleanup = ptr::addr_of_mut!((*log).cleanup);
    }
}

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
        let ctx = *(*cycle).conf_ctx.add(ngx_http_module.index) as *const ngx_http_conf_ctx_t;
        let cmcf = if ctx.is_null() {
            ptr::null_mut()
        } else {
            *(*ctx).main_conf.add(ngx_http_core_module.ctx_index)
        };
        INDEXED_IN.store(cmcf as usize, Ordering::Relaxed);
        for (index, &v) in INDEXES.iter().zip(&mcf.variables) {
            let indexed = (*v).flags & NGX_HTTP_VAR_INDEXED as ngx_uint_t != 0;
            index.store(
                if indexed { (*v).index } else { usize::MAX },
                Ordering::Relaxed,
            );
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

/// Calls `each` with every try log of `r`, the latest upstream's first.
///
/// # Safety
/// `r` must be a live request.
#[inline]
unsafe fn for_each_log(r: *mut ngx_http_request_t, mut each: impl FnMut(*mut TryLog)) {
    // SAFETY: walks the pool's cleanup list; entries with our marker are
    // the first field of a TryLog.
    unsafe {
        let marker: unsafe extern "C" fn(*mut c_void) = try_log_marker;
        let mut cln = (*(*r).pool).cleanup;
        while !cln.is_null() {
            if (*cln).handler.map(|h| h as usize) == Some(marker as usize) {
                let log = (*cln).data as *mut TryLog;
                if (*log).request == r {
                    each(log);
                }
            }
            cln = (*cln).next;
        }
    }
}

/// Records the try nginx is making now (get peer, once the balancer chose)
/// in the log [`start_log`] started. On failure the try is simply not
/// recorded: its values show "-".
///
/// # Safety
/// `log` must be the started log of `r`, a live request whose upstream is
/// connecting.
///
/// Out of line: inlined, it costs get peer's other paths (plain, sliced)
/// a few instructions per request in registers, for ~18 saved here.
#[inline(never)]
pub unsafe fn record_try(
    log: *mut TryLog,
    r: *mut ngx_http_request_t,
    reused: bool,
    shared: bool,
    requests: ngx_uint_t,
    key: ngx_str_t,
) {
    // SAFETY: upstream_states is the request's array of tries, the current
    // one last (ngx_http_upstream_connect pushes it before get peer); the
    // log's array is its inline storage or grown in the pool.
    unsafe {
        let states = (*r).upstream_states;
        if states.is_null() || (*states).nelts == 0 {
            return;
        }
        let log = &mut *log;
        if log.len == log.cap && !grow(log, (*r).pool) {
            return;
        }
        let slot = log.tries.add(log.len as usize);
        log.len += 1;
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

/// Doubles the room of `log`, in `pool`; `false` if out of memory.
///
/// # Safety
/// `log` must be a started log of a request of `pool`.
#[cold]
#[inline(never)]
unsafe fn grow(log: &mut TryLog, pool: *mut ngx_pool_t) -> bool {
    let Some(cap) = log.cap.checked_mul(2) else {
        return false;
    };
    // SAFETY: see above; the tries so far are copied.
    unsafe {
        let tries = ngx_palloc(pool, cap as usize * size_of::<Try>()) as *mut Try;
        if tries.is_null() {
            return false;
        }
        ptr::copy_nonoverlapping(log.tries, tries, log.len as usize);
        log.tries = tries;
    }
    log.cap = cap;
    true
}

/// The tries of `log`, in order.
///
/// # Safety
/// `log` must be a started log.
#[inline(always)]
unsafe fn tries_in<'a>(log: *const TryLog) -> &'a [Try] {
    // SAFETY: `len` tries were written at `tries`.
    unsafe { core::slice::from_raw_parts((*log).tries, (*log).len as usize) }
}

/// The request's tries in order: one log's own array (one upstream, the
/// common case) or, after an internal redirect to another upstream, the
/// logs' tries copied together into the pool. `None`: out of memory.
///
/// # Safety
/// `r` must be a live request.
unsafe fn tries_of<'a>(r: *mut ngx_http_request_t) -> Option<(&'a [Try], *mut TryLog)> {
    // SAFETY: the logs and their arrays live in the request pool.
    unsafe {
        let (mut logs, mut total, mut last) = (0usize, 0usize, ptr::null_mut());
        for_each_log(r, |log| {
            logs += 1;
            total += (*log).len as usize;
            last = log;
        });
        if logs <= 1 {
            let tries = if last.is_null() {
                &[][..]
            } else {
                tries_in(last)
            };
            return Some((tries, last));
        }
        // The latest upstream's log comes first in the list: filled from
        // the end.
        let all = ngx_pnalloc((*r).pool, total * size_of::<Try>()) as *mut Try;
        if all.is_null() {
            return None;
        }
        let mut end = total;
        for_each_log(r, |log| {
            let tries = tries_in(log);
            end -= tries.len();
            ptr::copy_nonoverlapping(tries.as_ptr(), all.add(end), tries.len());
        });
        Some((core::slice::from_raw_parts(all, total), ptr::null_mut()))
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

        // One try, of ours, in the request's only log: its values as they
        // are (the common case), the other variables' too (`lone_try`).
        if (*states).nelts == 1 {
            let log = lone_log(r);
            if !log.is_null() {
                let log = &mut *log;
                lone_try(r, v, field, &*log.tries, &mut log.digits);
                return Status::NGX_OK.0;
            }
        }
        joined(r, v, field)
    }
}

/// The request's only try log, if it holds one try, the request's first
/// (null otherwise).
///
/// # Safety
/// `r` must be a live request.
#[inline(always)]
unsafe fn lone_log(r: *mut ngx_http_request_t) -> *mut TryLog {
    // SAFETY: the logs live in the request pool.
    unsafe {
        let (mut logs, mut last) = (0usize, ptr::null_mut::<TryLog>());
        for_each_log(r, |log| {
            logs += 1;
            last = log;
        });
        if logs == 1 && (*last).len == 1 && (*(*last).tries).state == 0 {
            last
        } else {
            ptr::null_mut()
        }
    }
}

/// The value of `field` joined over the request's upstream states, into
/// the request pool.
///
/// # Safety
/// `r` must be a live request with upstream states, `v` its value.
#[inline(never)]
unsafe fn joined(
    r: *mut ngx_http_request_t,
    v: &mut ngx_http_variable_value_t,
    field: TryField,
) -> ngx_int_t {
    // SAFETY: see above.
    unsafe {
        let states = (*r).upstream_states;
        let state = (*states).as_slice::<ngx_http_upstream_state_t>();
        let has_peer = |i: usize| state.get(i).is_some_and(|s| !s.peer.is_null());
        let Some((tries, _)) = tries_of(r) else {
            return Status::NGX_ERROR.0;
        };
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

/// The indexes of the three variables in `r->variables` (`usize::MAX`:
/// not indexed), in the order of [`VARIABLES`], set at init module.
static INDEXES: [AtomicUsize; 3] = [const { AtomicUsize::new(usize::MAX) }; 3];
/// The core main conf (the configuration) whose variables `INDEXES` are.
static INDEXED_IN: AtomicUsize = AtomicUsize::new(0);

/// The value of `field` for a request's lone try; the requests are
/// formatted in `digits`.
#[inline(always)]
fn lone_value(field: TryField, only: &Try, digits: &mut [u8; 20]) -> (*mut u8, usize) {
    match field {
        TryField::Reused => {
            let flag: &'static [u8] = match (only.reused, only.shared) {
                (true, true) => b"w",
                (true, false) => b"r",
                _ => b".",
            };
            // nginx only reads variable values.
            (flag.as_ptr().cast_mut(), 1)
        }
        TryField::Key => (only.key.0.data, only.key.0.len),
        TryField::Requests => {
            let text = decimal(only.requests, digits);
            (text.as_ptr().cast_mut(), text.len())
        }
    }
}

/// The variable `field` of a request's lone try into `v`, and the other
/// two that the configuration uses into their own values in `r`, as if
/// evaluated at the same time: an access log (which flushes the three,
/// not cacheable, before it evaluates any) then reads them without
/// asking again; a reader that flushes them asks again.
///
/// # Safety
/// `r` must be live and `v` its value of `field`.
#[inline(always)]
unsafe fn lone_try(
    r: *mut ngx_http_request_t,
    v: &mut ngx_http_variable_value_t,
    field: TryField,
    only: &Try,
    digits: &mut [u8; 20],
) {
    let (data, len) = lone_value(field, only, digits);
    set_value(v, data, len, false);
    // SAFETY: r->variables has an entry per variable of the request's
    // configuration; INDEXES are used only if they are of that
    // configuration (a reload in a single process may have replaced the
    // one that set them while requests of the old one still run).
    unsafe {
        let cmcf = *(*r).main_conf.add(ngx_http_core_module.ctx_index);
        if cmcf as usize != INDEXED_IN.load(Ordering::Relaxed) {
            return;
        }
        for (index, (_, other)) in INDEXES.iter().zip(VARIABLES) {
            let index = index.load(Ordering::Relaxed);
            if other == field || index == usize::MAX {
                continue;
            }
            let (data, len) = lone_value(other, only, digits);
            // Not cacheable, as nginx marks a variable of
            // NGX_HTTP_VAR_NOCACHEABLE once evaluated: flushes reset it.
            set_value_of(&mut *(*r).variables.add(index), data, len, false, true);
        }
    }
}

/// Fills a variable value: valid, cacheable, found or not. The flags and
/// the length share one 32-bit word; bindgen's setters write it a bit at
/// a time (~300 instructions for the 28-bit length), so on little-endian
/// machines the word is written at once, in bindgen's own bit order
/// (`len` bits 0-27, `valid` 28, `no_cacheable` 29, `not_found` 30,
/// `escape` 31).
#[inline(always)]
fn set_value(v: &mut ngx_http_variable_value_t, data: *mut u8, len: usize, not_found: bool) {
    set_value_of(v, data, len, not_found, false);
}

/// [`set_value`], cacheable or not.
#[inline(always)]
fn set_value_of(
    v: &mut ngx_http_variable_value_t,
    data: *mut u8,
    len: usize,
    not_found: bool,
    no_cacheable: bool,
) {
    v.data = data;
    #[cfg(target_endian = "little")]
    {
        let word = (len as u32 & 0x0fff_ffff)
            | 1 << 28
            | u32::from(no_cacheable) << 29
            | u32::from(not_found) << 30;
        v._bitfield_1 = __BindgenBitfieldUnit::new(word.to_le_bytes());
    }
    #[cfg(not(target_endian = "little"))]
    {
        v.set_len(len as u32);
        v.set_valid(1);
        v.set_no_cacheable(u32::from(no_cacheable));
        v.set_not_found(u32::from(not_found));
        v.set_escape(0);
    }
}
