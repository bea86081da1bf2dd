//! What a client sees when things go wrong, and the limits that keep the proxy healthy.
//!
//! * Upstream failures (spec §3 "Upstream failure"): a wrong access key, an upstream that can't
//!   be reached or dies mid-connection, token endpoints that fail or hang — one clear RESP error
//!   naming `redis-entra-proxy`, then the connection is closed; the proxy keeps running and
//!   recovers by itself.
//! * Bad input (spec §3 "Bad input"): malformed RESP gets a protocol error and only that
//!   connection is closed; a client that never reads is back-pressured with bounded memory.
//! * Large values, `--max-connections`, a unix socket listener, `--listen-password`, and both
//!   connection-string forms.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::redis_server::free_port;
use support::resp::{ReadError, encode_command};
use support::{EndpointMode, ProxyProcess, RespClient, Setup, Value, random_hex, wait_until};

// ----- helpers -----------------------------------------------------------------------------

/// Sends `args`, ignoring a write error (the proxy may already have answered and closed).
async fn send_ignoring_errors(c: &mut RespClient, args: &[&str]) {
    let _ = c.try_send_raw(&encode_command(args)).await;
}

/// Reads exactly one reply, which must be an error starting with `prefix`; then the connection
/// must be closed with nothing else sent. Returns the error text.
async fn expect_error_then_close(c: &mut RespClient, prefix: &str, proxy: &ProxyProcess) -> String {
    let error = match c.try_read(Duration::from_secs(10)).await {
        Ok(Value::Error(e)) => e,
        other => panic!(
            "expected an error starting with {prefix:?}, got {other:?}\n--- proxy output ---\n{}",
            proxy.output()
        ),
    };
    assert!(
        error.starts_with(prefix),
        "expected an error starting with {prefix:?}, got {error:?}\n--- proxy output ---\n{}",
        proxy.output()
    );
    match c.try_read(Duration::from_secs(5)).await {
        Err(ReadError::Closed) => {}
        other => panic!(
            "after the error {error:?} the connection should close, got {other:?}\n\
             --- proxy output ---\n{}",
            proxy.output()
        ),
    }
    error
}

/// Asserts that the proxy closes `c` within `timeout` without sending anything first.
async fn expect_closed_silently(c: &mut RespClient, timeout: Duration, what: &str) {
    match c.try_read(timeout).await {
        Err(ReadError::Closed) => {}
        other => panic!("{what}: expected the connection to be closed, got {other:?}"),
    }
}

/// One `SET`/`GET` round trip with a fresh value: the connection works.
async fn assert_works(c: &mut RespClient, key: &str) {
    let value = random_hex(16);
    assert_eq!(c.cmd(&["SET", key, &value]).await, Value::ok());
    assert_eq!(c.cmd(&["GET", key]).await, Value::bulk(&value));
}

/// A new connection through the proxy whose `PING` gets `PONG` (`None` if it gets anything
/// else, e.g. the proxy's error because no token is there yet).
async fn try_working_connection(proxy: &ProxyProcess) -> Option<RespClient> {
    let mut c = RespClient::try_connect(proxy.addr()).await.ok()?;
    c.try_send_raw(&encode_command(&["PING"])).await.ok()?;
    match c.try_read(Duration::from_secs(5)).await {
        Ok(v) if v == Value::simple("PONG") => Some(c),
        _ => None,
    }
}

/// Waits (bounded) until a new connection through the proxy works; returns it and the time.
async fn wait_for_working_connection(proxy: &ProxyProcess, timeout: Duration) -> RespClient {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = try_working_connection(proxy).await {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no working connection within {timeout:?}\n--- proxy output ---\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Deterministic pseudo-random bytes (incompressible enough, and any corruption shows).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Reads one reply and checks that it is the bulk string `expected`, without printing megabytes.
async fn expect_big_bulk(c: &mut RespClient, expected: &[u8], what: &str) {
    match c.try_read(Duration::from_secs(30)).await {
        Ok(Value::Bulk(b)) => {
            assert_eq!(b.len(), expected.len(), "{what}: wrong length");
            assert!(b == expected, "{what}: the bytes differ");
        }
        Ok(other) => panic!(
            "{what}: expected a bulk string, got {:.200}",
            format!("{other:?}")
        ),
        Err(e) => panic!("{what}: {e:?}"),
    }
}

// ----- 1. wrong access key -----------------------------------------------------------------

#[tokio::test]
async fn a_wrong_access_key_gives_one_clear_error_and_closes_every_time() {
    let setup = Setup::access_key().await;
    let wrong = format!("WrongKey{}", random_hex(24));
    let mut proxy = setup
        .start_proxy_with(&[], &[("AZURE_REDIS_PASSWORD", &wrong)])
        .await;
    for attempt in 1..=2 {
        let mut c = proxy.raw().await;
        send_ignoring_errors(&mut c, &["PING"]).await;
        let error = expect_error_then_close(
            &mut c,
            "ERR redis-entra-proxy: upstream authentication failed: WRONGPASS",
            &proxy,
        )
        .await;
        assert!(
            !error.contains(&wrong),
            "attempt {attempt}: the key is in the error"
        );
        assert!(proxy.is_running(), "the proxy exited after a failed AUTH");
    }
    assert!(!proxy.output().contains(&wrong), "the key is in the log");
}

// ----- 2. dead upstream --------------------------------------------------------------------

#[tokio::test]
async fn an_unreachable_upstream_gives_one_clear_error_and_closes() {
    let setup = Setup::access_key().await;
    let port = free_port();
    let upstream = format!("127.0.0.1:{port}");
    let mut proxy = setup
        .start_proxy_with(&["--upstream", &upstream], &[])
        .await;
    for _ in 0..2 {
        let start = Instant::now();
        let mut c = proxy.raw().await;
        send_ignoring_errors(&mut c, &["PING"]).await;
        expect_error_then_close(
            &mut c,
            &format!("ERR redis-entra-proxy: cannot connect to upstream {upstream}"),
            &proxy,
        )
        .await;
        assert!(start.elapsed() < Duration::from_secs(5), "took too long");
    }
    assert!(proxy.is_running());
}

#[tokio::test]
async fn an_upstream_that_never_answers_gives_a_timeout_error() {
    let setup = Setup::access_key().await;
    // Accepts TCP connections (the kernel does, up to the backlog) but never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = silent.local_addr().unwrap().to_string();
    let proxy = setup
        .start_proxy_with(&["--upstream", &upstream, "--connect-timeout", "1s"], &[])
        .await;
    let start = Instant::now();
    let mut c = proxy.raw().await;
    send_ignoring_errors(&mut c, &["PING"]).await;
    expect_error_then_close(
        &mut c,
        &format!("ERR redis-entra-proxy: upstream {upstream} did not answer within"),
        &proxy,
    )
    .await;
    assert!(start.elapsed() < Duration::from_secs(4), "took too long");
    drop(silent);
}

#[tokio::test]
async fn an_upstream_certificate_that_doesnt_match_gives_a_tls_error() {
    let setup = Setup::access_key().await;
    let proxy = setup
        .start_proxy_with(&["--tls-server-name", "not-the-cache.example"], &[])
        .await;
    let mut c = proxy.raw().await;
    send_ignoring_errors(&mut c, &["PING"]).await;
    let error = expect_error_then_close(
        &mut c,
        &format!(
            "ERR redis-entra-proxy: upstream TLS handshake with {} failed",
            setup.redis.addr()
        ),
        &proxy,
    )
    .await;
    assert!(
        !error.contains(&setup.redis.access_key()),
        "the key is in the error"
    );
}

#[tokio::test]
async fn when_the_server_dies_clients_are_closed_and_new_ones_told_why() {
    let mut setup = Setup::access_key().await;
    let proxy = setup.start_proxy().await;
    let mut busy = proxy.raw().await;
    assert_works(&mut busy, "k").await;
    let mut idle = proxy.raw().await;
    assert_eq!(idle.cmd(&["PING"]).await, Value::simple("PONG"));
    let mut blocked = proxy.raw().await;
    assert_eq!(blocked.cmd(&["PING"]).await, Value::simple("PONG"));
    blocked.send(&["BLPOP", "never", "0"]).await;
    blocked.expect_silence(Duration::from_millis(200)).await;

    setup.redis.kill();

    expect_closed_silently(&mut idle, Duration::from_secs(5), "idle client").await;
    expect_closed_silently(&mut blocked, Duration::from_secs(5), "client in BLPOP").await;
    // The busy client's next command finds its connection closed (never a hang).
    let _ = busy.try_send_raw(&encode_command(&["GET", "k"])).await;
    expect_closed_silently(&mut busy, Duration::from_secs(5), "busy client").await;

    let mut late = proxy.raw().await;
    send_ignoring_errors(&mut late, &["PING"]).await;
    expect_error_then_close(
        &mut late,
        &format!(
            "ERR redis-entra-proxy: cannot connect to upstream {}",
            setup.redis.addr()
        ),
        &proxy,
    )
    .await;
}

#[tokio::test]
async fn an_azure_side_disconnect_closes_clients_and_new_ones_work() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let proxy = setup.start_proxy().await;
    let mut a = proxy.raw().await;
    assert_works(&mut a, "a").await;
    let mut blocked = proxy.raw().await;
    assert_eq!(blocked.cmd(&["PING"]).await, Value::simple("PONG"));
    blocked.send(&["BLPOP", "never", "0"]).await;
    blocked.expect_silence(Duration::from_millis(200)).await;
    assert!(
        wait_until(Duration::from_secs(5), || setup.front().connections_open()
            == 2)
        .await
    );

    setup.front().disconnect_all();

    expect_closed_silently(&mut a, Duration::from_secs(5), "idle client").await;
    expect_closed_silently(&mut blocked, Duration::from_secs(5), "client in BLPOP").await;
    let mut b = proxy.raw().await;
    assert_works(&mut b, "b").await;
}

// ----- 3. token endpoint failing or hanging at start-up ------------------------------------

/// A client of a proxy that has no token gets one error naming the proxy, within a bound.
async fn expect_no_token_error(proxy: &ProxyProcess, bound: Duration) -> String {
    let start = Instant::now();
    let mut c = proxy.raw().await;
    send_ignoring_errors(&mut c, &["PING"]).await;
    let error = expect_error_then_close(&mut c, "ERR redis-entra-proxy: ", proxy).await;
    let took = start.elapsed();
    eprintln!("after {took:?}: {error}");
    assert!(took < bound, "the error took {took:?} (bound {bound:?})");
    let lower = error.to_ascii_lowercase();
    assert!(
        lower.contains("token") || lower.contains("credential"),
        "the error doesn't say it is about the token: {error:?}"
    );
    error
}

#[tokio::test]
async fn a_failing_token_endpoint_at_start_gives_a_clear_error_then_recovers() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    setup.msi().set_mode(EndpointMode::Fail(500));
    let proxy = setup
        .start_proxy_with(&["--connect-timeout", "2s"], &[])
        .await;
    expect_no_token_error(&proxy, Duration::from_secs(5)).await;
    assert!(
        setup.msi().requests() >= 1,
        "the endpoint was never asked for a token"
    );
    // Still failing: still the same clear answer.
    expect_no_token_error(&proxy, Duration::from_secs(5)).await;

    setup.msi().set_mode(EndpointMode::Ok);
    let mut c = wait_for_working_connection(&proxy, Duration::from_secs(15)).await;
    assert_works(&mut c, "k").await;
}

#[tokio::test]
async fn a_hanging_token_endpoint_at_start_gives_a_clear_error_then_recovers() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    setup.msi().set_mode(EndpointMode::Hang);
    let proxy = setup
        .start_proxy_with(&["--connect-timeout", "2s"], &[])
        .await;
    expect_no_token_error(&proxy, Duration::from_secs(5)).await;

    setup.msi().set_mode(EndpointMode::Ok);
    let switched = Instant::now();
    let mut c = wait_for_working_connection(&proxy, Duration::from_secs(40)).await;
    eprintln!(
        "recovered {:?} after the endpoint stopped hanging",
        switched.elapsed()
    );
    assert_works(&mut c, "k").await;
}

// ----- 4. token endpoint outages while serving ---------------------------------------------

const SHORT_LIFETIME: Duration = Duration::from_secs(3);

/// Failed token requests so far (requests that got no token).
fn failed_requests(setup: &Setup) -> u64 {
    setup.msi().requests() - setup.msi().tokens_served()
}

/// Waits until the endpoint hands out one more token than now (i.e. right after a refresh).
async fn wait_for_next_token(setup: &Setup, proxy: &ProxyProcess) {
    let served = setup.msi().tokens_served();
    assert!(
        wait_until(Duration::from_secs(10), || setup.msi().tokens_served()
            > served)
        .await,
        "no token refresh\n--- proxy output ---\n{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_the_token_lifetime_goes_unnoticed() {
    let setup = Setup::entra_app_service(SHORT_LIFETIME).await;
    let proxy = setup.start_proxy().await;
    let addr = proxy.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = RespClient::connect(addr).await;
            let id = c.cmd(&["CLIENT", "ID"]).await;
            let mut n = 0i64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                c.send(&["INCR", "counter"]).await;
                match c.try_read(Duration::from_secs(5)).await {
                    Ok(Value::Int(i)) if i == n => {}
                    other => return Err(format!("INCR #{n}: {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let id_after = c.cmd(&["CLIENT", "ID"]).await;
            if id_after != id {
                return Err(format!(
                    "upstream connection replaced: {id:?} → {id_after:?}"
                ));
            }
            Ok(n)
        }
    });

    wait_for_next_token(&setup, &proxy).await;
    // Right after a refresh: fail until the proxy has seen at least two failed requests (the
    // next refresh and a retry), i.e. an outage of ~1.5–2 s, well within the 3 s lifetime.
    let failed_before = failed_requests(&setup);
    setup.msi().set_mode(EndpointMode::Fail(500));
    let outage = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || failed_requests(&setup)
            >= failed_before + 2)
        .await,
        "the proxy didn't ask for a token during the outage\n{}",
        proxy.output()
    );
    setup.msi().set_mode(EndpointMode::Ok);
    let outage = outage.elapsed();
    assert!(outage < SHORT_LIFETIME, "the outage lasted {outage:?}");
    // Two more refreshes after the outage, then stop.
    wait_for_next_token(&setup, &proxy).await;
    wait_for_next_token(&setup, &proxy).await;
    stop.store(true, Ordering::SeqCst);
    let n = worker
        .await
        .expect("worker task")
        .unwrap_or_else(|e| panic!("{e}\n--- proxy output ---\n{}", proxy.output()));
    assert!(n > 20, "only {n} commands");
    assert_eq!(
        setup.front().connections_closed_by_server(),
        0,
        "the front closed a connection (a token expired)\n{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_token_lifetime_closes_and_then_recovers() {
    let setup = Setup::entra_app_service(SHORT_LIFETIME).await;
    let proxy = setup
        .start_proxy_with(&["--connect-timeout", "1s"], &[])
        .await;
    let mut live = proxy.raw().await;
    assert_works(&mut live, "live").await;
    wait_for_next_token(&setup, &proxy).await;
    setup.msi().set_mode(EndpointMode::Fail(500));
    let outage = Instant::now();

    // Azure closes the connection when the token of its last AUTH expires.
    expect_closed_silently(
        &mut live,
        SHORT_LIFETIME + Duration::from_secs(5),
        "live connection during a long outage",
    )
    .await;
    assert!(setup.front().tokens_expired() >= 1);
    assert!(setup.front().connections_closed_by_server() >= 1);

    // While the outage lasts, new connections are told why they can't be served.
    let error = expect_no_token_error(&proxy, Duration::from_secs(5)).await;
    assert!(
        outage.elapsed() > SHORT_LIFETIME,
        "the outage should outlast the token ({error})"
    );

    setup.msi().set_mode(EndpointMode::Ok);
    let mut c = wait_for_working_connection(&proxy, Duration::from_secs(10)).await;
    assert_works(&mut c, "after").await;
}

// ----- 5. malformed RESP -------------------------------------------------------------------

/// Malformed input gets exactly what Redis itself answers (Redis is the oracle: the same bytes
/// are sent to a plain redis-server and through the proxy), and only that connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_redis_own_answer_and_only_that_connection_closes() {
    use support::differential::{PlainRedis, Script, Step, compare, play};
    let setup = Setup::access_key().await;
    let proxy = setup.start_proxy().await;
    let direct = PlainRedis::start().await;
    let mut good = proxy.raw().await;
    assert_works(&mut good, "good").await;

    // (An inline line over 64 KiB *with* its newline is refused by the proxy; Redis accepts one
    // that arrives in the read that crosses 64 KiB: see the README.)
    let too_big_inline = vec![b'x'; 70 * 1024];
    let mut nul_then_payload = b"\x00".to_vec();
    nul_then_payload.extend(std::iter::repeat_n(b'A', 70 * 1024));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("non-numeric bulk length", b"*1\r\n$abc\r\n".to_vec()),
        ("absurd bulk length", b"*1\r\n$999999999999\r\n".to_vec()),
        (
            "bulk length over 512 MB",
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n".to_vec(),
        ),
        ("non-numeric multibulk length", b"*abc\r\n".to_vec()),
        ("multibulk length over INT_MAX", b"*3000000000\r\n".to_vec()),
        (
            "not a bulk where one must be",
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n".to_vec(),
        ),
        // Redis's line search stops at a NUL: it waits for more, as the proxy does.
        (
            "a NUL where a bulk header must be",
            b"*2\r\n$3\r\nGET\r\n\x00\xffjunk\r\n".to_vec(),
        ),
        // Redis skips the two bytes after a payload unread: PINGxx is a PING.
        (
            "bulk not followed by CRLF",
            b"*1\r\n$4\r\nPINGxx\r\n".to_vec(),
        ),
        ("binary garbage length", b"*\x01\x02\xfe\r\n".to_vec()),
        ("unbalanced quotes inline", b"SET \"abc def\r\n".to_vec()),
        (
            "closing quote not followed by a space",
            b"set \"\"\"test-key\"\"\" v\r\nping\r\n".to_vec(),
        ),
        ("inline line over 64 KiB, no newline", too_big_inline),
        ("a NUL hides an inline line's end", nul_then_payload),
        (
            "empty and negative multibulk headers",
            b"*0\r\n*-1\r\n*-5\r\n\r\n".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        // A valid command first: its reply comes before the error.
        let mut send = support::resp::encode_command(&["PING"]);
        send.extend_from_slice(&bytes);
        let script = Script {
            connections: 1,
            steps: vec![
                Step::Send(0, send),
                Step::Pause(Duration::from_millis(200)),
                Step::Send(0, support::resp::encode_command(&["PING", "after"])),
            ],
        };
        let (d, p) = tokio::join!(
            play(direct.addr(), &script, Duration::from_millis(50)),
            play(proxy.addr(), &script, Duration::from_millis(50))
        );
        if let Err(diff) = compare(&script, &d, &p) {
            panic!("{name}: {diff}\n--- proxy output ---\n{}", proxy.output());
        }
        // The other client is unaffected.
        assert_works(&mut good, "good").await;
    }
    assert_works(&mut proxy.raw().await, "new").await;
}

#[tokio::test]
async fn empty_and_negative_multibulk_headers_are_ignored_like_redis_does() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let proxy = setup.start_proxy().await;
    let mut c = proxy.raw().await;
    c.send_raw(b"*0\r\n*-1\r\n*-5\r\n").await;
    c.send(&["PING", "after"]).await;
    assert_eq!(c.read().await, Value::bulk("after"));
    c.expect_silence(Duration::from_millis(200)).await;
    assert_works(&mut c, "k").await;
}

// ----- 6. a client that never reads --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_back_pressured_with_bounded_memory() {
    const VALUE_LEN: usize = 1024 * 1024;
    const REQUESTS: usize = 300;
    let setup = Setup::access_key().await;
    let value = pattern(VALUE_LEN, 6);
    let mut admin = setup.redis.admin().await;
    let _: () = redis::cmd("SET")
        .arg("bigkey")
        .arg(&value[..])
        .query_async(&mut admin)
        .await
        .expect("SET bigkey");
    let proxy = setup.start_proxy().await;
    let pid = proxy.pid();

    let mut other = proxy.raw().await;
    assert_works(&mut other, "other").await;
    let mut slow = proxy.raw().await;
    assert_eq!(slow.cmd(&["PING"]).await, Value::simple("PONG"));
    let baseline = rss_kib(pid);

    let mut pipeline = Vec::new();
    for _ in 0..REQUESTS {
        pipeline.extend_from_slice(&encode_command(&["GET", "bigkey"]));
    }
    slow.send_raw(&pipeline).await;

    // For a few seconds the slow client reads nothing; the other one keeps working.
    let start = Instant::now();
    let mut peak = baseline;
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(3) {
        assert_works(&mut other, "other").await;
        peak = peak.max(rss_kib(pid));
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rounds > 10,
        "the other client only got {rounds} round trips"
    );
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("proxy RSS: baseline {baseline} KiB, peak {peak} KiB while the client didn't read");
    assert!(
        growth_mib < 64,
        "the proxy's memory grew by {growth_mib} MiB for a client that doesn't read"
    );

    // Then it reads everything, intact and in order.
    for i in 0..REQUESTS {
        expect_big_bulk(&mut slow, &value, &format!("GET #{i}")).await;
        if i % 50 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        growth_mib < 64,
        "the proxy's memory grew by {growth_mib} MiB while relaying the big replies"
    );
    assert_eq!(slow.cmd(&["PING"]).await, Value::simple("PONG"));
    assert_works(&mut other, "other").await;
}

// ----- 7. large values ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_value_round_trips_byte_identical() {
    let setup = Setup::access_key().await;
    let proxy = setup.start_proxy().await;
    let value = pattern(20 * 1024 * 1024, 7);
    let mut c = proxy.raw().await;
    let mut set = Vec::with_capacity(value.len() + 64);
    set.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$5\r\nlarge\r\n");
    set.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    c.send_raw(&set).await;
    assert_eq!(
        c.try_read(Duration::from_secs(30)).await.unwrap(),
        Value::ok()
    );

    // What reached the server is exactly what was sent.
    let stored: Vec<u8> = redis::cmd("GET")
        .arg("large")
        .query_async(&mut setup.redis.admin().await)
        .await
        .expect("GET large from the server");
    assert!(stored == value, "the server holds different bytes");

    // And what comes back is too (twice, pipelined, to see the framing after a big reply).
    c.send(&["GET", "large"]).await;
    c.send(&["GET", "large"]).await;
    c.send(&["PING"]).await;
    expect_big_bulk(&mut c, &value, "first GET").await;
    expect_big_bulk(&mut c, &value, "second GET").await;
    assert_eq!(c.read().await, Value::simple("PONG"));
}

// ----- 8. --max-connections ----------------------------------------------------------------

#[tokio::test]
async fn max_connections_turns_extra_clients_away_clearly() {
    let setup = Setup::access_key().await;
    let proxy = setup
        .start_proxy_with(&["--max-connections", "2"], &[])
        .await;
    let mut a = proxy.raw().await;
    assert_works(&mut a, "a").await;
    let mut b = proxy.raw().await;
    assert_works(&mut b, "b").await;

    let mut c = proxy.raw().await;
    send_ignoring_errors(&mut c, &["PING"]).await;
    expect_error_then_close(
        &mut c,
        "ERR redis-entra-proxy: too many connections",
        &proxy,
    )
    .await;
    assert_works(&mut a, "a").await;

    a.close().await;
    // Once the proxy has noticed, a new client is accepted.
    let mut d = wait_for_working_connection(&proxy, Duration::from_secs(5)).await;
    assert_works(&mut d, "d").await;
    assert_works(&mut b, "b").await;
    // And the limit still holds.
    let mut e = proxy.raw().await;
    send_ignoring_errors(&mut e, &["PING"]).await;
    expect_error_then_close(
        &mut e,
        "ERR redis-entra-proxy: too many connections",
        &proxy,
    )
    .await;
}

// ----- 9. unix socket ----------------------------------------------------------------------

#[tokio::test]
async fn a_unix_socket_listener_serves_clients() {
    let setup = Setup::access_key().await;
    let path = setup.dir.path().join("proxy.sock");
    let listen = format!("unix:{}", path.display());
    let proxy = setup.start_proxy_with(&["--listen", &listen], &[]).await;
    assert_eq!(proxy.listen_address(), listen);
    let mut a = RespClient::connect_unix(&path).await.expect("connect unix");
    let mut b = RespClient::connect_unix(&path).await.expect("connect unix");
    assert_works(&mut a, "a").await;
    assert_works(&mut b, "b").await;
    assert_eq!(a.cmd(&["SELECT", "1"]).await, Value::ok());
    assert_eq!(a.cmd(&["SET", "db1", "x"]).await, Value::ok());
    assert_eq!(b.cmd(&["EXISTS", "db1"]).await, Value::Int(0));
}

// ----- 10. --listen-password ---------------------------------------------------------------

async fn listen_password_behaviour(setup: &Setup) {
    let password = format!("ListenPw{}", random_hex(16));
    let proxy = setup
        .start_proxy_with(&["--listen-password", &password], &[])
        .await;

    // Nothing before AUTH.
    let mut c = proxy.raw().await;
    let r = c.cmd(&["GET", "k"]).await;
    assert!(r.is_error_code("NOAUTH"), "{r:?}");
    let r = c.cmd(&["HELLO", "3"]).await;
    assert!(r.is_error_code("NOAUTH"), "{r:?}");
    // Wrong passwords.
    let r = c.cmd(&["AUTH", "not-it"]).await;
    assert!(r.is_error_code("WRONGPASS"), "{r:?}");
    let r = c.cmd(&["AUTH", "default", "not-it"]).await;
    assert!(r.is_error_code("WRONGPASS"), "{r:?}");
    let r = c.cmd(&["HELLO", "3", "AUTH", "default", "not-it"]).await;
    assert!(r.is_error_code("WRONGPASS"), "{r:?}");
    let r = c.cmd(&["SET", "k", "v"]).await;
    assert!(r.is_error_code("NOAUTH"), "still not authenticated: {r:?}");
    // The right one.
    assert_eq!(c.cmd(&["AUTH", &password]).await, Value::ok());
    assert_works(&mut c, "k").await;

    // `AUTH default <pw>` too.
    let mut d = proxy.raw().await;
    assert_eq!(d.cmd(&["AUTH", "default", &password]).await, Value::ok());
    assert_works(&mut d, "k").await;

    // `HELLO 3 AUTH default <pw>`: RESP3 from then on.
    let mut h = proxy.raw().await;
    let hello = h
        .cmd(&["HELLO", "3", "AUTH", "default", &password, "SETNAME", "app"])
        .await;
    assert_eq!(hello.map_get("proto"), Some(&Value::Int(3)), "{hello:?}");
    assert_works(&mut h, "k").await;
    assert_eq!(h.cmd(&["CLIENT", "GETNAME"]).await, Value::bulk("app"));
    assert_eq!(h.cmd(&["GET", "missing"]).await, Value::Nil);
    assert!(
        !proxy.output().contains(&password),
        "the listen password is in the log"
    );
}

#[tokio::test]
async fn listen_password_with_an_access_key() {
    let setup = Setup::access_key().await;
    listen_password_behaviour(&setup).await;
}

#[tokio::test]
async fn listen_password_with_entra() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    listen_password_behaviour(&setup).await;
}

// ----- 11. connection strings --------------------------------------------------------------

/// Flags that point at the test server's certificate (the connection string gives the rest).
fn tls_flags(setup: &Setup) -> Vec<String> {
    vec![
        "--tls-server-name".into(),
        "localhost".into(),
        "--ca-file".into(),
        setup.pki.ca_path().display().to_string(),
    ]
}

/// Starts a proxy configured only by a connection string (flag or environment) plus TLS flags.
async fn proxy_with_connection_string(setup: &Setup, cs: &str, via_env: bool) -> ProxyProcess {
    let mut args = tls_flags(setup);
    let mut env = Vec::new();
    if via_env {
        env.push(("AZURE_REDIS_CONNECTIONSTRING", cs));
    } else {
        args.extend(["--connection-string".into(), cs.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ProxyProcess::start(&args, &env).await
}

/// Writes a unique key through the proxy and returns the database the server holds it in.
async fn database_of_a_write(setup: &Setup, proxy: &ProxyProcess) -> i64 {
    let key = format!("cs-{}", random_hex(8));
    let mut c = proxy.raw().await;
    assert_eq!(c.cmd(&["SET", &key, "v"]).await, Value::ok());
    let mut admin = setup.redis.admin().await;
    for db in 0..16 {
        let _: () = redis::cmd("SELECT")
            .arg(db)
            .query_async(&mut admin)
            .await
            .unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .unwrap();
        if exists == 1 {
            return db;
        }
    }
    panic!("the key written through the proxy is in no database");
}

#[tokio::test]
async fn a_rediss_url_connection_string_works() {
    let setup = Setup::access_key().await;
    let key = setup.redis.access_key();
    let port = setup.redis.port();
    for via_env in [false, true] {
        let proxy = proxy_with_connection_string(
            &setup,
            &format!("rediss://:{key}@127.0.0.1:{port}"),
            via_env,
        )
        .await;
        assert_eq!(database_of_a_write(&setup, &proxy).await, 0);
        assert!(!proxy.output().contains(&key), "the key is in the log");
    }
    // With a database in the path.
    let proxy = proxy_with_connection_string(
        &setup,
        &format!("rediss://:{key}@127.0.0.1:{port}/3"),
        false,
    )
    .await;
    assert_eq!(database_of_a_write(&setup, &proxy).await, 3);
}

#[tokio::test]
async fn a_stackexchange_connection_string_works() {
    let setup = Setup::access_key().await;
    let key = setup.redis.access_key();
    let port = setup.redis.port();
    let cs = format!("127.0.0.1:{port},password={key},ssl=True,defaultDatabase=2");
    for via_env in [false, true] {
        let proxy = proxy_with_connection_string(&setup, &cs, via_env).await;
        assert_eq!(
            database_of_a_write(&setup, &proxy).await,
            2,
            "via_env={via_env}"
        );
        assert!(!proxy.output().contains(&key), "the key is in the log");
    }
}

/// A client that leaves while blocked must not leave a blocked upstream connection behind:
/// Redis would hand the next pushed element to it, and nobody would ever read it. As Redis
/// itself does for a client that closes, the proxy closes the upstream connection at once.
async fn a_client_leaving_a_blpop_loses_no_element(setup: Setup) {
    let proxy = setup.start_proxy().await;
    let mut blocked = proxy.raw().await;
    blocked.send(&["BLPOP", "jobs", "0"]).await;
    let redis = &setup.redis;
    let blocked_in_redis = |want: bool| async move {
        let clients = redis.clients().await;
        clients
            .iter()
            .any(|c| c.cmd == "blpop" && c.flags.contains('b'))
            == want
    };
    assert!(
        support::wait_until_async(Duration::from_secs(10), || blocked_in_redis(true)).await,
        "the BLPOP never blocked in Redis"
    );
    drop(blocked);
    assert!(
        support::wait_until_async(Duration::from_secs(10), || blocked_in_redis(false)).await,
        "Redis still holds a blocked connection for a client that left"
    );
    // An ordinary Redis client now pushes one job: it stays in the list for the next consumer.
    let mut app = proxy.connection().await;
    let () = redis::cmd("RPUSH")
        .arg("jobs")
        .arg("j1")
        .query_async::<i64>(&mut app)
        .await
        .map(|_| ())
        .expect("RPUSH");
    let left: Vec<String> = redis::cmd("LRANGE")
        .arg("jobs")
        .arg(0)
        .arg(-1)
        .query_async(&mut app)
        .await
        .expect("LRANGE");
    assert_eq!(
        left,
        ["j1"],
        "the pushed element went to the departed client"
    );
}

#[tokio::test]
async fn a_client_leaving_a_blpop_loses_no_element_with_an_access_key() {
    a_client_leaving_a_blpop_loses_no_element(Setup::access_key().await).await;
}

#[tokio::test]
async fn a_client_leaving_a_sliced_blpop_loses_no_element_with_entra() {
    // Tokens of a minute: the BLPOP's slices last many seconds, longer than the wait below.
    a_client_leaving_a_blpop_loses_no_element(
        Setup::entra_app_service(Duration::from_secs(60)).await,
    )
    .await;
}
