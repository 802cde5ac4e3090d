//! The prepaid balance as the meter sees it, and what the relay does about it.
//!
//! The gateway's ledger is the source of truth (contract §5). A balance command says "after
//! applying your reports up to `ackSeq`, the balance is `balanceWh`". The meter keeps that as an
//! *anchor* = balanceWh + energyWh(ackSeq), so that its view at any register value is simply
//! `anchor − register`: energy used since the acknowledged report is already subtracted, and a
//! command that arrives late cannot make the meter count the same Wh twice.

/// The load relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relay {
    On,
    Off,
}

impl Relay {
    pub fn as_str(self) -> &'static str {
        match self {
            Relay::On => "on",
            Relay::Off => "off",
        }
    }
}

/// What the meter shows and announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceState {
    /// No balance command received yet: the relay stays off.
    Unknown,
    /// Above the low-balance threshold.
    Credit,
    /// At or below the threshold but above zero.
    Low,
    /// At or below zero: the relay is off until the next credit.
    Exhausted,
}

/// A command older than one already applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stale balance command: ledgerSeq {got} is older than {have}")]
pub struct Stale {
    pub got: i64,
    pub have: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalanceView {
    anchor_wh: Option<i64>,
    ledger_seq: Option<i64>,
    /// Maintenance override from `command/relay`.
    pub remote_off: bool,
}

impl BalanceView {
    pub fn restore(anchor_wh: Option<i64>, ledger_seq: Option<i64>, remote_off: bool) -> Self {
        BalanceView {
            anchor_wh,
            ledger_seq,
            remote_off,
        }
    }

    pub fn anchor_wh(&self) -> Option<i64> {
        self.anchor_wh
    }

    pub fn ledger_seq(&self) -> Option<i64> {
        self.ledger_seq
    }

    /// The balance at this register value, when known.
    pub fn balance_wh(&self, register_wh: u64) -> Option<i64> {
        self.anchor_wh
            .map(|a| a.saturating_sub(register_wh.min(i64::MAX as u64) as i64))
    }

    /// Applies a balance command unless an equal-or-newer one was applied already... except
    /// that an equal `ledgerSeq` is accepted: it is the same ledger state re-sent (the retained
    /// copy after a reconnect), so applying it again changes nothing.
    pub fn apply(
        &mut self,
        ledger_seq: i64,
        balance_wh: i64,
        energy_at_ack_wh: u64,
    ) -> Result<(), Stale> {
        if let Some(have) = self.ledger_seq {
            if ledger_seq < have {
                return Err(Stale {
                    got: ledger_seq,
                    have,
                });
            }
        }
        self.ledger_seq = Some(ledger_seq);
        self.anchor_wh = Some(balance_wh.saturating_add(energy_at_ack_wh as i64));
        Ok(())
    }

    /// Off at ≤ 0 (or unknown, or switched off for maintenance), on when credited.
    pub fn relay(&self, register_wh: u64) -> Relay {
        match self.balance_wh(register_wh) {
            Some(b) if b > 0 && !self.remote_off => Relay::On,
            _ => Relay::Off,
        }
    }

    pub fn state(&self, register_wh: u64, low_balance_wh: i64) -> BalanceState {
        match self.balance_wh(register_wh) {
            None => BalanceState::Unknown,
            Some(b) if b <= 0 => BalanceState::Exhausted,
            Some(b) if b <= low_balance_wh => BalanceState::Low,
            Some(_) => BalanceState::Credit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_is_off_until_the_first_command() {
        let v = BalanceView::default();
        assert_eq!(v.relay(0), Relay::Off);
        assert_eq!(v.state(0, 3000), BalanceState::Unknown);
    }

    #[test]
    fn relay_goes_off_at_zero_and_back_on_when_credited() {
        let mut v = BalanceView::default();
        v.apply(1, 5000, 100).unwrap();
        assert_eq!(v.balance_wh(100), Some(5000));
        assert_eq!(v.state(2100, 3000), BalanceState::Low);
        assert_eq!(v.relay(5099), Relay::On);
        assert_eq!(v.relay(5100), Relay::Off);
        assert_eq!(v.state(5100, 3000), BalanceState::Exhausted);
        // Credit arrives, computed by the gateway after applying the report at 5100 Wh.
        v.apply(3, 2000, 5100).unwrap();
        assert_eq!(v.relay(5100), Relay::On);
    }

    #[test]
    fn older_ledger_seq_is_rejected_and_changes_nothing() {
        let mut v = BalanceView::default();
        v.apply(7, 1000, 0).unwrap();
        assert_eq!(v.apply(6, 9999, 0), Err(Stale { got: 6, have: 7 }));
        assert_eq!(v.balance_wh(0), Some(1000));
        assert!(
            v.apply(7, 1000, 0).is_ok(),
            "the retained copy again is fine"
        );
    }

    #[test]
    fn maintenance_off_overrides_credit() {
        let mut v = BalanceView::default();
        v.apply(1, 1000, 0).unwrap();
        v.remote_off = true;
        assert_eq!(v.relay(0), Relay::Off);
    }
}
