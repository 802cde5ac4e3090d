//! The prepaid ledger rules (contract §5) as pure functions on one meter's account.
//!
//! Architecture invariant: this module does no I/O. [`crate::store`] loads an [`Account`],
//! these rules change it, and the store writes it back in the same transaction as the events.

use crate::payload::{Relay, Report};
use crate::tariff::account::{ConsumptionApplied, MoneyAccount};
use crate::tariff::calendar::SiteZone;
use crate::tariff::price::{Interval, MAX_INTERVAL_MS};
use crate::tariff::Tariff;

/// A single report that claims more than this much energy since the last one is refused
/// rather than draining a balance: 1 MWh is months of a household's use.
pub const MAX_REPORT_DELTA_WH: i64 = 1_000_000;
/// `remainingBalance` from v1 firmware is never trusted, but a difference this large from the
/// gateway's balance is logged and counted (usually a meter that missed a balance command).
pub const V1_BALANCE_DRIFT_WH: i64 = 1_000;

/// The ledger-relevant state of one meter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    pub balance_wh: i64,
    /// Increases with every change of the balance, so meters can drop stale commands.
    pub ledger_seq: i64,
    /// v2: the last applied report's `seq` and `energyWh`; `None` until the baseline report.
    pub v2_seq: Option<u32>,
    pub v2_energy_wh: Option<i64>,
    /// v1: the last `totalConsumed`, rounded to Wh; a new meter starts at 0 (boot).
    pub v1_total_wh: i64,
    pub total_consumed_wh: i64,
    /// The money account (issue 16). `None` for an account from before the money ledger
    /// (schema 3) until the writer first touches it: [`Account::ensure_money`] converts its
    /// `balance_wh` at the meter's tariff then. With it, `balance_wh` is derived: the credit in
    /// Wh at the marginal price when the account last changed, negative for debt.
    pub money: Option<MoneyAccount>,
}

/// The tariff and clock a priced step runs under.
#[derive(Debug, Clone, Copy)]
pub struct PriceAt<'a> {
    pub tariff: &'a Tariff,
    pub zone: SiteZone,
    pub at_ms: i64,
}

/// Energy shown when the price is 0 (a free tariff): plenty, and far from overflowing.
const FREE_ENERGY_WH: i64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub low_balance_wh: i64,
}

/// What one report did to the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportApplied {
    pub debit_wh: i64,
    pub kind: ReportKind,
    pub alerts: Vec<Alert>,
    /// v1 only: `remainingBalance` differs from the ledger by more than [`V1_BALANCE_DRIFT_WH`].
    pub balance_drift_wh: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Consumption since the last report was debited (possibly 0 Wh).
    Debited,
    /// v2: first report of this meter; it sets the baseline and debits nothing.
    Baseline,
    /// v2: a `seq` not newer than the last applied one; nothing changes.
    Stale,
    /// v1: the same `totalConsumed` again (a retained or repeated message); nothing changes.
    Repeat,
    /// v1: `totalConsumed` fell, so the meter rebooted; the new total is the debit.
    Reboot,
    /// v2: the register went backwards (flash replaced or reset); rebased without a debit.
    RegisterReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    /// The balance crossed `low_balance_units` downward.
    LowBalance,
    /// The balance reached zero: the relay is now commanded off.
    Exhausted,
}

impl Alert {
    pub fn as_str(self) -> &'static str {
        match self {
            Alert::LowBalance => "low_balance",
            Alert::Exhausted => "balance_exhausted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    #[error("report claims {delta_wh} Wh since the last one (limit {MAX_REPORT_DELTA_WH})")]
    ImplausibleDelta { delta_wh: i64 },
    #[error("report cannot be priced: {0}")]
    Price(#[from] crate::tariff::price::PriceError),
}

/// The credit a money account shows as Wh at `p`: units at the marginal price (rounded down),
/// or, with no credit, the debt as negative Wh (rounded away from zero), so a flat-rate site
/// sees the same numbers as with the unit ledger.
pub fn units_shown(m: &MoneyAccount, p: PriceAt<'_>) -> i64 {
    let credit = m.credit_cents(p.tariff);
    if credit > 0 {
        return m
            .units_wh(p.tariff, p.zone, p.at_ms)
            .unwrap_or(FREE_ENERGY_WH);
    }
    let debt = m.debt.total();
    if debt == 0 {
        return 0;
    }
    let marginal = crate::tariff::price::marginal_fine_per_wh(p.tariff, p.zone, p.at_ms, m.month);
    if marginal <= 0 {
        return 0;
    }
    let fine = i128::from(debt) * crate::tariff::price::FINE_PER_CENT;
    -(((fine + marginal - 1) / marginal).min(i128::from(FREE_ENERGY_WH)) as i64)
}

impl Account {
    pub fn relay(&self) -> Relay {
        Relay::for_balance(self.balance_wh)
    }

    /// Puts an account from before the money ledger on it: its Wh balance (credit, or debt
    /// when negative) becomes cents at the tariff's marginal price at `p`, rounded so that
    /// the meter is shown the same Wh (a flat-rate site's balances keep their value).
    pub fn ensure_money(&mut self, p: PriceAt<'_>) -> &mut MoneyAccount {
        let wh = self.balance_wh;
        self.money.get_or_insert_with(|| {
            // The first standing charge is for the day the account joins the money ledger.
            let mut m = MoneyAccount::new(p.zone, p.at_ms);
            let marginal =
                crate::tariff::price::marginal_fine_per_wh(p.tariff, p.zone, p.at_ms, m.month);
            let fpc = crate::tariff::price::FINE_PER_CENT;
            let cents = |wh: i64| -> i64 {
                // ceil(wh × marginal / cent): floor(cents / marginal) is then wh again.
                ((i128::from(wh) * marginal + fpc - 1) / fpc).min(i128::from(i64::MAX / 4)) as i64
            };
            if wh > 0 {
                m.balance_cents = cents(wh);
            } else if wh < 0 {
                let owed = i128::from(wh).abs() * marginal / fpc;
                m.debt.arrears = owed.min(i128::from(i64::MAX / 4)) as i64;
            }
            m
        })
    }

    /// Applies a consumption report priced by the money ledger at `p` (the report's arrival):
    /// the energy since the last report is spread over the time since it ([`Interval`]).
    /// Standing charges due by then are charged first. A refused report leaves the account
    /// untouched.
    pub fn apply_report_priced(
        &mut self,
        report: &Report,
        rules: &Rules,
        p: PriceAt<'_>,
    ) -> Result<
        (
            ReportApplied,
            Option<ConsumptionApplied>,
            crate::tariff::account::StandingApplied,
        ),
        ReportRefused,
    > {
        let saved = self.clone();
        let (debit_wh, kind, drift) = self.register(report)?;
        if matches!(kind, ReportKind::Stale | ReportKind::Repeat) {
            return Ok((
                ReportApplied {
                    debit_wh,
                    kind,
                    alerts: Vec::new(),
                    balance_drift_wh: drift,
                },
                None,
                Default::default(),
            ));
        }
        let before = self.balance_wh;
        let m = self.ensure_money(p);
        let standing = m.accrue_standing(p.tariff, p.at_ms);
        let start = m
            .last_report_ms
            .clamp(p.at_ms.saturating_sub(MAX_INTERVAL_MS), p.at_ms);
        m.last_report_ms = p.at_ms;
        let priced = if debit_wh > 0 {
            let iv = Interval {
                start_ms: start,
                end_ms: p.at_ms,
                wh: debit_wh,
            };
            match m.apply_consumption(p.tariff, p.zone, iv) {
                Ok(c) => Some(c),
                Err(e) => {
                    *self = saved;
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let shown = units_shown(m, p);
        self.balance_wh = shown;
        self.total_consumed_wh += debit_wh;
        if debit_wh > 0 || standing.cents > 0 {
            self.ledger_seq += 1;
        }
        let mut alerts = Vec::new();
        if before > rules.low_balance_wh && shown <= rules.low_balance_wh && debit_wh > 0 {
            alerts.push(Alert::LowBalance);
        }
        if before > 0 && shown <= 0 && debit_wh > 0 {
            alerts.push(Alert::Exhausted);
        }
        Ok((
            ReportApplied {
                debit_wh,
                kind,
                alerts,
                balance_drift_wh: drift,
            },
            priced,
            standing,
        ))
    }

    /// A payment on the money ledger: debt recovery first ([`MoneyAccount::apply_payment`]),
    /// after any standing charge due (returned, so the payment's event itemises it).
    pub fn credit_priced(
        &mut self,
        cents: i64,
        p: PriceAt<'_>,
    ) -> (
        crate::tariff::account::PaymentApplied,
        crate::tariff::account::StandingApplied,
    ) {
        let m = self.ensure_money(p);
        let standing = m.accrue_standing(p.tariff, p.at_ms);
        let applied = m.apply_payment(p.tariff, cents);
        self.balance_wh = units_shown(m, p);
        self.ledger_seq += 1;
        (applied, standing)
    }

    /// Applies a consumption report. A refused report leaves the account untouched.
    pub fn apply_report(
        &mut self,
        report: &Report,
        rules: &Rules,
    ) -> Result<ReportApplied, ReportRefused> {
        let (debit_wh, kind, drift) = self.register(report)?;
        let alerts = self.debit(debit_wh, rules);
        Ok(ReportApplied {
            debit_wh,
            kind,
            alerts,
            balance_drift_wh: drift,
        })
    }

    /// The register rules: how much energy a report adds, what kind of report it is, and the
    /// v1 balance drift. Moves the registers; a refused report moves nothing.
    fn register(
        &mut self,
        report: &Report,
    ) -> Result<(i64, ReportKind, Option<i64>), ReportRefused> {
        Ok(match report {
            Report::V2(r) => {
                let energy = r.energy_wh as i64;
                match (self.v2_seq, self.v2_energy_wh) {
                    (Some(last_seq), Some(_)) if r.seq <= last_seq => (0, ReportKind::Stale, None),
                    (Some(_), Some(last_energy)) if energy < last_energy => {
                        self.v2_seq = Some(r.seq);
                        self.v2_energy_wh = Some(energy);
                        (0, ReportKind::RegisterReset, None)
                    }
                    (Some(_), Some(last_energy)) => {
                        let delta = energy - last_energy;
                        if delta > MAX_REPORT_DELTA_WH {
                            return Err(ReportRefused::ImplausibleDelta { delta_wh: delta });
                        }
                        self.v2_seq = Some(r.seq);
                        self.v2_energy_wh = Some(energy);
                        (delta, ReportKind::Debited, None)
                    }
                    _ => {
                        self.v2_seq = Some(r.seq);
                        self.v2_energy_wh = Some(energy);
                        (0, ReportKind::Baseline, None)
                    }
                }
            }
            Report::V1 {
                total_consumed_units,
                remaining_balance_units,
                ..
            } => {
                // Rounding goes through the cumulative value, so it never accumulates.
                let total = (total_consumed_units * 1000.0).round() as i64;
                let (debit, kind) = if total == self.v1_total_wh {
                    (0, ReportKind::Repeat)
                } else if total < self.v1_total_wh {
                    (total, ReportKind::Reboot)
                } else {
                    (total - self.v1_total_wh, ReportKind::Debited)
                };
                if debit > MAX_REPORT_DELTA_WH {
                    return Err(ReportRefused::ImplausibleDelta { delta_wh: debit });
                }
                self.v1_total_wh = total;
                let claimed = (remaining_balance_units * 1000.0).round() as i64;
                let after = self.balance_wh - debit;
                let drift = (claimed - after).abs();
                (debit, kind, (drift > V1_BALANCE_DRIFT_WH).then_some(drift))
            }
        })
    }

    fn debit(&mut self, wh: i64, rules: &Rules) -> Vec<Alert> {
        if wh == 0 {
            return Vec::new();
        }
        let before = self.balance_wh;
        self.balance_wh -= wh;
        self.total_consumed_wh += wh;
        self.ledger_seq += 1;
        let mut alerts = Vec::new();
        // A downward crossing can only happen again after a credit lifted the balance, so
        // each alert is raised once per crossing without a stored flag.
        if before > rules.low_balance_wh && self.balance_wh <= rules.low_balance_wh {
            alerts.push(Alert::LowBalance);
        }
        if before > 0 && self.balance_wh <= 0 {
            alerts.push(Alert::Exhausted);
        }
        alerts
    }

    /// Adds a payment's energy. Debt (a negative balance) is recovered first, by arithmetic.
    pub fn credit(&mut self, wh: i64) {
        self.balance_wh = self.balance_wh.saturating_add(wh);
        self.ledger_seq += 1;
    }
}

/// The longest payment reference kept, in bytes (an M-Pesa receipt is 10 characters).
pub const MAX_REFERENCE_BYTES: usize = 100;

/// A payment reference as the ledger keeps and compares it: surrounding whitespace removed
/// (`"QK1234 "` is `"QK1234"`), 1 to [`MAX_REFERENCE_BYTES`] bytes, no control characters.
/// `None` for anything else. Comparisons between references ignore ASCII case (M-Pesa receipts
/// are upper case; a person retyping one may not be) and the source they came from: a
/// reference credits at most once per site.
pub fn payment_reference(raw: &str) -> Option<&str> {
    let r = raw.trim();
    let ok = !r.is_empty() && r.len() <= MAX_REFERENCE_BYTES && !r.chars().any(char::is_control);
    ok.then_some(r)
}

/// What a reference seen before means for a new payment: the same payment again (same meter
/// and amount, from any source) or a conflict.
pub fn same_payment(first_meter: &str, first_cents: i64, meter: &str, cents: i64) -> bool {
    first_meter == meter && first_cents == cents
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::V2Report;

    const RULES: Rules = Rules {
        low_balance_wh: 3_000,
    };

    fn v1(total: f64) -> Report {
        Report::V1 {
            total_consumed_units: total,
            remaining_balance_units: 0.0,
            units_consumed: 0.0,
            timestamp: 0.0,
        }
    }

    fn v2(seq: u32, energy_wh: u64) -> Report {
        Report::V2(V2Report {
            seq,
            energy_wh,
            power_w: None,
            current_a: None,
            voltage_v: None,
            relay: None,
            timestamp: None,
        })
    }

    #[test]
    fn v1_debits_differences_and_ignores_repeats() {
        let mut a = Account {
            balance_wh: 5_000,
            ..Default::default()
        };
        assert_eq!(a.apply_report(&v1(0.04), &RULES).unwrap().debit_wh, 40);
        let again = a.apply_report(&v1(0.04), &RULES).unwrap();
        assert_eq!((again.debit_wh, again.kind), (0, ReportKind::Repeat));
        assert_eq!(a.apply_report(&v1(0.1), &RULES).unwrap().debit_wh, 60);
        let reboot = a.apply_report(&v1(0.03), &RULES).unwrap();
        assert_eq!((reboot.debit_wh, reboot.kind), (30, ReportKind::Reboot));
        assert_eq!(a.balance_wh, 5_000 - 130);
    }

    #[test]
    fn v1_rounding_never_accumulates() {
        let mut a = Account::default();
        let mut total = 0.0f64;
        for _ in 0..1000 {
            total += 0.0004; // 0.4 Wh per report: each rounds to 0 or 1 Wh
            a.apply_report(&v1(total), &RULES).unwrap();
        }
        assert_eq!(a.total_consumed_wh, (total * 1000.0).round() as i64);
        assert_eq!(a.total_consumed_wh, 400);
    }

    #[test]
    fn v2_first_report_is_baseline_and_stale_seq_debits_nothing() {
        let mut a = Account {
            balance_wh: 10_000,
            ..Default::default()
        };
        assert_eq!(
            a.apply_report(&v2(5, 900), &RULES).unwrap().kind,
            ReportKind::Baseline
        );
        assert_eq!(a.apply_report(&v2(6, 950), &RULES).unwrap().debit_wh, 50);
        let stale = a.apply_report(&v2(6, 990), &RULES).unwrap();
        assert_eq!((stale.debit_wh, stale.kind), (0, ReportKind::Stale));
        assert_eq!(
            a.apply_report(&v2(4, 2000), &RULES).unwrap().kind,
            ReportKind::Stale
        );
        assert_eq!(a.balance_wh, 9_950);
        assert_eq!(a.ledger_seq, 1);
    }

    #[test]
    fn implausible_jump_is_refused_and_changes_nothing() {
        let mut a = Account::default();
        a.apply_report(&v2(1, 0), &RULES).unwrap();
        let before = a.clone();
        assert!(a.apply_report(&v2(2, 5_000_000), &RULES).is_err());
        assert_eq!(a, before);
    }

    #[test]
    fn alerts_fire_once_per_downward_crossing() {
        let mut a = Account {
            balance_wh: 3_500,
            ..Default::default()
        };
        a.apply_report(&v2(1, 0), &RULES).unwrap();
        assert_eq!(
            a.apply_report(&v2(2, 600), &RULES).unwrap().alerts,
            [Alert::LowBalance]
        );
        assert!(a
            .apply_report(&v2(3, 700), &RULES)
            .unwrap()
            .alerts
            .is_empty());
        assert_eq!(
            a.apply_report(&v2(4, 3_600), &RULES).unwrap().alerts,
            [Alert::Exhausted]
        );
        assert_eq!(a.relay(), Relay::Off);
        a.credit(10_000);
        assert_eq!(a.balance_wh, 9_900);
        assert_eq!(a.relay(), Relay::On);
        assert_eq!(
            a.apply_report(&v2(5, 10_600), &RULES).unwrap().alerts,
            [Alert::LowBalance]
        );
    }

    fn flat(price: &str) -> crate::tariff::Tariff {
        crate::tariff::Tariff::flat("flat", crate::tariff::Decimal::parse(price).unwrap())
    }

    #[test]
    fn a_unit_ledger_balance_moves_onto_the_money_ledger_keeping_its_wh() {
        let zone = SiteZone::NAIROBI;
        for (price, wh) in [
            ("20", 4_960),
            ("20", -40),
            ("33.3333", 4_960),
            ("12.14", 1),
            ("25.2106", 123_457),
        ] {
            let t = flat(price);
            let p = PriceAt {
                tariff: &t,
                zone,
                at_ms: 1_772_470_000_000,
            };
            let mut a = Account {
                balance_wh: wh,
                ..Default::default()
            };
            let m = a.ensure_money(p).clone();
            assert_eq!(units_shown(&m, p), wh, "{wh} Wh at {price}");
        }
        // 4 960 Wh at 0.05 units/KES (20 KES/kWh) is exactly KES 99.20.
        let t = flat("20");
        let p = PriceAt {
            tariff: &t,
            zone,
            at_ms: 0,
        };
        let mut a = Account {
            balance_wh: 4_960,
            ..Default::default()
        };
        assert_eq!(a.ensure_money(p).balance_cents, 9_920);
    }

    #[test]
    fn payment_references_are_trimmed_and_bounded() {
        assert_eq!(payment_reference(" QK1234\t"), Some("QK1234"));
        assert_eq!(payment_reference("   "), None);
        assert_eq!(payment_reference("A\u{7}B"), None);
        assert_eq!(
            payment_reference(&"R".repeat(100)),
            Some("R".repeat(100).as_str())
        );
        assert_eq!(payment_reference(&"R".repeat(101)), None);
    }

    #[test]
    fn a_reference_seen_before_is_the_same_payment_only_with_the_same_meter_and_amount() {
        assert!(same_payment("METER001", 500, "METER001", 500));
        assert!(!same_payment("METER001", 500, "METER002", 500));
        assert!(!same_payment("METER001", 500, "METER001", 501));
    }
}
