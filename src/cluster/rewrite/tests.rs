//! Tests of the cluster address rewriter: real Redis 7.0.15 replies (a 3-node cluster with
//! `cluster-announce-hostname`, RESP2 and RESP3), edge cases, and never-panic properties.

use super::*;
use proptest::prelude::*;
use std::cell::RefCell;

const RESP2_SLOTS: &[u8] = b"*3\r\n*3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:30001\r\n$40\r\na34c34a33f4855e1207d540e0e5499a7d012cb8c\r\n*2\r\n$8\r\nhostname\r\n$18\r\nnode-30001.example\r\n*3\r\n:5461\r\n:10922\r\n*4\r\n$9\r\n127.0.0.1\r\n:30002\r\n$40\r\n807758825a83ec899260e61dbc4aed27ffeaaa73\r\n*2\r\n$8\r\nhostname\r\n$18\r\nnode-30002.example\r\n*3\r\n:10923\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:30003\r\n$40\r\n04303e445856fff7fa87988f61b5eb6a46fff960\r\n*2\r\n$8\r\nhostname\r\n$18\r\nnode-30003.example\r\n";
const RESP2_SHARDS: &[u8] = b"*3\r\n*4\r\n$5\r\nslots\r\n*2\r\n:0\r\n:5460\r\n$5\r\nnodes\r\n*1\r\n*16\r\n$2\r\nid\r\n$40\r\na34c34a33f4855e1207d540e0e5499a7d012cb8c\r\n$4\r\nport\r\n:30001\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30001.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n*4\r\n$5\r\nslots\r\n*2\r\n:5461\r\n:10922\r\n$5\r\nnodes\r\n*1\r\n*16\r\n$2\r\nid\r\n$40\r\n807758825a83ec899260e61dbc4aed27ffeaaa73\r\n$4\r\nport\r\n:30002\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30002.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n*4\r\n$5\r\nslots\r\n*2\r\n:10923\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n*16\r\n$2\r\nid\r\n$40\r\n04303e445856fff7fa87988f61b5eb6a46fff960\r\n$4\r\nport\r\n:30003\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30003.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n";
const RESP2_NODES: &[u8] = b"$394\r\na34c34a33f4855e1207d540e0e5499a7d012cb8c 127.0.0.1:30001@40001,node-30001.example myself,master - 0 1796302694000 1 connected 0-5460\n807758825a83ec899260e61dbc4aed27ffeaaa73 127.0.0.1:30002@40002,node-30002.example master - 0 1796302694604 2 connected 5461-10922\n04303e445856fff7fa87988f61b5eb6a46fff960 127.0.0.1:30003@40003,node-30003.example master - 0 1796302696611 3 connected 10923-16383\n\r\n";
const RESP3_SLOTS: &[u8] = b"*3\r\n*3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:30001\r\n$40\r\na34c34a33f4855e1207d540e0e5499a7d012cb8c\r\n%1\r\n$8\r\nhostname\r\n$18\r\nnode-30001.example\r\n*3\r\n:5461\r\n:10922\r\n*4\r\n$9\r\n127.0.0.1\r\n:30002\r\n$40\r\n807758825a83ec899260e61dbc4aed27ffeaaa73\r\n%1\r\n$8\r\nhostname\r\n$18\r\nnode-30002.example\r\n*3\r\n:10923\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:30003\r\n$40\r\n04303e445856fff7fa87988f61b5eb6a46fff960\r\n%1\r\n$8\r\nhostname\r\n$18\r\nnode-30003.example\r\n";
const RESP3_SHARDS: &[u8] = b"*3\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:5460\r\n$5\r\nnodes\r\n*1\r\n%8\r\n$2\r\nid\r\n$40\r\na34c34a33f4855e1207d540e0e5499a7d012cb8c\r\n$4\r\nport\r\n:30001\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30001.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n%2\r\n$5\r\nslots\r\n*2\r\n:5461\r\n:10922\r\n$5\r\nnodes\r\n*1\r\n%8\r\n$2\r\nid\r\n$40\r\n807758825a83ec899260e61dbc4aed27ffeaaa73\r\n$4\r\nport\r\n:30002\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30002.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n%2\r\n$5\r\nslots\r\n*2\r\n:10923\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n%8\r\n$2\r\nid\r\n$40\r\n04303e445856fff7fa87988f61b5eb6a46fff960\r\n$4\r\nport\r\n:30003\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.1\r\n$8\r\nhostname\r\n$18\r\nnode-30003.example\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$18\r\nreplication-offset\r\n:0\r\n$6\r\nhealth\r\n$6\r\nonline\r\n";
const RESP3_NODES: &[u8] = b"=398\r\ntxt:a34c34a33f4855e1207d540e0e5499a7d012cb8c 127.0.0.1:30001@40001,node-30001.example myself,master - 0 1796302696000 1 connected 0-5460\n807758825a83ec899260e61dbc4aed27ffeaaa73 127.0.0.1:30002@40002,node-30002.example master - 0 1796302698000 2 connected 5461-10922\n04303e445856fff7fa87988f61b5eb6a46fff960 127.0.0.1:30003@40003,node-30003.example master - 0 1796302698621 3 connected 10923-16383\n\r\n";

/// Maps port p to p + 1000 (same digit count, so expectations are plain substitutions) and
/// records every call; refuses new nodes beyond `limit`.
struct Map {
    calls: RefCell<Vec<(String, u16)>>,
    limit: usize,
}

impl Map {
    fn new() -> Map {
        Map {
            calls: RefCell::new(Vec::new()),
            limit: usize::MAX,
        }
    }
    fn calls(&self) -> Vec<(String, u16)> {
        self.calls.borrow().clone()
    }
}

impl AddressMap for Map {
    fn local_port(&self, host: &str, port: u16) -> Option<u16> {
        let mut calls = self.calls.borrow_mut();
        let known = calls.iter().any(|(h, p)| h == host && *p == port);
        if !known && calls.len() >= self.limit {
            return None;
        }
        calls.push((host.to_owned(), port));
        Some(port.wrapping_add(1000))
    }
}

fn rewriter(map: &Map) -> Rewriter<'_> {
    Rewriter {
        local_ip: "127.0.0.2",
        seed_host: "seed.example",
        tls: false,
        map,
    }
}

/// `s` with each (from, to) substituted, in order.
fn subst(s: &[u8], pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut s = String::from_utf8(s.to_vec()).unwrap();
    for (from, to) in pairs {
        assert!(s.contains(from), "{from} not in fixture");
        s = s.replace(from, to);
    }
    s.into_bytes()
}

const PORTS: [(&str, &str); 3] = [
    (":30001\r\n", ":31001\r\n"),
    (":30002\r\n", ":31002\r\n"),
    (":30003\r\n", ":31003\r\n"),
];

fn hostnames() -> Vec<(String, String)> {
    (1..=3)
        .map(|n| {
            (
                format!("$18\r\nnode-3000{n}.example\r\n"),
                "$9\r\n127.0.0.2\r\n".to_owned(),
            )
        })
        .collect()
}

fn expected_array(fixture: &[u8]) -> Vec<u8> {
    let mut pairs: Vec<(String, String)> =
        vec![("$9\r\n127.0.0.1\r\n".into(), "$9\r\n127.0.0.2\r\n".into())];
    pairs.extend(PORTS.iter().map(|(a, b)| (a.to_string(), b.to_string())));
    pairs.extend(hostnames());
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    subst(fixture, &pairs)
}

fn upstream_calls() -> Vec<(String, u16)> {
    (1..=3)
        .map(|n| ("127.0.0.1".to_owned(), 30000 + n))
        .collect()
}

#[test]
fn real_slots_resp2_and_resp3_are_rewritten_byte_for_byte() {
    for fixture in [RESP2_SLOTS, RESP3_SLOTS] {
        let map = Map::new();
        let out = rewriter(&map)
            .topology(Topology::Slots, fixture)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected_array(fixture)).unwrap()
        );
        assert_eq!(map.calls(), upstream_calls());
    }
}

#[test]
fn real_shards_resp2_and_resp3_are_rewritten_byte_for_byte() {
    for fixture in [RESP2_SHARDS, RESP3_SHARDS] {
        let map = Map::new();
        let out = rewriter(&map)
            .topology(Topology::Shards, fixture)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            String::from_utf8(expected_array(fixture)).unwrap()
        );
        assert_eq!(map.calls(), upstream_calls());
    }
}

fn expected_nodes_text(fixture: &[u8]) -> Vec<u8> {
    let pairs: Vec<(String, String)> = (1..=3)
        .map(|n| {
            (
                format!("127.0.0.1:3000{n}@4000{n},node-3000{n}.example"),
                format!("127.0.0.2:3100{n}@4000{n}"),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    subst(bulk_payload(fixture).unwrap(), &pairs)
}

#[test]
fn real_nodes_resp2_bulk_is_rewritten_with_its_length_recomputed() {
    let map = Map::new();
    let out = rewriter(&map)
        .topology(Topology::Nodes, RESP2_NODES)
        .unwrap()
        .unwrap();
    let text = expected_nodes_text(RESP2_NODES);
    let mut expected = format!("${}\r\n", text.len()).into_bytes();
    expected.extend_from_slice(&text);
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        String::from_utf8(expected).unwrap()
    );
    assert_eq!(map.calls(), upstream_calls());
}

#[test]
fn real_nodes_resp3_verbatim_keeps_its_format() {
    let map = Map::new();
    let out = rewriter(&map)
        .topology(Topology::Nodes, RESP3_NODES)
        .unwrap()
        .unwrap();
    let text = expected_nodes_text(RESP3_NODES);
    let mut expected = format!("={}\r\ntxt:", text.len() + 4).into_bytes();
    expected.extend_from_slice(&text);
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        String::from_utf8(expected).unwrap()
    );
}

#[test]
fn redirects_name_the_local_listener() {
    let map = Map::new();
    let rw = rewriter(&map);
    let cases: [(&[u8], &[u8]); 4] = [
        (
            b"-MOVED 3999 127.0.0.1:6381\r\n",
            b"-MOVED 3999 127.0.0.2:7381\r\n",
        ),
        (
            b"-ASK 3999 10.0.0.1:8502\r\n",
            b"-ASK 3999 127.0.0.2:9502\r\n",
        ),
        (b"-MOVED 1 ::1:30001\r\n", b"-MOVED 1 127.0.0.2:31001\r\n"),
        (b"-MOVED 1 :6380\r\n", b"-MOVED 1 127.0.0.2:7380\r\n"),
    ];
    for (input, expected) in cases {
        assert_eq!(rw.redirect(input), Some(Ok(expected.to_vec())));
    }
    assert_eq!(
        map.calls(),
        vec![
            ("127.0.0.1".to_owned(), 6381),
            ("10.0.0.1".to_owned(), 8502),
            ("::1".to_owned(), 30001),
            ("seed.example".to_owned(), 6380),
        ]
    );
}

#[test]
fn redirect_with_an_ipv6_local_ip_is_unbracketed_as_redis_writes_it() {
    let map = Map::new();
    let rw = Rewriter {
        local_ip: "::1",
        ..rewriter(&map)
    };
    assert_eq!(
        rw.redirect(b"-MOVED 3999 10.0.0.5:8501\r\n"),
        Some(Ok(b"-MOVED 3999 ::1:9501\r\n".to_vec()))
    );
}

#[test]
fn other_errors_and_non_errors_are_not_redirects() {
    let map = Map::new();
    let rw = rewriter(&map);
    for frame in [
        &b"-ERR unknown command\r\n"[..],
        b"-MOVEDX 1 a:1\r\n",
        b"+OK\r\n",
        b"",
        b"-ASKING\r\n",
    ] {
        assert_eq!(rw.redirect(frame), None, "{}", frame.escape_ascii());
    }
    assert!(map.calls().is_empty());
}

#[test]
fn malformed_redirects_are_errors_that_read_well() {
    let map = Map::new();
    let rw = rewriter(&map);
    for frame in [
        &b"-MOVED 3999 127.0.0.1\r\n"[..],
        b"-MOVED 3999 127.0.0.1:99999\r\n",
        b"-MOVED x 127.0.0.1:1\r\n",
        b"-MOVED 3999\r\n",
        b"-MOVED 3999 a:1",
        b"-ASK 1 a:1\r\nb\r\n",
    ] {
        let Some(Err(RewriteError::Malformed(text))) = rw.redirect(frame) else {
            panic!("{} not refused", frame.escape_ascii());
        };
        assert!(
            text.starts_with("malformed MOVED redirect from the cluster: ")
                || text.starts_with("malformed ASK redirect from the cluster: "),
            "{text}"
        );
    }
}

#[test]
fn no_local_port_is_an_error_naming_the_node() {
    let map = Map {
        limit: 0,
        ..Map::new()
    };
    let rw = rewriter(&map);
    let err = rw
        .redirect(b"-MOVED 3999 10.0.0.5:8501\r\n")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        RewriteError::NoLocalPort {
            host: "10.0.0.5".into(),
            port: 8501
        }
    );
    assert_eq!(
        err.to_string(),
        "no local port for cluster node 10.0.0.5:8501: --cluster-max-nodes reached"
    );
    let err = rw.topology(Topology::Slots, RESP3_SLOTS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no local port for cluster node 127.0.0.1:30001: --cluster-max-nodes reached"
    );
    let err = rw.redirect(b"-MOVED 1 ::1:30001\r\n").unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "no local port for cluster node [::1]:30001: --cluster-max-nodes reached"
    );
}

#[test]
fn error_messages_carry_at_most_a_short_piece_of_server_text() {
    let map = Map::new();
    let rw = rewriter(&map);
    let long = format!("-MOVED 1 {}\r\n", "x".repeat(5000));
    let Some(Err(err)) = rw.redirect(long.as_bytes()) else {
        panic!()
    };
    assert!(err.to_string().len() < 200, "{err}");
    let map = Map {
        limit: 0,
        ..Map::new()
    };
    let long = format!("-MOVED 1 {}:1\r\n", "h".repeat(5000));
    let Some(Err(err)) = rewriter(&map).redirect(long.as_bytes()) else {
        panic!()
    };
    assert!(err.to_string().len() < 200, "{err}");
    let nodes = format!("${}\r\n{}\r\n", 5000, "y".repeat(5000));
    let err = rw.topology(Topology::Nodes, nodes.as_bytes()).unwrap_err();
    assert!(err.to_string().len() < 200, "{err}");
}

#[test]
fn subcommands_are_recognised_case_insensitively() {
    assert_eq!(Topology::from_subcommand(b"slots"), Some(Topology::Slots));
    assert_eq!(Topology::from_subcommand(b"Shards"), Some(Topology::Shards));
    assert_eq!(Topology::from_subcommand(b"NODES"), Some(Topology::Nodes));
    assert_eq!(
        Topology::from_subcommand(b"replicas"),
        Some(Topology::Replicas)
    );
    assert_eq!(
        Topology::from_subcommand(b"SLAVES"),
        Some(Topology::Replicas)
    );
    assert_eq!(Topology::from_subcommand(b"INFO"), None);
    assert_eq!(Topology::from_subcommand(b"SLOTSX"), None);
}

#[test]
fn error_replies_and_replies_without_addresses_are_relayed_as_is() {
    let map = Map::new();
    let rw = rewriter(&map);
    for which in [
        Topology::Slots,
        Topology::Shards,
        Topology::Nodes,
        Topology::Replicas,
    ] {
        assert_eq!(
            rw.topology(
                which,
                b"-ERR This instance has cluster support disabled\r\n"
            ),
            Ok(None)
        );
        assert_eq!(rw.topology(which, b"!5\r\nERR x\r\n"), Ok(None));
    }
    assert_eq!(rw.topology(Topology::Slots, b"*0\r\n"), Ok(None));
    assert_eq!(rw.topology(Topology::Shards, b"*0\r\n"), Ok(None));
    assert_eq!(rw.topology(Topology::Replicas, b"*0\r\n"), Ok(None));
    assert_eq!(rw.topology(Topology::Nodes, b"$0\r\n\r\n"), Ok(None));
    assert!(map.calls().is_empty());
}

#[test]
fn slots_unknown_endpoint_is_left_alone_and_empty_endpoint_is_the_seed() {
    let map = Map::new();
    let rw = rewriter(&map);
    let input = b"*1\r\n*4\r\n:0\r\n:16383\r\n*3\r\n$1\r\n?\r\n:6379\r\n$2\r\nid\r\n*3\r\n$0\r\n\r\n:6380\r\n$2\r\nid\r\n";
    let out = rw.topology(Topology::Slots, input).unwrap().unwrap();
    assert_eq!(
        out.escape_ascii().to_string(),
        b"*1\r\n*4\r\n:0\r\n:16383\r\n*3\r\n$1\r\n?\r\n:6379\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.2\r\n:7380\r\n$2\r\nid\r\n".escape_ascii().to_string()
    );
    assert_eq!(map.calls(), vec![("seed.example".to_owned(), 6380)]);
}

#[test]
fn slots_metadata_ip_is_replaced_and_other_keys_kept() {
    let map = Map::new();
    let rw = rewriter(&map);
    let input = b"*1\r\n*3\r\n:0\r\n:1\r\n*4\r\n$4\r\nname\r\n:6379\r\n$2\r\nid\r\n%2\r\n$2\r\nip\r\n$8\r\n10.0.0.1\r\n$3\r\nfoo\r\n$3\r\nbar\r\n";
    let out = rw.topology(Topology::Slots, input).unwrap().unwrap();
    assert_eq!(
        out.escape_ascii().to_string(),
        b"*1\r\n*3\r\n:0\r\n:1\r\n*4\r\n$9\r\n127.0.0.2\r\n:7379\r\n$2\r\nid\r\n%2\r\n$2\r\nip\r\n$9\r\n127.0.0.2\r\n$3\r\nfoo\r\n$3\r\nbar\r\n".escape_ascii().to_string()
    );
    assert_eq!(map.calls(), vec![("name".to_owned(), 6379)]);
}

/// A TLS cluster's shard node: `tls-port` and the plaintext `port` both present.
const TLS_SHARD: &[u8] = b"*1\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n%5\r\n$2\r\nid\r\n$2\r\nab\r\n$4\r\nport\r\n:6379\r\n$8\r\ntls-port\r\n:6380\r\n$2\r\nip\r\n$8\r\n10.0.0.1\r\n$8\r\nendpoint\r\n$1\r\n?\r\n";

#[test]
fn shards_prefer_tls_port_when_tls_and_fall_back_to_ip_for_unknown_endpoint() {
    let expected = b"*1\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:16383\r\n$5\r\nnodes\r\n*1\r\n%5\r\n$2\r\nid\r\n$2\r\nab\r\n$4\r\nport\r\n:7380\r\n$8\r\ntls-port\r\n:7380\r\n$2\r\nip\r\n$9\r\n127.0.0.2\r\n$8\r\nendpoint\r\n$9\r\n127.0.0.2\r\n";
    let map = Map::new();
    let rw = Rewriter {
        tls: true,
        ..rewriter(&map)
    };
    let out = rw.topology(Topology::Shards, TLS_SHARD).unwrap().unwrap();
    assert_eq!(
        out.escape_ascii().to_string(),
        expected.escape_ascii().to_string()
    );
    assert_eq!(map.calls(), vec![("10.0.0.1".to_owned(), 6380)]);

    let map = Map::new();
    let rw = rewriter(&map);
    rw.topology(Topology::Shards, TLS_SHARD).unwrap().unwrap();
    assert_eq!(map.calls(), vec![("10.0.0.1".to_owned(), 6379)]);
}

#[test]
fn shards_node_without_port_is_malformed() {
    let map = Map::new();
    let input = b"*1\r\n*2\r\n$5\r\nnodes\r\n*1\r\n*2\r\n$2\r\nip\r\n$1\r\na\r\n";
    let err = rewriter(&map)
        .topology(Topology::Shards, input)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed CLUSTER SHARDS reply from the cluster: a node has no integer port"
    );
}

const NODES_TEXT: &str = "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,host-a myself,master - 0 0 1 connected 0-5460 [5461->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]\n\
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 ::1:30002@31002 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238316232 2 connected\n\
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f :0@0 master,fail,noaddr - 1426238317239 1426238316232 3 disconnected 5461 5462-5470\n";

#[test]
fn nodes_ipv6_and_noaddr_lines() {
    let map = Map::new();
    let rw = rewriter(&map);
    let frame = format!("${}\r\n{NODES_TEXT}\r\n", NODES_TEXT.len());
    let out = rw
        .topology(Topology::Nodes, frame.as_bytes())
        .unwrap()
        .unwrap();
    let text = NODES_TEXT
        .replace("127.0.0.1:30001@31001,host-a", "127.0.0.2:31001@31001")
        .replace("::1:30002@31002", "127.0.0.2:31002@31002");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("${}\r\n{text}\r\n", text.len())
    );
    assert_eq!(
        map.calls(),
        vec![("127.0.0.1".to_owned(), 30001), ("::1".to_owned(), 30002)]
    );
}

#[test]
fn replicas_lines_are_rewritten_each() {
    let map = Map::new();
    let rw = rewriter(&map);
    let line = "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 10.0.0.2:30002@40002,replica-1 slave e7d1 0 1 2 connected";
    let new =
        "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.2:31002@40002 slave e7d1 0 1 2 connected";
    let resp2 = format!(
        "*2\r\n${}\r\n{line}\r\n${}\r\n{line}\r\n",
        line.len(),
        line.len()
    );
    let out = rw
        .topology(Topology::Replicas, resp2.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "*2\r\n${}\r\n{new}\r\n${}\r\n{new}\r\n",
            new.len(),
            new.len()
        )
    );
    let resp3 = format!("*1\r\n={}\r\ntxt:{line}\r\n", line.len() + 4);
    let out = rw
        .topology(Topology::Replicas, resp3.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("*1\r\n={}\r\ntxt:{new}\r\n", new.len() + 4)
    );
}

#[test]
fn parse_nodes_reads_every_field_the_manager_needs() {
    let nodes = parse_nodes(NODES_TEXT.as_bytes()).unwrap();
    assert_eq!(
        nodes,
        vec![
            NodeLine {
                id: "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".into(),
                host: "127.0.0.1".into(),
                port: 30001,
                flags: vec!["myself".into(), "master".into()],
                master_id: None,
                slots: vec![(0, 5460)],
            },
            NodeLine {
                id: "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1".into(),
                host: "::1".into(),
                port: 30002,
                flags: vec!["slave".into()],
                master_id: Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".into()),
                slots: vec![],
            },
            NodeLine {
                id: "292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f".into(),
                host: "".into(),
                port: 0,
                flags: vec!["master".into(), "fail".into(), "noaddr".into()],
                master_id: None,
                slots: vec![(5461, 5461), (5462, 5470)],
            },
        ]
    );
    let real = parse_nodes(bulk_payload(RESP3_NODES).unwrap()).unwrap();
    assert_eq!(real.len(), 3);
    assert_eq!(real[2].slots, vec![(10923, 16383)]);
    assert_eq!(real[0].host, "127.0.0.1");
    let err = parse_nodes(b"abc 1.2.3.4:1@2 master\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("malformed CLUSTER NODES text from the cluster: fewer than 8 fields"),
        "{err}"
    );
}

#[test]
fn bulk_payload_of_bulk_and_verbatim_only() {
    assert_eq!(bulk_payload(b"$3\r\nabc\r\n"), Some(&b"abc"[..]));
    assert_eq!(bulk_payload(b"=7\r\ntxt:abc\r\n"), Some(&b"abc"[..]));
    assert_eq!(bulk_payload(b"+abc\r\n"), None);
    assert_eq!(bulk_payload(b"$-1\r\n"), None);
    assert_eq!(bulk_payload(b"$3\r\nab"), None);
    assert_eq!(bulk_payload(b"$3\r\nabc\r\n+x\r\n"), None);
    assert_eq!(bulk_payload(b"-ERR x\r\n"), None);
}

#[test]
fn depth_size_and_lying_headers_are_bounded() {
    let map = Map::new();
    let rw = rewriter(&map);
    let deep = "*1\r\n".repeat(100) + ":1\r\n";
    let err = rw.topology(Topology::Slots, deep.as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed CLUSTER SLOTS reply from the cluster: nested too deeply"
    );
    let err = rw
        .topology(Topology::Slots, b"*999999999999\r\n")
        .unwrap_err();
    assert!(matches!(err, RewriteError::Malformed(_)));
    let err = rw
        .topology(Topology::Shards, b"%999999999999999999\r\n")
        .unwrap_err();
    assert!(matches!(err, RewriteError::Malformed(_)));
    let big = vec![b'*'; MAX_FRAME + 1];
    assert!(matches!(
        rw.topology(Topology::Slots, &big),
        Err(RewriteError::Malformed(_))
    ));
    let attr = b"|1\r\n+a\r\n+b\r\n*0\r\n";
    assert!(matches!(
        rw.topology(Topology::Slots, attr),
        Err(RewriteError::Malformed(_))
    ));
    assert!(matches!(
        rw.topology(Topology::Slots, b"*0\r\nextra"),
        Err(RewriteError::Malformed(_))
    ));
}

fn fixtures() -> Vec<(Topology, &'static [u8])> {
    vec![
        (Topology::Slots, RESP2_SLOTS),
        (Topology::Slots, RESP3_SLOTS),
        (Topology::Shards, RESP2_SHARDS),
        (Topology::Shards, RESP3_SHARDS),
        (Topology::Nodes, RESP2_NODES),
        (Topology::Nodes, RESP3_NODES),
        (Topology::Shards, TLS_SHARD),
        (Topology::Replicas, RESP2_REPLICAS),
        (Topology::Replicas, RESP3_REPLICAS),
    ]
}

const ALL: [Topology; 4] = [
    Topology::Slots,
    Topology::Shards,
    Topology::Nodes,
    Topology::Replicas,
];

/// Rewrites with every topology and as a redirect: never panics, and only Malformed fails
/// (the map always has a port).
fn never_panics(frame: &[u8]) {
    let map = Map::new();
    let rw = rewriter(&map);
    for which in ALL {
        match rw.topology(which, frame) {
            Ok(_) | Err(RewriteError::Malformed(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    match rw.redirect(frame) {
        None | Some(Ok(_)) | Some(Err(RewriteError::Malformed(_))) => {}
        Some(Err(other)) => panic!("{other}"),
    }
    let _ = bulk_payload(frame);
    let _ = parse_nodes(frame);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..512)) {
        never_panics(&frame);
    }

    #[test]
    fn mutated_real_replies_never_panic(
        pick in 0usize..9,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut frame = fixtures()[pick].1.to_vec();
        for (at, byte, op) in edits {
            let i = at.index(frame.len() + 1);
            match op {
                0 if i < frame.len() => frame[i] = byte,
                1 => frame.insert(i, byte),
                _ if i < frame.len() => { frame.remove(i); }
                _ => {}
            }
        }
        never_panics(&frame);
    }
}

/// With a map that gives each node its own port back and local_ip equal to the fixtures' ip,
/// only the hostnames change: replacing them by hand gives the rewriter's output.
#[test]
fn rewriting_with_an_identity_map_changes_only_hostnames() {
    struct Same;
    impl AddressMap for Same {
        fn local_port(&self, _: &str, port: u16) -> Option<u16> {
            Some(port)
        }
    }
    let strip = |b: &[u8]| {
        let mut s = String::from_utf8(b.to_vec()).unwrap();
        for n in 1..=3 {
            s = s.replace(
                &format!("$18\r\nnode-3000{n}.example\r\n"),
                "$9\r\n127.0.0.1\r\n",
            );
            s = s.replace(&format!(",node-3000{n}.example"), "");
        }
        s
    };
    let rw = Rewriter {
        local_ip: "127.0.0.1",
        seed_host: "s",
        tls: false,
        map: &Same,
    };
    for (which, fixture) in &fixtures()[..6] {
        let out = String::from_utf8(rw.topology(*which, fixture).unwrap().unwrap()).unwrap();
        if *which == Topology::Nodes {
            // The length header changes with the hostnames: compare the payloads.
            let ours = bulk_payload(out.as_bytes()).unwrap();
            assert_eq!(
                String::from_utf8(ours.to_vec()).unwrap(),
                strip(bulk_payload(fixture).unwrap())
            );
        } else {
            assert_eq!(out, strip(fixture));
        }
    }
}

/// `CLUSTER REPLICAS <id>` of the same cluster with a replica added (Redis 7.0.15 answers a bulk
/// string in RESP3 too).
const RESP2_REPLICAS: &[u8] = b"*1\r\n$156\r\n4c667b9c50313edff789deb7d7088ea9adf090ff 127.0.0.1:30004@40004,node-30004.example slave a34c34a33f4855e1207d540e0e5499a7d012cb8c 0 1796303341000 1 connected\r\n";
const RESP3_REPLICAS: &[u8] = b"*1\r\n$156\r\n4c667b9c50313edff789deb7d7088ea9adf090ff 127.0.0.1:30004@40004,node-30004.example slave a34c34a33f4855e1207d540e0e5499a7d012cb8c 0 1796303343651 1 connected\r\n";

#[test]
fn real_replicas_are_rewritten_with_lengths_recomputed() {
    for fixture in [RESP2_REPLICAS, RESP3_REPLICAS] {
        let map = Map::new();
        let out = rewriter(&map)
            .topology(Topology::Replicas, fixture)
            .unwrap()
            .unwrap();
        let line = String::from_utf8(fixture[10..fixture.len() - 2].to_vec())
            .unwrap()
            .replace(
                "127.0.0.1:30004@40004,node-30004.example",
                "127.0.0.2:31004@40004",
            );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("*1\r\n${}\r\n{line}\r\n", line.len())
        );
        assert_eq!(map.calls(), vec![("127.0.0.1".to_owned(), 30004)]);
    }
}

#[test]
fn slots_null_endpoint_keeps_the_null_and_maps_the_metadata_ip() {
    for (null, map_header) in [("$-1\r\n", "*2\r\n"), ("_\r\n", "%1\r\n")] {
        let input = format!(
            "*1\r\n*3\r\n:0\r\n:1\r\n*4\r\n{null}:6379\r\n$2\r\nid\r\n{map_header}$2\r\nip\r\n$8\r\n10.0.0.1\r\n"
        );
        let expected = format!(
            "*1\r\n*3\r\n:0\r\n:1\r\n*4\r\n{null}:7379\r\n$2\r\nid\r\n{map_header}$2\r\nip\r\n$9\r\n127.0.0.2\r\n"
        );
        let map = Map::new();
        let out = rewriter(&map)
            .topology(Topology::Slots, input.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(map.calls(), vec![("10.0.0.1".to_owned(), 6379)]);
    }
}
