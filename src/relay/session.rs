//! One client connection and its upstream connection: the relay loop and **re-authentication**.
//!
//! A session runs in one task. It reads client commands and upstream replies into buffers,
//! delimits them with [`Scanner`]s, and copies them across; a FIFO ([`Pending`]) records whose
//! each expected reply is. When the credential manager publishes a newer credential,
//! [`Session::maybe_reauth`] injects `AUTH` at the next *safe point* — between two client
//! commands, outside `MULTI`, not right after `CLIENT REPLY SKIP`, with `CLIENT REPLY ON/OFF`
//! around it when replies are off — and the reply is consumed from the FIFO, never shown.
//!
//! RESP2 subscribers cannot run `AUTH` at all, so before a RESP2 client's first subscribe the
//! session switches the *upstream* to RESP3 (`HELLO 3`), where `AUTH` is allowed while
//! subscribed, and rewrites what comes back into RESP2 shapes; it switches back with `HELLO 2`
//! once the client has left subscribed mode and sends an ordinary command.
//!
//! Back-pressure: each direction stops reading when the buffer towards the other side is full,
//! so a client that never reads its replies holds at most a few buffers of memory.

use super::blocking::{BlockingCall, slice_for};
use super::command::{Command, parse_confirmation};
use super::pending::{Owner, Pending, SubKind};
use super::resp::{
    Args, Frame, Grammar, ProtocolError, Scanner, encode_command, reply_elements, split_inline,
};
use crate::credential::{AuthCredential, CredentialWatch};
use crate::secret::Secret;
use crate::upstream::{UpstreamStream, error_text, select_command};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

/// A buffer towards one side stops accepting more once it holds this much.
const HIGH_WATER: usize = 64 * 1024;
/// Bytes reserved per read once a connection has shown it moves more than small commands.
const READ_CHUNK: usize = 16 * 1024;
/// A fresh connection's read buffers start this small: most commands and replies fit, and an
/// idle connection (thousands of them, for a connection-per-thread application) then holds
/// little memory. A read that fills it makes the buffer grow to [`READ_CHUNK`].
const FIRST_READ: usize = 1024;
/// Below this much free space a read buffer is grown (or its consumed front reclaimed).
const MIN_READ_SPACE: usize = 256;
/// A command the proxy must see whole (`HELLO`, `AUTH`, …) may not be larger than this.
const MAX_HELD_COMMAND: usize = 1024 * 1024;
/// A reply the proxy must see whole (its own `AUTH` reply, confirmations) may not be larger.
const MAX_HELD_REPLY: usize = 1024 * 1024;
/// Distinct FIFO entries before the client is no longer read (runs of commands share one).
const MAX_PENDING_ENTRIES: usize = 16 * 1024;
/// First delay before retrying a failed re-`AUTH`.
const REAUTH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between re-`AUTH` retries.
const REAUTH_RETRY_MAX: Duration = Duration::from_secs(10);

const HELLO_2: &[u8] = b"*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n";
const HELLO_3: &[u8] = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n";
const REPLY_ON: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n";
const REPLY_OFF: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n";
const OK: &[u8] = b"+OK\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

/// What every session of a process shares.
#[derive(Debug)]
pub struct RelayContext {
    /// Database re-selected after `RESET` (0: none).
    pub database: u32,
    /// Password clients must give, if any.
    pub listen_password: Option<Secret>,
    /// Whether upstream connections are authenticated at all (`--auth none`: no).
    pub authenticate: bool,
    /// Where re-authentications, bytes and commands are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// An upstream connection a session gave back, and the credential of its last `AUTH`.
pub struct Recycled<U> {
    /// The connection, clean (see [`Session::run_and_recycle`]).
    pub upstream: U,
    /// What it is authenticated with (`None` with `--auth none`).
    pub credential: Option<Arc<AuthCredential>>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The client closed its connection.
    #[error("client closed the connection")]
    ClientClosed,
    /// The upstream closed or broke its connection (the client connection is closed too).
    #[error("upstream closed the connection")]
    UpstreamClosed,
    /// The client sent malformed RESP; it was told so.
    #[error("client protocol error: {0}")]
    ClientProtocol(ProtocolError),
    /// The upstream sent something that is not RESP.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// An I/O error on the client's connection (e.g. the application reset it).
    #[error("client i/o error: {0}")]
    ClientIo(std::io::Error),
    /// An I/O error on the upstream connection (e.g. it was dropped without a TLS close).
    #[error("upstream i/o error: {0}")]
    UpstreamIo(std::io::Error),
    /// Authentication required after `RESET` failed; the client was told why.
    #[error("upstream authentication failed: {0}")]
    AuthFailed(String),
    /// The proxy is shutting down.
    #[error("proxy shutting down")]
    Shutdown,
}

/// `CLIENT REPLY` mode, as the client set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// What the request side knows about the connection's state on the server.
#[derive(Debug)]
struct RequestState {
    /// The client passed `--listen-password` (always true when none is set).
    client_authed: bool,
    /// Between `MULTI` and `EXEC`/`DISCARD`: no injection.
    in_multi: bool,
    reply_mode: ReplyMode,
    /// The protocol the client speaks (2 or 3).
    client_proto: u8,
    /// The upstream speaks RESP3 for a RESP2 subscriber; pushes are rewritten.
    translating: bool,
    /// The part of a large client frame already forwarded (not a safe point meanwhile).
    streaming: bool,
    /// A command was held until every outstanding reply arrived.
    waiting_for_drain: bool,
    /// `MONITOR` was sent: the connection is (becoming) a feed.
    monitor: bool,
    /// A sliced blocking command is in flight: later commands wait for its final reply.
    blocked: bool,
    /// The client sent `QUIT`: the server closing the connection is the expected end.
    quit: bool,
    /// No more client input is read (EOF, protocol error); end once replies are delivered.
    closing: bool,
    /// No command left state on the upstream connection (see [`Command::leaves_state`]): once
    /// the client has gone, the connection may serve another client.
    pristine: bool,
}

/// What the reply side knows, in reply order: subscription counts, the client's protocol (for
/// rewriting pushes), and the frame in progress.
#[derive(Debug)]
struct ReplyState {
    /// The client speaks RESP2: pushes are rewritten as arrays.
    client_proto_is_2: bool,
    channels: u64,
    patterns: u64,
    shards: u64,
    /// The connection is a `MONITOR` feed.
    monitor: bool,
    /// A frame is partly forwarded to the client (its owner already taken from the FIFO).
    streaming: bool,
}

impl Default for ReplyState {
    fn default() -> Self {
        ReplyState {
            client_proto_is_2: true,
            channels: 0,
            patterns: 0,
            shards: 0,
            monitor: false,
            streaming: false,
        }
    }
}

impl ReplyState {
    fn subscribed(&self) -> bool {
        self.channels + self.patterns + self.shards > 0
    }
}

/// Re-authentication state of the upstream connection.
#[derive(Debug)]
struct AuthState {
    /// The credential of the last successful `AUTH`.
    current: Option<Arc<AuthCredential>>,
    /// An injected `AUTH` awaits its reply.
    in_flight: bool,
    /// After a failure: not before this instant.
    retry_at: Option<Instant>,
    /// Delay before the next retry.
    backoff: Duration,
}

/// One relayed client connection. `U` is the upstream stream: TLS in production, an in-memory
/// pipe in the unit tests that script both sides.
pub struct Session<C, U = UpstreamStream> {
    id: u64,
    ctx: Arc<RelayContext>,
    client_rd: ReadHalf<C>,
    client_wr: WriteHalf<C>,
    up_rd: ReadHalf<U>,
    up_wr: WriteHalf<U>,
    /// Client bytes not yet handled.
    cin: BytesMut,
    /// Upstream bytes not yet handled.
    uin: BytesMut,
    /// Bytes for the upstream.
    to_up: BytesMut,
    /// Bytes for the client.
    to_client: BytesMut,
    /// A read filled all the room `cin` / `uin` had: they read [`READ_CHUNK`] at a time now.
    cin_grown: bool,
    uin_grown: bool,
    /// The upstream writer holds TLS data that a flush must push out.
    up_unflushed: bool,
    requests: Scanner,
    replies: Scanner,
    pending: Pending,
    req: RequestState,
    rep: ReplyState,
    auth: AuthState,
    credentials: CredentialWatch,
}

impl<C, U> Session<C, U>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// A session over an accepted client and its authenticated upstream connection.
    pub fn new(
        id: u64,
        ctx: Arc<RelayContext>,
        client: C,
        upstream: U,
        authenticated_with: Option<Arc<AuthCredential>>,
        credentials: CredentialWatch,
    ) -> Self {
        let (client_rd, client_wr) = tokio::io::split(client);
        let (up_rd, up_wr) = tokio::io::split(upstream);
        let client_authed = ctx.listen_password.is_none();
        let expiry = authenticated_with.as_ref().and_then(|c| c.expires_at);
        ctx.metrics.set_auth_expiry(id, expiry);
        Session {
            id,
            ctx,
            client_rd,
            client_wr,
            up_rd,
            up_wr,
            cin: BytesMut::new(),
            uin: BytesMut::new(),
            to_up: BytesMut::new(),
            to_client: BytesMut::new(),
            cin_grown: false,
            uin_grown: false,
            up_unflushed: false,
            requests: Scanner::new(Grammar::Request),
            replies: Scanner::new(Grammar::Reply),
            pending: Pending::default(),
            req: RequestState {
                client_authed,
                in_multi: false,
                reply_mode: ReplyMode::On,
                client_proto: 2,
                translating: false,
                streaming: false,
                waiting_for_drain: false,
                monitor: false,
                blocked: false,
                quit: false,
                closing: false,
                pristine: true,
            },
            rep: ReplyState::default(),
            auth: AuthState {
                current: authenticated_with,
                in_flight: false,
                retry_at: None,
                backoff: REAUTH_RETRY_MIN,
            },
            credentials,
        }
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
        let clean = end.is_ok() && self.upstream_is_clean();
        // Deliver what is already owed to the client (e.g. a protocol error), briefly.
        if !self.to_client.is_empty() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.client_wr.write_all(&self.to_client),
            )
            .await;
        }
        let _ = self.client_wr.shutdown().await;
        self.ctx.metrics.forget_connection(self.id);
        match end {
            Ok(()) if clean => {
                let recycled = Recycled {
                    upstream: self.up_rd.unsplit(self.up_wr),
                    credential: self.auth.current,
                };
                (SessionEnd::ClientClosed, Some(recycled))
            }
            Ok(()) => (SessionEnd::ClientClosed, None),
            Err(e) => (e, None),
        }
    }

    /// The upstream connection is as a new one would be: nothing in flight either way, no
    /// transaction, no state left by the client, and the proxy's own `AUTH` settled.
    fn upstream_is_clean(&self) -> bool {
        self.req.pristine
            && !self.req.in_multi
            && !self.req.streaming
            && !self.rep.streaming
            && !self.auth.in_flight
            && self.pending.is_empty()
            && self.uin.is_empty()
            && self.to_up.is_empty()
            && !self.up_unflushed
    }

    async fn relay(&mut self, shutdown: CancellationToken) -> Result<(), SessionEnd> {
        // The two waits every session shares with all others (the shutdown token, the
        // credential channel) are created once, not once per loop turn: polling a fresh one
        // each turn would register and unregister a waiter under the shared channel's lock for
        // every command, and every session contends on that lock. The session waits on a child
        // of the shutdown token, whose waiter list is its own.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut watching = self.ctx.authenticate;
        let changed = next_credential(self.credentials.clone());
        tokio::pin!(changed);
        loop {
            self.process_replies()?;
            self.process_requests()?;
            self.maybe_reauth();
            self.emit_locals(); // answers made while handling requests, if next in line
            if self.req.closing
                && self.pending.is_empty()
                && self.to_client.is_empty()
                && self.to_up.is_empty()
            {
                return Ok(());
            }
            let read_client = !self.req.closing
                && !self.req.waiting_for_drain
                && self.to_up.len() < HIGH_WATER
                && self.cin.len() < self.client_buffer_limit()
                && self.pending.entries() < MAX_PENDING_ENTRIES;
            let read_up = self.to_client.len() < HIGH_WATER && self.uin.len() < MAX_HELD_REPLY;
            if read_client {
                reserve_read_space(&mut self.cin, self.cin_grown);
            }
            if read_up {
                reserve_read_space(&mut self.uin, self.uin_grown);
            }
            let (cin_room, uin_room) = (room(&self.cin), room(&self.uin));
            let retry = self.auth.retry_at;
            tokio::select! {
                r = self.up_rd.read_buf(&mut self.uin), if read_up => {
                    let n = r.map_err(SessionEnd::UpstreamIo)?;
                    self.uin_grown |= n == uin_room;
                    self.ctx.metrics.bytes_to_client.inc_by(n as u64);
                    if n == 0 {
                        self.process_replies()?; // what came before the close is delivered
                        return if self.req.quit { Ok(()) } else { Err(SessionEnd::UpstreamClosed) };
                    }
                }
                r = self.client_rd.read_buf(&mut self.cin), if read_client => {
                    let n = r.map_err(SessionEnd::ClientIo)?;
                    self.cin_grown |= n == cin_room;
                    self.ctx.metrics.bytes_to_upstream.inc_by(n as u64);
                    if n == 0 {
                        self.req.closing = true;
                        if self.pending.holds_blocking() {
                            return Ok(()); // closing upstream unblocks it (see `holds_blocking`)
                        }
                    }
                }
                r = write_or_flush(&mut self.up_wr, &self.to_up),
                    if !self.to_up.is_empty() || self.up_unflushed =>
                {
                    let n = r.map_err(SessionEnd::UpstreamIo)?;
                    self.to_up.advance(n);
                    // TLS may hold written data back until flushed.
                    self.up_unflushed = !self.to_up.is_empty() || n > 0;
                }
                r = self.client_wr.write(&self.to_client), if !self.to_client.is_empty() => {
                    let n = r.map_err(SessionEnd::ClientIo)?;
                    self.to_client.advance(n);
                }
                watch = &mut changed, if watching => match watch {
                    Some(watch) => changed.set(next_credential(watch)),
                    None => watching = false,
                },
                _ = sleep_until(retry), if retry.is_some() => {
                    self.auth.retry_at = None;
                }
                _ = &mut cancelled => return Err(SessionEnd::Shutdown),
            }
        }
    }

    /// How much client input may be buffered: enough for a command the proxy must see whole.
    fn client_buffer_limit(&self) -> usize {
        if self.requests.kind().is_some() && !self.req.streaming {
            MAX_HELD_COMMAND + READ_CHUNK
        } else {
            HIGH_WATER
        }
    }

    // ----- requests: client → upstream -------------------------------------------------------

    /// Handles every complete client command in `cin`; streams a large ordinary one.
    fn process_requests(&mut self) -> Result<(), SessionEnd> {
        let mut cin = std::mem::take(&mut self.cin);
        let result = self.process_requests_in(&mut cin);
        self.cin = cin;
        result
    }

    fn process_requests_in(&mut self, cin: &mut BytesMut) -> Result<(), SessionEnd> {
        while !self.req.closing && !self.req.blocked && self.to_up.len() < HIGH_WATER {
            if self.pending.entries() >= MAX_PENDING_ENTRIES {
                return Ok(());
            }
            match self.requests.scan(cin) {
                Ok(Some(frame)) => {
                    if !self.request_frame(cin, frame) {
                        // Held until every outstanding reply is in; it is scanned again then.
                        self.req.waiting_for_drain = true;
                        return Ok(());
                    }
                }
                Ok(None) => {
                    self.stream_request(cin)?;
                    return Ok(());
                }
                Err(e) => {
                    // Earlier replies are delivered first, then the error, then the close.
                    self.client_protocol_error(e);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Queues Redis's protocol error for the client and stops reading it.
    fn client_protocol_error(&mut self, e: ProtocolError) {
        tracing::debug!(conn = self.id, error = %e, "malformed client input");
        let mut reply = BytesMut::with_capacity(e.0.len() + 8);
        reply.put_slice(b"-ERR ");
        reply.put_slice(e.0.as_bytes());
        reply.put_slice(b"\r\n");
        self.pending.push(Owner::Local(reply.freeze()));
        self.req.closing = true;
        self.req.pristine = false;
    }

    /// One complete client frame at the front of `cin`. False: hold it (see `waiting_for_drain`).
    fn request_frame(&mut self, cin: &mut BytesMut, frame: Frame) -> bool {
        if self.req.streaming {
            // The rest of a frame whose start is already forwarded.
            self.to_up.extend_from_slice(&cin[..frame.len]);
            cin.advance(frame.len);
            self.req.streaming = false;
            return true;
        }
        let handled = if frame.kind == b'i' {
            self.inline_command(&cin[..frame.len])
        } else {
            self.command(&cin[..frame.len])
        };
        if handled {
            cin.advance(frame.len);
        }
        handled
    }

    /// An inline command (`PING\r\n` typed in telnet) is turned into a multibulk one.
    fn inline_command(&mut self, line: &[u8]) -> bool {
        match split_inline(line) {
            Some(args) if args.is_empty() => true,
            Some(args) => {
                let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                let encoded = encode_command(&refs);
                self.command(&encoded)
            }
            None => {
                self.client_protocol_error(ProtocolError(
                    "Protocol error: unbalanced quotes in request",
                ));
                true
            }
        }
    }

    /// Forwards the already-delimited part of a large ordinary command as it arrives.
    fn stream_request(&mut self, cin: &mut BytesMut) -> Result<(), SessionEnd> {
        let scanned = self.requests.scanned();
        if scanned == 0 || (cin.len() < HIGH_WATER && !self.req.streaming) {
            return Ok(());
        }
        if !self.req.streaming {
            let Some(owner) = self.streamable_owner(&cin[..scanned]) else {
                if cin.len() >= MAX_HELD_COMMAND {
                    self.client_protocol_error(ProtocolError(
                        "Protocol error: command too large for redis-entra-proxy to inspect",
                    ));
                }
                return Ok(()); // held until it is complete
            };
            self.expect_reply(owner);
            self.ctx.metrics.commands.inc();
            self.req.streaming = true;
        }
        self.to_up.extend_from_slice(&cin[..scanned]);
        cin.advance(scanned);
        self.requests.consumed(scanned);
        Ok(())
    }

    /// The reply owner of a command that may be forwarded before it has fully arrived: one whose
    /// handling needs only its name and argument count. `None`: the proxy must see it whole
    /// (`AUTH`, `HELLO`, `CLIENT`, blocking commands, anything before `--listen-password`).
    fn streamable_owner(&mut self, head: &[u8]) -> Option<Owner> {
        let mut args = Args::new(head);
        let channels = args.remaining().checked_sub(1)?;
        let cmd = Command::classify(args.next()?);
        if !self.req.client_authed {
            return None;
        }
        let owner = match cmd {
            Command::Other | Command::Ping if !self.req.translating => Some(Owner::Client),
            Command::Subscribe(kind) => Some(self.subscription_owner(kind, true, channels)),
            Command::Unsubscribe(kind) => Some(self.subscription_owner(kind, false, channels)),
            _ => None, // held until complete, then handled (and judged) by `command`
        };
        if owner.is_some() {
            self.req.pristine &= !cmd.leaves_state();
        }
        owner
    }

    /// One complete multibulk command. False: hold it until outstanding replies are in.
    fn command(&mut self, frame: &[u8]) -> bool {
        let mut args = Args::new(frame);
        let Some(name) = args.next() else {
            return true; // `*0`: Redis ignores it and sends nothing.
        };
        let cmd = Command::classify(name);
        self.ctx.metrics.commands.inc();
        if cmd != Command::Client {
            self.req.pristine &= !cmd.leaves_state(); // `CLIENT`: by subcommand, below
        }
        if !self.req.client_authed && !matches!(cmd, Command::Auth | Command::Hello | Command::Quit)
        {
            self.local(NOAUTH);
            return true;
        }
        if self.req.translating {
            match self.subscribed_gate(cmd, name) {
                Gate::Proceed => {}
                Gate::Hold => return false,
                Gate::Answered => {
                    self.req.waiting_for_drain = false;
                    return true;
                }
            }
        }
        self.req.waiting_for_drain = false;
        match cmd {
            Command::Other | Command::Stateful => self.forward(frame, Owner::Client),
            Command::Auth => self.client_auth(args),
            Command::Hello => self.client_hello(frame),
            Command::Reset => self.reset(frame),
            Command::Multi => {
                self.forward(frame, Owner::Client);
                self.req.in_multi = true;
            }
            Command::EndTransaction => {
                self.forward(frame, Owner::Client);
                self.req.in_multi = false;
            }
            Command::Client => self.client_command(frame, args),
            Command::Subscribe(kind) => self.subscription(frame, kind, true, args.remaining()),
            Command::Unsubscribe(kind) => self.subscription(frame, kind, false, args.remaining()),
            Command::Ping if self.req.translating => self.forward(frame, Owner::SubscribedPing),
            Command::Monitor => {
                self.forward(frame, Owner::ClientMonitor);
                self.req.monitor = true;
            }
            Command::Ping => self.forward(frame, Owner::Client),
            Command::Quit => {
                self.forward(frame, Owner::Client);
                self.req.quit = true;
            }
            Command::Blocking => self.blocking(frame),
        }
        true
    }

    /// A command that may block. With a token that expires, it is sent with a bounded timeout
    /// (see `blocking`), and later commands wait for its final reply so that they still run
    /// after it. Not sliced when its reply could not be seen (`CLIENT REPLY OFF|SKIP`), inside
    /// `MULTI` (nothing blocks there), or when the credential never expires (access key).
    fn blocking(&mut self, frame: &[u8]) {
        let slice = self.token_expiry().map(slice_for);
        let sliceable = slice.is_some()
            && !self.req.in_multi
            && self.req.reply_mode == ReplyMode::On
            && !self.req.monitor;
        let call = sliceable
            .then(|| BlockingCall::parse(Args::new(frame), Instant::now()))
            .flatten();
        match (call, slice) {
            (Some(call), Some(slice)) => self.issue_blocking(Box::new(call), slice),
            _ if self.req.in_multi || self.req.monitor => self.forward(frame, Owner::Client),
            _ => self.forward(frame, Owner::ClientBlocking),
        }
    }

    /// Sends one slice of a blocking command.
    fn issue_blocking(&mut self, mut call: Box<BlockingCall>, slice: std::time::Duration) {
        let command = call.encode(slice, Instant::now());
        self.to_up.extend_from_slice(&command);
        self.pending.push(Owner::Blocking(call));
        self.req.blocked = true;
    }

    /// The reply to one slice: the client's answer, or — when the slice ran out and the client
    /// still waits — re-authenticate if a newer credential is there, then block again.
    fn blocking_reply(&mut self, frame: &[u8], call: Box<BlockingCall>) {
        self.req.blocked = false;
        // A client that has gone away is not kept blocked: its session ends with this reply.
        if self.token_expiry().is_none()
            || self.req.closing
            || !call.should_reissue(frame, Instant::now())
        {
            self.to_client.extend_from_slice(frame);
            return;
        }
        self.maybe_reauth();
        // The next slice fits the token the connection will hold when it runs.
        if let Some(expiry) = self.token_expiry() {
            self.issue_blocking(call, slice_for(expiry));
        }
    }

    /// When the token the connection runs on (or the one whose `AUTH` is queued) expires.
    fn token_expiry(&self) -> Option<std::time::SystemTime> {
        if self.auth.in_flight
            && let Some(Owner::Auth { credential, .. }) = self.pending.any_auth()
        {
            return credential.expires_at;
        }
        self.auth.current.as_ref().and_then(|c| c.expires_at)
    }

    /// A RESP2 subscriber's command while the upstream speaks RESP3. Subscribe commands, `QUIT`
    /// and `RESET` go ahead. Anything else waits for outstanding replies (only they tell whether
    /// the client is still subscribed); then `PING` is answered the subscribed way, another
    /// command gets Redis's subscribed-mode error, or — if the client has left subscribed mode —
    /// the upstream is switched back to RESP2 and the command runs normally.
    fn subscribed_gate(&mut self, cmd: Command, name: &[u8]) -> Gate {
        if matches!(
            cmd,
            Command::Subscribe(_) | Command::Unsubscribe(_) | Command::Quit | Command::Reset
        ) {
            return Gate::Proceed;
        }
        if !self.pending.is_empty() {
            return Gate::Hold;
        }
        if self.rep.subscribed() {
            if cmd == Command::Ping {
                return Gate::Proceed;
            }
            self.local_owned(subscribed_mode_error(name));
            return Gate::Answered;
        }
        self.to_up.extend_from_slice(HELLO_2);
        self.pending.push(Owner::Hello(2));
        self.req.translating = false;
        Gate::Proceed
    }

    /// Sends `frame` upstream and records who owns its reply.
    fn forward(&mut self, frame: &[u8], owner: Owner) {
        self.to_up.extend_from_slice(frame);
        self.expect_reply(owner);
    }

    /// Records the reply a command will get, as `CLIENT REPLY OFF|SKIP` and `MONITOR` allow.
    fn expect_reply(&mut self, owner: Owner) {
        if self.req.monitor && matches!(owner, Owner::Client) {
            return; // A feed: replies to the client's own commands are not tracked.
        }
        match self.req.reply_mode {
            ReplyMode::On => self.pending.push(owner),
            ReplyMode::Off => {}
            ReplyMode::SkipNext => self.req.reply_mode = ReplyMode::On,
        }
    }

    /// A reply the proxy makes itself, delivered in order.
    fn local(&mut self, reply: &'static [u8]) {
        self.expect_reply(Owner::Local(Bytes::from_static(reply)));
    }

    fn local_owned(&mut self, reply: Bytes) {
        self.expect_reply(Owner::Local(reply));
    }

    /// The client's `AUTH`: checked against `--listen-password`, never forwarded.
    fn client_auth(&mut self, mut args: Args<'_>) {
        let password = match args.remaining() {
            1 => args.next(),
            2 => args.nth(1),
            _ => {
                self.local(b"-ERR wrong number of arguments for 'auth' command\r\n");
                return;
            }
        };
        match &self.ctx.listen_password {
            None => self.local(OK),
            Some(expected) if password.is_some_and(|p| same_secret(p, expected)) => {
                self.req.client_authed = true;
                self.local(OK);
            }
            Some(_) => self.local(WRONGPASS),
        }
    }

    /// The client's `HELLO`: its `AUTH` pair is checked like `AUTH` and replaced by the proxy's
    /// credential; the protocol switch and `SETNAME` reach the server.
    fn client_hello(&mut self, frame: &[u8]) {
        let args: Vec<&[u8]> = Args::new(frame).collect();
        let mut kept: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
        let mut client_password = None;
        let mut i = 1;
        kept.push(args[0]);
        if let Some(version) = args.get(1) {
            kept.push(version);
            i = 2;
        }
        while i < args.len() {
            let option = args[i];
            if option.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
                client_password = Some(args[i + 2]);
                i += 3;
            } else if option.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
                kept.extend_from_slice(&args[i..i + 2]);
                i += 2;
            } else {
                kept.push(option);
                i += 1;
            }
        }
        match (client_password, &self.ctx.listen_password) {
            (Some(p), Some(expected)) if !same_secret(p, expected) => return self.local(WRONGPASS),
            (Some(_), _) => self.req.client_authed = true,
            (None, _) if !self.req.client_authed => return self.local(NOAUTH_HELLO),
            (None, _) => {}
        }
        let credential = client_password
            .and(self.ctx.authenticate.then_some(()))
            .and_then(|()| self.credentials.borrow().current.clone());
        let proto = args.get(1).and_then(|v| parse_proto(v));
        let user;
        if let Some(c) = &credential {
            user = c.username.as_deref().unwrap_or("default").as_bytes();
            let at = kept.len().min(2);
            kept.splice(at..at, [&b"AUTH"[..], user, c.password.expose().as_bytes()]);
        }
        let rewritten = encode_command(&kept);
        self.forward(&rewritten, Owner::ClientHello { proto, credential });
        if let Some(p) = proto {
            self.req.client_proto = p;
        }
    }

    /// The client's `RESET`: forwarded, then `AUTH` (and `SELECT`) before anything else, because
    /// `RESET` logs the connection out and returns it to database 0.
    fn reset(&mut self, frame: &[u8]) {
        self.to_up.extend_from_slice(frame);
        self.pending.push(Owner::ClientReset); // RESET turns replies back on and always answers.
        self.req.in_multi = false;
        self.req.reply_mode = ReplyMode::On;
        self.req.client_proto = 2;
        self.req.translating = false;
        self.req.monitor = false;
        self.req.client_authed = self.ctx.listen_password.is_none();
        let newest = self.credentials.borrow().current.clone();
        if let Some(credential) = newest.filter(|_| self.ctx.authenticate) {
            self.to_up.extend_from_slice(credential.auth_command());
            self.pending.push(Owner::Auth {
                credential,
                required: true,
                sent: Instant::now(),
            });
            self.auth.in_flight = true;
        }
        if self.ctx.database != 0 {
            self.to_up
                .extend_from_slice(&select_command(self.ctx.database));
            self.pending.push(Owner::Select);
        }
    }

    /// `CLIENT REPLY ON|OFF|SKIP` changes which later commands get a reply.
    fn client_command(&mut self, frame: &[u8], mut args: Args<'_>) {
        let sub = args.clone().next();
        self.req.pristine &= sub.is_some_and(super::command::client_subcommand_keeps_no_state);
        let mode = match (args.remaining(), args.next(), args.next()) {
            (2, Some(sub), Some(mode)) if sub.eq_ignore_ascii_case(b"REPLY") => {
                parse_reply_mode(mode)
            }
            _ => None,
        };
        let Some(mode) = mode.filter(|_| !self.req.in_multi) else {
            return self.forward(frame, Owner::Client);
        };
        self.to_up.extend_from_slice(frame);
        let previous = self.req.reply_mode;
        match mode {
            ReplyMode::On => {
                self.req.reply_mode = ReplyMode::On;
                // After SKIP, the `+OK` of ON itself is the skipped reply.
                if previous != ReplyMode::SkipNext {
                    self.pending.push(Owner::Client);
                }
            }
            ReplyMode::Off => self.req.reply_mode = ReplyMode::Off,
            ReplyMode::SkipNext if previous != ReplyMode::Off => {
                self.req.reply_mode = ReplyMode::SkipNext;
            }
            ReplyMode::SkipNext => {}
        }
    }

    /// A (un)subscribe command. Its confirmations arrive as RESP3 pushes: a RESP2 client's
    /// upstream is switched to RESP3 first, so that `AUTH` stays possible while subscribed.
    fn subscription(&mut self, frame: &[u8], kind: SubKind, subscribe: bool, channels: usize) {
        let owner = self.subscription_owner(kind, subscribe, channels);
        self.forward(frame, owner);
    }

    /// Who owns the replies of a (un)subscribe command; switches a RESP2 client's upstream to
    /// RESP3 first (queued ahead of the command).
    fn subscription_owner(&mut self, kind: SubKind, subscribe: bool, channels: usize) -> Owner {
        if self.req.in_multi || (subscribe && channels == 0) {
            return Owner::Client; // queued, or an arity error
        }
        if self.req.client_proto == 2 && !self.req.translating {
            self.to_up.extend_from_slice(HELLO_3);
            self.pending.push(Owner::Hello(3));
            self.req.translating = true;
        }
        Owner::Subscription {
            kind,
            subscribe,
            remaining: (channels > 0).then_some(channels as u64),
        }
    }

    // ----- re-authentication ---------------------------------------------------------------

    /// Injects `AUTH` with the newest credential if this connection's is older and this is a
    /// safe point. See the module documentation for what makes a point safe.
    fn maybe_reauth(&mut self) {
        if !self.ctx.authenticate
            || self.auth.in_flight
            || self.auth.retry_at.is_some()
            || self.req.streaming
            || self.req.in_multi
            || self.req.reply_mode == ReplyMode::SkipNext
            || self.req.closing
            || self.req.blocked
        {
            return;
        }
        let Some(newest) = self.credentials.borrow().current.clone() else {
            return;
        };
        if let Some(current) = &self.auth.current
            && current.generation >= newest.generation
        {
            return;
        }
        let replies_off = self.req.reply_mode == ReplyMode::Off;
        if replies_off {
            self.to_up.extend_from_slice(REPLY_ON);
            self.pending.push(Owner::ReplyOn);
        }
        self.to_up.extend_from_slice(newest.auth_command());
        self.pending.push(Owner::Auth {
            credential: newest,
            required: false,
            sent: Instant::now(),
        });
        if replies_off {
            self.to_up.extend_from_slice(REPLY_OFF);
        }
        self.auth.in_flight = true;
    }

    /// The reply to an injected `AUTH`. On failure the connection keeps its previous token and
    /// the `AUTH` is retried with backoff while that token lives.
    fn auth_reply(
        &mut self,
        frame: &[u8],
        credential: Arc<AuthCredential>,
        required: bool,
    ) -> Result<(), SessionEnd> {
        self.auth.in_flight = false;
        let metrics = &self.ctx.metrics;
        if frame.first() == Some(&b'+') {
            tracing::debug!(
                conn = self.id,
                generation = credential.generation,
                "re-authenticated"
            );
            metrics.reauth_success.inc();
            metrics.set_auth_expiry(self.id, credential.expires_at);
            self.auth.current = Some(credential);
            self.auth.backoff = REAUTH_RETRY_MIN;
            return Ok(());
        }
        let reason = error_text(frame);
        metrics.reauth_failure.inc();
        if required {
            let line = super::proxy_error(&format!("upstream authentication failed: {reason}"));
            self.to_client.extend_from_slice(&line);
            return Err(SessionEnd::AuthFailed(reason));
        }
        tracing::warn!(
            conn = self.id,
            generation = credential.generation,
            error = %reason,
            retry_in_ms = self.auth.backoff.as_millis() as u64,
            "re-authentication failed; the connection keeps its current token and retries"
        );
        self.auth.retry_at = Some(Instant::now() + self.auth.backoff);
        self.auth.backoff = (self.auth.backoff * 2).min(REAUTH_RETRY_MAX);
        Ok(())
    }

    // ----- replies: upstream → client ------------------------------------------------------

    /// Handles every complete reply in `uin`; streams a large client-owned one.
    fn process_replies(&mut self) -> Result<(), SessionEnd> {
        let mut uin = std::mem::take(&mut self.uin);
        let result = self.process_replies_in(&mut uin);
        self.uin = uin;
        result
    }

    fn process_replies_in(&mut self, uin: &mut BytesMut) -> Result<(), SessionEnd> {
        loop {
            self.emit_locals();
            if uin.is_empty() || self.to_client.len() >= HIGH_WATER {
                return Ok(());
            }
            let scanned = self.replies.scan(uin);
            match scanned.map_err(|e| SessionEnd::UpstreamProtocol(e.to_string()))? {
                Some(frame) => {
                    self.reply_frame(&uin[..frame.len], frame.kind)?;
                    uin.advance(frame.len);
                }
                None => return self.stream_reply(uin),
            }
        }
    }

    /// Replies the proxy made up, once they are next in line.
    fn emit_locals(&mut self) {
        if self.rep.streaming {
            return;
        }
        while let Some(Owner::Local(_)) = self.pending.head() {
            if let Some(Owner::Local(reply)) = self.pending.pop() {
                self.to_client.extend_from_slice(&reply);
            }
        }
    }

    /// One complete reply frame.
    fn reply_frame(&mut self, frame: &[u8], kind: u8) -> Result<(), SessionEnd> {
        if self.rep.streaming {
            self.to_client.extend_from_slice(frame); // the rest of a streamed frame
            self.rep.streaming = false;
            return Ok(());
        }
        if kind == b'>' {
            self.push_frame(frame);
            return Ok(());
        }
        if self.rep.monitor && !self.monitor_reply_is_ours(frame) {
            self.to_client.extend_from_slice(frame);
            return Ok(());
        }
        match self.pending.pop() {
            None
            | Some(Owner::Client)
            | Some(Owner::ClientBlocking)
            | Some(Owner::Subscription { .. }) => self.to_client.extend_from_slice(frame),
            Some(Owner::Local(reply)) => {
                // Not reached: locals are emitted before each frame. Keep order regardless.
                self.to_client.extend_from_slice(&reply);
                self.to_client.extend_from_slice(frame);
            }
            Some(Owner::Auth {
                credential,
                required,
                sent,
            }) => {
                let reauth = &self.ctx.metrics.reauth_seconds;
                reauth.observe(sent.elapsed().as_secs_f64());
                self.auth_reply(frame, credential, required)?
            }
            Some(Owner::Select) | Some(Owner::ReplyOn) => {
                if is_error(frame) {
                    tracing::warn!(conn = self.id, error = %error_text(frame), "upstream refused a proxy command");
                }
            }
            Some(Owner::Hello(proto)) => {
                if is_error(frame) {
                    return Err(SessionEnd::UpstreamProtocol(format!(
                        "HELLO {proto} refused: {}",
                        error_text(frame)
                    )));
                }
            }
            Some(Owner::ClientHello { proto, credential }) => {
                self.to_client.extend_from_slice(frame);
                if !is_error(frame) {
                    if let Some(p) = proto {
                        self.rep.client_proto_is_2 = p == 2;
                    }
                    if let Some(c) = credential {
                        self.ctx.metrics.set_auth_expiry(self.id, c.expires_at);
                        self.auth.current = Some(c);
                    }
                }
            }
            Some(Owner::ClientReset) => {
                self.to_client.extend_from_slice(frame);
                self.rep = ReplyState::default();
            }
            Some(Owner::ClientMonitor) => {
                self.to_client.extend_from_slice(frame);
                self.rep.monitor = !is_error(frame);
            }
            Some(Owner::SubscribedPing) => self.subscribed_ping(frame),
            Some(Owner::Blocking(call)) => self.blocking_reply(frame, call),
        }
        Ok(())
    }

    /// In a `MONITOR` feed, the proxy's own replies are recognised by shape: feed lines start with
    /// a timestamp, never `+OK`, `+RESET` or an error.
    fn monitor_reply_is_ours(&self, frame: &[u8]) -> bool {
        match self.pending.head() {
            Some(Owner::Auth { .. } | Owner::Select | Owner::ReplyOn) => {
                frame == OK || is_error(frame)
            }
            Some(Owner::ClientReset) => frame == b"+RESET\r\n",
            Some(Owner::ClientMonitor) => true,
            _ => false,
        }
    }

    /// A push frame: out of band, never matched to a request — except subscribe confirmations,
    /// which count down the command that asked for them.
    fn push_frame(&mut self, frame: &[u8]) {
        let mut elements = reply_elements(frame);
        let name = elements.next().map(|(_, v)| v);
        if let Some((kind, subscribe)) = name.and_then(parse_confirmation) {
            let count = elements.nth(1).and_then(|(_, v)| parse_u64(v));
            self.confirmation(kind, subscribe, count);
        }
        if self.rep.client_proto_is_2 {
            push_as_resp2(frame, &mut self.to_client);
        } else {
            self.to_client.extend_from_slice(frame);
        }
    }

    /// Tracks subscription counts (per family, from the totals Redis reports) and counts down
    /// the (un)subscribe command at the head of the FIFO.
    fn confirmation(&mut self, kind: SubKind, subscribe: bool, count: Option<u64>) {
        let before = match kind {
            SubKind::Channel => self.rep.channels,
            SubKind::Pattern => self.rep.patterns,
            SubKind::Shard => self.rep.shards,
        };
        if let Some(count) = count {
            let total = self.rep.channels + self.rep.patterns;
            let family = match kind {
                SubKind::Channel => &mut self.rep.channels,
                SubKind::Pattern => &mut self.rep.patterns,
                SubKind::Shard => &mut self.rep.shards,
            };
            if kind == SubKind::Shard {
                *family = count;
            } else if subscribe && count > total {
                *family += 1;
            } else if !subscribe && count < total {
                *family = family.saturating_sub(1);
            }
        }
        if let Some(Owner::Subscription {
            kind: k,
            subscribe: s,
            remaining,
        }) = self.pending.head_mut()
            && *k == kind
            && *s == subscribe
        {
            let left = remaining.get_or_insert(before.max(1));
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.pending.pop();
            }
        }
    }

    /// `PING` from a RESP2 subscriber, answered by a RESP3 upstream: `+PONG` or a bulk message
    /// becomes the `["pong", msg]` array RESP2 subscribed mode sends.
    fn subscribed_ping(&mut self, frame: &[u8]) {
        if is_error(frame) {
            self.to_client.extend_from_slice(frame);
            return;
        }
        self.to_client.extend_from_slice(b"*2\r\n$4\r\npong\r\n");
        if frame.first() == Some(&b'$') {
            self.to_client.extend_from_slice(frame);
        } else {
            self.to_client.extend_from_slice(b"$0\r\n\r\n");
        }
    }

    /// Forwards the delimited part of a large, incomplete client-owned reply (or push) as it
    /// arrives, so a 512 MB value never sits whole in the proxy.
    fn stream_reply(&mut self, uin: &mut BytesMut) -> Result<(), SessionEnd> {
        let scanned = self.replies.scanned();
        if scanned == 0 || (uin.len() < HIGH_WATER && !self.rep.streaming) {
            return Ok(());
        }
        if !self.rep.streaming {
            let push = self.replies.kind() == Some(b'>');
            // A large reply to a blocking command is its data, never a timeout: it is final.
            let client_owned = self.rep.monitor
                || matches!(
                    self.pending.head(),
                    None | Some(
                        Owner::Client
                            | Owner::ClientBlocking
                            | Owner::Subscription { .. }
                            | Owner::Blocking(_)
                    )
                );
            if !push && !client_owned {
                if uin.len() >= MAX_HELD_REPLY {
                    return Err(SessionEnd::UpstreamProtocol(
                        "proxy-owned reply too large".into(),
                    ));
                }
                return Ok(());
            }
            if !push
                && !self.rep.monitor
                && let Some(Owner::Blocking(_)) = self.pending.pop()
            {
                self.req.blocked = false;
            }
            self.rep.streaming = true;
            if push && self.rep.client_proto_is_2 {
                self.to_client.put_u8(b'*');
                self.to_client.extend_from_slice(&uin[1..scanned]);
                uin.advance(scanned);
                self.replies.consumed(scanned);
                return Ok(());
            }
        }
        self.to_client.extend_from_slice(&uin[..scanned]);
        uin.advance(scanned);
        self.replies.consumed(scanned);
        Ok(())
    }
}

/// Whether a command runs now, waits, or was answered by the proxy.
enum Gate {
    Proceed,
    Hold,
    Answered,
}

/// Writes some of `buf`, or, when it is empty, flushes what the writer holds (TLS records).
async fn write_or_flush<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<usize> {
    if buf.is_empty() {
        w.flush().await.map(|()| 0)
    } else {
        w.write(buf).await
    }
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

/// Free space of a read buffer, to tell afterwards whether a read filled it.
fn room(buf: &BytesMut) -> usize {
    buf.capacity() - buf.len()
}

/// Resolves once a newer credential is published, giving the watch back for the next wait;
/// `None` once the channel is closed (the process is stopping).
async fn next_credential(mut watch: CredentialWatch) -> Option<CredentialWatch> {
    watch.changed().await.ok().map(|()| watch)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Compares a client-given password with the listen password without an early exit.
fn same_secret(given: &[u8], expected: &Secret) -> bool {
    let expected = expected.expose().as_bytes();
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn parse_reply_mode(mode: &[u8]) -> Option<ReplyMode> {
    if mode.eq_ignore_ascii_case(b"ON") {
        Some(ReplyMode::On)
    } else if mode.eq_ignore_ascii_case(b"OFF") {
        Some(ReplyMode::Off)
    } else if mode.eq_ignore_ascii_case(b"SKIP") {
        Some(ReplyMode::SkipNext)
    } else {
        None
    }
}

fn parse_proto(v: &[u8]) -> Option<u8> {
    match v {
        b"2" => Some(2),
        b"3" => Some(3),
        _ => None,
    }
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-' | b'!'))
}

/// Redis's error for a command a RESP2 client may not run while subscribed.
fn subscribed_mode_error(name: &[u8]) -> Bytes {
    let name = String::from_utf8_lossy(name).to_lowercase();
    Bytes::from(format!(
        "-ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    ))
}

/// Rewrites a RESP3 push into the RESP2 array a subscriber expects: the `>` becomes `*`, and a
/// null element (the channel of an `unsubscribe` with nothing to leave) becomes a null bulk.
fn push_as_resp2(frame: &[u8], out: &mut BytesMut) {
    let has_null = reply_elements(frame).any(|(ty, _)| ty == b'_');
    if !has_null {
        out.put_u8(b'*');
        out.extend_from_slice(&frame[1..]);
        return;
    }
    let count = reply_elements(frame).count();
    out.extend_from_slice(format!("*{count}\r\n").as_bytes());
    for (ty, value) in reply_elements(frame) {
        match ty {
            b'_' => out.extend_from_slice(b"$-1\r\n"),
            b'$' => {
                out.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
            other => {
                out.put_u8(other);
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::CredentialState;
    use std::time::SystemTime;
    use tokio::io::{DuplexStream, duplex};
    use tokio::sync::watch;

    /// A session between a scripted application (`client`) and a scripted server (`server`).
    struct Harness {
        client: DuplexStream,
        server: DuplexStream,
        server_buf: BytesMut,
        credentials: watch::Sender<CredentialState>,
        task: tokio::task::JoinHandle<SessionEnd>,
    }

    const WAIT: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_millis(150);

    fn credential(generation: u64) -> Arc<AuthCredential> {
        Arc::new(AuthCredential::new(
            Some("oid".into()),
            Secret::new(format!("token-{generation}")),
            Some(SystemTime::now() + Duration::from_secs(3600)),
            generation,
        ))
    }

    fn start(listen_password: Option<&str>) -> Harness {
        start_with_pipes(listen_password, 1 << 16)
    }

    /// `pipe` bytes of buffering on each in-memory connection (large commands need room, as
    /// the scripted sides run one after the other).
    fn start_with_pipes(listen_password: Option<&str>, pipe: usize) -> Harness {
        let (client, proxy_client) = duplex(pipe);
        let (proxy_upstream, server) = duplex(pipe);
        let first = credential(1);
        let (credentials, watch) = watch::channel(CredentialState {
            current: Some(first.clone()),
            last_error: None,
        });
        let ctx = Arc::new(RelayContext {
            database: 0,
            listen_password: listen_password.map(Secret::new),
            authenticate: true,
            metrics: crate::metrics::Metrics::new(),
        });
        let session = Session::new(1, ctx, proxy_client, proxy_upstream, Some(first), watch);
        Harness {
            client,
            server,
            server_buf: BytesMut::new(),
            credentials,
            task: tokio::spawn(session.run(CancellationToken::new())),
        }
    }

    fn cmd(args: &[&str]) -> Bytes {
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        encode_command(&refs)
    }

    impl Harness {
        async fn client_sends(&mut self, commands: &[&[&str]]) {
            for c in commands {
                self.client.write_all(&cmd(c)).await.unwrap();
            }
        }

        /// The server receives exactly these commands next.
        async fn server_gets(&mut self, expected: &[&[&str]]) {
            for want in expected {
                let got = tokio::time::timeout(WAIT, self.next_server_command())
                    .await
                    .unwrap_or_else(|_| panic!("server waited for {want:?}"));
                assert_eq!(got, *want);
            }
        }

        async fn next_server_command(&mut self) -> Vec<String> {
            loop {
                let mut scanner = Scanner::new(Grammar::Request);
                if let Some(frame) = scanner.scan(&self.server_buf).unwrap() {
                    let frame = self.server_buf.split_to(frame.len);
                    return Args::new(&frame)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                }
                assert!(self.server.read_buf(&mut self.server_buf).await.unwrap() > 0);
            }
        }

        /// Nothing reaches the server (a close with nothing sent counts as quiet).
        async fn server_quiet(&mut self) {
            let read = tokio::time::timeout(QUIET, self.server.read_buf(&mut self.server_buf));
            let quiet = matches!(read.await, Err(_) | Ok(Ok(0)));
            assert!(quiet && self.server_buf.is_empty(), "{:?}", self.server_buf);
        }

        async fn server_replies(&mut self, raw: &[u8]) {
            self.server.write_all(raw).await.unwrap();
        }

        /// The client receives exactly these bytes next.
        async fn client_gets(&mut self, raw: &[u8]) {
            let mut got = vec![0; raw.len()];
            tokio::time::timeout(WAIT, self.client.read_exact(&mut got))
                .await
                .expect("client waited")
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(raw));
        }

        async fn client_quiet(&mut self) {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(QUIET, self.client.read(&mut byte));
            assert!(
                read.await.is_err(),
                "unexpected byte {byte:?} for the client"
            );
        }

        fn rotate(&self, generation: u64) {
            self.credentials.send_replace(CredentialState {
                current: Some(credential(generation)),
                last_error: None,
            });
        }
    }

    #[tokio::test]
    async fn injected_auth_waits_for_exec_and_its_reply_is_consumed() {
        let mut h = start(None);
        h.client_sends(&[&["MULTI"], &["SET", "k", "v"]]).await;
        h.server_gets(&[&["MULTI"], &["SET", "k", "v"]]).await;
        h.server_replies(b"+OK\r\n+QUEUED\r\n").await;
        h.client_gets(b"+OK\r\n+QUEUED\r\n").await;
        h.rotate(2);
        h.server_quiet().await; // no AUTH inside the transaction
        h.client_sends(&[&["EXEC"]]).await;
        h.server_gets(&[&["EXEC"], &["AUTH", "oid", "token-2"]])
            .await;
        h.server_replies(b"*1\r\n+OK\r\n+OK\r\n").await;
        h.client_gets(b"*1\r\n+OK\r\n").await;
        h.client_quiet().await;
    }

    #[tokio::test]
    async fn auth_reply_is_taken_out_of_a_pipeline_in_order() {
        let mut h = start(None);
        h.client_sends(&[&["GET", "a"]]).await;
        h.server_gets(&[&["GET", "a"]]).await;
        h.rotate(2);
        h.server_gets(&[&["AUTH", "oid", "token-2"]]).await;
        h.client_sends(&[&["GET", "b"]]).await;
        h.server_gets(&[&["GET", "b"]]).await;
        h.server_replies(b"$1\r\n1\r\n+OK\r\n$1\r\n2\r\n").await;
        h.client_gets(b"$1\r\n1\r\n$1\r\n2\r\n").await;
        h.client_quiet().await;
    }

    #[tokio::test]
    async fn replies_off_wraps_auth_in_reply_on_and_off() {
        let mut h = start(None);
        h.client_sends(&[&["CLIENT", "REPLY", "OFF"]]).await;
        h.server_gets(&[&["CLIENT", "REPLY", "OFF"]]).await;
        h.rotate(2);
        h.server_gets(&[
            &["CLIENT", "REPLY", "ON"],
            &["AUTH", "oid", "token-2"],
            &["CLIENT", "REPLY", "OFF"],
        ])
        .await;
        h.server_replies(b"+OK\r\n+OK\r\n").await;
        h.client_quiet().await;
        h.client_sends(&[&["CLIENT", "REPLY", "ON"]]).await;
        h.server_gets(&[&["CLIENT", "REPLY", "ON"]]).await;
        h.server_replies(b"+OK\r\n").await;
        h.client_gets(b"+OK\r\n").await;
    }

    #[tokio::test]
    async fn skip_defers_auth_until_the_skipped_command_is_sent() {
        let mut h = start(None);
        h.client_sends(&[&["CLIENT", "REPLY", "SKIP"]]).await;
        h.server_gets(&[&["CLIENT", "REPLY", "SKIP"]]).await;
        h.rotate(2);
        h.server_quiet().await; // an AUTH now would have its reply skipped instead
        h.client_sends(&[&["SET", "k", "v"]]).await;
        h.server_gets(&[&["SET", "k", "v"], &["AUTH", "oid", "token-2"]])
            .await;
        h.server_replies(b"+OK\r\n").await; // the SET's reply is skipped by the server
        h.client_sends(&[&["PING"]]).await;
        h.server_gets(&[&["PING"]]).await;
        h.server_replies(b"+PONG\r\n").await;
        h.client_gets(b"+PONG\r\n").await;
    }

    #[tokio::test]
    async fn a_failed_reauth_is_invisible_and_retried() {
        let mut h = start(None);
        h.rotate(2);
        h.server_gets(&[&["AUTH", "oid", "token-2"]]).await;
        h.server_replies(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
            .await;
        h.server_gets(&[&["AUTH", "oid", "token-2"]]).await; // after a short backoff
        h.server_replies(b"+OK\r\n").await;
        h.client_quiet().await;
        h.rotate(3);
        h.server_gets(&[&["AUTH", "oid", "token-3"]]).await;
    }

    #[tokio::test]
    async fn client_auth_is_answered_locally_in_order() {
        let mut h = start(None);
        h.client_sends(&[&["GET", "a"], &["AUTH", "old-key"], &["GET", "b"]])
            .await;
        h.server_gets(&[&["GET", "a"], &["GET", "b"]]).await;
        h.server_quiet().await;
        h.server_replies(b"$1\r\n1\r\n$1\r\n2\r\n").await;
        h.client_gets(b"$1\r\n1\r\n+OK\r\n$1\r\n2\r\n").await;
    }

    #[tokio::test]
    async fn listen_password_gates_every_command() {
        let mut h = start(Some("pw"));
        h.client_sends(&[
            &["GET", "a"],
            &["AUTH", "wrong"],
            &["AUTH", "default", "pw"],
            &["GET", "a"],
        ])
        .await;
        h.server_gets(&[&["GET", "a"]]).await;
        h.server_replies(b"$-1\r\n").await;
        h.client_gets(NOAUTH).await;
        h.client_gets(WRONGPASS).await;
        h.client_gets(b"+OK\r\n$-1\r\n").await;
    }

    #[tokio::test]
    async fn malformed_input_is_answered_after_earlier_replies_then_closed() {
        let mut h = start(None);
        h.client_sends(&[&["GET", "a"]]).await;
        h.client.write_all(b"*1\r\n$x\r\n").await.unwrap();
        h.server_gets(&[&["GET", "a"]]).await;
        h.server_replies(b"$1\r\n1\r\n").await;
        h.client_gets(b"$1\r\n1\r\n-ERR Protocol error: invalid bulk length\r\n")
            .await;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, h.client.read_to_end(&mut rest)).await;
        assert!(closed.is_ok() && rest.is_empty(), "closed after the error");
    }

    #[test]
    fn null_channel_becomes_null_bulk_for_resp2() {
        let mut out = BytesMut::new();
        push_as_resp2(b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n", &mut out);
        assert_eq!(&out[..], b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");
        out.clear();
        push_as_resp2(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n", &mut out);
        assert_eq!(&out[..], b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n");
    }

    #[test]
    fn listen_password_comparison() {
        let s = Secret::new("pw");
        assert!(same_secret(b"pw", &s));
        assert!(!same_secret(b"pX", &s));
        assert!(!same_secret(b"pw2", &s));
    }

    #[tokio::test]
    async fn quit_delivers_the_servers_ok_then_closes() {
        let mut h = start(None);
        h.client_sends(&[&["QUIT"]]).await;
        h.server_gets(&[&["QUIT"]]).await;
        h.server_replies(b"+OK\r\n").await;
        h.server.shutdown().await.unwrap();
        drop(h.server);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, h.client.read_to_end(&mut rest)).await;
        assert!(closed.is_ok());
        assert_eq!(rest, b"+OK\r\n");
        assert!(matches!(h.task.await, Ok(SessionEnd::ClientClosed)));
    }

    #[tokio::test]
    async fn large_commands_stream_when_only_their_name_matters() {
        let mut h = start_with_pipes(None, 8 << 20);
        let big = "x".repeat(2 * 1024 * 1024);
        h.client_sends(&[&["PING", &big]]).await;
        h.server_gets(&[&["PING", &big]]).await;
        h.client_sends(&[&["SUBSCRIBE", "a", &big]]).await;
        h.server_gets(&[&["HELLO", "3"], &["SUBSCRIBE", "a", &big]])
            .await;
    }

    #[tokio::test]
    async fn a_command_too_large_to_inspect_is_refused_not_hung() {
        let mut h = start_with_pipes(None, 8 << 20);
        let big = "x".repeat(2 * 1024 * 1024);
        // The proxy may close while the rest is still being written: that is the point.
        let _ = h
            .client
            .write_all(&cmd(&["HELLO", "3", "SETNAME", &big]))
            .await;
        h.client_gets(
            b"-ERR Protocol error: command too large for redis-entra-proxy to inspect\r\n",
        )
        .await;
        h.server_quiet().await;
    }

    #[tokio::test]
    async fn a_blocked_client_that_leaves_is_not_kept_blocked() {
        let mut h = start(None);
        h.client_sends(&[&["BLPOP", "k", "0"]]).await;
        let sent = h.next_server_command().await;
        assert_eq!(&sent[..2], ["BLPOP", "k"]);
        assert_ne!(sent[2], "0", "sliced");
        h.client.shutdown().await.unwrap(); // the application goes away
        // Each slice times out; the one after the proxy saw the close is not re-issued.
        let mut end = None;
        for _ in 0..3 {
            h.server_replies(b"*-1\r\n").await;
            if let Ok(e) = tokio::time::timeout(QUIET, &mut h.task).await {
                end = Some(e);
                break;
            }
            assert_eq!(h.next_server_command().await[0], "BLPOP");
        }
        let end = end.expect("the session ended");
        assert!(matches!(end, Ok(SessionEnd::ClientClosed)));
    }
}
