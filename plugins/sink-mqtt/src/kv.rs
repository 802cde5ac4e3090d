//! What commands keep in the gateway's key-value store for this plugin (durable, so a restart
//! forgets nothing): the nonces of signed commands within the window, each with its result,
//! and the day's total of cloud credits.
//!
//! Nonces live in one key per minute of their command's `ts` (`nonce/{minute}`, a JSON object
//! nonce → result), listed in `nonce/minutes`. A replay carries the same signed `ts`, so one
//! key answers whether a nonce was seen; a minute is deleted once every `ts` in it is outside
//! the window, which a replay could no longer pass. Both keys stay bounded: at most
//! [`MAX_COMMANDS_PER_MINUTE`] nonces per minute, and only minutes within the window.

use serde_json::{json, Map, Value};
use umeme_plugin_sdk::HostError;

use crate::command::Downlink;

/// Signed commands taken per minute of `ts`; one minute's key stays under the store's 64 KiB
/// per value (a result is at most about 500 bytes).
pub const MAX_COMMANDS_PER_MINUTE: usize = 100;

const MINUTES: &str = "nonce/minutes";
const CREDIT_DAY: &str = "credit/day";

fn minute_key(minute: i64) -> String {
    format!("nonce/{minute}")
}

fn load_map(store: &dyn Downlink, key: &str) -> Result<Map<String, Value>, HostError> {
    Ok(store
        .kv_get(key)?
        .and_then(|t| serde_json::from_str::<Map<String, Value>>(&t).ok())
        .unwrap_or_default())
}

/// Whether the nonce of a command signed at `ts` was seen: its first result if so.
pub fn seen(store: &dyn Downlink, ts: i64, nonce: &str) -> Result<Option<Value>, HostError> {
    Ok(load_map(store, &minute_key(ts.div_euclid(60)))?.remove(nonce))
}

/// Whether one more command signed at `ts` may be taken (its minute is not full).
pub fn has_room(store: &dyn Downlink, ts: i64) -> Result<bool, HostError> {
    Ok(load_map(store, &minute_key(ts.div_euclid(60)))?.len() < MAX_COMMANDS_PER_MINUTE)
}

/// Records a nonce with its result, and deletes the minutes no `ts` within `window_secs` of
/// `now` can fall in.
pub fn record(
    store: &dyn Downlink,
    ts: i64,
    nonce: &str,
    result: &Value,
    now: i64,
    window_secs: i64,
) -> Result<(), HostError> {
    let minute = ts.div_euclid(60);
    let key = minute_key(minute);
    let mut nonces = load_map(store, &key)?;
    nonces.insert(nonce.to_string(), result.clone());
    store.kv_put(&key, Some(&Value::Object(nonces).to_string()))?;

    let listed: Vec<i64> = store
        .kv_get(MINUTES)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let oldest_live = (now - window_secs).div_euclid(60);
    let mut kept = Vec::with_capacity(listed.len() + 1);
    for m in listed {
        if m < oldest_live {
            store.kv_put(&minute_key(m), None)?;
        } else if m != minute {
            kept.push(m);
        }
    }
    kept.push(minute);
    store.kv_put(MINUTES, Some(&json!(kept).to_string()))
}

/// Why a credit is over a cap.
#[derive(Debug, PartialEq)]
pub struct OverCap(pub String);

/// Counts `cents` against the day's cap before the credit runs (a crash afterwards counts
/// a credit that may not have happened, never the other way round).
pub fn reserve_credit(
    store: &dyn Downlink,
    day: i64,
    cents: i64,
    cap_cents: i64,
) -> Result<Result<(), OverCap>, HostError> {
    let total = credited_on(store, day)?;
    if total.saturating_add(cents) > cap_cents {
        return Ok(Err(OverCap(format!(
            "over the daily cap for cloud credits (max_credit_kes_per_day {}): KES {} left today (UTC)",
            cap_cents / 100,
            (cap_cents - total).max(0) as f64 / 100.0
        ))));
    }
    put_day(store, day, total + cents)?;
    Ok(Ok(()))
}

/// Gives back a reservation whose credit did not credit (refused, or a duplicate).
pub fn release_credit(store: &dyn Downlink, day: i64, cents: i64) -> Result<(), HostError> {
    let total = credited_on(store, day)?;
    put_day(store, day, (total - cents).max(0))
}

/// Cloud credits counted on `day` (days since the Unix epoch, UTC).
pub fn credited_on(store: &dyn Downlink, day: i64) -> Result<i64, HostError> {
    let v = load_map(store, CREDIT_DAY)?;
    Ok(
        match (
            v.get("day").and_then(Value::as_i64),
            v.get("cents").and_then(Value::as_i64),
        ) {
            (Some(d), Some(c)) if d == day => c,
            _ => 0,
        },
    )
}

fn put_day(store: &dyn Downlink, day: i64, cents: i64) -> Result<(), HostError> {
    store.kv_put(
        CREDIT_DAY,
        Some(&json!({"day": day, "cents": cents}).to_string()),
    )
}
