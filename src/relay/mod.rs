//! The relay: one upstream connection per client, bytes copied both ways, `AUTH` injected.
//!
//! * [`resp`]: frame delimiting without copying (where each command and reply ends).
//! * [`pending`]: the FIFO that says whose each expected reply is.
//! * [`command`]: the few commands whose meaning the relay must track.
//! * [`blocking`]: blocking commands sliced so that a blocked client can be re-authenticated.
//! * [`session`]: the per-connection loop, safe points and **re-authentication**.

pub mod blocking;
pub mod command;
pub mod pending;
pub mod resp;
pub mod session;

pub use resp::encode_command;
pub use session::{Recycled, RelayContext, Session, SessionEnd};

/// The one error line a client gets when the proxy can't serve it (`-ERR redis-entra-proxy:
/// <reason>`), kept on one line whatever the reason says.
pub fn proxy_error(reason: &str) -> bytes::Bytes {
    let reason = reason.replace(['\r', '\n'], " ");
    bytes::Bytes::from(format!("-ERR redis-entra-proxy: {reason}\r\n"))
}
