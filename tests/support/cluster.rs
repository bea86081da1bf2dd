//! A real Redis Cluster (`redis-server` processes), TLS only, each node behind its own fake
//! Azure front, shaped like Azure Managed Redis with the OSS clustering policy.
//!
//! * Every node's certificate names only [`CLUSTER_HOST_NAME`] (`cache.test`), never an IP
//!   address ([`TestPki::for_host_only`]), while every address the cluster hands out is
//!   `127.0.0.1:<port>`: a client that verifies a shard against the address it dialled fails,
//!   one that verifies every shard against the configured host name gets through.
//! * Every node announces (`cluster-announce-ip 127.0.0.1`, `cluster-announce-tls-port`) the
//!   port of *its front*, not its real TLS port, so `CLUSTER SLOTS` / `NODES` and `MOVED` / `ASK`
//!   name the fronts, and a client (or the proxy) must rewrite or follow exactly those.
//!   The cluster bus (`cluster-port`, `cluster-announce-bus-port`) goes node to node directly,
//!   over TLS (`tls-cluster yes`), never through a front.
//! * Each front ([`AzureFront::start_for_node`]) relays to its node only. In Entra mode
//!   ([`ClusterOptions::entra`]) it checks tokens and creates the per-token ACL user *on its own
//!   node* (ACLs are per node in Redis Cluster), and closes a connection when the token of its
//!   last `AUTH` expires; in access-key mode it relays verbatim.
//! * Replication also goes through the fronts: a replica connects to its master's announced
//!   address, logs in as [`REPLICATION_USER`] (`masteruser` / `masterauth`; an Entra front
//!   passes that user's `AUTH` through unchanged) and the front relays `PSYNC` and the stream
//!   verbatim. So `CLUSTER FAILOVER` works, and a replica follows its master's front when the
//!   master's announced port changes ([`TestCluster::move_front`]).
//! * The harness keeps a model of what every node should report (slot owners, roles, announced
//!   ports, live nodes, slots being migrated) and every operation returns only once *every*
//!   live node's `CLUSTER NODES`, `CLUSTER SLOTS`, `CLUSTER INFO` and `INFO replication` agree
//!   with the new model — bounded polls; on timeout it panics with the first disagreement and
//!   the tail of every node's log.
//!
//! Nodes are numbered: `0..masters` are the masters as started (master `i` owns the `i`-th of
//! `masters` equal slot ranges), then `masters + i` is the replica of master `i` (when
//! [`ClusterOptions::replicas_per_master`] is 1). Roles change with [`TestCluster::failover`];
//! [`TestCluster::nodes`] always tells the current ones.
//!
//! ```ignore
//! let cluster = TestCluster::start(ClusterOptions::access_key()).await;
//! let node = cluster.node_for_key(b"user:1");
//! let mut c = RespClient::connect_tls(cluster.front_port(node), cluster.pki()).await;
//! ```
//!
//! Set `CLUSTER_DEBUG=1` to see every disagreement while an operation waits for convergence.
//!
//! Dropping the [`TestCluster`] stops the fronts, kills the processes and deletes their
//! directories and the PKI.

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::TcpListener;

use super::azure_front::FrontAuth;
use super::pki::CLUSTER_HOST_NAME;
use super::redis_server::{free_port, redis_server_binary};
use super::{AzureFront, RespClient, TestPki, TokenIssuer, random_hex};

/// Number of hash slots of a Redis Cluster.
pub const SLOT_COUNT: usize = 16384;

/// The ACL user replicas log in to their master with (`masteruser`; permissions `PSYNC`,
/// `REPLCONF`, `PING` only). Entra fronts pass its `AUTH` through unchanged.
pub const REPLICATION_USER: &str = "replicator";

/// How long [`TestCluster::start`] may take to form the cluster, once the processes answer.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an operation (migration, failover, front move) may take to converge.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a node process may take to answer its first `PING`.
const NODE_STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How often convergence is re-checked. Each check is one pipelined round trip per live node.
const CONVERGENCE_POLL: Duration = Duration::from_millis(20);

/// Response timeout of the harness's admin connections: a hung node fails an operation with a
/// message instead of hanging the test.
const ADMIN_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many log lines per node panic messages include.
const LOG_TAIL_LINES: usize = 15;

/// How a [`TestCluster`] is built.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Number of masters (slots are spread evenly over them). 3 is the shape of the issue.
    pub masters: usize,
    /// Replicas per master: 0, or 1 for failover tests (node `masters + i` replicates master
    /// `i`). More than one would make the winner of an automatic failover unpredictable.
    pub replicas_per_master: usize,
    /// `Some`: Entra mode, the fronts check tokens (signed like this issuer's) and map them to
    /// per-token ACL users on their node; `None`: access-key mode, the fronts relay verbatim.
    pub entra: Option<TokenIssuer>,
    /// `cluster-node-timeout`: how long until an unreachable node is flagged failing (and,
    /// with a replica, failed over). Short, so that [`TestCluster::kill_node`] is quick; not so
    /// short that a busy 2-core CI machine makes nodes look dead.
    pub node_timeout: Duration,
    /// `cluster-require-full-coverage`. Off by default, so a dead shard only takes its own
    /// slots down (what a "dead shard" test wants to see); on, the whole cluster refuses.
    pub require_full_coverage: bool,
}

impl ClusterOptions {
    /// Access-key mode: 3 masters, no replicas.
    pub fn access_key() -> ClusterOptions {
        ClusterOptions {
            masters: 3,
            replicas_per_master: 0,
            entra: None,
            node_timeout: Duration::from_secs(3),
            require_full_coverage: false,
        }
    }

    /// Entra mode (fronts check `issuer`'s tokens): 3 masters, no replicas.
    pub fn entra(issuer: &TokenIssuer) -> ClusterOptions {
        ClusterOptions {
            entra: Some(issuer.clone()),
            ..Self::access_key()
        }
    }

    /// The same with `n` replicas per master (0 or 1).
    pub fn with_replicas(mut self, n: usize) -> ClusterOptions {
        self.replicas_per_master = n;
        self
    }
}

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves slots (possibly none).
    Master,
    /// Replicates a master.
    Replica,
}

/// One node as the harness knows it (and as every live node agreed, after the last operation).
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The harness's number for the node (see the module documentation).
    pub index: usize,
    /// The 40-character cluster node id.
    pub id: String,
    /// Current role.
    pub role: Role,
    /// For a replica, the index of its master.
    pub master: Option<usize>,
    /// The real TLS port on 127.0.0.1 (never announced; for admin connections).
    pub port: u16,
    /// The cluster bus port (announced as is: the bus bypasses the fronts).
    pub bus_port: u16,
    /// The announced TLS port: its front's.
    pub front_port: u16,
    /// Slot ranges it owns (inclusive), ascending; empty for replicas.
    pub slots: Vec<(u16, u16)>,
    /// False after [`TestCluster::kill_node`].
    pub alive: bool,
}

/// One line of `CLUSTER NODES`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNodeLine {
    /// Node id.
    pub id: String,
    /// Announced IP.
    pub ip: String,
    /// Announced (TLS, with `tls-cluster yes`) port.
    pub port: u16,
    /// Announced bus port.
    pub bus_port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, …
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master: Option<String>,
    /// Config epoch.
    pub config_epoch: u64,
    /// `connected` or `disconnected`.
    pub link: String,
    /// Owned slot ranges (inclusive).
    pub slots: Vec<(u16, u16)>,
    /// `[slot->-id]` entries: slots this node is migrating, and to which node id (only shown
    /// in a node's own line).
    pub migrating: Vec<(u16, String)>,
    /// `[slot-<-id]` entries: slots this node is importing, and from which node id.
    pub importing: Vec<(u16, String)>,
}

impl ClusterNodeLine {
    /// True if the line has this flag.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Parses the text of `CLUSTER NODES` (Redis 7.0 format).
pub fn parse_cluster_nodes(text: &str) -> Result<Vec<ClusterNodeLine>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("short CLUSTER NODES line {line:?}"));
        }
        let bad = |what: &str| format!("bad {what} in CLUSTER NODES line {line:?}");
        // ip:port@cport[,hostname]
        let addr = fields[1].split(',').next().unwrap_or_default();
        let (ip_port, bus) = addr.split_once('@').ok_or_else(|| bad("address"))?;
        let (ip, port) = ip_port.rsplit_once(':').ok_or_else(|| bad("address"))?;
        let mut parsed = ClusterNodeLine {
            id: fields[0].to_string(),
            ip: ip.to_string(),
            port: port.parse().map_err(|_| bad("port"))?,
            bus_port: bus.parse().map_err(|_| bad("bus port"))?,
            flags: fields[2].split(',').map(str::to_string).collect(),
            master: (fields[3] != "-").then(|| fields[3].to_string()),
            config_epoch: fields[6].parse().map_err(|_| bad("config epoch"))?,
            link: fields[7].to_string(),
            slots: Vec::new(),
            migrating: Vec::new(),
            importing: Vec::new(),
        };
        for slot in &fields[8..] {
            if let Some(inner) = slot.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                if let Some((s, id)) = inner.split_once("->-") {
                    let s = s.parse().map_err(|_| bad("migrating slot"))?;
                    parsed.migrating.push((s, id.to_string()));
                } else if let Some((s, id)) = inner.split_once("-<-") {
                    let s = s.parse().map_err(|_| bad("importing slot"))?;
                    parsed.importing.push((s, id.to_string()));
                } else {
                    return Err(bad("slot entry"));
                }
            } else if let Some((a, b)) = slot.split_once('-') {
                let a = a.parse().map_err(|_| bad("slot range"))?;
                let b = b.parse().map_err(|_| bad("slot range"))?;
                parsed.slots.push((a, b));
            } else {
                let s = slot.parse().map_err(|_| bad("slot"))?;
                parsed.slots.push((s, s));
            }
        }
        parsed.slots.sort_unstable();
        out.push(parsed);
    }
    Ok(out)
}

/// One endpoint of a `CLUSTER SLOTS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEndpoint {
    /// The announced IP (`127.0.0.1` here).
    pub ip: String,
    /// The announced port: a front's.
    pub port: u16,
    /// The node id.
    pub id: String,
}

/// One entry of `CLUSTER SLOTS`: a slot range, its master, then its (non-failed) replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot.
    pub start: u16,
    /// Last slot (inclusive).
    pub end: u16,
    /// The master serving the range.
    pub master: SlotEndpoint,
    /// Its replicas.
    pub replicas: Vec<SlotEndpoint>,
}

/// Parses a `CLUSTER SLOTS` reply as the `redis` crate returns it.
pub fn parse_cluster_slots(reply: &redis::Value) -> Result<Vec<SlotRange>, String> {
    use redis::Value as V;
    let bad = || format!("unexpected CLUSTER SLOTS reply {reply:?}");
    let int = |v: &V| match v {
        V::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let text = |v: &V| match v {
        V::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        V::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let endpoint = |v: &V| -> Option<SlotEndpoint> {
        let V::Array(items) = v else { return None };
        Some(SlotEndpoint {
            ip: text(items.first()?)?,
            port: int(items.get(1)?)?,
            id: text(items.get(2)?)?,
        })
    };
    let V::Array(entries) = reply else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for entry in entries {
        let V::Array(items) = entry else {
            return Err(bad());
        };
        if items.len() < 3 {
            return Err(bad());
        }
        out.push(SlotRange {
            start: int(&items[0]).ok_or_else(bad)?,
            end: int(&items[1]).ok_or_else(bad)?,
            master: endpoint(&items[2]).ok_or_else(bad)?,
            replicas: items[3..]
                .iter()
                .map(endpoint)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?,
        });
    }
    out.sort_by_key(|r| r.start);
    Ok(out)
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes
/// keys with (`crc16.c` in Redis).
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of a key, as Redis computes it (`keyHashSlot`): CRC16 of the key, or of the
/// hash tag — the bytes between the first `{` and the first `}` after it, when not empty —
/// modulo 16384. (The `redis` crate has the same function, but not public.)
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) & (SLOT_COUNT as u16 - 1)
}

/// A short key (`k<n>`) that hashes to `slot`, found by trying `n = 0, 1, …` (about 16384 tries
/// on average). Prefix it with a hash tag of your own to get more keys in the same slot, e.g.
/// `format!("{{{}}}:a", key_for_slot(s))`.
pub fn key_for_slot(slot: u16) -> String {
    assert!(usize::from(slot) < SLOT_COUNT, "slot {slot} out of range");
    (0u64..)
        .map(|n| format!("k{n}"))
        .find(|k| key_slot(k.as_bytes()) == slot)
        .expect("some key hashes to every slot")
}

/// The `i`-th of `n` equal slot ranges (inclusive), as `redis-cli --cluster create` splits them.
fn slot_range(i: usize, n: usize) -> (u16, u16) {
    let start = i * SLOT_COUNT / n;
    let end = (i + 1) * SLOT_COUNT / n - 1;
    (start as u16, end as u16)
}

/// Inclusive ranges of the slots for which `pred` holds.
fn ranges_where(pred: impl Fn(usize) -> bool) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for s in 0..SLOT_COUNT {
        if !pred(s) {
            continue;
        }
        match out.last_mut() {
            Some((_, end)) if usize::from(*end) + 1 == s => *end = s as u16,
            _ => out.push((s as u16, s as u16)),
        }
    }
    out
}

/// The value of `field:` in `INFO` / `CLUSTER INFO` text.
fn info_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The last `n` lines of a file (empty if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process killed (and reaped) on drop, so that a panic anywhere — even half-way
/// through [`TestCluster::start`] — leaves no `redis-server` behind.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.0.as_mut() {
            None => Some("killed by the harness".into()),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown ({e})")),
            },
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The secrets every node shares.
struct Secrets {
    access_key: String,
    admin_password: String,
    replication_password: String,
}

/// One `redis-server` of the cluster.
struct Node {
    index: usize,
    id: String,
    port: u16,
    bus_port: u16,
    child: Mutex<ChildGuard>,
    /// Shared admin connection to the real port (the harness's polls, the front's ACL
    /// commands).
    admin: MultiplexedConnection,
    dir: TempDir,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

/// What every live node should report: the harness's model of the cluster.
#[derive(Clone)]
struct Model {
    /// Slot → index of the master owning it.
    owner: Vec<usize>,
    /// Node → its master (`None` for masters).
    master_of: Vec<Option<usize>>,
    /// Node → announced (front) port.
    front_port: Vec<u16>,
    /// Node → still running.
    alive: Vec<bool>,
    /// Slots half-way through a migration: (slot, from, to).
    migrations: Vec<(u16, usize, usize)>,
    require_full_coverage: bool,
}

impl Model {
    fn live_replicas_of(&self, master: usize) -> Vec<usize> {
        (0..self.master_of.len())
            .filter(|&n| self.alive[n] && self.master_of[n] == Some(master))
            .collect()
    }

    fn slots_of(&self, node: usize) -> Vec<(u16, u16)> {
        if self.master_of[node].is_some() {
            return Vec::new();
        }
        ranges_where(|s| self.owner[s] == node)
    }

    /// `replica` takes over `master`'s slots and replicas; `master` (if alive) follows it.
    fn promote(&mut self, replica: usize, master: usize) {
        for owner in self.owner.iter_mut() {
            if *owner == master {
                *owner = replica;
            }
        }
        for m in self.master_of.iter_mut() {
            if *m == Some(master) {
                *m = Some(replica);
            }
        }
        self.master_of[replica] = None;
        self.master_of[master] = Some(replica);
    }
}

/// A running Redis Cluster behind fake Azure fronts; see the module documentation.
///
/// Operations take `&self` (the cluster can be shared, e.g. in an `Arc`, with tasks that
/// generate traffic or assert), and are serialized among themselves.
pub struct TestCluster {
    // Declared (and so dropped) front-most first.
    /// Node → its current front.
    fronts: Mutex<Vec<Arc<AzureFront>>>,
    nodes: Vec<Node>,
    model: Mutex<Model>,
    /// Serializes operations: each one computes the next model from the current one.
    operation: tokio::sync::Mutex<()>,
    secrets: Secrets,
    options: ClusterOptions,
    started_in: Duration,
    pki: TestPki,
}

impl TestCluster {
    /// Starts the nodes and their fronts, forms the cluster (slots spread over the masters,
    /// `CLUSTER MEET`, `CLUSTER REPLICATE`) and returns once every node reports
    /// `cluster_state:ok` and agrees on the slot map with the fronts' ports, and every replica's
    /// link to its master (through the master's front) is up. Panics, with the nodes' log
    /// tails, if that doesn't happen in bounded time.
    pub async fn start(options: ClusterOptions) -> TestCluster {
        super::install_crypto_provider();
        let started = Instant::now();
        assert!(options.masters >= 1, "a cluster needs at least one master");
        assert!(
            options.replicas_per_master <= 1,
            "replicas_per_master must be 0 or 1 (got {}): with more, which replica wins a \
             failover is up to Redis, and the harness could not predict the roles",
            options.replicas_per_master
        );
        if let Some(issuer) = &options.entra {
            // The fronts verify with the test secret.
            assert_eq!(issuer.secret(), super::token_issuer::TEST_JWT_SECRET);
        }
        let pki = TestPki::for_host_only(CLUSTER_HOST_NAME);
        let secrets = Secrets {
            access_key: format!("AccessKey1x{}", random_hex(24)),
            admin_password: format!("AdminPass{}", random_hex(16)),
            replication_password: format!("ReplPass{}", random_hex(16)),
        };
        let total = options.masters * (1 + options.replicas_per_master);

        // 1. The fronts' listeners first: their ports are what the nodes announce.
        let mut listeners = Vec::new();
        for i in 0..total {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("bind the front of cluster node {i}: {e}"));
            listeners.push(listener);
        }
        let front_ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()
            .unwrap_or_else(|e| panic!("local address of a front listener: {e}"));

        // 2. The nodes, all spawned before waiting for any.
        let nodes = start_nodes(&pki, &secrets, &options, &front_ports).await;

        // 3. The fronts, each with its node's admin connection.
        let auth = front_auth(&options);
        let fronts = listeners
            .into_iter()
            .zip(&nodes)
            .map(|(listener, node)| {
                Arc::new(AzureFront::start_for_node(
                    &pki,
                    listener,
                    node.port,
                    node.admin.clone(),
                    auth.clone(),
                ))
            })
            .collect();

        let masters = options.masters;
        let model = Model {
            owner: (0..masters)
                .flat_map(|m| {
                    let (start, end) = slot_range(m, masters);
                    std::iter::repeat_n(m, usize::from(end - start) + 1)
                })
                .collect(),
            master_of: (0..total)
                .map(|n| (n >= masters).then(|| n % masters))
                .collect(),
            front_port: front_ports,
            alive: vec![true; total],
            migrations: Vec::new(),
            require_full_coverage: options.require_full_coverage,
        };
        let mut cluster = TestCluster {
            fronts: Mutex::new(fronts),
            nodes,
            model: Mutex::new(model),
            operation: tokio::sync::Mutex::new(()),
            secrets,
            options,
            started_in: Duration::ZERO,
            pki,
        };
        cluster.form().await;
        cluster.started_in = started.elapsed();
        cluster
    }

    /// Slots, epochs, `MEET`, `REPLICATE`, then waits for the model.
    async fn form(&self) {
        let masters = self.options.masters;
        let model = self.model();
        for node in &self.nodes {
            // Distinct epochs up front, as `redis-cli --cluster create` does: otherwise the
            // nodes first have to resolve their epoch collisions one by one.
            self.admin_ok(
                node.index,
                redis::cmd("CLUSTER")
                    .arg("SET-CONFIG-EPOCH")
                    .arg(node.index + 1),
            )
            .await;
            if node.index < masters {
                let (start, end) = slot_range(node.index, masters);
                self.admin_ok(
                    node.index,
                    redis::cmd("CLUSTER")
                        .arg("ADDSLOTSRANGE")
                        .arg(start)
                        .arg(end),
                )
                .await;
            }
        }
        // Node 0 meets the other masters and its own replica; every other replica meets its
        // master. The graph is connected, gossip does the rest, and every replica knows its
        // master first-hand (it must, before `CLUSTER REPLICATE`).
        for node in &self.nodes[1..] {
            let (from, to) = match model.master_of[node.index] {
                None | Some(0) => (0, node.index),
                Some(m) => (node.index, m),
            };
            self.admin_ok(
                from,
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(model.front_port[to])
                    .arg(self.nodes[to].bus_port),
            )
            .await;
        }
        // Each replica replicates its master as soon as it knows it.
        let deadline = Instant::now() + FORM_TIMEOUT;
        let mut pending: Vec<usize> = (masters..self.nodes.len()).collect();
        let mut last_error = String::new();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for &r in &pending {
                let Some(m) = model.master_of[r] else {
                    continue;
                };
                let master_id = &self.nodes[m].id;
                let known = match self.try_cluster_nodes(r).await {
                    Ok(lines) => lines
                        .iter()
                        .any(|l| &l.id == master_id && !l.has_flag("handshake")),
                    Err(e) => {
                        last_error = e;
                        false
                    }
                };
                let replicated = known
                    && match redis::cmd("CLUSTER")
                        .arg("REPLICATE")
                        .arg(master_id)
                        .query_async::<()>(&mut self.admin(r))
                        .await
                    {
                        Ok(()) => true,
                        Err(e) => {
                            last_error = format!("CLUSTER REPLICATE on node {r}: {e}");
                            false
                        }
                    };
                if !replicated {
                    still.push(r);
                }
            }
            pending = still;
            if !pending.is_empty() {
                if Instant::now() >= deadline {
                    panic!(
                        "cluster formation: replicas {pending:?} did not get to know their \
                         masters within {FORM_TIMEOUT:?} (last error: {last_error})\n{}",
                        self.logs_tail()
                    );
                }
                tokio::time::sleep(CONVERGENCE_POLL).await;
            }
        }
        self.wait_converged("cluster formation", FORM_TIMEOUT).await;
    }

    /// How long [`Self::start`] took, from the first process to the converged cluster.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The PKI: its CA is what clients trust ([`TestPki::ca_path`] for the proxy's
    /// `--ca-file`), its certificate names only [`Self::host_name`].
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The only name the nodes' (and fronts') certificate is valid for: what a client must
    /// verify every node against (`--tls-server-name`).
    pub fn host_name(&self) -> &str {
        self.pki.server_name()
    }

    /// The access key: the `default` user's password on every node (`AUTH <key>`).
    pub fn access_key(&self) -> &str {
        &self.secrets.access_key
    }

    /// The `admin` user's password on every node.
    pub fn admin_password(&self) -> &str {
        &self.secrets.admin_password
    }

    /// The issuer whose tokens the fronts accept, in Entra mode.
    pub fn issuer(&self) -> Option<&TokenIssuer> {
        self.options.entra.as_ref()
    }

    /// True in Entra mode.
    pub fn is_entra(&self) -> bool {
        self.options.entra.is_some()
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// Number of nodes (masters and replicas, dead ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every node, as every live node agreed after the last operation.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let model = self.model();
        self.nodes
            .iter()
            .map(|n| NodeInfo {
                index: n.index,
                id: n.id.clone(),
                role: if model.master_of[n.index].is_some() {
                    Role::Replica
                } else {
                    Role::Master
                },
                master: model.master_of[n.index],
                port: n.port,
                bus_port: n.bus_port,
                front_port: model.front_port[n.index],
                slots: model.slots_of(n.index),
                alive: model.alive[n.index],
            })
            .collect()
    }

    /// One node (see [`Self::nodes`]).
    pub fn node(&self, index: usize) -> NodeInfo {
        self.check_index(index);
        self.nodes().swap_remove(index)
    }

    /// The indexes of the current masters that are alive.
    pub fn masters(&self) -> Vec<usize> {
        let model = self.model();
        (0..self.nodes.len())
            .filter(|&n| model.alive[n] && model.master_of[n].is_none())
            .collect()
    }

    /// The live replica of `master`, if it has one.
    pub fn replica_of(&self, master: usize) -> Option<usize> {
        self.model().live_replicas_of(master).first().copied()
    }

    /// The master owning `slot`.
    pub fn slot_owner(&self, slot: u16) -> usize {
        self.model().owner[usize::from(slot)]
    }

    /// The master owning `key`'s slot.
    pub fn node_for_key(&self, key: &[u8]) -> usize {
        self.slot_owner(key_slot(key))
    }

    /// The node with this cluster node id.
    pub fn index_of_id(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The node's current front: its counters, auth events, `disconnect_all`.
    pub fn front(&self, node: usize) -> Arc<AzureFront> {
        self.check_index(node);
        self.fronts.lock().unwrap()[node].clone()
    }

    /// The node's announced port (its current front's).
    pub fn front_port(&self, node: usize) -> u16 {
        self.check_index(node);
        self.model().front_port[node]
    }

    /// `127.0.0.1:<front port>`: what a client or the proxy is pointed at (`--upstream`).
    pub fn front_addr(&self, node: usize) -> String {
        format!("127.0.0.1:{}", self.front_port(node))
    }

    /// The node's real TLS port (never announced).
    pub fn real_port(&self, node: usize) -> u16 {
        self.check_index(node);
        self.nodes[node].port
    }

    /// A shared admin connection straight to the node's real port, bypassing its front (for
    /// assertions: `CLIENT LIST`, `ACL LIST`, `CLUSTER COUNTKEYSINSLOT`, …). It has a response
    /// timeout, and fails once the node is dead. Use [`Self::raw_admin`] for `MULTI` or a
    /// connection of your own.
    pub fn admin(&self, node: usize) -> MultiplexedConnection {
        self.check_index(node);
        self.nodes[node].admin.clone()
    }

    /// A new raw connection to the node's real port, authenticated as `admin`.
    pub async fn raw_admin(&self, node: usize) -> RespClient {
        self.check_index(node);
        let mut c = RespClient::connect_tls(self.nodes[node].port, &self.pki).await;
        let reply = c.cmd(&["AUTH", "admin", self.admin_password()]).await;
        assert!(reply.is_ok(), "AUTH admin on node {node}: {reply:?}");
        c
    }

    /// `CLUSTER NODES` of one node, parsed (its own line has the `myself` flag).
    pub async fn cluster_nodes(&self, node: usize) -> Vec<ClusterNodeLine> {
        self.try_cluster_nodes(node)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs_tail()))
    }

    async fn try_cluster_nodes(&self, node: usize) -> Result<Vec<ClusterNodeLine>, String> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut self.admin(node))
            .await
            .map_err(|e| format!("CLUSTER NODES on node {node}: {e}"))?;
        parse_cluster_nodes(&text)
    }

    /// `CLUSTER SLOTS` of one node, parsed, ascending.
    pub async fn cluster_slots(&self, node: usize) -> Vec<SlotRange> {
        let reply: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.admin(node))
            .await
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS on node {node}: {e}\n{}", self.logs_tail()));
        parse_cluster_slots(&reply).unwrap_or_else(|e| panic!("node {node}: {e}"))
    }

    /// The node's log file (in the node's own temporary directory, with its `nodes.conf`).
    pub fn log_path(&self, node: usize) -> PathBuf {
        self.check_index(node);
        self.nodes[node].log_path()
    }

    /// The node's log so far.
    pub fn log(&self, node: usize) -> String {
        self.check_index(node);
        std::fs::read_to_string(self.nodes[node].log_path()).unwrap_or_default()
    }

    /// The last lines of every node's log, labelled: what panic messages include.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "--- node {} (real port {}, redis.log tail) ---\n{}\n",
                node.index,
                node.port,
                tail(&node.log_path(), LOG_TAIL_LINES)
            ));
        }
        out
    }

    /// First half of a slot migration: `CLUSTER SETSLOT <slot> IMPORTING` on `to`, then
    /// `MIGRATING` on `from`. From now on `from` answers `-ASK <slot> <to's front>` for keys of
    /// the slot it no longer has (move some with [`Self::move_keys`]), and `to` serves them
    /// after `ASKING`.
    pub async fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let _op = self.operation.lock().await;
        let mut model = self.model();
        self.check_migration(&model, slot, from, to);
        let slot_arg = usize::from(slot);
        self.admin_ok(
            to,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot_arg)
                .arg("IMPORTING")
                .arg(&self.nodes[from].id),
        )
        .await;
        self.admin_ok(
            from,
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot_arg)
                .arg("MIGRATING")
                .arg(&self.nodes[to].id),
        )
        .await;
        model.migrations.push((slot, from, to));
        self.set_model(model);
        self.wait_converged(
            &format!("begin migration of slot {slot}"),
            OPERATION_TIMEOUT,
        )
        .await;
    }

    /// `MIGRATE`s up to `max` keys of `slot` from `from` to `to` (node to node over TLS, real
    /// ports, `AUTH2 admin`; `REPLACE`). Returns the keys moved (lossy UTF-8), possibly none.
    /// Between [`Self::begin_migration`] and [`Self::finish_migration`], a client asking `from`
    /// for one of them gets `-ASK`.
    pub async fn move_keys(&self, slot: u16, from: usize, to: usize, max: usize) -> Vec<String> {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(usize::from(slot))
            .arg(max)
            .query_async(&mut self.admin(from))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CLUSTER GETKEYSINSLOT {slot} on node {from}: {e}\n{}",
                    self.logs_tail()
                )
            });
        if keys.is_empty() {
            return Vec::new();
        }
        let mut migrate = redis::cmd("MIGRATE");
        migrate
            .arg("127.0.0.1")
            .arg(self.nodes[to].port)
            .arg("")
            .arg(0)
            .arg(ADMIN_RESPONSE_TIMEOUT.as_millis() as u64)
            .arg("REPLACE")
            .arg("AUTH2")
            .arg("admin")
            .arg(self.admin_password())
            .arg("KEYS");
        for k in &keys {
            migrate.arg(k.as_slice());
        }
        let reply: redis::RedisResult<String> = migrate.query_async(&mut self.admin(from)).await;
        match reply {
            Ok(ok) if ok == "OK" => {}
            other => panic!(
                "MIGRATE of {} keys of slot {slot} from node {from} to node {to}: {other:?}\n{}",
                keys.len(),
                self.logs_tail()
            ),
        }
        keys.iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    /// Second half of a slot migration: moves every remaining key of `slot` to `to`, then
    /// `CLUSTER SETSLOT <slot> NODE <to>` on `to`, on `from` and on every other master. Returns
    /// once every node maps the slot to `to`: `from` now answers `-MOVED <slot> <to's front>`.
    pub async fn finish_migration(&self, slot: u16, from: usize, to: usize) {
        let _op = self.operation.lock().await;
        let mut model = self.model();
        assert!(
            model.migrations.contains(&(slot, from, to)),
            "finish_migration({slot}, {from}, {to}) without begin_migration"
        );
        // Keys can't appear in `from` meanwhile: a new key of a migrating slot is `-ASK`ed.
        let mut rounds = 0;
        while !self.move_keys(slot, from, to, 1000).await.is_empty() {
            rounds += 1;
            assert!(
                rounds < 10_000,
                "slot {slot} of node {from} never ran out of keys"
            );
        }
        // The target first (it then bumps its epoch, so its claim wins everywhere), then the
        // source (it stops `-ASK`ing and `-MOVED`s instead), then everybody else.
        let mut order = vec![to, from];
        order.extend(
            (0..self.nodes.len()).filter(|&n| {
                n != to && n != from && model.alive[n] && model.master_of[n].is_none()
            }),
        );
        for n in order {
            self.admin_ok(
                n,
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(usize::from(slot))
                    .arg("NODE")
                    .arg(&self.nodes[to].id),
            )
            .await;
        }
        model.migrations.retain(|m| *m != (slot, from, to));
        model.owner[usize::from(slot)] = to;
        self.set_model(model);
        self.wait_converged(
            &format!("finish migration of slot {slot}"),
            OPERATION_TIMEOUT,
        )
        .await;
    }

    /// [`Self::begin_migration`] then [`Self::finish_migration`]: `slot` moves from `from` to
    /// `to` with all its keys.
    pub async fn migrate_slot(&self, slot: u16, from: usize, to: usize) {
        self.begin_migration(slot, from, to).await;
        self.finish_migration(slot, from, to).await;
    }

    /// A manual failover (`CLUSTER FAILOVER` on `master`'s replica): returns the new master's
    /// index once every node sees the replica as the master of the slots and `master` as its
    /// replica, with `master`'s replication link (through the new master's front) up.
    pub async fn failover(&self, master: usize) -> usize {
        let _op = self.operation.lock().await;
        let mut model = self.model();
        self.check_index(master);
        assert!(
            model.alive[master] && model.master_of[master].is_none(),
            "failover({master}): node {master} is not a live master"
        );
        let Some(&replica) = model.live_replicas_of(master).first() else {
            panic!(
                "failover({master}): node {master} has no live replica (start the cluster with \
                 ClusterOptions::with_replicas(1))"
            )
        };
        self.admin_ok(replica, redis::cmd("CLUSTER").arg("FAILOVER"))
            .await;
        model.promote(replica, master);
        self.set_model(model);
        self.wait_converged(&format!("failover of node {master}"), OPERATION_TIMEOUT)
            .await;
        replica
    }

    /// Moves the node to a new front port, as when an Azure shard's port changes: starts a new
    /// front on a free port, `CONFIG SET cluster-announce-tls-port <new>` on the node, waits
    /// until every node announces the new port (and the node's replicas follow it), then stops
    /// the old front (its port refuses connections; connections through it are closed).
    /// Returns the new port.
    pub async fn move_front(&self, node: usize) -> u16 {
        let (port, old) = self.move_front_keeping_old(node).await;
        old.stop().await;
        port
    }

    /// [`Self::move_front`], but the old front keeps running (and its connections open) until
    /// the caller calls [`AzureFront::stop`] on it or drops it: a node reachable at two ports
    /// for a while.
    pub async fn move_front_keeping_old(&self, node: usize) -> (u16, Arc<AzureFront>) {
        let _op = self.operation.lock().await;
        let mut model = self.model();
        self.check_index(node);
        assert!(model.alive[node], "move_front({node}): node {node} is dead");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind a new front for node {node}: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local address of the new front of node {node}: {e}"))
            .port();
        let front = Arc::new(AzureFront::start_for_node(
            &self.pki,
            listener,
            self.nodes[node].port,
            self.nodes[node].admin.clone(),
            front_auth(&self.options),
        ));
        let old = std::mem::replace(&mut self.fronts.lock().unwrap()[node], front);
        self.admin_ok(
            node,
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("cluster-announce-tls-port")
                .arg(port),
        )
        .await;
        model.front_port[node] = port;
        self.set_model(model);
        self.wait_converged(&format!("move front of node {node}"), OPERATION_TIMEOUT)
            .await;
        (port, old)
    }

    /// Kills the node's process (`SIGKILL`) and stops its front (its port refuses
    /// connections): a dead shard. Returns once every other node flags it `fail` (this takes
    /// about [`ClusterOptions::node_timeout`] to twice that) and, if it was a master with a
    /// replica, once the replica has taken over its slots.
    pub async fn kill_node(&self, node: usize) {
        let _op = self.operation.lock().await;
        let mut model = self.model();
        self.check_index(node);
        assert!(model.alive[node], "kill_node({node}): already dead");
        self.nodes[node].child.lock().unwrap().kill();
        self.front(node).stop().await;
        model.alive[node] = false;
        if model.master_of[node].is_none()
            && let Some(&replica) = model.live_replicas_of(node).first()
        {
            model.promote(replica, node);
            // The others keep listing the dead node as a master (`master,fail`), now without
            // slots: it never tells them otherwise.
            model.master_of[node] = None;
        }
        self.set_model(model);
        let timeout = OPERATION_TIMEOUT + self.options.node_timeout * 4;
        self.wait_converged(&format!("kill node {node}"), timeout)
            .await;
    }

    /// Returns once every live node agrees with the harness's model again (e.g. after a test
    /// disturbed the cluster and put it back). Panics with the first disagreement otherwise.
    pub async fn wait_converged_now(&self) {
        let _op = self.operation.lock().await;
        self.wait_converged("wait_converged_now", OPERATION_TIMEOUT)
            .await;
    }

    fn model(&self) -> Model {
        self.model.lock().unwrap().clone()
    }

    fn set_model(&self, model: Model) {
        *self.model.lock().unwrap() = model;
    }

    fn check_index(&self, node: usize) {
        assert!(
            node < self.nodes.len(),
            "no cluster node {node} (there are {})",
            self.nodes.len()
        );
    }

    fn check_migration(&self, model: &Model, slot: u16, from: usize, to: usize) {
        self.check_index(from);
        self.check_index(to);
        assert!(usize::from(slot) < SLOT_COUNT, "slot {slot} out of range");
        assert_eq!(
            model.owner[usize::from(slot)],
            from,
            "slot {slot} belongs to node {}, not {from}",
            model.owner[usize::from(slot)]
        );
        assert!(
            from != to && model.alive[to] && model.master_of[to].is_none(),
            "migration target {to} must be another live master"
        );
        assert!(
            !model.migrations.iter().any(|m| m.0 == slot),
            "slot {slot} is already being migrated"
        );
    }

    /// Runs an admin command that must reply `+OK`; panics with the logs otherwise.
    async fn admin_ok(&self, node: usize, cmd: &redis::Cmd) {
        let reply: redis::RedisResult<redis::Value> = cmd.query_async(&mut self.admin(node)).await;
        match reply {
            Ok(redis::Value::Okay) => {}
            Ok(redis::Value::SimpleString(s)) if s == "OK" => {}
            other => panic!(
                "{} on cluster node {node}: {other:?}\n{}",
                String::from_utf8_lossy(&cmd.get_packed_command()).replace("\r\n", " "),
                self.logs_tail()
            ),
        }
    }

    /// Polls [`Self::check_converged`] until it passes; panics with the last disagreement and
    /// the logs after `timeout`.
    async fn wait_converged(&self, what: &str, timeout: Duration) {
        let model = self.model();
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.check_converged(&model).await {
                Ok(()) => return,
                Err(e) => e,
            };
            if std::env::var_os("CLUSTER_DEBUG").is_some() {
                eprintln!("{:?} {what}: {last}", Instant::now());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: the cluster did not converge within {timeout:?}; last \
                     disagreement: {last}\n{}",
                    self.logs_tail()
                );
            }
            tokio::time::sleep(CONVERGENCE_POLL).await;
        }
    }

    /// Checks every live node's view against the model; the first disagreement is the error.
    async fn check_converged(&self, model: &Model) -> Result<(), String> {
        for v in (0..self.nodes.len()).filter(|&n| model.alive[n]) {
            let (nodes_text, info_text, slots_reply, repl_text): (
                String,
                String,
                redis::Value,
                String,
            ) = redis::pipe()
                .cmd("CLUSTER")
                .arg("NODES")
                .cmd("CLUSTER")
                .arg("INFO")
                .cmd("CLUSTER")
                .arg("SLOTS")
                .cmd("INFO")
                .arg("replication")
                .query_async(&mut self.admin(v))
                .await
                .map_err(|e| format!("querying node {v}: {e}"))?;
            let lines = parse_cluster_nodes(&nodes_text)?;
            let slots = parse_cluster_slots(&slots_reply)?;
            self.check_view(v, model, &lines, &info_text, &slots, &repl_text)
                .map_err(|e| format!("node {v} (real port {}): {e}", self.nodes[v].port))?;
        }
        Ok(())
    }

    fn check_view(
        &self,
        v: usize,
        model: &Model,
        lines: &[ClusterNodeLine],
        cluster_info: &str,
        slots: &[SlotRange],
        replication: &str,
    ) -> Result<(), String> {
        let total = self.nodes.len();
        // CLUSTER INFO.
        let uncovered = model.owner.iter().any(|&o| !model.alive[o]);
        let expected_state = if uncovered && model.require_full_coverage {
            "fail"
        } else {
            "ok"
        };
        let state = info_field(cluster_info, "cluster_state").unwrap_or("?");
        if state != expected_state {
            return Err(format!("cluster_state:{state}, expected {expected_state}"));
        }
        if lines.len() != total {
            return Err(format!(
                "CLUSTER NODES has {} nodes, expected {total}",
                lines.len()
            ));
        }
        // CLUSTER NODES, node by node.
        for node in &self.nodes {
            let n = node.index;
            let line = lines
                .iter()
                .find(|l| l.id == node.id)
                .ok_or_else(|| format!("CLUSTER NODES has no node {n} ({})", node.id))?;
            if !model.alive[n] {
                if !line.has_flag("fail") {
                    return Err(format!("dead node {n} not flagged fail: {:?}", line.flags));
                }
                continue;
            }
            if line.ip != "127.0.0.1"
                || line.port != model.front_port[n]
                || line.bus_port != node.bus_port
            {
                return Err(format!(
                    "node {n} at {}:{}@{}, expected 127.0.0.1:{}@{}",
                    line.ip, line.port, line.bus_port, model.front_port[n], node.bus_port
                ));
            }
            if let Some(flag) = ["fail", "fail?", "handshake", "noaddr"]
                .iter()
                .find(|f| line.has_flag(f))
            {
                return Err(format!("node {n} flagged {flag}"));
            }
            if n != v && line.link != "connected" {
                return Err(format!("link to node {n} is {}", line.link));
            }
            match model.master_of[n] {
                None if !line.has_flag("master") => {
                    return Err(format!("node {n} should be a master: {:?}", line.flags));
                }
                Some(m)
                    if !line.has_flag("slave")
                        || line.master.as_ref() != Some(&self.nodes[m].id) =>
                {
                    return Err(format!(
                        "node {n} should replicate node {m}: flags {:?}, master {:?}",
                        line.flags, line.master
                    ));
                }
                _ => {}
            }
            let expected_slots = model.slots_of(n);
            if line.slots != expected_slots {
                return Err(format!(
                    "node {n} owns {:?}, expected {expected_slots:?}",
                    line.slots
                ));
            }
            if n == v {
                let id_of = |i: usize| self.nodes[i].id.clone();
                let mut migrating: Vec<(u16, String)> = model
                    .migrations
                    .iter()
                    .filter(|m| m.1 == v)
                    .map(|m| (m.0, id_of(m.2)))
                    .collect();
                let mut importing: Vec<(u16, String)> = model
                    .migrations
                    .iter()
                    .filter(|m| m.2 == v)
                    .map(|m| (m.0, id_of(m.1)))
                    .collect();
                migrating.sort();
                importing.sort();
                let (mut seen_m, mut seen_i) = (line.migrating.clone(), line.importing.clone());
                seen_m.sort();
                seen_i.sort();
                if seen_m != migrating || seen_i != importing {
                    return Err(format!(
                        "migrating {seen_m:?} / importing {seen_i:?}, expected {migrating:?} / \
                         {importing:?}"
                    ));
                }
            }
        }
        // CLUSTER SLOTS, slot by slot (slots of dead masters are not checked).
        let mut seen: Vec<Option<&SlotRange>> = vec![None; SLOT_COUNT];
        for range in slots {
            let end = usize::from(range.end).min(SLOT_COUNT - 1);
            if let Some(window) = seen.get_mut(usize::from(range.start)..=end) {
                window.fill(Some(range));
            }
        }
        let mut expected_cache: BTreeMap<usize, (u16, Vec<u16>)> = BTreeMap::new();
        for (s, seen) in seen.iter().enumerate() {
            let owner = model.owner[s];
            if !model.alive[owner] {
                continue;
            }
            let (master_port, replica_ports) = expected_cache.entry(owner).or_insert_with(|| {
                let mut r: Vec<u16> = model
                    .live_replicas_of(owner)
                    .iter()
                    .map(|&r| model.front_port[r])
                    .collect();
                r.sort_unstable();
                (model.front_port[owner], r)
            });
            let Some(range) = seen else {
                return Err(format!("CLUSTER SLOTS does not cover slot {s}"));
            };
            let mut ports: Vec<u16> = range.replicas.iter().map(|r| r.port).collect();
            ports.sort_unstable();
            if range.master.id != self.nodes[owner].id
                || range.master.ip != "127.0.0.1"
                || range.master.port != *master_port
                || ports != *replica_ports
                || range.replicas.iter().any(|r| r.ip != "127.0.0.1")
            {
                return Err(format!(
                    "CLUSTER SLOTS gives slot {s} to {range:?}; expected node {owner} at \
                     127.0.0.1:{master_port} with replicas at {replica_ports:?}"
                ));
            }
        }
        // INFO replication: replicas are linked to their master's *front*.
        let role = info_field(replication, "role").unwrap_or("?");
        match model.master_of[v] {
            Some(m) => {
                let port = info_field(replication, "master_port").unwrap_or("?");
                let link = info_field(replication, "master_link_status").unwrap_or("?");
                if role != "slave" || port != model.front_port[m].to_string() || link != "up" {
                    return Err(format!(
                        "INFO replication: role:{role} master_port:{port} \
                         master_link_status:{link}, expected slave of node {m}'s front port {} \
                         with the link up",
                        model.front_port[m]
                    ));
                }
            }
            None => {
                let replicas = info_field(replication, "connected_slaves").unwrap_or("?");
                let expected = model.live_replicas_of(v).len().to_string();
                if role != "master" || replicas != expected {
                    return Err(format!(
                        "INFO replication: role:{role} connected_slaves:{replicas}, expected \
                         master with {expected}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How the fronts treat `AUTH` in this cluster's mode.
fn front_auth(options: &ClusterOptions) -> FrontAuth {
    match options.entra {
        Some(_) => FrontAuth::Entra {
            passthrough_users: vec![REPLICATION_USER.to_string()],
        },
        None => FrontAuth::Relay,
    }
}

/// `redis.conf` of one node. The settings that are not obvious:
///
/// * `port 0`: TLS only; `tls-cluster` / `tls-replication`: the bus, replication and `MIGRATE`
///   use TLS too (with the same host-only certificate; Redis checks the chain, not the name).
/// * `cluster-announce-tls-port` is the front's port; `cluster-port` and
///   `cluster-announce-bus-port` are the same real bus port (the bus bypasses the fronts).
/// * `repl-diskless-sync-delay 0`: a replica's first sync starts at once (the default waits 5 s
///   for more replicas).
/// * `repl-ping-replica-period 1`: `CLUSTER SLOTS` lists a replica only once its replication
///   offset is non-zero (`isReplicaAvailable`), and on an idle master only the master's
///   periodic `PING` moves the offset: with the default 10 s the cluster "forms" 10 s late.
/// * `cluster-replica-validity-factor 0`: a replica may always be promoted, however long its
///   link was down (tests kill and stop things). `cluster-allow-replica-migration no`: the
///   roles stay where the harness put them.
/// * `masteruser` / `masterauth`: the replication user, passed through by Entra fronts.
fn node_config(
    dir: &Path,
    pki: &TestPki,
    secrets: &Secrets,
    options: &ClusterOptions,
    port: u16,
    bus_port: u16,
    front_port: u16,
) -> String {
    format!(
        "bind 127.0.0.1\n\
         port 0\n\
         tls-port {port}\n\
         tls-cert-file {cert}\n\
         tls-key-file {key_file}\n\
         tls-ca-cert-file {ca}\n\
         tls-auth-clients no\n\
         tls-cluster yes\n\
         tls-replication yes\n\
         cluster-enabled yes\n\
         cluster-config-file nodes.conf\n\
         cluster-port {bus_port}\n\
         cluster-announce-ip 127.0.0.1\n\
         cluster-announce-tls-port {front_port}\n\
         cluster-announce-bus-port {bus_port}\n\
         cluster-node-timeout {node_timeout}\n\
         cluster-require-full-coverage {coverage}\n\
         cluster-replica-validity-factor 0\n\
         cluster-allow-replica-migration no\n\
         repl-diskless-sync yes\n\
         repl-diskless-sync-delay 0\n\
         repl-ping-replica-period 1\n\
         masteruser {repl_user}\n\
         masterauth {repl_password}\n\
         save \"\"\n\
         appendonly no\n\
         dir {dir}\n\
         logfile {dir}/redis.log\n\
         daemonize no\n\
         protected-mode no\n\
         enable-debug-command local\n\
         user default on >{access_key} ~* &* +@all\n\
         user admin on >{admin} ~* &* +@all\n\
         user {repl_user} on >{repl_password} +psync +replconf +ping\n",
        cert = pki.cert_path().display(),
        key_file = pki.key_path().display(),
        ca = pki.ca_path().display(),
        dir = dir.display(),
        node_timeout = options.node_timeout.as_millis(),
        coverage = if options.require_full_coverage {
            "yes"
        } else {
            "no"
        },
        repl_user = REPLICATION_USER,
        repl_password = secrets.replication_password,
        access_key = secrets.access_key,
        admin = secrets.admin_password,
    )
}

/// A node process that was spawned but may not be ready yet.
struct Spawned {
    dir: TempDir,
    port: u16,
    bus_port: u16,
    child: ChildGuard,
}

/// Writes the config for fresh ports and spawns `redis-server` (without waiting).
fn spawn_node(
    dir: TempDir,
    pki: &TestPki,
    secrets: &Secrets,
    options: &ClusterOptions,
    front_port: u16,
) -> Spawned {
    let port = free_port();
    let mut bus_port = free_port();
    while bus_port == port {
        bus_port = free_port();
    }
    let conf = node_config(
        dir.path(),
        pki,
        secrets,
        options,
        port,
        bus_port,
        front_port,
    );
    let conf_path = dir.path().join("redis.conf");
    std::fs::write(&conf_path, conf)
        .unwrap_or_else(|e| panic!("write {}: {e}", conf_path.display()));
    // A fresh start: no node id or slots from an earlier attempt.
    let _ = std::fs::remove_file(dir.path().join("nodes.conf"));
    let _ = std::fs::remove_file(dir.path().join("redis.log"));
    let child = Command::new(redis_server_binary())
        .arg(&conf_path)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("spawn redis-server (is it installed? apt-get install -y redis-server): {e}")
        });
    Spawned {
        dir,
        port,
        bus_port,
        child: ChildGuard(Some(child)),
    }
}

/// A new admin connection (TLS verified for the PKI's host name, `AUTH admin …`) to a real
/// port, with [`ADMIN_RESPONSE_TIMEOUT`].
async fn connect_admin(
    pki: &TestPki,
    port: u16,
    admin_password: &str,
) -> Result<MultiplexedConnection, String> {
    let attempt = async {
        let tls = pki
            .connect(port)
            .await
            .map_err(|e| format!("TLS connect to 127.0.0.1:{port}: {e}"))?;
        let info = redis::RedisConnectionInfo {
            username: Some("admin".into()),
            password: Some(admin_password.to_string()),
            ..Default::default()
        };
        let config = AsyncConnectionConfig::new().set_response_timeout(ADMIN_RESPONSE_TIMEOUT);
        let (con, driver) = MultiplexedConnection::new_with_config(&info, tls, config)
            .await
            .map_err(|e| format!("admin login on 127.0.0.1:{port}: {e}"))?;
        tokio::spawn(driver);
        Ok(con)
    };
    tokio::time::timeout(ADMIN_RESPONSE_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("admin connection to 127.0.0.1:{port} timed out")))
}

/// Polls until the spawned node answers `PING` on an admin connection (→ that connection), or
/// it exited (→ error: probably a port taken meanwhile), or time is up (→ error).
async fn wait_node_ready(
    spawned: &mut Spawned,
    pki: &TestPki,
    secrets: &Secrets,
) -> Result<MultiplexedConnection, String> {
    let deadline = Instant::now() + NODE_STARTUP_TIMEOUT;
    let mut last = String::from("not tried");
    while Instant::now() < deadline {
        if let Some(status) = spawned.child.exited() {
            return Err(format!("redis-server exited early: {status}"));
        }
        match connect_admin(pki, spawned.port, &secrets.admin_password).await {
            Ok(mut con) => match redis::cmd("PING").query_async::<String>(&mut con).await {
                Ok(_) => return Ok(con),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(super::POLL_INTERVAL).await;
    }
    Err(format!("not ready after {NODE_STARTUP_TIMEOUT:?}: {last}"))
}

/// Starts every node (all spawned first, so they boot in parallel), retrying a node on fresh
/// ports when it could not start (its ports were picked by binding port 0 and releasing it:
/// another process may have taken one in between).
async fn start_nodes(
    pki: &TestPki,
    secrets: &Secrets,
    options: &ClusterOptions,
    front_ports: &[u16],
) -> Vec<Node> {
    const ATTEMPTS: usize = 5;
    let mut spawned: Vec<Spawned> = front_ports
        .iter()
        .enumerate()
        .map(|(i, &front_port)| {
            let dir = tempfile::Builder::new()
                .prefix(&format!("test-redis-cluster-{i}-"))
                .tempdir()
                .unwrap_or_else(|e| panic!("create temp dir for cluster node {i}: {e}"));
            spawn_node(dir, pki, secrets, options, front_port)
        })
        .collect();
    let mut admins = Vec::new();
    for (i, s) in spawned.iter_mut().enumerate() {
        let mut attempt = 1;
        let admin = loop {
            match wait_node_ready(s, pki, secrets).await {
                Ok(admin) => break admin,
                Err(e) if attempt >= ATTEMPTS => panic!(
                    "cluster node {i} did not start after {ATTEMPTS} attempts: {e}\n--- \
                     redis.log ---\n{}",
                    tail(&s.dir.path().join("redis.log"), 40)
                ),
                Err(_) => {
                    attempt += 1;
                    s.child.kill();
                    let dir = std::mem::replace(
                        &mut s.dir,
                        tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}")),
                    );
                    *s = spawn_node(dir, pki, secrets, options, front_ports[i]);
                }
            }
        };
        admins.push(admin);
    }
    let mut nodes = Vec::new();
    for (index, (s, mut admin)) in spawned.into_iter().zip(admins).enumerate() {
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CLUSTER MYID on cluster node {index}: {e}\n{}",
                    tail(&s.dir.path().join("redis.log"), 40)
                )
            });
        nodes.push(Node {
            index,
            id,
            port: s.port,
            bus_port: s.bus_port,
            child: Mutex::new(s.child),
            admin,
            dir: s.dir,
        });
    }
    nodes
}
