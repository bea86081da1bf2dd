//! The warm pool (`--warm-connections N`): upstream connections opened and authenticated ahead
//! of demand, so a new client starts relaying at once instead of waiting for a TCP connect, a
//! TLS handshake and an `AUTH` round trip.
//!
//! It matters for applications that open a connection per request (PHP, scripts, a Flask app
//! that builds a client per request): each of them pays a local connect instead of a remote
//! handshake. The price is `N` idle connections that count against the cache's connection limit.
//!
//! The rules, all in [`WarmPool::take`] and the background task [`maintain`]:
//! * a client takes the oldest idle connection; the pool refills in the background;
//! * with `--multiplex` and no `--warm-connections` of its own, the pool starts **dormant**:
//!   only a client that is pinned takes a connection of its own there, so an application that
//!   never pins keeps exactly its N shared connections; the first pin wakes the pool (that
//!   client connects itself) and from then on pins find a ready connection;
//! * a client that leaves its connection clean (see `Command::leaves_state`) gives it back,
//!   so an application that connects per request keeps reusing a few upstream connections;
//! * every new credential (a refreshed token, a rotated key file) re-authenticates each idle
//!   connection, and idle connections are `PING`ed every [`SERVICE_INTERVAL`] so that dead ones
//!   (and Azure's idle timeout) are found before a client gets them;
//! * a connection whose token expires within [`TAKE_MARGIN`], or whose socket was closed by the
//!   server, is never handed out: it is dropped and the client gets the next one (or a fresh
//!   connection when the pool is empty). A handed-out connection on an older, still valid token
//!   is re-authenticated by its session at once, like any live connection.

use crate::connector::{Connector, Ready};
use crate::credential::AuthCredential;
use crate::health::Health;
use crate::upstream::{UpstreamStream, roundtrip};
use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How often idle connections are `PING`ed (well inside Azure's 10-minute idle timeout).
pub const SERVICE_INTERVAL: Duration = Duration::from_secs(30);
/// A pooled connection whose token expires sooner than this is not handed to a client: its
/// session might not get a new `AUTH` through in time.
pub const TAKE_MARGIN: Duration = Duration::from_millis(500);
/// After a take, the pool waits this long before dialling a replacement: a client that opens
/// a connection per request usually gives its connection back sooner, and then no dial is
/// needed at all.
const REFILL_DELAY: Duration = Duration::from_millis(50);
/// Connections opened at once while filling (a large pool fills in rounds).
const FILL_CONCURRENCY: usize = 16;
/// Ids of pooled connections (for the re-auth deadline metric) stay apart from session ids.
const POOL_ID_BASE: u64 = 1 << 62;
/// First and longest wait after a failed fill.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const REAUTH_REFUSED: &str = "re-authentication refused";

/// An idle, authenticated connection waiting for a client.
struct Idle {
    id: u64,
    ready: Ready,
}

/// The pool, shared by the accept path (which takes) and the background task (which fills).
pub struct WarmPool {
    inner: Arc<Inner>,
}

struct Inner {
    size: usize,
    /// Not filled until the first [`WarmPool::take`] (see the module documentation).
    dormant: AtomicBool,
    /// The first take of a dormant pool.
    woken: Notify,
    idle: Mutex<VecDeque<Idle>>,
    /// A connection was taken: refill.
    taken: Notify,
    connector: Arc<Connector>,
    next_id: AtomicU64,
}

impl WarmPool {
    /// Starts keeping `size` connections ready (once first asked for one, if `dormant`); the
    /// background task stops with `stop`.
    pub fn start(
        size: usize,
        dormant: bool,
        connector: Arc<Connector>,
        health: Arc<Health>,
        stop: CancellationToken,
    ) -> WarmPool {
        let inner = Arc::new(Inner {
            size,
            dormant: AtomicBool::new(dormant),
            woken: Notify::new(),
            idle: Mutex::new(VecDeque::with_capacity(size)),
            taken: Notify::new(),
            connector,
            next_id: AtomicU64::new(POOL_ID_BASE),
        });
        tokio::spawn(maintain(inner.clone(), health, stop));
        WarmPool { inner }
    }

    /// An idle connection that is still open and whose token is good for at least
    /// [`TAKE_MARGIN`], or `None` (the caller then connects itself).
    pub async fn take(&self) -> Option<Ready> {
        if self.inner.dormant.swap(false, Ordering::Relaxed) {
            self.inner.woken.notify_one(); // kept as a permit if the task isn't waiting yet
            return None;
        }
        loop {
            let mut entry = self.inner.pop()?;
            self.inner.taken.notify_one();
            if token_lasts(&entry.ready) && still_open(&mut entry.ready.stream).await {
                return Some(entry.ready);
            }
            tracing::debug!(
                pooled = entry.id - POOL_ID_BASE,
                "dropping a warm connection that is closed or whose token expires too soon"
            );
        }
    }

    /// A connection whose client has gone and left it clean (see
    /// [`crate::relay::Session::run_and_recycle`]) joins the pool if there is room; otherwise
    /// it is closed. An application that opens a connection per request then reuses the same
    /// few upstream connections instead of making the pool dial one per request.
    pub fn give_back(&self, ready: Ready) {
        if token_lasts(&ready) && self.inner.missing() > 0 {
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            self.inner.push(Idle { id, ready });
        }
    }
}

/// The connection's token is good for at least [`TAKE_MARGIN`] more (or never expires).
fn token_lasts(ready: &Ready) -> bool {
    let deadline = SystemTime::now() + TAKE_MARGIN;
    ready
        .credential
        .as_ref()
        .is_none_or(|c| c.is_valid_at(deadline))
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // A panic while holding this lock leaves a plain queue behind: still usable.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.connector.metrics
    }

    /// Takes the oldest entry out (it is no longer counted as pooled).
    fn pop(&self) -> Option<Idle> {
        let mut idle = self.lock();
        let entry = idle.pop_front()?;
        self.metrics().warm_connections.set(idle.len() as i64);
        drop(idle);
        self.forget(&entry);
        Some(entry)
    }

    /// Takes every entry out, to service them.
    fn drain(&self) -> Vec<Idle> {
        let mut idle = self.lock();
        let all: Vec<Idle> = idle.drain(..).collect();
        self.metrics().warm_connections.set(0);
        drop(idle);
        for entry in &all {
            self.forget(entry);
        }
        all
    }

    /// Takes every entry out to service it. Unlike [`Inner::drain`], each stays counted as a
    /// live upstream connection, and in the re-auth deadline (its token still runs), until it
    /// is put back ([`Inner::requeue`]) or dropped ([`Inner::forget_id`]): the alerting gauge
    /// must not read `+Inf` while the pool re-authenticates.
    fn drain_for_service(&self) -> Vec<Idle> {
        let mut idle = self.lock();
        let all: Vec<Idle> = idle.drain(..).collect();
        self.metrics().warm_connections.set(0);
        all
    }

    /// Puts a new entry at the end of the queue.
    fn push(&self, entry: Idle) {
        self.metrics().upstream_connections.inc();
        self.requeue(entry);
    }

    /// Puts an entry taken by [`Inner::drain_for_service`] back, with its (new) expiry.
    fn requeue(&self, entry: Idle) {
        let expiry = entry.ready.credential.as_ref().and_then(|c| c.expires_at);
        self.metrics().set_auth_expiry(entry.id, expiry);
        let mut idle = self.lock();
        idle.push_back(entry);
        self.metrics().warm_connections.set(idle.len() as i64);
    }

    fn forget(&self, entry: &Idle) {
        self.forget_id(entry.id);
    }

    /// Connection `id` is no longer an upstream connection of the pool.
    fn forget_id(&self, id: u64) {
        self.metrics().forget_connection(id);
        self.metrics().upstream_connections.dec();
    }

    fn missing(&self) -> usize {
        if self.dormant.load(Ordering::Relaxed) {
            return 0;
        }
        self.size.saturating_sub(self.lock().len())
    }
}

/// Fills the pool, refills it after each take, re-authenticates idle connections when the
/// credential changes and `PING`s them every [`SERVICE_INTERVAL`].
async fn maintain(inner: Arc<Inner>, health: Arc<Health>, stop: CancellationToken) {
    let mut credentials = inner.connector.credentials.subscribe();
    let mut watching = inner.connector.authenticate;
    let mut retry = RETRY_MIN;
    let mut service = tokio::time::interval(SERVICE_INTERVAL);
    service.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    service.reset(); // the first tick is one interval away, not now
    if inner.dormant.load(Ordering::Relaxed) {
        tokio::select! {
            () = inner.woken.notified() => {}
            () = stop.cancelled() => return,
        }
        tracing::debug!("warm pool: a client was pinned; filling");
    }
    loop {
        let missing = inner.missing();
        if missing > 0 {
            let filled = tokio::select! {
                r = fill(&inner, missing.min(FILL_CONCURRENCY)) => r,
                _ = stop.cancelled() => break,
            };
            match filled {
                Ok(()) => {
                    health.mark_started();
                    retry = RETRY_MIN;
                    continue;
                }
                Err(reason) => {
                    tracing::warn!(error = %reason, retry_in = ?retry, "warm pool: cannot open an upstream connection");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stop.cancelled() => break,
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            }
        }
        tokio::select! {
            _ = inner.taken.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep(REFILL_DELAY) => {}
                    _ = stop.cancelled() => break,
                }
            }
            r = credentials.changed(), if watching => match r {
                Ok(()) => service_all(&inner).await,
                Err(_) => watching = false,
            },
            _ = service.tick() => service_all(&inner).await,
            _ = stop.cancelled() => break,
        }
    }
    inner.drain();
}

/// Opens `count` connections at once and pools those that worked; the first error, if any.
async fn fill(inner: &Arc<Inner>, count: usize) -> Result<(), String> {
    let mut opening = JoinSet::new();
    for _ in 0..count {
        let connector = inner.connector.clone();
        opening.spawn(async move { connector.open().await });
    }
    let mut first_error = None;
    while let Some(opened) = opening.join_next().await {
        match opened {
            // A connection given back meanwhile may have filled the pool: no more than `size`.
            Ok(Ok(ready)) if inner.missing() > 0 => {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                inner.push(Idle { id, ready });
            }
            Ok(Ok(_surplus)) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                first_error.get_or_insert_with(|| format!("connect task failed: {e}"));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Takes every idle connection out, re-authenticates it (newer credential) or `PING`s it, and
/// puts back those that answered. Clients arriving meanwhile connect themselves.
async fn service_all(inner: &Arc<Inner>) {
    let newest = inner
        .connector
        .credentials
        .subscribe()
        .borrow()
        .current
        .clone();
    let timeout = inner.connector.connect_timeout;
    let mut servicing = JoinSet::new();
    // Taken out but still counted: each one is requeued or forgotten below.
    let mut outstanding = Vec::new();
    for entry in inner.drain_for_service() {
        let newest = newest.clone();
        let id = entry.id;
        outstanding.push(id);
        servicing.spawn(async move {
            let result = tokio::time::timeout(timeout, service(entry, newest))
                .await
                .unwrap_or(Err("no answer in time"));
            (id, result)
        });
    }
    while let Some(done) = servicing.join_next().await {
        let Ok((id, result)) = done else {
            continue; // a task that panicked: forgotten below
        };
        outstanding.retain(|&o| o != id);
        match result {
            Ok((entry, reauthenticated)) => {
                if reauthenticated {
                    inner.metrics().reauth_success.inc();
                }
                inner.requeue(entry);
            }
            Err(reason) => {
                inner.forget_id(id);
                if reason == REAUTH_REFUSED {
                    inner.metrics().reauth_failure.inc();
                }
                tracing::debug!(reason, "warm pool: dropping an idle connection");
            }
        }
    }
    for id in outstanding {
        inner.forget_id(id);
    }
}

/// One idle connection: `AUTH` when a newer credential exists, else `PING`. True in the result
/// when it was re-authenticated.
async fn service(
    mut entry: Idle,
    newest: Option<Arc<AuthCredential>>,
) -> Result<(Idle, bool), &'static str> {
    let stale = match (&entry.ready.credential, &newest) {
        (Some(current), Some(newest)) => current.generation < newest.generation,
        _ => false,
    };
    let command = match (&newest, stale) {
        (Some(newest), true) => newest.auth_command().clone(),
        _ => Bytes::from_static(PING),
    };
    let replies = roundtrip(&mut entry.ready.stream, &[command])
        .await
        .map_err(|_| "connection broken")?;
    // A `-BUSY` to the `PING` (another client's script has run past `busy-reply-threshold`)
    // says the connection is alive: it is kept, not dropped and dialled again meanwhile.
    let busy = !stale && replies.first().is_some_and(|r| r.starts_with(b"-BUSY "));
    if !busy && !replies.first().is_some_and(|r| r.starts_with(b"+")) {
        return Err(if stale {
            REAUTH_REFUSED
        } else {
            "PING refused"
        });
    }
    if stale {
        entry.ready.credential = newest;
    }
    Ok((entry, stale))
}

/// True when an idle connection has nothing to read. Whatever arrived meanwhile is read
/// without waiting: TLS session tickets are taken in by rustls (still open), a TLS
/// `close_notify` or a TCP close ends it, and any reply data would mean the connection is not
/// idle after all (an error the server sent before closing, say): not handed out either.
async fn still_open(stream: &mut UpstreamStream) -> bool {
    let mut byte = [0u8; 1];
    // Polled exactly once: `Pending` (it would wait) means open. (A zero timeout would do the
    // same, but waits for the timer wheel's next millisecond tick before it says so.)
    std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        Poll::Ready(Pin::new(&mut *stream).poll_read(cx, &mut buf).is_pending())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An idle connection to a fake server that answers one command with `reply`.
    async fn idle_answering(reply: &'static [u8]) -> Idle {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut server, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = server.read(&mut buf).await;
            server.write_all(reply).await.unwrap();
            let _ = server.read(&mut buf).await; // stays open until the client goes
        });
        let stream = UpstreamStream::Plain(TcpStream::connect(addr).await.unwrap());
        Idle {
            id: POOL_ID_BASE,
            ready: Ready {
                stream,
                credential: None,
            },
        }
    }

    #[tokio::test]
    async fn a_ping_refused_by_a_busy_server_keeps_the_connection() {
        let busy = b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.\r\n";
        assert!(service(idle_answering(busy).await, None).await.is_ok());
        assert!(
            service(idle_answering(b"+PONG\r\n").await, None)
                .await
                .is_ok()
        );
        let refused = service(
            idle_answering(b"-NOAUTH Authentication required.\r\n").await,
            None,
        )
        .await;
        assert_eq!(refused.err(), Some("PING refused"));
    }
}
