//! One meter's money account under a tariff: the pure steps the writer will call.
//!
//! The balance is never negative; what the balance cannot cover becomes debt in one of three
//! buckets, repaid from payments in this order: emergency credit (so the tenant gets the
//! option back), standing charges, then arrears (energy used without credit, e.g. in friendly
//! hours or between a cut command and the relay opening).
//!
//! **Rounding rule.** Consumption is priced exactly in fine units ([`FINE_PER_CENT`]); the
//! account keeps the sub-cent remainder (`carry_fine`, always `0 ≤ carry < 1 cent`) and debits
//! whole cents, so over any sequence of reports the cents debited equal the floor of the exact
//! total, and the remainder is debited as soon as it reaches a cent. Payments and standing
//! charges are whole cents; a percentage of a payment for debt recovery is rounded down (the
//! rest of that cent goes to the balance, so no cent is lost).

use super::calendar::SiteZone;
use super::price::{self, Interval, MonthUsage, PriceError, Priced, FINE_PER_CENT};
use super::Tariff;

/// Debt by cause, in cents (each ≥ 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Debt {
    pub emergency: i64,
    pub standing: i64,
    pub arrears: i64,
}

impl Debt {
    pub fn total(self) -> i64 {
        self.emergency + self.standing + self.arrears
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoneyAccount {
    pub balance_cents: i64,
    pub carry_fine: i128,
    pub debt: Debt,
    pub month: MonthUsage,
    /// Set by a tenant's request, cleared when the emergency debt is repaid.
    pub emergency_armed: bool,
    /// `emergency_auto` granted emergency credit since the last payment (it does so once).
    pub emergency_auto_used: bool,
    /// When the next standing charge falls due (a local midnight).
    pub standing_due_ms: i64,
    /// When the last report was priced: the start of the next report's interval (the writer
    /// keeps it; the pricing steps here take intervals as arguments).
    pub last_report_ms: i64,
}

/// What a report did: the itemised price and where the cents came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumptionApplied {
    pub priced: Priced,
    pub debit_cents: i64,
    pub from_balance: i64,
    pub to_emergency: i64,
    pub to_arrears: i64,
    /// This report used up the credit and `emergency_auto` granted emergency credit.
    pub auto_emergency: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandingApplied {
    pub periods: i64,
    pub cents: i64,
    pub from_balance: i64,
    pub to_debt: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentApplied {
    pub recovered: Debt,
    pub to_balance: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmergencyRefused {
    #[error("this tariff offers no emergency credit")]
    NotOffered,
    #[error("emergency credit is already in use; it is repaid from the next payment first")]
    AlreadyArmed,
}

impl MoneyAccount {
    /// A meter put on a tariff at `assigned_ms`: the first standing charge is due at once (for
    /// the day of assignment), then every `every_days` local midnights.
    pub fn new(zone: SiteZone, assigned_ms: i64) -> MoneyAccount {
        MoneyAccount {
            balance_cents: 0,
            carry_fine: 0,
            debt: Debt::default(),
            month: MonthUsage {
                month: zone.month(assigned_ms),
                wh: 0,
            },
            emergency_armed: false,
            emergency_auto_used: false,
            standing_due_ms: zone.midnight(zone.date(assigned_ms)),
            last_report_ms: assigned_ms,
        }
    }

    /// Emergency credit still available to use.
    pub fn emergency_headroom(&self, tariff: &Tariff) -> i64 {
        if self.emergency_armed {
            (tariff.emergency_credit.0 - self.debt.emergency).max(0)
        } else {
            0
        }
    }

    /// What the meter may still use: the balance plus unused emergency credit.
    pub fn credit_cents(&self, tariff: &Tariff) -> i64 {
        self.balance_cents + self.emergency_headroom(tariff)
    }

    pub fn apply_consumption(
        &mut self,
        tariff: &Tariff,
        zone: SiteZone,
        iv: Interval,
    ) -> Result<ConsumptionApplied, PriceError> {
        let priced = price::price_interval(tariff, zone, iv, self.month)?;
        let exact = priced.total_fine + self.carry_fine;
        let debit_cents = (exact / FINE_PER_CENT) as i64;
        self.carry_fine = exact % FINE_PER_CENT;
        self.month = priced.month_after;
        let from_balance = debit_cents.min(self.balance_cents);
        self.balance_cents -= from_balance;
        let short = debit_cents - from_balance;
        // The credit ran out with this report: an automatic grant, once until the next payment.
        let auto_emergency = debit_cents > 0
            && self.balance_cents == 0
            && tariff.emergency_auto
            && !self.emergency_auto_used
            && self.request_emergency(tariff).is_ok();
        if auto_emergency {
            self.emergency_auto_used = true;
        }
        let to_emergency = short.min(self.emergency_headroom(tariff));
        self.debt.emergency += to_emergency;
        self.debt.arrears += short - to_emergency;
        Ok(ConsumptionApplied {
            priced,
            debit_cents,
            from_balance,
            to_emergency,
            to_arrears: short - to_emergency,
            auto_emergency,
        })
    }

    /// Charges every standing-charge period that has started by `now_ms` (also while the meter
    /// is offline: the writer calls this on a timer as well as with each event).
    pub fn accrue_standing(&mut self, tariff: &Tariff, now_ms: i64) -> StandingApplied {
        let Some(s) = &tariff.standing_charge else {
            return StandingApplied::default();
        };
        if now_ms < self.standing_due_ms {
            return StandingApplied::default();
        }
        let period = i64::from(s.every_days) * super::calendar::MS_PER_DAY;
        let periods = now_ms.saturating_sub(self.standing_due_ms) / period + 1;
        self.standing_due_ms = self
            .standing_due_ms
            .saturating_add(periods.saturating_mul(period));
        // Saturating: a clock far in the future must not overflow (the debt is then absurd
        // but visible, rather than a panic).
        let cents = periods.saturating_mul(s.amount.0);
        let from_balance = cents.min(self.balance_cents);
        self.balance_cents -= from_balance;
        self.debt.standing += cents - from_balance;
        StandingApplied {
            periods,
            cents,
            from_balance,
            to_debt: cents - from_balance,
        }
    }

    /// Credits a payment: debt first (all of it, or `debt_recovery_percent` of the payment),
    /// emergency credit, then standing charges, then arrears; the rest to the balance. A
    /// payment that leaves no emergency debt ends the emergency credit (ask again to re-arm).
    /// `cents` was validated where the payment entered (positive, bounded).
    pub fn apply_payment(&mut self, tariff: &Tariff, cents: i64) -> PaymentApplied {
        debug_assert!(cents >= 0, "payments are validated where they enter");
        let cents = cents.max(0);
        let mut budget = match tariff.debt_recovery_percent {
            None => cents,
            Some(p) => (i128::from(cents) * i128::from(p.0) / 10_000) as i64,
        };
        let mut recovered = Debt::default();
        for (bucket, got) in [
            (&mut self.debt.emergency, &mut recovered.emergency),
            (&mut self.debt.standing, &mut recovered.standing),
            (&mut self.debt.arrears, &mut recovered.arrears),
        ] {
            let take = budget.min(*bucket);
            *bucket -= take;
            *got = take;
            budget -= take;
        }
        if self.debt.emergency == 0 {
            self.emergency_armed = false;
        }
        // Automatic emergency credit may be granted again after this payment.
        self.emergency_auto_used = false;
        let to_balance = cents - recovered.total();
        self.balance_cents += to_balance;
        PaymentApplied {
            recovered,
            to_balance,
        }
    }

    /// A tenant asks for emergency credit.
    pub fn request_emergency(&mut self, tariff: &Tariff) -> Result<(), EmergencyRefused> {
        if tariff.emergency_credit.0 == 0 {
            return Err(EmergencyRefused::NotOffered);
        }
        if self.emergency_armed {
            return Err(EmergencyRefused::AlreadyArmed);
        }
        self.emergency_armed = true;
        Ok(())
    }

    /// Whether the relay may be cut for lack of credit at `now_ms`: never in friendly hours or
    /// on a listed holiday; otherwise once balance and emergency credit are used up.
    pub fn may_cut(&self, tariff: &Tariff, zone: SiteZone, now_ms: i64) -> bool {
        !is_friendly(tariff, zone, now_ms) && self.credit_cents(tariff) == 0
    }

    /// The credit shown to the meter as Wh at the marginal price of the next Wh (rounded down,
    /// so the meter never believes in energy it cannot pay for). `None` when energy is free.
    pub fn units_wh(&self, tariff: &Tariff, zone: SiteZone, now_ms: i64) -> Option<i64> {
        let marginal = price::marginal_fine_per_wh(tariff, zone, now_ms, self.month);
        (marginal > 0)
            .then(|| (i128::from(self.credit_cents(tariff)) * FINE_PER_CENT / marginal) as i64)
    }
}

/// Whether `now_ms` lies in the tariff's friendly hours or on one of its holidays.
pub fn is_friendly(tariff: &Tariff, zone: SiteZone, now_ms: i64) -> bool {
    let f = &tariff.friendly;
    let weekend = zone.weekday(now_ms).is_weekend();
    let hour = zone.hour(now_ms);
    f.holidays.contains(&zone.date(now_ms)) || f.windows.iter().any(|w| w.contains(weekend, hour))
}
