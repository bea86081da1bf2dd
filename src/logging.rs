//! Logging setup: `tracing` events to stderr, as text or JSON.
//!
//! stderr, because stdout belongs to `check`'s report (and a sidecar's stderr is what
//! `kubectl logs` shows anyway). The level comes from `RUST_LOG`, like every other Rust
//! service, with `info` as the default so that the startup line and warnings are visible.
//! Colours only on a terminal: escape codes are noise in `kubectl logs` and log collectors.

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset or invalid.
const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. Safe to call more than once (tests, or `main` after a
/// library already installed one): later calls leave the first subscriber in place.
pub fn init(format: LogFormat) {
    let (filter, invalid_rust_log) = filter_from_env();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A failed write is reported on stderr with `eprintln!`, which panics when stderr is
        // the thing that failed (a closed pipe): the panic kills whichever task was logging,
        // e.g. the one that handles SIGTERM. Losing a log line is the lesser harm.
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder.json().flatten_event(true).try_init().is_ok(),
    };
    if let (true, Some(problem)) = (installed, invalid_rust_log) {
        tracing::warn!("ignoring RUST_LOG ({problem}); logging at {DEFAULT_FILTER}");
    }
}

/// The filter from `RUST_LOG`, or `info`. A `RUST_LOG` that can't be parsed must not stop the
/// proxy, so it falls back to `info` and the reason is returned for a warning.
fn filter_from_env() -> (EnvFilter, Option<String>) {
    let default = || EnvFilter::new(DEFAULT_FILTER);
    match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) if !directives.trim().is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(err) => (default(), Some(err.to_string())),
        },
        _ => (default(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_twice_does_not_panic() {
        init(LogFormat::Json);
        init(LogFormat::Text);
        tracing::info!("still logging");
    }
}
