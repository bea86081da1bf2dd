//! One shared upstream connection: many clients' commands in, their replies routed back.
//!
//! The connection's task owns the stream (no lock, no split). Clients hand it [`Batch`]es —
//! whole commands only, so two clients' bytes never interleave inside a frame — which it
//! appends to one write buffer in arrival order. At most [`MAX_WRITES_IN_FLIGHT`] writes are
//! in flight (written, not yet fully answered); whatever arrives while two are goes out
//! together in the next one (one TLS record, one `read` on the server: the speed of sharing).
//! Writing each batch the moment it arrived cost up to twice the proxy CPU per command with
//! 50 unpipelined clients (a syscall and a TLS record per client batch, and as many reads on
//! the server; pipelined clients gather on their own); waiting for every reply (one in
//! flight) gathers the most but makes a command that arrives just after a write wait a whole
//! round trip under load. With two, the connection stays busy while the next write gathers,
//! and a command waits (at most until the older write is answered) only when two are already
//! out. Each batch pushes `(client, count)` onto a FIFO, and each reply
//! frame goes to the FIFO's head: replies come back in the order commands were written, so
//! routing needs no tags. Reply bytes are handed over as slices of the read buffer (no copy);
//! a frame still arriving is forwarded as far as it goes, to the one client it can belong to.
//!
//! Isolation: the task never waits for a client. A client that does not read lets its
//! replies pile up in its [`Mailbox`] up to [`CLIENT_REPLY_LIMIT`]; beyond that its further
//! replies are dropped and [`Mailbox::overflow`] tells its own task to close it. All clients'
//! unread replies together are bounded too ([`ReplyBudget`], `--multiplex-reply-mib`): a
//! delivery that would pass that bound first closes the clients holding the most (only those
//! holding at least [`FAIR_UNREAD`]), so memory is bounded by the process, not by 32 MiB times
//! the number of clients, and a client that reads is not the one closed.
//! When the connection breaks, each command in flight is answered with one clear error
//! ([`Delivery::Failed`]), except for a client whose reply was half forwarded (its stream can't
//! be repaired: [`Delivery::Broken`] closes it); then the task reconnects.
//!
//! Re-authentication: only allow-listed, stateless commands ever run here (see
//! [`super::table`]), so every boundary between two written commands is a safe point: a new
//! credential's `AUTH` is appended to the write buffer as soon as it is published (see
//! [`crate::relay::state`] for the 1:1 relay's conditions, of which only "between two commands"
//! applies here) and its reply is taken out of the stream by the FIFO.

use super::Shared as MuxShared;
use super::client::Protocol;
use super::table::CommandTable;
use crate::credential::{AuthCredential, CredentialWatch};
use crate::resp::{Grammar, Scanner};
use crate::upstream::{UpstreamStream, error_text, roundtrip};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Reply bytes a client may leave unread before it is disconnected (Redis's own default for
/// normal clients has no limit; a shared connection can't wait for anyone, so this one has).
pub const CLIENT_REPLY_LIMIT: usize = 32 * 1024 * 1024;
/// Unread reply bytes a client may hold without being among those closed when all clients
/// together pass the process-wide bound ([`ReplyBudget`]). A client that reads holds at most a
/// few read chunks (it takes its deliveries as fast as its socket drains).
pub const FAIR_UNREAD: usize = 1024 * 1024;
/// Gatherings of commands written and not yet fully answered before the next waits: what
/// arrives meanwhile is gathered into one write. See the module documentation.
const MAX_WRITES_IN_FLIGHT: usize = 2;
/// Batches taken from the channel per turn.
const BATCHES_PER_TURN: usize = 512;
/// Stop taking batches while this much is waiting to be written.
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// Reads go in chunks of this size.
const READ_CHUNK: usize = 64 * 1024;
/// Reconnect delays.
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// What a client's task receives from its shared connection.
#[derive(Debug)]
pub enum Delivery {
    /// Reply bytes, in order; `complete` replies end inside them (0 for the middle of one).
    Replies {
        /// The bytes, as they came from the server.
        bytes: Bytes,
        /// Replies that end in `bytes`.
        complete: u32,
    },
    /// The connection broke (or could not be opened): `count` commands get `error` each.
    Failed {
        /// Commands in flight.
        count: u32,
        /// The error line every one of them gets.
        error: Bytes,
    },
    /// The connection broke in the middle of this client's reply: it must be closed.
    Broken,
}

/// Where a shared connection puts one client's replies.
#[derive(Debug)]
pub struct Mailbox {
    tx: mpsc::UnboundedSender<Delivery>,
    /// Bytes delivered and not yet taken by the client's task.
    queued: AtomicUsize,
    /// Set once the limit was passed: nothing more is delivered.
    overflowed: AtomicBool,
    /// Cancelled at the same moment: the client's task is woken by it even while it takes no
    /// deliveries (it takes none while its client isn't reading, which is how it got here).
    overflow: CancellationToken,
    /// The process-wide bound, which counts `queued` too.
    budget: Arc<ReplyBudget>,
}

/// The process-wide bound on unread replies of all multiplexed clients together
/// (`--multiplex-reply-mib`). Every byte in a [`Mailbox`]'s `queued` is counted here as well;
/// the lock is taken when a client arrives and when the bound is passed, never per command.
#[derive(Debug)]
pub struct ReplyBudget {
    limit: usize,
    queued: AtomicUsize,
    registry: Mutex<Registry>,
}

/// Every client's mailbox, to find the ones holding the most.
#[derive(Debug, Default)]
struct Registry {
    mailboxes: Vec<Weak<Mailbox>>,
    /// Entries after the last sweep of departed clients.
    after_sweep: usize,
}

impl ReplyBudget {
    /// A bound of `limit` bytes.
    pub fn new(limit: usize) -> Arc<ReplyBudget> {
        Arc::new(ReplyBudget {
            limit,
            queued: AtomicUsize::new(0),
            registry: Mutex::new(Registry::default()),
        })
    }

    /// Unread reply bytes of all clients now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn register(&self, mailbox: &Arc<Mailbox>) {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry.mailboxes.push(Arc::downgrade(mailbox));
        if registry.mailboxes.len() > 2 * registry.after_sweep.max(32) {
            registry.mailboxes.retain(|m| m.strong_count() > 0);
            registry.after_sweep = registry.mailboxes.len();
        }
    }

    /// Room for `n` more bytes: closes the clients holding the most, largest first, while the
    /// bound would be passed and one holds at least [`FAIR_UNREAD`]. What is left over the
    /// bound then sits with clients holding less than that each (the per-connection memory
    /// that `--max-connections` bounds).
    fn make_room(&self, n: usize) {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        while self.queued() + n > self.limit {
            let largest = registry
                .mailboxes
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|m| !m.overflowed.load(Ordering::Relaxed))
                .max_by_key(|m| m.queued.load(Ordering::Relaxed));
            match largest {
                Some(m) if m.queued.load(Ordering::Relaxed) >= FAIR_UNREAD => m.close_for_unread(),
                _ => break,
            }
        }
    }
}

impl Mailbox {
    /// A mailbox counted in `budget`, and the receiving end the client's task reads.
    pub fn new(budget: &Arc<ReplyBudget>) -> (Arc<Mailbox>, mpsc::UnboundedReceiver<Delivery>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mailbox = Arc::new(Mailbox {
            tx,
            queued: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
            overflow: CancellationToken::new(),
            budget: budget.clone(),
        });
        budget.register(&mailbox);
        (mailbox, rx)
    }

    /// Cancelled once the client left more than [`CLIENT_REPLY_LIMIT`] unread.
    pub fn overflow(&self) -> &CancellationToken {
        &self.overflow
    }

    /// The client's task took `n` delivered bytes.
    pub fn taken(&self, n: usize) {
        self.release(n);
    }

    /// `n` bytes (at most what is counted) are no longer unread, here and in the budget.
    fn release(&self, n: usize) {
        let held = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            })
            .unwrap_or(0);
        self.budget.queued.fetch_sub(held.min(n), Ordering::Relaxed);
    }

    /// Marks the client to be closed: nothing more is delivered, and what it holds no longer
    /// counts (it is dropped with the client's task).
    fn close_for_unread(&self) {
        self.overflowed.store(true, Ordering::Relaxed);
        let held = self.queued.swap(0, Ordering::Relaxed);
        self.budget.queued.fetch_sub(held, Ordering::Relaxed);
        self.overflow.cancel();
    }

    fn deliver(&self, bytes: Bytes, complete: u32) {
        if self.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let n = bytes.len();
        if self.queued.load(Ordering::Relaxed) + n > CLIENT_REPLY_LIMIT {
            self.close_for_unread();
            return;
        }
        if self.budget.queued() + n > self.budget.limit {
            self.budget.make_room(n);
            if self.overflowed.load(Ordering::Relaxed) {
                return; // this client was among those holding the most
            }
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.budget.queued.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(Delivery::Replies { bytes, complete }).is_err() {
            self.release(n); // the client has gone
        }
    }

    fn fail(&self, count: u32, error: &Bytes) {
        let _ = self.tx.send(Delivery::Failed {
            count,
            error: error.clone(),
        });
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // Deliveries the client's task never took go with it.
        let held = self.queued.swap(0, Ordering::Relaxed);
        self.budget.queued.fetch_sub(held, Ordering::Relaxed);
    }
}

/// Whole commands of one client, for a shared connection.
#[derive(Debug)]
pub struct Batch {
    /// Whose replies they are.
    pub mailbox: Arc<Mailbox>,
    /// One or more complete commands.
    pub bytes: Bytes,
    /// How many.
    pub count: u32,
}

/// Whose the next replies are.
enum Owner {
    Client(Arc<Mailbox>),
    /// The connection's own `AUTH`.
    Auth(Arc<AuthCredential>, Instant),
}

struct Entry {
    owner: Owner,
    left: u32,
}

/// Why a connection's run ended.
enum End {
    Broken(String),
    Shutdown,
}

/// Runs shared connection number `index` until `stop`: connects, serves, reconnects.
pub async fn run(
    index: usize,
    protocol: Protocol,
    mux: Arc<MuxShared>,
    mut rx: mpsc::UnboundedReceiver<Batch>,
    stop: CancellationToken,
) {
    let mut delay = RECONNECT_MIN;
    loop {
        let opened = tokio::select! {
            opened = open(&mux, protocol) => opened,
            () = stop.cancelled() => return,
        };
        let ready = match opened {
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(shared = index, error = %e, "cannot open a shared upstream connection");
                // Nobody waits on a connection that isn't there: what is queued fails now.
                let error = crate::relay::proxy_error(&format!(
                    "cannot open a shared upstream connection: {e}"
                ));
                fail_queued(&mut rx, &error, &mux);
                if !back_off(&mut delay, &stop).await {
                    return;
                }
                continue;
            }
        };
        let mut stream = ready.stream;
        delay = RECONNECT_MIN;
        if mux.claim_table() {
            match read_table(&mut stream).await {
                Ok(table) => mux.set_table(table),
                Err(e) => {
                    // Not the server's answer (that one is kept, even a refusal): ask again on
                    // the next connection.
                    tracing::warn!(shared = index, error = %e, "multiplex: reading COMMAND failed; asking again");
                    mux.unclaim_table();
                    if !back_off(&mut delay, &stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        mux.metrics.mux_shared_connections.inc();
        mux.metrics.upstream_connections.inc();
        if mux.health.mark_started_first() {
            tracing::info!(upstream = %mux.connector.upstream.addr(), "ready: a shared upstream connection authenticated");
        }
        tracing::debug!(shared = index, "shared upstream connection open");
        let mut conn = Conn {
            stream,
            wbuf: BytesMut::new(),
            uin: BytesMut::new(),
            replies: Scanner::new(Grammar::Reply),
            fifo: VecDeque::new(),
            unanswered: VecDeque::new(),
            head_partial: false,
            credential: ready.credential,
            unflushed: false,
            unwritten_commands: 0,
            mux: mux.clone(),
            metrics_id: mux.metrics_id(index),
            credentials: mux.connector.credentials.subscribe(),
        };
        conn.record_expiry();
        let end = conn.serve(&mut rx, &stop).await;
        mux.metrics.mux_shared_connections.dec();
        mux.metrics.upstream_connections.dec();
        mux.metrics.forget_connection(conn.metrics_id);
        match end {
            End::Shutdown => {
                conn.fail_in_flight("the proxy is shutting down");
                return;
            }
            End::Broken(reason) => {
                tracing::warn!(shared = index, reason = %reason, "shared upstream connection broke; reconnecting");
                mux.metrics
                    .upstream_errors
                    .with_label_values(&["closed"])
                    .inc();
                conn.fail_in_flight(&format!(
                    "the shared upstream connection broke before this command's reply ({reason}); \
                     it may or may not have run"
                ));
            }
        }
    }
}

/// A new shared connection: TCP, TLS, `AUTH` (and `SELECT`) by the connector, then `HELLO 3`
/// for the RESP3 group. The error is the client-facing reason (no secret in it).
async fn open(mux: &MuxShared, protocol: Protocol) -> Result<crate::connector::Ready, String> {
    let mut ready = mux.connector.open().await.map_err(|e| e.to_string())?;
    if protocol == Protocol::Resp3 {
        hello_3(&mut ready.stream).await?;
    }
    Ok(ready)
}

/// Waits `delay` (doubling it for the next time, up to [`RECONNECT_MAX`]); false once `stop`.
async fn back_off(delay: &mut Duration, stop: &CancellationToken) -> bool {
    let wait = *delay;
    *delay = (*delay * 2).min(RECONNECT_MAX);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = stop.cancelled() => false,
    }
}

/// `HELLO 3` on a new shared connection of the RESP3 group.
async fn hello_3(stream: &mut UpstreamStream) -> Result<(), String> {
    let hello = crate::resp::encode_command(&[b"HELLO", b"3"]);
    let replies = roundtrip(stream, &[hello])
        .await
        .map_err(|e| e.to_string())?;
    match replies.first() {
        Some(r) if r.first() == Some(&b'%') => Ok(()),
        Some(r) => Err(format!("HELLO 3: {}", error_text(r))),
        None => Err("HELLO 3: no reply".into()),
    }
}

/// `COMMAND`, read once by the first shared connection: the allow-list.
/// `Err` when the connection failed before the server answered.
async fn read_table(stream: &mut UpstreamStream) -> Result<CommandTable, String> {
    let command = crate::resp::encode_command(&[b"COMMAND"]);
    match roundtrip(stream, &[command]).await {
        Ok(replies) => Ok(
            match replies
                .first()
                .and_then(|r| CommandTable::from_command_reply(r))
            {
                Some(table) => {
                    tracing::info!(commands = table.commands(), "multiplex: command table read");
                    table
                }
                None => {
                    let why = replies.first().map(|r| error_text(r)).unwrap_or_default();
                    tracing::warn!(reply = %why, "multiplex: COMMAND gave no table; every client gets a connection of its own");
                    CommandTable::pin_everything()
                }
            },
        ),
        Err(e) => Err(e.to_string()),
    }
}

/// Answers every batch already queued with `error` (the connection isn't there).
fn fail_queued(rx: &mut mpsc::UnboundedReceiver<Batch>, error: &Bytes, mux: &MuxShared) {
    while let Ok(batch) = rx.try_recv() {
        mux.metrics
            .mux_failed_commands
            .inc_by(u64::from(batch.count));
        batch.mailbox.fail(batch.count, error);
    }
}

struct Conn {
    stream: UpstreamStream,
    wbuf: BytesMut,
    uin: BytesMut,
    replies: Scanner,
    fifo: VecDeque<Entry>,
    /// Replies still owed for each gathering appended to the write buffer, oldest first.
    unanswered: VecDeque<u32>,
    /// Part of the head entry's current reply was already handed over.
    head_partial: bool,
    credential: Option<Arc<AuthCredential>>,
    unflushed: bool,
    /// Commands appended since the write buffer was last empty.
    unwritten_commands: u64,
    mux: Arc<MuxShared>,
    /// This connection's key in the re-auth deadline gauge.
    metrics_id: u64,
    /// The published credentials, looked at (never waited on) when an `AUTH` completes.
    credentials: CredentialWatch,
}

impl Conn {
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Batch>,
        stop: &CancellationToken,
    ) -> End {
        let credentials: CredentialWatch = self.mux.connector.credentials.subscribe();
        let mut watching = self.mux.connector.authenticate;
        // A credential published while this connection was being opened.
        self.maybe_reauth(&credentials);
        // Created once, not per turn (see the 1:1 session's loop for why).
        let changed = next_credential(credentials);
        tokio::pin!(changed);
        let cancelled = stop.cancelled();
        tokio::pin!(cancelled);
        let mut batches = Vec::with_capacity(BATCHES_PER_TURN);
        let mut turns = 0u32;
        loop {
            let event = poll_fn(|cx| {
                let mut progress = false;
                // Take what clients sent (while there is room to write it).
                if self.wbuf.len() < WRITE_HIGH_WATER
                    && self.unanswered.len() < MAX_WRITES_IN_FLIGHT
                    && let Poll::Ready(n) = rx.poll_recv_many(cx, &mut batches, BATCHES_PER_TURN)
                {
                    if n == 0 {
                        return Poll::Ready(Err(End::Shutdown)); // no client can come any more
                    }
                    self.take(&mut batches);
                    progress = true;
                }
                if !self.wbuf.is_empty() {
                    match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(End::Broken("write closed".into())));
                        }
                        Poll::Ready(Ok(n)) => {
                            self.wbuf.advance(n);
                            self.unflushed = true;
                            if self.wbuf.is_empty() && self.unwritten_commands > 0 {
                                self.mux
                                    .metrics
                                    .mux_commands_per_write
                                    .observe(self.unwritten_commands as f64);
                                self.unwritten_commands = 0;
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(End::Broken(e.to_string()))),
                        Poll::Pending => {}
                    }
                }
                if self.wbuf.is_empty() && self.unflushed {
                    match Pin::new(&mut self.stream).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.unflushed = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(End::Broken(e.to_string()))),
                        Poll::Pending => {}
                    }
                }
                if self.uin.capacity() - self.uin.len() < 1024 {
                    self.uin.reserve(READ_CHUNK);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.uin) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(End::Broken(
                            "connection closed by the server".into(),
                        )));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.mux.metrics.bytes_to_client.inc_by(n as u64);
                        if let Err(e) = self.route() {
                            return Poll::Ready(Err(End::Broken(e)));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(End::Broken(e.to_string()))),
                    Poll::Pending => {}
                }
                // As a shared client does: the credential and the stop token when idle, and
                // every few busy turns.
                turns = turns.wrapping_add(1);
                if progress && !turns.is_multiple_of(super::IDLE_CHECK_EVERY) {
                    return Poll::Ready(Ok(None));
                }
                if watching && let Poll::Ready(w) = changed.as_mut().poll(cx) {
                    return Poll::Ready(Ok(Some(w)));
                }
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(End::Shutdown));
                }
                if progress {
                    Poll::Ready(Ok(None))
                } else {
                    Poll::Pending
                }
            })
            .await;
            match event {
                Err(end) => return end,
                Ok(None) => {}
                Ok(Some(Some(watch))) => {
                    self.maybe_reauth(&watch);
                    changed.set(next_credential(watch));
                }
                Ok(Some(None)) => watching = false,
            }
        }
    }

    /// Appends the batches to the write buffer and their owners to the FIFO.
    fn take(&mut self, batches: &mut Vec<Batch>) {
        let mut commands = 0u64;
        for batch in batches.drain(..) {
            commands += u64::from(batch.count);
            self.wbuf.extend_from_slice(&batch.bytes);
            // One entry per batch, never merged: the client may owe a reply of its own
            // between two of its batches, so a delivery must not span them.
            self.fifo.push_back(Entry {
                owner: Owner::Client(batch.mailbox),
                left: batch.count,
            });
        }
        self.unwritten_commands += commands;
        if commands > 0 {
            self.unanswered
                .push_back(u32::try_from(commands).unwrap_or(u32::MAX));
        }
    }

    /// A newer credential than this connection's: its `AUTH` goes after what is queued.
    fn maybe_reauth(&mut self, credentials: &CredentialWatch) {
        let Some(newest) = credentials.borrow().current.clone() else {
            return;
        };
        let current = self.credential.as_ref().map(|c| c.generation);
        let in_flight = self.fifo.iter().any(|e| matches!(e.owner, Owner::Auth(..)));
        if current.is_some_and(|g| g >= newest.generation) || in_flight {
            return;
        }
        self.wbuf.extend_from_slice(newest.auth_command());
        self.fifo.push_back(Entry {
            owner: Owner::Auth(newest, Instant::now()),
            left: 1,
        });
        self.unanswered.push_back(1);
    }

    fn record_expiry(&self) {
        self.mux.metrics.set_auth_expiry(
            self.metrics_id,
            self.credential.as_ref().and_then(|c| c.expires_at),
        );
    }

    /// Hands each complete reply (and the finished part of one still arriving) to its owner.
    fn route(&mut self) -> Result<(), String> {
        // Replies of the head client gathered so far: `run` bytes, `complete` of them whole.
        let mut run = 0usize;
        let mut complete = 0u32;
        loop {
            let scanned = self
                .replies
                .scan(&self.uin[run..])
                .map_err(|e| format!("the server sent malformed RESP: {e}"))?;
            let Some(head) = self.fifo.front_mut() else {
                if self.uin.len() > run || scanned.is_some() {
                    return Err("the server sent a reply nobody asked for".into());
                }
                return Ok(());
            };
            match scanned {
                Some(frame) => match &head.owner {
                    Owner::Client(_) => {
                        run += frame.len;
                        complete += 1;
                        answered(&mut self.unanswered);
                        head.left -= 1;
                        if head.left == 0 {
                            self.flush_run(&mut run, &mut complete, true);
                        }
                    }
                    Owner::Auth(..) => {
                        debug_assert_eq!(run, 0);
                        let reply = self.uin.split_to(frame.len);
                        answered(&mut self.unanswered);
                        let Some(Entry {
                            owner: Owner::Auth(credential, sent),
                            ..
                        }) = self.fifo.pop_front()
                        else {
                            return Ok(());
                        };
                        self.auth_reply(&reply, credential, sent);
                    }
                },
                None => {
                    // A reply still arriving: what is known of it goes to its owner already.
                    let partial = self.replies.scanned();
                    if partial > 0 && matches!(head.owner, Owner::Client(_)) {
                        run += partial;
                        self.replies.consumed(partial);
                        self.flush_run(&mut run, &mut complete, false);
                        self.head_partial = true;
                    } else {
                        self.flush_run(&mut run, &mut complete, false);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Delivers the gathered bytes to the head's client; pops the head when `done`.
    fn flush_run(&mut self, run: &mut usize, complete: &mut u32, done: bool) {
        if *run == 0 && !done {
            return;
        }
        let bytes = self.uin.split_to(*run).freeze();
        if let Some(Entry {
            owner: Owner::Client(mailbox),
            ..
        }) = self.fifo.front()
        {
            mailbox.deliver(bytes, *complete);
        }
        if *complete > 0 {
            self.head_partial = false;
        }
        if done {
            self.fifo.pop_front();
        }
        *run = 0;
        *complete = 0;
    }

    fn auth_reply(&mut self, reply: &[u8], credential: Arc<AuthCredential>, sent: Instant) {
        let metrics = &self.mux.metrics;
        if reply.first() == Some(&b'+') {
            metrics.reauth_success.inc();
            metrics.reauth_seconds.observe(sent.elapsed().as_secs_f64());
            self.credential = Some(credential);
            self.record_expiry();
            // A credential published while this one was in flight is sent now.
            let credentials = self.credentials.clone();
            self.maybe_reauth(&credentials);
        } else {
            metrics.reauth_failure.inc();
            // Never the credential: the server's error text only.
            tracing::warn!(error = %error_text(reply), "re-authentication of a shared connection refused");
        }
    }

    /// Every command still waiting for a reply gets `reason` (one error each); a client whose
    /// reply was half delivered is closed instead.
    fn fail_in_flight(&mut self, reason: &str) {
        let error = crate::relay::proxy_error(reason);
        let mut first = true;
        for entry in self.fifo.drain(..) {
            if let Owner::Client(mailbox) = entry.owner {
                self.mux
                    .metrics
                    .mux_failed_commands
                    .inc_by(u64::from(entry.left));
                if first && self.head_partial {
                    let _ = mailbox.tx.send(Delivery::Broken);
                } else {
                    mailbox.fail(entry.left, &error);
                }
            }
            first = false;
        }
        self.head_partial = false;
    }
}

/// Resolves once a newer credential is published, giving the watch back for the next wait;
/// `None` once the channel is closed (the process is stopping).
async fn next_credential(mut watch: CredentialWatch) -> Option<CredentialWatch> {
    watch.changed().await.ok().map(|()| watch)
}

/// One more reply came for the oldest gathering in flight.
fn answered(unanswered: &mut VecDeque<u32>) {
    if let Some(front) = unanswered.front_mut() {
        *front -= 1;
        if *front == 0 {
            unanswered.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The reply bounds, per client and process-wide, driven through [`Mailbox::deliver`].

    use super::*;

    const MIB: usize = 1024 * 1024;

    fn chunk(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    /// Delivers `mib` MiB to `mailbox` in 64-KiB chunks (as a shared connection reads them).
    fn deliver_mib(mailbox: &Mailbox, mib: usize) {
        for _ in 0..mib * 16 {
            mailbox.deliver(chunk(64 * 1024), 0);
        }
    }

    fn closed(mailbox: &Mailbox) -> bool {
        mailbox.overflow().is_cancelled()
    }

    #[test]
    fn one_client_is_closed_past_its_own_limit_whatever_the_budget() {
        let budget = ReplyBudget::new(usize::MAX);
        let (sluggard, _rx) = Mailbox::new(&budget);
        deliver_mib(&sluggard, 32);
        assert!(!closed(&sluggard));
        sluggard.deliver(chunk(1), 1);
        assert!(closed(&sluggard));
        // What it held no longer counts.
        assert_eq!(budget.queued(), 0);
    }

    #[test]
    fn past_the_budget_the_clients_holding_the_most_are_closed_not_the_one_that_reads() {
        let budget = ReplyBudget::new(8 * MIB);
        let (a, _ra) = Mailbox::new(&budget);
        let (b, _rb) = Mailbox::new(&budget);
        let (c, _rc) = Mailbox::new(&budget);
        let (reader, mut rr) = Mailbox::new(&budget);
        deliver_mib(&a, 5);
        deliver_mib(&b, 5); // passes 8 MiB: a (5 MiB) is closed, b goes on
        assert!(closed(&a) && !closed(&b));
        deliver_mib(&c, 5); // passes it again: b is now the largest
        assert!(closed(&b) && !closed(&c));
        assert_eq!(budget.queued(), 5 * MIB);
        // A client that takes what it gets is never the one closed, however much goes through.
        for _ in 0..1000 {
            reader.deliver(chunk(64 * 1024), 1);
            while let Ok(Delivery::Replies { bytes, .. }) = rr.try_recv() {
                reader.taken(bytes.len());
            }
        }
        assert!(!closed(&reader) && !closed(&c));
        assert!(budget.queued() <= 8 * MIB, "{}", budget.queued());
    }

    #[test]
    fn small_holders_are_not_closed_and_the_bound_is_passed_only_by_them() {
        let budget = ReplyBudget::new(2 * MIB);
        let clients: Vec<_> = (0..8).map(|_| Mailbox::new(&budget)).collect();
        for (m, _) in &clients {
            for _ in 0..8 {
                m.deliver(chunk(64 * 1024), 1); // 512 KiB each: below FAIR_UNREAD
            }
        }
        assert!(clients.iter().all(|(m, _)| !closed(m)));
        assert_eq!(budget.queued(), 4 * MIB);
    }

    #[test]
    fn a_departed_client_gives_back_what_it_held() {
        let budget = ReplyBudget::new(usize::MAX);
        let (m, rx) = Mailbox::new(&budget);
        deliver_mib(&m, 3);
        assert_eq!(budget.queued(), 3 * MIB);
        drop(rx);
        m.deliver(chunk(10), 1); // sent to nobody: not counted
        assert_eq!(budget.queued(), 3 * MIB);
        drop(m);
        assert_eq!(budget.queued(), 0);
    }
}
