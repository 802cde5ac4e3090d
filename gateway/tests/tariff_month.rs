//! A month at a site with mixed tariffs (a flat one, a banded one with time of use) through the
//! real binary: meters report every six hours of the daemon's debug clock across a month's
//! end, and each meter's ledger must equal the independent model of `tariff_model.rs`, fed
//! with the arrival times the gateway stamped on each report.
//!
//! The first test uses raw MQTT meters at fixed times; the second meter-sim's virtual meters,
//! with meter-sim moving the gateway's debug clock along with its own
//! (`SimConfig::gateway_clock_from_ms`).

mod common;
#[path = "tariff_model.rs"]
#[allow(dead_code)]
mod tariff_model;

use common::*;
use tariff_model::Model;
use umeme_gateway::tariff::Tariff;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const SECRET: &str = "tariff-month-secret";

const FLAT: &str = r#"
name = "flat"
bands = [{ from_kwh = 0, price = "20" }]
"#;

const BANDED_TOU: &str = r#"
name = "banded"
bands = [
  { from_kwh = 0, to_kwh = 30, price = "12.14" },
  { from_kwh = 30, to_kwh = 100, price = "16.50" },
  { from_kwh = 100, price = "18.57" },
]
tou = [
  { name = "peak", days = "weekdays", from_hour = 18, to_hour = 22, multiplier = "1.2" },
  { name = "off-peak", days = "weekdays", from_hour = 22, to_hour = 18, multiplier = "0.9" },
  { name = "weekend", days = "weekends", from_hour = 0, to_hour = 24, multiplier = "1" },
]
charges = [{ name = "fuel_energy", rates = [{ from = "2026-01-01", price = "3.10" }] }]
taxes = [{ name = "vat", percent = "16", on = ["energy", "fuel_energy"] }]
"#;

fn day0() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    now - now.rem_euclid(DAY) + 2 * DAY
}

fn set_clock(gw: &Gateway, ms: i64) {
    let (status, v) = gw.http(
        "POST",
        "/api/debug/clock",
        Some(&format!(r#"{{"nowMs":{ms}}}"#)),
    );
    assert_eq!(status, 200, "{v}");
}

/// A meter: its number, its tariff's text, and the Wh it uses in step `k`.
type Plan = (&'static str, &'static str, fn(u64) -> u64);

fn cents_text(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

#[test]
fn a_month_at_a_site_with_flat_and_banded_tou_meters_leaves_each_ledger_equal_to_the_model() {
    let config = format!(
        "[site]\ntimezone = \"Africa/Nairobi\"\n\n[outbox]\nretention = \"90d\"\n\n[ledger]\ndefault_tariff = \"flat\"\n\n[[tariffs]]{FLAT}\n[[tariffs]]{BANDED_TOU}"
    );
    let mut gw = Gateway::new(&config);
    let meters: [Plan; 3] = [
        ("FLAT01", FLAT, |_| 300),
        ("BAND01", BANDED_TOU, |k| 500 + (k % 5) * 200),
        (
            "BAND02",
            BANDED_TOU,
            |k| if k % 4 == 3 { 2_000 } else { 150 },
        ),
    ];
    for (id, tariff, _) in &meters {
        gw.add_meter(id, SECRET);
        if *tariff != FLAT {
            let out = gw.cli(&["meter", "set", id, "--tariff", "banded"]);
            assert!(out.status.success(), "{out:?}");
        }
    }
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0 - HOUR);
    let mut conns = Vec::new();
    for (id, _, _) in &meters {
        gw.simulate(id, 5_000.0);
        let mut m = gw.connect(id, SECRET);
        m.publish_acked(
            &format!("smartmeter/{id}/consumption"),
            &v2_payload(id, 1, 0),
            1,
        );
        conns.push(m);
    }
    // 31 days, a report every six hours (not on the hour: 13 s more each step), so the run
    // crosses the month's end, band edges and the peak window's edges.
    let steps: u64 = 31 * 4;
    let mut energy = [0u64; 3];
    for k in 1..=steps {
        set_clock(&gw, t0 + k as i64 * 6 * HOUR + k as i64 * 13_000);
        for (i, (id, _, wh)) in meters.iter().enumerate() {
            energy[i] += wh(k);
            let pkid = (k % 60_000) as u16 + 1;
            conns[i].publish_acked(
                &format!("smartmeter/{id}/consumption"),
                &v2_payload(id, k as u32 + 1, energy[i]),
                pkid,
            );
        }
    }
    set_clock(&gw, t0 + (steps as i64 + 1) * 6 * HOUR);

    // The model, fed with the times the gateway stamped (kept: `retention` is longer than the
    // month the clock moved through).
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let times = |kind: &str, meter: &str| -> Vec<i64> {
        let mut st = db
            .prepare("SELECT at FROM events WHERE kind = ?1 AND meter = ?2 ORDER BY seq")
            .unwrap();
        st.query_map([kind, meter], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    for (id, tariff, wh) in &meters {
        let t: Tariff = toml::from_str(tariff).unwrap();
        let paid = times("payment", id);
        assert_eq!(paid.len(), 1, "{id}");
        let mut model = Model::new(t, 180, paid[0]);
        model.pay(500_000);
        let reports = times("consumption", id);
        assert_eq!(reports.len() as u64, steps + 1, "{id}");
        let mut prev = reports[0];
        for (k, at) in reports.iter().enumerate().skip(1) {
            model.report(prev, *at, wh(k as u64) as i64);
            prev = *at;
        }
        let shown = gw.meter(id);
        assert_eq!(
            shown["balance_kes"],
            cents_text(model.balance),
            "{id}: {shown}"
        );
        assert_eq!(model.arrears, 0, "{id}");
        assert_eq!(shown["debt_kes"]["arrears"], "0.00", "{id}: {shown}");
        // Both months' statements add up to the cent.
        let (status, st) = gw.http("GET", &format!("/api/meters/{id}/statement"), None);
        assert_eq!(status, 200, "{st}");
        assert_eq!(st["addsUp"], true, "{id}: {st}");
        eprintln!(
            "{id}: {} Wh, KES {} debited, balance KES {}",
            energy[meters.iter().position(|m| m.0 == *id).unwrap()],
            cents_text(model.debited_cents),
            cents_text(model.balance)
        );
    }
}

/// meter-sim's virtual meters (v2 firmware logic, their own compressed clock) for a month at a
/// site with both tariffs; meter-sim moves the gateway's debug clock with its own, so the
/// gateway prices each report by simulated time. Every meter's ledger must then equal the
/// model fed with the gateway's events (payments and consumption records, in order).
#[test]
fn meter_sim_runs_a_month_at_a_mixed_tariff_site_and_every_ledger_equals_the_model() {
    use meter_sim::profile::Profile;
    use std::time::Duration;
    let config = format!(
        "[site]\ntimezone = \"Africa/Nairobi\"\n\n[outbox]\nretention = \"90d\"\n\n[ledger]\ndefault_tariff = \"flat\"\n\n[[tariffs]]{FLAT}\n[[tariffs]]{BANDED_TOU}"
    );
    let mut gw = Gateway::new(&config);
    let ids: Vec<String> = (1..=6).map(|n| format!("SIM{n:04}")).collect();
    for (n, id) in ids.iter().enumerate() {
        gw.add_meter(id, SECRET);
        if n % 2 == 1 {
            let out = gw.cli(&["meter", "set", id, "--tariff", "banded"]);
            assert!(out.status.success(), "{out:?}");
        }
    }
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0);
    let cfg = meter_sim::SimConfig {
        broker: gw.broker,
        api: gw.api,
        meters: ids.len(),
        id_prefix: "SIM".into(),
        secret: SECRET.into(),
        mode: meter_sim::Mode::V2,
        profile: Profile::Daily {
            base_ma: 100,
            peak_ma: 2_000,
        },
        duration: Duration::from_secs(31 * 24 * 3600),
        step: Duration::from_secs(6 * 3600),
        report_every: 1,
        // Six simulated hours in 200 ms: the month in about 25 s, and the gateway's clock
        // (one request and fold a step) keeps up.
        speed: 6.0 * 3600.0 * 5.0,
        outage_fraction: 0.0,
        reboot_fraction: 0.0,
        initial_kes: 5_000.0,
        topups: 6,
        provision: false,
        seed: 16,
        settle_timeout: Duration::from_secs(10),
        gateway_clock_from_ms: Some(t0),
        scenarios: Vec::new(),
        gateway_clock_from: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let summary = rt.block_on(meter_sim::run(cfg)).unwrap();
    // Each meter shows what the ledger shows (a report without energy that moves into another
    // TOU period re-prices the credit, and the meter is told).
    assert!(
        summary.all_agree(),
        "{summary}\n{:?}",
        summary.disagreements
    );
    assert_eq!(summary.dropped, 0, "{summary}");
    set_clock(&gw, t0 + 32 * DAY);

    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let mut st = db
        .prepare(
            "SELECT kind, at, data FROM events
             WHERE meter = ?1 AND kind IN ('payment', 'consumption') ORDER BY seq",
        )
        .unwrap();
    let mut kwh_by_tariff = [0i64; 2];
    for (n, id) in ids.iter().enumerate() {
        let tariff: Tariff = toml::from_str(if n % 2 == 1 { BANDED_TOU } else { FLAT }).unwrap();
        let events: Vec<(String, i64, rusqlite::types::Value)> = st
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut model: Option<Model> = None;
        let mut prev = 0;
        let (mut reports, mut payments) = (0, 0);
        for (kind, at, data) in events {
            match (kind.as_str(), data) {
                ("payment", rusqlite::types::Value::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let m = model.get_or_insert_with(|| {
                        prev = at;
                        Model::new(tariff.clone(), 180, at)
                    });
                    m.pay(v["amountCents"].as_i64().unwrap());
                    payments += 1;
                }
                ("consumption", rusqlite::types::Value::Blob(b)) => {
                    let c = umeme_gateway::consumption::Consumption::decode(&b).unwrap();
                    let m = model.as_mut().expect("credited before the first report");
                    m.report(prev, at, c.debit_wh);
                    kwh_by_tariff[n % 2] += c.debit_wh;
                    prev = at;
                    reports += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        let model = model.unwrap();
        assert!(reports >= 31 * 4, "{id}: {reports} reports");
        let shown = gw.meter(id);
        let net = model.balance - model.arrears - model.emergency;
        assert_eq!(
            shown["balance_kes"],
            cents_text(model.balance),
            "{id}: {shown}"
        );
        assert_eq!(
            shown["debt_kes"]["arrears"],
            cents_text(model.arrears),
            "{id}: {shown}"
        );
        eprintln!(
            "{id}: {reports} reports, {payments} payments, KES {} debited, net KES {}",
            cents_text(model.debited_cents),
            net as f64 / 100.0
        );
    }
    eprintln!(
        "Wh used: flat {}, banded + TOU {}",
        kwh_by_tariff[0], kwh_by_tariff[1]
    );
}
