//! Ready-made environments: everything a proxy test needs, plus the flags and environment that
//! point the proxy at it.
//!
//! ```ignore
//! let setup = Setup::entra_app_service(Duration::from_secs(4)).await;
//! let proxy = setup.start_proxy().await;
//! let mut con = proxy.connection().await;
//! ```
//!
//! The Entra setups put the fake Azure front (in front of the real Redis) upstream; the
//! access-key setup points the proxy straight at the real Redis. Fields are public: adjust
//! them (or pass extra flags to [`Setup::start_proxy_with`]) before starting the proxy.

use std::time::Duration;
use tempfile::TempDir;

use super::{
    AzureFront, EntraEndpoint, ManagedIdentityEndpoint, ProxyProcess, RedisServer, TestPki,
    TokenIssuer, dur_arg, random_uuid,
};

/// A complete test environment; everything is stopped when it is dropped.
pub struct Setup {
    // Declared (and so dropped) front-most first.
    /// The fake Azure front (Entra setups).
    pub front: Option<AzureFront>,
    /// The fake managed identity endpoint (`entra_app_service`).
    pub msi: Option<ManagedIdentityEndpoint>,
    /// The fake Entra token endpoint (`entra_workload_identity`, `entra_client_secret`).
    pub entra: Option<EntraEndpoint>,
    /// The real Redis.
    pub redis: RedisServer,
    /// Mints the tokens the endpoints hand out (`oid` = the Redis user on the front).
    pub issuer: TokenIssuer,
    /// The CA and certificates everything uses.
    pub pki: TestPki,
    /// Scratch directory (federated token file, key files, …).
    pub dir: TempDir,
    /// Flags for the proxy, without `--reauth-margin` / `--token-refresh-at` (see below).
    pub args: Vec<String>,
    /// Environment for the proxy.
    pub env: Vec<(String, String)>,
    /// `--reauth-margin` to pass, if any (Entra setups: a quarter of the token lifetime).
    pub reauth_margin: Option<Duration>,
    /// `--token-refresh-at` to pass, if any (Entra setups: 0.5, leaving seconds-long tokens
    /// room between the fetch and the re-authentication).
    pub token_refresh_at: Option<f64>,
}

impl Setup {
    /// PKI, Redis, issuer and front, and the common upstream flags.
    async fn entra_base(lifetime: Duration) -> Setup {
        let pki = TestPki::new();
        let redis = RedisServer::start(&pki).await;
        let issuer = TokenIssuer::new(&random_uuid(), lifetime);
        let front = AzureFront::start(&pki, &redis, &issuer).await;
        let args = vec![
            "--upstream".to_string(),
            front.addr(),
            "--tls-server-name".into(),
            "localhost".into(),
            "--ca-file".into(),
            pki.ca_path().display().to_string(),
            "--auth".into(),
            "entra".into(),
        ];
        Setup {
            front: Some(front),
            msi: None,
            entra: None,
            redis,
            issuer,
            pki,
            dir: tempfile::Builder::new()
                .prefix("test-setup-")
                .tempdir()
                .expect("temp dir"),
            args,
            env: Vec::new(),
            reauth_margin: Some(lifetime / 4),
            token_refresh_at: Some(0.5),
        }
    }

    /// Entra ID through the App Service / Container Apps managed identity endpoint
    /// (`--credential managed-identity`, `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`); tokens live
    /// `lifetime`.
    pub async fn entra_app_service(lifetime: Duration) -> Setup {
        let mut setup = Self::entra_base(lifetime).await;
        let msi = ManagedIdentityEndpoint::start(&setup.issuer).await;
        setup
            .args
            .extend(["--credential".into(), "managed-identity".into()]);
        setup.env.extend(msi.env());
        setup.msi = Some(msi);
        setup
    }

    /// [`Self::entra_base`] plus the fake Entra endpoint (HTTPS with the test PKI's
    /// certificate) and `--credential credential`. The proxy trusts the test CA for token
    /// requests through `--token-ca-file` (`--ca-file`, for the upstream, doesn't count there).
    async fn entra_endpoint_base(lifetime: Duration, credential: &str) -> (Setup, EntraEndpoint) {
        let mut setup = Self::entra_base(lifetime).await;
        let entra = EntraEndpoint::start(&setup.pki, &setup.issuer).await;
        setup.args.extend([
            "--credential".into(),
            credential.into(),
            "--token-ca-file".into(),
            setup.pki.ca_path().display().to_string(),
        ]);
        (setup, entra)
    }

    /// Entra ID through AKS workload identity (`--credential workload-identity`): a federated
    /// token file, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, and
    /// `AZURE_AUTHORITY_HOST` pointing at the fake Entra endpoint (trusted via
    /// `--token-ca-file`).
    pub async fn entra_workload_identity(lifetime: Duration) -> Setup {
        let (mut setup, entra) = Self::entra_endpoint_base(lifetime, "workload-identity").await;
        let token_file = setup.dir.path().join("azure-identity-token");
        std::fs::write(&token_file, entra.assertion()).expect("write federated token file");
        setup.env.extend([
            ("AZURE_CLIENT_ID".to_string(), entra.client_id().to_string()),
            ("AZURE_TENANT_ID".into(), entra.tenant_id().to_string()),
            (
                "AZURE_FEDERATED_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
            ("AZURE_AUTHORITY_HOST".into(), entra.authority_host()),
        ]);
        setup.entra = Some(entra);
        setup
    }

    /// Entra ID with a service principal and client secret (`--credential client-secret`,
    /// `AZURE_REDIS_CLIENTID` / `AZURE_REDIS_CLIENTSECRET` / `AZURE_REDIS_TENANTID`), against
    /// the fake Entra endpoint (`AZURE_AUTHORITY_HOST`, trusted via `--token-ca-file`).
    pub async fn entra_client_secret(lifetime: Duration) -> Setup {
        let (mut setup, entra) = Self::entra_endpoint_base(lifetime, "client-secret").await;
        setup.env.extend([
            (
                "AZURE_REDIS_CLIENTID".to_string(),
                entra.client_id().to_string(),
            ),
            ("AZURE_REDIS_CLIENTSECRET".into(), entra.client_secret()),
            ("AZURE_REDIS_TENANTID".into(), entra.tenant_id().to_string()),
            ("AZURE_AUTHORITY_HOST".into(), entra.authority_host()),
        ]);
        setup.entra = Some(entra);
        setup
    }

    /// An access key (`--auth access-key`, `AZURE_REDIS_PASSWORD`), straight to the real Redis
    /// over TLS. No front, no token endpoint.
    pub async fn access_key() -> Setup {
        let pki = TestPki::new();
        let redis = RedisServer::start(&pki).await;
        let args = vec![
            "--upstream".to_string(),
            redis.addr(),
            "--tls-server-name".into(),
            "localhost".into(),
            "--ca-file".into(),
            pki.ca_path().display().to_string(),
            "--auth".into(),
            "access-key".into(),
        ];
        let env = vec![("AZURE_REDIS_PASSWORD".to_string(), redis.access_key())];
        Setup {
            front: None,
            msi: None,
            entra: None,
            redis,
            issuer: TokenIssuer::new(&random_uuid(), Duration::from_secs(3600)),
            pki,
            dir: tempfile::Builder::new()
                .prefix("test-setup-")
                .tempdir()
                .expect("temp dir"),
            args,
            env,
            reauth_margin: None,
            token_refresh_at: None,
        }
    }

    /// The fake Azure front (panics in the access-key setup).
    pub fn front(&self) -> &AzureFront {
        self.front.as_ref().expect("this setup has no Azure front")
    }

    /// The managed identity endpoint (panics unless `entra_app_service`).
    pub fn msi(&self) -> &ManagedIdentityEndpoint {
        self.msi
            .as_ref()
            .expect("this setup has no managed identity endpoint")
    }

    /// The Entra endpoint (panics unless a workload identity / client secret setup).
    pub fn entra(&self) -> &EntraEndpoint {
        self.entra
            .as_ref()
            .expect("this setup has no Entra endpoint")
    }

    /// The full flag list: [`Self::args`] plus `--reauth-margin` / `--token-refresh-at`.
    pub fn proxy_args(&self) -> Vec<String> {
        let mut args = self.args.clone();
        if let Some(margin) = self.reauth_margin {
            args.extend(["--reauth-margin".into(), dur_arg(margin)]);
        }
        if let Some(at) = self.token_refresh_at {
            args.extend(["--token-refresh-at".into(), at.to_string()]);
        }
        args
    }

    /// Starts the proxy with [`Self::proxy_args`] and [`Self::env`].
    pub async fn start_proxy(&self) -> ProxyProcess {
        self.start_proxy_with(&[], &[]).await
    }

    /// Starts the proxy with extra flags and environment. An extra flag that the setup already
    /// passes (e.g. `--auth`) replaces the setup's one (clap rejects a flag given twice); extra
    /// environment variables override the setup's.
    pub async fn start_proxy_with(&self, args: &[&str], env: &[(&str, &str)]) -> ProxyProcess {
        let overridden: Vec<&str> = args
            .iter()
            .filter(|a| a.starts_with("--"))
            .map(|a| a.split('=').next().unwrap())
            .collect();
        // Every flag of `proxy_args` takes a value: drop overridden (flag, value) pairs.
        let base = self.proxy_args();
        let mut all_args = Vec::new();
        let mut i = 0;
        while i < base.len() {
            if overridden.contains(&base[i].as_str()) {
                i += 2;
            } else {
                all_args.push(base[i].clone());
                i += 1;
            }
        }
        all_args.extend(args.iter().map(|a| a.to_string()));
        let arg_refs: Vec<&str> = all_args.iter().map(String::as_str).collect();
        let mut env_refs: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env_refs.extend_from_slice(env);
        ProxyProcess::start(&arg_refs, &env_refs).await
    }
}
