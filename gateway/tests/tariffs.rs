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
        "ALTER TABLE meters DROP COLUMN tariff;
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
    m.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 1_040),
        2,
    );
    let next = balance_json(&m.next_publish(&balance_topic("METER001")));
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
    assert_eq!(version, "4");
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
    assert_eq!(paid["mayCut"], true, "{paid}");
    let report = "smartmeter/METER001/consumption";
    m.publish_acked(report, &v2_payload("METER001", 1, 0), 1);
    m.publish_acked(report, &v2_payload("METER001", 2, 25_000), 2);
    let after = balance_json(&m.next_publish(&topic));
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
    let before = std::fs::read_to_string(&base.config).unwrap().lines().count() - 1;
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
