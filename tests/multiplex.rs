//! Multiplexing (`--multiplex N`), end to end: a real TLS `redis-server` behind the fake Azure
//! front (which closes a connection whose token expired), tokens living seconds, many clients.
//!
//! What must hold: every client gets exactly its own replies, in order, whether its commands
//! were shared, answered by the proxy, or sent after it was pinned; the shared connections stay
//! N and stay authenticated across token lifetimes; one client's misbehaviour (not reading,
//! malformed input) or a broken shared connection costs nobody else anything.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{ProxyProcess, RespClient, Setup, Value, http_get, metric, wait_metric, wait_until};

const LIFETIME: Duration = Duration::from_secs(3);

async fn start(
    lifetime: Duration,
    shared: usize,
    extra: &[&str],
) -> (Setup, ProxyProcess, SocketAddr) {
    let setup = Setup::entra_app_service(lifetime).await;
    let n = shared.to_string();
    let mut args = vec![
        "--multiplex",
        &n,
        "--cluster",
        "off",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let proxy = setup.start_proxy_with(&args, &[]).await;
    let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
    // The shared connections open (and read the command table) on their own.
    let n = shared as f64;
    wait_metric(admin, "redis_proxy_multiplex_shared_connections", n, &proxy).await;
    // They are the startup probe too: no connection of its own was opened for it.
    let startup = http_get(&format!("http://{admin}/startup")).await;
    assert_eq!(startup.status, 200, "{}", startup.body);
    assert_eq!(
        setup.front().connections_total(),
        u64::try_from(shared).unwrap_or(u64::MAX),
        "{}",
        proxy.output()
    );
    (setup, proxy, admin)
}

/// Pins counted, all reasons together.
async fn pins(admin: SocketAddr) -> f64 {
    let body = http_get(&format!("http://{admin}/metrics")).await.body;
    body.lines()
        .filter(|l| l.starts_with("redis_proxy_multiplex_pins_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn bulk(s: &str) -> Value {
    Value::bulk(s)
}

#[tokio::test]
async fn a_pipeline_that_pins_in_the_middle_keeps_its_order_and_the_name_it_set() {
    let (_setup, proxy, admin) = start(LIFETIME, 2, &[]).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let pipeline: Vec<&[&str]> = vec![
        &["SET", "p:k", "1"],
        &["CLIENT", "SETNAME", "pipeliner"],
        &["INCR", "p:k"],
        &["GET", "p:k"],
        &["MULTI"],
        &["INCR", "p:k"],
        &["GET", "p:k"],
        &["EXEC"],
        &["GET", "p:k"],
        &["CLIENT", "GETNAME"],
        &["ECHO", "last"],
    ];
    let bytes: Vec<u8> = pipeline
        .iter()
        .flat_map(|a| support::resp::encode_command(a))
        .collect();
    c.send_raw(&bytes).await;
    let want = vec![
        Value::ok(),
        Value::ok(),
        Value::Int(2),
        bulk("2"),
        Value::ok(),
        Value::simple("QUEUED"),
        Value::simple("QUEUED"),
        Value::Array(vec![Value::Int(3), bulk("3")]),
        bulk("3"),
        bulk("pipeliner"),
        bulk("last"),
    ];
    for (i, want) in want.into_iter().enumerate() {
        assert_eq!(c.read().await, want, "reply {i} ({:?})", pipeline[i]);
    }
    // The name set while shared is the pinned connection's own, as the server sees it.
    let info = c
        .cmd(&["CLIENT", "INFO"])
        .await
        .as_str()
        .expect("CLIENT INFO");
    assert!(
        info.split_whitespace().any(|f| f == "name=pipeliner"),
        "{info}"
    );
    assert_eq!(
        metric(
            admin,
            "redis_proxy_multiplex_pins_total{reason=\"transaction\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_clients{state=\"pinned\"}").await,
        1.0
    );
}

#[tokio::test]
async fn connect_time_chatter_of_real_clients_does_not_pin() {
    let (setup, proxy, admin) = start(LIFETIME, 2, &[]).await;
    // The redis crate sends CLIENT SETINFO on connect; SELECT 0 and a name are asked for.
    let url = format!("redis://{}/0", proxy.addr());
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("app")
        .query_async(&mut conn)
        .await
        .expect("setname");
    let _: () = redis::cmd("SET")
        .arg("chatter")
        .arg("v")
        .query_async(&mut conn)
        .await
        .expect("set");
    let v: String = redis::cmd("GET")
        .arg("chatter")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(v, "v");
    let name: String = redis::cmd("CLIENT")
        .arg("GETNAME")
        .query_async(&mut conn)
        .await
        .expect("getname");
    assert_eq!(name, "app");
    let mut raw = RespClient::connect(proxy.addr()).await;
    for (cmd, want) in [
        (&["SELECT", "0"][..], Value::ok()),
        (&["AUTH", "whatever"][..], Value::ok()),
        (&["PING"][..], Value::simple("PONG")),
        (&["ECHO", "e"][..], bulk("e")),
        (&["CLIENT", "GETNAME"][..], Value::Nil),
    ] {
        assert_eq!(raw.cmd(cmd).await, want, "{cmd:?}");
    }
    let hello = raw.cmd(&["HELLO", "2"]).await;
    assert!(
        hello.as_array().is_some(),
        "HELLO 2 answers in RESP2: {hello:?}"
    );
    assert_eq!(pins(admin).await, 0.0, "{}", proxy.output());
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_clients{state=\"shared\"}").await,
        2.0
    );
    // Two clients, two shared connections, and no other upstream connection: the warm pool
    // (as many as shared connections by default with --multiplex) waits for the first pin.
    assert_eq!(metric(admin, "redis_proxy_warm_connections").await, 0.0);
    assert_eq!(metric(admin, "redis_proxy_upstream_connections").await, 2.0);
    assert_eq!(setup.front().connections_open(), 2);
    // A RESP3 client is shared too, on RESP3 shared connections opened for it, and keeps
    // RESP3 when it is pinned later.
    let mut resp3 = RespClient::connect(proxy.addr()).await;
    let hello = resp3.cmd(&["HELLO", "3"]).await;
    assert!(matches!(hello, Value::Map(_)), "{hello:?}");
    assert_eq!(resp3.cmd(&["HSET", "h3", "f", "v"]).await, Value::Int(1));
    let map = resp3.cmd(&["HGETALL", "h3"]).await;
    assert_eq!(map, Value::Map(vec![(bulk("f"), bulk("v"))]));
    assert_eq!(resp3.cmd(&["CLIENT", "GETNAME"]).await, Value::Nil);
    assert_eq!(pins(admin).await, 0.0, "{}", proxy.output());
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_shared_connections").await,
        4.0
    );
    assert_eq!(resp3.cmd(&["MULTI"]).await, Value::ok());
    assert_eq!(resp3.cmd(&["HGETALL", "h3"]).await, Value::simple("QUEUED"));
    let exec = resp3.cmd(&["EXEC"]).await;
    assert_eq!(exec, Value::Array(vec![map]));
    assert_eq!(
        metric(
            admin,
            "redis_proxy_multiplex_pins_total{reason=\"transaction\"}"
        )
        .await,
        1.0
    );
    // That first pin woke the warm pool: the next pin finds a ready connection.
    wait_metric(admin, "redis_proxy_warm_connections", 2.0, &proxy).await;
    // 2 + 2 shared (RESP2, RESP3), the pinned client's own, the warm pool's 2.
    assert_eq!(setup.front().connections_open(), 7);
    let open: Vec<u64> = setup
        .redis
        .app_clients()
        .await
        .iter()
        .map(|c| c.id)
        .collect();
    let mut second = RespClient::connect(proxy.addr()).await;
    let Value::Int(id) = second.cmd(&["CLIENT", "ID"]).await else {
        panic!("CLIENT ID")
    };
    assert!(
        u64::try_from(id).is_ok_and(|id| open.contains(&id)),
        "the second pin's connection ({id}) was one of the warm ones ({open:?})"
    );
    // The pool refilled.
    wait_metric(admin, "redis_proxy_warm_connections", 2.0, &proxy).await;
    wait_metric(admin, "redis_proxy_upstream_connections", 8.0, &proxy).await;
}

/// One client's life: a random mix of shared commands whose replies it can predict, and now
/// and then a command that pins it (after which it goes on the same way).
async fn client_life(
    addr: SocketAddr,
    n: usize,
    seed: u64,
    until: Instant,
) -> Result<(usize, bool), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut c = RespClient::try_connect(addr)
        .await
        .map_err(|e| format!("client {n}: {e}"))?;
    let key = format!("life:{n}");
    let mut counter = 0i64;
    let mut commands = 0;
    let mut pinned = false;
    while Instant::now() < until {
        let roll = rng.u32(0..1000);
        let step = if roll < 4 && !pinned {
            pinned = true;
            match rng.u32(0..4) {
                0 => {
                    c.send(&["MULTI"]).await;
                    c.send(&["INCR", &key]).await;
                    c.send(&["EXEC"]).await;
                    counter += 1;
                    let got = (c.read().await, c.read().await, c.read().await);
                    let want = (
                        Value::ok(),
                        Value::simple("QUEUED"),
                        Value::Array(vec![Value::Int(counter)]),
                    );
                    (got == want)
                        .then_some(())
                        .ok_or(format!("client {n}: MULTI/EXEC {got:?}"))
                }
                1 => {
                    let got = c.cmd(&["BLPOP", &format!("{key}:list"), "0.01"]).await;
                    (got == Value::Nil)
                        .then_some(())
                        .ok_or(format!("client {n}: BLPOP {got:?}"))
                }
                2 => {
                    let got = (c.cmd(&["SELECT", "1"]).await, c.cmd(&["SELECT", "0"]).await);
                    (got == (Value::ok(), Value::ok()))
                        .then_some(())
                        .ok_or(format!("client {n}: SELECT {got:?}"))
                }
                _ => {
                    let got = c.cmd(&["CLIENT", "ID"]).await;
                    got.as_int()
                        .map(|_| ())
                        .ok_or(format!("client {n}: CLIENT ID {got:?}"))
                }
            }
        } else {
            // A short pipeline of shared commands.
            let len = rng.usize(1..6);
            let mut want = Vec::new();
            for _ in 0..len {
                match rng.u32(0..3) {
                    0 => {
                        counter += 1;
                        c.send(&["INCR", &key]).await;
                        want.push(Value::Int(counter));
                    }
                    1 => {
                        c.send(&["GET", &key]).await;
                        want.push(if counter == 0 {
                            Value::Nil
                        } else {
                            bulk(&counter.to_string())
                        });
                    }
                    _ => {
                        let token = format!("{n}-{}", rng.u32(..));
                        c.send(&["ECHO", &token]).await;
                        want.push(bulk(&token));
                    }
                }
            }
            let mut result = Ok(());
            for w in want {
                let got = c.read().await;
                if got != w && result.is_ok() {
                    result = Err(format!("client {n}: got {got:?}, want {w:?}"));
                }
            }
            result
        };
        step?;
        commands += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(20..120))).await;
    }
    Ok((commands, pinned))
}

#[tokio::test]
async fn a_thousand_clients_on_four_shared_connections_across_token_lifetimes() {
    let (setup, proxy, admin) = start(LIFETIME, 4, &[]).await;
    let expired_before = setup.front().tokens_expired();
    let until = Instant::now() + LIFETIME * 4;
    let addr = proxy.addr();
    let tasks: Vec<_> = (0..1000)
        .map(|n| tokio::spawn(client_life(addr, n, 0x5eed_0000 + n as u64, until)))
        .collect();
    let mut commands = 0;
    let mut pinned = 0;
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.expect("client task") {
            Ok((n, p)) => {
                commands += n;
                pinned += usize::from(p);
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} clients saw a wrong reply, first: {:?}\n{}",
        failures.len(),
        failures.first(),
        proxy.output()
    );
    assert!(commands > 10_000, "too little traffic: {commands}");
    assert!(pinned > 0, "no client pinned");
    // Tokens expired during the run and no connection was closed for it: the shared ones were
    // re-authenticated between commands.
    assert!(
        setup.front().tokens_expired() >= expired_before + 3,
        "too few token lifetimes"
    );
    assert_eq!(
        setup.front().connections_closed_by_server(),
        0,
        "{}",
        proxy.output()
    );
    assert_eq!(setup.front().auth_rejected(), 0);
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_shared_connections").await,
        4.0
    );
    assert!(metric(admin, "redis_proxy_reauth_total{result=\"success\"}").await >= 8.0);
    assert_eq!(pins(admin).await, pinned as f64);
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_failed_commands_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_closed_alone_and_others_go_on() {
    let (_setup, proxy, admin) = start(LIFETIME, 1, &[]).await;
    let mut setter = RespClient::connect(proxy.addr()).await;
    let big = "x".repeat(1024 * 1024);
    assert_eq!(setter.cmd(&["SET", "big", &big]).await, Value::ok());
    // 200 MiB of replies asked for, none read.
    let mut sluggard = RespClient::connect(proxy.addr()).await;
    let get = support::resp::encode_command(&["GET", "big"]);
    let burst: Vec<u8> = get.iter().copied().cycle().take(get.len() * 200).collect();
    sluggard.send_raw(&burst).await;
    // Everyone else, on the same shared connection, is served meanwhile.
    let started = Instant::now();
    let mut others = Vec::new();
    for n in 0..10 {
        let addr = proxy.addr();
        others.push(tokio::spawn(async move {
            let mut c = RespClient::connect(addr).await;
            for i in 0..100 {
                let v = format!("{n}-{i}");
                assert_eq!(c.cmd(&["ECHO", &v]).await, Value::bulk(&v));
            }
        }));
    }
    for o in others {
        o.await.expect("other client");
    }
    // Loose: a stalled shared connection would take the sluggard's 200 MiB to drain.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "others were slowed: {:?}",
        started.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(20), || proxy
            .output_contains("closing a shared client"))
        .await,
        "{}",
        proxy.output()
    );
    assert_eq!(
        metric(
            admin,
            "redis_proxy_client_rejections_total{reason=\"output_buffer\"}"
        )
        .await,
        1.0
    );
    // Its connection was closed: reading finds the end after what had been written.
    let mut closed = false;
    for _ in 0..1000 {
        match sluggard.try_read(Duration::from_secs(5)).await {
            Ok(_) => continue,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the sluggard was not closed");
    assert_eq!(
        setter.cmd(&["STRLEN", "big"]).await,
        Value::Int(1024 * 1024)
    );
}

/// Every client's replies together are bounded as well: three clients that each leave 30 MiB
/// unread (under the 32 MiB one client may hold) pass `--multiplex-reply-mib 16` and are
/// closed, while one that reads the same large values beside them is served to the end.
#[tokio::test]
async fn past_the_process_wide_reply_bound_the_non_readers_are_closed_not_the_reader() {
    let (_setup, proxy, admin) = start(LIFETIME, 1, &["--multiplex-reply-mib", "16"]).await;
    let mut setter = RespClient::connect(proxy.addr()).await;
    let big = "x".repeat(1024 * 1024);
    assert_eq!(setter.cmd(&["SET", "big", &big]).await, Value::ok());
    let get = support::resp::encode_command(&["GET", "big"]);
    let burst: Vec<u8> = get.iter().copied().cycle().take(get.len() * 30).collect();
    let mut sluggards = Vec::new();
    for _ in 0..3 {
        let mut sluggard = RespClient::connect(proxy.addr()).await;
        sluggard.send_raw(&burst).await;
        sluggards.push(sluggard);
    }
    let mut reader = RespClient::connect(proxy.addr()).await;
    for _ in 0..30 {
        assert_eq!(reader.cmd(&["GET", "big"]).await, Value::bulk(&big));
    }
    wait_metric(
        admin,
        "redis_proxy_client_rejections_total{reason=\"output_buffer\"}",
        3.0,
        &proxy,
    )
    .await;
    for mut sluggard in sluggards {
        let mut replies = 0;
        while sluggard.try_read(Duration::from_secs(5)).await.is_ok() {
            replies += 1;
        }
        assert!(replies < 30, "a non-reader got all {replies} replies");
    }
    // The reader is still served, and nobody else was closed.
    assert_eq!(
        reader.cmd(&["STRLEN", "big"]).await,
        Value::Int(1024 * 1024)
    );
    assert_eq!(
        metric(
            admin,
            "redis_proxy_client_rejections_total{reason=\"output_buffer\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn a_broken_shared_connection_fails_only_the_commands_in_flight() {
    let (setup, proxy, admin) = start(LIFETIME, 1, &[]).await;
    let mut busy = RespClient::connect(proxy.addr()).await;
    let mut idle = RespClient::connect(proxy.addr()).await;
    assert_eq!(idle.cmd(&["SET", "kept", "1"]).await, Value::ok());
    // A script that keeps the server busy for half a second: its reply can't come before the
    // connection is cut.
    let script = "local t = redis.call('TIME'); local s = t[1] * 1000000 + t[2]; \
                  while true do local n = redis.call('TIME'); \
                  if n[1] * 1000000 + n[2] - s > 500000 then return 'done' end end";
    busy.send(&["EVAL", script, "0"]).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    setup.front().disconnect_all();
    let reply = busy.read().await;
    let error = reply.error().unwrap_or_default().to_string();
    assert!(
        error.starts_with("ERR redis-entra-proxy: the shared upstream connection broke before this command's reply")
            && error.ends_with("it may or may not have run"),
        "{reply:?}"
    );
    // Both clients go on, on the reconnected shared connection (a reconnection while the
    // server is still busy with the script fails, and what was queued meanwhile is told so).
    let mut failed = 1.0;
    let mut answered = false;
    for _ in 0..100 {
        match busy.cmd(&["PING"]).await {
            Value::Simple(s) if s == "PONG" => {
                answered = true;
                break;
            }
            Value::Error(e) if e.starts_with("ERR redis-entra-proxy: ") => {
                failed += 1.0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(answered, "{}", proxy.output());
    assert_eq!(idle.cmd(&["GET", "kept"]).await, bulk("1"));
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_failed_commands_total").await,
        failed
    );
    // The server itself closing the shared connection (CLIENT KILL) is the same.
    let shared_conns = setup.redis.app_clients().await;
    assert_eq!(shared_conns.len(), 1, "{shared_conns:?}");
    let mut admin_conn = setup.redis.admin().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(shared_conns[0].id)
        .query_async(&mut admin_conn)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1);
    // A command racing the close may get the same clear error; then the reconnected one works.
    let mut answered = false;
    for _ in 0..100 {
        match idle.cmd(&["GET", "kept"]).await {
            v if v == bulk("1") => {
                answered = true;
                break;
            }
            Value::Error(e) if e.starts_with("ERR redis-entra-proxy: ") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(answered, "{}", proxy.output());
    assert_eq!(busy.cmd(&["ECHO", "after"]).await, bulk("after"));
}

#[tokio::test]
async fn while_the_server_is_busy_later_commands_gather_into_one_write() {
    // Tokens outlive the busy server here: a re-AUTH queued behind the script can't be
    // answered before it is (the refresh tests are the others).
    let (_setup, proxy, admin) = start(Duration::from_secs(60), 1, &[]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = RespClient::connect(proxy.addr()).await;
        assert_eq!(
            c.cmd(&["SET", &format!("g:{i}"), &i.to_string()]).await,
            Value::ok()
        );
        clients.push(c);
    }
    let writes0 = metric(admin, "redis_proxy_multiplex_commands_per_write_count").await;
    let sent0 = metric(admin, "redis_proxy_multiplex_commands_per_write_sum").await;
    // The first write: a script that keeps the server busy for two seconds. Nothing written
    // after it on this connection can be answered before it is.
    let mut busy = RespClient::connect(proxy.addr()).await;
    let script = "local t = redis.call('TIME'); local s = t[1] * 1000000 + t[2]; \
                  while true do local n = redis.call('TIME'); \
                  if n[1] * 1000000 + n[2] - s > 2000000 then return 'done' end end";
    let commands0 = metric(admin, "redis_proxy_commands_total").await;
    busy.send(&["EVAL", script, "0"]).await;
    // Then one GET per client, each handed to the shared connection before the next is sent
    // (so none of them could share a write by arriving together).
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&["GET", &format!("g:{i}")]).await;
        let want = commands0 + 2.0 + i as f64;
        assert!(
            support::wait_until_async(Duration::from_secs(5), || async {
                metric(admin, "redis_proxy_commands_total").await >= want
            })
            .await,
            "GET {i} was not handed to the shared connection\n{}",
            proxy.output()
        );
    }
    assert_eq!(busy.read().await, bulk("done"));
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.read().await, bulk(&i.to_string()));
    }
    // Two writes in flight (the script, the first GET); the other 19 GETs waited for the
    // script's reply and went out together: 21 commands in 3 writes, not 21.
    let writes = metric(admin, "redis_proxy_multiplex_commands_per_write_count").await - writes0;
    let sent = metric(admin, "redis_proxy_multiplex_commands_per_write_sum").await - sent0;
    assert_eq!((writes, sent), (3.0, 21.0), "{}", proxy.output());
}

#[tokio::test]
async fn large_replies_stream_through_a_shared_connection_and_large_commands_pin() {
    let (_setup, proxy, admin) = start(LIFETIME, 1, &[]).await;
    let mut a = RespClient::connect(proxy.addr()).await;
    let mut b = RespClient::connect(proxy.addr()).await;
    let value = "v".repeat(300 * 1024);
    assert_eq!(b.cmd(&["SET", "small", "s"]).await, Value::ok());
    // A command larger than a shared connection takes whole: this client is pinned first.
    assert_eq!(a.cmd(&["SET", "large", &value]).await, Value::ok());
    assert_eq!(
        metric(
            admin,
            "redis_proxy_multiplex_pins_total{reason=\"large_command\"}"
        )
        .await,
        1.0
    );
    // A large reply to a shared client, interleaved with another client's small ones.
    let mut c = RespClient::connect(proxy.addr()).await;
    for _ in 0..5 {
        c.send(&["GET", "large"]).await;
        b.send(&["GET", "small"]).await;
    }
    for _ in 0..5 {
        assert_eq!(c.read().await, bulk(&value));
        assert_eq!(b.read().await, bulk("s"));
    }
}

#[tokio::test]
async fn an_absurd_declared_length_is_refused_as_redis_refuses_it() {
    // Straight to Redis (access key): Redis's own refusal and close, relayed.
    let setup = Setup::access_key().await;
    let proxy = setup
        .start_proxy_with(&["--multiplex", "1", "--cluster", "off"], &[])
        .await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    c.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n")
        .await;
    assert_eq!(
        c.read().await,
        Value::Error("ERR Protocol error: invalid bulk length".into())
    );
    assert!(matches!(
        c.try_read(Duration::from_secs(5)).await,
        Err(support::resp::ReadError::Closed)
    ));
}

#[tokio::test]
async fn a_malformed_command_closes_only_its_client() {
    let (_setup, proxy, _admin) = start(LIFETIME, 1, &[]).await;
    let mut good = RespClient::connect(proxy.addr()).await;
    let mut bad = RespClient::connect(proxy.addr()).await;
    good.send(&["SET", "g", "1"]).await;
    bad.send_raw(b"*2\r\n$3\r\nGET\r\n$1\r\ng\r\n*1\r\nfoo\r\n")
        .await;
    assert_eq!(good.read().await, Value::ok());
    let first = bad.read().await;
    assert!(first == bulk("1") || first == Value::Nil, "{first:?}");
    assert_eq!(
        bad.read().await,
        Value::Error("ERR Protocol error: expected '$', got 'f'".into())
    );
    assert!(matches!(
        bad.try_read(Duration::from_secs(5)).await,
        Err(support::resp::ReadError::Closed)
    ));
    assert_eq!(good.cmd(&["GET", "g"]).await, bulk("1"));
}

#[tokio::test]
async fn with_a_listen_password_nothing_is_shared_before_it_and_no_upstream_is_opened() {
    let (setup, proxy, admin) = start(LIFETIME, 1, &["--listen-password", "pw"]).await;
    let open_before = setup.front().connections_open();
    let mut stranger = RespClient::connect(proxy.addr()).await;
    assert!(stranger.cmd(&["GET", "x"]).await.is_error_code("NOAUTH"));
    assert!(
        stranger
            .cmd(&["AUTH", "nope"])
            .await
            .is_error_code("WRONGPASS")
    );
    assert_eq!(
        setup.front().connections_open(),
        open_before,
        "a stranger opened an upstream connection"
    );
    let mut friend = RespClient::connect(proxy.addr()).await;
    assert_eq!(friend.cmd(&["AUTH", "pw"]).await, Value::ok());
    assert_eq!(friend.cmd(&["SET", "f", "1"]).await, Value::ok());
    assert_eq!(
        metric(admin, "redis_proxy_multiplex_clients{state=\"shared\"}").await,
        1.0
    );
    // Pinned after authenticating: its connection opens at once, the password still holds.
    assert_eq!(friend.cmd(&["MULTI"]).await, Value::ok());
    assert_eq!(friend.cmd(&["GET", "f"]).await, Value::simple("QUEUED"));
    assert_eq!(friend.cmd(&["EXEC"]).await, Value::Array(vec![bulk("1")]));
}

#[tokio::test]
async fn an_unreachable_cache_is_a_clear_error() {
    let port = support::redis_server::free_port();
    let upstream = format!("127.0.0.1:{port}");
    let proxy = ProxyProcess::start(
        &[
            "--upstream",
            &upstream,
            "--auth",
            "none",
            "--multiplex",
            "2",
            "--cluster",
            "off",
            "--connect-timeout",
            "1s",
        ],
        &[],
    )
    .await;
    let mut c = RespClient::connect(proxy.addr()).await;
    let reply = c.cmd(&["PING"]).await;
    let error = reply.error().unwrap_or_default();
    assert!(error.starts_with("ERR redis-entra-proxy: "), "{reply:?}");
    assert!(
        error.contains(&upstream) || error.contains("connect"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn without_the_command_table_every_client_is_pinned_and_served() {
    let setup = Setup::access_key().await;
    setup.redis.forbid_command_command().await;
    let proxy = setup
        .start_proxy_with(
            &[
                "--multiplex",
                "2",
                "--cluster",
                "off",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
        )
        .await;
    let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
    let mut c = RespClient::connect(proxy.addr()).await;
    assert_eq!(c.cmd(&["SET", "t", "1"]).await, Value::ok());
    assert_eq!(c.cmd(&["GET", "t"]).await, bulk("1"));
    assert!(
        proxy.output_contains("every client gets a connection of its own"),
        "{}",
        proxy.output()
    );
    assert_eq!(
        metric(
            admin,
            "redis_proxy_multiplex_pins_total{reason=\"no_command_table\"}"
        )
        .await,
        1.0
    );
}
