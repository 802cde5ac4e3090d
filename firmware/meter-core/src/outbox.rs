//! Reports not yet acknowledged by the gateway, oldest first, keyed by `seq`.
//!
//! A report leaves the outbox only when the gateway has applied it: on its PUBACK (the gateway
//! acknowledges QoS 1 only after its SQLite commit) or when a balance command's `ackSeq` covers
//! it. After a reconnect everything left is sent again, oldest first; the gateway ignores a seq
//! it has already applied, so a replay never debits twice.
//!
//! What can be lost: when more than `N` reports wait, the oldest is dropped (counted in
//! [`Outbox::dropped`]). The ledger loses no energy by it, since every report carries the
//! cumulative register; only that report's power reading is gone.

use heapless::Deque;

use crate::report::Report;

pub struct Outbox<const N: usize> {
    q: Deque<Report, N>,
    /// Highest seq already sent on the current connection.
    sent_through: Option<u32>,
    dropped: u32,
}

impl<const N: usize> Default for Outbox<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Outbox<N> {
    pub const fn new() -> Self {
        Outbox {
            q: Deque::new(),
            sent_through: None,
            dropped: 0,
        }
    }

    /// Adds a report (its seq must be higher than every queued one); returns the report
    /// dropped to make room, if any.
    pub fn push(&mut self, r: Report) -> Option<Report> {
        let evicted = if self.q.is_full() {
            self.dropped = self.dropped.saturating_add(1);
            self.q.pop_front()
        } else {
            None
        };
        // Cannot fail: there is room now.
        let _ = self.q.push_back(r);
        evicted
    }

    /// The next report to send on this connection, marked as sent.
    pub fn next_unsent(&mut self) -> Option<Report> {
        let after = self.sent_through;
        let next = self
            .q
            .iter()
            .find(|r| after.is_none_or(|s| r.seq > s))
            .copied()?;
        self.sent_through = Some(next.seq);
        Some(next)
    }

    /// A new connection: send everything still queued again.
    pub fn replay(&mut self) {
        self.sent_through = None;
    }

    /// Removes the report with this seq (its PUBACK arrived).
    pub fn ack(&mut self, seq: u32) -> Option<Report> {
        self.get(seq)?;
        let mut found = None;
        // One rotation through the deque keeps the order of the others.
        for _ in 0..self.q.len() {
            let Some(r) = self.q.pop_front() else { break };
            if found.is_none() && r.seq == seq {
                found = Some(r);
            } else {
                let _ = self.q.push_back(r);
            }
        }
        found
    }

    /// Removes every report with seq ≤ `seq`, calling `f` for each; returns how many.
    pub fn ack_through(&mut self, seq: u32, mut f: impl FnMut(&Report)) -> usize {
        let mut n = 0;
        while let Some(front) = self.q.front() {
            if front.seq > seq {
                break;
            }
            if let Some(r) = self.q.pop_front() {
                f(&r);
                n += 1;
            }
        }
        n
    }

    pub fn get(&self, seq: u32) -> Option<&Report> {
        self.q.iter().find(|r| r.seq == seq)
    }

    pub fn oldest(&self) -> Option<&Report> {
        self.q.front()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Report> {
        self.q.iter()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Reports dropped because the outbox was full (since boot).
    pub fn dropped(&self) -> u32 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Relay;

    fn r(seq: u32) -> Report {
        Report {
            seq,
            energy_wh: seq as u64 * 10,
            power_mw: 0,
            current_ma: 0,
            voltage_mv: 230_000,
            relay: Relay::On,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn reconnection_resends_unacked_reports_oldest_first() {
        let mut o: Outbox<8> = Outbox::new();
        for s in 1..=3 {
            o.push(r(s));
        }
        assert_eq!(o.next_unsent().map(|r| r.seq), Some(1));
        assert_eq!(o.next_unsent().map(|r| r.seq), Some(2));
        assert!(o.ack(1).is_some());
        o.replay();
        assert_eq!(o.next_unsent().map(|r| r.seq), Some(2));
        assert_eq!(o.next_unsent().map(|r| r.seq), Some(3));
        assert_eq!(o.next_unsent(), None);
    }

    #[test]
    fn ack_seq_removes_everything_up_to_it() {
        let mut o: Outbox<8> = Outbox::new();
        for s in 1..=5 {
            o.push(r(s));
        }
        let mut seen = 0;
        assert_eq!(o.ack_through(3, |_| seen += 1), 3);
        assert_eq!((seen, o.oldest().map(|r| r.seq)), (3, Some(4)));
        assert!(o.ack(5).is_some());
        assert!(o.ack(5).is_none(), "a duplicate PUBACK changes nothing");
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts_it() {
        let mut o: Outbox<2> = Outbox::new();
        assert!(o.push(r(1)).is_none());
        assert!(o.push(r(2)).is_none());
        assert_eq!(o.push(r(3)).map(|r| r.seq), Some(1));
        assert_eq!(o.dropped(), 1);
    }
}
