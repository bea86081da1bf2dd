//! The warm pool (`--warm-connections N`), end to end.
//!
//! The proxy runs against the fake Azure front with tokens that live three seconds (the front
//! closes a connection the moment the token of its last `AUTH` expires, like Azure). Which Redis
//! connection a client got is told by `CLIENT ID`, which the proxy relays from the real Redis:
//! an id that existed before the client connected is a pooled connection.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use support::{
    EndpointMode, ProxyProcess, RespClient, Setup, Value, metric, wait_metric, wait_until,
};

const LIFETIME: Duration = Duration::from_secs(3);

async fn start(pool: usize, extra: &[&str]) -> (Setup, ProxyProcess, SocketAddr) {
    let setup = Setup::entra_app_service(LIFETIME).await;
    let size = pool.to_string();
    let mut args = vec!["--warm-connections", &size, "--admin-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proxy = setup.start_proxy_with(&args, &[]).await;
    let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
    (setup, proxy, admin)
}

/// Redis connections authenticated with a token (the front maps each token to a `tok-` user).
async fn token_connections(setup: &Setup) -> HashSet<u64> {
    let clients = setup.redis.clients().await;
    clients
        .iter()
        .filter(|c| c.user.starts_with("tok-"))
        .map(|c| c.id)
        .collect()
}

async fn client_id(c: &mut RespClient) -> u64 {
    let id = c.cmd(&["CLIENT", "ID"]).await.as_int().expect("CLIENT ID");
    u64::try_from(id).expect("a positive id")
}

#[tokio::test]
async fn the_pool_is_kept_full_and_a_client_takes_a_ready_connection() {
    let (setup, proxy, admin) = start(3, &[]).await;
    wait_metric(admin, "redis_proxy_warm_connections", 3.0, &proxy).await;
    let pooled = token_connections(&setup).await;
    assert!(pooled.len() >= 3, "pooled connections: {pooled:?}");

    // An ordinary Redis client, as an application would use it.
    let mut app = proxy.connection().await;
    let id: u64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut app)
        .await
        .expect("CLIENT ID");
    assert!(
        pooled.contains(&id),
        "the client got connection {id}, not one of the pooled {pooled:?}"
    );
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut app)
        .await
        .expect("SET");
    // The taken connection is replaced in the background.
    wait_metric(admin, "redis_proxy_warm_connections", 3.0, &proxy).await;

    // More clients at once than the pool holds: all are served, then the pool refills.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(RespClient::connect(proxy.addr()).await);
    }
    for c in &mut clients {
        assert_eq!(c.cmd(&["GET", "k"]).await, Value::bulk("v"));
    }
    wait_metric(admin, "redis_proxy_warm_connections", 3.0, &proxy).await;
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn pooled_connections_survive_token_rotations_and_still_serve() {
    let (setup, proxy, admin) = start(2, &[]).await;
    wait_metric(admin, "redis_proxy_warm_connections", 2.0, &proxy).await;
    let pooled = token_connections(&setup).await;
    let expired_before = setup.front().tokens_expired();
    let front = setup.front();
    // While the tokens rotate, the pool re-authenticates its connections again and again; the
    // alerting deadline must show their tokens throughout, never `+Inf` (the pool once took
    // its connections out of the gauge while it serviced them).
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let mut samples = 0u32;
    while front.tokens_expired() < expired_before + 4 {
        assert!(std::time::Instant::now() < give_up, "tokens did not expire");
        let deadline = metric(admin, "redis_proxy_reauth_deadline_timestamp_seconds").await;
        assert!(
            deadline.is_finite(),
            "the deadline read {deadline} with 2 pooled connections (sample {samples})"
        );
        samples += 1;
    }
    assert!(samples > 0);
    // Four tokens expired while the pool sat idle: no pooled connection was closed for it,
    // because each was re-authenticated with every new token.
    assert_eq!(front.connections_closed_by_server(), 0);
    let still = token_connections(&setup).await;
    assert!(
        pooled.is_subset(&still),
        "pooled connections {pooled:?} were replaced: now {still:?}"
    );
    assert!(metric(admin, "redis_proxy_reauth_total{result=\"success\"}").await >= 2.0 * 4.0);
    // The pooled connections' tokens are what the alerting deadline shows, with no client.
    let deadline = metric(admin, "redis_proxy_reauth_deadline_timestamp_seconds").await;
    let now = support::unix_now();
    assert!(
        // (the fake endpoint gives expiry times in whole seconds, rounded up)
        deadline > now && deadline <= now + LIFETIME.as_secs_f64() + 1.0,
        "deadline {deadline}, now {now}"
    );

    let mut c = RespClient::connect(proxy.addr()).await;
    let id = client_id(&mut c).await;
    assert!(pooled.contains(&id), "{id} is not one of {pooled:?}");
    assert_eq!(c.cmd(&["INCR", "n"]).await, Value::Int(1));
}

#[tokio::test]
async fn no_client_gets_a_pooled_connection_whose_token_expired() {
    let (setup, proxy, admin) = start(2, &["--connect-timeout", "1s"]).await;
    wait_metric(admin, "redis_proxy_warm_connections", 2.0, &proxy).await;
    let front = setup.front();
    // No new token from now on: the pooled connections' token runs out, and the front closes
    // them (as Azure would).
    setup.msi().set_mode(EndpointMode::Fail(500));
    let closed_before = front.connections_closed_by_server();
    assert!(
        wait_until(Duration::from_secs(15), || front
            .connections_closed_by_server()
            >= closed_before + 2)
        .await,
        "the front did not close the pooled connections at token expiry"
    );
    // A client now gets the proxy's error, never a dead or expired connection.
    let mut c = RespClient::connect(proxy.addr()).await;
    let reply = c.cmd(&["PING"]).await;
    let text = format!("{reply:?}");
    assert!(
        text.contains("redis-entra-proxy: no credential for the upstream"),
        "unexpected reply {text}"
    );
    assert_eq!(metric(admin, "redis_proxy_warm_connections").await, 0.0);

    // Tokens again: the pool refills and serves.
    setup.msi().set_mode(EndpointMode::Ok);
    wait_metric(admin, "redis_proxy_warm_connections", 2.0, &proxy).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
}

#[tokio::test]
async fn a_clean_connection_serves_the_next_client_and_a_changed_one_never_does() {
    let (setup, proxy, admin) = start(1, &[]).await;
    wait_metric(admin, "redis_proxy_warm_connections", 1.0, &proxy).await;
    let pooled = token_connections(&setup).await;

    assert_eq!(pooled.len(), 1, "{pooled:?}");
    let reused = *pooled.iter().next().unwrap();

    // A client that only ran ordinary commands leaves its connection to the next client:
    // connect-per-request applications reuse one upstream connection. (It gives it back long
    // before the pool would dial a replacement, 50 ms after the take.)
    let mut a = RespClient::connect(proxy.addr()).await;
    // What redis-py 5+ sends on every connection (Redis 7.0 answers it with an error; either
    // way it leaves nothing a later client could notice).
    a.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]).await;
    assert_eq!(a.cmd(&["SET", "k", "db0"]).await, Value::ok());
    drop(a);
    wait_metric(admin, "redis_proxy_warm_connections", 1.0, &proxy).await;
    let mut b = RespClient::connect(proxy.addr()).await;
    assert_eq!(
        client_id(&mut b).await,
        reused,
        "the clean connection was not reused"
    );

    // A client that changed the connection's state (here its database) takes it along: the
    // next client gets another connection, in database 0.
    assert_eq!(b.cmd(&["SELECT", "1"]).await, Value::ok());
    assert_eq!(b.cmd(&["SET", "k", "db1"]).await, Value::ok());
    drop(b);
    wait_metric(admin, "redis_proxy_warm_connections", 1.0, &proxy).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let named = client_id(&mut c).await;
    assert_ne!(named, reused, "a changed connection was reused");
    assert_eq!(c.cmd(&["GET", "k"]).await, Value::bulk("db0"));

    // Nor does a connection name.
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "app-1"]).await, Value::ok());
    drop(c);
    wait_metric(admin, "redis_proxy_warm_connections", 1.0, &proxy).await;
    let mut d = RespClient::connect(proxy.addr()).await;
    assert_ne!(
        client_id(&mut d).await,
        named,
        "a named connection was reused"
    );
    assert_eq!(d.cmd(&["CLIENT", "GETNAME"]).await, Value::Nil);
}
