//! Differential testing: the same bytes sent to Redis directly and through the proxy, and what
//! each client sees compared.
//!
//! Redis is the oracle. A [`Script`] is a list of steps on a few numbered connections (send
//! these bytes on connection `n`, pause, close); [`play`] runs it against one address and
//! records, for every connection, what it received after each step ([`Transcript`]). After
//! each step every connection is read until all of them have been quiet for a moment, so what
//! arrives is attributed to the step that caused it on both paths alike. [`compare`] then
//! parses both transcripts into RESP values, normalises what differs by nature (client ids,
//! `MONITOR` timestamps and addresses, the lines of the proxy's own commands in a feed), and
//! reports the first difference with the script that produced it.
//!
//! The direct path is a plaintext `redis-server` without a password ([`PlainRedis`]); the
//! proxied path is the proxy in front of the TLS server of a [`super::Setup`]. Both servers
//! run with the same settings that matter for replies.

use super::resp::{Value, parse_value};

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A plaintext `redis-server` without a password: the direct path of a comparison.
pub struct PlainRedis {
    child: Child,
    _dir: TempDir,
    port: u16,
}

impl PlainRedis {
    /// Starts one and waits until it answers `PING`.
    pub async fn start() -> PlainRedis {
        let dir = tempfile::Builder::new()
            .prefix("test-plain-redis-")
            .tempdir()
            .expect("temp dir");
        for _ in 0..5 {
            let port = super::redis_server::free_port();
            let child = Command::new(redis_binary())
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--enable-debug-command",
                    "local",
                    "--dir",
                ])
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut server = PlainRedis {
                child,
                _dir: tempfile::tempdir().expect("temp dir"),
                port,
            };
            if server.wait_ready().await {
                server._dir = dir;
                return server;
            }
            let _ = server.child.kill();
        }
        panic!("plain redis-server did not start");
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(self.addr()).await {
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 16];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
                    && buf[..n].starts_with(b"+PONG")
                {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for PlainRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_binary() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// One step of a script.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes on connection `n`. `{id:m}` in them is replaced by connection `m`'s
    /// `CLIENT ID` on the path being played (learnt before the script starts).
    Send(usize, Vec<u8>),
    /// Wait at least this long before the next step (e.g. for a blocking command's timeout).
    Pause(Duration),
    /// Close connection `n` from the client's side.
    Close(usize),
}

/// A scenario: `connections` connections and the steps to play on them.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// How many connections to open.
    pub connections: usize,
    /// What to do, in order.
    pub steps: Vec<Step>,
}

impl Script {
    /// The script as text, for a failure report.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, step) in self.steps.iter().enumerate() {
            let _ = match step {
                Step::Send(n, bytes) => writeln!(
                    out,
                    "  {i:3}: conn {n} <- {:?}",
                    String::from_utf8_lossy(bytes)
                ),
                Step::Pause(d) => writeln!(out, "  {i:3}: pause {d:?}"),
                Step::Close(n) => writeln!(out, "  {i:3}: close conn {n}"),
            };
        }
        out
    }
}

/// What every connection received, step by step.
#[derive(Debug, Default)]
pub struct Transcript {
    /// `received[conn][step]`: the bytes that arrived on `conn` after `step` was played.
    pub received: Vec<Vec<Vec<u8>>>,
    /// The step after which each connection was found closed by the other side, if it was.
    pub closed: Vec<Option<usize>>,
}

enum Arrival {
    Bytes(usize, Vec<u8>),
    Closed(usize),
}

/// Plays `script` against `addr`. After each step, every connection is read until all have
/// been quiet for `quiet` (at most `settle_cap`).
pub async fn play(addr: SocketAddr, script: &Script, quiet: Duration) -> Transcript {
    let settle_cap = Duration::from_secs(5);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut writers = Vec::new();
    let mut ids = Vec::new();
    // Learnt only when the script names them: `CLIENT ID` is itself a command that matters
    // (a multiplexing proxy gives a client that sends it a connection of its own).
    let wants_ids = script
        .steps
        .iter()
        .any(|s| matches!(s, Step::Send(_, b) if b.windows(4).any(|w| w == b"{id:")));
    for n in 0..script.connections {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        if wants_ids {
            ids.push(client_id(&mut stream).await);
        }
        let (mut rd, wr) = stream.into_split();
        writers.push(Some(wr));
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Arrival::Closed(n));
                        return;
                    }
                    Ok(k) => {
                        if tx.send(Arrival::Bytes(n, buf[..k].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(tx);
    let mut t = Transcript {
        received: vec![vec![Vec::new(); script.steps.len()]; script.connections],
        closed: vec![None; script.connections],
    };
    for (i, step) in script.steps.iter().enumerate() {
        let mut linger = quiet;
        match step {
            Step::Send(n, bytes) => {
                let bytes = substitute_ids(bytes, &ids);
                if let Some(w) = writers[*n].as_mut()
                    && w.write_all(&bytes).await.is_err()
                {
                    writers[*n] = None;
                }
            }
            Step::Pause(d) => linger = linger.max(*d),
            Step::Close(n) => {
                if let Some(mut w) = writers[*n].take() {
                    let _ = w.shutdown().await;
                }
            }
        }
        let start = Instant::now();
        let mut last = Instant::now();
        let min_end = start + linger;
        loop {
            let wait_until = (last + quiet).max(min_end).min(start + settle_cap);
            match tokio::time::timeout_at(wait_until.into(), rx.recv()).await {
                Ok(Some(Arrival::Bytes(n, b))) => {
                    t.received[n][i].extend_from_slice(&b);
                    last = Instant::now();
                }
                Ok(Some(Arrival::Closed(n))) => {
                    t.closed[n].get_or_insert(i);
                    writers[n] = None;
                    last = Instant::now();
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
    t
}

/// Asks a fresh connection for its `CLIENT ID` (before the script: not part of a transcript).
async fn client_id(stream: &mut TcpStream) -> i64 {
    stream
        .write_all(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n")
        .await
        .expect("send CLIENT ID");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("CLIENT ID in time")
            .expect("read CLIENT ID");
        assert!(n > 0, "closed before CLIENT ID");
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(Some((Value::Int(id), _))) = parse_value(&buf) {
            return id;
        }
    }
}

fn substitute_ids(bytes: &[u8], ids: &[i64]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes);
    if !text.contains("{id:") {
        return bytes.to_vec();
    }
    let mut out = text.into_owned();
    for (n, id) in ids.iter().enumerate() {
        let marker = format!("{{id:{n}}}");
        // Keep RESP bulk lengths right: replace inside `$len\r\n{id:n}\r\n` as a whole.
        let bulk = format!("${}\r\n{marker}\r\n", marker.len());
        let value = id.to_string();
        out = out.replace(&bulk, &format!("${}\r\n{value}\r\n", value.len()));
        out = out.replace(&marker, &value);
    }
    out.into_bytes()
}

/// One reply or push as a client saw it: its exact bytes, except where two paths differ by
/// nature (a `HELLO` reply's client id, a `MONITOR` feed line's timestamp and address).
#[derive(PartialEq)]
enum Seen {
    Raw(String),
    Feed(String),
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, text) = match self {
            Seen::Raw(t) => ("Raw", t),
            Seen::Feed(t) => ("Feed", t),
        };
        if text.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            write!(f, "{kind}({:?}… {} bytes)", &text[..cut], text.len())
        } else {
            write!(f, "{kind}({text:?})")
        }
    }
}

/// What a client saw on one connection: the frames after each step, and trailing bytes that
/// did not form a complete frame.
#[derive(Debug, PartialEq)]
struct Parsed {
    steps: Vec<Vec<Seen>>,
    rest: Vec<u8>,
}

fn parse_steps(received: &[Vec<u8>]) -> Parsed {
    use redis_entra_proxy::resp::{Grammar, Scanner};
    let mut steps = Vec::with_capacity(received.len());
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = Scanner::new(Grammar::Reply);
    for chunk in received {
        buf.extend_from_slice(chunk);
        let mut seen = Vec::new();
        loop {
            match scanner.scan(&buf) {
                Ok(Some(f)) => {
                    let frame: Vec<u8> = buf.drain(..f.len).collect();
                    seen.push(classify(&frame));
                }
                Ok(None) => break,
                Err(e) => {
                    seen.push(Seen::Raw(format!("<not RESP: {e}>")));
                    buf.clear();
                    break;
                }
            }
        }
        steps.push(seen);
    }
    Parsed { steps, rest: buf }
}

fn classify(frame: &[u8]) -> Seen {
    if frame.len() > 1 && frame[0] == b'+' && frame[1].is_ascii_digit() {
        let line = String::from_utf8_lossy(&frame[1..frame.len().saturating_sub(2)]).into_owned();
        if line.contains(" [") {
            return Seen::Feed(mask_after(&feed_command(&line), "\"REDIRECT\" \""));
        }
    }
    // A HELLO reply (or one inside an EXEC array) carries the server's client id.
    let text = String::from_utf8_lossy(frame).into_owned();
    Seen::Raw(mask_after(&text, "$2\r\nid\r\n:"))
}

/// Replaces the digits right after each `marker` with `N`.
fn mask_after(text: &str, marker: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        let (before, after) = rest.split_at(at + marker.len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        out.push('N');
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// `1700000000.123456 [0 127.0.0.1:5000] "GET" "k"` → `[0] "GET" "k"`.
fn feed_command(s: &str) -> String {
    let Some(open) = s.find(" [") else {
        return s.to_string();
    };
    let after = &s[open + 2..];
    let db = after.split(' ').next().unwrap_or_default();
    let command = after.find("] ").map_or("", |i| &after[i + 2..]);
    format!("[{db}] {command}")
}

/// Feed lines of commands that the proxy itself sends on other connections (re-authentication,
/// protocol switches, reply-mode wrapping) or sends differently (a sliced blocking command):
/// present only on the proxied path, by design. The client's own such commands are dropped
/// from both paths alike.
fn proxy_feed_line(v: &Seen) -> bool {
    let Seen::Feed(s) = v else { return false };
    let command = s
        .split("] ")
        .nth(1)
        .unwrap_or_default()
        .to_ascii_uppercase();
    [
        "\"AUTH\"",
        "\"HELLO\"",
        "\"CLIENT\" \"REPLY\"",
        "\"ASKING\"",
        "\"SELECT\"",
        "\"BLPOP\"",
        "\"BRPOP\"",
        "\"XREAD",
        "\"BZPOP",
        "\"BLMOVE\"",
        "\"BRPOPLPUSH\"",
        "\"BLMPOP\"",
        "\"BZMPOP\"",
        "\"WAIT",
    ]
    .iter()
    .any(|p| command.starts_with(p))
}

/// Compares two transcripts of `script`; `Err` describes the first difference.
pub fn compare(script: &Script, direct: &Transcript, proxied: &Transcript) -> Result<(), String> {
    for conn in 0..script.connections {
        let a = strip_feed(parse_steps(&direct.received[conn]));
        let b = strip_feed(parse_steps(&proxied.received[conn]));
        for (i, (x, y)) in a.steps.iter().zip(&b.steps).enumerate() {
            if x != y {
                let mut context = String::new();
                for (j, (x, y)) in a.steps.iter().zip(&b.steps).enumerate().take(i + 3) {
                    let _ = writeln!(
                        context,
                        "  step {j:3} direct:  {x:?}\n  step {j:3} proxied: {y:?}"
                    );
                }
                return Err(format!(
                    "connection {conn}, after step {i}:\n  direct:  {x:?}\n  proxied: {y:?}\n\
                     what connection {conn} saw:\n{context}script:\n{}",
                    script.describe()
                ));
            }
        }
        if a.rest != b.rest {
            return Err(format!(
                "connection {conn}: incomplete trailing bytes differ:\n  direct:  {:?}\n  proxied: {:?}\nscript:\n{}",
                String::from_utf8_lossy(&a.rest),
                String::from_utf8_lossy(&b.rest),
                script.describe()
            ));
        }
        if direct.closed[conn] != proxied.closed[conn] {
            return Err(format!(
                "connection {conn}: closed after step {:?} directly, {:?} through the proxy\nscript:\n{}",
                direct.closed[conn],
                proxied.closed[conn],
                script.describe()
            ));
        }
    }
    Ok(())
}

fn strip_feed(mut p: Parsed) -> Parsed {
    for values in &mut p.steps {
        values.retain(|v| !proxy_feed_line(v));
        split_invalidations(values);
        sort_unsubscribe_runs(values);
        // Where a feed line falls among the other frames depends on when each connection's
        // command reached the server (an event-loop turn apart through any proxy): each keeps
        // its own order, the two are compared apart.
        values.sort_by_key(|v| !matches!(v, Seen::Feed(_)));
    }
    p
}

/// With `BCAST`, Redis batches the keys changed in one event-loop turn into one invalidation:
/// how commands fall into turns differs between two paths. Each invalidation is split into one
/// per key, and a run of them sorted by key.
fn split_invalidations(values: &mut Vec<Seen>) {
    const RESP2: &str = "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n";
    const RESP3: &str = ">2\r\n$10\r\ninvalidate\r\n";
    let mut out: Vec<Seen> = Vec::with_capacity(values.len());
    let mut run: Vec<(String, String)> = Vec::new();
    let flush = |run: &mut Vec<(String, String)>, out: &mut Vec<Seen>| {
        run.sort();
        out.extend(
            run.drain(..)
                .map(|(head, key)| Seen::Raw(format!("{head}*1\r\n{key}"))),
        );
    };
    for v in values.drain(..) {
        let keys = match &v {
            Seen::Raw(t) => [RESP2, RESP3].into_iter().find_map(|head| {
                let rest = t.strip_prefix(head)?.strip_prefix('*')?;
                let (n, rest) = rest.split_once("\r\n")?;
                let n: usize = n.parse().ok()?;
                let mut keys = Vec::with_capacity(n);
                let mut rest = rest;
                for _ in 0..n {
                    let (len, after) = rest.strip_prefix('$')?.split_once("\r\n")?;
                    let len: usize = len.parse().ok()?;
                    let key = after.get(..len + 2)?;
                    keys.push(format!("${len}\r\n{key}"));
                    rest = &after[len + 2..];
                }
                Some((head, keys))
            }),
            Seen::Feed(_) => None,
        };
        match keys {
            Some((head, keys)) => run.extend(keys.into_iter().map(|k| (head.to_string(), k))),
            None => {
                flush(&mut run, &mut out);
                out.push(v);
            }
        }
    }
    flush(&mut run, &mut out);
    *values = out;
}

/// An argument-less `UNSUBSCRIBE` (or `P`/`S`) confirms each channel in the order of the
/// server's own hash table, whose seed is random per process: two servers list the same
/// channels in different orders. Within a run of such confirmations, the channels are sorted
/// (the counts, which only go down, keep their order).
fn sort_unsubscribe_runs(values: &mut [Seen]) {
    fn parts(v: &Seen) -> Option<(String, String, String)> {
        let Seen::Raw(t) = v else { return None };
        let f: Vec<&str> = t.split("\r\n").collect();
        let is_unsub = f.len() == 7 && matches!(f[0], "*3" | ">3") && f[2].ends_with("unsubscribe");
        is_unsub.then(|| {
            (
                format!("{}\r\n{}\r\n{}", f[0], f[1], f[2]),
                format!("{}\r\n{}", f[3], f[4]),
                f[5].to_string(),
            )
        })
    }
    let mut i = 0;
    while i < values.len() {
        let Some((kind, _, _)) = parts(&values[i]) else {
            i += 1;
            continue;
        };
        let mut j = i;
        while j < values.len() && parts(&values[j]).is_some_and(|(k, _, _)| k == kind) {
            j += 1;
        }
        let run: Vec<(String, String, String)> = values[i..j].iter().filter_map(parts).collect();
        let mut channels: Vec<&String> = run.iter().map(|r| &r.1).collect();
        channels.sort();
        let rebuilt: Vec<Seen> = channels
            .iter()
            .zip(&run)
            .map(|(c, r)| Seen::Raw(format!("{kind}\r\n{c}\r\n{}\r\n", r.2)))
            .collect();
        for (slot, v) in values[i..j].iter_mut().zip(rebuilt) {
            *slot = v;
        }
        i = j;
    }
}
