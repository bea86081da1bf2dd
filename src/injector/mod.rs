//! `redis-entra-proxy injector`: the mutating admission webhook that adds the proxy to pods as
//! a native sidecar (spec §5).
//!
//! The pieces:
//! * [`sidecar`]: the sidecar's options (built-ins, the chart's defaults file, the pod's
//!   annotations), their validation, and the container and volume JSON.
//! * [`patch`]: the decision for one pod and the JSON Patch; pure functions.
//! * [`review`]: `AdmissionReview` v1 in and out.
//! * [`tls`]: the serving certificate, re-read when cert-manager rotates it.
//! * this module: the HTTPS server (`POST /mutate`, `GET /healthz`).
//!
//! # Why the server looks like this
//!
//! The API server calls the webhook for every opted-in pod, with `failurePolicy: Fail`: while
//! the injector is unreachable or slow, those pods can't be created. The chart's NetworkPolicy
//! can keep other peers away where the API server's addresses are known, but the server must
//! hold on its own against any peer that reaches it, so everything a peer can make it hold is
//! bounded in time and in memory:
//!
//! * **Connections**: a TLS handshake timeout ([`HANDSHAKE_TIMEOUT`]), a header read timeout
//!   ([`HEADER_READ_TIMEOUT`], long on purpose, see there), a lifetime ([`CONNECTION_LIFETIME`])
//!   and [`MAX_CONNECTIONS`] slots that evict rather than refuse ([`crate::slots`]): a peer
//!   trickling handshakes or headers on every slot only displaces its own connections, and the
//!   API server's next connection is served.
//! * **Bodies**: a review must declare its `Content-Length` (the API server always does; 411
//!   otherwise) of at most [`MAX_BODY`] (413), and must arrive within [`BODY_READ_TIMEOUT`]
//!   (408, connection closed). The bodies being read at once hold at most [`READ_BUDGET`]
//!   bytes: a request waits at most [`BUDGET_WAIT`] for its share, then gets 503.
//! * **Parsing**: a body parsed into JSON takes up to [`PARSE_FACTOR`] times its size. One
//!   review is parsed at a time, which takes milliseconds and waits for nothing, on the one
//!   thread the injector runs on (so that what a parse frees is what the next one reuses,
//!   rather than memory resident in another thread's malloc arena), so parsing adds at most
//!   `MAX_BODY × PARSE_FACTOR` to the read budget: [`MEMORY_BOUND`] (112 MiB) in all. With
//!   the process's own ~15 MiB and 128 connections' buffers, that is what the chart's 192 Mi
//!   memory limit for the injector is derived from; measured: 16 MiB at rest, +23 MiB for 32
//!   string-heavy 3 MiB reviews at once, +76 MiB for 8 env-heavy ones (`tests/injector.rs`).
//!
//! A connection is never cut in the middle of a review: at the end of its lifetime, or on
//! shutdown, it answers the request in flight first.
//! Answering is CPU only: no Kubernetes API calls, no network, so a review takes microseconds
//! and can't hang on anything else.
//!
//! On SIGTERM/SIGINT the listener closes at once (the Service has already stopped sending new
//! connections to a terminating pod, and the other replica takes them), in-flight reviews are
//! answered, idle keep-alive connections are closed, and the process exits 0 within
//! [`SHUTDOWN_GRACE`].

pub mod patch;
pub mod review;
pub mod sidecar;
pub mod tls;

use crate::admin::{method_not_allowed, text};
use crate::config::InjectorConfig;
use crate::shutdown::Signals;
use crate::slots::{Slot, Slots};
use bytes::BytesMut;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sidecar::Options;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tls::CertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest review body accepted: the API server's own limit for the request that creates the
/// Pod (a Pod object is a few KiB to a few hundred KiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// Bytes of request bodies being read at once, all connections together.
pub const READ_BUDGET: usize = 16 * 1024 * 1024;
/// How long a request waits for its share of [`READ_BUDGET`] before it gets 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(2);
/// How long a request body may take to arrive. The API server sends it at once, and gives up on
/// the webhook after its `timeoutSeconds` (at most 30, the chart's default 5).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// What parsing a body into JSON may take, at most, as a multiple of the body's size (the body
/// included). The worst shape for serde_json is `[0,0,0,…]`, a 32-byte value per two bytes in a
/// vector that doubles: 32 times in theory, 17 measured in RSS; a Pod's env list measures 20
/// (many small strings, each a malloc chunk).
pub const PARSE_FACTOR: usize = 32;
/// The most memory that request bodies and their parsing can take at once.
pub const MEMORY_BOUND: usize = READ_BUDGET + MAX_BODY * PARSE_FACTOR;
/// Connections served at once; the API server reuses a few keep-alive connections per replica.
/// Beyond this, a newcomer displaces an idle or trickling connection ([`crate::slots`]).
pub const MAX_CONNECTIONS: usize = 128;
/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers, idle keep-alive time included.
/// Longer than the API server's 90 s idle timeout on purpose: then the API server, not the
/// webhook, closes idle keep-alive connections, and a close can't race its next `POST` (the
/// classic cause of webhook calls failing with `EOF`, which `failurePolicy: Fail` turns into a
/// refused pod).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(95);
/// After this long a connection is closed once its request in flight is answered, however
/// busy: spreads load over new replicas and bounds what one client can hold.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// How long a closing connection (lifetime over, or shutting down) may take to finish its
/// request in flight; also bounds a client that sends its body slowly or never reads.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a shutdown signal, how long in-flight reviews may take before the process exits.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Read buffer per connection, which bounds the size of a request head.
const MAX_BUF_SIZE: usize = 16 * 1024;

/// Why the injector could not run.
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    /// The certificate or key can't be used (exit status 2).
    #[error("{0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// What was asked for.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What every connection shares.
struct Shared {
    certs: CertStore,
    defaults: Options,
    /// [`READ_BUDGET`], one permit per KiB.
    read_budget: Semaphore,
    /// Held while a review is parsed and answered: one at a time.
    parsing: Mutex<()>,
}

/// Serves the webhook until SIGTERM/SIGINT, then finishes in-flight reviews and returns.
pub async fn run(config: InjectorConfig) -> Result<(), InjectorError> {
    let mut signals = Signals::new();
    let certs = CertStore::load(&config.tls_cert_file, &config.tls_key_file)
        .map_err(|why| InjectorError::Config(format!("configuration error: {why}")))?;
    let listener =
        TcpListener::bind(&config.listen)
            .await
            .map_err(|source| InjectorError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
    let address = listener
        .local_addr()
        .map_or_else(|_| config.listen.clone(), |addr| addr.to_string());
    tracing::info!(%address, upstream = config.defaults.upstream.as_deref().unwrap_or(""),
        image = %config.defaults.image, "injector listening");
    let shared = Arc::new(Shared {
        certs,
        defaults: config.defaults,
        read_budget: Semaphore::new(READ_BUDGET / 1024),
        parsing: Mutex::new(()),
    });
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = signals.next() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "injector: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (slot, evicted) = slots.admit(peer.ip());
        if let Some(evicted) = evicted {
            tracing::warn!(%peer, unserved = evicted.unserved,
                "injector: all connection slots taken, closed one to make room");
        }
        let (shared, stop) = (shared.clone(), stop.clone());
        connections.spawn(serve_connection(tcp, peer, slot, shared, stop));
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight reviews");
    stop.cancel();
    connections.close();
    tokio::select! {
        _ = connections.wait() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("reviews still in flight after {SHUTDOWN_GRACE:?}: exiting anyway");
        }
        _ = signals.next() => {}
    }
    tracing::info!("injector stopped");
    Ok(())
}

/// One connection: TLS, then HTTP/1.1 (keep-alive allowed) within the limits of the module doc.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(shared.certs.current());
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "injector: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "injector: TLS handshake timed out");
                return;
            }
        },
        _ = slot.evicted() => return,
    };
    let served = slot.served_flag();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        served.set();
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(request, &shared).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = pin!(connection);
    tokio::select! {
        // The connection first: a request that has arrived is answered even if this
        // connection was displaced meanwhile.
        biased;
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "injector connection ended with an error");
            }
            return;
        }
        _ = slot.evicted() => {
            tracing::debug!(%peer, "injector connection displaced by a newer one: closed");
            return;
        }
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            tracing::debug!(%peer, "injector connection open for {CONNECTION_LIFETIME:?}: closing");
        }
        _ = stop.cancelled() => {}
    }
    // Never cut a review short: the request in flight (if any) is answered, then the
    // connection closes; a client that takes longer than DRAIN_TIMEOUT is dropped.
    connection.as_mut().graceful_shutdown();
    if tokio::time::timeout(DRAIN_TIMEOUT, connection)
        .await
        .is_err()
    {
        tracing::debug!(%peer, "injector connection still busy after {DRAIN_TIMEOUT:?}: dropped");
    }
}

/// Routes one request.
async fn handle(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    match (request.uri().path(), &method) {
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok\n"),
        ("/mutate", &Method::POST) => mutate(request.into_body(), shared).await,
        ("/healthz", _) => method_not_allowed("GET, HEAD"),
        ("/mutate", _) => method_not_allowed("POST"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try POST /mutate or GET /healthz\n",
        ),
    }
}

/// `POST /mutate`: reads the body within the bounds of the module documentation and answers
/// the review.
async fn mutate(body: Incoming, shared: &Shared) -> Response<Full<Bytes>> {
    let Some(length) = body.size_hint().exact() else {
        return closing(
            StatusCode::LENGTH_REQUIRED,
            "a review must declare its Content-Length\n",
        );
    };
    let length = usize::try_from(length).unwrap_or(usize::MAX);
    if length > MAX_BODY {
        return closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes: not an AdmissionReview\n"),
        );
    }
    let kib = u32::try_from(length.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let budget = tokio::time::timeout(BUDGET_WAIT, shared.read_budget.acquire_many(kib)).await;
    let Ok(Ok(_reading)) = budget else {
        let mut busy = closing(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many reviews being read at once: retry\n",
        );
        busy.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return busy;
    };
    let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read_body(body, length)).await {
        Ok(Ok(body)) => body,
        Ok(Err(error)) => {
            return closing(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {error}\n"),
            );
        }
        Err(_) => {
            return closing(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_READ_TIMEOUT:?}\n"),
            );
        }
    };
    let parsing = shared.parsing.lock().await;
    let answered = review::answer(&body, &shared.defaults);
    drop((parsing, body));
    match answered {
        Ok((answer, outcome)) => {
            tracing::info!(pod = %outcome.pod, uid = %outcome.uid, result = %outcome.result,
                "admission review");
            let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(bad) => {
            tracing::warn!(error = %bad, "malformed admission review");
            text(StatusCode::BAD_REQUEST, format!("{bad}\n"))
        }
    }
}

/// Reads a body of `length` bytes (hyper enforces the declared length) into one buffer of
/// exactly that size: no growth, no copy.
async fn read_body(mut body: Incoming, length: usize) -> Result<Bytes, hyper::Error> {
    let mut buffer = BytesMut::with_capacity(length);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// A plain-text answer after which the connection closes (the body may be left unread).
fn closing(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}
