//! Proves that the test fakes in `tests/support` behave as intended, without the proxy: the
//! real Redis over TLS, the fake Azure front's token handling and expiry, and the fake token
//! endpoints. If one of these fails, every proxy test built on it is meaningless.

mod support;

use std::time::{Duration, Instant};
use support::proxy::{address_field, is_admin_listening_line, is_main_listening_line, strip_ansi};
use support::resp::{ParsedCommand, parse_command, parse_value};
use support::{
    AzureFront, EndpointMode, EntraEndpoint, ManagedIdentityEndpoint, RedisServer, RespClient,
    TestPki, TokenIssuer, Value, http_request, random_uuid, wait_until,
};

const OID: &str = "5d0a4bbb-4b9f-4d8b-9e0e-2f6b2a4c1a11";

/// PKI + Redis + issuer + front.
async fn front_env(lifetime: Duration) -> (TestPki, RedisServer, TokenIssuer, AzureFront) {
    let pki = TestPki::new();
    let redis = RedisServer::start(&pki).await;
    let issuer = TokenIssuer::new(OID, lifetime);
    let front = AzureFront::start(&pki, &redis, &issuer).await;
    (pki, redis, issuer, front)
}

fn set_get_roundtrip() -> [&'static str; 3] {
    ["SET", "smoke", "value"]
}

#[tokio::test]
async fn redis_server_speaks_tls_and_takes_the_access_key() {
    let pki = TestPki::new();
    let redis = RedisServer::start(&pki).await;

    let mut c = RespClient::connect_tls(redis.port(), &pki).await;
    assert!(c.cmd(&["GET", "k"]).await.is_error_code("NOAUTH"));
    assert!(
        c.cmd(&["AUTH", "wrong-key"])
            .await
            .is_error_code("WRONGPASS")
    );
    assert_eq!(c.cmd(&["AUTH", &redis.access_key()]).await, Value::ok());
    assert_eq!(c.cmd(&set_get_roundtrip()).await, Value::ok());
    assert_eq!(c.cmd(&["GET", "smoke"]).await, Value::bulk("value"));

    // The admin helper (redis crate over TLS) works too.
    let mut admin = redis.admin().await;
    let pong: String = redis::cmd("PING").query_async(&mut admin).await.unwrap();
    assert_eq!(pong, "PONG");

    // Key rotation: the old key stops working for new connections.
    redis.set_access_keys(&["new-key-1", "new-key-2"]).await;
    let mut c2 = RespClient::connect_tls(redis.port(), &pki).await;
    assert!(
        c2.cmd(&["AUTH", "wrong-key"])
            .await
            .is_error_code("WRONGPASS")
    );
    assert_eq!(c2.cmd(&["AUTH", "new-key-2"]).await, Value::ok());
    assert_eq!(redis.access_key(), "new-key-1");

    // Plain TCP to the TLS port gets nowhere.
    let mut plain =
        RespClient::connect(format!("127.0.0.1:{}", redis.port()).parse().unwrap()).await;
    plain.send(&["PING"]).await;
    assert!(plain.try_read(Duration::from_secs(2)).await.is_err());
}

#[tokio::test]
async fn front_accepts_a_valid_token_and_maps_it_to_a_redis_user() {
    let (pki, redis, issuer, front) = front_env(Duration::from_secs(60)).await;
    let token = issuer.mint();

    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &token]).await, Value::ok());
    assert_eq!(c.cmd(&set_get_roundtrip()).await, Value::ok());
    assert_eq!(c.cmd(&["GET", "smoke"]).await, Value::bulk("value"));
    assert_eq!(front.auth_accepted(), 1);
    assert_eq!(front.auth_rejected(), 0);
    assert_eq!(front.connections_open(), 1);

    // Redis sees the connection as the token's user.
    let users: Vec<String> = redis
        .app_clients()
        .await
        .into_iter()
        .map(|c| c.user)
        .collect();
    assert_eq!(users, vec![AzureFront::redis_user_for(&token)]);

    // HELLO 3 AUTH … SETNAME … is rewritten too, and the rest of HELLO reaches Redis.
    let mut h = RespClient::connect_tls(front.port(), &pki).await;
    let reply = h
        .cmd(&[
            "HELLO",
            "3",
            "AUTH",
            OID,
            &issuer.mint(),
            "SETNAME",
            "smoke",
        ])
        .await;
    assert_eq!(reply.map_get("proto"), Some(&Value::Int(3)), "{reply:?}");
    let me = redis
        .app_clients()
        .await
        .into_iter()
        .find(|c| c.name == "smoke")
        .expect("client named by HELLO SETNAME");
    assert_eq!(me.resp, 3);
    assert!(me.user.starts_with("tok-"));

    // Access keys pass through unchanged.
    let mut k = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(k.cmd(&["AUTH", &redis.access_key()]).await, Value::ok());
    assert_eq!(k.cmd(&["GET", "smoke"]).await, Value::bulk("value"));

    // Inline commands are forwarded verbatim.
    k.send_raw(b"PING\r\n").await;
    assert_eq!(k.read().await, Value::simple("PONG"));

    drop((c, h, k));
    assert!(wait_until(Duration::from_secs(5), || front.connections_open() == 0).await);
    assert_eq!(front.connections_total(), 3);
    assert_eq!(front.connections_closed_by_server(), 0);
}

#[tokio::test]
async fn front_rejects_expired_forged_and_mismatched_tokens_in_order() {
    let (pki, _redis, issuer, front) = front_env(Duration::from_secs(60)).await;
    let mut c = RespClient::connect_tls(front.port(), &pki).await;

    // Pipelined: each bad AUTH gets its WRONGPASS in order, then a good one succeeds.
    c.send(&["AUTH", OID, &issuer.mint_expired()]).await;
    c.send(&["AUTH", OID, &issuer.mint_forged()]).await;
    c.send(&["AUTH", OID, &issuer.mint_for_oid(&random_uuid())])
        .await;
    c.send(&["AUTH", &random_uuid(), &issuer.mint()]).await;
    c.send(&["AUTH", OID, "not-a-jwt"]).await;
    c.send(&["HELLO", "2", "AUTH", OID, &issuer.mint_forged()])
        .await;
    c.send(&["AUTH", OID, &issuer.mint()]).await;
    c.send(&["PING"]).await;
    for i in 0..6 {
        let reply = c.read().await;
        assert!(reply.is_error_code("WRONGPASS"), "reply {i}: {reply:?}");
    }
    assert_eq!(c.read().await, Value::ok());
    assert_eq!(c.read().await, Value::simple("PONG"));
    assert_eq!(front.auth_rejected(), 6);
    assert_eq!(front.auth_accepted(), 1);
    let events = front.auth_events();
    assert!(
        !events[0].accepted && events[0].reason.contains("expired"),
        "{events:?}"
    );
    assert!(events[6].accepted);
}

#[tokio::test]
async fn front_closes_a_connection_when_its_token_expires() {
    let (pki, redis, issuer, front) = front_env(Duration::from_secs(2)).await;
    let token = issuer.mint();
    let left = Duration::from_millis(TokenIssuer::claims(&token).millis_left() as u64);

    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &token]).await, Value::ok());
    let authed = Instant::now();
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));

    let closed_after = c
        .wait_closed(left + Duration::from_secs(3))
        .await
        .expect("the connection must be closed when its token expires");
    let since_auth = authed.elapsed();
    // Closed at expiry: not (much) before it, and promptly after it.
    assert!(
        since_auth + Duration::from_millis(100) >= left,
        "closed {since_auth:?} after AUTH, token had {left:?} left"
    );
    assert!(
        closed_after <= left + Duration::from_millis(1500),
        "closed {closed_after:?} after AUTH, token had {left:?} left"
    );
    assert!(
        wait_until(Duration::from_secs(2), || front
            .connections_closed_by_server()
            == 1)
        .await
    );
    assert_eq!(front.tokens_expired(), 1);
    // The token's user is gone.
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut redis.admin().await)
        .await
        .unwrap();
    assert!(
        !users.contains(&AzureFront::redis_user_for(&token)),
        "{users:?}"
    );
}

#[tokio::test]
async fn front_keeps_a_connection_re_authenticated_before_expiry() {
    let (pki, _redis, issuer, front) = front_env(Duration::from_secs(2)).await;
    let short = issuer.mint();
    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &short]).await, Value::ok());

    // A second connection stays on the short token, as a control.
    let mut control = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(control.cmd(&["AUTH", OID, &short]).await, Value::ok());

    // Re-authenticate the first one with a fresh token before the short one expires.
    let fresh = issuer.mint_with_lifetime(Duration::from_secs(60));
    assert_eq!(c.cmd(&["AUTH", OID, &fresh]).await, Value::ok());

    // The control dies at the short token's expiry …
    assert!(control.wait_closed(Duration::from_secs(5)).await.is_some());
    assert!(wait_until(Duration::from_secs(2), || front.tokens_expired() == 1).await);
    // … the re-authenticated connection lives on.
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("PONG"));
    assert_eq!(c.cmd(&set_get_roundtrip()).await, Value::ok());
    assert!(
        wait_until(Duration::from_secs(2), || front
            .connections_closed_by_server()
            == 1)
        .await
    );
    assert_eq!(front.connections_open(), 1);
}

#[tokio::test]
async fn front_auth_behaves_like_redis_in_multi_and_subscribed_mode() {
    let (pki, _redis, issuer, front) = front_env(Duration::from_secs(60)).await;
    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &issuer.mint()]).await, Value::ok());

    // Inside MULTI an AUTH is queued, and its result lands in EXEC's array.
    assert_eq!(c.cmd(&["MULTI"]).await, Value::ok());
    assert_eq!(
        c.cmd(&["AUTH", OID, &issuer.mint()]).await,
        Value::simple("QUEUED")
    );
    assert_eq!(c.cmd(&["PING"]).await, Value::simple("QUEUED"));
    assert_eq!(
        c.cmd(&["EXEC"]).await,
        Value::Array(vec![Value::ok(), Value::simple("PONG")])
    );

    // RESP2 subscribed mode refuses AUTH (Redis's own error).
    c.send(&["SUBSCRIBE", "ch"]).await;
    assert_eq!(
        c.read().await,
        Value::Array(vec![
            Value::bulk("subscribe"),
            Value::bulk("ch"),
            Value::Int(1)
        ])
    );
    let reply = c.cmd(&["AUTH", OID, &issuer.mint()]).await;
    assert!(
        reply
            .error()
            .is_some_and(|e| e.contains("only (P|S)SUBSCRIBE")),
        "{reply:?}"
    );
    assert_eq!(front.auth_accepted(), 3);
}

#[tokio::test]
async fn front_disconnect_all_closes_connections() {
    let (pki, _redis, issuer, front) = front_env(Duration::from_secs(60)).await;
    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &issuer.mint()]).await, Value::ok());
    front.disconnect_all();
    assert!(c.wait_closed(Duration::from_secs(5)).await.is_some());
    assert!(wait_until(Duration::from_secs(2), || front.connections_open() == 0).await);
    assert_eq!(front.connections_closed_by_server(), 1);
    // New connections work.
    let mut c = RespClient::connect_tls(front.port(), &pki).await;
    assert_eq!(c.cmd(&["AUTH", OID, &issuer.mint()]).await, Value::ok());
}

#[tokio::test]
async fn managed_identity_endpoint_serves_the_app_service_protocol() {
    let issuer = TokenIssuer::new(OID, Duration::from_secs(300));
    let msi = ManagedIdentityEndpoint::start(&issuer).await;
    let url = format!(
        "{}?api-version=2019-08-01&resource=https%3A%2F%2Fredis.azure.com",
        msi.endpoint_url()
    );
    let t = Duration::from_secs(5);
    let good = [
        ("x-identity-header", msi.identity_header()),
        ("metadata", "true"),
    ];

    // What azure_identity sends gets a token in the shape it parses.
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let json = r.json();
    let token = json["access_token"].as_str().unwrap();
    let claims = TokenIssuer::verify(token).expect("a valid token");
    assert_eq!(claims.oid, OID);
    assert_eq!(json["expires_on"].as_str().unwrap(), claims.exp.to_string());
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["resource"], "https://redis.azure.com");
    assert_eq!(msi.tokens_served(), 1);
    assert_eq!(issuer.issued(), 1);

    // Wrong or missing header: 401.
    let bad = [("x-identity-header", "nope"), ("metadata", "true")];
    let r = http_request("GET", &url, &bad, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = http_request("GET", &url, &[], None, None, t).await.unwrap();
    assert_eq!(r.status, 401);
    // Wrong api-version: 400.
    let other = url.replace("2019-08-01", "2017-09-01");
    let r = http_request("GET", &other, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    // User-assigned identity: the client_id must match.
    msi.require_client_id(Some("my-client-id"));
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let with_id = format!("{url}&client_id=my-client-id");
    let r = http_request("GET", &with_id, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        msi.request_log()
            .last()
            .unwrap()
            .query
            .get("client_id")
            .map(String::as_str),
        Some("my-client-id")
    );
    msi.require_client_id(None);

    // Failure mode.
    msi.set_mode(EndpointMode::Fail(503));
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 503);

    // Hang mode: no answer; the request is still counted.
    msi.set_mode(EndpointMode::Hang);
    let before = msi.requests();
    let r = http_request("GET", &url, &good, None, None, Duration::from_millis(500)).await;
    assert_eq!(r.unwrap_err(), "timeout");
    assert_eq!(msi.requests(), before + 1);

    // RepeatLast: the same token again (a caching identity stack).
    msi.set_mode(EndpointMode::RepeatLast);
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["access_token"].as_str(),
        msi.last_token().as_deref()
    );
    let previous = r.json()["access_token"].as_str().unwrap().to_string();
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.json()["access_token"].as_str().unwrap(), previous);

    // Back to normal: a fresh token.
    msi.set_mode(EndpointMode::Ok);
    let r = http_request("GET", &url, &good, None, None, t)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_ne!(r.json()["access_token"].as_str().unwrap(), previous);
}

#[tokio::test]
async fn entra_endpoint_serves_client_credentials_over_https() {
    let pki = TestPki::new();
    let issuer = TokenIssuer::new(OID, Duration::from_secs(3600));
    let entra = EntraEndpoint::start(&pki, &issuer).await;
    assert!(entra.authority_host().starts_with("https://localhost:"));
    let t = Duration::from_secs(5);
    let post = |fields: Vec<(&str, String)>| {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish()
            .into_bytes();
        let url = entra.token_url();
        let pki = &pki;
        async move {
            http_request(
                "POST",
                &url,
                &[],
                Some(("application/x-www-form-urlencoded", body)),
                Some(pki),
                t,
            )
            .await
            .unwrap()
        }
    };
    let scope = "https://redis.azure.com/.default".to_string();
    let base = |extra: Vec<(&'static str, String)>| {
        let mut f = vec![
            ("client_id", entra.client_id().to_string()),
            ("grant_type", "client_credentials".to_string()),
            ("scope", scope.clone()),
        ];
        f.extend(extra);
        f
    };

    // Client secret (ClientSecretCredential).
    let r = post(base(vec![("client_secret", entra.client_secret())])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let json = r.json();
    assert_eq!(json["token_type"], "Bearer");
    let expires_in = json["expires_in"].as_u64().unwrap();
    assert!((3590..=3601).contains(&expires_in), "{expires_in}");
    assert_eq!(json["ext_expires_in"].as_u64(), Some(expires_in));
    let claims = TokenIssuer::verify(json["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims.oid, OID);

    // Client assertion (WorkloadIdentityCredential).
    let r = post(base(vec![
        ("client_assertion", entra.assertion()),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
        ),
    ]))
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Mismatches get Entra-style errors.
    let r = post(base(vec![("client_secret", "wrong".to_string())])).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_client");
    assert_eq!(r.json()["error_codes"][0], 7000215);
    let r = post(base(vec![
        ("client_assertion", "wrong".to_string()),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
        ),
    ]))
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_codes"][0], 70021);
    let mut wrong_client = base(vec![("client_secret", entra.client_secret())]);
    wrong_client[0].1 = random_uuid();
    let r = post(wrong_client).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_codes"][0], 700016);

    // Unknown tenant.
    let url = entra.token_url().replace(entra.tenant_id(), "other-tenant");
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(base(vec![("client_secret", entra.client_secret())]))
        .finish()
        .into_bytes();
    let r = http_request(
        "POST",
        &url,
        &[],
        Some(("application/x-www-form-urlencoded", body)),
        Some(&pki),
        t,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error_codes"][0], 90002);

    // Failure mode keeps the Entra error shape.
    entra.set_mode(EndpointMode::Fail(500));
    let r = post(base(vec![("client_secret", entra.client_secret())])).await;
    assert_eq!(r.status, 500);
    assert!(r.json()["error_codes"].is_array());
    assert_eq!(entra.requests(), 7);
    assert_eq!(entra.tokens_served(), 2);

    // A client that doesn't trust the test CA can't talk to it.
    let other_pki = TestPki::new();
    let r = http_request("POST", &entra.token_url(), &[], None, Some(&other_pki), t).await;
    assert!(r.unwrap_err().starts_with("TLS"), "must fail the handshake");
}

#[test]
fn resp_parsers_frame_like_redis() {
    // Replies, RESP2 and RESP3.
    let (v, n) = parse_value(b"*2\r\n$3\r\nfoo\r\n:42\r\n").unwrap().unwrap();
    assert_eq!(v, Value::Array(vec![Value::bulk("foo"), Value::Int(42)]));
    assert_eq!(n, 18);
    assert_eq!(parse_value(b"$-1\r\n").unwrap().unwrap().0, Value::Nil);
    assert_eq!(parse_value(b"*2\r\n$3\r\nfoo\r\n").unwrap(), None);
    let push = parse_value(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n")
        .unwrap()
        .unwrap()
        .0;
    assert!(push.is_push());
    let map = parse_value(b"%1\r\n+proto\r\n:3\r\n").unwrap().unwrap().0;
    assert_eq!(map.map_get("proto"), Some(&Value::Int(3)));
    for v in [
        Value::Map(vec![(Value::simple("a"), Value::Double(1.5))]),
        Value::Set(vec![Value::Bool(true), Value::Nil]),
        Value::Verbatim("txt".into(), b"hello".to_vec()),
        Value::Error("ERR x".into()),
    ] {
        assert_eq!(parse_value(&v.encode()).unwrap().unwrap().0, v);
    }

    // Commands.
    let (cmd, n) = parse_command(b"*2\r\n$4\r\nAUTH\r\n$3\r\nkey\r\n*1")
        .unwrap()
        .unwrap();
    assert_eq!(
        cmd,
        ParsedCommand::Multibulk(vec![b"AUTH".to_vec(), b"key".to_vec()])
    );
    assert_eq!(n, 23);
    assert_eq!(
        parse_command(b"*2\r\n$4\r\nAUTH\r\n$3\r\nke").unwrap(),
        None
    );
    assert_eq!(
        parse_command(b"PING\r\nrest").unwrap(),
        Some((ParsedCommand::Inline, 6))
    );
    assert!(parse_command(b"*1\r\n:1\r\n").is_err());
}

#[test]
fn proxy_log_lines_are_recognised() {
    let text = "2025-01-01T00:00:00.000Z  INFO redis_entra_proxy::server: listening address=127.0.0.1:4242";
    assert_eq!(address_field(text).as_deref(), Some("127.0.0.1:4242"));
    assert!(is_main_listening_line(text));
    let json = r#"{"timestamp":"…","level":"INFO","fields":{"message":"listening","address":"127.0.0.1:4243"}}"#;
    assert_eq!(address_field(json).as_deref(), Some("127.0.0.1:4243"));
    assert!(is_main_listening_line(json));
    let admin = "INFO redis_entra_proxy::admin: admin endpoint listening address=127.0.0.1:9090";
    assert!(!is_main_listening_line(admin));
    assert!(is_admin_listening_line(admin));
    assert_eq!(address_field("x admin_address=1.2.3.4:5"), None);
    let coloured = "\u{1b}[32m INFO\u{1b}[0m listening \u{1b}[3maddress\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:1";
    assert_eq!(
        address_field(&strip_ansi(coloured)).as_deref(),
        Some("127.0.0.1:1")
    );
}
