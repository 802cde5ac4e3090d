//! The firmware's MQTT path, byte for byte: meter-core's MQTT 3.1.1 codec and `Meter` (what
//! `esp32c3/src/session.rs` runs) against the real gateway over TCP. The board itself cannot run
//! here; this checks everything it says to the gateway and everything it makes of the answers.

mod common;

use std::time::Duration;

use common::{alerts, gateway, gateway_with, SECRET};
use meter_core::meter::{Applied, MeterCommandError};
use meter_core::mqtt::{self, Connect, Incoming, QoS};
use meter_core::{Meter, MeterConfig, Relay};
use meter_sim::api::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ID: &str = "SIM0001";
const WAIT: Duration = Duration::from_secs(15);

/// One firmware-style MQTT session: a socket and a receive buffer.
struct Session {
    socket: TcpStream,
    buf: Vec<u8>,
}

/// A packet read from the broker, owned.
#[derive(Debug)]
enum Got {
    ConnAck(u8),
    SubAck(u8),
    PubAck(u16),
    Publish {
        topic: String,
        payload: Vec<u8>,
        pkid: Option<u16>,
    },
    Other,
}

impl Session {
    async fn open(gw: std::net::SocketAddr, password: &str) -> (Session, u8) {
        let socket = TcpStream::connect(gw).await.expect("connect");
        let mut s = Session {
            socket,
            buf: Vec::new(),
        };
        let mut out = [0u8; 256];
        let n = mqtt::connect(
            &mut out,
            &Connect {
                client_id: ID,
                username: ID,
                password: password.as_bytes(),
                keep_alive_s: 60,
                clean_session: true,
                will: Some(("smartmeter/SIM0001/status", b"offline")),
            },
        )
        .unwrap();
        s.send(&out[..n]).await;
        let code = match s.next().await {
            Some(Got::ConnAck(code)) => code,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (s, code)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("write");
    }

    /// The next packet; `None` when the gateway closed the connection.
    async fn next(&mut self) -> Option<Got> {
        // Bounded: each pass reads at least one byte or ends.
        for _ in 0..4096 {
            if let Some((p, used)) = mqtt::decode(&self.buf, 4096).expect("well-formed packet") {
                let got = match p {
                    Incoming::ConnAck { code, .. } => Got::ConnAck(code),
                    Incoming::SubAck { granted, .. } => Got::SubAck(granted),
                    Incoming::PubAck { pkid } => Got::PubAck(pkid),
                    Incoming::Publish {
                        topic,
                        payload,
                        pkid,
                        ..
                    } => Got::Publish {
                        topic: topic.to_string(),
                        payload: payload.to_vec(),
                        pkid,
                    },
                    _ => Got::Other,
                };
                self.buf.drain(..used);
                return Some(got);
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, self.socket.read(&mut chunk))
                .await
                .expect("gateway answers in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        panic!("no complete packet in 4096 reads");
    }

    /// Hands a command to the meter as the firmware does, PUBACKing QoS 1.
    async fn command(
        &mut self,
        meter: &mut Meter<16>,
        topic: &str,
        payload: &[u8],
        pkid: Option<u16>,
    ) -> Result<Applied, MeterCommandError> {
        let leaf = topic
            .strip_prefix("smartmeter/SIM0001/command/")
            .expect("a command topic of this meter");
        let r = meter.on_command(leaf, payload);
        if let Some(pkid) = pkid {
            let mut out = [0u8; 8];
            let n = mqtt::puback(&mut out, pkid).unwrap();
            self.send(&out[..n]).await;
        }
        r
    }

    /// Sends every queued report QoS 1 and handles packets until all are PUBACKed.
    async fn flush(&mut self, meter: &mut Meter<16>, pkid: &mut u16) -> Vec<Vec<u8>> {
        let mut in_flight = Vec::new();
        while let Some(r) = meter.next_to_send() {
            let mut json = [0u8; 256];
            let len = r.encode_v2(ID, &mut json).unwrap();
            *pkid += 1;
            let mut out = [0u8; 512];
            let n = mqtt::publish(
                &mut out,
                "smartmeter/SIM0001/consumption",
                &json[..len],
                QoS::AtLeastOnce,
                false,
                *pkid,
                false,
            )
            .unwrap();
            self.send(&out[..n]).await;
            in_flight.push((*pkid, r.seq));
        }
        let mut commands = Vec::new();
        while !in_flight.is_empty() {
            match self.next().await.expect("connection open") {
                Got::PubAck(p) => {
                    let i = in_flight
                        .iter()
                        .position(|(q, _)| *q == p)
                        .expect("known pkid");
                    let (_, seq) = in_flight.remove(i);
                    // False when a balance command's ackSeq already confirmed it.
                    meter.on_puback(seq);
                }
                Got::Publish {
                    topic,
                    payload,
                    pkid,
                } => {
                    self.command(meter, &topic, &payload, pkid)
                        .await
                        .expect("command applies");
                    commands.push(payload);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        commands
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_codec_and_meter_agree_with_the_gateway() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway(&dir, 1).await;
    let api = Api { addr: gw.api_addr };

    // A wrong secret is refused with CONNACK 4 or 5.
    let (_, code) = Session::open(gw.broker_addr.expect("plain port"), "not-the-secret").await;
    assert!(code == 4 || code == 5, "refused: {code}");

    let credited = api.credit(ID, 100.0).await.expect("credit");
    assert_eq!(credited, 5000, "100 KES at 0.05 units/KES");

    let (mut s, code) = Session::open(gw.broker_addr.expect("plain port"), SECRET).await;
    assert_eq!(code, 0);
    let mut out = [0u8; 128];
    let n = mqtt::subscribe(
        &mut out,
        1,
        "smartmeter/SIM0001/command/#",
        QoS::AtLeastOnce,
    )
    .unwrap();
    s.send(&out[..n]).await;
    let mut meter: Meter<16> = Meter::new(MeterConfig::default());
    meter.on_connected();
    // SUBACK, then the retained balance (before any v2 report: no ackSeq).
    let mut got_balance = false;
    while !got_balance {
        match s.next().await.expect("open") {
            Got::SubAck(granted) => assert!(granted <= 1),
            Got::Publish {
                topic,
                payload,
                pkid,
            } => {
                s.command(&mut meter, &topic, &payload, pkid)
                    .await
                    .expect("balance applies");
                got_balance = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(meter.balance_wh(), Some(5000));
    assert_eq!(meter.relay(), Relay::On);

    // Baseline report, then 2 kW for 30 minutes in 1-minute samples, reported every 10.
    let mut pkid = 10u16;
    meter.report(1);
    s.flush(&mut meter, &mut pkid).await;
    let mut commands = Vec::new();
    for minute in 1..=30u64 {
        meter.measure(8_696, 60_000);
        if minute % 10 == 0 {
            meter.report(minute);
            commands.extend(s.flush(&mut meter, &mut pkid).await);
        }
    }
    let used = meter.energy_wh() as i64;
    assert!((990..=1000).contains(&used), "{used} Wh");

    // The balance command for the last debit may trail its PUBACK: wait for it (bounded).
    let gw_balance = || async { api.meters().await.expect("meters")[ID].clone() };
    let g = gw_balance().await;
    while meter.ledger_seq() != Some(g.ledger_seq) {
        match s.next().await.expect("open") {
            Got::Publish {
                topic,
                payload,
                pkid,
            } => {
                s.command(&mut meter, &topic, &payload, pkid)
                    .await
                    .expect("applies");
                commands.push(payload);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(g.balance_wh, 5000 - used);
    assert_eq!(meter.balance_wh(), Some(g.balance_wh));
    assert_eq!(g.ack_seq, Some(meter.next_seq() - 1));
    assert!(meter.outbox().is_empty());

    // An old balance command, delivered late, changes nothing.
    let old = commands
        .first()
        .expect("a balance command during the run")
        .clone();
    let r = s
        .command(&mut meter, "smartmeter/SIM0001/command/balance", &old, None)
        .await;
    assert!(matches!(r, Err(MeterCommandError::Stale(_))), "{r:?}");
    assert_eq!(meter.balance_wh(), Some(g.balance_wh));

    let n = mqtt::disconnect(&mut out).unwrap();
    s.send(&out[..n]).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firmware_applies_the_gateways_limits_and_its_trip_status_becomes_an_alert() {
    let dir = tempfile::tempdir().expect("temp dir");
    let limits = "[limits]\npower_cap_w = 1500\ntrip_after_s = 2\nmax_trips = 1\n";
    let gw = gateway_with(&dir, 1, limits).await;
    let api = Api { addr: gw.api_addr };
    api.credit(ID, 100.0).await.expect("credit");
    let (mut s, code) = Session::open(gw.broker_addr.expect("plain port"), SECRET).await;
    assert_eq!(code, 0);
    let mut out = [0u8; 256];
    let n = mqtt::subscribe(
        &mut out,
        1,
        "smartmeter/SIM0001/command/#",
        QoS::AtLeastOnce,
    )
    .unwrap();
    s.send(&out[..n]).await;
    let mut meter: Meter<16> = Meter::new(MeterConfig::default());
    // The retained balance, then the config, both as the board hands them to meter-core.
    let mut got = Vec::new();
    while got.len() < 2 {
        match s.next().await.expect("open") {
            Got::SubAck(granted) => assert!(granted <= 1),
            Got::Publish {
                topic,
                payload,
                pkid,
            } => got.push(s.command(&mut meter, &topic, &payload, pkid).await),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(got[0], Ok(Applied::Balance { .. })), "{got:?}");
    assert_eq!(got[1], Ok(Applied::Config { changed: true }));
    assert_eq!(meter.settings().power.cap_w, 1500);
    assert_eq!(meter.settings().utc_offset_min, 180);
    assert!(
        meter.clock_ms().is_some(),
        "the balance command carried the time"
    );

    // 2 kW for 2 s: trip, and with max_trips = 1 the relay stays off.
    meter.measure(8_696, 1000);
    assert_eq!(meter.relay(), Relay::On);
    meter.measure(8_696, 1000);
    assert_eq!(meter.relay(), Relay::Off);
    let trip = meter.take_trip().expect("a trip to report");
    assert!(trip.locked_out);
    let mut json = [0u8; meter_core::limits::max_trip_status_len(7)];
    let len = trip
        .encode_status(ID, 1_764_230_400_123, &mut json)
        .unwrap();
    let n = mqtt::publish(
        &mut out,
        "smartmeter/SIM0001/status",
        &json[..len],
        QoS::AtLeastOnce,
        false,
        20,
        false,
    )
    .unwrap();
    s.send(&out[..n]).await;
    loop {
        match s.next().await.expect("open") {
            Got::PubAck(20) => break,
            Got::Publish { .. } | Got::PubAck(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // PUBACK follows the commit.
    assert_eq!(
        alerts(&dir),
        [("SIM0001".to_string(), "power_lockout".to_string())]
    );
    gw.stop().await;
}
