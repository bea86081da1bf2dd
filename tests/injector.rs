//! The sidecar injector (`redis-entra-proxy injector`), from real `AdmissionReview` v1 JSON to
//! a working sidecar.
//!
//! * Fixtures (`tests/fixtures/admission/*.review.json`) go through the library's review
//!   function; where there is a patch, it is applied with the `json-patch` crate and the result
//!   compared with a golden pod (`expected/<name>.pod.json`, a complete `v1` Pod that the
//!   chart's tests also validate against the Kubernetes OpenAPI schema). Set
//!   `REDIS_ENTRA_PROXY_BLESS=1` to rewrite the golden files after an intended change, then
//!   read the diff.
//! * The real binary over HTTPS: reviews, `/healthz`, certificate rotation, bad start-up
//!   configuration (exit 2), SIGTERM (exit 0); and its bounds: a body that never finishes is
//!   cut off, a peer holding every connection slot doesn't keep reviews out, many large
//!   reviews at once stay within the memory bound.
//! * End to end: the injected sidecar's own `args` and `env`, with only what must point at the
//!   local test world substituted, run as the real proxy in front of a real Redis.

mod support;

use base64::Engine;
use redis_entra_proxy::injector::sidecar::Options;
use redis_entra_proxy::injector::{self as injector_lib, review};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::{ProxyProcess, Setup, TestPki, http_request, run_to_end, wait_until_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the fixtures are.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission")
}

/// The raw bytes of a fixture file.
fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A fixture review as JSON.
fn review_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(&format!("{name}.review.json"))).expect("fixture is JSON")
}

/// The chart-wide defaults the fixtures are reviewed with (`defaults.json`: an upstream and a
/// pinned image, so that the golden files don't change with the crate version).
fn chart_defaults() -> Options {
    let text = String::from_utf8(fixture("defaults.json")).expect("UTF-8");
    Options::from_defaults_json(&text).expect("valid defaults.json")
}

/// The response review for a fixture (which must be answerable).
fn answer(name: &str, defaults: &Options) -> Value {
    let (response, _) = review::answer(&fixture(&format!("{name}.review.json")), defaults)
        .unwrap_or_else(|e| panic!("{name}: not answered: {e}"));
    assert_envelope(&response, &review_json(name));
    response["response"].clone()
}

/// `apiVersion`, `kind` and the echoed uid of a response review.
fn assert_envelope(response: &Value, request: &Value) {
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], request["request"]["uid"]);
}

/// Asserts an allowed response without a patch.
fn assert_allowed_unchanged(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(
        response.get("patch").is_none(),
        "unexpected patch: {response}"
    );
    assert!(response.get("patchType").is_none(), "{response}");
}

/// The JSON Patch of an allowed response, decoded.
fn patch_of(response: &Value) -> json_patch::Patch {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let encoded = response["patch"].as_str().expect("patch is a string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("patch is base64");
    serde_json::from_slice(&bytes).expect("patch is a JSON Patch")
}

/// `pod` with `patch` applied, as the API server would.
fn applied(pod: &Value, patch: &json_patch::Patch) -> Value {
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, patch).expect("the patch applies to the pod");
    pod
}

/// Compares `pod` with `expected/<name>.pod.json` (exactly: any difference fails).
fn assert_golden(name: &str, pod: &Value) {
    let path = fixtures().join(format!("expected/{name}.pod.json"));
    if std::env::var_os("REDIS_ENTRA_PROXY_BLESS").is_some() {
        let text = serde_json::to_string_pretty(pod).expect("JSON") + "\n";
        std::fs::write(&path, text).expect("write golden file");
    }
    let expected: Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .expect("golden file is JSON");
    assert!(
        *pod == expected,
        "{name}: the patched pod differs from {}\n--- got ---\n{}",
        path.display(),
        serde_json::to_string_pretty(pod).unwrap_or_default()
    );
}

/// The review of `pod` as a new CREATE (same envelope as fixture `like`).
fn review_of(pod: &Value, like: &str) -> Vec<u8> {
    let mut review = review_json(like);
    review["request"]["object"] = pod.clone();
    serde_json::to_vec(&review).expect("JSON")
}

/// The init containers named `redis-entra-proxy`.
fn sidecars(pod: &Value) -> Vec<&Value> {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "redis-entra-proxy")
        .collect()
}

/// The value after `flag` in a container's `args`.
fn arg<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    let args = container["args"].as_array()?;
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1)?.as_str()
}

/// Reviews a fixture, applies the patch, compares with the golden pod, and checks that the
/// patched pod, reviewed again (a reinvocation), is left alone. Returns the patched pod.
fn inject(name: &str, defaults: &Options) -> Value {
    let response = answer(name, defaults);
    let pod = review_json(name)["request"]["object"].clone();
    let patched = applied(&pod, &patch_of(&response));
    assert_golden(name, &patched);
    assert_eq!(sidecars(&patched).len(), 1);
    assert_eq!(
        patched["metadata"]["annotations"]["redis-entra-proxy.io/injected"],
        "true"
    );
    let (again, _) = review::answer(&review_of(&patched, name), defaults).expect("answered");
    assert_allowed_unchanged(&again["response"]);
    patched
}

// ---------------------------------------------------------------------------------------------
// Fixtures through the review function.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_plain_labelled_pod_gets_the_sidecar_first_among_new_init_containers() {
    let pod = inject("plain", &chart_defaults());
    let initial = &pod["spec"]["initContainers"];
    assert_eq!(initial.as_array().map(Vec::len), Some(1));
    let sidecar = &initial[0];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        sidecar["args"],
        json!([
            "--upstream",
            "mycache.redis.cache.windows.net:6380",
            "--listen",
            "127.0.0.1:6379",
            "--auth",
            "auto",
            "--admin-listen",
            "0.0.0.0:9090",
            "--log-format",
            "json",
            "--max-connections",
            "56"
        ])
    );
    assert!(sidecar.get("env").is_none());
    assert!(sidecar.get("volumeMounts").is_none());
    assert_eq!(
        sidecar["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
    );
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], "proxy-admin");
    // The app's own volumes are untouched: no access key, no volume added.
    assert_eq!(pod["spec"]["volumes"].as_array().map(Vec::len), Some(1));
}

#[test]
fn every_annotation_overrides_the_defaults_and_existing_lists_are_added_into() {
    let pod = inject("overrides", &chart_defaults());
    let init = pod["spec"]["initContainers"].as_array().expect("array");
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "redis-entra-proxy");
    assert_eq!(init[1]["name"], "migrate");
    let sidecar = &init[0];
    let expected_args = [
        ("--upstream", "shop-cache.westeurope.redis.azure.net:10000"),
        ("--listen", "127.0.0.1:6380"),
        ("--auth", "access-key"),
        ("--admin-listen", "0.0.0.0:9191"),
        ("--log-format", "text"),
        ("--database", "3"),
        ("--max-connections", "200"),
        (
            "--access-key-file",
            "/var/run/secrets/redis-entra-proxy/access-key",
        ),
    ];
    for (flag, value) in expected_args {
        assert_eq!(arg(sidecar, flag), Some(value), "{flag}");
    }
    assert_eq!(
        sidecar["env"],
        json!([{"name": "AZURE_REDIS_CLIENTID", "value": "3f2b8c1d-9a4e-4b7f-8c6d-2e1f0a9b8c7d"}])
    );
    assert_eq!(
        sidecar["image"],
        "contoso.azurecr.io/mirror/redis-entra-proxy:0.1.0"
    );
    assert_eq!(sidecar["imagePullPolicy"], "Always");
    assert_eq!(sidecar["ports"][0]["containerPort"], 9191);
    assert_eq!(
        sidecar["resources"],
        json!({"requests": {"cpu": "100m", "memory": "64Mi"},
               "limits": {"cpu": "1", "memory": "256Mi"}})
    );
    let volumes = pod["spec"]["volumes"].as_array().expect("array");
    assert_eq!(volumes.len(), 3);
    assert_eq!(
        volumes[2],
        json!({"name": "redis-entra-proxy-access-key", "secret": {
            "secretName": "shop-cache-keys",
            "items": [{"key": "primary-key", "path": "access-key"}],
            "defaultMode": 0o444
        }})
    );
    // The pod's other annotations are kept.
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2026-12-01T09:10:00Z"
    );
}

#[test]
fn an_access_key_secret_on_a_pod_without_volumes_creates_the_volume_list() {
    let pod = inject("access-key", &chart_defaults());
    assert_eq!(
        pod["spec"]["volumes"],
        json!([{"name": "redis-entra-proxy-access-key", "secret": {
            "secretName": "shop-cache-keys",
            "items": [{"key": "access-key", "path": "access-key"}],
            "defaultMode": 0o444
        }}])
    );
    assert_eq!(
        sidecars(&pod)[0]["volumeMounts"],
        json!([{"name": "redis-entra-proxy-access-key",
                "mountPath": "/var/run/secrets/redis-entra-proxy", "readOnly": true}])
    );
}

/// Pods whose own securityContext sets other users and groups (with and without an fsGroup):
/// the sidecar keeps its own user and group, the pod's securityContext is not touched (it
/// decides what every container's groups are), and the key file is readable by anyone who
/// mounts it, which only the sidecar does. `tests/k8s` checks the file's mode, owner and group
/// against Kubernetes' volume rules for every golden pod, these two included.
#[test]
fn a_pod_with_its_own_users_and_groups_gets_a_sidecar_that_can_read_its_key() {
    for name in ["hostile-groups", "hostile-fsgroup"] {
        let original = review_json(name)["request"]["object"].clone();
        let pod = inject(name, &chart_defaults());
        assert_eq!(
            pod["spec"]["securityContext"], original["spec"]["securityContext"],
            "{name}"
        );
        let sidecar = sidecars(&pod)[0];
        assert_eq!(sidecar["securityContext"]["runAsUser"], 65532, "{name}");
        assert_eq!(sidecar["securityContext"]["runAsGroup"], 65532, "{name}");
        let volume = pod["spec"]["volumes"]
            .as_array()
            .and_then(|v| {
                v.iter()
                    .find(|v| v["name"] == "redis-entra-proxy-access-key")
            })
            .expect("the key's volume");
        assert_eq!(volume["secret"]["defaultMode"], 0o444, "{name}");
        assert_eq!(
            pod["spec"]["containers"], original["spec"]["containers"],
            "{name}"
        );
    }
}

/// Without the annotation, `--max-connections` follows the sidecar's memory limit: what the
/// limit holds if every connection costs the worst case measured with `bench/` (see
/// `max_connections_for`).
#[test]
fn the_default_connection_limit_follows_the_memory_limit() {
    let defaults = chart_defaults();
    for (limit, expected) in [("128Mi", "56"), ("512Mi", "248")] {
        let mut review = review_json("plain");
        review["request"]["object"]["metadata"]["annotations"] =
            json!({"redis-entra-proxy.io/memory-limit": limit});
        let (response, _) =
            review::answer(&serde_json::to_vec(&review).expect("JSON"), &defaults).expect("ok");
        let pod = applied(
            &review["request"]["object"],
            &patch_of(&response["response"]),
        );
        assert_eq!(
            arg(sidecars(&pod)[0], "--max-connections"),
            Some(expected),
            "{limit}"
        );
    }
}

#[test]
fn already_injected_and_reinvoked_pods_are_left_alone() {
    for name in ["injected", "reinvocation"] {
        assert_allowed_unchanged(&answer(name, &chart_defaults()));
    }
    // The reinvocation fixture is the golden plain pod plus another webhook's change.
    let reinvoked = &review_json("reinvocation")["request"]["object"];
    assert_eq!(sidecars(reinvoked).len(), 1);
}

#[test]
fn pods_without_the_label_other_kinds_and_other_operations_are_allowed_unchanged() {
    for name in ["unlabelled", "deployment", "update"] {
        assert_allowed_unchanged(&answer(name, &chart_defaults()));
    }
}

#[test]
fn bad_annotation_values_are_refused_with_the_annotation_the_value_and_what_is_expected() {
    let cases = [
        (
            "bad-database",
            "redis-entra-proxy.io/database: \"abc\" is not a database number (0..=2147483647)",
        ),
        (
            "bad-client-id",
            "redis-entra-proxy.io/client-id: \"my-identity\" is not a client id: expected a GUID",
        ),
        (
            "bad-quantity",
            "redis-entra-proxy.io/memory-limit: \"128MB\" is not a Kubernetes quantity",
        ),
        (
            "bad-auth",
            "redis-entra-proxy.io/auth: \"password\" is not one of auto, entra, access-key, none",
        ),
        (
            "bad-upstream",
            "redis-entra-proxy.io/upstream: \"rediss://mycache:6380\" is not a cache address",
        ),
        (
            "bad-admin-port",
            "redis-entra-proxy.io/admin-port: \"70000\" is not a port number (1..=65534",
        ),
        (
            "bad-access-key-secret",
            "redis-entra-proxy.io/access-key-secret: \"Shop_Keys\" is not a Secret reference",
        ),
        (
            "bad-image-pull-policy",
            "redis-entra-proxy.io/image-pull-policy: \"always\" is not one of Always, \
             IfNotPresent, Never",
        ),
    ];
    for (name, start) in cases {
        let response = answer(name, &chart_defaults());
        assert_refused(&response, start);
    }
}

/// Pods whose sidecar could not start, or would be open to others, are refused with a message
/// that says what to do instead: a unix socket (the sidecar has a read-only root filesystem
/// and no volume shared with the app), a listener on the pod network without a password, a
/// host-network pod (the node's loopback is shared by every such pod).
#[test]
fn pods_whose_sidecar_could_not_start_or_would_be_open_are_refused() {
    let cases = [
        (
            "unix-listen",
            "redis-entra-proxy.io/listen: \"unix:/var/run/redis/redis.sock\" is a unix socket, \
             which an injected sidecar can't offer",
        ),
        (
            "open-listen",
            "redis-entra-proxy.io/listen: \"0.0.0.0:6379\" is reachable from the pod network",
        ),
        ("host-network", "the pod has hostNetwork: true"),
    ];
    for (name, start) in cases {
        assert_refused(&answer(name, &chart_defaults()), start);
    }
}

#[test]
fn a_listener_on_the_pod_network_takes_its_password_from_a_secret() {
    let pod = inject("pod-network-listen", &chart_defaults());
    let sidecar = sidecars(&pod)[0];
    assert_eq!(arg(sidecar, "--listen"), Some("0.0.0.0:6379"));
    assert_eq!(
        sidecar["env"],
        json!([{"name": "REDIS_PROXY_LISTEN_PASSWORD", "valueFrom": {
            "secretKeyRef": {"name": "redis-listen", "key": "password"}}}])
    );
}

/// Asserts `allowed: false`, code 400, no patch, and a message starting with `start`.
fn assert_refused(response: &Value, start: &str) {
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["status"]["code"], 400, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    let message = response["status"]["message"].as_str().expect("a message");
    assert!(message.starts_with(start), "{message}");
}

#[test]
fn a_missing_upstream_is_refused_unless_the_chart_sets_one() {
    let response = answer("missing-upstream", &Options::default());
    assert_refused(
        &response,
        "redis-entra-proxy.io/upstream is not set: set the pod annotation \
         redis-entra-proxy.io/upstream",
    );
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("injector.defaults.upstream"), "{message}");
    // With the chart's upstream the same pod is injected.
    patch_of(&answer("missing-upstream", &chart_defaults()));
}

#[test]
fn a_review_whose_object_is_not_a_pod_is_refused() {
    assert_refused(
        &answer("unparseable-object", &chart_defaults()),
        "the review's object is not a JSON object (a Pod)",
    );
}

#[test]
fn a_malformed_review_is_not_answered() {
    let error =
        review::answer(&fixture("malformed.review.json"), &chart_defaults()).expect_err("no uid");
    assert!(error.0.contains("uid"), "{error}");
    let error = review::answer(b"{\"kind\": ", &chart_defaults()).expect_err("not JSON");
    assert!(
        error.0.starts_with("the body is not an AdmissionReview"),
        "{error}"
    );
}

#[test]
fn every_golden_pod_is_a_complete_v1_pod() {
    let dir = fixtures().join("expected");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("expected/ exists") {
        let path = entry.expect("entry").path();
        let pod: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("JSON");
        assert_eq!(pod["apiVersion"], "v1", "{}", path.display());
        assert_eq!(pod["kind"], "Pod", "{}", path.display());
        assert!(pod["metadata"].is_object(), "{}", path.display());
        assert!(pod["spec"]["containers"].is_array(), "{}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 8);
}

// ---------------------------------------------------------------------------------------------
// The real binary over HTTPS.
// ---------------------------------------------------------------------------------------------

/// A running injector with its PKI and defaults file.
struct Injector {
    process: ProxyProcess,
    pki: TestPki,
    dir: tempfile::TempDir,
}

impl Injector {
    /// Starts `redis-entra-proxy injector` on a free port with a fresh certificate (copied into
    /// a directory of its own, so a test can rotate it) and `defaults.json`.
    async fn start() -> Injector {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(pki.cert_path(), dir.path().join("tls.crt")).expect("copy cert");
        std::fs::copy(pki.key_path(), dir.path().join("tls.key")).expect("copy key");
        let defaults = fixtures().join("defaults.json");
        let cert = dir.path().join("tls.crt").display().to_string();
        let key = dir.path().join("tls.key").display().to_string();
        let defaults = defaults.display().to_string();
        let process = ProxyProcess::start_exact(
            &[
                "injector",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
            ],
            &[
                ("REDIS_PROXY_INJECTOR_DEFAULTS_FILE", &defaults),
                ("RUST_LOG", "info"),
            ],
        )
        .await;
        Injector { process, pki, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.process.addr().port())
    }

    /// One request over HTTPS, trusting `pki`.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        pki: &TestPki,
    ) -> Result<support::HttpResponse, String> {
        let body = body.map(|b| ("application/json", b));
        http_request(
            method,
            &self.url(path),
            &[],
            body,
            Some(pki),
            Duration::from_secs(10),
        )
        .await
    }

    async fn post_review(&self, name: &str) -> support::HttpResponse {
        self.request(
            "POST",
            "/mutate",
            Some(fixture(&format!("{name}.review.json"))),
            &self.pki,
        )
        .await
        .expect("POST /mutate")
    }
}

#[tokio::test]
async fn the_binary_answers_reviews_over_https_and_exits_0_on_sigterm() {
    let mut injector = Injector::start().await;
    let health = injector
        .request("GET", "/healthz", None, &injector.pki)
        .await
        .expect("GET /healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    let response = injector.post_review("plain").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.headers["content-type"], "application/json");
    let review = response.json();
    assert_envelope(&review, &review_json("plain"));
    let pod = review_json("plain")["request"]["object"].clone();
    assert_golden("plain", &applied(&pod, &patch_of(&review["response"])));

    let refused = injector.post_review("bad-database").await.json();
    assert_refused(
        &refused["response"],
        "redis-entra-proxy.io/database: \"abc\"",
    );

    let malformed = injector.post_review("malformed").await;
    assert_eq!(malformed.status, 400);
    assert!(malformed.body.contains("uid"), "{}", malformed.body);
    let wrong_method = injector
        .request("GET", "/mutate", None, &injector.pki)
        .await
        .expect("GET /mutate");
    assert_eq!(wrong_method.status, 405);
    let too_big = injector
        .request("POST", "/mutate", Some(vec![b' '; 5 << 20]), &injector.pki)
        .await;
    assert!(
        matches!(&too_big, Ok(r) if r.status == 413) || too_big.is_err(),
        "{too_big:?}"
    );

    injector.process.terminate();
    let status = injector.process.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        injector.process.output()
    );
    assert!(injector.process.output_contains("injector stopped"));
}

/// The peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// A review of the plain pod padded with an unrelated annotation to `size` bytes of JSON.
fn padded_review(size: usize) -> Vec<u8> {
    let mut review = review_json("plain");
    let base = serde_json::to_vec(&review).expect("JSON").len();
    let pad = "x".repeat(size.saturating_sub(base + 40));
    review["request"]["object"]["metadata"]["annotations"] = json!({"example.com/blob": pad});
    serde_json::to_vec(&review).expect("JSON")
}

/// Sends the head of `POST /mutate` declaring `length` bytes and `sent` of them, on a TLS
/// connection of its own, and keeps it open without sending more.
async fn stalled_body(injector: &Injector, length: usize, sent: usize) -> impl AsyncReadExt {
    let port = injector.process.addr().port();
    let mut tls = injector.pki.connect(port).await.expect("TLS");
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {length}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    tls.write_all(&vec![b' '; sent])
        .await
        .expect("part of the body");
    tls.flush().await.expect("flush");
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_is_cut_off_and_gives_back_its_share() {
    let injector = Injector::start().await;
    // More declared bytes than the read budget: while they stall, other reviews wait for it.
    let count = injector_lib::READ_BUDGET / injector_lib::MAX_BODY + 1;
    let mut stalled = Vec::new();
    for _ in 0..count {
        stalled.push(stalled_body(&injector, injector_lib::MAX_BODY, 10).await);
    }
    let started = Instant::now();
    let bound = injector_lib::BODY_READ_TIMEOUT + Duration::from_secs(5);
    for mut client in stalled {
        let mut answer = Vec::new();
        let left = bound.saturating_sub(started.elapsed());
        let read = tokio::time::timeout(left, client.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "still open after {:?}", started.elapsed());
        let answer = String::from_utf8_lossy(&answer);
        // 408, or 503 for the one that found the budget taken by the others.
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 408")
                || answer.starts_with("HTTP/1.1 503"),
            "{answer}"
        );
    }
    // Their shares of the budget came back: a review is answered.
    let response = injector.post_review("plain").await;
    assert_eq!(response.status, 200, "{}", response.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_every_connection_slot_does_not_keep_reviews_out() {
    let injector = Injector::start().await;
    let addr = injector.process.addr();
    let connects = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let wanted = injector_lib::MAX_CONNECTIONS + 16;
    // From another loopback address, connections that never start their TLS handshake,
    // reopened as soon as the injector closes them.
    for _ in 0..wanted {
        let (connects, stop) = (connects.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                let from: IpAddr = "127.0.0.2".parse().expect("address");
                socket
                    .bind(SocketAddr::new(from, 0))
                    .expect("bind the source");
                let Ok(mut tcp) = socket.connect(addr).await else {
                    continue;
                };
                connects.fetch_add(1, Ordering::SeqCst);
                let mut sink = [0u8; 64];
                tokio::select! {
                    _ = tcp.read(&mut sink) => {}
                    _ = stop.cancelled() => {}
                }
            }
        });
    }
    let held = wait_until_async(Duration::from_secs(10), || async {
        connects.load(Ordering::SeqCst) >= wanted
    })
    .await;
    assert!(held, "the hostile peer could not connect");
    for _ in 0..5 {
        let response = injector.post_review("plain").await;
        assert_eq!(response.status, 200, "{}", response.body);
    }
    stop.cancel();
}

/// A review of the plain pod whose app container has as many environment variables as fit
/// in `size` bytes of JSON: the heaviest shape a Pod takes when parsed (about 20 times its
/// size).
fn env_heavy_review(size: usize) -> Vec<u8> {
    let mut review = review_json("plain");
    let base = serde_json::to_vec(&review).expect("JSON").len();
    let item = json!({"name": "ENV_VAR", "value": "some-value-1"});
    let each = serde_json::to_vec(&item).expect("JSON").len() + 1;
    let env = vec![item; size.saturating_sub(base + 100) / each];
    review["request"]["object"]["spec"]["containers"][0]["env"] = json!(env);
    serde_json::to_vec(&review).expect("JSON")
}

/// Posts `body` `count` times at once to a fresh injector; every answer must be 200 or 503
/// (busy), and at least one 200. Returns how much the injector's peak RSS grew, in bytes.
async fn peak_growth_of(body: Vec<u8>, count: usize) -> u64 {
    let injector = Arc::new(Injector::start().await);
    let _ = injector.post_review("plain").await;
    let pid = injector.process.pid();
    let baseline = peak_rss(pid);
    let mut clients = Vec::new();
    for _ in 0..count {
        let (body, injector) = (body.clone(), injector.clone());
        clients.push(tokio::spawn(async move {
            let (url, body) = (injector.url("/mutate"), Some(("application/json", body)));
            let pki = Some(&injector.pki);
            http_request("POST", &url, &[], body, pki, Duration::from_secs(30)).await
        }));
    }
    let mut answered = 0;
    for client in clients {
        match client.await.expect("client task") {
            Ok(r) if r.status == 200 => answered += 1,
            Ok(r) => assert_eq!(r.status, 503, "{}", r.body),
            Err(error) => panic!("no answer: {error}"),
        }
    }
    assert!(answered > 0, "every review was turned away");
    peak_rss(pid).saturating_sub(baseline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_reviews_at_once_stay_within_the_memory_bound() {
    // Bodies dominate: at most READ_BUDGET of them are read at once, one parsed at a time.
    let grew = peak_growth_of(padded_review(injector_lib::MAX_BODY - 1024), 32).await;
    eprintln!(
        "32 string-heavy reviews of 3 MiB: peak RSS grew by {} KiB",
        grew >> 10
    );
    let expected = injector_lib::READ_BUDGET + 8 * injector_lib::MAX_BODY;
    assert!(
        grew < expected as u64,
        "peak RSS grew by {} MiB",
        grew >> 20
    );
    // Parsing dominates: what one parse takes is reused by the next, never held twice.
    let grew = peak_growth_of(env_heavy_review(injector_lib::MAX_BODY - 1024), 8).await;
    eprintln!(
        "8 env-heavy reviews of 3 MiB: peak RSS grew by {} KiB",
        grew >> 10
    );
    let bound = injector_lib::MEMORY_BOUND as u64;
    assert!(grew < bound, "peak RSS grew by {} MiB", grew >> 20);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_and_a_broken_one_is_not() {
    let injector = Injector::start().await;
    let cert = injector.dir.path().join("tls.crt");
    let key = injector.dir.path().join("tls.key");

    // A broken rotation (garbage in the certificate file): warned about, old one still served.
    // The files are looked at when a connection arrives, so keep connecting meanwhile; every
    // connection must still get the old certificate.
    std::fs::write(&cert, "not a certificate").expect("write");
    let warned = wait_until_async(Duration::from_secs(15), || async {
        let old = injector
            .request("GET", "/healthz", None, &injector.pki)
            .await;
        assert_eq!(old.map(|r| r.status), Ok(200));
        injector.process.output_contains("can't be loaded")
    })
    .await;
    assert!(warned, "{}", injector.process.output());
    let old = injector
        .request("GET", "/healthz", None, &injector.pki)
        .await;
    assert_eq!(old.map(|r| r.status), Ok(200));

    // A real rotation, to a certificate from another CA: new connections get it.
    let rotated = TestPki::new();
    std::fs::copy(rotated.key_path(), &key).expect("copy key");
    std::fs::copy(rotated.cert_path(), &cert).expect("copy cert");
    let served = wait_until_async(Duration::from_secs(15), || async {
        matches!(
            injector.request("GET", "/healthz", None, &rotated).await,
            Ok(r) if r.status == 200
        )
    })
    .await;
    assert!(served, "{}", injector.process.output());
    assert!(injector.process.output_contains("TLS certificate reloaded"));
    let with_old_ca = injector
        .request("GET", "/healthz", None, &injector.pki)
        .await;
    assert!(with_old_ca.is_err(), "still the old certificate");
}

#[tokio::test]
async fn bad_start_up_configuration_exits_2_with_one_line() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = pki.cert_path().display().to_string();
    let key = pki.key_path().display().to_string();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let unknown = write("unknown.json", r#"{"upstream": "c", "adminPrt": 9090}"#);
    let bad_value = write("bad.json", r#"{"database": "abc"}"#);
    let not_pem = write("not.pem", "hello");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--defaults-file", &unknown],
            "unknown field `adminPrt`",
        ),
        (
            vec!["--defaults-file", &bad_value],
            "field \"database\": \"abc\" is not a database number",
        ),
        (vec!["--defaults-file", "/nonexistent.json"], "cannot read"),
        (vec!["--listen", "8443"], "invalid --listen '8443'"),
        (vec!["--log-format", "xml"], "invalid --log-format 'xml'"),
    ];
    for (extra, hint) in cases {
        let mut args = vec!["injector", "--tls-cert-file", &cert, "--tls-key-file", &key];
        args.extend(extra);
        assert_exit_2(&args, hint).await;
    }
    assert_exit_2(&["injector", "--tls-key-file", &key], "no TLS certificate").await;
    assert_exit_2(
        &["injector", "--tls-cert-file", &cert],
        "no TLS private key",
    )
    .await;
    assert_exit_2(
        &[
            "injector",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert-file",
            &not_pem,
            "--tls-key-file",
            &key,
        ],
        "no certificate in",
    )
    .await;
}

/// Runs the binary to its end and asserts status 2 and a single stderr line with `hint`.
async fn assert_exit_2(args: &[&str], hint: &str) {
    let out = run_to_end(args, &[]).await;
    assert_eq!(out.code(), Some(2), "{args:?}: {}", out.all());
    let line = out.stderr.trim_end();
    assert!(!line.contains('\n'), "more than one line: {}", out.stderr);
    assert!(line.contains(hint), "no {hint:?} in: {line}");
}

// ---------------------------------------------------------------------------------------------
// End to end: the injected sidecar, run.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_injected_sidecar_serves_redis_with_its_own_args_and_env() {
    let pod = inject("access-key", &chart_defaults());
    let sidecar = sidecars(&pod)[0].clone();
    let setup = Setup::access_key().await;

    // The mounted Secret: the args name a file in the volume mount; a temp file stands in.
    let mount = &sidecar["volumeMounts"][0];
    let volume = &pod["spec"]["volumes"][0];
    assert_eq!(mount["name"], volume["name"]);
    let key_in_pod = format!(
        "{}/{}",
        mount["mountPath"].as_str().expect("mountPath"),
        volume["secret"]["items"][0]["path"].as_str().expect("path")
    );
    assert_eq!(
        arg(&sidecar, "--access-key-file"),
        Some(key_in_pod.as_str())
    );
    let key_file = setup.dir.path().join("access-key");
    std::fs::write(&key_file, setup.redis.access_key()).expect("write the key file");
    let key_file = key_file.display().to_string();

    // Substitutions, and only these:
    // * --upstream: the pod's cache → the local Redis (TLS);
    // * --listen 127.0.0.1:6379 and --admin-listen 0.0.0.0:9090 → free loopback ports;
    // * --access-key-file: the mount path → the temp file above;
    // * added: --tls-server-name localhost and --ca-file (the test CA), which a real cache's
    //   public certificate doesn't need.
    let local_redis = setup.redis.addr();
    let mut args: Vec<String> = Vec::new();
    let given: Vec<&str> = sidecar["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    for pair in given.chunks(2) {
        let value = match pair {
            ["--upstream", _] => local_redis.as_str(),
            ["--listen", _] | ["--admin-listen", _] => "127.0.0.1:0",
            ["--access-key-file", _] => key_file.as_str(),
            [_, value] => value,
            other => panic!("args are not --flag value pairs: {other:?}"),
        };
        args.extend([pair[0].to_string(), value.to_string()]);
    }
    let ca = setup.pki.ca_path().display().to_string();
    args.extend([
        "--tls-server-name".into(),
        "localhost".into(),
        "--ca-file".into(),
        ca,
    ]);
    let env: Vec<(String, String)> = sidecar["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["value"].as_str().expect("value").to_string(),
            )
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let proxy = ProxyProcess::start_exact(&args, &env).await;

    let admin = proxy.wait_admin_addr(Duration::from_secs(10)).await;
    let startup = wait_until_async(Duration::from_secs(15), || async {
        let url = format!("http://{admin}/startup");
        matches!(
            http_request("GET", &url, &[], None, None, Duration::from_secs(2)).await,
            Ok(r) if r.status == 200
        )
    })
    .await;
    assert!(
        startup,
        "the startup probe never passed\n{}",
        proxy.output()
    );

    let mut con = proxy.connection().await;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING");
    assert_eq!(pong, "PONG");
    let () = redis::cmd("SET")
        .arg("injected")
        .arg("works")
        .query_async(&mut con)
        .await
        .expect("SET");
    let value: String = redis::cmd("GET")
        .arg("injected")
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(value, "works");
    // JSON logs, as the sidecar's --log-format says.
    assert!(
        proxy.output_contains("\"level\":\"INFO\""),
        "{}",
        proxy.output()
    );
}

// ---------------------------------------------------------------------------------------------
// Cluster mode (issue 14): `cluster`, `cluster-ports`, `cluster-max-nodes`.
// ---------------------------------------------------------------------------------------------

/// The `plain` fixture's pod with `annotations` added and, when given, app container ports.
fn cluster_review(annotations: &[(&str, &str)], ports: &[u16]) -> Vec<u8> {
    let mut pod = review_json("plain")["request"]["object"].clone();
    for (name, value) in annotations {
        pod["metadata"]["annotations"][format!("redis-entra-proxy.io/{name}")] = json!(value);
    }
    if !ports.is_empty() {
        let ports: Vec<Value> = ports.iter().map(|p| json!({"containerPort": p})).collect();
        pod["spec"]["containers"][0]["ports"] = json!(ports);
    }
    review_of(&pod, "plain")
}

fn cluster_answer(annotations: &[(&str, &str)], ports: &[u16]) -> Value {
    let (response, _) =
        review::answer(&cluster_review(annotations, ports), &chart_defaults()).expect("answered");
    response["response"].clone()
}

#[test]
fn cluster_annotations_become_the_sidecars_env() {
    let pod = inject("cluster", &chart_defaults());
    let env = &sidecars(&pod)[0]["env"];
    assert_eq!(
        *env,
        json!([
            {"name": "REDIS_PROXY_CLUSTER", "value": "on"},
            {"name": "REDIS_PROXY_CLUSTER_PORTS", "value": "7000-7099"},
            {"name": "REDIS_PROXY_CLUSTER_MAX_NODES", "value": "50"}
        ])
    );
    // Only what is set is passed: none of them without the annotations.
    let plain = inject("plain", &chart_defaults());
    let env = sidecars(&plain)[0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        env.iter().all(|e| !e["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("REDIS_PROXY_CLUSTER")),
        "{env:?}"
    );
    for value in ["auto", "on", "off"] {
        let response = cluster_answer(&[("cluster", value)], &[]);
        assert_eq!(response["allowed"], true, "{value}: {response}");
    }
    for (name, value) in [
        ("cluster-ports", "1-1"),
        ("cluster-ports", "65535-65535"),
        ("cluster-max-nodes", "1"),
        ("cluster-max-nodes", "1000"),
    ] {
        let response = cluster_answer(&[(name, value)], &[]);
        assert_eq!(response["allowed"], true, "{name} {value}: {response}");
    }
    // The chart's defaults file carries the same fields.
    let defaults = Options::from_defaults_json(
        r#"{"upstream": "c:6380", "cluster": "on", "clusterPorts": "7000-7010", "clusterMaxNodes": 11}"#,
    )
    .expect("valid");
    assert_eq!(defaults.cluster.as_deref(), Some("on"));
    assert_eq!(defaults.cluster_ports, Some((7000, 7010)));
    assert_eq!(defaults.cluster_max_nodes, Some(11));
    let error = Options::from_defaults_json(r#"{"clusterMaxNodes": 0}"#).expect_err("0 nodes");
    assert!(
        error.starts_with("field \"clusterMaxNodes\": \"0\""),
        "{error}"
    );
}

#[test]
fn bad_cluster_annotations_are_refused_with_the_annotation_and_what_is_expected() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("cluster", "yes")],
            "redis-entra-proxy.io/cluster: \"yes\" is not one of auto, on, off",
        ),
        (
            &[("cluster-ports", "7000")],
            "redis-entra-proxy.io/cluster-ports: \"7000\" is not a port range: expected START-END",
        ),
        (
            &[("cluster-ports", "7100-7000")],
            "redis-entra-proxy.io/cluster-ports: \"7100-7000\" is not a port range",
        ),
        (
            &[("cluster-ports", "0-10")],
            "redis-entra-proxy.io/cluster-ports: \"0-10\" is not a port range",
        ),
        (
            &[("cluster-ports", "7000-65536")],
            "redis-entra-proxy.io/cluster-ports: \"7000-65536\" is not a port range",
        ),
        (
            &[("cluster-ports", "6300-6400")],
            "redis-entra-proxy.io/cluster-ports: \"6300-6400\" contains the sidecar's listen port 6379",
        ),
        (
            &[("cluster-ports", "9000-9090")],
            "redis-entra-proxy.io/cluster-ports: \"9000-9090\" contains the sidecar's admin port 9090",
        ),
        (
            &[("cluster-ports", "9091-9200")],
            "redis-entra-proxy.io/cluster-ports: \"9091-9200\" contains the sidecar's control port 9091",
        ),
        (
            &[("cluster-max-nodes", "0")],
            "redis-entra-proxy.io/cluster-max-nodes: \"0\" is not a number of cluster nodes (1..=1000)",
        ),
        (
            &[("cluster-max-nodes", "1001")],
            "redis-entra-proxy.io/cluster-max-nodes: \"1001\" is not a number of cluster nodes",
        ),
        (
            &[("cluster", "on"), ("listen", "127.0.0.1:65500")],
            "redis-entra-proxy.io/cluster: \"on\" needs 100 ports after the listen port 65500",
        ),
    ];
    for (annotations, start) in cases {
        assert_refused(&cluster_answer(annotations, &[]), start);
    }
}

#[test]
fn app_ports_inside_the_cluster_range_are_refused() {
    let refused = "container \"web\" declares port 6400, inside the cluster-node ports 6380-6479";
    assert_refused(
        &cluster_answer(&[("cluster", "on")], &[8080, 6400]),
        refused,
    );
    assert_refused(
        &cluster_answer(&[("cluster-ports", "7000-7099")], &[7099]),
        "container \"web\" declares port 7099, inside the cluster-node ports 7000-7099",
    );
    // A smaller cluster-max-nodes shrinks the default range; off (or auto without a range)
    // binds nothing there.
    let allowed = [
        cluster_answer(&[("cluster", "on"), ("cluster-max-nodes", "10")], &[6400]),
        cluster_answer(
            &[("cluster", "off"), ("cluster-ports", "6380-6479")],
            &[6400],
        ),
        cluster_answer(&[], &[6400]),
        cluster_answer(&[("cluster-ports", "7000-7099")], &[6400, 7100]),
    ];
    for response in allowed {
        assert_eq!(response["allowed"], true, "{response}");
    }
}

// ---------------------------------------------------------------------------------------------
// Multiplexing: `multiplex` (the proxy refuses it unless the cluster mode is off).
// ---------------------------------------------------------------------------------------------

/// The answer for the `plain` fixture's pod with `annotations` added, reviewed with
/// `defaults`, and when allowed the sidecar's env entries named `REDIS_PROXY_CLUSTER*` or
/// `REDIS_PROXY_MULTIPLEX`, as (name, value).
fn mux_answer(annotations: &[(&str, &str)], ports: &[u16], defaults: &Options) -> (Value, Env) {
    let mut pod = review_json("plain")["request"]["object"].clone();
    for (name, value) in annotations {
        pod["metadata"]["annotations"][format!("redis-entra-proxy.io/{name}")] = json!(value);
    }
    if !ports.is_empty() {
        let ports: Vec<Value> = ports.iter().map(|p| json!({"containerPort": p})).collect();
        pod["spec"]["containers"][0]["ports"] = json!(ports);
    }
    let (response, _) = review::answer(&review_of(&pod, "plain"), defaults).expect("answered");
    let response = response["response"].clone();
    if response["allowed"] != true {
        return (response, Vec::new());
    }
    let patched = applied(&pod, &patch_of(&response));
    let env = sidecars(&patched)[0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let env = env
        .iter()
        .filter_map(|e| {
            let name = e["name"].as_str()?;
            (name.starts_with("REDIS_PROXY_CLUSTER") || name.starts_with("REDIS_PROXY_MULTIPLEX"))
                .then(|| {
                    (
                        name.to_string(),
                        e["value"].as_str().unwrap_or("").to_string(),
                    )
                })
        })
        .collect();
    (response, env)
}

/// Env entries as (name, value).
type Env = Vec<(String, String)>;

fn pairs(list: &[(&str, &str)]) -> Env {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_multiplex_annotation_becomes_the_sidecars_env_with_the_cluster_mode_off() {
    let pod = inject("multiplex", &chart_defaults());
    assert_eq!(
        sidecars(&pod)[0]["env"],
        json!([
            {"name": "REDIS_PROXY_CLUSTER", "value": "off"},
            {"name": "REDIS_PROXY_MULTIPLEX", "value": "4"},
            {"name": "REDIS_PROXY_MULTIPLEX_REPLY_MIB", "value": "32"}
        ])
    );
    // 0 (off) passes nothing, as does no annotation; 64 is the most; an explicit off stays.
    // The reply bound is a quarter of the default 128Mi limit.
    let off_with = |n: &str| {
        pairs(&[
            ("REDIS_PROXY_CLUSTER", "off"),
            ("REDIS_PROXY_MULTIPLEX", n),
            ("REDIS_PROXY_MULTIPLEX_REPLY_MIB", "32"),
        ])
    };
    let cases: &[(&[(&str, &str)], Env)] = &[
        (&[("multiplex", "0")], pairs(&[])),
        (&[], pairs(&[])),
        (&[("multiplex", "64")], off_with("64")),
        (&[("multiplex", "1"), ("cluster", "off")], off_with("1")),
        (
            &[("multiplex", "0"), ("cluster", "on")],
            pairs(&[("REDIS_PROXY_CLUSTER", "on")]),
        ),
    ];
    for (annotations, expected) in cases {
        let (response, env) = mux_answer(annotations, &[], &chart_defaults());
        assert_eq!(response["allowed"], true, "{annotations:?}: {response}");
        assert_eq!(env, *expected, "{annotations:?}");
    }
    // The cluster mode it turns off binds no cluster-node ports: an app port in the default
    // range, or in a cluster-ports range, is no conflict.
    for annotations in [
        &[("multiplex", "4")][..],
        &[("multiplex", "4"), ("cluster-ports", "7000-7099")][..],
    ] {
        let (response, _) = mux_answer(annotations, &[6400, 7000], &chart_defaults());
        assert_eq!(response["allowed"], true, "{annotations:?}: {response}");
    }
    // The chart's defaults file carries the same field, and a pod's 0 turns it off.
    let defaults =
        Options::from_defaults_json(r#"{"upstream": "c:6380", "multiplex": 8}"#).expect("valid");
    assert_eq!(defaults.multiplex, Some(8));
    assert_eq!(defaults.cluster_mode(), Some("off"));
    assert_eq!(mux_answer(&[], &[], &defaults).1, off_with("8"));
    assert_eq!(
        mux_answer(&[("multiplex", "0")], &[], &defaults).1,
        pairs(&[])
    );
    let error = Options::from_defaults_json(r#"{"multiplex": 65}"#).expect_err("65");
    assert!(error.starts_with("field \"multiplex\": \"65\""), "{error}");
}

#[test]
fn bad_multiplex_annotations_are_refused_with_the_annotation_and_what_is_expected() {
    for value in ["65", "-1", "four", "1.5", "256"] {
        assert_refused(
            &mux_answer(&[("multiplex", value)], &[], &chart_defaults()).0,
            &format!(
                "redis-entra-proxy.io/multiplex: {value:?} is not a number of shared upstream \
                 connections (0 = off, up to 64)"
            ),
        );
    }
}

#[test]
fn multiplex_with_the_cluster_mode_on_or_auto_is_refused_naming_both_annotations() {
    for cluster in ["on", "auto"] {
        let annotations = [("multiplex", "4"), ("cluster", cluster)];
        let (response, _) = mux_answer(&annotations, &[], &chart_defaults());
        assert_refused(
            &response,
            &format!(
                "redis-entra-proxy.io/multiplex: \"4\" needs the cluster mode off, but \
                 redis-entra-proxy.io/cluster is \"{cluster}\""
            ),
        );
        let message = response["status"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("set redis-entra-proxy.io/cluster to off"),
            "{message}"
        );
    }
    // The chart's cluster default counts as set too: the pod must say off.
    let defaults =
        Options::from_defaults_json(r#"{"upstream": "c:6380", "cluster": "auto"}"#).expect("valid");
    assert_refused(
        &mux_answer(&[("multiplex", "2")], &[], &defaults).0,
        "redis-entra-proxy.io/multiplex: \"2\" needs the cluster mode off, but \
         redis-entra-proxy.io/cluster is \"auto\"",
    );
    let (response, env) = mux_answer(&[("multiplex", "2"), ("cluster", "off")], &[], &defaults);
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(
        env,
        pairs(&[
            ("REDIS_PROXY_CLUSTER", "off"),
            ("REDIS_PROXY_MULTIPLEX", "2"),
            ("REDIS_PROXY_MULTIPLEX_REPLY_MIB", "32")
        ])
    );
}
