//! A meter's monthly statement (issue 16): opening balance, payments, energy by band and
//! time-of-use period, each charge and tax, standing charges, debt, closing balance, built
//! from the meter's events ([`crate::store::meter_ledger_events`]) and named by the tariff
//! versions that priced them. It adds up to the cent: opening + payments − debits = closing
//! (balance net of debt), and the exact lines = cents debited + sub-cent carry at the close −
//! carry at the opening. Events older than `[outbox] retention` are gone: a statement for
//! such a month derives its opening from its closing (and says so).

use serde::Serialize;

use crate::config::Tariff as Pricing;
use crate::consumption::{cents_kes, fine_kes};
use crate::store::LedgerEvent;
use crate::tariff::calendar::{LocalDate, SiteZone};
use crate::tariff::price::FINE_PER_CENT;
use crate::tariff::Kes;

/// A calendar month `YYYY-MM` in the site's zone, as UTC milliseconds `[from, to)`.
pub fn month_range(zone: SiteZone, month: &str) -> Option<(i64, i64)> {
    let first = LocalDate::parse(&format!("{month}-01"))?;
    let next = if first.month == 12 {
        LocalDate {
            year: first.year + 1,
            month: 1,
            day: 1,
        }
    } else {
        LocalDate {
            month: first.month + 1,
            ..first
        }
    };
    Some((zone.midnight(first), zone.midnight(next)))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Position {
    pub balance_cents: i64,
    pub debt_cents: i64,
    /// Sub-cent remainder owed (10⁻¹² cent), not yet debited.
    #[serde(skip)]
    pub carry_fine: i128,
}

impl Position {
    fn net(self) -> i64 {
        self.balance_cents - self.debt_cents
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentLine {
    pub at: i64,
    pub reference: String,
    pub amount_cents: i64,
    pub debt_recovered_cents: i64,
}

/// An exact amount of one line (energy of a band and period, a charge, a tax).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub tariff: String,
    pub name: String,
    pub wh: i64,
    #[serde(skip)]
    pub fine: i128,
    pub kes: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Statement {
    pub meter: String,
    pub month: String,
    pub opening: Position,
    /// The opening was derived from the closing (no earlier event is kept).
    pub opening_derived: bool,
    pub payments: Vec<PaymentLine>,
    pub payments_cents: i64,
    pub energy: Vec<Line>,
    pub charges: Vec<Line>,
    pub taxes: Vec<Line>,
    pub energy_wh: i64,
    /// The exact total of energy, charges and taxes, as KES text.
    pub consumption_kes: String,
    /// Whole cents debited for consumption (the rounding rule: the exact total plus the carry).
    pub consumption_debited_cents: i64,
    pub standing_cents: i64,
    pub emergency_requests: u32,
    pub closing: Position,
}

impl Statement {
    /// The identity every statement satisfies; `false` means events are missing or damaged.
    pub fn adds_up(&self) -> bool {
        let lines: i128 = self
            .energy
            .iter()
            .chain(&self.charges)
            .chain(&self.taxes)
            .map(|l| l.fine)
            .sum();
        self.opening.net() + self.payments_cents
            - self.consumption_debited_cents
            - self.standing_cents
            == self.closing.net()
            && lines
                == i128::from(self.consumption_debited_cents) * FINE_PER_CENT
                    + self.closing.carry_fine
                    - self.opening.carry_fine
    }
}

fn kes_cents(v: &serde_json::Value) -> Option<i64> {
    v.as_str().and_then(Kes::parse).map(|k| k.0)
}

/// Builds the statement of `[from, to)` from events fed in order by [`Builder::add`].
pub struct Builder<'a> {
    pricing: &'a Pricing,
    from: i64,
    created_in_month: bool,
    state: Option<Position>,
    opening: Option<Position>,
    s: Statement,
}

impl<'a> Builder<'a> {
    pub fn new(
        pricing: &'a Pricing,
        meter: &str,
        month: &str,
        from: i64,
        created_at: i64,
    ) -> Builder<'a> {
        Builder {
            pricing,
            from,
            created_in_month: created_at >= from,
            state: None,
            opening: None,
            s: Statement {
                meter: meter.to_owned(),
                month: month.to_owned(),
                ..Statement::default()
            },
        }
    }

    pub fn add(&mut self, kind: &str, at: i64, e: LedgerEvent) {
        if at < self.from {
            if let Some(p) = position_after(self.state, &e) {
                self.state = Some(p);
            }
            return;
        }
        if self.opening.is_none() {
            self.opening = Some(self.state.unwrap_or_default());
            if self.state.is_none() && !self.created_in_month {
                self.s.opening_derived = true;
            }
        }
        match (&e, kind) {
            (LedgerEvent::Consumption(c), _) => {
                if let Some(it) = &c.itemised {
                    self.consumption(at, it);
                }
            }
            (LedgerEvent::Json(d), "payment") => {
                let amount = d["amountCents"].as_i64().unwrap_or(0);
                let r = &d["debtRecoveredCents"];
                let recovered = ["emergency", "standing", "arrears"]
                    .iter()
                    .map(|k| r[*k].as_i64().unwrap_or(0))
                    .sum();
                self.s.payments_cents += amount;
                self.s.standing_cents += d["standingCents"].as_i64().unwrap_or(0);
                self.s.payments.push(PaymentLine {
                    at,
                    reference: d["reference"].as_str().unwrap_or("").to_owned(),
                    amount_cents: amount,
                    debt_recovered_cents: recovered,
                });
            }
            (LedgerEvent::Json(d), "meter") => match d["action"].as_str() {
                Some("standing_charge") => {
                    self.s.standing_cents += d["cents"].as_i64().unwrap_or(0)
                }
                Some("emergency_credit") => {
                    self.s.standing_cents += d["standingCents"].as_i64().unwrap_or(0);
                    self.s.emergency_requests += 1;
                }
                _ => {}
            },
            _ => {}
        }
        if let Some(p) = position_after(self.state, &e) {
            self.state = Some(p);
        }
    }

    fn consumption(&mut self, at: i64, it: &crate::consumption::Itemised) {
        let t = self.pricing.in_force(Some(&it.tariff), at);
        self.s.consumption_debited_cents += it.debit_cents;
        self.s.standing_cents += it.standing_cents;
        for e in &it.energy {
            let band = t.bands.get(e.band as usize).map_or_else(
                || format!("band {}", e.band),
                |b| match b.to_kwh {
                    Some(to) => format!("{}–{} kWh", b.from_kwh, to),
                    None => format!("above {} kWh", b.from_kwh),
                },
            );
            let name = match e.tou.and_then(|i| t.tou.get(i as usize)) {
                Some(w) => format!("energy {band}, {}", w.name),
                None => format!("energy {band}"),
            };
            self.s.energy_wh += e.wh;
            add_line(&mut self.s.energy, &it.tariff, name, e.wh, e.fine);
        }
        for (i, f) in it.charges.iter().enumerate() {
            let name = t
                .charges
                .get(i)
                .map_or_else(|| format!("charge {i}"), |c| c.name.clone());
            add_line(&mut self.s.charges, &it.tariff, name, 0, *f);
        }
        for (i, f) in it.taxes.iter().enumerate() {
            let name = t
                .taxes
                .get(i)
                .map_or_else(|| format!("tax {i}"), |c| c.name.clone());
            add_line(&mut self.s.taxes, &it.tariff, name, 0, *f);
        }
    }

    pub fn finish(mut self) -> Statement {
        let closing = self.state.unwrap_or_default();
        let lines: i128 = self
            .s
            .energy
            .iter()
            .chain(&self.s.charges)
            .chain(&self.s.taxes)
            .map(|l| l.fine)
            .sum();
        let opening = match self.opening {
            // Nothing happened this month.
            None => closing,
            Some(o) if !self.s.opening_derived => o,
            Some(_) => {
                let net = closing.net() - self.s.payments_cents
                    + self.s.consumption_debited_cents
                    + self.s.standing_cents;
                Position {
                    balance_cents: net.max(0),
                    debt_cents: (-net).max(0),
                    carry_fine: closing.carry_fine
                        + i128::from(self.s.consumption_debited_cents) * FINE_PER_CENT
                        - lines,
                }
            }
        };
        self.s.opening = opening;
        self.s.closing = closing;
        self.s.consumption_kes = fine_kes(lines);
        self.s
    }
}

fn add_line(lines: &mut Vec<Line>, tariff: &str, name: String, wh: i64, fine: i128) {
    match lines
        .iter_mut()
        .find(|l| l.tariff == tariff && l.name == name)
    {
        Some(l) => {
            l.wh += wh;
            l.fine += fine;
            l.kes = fine_kes(l.fine);
        }
        None => lines.push(Line {
            tariff: tariff.to_owned(),
            name,
            wh,
            fine,
            kes: fine_kes(fine),
        }),
    }
}

/// The money position an event leaves (`None`: the event says nothing of money).
fn position_after(before: Option<Position>, e: &LedgerEvent) -> Option<Position> {
    match e {
        LedgerEvent::Consumption(c) => c.account.money.as_ref().map(|m| Position {
            balance_cents: m.balance_cents,
            debt_cents: m.debt.total(),
            carry_fine: m.carry_fine,
        }),
        LedgerEvent::Json(d) => {
            let balance_cents = kes_cents(&d["balanceKes"])?;
            let debt_cents = kes_cents(&d["debtKes"])?;
            Some(Position {
                balance_cents,
                debt_cents,
                carry_fine: before.map_or(0, |b| b.carry_fine),
            })
        }
    }
}

impl std::fmt::Display for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pos = |p: Position| {
            format!(
                "{} KES (balance {}, debt {})",
                cents_kes(p.net()),
                cents_kes(p.balance_cents),
                cents_kes(p.debt_cents)
            )
        };
        writeln!(f, "statement:      {} {}", self.meter, self.month)?;
        writeln!(
            f,
            "opening:        {}{}",
            pos(self.opening),
            if self.opening_derived {
                " (derived: no earlier event is kept)"
            } else {
                ""
            }
        )?;
        writeln!(f, "payments:       {} KES", cents_kes(self.payments_cents))?;
        for p in &self.payments {
            writeln!(
                f,
                "  {}  {:>10} KES  debt recovered {:>8}  {}",
                crate::api::iso8601(p.at),
                cents_kes(p.amount_cents),
                cents_kes(p.debt_recovered_cents),
                p.reference
            )?;
        }
        writeln!(f, "energy:         {} Wh", self.energy_wh)?;
        for l in &self.energy {
            writeln!(f, "  {:<40} {:>9} Wh {:>14} KES", l.name, l.wh, l.kes)?;
        }
        for l in &self.charges {
            writeln!(f, "  {:<40} {:>12} {:>14} KES", l.name, "", l.kes)?;
        }
        for l in &self.taxes {
            writeln!(f, "  {:<40} {:>12} {:>14} KES", l.name, "", l.kes)?;
        }
        writeln!(
            f,
            "consumption:    {} KES exact, {} KES debited",
            self.consumption_kes,
            cents_kes(self.consumption_debited_cents)
        )?;
        writeln!(f, "standing:       {} KES", cents_kes(self.standing_cents))?;
        writeln!(f, "emergency:      {} request(s)", self.emergency_requests)?;
        writeln!(f, "closing:        {}", pos(self.closing))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    #[error("month must be YYYY-MM, got {0:?}")]
    BadMonth(String),
    #[error("unknown meter {0}")]
    UnknownMeter(crate::meter::MeterId),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The statement of `meter` for `month` (`YYYY-MM`, local time of the site).
pub fn build(
    conn: &rusqlite::Connection,
    pricing: &Pricing,
    meter: &crate::meter::MeterId,
    month: &str,
) -> Result<Statement, StatementError> {
    let (from, to) = month_range(pricing.zone, month)
        .filter(|_| month.len() == 7)
        .ok_or_else(|| StatementError::BadMonth(month.chars().take(20).collect()))?;
    let row = crate::store::meter(conn, meter)?
        .ok_or_else(|| StatementError::UnknownMeter(meter.clone()))?;
    let mut b = Builder::new(pricing, meter.as_str(), month, from, row.created_at);
    crate::store::meter_ledger_events(conn, meter, to, |kind, at, e| b.add(kind, at, e))?;
    Ok(b.finish())
}
