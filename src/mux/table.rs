//! Which commands may run on a shared connection: the allow-list, derived from the server's own
//! `COMMAND` reply at start-up.
//!
//! A command may share a connection only if it neither creates connection state nor depends on
//! the connection's identity: its reply must be the same whichever connection carries it, and
//! it must leave that connection as it found it. Deciding this from a **deny-list** would share
//! every command the list forgot (a module's, a newer server's); this is an **allow-list**:
//!
//! 1. A command the server's `COMMAND` reply flags `readonly` or `write` reads or writes the
//!    keyspace. It is shared unless it is also flagged `blocking` (it may wait on the
//!    connection), `pubsub` (subscriptions live on the connection), `admin` (`CONFIG`,
//!    `DEBUG`, replication and cluster administration) or `noscript` (commands Redis keeps out of
//!    scripts because they act on the calling connection, such as `WATCH`).
//! 2. A few commands without those flags are stateless too and shared by name
//!    ([`SHARED_BY_NAME`]): `PING`, `ECHO`, `TIME`, `INFO`, `LASTSAVE`, `PUBLISH`, `SPUBLISH`,
//!    the `PUBSUB` and `COMMAND` introspection, scripts and functions (`EVAL*`, `FCALL*`,
//!    `SCRIPT LOAD|EXISTS|FLUSH`, `FUNCTION LOAD|LIST|DUMP|STATS|DELETE`), `MEMORY
//!    USAGE|STATS|DOCTOR`, `LOLWUT`, `CONFIG GET` (flagged `admin`, but it only reads the
//!    configuration).
//! 3. A few commands act on the connection whatever their flags say and always pin
//!    ([`PINNED_BY_NAME`]): `SELECT`, the transaction commands, `WAIT`/`WAITAOF`, `READONLY`,
//!    `READWRITE`, `ASKING`, `RESET`, `MONITOR`, `SYNC`/`PSYNC`/`REPLCONF`, `SCRIPT KILL` and
//!    `FUNCTION KILL` (they must reach a server that a script keeps busy, and the shared
//!    connection may be the one waiting for that script); and every `CLIENT` subcommand. (`MOVE` and `SWAPDB` name their databases explicitly and are shared.)
//! 4. Everything else pins: transactions, `SELECT` of another database, the subscribe family,
//!    `MONITOR`, blocking commands, `CLIENT` subcommands, `HELLO` with another protocol,
//!    `READONLY`/`READWRITE`/`ASKING`, `RESET`, `SYNC`/`PSYNC`, commands the table does not
//!    know (a typo pins its client: the allow-list errs on the safe side).
//!
//! The connect-time chatter that would otherwise pin every client (`CLIENT SETNAME|GETNAME|
//! SETINFO`, `SELECT` of the configured database, `HELLO` / `HELLO 2`, `AUTH`, `QUIT`) is
//! decided in [`super::client`], before this table is asked.

use redis_protocol::resp2::types::OwnedFrame;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Shared although the server does not flag them `readonly`/`write` (see the module doc, 2).
const SHARED_BY_NAME: &[&str] = &[
    "ping",
    "echo",
    "time",
    "info",
    "lastsave",
    "lolwut",
    "publish",
    "spublish",
    "pubsub|channels",
    "pubsub|numpat",
    "pubsub|numsub",
    "pubsub|shardchannels",
    "pubsub|shardnumsub",
    "command|count",
    "command|docs",
    "command|getkeys",
    "command|getkeysandflags",
    "command|info",
    "command|list",
    "command",
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
    "script|load",
    "script|exists",
    "script|flush",
    "function|load",
    "function|list",
    "function|dump",
    "function|stats",
    "function|delete",
    "memory|usage",
    "memory|stats",
    "memory|doctor",
    "memory|malloc-stats",
    // Flagged admin, but it only reads the server's configuration: the same on any connection,
    // and clients send it at connect time (redis-benchmark, for one, on every run).
    "config|get",
];

/// Pinned although their flags would share them (see the module doc, 3): they act on the
/// connection that runs them.
const PINNED_BY_NAME: &[(&str, PinReason)] = &[
    ("select", PinReason::Select),
    ("watch", PinReason::Transaction),
    ("unwatch", PinReason::Transaction),
    ("multi", PinReason::Transaction),
    ("exec", PinReason::Transaction),
    ("discard", PinReason::Transaction),
    ("wait", PinReason::Blocking),
    ("waitaof", PinReason::Blocking),
    ("readonly", PinReason::Cluster),
    ("readwrite", PinReason::Cluster),
    ("asking", PinReason::Cluster),
    ("reset", PinReason::Reset),
    ("monitor", PinReason::Monitor),
    // They must reach the server while a script keeps it busy, and a shared connection may
    // be the one waiting for that script.
    ("script|kill", PinReason::Admin),
    ("function|kill", PinReason::Admin),
    ("sync", PinReason::Replication),
    ("psync", PinReason::Replication),
    ("replconf", PinReason::Replication),
];

/// Why a client left the shared connections: the `reason` label of
/// `redis_proxy_multiplex_pins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// `MULTI`, `WATCH` (and `EXEC`/`DISCARD`/`UNWATCH` without them).
    Transaction,
    /// `SELECT` of a database other than `--database`.
    Select,
    /// The subscribe family (and other `pubsub`-flagged commands that act on the connection).
    Subscribe,
    /// `MONITOR`.
    Monitor,
    /// A command that may block (`BLPOP`, `XREAD`, `WAIT`, …).
    Blocking,
    /// A `CLIENT` subcommand that reads or changes the connection (`ID`, `LIST`, `TRACKING`,
    /// `REPLY`, `KILL`, …).
    Client,
    /// `HELLO` with another protocol or options.
    Hello,
    /// `RESET`.
    Reset,
    /// `SYNC`, `PSYNC`, `REPLCONF`.
    Replication,
    /// `READONLY`, `READWRITE`, `ASKING`.
    Cluster,
    /// An `admin` command (`CONFIG`, `DEBUG`, `CLUSTER`, `SHUTDOWN`, …).
    Admin,
    /// A command the server's table does not list, or lists without a flag that shares it.
    Other,
    /// Before `--listen-password` was given (the 1:1 relay authenticates the client).
    Unauthenticated,
    /// A command larger than a shared connection takes whole.
    LargeCommand,
    /// An inline (telnet-style) command.
    Inline,
    /// The server's command table could not be read: nothing is known to be stateless.
    NoCommandTable,
}

impl PinReason {
    /// Every reason, for the metric's label values.
    pub const ALL: [PinReason; 16] = [
        PinReason::Transaction,
        PinReason::Select,
        PinReason::Subscribe,
        PinReason::Monitor,
        PinReason::Blocking,
        PinReason::Client,
        PinReason::Hello,
        PinReason::Reset,
        PinReason::Replication,
        PinReason::Cluster,
        PinReason::Admin,
        PinReason::Other,
        PinReason::Unauthenticated,
        PinReason::LargeCommand,
        PinReason::Inline,
        PinReason::NoCommandTable,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            PinReason::Transaction => "transaction",
            PinReason::Select => "select",
            PinReason::Subscribe => "subscribe",
            PinReason::Monitor => "monitor",
            PinReason::Blocking => "blocking",
            PinReason::Client => "client",
            PinReason::Hello => "hello",
            PinReason::Reset => "reset",
            PinReason::Replication => "replication",
            PinReason::Cluster => "cluster",
            PinReason::Admin => "admin",
            PinReason::Other => "other",
            PinReason::Unauthenticated => "unauthenticated",
            PinReason::LargeCommand => "large_command",
            PinReason::Inline => "inline",
            PinReason::NoCommandTable => "no_command_table",
        }
    }
}

/// What a command may do on a shared connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Stateless: appended to a shared connection's pipeline.
    Share,
    /// The client must have a connection of its own first.
    Pin(PinReason),
}

/// One entry of the table: a command, or a container whose subcommands decide.
#[derive(Debug, Clone)]
enum Entry {
    Command(Decision),
    Container(Names<Decision>),
}

/// A map by lower-case command name.
type Names<V> = HashMap<Vec<u8>, V, BuildHasherDefault<NameHasher>>;

/// FNV-1a, for [`Names`]: the keys are a few hundred short names the server listed, and a
/// client can only look names up, never add one, so SipHash's defence against chosen keys
/// buys nothing here; it was a measurable part of each shared command's cost.
#[derive(Debug, Clone, Copy)]
struct NameHasher(u64);

impl Default for NameHasher {
    fn default() -> Self {
        NameHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The allow-list, by lower-case command name (and `container|subcommand`).
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    commands: Names<Entry>,
    /// Built without the server's table: everything pins.
    empty: bool,
}

/// Longest command or subcommand name looked up (longer names are not in any table).
const MAX_NAME: usize = 64;

impl CommandTable {
    /// The table that shares nothing, used when the server's `COMMAND` reply can't be read.
    pub fn pin_everything() -> Self {
        CommandTable {
            commands: Names::default(),
            empty: true,
        }
    }

    /// Builds the table from a RESP2 `COMMAND` reply. `None` if it is not one.
    pub fn from_command_reply(reply: &[u8]) -> Option<Self> {
        let (frame, _) =
            redis_protocol::resp2::decode::decode(&bytes::Bytes::copy_from_slice(reply))
                .ok()
                .flatten()?;
        let OwnedFrame::Array(entries) = frame else {
            return None;
        };
        let mut commands = Names::with_capacity_and_hasher(entries.len(), Default::default());
        for entry in &entries {
            let Some((name, decision, subs)) = parse_entry(entry) else {
                continue;
            };
            let value = if subs.is_empty() {
                Entry::Command(decision)
            } else {
                let mut table = Names::with_capacity_and_hasher(subs.len(), Default::default());
                for sub in &subs {
                    if let Some((full, decision, _)) = parse_entry(sub) {
                        // `container|sub`: keep the part after the bar.
                        let short = match full.iter().position(|&b| b == b'|') {
                            Some(bar) => full[bar + 1..].to_vec(),
                            None => full,
                        };
                        table.insert(short, decision);
                    }
                }
                Entry::Container(table)
            };
            commands.insert(name, value);
        }
        if commands.is_empty() {
            return None;
        }
        Some(CommandTable {
            commands,
            empty: false,
        })
    }

    /// How many commands (containers counted once) the table knows.
    pub fn commands(&self) -> usize {
        self.commands.len()
    }

    /// The decision for a command named `name` whose first argument is `sub` (if any).
    /// Case-insensitive; allocates nothing.
    pub fn decide(&self, name: &[u8], sub: Option<&[u8]>) -> Decision {
        self.decide_lazy(name, || sub)
    }

    /// [`CommandTable::decide`], with the first argument found only for a container (the
    /// shared client's hot path: a `GET`'s key is not looked at).
    pub fn decide_lazy<'a>(&self, name: &[u8], sub: impl FnOnce() -> Option<&'a [u8]>) -> Decision {
        if self.empty {
            return Decision::Pin(PinReason::NoCommandTable);
        }
        let mut buf = [0u8; MAX_NAME];
        let Some(lower) = lowercase(name, &mut buf) else {
            return Decision::Pin(PinReason::Other);
        };
        match self.commands.get(lower) {
            None => Decision::Pin(PinReason::Other),
            Some(Entry::Command(d)) => *d,
            Some(Entry::Container(subs)) => {
                let mut sub_buf = [0u8; MAX_NAME];
                let sub = sub();
                let Some(sub) = sub.and_then(|s| lowercase(s, &mut sub_buf)) else {
                    // The container alone (e.g. `COMMAND`) is an entry of its own when it has
                    // a meaning of its own; otherwise Redis answers an arity error.
                    return match (lower, sub) {
                        (b"command", None) => Decision::Share,
                        _ => Decision::Pin(PinReason::Other),
                    };
                };
                subs.get(sub)
                    .copied()
                    .unwrap_or(Decision::Pin(PinReason::Other))
            }
        }
    }
}

/// Lower-cases `name` into `buf`; `None` if it is longer than the buffer.
fn lowercase<'a>(name: &[u8], buf: &'a mut [u8; MAX_NAME]) -> Option<&'a [u8]> {
    let out = buf.get_mut(..name.len())?;
    for (o, b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

/// One `COMMAND` entry: its lower-case name, the decision its flags give, and its subcommand
/// entries (Redis 7: the tenth element).
fn parse_entry(entry: &OwnedFrame) -> Option<(Vec<u8>, Decision, Vec<OwnedFrame>)> {
    let OwnedFrame::Array(fields) = entry else {
        return None;
    };
    let name = match fields.first()? {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => b.to_ascii_lowercase(),
        _ => return None,
    };
    let flags: Vec<Vec<u8>> = match fields.get(2) {
        Some(OwnedFrame::Array(flags)) => flags
            .iter()
            .filter_map(|f| match f {
                OwnedFrame::SimpleString(b) | OwnedFrame::BulkString(b) => {
                    Some(b.to_ascii_lowercase())
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let subs = match fields.get(9) {
        Some(OwnedFrame::Array(subs)) => subs.clone(),
        _ => Vec::new(),
    };
    let decision = decide_by_flags(&name, &flags);
    Some((name, decision, subs))
}

/// The rules of the module documentation, for one command or subcommand (`container|sub`).
fn decide_by_flags(name: &[u8], flags: &[Vec<u8>]) -> Decision {
    if let Some((_, reason)) = PINNED_BY_NAME.iter().find(|(n, _)| n.as_bytes() == name) {
        return Decision::Pin(*reason);
    }
    if SHARED_BY_NAME.iter().any(|n| n.as_bytes() == name) {
        return Decision::Share;
    }
    let has = |flag: &str| flags.iter().any(|f| f == flag.as_bytes());
    if name.starts_with(b"client|") {
        return Decision::Pin(PinReason::Client);
    }
    if has("blocking") {
        return Decision::Pin(PinReason::Blocking);
    }
    if has("pubsub") {
        return Decision::Pin(PinReason::Subscribe);
    }
    if has("admin") {
        return Decision::Pin(PinReason::Admin);
    }
    if has("noscript") {
        return Decision::Pin(PinReason::Other);
    }
    if has("readonly") || has("write") {
        return Decision::Share;
    }
    Decision::Pin(PinReason::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `COMMAND` reply in Redis 7's shape: name, arity, flags, first, last, step, ACL
    /// categories, tips, key specs, subcommands.
    fn entry(name: &str, flags: &[&str], subs: Vec<OwnedFrame>) -> OwnedFrame {
        OwnedFrame::Array(vec![
            OwnedFrame::BulkString(name.as_bytes().to_vec()),
            OwnedFrame::Integer(-2),
            OwnedFrame::Array(
                flags
                    .iter()
                    .map(|f| OwnedFrame::SimpleString(f.as_bytes().to_vec()))
                    .collect(),
            ),
            OwnedFrame::Integer(1),
            OwnedFrame::Integer(1),
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(subs),
        ])
    }

    fn encode(frame: &OwnedFrame, out: &mut Vec<u8>) {
        match frame {
            OwnedFrame::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
            OwnedFrame::BulkString(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            OwnedFrame::SimpleString(b) => {
                out.push(b'+');
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            OwnedFrame::Integer(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            other => panic!("not used here: {other:?}"),
        }
    }

    fn table(entries: Vec<OwnedFrame>) -> CommandTable {
        let mut buf = Vec::new();
        encode(&OwnedFrame::Array(entries), &mut buf);
        CommandTable::from_command_reply(&buf).expect("a table")
    }

    #[test]
    fn flags_decide_and_the_lists_override_them() {
        let t = table(vec![
            entry("get", &["readonly", "fast"], vec![]),
            entry("set", &["write", "denyoom"], vec![]),
            entry("blpop", &["write", "blocking"], vec![]),
            entry("subscribe", &["pubsub", "noscript"], vec![]),
            entry("watch", &["noscript", "fast"], vec![]),
            entry("select", &["loading", "stale", "fast"], vec![]),
            entry("ping", &["fast"], vec![]),
            entry("eval", &["noscript", "stale"], vec![]),
            entry("flushall", &["write"], vec![]),
            entry("keys", &["readonly"], vec![]),
            entry("save", &["admin", "noscript"], vec![]),
            entry(
                "config",
                &[],
                vec![
                    entry(
                        "config|get",
                        &["admin", "noscript", "loading", "stale"],
                        vec![],
                    ),
                    entry(
                        "config|set",
                        &["admin", "noscript", "loading", "stale"],
                        vec![],
                    ),
                ],
            ),
            entry(
                "client",
                &[],
                vec![
                    entry("client|id", &["noscript"], vec![]),
                    entry("client|list", &["admin", "noscript"], vec![]),
                ],
            ),
            entry(
                "object",
                &[],
                vec![entry("object|encoding", &["readonly"], vec![])],
            ),
            entry(
                "script",
                &[],
                vec![
                    entry("script|load", &["noscript", "stale"], vec![]),
                    entry("script|kill", &["noscript", "allow_busy"], vec![]),
                ],
            ),
        ]);
        assert!(t.commands() > 10);
        let share = Decision::Share;
        assert_eq!(t.decide(b"GET", None), share);
        assert_eq!(t.decide(b"set", None), share);
        assert_eq!(t.decide(b"Ping", None), share);
        assert_eq!(t.decide(b"EVAL", None), share);
        assert_eq!(t.decide(b"keys", None), share);
        assert_eq!(t.decide(b"object", Some(b"ENCODING")), share);
        assert_eq!(t.decide(b"blpop", None), Decision::Pin(PinReason::Blocking));
        assert_eq!(
            t.decide(b"subscribe", None),
            Decision::Pin(PinReason::Subscribe)
        );
        assert_eq!(
            t.decide(b"watch", None),
            Decision::Pin(PinReason::Transaction)
        );
        assert_eq!(t.decide(b"select", None), Decision::Pin(PinReason::Select));
        assert_eq!(t.decide(b"save", None), Decision::Pin(PinReason::Admin));
        assert_eq!(t.decide(b"CONFIG", Some(b"get")), share);
        assert_eq!(
            t.decide(b"config", Some(b"SET")),
            Decision::Pin(PinReason::Admin)
        );
        assert_eq!(
            t.decide(b"client", Some(b"id")),
            Decision::Pin(PinReason::Client)
        );
        assert_eq!(
            t.decide(b"client", Some(b"nope")),
            Decision::Pin(PinReason::Other)
        );
        assert_eq!(t.decide(b"object", None), Decision::Pin(PinReason::Other));
        assert_eq!(t.decide(b"SCRIPT", Some(b"load")), share);
        assert_eq!(
            t.decide(b"script", Some(b"KILL")),
            Decision::Pin(PinReason::Admin)
        );
        assert_eq!(
            t.decide(b"nosuchcommand", None),
            Decision::Pin(PinReason::Other)
        );
        assert_eq!(
            t.decide(&[b'g'; 200], None),
            Decision::Pin(PinReason::Other)
        );
    }

    #[test]
    fn no_table_pins_everything_and_garbage_is_no_table() {
        let t = CommandTable::pin_everything();
        assert_eq!(
            t.decide(b"get", None),
            Decision::Pin(PinReason::NoCommandTable)
        );
        assert!(CommandTable::from_command_reply(b"+OK\r\n").is_none());
        assert!(CommandTable::from_command_reply(b"*1\r\n").is_none());
        assert!(CommandTable::from_command_reply(b"-ERR no\r\n").is_none());
        assert!(CommandTable::from_command_reply(b"*0\r\n").is_none());
    }
}
