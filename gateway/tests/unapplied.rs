//! The limits on what payment sources and plugins may store, on a real SQLite file through
//! the ledger's own ops: unapplied payments per source (cap and retention) and a plugin's
//! key-value store (keys and bytes). The end-to-end paths are in `tests/daraja.rs`.

use rusqlite::Connection;
use umeme_gateway::config::Tariff;
use umeme_gateway::ledger::Rules;
use umeme_gateway::store::{self, UnappliedRow};
use umeme_gateway::writer::{self, LedgerError, LedgerSettings, Op};

fn settings() -> LedgerSettings {
    LedgerSettings {
        rules: Rules { low_balance_wh: 0 },
        tariff: Tariff::try_from(0.05).unwrap(),
    }
}

fn open() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = store::open(&dir.path().join("gateway.db"), "test").unwrap();
    (dir, conn)
}

fn unapplied(source: &str, reference: &str, at: i64) -> Op {
    Op::RecordUnapplied(UnappliedRow {
        source: source.into(),
        reference: reference.into(),
        amount_cents: 100_000_000,
        account: "NOSUCH".into(),
        phone: None,
        reason: "unknown account".into(),
        raw: None,
        received_at: at,
        applied_meter: None,
        applied_at: None,
    })
}

/// Applies `ops` in one transaction (one fsync, not one per op).
fn apply_all(conn: &mut Connection, ops: impl IntoIterator<Item = Op>) {
    let tx = conn.transaction().unwrap();
    for op in ops {
        writer::apply(&tx, &op, &settings()).unwrap();
    }
    tx.commit().unwrap();
}

fn kept(conn: &Connection) -> usize {
    store::unapplied(conn, false).unwrap().len()
}

#[test]
fn a_sources_unapplied_payments_stop_at_the_cap_and_the_next_is_refused_with_nothing_written() {
    let (_dir, mut conn) = open();
    let now = store::now_ms();
    let cap = store::UNAPPLIED_MAX_OPEN_PER_SOURCE;
    apply_all(
        &mut conn,
        (0..cap).map(|i| unapplied("mpesa", &format!("JUNK{i:06}"), now)),
    );
    let over = writer::apply_now(&mut conn, &unapplied("mpesa", "JUNKOVER", now), &settings());
    match over {
        Err(e @ LedgerError::Full(_)) => {
            assert!(e.to_string().contains("unapplied payments of mpesa"), "{e}");
            assert_eq!(e.reason(), "store_full");
        }
        other => panic!("expected Full, got {:?}", other.map(|a| a.outcome)),
    }
    assert_eq!(kept(&conn), cap as usize, "nothing written");
    // A reference already kept is still answered (Daraja's retries), and other sources are
    // not held up by this one.
    writer::apply_now(
        &mut conn,
        &unapplied("mpesa", "JUNK000000", now),
        &settings(),
    )
    .unwrap();
    writer::apply_now(&mut conn, &unapplied("cloud", "JUNKOVER", now), &settings()).unwrap();
    assert_eq!(kept(&conn), cap as usize + 1);
}

#[test]
fn unapplied_payments_older_than_the_retention_are_pruned_when_the_source_keeps_a_new_one() {
    let (_dir, mut conn) = open();
    let now = store::now_ms();
    let retention = store::UNAPPLIED_RETENTION.as_millis() as i64;
    apply_all(
        &mut conn,
        [
            unapplied("mpesa", "OLD", now - retention - 1),
            unapplied("mpesa", "RECENT", now - retention + 60_000),
            unapplied("other", "OLDOTHER", now - retention - 1),
        ],
    );
    writer::apply_now(&mut conn, &unapplied("mpesa", "NEW", now), &settings()).unwrap();
    let left: Vec<String> = store::unapplied(&conn, false)
        .unwrap()
        .into_iter()
        .map(|u| u.reference)
        .collect();
    assert_eq!(left, vec!["OLDOTHER", "RECENT", "NEW"]);
}

#[test]
fn a_plugins_store_refuses_a_new_key_past_its_limits_while_overwrites_and_deletes_still_work() {
    let (_dir, mut conn) = open();
    let put = |key: &str, value: Option<&str>| Op::KvPut {
        plugin: "mpesa".into(),
        key: key.into(),
        value: value.map(str::to_string),
    };
    apply_all(
        &mut conn,
        (0..store::KV_MAX_KEYS).map(|i| put(&format!("stk/{i}"), Some("{}"))),
    );
    let full = writer::apply_now(&mut conn, &put("stk/new", Some("{}")), &settings());
    assert!(
        matches!(full, Err(LedgerError::Full(_))),
        "a new key is refused"
    );
    assert_eq!(store::kv_get(&conn, "mpesa", "stk/new").unwrap(), None);
    writer::apply_now(
        &mut conn,
        &put("stk/1", Some("{\"state\":\"credited\"}")),
        &settings(),
    )
    .expect("an existing key may be rewritten");
    writer::apply_now(&mut conn, &put("stk/2", None), &settings()).expect("a delete always works");
    writer::apply_now(&mut conn, &put("stk/new", Some("{}")), &settings())
        .expect("room again after the delete");
    // Other plugins have their own budget.
    let other = Op::KvPut {
        plugin: "other".into(),
        key: "k".into(),
        value: Some("v".into()),
    };
    writer::apply_now(&mut conn, &other, &settings()).unwrap();

    // The byte budget: values of 60 KiB up to 16 MiB.
    let (_dir2, mut conn) = open();
    let big = "x".repeat(60 * 1024);
    let fits = store::KV_MAX_BYTES as usize / (big.len() + 8);
    apply_all(
        &mut conn,
        (0..fits).map(|i| put(&format!("b/{i:04}"), Some(&big))),
    );
    let full = writer::apply_now(&mut conn, &put("b/more", Some(&big)), &settings());
    assert!(
        matches!(full, Err(LedgerError::Full(_))),
        "past the byte budget"
    );
    writer::apply_now(&mut conn, &put("b/0001", Some("small")), &settings())
        .expect("shrinking a value always works");
}
