//! `redis-entra-proxy check`: the whole path once, step by step.
//!
//! What a user runs first: configuration, credential (token expiry, Redis user), TCP + TLS +
//! `AUTH`, `PING` round trip and the server's version. Exit status 0 only if all of it works.
//! Nothing secret is printed.

use crate::config::Config;

/// Runs every step, printing one line each; true when all passed.
pub async fn run(config: Config) -> bool {
    println!("configuration: {}", config.describe());
    false
}
