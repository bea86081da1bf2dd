//! A small RESP2/RESP3 client for tests that need byte-level control: one real connection,
//! raw pipelining, `MULTI`, subscribed mode, push frames, and noticing when the server closes
//! the connection. Also the RESP reply parser and command parser the fakes use.
//!
//! ```ignore
//! let mut c = RespClient::connect(proxy.addr()).await;
//! assert_eq!(c.cmd(&["SET", "k", "v"]).await, Value::ok());
//! c.send(&["GET", "k"]).await;                 // pipelined …
//! c.send(&["PING"]).await;
//! assert_eq!(c.read().await, Value::bulk("v")); // … replies in order
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TestPki;

/// How long [`RespClient::read`] and [`RespClient::cmd`] wait for a reply before panicking.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One RESP2 or RESP3 value, as received.
#[derive(Clone, PartialEq)]
pub enum Value {
    /// `+…`
    Simple(String),
    /// `-…` or `!…` (blob error)
    Error(String),
    /// `:…`
    Int(i64),
    /// `$…`
    Bulk(Vec<u8>),
    /// `$-1`, `*-1` (RESP2) or `_` (RESP3)
    Nil,
    /// `*…`
    Array(Vec<Value>),
    /// `%…` (RESP3), in wire order
    Map(Vec<(Value, Value)>),
    /// `~…` (RESP3)
    Set(Vec<Value>),
    /// `>…` (RESP3 out-of-band push: pub/sub messages, invalidations)
    Push(Vec<Value>),
    /// `,…` (RESP3)
    Double(f64),
    /// `#t` / `#f` (RESP3)
    Bool(bool),
    /// `(…` (RESP3)
    BigNumber(String),
    /// `=…` (RESP3): format (e.g. `txt`) and text
    Verbatim(String, Vec<u8>),
}

impl Value {
    /// `+OK`
    pub fn ok() -> Value {
        Value::Simple("OK".into())
    }

    /// A simple string.
    pub fn simple(s: &str) -> Value {
        Value::Simple(s.into())
    }

    /// A bulk string.
    pub fn bulk(s: impl AsRef<[u8]>) -> Value {
        Value::Bulk(s.as_ref().to_vec())
    }

    /// An array of bulk strings.
    pub fn bulks(items: &[&str]) -> Value {
        Value::Array(items.iter().map(Value::bulk).collect())
    }

    /// True for `+OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Value::Simple(s) if s == "OK")
    }

    /// True for an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Value::Error(_))
    }

    /// The error text (e.g. `WRONGPASS invalid username-password pair …`), if an error.
    pub fn error(&self) -> Option<&str> {
        match self {
            Value::Error(e) => Some(e),
            _ => None,
        }
    }

    /// True for an error whose first word is `code` (e.g. `"WRONGPASS"`, `"NOAUTH"`).
    pub fn is_error_code(&self, code: &str) -> bool {
        self.error()
            .is_some_and(|e| e.split_whitespace().next() == Some(code))
    }

    /// True for a RESP3 push frame.
    pub fn is_push(&self) -> bool {
        matches!(self, Value::Push(_))
    }

    /// The text of a simple, bulk or verbatim string (lossy UTF-8).
    pub fn as_str(&self) -> Option<String> {
        match self {
            Value::Simple(s) => Some(s.clone()),
            Value::Bulk(b) | Value::Verbatim(_, b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// The integer of an `Int`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The elements of an array, set or push frame.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) | Value::Set(v) | Value::Push(v) => Some(v),
            _ => None,
        }
    }

    /// For a RESP3 map (or a RESP2 flat array of key/value pairs, as `HELLO 2` returns): the
    /// value stored under the string key `key`.
    pub fn map_get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_str().as_deref() == Some(key))
                .map(|(_, v)| v),
            Value::Array(items) => items
                .chunks(2)
                .find(|kv| kv.len() == 2 && kv[0].as_str().as_deref() == Some(key))
                .map(|kv| &kv[1]),
            _ => None,
        }
    }

    /// Encodes the value back to RESP (RESP3 types where needed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        fn agg(out: &mut Vec<u8>, prefix: u8, items: &[Value]) {
            out.push(prefix);
            out.extend_from_slice(format!("{}\r\n", items.len()).as_bytes());
            for item in items {
                item.encode_into(out);
            }
        }
        match self {
            Value::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Error(e) => out.extend_from_slice(format!("-{e}\r\n").as_bytes()),
            Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            Value::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Nil => out.extend_from_slice(b"_\r\n"),
            Value::Array(v) => agg(out, b'*', v),
            Value::Set(v) => agg(out, b'~', v),
            Value::Push(v) => agg(out, b'>', v),
            Value::Map(pairs) => {
                out.extend_from_slice(format!("%{}\r\n", pairs.len()).as_bytes());
                for (k, v) in pairs {
                    k.encode_into(out);
                    v.encode_into(out);
                }
            }
            Value::Double(d) => out.extend_from_slice(format!(",{d}\r\n").as_bytes()),
            Value::Bool(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            Value::BigNumber(n) => out.extend_from_slice(format!("({n}\r\n").as_bytes()),
            Value::Verbatim(f, b) => {
                out.extend_from_slice(format!("={}\r\n{f}:", b.len() + 4).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Simple(s) => write!(f, "+{s:?}"),
            Value::Error(e) => write!(f, "-{e:?}"),
            Value::Int(i) => write!(f, ":{i}"),
            Value::Bulk(b) => write!(f, "${:?}", String::from_utf8_lossy(b)),
            Value::Nil => write!(f, "nil"),
            Value::Array(v) => write!(f, "*{v:?}"),
            Value::Set(v) => write!(f, "~{v:?}"),
            Value::Push(v) => write!(f, ">{v:?}"),
            Value::Map(m) => {
                write!(f, "%")?;
                f.debug_map()
                    .entries(m.iter().map(|(k, v)| (k, v)))
                    .finish()
            }
            Value::Double(d) => write!(f, ",{d}"),
            Value::Bool(b) => write!(f, "#{b}"),
            Value::BigNumber(n) => write!(f, "({n}"),
            Value::Verbatim(fmt_, b) => write!(f, "={fmt_}:{:?}", String::from_utf8_lossy(b)),
        }
    }
}

/// A RESP parse error: the bytes are not valid RESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

/// Finds the `\r\n`-terminated line starting at `pos`; returns (line, position after it).
fn line_at(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], pos + end + 2))
}

fn parse_int(line: &[u8]) -> Result<i64, ParseError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ParseError(format!("bad integer {:?}", String::from_utf8_lossy(line))))
}

/// Parses one RESP2/RESP3 value from the start of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the value and the number of bytes it took. RESP3 attributes (`|`) are
/// skipped: the value they decorate is returned.
pub fn parse_value(buf: &[u8]) -> Result<Option<(Value, usize)>, ParseError> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], pos: usize) -> Result<Option<(Value, usize)>, ParseError> {
    let Some((line, next)) = line_at(buf, pos) else {
        return Ok(None);
    };
    let Some((&kind, body)) = line.split_first() else {
        return Err(ParseError("empty line".into()));
    };
    let text = || String::from_utf8_lossy(body).into_owned();
    // Reads `n` elements starting at `at`.
    let elements = |n: i64, mut at: usize| -> Result<Option<(Vec<Value>, usize)>, ParseError> {
        let mut items = Vec::with_capacity(n.clamp(0, 1024) as usize);
        for _ in 0..n {
            match parse_at(buf, at)? {
                Some((v, after)) => {
                    items.push(v);
                    at = after;
                }
                None => return Ok(None),
            }
        }
        Ok(Some((items, at)))
    };
    // Reads a blob of `n` bytes plus CRLF at `next`.
    let blob = |n: i64| -> Result<Option<(Vec<u8>, usize)>, ParseError> {
        let n = usize::try_from(n).map_err(|_| ParseError(format!("bad length {n}")))?;
        if buf.len() < next + n + 2 {
            return Ok(None);
        }
        if &buf[next + n..next + n + 2] != b"\r\n" {
            return Err(ParseError("blob not terminated by CRLF".into()));
        }
        Ok(Some((buf[next..next + n].to_vec(), next + n + 2)))
    };
    let value = match kind {
        b'+' => (Value::Simple(text()), next),
        b'-' => (Value::Error(text()), next),
        b':' => (Value::Int(parse_int(body)?), next),
        b'_' => (Value::Nil, next),
        b'#' => (Value::Bool(body == b"t"), next),
        b',' => (
            Value::Double(
                text()
                    .parse()
                    .map_err(|_| ParseError(format!("bad double {}", text())))?,
            ),
            next,
        ),
        b'(' => (Value::BigNumber(text()), next),
        b'$' | b'!' | b'=' => {
            let n = parse_int(body)?;
            if n < 0 {
                (Value::Nil, next)
            } else {
                let Some((data, after)) = blob(n)? else {
                    return Ok(None);
                };
                let v = match kind {
                    b'$' => Value::Bulk(data),
                    b'!' => Value::Error(String::from_utf8_lossy(&data).into_owned()),
                    _ => {
                        // `=<len>\r\ntxt:<text>\r\n`
                        let (fmt_, rest) = data.split_at(data.len().min(4));
                        let fmt_ = String::from_utf8_lossy(fmt_)
                            .trim_end_matches(':')
                            .to_owned();
                        Value::Verbatim(fmt_, rest.to_vec())
                    }
                };
                (v, after)
            }
        }
        b'*' | b'~' | b'>' => {
            let n = parse_int(body)?;
            if n < 0 {
                (Value::Nil, next)
            } else {
                let Some((items, after)) = elements(n, next)? else {
                    return Ok(None);
                };
                let v = match kind {
                    b'*' => Value::Array(items),
                    b'~' => Value::Set(items),
                    _ => Value::Push(items),
                };
                (v, after)
            }
        }
        b'%' | b'|' => {
            let n = parse_int(body)?;
            let Some((items, after)) = elements(n.max(0) * 2, next)? else {
                return Ok(None);
            };
            if kind == b'|' {
                // An attribute decorates the value that follows it: skip it.
                return parse_at(buf, after);
            }
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            (Value::Map(pairs), after)
        }
        other => {
            return Err(ParseError(format!(
                "unknown RESP type byte {:?}",
                other as char
            )));
        }
    };
    Ok(Some(value))
}

/// A command as a client sent it, from the server's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedCommand {
    /// A RESP array of bulk strings (`*N\r\n$len\r\n…`): the arguments.
    Multibulk(Vec<Vec<u8>>),
    /// An inline command (first byte not `*`): one line, forwarded as is.
    Inline,
}

/// Parses one client command from the start of `buf`, the way Redis frames them: `Ok(None)`
/// when more bytes are needed, otherwise the command and its length in bytes. An `Err` means
/// Redis would answer with a protocol error.
pub fn parse_command(buf: &[u8]) -> Result<Option<(ParsedCommand, usize)>, ParseError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != b'*' {
        // Inline command: everything up to and including the next `\n`.
        return Ok(buf
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| (ParsedCommand::Inline, i + 1)));
    }
    let Some((line, mut pos)) = line_at(buf, 0) else {
        return Ok(None);
    };
    let n = parse_int(&line[1..])?;
    let mut args = Vec::with_capacity(n.clamp(0, 1024) as usize);
    for _ in 0..n.max(0) {
        let Some((line, next)) = line_at(buf, pos) else {
            return Ok(None);
        };
        if line.first() != Some(&b'$') {
            return Err(ParseError("expected '$' in a multibulk command".into()));
        }
        let len = usize::try_from(parse_int(&line[1..])?)
            .map_err(|_| ParseError("negative bulk length".into()))?;
        if buf.len() < next + len + 2 {
            return Ok(None);
        }
        args.push(buf[next..next + len].to_vec());
        pos = next + len + 2;
    }
    Ok(Some((ParsedCommand::Multibulk(args), pos)))
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Why [`RespClient::try_read`] returned no value.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing complete arrived within the timeout.
    Timeout,
    /// The server closed the connection (clean EOF or reset).
    Closed,
    /// The bytes received are not valid RESP.
    Protocol(ParseError),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One raw RESP connection (plain TCP or TLS). Replies are read one value at a time; RESP3
/// push frames come back like any other value (see [`RespClient::read_reply`] to skip them).
pub struct RespClient {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    /// Push frames skipped by [`RespClient::read_reply`], oldest first.
    pub pushes: Vec<Value>,
}

impl RespClient {
    /// Connects over plain TCP (e.g. to the proxy). Panics if the connection fails.
    pub async fn connect(addr: SocketAddr) -> RespClient {
        Self::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Connects over plain TCP.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<RespClient> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(Self::from_stream(tcp))
    }

    /// Connects over a Unix socket (for `--listen unix:/path`).
    pub async fn connect_unix(path: impl AsRef<std::path::Path>) -> std::io::Result<RespClient> {
        Ok(Self::from_stream(
            tokio::net::UnixStream::connect(path).await?,
        ))
    }

    /// Connects with TLS to `127.0.0.1:port` (redis-server or the fake Azure front), trusting
    /// the test CA. Panics if the connection fails.
    pub async fn connect_tls(port: u16, pki: &TestPki) -> RespClient {
        let tls = pki
            .connect(port)
            .await
            .unwrap_or_else(|e| panic!("TLS connect to 127.0.0.1:{port}: {e}"));
        Self::from_stream(tls)
    }

    fn from_stream(s: impl AsyncRead + AsyncWrite + Unpin + Send + 'static) -> RespClient {
        RespClient {
            stream: Box::new(s),
            buf: Vec::new(),
            pushes: Vec::new(),
        }
    }

    /// Sends one command (a RESP array of bulk strings) without reading its reply.
    pub async fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.send_raw(&encode_command(args)).await;
    }

    /// Sends raw bytes (pipelines, inline commands, malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.try_send_raw(bytes).await.expect("send to server");
    }

    /// Sends raw bytes, reporting an error instead of panicking (e.g. on a closed connection).
    pub async fn try_send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads the next value (reply or push), waiting up to `timeout`.
    pub async fn try_read(&mut self, timeout: Duration) -> Result<Value, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((v, n)) = parse_value(&self.buf).map_err(ReadError::Protocol)? {
                self.buf.drain(..n);
                return Ok(v);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads the next value (reply or push); panics after [`DEFAULT_READ_TIMEOUT`] or if the
    /// connection closed.
    pub async fn read(&mut self) -> Value {
        match self.try_read(DEFAULT_READ_TIMEOUT).await {
            Ok(v) => v,
            Err(e) => panic!("reading a RESP value: {e:?}"),
        }
    }

    /// Reads the next value that is not a RESP3 push frame (pushes are kept in
    /// [`Self::pushes`]); panics like [`Self::read`].
    pub async fn read_reply(&mut self) -> Value {
        loop {
            match self.read().await {
                Value::Push(p) => self.pushes.push(Value::Push(p)),
                v => return v,
            }
        }
    }

    /// Sends a command and returns its reply (skipping push frames).
    pub async fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Value {
        self.send(args).await;
        self.read_reply().await
    }

    /// Asserts that nothing arrives within `d` (the connection stays open and silent).
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.try_read(d).await {
            Err(ReadError::Timeout) => {}
            other => panic!("expected silence for {d:?}, got {other:?}"),
        }
    }

    /// Waits up to `timeout` for the server to close the connection. Returns how long that
    /// took, or `None` if it is still open. Values that arrive meanwhile are discarded (and
    /// printed, to help debugging).
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_read(left).await {
                Ok(v) => eprintln!("wait_closed: discarding {v:?}"),
                Err(ReadError::Closed) => return Some(start.elapsed()),
                Err(ReadError::Protocol(e)) => panic!("protocol error while waiting: {e:?}"),
                Err(ReadError::Timeout) => return None,
            }
        }
    }

    /// Closes the connection from our side.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}
