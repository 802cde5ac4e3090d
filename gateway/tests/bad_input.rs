//! Hostile and broken input: each is refused with a log line and a counter, the daemon keeps
//! serving, and the ledger does not change.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;

const M: &str = "METER001";
const TOPIC: &str = "smartmeter/METER001/consumption";

fn gateway_with_meter() -> Gateway {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter(M, "meter-001-secret");
    gw.simulate(M, 100.0);
    gw
}

fn events(gw: &Gateway) -> i64 {
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    db.query_row(
        "SELECT COUNT(*) FROM events WHERE kind IN ('consumption', 'payment', 'alert')",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn malformed_wrong_typed_and_out_of_range_reports_are_acked_dropped_and_counted() {
    let gw = gateway_with_meter();
    let mut m = gw.connect(M, "meter-001-secret");
    // A v2 baseline first, so that a bad report would otherwise debit.
    m.publish_acked(TOPIC, &v2_payload(M, 1, 1000), 1);
    let (balance, stored) = (gw.balance_wh(M), events(&gw));

    let big = format!(
        r#"{{"meterNo":"METER001","pad":"{}","v":2,"seq":2,"energyWh":1001}}"#,
        "x".repeat(3000)
    );
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "malformed"),
        ("".into(), "malformed"),
        ("[1,2,3]".into(), "malformed"),
        (r#"{"v":2,"meterNo":"METER001","seq":"2","energyWh":1100}"#.into(), "malformed"),
        (r#"{"v":2,"meterNo":"METER001","seq":2,"energyWh":-5}"#.into(), "malformed"),
        (r#"{"v":2,"meterNo":"METER001","seq":2,"energyWh":1e300}"#.into(), "malformed"),
        (r#"{"v":2,"meterNo":"METER001","seq":2,"energyWh":9007199254740993}"#.into(), "out_of_range"),
        (r#"{"meterNo":"METER001","unitsConsumed":1,"remainingBalance":1,"totalConsumed":-1}"#.into(), "out_of_range"),
        (r#"{"meterNo":"METER001","unitsConsumed":1,"remainingBalance":1,"totalConsumed":1e308}"#.into(), "out_of_range"),
        (r#"{"v":7,"meterNo":"METER001","seq":2}"#.into(), "out_of_range"),
        (big, "oversize"),
    ];
    for (i, (payload, reason)) in cases.iter().enumerate() {
        let before = gw.metric(&format!(
            r#"umeme_mqtt_rejected_total{{reason="{reason}"}}"#
        ));
        m.publish_acked(TOPIC, payload, 10 + i as u16);
        let after = gw.metric(&format!(
            r#"umeme_mqtt_rejected_total{{reason="{reason}"}}"#
        ));
        assert_eq!(after, before + 1.0, "case {i} ({reason}) is counted");
    }
    // Non-UTF-8 bytes too.
    m.publish_with(
        TOPIC,
        &[0xff, 0xfe, 0x00, 0x7b],
        QoS::AtLeastOnce,
        40,
        false,
    );
    assert!(matches!(m.recv(), Some(Packet::PubAck(a)) if a.pkid == 40));

    // A jump of more than 1 MWh in one report is refused by the ledger.
    m.publish_acked(TOPIC, &v2_payload(M, 2, 5_000_000), 41);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="implausible"}"#),
        1.0
    );
    // Unknown topics inside the meter's own tree are dropped and counted.
    m.publish_acked("smartmeter/METER001/firmware", "{}", 42);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="unknown_topic"}"#),
        1.0
    );

    m.barrier(M, 43);
    assert_eq!(
        gw.balance_wh(M),
        balance,
        "no bad report changed the balance"
    );
    assert_eq!(events(&gw), stored, "no bad report became an event");
    gw.assert_log("meter payload refused");

    // The same connection still works: a good report debits.
    m.publish_acked(TOPIC, &v2_payload(M, 3, 1010), 44);
    assert_eq!(gw.balance_wh(M), balance - 10);
}

#[test]
fn oversize_packets_garbage_bytes_and_protocol_abuse_close_only_that_connection() {
    let gw = gateway_with_meter();
    let balance = gw.balance_wh(M);

    // A packet larger than broker.max_packet_bytes (4096).
    let mut m = gw.connect(M, "meter-001-secret");
    let huge = vec![b'{'; 10_000];
    m.publish_with(TOPIC, &huge, QoS::AtLeastOnce, 1, false);
    assert!(m.recv().is_none());
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="oversize_packet"}"#),
        1.0
    );

    // Garbage instead of CONNECT; a 4 GB remaining length; a CONNECT for MQTT 5; nothing at all.
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        &[0x30, 0x02, 0x00],
    ] {
        let mut s = TcpStream::connect(gw.broker).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    let mut c = rumqttc::mqttbytes::v4::Connect::new(M);
    c.protocol = rumqttc::mqttbytes::Protocol::V5;
    c.login = Some(rumqttc::mqttbytes::v4::Login::new(M, "meter-001-secret"));
    let mut out = bytes::BytesMut::new();
    Packet::Connect(c).write(&mut out, usize::MAX).unwrap();
    let mut s = TcpStream::connect(gw.broker).unwrap();
    s.write_all(&out).unwrap();
    let mut ack = [0u8; 4];
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.read_exact(&mut ack).unwrap();
    assert_eq!(
        ack,
        [0x20, 0x02, 0x00, 0x01],
        "CONNACK: unacceptable protocol version"
    );

    // QoS 2 and a second CONNECT are protocol violations for meters.
    let mut m = gw.connect(M, "meter-001-secret");
    m.publish(TOPIC, &v2_payload(M, 1, 1), QoS::ExactlyOnce, 5);
    assert!(m.recv().is_none());
    let mut m = gw.connect(M, "meter-001-secret");
    m.send(Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(M)));
    assert!(m.recv().is_none());

    // The daemon still serves meters and HTTP, and nothing was debited.
    let mut m = gw.connect(M, "meter-001-secret");
    m.barrier(M, 1);
    assert_eq!(gw.balance_wh(M), balance);
    let (status, _) = gw.http("GET", "/health", None);
    assert_eq!(status, 200);
}

#[test]
fn hostile_http_gets_json_errors_and_changes_nothing() {
    let gw = gateway_with_meter();
    let balance = gw.balance_wh(M);
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/daraja/simulate", Some("{nope"), 400),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER001"}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER001","amount":-5}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER001","amount":"abc"}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER001","amount":1e300}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER001","amount":0.001}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"../etc","amount":5}"#),
            400,
        ),
        (
            "POST",
            "/daraja/simulate",
            Some(r#"{"meter_no":"METER404","amount":5}"#),
            404,
        ),
        ("GET", "/api/meters/METER404", None, 404),
        ("GET", "/api/meters/bad%20id", None, 400),
        (
            "POST",
            "/api/meters",
            Some(r#"{"id":"X1","secret":"short"}"#),
            400,
        ),
        (
            "POST",
            "/api/meters",
            Some(r#"{"id":"X1","unknown":1}"#),
            400,
        ),
        ("DELETE", "/api/meters", None, 405),
        ("GET", "/nowhere", None, 404),
    ];
    for (method, path, body, want) in cases {
        let (status, v) = gw.http(method, path, *body);
        assert_eq!(status, *want, "{method} {path} {body:?}: {v}");
        assert!(
            v["error"].is_string(),
            "{method} {path}: JSON error body, got {v}"
        );
    }
    let huge = format!(
        r#"{{"meter_no":"METER001","amount":5,"x":"{}"}}"#,
        "a".repeat(100_000)
    );
    let (status, _) = gw.http("POST", "/daraja/simulate", Some(&huge));
    assert_eq!(status, 413);
    assert_eq!(gw.balance_wh(M), balance);
    assert!(gw.metric(r#"umeme_http_rejected_total{reason="bad_json"}"#) >= 2.0);
    assert!(gw.metric(r#"umeme_http_rejected_total{reason="bad_amount"}"#) >= 4.0);
}
