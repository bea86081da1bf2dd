//! The seam between the refresher and whatever mints tokens.
//!
//! The refresher only needs "give me a token" and "give me a *new* credential instance" (to get
//! past an identity library's cache), so both are small object-safe traits. Production uses the
//! `azure_identity` implementations in [`super::entra`]; tests plug in fakes that issue
//! two-second tokens, fail on demand, or cache like `azure_identity` does.

use crate::secret::Secret;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

/// A boxed, sendable future (what [`TokenSource::fetch`] returns).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One access token and when it stops being accepted.
#[derive(Debug, Clone)]
pub struct Token {
    /// The bearer token (`AUTH` password).
    pub secret: Secret,
    /// Expiry as reported by the identity provider.
    pub expires_at: SystemTime,
}

/// Something that hands out tokens for one fixed scope (one `azure_identity` credential).
///
/// Implementations may cache: the refresher detects a repeated token and asks its
/// [`SourceFactory`] for a fresh instance.
pub trait TokenSource: Send + Sync {
    /// Requests a token.
    fn fetch(&self) -> BoxFuture<'_, Result<Token, SourceError>>;
}

/// Builds [`TokenSource`]s; called once at start and again whenever a source keeps returning a
/// token the proxy already has, because a new instance starts with an empty cache.
pub trait SourceFactory: Send + Sync {
    /// A new source instance.
    fn build(&self) -> Result<Arc<dyn TokenSource>, SourceError>;
}

/// Why a token could not be obtained, already scrubbed of anything token-like (see
/// [`super::scrub`]), so it may be logged and shown to clients as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(Arc<str>);

impl SourceError {
    /// An error with this message (scrubbed all the same).
    pub fn new(message: impl AsRef<str>) -> Self {
        SourceError(super::scrub::scrub(message.as_ref()).into())
    }

    /// Describes `err` and its causes (scrubbed); the error itself is not kept.
    pub fn from_error(err: &(dyn std::error::Error + 'static)) -> Self {
        SourceError(super::scrub::describe_error(err).into())
    }

    /// The message.
    pub fn message(&self) -> &Arc<str> {
        &self.0
    }
}
