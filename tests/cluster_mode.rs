//! The cluster mode end to end: a real TLS-only Redis Cluster (certificate for `cache.test`
//! only, nodes announced as `127.0.0.1:<front port>`) behind fake Azure fronts that close a
//! connection when its token expires, the proxy with `--cluster on`, and the `redis` crate's
//! cluster client talking plaintext to the proxy, seeded with the proxy's address only.
//!
//! What the client sees is compared with what the cluster holds: every key written is read back
//! through the proxy and directly from its owner; every address in replies is a local listener
//! that relays to exactly the node the cluster means (`CLUSTER MYID` through it).

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use support::token_endpoints::ManagedIdentityEndpoint;
use support::{
    ClusterOptions, ProxyProcess, RespClient, TestCluster, TokenIssuer, Value, key_slot,
    random_uuid, wait_until_async,
};

/// The proxy in cluster mode before `cluster`'s node 0, `extra` flags and `env` added.
async fn proxy_for(cluster: &TestCluster, extra: &[&str], env: &[(&str, &str)]) -> ProxyProcess {
    let upstream = format!("127.0.0.1:{}", cluster.front_port(0));
    let ca = cluster.pki().ca_path().display().to_string();
    let mut args = vec![
        "--upstream",
        upstream.as_str(),
        "--tls-server-name",
        cluster.host_name(),
        "--ca-file",
        ca.as_str(),
        "--cluster",
        "on",
        "--cluster-refresh",
        "1s",
    ];
    args.extend_from_slice(extra);
    let proxy = ProxyProcess::start(&args, env).await;
    proxy
        .wait_for_output("cluster mode: on", Duration::from_secs(20))
        .await;
    proxy
}

/// Access-key mode.
async fn key_proxy(cluster: &TestCluster, extra: &[&str]) -> ProxyProcess {
    let mut args = vec!["--auth", "access-key"];
    args.extend_from_slice(extra);
    proxy_for(
        cluster,
        &args,
        &[("AZURE_REDIS_PASSWORD", cluster.access_key())],
    )
    .await
}

/// A cluster client that knows only the proxy's address, plaintext, no password.
async fn cluster_client(proxy: &ProxyProcess) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClientBuilder::new(vec![format!("redis://{}/", proxy.addr())])
        .connection_timeout(Duration::from_secs(5))
        .response_timeout(Duration::from_secs(5))
        .retries(6)
        .build()
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection through the proxy")
}

/// `(start, end, port)` of every slot range in a `CLUSTER SLOTS` reply (master first), and every
/// port it names.
fn slots_ports(reply: &Value) -> (Vec<(i64, i64, u16)>, HashSet<u16>) {
    let mut ranges = Vec::new();
    let mut ports = HashSet::new();
    for range in reply.as_array().unwrap_or_else(|| panic!("{reply:?}")) {
        let items = range.as_array().unwrap_or_else(|| panic!("{range:?}"));
        let port = |node: &Value| -> u16 {
            let n = node.as_array().unwrap_or_else(|| panic!("{node:?}"));
            n[1].as_int()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("{node:?}"))
        };
        for node in &items[2..] {
            ports.insert(port(node));
            let host = node.as_array().and_then(|n| n[0].as_str());
            assert_eq!(host.as_deref(), Some("127.0.0.1"), "{node:?}");
        }
        ranges.push((
            items[0].as_int().unwrap_or(-1),
            items[1].as_int().unwrap_or(-1),
            port(&items[2]),
        ));
    }
    (ranges, ports)
}

/// Every port the cluster itself uses (fronts and the nodes' own), which a client must never see.
fn upstream_ports(cluster: &TestCluster) -> HashSet<u16> {
    (0..cluster.len())
        .flat_map(|n| [cluster.front_port(n), cluster.real_port(n)])
        .collect()
}

/// The local port that serves `node`, found by asking each local port for its `CLUSTER MYID`.
async fn local_port_of(
    proxy: &ProxyProcess,
    cluster: &TestCluster,
    ports: &HashSet<u16>,
    node: usize,
) -> u16 {
    let want = cluster.node(node).id.clone();
    for port in ports {
        let mut c = RespClient::connect(([127, 0, 0, 1], *port).into()).await;
        if c.cmd(&["CLUSTER", "MYID"]).await.as_str().as_deref() == Some(want.as_str()) {
            return *port;
        }
    }
    panic!("no local port serves node {node}\n{}", proxy.output());
}

/// The value of one unlabelled metric on the proxy's admin endpoint.
async fn metric(proxy: &ProxyProcess, name: &str) -> f64 {
    let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
    let body = support::http_get(&format!("http://{admin}/metrics"))
        .await
        .body;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
}

/// Keys over all slots: `n` keys, at least one in every 64-slot stretch.
fn spread_keys(n: usize) -> Vec<String> {
    let mut by_stretch: HashMap<u16, String> = HashMap::new();
    let mut keys = Vec::new();
    for i in 0u64.. {
        let key = format!("key:{i}");
        let stretch = key_slot(key.as_bytes()) / 64;
        if by_stretch.len() < 256 {
            if by_stretch.contains_key(&stretch) {
                continue;
            }
            by_stretch.insert(stretch, key.clone());
        }
        keys.push(key);
        if keys.len() >= n.max(256) {
            break;
        }
    }
    keys
}

#[tokio::test]
async fn a_cluster_client_works_through_the_proxy_for_ten_token_lifetimes() {
    let issuer = TokenIssuer::new(&random_uuid(), Duration::from_secs(3));
    let cluster = TestCluster::start(ClusterOptions::entra(&issuer)).await;
    let msi = ManagedIdentityEndpoint::start(&issuer).await;
    let env: Vec<(String, String)> = msi.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let proxy = proxy_for(
        &cluster,
        &[
            "--auth",
            "entra",
            "--credential",
            "managed-identity",
            "--reauth-margin",
            "1s",
            "--token-refresh-at",
            "0.5",
        ],
        &env,
    )
    .await;

    // The topology names local listeners only, each relaying to the node the cluster means.
    let mut raw = RespClient::connect(proxy.addr()).await;
    let (ranges, ports) = slots_ports(&raw.cmd(&["CLUSTER", "SLOTS"]).await);
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert!(ports.is_disjoint(&upstream_ports(&cluster)), "{ports:?}");
    for (start, _, port) in &ranges {
        let owner = cluster.slot_owner(u16::try_from(*start).unwrap_or_default());
        assert_eq!(local_port_of(&proxy, &cluster, &ports, owner).await, *port);
    }

    let mut con = cluster_client(&proxy).await;
    let keys = spread_keys(300);
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(32) {
        round += 1;
        for key in &keys {
            let () = redis::cmd("SET")
                .arg(key)
                .arg(round)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "round {round}: SET {key} through the proxy: {e}\n{}",
                        proxy.output()
                    )
                });
        }
        for key in keys.iter().step_by(7) {
            let got: u64 = redis::cmd("GET")
                .arg(key)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("round {round}: GET {key}: {e}\n{}", proxy.output()));
            assert_eq!(got, round, "{key}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each key holds the last round, as its owner says directly.
    for key in keys.iter().step_by(13) {
        let owner = cluster.node_for_key(key.as_bytes());
        let got: u64 = redis::cmd("GET")
            .arg(key)
            .query_async(&mut cluster.admin(owner))
            .await
            .expect("GET from the owner");
        assert_eq!(got, round, "{key} on node {owner}");
    }
    // More than ten token lifetimes, and no front ever closed a connection for an expired token;
    // every node's connections were re-authenticated many times.
    assert!(
        issuer.history().len() >= 10,
        "{} tokens",
        issuer.history().len()
    );
    for n in 0..3 {
        let front = cluster.front(n);
        assert_eq!(
            front.connections_closed_by_server(),
            0,
            "node {n}: the front closed a connection (its token expired)\n{}",
            proxy.output()
        );
        assert!(
            front.auth_accepted() >= 8,
            "node {n}: only {} AUTHs accepted",
            front.auth_accepted()
        );
    }
}

#[tokio::test]
async fn topology_replies_and_redirects_name_only_local_listeners() {
    let cluster = TestCluster::start(ClusterOptions::access_key().with_replicas(1)).await;
    let proxy = key_proxy(&cluster, &[]).await;
    let forbidden: Vec<String> = upstream_ports(&cluster)
        .iter()
        .map(|p| format!(":{p}"))
        .collect();
    for proto in ["2", "3"] {
        let mut c = RespClient::connect(proxy.addr()).await;
        assert!(!c.cmd(&["HELLO", proto]).await.is_error());
        let (_, ports) = slots_ports(&c.cmd(&["CLUSTER", "SLOTS"]).await);
        assert_eq!(ports.len(), 6, "masters and replicas: {ports:?}");
        assert!(ports.is_disjoint(&upstream_ports(&cluster)));
        for sub in [vec!["CLUSTER", "SHARDS"], vec!["CLUSTER", "NODES"]] {
            let reply = c.cmd(&sub).await;
            let text = String::from_utf8_lossy(&reply.encode()).into_owned();
            assert!(!reply.is_error(), "{sub:?}: {reply:?}");
            for port in &ports {
                assert!(
                    text.contains(&port.to_string()),
                    "{sub:?} lacks {port}: {text}"
                );
            }
            for f in &forbidden {
                assert!(
                    !text.contains(&format!("{f}\r")) && !text.contains(&format!("{f}@")),
                    "{sub:?} names {f}: {text}"
                );
            }
        }
        let master = cluster.masters()[0];
        let reply = c
            .cmd(&["CLUSTER", "REPLICAS", &cluster.node(master).id])
            .await;
        let text = String::from_utf8_lossy(&reply.encode()).into_owned();
        assert!(text.contains("127.0.0.1:"), "{text}");
        for f in &forbidden {
            assert!(
                !text.contains(&format!("{f}@")),
                "REPLICAS names {f}: {text}"
            );
        }
        // A key of another node: MOVED to that node's local listener.
        let seed_node = cluster.index_of_id(
            &c.cmd(&["CLUSTER", "MYID"])
                .await
                .as_str()
                .unwrap_or_default(),
        );
        let other = cluster
            .masters()
            .into_iter()
            .find(|m| Some(*m) != seed_node)
            .unwrap_or_default();
        let key = support::key_for_slot(cluster.node(other).slots[0].0);
        let reply = c.cmd(&["GET", &key]).await;
        let moved = reply
            .error()
            .unwrap_or_else(|| panic!("{reply:?}"))
            .to_string();
        let port: u16 = moved
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{moved}"));
        assert!(
            moved.starts_with("MOVED ") && moved.contains(" 127.0.0.1:"),
            "{moved}"
        );
        assert_eq!(
            local_port_of(&proxy, &cluster, &ports, other).await,
            port,
            "{moved}"
        );
        let mut there = RespClient::connect(([127, 0, 0, 1], port).into()).await;
        assert_eq!(there.cmd(&["SET", &key, "x"]).await, Value::ok());
    }
}

#[tokio::test]
async fn a_resharding_passes_ask_then_moved_with_local_addresses_and_loses_no_write() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let proxy = key_proxy(&cluster, &[]).await;
    let mut raw = RespClient::connect(proxy.addr()).await;
    let (_, ports) = slots_ports(&raw.cmd(&["CLUSTER", "SLOTS"]).await);
    let (from, to) = (cluster.masters()[0], cluster.masters()[1]);
    let slot = cluster.node(from).slots[0].0;
    let from_port = local_port_of(&proxy, &cluster, &ports, from).await;
    let to_port = local_port_of(&proxy, &cluster, &ports, to).await;

    // A cluster client keeps writing keys of the slot (and others) all along.
    let writer_proxy_addr = proxy.addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writer = tokio::spawn(async move {
        let mut con = redis::cluster::ClusterClientBuilder::new(vec![format!(
            "redis://{writer_proxy_addr}/"
        )])
        .retries(10)
        .build()
        .expect("client")
        .get_async_connection()
        .await
        .expect("connection");
        let mut written = Vec::new();
        let mut i = 0u64;
        while !stop_writer.load(std::sync::atomic::Ordering::Relaxed) {
            let key = format!("{{{}}}:{i}", support::key_for_slot(slot));
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(i)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("SET {key}: {e}"));
            written.push(key);
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        written
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    cluster.begin_migration(slot, from, to).await;
    let moved_keys = cluster.move_keys(slot, from, to, 1000).await;
    assert!(!moved_keys.is_empty());
    let mut c = RespClient::connect(([127, 0, 0, 1], from_port).into()).await;
    let reply = c.cmd(&["GET", &moved_keys[0]]).await;
    assert_eq!(
        reply.error(),
        Some(format!("ASK {slot} 127.0.0.1:{to_port}").as_str()),
        "{reply:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.finish_migration(slot, from, to).await;
    let reply = c.cmd(&["GET", &moved_keys[0]]).await;
    assert_eq!(
        reply.error(),
        Some(format!("MOVED {slot} 127.0.0.1:{to_port}").as_str()),
        "{reply:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(written.len() > 50, "{} writes", written.len());
    // Every write is on the slot's new owner.
    let mut admin = cluster.admin(to);
    for key in &written {
        let got: Option<u64> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut admin)
            .await
            .expect("GET");
        assert!(got.is_some(), "{key} lost\n{}", proxy.output());
    }
    // The proxy read the topology again after the MOVED: its CLUSTER SLOTS shows the new owner.
    let ok = wait_until_async(Duration::from_secs(10), || async {
        let mut c = RespClient::connect(proxy.addr()).await;
        let (ranges, _) = slots_ports(&c.cmd(&["CLUSTER", "SLOTS"]).await);
        ranges
            .iter()
            .any(|(s, e, p)| *s <= i64::from(slot) && i64::from(slot) <= *e && *p == to_port)
    })
    .await;
    assert!(ok, "CLUSTER SLOTS never showed the new owner");
}

#[tokio::test]
async fn a_node_on_a_new_address_gets_a_new_local_port_and_the_old_one_is_retired() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let proxy = key_proxy(&cluster, &["--admin-listen", "127.0.0.1:0"]).await;
    let mut raw = RespClient::connect(proxy.addr()).await;
    let (_, ports) = slots_ports(&raw.cmd(&["CLUSTER", "SLOTS"]).await);
    assert_eq!(metric(&proxy, "redis_proxy_cluster_nodes").await, 3.0);
    assert_eq!(
        metric(&proxy, "redis_proxy_cluster_topology_changes_total").await,
        3.0
    );
    let node = 2;
    let old_port = local_port_of(&proxy, &cluster, &ports, node).await;
    cluster.move_front(node).await;
    // Within a few refreshes the node is served on a new local port ...
    let deadline = Instant::now() + Duration::from_secs(15);
    let new_port = loop {
        let mut c = RespClient::connect(proxy.addr()).await;
        let (_, ports) = slots_ports(&c.cmd(&["CLUSTER", "SLOTS"]).await);
        if !ports.contains(&old_port) && ports.len() == 3 {
            break Some(local_port_of(&proxy, &cluster, &ports, node).await);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        new_port.is_some(),
        "the moved node never got a new local port\n{}",
        proxy.output()
    );
    assert_ne!(new_port, Some(old_port));
    // ... and, once the next topology read has retired it, the old one tells a new client why
    // it is refused (until then it says that it cannot reach the node's old address).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = RespClient::connect(([127, 0, 0, 1], old_port).into()).await;
        match c.try_read(Duration::from_secs(5)).await {
            Ok(Value::Error(e)) if e.contains("retired") => break,
            Ok(Value::Error(e)) if e.contains("cannot connect") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}\n{}", proxy.output()),
        }
    }
    assert!(proxy.output_contains("cluster: node left the topology"));
    // Counted: the new address served, the old one retired; still three nodes served.
    assert_eq!(metric(&proxy, "redis_proxy_cluster_nodes").await, 3.0);
    assert_eq!(
        metric(&proxy, "redis_proxy_cluster_topology_changes_total").await,
        5.0
    );
}

#[tokio::test]
async fn more_nodes_than_the_limit_give_a_clear_error_and_the_rest_keeps_working() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let proxy = key_proxy(&cluster, &["--cluster-max-nodes", "2"]).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let reply = c.cmd(&["CLUSTER", "SLOTS"]).await;
    let e = reply.error().unwrap_or_else(|| panic!("{reply:?}"));
    assert!(
        e.starts_with("ERR redis-entra-proxy: no local port for cluster node 127.0.0.1:"),
        "{e}"
    );
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert!(proxy.output_contains("--cluster-max-nodes reached"));
}

#[tokio::test]
async fn a_dead_node_fails_only_its_own_clients() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let proxy = key_proxy(&cluster, &[]).await;
    let mut raw = RespClient::connect(proxy.addr()).await;
    let (_, ports) = slots_ports(&raw.cmd(&["CLUSTER", "SLOTS"]).await);
    let dead = cluster.masters()[2];
    let dead_port = local_port_of(&proxy, &cluster, &ports, dead).await;
    let alive = cluster.masters()[1];
    let alive_port = local_port_of(&proxy, &cluster, &ports, alive).await;
    let mut kept = RespClient::connect(([127, 0, 0, 1], alive_port).into()).await;
    cluster.kill_node(dead).await;
    let mut c = RespClient::connect(([127, 0, 0, 1], dead_port).into()).await;
    match c.try_read(Duration::from_secs(10)).await {
        Ok(Value::Error(e)) => assert!(
            e.starts_with("ERR redis-entra-proxy: cannot connect to upstream 127.0.0.1:"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    let key = support::key_for_slot(cluster.node(alive).slots[0].0);
    assert_eq!(kept.cmd(&["SET", &key, "v"]).await, Value::ok());
    let mut fresh = RespClient::connect(([127, 0, 0, 1], alive_port).into()).await;
    assert_eq!(fresh.cmd(&["GET", &key]).await, Value::bulk("v"));
}

#[tokio::test]
async fn cluster_off_relays_the_clusters_own_addresses() {
    let cluster = TestCluster::start(ClusterOptions::access_key()).await;
    let upstream = format!("127.0.0.1:{}", cluster.front_port(0));
    let ca = cluster.pki().ca_path().display().to_string();
    let proxy = ProxyProcess::start(
        &[
            "--upstream",
            &upstream,
            "--tls-server-name",
            cluster.host_name(),
            "--ca-file",
            &ca,
            "--auth",
            "access-key",
            "--cluster",
            "off",
        ],
        &[("AZURE_REDIS_PASSWORD", cluster.access_key())],
    )
    .await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let (_, ports) = slots_ports(&c.cmd(&["CLUSTER", "SLOTS"]).await);
    let fronts: HashSet<u16> = (0..3).map(|n| cluster.front_port(n)).collect();
    assert_eq!(ports, fronts);
}

#[tokio::test]
async fn a_failover_is_followed() {
    let cluster = TestCluster::start(ClusterOptions::access_key().with_replicas(1)).await;
    let proxy = key_proxy(&cluster, &[]).await;
    let mut con = cluster_client(&proxy).await;
    let master = cluster.masters()[1];
    let slot = cluster.node(master).slots[0].0;
    let key = support::key_for_slot(slot);
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("before")
        .query_async(&mut con)
        .await
        .expect("SET before the failover");
    let promoted = cluster.failover(master).await;
    // The client is sent to the new master (MOVED from the old one, now a replica) and the
    // write lands there.
    let mut written = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !written && Instant::now() < deadline {
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&key)
            .arg("after")
            .query_async(&mut con)
            .await;
        written = set.is_ok();
        if !written {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(written, "no write after the failover\n{}", proxy.output());
    let got: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut cluster.admin(promoted))
        .await
        .expect("GET on the new master");
    assert_eq!(got, "after");
    // The proxy's CLUSTER SLOTS names the new master's local port for the slot.
    let mut c = RespClient::connect(proxy.addr()).await;
    let (ranges, ports) = slots_ports(&c.cmd(&["CLUSTER", "SLOTS"]).await);
    let new_port = local_port_of(&proxy, &cluster, &ports, promoted).await;
    assert!(
        ranges
            .iter()
            .any(|(s, e, p)| *s <= i64::from(slot) && i64::from(slot) <= *e && *p == new_port),
        "{ranges:?}"
    );
}

#[tokio::test]
async fn ssubscribe_on_the_owner_receives_every_message_across_token_refreshes() {
    let issuer = TokenIssuer::new(&random_uuid(), Duration::from_secs(3));
    let cluster = TestCluster::start(ClusterOptions::entra(&issuer)).await;
    let msi = ManagedIdentityEndpoint::start(&issuer).await;
    let env: Vec<(String, String)> = msi.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args = [
        "--auth",
        "entra",
        "--credential",
        "managed-identity",
        "--reauth-margin",
        "1s",
        "--token-refresh-at",
        "0.5",
    ];
    let proxy = proxy_for(&cluster, &args, &env).await;
    // Find the channel's owner the way a cluster client does: SSUBSCRIBE where the seed says.
    let channel = "orders";
    let mut seed = RespClient::connect(proxy.addr()).await;
    let (_, ports) = slots_ports(&seed.cmd(&["CLUSTER", "SLOTS"]).await);
    let owner = cluster.node_for_key(channel.as_bytes());
    let port = local_port_of(&proxy, &cluster, &ports, owner).await;
    let mut sub = RespClient::connect(([127, 0, 0, 1], port).into()).await;
    let confirmed = sub.cmd(&["SSUBSCRIBE", channel]).await;
    assert_eq!(
        confirmed,
        Value::Array(vec![
            Value::bulk("ssubscribe"),
            Value::bulk(channel),
            Value::Int(1)
        ])
    );
    let mut publisher = RespClient::connect(([127, 0, 0, 1], port).into()).await;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(12) {
        let n = publisher
            .cmd(&["SPUBLISH", channel, &sent.to_string()])
            .await;
        assert_eq!(n, Value::Int(1), "message {sent}\n{}", proxy.output());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..sent {
        let message = sub.read().await;
        assert_eq!(
            message,
            Value::Array(vec![
                Value::bulk("smessage"),
                Value::bulk(channel),
                Value::bulk(i.to_string())
            ]),
            "message {i} of {sent}"
        );
    }
    assert_eq!(cluster.front(owner).connections_closed_by_server(), 0);
    assert!(issuer.history().len() >= 4);
}
