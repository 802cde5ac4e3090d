//! Meters as attackers (issue 14, items 10 to 12): a tenant with one meter's secret floods,
//! subscribes without end or writes control characters into its fields. Each test runs the
//! real binary and speaks raw MQTT to it.

mod common;

use common::*;
use rumqttc::mqttbytes::v4::{Packet, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use rumqttc::SubscribeReasonCode;

const SECRET: &str = "abuse-meter-secret";

fn gateway(broker_keys: &str, extra: &str) -> Gateway {
    Gateway::new(extra).with_broker_keys(broker_keys)
}

fn status(meter: &str, message: &str) -> String {
    format!(r#"{{"meterNo":"{meter}","status":"online","message":"{message}"}}"#)
}

fn count(gw: &Gateway, sql: &str, meter: &str) -> i64 {
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    db.query_row(sql, [meter], |r| r.get(0)).unwrap()
}

/// Status events the meter published itself (not the gateway's presence events).
fn published_statuses(gw: &Gateway, meter: &str) -> i64 {
    count(
        gw,
        "SELECT COUNT(*) FROM events WHERE kind = 'status' AND meter = ?1
           AND json_extract(data, '$.message') IS NOT NULL",
        meter,
    )
}

/// Publishes `n` QoS 1 messages back to back, then collects all `n` PUBACKs.
fn publish_burst(m: &mut RawMeter, topic: &str, payloads: &[String]) {
    for (i, p) in payloads.iter().enumerate() {
        m.publish(topic, p, QoS::AtLeastOnce, i as u16 + 1);
    }
    let mut acked = 0;
    while acked < payloads.len() {
        match m.recv() {
            Some(Packet::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("connection closed after {acked} PUBACKs"),
        }
    }
}

#[test]
fn a_flooding_meter_is_held_to_its_status_rate_and_its_excess_is_acknowledged_but_never_stored() {
    let mut gw = gateway("status_per_minute = 6\nstatus_burst = 5\n", "");
    gw.start();
    gw.add_meter("FLOOD1", SECRET);
    let mut m = gw.connect("FLOOD1", SECRET);
    let flood: Vec<String> = (0..200)
        .map(|i| status("FLOOD1", &format!("f{i}")))
        .collect();
    // Every QoS 1 publish is acknowledged, so a real meter never retries one forever.
    publish_burst(&mut m, "smartmeter/FLOOD1/status", &flood);

    // The burst got in (one more token at most: 6 a minute is one per 10 s); nothing else did.
    let stored = published_statuses(&gw, "FLOOD1");
    assert!((5..=6).contains(&stored), "{stored} status events stored");
    let limited = gw.metric(r#"umeme_mqtt_rejected_total{reason="rate_limited"}"#);
    assert!(limited >= 194.0, "{limited}");
    // Five warnings a minute per meter; the rest are counted, not logged.
    let warned = gw.log_text().matches("meter over its message rate").count();
    assert!(warned <= 5, "{warned} warnings logged");
    assert!(gw.metric("umeme_mqtt_warnings_suppressed_total") >= 190.0);
    // The count reaches the log when the session ends.
    m.disconnect();
    gw.wait_log("more warnings about this meter were suppressed");
}

#[test]
fn reconnecting_does_not_refill_a_meters_bucket() {
    let mut gw = gateway("status_per_minute = 1\nstatus_burst = 3\n", "");
    gw.start();
    gw.add_meter("FLOOD2", SECRET);
    for round in 0..3 {
        let mut m = gw.connect("FLOOD2", SECRET);
        let burst: Vec<String> = (0..3)
            .map(|i| status("FLOOD2", &format!("r{round}-{i}")))
            .collect();
        publish_burst(&mut m, "smartmeter/FLOOD2/status", &burst);
        m.disconnect();
    }
    assert_eq!(published_statuses(&gw, "FLOOD2"), 3);
}

#[test]
fn a_meter_over_its_report_rate_is_slowed_down_and_every_report_is_still_applied() {
    let mut gw = gateway("reports_per_minute = 600\nreport_burst = 3\n", "");
    gw.start();
    gw.add_meter("FLOOD3", SECRET);
    gw.simulate("FLOOD3", 100.0);
    let before = gw.balance_wh("FLOOD3");
    let mut m = gw.connect("FLOOD3", SECRET);
    // Baseline at 1000 Wh, then 19 reports of +10 Wh each, far over the burst of 3.
    let reports: Vec<String> = (1..=20)
        .map(|seq| v2_payload("FLOOD3", seq, 1000 + 10 * (u64::from(seq) - 1)))
        .collect();
    let started = std::time::Instant::now();
    publish_burst(&mut m, "smartmeter/FLOOD3/consumption", &reports);
    // 17 reports over the burst at 10 a second: read about 1.7 s later, none dropped, and each
    // PUBACK still followed its commit.
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_millis(1500), "{took:?}");
    assert_eq!(gw.balance_wh("FLOOD3"), before - 190);
    assert!(gw.metric("umeme_mqtt_reports_delayed_total") >= 16.0);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="rate_limited"}"#),
        0.0
    );
}

#[test]
fn default_limits_let_a_real_meter_replay_its_whole_outbox_after_an_outage() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("REAL1", SECRET);
    gw.simulate("REAL1", 100.0);
    let before = gw.balance_wh("REAL1");
    let mut m = gw.connect("REAL1", SECRET);
    // The ESP32 firmware keeps up to 96 unacknowledged reports and sends them all at once.
    let replay: Vec<String> = (1..=96)
        .map(|seq| v2_payload("REAL1", seq, 5000 + 7 * u64::from(seq - 1)))
        .collect();
    publish_burst(&mut m, "smartmeter/REAL1/consumption", &replay);
    assert_eq!(gw.balance_wh("REAL1"), before - 7 * 95);
    assert_eq!(gw.metric("umeme_mqtt_reports_delayed_total"), 0.0);
}

fn subscribe_many(m: &mut RawMeter, filters: &[String], pkid: u16) -> Vec<SubscribeReasonCode> {
    let mut s = Subscribe::new_many(
        filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
    );
    s.pkid = pkid;
    m.send(Packet::Subscribe(s));
    loop {
        match m.recv() {
            Some(Packet::SubAck(a)) => return a.return_codes,
            Some(_) => {}
            None => panic!("connection closed before SUBACK"),
        }
    }
}

#[test]
fn a_session_holds_at_most_sixteen_filters_and_the_rest_get_suback_failure() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("SUBS1", SECRET);
    let (mut m, _) = RawMeter::connect(gw.broker, "SUBS1", "SUBS1", SECRET, false, None);
    // 1000 filters in ten SUBSCRIBE packets (one must fit in broker.max_packet_bytes).
    let mut codes = Vec::new();
    for packet in 0..10 {
        let filters: Vec<String> = (0..100)
            .map(|i| format!("smartmeter/SUBS1/command/x{}", packet * 100 + i))
            .collect();
        codes.extend(subscribe_many(&mut m, &filters, 10 + packet));
    }
    let granted = codes
        .iter()
        .filter(|c| matches!(c, SubscribeReasonCode::Success(_)))
        .count();
    assert_eq!(granted, 16);
    assert!(codes[16..]
        .iter()
        .all(|c| *c == SubscribeReasonCode::Failure));
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="max_subscriptions"}"#),
        984.0
    );
    // Subscribing again to a filter it holds is no new filter.
    assert!(matches!(
        m.subscribe("smartmeter/SUBS1/command/x3", 2)[..],
        [SubscribeReasonCode::Success(_)]
    ));
    // A filter inside its own tree but longer than the limit is refused too.
    let long = format!("smartmeter/SUBS1/command/{}", "y".repeat(300));
    assert_eq!(m.subscribe(&long, 3), [SubscribeReasonCode::Failure]);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="filter_too_long"}"#),
        1.0
    );
    // After unsubscribing one, there is room for one.
    m.send(Packet::Unsubscribe(rumqttc::mqttbytes::v4::Unsubscribe {
        pkid: 4,
        topics: vec!["smartmeter/SUBS1/command/x0".into()],
    }));
    assert!(matches!(
        m.subscribe("smartmeter/SUBS1/command/#", 5)[..],
        [SubscribeReasonCode::Success(_)]
    ));
    assert_eq!(
        m.subscribe("smartmeter/SUBS1/command/z", 6),
        [SubscribeReasonCode::Failure]
    );
    // The persistent session kept its 16 filters, not 1000, and still gets its balance.
    drop(m);
    let (mut m, _) = RawMeter::connect(gw.broker, "SUBS1", "SUBS1", SECRET, false, None);
    gw.simulate("SUBS1", 10.0);
    m.next_publish("smartmeter/SUBS1/command/balance");
    assert_eq!(
        m.subscribe("smartmeter/SUBS1/command/z", 7),
        [SubscribeReasonCode::Failure]
    );
}

#[test]
fn control_characters_in_a_meters_topics_status_and_filters_cannot_forge_a_log_line() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("EVIL1", SECRET);
    let mut m = gw.connect("EVIL1", SECRET);
    let evil = "EVIL\n<3>FAKE LOG LINE";
    // An unknown own topic, a status value, a filter outside the meter's tree.
    m.publish_acked(&format!("smartmeter/EVIL1/x{evil}"), "{}", 1);
    m.publish_acked(
        "smartmeter/EVIL1/status",
        &format!(
            r#"{{"meterNo":"EVIL1","status":{}}}"#,
            serde_json::json!(evil)
        ),
        2,
    );
    assert_eq!(
        m.subscribe(&format!("other/{evil}"), 3),
        [SubscribeReasonCode::Failure]
    );
    // A foreign topic closes the connection, after its log line.
    m.publish(
        &format!("smartmeter/X{evil}/status"),
        "{}",
        QoS::AtLeastOnce,
        4,
    );
    assert!(m.recv().is_none(), "the connection is closed");
    gw.assert_log("publish outside the meter's own topic tree refused");

    let log = gw.log_text();
    for needle in [
        "publish to an unknown topic dropped",
        "meter payload refused",
        "subscription outside the meter's command tree refused",
        "publish outside the meter's own topic tree refused",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} line in:\n{log}"));
        assert!(line.contains(r"EVIL\n<3>FAKE LOG LINE"), "{line}");
    }
    assert!(
        !log.lines().any(|l| l.starts_with("<3>")),
        "a forged journal line:\n{log}"
    );
}

#[test]
fn the_disk_cap_drops_a_flooding_meters_telemetry_before_a_quiet_meters() {
    let mut gw = gateway(
        "status_per_minute = 6000000\nstatus_burst = 1000000\n",
        "[outbox]\nmax_bytes = \"256KiB\"\n[ledger]\ncommit_delay = \"0ms\"\n",
    );
    gw.start();
    gw.add_meter("QUIET1", SECRET);
    gw.add_meter("FLOOD4", SECRET);
    // The quiet meter's telemetry is the oldest: dropping oldest first would take it first.
    let mut quiet = gw.connect("QUIET1", SECRET);
    let q: Vec<String> = (0..20)
        .map(|i| status("QUIET1", &format!("q{i}")))
        .collect();
    publish_burst(&mut quiet, "smartmeter/QUIET1/status", &q);
    let mut flood = gw.connect("FLOOD4", SECRET);
    const FLOOD: u16 = 6000;
    let padding = "p".repeat(100);
    for i in 0..FLOOD {
        let body = status("FLOOD4", &format!("f{i}-{padding}"));
        flood.publish("smartmeter/FLOOD4/status", &body, QoS::AtMostOnce, 0);
    }
    flood.barrier("FLOOD4", 1);

    let outbox = eventually("housekeeping to bring the database under its cap", || {
        let (_, v) = gw.http("GET", "/api/outbox", None);
        (v["used_bytes"].as_i64().unwrap() <= 256 << 10 && v["dropped_total"].as_i64().unwrap() > 0)
            .then_some(v)
    });
    assert_eq!(published_statuses(&gw, "QUIET1"), 20, "{outbox}");
    let left = published_statuses(&gw, "FLOOD4");
    assert!(
        left < i64::from(FLOOD),
        "{left} of the flood left; {outbox}"
    );
}

#[test]
fn check_config_prints_the_meter_limits_an_operator_set() {
    let gw = gateway("status_per_minute = 12\nmax_subscriptions = 4\n", "");
    let out = gw.cli(&["check-config"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("meter limits: reports 60/min (burst 120), status 12/min (burst 30), 4 subscriptions of up to 256 bytes, 5 warnings/min"),
        "{text}"
    );
}

#[test]
fn the_disk_cap_finds_the_flooding_meter_among_many_without_reading_the_whole_table() {
    use umeme_gateway::meter::MeterId;
    use umeme_gateway::store;
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("g.db"), "site").unwrap();
    let flood = MeterId::parse("FLOOD5").unwrap();
    let quiet: Vec<MeterId> = (0..50)
        .map(|i| MeterId::parse(&format!("QUIET{i}")).unwrap())
        .collect();
    let data = serde_json::json!({"status": "online", "message": "x"});
    // 200,000 status events of one meter with 50 quiet meters' events spread among them.
    let tx = conn.transaction().unwrap();
    for i in 0..200_000 {
        if i % 1000 == 0 {
            for q in &quiet {
                store::append_event(&tx, "status", Some(q), i, &data).unwrap();
            }
        }
        store::append_event(&tx, "status", Some(&flood), i, &data).unwrap();
    }
    tx.commit().unwrap();
    let quiet_events = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM events WHERE meter <> 'FLOOD5'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let before = quiet_events(&conn);

    let started = std::time::Instant::now();
    let tx = conn.transaction().unwrap();
    let p = store::prune(&tx, &[], 0, 1, 20_000).unwrap();
    tx.commit().unwrap();
    let took = started.elapsed();
    println!("one housekeeping pass over 210,000 events: {took:?}, {p:?}");
    assert_eq!(p.dropped, 20_000);
    assert_eq!(
        quiet_events(&conn),
        before,
        "only the flooding meter lost events"
    );
}

#[test]
fn a_meter_reconnecting_to_repeat_a_refused_publish_logs_five_warnings_a_minute() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("LOUD1", SECRET);
    for i in 0..12 {
        let mut m = gw.connect("LOUD1", SECRET);
        m.publish("smartmeter/OTHER/status", "{}", QoS::AtLeastOnce, i + 1);
        assert!(m.recv().is_none(), "a foreign topic closes the connection");
    }
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="acl_publish"}"#),
        12.0
    );
    gw.wait_log("more warnings about this meter were suppressed");
    let warned = gw
        .log_text()
        .matches("publish outside the meter's own topic tree refused")
        .count();
    assert_eq!(warned, 5);
}
