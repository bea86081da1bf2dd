//! Configuration errors as a user meets them: the real binary, a clean environment, exit
//! status 2 and exactly one line on stderr that says what is wrong and how to fix it, with no
//! secret anywhere in the output (spec §2). Runs go through `support::run_to_end`, which is
//! bounded: a bad configuration that is wrongly accepted starts the proxy, and that fails the
//! test instead of hanging it.

mod support;

use support::run_to_end;

/// A password that must never be printed.
const SECRET: &str = "hunter2-s3cret";

/// Asserts a configuration error whose line contains every one of `hints`, and that the
/// secret appears nowhere.
async fn assert_config_error(args: &[&str], vars: &[(&str, &str)], hints: &[&str]) -> String {
    let output = run_to_end(args, vars).await;
    let stdout = output.stdout.as_str();
    let stderr = output.stderr.as_str();
    assert_eq!(output.code(), Some(2), "{args:?}: stderr={stderr}");
    let line = stderr.strip_suffix('\n').unwrap_or(stderr);
    assert!(!line.contains('\n'), "more than one line: {stderr}");
    assert!(line.starts_with("configuration error: "), "{line}");
    for hint in hints {
        assert!(line.contains(hint), "no '{hint}' in: {line}");
    }
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(!stderr.contains(SECRET), "the secret leaked: {stderr}");
    line.to_string()
}

#[tokio::test]
async fn no_upstream() {
    assert_config_error(
        &[],
        &[],
        &["no upstream", "--upstream HOST[:PORT]", "AZURE_REDIS_HOST"],
    )
    .await;
}

#[tokio::test]
async fn malformed_url_connection_string_does_not_echo_the_password() {
    let cs = format!("rediss://:{SECRET}@cache.example:notaport");
    assert_config_error(
        &["--connection-string", &cs],
        &[],
        &[
            "malformed connection string",
            "rediss://[user][:password]@host",
        ],
    )
    .await;
    // An unencoded '/' splits the password: neither half may be printed.
    let cs = "rediss://:hunter2/s3cret@cache.example:6380";
    let line = assert_config_error(&[], &[("AZURE_REDIS_CONNECTIONSTRING", cs)], &[]).await;
    assert!(line.contains("AZURE_REDIS_CONNECTIONSTRING"), "{line}");
    assert!(
        !line.contains("hunter2") && !line.contains("s3cret"),
        "{line}"
    );
}

#[tokio::test]
async fn malformed_stackexchange_connection_string_does_not_echo_the_password() {
    let cs = format!("password={SECRET},ssl=True,abortConnect=False");
    assert_config_error(
        &[],
        &[("AZURE_REDIS_CONNECTIONSTRING", &cs)],
        &[
            "malformed connection string in AZURE_REDIS_CONNECTIONSTRING",
            "host:port",
        ],
    )
    .await;
    let cs = format!("cache.example:6380,password={SECRET},ssl=sometimes");
    assert_config_error(
        &["--connection-string", &cs],
        &[],
        &["ssl must be true or false"],
    )
    .await;
}

#[tokio::test]
async fn unknown_auth_mode() {
    assert_config_error(
        &["--upstream", "cache.example", "--auth", "password"],
        &[],
        &["invalid --auth (", "auto, entra, access-key or none"],
    )
    .await;
}

#[tokio::test]
async fn unknown_credential_kind() {
    assert_config_error(
        &[],
        &[
            ("AZURE_REDIS_HOST", "cache.example"),
            ("REDIS_PROXY_CREDENTIAL", "default"),
        ],
        &["invalid REDIS_PROXY_CREDENTIAL (", "workload-identity"],
    )
    .await;
}

/// A secret marker that must never be printed, and pieces of it that must not be either.
const MARKER: &str = "S3CR3T-q8Zx0m3y";

/// One bad configuration that carries [`MARKER`]: where it goes, and what the error line must
/// say instead (which option is wrong and what shape is expected).
struct Leaky {
    args: &'static [&'static str],
    vars: &'static [(&'static str, &'static str)],
    hints: &'static [&'static str],
}

/// Bad values that hold a secret, whole or in part, in every place a user may put one.
const LEAKY: &[Leaky] = &[
    // A URL with the access key, or a connection string, where the host goes.
    Leaky {
        args: &["--upstream", "rediss://:S3CR3T-q8Zx0m3y@cache.example:6380"],
        vars: &[],
        hints: &["invalid --upstream", "that is a URL", "--connection-string"],
    },
    Leaky {
        args: &[],
        vars: &[("AZURE_REDIS_HOST", "cache.example,password=S3CR3T-q8Zx0m3y")],
        hints: &[
            "invalid AZURE_REDIS_HOST",
            "connection string",
            "HOST[:PORT]",
        ],
    },
    Leaky {
        args: &["--upstream", "cache.example:S3CR3T-q8Zx0m3y"],
        vars: &[],
        hints: &["invalid --upstream", "port", "HOST[:PORT]"],
    },
    // A password with ',' in the StackExchange form: the piece after the comma.
    Leaky {
        args: &[],
        vars: &[(
            "AZURE_REDIS_CONNECTIONSTRING",
            "cache.example:6380,password=ab,S3CR3T-q8Zx0m3y,ssl=True",
        )],
        hints: &[
            "AZURE_REDIS_CONNECTIONSTRING",
            "item 3",
            "can't contain ','",
        ],
    },
    Leaky {
        args: &["--connection-string", "password=ab,S3CR3T-q8Zx0m3y"],
        vars: &[],
        hints: &["--connection-string", "no host:port before the first comma"],
    },
    // A URL with a bad port and the password.
    Leaky {
        args: &[
            "--connection-string",
            "rediss://:S3CR3T-q8Zx0m3y@cache.example:99999",
        ],
        vars: &[],
        hints: &["--connection-string", "invalid port", "rediss://"],
    },
    // The key where the mode goes, the client secret where the kind goes.
    Leaky {
        args: &["--upstream", "cache.example", "--auth", "S3CR3T-q8Zx0m3y"],
        vars: &[],
        hints: &["invalid --auth", "AZURE_REDIS_PASSWORD"],
    },
    Leaky {
        args: &[],
        vars: &[
            ("AZURE_REDIS_HOST", "cache.example"),
            ("REDIS_PROXY_CREDENTIAL", "S3CR3T-q8Zx0m3y"),
        ],
        hints: &["invalid REDIS_PROXY_CREDENTIAL", "AZURE_REDIS_CLIENTSECRET"],
    },
    // The listen password, unquoted with a space, or starting with '-'.
    Leaky {
        args: &[
            "--upstream",
            "cache.example",
            "--listen-password",
            "my",
            "S3CR3T-q8Zx0m3y",
        ],
        vars: &[],
        hints: &["unexpected argument", "quote a value"],
    },
    Leaky {
        args: &[
            "--upstream",
            "cache.example",
            "--listen-password",
            "-S3CR3T-q8Zx0m3y",
        ],
        vars: &[],
        hints: &["unexpected argument", "--option=VALUE"],
    },
    Leaky {
        args: &["S3CR3T-q8Zx0m3y"],
        vars: &[],
        hints: &["unexpected argument", "quote a value"],
    },
];

#[tokio::test]
async fn errors_about_values_that_may_hold_a_secret_never_print_them() {
    for subcommand in [None, Some("check")] {
        for case in LEAKY {
            let mut args: Vec<&str> = subcommand.into_iter().collect();
            args.extend_from_slice(case.args);
            let output = run_to_end(&args, case.vars).await;
            let stdout = output.stdout.as_str();
            let stderr = output.stderr.as_str();
            assert_eq!(output.code(), Some(2), "{args:?}: {stderr}");
            let line = stderr.strip_suffix('\n').unwrap_or(stderr);
            assert!(!line.contains('\n'), "more than one line: {stderr}");
            assert!(line.starts_with("configuration error: "), "{line}");
            for hint in case.hints {
                assert!(line.contains(hint), "{args:?}: no '{hint}' in: {line}");
            }
            for piece in [MARKER, "S3CR3T", "q8Zx0m3y", "'-S'"] {
                assert!(
                    !stdout.contains(piece) && !stderr.contains(piece),
                    "{args:?} {:?}: '{piece}' leaked: {stdout}{stderr}",
                    case.vars
                );
            }
        }
    }
}

/// Connection strings that parse, with a piece of a password where a key or a query goes:
/// `check` (which stops at the unreachable upstream) prints the warning, but not the piece.
#[tokio::test]
async fn warnings_about_connection_strings_never_print_pieces_of_them() {
    for (cs, warning) in [
        (
            "127.0.0.1:1,password=ab,S3CR3T-q8Zx0m3y=,ssl=False",
            "ignoring item 3 of the connection string",
        ),
        (
            "redis://:ab@127.0.0.1:1/0?S3CR3T-q8Zx0m3y=1",
            "ignoring the query part",
        ),
    ] {
        let output = run_to_end(
            &["check", "--connect-timeout", "2s"],
            &[("AZURE_REDIS_CONNECTIONSTRING", cs), ("RUST_LOG", "trace")],
        )
        .await;
        let all = format!("{}{}", output.stdout.as_str(), output.stderr.as_str());
        assert_eq!(output.code(), Some(1), "{cs}: {all}");
        assert!(all.contains(warning), "{cs}: {all}");
        assert!(all.contains("result: FAILED"), "{cs}: {all}");
        for piece in [MARKER, "S3CR3T", "q8Zx0m3y"] {
            assert!(!all.contains(piece), "{cs}: '{piece}' leaked: {all}");
        }
    }
}

#[tokio::test]
async fn unreadable_access_key_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("access-key");
    let missing = missing.to_str().expect("UTF-8 path");
    assert_config_error(
        &["--upstream", "cache.example", "--access-key-file", missing],
        &[],
        &[
            "cannot read the access key file",
            missing,
            "mount the Secret",
        ],
    )
    .await;
}

#[tokio::test]
async fn access_key_mode_without_a_key() {
    assert_config_error(
        &["--upstream", "cache.example", "--auth", "access-key"],
        &[],
        &["AZURE_REDIS_PASSWORD", "--access-key-file"],
    )
    .await;
}

#[tokio::test]
async fn bad_duration() {
    assert_config_error(
        &[
            "--upstream",
            "cache.example",
            "--reauth-margin",
            "3 fortnights",
        ],
        &[],
        &["invalid --reauth-margin", "3m, 30s, 500ms"],
    )
    .await;
}

#[tokio::test]
async fn bad_token_refresh_at() {
    assert_config_error(
        &["--upstream", "cache.example", "--token-refresh-at", "1.5"],
        &[],
        &["invalid --token-refresh-at '1.5'", "between 0 and 1"],
    )
    .await;
}

#[tokio::test]
async fn bad_listen_address() {
    assert_config_error(
        &["--upstream", "cache.example", "--listen", "6379"],
        &[],
        &["invalid --listen '6379'", "host:port or unix:/path"],
    )
    .await;
}

#[tokio::test]
async fn workload_identity_without_tenant() {
    assert_config_error(
        &[],
        &[
            ("AZURE_REDIS_HOST", "cache.example"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/token",
            ),
            ("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001"),
            ("AZURE_REDIS_CLIENTSECRET", SECRET),
        ],
        &["workload identity needs a tenant id", "AZURE_TENANT_ID"],
    )
    .await;
}

#[tokio::test]
async fn unknown_flag_is_a_one_line_usage_error() {
    assert_config_error(
        &["--upstrem", "cache.example"],
        &[],
        &["'--upstrem'", "--help"],
    )
    .await;
}

#[tokio::test]
async fn help_exits_0() {
    let output = run_to_end(&["--help"], &[]).await;
    assert_eq!(output.code(), Some(0));
    let stdout = output.stdout.as_str();
    assert!(stdout.contains("--upstream"), "{stdout}");
    assert!(stdout.contains("AZURE_REDIS_CONNECTIONSTRING"), "{stdout}");
    let output = run_to_end(&["--version"], &[]).await;
    assert_eq!(output.code(), Some(0));
    assert!(output.stdout.as_str().starts_with("redis-entra-proxy "));
}

#[tokio::test]
async fn entra_over_plaintext_needs_a_flag_that_says_it_is_insecure() {
    for subcommand in [None, Some("check")] {
        let mut args: Vec<&str> = subcommand.into_iter().collect();
        args.extend(["--upstream", "cache.example", "--tls", "false"]);
        assert_config_error(
            &args,
            &[],
            &[
                "TLS to the upstream is off (--tls false)",
                "Entra token would travel in clear text",
                "--insecure-entra-over-plaintext",
            ],
        )
        .await;
        let mut args: Vec<&str> = subcommand.into_iter().collect();
        args.extend(["--connection-string", "redis://cache.example:6379"]);
        assert_config_error(
            &args,
            &[("REDIS_PROXY_INSECURE_ENTRA_OVER_PLAINTEXT", "false")],
            &["redis:// or ssl=False connection string in --connection-string"],
        )
        .await;
    }
}
