//! SQLite: the schema and every SQL statement of the gateway.
//!
//! Architecture invariant: nothing outside this module writes SQL. The database is WAL with
//! `synchronous = FULL`, so a committed transaction survives a power cut; the daemon writes
//! through one thread ([`crate::writer`]) and the CLI may write concurrently through its own
//! connection (SQLite serialises the two with `BEGIN IMMEDIATE` and a busy timeout).
//!
//! A meter's account is its `meters` row **plus** any consumption events newer than the row
//! (`seq > max(meta.folded_seq, meters.state_seq)`): a report appends its compact event
//! ([`crate::consumption`]), which carries the account after it, and does not rewrite the row.
//! [`fold`] brings the rows up to date (the daemon's writer when it starts and then every 2
//! minutes or 100,000 reports, the CLI before it changes anything); every reader here overlays
//! the newer events, so nobody sees a stale balance. A report thus writes one small row, not that row plus its meter's.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::consumption::Consumption;
use crate::ledger::Account;
use crate::meter::MeterId;

pub use rusqlite::Error as DbError;

const SCHEMA_VERSION: i64 = 4;

/// Page size of new databases. A commit writes whole pages to the WAL, and at a site's pace
/// (one report per commit) small pages mean fewer bytes per report.
const PAGE_SIZE: u32 = 1024;

/// The `events` table's columns: [`SCHEMA`] creates it and [`migrate_v1`] rebuilds it.
macro_rules! events_columns {
    () => {
        "(
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    meter TEXT,
    at INTEGER NOT NULL,
    data ANY NOT NULL
) STRICT"
    };
}

const SCHEMA: &str = concat!(
    r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS meters (
    id TEXT PRIMARY KEY,
    name TEXT,
    phone TEXT,
    secret_hash TEXT NOT NULL,
    balance_wh INTEGER NOT NULL DEFAULT 0,
    ledger_seq INTEGER NOT NULL DEFAULT 0,
    v2_seq INTEGER,
    v2_energy_wh INTEGER,
    v1_total_wh INTEGER NOT NULL DEFAULT 0,
    total_consumed_wh INTEGER NOT NULL DEFAULT 0,
    status TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    created_at INTEGER NOT NULL,
    state_seq INTEGER NOT NULL DEFAULT 0,
    legacy_anonymous INTEGER NOT NULL DEFAULT 0,
    legacy_source TEXT,
    tariff TEXT,
    money BLOB
) STRICT;
CREATE TABLE IF NOT EXISTS payments (
    source TEXT NOT NULL,
    reference TEXT NOT NULL,
    meter TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    credit_wh INTEGER NOT NULL,
    balance_after_wh INTEGER NOT NULL,
    at INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    PRIMARY KEY (source, reference)
) STRICT;
CREATE INDEX IF NOT EXISTS payments_by_meter ON payments (meter, at);
-- A reference credits once per site whatever its source, compared without ASCII case: the
-- primary key (source, reference) cannot answer that lookup, this index does (200,000
-- payments: 15 us a lookup instead of a 49 ms scan, for about 19 bytes and one page per payment).
CREATE INDEX IF NOT EXISTS payments_by_reference ON payments (reference COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS events "#,
    events_columns!(),
    r#";
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink TEXT PRIMARY KEY,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    delivered_total INTEGER NOT NULL DEFAULT 0,
    dead_total INTEGER NOT NULL DEFAULT 0,
    failures_total INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at INTEGER,
    updated_at INTEGER
) STRICT;
CREATE TABLE IF NOT EXISTS plugin_kv (
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (plugin, key)
) STRICT;
CREATE TABLE IF NOT EXISTS unapplied_payments (
    source TEXT NOT NULL,
    reference TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    account TEXT NOT NULL,
    phone TEXT,
    reason TEXT NOT NULL,
    raw TEXT,
    received_at INTEGER NOT NULL,
    applied_meter TEXT,
    applied_at INTEGER,
    PRIMARY KEY (source, reference)
) STRICT;
CREATE TABLE IF NOT EXISTS dead_letters (
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
) STRICT;
"#
);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("database belongs to gateway {found:?} but the configuration says {configured:?}")]
    WrongGateway { found: String, configured: String },
    #[error(
        "database schema version {0} is newer than this gateway understands ({SCHEMA_VERSION})"
    )]
    NewerSchema(i64),
    #[error(
        "database schema version {0} is older than this gateway's ({SCHEMA_VERSION}): start the \
         daemon once (`umeme-gateway run`, or restart the service) to upgrade it"
    )]
    OlderSchema(i64),
}

/// Opens (creating when needed) the database at `path` for gateway `gateway_id`.
pub fn open(path: &Path, gateway_id: &str) -> Result<Connection, StoreError> {
    open_with(path, gateway_id, true)
}

/// [`open`] for one-off commands (the CLI): an older schema is an error, not upgraded, since a
/// daemon of the older version may still be running on it.
pub fn open_without_upgrade(path: &Path, gateway_id: &str) -> Result<Connection, StoreError> {
    open_with(path, gateway_id, false)
}

fn open_with(path: &Path, gateway_id: &str, upgrade: bool) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Only takes effect on a new, empty database.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version: Option<i64> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok());
    match version {
        Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema(v)),
        Some(1) if upgrade => {
            migrate_v1(&tx)?;
            migrate_v2(&tx)?;
            migrate_v3(&tx)?;
        }
        Some(2) if upgrade => {
            migrate_v2(&tx)?;
            migrate_v3(&tx)?;
        }
        Some(3) if upgrade => migrate_v3(&tx)?,
        Some(v) if v < SCHEMA_VERSION => return Err(StoreError::OlderSchema(v)),
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
        }
    }
    let found: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'gateway_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    match found {
        Some(found) if found != gateway_id => {
            return Err(StoreError::WrongGateway {
                found,
                configured: gateway_id.to_string(),
            })
        }
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('gateway_id', ?1)",
                [gateway_id],
            )?;
        }
    }
    tx.commit()?;
    Ok(conn)
}

/// Schema 1 → 2: events lose AUTOINCREMENT (its counter row was one more page written per
/// commit) and take compact records; meters learn which event their row reflects. The event
/// counter carries over, so event ids stay unique and sink cursors stay valid.
fn migrate_v1(tx: &Connection) -> Result<(), StoreError> {
    let (count, last): (i64, i64) = tx.query_row(
        "SELECT COUNT(*), COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)
         FROM events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tracing::info!(
        events = count,
        "upgrading the database from schema 1 to 2 (one time)"
    );
    tx.execute_batch(concat!(
        "ALTER TABLE meters ADD COLUMN state_seq INTEGER NOT NULL DEFAULT 0;
         CREATE TABLE events_v2 ",
        events_columns!(),
        ";
         INSERT INTO events_v2 (seq, kind, meter, at, data) SELECT seq, kind, meter, at, data FROM events;
         DROP TABLE events;
         ALTER TABLE events_v2 RENAME TO events;"
    ))?;
    set_meta(tx, "event_seq_floor", last)?;
    set_meta(tx, "folded_seq", last)?;
    set_meta(tx, "schema_version", 2)?;
    Ok(())
}

/// Schema 2 → 3: meters learn the opt-in for the original firmware's anonymous CONNECT and
/// its optional source-address pin. Existing meters stay credential-only.
fn migrate_v2(tx: &Connection) -> Result<(), StoreError> {
    tracing::info!("upgrading the database from schema 2 to 3 (one time)");
    tx.execute_batch(
        "ALTER TABLE meters ADD COLUMN legacy_anonymous INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE meters ADD COLUMN legacy_source TEXT;",
    )?;
    set_meta(tx, "schema_version", 3)?;
    Ok(())
}

/// Schema 3 → 4 (issue 16, the money ledger): meters learn their tariff (`NULL`: the site's
/// default) and their money account (`money`, the compact form of
/// [`crate::consumption::money_column`]). The money stays `NULL` here: the writer converts a
/// meter's Wh balance at its tariff's price the first time it touches the account
/// ([`crate::ledger::Account::ensure_money`]), since only it knows the configured tariffs. So
/// a flat-rate site's balances keep their value.
fn migrate_v3(tx: &Connection) -> Result<(), StoreError> {
    tracing::info!("upgrading the database from schema 3 to 4 (one time)");
    tx.execute_batch(
        "ALTER TABLE meters ADD COLUMN tariff TEXT;
         ALTER TABLE meters ADD COLUMN money BLOB;",
    )?;
    set_meta(tx, "schema_version", 4)?;
    Ok(())
}

fn set_meta(tx: &Connection, key: &str, value: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, CAST(?2 AS TEXT))
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---- meters ----

/// A meter as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterRow {
    pub id: MeterId,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub balance_wh: i64,
    pub balance_units: f64,
    pub ledger_seq: i64,
    pub ack_seq: Option<u32>,
    pub total_consumed_wh: i64,
    pub relay: crate::payload::Relay,
    pub status: Option<String>,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub created_at: i64,
    /// The meter may CONNECT without credentials (the original Clean firmware).
    pub legacy_anonymous: bool,
    /// When set, an anonymous CONNECT must come from this address.
    pub legacy_source: Option<String>,
    /// The meter's tariff; `None`: the site's default.
    pub tariff: Option<String>,
    /// The money account (issue 16); `None` until the writer first priced this meter.
    #[serde(skip)]
    pub money: Option<crate::tariff::account::MoneyAccount>,
}

const METER_COLUMNS: &str = "id, name, phone, balance_wh, ledger_seq, v2_seq, total_consumed_wh, \
     status, online, last_seen, created_at, state_seq, legacy_anonymous, legacy_source, tariff, money";

/// `meters.money`: absent, or a damaged value read as absent (the writer then converts the Wh
/// balance again rather than failing every op of the meter).
fn money_of(bytes: Option<Vec<u8>>) -> Option<crate::tariff::account::MoneyAccount> {
    bytes.and_then(|b| crate::consumption::money_from_column(&b).ok())
}

fn meter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(MeterRow, i64)> {
    let id: String = r.get(0)?;
    let balance_wh: i64 = r.get(3)?;
    let row = MeterRow {
        // Ids are validated before they are inserted; a hand-edited row still reads.
        id: MeterId::parse(&id).unwrap_or_else(|_| MeterId::parse("invalid").expect("valid")),
        name: r.get(1)?,
        phone: r.get(2)?,
        balance_wh,
        balance_units: crate::meter::wh_to_units(balance_wh),
        ledger_seq: r.get(4)?,
        ack_seq: r.get(5)?,
        total_consumed_wh: r.get(6)?,
        relay: crate::payload::Relay::for_balance(balance_wh),
        status: r.get(7)?,
        online: r.get(8)?,
        last_seen: r.get(9)?,
        created_at: r.get(10)?,
        legacy_anonymous: r.get(12)?,
        legacy_source: r.get(13)?,
        tariff: r.get(14)?,
        money: money_of(r.get(15)?),
    };
    Ok((row, r.get(11)?))
}

impl MeterRow {
    /// Takes the account from a consumption event newer than the row.
    fn overlay(&mut self, newer: &Unfolded) {
        let a = &newer.record.account;
        self.balance_wh = a.balance_wh;
        self.balance_units = crate::meter::wh_to_units(a.balance_wh);
        self.ledger_seq = a.ledger_seq;
        self.ack_seq = a.v2_seq;
        self.total_consumed_wh = a.total_consumed_wh;
        self.relay = crate::payload::Relay::for_balance(a.balance_wh);
        self.money.clone_from(&a.money);
        self.last_seen = Some(self.last_seen.map_or(newer.at, |t| t.max(newer.at)));
    }
}

/// Runs `f` on one snapshot of the database: in the caller's transaction, or in a read
/// transaction of its own.
fn snapshot<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if conn.is_autocommit() {
        let tx = conn.unchecked_transaction()?;
        f(&tx)
    } else {
        f(conn)
    }
}

/// A meter with its account up to date (the row plus newer consumption events).
pub fn meter(conn: &Connection, id: &MeterId) -> Result<Option<MeterRow>, StoreError> {
    snapshot(conn, |tx| meter_in(tx, id))
}

fn meter_in(tx: &Connection, id: &MeterId) -> Result<Option<MeterRow>, StoreError> {
    let Some((mut row, state_seq)) = tx
        .query_row(
            &format!("SELECT {METER_COLUMNS} FROM meters WHERE id = ?1"),
            [id.as_str()],
            meter_row,
        )
        .optional()?
    else {
        return Ok(None);
    };
    if let Some(newer) = latest_unfolded(tx, id, state_seq)? {
        row.overlay(&newer);
    }
    Ok(Some(row))
}

/// Every meter, by id, with its account up to date.
pub fn meters(conn: &Connection) -> Result<Vec<MeterRow>, StoreError> {
    snapshot(conn, meters_in)
}

fn meters_in(tx: &Connection) -> Result<Vec<MeterRow>, StoreError> {
    let mut st = tx.prepare(&format!("SELECT {METER_COLUMNS} FROM meters ORDER BY id"))?;
    let rows = st
        .query_map([], meter_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let newer = unfolded(tx)?;
    Ok(rows
        .into_iter()
        .map(|(mut row, state_seq)| {
            if let Some(n) = newer.get(row.id.as_str()).filter(|n| n.seq > state_seq) {
                row.overlay(n);
            }
            row
        })
        .collect())
}

pub fn secret_hash(conn: &Connection, id: &MeterId) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT secret_hash FROM meters WHERE id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))
        .optional()?)
}

/// `(legacy_anonymous, legacy_source)` of a meter, `None` when it does not exist.
pub fn legacy_access(
    conn: &Connection,
    id: &MeterId,
) -> Result<Option<(bool, Option<String>)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT legacy_anonymous, legacy_source FROM meters WHERE id = ?1")?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Meters that may CONNECT without credentials, by id.
pub fn legacy_anonymous_meters(
    conn: &Connection,
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    let mut st = conn
        .prepare("SELECT id, legacy_source FROM meters WHERE legacy_anonymous != 0 ORDER BY id")?;
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Changes what is given; `Ok(false)` when the meter does not exist.
pub fn set_legacy(
    tx: &Connection,
    id: &MeterId,
    anonymous: Option<bool>,
    source: Option<Option<&str>>,
) -> Result<bool, StoreError> {
    let n = tx.execute(
        "UPDATE meters SET
             legacy_anonymous = COALESCE(?2, legacy_anonymous),
             legacy_source = CASE WHEN ?3 THEN ?4 ELSE legacy_source END
         WHERE id = ?1",
        params![id.as_str(), anonymous, source.is_some(), source.flatten()],
    )?;
    Ok(n == 1)
}

pub struct NewMeter<'a> {
    pub id: &'a MeterId,
    pub name: Option<&'a str>,
    pub phone: Option<&'a str>,
    pub secret_hash: &'a str,
    pub at: i64,
}

/// Inserts a meter; `Ok(false)` when it already exists.
pub fn insert_meter(tx: &Connection, m: &NewMeter<'_>) -> Result<bool, StoreError> {
    let n = tx.execute(
        "INSERT INTO meters (id, name, phone, secret_hash, created_at, state_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, (SELECT COALESCE(MAX(seq), 0) FROM events))
         ON CONFLICT (id) DO NOTHING",
        params![m.id.as_str(), m.name, m.phone, m.secret_hash, m.at],
    )?;
    Ok(n == 1)
}

pub fn delete_meter(tx: &Connection, id: &MeterId) -> Result<bool, StoreError> {
    Ok(tx.execute("DELETE FROM meters WHERE id = ?1", [id.as_str()])? == 1)
}

pub fn set_secret_hash(tx: &Connection, id: &MeterId, hash: &str) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE meters SET secret_hash = ?2 WHERE id = ?1",
        params![id.as_str(), hash],
    )? == 1)
}

// The statements on the report path are cached: compiling them was 40 % of the writer's CPU.

/// A meter's account as its row has it, and the `seq` of the event the row reflects. Newer
/// consumption events may exist: see [`account`].
pub fn account_row(tx: &Connection, id: &MeterId) -> Result<Option<(Account, i64)>, StoreError> {
    Ok(account_row_with_tariff(tx, id)?.map(|(a, seq, _)| (a, seq)))
}

/// [`account_row`] and the meter's tariff (`None`: the default), in the same statement: the
/// report path reads nothing more than before.
pub fn account_row_with_tariff(
    tx: &Connection,
    id: &MeterId,
) -> Result<Option<(Account, i64, Option<String>)>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT balance_wh, ledger_seq, v2_seq, v2_energy_wh, v1_total_wh, total_consumed_wh,
                    state_seq, tariff, money
             FROM meters WHERE id = ?1",
        )?
        .query_row([id.as_str()], |r| {
            Ok((
                Account {
                    balance_wh: r.get(0)?,
                    ledger_seq: r.get(1)?,
                    v2_seq: r.get(2)?,
                    v2_energy_wh: r.get(3)?,
                    v1_total_wh: r.get(4)?,
                    total_consumed_wh: r.get(5)?,
                    money: money_of(r.get(8)?),
                },
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .optional()?)
}

/// Every meter's id (for the standing-charge timer).
pub fn meter_ids(tx: &Connection) -> Result<Vec<MeterId>, StoreError> {
    let mut st = tx.prepare_cached("SELECT id FROM meters ORDER BY id")?;
    let ids = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids.iter().filter_map(|i| MeterId::parse(i).ok()).collect())
}

/// Sets (or with `None` clears, back to the default) a meter's tariff; `Ok(false)` when the
/// meter does not exist.
pub fn set_tariff(tx: &Connection, id: &MeterId, tariff: Option<&str>) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE meters SET tariff = ?2 WHERE id = ?1",
        params![id.as_str(), tariff],
    )? == 1)
}

/// A meter's account, up to date: its row, or the newest consumption event after the row.
pub fn account(conn: &Connection, id: &MeterId) -> Result<Option<Account>, StoreError> {
    snapshot(conn, |tx| {
        let Some((row, state_seq)) = account_row(tx, id)? else {
            return Ok(None);
        };
        Ok(Some(match latest_unfolded(tx, id, state_seq)? {
            Some(newer) => newer.record.account,
            None => row,
        }))
    })
}

/// Writes an account to the meter's row as of event `state_seq` (a payment's, or a folded
/// report's), unless the row is already as new; `Ok(false)` then.
pub fn save_account(
    tx: &Connection,
    id: &str,
    a: &Account,
    state_seq: i64,
) -> Result<bool, StoreError> {
    let n = tx
        .prepare_cached(
            "UPDATE meters SET balance_wh = ?2, ledger_seq = ?3, v2_seq = ?4, v2_energy_wh = ?5,
             v1_total_wh = ?6, total_consumed_wh = ?7, state_seq = ?8, money = ?9
             WHERE id = ?1 AND state_seq < ?8",
        )?
        .execute(params![
            id,
            a.balance_wh,
            a.ledger_seq,
            a.v2_seq,
            a.v2_energy_wh,
            a.v1_total_wh,
            a.total_consumed_wh,
            state_seq,
            a.money.as_ref().map(crate::consumption::money_column),
        ])?;
    Ok(n == 1)
}

pub fn set_presence(
    tx: &Connection,
    id: &MeterId,
    status: Option<&str>,
    online: bool,
    at: i64,
) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached(
            "UPDATE meters SET status = COALESCE(?2, status), online = ?3, last_seen = ?4 WHERE id = ?1",
        )?
        .execute(params![id.as_str(), status, online, at])?
        == 1)
}

/// Moves a meter's `last_seen` forward to `at` (never back; never to before the meter was
/// added, so a meter added again does not inherit the old one's).
pub fn touch(tx: &Connection, id: &str, at: i64) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE meters SET last_seen = MAX(COALESCE(last_seen, 0), ?2)
         WHERE id = ?1 AND created_at <= ?2",
    )?
    .execute(params![id, at])?;
    Ok(())
}

// ---- payments ----

/// A payment as recorded: the first result of a (source, reference).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentRow {
    pub source: String,
    pub reference: String,
    pub meter: String,
    pub amount_cents: i64,
    pub credit_wh: i64,
    pub balance_after_wh: i64,
    pub at: i64,
    pub event_seq: i64,
}

const PAYMENT_COLUMNS: &str =
    "source, reference, meter, amount_cents, credit_wh, balance_after_wh, at, event_seq";

fn payment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PaymentRow> {
    Ok(PaymentRow {
        source: r.get(0)?,
        reference: r.get(1)?,
        meter: r.get(2)?,
        amount_cents: r.get(3)?,
        credit_wh: r.get(4)?,
        balance_after_wh: r.get(5)?,
        at: r.get(6)?,
        event_seq: r.get(7)?,
    })
}

/// The first payment with this reference from any source, ASCII case ignored
/// (`payments_by_reference`).
pub fn payment_by_reference(
    conn: &Connection,
    reference: &str,
) -> Result<Option<PaymentRow>, StoreError> {
    Ok(conn
        .query_row(&payment_by_reference_sql(), [reference], payment_row)
        .optional()?)
}

fn payment_by_reference_sql() -> String {
    format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE reference = ?1 COLLATE NOCASE \
         ORDER BY event_seq LIMIT 1"
    )
}

pub fn payments_of(conn: &Connection, meter: &MeterId) -> Result<Vec<PaymentRow>, StoreError> {
    let mut st = conn.prepare(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE meter = ?1 ORDER BY at, event_seq"
    ))?;
    let rows = st
        .query_map([meter.as_str()], payment_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn insert_payment(tx: &Connection, p: &PaymentRow) -> Result<(), StoreError> {
    tx.execute(
        &format!(
            "INSERT INTO payments ({PAYMENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ),
        params![
            p.source,
            p.reference,
            p.meter,
            p.amount_cents,
            p.credit_wh,
            p.balance_after_wh,
            p.at,
            p.event_seq
        ],
    )?;
    Ok(())
}

// ---- unapplied payments ----

/// Limits of the unapplied-payments store (one place): at most this many not yet applied per
/// source (more are refused, nothing written, so forged callbacks cannot fill the disk), and
/// records older than the retention are pruned when the source records a new one.
pub const UNAPPLIED_MAX_OPEN_PER_SOURCE: i64 = 1_000;
pub const UNAPPLIED_RETENTION: Duration = Duration::from_secs(180 * 24 * 3600);

/// A payment that moved money but credited no meter, kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnappliedRow {
    pub source: String,
    pub reference: String,
    pub amount_cents: i64,
    /// What the payer gave as the account (empty for a till payment).
    pub account: String,
    pub phone: Option<String>,
    pub reason: String,
    pub raw: Option<String>,
    pub received_at: i64,
    /// Set once `payment apply` credited it.
    pub applied_meter: Option<String>,
    pub applied_at: Option<i64>,
}

const UNAPPLIED_COLUMNS: &str = "source, reference, amount_cents, account, phone, reason, raw, \
    received_at, applied_meter, applied_at";

fn unapplied_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UnappliedRow> {
    Ok(UnappliedRow {
        source: r.get(0)?,
        reference: r.get(1)?,
        amount_cents: r.get(2)?,
        account: r.get(3)?,
        phone: r.get(4)?,
        reason: r.get(5)?,
        raw: r.get(6)?,
        received_at: r.get(7)?,
        applied_meter: r.get(8)?,
        applied_at: r.get(9)?,
    })
}

/// Keeps `u` unless its (source, reference) is already kept; `false` when it was.
pub fn insert_unapplied(tx: &Connection, u: &UnappliedRow) -> Result<bool, StoreError> {
    let n = tx.execute(
        &format!(
            "INSERT INTO unapplied_payments ({UNAPPLIED_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, NULL)
             ON CONFLICT (source, reference) DO NOTHING"
        ),
        params![
            u.source,
            u.reference,
            u.amount_cents,
            u.account,
            u.phone,
            u.reason,
            u.raw,
            u.received_at
        ],
    )?;
    Ok(n == 1)
}

/// How many of `source`'s records wait for the operator.
pub fn unapplied_open(tx: &Connection, source: &str) -> Result<i64, StoreError> {
    Ok(tx.query_row(
        "SELECT COUNT(*) FROM unapplied_payments WHERE source = ?1 AND applied_meter IS NULL",
        [source],
        |r| r.get(0),
    )?)
}

/// Deletes `source`'s records received before `before`; returns how many.
pub fn prune_unapplied(tx: &Connection, source: &str, before: i64) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM unapplied_payments WHERE source = ?1 AND received_at < ?2",
        params![source, before],
    )?)
}

/// Every kept record (only those not applied yet with `open_only`), oldest first.
pub fn unapplied(conn: &Connection, open_only: bool) -> Result<Vec<UnappliedRow>, StoreError> {
    let filter = if open_only {
        "WHERE applied_meter IS NULL"
    } else {
        ""
    };
    let mut st = conn.prepare(&format!(
        "SELECT {UNAPPLIED_COLUMNS} FROM unapplied_payments {filter} ORDER BY received_at, reference"
    ))?;
    let rows = st
        .query_map([], unapplied_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The records with this reference (one per source that has it).
pub fn unapplied_by_reference(
    conn: &Connection,
    reference: &str,
) -> Result<Vec<UnappliedRow>, StoreError> {
    let mut st = conn.prepare(&format!(
        "SELECT {UNAPPLIED_COLUMNS} FROM unapplied_payments WHERE reference = ?1 ORDER BY source"
    ))?;
    let rows = st
        .query_map([reference], unapplied_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn mark_unapplied_applied(
    tx: &Connection,
    source: &str,
    reference: &str,
    meter: &str,
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE unapplied_payments SET applied_meter = ?3, applied_at = ?4
         WHERE source = ?1 AND reference = ?2",
        params![source, reference, meter, at],
    )?;
    Ok(())
}

// ---- events ----

/// Events are numbered on from the newest one (numbers are never reused: housekeeping always
/// keeps the newest event), and past the counter carried over from schema 1, whose newest
/// events may have been removed.
const APPEND_EVENT: &str = "INSERT INTO events (seq, kind, meter, at, data) VALUES (
    MAX(COALESCE((SELECT MAX(seq) FROM events), 0),
        COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'event_seq_floor'), 0)) + 1,
    ?1, ?2, ?3, ?4) RETURNING seq";

/// Appends an event in the caller's transaction and returns its `seq`.
pub fn append_event(
    tx: &Connection,
    kind: &str,
    meter: Option<&MeterId>,
    at: i64,
    data: &serde_json::Value,
) -> Result<i64, StoreError> {
    Ok(tx.prepare_cached(APPEND_EVENT)?.query_row(
        params![kind, meter.map(MeterId::as_str), at, data.to_string()],
        |r| r.get(0),
    )?)
}

/// Appends a consumption event as its compact record and returns its `seq`.
pub fn append_consumption(
    tx: &Connection,
    meter: &MeterId,
    at: i64,
    record: &Consumption,
) -> Result<i64, StoreError> {
    Ok(tx.prepare_cached(APPEND_EVENT)?.query_row(
        params!["consumption", meter.as_str(), at, record.encode()],
        |r| r.get(0),
    )?)
}

/// An event's `data` as sinks see it: JSON text, or a consumption record rendered as JSON.
fn event_data(value: rusqlite::types::ValueRef<'_>) -> serde_json::Value {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Text(t) => serde_json::from_slice(t).unwrap_or(serde_json::Value::Null),
        ValueRef::Blob(b) => match Consumption::decode(b) {
            Ok(c) => c.to_json(),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        _ => serde_json::Value::Null,
    }
}

/// A consumption event that may be newer than its meter's row.
#[derive(Debug, Clone)]
pub struct Unfolded {
    pub seq: i64,
    pub at: i64,
    pub record: Consumption,
}

/// Every consumption event before `seq` is reflected in the meters' rows.
pub fn folded_seq(conn: &Connection) -> Result<i64, StoreError> {
    meta_int(conn, "folded_seq")
}

/// The newest consumption event of `meter` newer than both its row (`state_seq`) and the fold.
fn latest_unfolded(
    conn: &Connection,
    meter: &MeterId,
    state_seq: i64,
) -> Result<Option<Unfolded>, StoreError> {
    let after = state_seq.max(folded_seq(conn)?);
    let row = conn
        .prepare_cached(
            "SELECT seq, at, data FROM events
             WHERE seq > ?1 AND meter = ?2 AND kind = 'consumption' AND typeof(data) = 'blob'
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![after, meter.as_str()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .optional()?;
    Ok(row.and_then(|(seq, at, data)| {
        Consumption::decode(&data)
            .ok()
            .map(|record| Unfolded { seq, at, record })
    }))
}

/// The newest unfolded consumption event of each meter, by meter id.
fn unfolded(conn: &Connection) -> Result<HashMap<String, Unfolded>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, meter, at, data FROM events
         WHERE seq > ?1 AND kind = 'consumption' AND typeof(data) = 'blob' AND meter IS NOT NULL
         ORDER BY seq",
    )?;
    let mut rows = st.query([folded_seq(conn)?])?;
    let mut newest = HashMap::new();
    while let Some(r) = rows.next()? {
        let rusqlite::types::ValueRef::Blob(data) = r.get_ref(3)? else {
            continue;
        };
        let Ok(record) = Consumption::decode(data) else {
            continue;
        };
        newest.insert(
            r.get::<_, String>(1)?,
            Unfolded {
                seq: r.get(0)?,
                at: r.get(2)?,
                record,
            },
        );
    }
    Ok(newest)
}

/// What one [`fold`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Folded {
    /// Meter rows brought up to date.
    pub meters: usize,
    /// The new `folded_seq`.
    pub through: i64,
}

/// Writes the newest unfolded consumption event of every meter into its row (a row already
/// as new, e.g. after a payment, is left alone), plus the `last_seen` times in `seen`, and
/// moves `folded_seq` to the newest event. Idempotent; runs in the caller's transaction.
pub fn fold<'a>(
    tx: &Connection,
    seen: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<Folded, StoreError> {
    let newest = unfolded(tx)?;
    for (meter, n) in &newest {
        save_account(tx, meter, &n.record.account, n.seq)?;
        touch(tx, meter, n.at)?;
    }
    for (meter, at) in seen {
        touch(tx, meter, at)?;
    }
    let through = last_event_seq(tx)?;
    if through > folded_seq(tx)? {
        set_meta(tx, "folded_seq", through)?;
    }
    Ok(Folded {
        meters: newest.len(),
        through,
    })
}

/// One of a meter's events that moves its money: a consumption record, or a payment's or a
/// meter event's JSON (emergency credit, standing charge).
#[derive(Debug, Clone)]
pub enum LedgerEvent {
    Consumption(Box<Consumption>),
    Json(serde_json::Value),
}

/// A meter's ledger events before `before_ms`, oldest first, handed to `f` one at a time (for
/// statements: the whole history is never held in memory).
pub fn meter_ledger_events(
    conn: &Connection,
    meter: &MeterId,
    before_ms: i64,
    mut f: impl FnMut(&str, i64, LedgerEvent),
) -> Result<(), StoreError> {
    let mut st = conn.prepare(
        "SELECT kind, at, data FROM events
         WHERE meter = ?1 AND at < ?2 AND kind IN ('consumption', 'payment', 'meter')
         ORDER BY seq",
    )?;
    let mut rows = st.query(params![meter.as_str(), before_ms])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        let at: i64 = r.get(1)?;
        let e = match r.get_ref(2)? {
            rusqlite::types::ValueRef::Blob(b) => match Consumption::decode(b) {
                Ok(c) => LedgerEvent::Consumption(Box::new(c)),
                Err(_) => continue,
            },
            v => LedgerEvent::Json(event_data(v)),
        };
        f(&kind, at, e);
    }
    Ok(())
}

/// An event as sinks see it (contract §6): the SDK's type, so plugins and the gateway share it.
pub use umeme_plugin_sdk::Event;

/// The event id: unique forever because the gateway id is fixed in the database.
pub fn event_id(gateway: &str, seq: i64) -> String {
    format!("{gateway}-{seq:012}")
}

/// Events with `seq > after`, oldest first.
pub fn events_after(
    conn: &Connection,
    gateway: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, kind, meter, at, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![after, limit as i64], |r| {
            let seq: i64 = r.get(0)?;
            Ok(Event {
                id: event_id(gateway, seq),
                seq,
                gateway: gateway.to_string(),
                kind: r.get(1)?,
                meter: r.get(2)?,
                at: r.get(3)?,
                data: event_data(r.get_ref(4)?),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn last_event_seq(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?)
}

pub fn event_count(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?)
}

/// Changes by other connections (the CLI) bump this; the daemon polls it.
pub fn data_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA data_version", [], |r| r.get(0))?)
}

/// A read-only connection to an existing database.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// A read-only connection shared by the daemon's tasks. Queries run on the blocking pool, so a
/// slow disk never stalls a tokio worker.
#[derive(Clone)]
pub struct Reader(std::sync::Arc<std::sync::Mutex<Connection>>);

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = open_read_only(path)?;
        Ok(Reader(std::sync::Arc::new(std::sync::Mutex::new(conn))))
    }

    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Io {
            path: "reader task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }
}

/// A payment or meter event, as the daemon's watch for other processes' changes sees it.
pub struct MeterChange {
    pub seq: i64,
    pub kind: String,
    pub meter: String,
    /// A payment's source (`manual` for the CLI's credits); a meter event's action.
    pub source: Option<String>,
}

/// Payments and meter removals, secret and legacy changes after `after`, oldest first.
pub fn meter_changes_after(conn: &Connection, after: i64) -> Result<Vec<MeterChange>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, kind, meter,
                CASE WHEN kind = 'payment' AND typeof(data) = 'text'
                     THEN json_extract(data, '$.source')
                     WHEN kind = 'meter' THEN json_extract(data, '$.action') END
         FROM events
         WHERE seq > ?1 AND meter IS NOT NULL
           AND (kind = 'payment' OR (kind = 'meter' AND typeof(data) = 'text'
                AND json_extract(data, '$.action') IN ('removed', 'secret_changed', 'legacy_changed',
                                                       'emergency_credit', 'standing_charge')))
         ORDER BY seq",
    )?;
    let rows = st
        .query_map([after], |r| {
            Ok(MeterChange {
                seq: r.get(0)?,
                kind: r.get(1)?,
                meter: r.get(2)?,
                source: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

// ---- the outbox: sink cursors, dead letters, housekeeping ----

/// The `seq` through which `sink` has taken delivery (0 for a new sink).
pub fn sink_cursor(conn: &Connection, sink: &str) -> Result<i64, StoreError> {
    Ok(conn
        .query_row(
            "SELECT delivered_seq FROM sink_cursors WHERE sink = ?1",
            [sink],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Moves a sink's cursor forward (never back) and records what the batch delivered.
pub fn advance_cursor(
    tx: &Connection,
    sink: &str,
    through: i64,
    delivered: i64,
    dead: &[(i64, String, String)],
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sink_cursors (sink, delivered_seq, delivered_total, dead_total, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (sink) DO UPDATE SET
           delivered_seq = MAX(delivered_seq, excluded.delivered_seq),
           delivered_total = delivered_total + excluded.delivered_total,
           dead_total = dead_total + excluded.dead_total,
           updated_at = excluded.updated_at",
        params![sink, through, delivered, dead.len() as i64, at],
    )?;
    for (seq, event, reason) in dead {
        tx.execute(
            "INSERT INTO dead_letters (sink, seq, event, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (sink, seq) DO NOTHING",
            params![sink, seq, event, reason, at],
        )?;
    }
    Ok(())
}

pub fn record_sink_failure(
    tx: &Connection,
    sink: &str,
    error: &str,
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO sink_cursors (sink, failures_total, last_error, last_error_at, updated_at)
         VALUES (?1, 1, ?2, ?3, ?3)
         ON CONFLICT (sink) DO UPDATE SET failures_total = failures_total + 1,
           last_error = excluded.last_error, last_error_at = excluded.last_error_at",
        params![sink, error, at],
    )?;
    Ok(())
}

/// `(seq, reason)` of a sink's dead letters, oldest first.
pub fn dead_letters(conn: &Connection, sink: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut st =
        conn.prepare("SELECT seq, reason FROM dead_letters WHERE sink = ?1 ORDER BY seq")?;
    let rows = st
        .query_map([sink], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One sink's delivery state, for `outbox status` and `/api/outbox`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub delivered_seq: i64,
    pub backlog: i64,
    /// Age in ms of the oldest event waiting for this sink.
    pub oldest_undelivered_ms: Option<i64>,
    pub delivered_total: i64,
    pub dead_total: i64,
    pub failures_total: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxStatus {
    pub events_stored: i64,
    pub last_seq: i64,
    pub used_bytes: i64,
    pub max_bytes: u64,
    pub dropped_total: i64,
    pub sinks: Vec<SinkStatus>,
}

/// `(name, event kinds)` of each configured sink.
pub fn outbox_status(
    conn: &Connection,
    sinks: &[(String, Vec<String>)],
    max_bytes: u64,
    now: i64,
) -> Result<OutboxStatus, StoreError> {
    let mut out = Vec::with_capacity(sinks.len());
    for (name, kinds) in sinks {
        let kinds_json = serde_json::to_string(kinds).unwrap_or_else(|_| "[]".into());
        let row = conn
            .query_row(
                "SELECT delivered_seq, delivered_total, dead_total, failures_total, last_error, last_error_at
                 FROM sink_cursors WHERE sink = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?
            .unwrap_or((0, 0, 0, 0, None, None));
        let (backlog, oldest): (i64, Option<i64>) = conn.query_row(
            "SELECT COUNT(*), MIN(at) FROM events
             WHERE seq > ?1 AND kind IN (SELECT value FROM json_each(?2))",
            params![row.0, kinds_json],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        out.push(SinkStatus {
            name: name.clone(),
            delivered_seq: row.0,
            backlog,
            oldest_undelivered_ms: oldest.map(|at| (now - at).max(0)),
            delivered_total: row.1,
            dead_total: row.2,
            failures_total: row.3,
            last_error: row.4,
            last_error_at: row.5,
        });
    }
    Ok(OutboxStatus {
        events_stored: event_count(conn)?,
        last_seq: last_event_seq(conn)?,
        used_bytes: used_bytes(conn)?,
        max_bytes,
        dropped_total: meta_int(conn, "dropped_total")?,
        sinks: out,
    })
}

fn meta_int(conn: &Connection, key: &str) -> Result<i64, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Bytes of the database's pages in use (free pages are reused before the file grows).
pub fn used_bytes(conn: &Connection) -> Result<i64, StoreError> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((pages - free) * size)
}

/// Event kinds that may be dropped when the disk cap is reached; payments, alerts and meter
/// changes never are.
pub const TELEMETRY_KINDS: [&str; 3] = ["consumption", "status", "balance"];

/// What one housekeeping pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Delivered events past their retention.
    pub expired: i64,
    /// Telemetry dropped for the disk cap, of which `undelivered` had not reached every sink.
    pub dropped: i64,
    pub undelivered: i64,
    /// Still over the cap with no telemetry left to drop.
    pub full: bool,
}

/// Removes delivered events older than `retain_after` (ms timestamp; oldest first, up to the
/// first event within its retention) and, while the database uses more than `max_bytes`,
/// telemetry: first of the meters holding the most (estimated by [`telemetry_shares`]), oldest
/// first within a meter, then the oldest of anyone's. `sinks` are the configured sinks' names;
/// with none, every event counts as delivered. At most `budget` rows go per call so the
/// writer is never held long.
pub fn prune(
    tx: &Connection,
    sinks: &[String],
    retain_after: i64,
    max_bytes: u64,
    budget: i64,
) -> Result<Pruned, StoreError> {
    let delivered = if sinks.is_empty() {
        last_event_seq(tx)?
    } else {
        let names = serde_json::to_string(sinks).unwrap_or_else(|_| "[]".into());
        tx.query_row(
            "SELECT MIN(COALESCE((SELECT delivered_seq FROM sink_cursors WHERE sink = n.value), 0))
             FROM json_each(?1) AS n",
            [names],
            |r| r.get(0),
        )?
    };
    // Never the newest event (it numbers the next one) and never an unfolded consumption event
    // (it may hold a meter's only record of its balance).
    let newest = last_event_seq(tx)? - 1;
    let folded = folded_seq(tx)?;
    // Oldest first, up to the first event still within its retention: a pass reads only what
    // it removes (plus one row), never the whole table. A timestamp from the future (a clock
    // that ran ahead) does not hold up the events after it.
    let now = now_ms();
    let mut expire_through = 0;
    {
        let mut st = tx.prepare_cached(
            "SELECT seq, at, kind = 'consumption' FROM events WHERE seq <= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = st.query(params![delivered.min(newest), budget])?;
        while let Some(r) = rows.next()? {
            let (seq, at, consumption): (i64, i64, bool) = (r.get(0)?, r.get(1)?, r.get(2)?);
            if (retain_after..=now).contains(&at) || (consumption && seq > folded) {
                break;
            }
            expire_through = seq;
        }
    }
    let mut p = Pruned {
        expired: tx.execute("DELETE FROM events WHERE seq <= ?1", [expire_through])? as i64,
        ..Pruned::default()
    };
    let chunk = 1000.min(budget);
    let mut shares: Option<Vec<Share>> = None;
    while (used_bytes(tx)? as u64) > max_bytes && p.dropped < budget {
        // The meters holding the most telemetry lose theirs first, so one flooding meter
        // drops its own before anyone else's; the rest goes oldest first as before.
        let shares = match &mut shares {
            Some(s) => s,
            None => shares.insert(telemetry_shares(tx, newest, folded)?),
        };
        let victim = shares
            .iter_mut()
            .filter(|s| s.estimate > 0)
            .max_by_key(|s| s.estimate);
        let by_meter = victim.is_some();
        let seqs: Vec<i64> = match victim {
            Some(v) => {
                let seqs: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT seq FROM events WHERE meter = ?1 AND seq > ?2
                           AND kind IN ('consumption', 'status', 'balance') AND seq <= ?3
                           AND (kind <> 'consumption' OR seq <= ?4)
                         ORDER BY seq LIMIT ?5",
                    )?
                    .query_map(params![v.meter, v.after, newest, folded, chunk], |r| {
                        r.get(0)
                    })?
                    .collect::<Result<_, _>>()?;
                v.estimate -= seqs.len().max(1) as i64;
                match seqs.last() {
                    Some(&last) => v.after = last,
                    None => v.estimate = 0,
                }
                seqs
            }
            None => tx
                .prepare_cached(
                    "SELECT seq FROM events WHERE kind IN ('consumption', 'status', 'balance')
                       AND seq <= ?2 AND (kind <> 'consumption' OR seq <= ?3)
                     ORDER BY seq LIMIT ?1",
                )?
                .query_map(params![chunk, newest, folded], |r| r.get(0))?
                .collect::<Result<_, _>>()?,
        };
        if seqs.is_empty() {
            // An estimate was off: that meter is out of the running; try the next.
            if by_meter {
                continue;
            }
            p.full = true;
            break;
        }
        let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
        for seq in &seqs {
            delete.execute([seq])?;
        }
        p.dropped += seqs.len() as i64;
        p.undelivered += seqs.iter().filter(|&&s| s > delivered).count() as i64;
    }
    if p.dropped > 0 {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('dropped_total', CAST(?1 AS TEXT))
             ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + ?1 AS TEXT)",
            [p.dropped],
        )?;
    }
    Ok(p)
}

/// One meter's estimated count of droppable telemetry, and how far its oldest were dropped.
struct Share {
    meter: Option<String>,
    estimate: i64,
    after: i64,
}

/// Probes spread over the events table to estimate which meters hold the most telemetry.
/// Without an index by meter (one more page written per report), an exact count would read
/// the whole table while the writer waits; these probes read a few thousand rows at most.
const CAP_PROBES: i64 = 512;
/// Rows one probe looks at for a droppable event before giving up on its stretch.
const CAP_PROBE_ROWS: i64 = 16;

/// Estimated droppable telemetry per meter: each probe finds the first droppable event in its
/// stretch of `seq`s and counts the stretch for that event's meter (exact for small tables).
fn telemetry_shares(tx: &Connection, newest: i64, folded: i64) -> Result<Vec<Share>, StoreError> {
    let first: Option<i64> = tx.query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))?;
    let Some(first) = first.filter(|&f| f <= newest) else {
        return Ok(Vec::new());
    };
    let step = ((newest - first + 1) / CAP_PROBES).max(1);
    let mut probe = tx.prepare_cached(
        "SELECT seq, meter FROM events WHERE seq >= ?1 AND seq < ?2 AND seq <= ?3
           AND kind IN ('consumption', 'status', 'balance') AND (kind <> 'consumption' OR seq <= ?4)
         ORDER BY seq LIMIT 1",
    )?;
    let mut counts: HashMap<Option<String>, i64> = HashMap::new();
    let mut at = first;
    while at <= newest {
        let hit: Option<(i64, Option<String>)> = probe
            .query_row(
                params![at, at + step.min(CAP_PROBE_ROWS), newest, folded],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((_, meter)) = hit {
            *counts.entry(meter).or_default() += step;
        }
        at += step;
    }
    Ok(counts
        .into_iter()
        .map(|(meter, estimate)| Share {
            meter,
            estimate,
            after: 0,
        })
        .collect())
}

// ---- plugins' key-value stores ----

/// Limits of what plugins may store (one place): a plugin's key-value store holds at most
/// this many keys and bytes (keys plus values); a write that would grow it past either is
/// refused, nothing written. Overwriting within the limits and deleting always work.
pub const KV_MAX_KEYS: i64 = 10_000;
pub const KV_MAX_BYTES: i64 = 16 * 1024 * 1024;

/// `(keys, bytes)` of a plugin's store, and the size of `key`'s current value if any.
pub fn kv_usage(
    conn: &Connection,
    plugin: &str,
    key: &str,
) -> Result<(i64, i64, Option<i64>), StoreError> {
    let (keys, bytes) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))), 0)
         FROM plugin_kv WHERE plugin = ?1",
        [plugin],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let current = conn
        .query_row(
            "SELECT length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)) FROM plugin_kv
             WHERE plugin = ?1 AND key = ?2",
            [plugin, key],
            |r| r.get(0),
        )
        .optional()?;
    Ok((keys, bytes, current))
}

pub fn kv_get(conn: &Connection, plugin: &str, key: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM plugin_kv WHERE plugin = ?1 AND key = ?2",
            [plugin, key],
            |r| r.get(0),
        )
        .optional()?)
}

/// Stores `value` under `key`, or deletes the key when `value` is `None`.
pub fn kv_put(
    tx: &Connection,
    plugin: &str,
    key: &str,
    value: Option<&str>,
) -> Result<(), StoreError> {
    match value {
        Some(v) => tx.execute(
            "INSERT INTO plugin_kv (plugin, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
            params![plugin, key, v],
        )?,
        None => tx.execute(
            "DELETE FROM plugin_kv WHERE plugin = ?1 AND key = ?2",
            params![plugin, key],
        )?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payment_is_found_by_reference_through_its_index_not_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("gateway.db"), "test-site").unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                payment_by_reference_sql()
            ))
            .unwrap()
            .query_map(["QK1234"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX payments_by_reference")),
            "{plan:?}"
        );
    }
}
