//! What the injected sidecar looks like: its options (built-in defaults, then the chart-wide
//! defaults file, then the pod's `redis-entra-proxy.io/<option>` annotations), their
//! validation, and the container and volume JSON built from them.
//!
//! Every value is validated here, before anything is injected: a webhook that admits a pod with
//! a sidecar that can only crash-loop has turned a clear, immediate error (the pod is refused
//! with a message naming the annotation) into a slow, confusing one (`CrashLoopBackOff` and a
//! log line only the sidecar's container shows). The defaults file goes through the very same
//! parsers, at start-up, so a bad chart value stops the injector instead of every pod.
//!
//! Errors quote the offending value: annotations and chart values hold no secrets (the access
//! key stays in its Kubernetes Secret; only the Secret's *name* is an option).

use crate::config::{
    ListenAddr, MAX_MULTIPLEX_REPLY_MIB, is_loopback, parse_bind_address, parse_host_port,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Prefix of every annotation the injector reads or writes.
pub const PREFIX: &str = "redis-entra-proxy.io/";
/// The opt-in label (matched by the webhook's `objectSelector`) and its value.
pub const INJECT_LABEL: &str = "redis-entra-proxy.io/inject";
/// The annotation the injector adds, so that a re-review recognises an injected pod.
pub const INJECTED_ANNOTATION: &str = "redis-entra-proxy.io/injected";
/// The sidecar container's name (also how an injected pod is recognised).
pub const CONTAINER_NAME: &str = "redis-entra-proxy";
/// The pod volume holding the access key.
pub const ACCESS_KEY_VOLUME: &str = "redis-entra-proxy-access-key";
/// Where the access-key volume is mounted in the sidecar.
pub const ACCESS_KEY_DIR: &str = "/var/run/secrets/redis-entra-proxy";
/// The file name of the key inside [`ACCESS_KEY_DIR`].
const ACCESS_KEY_FILE_NAME: &str = "access-key";
/// The Secret key used when `access-key-secret` names only the Secret.
const DEFAULT_SECRET_KEY: &str = "access-key";
/// The Secret key used when `listen-password-secret` names only the Secret (the gateway
/// mode's default key too).
const DEFAULT_PASSWORD_KEY: &str = "password";
/// The admin port's name, which the probes refer to.
pub const ADMIN_PORT_NAME: &str = "proxy-admin";
/// The sidecar's user and group: the distroless `nonroot` user, so `runAsNonRoot` holds.
const RUN_AS: u32 = 65532;
/// What one client connection can cost the proxy at most, for the default `--max-connections`
/// derived from the sidecar's memory limit. Measured with `bench/run.sh --only worst`: 1.62 to
/// 1.65 MiB of RSS per connection holding a 1 MiB command the proxy must inspect, 16,384
/// pipelined commands and unread replies of a large value (50 and 100 connections); rounded up.
pub const CONNECTION_WORST_CASE: u64 = 2 * MIB;
/// What the proxy itself needs besides its connections (measured 8.6 to 8.9 MiB of RSS at
/// rest), with room for the warm pool, the metrics and the allocator.
pub const PROCESS_RESERVE: u64 = 16 * MIB;
/// One mebibyte, the unit of the sizes above and of `--multiplex-reply-mib`.
const MIB: u64 = 1024 * 1024;

/// The `--max-connections` that keeps the proxy under `memory_limit` bytes even if every client
/// connection costs [`CONNECTION_WORST_CASE`]: `(limit - reserve) / worst case`, at least 1.
/// The chart's gateway template computes the same (`rep.maxConnections`).
pub fn max_connections_for(memory_limit: u64) -> u64 {
    (memory_limit.saturating_sub(PROCESS_RESERVE) / CONNECTION_WORST_CASE).max(1)
}

/// The part of the memory limit given to multiplexed clients' unread replies when `multiplex`
/// is above 0: one in this many bytes. Without a bound of its own the proxy allows 256 MiB of
/// them, twice the default limit; a quarter leaves the rest to [`max_connections_for`], so the
/// default `128Mi` holds 32 MiB of unread replies beside 40 connections in their costliest state.
const MULTIPLEX_REPLY_SHARE: u64 = 4;

/// The sidecar's `--multiplex-reply-mib` for `memory_limit` bytes: a
/// [`MULTIPLEX_REPLY_SHARE`]th of it, in whole MiB, from 1 to the most the proxy takes.
fn multiplex_reply_mib_for(memory_limit: u64) -> u64 {
    (memory_limit / MULTIPLEX_REPLY_SHARE / MIB).clamp(1, MAX_MULTIPLEX_REPLY_MIB as u64)
}

/// The image used when neither the chart nor the pod names one: this very version.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/redis-entra-proxy/redis-entra-proxy:",
    env!("CARGO_PKG_VERSION")
);

/// A reference to the Secret key that holds the access key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The Secret's name (in the pod's namespace).
    pub name: String,
    /// The key inside the Secret.
    pub key: String,
}

/// The sidecar's resources: `requests` and `limits`, resource name → quantity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    /// `resources.requests`.
    pub requests: BTreeMap<String, String>,
    /// `resources.limits`.
    pub limits: BTreeMap<String, String>,
}

/// The sidecar's resolved, validated options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--upstream`; `None` until the chart or the pod sets it (an error at review time).
    pub upstream: Option<String>,
    /// `AZURE_REDIS_CLIENTID` (a user-assigned managed identity), when set.
    pub client_id: Option<String>,
    /// `--listen`.
    pub listen: String,
    /// `--auth`.
    pub auth: String,
    /// The Secret key mounted as `--access-key-file`, when set.
    pub access_key_secret: Option<SecretRef>,
    /// The Secret key given as `REDIS_PROXY_LISTEN_PASSWORD`, when set: required when `listen`
    /// is not a loopback address.
    pub listen_password_secret: Option<SecretRef>,
    /// `--database`, passed when not 0.
    pub database: u32,
    /// `--max-connections` when set (0: no limit); `None`: derived from the memory limit
    /// ([`Options::max_connections`]).
    pub max_connections: Option<u64>,
    /// `REDIS_PROXY_CLUSTER` (auto, on, off), when set.
    pub cluster: Option<String>,
    /// `REDIS_PROXY_CLUSTER_PORTS` (START..=END), when set.
    pub cluster_ports: Option<(u16, u16)>,
    /// `REDIS_PROXY_CLUSTER_MAX_NODES` (1..=1000), when set.
    pub cluster_max_nodes: Option<u16>,
    /// `REDIS_PROXY_MULTIPLEX` (0..=64, 0 = off), when set; passed only when above 0, and
    /// then with `REDIS_PROXY_CLUSTER=off` unless `cluster` is set ([`Options::cluster_mode`]).
    pub multiplex: Option<u8>,
    /// The admin port: `--admin-listen 0.0.0.0:PORT`, the container port and the probes'.
    pub admin_port: u16,
    /// `--log-format`.
    pub log_format: String,
    /// The container image.
    pub image: String,
    /// The container's `imagePullPolicy`.
    pub image_pull_policy: String,
    /// The container's `resources`.
    pub resources: Resources,
}

/// The chart-wide defaults file: the same options as the annotations, camelCase, all optional.
/// Unknown fields are an error, so a misspelt chart value is noticed at start-up.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DefaultsFile {
    upstream: Option<Scalar>,
    client_id: Option<Scalar>,
    listen: Option<Scalar>,
    auth: Option<Scalar>,
    access_key_secret: Option<Scalar>,
    listen_password_secret: Option<Scalar>,
    database: Option<Scalar>,
    max_connections: Option<Scalar>,
    cluster: Option<Scalar>,
    cluster_ports: Option<Scalar>,
    cluster_max_nodes: Option<Scalar>,
    multiplex: Option<Scalar>,
    admin_port: Option<Scalar>,
    log_format: Option<Scalar>,
    image: Option<Scalar>,
    image_pull_policy: Option<Scalar>,
    resources: Option<ResourcesFile>,
}

/// `resources` in the defaults file: a Kubernetes `ResourceRequirements` (without `claims`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    requests: Option<BTreeMap<String, Scalar>>,
    limits: Option<BTreeMap<String, Scalar>>,
}

/// A value that Helm may render as a string or as a number (`adminPort: 9090`, `cpu: 1`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    /// A JSON string.
    Text(String),
    /// A JSON number, taken as written.
    Number(serde_json::Number),
}

impl Scalar {
    /// The value as text, the form every parser below takes.
    fn text(&self) -> String {
        match self {
            Scalar::Text(text) => text.clone(),
            Scalar::Number(number) => number.to_string(),
        }
    }
}

/// One option: its annotation (after [`PREFIX`]), its defaults-file field, and how a value is
/// checked and stored. One table, so annotations and the defaults file can never disagree.
struct Field {
    /// The annotation name after the prefix, e.g. `database`.
    annotation: &'static str,
    /// The defaults-file field, e.g. `database`, `adminPort`.
    file_field: &'static str,
    /// Validates `value` and stores it; `Err` is what the value is not, e.g.
    /// `is not a database number (0..=2147483647)`.
    set: fn(&mut Options, &str) -> Result<(), String>,
}

/// Every option but the four resource entries (see [`RESOURCE_FIELDS`]).
const FIELDS: &[Field] = &[
    Field {
        annotation: "upstream",
        file_field: "upstream",
        set: set_upstream,
    },
    Field {
        annotation: "client-id",
        file_field: "clientId",
        set: set_client_id,
    },
    Field {
        annotation: "listen",
        file_field: "listen",
        set: set_listen,
    },
    Field {
        annotation: "auth",
        file_field: "auth",
        set: set_auth,
    },
    Field {
        annotation: "access-key-secret",
        file_field: "accessKeySecret",
        set: set_access_key_secret,
    },
    Field {
        annotation: "listen-password-secret",
        file_field: "listenPasswordSecret",
        set: set_listen_password_secret,
    },
    Field {
        annotation: "database",
        file_field: "database",
        set: set_database,
    },
    Field {
        annotation: "max-connections",
        file_field: "maxConnections",
        set: set_max_connections,
    },
    Field {
        annotation: "cluster",
        file_field: "cluster",
        set: set_cluster,
    },
    Field {
        annotation: "cluster-ports",
        file_field: "clusterPorts",
        set: set_cluster_ports,
    },
    Field {
        annotation: "cluster-max-nodes",
        file_field: "clusterMaxNodes",
        set: set_cluster_max_nodes,
    },
    Field {
        annotation: "multiplex",
        file_field: "multiplex",
        set: set_multiplex,
    },
    Field {
        annotation: "admin-port",
        file_field: "adminPort",
        set: set_admin_port,
    },
    Field {
        annotation: "log-format",
        file_field: "logFormat",
        set: set_log_format,
    },
    Field {
        annotation: "image",
        file_field: "image",
        set: set_image,
    },
    Field {
        annotation: "image-pull-policy",
        file_field: "imagePullPolicy",
        set: set_image_pull_policy,
    },
];

/// The resource annotations: (annotation, requests or limits, resource name).
const RESOURCE_FIELDS: &[(&str, Kind, &str)] = &[
    ("cpu-request", Kind::Requests, "cpu"),
    ("memory-request", Kind::Requests, "memory"),
    ("cpu-limit", Kind::Limits, "cpu"),
    ("memory-limit", Kind::Limits, "memory"),
];

/// Which half of `resources` an entry belongs to.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Requests,
    Limits,
}

impl Default for Options {
    /// The built-in defaults (the contract's table).
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        };
        Options {
            upstream: None,
            client_id: None,
            listen: "127.0.0.1:6379".into(),
            auth: "auto".into(),
            access_key_secret: None,
            listen_password_secret: None,
            database: 0,
            max_connections: None,
            cluster: None,
            cluster_ports: None,
            cluster_max_nodes: None,
            multiplex: None,
            admin_port: 9090,
            log_format: "json".into(),
            image: DEFAULT_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            resources: Resources {
                requests: quantities(&[("cpu", "50m"), ("memory", "32Mi")]),
                limits: quantities(&[("memory", "128Mi")]),
            },
        }
    }
}

impl Options {
    /// The built-in defaults overridden by a defaults file's JSON text. The error names the
    /// field and says what is wrong (serde names an unknown field and lists the known ones).
    pub fn from_defaults_json(text: &str) -> Result<Options, String> {
        let file: DefaultsFile = serde_json::from_str(text).map_err(|err| err.to_string())?;
        let mut options = Options::default();
        let given = [
            &file.upstream,
            &file.client_id,
            &file.listen,
            &file.auth,
            &file.access_key_secret,
            &file.listen_password_secret,
            &file.database,
            &file.max_connections,
            &file.cluster,
            &file.cluster_ports,
            &file.cluster_max_nodes,
            &file.multiplex,
            &file.admin_port,
            &file.log_format,
            &file.image,
            &file.image_pull_policy,
        ];
        for (field, value) in FIELDS.iter().zip(given) {
            let Some(value) = value.as_ref().map(Scalar::text) else {
                continue;
            };
            if !value.is_empty() {
                (field.set)(&mut options, &value)
                    .map_err(|why| format!("field \"{}\": {value:?} {why}", field.file_field))?;
            }
        }
        if let Some(resources) = file.resources {
            options.resources = resources_from_file(resources)?;
        }
        Ok(options)
    }

    /// These options overridden by a pod's annotations (those with [`PREFIX`]; others are
    /// ignored, as are empty values), then checked as a whole. The error is the message for
    /// the admission response, e.g. `redis-entra-proxy.io/database: "abc" is not a database
    /// number (0..=2147483647)`. An unknown annotation with our prefix is an error too: a
    /// misspelt `redis-entra-proxy.io/databse` would otherwise silently give database 0.
    pub fn with_annotations(&self, annotations: &Map<String, Value>) -> Result<Options, String> {
        check_known(annotations)?;
        let mut options = self.clone();
        for field in FIELDS {
            if let Some(value) = annotation(annotations, field.annotation)? {
                (field.set)(&mut options, &value)
                    .map_err(|why| format!("{PREFIX}{}: {value:?} {why}", field.annotation))?;
            }
        }
        for (name, kind, resource) in RESOURCE_FIELDS {
            if let Some(value) = annotation(annotations, name)? {
                check_quantity(&value).map_err(|why| format!("{PREFIX}{name}: {value:?} {why}"))?;
                options
                    .resources
                    .entries(*kind)
                    .insert(resource.to_string(), value);
            }
        }
        options.check()?;
        Ok(options)
    }

    /// Checks that need every option at once: what makes a sidecar that could not start.
    fn check(&self) -> Result<(), String> {
        if self.upstream.is_none() {
            return Err(format!(
                "{PREFIX}upstream is not set: set the pod annotation {PREFIX}upstream (e.g. \
                 \"mycache.redis.cache.windows.net:6380\") or the chart value \
                 injector.defaults.upstream"
            ));
        }
        if self.auth == "access-key" && self.access_key_secret.is_none() {
            return Err(format!(
                "{PREFIX}auth: \"access-key\" needs the access key: set {PREFIX}access-key-secret \
                 to the Secret holding it (NAME or NAME/KEY)"
            ));
        }
        if listen_port(&self.listen).is_some_and(|port| self.admin_ports().contains(&port)) {
            return Err(format!(
                "{PREFIX}listen: {:?} uses the admin port {} or the control port next to it: \
                 set {PREFIX}admin-port or {PREFIX}listen to another port",
                self.listen, self.admin_port
            ));
        }
        if let Some(multiplex) = self.multiplex.filter(|n| *n > 0)
            && let Some(cluster) = self.cluster.as_deref().filter(|mode| *mode != "off")
        {
            return Err(format!(
                "{PREFIX}multiplex: \"{multiplex}\" needs the cluster mode off, but \
                 {PREFIX}cluster is {cluster:?} (the proxy refuses --multiplex with --cluster \
                 {cluster}: the cluster mode relays every client 1:1): set {PREFIX}cluster to \
                 off (or leave it unset: multiplex then sets it off), or {PREFIX}multiplex to 0"
            ));
        }
        if let Some((start, end)) = self.checked_cluster_ports()? {
            let listen = listen_port(&self.listen);
            let [admin, control] = self.admin_ports();
            let taken = [
                (listen, "listen"),
                (Some(admin), "admin"),
                (Some(control), "control"),
            ];
            if let Some((port, what)) = taken.iter().find_map(|(port, what)| {
                port.filter(|p| (start..=end).contains(p))
                    .map(|p| (p, what))
            }) {
                return Err(format!(
                    "{PREFIX}cluster-ports: \"{start}-{end}\" contains the sidecar's {what} port \
                     {port} (listen {:?}, admin {admin}, control {control}): set \
                     {PREFIX}cluster-ports to a range without it",
                    self.listen
                ));
            }
        }
        if self.listen_password_secret.is_none()
            && !is_loopback(&ListenAddr::Tcp(self.listen.clone()))
        {
            return Err(format!(
                "{PREFIX}listen: {:?} is reachable from the pod network, and whoever reaches it \
                 uses the proxy's credentials: set {PREFIX}listen-password-secret (or the chart \
                 value injector.defaults.listenPasswordSecret) to the Secret holding the \
                 password clients must AUTH with (NAME or NAME/KEY, KEY defaults to \
                 {DEFAULT_PASSWORD_KEY}), or listen on 127.0.0.1",
                self.listen
            ));
        }
        self.resources.check()
    }

    /// The sidecar's command-line arguments: the five always given, then the optional ones.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--upstream".to_string(),
            self.upstream.clone().unwrap_or_default(),
            "--listen".into(),
            self.listen.clone(),
            "--auth".into(),
            self.auth.clone(),
            "--admin-listen".into(),
            format!("0.0.0.0:{}", self.admin_port),
            "--log-format".into(),
            self.log_format.clone(),
        ];
        if self.database != 0 {
            args.extend(["--database".into(), self.database.to_string()]);
        }
        let max_connections = self.max_connections();
        if max_connections != 0 {
            args.extend(["--max-connections".into(), max_connections.to_string()]);
        }
        if self.access_key_secret.is_some() {
            args.extend([
                "--access-key-file".into(),
                format!("{ACCESS_KEY_DIR}/{ACCESS_KEY_FILE_NAME}"),
            ]);
        }
        args
    }

    /// The native sidecar: an init container with `restartPolicy: Always`, probed on the admin
    /// port so that the app containers start only once the proxy serves.
    pub fn container(&self) -> Value {
        let probe = |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT_NAME}});
        let mut startup = probe("/startup");
        extend(
            &mut startup,
            json!({"periodSeconds": 1, "failureThreshold": 120, "timeoutSeconds": 1}),
        );
        let mut liveness = probe("/liveness");
        extend(
            &mut liveness,
            json!({"periodSeconds": 10, "failureThreshold": 3}),
        );
        let mut readiness = probe("/readiness");
        extend(&mut readiness, json!({"periodSeconds": 5}));
        let mut container = json!({
            "name": CONTAINER_NAME,
            "image": self.image,
            "imagePullPolicy": self.image_pull_policy,
            "restartPolicy": "Always",
            "args": self.args(),
            "ports": [{"name": ADMIN_PORT_NAME, "containerPort": self.admin_port, "protocol": "TCP"}],
            "startupProbe": startup,
            "livenessProbe": liveness,
            "readinessProbe": readiness,
            "resources": self.resources.to_json(),
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": RUN_AS,
                "runAsGroup": RUN_AS,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}
            }
        });
        let mut env = Vec::new();
        if let Some(client_id) = &self.client_id {
            env.push(json!({"name": "AZURE_REDIS_CLIENTID", "value": client_id}));
        }
        if let Some(secret) = &self.listen_password_secret {
            // From the Secret at container start: the password is never in the pod spec.
            env.push(json!({"name": "REDIS_PROXY_LISTEN_PASSWORD", "valueFrom": {
                "secretKeyRef": {"name": secret.name, "key": secret.key}
            }}));
        }
        if let Some(cluster) = self.cluster_mode() {
            env.push(json!({"name": "REDIS_PROXY_CLUSTER", "value": cluster}));
        }
        if let Some((start, end)) = self.cluster_ports {
            env.push(
                json!({"name": "REDIS_PROXY_CLUSTER_PORTS", "value": format!("{start}-{end}")}),
            );
        }
        if let Some(max_nodes) = self.cluster_max_nodes {
            env.push(
                json!({"name": "REDIS_PROXY_CLUSTER_MAX_NODES", "value": max_nodes.to_string()}),
            );
        }
        if let Some(multiplex) = self.multiplex.filter(|n| *n > 0) {
            env.push(json!({"name": "REDIS_PROXY_MULTIPLEX", "value": multiplex.to_string()}));
        }
        if let Some(mib) = self.multiplex_reply_mib() {
            env.push(json!({"name": "REDIS_PROXY_MULTIPLEX_REPLY_MIB", "value": mib.to_string()}));
        }
        if !env.is_empty() {
            extend(&mut container, json!({ "env": env }));
        }
        if self.access_key_secret.is_some() {
            extend(
                &mut container,
                json!({"volumeMounts": [{
                    "name": ACCESS_KEY_VOLUME,
                    "mountPath": ACCESS_KEY_DIR,
                    "readOnly": true
                }]}),
            );
        }
        container
    }

    /// The pod volume with the access key, when one is configured: only the one key, as a
    /// file named `access-key`, mode 0444 (octal).
    ///
    /// Why 0444: a Secret volume's files belong to root, and to group root unless the pod sets
    /// `fsGroup` (then to that group, with the group read bit added). The sidecar runs as
    /// 65532:65532, so a 0440 file is unreadable in every pod without `fsGroup`, and setting
    /// `fsGroup` (or `supplementalGroups`) ourselves would change the groups of every
    /// container in the pod and the ownership of the pod's other volumes. The other bits need
    /// no group at all, whatever the pod's securityContext says; and they let no other
    /// container read the key, because a volume's files are visible only in the containers
    /// that mount it, and only the sidecar mounts this one (the injector refuses a pod whose
    /// containers mount a volume of this name).
    pub fn volume(&self) -> Option<Value> {
        let secret = self.access_key_secret.as_ref()?;
        Some(json!({
            "name": ACCESS_KEY_VOLUME,
            "secret": {
                "secretName": secret.name,
                "items": [{"key": secret.key, "path": ACCESS_KEY_FILE_NAME}],
                "defaultMode": 0o444
            }
        }))
    }

    /// The sidecar's `--max-connections` (0: no limit): the annotation's or the chart's value,
    /// else what the memory limit allows ([`max_connections_for`]) once the multiplexed reply
    /// bound ([`Options::multiplex_reply_mib`]) is taken out of it, else no limit.
    pub fn max_connections(&self) -> u64 {
        self.max_connections.unwrap_or_else(|| {
            let replies = self.multiplex_reply_mib().unwrap_or(0) * MIB;
            self.memory_limit().map_or(0, |bytes| {
                max_connections_for(bytes.saturating_sub(replies))
            })
        })
    }

    /// The sidecar's `REDIS_PROXY_MULTIPLEX_REPLY_MIB`: with `multiplex` above 0 and a memory
    /// limit, a quarter of the limit ([`multiplex_reply_mib_for`]); otherwise none, and the
    /// proxy's own default (256 MiB) applies, which is what a pod without a limit has asked for.
    pub fn multiplex_reply_mib(&self) -> Option<u64> {
        self.multiplex.filter(|n| *n > 0)?;
        self.memory_limit().map(multiplex_reply_mib_for)
    }

    /// The sidecar's memory limit in bytes, when it has one.
    fn memory_limit(&self) -> Option<u64> {
        let limit = self.resources.limits.get("memory")?;
        quantity_value(limit).map(|bytes| bytes as u64)
    }

    /// The TCP ports the sidecar binds (admin, control, listen), to compare with the app's.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports = self.admin_ports().to_vec();
        ports.extend(listen_port(&self.listen));
        ports
    }

    /// The cluster-node ports the sidecar may bind, to compare with the app's and its own:
    /// checked only when the pod asks for cluster mode (`cluster: on`) or names the range
    /// (`cluster-ports`), and never with `cluster: off` (nor with `multiplex` above 0 and no
    /// `cluster`: [`Options::cluster_mode`] is then `off`). With `auto` and no range, the proxy
    /// binds them only if the cache is a cluster, so existing pods are not refused for a port
    /// they may never share. The range is the annotation's, else the `cluster-max-nodes`
    /// (default 100) ports right after the listen port, as the proxy computes it.
    pub fn cluster_range(&self) -> Option<(u16, u16)> {
        self.checked_cluster_ports().ok().flatten()
    }

    /// The sidecar's `REDIS_PROXY_CLUSTER`: `cluster` when set, else `off` when `multiplex` is
    /// above 0 (the proxy refuses `--multiplex` with any other cluster mode, and its default is
    /// `auto`), else none (the proxy's default). [`Options::check`] refuses `multiplex` above 0
    /// with `cluster` set to `on` or `auto`.
    pub fn cluster_mode(&self) -> Option<&str> {
        match (&self.cluster, self.multiplex) {
            (Some(cluster), _) => Some(cluster),
            (None, Some(n)) if n > 0 => Some("off"),
            (None, _) => None,
        }
    }

    /// [`Options::cluster_range`], with an error when `cluster: on` derives a range past 65535.
    fn checked_cluster_ports(&self) -> Result<Option<(u16, u16)>, String> {
        let cluster = self.cluster_mode();
        if cluster == Some("off") {
            return Ok(None);
        }
        if let Some(range) = self.cluster_ports {
            return Ok(Some(range));
        }
        if cluster != Some("on") {
            return Ok(None);
        }
        let Some(listen) = listen_port(&self.listen) else {
            return Ok(None);
        };
        let nodes = u32::from(self.cluster_max_nodes.unwrap_or(100));
        let end = u32::from(listen) + nodes;
        match u16::try_from(end) {
            Ok(end) => Ok(Some((listen + 1, end))),
            Err(_) => Err(format!(
                "{PREFIX}cluster: \"on\" needs {nodes} ports after the listen port {listen}, \
                 past 65535: set {PREFIX}cluster-ports to a free range"
            )),
        }
    }

    /// The admin port (on every address, for the kubelet) and the control port next to it (on
    /// 127.0.0.1: the proxy's `--control-listen auto` for a non-loopback admin address).
    fn admin_ports(&self) -> [u16; 2] {
        [self.admin_port, self.admin_port.saturating_add(1)]
    }
}

impl Resources {
    /// `requests` or `limits`, for an annotation to set one entry.
    fn entries(&mut self, kind: Kind) -> &mut BTreeMap<String, String> {
        match kind {
            Kind::Requests => &mut self.requests,
            Kind::Limits => &mut self.limits,
        }
    }

    /// A request above its limit is refused by the API server after admission: say so now,
    /// naming the annotations to change.
    fn check(&self) -> Result<(), String> {
        for (name, request) in &self.requests {
            let Some(limit) = self.limits.get(name) else {
                continue;
            };
            if let (Some(r), Some(l)) = (quantity_value(request), quantity_value(limit))
                && r > l
            {
                return Err(format!(
                    "the sidecar's {name} request {request:?} is above its limit {limit:?}: \
                     lower {PREFIX}{name}-request or raise {PREFIX}{name}-limit"
                ));
            }
        }
        Ok(())
    }

    /// The Kubernetes `ResourceRequirements` object (empty halves left out).
    fn to_json(&self) -> Value {
        let mut object = Map::new();
        if !self.requests.is_empty() {
            object.insert("requests".into(), json!(self.requests));
        }
        if !self.limits.is_empty() {
            object.insert("limits".into(), json!(self.limits));
        }
        Value::Object(object)
    }
}

/// Merges `extra`'s fields into the object `target`.
fn extend(target: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (target, extra) {
        target.extend(extra);
    }
}

/// The annotation `PREFIX + name`, when present and not empty; a non-string value (impossible
/// in a real pod, whose annotations are strings) is an error.
fn annotation(annotations: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match annotations.get(&format!("{PREFIX}{name}")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) if value.trim().is_empty() => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.trim().to_string())),
        Some(other) => Err(format!("{PREFIX}{name}: {other} is not a string")),
    }
}

/// Refuses an annotation with [`PREFIX`] that the injector doesn't know, listing those it does.
fn check_known(annotations: &Map<String, Value>) -> Result<(), String> {
    let known = || {
        FIELDS
            .iter()
            .map(|field| field.annotation)
            .chain(RESOURCE_FIELDS.iter().map(|(name, _, _)| *name))
    };
    for key in annotations.keys() {
        let Some(name) = key.strip_prefix(PREFIX) else {
            continue;
        };
        // `inject` is the label, sometimes also written as an annotation; `injected` is ours.
        if name == "inject" || name == "injected" || known().any(|k| k == name) {
            continue;
        }
        let list: Vec<&str> = known().collect();
        return Err(format!(
            "{key} is not an annotation of the injector: expected {PREFIX}<option> with option \
             one of {}",
            list.join(", ")
        ));
    }
    Ok(())
}

/// `resources` of the defaults file, every quantity validated; it replaces the built-in one.
fn resources_from_file(file: ResourcesFile) -> Result<Resources, String> {
    let half = |entries: Option<BTreeMap<String, Scalar>>, which: &str| {
        let mut out = BTreeMap::new();
        for (name, value) in entries.unwrap_or_default() {
            let value = value.text();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!(
                    "field \"resources.{which}\": {name:?} is not a resource name"
                ));
            }
            check_quantity(&value)
                .map_err(|why| format!("field \"resources.{which}.{name}\": {value:?} {why}"))?;
            out.insert(name, value);
        }
        Ok(out)
    };
    Ok(Resources {
        requests: half(file.requests, "requests")?,
        limits: half(file.limits, "limits")?,
    })
}

// ---------------------------------------------------------------------------------------------
// One setter per option: validate, then store. `Err` completes "<source>: <value> ...".
// ---------------------------------------------------------------------------------------------

fn set_upstream(options: &mut Options, value: &str) -> Result<(), String> {
    let expected = "is not a cache address: expected HOST, HOST:PORT or [IPv6]:PORT, e.g. \
                    mycache.redis.cache.windows.net:6380";
    match parse_host_port(value) {
        Ok((_, port)) if port != Some(0) && !value.contains(char::is_whitespace) => {
            options.upstream = Some(value.to_string());
            Ok(())
        }
        _ => Err(expected.into()),
    }
}

fn set_client_id(options: &mut Options, value: &str) -> Result<(), String> {
    if !is_guid(value) {
        return Err(
            "is not a client id: expected a GUID such as 00000000-0000-0000-0000-000000000000 \
             (the managed identity's client id)"
                .into(),
        );
    }
    options.client_id = Some(value.to_string());
    Ok(())
}

fn set_listen(options: &mut Options, value: &str) -> Result<(), String> {
    if value.starts_with("unix:") {
        return Err(
            "is a unix socket, which an injected sidecar can't offer: its root filesystem is \
             read-only and it shares no volume with the app's containers; listen on \
             127.0.0.1:PORT and connect the app to localhost:PORT"
                .into(),
        );
    }
    if parse_bind_address(value).is_err() || listen_port(value).is_none_or(|p| p == 0) {
        return Err(
            "is not a listen address: expected host:port, e.g. 127.0.0.1:6379 (a unix socket \
             is not possible in an injected sidecar)"
                .into(),
        );
    }
    options.listen = value.to_string();
    Ok(())
}

fn set_auth(options: &mut Options, value: &str) -> Result<(), String> {
    options.auth = one_of(value, &["auto", "entra", "access-key", "none"])?;
    Ok(())
}

fn set_access_key_secret(options: &mut Options, value: &str) -> Result<(), String> {
    options.access_key_secret = Some(secret_ref(value, DEFAULT_SECRET_KEY)?);
    Ok(())
}

fn set_listen_password_secret(options: &mut Options, value: &str) -> Result<(), String> {
    options.listen_password_secret = Some(secret_ref(value, DEFAULT_PASSWORD_KEY)?);
    Ok(())
}

/// `NAME` or `NAME/KEY` of a Secret, the key defaulting to `default_key`.
fn secret_ref(value: &str, default_key: &str) -> Result<SecretRef, String> {
    let (name, key) = value.split_once('/').unwrap_or((value, default_key));
    if !is_dns1123_subdomain(name) {
        return Err(format!(
            "is not a Secret reference: {name:?} is not a Secret name (lowercase letters, \
             digits, '-' and '.'); expected NAME or NAME/KEY (KEY defaults to {default_key})"
        ));
    }
    if !is_secret_key(key) {
        return Err(format!(
            "is not a Secret reference: {key:?} is not a Secret key (letters, digits, '-', '_' \
             and '.'); expected NAME or NAME/KEY"
        ));
    }
    Ok(SecretRef {
        name: name.to_string(),
        key: key.to_string(),
    })
}

fn set_database(options: &mut Options, value: &str) -> Result<(), String> {
    options.database = value
        .parse::<u32>()
        .ok()
        .filter(|n| i32::try_from(*n).is_ok())
        .ok_or("is not a database number (0..=2147483647)")?;
    Ok(())
}

fn set_max_connections(options: &mut Options, value: &str) -> Result<(), String> {
    options.max_connections = Some(
        value
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= 1_000_000)
            .ok_or("is not a number of connections (0 for no limit, up to 1000000)")?,
    );
    Ok(())
}

fn set_cluster(options: &mut Options, value: &str) -> Result<(), String> {
    options.cluster = Some(one_of(value, &["auto", "on", "off"])?);
    Ok(())
}

fn set_cluster_ports(options: &mut Options, value: &str) -> Result<(), String> {
    let expected = "is not a port range: expected START-END with 1 <= START <= END <= 65535, \
                    e.g. 6380-6479";
    let (start, end) = value.split_once('-').ok_or(expected)?;
    let port = |text: &str| text.parse::<u16>().ok().filter(|p| *p >= 1);
    match (port(start), port(end)) {
        (Some(start), Some(end)) if start <= end => {
            options.cluster_ports = Some((start, end));
            Ok(())
        }
        _ => Err(expected.into()),
    }
}

fn set_cluster_max_nodes(options: &mut Options, value: &str) -> Result<(), String> {
    options.cluster_max_nodes = Some(
        value
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or("is not a number of cluster nodes (1..=1000)")?,
    );
    Ok(())
}

fn set_multiplex(options: &mut Options, value: &str) -> Result<(), String> {
    options.multiplex = Some(
        value
            .parse::<u8>()
            .ok()
            .filter(|n| *n <= 64)
            .ok_or("is not a number of shared upstream connections (0 = off, up to 64)")?,
    );
    Ok(())
}

fn set_admin_port(options: &mut Options, value: &str) -> Result<(), String> {
    options.admin_port = value
        .parse::<u16>()
        .ok()
        .filter(|port| (1..u16::MAX).contains(port))
        .ok_or("is not a port number (1..=65534: the control endpoint takes the next one)")?;
    Ok(())
}

fn set_log_format(options: &mut Options, value: &str) -> Result<(), String> {
    options.log_format = one_of(value, &["text", "json"])?;
    Ok(())
}

fn set_image(options: &mut Options, value: &str) -> Result<(), String> {
    if value.contains(char::is_whitespace) {
        return Err("is not an image reference: it contains whitespace".into());
    }
    options.image = value.to_string();
    Ok(())
}

fn set_image_pull_policy(options: &mut Options, value: &str) -> Result<(), String> {
    options.image_pull_policy = one_of(value, &["Always", "IfNotPresent", "Never"])?;
    Ok(())
}

/// `value` if it is one of `allowed` (exactly: Kubernetes and the proxy are case-sensitive
/// here), else what is expected.
fn one_of(value: &str, allowed: &[&str]) -> Result<String, String> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        Err(format!("is not one of {}", allowed.join(", ")))
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes value formats.
// ---------------------------------------------------------------------------------------------

/// The port of a `host:port` listen address (`None` for a unix socket or no port).
fn listen_port(listen: &str) -> Option<u16> {
    if listen.starts_with("unix:") {
        return None;
    }
    parse_host_port(listen).ok()?.1
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A DNS-1123 subdomain (what Secret names are): at most 253 characters, dot-separated labels
/// of lowercase letters, digits and '-', each starting and ending with a letter or digit.
fn is_dns1123_subdomain(value: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            label.starts_with(alnum)
                && label.ends_with(alnum)
                && label.chars().all(|c| alnum(c) || c == '-')
        })
}

/// A Secret (or ConfigMap) key: at most 253 of letters, digits, '-', '_' and '.', and not `.`,
/// `..` or starting with `..`.
fn is_secret_key(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && value != "."
        && !value.starts_with("..")
}

/// A Kubernetes quantity without a sign: digits with an optional fraction, then a binary
/// (`Ki`..`Ei`) or decimal (`m`, `k`, `M`..`E`) suffix or an exponent (`e3`, `E-2`).
fn check_quantity(value: &str) -> Result<(), String> {
    let expected = "is not a Kubernetes quantity: expected e.g. 100m, 0.5, 64Mi or 1G";
    quantity_value(value).map(|_| ()).ok_or(expected.into())
}

/// The value of a quantity (approximate, in base units), or `None` when it is not one.
fn quantity_value(value: &str) -> Option<f64> {
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let digits = number.replace('.', "");
    if digits.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let exponent = exponent.strip_prefix(['e', 'E'])?;
            let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            10f64.powi(exponent.parse().ok()?)
        }
    };
    Some(number * multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), Value::String(v.to_string())))
            .collect()
    }

    fn with(pairs: &[(&str, &str)]) -> Result<Options, String> {
        let mut all = vec![("upstream", "cache.example:6380")];
        all.extend_from_slice(pairs);
        Options::default().with_annotations(&annotations(&all))
    }

    #[test]
    fn built_in_defaults_give_the_contract_args() {
        let options = with(&[]).expect("valid");
        assert_eq!(
            options.args(),
            [
                "--upstream",
                "cache.example:6380",
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
            ]
        );
        assert_eq!(options.volume(), None);
        assert!(options.image.ends_with(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn every_bad_value_names_the_annotation_the_value_and_what_is_expected() {
        let cases = [
            (
                "database",
                "abc",
                "is not a database number (0..=2147483647)",
            ),
            ("database", "2147483648", "0..=2147483647"),
            ("database", "-1", "0..=2147483647"),
            ("upstream", "a b", "HOST:PORT"),
            ("upstream", "rediss://x:6380", "HOST:PORT"),
            ("upstream", "host:99999", "HOST:PORT"),
            ("upstream", "host:0", "HOST:PORT"),
            ("client-id", "not-a-guid", "GUID"),
            ("listen", "6379", "host:port"),
            (
                "listen",
                "unix:/var/run/redis.sock",
                "root filesystem is read-only",
            ),
            ("listen", "127.0.0.1:0", "host:port"),
            ("auth", "password", "auto, entra, access-key, none"),
            ("access-key-secret", "My_Secret", "Secret name"),
            ("access-key-secret", "ok/bad key", "Secret key"),
            ("access-key-secret", "ok/..x", "Secret key"),
            ("admin-port", "0", "1..=65534"),
            ("admin-port", "65535", "1..=65534"),
            ("listen-password-secret", "Pw", "Secret name"),
            ("log-format", "xml", "text, json"),
            ("image", "a b", "whitespace"),
            ("image-pull-policy", "always", "Always, IfNotPresent, Never"),
            ("cpu-request", "lots", "Kubernetes quantity"),
            ("memory-limit", "64MB", "Kubernetes quantity"),
            ("cpu-limit", "-1", "Kubernetes quantity"),
            ("memory-request", "1.2.3", "Kubernetes quantity"),
        ];
        for (name, value, hint) in cases {
            let error = with(&[(name, value)]).expect_err(name);
            let start = format!("{PREFIX}{name}: {value:?} ");
            assert!(error.starts_with(&start), "{error}");
            assert!(error.contains(hint), "{error}");
        }
    }

    #[test]
    fn max_connections_follow_the_memory_limit_unless_set() {
        let mib = |n: u64| n * 1024 * 1024;
        assert_eq!(max_connections_for(mib(128)), 56);
        assert_eq!(max_connections_for(mib(256)), 120);
        assert_eq!(max_connections_for(mib(1024)), 504);
        assert_eq!(max_connections_for(mib(16)), 1);
        assert_eq!(with(&[]).expect("valid").max_connections(), 56);
        let big = with(&[("memory-limit", "1Gi")]).expect("valid");
        assert_eq!(big.max_connections(), 504);
        let decimal = with(&[("memory-limit", "500M")]).expect("valid");
        assert_eq!(decimal.max_connections(), (500_000_000 - mib(16)) / mib(2));
        let set = with(&[("max-connections", "300")]).expect("valid");
        assert!(
            set.args()
                .ends_with(&["--max-connections".into(), "300".into()])
        );
        let off = with(&[("max-connections", "0")]).expect("valid");
        assert!(!off.args().contains(&"--max-connections".to_string()));
        let mut unlimited = Options::default();
        unlimited.resources.limits.clear();
        assert_eq!(unlimited.max_connections(), 0);
        let error = with(&[("max-connections", "-1")]).expect_err("negative");
        assert!(error.contains("is not a number of connections"), "{error}");
    }

    #[test]
    fn multiplexing_takes_a_quarter_of_the_memory_limit_for_unread_replies() {
        let reply_bound = |options: &Options| {
            let env = options.container()["env"].clone();
            let env = env.as_array().cloned().unwrap_or_default();
            env.iter()
                .find(|entry| entry["name"] == "REDIS_PROXY_MULTIPLEX_REPLY_MIB")
                .map(|entry| entry["value"].clone())
        };
        let default = with(&[("multiplex", "4")]).expect("valid");
        assert_eq!(default.multiplex_reply_mib(), Some(32));
        assert_eq!(reply_bound(&default), Some(json!("32")));
        // (128 − 32 − 16) MiB / 2 MiB: the bound comes out of the connections' share.
        assert_eq!(default.max_connections(), 40);
        let big = with(&[("multiplex", "4"), ("memory-limit", "1Gi")]).expect("valid");
        assert_eq!(
            (big.multiplex_reply_mib(), big.max_connections()),
            (Some(256), 376)
        );
        let tiny = with(&[
            ("multiplex", "4"),
            ("memory-request", "2Mi"),
            ("memory-limit", "2Mi"),
        ])
        .expect("valid");
        assert_eq!(
            (tiny.multiplex_reply_mib(), tiny.max_connections()),
            (Some(1), 1)
        );
        assert_eq!(
            multiplex_reply_mib_for(u64::MAX),
            1024 * 1024,
            "the proxy's largest"
        );
        // A set max-connections is kept; the reply bound still follows the limit.
        let set = with(&[("multiplex", "4"), ("max-connections", "300")]).expect("valid");
        assert_eq!(
            (set.multiplex_reply_mib(), set.max_connections()),
            (Some(32), 300)
        );
        // Without multiplexing, or without a limit, nothing is passed.
        let off = with(&[("multiplex", "0")]).expect("valid");
        assert_eq!((reply_bound(&off), off.max_connections()), (None, 56));
        assert_eq!(reply_bound(&with(&[]).expect("valid")), None);
        let mut unlimited = with(&[("multiplex", "4")]).expect("valid");
        unlimited.resources.limits.clear();
        assert_eq!(
            (reply_bound(&unlimited), unlimited.max_connections()),
            (None, 0)
        );
    }

    #[test]
    fn missing_upstream_says_where_to_set_it() {
        let error = Options::default()
            .with_annotations(&Map::new())
            .expect_err("no upstream");
        assert!(error.contains("redis-entra-proxy.io/upstream"), "{error}");
        assert!(error.contains("injector.defaults.upstream"), "{error}");
    }

    #[test]
    fn combinations_that_could_not_start() {
        let error = with(&[("auth", "access-key")]).expect_err("no key");
        assert!(error.contains("access-key-secret"), "{error}");
        let error = with(&[("listen", "127.0.0.1:9090")]).expect_err("port clash");
        assert!(error.contains("admin port 9090"), "{error}");
        let error = with(&[("listen", "127.0.0.1:9091")]).expect_err("control port clash");
        assert!(error.contains("control port"), "{error}");
        let error = with(&[("listen", "0.0.0.0:6379")]).expect_err("open without a password");
        assert!(error.contains("listen-password-secret"), "{error}");
        let open = with(&[
            ("listen", "0.0.0.0:6379"),
            ("listen-password-secret", "redis-pw"),
        ])
        .expect("with a password");
        assert_eq!(
            open.container()["env"],
            json!([{"name": "REDIS_PROXY_LISTEN_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": "redis-pw", "key": "password"}}}])
        );
        let error = with(&[("cpu-request", "2"), ("cpu-limit", "500m")]).expect_err("r > l");
        assert!(error.contains("cpu request"), "{error}");
        assert!(with(&[("memory-request", "128Mi")]).is_ok());
        assert!(with(&[("memory-request", "129Mi")]).is_err());
    }

    #[test]
    fn valid_values() {
        let options = with(&[
            ("upstream", "[::1]:10000"),
            ("client-id", "0F8FAD5B-D9CB-469F-A165-70867728950E"),
            ("listen", "[::1]:6380"),
            ("access-key-secret", "cache.keys"),
            ("database", "2147483647"),
            ("cpu-limit", "1"),
            ("memory-limit", "1.5Gi"),
            ("cpu-request", "1e-1"),
        ])
        .expect("valid");
        assert_eq!(options.upstream.as_deref(), Some("[::1]:10000"));
        assert_eq!(
            options.access_key_secret,
            Some(SecretRef {
                name: "cache.keys".into(),
                key: "access-key".into()
            })
        );
        assert_eq!(options.resources.limits["memory"], "1.5Gi");
        assert_eq!(options.resources.requests["cpu"], "1e-1");
        assert!(options.args().contains(&"2147483647".to_string()));
    }

    #[test]
    fn unknown_annotations_with_the_prefix_are_refused() {
        let error = with(&[("databse", "3")]).expect_err("typo");
        assert!(
            error.starts_with("redis-entra-proxy.io/databse is not an annotation"),
            "{error}"
        );
        assert!(error.contains("database"), "{error}");
        assert!(with(&[("inject", "true"), ("injected", "false")]).is_ok());
        let mut others = annotations(&[("upstream", "c")]);
        others.insert("example.com/databse".into(), json!("x"));
        assert!(Options::default().with_annotations(&others).is_ok());
    }

    #[test]
    fn empty_annotations_count_as_unset() {
        let options = with(&[("database", ""), ("auth", " ")]).expect("valid");
        assert_eq!((options.database, options.auth.as_str()), (0, "auto"));
    }

    #[test]
    fn quantities() {
        for good in [
            "1", "100m", "0.5", ".5", "5.", "64Mi", "1G", "2Ki", "1e3", "1E-2",
        ] {
            assert!(quantity_value(good).is_some(), "{good}");
        }
        for bad in [
            "", "m", "1.2.3", "1mi", "1e", "1e+", "-1", "1 Mi", "Mi1", ".",
        ] {
            assert!(quantity_value(bad).is_none(), "{bad}");
        }
        assert_eq!(quantity_value("128Mi"), Some(134217728.0));
    }

    #[test]
    fn defaults_file_fields_go_through_the_same_checks() {
        let options = Options::from_defaults_json(
            r#"{"upstream": "cache.example", "adminPort": 9191, "database": "3",
                "resources": {"requests": {"cpu": 1}}, "clientId": null, "image": ""}"#,
        )
        .expect("valid");
        assert_eq!(options.upstream.as_deref(), Some("cache.example"));
        assert_eq!((options.admin_port, options.database), (9191, 3));
        assert_eq!(options.image, DEFAULT_IMAGE);
        assert_eq!(
            options.resources,
            Resources {
                requests: [("cpu".to_string(), "1".to_string())].into(),
                limits: BTreeMap::new()
            }
        );
        let error = Options::from_defaults_json(r#"{"database": "abc"}"#).expect_err("bad");
        assert_eq!(
            error,
            "field \"database\": \"abc\" is not a database number (0..=2147483647)"
        );
        let error = Options::from_defaults_json(r#"{"adminport": 1}"#).expect_err("unknown");
        assert!(error.contains("unknown field `adminport`"), "{error}");
        let error = Options::from_defaults_json(r#"{"resources": {"limits": {"cpu": "x"}}}"#)
            .expect_err("quantity");
        assert!(error.contains("resources.limits.cpu"), "{error}");
        assert!(Options::from_defaults_json("[]").is_err());
    }
}
