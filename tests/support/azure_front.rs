//! The fake Azure Cache for Redis front: a TLS listener that relays every client connection to
//! the real `redis-server` and makes Entra tokens behave as on Azure.
//!
//! Per client connection it opens one TLS connection to Redis and relays bytes both ways.
//! Server → client bytes are relayed verbatim. Client → server commands are framed like Redis
//! frames them and forwarded unchanged, except:
//!
//! * `AUTH <user> <jwt>` (and the `AUTH user pass` pair inside `HELLO <proto> AUTH … [SETNAME …]`)
//!   with a user other than `default`: the token is checked (HS256 signature with the issuer's
//!   secret, audience, `exp` in the future to the millisecond, `user == oid` claim). A valid
//!   token gets a Redis ACL user `tok-<jti>` (created through an admin connection) that is
//!   deleted at the token's `exp`, and the command is forwarded as `AUTH tok-<jti> <password>`.
//!   Redis disconnects every client authenticated as a deleted user, so a connection whose
//!   *last successful* `AUTH` used a now-expired token is closed at that moment — as on Azure.
//!   And since Redis itself runs the rewritten `AUTH`, it behaves exactly as Azure's would when
//!   queued inside `MULTI`, rejected in RESP2 subscribed mode, or delayed behind a blocking
//!   command. An invalid token is forwarded as `AUTH tok-invalid x`, so Redis answers
//!   `-WRONGPASS …` in order.
//! * `AUTH <key>` and `AUTH default <key>` (access keys) are forwarded unchanged: Redis's
//!   `default` user has the access key as password.
//! * Inline commands (first byte not `*`) and anything after a framing error are forwarded
//!   verbatim (Redis then answers the protocol error itself).
//!
//! Counters and an event log let tests see what happened. Dropping the front (or
//! [`AzureFront::stop`]) stops the listener and closes every relayed connection.
//!
//! ## In front of a Redis Cluster node
//!
//! [`AzureFront::start_for_node`] puts a front before any TLS Redis port, on a listener the
//! caller bound beforehand (so that the node can announce the front's port with
//! `cluster-announce-tls-port` before the front exists), with an admin connection to *that*
//! node: ACL users are per node in Redis Cluster, so each node's front creates and deletes the
//! token users on its own node. Its [`FrontAuth`] decides what happens to `AUTH`:
//!
//! * [`FrontAuth::Entra`]: tokens as above, except that the `AUTH user pass` of the users it
//!   lists (the replication user) is forwarded unchanged. A replica reaches its master through
//!   the master's *announced* address — this front — and logs in with `masteruser` /
//!   `masterauth`; after `PSYNC` the replication stream is relayed verbatim both ways (the
//!   replica's `REPLCONF ACK`s are ordinary commands, the master's stream is server → client
//!   bytes), so replication and `CLUSTER FAILOVER` work through the fronts.
//! * [`FrontAuth::Relay`]: everything is forwarded verbatim (access-key mode: Redis checks the
//!   key itself).

use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::resp::{ParsedCommand, encode_command, parse_command};
use super::{RedisServer, TestPki, TokenIssuer};

/// The Redis user a valid token's `AUTH` is rewritten to.
pub fn redis_user_for_jti(jti: &str) -> String {
    format!("tok-{jti}")
}

/// The password of that user.
fn password_for_jti(jti: &str) -> String {
    format!("pw-{jti}")
}

/// One `AUTH` (or `HELLO … AUTH`) with a token that the front checked.
#[derive(Debug, Clone)]
pub struct AuthEvent {
    /// When the front saw it.
    pub at: Instant,
    /// Which relayed connection (1, 2, … in accept order).
    pub connection: u64,
    /// The user name the client sent (the `oid`, if all is well).
    pub user: String,
    /// The token's `jti`, when it could be decoded.
    pub jti: Option<String>,
    /// True when the token was valid and forwarded as its `tok-<jti>` user. Whether Redis then
    /// ran it successfully (e.g. not rejected in subscribed mode) shows in its reply and in
    /// [`RedisServer::clients`].
    pub accepted: bool,
    /// Why it was rejected (empty when accepted).
    pub reason: String,
    /// True for `HELLO … AUTH`, false for `AUTH`.
    pub via_hello: bool,
}

#[derive(Default)]
struct Counters {
    auth_accepted: AtomicU64,
    auth_rejected: AtomicU64,
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    closed_by_server: AtomicU64,
    tokens_expired: AtomicU64,
    auth_passed_through: AtomicU64,
}

/// Per-token ACL user bookkeeping, guarded by one async mutex so that creating a user and
/// deleting it at expiry never race (a user is never re-created after its deletion).
#[derive(Default)]
struct TokenUser {
    deletion_scheduled: bool,
    deleted: bool,
}

/// What a front started with [`AzureFront::start_for_node`] does with `AUTH`.
#[derive(Debug, Clone)]
pub enum FrontAuth {
    /// Entra tokens are checked and mapped to per-token ACL users (as [`AzureFront::start`]
    /// does); access keys (`AUTH <key>`, `AUTH default <key>`) and the `AUTH user pass` of the
    /// users listed here (e.g. the replication user) are forwarded unchanged.
    Entra {
        /// Users whose `AUTH` (and `HELLO … AUTH`) is not a token and is forwarded as is.
        passthrough_users: Vec<String>,
    },
    /// Every byte is forwarded verbatim; Redis checks the credentials (access-key mode).
    Relay,
}

struct Front {
    redis_port: u16,
    /// The name the real Redis's certificate is verified against.
    server_name: String,
    connector: TlsConnector,
    admin: MultiplexedConnection,
    auth: FrontAuth,
    users: tokio::sync::Mutex<HashMap<String, TokenUser>>,
    counters: Counters,
    events: Mutex<Vec<AuthEvent>>,
    /// Cancelled when the front is stopped or dropped.
    shutdown: CancellationToken,
    /// Cancelled (and replaced) by [`AzureFront::disconnect_all`].
    disconnect: Mutex<CancellationToken>,
    next_connection: AtomicU64,
}

/// The fake Azure front; see the module documentation.
pub struct AzureFront {
    port: u16,
    front: Arc<Front>,
    /// Taken (and awaited) by [`AzureFront::stop`].
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl AzureFront {
    /// Starts the front on a free loopback port, in front of `redis`, accepting tokens signed
    /// with `issuer`'s secret (any `oid`: the `AUTH` user must match the token's own `oid`).
    pub async fn start(pki: &TestPki, redis: &RedisServer, issuer: &TokenIssuer) -> AzureFront {
        // All issuers sign with the same test secret; the front verifies with it.
        assert_eq!(issuer.secret(), super::token_issuer::TEST_JWT_SECRET);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Azure front");
        let auth = FrontAuth::Entra {
            passthrough_users: Vec::new(),
        };
        Self::launch(pki, listener, redis.port(), redis.admin().await, auth)
    }

    /// Starts a front on `listener` (bound by the caller, typically on `127.0.0.1:0`, so its
    /// port could be announced before the node behind it started) in front of the TLS Redis
    /// port `redis_port` on 127.0.0.1 — e.g. one node of a Redis Cluster. `admin` is an admin
    /// connection to that same node: the per-token ACL users are created and deleted there.
    /// The real Redis's certificate is verified for `pki.server_name()`.
    pub fn start_for_node(
        pki: &TestPki,
        listener: TcpListener,
        redis_port: u16,
        admin: MultiplexedConnection,
        auth: FrontAuth,
    ) -> AzureFront {
        Self::launch(pki, listener, redis_port, admin, auth)
    }

    fn launch(
        pki: &TestPki,
        listener: TcpListener,
        redis_port: u16,
        admin: MultiplexedConnection,
        auth: FrontAuth,
    ) -> AzureFront {
        let port = listener
            .local_addr()
            .expect("local address of the front's listener")
            .port();
        let front = Arc::new(Front {
            redis_port,
            server_name: pki.server_name().to_string(),
            connector: pki.connector(),
            admin,
            auth,
            users: tokio::sync::Mutex::new(HashMap::new()),
            counters: Counters::default(),
            events: Mutex::new(Vec::new()),
            shutdown: CancellationToken::new(),
            disconnect: Mutex::new(CancellationToken::new()),
            next_connection: AtomicU64::new(1),
        });
        let acceptor = pki.acceptor();
        let f = front.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = f.shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                tokio::spawn(f.clone().serve(tcp, acceptor.clone()));
            }
        });
        AzureFront {
            port,
            front,
            accept_task: Mutex::new(Some(accept_task)),
        }
    }

    /// The TLS port on 127.0.0.1 (what the proxy gets as `--upstream 127.0.0.1:<port>`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `AUTH`s with a valid token, forwarded as the token's ACL user.
    pub fn auth_accepted(&self) -> u64 {
        self.front.counters.auth_accepted.load(Ordering::SeqCst)
    }

    /// `AUTH`s with an invalid, expired, forged or mismatched token.
    pub fn auth_rejected(&self) -> u64 {
        self.front.counters.auth_rejected.load(Ordering::SeqCst)
    }

    /// Relayed connections open right now.
    pub fn connections_open(&self) -> u64 {
        self.front.counters.connections_open.load(Ordering::SeqCst)
    }

    /// Relayed connections ever opened (TLS handshake and upstream connect succeeded).
    pub fn connections_total(&self) -> u64 {
        self.front.counters.connections_total.load(Ordering::SeqCst)
    }

    /// Connections closed from the server side (Redis closed it, e.g. because the token of its
    /// last `AUTH` expired, or [`Self::disconnect_all`]) while the client hadn't closed its side.
    pub fn connections_closed_by_server(&self) -> u64 {
        self.front.counters.closed_by_server.load(Ordering::SeqCst)
    }

    /// `AUTH`s of a [`FrontAuth::Entra`] passthrough user (e.g. replicas logging in to their
    /// master), forwarded unchanged.
    pub fn auth_passed_through(&self) -> u64 {
        self.front
            .counters
            .auth_passed_through
            .load(Ordering::SeqCst)
    }

    /// Token users deleted at their expiry so far.
    pub fn tokens_expired(&self) -> u64 {
        self.front.counters.tokens_expired.load(Ordering::SeqCst)
    }

    /// Every checked token `AUTH`, oldest first.
    pub fn auth_events(&self) -> Vec<AuthEvent> {
        self.front.events.lock().unwrap().clone()
    }

    /// The Redis user a valid `token`'s `AUTH` turns into (compare with
    /// [`RedisServer::clients`]'s `user`).
    pub fn redis_user_for(token: &str) -> String {
        redis_user_for_jti(&TokenIssuer::claims(token).jti)
    }

    /// Closes every relayed connection now (an Azure-side failover / network blip). New
    /// connections are accepted as usual.
    pub fn disconnect_all(&self) {
        let old = std::mem::replace(
            &mut *self.front.disconnect.lock().unwrap(),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Stops the front for good, as if its address went away: when this returns the listener
    /// is closed (new connections are refused) and every relayed connection has been closed.
    /// Pending token-user deletions are dropped with it (the connections they would have
    /// closed are gone). Idempotent; dropping the front does the same without waiting.
    pub async fn stop(&self) {
        self.front.shutdown.cancel();
        let task = self.accept_task.lock().unwrap().take();
        if let Some(task) = task {
            // The accept loop returns on cancellation, dropping (closing) the listener.
            let _ = task.await;
        }
        let closed =
            super::wait_until(Duration::from_secs(10), || self.connections_open() == 0).await;
        assert!(
            closed,
            "fake Azure front on port {}: {} relayed connections still open 10 s after stop()",
            self.port,
            self.connections_open()
        );
    }

    /// True once [`Self::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.front.shutdown.is_cancelled()
    }
}

impl Drop for AzureFront {
    fn drop(&mut self) {
        self.front.shutdown.cancel();
        if let Some(task) = self.accept_task.lock().unwrap().take() {
            task.abort();
        }
    }
}

impl Front {
    /// Relays one client connection until either side closes it.
    async fn serve(self: Arc<Self>, tcp: TcpStream, acceptor: TlsAcceptor) {
        let _ = tcp.set_nodelay(true);
        let client = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            tls = acceptor.accept(tcp) => match tls {
                Ok(tls) => tls,
                Err(_) => return, // e.g. a client that doesn't trust our CA
            },
        };
        let upstream = match self.connect_redis().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("fake Azure front: cannot reach redis-server: {e}");
                return;
            }
        };
        let id = self.next_connection.fetch_add(1, Ordering::SeqCst);
        let disconnect = self.disconnect.lock().unwrap().clone();
        self.counters
            .connections_total
            .fetch_add(1, Ordering::SeqCst);
        self.counters
            .connections_open
            .fetch_add(1, Ordering::SeqCst);

        let (client_r, client_w) = tokio::io::split(client);
        let (redis_r, redis_w) = tokio::io::split(upstream);
        let c2s = self.clone().client_to_server(id, client_r, redis_w);
        let s2c = server_to_client(redis_r, client_w);
        tokio::pin!(c2s, s2c);
        let mut client_done = false;
        loop {
            tokio::select! {
                // The client closed its side: we shut down ours towards Redis (Redis then
                // closes the connection) and keep relaying what Redis still sends.
                _ = &mut c2s, if !client_done => client_done = true,
                _ = &mut s2c => {
                    if !client_done {
                        self.counters.closed_by_server.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
                _ = disconnect.cancelled() => {
                    if !client_done {
                        self.counters.closed_by_server.fetch_add(1, Ordering::SeqCst);
                    }
                    break;
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        self.counters
            .connections_open
            .fetch_sub(1, Ordering::SeqCst);
    }

    async fn connect_redis(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.redis_port)).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }

    /// Reads client commands, rewrites token `AUTH`s, forwards everything in order.
    async fn client_to_server(
        self: Arc<Self>,
        id: u64,
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
    ) {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        // After a framing error everything is forwarded verbatim: Redis reports the error.
        let mut passthrough = false;
        loop {
            let n = match from.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut out: Vec<u8> = Vec::new();
            let mut consumed = 0;
            while !passthrough {
                match parse_command(&buf[consumed..]) {
                    Ok(None) => break,
                    Err(_) => passthrough = true,
                    Ok(Some((ParsedCommand::Inline, len))) => {
                        out.extend_from_slice(&buf[consumed..consumed + len]);
                        consumed += len;
                    }
                    Ok(Some((ParsedCommand::Multibulk(args), len))) => {
                        if let Some(rewritten) = self.rewrite(id, &args, &mut to, &mut out).await {
                            out.extend_from_slice(&encode_command(&rewritten));
                        } else {
                            out.extend_from_slice(&buf[consumed..consumed + len]);
                        }
                        consumed += len;
                    }
                }
            }
            if passthrough {
                out.extend_from_slice(&buf[consumed..]);
                consumed = buf.len();
            }
            buf.drain(..consumed);
            if to.write_all(&out).await.is_err() || to.flush().await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Returns the rewritten arguments for a token `AUTH` / `HELLO … AUTH`, or `None` to
    /// forward the command unchanged. Before anything async happens, the commands already
    /// framed (`pending`) are written out, so earlier commands aren't held back.
    async fn rewrite(
        self: &Arc<Self>,
        id: u64,
        args: &[Vec<u8>],
        to: &mut (impl AsyncWrite + Unpin),
        pending: &mut Vec<u8>,
    ) -> Option<Vec<Vec<u8>>> {
        let passthrough_users = match &self.auth {
            FrontAuth::Relay => return None,
            FrontAuth::Entra { passthrough_users } => passthrough_users,
        };
        let name = String::from_utf8_lossy(args.first()?).to_ascii_uppercase();
        // Where the (user, password) pair sits in the command.
        let user_index = match name.as_str() {
            "AUTH" if args.len() == 3 => 1,
            "HELLO" => {
                let mut i = 2;
                let mut found = None;
                while i < args.len() {
                    let opt = String::from_utf8_lossy(&args[i]).to_ascii_uppercase();
                    if opt == "AUTH" && i + 2 < args.len() {
                        found = Some(i + 1);
                        i += 3;
                    } else if opt == "SETNAME" {
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                found?
            }
            _ => return None,
        };
        let user = String::from_utf8_lossy(&args[user_index]).into_owned();
        if user == "default" {
            return None; // access key
        }
        if passthrough_users.contains(&user) {
            self.counters
                .auth_passed_through
                .fetch_add(1, Ordering::SeqCst);
            return None;
        }
        let token = String::from_utf8_lossy(&args[user_index + 1]).into_owned();
        if !pending.is_empty() {
            let _ = to.write_all(pending).await;
            pending.clear();
        }
        let (new_user, new_password) = self.authorize(id, &user, &token, name == "HELLO").await;
        let mut rewritten = args.to_vec();
        rewritten[user_index] = new_user.into_bytes();
        rewritten[user_index + 1] = new_password.into_bytes();
        Some(rewritten)
    }

    /// Checks a token; returns the Redis user and password to authenticate with instead.
    async fn authorize(
        self: &Arc<Self>,
        id: u64,
        user: &str,
        token: &str,
        via_hello: bool,
    ) -> (String, String) {
        let result = self.check_and_provision(user, token).await;
        let (accepted, jti, reason) = match &result {
            Ok(jti) => (true, Some(jti.clone()), String::new()),
            Err((jti, reason)) => (false, jti.clone(), reason.clone()),
        };
        let counter = if accepted {
            &self.counters.auth_accepted
        } else {
            &self.counters.auth_rejected
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.events.lock().unwrap().push(AuthEvent {
            at: Instant::now(),
            connection: id,
            user: user.to_string(),
            jti,
            accepted,
            reason,
            via_hello,
        });
        match result {
            Ok(jti) => (redis_user_for_jti(&jti), password_for_jti(&jti)),
            Err(_) => ("tok-invalid".into(), "x".into()),
        }
    }

    /// Verifies the token and makes sure its ACL user exists and is deleted at expiry.
    /// Returns the `jti`, or (the `jti` if known, the reason).
    async fn check_and_provision(
        self: &Arc<Self>,
        user: &str,
        token: &str,
    ) -> Result<String, (Option<String>, String)> {
        let claims = TokenIssuer::verify(token).map_err(|e| (None, e))?;
        let jti = claims.jti.clone();
        if claims.oid != user {
            return Err((
                Some(jti),
                format!("user {user:?} is not the token's oid {:?}", claims.oid),
            ));
        }
        let mut users = self.users.lock().await;
        let entry = users.entry(jti.clone()).or_default();
        let left_ms = claims.millis_left();
        if entry.deleted || left_ms <= 0 {
            return Err((Some(jti), "token expired".into()));
        }
        let created: redis::RedisResult<()> = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(redis_user_for_jti(&jti))
            .arg("on")
            .arg(format!(">{}", password_for_jti(&jti)))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut self.admin.clone())
            .await;
        if let Err(e) = created {
            return Err((Some(jti), format!("ACL SETUSER failed: {e}")));
        }
        if !entry.deletion_scheduled {
            entry.deletion_scheduled = true;
            self.schedule_deletion(jti.clone(), Duration::from_millis(left_ms as u64));
        }
        Ok(jti)
    }

    /// Deletes the token's user after `delay` (at its `exp`); Redis then disconnects every
    /// client still authenticated as it.
    fn schedule_deletion(self: &Arc<Self>, jti: String, delay: Duration) {
        let front = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = front.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            // Under the lock: no `ACL SETUSER` for this token can run after this point.
            let mut users = front.users.lock().await;
            let deleted: redis::RedisResult<i64> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(redis_user_for_jti(&jti))
                .query_async(&mut front.admin.clone())
                .await;
            if let Err(e) = deleted {
                eprintln!("fake Azure front: ACL DELUSER tok-{jti} failed: {e}");
            }
            users.entry(jti).or_default().deleted = true;
            front.counters.tokens_expired.fetch_add(1, Ordering::SeqCst);
        });
    }
}

/// Copies Redis's bytes to the client verbatim until Redis closes (or an error).
async fn server_to_client(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&chunk[..n]).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
