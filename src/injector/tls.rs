//! The webhook's TLS certificate, re-read when its files change.
//!
//! cert-manager (or the chart's own hook) rotates the serving certificate by updating the
//! mounted Secret; the kubelet then swaps the files in place. Restarting the injector for that
//! would be a needless disruption of pod creation, so each new connection asks
//! [`CertStore::current`], which looks at the files' metadata at most every
//! [`CHECK_INTERVAL`] and loads them again when they changed. A new pair that can't be loaded
//! (half written, key not matching) is logged as a warning and the old one keeps serving; once
//! the files change again they are tried again.

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often the files' metadata is looked at (on a new connection).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of a file: a rewrite or an atomic swap changes one of these.
type Stamp = Option<(SystemTime, u64, u64)>;

/// The certificate and key files and the server configuration last loaded from them.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    state: Mutex<State>,
}

/// What [`CertStore`] last saw and loaded.
#[derive(Debug)]
struct State {
    config: Arc<ServerConfig>,
    stamps: (Stamp, Stamp),
    checked_at: Instant,
}

impl CertStore {
    /// Loads the pair once; `Err` says which file is wrong and why (a start-up error).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertStore, String> {
        let stamps = (stamp(cert_path), stamp(key_path));
        let config = server_config(cert_path, key_path)?;
        Ok(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            state: Mutex::new(State {
                config,
                stamps,
                checked_at: Instant::now(),
            }),
        })
    }

    /// The configuration for a new connection, reloaded first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.checked_at.elapsed() >= CHECK_INTERVAL {
            state.checked_at = Instant::now();
            let stamps = (stamp(&self.cert_path), stamp(&self.key_path));
            if stamps != state.stamps {
                state.stamps = stamps;
                match server_config(&self.cert_path, &self.key_path) {
                    Ok(config) => {
                        tracing::info!("TLS certificate reloaded");
                        state.config = config;
                    }
                    Err(error) => tracing::warn!(
                        %error,
                        "the TLS certificate files changed but can't be loaded: still serving \
                         the previous certificate"
                    ),
                }
            }
        }
        state.config.clone()
    }
}

/// The file's modification time, size and inode, or `None` if it can't be read.
fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// A TLS server configuration (ring, HTTP/1.1) from PEM files.
fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|err| format!("cannot read the certificate {}: {err}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate in {} (expected PEM)",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|err| format!("cannot read the private key {}: {err}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| {
            format!(
                "the certificate {} and key {} don't make a usable pair: {err}",
                cert_path.display(),
                key_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
