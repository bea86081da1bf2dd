//! The handful of commands the relay must recognise.
//!
//! Almost every command is relayed without a look at its arguments. These are the exceptions:
//! they change connection state that decides whether an injected `AUTH` is safe, or they carry
//! credentials the proxy replaces. Classification compares the command name without allocating.

use super::pending::SubKind;

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
    /// `EXEC` or `DISCARD`: the transaction ends.
    EndTransaction,
    /// `CLIENT`: `CLIENT REPLY` changes which commands get replies.
    Client,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`.
    Subscribe(SubKind),
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`.
    Unsubscribe(SubKind),
    /// `PING`: its reply differs in RESP2 subscribed mode.
    Ping,
    /// `QUIT`.
    Quit,
    /// `MONITOR`: the connection becomes a feed.
    Monitor,
    /// A command that may block (`BLPOP`, `XREAD … BLOCK`, `WAIT`, …): see `blocking`.
    Blocking,
    /// `SELECT`, `WATCH`, `READONLY`, `READWRITE`: relayed untouched, but they leave state on
    /// the connection that the next client must not inherit.
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
            (b"EXEC", Command::EndTransaction),
            (b"DISCARD", Command::EndTransaction),
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

    #[test]
    fn classifies_case_insensitively() {
        assert_eq!(Command::classify(b"auth"), Command::Auth);
        assert_eq!(Command::classify(b"Exec"), Command::EndTransaction);
        assert_eq!(Command::classify(b"GET"), Command::Other);
        assert_eq!(Command::classify(b"select"), Command::Stateful);
        assert!(Command::classify(b"CLIENT").leaves_state());
        assert!(!Command::classify(b"EXEC").leaves_state());
        assert!(client_subcommand_keeps_no_state(b"setinfo"));
        assert!(!client_subcommand_keeps_no_state(b"SETNAME"));
        assert!(!client_subcommand_keeps_no_state(b"REPLY"));
        assert_eq!(
            Command::classify(b"punsubscribe"),
            Command::Unsubscribe(SubKind::Pattern)
        );
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
