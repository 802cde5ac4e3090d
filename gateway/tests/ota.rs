//! Firmware updates over the air against the real binary: release keys and signed images at
//! the command line, rollouts over the CLI and the API, offers, chunks, status and the pause
//! rule over real MQTT, and 200 simulated meters (meter-core's OTA state machine on a
//! simulated two-slot board) taking a rollout with induced failures while they keep reporting.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use meter_core::ota::sim::make_image;
use meter_sim::ota::{Fault, OtaMeter, OtaMeterResult, FACTORY_VERSION};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use umeme_gateway::config::Tariff;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::store;
use umeme_gateway::writer::{apply_now, Credit, LedgerSettings, Op};

const SECRET: &str = "ota-test-secret-0001";
const NEW: &str = "1.1.0";

fn cli_ok(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_err(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.cli(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A release key made with `firmware keygen` in the test's folder: (key path, public hex).
fn keygen(gw: &Gateway) -> (PathBuf, String) {
    let key = gw.dir.path().join("release.key");
    cli_ok(gw, &["firmware", "keygen", "--out", key.to_str().unwrap()]);
    let public = std::fs::read_to_string(key.with_extension("key.pub")).unwrap();
    (key, public.trim().to_string())
}

/// Puts the public key into the configuration, as the operator does after keygen.
fn trust(gw: &Gateway, public: &str, extra: &str) {
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str(&format!(
        "\n[ota]\nrelease_public_key = \"{public}\"\n{extra}"
    ));
    std::fs::write(&gw.config, text).unwrap();
}

/// Signs and adds an image; returns its path.
fn add_image(gw: &Gateway, key: &Path, version: &str, image: &[u8]) -> PathBuf {
    let file = gw.dir.path().join(format!("fw-{version}.bin"));
    std::fs::write(&file, image).unwrap();
    let sig = cli_ok(
        gw,
        &[
            "firmware",
            "sign",
            file.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            version,
        ],
    );
    cli_ok(
        gw,
        &[
            "firmware",
            "add",
            file.to_str().unwrap(),
            "--version",
            version,
            "--signature",
            sig.trim(),
        ],
    );
    file
}

fn settings() -> LedgerSettings {
    LedgerSettings {
        rules: Rules { low_balance_wh: 0 },
        tariff: Tariff::try_from(0.05).unwrap(),
    }
}

/// Provisions meters straight into the database before the daemon starts (one argon2 hash
/// for all: the test is not about provisioning), each credited 100 KES (5,000 Wh).
fn provision(gw: &Gateway, ids: &[String]) {
    let mut conn = store::open(&gw.db_path(), "test-site").unwrap();
    let hash = umeme_gateway::auth::hash_secret(SECRET);
    for id in ids {
        let meter = MeterId::parse(id).unwrap();
        let add = Op::AddMeter {
            meter: meter.clone(),
            name: None,
            phone: None,
            secret_hash: hash.clone(),
            at: 1,
        };
        apply_now(&mut conn, &add, &settings()).unwrap();
        let credit = Op::Credit(Credit {
            meter,
            source: "manual".into(),
            reference: format!("OTA-{id}"),
            amount_cents: 10_000,
            at: 2,
            phone: None,
        });
        apply_now(&mut conn, &credit, &settings()).unwrap();
    }
}

fn ota_events(gw: &Gateway) -> Vec<(Option<String>, serde_json::Value)> {
    let conn = rusqlite::Connection::open(gw.db_path()).unwrap();
    let mut st = conn
        .prepare("SELECT meter, data FROM events WHERE kind = 'ota' ORDER BY seq")
        .unwrap();
    st.query_map([], |r| {
        Ok((
            r.get::<_, Option<String>>(0)?,
            serde_json::from_str(&r.get::<_, String>(1)?).unwrap(),
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[test]
fn keygen_sign_and_add_store_only_images_signed_by_the_configured_release_key() {
    let gw = Gateway::new("");
    let (key, public) = keygen(&gw);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the private key is the release manager's alone"
    );
    assert!(
        cli_err(&gw, &["firmware", "keygen", "--out", key.to_str().unwrap()]).contains("exists")
    );
    let data_key = gw.dir.path().join("data").join("release.key");
    assert!(cli_err(
        &gw,
        &["firmware", "keygen", "--out", data_key.to_str().unwrap()]
    )
    .contains("must not live in the data dir"));

    let image = make_image(NEW, 5000, 3);
    let file = gw.dir.path().join("fw.bin");
    std::fs::write(&file, &image).unwrap();
    let sign = |version: &str| {
        cli_ok(
            &gw,
            &[
                "firmware",
                "sign",
                file.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--version",
                version,
            ],
        )
        .trim()
        .to_string()
    };
    let sig = sign(NEW);
    assert_eq!(sig.len(), 128);
    let add = |version: &str, sig: &str| {
        gw.cli(&[
            "firmware",
            "add",
            file.to_str().unwrap(),
            "--version",
            version,
            "--signature",
            sig,
        ])
    };
    // No public key configured: nothing is trusted.
    let out = add(NEW, &sig);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("release_public_key is not set"));

    assert!(cli_ok(&gw, &["check-config"]).contains("no [ota] release_public_key"));
    trust(&gw, &public, "");
    let check = cli_ok(&gw, &["check-config"]);
    assert!(
        check.contains(&format!("release key {}…", &public[..16])),
        "{check}"
    );
    // Signed for another version: the version is inside the signature.
    let other = sign("9.9.9");
    let out = add(NEW, &other);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not verify"));
    // Another key's signature.
    let key2 = gw.dir.path().join("other.key");
    cli_ok(
        &gw,
        &["firmware", "keygen", "--out", key2.to_str().unwrap()],
    );
    let foreign = cli_ok(
        &gw,
        &[
            "firmware",
            "sign",
            file.to_str().unwrap(),
            "--key",
            key2.to_str().unwrap(),
            "--version",
            NEW,
        ],
    );
    assert!(!add(NEW, foreign.trim()).status.success());
    // A changed byte.
    let mut changed = image.clone();
    changed[100] ^= 1;
    std::fs::write(&file, &changed).unwrap();
    assert!(!add(NEW, &sig).status.success());
    assert!(cli_ok(&gw, &["firmware", "list"]).contains("no firmware stored"));

    std::fs::write(&file, &image).unwrap();
    let out = add(NEW, &sig);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored: Vec<_> = std::fs::read_dir(gw.dir.path().join("data/firmware"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let name = stored[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with(&format!("{NEW}-")), "{name}");
    assert_eq!(std::fs::read(&stored[0]).unwrap(), image);
    let list = cli_ok(&gw, &["firmware", "list"]);
    assert!(list.contains(NEW) && list.contains("5000 bytes"), "{list}");
    assert!(String::from_utf8_lossy(&add(NEW, &sig).stderr).contains("exists already"));
}

#[test]
fn a_schema_3_database_is_upgraded_in_place_to_schema_6_by_the_daemon() {
    let mut gw = Gateway::new("");
    gw.add_meter("M1", SECRET);
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    db.execute_batch(
        // Schema 3 had neither the OTA tables nor the later meter columns.
        "DROP TABLE firmware; DROP TABLE ota_rollouts; DROP TABLE ota_meters;
         ALTER TABLE meters DROP COLUMN tariff;
         ALTER TABLE meters DROP COLUMN money;
         ALTER TABLE meters DROP COLUMN main;
         UPDATE meta SET value = '3' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(db);
    assert!(cli_err(&gw, &["firmware", "list"]).contains("schema version 3 is older"));
    gw.start();
    gw.assert_log("upgrading the database to schema 6");
    assert!(cli_ok(&gw, &["firmware", "list"]).contains("no firmware stored"));
    assert_eq!(gw.meter("M1")["id"], "M1", "the meters are still there");
}

/// One meter driven by hand over raw MQTT: what the gateway sends at each step.
#[test]
fn a_rollout_is_offered_on_subscribe_served_in_chunks_and_paused_when_too_many_fail() {
    let mut gw = Gateway::new("");
    let (key, public) = keygen(&gw);
    trust(&gw, &public, "chunk_size = 256\n");
    for m in ["M1", "M2", "M3"] {
        gw.add_meter(m, SECRET);
    }
    let image = make_image(NEW, 1000, 5);
    add_image(&gw, &key, NEW, &image);
    gw.start();
    // Rollout from the CLI: the daemon finds it in the database.
    let out = cli_ok(
        &gw,
        &[
            "firmware",
            "rollout",
            "--version",
            NEW,
            "--meters",
            "M1,M2",
            "--max-failure-percent",
            "40",
        ],
    );
    assert!(out.contains("rollout 1"), "{out}");

    let mut m1 = gw.connect("M1", SECRET);
    m1.subscribe("smartmeter/M1/command/#", 1);
    let offer = m1.next_publish("smartmeter/M1/command/ota");
    let o: serde_json::Value = serde_json::from_slice(&offer.payload).unwrap();
    assert_eq!(o["version"], NEW);
    assert_eq!(o["size"], 1000);
    assert_eq!(o["chunkSize"], 256);
    assert_eq!(o["rollout"], 1);
    assert_eq!(o["signature"].as_str().unwrap().len(), 128);

    // A chunk: 8-byte header, then the bytes.
    m1.publish(
        "smartmeter/M1/ota/request",
        &format!(r#"{{"version":"{NEW}","offset":256,"len":256}}"#),
        QoS::AtMostOnce,
        0,
    );
    let c = m1.next_publish("smartmeter/M1/command/ota/chunk");
    assert_eq!(c.qos, QoS::AtMostOnce);
    assert_eq!(&c.payload[..8], &[0, 0, 1, 0, 1, 0, 0, 0]);
    assert_eq!(&c.payload[8..], &image[256..512]);
    // Past the end, larger than chunkSize, or another version: no offer (code 2).
    for req in [
        format!(r#"{{"version":"{NEW}","offset":900,"len":200}}"#),
        format!(r#"{{"version":"{NEW}","offset":0,"len":512}}"#),
        r#"{"version":"0.9","offset":0,"len":16}"#.to_string(),
    ] {
        m1.publish("smartmeter/M1/ota/request", &req, QoS::AtMostOnce, 0);
        let c = m1.next_publish("smartmeter/M1/command/ota/chunk");
        assert_eq!(c.payload[6], 2, "{req}");
        assert_eq!(c.payload.len(), 8);
    }

    // M3 is not in the rollout: no offer, and its requests get no bytes.
    let mut m3 = gw.connect("M3", SECRET);
    m3.subscribe("smartmeter/M3/command/#", 1);
    m3.publish(
        "smartmeter/M3/ota/request",
        &format!(r#"{{"version":"{NEW}","offset":0,"len":256}}"#),
        QoS::AtMostOnce,
        0,
    );
    let c = m3.next_publish("smartmeter/M3/command/ota/chunk");
    assert_eq!(c.payload[6], 2);
    // M3 cannot ask for M1's image under M1's name: a foreign topic closes its connection.
    m3.publish(
        "smartmeter/M1/ota/request",
        &format!(r#"{{"version":"{NEW}","offset":0,"len":256}}"#),
        QoS::AtMostOnce,
        0,
    );
    assert!(m3.recv_within(WAIT).is_none());

    // Status reports move the meter's row and become `ota` events.
    m1.publish_acked(
        "smartmeter/M1/ota/status",
        &format!(r#"{{"state":"downloading","version":"{NEW}","offset":256,"error":null}}"#),
        10,
    );
    m1.publish_acked(
        "smartmeter/M1/ota/status",
        &format!(r#"{{"state":"failed","version":"{NEW}","offset":1000,"error":"bad_hash"}}"#),
        11,
    );
    // 1 of 2 failed: over 40%, the rollout pauses.
    let status = cli_ok(&gw, &["firmware", "status"]);
    assert!(status.contains("paused"), "{status}");
    assert!(status.contains("1 of 2 meters failed"), "{status}");
    assert!(status.contains("bad_hash"), "{status}");
    let (code, api) = gw.http("GET", "/api/firmware/rollout", None);
    assert_eq!(code, 200);
    assert_eq!(api["rollout"]["state"], "paused");
    let states: HashMap<String, String> = api["meters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["meter"].as_str().unwrap().to_string(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states["M1"], "failed");
    assert_eq!(states["M2"], "pending");
    let events = ota_events(&gw);
    assert!(events.iter().any(|(m, d)| m.as_deref() == Some("M1")
        && d["state"] == "failed"
        && d["error"] == "bad_hash"));
    assert!(events
        .iter()
        .any(|(m, d)| m.is_none() && d["state"] == "paused"));

    // Paused: a meter of the rollout gets no offer and no bytes.
    let mut m2 = gw.connect("M2", SECRET);
    m2.subscribe("smartmeter/M2/command/#", 1);
    let c = eventually("the pause to reach the chunk server", || {
        m2.publish(
            "smartmeter/M2/ota/request",
            &format!(r#"{{"version":"{NEW}","offset":0,"len":256}}"#),
            QoS::AtMostOnce,
            0,
        );
        let c = m2.next_publish("smartmeter/M2/command/ota/chunk");
        (c.payload[6] == 2).then_some(c)
    });
    assert_eq!(c.payload.len(), 8);

    // A new rollout over the API replaces the paused one and is announced at once.
    let (code, v) = gw.http(
        "POST",
        "/api/firmware/rollouts",
        Some(&format!(r#"{{"version":"{NEW}","meters":["M2"]}}"#)),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["rollout"], 2);
    let offer = m2.next_publish("smartmeter/M2/command/ota");
    let o: serde_json::Value = serde_json::from_slice(&offer.payload).unwrap();
    assert_eq!(o["rollout"], 2);
    let (code, _) = gw.http(
        "POST",
        "/api/firmware/rollouts",
        Some(r#"{"version":"7.7.7","all":true}"#),
    );
    assert_eq!(code, 409, "an unknown version is refused");
    assert!(gw.metric("umeme_ota_chunks_total{result=\"data\"}") >= 1.0);
    assert!(gw.metric("umeme_ota_status_total{state=\"failed\"}") >= 1.0);
}

/// The issue's acceptance test: 200 meters, 10% of them with a dropped connection, a corrupted
/// chunk or a power cut during a flash write; every one ends on the new version (or rolled
/// back), none bricked, and the ledger debited exactly what the meters reported meanwhile.
#[test]
fn two_hundred_meters_take_a_rollout_with_induced_failures_and_none_is_bricked() {
    const N: usize = 200;
    let mut gw = Gateway::new("").with_broker_keys(
        "max_unauthenticated_per_ip = 1000\nreports_per_minute = 6000\nreport_burst = 1000\nstatus_per_minute = 6000\nstatus_burst = 1000\n",
    );
    let (key, public) = keygen(&gw);
    // 50 meters download at once; the others are told to wait.
    trust(
        &gw,
        &public,
        "chunk_size = 256\nmax_downloads = 50\nchunk_requests_per_second = 100\n",
    );
    let ids: Vec<String> = (0..N).map(|i| format!("OTA{i:03}")).collect();
    provision(&gw, &ids);
    let image = make_image(NEW, 4000, 42);
    add_image(&gw, &key, NEW, &image);
    gw.start();
    let public: [u8; 32] = {
        let b = public.as_bytes();
        std::array::from_fn(|i| {
            u8::from_str_radix(std::str::from_utf8(&b[2 * i..2 * i + 2]).unwrap(), 16).unwrap()
        })
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let (connected, arrivals) = mpsc::channel();
    let threads: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let fault = Fault::for_index(i);
            let meter = OtaMeter::new(id, SECRET, gw.broker, public, fault, 1000 + i as u64);
            let connected = connected.clone();
            std::thread::Builder::new()
                .name(id.clone())
                .stack_size(256 << 10)
                .spawn(move || {
                    let r = meter.run(
                        move || {
                            let _ = connected.send(());
                        },
                        deadline,
                    );
                    (fault, r.unwrap_or_else(|e| panic!("{e}")))
                })
                .unwrap()
        })
        .collect();
    // Two password checks at a time per source address: connecting all takes a while.
    for n in 0..N {
        let left = deadline.saturating_duration_since(Instant::now());
        arrivals
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {n} of {N} meters connected in time"));
    }
    let setup = started.elapsed();
    let rollout_at = Instant::now();
    let (code, v) = gw.http(
        "POST",
        "/api/firmware/rollouts",
        Some(&format!(
            r#"{{"version":"{NEW}","all":true,"maxFailurePercent":10}}"#
        )),
    );
    assert_eq!(code, 200, "{v}");
    let results: Vec<(Fault, OtaMeterResult)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let rollout_time = rollout_at.elapsed();

    let bricked = results.iter().filter(|(_, r)| r.bricked).count();
    let on_new = results.iter().filter(|(_, r)| r.version == NEW).count();
    let faulty = results.iter().filter(|(f, _)| *f != Fault::None).count();
    assert_eq!(bricked, 0, "no meter bricked");
    assert_eq!(faulty, N / 10);
    for (f, r) in &results {
        assert!(
            r.version == NEW || r.version == FACTORY_VERSION,
            "{f:?}: {r:?} ends on a known image"
        );
        assert!(r.resets >= 1, "{f:?}: {r:?} rebooted into the new image");
        // The failure happened and was recovered from: a resume after the drop or the power
        // cut (the cut also rebooted), a second download after the corrupted chunk.
        match f {
            Fault::None => assert_eq!(r.downloads, 1, "{r:?}"),
            Fault::PowerLoss => assert!(r.resets >= 2 && r.downloads >= 2, "{r:?}"),
            Fault::Drop | Fault::Corrupt => assert!(r.downloads >= 2, "{f:?}: {r:?}"),
        }
    }
    // Every induced failure here is recoverable (resume, re-fetch), so every meter updates.
    assert_eq!(on_new, N, "all on the new version");

    let (_, status) = gw.http("GET", "/api/firmware/rollout", None);
    assert_eq!(status["rollout"]["state"], "done", "{}", status["rollout"]);
    assert!(status["meters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["state"] == "confirmed"));
    // Reports sent during the rollout lost nothing: the ledger debited exactly the energy the
    // meters counted after their first (baseline) report.
    let (_, meters) = gw.http("GET", "/api/meters", None);
    let balances: HashMap<String, i64> = meters["meters"]
        .as_array()
        .expect("meters")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["balance_wh"].as_i64().unwrap(),
            )
        })
        .collect();
    for ((_, r), id) in results.iter().zip(&ids) {
        let used = (r.last_energy - r.first_energy) as i64;
        assert_eq!(balances[id], 5_000 - used, "{id}: {r:?}");
    }
    let busy = gw.metric("umeme_ota_chunks_total{result=\"busy\"}");
    let served = gw.metric("umeme_ota_chunks_total{result=\"data\"}");
    assert!(busy > 0.0, "the download cap was reached");
    println!(
        "ota rollout: {N} meters, image {} bytes in 256-byte chunks, 50 downloads at once: set-up and connect {:.1} s, rollout {:.1} s, {served} chunks served, {busy} busy answers, {} on {NEW}, {bricked} bricked",
        image.len(),
        setup.as_secs_f64(),
        rollout_time.as_secs_f64(),
        on_new
    );
}

#[test]
fn chunk_requests_over_the_meters_rate_are_dropped_and_counted() {
    let mut gw = Gateway::new("");
    let (key, public) = keygen(&gw);
    // One request a second, burst 2.
    trust(
        &gw,
        &public,
        "chunk_size = 256\nchunk_requests_per_second = 1\n",
    );
    gw.add_meter("M1", SECRET);
    add_image(&gw, &key, NEW, &make_image(NEW, 2000, 8));
    gw.start();
    cli_ok(&gw, &["firmware", "rollout", "--version", NEW, "--all"]);
    let mut m = gw.connect("M1", SECRET);
    m.subscribe("smartmeter/M1/command/#", 1);
    m.next_publish("smartmeter/M1/command/ota");
    for i in 0..5u32 {
        m.publish(
            "smartmeter/M1/ota/request",
            &format!(r#"{{"version":"{NEW}","offset":{},"len":256}}"#, i * 256),
            QoS::AtMostOnce,
            0,
        );
    }
    // The barrier's PUBACK comes after everything published before it was handled.
    let before = m.barrier("M1", 7);
    let mut chunks: Vec<_> = before
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) if p.topic.ends_with("/command/ota/chunk") => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(chunks.len(), 2, "the burst is served, the rest dropped");
    chunks.sort_by_key(|p| p.payload[3]);
    assert_eq!(chunks[0].payload[6], 0);
    assert!(gw.metric("umeme_mqtt_rejected_total{reason=\"rate_limited\"}") >= 3.0);
}

#[test]
fn an_image_is_uploaded_over_the_admin_api_only_with_a_valid_signature() {
    let mut gw = Gateway::new("");
    let (key, public) = keygen(&gw);
    trust(&gw, &public, "");
    gw.start();
    let image = make_image(NEW, 3000, 4);
    let file = gw.dir.path().join("fw.bin");
    std::fs::write(&file, &image).unwrap();
    let sig = cli_ok(
        &gw,
        &[
            "firmware",
            "sign",
            file.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            NEW,
        ],
    );
    let upload = |query: &str, body: &[u8]| -> (u16, serde_json::Value) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(gw.api).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "POST /api/firmware?{query} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out[9..12].parse().unwrap();
        let json = out.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(json).unwrap_or_default())
    };
    let (code, v) = upload(&format!("version=9.9.9&signature={}", sig.trim()), &image);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("does not verify"));
    let (code, _) = upload(&format!("version={NEW}"), &image);
    assert_eq!(code, 400);
    let (code, v) = upload(&format!("version={NEW}&signature={}", sig.trim()), &image);
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["firmware"]["size"], 3000);
    let (code, _) = upload(&format!("version={NEW}&signature={}", sig.trim()), &image);
    assert_eq!(code, 409, "a version is added once");
    let (_, list) = gw.http("GET", "/api/firmware", None);
    assert_eq!(list["firmware"][0]["version"], NEW);
    assert!(cli_ok(&gw, &["firmware", "list"]).contains(NEW));
}

#[test]
fn a_rollout_survives_a_gateway_crash_and_a_download_resumes_after_the_restart() {
    let mut gw = Gateway::new("");
    let (key, public) = keygen(&gw);
    trust(&gw, &public, "chunk_size = 256\n");
    gw.add_meter("M1", SECRET);
    let image = make_image(NEW, 1500, 6);
    add_image(&gw, &key, NEW, &image);
    gw.start();
    cli_ok(&gw, &["firmware", "rollout", "--version", NEW, "--all"]);
    let mut m = gw.connect("M1", SECRET);
    m.subscribe("smartmeter/M1/command/#", 1);
    m.next_publish("smartmeter/M1/command/ota");
    m.publish_acked(
        "smartmeter/M1/ota/status",
        &format!(r#"{{"state":"downloading","version":"{NEW}","offset":512,"error":null}}"#),
        2,
    );
    gw.kill();
    drop(m);
    gw.start();
    // The meter comes back and asks from the offset its flash holds.
    let mut m = gw.connect("M1", SECRET);
    m.subscribe("smartmeter/M1/command/#", 1);
    let offer = m.next_publish("smartmeter/M1/command/ota");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&offer.payload).unwrap()["rollout"],
        1
    );
    m.publish(
        "smartmeter/M1/ota/request",
        &format!(r#"{{"version":"{NEW}","offset":512,"len":256}}"#),
        QoS::AtMostOnce,
        0,
    );
    let c = m.next_publish("smartmeter/M1/command/ota/chunk");
    assert_eq!(&c.payload[8..], &image[512..768]);
    let status = cli_ok(&gw, &["firmware", "status"]);
    assert!(
        status.contains("downloading") && status.contains("512"),
        "{status}"
    );
}
