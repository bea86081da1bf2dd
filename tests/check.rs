//! `redis-entra-proxy check`: the whole path once, exit 0 only when all of it works.

mod support;

use std::time::Duration;
use support::{EndpointMode, Setup, run_to_end};

async fn check(setup: &Setup, extra: &[&str], env: &[(&str, &str)]) -> support::RunOutput {
    let mut args = vec!["check".to_string()];
    args.extend(setup.proxy_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--connect-timeout".into(), "3s".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all_env: Vec<(&str, &str)> = setup
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all_env.extend_from_slice(env);
    run_to_end(&args, &all_env).await
}

#[tokio::test]
async fn check_reports_every_step_and_passes_with_entra() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let out = check(&setup, &[], &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    for step in [
        "configuration: ok",
        "credential: Entra token for Redis user",
        "upstream: connected to",
        "redis: PING ok",
        "server version 7.",
        "result: ok",
    ] {
        assert!(
            out.stdout.contains(step),
            "missing {step:?} in:\n{}",
            out.all()
        );
    }
    for token in setup.issuer.history() {
        assert!(
            !out.all().contains(&token),
            "a token leaked into check output"
        );
    }
}

#[tokio::test]
async fn check_fails_with_the_servers_reason_for_a_wrong_key() {
    let setup = Setup::access_key().await;
    let out = check(&setup, &[], &[("AZURE_REDIS_PASSWORD", "not-the-key")]).await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("upstream authentication failed: WRONGPASS"),
        "{}",
        out.all()
    );
    assert!(!out.all().contains("not-the-key"), "the key leaked");
}

#[tokio::test]
async fn check_fails_clearly_when_no_token_can_be_had() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    setup.msi().set_mode(EndpointMode::Fail(500));
    let out = check(&setup, &[], &[]).await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stdout.contains("result: FAILED: credential:"),
        "{}",
        out.all()
    );
}

/// `--tls false` with Entra is refused (exit 2, see config_errors.rs) unless
/// `--insecure-entra-over-plaintext` says so; then `check` goes on, with a warning. (The test
/// front only speaks TLS, so the upstream step fails here.)
#[tokio::test]
async fn check_runs_entra_over_plaintext_only_with_the_insecure_flag() {
    let setup = Setup::entra_app_service(Duration::from_secs(60)).await;
    let out = check(&setup, &["--tls", "false"], &[]).await;
    assert_eq!(out.code(), Some(2), "{}", out.all());
    assert!(
        out.stderr.contains("--insecure-entra-over-plaintext"),
        "{}",
        out.all()
    );
    let out = check(
        &setup,
        &["--tls", "false", "--insecure-entra-over-plaintext"],
        &[],
    )
    .await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    for step in [
        "configuration: ok (upstream=",
        "tls=false",
        "credential: Entra token for Redis user",
        "result: FAILED",
    ] {
        assert!(
            out.stdout.contains(step),
            "missing {step:?} in:\n{}",
            out.all()
        );
    }
    assert!(
        out.stderr
            .contains("--insecure-entra-over-plaintext is set: Entra tokens travel in clear text"),
        "{}",
        out.all()
    );
}

/// `check` against a real TLS Redis Cluster (certificate for `cache.test` only, nodes announced
/// by IP): the clustering it found, then every node reached on its own address, TLS verified
/// against the host name, authenticated.
#[tokio::test]
async fn check_reports_the_cluster_and_every_node() {
    let cluster = support::TestCluster::start(support::ClusterOptions::access_key()).await;
    let upstream = format!("127.0.0.1:{}", cluster.front_port(0));
    let ca = cluster.pki().ca_path();
    let ca = ca.to_string_lossy();
    let args = [
        "check",
        "--upstream",
        upstream.as_str(),
        "--tls-server-name",
        cluster.host_name(),
        "--ca-file",
        &ca,
        "--auth",
        "access-key",
        "--connect-timeout",
        "3s",
    ];
    let env = [("AZURE_REDIS_PASSWORD", cluster.access_key())];
    let out = run_to_end(&args, &env).await;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("cluster: a cluster of 3 nodes (3 masters)"),
        "{}",
        out.all()
    );
    for node in 0..3 {
        let line = format!(
            "cluster: node 127.0.0.1:{} (master of ",
            cluster.front_port(node)
        );
        assert!(
            out.stdout.contains(&line),
            "missing {line:?} in\n{}",
            out.all()
        );
    }
    assert_eq!(
        out.stdout
            .matches("TLS verified as cache.test, authenticated, PING ok")
            .count(),
        3,
        "{}",
        out.all()
    );
    assert!(!out.all().contains(cluster.access_key()), "the key leaked");

    // A dead node is named, and the check fails.
    cluster.kill_node(2).await;
    let out = run_to_end(&args, &env).await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    let dead = format!("cluster: node 127.0.0.1:{} (", cluster.front_port(2));
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&dead) && l.contains("FAILED")),
        "{}",
        out.all()
    );
    assert!(
        out.stdout
            .contains("result: FAILED: cluster: 1 node(s) not usable"),
        "{}",
        out.all()
    );

    // `--cluster off` skips the step; `on` against a plain server fails clearly.
    let mut off = args.to_vec();
    off.extend(["--cluster", "off"]);
    let out = run_to_end(&off, &env).await;
    assert!(!out.stdout.contains("cluster:"), "{}", out.all());
}

#[tokio::test]
async fn check_with_cluster_on_fails_on_a_cache_that_is_not_a_cluster() {
    let setup = Setup::access_key().await;
    let out = check(&setup, &["--cluster", "on"], &[]).await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("--cluster on, but the cache is not a cluster (CLUSTER NODES: ERR This instance has cluster support disabled)"),
        "{}",
        out.all()
    );
    let out = check(&setup, &[], &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("cluster: not a cluster"),
        "{}",
        out.all()
    );
}

#[tokio::test]
async fn check_shows_the_multiplexing_and_the_command_table_it_decides_from() {
    let setup = Setup::access_key().await;
    let out = check(&setup, &["--multiplex", "4", "--cluster", "off"], &[]).await;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("multiplex: 4 shared connections per upstream; COMMAND read (")
            && out.stdout.contains("GET shared, SET shared, EVALSHA shared, MULTI pins (transaction), BLPOP pins (blocking), SUBSCRIBE pins (subscribe)"),
        "{}",
        out.all()
    );
    // A user that may not run COMMAND: nothing could be shared, and check says so.
    setup.redis.forbid_command_command().await;
    let out = check(&setup, &["--multiplex", "4", "--cluster", "off"], &[]).await;
    assert_eq!(out.code(), Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("multiplex: COMMAND gave no command table (NOPERM")
            && out
                .stdout
                .contains("every client would get a connection of its own"),
        "{}",
        out.all()
    );
}
