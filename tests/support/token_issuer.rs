//! Mints Entra-like access tokens for the fake Azure front to check.
//!
//! Tokens are real JWTs signed with HS256 and a fixed test secret, with the claims the proxy and
//! the front care about: `oid` (the Redis user on Azure), `exp`, `iat`, `nbf`,
//! `aud = "https://redis.azure.com"` and a unique `jti` (the front creates one Redis ACL user
//! per `jti`). `exp` is a whole number of seconds like in real tokens, rounded *up*, so a token
//! minted with lifetime `L` lives between `L` and `L + 1s`.
//!
//! A [`TokenIssuer`] is cheap to clone; clones share the lifetime setting, the counter and the
//! history, so the token endpoints and the test see the same issuer.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The HS256 secret every issuer signs with (the front verifies with it).
pub const TEST_JWT_SECRET: &[u8] = b"redis-entra-proxy-test-signing-secret";

/// The audience of Azure Cache for Redis tokens.
pub const REDIS_AUDIENCE: &str = "https://redis.azure.com";

/// The tenant id put into tokens (and used by the fake Entra endpoint by default).
pub const TEST_TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

/// The claims of a test token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub oid: String,
    pub sub: String,
    pub tid: String,
    pub jti: String,
}

impl Claims {
    /// Milliseconds until this token expires (negative when expired).
    pub fn millis_left(&self) -> i64 {
        (self.exp as f64 * 1000.0 - super::unix_now() * 1000.0) as i64
    }
}

struct Inner {
    oid: String,
    lifetime_ms: AtomicU64,
    issued: AtomicU64,
    /// Random prefix making `jti`s unique across issuers and test runs.
    nonce: String,
    history: Mutex<Vec<String>>,
}

/// Mints test JWTs for one identity (`oid`). Clones share state.
#[derive(Clone)]
pub struct TokenIssuer {
    inner: Arc<Inner>,
}

impl TokenIssuer {
    /// An issuer for the identity `oid` whose tokens live `lifetime` (adjustable later).
    pub fn new(oid: &str, lifetime: Duration) -> TokenIssuer {
        TokenIssuer {
            inner: Arc::new(Inner {
                oid: oid.to_string(),
                lifetime_ms: AtomicU64::new(lifetime.as_millis() as u64),
                issued: AtomicU64::new(0),
                nonce: format!("{:08x}", fastrand::u32(..)),
                history: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The identity's object id: the Redis user name on Azure.
    pub fn oid(&self) -> &str {
        &self.inner.oid
    }

    /// The HS256 secret (the fake front verifies signatures with it).
    pub fn secret(&self) -> &'static [u8] {
        TEST_JWT_SECRET
    }

    /// The lifetime of tokens minted from now on.
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(self.inner.lifetime_ms.load(Ordering::SeqCst))
    }

    /// Changes the lifetime of tokens minted from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.inner
            .lifetime_ms
            .store(lifetime.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many tokens this issuer (and its clones) minted, of any kind.
    pub fn issued(&self) -> u64 {
        self.inner.issued.load(Ordering::SeqCst)
    }

    /// Every token minted so far, oldest first.
    pub fn history(&self) -> Vec<String> {
        self.inner.history.lock().unwrap().clone()
    }

    /// The most recently minted token.
    pub fn last_token(&self) -> Option<String> {
        self.inner.history.lock().unwrap().last().cloned()
    }

    /// A valid token with the current lifetime.
    pub fn mint(&self) -> String {
        self.mint_with_lifetime(self.lifetime())
    }

    /// A valid token living `lifetime` (rounded up to the next whole second of `exp`).
    pub fn mint_with_lifetime(&self, lifetime: Duration) -> String {
        let exp = (super::unix_now() + lifetime.as_secs_f64()).ceil() as u64;
        self.mint_custom(self.oid(), exp, TEST_JWT_SECRET)
    }

    /// A well-signed token whose `exp` is 10 s in the past.
    pub fn mint_expired(&self) -> String {
        let exp = super::unix_now() as u64 - 10;
        self.mint_custom(self.oid(), exp, TEST_JWT_SECRET)
    }

    /// A token that looks valid but is signed with the wrong key.
    pub fn mint_forged(&self) -> String {
        let exp = (super::unix_now() + self.lifetime().as_secs_f64()).ceil() as u64;
        self.mint_custom(self.oid(), exp, b"not-the-test-secret")
    }

    /// A valid token for another identity (the front rejects it when used with this `oid`).
    pub fn mint_for_oid(&self, oid: &str) -> String {
        let exp = (super::unix_now() + self.lifetime().as_secs_f64()).ceil() as u64;
        self.mint_custom(oid, exp, TEST_JWT_SECRET)
    }

    /// A token with the given `oid`, `exp` (Unix seconds) and signing secret.
    pub fn mint_custom(&self, oid: &str, exp: u64, secret: &[u8]) -> String {
        let n = self.inner.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let now = super::unix_now() as u64;
        let claims = Claims {
            aud: REDIS_AUDIENCE.to_string(),
            iss: format!("https://sts.windows.net/{TEST_TENANT_ID}/"),
            iat: now,
            nbf: now,
            exp,
            oid: oid.to_string(),
            sub: oid.to_string(),
            tid: TEST_TENANT_ID.to_string(),
            jti: format!("{}-{n}", self.inner.nonce),
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode JWT");
        self.inner.history.lock().unwrap().push(token.clone());
        token
    }

    /// The claims of any JWT, without checking anything (panics if it isn't a JWT).
    pub fn claims(token: &str) -> Claims {
        let mut v = Validation::new(Algorithm::HS256);
        v.insecure_disable_signature_validation();
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(b""), &v)
            .expect("decode JWT claims")
            .claims
    }

    /// Checks a token as Azure would: HS256 signature with [`TEST_JWT_SECRET`], audience, and
    /// `exp` strictly in the future (millisecond precision, no leeway). Returns its claims.
    pub fn verify(token: &str) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[REDIS_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "aud"]);
        v.validate_exp = false; // checked below with millisecond precision and no leeway
        v.leeway = 0;
        let claims =
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(TEST_JWT_SECRET), &v)
                .map_err(|e| format!("invalid token: {e}"))?
                .claims;
        if claims.millis_left() <= 0 {
            return Err(format!("token expired {} ms ago", -claims.millis_left()));
        }
        Ok(claims)
    }
}
