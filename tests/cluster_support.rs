//! Proves that the Redis Cluster harness (`tests/support/cluster.rs`) behaves as intended, with
//! real clients talking to the fake Azure fronts directly (no proxy): the cluster forms and
//! serves every slot, it announces the fronts, its certificate names only the host, Entra
//! fronts close connections at token expiry per node, migrations show `ASK` then `MOVED`,
//! failover swaps roles (replication runs through the fronts), a node can move to a new port,
//! a killed node takes only its own slots down, and start and teardown are bounded.
//!
//! The `redis` crate's cluster client verifies a node's certificate against the address it
//! dials, and the nodes are `127.0.0.1:<port>` while the certificate names only `cache.test`:
//! it has no option for one TLS server name for all nodes. So these tests give it
//! `danger_accept_invalid_hostnames` (the chain is still verified against the test CA), and
//! show that without it the same client fails — which is the very problem the proxy's cluster
//! mode solves.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::cluster::{SLOT_COUNT, parse_cluster_slots};
use support::{
    AzureFront, ClusterOptions, RespClient, Role, TestCluster, TokenIssuer, Value, key_for_slot,
    key_slot, random_uuid, wait_until_async,
};

/// What any start of a test cluster must stay under, even on a slow 2-core CI machine (it takes
/// about 2–3 s).
const START_BOUND: Duration = Duration::from_secs(20);

/// A `redis` crate cluster client seeded with node 0's front, trusting the test CA, logging in
/// as `user` (None: the `default` user) with `password`. `relaxed`: accept a certificate whose
/// name doesn't match the dialled IP (see the module documentation).
fn cluster_client(
    cluster: &TestCluster,
    user: Option<&str>,
    password: &str,
    relaxed: bool,
) -> redis::cluster::ClusterClient {
    let mut builder = redis::cluster::ClusterClientBuilder::new(vec![format!(
        "rediss://{}/",
        cluster.front_addr(0)
    )])
    .password(password.to_string())
    .certs(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(cluster.pki().ca_pem().as_bytes().to_vec()),
    })
    .danger_accept_invalid_hostnames(relaxed)
    .connection_timeout(Duration::from_secs(5))
    .response_timeout(Duration::from_secs(5));
    if let Some(user) = user {
        builder = builder.username(user.to_string());
    }
    builder.build().expect("build the cluster client")
}

/// A raw connection to the node's front, logged in with the access key.
async fn front_client(cluster: &TestCluster, node: usize) -> RespClient {
    let mut c = RespClient::connect_tls(cluster.front_port(node), cluster.pki()).await;
    let reply = c.cmd(&["AUTH", cluster.access_key()]).await;
    assert!(
        reply.is_ok(),
        "AUTH with the access key on node {node}'s front: {reply:?}"
    );
    c
}

/// One key per slot, `key:<n>`, for all 16384 slots.
fn keys_for_every_slot() -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; SLOT_COUNT];
    let mut missing = SLOT_COUNT;
    for n in 0u64.. {
        let key = format!("key:{n}");
        let slot = usize::from(key_slot(key.as_bytes()));
        if keys[slot].is_none() {
            keys[slot] = Some(key);
            missing -= 1;
            if missing == 0 {
                break;
            }
        }
    }
    keys.into_iter().map(|k| k.unwrap_or_default()).collect()
}

/// The `-MOVED`/`-ASK` error a node should answer for `slot` served at `port`.
fn redirect(kind: &str, slot: u16, port: u16) -> String {
    format!("{kind} {slot} 127.0.0.1:{port}")
}

/// A master other than `node`.
fn other_master(cluster: &TestCluster, node: usize) -> usize {
    cluster
        .masters()
        .into_iter()
        .find(|&m| m != node)
        .expect("another master")
}

#[tokio::test]
async fn cluster_forms_and_a_cluster_client_reads_and_writes_every_slot() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    eprintln!("3-master cluster started in {:?}", cluster.started_in());
    assert!(cluster.started_in() < START_BOUND);

    // Three masters, all 16384 slots, announced at their fronts.
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 3);
    let covered: usize = nodes
        .iter()
        .flat_map(|n| &n.slots)
        .map(|(a, b)| usize::from(b - a) + 1)
        .sum();
    assert_eq!(covered, SLOT_COUNT);
    for n in &nodes {
        assert_eq!(n.role, Role::Master);
        assert_ne!(
            n.front_port, n.port,
            "node {} announces its real port",
            n.index
        );
    }

    // Our CRC16 is Redis's (hash tags included).
    let mut admin = cluster.admin(0);
    for key in [
        "", "a", "key:1", "{user}:1", "x{user}y", "{}x", "a{}{b}", "{a", "}{a}",
    ] {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut admin)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(key_slot(key.as_bytes()), slot, "slot of {key:?}");
    }

    // Strict name verification fails: the client verifies 127.0.0.1, the certificate names
    // only cache.test.
    let strict = cluster_client(&cluster, None, cluster.access_key(), false)
        .get_async_connection()
        .await;
    let Err(e) = strict else {
        panic!("the redis crate verified cache.test's certificate for 127.0.0.1");
    };
    eprintln!("strict cluster client, as expected: {e}");

    // With the name check relaxed (chain still verified), one key in every slot.
    let con = cluster_client(&cluster, None, cluster.access_key(), true)
        .get_async_connection()
        .await
        .expect("cluster client connection through the fronts");
    let keys = Arc::new(keys_for_every_slot());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    const TASKS: usize = 8;
    for t in 0..TASKS {
        let mut con = con.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            for key in keys.iter().skip(t).step_by(TASKS) {
                let () = redis::cmd("SET")
                    .arg(key)
                    .arg(format!("v-{key}"))
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("SET {key}: {e}"));
            }
            for key in keys.iter().skip(t).step_by(TASKS) {
                let v: String = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("GET {key}: {e}"));
                assert_eq!(v, format!("v-{key}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a writer task panicked");
    }
    eprintln!("16384 SET + GET in {:?}", started.elapsed());

    // Each key landed on the master the harness says owns its slot, through that master's
    // front.
    for n in &nodes {
        let expected = keys
            .iter()
            .filter(|k| cluster.node_for_key(k.as_bytes()) == n.index)
            .count();
        let size: usize = redis::cmd("DBSIZE")
            .query_async(&mut cluster.admin(n.index))
            .await
            .expect("DBSIZE");
        assert_eq!(size, expected, "keys on node {}", n.index);
        assert!(
            cluster.front(n.index).connections_total() > 0,
            "nobody came through node {}'s front",
            n.index
        );
    }
}

#[tokio::test]
async fn cluster_slots_name_the_fronts_and_the_certificate_names_only_the_host() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let pki = cluster.pki();
    assert_eq!(cluster.host_name(), "cache.test");

    // CLUSTER SLOTS through a front: every endpoint is a front, never a real port.
    let mut c = front_client(&cluster, 1).await;
    let reply = c.cmd(&["CLUSTER", "SLOTS"]).await;
    let ranges = reply
        .as_array()
        .expect("CLUSTER SLOTS is an array")
        .to_vec();
    assert_eq!(ranges.len(), 3, "{reply:?}");
    let fronts: Vec<u16> = (0..3).map(|n| cluster.front_port(n)).collect();
    let reals: Vec<u16> = (0..3).map(|n| cluster.real_port(n)).collect();
    for range in &ranges {
        let items = range.as_array().expect("a slot range");
        let endpoint = items[2].as_array().expect("an endpoint");
        assert_eq!(endpoint[0], Value::bulk("127.0.0.1"));
        let port = endpoint[1].as_int().expect("a port") as u16;
        assert!(fronts.contains(&port), "{port} is not a front ({fronts:?})");
        assert!(!reals.contains(&port));
    }
    // … and every node agrees (the parsed view, from each node directly).
    for n in 0..3 {
        for range in cluster.cluster_slots(n).await {
            let owner = cluster.slot_owner(range.start);
            assert_eq!(range.master.port, cluster.front_port(owner));
            assert_eq!(range.master.id, cluster.node(owner).id);
        }
    }
    // CLUSTER NODES names the fronts too.
    let nodes_text = c.cmd(&["CLUSTER", "NODES"]).await;
    let text = nodes_text.as_str().expect("CLUSTER NODES text");
    for n in 0..3 {
        assert!(text.contains(&format!("127.0.0.1:{}@", cluster.front_port(n))));
        assert!(!text.contains(&format!("127.0.0.1:{}@", cluster.real_port(n))));
    }

    // A key of node 2 asked at node 0's front: -MOVED to node 2's front.
    let key = key_for_slot(cluster.node(2).slots[0].0);
    let mut c0 = front_client(&cluster, 0).await;
    let moved = c0.cmd(&["GET", &key]).await;
    assert_eq!(
        moved.error(),
        Some(redirect("MOVED", key_slot(key.as_bytes()), cluster.front_port(2)).as_str()),
        "{moved:?}"
    );

    // The certificate (fronts and nodes alike) passes for cache.test only.
    for port in [cluster.front_port(0), cluster.real_port(0)] {
        assert!(pki.connect_verifying(port, "cache.test").await.is_ok());
        let err = match pki.connect_verifying(port, "127.0.0.1").await {
            Ok(_) => panic!("port {port}: the certificate passed for 127.0.0.1"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("not valid for name \"127.0.0.1\""), "{err}");
        assert!(pki.connect_verifying(port, "localhost").await.is_err());
    }
    // A plain redis crate client to 127.0.0.1 fails the same way.
    let url = format!(
        "rediss://:{}@{}/",
        cluster.access_key(),
        cluster.front_addr(0)
    );
    let single = redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.ca_pem().as_bytes().to_vec()),
        },
    )
    .expect("client")
    .get_multiplexed_async_connection()
    .await;
    assert!(
        single.is_err(),
        "the redis crate accepted cache.test for 127.0.0.1"
    );
}

#[tokio::test]
async fn entra_fronts_keep_token_users_per_node_and_close_connections_at_token_expiry() {
    let issuer = TokenIssuer::new(&random_uuid(), Duration::from_secs(120));
    let cluster = TestCluster::start(ClusterOptions::entra(&issuer)).await;
    assert!(cluster.is_entra());
    let oid = issuer.oid();

    // A short-lived token on node 1's front.
    let token = issuer.mint_with_lifetime(Duration::from_secs(2));
    let user = AzureFront::redis_user_for(&token);
    let mut c = RespClient::connect_tls(cluster.front_port(1), cluster.pki()).await;
    assert_eq!(c.cmd(&["AUTH", oid, &token]).await, Value::ok());
    let key = key_for_slot(cluster.node(1).slots[0].0);
    assert_eq!(c.cmd(&["SET", &key, "v"]).await, Value::ok());
    let authed = Instant::now();

    // The token user exists on node 1 only: ACLs are per node.
    for n in 0..3 {
        let acl: redis::Value = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(&user)
            .query_async(&mut cluster.admin(n))
            .await
            .expect("ACL GETUSER");
        assert_eq!(
            acl == redis::Value::Nil,
            n != 1,
            "token user on node {n}: {acl:?}"
        );
    }
    let on_node_1: Vec<String> = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async::<String>(&mut cluster.admin(1))
        .await
        .expect("CLIENT LIST")
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .map(str::to_string)
        .collect();
    assert!(on_node_1.contains(&user), "{on_node_1:?}");

    // A forged token is refused, in order.
    let mut f = RespClient::connect_tls(cluster.front_port(1), cluster.pki()).await;
    assert!(
        f.cmd(&["AUTH", oid, &issuer.mint_forged()])
            .await
            .is_error_code("WRONGPASS")
    );

    // The front closes the connection when the token expires.
    let closed = c.wait_closed(Duration::from_secs(10)).await;
    assert!(
        closed.is_some(),
        "connection still open 10 s after a 2-s token"
    );
    let lived = authed.elapsed();
    eprintln!("closed {lived:?} after AUTH with a 2-s token");
    assert!(lived >= Duration::from_millis(900), "{lived:?}");
    assert_eq!(cluster.front(1).tokens_expired(), 1);
    assert!(cluster.front(1).connections_closed_by_server() >= 1);

    // A cluster client with a long-lived token authenticates on every node's front.
    let long = issuer.mint();
    let mut con = cluster_client(&cluster, Some(oid), &long, true)
        .get_async_connection()
        .await
        .expect("cluster client with a token");
    for m in 0..3 {
        let key = key_for_slot(cluster.node(m).slots[0].0);
        let () = redis::cmd("SET")
            .arg(&key)
            .arg("t")
            .query_async(&mut con)
            .await
            .expect("SET with a token");
        assert!(
            cluster.front(m).auth_accepted() >= 1,
            "no token AUTH on node {m}'s front"
        );
    }
}

#[tokio::test]
async fn slot_migration_gives_ask_then_moved_while_a_cluster_client_keeps_working() {
    let cluster = Arc::new(TestCluster::start(ClusterOptions::access_key()).await);
    let keys: Vec<String> = (0..20).map(|i| format!("{{mig}}:{i}")).collect();
    let slot = key_slot(keys[0].as_bytes());
    let from = cluster.slot_owner(slot);
    let to = other_master(&cluster, from);
    let (from_port, to_port) = (cluster.front_port(from), cluster.front_port(to));

    let mut src = front_client(&cluster, from).await;
    let mut dst = front_client(&cluster, to).await;
    for k in &keys {
        assert_eq!(src.cmd(&["SET", k, &format!("v-{k}")]).await, Value::ok());
    }

    // Traffic on the slot throughout, through a cluster client (it follows ASK and MOVED).
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let traffic = {
        let mut con = cluster_client(&cluster, None, cluster.access_key(), true)
            .get_async_connection()
            .await
            .expect("cluster client");
        let (stop, ops, keys) = (stop.clone(), ops.clone(), keys.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let k = &keys[i % keys.len()];
                let v: String = redis::cmd("GET")
                    .arg(k)
                    .query_async(&mut con)
                    .await
                    .unwrap_or_else(|e| panic!("GET {k} during the migration: {e}"));
                assert_eq!(v, format!("v-{k}"));
                ops.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };

    cluster.begin_migration(slot, from, to).await;
    // Keys still in the source are served there; a key it doesn't have is -ASKed.
    assert_eq!(
        src.cmd(&["GET", &keys[0]]).await,
        Value::bulk(format!("v-{}", keys[0]))
    );
    let absent = src.cmd(&["GET", "{mig}:absent"]).await;
    assert_eq!(
        absent.error(),
        Some(redirect("ASK", slot, to_port).as_str())
    );

    let moved = cluster.move_keys(slot, from, to, 5).await;
    assert_eq!(moved.len(), 5);
    let asked = src.cmd(&["GET", &moved[0]]).await;
    assert_eq!(asked.error(), Some(redirect("ASK", slot, to_port).as_str()));
    // The target serves it only after ASKING; otherwise it sends the client back.
    let not_yet = dst.cmd(&["GET", &moved[0]]).await;
    assert_eq!(
        not_yet.error(),
        Some(redirect("MOVED", slot, from_port).as_str())
    );
    assert_eq!(dst.cmd(&["ASKING"]).await, Value::ok());
    assert_eq!(
        dst.cmd(&["GET", &moved[0]]).await,
        Value::bulk(format!("v-{}", moved[0]))
    );

    cluster.finish_migration(slot, from, to).await;
    assert_eq!(cluster.slot_owner(slot), to);
    let after = src.cmd(&["GET", &keys[0]]).await;
    assert_eq!(
        after.error(),
        Some(redirect("MOVED", slot, to_port).as_str())
    );
    for k in &keys {
        assert_eq!(dst.cmd(&["GET", k]).await, Value::bulk(format!("v-{k}")));
    }
    for n in cluster.masters() {
        let reply: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut cluster.admin(n))
            .await
            .expect("CLUSTER SLOTS");
        let ranges = parse_cluster_slots(&reply).expect("parse CLUSTER SLOTS");
        let range = ranges
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .expect("slot covered");
        assert_eq!(range.master.port, to_port, "node {n}'s view of slot {slot}");
    }

    // And back again in one step.
    cluster.migrate_slot(slot, to, from).await;
    assert_eq!(cluster.slot_owner(slot), from);
    assert_eq!(
        src.cmd(&["GET", &keys[1]]).await,
        Value::bulk(format!("v-{}", keys[1]))
    );

    stop.store(true, Ordering::SeqCst);
    traffic.await.expect("the traffic task failed");
    assert!(ops.load(Ordering::SeqCst) > 0);
    eprintln!(
        "{} GETs through the cluster client during the migrations",
        ops.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn failover_swaps_roles_and_replication_runs_through_the_fronts() {
    let issuer = TokenIssuer::new(&random_uuid(), Duration::from_secs(120));
    let cluster = TestCluster::start(ClusterOptions::entra(&issuer).with_replicas(1)).await;
    eprintln!(
        "3 masters + 3 replicas (Entra) started in {:?}",
        cluster.started_in()
    );
    assert!(cluster.started_in() < START_BOUND);
    assert_eq!(cluster.len(), 6);
    let master = 0;
    let replica = cluster.replica_of(master).expect("node 0 has a replica");
    assert_eq!(replica, 3);
    assert_eq!(cluster.node(replica).role, Role::Replica);

    // The replica logged in to its master through the master's front, as the passthrough
    // replication user.
    assert!(cluster.front(master).auth_passed_through() >= 1);
    assert_eq!(cluster.front(master).auth_rejected(), 0);

    // A write on the master reaches the replica.
    let oid = issuer.oid();
    let token = issuer.mint();
    let key = key_for_slot(cluster.node(master).slots[0].0);
    let slot = key_slot(key.as_bytes());
    let mut c = RespClient::connect_tls(cluster.front_port(master), cluster.pki()).await;
    assert_eq!(c.cmd(&["AUTH", oid, &token]).await, Value::ok());
    assert_eq!(c.cmd(&["SET", &key, "before"]).await, Value::ok());
    assert_eq!(c.cmd(&["WAIT", "1", "5000"]).await, Value::Int(1));

    let started = Instant::now();
    let new_master = cluster.failover(master).await;
    eprintln!("failover converged in {:?}", started.elapsed());
    assert_eq!(new_master, replica);
    let (old, new) = (cluster.node(master), cluster.node(new_master));
    assert_eq!(new.role, Role::Master);
    assert!(new.slots.iter().any(|&(a, b)| a <= slot && slot <= b));
    assert_eq!(old.role, Role::Replica);
    assert_eq!(old.master, Some(new_master));
    assert!(old.slots.is_empty());
    for n in 0..cluster.len() {
        let lines = cluster.cluster_nodes(n).await;
        let line = |id: &str| {
            lines
                .iter()
                .find(|l| l.id == id)
                .unwrap_or_else(|| panic!("node {n} doesn't know {id}"))
                .clone()
        };
        assert!(line(&new.id).has_flag("master"), "node {n}");
        assert!(line(&old.id).has_flag("slave"), "node {n}");
        assert_eq!(line(&old.id).master.as_deref(), Some(new.id.as_str()));
    }
    // The old master now replicates through the new master's front.
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut cluster.admin(master))
        .await
        .expect("INFO replication");
    assert!(
        info.contains(&format!("master_port:{}", cluster.front_port(new_master))),
        "{info}"
    );
    assert!(cluster.front(new_master).auth_passed_through() >= 1);

    // The data survived; the old master's front redirects.
    let mut n = RespClient::connect_tls(cluster.front_port(new_master), cluster.pki()).await;
    assert_eq!(n.cmd(&["AUTH", oid, &token]).await, Value::ok());
    assert_eq!(n.cmd(&["GET", &key]).await, Value::bulk("before"));
    let mut o = RespClient::connect_tls(cluster.front_port(master), cluster.pki()).await;
    assert_eq!(o.cmd(&["AUTH", oid, &token]).await, Value::ok());
    let moved = o.cmd(&["GET", &key]).await;
    assert_eq!(
        moved.error(),
        Some(redirect("MOVED", slot, cluster.front_port(new_master)).as_str())
    );

    // Moving the new master's front: its replica follows the new port (the harness checks
    // INFO replication on every replica before move_front returns).
    let port = cluster.move_front(new_master).await;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut cluster.admin(master))
        .await
        .expect("INFO replication");
    assert!(info.contains(&format!("master_port:{port}")), "{info}");
    assert!(info.contains("master_link_status:up"), "{info}");
}

#[tokio::test]
async fn move_front_changes_the_announced_port() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let node = 1;
    let old_port = cluster.front_port(node);
    let key = key_for_slot(cluster.node(node).slots[0].0);
    let slot = key_slot(key.as_bytes());
    let mut through_old = front_client(&cluster, node).await;
    assert_eq!(through_old.cmd(&["SET", &key, "v"]).await, Value::ok());

    let started = Instant::now();
    let new_port = cluster.move_front(node).await;
    eprintln!("move_front converged in {:?}", started.elapsed());
    assert_ne!(new_port, old_port);
    assert_eq!(cluster.front_port(node), new_port);
    assert_eq!(cluster.node(node).front_port, new_port);

    // Every node announces the new port.
    for n in 0..3 {
        for range in cluster.cluster_slots(n).await {
            if cluster.slot_owner(range.start) == node {
                assert_eq!(range.master.port, new_port, "node {n}'s CLUSTER SLOTS");
            }
        }
    }
    let mut c0 = front_client(&cluster, 0).await;
    let moved = c0.cmd(&["GET", &key]).await;
    assert_eq!(
        moved.error(),
        Some(redirect("MOVED", slot, new_port).as_str())
    );

    // The old front is gone: its connections were closed, its port refuses.
    assert!(
        through_old
            .wait_closed(Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", old_port))
            .await
            .is_err()
    );
    let mut through_new = front_client(&cluster, node).await;
    assert_eq!(through_new.cmd(&["GET", &key]).await, Value::bulk("v"));

    // Keeping the old front for a while: both ports serve the node until it is stopped.
    let (third_port, old) = cluster.move_front_keeping_old(node).await;
    assert_eq!(old.port(), new_port);
    let mut still = front_client(&cluster, node).await;
    assert_eq!(still.cmd(&["GET", &key]).await, Value::bulk("v"));
    assert_eq!(through_new.cmd(&["GET", &key]).await, Value::bulk("v"));
    assert_eq!(cluster.front_port(node), third_port);
    old.stop().await;
    assert!(old.is_stopped());
    assert!(
        through_new
            .wait_closed(Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", new_port))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_killed_node_takes_only_its_own_slots_down() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let dead = 2;
    let dead_front = cluster.front_port(dead);
    let dead_key = key_for_slot(cluster.node(dead).slots[0].0);
    let live_key = key_for_slot(cluster.node(0).slots[0].0);

    let started = Instant::now();
    cluster.kill_node(dead).await;
    eprintln!("kill_node converged in {:?}", started.elapsed());
    assert!(!cluster.node(dead).alive);
    assert_eq!(cluster.masters(), vec![0, 1]);

    // Its front refuses; the others see it failed and still serve their slots.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", dead_front))
            .await
            .is_err()
    );
    for n in 0..2 {
        let lines = cluster.cluster_nodes(n).await;
        let line = lines
            .iter()
            .find(|l| l.id == cluster.node(dead).id)
            .expect("the dead node is still listed");
        assert!(line.has_flag("fail"), "node {n}: {:?}", line.flags);
    }
    let mut c0 = front_client(&cluster, 0).await;
    assert_eq!(c0.cmd(&["SET", &live_key, "alive"]).await, Value::ok());
    let moved = c0.cmd(&["GET", &dead_key]).await;
    assert_eq!(
        moved.error(),
        Some(redirect("MOVED", key_slot(dead_key.as_bytes()), dead_front).as_str()),
        "the dead node's slots are still mapped to it"
    );
}

#[tokio::test]
async fn start_and_teardown_are_bounded() {
    let started = Instant::now();
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let start_took = started.elapsed();
    eprintln!("start: {start_took:?}");
    assert!(start_took < START_BOUND, "start took {start_took:?}");

    let ports: Vec<u16> = cluster
        .nodes()
        .iter()
        .flat_map(|n| [n.port, n.front_port, n.bus_port])
        .collect();
    let dirs: Vec<std::path::PathBuf> = (0..cluster.len())
        .map(|n| {
            cluster
                .log_path(n)
                .parent()
                .expect("node dir")
                .to_path_buf()
        })
        .chain([cluster.pki().dir().to_path_buf()])
        .collect();
    for d in &dirs {
        assert!(d.exists(), "{}", d.display());
    }

    let dropping = Instant::now();
    drop(cluster);
    let drop_took = dropping.elapsed();
    eprintln!("teardown: {drop_took:?}");
    assert!(
        drop_took < Duration::from_secs(5),
        "teardown took {drop_took:?}"
    );
    // The processes were killed and reaped in drop; the fronts' accept tasks were aborted and
    // go away as soon as the runtime gets to them. Then nothing listens any more, and the
    // files are gone.
    for port in ports {
        let closed = wait_until_async(Duration::from_secs(2), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        })
        .await;
        assert!(
            closed,
            "something still listens on {port} after the teardown"
        );
    }
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
