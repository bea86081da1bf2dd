//! Secrets never appear in the proxy's output (spec §3 "Secrets"), even at `RUST_LOG=trace`.
//!
//! Each test runs the proxy through the situations most likely to print something sensitive —
//! several token refreshes with 3-second tokens, clients authenticating with the listen password
//! (`AUTH` and `HELLO … AUTH`), wrong passwords, a failing token endpoint, rejected credentials —
//! and then searches everything the proxy printed (stdout and stderr) for every token ever
//! issued, the access key, the client secret, the federated assertion, the identity header and
//! the passwords. The same goes for `redis-entra-proxy check`.
//!
//! Tokens and credentials also go nowhere but to their endpoints: identity requests never go
//! through an HTTP proxy from the environment, and the upstream's CA is not trusted for the
//! token endpoint (nor the reverse).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::resp::encode_command;
use support::{
    EndpointMode, ProxyProcess, RecordingHttpProxy, RespClient, Setup, Value, random_hex,
    run_to_end, wait_until,
};

const LIFETIME: Duration = Duration::from_secs(3);
const TRACE: (&str, &str) = ("RUST_LOG", "trace");

/// Named secret values to look for.
#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let value = value.into();
        assert!(value.len() >= 8, "too short to search for: {value:?}");
        self.0.push((what.into(), value));
    }

    /// A JWT, and its signature on its own (a log line that cut the token up would still leak
    /// it if the signature is there).
    fn add_jwt(&mut self, what: &str, jwt: &str) {
        self.add(what, jwt);
        let signature = jwt.rsplit('.').next().expect("a JWT");
        self.add(format!("{what} (signature)"), signature);
    }

    /// Every token the issuer minted so far.
    fn add_tokens(&mut self, setup: &Setup) {
        let tokens = setup.issuer.history();
        assert!(!tokens.is_empty(), "no token was issued");
        for (i, token) in tokens.iter().enumerate() {
            self.add_jwt(&format!("token #{i}"), token);
        }
    }

    /// Panics, naming the secret and quoting the line, if any secret is in `output`.
    fn assert_absent(&self, output: &str, context: &str) {
        for (what, value) in &self.0 {
            if let Some(line) = output.lines().find(|l| l.contains(value.as_str())) {
                let shown: String = line.chars().take(400).collect();
                panic!("{context}: the {what} appears in the output, in:\n{shown}");
            }
        }
    }
}

/// The proxy's flags and environment of `setup`, as `&str`s, plus extras.
fn invocation<'a>(
    setup: &'a Setup,
    first: &[&'a str],
    extra_env: &[(&'a str, &'a str)],
) -> (Vec<String>, Vec<(&'a str, &'a str)>) {
    let mut args: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    args.extend(setup.proxy_args());
    let mut env: Vec<(&str, &str)> = setup
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.extend_from_slice(extra_env);
    (args, env)
}

/// `redis-entra-proxy check` for `setup` at trace level; returns everything it printed.
async fn check_output(setup: &Setup, extra_env: &[(&str, &str)]) -> (Option<i32>, String) {
    let (mut args, env) = invocation(setup, &["check"], extra_env);
    args.extend(["--connect-timeout".into(), "3s".into()]);
    let mut env = env;
    env.push(TRACE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_to_end(&args, &env).await;
    (out.code(), out.all())
}

/// A client that authenticates with the listen password and then works until stopped; returns
/// how many commands it ran, or what went wrong.
fn spawn_worker(
    proxy: &ProxyProcess,
    password: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64, String>> {
    let addr = proxy.addr();
    let password = password.to_string();
    tokio::spawn(async move {
        let mut c = RespClient::connect(addr).await;
        if c.cmd(&["AUTH", &password]).await != Value::ok() {
            return Err("AUTH with the listen password failed".into());
        }
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let value = format!("v{n}");
            c.send(&["SET", "worker", &value]).await;
            c.send(&["GET", "worker"]).await;
            for expected in [Value::ok(), Value::bulk(&value)] {
                match c.try_read(Duration::from_secs(5)).await {
                    Ok(v) if v == expected => {}
                    other => return Err(format!("command #{n}: {other:?}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(n)
    })
}

/// Clients that authenticate with right and wrong passwords in every way there is.
async fn exercise_listen_password(proxy: &ProxyProcess, password: &str, wrong: &str) {
    let mut c = proxy.raw().await;
    assert!(c.cmd(&["AUTH", wrong]).await.is_error_code("WRONGPASS"));
    assert!(
        c.cmd(&["AUTH", "default", wrong])
            .await
            .is_error_code("WRONGPASS")
    );
    assert!(
        c.cmd(&["HELLO", "3", "AUTH", "default", wrong])
            .await
            .is_error_code("WRONGPASS")
    );
    assert_eq!(c.cmd(&["AUTH", "default", password]).await, Value::ok());
    let mut h = proxy.raw().await;
    let hello = h.cmd(&["HELLO", "3", "AUTH", "default", password]).await;
    assert_eq!(hello.map_get("proto"), Some(&Value::Int(3)), "{hello:?}");
    assert_eq!(h.cmd(&["PING"]).await, Value::simple("PONG"));
    // An inline AUTH, as typed in telnet.
    let mut t = proxy.raw().await;
    t.send_raw(format!("AUTH {password}\r\n").as_bytes()).await;
    assert_eq!(t.read().await, Value::ok());
}

/// The failed requests of the setup's token endpoint so far.
fn failed_token_requests(setup: &Setup) -> u64 {
    match (&setup.msi, &setup.entra) {
        (Some(m), _) => m.requests() - m.tokens_served(),
        (_, Some(e)) => e.requests() - e.tokens_served(),
        _ => unreachable!("an Entra setup"),
    }
}

fn set_endpoint_mode(setup: &Setup, mode: EndpointMode) {
    match (&setup.msi, &setup.entra) {
        (Some(m), _) => m.set_mode(mode),
        (_, Some(e)) => e.set_mode(mode),
        _ => unreachable!("an Entra setup"),
    }
}

/// Waits until the issuer has minted `n` more tokens than now.
async fn wait_for_tokens(setup: &Setup, proxy: &ProxyProcess, n: u64) {
    let before = setup.issuer.issued();
    assert!(
        wait_until(Duration::from_secs(15), || setup.issuer.issued()
            >= before + n)
        .await,
        "fewer than {n} new tokens\n--- proxy output ---\n{}",
        proxy.output()
    );
}

/// Waits until the proxy has made `n` more failed token requests than now.
async fn wait_for_failed_requests(setup: &Setup, proxy: &ProxyProcess, n: u64) {
    let before = failed_token_requests(setup);
    assert!(
        wait_until(Duration::from_secs(10), || failed_token_requests(setup)
            >= before + n)
        .await,
        "fewer than {n} failed token requests\n--- proxy output ---\n{}",
        proxy.output()
    );
}

/// Something done to a setup (e.g. rotating the secret the token endpoint accepts).
type SetupAction<'a> = &'a dyn Fn(&Setup);

/// The common scenario of the Entra setups. `reject_credential` makes the token endpoint refuse
/// the proxy's own credential (a rotated secret or assertion) and `restore` undoes it.
async fn entra_scenario(
    setup: Setup,
    mut secrets: Secrets,
    reject_credential: Option<(SetupAction<'_>, SetupAction<'_>)>,
) {
    let password = format!("ListenPw{}", random_hex(20));
    let wrong = format!("WrongListenPw{}", random_hex(20));
    secrets.add("listen password", &password);
    secrets.add("wrong listen password", &wrong);

    let proxy = setup
        .start_proxy_with(&["--listen-password", &password], &[TRACE])
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = spawn_worker(&proxy, &password, stop.clone());
    exercise_listen_password(&proxy, &password, &wrong).await;

    // Several refreshes (and so re-authentications of the live connections).
    wait_for_tokens(&setup, &proxy, 3).await;

    // The token endpoint fails for a while (shorter than the token lifetime).
    set_endpoint_mode(&setup, EndpointMode::Fail(500));
    wait_for_failed_requests(&setup, &proxy, 2).await;
    set_endpoint_mode(&setup, EndpointMode::Ok);
    wait_for_tokens(&setup, &proxy, 1).await;

    // The endpoint refuses the proxy's credential for a while.
    if let Some((reject, restore)) = reject_credential {
        reject(&setup);
        wait_for_failed_requests(&setup, &proxy, 2).await;
        restore(&setup);
        wait_for_tokens(&setup, &proxy, 1).await;
    }

    stop.store(true, Ordering::SeqCst);
    let n = worker
        .await
        .expect("worker task")
        .unwrap_or_else(|e| panic!("{e}\n--- proxy output ---\n{}", proxy.output()));
    assert!(n > 10, "the worker ran only {n} rounds");

    let output = proxy.output();
    assert!(
        output.lines().any(|l| l.contains("TRACE")),
        "not logging at trace level?\n{output}"
    );
    secrets.add_tokens(&setup);
    secrets.assert_absent(&output, "proxy");

    // `check`, passing and failing.
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    secrets.add_tokens(&setup);
    secrets.assert_absent(&out, "check");
    set_endpoint_mode(&setup, EndpointMode::Fail(500));
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    secrets.assert_absent(&out, "failing check");
    if let Some((reject, restore)) = reject_credential {
        set_endpoint_mode(&setup, EndpointMode::Ok);
        reject(&setup);
        let (code, out) = check_output(&setup, &[]).await;
        assert_eq!(code, Some(1), "{out}");
        secrets.assert_absent(&out, "check with a refused credential");
        restore(&setup);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_output_with_app_service_managed_identity() {
    let setup = Setup::entra_app_service(LIFETIME).await;
    let mut secrets = Secrets::default();
    secrets.add("identity header", setup.msi().identity_header());
    entra_scenario(setup, secrets, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_output_with_workload_identity() {
    let setup = Setup::entra_workload_identity(LIFETIME).await;
    let mut secrets = Secrets::default();
    secrets.add_jwt("federated assertion", &setup.entra().assertion());
    let original = setup.entra().assertion();
    let reject = |s: &Setup| s.entra().set_assertion("some.other.assertion");
    let restore = move |s: &Setup| s.entra().set_assertion(&original);
    entra_scenario(setup, secrets, Some((&reject, &restore))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_output_with_a_client_secret() {
    let setup = Setup::entra_client_secret(LIFETIME).await;
    let mut secrets = Secrets::default();
    let original = setup.entra().client_secret();
    secrets.add("client secret", &original);
    let reject = |s: &Setup| s.entra().set_client_secret("ClientSecret~rotated");
    let restore = move |s: &Setup| s.entra().set_client_secret(&original);
    entra_scenario(setup, secrets, Some((&reject, &restore))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_output_with_an_access_key() {
    let setup = Setup::access_key().await;
    let key = setup.redis.access_key();
    let wrong_key = format!("WrongAccessKey{}", random_hex(24));
    let password = format!("ListenPw{}", random_hex(20));
    let wrong = format!("WrongListenPw{}", random_hex(20));
    let mut secrets = Secrets::default();
    secrets.add("access key", &key);
    secrets.add("wrong access key", &wrong_key);
    secrets.add("listen password", &password);
    secrets.add("wrong listen password", &wrong);

    // A wrong key: clients are refused.
    let proxy = setup
        .start_proxy_with(
            &["--listen-password", &password],
            &[TRACE, ("AZURE_REDIS_PASSWORD", &wrong_key)],
        )
        .await;
    for _ in 0..2 {
        // The upstream is opened (and refused) only once the client has given the password.
        let mut c = proxy.raw().await;
        let _ = c.try_send_raw(&encode_command(&["AUTH", &password])).await;
        let _ = c.try_send_raw(&encode_command(&["PING"])).await;
        let r = c.try_read(Duration::from_secs(10)).await;
        assert!(matches!(&r, Ok(v) if v.is_ok()), "{r:?}");
        let r = c.try_read(Duration::from_secs(10)).await;
        assert!(
            matches!(&r, Ok(Value::Error(e)) if e.contains("WRONGPASS")),
            "{r:?}"
        );
    }
    secrets.assert_absent(&proxy.output(), "proxy with a wrong key");
    drop(proxy);

    // The right key, given as an environment variable and inside a connection string.
    let cs = format!("rediss://:{key}@127.0.0.1:{}", setup.redis.port());
    let se_cs = format!(
        "127.0.0.1:{},password={key},ssl=True,defaultDatabase=1",
        setup.redis.port()
    );
    let ca = setup.pki.ca_path().display().to_string();
    let tls = ["--tls-server-name", "localhost", "--ca-file", &ca];
    let proxies = [
        setup
            .start_proxy_with(&["--listen-password", &password], &[TRACE])
            .await,
        ProxyProcess::start(
            &[
                &tls[..],
                &["--connection-string", &cs, "--listen-password", &password],
            ]
            .concat(),
            &[TRACE],
        )
        .await,
        ProxyProcess::start(
            &tls,
            &[
                TRACE,
                ("AZURE_REDIS_CONNECTIONSTRING", &se_cs),
                ("REDIS_PROXY_LISTEN_PASSWORD", &password),
            ],
        )
        .await,
    ];
    for proxy in &proxies {
        exercise_listen_password(proxy, &password, &wrong).await;
        let stop = Arc::new(AtomicBool::new(false));
        let worker = spawn_worker(proxy, &password, stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
        worker.await.expect("worker").expect("worker commands");
        secrets.assert_absent(&proxy.output(), "proxy with the right key");
    }

    // `check`, passing and failing, with the key in every form.
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    secrets.assert_absent(&out, "check");
    let (code, out) = check_output(&setup, &[("AZURE_REDIS_PASSWORD", &wrong_key)]).await;
    assert_eq!(code, Some(1), "{out}");
    secrets.assert_absent(&out, "check with a wrong key");
    for (connection_string, expected) in [
        (cs.replace(&key, &wrong_key), 1),
        (se_cs.replace(&key, &wrong_key), 1),
        (cs.clone(), 0),
        (se_cs.clone(), 0),
    ] {
        let args = [&["check"][..], &tls[..], &["--connect-timeout", "3s"]].concat();
        let out = run_to_end(
            &args,
            &[TRACE, ("AZURE_REDIS_CONNECTIONSTRING", &connection_string)],
        )
        .await;
        assert_eq!(out.code(), Some(expected), "{}", out.all());
        secrets.assert_absent(&out.all(), "check with a connection string");
    }
}

/// Every variable an HTTP client may take a proxy from, pointing at `proxy`.
fn proxy_variables(proxy: &RecordingHttpProxy) -> Vec<(&'static str, String)> {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|name| (name, proxy.url()))
    .collect()
}

/// Corporate clusters set `HTTP_PROXY`/`HTTPS_PROXY` in every pod. The identity endpoints must
/// never be reached through such a proxy: the managed identity endpoint is plain HTTP, and
/// every answer holds a token. With the variables pointing at a recording fake proxy, tokens
/// are still obtained (managed identity over HTTP, workload identity over HTTPS; `check` and
/// a running proxy) and the fake proxy sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_requests_never_go_through_an_http_proxy() {
    let http_proxy = RecordingHttpProxy::start().await;
    let variables = proxy_variables(&http_proxy);
    let env: Vec<(&str, &str)> = variables.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for setup in [
        Setup::entra_app_service(Duration::from_secs(60)).await,
        Setup::entra_workload_identity(Duration::from_secs(60)).await,
    ] {
        let (code, out) = check_output(&setup, &env).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(
            http_proxy.requests().is_empty(),
            "through the HTTP proxy: {:?}\n{out}",
            http_proxy.requests()
        );
        assert!(out.contains("credential: Entra token"), "{out}");
    }
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let proxy = setup.start_proxy_with(&[], &env).await;
    let mut c = proxy.raw().await;
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert!(setup.msi().tokens_served() >= 1);
    assert!(
        http_proxy.requests().is_empty(),
        "through the HTTP proxy: {:?}\n{}",
        http_proxy.requests(),
        proxy.output()
    );
}

/// `args` without the flag `flag` and its value.
fn without_flag(args: &[String], flag: &str) -> Vec<String> {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    [&args[..at], &args[at + 2..]].concat()
}

/// Two trust stores: `--ca-file` (the upstream's) is not trusted for the Entra token endpoint,
/// so a CA meant for the cache (a private one, a TLS-inspecting proxy's) can't vouch for the
/// endpoint that receives the proxy's credentials and hands out its tokens; and
/// `--token-ca-file` is not trusted for the upstream. Here one test CA signs both servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_ca_is_not_trusted_for_the_token_endpoint_nor_the_reverse() {
    let mut setup = Setup::entra_workload_identity(Duration::from_secs(60)).await;
    let both = setup.args.clone();
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(0), "{out}");

    // Only --ca-file: the token endpoint's certificate is not trusted.
    setup.args = without_flag(&both, "--token-ca-file");
    let requests = setup.entra().requests();
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let failed = out
        .lines()
        .find(|l| l.starts_with("result: FAILED: credential:"))
        .unwrap_or_else(|| panic!("no failed credential step:\n{out}"));
    assert!(failed.contains("UnknownIssuer"), "{failed}");
    assert_eq!(setup.entra().requests(), requests, "a request got through");

    // Only --token-ca-file: the token is obtained, the cache's certificate is not trusted.
    setup.args = without_flag(&both, "--ca-file");
    let (code, out) = check_output(&setup, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("credential: Entra token"), "{out}");
    let failed = out
        .lines()
        .find(|l| l.starts_with("result: FAILED"))
        .unwrap_or_else(|| panic!("no failed step:\n{out}"));
    assert!(failed.contains("UnknownIssuer"), "{failed}");
}

/// A plaintext upstream with Entra sends the token in clear text, so it takes
/// `--insecure-entra-over-plaintext`: without it the proxy refuses to start (exit 2) and sends
/// nothing; with it, the token does reach a plaintext cache, and a warning says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_over_plaintext_only_with_the_insecure_flag() {
    let mut setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let cache = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cache_addr = cache.local_addr().unwrap().to_string();
    let received = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut tcp, _)) = cache.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    setup.args = without_flag(&setup.args, "--upstream");
    setup.args.extend([
        "--upstream".into(),
        cache_addr,
        "--tls".into(),
        "false".into(),
    ]);

    let (args, env) = invocation(&setup, &[], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_to_end(&args, &env).await;
    assert_eq!(out.code(), Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("--insecure-entra-over-plaintext"),
        "{}",
        out.all()
    );
    assert_eq!(setup.msi().requests(), 0, "a token was fetched");

    let proxy = setup
        .start_proxy_with(&["--insecure-entra-over-plaintext"], &[])
        .await;
    assert!(
        proxy.output_contains("Entra tokens travel in clear text"),
        "{}",
        proxy.output()
    );
    let mut client = proxy.raw().await;
    client.send(&["PING"]).await;
    let token_in_clear = || {
        let bytes = received.lock().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        text.contains("AUTH") && setup.issuer.history().iter().any(|t| text.contains(t))
    };
    assert!(
        wait_until(Duration::from_secs(10), token_in_clear).await,
        "no token reached the plaintext cache\n{}",
        proxy.output()
    );
}
