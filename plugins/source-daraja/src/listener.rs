//! The plugin's HTTP listener (axum on the plugin's own tokio runtime): Daraja's callbacks and
//! the site's STK push endpoint, all under `/daraja/{TOKEN}/…`.
//!
//! Daraja signs nothing, so every request passes, in order: the secret path token (a wrong one
//! gets a bare 404, as if nothing were here), the method, the source-IP allow-list (callbacks
//! only), the content type, the body size limit and strict parsing. A rejected request is
//! logged at `warn` with the peer and the reason, counted, and credits nothing.
//!
//! Architecture invariant: the host is only called from blocking threads (`spawn_blocking`),
//! never on an async worker, and an answer that depends on a credit is sent after the host
//! returned, that is after the gateway committed it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};
use umeme_http_guard::{Events, Refusal, Throttle, Timeout};
use umeme_plugin_sdk::untrusted::Untrusted;
use umeme_plugin_sdk::{HostError, Payment, Unapplied};

use crate::client::ApiError;
use crate::stk::{self, Push, State as PushState};
use crate::unapplied;
use crate::wire::{self, C2bNotice, StkCallback};
use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(route).with_state(shared)
}

/// What the shared HTTP guard reports: counted in `health`, logged at most every 10 s.
pub struct GuardEvents {
    shared: Arc<Shared>,
    log: Throttle,
}

impl GuardEvents {
    pub fn new(shared: Arc<Shared>) -> Self {
        GuardEvents {
            shared,
            log: Throttle::new(std::time::Duration::from_secs(10)),
        }
    }
}

impl Events for GuardEvents {
    fn refused(&self, peer: SocketAddr, why: Refusal) {
        let stats = &self.shared.stats;
        stats.refused_connections.fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.log.allow() {
            log::warn!(
                "connection from {peer} closed at once: {} ({held_back} similar lines held back)",
                why.as_str()
            );
        }
    }

    fn timed_out(&self, peer: SocketAddr, what: Timeout) {
        if what == Timeout::Idle {
            return; // a client keeping its connection open: closing it is routine
        }
        self.shared
            .stats
            .http_timeouts
            .fetch_add(1, Ordering::Relaxed);
        if let Some(held_back) = self.log.allow() {
            log::warn!(
                "connection from {peer} too slow: {} timeout ({held_back} similar lines held back)",
                what.as_str()
            );
        }
    }

    fn accept_failed(&self, error: &std::io::Error, retry_in: std::time::Duration) {
        if let Some(held_back) = self.log.allow() {
            log::warn!("accept failed: {error}; retrying in {retry_in:?} ({held_back} similar lines held back)");
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Validation,
    Confirmation,
    StkCallback,
    StkPush,
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn error(status: StatusCode, why: &str) -> Response {
    reply(status, json!({ "error": why }))
}

fn success() -> Response {
    reply(
        StatusCode::OK,
        json!({"ResultCode": 0, "ResultDesc": "Success"}),
    )
}

fn validation_answer(code: &str) -> Response {
    let desc = if code == "0" { "Accepted" } else { "Rejected" };
    reply(
        StatusCode::OK,
        json!({"ResultCode": code, "ResultDesc": desc}),
    )
}

/// A validation refusal that says why (the payer's amount is below the minimum top-up).
fn validation_refusal(code: &str, why: &str) -> Response {
    reply(
        StatusCode::OK,
        json!({"ResultCode": code, "ResultDesc": format!("Rejected: {why}")}),
    )
}

/// What validation learned from the gateway.
enum Check {
    Accepted(String),
    UnknownAccount,
    /// The gateway refuses this amount for this meter (its tariff's minimum top-up).
    Amount(String),
}

/// The account resolved to a meter, then the amount checked against its tariff (a gateway
/// older than ABI minor 2 cannot: the amount is then accepted, and a smaller payment that
/// arrives is kept as unapplied by the ledger).
fn check_payment(shared: &Shared, account: &str, amount_cents: i64) -> Result<Check, HostError> {
    let Some(meter) = resolve_meter(shared, account)? else {
        return Ok(Check::UnknownAccount);
    };
    match shared.host.validate_payment(&meter, amount_cents) {
        Ok(()) | Err(HostError::Unsupported) => Ok(Check::Accepted(meter)),
        Err(HostError::Rejected(why)) => match why.strip_prefix("below_minimum_topup: ") {
            Some(sentence) => Ok(Check::Amount(sentence.to_string())),
            None => Ok(Check::UnknownAccount),
        },
        Err(e) => Err(e),
    }
}

/// Logs and counts a refused request.
fn refuse(
    shared: &Shared,
    peer: SocketAddr,
    what: &str,
    status: StatusCode,
    why: &str,
) -> Response {
    shared
        .stats
        .rejected_requests
        .fetch_add(1, Ordering::Relaxed);
    // `why` may quote the caller's fields.
    log::warn!("refused {what} from {peer}: {}", Untrusted(why));
    if status == StatusCode::NOT_FOUND {
        return status.into_response();
    }
    error(status, why)
}

async fn route(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    let mut parts = path.strip_prefix("/daraja/").unwrap_or("").splitn(2, '/');
    let token = parts.next().unwrap_or("");
    let rest = parts.next().unwrap_or("");
    let token_ok = wire::ct_eq(
        token.as_bytes(),
        shared.settings.secrets.callback_token.as_bytes(),
    );
    let endpoint = match rest {
        "c2b/validation" => Some(Endpoint::Validation),
        "c2b/confirmation" => Some(Endpoint::Confirmation),
        "stk/callback" => Some(Endpoint::StkCallback),
        "stkpush" => Some(Endpoint::StkPush),
        _ => None,
    };
    let (true, Some(endpoint)) = (token_ok, endpoint) else {
        // Never echo the path: it may hold a near-miss of the token.
        return refuse(
            &shared,
            peer,
            "a request",
            StatusCode::NOT_FOUND,
            "unknown path",
        );
    };
    let what = rest;
    if req.method() != Method::POST {
        return refuse(
            &shared,
            peer,
            what,
            StatusCode::METHOD_NOT_ALLOWED,
            "only POST",
        );
    }
    if endpoint == Endpoint::StkPush {
        if let Some(push_token) = &shared.settings.secrets.stkpush_token {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or("");
            if !wire::ct_eq(given.as_bytes(), push_token.as_bytes()) {
                return refuse(
                    &shared,
                    peer,
                    what,
                    StatusCode::UNAUTHORIZED,
                    "stkpush needs the stkpush token (Authorization: Bearer …)",
                );
            }
        }
    }
    let allowed = shared.settings.allowed_ips.as_ref();
    if endpoint != Endpoint::StkPush
        && allowed.is_some_and(|ips| !ips.contains(&peer.ip().to_canonical()))
    {
        return refuse(
            &shared,
            peer,
            what,
            StatusCode::FORBIDDEN,
            "source address not allowed",
        );
    }
    let json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return refuse(
            &shared,
            peer,
            what,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        );
    }
    let limit = shared.settings.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse(
            &shared,
            peer,
            what,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
        );
    }
    let bytes = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                &shared,
                peer,
                what,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or cut short",
            )
        }
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return refuse(
                &shared,
                peer,
                what,
                StatusCode::BAD_REQUEST,
                "the body is not a JSON object",
            )
        }
        Err(e) => {
            return refuse(
                &shared,
                peer,
                what,
                StatusCode::BAD_REQUEST,
                &format!("broken JSON: {e}"),
            )
        }
    };
    match endpoint {
        Endpoint::Validation => validation(shared, peer, body).await,
        Endpoint::Confirmation => confirmation(shared, peer, body).await,
        Endpoint::StkCallback => stk_callback(shared, peer, body).await,
        Endpoint::StkPush => stk_push(shared, peer, body).await,
    }
}

/// Runs host calls on a blocking thread; `None` if the closure panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// The meter a customer meant: the account as typed, or in capitals.
fn resolve_meter(shared: &Shared, account: &str) -> Result<Option<String>, HostError> {
    let upper = account.to_ascii_uppercase();
    for candidate in [account, upper.as_str()] {
        if shared.host.validate_account(candidate)? {
            return Ok(Some(candidate.to_string()));
        }
    }
    Ok(None)
}

/// A C2B notice for our shortcode, or why not (answered with 400 by the caller).
fn parse_c2b(shared: &Shared, body: &Value) -> Result<C2bNotice, String> {
    let notice = C2bNotice::parse(body)?;
    if notice.shortcode != shared.settings.shortcode {
        return Err(format!(
            "BusinessShortCode {} is not ours",
            notice.shortcode
        ));
    }
    Ok(notice)
}

async fn validation(shared: Arc<Shared>, peer: SocketAddr, body: Value) -> Response {
    let notice = match parse_c2b(&shared, &body) {
        Ok(n) => n,
        Err(why) => {
            return refuse(
                &shared,
                peer,
                "c2b/validation",
                StatusCode::BAD_REQUEST,
                &why,
            )
        }
    };
    if notice.bill_ref.is_empty() {
        // A till has no account number: the payment is kept as unapplied at confirmation
        // and applied by the operator. A PayBill payment without one is a typing slip.
        let code = if notice.is_buy_goods() {
            "0"
        } else {
            "C2B00012"
        };
        log::info!(
            "C2B validation {}: no account number ({}): {}",
            notice.trans_id,
            Untrusted(&notice.transaction_type),
            if code == "0" {
                "accepted, to be applied by the operator"
            } else {
                "rejected"
            }
        );
        return validation_answer(code);
    }
    let s = shared.clone();
    let (account, amount) = (notice.bill_ref.clone(), notice.amount_cents);
    let check = blocking(move || check_payment(&s, &account, amount));
    // Answer within Daraja's limit even when the gateway is slow.
    match tokio::time::timeout(shared.settings.validation_timeout, check).await {
        Ok(Some(Ok(Check::Accepted(meter)))) => {
            log::info!(
                "C2B validation {}: meter {meter}, {} cents: accepted",
                notice.trans_id,
                notice.amount_cents
            );
            validation_answer("0")
        }
        Ok(Some(Ok(Check::UnknownAccount))) => {
            log::info!(
                "C2B validation {}: unknown account \"{}\": rejected",
                notice.trans_id,
                Untrusted(&notice.bill_ref)
            );
            validation_answer("C2B00012")
        }
        Ok(Some(Ok(Check::Amount(why)))) => {
            // C2B00013 is Daraja's "invalid amount".
            log::info!(
                "C2B validation {}: {} cents: rejected, {}",
                notice.trans_id,
                notice.amount_cents,
                Untrusted(&why)
            );
            validation_refusal("C2B00013", &why)
        }
        Ok(Some(Err(e))) => {
            log::error!(
                "C2B validation {}: cannot check the account: {e}; rejected",
                notice.trans_id
            );
            validation_answer("C2B00016")
        }
        Ok(None) | Err(_) => {
            log::error!(
                "C2B validation {}: no answer from the gateway in time; rejected",
                notice.trans_id
            );
            validation_answer("C2B00016")
        }
    }
}

/// How a confirmation ended at the gateway.
enum Confirmed {
    Credited,
    /// Refused for good (unknown account, bad amount): the money moved, nothing credited.
    Unapplied(String),
    /// Not now; nothing credited.
    Busy(HostError),
}

fn confirm(shared: &Shared, notice: &C2bNotice, body: Value) -> Confirmed {
    let id = &notice.trans_id;
    if notice.bill_ref.is_empty() {
        return Confirmed::Unapplied("no account number (a till payment?)".into());
    }
    let meter = match resolve_meter(shared, &notice.bill_ref) {
        Ok(Some(m)) => m,
        Ok(None) => return Confirmed::Unapplied("unknown account".into()),
        Err(e) => return Confirmed::Busy(e),
    };
    // Keyed by TransID (= the M-Pesa receipt), so the same payment seen again, or seen by
    // its STK callback, credits once.
    let payment = Payment {
        meter: meter.clone(),
        amount_cents: notice.amount_cents,
        reference: id.clone(),
        phone: notice.msisdn.clone(),
        raw: Some(body),
    };
    match shared.host.submit_payment(&payment) {
        Ok(r) => {
            let counter = if r.duplicate {
                &shared.stats.duplicates
            } else {
                &shared.stats.credited
            };
            counter.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "C2B {id} credited: meter {meter}, {} cents, +{} Wh, balance {} Wh (duplicate: {})",
                notice.amount_cents,
                r.credit_wh,
                r.balance_wh,
                r.duplicate
            );
            Confirmed::Credited
        }
        Err(HostError::Rejected(why)) => Confirmed::Unapplied(why),
        Err(e) => Confirmed::Busy(e),
    }
}

async fn confirmation(shared: Arc<Shared>, peer: SocketAddr, body: Value) -> Response {
    let notice = match parse_c2b(&shared, &body) {
        Ok(n) => n,
        Err(why) => {
            return refuse(
                &shared,
                peer,
                "c2b/confirmation",
                StatusCode::BAD_REQUEST,
                &why,
            )
        }
    };
    let id = notice.trans_id.clone();
    let (notice_amount, account, msisdn) = (
        notice.amount_cents,
        notice.bill_ref.clone(),
        notice.msisdn.clone(),
    );
    let (s, raw) = (shared.clone(), body.clone());
    match blocking(move || confirm(&s, &notice, raw)).await {
        Some(Confirmed::Credited) => success(),
        Some(Confirmed::Unapplied(why)) => {
            // Daraja cannot undo the payment: keep it for the operator, and acknowledge.
            let u = Unapplied {
                reference: id.clone(),
                amount_cents: notice_amount,
                account: account.clone(),
                phone: msisdn,
                reason: why.clone(),
                raw: Some(body),
            };
            let s = shared.clone();
            let key = format!("c2b-unapplied/{id}");
            match blocking(move || unapplied::keep(&s, &u, &key)).await {
                Some(Ok(())) => {
                    shared.stats.unapplied.fetch_add(1, Ordering::Relaxed);
                    log::error!(
                        "C2B {id} was paid ({notice_amount} cents, account \"{}\") but not credited ({}); kept as unapplied: `umeme-gateway payment apply {id} METER` credits it",
                        Untrusted(&account),
                        Untrusted(&why)
                    );
                    success()
                }
                Some(Err(e)) => {
                    shared.stats.not_kept.fetch_add(1, Ordering::Relaxed);
                    log::error!(
                        "C2B {id} ({notice_amount} cents, account \"{}\") was not credited ({}) and could not be kept: {e}; reconcile from the M-Pesa statement",
                        Untrusted(&account),
                        Untrusted(&why)
                    );
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cannot record the payment now",
                    )
                }
                None => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            }
        }
        Some(Confirmed::Busy(e)) => {
            log::warn!("C2B {id} not credited yet: {e}; Daraja's retry will");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is busy; try again",
            )
        }
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn stk_callback(shared: Arc<Shared>, peer: SocketAddr, body: Value) -> Response {
    let cb = match StkCallback::parse(&body) {
        Ok(cb) => cb,
        Err(why) => return refuse(&shared, peer, "stk/callback", StatusCode::BAD_REQUEST, &why),
    };
    let s = shared.clone();
    match blocking(move || stk::apply_callback(&s, cb, body)).await {
        Some(Ok(())) => success(),
        Some(Err(stk::Busy(e))) => {
            log::warn!("STK callback not applied yet: {e}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is busy; try again",
            )
        }
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn stk_push(shared: Arc<Shared>, peer: SocketAddr, body: Value) -> Response {
    let what = "stkpush";
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::trim);
    let (Some(phone), Some(meter), Some(amount)) =
        (text("phone"), text("meter_no"), body.get("amount"))
    else {
        return refuse(
            &shared,
            peer,
            what,
            StatusCode::BAD_REQUEST,
            "expected {\"phone\", \"amount\", \"meter_no\"}",
        );
    };
    let phone = match wire::normalise_phone(phone) {
        Ok(p) => p,
        Err(why) => return refuse(&shared, peer, what, StatusCode::BAD_REQUEST, &why),
    };
    let cents = match wire::amount_cents(amount) {
        Ok(c) if c % 100 == 0 && c <= 25_000_000 => c,
        Ok(_) => {
            return refuse(
                &shared,
                peer,
                what,
                StatusCode::BAD_REQUEST,
                "amount must be whole shillings, at most 250000",
            )
        }
        Err(why) => return refuse(&shared, peer, what, StatusCode::BAD_REQUEST, &why),
    };
    if meter.chars().count() > wire::ACCOUNT_REFERENCE_MAX {
        // Never cut it: Safaricom's confirmation would then carry the cut number, which may
        // be another meter's.
        let why = format!(
            "meter number {meter} is longer than {} characters, M-Pesa's AccountReference limit: STK push cannot pay it (use a shorter meter number)",
            wire::ACCOUNT_REFERENCE_MAX
        );
        return refuse(&shared, peer, what, StatusCode::BAD_REQUEST, &why);
    }
    if shared.settings.secrets.passkey.is_none() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "STK push is not configured (no passkey_file)",
        );
    }
    let (s, meter) = (shared.clone(), meter.to_string());
    let started = blocking(move || -> Result<Value, (StatusCode, Value)> {
        let busy = |e: &dyn std::fmt::Display| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": e.to_string()}),
            )
        };
        let meter = match resolve_meter(&s, &meter) {
            Ok(Some(m)) => m,
            Ok(None) => {
                let why = format!("unknown meter {meter}");
                return Err((StatusCode::NOT_FOUND, json!({ "error": why })));
            }
            Err(e) => return Err(busy(&e)),
        };
        if stk::pending(&s).map_err(|e| busy(&e.0))?.len() >= s.settings.max_pending {
            return Err(busy(&"too many pushes waiting for their outcome"));
        }
        let answer = s
            .daraja
            .stk_push(&s.settings, &phone, cents / 100, &meter)
            .map_err(|e| {
                log::warn!("STK push to {phone} for meter {meter} refused: {e}");
                let daraja = match &e {
                    ApiError::Refused { body, .. } => body.clone(),
                    ApiError::Unreachable(_) => Value::Null,
                };
                let body = json!({"error": e.to_string(), "daraja": daraja});
                (StatusCode::BAD_GATEWAY, body)
            })?;
        let id = wire::checkout_id(answer.get("CheckoutRequestID")).unwrap_or_default();
        let push = Push {
            meter: meter.clone(),
            amount_cents: cents,
            phone: phone.clone(),
            created_ms: wire::now_ms(),
            state: PushState::Pending,
            reference: None,
            receipt: None,
            result_code: None,
            result_desc: None,
            queries: 0,
        };
        stk::record(&s, &id, &push).map_err(|e| {
            log::error!("STK push {id} started but not recorded: {}", e.0);
            busy(&format!(
                "the push {id} started but could not be recorded: {}",
                e.0
            ))
        })?;
        s.stats.stk_started.fetch_add(1, Ordering::Relaxed);
        log::info!("STK push {id} started: meter {meter}, {cents} cents, phone {phone}");
        Ok(answer)
    })
    .await;
    match started {
        Some(Ok(answer)) => reply(StatusCode::OK, answer),
        Some(Err((status, body))) => reply(status, body),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}
