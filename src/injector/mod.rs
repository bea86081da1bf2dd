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
//! the injector is unreachable or slow, those pods can't be created. So the server is small
//! and bounded, like the admin endpoint ([`crate::admin`]): a TLS handshake timeout, a header
//! read timeout, a lifetime per connection, a cap on concurrent connections, and a request body
//! limit of [`MAX_BODY`] (a Pod's JSON is far smaller; anything bigger is not a review). A
//! connection is never cut in the middle of a review: at the end of its lifetime, or on
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
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
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
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest review body accepted. A Pod object is a few KiB to a few hundred KiB; the API
/// server's own request limit is 3 MiB.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Connections served at once; the API server reuses a few keep-alive connections per replica.
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
    });
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "injector: too many connections, closing one");
            continue;
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        connections.spawn(async move {
            serve_connection(tcp, peer, shared, stop).await;
            drop(permit);
        });
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
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(shared.certs.current());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "injector: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "injector: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(request, &shared.defaults).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "injector connection ended with an error");
            }
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
async fn handle(request: Request<Incoming>, defaults: &Options) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    match (request.uri().path(), &method) {
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok\n"),
        ("/mutate", &Method::POST) => mutate(request.into_body(), defaults).await,
        ("/healthz", _) => method_not_allowed("GET, HEAD"),
        ("/mutate", _) => method_not_allowed("POST"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try POST /mutate or GET /healthz\n",
        ),
    }
}

/// `POST /mutate`: reads the (bounded) body and answers the review.
async fn mutate(body: Incoming, defaults: &Options) -> Response<Full<Bytes>> {
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes: not an AdmissionReview\n"),
            );
        }
        Err(error) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {error}\n"),
            );
        }
    };
    match review::answer(&body, defaults) {
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
