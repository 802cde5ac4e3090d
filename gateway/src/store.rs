//! SQLite: the schema and every SQL statement of the gateway.
//!
//! Architecture invariant: nothing outside this module writes SQL. The database is WAL with
//! `synchronous = FULL`, so a committed transaction survives a power cut; the daemon writes
//! through one thread ([`crate::writer`]) and the CLI may write concurrently through its own
//! connection (SQLite serialises the two with `BEGIN IMMEDIATE` and a busy timeout).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::ledger::Account;
use crate::meter::MeterId;

pub use rusqlite::Error as DbError;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
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
    created_at INTEGER NOT NULL
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
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    meter TEXT NOT NULL,
    at INTEGER NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER,
    register REAL NOT NULL,
    debit_wh INTEGER NOT NULL,
    balance_after_wh INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS readings_v2_once ON readings (meter, seq) WHERE version = 2;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    meter TEXT,
    at INTEGER NOT NULL,
    data TEXT NOT NULL
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
}

/// Opens (creating when needed) the database at `path` for gateway `gateway_id`.
pub fn open(path: &Path, gateway_id: &str) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
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
}

const METER_COLUMNS: &str = "id, name, phone, balance_wh, ledger_seq, v2_seq, total_consumed_wh, \
     status, online, last_seen, created_at";

fn meter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MeterRow> {
    let id: String = r.get(0)?;
    let balance_wh: i64 = r.get(3)?;
    Ok(MeterRow {
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
    })
}

pub fn meter(conn: &Connection, id: &MeterId) -> Result<Option<MeterRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {METER_COLUMNS} FROM meters WHERE id = ?1"),
            [id.as_str()],
            meter_row,
        )
        .optional()?)
}

pub fn meters(conn: &Connection) -> Result<Vec<MeterRow>, StoreError> {
    let mut st = conn.prepare(&format!("SELECT {METER_COLUMNS} FROM meters ORDER BY id"))?;
    let rows = st
        .query_map([], meter_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn secret_hash(conn: &Connection, id: &MeterId) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT secret_hash FROM meters WHERE id = ?1",
            [id.as_str()],
            |r| r.get(0),
        )
        .optional()?)
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
        "INSERT INTO meters (id, name, phone, secret_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
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

pub fn account(tx: &Connection, id: &MeterId) -> Result<Option<Account>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT balance_wh, ledger_seq, v2_seq, v2_energy_wh, v1_total_wh, total_consumed_wh
             FROM meters WHERE id = ?1",
            [id.as_str()],
            |r| {
                Ok(Account {
                    balance_wh: r.get(0)?,
                    ledger_seq: r.get(1)?,
                    v2_seq: r.get(2)?,
                    v2_energy_wh: r.get(3)?,
                    v1_total_wh: r.get(4)?,
                    total_consumed_wh: r.get(5)?,
                })
            },
        )
        .optional()?)
}

pub fn save_account(tx: &Connection, id: &MeterId, a: &Account) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE meters SET balance_wh = ?2, ledger_seq = ?3, v2_seq = ?4, v2_energy_wh = ?5,
         v1_total_wh = ?6, total_consumed_wh = ?7 WHERE id = ?1",
        params![
            id.as_str(),
            a.balance_wh,
            a.ledger_seq,
            a.v2_seq,
            a.v2_energy_wh,
            a.v1_total_wh,
            a.total_consumed_wh
        ],
    )?;
    Ok(())
}

pub fn set_presence(
    tx: &Connection,
    id: &MeterId,
    status: Option<&str>,
    online: bool,
    at: i64,
) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE meters SET status = COALESCE(?2, status), online = ?3, last_seen = ?4 WHERE id = ?1",
        params![id.as_str(), status, online, at],
    )? == 1)
}

pub fn touch(tx: &Connection, id: &MeterId, at: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE meters SET last_seen = ?2, online = 1 WHERE id = ?1",
        params![id.as_str(), at],
    )?;
    Ok(())
}

// ---- readings and payments ----

pub struct Reading<'a> {
    pub meter: &'a MeterId,
    pub at: i64,
    pub version: u8,
    pub seq: Option<u32>,
    /// energyWh (v2) or totalConsumed in units (v1).
    pub register: f64,
    pub debit_wh: i64,
    pub balance_after_wh: i64,
}

pub fn insert_reading(tx: &Connection, r: &Reading<'_>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO readings (meter, at, version, seq, register, debit_wh, balance_after_wh)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            r.meter.as_str(),
            r.at,
            r.version,
            r.seq,
            r.register,
            r.debit_wh,
            r.balance_after_wh
        ],
    )?;
    Ok(())
}

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

pub fn payment(
    conn: &Connection,
    source: &str,
    reference: &str,
) -> Result<Option<PaymentRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {PAYMENT_COLUMNS} FROM payments WHERE source = ?1 AND reference = ?2"),
            [source, reference],
            payment_row,
        )
        .optional()?)
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

// ---- events ----

/// Appends an event in the caller's transaction and returns its `seq`.
pub fn append_event(
    tx: &Connection,
    kind: &str,
    meter: Option<&MeterId>,
    at: i64,
    data: &serde_json::Value,
) -> Result<i64, StoreError> {
    Ok(tx.query_row(
        "INSERT INTO events (kind, meter, at, data) VALUES (?1, ?2, ?3, ?4) RETURNING seq",
        params![kind, meter.map(MeterId::as_str), at, data.to_string()],
        |r| r.get(0),
    )?)
}

/// An event as sinks see it (contract §6).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: String,
    pub seq: i64,
    pub gateway: String,
    pub kind: String,
    pub meter: Option<String>,
    pub at: i64,
    pub data: serde_json::Value,
}

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
            let data: String = r.get(4)?;
            Ok(Event {
                id: event_id(gateway, seq),
                seq,
                gateway: gateway.to_string(),
                kind: r.get(1)?,
                meter: r.get(2)?,
                at: r.get(3)?,
                data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
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

/// A read-only connection shared by the daemon's tasks. Queries run on the blocking pool, so a
/// slow disk never stalls a tokio worker.
#[derive(Clone)]
pub struct Reader(std::sync::Arc<std::sync::Mutex<Connection>>);

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
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

/// `(seq, kind, meter)` of payments and of meter removals and secret changes after `after`,
/// oldest first.
pub fn meter_changes_after(
    conn: &Connection,
    after: i64,
) -> Result<Vec<(i64, String, String)>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT seq, kind, meter FROM events
         WHERE seq > ?1 AND meter IS NOT NULL
           AND (kind = 'payment' OR (kind = 'meter'
                AND json_extract(data, '$.action') IN ('removed', 'secret_changed')))
         ORDER BY seq",
    )?;
    let rows = st
        .query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
