//! The address book of the cluster mode: which local port stands for which upstream node.
//!
//! A node is known by the address the cluster names it by (`ip:port`, as in `CLUSTER NODES` and
//! `MOVED`). Its local port is given once and kept for the life of the process while the node
//! exists; a node the cluster no longer lists is *retired*: its listener stays open for a while
//! to tell late clients why it refuses them, and closes once no client uses it. Binding happens
//! here, synchronously, so a port is listening before any reply names it.

use crate::config::ClusterPorts;
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One upstream node served on a local listener; shared by the listener and its sessions.
pub(crate) struct NodeHandle {
    /// The node's address as the cluster names it, for messages.
    pub addr: String,
    /// How to reach it: its own address, TLS verified against the configured host name.
    pub upstream: Upstream,
    /// Where clients reach it.
    pub local_port: u16,
    retired: AtomicBool,
    clients: AtomicUsize,
    /// Cancelled when the listener closes.
    pub close: CancellationToken,
}

impl NodeHandle {
    /// Whether the cluster no longer lists this node (new clients are refused with a reason).
    pub(crate) fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// A client of this node for as long as the guard lives.
    pub(crate) fn client(self: &Arc<Self>) -> NodeClient {
        self.clients.fetch_add(1, Ordering::Relaxed);
        NodeClient(self.clone())
    }
}

/// Counts a client of a node (a retired node's listener closes when none is left).
pub(crate) struct NodeClient(Arc<NodeHandle>);

impl Drop for NodeClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A listener just bound for a new node: the server accepts on it.
pub(crate) struct NewListener {
    /// The node.
    pub node: Arc<NodeHandle>,
    /// Bound, non-blocking.
    pub listener: TcpListener,
}

/// What a change of the node table was, for the log and the metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A node appeared and got this local port.
    Added(String, u16),
    /// A node left the cluster.
    Retired(String, u16),
    /// A retired node came back (still on its old port).
    Revived(String, u16),
    /// A retired node's listener closed.
    Closed(String, u16),
}

/// The node table and the port allocator.
pub(crate) struct Registry {
    nodes: HashMap<(String, u16), Entry>,
    base: Upstream,
    bind_ip: IpAddr,
    ports: ClusterPorts,
    /// The next port of the range to try: ports are handed out in order, so a port freed by a
    /// closed node is the last to be reused.
    cursor: u32,
    max_nodes: usize,
    /// How long a retired node's listener stays open at least.
    linger: Duration,
}

struct Entry {
    node: Arc<NodeHandle>,
    retired_at: Option<Instant>,
}

/// Why a node got no local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoPort {
    /// `--cluster-max-nodes` nodes are served already.
    MaxNodes,
    /// Every port of `--cluster-ports` is taken (or could not be bound).
    RangeFull,
}

impl Registry {
    /// An empty table; listeners go on `bind_ip`, nodes are dialled like `base`.
    pub(crate) fn new(
        base: Upstream,
        bind_ip: IpAddr,
        ports: ClusterPorts,
        max_nodes: usize,
        linger: Duration,
    ) -> Registry {
        Registry {
            nodes: HashMap::new(),
            base,
            bind_ip,
            ports,
            cursor: 0,
            max_nodes,
            linger,
        }
    }

    /// The local port of node `host:port`, giving it one (and a listener, sent to `spawn`) if
    /// it is new, or bringing it back if it was retired.
    pub(crate) fn local_port(
        &mut self,
        host: &str,
        port: u16,
        spawn: &mut dyn FnMut(NewListener),
        changes: &mut Vec<Change>,
    ) -> Result<u16, NoPort> {
        let key = (host.to_string(), port);
        if let Some(entry) = self.nodes.get_mut(&key) {
            if entry.retired_at.take().is_some() {
                entry.node.retired.store(false, Ordering::Relaxed);
                changes.push(Change::Revived(
                    entry.node.addr.clone(),
                    entry.node.local_port,
                ));
            }
            return Ok(entry.node.local_port);
        }
        if self.live() >= self.max_nodes {
            return Err(NoPort::MaxNodes);
        }
        let listener = self.bind().ok_or(NoPort::RangeFull)?;
        let local_port = listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|_| NoPort::RangeFull)?;
        let addr = join(host, port);
        let node = Arc::new(NodeHandle {
            addr: addr.clone(),
            upstream: self.base.for_node(host, port),
            local_port,
            retired: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            close: CancellationToken::new(),
        });
        self.nodes.insert(
            key,
            Entry {
                node: node.clone(),
                retired_at: None,
            },
        );
        changes.push(Change::Added(addr, local_port));
        spawn(NewListener { node, listener });
        Ok(local_port)
    }

    /// Makes the table match `present` (the nodes a topology read listed): new ones get a
    /// port, missing ones are retired, and retired ones nobody uses any more are closed.
    pub(crate) fn sync(
        &mut self,
        present: &[(String, u16)],
        now: Instant,
        spawn: &mut dyn FnMut(NewListener),
        changes: &mut Vec<Change>,
    ) -> Vec<(String, u16, NoPort)> {
        let mut refused = Vec::new();
        for (host, port) in present {
            if let Err(why) = self.local_port(host, *port, spawn, changes) {
                refused.push((host.clone(), *port, why));
            }
        }
        for (key, entry) in self.nodes.iter_mut() {
            if entry.retired_at.is_none() && !present.contains(key) {
                entry.retired_at = Some(now);
                entry.node.retired.store(true, Ordering::Relaxed);
                changes.push(Change::Retired(
                    entry.node.addr.clone(),
                    entry.node.local_port,
                ));
            }
        }
        let linger = self.linger;
        self.nodes.retain(|_, entry| {
            let done = entry.retired_at.is_some_and(|at| {
                now.saturating_duration_since(at) >= linger
                    && entry.node.clients.load(Ordering::Relaxed) == 0
            });
            if done {
                entry.node.close.cancel();
                changes.push(Change::Closed(
                    entry.node.addr.clone(),
                    entry.node.local_port,
                ));
            }
            !done
        });
        refused
    }

    /// Nodes served and not retired.
    pub(crate) fn live(&self) -> usize {
        self.nodes
            .values()
            .filter(|e| e.retired_at.is_none())
            .count()
    }

    /// Addresses of the live nodes, to read the topology from when the seed fails.
    pub(crate) fn live_nodes(&self) -> Vec<Arc<NodeHandle>> {
        self.nodes
            .values()
            .filter(|e| e.retired_at.is_none())
            .map(|e| e.node.clone())
            .collect()
    }

    /// Closes every listener (shutdown).
    pub(crate) fn close_all(&mut self) {
        for entry in self.nodes.values() {
            entry.node.close.cancel();
        }
    }

    /// Binds the next free port of the range (or an ephemeral one).
    fn bind(&mut self) -> Option<TcpListener> {
        let try_bind = |port: u16| {
            let listener = TcpListener::bind(SocketAddr::new(self.bind_ip, port)).ok()?;
            listener.set_nonblocking(true).ok()?;
            Some(listener)
        };
        match self.ports {
            ClusterPorts::Ephemeral => try_bind(0),
            ClusterPorts::Range(start, end) => {
                let size = u32::from(end) - u32::from(start) + 1;
                for _ in 0..size {
                    let offset = self.cursor % size;
                    self.cursor = self.cursor.wrapping_add(1);
                    let Ok(port) = u16::try_from(u32::from(start) + offset) else {
                        continue;
                    };
                    if self.nodes.values().any(|e| e.node.local_port == port) {
                        continue;
                    }
                    match try_bind(port) {
                        Some(listener) => return Some(listener),
                        None => tracing::warn!(
                            port,
                            "cluster: port of --cluster-ports in use by another process; skipped"
                        ),
                    }
                }
                None
            }
        }
    }
}

/// `host:port`, brackets around an IPv6 literal.
pub(crate) fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Command, parse_from};

    fn registry(ports: ClusterPorts, max: usize) -> Registry {
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
        let base = match Upstream::new(&config) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        Registry::new(
            base,
            IpAddr::from([127, 0, 0, 1]),
            ports,
            max,
            Duration::ZERO,
        )
    }

    fn free_range(n: u16) -> (u16, u16) {
        // Ports above the ephemeral range's usual start, checked free by binding them.
        for start in (20000..60000).step_by(usize::from(n) + 17) {
            let all_free = (start..start + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
            if all_free {
                return (start, start + n - 1);
            }
        }
        panic!("no free port range");
    }

    #[test]
    fn a_node_keeps_its_port_and_new_nodes_get_the_next_ones() {
        let (start, end) = free_range(4);
        let mut r = registry(ClusterPorts::Range(start, end), 10);
        let mut spawned = Vec::new();
        let mut changes = Vec::new();
        let mut spawn = |l: NewListener| spawned.push(l);
        let a = r.local_port("10.0.0.1", 8500, &mut spawn, &mut changes);
        let b = r.local_port("10.0.0.2", 8501, &mut spawn, &mut changes);
        let a_again = r.local_port("10.0.0.1", 8500, &mut spawn, &mut changes);
        assert_eq!((a, b, a_again), (Ok(start), Ok(start + 1), Ok(start)));
        assert_eq!(spawned.len(), 2);
        assert_eq!(
            changes,
            vec![
                Change::Added("10.0.0.1:8500".into(), start),
                Change::Added("10.0.0.2:8501".into(), start + 1)
            ]
        );
    }

    #[test]
    fn the_limit_and_a_full_range_give_no_port() {
        let (start, end) = free_range(2);
        let mut r = registry(ClusterPorts::Range(start, end), 2);
        let mut keep = Vec::new();
        let mut changes = Vec::new();
        let mut spawn = |l: NewListener| keep.push(l);
        assert!(r.local_port("a", 1, &mut spawn, &mut changes).is_ok());
        assert!(r.local_port("b", 1, &mut spawn, &mut changes).is_ok());
        assert_eq!(
            r.local_port("c", 1, &mut spawn, &mut changes),
            Err(NoPort::MaxNodes)
        );
        let mut r = registry(ClusterPorts::Range(start + 10, start + 10), 5);
        let _busy = TcpListener::bind(("127.0.0.1", start + 10));
        assert_eq!(
            r.local_port("a", 1, &mut spawn, &mut changes),
            Err(NoPort::RangeFull)
        );
        let _ = end;
    }

    #[test]
    fn a_missing_node_is_retired_revived_or_closed_when_unused() {
        let mut r = registry(ClusterPorts::Ephemeral, 10);
        let mut keep = Vec::new();
        let mut changes = Vec::new();
        let mut spawn = |l: NewListener| keep.push(l);
        let now = Instant::now();
        let both = [("a".to_string(), 1), ("b".to_string(), 2)];
        r.sync(&both, now, &mut spawn, &mut changes);
        let b_port = r.local_port("b", 2, &mut spawn, &mut changes);
        let nodes = r.live_nodes();
        let b = nodes.iter().find(|n| n.addr == "b:2").cloned();
        let Some(b) = b else { panic!("b is served") };
        let client = b.client();
        changes.clear();
        r.sync(&both[..1], now, &mut spawn, &mut changes);
        assert!(b.retired());
        assert_eq!(r.live(), 1);
        // Still in use: retired, not closed.
        r.sync(&both[..1], now, &mut spawn, &mut changes);
        assert!(!b.close.is_cancelled());
        // Back in the topology: same port.
        assert_eq!(r.local_port("b", 2, &mut spawn, &mut changes), b_port);
        assert!(!b.retired());
        r.sync(&both[..1], now, &mut spawn, &mut changes);
        drop(client);
        r.sync(&both[..1], now, &mut spawn, &mut changes);
        assert!(b.close.is_cancelled());
        let Ok(port) = b_port else {
            panic!("b had a port")
        };
        assert_eq!(
            changes,
            vec![
                Change::Retired("b:2".into(), port),
                Change::Revived("b:2".into(), port),
                Change::Retired("b:2".into(), port),
                Change::Closed("b:2".into(), port),
            ]
        );
    }
}
