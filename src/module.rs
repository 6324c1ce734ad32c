//! The module as the rest of the glue knows it: its `ngx_module_t`, and
//! ngx-rust's typed accessors of its configurations.
//!
//! The module static is defined in the crate root (`lib.rs`), with the
//! context and the command table that name the handlers of every layer.
//! Declared here, as a C module declares its `ngx_module_t` before the
//! functions that use it, so that the layers above reach their
//! configuration through this file and never through the root.

use core::ffi::c_void;
use core::ptr;

use ngx::ffi::{ngx_http_upstream_srv_conf_t, ngx_module_t, ngx_pool_cleanup_add, ngx_pool_t};
use ngx::http::{HttpModule, HttpModuleMainConf, HttpModuleServerConf};

use crate::conf::{KeepaliveConf, MainConf};

extern "C" {
    /// This module (`lib.rs`).
    #[allow(non_upper_case_globals)]
    pub static mut ngx_http_upstream_keepalive_slice_module: ngx_module_t;
}

/// The module, for ngx-rust's configuration accessors:
/// `Module::server_conf_mut(upstream)`, `Module::main_conf_mut(cf)`.
pub struct Module;

impl HttpModule for Module {
    #[inline(always)]
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static lives as long as the process; nginx
        // writes its indexes before any configuration is looked up, and
        // only on the configuration thread.
        unsafe { &*ptr::addr_of!(ngx_http_upstream_keepalive_slice_module) }
    }
}

// SAFETY: create_main_conf makes a MainConf.
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

// SAFETY: create_srv_conf makes a KeepaliveConf.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = KeepaliveConf;
}

/// The configuration of an upstream this module serves, for init peer,
/// which runs for every request: without the typed accessor's two null
/// checks, which cannot fail there (init peer is only installed on an
/// upstream whose configuration this module filled in).
///
/// # Safety
/// `us` is an explicit upstream whose `peer.init` this module set.
#[inline(always)]
pub unsafe fn served_conf(us: *const ngx_http_upstream_srv_conf_t) -> *const KeepaliveConf {
    // SAFETY: see above: its srv_conf array holds this module's conf at
    // the module's ctx_index, as for every http module.
    unsafe { (*(*us).srv_conf.add(Module::module().ctx_index)).cast() }
}

/// This module's version, as the startup notice and the status page name it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The module as the tag of its shared zones (`ngx_shm_zone_t.tag`).
pub fn zone_tag() -> *mut c_void {
    ptr::addr_of_mut!(ngx_http_upstream_keepalive_slice_module).cast()
}

/// Moves `value` into `pool`, dropped when the pool is destroyed (a
/// configuration with its cycle); `None` when the pool is out of memory.
///
/// ngx-rust's `Pool::allocate` does the same, but in ngx 0.5.1 it writes
/// the value before checking that memory was found (fixed in ngx-rust
/// after 0.5.1): out of memory at configuration time must fail the
/// configuration, not the master.
///
/// # Safety
/// `pool` must be a live pool.
pub unsafe fn allocate<T>(pool: *mut ngx_pool_t, value: T) -> Option<*mut T> {
    unsafe extern "C" fn drop_value<T>(data: *mut c_void) {
        // SAFETY: `data` is the value moved into the pool below, dropped
        // once, by the pool's cleanup.
        unsafe { ptr::drop_in_place(data.cast::<T>()) }
    }

    const { assert!(align_of::<T>() <= align_of::<usize>()) };
    // SAFETY: `pool` is live; its allocations are aligned for a machine
    // word, enough for `T` (asserted above); the cleanup entry is the
    // pool's, and runs before its memory is freed.
    unsafe {
        let cln = ngx_pool_cleanup_add(pool, 0);
        if cln.is_null() {
            return None;
        }
        let p = ngx::core::Pool::from_ngx_pool(pool)
            .alloc(size_of::<T>())
            .cast::<T>();
        if p.is_null() {
            return None;
        }
        p.write(value);
        (*cln).handler = Some(drop_value::<T>);
        (*cln).data = p.cast();
        Some(p)
    }
}
