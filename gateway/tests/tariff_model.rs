//! The money ledger's pricing and account rules against an independent model written from the
//! issue text (issue 16): random tariffs, random sequences of reports, payments, emergency
//! requests and clock times around month ends, time-of-use edges and dated rate changes.
//!
//! The model prices Wh by Wh (the report's energy spread uniformly, Wh `j` used at
//! `start + ceil(j × duration / wh)`), finds each Wh's local calendar facts with its own naive
//! calendar, keeps the exact running total of everything consumed and checks that the cents
//! debited are always its floor. Its account is a plain reading of the rules: balance first,
//! then emergency credit, then arrears; standing charges counted from the assignment day;
//! payments repay emergency credit, standing charges, arrears, in that order; with
//! `emergency_auto`, the report that uses up the credit arms the emergency credit, once until
//! the next payment.
//!
//! `tariff_month.rs` includes this file for its `Model` (a month at a mixed-tariff site through
//! the real binary).

use proptest::prelude::*;
use std::collections::HashMap;
use umeme_gateway::tariff::account::MoneyAccount;
use umeme_gateway::tariff::calendar::{LocalDate, SiteZone};
use umeme_gateway::tariff::price::{Interval, FINE_PER_CENT};
use umeme_gateway::tariff::{
    Band, Charge, DatedRate, Days, Decimal, FriendlyHours, HourWindow, StandingCharge, Tariff, Tax,
    TouWindow,
};

const H: i64 = 3_600_000;
const DAY: i64 = 24 * H;

// ---------------------------------------------------------------- the model's own calendar

/// Local facts of one local hour: (year, month, day), weekend, hour of day.
#[derive(Clone, Copy)]
struct HourFacts {
    date: (i32, u8, u8),
    weekend: bool,
    hour: u8,
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Counts days forward from 1970 year by year and month by month (slow, obviously right).
fn naive_date(mut days: i64) -> (i32, u8, u8) {
    assert!(days >= 0, "the model only handles dates after 1970");
    let mut y = 1970;
    loop {
        let len = if is_leap(y) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        y += 1;
    }
    let lens = [
        31,
        if is_leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut m = 0;
    while days >= lens[m] {
        days -= lens[m];
        m += 1;
    }
    (y as i32, m as u8 + 1, days as u8 + 1)
}

struct Calendar {
    offset_ms: i64,
    cache: HashMap<i64, HourFacts>,
}

impl Calendar {
    fn at(&mut self, utc_ms: i64) -> HourFacts {
        let local = utc_ms + self.offset_ms;
        let hour_index = local.div_euclid(H);
        *self.cache.entry(hour_index).or_insert_with(|| {
            let days = local.div_euclid(DAY);
            // 5 January 1970 was a Monday.
            let weekday = (days - 4).rem_euclid(7);
            HourFacts {
                date: naive_date(days),
                weekend: weekday >= 5,
                hour: (local.rem_euclid(DAY) / H) as u8,
            }
        })
    }

    fn local_day(&self, utc_ms: i64) -> i64 {
        (utc_ms + self.offset_ms).div_euclid(DAY)
    }
}

// ---------------------------------------------------------------- the model

fn in_window(w: &HourWindow, f: HourFacts) -> bool {
    let day_ok = match w.days {
        Days::All => true,
        Days::Weekdays => !f.weekend,
        Days::Weekends => f.weekend,
    };
    let hour_ok = if w.from_hour < w.to_hour {
        w.from_hour <= f.hour && f.hour < w.to_hour
    } else {
        f.hour >= w.from_hour || f.hour < w.to_hour
    };
    day_ok && hour_ok
}

pub struct Model {
    t: Tariff,
    cal: Calendar,
    month: (i32, u8),
    month_wh: i64,
    /// Exact total consumed, in 10⁻¹⁴ KES (= 10⁻¹² cent).
    consumed_exact: i128,
    pub debited_cents: i64,
    pub balance: i64,
    pub emergency: i64,
    pub standing_debt: i64,
    pub arrears: i64,
    armed: bool,
    /// `emergency_auto` granted the credit since the last payment.
    auto_used: bool,
    assigned_day: i64,
    standing_periods_charged: i64,
}

/// One Wh's price, split into energy (10⁻¹⁰ KES), each charge (10⁻¹⁰ KES).
fn wh_price(t: &Tariff, f: HourFacts, month_wh: i64) -> (i128, Vec<i128>) {
    let band = t
        .bands
        .iter()
        .find(|b| {
            i64::from(b.from_kwh) * 1000 <= month_wh
                && b.to_kwh.is_none_or(|to| month_wh < i64::from(to) * 1000)
        })
        .expect("bands cover every Wh");
    let multiplier = t
        .tou
        .iter()
        .find(|w| in_window(&w.hours(), f))
        .map_or(1000, |w| i128::from(w.multiplier.0));
    let energy = i128::from(band.price.0) * multiplier;
    let date = LocalDate {
        year: f.date.0,
        month: f.date.1,
        day: f.date.2,
    };
    let charges = t
        .charges
        .iter()
        .map(|c| {
            let mut rate = 0;
            for r in &c.rates {
                if r.from <= date {
                    rate = r.price.0;
                }
            }
            i128::from(rate) * 1000
        })
        .collect();
    (energy, charges)
}

/// 10⁻¹⁰ KES components → exact total in 10⁻¹⁴ KES, with taxes on their named components.
fn with_taxes(t: &Tariff, energy: i128, charges: &[i128]) -> i128 {
    let mut total = (energy + charges.iter().sum::<i128>()) * 10_000;
    for tax in &t.taxes {
        let mut base = 0;
        for name in &tax.on {
            base += if name == "energy" {
                energy
            } else {
                charges[t.charges.iter().position(|c| &c.name == name).unwrap()]
            };
        }
        total += base * i128::from(tax.percent.0);
    }
    total
}

impl Model {
    pub fn new(t: Tariff, offset_minutes: i32, assigned_ms: i64) -> Model {
        let mut cal = Calendar {
            offset_ms: i64::from(offset_minutes) * 60_000,
            cache: HashMap::new(),
        };
        let f = cal.at(assigned_ms);
        let assigned_day = cal.local_day(assigned_ms);
        Model {
            t,
            cal,
            month: (f.date.0, f.date.1),
            month_wh: 0,
            consumed_exact: 0,
            debited_cents: 0,
            balance: 0,
            emergency: 0,
            standing_debt: 0,
            arrears: 0,
            armed: false,
            auto_used: false,
            assigned_day,
            standing_periods_charged: 0,
        }
    }

    pub fn report(&mut self, start: i64, end: i64, wh: i64) -> i128 {
        let (mut energy, mut charges) = (0i128, vec![0i128; self.t.charges.len()]);
        let span = i128::from(end - start);
        for j in 1..=i128::from(wh) {
            let used_at = if span == 0 {
                end
            } else {
                start + ((j * span + i128::from(wh) - 1) / i128::from(wh)) as i64
            };
            let f = self.cal.at(used_at - 1);
            if (f.date.0, f.date.1) != self.month {
                self.month = (f.date.0, f.date.1);
                self.month_wh = 0;
            }
            let (e, c) = wh_price(&self.t, f, self.month_wh);
            energy += e;
            for (sum, x) in charges.iter_mut().zip(c) {
                *sum += x;
            }
            self.month_wh += 1;
        }
        let exact = with_taxes(&self.t, energy, &charges);
        self.consumed_exact += exact;
        let debit = (self.consumed_exact / FINE_PER_CENT) as i64 - self.debited_cents;
        self.debited_cents += debit;
        let from_balance = debit.min(self.balance);
        self.balance -= from_balance;
        let mut short = debit - from_balance;
        // "Automatically once": the report that uses up the credit, until the next payment.
        if debit > 0
            && self.balance == 0
            && self.t.emergency_auto
            && !self.auto_used
            && self.t.emergency_credit.0 > 0
            && !self.armed
        {
            self.armed = true;
            self.auto_used = true;
        }
        if self.armed {
            let room = (self.t.emergency_credit.0 - self.emergency).max(0);
            let e = short.min(room);
            self.emergency += e;
            short -= e;
        }
        self.arrears += short;
        exact
    }

    fn standing(&mut self, now: i64) {
        let Some(s) = &self.t.standing_charge else {
            return;
        };
        let day = self.cal.local_day(now);
        let due = (day - self.assigned_day).div_euclid(i64::from(s.every_days)) + 1;
        let cents = (due - self.standing_periods_charged) * s.amount.0;
        self.standing_periods_charged = due;
        let from_balance = cents.min(self.balance);
        self.balance -= from_balance;
        self.standing_debt += cents - from_balance;
    }

    pub fn pay(&mut self, cents: i64) {
        let mut budget = match self.t.debt_recovery_percent {
            None => cents,
            Some(p) => cents * p.0 / 10_000,
        };
        let mut recovered = 0;
        for debt in [
            &mut self.emergency,
            &mut self.standing_debt,
            &mut self.arrears,
        ] {
            let x = budget.min(*debt);
            *debt -= x;
            budget -= x;
            recovered += x;
        }
        self.balance += cents - recovered;
        if self.emergency == 0 {
            self.armed = false;
        }
        self.auto_used = false;
    }

    fn request_emergency(&mut self) {
        if self.t.emergency_credit.0 > 0 && !self.armed {
            self.armed = true;
        }
    }

    fn credit(&self) -> i64 {
        let room = if self.armed {
            (self.t.emergency_credit.0 - self.emergency).max(0)
        } else {
            0
        };
        self.balance + room
    }

    fn may_cut(&mut self, now: i64) -> bool {
        let f = self.cal.at(now);
        let date = LocalDate {
            year: f.date.0,
            month: f.date.1,
            day: f.date.2,
        };
        let friendly = self.t.friendly.holidays.contains(&date)
            || self.t.friendly.windows.iter().any(|w| in_window(w, f));
        !friendly && self.credit() == 0
    }

    fn units_wh(&mut self, now: i64) -> Option<i64> {
        let f = self.cal.at(now);
        let month_wh = if (f.date.0, f.date.1) == self.month {
            self.month_wh
        } else {
            0
        };
        let (e, c) = wh_price(&self.t, f, month_wh);
        let per_wh = with_taxes(&self.t, e, &c);
        (per_wh > 0).then(|| (i128::from(self.credit()) * FINE_PER_CENT / per_wh) as i64)
    }
}

// ---------------------------------------------------------------- random tariffs and sequences

fn window(days: Days, from_hour: u8, to_hour: u8) -> HourWindow {
    HourWindow {
        days,
        from_hour,
        to_hour,
    }
}

/// Two TOU windows per day class split at `a` < `b`, or one whole-day window when `a == b`.
fn tou_for(days: Days, a: u8, b: u8, m1: i64, m2: i64) -> Vec<TouWindow> {
    if a == b {
        return vec![TouWindow {
            name: "flat".into(),
            days,
            from_hour: 0,
            to_hour: 24,
            multiplier: Decimal(m1),
        }];
    }
    vec![
        TouWindow {
            name: "peak".into(),
            days,
            from_hour: a,
            to_hour: b,
            multiplier: Decimal(m1),
        },
        TouWindow {
            name: "off-peak".into(),
            days,
            from_hour: b,
            to_hour: a,
            multiplier: Decimal(m2),
        },
    ]
}

fn date_plus(anchor: LocalDate, days: i64) -> LocalDate {
    LocalDate::from_days(anchor.days() + days)
}

#[derive(Debug, Clone)]
struct Params {
    zone: &'static str,
    anchor: &'static str,
    edges: Vec<u32>,
    prices: Vec<i64>,
    tou: Option<(u8, u8, u8, u8, i64, i64)>,
    rates: Vec<(i64, i64)>,
    vat_bp: i64,
    rep_bp: i64,
    standing: Option<(i64, u32)>,
    emergency: i64,
    recovery: Option<i64>,
    friendly: Option<(u8, u8)>,
    start_offset_ms: i64,
    emergency_auto: bool,
}

fn params() -> impl Strategy<Value = Params> {
    (
        (
            prop::sample::select(vec!["Africa/Nairobi", "UTC", "UTC+05:30", "UTC-03:00"]),
            prop::sample::select(vec!["2026-01-30", "2026-02-27", "2026-12-30", "2028-02-28"]),
            prop::collection::vec(1u32..3, 0..3),
            prop::collection::vec(0i64..300_000, 3),
            prop::option::of((0u8..24, 0u8..24, 0u8..24, 0u8..24, 0i64..3_000, 0i64..3_000)),
            prop::collection::vec((-2i64..4, 0i64..80_000), 1..4),
        ),
        (
            0i64..2_500,
            0i64..1_000,
            prop::option::of((0i64..3_000, 1u32..4)),
            prop::sample::select(vec![0i64, 5_000, 10_000]),
            prop::option::of(1i64..=10_000),
            prop::option::of((0u8..24, 0u8..24)),
            0i64..2 * DAY,
            any::<bool>(),
        ),
    )
        .prop_map(|(a, b)| Params {
            zone: a.0,
            anchor: a.1,
            edges: a.2,
            prices: a.3,
            tou: a.4,
            rates: a.5,
            vat_bp: b.0,
            rep_bp: b.1,
            standing: b.2,
            emergency: b.3,
            recovery: b.4,
            friendly: b.5,
            start_offset_ms: b.6,
            emergency_auto: b.7,
        })
}

fn build(p: &Params) -> Tariff {
    let anchor = LocalDate::parse(p.anchor).unwrap();
    let mut bands = Vec::new();
    let mut from = 0;
    for (i, step) in p.edges.iter().enumerate() {
        bands.push(Band {
            from_kwh: from,
            to_kwh: Some(from + step),
            price: Decimal(p.prices[i]),
        });
        from += step;
    }
    bands.push(Band {
        from_kwh: from,
        to_kwh: None,
        price: Decimal(p.prices[p.edges.len()]),
    });
    let tou = match p.tou {
        None => Vec::new(),
        Some((a, b, c, d, m1, m2)) => {
            let mut w = tou_for(Days::Weekdays, a.min(b), a.max(b), m1, m2);
            w.extend(tou_for(Days::Weekends, c.min(d), c.max(d), m2, m1));
            w
        }
    };
    let mut rates: Vec<DatedRate> = Vec::new();
    for &(day, price) in &p.rates {
        let from = date_plus(anchor, day);
        if rates.last().is_none_or(|r| r.from < from) {
            rates.push(DatedRate {
                from,
                price: Decimal(price),
            });
        }
    }
    let t = Tariff {
        effective_from: None,
        name: "random".into(),
        bands,
        tou,
        charges: vec![
            Charge {
                name: "fuel_energy".into(),
                rates,
            },
            Charge {
                name: "epra_levy".into(),
                rates: vec![DatedRate {
                    from: date_plus(anchor, -400),
                    price: Decimal(800),
                }],
            },
        ],
        taxes: vec![
            Tax {
                name: "rep".into(),
                percent: Decimal(p.rep_bp),
                on: vec!["energy".into()],
            },
            Tax {
                name: "vat".into(),
                percent: Decimal(p.vat_bp),
                on: vec!["energy".into(), "fuel_energy".into()],
            },
        ],
        standing_charge: p.standing.map(|(amount, every_days)| StandingCharge {
            amount: Decimal(amount),
            every_days,
        }),
        minimum_topup: Decimal(0),
        emergency_credit: Decimal(p.emergency),
        friendly: FriendlyHours {
            windows: p
                .friendly
                .map(|(a, b)| window(Days::All, a, b))
                .into_iter()
                .filter(|w| w.from_hour != w.to_hour)
                .collect(),
            holidays: vec![date_plus(anchor, 1)],
        },
        debt_recovery_percent: p.recovery.map(Decimal),
        emergency_auto: p.emergency_auto,
        limits: None,
    };
    t.validate()
        .unwrap_or_else(|e| panic!("generated tariff invalid: {e:?}"));
    t
}

#[derive(Debug, Clone)]
enum Op {
    /// Consumption over the next `ms` (0 = an instant report), or up to the next local hour edge.
    Report {
        ms: i64,
        to_hour_edge: bool,
        wh: i64,
    },
    Pay {
        cents: i64,
    },
    Wait {
        ms: i64,
    },
    /// Wait until `before_ms` before the next local hour edge (so short reports straddle it).
    WaitNearHourEdge {
        before_ms: i64,
    },
    Emergency,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop_oneof![Just(0i64), 1i64..5, 1i64..H, H..6 * H, 6 * H..3 * DAY], any::<bool>(), 0i64..2_500)
            .prop_map(|(ms, to_hour_edge, wh)| Op::Report { ms, to_hour_edge, wh }),
        2 => (0i64..60_000).prop_map(|cents| Op::Pay { cents }),
        1 => (0i64..2 * DAY).prop_map(|ms| Op::Wait { ms }),
        1 => (0i64..4).prop_map(|before_ms| Op::WaitNearHourEdge { before_ms }),
        1 => Just(Op::Emergency),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_money_ledger_equals_a_wh_by_wh_model_of_the_tariff_to_the_cent(
        p in params(),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        let t = build(&p);
        let zone = SiteZone::parse(p.zone).unwrap();
        let anchor = LocalDate::parse(p.anchor).unwrap();
        let mut now = zone.midnight(anchor) + p.start_offset_ms;
        let mut acct = MoneyAccount::new(zone, now);
        let mut model = Model::new(t.clone(), zone.offset_minutes(), now);
        let mut exact_total = 0i128;
        for op in ops {
            match op {
                Op::Report { ms, to_hour_edge, wh } => {
                    let end = if to_hour_edge { zone.next_hour_start(now) } else { now + ms };
                    let r = acct.apply_consumption(&t, zone, Interval { start_ms: now, end_ms: end, wh }).unwrap();
                    let m = model.report(now, end, wh);
                    prop_assert_eq!(r.priced.total_fine, m, "report of {} Wh over {}..{}", wh, now, end);
                    prop_assert_eq!(r.priced.energy.iter().map(|l| l.wh).sum::<i64>(), wh);
                    exact_total += m;
                    now = end;
                }
                Op::Pay { cents } => {
                    acct.apply_payment(&t, cents);
                    model.pay(cents);
                }
                Op::Wait { ms } => now += ms,
                Op::WaitNearHourEdge { before_ms } => now = zone.next_hour_start(now) - before_ms,
                Op::Emergency => {
                    let _ = acct.request_emergency(&t);
                    model.request_emergency();
                }
            }
            acct.accrue_standing(&t, now);
            model.standing(now);
            prop_assert_eq!(acct.month.wh, model.month_wh);
            prop_assert_eq!(acct.balance_cents, model.balance);
            prop_assert_eq!(
                (acct.debt.emergency, acct.debt.standing, acct.debt.arrears),
                (model.emergency, model.standing_debt, model.arrears)
            );
            prop_assert_eq!(acct.emergency_armed, model.armed);
            prop_assert_eq!(acct.emergency_auto_used, model.auto_used);
            // No cent created or lost: debited cents + the carry are the exact total.
            prop_assert_eq!(i128::from(model.debited_cents) * FINE_PER_CENT + acct.carry_fine, exact_total);
            prop_assert_eq!(acct.may_cut(&t, zone, now), model.may_cut(now));
            prop_assert_eq!(acct.units_wh(&t, zone, now), model.units_wh(now));
        }
    }
}
