//! The cluster mode: an OSS-clustered cache served as a cluster whose nodes are all local.
//!
//! Cluster clients connect to every node they are told about, by the address the cluster gives
//! (on Azure an IP and a port in 8500–8599, while the certificate names only the host name).
//! So the proxy gives each upstream node a local plaintext listener of its own, relays each
//! client of that listener 1:1 to that node (TLS verified against the configured host name,
//! `AUTH`ed and re-authenticated like any connection), and rewrites every address in replies
//! (`CLUSTER SLOTS|SHARDS|NODES|REPLICAS`, `MOVED`, `ASK`) to the local listener's.
//!
//! * [`registry`]: which local port is which node; ports handed out and retired.
//! * [`rewrite`]: the sans-IO rewriting of replies.
//! * This file: the process-wide [`Cluster`] (detection, the topology refresh loop) and the
//!   per-session [`ClusterView`] the relay core rewrites through.

pub(crate) mod registry;
pub(crate) mod rewrite;

use crate::config::{ClusterConfig, ClusterMode};
use crate::connector::Connector;
use crate::metrics::Metrics;
use crate::resp::encode_command;
use crate::upstream::{Upstream, roundtrip};
use registry::{Change, NewListener, NoPort, Registry, join};
use rewrite::{AddressMap, Rewriter, Topology};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What the proxy knows about the upstream's clustering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// Not asked yet (`--cluster auto` before the first topology read).
    Unknown,
    /// `auto`, and the cache could not be asked so far (unreachable, refused the credential):
    /// sessions don't wait for an answer that may be long to come, and don't rewrite.
    Failing,
    /// A cluster: sessions rewrite addresses.
    Cluster,
    /// Not a cluster: the seed listener relays as without cluster mode.
    NotCluster,
}

/// The cluster mode of the process: the node table and what keeps it current.
pub(crate) struct Cluster {
    mode: ClusterMode,
    /// The options, for the log line that says the mode is on.
    described: String,
    registry: Mutex<Registry>,
    /// Nodes named with an empty host (`MOVED 1 :6380`) are on the seed's host.
    seed_host: String,
    tls: bool,
    refresh_every: Duration,
    refresh_now: Notify,
    detected: watch::Sender<Detected>,
    listeners: mpsc::UnboundedSender<NewListener>,
    metrics: Arc<Metrics>,
    /// The first successful topology read has been logged.
    announced: AtomicBool,
    /// Nodes the last read could not serve (warned about once, not at every read).
    refused: Mutex<HashSet<(String, u16)>>,
}

impl Cluster {
    /// The cluster mode for `config` (None when `--cluster off`); node listeners go on
    /// `bind_ip` (the main listener's) and are handed to the server through the receiver.
    pub(crate) fn new(
        config: &ClusterConfig,
        upstream: &Upstream,
        seed_host: &str,
        tls: bool,
        bind_ip: IpAddr,
        metrics: Arc<Metrics>,
    ) -> Option<(Arc<Cluster>, mpsc::UnboundedReceiver<NewListener>)> {
        if config.mode == ClusterMode::Off {
            return None;
        }
        let (listeners, receiver) = mpsc::unbounded_channel();
        // A retired listener stays to explain itself to late clients for three refreshes.
        let linger = config.refresh * 3;
        let cluster = Cluster {
            mode: config.mode,
            described: config.describe(),
            registry: Mutex::new(Registry::new(
                upstream.clone(),
                bind_ip,
                config.ports,
                config.max_nodes,
                linger,
            )),
            seed_host: seed_host.to_string(),
            tls,
            refresh_every: config.refresh,
            refresh_now: Notify::new(),
            detected: watch::Sender::new(if config.mode == ClusterMode::On {
                Detected::Cluster
            } else {
                Detected::Unknown
            }),
            listeners,
            metrics,
            announced: AtomicBool::new(false),
            refused: Mutex::new(HashSet::new()),
        };
        Some((Arc::new(cluster), receiver))
    }

    /// Waits (at most `timeout`) until it is known whether the upstream is a cluster.
    pub(crate) async fn detected(&self, timeout: Duration) -> Detected {
        let mut watch = self.detected.subscribe();
        let known = watch.wait_for(|d| *d != Detected::Unknown);
        match tokio::time::timeout(timeout, known).await {
            Ok(Ok(d)) => *d,
            _ => *self.detected.borrow(),
        }
    }

    /// The view a session on local address `local_ip` rewrites through.
    pub(crate) fn view(self: &Arc<Self>, local_ip: IpAddr) -> ClusterView {
        ClusterView {
            cluster: self.clone(),
            local_ip: local_ip.to_string(),
        }
    }

    /// Reads the topology again soon (a `MOVED` passed, a node refused a connection).
    pub(crate) fn refresh_soon(&self) {
        self.refresh_now.notify_one();
    }

    /// The local port of a node, allocating one (its listener goes to the server).
    fn local_port(&self, host: &str, port: u16) -> Result<u16, NoPort> {
        let host = if host.is_empty() {
            self.seed_host.as_str()
        } else {
            host
        };
        let mut changes = Vec::new();
        let result = {
            let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            let result = registry.local_port(host, port, &mut |l| self.spawn(l), &mut changes);
            self.metrics.cluster_nodes.set(gauge(registry.live()));
            result
        };
        if !changes.is_empty() {
            // A node the last topology read didn't know: read it again.
            self.refresh_soon();
        }
        self.record(&changes);
        result
    }

    fn spawn(&self, listener: NewListener) {
        // The receiver lives as long as the server; if it is gone, so is the process.
        let _ = self.listeners.send(listener);
    }

    /// Logs each change once and counts it.
    fn record(&self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::Added(addr, port) => {
                    tracing::info!(node = %addr, local_port = port, "cluster: node served")
                }
                Change::Retired(addr, port) => tracing::info!(
                    node = %addr, local_port = port,
                    "cluster: node left the topology; its local port is retired"
                ),
                Change::Revived(addr, port) => tracing::info!(
                    node = %addr, local_port = port, "cluster: node is back in the topology"
                ),
                Change::Closed(addr, port) => tracing::info!(
                    node = %addr, local_port = port, "cluster: retired node's listener closed"
                ),
            }
            if !matches!(change, Change::Closed(..)) {
                self.metrics.cluster_topology_changes.inc();
            }
        }
    }

    /// Reads the topology at start and then every `--cluster-refresh` (sooner when asked),
    /// until `stop`. In `auto` mode the first answer decides whether this is a cluster.
    pub(crate) async fn run(self: Arc<Self>, connector: Arc<Connector>, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            match self.refresh(&connector).await {
                Ok(()) => failures = 0,
                Err(Refresh::NotCluster(why)) if self.mode == ClusterMode::Auto => {
                    tracing::info!(reason = %why, "cluster mode: off (the cache is not a cluster)");
                    self.detected.send_replace(Detected::NotCluster);
                    return;
                }
                Err(e) => {
                    self.detected.send_if_modified(|d| {
                        let first = *d == Detected::Unknown;
                        if first {
                            *d = Detected::Failing;
                        }
                        first
                    });
                    failures += 1;
                    // One warning per streak of failures, then quiet until it works again.
                    if failures == 1 {
                        tracing::warn!(error = %e, "cluster: cannot read the topology");
                    } else {
                        tracing::debug!(error = %e, failures, "cluster: cannot read the topology");
                    }
                }
            }
            let wait = if failures > 0 {
                self.refresh_every
                    .min(Duration::from_secs(1) * failures.min(10))
            } else {
                self.refresh_every
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.refresh_now.notified() => {
                    // Several MOVEDs in a burst: one read.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .close_all();
    }

    /// One topology read: from the seed, else from any live node.
    async fn refresh(&self, connector: &Connector) -> Result<(), Refresh> {
        let mut last = match read_nodes(connector, &connector.upstream).await {
            Ok(text) => return self.apply(&text),
            Err(e @ Refresh::NotCluster(_)) => return Err(self.failed(e)),
            Err(e) => e,
        };
        let live = self
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live_nodes();
        for node in live {
            match read_nodes(connector, &node.upstream).await {
                Ok(text) => return self.apply(&text),
                Err(e) => last = e,
            }
        }
        Err(self.failed(last))
    }

    fn failed(&self, e: Refresh) -> Refresh {
        self.metrics
            .cluster_refreshes
            .with_label_values(&["failure"])
            .inc();
        e
    }

    /// Makes the node table match a `CLUSTER NODES` text.
    fn apply(&self, text: &[u8]) -> Result<(), Refresh> {
        let nodes =
            rewrite::parse_nodes(text).map_err(|e| self.failed(Refresh::Bad(e.to_string())))?;
        let present: Vec<(String, u16)> = nodes
            .iter()
            .filter(|n| n.port != 0 && !n.flags.iter().any(|f| f == "noaddr" || f == "handshake"))
            .map(|n| {
                let host = if n.host.is_empty() {
                    self.seed_host.clone()
                } else {
                    n.host.clone()
                };
                (host, n.port)
            })
            .collect();
        let mut changes = Vec::new();
        let refused = {
            let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            let refused = registry.sync(
                &present,
                Instant::now(),
                &mut |l| self.spawn(l),
                &mut changes,
            );
            self.metrics.cluster_nodes.set(gauge(registry.live()));
            refused
        };
        self.record(&changes);
        {
            let mut warned = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            let now_refused: HashSet<(String, u16)> = refused
                .iter()
                .map(|(host, port, _)| (host.clone(), *port))
                .collect();
            for (host, port, why) in refused {
                if !warned.contains(&(host.clone(), port)) {
                    tracing::warn!(node = %join(&host, port), reason = no_port_reason(why), "cluster: node not served");
                }
            }
            *warned = now_refused;
        }
        self.metrics
            .cluster_refreshes
            .with_label_values(&["ok"])
            .inc();
        self.detected.send_replace(Detected::Cluster);
        if !self.announced.swap(true, Ordering::Relaxed) {
            tracing::info!(nodes = present.len(), options = %self.described, "cluster mode: on");
        }
        Ok(())
    }
}

/// Why a topology read failed.
#[derive(Debug, thiserror::Error)]
enum Refresh {
    /// The cache answered `CLUSTER NODES` with an error: it is not a cluster (or hides it).
    #[error("CLUSTER NODES answered: {0}")]
    NotCluster(String),
    /// No connection, or the reply was unusable.
    #[error("{0}")]
    Bad(String),
}

/// `CLUSTER NODES` on a new authenticated connection to `upstream`: the text.
async fn read_nodes(connector: &Connector, upstream: &Upstream) -> Result<Vec<u8>, Refresh> {
    let mut ready = connector
        .open_to(upstream)
        .await
        .map_err(|e| Refresh::Bad(e.to_string()))?;
    let command = encode_command(&[b"CLUSTER", b"NODES"]);
    let replies = tokio::time::timeout(
        connector.connect_timeout,
        roundtrip(&mut ready.stream, &[command]),
    )
    .await
    .map_err(|_| {
        Refresh::Bad(format!(
            "{} did not answer CLUSTER NODES in time",
            upstream.addr()
        ))
    })?
    .map_err(|e| Refresh::Bad(e.to_string()))?;
    let reply = replies
        .first()
        .ok_or_else(|| Refresh::Bad("no reply".into()))?;
    if reply.starts_with(b"-") {
        return Err(Refresh::NotCluster(crate::upstream::error_text(reply)));
    }
    rewrite::bulk_payload(reply)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Refresh::Bad("CLUSTER NODES did not answer with a string".into()))
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn no_port_reason(why: NoPort) -> &'static str {
    match why {
        NoPort::MaxNodes => "--cluster-max-nodes reached",
        NoPort::RangeFull => "no free port left in --cluster-ports",
    }
}

/// What one session rewrites through: the process's cluster, and the local IP its client
/// reached the proxy on (the address the client can reach the node listeners at).
pub(crate) struct ClusterView {
    cluster: Arc<Cluster>,
    local_ip: String,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("local_ip", &self.local_ip)
            .finish()
    }
}

impl AddressMap for ClusterView {
    fn local_port(&self, host: &str, port: u16) -> Option<u16> {
        match self.cluster.local_port(host, port) {
            Ok(port) => Some(port),
            Err(why) => {
                tracing::warn!(node = %join(host, port), reason = no_port_reason(why), "cluster: node not served");
                None
            }
        }
    }
}

impl ClusterView {
    fn rewriter(&self) -> Rewriter<'_> {
        Rewriter {
            local_ip: &self.local_ip,
            seed_host: &self.cluster.seed_host,
            tls: self.cluster.tls,
            map: self,
        }
    }

    /// A `-MOVED`/`-ASK` error with the local address (or the error that there is none);
    /// `None` for any other frame. A `MOVED` also makes the topology be read again.
    pub(crate) fn redirect(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let rewritten = self.rewriter().redirect(frame)?;
        if frame.starts_with(b"-MOVED") {
            self.cluster.refresh_soon();
        }
        Some(rewritten.unwrap_or_else(|e| crate::relay::proxy_error(&e.to_string()).to_vec()))
    }

    /// A topology reply with local addresses; `None` when it is to be relayed as it is.
    pub(crate) fn topology(&self, which: Topology, frame: &[u8]) -> Option<Vec<u8>> {
        match self.rewriter().topology(which, frame) {
            Ok(rewritten) => rewritten,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: topology reply not rewritten");
                Some(crate::relay::proxy_error(&e.to_string()).to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterPorts, Command, parse_from};

    fn cluster(max_nodes: usize) -> (Arc<Cluster>, mpsc::UnboundedReceiver<NewListener>) {
        let argv = [
            "redis-entra-proxy",
            "--upstream",
            "cache.test:7000",
            "--auth",
            "none",
        ];
        let parsed = parse_from(argv.iter().map(|a| a.to_string()), &|_| None);
        let Ok(Command::Run(config)) = parsed else {
            panic!("a configuration: {parsed:?}")
        };
        let upstream = match Upstream::new(&config) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        let options = ClusterConfig {
            mode: ClusterMode::On,
            ports: ClusterPorts::Ephemeral,
            max_nodes,
            refresh: Duration::from_secs(1),
        };
        let made = Cluster::new(
            &options,
            &upstream,
            "cache.test",
            true,
            IpAddr::from([127, 0, 0, 1]),
            Metrics::new(),
        );
        made.unwrap_or_else(|| panic!("cluster mode is on"))
    }

    #[test]
    fn a_redirect_to_a_new_node_binds_its_listener_before_the_client_hears_of_it() {
        let (cluster, mut listeners) = cluster(10);
        let view = cluster.view(IpAddr::from([127, 0, 0, 1]));
        let Some(out) = view.redirect(b"-MOVED 3999 10.0.0.7:8501\r\n") else {
            panic!("a redirect")
        };
        let Ok(new) = listeners.try_recv() else {
            panic!("a listener for the new node")
        };
        let port = new.node.local_port;
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("-MOVED 3999 127.0.0.1:{port}\r\n")
        );
        assert_eq!(new.listener.local_addr().map(|a| a.port()).ok(), Some(port));
        assert_eq!(new.node.addr, "10.0.0.7:8501");
        // The same node again: the same port, no new listener.
        let again = view.redirect(b"-ASK 3999 10.0.0.7:8501\r\n");
        assert_eq!(
            again.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Some(format!("-ASK 3999 127.0.0.1:{port}\r\n"))
        );
        assert!(listeners.try_recv().is_err());
        assert!(view.redirect(b"-ERR something else\r\n").is_none());
    }

    #[test]
    fn unmappable_or_malformed_topology_becomes_one_clear_error_line() {
        let (cluster, _listeners) = cluster(1);
        let view = cluster.view(IpAddr::from([127, 0, 0, 1]));
        let two_nodes = b"*2\r\n*3\r\n:0\r\n:1\r\n*3\r\n$8\r\n10.0.0.1\r\n:8500\r\n$2\r\nid\r\n\
                          *3\r\n:2\r\n:3\r\n*3\r\n$8\r\n10.0.0.2\r\n:8500\r\n$2\r\nid\r\n";
        let out = view.topology(Topology::Slots, two_nodes);
        let text = out.map(|b| String::from_utf8_lossy(&b).into_owned());
        assert_eq!(
            text.as_deref(),
            Some(
                "-ERR redis-entra-proxy: no local port for cluster node 10.0.0.2:8500: \
                 --cluster-max-nodes reached\r\n"
            )
        );
        for malformed in [
            &b"*1\r\n*3\r\n:0\r\n:1\r\n*1\r\n$8\r\n10.0.0.1\r\n"[..],
            b"*1\r\n$3\r\nabc\r\n",
            b"*1\r\n*3\r\n:0\r\n:1\r\n*3\r\n$8\r\n10.0.0.1\r\n$4\r\nport\r\n$2\r\nid\r\n",
        ] {
            let out = view.topology(Topology::Slots, malformed);
            let text = out.map(|b| String::from_utf8_lossy(&b).into_owned());
            let Some(text) = text else {
                panic!("an error for {malformed:?}")
            };
            assert!(
                text.starts_with("-ERR redis-entra-proxy: malformed CLUSTER SLOTS reply")
                    && text.ends_with("\r\n")
                    && text.matches("\r\n").count() == 1,
                "{text:?}"
            );
        }
        // An error reply from the cluster is the client's, as it is.
        assert!(view.topology(Topology::Slots, b"-ERR nope\r\n").is_none());
    }
}
