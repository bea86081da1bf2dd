//! Who owns each reply the upstream will send.
//!
//! Redis answers commands strictly in order, so the relay keeps a FIFO with one entry per
//! expected reply: the client's (forwarded), the proxy's own (an injected `AUTH`, consumed), or a
//! reply the proxy makes up itself (answered locally, but emitted in order). Runs of ordinary
//! client commands are stored as one counted entry, so a pipeline of thousands of commands costs
//! one slot and no allocation.

use super::blocking::BlockingCall;
use crate::credential::AuthCredential;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::Arc;

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

/// The owner of one expected reply.
#[derive(Debug)]
pub enum Owner {
    /// The client's command: its reply is forwarded as it is.
    Client,
    /// A reply made by the proxy (e.g. `+OK` to a client `AUTH`), emitted in order.
    Local(Bytes),
    /// An `AUTH` injected by the proxy: its reply is consumed. `required` is set after `RESET`
    /// and at connect, where a failure leaves the connection unauthenticated.
    Auth {
        /// The credential sent; it becomes the connection's credential on `+OK`.
        credential: Arc<AuthCredential>,
        /// Failure closes the client connection (nothing else authenticates it).
        required: bool,
        /// When it was queued (for `redis_proxy_reauth_seconds`).
        sent: std::time::Instant,
    },
    /// `SELECT <db>` sent by the proxy after `RESET`: consumed.
    Select,
    /// `CLIENT REPLY ON` sent to authenticate a connection whose replies are off: consumed.
    ReplyOn,
    /// `HELLO <proto>` sent by the proxy to switch the upstream protocol: consumed.
    Hello(u8),
    /// The client's `HELLO`, with its `AUTH` pair replaced by the proxy's credential.
    ClientHello {
        /// The protocol asked for, if any.
        proto: Option<u8>,
        /// The credential put in its place, if the client sent `AUTH`.
        credential: Option<Arc<AuthCredential>>,
    },
    /// The client's `RESET`: forwarded; the reply-side state starts over.
    ClientReset,
    /// The client's `MONITOR`: forwarded; the connection then becomes a feed.
    ClientMonitor,
    /// A RESP2 client's `PING` while subscribed (the upstream speaks RESP3 then): the reply is
    /// rewritten into the `["pong", msg]` array a RESP2 subscriber expects.
    SubscribedPing,
    /// A (un)subscribe command whose confirmations come as push frames. `remaining` is the number
    /// still expected, or `None` for an argument-less unsubscribe (one per subscription held
    /// when it runs, at least one), which is resolved when its first confirmation arrives.
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
    /// The reply to a blocking command relayed as it is (not sliced: an access key, or a form
    /// the proxy doesn't slice). The client's; while it is outstanding, a client that leaves
    /// ends the session at once (see [`Pending::holds_blocking`]).
    ClientBlocking,
}

/// The FIFO of reply owners, with runs of [`Owner::Client`] counted in one entry.
#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<(Owner, u64)>,
    replies: u64,
}

impl Pending {
    /// Expects one more reply owned by `owner`.
    pub fn push(&mut self, owner: Owner) {
        self.replies += 1;
        if let (Owner::Client, Some((Owner::Client, n))) = (&owner, self.queue.back_mut()) {
            *n += 1;
            return;
        }
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

    /// Removes and returns the owner of the next reply.
    pub fn pop(&mut self) -> Option<Owner> {
        let (owner, n) = self.queue.front_mut()?;
        self.replies -= 1;
        if *n > 1 {
            // Only `Client` entries are ever counted above one (see `push`).
            debug_assert!(matches!(owner, Owner::Client));
            *n -= 1;
            return Some(Owner::Client);
        }
        self.queue.pop_front().map(|(o, _)| o)
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

    /// The newest injected `AUTH` still waiting for its reply, if any.
    /// True while a blocking command's reply is outstanding. Redis keeps a connection blocked
    /// until its command returns; if the client has gone, the next element pushed to the key
    /// would be handed to nobody. So a session whose client leaves then closes its upstream
    /// connection at once, as Redis itself frees a client that closes: Redis unblocks it.
    pub fn holds_blocking(&self) -> bool {
        self.queue
            .iter()
            .any(|(o, _)| matches!(o, Owner::Blocking(_) | Owner::ClientBlocking))
    }

    pub fn any_auth(&self) -> Option<&Owner> {
        self.queue
            .iter()
            .rev()
            .map(|(o, _)| o)
            .find(|o| matches!(o, Owner::Auth { .. }))
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
        p.push(Owner::Select);
        p.push(Owner::Client);
        assert_eq!((p.entries(), p.replies()), (3, 10_002));
        for _ in 0..10_000 {
            assert!(matches!(p.pop(), Some(Owner::Client)));
        }
        assert!(matches!(p.pop(), Some(Owner::Select)));
        assert!(matches!(p.pop(), Some(Owner::Client)));
        assert!(p.pop().is_none() && p.is_empty());
    }

    #[test]
    fn order_is_kept_across_kinds() {
        let mut p = Pending::default();
        p.push(Owner::Client);
        p.push(Owner::Local(Bytes::from_static(b"+OK\r\n")));
        p.push(Owner::Client);
        assert!(matches!(p.pop(), Some(Owner::Client)));
        assert!(matches!(p.pop(), Some(Owner::Local(_))));
        assert!(matches!(p.head(), Some(Owner::Client)));
    }
}
