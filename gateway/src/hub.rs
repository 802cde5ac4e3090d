//! The registry of meter sessions: which meter is connected on which connection, and what it
//! has subscribed to. Commands for a meter go through here to its connection task.
//!
//! It is synchronous (a mutex around a map) so the ledger writer thread can hand over balance
//! commands right after its commit, in commit order, without an async runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use rumqttc::QoS;
use tokio::sync::mpsc;

use crate::meter::MeterId;

/// What a connection task is asked to do.
#[derive(Debug)]
pub enum Outgoing {
    /// Publish `payload` on the meter's `…/command/{leaf}` if it is subscribed to it.
    Command { leaf: &'static str, payload: Bytes },
    /// Another connection authenticated as the same meter: close this one.
    TakenOver,
}

struct Slot {
    conn: u64,
    tx: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Granted filters; kept after a `clean_session = false` connection ends.
    subscriptions: Vec<(String, QoS)>,
}

/// A connection's registration in the hub.
pub struct Registration {
    pub conn: u64,
    pub rx: mpsc::UnboundedReceiver<Outgoing>,
    /// Subscriptions restored from a previous `clean_session = false` connection.
    pub restored: Option<Vec<(String, QoS)>>,
}

#[derive(Default)]
pub struct Hub {
    slots: Mutex<HashMap<MeterId, Slot>>,
    next_conn: AtomicU64,
}

impl Hub {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<MeterId, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection for `meter`, closing any older one (session takeover).
    pub fn register(&self, meter: &MeterId, clean_session: bool) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut slots = self.slots();
        let old = slots.remove(meter);
        let mut restored = None;
        if let Some(old) = old {
            if let Some(old_tx) = old.tx {
                let _ = old_tx.send(Outgoing::TakenOver);
            }
            if !clean_session && !old.subscriptions.is_empty() {
                restored = Some(old.subscriptions);
            }
        }
        slots.insert(
            meter.clone(),
            Slot {
                conn,
                tx: Some(tx),
                subscriptions: restored.clone().unwrap_or_default(),
            },
        );
        Registration { conn, rx, restored }
    }

    /// Records the connection's current subscriptions (for session resumption).
    pub fn set_subscriptions(&self, meter: &MeterId, conn: u64, subs: &[(String, QoS)]) {
        if let Some(slot) = self.slots().get_mut(meter).filter(|s| s.conn == conn) {
            slot.subscriptions = subs.to_vec();
        }
    }

    /// Ends a connection's registration; a persistent session keeps its subscriptions.
    pub fn unregister(&self, meter: &MeterId, conn: u64, clean_session: bool) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(meter).filter(|s| s.conn == conn) {
            if clean_session {
                slots.remove(meter);
            } else {
                slot.tx = None;
            }
        }
    }

    /// Hands a command to the meter's connection, if it is connected. Returns whether it was.
    pub fn send(&self, meter: &MeterId, out: Outgoing) -> bool {
        match self.slots().get(meter).and_then(|s| s.tx.as_ref()) {
            Some(tx) => tx.send(out).is_ok(),
            None => false,
        }
    }

    /// Meters connected now.
    pub fn connected(&self) -> usize {
        self.slots().values().filter(|s| s.tx.is_some()).count()
    }

    pub fn is_connected(&self, meter: &MeterId) -> bool {
        self.slots().get(meter).is_some_and(|s| s.tx.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_closes_the_old_connection_and_resumes_persistent_subscriptions() {
        let hub = Hub::default();
        let m = MeterId::parse("M1").unwrap();
        let mut a = hub.register(&m, false);
        hub.set_subscriptions(&m, a.conn, &[("x/M1/command/#".into(), QoS::AtLeastOnce)]);
        let b = hub.register(&m, false);
        assert!(matches!(a.rx.try_recv(), Ok(Outgoing::TakenOver)));
        assert_eq!(b.restored.as_ref().map(Vec::len), Some(1));
        // The old connection ending must not remove the new one.
        hub.unregister(&m, a.conn, false);
        assert!(hub.is_connected(&m));
        hub.unregister(&m, b.conn, true);
        assert!(!hub.is_connected(&m));
        assert!(hub.register(&m, false).restored.is_none());
    }
}
