//! STK pushes and how they end. Every push started is kept in the plugin's durable key-value
//! store (`stk/{CheckoutRequestID}` → [`Push`], plus the `stk-pending` index), so the meter
//! of a callback is known after a restart and a push whose callback never came is settled
//! with the status query by the poller.
//!
//! Crediting is write-ahead: the reference a push credits with (the M-Pesa receipt from the
//! callback, or the CheckoutRequestID when only the query knows the outcome) is stored before
//! the credit is submitted, and every retry reuses it, so a crash between the two cannot
//! credit one push under two references. All state changes hold [`Shared::settle`].

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use serde_json::Value;
use umeme_plugin_sdk::untrusted::Untrusted;
use umeme_plugin_sdk::{HostError, Payment, Unapplied};

use crate::client::QueryAnswer;
use crate::unapplied::{self, NotKept};
use crate::wire::{self, StkCallback, StkOutcome};
use crate::Shared;

const PENDING_KEY: &str = "stk-pending";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for the customer.
    Pending,
    /// Paid; the credit with `reference` is being (or must be) submitted.
    Crediting,
    Credited,
    /// The customer did not pay (cancelled, timeout, wrong PIN, …); nothing credited.
    Failed,
    /// The gateway refused the credit for good (e.g. the meter was removed); reconcile by hand.
    Unapplied,
    /// No outcome after the configured queries; reconcile by hand.
    Expired,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Push {
    pub meter: String,
    pub amount_cents: i64,
    pub phone: String,
    pub created_ms: i64,
    pub state: State,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub receipt: Option<String>,
    #[serde(default)]
    pub result_code: Option<i64>,
    #[serde(default)]
    pub result_desc: Option<String>,
    #[serde(default)]
    pub queries: u32,
}

/// The gateway could not take the credit now; the caller answers "try again".
#[derive(Debug)]
pub struct Busy(pub String);

fn key(id: &str) -> String {
    format!("stk/{id}")
}

fn host_err(e: HostError) -> Busy {
    Busy(e.to_string())
}

pub fn load(shared: &Shared, id: &str) -> Result<Option<Push>, Busy> {
    match shared.host.kv_get(&key(id)).map_err(host_err)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Busy(format!("stored push {id} is unreadable: {e}"))),
    }
}

fn save(shared: &Shared, id: &str, push: &Push) -> Result<(), Busy> {
    let text = serde_json::to_string(push).map_err(|e| Busy(e.to_string()))?;
    shared.host.kv_put(&key(id), &text).map_err(host_err)
}

pub fn pending(shared: &Shared) -> Result<Vec<String>, Busy> {
    match shared.host.kv_get(PENDING_KEY).map_err(host_err)? {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| Busy(format!("{PENDING_KEY}: {e}"))),
    }
}

fn set_pending(shared: &Shared, ids: &[String]) -> Result<(), Busy> {
    if ids.is_empty() {
        shared.host.kv_delete(PENDING_KEY).map_err(host_err)
    } else {
        let text = serde_json::to_string(ids).map_err(|e| Busy(e.to_string()))?;
        shared.host.kv_put(PENDING_KEY, &text).map_err(host_err)
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, ()> {
    shared.settle.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a push Daraja accepted, before the site is told it started.
pub fn record(shared: &Shared, id: &str, push: &Push) -> Result<(), Busy> {
    let _guard = lock(shared);
    save(shared, id, push)?;
    let mut ids = pending(shared)?;
    if !ids.iter().any(|p| p == id) {
        ids.push(id.to_string());
    }
    set_pending(shared, &ids)
}

/// Ends a push in `state` (already stored) and drops it from the pending index.
fn finish(shared: &Shared, id: &str, push: &Push) -> Result<(), Busy> {
    save(shared, id, push)?;
    let mut ids = pending(shared)?;
    ids.retain(|p| p != id);
    set_pending(shared, &ids)
}

/// Submits the credit of a push in `Crediting` with its stored reference.
fn credit(shared: &Shared, id: &str, mut push: Push, raw: Option<Value>) -> Result<(), Busy> {
    let reference = push.reference.clone().unwrap_or_else(|| id.to_string());
    let payment = Payment {
        meter: push.meter.clone(),
        amount_cents: push.amount_cents,
        reference: reference.clone(),
        phone: Some(push.phone.clone()),
        raw,
    };
    match shared.host.submit_payment(&payment) {
        Ok(r) => {
            if r.duplicate {
                shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.stats.credited.fetch_add(1, Ordering::Relaxed);
            }
            log::info!(
                "STK push {id} credited: meter {} reference {reference} {} cents, +{} Wh (duplicate: {})",
                push.meter,
                push.amount_cents,
                r.credit_wh,
                r.duplicate
            );
            push.state = State::Credited;
            finish(shared, id, &push)
        }
        Err(HostError::Rejected(why)) => {
            shared.stats.unapplied.fetch_add(1, Ordering::Relaxed);
            let u = Unapplied {
                reference: reference.clone(),
                amount_cents: push.amount_cents,
                account: push.meter.clone(),
                phone: Some(push.phone.clone()),
                reason: why.clone(),
                raw: None,
            };
            // The push record below keeps it in any case; the gateway's copy is the one the
            // operator sees and applies.
            let kept = match unapplied::keep(shared, &u, &format!("stk-unapplied/{id}")) {
                Ok(()) => format!(
                    "kept as unapplied: `umeme-gateway payment apply {reference} METER` credits it"
                ),
                Err(e) => format!("not kept by the gateway ({e}); reconcile by hand"),
            };
            log::error!(
                "STK push {id} was paid (reference {reference}, {} cents) but the gateway refused the credit for meter {}: {}; {kept}",
                push.amount_cents,
                push.meter,
                Untrusted(&why)
            );
            push.state = State::Unapplied;
            push.result_desc = Some(why);
            finish(shared, id, &push)
        }
        Err(e) => Err(host_err(e)),
    }
}

/// A callback for a push this plugin never started (or no longer knows). Unpaid: nothing
/// moved, nothing is kept. Paid: kept as unapplied under its receipt, for the operator.
fn orphan(shared: &Shared, id: &str, outcome: StkOutcome, raw: Value) -> Result<(), Busy> {
    let StkOutcome::Paid {
        receipt,
        amount_cents,
        phone,
    } = outcome
    else {
        log::warn!("STK callback for unknown CheckoutRequestID {id}, not paid: ignored");
        return Ok(());
    };
    let u = Unapplied {
        reference: receipt.clone(),
        amount_cents,
        account: String::new(),
        phone,
        reason: format!("STK callback for a push this gateway did not start ({id})"),
        raw: Some(raw),
    };
    match unapplied::keep(shared, &u, &format!("stk-orphan/{id}")) {
        Ok(()) => {
            shared.stats.unapplied.fetch_add(1, Ordering::Relaxed);
            log::error!("STK callback for unknown CheckoutRequestID {id}: paid {amount_cents} cents, receipt {receipt}; kept as unapplied, check it against the M-Pesa statement before `payment apply`");
            Ok(())
        }
        Err(e) => {
            shared.stats.not_kept.fetch_add(1, Ordering::Relaxed);
            log::error!("STK callback for unknown CheckoutRequestID {id} (receipt {receipt}, {amount_cents} cents) could not be kept: {e}");
            Err(Busy(match e {
                NotKept::Refused(why) | NotKept::Busy(why) => why,
            }))
        }
    }
}

/// Applies an STK callback. `Ok` when Daraja may be told "Success" (including for a push
/// already settled, and for one this plugin never started, which is logged).
pub fn apply_callback(shared: &Shared, cb: StkCallback, raw: Value) -> Result<(), Busy> {
    let _guard = lock(shared);
    let id = cb.checkout_id.clone();
    let Some(mut push) = load(shared, &id)? else {
        return orphan(shared, &id, cb.outcome, raw);
    };
    match (&push.state, cb.outcome) {
        (
            State::Pending,
            StkOutcome::Paid {
                receipt,
                amount_cents,
                ..
            },
        ) => {
            if amount_cents != push.amount_cents {
                log::warn!(
                    "STK push {id}: paid {amount_cents} cents, {} requested; crediting what was paid",
                    push.amount_cents
                );
            }
            push.state = State::Crediting;
            push.reference = Some(receipt.clone());
            push.receipt = Some(receipt);
            push.amount_cents = amount_cents;
            push.result_code = Some(0);
            save(shared, &id, &push)?;
            credit(shared, &id, push, Some(raw))
        }
        (State::Pending, StkOutcome::Failed { code, desc }) => {
            shared.stats.stk_failed.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "STK push {id} for meter {} ended without payment: {code} {}",
                push.meter,
                Untrusted(&desc)
            );
            push.state = State::Failed;
            push.result_code = Some(code);
            push.result_desc = Some(desc);
            finish(shared, &id, &push)
        }
        (State::Crediting, _) => credit(shared, &id, push, Some(raw)),
        (state, outcome) => {
            log::info!("STK callback for {id}, already {state:?}: nothing to do");
            if let (StkOutcome::Paid { receipt, .. }, None) = (outcome, &push.receipt) {
                push.receipt = Some(receipt);
                save(shared, &id, &push)?;
            }
            Ok(())
        }
    }
}

/// One pass over the pending pushes: retries unfinished credits, queries pushes whose
/// callback is overdue, gives up on those past their query budget.
pub fn poll_pending(shared: &Shared) {
    let ids = match pending(shared) {
        Ok(ids) => ids,
        Err(Busy(e)) => return log::warn!("cannot read pending STK pushes: {e}"),
    };
    let now = wire::now_ms();
    for id in ids {
        let push = match load(shared, &id) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(Busy(e)) => {
                log::warn!("STK push {id}: {e}");
                continue;
            }
        };
        let due = now - push.created_ms >= shared.settings.query_after.as_millis() as i64;
        if push.state == State::Pending && !due {
            continue;
        }
        // The query is network I/O: ask without the lock, then re-check under it.
        let answer = if push.state == State::Pending {
            match shared.daraja.stk_query(&shared.settings, &id) {
                Ok(a) => Some(a),
                Err(e) => {
                    log::warn!("STK status query for {id} failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        let _guard = lock(shared);
        let Ok(Some(mut push)) = load(shared, &id) else {
            continue;
        };
        let result = match (push.state, answer) {
            (State::Crediting, _) => credit(shared, &id, push, None),
            (State::Pending, Some(QueryAnswer::Settled { code: 0, desc })) => {
                log::info!("STK push {id} settled by the status query: paid ({}); crediting under the CheckoutRequestID", Untrusted(&desc));
                push.state = State::Crediting;
                push.reference = Some(id.clone());
                push.result_code = Some(0);
                push.result_desc = Some(desc);
                save(shared, &id, &push).and_then(|()| credit(shared, &id, push, None))
            }
            (State::Pending, Some(QueryAnswer::Settled { code, desc })) => {
                shared.stats.stk_failed.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "STK push {id} settled by the status query: not paid ({code} {})",
                    Untrusted(&desc)
                );
                push.state = State::Failed;
                push.result_code = Some(code);
                push.result_desc = Some(desc);
                finish(shared, &id, &push)
            }
            (State::Pending, _) => {
                push.queries += 1;
                if push.queries >= shared.settings.query_max_attempts {
                    log::error!(
                        "STK push {id} for meter {} has no outcome after {} queries; given up, reconcile by hand",
                        push.meter,
                        push.queries
                    );
                    push.state = State::Expired;
                    finish(shared, &id, &push)
                } else {
                    save(shared, &id, &push)
                }
            }
            _ => Ok(()),
        };
        if let Err(Busy(e)) = result {
            log::warn!("STK push {id}: {e}; will retry");
        }
    }
}

/// The poller thread's body: registers the C2B URLs when configured, then polls pending
/// pushes every `query_interval` until `stop` fires (or its sender is dropped).
pub fn run_poller(shared: &Shared, stop: Receiver<()>) {
    let mut register_left: u32 = if shared.settings.register_urls { 10 } else { 0 };
    loop {
        if register_left > 0 {
            register_left -= 1;
            match shared.daraja.register_urls(&shared.settings) {
                Ok(()) => {
                    register_left = 0;
                    shared.stats.registered.store(true, Ordering::Relaxed);
                    log::info!(
                        "C2B URLs registered for shortcode {}",
                        shared.settings.shortcode
                    );
                }
                Err(e) if register_left == 0 => {
                    log::error!("C2B URL registration failed, giving up: {e}")
                }
                Err(e) => log::warn!("C2B URL registration failed, will retry: {e}"),
            }
        }
        poll_pending(shared);
        match stop.recv_timeout(shared.settings.query_interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}
