//! The meter: sensor readings in, reports and relay decisions out.
//!
//! The board loop calls [`Meter::measure`] every sampling window, [`Meter::report`] every
//! publish interval, and hands every MQTT event to it: [`Meter::on_connected`],
//! [`Meter::next_to_send`], [`Meter::on_puback`], [`Meter::on_command`]. It persists
//! [`Meter::encode_state`] after every report and every applied command.

use heapless::Deque;

use crate::balance::{BalanceState, BalanceView, Relay, Stale};
use crate::command::{Command, CommandError};
use crate::energy::{self, Register};
use crate::outbox::Outbox;
use crate::report::Report;

/// How many acknowledged (seq, energyWh) pairs the meter remembers to place a late `ackSeq`.
pub const ACKED_HISTORY: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeterConfig {
    /// Nominal mains voltage (the meter measures current only).
    pub voltage_mv: u32,
    pub power_factor_permille: u32,
    /// The low-balance threshold (contract: `low_balance_units`, 3 units = 3000 Wh).
    pub low_balance_wh: i64,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            voltage_mv: 230_000,
            power_factor_permille: 1000,
            low_balance_wh: 3000,
        }
    }
}

/// What a command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The balance view changed; `acked` reports left the outbox through `ackSeq`.
    Balance {
        balance_wh: i64,
        acked: usize,
    },
    Relay(Relay),
    Config,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeterCommandError {
    #[error(transparent)]
    Parse(#[from] CommandError),
    #[error(transparent)]
    Stale(#[from] Stale),
}

pub struct Meter<const N: usize> {
    pub config: MeterConfig,
    pub(crate) register: Register,
    pub(crate) next_seq: u32,
    pub(crate) outbox: Outbox<N>,
    pub(crate) balance: BalanceView,
    pub(crate) acked: Deque<(u32, u64), ACKED_HISTORY>,
    pub(crate) current_ma: u32,
    pub(crate) power_mw: u32,
    pub(crate) low_announced: bool,
}

impl<const N: usize> Meter<N> {
    /// A meter fresh from the factory: register 0, first report seq 1.
    pub fn new(config: MeterConfig) -> Self {
        Meter {
            config,
            register: Register::default(),
            next_seq: 1,
            outbox: Outbox::new(),
            balance: BalanceView::default(),
            acked: Deque::new(),
            current_ma: 0,
            power_mw: 0,
            low_announced: false,
        }
    }

    /// Records one sampling window: RMS current held for `dt_ms`. Returns the relay decision.
    pub fn measure(&mut self, current_ma: u32, dt_ms: u32) -> Relay {
        self.current_ma = current_ma;
        self.power_mw = energy::power_mw(
            current_ma,
            self.config.voltage_mv,
            self.config.power_factor_permille,
        );
        self.register.integrate(self.power_mw, dt_ms);
        self.relay()
    }

    /// Takes a numbered report of the register now and queues it for sending.
    pub fn report(&mut self, timestamp_ms: u64) -> Report {
        let r = Report {
            seq: self.next_seq,
            energy_wh: self.register.wh(),
            power_mw: self.power_mw,
            current_ma: self.current_ma,
            voltage_mv: self.config.voltage_mv,
            relay: self.relay(),
            timestamp_ms,
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        self.outbox.push(r);
        r
    }

    /// A new MQTT session is up: every unacknowledged report goes again.
    pub fn on_connected(&mut self) {
        self.outbox.replay();
    }

    /// The next report to publish on this session.
    pub fn next_to_send(&mut self) -> Option<Report> {
        self.outbox.next_unsent()
    }

    /// The gateway committed report `seq`.
    pub fn on_puback(&mut self, seq: u32) -> bool {
        match self.outbox.ack(seq) {
            Some(r) => {
                remember(&mut self.acked, (r.seq, r.energy_wh));
                true
            }
            None => false,
        }
    }

    /// Applies `…/command/{leaf}`. A stale balance command (older `ledgerSeq`) changes nothing.
    pub fn on_command(&mut self, leaf: &str, payload: &[u8]) -> Result<Applied, MeterCommandError> {
        match Command::parse(leaf, payload)? {
            Command::Balance(c) => {
                if let Some(have) = self.balance.ledger_seq() {
                    if c.ledger_seq < have {
                        return Err(Stale {
                            got: c.ledger_seq,
                            have,
                        }
                        .into());
                    }
                }
                let mut acked = 0;
                let energy_at_ack = match c.ack_seq {
                    // The gateway has applied a seq this meter never numbered: the meter's flash
                    // was erased or replaced. Continue after it, or every report would be stale.
                    Some(a) if a >= self.next_seq => {
                        self.next_seq = a.wrapping_add(1);
                        acked = self.outbox.ack_through(a, |_| {});
                        self.register.wh()
                    }
                    Some(a) => {
                        let history = &mut self.acked;
                        acked = self
                            .outbox
                            .ack_through(a, |r| remember(history, (r.seq, r.energy_wh)));
                        self.energy_at(a)
                    }
                    // The gateway has no v2 report yet: the first one it receives, the oldest
                    // we hold, becomes its baseline.
                    None => self
                        .outbox
                        .oldest()
                        .map_or(self.register.wh(), |r| r.energy_wh),
                };
                self.balance
                    .apply(c.ledger_seq, c.balance_wh, energy_at_ack)?;
                let balance_wh = self.balance_wh().unwrap_or(c.balance_wh);
                if self.state() != BalanceState::Low {
                    self.low_announced = false;
                }
                Ok(Applied::Balance { balance_wh, acked })
            }
            Command::Relay(r) => {
                self.balance.remote_off = r.relay == Relay::Off;
                Ok(Applied::Relay(self.relay()))
            }
            Command::Config(c) => {
                if let Some(low) = c.low_balance_wh {
                    self.config.low_balance_wh = low;
                }
                Ok(Applied::Config)
            }
        }
    }

    /// The register value of report `seq`, from the outbox or the acknowledged history. A seq
    /// older than both can only come from a gateway that lost state; the register now is the
    /// best estimate then.
    fn energy_at(&self, seq: u32) -> u64 {
        self.outbox
            .get(seq)
            .map(|r| r.energy_wh)
            .or_else(|| self.acked.iter().find(|(s, _)| *s == seq).map(|(_, e)| *e))
            .unwrap_or(self.register.wh())
    }

    pub fn balance_wh(&self) -> Option<i64> {
        self.balance.balance_wh(self.register.wh())
    }

    pub fn relay(&self) -> Relay {
        self.balance.relay(self.register.wh())
    }

    pub fn state(&self) -> BalanceState {
        self.balance
            .state(self.register.wh(), self.config.low_balance_wh)
    }

    /// True once each time the balance falls into [`BalanceState::Low`], until a command lifts
    /// it out again: the board publishes a `low_balance` status then.
    pub fn take_low_balance_alert(&mut self) -> bool {
        if self.state() == BalanceState::Low && !self.low_announced {
            self.low_announced = true;
            true
        } else {
            false
        }
    }

    pub fn energy_wh(&self) -> u64 {
        self.register.wh()
    }

    pub fn register(&self) -> Register {
        self.register
    }

    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    pub fn outbox(&self) -> &Outbox<N> {
        &self.outbox
    }

    pub fn ledger_seq(&self) -> Option<i64> {
        self.balance.ledger_seq()
    }
}

fn remember(h: &mut Deque<(u32, u64), ACKED_HISTORY>, e: (u32, u64)) {
    if h.iter().any(|(s, _)| *s == e.0) {
        return;
    }
    if h.is_full() {
        h.pop_front();
    }
    let _ = h.push_back(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    type M = Meter<16>;

    fn balance_cmd(balance_wh: i64, ledger_seq: i64, ack: Option<u32>) -> std::string::String {
        match ack {
            Some(a) => std::format!(
                r#"{{"balance":0,"timestamp":0,"balanceWh":{balance_wh},"ledgerSeq":{ledger_seq},"ackSeq":{a},"relay":"on"}}"#
            ),
            None => std::format!(
                r#"{{"balance":0,"timestamp":0,"balanceWh":{balance_wh},"ledgerSeq":{ledger_seq},"relay":"on"}}"#
            ),
        }
    }

    /// 1 kW for 36 s = 10 Wh.
    fn use_10_wh(m: &mut M) {
        for _ in 0..36 {
            m.measure(4348, 1000);
        }
    }

    #[test]
    fn balance_view_subtracts_energy_used_since_the_acknowledged_report() {
        let mut m = M::new(MeterConfig::default());
        let baseline = m.report(0);
        m.on_puback(baseline.seq);
        m.on_command(
            "balance",
            balance_cmd(5000, 1, Some(baseline.seq)).as_bytes(),
        )
        .unwrap();
        assert_eq!(m.balance_wh(), Some(5000));
        use_10_wh(&mut m);
        let used = m.energy_wh();
        assert!(used >= 9, "{used}");
        assert_eq!(m.balance_wh(), Some(5000 - used as i64));
        // The gateway debits that report and confirms: no double count.
        let r = m.report(1);
        m.on_command(
            "balance",
            balance_cmd(5000 - used as i64, 2, Some(r.seq)).as_bytes(),
        )
        .unwrap();
        assert_eq!(m.balance_wh(), Some(5000 - used as i64));
        assert!(m.outbox().is_empty(), "ackSeq acknowledged the report");
    }

    #[test]
    fn stale_balance_command_is_ignored() {
        let mut m = M::new(MeterConfig::default());
        m.on_command("balance", balance_cmd(100, 5, None).as_bytes())
            .unwrap();
        let e = m
            .on_command("balance", balance_cmd(99_999, 4, None).as_bytes())
            .unwrap_err();
        assert_eq!(e, MeterCommandError::Stale(Stale { got: 4, have: 5 }));
        assert_eq!(m.balance_wh(), Some(100));
    }

    #[test]
    fn relay_opens_when_the_balance_runs_out_and_closes_on_credit() {
        let mut m = M::new(MeterConfig::default());
        assert_eq!(m.relay(), Relay::Off, "no balance known yet");
        let b = m.report(0);
        m.on_command("balance", balance_cmd(15, 1, Some(b.seq)).as_bytes())
            .unwrap();
        assert_eq!(m.relay(), Relay::On);
        assert!(m.take_low_balance_alert());
        assert!(!m.take_low_balance_alert(), "announced once");
        use_10_wh(&mut m);
        use_10_wh(&mut m);
        assert_eq!(m.relay(), Relay::Off);
        assert_eq!(m.state(), BalanceState::Exhausted);
        let r = m.report(0);
        m.on_command("balance", balance_cmd(10_000, 3, Some(r.seq)).as_bytes())
            .unwrap();
        assert_eq!((m.relay(), m.state()), (Relay::On, BalanceState::Credit));
    }

    #[test]
    fn a_meter_with_erased_flash_continues_after_the_gateways_seq() {
        let mut m = M::new(MeterConfig::default());
        let first = m.report(0);
        assert_eq!(first.seq, 1);
        m.on_command("balance", balance_cmd(700, 40, Some(1234)).as_bytes())
            .unwrap();
        assert!(
            m.outbox().is_empty(),
            "seq 1 is below what the gateway applied"
        );
        assert_eq!(m.report(1).seq, 1235);
        assert_eq!(m.balance_wh(), Some(700));
    }

    #[test]
    fn maintenance_relay_command_overrides_credit() {
        let mut m = M::new(MeterConfig::default());
        m.on_command("balance", balance_cmd(100, 1, None).as_bytes())
            .unwrap();
        m.on_command("relay", br#"{"relay":"off"}"#).unwrap();
        assert_eq!(m.relay(), Relay::Off);
        m.on_command("relay", br#"{"relay":"on"}"#).unwrap();
        assert_eq!(m.relay(), Relay::On);
    }
}
