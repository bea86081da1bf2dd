//! The core driven byte by byte: a scripted client on one side, a scripted server on the other,
//! no sockets and no clock but the one the test passes in.

use super::*;
use crate::credential::AuthCredential;
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::time::{Duration, SystemTime};

fn credential(generation: u64, lifetime: Duration) -> Arc<AuthCredential> {
    Arc::new(AuthCredential::new(
        Some("oid".into()),
        Secret::new(format!("token-{generation}")),
        Some(SystemTime::now() + lifetime),
        generation,
    ))
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    encode_command(&refs).to_vec()
}

/// A core between a scripted application and a scripted server.
struct H {
    core: Core,
    now: Instant,
    lifetime: Duration,
}

impl H {
    fn new() -> H {
        H::with(None, Duration::from_secs(3600))
    }

    fn with(listen_password: Option<&str>, lifetime: Duration) -> H {
        H::in_database(0, listen_password, lifetime)
    }

    fn in_database(database: u32, listen_password: Option<&str>, lifetime: Duration) -> H {
        let ctx = Arc::new(RelayContext {
            database,
            listen_password: listen_password.map(Secret::new),
            authenticate: true,
            metrics: Metrics::new(),
        });
        let first = credential(1, lifetime);
        let mut core = Core::new(1, ctx, Some(first.clone()));
        if listen_password.is_none() {
            core.upstream_opened(Some(first));
        }
        H {
            core,
            now: Instant::now(),
            lifetime,
        }
    }

    fn client_raw(&mut self, raw: &[u8]) {
        self.core.client_input().extend_from_slice(raw);
        self.core.process(self.now);
    }

    fn client(&mut self, commands: &[&[&str]]) {
        let mut raw = Vec::new();
        for c in commands {
            raw.extend(cmd(c));
        }
        self.client_raw(&raw);
    }

    fn server_replies(&mut self, raw: &[u8]) {
        self.core.upstream_input().extend_from_slice(raw);
        self.core.process(self.now);
    }

    /// Every command the server received since the last call.
    fn server_got(&mut self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let buf = std::mem::take(self.core.to_upstream());
        let mut scanner = Scanner::new(Grammar::Request);
        let mut pos = 0;
        while let Some(f) = scanner.scan(&buf[pos..]).unwrap() {
            out.push(
                Args::new(&buf[pos..pos + f.len])
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            );
            pos += f.len;
        }
        assert_eq!(pos, buf.len(), "a partial command went upstream");
        out
    }

    fn server_gets(&mut self, expected: &[&[&str]]) {
        let got = self.server_got();
        let want: Vec<Vec<String>> = expected
            .iter()
            .map(|c| c.iter().map(|s| s.to_string()).collect())
            .collect();
        assert_eq!(got, want);
    }

    fn client_got(&mut self) -> String {
        let buf = std::mem::take(self.core.to_client());
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn client_gets(&mut self, expected: &str) {
        assert_eq!(self.client_got(), expected);
    }

    fn rotate(&mut self, generation: u64) {
        self.core
            .credential_published(Some(credential(generation, self.lifetime)));
        self.core.process(self.now);
    }

    fn later(&mut self, by: Duration) {
        self.now += by;
        self.core.process(self.now);
    }
}

#[test]
fn injected_auth_waits_for_exec_and_its_reply_is_consumed() {
    let mut h = H::new();
    h.client(&[&["MULTI"], &["SET", "k", "v"]]);
    h.server_gets(&[&["MULTI"], &["SET", "k", "v"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n");
    h.rotate(2);
    h.server_gets(&[]); // no AUTH inside the transaction
    h.client(&[&["EXEC"]]);
    h.server_gets(&[&["EXEC"]]);
    h.server_replies(b"*1\r\n+OK\r\n");
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("*1\r\n+OK\r\n");
}

#[test]
fn auth_reply_is_taken_out_of_a_pipeline_in_order() {
    let mut h = H::new();
    h.client(&[&["GET", "a"]]);
    h.rotate(2);
    h.client(&[&["GET", "b"]]);
    h.server_gets(&[&["GET", "a"], &["AUTH", "oid", "token-2"], &["GET", "b"]]);
    h.server_replies(b"$1\r\n1\r\n+OK\r\n$1\r\n2\r\n");
    h.client_gets("$1\r\n1\r\n$1\r\n2\r\n");
}

/// With replies off, the `AUTH` goes bare and nothing waits for a reply Redis does not send:
/// the client's next replies are its own.
#[test]
fn replies_off_sends_auth_bare_and_awaits_nothing() {
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "OFF"]]);
    h.rotate(2);
    h.server_gets(&[&["CLIENT", "REPLY", "OFF"], &["AUTH", "oid", "token-2"]]);
    assert_eq!(h.core.credential().map(|c| c.generation), Some(2));
    assert_eq!(h.core.ctx.metrics.reauth_unanswered.get(), 1);
    h.rotate(3); // the next token is injected too: none is taken to be in flight
    h.server_gets(&[&["AUTH", "oid", "token-3"]]);
    h.client(&[&["CLIENT", "REPLY", "ON"], &["PING"]]);
    h.server_replies(b"+OK\r\n+PONG\r\n");
    h.client_gets("+OK\r\n+PONG\r\n");
}

/// The review's reproduction (real Redis 7.0.15): a client with replies off is re-authenticated
/// while another client's script runs past `busy-reply-threshold`. Redis refused the proxy's old
/// `CLIENT REPLY ON` wrapper with a `-BUSY` that replies-off suppressed, ran the `AUTH` without
/// a reply, and the proxy handed the client's next two replies (`+OK`, `+PONG`) to the wrapper.
/// Now no reply is awaited, so whatever a busy server does with the injection, the client's
/// replies stay its own.
#[test]
fn replies_off_reauth_while_the_server_is_busy_costs_the_client_no_reply() {
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "OFF"], &["SET", "k", "v"]]);
    h.rotate(2); // the server is busy now: it answers nothing here, as replies are off
    h.server_gets(&[
        &["CLIENT", "REPLY", "OFF"],
        &["SET", "k", "v"],
        &["AUTH", "oid", "token-2"],
    ]);
    h.client(&[&["CLIENT", "REPLY", "ON"], &["PING"], &["GET", "k"]]);
    h.server_replies(b"+OK\r\n+PONG\r\n$1\r\nv\r\n");
    h.client_gets("+OK\r\n+PONG\r\n$1\r\nv\r\n");
}

/// A `CLIENT REPLY SKIP` with nothing after it yet: the `AUTH` goes at once (an idle
/// connection must not wait for its next command while its token runs out), wrapped so that the
/// client's next command is still the skipped one.
#[test]
fn skip_is_restored_around_an_injected_auth() {
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "SKIP"]]);
    h.rotate(2);
    h.server_gets(&[
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "ON"],
        &["AUTH", "oid", "token-2"],
        &["CLIENT", "REPLY", "SKIP"],
    ]);
    h.server_replies(b"+OK\r\n+OK\r\n");
    assert_eq!(h.core.credential().map(|c| c.generation), Some(2));
    h.client(&[&["SET", "k", "v"], &["PING"]]);
    h.server_replies(b"+PONG\r\n"); // the SET's reply is skipped by the server
    h.client_gets("+PONG\r\n");
}

/// Defect 1: Redis clears SKIP before answering `CLIENT REPLY ON`, so ON's `+OK` is the
/// client's; and the replies after it keep their owners.
#[test]
fn reply_on_right_after_skip_is_answered() {
    let mut h = H::new();
    h.client(&[
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "ON"],
        &["BLPOP", "k", "3"],
        &["AUTH", "x"],
    ]);
    let sent = h.server_got();
    assert_eq!(
        sent[..2],
        [["CLIENT", "REPLY", "SKIP"], ["CLIENT", "REPLY", "ON"]]
    );
    assert_eq!(sent[2][..2], ["BLPOP", "k"]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("+OK\r\n"); // the local +OK for AUTH waits for BLPOP's reply
    h.now += Duration::from_millis(3100); // the client's own timeout passed
    h.server_replies(b"*-1\r\n");
    h.client_gets("*-1\r\n+OK\r\n");
}

#[test]
fn a_failed_reauth_is_invisible_and_retried() {
    let mut h = H::new();
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
    h.server_replies(WRONGPASS);
    h.server_gets(&[]);
    h.later(Duration::from_millis(150)); // after the backoff
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("");
    h.rotate(3);
    h.server_gets(&[&["AUTH", "oid", "token-3"]]);
}

#[test]
fn client_auth_is_answered_locally_in_order() {
    let mut h = H::new();
    h.client(&[&["GET", "a"], &["AUTH", "old-key"], &["GET", "b"]]);
    h.server_gets(&[&["GET", "a"], &["GET", "b"]]);
    h.server_replies(b"$1\r\n1\r\n$1\r\n2\r\n");
    h.client_gets("$1\r\n1\r\n+OK\r\n$1\r\n2\r\n");
    h.client(&[&["AUTH"], &["AUTH", "a", "b", "c"]]);
    h.client_gets("-ERR wrong number of arguments for 'auth' command\r\n-ERR syntax error\r\n");
}

/// Defect 11: no upstream before the listen password; NOAUTH for the rest; failures counted
/// and slowed down.
#[test]
fn listen_password_gates_every_command_and_the_upstream() {
    let mut h = H::with(Some("pw"), Duration::from_secs(3600));
    h.client(&[
        &["GET", "a"],
        &["AUTH", "wrong"],
        &["AUTH", "default", "pw"],
    ]);
    assert!(!h.core.wants_upstream(), "no upstream before the password");
    h.client_gets(&format!(
        "{}{}",
        std::str::from_utf8(NOAUTH).unwrap(),
        std::str::from_utf8(WRONGPASS).unwrap()
    ));
    assert_eq!(h.core.ctx.metrics.client_auth_failures.get(), 1);
    h.later(Duration::from_millis(50));
    h.client_gets(""); // the next attempt waits
    h.later(Duration::from_millis(100));
    h.client_gets("+OK\r\n");
    assert!(h.core.wants_upstream());
    h.client(&[&["GET", "a"]]);
    h.server_gets(&[]); // held until the upstream is open
    h.core.upstream_opened(Some(credential(1, h.lifetime)));
    h.core.process(h.now);
    h.server_gets(&[&["GET", "a"]]);
}

#[test]
fn unauthenticated_limits_are_redis_own() {
    let mut h = H::with(Some("pw"), Duration::from_secs(3600));
    h.client(&[&["SET", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]]);
    h.client_gets("-ERR Protocol error: unauthenticated multibulk length\r\n");
    assert!(matches!(
        h.core.finished(),
        Some(Err(SessionEnd::ClientProtocol(_)))
    ));
}

/// Defect 7: malformed input gets Redis's own words.
#[test]
fn malformed_input_gets_redis_error_text_after_earlier_replies() {
    for (input, error) in [
        (
            &b"*1\r\nfoo\r\n"[..],
            "-ERR Protocol error: expected '$', got 'f'\r\n",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*3000000000\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"set \"\"\"k\"\"\" v\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ] {
        let mut h = H::new();
        h.client(&[&["GET", "a"]]);
        h.client_raw(input);
        h.server_gets(&[&["GET", "a"]]);
        h.server_replies(b"$1\r\n1\r\n");
        h.client_gets(&format!("$1\r\n1\r\n{error}"));
        assert!(matches!(
            h.core.finished(),
            Some(Err(SessionEnd::ClientProtocol(_)))
        ));
    }
}

/// Defect 8: answers the proxy makes itself are back-pressured like relayed ones.
#[test]
fn local_answers_stop_when_the_client_does_not_read() {
    let mut h = H::with(Some("pw"), Duration::from_secs(3600));
    let one = cmd(&["x"]);
    let mut flood = Vec::new();
    while flood.len() < 4 * HIGH_WATER {
        flood.extend_from_slice(&one);
    }
    h.client_raw(&flood);
    assert!(h.core.to_client().len() < HIGH_WATER + 64);
    assert!(!h.core.wants_client_input(), "the client is no longer read");
}

/// Defect 2: a RESP3 subscriber that asks for RESP2 keeps a RESP3 upstream (so it can still be
/// re-authenticated) and gets RESP2 from then on.
#[test]
fn hello_2_from_a_resp3_subscriber_keeps_the_upstream_on_resp3() {
    let mut h = H::new();
    h.client(&[&["HELLO", "3"]]);
    h.server_gets(&[&["HELLO", "3"]]);
    h.server_replies(b"%1\r\n$5\r\nproto\r\n:3\r\n");
    h.client(&[&["SUBSCRIBE", "c"]]);
    h.server_replies(b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    h.client(&[&["HELLO", "2"]]);
    h.server_gets(&[&["SUBSCRIBE", "c"], &["HELLO", "3"]]);
    h.server_replies(b"%1\r\n$5\r\nproto\r\n:3\r\n");
    h.client_gets(
        "%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n*2\r\n$5\r\nproto\r\n:2\r\n",
    );
    h.server_replies(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n");
    h.client_gets("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n");
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("");
    h.client(&[&["GET", "k"]]);
    h.client_gets("-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n");
}

/// Defect 3: with replies off, the proxy's own `HELLO 3` is wrapped so its reply comes and is
/// consumed; the client sees nothing it would not have seen.
#[test]
fn replies_off_then_a_resp2_subscribe() {
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "OFF"], &["SUBSCRIBE", "c"]]);
    h.server_gets(&[
        &["CLIENT", "REPLY", "OFF"],
        &["CLIENT", "REPLY", "ON"],
        &["HELLO", "3"],
        &["CLIENT", "REPLY", "OFF"],
        &["SUBSCRIBE", "c"],
    ]);
    h.server_replies(
        b"+OK\r\n%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
    );
    h.client_gets("*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
}

/// Defect 4: RESP2 client-side caching with REDIRECT: the subscriber gets the RESP2 message.
#[test]
fn invalidations_reach_a_resp2_redirect_subscriber_as_messages() {
    let mut h = H::new();
    h.client(&[&["SUBSCRIBE", "__redis__:invalidate"]]);
    h.server_gets(&[&["HELLO", "3"], &["SUBSCRIBE", "__redis__:invalidate"]]);
    h.server_replies(b"%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n");
    h.client_got();
    h.server_replies(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n");
    h.client_gets("*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$3\r\nkey\r\n");
}

/// Defect 5: any nesting depth is relayed.
#[test]
fn replies_nested_very_deeply_are_relayed() {
    let mut h = H::new();
    h.client(&[&["EVAL", "x", "0"]]);
    let mut deep = Vec::new();
    for _ in 0..100_000 {
        deep.extend_from_slice(b"*1\r\n");
    }
    deep.extend_from_slice(b"-ERR reached lua stack limit\r\n");
    h.server_replies(&deep);
    assert_eq!(h.client_got().len(), deep.len());
    assert!(h.core.finished().is_none());
}

/// Defect 6: after SYNC, bytes are relayed as they are, and no AUTH is injected.
#[test]
fn sync_turns_the_connection_into_an_opaque_relay() {
    let mut h = H::new();
    h.client(&[&["GET", "a"], &["SYNC"], &["REPLCONF", "ACK", "0"]]);
    h.server_gets(&[&["GET", "a"], &["SYNC"]]);
    h.server_replies(b"$1\r\n1\r\n$5\r\nREDIS*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
    h.client_gets("$1\r\n1\r\n$5\r\nREDIS*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
    h.server_gets(&[&["REPLCONF", "ACK", "0"]]);
    h.rotate(2);
    h.server_gets(&[]);
    h.client_raw(b"*1\r\n$4\r\nPING\r\n");
    h.server_gets(&[&["PING"]]);
}

/// A RESET brings an opaque connection back: its reply is found in the unparsed stream (the
/// proxy's ECHO after it marks the spot), and the proxy authenticates the connection again.
#[test]
fn reset_brings_an_opaque_connection_back() {
    let mut h = H::new();
    h.client(&[&["MULTI"], &["SUBSCRIBE", "c"], &["EXEC"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    h.server_got();
    h.client_gets("+OK\r\n+QUEUED\r\n*1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    h.client(&[&["RESET"], &["GET", "k"]]);
    let sent = h.server_got();
    assert_eq!(sent[0], ["RESET"]);
    let nonce = sent[1][0].clone();
    assert!(nonce.starts_with("redis-entra-proxy-resync-"), "{nonce}");
    h.server_replies(format!("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n+RESET\r\n-ERR unknown command '{nonce}', with args beginning with: \r\n").as_bytes());
    h.client_gets("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n+RESET\r\n");
    h.server_gets(&[&["AUTH", "oid", "token-1"], &["GET", "k"]]);
    h.server_replies(b"+OK\r\n$-1\r\n");
    h.client_gets("$-1\r\n");
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
}

#[test]
fn a_refused_sync_leaves_the_connection_as_it_was() {
    let mut h = H::new();
    h.client(&[&["SYNC"], &["PING"]]);
    h.server_gets(&[&["SYNC"]]);
    h.server_replies(b"-NOPERM nope\r\n");
    h.server_gets(&[&["PING"]]);
    h.server_replies(b"+PONG\r\n");
    h.client_gets("-NOPERM nope\r\n+PONG\r\n");
}

/// Defect 9: HELLO and CLIENT REPLY queued in MULTI take effect when EXEC runs them, not when
/// Redis answers `+QUEUED`.
#[test]
fn state_changes_inside_multi_happen_at_exec() {
    let mut h = H::new();
    h.client(&[&["MULTI"], &["HELLO", "3"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n");
    // Nothing changed yet: a discarded transaction changes nothing.
    h.client(&[&["DISCARD"], &["SUBSCRIBE", "c"]]);
    h.server_gets(&[
        &["MULTI"],
        &["HELLO", "3"],
        &["DISCARD"],
        &["HELLO", "3"],
        &["SUBSCRIBE", "c"],
    ]);
    h.server_replies(
        b"+OK\r\n%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n",
    );
    h.client_gets("+OK\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"); // still RESP2: translated
    let mut h = H::new();
    // Run by EXEC: the SUBSCRIBE after it waits for EXEC's reply, then needs no translation.
    h.client(&[&["MULTI"], &["HELLO", "3"], &["EXEC"], &["SUBSCRIBE", "c"]]);
    h.server_gets(&[&["MULTI"], &["HELLO", "3"], &["EXEC"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n*1\r\n%1\r\n$5\r\nproto\r\n:3\r\n");
    h.server_gets(&[&["SUBSCRIBE", "c"]]);
    h.server_replies(b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n*1\r\n%1\r\n$5\r\nproto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n");
    // A WATCH that failed runs nothing: still RESP2 afterwards.
    let mut h = H::new();
    h.client(&[&["MULTI"], &["HELLO", "3"], &["EXEC"], &["SUBSCRIBE", "c"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n*-1\r\n");
    h.server_gets(&[
        &["MULTI"],
        &["HELLO", "3"],
        &["EXEC"],
        &["HELLO", "3"],
        &["SUBSCRIBE", "c"],
    ]);
}

/// CLIENT REPLY SKIP and OFF run by EXEC leave elements of EXEC's array unwritten (Redis): the
/// proxy relays exactly what comes, keeps every later reply's owner, and can still
/// re-authenticate.
#[test]
fn reply_skip_and_off_inside_exec_are_followed_exactly() {
    let mut h = H::new();
    h.client(&[
        &["MULTI"],
        &["CLIENT", "REPLY", "SKIP"],
        &["EXEC"],
        &["PING"],
        &["PING", "b"],
    ]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n*1\r\n");
    h.server_gets(&[
        &["MULTI"],
        &["CLIENT", "REPLY", "SKIP"],
        &["EXEC"],
        &["PING"],
        &["PING", "b"],
    ]);
    h.server_replies(b"$1\r\nb\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n*1\r\n$1\r\nb\r\n");
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("");

    let mut h = H::new();
    h.client(&[
        &["MULTI"],
        &["SET", "a", "1"],
        &["CLIENT", "REPLY", "OFF"],
        &["SET", "b", "2"],
        &["EXEC"],
        &["GET", "a"],
    ]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n");
    h.server_got();
    h.rotate(2);
    h.server_gets(&[&["AUTH", "oid", "token-2"]]);
}

#[test]
fn auth_inside_multi_is_queued_as_the_proxys_own() {
    let mut h = H::new();
    h.client(&[&["MULTI"], &["AUTH", "whatever"], &["EXEC"]]);
    h.server_gets(&[&["MULTI"], &["AUTH", "oid", "token-1"], &["EXEC"]]);
    h.server_replies(b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
    h.client_gets("+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n");
}

/// Defect 10: a failed re-AUTH between slices: the next slice still fits the old token.
#[test]
fn a_slice_after_a_failed_reauth_fits_the_old_token() {
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BLPOP", "k", "0"]]);
    let first = h.server_got();
    assert_eq!(first[0][..2], ["BLPOP", "k"]);
    let slice: f64 = first[0][2].parse().unwrap();
    assert!(slice > 0.0 && slice <= 5.0, "{slice}");
    h.lifetime = Duration::from_secs(3600);
    h.rotate(2);
    h.now += Duration::from_secs_f64(slice); // the slice ran out
    h.server_replies(b"*-1\r\n");
    let sent = h.server_got();
    assert_eq!(sent[0], ["AUTH", "oid", "token-2"]);
    assert_eq!(sent[1][..2], ["BLPOP", "k"]);
    let second: f64 = sent[1][2].parse().unwrap();
    assert!(
        second <= 5.0,
        "sized from the token the connection holds, not the new one: {second}"
    );
    h.server_replies(WRONGPASS);
    h.now += Duration::from_secs_f64(second);
    h.server_replies(b"*-1\r\n");
    let sent = h.server_got();
    let blpop = sent.iter().find(|c| c[0] == "BLPOP").expect("re-issued");
    let third: f64 = blpop[2].parse().unwrap();
    assert!(third <= 5.0, "{third}");
    h.client_gets("");
}

/// A timeout reply before the slice could have run out was `CLIENT UNBLOCK … TIMEOUT` from
/// another connection: the client gets it, as it would without the proxy.
#[test]
fn an_unblocked_slice_is_the_clients_answer() {
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BRPOP", "k", "0"]]);
    h.server_got();
    h.now += Duration::from_millis(10);
    h.server_replies(b"*-1\r\n");
    h.client_gets("*-1\r\n");
    h.server_gets(&[]);
}

/// Another client's script ran past `busy-reply-threshold` while this client was blocked: the
/// re-issued slice is refused with `-BUSY`, which the client (blocked before the server became
/// busy) would never have seen. The slice is sent again, every `BUSY_RETRY`, until it runs;
/// only its real reply reaches the client, and its later commands wait as while blocked.
#[test]
fn a_slice_refused_busy_is_sent_again_and_the_client_stays_blocked() {
    const BUSY: &[u8] =
        b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.\r\n";
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BLPOP", "k", "0"]]);
    let first = h.server_got();
    let slice: f64 = first[0][2].parse().unwrap();
    h.now += Duration::from_secs_f64(slice);
    h.server_replies(b"*-1\r\n"); // the first slice ran out
    assert_eq!(h.server_got()[0][..2], ["BLPOP", "k"]);
    h.server_replies(BUSY);
    h.client_gets("");
    h.client(&[&["GET", "other"]]); // waits, as behind a blocked command
    h.server_gets(&[]);
    for _ in 0..3 {
        assert_eq!(h.core.next_wakeup(), Some(h.now + BUSY_RETRY));
        h.later(BUSY_RETRY);
        assert_eq!(h.server_got()[0][..2], ["BLPOP", "k"]);
        h.server_replies(BUSY);
        h.client_gets("");
    }
    h.later(BUSY_RETRY); // the script is over: the slice blocks, then gets the data
    assert_eq!(h.server_got()[0][..2], ["BLPOP", "k"]);
    h.server_replies(b"*2\r\n$1\r\nk\r\n$1\r\nv\r\n");
    h.client_gets("*2\r\n$1\r\nk\r\n$1\r\nv\r\n");
    h.server_gets(&[&["GET", "other"]]);
    assert_eq!(h.core.next_wakeup(), None);
}

/// A `-BUSY` to the client's own blocking command is the client's: its command reached a busy
/// server, as it would have directly. So is an error that only starts like it.
#[test]
fn a_busy_refusal_of_the_clients_own_command_is_its_answer() {
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BLPOP", "k", "0"]]);
    h.server_got();
    h.server_replies(b"-BUSY Redis is busy running a script.\r\n");
    h.client_gets("-BUSY Redis is busy running a script.\r\n");
    h.client(&[&["BLPOP", "k", "0"]]);
    let first = h.server_got();
    let slice: f64 = first[0][2].parse().unwrap();
    h.now += Duration::from_secs_f64(slice);
    h.server_replies(b"*-1\r\n");
    h.server_got();
    h.server_replies(b"-BUSYKEY Target key name already exists.\r\n");
    h.client_gets("-BUSYKEY Target key name already exists.\r\n");
    assert_eq!(h.core.next_wakeup(), None);
}

/// A client that leaves while its slice waits out a busy server ends its session.
#[test]
fn a_client_that_leaves_while_its_slice_waits_ends_the_session() {
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BLPOP", "k", "0"]]);
    let slice: f64 = h.server_got()[0][2].parse().unwrap();
    h.now += Duration::from_secs_f64(slice);
    h.server_replies(b"*-1\r\n");
    h.server_got();
    h.server_replies(b"-BUSY Redis is busy running a script.\r\n");
    h.core.client_closed();
    assert!(matches!(h.core.finished(), Some(Ok(()))));
}

#[test]
fn a_blocked_client_that_leaves_ends_the_session_at_once() {
    let mut h = H::with(None, Duration::from_secs(10));
    h.client(&[&["BLPOP", "k", "0"]]);
    h.server_got();
    h.core.client_closed();
    assert!(matches!(h.core.finished(), Some(Ok(()))));
}

#[test]
fn asking_is_restored_after_an_injected_auth() {
    let mut h = H::new();
    h.client(&[&["ASKING"]]);
    h.server_replies(b"+OK\r\n");
    h.rotate(2);
    h.server_gets(&[&["ASKING"], &["AUTH", "oid", "token-2"], &["ASKING"]]);
    h.server_replies(b"+OK\r\n+OK\r\n");
    h.client_gets("+OK\r\n");
}

#[test]
fn monitor_feed_hides_only_the_proxys_own_auth() {
    let mut h = H::new();
    h.client(&[&["MONITOR"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("+OK\r\n");
    h.rotate(2);
    h.server_gets(&[&["MONITOR"], &["AUTH", "oid", "token-2"]]);
    h.server_replies(b"+1.5 [0 127.0.0.1:1] \"GET\" \"k\"\r\n+OK\r\n+1.6 [0 127.0.0.1:2] \"AUTH\" \"(redacted)\" \"(redacted)\"\r\n+1.7 [0 127.0.0.1:1] \"PING\"\r\n");
    h.client_gets("+1.5 [0 127.0.0.1:1] \"GET\" \"k\"\r\n+1.7 [0 127.0.0.1:1] \"PING\"\r\n");
}

/// Found by the differential fuzzer: `RESET` on a `MONITOR` feed. Lines of commands that ran
/// before it still arrive ahead of its `+RESET`; they are feed lines, not its reply.
#[test]
fn reset_ends_a_monitor_feed_with_its_own_reply() {
    let mut h = H::new();
    h.client(&[&["MONITOR"], &["RESET"], &["GET", "a"]]);
    h.server_gets(&[&["MONITOR"]]);
    h.server_replies(b"+OK\r\n");
    h.server_gets(&[&["RESET"], &["AUTH", "oid", "token-1"]]);
    h.server_replies(b"+1.5 [0 127.0.0.1:2] \"SELECT\" \"0\"\r\n+RESET\r\n+OK\r\n");
    h.server_gets(&[&["GET", "a"]]);
    h.server_replies(b"$-1\r\n");
    h.client_gets("+OK\r\n+1.5 [0 127.0.0.1:2] \"SELECT\" \"0\"\r\n+RESET\r\n$-1\r\n");
}

#[test]
fn reset_reauthenticates_before_anything_else() {
    let mut h = H::new();
    h.client(&[&["RESET"], &["GET", "a"]]);
    h.server_gets(&[&["RESET"], &["AUTH", "oid", "token-1"]]);
    h.server_replies(b"+RESET\r\n+OK\r\n");
    h.server_gets(&[&["GET", "a"]]);
    h.server_replies(b"$-1\r\n");
    h.client_gets("+RESET\r\n$-1\r\n");
}

/// Redis skips RESET's own reply after CLIENT REPLY SKIP (RESET clears a pending skip, not the
/// one in force), though it clears OFF and answers then.
#[test]
fn reset_right_after_skip_is_not_answered() {
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "SKIP"], &["RESET"], &["PING"]]);
    h.server_gets(&[
        &["CLIENT", "REPLY", "SKIP"],
        &["CLIENT", "REPLY", "ON"],
        &["RESET"],
        &["AUTH", "oid", "token-1"],
    ]);
    h.server_replies(b"+OK\r\n+RESET\r\n+OK\r\n");
    h.server_gets(&[&["PING"]]);
    h.server_replies(b"+PONG\r\n");
    h.client_gets("+PONG\r\n");
    let mut h = H::new();
    h.client(&[&["CLIENT", "REPLY", "OFF"], &["RESET"]]);
    h.server_replies(b"+RESET\r\n+OK\r\n");
    h.client_gets("+RESET\r\n");
}

#[test]
fn quit_delivers_the_ok_then_ends() {
    let mut h = H::new();
    h.client(&[&["QUIT"], &["GET", "ignored"]]);
    h.server_gets(&[&["QUIT"]]);
    h.server_replies(b"+OK\r\n");
    h.client_gets("+OK\r\n");
    assert!(h.core.upstream_closed().is_ok());
}

#[test]
fn large_commands_stream_when_only_their_name_matters() {
    let mut h = H::new();
    let big = "x".repeat(2 * 1024 * 1024);
    let raw = cmd(&["SET", "k", &big]);
    for chunk in raw.chunks(16 * 1024) {
        h.client_raw(chunk);
        assert!(h.core.client_input().len() <= CLIENT_BUFFER + 16 * 1024);
        let _ = std::mem::take(h.core.to_upstream()).len();
    }
    h.server_replies(b"+OK\r\n");
    h.client_gets("+OK\r\n");
}

#[test]
fn a_command_too_large_to_inspect_is_refused_not_hung() {
    let mut h = H::new();
    let big = "x".repeat(2 * 1024 * 1024);
    let raw = cmd(&["HELLO", "3", "SETNAME", &big]);
    for chunk in raw.chunks(64 * 1024) {
        if !h.core.wants_client_input() {
            break;
        }
        h.client_raw(chunk);
    }
    h.client_gets("-ERR Protocol error: command too large for redis-entra-proxy to inspect\r\n");
    h.server_gets(&[]);
}

/// With replies off, what EXEC changes can't be confirmed (a `CLIENT REPLY ON` sent to see its
/// reply would itself be queued): the connection is relayed as opaque bytes from then on.
#[test]
fn exec_of_state_changes_with_replies_off_turns_the_connection_opaque() {
    let mut h = H::new();
    h.client(&[
        &["CLIENT", "REPLY", "OFF"],
        &["MULTI"],
        &["HELLO", "3"],
        &["EXEC"],
        &["PSUBSCRIBE", "ch*"],
    ]);
    h.server_gets(&[
        &["CLIENT", "REPLY", "OFF"],
        &["MULTI"],
        &["HELLO", "3"],
        &["EXEC"],
        &["PSUBSCRIBE", "ch*"],
    ]);
    h.server_replies(b">3\r\n$10\r\npsubscribe\r\n$3\r\nch*\r\n:1\r\n");
    h.client_gets(">3\r\n$10\r\npsubscribe\r\n$3\r\nch*\r\n:1\r\n");
    h.rotate(2);
    h.server_gets(&[]);
}

const BUSY_SCRIPT: &[u8] =
    b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.\r\n";

/// `RESET` while another client's script keeps the server busy: Redis runs `RESET` and `AUTH`
/// (both allowed then) but refuses the proxy's `SELECT <--database>`. The `SELECT` goes again
/// ahead of each client command until one runs, so no command of the client's runs in
/// database 0; the client's own refusals reach it as they would directly.
#[test]
fn a_select_after_reset_refused_busy_goes_again_before_the_clients_next_commands() {
    let mut h = H::in_database(9, None, Duration::from_secs(3600));
    h.client(&[&["RESET"]]);
    h.server_gets(&[&["RESET"], &["AUTH", "oid", "token-1"], &["SELECT", "9"]]);
    h.server_replies(b"+RESET\r\n+OK\r\n");
    h.server_replies(BUSY_SCRIPT);
    h.client_gets("+RESET\r\n");
    h.client(&[&["SET", "k", "v"]]);
    h.server_gets(&[&["SELECT", "9"], &["SET", "k", "v"]]);
    h.server_replies(BUSY_SCRIPT);
    h.server_replies(BUSY_SCRIPT);
    h.client_gets(std::str::from_utf8(BUSY_SCRIPT).unwrap()); // the SET's, as directly
    h.client(&[&["SCRIPT", "KILL"], &["SET", "k", "v"]]);
    h.server_gets(&[
        &["SELECT", "9"],
        &["SCRIPT", "KILL"],
        &["SELECT", "9"],
        &["SET", "k", "v"],
    ]);
    h.server_replies(BUSY_SCRIPT); // SELECT
    h.server_replies(b"+OK\r\n"); // SCRIPT KILL: the script is over
    h.server_replies(b"+OK\r\n+OK\r\n"); // SELECT, SET
    h.client_gets("+OK\r\n+OK\r\n");
    h.client(&[&["GET", "k"]]);
    h.server_gets(&[&["GET", "k"]]); // restored: nothing ahead of it any more
    assert!(!h.core.recyclable());
    h.server_replies(b"$1\r\nv\r\n");
    h.client_gets("$1\r\nv\r\n");
}

/// A multiplexed client pinned while another client's script keeps the server busy: its
/// `CLIENT SETNAME` is refused on the new connection and goes again ahead of its commands, so
/// `CLIENT GETNAME` answers its name once the script is over. A `RESET` drops it (as Redis
/// drops the name).
#[test]
fn a_pinned_clients_name_refused_busy_is_set_before_its_next_command() {
    let mut h = H::new();
    let setname = Bytes::from(cmd(&["CLIENT", "SETNAME", "app"]));
    h.core.take_over(&cmd(&["MULTI"]), &[setname], true, false);
    h.core.process(h.now);
    h.server_gets(&[&["CLIENT", "SETNAME", "app"], &["MULTI"]]);
    h.server_replies(BUSY_SCRIPT);
    h.server_replies(BUSY_SCRIPT);
    h.client_gets(std::str::from_utf8(BUSY_SCRIPT).unwrap()); // MULTI's, as directly
    h.client(&[&["CLIENT", "GETNAME"]]);
    h.server_gets(&[&["CLIENT", "SETNAME", "app"], &["CLIENT", "GETNAME"]]);
    h.server_replies(b"+OK\r\n$3\r\napp\r\n");
    h.client_gets("$3\r\napp\r\n");

    let mut h = H::new();
    let setname = Bytes::from(cmd(&["CLIENT", "SETNAME", "app"]));
    h.core.take_over(&[], &[setname], true, false);
    h.core.process(h.now);
    h.server_got();
    h.server_replies(BUSY_SCRIPT);
    h.client(&[&["RESET"]]);
    h.server_gets(&[&["RESET"], &["AUTH", "oid", "token-1"]]);
    h.server_replies(b"+RESET\r\n+OK\r\n");
    h.client(&[&["CLIENT", "GETNAME"]]);
    h.server_gets(&[&["CLIENT", "GETNAME"]]);
}

/// A command held and looked at again (a RESP3 client's `HELLO 2` waits for earlier replies) is
/// preceded by a restoring command once, not at every look.
#[test]
fn a_held_command_is_preceded_by_a_refused_restore_once() {
    let mut h = H::in_database(9, None, Duration::from_secs(3600));
    h.client(&[&["HELLO", "3"]]);
    h.server_gets(&[&["HELLO", "3"]]);
    h.server_replies(b"%1\r\n$5\r\nproto\r\n:3\r\n");
    h.client_got();
    h.client(&[&["RESET"]]);
    h.server_got();
    h.server_replies(b"+RESET\r\n+OK\r\n");
    h.server_replies(BUSY_SCRIPT); // the SELECT
    h.client_got();
    h.client(&[&["HELLO", "3"]]);
    h.server_gets(&[&["SELECT", "9"], &["HELLO", "3"]]);
    h.server_replies(BUSY_SCRIPT); // SELECT
    h.server_replies(b"%1\r\n$5\r\nproto\r\n:3\r\n"); // HELLO 3 (allowed while busy)
    h.client_got();
    h.client(&[&["GET", "k"], &["HELLO", "2"]]);
    // HELLO 2 waits for the GET's reply; its SELECT went once, however often it is looked at.
    h.server_gets(&[&["SELECT", "9"], &["GET", "k"], &["SELECT", "9"]]);
    h.server_replies(b"+OK\r\n"); // SELECT: restored
    h.server_gets(&[]);
    h.server_replies(b"_\r\n"); // GET
    h.server_gets(&[]);
    h.server_replies(b"+OK\r\n"); // the second SELECT
    h.server_gets(&[&["HELLO", "2"]]);
    h.client_gets("_\r\n");
}
