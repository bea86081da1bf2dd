//! When to fetch the next token, and how long to wait after a failed fetch.
//!
//! Pure functions of durations (plus a random number the caller passes in), so the whole timing
//! policy of spec §3 "Timing" is unit-tested without clocks or sleeps.
//!
//! # The refresh point
//!
//! A token issued at `t0` that expires at `exp` lives `L = exp - t0`. The relay promises to have
//! re-authenticated every live connection at least `margin_eff = min(--reauth-margin, L/4)`
//! before `exp`. A new token is fetched at
//!
//! ```text
//! t0 + min(refresh_at * L, L - 2 * margin_eff)
//! ```
//!
//! The second term is the deliberate slack: the fetch itself (and its retries) get one
//! `margin_eff`, and the relay gets at least another full `margin_eff` to walk every connection
//! through its next safe point before its own deadline `exp - margin_eff`. Without it, the
//! defaults (0.75 and a quarter of the lifetime) would make the refresh coincide exactly with the
//! re-auth deadline for every token shorter than 12 minutes. For long tokens the ratio wins
//! (24 h → 18 h; 1 h → 45 min), for short ones the slack does (2 s → 1 s).

use std::time::{Duration, SystemTime};

/// `--token-refresh-at` when the configured value is unusable (NaN or infinite).
pub const DEFAULT_REFRESH_AT: f64 = 0.75;

/// Never schedule two successful fetches closer than this: a source that issues absurdly short
/// tokens must not turn the refresher into a busy loop.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_millis(50);

/// How long one token request may take before it counts as failed (and is retried). Generous,
/// because IMDS retries internally for up to ~72 s, yet bounded so a hung endpoint can't stall
/// refreshing forever.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest timeout a token request gets, however short the current token's lifetime.
pub const MIN_FETCH_TIMEOUT: Duration = Duration::from_secs(1);

/// The timing knobs of the refresher, taken from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshPolicy {
    /// Fraction of a token's lifetime after which a new one is fetched (`--token-refresh-at`).
    pub refresh_at: f64,
    /// Live connections are re-authenticated at least this long before expiry
    /// (`--reauth-margin`, capped at a quarter of the lifetime).
    pub reauth_margin: Duration,
    /// Upper bound for one token request.
    pub fetch_timeout: Duration,
}

impl RefreshPolicy {
    /// The policy the configuration asks for.
    pub fn from_config(config: &crate::config::Config) -> Self {
        RefreshPolicy {
            refresh_at: config.token_refresh_at,
            reauth_margin: config.reauth_margin,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }

    /// The timeout for one token request while a token of `lifetime` is held (`None`: none
    /// yet): at most a quarter of that lifetime (but at least [`MIN_FETCH_TIMEOUT`]), so that a
    /// hung endpoint leaves time for retries before a short-lived token expires.
    pub fn fetch_timeout_for(&self, lifetime: Option<Duration>) -> Duration {
        match lifetime {
            Some(lifetime) => self
                .fetch_timeout
                .min((lifetime / 4).max(MIN_FETCH_TIMEOUT)),
            None => self.fetch_timeout,
        }
    }

    /// When to fetch the successor of a token issued at `issued_at` that expires at `expires_at`.
    pub fn next_refresh(&self, issued_at: SystemTime, expires_at: SystemTime) -> SystemTime {
        let lifetime = expires_at
            .duration_since(issued_at)
            .unwrap_or(Duration::ZERO);
        issued_at + refresh_delay(lifetime, self.refresh_at, self.reauth_margin)
    }
}

/// The re-authentication margin that applies to a token of this lifetime:
/// `min(configured, lifetime / 4)` (spec §2, `--reauth-margin`).
pub fn effective_margin(lifetime: Duration, configured: Duration) -> Duration {
    configured.min(lifetime / 4)
}

/// How long after its issue a token of `lifetime` should be replaced (see the module docs).
///
/// An already expired token (`lifetime == 0`) gives zero: refresh at once.
pub fn refresh_delay(lifetime: Duration, refresh_at: f64, margin: Duration) -> Duration {
    let by_ratio = lifetime.mul_f64(sanitize_ratio(refresh_at));
    let latest = lifetime.saturating_sub(effective_margin(lifetime, margin) * 2);
    by_ratio.min(latest).max(MIN_REFRESH_DELAY).min(lifetime)
}

/// Keeps a configured ratio inside `[0.01, 1]` so a bad value can neither spin nor overshoot.
fn sanitize_ratio(ratio: f64) -> f64 {
    if ratio.is_finite() {
        ratio.clamp(0.01, 1.0)
    } else {
        DEFAULT_REFRESH_AT
    }
}

/// Exponential backoff with jitter for failed token fetches.
///
/// Scaled to the lifetime of the token currently held so that a seconds-long token gets retried
/// several times before it expires, while a 24-hour token is retried at a polite pace. There is
/// deliberately no attempt limit: the refresher keeps retrying at `cap` after the token has
/// expired, so the proxy recovers on its own when the endpoint comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Upper bound of the first delay.
    pub base: Duration,
    /// Upper bound of every later delay.
    pub cap: Duration,
}

/// Backoff bounds before any token has been obtained: clients are being turned away, so retry
/// briskly, but don't hammer a broken endpoint either.
const NO_TOKEN_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    cap: Duration::from_secs(5),
};

/// The smallest first delay, whatever the lifetime.
const MIN_BACKOFF: Duration = Duration::from_millis(20);

impl Backoff {
    /// Backoff for a refresher that holds a token of `lifetime` (`None`: no token yet):
    /// `base = min(1 s, L/20)`, `cap = min(30 s, L/10)`.
    pub fn for_lifetime(lifetime: Option<Duration>) -> Self {
        let Some(lifetime) = lifetime else {
            return NO_TOKEN_BACKOFF;
        };
        let base = Duration::from_secs(1).min(lifetime / 20).max(MIN_BACKOFF);
        let cap = Duration::from_secs(30).min(lifetime / 10).max(base);
        Backoff { base, cap }
    }

    /// The upper bound of the delay before retry number `attempt` (1 = first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay before retry number `attempt`, given `unit` uniformly drawn from `[0, 1)`:
    /// "equal jitter", i.e. uniformly in `[ceiling/2, ceiling]`, so many proxies that failed
    /// together don't retry in lockstep, yet no retry comes sooner than half the ceiling.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let unit = if unit.is_nan() {
            0.5
        } else {
            unit.clamp(0.0, 1.0)
        };
        half + half.mul_f64(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn long_tokens_refresh_at_the_ratio() {
        let m = 3 * MIN;
        assert_eq!(refresh_delay(24 * HOUR, 0.75, m), 18 * HOUR);
        assert_eq!(refresh_delay(HOUR, 0.75, m), 45 * MIN);
        assert_eq!(refresh_delay(HOUR, 0.5, m), 30 * MIN);
    }

    #[test]
    fn margin_caps_a_late_ratio() {
        // 0.99 of an hour would leave 36 s; the margin (3 min, twice) wins: 54 min.
        assert_eq!(refresh_delay(HOUR, 0.99, 3 * MIN), 54 * MIN);
        // A big configured margin is capped at a quarter of the lifetime.
        assert_eq!(effective_margin(HOUR, 30 * MIN), 15 * MIN);
        assert_eq!(refresh_delay(HOUR, 0.75, 30 * MIN), 30 * MIN);
    }

    #[test]
    fn tiny_lifetimes_leave_room_for_reauth() {
        let m = 3 * MIN;
        // 2 s: margin_eff 0.5 s, latest 1.0 s.
        assert_eq!(refresh_delay(secs(2.0), 0.75, m), secs(1.0));
        assert_eq!(refresh_delay(secs(5.0), 0.75, m), secs(2.5));
        assert_eq!(refresh_delay(secs(3.0), 0.4, m), secs(1.2));
        for l in [2.0, 3.0, 4.0, 5.0] {
            let lifetime = secs(l);
            let delay = refresh_delay(lifetime, 0.75, m);
            let deadline = lifetime - effective_margin(lifetime, m);
            assert!(delay < deadline, "{l}s: {delay:?} !< {deadline:?}");
            assert!(delay >= MIN_REFRESH_DELAY);
        }
    }

    #[test]
    fn expired_and_absurd_tokens() {
        assert_eq!(refresh_delay(Duration::ZERO, 0.75, MIN), Duration::ZERO);
        assert_eq!(
            refresh_delay(Duration::from_millis(30), 0.75, MIN),
            Duration::from_millis(30)
        );
        assert_eq!(
            refresh_delay(Duration::from_millis(80), 0.75, MIN),
            MIN_REFRESH_DELAY
        );
    }

    #[test]
    fn bad_ratios_are_clamped() {
        assert_eq!(refresh_delay(HOUR, f64::NAN, MIN), 45 * MIN);
        assert_eq!(refresh_delay(HOUR, 7.0, MIN), HOUR - 2 * MIN);
        assert_eq!(refresh_delay(HOUR, -1.0, MIN), HOUR / 100);
    }

    #[test]
    fn next_refresh_from_times() {
        let policy = RefreshPolicy {
            refresh_at: 0.75,
            reauth_margin: 3 * MIN,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        };
        let t0 = SystemTime::UNIX_EPOCH + 1000 * HOUR;
        assert_eq!(policy.next_refresh(t0, t0 + HOUR), t0 + 45 * MIN);
        // Expiry before issue (clock skew, already expired): now.
        assert_eq!(policy.next_refresh(t0, t0 - MIN), t0);
    }

    #[test]
    fn fetch_timeout_shrinks_with_short_tokens() {
        let policy = RefreshPolicy {
            refresh_at: 0.75,
            reauth_margin: 3 * MIN,
            fetch_timeout: secs(30.0),
        };
        assert_eq!(policy.fetch_timeout_for(None), secs(30.0));
        assert_eq!(policy.fetch_timeout_for(Some(HOUR)), secs(30.0));
        assert_eq!(policy.fetch_timeout_for(Some(secs(20.0))), secs(5.0));
        assert_eq!(policy.fetch_timeout_for(Some(secs(2.0))), MIN_FETCH_TIMEOUT);
    }

    #[test]
    fn backoff_bounds_follow_the_lifetime() {
        let long = Backoff::for_lifetime(Some(24 * HOUR));
        assert_eq!((long.base, long.cap), (secs(1.0), secs(30.0)));
        let short = Backoff::for_lifetime(Some(secs(2.0)));
        assert_eq!((short.base, short.cap), (secs(0.1), secs(0.2)));
        let tiny = Backoff::for_lifetime(Some(Duration::from_millis(10)));
        assert_eq!((tiny.base, tiny.cap), (MIN_BACKOFF, MIN_BACKOFF));
        assert_eq!(Backoff::for_lifetime(None), NO_TOKEN_BACKOFF);
    }

    #[test]
    fn backoff_grows_then_stays_capped_forever() {
        let b = Backoff::for_lifetime(Some(HOUR));
        assert_eq!(b.ceiling(1), secs(1.0));
        assert_eq!(b.ceiling(2), secs(2.0));
        assert_eq!(b.ceiling(5), secs(16.0));
        assert_eq!(b.ceiling(6), secs(30.0));
        for attempt in [7, 100, 10_000, u32::MAX] {
            assert_eq!(b.ceiling(attempt), secs(30.0), "attempt {attempt}");
        }
    }

    #[test]
    fn jitter_stays_within_half_to_full_ceiling() {
        let b = Backoff::for_lifetime(Some(HOUR));
        assert_eq!(b.delay(3, 0.0), secs(2.0));
        assert_eq!(b.delay(3, 1.0), secs(4.0));
        assert_eq!(b.delay(3, 7.0), secs(4.0));
        assert_eq!(b.delay(3, f64::NAN), secs(3.0));
        for _ in 0..1000 {
            let attempt = fastrand::u32(1..50);
            let d = b.delay(attempt, fastrand::f64());
            let c = b.ceiling(attempt);
            assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
        }
    }
}
