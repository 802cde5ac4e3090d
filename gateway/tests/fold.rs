//! Reports do not rewrite their meter's row: the consumption event holds the account and the
//! row catches up at the next fold. These tests pin what that must never break: every reader
//! sees the newest balance, a payment is never overwritten by an older report, a meter added
//! again starts clean, a crash loses nothing, and a schema 1 database upgrades in place.

mod common;

use common::*;
use rusqlite::Connection;
use umeme_gateway::config::Tariff;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::payload::{Report, V2Report};
use umeme_gateway::store;
use umeme_gateway::writer::{apply, apply_now, Credit, LedgerSettings, Op};

fn settings() -> LedgerSettings {
    LedgerSettings {
        rules: Rules { low_balance_wh: 0 },
        tariff: Tariff::try_from(0.05).unwrap(),
    }
}

fn id(s: &str) -> MeterId {
    MeterId::parse(s).unwrap()
}

fn add(conn: &mut Connection, meter: &str) {
    let op = Op::AddMeter {
        meter: id(meter),
        name: None,
        phone: None,
        secret_hash: "unused".into(),
        at: 1,
    };
    apply_now(conn, &op, &settings())
        .map_err(|e| e.to_string())
        .unwrap();
}

fn credit(conn: &mut Connection, meter: &str, kes: i64, reference: &str) {
    let op = Op::Credit(Credit {
        meter: id(meter),
        source: "manual".into(),
        reference: reference.into(),
        amount_cents: kes * 100,
        at: 2,
        phone: None,
    });
    apply_now(conn, &op, &settings())
        .map_err(|e| e.to_string())
        .unwrap();
}

/// Applies a v2 report in its own transaction, without folding (as the daemon's writer does).
fn report(conn: &mut Connection, meter: &str, seq: u32, energy_wh: u64) {
    let op = Op::Report {
        meter: id(meter),
        report: Report::V2(V2Report {
            seq,
            energy_wh,
            power_w: Some(230.5),
            current_a: None,
            voltage_v: Some(229.9),
            relay: Some("on".into()),
            timestamp: None,
        }),
        at: 1_000 + i64::from(seq),
    };
    let tx = conn.transaction().unwrap();
    apply(&tx, &op, &settings())
        .map_err(|e| e.to_string())
        .unwrap();
    tx.commit().unwrap();
}

fn balance(conn: &Connection, meter: &str) -> i64 {
    store::account(conn, &id(meter))
        .unwrap()
        .unwrap()
        .balance_wh
}

fn row_balance(conn: &Connection, meter: &str) -> i64 {
    store::account_row(conn, &id(meter))
        .unwrap()
        .unwrap()
        .0
        .balance_wh
}

#[test]
fn reports_leave_the_row_alone_and_every_reader_still_sees_the_newest_balance() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("g.db"), "site").unwrap();
    add(&mut conn, "M1");
    credit(&mut conn, "M1", 100, "R1"); // 5 000 Wh
    report(&mut conn, "M1", 1, 1_000); // baseline
    report(&mut conn, "M1", 2, 1_400);
    report(&mut conn, "M1", 3, 1_500);

    assert_eq!(row_balance(&conn, "M1"), 5_000, "no report wrote the row");
    assert_eq!(balance(&conn, "M1"), 4_500);
    let shown = store::meter(&conn, &id("M1")).unwrap().unwrap();
    assert_eq!((shown.balance_wh, shown.ack_seq), (4_500, Some(3)));
    assert_eq!(shown.last_seen, Some(1_003));
    let listed = store::meters(&conn).unwrap();
    assert_eq!(listed[0].balance_wh, 4_500);

    let folded = store::fold(&conn, std::iter::empty()).unwrap();
    assert_eq!(folded.meters, 1);
    assert_eq!(row_balance(&conn, "M1"), 4_500, "the fold wrote it");
    assert_eq!(balance(&conn, "M1"), 4_500);
    // Folding again changes nothing.
    assert_eq!(store::fold(&conn, std::iter::empty()).unwrap().meters, 0);
}

#[test]
fn a_payment_after_unfolded_reports_is_never_overwritten_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("g.db"), "site").unwrap();
    add(&mut conn, "M1");
    credit(&mut conn, "M1", 100, "R1");
    report(&mut conn, "M1", 1, 0);
    report(&mut conn, "M1", 2, 700);
    // A payment written straight to the row (the CLI's path) between reports…
    let tx = conn.transaction().unwrap();
    let op = Op::Credit(Credit {
        meter: id("M1"),
        source: "manual".into(),
        reference: "R2".into(),
        amount_cents: 2_000,
        at: 3,
        phone: None,
    });
    apply(&tx, &op, &settings())
        .map_err(|e| e.to_string())
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(balance(&conn, "M1"), 5_000 - 700 + 1_000);
    // …then the fold replays the older report: the payment stays.
    store::fold(&conn, std::iter::empty()).unwrap();
    assert_eq!(balance(&conn, "M1"), 5_300);
    report(&mut conn, "M1", 3, 800);
    assert_eq!(balance(&conn, "M1"), 5_200);
    store::fold(&conn, std::iter::empty()).unwrap();
    assert_eq!(row_balance(&conn, "M1"), 5_200);
}

#[test]
fn a_meter_added_again_does_not_inherit_the_old_meters_reports() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("g.db"), "site").unwrap();
    add(&mut conn, "M1");
    credit(&mut conn, "M1", 100, "R1");
    report(&mut conn, "M1", 1, 0);
    report(&mut conn, "M1", 2, 900);
    let tx = conn.transaction().unwrap();
    for op in [
        Op::RemoveMeter {
            meter: id("M1"),
            at: 5,
        },
        Op::AddMeter {
            meter: id("M1"),
            name: None,
            phone: None,
            secret_hash: "unused".into(),
            at: 6,
        },
    ] {
        apply(&tx, &op, &settings())
            .map_err(|e| e.to_string())
            .unwrap();
    }
    tx.commit().unwrap();
    assert_eq!(balance(&conn, "M1"), 0);
    store::fold(&conn, std::iter::empty()).unwrap();
    let a = store::account(&conn, &id("M1")).unwrap().unwrap();
    assert_eq!((a.balance_wh, a.v2_seq), (0, None));
}

#[test]
fn a_schema_1_database_is_upgraded_in_place_and_keeps_numbering_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.db");
    make_v1_database(&path, "site");
    let mut conn = store::open(&path, "site").unwrap();
    let old = store::events_after(&conn, "site", 0, 10).unwrap();
    assert_eq!(old.len(), 2);
    assert_eq!(
        old[1].data["debitWh"], 800,
        "old JSON events read as before"
    );
    assert_eq!(balance(&conn, "M1"), 4_200);

    report(&mut conn, "M1", 13, 900);
    let all = store::events_after(&conn, "site", 0, 10).unwrap();
    let new = all.last().unwrap();
    assert_eq!(new.seq, 4, "numbering continues after the removed event 3");
    assert_eq!(new.id, "site-000000000004");
    assert_eq!(new.data["debitWh"], 100);
    assert_eq!(new.data["balanceWh"], 4_100);
    assert_eq!(balance(&conn, "M1"), 4_100);
    let version: String = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, "4");
    drop(conn);
    // Opening again is a no-op.
    let conn = store::open(&path, "site").unwrap();
    assert_eq!(store::events_after(&conn, "site", 0, 10).unwrap().len(), 3);
}

/// The daemon: reports acknowledged, a CLI top-up in between, a SIGKILL before any fold.
#[test]
fn the_daemon_keeps_unfolded_reports_and_cli_payments_across_a_kill() {
    let mut gw = Gateway::new("");
    gw.add_meter("METER001", "fold-secret-001");
    gw.start();
    gw.simulate("METER001", 100.0); // 5 000 Wh
    let mut m = gw.connect("METER001", "fold-secret-001");
    let topic = "smartmeter/METER001/consumption";
    for (seq, wh) in [(1u32, 0u64), (2, 300), (3, 500)] {
        m.publish_acked(topic, &v2_payload("METER001", seq, wh), seq as u16);
    }
    assert_eq!(
        gw.balance_wh("METER001"),
        4_500,
        "the API sees unfolded reports"
    );

    let out = gw.cli(&["credit", "METER001", "--kes", "20", "--ref", "CASH-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon's next report builds on the CLI's payment, not on what it held in memory.
    m.publish_acked(topic, &v2_payload("METER001", 4, 600), 4);
    assert_eq!(gw.balance_wh("METER001"), 4_500 + 1_000 - 100);

    m.publish_acked(topic, &v2_payload("METER001", 5, 650), 5);
    gw.kill();
    // Offline, the CLI sees the same ledger (it reads the events the rows lag behind).
    let out = gw.cli(&["meter", "show", "METER001"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5350"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    gw.start();
    assert_eq!(gw.balance_wh("METER001"), 5_350);
    let mut m = gw.connect("METER001", "fold-secret-001");
    m.publish_acked(topic, &v2_payload("METER001", 6, 700), 6);
    assert_eq!(gw.balance_wh("METER001"), 5_300);
}

/// A database as the first release (schema 1) left it: meter M1 at 4 200 Wh, events 1..=3 of
/// which the newest was already removed (so only the AUTOINCREMENT counter remembers 3).
fn make_v1_database(path: &std::path::Path, gateway: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let db = Connection::open(path).unwrap();
    db.execute_batch(
        r#"PRAGMA journal_mode = WAL;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
            CREATE TABLE meters (
                id TEXT PRIMARY KEY, name TEXT, phone TEXT, secret_hash TEXT NOT NULL,
                balance_wh INTEGER NOT NULL DEFAULT 0, ledger_seq INTEGER NOT NULL DEFAULT 0,
                v2_seq INTEGER, v2_energy_wh INTEGER, v1_total_wh INTEGER NOT NULL DEFAULT 0,
                total_consumed_wh INTEGER NOT NULL DEFAULT 0, status TEXT,
                online INTEGER NOT NULL DEFAULT 0, last_seen INTEGER, created_at INTEGER NOT NULL
            ) STRICT;
            CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, meter TEXT,
                at INTEGER NOT NULL, data TEXT NOT NULL
            ) STRICT;
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO meters (id, secret_hash, balance_wh, ledger_seq, v2_seq, v2_energy_wh,
                                total_consumed_wh, created_at)
                VALUES ('M1', 'unused', 4200, 7, 12, 800, 800, 1);
            INSERT INTO events (kind, meter, at, data) VALUES
                ('payment', 'M1', 1, '{"amountCents":10000}'),
                ('consumption', 'M1', 2, '{"seq":12,"debitWh":800}'),
                ('status', 'M1', 3, '{"status":"online"}');
            DELETE FROM events WHERE seq = 3;"#,
    )
    .unwrap();
    db.execute("INSERT INTO meta VALUES ('gateway_id', ?1)", [gateway])
        .unwrap();
}

#[test]
fn the_cli_leaves_an_older_database_to_the_daemon_to_upgrade() {
    let mut gw = Gateway::new("");
    make_v1_database(&gw.db_path(), "test-site");
    // An older daemon may still be running on it (an upgrade whose restart was refused).
    let out = gw.cli(&["meter", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("older than this gateway") && err.contains("umeme-gateway run"),
        "{err}"
    );
    gw.start();
    gw.assert_log("upgrading the database from schema 1 to 2");
    assert_eq!(gw.balance_wh("M1"), 4_200);
    let out = gw.cli(&["meter", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn housekeeping_expires_past_a_future_timestamp_and_drops_status_without_a_fold() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("g.db"), "site").unwrap();
    add(&mut conn, "M1");
    let now = store::now_ms();
    let day = 86_400_000;
    let presence = |conn: &mut Connection, at: i64| {
        let op = Op::Presence {
            meter: id("M1"),
            online: true,
            at,
        };
        let tx = conn.transaction().unwrap();
        apply(&tx, &op, &settings())
            .map_err(|e| e.to_string())
            .unwrap();
        tx.commit().unwrap();
    };
    // A clock that ran a day ahead for one event, then old events after it.
    presence(&mut conn, now + day);
    for _ in 0..5 {
        presence(&mut conn, now - 10 * day);
    }
    let tx = conn.transaction().unwrap();
    let p = store::prune(&tx, &[], now - day, u64::MAX, 1_000).unwrap();
    tx.commit().unwrap();
    // Everything but the newest event (it numbers the next one): the "meter added" event and
    // five presences, the future-dated one included.
    assert_eq!(p.expired, 6, "{p:?}");

    // Reports not yet folded are never dropped, but status events are, folded or not.
    report(&mut conn, "M1", 1, 0);
    report(&mut conn, "M1", 2, 10);
    for _ in 0..50 {
        presence(&mut conn, now);
    }
    let tx = conn.transaction().unwrap();
    let p = store::prune(&tx, &[], 0, 1, 1_000).unwrap();
    tx.commit().unwrap();
    // The 51 status events but the newest; the two reports stay.
    assert_eq!(p.dropped, 50, "{p:?}");
    assert!(p.full);
    assert_eq!(balance(&conn, "M1"), -10);
}
