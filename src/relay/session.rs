//! The I/O loop of one relayed connection: sockets in, [`Core`] in the middle, sockets out.
//!
//! Everything that decides lives in [`Core`]; this loop only moves bytes and events. It owns
//! both sockets in one task and polls them directly (no `io::split`, so no lock per read or
//! write), reads only when the core has room ([`Core::wants_client_input`]), writes what the
//! core produced, and tells it about what it can't see: a newly published credential (the
//! watch channel is looked at only when it changes), the end of either input, the upstream
//! connection being opened (with `--listen-password`, only once the client has authenticated),
//! a timer, and shutdown.

use super::core::Core;
use super::{RelayContext, SessionEnd};
use crate::credential::{AuthCredential, CredentialWatch};
use crate::upstream::UpstreamStream;
use bytes::{Buf, BytesMut};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Bytes reserved per read once a connection has shown it moves more than small commands.
const READ_CHUNK: usize = 16 * 1024;
/// A fresh connection's read buffers start this small: most commands and replies fit, and an
/// idle connection (thousands of them, for a connection-per-thread application) then holds
/// little memory. A read that fills it makes the buffer grow to [`READ_CHUNK`].
const FIRST_READ: usize = 1024;
/// Below this much free space a read buffer is grown (or its consumed front reclaimed).
const MIN_READ_SPACE: usize = 256;
/// How long what is still owed to a client that is being closed may take to write.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// An authenticated upstream connection and the credential of its last `AUTH` (`None` with
/// `--auth none`).
pub struct Upstream<U> {
    /// The connection.
    pub stream: U,
    /// What it is authenticated with.
    pub credential: Option<Arc<AuthCredential>>,
}

/// Opening an upstream connection: the connection, or the reason the client is told.
pub type OpenFuture<U> = Pin<Box<dyn Future<Output = Result<Upstream<U>, String>> + Send>>;

/// Opens the upstream connection of a session whose client has just authenticated.
pub type Opener<U> = Box<dyn FnOnce() -> OpenFuture<U> + Send>;

/// An upstream connection a session gave back, clean (see [`Session::run_and_recycle`]).
pub type Recycled<U> = Upstream<U>;

/// One relayed client connection. `U` is the upstream stream: TLS in production, an in-memory
/// pipe in the tests that script both sides.
pub struct Session<C, U = UpstreamStream> {
    core: Core,
    ctx: Arc<RelayContext>,
    client: C,
    upstream: Option<U>,
    opener: Option<Opener<U>>,
    credentials: CredentialWatch,
}

/// What one turn of polling found.
enum Event<U> {
    /// Bytes moved; let the core look.
    Progress,
    ClientEof,
    UpstreamEof,
    Credential(Option<CredentialWatch>),
    Opened(Result<Upstream<U>, String>),
    Timer,
    Shutdown,
}

impl<C, U> Session<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// A session over an accepted client and its authenticated upstream connection.
    pub fn new(
        id: u64,
        ctx: Arc<RelayContext>,
        client: C,
        upstream: Upstream<U>,
        credentials: CredentialWatch,
    ) -> Self {
        let mut session = Self::without_upstream(id, ctx, client, None, credentials);
        session.attach(upstream);
        session
    }

    /// A session whose upstream is opened by `opener` once the client has authenticated
    /// (`--listen-password`).
    pub fn with_opener(
        id: u64,
        ctx: Arc<RelayContext>,
        client: C,
        opener: Opener<U>,
        credentials: CredentialWatch,
    ) -> Self {
        Self::without_upstream(id, ctx, client, Some(opener), credentials)
    }

    fn without_upstream(
        id: u64,
        ctx: Arc<RelayContext>,
        client: C,
        opener: Option<Opener<U>>,
        credentials: CredentialWatch,
    ) -> Self {
        let newest = ctx
            .authenticate
            .then(|| credentials.borrow().current.clone())
            .flatten();
        Session {
            core: Core::new(id, ctx.clone(), newest),
            ctx,
            client,
            upstream: None,
            opener,
            credentials,
        }
    }

    /// Cluster mode: replies name nodes by their local listeners (see [`crate::cluster`]).
    pub(crate) fn set_cluster(&mut self, view: crate::cluster::ClusterView) {
        self.core.set_cluster(view);
    }

    /// Multiplexing: takes over a client that was shared (see `crate::mux`).
    pub(crate) fn take_over(
        &mut self,
        input: &[u8],
        setup: &[bytes::Bytes],
        authenticated: bool,
        resp3: bool,
    ) {
        self.core.take_over(input, setup, authenticated, resp3);
    }

    /// Relays until either side closes, an error, or `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> SessionEnd {
        self.run_and_recycle(shutdown).await.0
    }

    /// Like [`Session::run`], and when the client left a clean connection behind (it closed
    /// between commands, every reply was delivered, no command left state upstream), also
    /// gives the upstream connection back for another client.
    pub async fn run_and_recycle(
        mut self,
        shutdown: CancellationToken,
    ) -> (SessionEnd, Option<Recycled<U>>) {
        let end = self.relay(shutdown).await;
        let clean = end.is_ok() && self.core.recyclable();
        // Deliver what is already owed to the client (e.g. a protocol error), briefly.
        let owed = std::mem::take(self.core.to_client());
        if !owed.is_empty() {
            let _ = tokio::time::timeout(FINAL_WRITE, self.client.write_all(&owed)).await;
        }
        let _ = self.client.shutdown().await;
        if let Err(SessionEnd::ClientProtocol(_)) = &end {
            // Read what the client still sends for a moment, so that closing doesn't reset the
            // connection before it has read the error (a reset can discard it).
            let mut sink = [0u8; 1024];
            let drain =
                async { while matches!(self.client.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(FINAL_WRITE, drain).await;
        }
        self.ctx.metrics.forget_connection(self.core.id());
        if self.upstream.is_some() {
            self.ctx.metrics.upstream_connections.dec();
        }
        match (end, self.upstream.take()) {
            (Ok(()), Some(stream)) if clean => {
                let credential = self.core.credential();
                (
                    SessionEnd::ClientClosed,
                    Some(Upstream { stream, credential }),
                )
            }
            (Ok(()), _) => (SessionEnd::ClientClosed, None),
            (Err(e), _) => (e, None),
        }
    }

    async fn relay(&mut self, shutdown: CancellationToken) -> Result<(), SessionEnd> {
        // The waits every session shares with all others (the shutdown token, the credential
        // channel) are created once, not once per loop turn: a fresh one each turn would
        // register a waiter under the shared channel's lock for every command. The session
        // waits on a child of the shutdown token, whose waiter list is its own.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut watching = self.ctx.authenticate;
        let changed = next_credential(self.credentials.clone());
        tokio::pin!(changed);
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_armed;
        let mut opening: Option<OpenFuture<U>> = None;
        let mut io = IoState::default();
        loop {
            self.core.process(Instant::now());
            if let Some(end) = self.core.finished() {
                return end;
            }
            if self.core.wants_upstream()
                && self.upstream.is_none()
                && opening.is_none()
                && let Some(open) = self.opener.take()
            {
                opening = Some(open());
            }
            match self.core.next_wakeup() {
                Some(at) => {
                    timer.as_mut().reset(at.into());
                    timer_armed = true;
                }
                None => timer_armed = false,
            }
            let event = poll_fn(|cx| {
                let step = poll_io(
                    cx,
                    &mut self.core,
                    &mut self.client,
                    self.upstream.as_mut(),
                    &mut io,
                    &self.ctx,
                );
                match step {
                    Poll::Ready(r) => return Poll::Ready(r),
                    Poll::Pending => {}
                }
                if let Some(open) = opening.as_mut()
                    && let Poll::Ready(r) = open.as_mut().poll(cx)
                {
                    return Poll::Ready(Ok(Event::Opened(r)));
                }
                if watching && let Poll::Ready(w) = changed.as_mut().poll(cx) {
                    return Poll::Ready(Ok(Event::Credential(w)));
                }
                if timer_armed && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Timer));
                }
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Event::Shutdown));
                }
                Poll::Pending
            })
            .await?;
            match event {
                Event::Progress | Event::Timer => {}
                Event::ClientEof => self.core.client_closed(),
                Event::UpstreamEof => {
                    self.core.process(Instant::now()); // what came before the close is delivered
                    if let Some(end) = self.core.finished() {
                        return end;
                    }
                    return self.core.upstream_closed();
                }
                Event::Credential(Some(watch)) => {
                    let newest = watch.borrow().current.clone();
                    self.core.credential_published(newest);
                    changed.set(next_credential(watch));
                }
                Event::Credential(None) => watching = false,
                Event::Opened(Ok(upstream)) => {
                    opening = None;
                    self.attach(upstream);
                }
                Event::Opened(Err(reason)) => {
                    opening = None;
                    self.core.upstream_failed(&reason);
                }
                Event::Shutdown => return Err(SessionEnd::Shutdown),
            }
        }
    }

    /// Takes an open upstream connection (counted in `redis_proxy_upstream_connections`
    /// until the session ends).
    fn attach(&mut self, upstream: Upstream<U>) {
        self.ctx.metrics.upstream_connections.inc();
        self.core.upstream_opened(upstream.credential);
        self.upstream = Some(upstream.stream);
    }
}

/// What the poll loop remembers between turns.
#[derive(Default)]
struct IoState {
    /// A read filled all the room the client / upstream buffer had: read bigger chunks.
    cin_grown: bool,
    uin_grown: bool,
    /// The upstream writer holds TLS data that a flush must push out.
    up_unflushed: bool,
}

/// One turn over both sockets: writes what the core produced, reads what it has room for.
/// `Ready(Progress)` when anything moved; `Pending` (with every waker registered) otherwise.
fn poll_io<C, U>(
    cx: &mut Context<'_>,
    core: &mut Core,
    client: &mut C,
    upstream: Option<&mut U>,
    io: &mut IoState,
    ctx: &RelayContext,
) -> Poll<Result<Event<U>, SessionEnd>>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut progress = false;
    if !core.to_client().is_empty() {
        match Pin::new(&mut *client).poll_write(cx, core.to_client()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(SessionEnd::ClientIo(write_zero()))),
            Poll::Ready(Ok(n)) => {
                core.to_client().advance(n);
                progress = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::ClientIo(e))),
            Poll::Pending => {}
        }
    }
    if let Some(up) = upstream {
        if !core.to_upstream().is_empty() {
            match Pin::new(&mut *up).poll_write(cx, core.to_upstream()) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(SessionEnd::UpstreamIo(write_zero())));
                }
                Poll::Ready(Ok(n)) => {
                    core.to_upstream().advance(n);
                    io.up_unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
        if core.to_upstream().is_empty() && io.up_unflushed {
            // TLS may hold written data back until flushed.
            match Pin::new(&mut *up).poll_flush(cx) {
                Poll::Ready(Ok(())) => io.up_unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
        if core.wants_upstream_input() {
            let buf = core.upstream_input();
            reserve_read_space(buf, io.uin_grown);
            let room = buf.capacity() - buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *up), cx, buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Event::UpstreamEof)),
                Poll::Ready(Ok(n)) => {
                    io.uin_grown |= n == room;
                    ctx.metrics.bytes_to_client.inc_by(n as u64);
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::UpstreamIo(e))),
                Poll::Pending => {}
            }
        }
    }
    if core.wants_client_input() {
        let buf = core.client_input();
        reserve_read_space(buf, io.cin_grown);
        let room = buf.capacity() - buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(&mut *client), cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Event::ClientEof)),
            Poll::Ready(Ok(n)) => {
                io.cin_grown |= n == room;
                ctx.metrics.bytes_to_upstream.inc_by(n as u64);
                progress = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SessionEnd::ClientIo(e))),
            Poll::Pending => {}
        }
    }
    if progress {
        Poll::Ready(Ok(Event::Progress))
    } else {
        Poll::Pending
    }
}

fn write_zero() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::WriteZero,
        "connection closed while writing",
    )
}

/// Makes room for the next read into `buf`: [`FIRST_READ`] bytes until a read has filled all
/// the room it had (`grown`), [`READ_CHUNK`] from then on. A buffer with room left is not
/// touched, and `reserve` reclaims the consumed front of a buffer in place, without allocating.
fn reserve_read_space(buf: &mut BytesMut, grown: bool) {
    if buf.capacity() - buf.len() >= MIN_READ_SPACE {
        return;
    }
    buf.reserve(if grown { READ_CHUNK } else { FIRST_READ });
}

/// Resolves once a newer credential is published, giving the watch back for the next wait;
/// `None` once the channel is closed (the process is stopping).
async fn next_credential(mut watch: CredentialWatch) -> Option<CredentialWatch> {
    watch.changed().await.ok().map(|()| watch)
}

#[cfg(test)]
mod tests;
