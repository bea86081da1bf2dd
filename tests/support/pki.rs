//! A throw-away PKI: one CA and one server certificate for `localhost` and `127.0.0.1`.
//!
//! The PEM files live in a temporary directory owned by [`TestPki`] (for `redis-server` and for
//! the proxy's `--ca-file`), and ready-made rustls configurations serve our fake TLS servers
//! and let test clients trust the CA. Every `TestPki::new()` makes a fresh CA, so a second one
//! is a handy "untrusted" PKI for certificate-error tests.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The name the server certificate is issued for (besides the IP address `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// A CA plus a server certificate for `localhost` / `127.0.0.1`, as files and rustls configs.
pub struct TestPki {
    dir: TempDir,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
}

impl TestPki {
    /// Generates the CA and server certificate (ECDSA P-256) and writes `ca.pem`, `server.pem`
    /// and `server.key` into a fresh temporary directory.
    pub fn new() -> TestPki {
        super::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("test-pki-")
            .tempdir()
            .expect("create temp dir for the test PKI");

        // The CA. rcgen's default validity (1975..4096) is fine for tests.
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "redis-entra-proxy test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        // The server certificate: DNS name `localhost` and IP address 127.0.0.1.
        let server_key = KeyPair::generate().expect("generate server key");
        let mut server_params =
            CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        server_params.use_authority_key_identifier_extension = true;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("sign server certificate");

        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        std::fs::write(dir.path().join("server.pem"), server_cert.pem()).expect("write server.pem");
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem())
            .expect("write server.key");

        // rustls configurations, explicitly with the ring provider.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("add CA to roots");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();

        TestPki {
            dir,
            ca_pem,
            ca_der: ca_cert.der().clone(),
            server_config: Arc::new(server_config),
            client_config: Arc::new(client_config),
        }
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM): what the proxy gets as `--ca-file`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM), for `localhost` and `127.0.0.1`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key (PKCS#8 PEM).
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate as DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// Server-side TLS configuration (the server certificate, no client auth, no ALPN).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// Client-side TLS configuration that trusts (only) this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config.clone()
    }

    /// A tokio-rustls acceptor for [`Self::server_config`].
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server_config())
    }

    /// A tokio-rustls connector for [`Self::client_config`].
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client_config())
    }

    /// Opens a TLS connection to `127.0.0.1:port`, verifying the certificate for `localhost`.
    pub async fn connect(&self, port: u16) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME).expect("valid server name");
        self.connector().connect(name, tcp).await
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
