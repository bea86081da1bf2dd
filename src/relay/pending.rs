//! Who owns each reply the upstream will send.
//!
//! Redis answers commands strictly in order, so the relay keeps a FIFO with one entry per
//! expected reply: the client's (forwarded), the proxy's own (an injected `AUTH`, consumed), a
//! reply the proxy makes up (answered locally, but emitted in order), or a command whose reply
//! confirms a change of connection state. Runs of ordinary client commands are stored as one
//! counted entry, so a pipeline of thousands of commands costs one slot and no allocation.
//!
//! The FIFO also counts what [`super::state::ConnState::safe_point`] and the request side ask
//! about: entries that are not plain client replies (no `AUTH` may be injected while any is
//! outstanding), *uncertain* changes (no later client command is sent until their reply), and
//! blocking commands (a client that leaves while one is outstanding closes its upstream).

use super::blocking::BlockingCall;
use super::state::{Replies, Transaction};
use crate::credential::AuthCredential;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// The three families of (un)subscribe commands; each confirms with pushes of its own name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubKind {
    /// `SUBSCRIBE` / `UNSUBSCRIBE`.
    Channel,
    /// `PSUBSCRIBE` / `PUNSUBSCRIBE`.
    Pattern,
    /// `SSUBSCRIBE` / `SUNSUBSCRIBE`.
    Shard,
}

/// A command the proxy sends for itself; its reply is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCommand {
    /// `CLIENT REPLY ON` around a proxy command while the client's replies are off or skipped.
    ReplyOn,
    /// `ASKING` again after a proxy command, for the client's next command.
    Asking,
    /// `HELLO 2|3`: switching the upstream's protocol for a RESP2 subscriber.
    Hello(u8),
}

/// The owner of one expected reply.
#[derive(Debug)]
pub enum Owner {
    /// The client's command: its reply is forwarded as it is.
    Client,
    /// A reply made by the proxy (e.g. `+OK` to a client `AUTH`), emitted in order.
    Local(Bytes),
    /// The reply to a blocking command relayed as it is (not sliced). The client's; while it is
    /// outstanding, a client that leaves ends the session at once.
    ClientBlocking,
    /// An `AUTH` injected by the proxy: its reply is consumed. `required` is set after `RESET`,
    /// where a failure leaves the connection unauthenticated.
    Auth {
        /// The credential sent; it becomes the connection's credential on `+OK`.
        credential: Arc<AuthCredential>,
        /// Failure closes the client connection (nothing else authenticates it).
        required: bool,
        /// When it was queued (for `redis_proxy_reauth_seconds`).
        sent: Instant,
    },
    /// A proxy command other than `AUTH`: consumed.
    Proxy(ProxyCommand),
    /// The client's `MULTI`: an error reply means no transaction was opened.
    Multi,
    /// The client's `EXEC`: when it succeeds, the queued state changes take effect.
    Exec(Transaction),
    /// The elements of an `EXEC` array that Redis writes fewer of than it announced (it ran
    /// `CLIENT REPLY OFF|SKIP`): each is the client's; then the reply mode is `then`.
    ExecElements {
        /// Elements still to come.
        left: u64,
        /// The reply mode once they are in.
        then: Replies,
        /// The transaction's other state changes, applied then too.
        txn: Transaction,
    },
    /// The client's `HELLO`, with its `AUTH` pair replaced by the proxy's credential.
    ClientHello {
        /// The protocol asked for, if any.
        proto: Option<u8>,
        /// The credential put in its place, if the client sent `AUTH`.
        credential: Option<Arc<AuthCredential>>,
        /// A RESP3 subscriber asked for RESP2: the proxy sent `HELLO 3` instead, and the reply
        /// (a RESP3 map) is rewritten into what `HELLO 2` answers.
        as_resp2: bool,
    },
    /// The client's `RESET`: the reply-side state starts over when it arrives.
    Reset,
    /// A proxy command that restores connection state the client counts on: `SELECT
    /// <--database>` after `RESET`, or, on the connection a multiplexed client is pinned to,
    /// the protocol and `CLIENT SETNAME` it set while shared (see `crate::mux`). Its reply is
    /// consumed; if a busy server refused it, it is sent again ahead of the client's next
    /// command (see `Core::restore_before`).
    Restore(Bytes),
    /// The client's `MONITOR`: on `+OK` the connection becomes a feed.
    Monitor,
    /// The client's `SYNC`/`PSYNC` (or a `MULTI` on a `MONITOR` feed): unless it is refused,
    /// the connection becomes opaque from this reply on.
    Sync,
    /// No reply comes (replies are off), but once every earlier reply is in, the connection
    /// becomes opaque: a `SYNC`, or an `EXEC` the proxy can't follow, sent with replies off.
    TurnOpaque,
    /// A client command sent with replies turned on by the proxy (they were off or skipped),
    /// so that the proxy sees the reply that confirms a state change: handled like the inner
    /// owner, but nothing reaches the client.
    Hidden(Box<Owner>),
    /// The client's `CLIENT TRACKING`: on `+OK`, whether it tracks for itself.
    Tracking(bool),
    /// The client's `CLUSTER SLOTS|SHARDS|NODES|REPLICAS` in cluster mode: the reply is held
    /// whole and its node addresses replaced by the local listeners'.
    Topology(crate::cluster::rewrite::Topology),
    /// A RESP2 client's `PING` while subscribed (the upstream speaks RESP3 then): the reply is
    /// rewritten into the `["pong", msg]` array a RESP2 subscriber expects.
    SubscribedPing,
    /// A (un)subscribe command whose confirmations come as push frames. `remaining` is the
    /// number still expected, or `None` for an argument-less unsubscribe (one per subscription
    /// held when it runs, at least one), resolved when its first confirmation arrives.
    Subscription {
        /// Which family.
        kind: SubKind,
        /// Subscribe (true) or unsubscribe (false).
        subscribe: bool,
        /// Confirmations still expected.
        remaining: Option<u64>,
    },
    /// A blocking command sent with a bounded timeout: a timed-out slice is re-issued (after
    /// re-authenticating) instead of being shown to the client.
    Blocking(Box<BlockingCall>),
}

/// How an owner constrains the relay while its reply is outstanding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A plain client reply or a local answer: nothing waits for it.
    Plain,
    /// Not plain: no `AUTH` is injected until it is in.
    Special,
    /// Its reply decides the connection's state: no client command is sent until it is in.
    Uncertain,
}

impl Owner {
    fn class(&self) -> Class {
        match self {
            Owner::Client | Owner::Local(_) | Owner::ClientBlocking => Class::Plain,
            Owner::ClientHello { .. }
            | Owner::Reset
            | Owner::Monitor
            | Owner::Sync
            | Owner::TurnOpaque => Class::Uncertain,
            // Leaving the RESP3 translation: later commands wait until the upstream is back.
            Owner::Proxy(ProxyCommand::Hello(2)) => Class::Uncertain,
            Owner::Exec(txn) if !txn.effects.is_empty() => Class::Uncertain,
            Owner::ExecElements { .. } => Class::Uncertain,
            Owner::Hidden(inner) => inner.class(),
            _ => Class::Special,
        }
    }

    fn blocks(&self) -> bool {
        match self {
            Owner::Blocking(_) | Owner::ClientBlocking => true,
            Owner::Hidden(inner) => inner.blocks(),
            _ => false,
        }
    }
}

/// The FIFO of reply owners, with runs of [`Owner::Client`] counted in one entry.
#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<(Owner, u64)>,
    replies: u64,
    special: usize,
    uncertain: usize,
    blocking: usize,
}

impl Pending {
    /// Expects one more reply owned by `owner`.
    pub fn push(&mut self, owner: Owner) {
        self.replies += 1;
        if let (Owner::Client, Some((Owner::Client, n))) = (&owner, self.queue.back_mut()) {
            *n += 1;
            return;
        }
        self.count(&owner, true);
        self.queue.push_back((owner, 1));
    }

    /// The owner of the next reply.
    pub fn head(&self) -> Option<&Owner> {
        self.queue.front().map(|(o, _)| o)
    }

    /// Mutable access to the owner of the next reply (to count down confirmations).
    pub fn head_mut(&mut self) -> Option<&mut Owner> {
        self.queue.front_mut().map(|(o, _)| o)
    }

    /// Expects one more reply owned by `owner` *before* all others (the rest of a reply
    /// whose start was already handled).
    pub fn push_front(&mut self, owner: Owner) {
        self.replies += 1;
        self.count(&owner, true);
        self.queue.push_front((owner, 1));
    }

    /// Removes and returns the owner of the next reply.
    pub fn pop(&mut self) -> Option<Owner> {
        let (_, n) = self.queue.front_mut()?;
        self.replies -= 1;
        if *n > 1 {
            // Only `Client` entries are ever counted above one (see `push`).
            *n -= 1;
            return Some(Owner::Client);
        }
        let (owner, _) = self.queue.pop_front()?;
        self.count(&owner, false);
        Some(owner)
    }

    fn count(&mut self, owner: &Owner, add: bool) {
        let class = owner.class();
        let step = |n: &mut usize| {
            if add { *n += 1 } else { *n -= 1 }
        };
        if class != Class::Plain {
            step(&mut self.special);
        }
        if class == Class::Uncertain {
            step(&mut self.uncertain);
        }
        if owner.blocks() {
            step(&mut self.blocking);
        }
    }

    /// No reply is outstanding.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Distinct entries held (what memory the queue uses); bounded by the relay.
    pub fn entries(&self) -> usize {
        self.queue.len()
    }

    /// Replies still expected.
    pub fn replies(&self) -> u64 {
        self.replies
    }

    /// Every outstanding reply is a plain client reply or a local answer.
    pub fn only_plain(&self) -> bool {
        self.special == 0
    }

    /// A reply that decides the connection's state is outstanding: later commands wait.
    pub fn awaits_confirmation(&self) -> bool {
        self.uncertain > 0
    }

    /// True while a blocking command's reply is outstanding. Redis keeps a connection blocked
    /// until its command returns; if the client has gone, the next element pushed to the key
    /// would be handed to nobody. So a session whose client leaves then closes its upstream
    /// connection at once, as Redis itself frees a client that closes: Redis unblocks it.
    pub fn holds_blocking(&self) -> bool {
        self.blocking > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_client_replies_share_one_entry() {
        let mut p = Pending::default();
        for _ in 0..10_000 {
            p.push(Owner::Client);
        }
        p.push(Owner::Proxy(ProxyCommand::Asking));
        p.push(Owner::Client);
        assert_eq!((p.entries(), p.replies()), (3, 10_002));
        assert!(!p.only_plain());
        for _ in 0..10_000 {
            assert!(matches!(p.pop(), Some(Owner::Client)));
        }
        assert!(matches!(p.pop(), Some(Owner::Proxy(ProxyCommand::Asking))));
        assert!(p.only_plain());
        assert!(matches!(p.pop(), Some(Owner::Client)));
        assert!(p.pop().is_none() && p.is_empty());
    }

    #[test]
    fn order_and_counts_are_kept_across_kinds() {
        let mut p = Pending::default();
        p.push(Owner::Client);
        p.push(Owner::Local(Bytes::from_static(b"+OK\r\n")));
        p.push(Owner::Reset);
        p.push(Owner::ClientBlocking);
        assert!(p.awaits_confirmation() && p.holds_blocking() && !p.only_plain());
        assert!(matches!(p.pop(), Some(Owner::Client)));
        assert!(matches!(p.pop(), Some(Owner::Local(_))));
        assert!(matches!(p.pop(), Some(Owner::Reset)));
        assert!(!p.awaits_confirmation() && p.only_plain() && p.holds_blocking());
        assert!(matches!(p.pop(), Some(Owner::ClientBlocking)));
        assert!(!p.holds_blocking());
    }

    #[test]
    fn an_exec_is_uncertain_only_when_it_runs_state_changes() {
        let mut p = Pending::default();
        p.push(Owner::Exec(Transaction::default()));
        assert!(!p.awaits_confirmation() && !p.only_plain());
        p.push(Owner::Exec(Transaction {
            queued: 1,
            effects: vec![super::super::state::Queued::Tracking(true)],
        }));
        assert!(p.awaits_confirmation());
    }
}
