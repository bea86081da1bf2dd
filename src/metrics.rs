//! Prometheus metrics: what an operator needs to answer "is it healthy, is it slow, when does
//! authentication run out, did a re-auth fail".
//!
//! Counters on the hot path are plain atomics resolved once (no label lookup per command).
//! Values that already live elsewhere — token refresh counts, the current token's expiry — are
//! read when `/metrics` is scraped instead of being copied, so they can't disagree.
//! `redis_proxy_reauth_deadline_timestamp_seconds` is the one number to alert on: the earliest
//! moment at which some live upstream connection's authentication expires (`+Inf` when none
//! expires).

use crate::credential::{CredentialWatch, RefreshCounters};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency buckets for connect and re-auth round trips (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `kind` label values of `redis_proxy_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 8] = [
    "connect", "tls", "timeout", "auth", "select", "closed", "protocol", "io",
];

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// `redis_proxy_client_connections`: clients connected now.
    pub client_connections: IntGauge,
    /// `redis_proxy_client_connections_total`: clients ever accepted.
    pub client_connections_total: IntCounter,
    /// `redis_proxy_client_rejections_total{reason}`: clients refused (limit, no credential,
    /// upstream failure).
    pub client_rejections: IntCounterVec,
    /// `redis_proxy_upstream_connections`: authenticated upstream connections open now.
    pub upstream_connections: IntGauge,
    /// `redis_proxy_warm_connections`: idle authenticated connections in the warm pool.
    pub warm_connections: IntGauge,
    /// `redis_proxy_upstream_connect_seconds`: TCP + TLS + `AUTH` (+ `SELECT`) time.
    pub upstream_connect_seconds: Histogram,
    /// `redis_proxy_upstream_errors_total{kind}`: connect, tls, timeout, auth, select, closed,
    /// protocol, io.
    pub upstream_errors: IntCounterVec,
    /// `redis_proxy_reauth_total{result="success"}`: injected `AUTH`s that succeeded.
    pub reauth_success: IntCounter,
    /// `redis_proxy_reauth_total{result="failure"}`: injected `AUTH`s the server refused.
    pub reauth_failure: IntCounter,
    /// `redis_proxy_reauth_total{result="unanswered"}`: injected `AUTH`s sent while the
    /// client's replies were off, which Redis answers with nothing (see `relay::core`).
    pub reauth_unanswered: IntCounter,
    /// `redis_proxy_reauth_seconds`: from injecting `AUTH` to its reply.
    pub reauth_seconds: Histogram,
    /// `redis_proxy_bytes_total{direction="client_to_upstream"}`.
    pub bytes_to_upstream: IntCounter,
    /// `redis_proxy_bytes_total{direction="upstream_to_client"}`.
    pub bytes_to_client: IntCounter,
    /// `redis_proxy_commands_total`: client commands relayed or answered.
    pub commands: IntCounter,
    /// `redis_proxy_client_auth_failures_total`: client `AUTH` / `HELLO … AUTH` attempts with a
    /// wrong `--listen-password`.
    pub client_auth_failures: IntCounter,
    /// `redis_proxy_cluster_nodes`: cluster nodes with a local listener now (cluster mode).
    pub cluster_nodes: IntGauge,
    /// `redis_proxy_cluster_topology_changes_total`: nodes that appeared, left or moved.
    pub cluster_topology_changes: IntCounter,
    /// `redis_proxy_cluster_refreshes_total{result}`: topology reads, `ok` or `failure`.
    pub cluster_refreshes: IntCounterVec,
    /// `redis_proxy_multiplex_clients{state="shared"}`: clients on the shared connections now.
    pub mux_shared_clients: IntGauge,
    /// `redis_proxy_multiplex_clients{state="pinned"}`: clients pinned to a connection of their
    /// own now (they started shared).
    pub mux_pinned_clients: IntGauge,
    /// `redis_proxy_multiplex_pins_total{reason}`: clients pinned, by what made them.
    pub mux_pins: IntCounterVec,
    /// `redis_proxy_multiplex_configured_connections`: `--multiplex N` (0: off), so that the
    /// admin endpoint says which mode the proxy is in.
    pub mux_configured: IntGauge,
    /// `redis_proxy_multiplex_shared_connections`: shared upstream connections open and
    /// authenticated now.
    pub mux_shared_connections: IntGauge,
    /// `redis_proxy_multiplex_commands_per_write`: client commands sent per write on a shared
    /// connection.
    pub mux_commands_per_write: Histogram,
    /// `redis_proxy_multiplex_failed_commands_total`: commands answered with an error because
    /// their shared connection broke before replying.
    pub mux_failed_commands: IntCounter,
    deadline: Gauge,
    deadlines: Mutex<Deadlines>,
}

/// The authentication expiry of every live connection, ordered, for the deadline gauge.
#[derive(Default)]
struct Deadlines {
    ordered: BTreeSet<(u128, u64)>,
    by_connection: HashMap<u64, u128>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let m = Metrics {
            client_connections: gauge("redis_proxy_client_connections", "Clients connected now."),
            client_connections_total: counter(
                "redis_proxy_client_connections_total",
                "Client connections accepted since start.",
            ),
            client_rejections: counter_vec(
                "redis_proxy_client_rejections_total",
                "Client connections refused, by reason (max_connections, no_credential, upstream; output_buffer: a multiplexed client that left too much unread).",
                "reason",
            ),
            upstream_connections: gauge(
                "redis_proxy_upstream_connections",
                "Authenticated upstream connections open now.",
            ),
            warm_connections: gauge(
                "redis_proxy_warm_connections",
                "Idle authenticated upstream connections waiting in the warm pool (--warm-connections).",
            ),
            upstream_connect_seconds: histogram(
                "redis_proxy_upstream_connect_seconds",
                "Time to connect, TLS-handshake, authenticate (and SELECT) an upstream connection.",
            ),
            upstream_errors: counter_vec(
                "redis_proxy_upstream_errors_total",
                "Upstream failures, by kind (connect, tls, timeout, auth, select, closed, protocol, io).",
                "kind",
            ),
            reauth_success: labelled_counter(REAUTH, REAUTH_HELP, "result", "success"),
            reauth_failure: labelled_counter(REAUTH, REAUTH_HELP, "result", "failure"),
            reauth_unanswered: labelled_counter(REAUTH, REAUTH_HELP, "result", "unanswered"),
            reauth_seconds: histogram(
                "redis_proxy_reauth_seconds",
                "Time from injecting AUTH on a live connection to its reply.",
            ),
            bytes_to_upstream: labelled_counter(
                BYTES,
                BYTES_HELP,
                "direction",
                "client_to_upstream",
            ),
            bytes_to_client: labelled_counter(BYTES, BYTES_HELP, "direction", "upstream_to_client"),
            commands: counter("redis_proxy_commands_total", "Client commands handled."),
            client_auth_failures: counter(
                "redis_proxy_client_auth_failures_total",
                "Client AUTH attempts with a wrong --listen-password (each makes that connection's next attempt wait longer).",
            ),
            cluster_nodes: gauge(
                "redis_proxy_cluster_nodes",
                "Cluster nodes served on a local listener of their own now (--cluster).",
            ),
            cluster_topology_changes: counter(
                "redis_proxy_cluster_topology_changes_total",
                "Cluster nodes that appeared, left or changed address since start.",
            ),
            cluster_refreshes: counter_vec(
                "redis_proxy_cluster_refreshes_total",
                "Reads of the cluster topology, by result (ok, failure).",
                "result",
            ),
            mux_shared_clients: labelled_gauge(MUX_CLIENTS, MUX_CLIENTS_HELP, "state", "shared"),
            mux_pinned_clients: labelled_gauge(MUX_CLIENTS, MUX_CLIENTS_HELP, "state", "pinned"),
            mux_pins: counter_vec(
                "redis_proxy_multiplex_pins_total",
                "Clients given a connection of their own (--multiplex), by the reason.",
                "reason",
            ),
            mux_configured: gauge(
                "redis_proxy_multiplex_configured_connections",
                "Shared upstream connections configured (--multiplex N; 0: off, every client has its own).",
            ),
            mux_shared_connections: gauge(
                "redis_proxy_multiplex_shared_connections",
                "Shared upstream connections open and authenticated now (--multiplex).",
            ),
            mux_commands_per_write: Histogram::with_opts(
                HistogramOpts::new(
                    "redis_proxy_multiplex_commands_per_write",
                    "Client commands sent per write on a shared upstream connection (--multiplex).",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                ]),
            )
            .unwrap_or_else(|_| unreachable_metric()),
            mux_failed_commands: counter(
                "redis_proxy_multiplex_failed_commands_total",
                "Commands answered with an error because their shared connection broke before replying.",
            ),
            deadline: Gauge::new(
                "redis_proxy_reauth_deadline_timestamp_seconds",
                "Earliest moment (Unix time) at which a live upstream connection's authentication \
                 expires; +Inf when none does.",
            )
            .unwrap_or_else(|_| unreachable_metric()),
            deadlines: Mutex::new(Deadlines::default()),
            registry,
        };
        m.deadline.set(f64::INFINITY);
        for c in m.collectors() {
            // Names are constants and unique: registration cannot fail.
            let _ = m.registry.register(c);
        }
        for reason in [
            "max_connections",
            "no_credential",
            "upstream",
            "output_buffer",
        ] {
            m.client_rejections.with_label_values(&[reason]);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            m.upstream_errors.with_label_values(&[kind]);
        }
        Arc::new(m)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.client_connections.clone()),
            Box::new(self.client_connections_total.clone()),
            Box::new(self.client_rejections.clone()),
            Box::new(self.upstream_connections.clone()),
            Box::new(self.warm_connections.clone()),
            Box::new(self.upstream_connect_seconds.clone()),
            Box::new(self.upstream_errors.clone()),
            Box::new(self.reauth_success.clone()),
            Box::new(self.reauth_failure.clone()),
            Box::new(self.reauth_unanswered.clone()),
            Box::new(self.reauth_seconds.clone()),
            Box::new(self.bytes_to_upstream.clone()),
            Box::new(self.bytes_to_client.clone()),
            Box::new(self.commands.clone()),
            Box::new(self.client_auth_failures.clone()),
            Box::new(self.cluster_nodes.clone()),
            Box::new(self.cluster_topology_changes.clone()),
            Box::new(self.cluster_refreshes.clone()),
            Box::new(self.mux_shared_clients.clone()),
            Box::new(self.mux_pinned_clients.clone()),
            Box::new(self.mux_pins.clone()),
            Box::new(self.mux_configured.clone()),
            Box::new(self.mux_shared_connections.clone()),
            Box::new(self.mux_commands_per_write.clone()),
            Box::new(self.mux_failed_commands.clone()),
            Box::new(self.deadline.clone()),
        ]
    }

    /// Adds the token metrics, read from the credential manager at each scrape.
    pub fn register_credentials(&self, counters: Arc<RefreshCounters>, watch: CredentialWatch) {
        let _ = self
            .registry
            .register(Box::new(CredentialCollector::new(counters, watch)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Records when connection `id`'s authentication expires (`None`: never).
    pub fn set_auth_expiry(&self, id: u64, expires_at: Option<SystemTime>) {
        let Ok(mut d) = self.deadlines.lock() else {
            return;
        };
        if let Some(old) = d.by_connection.remove(&id) {
            d.ordered.remove(&(old, id));
        }
        if let Some(at) = expires_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            let nanos = at.as_nanos();
            d.ordered.insert((nanos, id));
            d.by_connection.insert(id, nanos);
        }
        self.deadline.set(earliest(&d));
    }

    /// Connection `id` is gone.
    pub fn forget_connection(&self, id: u64) {
        self.set_auth_expiry(id, None);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn earliest(d: &Deadlines) -> f64 {
    d.ordered
        .first()
        .map_or(f64::INFINITY, |&(nanos, _)| nanos as f64 / 1e9)
}

const REAUTH: &str = "redis_proxy_reauth_total";
const REAUTH_HELP: &str = "Re-authentications of live connections, by result (success, failure).";
const BYTES: &str = "redis_proxy_bytes_total";
const BYTES_HELP: &str = "Bytes relayed, by direction.";
const MUX_CLIENTS: &str = "redis_proxy_multiplex_clients";
const MUX_CLIENTS_HELP: &str = "Clients of --multiplex now, by state (shared: on the shared connections; pinned: on one of their own).";

/// One series of a labelled counter, resolved once so the hot path does no label lookup.
fn labelled_counter(name: &str, help: &str, label: &str, value: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help).const_label(label, value))
        .unwrap_or_else(|_| unreachable_metric())
}

/// Adds one to a gauge for as long as it lives (a client on the shared connections, a pinned
/// client).
pub struct Counting<'a>(&'a IntGauge);

impl<'a> Counting<'a> {
    /// Increments `gauge` now, decrements it when dropped.
    pub fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Counting(gauge)
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn labelled_gauge(name: &str, help: &str, label: &str, value: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help).const_label(label, value))
        .unwrap_or_else(|_| unreachable_metric())
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|_| unreachable_metric())
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|_| unreachable_metric())
}

fn counter_vec(name: &str, help: &str, label: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &[label]).unwrap_or_else(|_| unreachable_metric())
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .unwrap_or_else(|_| unreachable_metric())
}

/// Metric construction fails only for invalid names, which are constants here.
fn unreachable_metric<T>() -> T {
    panic!("invalid metric definition (a constant name or label is malformed)")
}

/// `redis_proxy_token_refresh_total{result}` and `redis_proxy_token_expiry_timestamp_seconds`,
/// read from the credential manager when scraped.
struct CredentialCollector {
    counters: Arc<RefreshCounters>,
    watch: CredentialWatch,
    refresh: IntCounterVec,
    expiry: Gauge,
    descs: Vec<Desc>,
}

impl CredentialCollector {
    fn new(counters: Arc<RefreshCounters>, watch: CredentialWatch) -> Self {
        let refresh = counter_vec(
            "redis_proxy_token_refresh_total",
            "Token fetches, by result (success, failure).",
            "result",
        );
        let expiry = Gauge::new(
            "redis_proxy_token_expiry_timestamp_seconds",
            "Expiry (Unix time) of the newest credential; +Inf for an access key, 0 before the first.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let descs = refresh
            .desc()
            .into_iter()
            .chain(expiry.desc())
            .cloned()
            .collect();
        CredentialCollector {
            counters,
            watch,
            refresh,
            expiry,
            descs,
        }
    }
}

impl Collector for CredentialCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let success = self.refresh.with_label_values(&["success"]);
        success.reset();
        success.inc_by(self.counters.successes());
        let failure = self.refresh.with_label_values(&["failure"]);
        failure.reset();
        failure.inc_by(self.counters.failures());
        let expiry = match &self.watch.borrow().current {
            None => 0.0,
            Some(c) => c.expires_at.map_or(f64::INFINITY, |t| {
                t.duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64())
            }),
        };
        self.expiry.set(expiry);
        let mut families = self.refresh.collect();
        families.extend(self.expiry.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_deadline_is_the_earliest_live_expiry() {
        let m = Metrics::new();
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        // The encoder writes `inf`, which Prometheus parses as +Inf.
        let text = m.encode();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix("redis_proxy_reauth_deadline_timestamp_seconds "))
            .and_then(|v| v.parse::<f64>().ok());
        assert_eq!(value, Some(f64::INFINITY), "{text}");
        m.set_auth_expiry(1, Some(t(2000)));
        m.set_auth_expiry(2, Some(t(1000)));
        m.set_auth_expiry(3, None);
        assert_eq!(m.deadline.get(), 1000.0);
        m.set_auth_expiry(2, Some(t(3000))); // re-authenticated
        assert_eq!(m.deadline.get(), 2000.0);
        m.forget_connection(1);
        assert_eq!(m.deadline.get(), 3000.0);
        m.forget_connection(2);
        assert_eq!(m.deadline.get(), f64::INFINITY);
    }

    #[test]
    fn every_spec_metric_is_exposed() {
        let m = Metrics::new();
        let (_tx, rx) = tokio::sync::watch::channel(Default::default());
        m.register_credentials(Arc::default(), rx);
        let text = m.encode();
        for name in [
            "redis_proxy_client_connections ",
            "redis_proxy_client_connections_total ",
            "redis_proxy_upstream_connect_seconds_bucket",
            "redis_proxy_token_refresh_total{result=\"success\"}",
            "redis_proxy_token_expiry_timestamp_seconds ",
            "redis_proxy_reauth_total{result=\"failure\"}",
            "redis_proxy_bytes_total{direction=\"client_to_upstream\"}",
            "redis_proxy_reauth_deadline_timestamp_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
