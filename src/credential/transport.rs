//! The HTTP client `azure_identity` sends its token requests with.
//!
//! # Why the proxy builds its own client
//!
//! Left alone, `azure_identity` gets its client from `typespec_client_core::new_reqwest_client`
//! (reqwest 0.13 with `rustls`): a client whose certificate verifier is
//! `rustls-platform-verifier`, i.e. on Linux the roots of `rustls-native-certs`, and whose
//! crypto provider is the process default or else aws-lc-rs. Three problems with that:
//!
//! * it is built with `.expect(..)` when the credential is constructed, so a container without
//!   a CA bundle (a `scratch` image) would **panic** at start instead of reporting an error;
//! * the only way to trust a private CA (a test's fake Entra endpoint, an on-premises Entra
//!   proxy, a TLS-inspecting egress proxy) would be `SSL_CERT_FILE`, which *replaces* the system
//!   roots instead of adding to them;
//! * its internal retry policy (up to 8 retries over 60 s) would sit underneath the refresher's
//!   own lifetime-aware backoff;
//! * reqwest takes a proxy from `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` (corporate clusters
//!   set them in every pod), so the managed identity request (plain HTTP to IMDS or the App
//!   Service endpoint) and every token in the answers would pass through that proxy.
//!
//! So the proxy passes its own reqwest client (same reqwest 0.13 that typespec uses, so it
//! implements `azure_core::http::HttpClient`) as the credential's transport: rustls with the
//! *ring* provider like the rest of the proxy, trusting the system roots (`rustls-native-certs`,
//! which still honours `SSL_CERT_FILE` / `SSL_CERT_DIR`) **plus** the PEM bundle of
//! `--token-ca-file` (never the upstream's `--ca-file`: a CA trusted for the cache must not
//! vouch for the endpoint that gets the proxy's credentials and hands out its tokens),
//! with the same timeouts and no-redirect policy as the default client, and **never through a
//! proxy**: the identity endpoints are link-local (IMDS), local to the host (App Service) or
//! Entra itself, and none of them needs one. The credential's own retries are turned off in
//! [`super::entra`].

use crate::config::ConfigError;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Same as `typespec_client_core`'s default client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Same as `typespec_client_core`'s default client.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A reqwest client for token endpoints that trusts the system roots plus `token_ca_file`.
pub fn token_http_client(token_ca_file: Option<&Path>) -> Result<reqwest::Client, ConfigError> {
    let roots = trusted_roots(token_ca_file)?;
    if roots.is_empty() {
        // Not fatal: IMDS and the App Service endpoint are plain HTTP. HTTPS token requests will
        // fail with a certificate error that says so.
        tracing::warn!(
            "no trusted CA certificates found (no system CA bundle and no --token-ca-file): \
             HTTPS token requests will fail"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("TLS setup for token requests failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(tls)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            ConfigError(format!(
                "cannot create the HTTP client for token requests: {e}"
            ))
        })
}

/// The system roots (ignoring unreadable ones, as every TLS client does) plus every certificate
/// in `token_ca_file` (where an error is a configuration error: the user asked for that file).
fn trusted_roots(token_ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping a system CA certificate source");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(
        added,
        ignored,
        "loaded system CA certificates for token requests"
    );
    if let Some(path) = token_ca_file {
        for cert in read_pem_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| ca_file_error(path, &e.to_string()))?;
        }
    }
    Ok(roots)
}

/// All certificates of a PEM file; none at all is an error.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ca_file_error(path, &e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_file_error(path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn ca_file_error(path: &Path, why: &str) -> ConfigError {
    ConfigError(format!(
        "cannot use --token-ca-file {}: {why}; give a PEM file with the CA certificate(s) of \
         the token endpoint",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn adds_the_ca_file_to_the_system_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca_pem()).expect("write");
        let without = trusted_roots(None).expect("roots").len();
        let with = trusted_roots(Some(&path)).expect("roots").len();
        assert_eq!(with, without + 1);
        assert!(token_http_client(Some(&path)).is_ok());
    }

    #[test]
    fn a_bad_ca_file_is_a_config_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = token_http_client(Some(&missing)).unwrap_err();
        assert!(err.0.contains("--token-ca-file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = token_http_client(Some(&empty)).unwrap_err();
        assert!(err.0.contains("no PEM certificate"), "{err}");
    }
}
