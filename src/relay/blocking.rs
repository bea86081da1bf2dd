//! Blocking commands that outlive a token.
//!
//! While a client is blocked (`BLPOP k 0` for hours), Redis reads nothing else from the
//! connection, so an `AUTH` sent behind the command would only run after the token expired —
//! and Azure closes the connection at that moment. The relay therefore forwards the command with
//! a *bounded* timeout (a slice of what is left of the connection's token), and when that slice
//! times out — which has no side effect for these commands — it re-authenticates if a newer
//! credential is there and issues the command again with the time the client has left. The
//! client sees exactly one reply: the data, or the timeout reply once its own timeout has passed.
//!
//! Residual differences (documented in the README): between two slices another client blocked
//! on the same key may get ahead in the queue; and `XREAD … $` is not sliced (re-issuing `$`
//! could skip entries added between two slices), so it blocks as sent.

use crate::resp::encode_command;
use bytes::Bytes;
use std::time::{Duration, Instant};

/// The shortest slice the proxy forwards (and the unit it rounds to).
const MIN_SLICE: Duration = Duration::from_millis(100);

/// How long a re-issued slice that the server refused with `-BUSY` waits before it is sent
/// again. Redis answers `-BUSY` to every command but a few while another client's script or
/// function runs past `busy-reply-threshold` (5 s by default); a client blocked *before* that
/// stays blocked without hearing of it, so the proxy keeps asking, about as often as a busy
/// Redis looks at its clients at all, until the script is done or killed.
pub const BUSY_RETRY: Duration = Duration::from_millis(100);

/// How a command expresses its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Seconds, possibly fractional (`BLPOP k 1.5`); 0 blocks forever.
    Seconds,
    /// Milliseconds (`XREAD BLOCK 1500`, `WAIT 1 1500`); 0 blocks forever.
    Millis,
}

/// A blocking command the relay may re-issue, with the time its client allowed.
#[derive(Debug)]
pub struct BlockingCall {
    args: Vec<Vec<u8>>,
    /// Index of the timeout argument.
    slot: usize,
    unit: Unit,
    /// When the client's own timeout ends (`None`: blocks forever).
    deadline: Option<Instant>,
    /// What a timed-out slice looks like.
    timeout: TimeoutReply,
    /// When the slice in flight ends at the earliest: sent then, for the timeout it carries.
    /// Redis never times a command out early, so a timeout reply before that instant means
    /// someone unblocked it (`CLIENT UNBLOCK … TIMEOUT`), and the client gets it.
    slice_ends: Option<Instant>,
    /// Slices sent so far: the first is the client's own command, the others the proxy's.
    issued: u32,
}

/// How much earlier than the slice's end a timeout still counts as one. Redis takes its
/// deadline from a millisecond clock truncated at receipt, so it can answer up to a
/// millisecond before the proxy's own reckoning when the link is fast. The price: an unblock
/// in the last 5 ms of a slice is taken for the slice's end and re-issued (README, residuals).
const EARLY_TIMEOUT_TOLERANCE: Duration = Duration::from_millis(5);

/// How the reply of a slice that ran out looks, per command family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeoutReply {
    /// A null (list, zset and stream reads).
    Null,
    /// `WAIT n`: fewer than `n` replicas acknowledged.
    Wait(i64),
    /// `WAITAOF local replicas`: fewer local or replica fsyncs than asked for.
    WaitAof(i64, i64),
}

impl BlockingCall {
    /// Recognises a blocking command whose timeout the proxy can slice; `None` for anything
    /// else (including malformed ones, which are forwarded as they are for Redis to refuse).
    pub fn parse<'a>(args: impl Iterator<Item = &'a [u8]>, now: Instant) -> Option<BlockingCall> {
        let args: Vec<Vec<u8>> = args.map(<[u8]>::to_vec).collect();
        let name = args.first()?.to_ascii_uppercase();
        let (slot, unit) = match name.as_slice() {
            b"BLPOP" | b"BRPOP" | b"BZPOPMIN" | b"BZPOPMAX" | b"BRPOPLPUSH" | b"BLMOVE" => (
                args.len().checked_sub(1).filter(|&i| i >= 2)?,
                Unit::Seconds,
            ),
            b"BLMPOP" | b"BZMPOP" => (1, Unit::Seconds),
            b"WAIT" => (2, Unit::Millis),
            b"WAITAOF" => (3, Unit::Millis),
            b"XREAD" | b"XREADGROUP" => (stream_block_slot(&args)?, Unit::Millis),
            _ => return None,
        };
        let timeout = parse_timeout(args.get(slot)?, unit)?;
        let number =
            |i: usize| -> Option<i64> { std::str::from_utf8(args.get(i)?).ok()?.parse().ok() };
        let timeout_reply = match name.as_slice() {
            b"WAIT" => TimeoutReply::Wait(number(1)?),
            b"WAITAOF" => TimeoutReply::WaitAof(number(1)?, number(2)?),
            _ => TimeoutReply::Null,
        };
        Some(BlockingCall {
            deadline: timeout.map(|t| now + t),
            args,
            slot,
            unit,
            timeout: timeout_reply,
            slice_ends: None,
            issued: 0,
        })
    }

    /// The command to send now: the client's, with a timeout of at most `slice` (and never
    /// past the client's own deadline). `None` when the client's time is up.
    pub fn encode(&mut self, slice: Duration, now: Instant) -> Bytes {
        let left = self.deadline.map(|d| d.saturating_duration_since(now));
        let slice = left
            .map_or(slice, |l| l.min(slice))
            .max(Duration::from_millis(1));
        // Whole milliseconds, rounded down: what the server is told is what it waits.
        let millis = slice.as_millis().max(1) as u64;
        let value = match self.unit {
            Unit::Seconds => format!("{}.{:03}", millis / 1000, millis % 1000),
            Unit::Millis => millis.to_string(),
        };
        self.slice_ends = Some(now + Duration::from_millis(millis));
        self.issued = self.issued.saturating_add(1);
        self.args[self.slot] = value.into_bytes();
        let refs: Vec<&[u8]> = self.args.iter().map(Vec::as_slice).collect();
        encode_command(&refs)
    }

    /// True when `reply` says the slice ran out without a result, and the client still waits:
    /// then the command is issued again instead of answering the client. A timeout reply that
    /// comes before the slice could have run out was an unblock (`CLIENT UNBLOCK … TIMEOUT`):
    /// it is the client's, as it would be without the proxy.
    pub fn should_reissue(&self, reply: &[u8], now: Instant) -> bool {
        let time_left = self.deadline.is_none_or(|d| d > now);
        let slice_over = self
            .slice_ends
            .is_none_or(|end| now + EARLY_TIMEOUT_TOLERANCE >= end);
        time_left && slice_over && self.timed_out(reply)
    }

    /// True when `reply` refused a slice the proxy sent on its own (not the client's command)
    /// because the server is busy: the client, blocked before the server became busy, would
    /// still be blocked without the proxy, so the slice is sent again after [`BUSY_RETRY`]
    /// instead of answering the client. A `-BUSY` to the first slice is the client's: its
    /// command reached a busy server, as it would have directly.
    pub fn refused_busy(&self, reply: &[u8]) -> bool {
        self.issued > 1 && reply.starts_with(b"-BUSY ")
    }

    fn timed_out(&self, reply: &[u8]) -> bool {
        let integer = |r: &[u8]| -> Option<i64> {
            std::str::from_utf8(r.strip_prefix(b":")?)
                .ok()?
                .trim_end()
                .parse()
                .ok()
        };
        match self.timeout {
            TimeoutReply::Null => matches!(reply, b"*-1\r\n" | b"$-1\r\n" | b"_\r\n"),
            TimeoutReply::Wait(wanted) => integer(reply).is_some_and(|acked| acked < wanted),
            TimeoutReply::WaitAof(local, replicas) => {
                let mut counts = crate::resp::reply_elements(reply)
                    .filter(|(ty, _)| *ty == b':')
                    .map(|(_, v)| {
                        std::str::from_utf8(v)
                            .ok()
                            .and_then(|v| v.parse::<i64>().ok())
                    });
                match (reply.first(), counts.next(), counts.next()) {
                    (Some(b'*'), Some(Some(l)), Some(Some(r))) => l < local || r < replicas,
                    _ => false,
                }
            }
        }
    }
}

/// The slice for a connection whose token expires at `expires_at`: half of what is left, so that
/// a slice ends while the token still lives and a newer one is picked up within a few slices.
pub fn slice_for(expires_at: std::time::SystemTime) -> Duration {
    let left = expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    (left / 2).max(MIN_SLICE)
}

/// `XREAD`/`XREADGROUP`: the argument after `BLOCK` (before `STREAMS`). Not sliced when an id
/// is `$`, which would mean "newer than now" again at each re-issue.
fn stream_block_slot(args: &[Vec<u8>]) -> Option<usize> {
    let streams = args
        .iter()
        .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
    let block = args[..streams]
        .iter()
        .position(|a| a.eq_ignore_ascii_case(b"BLOCK"))?;
    if args[streams + 1..].iter().any(|a| a == b"$") {
        return None;
    }
    Some(block + 1)
}

/// The client's timeout: `None` for 0 (forever); refuses negative or non-numeric values.
fn parse_timeout(value: &[u8], unit: Unit) -> Option<Option<Duration>> {
    let text = std::str::from_utf8(value).ok()?;
    let duration = match unit {
        Unit::Seconds => Duration::try_from_secs_f64(text.parse::<f64>().ok()?).ok()?,
        Unit::Millis => Duration::from_millis(text.parse::<u64>().ok()?),
    };
    Some((!duration.is_zero()).then_some(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: &[&str]) -> Option<BlockingCall> {
        BlockingCall::parse(args.iter().map(|a| a.as_bytes()), Instant::now())
    }

    fn sent(c: &mut BlockingCall, slice: Duration) -> Vec<String> {
        let bytes = c.encode(slice, Instant::now());
        crate::resp::Args::new(&bytes)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn slices_an_infinite_blpop() {
        let mut c = call(&["BLPOP", "a", "b", "0"]).unwrap();
        assert_eq!(
            sent(&mut c, Duration::from_millis(1500)),
            ["BLPOP", "a", "b", "1.500"]
        );
        let after = Instant::now() + Duration::from_millis(1600);
        assert!(c.should_reissue(b"*-1\r\n", after));
        assert!(c.should_reissue(b"_\r\n", after));
        assert!(!c.should_reissue(b"*2\r\n$1\r\na\r\n$1\r\nx\r\n", after));
        // A timeout before the slice ran out: someone ran CLIENT UNBLOCK; the client gets it.
        assert!(!c.should_reissue(b"*-1\r\n", Instant::now()));
    }

    #[test]
    fn never_waits_past_the_clients_timeout() {
        let mut c = call(&["BRPOPLPUSH", "s", "d", "0.2"]).unwrap();
        let args = sent(&mut c, Duration::from_secs(10));
        let t: f64 = args[3].parse().unwrap();
        assert!(t <= 0.2 && t > 0.0, "{t}");
        let later = Instant::now() + Duration::from_millis(300);
        assert!(
            !c.should_reissue(b"$-1\r\n", later),
            "the client's timeout passed"
        );
    }

    #[test]
    fn finds_timeouts_in_every_shape() {
        assert_eq!(
            sent(
                &mut call(&["BLMPOP", "0", "1", "k", "LEFT"]).unwrap(),
                Duration::from_secs(1)
            )[1],
            "1.000"
        );
        assert_eq!(
            sent(
                &mut call(&["WAIT", "1", "0"]).unwrap(),
                Duration::from_secs(2)
            )[2],
            "2000"
        );
        let x = sent(
            &mut call(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">",
            ])
            .unwrap(),
            Duration::from_secs(1),
        );
        assert_eq!(x[5], "1000");
        assert!(
            call(&["XREAD", "BLOCK", "0", "STREAMS", "s", "$"]).is_none(),
            "$ is not sliced"
        );
        assert!(
            call(&["XREAD", "STREAMS", "s", "0"]).is_none(),
            "no BLOCK: not blocking"
        );
        assert!(
            call(&["BLPOP", "k", "-1"]).is_none(),
            "negative: Redis refuses it"
        );
        assert!(
            call(&["BLPOP", "0"]).is_none(),
            "arity error: forwarded for Redis to refuse"
        );
        assert!(call(&["GET", "k"]).is_none());
    }

    #[test]
    fn waitaof_is_reissued_only_while_fsyncs_are_missing() {
        let mut c = call(&["WAITAOF", "1", "0", "0"]).unwrap();
        assert_eq!(sent(&mut c, Duration::from_secs(1))[3], "1000");
        let after = Instant::now() + Duration::from_millis(1100);
        assert!(c.should_reissue(b"*2\r\n:0\r\n:0\r\n", after));
        assert!(!c.should_reissue(b"*2\r\n:1\r\n:0\r\n", after));
        assert!(!c.should_reissue(
            b"-ERR WAITAOF cannot be used when appendonly is disabled\r\n",
            after
        ));
    }

    #[test]
    fn wait_is_reissued_only_while_replicas_are_missing() {
        let c = call(&["WAIT", "2", "0"]).unwrap();
        assert!(c.should_reissue(b":1\r\n", Instant::now()));
        assert!(!c.should_reissue(b":2\r\n", Instant::now()));
    }
}
