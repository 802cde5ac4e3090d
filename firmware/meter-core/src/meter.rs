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
use crate::limits::{Allowance, PowerLimiter, Settings, Trip};
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
    /// `changed`: some setting took a new value (an identical re-send changes nothing).
    Config {
        changed: bool,
    },
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
    /// Settings from `command/config` (limits, publish interval, UTC offset).
    pub(crate) settings: Settings,
    pub(crate) limiter: PowerLimiter,
    pub(crate) allowance: Allowance,
    /// Unix ms: the last balance command's `timestamp`, carried forward by the sampling windows.
    pub(crate) clock_ms: Option<u64>,
    /// The last balance command's `mayCut` (false in friendly hours).
    pub(crate) may_cut: bool,
    /// A trip not yet reported.
    pub(crate) pending_trip: Option<Trip>,
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
            settings: Settings::default(),
            limiter: PowerLimiter::default(),
            allowance: Allowance::default(),
            clock_ms: None,
            may_cut: true,
            pending_trip: None,
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
        self.clock_ms = self.clock_ms.map(|c| c.saturating_add(dt_ms as u64));
        self.allowance.advance(
            self.clock_ms,
            self.settings.utc_offset_min,
            self.register.wh(),
        );
        let limits = self.settings.power;
        // In friendly hours (the gateway says the meter may not cut for credit) the cap still
        // applies unless the config says otherwise.
        let active = self.may_cut || limits.in_friendly_hours;
        if let Some(trip) = self.limiter.step(&limits, active, self.power_mw, dt_ms) {
            self.pending_trip = Some(trip);
        }
        self.relay()
    }

    /// A trip not yet reported: the board publishes it as a `power_trip` status (QoS 1).
    /// Only the latest is kept; its `trips` count says how many there were.
    pub fn take_trip(&mut self) -> Option<Trip> {
        self.pending_trip.take()
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
                self.may_cut = c.may_cut;
                if let Some(t) = c.timestamp_ms {
                    self.clock_ms = Some(t);
                    self.allowance.advance(
                        self.clock_ms,
                        self.settings.utc_offset_min,
                        self.register.wh(),
                    );
                }
                let balance_wh = self.balance_wh().unwrap_or(c.balance_wh);
                if self.state() != BalanceState::Low {
                    self.low_announced = false;
                }
                Ok(Applied::Balance { balance_wh, acked })
            }
            Command::Relay(r) => {
                self.balance.remote_off = r.relay == Relay::Off;
                if r.relay == Relay::On {
                    // The operator switching the relay on is how a power lockout is cleared.
                    self.limiter.clear();
                }
                Ok(Applied::Relay(self.relay()))
            }
            Command::Config(c) => {
                let before = (self.settings, self.config.low_balance_wh);
                if let Some(low) = c.low_balance_wh {
                    self.config.low_balance_wh = low;
                }
                let s = &mut self.settings;
                let p = &mut s.power;
                s.publish_interval_ms = c.publish_interval_ms.or(s.publish_interval_ms);
                p.cap_w = c.power_cap_w.unwrap_or(p.cap_w);
                p.trip_after_s = c.power_trip_after_s.unwrap_or(p.trip_after_s);
                p.reclose_after_s = c.power_reclose_after_s.unwrap_or(p.reclose_after_s);
                p.max_trips = c.power_max_trips.unwrap_or(p.max_trips);
                p.in_friendly_hours = c.power_cap_in_friendly_hours.unwrap_or(p.in_friendly_hours);
                s.daily_allowance_wh = c.daily_allowance_wh.unwrap_or(s.daily_allowance_wh);
                s.utc_offset_min = c.utc_offset_min.unwrap_or(s.utc_offset_min);
                if self.settings.power != before.0.power {
                    // New limits start a new count; the same limits re-sent (every reconnect)
                    // leave a lockout in place.
                    self.limiter.clear();
                }
                if self.settings.utc_offset_min != before.0.utc_offset_min {
                    self.allowance.day = None;
                    self.allowance.advance(
                        self.clock_ms,
                        self.settings.utc_offset_min,
                        self.register.wh(),
                    );
                }
                let changed = (self.settings, self.config.low_balance_wh) != before;
                Ok(Applied::Config { changed })
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

    /// Off when: switched off for maintenance, the power limiter holds it off, today's
    /// allowance is used up, or the balance is unknown or exhausted while the meter may cut.
    pub fn relay(&self) -> Relay {
        let wh = self.register.wh();
        let credit = match self.balance.balance_wh(wh) {
            None => false,
            Some(b) => b > 0 || !self.may_cut,
        };
        if credit
            && !self.balance.remote_off
            && !self.limiter.holds_off()
            && !self.allowance_exhausted()
        {
            Relay::On
        } else {
            Relay::Off
        }
    }

    /// Today's allowance is used up (relay off until local midnight).
    pub fn allowance_exhausted(&self) -> bool {
        self.allowance
            .exhausted(self.settings.daily_allowance_wh, self.register.wh())
    }

    /// Wh used since local midnight (since the meter first knew the time, before that).
    pub fn used_today_wh(&self) -> u64 {
        self.allowance.used_wh(self.register.wh())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn limiter(&self) -> &PowerLimiter {
        &self.limiter
    }

    /// The interval the gateway asked for, if any; the board falls back to its own.
    pub fn publish_interval_ms(&self) -> Option<u32> {
        self.settings.publish_interval_ms
    }

    /// Unix ms as the meter knows it (from the gateway's balance commands).
    pub fn clock_ms(&self) -> Option<u64> {
        self.clock_ms
    }

    pub fn may_cut(&self) -> bool {
        self.may_cut
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

    /// A balance command with a gateway clock and `mayCut`.
    fn balance_at(balance_wh: i64, ledger_seq: i64, ts: u64, may_cut: bool) -> std::string::String {
        std::format!(
            r#"{{"balance":0,"timestamp":{ts},"balanceWh":{balance_wh},"ledgerSeq":{ledger_seq},"relay":"on","mayCut":{may_cut}}}"#
        )
    }

    /// 2025-11-27 20:00 UTC = 23:00 in Nairobi.
    const T_23H: u64 = 1_764_273_600_000;
    /// 2.3 kW at 230 V.
    const AMPS_10: u32 = 10_000;

    #[test]
    fn without_may_cut_the_meter_keeps_supplying_below_zero() {
        let mut m = M::new(MeterConfig::default());
        m.on_command("balance", balance_at(-500, 1, T_23H, false).as_bytes())
            .unwrap();
        assert_eq!(m.state(), BalanceState::Exhausted);
        assert_eq!(m.relay(), Relay::On, "friendly hours: no cut for credit");
        m.on_command("balance", balance_at(-500, 2, T_23H, true).as_bytes())
            .unwrap();
        assert_eq!(m.relay(), Relay::Off, "friendly hours over");
        m.on_command("relay", br#"{"relay":"off"}"#).unwrap();
        m.on_command("balance", balance_at(-500, 3, T_23H, false).as_bytes())
            .unwrap();
        assert_eq!(m.relay(), Relay::Off, "maintenance off still wins");
    }

    #[test]
    fn the_power_cap_applies_in_friendly_hours_unless_the_config_says_not() {
        for (in_friendly, trips) in [(true, true), (false, false)] {
            let mut m = M::new(MeterConfig::default());
            m.on_command(
                "config",
                std::format!(
                    r#"{{"powerCapW":1000,"powerTripAfterS":5,"powerCapInFriendlyHours":{in_friendly}}}"#
                )
                .as_bytes(),
            )
            .unwrap();
            m.on_command("balance", balance_at(-10, 1, T_23H, false).as_bytes())
                .unwrap();
            for _ in 0..5 {
                m.measure(AMPS_10, 1000);
            }
            assert_eq!(
                m.take_trip().is_some(),
                trips,
                "in_friendly_hours {in_friendly}"
            );
            if !in_friendly {
                // Outside friendly hours the cap always applies.
                m.on_command("balance", balance_at(50_000, 2, T_23H, true).as_bytes())
                    .unwrap();
                for _ in 0..5 {
                    m.measure(AMPS_10, 1000);
                }
                assert!(
                    m.take_trip().is_some(),
                    "cap applies when the meter may cut"
                );
            }
        }
    }

    #[test]
    fn an_identical_config_keeps_a_lockout_and_relay_on_or_new_limits_clear_it() {
        let cfg =
            br#"{"powerCapW":1000,"powerTripAfterS":1,"powerRecloseAfterS":5,"powerMaxTrips":1}"#;
        let mut m = M::new(MeterConfig::default());
        m.on_command("balance", balance_at(50_000, 1, T_23H, true).as_bytes())
            .unwrap();
        assert_eq!(
            m.on_command("config", cfg),
            Ok(Applied::Config { changed: true })
        );
        m.measure(AMPS_10, 1000);
        assert!(m.take_trip().unwrap().locked_out);
        assert_eq!(
            m.on_command("config", cfg),
            Ok(Applied::Config { changed: false })
        );
        assert_eq!(
            m.relay(),
            Relay::Off,
            "the same config re-sent on reconnect"
        );
        m.on_command("relay", br#"{"relay":"on"}"#).unwrap();
        assert_eq!(m.relay(), Relay::On, "the operator cleared it");
        m.measure(AMPS_10, 1000);
        assert!(m.take_trip().unwrap().locked_out);
        m.on_command("config", br#"{"powerCapW":3000}"#).unwrap();
        assert_eq!(m.relay(), Relay::On, "new limits start afresh");
    }

    #[test]
    fn a_refused_config_changes_nothing_at_all() {
        let mut m = M::new(MeterConfig::default());
        let before = *m.settings();
        let e = m
            .on_command(
                "config",
                br#"{"publishIntervalMs":30000,"powerCapW":2000,"powerMaxTrips":0}"#,
            )
            .unwrap_err();
        assert_eq!(
            e,
            MeterCommandError::Parse(CommandError::ConfigRefused {
                field: "powerMaxTrips",
                range: "1..=10"
            })
        );
        assert_eq!(*m.settings(), before);
        assert_eq!(m.publish_interval_ms(), None);
        let mut buf = [0u8; 160];
        let n = crate::limits::encode_error_status("METER001", e, &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"meterNo":"METER001","status":"error","message":"config refused: powerMaxTrips must be 1..=10"}"#
        );
    }

    #[test]
    fn the_daily_allowance_cuts_until_local_midnight() {
        let mut m = M::new(MeterConfig::default());
        m.on_command("config", br#"{"dailyAllowanceWh":1000,"utcOffsetMin":180}"#)
            .unwrap();
        // 23:00 local, plenty of credit.
        m.on_command("balance", balance_at(1_000_000, 1, T_23H, true).as_bytes())
            .unwrap();
        // 2.3 kW for 26 minutes: 996 Wh, still on.
        for _ in 0..26 {
            m.measure(AMPS_10, 60_000);
        }
        assert_eq!((m.used_today_wh(), m.relay()), (996, Relay::On));
        m.measure(AMPS_10, 60_000);
        assert!(m.allowance_exhausted());
        assert_eq!(m.relay(), Relay::Off, "1035 Wh used today");
        // Off, nothing flows, until midnight local (33 minutes later).
        for _ in 0..32 {
            m.measure(0, 60_000);
        }
        assert_eq!(m.relay(), Relay::Off, "23:59");
        m.measure(0, 60_000);
        assert_eq!(
            (m.used_today_wh(), m.relay()),
            (0, Relay::On),
            "00:00 local"
        );
        // The gateway's next command carries the time and changes nothing about the day.
        m.on_command(
            "balance",
            balance_at(1_000_000, 2, T_23H + 3_600_000, true).as_bytes(),
        )
        .unwrap();
        assert_eq!(m.relay(), Relay::On);
    }
}
