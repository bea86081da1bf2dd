//! The `redis-entra-proxy` command: parse the configuration, set up logging, run what was asked.
//!
//! Kept tiny on purpose: everything worth testing lives in the library. The exit statuses are
//! part of the contract: 0 success, 1 failure at run time (or a failed `check`), 2 a
//! configuration or usage error.

use redis_entra_proxy::config::{self, Command, Config, LogFormat};
use redis_entra_proxy::{check, logging, server};
use std::io::Write;
use std::process::ExitCode;

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
        Command::Wait { .. } | Command::Shutdown { .. } => {
            logging::init(LogFormat::Text);
            tracing::error!("'wait' and 'shutdown' are not implemented yet");
            ExitCode::from(CONFIG_ERROR)
        }
    }
}

/// Sets up logging (the format is itself an option, so only now), logs the configuration's
/// warnings, and runs `task` on a multi-threaded runtime.
fn run<F: Future<Output = ExitCode>>(config: Config, task: fn(Config) -> F) -> ExitCode {
    logging::init(config.log_format);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    match tokio::runtime::Builder::new_multi_thread()
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
