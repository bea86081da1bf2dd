//! How a graceful shutdown is asked for: SIGTERM/SIGINT or `POST /quitquitquit`.
//!
//! Both end up in one [`Shutdown`] handle, so the server runs the same sequence whoever asked:
//! readiness 503 → still accepting for `--shutdown-delay` → listener closed → live connections
//! finish within `--shutdown-grace` → exit 0. A second request (a second signal) exits at once.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A cloneable "please shut down" switch.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
}

impl Shutdown {
    /// A switch nobody has pulled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a graceful shutdown (idempotent).
    pub fn request(&self) {
        self.requested.cancel();
    }

    /// True once asked.
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Resolves when a shutdown is asked for.
    pub async fn requested(&self) {
        self.requested.cancelled().await;
    }
}

/// SIGTERM and SIGINT, registered once so that no signal falls between two waits.
pub struct Signals {
    streams: Option<(Signal, Signal)>,
}

impl Signals {
    /// Starts listening (if signals can't be installed, [`Signals::next`] never resolves).
    pub fn new() -> Self {
        let streams = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some((term, int)),
            _ => None,
        };
        Signals { streams }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}
