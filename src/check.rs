//! `redis-entra-proxy check`: the whole path once, step by step.
//!
//! What a user runs first: configuration, credential (token expiry, Redis user), TCP + TLS +
//! `AUTH`, a `PING` round trip and the server's version. Each step prints one line; the first
//! failure says what went wrong and stops. Exit status 0 only if all of it works. Nothing
//! secret is printed: the credential is described by its user and expiry, never its value.

use crate::cluster::rewrite::{bulk_payload, parse_nodes};
use crate::config::{ClusterMode, Config};
use crate::credential::{AuthCredential, AuthKind, CredentialManager};
use crate::resp::encode_command;
use crate::upstream::{Upstream, error_text, roundtrip};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// Runs every step, printing one line each; true when all passed.
pub async fn run(config: Config) -> bool {
    println!("configuration: ok ({})", config.describe());
    let stop = CancellationToken::new();
    let result = steps(&config, &stop).await;
    stop.cancel();
    match result {
        Ok(()) => {
            println!("result: ok, the proxy can serve clients");
            true
        }
        Err(failure) => {
            println!("result: FAILED: {failure}");
            false
        }
    }
}

async fn steps(config: &Config, stop: &CancellationToken) -> Result<(), String> {
    let credential = obtain_credential(config, stop).await?;
    let upstream = Upstream::new(config).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut stream = upstream
        .connect(credential.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "upstream: connected to {} ({}){} in {} ms",
        upstream.addr(),
        if config.tls { "TLS" } else { "plaintext" },
        match &credential {
            Some(c) => format!(
                ", authenticated as {}",
                c.username.as_deref().unwrap_or("default")
            ),
            None => String::new(),
        },
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let commands = [
        encode_command(&[b"PING"]),
        encode_command(&[b"INFO", b"server"]),
    ];
    let replies = roundtrip(&mut stream, &commands)
        .await
        .map_err(|e| format!("PING: {e}"))?;
    let rtt = started.elapsed();
    match replies.first() {
        Some(r) if r.starts_with(b"+PONG") => {}
        Some(r) => return Err(format!("PING: {}", error_text(r))),
        None => return Err("PING: no reply".into()),
    }
    println!(
        "redis: PING ok, round trip {:.2} ms (with INFO), server version {}",
        rtt.as_secs_f64() * 1000.0,
        replies
            .get(1)
            .and_then(server_version)
            .unwrap_or_else(|| "unknown".into())
    );
    if config.cluster.mode != ClusterMode::Off {
        check_cluster(config, &upstream, &mut stream, credential.as_deref()).await?;
    }
    if config.multiplex > 0 {
        check_multiplex(config, &mut stream).await?;
    }
    Ok(())
}

/// The multiplexing step: the command table the shared connections decide from, read as they
/// read it, and what it makes of a few commands clients send all the time.
async fn check_multiplex(
    config: &Config,
    stream: &mut crate::upstream::UpstreamStream,
) -> Result<(), String> {
    use crate::mux::table::{CommandTable, Decision};
    let replies = roundtrip(stream, &[encode_command(&[b"COMMAND"])])
        .await
        .map_err(|e| format!("multiplex: COMMAND: {e}"))?;
    let reply = replies.first().ok_or("multiplex: COMMAND: no reply")?;
    let Some(table) = CommandTable::from_command_reply(reply) else {
        return Err(format!(
            "multiplex: COMMAND gave no command table ({}): every client would get a \
             connection of its own",
            error_text(reply)
        ));
    };
    let shown: Vec<String> = [
        &b"GET"[..],
        b"SET",
        b"EVALSHA",
        b"MULTI",
        b"BLPOP",
        b"SUBSCRIBE",
    ]
    .iter()
    .map(|name| {
        let verdict = match table.decide(name, None) {
            Decision::Share => "shared".to_string(),
            Decision::Pin(reason) => format!("pins ({})", reason.label()),
        };
        format!("{} {verdict}", String::from_utf8_lossy(name))
    })
    .collect();
    println!(
        "multiplex: {} shared connections per upstream; COMMAND read ({} commands): {}",
        config.multiplex,
        table.commands(),
        shown.join(", ")
    );
    Ok(())
}

/// The cluster step: what clustering the cache has and, for a cluster, each node reached on
/// its own address (TCP, TLS against the configured name, `AUTH`, `PING`) as the proxy would.
async fn check_cluster(
    config: &Config,
    upstream: &Upstream,
    stream: &mut crate::upstream::UpstreamStream,
    credential: Option<&AuthCredential>,
) -> Result<(), String> {
    let replies = roundtrip(stream, &[encode_command(&[b"CLUSTER", b"NODES"])])
        .await
        .map_err(|e| format!("CLUSTER NODES: {e}"))?;
    let reply = replies.first().ok_or("CLUSTER NODES: no reply")?;
    if reply.starts_with(b"-") {
        let said = error_text(reply);
        if config.cluster.mode == ClusterMode::On {
            return Err(format!(
                "cluster: --cluster on, but the cache is not a cluster (CLUSTER NODES: {said})"
            ));
        }
        println!("cluster: not a cluster (CLUSTER NODES: {said}); cluster mode off");
        return Ok(());
    }
    let nodes = bulk_payload(reply)
        .ok_or("CLUSTER NODES did not answer with a string".to_string())
        .and_then(|text| parse_nodes(text).map_err(|e| e.to_string()))?;
    let served: Vec<_> = nodes
        .iter()
        .filter(|n| n.port != 0 && !n.flags.iter().any(|f| f == "noaddr" || f == "handshake"))
        .collect();
    println!(
        "cluster: a cluster of {} nodes ({} masters); each gets a local listener",
        served.len(),
        served
            .iter()
            .filter(|n| n.flags.iter().any(|f| f == "master"))
            .count()
    );
    if served.len() > config.cluster.max_nodes {
        return Err(format!(
            "cluster: {} nodes, more than --cluster-max-nodes {}",
            served.len(),
            config.cluster.max_nodes
        ));
    }
    let mut failed = 0;
    for node in served {
        let host = if node.host.is_empty() {
            config.upstream_host.as_str()
        } else {
            node.host.as_str()
        };
        let role = if node.flags.iter().any(|f| f == "master") {
            let slots: u32 = node
                .slots
                .iter()
                .map(|(a, b)| u32::from(*b) - u32::from(*a) + 1)
                .sum();
            format!("master of {slots} slots")
        } else {
            "replica".to_string()
        };
        let node_upstream = upstream.for_node(host, node.port);
        let started = Instant::now();
        let outcome = match node_upstream.connect(credential).await {
            Ok(mut s) => roundtrip(&mut s, &[encode_command(&[b"PING"])])
                .await
                .map_err(|e| format!("PING: {e}"))
                .and_then(|r| match r.first() {
                    Some(r) if r.starts_with(b"+PONG") => Ok(()),
                    Some(r) => Err(format!("PING: {}", error_text(r))),
                    None => Err("PING: no reply".into()),
                }),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => println!(
                "cluster: node {} ({role}): connected, {}, PING ok in {} ms",
                node_upstream.addr(),
                match (config.tls, credential.is_some()) {
                    (true, true) =>
                        format!("TLS verified as {}, authenticated", config.tls_server_name),
                    (true, false) => format!("TLS verified as {}", config.tls_server_name),
                    (false, true) => "plaintext, authenticated".to_string(),
                    (false, false) => "plaintext".to_string(),
                },
                started.elapsed().as_millis()
            ),
            Err(e) => {
                failed += 1;
                println!(
                    "cluster: node {} ({role}): FAILED: {e}",
                    node_upstream.addr()
                );
            }
        }
    }
    if failed > 0 {
        return Err(format!("cluster: {failed} node(s) not usable (see above)"));
    }
    Ok(())
}

/// Obtains the credential the proxy would use and describes it without its value.
async fn obtain_credential(
    config: &Config,
    stop: &CancellationToken,
) -> Result<Option<Arc<AuthCredential>>, String> {
    let manager = CredentialManager::start(config, stop.clone()).map_err(|e| e.to_string())?;
    if manager.mode() == AuthKind::None {
        println!("credential: none (--auth none)");
        return Ok(None);
    }
    let credential = manager
        .wait_current(config.connect_timeout)
        .await
        .map_err(|e| format!("credential: {e}"))?;
    match credential.expires_at {
        Some(at) => println!(
            "credential: Entra token for Redis user {}, expires {} (in {})",
            credential.username.as_deref().unwrap_or("?"),
            humantime::format_rfc3339_seconds(at),
            humantime::format_duration(round_secs(at))
        ),
        None => println!(
            "credential: access key{}",
            credential
                .username
                .as_deref()
                .map(|u| format!(" for user {u}"))
                .unwrap_or_default()
        ),
    }
    Ok(Some(credential))
}

fn round_secs(at: SystemTime) -> std::time::Duration {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    std::time::Duration::from_secs(left.as_secs())
}

/// `redis_version` from an `INFO server` reply, decoded with redis-protocol.
fn server_version(reply: &BytesMut) -> Option<String> {
    let (frame, _) = redis_protocol::resp2::decode::decode(reply).ok()??;
    let text = match frame {
        redis_protocol::resp2::types::OwnedFrame::BulkString(b) => String::from_utf8(b).ok()?,
        _ => return None,
    };
    text.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_string())
}
