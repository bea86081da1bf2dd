//! Connection slots for the two small HTTP servers (the admin endpoint and the injector), with
//! eviction instead of refusal when they are all taken.
//!
//! # Why eviction
//!
//! Both servers listen where any peer on the pod network can connect, and both must keep
//! answering one particular client: the kubelet's probes (admin endpoint) and the API server
//! (injector, whose `failurePolicy: Fail` turns an unanswered review into a refused pod). A
//! fixed number of slots that refuses the next connection when full lets a hostile peer hold
//! every slot (a header byte every few seconds is enough) and starve those clients; a longer
//! queue only delays the starvation. So a full table never refuses a newcomer: it closes the
//! connection that is least likely to matter, chosen in this order:
//!
//! 1. a connection that has not yet sent a complete request head (still in the TLS handshake,
//!    trickling its headers, or idle since it connected) before one that has been served;
//! 2. among those, one from the peer that holds the most connections (the newcomer counted
//!    with its own peer), so that one flooding peer only ever closes its own connections and
//!    a peer with few connections (the kubelet, the API server) always gets in;
//! 3. the oldest one.
//!
//! A peer is an IPv4 address or an IPv6 /64 (one host usually holds a whole /64). A newcomer
//! thus always gets a slot, and the connection it displaces is never newer than it: a probe,
//! whose request follows its connect at once, is answered before enough newer connections can
//! arrive to displace it. The table holds at most `max` entries, so memory stays bounded; an
//! evicted connection's task sees [`Slot::evicted`] and closes at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A fixed number of connection slots; see the module documentation for who is evicted.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    table: Mutex<Table>,
}

/// The connections holding a slot, oldest first.
#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    entries: Vec<Entry>,
}

/// One connection holding a slot.
#[derive(Debug)]
struct Entry {
    id: u64,
    peer: Peer,
    served: Arc<AtomicBool>,
    evict: CancellationToken,
}

/// The unit of fairness: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    V4(u32),
    V6(u64),
}

impl Peer {
    fn of(ip: IpAddr) -> Peer {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Peer::V4(u32::from(v4)),
            IpAddr::V6(v6) => Peer::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// A connection's slot: released when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    served: Arc<AtomicBool>,
    evict: CancellationToken,
}

/// Who a full table displaced to make room (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    /// The displaced connection's peer had sent no complete request yet.
    pub(crate) unserved: bool,
}

impl Slots {
    /// `max` slots (at least one).
    pub(crate) fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max: max.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    /// A slot for a new connection from `peer`; when the table is full, the connection chosen
    /// as the module documentation says is told to close, and what it was is returned.
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> (Slot, Option<Evicted>) {
        let peer = Peer::of(peer);
        let mut table = self.lock();
        let evicted = (table.entries.len() >= self.max)
            .then(|| table.evict_one(peer))
            .flatten();
        let id = table.next_id;
        table.next_id += 1;
        let served = Arc::new(AtomicBool::new(false));
        let evict = CancellationToken::new();
        table.entries.push(Entry {
            id,
            peer,
            served: served.clone(),
            evict: evict.clone(),
        });
        drop(table);
        let slot = Slot {
            slots: self.clone(),
            id,
            served,
            evict,
        };
        (slot, evicted)
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the lock; if something did, the table is still usable.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Table {
    /// Removes the connection to displace for a newcomer from `newcomer` and tells it to close.
    fn evict_one(&mut self, newcomer: Peer) -> Option<Evicted> {
        let mut counts: HashMap<Peer, usize> = HashMap::new();
        for entry in &self.entries {
            *counts.entry(entry.peer).or_default() += 1;
        }
        *counts.entry(newcomer).or_default() += 1;
        // Entries are oldest first: on equal keys `max_by_key` keeps the last one, so compare
        // the reversed position to prefer the oldest.
        let (index, _) = self.entries.iter().enumerate().max_by_key(|(i, entry)| {
            let unserved = !entry.served.load(Ordering::Relaxed);
            (unserved, counts[&entry.peer], std::cmp::Reverse(*i))
        })?;
        let victim = self.entries.remove(index);
        victim.evict.cancel();
        Some(Evicted {
            unserved: !victim.served.load(Ordering::Relaxed),
        })
    }
}

impl Slot {
    /// The handle with which a request handler records that the connection sent a complete
    /// request head: it is then displaced only after every connection that has not.
    pub(crate) fn served_flag(&self) -> ServedFlag {
        ServedFlag(self.served.clone())
    }

    /// Completes when a newcomer displaced this connection: close it at once.
    pub(crate) fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evict.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.slots.lock();
        if let Some(index) = table.entries.iter().position(|e| e.id == self.id) {
            table.entries.remove(index);
        }
    }
}

/// See [`Slot::served_flag`]; `'static` and cloneable, as request handlers must be.
#[derive(Debug, Clone)]
pub(crate) struct ServedFlag(Arc<AtomicBool>);

impl ServedFlag {
    /// The connection sent a complete request head.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn below_the_cap_nobody_is_evicted_and_dropping_frees_the_slot() {
        let slots = Slots::new(2);
        let (a, none) = slots.admit(ip("10.0.0.1"));
        assert_eq!(none, None);
        let (_b, none) = slots.admit(ip("10.0.0.2"));
        assert_eq!(none, None);
        drop(a);
        assert_eq!(slots.len(), 1);
        let (_c, none) = slots.admit(ip("10.0.0.3"));
        assert_eq!(none, None);
    }

    #[test]
    fn a_flooding_peer_only_displaces_its_own_connections() {
        let slots = Slots::new(4);
        let (kubelet, _) = slots.admit(ip("10.0.0.1"));
        let mut hostile = Vec::new();
        for _ in 0..3 {
            hostile.push(slots.admit(ip("10.9.9.9")).0);
        }
        for _ in 0..10 {
            let (slot, evicted) = slots.admit(ip("10.9.9.9"));
            assert_eq!(evicted, Some(Evicted { unserved: true }));
            hostile.push(slot);
            assert!(
                !kubelet.evict.is_cancelled(),
                "the other peer was displaced"
            );
        }
        assert_eq!(slots.len(), 4);
        // The oldest of the flooder's connections went first.
        assert!(hostile[0].evict.is_cancelled() && hostile[1].evict.is_cancelled());
        assert!(!hostile[12].evict.is_cancelled());
    }

    #[test]
    fn a_newcomer_displaces_the_busiest_peer_then_the_oldest_unserved_connection() {
        let slots = Slots::new(3);
        let (served, _) = slots.admit(ip("10.9.9.9"));
        served.served_flag().set();
        let (old, _) = slots.admit(ip("10.9.9.9"));
        let (other, _) = slots.admit(ip("10.0.0.2"));
        let (_probe, evicted) = slots.admit(ip("10.0.0.1"));
        assert_eq!(evicted, Some(Evicted { unserved: true }));
        assert!(old.evict.is_cancelled(), "the busiest peer's unserved one");
        assert!(!served.evict.is_cancelled() && !other.evict.is_cancelled());
    }

    #[test]
    fn served_connections_go_only_when_no_unserved_one_is_left() {
        let slots = Slots::new(2);
        let (a, _) = slots.admit(ip("10.0.0.1"));
        let (b, _) = slots.admit(ip("10.0.0.2"));
        a.served_flag().set();
        b.served_flag().set();
        let (_c, evicted) = slots.admit(ip("10.0.0.3"));
        assert_eq!(evicted, Some(Evicted { unserved: false }));
        assert!(
            a.evict.is_cancelled() && !b.evict.is_cancelled(),
            "the oldest"
        );
    }

    #[test]
    fn an_ipv6_slash_64_is_one_peer() {
        let slots = Slots::new(2);
        let (kubelet, _) = slots.admit(ip("fd00:1::1"));
        let (first, _) = slots.admit(ip("fd00:2::1"));
        let (_second, _) = slots.admit(ip("fd00:2::ffff"));
        assert!(first.evict.is_cancelled(), "the same /64 counted twice");
        assert!(!kubelet.evict.is_cancelled());
        assert_eq!(Peer::of(ip("::ffff:10.0.0.1")), Peer::of(ip("10.0.0.1")));
    }
}
