//! Tariffs (issue 16): the pricing engine of the money ledger, as pure functions.
//!
//! - [`Tariff`]: the operator's spec (serde), checked by [`Tariff::validate`].
//! - [`calendar`]: the site zone (a fixed UTC offset) and local dates, hours and months.
//! - [`price`]: a consumption interval → itemised amounts in [`price::FINE_PER_CENT`] units,
//!   split exactly at band, hour (time-of-use, dated charge) and month edges.
//! - [`account`]: a meter's money account: balance, debt buckets, sub-cent carry, payments
//!   with debt recovery, standing charges, emergency credit, friendly hours, units to display.
//!
//! Architecture invariant: no I/O and no clock reads here (time is an argument); money is
//! integers. The design, the rounding rule and a worked example are in `docs/tariffs.md`.
//! Not wired into the writer or the config yet.

pub mod account;
pub mod calendar;
pub mod price;

use calendar::LocalDate;
use std::collections::HashSet;
use std::fmt;

/// A non-negative-checked decimal with `SCALE` decimals, held as an integer: `Decimal<2>` of
/// KES is cents, `Decimal<4>` of KES/kWh is 1/100 cent per kWh. TOML may give a string
/// (`"12.14"`, exact) or a number (rounded to `SCALE` decimals; more decimals are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Decimal<const SCALE: u32>(pub i64);

/// The largest integer a [`Decimal`] holds (10⁷ KES per kWh at four decimals): far beyond any
/// real price, and it keeps `Wh × price × multiplier × percent` well inside `i128`.
pub const MAX_DECIMAL: i64 = 100_000_000_000;

/// KES with cents.
pub type Kes = Decimal<2>;
/// KES per kWh with four decimals.
pub type PerKwh = Decimal<4>;
/// A percentage with two decimals: the integer is basis points.
pub type Percent = Decimal<2>;
/// A multiplier with three decimals: the integer is per mille.
pub type Multiplier = Decimal<3>;

impl<const SCALE: u32> Decimal<SCALE> {
    pub fn parse(s: &str) -> Option<Self> {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !all_digits(int) || !all_digits(frac) || frac.len() > SCALE as usize {
            return None;
        }
        let mut v: i64 = int.parse().ok()?;
        for i in 0..SCALE as usize {
            let d = frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
            v = v.checked_mul(10)?.checked_add(d)?;
        }
        if v > MAX_DECIMAL {
            return None;
        }
        Some(Decimal(if neg { -v } else { v }))
    }
}

impl<const SCALE: u32> fmt::Display for Decimal<SCALE> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = 10i64.pow(SCALE);
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:0w$}",
            a / p as u64,
            a % p as u64,
            w = SCALE as usize
        )
    }
}

impl<'de, const SCALE: u32> serde::Deserialize<'de> for Decimal<SCALE> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const S: u32>;
        impl<const S: u32> serde::de::Visitor<'_> for V<S> {
            type Value = Decimal<S>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a decimal number with at most {S} decimals")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Decimal<S>, E> {
                Decimal::parse(s).ok_or_else(|| {
                    E::custom(format!(
                        "{s:?} is not a decimal number with at most {S} decimals"
                    ))
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal<S>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal<S>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal<S>, E> {
                // Shortest representation that round-trips, then the exact decimal parser.
                self.visit_str(&format!("{v}"))
            }
        }
        d.deserialize_any(V::<SCALE>)
    }
}

/// One tariff: what a meter's energy and time cost. See `docs/tariffs.md` for the TOML form.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tariff {
    pub name: String,
    /// A version of the tariff `name` in force from 00:00 local time of this date until the
    /// next version's (absent: from the beginning). Set in `[[tariffs]]`; the engine ignores it.
    #[serde(default)]
    pub effective_from: Option<LocalDate>,
    /// Energy price by kWh consumed in the local calendar month; one open band is a flat price.
    pub bands: Vec<Band>,
    /// Time-of-use multipliers of the band price; empty means 1 at all times.
    #[serde(default)]
    pub tou: Vec<TouWindow>,
    /// Per-kWh pass-through charges from dated tables (fuel energy, forex, inflation, levies).
    #[serde(default)]
    pub charges: Vec<Charge>,
    /// Percentages of named components ("energy" or a charge's name), itemised.
    #[serde(default)]
    pub taxes: Vec<Tax>,
    #[serde(default)]
    pub standing_charge: Option<StandingCharge>,
    #[serde(default)]
    pub minimum_topup: Kes,
    /// How far below zero a tenant may go after asking for it; 0 means not offered.
    #[serde(default)]
    pub emergency_credit: Kes,
    #[serde(default)]
    pub friendly: FriendlyHours,
    /// Share of each payment that repays debt; absent means all debt is repaid first.
    #[serde(default)]
    pub debt_recovery_percent: Option<Percent>,
    /// Emergency credit granted without a request the first time the credit runs out, once
    /// until the next payment.
    #[serde(default)]
    pub emergency_auto: bool,
    /// What the meters on this tariff enforce (`command/config`); absent: the site's `[limits]`.
    /// Same keys and ranges as `[limits]` (parsed by `config.rs`, which owns them).
    #[serde(default, deserialize_with = "crate::config::tariff_limits")]
    pub limits: Option<crate::config::MeterLimits>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub from_kwh: u32,
    /// Exclusive upper edge; absent on the last (open) band.
    #[serde(default)]
    pub to_kwh: Option<u32>,
    pub price: PerKwh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Days {
    All,
    Weekdays,
    Weekends,
}

impl Days {
    fn covers(self, weekend: bool) -> bool {
        match self {
            Days::All => true,
            Days::Weekdays => !weekend,
            Days::Weekends => weekend,
        }
    }
}

/// Local hours `from_hour` (inclusive) to `to_hour` (exclusive, 24 = midnight); a window with
/// `from_hour > to_hour` wraps past midnight (its early hours belong to the next day's class).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HourWindow {
    pub days: Days,
    pub from_hour: u8,
    pub to_hour: u8,
}

impl HourWindow {
    /// Whether the local hour `hour` of a day of class `weekend` lies in this window.
    pub fn contains(&self, weekend: bool, hour: u8) -> bool {
        let in_hours = if self.from_hour <= self.to_hour {
            (self.from_hour..self.to_hour).contains(&hour)
        } else {
            hour >= self.from_hour || hour < self.to_hour
        };
        in_hours && self.days.covers(weekend)
    }

    fn check(&self, field: &str, errors: &mut Vec<TariffError>) {
        if self.from_hour > 23 {
            errors.push(TariffError::new(
                format!("{field}.from_hour"),
                "must be 0 to 23",
            ));
        }
        if self.to_hour > 24 {
            errors.push(TariffError::new(
                format!("{field}.to_hour"),
                "must be 0 to 24",
            ));
        }
        if self.from_hour == self.to_hour {
            // Empty or the whole day? Ask for the explicit form.
            errors.push(TariffError::new(
                field.to_owned(),
                "from_hour equals to_hour (for the whole day use 0 to 24)",
            ));
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouWindow {
    /// The period's name in itemised records ("peak", "off-peak").
    pub name: String,
    // The hours are spelt out rather than a flattened `HourWindow`: serde's flatten buffers
    // the values and loses the spans that config errors will point at.
    pub days: Days,
    pub from_hour: u8,
    pub to_hour: u8,
    pub multiplier: Multiplier,
}

impl TouWindow {
    pub fn hours(&self) -> HourWindow {
        HourWindow {
            days: self.days,
            from_hour: self.from_hour,
            to_hour: self.to_hour,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    pub name: String,
    /// In force from 00:00 local time of `from` until the next entry; nothing before the first.
    pub rates: Vec<DatedRate>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatedRate {
    pub from: LocalDate,
    pub price: PerKwh,
}

impl Charge {
    /// The rate in force on local date `date` (0 before the first entry).
    pub fn rate_on(&self, date: LocalDate) -> PerKwh {
        self.rates
            .iter()
            .rev()
            .find(|r| r.from <= date)
            .map_or(Decimal(0), |r| r.price)
    }
}

/// The base-energy component's name for [`Tax::on`].
pub const ENERGY: &str = "energy";

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tax {
    pub name: String,
    pub percent: Percent,
    /// Components it is a percentage of: [`ENERGY`] and/or charge names. Taxes never apply to
    /// other taxes.
    pub on: Vec<String>,
}

/// A gross amount (taxes included) due at 00:00 local time every `every_days` days.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandingCharge {
    pub amount: Kes,
    #[serde(default = "one")]
    pub every_days: u32,
}

fn one() -> u32 {
    1
}

/// Times in which the relay is never cut for lack of credit.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FriendlyHours {
    #[serde(default)]
    pub windows: Vec<HourWindow>,
    /// Whole local days (public holidays).
    #[serde(default)]
    pub holidays: Vec<LocalDate>,
}

/// One thing wrong with a tariff, naming the field (`bands[1].from_kwh`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TariffError {
    pub field: String,
    pub message: String,
}

impl TariffError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> TariffError {
        TariffError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Local hours of a day class as text for error messages ("weekday 03:00").
fn cell(weekend: bool, hour: u8) -> String {
    format!(
        "{} {hour:02}:00",
        if weekend { "weekend" } else { "weekday" }
    )
}

impl Tariff {
    /// One open band at `price`, nothing else: the implicit tariff of a site without
    /// `[[tariffs]]` (its price is `1 / [ledger] units_per_kes`).
    pub fn flat(name: &str, price: PerKwh) -> Tariff {
        Tariff {
            name: name.to_owned(),
            effective_from: None,
            bands: vec![Band {
                from_kwh: 0,
                to_kwh: None,
                price,
            }],
            tou: Vec::new(),
            charges: Vec::new(),
            taxes: Vec::new(),
            standing_charge: None,
            minimum_topup: Decimal(0),
            emergency_credit: Decimal(0),
            friendly: FriendlyHours::default(),
            debt_recovery_percent: None,
            emergency_auto: false,
            limits: None,
        }
    }

    /// Every problem at once, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<TariffError>> {
        let mut e = Vec::new();
        if self.name.trim().is_empty() {
            e.push(TariffError::new("name", "must not be empty"));
        }
        self.check_bands(&mut e);
        self.check_tou(&mut e);
        let mut names: HashSet<&str> = HashSet::new();
        for (i, c) in self.charges.iter().enumerate() {
            let f = format!("charges[{i}]");
            if c.name.trim().is_empty() || c.name == ENERGY {
                e.push(TariffError::new(
                    format!("{f}.name"),
                    format!("must be a non-empty name other than {ENERGY:?}"),
                ));
            } else if !names.insert(&c.name) {
                e.push(TariffError::new(
                    format!("{f}.name"),
                    format!("{:?} repeats", c.name),
                ));
            }
            if c.rates.is_empty() {
                e.push(TariffError::new(
                    format!("{f}.rates"),
                    "needs at least one dated rate",
                ));
            }
            for (j, r) in c.rates.iter().enumerate() {
                if r.price.0 < 0 {
                    e.push(TariffError::new(
                        format!("{f}.rates[{j}].price"),
                        "is negative",
                    ));
                }
                if j > 0 && r.from <= c.rates[j - 1].from {
                    e.push(TariffError::new(
                        format!("{f}.rates[{j}].from"),
                        format!(
                            "{} is not after the previous rate's {}",
                            r.from,
                            c.rates[j - 1].from
                        ),
                    ));
                }
            }
        }
        let mut tax_names: HashSet<&str> = HashSet::new();
        for (i, t) in self.taxes.iter().enumerate() {
            let f = format!("taxes[{i}]");
            if t.name.trim().is_empty() || !tax_names.insert(&t.name) {
                e.push(TariffError::new(
                    format!("{f}.name"),
                    "must be a non-empty, unique name",
                ));
            }
            if !(0..=10_000).contains(&t.percent.0) {
                e.push(TariffError::new(format!("{f}.percent"), "must be 0 to 100"));
            }
            if t.on.is_empty() {
                e.push(TariffError::new(format!("{f}.on"), "names no component"));
            }
            for (j, c) in t.on.iter().enumerate() {
                if c != ENERGY && !names.contains(c.as_str()) {
                    e.push(TariffError::new(
                        format!("{f}.on[{j}]"),
                        format!("{c:?} is neither {ENERGY:?} nor a charge of this tariff"),
                    ));
                } else if t.on[..j].contains(c) {
                    e.push(TariffError::new(
                        format!("{f}.on[{j}]"),
                        format!("{c:?} repeats"),
                    ));
                }
            }
        }
        if let Some(s) = &self.standing_charge {
            if s.amount.0 < 0 {
                e.push(TariffError::new("standing_charge.amount", "is negative"));
            }
            if !(1..=366).contains(&s.every_days) {
                e.push(TariffError::new(
                    "standing_charge.every_days",
                    "must be 1 to 366",
                ));
            }
        }
        if self.minimum_topup.0 < 0 {
            e.push(TariffError::new("minimum_topup", "is negative"));
        }
        if self.emergency_credit.0 < 0 {
            e.push(TariffError::new("emergency_credit", "is negative"));
        }
        for (i, w) in self.friendly.windows.iter().enumerate() {
            w.check(&format!("friendly.windows[{i}]"), &mut e);
        }
        if let Some(p) = self.debt_recovery_percent {
            if !(1..=10_000).contains(&p.0) {
                e.push(TariffError::new(
                    "debt_recovery_percent",
                    "must be above 0 and at most 100 (leave it out to repay debt first in full)",
                ));
            }
        }
        if e.is_empty() {
            Ok(())
        } else {
            Err(e)
        }
    }

    fn check_bands(&self, e: &mut Vec<TariffError>) {
        if self.bands.is_empty() {
            e.push(TariffError::new(
                "bands",
                "needs at least one band (one open band is a flat price)",
            ));
            return;
        }
        let last = self.bands.len() - 1;
        let mut expected_from = 0u32;
        for (i, b) in self.bands.iter().enumerate() {
            let f = format!("bands[{i}]");
            if b.price.0 < 0 {
                e.push(TariffError::new(format!("{f}.price"), "is negative"));
            }
            if b.from_kwh < expected_from {
                e.push(TariffError::new(
                    format!("{f}.from_kwh"),
                    format!(
                        "{} overlaps the previous band, which ends at {expected_from}",
                        b.from_kwh
                    ),
                ));
            } else if b.from_kwh > expected_from {
                let what = if i == 0 {
                    "the first band must start at 0".to_owned()
                } else {
                    format!("leaves a gap: the previous band ends at {expected_from}")
                };
                e.push(TariffError::new(
                    format!("{f}.from_kwh"),
                    format!("{}: {what}", b.from_kwh),
                ));
            }
            match b.to_kwh {
                Some(to) if i == last => {
                    e.push(TariffError::new(
                        format!("{f}.to_kwh"),
                        format!(
                            "{to}: the last band must be open (no to_kwh) so every kWh has a price"
                        ),
                    ));
                }
                Some(to) if to <= b.from_kwh => {
                    e.push(TariffError::new(
                        format!("{f}.to_kwh"),
                        format!("{to} is not above from_kwh {}", b.from_kwh),
                    ));
                }
                Some(to) => expected_from = to,
                None if i != last => {
                    e.push(TariffError::new(
                        format!("{f}.to_kwh"),
                        "is missing: only the last band is open",
                    ));
                    return;
                }
                None => {}
            }
        }
    }

    fn check_tou(&self, e: &mut Vec<TariffError>) {
        if self.tou.is_empty() {
            return;
        }
        for (i, w) in self.tou.iter().enumerate() {
            let f = format!("tou[{i}]");
            w.hours().check(&f, e);
            if w.multiplier.0 < 0 {
                e.push(TariffError::new(format!("{f}.multiplier"), "is negative"));
            }
        }
        if e.iter().any(|x| x.field.starts_with("tou[")) {
            return;
        }
        // Every (weekday/weekend, hour) cell must be covered exactly once.
        let mut gaps = Vec::new();
        for weekend in [false, true] {
            for hour in 0..24u8 {
                let hits: Vec<usize> = (0..self.tou.len())
                    .filter(|&i| self.tou[i].hours().contains(weekend, hour))
                    .collect();
                match hits.as_slice() {
                    [] => gaps.push(cell(weekend, hour)),
                    [_] => {}
                    [a, b, ..] => e.push(TariffError::new(
                        format!("tou[{b}]"),
                        format!("overlaps tou[{a}] at {}", cell(weekend, hour)),
                    )),
                }
            }
        }
        if !gaps.is_empty() {
            e.push(TariffError::new(
                "tou",
                format!(
                    "windows do not cover the day: no window for {}",
                    gaps.join(", ")
                ),
            ));
        }
    }

    /// The time-of-use window in force at a local hour, if the tariff has time of use.
    pub fn tou_at(&self, weekend: bool, hour: u8) -> Option<usize> {
        self.tou
            .iter()
            .position(|w| w.hours().contains(weekend, hour))
    }

    /// The band holding the kWh after `month_wh` Wh of this month, and the Wh where it ends.
    pub fn band_at(&self, month_wh: i64) -> (usize, Option<i64>) {
        let i = self
            .bands
            .iter()
            .position(|b| b.to_kwh.is_none_or(|to| month_wh < i64::from(to) * 1000))
            .unwrap_or(self.bands.len() - 1);
        (i, self.bands[i].to_kwh.map(|to| i64::from(to) * 1000))
    }

    /// Whether the amount may be offered as a top-up (checked before money is taken, for
    /// example in M-Pesa validation; money already received is always credited).
    pub fn accepts_topup(&self, cents: i64) -> bool {
        cents >= self.minimum_topup.0
    }
}

#[cfg(test)]
mod tests;
