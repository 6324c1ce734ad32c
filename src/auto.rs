//! `keepalive auto` in a worker: the decay timer of an auto upstream.
//!
//! The cache of an auto upstream is sized at its ceiling (`max=`) and
//! free peer keeps connections into it exactly as for `keepalive max`:
//! nothing of this file is on the per-request path. Every decay interval
//! the timer of each auto upstream in each worker looks at the worker's
//! idle connections of that upstream, oldest first, tells which no request
//! used since the previous tick (`auto::Marks`: same slot, same connection,
//! same count of requests), updates the estimate (`auto::Estimator`) and
//! closes the oldest idle connections above it, counted as closed
//! "decay". The estimate and the ceiling are published to the status page.
//!
//! The timer is cancelable: it never holds up a graceful shutdown, and it
//! stops when the worker is exiting (its idle connections are closed by
//! the shutdown then).

use core::ptr;

use ngx::ffi::{ngx_add_timer, ngx_event_t, ngx_exiting, ngx_log_t, ngx_msec_t, ngx_terminate};

use keepalive_slice_core::auto::{Estimator, Marks};
use keepalive_slice_core::stats::{Closed, Counter};

use crate::idle::{self, IdleState};
use crate::log::debug_http;

/// One auto upstream's decay in this worker (allocated with the
/// configuration, at its ceiling; copied into each worker by fork).
pub struct AutoState {
    event: ngx_event_t,
    idle: *mut IdleState,
    interval: ngx_msec_t,
    estimator: Estimator,
    marks: Marks,
}

impl AutoState {
    /// The decay of the cache `idle` (whose capacity is the ceiling),
    /// every `interval` milliseconds; `None` without the memory.
    ///
    /// # Safety
    /// `idle` must be a live idle state that outlives this one.
    pub unsafe fn new(idle: *mut IdleState, interval: ngx_msec_t) -> Option<Self> {
        // SAFETY: see above.
        let capacity = unsafe { (*idle).capacity() };
        Some(AutoState {
            // SAFETY: an all-zero event is nginx's own idle event
            // (ngx_pcalloc'ed in C).
            event: unsafe { core::mem::zeroed() },
            idle,
            interval,
            estimator: Estimator::new(),
            marks: Marks::new(capacity)?,
        })
    }

    /// Bytes held, fixed by the configuration.
    pub fn memory_bytes(&self) -> usize {
        self.marks.memory_bytes()
    }
}

/// Starts the decay timer in this worker and publishes its ceiling.
///
/// # Safety
/// `state` is a live state of this worker's configuration, whose idle
/// state's counters are bound to this worker's slot.
pub unsafe fn start_worker(state: *mut AutoState, log: *mut ngx_log_t) {
    // SAFETY: see above; the event lives as long as the configuration.
    unsafe {
        let s = &mut *state;
        let ev = ptr::addr_of_mut!(s.event);
        (*ev).data = state.cast();
        (*ev).handler = Some(tick);
        (*ev).log = log;
        (*ev).set_cancelable(1);
        let idle = &mut *s.idle;
        idle.stats.publish_auto(0, idle.capacity());
        ngx_add_timer(ev, s.interval);
    }
}

/// This worker leaves: its estimate and ceiling leave the status page.
///
/// # Safety
/// As for [`start_worker`].
pub unsafe fn exit_worker(state: *mut AutoState) {
    // SAFETY: see above.
    unsafe { (*(*state).idle).stats.publish_auto(0, 0) }
}

/// One decay tick.
unsafe extern "C" fn tick(ev: *mut ngx_event_t) {
    // SAFETY: the event's data is its AutoState (start_worker); the idle
    // connections in the cache are live, parked connections.
    unsafe {
        if ngx_exiting != 0 || ngx_terminate != 0 {
            return;
        }
        let state = &mut *((*ev).data as *mut AutoState);
        let idle = &mut *state.idle;

        let marks = &mut state.marks;
        marks.next_tick();
        let (mut count, mut unused) = (0, 0);
        idle.cache.for_each_oldest_first(|slot, c| {
            count += 1;
            // Its serial number and address: nginx reuses a closed
            // connection's structure for the next one it opens.
            let c = c.as_ptr();
            let identity = ((*c).number as usize).rotate_left(32) ^ c as usize;
            if marks.observe(slot, identity, (*c).requests as u64) {
                unused += 1;
            }
        });
        let close = state.estimator.tick(count, unused);
        debug_http!(
            (*ev).log,
            "keepalive auto: {} idle, {} unused since the last tick, estimate {}, closing {}",
            count,
            unused,
            state.estimator.estimate(),
            close
        );
        // The oldest are the unused ones: the LRU list is in the order
        // connections were stored.
        for _ in 0..close {
            let Some(c) = idle.cache.oldest().and_then(|slot| idle.cache.remove(slot)) else {
                break;
            };
            // One another worker took counts as its reuse only.
            if idle::close_idle(c.as_ptr()) {
                idle.count(Counter::Closed(Closed::Decay));
            }
        }
        idle.stats
            .publish_auto(state.estimator.estimate(), idle.capacity());

        ngx_add_timer(ev, state.interval);
    }
}
