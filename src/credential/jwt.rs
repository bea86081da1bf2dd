//! Reading the `oid` claim out of an Entra access token.
//!
//! Azure Cache for Redis expects `AUTH <object-id> <token>`, and the object id is the token's
//! own `oid` claim, so the proxy can work out the Redis user without being told. The signature is
//! not checked: the token came straight from Entra over TLS and Redis verifies it anyway; all we
//! need is a claim to put in front of it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Why no `oid` could be read. Deliberately carries no part of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OidError {
    /// Not three dot-separated parts: an opaque token rather than a JWT.
    #[error("the token is not a JWT")]
    NotJwt,
    /// The payload is not base64url-encoded JSON.
    #[error("the token's payload is not base64url-encoded JSON")]
    BadPayload,
    /// A JWT without an `oid` (string) claim.
    #[error("the token has no `oid` claim")]
    MissingOid,
}

#[derive(Deserialize)]
struct Claims {
    oid: Option<String>,
}

/// The `oid` claim of `token`.
pub fn oid_claim(token: &str) -> Result<String, OidError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidError::NotJwt);
    };
    let json = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| OidError::BadPayload)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| OidError::BadPayload)?;
    match claims.oid {
        Some(oid) if !oid.is_empty() => Ok(oid),
        _ => Err(OidError::MissingOid),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unsigned JWT with the given claims (what the fake token sources hand out).
    pub(crate) fn jwt(claims: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    }

    #[test]
    fn reads_the_oid() {
        let token = jwt(&serde_json::json!({"oid": "0b4f-oid", "aud": "https://redis.azure.com"}));
        assert_eq!(oid_claim(&token).as_deref(), Ok("0b4f-oid"));
    }

    #[test]
    fn tolerates_padding() {
        let header = URL_SAFE_NO_PAD.encode("{}");
        let payload = base64::engine::general_purpose::URL_SAFE.encode(r#"{"oid":"abc"}"#);
        assert!(payload.ends_with('='));
        assert_eq!(
            oid_claim(&format!("{header}.{payload}.sig")).as_deref(),
            Ok("abc")
        );
    }

    #[test]
    fn missing_or_empty_claim() {
        assert_eq!(
            oid_claim(&jwt(&serde_json::json!({"sub": "x"}))),
            Err(OidError::MissingOid)
        );
        assert_eq!(
            oid_claim(&jwt(&serde_json::json!({"oid": ""}))),
            Err(OidError::MissingOid)
        );
        assert_eq!(
            oid_claim(&jwt(&serde_json::json!({"oid": 42}))),
            Err(OidError::BadPayload)
        );
    }

    #[test]
    fn garbage() {
        assert_eq!(oid_claim(""), Err(OidError::NotJwt));
        assert_eq!(oid_claim("opaque-token"), Err(OidError::NotJwt));
        assert_eq!(oid_claim("a.b.c.d"), Err(OidError::NotJwt));
        assert_eq!(oid_claim("a.!!!.c"), Err(OidError::BadPayload));
        let not_json = URL_SAFE_NO_PAD.encode("not json");
        assert_eq!(
            oid_claim(&format!("a.{not_json}.c")),
            Err(OidError::BadPayload)
        );
    }

    #[test]
    fn errors_never_contain_the_token() {
        for token in ["secret-opaque", "x.c2VjcmV0.y"] {
            let err = oid_claim(token).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("secret"));
        }
    }
}
