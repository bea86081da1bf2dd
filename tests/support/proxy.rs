//! Runs the real `redis-entra-proxy` binary.
//!
//! [`ProxyProcess::start`] spawns it with a clean environment (only `PATH`, `NO_COLOR=1`,
//! `RUST_LOG=debug` unless given, and what the test passes), adds `--listen 127.0.0.1:0
//! --admin-listen off` unless the test sets those, captures stdout and stderr line by line, and
//! waits for the agreed start-up log line: one containing `listening` and the bound address as
//! `address=HOST:PORT` (text format) or `"address":"HOST:PORT"` (JSON format). Lines that also
//! mention `admin` are the admin endpoint's (see [`ProxyProcess::admin_addr`]).
//!
//! [`run_to_end`] runs a short-lived invocation (`check`, a configuration error) to completion.
//!
//! Set `PROXY_TEST_ECHO=1` to see the proxy's output live on stderr, and
//! `REDIS_ENTRA_PROXY_BIN=/path` to run another build of the binary.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::RespClient;

/// The proxy binary cargo built, as cargo tells integration tests (examples are not told).
pub const PROXY_BIN: Option<&str> = option_env!("CARGO_BIN_EXE_redis-entra-proxy");

/// The binary to run: `$REDIS_ENTRA_PROXY_BIN` if set (e.g. a release build), else
/// [`PROXY_BIN`], else the one beside the running example (`target/<profile>/examples/x` →
/// `target/<profile>/redis-entra-proxy`).
pub fn proxy_bin() -> String {
    if let Ok(bin) = std::env::var("REDIS_ENTRA_PROXY_BIN") {
        return bin;
    }
    if let Some(bin) = PROXY_BIN {
        return bin.to_string();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("redis-entra-proxy")))
        .map_or_else(|| "redis-entra-proxy".into(), |p| p.display().to_string())
}

/// How long [`ProxyProcess::start`] waits for the `listening` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`run_to_end`] lets the process run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes ANSI escape sequences (colours), in case the log output has them.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters until a final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Extracts the `address` field of a log line, text (`address=V`) or JSON (`"address":"V"`).
pub fn address_field(line: &str) -> Option<String> {
    if let Some(i) = line.find("\"address\":\"") {
        let rest = &line[i + "\"address\":\"".len()..];
        return rest.find('"').map(|end| rest[..end].to_string());
    }
    let i = line.find("address=")?;
    // Only a field whose name is exactly `address` (not e.g. `admin_address=`).
    if i > 0 && !line[..i].ends_with([' ', '\t', '{', ',']) {
        return None;
    }
    let rest = &line[i + "address=".len()..];
    let value = rest.split([' ', ',', '}']).next().unwrap_or("");
    Some(value.trim_matches('"').to_string()).filter(|v| !v.is_empty())
}

pub fn is_main_listening_line(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    line.contains("listening")
        && !lower.contains("admin")
        && !lower.contains("control endpoint")
        && address_field(line).is_some()
}

/// The line of the control endpoint's own listener (`--control-listen`).
pub fn is_control_listening_line(line: &str) -> bool {
    line.contains("control endpoint listening") && address_field(line).is_some()
}

pub fn is_admin_listening_line(line: &str) -> bool {
    line.contains("listening")
        && line.to_ascii_lowercase().contains("admin")
        && address_field(line).is_some()
}

/// Builds the command with the clean environment shared by [`ProxyProcess`] and [`run_to_end`].
fn base_command(args: &[String], env: &[(&str, &str)], default_rust_log: Option<&str>) -> Command {
    let mut cmd = Command::new(proxy_bin());
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("NO_COLOR", "1");
    if let Some(level) = default_rust_log
        && !env.iter().any(|(k, _)| *k == "RUST_LOG")
    {
        cmd.env("RUST_LOG", level);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// True if `args` (or `env` through `env_name`) already set the flag `--flag`.
fn sets_flag(args: &[&str], env: &[(&str, &str)], flag: &str, env_name: &str) -> bool {
    args.iter()
        .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        || env.iter().any(|(k, _)| *k == env_name)
}

/// Reads `pipe` line by line into `lines` (ANSI-stripped) until it closes.
fn capture(pipe: impl Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>, name: &'static str) {
    let echo = std::env::var_os("PROXY_TEST_ECHO").is_some();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line =
                        strip_ansi(String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']));
                    if echo {
                        eprintln!("[proxy {name}] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            }
        }
    });
}

/// A running proxy process; killed on drop.
pub struct ProxyProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    listen: String,
    exit: Option<ExitStatus>,
}

impl ProxyProcess {
    /// Starts the proxy with `args` and `env` (see the module documentation) and waits until it
    /// logs that it is listening. Panics with the captured output if it exits or doesn't get
    /// there within [`STARTUP_TIMEOUT`].
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> ProxyProcess {
        let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !sets_flag(args, env, "--listen", "REDIS_PROXY_LISTEN") {
            full.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !sets_flag(args, env, "--admin-listen", "REDIS_PROXY_ADMIN_LISTEN") {
            full.extend(["--admin-listen".into(), "off".into()]);
        }
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        Self::start_exact(&full, env).await
    }

    /// Like [`ProxyProcess::start`], but with exactly `args`: nothing added (for subcommands
    /// such as `injector`, which have no `--admin-listen`, and for tests that must run a given
    /// command line unchanged).
    pub async fn start_exact(args: &[&str], env: &[(&str, &str)]) -> ProxyProcess {
        let full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut child = base_command(&full, env, Some("debug"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", proxy_bin()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        capture(child.stdout.take().unwrap(), lines.clone(), "stdout");
        capture(child.stderr.take().unwrap(), lines.clone(), "stderr");
        let mut proxy = ProxyProcess {
            child,
            lines,
            listen: String::new(),
            exit: None,
        };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let found = proxy
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| is_main_listening_line(l))
                .and_then(|l| address_field(l));
            if let Some(address) = found {
                proxy.listen = address;
                return proxy;
            }
            if let Some(status) = proxy.try_exit_status() {
                // Give the pipe readers a moment to drain, then report everything.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "proxy exited during start-up ({status}); args {full:?}\n--- output ---\n{}",
                    proxy.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "proxy did not log its listening address within {STARTUP_TIMEOUT:?}; \
                     args {full:?}\n--- output ---\n{}",
                    proxy.output()
                );
            }
            tokio::time::sleep(super::POLL_INTERVAL).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listening address exactly as logged (`127.0.0.1:PORT`, or `unix:/path`).
    pub fn listen_address(&self) -> &str {
        &self.listen
    }

    /// The TCP address the proxy listens on (panics for a Unix socket listener).
    pub fn addr(&self) -> SocketAddr {
        self.listen
            .parse()
            .unwrap_or_else(|_| panic!("listen address {:?} is not host:port", self.listen))
    }

    /// The admin endpoint's address, if a line says it is listening (`--admin-listen` set).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.logged_addr(is_admin_listening_line)
    }

    /// The control endpoint's own listener, if a line says it is listening (`--control-listen`
    /// with a non-loopback `--admin-listen`).
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.logged_addr(is_control_listening_line)
    }

    /// The `address` of the first line that `is_line` picks.
    fn logged_addr(&self, is_line: fn(&str) -> bool) -> Option<SocketAddr> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| is_line(l))
            .find_map(|l| address_field(l)?.parse().ok())
    }

    /// Waits (bounded) for the admin endpoint's listening line; panics with the output if none.
    pub async fn wait_admin_addr(&self, timeout: Duration) -> SocketAddr {
        let mut addr = None;
        super::wait_until(timeout, || {
            addr = self.admin_addr();
            addr.is_some()
        })
        .await;
        addr.unwrap_or_else(|| {
            panic!(
                "no admin listening line within {timeout:?}\n--- output ---\n{}",
                self.output()
            )
        })
    }

    /// Everything the proxy printed so far (stdout and stderr interleaved as read), one line each.
    pub fn output(&self) -> String {
        let mut s = self.lines.lock().unwrap().join("\n");
        s.push('\n');
        s
    }

    /// The captured lines so far.
    pub fn output_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// True if some output line contains `needle`.
    pub fn output_contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// How many output lines contain `needle`.
    pub fn count_in_output(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until an output line contains `needle`; panics with the output after `timeout`.
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) {
        if !super::wait_until(timeout, || self.output_contains(needle)).await {
            panic!(
                "no output line containing {needle:?} within {timeout:?}\n--- output ---\n{}",
                self.output()
            );
        }
    }

    /// Waits until at least `n` output lines contain `needle`; panics with the output otherwise.
    pub async fn wait_for_output_count(&self, needle: &str, n: usize, timeout: Duration) {
        if !super::wait_until(timeout, || self.count_in_output(needle) >= n).await {
            panic!(
                "fewer than {n} lines containing {needle:?} within {timeout:?}\n--- output ---\n{}",
                self.output()
            );
        }
    }

    /// `redis://127.0.0.1:PORT`
    pub fn redis_client_url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// A `redis` crate client for the proxy.
    pub fn redis_client(&self) -> redis::Client {
        redis::Client::open(self.redis_client_url()).expect("redis client for the proxy")
    }

    /// A new `redis` crate connection through the proxy: one TCP connection (multiplexed means
    /// commands from clones of it are pipelined on that one connection; `redis::pipe().atomic()`
    /// gives `MULTI`/`EXEC`). No response timeout, so blocking commands may block.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.redis_client()
            .get_multiplexed_async_connection_with_config(&redis::AsyncConnectionConfig::new())
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy: {e}\n{}", self.output()))
    }

    /// A `redis` crate pub/sub connection through the proxy (RESP2 subscribed mode).
    pub async fn pubsub(&self) -> redis::aio::PubSub {
        self.redis_client()
            .get_async_pubsub()
            .await
            .unwrap_or_else(|e| panic!("pub/sub connection through the proxy: {e}"))
    }

    /// A raw RESP connection through the proxy.
    pub async fn raw(&self) -> RespClient {
        RespClient::connect(self.addr()).await
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, …) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// `SIGTERM`: starts a graceful shutdown.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none()
    }

    /// Waits (bounded) for the process to exit; `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(super::POLL_INTERVAL).await;
        }
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if self.try_exit_status().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a finished invocation produced.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr, concatenated.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the proxy with `args` and `env` (clean environment as for [`ProxyProcess`], but nothing
/// added: no default flags, no `RUST_LOG`) until it exits; panics after [`RUN_TIMEOUT`].
/// Async so that fakes served by the test's own runtime keep answering meanwhile.
pub async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> RunOutput {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut cmd = tokio::process::Command::from(base_command(&args, env, None));
    cmd.kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", proxy_bin()));
    match tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => RunOutput {
            status: out.status,
            stdout: strip_ansi(&String::from_utf8_lossy(&out.stdout)),
            stderr: strip_ansi(&String::from_utf8_lossy(&out.stderr)),
        },
        Ok(Err(e)) => panic!("waiting for the proxy: {e}"),
        Err(_) => panic!("proxy {args:?} still running after {RUN_TIMEOUT:?}"),
    }
}
