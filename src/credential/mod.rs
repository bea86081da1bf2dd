//! Credentials: where `AUTH` passwords come from and how they are kept fresh.
//!
//! One [`CredentialManager`] per process owns the current [`AuthCredential`] and publishes every
//! new one on a `tokio::sync::watch` channel. Each relayed connection watches that channel and
//! re-authenticates its upstream when the generation changes (see `relay`). Keeping the token
//! logic here, away from the byte relay, means the refresh schedule is a pure, unit-tested
//! function ([`schedule`]) and the refresher can be driven by a fake [`TokenSource`].
//!
//! * [`schedule`]: when to refresh, how to back off.
//! * [`source`]: the token-source traits (the seam for tests).
//! * [`entra`] / [`transport`]: `azure_identity` credentials and the HTTP client they use.
//! * `refresher` / `access_key`: the background tasks that publish credentials.
//! * [`jwt`], [`scrub`]: the `oid` claim, and error text that cannot leak a token.

pub mod entra;
pub mod jwt;
pub mod schedule;
pub mod scrub;
pub mod source;
pub mod transport;

mod access_key;
#[cfg(test)]
mod entra_tests;
mod refresher;
#[cfg(test)]
mod tests;

pub use access_key::KEY_FILE_POLL_INTERVAL;
pub use schedule::RefreshPolicy;
pub use source::{BoxFuture, SourceError, SourceFactory, Token, TokenSource};

use crate::config::{AuthConfig, Config, ConfigError, KeySource};
use crate::secret::Secret;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One set of credentials for `AUTH`, shared by every connection that uses it.
pub struct AuthCredential {
    /// Redis user (`oid` claim for Entra, configured user, or `None` for `AUTH <key>`).
    pub username: Option<String>,
    /// The token or access key.
    pub password: Secret,
    /// When the server stops honouring this credential (`None`: never, e.g. an access key).
    pub expires_at: Option<SystemTime>,
    /// Increases by one with every new credential; connections compare it to know they are stale.
    pub generation: u64,
    /// The `AUTH` command, RESP-encoded once so that re-authenticating thousands of connections
    /// encodes nothing. Never log it.
    auth_command: Bytes,
}

impl AuthCredential {
    /// Builds a credential and pre-encodes its `AUTH` command.
    pub fn new(
        username: Option<String>,
        password: Secret,
        expires_at: Option<SystemTime>,
        generation: u64,
    ) -> Self {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &username {
            args.push(user.as_bytes());
        }
        args.push(password.expose().as_bytes());
        let auth_command = crate::resp::encode_command(&args);
        AuthCredential {
            username,
            password,
            expires_at,
            generation,
            auth_command,
        }
    }

    /// The RESP-encoded `AUTH` command for this credential.
    pub fn auth_command(&self) -> &Bytes {
        &self.auth_command
    }
}

impl std::fmt::Debug for AuthCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCredential")
            .field("username", &self.username)
            .field("expires_at", &self.expires_at)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What connections see of the credential manager: the current credential, if any, and the
/// last error (so a client refused for lack of a token learns why).
#[derive(Debug, Clone, Default)]
pub struct CredentialState {
    /// The newest credential obtained; `None` before the first one (or in `--auth none`).
    pub current: Option<std::sync::Arc<AuthCredential>>,
    /// Why the last attempt to obtain a credential failed (no secret in it), if it did.
    pub last_error: Option<std::sync::Arc<str>>,
}

/// The receiving side connections hold.
pub type CredentialWatch = tokio::sync::watch::Receiver<CredentialState>;

impl AuthCredential {
    /// True while the server still honours this credential at `now` (always, without expiry).
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|exp| exp > now)
    }
}

impl CredentialState {
    /// The current credential if it is still valid at `now`. The refresher keeps an expired
    /// credential in `current` while it retries (it is the best it has), so callers that are
    /// about to `AUTH` or report readiness ask this instead of reading `current`.
    pub fn valid_at(&self, now: SystemTime) -> Option<&Arc<AuthCredential>> {
        self.current.as_ref().filter(|c| c.is_valid_at(now))
    }
}

/// Which kind of `AUTH` the relay sends: none at all, `AUTH [user] key`, or `AUTH oid token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// `--auth none`: no `AUTH`, and no credential is ever published.
    None,
    /// An access key that changes only when its file does.
    AccessKey,
    /// Entra tokens, refreshed in the background.
    Entra,
}

/// Why [`CredentialManager::wait_current`] has no credential to give. The texts come from
/// scrubbed token-source errors, so this can be logged and sent to clients as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// `--auth none`: there is never a credential.
    #[error("no credential is used (--auth none)")]
    Disabled,
    /// No valid credential within the time allowed.
    #[error("no valid credential after {}: {reason}", humantime::format_duration(*.waited))]
    Unavailable {
        /// How long the caller waited.
        waited: Duration,
        /// The last token error, or what is still going on.
        reason: Arc<str>,
    },
}

/// Counts of token-refresh rounds, for `redis_proxy_token_refresh_total{result}`.
#[derive(Debug, Default)]
pub struct RefreshCounters {
    success: AtomicU64,
    failure: AtomicU64,
}

impl RefreshCounters {
    fn record_success(&self) {
        self.success.fetch_add(1, Ordering::Relaxed);
    }

    fn record_failure(&self) {
        self.failure.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful refreshes so far (including the first token).
    pub fn successes(&self) -> u64 {
        self.success.load(Ordering::Relaxed)
    }

    /// Failed token requests so far.
    pub fn failures(&self) -> u64 {
        self.failure.load(Ordering::Relaxed)
    }
}

/// The process-wide owner of the credential: starts the background refresh (or key-file
/// watch) and hands out watchers.
///
/// Holding the channel's sender here (not only in the background task) keeps the channel open
/// for as long as the manager lives, so connections never see it close at shutdown.
#[derive(Debug)]
pub struct CredentialManager {
    mode: AuthKind,
    tx: Arc<watch::Sender<CredentialState>>,
    counters: Arc<RefreshCounters>,
}

impl CredentialManager {
    /// Starts background refresh; returns at once (the first fetch happens in the background).
    ///
    /// Errors are configuration errors found before anything is fetched: an unreadable key file
    /// or `--token-ca-file`, a federated token file that doesn't exist, an HTTP authority host.
    /// Must be called inside the Tokio runtime; the tasks stop when `shutdown` is cancelled.
    pub fn start(config: &Config, shutdown: CancellationToken) -> Result<Self, ConfigError> {
        match &config.auth {
            AuthConfig::None => Ok(Self::idle(AuthKind::None)),
            AuthConfig::AccessKey { source, username } => {
                Self::start_access_key(source, username.clone(), KEY_FILE_POLL_INTERVAL, shutdown)
            }
            AuthConfig::Entra(credential) => {
                let factory = entra::AzureSourceFactory::new(
                    credential,
                    &config.scope,
                    config.token_ca_file.as_deref(),
                )?;
                Self::start_entra(
                    Arc::new(factory),
                    config.redis_username.clone(),
                    RefreshPolicy::from_config(config),
                    shutdown,
                )
            }
        }
    }

    /// Starts refreshing tokens from `factory` (what [`Self::start`] does for Entra, open to
    /// tests and embedders with their own [`SourceFactory`]). The first source is built here so
    /// that its configuration errors are reported at once.
    pub fn start_entra(
        factory: Arc<dyn SourceFactory>,
        username: Option<String>,
        policy: RefreshPolicy,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let runtime = current_runtime()?;
        let source = factory
            .build()
            .map_err(|e| ConfigError(format!("cannot set up the Entra credential: {e}")))?;
        let manager = Self::idle(AuthKind::Entra);
        let refresher = refresher::Refresher {
            factory,
            source,
            username,
            policy,
            tx: manager.tx.clone(),
            counters: manager.counters.clone(),
        };
        runtime.spawn(refresher.run(shutdown));
        Ok(manager)
    }

    /// Publishes the access key; for a key file, also starts watching it every `poll`.
    pub fn start_access_key(
        source: &KeySource,
        username: Option<String>,
        poll: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let manager = Self::idle(AuthKind::AccessKey);
        match source {
            KeySource::Inline(key) => {
                access_key::publish_initial(&manager.tx, &username, key.clone());
            }
            KeySource::File(path) => {
                let runtime = current_runtime()?;
                let key = access_key::read_key_now(path)?;
                access_key::publish_initial(&manager.tx, &username, key.clone());
                let watch = access_key::KeyFileWatch {
                    path: path.clone(),
                    username,
                    current: key,
                    interval: poll,
                    tx: manager.tx.clone(),
                };
                runtime.spawn(watch.run(shutdown));
            }
        }
        Ok(manager)
    }

    /// A manager with nothing published (yet).
    fn idle(mode: AuthKind) -> Self {
        let (tx, _) = watch::channel(CredentialState::default());
        CredentialManager {
            mode,
            tx: Arc::new(tx),
            counters: Arc::default(),
        }
    }

    /// A watcher of the credential state (what each connection holds).
    pub fn subscribe(&self) -> CredentialWatch {
        self.tx.subscribe()
    }

    /// Whether and how the relay authenticates upstream connections.
    pub fn mode(&self) -> AuthKind {
        self.mode
    }

    /// Refresh counts so far (for metrics).
    pub fn counters(&self) -> &Arc<RefreshCounters> {
        &self.counters
    }

    /// Waits until a valid (unexpired) credential is available or `timeout` passes. The error
    /// carries the last token error, so a refused client learns why.
    pub async fn wait_current(
        &self,
        timeout: Duration,
    ) -> Result<Arc<AuthCredential>, CredentialError> {
        if self.mode == AuthKind::None {
            return Err(CredentialError::Disabled);
        }
        let mut rx = self.subscribe();
        let usable = |state: &CredentialState| state.valid_at(SystemTime::now()).is_some();
        let found = match tokio::time::timeout(timeout, rx.wait_for(usable)).await {
            Ok(Ok(state)) => state.valid_at(SystemTime::now()).cloned(),
            _ => None,
        };
        if let Some(credential) = found {
            return Ok(credential);
        }
        let reason = unavailable_reason(&rx.borrow());
        Err(CredentialError::Unavailable {
            waited: timeout,
            reason,
        })
    }
}

/// What to tell a caller who got no credential.
fn unavailable_reason(state: &CredentialState) -> Arc<str> {
    let expired = state.current.as_ref().and_then(|c| c.expires_at);
    match (&state.last_error, expired) {
        (Some(error), Some(exp)) => format!(
            "the token expired at {} and refreshing it fails: {error}",
            humantime::format_rfc3339_seconds(exp)
        )
        .into(),
        (Some(error), None) => error.clone(),
        (None, Some(exp)) => format!(
            "the token expired at {} and no new one has arrived yet",
            humantime::format_rfc3339_seconds(exp)
        )
        .into(),
        (None, None) => "the first token request has not completed yet".into(),
    }
}

/// The runtime to spawn background tasks on; starting outside one is a programming error
/// reported as a configuration error rather than a panic.
fn current_runtime() -> Result<tokio::runtime::Handle, ConfigError> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        ConfigError("the credential manager must be started inside the Tokio runtime".into())
    })
}
