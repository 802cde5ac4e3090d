use super::account::{is_friendly, Debt, MoneyAccount};
use super::calendar::{LocalDate, SiteZone, MS_PER_HOUR};
use super::price::{price_interval, Interval, MonthUsage, FINE_PER_CENT};
use super::*;

/// The worked example of `docs/tariffs.md`: KPLC domestic bands for 2025/26 with illustrative
/// pass-through rates (see the doc for sources and which tax applies to what).
const KPLC_LIKE: &str = r#"
name = "domestic"
bands = [
  { from_kwh = 0, to_kwh = 30, price = "12.14" },
  { from_kwh = 30, to_kwh = 100, price = "16.50" },
  { from_kwh = 100, price = "18.57" },
]
minimum_topup = "20.00"
emergency_credit = "100.00"
debt_recovery_percent = "25"
charges = [
  { name = "fuel_energy", rates = [{ from = "2026-01-01", price = "3.10" }] },
  { name = "forex", rates = [{ from = "2026-01-01", price = "0.85" }] },
  { name = "inflation", rates = [{ from = "2026-01-01", price = "0.46" }] },
  { name = "epra_levy", rates = [{ from = "2026-01-01", price = "0.08" }] },
  { name = "wra_levy", rates = [{ from = "2026-01-01", price = "0.05" }] },
]
taxes = [
  { name = "rep_levy", percent = "5", on = ["energy"] },
  { name = "vat", percent = "16", on = ["energy", "fuel_energy", "forex", "inflation"] },
]
"#;

fn tariff(toml_text: &str) -> Tariff {
    let t: Tariff = toml::from_str(toml_text).unwrap();
    t.validate().unwrap();
    t
}

fn kplc() -> Tariff {
    tariff(KPLC_LIKE)
}

fn at(date: &str, hour: i64) -> i64 {
    SiteZone::NAIROBI.midnight(LocalDate::parse(date).unwrap()) + hour * MS_PER_HOUR
}

fn month_of(date: &str) -> MonthUsage {
    MonthUsage {
        month: LocalDate::parse(date).unwrap().month_key(),
        wh: 0,
    }
}

/// Fine units → KES with five decimals, for readable assertions.
fn kes(fine: i128) -> String {
    let tenth_millicents = fine / (FINE_PER_CENT / 1000);
    format!(
        "{}.{:05}",
        tenth_millicents / 100_000,
        tenth_millicents % 100_000
    )
}

fn fields(t: &Tariff) -> Vec<String> {
    t.validate()
        .unwrap_err()
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn a_kes_500_top_up_on_the_kplc_like_tariff_buys_25_081_kwh_and_is_itemised_as_documented() {
    let t = kplc();
    let z = SiteZone::NAIROBI;
    let mut acct = MoneyAccount::new(z, at("2026-03-02", 8));
    let paid = acct.apply_payment(&t, 50_000);
    assert_eq!(paid.to_balance, 50_000);
    // Marginal price in the lifeline band: 19.935 KES/kWh, so 50 000 cents show as 25 081 Wh.
    assert_eq!(
        kes(price::marginal_fine_per_wh(&t, z, at("2026-03-02", 8), acct.month) * 1000),
        "19.93500"
    );
    assert_eq!(acct.units_wh(&t, z, at("2026-03-02", 8)), Some(25_081));

    let iv = Interval {
        start_ms: at("2026-03-02", 8),
        end_ms: at("2026-03-03", 8),
        wh: 25_000,
    };
    let r = acct.apply_consumption(&t, z, iv).unwrap();
    let p = &r.priced;
    assert_eq!(p.energy.len(), 1);
    assert_eq!(
        (p.energy[0].band, p.energy[0].wh, kes(p.energy[0].fine)),
        (0, 25_000, "303.50000".into())
    );
    let charges: Vec<String> = p.charges.iter().map(|l| kes(l.fine)).collect();
    assert_eq!(
        charges,
        ["77.50000", "21.25000", "11.50000", "2.00000", "1.25000"]
    );
    let taxes: Vec<(String, String)> = p
        .taxes
        .iter()
        .map(|l| (kes(l.base_fine), kes(l.fine)))
        .collect();
    assert_eq!(
        taxes,
        [
            ("303.50000".into(), "15.17500".into()),
            ("413.75000".into(), "66.20000".into())
        ]
    );
    assert_eq!(kes(p.total_fine), "498.37500");
    assert_eq!(
        r.debit_cents, 49_837,
        "the half cent stays with the account"
    );
    assert_eq!(acct.carry_fine, FINE_PER_CENT / 2);
    assert_eq!(acct.balance_cents, 163);

    // Ten more kWh cross the 30 kWh band edge: 5 kWh lifeline, 5 kWh ordinary-1.
    let iv = Interval {
        start_ms: at("2026-03-03", 8),
        end_ms: at("2026-03-04", 8),
        wh: 10_000,
    };
    let r = acct.apply_consumption(&t, z, iv).unwrap();
    let bands: Vec<(usize, i64, String)> = r
        .priced
        .energy
        .iter()
        .map(|l| (l.band, l.wh, kes(l.fine)))
        .collect();
    assert_eq!(
        bands,
        [(0, 5_000, "60.70000".into()), (1, 5_000, "82.50000".into())]
    );
    assert_eq!(kes(r.priced.taxes[0].fine), "7.16000");
    assert_eq!(kes(r.priced.taxes[1].fine), "29.96800");
    assert_eq!(kes(r.priced.total_fine), "225.72800");
    assert_eq!(r.debit_cents, 22_573, "225.728 KES + the 0.5 cent carried");
    assert_eq!(acct.carry_fine, FINE_PER_CENT * 3 / 10);
    assert_eq!((r.from_balance, r.to_arrears), (163, 22_410));
    assert_eq!(acct.month.wh, 35_000);

    // The next KES 500: 25 % repays the arrears, the rest is credit.
    let paid = acct.apply_payment(&t, 50_000);
    assert_eq!(
        paid.recovered,
        Debt {
            emergency: 0,
            standing: 0,
            arrears: 12_500
        }
    );
    assert_eq!(paid.to_balance, 37_500);
    assert_eq!(acct.debt.arrears, 9_910);
}

#[test]
fn tariff_spec_reads_decimals_exactly_and_refuses_unknown_keys() {
    let t = kplc();
    assert_eq!(t.bands[0].price, Decimal(121_400));
    assert_eq!(t.taxes[1].percent, Decimal(1_600));
    let from_floats: Tariff = toml::from_str(
        "name = \"f\"\nbands = [{ from_kwh = 0, price = 12.14 }]\nminimum_topup = 20",
    )
    .unwrap();
    assert_eq!(from_floats.bands[0].price, Decimal(121_400));
    assert_eq!(from_floats.minimum_topup, Decimal(2_000));
    let too_fine =
        toml::from_str::<Tariff>("name = \"f\"\nbands = [{ from_kwh = 0, price = \"1.23456\" }]");
    assert!(too_fine
        .unwrap_err()
        .to_string()
        .contains("at most 4 decimals"));
    let unknown = toml::from_str::<Tariff>("name = \"f\"\nbands = []\nvat = 16");
    assert!(unknown.unwrap_err().to_string().contains("unknown field"));
}

#[test]
fn validation_refuses_overlapping_bands_gaps_and_negative_prices_naming_the_field() {
    let t = tariff_unchecked(
        r#"name = "x"
        bands = [
          { from_kwh = 0, to_kwh = 30, price = "1" },
          { from_kwh = 20, to_kwh = 100, price = "-2" },
          { from_kwh = 120, to_kwh = 200, price = "3" },
        ]
        charges = [{ name = "fuel", rates = [{ from = "2026-02-01", price = "-1" }, { from = "2026-01-01", price = "1" }] }]
        taxes = [{ name = "vat", percent = "116", on = ["energy", "fuel", "forex"] }]
        "#,
    );
    let e = fields(&t);
    let expect = [
        "bands[1].from_kwh: 20 overlaps the previous band, which ends at 30",
        "bands[1].price: is negative",
        "bands[2].from_kwh: 120: leaves a gap: the previous band ends at 100",
        "bands[2].to_kwh: 200: the last band must be open (no to_kwh) so every kWh has a price",
        "charges[0].rates[0].price: is negative",
        "charges[0].rates[1].from: 2026-01-01 is not after the previous rate's 2026-02-01",
        "taxes[0].percent: must be 0 to 100",
        "taxes[0].on[2]: \"forex\" is neither \"energy\" nor a charge of this tariff",
    ];
    for x in expect {
        assert!(e.iter().any(|m| m == x), "missing {x:?} in {e:#?}");
    }
    assert_eq!(e.len(), expect.len(), "{e:#?}");
    let first = tariff_unchecked("name = \"x\"\nbands = [{ from_kwh = 5, price = \"1\" }]");
    assert_eq!(
        fields(&first),
        ["bands[0].from_kwh: 5: the first band must start at 0"]
    );
}

#[test]
fn validation_refuses_time_of_use_windows_that_overlap_or_do_not_cover_the_day() {
    let gap = tariff_unchecked(
        r#"name = "x"
        bands = [{ from_kwh = 0, price = "10" }]
        tou = [
          { name = "peak", days = "all", from_hour = 18, to_hour = 22, multiplier = "1.5" },
          { name = "night", days = "weekdays", from_hour = 22, to_hour = 18, multiplier = "0.8" },
          { name = "night", days = "weekends", from_hour = 23, to_hour = 18, multiplier = "0.8" },
        ]"#,
    );
    assert_eq!(
        fields(&gap),
        ["tou: windows do not cover the day: no window for weekend 22:00"]
    );
    let overlap = tariff_unchecked(
        r#"name = "x"
        bands = [{ from_kwh = 0, price = "10" }]
        tou = [
          { name = "day", days = "all", from_hour = 6, to_hour = 19, multiplier = "1" },
          { name = "evening", days = "all", from_hour = 18, to_hour = 6, multiplier = "-1" },
        ]"#,
    );
    assert_eq!(fields(&overlap), ["tou[1].multiplier: is negative"]);
    let overlap = tariff_unchecked(&overlap_text());
    assert_eq!(
        fields(&overlap),
        [
            "tou[1]: overlaps tou[0] at weekday 18:00",
            "tou[1]: overlaps tou[0] at weekend 18:00"
        ]
    );
}

fn overlap_text() -> String {
    r#"name = "x"
    bands = [{ from_kwh = 0, price = "10" }]
    tou = [
      { name = "day", days = "all", from_hour = 6, to_hour = 19, multiplier = "1" },
      { name = "evening", days = "all", from_hour = 18, to_hour = 6, multiplier = "1.2" },
    ]"#
    .to_owned()
}

fn tariff_unchecked(text: &str) -> Tariff {
    toml::from_str(text).unwrap()
}

fn tou_tariff() -> Tariff {
    tariff(
        r#"name = "tou"
        bands = [{ from_kwh = 0, to_kwh = 1, price = "10" }, { from_kwh = 1, price = "20" }]
        tou = [
          { name = "off-peak", days = "all", from_hour = 22, to_hour = 18, multiplier = "0.5" },
          { name = "peak", days = "all", from_hour = 18, to_hour = 22, multiplier = "1.5" },
        ]"#,
    )
}

#[test]
fn a_report_spanning_a_time_of_use_edge_is_split_in_proportion_to_time() {
    let t = tou_tariff();
    // 17:30 to 18:30, 600 Wh: 300 Wh off-peak at 10 × 0.5, 300 Wh peak at 10 × 1.5.
    let iv = Interval {
        start_ms: at("2026-03-02", 17) + MS_PER_HOUR / 2,
        end_ms: at("2026-03-02", 18) + MS_PER_HOUR / 2,
        wh: 600,
    };
    let p = price_interval(&t, SiteZone::NAIROBI, iv, month_of("2026-03-02")).unwrap();
    let lines: Vec<(Option<usize>, i64, String)> = p
        .energy
        .iter()
        .map(|l| (l.tou, l.wh, kes(l.fine)))
        .collect();
    assert_eq!(
        lines,
        [
            (Some(0), 300, "1.50000".into()),
            (Some(1), 300, "4.50000".into())
        ]
    );
}

#[test]
fn a_report_spanning_a_band_edge_and_a_time_of_use_edge_is_split_at_both() {
    let t = tou_tariff();
    // 17:00 to 19:00, 1600 Wh from 400 Wh into the month: the band edge (1 kWh) falls at
    // 600 Wh into the report, inside the first (off-peak) hour; the second hour is peak.
    let iv = Interval {
        start_ms: at("2026-03-02", 17),
        end_ms: at("2026-03-02", 19),
        wh: 1_600,
    };
    let before = MonthUsage {
        wh: 400,
        ..month_of("2026-03-02")
    };
    let p = price_interval(&t, SiteZone::NAIROBI, iv, before).unwrap();
    let lines: Vec<(usize, Option<usize>, i64)> =
        p.energy.iter().map(|l| (l.band, l.tou, l.wh)).collect();
    assert_eq!(
        lines,
        [(0, Some(0), 600), (1, Some(0), 200), (1, Some(1), 800)]
    );
    assert_eq!(p.month_after.wh, 2_000);
    // 600 × 10 × 0.5 + 200 × 20 × 0.5 + 800 × 20 × 1.5 Wh·KES/kWh = 3 + 2 + 24 KES.
    assert_eq!(kes(p.total_fine), "29.00000");
}

#[test]
fn the_band_counter_resets_at_local_midnight_on_the_first_of_the_month() {
    let t = kplc();
    // 28 Feb 23:00 to 1 Mar 01:00 Nairobi time (20:00–22:00 UTC on 28 Feb), 2 kWh, with 29.5
    // kWh already used in February: 0.5 kWh lifeline + 0.5 kWh ordinary-1 in February, then
    // 1 kWh lifeline in March.
    let iv = Interval {
        start_ms: at("2026-02-28", 23),
        end_ms: at("2026-03-01", 1),
        wh: 2_000,
    };
    let before = MonthUsage {
        wh: 29_500,
        ..month_of("2026-02-01")
    };
    let p = price_interval(&t, SiteZone::NAIROBI, iv, before).unwrap();
    let lines: Vec<(usize, i64)> = p.energy.iter().map(|l| (l.band, l.wh)).collect();
    assert_eq!(lines, [(0, 1_500), (1, 500)]);
    assert_eq!(
        p.month_after,
        MonthUsage {
            wh: 1_000,
            ..month_of("2026-03-01")
        }
    );
}

#[test]
fn a_dated_charge_changes_at_local_midnight_and_an_instant_report_belongs_to_the_hour_before() {
    let t = tariff(
        r#"name = "x"
        bands = [{ from_kwh = 0, price = "0" }]
        charges = [{ name = "fuel", rates = [{ from = "2026-01-01", price = "1" }, { from = "2026-03-01", price = "2" }] }]"#,
    );
    let z = SiteZone::NAIROBI;
    let midnight = at("2026-03-01", 0);
    let instant = |ms| {
        price_interval(
            &t,
            z,
            Interval {
                start_ms: ms,
                end_ms: ms,
                wh: 1_000,
            },
            month_of("2026-03-01"),
        )
        .unwrap()
    };
    assert_eq!(
        kes(instant(midnight).total_fine),
        "1.00000",
        "ends at midnight: February's rate"
    );
    assert_eq!(kes(instant(midnight + 1).total_fine), "2.00000");
    let across = price_interval(
        &t,
        z,
        Interval {
            start_ms: midnight - MS_PER_HOUR,
            end_ms: midnight + MS_PER_HOUR,
            wh: 1_000,
        },
        month_of("2026-02-01"),
    )
    .unwrap();
    assert_eq!(kes(across.total_fine), "1.50000");
}

#[test]
fn sub_cent_remainders_over_thousands_of_random_reports_neither_create_nor_lose_a_cent() {
    let t = tou_tariff();
    let z = SiteZone::NAIROBI;
    let mut acct = MoneyAccount::new(z, at("2026-03-01", 0));
    acct.apply_payment(&t, i64::MAX / 4);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % m) as i64
    };
    let (mut t0, mut exact, mut debited) = (at("2026-03-01", 0), 0i128, 0i64);
    for _ in 0..5_000 {
        let t1 = t0 + next(3 * MS_PER_HOUR as u64);
        let r = acct
            .apply_consumption(
                &t,
                z,
                Interval {
                    start_ms: t0,
                    end_ms: t1,
                    wh: next(997),
                },
            )
            .unwrap();
        exact += r.priced.total_fine;
        debited += r.debit_cents;
        assert_eq!(i128::from(debited), exact / FINE_PER_CENT);
        assert!((0..FINE_PER_CENT).contains(&acct.carry_fine));
        assert_eq!(i128::from(debited) * FINE_PER_CENT + acct.carry_fine, exact);
        t0 = t1;
    }
}

#[test]
fn standing_charges_accrue_while_offline_and_are_recovered_first_from_the_next_payment() {
    let mut t = kplc();
    t.standing_charge = Some(StandingCharge {
        amount: Decimal(1_000),
        every_days: 2,
    });
    t.debt_recovery_percent = None;
    let z = SiteZone::NAIROBI;
    let mut acct = MoneyAccount::new(z, at("2026-03-02", 15));
    assert_eq!(
        acct.accrue_standing(&t, at("2026-03-02", 15)).periods,
        1,
        "due from the day of assignment"
    );
    // Periods start 2, 4, 6, 8 March 00:00: by 8 March 00:00 three more are due.
    let s = acct.accrue_standing(&t, at("2026-03-08", 0));
    assert_eq!((s.periods, s.cents, s.to_debt), (3, 3_000, 3_000));
    assert_eq!(acct.accrue_standing(&t, at("2026-03-09", 23)).periods, 0);
    assert_eq!(acct.debt.standing, 4_000);
    let paid = acct.apply_payment(&t, 5_000);
    assert_eq!((paid.recovered.standing, paid.to_balance), (4_000, 1_000));
    let s = acct.accrue_standing(&t, at("2026-03-10", 0));
    assert_eq!((s.from_balance, s.to_debt), (1_000, 0));
}

#[test]
fn emergency_credit_lets_the_balance_go_to_minus_the_limit_and_is_repaid_first() {
    let t = kplc();
    let z = SiteZone::NAIROBI;
    let now = at("2026-03-02", 10);
    let mut acct = MoneyAccount::new(z, now);
    assert!(acct.may_cut(&t, z, now));
    acct.request_emergency(&t).unwrap();
    assert_eq!(acct.credit_cents(&t), 10_000);
    assert!(!acct.may_cut(&t, z, now));
    assert!(acct.units_wh(&t, z, now).unwrap() > 5_000);
    // 6 kWh ≈ KES 119.61: 100 from emergency credit, the rest arrears; now the relay may cut.
    let r = acct
        .apply_consumption(
            &t,
            z,
            Interval {
                start_ms: now,
                end_ms: now + MS_PER_HOUR,
                wh: 6_000,
            },
        )
        .unwrap();
    assert_eq!(r.to_emergency, 10_000);
    assert_eq!(r.to_arrears, r.debit_cents - 10_000);
    assert!(acct.may_cut(&t, z, now + MS_PER_HOUR));
    // 25 % of KES 500 goes to debt, emergency credit first; it stays armed until repaid.
    let paid = acct.apply_payment(&t, 50_000);
    assert_eq!(paid.recovered.emergency, 10_000);
    assert_eq!(
        paid.recovered.arrears, r.to_arrears,
        "the rest of the 25 % clears the arrears"
    );
    assert_eq!(paid.to_balance, 50_000 - 10_000 - r.to_arrears);
    assert!(!acct.emergency_armed);
    assert_eq!(
        acct.request_emergency(&tariff_unchecked(
            "name = \"x\"\nbands = [{ from_kwh = 0, price = \"1\" }]"
        )),
        Err(account::EmergencyRefused::NotOffered)
    );
}

#[test]
fn the_relay_is_never_cut_in_friendly_hours_or_on_a_listed_holiday() {
    let mut t = kplc();
    t.friendly = FriendlyHours {
        windows: vec![
            HourWindow {
                days: Days::Weekdays,
                from_hour: 18,
                to_hour: 8,
            },
            HourWindow {
                days: Days::Weekends,
                from_hour: 0,
                to_hour: 24,
            },
        ],
        holidays: vec![LocalDate::parse("2026-12-25").unwrap()],
    };
    t.validate().unwrap();
    let z = SiteZone::NAIROBI;
    let acct = MoneyAccount::new(z, at("2026-03-02", 0));
    // Monday 2 March 2026.
    assert!(acct.may_cut(&t, z, at("2026-03-02", 8)));
    assert!(acct.may_cut(&t, z, at("2026-03-02", 18) - 1));
    assert!(!acct.may_cut(&t, z, at("2026-03-02", 18)));
    assert!(!acct.may_cut(&t, z, at("2026-03-03", 7)));
    assert!(!acct.may_cut(&t, z, at("2026-03-07", 12)), "Saturday");
    assert!(
        is_friendly(&t, z, at("2026-12-25", 12)),
        "Christmas, a Friday"
    );
    assert!(!is_friendly(&t, z, at("2026-12-24", 12)));
}

#[test]
fn minimum_top_up_is_a_check_before_money_is_taken() {
    let t = kplc();
    assert!(!t.accepts_topup(1_999));
    assert!(t.accepts_topup(2_000));
}

#[test]
fn bad_intervals_are_errors_that_leave_the_account_unchanged() {
    use super::price::PriceError;
    let t = kplc();
    let z = SiteZone::NAIROBI;
    let now = at("2026-03-02", 10);
    let mut acct = MoneyAccount::new(z, now);
    acct.apply_payment(&t, 10_000);
    let before = acct.clone();
    let bad = [
        (
            Interval {
                start_ms: now,
                end_ms: now + 1,
                wh: -1,
            },
            PriceError::NegativeEnergy { wh: -1 },
        ),
        (
            Interval {
                start_ms: now,
                end_ms: now - 1,
                wh: 1,
            },
            PriceError::Backwards {
                start_ms: now,
                end_ms: now - 1,
            },
        ),
        (
            Interval {
                start_ms: i64::MIN,
                end_ms: i64::MAX,
                wh: 1,
            },
            PriceError::TooLong { ms: i64::MAX },
        ),
        (
            Interval {
                start_ms: now,
                end_ms: now + 1,
                wh: i64::MAX,
            },
            PriceError::TooMuchEnergy { wh: i64::MAX },
        ),
    ];
    for (iv, err) in bad {
        assert_eq!(acct.apply_consumption(&t, z, iv), Err(err));
        assert_eq!(acct, before);
    }
    for edge in [i64::MIN, i64::MAX] {
        let iv = Interval {
            start_ms: edge,
            end_ms: edge,
            wh: 5,
        };
        assert!(
            acct.clone().apply_consumption(&t, z, iv).is_ok(),
            "extreme instants price without overflow"
        );
    }
    let mut daily = t.clone();
    daily.standing_charge = Some(StandingCharge {
        amount: Decimal(MAX_DECIMAL),
        every_days: 1,
    });
    let s = acct.accrue_standing(&daily, i64::MAX);
    assert_eq!(s.cents, i64::MAX, "saturates instead of overflowing");
}

#[test]
fn a_misspelt_key_in_a_time_of_use_window_is_refused() {
    let text = r#"name = "x"
    bands = [{ from_kwh = 0, price = "10" }]
    tou = [{ name = "all", days = "all", from_hour = 0, to_hour = 24, multiplier = "1", multipler = "2" }]"#;
    let err = toml::from_str::<Tariff>(text).unwrap_err().to_string();
    assert!(err.contains("multipler"), "{err}");
}
