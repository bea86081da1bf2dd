//! Test infrastructure shared by the integration tests: include it with `mod support;`.
//!
//! Everything here binds `127.0.0.1:0` (a free loopback port), keeps its files in a temporary
//! directory owned by the returned value, and stops (kills processes, aborts tasks, deletes
//! files) when that value is dropped. Nothing sleeps and hopes: conditions are awaited with a
//! bounded poll ([`wait_until`]).
//!
//! The pieces:
//! * [`pki`]: a throw-away CA and a `localhost`/`127.0.0.1` server certificate ([`TestPki`]),
//!   or one for a single host name and nothing else ([`TestPki::for_host_only`]).
//! * [`redis_server`]: the real `redis-server`, TLS only, with Azure-like ACL users ([`RedisServer`]).
//! * [`cluster`]: a real Redis Cluster (3 masters, optionally a replica each), TLS only with a
//!   certificate for the host name `cache.test` alone, every node behind its own fake Azure
//!   front whose port it announces; slot migrations (`ASK`, then `MOVED`), failover, moving a
//!   node to a new port, killing a node ([`TestCluster`], [`ClusterOptions`]).
//! * [`token_issuer`]: mints Entra-like JWTs (HS256, `oid`, `exp`, `jti`, …) ([`TokenIssuer`]).
//! * [`token_endpoints`]: a fake App Service / Container Apps managed identity endpoint
//!   ([`ManagedIdentityEndpoint`]) and a fake Entra token endpoint over HTTPS ([`EntraEndpoint`]).
//! * [`azure_front`]: the fake Azure Cache for Redis front ([`AzureFront`]): TLS in front of the real
//!   Redis, which turns `AUTH <oid> <jwt>` into a per-token ACL user that is deleted when the
//!   token expires, so connections die at token expiry exactly as on Azure. It can also sit in
//!   front of any TLS Redis port (a cluster node: [`AzureFront::start_for_node`], [`FrontAuth`])
//!   and be stopped ([`AzureFront::stop`]).
//! * [`proxy`]: runs the real `redis-entra-proxy` binary ([`ProxyProcess`], [`run_to_end`]).
//! * [`resp`]: a small raw RESP2/RESP3 client ([`RespClient`]) for tests that need byte-level
//!   control (pipelining, `MULTI`, subscribed mode, noticing a closed connection).
//! * [`setup`]: ready-made combinations of the above ([`Setup`]).
//! * [`differential`]: the same bytes to Redis directly and through the proxy, compared.
//! * [`http`]: the HTTP server plumbing of the fakes, a fake forward proxy that records what
//!   reaches it ([`RecordingHttpProxy`]), and a tiny HTTP client ([`http_get`],
//!   [`http_request`]) for the fakes and the proxy's admin endpoint.
//!
//! Useful facts when writing a test:
//! * Which token a live connection is authenticated with: compare the `user` of
//!   [`RedisServer::app_clients`] with [`AzureFront::redis_user_for`]`(token)`; the front's
//!   [`AzureFront::auth_events`] show every token `AUTH` it checked.
//! * Token lifetimes are whole seconds of `exp`, rounded up (see [`token_issuer`]).
//! * The fakes run on the test's tokio runtime: use async waits (never block the thread)
//!   while the proxy talks to them.
//!
//! Not every test uses everything, hence the `dead_code` allowance.
#![allow(dead_code, unused_imports)]

pub mod azure_front;
pub mod cluster;
pub mod differential;
pub mod pki;
pub mod proxy;
pub mod redis_server;
pub mod resp;
pub mod setup;
pub mod token_endpoints;
pub mod token_issuer;

pub mod http;

pub use azure_front::{AuthEvent, AzureFront, FrontAuth};
pub use cluster::{ClusterOptions, NodeInfo, Role, TestCluster, key_for_slot, key_slot};
pub use http::{HttpResponse, RecordingHttpProxy, http_get, http_post, http_request};
pub use pki::TestPki;
pub use proxy::{ProxyProcess, RunOutput, run_to_end};
pub use redis_server::{ClientInfo, RedisServer};
pub use resp::{RespClient, Value};
pub use setup::Setup;
pub use token_endpoints::{EndpointMode, EntraEndpoint, ManagedIdentityEndpoint, TokenRequest};
pub use token_issuer::{Claims, TokenIssuer};

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_until`] and friends re-check their condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The value of one series of the proxy's `/metrics` at `admin`, written exactly (labels
/// included: `name{label="value"}`); panics, showing the page, when it is missing.
pub async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let body = http_get(&format!("http://{admin}/metrics")).await.body;
    body.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{body}"))
}

/// Waits (up to 20 s) until [`metric`] `series` at `admin` is `want`; panics with the value
/// and the proxy's output otherwise.
pub async fn wait_metric(
    admin: std::net::SocketAddr,
    series: &str,
    want: f64,
    proxy: &ProxyProcess,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(admin, series).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {v}, expected {want}\n--- proxy output ---\n{}",
            proxy.output()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns `true` (→ `true`) or `timeout` has
/// passed (→ `false`). The condition is always checked at least once, and once more at the end.
///
/// ```ignore
/// assert!(wait_until(Duration::from_secs(5), || front.connections_open() == 0).await);
/// ```
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`wait_until`] for a condition that must itself be awaited (e.g. a Redis query).
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Installs ring as the process-wide rustls crypto provider (idempotent).
///
/// The test binary links rustls with both ring (ours) and aws-lc-rs (pulled in by reqwest), so
/// rustls can't pick a default by itself; the `redis` crate's TLS support uses the default.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Seconds since the Unix epoch, as `f64` (millisecond precision is all the fakes need).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

/// A random lowercase hex string of `n` characters.
pub fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap())
        .collect()
}

/// A random GUID-shaped string (object ids, client ids, …).
pub fn random_uuid() -> String {
    format!(
        "{}-{}-{}-{}-{}",
        random_hex(8),
        random_hex(4),
        random_hex(4),
        random_hex(4),
        random_hex(12)
    )
}

/// Formats a duration for a command-line flag of the proxy (`1500ms`), which humantime parses.
pub fn dur_arg(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
