//! The upstream side: TCP connect, TLS, `AUTH` and `SELECT` for one connection.
//!
//! Every client gets its own upstream connection (1:1), so connection state like `SELECT`,
//! transactions and subscriptions keeps its meaning. One [`Upstream`] per process holds the
//! shared rustls client configuration (so TLS sessions are resumed across connections) and knows
//! how to open and authenticate a connection within `--connect-timeout`. Errors say which step
//! failed and carry the server's own words (`WRONGPASS …`), never a secret.

use crate::config::{Config, ConfigError};
use crate::credential::AuthCredential;
use crate::resp::{Grammar, Scanner, encode_command};
use bytes::{Buf, Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why an upstream connection could not be made ready. The text goes to the client after
/// `-ERR redis-entra-proxy: `, so it says what failed in words a Redis user understands.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed (refused, unreachable, DNS).
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("upstream TLS handshake with {addr} failed: {source}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// The TLS error.
        source: io::Error,
    },
    /// Connect + TLS + `AUTH` took longer than `--connect-timeout`.
    #[error("upstream {addr} did not answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The server refused the credential.
    #[error("upstream authentication failed: {0}")]
    Auth(String),
    /// The server refused `SELECT`.
    #[error("upstream SELECT failed: {0}")]
    Select(String),
    /// The connection broke or the server sent something that is not RESP.
    #[error("upstream connection failed: {0}")]
    Io(String),
}

impl UpstreamError {
    /// The `kind` label of `redis_proxy_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Tls { .. } => "tls",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Auth(_) => "auth",
            UpstreamError::Select(_) => "select",
            UpstreamError::Io(_) => "io",
        }
    }
}

/// An upstream byte stream: TLS, or plain TCP when `--tls false`.
#[derive(Debug)]
pub enum UpstreamStream {
    /// TLS over TCP (the default and the only mode Entra auth works with).
    Tls(Box<TlsStream<TcpStream>>),
    /// Plain TCP (explicitly configured; logged as a warning at start).
    Plain(TcpStream),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How to reach and authenticate the cache; one per process, shared by all connections.
#[derive(Clone)]
pub struct Upstream {
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    database: u32,
    connect_timeout: Duration,
}

impl Upstream {
    /// Builds the shared TLS configuration: system roots plus `--ca-file`.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        let tls = if config.tls {
            let server_name = ServerName::try_from(config.tls_server_name.clone()).map_err(|_| {
                ConfigError(format!(
                    "invalid TLS server name {:?}: set --tls-server-name to the cache's host name",
                    config.tls_server_name
                ))
            })?;
            Some((
                TlsConnector::from(Arc::new(client_config(config)?)),
                server_name,
            ))
        } else {
            None
        };
        Ok(Upstream {
            host: config.upstream_host.clone(),
            port: config.upstream_port,
            tls,
            database: config.database,
            connect_timeout: config.connect_timeout,
        })
    }

    /// The same settings for another node of a clustered cache: dialled at `host:port` (the
    /// address the cluster names it by, an IP on Azure), and still verified against the
    /// configured TLS server name, which is the only name the cache's certificate holds.
    pub fn for_node(&self, host: &str, port: u16) -> Upstream {
        Upstream {
            host: host.to_string(),
            port,
            database: 0,
            ..self.clone()
        }
    }

    /// `host:port` of the cache, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a connection, authenticates it with `credential` (if any) and selects the database.
    pub async fn connect(
        &self,
        credential: Option<&AuthCredential>,
    ) -> Result<UpstreamStream, UpstreamError> {
        let timeout = self.connect_timeout;
        tokio::time::timeout(timeout, self.connect_inner(credential))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Timeout {
                    addr: self.addr(),
                    timeout,
                })
            })
    }

    async fn connect_inner(
        &self,
        credential: Option<&AuthCredential>,
    ) -> Result<UpstreamStream, UpstreamError> {
        let mut stream = self.open().await?;
        let mut commands: Vec<Bytes> = Vec::with_capacity(2);
        if let Some(c) = credential {
            commands.push(c.auth_command().clone());
        }
        if self.database != 0 {
            commands.push(select_command(self.database));
        }
        let replies = roundtrip(&mut stream, &commands).await?;
        let mut replies = replies.iter();
        if credential.is_some() {
            check_ok(replies.next()).map_err(UpstreamError::Auth)?;
        }
        if self.database != 0 {
            let mut reply = replies.next().cloned();
            // While another client's script or function runs past `busy-reply-threshold`, Redis
            // refuses `SELECT` (not `AUTH`) with `-BUSY`. A client connecting directly then would
            // still be connected, its commands refused until the script ends; so the `SELECT` is
            // sent again until it runs, within the connect timeout, rather than refusing the
            // client a connection for it.
            if reply.as_ref().is_some_and(|r| r.starts_with(b"-BUSY ")) {
                tracing::debug!(
                    upstream = %self.addr(),
                    "SELECT refused: the server is busy (a script or function); sending it again until it runs"
                );
            }
            while reply.as_ref().is_some_and(|r| r.starts_with(b"-BUSY ")) {
                tokio::time::sleep(SELECT_BUSY_RETRY).await;
                let select = [select_command(self.database)];
                reply = roundtrip(&mut stream, &select).await?.into_iter().next();
            }
            check_ok(reply.as_ref()).map_err(UpstreamError::Select)?;
        }
        Ok(stream)
    }

    /// TCP connect (with keepalive and nodelay) and, unless disabled, the TLS handshake.
    async fn open(&self) -> Result<UpstreamStream, UpstreamError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: self.addr(),
                source,
            })?;
        tune_socket(&tcp);
        match &self.tls {
            None => Ok(UpstreamStream::Plain(tcp)),
            Some((connector, name)) => connector
                .connect(name.clone(), tcp)
                .await
                .map(|s| UpstreamStream::Tls(Box::new(s)))
                .map_err(|source| UpstreamError::Tls {
                    addr: self.addr(),
                    source,
                }),
        }
    }
}

/// Nodelay (requests are small and latency matters) and keepalive (notice a dead peer behind
/// NAT or a load balancer instead of holding the client's connection open forever).
pub fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// The rustls client configuration: ring, TLS 1.2+, system roots and the `--ca-file` bundle.
fn client_config(config: &Config) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                ConfigError(format!(
                    "cannot read --ca-file {}: {e}: give a PEM file of CA certificates",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(ConfigError(format!(
                "--ca-file {} holds no certificate: give a PEM file of CA certificates",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                ConfigError(format!(
                    "--ca-file {}: unusable certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted CA certificates found: install ca-certificates or set --ca-file"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("TLS setup failed: {e}")))?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// How long a connection whose `SELECT` a busy server refused waits before sending it again.
const SELECT_BUSY_RETRY: Duration = Duration::from_millis(100);

/// `SELECT <db>`.
pub fn select_command(db: u32) -> Bytes {
    encode_command(&[b"SELECT", db.to_string().as_bytes()])
}

/// Writes `commands` and reads one reply per command (small replies only: the handshake and
/// `check`). Replies are returned whole, RESP-encoded.
pub async fn roundtrip<S>(
    stream: &mut S,
    commands: &[Bytes],
) -> Result<Vec<BytesMut>, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for c in commands {
        stream.write_all(c).await.map_err(io_error)?;
    }
    stream.flush().await.map_err(io_error)?;
    let mut scanner = Scanner::new(Grammar::Reply);
    let mut buf = BytesMut::with_capacity(4096);
    let mut replies = Vec::with_capacity(commands.len());
    while replies.len() < commands.len() {
        match scanner.scan(&buf) {
            Ok(Some(frame)) => replies.push(buf.split_to(frame.len)),
            Ok(None) => {
                if buf.len() > 1024 * 1024 {
                    return Err(UpstreamError::Io("reply too large".into()));
                }
                if stream.read_buf(&mut buf).await.map_err(io_error)? == 0 {
                    return Err(UpstreamError::Io("connection closed by the server".into()));
                }
            }
            Err(e) => return Err(UpstreamError::Io(e.to_string())),
        }
    }
    buf.advance(0);
    Ok(replies)
}

fn io_error(e: io::Error) -> UpstreamError {
    UpstreamError::Io(e.to_string())
}

/// `Ok` for `+OK`, otherwise the server's error text (which never holds the password).
fn check_ok(reply: Option<&BytesMut>) -> Result<(), String> {
    match reply {
        Some(r) if r.starts_with(b"+") => Ok(()),
        Some(r) => Err(error_text(r)),
        None => Err("no reply".into()),
    }
}

/// The text of an error reply, one line, for messages (`-WRONGPASS …` → `WRONGPASS …`).
pub fn error_text(reply: &[u8]) -> String {
    let body = reply.strip_prefix(b"-").unwrap_or(reply);
    let body = body.strip_suffix(b"\r\n").unwrap_or(body);
    String::from_utf8_lossy(body).replace(['\r', '\n'], " ")
}
