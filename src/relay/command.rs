//! The handful of commands the relay must recognise.
//!
//! Almost every command is relayed without a look at its arguments. These are the exceptions:
//! they change connection state that decides whether an injected `AUTH` is safe, they carry
//! credentials the proxy replaces, or their reply has a shape the proxy must know. The name is
//! compared without allocating.

use super::pending::SubKind;
use super::state::Replies;

/// What the relay needs to know about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Anything else: relayed untouched.
    Other,
    /// `AUTH`: answered by the proxy, never forwarded.
    Auth,
    /// `HELLO`: forwarded with its `AUTH` pair replaced.
    Hello,
    /// `RESET`: forwarded, then the connection is authenticated again.
    Reset,
    /// `MULTI`: no injection until `EXEC`/`DISCARD`.
    Multi,
    /// `EXEC`: the transaction runs (and its queued state changes take effect).
    Exec,
    /// `DISCARD`: the transaction is dropped.
    Discard,
    /// `CLIENT`: `REPLY` and `TRACKING` matter (see [`ClientSub`]).
    Client,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`.
    Subscribe(SubKind),
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`.
    Unsubscribe(SubKind),
    /// `PING`: its reply differs in RESP2 subscribed mode.
    Ping,
    /// `QUIT`: Redis answers, ignores what follows, and closes.
    Quit,
    /// `MONITOR`: the connection becomes a feed.
    Monitor,
    /// A command that may block (`BLPOP`, `XREAD … BLOCK`, `WAIT`, …): see `blocking`.
    Blocking,
    /// `SYNC` / `PSYNC`: an RDB payload and a replication stream follow; the connection
    /// becomes opaque.
    Sync,
    /// `ASKING`: binds to the next command.
    Asking,
    /// `SELECT`, `WATCH`, `READONLY`, `READWRITE`: relayed untouched, but they leave state on
    /// the connection that the next client must not inherit (see the warm pool).
    Stateful,
}

impl Command {
    /// Classifies a command name (case-insensitive).
    pub fn classify(name: &[u8]) -> Command {
        const TABLE: &[(&[u8], Command)] = &[
            (b"AUTH", Command::Auth),
            (b"HELLO", Command::Hello),
            (b"RESET", Command::Reset),
            (b"MULTI", Command::Multi),
            (b"EXEC", Command::Exec),
            (b"DISCARD", Command::Discard),
            (b"CLIENT", Command::Client),
            (b"SUBSCRIBE", Command::Subscribe(SubKind::Channel)),
            (b"PSUBSCRIBE", Command::Subscribe(SubKind::Pattern)),
            (b"SSUBSCRIBE", Command::Subscribe(SubKind::Shard)),
            (b"UNSUBSCRIBE", Command::Unsubscribe(SubKind::Channel)),
            (b"PUNSUBSCRIBE", Command::Unsubscribe(SubKind::Pattern)),
            (b"SUNSUBSCRIBE", Command::Unsubscribe(SubKind::Shard)),
            (b"PING", Command::Ping),
            (b"QUIT", Command::Quit),
            (b"MONITOR", Command::Monitor),
            (b"BLPOP", Command::Blocking),
            (b"BRPOP", Command::Blocking),
            (b"BRPOPLPUSH", Command::Blocking),
            (b"BLMOVE", Command::Blocking),
            (b"BLMPOP", Command::Blocking),
            (b"BZPOPMIN", Command::Blocking),
            (b"BZPOPMAX", Command::Blocking),
            (b"BZMPOP", Command::Blocking),
            (b"XREAD", Command::Blocking),
            (b"XREADGROUP", Command::Blocking),
            (b"WAIT", Command::Blocking),
            (b"WAITAOF", Command::Blocking),
            (b"SYNC", Command::Sync),
            (b"PSYNC", Command::Sync),
            (b"ASKING", Command::Asking),
            (b"SELECT", Command::Stateful),
            (b"WATCH", Command::Stateful),
            (b"READONLY", Command::Stateful),
            (b"READWRITE", Command::Stateful),
        ];
        if name.len() < 4 || name.len() > 12 {
            return Command::Other;
        }
        TABLE
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or(Command::Other, |&(_, c)| c)
    }

    /// True for commands that leave connection state behind (a database, a name, a protocol,
    /// subscriptions, watched keys, a reply mode, a feed): an upstream connection that ran one
    /// is closed with its client rather than handed to the next one (see `pool`). For
    /// `CLIENT`, the subcommand decides: see [`client_subcommand_keeps_no_state`].
    pub fn leaves_state(self) -> bool {
        matches!(
            self,
            Command::Hello
                | Command::Reset
                | Command::Client
                | Command::Subscribe(_)
                | Command::Unsubscribe(_)
                | Command::Quit
                | Command::Monitor
                | Command::Stateful
                | Command::Sync
                | Command::Asking
        )
    }

    /// Commands Redis accepts from a RESP2 client in subscribed mode.
    pub fn allowed_when_subscribed(self) -> bool {
        matches!(
            self,
            Command::Subscribe(_)
                | Command::Unsubscribe(_)
                | Command::Ping
                | Command::Quit
                | Command::Reset
        )
    }
}

/// The `CLIENT` subcommands the relay follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSub {
    /// `CLIENT REPLY ON|OFF|SKIP` (exactly three arguments, a known mode).
    Reply(Replies),
    /// `CLIENT TRACKING ON|OFF …`: whether the connection then tracks keys for itself (on,
    /// without `REDIRECT`).
    Tracking {
        /// Tracking on, without `REDIRECT`.
        self_tracking: bool,
    },
    /// Anything else (relayed as it is).
    Other,
}

impl ClientSub {
    /// Parses the arguments after `CLIENT`.
    pub fn parse<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> ClientSub {
        let Some(sub) = args.next() else {
            return ClientSub::Other;
        };
        if sub.eq_ignore_ascii_case(b"REPLY") {
            let (mode, extra) = (args.next(), args.next());
            return match (mode, extra) {
                (Some(m), None) if m.eq_ignore_ascii_case(b"ON") => ClientSub::Reply(Replies::On),
                (Some(m), None) if m.eq_ignore_ascii_case(b"OFF") => ClientSub::Reply(Replies::Off),
                (Some(m), None) if m.eq_ignore_ascii_case(b"SKIP") => {
                    ClientSub::Reply(Replies::Skip)
                }
                _ => ClientSub::Other,
            };
        }
        if sub.eq_ignore_ascii_case(b"TRACKING") {
            let Some(state) = args.next() else {
                return ClientSub::Other;
            };
            let on = state.eq_ignore_ascii_case(b"ON");
            let redirect = args.any(|a| a.eq_ignore_ascii_case(b"REDIRECT"));
            return ClientSub::Tracking {
                self_tracking: on && !redirect,
            };
        }
        ClientSub::Other
    }
}

/// `CLIENT` subcommands that leave nothing on the connection a later client could notice: they
/// read, act on other connections, or (`SETINFO`) set the library name and version that client
/// libraries such as redis-py 5+ send on every connection, which only `CLIENT LIST` shows and
/// which the next client sets again. `SETNAME`, `REPLY`, `TRACKING`, `NO-EVICT`, `NO-TOUCH`
/// and the rest do leave state.
pub fn client_subcommand_keeps_no_state(sub: &[u8]) -> bool {
    const HARMLESS: &[&[u8]] = &[
        b"ID",
        b"INFO",
        b"LIST",
        b"GETNAME",
        b"SETINFO",
        b"TRACKINGINFO",
        b"GETREDIR",
        b"KILL",
        b"PAUSE",
        b"UNPAUSE",
        b"UNBLOCK",
        b"HELP",
    ];
    HARMLESS.iter().any(|h| h.eq_ignore_ascii_case(sub))
}

/// The name Redis shows for a command in its errors (`c->cmd->fullname`): lowercase, with the
/// subcommand of a container command (`client|id`, `config|get`).
pub fn full_name<'a>(mut args: impl Iterator<Item = &'a [u8]>) -> String {
    const CONTAINERS: &[&[u8]] = &[
        b"acl",
        b"client",
        b"cluster",
        b"command",
        b"config",
        b"function",
        b"latency",
        b"memory",
        b"module",
        b"object",
        b"pubsub",
        b"script",
        b"sentinel",
        b"slowlog",
        b"xgroup",
        b"xinfo",
    ];
    let name = args.next().unwrap_or_default().to_ascii_lowercase();
    let mut full = String::from_utf8_lossy(&name).into_owned();
    if CONTAINERS.contains(&name.as_slice())
        && let Some(sub) = args.next()
    {
        full.push('|');
        full.push_str(&String::from_utf8_lossy(&sub.to_ascii_lowercase()));
    }
    full
}

/// The confirmation push name for a (un)subscribe family, as Redis sends it.
pub fn confirmation_name(kind: SubKind, subscribe: bool) -> &'static [u8] {
    match (kind, subscribe) {
        (SubKind::Channel, true) => b"subscribe",
        (SubKind::Pattern, true) => b"psubscribe",
        (SubKind::Shard, true) => b"ssubscribe",
        (SubKind::Channel, false) => b"unsubscribe",
        (SubKind::Pattern, false) => b"punsubscribe",
        (SubKind::Shard, false) => b"sunsubscribe",
    }
}

/// Parses a confirmation push name back into its family and direction.
pub fn parse_confirmation(name: &[u8]) -> Option<(SubKind, bool)> {
    [SubKind::Channel, SubKind::Pattern, SubKind::Shard]
        .into_iter()
        .flat_map(|k| [(k, true), (k, false)])
        .find(|&(k, s)| confirmation_name(k, s) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> impl Iterator<Item = &'static [u8]> + use<> {
        let owned: Vec<&'static [u8]> = s
            .iter()
            .map(|a| &*Box::leak(a.as_bytes().to_vec().into_boxed_slice()))
            .collect();
        owned.into_iter()
    }

    #[test]
    fn classifies_case_insensitively() {
        assert_eq!(Command::classify(b"auth"), Command::Auth);
        assert_eq!(Command::classify(b"Exec"), Command::Exec);
        assert_eq!(Command::classify(b"GET"), Command::Other);
        assert_eq!(Command::classify(b"select"), Command::Stateful);
        assert_eq!(Command::classify(b"waitaof"), Command::Blocking);
        assert_eq!(Command::classify(b"psync"), Command::Sync);
        assert!(Command::classify(b"CLIENT").leaves_state());
        assert!(!Command::classify(b"EXEC").leaves_state());
        assert!(client_subcommand_keeps_no_state(b"setinfo"));
        assert!(!client_subcommand_keeps_no_state(b"SETNAME"));
        assert_eq!(
            Command::classify(b"punsubscribe"),
            Command::Unsubscribe(SubKind::Pattern)
        );
    }

    #[test]
    fn client_subcommands() {
        assert_eq!(
            ClientSub::parse(args(&["reply", "skip"])),
            ClientSub::Reply(Replies::Skip)
        );
        assert_eq!(
            ClientSub::parse(args(&["REPLY", "ON", "x"])),
            ClientSub::Other
        );
        assert_eq!(
            ClientSub::parse(args(&["tracking", "on", "bcast"])),
            ClientSub::Tracking {
                self_tracking: true
            }
        );
        assert_eq!(
            ClientSub::parse(args(&["tracking", "on", "redirect", "7"])),
            ClientSub::Tracking {
                self_tracking: false
            }
        );
    }

    #[test]
    fn full_names_as_redis_shows_them() {
        assert_eq!(full_name(args(&["GET", "k"])), "get");
        assert_eq!(full_name(args(&["CLIENT", "ID"])), "client|id");
        assert_eq!(full_name(args(&["Config", "GET", "x"])), "config|get");
    }

    #[test]
    fn confirmation_names_round_trip() {
        assert_eq!(
            parse_confirmation(b"sunsubscribe"),
            Some((SubKind::Shard, false))
        );
        assert_eq!(parse_confirmation(b"message"), None);
    }
}
