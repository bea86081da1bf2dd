//! Multiplexing (`--multiplex N`): clients share N authenticated upstream connections until
//! they need one of their own.
//!
//! Why: a 1:1 proxy can't beat the hop it adds, and every client connection costs the cache a
//! TLS handshake, an `AUTH` per token and a slot under the tier's connection limit. Sharing lets
//! Redis read many clients' commands per `read` and per TLS record, and the sidecar then needs
//! N connections (and N re-authentications per token) whatever the application opens.
//!
//! How, in three parts:
//! * [`table`]: the **allow-list** of commands that may run on a shared connection, derived
//!   from the server's `COMMAND` flags at start-up;
//! * [`client`]: a shared client: its commands classified, batched onto its shared connection in
//!   order, its replies handed back in order, the connect-time chatter answered;
//! * [`conn`]: a shared connection: batches written together, replies routed back by a FIFO,
//!   re-authenticated between any two commands, failures answered per command.
//!
//! A client starts shared. Before its first command that is not on the allow-list, it waits for
//! the replies it is owed, then is **pinned**: it gets a connection of its own (from the warm
//! pool when there is one), in the state the shared one had (RESP2, `--database`, plus the name
//! it set), and the 1:1 relay ([`crate::relay`]) takes it from there for the rest of its life.
//! A client stays on one shared connection, so its commands never overtake each other; it
//! moves only when it switches protocol (`HELLO 3`: the RESP3 shared connections, N more,
//! opened when the first client asks), and then only once nothing of its is in flight.

mod client;
pub use client::Protocol;
mod conn;
pub mod table;

use crate::connector::Connector;
use crate::metrics::{Counting, Metrics};
use crate::relay::SessionEnd;
use client::{ClientCore, Handoff, Next};
use conn::{Batch, Mailbox, ReplyBudget};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;
use table::CommandTable;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What the shared connections and their clients share.
pub struct Shared {
    /// Opens (and authenticates) the shared connections.
    pub connector: Arc<Connector>,
    /// Where everything is counted.
    pub metrics: Arc<Metrics>,
    table: watch::Sender<Option<Arc<CommandTable>>>,
    /// A shared connection has taken on reading the table.
    table_claimed: std::sync::atomic::AtomicBool,
    /// Keys of the shared connections in the re-auth deadline gauge (beyond client ids).
    id_base: u64,
    /// Started (`/startup`) once the first shared connection is authenticated.
    health: Arc<crate::health::Health>,
    /// All shared clients' unread replies together (`--multiplex-reply-mib`).
    budget: Arc<ReplyBudget>,
}

impl Shared {
    /// True for the first shared connection that asks: it reads the table.
    fn claim_table(&self) -> bool {
        !self.table_claimed.swap(true, Ordering::Relaxed)
    }

    /// The connection that claimed the table lost its connection before the answer.
    fn unclaim_table(&self) {
        self.table_claimed.store(false, Ordering::Relaxed);
    }

    fn set_table(&self, table: CommandTable) {
        self.table.send_replace(Some(Arc::new(table)));
    }

    fn metrics_id(&self, index: usize) -> u64 {
        self.id_base + index as u64
    }
}

/// One shared connection as its clients see it.
struct Handle {
    tx: mpsc::UnboundedSender<Batch>,
    clients: Arc<AtomicUsize>,
}

/// The shared connections of one upstream: N speaking RESP2, and N speaking RESP3 once a
/// client asks for it (`HELLO 3`).
pub struct Multiplexer {
    shared: Arc<Shared>,
    n: usize,
    resp2: Vec<Handle>,
    resp3: std::sync::OnceLock<Vec<Handle>>,
    stop: CancellationToken,
    database: u32,
    listen_password: Option<crate::secret::Secret>,
    connect_timeout: Duration,
}

/// How a shared client's time on the shared connections ended.
pub enum Outcome<C> {
    /// The session is over.
    Ended(SessionEnd),
    /// The client must have a connection of its own (see [`Handoff`]).
    Pin(C, Handoff),
}

impl Multiplexer {
    /// Starts `n` shared connections (each connects, and reconnects, on its own) until `stop`.
    /// Shared clients' unread replies are bounded by `reply_limit` bytes all together.
    pub fn start(
        n: usize,
        reply_limit: usize,
        connector: Arc<Connector>,
        database: u32,
        listen_password: Option<crate::secret::Secret>,
        health: Arc<crate::health::Health>,
        stop: CancellationToken,
    ) -> Multiplexer {
        let metrics = connector.metrics.clone();
        metrics
            .mux_configured
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        for reason in table::PinReason::ALL {
            metrics.mux_pins.with_label_values(&[reason.label()]);
        }
        let connect_timeout = connector.connect_timeout;
        let shared = Arc::new(Shared {
            connector,
            metrics,
            table: watch::channel(None).0,
            table_claimed: std::sync::atomic::AtomicBool::new(false),
            // Client ids count up from 1; these sit at the top of the range.
            id_base: u64::MAX - 1024,
            health,
            budget: ReplyBudget::new(reply_limit),
        });
        let resp2 = spawn_group(n, 0, Protocol::Resp2, &shared, &stop);
        Multiplexer {
            shared,
            n,
            resp2,
            resp3: std::sync::OnceLock::new(),
            stop,
            database,
            listen_password,
            connect_timeout,
        }
    }

    /// The least used shared connection of `protocol` (the RESP3 ones are started on first use).
    fn pick(&self, protocol: Protocol) -> Option<&Handle> {
        let group = match protocol {
            Protocol::Resp2 => &self.resp2,
            Protocol::Resp3 => self.resp3.get_or_init(|| {
                spawn_group(self.n, self.n, Protocol::Resp3, &self.shared, &self.stop)
            }),
        };
        group
            .iter()
            .min_by_key(|h| h.clients.load(Ordering::Relaxed))
    }

    /// Relays client `id` over a shared connection until it is pinned or leaves.
    pub async fn serve<C>(&self, id: u64, mut client: C, shutdown: CancellationToken) -> Outcome<C>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let table = match self.table().await {
            Some(table) => table,
            None => Arc::new(CommandTable::pin_everything()),
        };
        let mut core = ClientCore::new(id, table, self.database, self.listen_password.clone());
        let Some(mut handle) = self.pick(Protocol::Resp2) else {
            return Outcome::Pin(client, core.handoff());
        };
        let mut _on_conn = Counted::new(handle.clients.clone());
        let metrics = &self.shared.metrics;
        let _shared_gauge = Counting::new(&metrics.mux_shared_clients);
        let (mailbox, mut rx) = Mailbox::new(&self.shared.budget);
        // A child of the process-wide token, as the 1:1 session waits on: polling it each turn
        // then touches this client's own waiter list, not the one every client shares.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let overflow = mailbox.overflow().clone();
        let overflowed = overflow.cancelled();
        tokio::pin!(overflowed);
        let mut cin_grown = false;
        let mut turns = 0u32;
        loop {
            let mut lost = false;
            core.process(&mailbox, |batch| {
                metrics.commands.inc_by(u64::from(batch.count));
                lost |= handle.tx.send(batch).is_err();
            });
            if lost {
                return Outcome::Ended(SessionEnd::Shutdown);
            }
            match core.next() {
                Next::Relay => {}
                Next::Pin(reason) if core.idle() => {
                    metrics.mux_pins.with_label_values(&[reason.label()]).inc();
                    tracing::debug!(conn = id, reason = reason.label(), "pinned");
                    return Outcome::Pin(client, core.handoff());
                }
                Next::Close if core.idle() => {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
                    return Outcome::Ended(SessionEnd::ClientClosed);
                }
                Next::Switch(protocol) if core.idle() => {
                    // Nothing is in flight on the old connection: the new one can't overtake it.
                    let Some(next) = self.pick(protocol) else {
                        return Outcome::Pin(client, core.handoff());
                    };
                    handle = next;
                    _on_conn = Counted::new(handle.clients.clone());
                    core.switched(protocol);
                    continue;
                }
                Next::Pin(_) | Next::Close | Next::Switch(_) => {}
            }
            let event = poll_fn(|cx| {
                let mut progress = false;
                while core.wants_deliveries() {
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(delivery)) => {
                            if let Err(why) = core.delivered(delivery, &mailbox) {
                                return Poll::Ready(Err(why));
                            }
                            progress = true;
                        }
                        Poll::Ready(None) | Poll::Pending => break,
                    }
                }
                if !core.output().is_empty() {
                    match Pin::new(&mut client).poll_write(cx, core.output()) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            bytes::Buf::advance(core.output(), n);
                            progress = true;
                        }
                        Poll::Ready(_) => return Poll::Ready(Ok(Some(SessionEnd::ClientClosed))),
                        Poll::Pending => {}
                    }
                }
                if core.wants_input() {
                    let buf = core.client_input();
                    if buf.capacity() - buf.len() < 256 {
                        buf.reserve(if cin_grown { 16 * 1024 } else { 1024 });
                    }
                    let room = buf.capacity() - buf.len();
                    match tokio_util::io::poll_read_buf(Pin::new(&mut client), cx, buf) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Ok(Some(SessionEnd::ClientClosed)));
                        }
                        Poll::Ready(Ok(n)) => {
                            cin_grown |= n == room;
                            metrics.bytes_to_upstream.inc_by(n as u64);
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Ok(Some(SessionEnd::ClientIo(e))));
                        }
                        Poll::Pending => {}
                    }
                }
                // The two tokens only when idle (and now and then while busy): polling them
                // is a measurable part of a turn that carries one command.
                turns = turns.wrapping_add(1);
                if progress && !turns.is_multiple_of(IDLE_CHECK_EVERY) {
                    return Poll::Ready(Ok(None));
                }
                if overflowed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(client::OVERFLOW));
                }
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(Some(SessionEnd::Shutdown)));
                }
                if progress {
                    Poll::Ready(Ok(None))
                } else {
                    Poll::Pending
                }
            })
            .await;
            match event {
                Ok(None) => {}
                Ok(Some(end)) => return Outcome::Ended(end),
                Err(why) => {
                    tracing::warn!(conn = id, "closing a shared client: {why}");
                    if why == client::OVERFLOW {
                        metrics
                            .client_rejections
                            .with_label_values(&["output_buffer"])
                            .inc();
                    }
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
                    return Outcome::Ended(SessionEnd::ClientClosed);
                }
            }
        }
    }

    /// The allow-list, once the first shared connection has read it (at most
    /// `--connect-timeout`; `None` if it could not, and the client is pinned).
    async fn table(&self) -> Option<Arc<CommandTable>> {
        let mut rx = self.shared.table.subscribe();
        let wait = rx.wait_for(|t| t.is_some());
        match tokio::time::timeout(self.connect_timeout, wait).await {
            Ok(Ok(t)) => t.clone(),
            _ => None,
        }
    }
}

/// A busy loop turn polls its shutdown and overflow tokens only every this many turns (an
/// idle one always does, before it waits).
pub(crate) const IDLE_CHECK_EVERY: u32 = 32;

/// Counts a client on its shared connection while it is there.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts `n` shared connections speaking `protocol`, numbered from `first`.
fn spawn_group(
    n: usize,
    first: usize,
    protocol: Protocol,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Vec<Handle> {
    (first..first + n)
        .map(|index| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(conn::run(index, protocol, shared.clone(), rx, stop.clone()));
            Handle {
                tx,
                clients: Arc::new(AtomicUsize::new(0)),
            }
        })
        .collect()
}
