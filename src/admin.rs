//! The admin HTTP endpoint on `--admin-listen`: Kubernetes probes, Prometheus metrics and
//! `POST /quitquitquit`.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /startup` | 200 `ok` once started ([`Health::startup`]), else 503 and why |
//! | `GET /liveness` | 200 `ok` while the process serves HTTP at all |
//! | `GET /readiness` | 200 `ok` while [`Health::readiness`] is `Ok`, else 503 and why |
//! | `GET /metrics` | the Prometheus text exposition of [`Metrics`] |
//! | `POST /quitquitquit` | starts a graceful shutdown ([`Shutdown::request`]), 200 |
//!
//! `HEAD` works wherever `GET` does; another method on a known path is 405 (with `Allow`), an
//! unknown path 404.
//!
//! # Why plain hyper
//!
//! Five fixed routes need no framework, and the server must control each connection itself:
//! the admin port is often exposed to the pod network (the kubelet probes the pod IP, Prometheus
//! scrapes it), so a slow or hostile client must not be able to stall the proxy or starve the
//! probes. Hence:
//!
//! * a **header read timeout** ([`HEADER_READ_TIMEOUT`]; it also closes idle keep-alive
//!   connections) and a **lifetime cap** per connection ([`CONNECTION_LIFETIME`]), so a client
//!   that trickles bytes or never reads its answer is dropped;
//! * at most [`MAX_CONNECTIONS`] connections at once: one more gets a best-effort 503 and is
//!   closed at once instead of queueing (a probe then fails fast rather than timing out);
//! * a small request buffer ([`MAX_BUF_SIZE`]): no large headers held in memory;
//! * handlers only read atomics, a `watch` value and the metric registry: nothing waits for the
//!   relay, the upstream or the token endpoint. Readiness in particular never dials the upstream
//!   (see [`crate::health`] for why).
//!
//! `POST /quitquitquit` is accepted only from a loopback address. Its users (a Job's main
//! container calling `redis-entra-proxy shutdown`, a `preStop` hook) run in the same pod and
//! reach the proxy over `127.0.0.1`; whereas the admin port usually has to listen on the pod IP
//! for the kubelet's probes, and nothing else on the network should be able to stop the proxy.

use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Admin connections served at once. Probes (three per pod), a Prometheus scrape and an
/// operator's `curl` fit many times over; more than this is a misbehaving client.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send a request's headers, idle keep-alive time included.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin connection may stay open, however busy: bounds a client that sends a
/// request body slowly or never reads the answer.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Read buffer per connection, which bounds the size of a request head (hyper's minimum).
pub const MAX_BUF_SIZE: usize = 8 * 1024;
/// The Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// Sent, best effort, to a connection over [`MAX_CONNECTIONS`] before it is closed.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 34\r\nconnection: close\r\n\r\ntoo many admin connections, retry\n";

/// What the endpoint reports on and acts upon; shared with the server, which updates it.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Answers `/startup` and `/readiness`.
    pub health: Arc<Health>,
    /// Pulled by `POST /quitquitquit`.
    pub shutdown: Shutdown,
}

/// A bound admin listener, not serving yet. Binding and serving are separate so that the
/// proxy can refuse to start (with the address and the OS error) when `--admin-listen` can't be
/// bound, before it accepts any client.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl AdminServer {
    /// Binds `addr` (`host:port`; port 0 picks a free one) and logs the bound address as
    /// `admin endpoint listening address=HOST:PORT` (the line tests and operators look for).
    pub async fn bind(addr: &str) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        tracing::info!(address = %local_addr, "admin endpoint listening");
        Ok(AdminServer {
            listener,
            local_addr,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `stop` is cancelled; then the listener and every admin connection close.
    /// Never fails: a failed `accept` (e.g. out of file descriptors) is logged and retried.
    pub async fn serve(self, state: AdminState, stop: CancellationToken) {
        let state = Arc::new(state);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(%error, "admin endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "admin endpoint: too many connections, closing one");
                // A fresh socket's send buffer is empty: this never blocks.
                let _ = tcp.try_write(BUSY_RESPONSE);
                continue;
            };
            let state = state.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                serve_connection(tcp, peer, state, stop).await;
                drop(permit);
            });
        }
        tracing::debug!("admin endpoint closed");
    }
}

/// Binds `addr` and serves the admin endpoint on it until `stop` is cancelled. `Err` only when
/// the address can't be bound.
pub async fn serve(
    addr: &str,
    state: AdminState,
    stop: CancellationToken,
) -> Result<(), std::io::Error> {
    AdminServer::bind(addr).await?.serve(state, stop).await;
    Ok(())
}

/// One admin connection (HTTP/1.1, keep-alive allowed), within the limits of the module doc.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<AdminState>,
    stop: CancellationToken,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&state, request.method(), request.uri().path(), peer.ip());
        tracing::debug!(
            %peer,
            method = %request.method(),
            path = request.uri().path(),
            status = response.status().as_u16(),
            "admin request"
        );
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        }
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            tracing::debug!(%peer, "admin connection open too long: closed");
        }
        _ = stop.cancelled() => {}
    }
}

/// The answer to `method path` from `peer`. Pure apart from reading `state` (and pulling the
/// shutdown switch), so every route is unit-tested without a socket.
pub fn respond(
    state: &AdminState,
    method: &Method,
    path: &str,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let readable = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/startup" | "/liveness" | "/readiness" | "/metrics" if !readable => {
            method_not_allowed("GET, HEAD")
        }
        "/startup" => probe(state.health.startup()),
        "/liveness" => probe(Ok::<(), &str>(())),
        "/readiness" => probe(state.health.readiness()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.encode());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        "/quitquitquit" if *method != Method::POST => method_not_allowed("POST"),
        "/quitquitquit" if !peer.to_canonical().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "POST /quitquitquit is only accepted from a loopback address (run \
             'redis-entra-proxy shutdown' inside the pod)\n",
        ),
        "/quitquitquit" => {
            state.shutdown.request();
            text(StatusCode::OK, "shutting down\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /startup, /liveness, /readiness, /metrics or POST /quitquitquit\n",
        ),
    }
}

/// 200 `ok`, or 503 with the reason: the body is what `kubectl describe pod` shows for a
/// failed probe, so it says why.
fn probe<E: std::fmt::Display>(status: Result<(), E>) -> Response<Full<Bytes>> {
    match status {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// `405` with the `Allow` header (also used by the injector's HTTPS server).
pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed: use {allow}\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// A plain-text response that no cache keeps (a probe's answer is only true now; the injector
/// answers with it too).
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops_client;
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn state(max_connections: usize) -> AdminState {
        AdminState {
            metrics: Metrics::new(),
            health: Arc::new(Health::new(max_connections, None)),
            shutdown: Shutdown::new(),
        }
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn probes_follow_health() {
        let s = state(1);
        let get = |path| respond(&s, &Method::GET, path, LOOPBACK);
        assert_eq!(get("/liveness").status(), StatusCode::OK);
        let startup = get("/startup");
        assert_eq!(startup.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(startup).await.starts_with("not started"));
        assert_eq!(get("/readiness").status(), StatusCode::SERVICE_UNAVAILABLE);
        s.health.mark_started();
        assert_eq!(body(get("/startup")).await, "ok\n");
        assert_eq!(get("/readiness").status(), StatusCode::OK);
        s.health.client(true);
        let full = get("/readiness");
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(full).await, "at --max-connections\n");
        s.health.client(false);
        assert_eq!(get("/readiness").status(), StatusCode::OK);
        assert_eq!(
            respond(&s, &Method::HEAD, "/readiness", LOOPBACK).status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let s = state(0);
        let response = respond(&s, &Method::GET, "/metrics", LOOPBACK);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONTENT_TYPE),
            Some(&HeaderValue::from_static(METRICS_CONTENT_TYPE))
        );
        assert!(
            body(response)
                .await
                .contains("redis_proxy_client_connections 0")
        );
    }

    #[test]
    fn wrong_methods_and_paths() {
        let s = state(0);
        let r = respond(&s, &Method::POST, "/readiness", LOOPBACK);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get(ALLOW).map(|v| v.as_bytes()),
            Some(&b"GET, HEAD"[..])
        );
        let r = respond(&s, &Method::GET, "/quitquitquit", LOOPBACK);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get(ALLOW).map(|v| v.as_bytes()),
            Some(&b"POST"[..])
        );
        assert_eq!(
            respond(&s, &Method::GET, "/", LOOPBACK).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&s, &Method::GET, "/readiness/", LOOPBACK).status(),
            StatusCode::NOT_FOUND
        );
        assert!(!s.shutdown.is_requested());
    }

    #[test]
    fn quitquitquit_only_from_loopback() {
        let s = state(0);
        let remote: IpAddr = "10.1.2.3".parse().unwrap_or(LOOPBACK);
        let r = respond(&s, &Method::POST, "/quitquitquit", remote);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!s.shutdown.is_requested());
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap_or(remote);
        let r = respond(&s, &Method::POST, "/quitquitquit", mapped);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(s.shutdown.is_requested());
    }

    /// Binds an ephemeral admin endpoint and serves `state` on it.
    async fn running(state: AdminState) -> (SocketAddr, CancellationToken) {
        let server = AdminServer::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(state, stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn wait_and_shutdown_talk_to_a_real_endpoint() {
        let s = state(0);
        let (addr, stop) = running(s.clone()).await;
        let admin = addr.to_string();
        let not_yet = ops_client::wait(&admin, Duration::from_millis(300)).await;
        let error = not_yet.expect_err("not started yet");
        assert!(error.contains("not started"), "{error}");
        let health = s.health.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            health.mark_started();
        });
        ops_client::wait(&admin, Duration::from_secs(5))
            .await
            .expect("started");
        ops_client::shutdown(&admin).await.expect("shutdown");
        assert!(s.shutdown.is_requested());
        stop.cancel();
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_and_does_not_block_others() {
        let (addr, stop) = running(state(0)).await;
        // Half a request line, then silence.
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /liveness HT").await.expect("write");
        // Meanwhile others are served.
        let (status, _) = ops_client::request(Method::GET, &addr.to_string(), "/liveness")
            .await
            .expect("liveness");
        assert_eq!(status, 200);
        // The slow one is closed after the header timeout (hyper may answer 408 first).
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            HEADER_READ_TIMEOUT + Duration::from_secs(3),
            slow.read_to_end(&mut rest),
        )
        .await;
        assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "not closed");
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_at_once() {
        let (addr, stop) = running(state(0)).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        // Let the server accept them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = TcpStream::connect(addr).await.expect("connect");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut answer))
            .await
            .expect("closed at once");
        if read.is_ok() {
            assert!(answer.starts_with(b"HTTP/1.1 503"), "{answer:?}");
        }
        drop(idle);
        // Slots come back once those connections are gone.
        let mut served = false;
        for _ in 0..50 {
            if let Ok((200, _)) =
                ops_client::request(Method::GET, &addr.to_string(), "/liveness").await
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served);
        stop.cancel();
    }

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = String::from_utf8_lossy(BUSY_RESPONSE);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }

    #[tokio::test]
    async fn binding_a_used_address_fails() {
        let server = AdminServer::bind("127.0.0.1:0").await.expect("bind");
        let taken = server.local_addr().to_string();
        assert!(AdminServer::bind(&taken).await.is_err());
    }
}
