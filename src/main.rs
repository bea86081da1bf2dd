//! The `redis-entra-proxy` command: parse the configuration, set up logging, run what was asked.
//!
//! Kept tiny on purpose: everything worth testing lives in the library. The exit statuses are
//! part of the contract: 0 success, 1 failure at run time (or a failed `check`), 2 a
//! configuration or usage error.

use redis_entra_proxy::config::InjectorConfig;
use redis_entra_proxy::config::{self, Command, Config};
use redis_entra_proxy::{check, injector, logging, ops_client, server};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// Exit status of a configuration or usage error.
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    let command = match config::parse_command() {
        Ok(command) => command,
        Err(err) => {
            write_or_ignore(&mut std::io::stderr(), &format!("{err}\n"));
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    match command {
        Command::Help(text) => {
            write_or_ignore(&mut std::io::stdout(), &text);
            ExitCode::SUCCESS
        }
        Command::Run(config) => run(config, run_proxy),
        Command::Check(config) => run(config, run_check),
        Command::Wait { admin, max } => run_ops_client(async move {
            ops_client::wait(&admin, max).await.map(|took| {
                format!(
                    "the proxy at {admin} is up (GET /startup answered 200 after {})",
                    humantime::format_duration(Duration::from_millis(took.as_millis() as u64))
                )
            })
        }),
        Command::Shutdown { control } => run_ops_client(async move {
            ops_client::shutdown(&control)
                .await
                .map(|()| format!("the proxy at {control} is shutting down"))
        }),
        Command::Injector(config) => run_injector(config),
    }
}

/// `injector`: the webhook until SIGTERM (exit 0); an unusable certificate exits with status 2.
/// One thread: reviews take microseconds, and freed parse memory is then reused by the next
/// parse instead of staying resident in another thread's malloc arena (which would multiply
/// the injector's memory bound by the number of threads; see `injector`).
fn run_injector(config: InjectorConfig) -> ExitCode {
    logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(injector::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(injector::InjectorError::Config(err)) => {
            tracing::error!("{err}");
            ExitCode::from(CONFIG_ERROR)
        }
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// `wait` / `shutdown`: one line on stdout and status 0 on success, one line on stderr and
/// status 1 otherwise. No logging setup: these are short commands whose whole output is that
/// line, read by a human or an init container's log.
fn run_ops_client(task: impl Future<Output = Result<String, String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            write_or_ignore(
                &mut std::io::stderr(),
                &format!("redis-entra-proxy: cannot start the async runtime: {err}\n"),
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(line) => {
            write_or_ignore(&mut std::io::stdout(), &format!("{line}\n"));
            ExitCode::SUCCESS
        }
        Err(line) => {
            write_or_ignore(
                &mut std::io::stderr(),
                &format!("redis-entra-proxy: {line}\n"),
            );
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging (the format is itself an option, so only now), logs the configuration's
/// warnings, and runs `task` on a single-threaded runtime.
///
/// One thread, like Redis's own event loop, because the proxy must not reorder what clients
/// send. Commands written on two connections microseconds apart reach Redis, directly, in the
/// order they arrived; a multi-threaded tokio runtime runs the task woken last first (its LIFO
/// slot) and passes sessions between workers, so through it the second command overtook the
/// first in 59% of rounds (0 µs apart) and 9% (50 µs apart), and Redis's suite's "blocking
/// XREADGROUP" tests flaked. One thread handles wake-ups in the order epoll reports them:
/// 0% (`bench/ordering.py`, README "Ordering"). It also keeps one malloc arena, and a sidecar
/// rarely gets more than a core; throughput measured the same or better on two cores.
fn run<F: Future<Output = ExitCode>>(config: Config, task: fn(Config) -> F) -> ExitCode {
    logging::init(config.log_format);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(task(config)),
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The proxy, until shutdown. A configuration problem found at startup (e.g. a credential
/// that can't be built) still exits with status 2.
async fn run_proxy(config: Config) -> ExitCode {
    match server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(server::ServerError::Config(err)) => {
            tracing::error!("{err}");
            ExitCode::from(CONFIG_ERROR)
        }
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// `check`: 0 only if the whole path works.
async fn run_check(config: Config) -> ExitCode {
    if check::run(config).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `text`, ignoring a closed pipe (`redis-entra-proxy --help | head`): `print!` would
/// panic there and turn a clean exit into status 101.
fn write_or_ignore(out: &mut impl Write, text: &str) {
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
