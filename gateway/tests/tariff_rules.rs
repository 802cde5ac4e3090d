//! Issue 16's remaining rules through the real binary: what connected meters are told when
//! friendly hours begin and end or a standing charge is charged by the timer, per-tariff limits
//! in `command/config`, the minimum top-up and automatic emergency credit.
//!
//! Time is the daemon's own: a debug build serves `POST /api/debug/clock`, which moves the
//! clock that stamps events, prices subscriptions and drives the daemon's hour-edge timer, so
//! a test walks through days in milliseconds.

mod common;

use common::*;
use serde_json::Value;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const SECRET: &str = "tariff-rules-secret";

/// UTC midnight two days from now: later than the meters' creation (the CLI stamps that with
/// the real clock).
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

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mayCut` as the meter reads it: absent means true.
fn may_cut(b: &Value) -> bool {
    b.get("mayCut").is_none_or(|v| v == true)
}

fn command(meter: &str, leaf: &str) -> String {
    format!("smartmeter/{meter}/command/{leaf}")
}

/// Nights are friendly (18:00–08:00 UTC), KES 1.00 a day standing charge.
const NIGHTS: &str = r#"
[site]
timezone = "UTC"

[ledger]
default_tariff = "nights"

[[tariffs]]
name = "nights"
bands = [{ from_kwh = 0, price = "20" }]
standing_charge = { amount = "1.00", every_days = 1 }
friendly = { windows = [{ days = "all", from_hour = 18, to_hour = 8 }] }
"#;

#[test]
fn a_meter_is_told_when_friendly_hours_begin_and_end_and_when_the_timer_charges_it() {
    let mut gw = Gateway::new(NIGHTS);
    gw.add_meter("METER001", SECRET);
    gw.start();
    // The timer at start charges today's standing charge: the meter is in debt.
    let owed = |gw: &Gateway| gw.meter("METER001")["debt_kes"]["standing"].clone();
    eventually("today's standing charge", || {
        (owed(&gw) == "1.00").then_some(())
    });
    // 19:00 two days later: two more daily charges, by the hour-edge timer.
    let d0 = day0();
    set_clock(&gw, d0 + 19 * HOUR);
    eventually("two more daily charges", || {
        (owed(&gw) == "3.00").then_some(())
    });

    // Subscribing in friendly hours: the meter may not cut, and the relay stays on.
    let mut m = gw.connect("METER001", SECRET);
    m.subscribe("smartmeter/METER001/command/#", 1);
    let topic = command("METER001", "balance");
    let b = balance_json(&m.next_publish(&topic));
    assert!(!may_cut(&b), "{b}");
    assert_eq!(b["relay"], "on", "{b}");
    assert_eq!(b["balanceKes"], -3.0, "{b}");

    // 08:00 the next day: friendly hours end (told at once), and that day's standing charge
    // is charged (told too).
    set_clock(&gw, d0 + DAY + 8 * HOUR + 30_000);
    let ended = balance_json(&m.next_publish(&topic));
    assert!(may_cut(&ended), "{ended}");
    assert_eq!(ended["relay"], "off", "{ended}");
    let charged = balance_json(&m.next_publish(&topic));
    assert_eq!(charged["balanceKes"], -4.0, "{charged}");
    assert!(may_cut(&charged), "{charged}");

    // 18:00: they begin again.
    set_clock(&gw, d0 + DAY + 18 * HOUR + 30_000);
    let began = balance_json(&m.next_publish(&topic));
    assert!(!may_cut(&began), "{began}");
    assert_eq!(began["relay"], "on", "{began}");
    assert_eq!(began["balanceKes"], -4.0, "{began}");
}

/// A site `[limits]` and a tariff with its own.
const LIMITED: &str = r#"
[limits]
power_cap_w = 3000
daily_allowance_kwh = 10

[ledger]
default_tariff = "standard"

[[tariffs]]
name = "standard"
bands = [{ from_kwh = 0, price = "20" }]

[[tariffs]]
name = "lifeline"
bands = [{ from_kwh = 0, price = "12" }]
limits = { power_cap_w = 500, daily_allowance_kwh = 2.5, max_trips = 2 }
"#;

#[test]
fn a_meter_gets_its_tariffs_limits_else_the_sites_and_new_ones_when_its_tariff_changes() {
    let mut gw = Gateway::new(LIMITED);
    gw.add_meter("METER001", SECRET);
    gw.add_meter("METER002", SECRET);
    ok(&gw.cli(&["meter", "set", "METER002", "--tariff", "lifeline"]));
    gw.start();
    let config = |m: &mut RawMeter, id: &str| balance_json(&m.next_publish(&command(id, "config")));

    let mut site = gw.connect("METER001", SECRET);
    site.subscribe("smartmeter/METER001/command/#", 1);
    let c = config(&mut site, "METER001");
    assert_eq!(c["powerCapW"], 3000, "{c}");
    assert_eq!(c["dailyAllowanceWh"], 10_000, "{c}");

    let mut lifeline = gw.connect("METER002", SECRET);
    lifeline.subscribe("smartmeter/METER002/command/#", 1);
    let c = config(&mut lifeline, "METER002");
    assert_eq!(c["powerCapW"], 500, "{c}");
    assert_eq!(c["dailyAllowanceWh"], 2_500, "{c}");
    assert_eq!(c["powerMaxTrips"], 2, "{c}");
    // The keys it leaves out are the defaults, not the site's.
    assert_eq!(c["powerTripAfterS"], 10, "{c}");

    // The CLI moves METER001 to the lifeline tariff: the connected meter gets its limits.
    ok(&gw.cli(&["meter", "set", "METER001", "--tariff", "lifeline"]));
    let c = config(&mut site, "METER001");
    assert_eq!(c["powerCapW"], 500, "{c}");
    // And back to the default: the site's again.
    ok(&gw.cli(&["meter", "set", "METER001", "--tariff", "standard"]));
    let c = config(&mut site, "METER001");
    assert_eq!(c["powerCapW"], 3000, "{c}");
}

#[test]
fn check_config_prints_each_tariffs_own_limits_after_the_sites() {
    let gw = Gateway::new(LIMITED);
    let out = gw.cli(&["check-config"]);
    let stdout = ok(&out);
    assert!(
        stdout.contains("limits the v2 meters enforce (command/config): power cap 3000 W"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  on tariff lifeline: power cap 500 W (trip after 10 s above it, reclose after 60 s, off after 2 trips in 30 minutes, also in friendly hours), daily allowance 2.500 kWh"),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_a_tariffs_bad_limits_at_the_value_with_file_line_and_column() {
    let gw = Gateway::new(
        r#"
[[tariffs]]
name = "capped"
bands = [{ from_kwh = 0, price = "20" }]
limits = { power_cap_w = 5, max_trips = 2 }
"#,
    );
    let out = gw.cli(&["check-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("power_cap_w"), "{err}");
    assert!(err.contains("gateway.toml:"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("gateway.toml:"))
        .unwrap_or_default()
        .to_string();
    // The file's line of `limits = …`, then a column.
    let pos: Vec<&str> = line
        .split("gateway.toml:")
        .nth(1)
        .unwrap()
        .split(':')
        .collect();
    let config = std::fs::read_to_string(gw.dir.path().join("gateway.toml")).unwrap();
    let expected = config
        .lines()
        .position(|l| l.starts_with("limits = "))
        .unwrap()
        + 1;
    assert_eq!(pos[0].trim(), expected.to_string(), "{err}");
    assert!(pos[1].trim().parse::<usize>().is_ok(), "{err}");
}

/// KES 20 minimum top-up.
const MINIMUM: &str = r#"
[ledger]
default_tariff = "domestic"

[[tariffs]]
name = "domestic"
bands = [{ from_kwh = 0, price = "20" }]
minimum_topup = "20.00"
"#;

#[test]
fn a_payment_below_the_minimum_top_up_is_kept_as_unapplied_with_its_reason_not_credited() {
    let mut gw = Gateway::new(MINIMUM);
    gw.add_meter("METER001", SECRET);
    gw.start();
    let body = r#"{"meter_no":"METER001","amount":10,"reference":"SMALL1"}"#;
    let (status, v) = gw.http("POST", "/daraja/simulate", Some(body));
    assert_eq!(status, 422, "{v}");
    let why = v.to_string();
    assert!(why.contains("below_minimum_topup"), "{why}");
    assert!(why.contains("minimum top-up of KES 20.00"), "{why}");
    assert_eq!(gw.balance_wh("METER001"), 0);
    assert_eq!(
        gw.metric("umeme_payments_total{source=\"simulate\",outcome=\"below_minimum\"}"),
        1.0
    );
    gw.assert_log("payment below the minimum top-up: not credited, kept as unapplied");
    // Kept for the operator, with the reason; the same payment again is the same row.
    let (status, _) = gw.http("POST", "/daraja/simulate", Some(body));
    assert_eq!(status, 422);
    let listed = ok(&gw.cli(&["payment", "list", "--unapplied"]));
    assert!(listed.contains("SIM-SMALL1"), "{listed}");
    assert!(listed.contains("below_minimum_topup"), "{listed}");
    assert_eq!(listed.matches("SIM-SMALL1").count(), 1, "{listed}");
    // The operator decides: applied, it credits (500 Wh at KES 20/kWh).
    ok(&gw.cli(&["payment", "apply", "SIM-SMALL1", "METER001"]));
    assert_eq!(gw.balance_wh("METER001"), 500);
    // At the minimum it credits at once.
    gw.simulate("METER001", 20.0);
    assert_eq!(gw.balance_wh("METER001"), 1_500);
}

/// KES 20/kWh; KES 10 of emergency credit, granted automatically.
const AUTO: &str = r#"
[ledger]
default_tariff = "auto"

[[tariffs]]
name = "auto"
bands = [{ from_kwh = 0, price = "20" }]
emergency_credit = "10.00"
emergency_auto = true
"#;

/// Publishes a v2 report and returns the `command/balance` it caused.
fn report(m: &mut RawMeter, seq: u32, energy_wh: u64) -> Value {
    let topic = command("METER001", "balance");
    let payload = v2_payload("METER001", seq, energy_wh);
    for p in m.publish_acked("smartmeter/METER001/consumption", &payload, seq as u16) {
        if let rumqttc::mqttbytes::v4::Packet::Publish(p) = p {
            if p.qos == rumqttc::mqttbytes::QoS::AtLeastOnce {
                m.send(rumqttc::mqttbytes::v4::Packet::PubAck(
                    rumqttc::mqttbytes::v4::PubAck::new(p.pkid),
                ));
            }
            if p.topic == topic {
                return balance_json(&p);
            }
        }
    }
    balance_json(&m.next_publish(&topic))
}

/// Emergency credit grants in this month's statement (the automatic ones are events like a
/// request's).
fn auto_grants(gw: &Gateway) -> u64 {
    let (status, st) = gw.http("GET", "/api/meters/METER001/statement", None);
    assert_eq!(status, 200, "{st}");
    st["emergency_requests"].as_u64().unwrap()
}

#[test]
fn emergency_auto_grants_emergency_credit_once_when_the_credit_runs_out_and_again_after_a_payment()
{
    let mut gw = Gateway::new(AUTO);
    gw.add_meter("METER001", SECRET);
    gw.start();
    let mut m = gw.connect("METER001", SECRET);
    let topic = command("METER001", "balance");
    m.subscribe(&topic, 1);
    let _ = m.next_publish(&topic);
    gw.simulate("METER001", 10.0);
    let paid = balance_json(&m.next_publish(&topic));
    assert_eq!(paid["balanceWh"], 500, "{paid}");
    m.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 0),
        1,
    );
    // The KES 10 is used up: KES 10 of emergency credit without a request (500 Wh more).
    let out = report(&mut m, 2, 500);
    assert_eq!(out["balanceWh"], 500, "{out}");
    assert_eq!(out["relay"], "on", "{out}");
    assert_eq!(auto_grants(&gw), 1);
    let meter = gw.meter("METER001");
    assert_eq!(meter["emergency_in_use"], true, "{meter}");
    // The emergency credit is used up too: no second grant before a payment.
    let out = report(&mut m, 3, 1_000);
    assert_eq!(out["balanceKes"], -10.0, "{out}");
    assert_eq!(out["relay"], "off", "{out}");
    let out = report(&mut m, 4, 1_100);
    assert_eq!(out["balanceKes"], -12.0, "{out}");
    assert_eq!(auto_grants(&gw), 1);
    // KES 22 repays the KES 12 of debt first, KES 10 is balance; when that runs out, a
    // second automatic grant.
    gw.simulate("METER001", 22.0);
    let paid = balance_json(&m.next_publish(&topic));
    assert_eq!(paid["balanceKes"], 10.0, "{paid}");
    let out = report(&mut m, 5, 1_600);
    assert_eq!(out["balanceWh"], 500, "{out}");
    assert_eq!(auto_grants(&gw), 2);
    // The statement counts both and still adds up.
    let (status, st) = gw.http("GET", "/api/meters/METER001/statement", None);
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["addsUp"], true, "{st}");
}
