//! What the proxy knows about the server side of one connection, and **the one place that
//! decides when an `AUTH` may be injected**: [`ConnState::safe_point`].
//!
//! Redis keeps a handful of facts per connection that change how it treats the *next* command
//! the proxy sends. They are independent in Redis (a RESP3 subscriber may open a transaction
//! with its replies off), so they are independent here, each an enum of its own:
//!
//! * [`Mode`]: what the connection is doing — running commands one by one, queueing a
//!   transaction, blocked in a sliced blocking command, feeding `MONITOR`, relayed as opaque
//!   bytes (after `SYNC`), or closing;
//! * [`Replies`]: `CLIENT REPLY ON | OFF | SKIP`;
//! * [`Framing`]: which protocol the client speaks and which one the upstream speaks (a RESP2
//!   subscriber's upstream is switched to RESP3 so that it can still be re-authenticated);
//! * [`Subscriptions`]: how many channels, patterns and shard channels the connection holds
//!   (what Redis's own confirmations say).
//!
//! Transitions happen when they are certain. The request side applies the ones that are
//! certain once the command is sent (`MULTI`, `EXEC`, `CLIENT REPLY …`); a command whose outcome
//! only the server's reply can tell (`HELLO`, `MONITOR`, `RESET`, `SYNC`, an `EXEC` that runs
//! state-changing commands) is an *uncertain* change: it is recorded in the reply FIFO
//! ([`super::pending`]), applied when its reply arrives, and every later client command waits
//! until then, so the two sides never disagree.
//!
//! # When an `AUTH` may be injected
//!
//! [`ConnState::safe_point`] is the only function that says yes. An injected `AUTH` is safe when
//! all of these hold; each line is one condition in the code:
//!
//! 1. **Authentication is needed**: the proxy authenticates upstream at all, a newer credential
//!    than the connection's exists, no injected `AUTH` is awaiting its reply, and a failed one
//!    is not waiting out its backoff. (Checked by the caller, [`super::core`].)
//! 2. **The upstream is open**, not still being opened (a client that has not given
//!    `--listen-password` has no upstream yet; one that lost it to `RESET` keeps its upstream,
//!    which must stay authenticated).
//! 3. **The mode allows it**: [`Mode::Normal`] or [`Mode::Monitor`]. Never inside a transaction
//!    (the `AUTH` would be queued and its reply would land in the client's `EXEC` array), never
//!    while a blocking command is sliced (the `AUTH` goes in *between* slices instead, see
//!    [`super::blocking`]), never on an opaque relay (after `SYNC`/`PSYNC`), never once the
//!    connection is closing (`QUIT`).
//! 4. **No client command is half forwarded**: the `AUTH` must land between two commands.
//! 5. **Nothing but plain replies is outstanding**: every reply still expected belongs to a
//!    plain client command (or is a reply the proxy made up). So no mode change awaits its
//!    confirmation, no subscription count is unresolved, and no proxy command is in flight; the
//!    state the `AUTH` will run in is exactly the state known now.
//!
//! How it is injected depends on the state, not whether: with replies off, the `AUTH` is sent
//! as it is and no reply is awaited, since Redis sends none (see `inject_auth` in
//! [`super::core`] for why it is not wrapped in `CLIENT REPLY ON` … `OFF`); with a skip
//! pending, it is wrapped in `CLIENT REPLY ON` … `CLIENT REPLY SKIP` (both replies consumed),
//! so that the client's next command is still the skipped one (waiting for that command
//! instead would leave an idle connection unauthenticated until Azure closes it); after
//! `ASKING` the proxy sends `ASKING` again so that the client's next command still gets it
//! ([`Injection`]). A RESP2 subscriber can be re-authenticated because its upstream speaks
//! RESP3, where `AUTH` is allowed while subscribed ([`Framing::Resp2OverResp3`]).
//!
//! # Shared connections (`--multiplex`)
//!
//! The other place an `AUTH` is injected is a shared connection of the multiplexer
//! (`crate::mux::conn`). Only commands of the allow-list run there (`crate::mux::table`): none
//! creates connection state, so conditions 3 and 5 hold by construction (no transaction, no
//! blocking command, no subscription, no reply-mode or protocol change ever reaches a shared
//! connection; a client that needs one is first moved to a connection of its own, where this
//! file's rules apply). Condition 4 holds because clients hand a shared connection whole
//! commands only. What remains is condition 1, checked there: a newer credential than the
//! connection's, and no `AUTH` of its own in flight.

use crate::credential::AuthCredential;
use std::sync::Arc;

/// What the connection is doing, as far as the next command the proxy sends is concerned.
#[derive(Debug)]
pub enum Mode {
    /// Commands run one at a time (also a RESP3 subscriber, which may run anything).
    Normal,
    /// Between `MULTI` and `EXEC`/`DISCARD`: commands are queued, and the effects of the
    /// state-changing ones happen when `EXEC` runs them.
    Transaction(Transaction),
    /// A blocking command is forwarded in slices; later client commands wait for its final
    /// reply (so they still run after it).
    Blocked,
    /// `MONITOR` succeeded: feed lines arrive between the replies.
    Monitor,
    /// Bytes are relayed as they are, both ways, and never inspected again: after
    /// `SYNC`/`PSYNC` (an RDB payload and a replication stream follow), or a transaction that
    /// subscribes inside `EXEC` (Redis's reply then has more elements than it announces). No `AUTH` is injected any more.
    Opaque,
    /// `QUIT` was sent (Redis ignores what follows and closes), or the client's input ended.
    Closing,
}

/// A transaction being queued: how many commands, and the state changes among them.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Commands queued so far (`EXEC`'s array has one element per command, when it runs).
    pub queued: u64,
    /// The state-changing ones, in order.
    pub effects: Vec<Queued>,
}

impl Transaction {
    /// What `EXEC` leaves of its `n`-element array and of the reply mode, given the
    /// `CLIENT REPLY` commands it runs (replies being on when it starts): Redis writes no element
    /// for `CLIENT REPLY OFF` or `SKIP`, none at all after `OFF` (until an `ON`), and a `SKIP`
    /// applies to the command after `EXEC`. Returns (elements written, reply mode after).
    pub fn exec_outcome(&self, n: u64) -> (u64, Replies) {
        let mut modes = self.effects.iter().filter_map(|e| match e {
            Queued::Replies { at, mode } => Some((*at, *mode)),
            _ => None,
        });
        let mut next = modes.next();
        let (mut off, mut skip_next, mut written) = (false, false, 0u64);
        for i in 0..n {
            match next {
                Some((at, mode)) if at == i => {
                    match mode {
                        Replies::On => {
                            off = false;
                            written += 1;
                        }
                        Replies::Off => off = true,
                        Replies::Skip => skip_next |= !off,
                    }
                    next = modes.next();
                }
                _ => written += u64::from(!off),
            }
        }
        let after = if off {
            Replies::Off
        } else if skip_next {
            Replies::Skip
        } else {
            Replies::On
        };
        (written, after)
    }

    /// It runs `CLIENT REPLY` commands (see [`Transaction::exec_outcome`]).
    pub fn changes_replies(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, Queued::Replies { .. }))
    }
}

/// A state change queued inside a transaction: it takes effect when `EXEC` runs it.
#[derive(Debug)]
pub enum Queued {
    /// `CLIENT REPLY ON|OFF|SKIP`, the `at`-th command queued.
    Replies {
        /// Its position in the transaction.
        at: u64,
        /// The mode it sets.
        mode: Replies,
    },
    /// `HELLO <proto>`, with the credential the proxy put in its `AUTH` pair (if any).
    Hello {
        /// The protocol asked for, if any.
        proto: Option<u8>,
        /// The proxy's credential, when the client's `HELLO` carried `AUTH`.
        credential: Option<Arc<AuthCredential>>,
    },
    /// The client's `AUTH`, sent as the proxy's own credential.
    Auth(Arc<AuthCredential>),
    /// `CLIENT TRACKING`: whether the connection tracks keys for itself (no `REDIRECT`).
    Tracking(bool),
    /// Something after which the proxy can't follow the replies, so the connection turns
    /// opaque: a subscription (Redis writes one confirmation per channel into `EXEC`'s array,
    /// more elements than it announced, and the counts are then unknown).
    Opaque,
}

/// `CLIENT REPLY` as the server applies it to the next command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// Every command is answered.
    On,
    /// No command is answered (push messages still are, since Redis 7.0).
    Off,
    /// The next command's reply is suppressed, then replies are on again.
    Skip,
}

/// The protocol each side of the relay speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Client and upstream speak RESP2.
    Resp2,
    /// Client and upstream speak RESP3: replies and pushes pass as they are.
    Resp3,
    /// A RESP2 client whose upstream the proxy switched to RESP3 (to subscribe, or because a
    /// RESP3 subscriber asked for RESP2): pushes are rewritten into RESP2 arrays, the
    /// subscribed-mode `PING` reply is rewritten, and RESP2's subscribed-mode command rules are
    /// enforced by the proxy.
    Resp2OverResp3,
}

impl Framing {
    /// The client speaks RESP2 (whatever the upstream speaks).
    pub fn client_is_resp2(self) -> bool {
        matches!(self, Framing::Resp2 | Framing::Resp2OverResp3)
    }
}

/// Subscriptions held, per family, as Redis's confirmations report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// `SUBSCRIBE` channels.
    pub channels: u64,
    /// `PSUBSCRIBE` patterns.
    pub patterns: u64,
    /// `SSUBSCRIBE` shard channels.
    pub shards: u64,
}

impl Subscriptions {
    /// In subscribed mode (RESP2 restricts the commands then).
    pub fn any(&self) -> bool {
        self.channels + self.patterns + self.shards > 0
    }
}

/// Everything [`ConnState::safe_point`] needs to know that is not connection state: the
/// session's progress and the reply FIFO.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The upstream is open.
    pub relaying: bool,
    /// Part of a client command has been forwarded; the rest is still arriving.
    pub mid_command: bool,
    /// Every expected reply belongs to a plain client command or is the proxy's own answer.
    pub only_plain_replies: bool,
}

/// How an `AUTH` (or any proxy command) must be wrapped so that the client sees nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// Replies are off or skipped: `CLIENT REPLY ON` first, and this mode restored after.
    pub restore_replies: Option<Replies>,
    /// `ASKING` preceded: send it again after, for the client's next command.
    pub restore_asking: bool,
}

/// The server-side state of one connection, as the proxy knows it.
#[derive(Debug)]
pub struct ConnState {
    /// See [`Mode`].
    pub mode: Mode,
    /// See [`Replies`].
    pub replies: Replies,
    /// See [`Framing`].
    pub framing: Framing,
    /// See [`Subscriptions`].
    pub subs: Subscriptions,
    /// The client's last command was `ASKING`, which binds to its next command: nothing the
    /// proxy sends may come in between without sending `ASKING` again.
    pub asking: bool,
    /// `CLIENT TRACKING` is on without `REDIRECT`: the connection's invalidations are its own.
    /// Redis can't deliver those to a RESP2 client, so while a RESP2 client's upstream speaks
    /// RESP3 the proxy drops them.
    pub self_tracking: bool,
}

impl Default for ConnState {
    fn default() -> Self {
        ConnState {
            mode: Mode::Normal,
            replies: Replies::On,
            framing: Framing::Resp2,
            subs: Subscriptions::default(),
            asking: false,
            self_tracking: false,
        }
    }
}

impl ConnState {
    /// Whether an `AUTH` may be injected now, and how (see the module documentation for each
    /// condition). Condition 1 (a newer credential, none in flight) is the caller's.
    pub fn safe_point(&self, progress: Progress) -> Option<Injection> {
        // 2. The upstream is open and the client authenticated.
        if !progress.relaying {
            return None;
        }
        // 3. Only between commands that run one by one (or on a MONITOR feed).
        if !matches!(self.mode, Mode::Normal | Mode::Monitor) {
            return None;
        }
        // 4. Between two commands, never inside one.
        if progress.mid_command {
            return None;
        }
        // 5. The state the AUTH runs in is the state known now.
        if !progress.only_plain_replies {
            return None;
        }
        Some(self.injection())
    }

    /// How a proxy command must be wrapped in the current state (also used for the proxy's
    /// `HELLO` switches, which are not re-authentications but must be invisible all the same).
    pub fn injection(&self) -> Injection {
        Injection {
            restore_replies: (self.replies != Replies::On).then_some(self.replies),
            restore_asking: self.asking,
        }
    }

    /// What `RESET` leaves behind on the request side (the reply side resets the framing and
    /// subscriptions when the `RESET` reply arrives). A `MONITOR` feed is the exception: lines
    /// of commands that ran before `RESET` still come ahead of its `+RESET`, so the feed ends
    /// with that reply, not now.
    pub fn reset_requests(&mut self) {
        if !matches!(self.mode, Mode::Monitor) {
            self.mode = Mode::Normal;
        }
        self.replies = Replies::On;
        self.asking = false;
        self.self_tracking = false;
    }

    /// Whether a new subscription or a protocol switch must be routed through the proxy's
    /// RESP3 translation: a RESP2 client whose upstream still speaks RESP2.
    pub fn needs_translation_to_subscribe(&self) -> bool {
        self.framing == Framing::Resp2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Progress {
        Progress {
            relaying: true,
            mid_command: false,
            only_plain_replies: true,
        }
    }

    #[test]
    fn every_condition_can_refuse() {
        let mut s = ConnState::default();
        assert!(s.safe_point(progress()).is_some());
        for p in [
            Progress {
                relaying: false,
                ..progress()
            },
            Progress {
                mid_command: true,
                ..progress()
            },
            Progress {
                only_plain_replies: false,
                ..progress()
            },
        ] {
            assert!(s.safe_point(p).is_none(), "{p:?}");
        }
        for mode in [
            Mode::Transaction(Transaction::default()),
            Mode::Blocked,
            Mode::Opaque,
            Mode::Closing,
        ] {
            s.mode = mode;
            assert!(s.safe_point(progress()).is_none(), "{:?}", s.mode);
        }
        s.mode = Mode::Monitor;
        assert!(s.safe_point(progress()).is_some());
    }

    #[test]
    fn exec_outcome_follows_redis() {
        let txn = |modes: &[(u64, Replies)]| Transaction {
            queued: 0,
            effects: modes
                .iter()
                .map(|&(at, mode)| Queued::Replies { at, mode })
                .collect(),
        };
        assert_eq!(txn(&[]).exec_outcome(3), (3, Replies::On));
        // SKIP writes nothing and skips the command after EXEC; ON doesn't cancel it.
        assert_eq!(
            txn(&[(1, Replies::Skip)]).exec_outcome(2),
            (1, Replies::Skip)
        );
        assert_eq!(
            txn(&[(0, Replies::Skip), (1, Replies::On)]).exec_outcome(2),
            (1, Replies::Skip)
        );
        // OFF silences the rest, until ON.
        assert_eq!(txn(&[(1, Replies::Off)]).exec_outcome(4), (1, Replies::Off));
        assert_eq!(
            txn(&[(1, Replies::Off), (3, Replies::On)]).exec_outcome(5),
            (3, Replies::On)
        );
    }

    #[test]
    fn replies_off_skip_and_asking_change_how_not_whether() {
        let mut s = ConnState {
            replies: Replies::Off,
            ..ConnState::default()
        };
        assert_eq!(
            s.safe_point(progress()),
            Some(Injection {
                restore_replies: Some(Replies::Off),
                restore_asking: false
            })
        );
        s.replies = Replies::Skip;
        s.asking = true;
        assert_eq!(
            s.safe_point(progress()),
            Some(Injection {
                restore_replies: Some(Replies::Skip),
                restore_asking: true
            })
        );
    }
}
