//! The module's counters in shared memory, and `keepalive_status`.
//!
//! After the upstreams are initialised (postconfiguration), the module
//! lists the upstreams it serves and adds one shared zone sized for them,
//! `stats::plan` deciding the size so that nginx keeps the old zone, and
//! the counters, across a reload when the names fit. The zone's `init`
//! (in the master, before workers fork) gives each upstream its entry,
//! found by name; each worker then counts in its own slot of it.
//!
//! The status handler sums each upstream's slots and prints them as JSON
//! or, with `?format=prometheus`, in the Prometheus text format.

use core::ffi::{c_char, c_void};
use core::ptr;

use ngx::core::{Status, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_buf_t, ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_cycle_t,
    ngx_http_arg, ngx_http_discard_request_body, ngx_http_output_filter, ngx_http_request_t,
    ngx_http_send_header, ngx_http_upstream_srv_conf_t, ngx_int_t, ngx_ncpu, ngx_pagesize,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, ngx_uint_t,
    ngx_worker, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_LOG_ALERT, NGX_LOG_EMERG,
};
use ngx::http::{
    HTTPStatus, HttpModuleLocationConf, HttpModuleMainConf, HttpModuleServerConf,
    NgxHttpCoreModule, NgxHttpUpstreamModule,
};
use ngx::ngx_log_error;

use keepalive_slice_core::report::{self, UpstreamReport, Versions};
use keepalive_slice_core::stats::{plan, Table, MAX_SLOTS};

use crate::auto::{self, AutoState};
use crate::conf::{MainConf, Served};
use crate::log::debug_http;
use crate::module::{allocate, zone_tag, Module, VERSION};

const ZONE_NAME: &str = "keepalive_slice_status";

/// Lists the upstreams this module serves and adds the shared zone for
/// their counters (postconfiguration: every upstream is initialised).
///
/// # Safety
/// `cf` must be the live configuration at postconfiguration.
pub unsafe fn add_zone(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: the upstream module's main conf and its array of upstreams,
    // whose srv_conf arrays hold our conf (null for implicit upstreams,
    // which have no block and are never ours).
    unsafe {
        let Some(mcf) = Module::main_conf_mut(&*cf) else {
            return Status::NGX_ERROR.0;
        };
        let Some(umcf) = NgxHttpUpstreamModule::main_conf(&*cf) else {
            return Status::NGX_ERROR.0;
        };
        let upstreams = umcf
            .upstreams
            .as_slice::<*mut ngx_http_upstream_srv_conf_t>();
        for &us in upstreams {
            if us.is_null() || (*us).srv_conf.is_null() {
                continue;
            }
            let Some(kcf) = Module::server_conf(&*us) else {
                continue;
            };
            if kcf.idle.is_null() {
                continue;
            }
            let auto = match kcf.auto {
                None => ptr::null_mut(),
                Some(interval) => {
                    let Some(state) = AutoState::new(kcf.idle, interval) else {
                        return Status::NGX_ERROR.0;
                    };
                    debug_http!(
                        (*cf).log,
                        "keepalive auto: ceiling {}, decay every {} ms, {} bytes of marks",
                        (*kcf.idle).capacity(),
                        interval,
                        state.memory_bytes()
                    );
                    let Some(auto) = allocate((*cf).pool, state) else {
                        return Status::NGX_ERROR.0;
                    };
                    auto
                }
            };
            mcf.served.push(Served {
                name: upstream_name(us),
                idle: kcf.idle,
                auto,
            });
        }

        let names: Vec<&[u8]> = mcf.served.iter().map(|s| s.name.as_slice()).collect();
        let slots = usize::try_from(ngx_ncpu).unwrap_or(1).clamp(1, MAX_SLOTS);
        let page = ngx_pagesize;
        let old = old_table(cf);
        mcf.geometry = plan(old.as_ref(), &names, slots, page);

        let mut name = ngx_str_t {
            len: ZONE_NAME.len(),
            data: ZONE_NAME.as_ptr().cast_mut(),
        };
        let zone = ngx_shared_memory_add(cf, &mut name, mcf.geometry.zone_bytes(page), zone_tag());
        if zone.is_null() {
            return Status::NGX_ERROR.0;
        }
        (*zone).init = Some(init_zone);
        (*zone).data = ptr::from_mut(mcf).cast();
    }
    Status::NGX_OK.0
}

/// "name", or "host:port" for an upstream nginx made from a URL.
///
/// # Safety
/// `us` must be a live upstream.
unsafe fn upstream_name(us: *mut ngx_http_upstream_srv_conf_t) -> Vec<u8> {
    // SAFETY: host is the upstream's name, in the configuration pool.
    let (host, port) = unsafe { ((*us).host.as_bytes(), (*us).port) };
    let mut name = host.to_vec();
    if port != 0 {
        name.extend_from_slice(format!(":{port}").as_bytes());
    }
    name
}

/// The table of the running configuration, if it has our zone.
///
/// # Safety
/// `cf` must be the live configuration.
unsafe fn old_table(cf: *mut ngx_conf_t) -> Option<Table> {
    // SAFETY: walks the old cycle's list of shared zones (the init cycle
    // on first start, whose list is empty); a zone of ours begins with its
    // slab pool, whose `data` is our table.
    unsafe {
        let old = (*(*cf).cycle).old_cycle;
        if old.is_null() {
            return None;
        }
        let mut part = ptr::addr_of_mut!((*old).shared_memory.part);
        while !part.is_null() {
            let zones = (*part).elts as *mut ngx_shm_zone_t;
            for i in 0..(*part).nelts {
                let zone = zones.add(i);
                if (*zone).tag == zone_tag()
                    && (*zone).shm.name.as_bytes() == ZONE_NAME.as_bytes()
                    && !(*zone).shm.addr.is_null()
                {
                    return zone_table(zone);
                }
            }
            part = (*part).next;
        }
        None
    }
}

/// The table in an initialised zone of ours.
///
/// # Safety
/// `zone` must be a mapped zone of ours.
unsafe fn zone_table(zone: *mut ngx_shm_zone_t) -> Option<Table> {
    // SAFETY: the slab pool header is at the start of the zone, and the
    // table, if there is one, between its `data` and the zone's end.
    unsafe {
        let pool = (*zone).shm.addr as *mut ngx_slab_pool_t;
        let data = (*pool).data as *mut u8;
        let end = (*zone).shm.addr.add((*zone).shm.size);
        if data.is_null() || data < (*zone).shm.addr || data >= end {
            return None;
        }
        Table::open(data, end.offset_from(data) as usize)
    }
}

/// The zone's init, in the master: a new zone gets an empty table; a zone
/// kept from the previous configuration keeps its table. Each upstream is
/// then bound to its entry.
unsafe extern "C" fn init_zone(zone: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes our zone, mapped; `data` is the previous
    // configuration's (non-null when nginx kept the zone).
    unsafe {
        let mcf = &mut *((*zone).data as *mut MainConf);
        let log = (*zone).shm.log;
        let geometry = mcf.geometry;

        let table = if data.is_null() {
            let pool = (*zone).shm.addr as *mut ngx_slab_pool_t;
            let bytes = geometry.table_bytes();
            let memory = ngx_slab_alloc(pool, bytes) as *mut u8;
            let Some(table) = Table::format(memory, bytes, geometry) else {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "keepalive status: cannot lay out {} bytes of counters in zone \"{}\"",
                    bytes,
                    ZONE_NAME
                );
                return Status::NGX_ERROR.0;
            };
            (*pool).data = memory.cast();
            table
        } else {
            match zone_table(zone) {
                Some(table) if table.geometry() == geometry => table,
                _ => {
                    // Cannot happen with this build (the plan sized the
                    // zone from this table); counting is left off rather
                    // than the reload refused.
                    ngx_log_error!(
                        NGX_LOG_ALERT,
                        log,
                        "keepalive status: counters of the previous configuration unreadable, \
                         not counting until restart"
                    );
                    return Status::NGX_OK.0;
                }
            }
        };

        let found = table.find_or_add_all(mcf.served.iter().map(|served| &served.name[..]));
        for (served, index) in mcf.served.iter().zip(found) {
            match index.and_then(|i| table.entry(i)) {
                Some(entry) => (*served.idle).stats.attach(entry),
                None => {
                    ngx_log_error!(
                        NGX_LOG_ALERT,
                        log,
                        "keepalive status: no room for the counters of upstream \"{}\"",
                        String::from_utf8_lossy(&served.name)
                    );
                }
            }
        }
    }
    Status::NGX_OK.0
}

/// Each worker counts in its own slot of every entry.
///
/// # Safety
/// `cycle` must be the worker's cycle.
pub unsafe fn start_worker(cycle: *mut ngx_cycle_t) {
    // SAFETY: the served upstreams' idle states live with the cycle.
    unsafe {
        let Some(mcf) = Module::main_conf(&*cycle) else {
            return;
        };
        for served in &mcf.served {
            (*served.idle).stats.start_worker(ngx_worker);
            if !served.auto.is_null() {
                auto::start_worker(served.auto, (*cycle).log);
            }
        }
    }
}

/// A worker leaving: its `keepalive auto` gauges leave the status page.
///
/// # Safety
/// `cycle` must be the worker's cycle.
pub unsafe fn exit_worker(cycle: *mut ngx_cycle_t) {
    // SAFETY: the served upstreams' states live with the cycle.
    unsafe {
        let Some(mcf) = Module::main_conf(&*cycle) else {
            return;
        };
        for served in &mcf.served {
            if !served.auto.is_null() {
                auto::exit_worker(served.auto);
            }
        }
    }
}

/// `keepalive_status;` in a location: the status handler answers there.
pub extern "C" fn keepalive_status_directive(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: a location directive; the core module's loc conf is there.
    unsafe {
        let Some(clcf) = NgxHttpCoreModule::location_conf_mut(&*cf) else {
            return NGX_CONF_ERROR;
        };
        clcf.handler = Some(status_handler);
    }
    NGX_CONF_OK
}

enum Format {
    Json,
    Prometheus,
}

/// The requested format: `?format=json` (default) or `?format=prometheus`.
///
/// # Safety
/// `r` must be a live request.
unsafe fn requested_format(r: *mut ngx_http_request_t) -> Option<Format> {
    let mut value = ngx_str_t::empty();
    let mut name = *b"format";
    // SAFETY: ngx_http_arg reads the request's arguments.
    let found =
        unsafe { ngx_http_arg(r, name.as_mut_ptr(), name.len(), &mut value) } == Status::NGX_OK.0;
    match value.as_bytes() {
        _ if !found => Some(Format::Json),
        b"json" => Some(Format::Json),
        b"prometheus" => Some(Format::Prometheus),
        _ => None,
    }
}

unsafe extern "C" fn status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls the content handler with a live request.
    unsafe {
        if (*r).method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as ngx_uint_t == 0 {
            return HTTPStatus::NOT_ALLOWED.0 as ngx_int_t;
        }
        let rc = ngx_http_discard_request_body(r);
        if rc != Status::NGX_OK.0 {
            return rc;
        }
        let Some(format) = requested_format(r) else {
            return HTTPStatus::BAD_REQUEST.0 as ngx_int_t;
        };

        let Some(mcf) = Module::main_conf(&*r) else {
            return Status::NGX_ERROR.0;
        };
        let upstreams: Vec<UpstreamReport> = mcf
            .served
            .iter()
            .filter_map(|served| {
                let entry = (*served.idle).stats.entry()?;
                Some(UpstreamReport {
                    name: &served.name,
                    snapshot: entry.snapshot(),
                    auto: !served.auto.is_null(),
                })
            })
            .collect();
        let versions = Versions {
            module: VERSION,
            nginx: ngx::ffi::NGINX_VERSION.to_str().unwrap_or("?"),
        };
        let (body, content_type) = match format {
            Format::Json => (report::json(&versions, &upstreams), "application/json"),
            Format::Prometheus => (
                report::prometheus(&versions, &upstreams),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
        };

        send(r, content_type, body.as_bytes())
    }
}

/// Sends a 200 response with `body`.
///
/// # Safety
/// `r` must be a live request in its content phase.
unsafe fn send(r: *mut ngx_http_request_t, content_type: &'static str, body: &[u8]) -> ngx_int_t {
    // SAFETY: the response lives in the request pool; content_type is
    // static, as nginx only reads it.
    unsafe {
        let out = &mut (*r).headers_out;
        out.status = HTTPStatus::OK.0;
        out.content_type_len = content_type.len();
        out.content_type = ngx_str_t {
            len: content_type.len(),
            data: content_type.as_ptr().cast_mut(),
        };
        out.content_type_lowcase = ptr::null_mut();
        out.content_length_n = body.len() as i64;

        // HEAD gets the headers only. nginx says so in r->header_only,
        // but the bindings misplace that bit on nginx 1.30 and later (the
        // request's bitfields follow a new `in_port_t port` there, and
        // bindgen lays them out from `uri_changes` on two bits early: the
        // getter reads `pipeline`), so the method decides, as for
        // stub_status; a 200 without Last-Modified or ETag is never
        // made header-only by another filter.
        let rc = ngx_http_send_header(r);
        if rc == Status::NGX_ERROR.0
            || rc > Status::NGX_OK.0
            || (*r).method == NGX_HTTP_HEAD as ngx_uint_t
        {
            return rc;
        }

        let b: *mut ngx_buf_t = ngx_create_temp_buf((*r).pool, body.len());
        if b.is_null() {
            return Status::NGX_ERROR.0;
        }
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).last, body.len());
        (*b).last = (*b).last.add(body.len());
        (*b).set_last_buf(if r == (*r).main { 1 } else { 0 });
        (*b).set_last_in_chain(1);

        let mut chain = ngx_chain_t {
            buf: b,
            next: ptr::null_mut(),
        };
        ngx_http_output_filter(r, &mut chain)
    }
}
