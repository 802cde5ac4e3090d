//! Pricing one consumption interval, exactly.
//!
//! **Energy spread rule.** A report of `wh` Wh over `(start, end]` is spread uniformly: by time
//! `t` the meter had used `floor(wh × (t − start) / (end − start))` Wh (all of it at `end` when
//! `start == end`). So Wh number `j` (1-based) is used at `t_j = start + ceil(j × (end − start) / wh)`
//! and is priced by the band, time-of-use window, dated rates and month of the local hour
//! holding `t_j − 1 ms` (an hour owns its end instant, not its start). Every Wh lands in exactly
//! one piece, so pieces always sum to the report.
//!
//! **Fine unit.** Amounts are exact integers in [`FINE_PER_CENT`] units: a price per kWh has
//! four decimals of KES, a multiplier three decimals and a percentage two, so
//! `Wh × price × multiplier × percent` is always a whole number of 10⁻¹² cent. Nothing is
//! rounded while pricing; [`crate::tariff::account`] turns fine units into cents and keeps the
//! remainder.

use super::calendar::{MonthKey, SiteZone, MS_PER_DAY};
use super::{Tariff, ENERGY};
use crate::ledger::MAX_REPORT_DELTA_WH;

/// 10⁻¹² cent: every product of the tariff's decimals is a whole number of these.
pub const FINE_PER_CENT: i128 = 1_000_000_000_000;
/// A price unit (10⁻⁴ KES per kWh = 10⁻⁵ cent per Wh) in fine units per Wh.
const FINE_PER_PRICE_WH: i128 = 10_000_000;
/// The longest interval one report may cover; the pricing walks it hour by hour.
pub const MAX_INTERVAL_MS: i64 = 400 * MS_PER_DAY;

/// A consumption report: `wh` Wh used between `start_ms` and `end_ms` (UTC milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start_ms: i64,
    pub end_ms: i64,
    pub wh: i64,
}

/// Wh used in a local calendar month so far (the band counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthUsage {
    pub month: MonthKey,
    pub wh: i64,
}

impl MonthUsage {
    /// The counter as it stands in the month of `month` (0 in a month not yet seen).
    pub fn in_month(self, month: MonthKey) -> MonthUsage {
        if self.month == month {
            self
        } else {
            MonthUsage { month, wh: 0 }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("negative energy ({wh} Wh)")]
    NegativeEnergy { wh: i64 },
    #[error("{wh} Wh in one report is more than the ledger accepts ({MAX_REPORT_DELTA_WH})")]
    TooMuchEnergy { wh: i64 },
    #[error("interval ends before it starts ({start_ms} > {end_ms})")]
    Backwards { start_ms: i64, end_ms: i64 },
    #[error("interval of {ms} ms is longer than {MAX_INTERVAL_MS} ms")]
    TooLong { ms: i64 },
}

/// Energy of one band in one time-of-use period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnergyLine {
    pub band: usize,
    /// Index into `tariff.tou`; `None` without time of use.
    pub tou: Option<usize>,
    pub wh: i64,
    pub fine: i128,
}

/// A pass-through charge (index into `tariff.charges`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeLine {
    pub charge: usize,
    pub wh: i64,
    pub fine: i128,
}

/// A tax (index into `tariff.taxes`) and the sum of the components it is a percentage of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaxLine {
    pub tax: usize,
    pub base_fine: i128,
    pub fine: i128,
}

/// An interval's price, itemised; `total_fine` is the sum of every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub energy: Vec<EnergyLine>,
    pub charges: Vec<ChargeLine>,
    pub taxes: Vec<TaxLine>,
    pub total_fine: i128,
    /// The band counter after this interval (in the month of its last Wh).
    pub month_after: MonthUsage,
}

/// Prices `iv` for a meter whose band counter stood at `month_before`.
pub fn price_interval(
    tariff: &Tariff,
    zone: SiteZone,
    iv: Interval,
    month_before: MonthUsage,
) -> Result<Priced, PriceError> {
    if iv.wh < 0 {
        return Err(PriceError::NegativeEnergy { wh: iv.wh });
    }
    if iv.wh > MAX_REPORT_DELTA_WH {
        return Err(PriceError::TooMuchEnergy { wh: iv.wh });
    }
    if iv.end_ms < iv.start_ms {
        return Err(PriceError::Backwards {
            start_ms: iv.start_ms,
            end_ms: iv.end_ms,
        });
    }
    // Saturating: a garbage time must become an error, not an overflow.
    let span = iv.end_ms.saturating_sub(iv.start_ms);
    if !(0..=MAX_INTERVAL_MS).contains(&span) {
        return Err(PriceError::TooLong { ms: span });
    }
    let mut acc = Accumulator::new(tariff, month_before);
    if iv.wh == 0 {
        return Ok(acc.finish());
    }
    if span == 0 {
        acc.add_piece(zone, iv.end_ms.saturating_sub(1), iv.wh);
        return Ok(acc.finish());
    }
    let used_by = |t: i64| -> i64 {
        (i128::from(iv.wh) * i128::from(t - iv.start_ms) / i128::from(span)) as i64
    };
    // Pieces (a, b] never cross a local hour boundary, so one hour's facts price each.
    let mut a = iv.start_ms;
    while a < iv.end_ms {
        let b = zone.next_hour_start(a).min(iv.end_ms);
        let wh = used_by(b) - used_by(a);
        if wh > 0 {
            acc.add_piece(zone, a, wh);
        }
        a = b;
    }
    Ok(acc.finish())
}

/// The price of the next Wh at `at_ms` for a meter at `month` (taxes included), in fine units:
/// what the meter's balance in units is computed with.
pub fn marginal_fine_per_wh(
    tariff: &Tariff,
    zone: SiteZone,
    at_ms: i64,
    month: MonthUsage,
) -> i128 {
    let mut acc = Accumulator::new(tariff, month);
    acc.add_piece(zone, at_ms, 1);
    acc.finish().total_fine
}

struct Accumulator<'t> {
    tariff: &'t Tariff,
    usage: MonthUsage,
    energy: Vec<EnergyLine>,
    charges: Vec<ChargeLine>,
}

impl<'t> Accumulator<'t> {
    fn new(tariff: &'t Tariff, usage: MonthUsage) -> Self {
        let charges = (0..tariff.charges.len())
            .map(|charge| ChargeLine {
                charge,
                wh: 0,
                fine: 0,
            })
            .collect();
        Accumulator {
            tariff,
            usage,
            energy: Vec::new(),
            charges,
        }
    }

    /// `wh` Wh used within the local hour holding `at_ms`, split at band edges.
    fn add_piece(&mut self, zone: SiteZone, at_ms: i64, wh: i64) {
        let t = self.tariff;
        self.usage = self.usage.in_month(zone.month(at_ms));
        let weekend = zone.weekday(at_ms).is_weekend();
        let tou = t.tou_at(weekend, zone.hour(at_ms));
        let multiplier = tou.map_or(1000, |i| i128::from(t.tou[i].multiplier.0));
        let date = zone.date(at_ms);
        for (line, c) in self.charges.iter_mut().zip(&t.charges) {
            line.wh += wh;
            line.fine += i128::from(wh) * i128::from(c.rate_on(date).0) * FINE_PER_PRICE_WH;
        }
        let mut left = wh;
        while left > 0 {
            let (band, band_end) = t.band_at(self.usage.wh);
            let take = band_end.map_or(left, |end| left.min(end - self.usage.wh));
            // × multiplier / 1000: FINE_PER_PRICE_WH / 1000 keeps it whole.
            let fine = i128::from(take)
                * i128::from(t.bands[band].price.0)
                * multiplier
                * (FINE_PER_PRICE_WH / 1000);
            match self
                .energy
                .iter_mut()
                .find(|l| l.band == band && l.tou == tou)
            {
                Some(l) => {
                    l.wh += take;
                    l.fine += fine;
                }
                None => self.energy.push(EnergyLine {
                    band,
                    tou,
                    wh: take,
                    fine,
                }),
            }
            self.usage.wh += take;
            left -= take;
        }
    }

    fn finish(self) -> Priced {
        let t = self.tariff;
        let energy_fine: i128 = self.energy.iter().map(|l| l.fine).sum();
        let taxes: Vec<TaxLine> = t
            .taxes
            .iter()
            .enumerate()
            .map(|(tax, x)| {
                let base_fine: i128 =
                    x.on.iter()
                        .map(|name| {
                            if name == ENERGY {
                                energy_fine
                            } else {
                                t.charges
                                    .iter()
                                    .position(|c| &c.name == name)
                                    .map_or(0, |i| self.charges[i].fine)
                            }
                        })
                        .sum();
                // Every component is a multiple of 10⁴ fine units, so this division is exact.
                debug_assert_eq!(base_fine * i128::from(x.percent.0) % 10_000, 0);
                TaxLine {
                    tax,
                    base_fine,
                    fine: base_fine * i128::from(x.percent.0) / 10_000,
                }
            })
            .collect();
        let total_fine = energy_fine
            + self.charges.iter().map(|l| l.fine).sum::<i128>()
            + taxes.iter().map(|l| l.fine).sum::<i128>();
        let mut energy = self.energy;
        energy.sort_by_key(|l| (l.band, l.tou));
        Priced {
            energy,
            charges: self.charges,
            taxes,
            total_fine,
            month_after: self.usage,
        }
    }
}
