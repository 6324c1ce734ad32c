//! Logging kept out of the per-request callbacks: the level is checked
//! inline, the message is formatted in a cold function. (nginx-sys's macros
//! format in place, into a 2 KiB buffer: inlined into a callback, each adds
//! its code and registers to the path every request takes.)
//!
//! The bottom layer of the glue: it uses nothing of the module's.

use ngx::ffi::ngx_log_t;

/// An http debug line, if the log's level asks for it.
macro_rules! debug_http {
    ($log:expr, $($arg:tt)+) => {{
        let log: *mut ::ngx::ffi::ngx_log_t = $log;
        // SAFETY: callers pass a live log.
        #[allow(unused_unsafe)]
        if unsafe { $crate::log::debugging(log) } {
            $crate::log::cold(|| {
                ::ngx::ngx_log_debug_mask!(DebugMask::Http, log, $($arg)+);
            });
        }
    }};
}

/// `debug_http!` with the level checked before (`debugging`), for a
/// callback that logs more than once.
macro_rules! debug_http_if {
    ($debugging:expr, $log:expr, $($arg:tt)+) => {{
        if $debugging {
            let log: *mut ::ngx::ffi::ngx_log_t = $log;
            $crate::log::cold(|| {
                ::ngx::ngx_log_debug_mask!(DebugMask::Http, log, $($arg)+);
            });
        }
    }};
}

/// `ngx_log_error!` out of line, as `debug_http!`.
macro_rules! log_error {
    ($level:expr, $log:expr, $($arg:tt)+) => {{
        let log: *mut ::ngx::ffi::ngx_log_t = $log;
        // SAFETY: callers pass a live log.
        #[allow(unused_unsafe)]
        let level = unsafe { (*log).log_level };
        if ($level as ::ngx::ffi::ngx_uint_t) <= level {
            $crate::log::cold(|| {
                ::ngx::ngx_log_error!($level, log, $($arg)+);
            });
        }
    }};
}

pub(crate) use {debug_http, debug_http_if, log_error};

/// Whether `debug_http!` would log to `log`.
///
/// # Safety
/// `log` must be live.
#[inline(always)]
pub unsafe fn debugging(log: *mut ngx_log_t) -> bool {
    // SAFETY: see above.
    let level = unsafe { (*log).log_level };
    ngx::log::DEBUG && ngx::log::check_mask(ngx::log::DebugMask::Http, level)
}

/// Runs `f` out of line (see `debug_http!`).
#[cold]
#[inline(never)]
pub fn cold(f: impl FnOnce()) {
    f()
}
