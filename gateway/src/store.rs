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

const SCHEMA_VERSION: i64 = 6;

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
    main INTEGER NOT NULL DEFAULT 0,
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
-- Schema 5 (issue 17): Wh per meter per UTC hour, written by `fold` from the consumption
-- events it folds (one upsert per meter and hour per fold, nothing per report).
CREATE TABLE IF NOT EXISTS usage_hours (
    meter TEXT NOT NULL,
    hour INTEGER NOT NULL,
    wh INTEGER NOT NULL,
    PRIMARY KEY (meter, hour)
) STRICT, WITHOUT ROWID;
-- The site's bulk supply read by hand, per local day.
CREATE TABLE IF NOT EXISTS site_readings (
    day TEXT PRIMARY KEY,
    wh INTEGER NOT NULL,
    at INTEGER NOT NULL
) STRICT;
-- Open alert episodes (meter '' for the site), so a restart does not raise them again.
CREATE TABLE IF NOT EXISTS alert_state (
    meter TEXT NOT NULL,
    alert TEXT NOT NULL,
    raised_at INTEGER NOT NULL,
    PRIMARY KEY (meter, alert)
) STRICT, WITHOUT ROWID;
-- What the alert rules need of each meter's recent reports, kept up to date by `fold`.
CREATE TABLE IF NOT EXISTS meter_watch (
    meter TEXT PRIMARY KEY,
    relay_on INTEGER NOT NULL,
    last_report_at INTEGER NOT NULL,
    last_use_at INTEGER,
    since INTEGER NOT NULL
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

/// Firmware images and rollouts (schema 6, [`migrate_v5`]): the images `firmware add` stored,
/// each rollout, and where every meter of a rollout stands.
const OTA_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS firmware (
    version TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    signature TEXT NOT NULL,
    file TEXT NOT NULL,
    added_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS ota_rollouts (
    id INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    max_failure_percent INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    reason TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS ota_meters (
    rollout INTEGER NOT NULL,
    meter TEXT NOT NULL,
    state TEXT NOT NULL,
    offset INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (rollout, meter)
) STRICT;
"#;

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
        Some(v) if v < SCHEMA_VERSION && upgrade => {
            // One step per version, in order; each sets the version it reaches.
            for from in v..SCHEMA_VERSION {
                match from {
                    1 => migrate_v1(&tx)?,
                    2 => migrate_v2(&tx)?,
                    3 => migrate_v3(&tx)?,
                    4 => migrate_v4(&tx)?,
                    _ => migrate_v5(&tx)?,
                }
            }
        }
        Some(v) if v < SCHEMA_VERSION => return Err(StoreError::OlderSchema(v)),
        Some(_) => {}
        None => {
            tx.execute_batch(OTA_SCHEMA)?;
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

/// Schema 4 → 5 (on this branch: 3 → 5; schema 4 is the money ledger's): meters learn whether
/// they are the site's main (bulk) meter. The usage, site reading, alert state and meter watch
/// tables are new, created by [`SCHEMA`]; hourly usage starts with the first fold after the
/// upgrade (events already folded are not replayed: their hour would be a guess).
fn migrate_v4(tx: &Connection) -> Result<(), StoreError> {
    tracing::info!("upgrading the database to schema 5 (one time): hourly usage and alerts");
    tx.execute_batch("ALTER TABLE meters ADD COLUMN main INTEGER NOT NULL DEFAULT 0;")?;
    set_meta(tx, "schema_version", 5)?;
    Ok(())
}

/// Schema 5 → 6: firmware images and OTA rollouts, in tables of their own.
fn migrate_v5(tx: &Connection) -> Result<(), StoreError> {
    tracing::info!("upgrading the database to schema 6 (firmware updates; one time)");
    tx.execute_batch(OTA_SCHEMA)?;
    set_meta(tx, "schema_version", 6)?;
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

/// Added to the system clock by [`now_ms`]. Only a debug build can change it
/// ([`set_debug_clock`]), so tests can move the daemon through hours and days without waiting;
/// in a release build it is always 0.
static CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    system_ms() + CLOCK_OFFSET_MS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Debug builds only (`POST /api/debug/clock`): from now on [`now_ms`] runs from `now`.
#[cfg(debug_assertions)]
pub fn set_debug_clock(now: i64) {
    CLOCK_OFFSET_MS.store(now - system_ms(), std::sync::atomic::Ordering::Relaxed);
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
    /// The site's main (bulk) meter: its consumption is the site's supply (site loss).
    pub main: bool,
    /// The meter's tariff; `None`: the site's default.
    pub tariff: Option<String>,
    /// The money account (issue 16); `None` until the writer first priced this meter.
    #[serde(skip)]
    pub money: Option<crate::tariff::account::MoneyAccount>,
}

const METER_COLUMNS: &str = "id, name, phone, balance_wh, ledger_seq, v2_seq, total_consumed_wh, \
     status, online, last_seen, created_at, state_seq, legacy_anonymous, legacy_source, main, tariff, \
     money";

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
        main: r.get(14)?,
        tariff: r.get(15)?,
        money: money_of(r.get(16)?),
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
    // Its open alert episodes and report watch go with it (its `removed` event ends them), so
    // a meter added again under the same number starts without them; its hourly usage stays
    // for the site's past days.
    tx.execute("DELETE FROM alert_state WHERE meter = ?1", [id.as_str()])?;
    tx.execute("DELETE FROM meter_watch WHERE meter = ?1", [id.as_str()])?;
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

/// [`account`] and the meter's tariff (`None`: the default), read together, for the balance
/// and limits a meter is sent outside the writer (at subscription, after a CLI change).
pub fn account_and_tariff(
    conn: &Connection,
    id: &MeterId,
) -> Result<Option<(Account, Option<String>)>, StoreError> {
    snapshot(conn, |tx| {
        let Some((row, state_seq, tariff)) = account_row_with_tariff(tx, id)? else {
            return Ok(None);
        };
        let account = match latest_unfolded(tx, id, state_seq)? {
            Some(newer) => newer.record.account,
            None => row,
        };
        Ok(Some((account, tariff)))
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
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Folded {
    /// Meter rows brought up to date.
    pub meters: usize,
    /// The new `folded_seq`.
    pub through: i64,
    /// The reports this fold folded, by meter, oldest first: what the alert rules look at.
    pub reports: HashMap<String, Vec<ReportFact>>,
}

/// One applied report as the alert rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFact {
    pub at: i64,
    pub debit_wh: i64,
    /// v2 `powerW`, when the meter sent it.
    pub power_w: Option<f64>,
    /// The relay as the meter reported it (v2 `relay`); else as the ledger commands it.
    pub relay_on: bool,
    /// Whether `relay_on` is the meter's own word (v2 `relay`).
    pub relay_reported: bool,
    /// v2: the register went backwards while `seq` went on (no reboot explains it).
    pub register_backwards: bool,
}

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

/// The consumption events with `after < seq <= through`, by meter, oldest first.
fn reports_between(
    tx: &Connection,
    after: i64,
    through: i64,
) -> Result<HashMap<String, Vec<ReportFact>>, StoreError> {
    let mut st = tx.prepare_cached(
        "SELECT meter, at, data FROM events
         WHERE seq > ?1 AND seq <= ?2 AND kind = 'consumption' AND typeof(data) = 'blob'
           AND meter IS NOT NULL
         ORDER BY seq",
    )?;
    let mut rows = st.query(params![after, through])?;
    let mut out: HashMap<String, Vec<ReportFact>> = HashMap::new();
    while let Some(r) = rows.next()? {
        let rusqlite::types::ValueRef::Blob(data) = r.get_ref(2)? else {
            continue;
        };
        let Ok(c) = Consumption::decode(data) else {
            continue;
        };
        let (power_w, reported) = match &c.report {
            crate::payload::Report::V2(v) => (
                v.power_w,
                v.relay.as_deref().map(|x| x.eq_ignore_ascii_case("on")),
            ),
            crate::payload::Report::V1 { .. } => (None, None),
        };
        out.entry(r.get(0)?).or_default().push(ReportFact {
            at: r.get(1)?,
            debit_wh: c.debit_wh,
            power_w,
            relay_on: reported.unwrap_or(c.account.balance_wh > 0),
            relay_reported: reported.is_some(),
            register_backwards: c.kind == crate::ledger::ReportKind::RegisterReset,
        });
    }
    Ok(out)
}

/// Adds the window's consumption to `usage_hours` (an upsert per meter and UTC hour, not per
/// report) and updates each meter's `meter_watch` row.
fn aggregate(
    tx: &Connection,
    reports: &HashMap<String, Vec<ReportFact>>,
) -> Result<(), StoreError> {
    let mut hours: HashMap<(&str, i64), i64> = HashMap::new();
    for (meter, facts) in reports {
        for f in facts.iter().filter(|f| f.debit_wh != 0) {
            *hours
                .entry((meter.as_str(), f.at - f.at.rem_euclid(MS_PER_HOUR)))
                .or_default() += f.debit_wh;
        }
    }
    let mut add = tx.prepare_cached(
        "INSERT INTO usage_hours (meter, hour, wh) VALUES (?1, ?2, ?3)
         ON CONFLICT (meter, hour) DO UPDATE SET wh = wh + excluded.wh",
    )?;
    for ((meter, hour), wh) in hours {
        add.execute(params![meter, hour, wh])?;
    }
    let mut watch = tx.prepare_cached(
        "INSERT INTO meter_watch (meter, relay_on, last_report_at, last_use_at, since)
         VALUES (?1, ?2, ?3, ?4, ?3)
         ON CONFLICT (meter) DO UPDATE SET relay_on = excluded.relay_on,
           last_report_at = MAX(last_report_at, excluded.last_report_at),
           last_use_at = CASE WHEN excluded.last_use_at IS NULL THEN last_use_at
                              WHEN last_use_at IS NULL THEN excluded.last_use_at
                              ELSE MAX(last_use_at, excluded.last_use_at) END",
    )?;
    for (meter, facts) in reports {
        let Some(last) = facts.last() else { continue };
        let used = facts.iter().filter(|f| f.debit_wh > 0).map(|f| f.at).max();
        watch.execute(params![meter, last.relay_on, last.at, used])?;
    }
    Ok(())
}

/// Hourly usage older than `before` goes, at most once a UTC day (a delete by hour reads
/// every meter's rows: cheap once a day, not every fold).
fn prune_usage(tx: &Connection, now: i64, retention_days: i64) -> Result<(), StoreError> {
    let today = now.div_euclid(MS_PER_DAY);
    // Once a day; any other day than the last, so a clock put back does not stop pruning.
    if meta_int(tx, "usage_pruned_day")? == today {
        return Ok(());
    }
    // The cutoff follows the clock but moves at most two days past the last one: a clock that
    // runs years ahead for a moment costs two days of history, not all of it.
    let last = meta_int(tx, "usage_pruned_through")?;
    let mut cutoff = now - retention_days * MS_PER_DAY;
    if last > 0 {
        cutoff = cutoff.min(last + USAGE_PRUNE_STEP_MS);
    }
    tx.prepare_cached("DELETE FROM usage_hours WHERE hour < ?1")?
        .execute([cutoff])?;
    set_meta(tx, "usage_pruned_through", cutoff.max(last))?;
    set_meta(tx, "usage_pruned_day", today)
}

/// How far the usage prune's cutoff may move in one pass (see `prune_usage`).
const USAGE_PRUNE_STEP_MS: i64 = 2 * MS_PER_DAY;

/// Days of hourly usage kept (`[alerts] usage_retention_days`' default): 400 days is 9,600
/// rows per meter, about 200 KiB each, and covers a year plus a month for comparisons.
pub const USAGE_RETENTION_DAYS: i64 = 400;

/// Writes the newest unfolded consumption event of every meter into its row (a row already
/// as new, e.g. after a payment, is left alone), plus the `last_seen` times in `seen`, and
/// moves `folded_seq` to the newest event. Idempotent; runs in the caller's transaction.
pub fn fold<'a>(
    tx: &Connection,
    seen: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<Folded, StoreError> {
    fold_keeping(tx, seen, USAGE_RETENTION_DAYS)
}

/// [`fold`], keeping `usage_retention_days` of hourly usage. The consumption events it folds
/// are also added to `usage_hours` here, in the same transaction that moves `folded_seq`: each
/// is counted exactly once, a crash loses none, and a report itself writes nothing more.
pub fn fold_keeping<'a>(
    tx: &Connection,
    seen: impl IntoIterator<Item = (&'a str, i64)>,
    usage_retention_days: i64,
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
    let before = folded_seq(tx)?;
    let mut reports = HashMap::new();
    if through > before {
        reports = reports_between(tx, before, through)?;
        aggregate(tx, &reports)?;
        set_meta(tx, "folded_seq", through)?;
    }
    prune_usage(tx, now_ms(), usage_retention_days)?;
    Ok(Folded {
        meters: newest.len(),
        through,
        reports,
    })
}

// ---- usage, the main meter, site readings, alert state (schema 5) ----

/// Wh of `meter` per UTC hour starting in `from..to` (hour starts, ms), folded rows plus the
/// reports not folded yet, so the current hour is exact. Hours without use are absent.
pub fn usage_hours(
    conn: &Connection,
    meter: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, i64)>, StoreError> {
    snapshot(conn, |tx| {
        let mut by_hour: std::collections::BTreeMap<i64, i64> = tx
            .prepare_cached(
                "SELECT hour, wh FROM usage_hours WHERE meter = ?1 AND hour >= ?2 AND hour < ?3",
            )?
            .query_map(params![meter, from, to], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = tx.prepare_cached(
            "SELECT at, data FROM events
             WHERE seq > ?1 AND meter = ?2 AND kind = 'consumption' AND typeof(data) = 'blob'",
        )?;
        let mut rows = st.query(params![folded_seq(tx)?, meter])?;
        while let Some(r) = rows.next()? {
            let at: i64 = r.get(0)?;
            let rusqlite::types::ValueRef::Blob(data) = r.get_ref(1)? else {
                continue;
            };
            let hour = at - at.rem_euclid(MS_PER_HOUR);
            if let (Ok(c), true) = (Consumption::decode(data), (from..to).contains(&hour)) {
                if c.debit_wh != 0 {
                    *by_hour.entry(hour).or_default() += c.debit_wh;
                }
            }
        }
        Ok(by_hour.into_iter().collect())
    })
}

/// Wh of `meter` in the same UTC hour as `hour` on each of the `days` days before it, oldest
/// first; days before the meter's first recorded use are left out (no history yet), days
/// after it without use count as 0.
pub fn same_hour_history(
    conn: &Connection,
    meter: &str,
    hour: i64,
    days: i64,
) -> Result<Vec<i64>, StoreError> {
    let first: Option<i64> = conn
        .prepare_cached("SELECT MIN(hour) FROM usage_hours WHERE meter = ?1")?
        .query_row([meter], |r| r.get(0))?;
    let Some(first) = first else {
        return Ok(Vec::new());
    };
    let mut get =
        conn.prepare_cached("SELECT wh FROM usage_hours WHERE meter = ?1 AND hour = ?2")?;
    let mut out = Vec::new();
    for k in (1..=days).rev() {
        let h = hour - k * MS_PER_DAY;
        // A day counts once the meter's record had begun by its end.
        if h + MS_PER_DAY <= first {
            continue;
        }
        out.push(
            get.query_row(params![meter, h], |r| r.get(0))
                .optional()?
                .unwrap_or(0),
        );
    }
    Ok(out)
}

/// Wh of the main meter and of the other meters (summed) per bucket: `starts` are sorted
/// bucket starts (UTC ms), the last bucket ends at `end`. Read meter by meter through the
/// primary key (no index by hour: it would be one more page written per upsert), plus the
/// reports not folded yet; a removed meter's usage no longer counts. `None` for the main
/// meter when none is marked.
pub fn site_usage(
    conn: &Connection,
    starts: &[i64],
    end: i64,
) -> Result<(Option<Vec<i64>>, Vec<i64>), StoreError> {
    let Some(&first) = starts.first() else {
        return Ok((None, Vec::new()));
    };
    let main = main_meter(conn)?;
    let ids: Vec<String> = conn
        .prepare_cached("SELECT id FROM meters")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut main_wh = vec![0; starts.len()];
    let mut others = vec![0; starts.len()];
    let mut st = conn.prepare_cached(
        "SELECT hour, wh FROM usage_hours WHERE meter = ?1 AND hour >= ?2 AND hour < ?3",
    )?;
    for id in &ids {
        let into = if main.as_deref() == Some(id.as_str()) {
            &mut main_wh
        } else {
            &mut others
        };
        let mut rows = st.query(params![id, first, end])?;
        while let Some(r) = rows.next()? {
            let hour: i64 = r.get(0)?;
            let i = starts.partition_point(|&s| s <= hour).saturating_sub(1);
            into[i] += r.get::<_, i64>(1)?;
        }
    }
    // The reports not folded yet, in one pass over the unfolded tail (empty at fold time).
    let mut tail = conn.prepare_cached(
        "SELECT meter, at, data FROM events
         WHERE seq > ?1 AND kind = 'consumption' AND typeof(data) = 'blob' AND meter IS NOT NULL",
    )?;
    let mut rows = tail.query([folded_seq(conn)?])?;
    while let Some(r) = rows.next()? {
        let at: i64 = r.get(1)?;
        let rusqlite::types::ValueRef::Blob(data) = r.get_ref(2)? else {
            continue;
        };
        let (Ok(c), true) = (Consumption::decode(data), (first..end).contains(&at)) else {
            continue;
        };
        let meter: String = r.get(0)?;
        if !ids.contains(&meter) {
            continue;
        }
        let into = if main.as_deref() == Some(meter.as_str()) {
            &mut main_wh
        } else {
            &mut others
        };
        into[starts.partition_point(|&s| s <= at).saturating_sub(1)] += c.debit_wh;
    }
    Ok((main.map(|_| main_wh), others))
}

/// An integer kept in `meta` (0 when absent), for the alert rules' bookkeeping.
pub fn meta_value(conn: &Connection, key: &str) -> Result<i64, StoreError> {
    meta_int(conn, key)
}

pub fn set_meta_value(tx: &Connection, key: &str, value: i64) -> Result<(), StoreError> {
    set_meta(tx, key, value)
}

/// The meter marked main, if any.
pub fn main_meter(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM meters WHERE main != 0 ORDER BY id LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

/// Marks `id` as the site's main meter (unmarking any other) or unmarks it; `Ok(false)` when
/// the meter does not exist.
pub fn set_main(tx: &Connection, id: &MeterId, main: bool) -> Result<bool, StoreError> {
    if main {
        tx.execute(
            "UPDATE meters SET main = 0 WHERE main != 0 AND id != ?1",
            [id.as_str()],
        )?;
    }
    Ok(tx.execute(
        "UPDATE meters SET main = ?2 WHERE id = ?1",
        params![id.as_str(), main],
    )? == 1)
}

/// Records (or replaces) the bulk supply read by hand for a local day (`YYYY-MM-DD`).
pub fn put_site_reading(tx: &Connection, day: &str, wh: i64, at: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO site_readings (day, wh, at) VALUES (?1, ?2, ?3)
         ON CONFLICT (day) DO UPDATE SET wh = excluded.wh, at = excluded.at",
        params![day, wh, at],
    )?;
    Ok(())
}

/// The readings by hand for days `from..=to` (`YYYY-MM-DD`), by day.
pub fn site_readings(
    conn: &Connection,
    from: &str,
    to: &str,
) -> Result<HashMap<String, i64>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT day, wh FROM site_readings WHERE day >= ?1 AND day <= ?2")?;
    let rows = st
        .query_map([from, to], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Open alert episodes: `(meter or "" for the site, alert)` → when raised.
pub fn open_alerts(conn: &Connection) -> Result<HashMap<(String, String), i64>, StoreError> {
    let mut st = conn.prepare_cached("SELECT meter, alert, raised_at FROM alert_state")?;
    let rows = st
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub fn set_alert_open(
    tx: &Connection,
    meter: &str,
    alert: &str,
    raised_at: Option<i64>,
) -> Result<(), StoreError> {
    match raised_at {
        Some(at) => tx
            .prepare_cached(
                "INSERT INTO alert_state (meter, alert, raised_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (meter, alert) DO NOTHING",
            )?
            .execute(params![meter, alert, at])?,
        None => tx
            .prepare_cached("DELETE FROM alert_state WHERE meter = ?1 AND alert = ?2")?
            .execute(params![meter, alert])?,
    };
    Ok(())
}

/// What the alert rules know of a meter.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub id: String,
    pub main: bool,
    pub created_at: i64,
    pub last_seen: Option<i64>,
    /// From its reports (`meter_watch`): relay, newest report, newest report with use, and
    /// since when it is watched. `None` before its first folded report.
    pub relay_on: Option<bool>,
    pub last_report_at: Option<i64>,
    pub last_use_at: Option<i64>,
    pub watched_since: Option<i64>,
}

pub fn watched_meters(conn: &Connection) -> Result<Vec<Watched>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT m.id, m.main, m.created_at, m.last_seen, w.relay_on, w.last_report_at,
                w.last_use_at, w.since
         FROM meters m LEFT JOIN meter_watch w ON w.meter = m.id ORDER BY m.id",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok(Watched {
                id: r.get(0)?,
                main: r.get(1)?,
                created_at: r.get(2)?,
                last_seen: r.get(3)?,
                relay_on: r.get(4)?,
                last_report_at: r.get(5)?,
                last_use_at: r.get(6)?,
                watched_since: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Alert events (newest first, at most `limit`), of one meter or of all.
pub fn alert_events(
    conn: &Connection,
    gateway: &str,
    meter: Option<&str>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, kind, meter, at, data FROM events
         WHERE kind = 'alert' AND (?1 IS NULL OR meter = ?1) ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = st
        .query_map(params![meter, limit as i64], |r| {
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
                                                       'emergency_credit', 'standing_charge',
                                                       'tariff_changed')))
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

// ---- firmware images and rollouts (schema 6) ----

/// A stored firmware image (`firmware add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirmwareRow {
    pub version: String,
    pub size: i64,
    pub sha256: String,
    pub signature: String,
    /// File name under `{data_dir}/firmware/`.
    pub file: String,
    pub added_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub id: i64,
    pub version: String,
    /// `active`, `paused` (too many failures), `done` (every meter finished) or `replaced`.
    pub state: String,
    pub max_failure_percent: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtaMeterRow {
    pub meter: String,
    pub state: String,
    pub offset: i64,
    pub error: Option<String>,
    pub updated_at: i64,
}

fn firmware_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FirmwareRow> {
    Ok(FirmwareRow {
        version: r.get(0)?,
        size: r.get(1)?,
        sha256: r.get(2)?,
        signature: r.get(3)?,
        file: r.get(4)?,
        added_at: r.get(5)?,
    })
}

const FIRMWARE_COLUMNS: &str = "version, size, sha256, signature, file, added_at";

/// Stores an image's row; `false` when the version exists already.
pub fn insert_firmware(tx: &Connection, f: &FirmwareRow) -> Result<bool, StoreError> {
    let n = tx.execute(
        &format!(
            "INSERT OR IGNORE INTO firmware ({FIRMWARE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        ),
        params![f.version, f.size, f.sha256, f.signature, f.file, f.added_at],
    )?;
    Ok(n == 1)
}

pub fn firmware(conn: &Connection, version: &str) -> Result<Option<FirmwareRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE version = ?1"),
            [version],
            firmware_row,
        )
        .optional()?)
}

pub fn firmware_list(conn: &Connection) -> Result<Vec<FirmwareRow>, StoreError> {
    let mut st = conn.prepare(&format!(
        "SELECT {FIRMWARE_COLUMNS} FROM firmware ORDER BY added_at, version"
    ))?;
    let rows = st.query_map([], firmware_row)?.collect::<Result<_, _>>()?;
    Ok(rows)
}

const ROLLOUT_COLUMNS: &str =
    "id, version, state, max_failure_percent, created_at, updated_at, reason";

fn rollout_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        version: r.get(1)?,
        state: r.get(2)?,
        max_failure_percent: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        reason: r.get(6)?,
    })
}

/// Starts a rollout of `version` to `meters` (each `pending`); an active or paused one before
/// it is `replaced`. Returns the new rollout's id.
pub fn insert_rollout(
    tx: &Connection,
    version: &str,
    meters: &[String],
    max_failure_percent: i64,
    at: i64,
) -> Result<i64, StoreError> {
    tx.execute(
        "UPDATE ota_rollouts SET state = 'replaced', updated_at = ?1
         WHERE state IN ('active', 'paused')",
        [at],
    )?;
    tx.execute(
        "INSERT INTO ota_rollouts (version, state, max_failure_percent, created_at, updated_at)
         VALUES (?1, 'active', ?2, ?3, ?3)",
        params![version, max_failure_percent, at],
    )?;
    let id = tx.last_insert_rowid();
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO ota_meters (rollout, meter, state, updated_at)
         VALUES (?1, ?2, 'pending', ?3)",
    )?;
    for m in meters {
        st.execute(params![id, m, at])?;
    }
    Ok(id)
}

/// The newest rollout that is not replaced (active, paused or done).
pub fn current_rollout(conn: &Connection) -> Result<Option<RolloutRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {ROLLOUT_COLUMNS} FROM ota_rollouts WHERE state != 'replaced'
                 ORDER BY id DESC LIMIT 1"
            ),
            [],
            rollout_row,
        )
        .optional()?)
}

pub fn rollout(conn: &Connection, id: i64) -> Result<Option<RolloutRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {ROLLOUT_COLUMNS} FROM ota_rollouts WHERE id = ?1"),
            [id],
            rollout_row,
        )
        .optional()?)
}

pub fn set_rollout_state(
    tx: &Connection,
    id: i64,
    state: &str,
    reason: Option<&str>,
    at: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE ota_rollouts SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
        params![id, state, reason, at],
    )?;
    Ok(())
}

pub fn rollout_meters(conn: &Connection, rollout: i64) -> Result<Vec<OtaMeterRow>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT meter, state, offset, error, updated_at FROM ota_meters WHERE rollout = ?1
         ORDER BY meter",
    )?;
    let rows = st
        .query_map([rollout], |r| {
            Ok(OtaMeterRow {
                meter: r.get(0)?,
                state: r.get(1)?,
                offset: r.get(2)?,
                error: r.get(3)?,
                updated_at: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub fn ota_meter_state(
    tx: &Connection,
    rollout: i64,
    meter: &str,
) -> Result<Option<String>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT state FROM ota_meters WHERE rollout = ?1 AND meter = ?2",
            params![rollout, meter],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn set_ota_meter(
    tx: &Connection,
    rollout: i64,
    meter: &str,
    state: &str,
    offset: i64,
    error: Option<&str>,
    at: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE ota_meters SET state = ?3, offset = ?4, error = ?5, updated_at = ?6
         WHERE rollout = ?1 AND meter = ?2",
    )?
    .execute(params![rollout, meter, state, offset, error, at])?;
    Ok(())
}

/// Meters of a rollout by state.
pub fn rollout_counts(
    tx: &Connection,
    rollout: i64,
) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
    let mut st = tx.prepare_cached(
        "SELECT state, COUNT(*) FROM ota_meters WHERE rollout = ?1 GROUP BY state",
    )?;
    let rows = st
        .query_map([rollout], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

// ---- dashboard (reads for its pages and exports; the operator password in `meta`) ----

/// The operator's dashboard password (argon2id PHC string), when one was set.
pub fn operator_password_hash(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'operator_password'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

pub fn set_operator_password_hash(tx: &Connection, hash: &str) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('operator_password', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [hash],
    )?;
    Ok(())
}

/// Replaces a meter's name and phone (`None` clears); `false` for an unknown meter.
pub fn set_meter_details(
    tx: &Connection,
    id: &MeterId,
    name: Option<&str>,
    phone: Option<&str>,
) -> Result<bool, StoreError> {
    let n = tx.execute(
        "UPDATE meters SET name = ?2, phone = ?3 WHERE id = ?1",
        params![id.as_str(), name, phone],
    )?;
    Ok(n == 1)
}

/// Payments with `from <= at < to`, newest first, at most `limit`.
pub fn payments_between(
    conn: &Connection,
    from: i64,
    to: i64,
    limit: usize,
) -> Result<Vec<PaymentRow>, StoreError> {
    let mut st = conn.prepare(&format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE at >= ?1 AND at < ?2
         ORDER BY at DESC, event_seq DESC LIMIT ?3"
    ))?;
    let rows = st
        .query_map(params![from, to, limit as i64], payment_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// How far back [`recent_events`] looks: there is no index by kind or meter, and a page view
/// must not scan a site's whole history for a meter that has no alert.
pub const RECENT_EVENTS_WINDOW: i64 = 50_000;

/// The newest events, newest first: of one kind and/or one meter when given, among the newest
/// [`RECENT_EVENTS_WINDOW`] events.
pub fn recent_events(
    conn: &Connection,
    gateway: &str,
    kind: Option<&str>,
    meter: Option<&MeterId>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, kind, meter, at, data FROM events
         WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR meter = ?2)
           AND seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - ?4
         ORDER BY seq DESC LIMIT ?3",
    )?;
    let rows = st
        .query_map(
            params![
                kind,
                meter.map(MeterId::as_str),
                limit as i64,
                RECENT_EVENTS_WINDOW
            ],
            |r| {
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
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One meter's month for the dashboard's export: energy debited, payments, and its balance
/// at both ends (`None` where the events that would tell were pruned).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeterPeriod {
    pub meter: String,
    pub name: Option<String>,
    pub energy_wh: i64,
    pub payments: i64,
    pub paid_cents: i64,
    pub credit_wh: i64,
    pub opening_wh: Option<i64>,
    pub closing_wh: Option<i64>,
}

/// Every meter's [`MeterPeriod`] for `from <= at < to`, by meter id.
pub fn period_summary(
    conn: &Connection,
    from: i64,
    to: i64,
) -> Result<Vec<MeterPeriod>, StoreError> {
    snapshot(conn, |tx| {
        let mut out: std::collections::BTreeMap<String, MeterPeriod> = Default::default();
        let mut created = HashMap::new();
        {
            let mut st = tx.prepare("SELECT id, name, created_at FROM meters")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                created.insert(id.clone(), r.get::<_, i64>(2)?);
                out.insert(
                    id.clone(),
                    MeterPeriod {
                        meter: id,
                        name: r.get(1)?,
                        ..Default::default()
                    },
                );
            }
        }
        // The outbox removes events oldest first (by seq) once delivered and past retention:
        // when the oldest kept one is later than `from`, the period's events may be gone, and
        // its energy comes from the hourly usage store (kept `usage_retention_days`) instead.
        let oldest_event: Option<i64> = tx
            .query_row("SELECT at FROM events ORDER BY seq LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        if oldest_event.is_none_or(|at| at > from) {
            for (id, m) in out.iter_mut() {
                m.energy_wh = usage_hours(tx, id, from, to)?
                    .iter()
                    .map(|(_, wh)| wh)
                    .sum();
            }
        } else {
            let mut st = tx.prepare(
                "SELECT meter, data FROM events WHERE kind = 'consumption' AND at >= ?1 AND at < ?2
                 AND typeof(data) = 'blob' AND meter IS NOT NULL",
            )?;
            let mut rows = st.query(params![from, to])?;
            while let Some(r) = rows.next()? {
                let rusqlite::types::ValueRef::Blob(data) = r.get_ref(1)? else {
                    continue;
                };
                if let (Ok(c), Some(m)) = (
                    Consumption::decode(data),
                    out.get_mut(&r.get::<_, String>(0)?),
                ) {
                    m.energy_wh += c.debit_wh;
                }
            }
        }
        {
            let mut st = tx.prepare(
                "SELECT meter, COUNT(*), SUM(amount_cents), SUM(credit_wh) FROM payments
                 WHERE at >= ?1 AND at < ?2 GROUP BY meter",
            )?;
            let mut rows = st.query(params![from, to])?;
            while let Some(r) = rows.next()? {
                if let Some(m) = out.get_mut(&r.get::<_, String>(0)?) {
                    m.payments = r.get(1)?;
                    m.paid_cents = r.get(2)?;
                    m.credit_wh = r.get(3)?;
                }
            }
        }
        let opening = balances_before(tx, from)?;
        let closing = balances_before(tx, to)?;
        for (id, m) in out.iter_mut() {
            let born = created.get(id).copied().unwrap_or(0);
            // A meter provisioned later had nothing yet: its balance was 0.
            m.opening_wh = opening.get(id).copied().or((born >= from).then_some(0));
            m.closing_wh = closing.get(id).copied().or((born >= to).then_some(0));
            if m.closing_wh.is_none() && m.opening_wh.is_some() && m.energy_wh == 0 {
                m.closing_wh = m.opening_wh;
            }
        }
        Ok(out.into_values().collect())
    })
}

/// Each meter's balance after its last ledger change before `at` (a consumption event or a
/// payment, whichever came later).
fn balances_before(tx: &Connection, at: i64) -> Result<HashMap<String, i64>, StoreError> {
    let mut latest: HashMap<String, (i64, i64)> = HashMap::new();
    {
        let mut st = tx.prepare(
            "SELECT e.meter, e.seq, e.data FROM events e
             JOIN (SELECT meter, MAX(seq) AS seq FROM events
                   WHERE kind = 'consumption' AND at < ?1 AND meter IS NOT NULL GROUP BY meter) l
             ON e.seq = l.seq",
        )?;
        let mut rows = st.query([at])?;
        while let Some(r) = rows.next()? {
            let rusqlite::types::ValueRef::Blob(data) = r.get_ref(2)? else {
                continue;
            };
            if let Ok(c) = Consumption::decode(data) {
                latest.insert(r.get(0)?, (r.get(1)?, c.account.balance_wh));
            }
        }
    }
    let mut st = tx.prepare(
        "SELECT meter, MAX(event_seq), balance_after_wh FROM payments WHERE at < ?1 GROUP BY meter",
    )?;
    let mut rows = st.query([at])?;
    while let Some(r) = rows.next()? {
        let (meter, seq, balance): (String, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
        if latest.get(&meter).is_none_or(|(s, _)| seq > *s) {
            latest.insert(meter, (seq, balance));
        }
    }
    Ok(latest.into_iter().map(|(m, (_, b))| (m, b)).collect())
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
