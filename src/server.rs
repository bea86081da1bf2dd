//! The listener: accepts applications, applies `--max-connections`, and gives each client its own
//! authenticated upstream connection and relay session.
//!
//! It also owns the process's lifecycle: the credential manager starts here, a startup probe
//! authenticates one upstream connection (that is when `/startup` turns 200), and SIGTERM/SIGINT
//! or `POST /quitquitquit` start a graceful shutdown (readiness 503, keep accepting for
//! `--shutdown-delay`, stop accepting, let live connections finish for `--shutdown-grace`, exit
//! 0; a second signal exits at once).

use crate::admin::{AdminServer, AdminState};
use crate::cluster::registry::{NewListener, NodeHandle};
use crate::cluster::{Cluster, Detected};
use crate::config::{Config, ConfigError, ListenAddr};
use crate::connector::{Connector, OpenError, Ready};
use crate::credential::{AuthKind, CredentialManager};
use crate::health::Health;
use crate::metrics::{Counting, Metrics};
use crate::mux::{Multiplexer, Outcome};
use crate::pool::WarmPool;
use crate::relay::{RelayContext, Session, SessionEnd};
use crate::shutdown::Shutdown;
use crate::upstream::{Upstream, tune_socket};
use std::net::IpAddr;
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
    connector: Arc<Connector>,
    /// `--warm-connections N > 0`: connections authenticated ahead of demand.
    pool: Option<WarmPool>,
    relay: Arc<RelayContext>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    slots: Option<Arc<Semaphore>>,
    max_connections: usize,
    /// Cancelled when the grace period is over: live sessions end.
    close_sessions: CancellationToken,
    next_id: AtomicU64,
    /// Cluster mode (`--cluster auto|on`), with a TCP listener.
    cluster: Option<Arc<Cluster>>,
    /// `--multiplex N`: the shared connections clients start on.
    mux: Option<Multiplexer>,
}

/// Which upstream a listener's clients are relayed to.
#[derive(Clone)]
enum Target {
    /// The configured upstream (`--listen`).
    Seed,
    /// One node of a clustered cache (a node listener of the cluster mode).
    Node(Arc<NodeHandle>),
}

/// A bound listener, TCP or unix socket.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// Runs the proxy until shutdown.
pub async fn run(config: Config) -> Result<(), ServerError> {
    tracing::info!(config = %config.describe(), "starting redis-entra-proxy");
    let stop_background = CancellationToken::new();
    let credentials = CredentialManager::start(&config, stop_background.clone())?;
    let authenticate = credentials.mode() != AuthKind::None;
    let metrics = Metrics::new();
    metrics.register_credentials(credentials.counters().clone(), credentials.subscribe());
    let health = Arc::new(Health::new(
        config.max_connections,
        authenticate.then(|| credentials.subscribe()),
    ));
    let upstream = Upstream::new(&config)?;
    let shutdown = Shutdown::new();
    let admin = AdminServer::bind_all(config.admin_listen.as_deref(), &config.control_listen)
        .await
        .map_err(|(addr, source)| ServerError::Bind { addr, source })?;
    let listener = bind(&config.listen).await?;
    let connector = Arc::new(Connector {
        upstream,
        credentials,
        metrics: metrics.clone(),
        authenticate,
        connect_timeout: config.connect_timeout,
    });
    let cluster = match &listener {
        Listener::Tcp(l) => l.local_addr().ok().and_then(|addr| {
            Cluster::new(
                &config.cluster,
                &connector.upstream,
                &config.upstream_host,
                config.tls,
                addr.ip(),
                metrics.clone(),
            )
        }),
        Listener::Unix(..) => None,
    };
    let pool = (config.warm_connections > 0).then(|| {
        WarmPool::start(
            config.warm_connections,
            config.warm_after_first_pin,
            connector.clone(),
            health.clone(),
            stop_background.clone(),
        )
    });
    let mux = (config.multiplex > 0).then(|| {
        Multiplexer::start(
            config.multiplex,
            config.multiplex_reply_limit,
            connector.clone(),
            config.database,
            config.listen_password.clone(),
            health.clone(),
            stop_background.clone(),
        )
    });
    let shared = Arc::new(Shared {
        connector,
        pool,
        relay: Arc::new(RelayContext {
            database: config.database,
            listen_password: config.listen_password.clone(),
            authenticate,
            metrics: metrics.clone(),
        }),
        metrics,
        health,
        slots: (config.max_connections > 0)
            .then(|| Arc::new(Semaphore::new(config.max_connections))),
        max_connections: config.max_connections,
        close_sessions: CancellationToken::new(),
        next_id: AtomicU64::new(1),
        cluster: cluster.as_ref().map(|(c, _)| c.clone()),
        mux,
    });
    // With --multiplex the shared connections are that first connection (and stay open).
    if shared.mux.is_none() {
        tokio::spawn(startup_probe(shared.clone(), stop_background.clone()));
    }
    let state = AdminState {
        metrics: shared.metrics.clone(),
        health: shared.health.clone(),
        shutdown: shutdown.clone(),
    };
    for admin in admin {
        // Served until the last connection has gone: liveness and metrics stay up meanwhile.
        tokio::spawn(admin.serve(state.clone(), stop_background.clone()));
    }
    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    if let Some((cluster, listeners)) = cluster {
        tokio::spawn(cluster.run(shared.connector.clone(), stop_background.clone()));
        tokio::spawn(node_listeners(
            listeners,
            shared.clone(),
            tracker.clone(),
            stop_accepting.clone(),
        ));
    }
    let lifecycle = tokio::spawn(lifecycle(
        shutdown.clone(),
        shared.health.clone(),
        stop_accepting.clone(),
        config.shutdown_delay,
    ));
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
    stop_background.cancel();
    lifecycle.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Authenticates one upstream connection as soon as a credential is there, so `/startup` (and
/// the app container gated on it) doesn't wait for the first client. Retries until it works.
async fn startup_probe(shared: Arc<Shared>, stop: CancellationToken) {
    let mut delay = Duration::from_millis(500);
    let upstream = shared.connector.upstream.addr();
    while !shared.health.started() && !stop.is_cancelled() {
        match shared.connector.open().await {
            Ok(_) => {
                if let Some(cluster) = &shared.cluster {
                    // Seed clients wait for this too: whether replies are rewritten.
                    cluster.detected(Duration::from_secs(60)).await;
                }
                shared.health.mark_started();
                tracing::info!(upstream = %upstream, "ready: an upstream connection authenticated");
                return;
            }
            Err(reason) => {
                tracing::warn!(error = %reason, retry_in = ?delay, "startup: upstream not usable yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Waits for SIGTERM/SIGINT or `/quitquitquit`; then readiness 503, the delay, and the listener
/// closes. A second *signal* exits at once; a SIGTERM after `/quitquitquit` (a `preStop` hook
/// followed by the kubelet's own SIGTERM) is the first signal, not the second.
async fn lifecycle(
    shutdown: Shutdown,
    health: Arc<Health>,
    stop_accepting: CancellationToken,
    delay: Duration,
) {
    let mut signals = crate::shutdown::Signals::new();
    let mut received = 0;
    tokio::select! {
        _ = signals.next() => {
            received += 1;
            tracing::info!("shutdown signal received");
        }
        _ = shutdown.requested() => tracing::info!("shutdown requested (/quitquitquit)"),
    }
    health.mark_draining();
    tracing::info!(delay = ?delay, "readiness is now 503; still accepting during the delay");
    let delay_over = tokio::time::sleep(delay);
    tokio::pin!(delay_over);
    loop {
        tokio::select! {
            _ = &mut delay_over, if !stop_accepting.is_cancelled() => stop_accepting.cancel(),
            _ = signals.next() => {
                received += 1;
                if received >= 2 {
                    tracing::warn!("second shutdown signal: exiting now");
                    std::process::exit(1);
                }
                tracing::info!("shutdown signal received; already shutting down");
            }
        }
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
            let local_ip = stream.local_addr().ok().map(|a| a.ip());
            tracker.spawn(serve(stream, shared.clone(), Target::Seed, local_ip));
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            tracker.spawn(serve(stream, shared.clone(), Target::Seed, None));
        }
    }
    Ok(())
}

/// Accepts on each node listener the cluster mode opens, until shutdown.
async fn node_listeners(
    mut listeners: tokio::sync::mpsc::UnboundedReceiver<NewListener>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    while let Some(new) = listeners.recv().await {
        tokio::spawn(node_accept_loop(
            new,
            shared.clone(),
            tracker.clone(),
            stop.clone(),
        ));
    }
}

/// One node listener: its clients are relayed to that node; once the node has left the
/// cluster, new clients are told so (until the listener closes, when no client is left).
async fn node_accept_loop(
    new: NewListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let NewListener { node, listener } = new;
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(node = %node.addr, error = %e, "cluster: cannot accept on the node's listener");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = node.close.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) if node.retired() => {
                let reason = format!(
                    "local port {} served cluster node {}, which has left the cluster: this \
                     port is retired; ask the cluster for its topology again (CLUSTER SLOTS)",
                    node.local_port, node.addr
                );
                tracker.spawn(reject(stream, reason));
            }
            Ok((stream, _)) => {
                tune_socket(&stream);
                let local_ip = stream.local_addr().ok().map(|a| a.ip());
                tracker.spawn(serve(
                    stream,
                    shared.clone(),
                    Target::Node(node.clone()),
                    local_ip,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client: a connection slot, a credential, an authenticated upstream, then the relay.
/// `local_ip`: where the client reached the proxy (cluster mode names nodes there).
async fn serve<C>(client: C, shared: Arc<Shared>, target: Target, local_ip: Option<IpAddr>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let _client = ClientGuard::new(&shared);
    let _node_client = match &target {
        Target::Node(node) => Some(node.client()),
        Target::Seed => None,
    };
    let Some(_permit) = take_slot(&shared) else {
        let reason = format!(
            "too many connections (--max-connections {})",
            shared.max_connections
        );
        tracing::warn!(conn = id, "{reason}");
        shared
            .metrics
            .client_rejections
            .with_label_values(&["max_connections"])
            .inc();
        return reject(client, reason).await;
    };
    let mut handoff = None;
    let mut client = client;
    if let (Some(mux), Target::Seed) = (&shared.mux, &target) {
        match mux.serve(id, client, shared.close_sessions.clone()).await {
            Outcome::Ended(end) => return log_end(id, &end),
            Outcome::Pin(c, h) => {
                client = c;
                handoff = Some(h);
            }
        }
    }
    let _pinned = handoff
        .as_ref()
        .map(|_| Counting::new(&shared.metrics.mux_pinned_clients));
    let credentials = shared.connector.credentials.subscribe();
    // A client pinned after giving the listen password has its upstream opened now.
    let authenticated = handoff.as_ref().is_some_and(|h| h.authenticated);
    let session = if shared.relay.listen_password.is_some() && !authenticated {
        // The upstream connection is opened only once the client has given the password, so
        // that anyone who can reach the listener can't use up the cache's connections.
        let opener_shared = shared.clone();
        let opener_target = target.clone();
        let opener: crate::relay::Opener<crate::upstream::UpstreamStream> = Box::new(move || {
            Box::pin(async move {
                open_upstream(&opener_shared, id, &opener_target)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Session::with_opener(id, shared.relay.clone(), client, opener, credentials)
    } else {
        match open_upstream(&shared, id, &target).await {
            Ok(ready) => Session::new(id, shared.relay.clone(), client, ready, credentials),
            Err(e) => return reject(client, e.to_string()).await,
        }
    };
    let mut session = session;
    if let Some(h) = &handoff {
        let resp3 = h.protocol == crate::mux::Protocol::Resp3;
        session.take_over(&h.input, &h.setup, h.authenticated, resp3);
    }
    if let Some(view) = cluster_view(&shared, &target, local_ip).await {
        session.set_cluster(view);
    }
    tracing::debug!(conn = id, "connected");
    let (end, recycled) = match (&shared.pool, &target) {
        (Some(_), Target::Seed) => session.run_and_recycle(shared.close_sessions.clone()).await,
        _ => (session.run(shared.close_sessions.clone()).await, None),
    };
    if let (Some(pool), Some(r)) = (&shared.pool, recycled) {
        pool.give_back(r);
    }
    log_end(id, &end);
    if let Some(kind) = upstream_error_kind(&end) {
        shared
            .metrics
            .upstream_errors
            .with_label_values(&[kind])
            .inc();
    }
}

/// Cluster mode: what a session rewrites through. A seed session waits (once its upstream is
/// open, so an unreachable cache is reported at once) until `auto` has found out whether the
/// cache is a cluster.
async fn cluster_view(
    shared: &Shared,
    target: &Target,
    local_ip: Option<IpAddr>,
) -> Option<crate::cluster::ClusterView> {
    let (Some(cluster), Some(ip)) = (&shared.cluster, local_ip) else {
        return None;
    };
    let is_cluster = match target {
        Target::Node(_) => true,
        Target::Seed => {
            cluster.detected(shared.connector.connect_timeout).await == Detected::Cluster
        }
    };
    is_cluster.then(|| cluster.view(ip))
}

/// An authenticated upstream connection for client `id`: from the warm pool if it has one,
/// otherwise a new one. A failure is counted as a rejection and logged.
async fn open_upstream(shared: &Shared, id: u64, target: &Target) -> Result<Ready, OpenError> {
    let node = match target {
        Target::Node(node) => Some(node),
        Target::Seed => None,
    };
    let warm = match (&shared.pool, node) {
        (Some(pool), None) => pool.take().await,
        _ => None,
    };
    let opened = match (warm, node) {
        (Some(ready), _) => Ok(ready),
        (None, None) => shared.connector.open().await,
        (None, Some(node)) => {
            let opened = shared.connector.open_to(&node.upstream).await;
            if opened.is_err()
                && let Some(cluster) = &shared.cluster
            {
                cluster.refresh_soon(); // the node may have moved or gone
            }
            opened
        }
    };
    match opened {
        Ok(ready) => {
            shared.health.mark_started();
            Ok(ready)
        }
        Err(e) => {
            shared
                .metrics
                .client_rejections
                .with_label_values(&[e.rejection_reason()])
                .inc();
            tracing::warn!(conn = id, error = %e, "cannot serve client");
            Err(e)
        }
    }
}

/// Counts a client in the metrics and in readiness for as long as it is connected.
struct ClientGuard<'a>(&'a Shared);

impl<'a> ClientGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.metrics.client_connections_total.inc();
        shared.metrics.client_connections.inc();
        shared.health.client(true);
        ClientGuard(shared)
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.client_connections.dec();
        self.0.health.client(false);
    }
}

/// The `kind` of `redis_proxy_upstream_errors_total` a session end counts as, if any.
fn upstream_error_kind(end: &SessionEnd) -> Option<&'static str> {
    match end {
        SessionEnd::UpstreamClosed => Some("closed"),
        SessionEnd::UpstreamUnavailable(_) => None, // counted when it failed
        SessionEnd::UpstreamProtocol(_) => Some("protocol"),
        SessionEnd::AuthFailed(_) => Some("auth"),
        SessionEnd::UpstreamIo(_) => Some("io"),
        SessionEnd::ClientIo(_)
        | SessionEnd::ClientClosed
        | SessionEnd::ClientProtocol(_)
        | SessionEnd::Shutdown => None,
    }
}

/// Ordinary ends are debug; anything that broke on the upstream side is worth a warning.
fn log_end(id: u64, end: &SessionEnd) {
    match end {
        SessionEnd::ClientClosed
        | SessionEnd::Shutdown
        | SessionEnd::ClientProtocol(_)
        | SessionEnd::ClientIo(_) => {
            tracing::debug!(conn = id, reason = %end, "connection closed");
        }
        SessionEnd::UpstreamUnavailable(_) => {
            tracing::debug!(conn = id, reason = %end, "connection closed");
        }
        SessionEnd::UpstreamClosed
        | SessionEnd::UpstreamProtocol(_)
        | SessionEnd::AuthFailed(_)
        | SessionEnd::UpstreamIo(_) => {
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
async fn reject<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, reason: String) {
    let _ = client.write_all(&crate::relay::proxy_error(&reason)).await;
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
