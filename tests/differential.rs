//! The differential fuzzer: random sequences of the commands that change connection state,
//! played against `redis-server` directly and through the proxy while the credential rotates,
//! and the reply streams compared (see `support::differential`).
//!
//! The grammar covers what decides whether an injected `AUTH` is safe, and its combinations:
//! `MULTI`/`EXEC`/`DISCARD`/`WATCH`, the `SUBSCRIBE` family and its `UN-`, `PING` while
//! subscribed, `HELLO 2|3`, `CLIENT REPLY ON|OFF|SKIP`, `CLIENT TRACKING` with and without
//! `REDIRECT` (to a RESP2 subscriber too), `RESET`, `SELECT`, blocking commands with short
//! timeouts (and unblocked from another connection), `EVAL` (deeply nested replies too),
//! `QUIT`, inline commands and pipelines of several.
//!
//! Not in the grammar: the client's own `AUTH`, which the proxy answers by design (`+OK`,
//! where a server without a password answers an error); the relay's unit tests,
//! `tests/reauth.rs` and `tests/failures.rs` (`--listen-password`) cover it.
//!
//! Reproducible: each case is generated from a seed; a failure prints the seed and the script.
//! `DIFF_SEED=<n>` replays one case, `DIFF_CASES=<n>` sets how many are run (CI: a bounded
//! number; `bench/differential.sh` runs many more), and `DIFF_SHRINK=1` reduces a failing
//! script to the fewest steps that still fail.
//!
//! Two modes: Entra (tokens that live one second, so every connection is re-authenticated many
//! times per case and the fake Azure front closes any connection that misses its deadline), and
//! access key (no rotation; the combinations the proxy follows only as opaque bytes are allowed
//! there, since they lose nothing but re-authentication).

mod support;

use std::time::Duration;
use support::Setup;
use support::differential::{PlainRedis, Script, Step, compare, play};

/// How long every connection must stay quiet before the next step.
const QUIET: Duration = Duration::from_millis(25);
/// The same with a multiplexing proxy: a client's first command off the allow-list waits for
/// its own connection (from the warm pool, or a new TLS connection and `AUTH` when several
/// lanes drain it at once), and what it sends next must not overtake that in time. Below the
/// shortest blocking timeout of the grammar (100 ms), whose reply must fall in the pause that
/// follows it on both paths.
const LANE_QUIET: Duration = Duration::from_millis(50);

fn cases(default: u64) -> (u64, u64) {
    let base = std::env::var("DIFF_SEED").ok().and_then(|s| s.parse().ok());
    match base {
        Some(seed) => (seed, 1),
        None => {
            let n = std::env::var("DIFF_CASES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default);
            (fastrand::u64(..1 << 40), n)
        }
    }
}

/// Per-connection facts the generator keeps, so that it writes sequences a client would (and
/// can tell the combinations the proxy documents as opaque).
#[derive(Clone, Copy, Default)]
struct Conn {
    resp3: bool,
    subscribed: bool,
    closed: bool,
    monitor: bool,
    /// `CLIENT REPLY OFF` is (probably) in force: a transaction that changes state then turns
    /// the connection opaque, which the Entra mode avoids.
    replies_off: bool,
    /// The last command was an `EXEC` with `CLIENT REPLY SKIP` queued: Redis declared its
    /// array one element longer than it wrote, and skips the next command's reply, so the reply
    /// after that is read as the missing element. If the next command is `MONITOR`, that is
    /// the first feed line, whichever command of whichever connection the server runs next
    /// (the proxy's own `AUTH` on another connection, through the proxy): not comparable.
    short_exec: bool,
}

struct Gen {
    rng: fastrand::Rng,
    entra: bool,
    conns: Vec<Conn>,
    steps: Vec<Step>,
    /// Stream entry ids are given explicitly (`*` would differ between two servers).
    stream_ids: u64,
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    out
}

impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.rng.usize(..items.len())]
    }

    fn key(&mut self) -> String {
        format!("k{}", self.rng.u8(..4))
    }

    fn channel(&mut self) -> String {
        format!("ch{}", self.rng.u8(..3))
    }

    /// An ordinary command (no state change), valid in RESP2 subscribed mode too if
    /// `subscribed_ok` (then only PING).
    fn plain(&mut self) -> Vec<u8> {
        let k = self.key();
        let v = format!("v{}", self.rng.u16(..1000));
        match self.rng.u8(..14) {
            0 => cmd(&["SET", &k, &v]),
            1 => cmd(&["GET", &k]),
            2 => cmd(&["INCR", "counter"]),
            3 => cmd(&["DEL", &k]),
            4 => cmd(&["LPUSH", "list", &v]),
            5 => cmd(&["RPOP", "list"]),
            6 => cmd(&["ECHO", &v]),
            7 => cmd(&["PING"]),
            8 => cmd(&["PING", &v]),
            9 => cmd(&["HSET", "hash", "f", &v]),
            10 => cmd(&["HGETALL", "hash"]),
            11 => cmd(&[
                "EVAL",
                "return {1, 'two', {3, false}, redis.call('incr', 'counter')}",
                "0",
            ]),
            12 => cmd(&[
                "EVAL",
                "redis.setresp(3); return redis.call('hgetall', 'hash')",
                "0",
            ]),
            _ => cmd(&["SET", &k, &v, "PX", "100000"]),
        }
    }

    /// One step's worth of commands on connection `n`.
    fn commands(&mut self, n: usize) -> Vec<u8> {
        let mut c = self.conns[n];
        let mut out = Vec::new();
        let count = 1 + self.rng.usize(..3);
        for _ in 0..count {
            let resp2_subscribed = c.subscribed && !c.resp3;
            let after_short_exec = std::mem::take(&mut c.short_exec);
            let roll = self.rng.u8(..100);
            let bytes = match roll {
                _ if c.monitor => match self.rng.u8(..3) {
                    0 => cmd(&["PING"]),
                    1 => {
                        c.monitor = false;
                        cmd(&["RESET"])
                    }
                    _ => cmd(&["GET", "k1"]),
                },
                0..=24 if resp2_subscribed => match self.rng.u8(..4) {
                    0 => cmd(&["PING"]),
                    1 => cmd(&["PING", "hello"]),
                    2 => cmd(&["GET", "k1"]),
                    _ => cmd(&["CLIENT", "GETNAME"]),
                },
                0..=24 => self.plain(),
                25..=32 => {
                    // A transaction in one pipeline (left open, it would outlive a token).
                    let mut t = Vec::new();
                    if self.rng.bool() {
                        t.extend(cmd(&["WATCH", "k1"]));
                    }
                    t.extend(cmd(&["MULTI"]));
                    for _ in 0..self.rng.usize(..3) {
                        t.extend(self.plain());
                    }
                    let effects_ok = !self.entra || !c.replies_off;
                    let mut skip = false;
                    match self.rng.u8(..6) {
                        0 if effects_ok => {
                            t.extend(cmd(&["CLIENT", "REPLY", "SKIP"]));
                            skip = true;
                        }
                        // (HELLO 2 run by EXEC for a RESP3 subscriber: opaque, see the README.)
                        1 if effects_ok && !(self.entra && c.subscribed) => {
                            t.extend(cmd(&["HELLO", if c.resp3 { "2" } else { "3" }]));
                            c.resp3 = !c.resp3 || c.subscribed;
                        }
                        2 if !self.entra => {
                            t.extend(cmd(&["SUBSCRIBE", "inside"]));
                            c.subscribed = true;
                        }
                        _ => {}
                    }
                    let exec = self.rng.u8(..5) != 0;
                    t.extend(cmd(&[if exec { "EXEC" } else { "DISCARD" }]));
                    c.short_exec = skip && exec && !c.subscribed;
                    if c.subscribed {
                        // Not allowed in RESP2 subscribed mode, where the proxy refuses it
                        // itself, so a MONITOR elsewhere doesn't see the EXEC that Redis shows
                        // when it refuses one (see the README); the generator's idea of the
                        // protocol is approximate, so no transaction while subscribed at all.
                        Vec::new()
                    } else {
                        t
                    }
                }
                33..=44 => {
                    let ch = self.channel();
                    c.subscribed = true;
                    match self.rng.u8(..3) {
                        0 => cmd(&["SUBSCRIBE", &ch, "ch9"]),
                        1 => cmd(&["PSUBSCRIBE", "ch*"]),
                        _ => cmd(&["SSUBSCRIBE", &ch]),
                    }
                }
                45..=50 => match self.rng.u8(..4) {
                    0 => cmd(&["UNSUBSCRIBE"]),
                    1 => cmd(&["UNSUBSCRIBE", "ch0"]),
                    2 => cmd(&["PUNSUBSCRIBE"]),
                    _ => cmd(&["SUNSUBSCRIBE"]),
                },
                51..=56 if !resp2_subscribed => {
                    let ch = self.channel();
                    let msg = format!("m{}", self.rng.u16(..100));
                    if self.rng.bool() {
                        cmd(&["PUBLISH", &ch, &msg])
                    } else {
                        cmd(&["SPUBLISH", &ch, &msg])
                    }
                }
                57..=62 if !resp2_subscribed => {
                    let to3 = !c.resp3;
                    c.resp3 = to3 || c.subscribed;
                    if self.rng.u8(..4) == 0 {
                        cmd(&["HELLO", if to3 { "3" } else { "2" }, "SETNAME", "fuzz"])
                    } else {
                        cmd(&["HELLO", if to3 { "3" } else { "2" }])
                    }
                }
                63..=69 if !resp2_subscribed => {
                    let mode = self.pick(&["ON", "OFF", "SKIP", "SKIP", "ON"]);
                    match mode {
                        "ON" => c.replies_off = false,
                        "OFF" => c.replies_off = true,
                        _ => {}
                    }
                    cmd(&["CLIENT", "REPLY", mode])
                }
                70..=75 if !resp2_subscribed => {
                    let other = self.rng.usize(..self.conns.len());
                    let redirect = format!("{{id:{other}}}");
                    // (Not BCAST: Redis sends those at the end of an event-loop turn, so which
                    // commands a connection has run by then depends on how its bytes arrived.)
                    match self.rng.u8(..4) {
                        0 | 1 => cmd(&["CLIENT", "TRACKING", "on", "REDIRECT", &redirect]),
                        2 if c.resp3 => cmd(&["CLIENT", "TRACKING", "on"]),
                        _ => cmd(&["CLIENT", "TRACKING", "off"]),
                    }
                }
                76..=79 => {
                    c = Conn {
                        closed: c.closed,
                        ..Conn::default()
                    };
                    cmd(&["RESET"])
                }
                80..=82 if !resp2_subscribed => cmd(&["SELECT", self.pick(&["0", "1"])]),
                83..=86 if !resp2_subscribed => {
                    let timeout = self.pick(&["0.1", "0.2"]);
                    match self.rng.u8(..3) {
                        0 => cmd(&["BLPOP", "list", timeout]),
                        1 => cmd(&["BRPOP", "list", "list2", timeout]),
                        _ => cmd(&["XREAD", "BLOCK", "100", "STREAMS", "stream", "0-0"]),
                    }
                }
                87..=88 if !resp2_subscribed => {
                    self.stream_ids += 1;
                    cmd(&[
                        "XADD",
                        "stream",
                        &format!("{}-1", self.stream_ids),
                        "f",
                        "v",
                    ])
                }
                89 if !resp2_subscribed => {
                    cmd(&["EVAL", "local a = {} local b = {a} a[1] = b return a", "0"])
                }
                90..=91
                    if !resp2_subscribed
                        && !after_short_exec
                        && !self.conns.iter().any(|c| c.monitor) =>
                {
                    c.monitor = true;
                    cmd(&["MONITOR"])
                }
                92..=93 if !resp2_subscribed => {
                    b"PING\r\nSET kinline \"a b\"\r\nGET kinline\r\n".to_vec()
                }
                _ => self.plain(),
            };
            out.extend(bytes);
        }
        self.conns[n] = c;
        out
    }

    fn script(mut self, steps: usize) -> Script {
        for _ in 0..steps {
            let open: Vec<usize> = (0..self.conns.len())
                .filter(|&i| !self.conns[i].closed)
                .collect();
            if open.is_empty() {
                break;
            }
            let n = open[self.rng.usize(..open.len())];
            let roll = self.rng.u8(..40);
            if roll == 0 {
                // A client blocked forever, served by a push from another connection.
                let other = open[self.rng.usize(..open.len())];
                if other != n
                    && !self.conns[n].subscribed
                    && !self.conns[n].monitor
                    && !self.conns[other].subscribed
                {
                    self.steps.push(Step::Send(n, cmd(&["BLPOP", "jobs", "0"])));
                    self.steps
                        .push(Step::Send(other, cmd(&["RPUSH", "jobs", "job"])));
                    continue;
                }
            }
            if roll == 1 {
                self.steps.push(Step::Pause(Duration::from_millis(300)));
                continue;
            }
            let bytes = self.commands(n);
            if bytes.is_empty() {
                continue;
            }
            // Blocking commands time out on their own: give them time to.
            let blocking = bytes
                .windows(5)
                .any(|w| w == b"BLPOP" || w == b"BRPOP" || w == b"XREAD");
            // A reply nested to Lua's stack limit takes the server a while to build.
            let slow = bytes.windows(9).any(|w| w == b"a[1] = b ");
            self.steps.push(Step::Send(n, bytes));
            // Redis notices an expired timeout at its next event-loop turn: up to 100 ms late.
            // One pause for both, so that a blocking command's timeout after a slow reply falls
            // in the same step on both paths (two pauses made a boundary it could fall either
            // side of).
            let pause = if slow { 200 } else { 0 } + if blocking { 550 } else { 0 };
            if pause > 0 {
                self.steps.push(Step::Pause(Duration::from_millis(pause)));
            }
        }
        Script {
            connections: self.conns.len(),
            steps: self.steps,
        }
    }
}

fn generate(seed: u64, entra: bool) -> Script {
    let mut rng = fastrand::Rng::with_seed(seed);
    let connections = 2 + rng.usize(..2);
    let steps = 12 + rng.usize(..14);
    Gen {
        rng,
        entra,
        conns: vec![Conn::default(); connections],
        steps: Vec::new(),
        stream_ids: 0,
    }
    .script(steps)
}

/// Runs `count` cases from `base`, each against fresh servers (same settings both ways), and
/// fails on the first difference with its seed.
async fn fuzz(setup_for: impl AsyncFn() -> Setup, entra: bool, base: u64, count: u64) {
    for case in 0..count {
        let seed = base.wrapping_add(case);
        let script = generate(seed, entra);
        let setup = setup_for().await;
        let proxy = setup.start_proxy().await;
        let direct = PlainRedis::start().await;
        let (d, p) = tokio::join!(
            play(direct.addr(), &script, QUIET),
            play(proxy.addr(), &script, QUIET)
        );
        if let Err(diff) = compare(&script, &d, &p) {
            if std::env::var_os("DIFF_SHRINK").is_some() {
                drop(proxy);
                let minimal = shrink(&setup_for, script.clone()).await;
                eprintln!(
                    "seed {seed}: smallest failing script found:\n{}",
                    minimal.describe()
                );
                panic!("seed {seed}: {diff}");
            }
            panic!(
                "seed {seed} ({} mode; replay with DIFF_SEED={seed}): {diff}\n--- proxy output (tail) ---\n{}\n--- redis log (tail) ---\n{}",
                if entra { "Entra" } else { "access-key" },
                tail(&proxy.output(), 40),
                tail(&setup.redis.log(), 10)
            );
        }
        if let Some(front) = &setup.front {
            assert_eq!(
                front.connections_closed_by_server(),
                0,
                "seed {seed}: a connection missed its re-authentication deadline\nscript:\n{}",
                script.describe()
            );
        }
    }
}

/// Removes steps one at a time while the script still fails (twice, to skip flukes):
/// `DIFF_SHRINK=1` prints the result next to a failure.
async fn shrink(setup_for: &impl AsyncFn() -> Setup, mut script: Script) -> Script {
    let fails = async |script: &Script| {
        let setup = setup_for().await;
        let proxy = setup.start_proxy().await;
        let direct = PlainRedis::start().await;
        let (d, p) = tokio::join!(
            play(direct.addr(), script, QUIET),
            play(proxy.addr(), script, QUIET)
        );
        compare(script, &d, &p).is_err()
    };
    let mut i = 0;
    while i < script.steps.len() {
        let mut smaller = script.clone();
        smaller.steps.remove(i);
        if fails(&smaller).await && fails(&smaller).await {
            script = smaller;
        } else {
            i += 1;
        }
    }
    script
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_with_rotating_entra_tokens() {
    let (base, count) = cases(12);
    let lifetime = Duration::from_secs(1);
    fuzz(
        async || Setup::entra_app_service(lifetime).await,
        true,
        base,
        count,
    )
    .await;
}

/// The names scripts use for keys and channels (in arguments, patterns and Lua source).
const NAMES: &[&str] = &[
    "k0", "k1", "k2", "k3", "kinline", "counter", "list", "list2", "hash", "stream", "jobs", "ch0",
    "ch1", "ch2", "ch9", "inside",
];

/// `script` made independent of scripts with another `prefix`: every key and channel name
/// (and the `ch*` pattern) prefixed, so that several lanes can run at once against one server
/// and each still sees exactly what it would alone. `None` for a script a lane can't be made
/// of: `MONITOR` sees every lane, inline commands can't be rewritten.
fn lane(script: &Script, prefix: &str) -> Option<Script> {
    use support::resp::{ParsedCommand, encode_command, parse_command};
    let rename = |arg: &[u8]| -> Vec<u8> {
        let text = String::from_utf8_lossy(arg);
        if NAMES.contains(&text.as_ref()) || text == "ch*" {
            return format!("{prefix}{text}").into_bytes();
        }
        if text.contains("redis.call") {
            let mut lua = text.into_owned();
            for name in NAMES {
                lua = lua.replace(&format!("'{name}'"), &format!("'{prefix}{name}'"));
            }
            return lua.into_bytes();
        }
        arg.to_vec()
    };
    let mut steps = Vec::with_capacity(script.steps.len());
    for step in &script.steps {
        let Step::Send(n, bytes) = step else {
            steps.push(step.clone());
            continue;
        };
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (ParsedCommand::Multibulk(args), used) = parse_command(rest).ok()?? else {
                return None;
            };
            if args
                .first()
                .is_some_and(|a| a.eq_ignore_ascii_case(b"MONITOR"))
            {
                return None;
            }
            let renamed: Vec<Vec<u8>> = args.iter().map(|a| rename(a)).collect();
            out.extend(encode_command(&renamed));
            rest = &rest[used..];
        }
        steps.push(Step::Send(*n, out));
    }
    Some(Script {
        connections: script.connections,
        steps,
    })
}

/// Several lanes at once, through a proxy that shares connections (`--multiplex 2`, a warm
/// pool for the pinned) while tokens live a second, each lane's reply streams compared with the same lane played
/// directly (its lanes at once too).
async fn fuzz_lanes(base: u64, count: u64, lanes: usize) {
    let lifetime = Duration::from_secs(1);
    let mut case = 0;
    let mut seed = base;
    let mut shared_total = 0.0;
    while case < count {
        let mut scripts = Vec::new();
        while scripts.len() < lanes {
            if let Some(l) = lane(&generate(seed, true), &format!("L{}:", scripts.len())) {
                scripts.push((seed, l));
            }
            seed = seed.wrapping_add(1);
        }
        let setup = Setup::entra_app_service(lifetime).await;
        let proxy = setup
            .start_proxy_with(
                &[
                    "--multiplex",
                    "2",
                    "--cluster",
                    "off",
                    "--warm-connections",
                    "8",
                    "--admin-listen",
                    "127.0.0.1:0",
                ],
                &[],
            )
            .await;
        // Played once the warm pool is full and the shared connections are open, so that a
        // pin at the first step takes a ready connection.
        let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
        support::wait_metric(admin, "redis_proxy_warm_connections", 8.0, &proxy).await;
        support::wait_metric(
            admin,
            "redis_proxy_multiplex_shared_connections",
            2.0,
            &proxy,
        )
        .await;
        let direct = PlainRedis::start().await;
        let plays = scripts.iter().flat_map(|(_, script)| {
            [
                play(direct.addr(), script, LANE_QUIET),
                play(proxy.addr(), script, LANE_QUIET),
            ]
        });
        let transcripts = futures_join_all(plays.collect()).await;
        for (i, (lane_seed, script)) in scripts.iter().enumerate() {
            let (d, p) = (&transcripts[2 * i], &transcripts[2 * i + 1]);
            if let Err(diff) = compare(script, d, p) {
                panic!(
                    "lane {i} (seed {lane_seed}; the case's lanes start at seed {}; replay with \
                     DIFF_SEED=<that>): {diff}\n--- proxy output (tail) ---\n{}",
                    scripts[0].0,
                    tail(&proxy.output(), 40)
                );
            }
        }
        assert_eq!(
            setup.front().connections_closed_by_server(),
            0,
            "a connection missed its re-authentication deadline"
        );
        // Commands went out on the shared connections (a case whose lanes all pin at their
        // first command shares nothing; the cases together must).
        let metrics = support::http_get(&format!("http://{admin}/metrics"))
            .await
            .body;
        let shared_writes = metrics
            .lines()
            .find_map(|l| l.strip_prefix("redis_proxy_multiplex_commands_per_write_sum "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_default();
        shared_total += shared_writes;
        case += 1;
    }
    assert!(shared_total > 0.0 || count < 3, "no case shared a command");
}

/// Runs every future at once (on this task) and gives their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut handles: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, out) in handles.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match h.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_multiplexed_lanes_at_once_with_rotating_entra_tokens() {
    let (base, count) = cases(6);
    fuzz_lanes(base, count, 3).await;
}

#[test]
fn a_lane_renames_every_key_and_channel_and_refuses_monitor() {
    let script = Script {
        connections: 1,
        steps: vec![Step::Send(
            0,
            [
                cmd(&["SET", "k1", "v"]),
                cmd(&["PSUBSCRIBE", "ch*"]),
                cmd(&["EVAL", "return redis.call('incr', 'counter')", "0"]),
            ]
            .concat(),
        )],
    };
    let l = lane(&script, "L0:").expect("a lane");
    let Step::Send(0, bytes) = &l.steps[0] else {
        panic!("{:?}", l.steps)
    };
    assert_eq!(
        bytes,
        &[
            cmd(&["SET", "L0:k1", "v"]),
            cmd(&["PSUBSCRIBE", "L0:ch*"]),
            cmd(&["EVAL", "return redis.call('incr', 'L0:counter')", "0"]),
        ]
        .concat()
    );
    let monitor = Script {
        connections: 1,
        steps: vec![Step::Send(0, cmd(&["MONITOR"]))],
    };
    assert!(lane(&monitor, "L0:").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_with_an_access_key() {
    let (base, count) = cases(12);
    fuzz(async || Setup::access_key().await, false, base, count).await;
}

/// The generator is deterministic: a seed names a case.
#[test]
fn a_seed_names_one_script() {
    assert_eq!(generate(42, true).describe(), generate(42, true).describe());
}

/// The sequence whose replies can't be compared (see `Conn::short_exec`) is never generated,
/// while the transaction with `CLIENT REPLY SKIP` and `MONITOR` each still are.
#[test]
fn no_script_sends_monitor_right_after_an_exec_with_reply_skip_queued() {
    let short_exec = b"$4\r\nSKIP\r\n*1\r\n$4\r\nEXEC\r\n";
    let monitor = b"*1\r\n$7\r\nMONITOR\r\n";
    let both = [&short_exec[..], &monitor[..]].concat();
    let (mut short_execs, mut monitors) = (0, 0);
    for seed in 0..3000 {
        for entra in [true, false] {
            let script = generate(seed, entra);
            for conn in 0..script.connections {
                let sent: Vec<u8> = script
                    .steps
                    .iter()
                    .filter_map(|step| match step {
                        Step::Send(n, bytes) if *n == conn => Some(bytes.as_slice()),
                        _ => None,
                    })
                    .flatten()
                    .copied()
                    .collect();
                let count = |pattern: &[u8]| {
                    sent.windows(pattern.len())
                        .filter(|w| *w == pattern)
                        .count()
                };
                short_execs += count(short_exec);
                monitors += count(monitor);
                assert_eq!(
                    count(&both),
                    0,
                    "seed {seed} (entra {entra}), connection {conn}:\n{}",
                    script.describe()
                );
            }
        }
    }
    assert!(short_execs > 0 && monitors > 0, "{short_execs} {monitors}");
}
