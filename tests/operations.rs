//! Operations (spec §4): the admin endpoint in every state a pod goes through, the metrics as
//! they move, the shutdown sequence, the `wait` / `shutdown` subcommands, and JSON logs.
//!
//! Every test runs the real binary with `--admin-listen 127.0.0.1:0` and finds the admin port
//! in its `admin endpoint listening address=…` log line.
//!
//! * Probes: before the first token (`/startup` and `/readiness` 503, `/liveness` 200), healthy
//!   (all 200), token endpoint failing while the token lives (still ready) and after it expired
//!   (503), upstream down (readiness **stays** 200: it never dials the upstream), at
//!   `--max-connections` (503 until a client leaves), shutting down (503 while still accepting
//!   during `--shutdown-delay`); 404 and 405.
//! * Metrics that move: connections 0→1→0, totals, token refreshes, re-auths, the re-auth
//!   deadline (finite and in the future with a client, `+Inf` without), bytes, upstream errors.
//! * Shutdown: SIGTERM or `POST /quitquitquit` with a live connection; `--shutdown-delay`;
//!   `--shutdown-grace` running out; a second signal.
//! * `redis-entra-proxy wait` / `shutdown` against a running proxy, and without one.
//! * The control endpoint: with the admin port on every address (a pod), `/quitquitquit` is
//!   served only on the loopback control listener, never to a web page.
//! * `--log-format json`: every line is a JSON object with a message.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::redis_server::free_port;
use support::resp::encode_command;
use support::{
    EndpointMode, HttpResponse, ProxyProcess, RespClient, Setup, Value, http_request, random_hex,
    run_to_end, unix_now, wait_until,
};

// ----- helpers -----------------------------------------------------------------------------

/// How long the admin listening line may take to appear.
const ADMIN_UP: Duration = Duration::from_secs(10);

/// Starts the proxy of `setup` with an ephemeral admin port (plus `extra` flags); returns it
/// and the admin address.
async fn start(setup: &Setup, extra: &[&str]) -> (ProxyProcess, SocketAddr) {
    let mut args = vec!["--admin-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let proxy = setup.start_proxy_with(&args, &[]).await;
    let admin = proxy.wait_admin_addr(ADMIN_UP).await;
    (proxy, admin)
}

/// One request to the admin endpoint; `Err` on a transport error.
async fn try_admin(method: &str, admin: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let url = format!("http://{admin}{path}");
    http_request(method, &url, &[], None, None, Duration::from_secs(5)).await
}

/// One request to the admin endpoint; panics (with the proxy's output) on a transport error.
async fn admin(proxy: &ProxyProcess, method: &str, admin: SocketAddr, path: &str) -> HttpResponse {
    try_admin(method, admin, path).await.unwrap_or_else(|e| {
        panic!(
            "{method} {path}: {e}\n--- proxy output ---\n{}",
            proxy.output()
        )
    })
}

/// `GET path`, which must answer `status`; returns the response.
async fn expect_get(proxy: &ProxyProcess, at: SocketAddr, path: &str, status: u16) -> HttpResponse {
    let r = admin(proxy, "GET", at, path).await;
    assert_eq!(
        r.status,
        status,
        "GET {path}: {} {:?}\n--- proxy output ---\n{}",
        r.status,
        r.body,
        proxy.output()
    );
    r
}

/// Polls `GET path` until it answers `status` (bounded); returns that response.
async fn wait_status(
    proxy: &ProxyProcess,
    at: SocketAddr,
    path: &str,
    status: u16,
    timeout: Duration,
) -> HttpResponse {
    let deadline = Instant::now() + timeout;
    loop {
        let last = try_admin("GET", at, path).await;
        if let Ok(r) = &last
            && r.status == status
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} did not answer {status} within {timeout:?}; last: {last:?}\n\
             --- proxy output ---\n{}",
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` answers `status` at every poll for `duration`.
async fn stays_status(
    proxy: &ProxyProcess,
    at: SocketAddr,
    path: &str,
    status: u16,
    duration: Duration,
) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        expect_get(proxy, at, path, status).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The probe bodies are one line (what `kubectl describe pod` shows).
fn assert_one_line(r: &HttpResponse) {
    let body = r.body.trim_end_matches('\n');
    assert!(
        !body.is_empty() && !body.contains('\n'),
        "not one line: {:?}",
        r.body
    );
}

/// A parsed `/metrics` scrape: series (`name` or `name{labels}`) → value.
struct Scrape {
    text: String,
    series: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse::<f64>().ok()?))
            })
            .collect();
        Scrape { text, series }
    }

    /// The sum of every series of metric `name` (all label values).
    fn sum(&self, name: &str) -> f64 {
        self.series
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// The value of one series; panics with the whole scrape if it is missing.
    fn get(&self, series: &str) -> f64 {
        *self
            .series
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{}", self.text))
    }
}

/// Scrapes `/metrics` (which must answer 200 with the Prometheus text content type).
async fn scrape(proxy: &ProxyProcess, at: SocketAddr) -> Scrape {
    let r = expect_get(proxy, at, "/metrics", 200).await;
    let content_type = r.headers.get("content-type").cloned().unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content-type {content_type:?}"
    );
    Scrape::parse(r.body)
}

/// Polls `/metrics` until `cond` holds for `series` (bounded); returns that scrape.
async fn wait_metric(
    proxy: &ProxyProcess,
    at: SocketAddr,
    series: &str,
    timeout: Duration,
    cond: impl Fn(f64) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape(proxy, at).await;
        if cond(s.get(series)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {} did not reach the expected value within {timeout:?}\n{}\n\
             --- proxy output ---\n{}",
            s.get(series),
            s.text,
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A raw connection through the proxy whose `PING` got `PONG`.
async fn working_client(proxy: &ProxyProcess) -> RespClient {
    let mut c = proxy.raw().await;
    assert_eq!(
        c.cmd(&["PING"]).await,
        Value::simple("PONG"),
        "{}",
        proxy.output()
    );
    c
}

/// One `SET`/`GET` round trip with a fresh value.
async fn assert_works(c: &mut RespClient, key: &str) {
    let value = random_hex(16);
    assert_eq!(c.cmd(&["SET", key, &value]).await, Value::ok());
    assert_eq!(c.cmd(&["GET", key]).await, Value::bulk(&value));
}

/// True if a new client connection is refused (the listener is closed).
async fn refuses_connections(proxy: &ProxyProcess) -> bool {
    RespClient::try_connect(proxy.addr()).await.is_err()
}

// ----- probes ------------------------------------------------------------------------------

/// Before the first token: not started, not ready, but alive; recovers by itself.
async fn probes_before_the_first_token(mode: EndpointMode) {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    setup.msi().set_mode(mode);
    let (proxy, at) = start(&setup, &["--connect-timeout", "2s"]).await;
    let startup = expect_get(&proxy, at, "/startup", 503).await;
    assert!(
        startup.body.starts_with("not started"),
        "{:?}",
        startup.body
    );
    assert_one_line(&startup);
    let readiness = expect_get(&proxy, at, "/readiness", 503).await;
    assert_one_line(&readiness);
    expect_get(&proxy, at, "/liveness", 200).await;
    // Still so a little later (the probe retries; nothing flips by accident).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect_get(&proxy, at, "/startup", 503).await;
    expect_get(&proxy, at, "/readiness", 503).await;
    expect_get(&proxy, at, "/liveness", 200).await;
    let s = scrape(&proxy, at).await;
    assert_eq!(s.get("redis_proxy_token_expiry_timestamp_seconds"), 0.0);

    setup.msi().set_mode(EndpointMode::Ok);
    let ok = wait_status(&proxy, at, "/startup", 200, Duration::from_secs(45)).await;
    assert_eq!(ok.body.trim(), "ok");
    expect_get(&proxy, at, "/readiness", 200).await;
}

/// The proxy exits with status 0 within `within` (its output is shown if not).
async fn assert_exits_cleanly(proxy: &mut ProxyProcess, within: Duration) {
    let status = proxy.wait_exit(within).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}\n{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_at_start_means_not_started_not_ready_but_alive() {
    probes_before_the_first_token(EndpointMode::Fail(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_token_endpoint_at_start_means_not_started_not_ready_but_alive() {
    probes_before_the_first_token(EndpointMode::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_proxy_answers_200_everywhere_and_404_405_elsewhere() {
    let setup = Setup::access_key().await;
    let (mut proxy, at) = start(&setup, &[]).await;
    let startup = wait_status(&proxy, at, "/startup", 200, Duration::from_secs(10)).await;
    assert_eq!(startup.body.trim(), "ok");
    for path in ["/liveness", "/readiness", "/metrics"] {
        expect_get(&proxy, at, path, 200).await;
        let head = admin(&proxy, "HEAD", at, path).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
    }
    // Wrong methods: 405 with Allow; unknown paths: 404.
    for (method, path, allow) in [
        ("POST", "/readiness", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PUT", "/startup", "GET, HEAD"),
        ("POST", "/liveness", "GET, HEAD"),
        ("GET", "/quitquitquit", "POST"),
    ] {
        let r = admin(&proxy, method, at, path).await;
        assert_eq!(r.status, 405, "{method} {path}: {:?}", r.body);
        assert_eq!(r.headers.get("allow").map(String::as_str), Some(allow));
    }
    for path in [
        "/",
        "/health",
        "/readiness/",
        "/metrics/x",
        "/quitquitquit/",
    ] {
        assert_eq!(admin(&proxy, "GET", at, path).await.status, 404, "{path}");
    }
    assert_eq!(admin(&proxy, "POST", at, "/nope").await.status, 404);
    // None of that stopped anything.
    assert!(proxy.is_running());
    expect_get(&proxy, at, "/readiness", 200).await;
    let mut c = working_client(&proxy).await;
    assert_works(&mut c, "k").await;
    // Every metric of the spec is there, and the access key is not.
    let s = scrape(&proxy, at).await;
    for series in [
        "redis_proxy_client_connections",
        "redis_proxy_client_connections_total",
        "redis_proxy_upstream_connect_seconds_count",
        "redis_proxy_token_refresh_total{result=\"success\"}",
        "redis_proxy_token_refresh_total{result=\"failure\"}",
        "redis_proxy_token_expiry_timestamp_seconds",
        "redis_proxy_reauth_total{result=\"success\"}",
        "redis_proxy_reauth_total{result=\"failure\"}",
        "redis_proxy_upstream_errors_total{kind=\"connect\"}",
        "redis_proxy_bytes_total{direction=\"client_to_upstream\"}",
        "redis_proxy_bytes_total{direction=\"upstream_to_client\"}",
        "redis_proxy_reauth_deadline_timestamp_seconds",
    ] {
        s.get(series);
    }
    // An access key never expires.
    assert_eq!(
        s.get("redis_proxy_token_expiry_timestamp_seconds"),
        f64::INFINITY
    );
    assert!(
        !s.text.contains(&setup.redis.access_key()),
        "the key is in /metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_holds_while_the_token_lives_and_drops_when_it_expires() {
    let lifetime = Duration::from_secs(6);
    let setup = Setup::entra_app_service(lifetime).await;
    let (proxy, at) = start(&setup, &[]).await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(15)).await;

    // Right after a refresh, the token endpoint starts failing.
    let served = setup.msi().tokens_served();
    assert!(
        wait_until(Duration::from_secs(10), || setup.msi().tokens_served()
            > served)
        .await,
        "no token refresh\n{}",
        proxy.output()
    );
    setup.msi().set_mode(EndpointMode::Fail(500));
    let failing_since = Instant::now();
    let expiry = wait_metric(
        &proxy,
        at,
        "redis_proxy_token_expiry_timestamp_seconds",
        Duration::from_secs(2),
        |v| v > unix_now(),
    )
    .await
    .get("redis_proxy_token_expiry_timestamp_seconds");
    // Ready while the token still lives, although refreshes fail meanwhile.
    let until_expiry = Duration::from_secs_f64((expiry - unix_now() - 1.0).max(0.0));
    assert!(
        until_expiry >= Duration::from_secs(2),
        "token too close to expiry"
    );
    stays_status(&proxy, at, "/readiness", 200, until_expiry).await;
    wait_metric(
        &proxy,
        at,
        "redis_proxy_token_refresh_total{result=\"failure\"}",
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    // Expired: not ready, and it says why. Never before the expiry.
    let r = wait_status(&proxy, at, "/readiness", 503, Duration::from_secs(5)).await;
    assert!(
        unix_now() >= expiry - 0.2,
        "readiness dropped {:.1}s before the token expired",
        expiry - unix_now()
    );
    assert!(r.body.contains("credential"), "{:?}", r.body);
    assert_one_line(&r);
    expect_get(&proxy, at, "/liveness", 200).await;
    eprintln!(
        "failing for {:?} until readiness 503",
        failing_since.elapsed()
    );

    // The endpoint recovers: so does readiness.
    setup.msi().set_mode(EndpointMode::Ok);
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_stays_200_when_the_server_dies() {
    let mut setup = Setup::access_key().await;
    let (proxy, at) = start(&setup, &[]).await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(10)).await;
    let mut live = working_client(&proxy).await;

    setup.redis.kill();

    assert!(live.wait_closed(Duration::from_secs(5)).await.is_some());
    // A new client is told why...
    let mut late = proxy.raw().await;
    let _ = late.try_send_raw(&encode_command(&["PING"])).await;
    match late.try_read(Duration::from_secs(10)).await {
        Ok(Value::Error(e)) => assert!(e.contains("cannot connect to upstream"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // ...but the pod stays in its Service: readiness never dials the upstream.
    stays_status(&proxy, at, "/readiness", 200, Duration::from_secs(2)).await;
    expect_get(&proxy, at, "/startup", 200).await;
    expect_get(&proxy, at, "/liveness", 200).await;
    let s = scrape(&proxy, at).await;
    assert!(s.get("redis_proxy_upstream_errors_total{kind=\"connect\"}") >= 1.0);
    // The live connection that broke counts too (as `closed` or `io`, whichever it looked
    // like), not only the failed connect.
    assert!(
        s.sum("redis_proxy_upstream_errors_total")
            >= 1.0 + s.get("redis_proxy_upstream_errors_total{kind=\"connect\"}"),
        "the broken live connection is not counted as an upstream error\n{}",
        s.text
    );
    assert!(s.get("redis_proxy_client_rejections_total{reason=\"upstream\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_stays_200_when_azure_drops_every_connection() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let (proxy, at) = start(&setup, &[]).await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(15)).await;
    let mut live = working_client(&proxy).await;
    let errors_before = scrape(&proxy, at)
        .await
        .sum("redis_proxy_upstream_errors_total");

    setup.front().disconnect_all();

    assert!(live.wait_closed(Duration::from_secs(5)).await.is_some());
    stays_status(&proxy, at, "/readiness", 200, Duration::from_secs(1)).await;
    // The dropped connection shows in the upstream errors (`closed` or `io`).
    let s = scrape(&proxy, at).await;
    assert!(
        s.sum("redis_proxy_upstream_errors_total") > errors_before,
        "a connection Azure dropped is not counted as an upstream error\n{}\n\
         --- proxy output ---\n{}",
        s.text,
        proxy.output()
    );
    let mut again = working_client(&proxy).await;
    assert_works(&mut again, "k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_readiness_is_503_until_a_client_leaves() {
    let setup = Setup::access_key().await;
    let (proxy, at) = start(&setup, &["--max-connections", "1"]).await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(10)).await;

    let only = working_client(&proxy).await;
    let r = expect_get(&proxy, at, "/readiness", 503).await;
    assert!(r.body.contains("max-connections"), "{:?}", r.body);
    expect_get(&proxy, at, "/liveness", 200).await;
    expect_get(&proxy, at, "/startup", 200).await;
    // One more client is refused with a clear error.
    let mut extra = proxy.raw().await;
    let _ = extra.try_send_raw(&encode_command(&["PING"])).await;
    match extra.try_read(Duration::from_secs(5)).await {
        Ok(Value::Error(e)) => assert!(e.contains("too many connections"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
    wait_metric(
        &proxy,
        at,
        "redis_proxy_client_rejections_total{reason=\"max_connections\"}",
        Duration::from_secs(2),
        |v| v == 1.0,
    )
    .await;

    only.close().await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(5)).await;
}

// ----- metrics -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_connections_tokens_and_reauthentication() {
    let lifetime = Duration::from_secs(3);
    let setup = Setup::entra_app_service(lifetime).await;
    let (proxy, at) = start(&setup, &[]).await;
    wait_status(&proxy, at, "/startup", 200, Duration::from_secs(15)).await;

    let idle = scrape(&proxy, at).await;
    assert_eq!(idle.get("redis_proxy_client_connections"), 0.0);
    assert_eq!(
        idle.get("redis_proxy_reauth_deadline_timestamp_seconds"),
        f64::INFINITY,
        "no client, yet a deadline"
    );
    assert!(idle.get("redis_proxy_token_expiry_timestamp_seconds") > unix_now());
    assert!(idle.get("redis_proxy_upstream_connect_seconds_count") >= 1.0);
    let total_before = idle.get("redis_proxy_client_connections_total");
    let refreshes_before = idle.get("redis_proxy_token_refresh_total{result=\"success\"}");
    let up_before = idle.get("redis_proxy_bytes_total{direction=\"client_to_upstream\"}");
    let down_before = idle.get("redis_proxy_bytes_total{direction=\"upstream_to_client\"}");

    let mut c = working_client(&proxy).await;
    assert_works(&mut c, "k").await;
    let one = scrape(&proxy, at).await;
    assert_eq!(one.get("redis_proxy_client_connections"), 1.0);
    assert_eq!(one.get("redis_proxy_upstream_connections"), 1.0);
    assert_eq!(
        one.get("redis_proxy_client_connections_total"),
        total_before + 1.0
    );
    assert!(one.get("redis_proxy_bytes_total{direction=\"client_to_upstream\"}") > up_before);
    assert!(one.get("redis_proxy_bytes_total{direction=\"upstream_to_client\"}") > down_before);

    // Two token lifetimes with the client connected and busy: tokens are refreshed, the
    // connection re-authenticated, and the deadline is always finite and ahead.
    let reauth_before = one.get("redis_proxy_reauth_total{result=\"success\"}");
    let until = Instant::now() + 2 * lifetime;
    let mut deadlines = Vec::new();
    let mut last = one;
    while Instant::now() < until {
        assert_works(&mut c, "k").await;
        let s = scrape(&proxy, at).await;
        let deadline = s.get("redis_proxy_reauth_deadline_timestamp_seconds");
        let now = unix_now();
        assert!(
            deadline.is_finite() && deadline > now,
            "deadline {deadline} not finite and ahead of {now}\n{}",
            s.text
        );
        assert!(
            deadline <= now + lifetime.as_secs_f64() + 1.5,
            "deadline {deadline}"
        );
        deadlines.push(deadline);
        last = s;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "----- /metrics with one client connected -----\n{}",
        last.text
    );
    assert!(
        last.get("redis_proxy_token_refresh_total{result=\"success\"}") >= refreshes_before + 2.0,
        "{}",
        last.text
    );
    assert!(
        last.get("redis_proxy_reauth_total{result=\"success\"}") >= reauth_before + 1.0,
        "{}",
        last.text
    );
    assert_eq!(
        last.get("redis_proxy_reauth_total{result=\"failure\"}"),
        0.0
    );
    assert!(last.get("redis_proxy_reauth_seconds_count") >= 1.0);
    assert!(
        deadlines.last() > deadlines.first(),
        "the deadline never moved: {deadlines:?}"
    );
    assert!(last.get("redis_proxy_commands_total") >= 1.0);

    c.close().await;
    let gone = wait_metric(
        &proxy,
        at,
        "redis_proxy_client_connections",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    wait_metric(
        &proxy,
        at,
        "redis_proxy_reauth_deadline_timestamp_seconds",
        Duration::from_secs(5),
        |v| v == f64::INFINITY,
    )
    .await;
    assert_eq!(
        gone.get("redis_proxy_client_connections_total"),
        total_before + 1.0
    );

    // Another client counts again.
    let c2 = working_client(&proxy).await;
    wait_metric(
        &proxy,
        at,
        "redis_proxy_client_connections_total",
        Duration::from_secs(2),
        |v| v == total_before + 2.0,
    )
    .await;
    c2.close().await;
}

// ----- shutdown ----------------------------------------------------------------------------

/// How a graceful shutdown is asked for.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Sigterm,
    QuitQuitQuit,
}

async fn trigger(proxy: &ProxyProcess, at: SocketAddr, how: Trigger) {
    match how {
        Trigger::Sigterm => proxy.terminate(),
        Trigger::QuitQuitQuit => {
            let r = admin(proxy, "POST", at, "/quitquitquit").await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    }
}

/// With `--shutdown-delay 2s`: readiness 503 at once; new clients still accepted (and served)
/// during the delay, refused after; a live client works throughout; exit 0 once they leave.
async fn shutdown_with_a_delay(how: Trigger) {
    let delay = Duration::from_secs(2);
    let setup = Setup::access_key().await;
    let (mut proxy, at) = start(&setup, &["--shutdown-delay", "2s"]).await;
    wait_status(&proxy, at, "/readiness", 200, Duration::from_secs(10)).await;
    let mut live = working_client(&proxy).await;

    trigger(&proxy, at, how).await;
    let asked = Instant::now();
    let r = wait_status(&proxy, at, "/readiness", 503, Duration::from_secs(1)).await;
    assert!(r.body.contains("shutting down"), "{:?}", r.body);
    expect_get(&proxy, at, "/liveness", 200).await;

    // During the delay: a new client is accepted and served.
    let mut newcomer = working_client(&proxy).await;
    assert_works(&mut newcomer, "new").await;
    assert!(
        asked.elapsed() < delay,
        "the check took too long to prove anything"
    );
    assert_works(&mut live, "live").await;

    // After it: refused.
    let deadline = Instant::now() + delay + Duration::from_secs(3);
    while !refuses_connections(&proxy).await {
        assert!(
            Instant::now() < deadline,
            "still accepting {:?} after the shutdown request\n{}",
            asked.elapsed(),
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_after = asked.elapsed();
    assert!(
        refused_after >= delay - Duration::from_millis(200),
        "stopped accepting after {refused_after:?}, before the {delay:?} delay"
    );

    // Live clients keep working during the grace period; then exit 0 once they are gone.
    assert_works(&mut live, "live").await;
    assert_works(&mut newcomer, "new").await;
    expect_get(&proxy, at, "/readiness", 503).await;
    assert!(proxy.is_running());
    live.close().await;
    newcomer.close().await;
    assert_exits_cleanly(&mut proxy, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_delay_keeps_accepting_then_drains() {
    shutdown_with_a_delay(Trigger::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_with_a_delay_keeps_accepting_then_drains() {
    shutdown_with_a_delay(Trigger::QuitQuitQuit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_live_connection_finish_and_exits_as_soon_as_it_closes() {
    let setup = Setup::access_key().await;
    let (mut proxy, at) = start(&setup, &["--shutdown-grace", "30s"]).await;
    let mut live = working_client(&proxy).await;

    proxy.terminate();
    // No delay: the listener closes at once.
    assert!(
        support::wait_until_async(Duration::from_secs(3), || refuses_connections(&proxy)).await,
        "still accepting after SIGTERM\n{}",
        proxy.output()
    );
    // The live connection keeps working during the grace period.
    for i in 0..5 {
        assert_works(&mut live, &format!("k{i}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(proxy.is_running(), "exited with a live connection");
    let _ = try_admin("GET", at, "/readiness").await; // whatever it says, it must not hang

    live.close().await;
    let closed = Instant::now();
    assert_exits_cleanly(&mut proxy, Duration::from_secs(10)).await;
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "took {:?} to exit after the last connection closed",
        closed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_runs_out_live_connections_are_closed_and_the_exit_is_0() {
    let setup = Setup::access_key().await;
    let (mut proxy, _at) = start(&setup, &["--shutdown-grace", "1s"]).await;
    let mut live = working_client(&proxy).await;
    proxy.terminate();
    let took = live.wait_closed(Duration::from_secs(10)).await;
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(800)),
        "closed after {took:?}"
    );
    assert_exits_cleanly(&mut proxy, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let setup = Setup::access_key().await;
    let (mut proxy, _at) = start(&setup, &["--shutdown-grace", "60s"]).await;
    let _live = working_client(&proxy).await;
    proxy.terminate();
    support::wait_until_async(Duration::from_secs(3), || refuses_connections(&proxy)).await;
    assert!(proxy.is_running());
    proxy.signal("INT");
    let status = proxy.wait_exit(Duration::from_secs(2)).await;
    assert!(status.is_some(), "still running after a second signal");
    eprintln!("second signal: {status:?}");
}

/// The `preStop` hook case: `redis-entra-proxy shutdown` returns at once, and the kubelet then
/// sends SIGTERM as it always does. That SIGTERM is the first *signal*: it must not cut the
/// grace period short the way a second one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_quitquitquit_is_not_a_second_signal() {
    let setup = Setup::access_key().await;
    let (mut proxy, at) = start(&setup, &["--shutdown-grace", "30s"]).await;
    let mut live = working_client(&proxy).await;
    let r = admin(&proxy, "POST", at, "/quitquitquit").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_status(&proxy, at, "/readiness", 503, Duration::from_secs(1)).await;
    proxy.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        proxy.is_running(),
        "SIGTERM after /quitquitquit ended the process at once\n{}",
        proxy.output()
    );
    assert_works(&mut live, "k").await;
    live.close().await;
    assert_exits_cleanly(&mut proxy, Duration::from_secs(5)).await;
}

// ----- subcommands -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_once_the_proxy_is_up_and_shutdown_stops_it() {
    let setup = Setup::access_key().await;
    let admin_addr = format!("127.0.0.1:{}", free_port());
    // `wait` runs first, as an init container would, before anything listens.
    let waiting = tokio::spawn({
        let admin_addr = admin_addr.clone();
        async move {
            run_to_end(
                &["wait", "--max", "20s"],
                &[("REDIS_PROXY_ADMIN_LISTEN", &admin_addr)],
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !waiting.is_finished(),
        "wait returned before the proxy started"
    );
    let mut proxy = setup
        .start_proxy_with(&["--admin-listen", &admin_addr], &[])
        .await;
    let waited = waiting.await.expect("wait task");
    assert_eq!(
        waited.code(),
        Some(0),
        "{}\n--- proxy ---\n{}",
        waited.all(),
        proxy.output()
    );
    assert!(waited.stdout.contains("is up"), "{}", waited.all());
    let at: SocketAddr = admin_addr.parse().expect("address");
    expect_get(&proxy, at, "/startup", 200).await;

    // Already up: returns at once.
    let again = run_to_end(&["wait", "--admin-listen", &admin_addr], &[]).await;
    assert_eq!(again.code(), Some(0), "{}", again.all());

    let stopped = run_to_end(&["shutdown", "--admin-listen", &admin_addr], &[]).await;
    assert_eq!(stopped.code(), Some(0), "{}", stopped.all());
    assert!(
        stopped.stdout.contains("shutting down"),
        "{}",
        stopped.all()
    );
    assert_exits_cleanly(&mut proxy, Duration::from_secs(10)).await;

    // Nothing there any more: both fail with status 1 and say why.
    let gone = run_to_end(&["shutdown", "--admin-listen", &admin_addr], &[]).await;
    assert_eq!(gone.code(), Some(1), "{}", gone.all());
    assert!(gone.stderr.contains("cannot connect"), "{}", gone.all());
}

/// In a pod the admin port listens on every address, for the kubelet. A `POST /quitquitquit`
/// arriving there, even from a loopback peer (as a service mesh's sidecar forwards the pod
/// network's traffic), does not stop the proxy; the loopback control endpoint does, though not
/// for a web page, and `redis-entra-proxy shutdown` finds it from the same variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_pod_wide_admin_port_only_the_loopback_control_endpoint_stops_the_proxy() {
    let setup = Setup::access_key().await;
    let admin_env = format!("0.0.0.0:{}", free_port());
    let control_env = format!("127.0.0.1:{}", free_port());
    let env = [
        ("REDIS_PROXY_ADMIN_LISTEN", admin_env.as_str()),
        ("REDIS_PROXY_CONTROL_LISTEN", control_env.as_str()),
    ];
    let mut proxy = setup.start_proxy_with(&[], &env).await;
    let wide = proxy.wait_admin_addr(ADMIN_UP).await;
    let at: SocketAddr = format!("127.0.0.1:{}", wide.port())
        .parse()
        .expect("address");
    wait_status(&proxy, at, "/startup", 200, Duration::from_secs(10)).await;
    let refused = admin(&proxy, "POST", at, "/quitquitquit").await;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    assert!(refused.body.contains(&control_env), "{:?}", refused.body);
    let control = proxy.control_addr().expect("a control listening line");
    assert_eq!(control.to_string(), control_env);
    let url = format!("http://{control}/quitquitquit");
    for header in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = http_request("POST", &url, &[header], None, None, Duration::from_secs(5)).await;
        assert_eq!(r.map(|r| r.status), Ok(403), "{header:?}");
    }
    expect_get(&proxy, at, "/readiness", 200).await;
    expect_get(&proxy, control, "/readiness", 200).await;
    assert!(proxy.is_running());

    let stopped = run_to_end(&["shutdown"], &env).await;
    assert_eq!(stopped.code(), Some(0), "{}", stopped.all());
    assert!(stopped.stdout.contains(&control_env), "{}", stopped.all());
    assert_exits_cleanly(&mut proxy, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gives_up_after_max_with_the_reason() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    setup.msi().set_mode(EndpointMode::Fail(500));
    let (proxy, at) = start(&setup, &[]).await;
    let admin_addr = at.to_string();
    let started = Instant::now();
    let out = run_to_end(&["wait", "--admin-listen", &admin_addr, "--max", "1s"], &[]).await;
    let took = started.elapsed();
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("did not start within 1s"),
        "{}",
        out.all()
    );
    assert!(out.stderr.contains("503"), "{}", out.all());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        !out.stderr
            .contains(&setup.msi().identity_header().to_string()),
        "a secret in the output"
    );
    drop(proxy);
}

// ----- logs --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_a_message() {
    let setup = Setup::access_key().await;
    let (mut proxy, at) = start(&setup, &["--log-format", "json"]).await;
    let mut c = working_client(&proxy).await;
    assert_works(&mut c, "k").await;
    scrape(&proxy, at).await;
    c.close().await;
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "exit {status:?}");

    let lines = proxy.output_lines();
    assert!(lines.len() >= 3, "{lines:?}");
    let mut admin_line = false;
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let message = v
            .get("message")
            .or_else(|| v.pointer("/fields/message"))
            .and_then(|m| m.as_str());
        assert!(message.is_some(), "no message: {line}");
        assert!(v.get("level").is_some(), "no level: {line}");
        if message == Some("admin endpoint listening") {
            admin_line = v.get("address").or_else(|| v.pointer("/fields/address"))
                == Some(&serde_json::Value::String(at.to_string()));
        }
    }
    assert!(admin_line, "no admin listening line with its address");
}
