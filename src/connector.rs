//! Getting an authenticated upstream connection: a valid credential, then TCP + TLS + `AUTH`
//! (+ `SELECT`), timed and counted.
//!
//! Both a newly accepted client and the warm pool ([`crate::pool`]) need exactly this, so it
//! lives in one place: the metrics, the credential wait and the error a refused client sees
//! can't drift apart between the two paths.

use crate::credential::CredentialManager;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, UpstreamError, UpstreamStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An upstream connection ready for a client (database selected), and the credential of its
/// last `AUTH` (`None` with `--auth none`).
pub type Ready = crate::relay::Upstream<UpstreamStream>;

/// Why an upstream connection could not be made ready. Its text goes to the refused client
/// after `-ERR redis-entra-proxy: `; it never holds a secret.
#[derive(Debug)]
pub enum OpenError {
    /// No valid credential arrived within `--connect-timeout`.
    NoCredential(String),
    /// Connect, TLS, `AUTH` or `SELECT` failed.
    Upstream(UpstreamError),
}

impl OpenError {
    /// The `reason` label of `redis_proxy_client_rejections_total`.
    pub fn rejection_reason(&self) -> &'static str {
        match self {
            OpenError::NoCredential(_) => "no_credential",
            OpenError::Upstream(_) => "upstream",
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::NoCredential(e) => write!(f, "no credential for the upstream: {e}"),
            OpenError::Upstream(e) => write!(f, "{e}"),
        }
    }
}

/// Opens authenticated upstream connections; one per process, shared.
pub struct Connector {
    /// Where and how to connect.
    pub upstream: Upstream,
    /// Where credentials come from.
    pub credentials: CredentialManager,
    /// Connect times and upstream errors are counted here.
    pub metrics: Arc<Metrics>,
    /// False with `--auth none`: no `AUTH` at all.
    pub authenticate: bool,
    /// How long to wait for a first credential.
    pub connect_timeout: Duration,
}

impl Connector {
    /// A valid credential (unless `--auth none`) and a connection authenticated with it.
    pub async fn open(&self) -> Result<Ready, OpenError> {
        self.open_to(&self.upstream).await
    }

    /// The same, to another node of a clustered cache (see [`Upstream::for_node`]).
    ///
    /// A connection refused at `AUTH` is tried once more when a newer credential was
    /// published meanwhile: under load, the TCP + TLS handshake can outlast the token picked
    /// before it (the server then rejects a token that has just expired).
    pub async fn open_to(&self, upstream: &Upstream) -> Result<Ready, OpenError> {
        let mut credential = if self.authenticate {
            let c = self.credentials.wait_current(self.connect_timeout).await;
            Some(c.map_err(|e| OpenError::NoCredential(e.to_string()))?)
        } else {
            None
        };
        let mut retried = false;
        loop {
            let started = Instant::now();
            match upstream.connect(credential.as_deref()).await {
                Ok(stream) => {
                    self.metrics
                        .upstream_connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Ready { stream, credential });
                }
                Err(e) => {
                    let newer = match e {
                        UpstreamError::Auth(_) if !retried => self.newer_than(&credential),
                        _ => None,
                    };
                    if newer.is_some() {
                        retried = true;
                        credential = newer;
                        continue;
                    }
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                    return Err(OpenError::Upstream(e));
                }
            }
        }
    }

    /// A valid credential newer than `used`, if one has been published since.
    fn newer_than(
        &self,
        used: &Option<Arc<crate::credential::AuthCredential>>,
    ) -> Option<Arc<crate::credential::AuthCredential>> {
        let used = used.as_ref()?.generation;
        let state = self.credentials.subscribe();
        let state = state.borrow();
        state
            .valid_at(std::time::SystemTime::now())
            .filter(|c| c.generation > used)
            .cloned()
    }
}
