//! One client while it is shared: its commands classified, batched onto its shared connection,
//! its replies put back in order — until it needs a connection of its own.
//!
//! [`ClientCore`] is sans-IO, like the 1:1 relay's core: bytes in, decisions out. Each complete
//! command is, in order:
//! * **shared**: consecutive shared commands of one read go to the shared connection as one
//!   [`Batch`] (their bytes, as the client sent them);
//! * **answered here** (the connect-time chatter, see [`ClientCore::chatter`]): its reply waits in
//!   the [`Expect`] queue behind the replies still owed, so the order holds;
//! * **pinning**: nothing after it is read; once every reply owed is delivered, the client is
//!   handed to the 1:1 relay with this command first in its input ([`Handoff`]);
//! * dropped, if Redis would ignore it (an empty line, `*0`).
//!
//! Malformed input gets Redis's own error after the replies owed, then the connection closes
//! (only this client's).

use super::conn::{Batch, Delivery, Mailbox};
use super::table::{CommandTable, Decision, PinReason};
use crate::relay::core::HIGH_WATER;
use crate::resp::{Args, Grammar, ProtocolError, Scanner};
use crate::secret::Secret;
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;

/// Commands in flight per client before its input is no longer read: bounds what one client
/// can queue on a shared connection.
const MAX_IN_FLIGHT: usize = 4096;
/// A command not complete within this many bytes is not shared (a shared connection takes
/// whole commands only): the client is pinned and the 1:1 relay streams it.
pub const MAX_SHARED_COMMAND: usize = 256 * 1024;
/// Client input read ahead at most.
const MAX_INPUT: usize = MAX_SHARED_COMMAND + 16 * 1024;

const OK: &[u8] = b"+OK\r\n";
const AUTH_ARITY: &[u8] = b"-ERR wrong number of arguments for 'auth' command\r\n";
const SYNTAX_ERROR: &[u8] = b"-ERR syntax error\r\n";
const BAD_NAME: &[u8] =
    b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n";
const NULL: &[u8] = b"$-1\r\n";
/// Why a client that does not read its replies is closed.
pub const OVERFLOW: &str = "it left more replies unread than the proxy holds for it (32 MiB, or 1 MiB once all shared clients together pass --multiplex-reply-mib)";

/// A reply the client is owed, in order.
#[derive(Debug)]
enum Expect {
    /// This many replies from the shared connection.
    Shared(u32),
    /// A reply made here.
    Local(Bytes),
}

/// What the client's task must do once [`ClientCore::process`] has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep relaying.
    Relay,
    /// Hand the client to the 1:1 relay once every reply owed is written.
    Pin(PinReason),
    /// Close once every reply owed is written (`QUIT`, malformed input).
    Close,
    /// Move to a shared connection of the other protocol (`HELLO 3` / `HELLO 2`) once every
    /// reply owed is written; its `HELLO` is then shared there.
    Switch(Protocol),
}

/// The protocol a shared connection (and so its clients) speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// RESP2, what a client speaks until it says `HELLO 3`.
    Resp2,
    /// RESP3.
    Resp3,
}

/// What the 1:1 relay needs to take over a client that was shared.
#[derive(Debug)]
pub struct Handoff {
    /// Input not yet handled, starting with the command that pinned.
    pub input: BytesMut,
    /// Commands that restore the connection state the client set while shared (its
    /// `CLIENT SETNAME`), run on the new connection before its input; their replies are the
    /// proxy's.
    pub setup: Vec<Bytes>,
    /// The client has given `--listen-password` (or none is set).
    pub authenticated: bool,
    /// The protocol the client speaks (its new connection is switched to it first).
    pub protocol: Protocol,
}

/// The sans-IO state of one shared client. See the module documentation.
pub struct ClientCore {
    id: u64,
    cin: BytesMut,
    requests: Scanner,
    expects: VecDeque<Expect>,
    in_flight: usize,
    to_client: BytesMut,
    table: Arc<CommandTable>,
    database: Bytes,
    listen_password: Option<Secret>,
    authenticated: bool,
    /// The name given with `CLIENT SETNAME`, answered by `CLIENT GETNAME`.
    name: Option<Bytes>,
    /// `CLIENT SETINFO` commands, replayed on a pinned connection.
    setinfo: Vec<Bytes>,
    protocol: Protocol,
    next: Next,
}

impl ClientCore {
    /// A client that has sent nothing yet.
    pub fn new(
        id: u64,
        table: Arc<CommandTable>,
        database: u32,
        listen_password: Option<Secret>,
    ) -> Self {
        let authenticated = listen_password.is_none();
        let mut requests = Scanner::new(Grammar::Request);
        requests.set_unauthenticated(!authenticated);
        ClientCore {
            id,
            cin: BytesMut::new(),
            requests,
            expects: VecDeque::new(),
            in_flight: 0,
            to_client: BytesMut::new(),
            table,
            database: Bytes::from(database.to_string()),
            listen_password,
            authenticated,
            name: None,
            setinfo: Vec::new(),
            protocol: Protocol::Resp2,
            next: Next::Relay,
        }
    }

    /// Where the client's bytes are read into.
    pub fn client_input(&mut self) -> &mut BytesMut {
        &mut self.cin
    }

    /// What is to be written to the client.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.to_client
    }

    /// Whether to read more from the client.
    pub fn wants_input(&self) -> bool {
        self.next == Next::Relay
            && self.cin.len() < MAX_INPUT
            && self.in_flight < MAX_IN_FLIGHT
            && self.to_client.len() < HIGH_WATER
    }

    /// Whether to take more deliveries (the client is reading what it was given).
    pub fn wants_deliveries(&self) -> bool {
        self.to_client.len() < HIGH_WATER
    }

    /// Nothing is owed to the client any more (every reply it is owed has been delivered and
    /// written).
    pub fn idle(&self) -> bool {
        self.expects.is_empty() && self.to_client.is_empty()
    }

    /// What the task must do next.
    pub fn next(&self) -> Next {
        self.next
    }

    /// The client is now on a shared connection that speaks `protocol` (after
    /// [`Next::Switch`]).
    pub fn switched(&mut self, protocol: Protocol) {
        self.protocol = protocol;
        self.next = Next::Relay;
    }

    /// Handles the complete commands in the input; `send` takes each batch for the shared
    /// connection.
    pub fn process(&mut self, mailbox: &Arc<Mailbox>, mut send: impl FnMut(Batch)) {
        // Shared commands gathered so far: the first `run` bytes of `cin`, `count` commands.
        let mut run = 0usize;
        let mut count = 0u32;
        while self.next == Next::Relay && self.in_flight + (count as usize) < MAX_IN_FLIGHT {
            let scanned = self.requests.scan(&self.cin[run..]);
            let frame = match scanned {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    // Too large to share, by what arrived or by what an argument declares (the
                    // 1:1 relay judges a declared length as Redis does, at once).
                    if self.cin.len() - run > MAX_SHARED_COMMAND
                        || self.requests.bulk_pending() > MAX_SHARED_COMMAND as u64
                    {
                        self.flush(&mut run, &mut count, mailbox, &mut send);
                        self.next = Next::Pin(PinReason::LargeCommand);
                    }
                    break;
                }
                Err(e) => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.protocol_error(&e);
                    break;
                }
            };
            let decision = self.classify(&self.cin[run..run + frame.len], frame.kind);
            match decision {
                Step::Share => {
                    run += frame.len;
                    count += 1;
                    continue;
                }
                Step::Pin(reason) => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.next = Next::Pin(reason);
                    break;
                }
                Step::Switch(protocol) => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.next = Next::Switch(protocol);
                    break;
                }
                Step::Drop => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.cin.advance(frame.len);
                }
                Step::Local(reply) => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.cin.advance(frame.len);
                    self.local(reply);
                }
                Step::SetName(name) => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.cin.advance(frame.len);
                    self.name = (!name.is_empty()).then_some(name);
                    self.local(Bytes::from_static(OK));
                }
                Step::SetInfo => {
                    // Shared, and kept to run again on a pinned connection.
                    self.setinfo
                        .push(Bytes::copy_from_slice(&self.cin[run..run + frame.len]));
                    run += frame.len;
                    count += 1;
                }
                Step::Authenticated => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.cin.advance(frame.len);
                    self.authenticated = true;
                    self.requests.set_unauthenticated(false);
                    self.local(Bytes::from_static(OK));
                }
                Step::Quit => {
                    self.flush(&mut run, &mut count, mailbox, &mut send);
                    self.cin.advance(frame.len);
                    self.local(Bytes::from_static(OK));
                    self.next = Next::Close;
                }
            }
        }
        self.flush(&mut run, &mut count, mailbox, &mut send);
    }

    /// Sends the gathered shared commands as one batch.
    fn flush(
        &mut self,
        run: &mut usize,
        count: &mut u32,
        mailbox: &Arc<Mailbox>,
        send: &mut impl FnMut(Batch),
    ) {
        if *count == 0 {
            return;
        }
        let bytes = self.cin.split_to(*run).freeze();
        send(Batch {
            mailbox: mailbox.clone(),
            bytes,
            count: *count,
        });
        match self.expects.back_mut() {
            Some(Expect::Shared(n)) => *n += *count,
            _ => self.expects.push_back(Expect::Shared(*count)),
        }
        self.in_flight += *count as usize;
        *run = 0;
        *count = 0;
    }

    /// A reply made here, after those owed.
    fn local(&mut self, reply: Bytes) {
        if self.expects.is_empty() {
            self.to_client.extend_from_slice(&reply);
        } else {
            self.expects.push_back(Expect::Local(reply));
        }
    }

    /// Malformed input: Redis's error after the replies owed, then the connection closes.
    fn protocol_error(&mut self, e: &ProtocolError) {
        tracing::debug!(conn = self.id, error = %e, "client protocol error");
        self.local(e.reply());
        self.cin.clear();
        self.next = Next::Close;
    }

    /// Takes what a shared connection delivered. `Err` when the client must be closed.
    pub fn delivered(&mut self, delivery: Delivery, mailbox: &Mailbox) -> Result<(), &'static str> {
        let (complete, bytes) = match delivery {
            Delivery::Replies { bytes, complete } => {
                mailbox.taken(bytes.len());
                self.to_client.extend_from_slice(&bytes);
                (complete, None)
            }
            Delivery::Failed { count, error } => (count, Some(error)),
            Delivery::Broken => return Err("its shared connection broke in the middle of a reply"),
        };
        let mut left = complete;
        while left > 0 {
            let Some(Expect::Shared(n)) = self.expects.front_mut() else {
                return Err("a shared connection delivered a reply this client was not owed");
            };
            let take = left.min(*n);
            if let Some(error) = &bytes {
                for _ in 0..take {
                    self.to_client.extend_from_slice(error);
                }
            }
            *n -= take;
            left -= take;
            self.in_flight -= take as usize;
            if *n == 0 {
                self.expects.pop_front();
                while let Some(Expect::Local(_)) = self.expects.front() {
                    if let Some(Expect::Local(reply)) = self.expects.pop_front() {
                        self.to_client.extend_from_slice(&reply);
                    }
                }
            }
        }
        Ok(())
    }

    /// The client's state for the 1:1 relay (once [`ClientCore::idle`]).
    pub fn handoff(self) -> Handoff {
        let mut setup = self.setinfo;
        if let Some(name) = &self.name {
            setup.push(crate::resp::encode_command(&[b"CLIENT", b"SETNAME", name]));
        }
        Handoff {
            input: self.cin,
            setup,
            authenticated: self.authenticated,
            protocol: self.protocol,
        }
    }

    /// What one complete command is (see the module documentation).
    fn classify(&self, frame: &[u8], kind: u8) -> Step {
        if kind == b'i' {
            let blank = frame.iter().all(|b| b.is_ascii_whitespace());
            return if blank {
                Step::Drop
            } else {
                Step::Pin(PinReason::Inline)
            };
        }
        let mut args = Args::new(frame);
        let argc = args.argc();
        let Some(name) = args.next() else {
            return Step::Drop; // `*0`, `*-1`: Redis ignores them
        };
        if !self.authenticated {
            return match self.check_auth(name, argc, args.last()) {
                Some(step) => step,
                None => Step::Pin(PinReason::Unauthenticated),
            };
        }
        if let Some(step) = self.chatter(name, argc, args.clone()) {
            return step;
        }
        match self.table.decide_lazy(name, || args.next()) {
            Decision::Share => Step::Share,
            Decision::Pin(reason) => Step::Pin(reason),
        }
    }

    /// `AUTH` before the listen password was given: the right password is answered here; a
    /// wrong one, or anything else, goes to the 1:1 relay (which answers, throttles and counts
    /// it without opening an upstream connection).
    fn check_auth(&self, name: &[u8], argc: usize, last: Option<&[u8]>) -> Option<Step> {
        if !name.eq_ignore_ascii_case(b"auth") || !(2..=3).contains(&argc) {
            return None;
        }
        let expected = self.listen_password.as_ref()?;
        let given = last?;
        crate::secret::same_secret(given, expected).then_some(Step::Authenticated)
    }

    /// The connect-time chatter real clients send on every connection, answered here so that
    /// it does not pin every client:
    /// * `AUTH` (the proxy answers it in 1:1 mode too): `+OK`, or the listen password checked;
    /// * `SELECT <--database>`: `+OK` (the shared connections are in that database);
    /// * `CLIENT SETNAME`: kept here (and given to a pinned connection), `CLIENT GETNAME` answers
    ///   it; `CLIENT SETINFO` is shared (the server answers it; on Redis 7.0 with its
    ///   unknown-subcommand error) and kept for a pinned connection too;
    /// * `HELLO`, and `HELLO 2|3` in the protocol the client speaks: shared; `HELLO 3` from a
    ///   RESP2 client (or `HELLO 2` from a RESP3 one) moves it to a shared connection of that
    ///   protocol, where that `HELLO` is shared;
    /// * `QUIT`: `+OK`, then the connection closes.
    ///
    /// `PING` and `ECHO` need nothing special: they are on the allow-list.
    /// `args` are the arguments after the name.
    fn chatter(&self, name: &[u8], argc: usize, mut args: Args<'_>) -> Option<Step> {
        if name.eq_ignore_ascii_case(b"auth") {
            return Some(match argc {
                0 | 1 => Step::Local(Bytes::from_static(AUTH_ARITY)),
                2 | 3 => match (&self.listen_password, args.last()) {
                    (None, _) => Step::Local(Bytes::from_static(OK)),
                    (Some(expected), Some(given))
                        if crate::secret::same_secret(given, expected) =>
                    {
                        Step::Local(Bytes::from_static(OK))
                    }
                    _ => Step::Pin(PinReason::Unauthenticated),
                },
                _ => Step::Local(Bytes::from_static(SYNTAX_ERROR)),
            });
        }
        if name.eq_ignore_ascii_case(b"select") {
            return Some(match (argc, args.next()) {
                (2, Some(db)) if db == &self.database[..] => Step::Local(Bytes::from_static(OK)),
                _ => Step::Pin(PinReason::Select),
            });
        }
        if name.eq_ignore_ascii_case(b"quit") {
            return Some(Step::Quit);
        }
        if name.eq_ignore_ascii_case(b"hello") {
            let want = match (argc, args.next()) {
                (1, _) => return Some(Step::Share),
                (2, Some(b"2")) => Protocol::Resp2,
                (2, Some(b"3")) => Protocol::Resp3,
                _ => return Some(Step::Pin(PinReason::Hello)),
            };
            return Some(if want == self.protocol {
                Step::Share
            } else {
                Step::Switch(want)
            });
        }
        if name.eq_ignore_ascii_case(b"client") {
            let sub = args.next()?;
            if sub.eq_ignore_ascii_case(b"setname") && argc == 3 {
                let value = args.next()?;
                // Redis's rule (`clientSetName`): printable ASCII without spaces.
                return Some(if value.iter().all(|b| (b'!'..=b'~').contains(b)) {
                    Step::SetName(Bytes::copy_from_slice(value))
                } else {
                    Step::Local(Bytes::from_static(BAD_NAME))
                });
            }
            if sub.eq_ignore_ascii_case(b"getname") && argc == 2 {
                return Some(Step::Local(match &self.name {
                    None if self.protocol == Protocol::Resp3 => Bytes::from_static(b"_\r\n"),
                    None => Bytes::from_static(NULL),
                    Some(name) => {
                        let mut reply = BytesMut::with_capacity(name.len() + 16);
                        reply.extend_from_slice(format!("${}\r\n", name.len()).as_bytes());
                        reply.extend_from_slice(name);
                        reply.extend_from_slice(b"\r\n");
                        reply.freeze()
                    }
                }));
            }
            if sub.eq_ignore_ascii_case(b"setinfo") {
                return Some(Step::SetInfo);
            }
            return Some(Step::Pin(PinReason::Client));
        }
        None
    }
}

/// What one complete command is.
#[derive(Debug)]
enum Step {
    Share,
    Pin(PinReason),
    Switch(Protocol),
    Drop,
    Local(Bytes),
    SetName(Bytes),
    SetInfo,
    Authenticated,
    Quit,
}

#[cfg(test)]
mod tests;
