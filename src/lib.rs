//! redis-entra-proxy: a sidecar that lets any Redis client use Azure Cache for Redis and Azure
//! Managed Redis with Microsoft Entra ID (or an access key) over plain `localhost:6379`.
//!
//! Where things live:
//! * [`config`]: flags, environment and connection strings → one [`config::Config`].
//! * [`credential`]: token sources and the refreshing token manager.
//! * [`upstream`]: TLS connect + `AUTH` + `SELECT` of one upstream connection.
//! * [`connector`]: a credential plus an authenticated upstream connection, timed and counted.
//! * [`pool`]: the warm pool (`--warm-connections`) of connections authenticated ahead of demand.
//! * [`resp`]: RESP delimiting, exactly as Redis delimits requests.
//! * [`relay`]: the per-connection relay and **re-authentication**; every condition under which
//!   an `AUTH` may be injected is in [`relay::state`].
//! * `cluster`: the cluster mode (`--cluster`): a local listener per node of an OSS-clustered
//!   cache, node addresses rewritten in replies, the topology kept current.
//! * `mux`: multiplexing (`--multiplex N`): clients share N upstream connections, each pinned
//!   to a connection of its own before its first command that needs connection state.
//! * [`server`]: the listener that accepts applications and starts one relay per client.
//! * [`check`]: the `check` subcommand that runs the whole path once.
//! * [`metrics`], [`health`], [`shutdown`]: what operators see and how the process stops.
//! * [`admin`]: the HTTP endpoint on `--admin-listen` (probes, `/metrics`, `/quitquitquit`);
//!   its connection slots (shared with the injector) evict rather than refuse (`slots`).
//! * [`ops_client`]: the `wait` and `shutdown` subcommands, clients of that endpoint.
//! * [`injector`]: the `injector` subcommand, the mutating admission webhook that adds the
//!   proxy to labelled pods as a native sidecar (options, validation, JSON Patch, HTTPS server).

pub mod admin;
pub mod check;
mod cluster;
pub mod config;
pub mod connector;
pub mod credential;
pub mod health;
pub mod injector;
pub mod logging;
pub mod metrics;
mod mux;
pub mod ops_client;
pub mod pool;
pub mod relay;
pub mod resp;
pub mod secret;
pub mod server;
pub mod shutdown;
mod slots;
pub mod upstream;
