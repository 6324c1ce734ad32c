//! The pure core of nginx-keepalive-slice: everything the module decides
//! that needs no nginx to run, in plain Rust, unit-tested against models.
//!
//! - [`cache`]: the per-upstream cache of idle connections (storage and
//!   lookup, the eviction policy, hashing);
//! - [`args`]: the `keepalive` directive's parameters;
//! - [`auto`]: how `keepalive auto` sizes the idle connections to the load;
//! - [`identity`]: what a connection is bound to beyond its address (TLS
//!   name, verification, client certificate; session stamps);
//! - [`keepalive_hint`]: a backend's `Keep-Alive` header, and what it does
//!   to the connection it came on;
//! - [`stats`]: the counters in shared memory and their layout;
//! - [`registry`]: idle connections shared between workers (shared memory);
//! - [`report`]: the status page (JSON, Prometheus) and the values of the
//!   `$upstream_keepalive_*` variables.
//!
//! The nginx module (the crate at the workspace root) is the only user; it
//! reads what nginx holds and hands it here as bytes and numbers. What it
//! calls for every request is generic or `#[inline]`: without that, a
//! function of another crate is never inlined into the module's callbacks
//! (the release build has no LTO), and each call would cost the hot path
//! what it cost when this code was part of the module.

pub mod args;
pub mod auto;
pub mod cache;
pub mod identity;
pub mod keepalive_hint;
pub mod registry;
pub mod report;
pub mod stats;

#[cfg(test)]
mod tests {
    /// `objs/nginx -V` names the project version through nginx's `--build`
    /// (set in .cargo/config.toml); it must not drift from the workspace's.
    #[test]
    fn nginx_build_name_is_the_crate_version() {
        let config = include_str!("../../.cargo/config.toml");
        let build = format!("--build=keepalive-slice-{}\"", env!("CARGO_PKG_VERSION"));
        assert!(config.contains(&build), "{build} not in .cargo/config.toml");
    }
}
