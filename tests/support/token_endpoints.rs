//! Fake token endpoints that azure_identity 1.0 talks to, minting tokens from a [`TokenIssuer`].
//!
//! * [`ManagedIdentityEndpoint`]: the App Service / Container Apps managed identity protocol
//!   (plain HTTP on a local port). The proxy finds it through `IDENTITY_ENDPOINT` and
//!   `IDENTITY_HEADER` ([`ManagedIdentityEndpoint::env`]). What azure_identity sends (see its
//!   `imds_managed_identity_credential.rs` + `app_service_managed_identity_credential.rs`):
//!   `GET <IDENTITY_ENDPOINT>?api-version=2019-08-01&resource=https://redis.azure.com[&client_id=…]`
//!   with headers `x-identity-header: <IDENTITY_HEADER>` and `metadata: true`; it expects
//!   `{"access_token","expires_on":"<unix seconds as a string>","token_type","resource"}`.
//! * [`EntraEndpoint`]: the Entra ID token endpoint over HTTPS (test PKI), as used by
//!   `ClientSecretCredential` and `WorkloadIdentityCredential` (client assertion):
//!   `POST <authority>/{tenant}/oauth2/v2.0/token`, form fields `client_id`, `grant_type=
//!   client_credentials`, `scope`, and `client_secret` or `client_assertion` +
//!   `client_assertion_type`; it answers `{"token_type","expires_in","ext_expires_in",
//!   "access_token"}` or an Entra error (`error`, `error_description`, `error_codes`, …).
//!   The proxy trusts the test CA for it through `--token-ca-file` (its token HTTP client
//!   trusts the system roots plus that bundle, and not the upstream's `--ca-file`).
//!
//! Both have a runtime-switchable [`EndpointMode`] and count and record every request.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::HttpServer;
use super::token_issuer::TEST_TENANT_ID;
use super::{TestPki, TokenIssuer, random_hex, random_uuid};

/// How a fake endpoint answers token requests. Switch it at any time with `set_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointMode {
    /// Validate the request and mint a fresh token.
    Ok,
    /// Answer every request with this HTTP status and an error body of the protocol's shape.
    Fail(u16),
    /// Never answer (until the endpoint is dropped): the caller must time out.
    Hang,
    /// Validate the request but hand back the previously minted token again (same token, same
    /// expiry), like a caching identity library or endpoint; mints one if none exists yet.
    RepeatLast,
}

/// One request received by a fake endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    /// The path, e.g. `/msi/token` or `/<tenant>/oauth2/v2.0/token`.
    pub path: String,
    /// Query parameters (the managed identity protocol).
    pub query: HashMap<String, String>,
    /// Headers, names lowercase.
    pub headers: HashMap<String, String>,
    /// Form fields of the body (the Entra protocol).
    pub form: HashMap<String, String>,
    /// When it arrived.
    pub at: Instant,
}

/// State shared by both kinds of endpoint.
struct Common {
    issuer: TokenIssuer,
    mode: Mutex<EndpointMode>,
    requests: AtomicU64,
    tokens_served: AtomicU64,
    log: Mutex<Vec<TokenRequest>>,
    last_token: Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl Common {
    fn new(issuer: &TokenIssuer) -> Arc<Common> {
        Arc::new(Common {
            issuer: issuer.clone(),
            mode: Mutex::new(EndpointMode::Ok),
            requests: AtomicU64::new(0),
            tokens_served: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            last_token: Mutex::new(None),
            shutdown: CancellationToken::new(),
        })
    }

    /// Counts and records a request; returns the mode to answer it in.
    fn record(
        &self,
        method: &Method,
        path: String,
        query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> EndpointMode {
        let parse = |s: &[u8]| -> HashMap<String, String> {
            url::form_urlencoded::parse(s).into_owned().collect()
        };
        let request = TokenRequest {
            method: method.to_string(),
            path,
            query: parse(query.unwrap_or("").as_bytes()),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            form: parse(body),
            at: Instant::now(),
        };
        self.log.lock().unwrap().push(request);
        self.requests.fetch_add(1, Ordering::SeqCst);
        *self.mode.lock().unwrap()
    }

    /// The token to hand out in `mode` (`Ok` or `RepeatLast`), with its `exp`.
    fn token(&self, mode: EndpointMode) -> (String, u64) {
        let mut last = self.last_token.lock().unwrap();
        let token = match (mode, last.as_ref()) {
            (EndpointMode::RepeatLast, Some(t)) => t.clone(),
            _ => self.issuer.mint(),
        };
        *last = Some(token.clone());
        self.tokens_served.fetch_add(1, Ordering::SeqCst);
        let exp = TokenIssuer::claims(&token).exp;
        (token, exp)
    }

    /// Waits until the endpoint is dropped (the `Hang` mode).
    async fn hang(&self) -> Response {
        self.shutdown.cancelled().await;
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    }
}

/// Public accessors common to both endpoints.
macro_rules! common_accessors {
    () => {
        /// Switches how requests are answered from now on.
        pub fn set_mode(&self, mode: EndpointMode) {
            *self.common.mode.lock().unwrap() = mode;
        }

        /// The current mode.
        pub fn mode(&self) -> EndpointMode {
            *self.common.mode.lock().unwrap()
        }

        /// How many requests arrived (in any mode, valid or not).
        pub fn requests(&self) -> u64 {
            self.common.requests.load(Ordering::SeqCst)
        }

        /// How many tokens were handed out (successful answers).
        pub fn tokens_served(&self) -> u64 {
            self.common.tokens_served.load(Ordering::SeqCst)
        }

        /// Every request received so far, oldest first.
        pub fn request_log(&self) -> Vec<TokenRequest> {
            self.common.log.lock().unwrap().clone()
        }

        /// The last token handed out.
        pub fn last_token(&self) -> Option<String> {
            self.common.last_token.lock().unwrap().clone()
        }

        /// The issuer tokens are minted from.
        pub fn issuer(&self) -> &TokenIssuer {
            &self.common.issuer
        }

        /// The listening address.
        pub fn addr(&self) -> SocketAddr {
            self.server.addr()
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Managed identity (App Service / Container Apps)
// ---------------------------------------------------------------------------------------------

/// The API version azure_identity 1.0 sends to the App Service endpoint.
pub const MSI_API_VERSION: &str = "2019-08-01";

/// The path the managed identity endpoint serves.
pub const MSI_PATH: &str = "/msi/token";

struct MsiState {
    common: Arc<Common>,
    identity_header: String,
    client_id: Mutex<Option<String>>,
}

/// A fake App Service / Container Apps managed identity endpoint (plain HTTP).
pub struct ManagedIdentityEndpoint {
    common: Arc<Common>,
    state: Arc<MsiState>,
    server: HttpServer,
}

impl ManagedIdentityEndpoint {
    /// Starts the endpoint; tokens come from `issuer` (lifetime and `oid` from it).
    pub async fn start(issuer: &TokenIssuer) -> ManagedIdentityEndpoint {
        let common = Common::new(issuer);
        let state = Arc::new(MsiState {
            common: common.clone(),
            identity_header: format!("IdentityHeader{}", random_hex(20)),
            client_id: Mutex::new(None),
        });
        let router = Router::new()
            .route(MSI_PATH, any(msi_token))
            .with_state(state.clone());
        let server = HttpServer::start(router, None, common.shutdown.clone()).await;
        ManagedIdentityEndpoint {
            common,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:PORT/msi/token`: the value of `IDENTITY_ENDPOINT`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}{MSI_PATH}", self.addr())
    }

    /// The secret expected in `x-identity-header`: the value of `IDENTITY_HEADER`.
    pub fn identity_header(&self) -> &str {
        &self.state.identity_header
    }

    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` for the proxy's environment.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("IDENTITY_ENDPOINT".into(), self.endpoint_url()),
            ("IDENTITY_HEADER".into(), self.identity_header().to_string()),
        ]
    }

    /// Makes this a user-assigned identity: requests must then carry `client_id=<id>` (else
    /// 400, "identity not found", like App Service). `None`: system-assigned, any request ok.
    pub fn require_client_id(&self, client_id: Option<&str>) {
        *self.state.client_id.lock().unwrap() = client_id.map(str::to_string);
    }

    common_accessors!();
}

fn msi_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "statusCode": status.as_u16(), "message": message })),
    )
        .into_response()
}

async fn msi_token(
    State(state): State<Arc<MsiState>>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let common = &state.common;
    let mode = common.record(
        &method,
        MSI_PATH.to_string(),
        query.as_deref(),
        &headers,
        b"",
    );
    match mode {
        EndpointMode::Hang => return common.hang().await,
        EndpointMode::Fail(code) => {
            let status = StatusCode::from_u16(code).expect("valid HTTP status");
            return msi_error(status, "fake managed identity endpoint: failure mode");
        }
        EndpointMode::Ok | EndpointMode::RepeatLast => {}
    }
    if method != Method::GET {
        return msi_error(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    }
    let provided = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if provided != Some(state.identity_header.as_str()) {
        return msi_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong x-identity-header",
        );
    }
    let q: HashMap<String, String> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if q.get("api-version").map(String::as_str) != Some(MSI_API_VERSION) {
        return msi_error(
            StatusCode::BAD_REQUEST,
            "missing or unsupported api-version",
        );
    }
    let Some(resource) = q.get("resource").cloned() else {
        return msi_error(StatusCode::BAD_REQUEST, "missing resource");
    };
    let required = state.client_id.lock().unwrap().clone();
    if let Some(required) = &required
        && q.get("client_id") != Some(required)
    {
        return msi_error(
            StatusCode::BAD_REQUEST,
            "identity not found: no user-assigned identity with that client_id",
        );
    }
    let (token, exp) = common.token(mode);
    let client_id = required.unwrap_or_else(|| "00000000-0000-0000-0000-00000000c11d".into());
    axum::Json(json!({
        "access_token": token,
        "expires_on": exp.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": client_id,
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Entra ID token endpoint
// ---------------------------------------------------------------------------------------------

/// The `client_assertion_type` of a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct EntraState {
    common: Arc<Common>,
    tenant_id: String,
    client_id: String,
    client_secret: Mutex<String>,
    assertion: Mutex<String>,
}

/// A fake Entra ID token endpoint (`POST /{tenant}/oauth2/v2.0/token`) over HTTPS.
pub struct EntraEndpoint {
    common: Arc<Common>,
    state: Arc<EntraState>,
    server: HttpServer,
}

impl EntraEndpoint {
    /// Starts the endpoint over HTTPS with the test PKI's `localhost` certificate, for tenant
    /// [`TEST_TENANT_ID`] and a random client id, client secret and federated assertion.
    pub async fn start(pki: &TestPki, issuer: &TokenIssuer) -> EntraEndpoint {
        let common = Common::new(issuer);
        let state = Arc::new(EntraState {
            common: common.clone(),
            tenant_id: TEST_TENANT_ID.to_string(),
            client_id: random_uuid(),
            client_secret: Mutex::new(format!("ClientSecret~{}", random_hex(32))),
            assertion: Mutex::new(fake_service_account_token()),
        });
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(entra_token))
            .with_state(state.clone());
        let server = HttpServer::start(router, Some(pki.acceptor()), common.shutdown.clone()).await;
        EntraEndpoint {
            common,
            state,
            server,
        }
    }

    /// `https://localhost:PORT/`: the value of `AZURE_AUTHORITY_HOST` (the name matches the
    /// certificate).
    pub fn authority_host(&self) -> String {
        format!("https://localhost:{}/", self.addr().port())
    }

    /// `https://localhost:PORT/<tenant>/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}{}/oauth2/v2.0/token",
            self.authority_host(),
            self.state.tenant_id
        )
    }

    /// The tenant the endpoint accepts.
    pub fn tenant_id(&self) -> &str {
        &self.state.tenant_id
    }

    /// The client (application) id the endpoint accepts.
    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    /// The client secret the endpoint accepts.
    pub fn client_secret(&self) -> String {
        self.state.client_secret.lock().unwrap().clone()
    }

    /// Changes the accepted client secret (a rotated secret).
    pub fn set_client_secret(&self, secret: &str) {
        *self.state.client_secret.lock().unwrap() = secret.to_string();
    }

    /// The federated (Kubernetes service account) token accepted as `client_assertion`.
    pub fn assertion(&self) -> String {
        self.state.assertion.lock().unwrap().clone()
    }

    /// Changes the accepted assertion (a rotated service account token).
    pub fn set_assertion(&self, assertion: &str) {
        *self.state.assertion.lock().unwrap() = assertion.to_string();
    }

    common_accessors!();
}

/// A JWT that looks like a projected Kubernetes service account token.
fn fake_service_account_token() -> String {
    let now = super::unix_now() as u64;
    let claims = json!({
        "aud": ["api://AzureADTokenExchange"],
        "iss": "https://oidc.test.invalid/",
        "sub": "system:serviceaccount:default:app",
        "iat": now,
        "exp": now + 3600,
        "jti": random_hex(16),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"kubernetes-service-account-signer"),
    )
    .expect("encode service account token")
}

/// An error response shaped like Entra's (what azure_identity parses: `error_codes`,
/// `error_description`).
fn entra_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let trace_id = random_uuid();
    let timestamp = format!("{:.0}", super::unix_now());
    (
        status,
        axum::Json(json!({
            "error": error,
            "error_description": format!(
                "AADSTS{code}: {description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {trace_id}\r\nTimestamp: {timestamp}"
            ),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": trace_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        })),
    )
        .into_response()
}

async fn entra_token(
    State(state): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let common = &state.common;
    let path = format!("/{tenant}/oauth2/v2.0/token");
    let mode = common.record(&method, path, None, &headers, &body);
    match mode {
        EndpointMode::Hang => return common.hang().await,
        EndpointMode::Fail(code) => {
            let status = StatusCode::from_u16(code).expect("valid HTTP status");
            let (error, aad) = if status.is_server_error() {
                ("temporarily_unavailable", 50196)
            } else {
                ("invalid_request", 90000)
            };
            return entra_error(
                status,
                error,
                aad,
                "The fake Entra endpoint is in failure mode.",
            );
        }
        EndpointMode::Ok | EndpointMode::RepeatLast => {}
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);

    if tenant != state.tenant_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    if field("grant_type") != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if field("client_id") != Some(state.client_id.as_str()) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{}' was not found in the directory.",
                field("client_id").unwrap_or("")
            ),
        );
    }
    match field("scope") {
        Some(scope) if scope.ends_with("/.default") => {}
        _ => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                "The provided value for scope is not valid. Client credential flows must have \
                 a scope value with /.default suffixed to the resource identifier.",
            );
        }
    }
    match (field("client_secret"), field("client_assertion")) {
        (Some(secret), _) => {
            if secret != *state.client_secret.lock().unwrap() {
                return entra_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the \
                     request is the client secret value, not the client secret ID.",
                );
            }
        }
        (None, Some(assertion)) => {
            if field("client_assertion_type") != Some(ASSERTION_TYPE) {
                return entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    50027,
                    "JWT token is invalid or malformed (unsupported client_assertion_type).",
                );
            }
            if assertion != *state.assertion.lock().unwrap() {
                return entra_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    70021,
                    "No matching federated identity record found for presented assertion.",
                );
            }
        }
        (None, None) => {
            return entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' \
                 or 'client_secret'.",
            );
        }
    }
    // Tokens are always minted for Redis, whatever the scope.
    let (token, exp) = common.token(mode);
    // Whole seconds, rounded down: the caller's idea of the expiry is never later than `exp`.
    let expires_in = (exp as f64 - super::unix_now()).floor().max(0.0) as u64;
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": token,
    }))
    .into_response()
}
