//! The meter port before CONNACK, against the real binary: the original firmwares' exact
//! CONNECTs, legacy-anonymous meters, protocol versions and spec checks, per-IP limits,
//! failed-password backoff and what reaches the log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::{ConnectReturnCode, SubscribeReasonCode};

const SECRET: &str = "firmware-secret-55555";
const OTHER: [u8; 4] = [127, 0, 0, 2];

/// A gateway with meters 55555 and 66666 and `broker_keys` in a conf.d file.
fn gateway(broker_keys: &str) -> Gateway {
    let mut gw = Gateway::new("");
    if !broker_keys.is_empty() {
        let dir = gw.dir.path().join("conf.d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("50-test.toml"),
            format!("[broker]\n{broker_keys}\n"),
        )
        .unwrap();
    }
    gw.add_meter("55555", SECRET);
    gw.add_meter("66666", "firmware-secret-66666");
    gw.start();
    gw
}

fn tcp(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.broker).expect("connect to the broker")
}

/// The exact bytes `connect` gets back: the whole answer until the gateway closes.
fn answer_to(gw: &Gateway, connect: &[u8]) -> Vec<u8> {
    let mut s = tcp(gw);
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(connect).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the gateway closes the connection");
    out
}

fn code(gw: &Gateway, connect: &[u8]) -> Option<ConnectReturnCode> {
    RawMeter::connect_bytes(tcp(gw), connect).map(|(_, c)| c)
}

fn cli_ok(gw: &Gateway, args: &[&str]) -> (String, String) {
    let out = gw.cli(args);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{args:?}: {e}");
    (o, e)
}

#[test]
fn the_modified_firmwares_exact_connect_gets_connack_0_once_its_settings_name_the_meter() {
    let gw = gateway("");
    // As shipped (MQTT_USER = MQTT_PASS = ""): a meter that is not legacy-anonymous.
    let shipped = pubsubclient_connect("ESP32_METER_55555_3f2a", Some(("", "")));
    assert_eq!(
        code(&gw, &shipped),
        Some(ConnectReturnCode::BadUserNamePassword)
    );

    // Settings edited: MQTT_USER = the meter number, MQTT_PASS = its secret.
    let edited = pubsubclient_connect("ESP32_METER_55555_3f2a", Some(("55555", SECRET)));
    let (mut m, c) = RawMeter::connect_bytes(tcp(&gw), &edited).expect("CONNACK");
    assert_eq!(c, ConnectReturnCode::Success);
    assert_eq!(
        m.subscribe("smartmeter/55555/command/balance", 1),
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    m.publish_acked(
        "smartmeter/55555/consumption",
        &v2_payload("55555", 1, 0),
        7,
    );
    m.disconnect();

    // The forms name their meter: another meter's number in the client id is refused.
    let wrong = pubsubclient_connect("ESP32_METER_66666_3f2a", Some(("55555", SECRET)));
    assert_eq!(code(&gw, &wrong), Some(ConnectReturnCode::BadClientId));
    let clean_form = pubsubclient_connect("ESP32_55555_7", Some(("55555", SECRET)));
    assert_eq!(code(&gw, &clean_form), Some(ConnectReturnCode::Success));
}

#[test]
fn the_clean_firmwares_exact_connect_gets_connack_0_only_for_a_legacy_anonymous_meter() {
    let mut gw = Gateway::new("");
    gw.add_meter("55555", SECRET);
    gw.add_meter("66666", "firmware-secret-66666");
    let (_, warned) = cli_ok(
        &gw,
        &[
            "meter",
            "add",
            "77777",
            "--secret",
            "firmware-secret-77777",
            "--legacy-anonymous",
        ],
    );
    assert!(warned.contains("without credentials"), "{warned}");
    let (_, check) = cli_ok(&gw, &["check-config"]);
    assert!(
        check.contains("warning: meter 77777 accepts the original firmware's anonymous CONNECT"),
        "{check}"
    );
    gw.start();
    gw.assert_log("meter accepts the original firmware's anonymous CONNECT");

    let clean = pubsubclient_connect("ESP32_55555_b1", None);
    assert_eq!(
        code(&gw, &clean),
        Some(ConnectReturnCode::BadUserNamePassword)
    );

    let (_, warned) = cli_ok(
        &gw,
        &["meter", "set", "55555", "--legacy-anonymous", "true"],
    );
    assert!(warned.contains("anyone on the LAN"), "{warned}");
    let (shown, _) = cli_ok(&gw, &["meter", "show", "55555"]);
    assert!(
        shown.contains("legacy anon:    on (from any address)"),
        "{shown}"
    );
    assert_eq!(gw.meter("55555")["legacy_anonymous"], true);

    let (mut m, c) = RawMeter::connect_bytes(tcp(&gw), &clean).expect("CONNACK");
    assert_eq!(c, ConnectReturnCode::Success);
    // Confined to its own topics like any meter.
    assert_eq!(
        m.subscribe("smartmeter/66666/command/balance", 1),
        vec![SubscribeReasonCode::Failure]
    );
    m.publish(
        "smartmeter/66666/consumption",
        &v2_payload("66666", 1, 0),
        QoS::AtLeastOnce,
        1,
    );
    assert!(m.recv().is_none(), "a publish as another meter closes it");
    // The Modified firmware as shipped (empty user and password) is the same meter.
    let shipped = pubsubclient_connect("ESP32_METER_55555_ffff", Some(("", "")));
    assert_eq!(code(&gw, &shipped), Some(ConnectReturnCode::Success));

    // Pinned to another address: refused from this one, accepted from that one.
    cli_ok(
        &gw,
        &["meter", "set", "55555", "--legacy-source", "127.0.0.2"],
    );
    assert_eq!(code(&gw, &clean), Some(ConnectReturnCode::NotAuthorized));
    let from_pin = connect_from(OTHER, gw.broker).unwrap();
    let (m, c) = RawMeter::connect_bytes(from_pin, &clean).expect("CONNACK");
    assert_eq!(c, ConnectReturnCode::Success);

    // Opting out closes the anonymous session and refuses the next one.
    let mut m = m;
    cli_ok(
        &gw,
        &["meter", "set", "55555", "--legacy-anonymous", "false"],
    );
    assert!(m.recv().is_none(), "the opt-out ends the anonymous session");
    let from_pin = connect_from(OTHER, gw.broker).unwrap();
    let refused = RawMeter::connect_bytes(from_pin, &clean).map(|(_, c)| c);
    assert_eq!(refused, Some(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(
        gw.metric(r#"umeme_mqtt_connect_refused_total{reason="legacy_source"}"#),
        1.0
    );
}

#[test]
fn mqtt_3_1_and_mqtt_5_connects_get_connack_1_and_are_closed() {
    let gw = gateway("");
    // MQTT 5: level 5, then an empty property block before the client id.
    let v5 = [
        &[0x10, 15, 0, 4][..],
        b"MQTT",
        &[5, 0x02, 0, 60, 0, 0, 2],
        b"m1",
    ]
    .concat();
    // MQTT 3.1: protocol name "MQIsdp", level 3.
    let v31 = [
        &[0x10, 16, 0, 6][..],
        b"MQIsdp",
        &[3, 0x02, 0, 60, 0, 2],
        b"m1",
    ]
    .concat();
    for connect in [v5, v31] {
        assert_eq!(
            answer_to(&gw, &connect),
            [0x20, 0x02, 0x00, 0x01],
            "CONNACK 1 (unacceptable protocol version), then close"
        );
    }
    assert_eq!(
        gw.metric(r#"umeme_mqtt_connect_refused_total{reason="protocol_version"}"#),
        2.0
    );
}

#[test]
fn a_connect_with_the_reserved_flag_or_trailing_bytes_is_closed_without_connack() {
    let gw = gateway("");
    let good = pubsubclient_connect("55555", Some(("55555", SECRET)));
    let mut reserved = good.clone();
    reserved[9] |= 0x01;
    let mut trailing = good.clone();
    trailing[1] += 2;
    trailing.extend([0, 0]);
    for bad in [&reserved, &trailing] {
        assert_eq!(answer_to(&gw, bad), Vec::<u8>::new(), "closed, no CONNACK");
    }
    for reason in ["reserved_flag", "trailing_bytes"] {
        assert_eq!(
            gw.metric(&format!(
                r#"umeme_mqtt_connect_refused_total{{reason="{reason}"}}"#
            )),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(code(&gw, &good), Some(ConnectReturnCode::Success));
}

#[test]
fn idle_sockets_from_one_host_cannot_crowd_out_a_meter_and_their_refusals_are_logged_sparingly() {
    // Issue 14 item 2: 2,100 idle sockets let 1 of 18 real CONNECTs through.
    const IDLE: usize = 300;
    let gw = gateway("max_unauthenticated_per_ip = 4\nmax_connections = 100");
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| connect_from(OTHER, gw.broker).expect("idle socket"))
        .collect();
    let refused = r#"umeme_mqtt_connect_refused_total{reason="unauthenticated_per_ip"}"#;
    eventually("every idle socket past the cap refused", || {
        (gw.metric(refused) == (IDLE - 4) as f64).then_some(())
    });
    gw.connect("55555", SECRET).disconnect();

    let lines = gw
        .log_text()
        .lines()
        .filter(|l| l.contains("max_unauthenticated_per_ip reached"))
        .count();
    assert!(
        lines <= 20,
        "{lines} refusal lines for {} refusals",
        IDLE - 4
    );
    let suppressed = gw.metric("umeme_mqtt_refusal_logs_suppressed_total");
    assert_eq!(suppressed as usize + lines, IDLE - 4);
    drop(idle);
}

#[test]
fn a_wrong_password_storm_backs_off_without_locking_out_meters_that_know_their_secret() {
    let gw = gateway("");
    // 55555 has connected since the start: its secret is known good.
    gw.connect("55555", SECRET).disconnect();

    let wrong = pubsubclient_connect("55555", Some(("55555", "not-the-secret")));
    let codes: Vec<_> = (0..12)
        .map(|_| {
            let s = connect_from(OTHER, gw.broker).unwrap();
            RawMeter::connect_bytes(s, &wrong).map(|(_, c)| c)
        })
        .collect();
    assert!(codes[..3]
        .iter()
        .all(|c| *c == Some(ConnectReturnCode::BadUserNamePassword)));
    assert!(
        codes.contains(&Some(ConnectReturnCode::ServiceUnavailable)),
        "backing off: {codes:?}"
    );
    let checked = gw.metric(r#"umeme_mqtt_connect_refused_total{reason="bad_credentials"}"#);
    assert!(
        checked < 12.0,
        "{checked} of 12 attempts cost a password check"
    );
    // The storming address is backing off (longer with every attempt), even with a right
    // secret that is not yet known good.
    let s = connect_from(OTHER, gw.broker).unwrap();
    let right = pubsubclient_connect("66666", Some(("66666", "firmware-secret-66666")));
    assert_eq!(
        RawMeter::connect_bytes(s, &right).map(|(_, c)| c),
        Some(ConnectReturnCode::ServiceUnavailable),
        "refused without a password check"
    );

    // The meter under attack gets in with its known-good secret, and another meter from
    // another address is not slowed.
    gw.connect("55555", SECRET).disconnect();
    gw.connect("66666", "firmware-secret-66666").disconnect();
}

#[test]
fn control_characters_in_a_refused_client_id_are_escaped_in_the_log() {
    let gw = gateway("");
    let forged = "BAD\n<3>FORGED LINE\u{1b}[2J";
    let (mut m, c) = RawMeter::connect(gw.broker, forged, forged, "x-secret-1", true, None);
    assert_eq!(c, ConnectReturnCode::BadClientId);
    assert!(m.recv().is_none());
    gw.assert_log(r"BAD\n<3>FORGED LINE\u{1b}[2J");
    let log = gw.log_text();
    assert!(!log.lines().any(|l| l.starts_with("<3>FORGED")), "{log}");
    assert!(!log.contains('\u{1b}'));
}

#[test]
fn a_schema_2_database_is_upgraded_in_place_with_every_meter_credential_only() {
    use umeme_gateway::store;
    let mut gw = Gateway::new("");
    gw.add_meter("55555", SECRET);
    // Back to schema 2 as the previous release left it: no legacy columns.
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    db.execute_batch(
        "ALTER TABLE meters DROP COLUMN legacy_anonymous;
         ALTER TABLE meters DROP COLUMN legacy_source;
         ALTER TABLE meters DROP COLUMN main;
         ALTER TABLE meters DROP COLUMN tariff;
         ALTER TABLE meters DROP COLUMN money;
         UPDATE meta SET value = '2' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(db);
    // The CLI leaves the upgrade to the daemon.
    let out = gw.cli(&["meter", "set", "55555", "--legacy-anonymous", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("schema version 2 is older"));

    gw.start();
    gw.assert_log("upgrading the database from schema 2 to 3");
    assert_eq!(gw.meter("55555")["legacy_anonymous"], false);
    let clean = pubsubclient_connect("ESP32_55555_b1", None);
    assert_eq!(
        code(&gw, &clean),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    gw.connect("55555", SECRET).disconnect();
    cli_ok(
        &gw,
        &["meter", "set", "55555", "--legacy-anonymous", "true"],
    );
    assert_eq!(code(&gw, &clean), Some(ConnectReturnCode::Success));
    let conn = store::open_without_upgrade(&gw.db_path(), "test-site").unwrap();
    let version: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "6");
}

#[test]
fn meter_set_and_add_refuse_legacy_settings_they_cannot_apply() {
    let gw = Gateway::new("");
    gw.add_meter("55555", SECRET);
    for args in [
        &["meter", "set", "55555"][..],
        &["meter", "set", "55555", "--legacy-source", "not-an-address"],
        &["meter", "set", "55555", "--legacy-anonymous", "maybe"],
        &["meter", "add", "77777", "--legacy-source", "192.168.4.23"],
    ] {
        let out = gw.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = gw.cli(&["meter", "set", "99999", "--legacy-anonymous", "true"]);
    assert_eq!(out.status.code(), Some(1), "unknown meter");
    let (shown, _) = cli_ok(&gw, &["meter", "show", "55555"]);
    assert!(shown.contains("legacy anon:    off"), "{shown}");
    let (_, err) = cli_ok(&gw, &["meter", "list"]);
    assert!(!err.contains("warning"));
}

/// README and the style guide promise that `check-config` prints every listener's limits; the
/// meter port's limits before CONNACK were missing from its output.
#[test]
fn check_config_prints_the_meter_ports_limits_before_connack() {
    let gw = gateway(
        "max_connections = 500\nmax_unauthenticated_per_ip = 8\nconnect_timeout_ms = 2000\nmax_packet_bytes = 2048\nauth_backoff_max_ms = 30000\n",
    );
    let out = gw.cli(&["check-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let want = format!(
        "ok: meter port on {}: at most 500 connections, 8 per address before CONNACK, CONNECT within 2000 ms, packets up to 2048 bytes, password backoff up to 30000 ms",
        gw.broker
    );
    assert!(text.contains(&want), "want {want:?} in:\n{text}");
}
