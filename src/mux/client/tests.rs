//! The shared client's core driven byte by byte: what is shared, answered, pinned or refused,
//! and that replies come back in order whatever mix of shared and local answers.

use super::*;
use crate::mux::conn::{Mailbox, ReplyBudget};

/// A table with the commands these tests use, flagged as Redis 7.0 flags them.
fn table() -> Arc<CommandTable> {
    let reply = b"*6\r\n\
*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$3\r\nset\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$5\r\nmulti\r\n:1\r\n*2\r\n+noscript\r\n+fast\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$5\r\nblpop\r\n:-3\r\n*2\r\n+write\r\n+blocking\r\n:1\r\n:-2\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$4\r\nping\r\n:-1\r\n*1\r\n+fast\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
*10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
*1\r\n*10\r\n$9\r\nclient|id\r\n:2\r\n*1\r\n+noscript\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n*0\r\n";
    Arc::new(CommandTable::from_command_reply(reply).expect("a table"))
}

fn core(password: Option<&str>) -> ClientCore {
    ClientCore::new(1, table(), 0, password.map(Secret::new))
}

fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    crate::resp::encode_command(&args).to_vec()
}

/// Feeds `input`, returns the batches sent (bytes, count).
fn feed(core: &mut ClientCore, mailbox: &Arc<Mailbox>, input: &[u8]) -> Vec<(Vec<u8>, u32)> {
    core.client_input().extend_from_slice(input);
    let mut sent = Vec::new();
    core.process(mailbox, |b| sent.push((b.bytes.to_vec(), b.count)));
    sent
}

fn reply(core: &mut ClientCore, mailbox: &Mailbox, bytes: &[u8], complete: u32) {
    let delivery = Delivery::Replies {
        bytes: Bytes::copy_from_slice(bytes),
        complete,
    };
    core.delivered(delivery, mailbox).expect("owed");
}

fn output(core: &mut ClientCore) -> Vec<u8> {
    core.output().split().to_vec()
}

#[test]
fn consecutive_shared_commands_go_as_one_batch_of_the_clients_own_bytes() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let input = [cmd(&["SET", "k", "v"]), cmd(&["GET", "k"]), cmd(&["PING"])].concat();
    let sent = feed(&mut c, &mailbox, &input);
    assert_eq!(sent, vec![(input.clone(), 3)]);
    assert_eq!(c.next(), Next::Relay);
    assert!(!c.idle());
    reply(&mut c, &mailbox, b"+OK\r\n$1\r\nv\r\n+PONG\r\n", 3);
    assert_eq!(output(&mut c), b"+OK\r\n$1\r\nv\r\n+PONG\r\n");
    assert!(c.idle());
}

#[test]
fn a_command_split_anywhere_is_sent_once_whole() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let input = [cmd(&["SET", "key", "value"]), cmd(&["GET", "key"])].concat();
    for cut in 0..input.len() {
        let mut c = core(None);
        let mut sent = feed(&mut c, &mailbox, &input[..cut]);
        sent.extend(feed(&mut c, &mailbox, &input[cut..]));
        let bytes: Vec<u8> = sent.iter().flat_map(|(b, _)| b.clone()).collect();
        let count: u32 = sent.iter().map(|(_, n)| n).sum();
        assert_eq!((bytes, count), (input.clone(), 2), "cut at {cut}");
    }
}

#[test]
fn local_answers_wait_behind_the_shared_replies_owed() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let input = [
        cmd(&["GET", "a"]),
        cmd(&["CLIENT", "SETNAME", "app"]),
        cmd(&["GET", "b"]),
        cmd(&["CLIENT", "GETNAME"]),
        cmd(&["SELECT", "0"]),
    ]
    .concat();
    let sent = feed(&mut c, &mailbox, &input);
    assert_eq!(sent.len(), 2, "two runs of shared commands");
    assert!(output(&mut c).is_empty(), "nothing before GET a's reply");
    reply(&mut c, &mailbox, b"$1\r\n1\r\n", 1);
    assert_eq!(output(&mut c), b"$1\r\n1\r\n+OK\r\n");
    reply(&mut c, &mailbox, b"$1\r\n2\r\n", 1);
    assert_eq!(output(&mut c), b"$1\r\n2\r\n$3\r\napp\r\n+OK\r\n");
    assert!(c.idle());
}

#[test]
fn a_pinning_command_stops_the_pipeline_and_is_first_in_the_handoff() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let tail = [cmd(&["MULTI"]), cmd(&["SET", "x", "1"]), cmd(&["EXEC"])].concat();
    let input = [
        cmd(&["CLIENT", "SETNAME", "me"]),
        cmd(&["GET", "a"]),
        tail.clone(),
    ]
    .concat();
    let sent = feed(&mut c, &mailbox, &input);
    assert_eq!(sent.len(), 1);
    assert_eq!(c.next(), Next::Pin(PinReason::Transaction));
    assert!(!c.idle(), "GET a is still owed");
    assert!(feed(&mut c, &mailbox, &cmd(&["GET", "later"])).is_empty());
    reply(&mut c, &mailbox, b"$-1\r\n", 1);
    assert_eq!(output(&mut c), b"+OK\r\n$-1\r\n");
    assert!(c.idle());
    let handoff = c.handoff();
    assert_eq!(
        &handoff.input[..],
        &[tail, cmd(&["GET", "later"])].concat()[..]
    );
    assert_eq!(
        handoff.setup,
        vec![Bytes::from(cmd(&["CLIENT", "SETNAME", "me"]))]
    );
    assert!(handoff.authenticated);
}

#[test]
fn what_pins_and_why() {
    let cases: &[(&[&str], PinReason)] = &[
        (&["MULTI"], PinReason::Transaction),
        (&["BLPOP", "l", "0"], PinReason::Blocking),
        (&["SELECT", "1"], PinReason::Select),
        (&["SELECT", "00"], PinReason::Select),
        (&["HELLO", "2", "SETNAME", "x"], PinReason::Hello),
        (&["CLIENT", "ID"], PinReason::Client),
        (&["CLIENT", "TRACKING", "on"], PinReason::Client),
        (&["NOSUCH"], PinReason::Other),
    ];
    for (args, reason) in cases {
        let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
        let mut c = core(None);
        assert!(feed(&mut c, &mailbox, &cmd(args)).is_empty(), "{args:?}");
        assert_eq!(c.next(), Next::Pin(*reason), "{args:?}");
        assert!(c.idle());
    }
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    assert!(feed(&mut c, &mailbox, b"GET a\r\n").is_empty());
    assert_eq!(c.next(), Next::Pin(PinReason::Inline));
}

#[test]
fn hello_3_moves_the_client_to_resp3_once_nothing_is_owed_and_is_shared_there() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let hello = cmd(&["HELLO", "3"]);
    let sent = feed(
        &mut c,
        &mailbox,
        &[cmd(&["GET", "a"]), hello.clone(), cmd(&["GET", "b"])].concat(),
    );
    assert_eq!(sent.len(), 1, "GET a only");
    assert_eq!(c.next(), Next::Switch(Protocol::Resp3));
    reply(&mut c, &mailbox, b"$-1\r\n", 1);
    assert!(!c.idle(), "the reply is still to be written");
    assert_eq!(output(&mut c), b"$-1\r\n");
    assert!(c.idle());
    c.switched(Protocol::Resp3);
    let sent = feed(&mut c, &mailbox, b"");
    assert_eq!(sent, vec![([hello, cmd(&["GET", "b"])].concat(), 2)]);
    reply(&mut c, &mailbox, b"%1\r\n+proto\r\n:3\r\n_\r\n", 2);
    output(&mut c);
    // RESP3's null for a name never set; HELLO 3 again is shared; HELLO 2 moves it back.
    feed(&mut c, &mailbox, &cmd(&["CLIENT", "GETNAME"]));
    assert_eq!(output(&mut c), b"_\r\n");
    assert_eq!(feed(&mut c, &mailbox, &cmd(&["HELLO", "3"])).len(), 1);
    reply(&mut c, &mailbox, b"%1\r\n+proto\r\n:3\r\n", 1);
    assert!(feed(&mut c, &mailbox, &cmd(&["HELLO", "2"])).is_empty());
    assert_eq!(c.next(), Next::Switch(Protocol::Resp2));
    // A RESP3 client pinned later keeps RESP3 on its own connection.
    c.switched(Protocol::Resp3);
    let mut c = core(None);
    c.switched(Protocol::Resp3);
    feed(&mut c, &mailbox, &cmd(&["MULTI"]));
    assert_eq!(c.handoff().protocol, Protocol::Resp3);
}

#[test]
fn chatter_is_answered_or_shared_without_pinning() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let input = [
        cmd(&["AUTH", "anything"]),
        cmd(&["SELECT", "0"]),
        cmd(&["CLIENT", "SETNAME", "bad name"]),
        cmd(&["HELLO"]),
        cmd(&["HELLO", "2"]),
        cmd(&["CLIENT", "SETINFO", "LIB-NAME", "x"]),
        cmd(&["PING"]),
    ]
    .concat();
    let sent = feed(&mut c, &mailbox, &input);
    assert_eq!(sent.iter().map(|(_, n)| n).sum::<u32>(), 4);
    assert_eq!(c.next(), Next::Relay);
    assert_eq!(
        output(&mut c),
        [&b"+OK\r\n+OK\r\n"[..], BAD_NAME].concat(),
        "answered at once: nothing was owed before them"
    );
    assert_eq!(
        c.handoff().setup,
        vec![Bytes::from(cmd(&["CLIENT", "SETINFO", "LIB-NAME", "x"]))]
    );
}

#[test]
fn empty_commands_are_ignored_as_redis_ignores_them_and_quit_closes_after_replies() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let sent = feed(&mut c, &mailbox, b"\r\n*0\r\n*-1\r\n");
    assert!(sent.is_empty());
    assert!(c.idle());
    let sent = feed(
        &mut c,
        &mailbox,
        &[cmd(&["GET", "a"]), cmd(&["QUIT"]), cmd(&["GET", "b"])].concat(),
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(c.next(), Next::Close);
    reply(&mut c, &mailbox, b"$-1\r\n", 1);
    assert_eq!(output(&mut c), b"$-1\r\n+OK\r\n");
    assert!(c.idle());
}

#[test]
fn malformed_input_gets_redis_error_after_the_replies_owed_then_closes() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let sent = feed(
        &mut c,
        &mailbox,
        &[cmd(&["GET", "a"]), b"*1\r\nfoo\r\n".to_vec()].concat(),
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(c.next(), Next::Close);
    reply(&mut c, &mailbox, b"$-1\r\n", 1);
    assert_eq!(
        output(&mut c),
        b"$-1\r\n-ERR Protocol error: expected '$', got 'f'\r\n"
    );
}

#[test]
fn a_command_too_large_to_share_pins_with_its_bytes_kept() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let big = cmd(&["SET", "k", &"x".repeat(MAX_SHARED_COMMAND + 10)]);
    let sent = feed(&mut c, &mailbox, &big[..MAX_SHARED_COMMAND + 5]);
    assert!(sent.is_empty());
    assert_eq!(c.next(), Next::Pin(PinReason::LargeCommand));
    assert_eq!(&c.handoff().input[..], &big[..MAX_SHARED_COMMAND + 5]);
}

#[test]
fn a_declared_length_too_large_to_share_pins_at_once() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    let head = b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n";
    let sent = feed(&mut c, &mailbox, &[cmd(&["PING"]), head.to_vec()].concat());
    assert_eq!(
        sent,
        vec![(cmd(&["PING"]), 1)],
        "what came before is still shared"
    );
    assert_eq!(c.next(), Next::Pin(PinReason::LargeCommand));
    reply(&mut c, &mailbox, b"+PONG\r\n", 1);
    output(&mut c);
    assert_eq!(&c.handoff().input[..], &head[..]);
}

#[test]
fn failed_commands_get_one_error_each_in_order() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(None);
    feed(
        &mut c,
        &mailbox,
        &[cmd(&["GET", "a"]), cmd(&["GET", "b"])].concat(),
    );
    feed(&mut c, &mailbox, &cmd(&["CLIENT", "GETNAME"]));
    let error = Bytes::from_static(b"-ERR redis-entra-proxy: broke\r\n");
    c.delivered(Delivery::Failed { count: 2, error }, &mailbox)
        .expect("owed");
    assert_eq!(
        output(&mut c),
        b"-ERR redis-entra-proxy: broke\r\n-ERR redis-entra-proxy: broke\r\n$-1\r\n"
    );
    assert!(c.delivered(Delivery::Broken, &mailbox).is_err());
    let unowed = Delivery::Replies {
        bytes: Bytes::from_static(b"+OK\r\n"),
        complete: 1,
    };
    assert!(c.delivered(unowed, &mailbox).is_err());
}

#[test]
fn the_listen_password_is_checked_here_and_anything_else_first_pins_without_an_upstream() {
    let (mailbox, _rx) = Mailbox::new(&ReplyBudget::new(usize::MAX));
    let mut c = core(Some("secret"));
    assert!(feed(&mut c, &mailbox, &cmd(&["AUTH", "secret"])).is_empty());
    assert_eq!(output(&mut c), b"+OK\r\n");
    assert_eq!(feed(&mut c, &mailbox, &cmd(&["GET", "a"])).len(), 1);

    let mut c = core(Some("secret"));
    assert!(feed(&mut c, &mailbox, &cmd(&["GET", "a"])).is_empty());
    assert_eq!(c.next(), Next::Pin(PinReason::Unauthenticated));
    assert!(!c.handoff().authenticated);

    let mut c = core(Some("secret"));
    assert!(feed(&mut c, &mailbox, &cmd(&["AUTH", "wrong"])).is_empty());
    assert_eq!(c.next(), Next::Pin(PinReason::Unauthenticated));
    assert_eq!(&c.handoff().input[..], &cmd(&["AUTH", "wrong"])[..]);

    // Redis's unauthenticated limits hold before the password.
    let mut c = core(Some("secret"));
    feed(&mut c, &mailbox, &cmd(&["SET", "k", &"v".repeat(20_000)]));
    assert_eq!(c.next(), Next::Close);
}
