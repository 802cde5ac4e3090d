//! Limits the meters enforce (issue 16, issue 18 items 2 and 4), gateway side: `[limits]` reaches
//! each meter as `command/config` when it subscribes, and its `power_trip` statuses become
//! alert events. The real binary, raw MQTT.

mod common;

use common::*;
use rumqttc::mqttbytes::v4::Packet;

const SECRET: &str = "limits-meter-secret";
const LIMITS: &str = "[limits]\npower_cap_w = 2000\ntrip_after_s = 15\nreclose_after_s = 120\nmax_trips = 4\ndaily_allowance_kwh = 5.5\ncap_in_friendly_hours = false\n";

fn config_json(p: &rumqttc::mqttbytes::v4::Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).expect("config command is JSON")
}

/// Subscribes to the meter's commands and returns the `command/config` that follows the
/// balance, or `None` when the gateway sent none (checked with a barrier: the gateway writes
/// both commands before it reads the next packet).
fn subscribe_for_config(m: &mut RawMeter, meter: &str) -> Option<serde_json::Value> {
    m.subscribe(&format!("smartmeter/{meter}/command/#"), 1);
    m.next_publish(&format!("smartmeter/{meter}/command/balance"));
    let config_topic = format!("smartmeter/{meter}/command/config");
    m.barrier(meter, 2).into_iter().find_map(|p| match p {
        Packet::Publish(p) if p.topic == config_topic => {
            assert!(p.retain, "sent like the retained balance");
            Some(config_json(&p))
        }
        _ => None,
    })
}

#[test]
fn a_meter_gets_the_sites_limits_in_command_config_right_after_its_balance() {
    let mut gw = Gateway::new(LIMITS);
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    let cfg = subscribe_for_config(&mut m, "METER001").expect("a config command");
    assert_eq!(
        cfg,
        serde_json::json!({
            "lowBalanceUnits": 3.0,
            "powerCapW": 2000,
            "powerTripAfterS": 15,
            "powerRecloseAfterS": 120,
            "powerMaxTrips": 4,
            "powerCapInFriendlyHours": false,
            "dailyAllowanceWh": 5500,
            "utcOffsetMin": 180,
        })
    );
}

#[test]
fn without_a_limits_section_no_config_command_is_sent() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    assert_eq!(subscribe_for_config(&mut m, "METER001"), None);
}

#[test]
fn changed_limits_reach_the_meter_when_it_reconnects_after_a_restart() {
    let mut gw = Gateway::new(LIMITS);
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    assert_eq!(
        subscribe_for_config(&mut m, "METER001").unwrap()["powerCapW"],
        2000
    );
    gw.kill();
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        text.replace("power_cap_w = 2000", "power_cap_w = 0"),
    )
    .unwrap();
    gw.start();
    let mut m = gw.connect("METER001", SECRET);
    let cfg = subscribe_for_config(&mut m, "METER001").unwrap();
    assert_eq!(cfg["powerCapW"], 0, "a cap of 0 lifts it: {cfg}");
}

#[test]
fn power_trips_become_alert_events_and_are_counted() {
    let mut gw = Gateway::new(LIMITS);
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    let topic = "smartmeter/METER001/status";
    for (pkid, trips, locked) in [(1, 1, false), (2, 2, false), (3, 3, true)] {
        let body = format!(
            r#"{{"meterNo":"METER001","status":"power_trip","powerW":2412.5,"capW":2000,"trips":{trips},"lockedOut":{locked},"timestamp":1764230400123}}"#
        );
        m.publish_acked(topic, &body, pkid);
    }
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let alerts: Vec<(String, i64, bool)> = db
        .prepare(
            "SELECT json_extract(data, '$.alert'), json_extract(data, '$.trips'),
                    json_extract(data, '$.lockedOut')
               FROM events WHERE kind = 'alert' AND meter = 'METER001' ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        alerts,
        vec![
            ("power_trip".to_string(), 1, false),
            ("power_trip".to_string(), 2, false),
            ("power_lockout".to_string(), 3, true),
        ]
    );
    let cap: i64 = db
        .query_row(
            "SELECT json_extract(data, '$.capW') FROM events WHERE kind = 'alert' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cap, 2000);
    assert_eq!(
        gw.metric("umeme_ledger_alerts_total{alert=\"power_trip\"}"),
        2.0
    );
    assert_eq!(
        gw.metric("umeme_ledger_alerts_total{alert=\"power_lockout\"}"),
        1.0
    );
    // A trip is not the meter's state: its status stays what it was.
    assert_ne!(gw.meter("METER001")["status"], "power_trip");
}

#[test]
fn a_malformed_power_trip_is_acknowledged_counted_logged_and_not_stored() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    let before = gw.metric("umeme_mqtt_rejected_total{reason=\"malformed\"}");
    m.publish_acked(
        "smartmeter/METER001/status",
        r#"{"meterNo":"METER001","status":"power_trip","powerW":"lots"}"#,
        1,
    );
    assert_eq!(
        gw.metric("umeme_mqtt_rejected_total{reason=\"malformed\"}"),
        before + 1.0
    );
    gw.wait_log("meter payload refused");
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let alerts: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'alert'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(alerts, 0);
    assert_eq!(
        gw.metric("umeme_ledger_alerts_total{alert=\"power_trip\"}"),
        0.0
    );
}

#[test]
fn a_meters_config_refusal_is_stored_as_an_error_status_with_its_message() {
    let mut gw = Gateway::new(LIMITS);
    gw.start();
    gw.add_meter("METER001", SECRET);
    let mut m = gw.connect("METER001", SECRET);
    // What meter-core's `encode_error_status` writes for a refused `command/config`.
    m.publish_acked(
        "smartmeter/METER001/status",
        r#"{"meterNo":"METER001","status":"error","message":"config refused: powerCapW must be 0 (off) or 100..=50000"}"#,
        1,
    );
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let message: String = db
        .query_row(
            "SELECT json_extract(data, '$.message') FROM events
              WHERE kind = 'status' AND json_extract(data, '$.status') = 'error'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        message.starts_with("config refused: powerCapW"),
        "{message}"
    );
}

#[test]
fn check_config_prints_the_limits_the_meters_will_get() {
    let gw = Gateway::new(LIMITS);
    let out = gw.cli(&["check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("limits the v2 meters enforce (command/config): power cap 2000 W (trip after 15 s above it, reclose after 120 s, off after 4 trips in 30 minutes, not in friendly hours), daily allowance 5.500 kWh"),
        "{stdout}"
    );
    let gw = Gateway::new("");
    let out = gw.cli(&["check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("limits the v2 meters enforce: none sent (no [limits] section)"),
        "{stdout}"
    );
}
