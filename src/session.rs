//! TLS sessions follow a connection's identity too.
//!
//! The balancer keeps one TLS session per server, saved by whichever
//! request last completed a handshake with it, and offers it to every new
//! connection to that server. A resumed session carries what the original
//! handshake established: the server's verification result (under the
//! trusted certificates of the location that saved it) and, on the
//! backend's side, the client certificate that was presented. So a request
//! only resumes a session saved by a request of its own identity: the
//! session is stamped when saved (`identity::session_stamp`, in the
//! session's ticket application data, which OpenSSL stores with the session
//! and serializes with it, so that stamps survive an upstream zone), and a
//! session with another stamp, or none, is not resumed: the handshake is a
//! full one.

use ngx::ffi::{
    ngx_connection_t, ngx_log_t, ngx_ssl_get0_session, SSL_SESSION_get0_ticket_appdata,
    SSL_SESSION_set1_ticket_appdata, SSL_get_session, SSL_set_session,
};
use ngx::ngx_log_debug_mask;

/// Stamps the session being saved on `c` with `stamp`; `false` if it
/// cannot be (the session must then not be offered to others).
///
/// # Safety
/// `c` must be a live TLS connection.
pub unsafe fn stamp(c: *mut ngx_connection_t, stamp: &[u8]) -> bool {
    // SAFETY: see above; OpenSSL copies the stamp.
    unsafe {
        if (*c).ssl.is_null() {
            return false;
        }
        let session = ngx_ssl_get0_session(c);
        !session.is_null()
            && SSL_SESSION_set1_ticket_appdata(session, stamp.as_ptr().cast(), stamp.len()) == 1
    }
}

/// After the balancer has set its session on `c` for resumption: keeps it
/// only if it carries `stamp`.
///
/// # Safety
/// `c` must be a live TLS connection before its handshake.
pub unsafe fn resume_only_own(c: *mut ngx_connection_t, stamp: &[u8], log: *mut ngx_log_t) {
    // SAFETY: see above; the session is the connection's own reference,
    // and its ticket data lives as long as it.
    unsafe {
        if (*c).ssl.is_null() {
            return;
        }
        let ssl = (*(*c).ssl).connection;
        let session = SSL_get_session(ssl);
        if session.is_null() {
            return;
        }
        let mut data = core::ptr::null_mut();
        let mut len = 0;
        let own = SSL_SESSION_get0_ticket_appdata(session, &mut data, &mut len) == 1
            && !data.is_null()
            && core::slice::from_raw_parts(data as *const u8, len) == stamp;
        if !own {
            ngx_log_debug_mask!(
                DebugMask::Http,
                log,
                "keepalive slice: not resuming session {:p} of another identity",
                session
            );
            SSL_set_session(ssl, core::ptr::null_mut());
        }
    }
}
