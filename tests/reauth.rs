//! Re-authentication of live connections, end to end.
//!
//! The proxy runs against the fake Azure front with tokens that live about three seconds: the
//! front closes any connection whose last `AUTH`'s token expires, exactly like Azure. A
//! connection that survives many lifetimes therefore proves the proxy re-authenticated it, and
//! the assertions on replies prove the client never saw an injected reply.

mod support;

use std::time::{Duration, Instant};
use support::{ProxyProcess, RespClient, Setup, Value, wait_until};

const LIFETIME: Duration = Duration::from_secs(3);

async fn entra() -> (Setup, ProxyProcess) {
    let setup = Setup::entra_app_service(LIFETIME).await;
    let proxy = setup.start_proxy().await;
    (setup, proxy)
}

fn bulk(s: &str) -> Value {
    Value::bulk(s)
}

/// Waits until at least `n` more tokens have expired at the front than `before`.
async fn wait_for_expiries(setup: &Setup, before: u64, n: u64) {
    let front = setup.front();
    assert!(
        wait_until(Duration::from_secs(30), || front.tokens_expired()
            >= before + n)
        .await,
        "tokens did not expire: {} after {before}",
        front.tokens_expired()
    );
}

/// True when `CLIENT INFO` output has the exact `name=value` field.
fn has_field(info: &str, field: &str) -> bool {
    info.split_whitespace().any(|f| f == field)
}

async fn client_id(c: &mut RespClient) -> i64 {
    c.cmd(&["CLIENT", "ID"]).await.as_int().expect("CLIENT ID")
}

#[tokio::test]
async fn a_connection_keeps_working_for_ten_token_lifetimes() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let id = client_id(&mut c).await;
    let expired_before = setup.front().tokens_expired();
    let start = Instant::now();
    let mut n = 0;
    while setup.front().tokens_expired() < expired_before + 10 {
        n += 1;
        assert_eq!(c.cmd(&["INCR", "counter"]).await, Value::Int(n));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "tokens stopped expiring"
        );
    }
    assert_eq!(
        client_id(&mut c).await,
        id,
        "the upstream connection was replaced"
    );
    assert_eq!(setup.front().connections_closed_by_server(), 0);
    assert!(
        setup.front().auth_accepted() >= 10,
        "too few re-authentications"
    );
    assert_eq!(setup.front().auth_rejected(), 0);
}

#[tokio::test]
async fn many_idle_connections_all_survive() {
    let (setup, proxy) = entra().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = RespClient::connect(proxy.addr()).await;
        let id = client_id(&mut c).await;
        clients.push((c, id));
    }
    wait_for_expiries(&setup, setup.front().tokens_expired(), 3).await;
    for (c, id) in &mut clients {
        assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
        assert_eq!(client_id(c).await, *id);
    }
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn a_transaction_held_open_across_a_refresh_gets_exactly_its_results() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert!(c.cmd(&["MULTI"]).await.is_ok());
    assert_eq!(c.cmd(&["SET", "tx", "1"]).await, Value::simple("QUEUED"));
    let issued = setup.issuer.issued();
    assert!(wait_until(Duration::from_secs(10), || setup.issuer.issued() > issued).await);
    assert_eq!(c.cmd(&["INCR", "tx"]).await, Value::simple("QUEUED"));
    assert_eq!(
        c.cmd(&["EXEC"]).await,
        Value::Array(vec![Value::ok(), Value::Int(2)]),
        "an injected AUTH must never land inside a transaction"
    );
    // The re-authentication deferred by the transaction happens after EXEC: the connection
    // outlives the tokens that were current during the transaction.
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(c.cmd(&["GET", "tx"]).await, bulk("2"));
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

/// Reads until `n` numbered messages arrived on `channel`; every number exactly once, in order.
/// `message` picks the payload out of one frame (RESP2 array or RESP3 push).
async fn read_numbered(sub: &mut RespClient, total: u64, mut on_other: impl FnMut(Value)) {
    let mut next = 1;
    while next <= total {
        let v = sub.read().await;
        let items = match &v {
            Value::Array(items) | Value::Push(items) => items.clone(),
            _ => {
                on_other(v);
                continue;
            }
        };
        if items.first() != Some(&bulk("message")) {
            on_other(v);
            continue;
        }
        assert_eq!(items[1], bulk("numbers"));
        assert_eq!(
            items[2],
            bulk(&next.to_string()),
            "lost, duplicated or reordered"
        );
        next += 1;
    }
}

/// Publishes 1..=total on `numbers`, paced so that the stream spans several token lifetimes.
fn publish_numbers(addr: std::net::SocketAddr, total: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut p = RespClient::connect(addr).await;
        for i in 1..=total {
            let receivers = p.cmd(&["PUBLISH", "numbers", &i.to_string()]).await;
            assert_eq!(receivers, Value::Int(1));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

#[tokio::test]
async fn a_resp2_subscriber_gets_every_message_exactly_once_across_many_refreshes() {
    let (setup, proxy) = entra().await;
    let mut sub = RespClient::connect(proxy.addr()).await;
    sub.send(&["SUBSCRIBE", "numbers"]).await;
    assert_eq!(
        sub.read().await,
        Value::Array(vec![bulk("subscribe"), bulk("numbers"), Value::Int(1)])
    );
    let expired_before = setup.front().tokens_expired();
    let total = 400; // ~12 s: four token lifetimes
    let publisher = publish_numbers(proxy.addr(), total);
    let mut pongs = 0;
    sub.send(&["PING"]).await;
    read_numbered(&mut sub, total, |other| {
        assert_eq!(
            other,
            Value::Array(vec![bulk("pong"), bulk("")]),
            "RESP2 subscribed PING"
        );
        pongs += 1;
    })
    .await;
    publisher.await.expect("publisher");
    assert_eq!(pongs, 1);
    assert!(setup.front().tokens_expired() >= expired_before + 3);
    assert_eq!(setup.front().connections_closed_by_server(), 0);

    // Still RESP2 subscribed mode as the client knows it.
    let refused = sub.cmd(&["GET", "x"]).await;
    assert!(
        refused
            .error()
            .is_some_and(|e| e.contains("Can't execute 'get'")),
        "{refused:?}"
    );
    assert_eq!(
        sub.cmd(&["UNSUBSCRIBE"]).await,
        Value::Array(vec![bulk("unsubscribe"), bulk("numbers"), Value::Int(0)])
    );
    // Out of subscribed mode: ordinary RESP2 replies again.
    assert!(sub.cmd(&["SET", "x", "1"]).await.is_ok());
    assert_eq!(sub.cmd(&["GET", "x"]).await, bulk("1"));
    assert_eq!(sub.cmd(&["PING"]).await, Value::simple("PONG"));
}

#[tokio::test]
async fn a_resp3_subscriber_gets_every_message_exactly_once_across_many_refreshes() {
    let (setup, proxy) = entra().await;
    let mut sub = RespClient::connect(proxy.addr()).await;
    let hello = sub.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello.map_get("proto"), Some(&Value::Int(3)));
    sub.send(&["SUBSCRIBE", "numbers"]).await;
    assert_eq!(
        sub.read().await,
        Value::Push(vec![bulk("subscribe"), bulk("numbers"), Value::Int(1)])
    );
    let expired_before = setup.front().tokens_expired();
    let total = 400;
    let publisher = publish_numbers(proxy.addr(), total);
    sub.send(&["SET", "r3", "v"]).await; // RESP3 allows ordinary commands while subscribed
    let mut replies = Vec::new();
    read_numbered(&mut sub, total, |other| replies.push(other)).await;
    publisher.await.expect("publisher");
    assert_eq!(replies, vec![Value::ok()]);
    assert!(setup.front().tokens_expired() >= expired_before + 3);
    assert_eq!(setup.front().connections_closed_by_server(), 0);
    assert_eq!(sub.cmd(&["GET", "r3"]).await, bulk("v"));
}

#[tokio::test]
async fn ten_thousand_pipelined_commands_across_a_refresh_keep_their_order() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let incr = b"*2\r\n$4\r\nINCR\r\n$1\r\np\r\n".repeat(5_000);
    c.send_raw(&incr).await;
    let issued = setup.issuer.issued();
    assert!(wait_until(Duration::from_secs(10), || setup.issuer.issued() > issued).await);
    c.send_raw(&incr).await;
    for n in 1..=10_000 {
        assert_eq!(c.read().await, Value::Int(n));
    }
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(c.cmd(&["GET", "p"]).await, bulk("10000"));
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn reset_is_followed_by_authentication_and_the_configured_database() {
    let setup = Setup::entra_app_service(LIFETIME).await;
    let proxy = setup.start_proxy_with(&["--database", "3"], &[]).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert!(c.cmd(&["SELECT", "5"]).await.is_ok());
    assert!(c.cmd(&["MULTI"]).await.is_ok());
    assert_eq!(c.cmd(&["RESET"]).await, Value::simple("RESET"));
    // Without the proxy's AUTH after RESET this would be NOAUTH; without SELECT, db 0.
    assert!(c.cmd(&["SET", "after-reset", "1"]).await.is_ok());
    let info = c
        .cmd(&["CLIENT", "INFO"])
        .await
        .as_str()
        .expect("CLIENT INFO");
    assert!(has_field(&info, "db=3"), "{info}");
    assert!(
        info.split_whitespace().any(|f| f.starts_with("user=tok-")),
        "{info}"
    );
    assert!(has_field(&info, "resp=2"), "{info}");
    // And the connection keeps being re-authenticated afterwards.
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(c.cmd(&["GET", "after-reset"]).await, bulk("1"));
}

#[tokio::test]
async fn hello_with_auth_gets_the_proxy_credential_and_switches_protocol() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let hello = c
        .cmd(&[
            "HELLO",
            "3",
            "AUTH",
            "legacy-user",
            "old-password",
            "SETNAME",
            "app",
        ])
        .await;
    assert_eq!(hello.map_get("proto"), Some(&Value::Int(3)), "{hello:?}");
    let events = setup.front().auth_events();
    assert!(
        events.iter().any(|e| e.via_hello && e.accepted),
        "the HELLO carried the proxy's token: {events:#?}"
    );
    assert!(
        events.iter().all(|e| e.user != "legacy-user"),
        "the client's pair never reaches the server"
    );
    let info = c
        .cmd(&["CLIENT", "INFO"])
        .await
        .as_str()
        .expect("CLIENT INFO");
    assert!(has_field(&info, "name=app"), "{info}");
    assert!(has_field(&info, "resp=3"), "{info}");
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn a_connection_with_replies_off_is_reauthenticated_without_a_stray_reply() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    c.send(&["CLIENT", "REPLY", "OFF"]).await;
    c.send(&["SET", "off1", "a"]).await;
    let expired = setup.front().tokens_expired();
    wait_for_expiries(&setup, expired, 2).await; // re-authenticated while replies were off
    c.send(&["SET", "off2", "b"]).await;
    c.expect_silence(Duration::from_millis(300)).await;
    assert!(c.cmd(&["CLIENT", "REPLY", "ON"]).await.is_ok());
    assert_eq!(c.cmd(&["GET", "off1"]).await, bulk("a"));
    assert_eq!(c.cmd(&["GET", "off2"]).await, bulk("b"));
    // SKIP suppresses exactly the next reply, and nothing of the proxy's is suppressed instead.
    c.send(&["CLIENT", "REPLY", "SKIP"]).await;
    c.send(&["SET", "skipped", "c"]).await;
    assert_eq!(c.cmd(&["GET", "skipped"]).await, bulk("c"));
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn access_key_rotation_through_the_key_file() {
    let setup = Setup::access_key().await;
    let key_file = setup.dir.path().join("access-key");
    let old_key = setup.redis.access_key();
    std::fs::write(&key_file, format!("{old_key}\n")).expect("write key file");
    let mut args: Vec<&str> = setup.args.iter().map(String::as_str).collect();
    let key_path = key_file.display().to_string();
    args.extend(["--access-key-file", key_path.as_str()]);
    let proxy = ProxyProcess::start(&args, &[]).await;
    let mut live = RespClient::connect(proxy.addr()).await;
    assert_eq!(live.cmd(&["PING"]).await, Value::simple("PONG"));

    // Rotate as Kubernetes does: the new key is valid first, then the file changes.
    let new_key = "rotated-access-key-2";
    setup.redis.set_access_keys(&[&old_key, new_key]).await;
    std::fs::write(&key_file, new_key).expect("rotate key file");
    proxy
        .wait_for_output("re-authenticated", Duration::from_secs(15))
        .await;
    // The old key is revoked: new connections must use the new key, the live one already does.
    setup.redis.set_access_keys(&[new_key]).await;
    let mut fresh = RespClient::connect(proxy.addr()).await;
    assert_eq!(fresh.cmd(&["PING"]).await, Value::simple("PONG"));
    assert!(live.cmd(&["SET", "k", "v"]).await.is_ok());
    // A RESET logs the live connection out: it can only come back with the new key.
    assert_eq!(live.cmd(&["RESET"]).await, Value::simple("RESET"));
    assert_eq!(live.cmd(&["GET", "k"]).await, bulk("v"));
}

/// A TCP relay to `to` that holds every connection accepted while it is closed until it opens;
/// counts those it held.
async fn gate(
    to: String,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Sender<bool>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the gate");
    let addr = listener.local_addr().expect("gate address");
    let (open, _) = tokio::sync::watch::channel(true);
    let held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (open_tx, held_count) = (open.clone(), held.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut is_open = open_tx.subscribe();
            let (to, held) = (to.clone(), held.clone());
            tokio::spawn(async move {
                if !*is_open.borrow() {
                    held.fetch_add(1, Ordering::SeqCst);
                }
                if is_open.wait_for(|o| *o).await.is_err() {
                    return;
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, open, held_count)
}

#[tokio::test]
async fn a_connection_whose_handshake_outlasts_its_key_is_retried_with_the_new_one() {
    use std::sync::atomic::Ordering;
    let setup = Setup::access_key().await;
    let (gate_addr, open, held) = gate(setup.redis.addr()).await;
    let key_file = setup.dir.path().join("access-key");
    let old_key = setup.redis.access_key();
    std::fs::write(&key_file, format!("{old_key}\n")).expect("write key file");
    let mut args: Vec<String> = setup.args.clone();
    let at = args
        .iter()
        .position(|a| a == "--upstream")
        .expect("--upstream in the setup's arguments");
    args[at + 1] = gate_addr.to_string();
    let key_path = key_file.display().to_string();
    args.extend(["--access-key-file".into(), key_path]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = ProxyProcess::start(&args, &[]).await;
    proxy
        .wait_for_output("ready: an upstream connection", Duration::from_secs(15))
        .await;
    // A client's upstream connection is dialled with the old key and held before its TLS
    // handshake; meanwhile the key is rotated and the old one revoked.
    open.send_replace(false);
    let mut client = RespClient::connect(proxy.addr()).await;
    client.send(&["PING"]).await;
    assert!(
        wait_until(Duration::from_secs(10), || held.load(Ordering::SeqCst) >= 1).await,
        "the proxy did not dial\n{}",
        proxy.output()
    );
    let new_key = "rotated-during-a-handshake";
    setup.redis.set_access_keys(&[new_key]).await;
    std::fs::write(&key_file, new_key).expect("rotate key file");
    proxy
        .wait_for_output("the access key file changed", Duration::from_secs(15))
        .await;
    // The handshake completes, AUTH with the old key is refused, and the connector tries once
    // more with the key published meanwhile: the client never sees the refusal.
    open.send_replace(true);
    assert_eq!(
        client.read().await,
        Value::simple("PONG"),
        "{}",
        proxy.output()
    );
    assert_eq!(client.cmd(&["SET", "k", "v"]).await, Value::ok());
}

#[tokio::test]
async fn inline_commands_are_relayed() {
    let (_setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    c.send_raw(b"SET inline \"a b\"\r\nGET inline\r\nPING\r\n")
        .await;
    assert!(c.read().await.is_ok());
    assert_eq!(c.read().await, bulk("a b"));
    assert_eq!(c.read().await, Value::simple("PONG"));
}

#[tokio::test]
async fn client_auth_is_answered_locally_and_never_reaches_the_server() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let rejected = setup.front().auth_rejected();
    assert!(c.cmd(&["AUTH", "an-old-access-key"]).await.is_ok());
    assert!(c.cmd(&["AUTH", "someone", "something"]).await.is_ok());
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    let events = setup.front().auth_events();
    assert_eq!(setup.front().auth_rejected(), rejected, "{events:#?}");
    assert!(events.iter().all(|e| e.user != "someone"), "{events:#?}");
}

#[tokio::test]
async fn a_client_blocked_longer_than_a_token_lives_stays_blocked_and_gets_its_reply() {
    let (setup, proxy) = entra().await;
    let mut blocked = RespClient::connect(proxy.addr()).await;
    let id = client_id(&mut blocked).await;
    // Pipelined behind the blocking command: must run after it, as without the proxy.
    blocked
        .send_raw(b"*3\r\n$5\r\nBLPOP\r\n$4\r\njobs\r\n$1\r\n0\r\n*1\r\n$4\r\nPING\r\n")
        .await;
    wait_for_expiries(&setup, setup.front().tokens_expired(), 3).await;
    blocked.expect_silence(Duration::from_millis(100)).await;
    let mut producer = RespClient::connect(proxy.addr()).await;
    assert_eq!(
        producer.cmd(&["LPUSH", "jobs", "job-1"]).await,
        Value::Int(1)
    );
    assert_eq!(
        blocked.read().await,
        Value::Array(vec![bulk("jobs"), bulk("job-1")])
    );
    assert_eq!(blocked.read().await, Value::simple("PONG"));
    assert_eq!(client_id(&mut blocked).await, id);
    assert_eq!(setup.front().connections_closed_by_server(), 0);
    assert_eq!(
        producer.cmd(&["LLEN", "jobs"]).await,
        Value::Int(0),
        "popped exactly once"
    );
}

#[tokio::test]
async fn a_finite_blocking_timeout_longer_than_a_token_is_honoured() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let start = Instant::now();
    let reply = c.cmd(&["BRPOP", "nothing-here", "5"]).await;
    let waited = start.elapsed();
    assert_eq!(reply, Value::Nil, "the timeout reply the client asked for");
    assert!(
        waited >= Duration::from_secs(5),
        "returned early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "returned late: {waited:?}");
    // BLMOVE across a refresh moves exactly one element.
    let mut other = RespClient::connect(proxy.addr()).await;
    c.send(&["BLMOVE", "src", "dst", "LEFT", "RIGHT", "0"])
        .await;
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(other.cmd(&["RPUSH", "src", "a"]).await, Value::Int(1));
    assert_eq!(c.read().await, bulk("a"));
    assert_eq!(
        other.cmd(&["LRANGE", "dst", "0", "-1"]).await,
        Value::Array(vec![bulk("a")])
    );
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn a_consumer_group_reader_blocked_across_refreshes_gets_its_entry() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert!(
        c.cmd(&["XGROUP", "CREATE", "events", "g", "$", "MKSTREAM"])
            .await
            .is_ok()
    );
    c.send(&[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "BLOCK",
        "0",
        "STREAMS",
        "events",
        ">",
    ])
    .await;
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    let mut producer = RespClient::connect(proxy.addr()).await;
    let id = producer.cmd(&["XADD", "events", "*", "n", "1"]).await;
    let reply = c.read().await;
    let text = format!("{reply:?}");
    assert!(text.contains(&id.as_str().expect("id")), "{text}");
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn a_monitor_feed_survives_refreshes_without_showing_the_proxys_auth() {
    let (setup, proxy) = entra().await;
    let mut monitor = RespClient::connect(proxy.addr()).await;
    assert!(monitor.cmd(&["MONITOR"]).await.is_ok());
    let mut worker = RespClient::connect(proxy.addr()).await;
    let expired_before = setup.front().tokens_expired();
    let mut n = 0;
    while setup.front().tokens_expired() < expired_before + 2 {
        n += 1;
        assert!(
            worker
                .cmd(&["SET", "watched", &n.to_string()])
                .await
                .is_ok()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every SET shows in the feed, in order; no `+OK` of an injected AUTH, no token.
    let mut seen = 0;
    while seen < n {
        let line = monitor.read().await.as_str().expect("a feed line");
        assert_ne!(line, "OK", "an injected AUTH's reply leaked into the feed");
        for token in setup.issuer.history() {
            assert!(
                !line.contains(&token),
                "a token appeared in the feed: {line}"
            );
        }
        if line.contains("\"SET\" \"watched\"") {
            seen += 1;
            assert!(line.ends_with(&format!("\"{seen}\"")), "{line}");
        }
    }
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn resp3_tracking_invalidations_are_not_mistaken_for_replies() {
    let (setup, proxy) = entra().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    c.cmd(&["HELLO", "3"]).await;
    assert!(c.cmd(&["CLIENT", "TRACKING", "ON"]).await.is_ok());
    let mut writer = RespClient::connect(proxy.addr()).await;
    let expired_before = setup.front().tokens_expired();
    let mut round = 0;
    while setup.front().tokens_expired() < expired_before + 2 {
        round += 1;
        let value = round.to_string();
        assert!(writer.cmd(&["SET", "tracked", &value]).await.is_ok());
        assert_eq!(
            c.cmd(&["GET", "tracked"]).await,
            bulk(&value),
            "replies stay aligned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(writer.cmd(&["SET", "tracked", "last"]).await.is_ok());
    assert_eq!(c.cmd(&["GET", "tracked"]).await, bulk("last"));
    assert!(
        c.pushes
            .iter()
            .any(|p| format!("{p:?}").contains("invalidate")),
        "invalidation pushes reach the client"
    );
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

/// A live connection through each Entra credential kind outlives several tokens.
async fn survives_with(setup: Setup) {
    let proxy = setup.start_proxy().await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let id = client_id(&mut c).await;
    wait_for_expiries(&setup, setup.front().tokens_expired(), 3).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert_eq!(client_id(&mut c).await, id);
    assert_eq!(setup.front().connections_closed_by_server(), 0);
}

#[tokio::test]
async fn workload_identity_tokens_keep_a_connection_alive() {
    survives_with(Setup::entra_workload_identity(LIFETIME).await).await;
}

#[tokio::test]
async fn client_secret_tokens_keep_a_connection_alive() {
    survives_with(Setup::entra_client_secret(LIFETIME).await).await;
}

#[tokio::test]
async fn a_fresh_token_is_fetched_even_when_the_identity_library_would_return_its_cached_one() {
    // 400 s tokens sit outside azure_identity's 5-minute refresh window: asking the same
    // credential again returns the cached token. --token-refresh-at 0.01 asks after 4 s.
    let setup = Setup::entra_app_service(Duration::from_secs(400)).await;
    let proxy = setup
        .start_proxy_with(
            &["--token-refresh-at", "0.01", "--reauth-margin", "3m"],
            &[],
        )
        .await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    let first = setup.issuer.history()[0].clone();
    let first_jti = support::TokenIssuer::claims(&first).jti;
    assert!(
        wait_until(Duration::from_secs(20), || setup.msi().tokens_served() >= 2).await,
        "the endpoint was never asked for a new token"
    );
    // The startup probe's connection is closed at once, so an AUTH with another token can only
    // come from the live client connection.
    let reauthenticated = || {
        setup
            .front()
            .auth_events()
            .iter()
            .any(|e| e.accepted && e.jti.as_deref().is_some_and(|j| j != first_jti))
    };
    assert!(
        wait_until(Duration::from_secs(10), reauthenticated).await,
        "the live connection was not re-authenticated with a genuinely new token (new jti)"
    );
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
}

#[tokio::test]
async fn the_startup_line_names_the_mode_and_a_configured_username_is_used() {
    let setup = Setup::entra_app_service(LIFETIME).await;
    // A Redis user other than the token's oid: the front (like Azure) refuses it.
    let proxy = setup
        .start_proxy_with(&["--redis-username", "not-the-object-id"], &[])
        .await;
    let started = proxy
        .output_lines()
        .into_iter()
        .filter(|l| l.contains("starting redis-entra-proxy"))
        .collect::<Vec<_>>();
    assert_eq!(started.len(), 1, "one startup line");
    assert!(started[0].contains("auth=entra"), "{}", started[0]);
    assert!(
        started[0].contains("credential=managed-identity"),
        "{}",
        started[0]
    );
    let mut c = RespClient::connect(proxy.addr()).await;
    let reply = c.cmd(&["PING"]).await;
    let error = reply.error().unwrap_or_default().to_string();
    assert!(
        error.starts_with("ERR redis-entra-proxy: upstream authentication failed: WRONGPASS"),
        "{reply:?}"
    );
    assert!(
        setup
            .front()
            .auth_events()
            .iter()
            .any(|e| e.user == "not-the-object-id")
    );
}

#[tokio::test]
async fn a_user_assigned_managed_identity_is_chosen_by_its_client_id() {
    let setup = Setup::entra_app_service(LIFETIME).await;
    setup
        .msi()
        .require_client_id(Some("user-assigned-client-id"));
    // `--credential auto` with AZURE_REDIS_CLIENTID: user-assigned managed identity.
    let proxy = setup
        .start_proxy_with(
            &["--credential", "auto"],
            &[("AZURE_REDIS_CLIENTID", "user-assigned-client-id")],
        )
        .await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    wait_for_expiries(&setup, setup.front().tokens_expired(), 2).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert!(
        setup
            .msi()
            .request_log()
            .iter()
            .all(|r| format!("{r:?}").contains("user-assigned-client-id"))
    );
    // Without the client id the endpoint refuses (system-assigned isn't this identity).
    let wrong = setup
        .start_proxy_with(&["--connect-timeout", "2s"], &[])
        .await;
    let mut refused = RespClient::connect(wrong.addr()).await;
    let reply = refused.cmd(&["PING"]).await;
    assert!(
        reply
            .error()
            .is_some_and(|e| e.contains("no credential for the upstream")),
        "{reply:?}"
    );
}

/// Waits until `CLIENT LIST` shows `command` as the last one each of the connections `ids` ran.
async fn wait_until_last_command_is(probe: &mut RespClient, ids: &[String], command: &str) {
    let wanted = format!("cmd={command}");
    for _ in 0..5000 {
        let mut args = vec!["CLIENT", "LIST", "ID"];
        args.extend(ids.iter().map(String::as_str));
        let list = probe.cmd(&args).await.as_str().unwrap_or_default();
        let ran = list
            .lines()
            .filter(|l| l.split_whitespace().any(|f| f == wanted))
            .count();
        if ran == ids.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("connections {ids:?} never ran {command}");
}

/// A direct TLS connection to the test's Redis, authenticated with `key`.
async fn direct_client(setup: &Setup, key: &str) -> RespClient {
    let mut c = RespClient::connect_tls(setup.redis.port(), &setup.pki).await;
    assert!(c.cmd(&["AUTH", key]).await.is_ok());
    c
}

/// A direct connection that watches and ends busy spells: `busy-reply-threshold` is set to
/// 50 ms, so a script makes the server busy almost at once.
async fn busy_probe(setup: &Setup, key: &str) -> RespClient {
    let mut probe = direct_client(setup, key).await;
    assert!(
        probe
            .cmd(&["CONFIG", "SET", "busy-reply-threshold", "50"])
            .await
            .is_ok()
    );
    probe
}

/// Starts a script that runs until it is killed, and waits until the server is busy. Returns
/// the script's connection, for [`kill_busy_script`].
async fn start_busy_script(setup: &Setup, key: &str, probe: &mut RespClient) -> RespClient {
    let mut script = direct_client(setup, key).await;
    script.send(&["EVAL", "while true do end", "0"]).await;
    wait_until_busy(probe).await;
    script
}

/// Ends the busy spell: `SCRIPT KILL`, and the script's own error reply.
async fn kill_busy_script(probe: &mut RespClient, mut script: RespClient) {
    assert!(probe.cmd(&["SCRIPT", "KILL"]).await.is_ok());
    assert!(script.read().await.is_error_code("ERR")); // "Script killed by user"
}

/// Waits until `probe` (a direct connection) is refused with `-BUSY`: another client's script
/// has run past `busy-reply-threshold`, and Redis runs only `AUTH`, `SCRIPT KILL` and a few others.
async fn wait_until_busy(probe: &mut RespClient) {
    for _ in 0..100 {
        if probe.cmd(&["PING"]).await.is_error_code("BUSY") {
            return;
        }
    }
    panic!("the server never became busy");
}

/// Differential, against Redis itself: a client with its replies off, directly and through the
/// proxy, while another client's script keeps Redis busy and the access key rotates. The proxy
/// re-authenticates its connection during the busy spell; afterwards both clients must get the
/// same replies. (The proxy used to wrap that `AUTH` in `CLIENT REPLY ON` … `OFF`: Redis refused
/// the `ON` with a `-BUSY` that replies-off suppressed, and the proxy handed the client's next
/// two replies to its wrapper.)
#[tokio::test]
async fn a_key_rotation_while_a_script_keeps_redis_busy_leaves_a_replies_off_client_its_replies() {
    let setup = Setup::access_key().await;
    let key_file = setup.dir.path().join("access-key");
    let old_key = setup.redis.access_key();
    std::fs::write(&key_file, format!("{old_key}\n")).expect("write key file");
    let mut args: Vec<&str> = setup.args.iter().map(String::as_str).collect();
    let key_path = key_file.display().to_string();
    args.extend(["--access-key-file", key_path.as_str()]);
    let proxy = ProxyProcess::start(&args, &[]).await;
    let new_key = "rotated-access-key-busy";
    setup.redis.set_access_keys(&[&old_key, new_key]).await; // (ACL SETUSER: not while busy)
    let mut probe = busy_probe(&setup, &old_key).await;
    let mut proxied = RespClient::connect(proxy.addr()).await;
    let mut direct = direct_client(&setup, &old_key).await;
    let mut ids = Vec::new();
    for (c, key) in [(&mut proxied, "off-proxied"), (&mut direct, "off-direct")] {
        ids.push(client_id(c).await.to_string());
        c.send(&["CLIENT", "REPLY", "OFF"]).await;
        c.send(&["SET", key, "v"]).await;
    }
    // Both ran before the script starts (a busy server would refuse them too).
    wait_until_last_command_is(&mut probe, &ids, "set").await;
    let script = start_busy_script(&setup, &old_key, &mut probe).await;

    std::fs::write(&key_file, new_key).expect("rotate key file");
    proxy
        .wait_for_output("with the client's replies off", Duration::from_secs(15))
        .await;
    kill_busy_script(&mut probe, script).await;

    let mut got = Vec::new();
    for (c, key) in [(&mut proxied, "off-proxied"), (&mut direct, "off-direct")] {
        c.send(&["CLIENT", "REPLY", "ON"]).await;
        c.send(&["PING"]).await;
        c.send(&["GET", key]).await;
        let mut replies = Vec::new();
        for _ in 0..3 {
            replies.push(c.read().await);
        }
        got.push(replies);
    }
    assert_eq!(got[0], got[1], "through the proxy vs directly");
    assert_eq!(got[0], [Value::ok(), Value::simple("PONG"), bulk("v")]);
    assert!(proxy.output_contains("using the new key"));
}

/// A busy server (another client's script past `busy-reply-threshold`) refuses the `SELECT` the
/// proxy sends for `--database` on each new upstream connection and after `RESET` (it still
/// runs `RESET` and `AUTH`). A client connecting then keeps its connection, and a client that
/// sends `RESET` then gets its own refusals as directly; neither runs a command anywhere but in
/// its database.
#[tokio::test]
async fn while_a_script_keeps_redis_busy_new_and_reset_clients_stay_in_their_database() {
    let setup = Setup::access_key().await;
    let proxy = setup.start_proxy_with(&["--database", "9"], &[]).await;
    let key = setup.redis.access_key();
    let mut probe = busy_probe(&setup, &key).await;
    let mut resetting = RespClient::connect(proxy.addr()).await;
    assert_eq!(resetting.cmd(&["PING"]).await, Value::simple("PONG"));
    let script = start_busy_script(&setup, &key, &mut probe).await;

    assert_eq!(resetting.cmd(&["RESET"]).await, Value::simple("RESET"));
    assert!(
        resetting
            .cmd(&["SET", "during-busy", "v"])
            .await
            .is_error_code("BUSY"),
        "refused, as directly"
    );
    let mut late = RespClient::connect(proxy.addr()).await;
    late.send(&["SET", "late", "v"]).await;
    proxy
        .wait_for_output(
            "SELECT refused: the server is busy",
            Duration::from_secs(10),
        )
        .await;
    kill_busy_script(&mut probe, script).await;

    assert!(
        late.read().await.is_ok(),
        "the late client kept its connection"
    );
    assert!(resetting.cmd(&["SET", "after-reset", "v"]).await.is_ok());
    assert!(probe.cmd(&["SELECT", "9"]).await.is_ok());
    assert_eq!(
        probe
            .cmd(&["EXISTS", "late", "after-reset", "during-busy"])
            .await,
        Value::Int(2)
    );
    assert!(probe.cmd(&["SELECT", "0"]).await.is_ok());
    assert_eq!(
        probe
            .cmd(&["EXISTS", "late", "after-reset", "during-busy"])
            .await,
        Value::Int(0)
    );
}
