//! The original Umeme scenario, end to end: provision, pay through the original backend's
//! `/daraja/simulate`, and debit with the original Arduino firmware's payloads.

mod common;

use std::process::Command;

use common::*;
use rumqttc::mqttbytes::QoS;

const M: &str = "METER001";
const SECRET: &str = "meter-001-secret";
const BALANCE: &str = "smartmeter/METER001/command/balance";
const CONSUMPTION: &str = "smartmeter/METER001/consumption";

#[test]
fn payment_reaches_the_meter_and_v1_reports_debit_once_across_repeats_restarts_and_reboots() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter(M, SECRET);

    let mut meter = gw.connect(M, SECRET);
    let granted = meter.subscribe("smartmeter/METER001/command/#", 1);
    assert_eq!(
        granted,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let initial = meter.next_publish(BALANCE);
    assert!(
        initial.retain,
        "the balance at subscription is sent as a retained message"
    );
    assert_eq!(balance_json(&initial)["balance"], 0.0);
    assert_eq!(balance_json(&initial)["relay"], "off");

    let paid = gw.simulate(M, 100.0);
    assert_eq!(paid["balance"], 5.0);
    let cmd = balance_json(&meter.next_publish(BALANCE));
    assert_eq!(cmd["balance"], 5.0);
    assert_eq!(cmd["balanceWh"], 5000);
    assert_eq!(cmd["relay"], "on");

    // The original firmware publishes QoS 0 with retain set.
    let report = v1_payload(M, 0.04, 4.96);
    meter.publish_with(CONSUMPTION, report.as_bytes(), QoS::AtMostOnce, 0, true);
    let cmd = balance_json(&meter.next_publish(BALANCE));
    assert_eq!(cmd["balance"], 4.96);
    assert_eq!(gw.balance_wh(M), 4960);

    // The same message again (a retained copy or a repeat) debits nothing.
    meter.publish_with(CONSUMPTION, report.as_bytes(), QoS::AtMostOnce, 0, true);
    meter.barrier(M, 2);
    assert_eq!(gw.balance_wh(M), 4960);
    meter.disconnect();

    // After a gateway restart the retained copy comes in again: still nothing more.
    gw.kill();
    gw.start();
    let mut meter = gw.connect(M, SECRET);
    meter.subscribe("smartmeter/METER001/command/balance", 3);
    assert_eq!(
        balance_json(&meter.next_publish(BALANCE))["balance"],
        4.96,
        "balance survives the restart"
    );
    meter.publish_with(CONSUMPTION, report.as_bytes(), QoS::AtMostOnce, 0, true);
    meter.barrier(M, 4);
    assert_eq!(gw.balance_wh(M), 4960);

    // More consumption, then a reboot: totalConsumed restarts from 0.
    meter.publish_with(
        CONSUMPTION,
        v1_payload(M, 0.1, 4.9).as_bytes(),
        QoS::AtMostOnce,
        0,
        true,
    );
    assert_eq!(balance_json(&meter.next_publish(BALANCE))["balance"], 4.9);
    meter.publish_with(
        CONSUMPTION,
        v1_payload(M, 0.03, 4.87).as_bytes(),
        QoS::AtMostOnce,
        0,
        true,
    );
    assert_eq!(balance_json(&meter.next_publish(BALANCE))["balance"], 4.87);
    assert_eq!(gw.balance_wh(M), 4870);
    let row = gw.meter(M);
    assert_eq!(row["total_consumed_wh"], 130);

    // Payments are listed per meter, and the event log holds every change.
    let (status, payments) = gw.http("GET", "/api/meters/METER001/payments", None);
    assert_eq!(status, 200);
    assert_eq!(payments["payments"].as_array().unwrap().len(), 1);
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let kinds: Vec<String> = db
        .prepare("SELECT kind FROM events WHERE kind IN ('payment', 'consumption') ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        kinds,
        ["payment", "consumption", "consumption", "consumption"]
    );
}

#[test]
fn mosquitto_clients_drive_the_gateway_like_the_original_firmware() {
    let sub = require_tool("mosquitto_sub");
    let publ = require_tool("mosquitto_pub");
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter(M, SECRET);
    let port = gw.broker.port().to_string();
    let common = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-i",
        M,
        "-u",
        M,
        "-P",
        SECRET,
        "-V",
        "mqttv311",
    ];
    // mosquitto_sub prints the first N messages and exits; the gateway's retained balance
    // arrives first, so -C 2 collects it and the command the payment causes.
    let listener = Command::new(&sub)
        .args(common)
        .args([
            "-t",
            "smartmeter/METER001/command/balance",
            "-q",
            "1",
            "-C",
            "2",
            "-W",
            "15",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("mosquitto_sub to connect", || {
        gw.meter(M)["connected"].as_bool().filter(|c| *c)
    });
    gw.simulate(M, 100.0);
    let out = listener.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["balance"], 5.0);

    let report = v1_payload(M, 0.04, 4.96);
    for _ in 0..2 {
        let st = Command::new(&publ)
            .args(common)
            .args(["-t", CONSUMPTION, "-q", "0", "-r", "-m", &report])
            .status()
            .unwrap();
        assert!(st.success());
    }
    eventually("the v1 debit", || (gw.balance_wh(M) == 4960).then_some(()));
    let out = Command::new(&sub)
        .args(common)
        .args([
            "-t",
            "smartmeter/METER001/command/#",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "15",
            "-v",
        ])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.starts_with(BALANCE), "{line}");
    let cmd: serde_json::Value =
        serde_json::from_str(line.split_once(' ').unwrap().1.trim()).unwrap();
    assert_eq!(
        cmd["balance"], 4.96,
        "two identical retained reports debit once"
    );

    // A wrong password is refused with the MQTT return code, not a silent close.
    let out = Command::new(&publ)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            M,
            "-u",
            M,
            "-P",
            "wrong-password",
            "-t",
            CONSUMPTION,
            "-m",
            &report,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("bad user name or password") || err.contains("not authorised"),
        "{err}"
    );
}

#[test]
fn v2_meter_on_rumqttc_gets_pubacks_after_commit_and_ack_seq_in_balance_commands() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("V2METER", "v2-meter-secret");
    gw.simulate("V2METER", 50.0); // 2.5 units

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
        let mut o = MqttOptions::new("V2METER", "127.0.0.1", gw.broker.port());
        o.set_credentials("V2METER", "v2-meter-secret");
        o.set_keep_alive(std::time::Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(o, 16);
        client
            .subscribe("smartmeter/V2METER/command/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut sent = 0u32;
        let mut acked = 0u32;
        let mut last_cmd = serde_json::Value::Null;
        let deadline = tokio::time::Instant::now() + WAIT;
        while acked < 5 || last_cmd["ackSeq"] != 5 {
            let e = tokio::time::timeout_at(deadline, ev.poll())
                .await
                .expect("v2 flow timed out")
                .unwrap();
            match e {
                Event::Incoming(Packet::SubAck(_)) | Event::Incoming(Packet::PubAck(_)) => {
                    if matches!(e, Event::Incoming(Packet::PubAck(_))) {
                        acked += 1;
                    }
                    if sent < 5 {
                        sent += 1;
                        let p = v2_payload("V2METER", sent, 1000 + 100 * u64::from(sent - 1));
                        client
                            .publish("smartmeter/V2METER/consumption", QoS::AtLeastOnce, false, p)
                            .await
                            .unwrap();
                    }
                }
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/command/balance") => {
                    last_cmd = serde_json::from_slice(&p.payload).unwrap();
                }
                _ => {}
            }
        }
        // Report 1 is the baseline; 2..=5 debit 100 Wh each.
        assert_eq!(last_cmd["balanceWh"], 2500 - 400);
        assert_eq!(last_cmd["ledgerSeq"], 5);
    });
    assert_eq!(gw.meter("V2METER")["ack_seq"], 5);
}
