//! The relay: one upstream connection per client, bytes copied both ways, `AUTH` injected.
//!
//! * [`state`]: the connection's state on the server side, and **`safe_point()`, the one place
//!   that says when an `AUTH` may be injected**.
//! * [`core`]: the sans-IO core: consumes client and server bytes, produces bytes to send.
//! * [`session`]: the thin I/O loop that drives the core over two sockets.
//! * [`pending`]: the FIFO that says whose each expected reply is.
//! * [`command`]: the few commands whose meaning the relay must track.
//! * [`blocking`]: blocking commands sliced so that a blocked client can be re-authenticated.
//! * [`translate`]: RESP3 → RESP2 for a RESP2 subscriber whose upstream speaks RESP3.
//!
//! Delimiting RESP is the crate-level [`crate::resp`].

mod blocking;
mod command;
pub mod core;
mod pending;
mod session;
pub mod state;
mod translate;

pub use session::{OpenFuture, Opener, Recycled, Session, Upstream};

use crate::resp::ProtocolError;
use crate::secret::Secret;
use std::sync::Arc;

/// What every session of a process shares.
#[derive(Debug)]
pub struct RelayContext {
    /// Database re-selected after `RESET` (0: none).
    pub database: u32,
    /// Password clients must give, if any.
    pub listen_password: Option<Secret>,
    /// Whether upstream connections are authenticated at all (`--auth none`: no).
    pub authenticate: bool,
    /// Where re-authentications, bytes and commands are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The client closed its connection.
    #[error("client closed the connection")]
    ClientClosed,
    /// The upstream closed or broke its connection (the client connection is closed too).
    #[error("upstream closed the connection")]
    UpstreamClosed,
    /// The client sent malformed RESP; it was told so, in Redis's words.
    #[error("client protocol error: {0}")]
    ClientProtocol(ProtocolError),
    /// The upstream sent something that is not RESP.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// An I/O error on the client's connection (e.g. the application reset it).
    #[error("client i/o error: {0}")]
    ClientIo(std::io::Error),
    /// An I/O error on the upstream connection (e.g. it was dropped without a TLS close).
    #[error("upstream i/o error: {0}")]
    UpstreamIo(std::io::Error),
    /// Authentication required after `RESET` failed; the client was told why.
    #[error("upstream authentication failed: {0}")]
    AuthFailed(String),
    /// The upstream connection, opened once the client authenticated, could not be opened;
    /// the client was told why.
    #[error("cannot open the upstream connection: {0}")]
    UpstreamUnavailable(String),
    /// The proxy is shutting down.
    #[error("proxy shutting down")]
    Shutdown,
}

/// The one error line a client gets when the proxy can't serve it (`-ERR redis-entra-proxy:
/// <reason>`), kept on one line whatever the reason says.
pub fn proxy_error(reason: &str) -> bytes::Bytes {
    let reason = reason.replace(['\r', '\n'], " ");
    bytes::Bytes::from(format!("-ERR redis-entra-proxy: {reason}\r\n"))
}
