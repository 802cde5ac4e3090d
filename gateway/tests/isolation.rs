//! Per-meter security: one tenant's meter can never touch another's balance or read its
//! commands, and only provisioned meters with their own secret get in.

mod common;

use common::*;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use rumqttc::{ConnectReturnCode, SubscribeReasonCode};

fn two_meters() -> Gateway {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", "secret-one-111");
    gw.add_meter("METER002", "secret-two-222");
    gw.simulate("METER001", 100.0);
    gw
}

#[test]
fn a_meter_publishing_on_another_meters_topics_is_disconnected_and_changes_nothing() {
    let gw = two_meters();
    let before = gw.balance_wh("METER001");
    let mut spoofer = gw.connect("METER002", "secret-two-222");
    // Even with the victim's number in the payload.
    let forged = v1_payload("METER001", 3.0, 2.0);
    spoofer.publish(
        "smartmeter/METER001/consumption",
        &forged,
        QoS::AtLeastOnce,
        7,
    );
    assert!(
        spoofer.recv().is_none(),
        "the spoofing connection is closed without a PUBACK"
    );
    for topic in [
        "smartmeter/METER001/status",
        "smartmeter/METER001/command/balance",
        "other/METER001/consumption",
    ] {
        let mut m = gw.connect("METER002", "secret-two-222");
        m.publish(topic, r#"{"status":"offline"}"#, QoS::AtMostOnce, 0);
        assert!(
            m.recv().is_none(),
            "publish to {topic} closes the connection"
        );
    }
    assert_eq!(gw.balance_wh("METER001"), before);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="acl_publish"}"#),
        4.0
    );
    gw.assert_log("publish outside the meter's own topic tree refused");

    // Its own topic with the victim's number inside the payload is refused too.
    let mut m = gw.connect("METER002", "secret-two-222");
    m.publish_acked("smartmeter/METER002/consumption", &forged, 9);
    m.barrier("METER002", 10);
    assert_eq!(gw.balance_wh("METER001"), before);
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="meter_mismatch"}"#),
        1.0
    );
}

#[test]
fn a_meter_cannot_subscribe_to_another_meters_commands() {
    let gw = two_meters();
    let mut snoop = gw.connect("METER002", "secret-two-222");
    let codes = snoop.subscribe("smartmeter/METER001/command/#", 1);
    assert_eq!(codes, [SubscribeReasonCode::Failure]);
    for filter in [
        "#",
        "smartmeter/+/command/balance",
        "smartmeter/#",
        "smartmeter/METER002/consumption",
        "$SYS/#",
    ] {
        assert_eq!(
            snoop.subscribe(filter, 2),
            [SubscribeReasonCode::Failure],
            "{filter}"
        );
    }
    assert_eq!(
        snoop.subscribe("smartmeter/METER002/command/+", 3),
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let own_initial = snoop.next_publish("smartmeter/METER002/command/balance");
    assert_eq!(balance_json(&own_initial)["balance"], 0.0);

    // A payment to METER001, then one to METER002: the snoop sees only its own.
    gw.simulate("METER001", 20.0);
    gw.simulate("METER002", 10.0);
    match snoop.recv() {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, "smartmeter/METER002/command/balance");
            assert_eq!(balance_json(&p)["balance"], 0.5);
        }
        other => panic!("expected METER002's own balance, got {other:?}"),
    }
    assert_eq!(
        gw.metric(r#"umeme_mqtt_rejected_total{reason="acl_subscribe"}"#),
        6.0
    );
}

#[test]
fn bad_credentials_unknown_meters_and_mismatched_client_ids_are_refused() {
    let gw = two_meters();
    let cases = [
        (
            "METER001",
            "METER001",
            "wrong-password",
            ConnectReturnCode::BadUserNamePassword,
            "bad_credentials",
        ),
        (
            "METER009",
            "METER009",
            "secret-one-111",
            ConnectReturnCode::BadUserNamePassword,
            "bad_credentials",
        ),
        (
            "METER002",
            "METER001",
            "secret-one-111",
            ConnectReturnCode::BadClientId,
            "client_id_mismatch",
        ),
        (
            "bad/id",
            "bad/id",
            "secret-one-111",
            ConnectReturnCode::BadClientId,
            "bad_client_id",
        ),
    ];
    for (client, user, pass, code, _) in cases {
        let (mut m, got) = RawMeter::connect(gw.broker, client, user, pass, true, None);
        assert_eq!(got, code, "{client}/{user}");
        assert!(m.recv().is_none(), "the refused connection is closed");
    }
    assert_eq!(
        gw.metric(r#"umeme_mqtt_connect_refused_total{reason="bad_credentials"}"#),
        2.0
    );
    assert_eq!(
        gw.metric(r#"umeme_mqtt_connect_refused_total{reason="client_id_mismatch"}"#),
        1.0
    );

    // A Last Will on another meter's topic is refused at CONNECT.
    let (_, got) = RawMeter::connect(
        gw.broker,
        "METER002",
        "METER002",
        "secret-two-222",
        true,
        Some(("smartmeter/METER001/status", "offline")),
    );
    assert_eq!(got, ConnectReturnCode::NotAuthorized);

    // The right secret still works after all that.
    gw.connect("METER001", "secret-one-111").disconnect();
}

#[test]
fn a_second_connection_with_the_same_meter_takes_over_and_the_will_reports_offline() {
    let gw = two_meters();
    let (mut first, code) = RawMeter::connect(
        gw.broker,
        "METER001",
        "METER001",
        "secret-one-111",
        true,
        Some(("smartmeter/METER001/status", "offline")),
    );
    assert_eq!(code, ConnectReturnCode::Success);
    let second = gw.connect("METER001", "secret-one-111");
    assert!(
        first.recv().is_none(),
        "the older connection is closed on takeover"
    );
    eventually("the new session to mark the meter online", || {
        (gw.meter("METER001")["status"] == "online").then_some(())
    });
    // Dropping the socket without DISCONNECT publishes the Will.
    drop(second);
    eventually("the Will to mark the meter offline", || {
        (gw.meter("METER001")["status"] == "offline").then_some(())
    });
}
