//! Issue 16 through the real binary: tariffs in the config, a tariff per meter, the money
//! ledger behind `command/balance`, and the upgrade of a unit-ledger database.

mod common;

use common::*;
use umeme_gateway::store;

const SECRET: &str = "tariff-secret-01";

/// The README's and docs/tariffs.md's worked example: KPLC-like domestic tariff.
const DOMESTIC: &str = r#"
[ledger]
default_tariff = "domestic"

[[tariffs]]
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

[[tariffs]]
name = "flat20"
bands = [{ from_kwh = 0, price = "20" }]
"#;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Publishes and returns the `command/balance` it caused, which may arrive before or after
/// the PUBACK.
fn publish_for_balance(
    m: &mut RawMeter,
    topic: &str,
    payload: &str,
    pkid: u16,
) -> serde_json::Value {
    let balance = balance_topic("METER001");
    let before = m.publish_acked(topic, payload, pkid);
    for p in before {
        use rumqttc::mqttbytes::v4::{Packet, PubAck};
        if let Packet::Publish(p) = p {
            if p.qos == rumqttc::mqttbytes::QoS::AtLeastOnce {
                m.send(Packet::PubAck(PubAck::new(p.pkid)));
            }
            if p.topic == balance {
                return balance_json(&p);
            }
        }
    }
    balance_json(&m.next_publish(&balance))
}

fn balance_topic(meter: &str) -> String {
    format!("smartmeter/{meter}/command/balance")
}

#[test]
fn a_schema_3_database_upgrades_in_place_and_a_flat_rate_meter_keeps_its_4_960_wh() {
    let mut gw = Gateway::new("");
    gw.add_meter("METER001", SECRET);
    // Back to schema 3 as the previous release left it: a unit ledger, 4 960 Wh.
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    db.execute_batch(
        "ALTER TABLE meters DROP COLUMN main;
         ALTER TABLE meters DROP COLUMN tariff;
         ALTER TABLE meters DROP COLUMN money;
         UPDATE meters SET balance_wh = 4960, ledger_seq = 7;
         UPDATE meta SET value = '3' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(db);
    gw.start();
    gw.assert_log("upgrading the database from schema 3 to 4");
    let mut m = gw.connect("METER001", SECRET);
    m.subscribe(&balance_topic("METER001"), 1);
    let retained = balance_json(&m.next_publish(&balance_topic("METER001")));
    assert_eq!(retained["balanceWh"], 4_960);
    // The first report moves the account onto the money ledger at 0.05 units/KES
    // (20 KES/kWh): 99.20 KES, so the meter is still shown 4 960 Wh, then 40 Wh less.
    m.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 1_000),
        1,
    );
    let next = publish_for_balance(
        &mut m,
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 1_040),
        2,
    );
    assert_eq!(next["balanceWh"], 4_920, "{next}");
    assert_eq!(next["balanceKes"], 98.4, "{next}");
    // A payment: KES 1 is 50 Wh at the same price.
    gw.simulate("METER001", 1.0);
    let paid = balance_json(&m.next_publish(&balance_topic("METER001")));
    assert_eq!(paid["balanceWh"], 4_970, "{paid}");
    assert_eq!(paid["balanceKes"], 99.4, "{paid}");
    let conn = store::open_without_upgrade(&gw.db_path(), "test-site").unwrap();
    let version: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "6", "3 → 4 → 5 → 6");
}

#[test]
fn the_worked_example_kes_500_on_the_kplc_like_tariff_buys_25_081_wh_and_25_kwh_cost_498_375() {
    let mut gw = Gateway::new(DOMESTIC);
    gw.add_meter("METER001", SECRET);
    gw.start();
    let mut m = gw.connect("METER001", SECRET);
    let topic = balance_topic("METER001");
    m.subscribe(&topic, 1);
    let _retained = m.next_publish(&topic);
    gw.simulate("METER001", 500.0);
    let paid = balance_json(&m.next_publish(&topic));
    assert_eq!(paid["balanceWh"], 25_081, "{paid}");
    assert_eq!(paid["balanceKes"], 500.0, "{paid}");
    // `mayCut` is sent only when false (friendly hours): absent, the meter may cut.
    assert!(paid.get("mayCut").is_none(), "{paid}");
    let report = "smartmeter/METER001/consumption";
    m.publish_acked(report, &v2_payload("METER001", 1, 0), 1);
    let after = publish_for_balance(&mut m, report, &v2_payload("METER001", 2, 25_000), 2);
    // 498.375 KES debited as 49 837 cents (the half cent is carried): 1.63 KES left, which
    // is 81 Wh at 19.935 KES/kWh.
    assert_eq!(after["balanceKes"], 1.63, "{after}");
    assert_eq!(after["balanceWh"], 81, "{after}");
    let conn = store::open_without_upgrade(&gw.db_path(), "test-site").unwrap();
    let events = store::events_after(&conn, "test-site", 0, 100).unwrap();
    let used = events
        .iter()
        .rev()
        .find(|e| e.kind == "consumption")
        .expect("consumption event");
    let priced = &used.data["priced"];
    assert_eq!(priced["tariff"], "domestic", "{}", used.data);
    assert_eq!(priced["totalKes"], "498.375");
    assert_eq!(priced["debitCents"], 49_837);
    assert_eq!(priced["energy"][0]["wh"], 25_000);
    assert_eq!(priced["energy"][0]["kes"], "303.50");
    let charges: Vec<&str> = priced["charges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kes"].as_str().unwrap())
        .collect();
    assert_eq!(charges, ["77.50", "21.25", "11.50", "2.00", "1.25"]);
    assert_eq!(priced["taxes"][0]["kes"], "15.175");
    assert_eq!(priced["taxes"][1]["kes"], "66.20");
    // The original dashboard's fields are still there.
    assert_eq!(used.data["debitWh"], 25_000);
    assert_eq!(used.data["balanceWh"], 81);
    assert_eq!(used.data["balanceKes"], "1.63");

    // Step 4: 10 kWh more cross the 30 kWh edge: 225.728 KES, 22 573 cents with the half
    // cent carried; 1.63 from the balance, 224.10 become arrears.
    let short = publish_for_balance(&mut m, report, &v2_payload("METER001", 3, 35_000), 3);
    assert_eq!(short["balanceKes"], -224.1, "{short}");
    // The debt in Wh at the marginal price, now of the 30–100 kWh band: 16.50 + 4.54 of
    // charges + REP 0.825 + VAT 3.3456 = 25.2106 KES/kWh.
    assert_eq!(short["balanceWh"], -8_890, "{short}");
    let meter = gw.meter("METER001");
    assert_eq!(meter["debt_kes"]["arrears"], "224.10", "{meter}");
    // Step 5: the next KES 500: 25 % (125.00) repays arrears, 375.00 becomes balance.
    gw.simulate("METER001", 500.0);
    let repaid = balance_json(&m.next_publish(&topic));
    assert_eq!(
        repaid["balanceKes"], 275.9,
        "375.00 less 99.10 still owed: {repaid}"
    );
    let meter = gw.meter("METER001");
    assert_eq!(meter["balance_kes"], "375.00", "{meter}");
    assert_eq!(meter["debt_kes"]["arrears"], "99.10", "{meter}");

    // The month's statement adds up to the cent, through the CLI and the API.
    let printed = ok(&gw.cli(&["meter", "statement", "METER001"]));
    for line in [
        "opening:        0.00 KES (balance 0.00, debt 0.00)",
        "payments:       1000.00 KES",
        "energy:         35000 Wh",
        "consumption:    724.103 KES exact, 724.10 KES debited",
        "closing:        275.90 KES (balance 375.00, debt 99.10)",
    ] {
        assert!(printed.contains(line), "{line:?} in\n{printed}");
    }
    let (status, st) = gw.http("GET", "/api/meters/METER001/statement", None);
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["addsUp"], true, "{st}");
    assert_eq!(st["payments_cents"], 100_000);
    assert_eq!(st["consumption_debited_cents"], 72_410);
    assert_eq!(st["energy"][0]["name"], "energy 0–30 kWh");
    assert_eq!(st["energy"][0]["wh"], 30_000);
    assert_eq!(st["energy"][0]["kes"], "364.20");
    assert_eq!(st["energy"][1]["name"], "energy 30–100 kWh");
    assert_eq!(st["energy"][1]["kes"], "82.50");
    assert_eq!(st["taxes"][1]["name"], "vat");
    assert_eq!(st["closing"]["debt_cents"], 9_910);
    let (status, bad) = gw.http("GET", "/api/meters/METER001/statement?month=2026-13", None);
    assert_eq!(status, 400, "{bad}");
}

#[test]
fn emergency_credit_is_granted_once_from_the_meter_the_cli_or_the_api_and_refused_with_a_reason() {
    let mut gw = Gateway::new(DOMESTIC);
    gw.add_meter("METER001", SECRET);
    gw.add_meter("METER002", SECRET);
    ok(&gw.cli(&["meter", "set", "METER002", "--tariff", "flat20"]));
    gw.start();
    let mut m = gw.connect("METER001", SECRET);
    let topic = balance_topic("METER001");
    m.subscribe(&topic, 1);
    let _ = m.next_publish(&topic);
    // The tenant presses the meter's button: KES 100 of emergency credit, 5 016 Wh.
    let granted = publish_for_balance(&mut m, "smartmeter/METER001/command/emergency", "{}", 1);
    assert_eq!(granted["balanceWh"], 5_016, "{granted}");
    assert_eq!(granted["balanceKes"], 0.0, "{granted}");
    // Again: acknowledged (the meter must not retry), refused, counted.
    m.publish_acked("smartmeter/METER001/command/emergency", "{}", 2);
    assert_eq!(
        gw.metric("umeme_mqtt_rejected_total{reason=\"emergency_refused\"}"),
        1.0
    );
    gw.assert_log("emergency credit is already in use");
    let (status, v) = gw.http("POST", "/api/meters/METER001/emergency", None);
    assert_eq!(status, 409, "{v}");
    // A tariff without emergency credit: the CLI says so.
    let out = gw.cli(&["meter", "emergency", "METER002"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("offers no emergency credit"), "{err}");
    // A payment repays the emergency credit first, and ends it: it may be asked for again.
    gw.simulate("METER001", 150.0);
    let repaid = balance_json(&m.next_publish(&topic));
    assert_eq!(repaid["balanceKes"], 150.0, "nothing was used: {repaid}");
    let (status, v) = gw.http("POST", "/api/meters/METER001/emergency", None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["meter"]["emergency_in_use"], true, "{v}");
}

#[test]
fn standing_charges_are_charged_daily_while_the_meter_is_offline() {
    let extra = r#"
[ledger]
default_tariff = "access"

[[tariffs]]
name = "access"
bands = [{ from_kwh = 0, price = "20" }]
standing_charge = { amount = "5.00", every_days = 1 }
"#;
    let mut gw = Gateway::new(extra);
    gw.add_meter("METER001", SECRET);
    gw.start();
    // Today's charge falls due when the meter joins the money ledger (the timer at start, or
    // the payment, whichever comes first); it is recovered first from the payment.
    gw.simulate("METER001", 100.0);
    let balance = |gw: &Gateway| gw.meter("METER001")["balance_kes"].clone();
    assert_eq!(balance(&gw), "95.00");
    gw.kill();
    // Two days later (the daemon's clock for standing charges, debug builds only); the meter
    // never connects.
    gw.env.push((
        "UMEME_TEST_CLOCK_OFFSET_MS".into(),
        (2 * 86_400_000).to_string(),
    ));
    gw.start();
    let charged = eventually("two more daily charges", || {
        let b = balance(&gw);
        (b == "85.00").then_some(b)
    });
    assert_eq!(charged, "85.00");
    // Each charge is itemised where it was charged; the statement has all three days.
    let (status, st) = gw.http("GET", "/api/meters/METER001/statement", None);
    assert_eq!(status, 200, "{st}");
    if st["closing"]["balance_cents"] == 8_500 {
        // The two later days may fall in next month's statement near a month's end.
        assert_eq!(st["standing_cents"], 1_500, "{st}");
    }
    assert_eq!(st["addsUp"], true, "{st}");
    let printed = ok(&gw.cli(&["meter", "statement", "METER001"]));
    assert!(printed.contains("standing:"), "{printed}");
}

#[test]
fn meter_add_and_set_take_a_configured_tariff_refuse_an_unknown_one_and_show_prints_it() {
    let gw = Gateway::new(DOMESTIC);
    let out = gw.cli(&[
        "meter", "add", "METER001", "--secret", SECRET, "--tariff", "flat20",
    ]);
    ok(&out);
    let shown = ok(&gw.cli(&["meter", "show", "METER001"]));
    assert!(shown.contains("tariff:         flat20"), "{shown}");

    let out = gw.cli(&[
        "meter", "add", "METER002", "--secret", SECRET, "--tariff", "nonesuch",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown tariff \"nonesuch\""), "{err}");
    assert!(err.contains("domestic, flat20"), "{err}");
    assert!(
        !ok(&gw.cli(&["meter", "list"])).contains("METER002"),
        "nothing is added"
    );

    let out = gw.cli(&["meter", "set", "METER001", "--tariff", "nonesuch"]);
    assert!(!out.status.success());
    // A tariff removed from the configuration while a meter is on it: check-config refuses.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let without = text.replace("name = \"flat20\"", "name = \"flat25\"");
    std::fs::write(&gw.config, &without).unwrap();
    let out = gw.cli(&["check-config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("meters on a tariff the configuration does not have: METER001 (\"flat20\")"),
        "{err}"
    );
    std::fs::write(&gw.config, &text).unwrap();
    ok(&gw.cli(&["check-config"]));
    ok(&gw.cli(&["meter", "set", "METER001", "--tariff", "default"]));
    let shown = ok(&gw.cli(&["meter", "show", "METER001"]));
    assert!(
        shown.contains("tariff:         domestic (the site's default)"),
        "{shown}"
    );
}

#[test]
fn a_meter_on_another_tariff_is_priced_by_it() {
    let mut gw = Gateway::new(DOMESTIC);
    gw.add_meter("METER001", SECRET);
    ok(&gw.cli(&["meter", "set", "METER001", "--tariff", "flat20"]));
    gw.start();
    let mut m = gw.connect("METER001", SECRET);
    let topic = balance_topic("METER001");
    m.subscribe(&topic, 1);
    let _ = m.next_publish(&topic);
    gw.simulate("METER001", 100.0);
    // 20 KES/kWh flat, no charges: KES 100 is 5 000 Wh.
    assert_eq!(balance_json(&m.next_publish(&topic))["balanceWh"], 5_000);
}

/// `check-config` on a config with `extra` appended: its error output.
fn check_config_error(extra: &str) -> String {
    let gw = Gateway::new(extra);
    let out = gw.cli(&["check-config"]);
    assert!(!out.status.success(), "{extra}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_refuses_bad_tariffs_at_the_field_with_file_line_and_column() {
    // The harness's config ends with `extra` and a newline: line n of `extra` is this far in.
    let base = Gateway::new("");
    let before = std::fs::read_to_string(&base.config)
        .unwrap()
        .lines()
        .count()
        - 1;
    let line = |n: usize| format!("gateway.toml:{}:", before + n);
    let cases: [(&str, usize, &str); 5] = [
        (
            "[[tariffs]]\nname = \"t\"\nbands = [\n  { from_kwh = 0, to_kwh = 30, price = \"1\" },\n  { from_kwh = 20, price = \"2\" },\n]\n",
            5,
            "overlaps the previous band",
        ),
        (
            "[[tariffs]]\nname = \"t\"\nbands = [{ from_kwh = 0, to_kwh = 30, price = \"1\" }, { from_kwh = 40, price = \"2\" }]\n",
            3,
            "leaves a gap",
        ),
        (
            "[[tariffs]]\nname = \"t\"\nbands = [{ from_kwh = 0, price = \"-1\" }]\n",
            3,
            "bands[0].price: is negative",
        ),
        (
            "[[tariffs]]\nname = \"t\"\nbands = [{ from_kwh = 0, price = \"1\" }]\ntou = [{ name = \"peak\", days = \"all\", from_hour = 18, to_hour = 22, multiplier = \"1.2\" }]\n",
            4,
            "windows do not cover the day",
        ),
        (
            "[ledger]\ndefault_tariff = \"nonesuch\"\n[[tariffs]]\nname = \"t\"\nbands = [{ from_kwh = 0, price = \"1\" }]\n",
            2,
            "default_tariff \"nonesuch\" is not a configured tariff (known: t)",
        ),
    ];
    for (extra, at_line, message) in cases {
        let err = check_config_error(extra);
        assert!(err.contains(&line(at_line)), "{extra}\n→ {err}");
        assert!(err.contains(message), "{extra}\n→ {err}");
    }
    // [site] timezone: only fixed offsets.
    let err = check_config_error("[site]\ntimezone = \"Europe/London\"\n");
    assert!(err.contains("unsupported time zone"), "{err}");
}
