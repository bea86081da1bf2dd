//! A throw-away PKI: one CA and one server certificate for `localhost` and `127.0.0.1`
//! ([`TestPki::new`]), or for a single DNS host name and nothing else
//! ([`TestPki::for_host_only`], what the Redis Cluster tests use).
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

/// The name the server certificate of [`TestPki::new`] is issued for (besides the IP address
/// `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// The host name of the Redis Cluster tests' certificate ([`TestPki::for_host_only`]): like
/// Azure's `<name>.<region>.redis.azure.net`, a name that does not resolve and that no node
/// address (always `127.0.0.1`) matches, so only a client that verifies every node against the
/// configured host name (not the address it dialled) gets through.
pub const CLUSTER_HOST_NAME: &str = "cache.test";

/// A CA plus a server certificate (for `localhost` / `127.0.0.1`, or for one host name only),
/// as files and rustls configs.
pub struct TestPki {
    dir: TempDir,
    server_name: String,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
}

impl TestPki {
    /// Generates the CA and server certificate (ECDSA P-256) for `localhost` and `127.0.0.1`
    /// and writes `ca.pem`, `server.pem` and `server.key` into a fresh temporary directory.
    pub fn new() -> TestPki {
        Self::generate(
            SERVER_NAME,
            vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// Like [`Self::new`], but the certificate names *only* the DNS name `host` (no IP address
    /// SAN, CN = `host`), so a client that verifies it against `127.0.0.1` — the address it
    /// dialled — fails, as a client dialling an Azure shard by IP does. It carries both the
    /// serverAuth and the clientAuth extended key usage: Redis nodes present it as a client
    /// certificate too when they connect to each other (cluster bus, replication, `MIGRATE`
    /// with `tls-cluster yes` / `tls-replication yes`), and OpenSSL checks the purpose.
    pub fn for_host_only(host: &str) -> TestPki {
        Self::generate(
            host,
            vec![host.to_string()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn generate(
        server_name: &str,
        subject_alt_names: Vec<String>,
        extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> TestPki {
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

        // The server certificate (rcgen turns a SAN that parses as an IP into an IP SAN).
        let server_key = KeyPair::generate().expect("generate server key");
        let mut server_params =
            CertificateParams::new(subject_alt_names).expect("server certificate params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, server_name);
        server_params.use_authority_key_identifier_extension = true;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = extended_key_usages;
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
            server_name: server_name.to_string(),
            ca_pem,
            ca_der: ca_cert.der().clone(),
            server_config: Arc::new(server_config),
            client_config: Arc::new(client_config),
        }
    }

    /// The DNS name the server certificate is issued for, which is what clients must verify:
    /// [`SERVER_NAME`] for [`Self::new`], the host of [`Self::for_host_only`].
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM): what the proxy gets as `--ca-file`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM), for [`Self::server_name`] (and `127.0.0.1` for
    /// [`Self::new`]).
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

    /// Opens a TLS connection to `127.0.0.1:port`, verifying the certificate for
    /// [`Self::server_name`] (`localhost` for [`Self::new`]).
    pub async fn connect(&self, port: u16) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_verifying(port, &self.server_name).await
    }

    /// Opens a TLS connection to `127.0.0.1:port`, sending `name` as SNI and verifying the
    /// certificate for it: `"127.0.0.1"` (an IP address name) shows whether the certificate
    /// would pass for a client that verifies the address it dialled.
    pub async fn connect_verifying(
        &self,
        port: u16,
        name: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(name.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid TLS server name {name:?}: {e}"),
            )
        })?;
        self.connector().connect(name, tcp).await
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
