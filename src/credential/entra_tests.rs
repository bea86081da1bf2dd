//! The real `azure_identity` path against a fake Entra token endpoint over HTTPS, signed by a
//! test CA: proves that `--ca-file` reaches the credential's transport, that the credential
//! caches (and a rebuilt one doesn't), and that error bodies are scrubbed.

use super::entra::AzureSourceFactory;
use super::jwt::tests::jwt;
use super::*;
use crate::config::CredentialConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SCOPE: &str = "https://redis.azure.com/.default";

/// A TLS token endpoint on localhost. Tenant `bad-tenant` gets a 400 whose body carries a
/// token-like string.
struct FakeEntra {
    authority: String,
    ca_file: PathBuf,
    requests: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

fn certificates() -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    (ca.pem(), server)
}

async fn fake_entra(expires_in: u64) -> FakeEntra {
    let (ca_pem, server) = certificates();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write ca");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    answer(tls, &counter, expires_in).await;
                }
            });
        }
    });
    FakeEntra {
        authority: format!("https://localhost:{port}"),
        ca_file,
        requests,
        _dir: dir,
    }
}

/// Reads one request (headers and body) and answers it like Entra's token endpoint.
async fn answer<S>(mut stream: S, counter: &AtomicU64, expires_in: u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if request_complete(&request) {
            break;
        }
    }
    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
    let text = String::from_utf8_lossy(&request);
    let (status, body) = if text.starts_with("POST /bad-tenant/oauth2/v2.0/token") {
        let leaked = jwt(&serde_json::json!({"oid": "leak"}));
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": format!("AADSTS7000215: Invalid client secret provided. {leaked}"),
            "error_codes": [7000215],
        });
        ("400 Bad Request", body)
    } else {
        let token = jwt(&serde_json::json!({"oid": "fake-oid", "n": n}));
        let body = serde_json::json!({
            "access_token": token,
            "expires_in": expires_in,
            "token_type": "Bearer",
        });
        ("200 OK", body)
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn request_complete(request: &[u8]) -> bool {
    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let headers = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    let length = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    request.len() >= end + 4 + length
}

fn client_secret(tenant: &str, authority: &str) -> CredentialConfig {
    CredentialConfig::ClientSecret {
        tenant_id: tenant.to_owned(),
        client_id: "client-id".to_owned(),
        secret: Secret::new("client-secret-value"),
        authority_host: Some(authority.to_owned()),
    }
}

#[tokio::test]
async fn trusts_the_ca_file_caches_and_rebuilds() {
    let entra = fake_entra(3600).await;
    let config = client_secret("tenant", &entra.authority);
    let factory = AzureSourceFactory::new(&config, SCOPE, Some(&entra.ca_file)).expect("factory");

    let source = factory.build().expect("source");
    let first = source
        .fetch()
        .await
        .expect("token over TLS with the test CA");
    assert_eq!(
        jwt::oid_claim(first.secret.expose()).as_deref(),
        Ok("fake-oid")
    );
    let lifetime = first
        .expires_at
        .duration_since(SystemTime::now())
        .expect("future");
    assert!(lifetime > Duration::from_secs(3500));

    // azure_identity answers from its cache (more than 5 minutes left)...
    let again = source.fetch().await.expect("cached");
    assert_eq!(again.secret, first.secret);
    assert_eq!(again.expires_at, first.expires_at);
    assert_eq!(entra.requests.load(Ordering::SeqCst), 1);

    // ...and a new instance doesn't.
    let fresh = factory
        .build()
        .expect("source")
        .fetch()
        .await
        .expect("fresh");
    assert_ne!(fresh.secret, first.secret);
    assert_eq!(entra.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_the_ca_the_certificate_is_refused() {
    let entra = fake_entra(3600).await;
    let config = client_secret("tenant", &entra.authority);
    let factory = AzureSourceFactory::new(&config, SCOPE, None).expect("factory");
    let err = factory
        .build()
        .expect("source")
        .fetch()
        .await
        .expect_err("untrusted");
    assert!(err.message().contains("certificate"), "{err}");
    assert_eq!(entra.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn error_bodies_are_scrubbed() {
    let entra = fake_entra(3600).await;
    let config = client_secret("bad-tenant", &entra.authority);
    let factory = AzureSourceFactory::new(&config, SCOPE, Some(&entra.ca_file)).expect("factory");
    let err = factory
        .build()
        .expect("source")
        .fetch()
        .await
        .expect_err("400");
    let text = err.message();
    assert!(text.starts_with("HTTP 400: "), "{text}");
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(!text.contains("eyJ"), "{text}");
    assert!(!text.contains("client-secret-value"), "{text}");
}

#[tokio::test]
async fn the_manager_gets_genuinely_new_tokens_from_a_caching_credential() {
    // 310 s tokens sit outside azure_identity's 5-minute window, so the credential would hand
    // back its cached token; refresh at 1 % of the lifetime (3.1 s) must still get a new one.
    let entra = fake_entra(310).await;
    let config = client_secret("tenant", &entra.authority);
    let factory = AzureSourceFactory::new(&config, SCOPE, Some(&entra.ca_file)).expect("factory");
    let shutdown = CancellationToken::new();
    let policy = RefreshPolicy {
        refresh_at: 0.01,
        reauth_margin: Duration::from_secs(180),
        fetch_timeout: Duration::from_secs(10),
    };
    let manager = CredentialManager::start_entra(Arc::new(factory), None, policy, shutdown.clone())
        .expect("start");
    let first = manager
        .wait_current(Duration::from_secs(5))
        .await
        .expect("first token");
    assert_eq!(first.username.as_deref(), Some("fake-oid"));

    let mut rx = manager.subscribe();
    let second = tokio::time::timeout(
        Duration::from_secs(8),
        rx.wait_for(|s| s.current.as_ref().is_some_and(|c| c.generation == 2)),
    )
    .await
    .expect("second token in time")
    .expect("open")
    .current
    .clone()
    .expect("current");
    assert_ne!(second.password, first.password);
    assert!(second.expires_at > first.expires_at);
    // One request per token: the cached answer came from azure_identity, not the endpoint.
    assert_eq!(entra.requests.load(Ordering::SeqCst), 2);
    shutdown.cancel();
}
