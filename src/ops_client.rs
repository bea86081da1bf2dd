//! The `wait` and `shutdown` subcommands: small HTTP clients of a running proxy's admin
//! endpoint ([`crate::admin`]).
//!
//! * `wait` polls `GET /startup` until it answers 200 (an init container in front of an app
//!   that can't use a native sidecar), giving up after `--max`.
//! * `shutdown` sends `POST /quitquitquit` to the control endpoint (a `preStop` hook, or a
//!   Job's last step), which listens on loopback only (see [`crate::admin`]).
//!
//! Plain hyper over one TCP connection per request rather than reqwest: the admin endpoint is
//! plain HTTP on (usually) loopback, so no TLS stack is needed, and reqwest would honour
//! `HTTP_PROXY`/`http_proxy` from the environment and send a loopback probe to a corporate proxy.

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// How often `wait` asks `/startup`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Upper bound of one request (connect + answer): the admin endpoint answers from memory.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer body read (the 503 reasons are one line).
const MAX_BODY: usize = 64 * 1024;

/// Polls `GET /startup` on `admin` every [`POLL_INTERVAL`] until it answers 200 (→ how long it
/// took) or `max` has passed (→ a message with the last answer or connection error). Asked at
/// least once, even with `max` 0.
pub async fn wait(admin: &str, max: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let deadline = started + max;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = request_within(
            Method::GET,
            admin,
            "/startup",
            remaining.clamp(Duration::from_millis(100), REQUEST_TIMEOUT),
        )
        .await;
        let last = match attempt {
            Ok((200, _)) => return Ok(started.elapsed()),
            Ok((status, body)) => format!("GET /startup answered {status} {}", one_line(&body)),
            Err(error) => error,
        };
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(format!(
                "the proxy at {admin} did not start within {} (last: {last})",
                humantime::format_duration(max)
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Sends `POST /quitquitquit` to the control endpoint `control`: `Ok` on 200, else a message
/// saying what happened.
pub async fn shutdown(control: &str) -> Result<(), String> {
    match request(Method::POST, control, "/quitquitquit").await {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!(
            "the control endpoint at {control} answered POST /quitquitquit with {status} {}",
            one_line(&body)
        )),
        Err(error) => Err(error),
    }
}

/// One request with [`REQUEST_TIMEOUT`]: `(status, body)` or why there was no answer.
pub async fn request(method: Method, admin: &str, path: &str) -> Result<(u16, String), String> {
    request_within(method, admin, path, REQUEST_TIMEOUT).await
}

async fn request_within(
    method: Method,
    admin: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let dial = dial_address(admin);
    let exchange = async {
        let tcp = TcpStream::connect(dial.as_str())
            .await
            .map_err(|e| format!("cannot connect to {dial}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP to {dial}: {e}"))?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, dial.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path} on {dial}: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{method} {path} on {dial}: no answer within {}",
                humantime::format_duration(timeout)
            ))
        })
}

/// Where to connect for an admin endpoint given as the proxy's `--admin-listen`: a wildcard
/// bind address (`0.0.0.0`, `[::]`, as a pod exposing its probes uses) is reached on loopback,
/// so the same variable works for the proxy and for these subcommands.
fn dial_address(admin: &str) -> String {
    match admin.rsplit_once(':') {
        Some(("0.0.0.0", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => admin.to_string(),
    }
}

/// A body as one short line for a message.
fn one_line(body: &str) -> String {
    let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        format!("{}…", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_dialled_on_loopback() {
        assert_eq!(dial_address("0.0.0.0:9090"), "127.0.0.1:9090");
        assert_eq!(dial_address("[::]:9090"), "[::1]:9090");
        assert_eq!(dial_address("127.0.0.1:9090"), "127.0.0.1:9090");
        assert_eq!(dial_address("[::1]:9"), "[::1]:9");
        assert_eq!(dial_address("localhost:9090"), "localhost:9090");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let admin = format!("127.0.0.1:{port}");
        let error = shutdown(&admin).await.expect_err("nothing there");
        assert!(
            error.starts_with(&format!("cannot connect to {admin}")),
            "{error}"
        );
        let started = Instant::now();
        let error = wait(&admin, Duration::from_millis(500))
            .await
            .expect_err("nothing there");
        assert!(error.contains("did not start within 500ms"), "{error}");
        assert!(error.contains("cannot connect"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
