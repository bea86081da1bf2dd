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
