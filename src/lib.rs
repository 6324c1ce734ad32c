//! nginx-keepalive-slice: a drop-in replacement for nginx's upstream
//! `keepalive` directive whose idle-connection cache can be sliced by a
//! per-request key (usually `$host`).
//!
//! `cache`, `args`, `keepalive_hint` (a backend's `Keep-Alive` header),
//! `identity` (what a connection is bound to), `stats`
//! (counters in shared memory) and `report` (the status page and variable
//! values) are plain Rust, unit-tested without nginx; the FFI glue is left
//! out of test builds because a test binary cannot link nginx's symbols.

pub mod args;
pub mod cache;
pub mod identity;
pub mod keepalive_hint;
pub mod report;
pub mod stats;

// The FFI glue runs inside nginx: a panic there would abort the worker
// (panic = "abort"; unwinding into C is never possible). Nothing on that
// path may panic, and clippy holds the glue to it.
macro_rules! ffi_glue {
    ($($name:ident),*) => {$(
        #[cfg(not(test))]
        #[deny(
            clippy::unwrap_used,
            clippy::expect_used,
            clippy::panic,
            clippy::todo,
            clippy::unimplemented,
            clippy::unreachable,
            clippy::indexing_slicing
        )]
        mod $name;
    )*};
}

ffi_glue!(
    conf,
    hint_ffi,
    identity_ffi,
    module,
    peer,
    session,
    status,
    variables
);

#[cfg(test)]
mod tests {
    /// `objs/nginx -V` names the project version through nginx's `--build`
    /// (set in .cargo/config.toml); it must not drift from Cargo.toml's.
    #[test]
    fn nginx_build_name_is_the_crate_version() {
        let config = include_str!("../.cargo/config.toml");
        let build = format!("--build=keepalive-slice-{}\"", env!("CARGO_PKG_VERSION"));
        assert!(config.contains(&build), "{build} not in .cargo/config.toml");
    }
}
