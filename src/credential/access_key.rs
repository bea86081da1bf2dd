//! Access-key credentials, including keys mounted from a Kubernetes Secret.
//!
//! An inline key is published once and never changes. A key file is read at start (an
//! unreadable or empty file is a configuration error, spec §2) and then polled: Kubernetes
//! updates a Secret volume by swapping the `..data` symlink, which neither changes the
//! mtime of the path the proxy was given nor produces a reliable inotify event on it, so the
//! poll compares *contents*. A changed key is published as a new generation, and the relay
//! re-authenticates every connection with it; a read error keeps the old key.

use super::{AuthCredential, CredentialState};
use crate::config::ConfigError;
use crate::secret::Secret;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a key file is re-read. A Secret update takes a minute or more to reach the pod,
/// so a second is plenty, and reading a few bytes a second costs nothing.
pub const KEY_FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reads the key at start; any problem is a configuration error.
pub(crate) fn read_key_now(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| key_file_error(path, &e.to_string()))?;
    parse_key(text).map_err(|why| key_file_error(path, why))
}

/// Reads the key again (asynchronously); the error text names no secret.
async fn read_key(path: &Path) -> Result<Secret, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| e.to_string())?;
    parse_key(text).map_err(str::to_owned)
}

/// The file's content without surrounding whitespace (editors and `echo` add a newline).
fn parse_key(text: String) -> Result<Secret, &'static str> {
    let key = text.trim();
    if key.is_empty() {
        return Err("the file is empty");
    }
    Ok(Secret::new(key))
}

fn key_file_error(path: &Path, why: &str) -> ConfigError {
    ConfigError(format!(
        "cannot read the access key file {}: {why}; check --access-key-file \
         (REDIS_PROXY_ACCESS_KEY_FILE) and the Secret mounted there",
        path.display()
    ))
}

/// Publishes `key` as the next generation.
fn publish(tx: &watch::Sender<CredentialState>, username: &Option<String>, key: Secret) -> u64 {
    let mut generation = 0;
    tx.send_modify(|state| {
        generation = state.current.as_ref().map_or(0, |c| c.generation) + 1;
        let credential = AuthCredential::new(username.clone(), key, None, generation);
        state.current = Some(Arc::new(credential));
        state.last_error = None;
    });
    generation
}

/// Publishes the first key (inline or read at start).
pub(crate) fn publish_initial(
    tx: &watch::Sender<CredentialState>,
    username: &Option<String>,
    key: Secret,
) {
    publish(tx, username, key);
}

/// What the key-file watcher needs.
pub(crate) struct KeyFileWatch {
    pub(crate) path: PathBuf,
    pub(crate) username: Option<String>,
    /// The key published last.
    pub(crate) current: Secret,
    pub(crate) interval: Duration,
    pub(crate) tx: Arc<watch::Sender<CredentialState>>,
}

impl KeyFileWatch {
    /// Polls the file until `shutdown` is cancelled.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            match read_key(&self.path).await {
                Ok(key) => self.on_read(key, &mut failing),
                Err(why) => self.on_error(why, &mut failing),
            }
        }
    }

    fn on_read(&mut self, key: Secret, failing: &mut Option<String>) {
        if failing.take().is_some() {
            tracing::info!(path = %self.path.display(), "the access key file is readable again");
        }
        if key == self.current {
            return;
        }
        let generation = publish(&self.tx, &self.username, key.clone());
        self.current = key;
        tracing::info!(
            path = %self.path.display(),
            generation,
            "the access key file changed; using the new key"
        );
    }

    /// Warns once per distinct problem (not once a second), keeping the current key.
    fn on_error(&self, why: String, failing: &mut Option<String>) {
        if failing.as_deref() != Some(why.as_str()) {
            tracing::warn!(
                path = %self.path.display(),
                error = %why,
                "cannot read the access key file; keeping the current key"
            );
            *failing = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_rejects_empty() {
        assert_eq!(
            parse_key("key\n".into()).map(|k| k.expose().to_owned()),
            Ok("key".into())
        );
        assert_eq!(
            parse_key(" \n".into()).map(|_| ()),
            Err("the file is empty")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_key_now(&dir.path().join("nope")).unwrap_err();
        assert!(err.0.contains("--access-key-file"), "{err}");
    }
}
