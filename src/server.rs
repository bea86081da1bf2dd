//! The listener: accepts applications, applies `--max-connections`, and gives each client its own
//! authenticated upstream connection and relay session.
//!
//! It also owns the process's lifecycle: the credential manager starts here, and SIGTERM/SIGINT
//! start a graceful shutdown (keep accepting for `--shutdown-delay`, stop accepting, let live
//! connections finish for `--shutdown-grace`, exit 0; a second signal exits at once).

use crate::config::{Config, ConfigError, ListenAddr};
use crate::credential::{AuthKind, CredentialManager};
use crate::relay::{RelayContext, Session, SessionEnd};
use crate::upstream::{Upstream, tune_socket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable (exit status 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// What was asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What every connection task shares.
struct Shared {
    upstream: Upstream,
    credentials: CredentialManager,
    relay: Arc<RelayContext>,
    slots: Option<Arc<Semaphore>>,
    max_connections: usize,
    connect_timeout: Duration,
    /// Cancelled when the grace period is over: live sessions end.
    close_sessions: CancellationToken,
    next_id: AtomicU64,
}

/// A bound listener, TCP or unix socket.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// Runs the proxy until shutdown.
pub async fn run(config: Config) -> Result<(), ServerError> {
    tracing::info!(config = %config.describe(), "starting redis-entra-proxy");
    if !config.tls {
        tracing::warn!(
            "TLS to the upstream is disabled (--tls false): credentials travel in clear text"
        );
    }
    let stop_credentials = CancellationToken::new();
    let credentials = CredentialManager::start(&config, stop_credentials.clone())?;
    let upstream = Upstream::new(&config)?;
    let listener = bind(&config.listen).await?;
    let shared = Arc::new(Shared {
        upstream,
        relay: Arc::new(RelayContext {
            database: config.database,
            listen_password: config.listen_password.clone(),
            authenticate: credentials.mode() != AuthKind::None,
        }),
        credentials,
        slots: (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections))),
        max_connections: config.max_connections,
        connect_timeout: config.connect_timeout,
        close_sessions: CancellationToken::new(),
        next_id: AtomicU64::new(1),
    });
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    let signals = tokio::spawn(watch_signals(stop_accepting.clone(), config.shutdown_delay));
    accept_loop(&listener, &shared, &tracker, &stop_accepting).await;
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    tracker.close();
    tracing::info!(
        live = tracker.len(),
        grace = ?config.shutdown_grace,
        "listener closed; waiting for live connections to finish"
    );
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            live = tracker.len(),
            "shutdown grace over; closing live connections"
        );
        shared.close_sessions.cancel();
        tracker.wait().await;
    }
    stop_credentials.cancel();
    signals.abort();
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM/SIGINT: after `delay`, stop accepting. A second signal exits at once.
async fn watch_signals(stop_accepting: CancellationToken, delay: Duration) {
    wait_for_signal().await;
    tracing::info!(delay = ?delay, "shutdown signal received; still accepting during the delay");
    tokio::select! {
        _ = tokio::time::sleep(delay) => stop_accepting.cancel(),
        _ = wait_for_signal() => std::process::exit(1),
    }
    wait_for_signal().await;
    tracing::warn!("second shutdown signal: exiting now");
    std::process::exit(1);
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn bind(addr: &ListenAddr) -> Result<Listener, ServerError> {
    let bind_error = |source| ServerError::Bind {
        addr: match addr {
            ListenAddr::Tcp(a) => a.clone(),
            ListenAddr::Unix(p) => format!("unix:{}", p.display()),
        },
        source,
    };
    let listener = match addr {
        ListenAddr::Tcp(a) => {
            Listener::Tcp(TcpListener::bind(a.as_str()).await.map_err(bind_error)?)
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path);
            Listener::Unix(UnixListener::bind(path).map_err(bind_error)?, path.clone())
        }
    };
    let shown = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    tracing::info!(address = %shown, "listening");
    Ok(listener)
}

/// A socket file left by a previous run would make `bind` fail; anything else is left alone.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

async fn accept_loop(
    listener: &Listener,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = accept(listener, shared, tracker) => a,
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off briefly instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn accept(
    listener: &Listener,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
) -> std::io::Result<()> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, _) = l.accept().await?;
            tune_socket(&stream);
            tracker.spawn(serve(stream, shared.clone()));
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            tracker.spawn(serve(stream, shared.clone()));
        }
    }
    Ok(())
}

/// One client: a connection slot, a credential, an authenticated upstream, then the relay.
async fn serve<C>(client: C, shared: Arc<Shared>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let Some(_permit) = take_slot(&shared) else {
        let reason = format!(
            "too many connections (--max-connections {})",
            shared.max_connections
        );
        tracing::warn!(conn = id, "{reason}");
        return reject(client, &reason).await;
    };
    let credential = if shared.relay.authenticate {
        match shared
            .credentials
            .wait_current(shared.connect_timeout)
            .await
        {
            Ok(c) => Some(c),
            Err(e) => {
                let reason = format!("no credential for the upstream: {e}");
                tracing::warn!(conn = id, "{reason}");
                return reject(client, &reason).await;
            }
        }
    } else {
        None
    };
    let upstream = match shared.upstream.connect(credential.as_deref()).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(conn = id, error = %e, "upstream connection failed");
            return reject(client, &e.to_string()).await;
        }
    };
    tracing::debug!(conn = id, "connected");
    let session = Session::new(
        id,
        shared.relay.clone(),
        client,
        upstream,
        credential,
        shared.credentials.subscribe(),
    );
    let end = session.run(shared.close_sessions.clone()).await;
    log_end(id, &end);
}

/// Ordinary ends are debug; anything that broke on the upstream side is worth a warning.
fn log_end(id: u64, end: &SessionEnd) {
    match end {
        SessionEnd::ClientClosed | SessionEnd::Shutdown | SessionEnd::ClientProtocol(_) => {
            tracing::debug!(conn = id, reason = %end, "connection closed");
        }
        SessionEnd::UpstreamClosed
        | SessionEnd::UpstreamProtocol(_)
        | SessionEnd::AuthFailed(_)
        | SessionEnd::Io(_) => {
            tracing::warn!(conn = id, reason = %end, "connection closed");
        }
    }
}

fn take_slot(shared: &Shared) -> Option<Option<OwnedSemaphorePermit>> {
    match &shared.slots {
        None => Some(None),
        Some(s) => s.clone().try_acquire_owned().ok().map(Some),
    }
}

/// Tells a client why it can't be served (one RESP error), then closes. Input it already sent
/// is read and dropped briefly so the close doesn't turn into a reset that hides the error.
async fn reject<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, reason: &str) {
    let line = format!(
        "-ERR redis-entra-proxy: {}\r\n",
        reason.replace(['\r', '\n'], " ")
    );
    let _ = client.write_all(line.as_bytes()).await;
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
