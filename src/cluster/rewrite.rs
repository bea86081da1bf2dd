//! Node addresses in Redis Cluster replies, rewritten to the proxy's local listeners.
//!
//! In cluster mode the proxy opens one local plaintext listener per upstream cluster node, and a
//! client must never learn an upstream address: it would try to reach the node directly, without
//! TLS and without a token. So every reply that names a node (`CLUSTER SLOTS`, `SHARDS`, `NODES`,
//! `REPLICAS`/`SLAVES`, and the `-MOVED`/`-ASK` redirects) is rewritten to name the node's local
//! listener instead. [`Rewriter`] does that on one complete frame, sans IO: bytes in, bytes out,
//! with the local port of each node asked from an [`AddressMap`] (the topology manager, which
//! allocates listeners).
//!
//! **The output is byte-identical to the input except the replaced values.** Each reply is parsed
//! into a small tree that remembers where every value lies in the input; the rewrite is a list of
//! (span, new bytes) edits spliced into a copy of the input. Nothing is re-encoded that was not
//! replaced, so a client sees exactly what Redis sent (field order, RESP2 or RESP3 types, metadata
//! the proxy does not know) apart from the addresses.
//!
//! **The server is not trusted here as it is in [`crate::resp`]:** these replies are parsed for
//! their values, so the parser bounds nesting depth ([`MAX_DEPTH`]) and frame size
//! ([`MAX_FRAME`]), never pre-allocates from a length header, and never panics; anything it does
//! not understand is [`RewriteError::Malformed`], with at most [`SHOW_MAX`] bytes of the server's
//! text in the message.
//!
//! The formats are Redis 7.0's (`clusterReplyMultiBulkSlots`, `addShardReplyForClusterShards`,
//! `clusterGenNodeDescription` and `clusterRedirectClient` in `cluster.c`).

use std::fmt::Write as _;

/// Deepest nesting a topology reply may have: `CLUSTER SHARDS` in RESP2 needs 4 levels (shards,
/// shard, nodes, node), so 8 leaves room without letting a hostile reply recurse at will.
const MAX_DEPTH: usize = 8;
/// Largest frame accepted: the caller guarantees at most 1 MiB, so anything bigger is a bug or an
/// attack, refused before parsing.
const MAX_FRAME: usize = 1 << 20;
/// At most this many bytes of server-provided text appear in an error message, so the
/// `-ERR redis-entra-proxy: …` a client receives stays one short line.
const SHOW_MAX: usize = 64;

/// Where clients should reach an upstream node.
pub(crate) trait AddressMap {
    /// The local port for upstream node `host:port` as Redis names it (allocating one for a
    /// node not seen before); None when no local port can be given (limit reached).
    fn local_port(&self, host: &str, port: u16) -> Option<u16>;
}

/// Which topology command a reply answers: each has its own format to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topology {
    /// `CLUSTER SLOTS`: slot ranges, each with `[endpoint, port, id, metadata]` nodes.
    Slots,
    /// `CLUSTER SHARDS`: shards, each with a `nodes` list of key/value node descriptions.
    Shards,
    /// `CLUSTER NODES`: one text line per node, `ip:port@cport[,hostname]` in the second field.
    Nodes,
    /// `CLUSTER REPLICAS` / `CLUSTER SLAVES`: an array of `CLUSTER NODES` lines.
    Replicas,
}

impl Topology {
    /// `CLUSTER <sub>`'s subcommand (case-insensitive): SLOTS, SHARDS, NODES, REPLICAS, SLAVES.
    /// None for every other subcommand, whose replies name no node and are relayed as they are.
    pub(crate) fn from_subcommand(sub: &[u8]) -> Option<Topology> {
        let is = |name: &str| sub.eq_ignore_ascii_case(name.as_bytes());
        if is("SLOTS") {
            Some(Topology::Slots)
        } else if is("SHARDS") {
            Some(Topology::Shards)
        } else if is("NODES") {
            Some(Topology::Nodes)
        } else if is("REPLICAS") || is("SLAVES") {
            Some(Topology::Replicas)
        } else {
            None
        }
    }

    /// How the reply is named in error messages.
    fn label(self) -> &'static str {
        match self {
            Topology::Slots => "CLUSTER SLOTS reply",
            Topology::Shards => "CLUSTER SHARDS reply",
            Topology::Nodes => "CLUSTER NODES reply",
            Topology::Replicas => "CLUSTER REPLICAS reply",
        }
    }
}

/// Why a reply could not be rewritten. The relay answers the client with
/// `-ERR redis-entra-proxy: {self}` rather than relay an upstream address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RewriteError {
    /// The [`AddressMap`] has no local port for a node (`--cluster-max-nodes` reached): the
    /// reply can't be relayed without naming an upstream address.
    #[error("no local port for cluster node {}: --cluster-max-nodes reached", show_addr(host, *port))]
    NoLocalPort {
        /// The node's host as Redis named it (at most [`SHOW_MAX`] bytes of it).
        host: String,
        /// The node's port as Redis named it.
        port: u16,
    },
    /// The reply is not in the format this module knows; the text is the whole message, e.g.
    /// "malformed CLUSTER SLOTS reply from the cluster: <what>".
    #[error("{0}")]
    Malformed(String),
}

/// `host:port` for a message, IPv6 hosts in brackets so the port stays readable.
fn show_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// At most [`SHOW_MAX`] bytes of server text, escaped, for an error message.
fn show(text: &[u8]) -> String {
    let cut = &text[..text.len().min(SHOW_MAX)];
    let mut out = cut.escape_ascii().to_string();
    if cut.len() < text.len() {
        out.push_str("...");
    }
    out
}

/// A "what went wrong" while walking a reply; given its full message by [`in_reply`].
fn bad<T>(what: impl Into<String>) -> Result<T, RewriteError> {
    Err(RewriteError::Malformed(what.into()))
}

/// Puts a walk's bare [`RewriteError::Malformed`] text into its sentence.
fn in_reply(label: &str, err: RewriteError) -> RewriteError {
    match err {
        RewriteError::Malformed(what) => {
            RewriteError::Malformed(format!("malformed {label} from the cluster: {what}"))
        }
        other => other,
    }
}

/// The rewriting of one connection's replies: where the local listeners are, and which port of
/// a node the proxy connects to.
pub(crate) struct Rewriter<'a> {
    /// The address the local listeners are bound to, e.g. "127.0.0.1" or "::1" (IPv6 without
    /// brackets, as Redis writes addresses).
    pub local_ip: &'a str,
    /// The configured upstream host: Redis names a node with an empty host when it does not know
    /// its own address (`MOVED 1 :6380`), and the client reached it through this host.
    pub seed_host: &'a str,
    /// Upstream connections are TLS: a `CLUSTER SHARDS` node's "tls-port" is the one the proxy
    /// connects to, when present.
    pub tls: bool,
    /// The local port of each upstream node.
    pub map: &'a dyn AddressMap,
}

impl Rewriter<'_> {
    /// A topology reply (one complete RESP2 or RESP3 frame) with every node address replaced.
    /// Ok(None): nothing to rewrite (an error reply, or no address in it) — relay as is.
    pub(crate) fn topology(
        &self,
        which: Topology,
        frame: &[u8],
    ) -> Result<Option<Vec<u8>>, RewriteError> {
        if matches!(frame.first(), Some(b'-' | b'!')) {
            return Ok(None);
        }
        let mut edits = Vec::new();
        self.topology_edits(which, frame, &mut edits)
            .map_err(|e| in_reply(which.label(), e))?;
        Ok((!edits.is_empty()).then(|| splice(frame, edits)))
    }

    /// The edits that rewrite a topology reply.
    fn topology_edits(
        &self,
        which: Topology,
        frame: &[u8],
        edits: &mut Vec<Edit>,
    ) -> Result<(), RewriteError> {
        let top = parse_frame(frame)?;
        match which {
            Topology::Slots => self.slots(&top, edits),
            Topology::Shards => self.shards(&top, edits),
            Topology::Nodes => match top.kind {
                Kind::Str(text) if top.tag != b'+' => {
                    if let Some(new) = self.nodes_text(text)? {
                        edits.push(top.with_str(&new));
                    }
                    Ok(())
                }
                Kind::Null => Ok(()),
                _ => bad("expected a bulk or verbatim string"),
            },
            Topology::Replicas => {
                let Kind::Agg(items) = &top.kind else {
                    return bad("expected an array");
                };
                for item in items {
                    match item.kind {
                        Kind::Str(text) if item.tag != b'+' => {
                            if let Some(new) = self.nodes_text(text)? {
                                edits.push(item.with_str(&new));
                            }
                        }
                        _ => return bad("expected an array of bulk or verbatim strings"),
                    }
                }
                Ok(())
            }
        }
    }

    /// `CLUSTER SLOTS`: `[start, end, [endpoint, port, id, metadata], ...]` per range.
    fn slots(&self, top: &Val<'_>, edits: &mut Vec<Edit>) -> Result<(), RewriteError> {
        let Kind::Agg(ranges) = &top.kind else {
            return bad("expected an array");
        };
        for range in ranges {
            let items = match &range.kind {
                Kind::Agg(items) if items.len() >= 3 => items,
                _ => return bad("a slot range is not an array of 3 or more elements"),
            };
            if !matches!(items[0].kind, Kind::Int(_)) || !matches!(items[1].kind, Kind::Int(_)) {
                return bad("a slot range does not start with two integers");
            }
            for node in &items[2..] {
                let fields = match &node.kind {
                    Kind::Agg(fields) if fields.len() >= 2 => fields,
                    _ => return bad("a node is not an array of 2 or more elements"),
                };
                let Kind::Int(port) = fields[1].kind else {
                    return bad("a node's port is not an integer");
                };
                let host = match &fields[0].kind {
                    Kind::Str(b"?") => continue, // unknown endpoint: the client can't use it either
                    Kind::Str(endpoint) => {
                        edits.push(fields[0].with_str(self.local_ip.as_bytes()));
                        *endpoint
                    }
                    // `cluster-preferred-endpoint-type unknown-endpoint`: the client reuses the
                    // address it is connected to (a local listener, as it should), so the null
                    // stays; the node is the metadata's ip.
                    Kind::Null => match metadata_ip(&fields[2..]) {
                        Some(ip) => ip,
                        None => continue,
                    },
                    _ => return bad("a node's endpoint is not a string"),
                };
                let local = self.local(host, port)?;
                edits.push(fields[1].with_int(local));
                for extra in &fields[2..] {
                    let pairs = match &extra.kind {
                        Kind::Agg(kv) | Kind::Map(kv) => kv,
                        _ => continue,
                    };
                    for pair in pairs.chunks_exact(2) {
                        if let (Kind::Str(key), Kind::Str(value)) = (&pair[0].kind, &pair[1].kind)
                            && (*key == b"ip" || *key == b"hostname")
                            && !value.is_empty()
                        {
                            edits.push(pair[1].with_str(self.local_ip.as_bytes()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `CLUSTER SHARDS`: shards of `slots`/`nodes`, each node a key/value list.
    fn shards(&self, top: &Val<'_>, edits: &mut Vec<Edit>) -> Result<(), RewriteError> {
        let Kind::Agg(shards) = &top.kind else {
            return bad("expected an array");
        };
        for shard in shards {
            let Some(shard) = pairs(shard) else {
                return bad("a shard is not a map");
            };
            for pair in &shard {
                if !matches!(pair[0].kind, Kind::Str(b"nodes")) {
                    continue;
                }
                let Kind::Agg(nodes) = &pair[1].kind else {
                    return bad("a shard's nodes are not an array");
                };
                for node in nodes {
                    self.shard_node(node, edits)?;
                }
            }
        }
        Ok(())
    }

    /// One node of a `CLUSTER SHARDS` shard.
    fn shard_node(&self, node: &Val<'_>, edits: &mut Vec<Edit>) -> Result<(), RewriteError> {
        let Some(fields) = pairs(node) else {
            return bad("a node is not a map");
        };
        let find = |name: &[u8]| {
            fields
                .iter()
                .find(|pair| matches!(pair[0].kind, Kind::Str(key) if key == name))
                .map(|pair| &pair[1].kind)
        };
        let text = |name: &[u8]| match find(name) {
            Some(Kind::Str(value)) => Some(*value),
            _ => None,
        };
        let int = |name: &[u8]| match find(name) {
            Some(Kind::Int(value)) => Some(*value),
            _ => None,
        };
        let host: &[u8] = match (text(b"endpoint"), text(b"ip")) {
            (Some(endpoint), _) if !endpoint.is_empty() && endpoint != b"?" => endpoint,
            (_, Some(ip)) => ip,
            (Some(endpoint), None) => endpoint,
            (None, None) => return bad("a node has no ip"),
        };
        let port = match (int(b"port"), int(b"tls-port")) {
            (_, Some(tls_port)) if self.tls => tls_port,
            (Some(port), _) => port,
            (None, Some(tls_port)) => tls_port,
            (None, None) => return bad("a node has no integer port"),
        };
        if host == b"?" {
            return Ok(()); // unknown address: nothing a client could use
        }
        let local = self.local(host, port)?;
        for pair in &fields {
            let Kind::Str(key) = pair[0].kind else {
                continue;
            };
            match (key, &pair[1].kind) {
                (b"port" | b"tls-port", Kind::Int(_)) => edits.push(pair[1].with_int(local)),
                (b"ip" | b"endpoint" | b"hostname", Kind::Str(value)) if !value.is_empty() => {
                    edits.push(pair[1].with_str(self.local_ip.as_bytes()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// `CLUSTER NODES` text (or one `REPLICAS` line) with each line's address replaced; None
    /// when no line names an address.
    fn nodes_text(&self, text: &[u8]) -> Result<Option<Vec<u8>>, RewriteError> {
        let mut out = Vec::with_capacity(text.len());
        let mut changed = false;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let (body, end) = match line.strip_suffix(b"\n") {
                Some(body) => (body, &b"\n"[..]),
                None => (line, &b""[..]),
            };
            if body.is_empty() {
                out.extend_from_slice(line);
                continue;
            }
            let addr = NodeAddr::of_line(body)?;
            if addr.host.is_empty() && addr.port == 0 {
                out.extend_from_slice(line); // noaddr: `:0@0`
                continue;
            }
            let local = self.local(addr.host, i64::from(addr.port))?;
            out.extend_from_slice(&body[..addr.start]);
            let _ = write!(Bytes(&mut out), "{}:{local}", self.local_ip);
            out.extend_from_slice(addr.cport);
            out.extend_from_slice(&body[addr.end..]);
            out.extend_from_slice(end);
            changed = true;
        }
        Ok(changed.then_some(out))
    }

    /// A `-MOVED <slot> <host>:<port>` / `-ASK ...` error frame rewritten; None if `frame` is not one.
    pub(crate) fn redirect(&self, frame: &[u8]) -> Option<Result<Vec<u8>, RewriteError>> {
        let (kind, rest) = if let Some(rest) = frame.strip_prefix(b"-MOVED ") {
            ("MOVED", rest)
        } else if let Some(rest) = frame.strip_prefix(b"-ASK ") {
            ("ASK", rest)
        } else {
            return None;
        };
        Some(
            self.redirect_to(kind, rest)
                .map_err(|e| in_reply(&format!("{kind} redirect"), e)),
        )
    }

    /// `<slot> <host>:<port>\r\n` of a redirect, rewritten into a whole frame.
    fn redirect_to(&self, kind: &str, rest: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let Some(body) = rest.strip_suffix(b"\r\n") else {
            return bad("not one line");
        };
        if body.iter().any(|b| *b == b'\r' || *b == b'\n') {
            return bad("not one line");
        }
        let Some(space) = body.iter().position(|b| *b == b' ') else {
            return bad(format!("no address in '{}'", show(body)));
        };
        let (slot, addr) = (&body[..space], &body[space + 1..]);
        if slot.is_empty() || slot.len() > 5 || !slot.iter().all(u8::is_ascii_digit) {
            return bad(format!("bad slot in '{}'", show(body)));
        }
        let (host, port) = split_host_port(addr)?;
        let local = self.local(host, i64::from(port))?;
        let mut out = Vec::with_capacity(frame_len_hint(kind, slot, self.local_ip));
        out.push(b'-');
        out.extend_from_slice(kind.as_bytes());
        out.push(b' ');
        out.extend_from_slice(slot);
        let _ = write!(Bytes(&mut out), " {}:{local}\r\n", self.local_ip);
        Ok(out)
    }

    /// The local port of upstream `host:port`; an empty host is the seed host.
    fn local(&self, host: &[u8], port: i64) -> Result<u16, RewriteError> {
        let Ok(host) = std::str::from_utf8(host) else {
            return bad(format!("a node's host is not UTF-8: '{}'", show(host)));
        };
        let Ok(port) = u16::try_from(port) else {
            return bad(format!("port {port} out of range"));
        };
        let host = if host.is_empty() {
            self.seed_host
        } else {
            host
        };
        self.map
            .local_port(host, port)
            .ok_or_else(|| RewriteError::NoLocalPort {
                host: String::from_utf8_lossy(&host.as_bytes()[..host.len().min(SHOW_MAX)])
                    .into_owned(),
                port,
            })
    }
}

/// Room for a rewritten redirect, so it is built in one allocation.
fn frame_len_hint(kind: &str, slot: &[u8], local_ip: &str) -> usize {
    1 + kind.len() + 1 + slot.len() + 1 + local_ip.len() + 8
}

/// `fmt::Write` into a byte vector, for formatting numbers without a temporary `String`.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `host:port`, split at the last ':' (an IPv6 host has colons of its own).
fn split_host_port(addr: &[u8]) -> Result<(&[u8], u16), RewriteError> {
    let Some(colon) = addr.iter().rposition(|b| *b == b':') else {
        return bad(format!("no port in '{}'", show(addr)));
    };
    match parse_u16(&addr[colon + 1..]) {
        Some(port) => Ok((&addr[..colon], port)),
        None => bad(format!("bad port in '{}'", show(addr))),
    }
}

/// A decimal `u16` with nothing around it.
fn parse_u16(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where the address lies in a `CLUSTER NODES` line: `<id> <host:port@cport[,hostname]> ...`.
struct NodeAddr<'a> {
    /// The address field's offset in the line.
    start: usize,
    /// Just past the address field.
    end: usize,
    /// Everything before the last ':' before '@'.
    host: &'a [u8],
    /// The data port.
    port: u16,
    /// `@cport` (kept as is; empty if the line has none), without the `,hostname`.
    cport: &'a [u8],
}

impl<'a> NodeAddr<'a> {
    /// The address of one line (without its `\n`).
    fn of_line(line: &'a [u8]) -> Result<NodeAddr<'a>, RewriteError> {
        let Some(space) = line.iter().position(|b| *b == b' ') else {
            return bad(format!("no address in line '{}'", show(line)));
        };
        let start = space + 1;
        let end = line[start..]
            .iter()
            .position(|b| *b == b' ')
            .map_or(line.len(), |n| start + n);
        let field = &line[start..end];
        let hostport_end = field
            .iter()
            .position(|b| *b == b'@' || *b == b',')
            .unwrap_or(field.len());
        let (host, port) = split_host_port(&field[..hostport_end])?;
        let rest = &field[hostport_end..];
        let cport = match rest.first() {
            Some(b'@') => &rest[..rest.iter().position(|b| *b == b',').unwrap_or(rest.len())],
            _ => &b""[..],
        };
        Ok(NodeAddr {
            start,
            end,
            host,
            port,
            cport,
        })
    }
}

/// One node of a `CLUSTER NODES` text, for the topology manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeLine {
    /// The node's 40-character id.
    pub id: String,
    /// The node's host as Redis names it (empty for a node without an address).
    pub host: String,
    /// The node's data port (0 for a node without an address).
    pub port: u16,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, `nofailover`, ...
    pub flags: Vec<String>,
    /// The master's id for a replica; None for "-".
    pub master_id: Option<String>,
    /// The slot ranges served, inclusive; `[slot->-id]` migration markers are left out.
    pub slots: Vec<(u16, u16)>,
}

/// Parses the text of `CLUSTER NODES` (the bulk string's payload, not the RESP frame).
pub(crate) fn parse_nodes(text: &[u8]) -> Result<Vec<NodeLine>, RewriteError> {
    parse_nodes_lines(text).map_err(|e| in_reply("CLUSTER NODES text", e))
}

/// [`parse_nodes`] without the message's sentence.
fn parse_nodes_lines(text: &[u8]) -> Result<Vec<NodeLine>, RewriteError> {
    let utf8 = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => bad(format!("not UTF-8: '{}'", show(bytes))),
    };
    let mut nodes = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        if fields.len() < 8 {
            return bad(format!("fewer than 8 fields in line '{}'", show(line)));
        }
        let addr = NodeAddr::of_line(line)?;
        let mut slots = Vec::new();
        for field in &fields[8..] {
            if field.is_empty() || field.starts_with(b"[") {
                continue;
            }
            let range = match field.iter().position(|b| *b == b'-') {
                Some(dash) => parse_u16(&field[..dash]).zip(parse_u16(&field[dash + 1..])),
                None => parse_u16(field).map(|slot| (slot, slot)),
            };
            match range {
                Some((first, last)) if first <= last => slots.push((first, last)),
                _ => return bad(format!("bad slot range '{}'", show(field))),
            }
        }
        nodes.push(NodeLine {
            id: utf8(fields[0])?,
            host: utf8(addr.host)?,
            port: addr.port,
            flags: fields[2]
                .split(|b| *b == b',')
                .map(utf8)
                .collect::<Result<_, _>>()?,
            master_id: match fields[3] {
                b"-" => None,
                id => Some(utf8(id)?),
            },
            slots,
        });
    }
    Ok(nodes)
}

/// The payload of a `$` bulk or `=` verbatim (skip the `txt:` prefix) frame, for the manager.
/// None for any other frame (an error reply, a null, a truncated or malformed frame).
pub(crate) fn bulk_payload(frame: &[u8]) -> Option<&[u8]> {
    let val = parse_frame(frame).ok()?;
    match val.kind {
        Kind::Str(payload) if val.tag != b'+' => Some(payload),
        _ => None,
    }
}

/// One replacement: the input's `start..end` becomes `bytes`.
struct Edit {
    /// Offset of the replaced value's first byte (its type byte).
    start: usize,
    /// Just past the replaced value's `\r\n`.
    end: usize,
    /// The replacement value, a whole RESP value.
    bytes: Vec<u8>,
}

/// The input with the edits applied; every byte outside them copied as is.
fn splice(input: &[u8], mut edits: Vec<Edit>) -> Vec<u8> {
    edits.sort_by_key(|edit| edit.start);
    let mut out = Vec::with_capacity(input.len() + edits.len() * 8);
    let mut at = 0;
    for edit in edits {
        if edit.start < at {
            continue; // overlapping edits can't come from one tree; keep the first
        }
        out.extend_from_slice(&input[at..edit.start]);
        out.extend_from_slice(&edit.bytes);
        at = edit.end;
    }
    out.extend_from_slice(&input[at..]);
    out
}

/// A parsed value: what it is and where it lies in the frame.
#[derive(Debug)]
struct Val<'a> {
    /// The RESP type byte (`$`, `=`, `+`, `:`, `*`, `%`, ...).
    tag: u8,
    /// The verbatim string's format with its ':' (`txt:`); empty for other types.
    format: &'a [u8],
    /// Offset of the type byte.
    start: usize,
    /// Just past the value.
    end: usize,
    /// The value.
    kind: Kind<'a>,
}

/// The values a topology reply is made of.
#[derive(Debug)]
enum Kind<'a> {
    /// `$`, `+`, `=` (without its format).
    Str(&'a [u8]),
    /// `:`.
    Int(i64),
    /// `*`, `~`, `>`.
    Agg(Vec<Val<'a>>),
    /// `%`, its keys and values in order.
    Map(Vec<Val<'a>>),
    /// `$-1`, `*-1`, `_`.
    Null,
    /// Anything else (errors, doubles, booleans, big numbers): never an address.
    Other,
}

impl Val<'_> {
    /// An edit replacing this string value with `text`, keeping its type.
    fn with_str(&self, text: &[u8]) -> Edit {
        let mut bytes = Vec::with_capacity(text.len() + 16);
        match self.tag {
            b'+' => bytes.push(b'+'),
            b'=' => {
                let _ = write!(Bytes(&mut bytes), "={}\r\n", self.format.len() + text.len());
                bytes.extend_from_slice(self.format);
            }
            _ => {
                let _ = write!(Bytes(&mut bytes), "${}\r\n", text.len());
            }
        }
        bytes.extend_from_slice(text);
        bytes.extend_from_slice(b"\r\n");
        Edit {
            start: self.start,
            end: self.end,
            bytes,
        }
    }

    /// An edit replacing this integer value with `n`.
    fn with_int(&self, n: u16) -> Edit {
        Edit {
            start: self.start,
            end: self.end,
            bytes: format!(":{n}\r\n").into_bytes(),
        }
    }
}

/// The "ip" of a `CLUSTER SLOTS` node's metadata (the values after its endpoint, port and id).
fn metadata_ip<'a>(extras: &[Val<'a>]) -> Option<&'a [u8]> {
    extras.iter().skip(1).find_map(|extra| match &extra.kind {
        Kind::Agg(kv) | Kind::Map(kv) => kv.chunks_exact(2).find_map(|pair| match pair {
            [key, value] => match (&key.kind, &value.kind) {
                (Kind::Str(b"ip"), Kind::Str(ip)) => Some(*ip),
                _ => None,
            },
            _ => None,
        }),
        _ => None,
    })
}

/// The key/value pairs of a RESP3 map or a RESP2 flat key/value array.
fn pairs<'v, 'a>(val: &'v Val<'a>) -> Option<Vec<&'v [Val<'a>]>> {
    match &val.kind {
        Kind::Map(items) => Some(items.chunks_exact(2).collect()),
        Kind::Agg(items) if items.len() % 2 == 0 => Some(items.chunks_exact(2).collect()),
        _ => None,
    }
}

/// Parses one complete frame, with nothing after it.
fn parse_frame(frame: &[u8]) -> Result<Val<'_>, RewriteError> {
    if frame.len() > MAX_FRAME {
        return bad(format!("larger than {MAX_FRAME} bytes"));
    }
    let mut parser = Parser { buf: frame, pos: 0 };
    let val = parser.value(0)?;
    if parser.pos != frame.len() {
        return bad("bytes after the reply");
    }
    Ok(val)
}

/// A recursive-descent RESP parser over one frame, bounded by [`MAX_DEPTH`].
struct Parser<'a> {
    /// The frame.
    buf: &'a [u8],
    /// The next byte to read.
    pos: usize,
}

impl<'a> Parser<'a> {
    /// The rest of the current line, up to its `\r\n` (consumed).
    fn line(&mut self) -> Result<&'a [u8], RewriteError> {
        let rest = &self.buf[self.pos..];
        let Some(cr) = rest.windows(2).position(|w| w == b"\r\n") else {
            return bad("truncated");
        };
        self.pos += cr + 2;
        Ok(&rest[..cr])
    }

    /// The current line as a signed decimal integer.
    fn int_line(&mut self) -> Result<i64, RewriteError> {
        let line = self.line()?;
        let (negative, digits) = match line.strip_prefix(b"-") {
            Some(digits) => (true, digits),
            None => (false, line),
        };
        if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
            return bad(format!("bad integer '{}'", show(line)));
        }
        let n = digits
            .iter()
            .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
        Ok(if negative { -n } else { n })
    }

    /// One value at nesting `depth`.
    fn value(&mut self, depth: usize) -> Result<Val<'a>, RewriteError> {
        let start = self.pos;
        let Some(&tag) = self.buf.get(self.pos) else {
            return bad("truncated");
        };
        self.pos += 1;
        let mut format = &b""[..];
        let kind = match tag {
            b'$' | b'=' | b'!' => {
                let len = self.int_line()?;
                if len == -1 && tag == b'$' {
                    Kind::Null
                } else {
                    let Ok(len) = usize::try_from(len) else {
                        return bad("negative length");
                    };
                    let rest = &self.buf[self.pos..];
                    if rest.len() < len.saturating_add(2) {
                        return bad("truncated");
                    }
                    if &rest[len..len + 2] != b"\r\n" {
                        return bad("a string not followed by CRLF");
                    }
                    self.pos += len + 2;
                    let data = &rest[..len];
                    match tag {
                        b'$' => Kind::Str(data),
                        b'=' => {
                            if data.len() < 4 || data[3] != b':' {
                                return bad("a verbatim string without a format");
                            }
                            format = &data[..4];
                            Kind::Str(&data[4..])
                        }
                        _ => Kind::Other,
                    }
                }
            }
            b'+' => Kind::Str(self.line()?),
            b':' => Kind::Int(self.int_line()?),
            b'_' => {
                self.line()?;
                Kind::Null
            }
            b'-' | b',' | b'#' | b'(' => {
                self.line()?;
                Kind::Other
            }
            b'*' | b'~' | b'>' | b'%' => {
                let n = self.int_line()?;
                if n == -1 && tag == b'*' {
                    Kind::Null
                } else {
                    let Ok(n) = usize::try_from(n) else {
                        return bad("negative length");
                    };
                    let count = if tag == b'%' { n.saturating_mul(2) } else { n };
                    // Every value takes at least 3 bytes: a longer header is a lie.
                    if count > (self.buf.len() - self.pos) / 3 {
                        return bad("truncated");
                    }
                    if depth + 1 >= MAX_DEPTH {
                        return bad("nested too deeply");
                    }
                    let mut items = Vec::with_capacity(count);
                    for _ in 0..count {
                        items.push(self.value(depth + 1)?);
                    }
                    if tag == b'%' {
                        Kind::Map(items)
                    } else {
                        Kind::Agg(items)
                    }
                }
            }
            b'|' => return bad("an attribute, which is not expected"),
            other => return bad(format!("unexpected type byte '{}'", show(&[other]))),
        };
        Ok(Val {
            tag,
            format,
            start,
            end: self.pos,
            kind,
        })
    }
}

#[cfg(test)]
mod tests;
