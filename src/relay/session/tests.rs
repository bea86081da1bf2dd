//! The I/O loop over in-memory pipes: what only the loop does (ends, the upstream opened on
//! demand, the credential channel) with a scripted client and server.

use super::*;
use crate::credential::CredentialState;
use crate::resp::{Args, Grammar, Scanner, encode_command};
use crate::secret::Secret;
use std::time::SystemTime;
use tokio::io::{DuplexStream, duplex};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(5);

fn credential(generation: u64) -> Arc<AuthCredential> {
    Arc::new(AuthCredential::new(
        Some("oid".into()),
        Secret::new(format!("token-{generation}")),
        Some(SystemTime::now() + Duration::from_secs(3600)),
        generation,
    ))
}

fn ctx(listen_password: Option<&str>) -> Arc<RelayContext> {
    Arc::new(RelayContext {
        database: 0,
        listen_password: listen_password.map(Secret::new),
        authenticate: true,
        metrics: crate::metrics::Metrics::new(),
    })
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode_command(&refs).to_vec()
}

/// Reads the next command the scripted server receives.
async fn next_command(server: &mut DuplexStream, buf: &mut Vec<u8>) -> Vec<String> {
    loop {
        let mut scanner = Scanner::new(Grammar::Request);
        if let Some(frame) = scanner.scan(buf).unwrap() {
            let frame: Vec<u8> = buf.drain(..frame.len).collect();
            return Args::new(&frame)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, server.read(&mut chunk))
            .await
            .expect("the server waited")
            .unwrap();
        assert!(n > 0, "the proxy closed the upstream");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_exactly(client: &mut DuplexStream, n: usize) -> String {
    let mut got = vec![0; n];
    tokio::time::timeout(WAIT, client.read_exact(&mut got))
        .await
        .expect("the client waited")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn relays_and_reauthenticates_when_a_credential_is_published() {
    let (mut client, proxy_client) = duplex(1 << 16);
    let (proxy_upstream, mut server) = duplex(1 << 16);
    let (tx, watch) = watch::channel(CredentialState {
        current: Some(credential(1)),
        last_error: None,
    });
    let session = Session::new(
        1,
        ctx(None),
        proxy_client,
        Upstream {
            stream: proxy_upstream,
            credential: Some(credential(1)),
        },
        watch,
    );
    let task = tokio::spawn(session.run(CancellationToken::new()));
    let mut buf = Vec::new();
    client.write_all(&cmd(&["GET", "k"])).await.unwrap();
    assert_eq!(next_command(&mut server, &mut buf).await, ["GET", "k"]);
    tx.send_replace(CredentialState {
        current: Some(credential(2)),
        last_error: None,
    });
    assert_eq!(
        next_command(&mut server, &mut buf).await,
        ["AUTH", "oid", "token-2"]
    );
    server.write_all(b"$1\r\nv\r\n+OK\r\n").await.unwrap();
    assert_eq!(read_exactly(&mut client, 7).await, "$1\r\nv\r\n");
    drop(client);
    let end = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::ClientClosed), "{end:?}");
}

#[tokio::test]
async fn quit_delivers_the_servers_ok_then_closes() {
    let (mut client, proxy_client) = duplex(1 << 16);
    let (proxy_upstream, mut server) = duplex(1 << 16);
    let (_tx, watch) = watch::channel(CredentialState::default());
    let session = Session::new(
        1,
        ctx(None),
        proxy_client,
        Upstream {
            stream: proxy_upstream,
            credential: None,
        },
        watch,
    );
    let task = tokio::spawn(session.run(CancellationToken::new()));
    let mut buf = Vec::new();
    client.write_all(&cmd(&["QUIT"])).await.unwrap();
    assert_eq!(next_command(&mut server, &mut buf).await, ["QUIT"]);
    server.write_all(b"+OK\r\n").await.unwrap();
    drop(server);
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"+OK\r\n");
    let end = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::ClientClosed), "{end:?}");
}

/// With `--listen-password`, the upstream is opened only once the client has given it.
#[tokio::test]
async fn the_upstream_is_opened_only_after_the_listen_password() {
    let (mut client, proxy_client) = duplex(1 << 16);
    let (proxy_upstream, mut server) = duplex(1 << 16);
    let (_tx, watch) = watch::channel(CredentialState {
        current: Some(credential(1)),
        last_error: None,
    });
    let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = opened.clone();
    let opener: Opener<DuplexStream> = Box::new(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            Ok(Upstream {
                stream: proxy_upstream,
                credential: Some(credential(1)),
            })
        })
    });
    let session = Session::with_opener(1, ctx(Some("pw")), proxy_client, opener, watch);
    let _task = tokio::spawn(session.run(CancellationToken::new()));
    client.write_all(&cmd(&["GET", "k"])).await.unwrap();
    let noauth = "-NOAUTH Authentication required.\r\n";
    assert_eq!(read_exactly(&mut client, noauth.len()).await, noauth);
    assert!(!opened.load(std::sync::atomic::Ordering::SeqCst));
    client
        .write_all(&[cmd(&["AUTH", "pw"]), cmd(&["GET", "k"])].concat())
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut client, 5).await, "+OK\r\n");
    let mut buf = Vec::new();
    assert_eq!(next_command(&mut server, &mut buf).await, ["GET", "k"]);
    assert!(opened.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn an_upstream_that_cannot_be_opened_is_reported_to_the_client() {
    let (mut client, proxy_client) = duplex(1 << 16);
    let (_tx, watch) = watch::channel(CredentialState::default());
    let opener: Opener<DuplexStream> =
        Box::new(|| Box::pin(async { Err("upstream authentication failed: WRONGPASS".into()) }));
    let session = Session::with_opener(1, ctx(Some("pw")), proxy_client, opener, watch);
    let task = tokio::spawn(session.run(CancellationToken::new()));
    client.write_all(&cmd(&["AUTH", "pw"])).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "+OK\r\n-ERR redis-entra-proxy: upstream authentication failed: WRONGPASS\r\n"
    );
    let end = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::UpstreamUnavailable(_)), "{end:?}");
}

#[tokio::test]
async fn a_blocked_client_that_leaves_closes_its_upstream_at_once() {
    let (mut client, proxy_client) = duplex(1 << 16);
    let (proxy_upstream, mut server) = duplex(1 << 16);
    let (_tx, watch) = watch::channel(CredentialState::default());
    let session = Session::new(
        1,
        ctx(None),
        proxy_client,
        Upstream {
            stream: proxy_upstream,
            credential: None,
        },
        watch,
    );
    let task = tokio::spawn(session.run(CancellationToken::new()));
    let mut buf = Vec::new();
    client.write_all(&cmd(&["BLPOP", "k", "0"])).await.unwrap();
    assert_eq!(
        next_command(&mut server, &mut buf).await,
        ["BLPOP", "k", "0"]
    );
    client.shutdown().await.unwrap();
    let end = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::ClientClosed), "{end:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, server.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the upstream was closed");
}

#[tokio::test]
async fn shutdown_ends_the_session() {
    let (_client, proxy_client) = duplex(1 << 16);
    let (proxy_upstream, _server) = duplex(1 << 16);
    let (_tx, watch) = watch::channel(CredentialState::default());
    let session = Session::new(
        1,
        ctx(None),
        proxy_client,
        Upstream {
            stream: proxy_upstream,
            credential: None,
        },
        watch,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(session.run(stop.clone()));
    stop.cancel();
    let end = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(end, SessionEnd::Shutdown), "{end:?}");
}
