//! What `/startup` and `/readiness` report, kept apart from the admin HTTP server so the rules
//! are plain functions of state.
//!
//! Readiness never dials the upstream: a brief upstream blip must not take every pod out of its
//! Service at once (Cloud SQL Auth Proxy and AlloyDB Auth Proxy removed exactly that after
//! outages). Upstream health shows in `/startup`, the metrics and `check`.

use crate::credential::CredentialWatch;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

/// Process health, shared by the server (which updates it) and the admin endpoint (which reads it).
#[derive(Debug)]
pub struct Health {
    started: AtomicBool,
    draining: AtomicBool,
    live: AtomicUsize,
    max_connections: usize,
    /// `None` with `--auth none` (there is no credential to hold).
    credentials: Option<CredentialWatch>,
}

impl Health {
    /// Health of a proxy that has not started yet.
    pub fn new(max_connections: usize, credentials: Option<CredentialWatch>) -> Self {
        Health {
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            max_connections,
            credentials,
        }
    }

    /// The first credential was obtained and one upstream connection authenticated.
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// [`Health::mark_started`], true for the one call that did it (to log it once).
    pub fn mark_started_first(&self) -> bool {
        !self.started.swap(true, Ordering::SeqCst)
    }

    /// `GET /startup`: 200 once started.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// `GET /startup` with its reason: `Ok` once started, else one line saying what is still
    /// missing, so `kubectl describe pod` (which shows a failed probe's body) points at the cause.
    /// The credential's last error is scrubbed by the credential manager: no secret in it.
    pub fn startup(&self) -> Result<(), String> {
        if self.started() {
            return Ok(());
        }
        let credential_problem = self.credentials.as_ref().and_then(|watch| {
            let state = watch.borrow();
            state.current.is_none().then(|| state.last_error.clone())
        });
        let reason = match credential_problem {
            Some(Some(error)) => format!("not started: no credential yet: {error}"),
            Some(None) => "not started: waiting for the first credential".to_string(),
            None => "not started: no upstream connection authenticated yet".to_string(),
        };
        Err(reason.replace(['\r', '\n'], " "))
    }

    /// Shutdown began: readiness turns 503.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// A client connected (`true`) or left (`false`).
    pub fn client(&self, connected: bool) {
        if connected {
            self.live.fetch_add(1, Ordering::SeqCst);
        } else {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Clients connected now.
    pub fn live_clients(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// `GET /readiness`: `Ok` while the proxy can serve, else why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if !self.started() {
            return Err("not started: no credential or no authenticated upstream connection yet");
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        if self.max_connections > 0 && self.live_clients() >= self.max_connections {
            return Err("at --max-connections");
        }
        if let Some(watch) = &self.credentials
            && watch.borrow().valid_at(SystemTime::now()).is_none()
        {
            return Err("no valid credential");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{AuthCredential, CredentialState};
    use crate::secret::Secret;
    use std::sync::Arc;
    use std::time::Duration;

    fn state(expires_in: i64) -> CredentialState {
        let at = if expires_in >= 0 {
            SystemTime::now() + Duration::from_secs(expires_in as u64)
        } else {
            SystemTime::now() - Duration::from_secs((-expires_in) as u64)
        };
        CredentialState {
            current: Some(Arc::new(AuthCredential::new(
                None,
                Secret::new("t"),
                Some(at),
                1,
            ))),
            last_error: None,
        }
    }

    #[test]
    fn readiness_follows_the_rules_of_the_spec() {
        let (tx, rx) = tokio::sync::watch::channel(CredentialState::default());
        let h = Health::new(2, Some(rx));
        assert_eq!(
            h.readiness(),
            Err("not started: no credential or no authenticated upstream connection yet")
        );
        tx.send_replace(state(60));
        h.mark_started();
        assert_eq!(h.readiness(), Ok(()));
        h.client(true);
        h.client(true);
        assert_eq!(h.readiness(), Err("at --max-connections"));
        h.client(false);
        assert_eq!(h.readiness(), Ok(()));
        tx.send_replace(state(-1));
        assert_eq!(h.readiness(), Err("no valid credential"));
        tx.send_replace(state(60));
        h.mark_draining();
        assert_eq!(h.readiness(), Err("shutting down"));
    }

    #[test]
    fn startup_says_what_is_missing_on_one_line() {
        let (tx, rx) = tokio::sync::watch::channel(CredentialState::default());
        let h = Health::new(0, Some(rx));
        assert_eq!(
            h.startup(),
            Err("not started: waiting for the first credential".to_string())
        );
        tx.send_replace(CredentialState {
            current: None,
            last_error: Some("token endpoint: 500\nInternal".into()),
        });
        assert_eq!(
            h.startup(),
            Err("not started: no credential yet: token endpoint: 500 Internal".to_string())
        );
        tx.send_replace(state(60));
        assert_eq!(
            h.startup(),
            Err("not started: no upstream connection authenticated yet".to_string())
        );
        h.mark_started();
        assert_eq!(h.startup(), Ok(()));
        assert_eq!(
            Health::new(0, None).startup(),
            Err("not started: no upstream connection authenticated yet".to_string())
        );
    }
}
