//! Outbox drain benchmark: start-up time with a large backlog, and how fast the backlog drains
//! to the built-in jsonl sink, next to a baseline that writes the same events to a file with
//! nothing in between (the ceiling for that sink).
//!
//! cargo bench -p umeme-gateway --bench outbox                    # 200,000 events
//! cargo bench -p umeme-gateway --bench outbox -- --events 1000000

use std::io::Write;
use std::time::{Duration, Instant};

use umeme_gateway::config::{Config, Tariff};
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::payload::{Report, V2Report};
use umeme_gateway::store;
use umeme_gateway::writer::{self, LedgerSettings, Op};

const METERS: usize = 1000;
const GATEWAY: &str = "bench-site";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// Fills the database with `events` consumption events from real ledger operations.
fn fill(path: &std::path::Path, events: usize) {
    let mut conn = store::open(path, GATEWAY).expect("open database");
    let settings = LedgerSettings {
        rules: Rules {
            low_balance_wh: 3000,
        },
        tariff: Tariff::try_from(0.05).expect("tariff"),
    };
    let meters: Vec<MeterId> = (0..METERS)
        .map(|i| MeterId::parse(&format!("BENCH{i:05}")).expect("id"))
        .collect();
    let tx = conn.transaction().expect("transaction");
    for m in &meters {
        let op = Op::AddMeter {
            meter: m.clone(),
            name: None,
            phone: None,
            secret_hash: "unused".into(),
            at: 1,
        };
        writer::apply(&tx, &op, &settings).expect("add meter");
    }
    tx.commit().expect("commit");
    let started = Instant::now();
    let mut done = 0;
    while done < events {
        let tx = conn.transaction().expect("transaction");
        for _ in 0..50_000.min(events - done) {
            let m = &meters[done % METERS];
            let seq = (done / METERS) as u32 + 1;
            let report = Report::V2(V2Report {
                seq,
                energy_wh: u64::from(seq) * 7,
                power_w: Some(420.0),
                current_a: Some(1.83),
                voltage_v: Some(229.5),
                relay: Some("on".into()),
                timestamp: None,
            });
            let op = Op::Report {
                meter: m.clone(),
                report,
                at: store::now_ms(),
            };
            writer::apply(&tx, &op, &settings).expect("apply report");
            done += 1;
        }
        // The daemon folds reports into the meters' rows at least every 100 000 events.
        store::fold(&tx, std::iter::empty()).expect("fold");
        tx.commit().expect("commit");
        eprintln!(
            "  backlog: {done}/{events} events ({:.0?})",
            started.elapsed()
        );
    }
}

/// Writes every event to a JSON Lines file in batches of `batch`, syncing each batch.
fn baseline(path: &std::path::Path, out: &std::path::Path, batch: usize) -> (usize, Duration) {
    let conn = store::open_read_only(path).expect("open");
    let mut file = std::fs::File::create(out).expect("create");
    let started = Instant::now();
    let (mut cursor, mut n) = (0, 0);
    loop {
        let events = store::events_after(&conn, GATEWAY, cursor, batch).expect("read");
        let Some(last) = events.last() else { break };
        cursor = last.seq;
        let mut buf = Vec::new();
        for e in &events {
            serde_json::to_writer(&mut buf, e).expect("json");
            buf.push(b'\n');
        }
        file.write_all(&buf).expect("write");
        file.sync_data().expect("sync");
        n += events.len();
    }
    (n, started.elapsed())
}

fn main() {
    let events = arg("--events", 200_000);
    let batch = arg("--batch", 1000);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("data").join("gateway.db");
    std::fs::create_dir_all(db.parent().expect("parent")).expect("data dir");
    eprintln!("filling a backlog of {events} consumption events for {METERS} meters");
    fill(&db, events);
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);

    let (base_n, base_t) = baseline(&db, &dir.path().join("baseline.jsonl"), batch);
    let base_rate = base_n as f64 / base_t.as_secs_f64();
    eprintln!("baseline: {base_n} events in {base_t:.2?}");

    let export = dir.path().join("export");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"{GATEWAY}\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
             [[sink]]\nname = \"bench\"\nbuiltin = \"jsonl\"\nbatch_size = {batch}\nmax_events_per_second = 1000000\n\
             [sink.config]\ndir = {:?}\nmax_file_bytes = \"1GiB\"\n",
            db.parent().expect("parent").display().to_string(),
            export.display().to_string()
        ),
    )
    .expect("config");
    let config = Config::load(Some(&cfg)).expect("config loads");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let gateway = rt
        .block_on(umeme_gateway::daemon::Gateway::start(config))
        .expect("gateway starts");
    let startup = started.elapsed();
    let reader = store::open_read_only(&db).expect("reader");
    let last = store::last_event_seq(&reader).expect("last seq");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        let cursor = store::sink_cursor(&reader, "bench").expect("cursor");
        if cursor >= last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drain did not finish in 10 minutes"
        );
        if Instant::now() >= next_report {
            eprintln!("  drained {cursor}/{last} ({:.0?})", started.elapsed());
            next_report += Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain = started.elapsed() - startup;
    let rate = last as f64 / drain.as_secs_f64();
    rt.block_on(gateway.stop());

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!("\n## Outbox drain ({events} events, batch {batch})\n");
    println!(
        "machine: {} cores, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "database with the backlog: {:.1} MiB ({:.0} bytes per event)\n",
        db_bytes as f64 / 1048576.0,
        db_bytes as f64 / events as f64
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| start-up with the backlog (to ready) | {:.0} ms |",
        startup.as_secs_f64() * 1000.0
    );
    println!(
        "| drain to the jsonl sink | {rate:.0} events/s ({:.1} s) |",
        drain.as_secs_f64()
    );
    println!("| baseline: same events to a file, fsync per batch, nothing else | {base_rate:.0} events/s |");
    println!("| ratio drain / baseline | {:.2} |", rate / base_rate);
}
