//! The Entra refresh loop: one task per process that keeps a fresh token published.
//!
//! Being the only task that talks to the token source makes refreshing single-flight by
//! construction: however many connections watch the channel, one request is in flight at a
//! time. Each round fetches a token, makes sure it is genuinely new (see
//! [`Refresher::refresh_once`]), publishes it with the next generation and sleeps until the
//! point [`RefreshPolicy::next_refresh`] picks; a failure keeps the current token, publishes
//! the (scrubbed) reason and retries with [`Backoff`], forever.

use super::schedule::{Backoff, RefreshPolicy};
use super::source::{SourceError, SourceFactory, Token, TokenSource};
use super::{AuthCredential, CredentialState, RefreshCounters};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The refresher's state between rounds.
pub(crate) struct Refresher {
    pub(crate) factory: Arc<dyn SourceFactory>,
    pub(crate) source: Arc<dyn TokenSource>,
    /// `--redis-username`; `None` means the token's `oid` claim.
    pub(crate) username: Option<String>,
    pub(crate) policy: RefreshPolicy,
    pub(crate) tx: Arc<watch::Sender<CredentialState>>,
    pub(crate) counters: Arc<RefreshCounters>,
}

/// The token currently published, with what scheduling needs to know about it.
struct Held {
    credential: Arc<AuthCredential>,
    /// When the proxy received it (the start of its lifetime as far as scheduling goes).
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl Held {
    fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.issued_at)
            .unwrap_or(Duration::ZERO)
    }
}

/// Why a round produced no new credential.
enum Failure {
    /// The source failed (or handed out something unusable).
    Source(SourceError),
    /// Even a fresh source instance returned the token already published: its upstream
    /// (IMDS, the Azure CLI) caches too. Not an error yet; ask again after a backoff.
    Unchanged,
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure::Source(e)
    }
}

impl Refresher {
    /// Runs until `shutdown` is cancelled.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.run_forever() => {}
        }
    }

    async fn run_forever(mut self) {
        let mut held: Option<Held> = None;
        let mut attempt: u32 = 0;
        loop {
            let delay = match self.refresh_once(held.as_ref()).await {
                Ok(new) => {
                    attempt = 0;
                    let delay = self.on_success(&new);
                    held = Some(new);
                    delay
                }
                Err(failure) => {
                    attempt = attempt.saturating_add(1);
                    self.on_failure(failure, attempt, held.as_ref())
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// One round: a token that is valid, and different from the one `held`.
    ///
    /// `azure_identity` answers from its cache until 5 minutes before expiry, so at 75 % of a
    /// long token it returns the token the proxy already has. Then this builds a new source
    /// instance (empty cache) and asks again.
    async fn refresh_once(&mut self, held: Option<&Held>) -> Result<Held, Failure> {
        let timeout = self.policy.fetch_timeout_for(held.map(Held::lifetime));
        let mut token = self.fetch(timeout).await?;
        if is_repeat(&token, held) {
            tracing::debug!("the token source answered from its cache; asking a new instance");
            self.source = self.factory.build()?;
            token = self.fetch(timeout).await?;
        }
        let now = SystemTime::now();
        if token.expires_at <= now {
            return Err(
                SourceError::new("the token source returned an already expired token").into(),
            );
        }
        if is_repeat(&token, held) {
            return Err(Failure::Unchanged);
        }
        let user = self.username_for(&token)?;
        let generation = held.map_or(0, |h| h.credential.generation) + 1;
        let expires_at = token.expires_at;
        let credential =
            AuthCredential::new(Some(user), token.secret, Some(expires_at), generation);
        Ok(Held {
            credential: Arc::new(credential),
            issued_at: now,
            expires_at,
        })
    }

    /// One request to the current source, bounded by `timeout`.
    async fn fetch(&self, timeout: Duration) -> Result<Token, SourceError> {
        match tokio::time::timeout(timeout, self.source.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::new(format!(
                "the token request timed out after {}",
                humantime::format_duration(whole_millis(timeout))
            ))),
        }
    }

    /// The configured Redis user, else the token's `oid` claim.
    fn username_for(&self, token: &Token) -> Result<String, SourceError> {
        if let Some(user) = &self.username {
            return Ok(user.clone());
        }
        super::jwt::oid_claim(token.secret.expose()).map_err(|why| {
            SourceError::new(format!(
                "cannot tell the Redis user: {why}; set --redis-username (AZURE_REDIS_USERNAME) \
                 to the object id of the identity"
            ))
        })
    }

    /// Publishes `new`, logs it, and returns how long to sleep until the next round.
    fn on_success(&self, new: &Held) -> Duration {
        let credential = new.credential.clone();
        self.tx.send_modify(|state| {
            state.current = Some(credential);
            state.last_error = None;
        });
        self.counters.record_success();
        tracing::info!(
            expires_at = %humantime::format_rfc3339_millis(new.expires_at),
            lifetime_secs = new.lifetime().as_secs_f64(),
            generation = new.credential.generation,
            user = new.credential.username.as_deref().unwrap_or_default(),
            "obtained a new Entra token"
        );
        let next = self.policy.next_refresh(new.issued_at, new.expires_at);
        next.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// Records and logs a failed round; returns the backoff delay before the next one.
    fn on_failure(&self, failure: Failure, attempt: u32, held: Option<&Held>) -> Duration {
        let backoff = Backoff::for_lifetime(held.map(Held::lifetime));
        let delay = backoff.delay(attempt, fastrand::f64());
        let retry_in = humantime::format_duration(whole_millis(delay));
        let current_valid = held.is_some_and(|h| h.expires_at > SystemTime::now());
        match failure {
            Failure::Unchanged => tracing::info!(
                attempt,
                retry_in = %retry_in,
                "the token source still returns the current token (its upstream caches it); \
                 asking again"
            ),
            Failure::Source(error) => {
                self.counters.record_failure();
                self.publish_error(error.message());
                tracing::warn!(
                    attempt,
                    retry_in = %retry_in,
                    current_valid,
                    error = %error,
                    "could not obtain an Entra token"
                );
            }
        }
        delay
    }

    /// Sets `last_error`, waking watchers only when the text changes.
    fn publish_error(&self, message: &Arc<str>) {
        self.tx.send_if_modified(|state| {
            if state.last_error.as_ref() == Some(message) {
                return false;
            }
            state.last_error = Some(message.clone());
            true
        });
    }
}

/// True when `token` is the one already held (same expiry or same value): a cached answer.
fn is_repeat(token: &Token, held: Option<&Held>) -> bool {
    held.is_some_and(|h| token.expires_at == h.expires_at || token.secret == h.credential.password)
}

/// `d` rounded down to whole milliseconds, for readable logs.
fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
