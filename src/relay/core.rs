//! The sans-IO core of one relayed connection: bytes in, bytes out, no sockets.
//!
//! [`Core`] owns the four buffers of a connection (client input, upstream input, and what is
//! to be written to each side) and every decision about them. The I/O loop
//! ([`super::session`]) reads sockets into [`Core::client_input`] / [`Core::upstream_input`],
//! calls [`Core::process`], and writes out [`Core::to_client`] / [`Core::to_upstream`]; it
//! also tells the core about events it can't see (a new credential, end of input, the upstream
//! opened). Because nothing here touches a socket or a clock of its own, the whole relay can be
//! driven byte by byte from tests and fuzzers.
//!
//! Requests flow through [`Core::process_requests`]: each client command is delimited by the
//! request [`Scanner`], classified ([`Command`]), and forwarded (with the owner of its reply
//! pushed onto the [`Pending`] FIFO), answered locally in order, rewritten (`HELLO`'s `AUTH`
//! pair, a blocking command's timeout), or held until a reply it depends on has arrived.
//! Replies flow through [`Core::process_replies`]: each reply is matched to the FIFO's head,
//! forwarded, consumed (the proxy's own) or rewritten (RESP3 → RESP2, see
//! [`super::translate`]), and the replies that confirm a state change update [`ConnState`].
//! Re-authentication is injected by [`Core::maybe_reauth`], only where
//! [`ConnState::safe_point`] says so.

use super::blocking::{BUSY_RETRY, BlockingCall, slice_for};
use super::command::{ClientSub, Command, full_name, parse_confirmation};
use super::pending::{Owner, Pending, ProxyCommand, SubKind};
use super::state::{ConnState, Framing, Injection, Mode, Progress, Queued, Replies, Transaction};
use super::translate::{self, PushFate};
use super::{RelayContext, SessionEnd};
use crate::cluster::ClusterView;
use crate::cluster::rewrite::Topology;
use crate::credential::AuthCredential;
use crate::resp::{Args, Frame, Grammar, ProtocolError, Scanner, encode_command, split_inline};
use crate::upstream::{error_text, select_command};
use bytes::{Buf, Bytes, BytesMut};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A buffer towards one side stops accepting more once it holds this much.
pub const HIGH_WATER: usize = 64 * 1024;
/// A command the proxy must see whole (`HELLO`, `AUTH`, …) may not be larger than this.
const MAX_HELD_COMMAND: usize = 1024 * 1024;
/// Redis's default `proto-max-bulk-len`: a command the proxy must hold whole can't have a
/// larger argument (a streamed one is judged by the server itself).
const REDIS_MAX_BULK: u64 = 512 * 1024 * 1024 + 2;
/// A reply the proxy must see whole (its own `AUTH` reply, a push it rewrites) may not be
/// larger than this.
const MAX_HELD_REPLY: usize = 1024 * 1024;
/// Client input buffered beyond this is not read until some is handled: room for Redis's 64 KiB
/// inline and header lines, plus a read.
const CLIENT_BUFFER: usize = crate::resp::MAX_LINE + 16 * 1024;
/// Distinct FIFO entries before the client is no longer read (runs of commands share one).
const MAX_PENDING_ENTRIES: usize = 16 * 1024;
/// First delay before retrying a failed re-`AUTH`.
const REAUTH_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between re-`AUTH` retries.
const REAUTH_RETRY_MAX: Duration = Duration::from_secs(10);
/// Delay after the first failed `--listen-password` attempt of a connection; it doubles with
/// each further failure, up to [`AUTH_FAILURE_DELAY_MAX`].
const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two password attempts on one connection.
const AUTH_FAILURE_DELAY_MAX: Duration = Duration::from_secs(5);

const HELLO_2: &[u8] = b"*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n";
const HELLO_3: &[u8] = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n";
const REPLY_ON: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n";
const REPLY_OFF: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n";
const REPLY_SKIP: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n";
const ASKING: &[u8] = b"*1\r\n$6\r\nASKING\r\n";
const OK: &[u8] = b"+OK\r\n";
const RESET_REPLY: &[u8] = b"+RESET\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
const AUTH_ARITY: &[u8] = b"-ERR wrong number of arguments for 'auth' command\r\n";
const SYNTAX_ERROR: &[u8] = b"-ERR syntax error\r\n";
/// Sent inside a transaction in place of a client `AUTH` with a wrong `--listen-password`:
/// Redis answers it, at `EXEC`, with the `WRONGPASS` the client would have got.
const FAILING_AUTH: &[u8] =
    b"*3\r\n$4\r\nAUTH\r\n$33\r\nredis-entra-proxy-invalid-password\r\n$1\r\nx\r\n";

/// Where the session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `--listen-password` is set and the client has not given it: no upstream yet, so a
    /// stranger can't use up the cache's connections.
    Authenticating,
    /// The client authenticated; the upstream connection is being opened.
    Connecting,
    /// Relaying.
    Relaying,
}

/// What became of one complete client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// Forwarded or answered: its bytes are consumed.
    Done,
    /// Not yet: it stays in the buffer and is looked at again once a reply has arrived.
    Hold,
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

/// How the rest of a reply frame that is being streamed goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streaming {
    /// Copied to the client.
    Forward,
    /// Dropped (a reply the client must not see).
    Discard,
}

/// One relayed connection's state and buffers. See the module documentation.
pub struct Core {
    id: u64,
    ctx: Arc<RelayContext>,
    cin: BytesMut,
    uin: BytesMut,
    to_client: BytesMut,
    to_upstream: BytesMut,
    requests: Scanner,
    replies: Scanner,
    pending: Pending,
    state: ConnState,
    phase: Phase,
    auth: AuthState,
    /// The newest credential the manager published (`None` with `--auth none`).
    newest: Option<Arc<AuthCredential>>,
    /// The client gave `--listen-password` (always true when none is set).
    client_authed: bool,
    /// Failed `--listen-password` attempts on this connection, and until when the next
    /// command waits.
    auth_failures: u32,
    throttled_until: Option<Instant>,
    /// Restoring commands ([`Owner::Restore`]) that a busy server refused: sent again ahead of
    /// the client's next command until one of each runs.
    unrestored: Vec<Bytes>,
    /// Client commands handled so far, and the count at which [`Core::restore_before`] last
    /// sent anything: a command held and looked at again is not preceded twice.
    commands_done: u64,
    restored_at: u64,
    /// A sliced blocking command whose re-issued slice the server refused with `-BUSY`, and
    /// when to send it again ([`BlockingCall::refused_busy`]). Only in [`Mode::Blocked`], with
    /// nothing of the call's pending.
    blocked_retry: Option<(Box<BlockingCall>, Instant)>,
    /// Part of a client command is forwarded; the rest streams through as it arrives.
    request_streaming: bool,
    /// Part of a reply frame is handled; the rest goes the same way.
    reply_streaming: Option<Streaming>,
    /// The reply side relays bytes as they are (see [`Mode::Opaque`]).
    reply_raw: bool,
    /// Feed lines of the proxy's own `AUTH`s still to be taken out of a `MONITOR` feed.
    own_feed_lines: u32,
    /// No command left state on the upstream connection (see [`Command::leaves_state`]): once
    /// the client has gone, the connection may serve another client.
    pristine: bool,
    /// The client's input ended.
    client_eof: bool,
    /// The client's `QUIT` was sent: the server closing the connection is the expected end.
    quit: bool,
    /// The client sent malformed input; the session ends once earlier replies are delivered.
    protocol_error: Option<ProtocolError>,
    /// On an opaque connection, a `RESET` was forwarded: the nonce of the command sent after
    /// it, whose error marks where replies are followed again.
    resync: Option<Vec<u8>>,
    /// The session must end now (after delivering what `to_client` holds).
    end: Option<SessionEnd>,
    /// Cluster mode: node addresses in `MOVED`/`ASK` and topology replies are rewritten.
    cluster: Option<ClusterView>,
}

impl Core {
    /// A core for a new client. Without `--listen-password` the caller opens the upstream
    /// first and reports it with [`Core::upstream_opened`]; with one, the core asks for it
    /// ([`Core::wants_upstream`]) once the client has authenticated, so that a stranger can't
    /// use up the cache's connections.
    pub fn new(id: u64, ctx: Arc<RelayContext>, newest: Option<Arc<AuthCredential>>) -> Core {
        let client_authed = ctx.listen_password.is_none();
        let mut requests = Scanner::new(Grammar::Request);
        requests.set_unauthenticated(!client_authed);
        let phase = if client_authed {
            Phase::Connecting
        } else {
            Phase::Authenticating
        };
        Core {
            id,
            ctx,
            cin: BytesMut::new(),
            uin: BytesMut::new(),
            to_client: BytesMut::new(),
            to_upstream: BytesMut::new(),
            requests,
            replies: Scanner::new(Grammar::Reply),
            pending: Pending::default(),
            state: ConnState::default(),
            phase,
            auth: AuthState {
                current: None,
                in_flight: false,
                retry_at: None,
                backoff: REAUTH_RETRY_MIN,
            },
            newest,
            client_authed,
            auth_failures: 0,
            throttled_until: None,
            unrestored: Vec::new(),
            commands_done: 0,
            restored_at: u64::MAX,
            blocked_retry: None,
            request_streaming: false,
            reply_streaming: None,
            reply_raw: false,
            own_feed_lines: 0,
            pristine: true,
            client_eof: false,
            quit: false,
            protocol_error: None,
            resync: None,
            end: None,
            cluster: None,
        }
    }

    /// Cluster mode: this session's replies name nodes by their local listeners.
    pub(crate) fn set_cluster(&mut self, view: ClusterView) {
        self.cluster = Some(view);
    }

    // ----- what the I/O loop reads and writes -------------------------------------------

    /// Multiplexing: the client was shared until now (see `crate::mux`). `input` is what it
    /// sent that was not handled yet; `setup` runs first (its replies are the proxy's),
    /// `authenticated` says it has already given `--listen-password`, and `resp3` that it
    /// speaks RESP3.
    pub(crate) fn take_over(
        &mut self,
        input: &[u8],
        setup: &[Bytes],
        authenticated: bool,
        resp3: bool,
    ) {
        if resp3 {
            // The client said `HELLO 3` while shared: its own connection speaks RESP3 before
            // anything else runs on it (Redis 6+ can't refuse `HELLO 3`).
            self.restore(Bytes::from_static(HELLO_3));
            self.state.framing = Framing::Resp3;
            self.pristine = false;
        }
        for command in setup {
            self.restore(command.clone());
            self.pristine = false;
        }
        if authenticated && !self.client_authed {
            self.client_passed();
        }
        self.cin.extend_from_slice(input);
    }

    /// The connection's number (in logs and in the re-auth deadline metric).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where client bytes are read into.
    pub fn client_input(&mut self) -> &mut BytesMut {
        &mut self.cin
    }

    /// Where upstream bytes are read into.
    pub fn upstream_input(&mut self) -> &mut BytesMut {
        &mut self.uin
    }

    /// Bytes to write to the client (advance it by what was written).
    pub fn to_client(&mut self) -> &mut BytesMut {
        &mut self.to_client
    }

    /// Bytes to write to the upstream (advance it by what was written).
    pub fn to_upstream(&mut self) -> &mut BytesMut {
        &mut self.to_upstream
    }

    /// Whether the client should be read now (back-pressure: not while the proxy has enough
    /// of its input, or output for it, waiting).
    pub fn wants_client_input(&self) -> bool {
        self.end.is_none()
            && !self.client_eof
            && self.protocol_error.is_none()
            && !self.quit
            && self.to_upstream.len() < HIGH_WATER
            && self.to_client.len() < HIGH_WATER
            && self.cin.len() < self.client_buffer_limit()
    }

    /// Whether the upstream should be read now.
    pub fn wants_upstream_input(&self) -> bool {
        self.end.is_none()
            && self.phase == Phase::Relaying
            && self.to_client.len() < HIGH_WATER
            && self.uin.len() < MAX_HELD_REPLY + HIGH_WATER
    }

    /// The client authenticated and no upstream is open: the I/O loop must open one and call
    /// [`Core::upstream_opened`] or [`Core::upstream_failed`].
    pub fn wants_upstream(&self) -> bool {
        self.phase == Phase::Connecting && self.end.is_none()
    }

    /// The next instant at which [`Core::process`] has something to do without any I/O.
    pub fn next_wakeup(&self) -> Option<Instant> {
        [
            self.auth.retry_at,
            self.throttled_until,
            self.blocked_retry.as_ref().map(|(_, at)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The session is over: `Ok` for an ordinary end, or why it ended. What `to_client` still
    /// holds should be delivered before the client connection is closed.
    pub fn finished(&mut self) -> Option<Result<(), SessionEnd>> {
        if let Some(end) = self.end.take() {
            return Some(Err(end));
        }
        let drained = self.pending.is_empty() && self.reply_streaming.is_none();
        if let Some(e) = &self.protocol_error
            && drained
        {
            return Some(Err(SessionEnd::ClientProtocol(e.clone())));
        }
        if self.quit && self.phase != Phase::Relaying && self.pending.is_empty() {
            return Some(Ok(())); // QUIT before an upstream was needed
        }
        if self.client_eof {
            let opaque = matches!(self.state.mode, Mode::Opaque);
            let abandoned = self.pending.holds_blocking()
                || self.blocked_retry.is_some()
                || self.request_streaming;
            if abandoned
                || self.phase != Phase::Relaying
                || (opaque && self.to_upstream.is_empty())
                || (drained && self.to_upstream.is_empty())
            {
                return Some(Ok(()));
            }
        }
        None
    }

    /// The upstream connection is as a new one would be: the client left between commands,
    /// every reply was delivered, and no command left state upstream.
    pub fn recyclable(&self) -> bool {
        self.pristine
            && self.phase == Phase::Relaying
            && matches!(self.state.mode, Mode::Normal)
            && self.state.replies == Replies::On
            && self.state.framing == Framing::Resp2
            && !self.state.asking
            && !self.state.subs.any()
            && self.pending.is_empty()
            && self.unrestored.is_empty()
            && !self.request_streaming
            && self.reply_streaming.is_none()
            && !self.auth.in_flight
            && self.uin.is_empty()
            && self.to_upstream.is_empty()
            && self.protocol_error.is_none()
    }

    /// The credential of the connection's last successful `AUTH`.
    pub fn credential(&self) -> Option<Arc<AuthCredential>> {
        self.auth.current.clone()
    }

    // ----- events -----------------------------------------------------------------------

    /// The credential manager published a credential (the newest one).
    pub fn credential_published(&mut self, newest: Option<Arc<AuthCredential>>) {
        self.newest = newest;
    }

    /// The client's input ended (it closed, or half-closed, its connection).
    pub fn client_closed(&mut self) {
        self.client_eof = true;
    }

    /// The upstream closed its connection; everything it sent before has been processed.
    pub fn upstream_closed(&mut self) -> Result<(), SessionEnd> {
        if self.quit {
            Ok(())
        } else {
            Err(SessionEnd::UpstreamClosed)
        }
    }

    /// The upstream connection asked for by [`Core::wants_upstream`] is open and authenticated
    /// with `credential`.
    pub fn upstream_opened(&mut self, credential: Option<Arc<AuthCredential>>) {
        self.ctx
            .metrics
            .set_auth_expiry(self.id, credential.as_ref().and_then(|c| c.expires_at));
        self.auth.current = credential;
        self.phase = Phase::Relaying;
    }

    /// The upstream connection could not be opened: the client is told why, then closed.
    pub fn upstream_failed(&mut self, reason: &str) {
        self.to_client
            .extend_from_slice(&super::proxy_error(reason));
        self.end = Some(SessionEnd::UpstreamUnavailable(reason.to_string()));
    }

    /// Handles everything the buffers allow: replies, then requests (which replies may have
    /// released), then a re-authentication if this is a safe point. Idempotent; call it after
    /// every read, every event, and at [`Core::next_wakeup`].
    pub fn process(&mut self, now: Instant) {
        if self.throttled_until.is_some_and(|t| t <= now) {
            self.throttled_until = None;
        }
        if self.auth.retry_at.is_some_and(|t| t <= now) {
            self.auth.retry_at = None;
        }
        if self
            .blocked_retry
            .as_ref()
            .is_some_and(|(_, at)| *at <= now)
            && let Some((call, _)) = self.blocked_retry.take()
        {
            self.reissue_blocking(call, now);
        }
        loop {
            let before = (
                self.cin.len(),
                self.uin.len(),
                self.to_upstream.len(),
                self.to_client.len(),
                self.pending.replies(),
            );
            self.process_replies(now);
            if self.end.is_some() {
                return;
            }
            self.process_requests(now);
            self.maybe_reauth(now);
            self.emit_locals();
            let after = (
                self.cin.len(),
                self.uin.len(),
                self.to_upstream.len(),
                self.to_client.len(),
                self.pending.replies(),
            );
            if before == after || self.end.is_some() {
                return;
            }
        }
    }

    fn client_buffer_limit(&self) -> usize {
        if self.requests.kind().is_some() && !self.request_streaming {
            MAX_HELD_COMMAND + CLIENT_BUFFER
        } else {
            CLIENT_BUFFER
        }
    }

    // ----- requests: client → upstream ----------------------------------------------------

    fn process_requests(&mut self, now: Instant) {
        let mut cin = std::mem::take(&mut self.cin);
        self.process_requests_in(&mut cin, now);
        self.cin = cin;
    }

    /// Why no client command can be handled now, if any.
    fn requests_blocked(&self, now: Instant) -> bool {
        if self.end.is_some() || self.protocol_error.is_some() || self.quit {
            return true;
        }
        if self.to_upstream.len() >= HIGH_WATER
            || self.to_client.len() >= HIGH_WATER
            || self.pending.entries() >= MAX_PENDING_ENTRIES
        {
            return true;
        }
        if self.request_streaming {
            return false; // the rest of a command already under way
        }
        self.phase == Phase::Connecting
            || self.throttled_until.is_some_and(|t| t > now)
            || matches!(self.state.mode, Mode::Blocked | Mode::Closing)
            || self.pending.awaits_confirmation()
    }

    fn process_requests_in(&mut self, cin: &mut BytesMut, now: Instant) {
        loop {
            if matches!(self.state.mode, Mode::Opaque) && self.phase == Phase::Relaying {
                return self.opaque_requests(cin);
            }
            // Local answers go out at once when nothing is ahead of them, so that they count
            // against the client's high-water mark like relayed replies do.
            self.emit_locals();
            if cin.is_empty() || self.requests_blocked(now) {
                return;
            }
            match self.requests.scan(cin) {
                Ok(Some(frame)) => {
                    if self.request_frame(&cin[..frame.len], frame, now) == Disposition::Hold {
                        self.requests.reset();
                        return;
                    }
                    cin.advance(frame.len);
                }
                Ok(None) => {
                    self.stream_request(cin);
                    return;
                }
                Err(e) => {
                    self.client_protocol_error(e);
                    cin.clear();
                    return;
                }
            }
        }
    }

    /// Redis's protocol error, in order after the replies already due; then the connection
    /// closes (Redis closes it too). Like any reply, it is suppressed by `CLIENT REPLY OFF`.
    fn client_protocol_error(&mut self, e: ProtocolError) {
        tracing::debug!(conn = self.id, error = %e, "malformed client input");
        self.local(e.reply());
        self.protocol_error = Some(e);
        self.pristine = false;
    }

    /// One complete client frame.
    fn request_frame(&mut self, frame: &[u8], scanned: Frame, now: Instant) -> Disposition {
        if self.request_streaming {
            // The rest of a frame whose start is already forwarded.
            self.to_upstream.extend_from_slice(frame);
            self.request_streaming = false;
            return Disposition::Done;
        }
        if scanned.kind != b'i' {
            return self.command(frame, now);
        }
        match split_inline(frame) {
            None => {
                self.client_protocol_error(ProtocolError::UnbalancedQuotes);
                Disposition::Done
            }
            Some(args) if args.is_empty() => Disposition::Done, // an empty line: ignored
            Some(args) => {
                let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                let encoded = encode_command(&refs);
                self.command(&encoded, now)
            }
        }
    }

    /// One complete multibulk command.
    fn command(&mut self, frame: &[u8], now: Instant) -> Disposition {
        let mut args = Args::new(frame);
        let Some(name) = args.next() else {
            return Disposition::Done; // `*0`, `*-1`: Redis ignores them and sends nothing
        };
        let cmd = Command::classify(name);
        let rest = args.clone();
        if cmd == Command::Reset && self.phase == Phase::Relaying && !self.pending.is_empty() {
            // RESET logs the upstream out until the proxy's AUTH after it runs, and Redis closes
            // an unauthenticated connection that has much output waiting: so RESET goes only
            // once every earlier reply has been read.
            return Disposition::Hold;
        }
        let disposition = if !self.client_authed {
            self.unauthenticated_command(cmd, frame, rest, now)
        } else if let Some(held) = self.subscribed_gate(cmd, frame) {
            held
        } else if let Mode::Transaction(_) = self.state.mode {
            self.queued_command(cmd, frame, rest)
        } else {
            if cmd != Command::Reset {
                self.restore_before(); // (RESET drops what was to be restored)
            }
            self.immediate_command(cmd, frame, rest, now)
        };
        if disposition == Disposition::Done {
            self.commands_done += 1;
            self.ctx.metrics.commands.inc();
            self.pristine &= match cmd {
                Command::Client => args
                    .clone()
                    .next()
                    .is_some_and(super::command::client_subcommand_keeps_no_state),
                _ => !cmd.leaves_state(),
            };
        }
        disposition
    }

    /// Before `--listen-password` is given: Redis's rules for an unauthenticated connection
    /// (`AUTH`, `HELLO … AUTH`, `QUIT`, `RESET` only), answered without any upstream.
    fn unauthenticated_command(
        &mut self,
        cmd: Command,
        frame: &[u8],
        args: Args<'_>,
        now: Instant,
    ) -> Disposition {
        match cmd {
            Command::Auth => {
                self.client_auth(args, now);
                Disposition::Done
            }
            Command::Hello => match hello_password(frame) {
                None => {
                    self.local_static(NOAUTH_HELLO);
                    Disposition::Done
                }
                Some(p) if !self.listen_password_matches(p) => {
                    self.auth_failed(now);
                    Disposition::Done
                }
                Some(_) => {
                    self.client_passed();
                    if self.phase == Phase::Relaying {
                        self.client_hello(frame)
                    } else {
                        Disposition::Hold // forwarded once the upstream is open
                    }
                }
            },
            Command::Quit if self.phase != Phase::Relaying => {
                self.local_static(OK);
                self.quit = true;
                Disposition::Done
            }
            Command::Reset if self.phase != Phase::Relaying => {
                self.local_static(RESET_REPLY);
                Disposition::Done
            }
            Command::Quit | Command::Reset => self.immediate_command(cmd, frame, args, now),
            _ => {
                self.local_static(NOAUTH);
                Disposition::Done
            }
        }
    }

    /// A RESP2 client whose upstream speaks RESP3 (it subscribed): Redis's subscribed-mode
    /// rules are the proxy's to enforce. `None`: the command goes on as usual.
    fn subscribed_gate(&mut self, cmd: Command, frame: &[u8]) -> Option<Disposition> {
        if self.state.framing != Framing::Resp2OverResp3 {
            return None;
        }
        if cmd.allowed_when_subscribed() && cmd != Command::Ping {
            return None; // (un)subscribe, QUIT and RESET run whatever the state
        }
        // PING's reply and whether anything else may run depend on whether the client is
        // still subscribed, which only the replies still outstanding tell.
        if !self.pending.is_empty() {
            return Some(Disposition::Hold);
        }
        if self.state.subs.any() {
            if cmd == Command::Ping {
                return None; // answered the subscribed way (see `immediate_command`)
            }
            self.local(subscribed_mode_error(&full_name(Args::new(frame))));
            return Some(Disposition::Done);
        }
        // The client has left subscribed mode: its upstream goes back to RESP2 first. Pushes
        // may still arrive until that switch is done (an invalidation, say), and must still be
        // translated, so the framing changes with the reply, and the command waits for it.
        self.inject(HELLO_2, Owner::Proxy(ProxyCommand::Hello(2)));
        Some(Disposition::Hold)
    }

    /// A command outside a transaction.
    fn immediate_command(
        &mut self,
        cmd: Command,
        frame: &[u8],
        args: Args<'_>,
        now: Instant,
    ) -> Disposition {
        let argc = args.argc();
        match cmd {
            Command::Other if self.cluster.is_some() => match cluster_topology(Args::new(frame)) {
                Some(which) => self.forward(frame, Owner::Topology(which)),
                None => self.forward(frame, Owner::Client),
            },
            Command::Other | Command::Stateful | Command::Exec | Command::Discard => {
                self.forward(frame, Owner::Client)
            }
            Command::Asking => {
                self.forward(frame, Owner::Client);
                self.state.asking = true;
            }
            Command::Auth => self.client_auth(args, now),
            Command::Hello => return self.client_hello(frame),
            Command::Reset => self.reset(frame),
            Command::Multi if argc == 1 && matches!(self.state.mode, Mode::Monitor) => {
                // A transaction on a MONITOR feed: more than the proxy follows.
                self.forward_uncertain(frame, Owner::Sync);
            }
            Command::Multi if argc == 1 => {
                self.forward(frame, Owner::Multi);
                self.state.mode = Mode::Transaction(Transaction::default());
            }
            Command::Multi => self.forward(frame, Owner::Client),
            Command::Client => self.client_command(frame, args),
            Command::Subscribe(kind) => self.subscription(frame, kind, true, argc - 1),
            Command::Unsubscribe(kind) => self.subscription(frame, kind, false, argc - 1),
            Command::Ping => {
                let subscribed = self.state.framing == Framing::Resp2OverResp3
                    && self.state.subs.any()
                    && argc <= 2;
                let owner = if subscribed {
                    Owner::SubscribedPing
                } else {
                    Owner::Client
                };
                self.forward(frame, owner);
            }
            Command::Quit => {
                self.forward(frame, Owner::Client);
                self.quit = true;
                self.state.mode = Mode::Closing;
            }
            Command::Monitor if matches!(self.state.mode, Mode::Monitor) => {
                self.to_upstream.extend_from_slice(frame); // Redis ignores it: no reply
            }
            Command::Monitor if argc == 1 => self.forward_uncertain(frame, Owner::Monitor),
            Command::Monitor => self.forward(frame, Owner::Client),
            Command::Blocking => self.blocking(frame, now),
            Command::Sync if sync_arity_ok(frame, argc) => self.sync(frame),
            Command::Sync => self.forward(frame, Owner::Client),
        }
        Disposition::Done
    }

    /// A command between `MULTI` and `EXEC`: queued by Redis (`+QUEUED`); the state changes
    /// it makes happen when `EXEC` runs it, so they are recorded until then.
    fn queued_command(&mut self, cmd: Command, frame: &[u8], args: Args<'_>) -> Disposition {
        let argc = args.argc();
        match cmd {
            Command::Exec if argc == 1 => {
                let txn = match std::mem::replace(&mut self.state.mode, Mode::Normal) {
                    Mode::Transaction(txn) => txn,
                    _ => Transaction::default(),
                };
                let opaque = txn.effects.iter().any(|e| matches!(e, Queued::Opaque))
                    && self.state.replies != Replies::On;
                if txn.effects.is_empty() {
                    self.forward(frame, Owner::Exec(txn));
                } else if opaque || self.state.replies != Replies::On {
                    // With replies off, EXEC's reply can't be made visible (a `CLIENT REPLY ON`
                    // sent now would be queued into the transaction), so nothing would confirm
                    // what it changed.
                    self.to_upstream.extend_from_slice(frame);
                    self.state.asking = false;
                    self.turn_opaque_in_order();
                } else {
                    self.forward_uncertain(frame, Owner::Exec(txn));
                }
            }
            Command::Discard if argc == 1 => {
                self.state.mode = Mode::Normal;
                self.forward(frame, Owner::Client);
            }
            Command::Quit => {
                self.forward(frame, Owner::Client);
                self.quit = true;
                self.state.mode = Mode::Closing;
            }
            Command::Reset => self.reset(frame),
            // Not queued: Redis runs (and refuses) them at once.
            Command::Multi | Command::Exec | Command::Discard => self.forward(frame, Owner::Client),
            Command::Stateful if is_watch(frame) => self.forward(frame, Owner::Client),
            _ => {
                let effect = match cmd {
                    Command::Auth => return self.queued_auth(frame, args),
                    Command::Hello => {
                        let (rewritten, proto, credential) = self.rewrite_hello(frame, None);
                        self.forward(&rewritten, Owner::Client);
                        self.count_queued(Some(Queued::Hello { proto, credential }));
                        return Disposition::Done;
                    }
                    Command::Client => match ClientSub::parse(args.clone()) {
                        ClientSub::Reply(mode) => Some(Queued::Replies {
                            at: self.queued_so_far(),
                            mode,
                        }),
                        ClientSub::Tracking { self_tracking } => {
                            Some(Queued::Tracking(self_tracking))
                        }
                        ClientSub::Other => None,
                    },
                    Command::Subscribe(_) | Command::Unsubscribe(_) => Some(Queued::Opaque),
                    _ => None,
                };
                self.forward(frame, Owner::Client);
                self.count_queued(effect);
            }
        }
        Disposition::Done
    }

    /// How many commands the open transaction has queued.
    fn queued_so_far(&self) -> u64 {
        match &self.state.mode {
            Mode::Transaction(txn) => txn.queued,
            _ => 0,
        }
    }

    /// One more command queued in the open transaction, with the state change it makes.
    fn count_queued(&mut self, effect: Option<Queued>) {
        if let Mode::Transaction(txn) = &mut self.state.mode {
            txn.queued += 1;
            txn.effects.extend(effect);
        }
    }

    /// The client's `AUTH` inside a transaction: Redis would queue it and answer it in the
    /// `EXEC` array, so the proxy sends its own `AUTH` in its place (or, for a wrong
    /// `--listen-password`, one that fails), and arity errors are Redis's own.
    fn queued_auth(&mut self, frame: &[u8], args: Args<'_>) -> Disposition {
        let argc = args.argc();
        let password = args.clone().last();
        let mut effect = None;
        if !(2..=3).contains(&argc) {
            self.forward(frame, Owner::Client);
        } else if !password.is_some_and(|p| self.listen_password_matches(p)) {
            self.forward(FAILING_AUTH, Owner::Client);
        } else if let Some(credential) = self.valid_newest() {
            let command = credential.auth_command().clone();
            self.forward(&command, Owner::Client);
            effect = Some(Queued::Auth(credential));
        } else {
            self.forward(frame, Owner::Client);
        }
        self.count_queued(effect);
        Disposition::Done
    }

    /// `SYNC`/`PSYNC`: unless refused, an RDB payload (not RESP) and then the replication
    /// stream follow, so the connection becomes opaque from that reply on.
    fn sync(&mut self, frame: &[u8]) {
        if self.state.replies == Replies::On {
            self.forward_uncertain(frame, Owner::Sync);
        } else {
            self.to_upstream.extend_from_slice(frame);
            self.state.asking = false;
            self.turn_opaque_in_order();
        }
    }

    /// Makes the connection opaque once every reply already expected has been delivered.
    fn turn_opaque_in_order(&mut self) {
        self.pending.push(Owner::TurnOpaque);
        self.emit_locals();
    }

    /// A command that may block. With a token that expires, it is sent with a bounded timeout
    /// (see `blocking`), and later commands wait for its final reply so that they still run
    /// after it. Not sliced when its reply could not be seen (`CLIENT REPLY OFF|SKIP`), after
    /// `ASKING` (a re-issue would lose it), on a `MONITOR` feed, or when the credential never
    /// expires (access key).
    fn blocking(&mut self, frame: &[u8], now: Instant) {
        let expiry = self.token_expiry();
        let sliceable = expiry.is_some()
            && matches!(self.state.mode, Mode::Normal)
            && self.state.replies == Replies::On
            && !self.state.asking;
        let call = sliceable
            .then(|| BlockingCall::parse(Args::new(frame), now))
            .flatten();
        match (call, expiry) {
            (Some(call), Some(expiry)) => {
                self.issue_blocking(Box::new(call), slice_for(expiry), now)
            }
            _ if matches!(self.state.mode, Mode::Monitor) => self.forward(frame, Owner::Client),
            _ => self.forward(frame, Owner::ClientBlocking),
        }
    }

    /// Sends one slice of a blocking command.
    fn issue_blocking(&mut self, mut call: Box<BlockingCall>, slice: Duration, now: Instant) {
        let command = call.encode(slice, now);
        self.to_upstream.extend_from_slice(&command);
        self.pending.push(Owner::Blocking(call));
        self.state.mode = Mode::Blocked;
    }

    /// When the token the connection is known to run on expires. An `AUTH` in flight may fail
    /// and leave the connection on this one, so a slice is always sized from it.
    fn token_expiry(&self) -> Option<SystemTime> {
        self.auth.current.as_ref().and_then(|c| c.expires_at)
    }

    /// Sends `frame` upstream and records who owns its reply.
    fn forward(&mut self, frame: &[u8], owner: Owner) {
        self.to_upstream.extend_from_slice(frame);
        self.state.asking = false; // ASKING binds to exactly one command
        self.expect_reply(owner);
    }

    /// Forwards a command whose reply decides the connection's state. If replies are off or
    /// skipped, the proxy turns them on around it to see that reply, and keeps it from the
    /// client (who would not have seen it).
    fn forward_uncertain(&mut self, frame: &[u8], owner: Owner) {
        match self.state.replies {
            Replies::On => self.forward(frame, owner),
            restore => {
                self.to_upstream.extend_from_slice(REPLY_ON);
                self.pending.push(Owner::Proxy(ProxyCommand::ReplyOn));
                self.to_upstream.extend_from_slice(frame);
                self.state.asking = false;
                self.pending.push(Owner::Hidden(Box::new(owner)));
                if restore == Replies::Off {
                    self.to_upstream.extend_from_slice(REPLY_OFF);
                } else {
                    self.state.replies = Replies::On; // the skip was this command's
                }
            }
        }
    }

    /// Records the reply a command will get, as `CLIENT REPLY OFF|SKIP` allow. Subscription
    /// confirmations are pushes, which Redis delivers whatever the reply mode.
    fn expect_reply(&mut self, owner: Owner) {
        let pushes = matches!(owner, Owner::Subscription { .. });
        match self.state.replies {
            Replies::On => self.pending.push(owner),
            Replies::Off if pushes => self.pending.push(owner),
            Replies::Off => {}
            Replies::Skip => {
                self.state.replies = Replies::On;
                if pushes {
                    self.pending.push(owner);
                }
            }
        }
    }

    /// A reply the proxy makes itself, delivered in order (and suppressed like a server reply
    /// by `CLIENT REPLY OFF|SKIP`).
    fn local(&mut self, reply: Bytes) {
        self.expect_reply(Owner::Local(reply));
    }

    fn local_static(&mut self, reply: &'static [u8]) {
        self.local(Bytes::from_static(reply));
    }

    /// Sends a proxy command, wrapped so that the client's reply mode and `ASKING` are as
    /// they were (see [`Injection`]).
    fn inject(&mut self, command: &[u8], owner: Owner) {
        let how = self.state.injection();
        self.inject_as(command, owner, how);
    }

    fn inject_as(&mut self, command: &[u8], owner: Owner, how: Injection) {
        if how.restore_replies.is_some() {
            self.to_upstream.extend_from_slice(REPLY_ON);
            self.pending.push(Owner::Proxy(ProxyCommand::ReplyOn));
        }
        self.to_upstream.extend_from_slice(command);
        self.pending.push(owner);
        match how.restore_replies {
            Some(Replies::Off) => self.to_upstream.extend_from_slice(REPLY_OFF),
            Some(Replies::Skip) => self.to_upstream.extend_from_slice(REPLY_SKIP),
            _ => {}
        }
        if how.restore_asking {
            self.to_upstream.extend_from_slice(ASKING);
            self.pending.push(Owner::Proxy(ProxyCommand::Asking));
        }
    }

    /// The newest credential if it is still valid (an expired one would only be refused).
    fn valid_newest(&self) -> Option<Arc<AuthCredential>> {
        if !self.ctx.authenticate {
            return None;
        }
        self.newest
            .clone()
            .filter(|c| c.is_valid_at(SystemTime::now()))
    }

    fn listen_password_matches(&self, given: &[u8]) -> bool {
        match &self.ctx.listen_password {
            None => true,
            Some(expected) => crate::secret::same_secret(given, expected),
        }
    }

    /// The client's `AUTH`: checked against `--listen-password`, never forwarded.
    fn client_auth(&mut self, args: Args<'_>, now: Instant) {
        let argc = args.argc();
        if argc < 2 {
            return self.local_static(AUTH_ARITY);
        }
        if argc > 3 {
            return self.local_static(SYNTAX_ERROR);
        }
        let password = args.clone().last().unwrap_or_default();
        if self.listen_password_matches(password) {
            self.client_passed();
            self.local_static(OK);
        } else {
            self.auth_failed(now);
        }
    }

    /// The client gave the listen password: Redis's unauthenticated limits end, and the
    /// upstream can be opened.
    fn client_passed(&mut self) {
        self.client_authed = true;
        self.requests.set_unauthenticated(false);
        if self.phase == Phase::Authenticating {
            self.phase = Phase::Connecting;
        }
    }

    /// A wrong listen password: `WRONGPASS`, counted, and the connection's next command waits
    /// a little longer each time (guessing is slow; other connections are not affected).
    fn auth_failed(&mut self, now: Instant) {
        self.ctx.metrics.client_auth_failures.inc();
        self.local_static(WRONGPASS);
        let delay = AUTH_FAILURE_DELAY
            .saturating_mul(1 << self.auth_failures.min(16))
            .min(AUTH_FAILURE_DELAY_MAX);
        self.auth_failures = self.auth_failures.saturating_add(1);
        self.throttled_until = Some(now + delay);
        tracing::debug!(
            conn = self.id,
            failures = self.auth_failures,
            "wrong listen password"
        );
    }

    /// The client's `HELLO`: its `AUTH` pair is replaced by the proxy's credential; the
    /// protocol switch and `SETNAME` reach the server. A RESP3 subscriber asking for RESP2 gets
    /// its upstream kept on RESP3 (`HELLO 3` is sent), so it can still be re-authenticated.
    fn client_hello(&mut self, frame: &[u8]) -> Disposition {
        let asks_resp2 = Args::new(frame).nth(1).is_some_and(|v| v == b"2");
        let mut as_resp2 = false;
        if self.state.framing == Framing::Resp3 && asks_resp2 {
            if !self.pending.is_empty() {
                return Disposition::Hold; // whether it is subscribed is still to be confirmed
            }
            as_resp2 = self.state.subs.any();
        }
        let (rewritten, proto, credential) =
            self.rewrite_hello(frame, as_resp2.then_some(&b"3"[..]));
        self.forward_uncertain(
            &rewritten,
            Owner::ClientHello {
                proto,
                credential,
                as_resp2,
            },
        );
        Disposition::Done
    }

    /// `HELLO` with the client's `AUTH user pass` replaced by the proxy's credential (dropped
    /// with `--auth none`), and optionally another protocol version.
    fn rewrite_hello(
        &self,
        frame: &[u8],
        version: Option<&[u8]>,
    ) -> (Bytes, Option<u8>, Option<Arc<AuthCredential>>) {
        let args: Vec<&[u8]> = Args::new(frame).collect();
        let mut kept: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
        kept.push(args[0]);
        let mut i = 1;
        if let Some(v) = args.get(1) {
            kept.push(version.unwrap_or(v));
            i = 2;
        }
        let mut had_auth = false;
        while i < args.len() {
            let option = args[i];
            if option.eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
                had_auth = true;
                i += 3;
            } else if option.eq_ignore_ascii_case(b"SETNAME") && i + 1 < args.len() {
                kept.extend_from_slice(&args[i..i + 2]);
                i += 2;
            } else {
                kept.push(option);
                i += 1;
            }
        }
        let credential = had_auth.then(|| self.valid_newest()).flatten();
        if let Some(c) = &credential {
            let user = c.username.as_deref().unwrap_or("default").as_bytes();
            let at = kept.len().min(2);
            kept.splice(at..at, [&b"AUTH"[..], user, c.password.expose().as_bytes()]);
        }
        let proto = args.get(1).and_then(|v| match *v {
            b"2" => Some(2),
            b"3" => Some(3),
            _ => None,
        });
        (encode_command(&kept), proto, credential)
    }

    /// The client's `RESET`: forwarded, then `AUTH` (and `SELECT`) before anything else, because
    /// `RESET` logs the connection out and returns it to database 0. `RESET` answers even with
    /// replies off (it turns them on first), but not when a `SKIP` is in force.
    fn reset(&mut self, frame: &[u8]) {
        if self.state.replies == Replies::Skip {
            // RESET clears OFF before it answers but not a SKIP already in force: its reply
            // is skipped. The proxy turns replies on to see it, and keeps it from the client.
            self.to_upstream.extend_from_slice(REPLY_ON);
            self.pending.push(Owner::Proxy(ProxyCommand::ReplyOn));
            self.to_upstream.extend_from_slice(frame);
            self.pending.push(Owner::Hidden(Box::new(Owner::Reset)));
        } else {
            self.to_upstream.extend_from_slice(frame);
            self.pending.push(Owner::Reset);
        }
        self.state.reset_requests();
        self.client_authed = self.ctx.listen_password.is_none();
        self.requests.set_unauthenticated(!self.client_authed);
        if let Some(credential) = self.valid_newest() {
            self.to_upstream
                .extend_from_slice(credential.auth_command());
            self.pending.push(Owner::Auth {
                credential,
                required: true,
                sent: Instant::now(),
            });
            self.auth.in_flight = true;
        }
        // RESET forgot whatever was still to be restored (a name, the database): only the
        // database is put back.
        self.unrestored.clear();
        if self.ctx.database != 0 {
            self.restore(select_command(self.ctx.database));
        }
    }

    /// `CLIENT …`: `REPLY` changes which later commands get a reply, `TRACKING` what a RESP2
    /// subscriber may be sent.
    fn client_command(&mut self, frame: &[u8], args: Args<'_>) {
        match ClientSub::parse(args.clone()) {
            ClientSub::Reply(Replies::On) => {
                // ON answers even right after SKIP: Redis clears the skip before replying.
                self.to_upstream.extend_from_slice(frame);
                self.state.asking = false;
                self.state.replies = Replies::On;
                self.pending.push(Owner::Client);
            }
            ClientSub::Reply(Replies::Off) => {
                self.to_upstream.extend_from_slice(frame);
                self.state.asking = false;
                self.state.replies = Replies::Off;
            }
            ClientSub::Reply(Replies::Skip) => {
                self.to_upstream.extend_from_slice(frame);
                self.state.asking = false;
                if self.state.replies != Replies::Off {
                    self.state.replies = Replies::Skip;
                }
            }
            ClientSub::Tracking { self_tracking } => {
                self.forward(frame, Owner::Tracking(self_tracking))
            }
            ClientSub::Other => self.forward(frame, Owner::Client),
        }
    }

    /// A (un)subscribe command. Its confirmations arrive as RESP3 pushes: a RESP2 client's
    /// upstream is switched to RESP3 first, so that `AUTH` stays possible while subscribed.
    fn subscription(&mut self, frame: &[u8], kind: SubKind, subscribe: bool, channels: usize) {
        if subscribe && channels == 0 {
            return self.forward(frame, Owner::Client); // an arity error
        }
        if self.state.needs_translation_to_subscribe() {
            self.inject(HELLO_3, Owner::Proxy(ProxyCommand::Hello(3)));
            self.state.framing = Framing::Resp2OverResp3;
        }
        let owner = Owner::Subscription {
            kind,
            subscribe,
            remaining: (channels > 0).then_some(channels as u64),
        };
        self.forward(frame, owner);
    }

    /// Forwards the already-delimited part of a large command as it arrives, when its handling
    /// needs only its name and argument count; anything else is held whole (up to 1 MiB).
    fn stream_request(&mut self, cin: &mut BytesMut) {
        let scanned = self.requests.scanned();
        // A bulk string declared larger than a buffer can't be waited for: stream it now (the
        // server then accepts or refuses its length itself).
        let huge = self.requests.bulk_pending() > HIGH_WATER as u64;
        if scanned == 0 || (cin.len() < HIGH_WATER && !huge && !self.request_streaming) {
            return;
        }
        if !self.request_streaming {
            let Some(owner) = self.streamable_owner(&cin[..scanned]) else {
                let declared = cin.len() as u64 + self.requests.bulk_pending();
                if self.requests.bulk_pending() > REDIS_MAX_BULK {
                    // What Redis answers with its default proto-max-bulk-len.
                    self.client_protocol_error(ProtocolError::InvalidBulkLength);
                    cin.clear();
                } else if declared >= MAX_HELD_COMMAND as u64 {
                    self.local_static(
                        b"-ERR Protocol error: command too large for redis-entra-proxy to inspect\r\n",
                    );
                    self.protocol_error = Some(ProtocolError::Reply(
                        "command too large for redis-entra-proxy to inspect",
                    ));
                    cin.clear();
                }
                return; // held until it is complete
            };
            self.state.asking = false;
            self.expect_reply(owner);
            self.ctx.metrics.commands.inc();
            self.request_streaming = true;
        }
        self.to_upstream.extend_from_slice(&cin[..scanned]);
        cin.advance(scanned);
        self.requests.consumed(scanned);
    }

    /// The reply owner of a command that may be forwarded before it has fully arrived.
    fn streamable_owner(&mut self, head: &[u8]) -> Option<Owner> {
        if !self.client_authed || self.phase != Phase::Relaying {
            return None;
        }
        let mut args = Args::new(head);
        let channels = args.argc().checked_sub(1)?;
        let cmd = Command::classify(args.next()?);
        let queued = matches!(self.state.mode, Mode::Transaction(_));
        let translating = self.state.framing == Framing::Resp2OverResp3;
        let owner = match cmd {
            Command::Other | Command::Stateful if !translating => Owner::Client,
            Command::Ping if !translating => Owner::Client,
            Command::Subscribe(kind) | Command::Unsubscribe(kind) if !queued && channels > 0 => {
                let subscribe = matches!(cmd, Command::Subscribe(_));
                if self.state.needs_translation_to_subscribe() {
                    self.inject(HELLO_3, Owner::Proxy(ProxyCommand::Hello(3)));
                    self.state.framing = Framing::Resp2OverResp3;
                }
                Owner::Subscription {
                    kind,
                    subscribe,
                    remaining: Some(channels as u64),
                }
            }
            _ => return None,
        };
        self.pristine &= !cmd.leaves_state();
        Some(owner)
    }

    // ----- re-authentication --------------------------------------------------------------

    /// Injects `AUTH` with the newest credential if this connection's is older and
    /// [`ConnState::safe_point`] allows it.
    fn maybe_reauth(&mut self, now: Instant) {
        if !self.ctx.authenticate || self.auth.in_flight || self.auth.retry_at.is_some() {
            return;
        }
        let Some(newest) = self.valid_newest() else {
            return;
        };
        if self
            .auth
            .current
            .as_ref()
            .is_some_and(|c| c.generation >= newest.generation)
        {
            return;
        }
        let progress = Progress {
            relaying: self.phase == Phase::Relaying,
            mid_command: self.request_streaming,
            only_plain_replies: self.pending.only_plain(),
        };
        let Some(how) = self.state.safe_point(progress) else {
            return;
        };
        self.inject_auth(newest, how, now);
    }

    /// Sends `AUTH` with `credential`, wrapped as `how` says. With the client's replies off
    /// (`CLIENT REPLY OFF`) Redis answers it with nothing, success or not, so it is sent as it
    /// is and not awaited. Wrapping it in `CLIENT REPLY ON` … `OFF` to see its reply is not
    /// safe: while another client's script or function runs past `busy-reply-threshold`, Redis
    /// refuses `CLIENT REPLY ON` with a `-BUSY` it does not send either (replies are off), runs
    /// the `AUTH` (one of the few commands it runs then), and the proxy would wait for two
    /// replies that never come and hand the client's later replies to them. Unseen, the `AUTH`
    /// is taken as accepted: it carries a credential just issued; if it was refused after all,
    /// the connection keeps its old token, and Azure closes it when that one expires, as after
    /// any re-authentication that failed until then.
    fn inject_auth(&mut self, credential: Arc<AuthCredential>, how: Injection, now: Instant) {
        let command = credential.auth_command().clone();
        if how.restore_replies == Some(Replies::Off) {
            self.to_upstream.extend_from_slice(&command);
            if how.restore_asking {
                self.to_upstream.extend_from_slice(ASKING); // unanswered too
            }
            tracing::debug!(
                conn = self.id,
                generation = credential.generation,
                "re-authenticated with the client's replies off (Redis sends no reply to it)"
            );
            self.ctx.metrics.reauth_unanswered.inc();
            self.adopt_credential(credential);
            return;
        }
        if matches!(self.state.mode, Mode::Monitor) && how.restore_replies.is_none() {
            self.own_feed_lines += 1;
        }
        self.inject_as(
            &command,
            Owner::Auth {
                credential,
                required: false,
                sent: now,
            },
            how,
        );
        self.auth.in_flight = true;
    }

    /// The reply to an injected `AUTH`. On failure the connection keeps its previous token and
    /// the `AUTH` is retried with backoff while that token lives.
    fn auth_reply(&mut self, frame: &[u8], credential: Arc<AuthCredential>, required: bool) {
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
            return;
        }
        let reason = error_text(frame);
        metrics.reauth_failure.inc();
        if required {
            let line = super::proxy_error(&format!("upstream authentication failed: {reason}"));
            self.to_client.extend_from_slice(&line);
            self.end = Some(SessionEnd::AuthFailed(reason));
            return;
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
    }

    /// The connection's credential changed through a reply the client sees (`HELLO … AUTH`,
    /// an `AUTH` run by `EXEC`).
    fn adopt_credential(&mut self, credential: Arc<AuthCredential>) {
        self.ctx
            .metrics
            .set_auth_expiry(self.id, credential.expires_at);
        self.auth.current = Some(credential);
    }

    // ----- replies: upstream → client -----------------------------------------------------

    fn process_replies(&mut self, now: Instant) {
        let mut uin = std::mem::take(&mut self.uin);
        self.process_replies_in(&mut uin, now);
        self.uin = uin;
    }

    fn process_replies_in(&mut self, uin: &mut BytesMut, now: Instant) {
        loop {
            self.emit_locals();
            if uin.is_empty() || self.to_client.len() >= HIGH_WATER || self.end.is_some() {
                return;
            }
            if self.reply_raw {
                if !self.opaque_replies(uin) {
                    return;
                }
                continue; // a RESET brought the connection back: its replies are followed again
            }
            if self.replies.at_boundary() && self.reply_streaming.is_none() {
                match self.opaque_decision(uin) {
                    Some(true) => continue, // now raw
                    Some(false) => return,  // the first line is still arriving
                    None => {}
                }
            }
            match self.replies.scan(uin) {
                Ok(Some(frame)) => {
                    self.reply_frame(&uin[..frame.len], frame.kind, now);
                    uin.advance(frame.len);
                }
                Ok(None) => {
                    self.stream_reply(uin);
                    return;
                }
                Err(e) => {
                    self.end = Some(SessionEnd::UpstreamProtocol(e.to_string()));
                    return;
                }
            }
        }
    }

    /// When the reply at the head may turn the connection opaque (`SYNC`'s, or an `EXEC` that
    /// runs what the proxy can't follow): `Some(true)` if it did, `Some(false)` if its first
    /// line is not in yet, `None` to scan it as usual.
    fn opaque_decision(&mut self, uin: &mut BytesMut) -> Option<bool> {
        let head = match self.pending.head() {
            Some(Owner::Hidden(inner)) => inner.as_ref(),
            Some(other) => other,
            None => return None,
        };
        let exec = match head {
            Owner::Sync => {
                if uin.first() == Some(&b'-') {
                    return None; // refused: an ordinary error reply
                }
                self.pending.pop();
                self.become_opaque();
                return Some(true);
            }
            Owner::Exec(txn) if !txn.effects.is_empty() => txn,
            _ => return None,
        };
        let opaque = exec.effects.iter().any(|e| matches!(e, Queued::Opaque));
        if !opaque && !exec.changes_replies() {
            return None;
        }
        let Some(nl) = uin.iter().position(|&b| b == b'\n') else {
            return Some(false);
        };
        let elements = (uin[0] == b'*')
            .then(|| crate::resp::string2ll(&uin[1..nl.saturating_sub(1)]))
            .flatten()
            .filter(|&n| n >= 0);
        let Some(n) = elements else {
            return None; // EXECABORT, or the null of a failed WATCH: nothing ran
        };
        let (txn, hidden) = match self.pending.pop() {
            Some(Owner::Exec(txn)) => (txn, false),
            Some(Owner::Hidden(inner)) => match *inner {
                Owner::Exec(txn) => (txn, true),
                _ => return None,
            },
            _ => return None,
        };
        if opaque {
            self.become_opaque();
            return Some(true);
        }
        // Redis announces `n` elements and writes fewer: the header goes to the client now,
        // and exactly the elements that come are the client's.
        let (written, then) = txn.exec_outcome(n as u64);
        if !hidden {
            self.to_client.extend_from_slice(&uin[..=nl]);
        }
        uin.advance(nl + 1);
        let rest = Owner::ExecElements {
            left: written,
            then,
            txn,
        };
        self.pending.push_front(if hidden {
            Owner::Hidden(Box::new(rest))
        } else {
            rest
        });
        self.finish_exec_elements();
        Some(true)
    }

    /// If the reply at the front is an element of a truncated `EXEC` array, counts it and says
    /// whether the client must not see it (`Some(true)`: the `EXEC` was sent hidden).
    fn exec_element(&mut self) -> Option<bool> {
        let (left, hidden) = match self.pending.head_mut() {
            Some(Owner::ExecElements { left, .. }) => (left, false),
            Some(Owner::Hidden(inner)) => match inner.as_mut() {
                Owner::ExecElements { left, .. } => (left, true),
                _ => return None,
            },
            _ => return None,
        };
        *left = left.saturating_sub(1);
        Some(hidden)
    }

    /// The elements of a truncated `EXEC` array are all in: its state changes take effect.
    fn finish_exec_elements(&mut self) {
        let done = match self.pending.head() {
            Some(Owner::ExecElements { left: 0, .. }) => true,
            Some(Owner::Hidden(inner)) => matches!(**inner, Owner::ExecElements { left: 0, .. }),
            _ => false,
        };
        if !done {
            return;
        }
        let elements = match self.pending.pop() {
            Some(Owner::Hidden(inner)) => *inner,
            Some(other) => other,
            None => return,
        };
        if let Owner::ExecElements { then, txn, .. } = elements {
            self.apply_queued(txn);
            self.state.replies = then;
        }
    }

    /// Client bytes on an opaque connection go as they are, but they are still delimited (a
    /// request is a request whatever state the server is in) so that a `RESET` can be seen:
    /// it brings the connection back to a known state. After it the proxy sends a command whose
    /// name is a random nonce: Redis refuses an unknown command before it looks at
    /// authentication (which `RESET` just dropped), and its error, which quotes the nonce,
    /// marks where `RESET`'s reply ends in the unparsed reply stream.
    fn opaque_requests(&mut self, cin: &mut BytesMut) {
        if self.resync.is_some() {
            return; // what follows the RESET waits until the proxy follows replies again
        }
        loop {
            match self.requests.scan(cin) {
                Ok(Some(frame)) => {
                    let reset = !self.request_streaming
                        && (frame.kind == b'*' && is_reset(&cin[..frame.len])
                            || frame.kind == b'i'
                                && split_inline(&cin[..frame.len]).is_some_and(|a| {
                                    a.len() == 1 && a[0].eq_ignore_ascii_case(b"RESET")
                                }));
                    self.to_upstream.extend_from_slice(&cin[..frame.len]);
                    cin.advance(frame.len);
                    self.request_streaming = false;
                    if reset {
                        let nonce = format!("redis-entra-proxy-resync-{:016x}", fastrand::u64(..));
                        self.to_upstream
                            .extend_from_slice(&encode_command(&[nonce.as_bytes()]));
                        self.resync = Some(nonce.into_bytes());
                        tracing::debug!(
                            conn = self.id,
                            "RESET on an opaque connection: resynchronising"
                        );
                        return;
                    }
                }
                Ok(None) => {
                    // A large command streams; a small one waits to be seen whole (it might be
                    // a RESET cut in two by the network).
                    if cin.len() < HIGH_WATER && !self.request_streaming {
                        return;
                    }
                    let n = self.requests.scanned();
                    self.to_upstream.extend_from_slice(&cin[..n]);
                    cin.advance(n);
                    self.requests.consumed(n);
                    self.request_streaming |= n > 0;
                    return;
                }
                Err(_) => {
                    // Not even delimitable: the server will say so; nothing is followed any more.
                    self.to_upstream.extend_from_slice(cin);
                    cin.clear();
                    return;
                }
            }
        }
    }

    /// Server bytes on an opaque connection go to the client as they are, until the error
    /// line that quotes the resync nonce sent after a client's `RESET`: that line is taken out,
    /// and from there on replies are followed again (true once that happened).
    fn opaque_replies(&mut self, uin: &mut BytesMut) -> bool {
        let Some(nonce) = &self.resync else {
            self.to_client.extend_from_slice(uin);
            uin.clear();
            return false;
        };
        if let Some(at) = uin.windows(nonce.len()).position(|w| w == nonce.as_slice())
            && let Some(nl) = uin[at..].iter().position(|&b| b == b'\n')
        {
            // The error line that quotes the nonce starts after the previous line's end.
            let line_start = uin[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            self.to_client.extend_from_slice(&uin[..line_start]);
            uin.advance(at + nl + 1);
            self.resync = None;
            self.resynced();
            return true;
        }
        // Everything but what could be the start of the marker's line goes out now.
        let keep = uin
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| uin.len() - i - 1);
        let n = uin.len() - keep;
        self.to_client.extend_from_slice(&uin[..n]);
        uin.advance(n);
        false
    }

    /// `RESET` ran on an opaque connection: everything is as on a new connection but the
    /// proxy's identity, which is restored now (as after any `RESET`).
    fn resynced(&mut self) {
        tracing::debug!(conn = self.id, "RESET: the connection is followed again");
        self.state = ConnState::default();
        self.reply_raw = false;
        self.replies.reset();
        self.requests.reset();
        self.request_streaming = false;
        self.client_authed = self.ctx.listen_password.is_none();
        self.requests.set_unauthenticated(!self.client_authed);
        if let Some(credential) = self.valid_newest() {
            self.to_upstream
                .extend_from_slice(credential.auth_command());
            self.pending.push(Owner::Auth {
                credential,
                required: true,
                sent: Instant::now(),
            });
            self.auth.in_flight = true;
        }
        // RESET forgot whatever was still to be restored (a name, the database): only the
        // database is put back.
        self.unrestored.clear();
        if self.ctx.database != 0 {
            self.restore(select_command(self.ctx.database));
        }
    }

    fn become_opaque(&mut self) {
        tracing::debug!(
            conn = self.id,
            "the connection is relayed as opaque bytes from now on"
        );
        self.state.mode = Mode::Opaque;
        self.reply_raw = true;
        self.pristine = false;
    }

    /// Replies the proxy made up, once they are next in line.
    fn emit_locals(&mut self) {
        if self.reply_streaming.is_some() {
            return;
        }
        loop {
            match self.pending.head() {
                Some(Owner::Local(_)) => {
                    if let Some(Owner::Local(reply)) = self.pending.pop() {
                        self.to_client.extend_from_slice(&reply);
                    }
                }
                Some(Owner::TurnOpaque) if self.replies.at_boundary() => {
                    self.pending.pop();
                    self.become_opaque();
                }
                _ => return,
            }
        }
    }

    /// One complete reply frame.
    fn reply_frame(&mut self, frame: &[u8], kind: u8, now: Instant) {
        if let Some(streaming) = self.reply_streaming.take() {
            if streaming == Streaming::Forward {
                self.to_client.extend_from_slice(frame); // the rest of a streamed frame
            }
            return;
        }
        if kind == b'>' {
            return self.push_frame(frame);
        }
        if matches!(self.state.mode, Mode::Monitor) && is_feed_line(frame) {
            return self.feed_line(frame);
        }
        if let Some(hidden) = self.exec_element() {
            if !hidden {
                self.to_client.extend_from_slice(frame);
            }
            return self.finish_exec_elements();
        }
        if frame.first() == Some(&b'-')
            && let Some(rewritten) = self.cluster.as_ref().and_then(|c| c.redirect(frame))
        {
            // `MOVED`/`ASK` name a node: the client is sent to its local listener instead.
            return self.owned_frame(&rewritten, now);
        }
        self.owned_frame(frame, now)
    }

    /// A complete reply frame that is not a push, a feed line or part of an `EXEC` array.
    fn owned_frame(&mut self, frame: &[u8], now: Instant) {
        let Some(owner) = self.pending.pop() else {
            // Nobody expects a reply (e.g. a refused CLIENT REPLY OFF): it is the client's.
            self.to_client.extend_from_slice(frame);
            return;
        };
        self.owned_reply(owner, frame, now);
    }

    fn owned_reply(&mut self, owner: Owner, frame: &[u8], now: Instant) {
        match owner {
            Owner::Client | Owner::ClientBlocking | Owner::Subscription { .. } => {
                self.to_client.extend_from_slice(frame)
            }
            Owner::Local(reply) => {
                // Not reached: locals are emitted before each frame. Keep order regardless.
                self.to_client.extend_from_slice(&reply);
                self.to_client.extend_from_slice(frame);
            }
            Owner::Hidden(inner) => {
                let mark = self.to_client.len();
                self.owned_reply(*inner, frame, now);
                self.to_client.truncate(mark);
            }
            Owner::Auth {
                credential,
                required,
                sent,
            } => {
                let reauth = &self.ctx.metrics.reauth_seconds;
                reauth.observe(now.saturating_duration_since(sent).as_secs_f64());
                self.auth_reply(frame, credential, required);
            }
            Owner::Proxy(command) => self.proxy_reply(command, frame),
            Owner::Restore(command) => self.restore_reply(command, frame),
            Owner::Multi => {
                self.to_client.extend_from_slice(frame);
                if is_error(frame) && matches!(self.state.mode, Mode::Transaction(_)) {
                    self.state.mode = Mode::Normal; // no transaction was opened
                }
            }
            Owner::Exec(txn) => {
                self.to_client.extend_from_slice(frame);
                if exec_ran(frame) {
                    self.apply_queued(txn);
                }
            }
            // Counted by `exec_element` before any owner is taken.
            Owner::ExecElements { .. } => self.to_client.extend_from_slice(frame),
            Owner::ClientHello {
                proto,
                credential,
                as_resp2,
            } => self.hello_reply(frame, proto, credential, as_resp2),
            Owner::Reset => {
                self.to_client.extend_from_slice(frame);
                if matches!(self.state.mode, Mode::Monitor) {
                    self.state.mode = Mode::Normal; // the MONITOR feed ended with this reply
                }
                self.state.framing = Framing::Resp2;
                self.state.subs = Default::default();
                self.own_feed_lines = 0;
            }
            Owner::Monitor => {
                self.to_client.extend_from_slice(frame);
                if !is_error(frame) {
                    self.state.mode = Mode::Monitor;
                }
            }
            // A refused SYNC (an accepted one turned the connection opaque before this); a
            // `TurnOpaque` never waits for a reply (see `emit_locals`).
            Owner::Sync | Owner::TurnOpaque => self.to_client.extend_from_slice(frame),
            Owner::Tracking(self_tracking) => {
                self.to_client.extend_from_slice(frame);
                if !is_error(frame) {
                    self.state.self_tracking = self_tracking;
                }
            }
            Owner::SubscribedPing => translate::subscribed_ping(frame, &mut self.to_client),
            Owner::Blocking(call) => self.blocking_reply(frame, call, now),
            Owner::Topology(which) => {
                match self.cluster.as_ref().and_then(|c| c.topology(which, frame)) {
                    Some(rewritten) => self.to_client.extend_from_slice(&rewritten),
                    None => self.to_client.extend_from_slice(frame),
                }
            }
        }
    }

    /// Sends a command that restores connection state the client counts on ([`Owner::Restore`]).
    fn restore(&mut self, command: Bytes) {
        self.to_upstream.extend_from_slice(&command);
        self.pending.push(Owner::Restore(command));
    }

    /// The reply to a restoring command. While another client's script or function runs past
    /// `busy-reply-threshold`, Redis refuses it (as it refuses every command but `AUTH`,
    /// `HELLO`, `RESET`, `SCRIPT KILL` and a few others) with `-BUSY`: the command is then kept
    /// and sent again ahead of the client's next command ([`Core::restore_before`]), so the
    /// database after a `RESET`, or a pinned client's name, is back before any command of the
    /// client's runs. Any other refusal is final (e.g. `CLIENT SETINFO` on Redis 7.0, which
    /// doesn't know it).
    fn restore_reply(&mut self, command: Bytes, frame: &[u8]) {
        if frame.starts_with(b"-BUSY ") {
            if !self.unrestored.contains(&command) {
                self.unrestored.push(command);
            }
            return;
        }
        self.unrestored.retain(|c| *c != command);
        if is_error(frame) {
            tracing::debug!(conn = self.id, error = %error_text(frame), "upstream refused a command restoring the client's connection state");
        }
    }

    /// Sends, ahead of the client command about to go upstream, what a busy server refused of
    /// the restoring commands. Redis refuses commands in order while it is busy, so the
    /// client's command meets the same refusal it would have met directly, and the first one
    /// that runs runs after the restored state. Not inside a transaction (it would be queued),
    /// nor with replies off or skipped (its reply would not come).
    fn restore_before(&mut self) {
        if self.unrestored.is_empty()
            || self.restored_at == self.commands_done
            || !matches!(self.state.mode, Mode::Normal)
            || self.state.replies != Replies::On
        {
            return;
        }
        self.restored_at = self.commands_done;
        for command in self.unrestored.clone() {
            self.restore(command);
        }
    }

    /// The reply to a proxy command other than `AUTH`.
    fn proxy_reply(&mut self, command: ProxyCommand, frame: &[u8]) {
        if !is_error(frame) {
            if command == ProxyCommand::Hello(2) {
                self.state.framing = Framing::Resp2;
            }
            return;
        }
        match command {
            ProxyCommand::Hello(proto) => {
                self.end = Some(SessionEnd::UpstreamProtocol(format!(
                    "HELLO {proto} refused: {}",
                    error_text(frame)
                )));
            }
            // Outside a cluster ASKING is refused; sending it again changed nothing.
            ProxyCommand::Asking => {}
            ProxyCommand::ReplyOn => {
                tracing::warn!(conn = self.id, error = %error_text(frame), "upstream refused a proxy command");
            }
        }
    }

    /// The client's `HELLO` was answered: the protocol is what the reply is encoded in.
    fn hello_reply(
        &mut self,
        frame: &[u8],
        proto: Option<u8>,
        credential: Option<Arc<AuthCredential>>,
        as_resp2: bool,
    ) {
        if as_resp2 {
            translate::hello_as_resp2(frame, &mut self.to_client);
        } else {
            self.to_client.extend_from_slice(frame);
        }
        if is_error(frame) {
            return;
        }
        let _ = proto;
        self.state.framing = match (as_resp2, frame.first()) {
            (true, _) => Framing::Resp2OverResp3,
            (false, Some(b'%')) => Framing::Resp3,
            _ => Framing::Resp2,
        };
        if let Some(c) = credential {
            self.adopt_credential(c);
        }
    }

    /// The state changes a successful `EXEC` ran, in order (`SKIP` set inside `EXEC` applies
    /// to the command after it; `ON` inside does not cancel it, as in Redis).
    fn apply_queued(&mut self, txn: Transaction) {
        for effect in txn.effects {
            match effect {
                Queued::Replies { .. } => {} // see `Transaction::exec_outcome`
                Queued::Hello { proto, credential } => {
                    if let Some(p) = proto {
                        let subscribed = self.state.subs.any();
                        self.state.framing = match p {
                            3 => Framing::Resp3,
                            _ if subscribed => {
                                // A RESP2 subscriber on a RESP2 upstream: nothing to follow.
                                self.become_opaque();
                                return;
                            }
                            _ => Framing::Resp2,
                        };
                    }
                    if let Some(c) = credential {
                        self.adopt_credential(c);
                    }
                }
                Queued::Auth(c) => self.adopt_credential(c),
                Queued::Tracking(t) => self.state.self_tracking = t,
                Queued::Opaque => self.become_opaque(),
            }
        }
    }

    /// A line of a `MONITOR` feed: the client's, except the line of the proxy's own `AUTH`.
    fn feed_line(&mut self, frame: &[u8]) {
        if self.own_feed_lines > 0 && frame.windows(8).any(|w| w == b"] \"AUTH\"") {
            self.own_feed_lines -= 1;
            return;
        }
        self.to_client.extend_from_slice(frame);
    }

    /// A push frame: out of band, never matched to a request — except subscribe confirmations,
    /// which count down the command that asked for them.
    fn push_frame(&mut self, frame: &[u8]) {
        let name = translate::push_name(frame);
        if let Some((kind, subscribe)) = name.and_then(parse_confirmation) {
            let count = crate::resp::reply_elements(frame)
                .nth(2)
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
            self.confirmation(kind, subscribe, count);
        }
        if self.state.framing != Framing::Resp2OverResp3 {
            self.to_client.extend_from_slice(frame);
            return;
        }
        let fate = translate::push_fate(
            name.unwrap_or_default(),
            self.state.subs.any(),
            self.state.self_tracking,
        );
        match fate {
            PushFate::Array => translate::to_resp2(frame, &mut self.to_client),
            PushFate::InvalidationMessage => {
                translate::invalidation_as_message(frame, &mut self.to_client)
            }
            PushFate::Drop => {}
        }
    }

    /// Tracks subscription counts (per family, from the totals Redis reports) and counts down
    /// the (un)subscribe command at the head of the FIFO.
    fn confirmation(&mut self, kind: SubKind, subscribe: bool, count: Option<u64>) {
        let subs = &mut self.state.subs;
        let before = match kind {
            SubKind::Channel => subs.channels,
            SubKind::Pattern => subs.patterns,
            SubKind::Shard => subs.shards,
        };
        if let Some(count) = count {
            let total = subs.channels + subs.patterns;
            let family = match kind {
                SubKind::Channel => &mut subs.channels,
                SubKind::Pattern => &mut subs.patterns,
                SubKind::Shard => &mut subs.shards,
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

    /// The reply to one slice: the client's answer, or — when the slice ran out and the client
    /// still waits — re-authenticate if a newer credential is there, then block again.
    fn blocking_reply(&mut self, frame: &[u8], call: Box<BlockingCall>, now: Instant) {
        if call.refused_busy(frame) && !self.client_eof {
            // Still blocked, as the client would be directly; nothing is sent until then.
            self.blocked_retry = Some((call, now + BUSY_RETRY));
            return;
        }
        self.state.mode = Mode::Normal;
        // A client that has gone away is not kept blocked: its session ends with this reply.
        let expiry = self.token_expiry();
        if expiry.is_none() || self.client_eof || !call.should_reissue(frame, now) {
            self.to_client.extend_from_slice(frame);
            return;
        }
        self.reissue_blocking(call, now);
    }

    /// Sends the next slice of a blocking command, after an `AUTH` when a newer credential is
    /// there (the one point between slices where nothing else is in flight).
    fn reissue_blocking(&mut self, call: Box<BlockingCall>, now: Instant) {
        self.state.mode = Mode::Normal;
        if !self.auth.in_flight
            && self.auth.retry_at.is_none()
            && let Some(newest) = self.valid_newest()
            && self
                .auth
                .current
                .as_ref()
                .is_none_or(|c| c.generation < newest.generation)
        {
            let how = self.state.injection();
            self.inject_auth(newest, how, now);
        }
        // The slice must end while the token the connection is known to hold still lives.
        if let Some(expiry) = self.token_expiry() {
            self.issue_blocking(call, slice_for(expiry), now);
        }
    }

    /// Forwards the delimited part of a large, incomplete reply (or push) as it arrives, so a
    /// 512 MB value never sits whole in the proxy.
    fn stream_reply(&mut self, uin: &mut BytesMut) {
        let scanned = self.replies.scanned();
        if scanned == 0 || (uin.len() < HIGH_WATER && self.reply_streaming.is_none()) {
            return;
        }
        if self.reply_streaming.is_none() {
            let Some(how) = self.start_streaming_reply(uin, scanned) else {
                if uin.len() >= MAX_HELD_REPLY {
                    self.end = Some(SessionEnd::UpstreamProtocol(
                        "a reply the proxy must inspect is larger than 1 MiB".into(),
                    ));
                }
                return;
            };
            self.reply_streaming = Some(how);
            if let Some(rewritten) = self.streamed_push_head(uin, scanned) {
                uin.advance(rewritten);
                self.replies.consumed(rewritten);
                return;
            }
        }
        if self.reply_streaming == Some(Streaming::Forward) {
            self.to_client.extend_from_slice(&uin[..scanned]);
        }
        uin.advance(scanned);
        self.replies.consumed(scanned);
    }

    /// Whether the frame at the front may be streamed, and where it goes. Takes its owner off
    /// the FIFO (and applies what its start tells).
    fn start_streaming_reply(&mut self, uin: &[u8], scanned: usize) -> Option<Streaming> {
        if self.replies.kind() == Some(b'>') {
            let translating = self.state.framing == Framing::Resp2OverResp3;
            let head = &uin[..scanned];
            let name = translate::push_name(head);
            if name.and_then(parse_confirmation).is_some() {
                return None; // confirmations are small and counted whole
            }
            if translating
                && translate::push_fate(
                    name.unwrap_or_default(),
                    self.state.subs.any(),
                    self.state.self_tracking,
                ) == PushFate::Drop
            {
                return Some(Streaming::Discard);
            }
            return Some(Streaming::Forward);
        }
        if matches!(self.state.mode, Mode::Monitor)
            && uin.len() > 1
            && uin[0] == b'+'
            && uin[1].is_ascii_digit()
        {
            return Some(Streaming::Forward); // a large feed line
        }
        if let Some(hidden) = self.exec_element() {
            self.finish_exec_elements();
            return Some(if hidden {
                Streaming::Discard
            } else {
                Streaming::Forward
            });
        }
        let how = match self.pending.head() {
            None | Some(Owner::Client | Owner::ClientBlocking | Owner::Subscription { .. }) => {
                Streaming::Forward
            }
            // A large reply to a blocking command is its data, never a timeout: it is final.
            Some(Owner::Blocking(_)) => {
                self.state.mode = Mode::Normal;
                Streaming::Forward
            }
            Some(Owner::Exec(_)) => Streaming::Forward,
            Some(Owner::Hidden(inner)) if matches!(**inner, Owner::Exec(_)) => Streaming::Discard,
            _ => return None,
        };
        match self.pending.pop() {
            Some(Owner::Exec(txn)) if exec_ran(uin) => self.apply_queued(txn),
            Some(Owner::Hidden(inner)) => {
                if let Owner::Exec(txn) = *inner
                    && exec_ran(uin)
                {
                    self.apply_queued(txn);
                }
            }
            _ => {}
        }
        Some(how)
    }

    /// A large push streamed to a RESP2 client: its header is rewritten (`>` → `*`, or an
    /// invalidation's head into a message's); returns how many bytes it consumed.
    fn streamed_push_head(&mut self, uin: &[u8], scanned: usize) -> Option<usize> {
        if self.replies.kind() != Some(b'>')
            || self.state.framing != Framing::Resp2OverResp3
            || self.reply_streaming != Some(Streaming::Forward)
        {
            return None;
        }
        let head = &uin[..scanned];
        if translate::push_name(head) == Some(b"invalidate") {
            let skip = [0u8; 3].iter().try_fold(0usize, |pos, _| {
                head[pos..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|nl| pos + nl + 1)
            })?;
            self.to_client
                .extend_from_slice(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n");
            self.to_client.extend_from_slice(&head[skip..]);
        } else {
            self.to_client.extend_from_slice(b"*");
            self.to_client.extend_from_slice(&head[1..]);
        }
        Some(scanned)
    }
}

/// `RESET`, exactly (with arguments it is Redis's arity error).
fn is_reset(frame: &[u8]) -> bool {
    let mut args = Args::new(frame);
    args.argc() == 1
        && args
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case(b"RESET"))
}

/// `WATCH` (inside a transaction Redis refuses it instead of queueing it).
fn is_watch(frame: &[u8]) -> bool {
    Args::new(frame)
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case(b"WATCH"))
}

/// `SYNC` takes no argument, `PSYNC` two (anything else is Redis's arity error).
fn sync_arity_ok(frame: &[u8], argc: usize) -> bool {
    let psync = Args::new(frame)
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case(b"PSYNC"));
    argc == if psync { 3 } else { 1 }
}

/// The password of `HELLO … AUTH <user> <password> …`, if it has one.
fn hello_password(frame: &[u8]) -> Option<&[u8]> {
    let args: Vec<&[u8]> = Args::new(frame).collect();
    let mut i = 2;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
            return Some(args[i + 2]);
        }
        i += 1;
    }
    None
}

/// An `EXEC` reply that says the transaction ran: an array (not the null of a failed `WATCH`,
/// not `EXECABORT`).
fn exec_ran(frame: &[u8]) -> bool {
    frame.first() == Some(&b'*') && !frame.starts_with(b"*-1\r\n")
}

/// A `MONITOR` feed line: a simple string that starts with its timestamp.
fn is_feed_line(frame: &[u8]) -> bool {
    frame.len() > 1 && frame[0] == b'+' && frame[1].is_ascii_digit()
}

/// `CLUSTER SLOTS|SHARDS|NODES|REPLICAS|SLAVES`: a reply that names nodes.
fn cluster_topology(mut args: Args<'_>) -> Option<Topology> {
    let name = args.next()?;
    if !name.eq_ignore_ascii_case(b"cluster") {
        return None;
    }
    Topology::from_subcommand(args.next()?)
}

fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-' | b'!'))
}

/// Redis's error for a command a RESP2 client may not run while subscribed (a refused `EXEC`
/// is reported as an aborted transaction, as Redis reports any refused `EXEC`).
fn subscribed_mode_error(full_name: &str) -> Bytes {
    let reason = format!(
        "Can't execute '{full_name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
    );
    Bytes::from(if full_name == "exec" {
        format!("-EXECABORT Transaction discarded because of: {reason}\r\n")
    } else {
        format!("-ERR {reason}\r\n")
    })
}

#[cfg(test)]
mod tests;
