//! Store-and-forward end to end: the real daemon, real meters, the jsonl sink flapping
//! (down, hung, up) while the daemon is killed again and again; and a long outage against a
//! small disk cap.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;

const SECRET: &str = "outbox-test-secret";

fn sink_config(export: &Path, extra_outbox: &str) -> String {
    format!(
        "{extra_outbox}\n[[sink]]\nname = \"audit\"\nbuiltin = \"jsonl\"\ntimeout = \"1s\"\nretry_max = \"1s\"\nmax_events_per_second = 5000\n[sink.config]\ndir = {:?}\nmax_file_bytes = \"256KiB\"\n",
        export.display().to_string()
    )
}

/// How the sink's file looks while the daemon runs.
#[derive(Debug, Clone, Copy)]
enum SinkState {
    Up,
    /// `events.jsonl` is a directory: every delivery fails.
    Down,
    /// `events.jsonl` is a FIFO nobody reads: every delivery hangs until the timeout.
    Hung,
}

fn set_sink(export: &Path, state: SinkState, n: usize) {
    std::fs::create_dir_all(export).unwrap();
    let current = export.join("events.jsonl");
    match std::fs::symlink_metadata(&current) {
        Ok(m) if m.is_file() => std::fs::rename(
            &current,
            export.join(format!("events-set-aside-{n:03}.jsonl")),
        )
        .unwrap(),
        Ok(m) if m.is_dir() => std::fs::remove_dir(&current).unwrap(),
        Ok(_) => std::fs::remove_file(&current).unwrap(),
        Err(_) => {}
    }
    match state {
        SinkState::Up => {}
        SinkState::Down => std::fs::create_dir(&current).unwrap(),
        SinkState::Hung => {
            let st = std::process::Command::new("mkfifo")
                .arg(&current)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
}

/// Every line of every file in the export directory, parsed; torn lines (a kill mid-write) skipped.
fn exported(export: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(export).unwrap() {
        let p: PathBuf = entry.unwrap().path();
        if !p.is_file() {
            continue;
        }
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                out.push(v);
            }
        }
    }
    out
}

fn backlog(gw: &Gateway) -> i64 {
    let (status, v) = gw.http("GET", "/api/outbox", None);
    assert_eq!(status, 200, "{v}");
    v["sinks"][0]["backlog"].as_i64().unwrap()
}

/// Streams v2 reports for `id` from `next` until the connection dies or `stop`; returns the
/// acknowledged seqs.
fn stream(
    addr: std::net::SocketAddr,
    id: &str,
    next: u32,
    stop: &AtomicBool,
    acked_total: &AtomicUsize,
) -> Vec<u32> {
    // The gateway may be killed before this meter gets in: then it reports nothing this time.
    let Some((mut m, code)) = RawMeter::try_connect(addr, id, id, SECRET, true, None) else {
        return Vec::new();
    };
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let topic = format!("smartmeter/{id}/consumption");
    let mut acked = Vec::new();
    let mut seq = next;
    while !stop.load(Ordering::Relaxed) {
        let mut p = Publish::new(
            topic.as_str(),
            QoS::AtLeastOnce,
            v2_payload(id, seq, u64::from(seq) * 5).into_bytes(),
        );
        p.pkid = (seq % 60_000 + 1) as u16;
        let mut out = bytes::BytesMut::new();
        Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
        if std::io::Write::write_all(&mut m.stream, &out).is_err() {
            break;
        }
        match m.recv_within(WAIT) {
            Some(Packet::PubAck(_)) => {
                acked.push(seq);
                acked_total.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            _ => break,
        }
    }
    acked
}

#[test]
fn killed_repeatedly_while_the_sink_flaps_every_event_reaches_it_and_duplicates_are_only_retries() {
    let scratch = tempfile::tempdir().unwrap();
    let export = scratch.path().join("export");
    let mut gw = Gateway::new(&sink_config(&export, "")).with_broker_keys(UNLIMITED_REPORTS);
    const METERS: usize = 6;
    for i in 0..METERS {
        gw.add_meter(&format!("FLAP{i}"), SECRET);
    }
    let mut next_seq = [1u32; METERS];
    let mut acked_all: HashSet<(String, u32)> = HashSet::new();
    let states = [
        SinkState::Up,
        SinkState::Down,
        SinkState::Hung,
        SinkState::Up,
        SinkState::Down,
    ];
    for (cycle, state) in states.iter().enumerate() {
        set_sink(&export, *state, cycle);
        gw.start();
        gw.simulate("FLAP0", 10.0 + cycle as f64);
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(Mutex::new(HashMap::new()));
        let threads: Vec<_> = (0..METERS)
            .map(|i| {
                let (addr, stop, total, results, from) = (
                    gw.broker,
                    stop.clone(),
                    total.clone(),
                    results.clone(),
                    next_seq[i],
                );
                std::thread::spawn(move || {
                    let acked = stream(addr, &format!("FLAP{i}"), from, &stop, &total);
                    results.lock().unwrap().insert(i, acked);
                })
            })
            .collect();
        eventually("reports acknowledged in this cycle", || {
            (total.load(Ordering::Relaxed) >= 150).then_some(())
        });
        gw.kill();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        for (i, acked) in results.lock().unwrap().iter() {
            if let Some(last) = acked.last() {
                next_seq[*i] = last + 1;
            }
            acked_all.extend(acked.iter().map(|s| (format!("FLAP{i}"), *s)));
        }
    }

    // Uplink restored: the backlog drains.
    set_sink(&export, SinkState::Up, 99);
    gw.start();
    eventually("the backlog to drain", || (backlog(&gw) == 0).then_some(()));

    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let stored: Vec<(i64, String)> = db
        .prepare("SELECT seq, kind FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lines = exported(&export);
    let mut by_id: HashMap<String, Vec<&serde_json::Value>> = HashMap::new();
    for l in &lines {
        by_id
            .entry(l["id"].as_str().unwrap().to_string())
            .or_default()
            .push(l);
    }
    for (seq, kind) in &stored {
        let id = format!("test-site-{seq:012}");
        let copies = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("event {id} ({kind}) never reached the sink"));
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "{id}: a duplicate that is not a retry of the same event"
        );
    }
    assert_eq!(
        by_id.len(),
        stored.len(),
        "the sink holds no event the gateway did not store"
    );
    let reported: HashSet<(String, u32)> = lines
        .iter()
        .filter(|l| l["kind"] == "consumption")
        .map(|l| {
            (
                l["meter"].as_str().unwrap().to_string(),
                l["data"]["seq"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    for acked in &acked_all {
        assert!(
            reported.contains(acked),
            "PUBACKed report {acked:?} missing at the sink"
        );
    }
    let duplicates = lines.len() - by_id.len();
    println!(
        "{} events, {} lines at the sink, {} retried duplicates, {} acked reports",
        stored.len(),
        lines.len(),
        duplicates,
        acked_all.len()
    );
    let out = gw.cli(&["outbox", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sink audit: cursor") && text.contains("backlog 0"),
        "{text}"
    );
}

#[test]
fn a_long_outage_stays_under_the_disk_cap_keeps_every_payment_and_drains_after() {
    let scratch = tempfile::tempdir().unwrap();
    let export = scratch.path().join("export");
    set_sink(&export, SinkState::Down, 0);
    let mut gw = Gateway::new(&sink_config(
        &export,
        // Reports as fast as the meters can send them: the cap is reached before many
        // payments (never dropped) pile up.
        "[outbox]\nmax_bytes = \"256KiB\"\n[ledger]\ncommit_delay = \"0ms\"\n",
    ))
    .with_broker_keys(UNLIMITED_REPORTS);
    const METERS: usize = 8;
    for i in 0..METERS {
        gw.add_meter(&format!("OUT{i}"), SECRET);
    }
    gw.start();
    // Hours of reports, compressed: each meter streams while payments keep arriving.
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..METERS)
        .map(|i| {
            let (addr, stop, total) = (gw.broker, stop.clone(), total.clone());
            std::thread::spawn(move || stream(addr, &format!("OUT{i}"), 1, &stop, &total).len())
        })
        .collect();
    let mut payments = 0;
    while total.load(Ordering::Relaxed) < 8_000 {
        gw.simulate(&format!("OUT{}", payments % METERS), 5.0);
        payments += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(payments < 5_000, "meters stopped reporting");
    }
    stop.store(true, Ordering::Relaxed);
    let reported: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();

    // Housekeeping brings the database back under its cap by dropping old telemetry.
    let status = eventually("the outbox to be pruned under its cap", || {
        let (_, v) = gw.http("GET", "/api/outbox", None);
        (v["used_bytes"].as_i64().unwrap() <= 256 << 10 && v["dropped_total"].as_i64().unwrap() > 0)
            .then_some(v)
    });
    assert!(status["sinks"][0]["backlog"].as_i64().unwrap() > 0);
    assert!(gw.metric("umeme_outbox_dropped_total") > 0.0);
    gw.assert_log("outbox over its disk cap");
    let db_bytes = std::fs::metadata(gw.db_path()).unwrap().len();
    println!("{reported} reports, {payments} payments, status {status}, db file {db_bytes} bytes");
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let kept: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'payment'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, payments as i64, "no payment event is ever dropped");

    // The uplink returns: everything still stored drains, every payment included.
    set_sink(&export, SinkState::Up, 1);
    eventually("the backlog to drain", || (backlog(&gw) == 0).then_some(()));
    let lines = exported(&export);
    let paid = lines
        .iter()
        .filter(|l| l["kind"] == "payment")
        .map(|l| l["id"].as_str().unwrap())
        .collect::<HashSet<_>>();
    assert_eq!(paid.len(), payments);
}
