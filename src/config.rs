//! Configuration: command-line flags, environment variables and connection strings.
//!
//! Every option is a flag and an environment variable (the flag wins); the upstream and
//! credential variables are the ones Azure Service Connector injects, so a pod that already has
//! a Service Connector binding needs nothing new. This module turns all of that into one
//! resolved, validated [`Config`]; nothing else in the crate reads the environment for options.
//! A configuration error is a [`ConfigError`]: `main` prints its one line and exits with status 2.
//!
//! How it is put together: clap only splits the command line into raw strings ([`ProxyArgs`]);
//! every value, whether it came from a flag or a variable, then goes through the same small
//! parsers here. That keeps one error style (`configuration error: invalid --tls 'x': expected
//! true or false`) and lets tests inject the environment through a function instead of
//! mutating the process environment. An error quotes the value only for options that can't
//! hold a secret (see `Echo`); the others, connection strings and stray command-line words
//! are never printed. An empty value counts as unset, because
//! templated manifests often render an unset option as `""`.

use crate::injector::sidecar;
use crate::secret::Secret;
use clap::{Args, Parser, Subcommand};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Port of Azure Cache for Redis' TLS endpoint, used when no port is given anywhere.
const DEFAULT_PORT: u16 = 6380;
/// Entra scope of Azure Cache for Redis and Azure Managed Redis.
pub const DEFAULT_SCOPE: &str = "https://redis.azure.com/.default";
/// Where applications connect by default: loopback only, so nothing else can borrow the
/// proxy's credentials.
const DEFAULT_LISTEN: &str = "127.0.0.1:6379";
/// Health and metrics endpoint by default.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// `--cluster-max-nodes` when not given: Azure Managed Redis's largest caches have tens of
/// shards, each with a replica.
const DEFAULT_CLUSTER_MAX_NODES: usize = 100;
/// The largest `--cluster-max-nodes` accepted (each node may hold a listener).
const MAX_CLUSTER_NODES: usize = 1000;
/// Most shared connections `--multiplex` opens (each is a TLS connection and an `AUTH` per token).
const MAX_MULTIPLEX: usize = 64;
/// `--multiplex-reply-mib` when not given: eight clients at the 32 MiB one client may leave
/// unread, so a few slow readers of large values are not closed, yet memory has a bound that
/// does not grow with the number of clients.
const DEFAULT_MULTIPLEX_REPLY_MIB: usize = 256;
/// The largest `--multiplex-reply-mib` accepted (1 TiB: no bound in practice).
pub(crate) const MAX_MULTIPLEX_REPLY_MIB: usize = 1024 * 1024;
/// `--cluster-refresh` when not given.
const DEFAULT_CLUSTER_REFRESH: Duration = Duration::from_secs(10);
/// A new token is fetched once this fraction of the current one's lifetime has passed.
const DEFAULT_TOKEN_REFRESH_AT: f64 = 0.75;
/// Live connections are re-authenticated at least this long before their token expires.
const DEFAULT_REAUTH_MARGIN: Duration = Duration::from_secs(3 * 60);
/// How long live connections may finish after the listener closed.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Upper bound for connecting, TLS and `AUTH` of one upstream connection.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `wait` polls before giving up (the same default as Cloud SQL Auth Proxy's `wait`).
const DEFAULT_WAIT_MAX: Duration = Duration::from_secs(30);
/// Where the injector listens by default (the chart's Service targets this port).
const DEFAULT_INJECTOR_LISTEN: &str = "0.0.0.0:8443";
/// The two accepted connection-string forms, quoted by every connection-string error.
const CONNECTION_STRING_FORMS: &str =
    "expected rediss://[user][:password]@host:port[/db] or host:port,password=...,ssl=True";
/// What a duration looks like, quoted by every duration error.
const DURATION_FORMAT: &str = "a duration such as 3m, 30s, 500ms or 0s";

/// What the process was asked to do: the subcommand, with its resolved options.
#[derive(Debug)]
pub enum Command {
    /// No subcommand: run the proxy until a shutdown signal.
    Run(Config),
    /// `check`: run the whole path once (token, TLS, `AUTH`, `PING`) and report each step.
    Check(Config),
    /// `wait`: poll the admin endpoint's `/startup` until the proxy is up.
    Wait {
        /// The admin endpoint (`host:port`) of the proxy to wait for.
        admin: String,
        /// Give up after this long.
        max: Duration,
    },
    /// `shutdown`: ask the proxy behind the control endpoint to shut down gracefully.
    Shutdown {
        /// The control endpoint (`host:port`, loopback) of the proxy to stop.
        control: String,
    },
    /// `injector`: serve the sidecar injector (a mutating admission webhook).
    Injector(InjectorConfig),
    /// `--help` or `--version`: text for stdout, after which the process exits with status 0.
    Help(String),
}

/// Where the control endpoint (`POST /quitquitquit`, which stops the proxy) is served. Only on
/// a loopback address: a peer address can't tell who is calling (a service mesh's sidecar
/// forwards the pod network's traffic from loopback addresses, Istio from 127.0.0.6), but a
/// listener bound to loopback can't be reached from outside the pod (or the machine) at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlListen {
    /// No control endpoint: only signals stop the proxy.
    Off,
    /// On the admin listener itself, which is bound to a loopback address.
    OnAdmin,
    /// On a listener of its own at this loopback `host:port`.
    Separate(String),
}

impl ControlListen {
    /// The address of a listener of its own, if it has one.
    fn address(&self) -> Option<&str> {
        match self {
            ControlListen::Separate(addr) => Some(addr),
            ControlListen::Off | ControlListen::OnAdmin => None,
        }
    }
}

/// The resolved configuration of `redis-entra-proxy injector`.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Where the webhook's HTTPS server listens (`host:port`).
    pub listen: String,
    /// The serving certificate (PEM), re-read when it changes.
    pub tls_cert_file: PathBuf,
    /// Its private key (PEM), re-read when it changes.
    pub tls_key_file: PathBuf,
    /// The sidecar's options before a pod's annotations: built-ins over the defaults file.
    pub defaults: sidecar::Options,
    /// Log output format.
    pub log_format: LogFormat,
}

/// The resolved configuration of one proxy process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The cache's host name (also the default TLS server name).
    pub upstream_host: String,
    /// The cache's port (6380 when not given; Azure Managed Redis uses 10000).
    pub upstream_port: u16,
    /// TLS to the upstream; plaintext only when explicitly disabled.
    pub tls: bool,
    /// SNI and certificate name; defaults to `upstream_host`.
    pub tls_server_name: String,
    /// Extra trusted CA bundle (PEM) for the upstream only.
    pub ca_file: Option<PathBuf>,
    /// Extra trusted CA bundle (PEM) for the Entra token endpoint only: a separate trust store,
    /// so that a CA trusted for the cache (a private one, or a TLS-inspecting proxy's) can't
    /// vouch for the endpoint that receives the proxy's credentials and hands out its tokens.
    pub token_ca_file: Option<PathBuf>,
    /// Database `SELECT`ed on each new upstream connection when not 0.
    pub database: u32,
    /// How upstream connections authenticate.
    pub auth: AuthConfig,
    /// Entra token scope.
    pub scope: String,
    /// Fraction of a token's lifetime after which a new one is fetched.
    pub token_refresh_at: f64,
    /// Live connections are re-authenticated at least this long before their token expires
    /// (capped at a quarter of the token's lifetime).
    pub reauth_margin: Duration,
    /// Redis user for Entra `AUTH`; `None` means the token's `oid` claim.
    pub redis_username: Option<String>,
    /// Where applications connect.
    pub listen: ListenAddr,
    /// When set, clients must `AUTH` with this password first.
    pub listen_password: Option<Secret>,
    /// Maximum concurrent clients (0: no limit).
    pub max_connections: usize,
    /// Upstream connections kept connected and authenticated ahead of demand.
    pub warm_connections: usize,
    /// The warm pool fills only once a multiplexed client is first pinned (`--multiplex`
    /// without `--warm-connections`): an application that never pins keeps N connections.
    pub warm_after_first_pin: bool,
    /// `--multiplex N`: clients share N upstream connections until they need one of their own
    /// (0: every client has its own, the default). See `crate::mux`.
    pub multiplex: usize,
    /// `--multiplex-reply-mib`, in bytes: the unread replies of all shared clients together
    /// before those holding the most are closed.
    pub multiplex_reply_limit: usize,
    /// Health and metrics HTTP endpoint; `None` when `off`.
    pub admin_listen: Option<String>,
    /// Where `POST /quitquitquit` is served: never where the pod network can reach it.
    pub control_listen: ControlListen,
    /// After SIGTERM, keep accepting new connections this long.
    pub shutdown_delay: Duration,
    /// Then, how long live connections may finish before they are closed.
    pub shutdown_grace: Duration,
    /// Log output format.
    pub log_format: LogFormat,
    /// Upper bound for TCP connect + TLS handshake + `AUTH` of one upstream connection.
    pub connect_timeout: Duration,
    /// Whether the upstream is served as a Redis Cluster (one local listener per node).
    pub cluster: ClusterConfig,
    /// Non-fatal findings (an ignored connection-string key, an open listener, ...) for
    /// `main` to log as warnings. Parsing happens before logging is set up (the log format is
    /// itself an option), so they are kept here rather than logged on the spot. No secrets.
    pub warnings: Vec<String>,
}

/// `--cluster auto|on|off`: whether the upstream is an OSS-clustered cache, whose clients
/// connect to every node, so that every node needs a local listener of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMode {
    /// Ask the upstream once at start (`CLUSTER NODES` answers only on a cluster).
    Auto,
    /// A cluster: fail loudly if it is not one.
    On,
    /// One upstream address, relayed as it is.
    Off,
}

/// Where node listeners go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterPorts {
    /// The ports `start..=end`, handed out in order, a port per node for the life of the process.
    Range(u16, u16),
    /// `--listen` has port 0 (tests, ad-hoc runs): every node listener gets an ephemeral port.
    Ephemeral,
}

/// The cluster mode's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `--cluster`.
    pub mode: ClusterMode,
    /// `--cluster-ports` (default: the `max_nodes` ports after `--listen`'s).
    pub ports: ClusterPorts,
    /// `--cluster-max-nodes`: a topology naming more nodes gets no more listeners.
    pub max_nodes: usize,
    /// `--cluster-refresh`: how often the topology is read again (also at once after a
    /// `MOVED` or a node that refused a connection).
    pub refresh: Duration,
}

/// Where the proxy listens for applications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host:port` (resolved at bind time).
    Tcp(String),
    /// `unix:/path`.
    Unix(PathBuf),
}

/// Log output format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The authentication mode after `auto` has been resolved.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    /// No `AUTH` at all (a local or already-open upstream).
    None,
    /// An access key, sent as `AUTH [user] key`.
    AccessKey {
        /// Where the key comes from.
        source: KeySource,
        /// Username from the connection string, if any (Azure uses the default user).
        username: Option<String>,
    },
    /// Microsoft Entra ID tokens, sent as `AUTH <oid> <token>`.
    Entra(CredentialConfig),
}

/// Where an access key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Given directly (connection string or `AZURE_REDIS_PASSWORD`).
    Inline(Secret),
    /// Read from a file (a mounted Kubernetes Secret) and re-read when it changes.
    File(PathBuf),
}

/// Which Entra credential obtains tokens, with everything it needs.
#[derive(Debug, Clone)]
pub enum CredentialConfig {
    /// AKS workload identity: a federated token file exchanged at the Entra authority.
    WorkloadIdentity {
        /// `AZURE_CLIENT_ID` (or `AZURE_REDIS_CLIENTID`).
        client_id: String,
        /// `AZURE_TENANT_ID` (or `AZURE_REDIS_TENANTID`).
        tenant_id: String,
        /// `AZURE_FEDERATED_TOKEN_FILE`.
        token_file: PathBuf,
        /// `AZURE_AUTHORITY_HOST`, when not the public cloud.
        authority_host: Option<String>,
    },
    /// Managed identity: IMDS, or App Service / Container Apps when `IDENTITY_ENDPOINT` and
    /// `IDENTITY_HEADER` are set. User-assigned when a client id is given.
    ManagedIdentity {
        /// User-assigned identity client id (`AZURE_REDIS_CLIENTID`).
        client_id: Option<String>,
    },
    /// A service principal with a client secret.
    ClientSecret {
        /// Tenant id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The client secret.
        secret: Secret,
        /// `AZURE_AUTHORITY_HOST`, when not the public cloud.
        authority_host: Option<String>,
    },
    /// The signed-in Azure CLI user (developer machines).
    AzureCli {
        /// Tenant id, when given.
        tenant_id: Option<String>,
    },
}

/// A configuration problem: one line that says what is wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// `host:port` of the upstream, with an IPv6 literal in brackets, ready to dial or log.
    pub fn upstream_address(&self) -> String {
        join_host_port(&self.upstream_host, self.upstream_port)
    }

    /// One line for the startup log: where the proxy connects, how it authenticates and where
    /// it listens, so an operator can see what `auto` chose. Never contains a secret.
    pub fn describe(&self) -> String {
        let mut parts = vec![
            format!("upstream={}", self.upstream_address()),
            format!("tls={}", self.tls),
        ];
        if self.tls && self.tls_server_name != self.upstream_host {
            parts.push(format!("tls_server_name={}", self.tls_server_name));
        }
        if let Some(ca_file) = &self.ca_file {
            parts.push(format!("ca_file={}", ca_file.display()));
        }
        if let Some(token_ca_file) = &self.token_ca_file {
            parts.push(format!("token_ca_file={}", token_ca_file.display()));
        }
        if self.database != 0 {
            parts.push(format!("database={}", self.database));
        }
        parts.push(self.auth.describe(self.redis_username.as_deref()));
        parts.push(format!("listen={}", self.listen));
        if self.listen_password.is_some() {
            parts.push("listen_password=set".to_string());
        }
        let admin = self.admin_listen.as_deref().unwrap_or("off");
        parts.push(format!("admin_listen={admin}"));
        if let ControlListen::Separate(control) = &self.control_listen {
            parts.push(format!("control_listen={control}"));
        }
        if self.max_connections > 0 {
            parts.push(format!("max_connections={}", self.max_connections));
        }
        if self.warm_connections > 0 {
            let when = if self.warm_after_first_pin {
                " (after the first pin)"
            } else {
                ""
            };
            parts.push(format!("warm_connections={}{when}", self.warm_connections));
        }
        if self.multiplex > 0 {
            parts.push(format!("multiplex={}", self.multiplex));
            parts.push(format!(
                "multiplex_reply_mib={}",
                self.multiplex_reply_limit / (1024 * 1024)
            ));
        }
        if self.cluster.mode == ClusterMode::On {
            parts.push(format!("cluster=on {}", self.cluster.describe()));
        }
        parts.join(" ")
    }
}

impl AuthConfig {
    /// The `--auth` mode this resolved to: `none`, `access-key` or `entra`.
    pub fn mode_name(&self) -> &'static str {
        match self {
            AuthConfig::None => "none",
            AuthConfig::AccessKey { .. } => "access-key",
            AuthConfig::Entra(_) => "entra",
        }
    }

    /// `auth=… [key=…|credential=…] user=…` for [`Config::describe`]; no secret.
    fn describe(&self, redis_username: Option<&str>) -> String {
        match self {
            AuthConfig::None => "auth=none".to_string(),
            AuthConfig::AccessKey { source, username } => {
                let key = match source {
                    KeySource::Inline(_) => "inline".to_string(),
                    KeySource::File(path) => format!("file:{}", path.display()),
                };
                let user = username.as_deref().unwrap_or("default");
                format!("auth=access-key key={key} user={user}")
            }
            AuthConfig::Entra(credential) => {
                let user = redis_username.unwrap_or("oid-claim");
                format!("auth=entra {} user={user}", credential.describe())
            }
        }
    }
}

impl CredentialConfig {
    /// The `--credential` kind this resolved to, e.g. `workload-identity`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            CredentialConfig::WorkloadIdentity { .. } => "workload-identity",
            CredentialConfig::ManagedIdentity { .. } => "managed-identity",
            CredentialConfig::ClientSecret { .. } => "client-secret",
            CredentialConfig::AzureCli { .. } => "azure-cli",
        }
    }

    /// `credential=… client_id=… tenant_id=…`: ids are not secrets, and they are what an
    /// operator needs to match a role assignment or a Redis user.
    fn describe(&self) -> String {
        let mut parts = vec![format!("credential={}", self.kind_name())];
        let (client_id, tenant_id) = match self {
            CredentialConfig::WorkloadIdentity {
                client_id,
                tenant_id,
                ..
            }
            | CredentialConfig::ClientSecret {
                client_id,
                tenant_id,
                ..
            } => (Some(client_id), Some(tenant_id)),
            CredentialConfig::ManagedIdentity { client_id } => (client_id.as_ref(), None),
            CredentialConfig::AzureCli { tenant_id } => (None, tenant_id.as_ref()),
        };
        if let Some(client_id) = client_id {
            parts.push(format!("client_id={client_id}"));
        }
        if let Some(tenant_id) = tenant_id {
            parts.push(format!("tenant_id={tenant_id}"));
        }
        parts.join(" ")
    }
}

impl fmt::Display for ListenAddr {
    /// The address as the user writes it: `host:port` or `unix:/path`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => f.write_str(addr),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Parses the process's command line and environment.
pub fn parse_command() -> Result<Command, ConfigError> {
    let mut args = Vec::new();
    for arg in std::env::args_os() {
        let arg = arg.into_string().map_err(|_| {
            ConfigError("a command-line argument is not valid UTF-8: pass it as UTF-8".into())
        })?;
        args.push(arg);
    }
    parse_from(args, &|name| std::env::var(name).ok())
}

/// Parses `args` (the first one is the program name) with environment variables looked up
/// through `env`, so tests can inject variables without touching the process environment.
pub fn parse_from(
    args: impl IntoIterator<Item = String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => return help_or_usage_error(err),
    };
    let lookup = Lookup { env };
    match cli.command {
        None => resolve(cli.proxy, &lookup).map(Command::Run),
        Some(Sub::Check(proxy)) => resolve(*proxy, &lookup).map(Command::Check),
        Some(Sub::Wait(wait)) => Ok(Command::Wait {
            admin: admin_endpoint(&wait.admin, &lookup)?,
            max: lookup
                .duration(&wait.max, WAIT_MAX)?
                .unwrap_or(DEFAULT_WAIT_MAX),
        }),
        Some(Sub::Shutdown(args)) => Ok(Command::Shutdown {
            control: control_endpoint(&args, &lookup)?,
        }),
        Some(Sub::Injector(args)) => injector(args, &lookup).map(Command::Injector),
    }
}

/// Turns clap's `--help`/`--version` into [`Command::Help`], and a usage error into a
/// one-line [`ConfigError`].
fn help_or_usage_error(err: clap::Error) -> Result<Command, ConfigError> {
    use clap::error::ErrorKind;
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return Ok(Command::Help(err.render().to_string()));
    }
    let mut message = usage_error_message(&err);
    message.push_str("; run 'redis-entra-proxy --help' to see the options");
    Err(ConfigError(message))
}

/// What is wrong with the command line, in one line that never quotes what the user typed
/// unless it is the name of an option or a subcommand.
///
/// clap's own messages quote the offending word, and on a command line that word is often a
/// piece of a secret: the second half of an unquoted password with a space
/// (`--listen-password my secret` leaves `secret` as a stray argument), or a password that
/// starts with `-` (`--listen-password -x…` reads as the flag `-x`). So for the errors whose
/// subject is user input (an unknown argument, an unknown subcommand, an argument where a
/// subcommand was expected, a rejected value) the message is built here from clap's context;
/// the other errors (an option given twice, a missing value, …) only quote option names and
/// keep clap's wording.
fn usage_error_message(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let string = |kind| match err.get(kind) {
        Some(ContextValue::String(value)) => Some(value.as_str()),
        _ => None,
    };
    let stray = "an unexpected argument (not shown, as it may be a piece of a secret): quote a \
                 value that contains spaces, and write --option=VALUE for a value that starts \
                 with '-'";
    match err.kind() {
        ErrorKind::UnknownArgument => match string(ContextKind::InvalidArg) {
            Some(arg) if looks_like_an_option_name(arg) => {
                let mut message = format!("unknown option '{arg}'");
                if let Some(suggested) = string(ContextKind::SuggestedArg) {
                    message.push_str(&format!(" (did you mean '{suggested}'?)"));
                }
                message
            }
            _ => stray.to_string(),
        },
        ErrorKind::InvalidSubcommand => {
            let mut message = format!("{stray}; the subcommands are {}", subcommand_list());
            if let Some(ContextValue::Strings(suggested)) =
                err.get(ContextKind::SuggestedSubcommand)
                && let Some(first) = suggested.first()
            {
                message.push_str(&format!(" (did you mean '{first}'?)"));
            }
            message
        }
        ErrorKind::ArgumentConflict => match string(ContextKind::InvalidSubcommand) {
            Some(sub) if subcommand_names().iter().any(|name| name == sub) => format!(
                "the subcommand '{sub}' comes after options: put the options after the \
                 subcommand (redis-entra-proxy {sub} --upstream ...)"
            ),
            Some(_) => stray.to_string(),
            None => clap_first_line(err),
        },
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::TooManyValues
            if string(ContextKind::InvalidValue).is_some_and(|value| !value.is_empty()) =>
        {
            let arg = string(ContextKind::InvalidArg).unwrap_or("an option");
            format!("invalid value for {arg} (not shown, as it may hold a secret)")
        }
        _ => clap_first_line(err),
    }
}

/// The first line of clap's message, for errors that quote option names only.
fn clap_first_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("invalid command line");
    first.trim_start_matches("error: ").to_string()
}

/// `--` and lowercase words joined by `-`: how this program's options are spelt, so a
/// misspelt option is worth quoting. A password is unlikely to look like that (it would need
/// no capital, digit or symbol).
fn looks_like_an_option_name(arg: &str) -> bool {
    arg.strip_prefix("--").is_some_and(|name| {
        (2..=40).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c == '-')
    })
}

/// The names of the subcommands, as clap knows them.
fn subcommand_names() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect()
}

/// `check, wait, shutdown and injector`.
fn subcommand_list() -> String {
    let names = subcommand_names();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// The command line as clap sees it.
// ---------------------------------------------------------------------------------------------

/// The command line, split into raw strings. Values are validated later, together with the
/// environment, so that both get the same parsers and the same one-line errors.
#[derive(Debug, Parser)]
#[command(
    name = "redis-entra-proxy",
    version,
    about = "Lets any Redis client reach Azure Cache for Redis / Azure Managed Redis with \
             Microsoft Entra ID (or an access key) over plain localhost.",
    after_help = "Every option can also be set by the environment variable shown; the flag \
                  wins. An empty value counts as unset.\n\n\
                  Credentials come from the environment only: AZURE_REDIS_PASSWORD (access \
                  key); AZURE_REDIS_CLIENTID, AZURE_REDIS_CLIENTSECRET, AZURE_REDIS_TENANTID \
                  (Service Connector); AZURE_CLIENT_ID, AZURE_TENANT_ID, \
                  AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST (AKS workload identity); \
                  IDENTITY_ENDPOINT, IDENTITY_HEADER (App Service / Container Apps managed \
                  identity).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Options of the proxy itself (no subcommand).
    #[command(flatten)]
    proxy: ProxyArgs,
    /// What to do instead of running the proxy.
    #[command(subcommand)]
    command: Option<Sub>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Sub {
    /// Run the whole path once (configuration, token, TLS, AUTH, PING), print what was found at
    /// each step, and exit 0 only if all of it works
    Check(Box<ProxyArgs>),
    /// Wait until the proxy on --admin-listen is up (GET /startup): run it before an app that
    /// can't use a native sidecar
    Wait(WaitArgs),
    /// Ask the proxy to shut down gracefully (POST /quitquitquit on its control endpoint), e.g.
    /// from a preStop hook or a Job's last step
    Shutdown(ShutdownArgs),
    /// Serve the sidecar injector: the mutating admission webhook (HTTPS, POST /mutate) that
    /// adds the proxy as a native sidecar to pods labelled redis-entra-proxy.io/inject=true
    Injector(InjectorArgs),
}

/// Options of `injector`.
#[derive(Debug, Args)]
struct InjectorArgs {
    /// HTTPS listen address [env: REDIS_PROXY_INJECTOR_LISTEN] [default: 0.0.0.0:8443]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Serving certificate, PEM; re-read when it changes [env: REDIS_PROXY_INJECTOR_TLS_CERT_FILE]
    #[arg(long, value_name = "PATH")]
    tls_cert_file: Option<String>,
    /// Its private key, PEM; re-read when it changes [env: REDIS_PROXY_INJECTOR_TLS_KEY_FILE]
    #[arg(long, value_name = "PATH")]
    tls_key_file: Option<String>,
    /// Chart-wide sidecar defaults, JSON [env: REDIS_PROXY_INJECTOR_DEFAULTS_FILE]
    #[arg(long, value_name = "PATH")]
    defaults_file: Option<String>,
    /// text or json; level from RUST_LOG (default info) [env: REDIS_PROXY_LOG_FORMAT]
    /// [default: text]
    #[arg(long, value_name = "F")]
    log_format: Option<String>,
}

/// Options of `wait`.
#[derive(Debug, Args)]
struct WaitArgs {
    /// Where the proxy is.
    #[command(flatten)]
    admin: AdminArgs,
    /// Give up after this long [env: REDIS_PROXY_WAIT_MAX] [default: 30s]
    #[arg(long, value_name = "DUR")]
    max: Option<String>,
}

/// Options of `shutdown`: where the proxy's control endpoint is.
#[derive(Debug, Args)]
struct ShutdownArgs {
    /// Where the proxy's admin endpoint is (the control endpoint's default follows from it).
    #[command(flatten)]
    admin: AdminArgs,
    /// Control endpoint of the proxy [env: REDIS_PROXY_CONTROL_LISTEN] [default: auto, as the
    /// proxy's]
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<String>,
}

/// Options of `wait` and `shutdown`: where the proxy's admin endpoint is.
#[derive(Debug, Args)]
struct AdminArgs {
    /// Admin endpoint of the proxy [env: REDIS_PROXY_ADMIN_LISTEN] [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
}

/// The proxy's options (spec §2), shared by running the proxy and `check`, in the groups that
/// `--help` shows.
#[derive(Debug, Args)]
struct ProxyArgs {
    /// Where the cache is and how to reach it.
    #[command(flatten)]
    upstream: UpstreamArgs,
    /// How upstream connections authenticate.
    #[command(flatten)]
    auth: AuthArgs,
    /// Where and how applications connect.
    #[command(flatten)]
    clients: ClientArgs,
    /// The cluster mode.
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Health, shutdown and logs.
    #[command(flatten)]
    ops: OpsArgs,
}

/// Where the cache is and how to reach it.
#[derive(Debug, Args)]
#[command(next_help_heading = "Upstream")]
struct UpstreamArgs {
    /// The cache; port 6380 when omitted [env: AZURE_REDIS_HOST (+ AZURE_REDIS_PORT)]
    #[arg(long, value_name = "HOST[:PORT]")]
    upstream: Option<String>,
    /// rediss://[user][:password]@host:port[/db] or host:port,password=…,ssl=True,defaultDatabase=0
    /// [env: AZURE_REDIS_CONNECTIONSTRING]
    #[arg(long, value_name = "S")]
    connection_string: Option<String>,
    /// TLS to the upstream; plaintext only when false [env: AZURE_REDIS_SSL] [default: true]
    #[arg(long, value_name = "BOOL")]
    tls: Option<String>,
    /// Allow Entra authentication over a plaintext upstream (--tls false, redis://): the token
    /// travels in clear text [env: REDIS_PROXY_INSECURE_ENTRA_OVER_PLAINTEXT] [default: false]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    insecure_entra_over_plaintext: Option<String>,
    /// SNI and certificate name [env: REDIS_PROXY_TLS_SERVER_NAME] [default: the upstream host]
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Extra trusted CA (PEM) for the upstream only, on top of the system roots
    /// [env: REDIS_PROXY_CA_FILE]
    #[arg(long, value_name = "PATH")]
    ca_file: Option<String>,
    /// SELECTed on each new upstream connection when not 0 [env: AZURE_REDIS_DATABASE] [default: 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    database: Option<String>,
    /// Timeout for connect + TLS + AUTH of one upstream connection
    /// [env: REDIS_PROXY_CONNECT_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DUR")]
    connect_timeout: Option<String>,
}

/// How upstream connections authenticate.
#[derive(Debug, Args)]
#[command(next_help_heading = "Authentication")]
struct AuthArgs {
    /// auto, entra, access-key or none [env: REDIS_PROXY_AUTH] [default: auto]
    #[arg(long, value_name = "MODE")]
    auth: Option<String>,
    /// Access key read from a file (a mounted Secret), re-read when it changes
    /// [env: REDIS_PROXY_ACCESS_KEY_FILE]; or give the key in AZURE_REDIS_PASSWORD
    #[arg(long, value_name = "PATH")]
    access_key_file: Option<String>,
    /// auto, workload-identity, managed-identity, client-secret or azure-cli
    /// [env: REDIS_PROXY_CREDENTIAL] [default: auto]
    #[arg(long, value_name = "KIND")]
    credential: Option<String>,
    /// Entra token scope [env: REDIS_PROXY_SCOPE] [default: https://redis.azure.com/.default]
    #[arg(long, value_name = "S")]
    scope: Option<String>,
    /// Extra trusted CA (PEM) for the Entra token endpoint only (AZURE_AUTHORITY_HOST), on top
    /// of the system roots; --ca-file is not trusted there [env: REDIS_PROXY_TOKEN_CA_FILE]
    #[arg(long, value_name = "PATH")]
    token_ca_file: Option<String>,
    /// Fetch a new token once this fraction of its lifetime has passed
    /// [env: REDIS_PROXY_TOKEN_REFRESH_AT] [default: 0.75]
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    token_refresh_at: Option<String>,
    /// Re-authenticate live connections at least this long before their token expires
    /// [env: REDIS_PROXY_REAUTH_MARGIN] [default: 3m]
    #[arg(long, value_name = "DUR")]
    reauth_margin: Option<String>,
    /// Redis user for Entra AUTH [env: AZURE_REDIS_USERNAME] [default: the token's oid claim]
    #[arg(long, value_name = "U")]
    redis_username: Option<String>,
}

/// Where and how applications connect.
#[derive(Debug, Args)]
#[command(next_help_heading = "Applications")]
struct ClientArgs {
    /// host:port or unix:/path [env: REDIS_PROXY_LISTEN] [default: 127.0.0.1:6379]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// When set, clients must AUTH with it first [env: REDIS_PROXY_LISTEN_PASSWORD]
    #[arg(long, value_name = "P")]
    listen_password: Option<String>,
    /// Extra clients get an error and are closed; 0 = no limit
    /// [env: REDIS_PROXY_MAX_CONNECTIONS] [default: 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    max_connections: Option<String>,
    /// Upstream connections kept authenticated ahead of demand
    /// [env: REDIS_PROXY_WARM_CONNECTIONS] [default: 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    warm_connections: Option<String>,
    /// Clients share N upstream connections, each pinned to its own once it needs connection
    /// state; 0 = off [env: REDIS_PROXY_MULTIPLEX] [default: 0]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    multiplex: Option<String>,
    /// With --multiplex: MiB of replies all shared clients together may leave unread before
    /// those holding the most are closed [env: REDIS_PROXY_MULTIPLEX_REPLY_MIB] [default: 256]
    #[arg(long, value_name = "MIB", allow_negative_numbers = true)]
    multiplex_reply_mib: Option<String>,
}

/// The cluster mode: a local listener per node of an OSS-clustered cache.
#[derive(Debug, Args)]
#[command(next_help_heading = "Cluster")]
struct ClusterArgs {
    /// auto, on or off: serve a clustered cache with one local listener per node; auto asks the
    /// cache at start [env: REDIS_PROXY_CLUSTER] [default: auto]
    #[arg(long, value_name = "MODE")]
    cluster: Option<String>,
    /// START-END: the node listeners' ports [env: REDIS_PROXY_CLUSTER_PORTS] [default: the
    /// --cluster-max-nodes ports after --listen's]
    #[arg(long, value_name = "RANGE")]
    cluster_ports: Option<String>,
    /// Most nodes served at once [env: REDIS_PROXY_CLUSTER_MAX_NODES] [default: 100]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    cluster_max_nodes: Option<String>,
    /// How often the topology is read again [env: REDIS_PROXY_CLUSTER_REFRESH] [default: 10s]
    #[arg(long, value_name = "DUR")]
    cluster_refresh: Option<String>,
}

/// Health, shutdown and logs.
#[derive(Debug, Args)]
#[command(next_help_heading = "Operations")]
struct OpsArgs {
    /// Health and metrics HTTP endpoint, or off [env: REDIS_PROXY_ADMIN_LISTEN]
    /// [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Loopback address of the control endpoint (POST /quitquitquit), auto or off
    /// [env: REDIS_PROXY_CONTROL_LISTEN] [default: auto: the admin endpoint when it is on
    /// loopback, else 127.0.0.1:<admin port + 1>]
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<String>,
    /// After SIGTERM, keep accepting new connections this long
    /// [env: REDIS_PROXY_SHUTDOWN_DELAY] [default: 0s]
    #[arg(long, value_name = "DUR")]
    shutdown_delay: Option<String>,
    /// Then, how long live connections may finish [env: REDIS_PROXY_SHUTDOWN_GRACE] [default: 30s]
    #[arg(long, value_name = "DUR")]
    shutdown_grace: Option<String>,
    /// text or json; level from RUST_LOG (default info) [env: REDIS_PROXY_LOG_FORMAT]
    /// [default: text]
    #[arg(long, value_name = "F")]
    log_format: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Looking values up and parsing them.
// ---------------------------------------------------------------------------------------------

/// A flag and the environment variable that stands in for it (the spec's table, row by row).
#[derive(Clone, Copy)]
struct Opt {
    /// `--flag`.
    flag: &'static str,
    /// `VARIABLE`.
    var: &'static str,
    /// Whether an error may quote the value.
    echo: Echo,
}

/// Whether an error about an option may quote its value. Decided per option: only values that
/// can never hold a secret are quoted; for the others the error names the option and the shape
/// expected, which is enough to fix it (the user can look at what they set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Echo {
    /// A number, a duration, a boolean, a path, an address or a name: quoted, which helps
    /// when the value came from a template or an unexpected variable.
    Shown,
    /// May hold a secret, whole or in part: a host where users paste connection strings and
    /// URLs with a password, a connection string, a password, or an option that a user could
    /// mistake for where the secret goes (`--auth <key>`, `--credential <client secret>`).
    Hidden,
}

/// Declares the [`Opt`] constants.
macro_rules! options {
    ($($name:ident = $flag:literal, $var:literal, $echo:ident;)*) => {
        $(
            #[doc = concat!("`", $flag, "` / `", $var, "`.")]
            const $name: Opt = Opt { flag: $flag, var: $var, echo: Echo::$echo };
        )*
    };
}

options! {
    UPSTREAM = "--upstream", "AZURE_REDIS_HOST", Hidden;
    CONNECTION_STRING = "--connection-string", "AZURE_REDIS_CONNECTIONSTRING", Hidden;
    TLS = "--tls", "AZURE_REDIS_SSL", Shown;
    INSECURE_ENTRA_OVER_PLAINTEXT =
        "--insecure-entra-over-plaintext", "REDIS_PROXY_INSECURE_ENTRA_OVER_PLAINTEXT", Shown;
    TLS_SERVER_NAME = "--tls-server-name", "REDIS_PROXY_TLS_SERVER_NAME", Shown;
    CA_FILE = "--ca-file", "REDIS_PROXY_CA_FILE", Shown;
    DATABASE = "--database", "AZURE_REDIS_DATABASE", Shown;
    CONNECT_TIMEOUT = "--connect-timeout", "REDIS_PROXY_CONNECT_TIMEOUT", Shown;
    AUTH = "--auth", "REDIS_PROXY_AUTH", Hidden;
    ACCESS_KEY_FILE = "--access-key-file", "REDIS_PROXY_ACCESS_KEY_FILE", Shown;
    CREDENTIAL = "--credential", "REDIS_PROXY_CREDENTIAL", Hidden;
    SCOPE = "--scope", "REDIS_PROXY_SCOPE", Shown;
    TOKEN_CA_FILE = "--token-ca-file", "REDIS_PROXY_TOKEN_CA_FILE", Shown;
    TOKEN_REFRESH_AT = "--token-refresh-at", "REDIS_PROXY_TOKEN_REFRESH_AT", Shown;
    REAUTH_MARGIN = "--reauth-margin", "REDIS_PROXY_REAUTH_MARGIN", Shown;
    REDIS_USERNAME = "--redis-username", "AZURE_REDIS_USERNAME", Shown;
    LISTEN = "--listen", "REDIS_PROXY_LISTEN", Shown;
    LISTEN_PASSWORD = "--listen-password", "REDIS_PROXY_LISTEN_PASSWORD", Hidden;
    MAX_CONNECTIONS = "--max-connections", "REDIS_PROXY_MAX_CONNECTIONS", Shown;
    WARM_CONNECTIONS = "--warm-connections", "REDIS_PROXY_WARM_CONNECTIONS", Shown;
    MULTIPLEX = "--multiplex", "REDIS_PROXY_MULTIPLEX", Shown;
    MULTIPLEX_REPLY_MIB = "--multiplex-reply-mib", "REDIS_PROXY_MULTIPLEX_REPLY_MIB", Shown;
    CLUSTER = "--cluster", "REDIS_PROXY_CLUSTER", Shown;
    CLUSTER_PORTS = "--cluster-ports", "REDIS_PROXY_CLUSTER_PORTS", Shown;
    CLUSTER_MAX_NODES = "--cluster-max-nodes", "REDIS_PROXY_CLUSTER_MAX_NODES", Shown;
    CLUSTER_REFRESH = "--cluster-refresh", "REDIS_PROXY_CLUSTER_REFRESH", Shown;
    ADMIN_LISTEN = "--admin-listen", "REDIS_PROXY_ADMIN_LISTEN", Shown;
    CONTROL_LISTEN = "--control-listen", "REDIS_PROXY_CONTROL_LISTEN", Shown;
    SHUTDOWN_DELAY = "--shutdown-delay", "REDIS_PROXY_SHUTDOWN_DELAY", Shown;
    SHUTDOWN_GRACE = "--shutdown-grace", "REDIS_PROXY_SHUTDOWN_GRACE", Shown;
    LOG_FORMAT = "--log-format", "REDIS_PROXY_LOG_FORMAT", Shown;
    WAIT_MAX = "--max", "REDIS_PROXY_WAIT_MAX", Shown;
    INJECTOR_LISTEN = "--listen", "REDIS_PROXY_INJECTOR_LISTEN", Shown;
    INJECTOR_TLS_CERT_FILE = "--tls-cert-file", "REDIS_PROXY_INJECTOR_TLS_CERT_FILE", Shown;
    INJECTOR_TLS_KEY_FILE = "--tls-key-file", "REDIS_PROXY_INJECTOR_TLS_KEY_FILE", Shown;
    INJECTOR_DEFAULTS_FILE = "--defaults-file", "REDIS_PROXY_INJECTOR_DEFAULTS_FILE", Shown;
}

/// The environment, behind a function so that tests can inject variables.
struct Lookup<'a> {
    /// Returns a variable's value, or `None` when it is unset.
    env: &'a dyn Fn(&str) -> Option<String>,
}

/// One option's value and where it came from, so that an error names the flag or the
/// variable to fix.
struct Given {
    /// The raw value, never empty.
    value: String,
    /// `--flag` or `VARIABLE`.
    origin: &'static str,
    /// Whether an error may quote the value.
    echo: Echo,
}

impl Lookup<'_> {
    /// The variable's value, when set and not empty. Errors won't quote it unless the caller
    /// says it can't hold a secret ([`Given::shown`]): most such variables are credentials.
    fn var(&self, name: &'static str) -> Option<Given> {
        (self.env)(name)
            .filter(|value| !value.is_empty())
            .map(|value| Given {
                value,
                origin: name,
                echo: Echo::Hidden,
            })
    }

    /// The first of `names` that is set: for values with a proxy-specific and a generic variable.
    fn first_var(&self, names: &[&'static str]) -> Option<Given> {
        names.iter().find_map(|name| self.var(name))
    }

    /// The flag's value when given, else the variable's: the flag wins.
    fn get(&self, flag: &Option<String>, opt: Opt) -> Option<Given> {
        match flag.as_deref() {
            Some(value) if !value.is_empty() => Some(Given {
                value: value.to_string(),
                origin: opt.flag,
                echo: opt.echo,
            }),
            _ => self.var(opt.var).map(|given| Given {
                echo: opt.echo,
                ..given
            }),
        }
    }

    /// The option parsed with `parse`, `None` when not given; see [`Given::parse`].
    fn parse<T>(
        &self,
        flag: &Option<String>,
        opt: Opt,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, ConfigError> {
        self.get(flag, opt)
            .map(|given| given.parse(parse, expected))
            .transpose()
    }

    /// The option as a duration, `None` when not given.
    fn duration(&self, flag: &Option<String>, opt: Opt) -> Result<Option<Duration>, ConfigError> {
        self.parse(flag, opt, parse_duration, DURATION_FORMAT)
    }
}

impl Given {
    /// The same value, marked as one that can't hold a secret (for a variable without a flag,
    /// such as `AZURE_REDIS_PORT`), so that errors quote it.
    fn shown(self) -> Given {
        Given {
            echo: Echo::Shown,
            ..self
        }
    }

    /// Parses the (trimmed) value, or says which option holds what and what was expected.
    fn parse<T>(
        &self,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        parse(self.value.trim())
            .ok_or_else(|| ConfigError(format!("{}: expected {expected}", self.invalid())))
    }

    /// Like [`Given::parse`], for parsers that can say why the value is wrong. `why` must not
    /// quote the value.
    fn parse_or_explain<T>(
        &self,
        parse: impl FnOnce(&str) -> Result<T, &'static str>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        parse(self.value.trim())
            .map_err(|why| ConfigError(format!("{}: {why}; expected {expected}", self.invalid())))
    }

    /// `invalid --flag 'value'`, or without the value when it may hold a secret.
    fn invalid(&self) -> String {
        match self.echo {
            Echo::Shown => format!("invalid {} '{}'", self.origin, self.value),
            Echo::Hidden => format!(
                "invalid {} (its value is not shown, as it may hold a secret)",
                self.origin
            ),
        }
    }

    /// The value as a path.
    fn path(&self) -> PathBuf {
        PathBuf::from(&self.value)
    }
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, in any case (Service Connector writes `True`).
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// `3m`, `30s`, `500ms`, `0s`, `1h 30m`.
fn parse_duration(value: &str) -> Option<Duration> {
    humantime::parse_duration(value).ok()
}

/// A duration that is not zero (a zero timeout would fail every attempt).
fn parse_positive_duration(value: &str) -> Option<Duration> {
    parse_duration(value).filter(|duration| !duration.is_zero())
}

/// A fraction strictly between 0 and 1.
fn parse_fraction(value: &str) -> Option<f64> {
    value
        .parse::<f64>()
        .ok()
        .filter(|fraction| *fraction > 0.0 && *fraction < 1.0)
}

/// A non-negative integer.
fn parse_number<T: std::str::FromStr>(value: &str) -> Option<T> {
    value.parse().ok()
}

/// A parser of a number within `range` (the bounds of a count option).
fn number_in(range: std::ops::RangeInclusive<usize>) -> impl Fn(&str) -> Option<usize> {
    move |value| parse_number(value).filter(|n| range.contains(n))
}

/// A port that can be dialled: 1-65535.
fn parse_port(value: &str) -> Option<u16> {
    value.parse().ok().filter(|port| *port != 0)
}

/// `text` or `json`.
fn parse_log_format(value: &str) -> Option<LogFormat> {
    match value.to_ascii_lowercase().as_str() {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        _ => None,
    }
}

/// `host`, `host:port`, `[ipv6]`, `[ipv6]:port` or a bare IPv6 address. The reasons it gives
/// never quote the input, because connection strings use it too.
pub(crate) fn parse_host_port(value: &str) -> Result<(String, Option<u16>), &'static str> {
    if value.contains("://") {
        return Err("that is a URL (give rediss:// URLs with --connection-string)");
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("'[' without ']'")?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address between [ ]")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("junk after ']'")?)),
        }
    } else if value.matches(':').count() > 1 {
        value
            .parse::<Ipv6Addr>()
            .map_err(|_| "not an IPv6 address (write [address]:port)")?;
        (value, None)
    } else {
        match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || "/@,[]".contains(c)) {
        return Err("not a host name or IP address");
    }
    let port = port
        .map(|port| {
            port.parse::<u16>()
                .map_err(|_| "the port is not a number 0-65535")
        })
        .transpose()?;
    Ok((host.to_string(), port))
}

/// `host:port`, with an IPv6 literal in brackets.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// ---------------------------------------------------------------------------------------------
// From options to a Config.
// ---------------------------------------------------------------------------------------------

/// Resolves the proxy's options against the environment and validates them.
fn resolve(args: ProxyArgs, lookup: &Lookup) -> Result<Config, ConfigError> {
    let ProxyArgs {
        upstream: up,
        auth: au,
        clients,
        cluster,
        ops,
    } = args;
    let mut warnings = Vec::new();
    let cs_given = lookup.get(&up.connection_string, CONNECTION_STRING);
    let cs = match &cs_given {
        Some(given) => connection_string(given, &mut warnings)?,
        None => ConnectionString::default(),
    };
    let (upstream_host, upstream_port) = upstream(&up.upstream, lookup, &cs)?;
    let tls_given = lookup.get(&up.tls, TLS);
    let tls = tls_given
        .as_ref()
        .map(|given| given.parse(parse_bool, "true or false"))
        .transpose()?
        .or(cs.tls)
        .unwrap_or(true);
    let tls_server_name = tls_server_name(&up.tls_server_name, lookup, &cs, &upstream_host)?;
    let redis_username = lookup
        .get(&au.redis_username, REDIS_USERNAME)
        .map(|given| given.value)
        .or_else(|| cs.user.clone());
    let auth = auth(&au, lookup, cs.password, redis_username.clone())?;
    let insecure = lookup
        .parse(
            &up.insecure_entra_over_plaintext,
            INSECURE_ENTRA_OVER_PLAINTEXT,
            parse_bool,
            "true or false",
        )?
        .unwrap_or(false);
    if !tls {
        let turned_off_by = match (&tls_given, &cs_given) {
            (Some(given), _) if given.origin.starts_with("--") => {
                format!("{} {}", given.origin, given.value)
            }
            (Some(given), _) => format!("{}={}", given.origin, given.value),
            (None, Some(given)) => {
                format!(
                    "a redis:// or ssl=False connection string in {}",
                    given.origin
                )
            }
            (None, None) => "--tls false".to_string(),
        };
        warnings.push(plaintext_warning(&turned_off_by, &auth, insecure)?);
    }
    let listen = listen(&clients.listen, lookup)?;
    let listen_password = lookup
        .get(&clients.listen_password, LISTEN_PASSWORD)
        .map(|given| Secret::new(given.value));
    if listen_password.is_none() && !is_loopback(&listen) {
        warnings.push(format!(
            "listening on {listen} without --listen-password: anyone who can reach it uses the \
             proxy's credentials (listen on 127.0.0.1 or set --listen-password)"
        ));
    }
    let count = "a number of connections such as 0 or 4";
    let admin = admin_listen(&ops.admin_listen, lookup)?;
    let control = control_listen(&ops.control_listen, lookup, admin.as_deref())?;
    let database = lookup
        .parse(
            &up.database,
            DATABASE,
            parse_number,
            "a database number such as 0",
        )?
        .or(cs.database)
        .unwrap_or(0);
    let cluster = cluster_config(
        &cluster,
        lookup,
        &listen,
        &[admin.as_deref(), control.address()],
        database,
        &mut warnings,
    )?;
    let multiplex = lookup
        .parse(
            &clients.multiplex,
            MULTIPLEX,
            number_in(0..=MAX_MULTIPLEX),
            "a number of shared connections from 0 (off) to 64",
        )?
        .unwrap_or(0);
    let multiplex_reply_mib = lookup.parse(
        &clients.multiplex_reply_mib,
        MULTIPLEX_REPLY_MIB,
        number_in(1..=MAX_MULTIPLEX_REPLY_MIB),
        "a number of MiB from 1 to 1048576",
    )?;
    if multiplex == 0 && multiplex_reply_mib.is_some() {
        // Harmless, but a sign the operator expected multiplexing to be on.
        warnings.push(
            "--multiplex-reply-mib has no effect without --multiplex: every client has an \
             upstream connection of its own, where its unread replies wait"
                .to_string(),
        );
    }
    let multiplex_reply_mib = multiplex_reply_mib.unwrap_or(DEFAULT_MULTIPLEX_REPLY_MIB);
    let warm = lookup.parse(
        &clients.warm_connections,
        WARM_CONNECTIONS,
        parse_number,
        count,
    )?;
    if multiplex > 0 && cluster.mode != ClusterMode::Off {
        return Err(ConfigError(
            "--multiplex needs --cluster off: the cluster mode relays every client 1:1 \
             (set --cluster off for a cache that is not OSS-clustered)"
                .to_string(),
        ));
    }
    Ok(Config {
        tls_server_name,
        upstream_host,
        upstream_port,
        tls,
        ca_file: ca_file(&up.ca_file, CA_FILE, lookup)?,
        token_ca_file: ca_file(&au.token_ca_file, TOKEN_CA_FILE, lookup)?,
        database,
        auth,
        scope: lookup
            .get(&au.scope, SCOPE)
            .map_or_else(|| DEFAULT_SCOPE.to_string(), |given| given.value),
        token_refresh_at: lookup
            .parse(
                &au.token_refresh_at,
                TOKEN_REFRESH_AT,
                parse_fraction,
                "a fraction between 0 and 1 (exclusive), such as 0.75",
            )?
            .unwrap_or(DEFAULT_TOKEN_REFRESH_AT),
        reauth_margin: lookup
            .duration(&au.reauth_margin, REAUTH_MARGIN)?
            .unwrap_or(DEFAULT_REAUTH_MARGIN),
        redis_username,
        listen,
        listen_password,
        max_connections: lookup
            .parse(
                &clients.max_connections,
                MAX_CONNECTIONS,
                parse_number,
                count,
            )?
            .unwrap_or(0),
        // With --multiplex, a client that is pinned takes a ready connection: its first
        // command then reaches the server before other clients' later ones (a connect would let
        // them overtake it) and no SELECT runs at that moment. Unless asked for, that pool
        // waits for the first pin (an application that never pins keeps N connections).
        warm_connections: warm.unwrap_or(multiplex),
        warm_after_first_pin: multiplex > 0 && warm.is_none(),
        control_listen: control,
        admin_listen: admin,
        shutdown_delay: lookup
            .duration(&ops.shutdown_delay, SHUTDOWN_DELAY)?
            .unwrap_or(Duration::ZERO),
        shutdown_grace: lookup
            .duration(&ops.shutdown_grace, SHUTDOWN_GRACE)?
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        log_format: lookup
            .parse(
                &ops.log_format,
                LOG_FORMAT,
                parse_log_format,
                "text or json",
            )?
            .unwrap_or(LogFormat::Text),
        connect_timeout: lookup
            .parse(
                &up.connect_timeout,
                CONNECT_TIMEOUT,
                parse_positive_duration,
                "a duration above zero such as 10s",
            )?
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        cluster,
        multiplex,
        multiplex_reply_limit: multiplex_reply_mib.saturating_mul(1024 * 1024),
        warnings,
    })
}

/// The cluster options, checked against where the proxy listens: node listeners go on
/// `--listen`'s IP, so a unix socket can't serve a cluster; their ports must not be anyone
/// else's; and a cluster has database 0 only.
fn cluster_config(
    args: &ClusterArgs,
    lookup: &Lookup,
    listen: &ListenAddr,
    others: &[Option<&str>],
    database: u32,
    warnings: &mut Vec<String>,
) -> Result<ClusterConfig, ConfigError> {
    let mode_given = lookup.get(&args.cluster, CLUSTER);
    let mut mode = mode_given
        .as_ref()
        .map(|given| given.parse(parse_cluster_mode, "auto, on or off"))
        .transpose()?
        .unwrap_or(ClusterMode::Auto);
    let max_nodes = lookup
        .parse(
            &args.cluster_max_nodes,
            CLUSTER_MAX_NODES,
            number_in(1..=MAX_CLUSTER_NODES),
            "a number of nodes from 1 to 1000",
        )?
        .unwrap_or(DEFAULT_CLUSTER_MAX_NODES);
    let refresh = lookup
        .parse(
            &args.cluster_refresh,
            CLUSTER_REFRESH,
            |v| parse_duration(v).filter(|d| *d >= Duration::from_millis(100)),
            "a duration of at least 100ms such as 10s",
        )?
        .unwrap_or(DEFAULT_CLUSTER_REFRESH);
    let listen_port = match listen {
        ListenAddr::Tcp(addr) => parse_host_port(addr).ok().and_then(|(_, port)| port),
        ListenAddr::Unix(_) => None,
    };
    if matches!(listen, ListenAddr::Unix(_)) {
        match mode {
            ClusterMode::On => {
                return Err(ConfigError(
                    "--cluster on needs a TCP --listen address: cluster clients reach every \
                     node at host:port, which a unix socket can't give them"
                        .to_string(),
                ));
            }
            ClusterMode::Auto => mode = ClusterMode::Off,
            ClusterMode::Off => {}
        }
    }
    if database != 0 {
        match mode {
            ClusterMode::On => {
                return Err(ConfigError(format!(
                    "--cluster on with database {database}: a Redis Cluster has database 0 \
                     only; remove --database (or defaultDatabase) or use --cluster off"
                )));
            }
            ClusterMode::Auto => mode = ClusterMode::Off,
            ClusterMode::Off => {}
        }
    }
    let ports_given = lookup.get(&args.cluster_ports, CLUSTER_PORTS);
    let ports = match (&ports_given, listen_port) {
        (Some(given), _) => {
            let (start, end) = given.parse(
                parse_port_range,
                "START-END with ports 1-65535, e.g. 6380-6479",
            )?;
            ClusterPorts::Range(start, end)
        }
        (None, Some(0)) => ClusterPorts::Ephemeral,
        (None, Some(port)) => {
            let last = usize::from(port) + max_nodes;
            if mode != ClusterMode::Off && last > usize::from(u16::MAX) {
                return Err(ConfigError(format!(
                    "--listen port {port} leaves no room for {max_nodes} node ports after it: \
                     set --cluster-ports START-END"
                )));
            }
            ClusterPorts::Range(
                port.saturating_add(1),
                u16::try_from(last).unwrap_or(u16::MAX),
            )
        }
        (None, None) => ClusterPorts::Ephemeral,
    };
    if let (ClusterPorts::Range(start, end), true) = (ports, mode != ClusterMode::Off) {
        let clashes = std::iter::once(listen_port)
            .chain(others.iter().map(|addr| {
                addr.and_then(|a| parse_host_port(a).ok())
                    .and_then(|(_, port)| port)
            }))
            .flatten()
            .find(|port| (start..=end).contains(port));
        if let Some(port) = clashes {
            let from = ports_given.as_ref().map_or(
                "--cluster-ports (by default the ports after --listen's)",
                |g| g.origin,
            );
            return Err(ConfigError(format!(
                "{from} {start}-{end} holds port {port}, which --listen, --admin-listen or \
                     --control-listen already uses: give the node listeners a range of their own"
            )));
        }
    }
    if mode == ClusterMode::Auto && matches!(listen, ListenAddr::Unix(_)) {
        warnings.push("cluster mode is off: --listen is a unix socket".to_string());
    }
    Ok(ClusterConfig {
        mode,
        ports,
        max_nodes,
        refresh,
    })
}

impl ClusterConfig {
    /// `cluster_ports=… cluster_max_nodes=…`, for the log.
    pub fn describe(&self) -> String {
        let ports = match self.ports {
            ClusterPorts::Range(start, end) => format!("{start}-{end}"),
            ClusterPorts::Ephemeral => "ephemeral".to_string(),
        };
        format!("cluster_ports={ports} cluster_max_nodes={}", self.max_nodes)
    }
}

/// `auto`, `on` or `off` (also `true`/`false`).
fn parse_cluster_mode(value: &str) -> Option<ClusterMode> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Some(ClusterMode::Auto),
        "on" | "true" | "yes" => Some(ClusterMode::On),
        "off" | "false" | "no" => Some(ClusterMode::Off),
        _ => None,
    }
}

/// `START-END`, both dialable ports, `START <= END`.
fn parse_port_range(value: &str) -> Option<(u16, u16)> {
    let (start, end) = value.split_once('-')?;
    let (start, end) = (parse_port(start.trim())?, parse_port(end.trim())?);
    (start <= end).then_some((start, end))
}

/// Host and port of the cache. `--upstream`/`AZURE_REDIS_HOST` replaces the connection
/// string's endpoint as a whole; the port is then the one it names, else `AZURE_REDIS_PORT`,
/// else 6380. With the connection string's host, `AZURE_REDIS_PORT` still beats its port.
fn upstream(
    flag: &Option<String>,
    lookup: &Lookup,
    cs: &ConnectionString,
) -> Result<(String, u16), ConfigError> {
    let (host, own_port, fallback_port) = match (lookup.get(flag, UPSTREAM), &cs.host) {
        (Some(given), _) => {
            let (host, port) = given.parse_or_explain(
                parse_upstream,
                "HOST[:PORT], e.g. mycache.redis.cache.windows.net:6380",
            )?;
            (host, port, None)
        }
        (None, Some(host)) => (host.clone(), None, cs.port),
        (None, None) => return Err(no_upstream()),
    };
    let env_port = lookup
        .var("AZURE_REDIS_PORT")
        .map(|given| {
            given
                .shown()
                .parse(parse_port, "a port number 1-65535, e.g. 6380")
        })
        .transpose()?;
    let port = own_port
        .or(env_port)
        .or(fallback_port)
        .unwrap_or(DEFAULT_PORT);
    Ok((host, port))
}

/// The warning for a plaintext upstream (TLS turned off by `turned_off_by`), or the error when
/// that would send Entra tokens in clear text without `--insecure-entra-over-plaintext`: anyone
/// on the path could read a token and use it until it expires, so the spec wants the user to
/// say so with a flag whose name says it is insecure. An access key over plaintext is only
/// warned about, as `--tls false` is already explicit.
fn plaintext_warning(
    turned_off_by: &str,
    auth: &AuthConfig,
    insecure_entra: bool,
) -> Result<String, ConfigError> {
    let off = format!("TLS to the upstream is off ({turned_off_by})");
    match auth {
        AuthConfig::Entra(_) if !insecure_entra => Err(ConfigError(format!(
            "{off}, so the Entra token would travel in clear text: turn TLS on, or accept that \
             risk with --insecure-entra-over-plaintext (REDIS_PROXY_INSECURE_ENTRA_OVER_PLAINTEXT\
             =true)"
        ))),
        AuthConfig::Entra(_) => Ok(format!(
            "{off} and --insecure-entra-over-plaintext is set: Entra tokens travel in clear text, \
             and whoever reads one can use it until it expires"
        )),
        AuthConfig::AccessKey { .. } => Ok(format!("{off}: the access key travels in clear text")),
        AuthConfig::None => Ok(format!("{off}: commands and replies travel in clear text")),
    }
}

/// The error when nothing names the cache.
fn no_upstream() -> ConfigError {
    ConfigError(
        "no upstream: set --upstream HOST[:PORT] or AZURE_REDIS_HOST, or a connection string \
         (--connection-string or AZURE_REDIS_CONNECTIONSTRING)"
            .to_string(),
    )
}

/// An upstream `HOST[:PORT]`: port 0 can't be dialled. A value with `,` or `=` is a
/// connection string given to the wrong option (Service Connector's `AZURE_REDIS_HOST` never has
/// one), so the reason says where it belongs.
fn parse_upstream(value: &str) -> Result<(String, Option<u16>), &'static str> {
    if value.contains([',', '=']) {
        return Err(
            "that looks like a connection string (give it with --connection-string or \
                    AZURE_REDIS_CONNECTIONSTRING)",
        );
    }
    match parse_host_port(value)? {
        (_, Some(0)) => Err("port 0 can't be dialled"),
        endpoint => Ok(endpoint),
    }
}

/// SNI and certificate name: the option, else the connection string's `sslHost`, else the host.
fn tls_server_name(
    flag: &Option<String>,
    lookup: &Lookup,
    cs: &ConnectionString,
    upstream_host: &str,
) -> Result<String, ConfigError> {
    match lookup.get(flag, TLS_SERVER_NAME) {
        Some(given) => given.parse(
            |name| {
                rustls_pki_types::ServerName::try_from(name)
                    .ok()
                    .map(|_| name.to_string())
            },
            "a DNS name or IP address, e.g. mycache.redis.cache.windows.net",
        ),
        None => Ok(cs
            .tls_server_name
            .clone()
            .unwrap_or_else(|| upstream_host.to_string())),
    }
}

/// An extra CA file (`--ca-file` or `--token-ca-file`), read once now so that a wrong path
/// fails at startup, not at first use.
fn ca_file(
    flag: &Option<String>,
    opt: Opt,
    lookup: &Lookup,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(given) = lookup.get(flag, opt) else {
        return Ok(None);
    };
    let path = given.path();
    std::fs::read(&path).map_err(|err| {
        ConfigError(format!(
            "cannot read {} {}: {err}; give a readable PEM file of CA certificates",
            given.origin,
            path.display()
        ))
    })?;
    Ok(Some(path))
}

/// `--listen`: `host:port` or `unix:/path`.
fn listen(flag: &Option<String>, lookup: &Lookup) -> Result<ListenAddr, ConfigError> {
    let Some(given) = lookup.get(flag, LISTEN) else {
        return Ok(ListenAddr::Tcp(DEFAULT_LISTEN.to_string()));
    };
    let expected = "host:port or unix:/path, e.g. 127.0.0.1:6379";
    match given.value.trim().strip_prefix("unix:") {
        Some(path) => given.parse(
            |_| (!path.is_empty()).then(|| ListenAddr::Unix(PathBuf::from(path))),
            expected,
        ),
        None => given
            .parse_or_explain(parse_bind_address, expected)
            .map(ListenAddr::Tcp),
    }
}

/// `--admin-listen` of the proxy: `host:port`, or `off`.
fn admin_listen(flag: &Option<String>, lookup: &Lookup) -> Result<Option<String>, ConfigError> {
    let Some(given) = lookup.get(flag, ADMIN_LISTEN) else {
        return Ok(Some(DEFAULT_ADMIN_LISTEN.to_string()));
    };
    if given.value.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    given
        .parse_or_explain(parse_bind_address, "host:port or off, e.g. 127.0.0.1:9090")
        .map(Some)
}

/// The admin endpoint that `wait` and `shutdown` talk to; they need one, so `off` is an error.
fn admin_endpoint(args: &AdminArgs, lookup: &Lookup) -> Result<String, ConfigError> {
    let admin = admin_listen(&args.admin_listen, lookup)?;
    admin.ok_or_else(|| {
        ConfigError(
            "the admin endpoint is off, but this subcommand talks to it: set --admin-listen \
             (or REDIS_PROXY_ADMIN_LISTEN) to the proxy's admin address, e.g. 127.0.0.1:9090"
                .to_string(),
        )
    })
}

/// `--control-listen`: `auto` (the default), `off`, or a loopback `host:port`. `auto` is the
/// admin listener itself when that is on loopback (nothing else to open: the default
/// `127.0.0.1:9090` on a developer machine), else `127.0.0.1:<admin port + 1>` (a pod, whose
/// admin port must listen on the pod IP for the kubelet), and off when the admin endpoint is.
fn control_listen(
    flag: &Option<String>,
    lookup: &Lookup,
    admin: Option<&str>,
) -> Result<ControlListen, ConfigError> {
    let given = lookup.get(flag, CONTROL_LISTEN);
    let value = given.as_ref().map(|given| given.value.trim());
    if value.is_some_and(|v| v.eq_ignore_ascii_case("off")) {
        return Ok(ControlListen::Off);
    }
    let Some(given) = given.filter(|g| !g.value.trim().eq_ignore_ascii_case("auto")) else {
        let Some(admin) = admin else {
            return Ok(ControlListen::Off);
        };
        if is_loopback(&ListenAddr::Tcp(admin.to_string())) {
            return Ok(ControlListen::OnAdmin);
        }
        return match parse_host_port(admin) {
            Ok((_, Some(0))) => Ok(ControlListen::Separate("127.0.0.1:0".into())),
            Ok((_, Some(port))) if port < u16::MAX => {
                Ok(ControlListen::Separate(format!("127.0.0.1:{}", port + 1)))
            }
            _ => Err(ConfigError(format!(
                "--admin-listen {admin} leaves no port for the control endpoint (the next \
                 one): set --control-listen (or REDIS_PROXY_CONTROL_LISTEN) to a loopback \
                 address, e.g. 127.0.0.1:9091"
            ))),
        };
    };
    let addr = given.parse_or_explain(
        parse_bind_address,
        "a loopback host:port, auto or off, e.g. 127.0.0.1:9091",
    )?;
    if !is_loopback(&ListenAddr::Tcp(addr.clone())) {
        return Err(ConfigError(format!(
            "invalid {} '{}': the control endpoint stops the proxy, so it listens on loopback \
             only (what the pod network can reach could stop it): use e.g. 127.0.0.1:9091",
            given.origin, given.value
        )));
    }
    Ok(if admin == Some(addr.as_str()) {
        ControlListen::OnAdmin
    } else {
        ControlListen::Separate(addr)
    })
}

/// The control endpoint that `shutdown` talks to, resolved as the proxy resolves it from the
/// same options, so the same variables serve both; `off` is an error.
fn control_endpoint(args: &ShutdownArgs, lookup: &Lookup) -> Result<String, ConfigError> {
    let admin = admin_listen(&args.admin.admin_listen, lookup)?;
    match control_listen(&args.control_listen, lookup, admin.as_deref())? {
        ControlListen::Separate(addr) => Ok(addr),
        ControlListen::OnAdmin => Ok(admin.unwrap_or_default()),
        ControlListen::Off => Err(ConfigError(
            "the control endpoint is off, but shutdown talks to it: set --control-listen (or \
             REDIS_PROXY_CONTROL_LISTEN) to the proxy's control address, e.g. 127.0.0.1:9091, \
             or --admin-listen to its admin address"
                .to_string(),
        )),
    }
}

/// A `host:port` to bind (port 0 picks a free port), normalised with IPv6 in brackets.
pub(crate) fn parse_bind_address(value: &str) -> Result<String, &'static str> {
    match parse_host_port(value)? {
        (host, Some(port)) => Ok(join_host_port(&host, port)),
        (_, None) => Err("no port"),
    }
}

/// True when only this machine can reach the listener (a unix socket, localhost, 127.0.0.0/8,
/// `::1`): the proxy's credentials are then not open to the network.
pub(crate) fn is_loopback(listen: &ListenAddr) -> bool {
    let ListenAddr::Tcp(addr) = listen else {
        return true;
    };
    match parse_host_port(addr) {
        Ok((host, _)) => {
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The injector.
// ---------------------------------------------------------------------------------------------

/// Resolves `injector`'s options. The certificate files must be given here and are loaded by
/// the injector itself (so a rotation is a reload, not a restart); the defaults file is read
/// and validated now, so a bad chart value stops the injector with one line at start-up.
fn injector(args: InjectorArgs, lookup: &Lookup) -> Result<InjectorConfig, ConfigError> {
    let listen = match lookup.get(&args.listen, INJECTOR_LISTEN) {
        Some(given) => {
            given.parse_or_explain(parse_bind_address, "host:port, e.g. 0.0.0.0:8443")?
        }
        None => DEFAULT_INJECTOR_LISTEN.to_string(),
    };
    let required = |flag: &Option<String>, opt: Opt, what: &str| {
        lookup
            .get(flag, opt)
            .map(|given| given.path())
            .ok_or_else(|| {
                ConfigError(format!(
                    "no {what}: set {} PATH (or {}) to a PEM file, e.g. the tls.crt/tls.key of \
                 the Secret cert-manager writes",
                    opt.flag, opt.var
                ))
            })
    };
    let tls_cert_file = required(
        &args.tls_cert_file,
        INJECTOR_TLS_CERT_FILE,
        "TLS certificate",
    )?;
    let tls_key_file = required(&args.tls_key_file, INJECTOR_TLS_KEY_FILE, "TLS private key")?;
    let defaults = match lookup.get(&args.defaults_file, INJECTOR_DEFAULTS_FILE) {
        Some(given) => injector_defaults(&given)?,
        None => sidecar::Options::default(),
    };
    let log_format = lookup
        .parse(
            &args.log_format,
            LOG_FORMAT,
            parse_log_format,
            "text or json",
        )?
        .unwrap_or(LogFormat::Text);
    Ok(InjectorConfig {
        listen,
        tls_cert_file,
        tls_key_file,
        defaults,
        log_format,
    })
}

/// Reads and validates the injector's defaults file.
fn injector_defaults(given: &Given) -> Result<sidecar::Options, ConfigError> {
    let text = std::fs::read_to_string(given.path()).map_err(|err| {
        ConfigError(format!(
            "cannot read {} {}: {err}",
            given.origin, given.value
        ))
    })?;
    // The reason quotes the offending field's value (the injector's messages do, for pod
    // annotations). Someone may have put a connection string with an access key in the
    // chart's `upstream`: scrubbed, so that a key-shaped word doesn't reach the log.
    sidecar::Options::from_defaults_json(&text).map_err(|why| {
        ConfigError(format!(
            "invalid {} {}: {}",
            given.origin,
            given.value,
            crate::credential::scrub::scrub(&why)
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Connection strings.
// ---------------------------------------------------------------------------------------------

/// What a connection string said. Every field is optional: flags and variables override it.
#[derive(Debug, Default)]
struct ConnectionString {
    /// The endpoint's host.
    host: Option<String>,
    /// The endpoint's port.
    port: Option<u16>,
    /// `user` / the URL's user.
    user: Option<String>,
    /// `password` / the URL's password: an access key.
    password: Option<Secret>,
    /// `ssl` / `rediss://` (true) or `redis://` (false).
    tls: Option<bool>,
    /// `defaultDatabase` / the URL's path.
    database: Option<u32>,
    /// `sslHost`.
    tls_server_name: Option<String>,
}

/// StackExchange.Redis options that only make sense inside the application's own client; the
/// proxy ignores them without a warning.
const CLIENT_SIDE_KEYS: &[&str] = &[
    "abortconnect",
    "allowadmin",
    "asynctimeout",
    "channelprefix",
    "checkcertificaterevocation",
    "configcheckseconds",
    "configchannel",
    "connectretry",
    "connecttimeout",
    "heartbeatinterval",
    "highprioritysocketthreads",
    "keepalive",
    "name",
    "protocol",
    "proxy",
    "resolvedns",
    "responsetimeout",
    "servicename",
    "setlib",
    "sslprotocols",
    "synctimeout",
    "tiebreaker",
    "version",
];

/// Parses either connection-string form. An error never quotes the string: a malformed one
/// may split its password anywhere.
fn connection_string(
    given: &Given,
    warnings: &mut Vec<String>,
) -> Result<ConnectionString, ConfigError> {
    let value = given.value.trim();
    let lower = value.to_ascii_lowercase();
    let parsed = if lower.starts_with("redis://") || lower.starts_with("rediss://") {
        parse_url_form(value, warnings)
    } else if lower.contains("://") {
        Err("the scheme is not redis:// or rediss://".to_string())
    } else {
        parse_stackexchange_form(value, warnings)
    };
    parsed.map_err(|problem| {
        ConfigError(format!(
            "malformed connection string in {}: {problem}; {CONNECTION_STRING_FORMS}",
            given.origin
        ))
    })
}

/// `rediss://[user][:password]@host:port[/db]` (`redis://`: TLS off). User and password are
/// percent-decoded.
fn parse_url_form(value: &str, warnings: &mut Vec<String>) -> Result<ConnectionString, String> {
    let url = url::Url::parse(value).map_err(|err| {
        format!("{err} (percent-encode characters such as @ : / # in the user or password)")
    })?;
    let host = match url.host() {
        Some(url::Host::Ipv6(address)) => address.to_string(),
        Some(host) => host.to_string(),
        None => String::new(),
    };
    if host.is_empty() {
        return Err("no host".to_string());
    }
    if url.port() == Some(0) {
        return Err("port 0 can't be dialled".to_string());
    }
    let database = match url.path().strip_prefix('/').unwrap_or(url.path()) {
        "" => None,
        db => Some(
            db.parse()
                .map_err(|_| "the path after the host must be a database number, e.g. /0")?,
        ),
    };
    if url.query().is_some() {
        // Neither names nor values: an unencoded '?' in the password starts the query.
        warnings.push(
            "ignoring the query part (after '?') of the connection-string URL: the proxy reads \
             no parameters there"
                .to_string(),
        );
    }
    Ok(ConnectionString {
        host: Some(host),
        port: url.port(),
        user: percent_decode(url.username(), "user")?,
        password: percent_decode(url.password().unwrap_or(""), "password")?.map(Secret::new),
        tls: Some(url.scheme() == "rediss"),
        database,
        tls_server_name: None,
    })
}

/// Percent-decodes a URL's user or password; `None` when empty.
fn percent_decode(value: &str, what: &str) -> Result<Option<String>, String> {
    let decoded = percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .map_err(|_| format!("the {what} is not UTF-8 once percent-decoded"))?;
    Ok((!decoded.is_empty()).then(|| decoded.into_owned()))
}

/// StackExchange.Redis: `host:port,password=…,ssl=True,defaultDatabase=0,user=…`; keys in any
/// case, unknown keys ignored with a warning.
///
/// The `host:port` must come first, as Azure writes it. A password that contains `,` is split
/// into items here, and the piece after a comma would otherwise become the host (printed in
/// every log line and error about the upstream) or an unknown key: so an item without `=`
/// after the first is an error, and unknown keys are counted by position, never named.
fn parse_stackexchange_form(
    value: &str,
    warnings: &mut Vec<String>,
) -> Result<ConnectionString, String> {
    let mut cs = ConnectionString::default();
    let mut items = value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty());
    let endpoint = items
        .next()
        .filter(|item| !item.contains('='))
        .ok_or("no host:port before the first comma")?;
    let (host, port) = parse_upstream(endpoint).map_err(|why| format!("bad host:port ({why})"))?;
    cs.host = Some(host);
    cs.port = port;
    for (index, item) in items.enumerate() {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!(
                "item {} has no '=' (only the first item is a host:port, the proxy connects \
                 to one cache; a password can't contain ',' in this form: use the URL form with \
                 the password percent-encoded)",
                index + 2
            ));
        };
        set_key(&mut cs, key.trim(), value.trim(), warnings, index + 2)?;
    }
    Ok(cs)
}

/// One `key=value` of the StackExchange.Redis form, item number `position` (from 1).
fn set_key(
    cs: &mut ConnectionString,
    key: &str,
    value: &str,
    warnings: &mut Vec<String>,
    position: usize,
) -> Result<(), String> {
    let non_empty = || (!value.is_empty()).then(|| value.to_string());
    match key.to_ascii_lowercase().as_str() {
        "password" => cs.password = non_empty().map(Secret::new),
        "user" | "username" => cs.user = non_empty(),
        "ssl" => cs.tls = Some(parse_bool(value).ok_or("ssl must be true or false")?),
        "defaultdatabase" => {
            cs.database = Some(
                value
                    .parse()
                    .map_err(|_| "defaultDatabase must be a number such as 0")?,
            )
        }
        "sslhost" => {
            cs.tls_server_name = non_empty();
            if let Some(name) = &cs.tls_server_name {
                // Checked now, so that no later error quotes it.
                rustls_pki_types::ServerName::try_from(name.as_str())
                    .map_err(|_| "sslHost must be a DNS name or IP address")?;
            }
        }
        known if CLIENT_SIDE_KEYS.contains(&known) => {}
        // Not named: after a password with ',' in it, the "key" is a piece of the password.
        _ => warnings.push(format!(
            "ignoring item {position} of the connection string: not a key the proxy reads \
             (password, user, ssl, defaultDatabase, sslHost) nor a client-side option; the key \
             is not shown, since a password with ',' in it would be split into such items"
        )),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Authentication and credentials.
// ---------------------------------------------------------------------------------------------

/// `--auth`, before `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthMode {
    /// An access key when one is given, else Entra.
    Auto,
    /// Entra tokens.
    Entra,
    /// An access key.
    AccessKey,
    /// No `AUTH`.
    None,
}

/// `--credential`, before `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CredentialKind {
    /// Picked from the environment by [`auto_credential_kind`].
    Auto,
    /// See [`CredentialConfig::WorkloadIdentity`].
    WorkloadIdentity,
    /// See [`CredentialConfig::ManagedIdentity`].
    ManagedIdentity,
    /// See [`CredentialConfig::ClientSecret`].
    ClientSecret,
    /// See [`CredentialConfig::AzureCli`].
    AzureCli,
}

/// `auto`, `entra`, `access-key` or `none`, in any case.
fn parse_auth_mode(value: &str) -> Option<AuthMode> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Some(AuthMode::Auto),
        "entra" => Some(AuthMode::Entra),
        "access-key" => Some(AuthMode::AccessKey),
        "none" => Some(AuthMode::None),
        _ => None,
    }
}

/// `auto`, `workload-identity`, `managed-identity`, `client-secret` or `azure-cli`, in any case.
fn parse_credential_kind(value: &str) -> Option<CredentialKind> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Some(CredentialKind::Auto),
        "workload-identity" => Some(CredentialKind::WorkloadIdentity),
        "managed-identity" => Some(CredentialKind::ManagedIdentity),
        "client-secret" => Some(CredentialKind::ClientSecret),
        "azure-cli" => Some(CredentialKind::AzureCli),
        _ => None,
    }
}

/// Resolves `--auth`: `auto` takes an access key when one is given, else Entra. Both modes are
/// parsed up front so that a typo is reported even when it would not matter.
fn auth(
    args: &AuthArgs,
    lookup: &Lookup,
    cs_password: Option<Secret>,
    username: Option<String>,
) -> Result<AuthConfig, ConfigError> {
    let modes = "auto, entra, access-key or none (the access key itself goes in \
                 AZURE_REDIS_PASSWORD or a file named by --access-key-file)";
    let mode = lookup.parse(&args.auth, AUTH, parse_auth_mode, modes)?;
    let kinds = "auto, workload-identity, managed-identity, client-secret or azure-cli (a \
                 client secret itself goes in AZURE_REDIS_CLIENTSECRET)";
    let kind = lookup.parse(&args.credential, CREDENTIAL, parse_credential_kind, kinds)?;
    let kind = kind.unwrap_or(CredentialKind::Auto);
    let key_file = lookup.get(&args.access_key_file, ACCESS_KEY_FILE);
    let access_key = |source| AuthConfig::AccessKey { source, username };
    match mode.unwrap_or(AuthMode::Auto) {
        AuthMode::None => Ok(AuthConfig::None),
        AuthMode::Entra => credential(kind, lookup).map(AuthConfig::Entra),
        AuthMode::AccessKey => match key_source(key_file, lookup, cs_password)? {
            Some(source) => Ok(access_key(source)),
            None => Err(ConfigError(
                "--auth access-key but no access key: set AZURE_REDIS_PASSWORD, \
                 --access-key-file PATH, or a password in the connection string"
                    .to_string(),
            )),
        },
        AuthMode::Auto => match key_source(key_file, lookup, cs_password)? {
            Some(source) => Ok(access_key(source)),
            None => credential(kind, lookup).map(AuthConfig::Entra),
        },
    }
}

/// The access key, if one is given: the key file (checked now), else `AZURE_REDIS_PASSWORD`,
/// else the connection string's password.
fn key_source(
    key_file: Option<Given>,
    lookup: &Lookup,
    cs_password: Option<Secret>,
) -> Result<Option<KeySource>, ConfigError> {
    if let Some(given) = key_file {
        check_key_file(&given.path(), given.origin)?;
        return Ok(Some(KeySource::File(given.path())));
    }
    if let Some(given) = lookup.var("AZURE_REDIS_PASSWORD") {
        return Ok(Some(KeySource::Inline(Secret::new(given.value))));
    }
    Ok(cs_password.map(KeySource::Inline))
}

/// Reads the key file once, so that a wrong path or an empty file fails at startup (exit 2)
/// rather than on the first client. The credential module reads it again (and on changes).
fn check_key_file(path: &Path, origin: &str) -> Result<(), ConfigError> {
    let fix = "mount the Secret there or fix the path";
    match std::fs::read_to_string(path) {
        Ok(key) if key.trim().is_empty() => Err(ConfigError(format!(
            "the access key file {} ({origin}) is empty; {fix}",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(err) => Err(ConfigError(format!(
            "cannot read the access key file {} ({origin}): {err}; {fix}",
            path.display()
        ))),
    }
}

/// What `--credential auto` picks, in the spec's order: workload identity when its token file
/// is there, else a service principal when a client secret is, else managed identity.
fn auto_credential_kind(lookup: &Lookup) -> CredentialKind {
    if lookup.var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        CredentialKind::WorkloadIdentity
    } else if lookup.var("AZURE_REDIS_CLIENTSECRET").is_some() {
        CredentialKind::ClientSecret
    } else {
        CredentialKind::ManagedIdentity
    }
}

/// The Entra credential of `kind`, with what it needs from the environment.
fn credential(kind: CredentialKind, lookup: &Lookup) -> Result<CredentialConfig, ConfigError> {
    match kind {
        CredentialKind::Auto => credential(auto_credential_kind(lookup), lookup),
        CredentialKind::WorkloadIdentity => workload_identity(lookup),
        CredentialKind::ClientSecret => client_secret(lookup),
        CredentialKind::ManagedIdentity => Ok(CredentialConfig::ManagedIdentity {
            client_id: client_id(lookup),
        }),
        CredentialKind::AzureCli => Ok(CredentialConfig::AzureCli {
            tenant_id: tenant_id(lookup),
        }),
    }
}

/// The client id: `AZURE_REDIS_CLIENTID` (Service Connector), else `AZURE_CLIENT_ID`.
fn client_id(lookup: &Lookup) -> Option<String> {
    lookup
        .first_var(&["AZURE_REDIS_CLIENTID", "AZURE_CLIENT_ID"])
        .map(|given| given.value)
}

/// The tenant id: `AZURE_REDIS_TENANTID` (Service Connector), else `AZURE_TENANT_ID`.
fn tenant_id(lookup: &Lookup) -> Option<String> {
    lookup
        .first_var(&["AZURE_REDIS_TENANTID", "AZURE_TENANT_ID"])
        .map(|given| given.value)
}

/// The Entra authority for sovereign clouds (`AZURE_AUTHORITY_HOST`).
fn authority_host(lookup: &Lookup) -> Option<String> {
    lookup.var("AZURE_AUTHORITY_HOST").map(|given| given.value)
}

/// AKS workload identity needs what its webhook injects; each missing piece is named.
fn workload_identity(lookup: &Lookup) -> Result<CredentialConfig, ConfigError> {
    let webhook = "on AKS, label the pod azure.workload.identity/use: \"true\" and give it a \
                   service account annotated with azure.workload.identity/client-id";
    let token_file = lookup.var("AZURE_FEDERATED_TOKEN_FILE").ok_or_else(|| {
        ConfigError(format!(
            "workload identity needs AZURE_FEDERATED_TOKEN_FILE: {webhook}"
        ))
    })?;
    let client_id = client_id(lookup).ok_or_else(|| {
        ConfigError(format!(
            "workload identity needs a client id: set AZURE_CLIENT_ID or AZURE_REDIS_CLIENTID \
             ({webhook})"
        ))
    })?;
    let tenant_id = tenant_id(lookup).ok_or_else(|| {
        ConfigError(format!(
            "workload identity needs a tenant id: set AZURE_TENANT_ID or AZURE_REDIS_TENANTID \
             ({webhook})"
        ))
    })?;
    Ok(CredentialConfig::WorkloadIdentity {
        client_id,
        tenant_id,
        token_file: token_file.path(),
        authority_host: authority_host(lookup),
    })
}

/// A service principal needs its tenant, its client id and its secret.
fn client_secret(lookup: &Lookup) -> Result<CredentialConfig, ConfigError> {
    let missing = |what: &str, vars: &str| {
        ConfigError(format!(
            "a service principal (--credential client-secret) needs {what}: set {vars}"
        ))
    };
    let secret = lookup
        .var("AZURE_REDIS_CLIENTSECRET")
        .ok_or_else(|| missing("a client secret", "AZURE_REDIS_CLIENTSECRET"))?;
    Ok(CredentialConfig::ClientSecret {
        tenant_id: tenant_id(lookup)
            .ok_or_else(|| missing("a tenant id", "AZURE_REDIS_TENANTID or AZURE_TENANT_ID"))?,
        client_id: client_id(lookup)
            .ok_or_else(|| missing("a client id", "AZURE_REDIS_CLIENTID or AZURE_CLIENT_ID"))?,
        secret: Secret::new(secret.value),
        authority_host: authority_host(lookup),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    /// Parses `args` (without the program name) with exactly `vars` as the environment.
    fn parse(args: &[&str], vars: &[(&str, &str)]) -> Result<Command, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let argv = std::iter::once("redis-entra-proxy")
            .chain(args.iter().copied())
            .map(String::from);
        parse_from(argv, &|name| vars.get(name).cloned())
    }

    /// The proxy's configuration, which must parse.
    fn config(args: &[&str], vars: &[(&str, &str)]) -> Config {
        match parse(args, vars) {
            Ok(Command::Run(config)) => config,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    /// The error line, which must be one line.
    fn error(args: &[&str], vars: &[(&str, &str)]) -> String {
        match parse(args, vars) {
            Err(err) => {
                let line = err.to_string();
                assert!(line.starts_with("configuration error: "), "{line}");
                assert!(!line.contains('\n'), "more than one line: {line}");
                line
            }
            Ok(command) => panic!("expected an error, got {command:?}"),
        }
    }

    /// A temporary file holding `content`.
    fn file_with(content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content.as_bytes()).unwrap();
        file
    }

    const HOST: &[(&str, &str)] = &[("AZURE_REDIS_HOST", "cache.example")];

    // --- defaults and the upstream ---------------------------------------------------------

    #[test]
    fn defaults_match_the_spec() {
        let c = config(&["--upstream", "cache.example"], &[]);
        assert_eq!(c.upstream_host, "cache.example");
        assert_eq!(c.upstream_port, 6380);
        assert!(c.tls);
        assert_eq!(c.tls_server_name, "cache.example");
        assert_eq!(c.ca_file, None);
        assert_eq!(c.token_ca_file, None);
        assert_eq!(c.database, 0);
        assert!(matches!(
            c.auth,
            AuthConfig::Entra(CredentialConfig::ManagedIdentity { client_id: None })
        ));
        assert_eq!(c.scope, "https://redis.azure.com/.default");
        assert_eq!(c.token_refresh_at, 0.75);
        assert_eq!(c.reauth_margin, Duration::from_secs(180));
        assert_eq!(c.redis_username, None);
        assert_eq!(c.listen, ListenAddr::Tcp("127.0.0.1:6379".into()));
        assert!(c.listen_password.is_none());
        assert_eq!((c.max_connections, c.warm_connections), (0, 0));
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn upstream_takes_host_and_port_from_flag_or_variables() {
        let c = config(&["--upstream", "cache.example:10000"], &[]);
        assert_eq!(
            (c.upstream_host.as_str(), c.upstream_port),
            ("cache.example", 10000)
        );
        let vars = [
            ("AZURE_REDIS_HOST", "env.example"),
            ("AZURE_REDIS_PORT", "10000"),
        ];
        let c = config(&[], &vars);
        assert_eq!(c.upstream_address(), "env.example:10000");
        // The flag wins for the host; a port it names wins over AZURE_REDIS_PORT.
        let c = config(&["--upstream", "flag.example:6390"], &vars);
        assert_eq!(c.upstream_address(), "flag.example:6390");
        let c = config(&["--upstream", "flag.example"], &vars);
        assert_eq!(c.upstream_address(), "flag.example:10000");
    }

    #[test]
    fn upstream_accepts_ipv6_literals() {
        let c = config(
            &[
                "--upstream",
                "[::1]:6380",
                "--tls",
                "false",
                "--auth",
                "none",
            ],
            &[],
        );
        assert_eq!(c.upstream_host, "::1");
        assert_eq!(c.upstream_port, 6380);
        assert_eq!(c.upstream_address(), "[::1]:6380");
        assert_eq!(
            config(&["--upstream", "::1"], &[]).upstream_address(),
            "[::1]:6380"
        );
    }

    #[test]
    fn upstream_errors_say_what_to_give() {
        let line = error(&[], &[]);
        assert!(line.contains("no upstream"), "{line}");
        assert!(line.contains("--upstream HOST[:PORT]"), "{line}");
        assert!(line.contains("AZURE_REDIS_HOST"), "{line}");
        let line = error(&["--upstream", "cache.example:http"], &[]);
        assert!(line.contains("invalid --upstream"), "{line}");
        let line = error(&["--upstream", "rediss://cache.example"], &[]);
        assert!(line.contains("--connection-string"), "{line}");
        // A URL or a connection string pasted where the host goes: never quoted.
        let line = error(&["--upstream", "rediss://:pw-secret@cache.example"], &[]);
        assert!(line.contains("that is a URL"), "{line}");
        assert!(!line.contains("pw-secret"), "{line}");
        let line = error(&[], &[("AZURE_REDIS_HOST", "h:6380,password=pw-secret")]);
        assert!(
            line.contains("invalid AZURE_REDIS_HOST (its value"),
            "{line}"
        );
        assert!(line.contains("looks like a connection string"), "{line}");
        assert!(!line.contains("pw-secret"), "{line}");
        let line = error(&["--upstream", "cache.example:0"], &[]);
        assert!(line.contains("port 0"), "{line}");
        let line = error(&[], &[("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_PORT", "x")]);
        assert!(line.contains("invalid AZURE_REDIS_PORT 'x'"), "{line}");
    }

    // --- connection strings -----------------------------------------------------------------

    #[test]
    fn url_form_with_password_database_and_percent_encoding() {
        let cs = "rediss://:p%40ss%3Aw%2Fd@cache.example:6380/2";
        let c = config(&["--connection-string", cs], &[]);
        assert_eq!(c.upstream_address(), "cache.example:6380");
        assert!(c.tls);
        assert_eq!(c.database, 2);
        assert_eq!(c.redis_username, None);
        match &c.auth {
            AuthConfig::AccessKey {
                source: KeySource::Inline(key),
                username: None,
            } => assert_eq!(key.expose(), "p@ss:w/d"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn url_form_with_user_and_without_port_or_database() {
        let c = config(
            &["--connection-string", "rediss://ali%20ce:key@cache.example"],
            &[],
        );
        assert_eq!(c.upstream_address(), "cache.example:6380");
        assert_eq!(c.database, 0);
        assert_eq!(c.redis_username.as_deref(), Some("ali ce"));
        assert!(
            matches!(&c.auth, AuthConfig::AccessKey { username: Some(u), .. } if u == "ali ce")
        );
        // A user without a password is an Entra user (no key given).
        let c = config(
            &["--connection-string", "rediss://oid-123@cache.example/"],
            &[],
        );
        assert_eq!(c.redis_username.as_deref(), Some("oid-123"));
        assert!(matches!(c.auth, AuthConfig::Entra(_)));
    }

    #[test]
    fn url_form_redis_scheme_means_plaintext_unless_tls_is_given() {
        let c = config(
            &[
                "--connection-string",
                "redis://localhost:6379",
                "--auth",
                "none",
            ],
            &[],
        );
        assert!(!c.tls);
        let c = config(
            &[
                "--connection-string",
                "redis://localhost:6379",
                "--tls",
                "yes",
            ],
            &[],
        );
        assert!(c.tls);
        let c = config(&["--connection-string", "REDISS://[::1]:7000"], &[]);
        assert!(c.tls);
        assert_eq!(c.upstream_address(), "[::1]:7000");
    }

    #[test]
    fn url_form_query_is_warned_about_without_names_or_values() {
        // An unencoded '?' in a password puts the rest of it in the query (a '#' ends it).
        let cs = "rediss://:pass@cache.example:6380?wordsecretpart#@x";
        let c = config(&["--connection-string", cs], &[]);
        let warnings = c.warnings.join("\n");
        assert!(warnings.contains("query part"), "{warnings}");
        assert!(!warnings.contains("wordsecretpart"), "{warnings}");
    }

    #[test]
    fn stackexchange_form() {
        let cs = "cache.example:6380,password=abc+/def=,ssl=True,abortConnect=False";
        let c = config(&[], &[("AZURE_REDIS_CONNECTIONSTRING", cs)]);
        assert_eq!(c.upstream_address(), "cache.example:6380");
        assert!(c.tls);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        match &c.auth {
            AuthConfig::AccessKey {
                source: KeySource::Inline(key),
                username: None,
            } => assert_eq!(key.expose(), "abc+/def="),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stackexchange_form_keys_are_case_insensitive() {
        let cs = "cache.example , PASSWORD=k , SSL=false, DefaultDatabase=3, User=bob, \
                  SSLHOST=sni.example";
        let c = config(&["--connection-string", cs], &[]);
        assert_eq!(c.upstream_address(), "cache.example:6380");
        assert!(!c.tls);
        assert_eq!(c.database, 3);
        assert_eq!(c.redis_username.as_deref(), Some("bob"));
        assert_eq!(c.tls_server_name, "sni.example");
    }

    #[test]
    fn stackexchange_form_defaults_to_tls_and_warns_about_unknown_keys_by_position() {
        // "ab,cdsecret=" is one password, split at its ',': "cdsecret" is no key to print.
        let cs = "cache.example:6380,password=ab,cdsecret=,frobnicate=hushhush";
        let c = config(&["--connection-string", cs], &[]);
        assert!(c.tls);
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("item 3"), "{:?}", c.warnings);
        assert!(c.warnings[1].contains("item 4"), "{:?}", c.warnings);
        let warnings = c.warnings.join("\n");
        for hidden in ["cdsecret", "frobnicate", "hushhush"] {
            assert!(!warnings.contains(hidden), "{warnings}");
        }
    }

    #[test]
    fn stackexchange_form_takes_the_host_first_only() {
        // The piece of a password after a ',' must not become the host (which every upstream
        // log line and error prints), wherever the password is.
        for cs in [
            "password=ab,cdsecret",
            "password=ab,cdsecret,cache.example:6380",
            "cache.example:6380,password=ab,cdsecret",
        ] {
            let line = error(&["--connection-string", cs], &[]);
            assert!(!line.contains("cdsecret"), "{line}");
            assert!(
                line.contains("no host:port before the first comma")
                    || line.contains("a password can't contain ','"),
                "{line}"
            );
        }
        let line = error(
            &[
                "--connection-string",
                "cache.example,password=k,sslHost=a b",
            ],
            &[],
        );
        assert!(line.contains("sslHost must be a DNS name"), "{line}");
    }

    #[test]
    fn flags_and_variables_override_the_connection_string() {
        let cs = "rediss://:key@cs.example:6390/4";
        let c = config(
            &[
                "--connection-string",
                cs,
                "--upstream",
                "flag.example",
                "--tls",
                "false",
            ],
            &[("AZURE_REDIS_DATABASE", "7")],
        );
        // --upstream replaces the whole endpoint: the connection string's port goes with it.
        assert_eq!(c.upstream_address(), "flag.example:6380");
        assert!(!c.tls);
        assert_eq!(c.database, 7);
        let c = config(
            &["--connection-string", cs, "--database", "1"],
            &[("AZURE_REDIS_PORT", "10000"), ("AZURE_REDIS_DATABASE", "7")],
        );
        assert_eq!(c.upstream_address(), "cs.example:10000");
        assert_eq!(c.database, 1);
        let c = config(
            &[
                "--connection-string",
                "redis://u:k@h",
                "--redis-username",
                "v",
            ],
            &[],
        );
        assert!(matches!(&c.auth, AuthConfig::AccessKey { username: Some(u), .. } if u == "v"));
    }

    #[test]
    fn malformed_connection_strings_are_one_line_and_never_echo_the_password() {
        let malformed = [
            "rediss://:hunter2@cache.example:notaport",
            "rediss://:hun/ter2@cache.example:6380",
            "rediss://:hunter2@:6380",
            "rediss://:hunter2@cache.example:6380/zero",
            "rediss://:hunter2@cache.example:0",
            "http://:hunter2@cache.example",
            "password=hunter2,ssl=True",
            "cache.example:6380,password=hunter2,ssl=maybe",
            "cache.example:6380,password=hunter2,defaultDatabase=x",
            "cache.example:6380,hunter2",
            "cache.example:http,password=hunter2",
            "hun ter2:6380,password=hunter2",
        ];
        for cs in malformed {
            let line = error(&["--connection-string", cs], &[]);
            assert!(line.contains("malformed connection string in --connection-string"));
            assert!(line.contains("expected rediss://"), "{line}");
            assert!(
                !line.contains("hunter2") && !line.contains("ter2"),
                "{cs}: {line}"
            );
            let line = error(&[], &[("AZURE_REDIS_CONNECTIONSTRING", cs)]);
            assert!(line.contains("in AZURE_REDIS_CONNECTIONSTRING"), "{line}");
        }
    }

    // --- auth and credential selection --------------------------------------------------------

    #[test]
    fn auto_prefers_a_key_file_then_the_password_variable_then_the_connection_string() {
        let key_file = file_with("filekey\n");
        let path = key_file.path().to_str().unwrap();
        let cs = "rediss://:cskey@cache.example";
        let vars = [
            ("AZURE_REDIS_PASSWORD", "envkey"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
        ];
        let c = config(
            &["--connection-string", cs, "--access-key-file", path],
            &vars,
        );
        assert!(
            matches!(&c.auth, AuthConfig::AccessKey { source: KeySource::File(p), .. }
            if p == key_file.path())
        );
        let c = config(&["--connection-string", cs], &vars);
        assert!(
            matches!(&c.auth, AuthConfig::AccessKey { source: KeySource::Inline(k), .. }
            if k.expose() == "envkey")
        );
        let c = config(&["--connection-string", cs], &[]);
        assert!(
            matches!(&c.auth, AuthConfig::AccessKey { source: KeySource::Inline(k), .. }
            if k.expose() == "cskey")
        );
        let c = config(
            &[],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_ACCESS_KEY_FILE", path),
            ],
        );
        assert!(matches!(
            &c.auth,
            AuthConfig::AccessKey {
                source: KeySource::File(_),
                ..
            }
        ));
    }

    #[test]
    fn auto_without_a_key_picks_workload_identity_when_its_token_file_is_set() {
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/token"),
            ("AZURE_CLIENT_ID", "webhook-client"),
            ("AZURE_TENANT_ID", "tenant"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
            ("AZURE_REDIS_CLIENTSECRET", "s3cret"),
        ];
        match config(&[], &vars).auth {
            AuthConfig::Entra(CredentialConfig::WorkloadIdentity {
                client_id,
                tenant_id,
                token_file,
                authority_host,
            }) => {
                assert_eq!(client_id, "webhook-client");
                assert_eq!(tenant_id, "tenant");
                assert_eq!(token_file, PathBuf::from("/var/run/secrets/token"));
                assert_eq!(
                    authority_host.as_deref(),
                    Some("https://login.microsoftonline.us/")
                );
            }
            other => panic!("{other:?}"),
        }
        // Service Connector's variables win over the webhook's.
        let mut vars = vars.to_vec();
        vars.push(("AZURE_REDIS_CLIENTID", "sc-client"));
        vars.push(("AZURE_REDIS_TENANTID", "sc-tenant"));
        assert!(matches!(config(&[], &vars).auth,
            AuthConfig::Entra(CredentialConfig::WorkloadIdentity { client_id, tenant_id, .. })
            if client_id == "sc-client" && tenant_id == "sc-tenant"));
    }

    #[test]
    fn auto_without_key_or_token_file_picks_a_service_principal_when_a_secret_is_set() {
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_REDIS_CLIENTSECRET", "s3cret"),
            ("AZURE_REDIS_CLIENTID", "app"),
            ("AZURE_REDIS_TENANTID", "tenant"),
        ];
        match config(&[], &vars).auth {
            AuthConfig::Entra(CredentialConfig::ClientSecret {
                tenant_id,
                client_id,
                secret,
                authority_host: None,
            }) => {
                assert_eq!((tenant_id.as_str(), client_id.as_str()), ("tenant", "app"));
                assert_eq!(secret.expose(), "s3cret");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn auto_falls_back_to_managed_identity_user_assigned_with_a_client_id() {
        assert!(matches!(
            config(&[], HOST).auth,
            AuthConfig::Entra(CredentialConfig::ManagedIdentity { client_id: None })
        ));
        let vars = [("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_CLIENTID", "uami")];
        assert!(matches!(config(&[], &vars).auth,
            AuthConfig::Entra(CredentialConfig::ManagedIdentity { client_id: Some(id) })
            if id == "uami"));
        let vars = [("AZURE_REDIS_HOST", "h"), ("AZURE_CLIENT_ID", "generic")];
        assert!(matches!(config(&[], &vars).auth,
            AuthConfig::Entra(CredentialConfig::ManagedIdentity { client_id: Some(id) })
            if id == "generic"));
    }

    #[test]
    fn explicit_modes_override_auto() {
        let with_key = [("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_PASSWORD", "k")];
        assert!(matches!(
            config(&["--auth", "entra"], &with_key).auth,
            AuthConfig::Entra(_)
        ));
        assert!(matches!(
            config(&["--auth", "NONE"], &with_key).auth,
            AuthConfig::None
        ));
        let mut vars = with_key.to_vec();
        vars.push(("REDIS_PROXY_AUTH", "none"));
        // The flag wins over the variable.
        assert!(matches!(
            config(&["--auth", "access-key"], &vars).auth,
            AuthConfig::AccessKey { .. }
        ));
        assert!(matches!(config(&[], &vars).auth, AuthConfig::None));
        let c = config(
            &["--credential", "azure-cli"],
            &[("AZURE_REDIS_HOST", "h"), ("AZURE_TENANT_ID", "t")],
        );
        assert!(matches!(c.auth,
            AuthConfig::Entra(CredentialConfig::AzureCli { tenant_id: Some(t) }) if t == "t"));
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
            ("REDIS_PROXY_CREDENTIAL", "managed-identity"),
        ];
        assert!(matches!(
            config(&[], &vars).auth,
            AuthConfig::Entra(CredentialConfig::ManagedIdentity { .. })
        ));
    }

    #[test]
    fn auth_errors_name_what_is_missing() {
        let line = error(&["--auth", "access-key"], HOST);
        assert!(line.contains("AZURE_REDIS_PASSWORD"), "{line}");
        assert!(line.contains("--access-key-file"), "{line}");
        // Someone may take --auth for where the key goes: the value is not quoted.
        let line = error(&["--auth", "k3y-value"], HOST);
        assert!(
            line.contains("invalid --auth (its value is not shown"),
            "{line}"
        );
        assert!(line.contains("auto, entra, access-key or none"), "{line}");
        assert!(line.contains("AZURE_REDIS_PASSWORD"), "{line}");
        assert!(!line.contains("k3y-value"), "{line}");
        let line = error(
            &[],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_CREDENTIAL", "s3cret-value"),
            ],
        );
        assert!(line.contains("invalid REDIS_PROXY_CREDENTIAL ("), "{line}");
        assert!(line.contains("workload-identity"), "{line}");
        assert!(line.contains("AZURE_REDIS_CLIENTSECRET"), "{line}");
        assert!(!line.contains("s3cret-value"), "{line}");
        let line = error(&["--credential", "client-secret"], HOST);
        assert!(line.contains("AZURE_REDIS_CLIENTSECRET"), "{line}");
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_REDIS_CLIENTSECRET", "s3cret"),
        ];
        let line = error(&[], &vars);
        assert!(line.contains("tenant id"), "{line}");
        assert!(!line.contains("s3cret"), "{line}");
    }

    #[test]
    fn workload_identity_errors_name_the_missing_variable() {
        let line = error(&["--credential", "workload-identity"], HOST);
        assert!(line.contains("AZURE_FEDERATED_TOKEN_FILE"), "{line}");
        let mut vars = vec![
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/t"),
        ];
        let line = error(&[], &vars);
        assert!(line.contains("AZURE_CLIENT_ID"), "{line}");
        vars.push(("AZURE_CLIENT_ID", "c"));
        let line = error(&[], &vars);
        assert!(
            line.contains("tenant id") && line.contains("AZURE_TENANT_ID"),
            "{line}"
        );
        assert!(line.contains("azure.workload.identity/use"), "{line}");
    }

    #[test]
    fn key_file_must_be_readable_and_not_empty_at_startup() {
        let line = error(&["--access-key-file", "/nonexistent/key"], HOST);
        assert!(
            line.contains("cannot read the access key file /nonexistent/key"),
            "{line}"
        );
        assert!(line.contains("--access-key-file"), "{line}");
        let empty = file_with("\n");
        let line = error(&["--access-key-file", empty.path().to_str().unwrap()], HOST);
        assert!(line.contains("is empty"), "{line}");
        // Not read when the mode doesn't use it.
        let c = config(
            &["--auth", "entra", "--access-key-file", "/nonexistent/key"],
            HOST,
        );
        assert!(matches!(c.auth, AuthConfig::Entra(_)));
    }

    // --- values --------------------------------------------------------------------------------

    #[test]
    fn durations() {
        let c = config(
            &[
                "--reauth-margin",
                "500ms",
                "--shutdown-delay",
                "0s",
                "--shutdown-grace",
                "1m 30s",
            ],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_CONNECT_TIMEOUT", "2s"),
            ],
        );
        assert_eq!(c.reauth_margin, Duration::from_millis(500));
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        assert_eq!(c.shutdown_grace, Duration::from_secs(90));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        let c = config(
            &[],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_SHUTDOWN_DELAY", "0"),
            ],
        );
        assert_eq!(c.shutdown_delay, Duration::ZERO);
        let line = error(&["--reauth-margin", "3"], HOST);
        assert!(line.contains("invalid --reauth-margin '3'"), "{line}");
        assert!(line.contains("3m, 30s, 500ms"), "{line}");
        let line = error(
            &[],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_SHUTDOWN_GRACE", "soon"),
            ],
        );
        assert!(
            line.contains("invalid REDIS_PROXY_SHUTDOWN_GRACE 'soon'"),
            "{line}"
        );
        let line = error(&["--connect-timeout", "0s"], HOST);
        assert!(line.contains("above zero"), "{line}");
    }

    #[test]
    fn token_refresh_at_must_be_strictly_between_0_and_1() {
        let c = config(&["--token-refresh-at", "0.5"], HOST);
        assert_eq!(c.token_refresh_at, 0.5);
        for bad in ["0", "1", "1.5", "-0.1", "NaN", "three quarters"] {
            let line = error(&["--token-refresh-at", bad], HOST);
            assert!(line.contains("between 0 and 1"), "{line}");
        }
    }

    #[test]
    fn booleans() {
        for (value, expected) in [
            ("True", true),
            ("FALSE", false),
            ("1", true),
            ("0", false),
            ("yes", true),
            ("No", false),
        ] {
            let vars = [("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_SSL", value)];
            assert_eq!(config(&["--auth", "none"], &vars).tls, expected, "{value}");
        }
        let line = error(&["--tls", "maybe"], HOST);
        assert!(
            line.contains("invalid --tls 'maybe': expected true or false"),
            "{line}"
        );
    }

    #[test]
    fn entra_over_plaintext_needs_the_insecure_flag() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let plaintext: [Case; 3] = [
            (&["--tls", "false"], HOST, "--tls false"),
            (
                &[],
                &[("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_SSL", "False")],
                "AZURE_REDIS_SSL=False",
            ),
            (
                &["--connection-string", "redis://cache.example:6379"],
                &[],
                "a redis:// or ssl=False connection string in --connection-string",
            ),
        ];
        let insecure = "--insecure-entra-over-plaintext";
        for (args, vars, by) in plaintext {
            let line = error(args, vars);
            assert!(
                line.contains(&format!("TLS to the upstream is off ({by})")),
                "{line}"
            );
            assert!(
                line.contains("in clear text") && line.contains(insecure),
                "{line}"
            );
            let c = config(&[args, &[insecure]].concat(), vars);
            assert!(!c.tls);
            assert!(matches!(c.auth, AuthConfig::Entra(_)));
            let warnings = c.warnings.join("\n");
            assert!(
                warnings.contains("Entra tokens travel in clear text"),
                "{warnings}"
            );
            let mut with_var = vars.to_vec();
            with_var.push(("REDIS_PROXY_INSECURE_ENTRA_OVER_PLAINTEXT", "true"));
            assert!(!config(args, &with_var).tls);
            // The flag wins over the variable.
            let off = format!("{insecure}=false");
            error(&[args, &[off.as_str()]].concat(), &with_var);
        }
        // An access key or no AUTH over plaintext: a warning only.
        let vars = [("AZURE_REDIS_HOST", "h"), ("AZURE_REDIS_PASSWORD", "k")];
        let c = config(&["--tls", "false"], &vars);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("the access key travels in clear text"))
        );
        let c = config(&["--tls", "false", "--auth", "none"], HOST);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("TLS to the upstream is off"))
        );
        // With TLS, nothing to say.
        assert!(config(&[insecure], HOST).warnings.is_empty());
        let line = error(&["--insecure-entra-over-plaintext=maybe"], HOST);
        assert!(
            line.contains("invalid --insecure-entra-over-plaintext 'maybe'"),
            "{line}"
        );
    }

    #[test]
    fn listen_addresses() {
        let c = config(&["--listen", "unix:/run/redis.sock"], HOST);
        assert_eq!(c.listen, ListenAddr::Unix(PathBuf::from("/run/redis.sock")));
        assert_eq!(c.listen.to_string(), "unix:/run/redis.sock");
        let c = config(&["--listen", "[::1]:0"], HOST);
        assert_eq!(c.listen, ListenAddr::Tcp("[::1]:0".into()));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = config(
            &[],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_LISTEN", "0.0.0.0:6379"),
            ],
        );
        assert!(c.warnings.iter().any(|w| w.contains("--listen-password")));
        let c = config(
            &["--listen", "0.0.0.0:6379", "--listen-password", "pw"],
            HOST,
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        for bad in ["6379", "unix:", "localhost:port", ":6379"] {
            let line = error(&["--listen", bad], HOST);
            assert!(line.contains("host:port or unix:/path"), "{line}");
        }
    }

    #[test]
    fn admin_listen_can_be_turned_off() {
        assert_eq!(config(&["--admin-listen", "OFF"], HOST).admin_listen, None);
        let c = config(&["--admin-listen", "0.0.0.0:9091"], HOST);
        assert_eq!(c.admin_listen.as_deref(), Some("0.0.0.0:9091"));
        let line = error(&["--admin-listen", "9090"], HOST);
        assert!(line.contains("invalid --admin-listen '9090'"), "{line}");
    }

    #[test]
    fn the_control_endpoint_is_on_loopback_only() {
        let control = |args: &[&str]| config(args, HOST).control_listen;
        assert_eq!(control(&[]), ControlListen::OnAdmin);
        assert_eq!(
            control(&["--admin-listen", "0.0.0.0:9090"]),
            ControlListen::Separate("127.0.0.1:9091".into())
        );
        assert_eq!(
            control(&["--admin-listen", "[::]:0"]),
            ControlListen::Separate("127.0.0.1:0".into())
        );
        assert_eq!(control(&["--admin-listen", "off"]), ControlListen::Off);
        assert_eq!(
            control(&["--admin-listen", "0.0.0.0:9090", "--control-listen", "OFF"]),
            ControlListen::Off
        );
        assert_eq!(
            control(&[
                "--admin-listen",
                "0.0.0.0:9090",
                "--control-listen",
                "[::1]:7"
            ]),
            ControlListen::Separate("[::1]:7".into())
        );
        assert_eq!(
            control(&["--control-listen", "127.0.0.1:9090"]),
            ControlListen::OnAdmin
        );
        assert_eq!(
            control(&["--admin-listen", "off", "--control-listen", "localhost:7"]),
            ControlListen::Separate("localhost:7".into())
        );
        let line = error(&["--control-listen", "0.0.0.0:9091"], HOST);
        assert!(
            line.contains("invalid --control-listen '0.0.0.0:9091': the control endpoint"),
            "{line}"
        );
        let line = error(&["--admin-listen", "0.0.0.0:65535"], HOST);
        assert!(line.contains("set --control-listen"), "{line}");
        let c = config(&["--admin-listen", "0.0.0.0:9090"], HOST);
        assert!(c.describe().contains("control_listen=127.0.0.1:9091"));
    }

    #[test]
    fn numbers_and_log_format() {
        let c = config(
            &["--max-connections", "100", "--log-format", "JSON"],
            &[
                ("AZURE_REDIS_HOST", "h"),
                ("REDIS_PROXY_WARM_CONNECTIONS", "4"),
            ],
        );
        assert_eq!((c.max_connections, c.warm_connections), (100, 4));
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(error(&["--max-connections", "-1"], HOST).contains("--max-connections"));
        assert!(error(&["--database", "one"], HOST).contains("invalid --database 'one'"));
        assert!(error(&["--log-format", "xml"], HOST).contains("text or json"));
    }

    #[test]
    fn flags_win_over_variables_and_empty_values_count_as_unset() {
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("REDIS_PROXY_LISTEN", "127.0.0.1:7000"),
            ("REDIS_PROXY_SCOPE", "env-scope"),
            ("REDIS_PROXY_LOG_FORMAT", ""),
            ("AZURE_REDIS_PASSWORD", ""),
        ];
        let c = config(&["--listen", "127.0.0.1:7001"], &vars);
        assert_eq!(c.listen, ListenAddr::Tcp("127.0.0.1:7001".into()));
        assert_eq!(c.scope, "env-scope");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(matches!(c.auth, AuthConfig::Entra(_)));
        let c = config(&["--scope", "flag-scope", "--listen", ""], &vars);
        assert_eq!(c.scope, "flag-scope");
        assert_eq!(c.listen, ListenAddr::Tcp("127.0.0.1:7000".into()));
    }

    #[test]
    fn tls_server_name_and_ca_file() {
        let c = config(&["--tls-server-name", "sni.example"], HOST);
        assert_eq!(c.tls_server_name, "sni.example");
        let line = error(&["--tls-server-name", "not a name"], HOST);
        assert!(line.contains("invalid --tls-server-name"), "{line}");
        let ca = file_with("-----BEGIN CERTIFICATE-----\n");
        let c = config(&["--ca-file", ca.path().to_str().unwrap()], HOST);
        assert_eq!(c.ca_file.as_deref(), Some(ca.path()));
        let line = error(
            &[],
            &[("AZURE_REDIS_HOST", "h"), ("REDIS_PROXY_CA_FILE", "/nope")],
        );
        assert!(
            line.contains("cannot read REDIS_PROXY_CA_FILE /nope"),
            "{line}"
        );
    }

    #[test]
    fn token_ca_file_is_its_own_option() {
        let ca = file_with("-----BEGIN CERTIFICATE-----\n");
        let path = ca.path().to_str().unwrap();
        let c = config(&["--token-ca-file", path], HOST);
        assert_eq!(c.token_ca_file.as_deref(), Some(ca.path()));
        assert_eq!(c.ca_file, None);
        assert!(c.describe().contains(&format!("token_ca_file={path}")));
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("REDIS_PROXY_TOKEN_CA_FILE", path),
        ];
        let c = config(&["--ca-file", path], &vars);
        assert_eq!(c.token_ca_file.as_deref(), Some(ca.path()));
        assert_eq!(c.ca_file.as_deref(), Some(ca.path()));
        let line = error(&["--token-ca-file", "/nope"], HOST);
        assert!(line.contains("cannot read --token-ca-file /nope"), "{line}");
    }

    // --- subcommands, help, describe --------------------------------------------------------

    #[test]
    fn check_takes_the_same_options() {
        match parse(&["check", "--upstream", "h:1", "--auth", "none"], &[]) {
            Ok(Command::Check(c)) => {
                assert_eq!(c.upstream_address(), "h:1");
                assert!(matches!(c.auth, AuthConfig::None));
            }
            other => panic!("{other:?}"),
        }
        let line = error(&["--upstream", "h", "check"], &[]);
        assert!(line.contains("after the subcommand"), "{line}");
    }

    #[test]
    fn wait_and_shutdown() {
        match parse(&["wait"], &[]) {
            Ok(Command::Wait { admin, max }) => {
                assert_eq!(admin, "127.0.0.1:9090");
                assert_eq!(max, Duration::from_secs(30));
            }
            other => panic!("{other:?}"),
        }
        match parse(
            &["wait", "--max", "2m"],
            &[("REDIS_PROXY_ADMIN_LISTEN", "[::1]:9")],
        ) {
            Ok(Command::Wait { admin, max }) => {
                assert_eq!(admin, "[::1]:9");
                assert_eq!(max, Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
        let shutdown = |args: &[&str], vars: &[(&str, &str)]| match parse(args, vars) {
            Ok(Command::Shutdown { control }) => control,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            shutdown(&["shutdown", "--admin-listen", "localhost:9999"], &[]),
            "localhost:9999"
        );
        // The control endpoint is found from the same variables as the proxy finds it.
        let pod = [("REDIS_PROXY_ADMIN_LISTEN", "0.0.0.0:9090")];
        assert_eq!(shutdown(&["shutdown"], &pod), "127.0.0.1:9091");
        assert_eq!(
            shutdown(&["shutdown", "--control-listen", "127.0.0.1:7"], &pod),
            "127.0.0.1:7"
        );
        let line = error(&["shutdown"], &[("REDIS_PROXY_ADMIN_LISTEN", "off")]);
        assert!(line.contains("--control-listen"), "{line}");
        assert!(error(&["wait", "--max", "forever"], &[]).contains("invalid --max 'forever'"));
    }

    #[test]
    fn injector_options_from_flags_and_variables() {
        let defaults = file_with(r#"{"upstream": "cache.example:6380", "adminPort": 9191}"#);
        let defaults_path = defaults.path().display().to_string();
        match parse(
            &[
                "injector",
                "--tls-cert-file",
                "/c.pem",
                "--listen",
                "127.0.0.1:9443",
            ],
            &[
                ("REDIS_PROXY_INJECTOR_TLS_KEY_FILE", "/k.pem"),
                ("REDIS_PROXY_INJECTOR_DEFAULTS_FILE", &defaults_path),
                ("REDIS_PROXY_INJECTOR_LISTEN", "0.0.0.0:1"),
                ("REDIS_PROXY_LOG_FORMAT", "json"),
            ],
        ) {
            Ok(Command::Injector(c)) => {
                assert_eq!(c.listen, "127.0.0.1:9443");
                assert_eq!(c.tls_cert_file, PathBuf::from("/c.pem"));
                assert_eq!(c.tls_key_file, PathBuf::from("/k.pem"));
                assert_eq!(c.defaults.upstream.as_deref(), Some("cache.example:6380"));
                assert_eq!(c.defaults.admin_port, 9191);
                assert_eq!(c.log_format, LogFormat::Json);
            }
            other => panic!("{other:?}"),
        }
        match parse(
            &["injector", "--tls-cert-file", "c", "--tls-key-file", "k"],
            &[],
        ) {
            Ok(Command::Injector(c)) => {
                assert_eq!(c.listen, "0.0.0.0:8443");
                assert_eq!(c.defaults, sidecar::Options::default());
                assert_eq!(c.log_format, LogFormat::Text);
            }
            other => panic!("{other:?}"),
        }
        let line = error(&["injector", "--tls-key-file", "k"], &[]);
        assert!(line.contains("--tls-cert-file PATH"), "{line}");
        let bad = file_with(r#"{"logFormat": "xml"}"#);
        let bad_path = bad.path().display().to_string();
        let line = error(
            &["injector", "--tls-cert-file", "c", "--tls-key-file", "k"],
            &[("REDIS_PROXY_INJECTOR_DEFAULTS_FILE", &bad_path)],
        );
        assert!(
            line.contains("REDIS_PROXY_INJECTOR_DEFAULTS_FILE")
                && line.contains("field \"logFormat\": \"xml\" is not one of text, json"),
            "{line}"
        );
    }

    #[test]
    fn injector_defaults_errors_hide_an_access_key() {
        let key = "q8Zx0m3yA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r=";
        let bad = file_with(&format!(
            r#"{{"upstream": "cache.example,password={key}"}}"#
        ));
        let bad_path = bad.path().display().to_string();
        let line = error(
            &["injector", "--tls-cert-file", "c", "--tls-key-file", "k"],
            &[("REDIS_PROXY_INJECTOR_DEFAULTS_FILE", &bad_path)],
        );
        assert!(line.contains("field \"upstream\""), "{line}");
        assert!(!line.contains(&key[..20]), "{line}");
    }

    #[test]
    fn help_and_version_are_text_to_print_and_usage_errors_are_one_line() {
        match parse(&["--help"], &[]) {
            Ok(Command::Help(text)) => {
                assert!(text.contains("--upstream"), "{text}");
                assert!(text.contains("AZURE_REDIS_CONNECTIONSTRING"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&["--version"], &[]), Ok(Command::Help(v)) if v.contains("0.")));
        let line = error(&["--upstrem", "h"], &[]);
        assert!(
            line.contains("'--upstrem'")
                && line.contains("'--upstream'?")
                && line.contains("--help"),
            "{line}"
        );
    }

    #[test]
    fn usage_errors_never_quote_what_may_be_a_piece_of_a_secret() {
        let stray = "an unexpected argument (not shown";
        for args in [
            // An unquoted password with a space: the second word is a stray argument.
            &["--upstream", "h", "--listen-password", "my", "Pw-secret"][..],
            &[
                "check",
                "--upstream",
                "h",
                "--listen-password",
                "my",
                "Pw-secret",
            ],
            &["Pw-secret"],
            // A password that starts with '-' reads as an option.
            &["--upstream", "h", "--listen-password", "-Pw-secret"],
            &["--upstream", "h", "--listen-password", "--Pw-secret"],
            &["--connection-string=h,password=Pw-secret", "--upstrem", "x"],
        ] {
            let line = error(args, &[]);
            assert!(
                !line.contains("Pw-secret") && !line.contains("'-P"),
                "{line}"
            );
            assert!(
                line.contains(stray) || line.contains("unknown option '--upstrem'"),
                "{args:?}: {line}"
            );
        }
        let line = error(&["chek"], &[]);
        assert!(line.contains("did you mean 'check'?"), "{line}");
        assert!(!line.contains("chek"), "{line}");
        let line = error(&["--upstream", "h", "--upstream", "Pw-secret"], &[]);
        assert!(line.contains("cannot be used multiple times"), "{line}");
        assert!(!line.contains("Pw-secret"), "{line}");
        assert!(looks_like_an_option_name("--listen-pasword"));
        for not_an_option in ["--Secret", "--s3cret", "-x", "--", "--a", "word"] {
            assert!(!looks_like_an_option_name(not_an_option), "{not_an_option}");
        }
    }

    #[test]
    fn multiplex_is_off_by_default_and_needs_the_cluster_mode_off() {
        let c = config(&["--upstream", "cache.example"], &[]);
        assert_eq!(c.multiplex, 0);
        assert!(!c.describe().contains("multiplex"));
        let c = config(
            &[
                "--upstream",
                "cache.example",
                "--multiplex",
                "4",
                "--cluster",
                "off",
            ],
            &[],
        );
        assert_eq!(c.multiplex, 4);
        assert!(c.describe().contains("multiplex=4"), "{}", c.describe());
        // The warm pool pins take from waits for the first pin, unless it is asked for.
        assert_eq!((c.warm_connections, c.warm_after_first_pin), (4, true));
        assert!(
            c.describe()
                .contains("warm_connections=4 (after the first pin)"),
            "{}",
            c.describe()
        );
        let c = config(
            &[
                "--upstream",
                "cache.example",
                "--multiplex",
                "4",
                "--cluster",
                "off",
                "--warm-connections",
                "2",
            ],
            &[],
        );
        assert_eq!((c.warm_connections, c.warm_after_first_pin), (2, false));
        let c = config(
            &["--upstream", "cache.example"],
            &[
                ("REDIS_PROXY_MULTIPLEX", "2"),
                ("REDIS_PROXY_CLUSTER", "off"),
            ],
        );
        assert_eq!(c.multiplex, 2);
        for bad in ["65", "-1", "four"] {
            let e = error(
                &[
                    "--upstream",
                    "cache.example",
                    "--multiplex",
                    bad,
                    "--cluster",
                    "off",
                ],
                &[],
            );
            assert!(
                e.contains("--multiplex") && e.contains("0 (off) to 64"),
                "{e}"
            );
        }
        for cluster in [
            &[][..],
            &["--cluster", "auto"][..],
            &["--cluster", "on"][..],
        ] {
            let mut args = vec!["--upstream", "cache.example", "--multiplex", "4"];
            args.extend_from_slice(cluster);
            let e = error(&args, &[]);
            assert!(e.contains("--multiplex needs --cluster off"), "{e}");
        }
    }

    #[test]
    fn the_multiplexed_reply_bound_defaults_to_256_mib_and_refuses_nonsense() {
        let mux = [
            "--upstream",
            "cache.example",
            "--multiplex",
            "4",
            "--cluster",
            "off",
        ];
        let c = config(&mux, &[]);
        assert_eq!(c.multiplex_reply_limit, 256 * 1024 * 1024);
        assert!(
            c.describe().contains("multiplex_reply_mib=256"),
            "{}",
            c.describe()
        );
        let mut args = mux.to_vec();
        args.extend(["--multiplex-reply-mib", "16"]);
        assert_eq!(config(&args, &[]).multiplex_reply_limit, 16 * 1024 * 1024);
        let c = config(&mux, &[("REDIS_PROXY_MULTIPLEX_REPLY_MIB", "1024")]);
        assert_eq!(c.multiplex_reply_limit, 1024 * 1024 * 1024);
        for bad in ["0", "-5", "lots", "1048577"] {
            let mut args = mux.to_vec();
            args.extend(["--multiplex-reply-mib", bad]);
            let e = error(&args, &[]);
            assert!(
                e.contains("--multiplex-reply-mib") && e.contains("from 1 to 1048576"),
                "{e}"
            );
        }
        // Without multiplexing it is accepted, with a warning; with it, no warning.
        let no_effect = |c: &Config| {
            c.warnings
                .iter()
                .any(|w| w.contains("--multiplex-reply-mib has no effect without --multiplex"))
        };
        let off = config(
            &["--upstream", "cache.example", "--multiplex-reply-mib", "16"],
            &[],
        );
        assert!(no_effect(&off), "{:?}", off.warnings);
        assert!(!no_effect(&config(&args, &[])));
        assert!(!no_effect(&config(&["--upstream", "cache.example"], &[])));
    }

    #[test]
    fn cluster_options_default_to_auto_and_the_ports_after_listen() {
        let c = config(&["--upstream", "h", "--auth", "none"], &[]);
        assert_eq!(
            c.cluster,
            ClusterConfig {
                mode: ClusterMode::Auto,
                ports: ClusterPorts::Range(6380, 6479),
                max_nodes: 100,
                refresh: Duration::from_secs(10),
            }
        );
        let c = config(
            &[
                "--upstream",
                "h",
                "--auth",
                "none",
                "--listen",
                "127.0.0.1:0",
            ],
            &[
                ("REDIS_PROXY_CLUSTER", "ON"),
                ("REDIS_PROXY_CLUSTER_MAX_NODES", "7"),
                ("REDIS_PROXY_CLUSTER_REFRESH", "1s"),
            ],
        );
        assert_eq!(
            (c.cluster.mode, c.cluster.ports, c.cluster.max_nodes),
            (ClusterMode::On, ClusterPorts::Ephemeral, 7)
        );
        assert_eq!(c.cluster.refresh, Duration::from_secs(1));
        let c = config(
            &[
                "--upstream",
                "h",
                "--auth",
                "none",
                "--cluster-ports",
                "7000-7002",
            ],
            &[],
        );
        assert_eq!(c.cluster.ports, ClusterPorts::Range(7000, 7002));
        // Auto turns itself off where a cluster can't be served.
        let c = config(
            &["--upstream", "h", "--auth", "none", "--database", "2"],
            &[],
        );
        assert_eq!(c.cluster.mode, ClusterMode::Off);
        let c = config(
            &[
                "--upstream",
                "h",
                "--auth",
                "none",
                "--listen",
                "unix:/tmp/x.sock",
            ],
            &[],
        );
        assert_eq!(c.cluster.mode, ClusterMode::Off);
    }

    #[test]
    fn bad_cluster_options_are_refused_with_the_reason() {
        let base = ["--upstream", "h", "--auth", "none"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            error(&args, &[])
        };
        let line = with(&["--cluster", "maybe"]);
        assert!(
            line.contains("invalid --cluster 'maybe': expected auto, on or off"),
            "{line}"
        );
        let line = with(&["--cluster-ports", "7000"]);
        assert!(line.contains("invalid --cluster-ports '7000'"), "{line}");
        let line = with(&["--cluster-ports", "7002-7000"]);
        assert!(line.contains("START-END"), "{line}");
        let line = with(&["--cluster-max-nodes", "0"]);
        assert!(line.contains("from 1 to 1000"), "{line}");
        let line = with(&["--cluster-refresh", "1ms"]);
        assert!(line.contains("at least 100ms"), "{line}");
        let line = with(&["--cluster-ports", "9000-9100"]);
        assert!(line.contains("holds port 9090"), "{line}");
        let line = with(&["--cluster-ports", "6000-7000"]);
        assert!(line.contains("holds port 6379"), "{line}");
        let line = with(&["--cluster", "on", "--listen", "unix:/tmp/x.sock"]);
        assert!(line.contains("needs a TCP --listen"), "{line}");
        let line = with(&["--cluster", "on", "--database", "3"]);
        assert!(line.contains("database 0 only"), "{line}");
        let line = with(&["--cluster", "on", "--listen", "127.0.0.1:65500"]);
        assert!(line.contains("leaves no room"), "{line}");
        // Off ignores what only a cluster would need.
        let c = config(
            &[
                "--upstream",
                "h",
                "--auth",
                "none",
                "--cluster",
                "off",
                "--cluster-ports",
                "6000-7000",
            ],
            &[],
        );
        assert_eq!(c.cluster.mode, ClusterMode::Off);
    }

    #[test]
    fn describe_names_the_choice_but_no_secret() {
        let c = config(
            &[
                "--connection-string",
                "rediss://u:hunter2@cache.example:6380/1",
            ],
            &[("REDIS_PROXY_LISTEN_PASSWORD", "lpw-secret")],
        );
        let line = c.describe();
        assert_eq!(
            line,
            "upstream=cache.example:6380 tls=true database=1 auth=access-key key=inline user=u \
             listen=127.0.0.1:6379 listen_password=set admin_listen=127.0.0.1:9090"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{c:?}").contains("lpw-secret"));
        let vars = [
            ("AZURE_REDIS_HOST", "h"),
            ("AZURE_REDIS_CLIENTSECRET", "s3cret"),
            ("AZURE_CLIENT_ID", "app"),
            ("AZURE_TENANT_ID", "tenant"),
        ];
        let c = config(&[], &vars);
        assert_eq!(
            c.describe(),
            "upstream=h:6380 tls=true auth=entra credential=client-secret client_id=app \
             tenant_id=tenant user=oid-claim listen=127.0.0.1:6379 admin_listen=127.0.0.1:9090"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
