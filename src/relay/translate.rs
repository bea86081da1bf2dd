//! RESP3 → RESP2 for a RESP2 client whose upstream speaks RESP3 ([`Framing::Resp2OverResp3`]).
//!
//! A RESP2 subscriber can't run `AUTH`, so the proxy switches its upstream to RESP3 and
//! rewrites what comes back into exactly what Redis sends a RESP2 subscriber:
//!
//! * pub/sub pushes (`>3 message …`, confirmations) become arrays, a RESP3 null becomes the
//!   RESP2 null bulk (`$-1`, as Redis's `addReplyNull` writes it in RESP2);
//! * a client-side-caching invalidation (`>2 invalidate [keys]`) becomes the message Redis
//!   sends a RESP2 redirect target, `*3 message __redis__:invalidate [keys]` — or nothing, when
//!   Redis would send a RESP2 connection nothing (it is not subscribed, or the invalidation is
//!   for its own tracking, which RESP2 can't receive);
//! * `tracking-redir-broken` is a RESP3-only notice: dropped;
//! * the reply to a `HELLO 3` sent in place of the client's `HELLO 2` becomes the flat array
//!   `HELLO 2` answers, with `proto` 2.
//!
//! The conversion of a whole frame is iterative (no recursion, any depth) and is only applied to
//! frames the relay holds whole (at most 1 MiB); a larger push is streamed with only its type
//! byte rewritten (a large push is a message whose payload is a plain bulk string).
//!
//! [`Framing::Resp2OverResp3`]: super::state::Framing::Resp2OverResp3

use crate::resp::{push_header, reply_elements, string2ll};
use bytes::{BufMut, BytesMut};

/// What to do with a push frame for a RESP2 client over a RESP3 upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushFate {
    /// Rewrite it as an array ([`to_resp2`]).
    Array,
    /// An invalidation for a subscribed redirect target: [`invalidation_as_message`].
    InvalidationMessage,
    /// Redis would not send this to a RESP2 client: drop it.
    Drop,
}

/// Decides what a RESP2 client gets for a push named `name`.
pub fn push_fate(name: &[u8], subscribed: bool, self_tracking: bool) -> PushFate {
    match name {
        b"invalidate" if subscribed && !self_tracking => PushFate::InvalidationMessage,
        b"invalidate" | b"tracking-redir-broken" => PushFate::Drop,
        _ => PushFate::Array,
    }
}

/// The name (first element) of a push frame, if it is a bulk or simple string.
pub fn push_name(frame: &[u8]) -> Option<&[u8]> {
    reply_elements(frame)
        .next()
        .filter(|(ty, _)| matches!(ty, b'$' | b'+'))
        .map(|(_, v)| v)
}

/// Writes `>2 invalidate <keys>` as `*3 message __redis__:invalidate <keys>` (keys converted).
pub fn invalidation_as_message(frame: &[u8], out: &mut BytesMut) {
    out.put_slice(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n");
    // Skip the push header and the name: the rest is the keys element.
    let Some(rest) = skip_lines(frame, 3) else {
        return;
    };
    to_resp2(rest, out);
}

/// Skips `n` header/payload lines: for `>2\r\n$10\r\ninvalidate\r\n…`, 3 lines reach the keys.
fn skip_lines(frame: &[u8], n: usize) -> Option<&[u8]> {
    let mut pos = 0;
    for _ in 0..n {
        let nl = frame.get(pos..)?.iter().position(|&b| b == b'\n')?;
        pos += nl + 1;
    }
    frame.get(pos..)
}

/// Rewrites complete RESP3 frames in `frame` into their RESP2 form, appended to `out`:
/// pushes, sets and maps become arrays (a map of `n` pairs an array of `2n`), null becomes the
/// null bulk, booleans integers, doubles and big numbers bulk strings, verbatim strings plain
/// bulk strings, blob errors simple errors, and attributes are dropped (RESP2 has none).
pub fn to_resp2(frame: &[u8], out: &mut BytesMut) {
    // Per open aggregate: elements left, and whether it is an attribute being dropped.
    let mut stack: Vec<(u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < frame.len() {
        let dropping = stack.iter().any(|&(_, attribute)| attribute);
        let Some(nl) = frame[pos..].iter().position(|&b| b == b'\n') else {
            break;
        };
        let ty = frame[pos];
        let line_end = pos + nl + 1;
        let header = &frame[pos + 1..(line_end.saturating_sub(2)).max(pos + 1)];
        let mut opened = None;
        match ty {
            b'$' | b'=' | b'!' => {
                let len = string2ll(header).unwrap_or(-1);
                if len < 0 {
                    if !dropping {
                        out.put_slice(b"$-1\r\n");
                    }
                    pos = line_end;
                } else {
                    let start = line_end;
                    let end = (start + len as usize).min(frame.len());
                    let payload = &frame[start..end];
                    if !dropping {
                        match ty {
                            b'=' => {
                                let text = payload.get(4..).unwrap_or_default();
                                push_header(out, b'$', text.len());
                                out.put_slice(text);
                                out.put_slice(b"\r\n");
                            }
                            b'!' => {
                                out.put_u8(b'-');
                                out.put_slice(payload);
                                out.put_slice(b"\r\n");
                            }
                            _ => out.put_slice(&frame[pos..(end + 2).min(frame.len())]),
                        }
                    }
                    pos = (end + 2).min(frame.len());
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = string2ll(header).unwrap_or(-1);
                let per = if matches!(ty, b'%' | b'|') { 2 } else { 1 };
                if !dropping && ty != b'|' {
                    if n < 0 {
                        out.put_slice(b"*-1\r\n");
                    } else {
                        push_header(out, b'*', n as usize * per);
                    }
                }
                pos = line_end;
                if n > 0 {
                    opened = Some((n as u64 * per as u64, ty == b'|'));
                } else if ty == b'|' {
                    // An empty attribute annotates nothing we keep: nothing to close.
                    continue;
                }
            }
            _ => {
                if !dropping {
                    match ty {
                        b'_' => out.put_slice(b"$-1\r\n"),
                        b'#' => out.put_slice(if header == b"t" { b":1\r\n" } else { b":0\r\n" }),
                        b',' | b'(' => {
                            push_header(out, b'$', header.len());
                            out.put_slice(header);
                            out.put_slice(b"\r\n");
                        }
                        _ => out.put_slice(&frame[pos..line_end]),
                    }
                }
                pos = line_end;
            }
        }
        if let Some(level) = opened {
            stack.push(level);
            continue;
        }
        // One element done: close the aggregates it completes. An attribute is not an element
        // of its parent (it annotates the next one).
        while let Some(top) = stack.last_mut() {
            top.0 -= 1;
            if top.0 > 0 {
                break;
            }
            let attribute = top.1;
            stack.pop();
            if attribute {
                break;
            }
        }
    }
}

/// The reply to the `HELLO 3` the proxy sent for a client's `HELLO 2`: the RESP2 array
/// `HELLO 2` would have answered (the map flattened, `proto` 2). Errors pass unchanged.
pub fn hello_as_resp2(frame: &[u8], out: &mut BytesMut) {
    if frame.first() == Some(&b'-') {
        out.put_slice(frame);
        return;
    }
    let start = out.len();
    to_resp2(frame, out);
    const PROTO3: &[u8] = b"$5\r\nproto\r\n:3\r\n";
    if let Some(at) = out[start..].windows(PROTO3.len()).position(|w| w == PROTO3) {
        let digit = start + at + PROTO3.len() - 3;
        out[digit] = b'2';
    }
}

/// The RESP2 subscribed-mode reply to `PING [msg]`, from what a RESP3 upstream answered
/// (`+PONG` or the bulk `msg`): `["pong", msg]`, with an empty message by default.
pub fn subscribed_ping(frame: &[u8], out: &mut BytesMut) {
    if matches!(frame.first(), Some(b'-' | b'!')) {
        out.put_slice(frame);
        return;
    }
    out.put_slice(b"*2\r\n$4\r\npong\r\n");
    if frame.first() == Some(&b'$') {
        out.put_slice(frame);
    } else {
        out.put_slice(b"$0\r\n\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(f: &[u8]) -> String {
        let mut out = BytesMut::new();
        to_resp2(f, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn pushes_become_arrays_and_nulls_null_bulks() {
        assert_eq!(
            conv(b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"),
            "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            conv(b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n"),
            "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n"
        );
    }

    #[test]
    fn every_resp3_type_has_its_resp2_form() {
        assert_eq!(
            conv(b"%2\r\n+a\r\n#t\r\n+b\r\n,1.5\r\n"),
            "*4\r\n+a\r\n:1\r\n+b\r\n$3\r\n1.5\r\n"
        );
        assert_eq!(conv(b"~1\r\n(123\r\n"), "*1\r\n$3\r\n123\r\n");
        assert_eq!(conv(b"=7\r\ntxt:abc\r\n"), "$3\r\nabc\r\n");
        assert_eq!(conv(b"|1\r\n+k\r\n+v\r\n:5\r\n"), ":5\r\n");
        assert_eq!(
            conv(b"*2\r\n|1\r\n+k\r\n+v\r\n:5\r\n:6\r\n"),
            "*2\r\n:5\r\n:6\r\n"
        );
    }

    #[test]
    fn invalidations_become_messages_on_the_invalidate_channel() {
        let mut out = BytesMut::new();
        invalidation_as_message(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$3\r\nkey\r\n", &mut out);
        assert_eq!(
            &out[..],
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$3\r\nkey\r\n"
        );
        out.clear();
        invalidation_as_message(b">2\r\n$10\r\ninvalidate\r\n_\r\n", &mut out);
        assert_eq!(
            &out[..],
            b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n"
        );
        assert_eq!(
            push_fate(b"invalidate", true, false),
            PushFate::InvalidationMessage
        );
        assert_eq!(push_fate(b"invalidate", false, false), PushFate::Drop);
        assert_eq!(push_fate(b"invalidate", true, true), PushFate::Drop);
        assert_eq!(push_fate(b"message", true, false), PushFate::Array);
    }

    #[test]
    fn hello_reply_flattened_with_proto_2() {
        let map =
            b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n";
        let mut out = BytesMut::new();
        hello_as_resp2(map, &mut out);
        assert_eq!(
            &out[..],
            &b"*6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:2\r\n$7\r\nmodules\r\n*0\r\n"[..]
        );
    }
}
