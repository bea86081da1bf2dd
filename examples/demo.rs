//! A local demo of redis-entra-proxy that needs no Azure: `cargo run --example demo`
//! (or `./scripts/demo.sh`, which installs `redis-server` and builds the proxy first).
//!
//! It starts, on loopback ports and in temporary directories:
//! * a real `redis-server` (TLS only, from `PATH` or `$REDIS_SERVER`),
//! * the fake Azure Cache for Redis front of the integration tests, which — like Azure — closes
//!   every connection whose last `AUTH` used a token that has now expired,
//! * the fake App Service managed identity endpoint, handing out Entra-like tokens that live
//!   only `--token-lifetime` (10 s by default),
//! * the real `redis-entra-proxy` binary, built by `cargo build`, pointed at all of that.
//!
//! Then one ordinary Redis client (the `redis` crate, one connection, no password, no TLS) runs
//! `INCR` through the proxy every second and shows which token its upstream connection is
//! authenticated with: tokens rotate every few seconds, the connection id never changes, and
//! no command fails. The proxy's own log lines (token refreshes, re-authentications) are shown
//! as they happen. After `--duration` (45 s by default) or Ctrl-C everything is shut down; the
//! exit status is 0 only if every command succeeded on the one connection.
//!
//! Options (also as environment variables): `--token-lifetime DUR` (`DEMO_TOKEN_LIFETIME`),
//! `--duration DUR` (`DEMO_DURATION`), `--port N` (`DEMO_PORT`, 0 = any free port, the default),
//! `--proxy-bin PATH` (`REDIS_ENTRA_PROXY_BIN`). Anything after `--` is passed to the proxy.
//!
//! The fakes are the integration tests' support code (`tests/support/`), included as it is.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use support::proxy::{address_field, is_main_listening_line};
use support::{
    AzureFront, ManagedIdentityEndpoint, RedisServer, TestPki, TokenIssuer,
    install_crypto_provider, random_uuid, unix_now,
};

const USAGE: &str = "\
usage: cargo run --example demo -- [--token-lifetime DUR] [--duration DUR] [--port N]
                                   [--proxy-bin PATH] [-- PROXY-FLAGS...]

  --token-lifetime DUR  lifetime of the fake Entra tokens   [env DEMO_TOKEN_LIFETIME, default 10s]
  --duration DUR        how long the client loop runs       [env DEMO_DURATION, default 45s]
  --port N              proxy listen port on 127.0.0.1, 0 = any free port
                                                            [env DEMO_PORT, default 0]
  --proxy-bin PATH      the redis-entra-proxy binary        [env REDIS_ENTRA_PROXY_BIN,
                                                             default: next to this example]
  -- PROXY-FLAGS...     extra flags for the proxy, e.g. -- --token-refresh-at 0.4
";

/// The demo's options.
struct Options {
    lifetime: Duration,
    duration: Duration,
    port: u16,
    proxy_bin: Option<PathBuf>,
    proxy_args: Vec<String>,
}

fn parse_options() -> Result<Options, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut lifetime = env("DEMO_TOKEN_LIFETIME").unwrap_or_else(|| "10s".into());
    let mut duration = env("DEMO_DURATION").unwrap_or_else(|| "45s".into());
    let mut port = env("DEMO_PORT").unwrap_or_else(|| "0".into());
    let mut proxy_bin = env("REDIS_ENTRA_PROXY_BIN").map(PathBuf::from);
    let mut proxy_args = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--token-lifetime" | "--lifetime" => lifetime = value()?,
            "--duration" => duration = value()?,
            "--port" => port = value()?,
            "--proxy-bin" => proxy_bin = Some(PathBuf::from(value()?)),
            "--" => {
                proxy_args.extend(args.by_ref());
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let lifetime = humantime::parse_duration(&lifetime)
        .map_err(|e| format!("invalid token lifetime {lifetime:?}: {e} (e.g. 10s)"))?;
    if lifetime < Duration::from_secs(2) {
        return Err("the token lifetime must be at least 2s".into());
    }
    let duration = humantime::parse_duration(&duration)
        .map_err(|e| format!("invalid duration {duration:?}: {e} (e.g. 45s or 2m)"))?;
    let port = port
        .parse()
        .map_err(|_| format!("invalid port {port:?}: expected 0-65535"))?;
    Ok(Options {
        lifetime,
        duration,
        port,
        proxy_bin,
        proxy_args,
    })
}

/// The proxy binary: `--proxy-bin`/`$REDIS_ENTRA_PROXY_BIN`, else the one cargo built next to
/// this example (`target/<profile>/examples/demo` → `target/<profile>/redis-entra-proxy`).
fn find_proxy_bin(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "the proxy binary {} (--proxy-bin / REDIS_ENTRA_PROXY_BIN) does not exist",
                path.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this example: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .ok_or_else(|| format!("unexpected location of this example: {}", exe.display()))?;
    let bin = profile_dir.join("redis-entra-proxy");
    if bin.is_file() {
        Ok(bin)
    } else {
        let release = if profile_dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        Err(format!(
            "the proxy binary is missing: {} does not exist.\n\
             Build it first with `cargo build{release}` (./scripts/demo.sh does), \
             or point --proxy-bin / REDIS_ENTRA_PROXY_BIN at one.",
            bin.display()
        ))
    }
}

/// True when `redis-server` can be found where the test support looks for it.
fn redis_server_available() -> bool {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(p).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("redis-server").is_file()))
        || PathBuf::from("/usr/bin/redis-server").is_file()
}

/// `HH:MM:SS` (UTC, like the proxy's log timestamps).
fn clock() -> String {
    let secs = unix_now() as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The token number (1, 2, …, as minted) in a front user name `tok-<nonce>-<n>`.
fn token_number(user: &str) -> Option<u64> {
    user.strip_prefix("tok-")?.rsplit('-').next()?.parse().ok()
}

/// Seconds until the `n`-th minted token expires.
fn expires_in(issuer: &TokenIssuer, n: u64) -> Option<f64> {
    let history = issuer.history();
    let token = history.get(usize::try_from(n).ok()?.checked_sub(1)?)?;
    Some(TokenIssuer::claims(token).millis_left() as f64 / 1000.0)
}

/// Which Redis user the server connection `id` is authenticated as (`CLIENT LIST ID`), through
/// the demo's own admin connection that bypasses the proxy and the front.
async fn server_user(admin: &mut redis::aio::MultiplexedConnection, id: i64) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("ID")
        .arg(id)
        .query_async(admin)
        .await
        .ok()?;
    list.split_whitespace()
        .find_map(|field| field.strip_prefix("user="))
        .map(str::to_string)
}

/// Copies the proxy's output lines to `tx` (and the listening address to the first waiter).
fn forward_lines(pipe: impl AsyncRead + Unpin + Send + 'static, tx: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

fn show_proxy_line(line: &str) {
    println!("           proxy | {line}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("demo: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let proxy_bin = match find_proxy_bin(options.proxy_bin.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    if !redis_server_available() {
        eprintln!(
            "demo: redis-server not found: install it (Debian/Ubuntu: sudo apt-get install -y \
             redis-server; ./scripts/demo.sh does it for you) or set REDIS_SERVER=/path/to/redis-server"
        );
        return ExitCode::from(2);
    }
    match run(options, proxy_bin).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything after the checks; `Ok(true)` when every command succeeded on one connection.
async fn run(options: Options, proxy_bin: PathBuf) -> Result<bool, String> {
    install_crypto_provider();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
            }
        });
    }

    println!(
        "demo: starting a local TLS redis-server, a fake Azure front and a fake managed identity endpoint"
    );
    let pki = TestPki::new();
    let redis = RedisServer::start(&pki).await;
    let issuer = TokenIssuer::new(&random_uuid(), options.lifetime);
    let front = AzureFront::start(&pki, &redis, &issuer).await;
    let msi = ManagedIdentityEndpoint::start(&issuer).await;
    println!(
        "demo: redis-server (TLS) on {}, fake Azure front (TLS) on {}, managed identity endpoint on {}",
        redis.addr(),
        front.addr(),
        msi.endpoint_url()
    );
    println!(
        "demo: tokens live {} (the identity's object id is {}); Azure-like, the front closes a \
         connection whose token expires",
        humantime::format_duration(options.lifetime),
        issuer.oid()
    );

    // The proxy, as an App Service sidecar would run it: managed identity from IDENTITY_ENDPOINT
    // + IDENTITY_HEADER; TLS to the front, whose certificate is for `localhost` and signed by
    // the demo's own CA. Everything else is the proxy's defaults.
    let listen = format!("127.0.0.1:{}", options.port);
    let mut args: Vec<String> = [
        "--upstream",
        &front.addr(),
        "--tls-server-name",
        "localhost",
        "--ca-file",
        &pki.ca_path().display().to_string(),
        "--auth",
        "entra",
        "--credential",
        "managed-identity",
        "--listen",
        &listen,
        "--admin-listen",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(options.proxy_args.iter().cloned());
    let rust_log = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| "info,redis_entra_proxy::relay::session=debug".to_string());
    println!("demo: starting {} {}", proxy_bin.display(), args.join(" "));
    let mut command = tokio::process::Command::new(&proxy_bin);
    command
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .envs(msi.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C in the terminal reaches the demo, which then stops the
        // proxy with SIGTERM (a graceful shutdown, as in Kubernetes).
        .process_group(0)
        .kill_on_drop(true);
    let mut proxy = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", proxy_bin.display()))?;
    let (tx, mut lines) = mpsc::unbounded_channel();
    forward_lines(proxy.stdout.take().expect("piped stdout"), tx.clone());
    forward_lines(proxy.stderr.take().expect("piped stderr"), tx);

    // Wait for the `listening` line.
    let started = Instant::now();
    let address = loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => {
                    show_proxy_line(&line);
                    if let Some(address) = is_main_listening_line(&line).then(|| address_field(&line)).flatten() {
                        break address;
                    }
                }
                None => {
                    let status = proxy.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!("the proxy exited during start-up ({status})"));
                }
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if started.elapsed() > Duration::from_secs(20) {
                    return Err("the proxy did not log its listening address within 20s".into());
                }
                if interrupted.load(Ordering::SeqCst) {
                    return Ok(true);
                }
            }
        }
    };

    // One ordinary client connection: redis://127.0.0.1:PORT, no TLS, no password.
    let url = format!("redis://{address}");
    println!("demo: connecting a plain Redis client to {url} (no TLS, no password)");
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(15))
        .set_response_timeout(Duration::from_secs(5));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("cannot connect through the proxy: {e}"))?;
    let mut admin = redis.admin().await;

    let first_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .map_err(|e| format!("CLIENT ID through the proxy failed: {e}"))?;
    println!(
        "demo: connected; the server-side connection id is {first_id}. Running INCR every second for {} (Ctrl-C stops)",
        humantime::format_duration(options.duration)
    );

    let end = Instant::now() + options.duration;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut commands = 0u64;
    let mut failures = 0u64;
    let mut id_changes = 0u64;
    let mut tokens_seen: Vec<u64> = Vec::new();
    let mut first_error: Option<String> = None;
    while Instant::now() < end && !interrupted.load(Ordering::SeqCst) {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(line) = lines.recv() => {
                show_proxy_line(&line);
                continue;
            }
        }
        // Lines that arrived meanwhile go first, so the output reads in order.
        while let Ok(line) = lines.try_recv() {
            show_proxy_line(&line);
        }
        commands += 1;
        let incr: Result<i64, _> = redis::cmd("INCR")
            .arg("demo:counter")
            .query_async(&mut con)
            .await;
        let id: Result<i64, _> = redis::cmd("CLIENT").arg("ID").query_async(&mut con).await;
        let (value, id) = match (incr, id) {
            (Ok(value), Ok(id)) => (value, id),
            (Err(e), _) | (_, Err(e)) => {
                // A command cut short by Ctrl-C (the terminal's SIGINT also stops
                // redis-server) is not the proxy's failure.
                tokio::time::sleep(Duration::from_millis(300)).await;
                if interrupted.load(Ordering::SeqCst) {
                    break;
                }
                failures += 1;
                println!("{} INCR demo:counter -> ERROR: {e}", clock());
                first_error.get_or_insert_with(|| e.to_string());
                if !e.is_io_error() && !e.is_connection_dropped() {
                    continue;
                }
                println!("demo: the connection is gone; stopping");
                break;
            }
        };
        let token = match server_user(&mut admin, id)
            .await
            .as_deref()
            .and_then(token_number)
        {
            Some(n) => {
                let new = tokens_seen.last() != Some(&n);
                if new {
                    tokens_seen.push(n);
                }
                let left =
                    expires_in(&issuer, n).map_or_else(|| "?".to_string(), |s| format!("{s:.1}s"));
                let marker = if new && tokens_seen.len() > 1 {
                    " NEW"
                } else {
                    ""
                };
                format!("token generation {n}{marker} (expires in {left})")
            }
            None => "token generation ? (not authenticated with a token?)".to_string(),
        };
        let connection = if id == first_id {
            format!("connection id {id} unchanged")
        } else {
            id_changes += 1;
            format!("connection id {id} CHANGED (was {first_id})")
        };
        println!(
            "{} INCR demo:counter -> {value:<4} {token}, {connection}",
            clock()
        );
    }
    while let Ok(line) = lines.try_recv() {
        show_proxy_line(&line);
    }

    println!("demo: shutting down (SIGTERM to the proxy, then the fakes)");
    drop(con);
    if let Some(pid) = proxy.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    let exit = tokio::select! {
        status = proxy.wait() => status.ok(),
        _ = tokio::time::sleep(Duration::from_secs(10)) => None,
    };
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(200), lines.recv()).await
    {
        show_proxy_line(&line);
    }
    match exit {
        Some(status) => println!("demo: the proxy exited ({status})"),
        None => {
            println!("demo: the proxy did not stop within 10s; killing it");
            let _ = proxy.kill().await;
        }
    }

    let rotations = tokens_seen.len().saturating_sub(1);
    println!();
    println!("summary:");
    println!(
        "  commands sent through the proxy: {commands} INCR (+ CLIENT ID), failed: {failures}"
    );
    println!(
        "  tokens seen on the one upstream connection: {} ({rotations} rotations), connection id {}",
        tokens_seen.len(),
        if id_changes == 0 {
            "never changed"
        } else {
            "CHANGED"
        }
    );
    println!(
        "  fake Azure front: {} token AUTHs accepted, {} rejected, {} tokens expired, {} connections closed by the server",
        front.auth_accepted(),
        front.auth_rejected(),
        front.tokens_expired(),
        front.connections_closed_by_server()
    );
    if let Some(first) = tokens_seen.first().copied()
        && rotations > 0
        && let Some(token) = issuer.history().get(first as usize - 1)
    {
        let exp = TokenIssuer::claims(token).exp;
        let secs = exp % 86_400;
        println!(
            "  token {first} expired at {:02}:{:02}:{:02}: without re-authentication, Azure (and this \
             fake front) would have closed the connection then",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
    }
    let ok = failures == 0 && id_changes == 0 && commands > 0;
    if ok {
        if rotations == 0 {
            println!(
                "  every command succeeded, but no token rotation happened yet: run longer \
                 (--duration) or with shorter tokens (--token-lifetime)"
            );
        } else {
            println!(
                "  every command succeeded on the same connection across {rotations} token rotations"
            );
        }
    } else if let Some(e) = first_error {
        println!("  FAILED: {e}");
    } else {
        println!("  FAILED: the upstream connection changed");
    }
    drop(msi);
    drop(front);
    drop(redis);
    Ok(ok)
}
