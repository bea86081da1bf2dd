//! HTTP plumbing: [`HttpServer`] serves an axum `Router` on a loopback port, over plain HTTP/1.1
//! or HTTPS (tokio-rustls in front of hyper), until dropped (used by the fake token endpoints
//! and [`RecordingHttpProxy`], a fake forward proxy); [`http_request`] / [`http_get`] are a
//! minimal HTTP/1.1 client (hyper) for tests, e.g. to call the fake endpoints directly or the
//! proxy's admin endpoint.

use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::TestPki;

/// A running HTTP(S) server. Dropping it closes the listener and every open connection.
pub struct HttpServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `127.0.0.1:0` and serves `router`; with `tls`, every connection is a TLS handshake
    /// first (a failed handshake only ends that connection). `shutdown` is cancelled on drop;
    /// handlers may wait on it (the "hang" mode).
    pub async fn start(
        router: Router,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HTTP server");
        let addr = listener.local_addr().unwrap();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let router = router.clone();
                let tls = tls.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = TowerToHyperService::new(router);
                    let http = hyper::server::conn::http1::Builder::new();
                    // Each connection ends when the peer closes it or when the server is dropped.
                    match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let conn = http.serve_connection(TokioIo::new(stream), service);
                            tokio::select! { _ = conn => {}, _ = stop.cancelled() => {} }
                        }
                        None => {
                            let conn = http.serve_connection(TokioIo::new(tcp), service);
                            tokio::select! { _ = conn => {}, _ = stop.cancelled() => {} }
                        }
                    }
                });
            }
        });
        HttpServer {
            addr,
            shutdown,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// A fake forward proxy, what `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` point at in a
/// corporate cluster: it records every request it gets (a plain one in absolute form, or a
/// `CONNECT` for HTTPS) and answers `502`, so a test can prove that nothing went through it.
pub struct RecordingHttpProxy {
    seen: Arc<Mutex<Vec<String>>>,
    server: HttpServer,
}

impl RecordingHttpProxy {
    /// Starts it on a loopback port.
    pub async fn start() -> RecordingHttpProxy {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let router = Router::new().fallback(move |request: axum::extract::Request| {
            let record = record.clone();
            async move {
                record
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", request.method(), request.uri()));
                axum::http::StatusCode::BAD_GATEWAY
            }
        });
        let server = HttpServer::start(router, None, CancellationToken::new()).await;
        RecordingHttpProxy { seen, server }
    }

    /// `http://127.0.0.1:PORT`: the value for the proxy variables.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    /// Every request so far, as `METHOD URI`.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A response received by [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercase.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON (panics if it isn't).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the whole response, or `Err` with
/// a reason (connection refused, TLS failure, `timeout`, …). `https://` URLs are verified with
/// `tls`'s CA (required for them); the host `localhost` is dialled as 127.0.0.1.
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
    tls: Option<&TestPki>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let url = url::Url::parse(url).map_err(|e| format!("bad URL {url}: {e}"))?;
    let host = url.host_str().ok_or("URL without host")?.to_string();
    let port = url.port_or_known_default().ok_or("URL without port")?;
    let dial = if host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        host.clone()
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{host}:{port}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let payload = match body {
        Some((content_type, bytes)) => {
            request = request.header("content-type", content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let request = request
        .body(Full::new(payload))
        .map_err(|e| format!("bad request: {e}"))?;

    let exchange = async {
        let tcp = TcpStream::connect((dial.as_str(), port))
            .await
            .map_err(|e| format!("connect {dial}:{port}: {e}"))?;
        let response = if url.scheme() == "https" {
            let pki = tls.ok_or("https:// needs a TestPki to trust")?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("bad server name: {e}"))?;
            let stream = pki
                .connector()
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(TokioIo::new(stream), request).await?
        } else {
            send(TokioIo::new(tcp), request).await?
        };
        Ok::<_, String>(response)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "timeout".to_string())?
}

async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> Result<HttpResponse, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP request: {e}"))?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("HTTP body: {e}"))?
        .to_bytes();
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET url` over plain HTTP with a 10 s timeout; panics on a transport error.
pub async fn http_get(url: &str) -> HttpResponse {
    http_request("GET", url, &[], None, None, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `POST url` (empty body) over plain HTTP with a 10 s timeout; panics on a transport error.
pub async fn http_post(url: &str) -> HttpResponse {
    http_request("POST", url, &[], None, None, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}
