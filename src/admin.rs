//! The admin HTTP endpoint on `--admin-listen` (Kubernetes probes, Prometheus metrics) and the
//! control endpoint on `--control-listen` (`POST /quitquitquit`).
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /startup` | 200 `ok` once started ([`Health::startup`]), else 503 and why |
//! | `GET /liveness` | 200 `ok` while the process serves HTTP at all |
//! | `GET /readiness` | 200 `ok` while [`Health::readiness`] is `Ok`, else 503 and why |
//! | `GET /metrics` | the Prometheus text exposition of [`Metrics`] |
//! | `POST /quitquitquit` | starts a graceful shutdown ([`Shutdown::request`]), 200; only on the control endpoint |
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
//! * at most [`MAX_CONNECTIONS`] connections at once, and a newcomer is never refused: when
//!   they are all taken, the one least likely to matter is closed (see [`crate::slots`]: one
//!   that has sent no complete request yet, from the peer holding the most, the oldest). So a
//!   peer that holds every slot with trickled headers only ever displaces its own connections,
//!   and the kubelet's probe, whose request follows its connect at once, is answered;
//! * a small request buffer ([`MAX_BUF_SIZE`]): no large headers held in memory;
//! * handlers only read atomics, a `watch` value and the metric registry: nothing waits for the
//!   relay, the upstream or the token endpoint. Readiness in particular never dials the upstream
//!   (see [`crate::health`] for why).
//!
//! # Where `POST /quitquitquit` is served
//!
//! Its users (a Job's main container calling `redis-entra-proxy shutdown`, a `preStop` hook)
//! run in the same pod (or on the same machine) and reach the proxy over loopback; nothing else
//! should be able to stop it. The admin port usually has to listen on the pod IP for the
//! kubelet's probes, and a peer address says nothing about who is calling: a service mesh's
//! sidecar forwards traffic from the pod network to the pod from loopback addresses (Istio
//! from 127.0.0.6). So the control endpoint is served only by a listener bound to a loopback
//! address ([`ControlListen`]): the admin listener itself when that is on loopback (the default
//! on a developer machine), else a listener of its own (`127.0.0.1:<admin port + 1>` by
//! default). Elsewhere it answers 403 and says where it is.
//!
//! A web page open in a browser on that machine can also send a `POST` to `127.0.0.1` (no
//! preflight is needed for one without a body), so a request that a browser marks as coming
//! from a web page (an `Origin` header, or `Sec-Fetch-Site` other than `none`) is refused too:
//! `curl`, `redis-entra-proxy shutdown` and the kubelet send neither.

use crate::config::ControlListen;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::slots::{Slot, Slots};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Admin connections served at once. Probes (three per pod), a Prometheus scrape and an
/// operator's `curl` fit many times over; beyond this, a newcomer displaces an idle or
/// trickling connection (see the module documentation).
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

/// What a listener answers to `POST /quitquitquit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quit {
    /// Served here: this listener is bound to a loopback address.
    Here,
    /// Refused here (reachable from the network): the control endpoint is at this address.
    At(String),
    /// Refused: there is no control endpoint.
    Off,
}

/// A bound admin or control listener, not serving yet. Binding and serving are separate so
/// that the proxy can refuse to start (with the address and the OS error) when an address can't
/// be bound, before it accepts any client.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    quit: Quit,
}

impl AdminServer {
    /// Binds `addr` (`host:port`; port 0 picks a free one) for the probes and metrics, with
    /// `quit` saying what `POST /quitquitquit` gets, and logs the bound address as
    /// `admin endpoint listening address=HOST:PORT` (the line tests and operators look for).
    pub async fn bind(addr: &str, quit: Quit) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let control = quit == Quit::Here;
        tracing::info!(address = %local_addr, control, "admin endpoint listening");
        Ok(AdminServer {
            listener,
            local_addr,
            quit,
        })
    }

    /// Binds the listeners of `--admin-listen` and `--control-listen`: the admin one (if on)
    /// first, then the control one when it has a listener of its own (every route, on
    /// loopback; logged as `control endpoint listening address=HOST:PORT`). `Err` names the
    /// address that could not be bound.
    pub async fn bind_all(
        admin: Option<&str>,
        control: &ControlListen,
    ) -> Result<Vec<AdminServer>, (String, std::io::Error)> {
        let mut servers = Vec::new();
        if let Some(addr) = admin {
            let quit = match control {
                ControlListen::OnAdmin => Quit::Here,
                ControlListen::Separate(at) => Quit::At(at.clone()),
                ControlListen::Off => Quit::Off,
            };
            let server = AdminServer::bind(addr, quit).await;
            servers.push(server.map_err(|error| (addr.to_string(), error))?);
        }
        if let ControlListen::Separate(addr) = control {
            let failed = |error| (addr.clone(), error);
            let listener = TcpListener::bind(addr.as_str()).await.map_err(failed)?;
            let local_addr = listener.local_addr().map_err(failed)?;
            tracing::info!(address = %local_addr, "control endpoint listening");
            if let Some(Quit::At(at)) = servers.first_mut().map(|s| &mut s.quit) {
                *at = local_addr.to_string(); // the real port when 0 was asked for
            }
            servers.push(AdminServer {
                listener,
                local_addr,
                quit: Quit::Here,
            });
        }
        Ok(servers)
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `stop` is cancelled; then the listener and every admin connection close.
    /// Never fails: a failed `accept` (e.g. out of file descriptors) is logged and retried.
    pub async fn serve(self, state: AdminState, stop: CancellationToken) {
        let state = Arc::new(state);
        let slots = Slots::new(MAX_CONNECTIONS);
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
            let (slot, evicted) = slots.admit(peer.ip());
            if let Some(evicted) = evicted {
                tracing::debug!(%peer, unserved = evicted.unserved,
                    "admin endpoint: all connection slots taken, closed one to make room");
            }
            let state = state.clone();
            let stop = stop.clone();
            let quit = self.quit.clone();
            tokio::spawn(serve_connection(tcp, peer, slot, quit, state, stop));
        }
        tracing::debug!("admin endpoint closed");
    }
}

/// One admin connection (HTTP/1.1, keep-alive allowed), within the limits of the module doc.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    quit: Quit,
    state: Arc<AdminState>,
    stop: CancellationToken,
) {
    let served = slot.served_flag();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        served.set();
        let (method, path) = (request.method(), request.uri().path());
        let response = respond(&state, method, path, request.headers(), &quit);
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
        // The connection first: a request that has arrived is answered even if this
        // connection was displaced meanwhile.
        biased;
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        }
        _ = slot.evicted() => {
            tracing::debug!(%peer, "admin connection displaced by a newer one: closed");
        }
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            tracing::debug!(%peer, "admin connection open too long: closed");
        }
        _ = stop.cancelled() => {}
    }
}

/// The answer to `method path` with `headers` on a listener whose `POST /quitquitquit` is
/// `quit`. Pure apart from reading `state` (and pulling the shutdown switch), so every route is
/// unit-tested without a socket.
pub fn respond(
    state: &AdminState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    quit: &Quit,
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
        "/quitquitquit" if *quit != Quit::Here => text(
            StatusCode::FORBIDDEN,
            match quit {
                Quit::At(at) => format!(
                    "POST /quitquitquit is not served here, where the network can reach it: \
                     send it to the control endpoint http://{at}/quitquitquit inside the pod \
                     (redis-entra-proxy shutdown)\n"
                ),
                _ => "POST /quitquitquit is off (--control-listen off): stop the proxy with \
                      SIGTERM\n"
                    .to_string(),
            },
        ),
        "/quitquitquit" if from_a_web_page(headers) => text(
            StatusCode::FORBIDDEN,
            "POST /quitquitquit from a web page is refused (it carries Origin or \
             Sec-Fetch-Site): send it without them, e.g. redis-entra-proxy shutdown or \
             curl -X POST\n",
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

/// True when a browser says the request comes from a web page: it sends `Origin` with every
/// cross-origin request and every `POST`, and `Sec-Fetch-Site: none` only for what the user
/// typed or bookmarked. Command-line clients send neither.
fn from_a_web_page(headers: &HeaderMap) -> bool {
    headers.contains_key(ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| !site.as_bytes().eq_ignore_ascii_case(b"none"))
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
    use std::net::IpAddr;

    /// `respond` without headers, on a listener that serves `POST /quitquitquit`.
    fn ask(s: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
        respond(s, method, path, &HeaderMap::new(), &Quit::Here)
    }

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
        let get = |path| ask(&s, &Method::GET, path);
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
            ask(&s, &Method::HEAD, "/readiness").status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let s = state(0);
        let response = ask(&s, &Method::GET, "/metrics");
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
        let r = ask(&s, &Method::POST, "/readiness");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get(ALLOW).map(|v| v.as_bytes()),
            Some(&b"GET, HEAD"[..])
        );
        let r = ask(&s, &Method::GET, "/quitquitquit");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers().get(ALLOW).map(|v| v.as_bytes()),
            Some(&b"POST"[..])
        );
        assert_eq!(ask(&s, &Method::GET, "/").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ask(&s, &Method::GET, "/readiness/").status(),
            StatusCode::NOT_FOUND
        );
        assert!(!s.shutdown.is_requested());
    }

    #[test]
    fn quitquitquit_only_where_it_is_served() {
        let s = state(0);
        let none = HeaderMap::new();
        let at = Quit::At("127.0.0.1:9091".into());
        let r = respond(&s, &Method::POST, "/quitquitquit", &none, &at);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = respond(&s, &Method::POST, "/quitquitquit", &none, &Quit::Off);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!s.shutdown.is_requested());
        let r = respond(&s, &Method::GET, "/readiness", &none, &at);
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "probes are served"
        );
        assert_eq!(
            ask(&s, &Method::POST, "/quitquitquit").status(),
            StatusCode::OK
        );
        assert!(s.shutdown.is_requested());
    }

    #[tokio::test]
    async fn the_refusal_says_where_the_control_endpoint_is() {
        let s = state(0);
        let at = Quit::At("127.0.0.1:9091".into());
        let r = respond(&s, &Method::POST, "/quitquitquit", &HeaderMap::new(), &at);
        let text = body(r).await;
        assert!(
            text.contains("http://127.0.0.1:9091/quitquitquit"),
            "{text}"
        );
    }

    #[test]
    fn posts_from_web_pages_are_refused() {
        let s = state(0);
        for (name, value) in [
            ("origin", "https://evil.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-site", "same-origin"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_static(value));
            let r = respond(&s, &Method::POST, "/quitquitquit", &headers, &Quit::Here);
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}: {value}");
            assert!(!s.shutdown.is_requested(), "{name}: {value}");
        }
        let mut typed = HeaderMap::new();
        typed.insert("sec-fetch-site", HeaderValue::from_static("none"));
        let r = respond(&s, &Method::POST, "/quitquitquit", &typed, &Quit::Here);
        assert_eq!(r.status(), StatusCode::OK);
    }

    /// Binds an ephemeral admin endpoint and serves `state` on it.
    async fn running(state: AdminState) -> (SocketAddr, CancellationToken) {
        let server = AdminServer::bind("127.0.0.1:0", Quit::Here)
            .await
            .expect("bind");
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

    /// A hostile peer: `per_source` connections from each of `sources` (other loopback
    /// addresses than the probes' 127.0.0.1), each sending half a request line and then one
    /// header byte every 200 ms, and reconnecting whenever the server closes it. Counts its
    /// connects in `connects`.
    fn slowloris(
        addr: SocketAddr,
        sources: Vec<IpAddr>,
        per_source: usize,
        connects: Arc<std::sync::atomic::AtomicUsize>,
        stop: CancellationToken,
    ) {
        for source in sources {
            for _ in 0..per_source {
                let (connects, stop) = (connects.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                        socket
                            .bind(SocketAddr::new(source, 0))
                            .expect("bind the source");
                        let Ok(mut tcp) = socket.connect(addr).await else {
                            continue;
                        };
                        connects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut sent = tcp.write_all(b"GET /liveness HTTP/1.1\r\nX-").await;
                        while sent.is_ok() && !stop.is_cancelled() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            sent = tcp.write_all(b"a").await;
                        }
                    }
                });
            }
        }
    }

    /// While `slowloris` holds more connections than there are slots, 20 probes in a row from
    /// 127.0.0.1 each get 200 (within the client's 5 s bound; in practice at once).
    async fn probes_are_answered_while(sources: Vec<IpAddr>, per_source: usize) {
        let (addr, stop) = running(state(0)).await;
        let connects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hostile = CancellationToken::new();
        let wanted = sources.len() * per_source;
        assert!(wanted > MAX_CONNECTIONS);
        slowloris(addr, sources, per_source, connects.clone(), hostile.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while connects.load(std::sync::atomic::Ordering::SeqCst) < wanted {
            assert!(
                std::time::Instant::now() < deadline,
                "the hostile peer could not connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..20 {
            let probe = ops_client::request(Method::GET, &addr.to_string(), "/liveness").await;
            assert!(matches!(probe, Ok((200, _))), "probe {i}: {probe:?}");
        }
        hostile.cancel();
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_while_one_peer_trickles_headers_on_every_slot() {
        let from: IpAddr = "127.0.0.2".parse().unwrap_or(LOOPBACK);
        probes_are_answered_while(vec![from], MAX_CONNECTIONS + 16).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_are_answered_while_many_peers_trickle_headers_on_every_slot() {
        let sources = (0..MAX_CONNECTIONS as u8 + 16)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i + 1)))
            .collect();
        probes_are_answered_while(sources, 1).await;
    }

    #[tokio::test]
    async fn binding_a_used_address_fails() {
        let server = AdminServer::bind("127.0.0.1:0", Quit::Here)
            .await
            .expect("bind");
        let taken = server.local_addr().to_string();
        assert!(AdminServer::bind(&taken, Quit::Here).await.is_err());
        let control = ControlListen::Separate(taken.clone());
        let error = AdminServer::bind_all(Some("127.0.0.1:0"), &control).await;
        assert!(matches!(error, Err((addr, _)) if addr == taken));
    }
}
