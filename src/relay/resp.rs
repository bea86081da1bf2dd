//! Just enough RESP to delimit frames while relaying them untouched.
//!
//! The relay must know where each request and each reply ends, so that an injected `AUTH` lands
//! between two client commands and its reply is taken out of the stream in order. It does not
//! need the values. [`Scanner`] is a resumable state machine that walks RESP2/RESP3 frames as
//! bytes arrive and reports frame boundaries; it never copies or allocates per frame, and it does
//! not need a whole frame in memory (a 512 MB value streams through a 64 KiB buffer).
//!
//! Why not `redis_protocol`'s decoders here: they parse complete frames only (a large value would
//! have to be buffered whole, so a client could grow the proxy's memory at will) and build a
//! `Vec` per array (an allocation per command on the hot path). `redis_protocol` is used where a
//! frame is small and its values matter: the upstream handshake, `check`, and the tests' oracle.
//!
//! Limits follow Redis's own (`proto-max-bulk-len` 512 MB, 1M arguments, 64 KiB inline lines),
//! so a malformed or absurd frame is refused with a RESP protocol error, like Redis would.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Largest bulk string accepted (Redis's default `proto-max-bulk-len`).
pub const MAX_BULK_LEN: u64 = 512 * 1024 * 1024;
/// Most arguments in one command (Redis rejects larger multibulk lengths).
pub const MAX_ARGS: u64 = 1024 * 1024;
/// Most elements in one reply aggregate (a sanity bound; the upstream is Redis).
pub const MAX_REPLY_ELEMENTS: u64 = i32::MAX as u64;
/// Longest line: an inline command or a simple string/error (Redis's inline limit).
pub const MAX_LINE: usize = 64 * 1024;
/// Deepest nesting accepted in a reply.
const MAX_DEPTH: usize = 64;

/// Which side's grammar a scanner checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// Client commands: a multibulk of bulk strings, or an inline line.
    Request,
    /// Server replies: any RESP2/RESP3 type, including pushes and attributes.
    Reply,
}

/// Malformed input: the connection that sent it is closed with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// A frame the scanner finished: it occupies `buf[..len]` of the buffer that was scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Length in bytes, counted from the front of the buffer.
    pub len: usize,
    /// The RESP type byte of the frame (after any attribute), or `b'i'` for an inline command.
    pub kind: u8,
}

#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    attribute: bool,
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
    /// Bulk payload bytes still to skip, then the CRLF.
    bulk_left: u64,
    /// The two bytes after a bulk payload are still to be checked.
    crlf_pending: bool,
    /// Open aggregates, innermost last. The capacity is kept across frames.
    stack: Vec<Level>,
    /// Type byte of the current frame, once known.
    kind: Option<u8>,
}

impl Scanner {
    /// A scanner positioned at the start of a stream.
    pub fn new(grammar: Grammar) -> Self {
        Scanner {
            grammar,
            scanned: 0,
            bulk_left: 0,
            crlf_pending: false,
            stack: Vec::with_capacity(4),
            kind: None,
        }
    }

    /// Bytes at the front of the buffer known to belong to the current, unfinished frame.
    pub fn scanned(&self) -> usize {
        self.scanned
    }

    /// The type byte of the current frame once its first line has been read.
    pub fn kind(&self) -> Option<u8> {
        self.kind
    }

    /// True when no byte of a frame has been seen yet (a frame boundary).
    pub fn at_boundary(&self) -> bool {
        self.scanned == 0 && self.kind.is_none() && self.bulk_left == 0 && !self.crlf_pending
    }

    /// The caller removed `n` bytes of the current frame from the buffer front (forwarded them).
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.scanned);
        self.scanned -= n;
    }

    /// Walks `buf` (which starts at the current frame's first unconsumed byte).
    ///
    /// Returns `Ok(Some(frame))` when a frame ends inside `buf` (the scanner is then reset for
    /// the next one, which starts at `buf[frame.len..]`), `Ok(None)` when more bytes are needed.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if self.bulk_left > 0 || self.crlf_pending {
                if !self.skip_payload(buf)? {
                    return Ok(None);
                }
                if self.element_done() {
                    return Ok(Some(self.finish()));
                }
                continue;
            }
            let rest = &buf[self.scanned..];
            let Some(&first) = rest.first() else {
                return Ok(None);
            };
            if self.kind.is_none() && self.grammar == Grammar::Request && first != b'*' {
                return self.scan_inline(buf);
            }
            let Some(line) = find_line(rest)? else {
                return Ok(None);
            };
            self.scanned += line.len() + 3;
            if self.header(first, line)? {
                return Ok(Some(self.finish()));
            }
        }
    }

    /// Skips bulk payload bytes; true once the payload and its CRLF are complete.
    fn skip_payload(&mut self, buf: &[u8]) -> Result<bool, ProtocolError> {
        let avail = (buf.len() - self.scanned) as u64;
        let take = avail.min(self.bulk_left);
        self.scanned += take as usize;
        self.bulk_left -= take;
        if self.bulk_left > 0 {
            return Ok(false);
        }
        self.crlf_pending = true;
        let rest = &buf[self.scanned..];
        if rest.len() < 2 {
            return Ok(false);
        }
        if &rest[..2] != b"\r\n" {
            return Err(ProtocolError(
                "Protocol error: bulk string not followed by CRLF",
            ));
        }
        self.scanned += 2;
        self.crlf_pending = false;
        Ok(true)
    }

    /// An inline command: one line, terminated by `\n`.
    fn scan_inline(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        debug_assert_eq!(self.scanned, 0);
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < MAX_LINE => {
                self.kind = Some(b'i');
                self.scanned = i + 1;
                Ok(Some(self.finish()))
            }
            Some(_) => Err(ProtocolError("Protocol error: too big inline request")),
            None if buf.len() >= MAX_LINE => {
                Err(ProtocolError("Protocol error: too big inline request"))
            }
            None => Ok(None),
        }
    }

    /// Handles one header line; true when it completed the top-level frame.
    fn header(&mut self, ty: u8, line: &[u8]) -> Result<bool, ProtocolError> {
        let depth = self.stack.len();
        if depth == 0 && self.kind.is_none() && ty != b'|' {
            self.kind = Some(ty);
        }
        match self.grammar {
            Grammar::Request => self.request_header(ty, line, depth),
            Grammar::Reply => self.reply_header(ty, line, depth),
        }
    }

    fn request_header(&mut self, ty: u8, line: &[u8], depth: usize) -> Result<bool, ProtocolError> {
        match (depth, ty) {
            (0, b'*') => {
                let n = parse_len(line)
                    .filter(|&n| n <= MAX_ARGS as i64)
                    .ok_or(ProtocolError("Protocol error: invalid multibulk length"))?;
                self.open(n, false)
            }
            (_, b'$') => {
                let n = parse_len(line)
                    .filter(|&n| (0..=MAX_BULK_LEN as i64).contains(&n))
                    .ok_or(ProtocolError("Protocol error: invalid bulk length"))?;
                self.bulk_left = n as u64;
                self.crlf_pending = true;
                Ok(false)
            }
            _ => Err(ProtocolError("Protocol error: expected '$'")),
        }
    }

    fn reply_header(&mut self, ty: u8, line: &[u8], depth: usize) -> Result<bool, ProtocolError> {
        if depth >= MAX_DEPTH {
            return Err(ProtocolError("Protocol error: reply nested too deeply"));
        }
        match ty {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(self.element_done()),
            b'$' | b'!' | b'=' => match parse_len(line) {
                Some(-1) => Ok(self.element_done()),
                Some(n) if (0..=MAX_BULK_LEN as i64).contains(&n) => {
                    self.bulk_left = n as u64;
                    self.crlf_pending = true;
                    Ok(false)
                }
                _ => Err(ProtocolError(
                    "Protocol error: invalid bulk length in reply",
                )),
            },
            b'*' | b'~' | b'>' => self.open_reply(line, 1, false),
            b'%' => self.open_reply(line, 2, false),
            b'|' => self.open_reply(line, 2, true),
            _ => Err(ProtocolError("Protocol error: unknown reply type")),
        }
    }

    fn open_reply(
        &mut self,
        line: &[u8],
        per: u64,
        attribute: bool,
    ) -> Result<bool, ProtocolError> {
        match parse_len(line) {
            Some(-1) => Ok(self.element_done()),
            Some(n) if (0..=MAX_REPLY_ELEMENTS as i64).contains(&n) => {
                self.open(n * per as i64, attribute)
            }
            _ => Err(ProtocolError(
                "Protocol error: invalid aggregate length in reply",
            )),
        }
    }

    /// Opens an aggregate of `n` elements (or completes it at once when empty/null).
    fn open(&mut self, n: i64, attribute: bool) -> Result<bool, ProtocolError> {
        if n <= 0 {
            if attribute {
                return Ok(false);
            }
            return Ok(self.element_done());
        }
        self.stack.push(Level {
            remaining: n as u64,
            attribute,
        });
        Ok(false)
    }

    /// One element finished; closes the aggregates it completes. True when the frame is done.
    fn element_done(&mut self) -> bool {
        loop {
            let Some(top) = self.stack.last_mut() else {
                return true;
            };
            top.remaining -= 1;
            if top.remaining > 0 {
                return false;
            }
            let attribute = top.attribute;
            self.stack.pop();
            if attribute {
                // An attribute annotates the element that follows; it is not an element itself.
                return false;
            }
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
        frame
    }
}

/// Finds a CRLF-terminated line at the front of `rest`; returns the bytes between the type byte
/// and the CR (so `line.len() + 3` bytes were consumed).
fn find_line(rest: &[u8]) -> Result<Option<&[u8]>, ProtocolError> {
    let window = &rest[..rest.len().min(MAX_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i >= 2 && rest[i - 1] == b'\r' => Ok(Some(&rest[1..i - 1])),
        Some(_) => Err(ProtocolError("Protocol error: expected CRLF")),
        None if rest.len() >= MAX_LINE => Err(ProtocolError("Protocol error: too big line")),
        None => Ok(None),
    }
}

/// Parses a RESP length (`-1` allowed); `None` when it is not a decimal integer.
fn parse_len(line: &[u8]) -> Option<i64> {
    if line.is_empty() || line.len() > 20 {
        return None;
    }
    let (neg, digits) = match line[0] {
        b'-' => (true, &line[1..]),
        _ => (false, line),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -n } else { n })
}

/// The arguments of one complete, validated multibulk command, without copying.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    buf: &'a [u8],
    pos: usize,
    left: usize,
}

impl<'a> Args<'a> {
    /// Iterates the bulk strings of a complete multibulk `frame` (as delimited by [`Scanner`]).
    pub fn new(frame: &'a [u8]) -> Self {
        let mut args = Args {
            buf: frame,
            pos: 0,
            left: 0,
        };
        if let Some((n, next)) = read_header(frame, 0) {
            args.left = n.max(0) as usize;
            args.pos = next;
        }
        args
    }

    /// How many arguments are left.
    pub fn remaining(&self) -> usize {
        self.left
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
        self.pos = end + 2;
        self.left -= 1;
        Some(arg)
    }
}

/// Reads `<type><number>\r\n` at `pos`: the number and the offset after the line.
fn read_header(buf: &[u8], pos: usize) -> Option<(i64, usize)> {
    let rest = buf.get(pos..)?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let n = parse_len(rest.get(1..nl.checked_sub(1)?)?)?;
    Some((n, pos + nl + 1))
}

/// The top-level elements of a complete, flat reply aggregate (a push or an array of scalars):
/// `(type byte, payload)` for each, without copying.
pub fn reply_elements(frame: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = read_header(frame, 0)
        .map(|(_, next)| next)
        .unwrap_or(frame.len());
    std::iter::from_fn(move || {
        let ty = *frame.get(pos)?;
        let (line_end, value) = match ty {
            b'$' | b'!' | b'=' => {
                let (len, start) = read_header(frame, pos)?;
                if len < 0 {
                    (start, &frame[start..start])
                } else {
                    let end = start.checked_add(len as usize)?;
                    (end + 2, frame.get(start..end)?)
                }
            }
            _ => {
                let nl = frame[pos..].iter().position(|&b| b == b'\n')? + pos;
                (nl + 1, frame.get(pos + 1..nl.checked_sub(1)?)?)
            }
        };
        pos = line_end;
        Some((ty, value))
    })
}

/// Encodes a command as a RESP multibulk of bulk strings (used for the few commands the proxy
/// writes itself: `AUTH`, `SELECT`, `HELLO`, re-issued blocking commands).
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

fn push_header(out: &mut BytesMut, ty: u8, n: usize) {
    out.put_u8(ty);
    out.put_slice(n.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

/// Splits an inline command line into arguments (whitespace-separated, with Redis's double and
/// single quotes), so it can be handled like a multibulk command. `None` on unbalanced quotes.
pub fn split_inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut arg = Vec::new();
        match line[i] {
            q @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let &c = line.get(i)?;
                    i += 1;
                    if c == q {
                        break;
                    }
                    if c == b'\\' && q == b'"' {
                        arg.push(*line.get(i)?);
                        i += 1;
                    } else {
                        arg.push(c);
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
    Some(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(grammar: Grammar, input: &[u8]) -> Result<Vec<(usize, u8)>, ProtocolError> {
        let mut s = Scanner::new(grammar);
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(f) = s.scan(&input[pos..])? {
            out.push((f.len, f.kind));
            pos += f.len;
        }
        assert_eq!(pos + s.scanned(), pos + s.scanned(), "consistent");
        Ok(out)
    }

    #[test]
    fn delimits_pipelined_commands() {
        let input = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
        assert_eq!(
            frames(Grammar::Request, input).unwrap(),
            vec![(14, b'*'), (31, b'*')]
        );
    }

    #[test]
    fn delimits_inline_commands() {
        assert_eq!(
            frames(Grammar::Request, b"PING\r\nGET k\n").unwrap(),
            vec![(6, b'i'), (6, b'i')]
        );
    }

    #[test]
    fn byte_by_byte_gives_the_same_frames() {
        let input: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*1\r\n$4\r\nPING\r\n";
        let mut s = Scanner::new(Grammar::Request);
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for &b in input {
            buf.push(b);
            if let Some(f) = s.scan(&buf).unwrap() {
                ends.push(f.len);
                buf.drain(..f.len);
            }
        }
        assert_eq!(ends, vec![22, 14]);
        assert!(buf.is_empty() && s.at_boundary());
    }

    #[test]
    fn large_bulk_streams_without_the_whole_frame() {
        let mut s = Scanner::new(Grammar::Request);
        let head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n";
        assert_eq!(s.scan(head).unwrap(), None);
        assert_eq!(s.scanned(), head.len());
        s.consumed(head.len());
        let chunk = vec![b'x'; 400_000];
        for _ in 0..2 {
            assert_eq!(s.scan(&chunk).unwrap(), None);
            s.consumed(s.scanned());
        }
        let mut tail = vec![b'x'; 200_000];
        tail.extend_from_slice(b"\r\n");
        assert_eq!(
            s.scan(&tail).unwrap(),
            Some(Frame {
                len: tail.len(),
                kind: b'*'
            })
        );
    }

    #[test]
    fn delimits_resp3_replies_pushes_and_attributes() {
        let input: &[u8] = b"+OK\r\n%1\r\n+a\r\n:1\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n|1\r\n+k\r\n+v\r\n:5\r\n_\r\n*-1\r\n$-1\r\n*2\r\n*1\r\n:1\r\n~0\r\n";
        let kinds: Vec<u8> = frames(Grammar::Reply, input)
            .unwrap()
            .iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(kinds, b"+%>:_*$*".to_vec());
    }

    #[test]
    fn refuses_absurd_and_malformed_input() {
        for bad in [
            &b"*99999999999\r\n"[..],
            b"*1\r\n$999999999999\r\n",
            b"*1\r\n$-5\r\n",
            b"*1\r\n:5\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*x\r\n",
            b"*1\n",
        ] {
            assert!(
                frames(Grammar::Request, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(frames(Grammar::Request, &vec![b'a'; MAX_LINE + 1]).is_err());
        assert!(frames(Grammar::Reply, b"?x\r\n").is_err());
    }

    #[test]
    fn args_iterates_without_copying() {
        let f = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n";
        let args: Vec<&[u8]> = Args::new(f).collect();
        assert_eq!(args, vec![&b"SET"[..], b"k", b""]);
    }

    #[test]
    fn reply_elements_of_a_push() {
        let f = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        let e: Vec<(u8, &[u8])> = reply_elements(f).collect();
        assert_eq!(
            e,
            vec![(b'$', &b"subscribe"[..]), (b'$', b"ch"), (b':', b"1")]
        );
    }

    #[test]
    fn encode_and_inline_split() {
        assert_eq!(
            &encode_command(&[b"AUTH", b"pw"])[..],
            b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"
        );
        assert_eq!(
            split_inline(b"set k \"a b\"\r\n").unwrap(),
            vec![b"set".to_vec(), b"k".to_vec(), b"a b".to_vec()]
        );
        assert_eq!(split_inline(b"set \"open\r\n"), None);
    }

    #[test]
    fn agrees_with_redis_protocol_on_replies() {
        // redis-protocol is the oracle: the same boundaries for a mixed RESP3 stream.
        let input: &[u8] = b"*2\r\n$3\r\nfoo\r\n%1\r\n+a\r\n,1.5\r\n>2\r\n+x\r\n#t\r\n";
        let mut pos = 0;
        let mut theirs = Vec::new();
        while let Some((_, len)) =
            redis_protocol::resp3::decode::complete::decode(&input[pos..]).unwrap()
        {
            theirs.push(len);
            pos += len;
        }
        let ours: Vec<usize> = frames(Grammar::Reply, input)
            .unwrap()
            .iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(ours, theirs);
    }
}
