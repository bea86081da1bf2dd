//! Turning token-source errors into short messages that cannot carry a secret.
//!
//! Errors from `azure_identity` are useful ("AADSTS700016: application not found",
//! "invalid peer certificate: UnknownIssuer") but not trustworthy: the managed identity
//! credential puts the whole response body of a failed request into its message, the Azure CLI
//! credential its stderr, and the `Debug` form of an HTTP error holds the raw response. So the
//! proxy never keeps the error itself: it renders the `Display` chain, blanks out anything that
//! looks like a token or key, and truncates the result. That text is what reaches logs, the
//! `last_error` clients see, and `check`.

use std::error::Error;

/// Longest message kept (in characters); the rest is cut.
pub const MAX_MESSAGE_CHARS: usize = 400;

/// What replaces a token-like word.
const REDACTED: &str = "<redacted>";

/// A run of token characters at least this long (between dots) is taken for a secret. Entra
/// trace and correlation ids (UUIDs, 36 characters) stay readable; JWT segments, client secrets
/// (40 characters) and access keys (44) don't.
const SUSPICIOUS_LEN: usize = 37;

/// The scrubbed, truncated `Display` chain of `err`: each cause is appended unless the text so
/// far already contains it (azure_identity repeats inner messages in outer ones). An HTTP
/// status found in the chain is put first, since it is the most telling part.
pub fn describe_error(err: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    let mut status = None;
    let mut cause: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(current) = cause {
        status = status.or_else(|| http_status(current));
        let part = current.to_string();
        let part = part.trim();
        if !part.is_empty() && !text.contains(part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(part);
        }
        cause = current.source();
    }
    if let Some(status) = status {
        text = format!("HTTP {status}: {text}");
    }
    scrub(&text)
}

/// The HTTP status of an `azure_core` response error, if `err` is one.
fn http_status(err: &(dyn Error + 'static)) -> Option<u16> {
    let azure = err.downcast_ref::<azure_core::Error>()?;
    match azure.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
        _ => None,
    }
}

/// `text` on one line, with token-like words replaced by `<redacted>`, at most
/// [`MAX_MESSAGE_CHARS`] characters.
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE_CHARS + 8));
    let mut run = String::new();
    for c in text.chars() {
        if is_token_char(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut out, &mut run);
        out.push(if c.is_control() { ' ' } else { c });
    }
    flush_run(&mut out, &mut run);
    truncate(out.trim())
}

/// Characters of base64, base64url, JWTs and Azure client secrets (not `/`, so URL paths and
/// file paths split into harmless pieces).
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '=')
}

fn flush_run(out: &mut String, run: &mut String) {
    if looks_secret(run) {
        out.push_str(REDACTED);
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// A JWT (or any base64-encoded JSON, which starts with `eyJ`), or a long opaque word.
fn looks_secret(run: &str) -> bool {
    (run.starts_with("eyJ") && run.len() >= 12)
        || run.split('.').any(|piece| piece.len() >= SUSPICIOUS_LEN)
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str =
        "eyJhbGciOiJSUzI1NiJ9.eyJvaWQiOiJhYmMifQ.c2lnbmF0dXJlLWJ5dGVzLWdvLWhlcmUtYW5kLWhlcmU";

    #[test]
    fn removes_jwts_and_keys() {
        let key = "q8Zx0m3yA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r=";
        let secret = "abc8Q~0123456789abcdefghijklmnopqrstuvwx";
        let text =
            format!("The request failed: {{\"access_token\":\"{JWT}\",\"k\":\"{key}\"}} {secret}");
        let clean = scrub(&text);
        assert!(!clean.contains("eyJ"), "{clean}");
        assert!(!clean.contains(&key[..20]), "{clean}");
        assert!(!clean.contains(&secret[..20]), "{clean}");
        assert!(clean.starts_with("The request failed: {\"access_token\":\"<redacted>\""));
    }

    #[test]
    fn keeps_useful_text() {
        let text = "AADSTS700016: Application with identifier 'c4f1e6a2-1b0d-4c1e-9a53-7f1d2e3c4b5a' was not found. \
                    Trace ID: 6ba1c1a8-7b4e-4a3e-9e3f-4b2d0f6c1a00\nTo troubleshoot, visit \
                    https://aka.ms/azsdk/rust/identity/troubleshoot#workload";
        let clean = scrub(text);
        assert!(!clean.contains('\n'));
        assert!(clean.contains("c4f1e6a2-1b0d-4c1e-9a53-7f1d2e3c4b5a"));
        assert!(clean.contains("Trace ID: 6ba1c1a8"));
        assert!(clean.contains("https://aka.ms/azsdk/rust/identity/troubleshoot#workload"));
        assert!(scrub("error sending request for url (https://login.microsoftonline.com/tenant/oauth2/v2.0/token)")
            .contains("login.microsoftonline.com/tenant/oauth2/v2.0/token"));
    }

    #[test]
    fn truncates_long_messages() {
        let long = "word ".repeat(500);
        let clean = scrub(&long);
        assert_eq!(clean.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(clean.ends_with('…'));
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn describes_the_chain_without_secrets() {
        let inner = std::io::Error::other(format!("invalid peer certificate, body {JWT}"));
        let text = describe_error(&Outer(inner));
        assert_eq!(
            text,
            "request failed: invalid peer certificate, body <redacted>"
        );
    }

    #[test]
    fn puts_the_http_status_first() {
        let err = azure_core::Error::new(
            azure_core::error::ErrorKind::HttpResponse {
                status: azure_core::http::StatusCode::Unauthorized,
                error_code: Some("700016".into()),
                raw_response: None,
            },
            format!("The request failed: {JWT}"),
        );
        assert_eq!(
            describe_error(&err),
            "HTTP 401: The request failed: <redacted>"
        );
    }
}
