//! End-to-end tests of the manager with fake token sources and real (short) time.

use super::jwt::tests::jwt;
use super::*;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// Mints unsigned JWTs of a fixed lifetime; switches let a test make it fail or cache.
struct Issuer {
    lifetime: Duration,
    /// Put an `oid` claim in the tokens.
    with_oid: bool,
    /// Every request fails (with a token-like string in the error, which must be scrubbed).
    failing: AtomicBool,
    /// Every request hangs (an endpoint that accepts and never answers).
    hanging: AtomicBool,
    /// Each source instance answers from its own cache while the token is valid, like
    /// `azure_identity`.
    instance_cache: bool,
    /// The issuer itself keeps returning its last token (like IMDS or the Azure CLI).
    sticky: AtomicBool,
    last: Mutex<Option<Token>>,
    minted: AtomicU64,
    requests: AtomicU64,
    builds: AtomicU64,
}

impl Issuer {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Issuer {
            lifetime,
            with_oid: true,
            failing: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            instance_cache: false,
            sticky: AtomicBool::new(false),
            last: Mutex::new(None),
            minted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            builds: AtomicU64::new(0),
        })
    }

    fn issue(&self) -> Result<Token, SourceError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            let leaked = jwt(&serde_json::json!({"oid": "leak"}));
            return Err(SourceError::new(format!(
                "HTTP 503: upstream said {leaked}"
            )));
        }
        let mut last = self.last.lock().expect("lock");
        if let Some(token) = last.as_ref().filter(|_| self.sticky.load(Ordering::SeqCst)) {
            return Ok(token.clone());
        }
        let n = self.minted.fetch_add(1, Ordering::SeqCst) + 1;
        let claims = if self.with_oid {
            serde_json::json!({"oid": "oid-1", "n": n})
        } else {
            serde_json::json!({"sub": "someone", "n": n})
        };
        let token = Token {
            secret: Secret::new(jwt(&claims)),
            expires_at: SystemTime::now() + self.lifetime,
        };
        *last = Some(token.clone());
        Ok(token)
    }
}

struct FakeFactory(Arc<Issuer>);

impl SourceFactory for FakeFactory {
    fn build(&self) -> Result<Arc<dyn TokenSource>, SourceError> {
        self.0.builds.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(FakeSource {
            issuer: self.0.clone(),
            cache: Mutex::new(None),
        }))
    }
}

struct FakeSource {
    issuer: Arc<Issuer>,
    cache: Mutex<Option<Token>>,
}

impl TokenSource for FakeSource {
    fn fetch(&self) -> BoxFuture<'_, Result<Token, SourceError>> {
        Box::pin(async move {
            if self.issuer.hanging.load(Ordering::SeqCst) {
                self.issuer.requests.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            let mut cache = self.cache.lock().expect("lock");
            let cached = cache
                .as_ref()
                .filter(|token| self.issuer.instance_cache && token.expires_at > SystemTime::now());
            if let Some(token) = cached {
                return Ok(token.clone());
            }
            let token = self.issuer.issue()?;
            *cache = Some(token.clone());
            Ok(token)
        })
    }
}

fn policy() -> RefreshPolicy {
    RefreshPolicy {
        refresh_at: 0.75,
        reauth_margin: Duration::from_secs(180),
        fetch_timeout: Duration::from_secs(1),
    }
}

fn start(issuer: &Arc<Issuer>, username: Option<&str>) -> (CredentialManager, CancellationToken) {
    let shutdown = CancellationToken::new();
    let manager = CredentialManager::start_entra(
        Arc::new(FakeFactory(issuer.clone())),
        username.map(str::to_owned),
        policy(),
        shutdown.clone(),
    )
    .expect("start");
    (manager, shutdown)
}

/// Every state published during `period`, checked as it arrives: generations only grow and no
/// credential is already expired when it shows up.
async fn observe(manager: &CredentialManager, period: Duration) -> Vec<Arc<AuthCredential>> {
    let mut rx = manager.subscribe();
    let mut seen: Vec<Arc<AuthCredential>> = Vec::new();
    let deadline = tokio::time::Instant::now() + period;
    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, rx.changed()).await {
        let Some(current) = rx.borrow_and_update().current.clone() else {
            continue;
        };
        if seen
            .last()
            .is_some_and(|c| c.generation == current.generation)
        {
            continue;
        }
        assert!(
            current.is_valid_at(SystemTime::now()),
            "generation {} published expired",
            current.generation
        );
        if let Some(previous) = seen.last() {
            assert!(current.generation > previous.generation);
        }
        seen.push(current);
    }
    seen
}

#[tokio::test]
async fn two_second_tokens_keep_coming() {
    let issuer = Issuer::new(Duration::from_secs(2));
    let (manager, shutdown) = start(&issuer, None);
    assert_eq!(manager.mode(), AuthKind::Entra);
    let first = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("first token");
    assert_eq!(first.generation, 1);
    assert_eq!(first.username.as_deref(), Some("oid-1"));
    assert!(first.expires_at.is_some());

    // Refreshes every second (2 s tokens: latest at L - 2 * L/4).
    let seen = observe(&manager, Duration::from_millis(4500)).await;
    assert!(seen.len() >= 3, "only {} new tokens", seen.len());
    let passwords: std::collections::HashSet<_> = seen
        .iter()
        .map(|c| c.password.expose().to_owned())
        .collect();
    assert_eq!(
        passwords.len(),
        seen.len(),
        "every generation has a new token"
    );
    assert!(!passwords.contains(first.password.expose()));
    assert_eq!(manager.counters().failures(), 0);
    shutdown.cancel();
}

#[tokio::test]
async fn failures_keep_the_old_token_and_retry_until_success() {
    let issuer = Issuer::new(Duration::from_secs(2));
    let (manager, shutdown) = start(&issuer, None);
    let first = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("first token");
    issuer.failing.store(true, Ordering::SeqCst);
    let requests_before = issuer.requests.load(Ordering::SeqCst);

    // Through the refresh point and well past expiry: the old token stays, the error shows.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let state = manager.subscribe().borrow().clone();
    let current = state.current.expect("old credential kept");
    assert_eq!(current.generation, first.generation);
    let error = state.last_error.expect("last error");
    assert!(error.contains("HTTP 503"), "{error}");
    assert!(
        !error.contains("eyJ"),
        "token-like text must be scrubbed: {error}"
    );
    // Backoff for a 2 s token is 0.1..0.2 s: many attempts, and no giving up after expiry.
    let attempts = issuer.requests.load(Ordering::SeqCst) - requests_before;
    assert!(attempts >= 10, "only {attempts} attempts");
    let err = manager
        .wait_current(Duration::from_millis(100))
        .await
        .expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(err.to_string().contains("HTTP 503"), "{err}");

    issuer.failing.store(false, Ordering::SeqCst);
    let next = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("recovered");
    assert_eq!(next.generation, first.generation + 1);
    assert!(manager.subscribe().borrow().last_error.is_none());
    assert!(manager.counters().failures() >= 10);
    shutdown.cancel();
}

#[tokio::test]
async fn a_hung_endpoint_times_out_and_is_retried() {
    let issuer = Issuer::new(Duration::from_secs(2));
    let (manager, shutdown) = start(&issuer, None);
    let first = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("first token");
    issuer.hanging.store(true, Ordering::SeqCst);
    // Refresh at 1 s, then requests time out after 1 s (a quarter of 2 s, raised to the floor).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let error = manager.subscribe().borrow().last_error.clone();
    let error = error.expect("timeout reported");
    assert!(error.contains("timed out after 1s"), "{error}");
    assert!(issuer.requests.load(Ordering::SeqCst) >= 2);

    issuer.hanging.store(false, Ordering::SeqCst);
    let next = wait_for_generation(&manager, first.generation + 1).await;
    assert!(next.is_valid_at(SystemTime::now()));
    shutdown.cancel();
}

#[tokio::test]
async fn a_caching_source_is_rebuilt_to_get_a_fresh_token() {
    let issuer = Arc::new(Issuer {
        instance_cache: true,
        ..Arc::into_inner(Issuer::new(Duration::from_secs(2))).expect("unique")
    });
    let (manager, shutdown) = start(&issuer, None);
    manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("first token");
    let seen = observe(&manager, Duration::from_millis(3500)).await;
    assert!(seen.len() >= 2, "only {} new tokens", seen.len());
    // Every refresh happened while the cached token was still valid, so each needed a new
    // instance: one build at start plus one per refresh.
    let builds = issuer.builds.load(Ordering::SeqCst);
    assert!(
        builds > seen.len() as u64,
        "{builds} builds for {} tokens",
        seen.len()
    );
    assert!(seen.windows(2).all(|w| w[0].expires_at != w[1].expires_at));
    shutdown.cancel();
}

#[tokio::test]
async fn an_upstream_that_keeps_the_same_token_is_asked_again() {
    let issuer = Issuer::new(Duration::from_secs(2));
    let (manager, shutdown) = start(&issuer, None);
    let first = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("first token");
    issuer.sticky.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let state = manager.subscribe().borrow().clone();
    assert_eq!(state.current.expect("kept").generation, first.generation);
    assert!(
        state.last_error.is_none(),
        "a cached answer is not an error"
    );
    assert!(issuer.builds.load(Ordering::SeqCst) >= 2);

    issuer.sticky.store(false, Ordering::SeqCst);
    let next = wait_for_generation(&manager, first.generation + 1).await;
    assert_ne!(next.password, first.password);
    assert!(next.is_valid_at(SystemTime::now()));
    shutdown.cancel();
}

#[tokio::test]
async fn the_redis_user_is_the_oid_unless_configured() {
    let issuer = Arc::new(Issuer {
        with_oid: false,
        ..Arc::into_inner(Issuer::new(Duration::from_secs(60))).expect("unique")
    });
    let (manager, shutdown) = start(&issuer, None);
    let err = manager
        .wait_current(Duration::from_millis(500))
        .await
        .expect_err("no oid");
    assert!(err.to_string().contains("--redis-username"), "{err}");
    shutdown.cancel();

    let (manager, shutdown) = start(&issuer, Some("configured-user"));
    let credential = manager
        .wait_current(Duration::from_secs(2))
        .await
        .expect("token");
    assert_eq!(credential.username.as_deref(), Some("configured-user"));
    shutdown.cancel();
}

#[tokio::test]
async fn no_token_yet_reports_the_last_error_and_shutdown_stops_requests() {
    let issuer = Issuer::new(Duration::from_secs(60));
    issuer.failing.store(true, Ordering::SeqCst);
    let (manager, shutdown) = start(&issuer, None);
    let err = manager
        .wait_current(Duration::from_millis(300))
        .await
        .expect_err("failing");
    match &err {
        CredentialError::Unavailable { reason, .. } => {
            assert!(reason.starts_with("HTTP 503"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!format!("{err} {err:?}").contains("eyJ"));

    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let requests = issuer.requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(issuer.requests.load(Ordering::SeqCst), requests);
}

#[tokio::test]
async fn auth_none_publishes_nothing() {
    let manager = CredentialManager::idle(AuthKind::None);
    assert_eq!(manager.mode(), AuthKind::None);
    assert!(manager.subscribe().borrow().current.is_none());
    assert_eq!(
        manager.wait_current(Duration::from_millis(10)).await.err(),
        Some(CredentialError::Disabled)
    );
}

#[tokio::test]
async fn inline_access_key() {
    let manager = CredentialManager::start_access_key(
        &KeySource::Inline(Secret::new("the-key")),
        None,
        KEY_FILE_POLL_INTERVAL,
        CancellationToken::new(),
    )
    .expect("start");
    assert_eq!(manager.mode(), AuthKind::AccessKey);
    let credential = manager
        .wait_current(Duration::ZERO)
        .await
        .expect("published at once");
    assert_eq!(credential.password.expose(), "the-key");
    assert_eq!((credential.generation, credential.expires_at), (1, None));
    assert!(credential.username.is_none());
}

async fn wait_for_generation(manager: &CredentialManager, generation: u64) -> Arc<AuthCredential> {
    let mut rx = manager.subscribe();
    let state = tokio::time::timeout(
        Duration::from_secs(3),
        rx.wait_for(|s| {
            s.current
                .as_ref()
                .is_some_and(|c| c.generation >= generation)
        }),
    )
    .await
    .expect("in time")
    .expect("open")
    .clone();
    state.current.expect("current")
}

/// `dir/key` → `..data/key`, `..data` → `version`: how a Kubernetes Secret volume looks.
fn kubernetes_secret(dir: &Path, version: &str, key: &str) {
    let data = dir.join(version);
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("key"), key).expect("write");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    if !dir.join("key").exists() {
        std::os::unix::fs::symlink("..data/key", dir.join("key")).expect("symlink");
    }
}

#[tokio::test]
async fn access_key_file_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    kubernetes_secret(dir.path(), "v1", "key-1\n");
    let path = dir.path().join("key");
    let shutdown = CancellationToken::new();
    let manager = CredentialManager::start_access_key(
        &KeySource::File(path.clone()),
        Some("default".into()),
        Duration::from_millis(20),
        shutdown.clone(),
    )
    .expect("start");
    let first = manager.wait_current(Duration::ZERO).await.expect("key");
    assert_eq!((first.password.expose(), first.generation), ("key-1", 1));
    assert_eq!(first.username.as_deref(), Some("default"));

    // The Secret is updated: symlink swap, new content.
    kubernetes_secret(dir.path(), "v2", "key-2\n");
    let second = wait_for_generation(&manager, 2).await;
    assert_eq!(second.password.expose(), "key-2");

    // Same content rewritten: nothing new. Unreadable: the old key stays.
    std::fs::write(dir.path().join("v2/key"), "key-2").expect("rewrite");
    std::fs::remove_dir_all(dir.path().join("v2")).expect("remove");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kept = manager.wait_current(Duration::ZERO).await.expect("kept");
    assert_eq!((kept.generation, kept.password.expose()), (2, "key-2"));

    kubernetes_secret(dir.path(), "v3", "key-3");
    let third = wait_for_generation(&manager, 3).await;
    assert_eq!((third.generation, third.password.expose()), (3, "key-3"));
    shutdown.cancel();
}

#[test]
fn an_unreadable_key_file_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let err = CredentialManager::start_access_key(
        &KeySource::File(dir.path().join("missing")),
        None,
        KEY_FILE_POLL_INTERVAL,
        CancellationToken::new(),
    )
    .expect_err("missing file");
    assert!(err.0.contains("access key file"), "{err}");
}
