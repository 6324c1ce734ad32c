//! nginx-keepalive-slice: a drop-in replacement for nginx's upstream
//! `keepalive` directive whose idle-connection cache can be sliced by a
//! per-request key (usually `$host`).
//!
//! `cache` and `args` are plain Rust, unit-tested without nginx; `module`
//! is the FFI glue, left out of test builds because a test binary cannot
//! link nginx's symbols.

pub mod args;
pub mod cache;

#[cfg(not(test))]
mod module;
#[cfg(not(test))]
mod peer;
