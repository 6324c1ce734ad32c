//! One idle pool per nginx: a worker whose own cache has no idle
//! connection for a request's bucket takes one that another worker of the
//! same nginx keeps idle, before opening a new one.
//!
//! The registry of shareable idle connections (`keepalive_slice_core::
//! registry`, whose header states the ownership protocol) lives in a
//! shared zone of its own. A connection moves between workers with
//! `pidfd_open(2)` + `pidfd_getfd(2)` (Linux 5.6): synchronous, so that it
//! fits inside get peer, which cannot wait for another worker to answer
//! (an `SCM_RIGHTS` hand-over over a socket would need the owner to run
//! its event loop first). The kernel checks ptrace access between the
//! workers (same user; under Yama `ptrace_scope` 1 each worker declares
//! the master as its tracer, which admits the master's descendants, its
//! sibling workers, and nothing else). Where the kernel or its policy
//! refuses (`ENOSYS`, `EPERM`, seccomp), one notice is logged and the
//! worker runs as it always did, its pool its own.
//!
//! Only connections whose whole state is the socket move: plain (no TLS)
//! HTTP/1.x, FastCGI, uwsgi, SCGI and memcached, over TCP or unix
//! sockets. TLS and HTTP/2 (gRPC) connections hold state in the worker's
//! memory and stay there.
//!
//! This worker's side of the protocol, in nginx terms:
//! - keep (free peer): the connection is published, then parked; its slot
//!   handle holds the ticket;
//! - a local take (get peer), an idle close (close handler, timer,
//!   eviction, shutdown sweep) first withdraws the ticket; a connection
//!   whose ticket was taken is *dropped*: removed from this worker's epoll
//!   (`EPOLL_CTL_DEL`: the registration belongs to the file description
//!   the taker holds too, and `ngx_close_connection()` skips it) and its
//!   descriptor closed without `shutdown()`;
//! - a take (get peer, after a local miss) copies the descriptor, checks
//!   the socket's inode, and builds an `ngx_connection_t` for it as
//!   `ngx_event_connect_peer()` does; the connection is marked *moved*;
//! - a moved connection's last close here calls `shutdown(SHUT_RDWR)`
//!   first, so the backend sees the FIN whatever stale descriptors other
//!   workers hold for a moment.

use core::ffi::{c_int, c_void};
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

use ngx::core::Status;
use ngx::ffi::{
    ngx_close_connection, ngx_conf_t, ngx_connection_t, ngx_core_conf_t, ngx_core_module,
    ngx_cycle_t, ngx_destroy_pool, ngx_event_actions, ngx_get_connection, ngx_int_t, ngx_io,
    ngx_log_t, ngx_peer_connection_t, ngx_pid, ngx_process, ngx_shared_memory_add, ngx_shm_zone_t,
    ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t, NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_LOG_NOTICE,
    NGX_PROCESS_WORKER,
};
use ngx::ngx_log_error;

use keepalive_slice_core::registry::{Key, OwnerId, Registry, Scan, Socket, Ticket};

use crate::log::debug_http;

const ZONE_NAME: &str = "keepalive_slice_share";

/// The registry's zone, per configuration (in the module's main conf).
pub struct Zone {
    pub registry: Option<Registry>,
    /// This configuration's generation (rule 5 of the protocol).
    pub generation: u64,
    capacity: usize,
}

impl Zone {
    pub const fn new() -> Self {
        Zone {
            registry: None,
            generation: 0,
            capacity: 0,
        }
    }
}

impl Default for Zone {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds the registry's zone, sized for `connections` idle connections
/// per worker over all upstreams that share (postconfiguration).
///
/// # Safety
/// `cf` is the live configuration; `zone` lives as long as its cycle.
pub unsafe fn add_zone(
    cf: *mut ngx_conf_t,
    zone: *mut Zone,
    connections: usize,
    tag: *mut c_void,
) -> ngx_int_t {
    if connections == 0 {
        return Status::NGX_OK.0;
    }
    // Workers are not known yet (worker_processes may follow http{}):
    // room for eight per CPU's worth of connections, and never fewer than
    // eight workers' worth.
    // SAFETY: nginx's CPU count, set at start.
    let cpus = usize::try_from(unsafe { ngx::ffi::ngx_ncpu })
        .unwrap_or(1)
        .max(8);
    let capacity = Registry::capacity_for(connections.saturating_mul(cpus));
    // SAFETY: nginx's page size, set at start.
    let page = unsafe { ngx::ffi::ngx_pagesize };
    let bytes = Registry::bytes_for(capacity);
    // One allocation from the zone's slab pool: whole pages, the pool's
    // header and a descriptor (at most 64 bytes) per page, alignment.
    let pages = bytes.div_ceil(page);
    let size = (pages + (pages * 64).div_ceil(page) + 8) * page;
    let mut name = ngx_str_t {
        len: ZONE_NAME.len(),
        data: ZONE_NAME.as_ptr().cast_mut(),
    };
    // SAFETY: see above.
    unsafe {
        let shm = ngx_shared_memory_add(cf, &mut name, size, tag);
        if shm.is_null() {
            return Status::NGX_ERROR.0;
        }
        (*zone).capacity = capacity;
        (*shm).init = Some(init_zone);
        (*shm).data = zone.cast();
    }
    Status::NGX_OK.0
}

/// The zone's init, in the master: a new zone gets an empty registry, a
/// kept one keeps its own (old workers still use it); either way the
/// configuration gets a generation of its own.
unsafe extern "C" fn init_zone(shm: *mut ngx_shm_zone_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: nginx passes our zone, mapped; its data is our Zone.
    unsafe {
        let zone = &mut *((*shm).data as *mut Zone);
        let log = (*shm).shm.log;
        let pool = (*shm).shm.addr as *mut ngx_slab_pool_t;
        let registry = if data.is_null() {
            let bytes = Registry::bytes_for(zone.capacity);
            let memory = ngx_slab_alloc(pool, bytes) as *mut u8;
            // A new zone is a fresh mapping: the slab pool gives its pages
            // as the kernel made them, zeroed, and the registry is laid
            // out without touching them. An allocator that fills what it
            // gives (nginx built with NGX_DEBUG_MALLOC fills with 0xA5)
            // shows it at both ends: then it is zeroed first.
            let fresh = !memory.is_null()
                && bytes >= 8
                && memory.cast::<u64>().read() == 0
                && memory.add(bytes - 8).cast::<u64>().read_unaligned() == 0;
            let registry = if fresh {
                Registry::format_zeroed(memory, bytes, zone.capacity)
            } else {
                Registry::format(memory, bytes, zone.capacity)
            };
            let Some(registry) = registry else {
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "keepalive share: cannot lay out {} entries in zone \"{}\"",
                    zone.capacity,
                    ZONE_NAME
                );
                return Status::NGX_ERROR.0;
            };
            (*pool).data = memory.cast();
            registry
        } else {
            let memory = (*pool).data as *mut u8;
            let end = (*shm).shm.addr.add((*shm).shm.size);
            let open = if memory.is_null() || memory >= end {
                None
            } else {
                Registry::open(memory, end.offset_from(memory) as usize)
            };
            match open {
                Some(registry) => registry,
                None => {
                    ngx_log_error!(
                        NGX_LOG_ALERT,
                        log,
                        "keepalive share: registry of the previous configuration unreadable, \
                         idle connections not shared"
                    );
                    return Status::NGX_OK.0;
                }
            }
        };
        zone.generation = registry.next_generation();
        zone.registry = Some(registry);
    }
    Status::NGX_OK.0
}

/// This worker's part in sharing, from init process on.
struct Worker {
    registry: Registry,
    me: OwnerId,
    generation: u64,
    /// Takes still allowed (a refusal by the kernel stops them).
    taking: bool,
    /// The upstream modules whose connections may move (`u->output.tag`).
    modules: [usize; 5],
    /// Per connection of the cycle (by index): moved here from another
    /// worker.
    moved: Vec<bool>,
    connections: *mut ngx_connection_t,
}

/// Set once in init process, read by this worker only (one thread).
static mut WORKER: Option<Worker> = None;

#[inline(always)]
fn worker() -> Option<&'static mut Worker> {
    // SAFETY: nginx workers run one thread; WORKER is only written at
    // init and exit process.
    unsafe { (*ptr::addr_of_mut!(WORKER)).as_mut() }
}

/// Whether this worker shares at all (a single load on the hot path).
#[inline(always)]
pub fn active() -> bool {
    worker().is_some()
}

/// The upstream modules whose connections are the socket alone.
const SHAREABLE_MODULES: [&[u8]; 5] = [
    b"ngx_http_proxy_module",
    b"ngx_http_fastcgi_module",
    b"ngx_http_memcached_module",
    b"ngx_http_uwsgi_module",
    b"ngx_http_scgi_module",
];

/// Starts sharing in a worker of an nginx with more than one, if the
/// configuration has the zone and the kernel lets it.
///
/// # Safety
/// `cycle` is the worker's cycle; `zone` its configuration's.
pub unsafe fn start_worker(cycle: *mut ngx_cycle_t, zone: &Zone) {
    // SAFETY: the cycle is live; the core conf is in its conf_ctx.
    unsafe {
        let log = (*cycle).log;
        let Some(registry) = zone.registry else {
            return;
        };
        if ngx_process != NGX_PROCESS_WORKER as usize {
            return;
        }
        let ccf = *(*cycle).conf_ctx.add(ngx_core_module.index) as *const ngx_core_conf_t;
        if ccf.is_null() || (*ccf).worker_processes <= 1 {
            return;
        }
        if let Err(err) = probe_transport() {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "keepalive share: pidfd_getfd() not available ({}), idle connections not \
                 shared between workers",
                errno_text(err)
            );
            return;
        }
        allow_siblings(log);
        let pid = ngx_pid as u32;
        let retired = |gone: u32, freed: usize| {
            debug_http!(
                log,
                "keepalive share: worker pid {} found worker pid {} gone, {} of its entries freed",
                pid,
                gone,
                freed
            );
        };
        let Some(me) = registry.register_with(pid, pid_alive, retired) else {
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "keepalive share: no owner slot left, idle connections of this worker not shared"
            );
            return;
        };
        let mut modules = [0usize; 5];
        let mut m = (*cycle).modules;
        while !m.is_null() && !(*m).is_null() {
            let name = (**m).name;
            if !name.is_null() {
                let name = core::ffi::CStr::from_ptr(name).to_bytes();
                if let Some(i) = SHAREABLE_MODULES.iter().position(|&n| n == name) {
                    if let Some(slot) = modules.get_mut(i) {
                        *slot = (*m) as usize;
                    }
                }
            }
            m = m.add(1);
        }
        debug_http!(
            log,
            "keepalive share: worker pid {} owner slot {} incarnation {} generation {}",
            pid,
            me.slot,
            me.incarnation,
            zone.generation
        );
        *ptr::addr_of_mut!(WORKER) = Some(Worker {
            registry,
            me,
            generation: zone.generation,
            taking: true,
            modules,
            moved: vec![false; (*cycle).connection_n],
            connections: (*cycle).connections,
        });
    }
}

/// The worker leaves: its entries are never claimed again, and its state
/// is freed (before nginx unloads the module with the cycle's pool).
pub fn exit_worker() {
    if let Some(w) = worker() {
        w.registry.retire(w.me);
    }
    // SAFETY: one thread; nothing uses the state after exit process.
    unsafe { *ptr::addr_of_mut!(WORKER) = None };
}

/// A process that exists (`EPERM`: someone else's, still there).
fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || errno() == libc::EPERM
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// "Operation not permitted", as strerror(3) says it.
fn errno_text(err: c_int) -> String {
    let text = std::io::Error::from_raw_os_error(err).to_string();
    match text.split_once(" (os error") {
        Some((message, _)) => message.to_owned(),
        None => text,
    }
}

/// Whether this kernel and its policy give pidfd_open() and
/// pidfd_getfd(): tried on this very process.
fn probe_transport() -> Result<(), c_int> {
    // SAFETY: plain system calls on this process's own descriptors.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) as c_int;
        if pidfd < 0 {
            return Err(errno());
        }
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, pidfd, 0) as c_int;
        let err = errno();
        libc::close(pidfd);
        if fd < 0 {
            return Err(err);
        }
        libc::close(fd);
    }
    Ok(())
}

/// Under Yama's `ptrace_scope` 1 a process may only be traced by its
/// ancestors, or by a tracer it declared *and that tracer's descendants*:
/// declaring the master admits every worker of this nginx (siblings,
/// and those of the next configuration) and no other process.
fn allow_siblings(log: *mut ngx_log_t) {
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    if scope.trim() != "1" {
        return;
    }
    // SAFETY: prctl on this process.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PTRACER,
            libc::getppid() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "keepalive share: prctl(PR_SET_PTRACER) failed ({})",
            errno_text(errno())
        );
    }
}

/// Whether connections of this upstream module may move.
#[inline]
pub fn shareable_module(tag: *const c_void) -> bool {
    worker().is_some_and(|w| !tag.is_null() && w.modules.contains(&(tag as usize)))
}

/// The registry key of a connection.
pub fn key<'a>(upstream: usize, tag: usize, addr: &'a [u8], slice: &'a [u8]) -> Option<Key<'a>> {
    let w = worker()?;
    Some(Key {
        generation: w.generation,
        upstream: upstream as u64,
        tag: tag as u64,
        addr,
        slice,
    })
}

/// The connection's index in the cycle's array.
fn index_of(w: &Worker, c: *mut ngx_connection_t) -> Option<usize> {
    let i = (c as usize).wrapping_sub(w.connections as usize) / size_of::<ngx_connection_t>();
    (i < w.moved.len()).then_some(i)
}

/// Publishes idle connection `c` under `key`; the ticket, if it was.
///
/// # Safety
/// `c` is a live connection of this worker, parked idle.
pub unsafe fn publish(c: *mut ngx_connection_t, key: &Key) -> Option<Ticket> {
    let w = worker()?;
    // SAFETY: see above.
    unsafe {
        let mut st: libc::stat = core::mem::zeroed();
        if libc::fstat((*c).fd, &mut st) != 0 {
            return None;
        }
        let socket = Socket {
            pid: ngx_pid as u32,
            fd: (*c).fd,
            dev: st.st_dev,
            ino: st.st_ino,
            requests: (*c).requests as u64,
            start_time: (*c).start_time as u64,
        };
        let ticket = w.registry.publish(w.me, key, socket);
        debug_http!(
            (*c).log,
            "keepalive share: connection {:p} fd {} {}",
            c,
            (*c).fd,
            if ticket.is_some() {
                "published"
            } else {
                "not published (no room)"
            }
        );
        ticket
    }
}

/// The owner takes its published connection back: `false` when another
/// worker took it (then the caller drops it, see [`drop_taken`]).
#[inline]
pub fn withdraw(ticket: Ticket) -> bool {
    worker().map_or(true, |w| w.registry.withdraw(ticket))
}

/// Whether a published connection is still unclaimed.
#[inline]
pub fn published(ticket: Ticket) -> bool {
    worker().map_or(true, |w| w.registry.published(ticket))
}

/// Another worker took idle connection `c`: it leaves this worker's event
/// loop (explicitly: `ngx_close_connection()` would skip `EPOLL_CTL_DEL`,
/// and the taker's traffic would keep waking this worker for a freed
/// connection), and its descriptor is closed, without `shutdown()`.
///
/// # Safety
/// `c` is a live idle connection of this worker, out of its cache.
pub unsafe fn drop_taken(c: *mut ngx_connection_t) {
    // SAFETY: see above.
    unsafe {
        debug_http!(
            (*c).log,
            "keepalive share: connection {:p} fd {} of worker pid {} taken by another worker, \
             closing this copy",
            c,
            (*c).fd,
            { ngx_pid }
        );
        // epoll (the only event method with del_conn): flags 0, not
        // NGX_CLOSE_EVENT, so that EPOLL_CTL_DEL is really made. The other
        // methods register descriptors, which the close below removes.
        if let Some(del) = ngx_event_actions.del_conn {
            del(c, 0);
        }
        if let Some(w) = worker() {
            if let Some(flag) = index_of(w, c).and_then(|i| w.moved.get_mut(i)) {
                *flag = false;
            }
        }
        if !(*c).pool.is_null() {
            ngx_destroy_pool((*c).pool);
        }
        ngx_close_connection(c);
    }
}

/// Before this worker's last close of `c`: a moved connection is shut
/// down, so that the backend sees the FIN whatever stale descriptors of
/// it other workers still hold.
///
/// # Safety
/// `c` is a live connection of this worker, about to be closed.
#[inline]
pub unsafe fn before_close(c: *mut ngx_connection_t) {
    let Some(w) = worker() else { return };
    let Some(flag) = index_of(w, c).and_then(|i| w.moved.get_mut(i)) else {
        return;
    };
    if *flag {
        *flag = false;
        // SAFETY: see above.
        unsafe {
            debug_http!(
                (*c).log,
                "keepalive share: moved connection {:p} shut down",
                c
            );
            libc::shutdown((*c).fd, libc::SHUT_RDWR);
        }
    }
}

/// What a take did, for the counters.
pub struct Taken {
    pub connection: Option<*mut ngx_connection_t>,
    pub failed: u32,
}

/// Takes an idle connection of `key` from another worker, for the try of
/// `pc`: a connection like one `ngx_event_connect_peer()` made, but
/// connected, carrying its `requests` and `start_time`.
///
/// # Safety
/// `pc` is the peer connection of a live request, without a connection.
pub unsafe fn take(key: &Key, pc: *mut ngx_peer_connection_t) -> Taken {
    let mut taken = Taken {
        connection: None,
        failed: 0,
    };
    let Some(w) = worker() else { return taken };
    if !w.taking {
        return taken;
    }
    // SAFETY: see above.
    unsafe {
        let log = (*pc).log;
        let mut scan = Scan::default();
        // Entries that fail (owner gone) are dropped; a few more tried.
        for _ in 0..4 {
            let Some(claim) = w.registry.claim(w.me, key, &mut scan) else {
                break;
            };
            let socket = claim.socket;
            let fd = match copy_descriptor(socket.pid, socket.fd) {
                Ok(fd) => fd,
                Err(err) if err == libc::ESRCH || err == libc::EBADF => {
                    debug_http!(
                        log,
                        "keepalive share: worker pid {} gone (fd {}: {}), entry dropped",
                        socket.pid,
                        socket.fd,
                        errno_text(err)
                    );
                    w.registry.finish(claim);
                    taken.failed += 1;
                    continue;
                }
                Err(err) => {
                    // Refused (EPERM, ENOSYS, seccomp): the owner keeps it.
                    w.registry.restore(claim);
                    w.taking = false;
                    taken.failed += 1;
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        log,
                        "keepalive share: pidfd_getfd() of worker pid {} refused ({}), this \
                         worker (pid {}) takes no idle connections of other workers",
                        socket.pid,
                        errno_text(err),
                        { ngx_pid }
                    );
                    return taken;
                }
            };
            let mut st: libc::stat = core::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_ino != socket.ino || st.st_dev != socket.dev {
                // Not the socket published: the owner still holds its own.
                debug_http!(
                    log,
                    "keepalive share: fd {} of worker pid {} is another socket, entry dropped",
                    socket.fd,
                    socket.pid
                );
                libc::close(fd);
                w.registry.finish(claim);
                taken.failed += 1;
                continue;
            }
            w.registry.finish(claim);
            let c = connection(fd, pc, socket);
            if c.is_null() {
                taken.failed += 1;
                break;
            }
            if let Some(flag) = index_of(w, c).and_then(|i| w.moved.get_mut(i)) {
                *flag = true;
            }
            debug_http!(
                log,
                "keepalive share: worker pid {} took connection fd {} of worker pid {} (owner \
                 slot {}) as fd {}, connection {:p} #{}, {} requests",
                { ngx_pid },
                socket.fd,
                socket.pid,
                claim.owner.slot,
                fd,
                c,
                (*c).number,
                socket.requests
            );
            taken.connection = Some(c);
            break;
        }
        taken.failed += scan.dropped;
    }
    taken
}

/// A copy of descriptor `fd` of process `pid`.
fn copy_descriptor(pid: u32, fd: i32) -> Result<c_int, c_int> {
    // SAFETY: plain system calls; the pidfd is closed here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as c_int;
        if pidfd < 0 {
            return Err(errno());
        }
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as c_int;
        let err = errno();
        libc::close(pidfd);
        if copy < 0 {
            return Err(err);
        }
        // pidfd_getfd sets close-on-exec; nginx's sockets are nonblocking,
        // and O_NONBLOCK belongs to the file description, copied with it.
        Ok(copy)
    }
}

/// An nginx connection for the connected socket `fd`, in this worker's
/// event loop, as `ngx_event_connect_peer()` makes one.
///
/// # Safety
/// `pc` is the try's peer connection; `fd` a connected stream socket.
unsafe fn connection(
    fd: c_int,
    pc: *mut ngx_peer_connection_t,
    socket: Socket,
) -> *mut ngx_connection_t {
    // SAFETY: see above.
    unsafe {
        let log = (*pc).log;
        let c = ngx_get_connection(fd, log);
        if c.is_null() {
            libc::shutdown(fd, libc::SHUT_RDWR);
            libc::close(fd);
            return ptr::null_mut();
        }
        (*c).type_ = libc::SOCK_STREAM;
        (*c).recv = ngx_io.recv;
        (*c).send = ngx_io.send;
        (*c).recv_chain = ngx_io.recv_chain;
        (*c).send_chain = ngx_io.send_chain;
        (*c).set_sendfile(1);
        if !(*pc).sockaddr.is_null() && (*(*pc).sockaddr).sa_family == libc::AF_UNIX as u16 {
            (*c).set_tcp_nopush(ngx::ffi::ngx_connection_tcp_nopush_e_NGX_TCP_NOPUSH_DISABLED);
            (*c).set_tcp_nodelay(ngx::ffi::ngx_connection_tcp_nodelay_e_NGX_TCP_NODELAY_DISABLED);
        }
        (*c).set_log_error((*pc).log_error());
        (*(*c).read).log = log;
        (*(*c).write).log = log;
        let counter = ngx::ffi::ngx_connection_counter;
        (*c).number = if counter.is_null() {
            0
        } else {
            AtomicUsize::from_ptr(counter.cast()).fetch_add(1, Ordering::Relaxed) as _
        };
        (*c).requests = socket.requests as _;
        (*c).start_time = socket.start_time as _;
        if let Some(add) = ngx_event_actions.add_conn {
            if add(c) != Status::NGX_OK.0 {
                libc::shutdown(fd, libc::SHUT_RDWR);
                ngx_close_connection(c);
                return ptr::null_mut();
            }
        }
        // Connected: writable now, as after a connect() that succeeded at
        // once.
        (*(*c).write).set_ready(1);
        c
    }
}
