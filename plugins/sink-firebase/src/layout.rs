//! The tree the original Umeme dashboard reads, and how each gateway event lands in it.
//!
//! Every write is a path → value pair of one multi-path PATCH at the root. Records are keyed by
//! the event id, and the per-meter fields are plain values set in event order, so writing a
//! batch twice leaves the same tree as writing it once.
//!
//! | event | writes |
//! |---|---|
//! | consumption | `unit_consumption/{id}`, `meters/{m}/{balance,total_consumed,last_seen,last_update,online}`, `users/{uid}/balance` |
//! | payment | `transactions/{id}`, `meters/{m}/balance`, `users/{uid}/{balance,latest_transaction_id,last_payment_*,last_units_purchased}` |
//! | status | `meters/{m}/{status,online,relay,last_seen}` |
//! | balance (the meter's own view) | `meters/{m}/{last_seen,online}` |
//! | alert | `meters/{m}/last_alert` (with the episode's `state`, `raised`/`resolved`, when it has one); a site alert (no meter) writes nothing |
//! | meter | nothing (linking meters to users stays the landlord's) |

use serde_json::{json, Map, Value};
use umeme_plugin_sdk::{iso8601_utc, Event};

/// What one event writes: paths relative to the database root.
pub type Writes = Vec<(String, Value)>;

/// The dashboard user a meter belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The key under `users/`.
    pub uid: String,
    /// `users/{uid}/phone_number`, when the lookup read it (the query by `meter_no` does).
    pub phone: Option<String>,
}

/// Whether `phone` is plausible as a phone number (digits, an optional leading `+`), so that
/// nothing else from the payment source or the dashboard lands in a transaction record.
pub fn usable_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or(phone);
    (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `reference` has the shape of an M-Pesa receipt (`QGH1ABC2DE`: ten capital letters
/// and digits). Only those become `mpesa_receipt`, the field the original backend's duplicate
/// check queries; a manual or simulated reference is not an M-Pesa receipt.
pub fn is_mpesa_receipt(reference: &str) -> bool {
    reference.len() == 10
        && reference
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        && reference.bytes().any(|b| b.is_ascii_uppercase())
}

/// Whether `key` may be a Realtime Database key (research/apis.md §2.1).
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 768 {
        return Err(format!(
            "{key:?} is not a usable database key (empty or over 768 bytes)"
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| matches!(c, '.' | '$' | '#' | '[' | ']' | '/') || c.is_ascii_control())
    {
        return Err(format!(
            "{key:?} is not a usable database key ({c:?} is not allowed)"
        ));
    }
    Ok(())
}

/// The meter an event is about, when its kind writes under `meters/` and it is usable as a key.
pub fn meter_of(e: &Event) -> Result<Option<&str>, String> {
    // A site-wide alert (site loss) has no meter, and the dashboard's tree no place for it.
    if e.kind == "meter" || (e.kind == "alert" && e.meter.is_none()) {
        return Ok(None);
    }
    match e.meter.as_deref() {
        Some(m) => check_key(m).map(|()| Some(m)),
        None if matches!(
            e.kind.as_str(),
            "consumption" | "payment" | "status" | "balance" | "alert"
        ) =>
        {
            Err(format!("a {} event needs a meter", e.kind))
        }
        None => Ok(None),
    }
}

/// The money ledger's fields (issue 16), added beside the original dashboard's, which stay as
/// they are: the balance and debt in KES, the itemised price of a report, the tariff and the
/// debt a payment recovered.
fn money_fields(data: &Map<String, Value>, record: &mut Map<String, Value>) {
    for (from, to) in [
        ("balanceKes", "balance_kes"),
        ("debtKes", "debt_kes"),
        ("priced", "priced"),
        ("tariff", "tariff"),
        ("debtRecoveredCents", "debt_recovered_cents"),
    ] {
        if let Some(v) = data.get(from) {
            record.insert(to.into(), v.clone());
        }
    }
}

/// Whether this event updates the `users/{uid}` mirror (so its meter's `user_id` is needed).
pub fn needs_user(e: &Event) -> bool {
    matches!(e.kind.as_str(), "consumption" | "payment")
}

/// The writes for one event; `user` is the meter's dashboard user when one is found.
pub fn writes_for(e: &Event, user: Option<&User>) -> Result<Writes, String> {
    let phone = user.and_then(|u| u.phone.as_deref());
    let user = user.map(|u| u.uid.as_str());
    check_key(&e.id)?;
    let Some(meter) = meter_of(e)? else {
        return Ok(Vec::new());
    };
    let data = e
        .data
        .as_object()
        .ok_or_else(|| format!("the {} event's data is not an object", e.kind))?;
    let m = |field: &str| format!("meters/{meter}/{field}");
    let u = |field: &str| user.map(|uid| format!("users/{uid}/{field}"));
    let mut w: Writes = Vec::new();
    match e.kind.as_str() {
        "consumption" => {
            let balance = units(data, "balance", "balanceWh")?;
            let total = wh_as_units(data, "totalConsumedWh")?;
            let mut record = Map::new();
            record.insert("meter_no".into(), json!(meter));
            if let Some(uid) = user {
                record.insert("user_id".into(), json!(uid));
            }
            record.insert(
                "units_consumed".into(),
                units(data, "unitsDebited", "debitWh")?,
            );
            record.insert("units_after".into(), balance.clone());
            record.insert("total_consumed".into(), total.clone());
            record.insert("timestamp".into(), json!(e.at));
            record.insert("date".into(), json!(iso8601_utc(e.at)));
            record.insert("source".into(), json!("gateway"));
            record.insert("gateway".into(), json!(e.gateway));
            record.insert("seq".into(), json!(e.seq));
            money_fields(data, &mut record);
            w.push((format!("unit_consumption/{}", e.id), Value::Object(record)));
            w.push((m("balance"), balance.clone()));
            w.push((m("total_consumed"), total));
            w.push((m("last_seen"), json!(e.at)));
            w.push((m("last_update"), json!(e.at)));
            w.push((m("online"), json!(true)));
            if let Some(p) = u("balance") {
                w.push((p, balance));
            }
        }
        "payment" => {
            let balance = units(data, "balance", "balanceWh")?;
            let bought = units(data, "units", "creditWh")?;
            let amount = match data.get("amount") {
                Some(a) if a.is_number() => a.clone(),
                _ => cents_as_kes(data)?,
            };
            let mut record = Map::new();
            record.insert("transaction_id".into(), json!(e.id));
            record.insert("meter_no".into(), json!(meter));
            if let Some(uid) = user {
                record.insert("user_id".into(), json!(uid));
            }
            record.insert("amount".into(), amount.clone());
            record.insert("units".into(), bought.clone());
            record.insert("balance_after".into(), balance.clone());
            record.insert("status".into(), json!("SUCCESS"));
            record.insert("timestamp".into(), json!(iso8601_utc(e.at)));
            for (from, to) in [("reference", "reference"), ("source", "source")] {
                if let Some(v) = data.get(from).filter(|v| v.is_string()) {
                    record.insert(to.into(), v.clone());
                }
            }
            // The original backend's fields: its duplicate check queries `mpesa_receipt`, and
            // its transaction list shows `phone_number` (the payer's when the payment carried
            // one, else the number the tenant registered with).
            if let Some(r) = data
                .get("reference")
                .and_then(Value::as_str)
                .filter(|r| is_mpesa_receipt(r))
            {
                record.insert("mpesa_receipt".into(), json!(r));
            }
            let payer = data
                .get("phone")
                .and_then(Value::as_str)
                .filter(|p| usable_phone(p));
            if let Some(p) = payer.or(phone) {
                record.insert("phone_number".into(), json!(p));
            }
            record.insert("gateway".into(), json!(e.gateway));
            record.insert("seq".into(), json!(e.seq));
            money_fields(data, &mut record);
            w.push((format!("transactions/{}", e.id), Value::Object(record)));
            w.push((m("balance"), balance.clone()));
            if user.is_some() {
                w.extend(u("balance").map(|p| (p, balance)));
                w.extend(u("latest_transaction_id").map(|p| (p, json!(e.id))));
                w.extend(u("last_payment_timestamp").map(|p| (p, json!(iso8601_utc(e.at)))));
                w.extend(u("last_payment_amount").map(|p| (p, amount)));
                w.extend(u("last_units_purchased").map(|p| (p, bought)));
            }
        }
        "status" => {
            let status = data
                .get("status")
                .and_then(Value::as_str)
                .ok_or("the status event has no status")?;
            let message = data.get("message").cloned().unwrap_or(Value::Null);
            let mut s = Map::new();
            s.insert("status".into(), json!(status));
            if !message.is_null() {
                s.insert("message".into(), message);
            }
            s.insert("last_seen".into(), json!(e.at));
            w.push((m("status"), Value::Object(s)));
            // Only `offline` (the Last Will, or the gateway seeing the connection end) means
            // the meter is gone. The firmware publishes `disconnected` over its live connection
            // when its credit runs out: that is the relay, kept apart in `relay`.
            w.push((m("online"), json!(status != "offline")));
            if let Some(relay) = relay_of(status, data) {
                w.push((m("relay"), json!(relay)));
            }
            w.push((m("last_seen"), json!(e.at)));
        }
        "balance" => {
            w.push((m("last_seen"), json!(e.at)));
            w.push((m("online"), json!(true)));
        }
        "alert" => {
            let mut a = Map::new();
            // `state` tells a resolved episode from a new alert (issue 17's alert events).
            for k in ["alert", "state", "balance", "relay"] {
                if let Some(v) = data.get(k) {
                    a.insert(k.into(), v.clone());
                }
            }
            a.insert("timestamp".into(), json!(e.at));
            a.insert("event_id".into(), json!(e.id));
            w.push((m("last_alert"), Value::Object(a)));
        }
        // A kind this version does not know: acknowledged, nothing written.
        _ => {}
    }
    Ok(w)
}

/// The relay state a status event tells: the firmware's own `loadOn` when its report has it,
/// else what the status means (`disconnected`: credit exhausted, load off). A status the
/// gateway made from the connection itself says nothing about the relay.
fn relay_of(status: &str, data: &Map<String, Value>) -> Option<&'static str> {
    let on_off = |on: bool| if on { "on" } else { "off" };
    if let Some(on) = data
        .get("report")
        .and_then(|r| r.get("loadOn"))
        .and_then(Value::as_bool)
    {
        return Some(on_off(on));
    }
    if data.get("source").and_then(Value::as_str) == Some("connection") {
        return None;
    }
    match status {
        "disconnected" => Some("off"),
        "online" | "low_balance" => Some("on"),
        _ => None,
    }
}

/// Units (kWh) from the event's float field, or from its Wh field.
fn units(data: &Map<String, Value>, field: &str, wh_field: &str) -> Result<Value, String> {
    match data.get(field) {
        Some(v) if v.is_number() => Ok(v.clone()),
        _ => wh_as_units(data, wh_field),
    }
}

fn wh_as_units(data: &Map<String, Value>, field: &str) -> Result<Value, String> {
    let wh = data
        .get(field)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("the event has no integer {field}"))?;
    Ok(json!(wh as f64 / 1000.0))
}

fn cents_as_kes(data: &Map<String, Value>) -> Result<Value, String> {
    let cents = data
        .get("amountCents")
        .and_then(Value::as_i64)
        .ok_or("the payment has no amount")?;
    Ok(json!(cents as f64 / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_ledger_fields_are_added_beside_the_original_ones() {
        let e = Event {
            id: "site-000000000007".into(),
            seq: 7,
            gateway: "site".into(),
            kind: "consumption".into(),
            meter: Some("METER001".into()),
            at: 1_772_470_000_000,
            data: json!({"v": 2, "debitWh": 25000, "unitsDebited": 25.0, "balanceWh": 81,
                "balance": 0.081, "totalConsumedWh": 25000, "balanceKes": "1.63",
                "debtKes": "0.00", "priced": {"tariff": "domestic", "totalKes": "498.375"}}),
        };
        let w = writes_for(&e, None).unwrap();
        let record = &w
            .iter()
            .find(|(p, _)| p.starts_with("unit_consumption/"))
            .unwrap()
            .1;
        assert_eq!(record["balance_kes"], "1.63");
        assert_eq!(record["priced"]["totalKes"], "498.375");
        assert_eq!(
            record["units_after"], 0.081,
            "the dashboard's field is unchanged"
        );
        let mut plain = e.clone();
        plain.data = json!({"v": 2, "debitWh": 3, "unitsDebited": 0.003, "balanceWh": 81,
            "balance": 0.081, "totalConsumedWh": 3});
        let w = writes_for(&plain, None).unwrap();
        let record = &w[0].1;
        assert!(record.get("balance_kes").is_none() && record.get("priced").is_none());
    }

    #[test]
    fn keys_with_firebase_forbidden_characters_are_refused() {
        for bad in ["", "a.b", "a/b", "a$", "a#", "a[", "a]", "a\u{7f}", "a\nb"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key("site-001-000000000042").unwrap();
    }

    #[test]
    fn only_receipt_shaped_references_count_as_mpesa_receipts() {
        assert!(is_mpesa_receipt("QGH1ABC2DE"));
        for not in [
            "SIM-1764230400123-ab",
            "cash-001",
            "QGH1ABC",
            "qgh1abc2de",
            "1234567890",
        ] {
            assert!(!is_mpesa_receipt(not), "{not}");
        }
    }

    fn alert(meter: Option<&str>, data: Value) -> Event {
        Event {
            id: "site-000000000007".into(),
            seq: 7,
            gateway: "site".into(),
            kind: "alert".into(),
            meter: meter.map(str::to_string),
            at: 1_000,
            data,
        }
    }

    #[test]
    fn an_alert_episode_keeps_its_state_and_a_site_alert_writes_nothing() {
        let e = alert(
            Some("M1"),
            json!({"alert": "spike", "state": "resolved", "wh": 900}),
        );
        let w = writes_for(&e, None).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "meters/M1/last_alert");
        assert_eq!(w[0].1["alert"], "spike");
        assert_eq!(w[0].1["state"], "resolved");
        let old = alert(
            Some("M1"),
            json!({"alert": "low_balance", "balance": 2.5, "relay": "on"}),
        );
        let w = writes_for(&old, None).unwrap();
        assert_eq!(w[0].1["balance"], 2.5);
        assert!(w[0].1.get("state").is_none());
        let site = alert(None, json!({"alert": "site_loss", "state": "raised"}));
        assert_eq!(writes_for(&site, None).unwrap(), Vec::new());
    }

    #[test]
    fn only_digit_phone_numbers_are_copied_into_records() {
        assert!(usable_phone("254712345678"));
        assert!(usable_phone("+254712345678"));
        for not in ["", "0712", "2547-1234", "<script>", "254712345678901234"] {
            assert!(!usable_phone(not), "{not}");
        }
    }
}
