//! The scanner against oracles: Redis's own error texts, and `redis_protocol`'s decoder for
//! replies, on generated input split at every possible point.

use super::*;
use proptest::prelude::*;

fn frames(grammar: Grammar, input: &[u8]) -> Result<Vec<(usize, u8)>, ProtocolError> {
    let mut s = Scanner::new(grammar);
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(f) = s.scan(&input[pos..])? {
        out.push((f.len, f.kind));
        pos += f.len;
    }
    Ok(out)
}

/// Feeds `input` in the chunks `cuts` gives, consuming what the scanner says may be forwarded
/// (as the relay does with large frames), and returns the frame lengths seen.
fn frames_chunked(
    grammar: Grammar,
    input: &[u8],
    cuts: &[usize],
) -> Result<Vec<usize>, ProtocolError> {
    let mut s = Scanner::new(grammar);
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut out = Vec::new();
    let mut partial = 0usize; // bytes of the current frame already consumed
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    for end in points {
        if end > fed {
            buf.extend_from_slice(&input[fed..end]);
            fed = end;
        }
        loop {
            match s.scan(&buf)? {
                Some(f) => {
                    out.push(partial + f.len);
                    partial = 0;
                    buf.drain(..f.len);
                }
                None => {
                    let n = s.scanned();
                    s.consumed(n);
                    buf.drain(..n);
                    partial += n;
                    break;
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn delimits_pipelined_and_inline_commands() {
    let input = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n";
    assert_eq!(
        frames(Grammar::Request, input).unwrap(),
        vec![(14, b'*'), (31, b'*')]
    );
    assert_eq!(
        frames(Grammar::Request, b"PING\r\nGET k\n\r\n").unwrap(),
        vec![(6, b'i'), (6, b'i'), (2, b'i')]
    );
    assert_eq!(
        frames(Grammar::Request, b"*0\r\n*-5\r\n").unwrap(),
        vec![(4, b'*'), (5, b'*')]
    );
}

#[test]
fn requests_follow_redis_laxness() {
    // Redis skips the two bytes after a payload without looking at them, and a header line
    // ends at its `\r` whatever follows.
    assert_eq!(
        frames(Grammar::Request, b"*1\r\n$3\r\nGETxx").unwrap(),
        vec![(13, b'*')]
    );
    assert_eq!(
        frames(Grammar::Request, b"*1\rX$4\rYPING\r\n").unwrap(),
        vec![(14, b'*')]
    );
}

#[test]
fn request_errors_are_redis_own_words() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"*3000000000\r\n",
            "Protocol error: invalid multibulk length",
        ),
        (b"*x\r\n", "Protocol error: invalid multibulk length"),
        (b"*+1\r\n", "Protocol error: invalid multibulk length"),
        (b"*01\r\n", "Protocol error: invalid multibulk length"),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
            "Protocol error: expected '$', got 'f'",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n",
            "Protocol error: invalid bulk length",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$blabla\r\n",
            "Protocol error: invalid bulk length",
        ),
        (b"*1\r\nfoo\r\n", "Protocol error: expected '$', got 'f'"),
        (b"*1\r\n\r\n", "Protocol error: expected '$', got ' '"),
    ];
    for (input, text) in cases {
        let err = frames(Grammar::Request, input).unwrap_err();
        assert_eq!(err.message(), *text, "{:?}", String::from_utf8_lossy(input));
        assert_eq!(&err.reply()[..], format!("-ERR {text}\r\n").as_bytes());
    }
    // A NUL hides the rest of the line, as `strchr` does; 64 KiB without an end is refused.
    let mut nul = b"\x00".to_vec();
    nul.extend(std::iter::repeat_n(b'A', MAX_LINE + 1));
    assert_eq!(
        frames(Grammar::Request, &nul).unwrap_err(),
        ProtocolError::TooBigInline
    );
    nul[0] = b'*';
    nul[1] = 0;
    assert_eq!(
        frames(Grammar::Request, &nul).unwrap_err(),
        ProtocolError::TooBigMultibulkCount
    );
    let mut bulk = b"*1\r\n$".to_vec();
    bulk.extend(std::iter::repeat_n(b'1', MAX_LINE + 1));
    assert_eq!(
        frames(Grammar::Request, &bulk).unwrap_err(),
        ProtocolError::TooBigBulkCount
    );
    assert_eq!(
        frames(Grammar::Request, &vec![b'a'; MAX_LINE]).unwrap(),
        vec![]
    );
}

#[test]
fn unauthenticated_limits() {
    let mut s = Scanner::new(Grammar::Request);
    s.set_unauthenticated(true);
    assert_eq!(
        s.scan(b"*11\r\n").unwrap_err(),
        ProtocolError::UnauthenticatedMultibulkLength
    );
    let mut s = Scanner::new(Grammar::Request);
    s.set_unauthenticated(true);
    assert_eq!(
        s.scan(b"*2\r\n$4\r\nAUTH\r\n$16385\r\n").unwrap_err(),
        ProtocolError::UnauthenticatedBulkLength
    );
}

#[test]
fn string2ll_is_redis_strict() {
    for (s, v) in [
        ("0", Some(0)),
        ("-1", Some(-1)),
        ("123", Some(123)),
        ("9223372036854775807", Some(i64::MAX)),
        ("-9223372036854775808", Some(i64::MIN)),
    ] {
        assert_eq!(string2ll(s.as_bytes()), v, "{s}");
    }
    for s in [
        "",
        "-",
        "-0",
        "00",
        "+1",
        "1x",
        " 1",
        "9223372036854775808",
        "123456789012345678901",
    ] {
        assert_eq!(string2ll(s.as_bytes()), None, "{s}");
    }
}

#[test]
fn large_bulk_streams_without_the_whole_frame() {
    let mut s = Scanner::new(Grammar::Request);
    let head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1000000\r\n";
    assert_eq!(s.scan(head).unwrap(), None);
    assert_eq!(s.scanned(), head.len());
    assert_eq!(s.bulk_pending(), 1_000_002);
    s.consumed(head.len());
    let chunk = vec![b'x'; 400_000];
    for _ in 0..2 {
        assert_eq!(s.scan(&chunk).unwrap(), None);
        s.consumed(s.scanned());
    }
    let mut tail = vec![b'x'; 200_000];
    tail.extend_from_slice(b"\r\n");
    assert_eq!(
        s.scan(&tail).unwrap(),
        Some(Frame {
            len: tail.len(),
            kind: b'*'
        })
    );
}

#[test]
fn replies_of_any_depth_cost_one_stack_entry() {
    let mut deep = Vec::new();
    for _ in 0..1_000_000 {
        deep.extend_from_slice(b"*1\r\n");
    }
    deep.extend_from_slice(b":1\r\n");
    let mut s = Scanner::new(Grammar::Reply);
    assert_eq!(
        s.scan(&deep).unwrap(),
        Some(Frame {
            len: deep.len(),
            kind: b'*'
        })
    );
    assert!(s.stack.capacity() <= STACK_KEEP);
    // Nested pairs: `*2` levels each with a trailing element.
    let mut pairs = Vec::new();
    for _ in 0..10_000 {
        pairs.extend_from_slice(b"*2\r\n");
    }
    for _ in 0..10_001 {
        pairs.extend_from_slice(b":1\r\n");
    }
    assert_eq!(
        frames(Grammar::Reply, &pairs).unwrap(),
        vec![(pairs.len(), b'*')]
    );
}

#[test]
fn delimits_resp3_replies_pushes_and_attributes() {
    let input: &[u8] = b"+OK\r\n%1\r\n+a\r\n:1\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n|1\r\n+k\r\n+v\r\n:5\r\n_\r\n*-1\r\n$-1\r\n*2\r\n*1\r\n:1\r\n~0\r\n=7\r\ntxt:abc\r\n";
    let kinds: Vec<u8> = frames(Grammar::Reply, input)
        .unwrap()
        .iter()
        .map(|f| f.1)
        .collect();
    assert_eq!(kinds, b"+%>:_*$*=".to_vec());
    assert!(frames(Grammar::Reply, b"?x\r\n").is_err());
}

#[test]
fn args_iterates_without_copying() {
    let f = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n";
    let args = Args::new(f);
    assert_eq!(args.argc(), 3);
    assert_eq!(args.collect::<Vec<_>>(), vec![&b"SET"[..], b"k", b""]);
    // On a frame still arriving, the complete arguments.
    let partial = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nxx";
    assert_eq!(
        Args::new(partial).collect::<Vec<_>>(),
        vec![&b"SET"[..], b"k"]
    );
}

#[test]
fn inline_split_is_sdssplitargs() {
    let split = |s: &str| {
        split_inline(s.as_bytes()).map(|v| {
            v.into_iter()
                .map(|a| String::from_utf8_lossy(&a).into_owned())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(split("set k \"a b\"\r\n").unwrap(), ["set", "k", "a b"]);
    assert_eq!(split("  get   k  \n").unwrap(), ["get", "k"]);
    assert_eq!(split("set k \"\\x41\\n\"").unwrap(), ["set", "k", "A\n"]);
    assert_eq!(split("set k 'it\\'s'").unwrap(), ["set", "k", "it's"]);
    assert_eq!(split("set k\"ey\" v").unwrap(), ["set", "key", "v"]);
    assert_eq!(split("").unwrap(), Vec::<String>::new());
    assert_eq!(split("set \"open"), None);
    assert_eq!(split("set \"\"\"test-key\"\"\" test-value"), None);
    assert_eq!(split("set 'a'b"), None);
}

#[test]
fn encode_round_trips() {
    assert_eq!(
        &encode_command(&[b"AUTH", b"pw"])[..],
        b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"
    );
    let mut out = BytesMut::new();
    push_header(&mut out, b'$', 12345);
    assert_eq!(&out[..], b"$12345\r\n");
}

// ----- generated input -----------------------------------------------------------------------

/// A value `redis_protocol` can use as a set element or map key (it hashes them).
fn resp3_key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9 ]{0,12}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| {
            let mut v = format!("${}\r\n", b.len()).into_bytes();
            v.extend(b);
            v.extend_from_slice(b"\r\n");
            v
        }),
    ]
}

/// A RESP3 value, encoded: `redis_protocol` decodes it back as the oracle.
fn resp3_value() -> impl Strategy<Value = Vec<u8>> {
    // (RESP2's `$-1` and `*-1` nulls are RESP3's `_` for the oracle; see the unit tests.)
    let leaf = prop_oneof![
        resp3_key(),
        "[a-zA-Z0-9 ]{0,12}".prop_map(|s| format!("-ERR {s}\r\n").into_bytes()),
        Just(b"_\r\n".to_vec()),
        Just(b"#t\r\n".to_vec()),
        Just(b",1.5\r\n".to_vec()),
        Just(b"(12345678901234567890\r\n".to_vec()),
        Just(b"=7\r\ntxt:abc\r\n".to_vec()),
    ];
    let aggregate = |ty: char, items: Vec<Vec<u8>>| {
        let mut v = format!("{ty}{}\r\n", items.len()).into_bytes();
        items.into_iter().for_each(|i| v.extend(i));
        v
    };
    let pairs = |ty: char, pairs: Vec<(Vec<u8>, Vec<u8>)>| {
        let mut v = format!("{ty}{}\r\n", pairs.len()).into_bytes();
        for (k, val) in pairs {
            v.extend(k);
            v.extend(val);
        }
        v
    };
    leaf.prop_recursive(6, 64, 6, move |inner| {
        prop_oneof![
            (
                proptest::sample::select(vec!['*', '>']),
                proptest::collection::vec(inner.clone(), 0..6)
            )
                .prop_map(move |(ty, items)| aggregate(ty, items)),
            proptest::collection::vec(resp3_key(), 0..4)
                .prop_map(move |items| aggregate('~', items)),
            proptest::collection::vec((resp3_key(), inner.clone()), 0..4)
                .prop_map(move |p| pairs('%', p)),
            (
                proptest::collection::vec((resp3_key(), resp3_key()), 1..3),
                resp3_key()
            )
                .prop_map(move |(p, value)| {
                    let mut v = pairs('|', p);
                    v.extend(value);
                    v
                }),
        ]
    })
}

/// A command as a client library sends it.
fn command() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..30), 1..6).prop_map(
        |args| {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            encode_command(&refs).to_vec()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Replies: the same boundaries as `redis_protocol`, whole and split anywhere.
    #[test]
    fn reply_boundaries_agree_with_redis_protocol(values in proptest::collection::vec(resp3_value(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let stream: Vec<u8> = values.concat();
        let mut theirs = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let (_, len) = redis_protocol::resp3::decode::complete::decode(&stream[pos..])
                .expect("the oracle decodes what was generated")
                .expect("complete");
            theirs.push(len);
            pos += len;
        }
        let ours: Vec<usize> = frames(Grammar::Reply, &stream).unwrap().iter().map(|f| f.0).collect();
        prop_assert_eq!(&ours, &theirs);
        prop_assert_eq!(frames_chunked(Grammar::Reply, &stream, &cuts).unwrap(), theirs);
    }

    /// Requests: a pipeline of commands is cut back into exactly those commands, however the
    /// bytes arrive.
    #[test]
    fn request_boundaries_survive_any_split(commands in proptest::collection::vec(command(), 1..8), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let stream: Vec<u8> = commands.concat();
        let lens: Vec<usize> = commands.iter().map(Vec::len).collect();
        prop_assert_eq!(frames_chunked(Grammar::Request, &stream, &cuts).unwrap(), lens);
    }

    /// Garbage in either direction: an error or a request for more, never a panic, and never a
    /// frame longer than the input.
    #[test]
    fn garbage_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        for grammar in [Grammar::Request, Grammar::Reply] {
            if let Ok(found) = frames(grammar, &input) {
                prop_assert!(found.iter().map(|f| f.0).sum::<usize>() <= input.len());
            }
            let _ = frames_chunked(grammar, &input, &cuts);
        }
    }

    /// What `split_inline` gives back, re-quoted, splits to itself.
    #[test]
    fn inline_split_round_trips(args in proptest::collection::vec("[a-zA-Z0-9 \"'\\\\]{1,8}", 1..5)) {
        let line: Vec<u8> = args.iter().map(|a| {
            let mut q = String::from("\"");
            for c in a.chars() {
                if c == '"' || c == '\\' { q.push('\\'); }
                q.push(c);
            }
            q.push('"');
            q
        }).collect::<Vec<_>>().join(" ").into_bytes();
        let split = split_inline(&line).unwrap();
        let back: Vec<String> = split.into_iter().map(|a| String::from_utf8(a).unwrap()).collect();
        prop_assert_eq!(back, args);
    }
}
