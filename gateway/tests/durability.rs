//! Crash safety: kill -9 the gateway while meters stream QoS 1 reports; everything that was
//! PUBACKed survives exactly once, and balances equal credits minus debits.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;

const METERS: usize = 24;
/// Publishes a meter keeps in flight (the gateway pipelines them through group commit).
const WINDOW: usize = 4;
/// Kill the gateway once this many reports have been acknowledged in total.
const KILL_AFTER: usize = 1_500;
const ENERGY_STEP: u64 = 7;

fn meter_id(i: usize) -> String {
    format!("CRASH{i:03}")
}

/// Streams reports `seq = from..` until the connection dies or `stop`; returns acked seqs.
fn stream_reports(
    gw_addr: std::net::SocketAddr,
    id: &str,
    from: u32,
    until: u32,
    acked_total: &AtomicUsize,
    stop: &AtomicBool,
) -> Vec<u32> {
    // The gateway may be killed before this meter gets in: then it reports nothing.
    let Some((mut m, code)) =
        RawMeter::try_connect(gw_addr, id, id, "crash-test-secret", true, None)
    else {
        return Vec::new();
    };
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let topic = format!("smartmeter/{id}/consumption");
    let mut acked = Vec::new();
    let mut in_flight = std::collections::VecDeque::new();
    let mut next = from;
    loop {
        while in_flight.len() < WINDOW && next <= until && !stop.load(Ordering::Relaxed) {
            let pkid = (next % 60_000 + 1) as u16;
            let payload = v2_payload(id, next, u64::from(next) * ENERGY_STEP);
            let mut p = rumqttc::mqttbytes::v4::Publish::new(
                topic.as_str(),
                QoS::AtLeastOnce,
                payload.into_bytes(),
            );
            p.pkid = pkid;
            let mut out = bytes::BytesMut::new();
            Packet::Publish(p).write(&mut out, usize::MAX).unwrap();
            if std::io::Write::write_all(&mut m.stream, &out).is_err() {
                return acked;
            }
            in_flight.push_back((pkid, next));
            next += 1;
        }
        if in_flight.is_empty() {
            return acked;
        }
        match m.recv_within(WAIT) {
            Some(Packet::PubAck(a)) => {
                let (pkid, seq) = in_flight
                    .pop_front()
                    .expect("an ack for something in flight");
                assert_eq!(a.pkid, pkid, "PUBACKs come in publish order");
                acked.push(seq);
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => return acked,
        }
    }
}

#[test]
fn kill_during_group_commit_loses_no_acked_report_and_balances_add_up() {
    let mut gw = Gateway::new("").with_broker_keys(UNLIMITED_REPORTS);
    gw.start();
    for i in 0..METERS {
        gw.add_meter(&meter_id(i), "crash-test-secret");
        gw.simulate(&meter_id(i), 1_000.0); // 50,000 Wh each
    }
    let acked_total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let threads: Vec<_> = (0..METERS)
        .map(|i| {
            let (addr, acked_total, stop, acked) =
                (gw.broker, acked_total.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let id = meter_id(i);
                let seqs = stream_reports(addr, &id, 1, 100_000, &acked_total, &stop);
                acked.lock().unwrap().insert(id, seqs);
            })
        })
        .collect();
    eventually("enough acknowledged reports before the kill", || {
        (acked_total.load(Ordering::Relaxed) >= KILL_AFTER).then_some(())
    });
    gw.kill();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("meter thread");
    }
    let acked = Arc::try_unwrap(acked).unwrap().into_inner().unwrap();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total >= KILL_AFTER, "{total}");

    // Restart on the same database and check it directly.
    gw.start();
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let mut applied = HashMap::new();
    for e in consumption_events(&db) {
        let seq = e.data["seq"].as_u64().expect("v2 seq") as u32;
        let first = applied.insert((e.meter.clone().expect("meter"), seq), e.seq);
        assert_eq!(first, None, "no report is applied twice");
    }
    let mut resume_from = HashMap::new();
    for (id, seqs) in &acked {
        let stored: std::collections::HashSet<u32> = applied
            .keys()
            .filter(|(m, _)| m == id)
            .map(|(_, seq)| *seq)
            .collect();
        for seq in seqs {
            assert!(
                stored.contains(seq),
                "{id} seq {seq} was PUBACKed but is not in the ledger"
            );
        }
        resume_from.insert(id.clone(), stored.iter().max().copied().unwrap_or(0));
        check_balance(&db, id);
    }

    // The meters come back and resend from their last acknowledged report: retries of what
    // was already applied debit nothing, the rest applies once.
    let counter = AtomicUsize::new(0);
    let never = AtomicBool::new(false);
    for (id, seqs) in &acked {
        let from = seqs.last().copied().unwrap_or(0).saturating_sub(3).max(1);
        let until = resume_from[id] + 5;
        let again = stream_reports(gw.broker, id, from, until, &counter, &never);
        assert_eq!(
            again.len() as u32,
            until - from + 1,
            "{id}: every resent report is acknowledged"
        );
    }
    for id in acked.keys() {
        check_balance(&db, id);
        let energy = consumption_events(&db)
            .iter()
            .filter(|e| e.meter.as_deref() == Some(id))
            .map(|e| e.data["energyWh"].as_i64().expect("energyWh"))
            .max()
            .expect("reports");
        let balance = meter_row(&db, id).balance_wh;
        // Seq 1 is the baseline at 7 Wh; everything after it is debited once.
        assert_eq!(balance, 50_000 - (energy - ENERGY_STEP as i64), "{id}");
    }
}

/// Every consumption event as sinks see it (the database keeps them as compact records).
fn consumption_events(db: &rusqlite::Connection) -> Vec<umeme_gateway::store::Event> {
    umeme_gateway::store::events_after(db, "test", 0, usize::MAX >> 1)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "consumption")
        .collect()
}

/// The meter's row with its account up to date (the gateway folds reports into it lazily).
fn meter_row(db: &rusqlite::Connection, id: &str) -> umeme_gateway::store::MeterRow {
    let id = umeme_gateway::meter::MeterId::parse(id).unwrap();
    umeme_gateway::store::meter(db, &id)
        .unwrap()
        .expect("meter")
}

/// balance = credits − debits, and the debits add up to the register's movement.
fn check_balance(db: &rusqlite::Connection, id: &str) {
    let row = meter_row(db, id);
    let (balance, consumed) = (row.balance_wh, row.total_consumed_wh);
    let credits: i64 = db
        .query_row(
            "SELECT COALESCE(SUM(credit_wh), 0) FROM payments WHERE meter = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    let debits: i64 = consumption_events(db)
        .iter()
        .filter(|e| e.meter.as_deref() == Some(id))
        .map(|e| e.data["debitWh"].as_i64().expect("debitWh"))
        .sum();
    assert_eq!(
        balance,
        credits - debits,
        "{id}: balance equals credits minus debits"
    );
    assert_eq!(consumed, debits, "{id}");
}
