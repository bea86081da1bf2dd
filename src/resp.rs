//! Just enough RESP to delimit frames while relaying them untouched.
//!
//! The relay must know where each request and each reply ends, so that an injected `AUTH` lands
//! between two client commands and its reply is taken out of the stream in order. It does not
//! need the values. [`Scanner`] is a resumable state machine that walks RESP2/RESP3 frames as
//! bytes arrive and reports frame boundaries; it never copies or allocates per frame, and it does
//! not need a whole frame in memory (a 512 MB value streams through a 64 KiB buffer).
//!
//! **Requests are delimited exactly as Redis 7.0 delimits them** (`processInlineBuffer` and
//! `processMultibulkBuffer` in `networking.c`), because a proxy that claims to be invisible must
//! accept what Redis accepts, refuse what Redis refuses, and say so in Redis's words: the error
//! texts are Redis's own (`Protocol error: expected '$', got 'f'`), the two bytes after a bulk
//! payload are skipped without being checked (Redis does the same), a line is searched for with
//! C-string semantics (a NUL byte hides the rest of the buffer, as `strchr` does), lengths are
//! parsed like `string2ll`, and the limits are Redis's (`INT_MAX` arguments, 64 KiB for a header
//! or inline line, and the stricter "unauthenticated" limits before `--listen-password` was
//! given). The only limit not mirrored is `proto-max-bulk-len`: it is a server setting the proxy
//! can't see, so an oversized bulk is forwarded and refused by the server itself.
//!
//! **Replies are trusted to be RESP** (the server is Redis): any type, any length, and any
//! nesting depth, walked without recursion. The stack of open aggregates is run-length encoded,
//! so a reply nested a million levels deep (a Lua table that contains itself) costs one entry.
//!
//! Why not `redis_protocol`'s decoders here: they parse complete frames only (a large value would
//! have to be buffered whole, so a client could grow the proxy's memory at will) and build a
//! `Vec` per array (an allocation per command on the hot path). `redis_protocol` is used where a
//! frame is small and its values matter, and as the tests' oracle.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Longest header or inline line Redis waits for (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_LINE: usize = 64 * 1024;
/// Most arguments in a command (Redis refuses a multibulk length over `INT_MAX`).
const MAX_ARGS: i64 = i32::MAX as i64;
/// Before authentication, Redis refuses commands with more arguments than this.
const UNAUTH_MAX_ARGS: i64 = 10;
/// Before authentication, Redis refuses bulk strings longer than this.
const UNAUTH_MAX_BULK: i64 = 16384;
/// Distinct entries of the run-length-encoded aggregate stack before a reply is refused: only a
/// hostile server could need more (Redis's own deepest replies are runs of `*1`, one entry).
const MAX_STACK_ENTRIES: usize = 1 << 20;
/// A stack that grew beyond this many entries gives its memory back after the frame.
const STACK_KEEP: usize = 64;

/// Which side's grammar a scanner follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// Client commands: a multibulk of bulk strings, or an inline line (Redis's rules).
    Request,
    /// Server replies: any RESP2/RESP3 type, including pushes and attributes.
    Reply,
}

/// Malformed input. For requests, [`ProtocolError::reply`] is the error Redis itself sends
/// before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// No `\n` within 64 KiB of an inline command.
    TooBigInline,
    /// Unbalanced quotes in an inline command.
    UnbalancedQuotes,
    /// No `\r` within 64 KiB of a `*` header.
    TooBigMultibulkCount,
    /// A `*` header that is not a number, or over `INT_MAX`.
    InvalidMultibulkLength,
    /// More than 10 arguments before authentication.
    UnauthenticatedMultibulkLength,
    /// No `\r` within 64 KiB of a `$` header.
    TooBigBulkCount,
    /// Something other than `$` where a bulk string must start (the byte found).
    ExpectedDollar(u8),
    /// A `$` header that is not a non-negative number.
    InvalidBulkLength,
    /// A bulk string over 16 KiB before authentication.
    UnauthenticatedBulkLength,
    /// A reply that is not RESP (only a broken or hostile server sends one).
    Reply(&'static str),
}

impl ProtocolError {
    /// The message, as Redis words it (without `-ERR `).
    pub fn message(&self) -> String {
        match self {
            ProtocolError::TooBigInline => "Protocol error: too big inline request".into(),
            ProtocolError::UnbalancedQuotes => {
                "Protocol error: unbalanced quotes in request".into()
            }
            ProtocolError::TooBigMultibulkCount => {
                "Protocol error: too big mbulk count string".into()
            }
            ProtocolError::InvalidMultibulkLength => {
                "Protocol error: invalid multibulk length".into()
            }
            ProtocolError::UnauthenticatedMultibulkLength => {
                "Protocol error: unauthenticated multibulk length".into()
            }
            ProtocolError::TooBigBulkCount => "Protocol error: too big bulk count string".into(),
            // Redis's error replies never carry a CR or LF: it maps them to spaces.
            ProtocolError::ExpectedDollar(b) => {
                let shown = if matches!(b, b'\r' | b'\n') { b' ' } else { *b };
                let mut text = b"Protocol error: expected '$', got '".to_vec();
                text.push(shown);
                text.push(b'\'');
                String::from_utf8_lossy(&text).into_owned()
            }
            ProtocolError::InvalidBulkLength => "Protocol error: invalid bulk length".into(),
            ProtocolError::UnauthenticatedBulkLength => {
                "Protocol error: unauthenticated bulk length".into()
            }
            ProtocolError::Reply(what) => format!("Protocol error: {what}"),
        }
    }

    /// The error reply Redis sends for this request error (`-ERR …\r\n`), byte for byte
    /// (including a non-UTF-8 byte after `got '`).
    pub fn reply(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_slice(b"-ERR ");
        match self {
            ProtocolError::ExpectedDollar(b) => {
                out.put_slice(b"Protocol error: expected '$', got '");
                out.put_u8(if matches!(b, b'\r' | b'\n') { b' ' } else { *b });
                out.put_u8(b'\'');
            }
            other => out.put_slice(other.message().as_bytes()),
        }
        out.put_slice(b"\r\n");
        out.freeze()
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for ProtocolError {}

/// A frame the scanner finished: it occupies `buf[..len]` of the buffer that was scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Length in bytes, counted from the front of the buffer.
    pub len: usize,
    /// The RESP type byte of the frame (after any attribute), or `b'i'` for an inline command
    /// (which may be an empty line: Redis ignores those).
    pub kind: u8,
}

/// One run of open aggregates in a reply: `count` nested aggregates that each still expect
/// `remaining` elements (run-length encoding keeps deep nesting cheap).
#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    attribute: bool,
    count: u32,
}

/// A resumable frame delimiter for one direction of one connection.
///
/// Call [`Scanner::scan`] with the unconsumed bytes of the stream (the current frame always
/// starts at offset 0). Bytes before [`Scanner::scanned`] are known to belong to the current
/// frame and may be forwarded before the frame ends; report that with [`Scanner::consumed`].
#[derive(Debug)]
pub struct Scanner {
    grammar: Grammar,
    /// Bytes of the current frame already walked, from the front of the buffer.
    scanned: usize,
    /// Bulk payload bytes still to skip, including the two that end it.
    bulk_left: u64,
    /// Requests: bulk strings still expected in the current command.
    args_left: u64,
    /// Replies: open aggregates, innermost last.
    stack: Vec<Level>,
    /// Type byte of the current frame, once known.
    kind: Option<u8>,
    /// Requests: Redis's limits for a connection that has not authenticated apply.
    unauthenticated: bool,
}

impl Scanner {
    /// A scanner positioned at the start of a stream.
    pub fn new(grammar: Grammar) -> Self {
        Scanner {
            grammar,
            scanned: 0,
            bulk_left: 0,
            args_left: 0,
            stack: Vec::new(),
            kind: None,
            unauthenticated: false,
        }
    }

    /// Applies (or lifts) Redis's limits for unauthenticated connections: at most 10 arguments
    /// and 16 KiB per bulk string.
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// Bytes at the front of the buffer known to belong to the current, unfinished frame.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// The type byte of the current frame once its first line has been read.
    pub fn kind(&self) -> Option<u8> {
        self.kind
    }

    /// Payload bytes the current bulk string still declares (0 outside one): a large one means
    /// the frame will not fit any buffer, so it must stream (or be refused) at once.
    pub fn bulk_pending(&self) -> u64 {
        self.bulk_left
    }

    /// True when no byte of a frame has been seen yet (a frame boundary).
    pub fn at_boundary(&self) -> bool {
        self.scanned == 0 && self.kind.is_none() && self.bulk_left == 0
    }

    /// The caller removed `n` bytes of the current frame from the buffer front (forwarded them).
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.scanned);
        self.scanned -= n;
    }

    /// Forgets the frame in progress (after a protocol error, or when a held frame is
    /// rescanned from its start later).
    pub fn reset(&mut self) {
        self.finish();
        self.bulk_left = 0;
        self.args_left = 0;
    }

    /// Walks `buf` (which starts at the current frame's first unconsumed byte).
    ///
    /// Returns `Ok(Some(frame))` when a frame ends inside `buf` (the scanner is then reset for
    /// the next one, which starts at `buf[frame.len..]`), `Ok(None)` when more bytes are needed.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        match self.grammar {
            Grammar::Request => self.scan_request(buf),
            Grammar::Reply => self.scan_reply(buf),
        }
    }

    /// Skips bulk payload bytes; true once the payload and the two bytes after it are in.
    fn skip_payload(&mut self, buf: &[u8]) -> bool {
        let avail = (buf.len() - self.scanned) as u64;
        let take = avail.min(self.bulk_left);
        self.scanned += take as usize;
        self.bulk_left -= take;
        self.bulk_left == 0
    }

    // ----- requests ----------------------------------------------------------------------

    fn scan_request(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if self.kind.is_none() {
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            if first != b'*' {
                return self.scan_inline(buf);
            }
            let Some((line, used)) = header_line(buf, 0, ProtocolError::TooBigMultibulkCount)?
            else {
                return Ok(None);
            };
            let n = string2ll(line)
                .filter(|&n| n <= MAX_ARGS)
                .ok_or(ProtocolError::InvalidMultibulkLength)?;
            if self.unauthenticated && n > UNAUTH_MAX_ARGS {
                return Err(ProtocolError::UnauthenticatedMultibulkLength);
            }
            self.kind = Some(b'*');
            self.scanned = used;
            if n <= 0 {
                return Ok(Some(self.finish())); // Redis ignores `*0` and `*-1`
            }
            self.args_left = n as u64;
        }
        loop {
            if self.bulk_left > 0 {
                if !self.skip_payload(buf) {
                    return Ok(None);
                }
                self.args_left -= 1;
                if self.args_left == 0 {
                    return Ok(Some(self.finish()));
                }
            }
            let at = self.scanned;
            let Some((line, used)) = header_line(buf, at, ProtocolError::TooBigBulkCount)? else {
                return Ok(None);
            };
            if buf[at] != b'$' {
                return Err(ProtocolError::ExpectedDollar(buf[at]));
            }
            let n = string2ll(line)
                .filter(|&n| n >= 0)
                .ok_or(ProtocolError::InvalidBulkLength)?;
            if self.unauthenticated && n > UNAUTH_MAX_BULK {
                return Err(ProtocolError::UnauthenticatedBulkLength);
            }
            self.scanned = at + used;
            self.bulk_left = n as u64 + 2;
        }
    }

    /// An inline command: one line up to `\n`, which a NUL byte hides (Redis uses `strchr`).
    fn scan_inline(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        debug_assert_eq!(self.scanned, 0);
        match buf.iter().position(|&b| b == b'\n' || b == 0) {
            Some(i) if buf[i] == b'\n' => {
                self.kind = Some(b'i');
                self.scanned = i + 1;
                Ok(Some(self.finish()))
            }
            _ if buf.len() > MAX_LINE => Err(ProtocolError::TooBigInline),
            _ => Ok(None),
        }
    }

    // ----- replies -----------------------------------------------------------------------

    fn scan_reply(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if self.bulk_left > 0 {
                if !self.skip_payload(buf) {
                    return Ok(None);
                }
                if self.element_done() {
                    return Ok(Some(self.finish()));
                }
                continue;
            }
            let at = self.scanned;
            let Some(&ty) = buf.get(at) else {
                return Ok(None);
            };
            let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
                return Ok(None);
            };
            let end = at + nl + 1;
            let line = &buf[at + 1..end.saturating_sub(2).max(at + 1)];
            self.scanned = end;
            if self.stack.is_empty() && self.kind.is_none() && ty != b'|' {
                self.kind = Some(ty);
            }
            if self.reply_header(ty, line)? {
                return Ok(Some(self.finish()));
            }
        }
    }

    /// Handles one reply header line; true when it completed the top-level frame.
    fn reply_header(&mut self, ty: u8, line: &[u8]) -> Result<bool, ProtocolError> {
        match ty {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(self.element_done()),
            b'$' | b'!' | b'=' => match string2ll(line) {
                Some(-1) => Ok(self.element_done()),
                Some(n) if n >= 0 => {
                    self.bulk_left = n as u64 + 2;
                    Ok(false)
                }
                _ => Err(ProtocolError::Reply("invalid bulk length in reply")),
            },
            b'*' | b'~' | b'>' => self.open_reply(line, 1, false),
            b'%' => self.open_reply(line, 2, false),
            b'|' => self.open_reply(line, 2, true),
            _ => Err(ProtocolError::Reply("unknown reply type")),
        }
    }

    fn open_reply(
        &mut self,
        line: &[u8],
        per: u64,
        attribute: bool,
    ) -> Result<bool, ProtocolError> {
        match string2ll(line) {
            Some(-1) => Ok(self.element_done()),
            Some(0) if attribute => Ok(false),
            Some(0) => Ok(self.element_done()),
            Some(n) if n > 0 => {
                let remaining = (n as u64)
                    .checked_mul(per)
                    .ok_or(ProtocolError::Reply("invalid aggregate length in reply"))?;
                self.push_level(remaining, attribute)?;
                Ok(false)
            }
            _ => Err(ProtocolError::Reply("invalid aggregate length in reply")),
        }
    }

    fn push_level(&mut self, remaining: u64, attribute: bool) -> Result<(), ProtocolError> {
        if let Some(top) = self.stack.last_mut()
            && top.remaining == remaining
            && top.attribute == attribute
            && top.count < u32::MAX
        {
            top.count += 1;
            return Ok(());
        }
        if self.stack.len() >= MAX_STACK_ENTRIES {
            return Err(ProtocolError::Reply("reply nested too irregularly"));
        }
        self.stack.push(Level {
            remaining,
            attribute,
            count: 1,
        });
        Ok(())
    }

    /// One element finished; closes the aggregates it completes. True when the frame is done.
    fn element_done(&mut self) -> bool {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return true;
            };
            if top.remaining > 1 {
                // Only the innermost aggregate of the run got an element.
                if top.count > 1 {
                    top.count -= 1;
                    let inner = Level {
                        remaining: top.remaining - 1,
                        attribute: top.attribute,
                        count: 1,
                    };
                    self.stack.push(inner);
                } else {
                    top.remaining -= 1;
                }
                return false;
            }
            if top.attribute {
                // An attribute annotates the element that follows; it is not an element itself.
                if top.count > 1 {
                    top.count -= 1;
                } else {
                    self.stack.pop();
                }
                return false;
            }
            // A run of aggregates each waiting for its last element: all of them complete, and
            // the outermost is an element of the level below.
            self.stack.pop();
        }
    }

    /// Resets for the next frame and describes the one that ended.
    fn finish(&mut self) -> Frame {
        let frame = Frame {
            len: self.scanned,
            kind: self.kind.unwrap_or(b'?'),
        };
        self.scanned = 0;
        self.kind = None;
        self.stack.clear();
        if self.stack.capacity() > STACK_KEEP {
            self.stack.shrink_to(STACK_KEEP);
        }
        frame
    }
}

/// A request header line at `buf[at..]`, found like Redis finds it: the first `\r` (a NUL byte
/// first means "not found"), plus one more byte that Redis skips without looking at. Returns the
/// bytes between the type byte and the `\r`, and how many bytes the line takes. More than 64 KiB
/// without a `\r` is `too_big`.
fn header_line(
    buf: &[u8],
    at: usize,
    too_big: ProtocolError,
) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\r' || b == 0) {
        Some(cr) if rest[cr] == b'\r' => {
            if cr + 2 > rest.len() {
                return Ok(None);
            }
            Ok(Some((&rest[cr.min(1)..cr], cr + 2)))
        }
        _ if rest.len() > MAX_LINE => Err(too_big),
        _ => Ok(None),
    }
}

/// Parses a length like Redis's `string2ll`: optional `-`, no `+`, no leading zeros (but "0"),
/// at most 20 characters, no overflow.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) if !rest.is_empty() => (true, rest),
        Some((b'-', _)) => return None,
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// The arguments of a multibulk command, without copying. On a frame that is still arriving,
/// it yields the arguments that are complete.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    buf: &'a [u8],
    pos: usize,
    left: usize,
    total: usize,
}

impl<'a> Args<'a> {
    /// Iterates the bulk strings of a multibulk `frame` (as delimited by [`Scanner`]).
    pub fn new(frame: &'a [u8]) -> Self {
        let mut args = Args {
            buf: frame,
            pos: 0,
            left: 0,
            total: 0,
        };
        if let Some((n, next)) = read_header(frame, 0) {
            args.left = usize::try_from(n).unwrap_or(0);
            args.total = args.left;
            args.pos = next;
        }
        args
    }

    /// How many arguments are left.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// How many arguments the command has in all.
    pub fn argc(&self) -> usize {
        self.total
    }
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let (len, start) = read_header(self.buf, self.pos)?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let arg = self.buf.get(start..end)?;
        if end + 2 > self.buf.len() {
            return None;
        }
        self.pos = end + 2;
        self.left -= 1;
        Some(arg)
    }
}

/// Reads `<type><number>\r?` at `pos` (Redis's header rule: up to the `\r`, one more byte):
/// the number and the offset after the line.
fn read_header(buf: &[u8], pos: usize) -> Option<(i64, usize)> {
    let rest = buf.get(pos..)?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    if cr + 2 > rest.len() {
        return None;
    }
    let n = string2ll(rest.get(1..cr)?)?;
    Some((n, pos + cr + 2))
}

/// Encodes a command as a RESP multibulk of bulk strings (used for the few commands the proxy
/// writes itself: `AUTH`, `SELECT`, `HELLO`, re-issued blocking commands, inline commands).
pub fn encode_command(args: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    push_header(&mut out, b'*', args.len());
    for arg in args {
        push_header(&mut out, b'$', arg.len());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

/// Appends `<ty><n>\r\n` (no allocation: `BytesMut` formats in place).
pub fn push_header(out: &mut BytesMut, ty: u8, n: usize) {
    use std::fmt::Write;
    out.put_u8(ty);
    let _ = write!(out, "{n}");
    out.put_slice(b"\r\n");
}

/// Splits an inline command line into arguments exactly as Redis's `sdssplitargs` does:
/// whitespace-separated, `"double quotes"` with `\n \r \t \b \a \xHH` escapes, `'single quotes'`
/// with `\'`, and a closing quote that must be followed by a space or the end. `None` on
/// unbalanced quotes (Redis: `Protocol error: unbalanced quotes in request`). The line ends at
/// its first NUL byte (C-string semantics), which Redis's framing guarantees is not there.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = match line.iter().position(|&b| b == 0) {
        Some(nul) => &line[..nul],
        None => line,
    };
    // `at(i)` reads like C: past the end is NUL.
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let is_space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(args);
        }
        let (mut inq, mut insq, mut done) = (false, false, false);
        let mut current = Vec::new();
        while !done {
            let c = at(p);
            if inq {
                if c == b'\\' && at(p + 1) == b'x' && is_hex(at(p + 2)) && is_hex(at(p + 3)) {
                    current.push(hex(at(p + 2)) * 16 + hex(at(p + 3)));
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    current.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    current.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    other => current.push(other),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        args.push(current);
    }
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// The top-level elements of a complete, flat reply aggregate (a push or an array of scalars):
/// `(type byte, payload)` for each, without copying. A nested aggregate ends the iteration.
pub fn reply_elements(frame: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = frame
        .iter()
        .position(|&b| b == b'\n')
        .map_or(frame.len(), |nl| nl + 1);
    std::iter::from_fn(move || {
        let ty = *frame.get(pos)?;
        let nl = frame[pos..].iter().position(|&b| b == b'\n')? + pos;
        let header = frame.get(pos + 1..nl.checked_sub(1)?)?;
        let (next, value) = match ty {
            b'$' | b'!' | b'=' => match string2ll(header)? {
                -1 => (nl + 1, &frame[nl + 1..nl + 1]),
                len => {
                    let start = nl + 1;
                    let end = start.checked_add(usize::try_from(len).ok()?)?;
                    (end + 2, frame.get(start..end)?)
                }
            },
            b'*' | b'%' | b'~' | b'>' | b'|' => return None,
            _ => (nl + 1, header),
        };
        pos = next;
        Some((ty, value))
    })
}

#[cfg(test)]
mod tests;
