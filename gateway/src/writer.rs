//! Ledger operations and the one thread that commits them.
//!
//! Every change to the site's state is an [`Op`]. [`apply`] runs one op inside a transaction:
//! it loads the meter's account, applies the rules of [`crate::ledger`], writes the account, the
//! reading or payment and the op's events. The daemon sends ops to the [`Writer`] thread, which
//! commits whatever has queued up while the previous commit was syncing in one transaction
//! (group commit: many meters share one fsync), and only then answers each caller and hands the
//! resulting balance commands, in commit order, to the broker.
//!
//! Architecture invariant: a caller learns of success only after the commit. The broker PUBACKs,
//! the API answers and a payment source is acknowledged after that point, never before.

use std::sync::Arc;

use rusqlite::{Connection, TransactionBehavior};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;

use crate::config::Tariff;
use crate::consumption::Consumption;
use crate::ledger::{self, Account, PriceAt, ReportApplied, ReportKind, ReportRefused, Rules};
use crate::meter::{wh_to_units, MeterId};
use crate::metrics::Metrics;
use crate::outbox::Bell;
use crate::payload::{BalanceCommand, Report, StatusReport};
use crate::store::{self, PaymentRow, StoreError};
use crate::untrusted::Untrusted;

/// Outbox housekeeping runs on every this many ticks (about seconds), starting with the first.
const HOUSEKEEPING_EVERY_TICKS: u64 = 5;
/// Rows one housekeeping pass may delete, so the writer is never held for long.
const HOUSEKEEPING_BUDGET: i64 = 20_000;

/// Most ops committed in one transaction.
const MAX_BATCH: usize = 512;
/// `commit_delay` applies only to a light load: fewer than `LIGHT_LOAD_OPS` ops a second and a
/// batch smaller than `DELAY_BELOW`. Under a heavier load the group commit batches by itself
/// (ops gather during the previous fsync), and waiting would only slow meters that keep a few
/// reports in flight.
const LIGHT_LOAD_OPS: usize = 2_000;
const DELAY_BELOW: usize = 64;

/// Ops committed in the current and the previous second: the writer's load.
struct Load {
    since: std::time::Instant,
    this: usize,
    previous: usize,
}

impl Load {
    fn new() -> Load {
        Load {
            since: std::time::Instant::now(),
            this: 0,
            previous: 0,
        }
    }

    fn add(&mut self, ops: usize) {
        let elapsed = self.since.elapsed();
        if elapsed >= std::time::Duration::from_secs(1) {
            // After an idle spell the previous second was empty.
            self.previous = if elapsed >= std::time::Duration::from_secs(2) {
                0
            } else {
                self.this
            };
            self.this = 0;
            self.since = std::time::Instant::now();
        }
        self.this += ops;
    }

    fn light(&self) -> bool {
        self.this.max(self.previous) < LIGHT_LOAD_OPS
    }
}
/// The writer folds reports into the meters' rows every this many ticks (about seconds): the
/// longer, the more reports share each row write (SD wear), the more events a reader of a
/// meter's account scans (see [`store::fold`]).
const FOLD_EVERY_TICKS: u64 = 120;
/// Unfolded consumption events after which the writer folds without waiting, so readers never
/// scan far and a restart replays little.
const FOLD_AT: usize = 100_000;
/// Ops waiting for the writer; callers wait (asynchronously) when it is full.
const QUEUE: usize = 8192;

/// What the rules need from the configuration.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    pub rules: Rules,
    pub tariff: Tariff,
}

/// How the writer thread runs: the outbox bounds and sinks for its housekeeping, and how long
/// it lets ops gather before a commit.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub sinks: Vec<String>,
    pub max_bytes: u64,
    pub retention: std::time::Duration,
    /// `[ledger] commit_delay`: under a light load (under 2,000 ops/s), a batch holding a meter
    /// report waits this long from its first op for more ops to share its commit. Zero commits at once; more
    /// means fewer fsyncs and bytes written per report (SD-card wear) for that much more
    /// latency before a PUBACK.
    pub commit_delay: std::time::Duration,
    /// `[alerts]`: the rules [`crate::alerts::evaluate`] runs at every fold.
    pub alerts: crate::alerts::Thresholds,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// A consumption report, already parsed and checked to come from `meter`.
    Report {
        meter: MeterId,
        report: Report,
        at: i64,
    },
    /// A `…/status` publish or a Last Will.
    Status {
        meter: MeterId,
        status: StatusReport,
        at: i64,
    },
    /// A `…/balance` publish: the meter's own view, recorded as an event.
    MeterBalance {
        meter: MeterId,
        data: serde_json::Value,
        at: i64,
    },
    /// The meter's MQTT session started or ended.
    Presence {
        meter: MeterId,
        online: bool,
        at: i64,
    },
    Credit(Credit),
    AddMeter {
        meter: MeterId,
        name: Option<String>,
        phone: Option<String>,
        secret_hash: String,
        at: i64,
    },
    RemoveMeter {
        meter: MeterId,
        at: i64,
    },
    SetSecret {
        meter: MeterId,
        secret_hash: String,
        at: i64,
    },
    /// Mark a meter as the site's main (bulk) meter, or unmark it (site loss).
    SetMain {
        meter: MeterId,
        main: bool,
        at: i64,
    },
    /// The site's bulk supply of a local day (`YYYY-MM-DD`), read by hand.
    SiteReading {
        day: String,
        wh: i64,
        at: i64,
    },
    /// Opt a meter in or out of the original firmware's anonymous CONNECT; `source`
    /// `Some(None)` removes the address pin.
    SetLegacy {
        meter: MeterId,
        anonymous: Option<bool>,
        source: Option<Option<String>>,
        at: i64,
    },
    /// Put a meter on a tariff (`None`: back to the site's default). Its money account
    /// continues (balance, debt, band counter); reports from now on are priced by the new one.
    SetTariff {
        meter: MeterId,
        tariff: Option<String>,
        at: i64,
    },
    /// A tenant asks for emergency credit (`command/emergency`, the CLI, the API).
    Emergency {
        meter: MeterId,
        at: i64,
    },
    /// Charges every standing-charge period due by `at` to every meter, connected or not
    /// (the daemon's timer).
    AccrueStanding {
        at: i64,
    },
    /// The daemon's clock passed a local hour edge (`from` → `at`): meters whose `mayCut`
    /// changed with their tariff's friendly hours or holidays get a fresh `command/balance`.
    FriendlyEdge {
        from: i64,
        at: i64,
    },
    /// A sink took delivery of every event through `through`, except the `dead` ones
    /// (`seq`, event JSON, reason), which go to the dead-letter table.
    SinkProgress {
        sink: String,
        through: i64,
        delivered: i64,
        dead: Vec<(i64, String, String)>,
        at: i64,
    },
    /// A sink delivery failed and will be retried; recorded for `outbox status`.
    SinkFailure {
        sink: String,
        error: String,
        at: i64,
    },
    /// A plugin's durable key-value store: set, or delete when `value` is `None`.
    KvPut {
        plugin: String,
        key: String,
        value: Option<String>,
    },
    /// A payment source's payment that credits no meter, kept for the operator (a
    /// reference already kept or already credited is left as it is).
    RecordUnapplied(store::UnappliedRow),
    /// Firmware images, rollouts and the meters' update status (`crate::ota`).
    Ota(crate::ota::OtaOp),
    /// The operator credits a kept payment to `meter` under its own (source, reference), so it
    /// credits once however often this is asked. `source` is needed only when two sources
    /// kept the same reference.
    ApplyUnapplied {
        reference: String,
        source: Option<String>,
        meter: MeterId,
        at: i64,
    },
    /// The dashboard operator's password (`umeme-gateway operator password`), as its argon2id
    /// PHC string; kept in `meta`, no event (it is a secret).
    SetOperatorPassword {
        hash: String,
    },
    /// The operator edits a meter's name and phone (`None` clears).
    SetMeterDetails {
        meter: MeterId,
        name: Option<String>,
        phone: Option<String>,
        at: i64,
    },
}

/// A payment: a reference credits once per site (see [`ledger::payment_reference`]).
#[derive(Debug, Clone)]
pub struct Credit {
    pub meter: MeterId,
    /// `manual`, `simulate`, or a payment source plugin's name.
    pub source: String,
    pub reference: String,
    pub amount_cents: i64,
    pub at: i64,
    /// The payer's phone number when the source gave one (digits, optional `+`), carried into
    /// the payment event for sinks (the original dashboard's `phone_number`).
    pub phone: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Report(ReportApplied),
    Credited {
        payment: PaymentRow,
        duplicate: bool,
    },
    /// A firmware rollout started (`crate::ota`).
    Rollout {
        id: i64,
    },
    /// A payment below its tariff's `minimum_topup` from a payment source: not credited, kept
    /// as an unapplied payment with this reason (`payment apply` credits it).
    Unapplied {
        reason: String,
    },
    /// An op over many meters (the daemon's timers): what to tell each once committed. The
    /// writer sends them and answers with the list emptied.
    Swept(Vec<(MeterId, Notice)>),
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("unknown meter {0}")]
    UnknownMeter(MeterId),
    #[error("meter {0} already exists")]
    MeterExists(MeterId),
    #[error("report refused: {0}")]
    Refused(#[from] ReportRefused),
    #[error("payment reference must be 1 to 100 printable characters")]
    BadReference,
    /// The reference was credited before for another meter or amount. Carries nothing of
    /// that payment: the caller may be anyone who can submit a payment.
    #[error("payment reference already used for another payment")]
    ReferenceConflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the ledger commit failed, nothing was applied: {0}")]
    CommitFailed(String),
    #[error("the ledger writer has stopped")]
    Stopped,
    /// A plugin's store or the unapplied payments of a source reached its limit.
    #[error("{0}")]
    Full(String),
    #[error("no unapplied payment has the reference {0}")]
    NotUnapplied(String),
    #[error(
        "the reference {reference} is kept by several sources ({sources}); name one with --source"
    )]
    AmbiguousReference { reference: String, sources: String },
    #[error("payment {reference} was already applied to meter {meter}")]
    AlreadyApplied { reference: String, meter: String },
    /// A firmware image or rollout the OTA rules refuse (`crate::ota`).
    #[error("{0}")]
    Ota(String),
    #[error("emergency credit refused: {0}")]
    Emergency(#[from] crate::tariff::account::EmergencyRefused),
    #[error("unknown tariff {name:?} (configured: {known})")]
    UnknownTariff { name: String, known: String },
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Store(StoreError::Db(e))
    }
}

impl LedgerError {
    pub fn reason(&self) -> &'static str {
        match self {
            LedgerError::UnknownMeter(_) => "unknown_meter",
            LedgerError::MeterExists(_) => "meter_exists",
            LedgerError::Refused(_) => "implausible",
            LedgerError::BadReference => "bad_reference",
            LedgerError::ReferenceConflict => "reference_conflict",
            LedgerError::Store(_) => "store",
            LedgerError::CommitFailed(_) => "commit",
            LedgerError::Stopped => "stopped",
            LedgerError::Full(_) => "store_full",
            LedgerError::NotUnapplied(_) => "not_unapplied",
            LedgerError::AmbiguousReference { .. } => "ambiguous_reference",
            LedgerError::AlreadyApplied { .. } => "already_applied",
            LedgerError::Ota(_) => "ota",
            LedgerError::UnknownTariff { .. } => "unknown_tariff",
            LedgerError::Emergency(_) => "emergency_refused",
        }
    }
}

/// What a committed op means for a connected meter.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Send this `command/balance`.
    Balance(BalanceCommand),
    /// The meter was removed or its secret changed: end its session.
    Revoked,
    /// Send this `command/config` (the meter's limits changed with its tariff).
    Config(crate::payload::ConfigCommand),
}

/// An op's result plus what to tell the meter once it is committed.
pub struct Applied {
    pub outcome: Outcome,
    pub notice: Option<(MeterId, Notice)>,
    /// The account a consumption event now holds, newer than the meter's row.
    pub state: Option<(MeterId, Versioned)>,
    /// A `last_seen` the caller keeps for the next [`store::fold`] (in [`Accounts::Live`] mode).
    pub seen: Option<(MeterId, i64)>,
}

/// An account and the `seq` of the event it is as of.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub seq: i64,
    pub account: Account,
}

/// Where [`apply_with`] finds accounts newer than their rows.
#[derive(Clone, Copy)]
pub enum Accounts<'a> {
    /// In the unfolded consumption events (one-off callers: the CLI, tests).
    Stored,
    /// In the caller's memory (the writer thread): whatever it applied since its last fold.
    Live(&'a dyn Fn(&MeterId) -> Option<Versioned>),
}

/// Applies one op in `tx`. Nothing is visible to anyone until the caller commits.
pub fn apply(tx: &Connection, op: &Op, s: &LedgerSettings) -> Result<Applied, LedgerError> {
    apply_with(tx, op, s, Accounts::Stored)
}

/// [`apply`] with the caller's view of accounts newer than their rows.
pub fn apply_with(
    tx: &Connection,
    op: &Op,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Applied, LedgerError> {
    match op {
        Op::Report { meter, report, at } => apply_report(tx, meter, report, *at, s, accounts),
        Op::Credit(c) => apply_credit(tx, c, s, accounts, true),
        Op::Status { meter, status, at } => {
            if let Some(trip) = &status.trip {
                // A power trip is an alert, not a state of the meter: its status stays.
                if !store::set_presence(tx, meter, None, true, *at)? {
                    return Err(LedgerError::UnknownMeter(meter.clone()));
                }
                let data = json!({"alert": trip.alert(), "powerW": trip.power_w,
                                  "capW": trip.cap_w, "trips": trip.trips,
                                  "lockedOut": trip.locked_out});
                store::append_event(tx, "alert", Some(meter), *at, &data)?;
                return done();
            }
            // `disconnected` is the firmware's relay-off-for-no-credit, sent over a live
            // connection; only `offline` (its Last Will) says the meter is gone.
            let online = status.status != "offline";
            if !store::set_presence(tx, meter, Some(&status.status), online, *at)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data =
                json!({"status": status.status, "message": status.message, "report": status.raw});
            store::append_event(tx, "status", Some(meter), *at, &data)?;
            done()
        }
        Op::MeterBalance { meter, data, at } => {
            known(tx, meter, accounts)?;
            store::append_event(tx, "balance", Some(meter), *at, data)?;
            seen(tx, meter, *at, accounts, Outcome::Done)
        }
        Op::Presence { meter, online, at } => {
            let status = if *online { "online" } else { "offline" };
            if !store::set_presence(tx, meter, Some(status), *online, *at)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"status": status, "source": "connection"});
            store::append_event(tx, "status", Some(meter), *at, &data)?;
            done()
        }
        Op::SinkProgress {
            sink,
            through,
            delivered,
            dead,
            at,
        } => {
            store::advance_cursor(tx, sink, *through, *delivered, dead, *at)?;
            done()
        }
        Op::SinkFailure { sink, error, at } => {
            let error: String = error.chars().take(500).collect();
            store::record_sink_failure(tx, sink, &error, *at)?;
            done()
        }
        Op::KvPut { plugin, key, value } => {
            if let Some(v) = value {
                let (keys, bytes, current) = store::kv_usage(tx, plugin, key)?;
                let new_size = (key.len() + v.len()) as i64;
                let grown_keys = keys + i64::from(current.is_none());
                let grown_bytes = bytes - current.unwrap_or(0) + new_size;
                if (current.is_none() && grown_keys > store::KV_MAX_KEYS)
                    || (grown_bytes > bytes && grown_bytes > store::KV_MAX_BYTES)
                {
                    return Err(LedgerError::Full(format!(
                        "the plugin's store is full ({keys} keys, {bytes} bytes; at most {} keys, {} bytes)",
                        store::KV_MAX_KEYS,
                        store::KV_MAX_BYTES
                    )));
                }
            }
            store::kv_put(tx, plugin, key, value.as_deref())?;
            done()
        }
        Op::Ota(op) => Ok(Applied {
            outcome: match crate::ota::apply(tx, op)? {
                Some(id) => Outcome::Rollout { id },
                None => Outcome::Done,
            },
            notice: None,
            state: None,
            seen: None,
        }),
        Op::RecordUnapplied(u) => {
            record_unapplied(tx, u)?;
            done()
        }
        Op::ApplyUnapplied {
            reference,
            source,
            meter,
            at,
        } => apply_unapplied(tx, reference, source.as_deref(), meter, *at, s, accounts),
        Op::AddMeter {
            meter,
            name,
            phone,
            secret_hash,
            at,
        } => {
            let new = store::NewMeter {
                id: meter,
                name: name.as_deref(),
                phone: phone.as_deref(),
                secret_hash,
                at: *at,
            };
            if !store::insert_meter(tx, &new)? {
                return Err(LedgerError::MeterExists(meter.clone()));
            }
            let data = json!({"action": "added", "name": name, "phone": phone});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            done()
        }
        Op::SetTariff { meter, tariff, at } => {
            if let Some(name) = tariff.as_deref().filter(|n| !s.tariff.knows(n)) {
                return Err(LedgerError::UnknownTariff {
                    name: name.to_owned(),
                    known: s.tariff.names().join(", "),
                });
            }
            if !store::set_tariff(tx, meter, tariff.as_deref())? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"action": "tariff_changed", "tariff": tariff});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            // The new tariff's friendly hours and limits reach a connected meter at once.
            let (account, _) = known_with_tariff(tx, meter, accounts)?;
            let (balance, config) = meter_commands(&account, tariff.as_deref(), s, *at);
            let mut notices = vec![(meter.clone(), Notice::Balance(balance))];
            notices.extend(config.map(|c| (meter.clone(), Notice::Config(c))));
            Ok(swept(notices))
        }
        Op::Emergency { meter, at } => apply_emergency(tx, meter, *at, s, accounts),
        Op::AccrueStanding { at } => {
            let mut notices = Vec::new();
            for meter in store::meter_ids(tx)? {
                if let Some(cmd) = accrue_standing(tx, &meter, *at, s, accounts)? {
                    notices.push((meter, Notice::Balance(cmd)));
                }
            }
            Ok(swept(notices))
        }
        Op::FriendlyEdge { from, at } => friendly_edge(tx, *from, *at, s, accounts),
        Op::RemoveMeter { meter, at } => {
            if !store::delete_meter(tx, meter)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            store::append_event(tx, "meter", Some(meter), *at, &json!({"action": "removed"}))?;
            revoked(meter)
        }
        Op::SetSecret {
            meter,
            secret_hash,
            at,
        } => {
            if !store::set_secret_hash(tx, meter, secret_hash)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"action": "secret_changed"});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            revoked(meter)
        }
        Op::SetMain { meter, main, at } => {
            if !store::set_main(tx, meter, *main)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"action": "main_changed", "main": main});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            done()
        }
        Op::SiteReading { day, wh, at } => {
            store::put_site_reading(tx, day, *wh, *at)?;
            done()
        }
        Op::SetLegacy {
            meter,
            anonymous,
            source,
            at,
        } => {
            let pin = source.as_ref().map(|s| s.as_deref());
            if !store::set_legacy(tx, meter, *anonymous, pin)? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"action": "legacy_changed", "legacy_anonymous": anonymous, "legacy_source": source});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            // A session that came in anonymously must not outlive the opt-out.
            revoked(meter)
        }
        Op::SetOperatorPassword { hash } => {
            store::set_operator_password_hash(tx, hash)?;
            done()
        }
        Op::SetMeterDetails {
            meter,
            name,
            phone,
            at,
        } => {
            if !store::set_meter_details(tx, meter, name.as_deref(), phone.as_deref())? {
                return Err(LedgerError::UnknownMeter(meter.clone()));
            }
            let data = json!({"action": "details_changed", "name": name, "phone": phone});
            store::append_event(tx, "meter", Some(meter), *at, &data)?;
            done()
        }
    }
}

fn done() -> Result<Applied, LedgerError> {
    Ok(Applied {
        outcome: Outcome::Done,
        notice: None,
        state: None,
        seen: None,
    })
}

/// The meter was heard from at `at`: written now, or kept by a live caller for its next fold.
fn seen(
    tx: &Connection,
    meter: &MeterId,
    at: i64,
    accounts: Accounts<'_>,
    outcome: Outcome,
) -> Result<Applied, LedgerError> {
    let seen = match accounts {
        Accounts::Stored => {
            store::touch(tx, meter.as_str(), at)?;
            None
        }
        Accounts::Live(_) => Some((meter.clone(), at)),
    };
    Ok(Applied {
        outcome,
        notice: None,
        state: None,
        seen,
    })
}

/// The meter's current account: its row, or a newer one from `accounts`.
fn known(tx: &Connection, meter: &MeterId, accounts: Accounts<'_>) -> Result<Account, LedgerError> {
    Ok(known_with_tariff(tx, meter, accounts)?.0)
}

/// [`known`] and the meter's tariff name (`None`: the default), from the same row read.
fn known_with_tariff(
    tx: &Connection,
    meter: &MeterId,
    accounts: Accounts<'_>,
) -> Result<(Account, Option<String>), LedgerError> {
    let unknown = || LedgerError::UnknownMeter(meter.clone());
    let (row, state_seq, tariff) =
        store::account_row_with_tariff(tx, meter)?.ok_or_else(unknown)?;
    let newer = match accounts {
        Accounts::Stored => store::account(tx, meter)?,
        Accounts::Live(newer) => newer(meter)
            .filter(|v| v.seq > state_seq)
            .map(|v| v.account),
    };
    Ok((newer.unwrap_or(row), tariff))
}

fn swept(notices: Vec<(MeterId, Notice)>) -> Applied {
    Applied {
        outcome: Outcome::Swept(notices),
        notice: None,
        state: None,
        seen: None,
    }
}

/// What a meter is sent for its account outside a report or payment (at subscription, after
/// a tariff change): its balance priced by its tariff in force at `at`, and its limits as
/// `command/config` (`None` when neither its tariff nor `[limits]` has any).
pub fn meter_commands(
    a: &Account,
    tariff_name: Option<&str>,
    s: &LedgerSettings,
    at: i64,
) -> (BalanceCommand, Option<crate::payload::ConfigCommand>) {
    let pricing = &s.tariff;
    let tariff = pricing.in_force(tariff_name, at);
    let p = PriceAt {
        tariff: &tariff,
        zone: pricing.zone,
        at_ms: at,
    };
    let config = pricing
        .limits_for(tariff_name, at)
        .map(|l| l.config_command(s.rules.low_balance_wh, pricing.zone.offset_minutes() as i16));
    (balance_command_priced(a, p), config)
}

/// Whether a meter on `name` may be cut at `at` for lack of credit (outside friendly hours).
fn may_cut_at(s: &LedgerSettings, name: Option<&str>, at: i64) -> bool {
    !crate::tariff::account::is_friendly(&s.tariff.in_force(name, at), s.tariff.zone, at)
}

/// [`Op::FriendlyEdge`]: a fresh balance for each meter with a money account whose `mayCut`
/// differs between `from` and `at`.
fn friendly_edge(
    tx: &Connection,
    from: i64,
    at: i64,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Applied, LedgerError> {
    let zone = s.tariff.zone;
    // Most hour edges change nothing for any tariff: then no meter is read.
    let versions = s.tariff.versions();
    let any = versions.iter().any(|v| {
        let friendly = |t| crate::tariff::account::is_friendly(v, zone, t);
        friendly(from) != friendly(at)
            || v.effective_from
                .is_some_and(|d| (from + 1..=at).contains(&zone.midnight(d)))
    });
    if !any {
        return Ok(swept(Vec::new()));
    }
    let mut notices = Vec::new();
    for meter in store::meter_ids(tx)? {
        let (account, name) = known_with_tariff(tx, &meter, accounts)?;
        let name = name.as_deref();
        if account.money.is_none() || may_cut_at(s, name, from) == may_cut_at(s, name, at) {
            continue;
        }
        let tariff = tariff_for(s, &meter, name, at);
        let p = PriceAt {
            tariff: &tariff,
            zone,
            at_ms: at,
        };
        notices.push((meter, Notice::Balance(balance_command_priced(&account, p))));
    }
    Ok(swept(notices))
}

fn revoked(meter: &MeterId) -> Result<Applied, LedgerError> {
    Ok(Applied {
        outcome: Outcome::Done,
        notice: Some((meter.clone(), Notice::Revoked)),
        state: None,
        seen: None,
    })
}

/// The retained `command/balance` for an account.
pub fn balance_command_for(a: &crate::ledger::Account, now: i64) -> BalanceCommand {
    BalanceCommand {
        balance: wh_to_units(a.balance_wh),
        timestamp: now,
        balance_wh: a.balance_wh,
        ledger_seq: a.ledger_seq,
        ack_seq: a.v2_seq,
        relay: a.relay(),
        balance_kes: a
            .money
            .as_ref()
            .map(|m| (m.balance_cents - m.debt.total()) as f64 / 100.0),
        may_cut: true,
    }
}

/// [`balance_command_for`] with the meter's tariff at `now`: the relay stays on in friendly
/// hours, and `mayCut` says whether the meter may cut for lack of credit.
pub fn balance_command_priced(a: &Account, p: PriceAt<'_>) -> BalanceCommand {
    let mut cmd = balance_command_for(a, p.at_ms);
    if a.money.is_some() {
        let friendly = crate::tariff::account::is_friendly(p.tariff, p.zone, p.at_ms);
        cmd.may_cut = !friendly;
        if friendly {
            cmd.relay = crate::payload::Relay::On;
        }
    }
    cmd
}

/// The meter's tariff in force at `at`. A tariff the configuration no longer has falls back
/// to the default: the daemon warns of such meters once at start and `check-config` refuses
/// them, so this path (every report) does not log.
fn tariff_for(
    s: &LedgerSettings,
    meter: &MeterId,
    name: Option<&str>,
    at: i64,
) -> Arc<crate::tariff::Tariff> {
    if let Some(n) = name.filter(|n| !s.tariff.knows(n)) {
        tracing::debug!(meter = %meter, tariff = %Untrusted(n), "unconfigured tariff: default used");
    }
    s.tariff.in_force(name, at)
}

fn apply_report(
    tx: &Connection,
    meter: &MeterId,
    report: &Report,
    at: i64,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Applied, LedgerError> {
    let (mut account, tariff_name) = known_with_tariff(tx, meter, accounts)?;
    let tariff = tariff_for(s, meter, tariff_name.as_deref(), at);
    let p = PriceAt {
        tariff: &tariff,
        zone: s.tariff.zone,
        at_ms: at,
    };
    let shown_before = account.balance_wh;
    let (applied, priced, standing) = account.apply_report_priced(report, &s.rules, p)?;
    if matches!(applied.kind, ReportKind::Stale | ReportKind::Repeat) {
        // A retry of something already applied: no event, no command.
        return seen(tx, meter, at, accounts, Outcome::Report(applied));
    }
    // The event carries the account after the report; the meter's row catches up at the next
    // fold (see `store`), so a report writes one small row.
    let record = Consumption {
        report: report.clone(),
        kind: applied.kind,
        debit_wh: applied.debit_wh,
        account: account.clone(),
        itemised: crate::consumption::Itemised::from_applied(
            &tariff.name,
            priced.as_ref(),
            standing.cents,
        ),
    };
    let seq = store::append_consumption(tx, meter, at, &record)?;
    if priced.as_ref().is_some_and(|c| c.auto_emergency) {
        // Granted without a request (`emergency_auto`): said like a request, so sinks, the
        // statement and the operator see it; the consumption event holds the account.
        tracing::info!(meter = %meter, tariff = %tariff.name, "credit ran out: emergency credit granted automatically (once until the next payment)");
        let data = json!({"action": "emergency_credit", "auto": true, "tariff": tariff.name,
            "limitKes": tariff.emergency_credit.to_string(), "standingCents": 0});
        store::append_event(tx, "meter", Some(meter), at, &data)?;
    }
    for alert in &applied.alerts {
        let data = json!({"alert": alert.as_str(), "balanceWh": account.balance_wh,
                          "balance": wh_to_units(account.balance_wh), "relay": account.relay()});
        store::append_event(tx, "alert", Some(meter), at, &data)?;
    }
    // Also when only the price moved (a report without energy in another band or TOU period
    // re-prices the credit): the meter must show what the ledger shows.
    let notice = (applied.debit_wh != 0 || account.balance_wh != shown_before).then(|| {
        (
            meter.clone(),
            Notice::Balance(balance_command_priced(&account, p)),
        )
    });
    Ok(Applied {
        outcome: Outcome::Report(applied),
        notice,
        state: Some((meter.clone(), Versioned { seq, account })),
        seen: None,
    })
}

/// Sources that are the operator's own hand (the CLI's `credit`, the dashboard's cash top-up):
/// the minimum top-up is for payers, not for them.
const OPERATOR_SOURCES: [&str; 2] = ["manual", "cash"];

fn apply_credit(
    tx: &Connection,
    c: &Credit,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
    enforce_minimum: bool,
) -> Result<Applied, LedgerError> {
    let reference = ledger::payment_reference(&c.reference).ok_or(LedgerError::BadReference)?;
    if let Some(first) = store::payment_by_reference(tx, reference)? {
        if !ledger::same_payment(
            &first.meter,
            first.amount_cents,
            c.meter.as_str(),
            c.amount_cents,
        ) {
            // The answer says nothing of the first payment; the journal says which one it was.
            tracing::warn!(
                source = %Untrusted(&c.source),
                reference = %Untrusted(reference),
                meter = %c.meter,
                amount_cents = c.amount_cents,
                first_event_seq = first.event_seq,
                "payment refused: its reference was already used for another meter or amount"
            );
            return Err(LedgerError::ReferenceConflict);
        }
        return Ok(Applied {
            outcome: Outcome::Credited {
                payment: first,
                duplicate: true,
            },
            notice: None,
            state: None,
            seen: None,
        });
    }
    let (mut account, tariff_name) = known_with_tariff(tx, &c.meter, accounts)?;
    let tariff = tariff_for(s, &c.meter, tariff_name.as_deref(), c.at);
    let p = PriceAt {
        tariff: &tariff,
        zone: s.tariff.zone,
        at_ms: c.at,
    };
    if enforce_minimum
        && !OPERATOR_SOURCES.contains(&c.source.as_str())
        && !tariff.accepts_topup(c.amount_cents)
    {
        // The money moved (M-Pesa validation could not refuse it): kept, not lost, and not
        // credited below the tariff's minimum.
        let reason = format!(
            "below_minimum_topup: KES {} is below tariff {}'s minimum top-up of KES {}",
            crate::consumption::cents_kes(c.amount_cents),
            tariff.name,
            tariff.minimum_topup
        );
        tracing::warn!(
            source = %Untrusted(&c.source),
            reference = %Untrusted(reference),
            meter = %c.meter,
            amount_cents = c.amount_cents,
            tariff = %tariff.name,
            "payment below the minimum top-up: not credited, kept as unapplied"
        );
        let u = store::UnappliedRow {
            source: c.source.clone(),
            reference: reference.to_string(),
            amount_cents: c.amount_cents,
            account: c.meter.to_string(),
            phone: c.phone.clone(),
            reason: reason.clone(),
            raw: None,
            received_at: c.at,
            applied_meter: None,
            applied_at: None,
        };
        record_unapplied(tx, &u)?;
        return Ok(Applied {
            outcome: Outcome::Unapplied { reason },
            notice: None,
            state: None,
            seen: None,
        });
    }
    let before_wh = account.ensure_money(p).clone();
    let before_wh = ledger::units_shown(&before_wh, p);
    let (paid, standing) = account.credit_priced(c.amount_cents, p);
    // The Wh the payment added to what the meter is shown (debt recovery included).
    let credit_wh = account.balance_wh - before_wh;
    let m = account.money.as_ref().expect("ensure_money");
    let mut data = json!({
        "source": c.source, "reference": reference,
        "amount": c.amount_cents as f64 / 100.0, "amountCents": c.amount_cents,
        "creditWh": credit_wh, "units": wh_to_units(credit_wh),
        "balanceWh": account.balance_wh, "balance": wh_to_units(account.balance_wh),
        "tariff": tariff.name,
        "toBalanceCents": paid.to_balance,
        "standingCents": standing.cents,
        "debtRecoveredCents": {"emergency": paid.recovered.emergency,
            "standing": paid.recovered.standing, "arrears": paid.recovered.arrears},
        "balanceKes": crate::consumption::cents_kes(m.balance_cents),
        "debtKes": crate::consumption::cents_kes(m.debt.total()),
    });
    if let Some(phone) = &c.phone {
        data["phone"] = json!(phone);
    }
    let event_seq = store::append_event(tx, "payment", Some(&c.meter), c.at, &data)?;
    // A payment writes the row at once, as of its event: older consumption events never
    // overwrite it.
    store::save_account(tx, c.meter.as_str(), &account, event_seq)?;
    let payment = PaymentRow {
        source: c.source.clone(),
        reference: reference.to_string(),
        meter: c.meter.to_string(),
        amount_cents: c.amount_cents,
        credit_wh,
        balance_after_wh: account.balance_wh,
        at: c.at,
        event_seq,
    };
    store::insert_payment(tx, &payment)?;
    Ok(Applied {
        outcome: Outcome::Credited {
            payment,
            duplicate: false,
        },
        notice: Some((
            c.meter.clone(),
            Notice::Balance(balance_command_priced(&account, p)),
        )),
        state: None,
        seen: None,
    })
}

/// A meter's account moved by something other than a report (emergency credit, a standing
/// charge): the event `data` (completed with the balances) and the row, written at once as of
/// that event like a payment's.
fn save_with_event(
    tx: &Connection,
    meter: &MeterId,
    account: &Account,
    at: i64,
    mut data: serde_json::Value,
) -> Result<(), LedgerError> {
    if let Some(m) = &account.money {
        data["balanceWh"] = json!(account.balance_wh);
        data["balance"] = json!(wh_to_units(account.balance_wh));
        data["balanceKes"] = json!(crate::consumption::cents_kes(m.balance_cents));
        data["debtKes"] = json!(crate::consumption::cents_kes(m.debt.total()));
    }
    let seq = store::append_event(tx, "meter", Some(meter), at, &data)?;
    store::save_account(tx, meter.as_str(), account, seq)?;
    Ok(())
}

fn apply_emergency(
    tx: &Connection,
    meter: &MeterId,
    at: i64,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Applied, LedgerError> {
    let (mut account, tariff_name) = known_with_tariff(tx, meter, accounts)?;
    let tariff = tariff_for(s, meter, tariff_name.as_deref(), at);
    let p = PriceAt {
        tariff: &tariff,
        zone: s.tariff.zone,
        at_ms: at,
    };
    let m = account.ensure_money(p);
    let standing = m.accrue_standing(p.tariff, at);
    m.request_emergency(p.tariff)?;
    account.balance_wh = ledger::units_shown(m, p);
    account.ledger_seq += 1;
    let data = json!({"action": "emergency_credit", "tariff": tariff.name,
        "limitKes": tariff.emergency_credit.to_string(), "standingCents": standing.cents});
    save_with_event(tx, meter, &account, at, data)?;
    Ok(Applied {
        outcome: Outcome::Done,
        notice: Some((
            meter.clone(),
            Notice::Balance(balance_command_priced(&account, p)),
        )),
        state: None,
        seen: None,
    })
}

/// Charges the standing-charge periods due by `at` (nothing is written when none is due);
/// the meter's new balance command when something was charged.
fn accrue_standing(
    tx: &Connection,
    meter: &MeterId,
    at: i64,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Option<BalanceCommand>, LedgerError> {
    let (mut account, tariff_name) = known_with_tariff(tx, meter, accounts)?;
    let tariff = tariff_for(s, meter, tariff_name.as_deref(), at);
    if tariff.standing_charge.is_none() {
        return Ok(None);
    }
    let p = PriceAt {
        tariff: &tariff,
        zone: s.tariff.zone,
        at_ms: at,
    };
    let m = account.ensure_money(p);
    let c = m.accrue_standing(p.tariff, at);
    if c.cents == 0 {
        return Ok(None);
    }
    account.balance_wh = ledger::units_shown(m, p);
    account.ledger_seq += 1;
    let data = json!({"action": "standing_charge", "tariff": tariff.name, "periods": c.periods,
        "cents": c.cents, "fromBalanceCents": c.from_balance, "toDebtCents": c.to_debt});
    save_with_event(tx, meter, &account, at, data)?;
    Ok(Some(balance_command_priced(&account, p)))
}

/// Keeps a payment that credits no meter for the operator (a payment source's, or one below
/// its tariff's minimum top-up); nothing when its reference was credited already.
fn record_unapplied(tx: &Connection, u: &store::UnappliedRow) -> Result<(), LedgerError> {
    // Credited already (references are unique per site, whatever the source): nothing is
    // left to apply.
    let reference = ledger::payment_reference(&u.reference).unwrap_or(&u.reference);
    if store::payment_by_reference(tx, reference)?.is_some() {
        return Ok(());
    }
    let retention = store::UNAPPLIED_RETENTION.as_millis() as i64;
    store::prune_unapplied(tx, &u.source, u.received_at - retention)?;
    let open = store::unapplied_open(tx, &u.source)?;
    // A reference already kept is a retry: answered, and not counted against the cap.
    let known = store::unapplied_by_reference(tx, &u.reference)?
        .iter()
        .any(|k| k.source == u.source);
    if !known && open >= store::UNAPPLIED_MAX_OPEN_PER_SOURCE {
        return Err(LedgerError::Full(format!(
                "{open} unapplied payments of {} wait for the operator (at most {}); apply or wait for them to age out",
                u.source,
                store::UNAPPLIED_MAX_OPEN_PER_SOURCE
            )));
    }
    store::insert_unapplied(tx, u)?;
    Ok(())
}

fn apply_unapplied(
    tx: &Connection,
    reference: &str,
    source: Option<&str>,
    meter: &MeterId,
    at: i64,
    s: &LedgerSettings,
    accounts: Accounts<'_>,
) -> Result<Applied, LedgerError> {
    let mut kept = store::unapplied_by_reference(tx, reference)?;
    kept.retain(|k| source.is_none_or(|s| s == k.source));
    let k = match kept.as_slice() {
        [] => return Err(LedgerError::NotUnapplied(reference.to_string())),
        [one] => one.clone(),
        many => {
            return Err(LedgerError::AmbiguousReference {
                reference: reference.to_string(),
                sources: many
                    .iter()
                    .map(|k| k.source.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    if let Some(m) = &k.applied_meter {
        return Err(LedgerError::AlreadyApplied {
            reference: k.reference,
            meter: m.clone(),
        });
    }
    // The source's own (source, reference): if the payment reaches the ledger some other way
    // too (a Daraja retry after the meter was added), it still credits once.
    let credit = Credit {
        meter: meter.clone(),
        source: k.source.clone(),
        reference: k.reference.clone(),
        amount_cents: k.amount_cents,
        at,
        phone: None,
    };
    // The operator's decision: a kept payment below the minimum top-up is credited.
    let applied = apply_credit(tx, &credit, s, accounts, false)?;
    if let Outcome::Credited {
        payment,
        duplicate: true,
    } = &applied.outcome
    {
        return Err(LedgerError::AlreadyApplied {
            reference: k.reference,
            meter: payment.meter.clone(),
        });
    }
    store::mark_unapplied_applied(tx, &k.source, &k.reference, meter.as_str(), at)?;
    Ok(applied)
}

/// Applies one op in its own transaction on `conn` (the CLI's path).
pub fn apply_now(
    conn: &mut Connection,
    op: &Op,
    s: &LedgerSettings,
) -> Result<Applied, LedgerError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    store::fold(&tx, std::iter::empty())?;
    let applied = apply(&tx, op, s)?;
    tx.commit()?;
    Ok(applied)
}

/// Receives notices after their commit, in commit order.
pub type Notify = Arc<dyn Fn(&MeterId, Notice) + Send + Sync>;

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Outcome, LedgerError>>,
}

enum Msg {
    Job(Job),
    /// Look for changes other processes (the CLI) committed.
    Tick,
    /// Fold now and say when done (a clean stop).
    Fold(oneshot::Sender<()>),
}

/// The handle through which the daemon changes the ledger.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Msg>,
}

impl Writer {
    /// Starts the writer thread on `conn`. The thread ends when every `Writer` is dropped.
    pub fn start(
        mut conn: Connection,
        settings: LedgerSettings,
        options: WriterOptions,
        notify: Notify,
        bell: Arc<Bell>,
        metrics: Arc<Metrics>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (jobs, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                let mut watch = ExternalWatch::new(&conn);
                let mut ticks: u64 = 0;
                let mut live = Live::new(options.alerts.clone(), bell.clone());
                // Rows must be current for every meter `live` does not hold: catch up with
                // what an earlier run (killed before its fold) left unfolded.
                live.fold(&mut conn, &metrics, true);
                let mut load = Load::new();
                while let Some(first) = rx.blocking_recv() {
                    let arrived = std::time::Instant::now();
                    let mut tick = false;
                    let mut fold_requests = Vec::new();
                    let mut next = Some(first);
                    let mut waited = options.commit_delay.is_zero() || !load.light();
                    loop {
                        while let Some(msg) = next.take() {
                            match msg {
                                Msg::Job(job) => batch.push(job),
                                Msg::Tick => tick = true,
                                Msg::Fold(done) => fold_requests.push(done),
                            }
                            if batch.len() < MAX_BATCH {
                                next = rx.try_recv().ok();
                            }
                        }
                        // With a commit delay, reports that arrive meanwhile share the commit.
                        // Only a light load waits: a busy writer already commits many ops at a
                        // time (they gather during the previous fsync), and a batch without
                        // reports (a sink's progress, a payment) never waits.
                        let reports = batch.iter().any(|j| matches!(j.op, Op::Report { .. }));
                        if waited || !reports || batch.len() >= DELAY_BELOW {
                            break;
                        }
                        waited = true;
                        std::thread::sleep(options.commit_delay.saturating_sub(arrived.elapsed()));
                        next = rx.try_recv().ok();
                    }
                    load.add(batch.len());
                    if !batch.is_empty() {
                        if let Some(own) = commit_batch(
                            &mut conn, &mut batch, &settings, &notify, &metrics, &mut live,
                        ) {
                            watch.made(own);
                        }
                        bell.ring();
                    }
                    if tick {
                        watch.check(&conn, &settings, &notify, &metrics);
                        ticks += 1;
                        if ticks % FOLD_EVERY_TICKS == 0 {
                            // Even with no report since the last fold: `folded_seq` then
                            // catches up with the other events, which housekeeping waits for.
                            live.fold(&mut conn, &metrics, true);
                        }
                        if ticks % HOUSEKEEPING_EVERY_TICKS == 1 {
                            keep_house(&mut conn, &options, &metrics, &mut live);
                        }
                    }
                    if live.unfolded >= FOLD_AT {
                        live.fold(&mut conn, &metrics, false);
                    }
                    if !fold_requests.is_empty() {
                        live.fold(&mut conn, &metrics, true);
                        for done in fold_requests {
                            let _ = done.send(());
                        }
                    }
                }
                live.fold(&mut conn, &metrics, false);
            })
            .expect("spawn ledger writer thread");
        (Writer { jobs }, handle)
    }

    /// Queues an op behind those already queued (ops are applied in queue order) and returns
    /// where its result will arrive. The op is applied even if the receiver is dropped.
    pub async fn enqueue(
        &self,
        op: Op,
    ) -> Result<oneshot::Receiver<Result<Outcome, LedgerError>>, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Msg::Job(Job { op, reply }))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        Ok(rx)
    }

    /// Folds the reports held in memory into the meters' rows now (a clean stop does this, so
    /// the database is up to date without the daemon).
    pub async fn fold(&self) -> Result<(), LedgerError> {
        let (done, rx) = oneshot::channel();
        self.jobs
            .send(Msg::Fold(done))
            .await
            .map_err(|_| LedgerError::Stopped)?;
        rx.await.map_err(|_| LedgerError::Stopped)
    }

    /// Asks the writer to pick up changes committed by other processes; the daemon calls this
    /// about once a second. Skipped when the queue is full (the next tick will do).
    pub fn tick(&self) {
        let _ = self.jobs.try_send(Msg::Tick);
    }

    /// Submits an op and waits until it is committed (or failed).
    pub async fn submit(&self, op: Op) -> Result<Outcome, LedgerError> {
        let rx = self.enqueue(op).await?;
        rx.await.map_err(|_| LedgerError::Stopped)?
    }

    /// `submit` for plain threads (the outbox runners); never call it on a tokio worker.
    pub fn submit_blocking(&self, op: Op) -> Result<Outcome, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .blocking_send(Msg::Job(Job { op, reply }))
            .map_err(|_| LedgerError::Stopped)?;
        rx.blocking_recv().map_err(|_| LedgerError::Stopped)?
    }
}

/// What the writer applied since its last fold: accounts newer than their rows, and
/// `last_seen` times not yet written.
struct Live {
    accounts: HashMap<MeterId, Versioned>,
    seen: HashMap<MeterId, i64>,
    unfolded: usize,
    /// The alert rules run at every fold, in its transaction.
    alerts: crate::alerts::Thresholds,
    /// When this writer started: silence is counted from no earlier than this.
    up_since: i64,
    /// Rung when a fold wrote alert events, so idle sink runners take them at once.
    bell: Arc<Bell>,
}

impl Live {
    fn new(alerts: crate::alerts::Thresholds, bell: Arc<Bell>) -> Live {
        Live {
            accounts: HashMap::new(),
            seen: HashMap::new(),
            unfolded: 0,
            alerts,
            up_since: store::now_ms(),
            bell,
        }
    }

    fn add(&mut self, applied: &Applied) {
        if let Some((meter, v)) = &applied.state {
            self.accounts.insert(meter.clone(), v.clone());
            self.unfolded += 1;
        }
        if let Some((meter, at)) = &applied.seen {
            let t = self.seen.entry(meter.clone()).or_insert(*at);
            *t = (*t).max(*at);
        }
    }

    /// Writes the newer accounts into the meters' rows ([`store::fold`]), in its own commit;
    /// with nothing held here, only when `always`.
    fn fold(&mut self, conn: &mut Connection, metrics: &Metrics, always: bool) {
        if self.unfolded == 0 && self.seen.is_empty() && !always {
            return;
        }
        let folded = (|| -> Result<(store::Folded, Vec<crate::alerts::Transition>), StoreError> {
            let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let f = store::fold_keeping(
                &tx,
                self.seen.iter().map(|(m, t)| (m.as_str(), *t)),
                self.alerts.usage_retention_days,
            )?;
            // In the fold's transaction: the episodes, their events and `folded_seq` commit
            // together, so a crash neither loses nor repeats one. In a savepoint: a failing
            // rule must never hold up the fold.
            let raised = {
                let sp = tx.savepoint()?;
                match crate::alerts::evaluate(
                    &sp,
                    &self.alerts,
                    store::now_ms(),
                    self.up_since,
                    &f.reports,
                ) {
                    Ok(r) => {
                        sp.commit()?;
                        r
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "alert rules failed; the fold goes on without them");
                        metrics.inc("umeme_ledger_errors_total", &[("reason", "alerts")]);
                        Vec::new()
                    }
                }
            };
            tx.commit()?;
            Ok((f, raised))
        })();
        match folded {
            Ok((f, transitions)) => {
                if !transitions.is_empty() {
                    self.bell.ring();
                }
                for t in &transitions {
                    let (alert, state) = (t.kind.as_str(), t.state.as_str());
                    metrics.inc("umeme_alerts_total", &[("alert", alert), ("state", state)]);
                    let meter = t.meter.as_ref().map_or("-", MeterId::as_str);
                    match t.state {
                        crate::alerts::State::Raised => {
                            tracing::warn!(meter, alert, data = %t.data, "alert raised")
                        }
                        crate::alerts::State::Resolved => {
                            tracing::info!(meter, alert, data = %t.data, "alert resolved")
                        }
                    }
                }
                if let Ok(open) = crate::alerts::open_counts(conn) {
                    for (alert, n) in open {
                        metrics.set("umeme_alerts_open", &[("alert", alert)], n as f64);
                    }
                }
                metrics.inc("umeme_ledger_folds_total", &[]);
                metrics.add("umeme_ledger_folded_meters_total", &[], f.meters as u64);
                // The rows are now as new as anything held here.
                self.accounts.clear();
                self.seen.clear();
                self.unfolded = 0;
            }
            // Nothing is lost: the events hold the accounts and the next tick retries.
            Err(e) => {
                tracing::warn!(error = %e, "could not fold recent reports into the meters table")
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
    settings: &LedgerSettings,
    notify: &Notify,
    metrics: &Metrics,
    live: &mut Live,
) -> Option<RangeInclusive<i64>> {
    let mut results: Vec<Result<Applied, LedgerError>> = Vec::with_capacity(batch.len());
    let committed = (|| -> Result<RangeInclusive<i64>, LedgerError> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Nobody else writes during an immediate transaction: the events numbered between
        // these two reads are this batch's own (the external watch skips them).
        let before = store::last_event_seq(&tx)?;
        // Accounts this batch changed; they join `live` only once the batch is committed.
        let mut staged: HashMap<MeterId, Versioned> = HashMap::new();
        for job in batch.iter() {
            // A savepoint per op: one op's failure leaves the others in the batch intact.
            let sp = tx.savepoint()?;
            let newer = |m: &MeterId| staged.get(m).or_else(|| live.accounts.get(m)).cloned();
            let r = apply_with(&sp, &job.op, settings, Accounts::Live(&newer));
            if let Ok(applied) = &r {
                sp.commit()?;
                if let Some((meter, v)) = &applied.state {
                    staged.insert(meter.clone(), v.clone());
                }
            }
            results.push(r);
        }
        let after = store::last_event_seq(&tx)?;
        tx.commit()?;
        Ok(before + 1..=after)
    })();
    match committed {
        Ok(own) => {
            metrics.inc("umeme_ledger_commits_total", &[]);
            for (job, result) in batch.drain(..).zip(results) {
                let reply = match result {
                    Ok(mut applied) => {
                        live.add(&applied);
                        metrics.inc("umeme_ledger_ops_total", &[]);
                        if let (Op::Credit(c), Outcome::Unapplied { .. }) =
                            (&job.op, &applied.outcome)
                        {
                            metrics.inc(
                                "umeme_payments_total",
                                &[("source", &c.source), ("outcome", "below_minimum")],
                            );
                        }
                        if let Some((meter, notice)) = applied.notice {
                            notify(&meter, notice);
                        }
                        if let Outcome::Swept(notices) = &mut applied.outcome {
                            for (meter, notice) in notices.drain(..) {
                                notify(&meter, notice);
                            }
                        }
                        Ok(applied.outcome)
                    }
                    Err(e) => {
                        metrics.inc("umeme_ledger_errors_total", &[("reason", e.reason())]);
                        Err(e)
                    }
                };
                let _ = job.reply.send(reply);
            }
            Some(own)
        }
        Err(e) => {
            tracing::error!(error = %e, ops = batch.len(), "ledger commit failed; nothing in this batch was applied");
            metrics.add(
                "umeme_ledger_errors_total",
                &[("reason", "commit")],
                batch.len() as u64,
            );
            let msg = e.to_string();
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(LedgerError::CommitFailed(msg.clone())));
            }
            None
        }
    }
}

/// Notices for payments and meter changes that another process (the CLI) committed, so a
/// `umeme-gateway credit` reaches a connected meter within about a second, and such payments
/// count in `umeme_payments_total`. Events the writer made itself were already announced after
/// their commit: they are skipped, so one balance change is one `command/balance`.
struct ExternalWatch {
    last_seq: i64,
    /// Event seqs committed by this writer and not yet passed by `last_seq`.
    own: VecDeque<RangeInclusive<i64>>,
}

impl ExternalWatch {
    fn new(conn: &Connection) -> ExternalWatch {
        ExternalWatch {
            last_seq: store::last_event_seq(conn).unwrap_or(0),
            own: VecDeque::new(),
        }
    }

    /// Records the seqs of a batch this writer committed.
    fn made(&mut self, seqs: RangeInclusive<i64>) {
        if seqs.is_empty() {
            return;
        }
        if self.own.is_empty() && *seqs.start() == self.last_seq + 1 {
            // Nothing from outside came in between: no need to remember the range.
            self.last_seq = *seqs.end();
        } else {
            self.own.push_back(seqs);
        }
    }

    fn check(&mut self, conn: &Connection, s: &LedgerSettings, notify: &Notify, metrics: &Metrics) {
        // The newest seq first: the CLI may commit between the two reads, and what it adds
        // after `newest` is left for the next tick.
        let read = store::last_event_seq(conn)
            .and_then(|newest| Ok((newest, store::meter_changes_after(conn, self.last_seq)?)));
        let (newest, changes) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read recent meter changes");
                return;
            }
        };
        for store::MeterChange {
            seq,
            kind,
            meter,
            source,
        } in changes
        {
            if seq > newest || self.own.iter().any(|r| r.contains(&seq)) {
                continue;
            }
            let Ok(meter) = MeterId::parse(&meter) else {
                continue;
            };
            let account = store::account_and_tariff(conn, &meter).ok().flatten();
            // Priced like the writer's own notices: the tariff's friendly hours and limits.
            let commands = |(a, name): (Account, Option<String>)| {
                meter_commands(&a, name.as_deref(), s, store::now_ms())
            };
            match (kind.as_str(), account) {
                ("payment", Some(a)) => {
                    metrics.inc(
                        "umeme_payments_total",
                        &[
                            ("source", source.as_deref().unwrap_or("unknown")),
                            ("outcome", "credited"),
                        ],
                    );
                    notify(&meter, Notice::Balance(commands(a).0))
                }
                // The account changed (`source` holds a meter event's action): a new balance.
                ("meter", Some(a))
                    if matches!(
                        source.as_deref(),
                        Some("emergency_credit" | "standing_charge")
                    ) =>
                {
                    notify(&meter, Notice::Balance(commands(a).0))
                }
                // Another tariff: its friendly hours and limits.
                ("meter", Some(a)) if source.as_deref() == Some("tariff_changed") => {
                    let (balance, config) = commands(a);
                    notify(&meter, Notice::Balance(balance));
                    if let Some(c) = config {
                        notify(&meter, Notice::Config(c));
                    }
                }
                ("meter", _) => notify(&meter, Notice::Revoked),
                _ => {}
            }
        }
        self.last_seq = self.last_seq.max(newest);
        let seen = self.last_seq;
        self.own.retain(|r| *r.end() > seen);
    }
}

/// Enforces `[outbox] retention` and `max_bytes` (see [`store::prune`]) in its own transaction.
fn keep_house(conn: &mut Connection, h: &WriterOptions, metrics: &Metrics, live: &mut Live) {
    // Housekeeping never removes unfolded events: fold first when space is needed.
    if store::used_bytes(conn).is_ok_and(|b| b as u64 > h.max_bytes) {
        live.fold(conn, metrics, true);
    }
    let retain_after = store::now_ms() - h.retention.as_millis() as i64;
    let pruned = (|| -> Result<store::Pruned, StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let p = store::prune(
            &tx,
            &h.sinks,
            retain_after,
            h.max_bytes,
            HOUSEKEEPING_BUDGET,
        )?;
        tx.commit()?;
        Ok(p)
    })();
    match pruned {
        Ok(p) => {
            if p.expired > 0 {
                tracing::debug!(
                    removed = p.expired,
                    "delivered events past their retention removed"
                );
                metrics.add("umeme_outbox_expired_total", &[], p.expired as u64);
            }
            if p.dropped > 0 {
                tracing::warn!(
                    dropped = p.dropped,
                    undelivered = p.undelivered,
                    max_bytes = h.max_bytes,
                    "outbox over its disk cap: telemetry dropped, biggest holders first"
                );
                metrics.add("umeme_outbox_dropped_total", &[], p.dropped as u64);
                metrics.add(
                    "umeme_outbox_dropped_undelivered_total",
                    &[],
                    p.undelivered as u64,
                );
            }
            let was_full = metrics.get("umeme_outbox_full", &[]) > 0.0;
            if p.full && !was_full {
                tracing::error!(max_bytes = h.max_bytes,
                    "outbox full: only payments, alerts and meter changes are left and they are never dropped; raise [outbox] max_bytes or restore the uplink");
            }
            metrics.set("umeme_outbox_full", &[], if p.full { 1.0 } else { 0.0 });
        }
        Err(e) => tracing::warn!(error = %e, "outbox housekeeping failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn credit(meter: &MeterId, reference: &str) -> Op {
        Op::Credit(Credit {
            meter: meter.clone(),
            source: "manual".into(),
            reference: reference.into(),
            amount_cents: 100,
            at: 1,
            phone: None,
        })
    }

    #[test]
    fn the_external_watch_announces_outside_payments_once_and_never_the_writers_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let mut own = store::open(&path, "site").unwrap();
        let mut cli = store::open_without_upgrade(&path, "site").unwrap();
        let s = LedgerSettings {
            rules: Rules { low_balance_wh: 0 },
            tariff: Tariff::try_from(0.05).unwrap(),
        };
        let meter = MeterId::parse("M1").unwrap();
        let add = Op::AddMeter {
            meter: meter.clone(),
            name: None,
            phone: None,
            secret_hash: crate::auth::hash_secret("secret-123"),
            at: 1,
        };
        apply_now(&mut cli, &add, &s).unwrap();
        let mut watch = ExternalWatch::new(&own);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let notify: Notify = Arc::new(move |_, n| h.lock().unwrap().push(n));
        let metrics = Metrics::default();
        // The writer's own payment, between two from outside: only those two are news.
        let own_payment = |conn: &mut Connection, watch: &mut ExternalWatch, r: &str| {
            let before = store::last_event_seq(conn).unwrap();
            apply_now(conn, &credit(&meter, r), &s).unwrap();
            watch.made(before + 1..=store::last_event_seq(conn).unwrap());
        };
        apply_now(&mut cli, &credit(&meter, "CLI-1"), &s).unwrap();
        own_payment(&mut own, &mut watch, "OWN-1");
        apply_now(&mut cli, &credit(&meter, "CLI-2"), &s).unwrap();
        own_payment(&mut own, &mut watch, "OWN-2");
        watch.check(&own, &s, &notify, &metrics);
        assert_eq!(heard.lock().unwrap().len(), 2);
        let counted = [("source", "manual"), ("outcome", "credited")];
        assert_eq!(metrics.get("umeme_payments_total", &counted), 2.0);
        assert!(
            watch.own.is_empty(),
            "ranges behind the watch are forgotten"
        );
        // Nothing new: nothing announced, nothing counted again.
        own_payment(&mut own, &mut watch, "OWN-3");
        watch.check(&own, &s, &notify, &metrics);
        assert_eq!(heard.lock().unwrap().len(), 2);
        assert_eq!(metrics.get("umeme_payments_total", &counted), 2.0);
    }

    #[test]
    fn a_friendly_edge_tells_only_the_meters_whose_may_cut_changed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("gateway.toml");
        std::fs::write(
            &cfg,
            r#"
[site]
timezone = "UTC"
[ledger]
default_tariff = "nights"
[[tariffs]]
name = "nights"
bands = [{ from_kwh = 0, price = "20" }]
friendly = { windows = [{ days = "all", from_hour = 18, to_hour = 8 }] }
[[tariffs]]
name = "plain"
bands = [{ from_kwh = 0, price = "20" }]
"#,
        )
        .unwrap();
        let config = crate::config::Config::load(Some(&cfg)).unwrap();
        let s = LedgerSettings {
            rules: Rules { low_balance_wh: 0 },
            tariff: config.ledger.tariff.clone(),
        };
        let mut conn = store::open(&dir.path().join("gateway.db"), "site").unwrap();
        let day = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000;
        let at = |h: i64, m: i64| day + h * 3_600_000 + m * 60_000;
        let ids = ["NIGHT1", "PLAIN1", "UNPAID"].map(|m| MeterId::parse(m).unwrap());
        for m in &ids {
            let add = Op::AddMeter {
                meter: m.clone(),
                name: None,
                phone: None,
                secret_hash: "x".into(),
                at: at(17, 0),
            };
            apply_now(&mut conn, &add, &s).unwrap();
        }
        let plain = Op::SetTariff {
            meter: ids[1].clone(),
            tariff: Some("plain".into()),
            at: at(17, 0),
        };
        apply_now(&mut conn, &plain, &s).unwrap();
        for (i, m) in ids[..2].iter().enumerate() {
            let mut c = credit(m, &format!("PAY-{i}"));
            if let Op::Credit(c) = &mut c {
                c.at = at(17, 0);
            }
            apply_now(&mut conn, &c, &s).unwrap();
        }
        let edge = |conn: &mut Connection, from, to| {
            let op = Op::FriendlyEdge { from, at: to };
            match apply_now(conn, &op, &s).unwrap().outcome {
                Outcome::Swept(n) => n,
                other => panic!("{other:?}"),
            }
        };
        // 18:00: only the meter on the tariff with friendly hours, and with an account.
        let told = edge(&mut conn, at(17, 30), at(18, 30));
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].0, ids[0]);
        let Notice::Balance(b) = &told[0].1 else {
            panic!("{told:?}")
        };
        assert!(!b.may_cut);
        // 19:00: nothing changed for anyone.
        assert!(edge(&mut conn, at(18, 30), at(19, 30)).is_empty());
        // 08:00 the next day: it may cut again.
        let told = edge(&mut conn, at(31, 30), at(32, 30));
        assert_eq!(told.len(), 1, "{told:?}");
        let Notice::Balance(b) = &told[0].1 else {
            panic!("{told:?}")
        };
        assert!(b.may_cut);
    }
}
