//! The admin HTTP API (contract §7) and, on a listener of their own, the original firmware's
//! boot-time lookups.
//!
//! Bodies are parsed by hand from at most [`MAX_BODY`] bytes so that every refusal is a JSON
//! `{"error": …}` with a fitting status, a `warn` line and a counter. When `[api] token_file` is
//! set, every request needs the bearer token except `/health` and `/ready` (no data), and
//! `/metrics` while the admin API listens on loopback only.
//!
//! **Architecture invariant:** the legacy router ([`legacy_router`]) holds the two GETs the
//! original firmware makes and nothing else; it never serves an admin route.

// Helpers return a ready error `Response` as their `Err`, which is axum's idiom.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};
use umeme_http_guard::{Events, Refusal, Throttle, Timeout};

use crate::auth;
use crate::config::ApiConfig;
use crate::hub::Hub;
use crate::meter::{kes_to_cents, wh_to_units, MeterId};
use crate::metrics::Metrics;
use crate::store::{self, now_ms, Reader};
use crate::untrusted::Untrusted;
use crate::writer::{Credit, LedgerError, Op, Outcome, Writer};

const MAX_BODY: usize = 64 * 1024;

pub struct ApiState {
    pub config: ApiConfig,
    /// `(name, event kinds)` of the configured sinks.
    pub sinks: Vec<(String, Vec<String>)>,
    pub max_bytes: u64,
    pub gateway_id: String,
    pub token: Option<String>,
    pub writer: Writer,
    pub reader: Reader,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Set once the broker listens; `/ready` reports it.
    pub broker_ready: Arc<AtomicBool>,
    /// The site's tariffs, to name the lines of a statement.
    pub pricing: Arc<crate::config::Tariff>,
}

type St = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    let mut app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/meters", get(list_meters).post(add_meter))
        .route("/api/meters/{id}", get(show_meter))
        .route("/api/meters/{id}/payments", get(meter_payments))
        .route("/api/meters/{id}/emergency", post(meter_emergency))
        .route("/api/meters/{id}/statement", get(meter_statement))
        .route("/api/outbox", get(outbox))
        .route("/api/payments/unapplied", get(unapplied_payments))
        .route(
            "/api/payments/unapplied/{reference}/apply",
            post(apply_unapplied),
        );
    if state.config.allow_simulate {
        app = app.route("/daraja/simulate", post(simulate));
    }
    app.fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The `[api] legacy_listen` listener: the original firmware's two boot-time GETs, no token
/// (the firmware cannot send one), no body, nothing else.
pub fn legacy_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/users/{meter}/balance", get(legacy_balance))
        .route("/users/by-meter/{meter}", get(legacy_user))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(0))
        .with_state(state)
}

/// What an HTTP listener reports, as metrics and rate-limited `warn` lines.
pub struct HttpEvents {
    listener: &'static str,
    metrics: Arc<Metrics>,
    refusals: Throttle,
    timeouts: Throttle,
    accept_errors: Throttle,
}

impl HttpEvents {
    /// At most one log line of each kind per this interval and listener; the metrics count all.
    const LOG_EVERY: Duration = Duration::from_secs(10);

    pub fn new(listener: &'static str, metrics: Arc<Metrics>) -> Arc<HttpEvents> {
        Arc::new(HttpEvents {
            listener,
            metrics,
            refusals: Throttle::new(Self::LOG_EVERY),
            timeouts: Throttle::new(Self::LOG_EVERY),
            accept_errors: Throttle::new(Self::LOG_EVERY),
        })
    }
}

impl Events for HttpEvents {
    fn refused(&self, peer: SocketAddr, why: Refusal) {
        let listener = self.listener;
        self.metrics.inc(
            "umeme_http_connections_refused_total",
            &[("listener", listener), ("reason", why.as_str())],
        );
        if let Some(held_back) = self.refusals.allow() {
            warn!(listener, %peer, reason = why.as_str(), held_back, "HTTP connection closed at once: connection cap reached");
        }
    }

    fn timed_out(&self, peer: SocketAddr, what: Timeout) {
        let listener = self.listener;
        self.metrics.inc(
            "umeme_http_timeouts_total",
            &[("listener", listener), ("kind", what.as_str())],
        );
        if what == Timeout::Idle {
            debug!(listener, %peer, "idle HTTP keep-alive connection closed");
        } else if let Some(held_back) = self.timeouts.allow() {
            warn!(listener, %peer, timeout = what.as_str(), held_back, "HTTP client too slow: closed");
        }
    }

    fn accept_failed(&self, error: &std::io::Error, retry_in: Duration) {
        let listener = self.listener;
        self.metrics
            .inc("umeme_http_accept_errors_total", &[("listener", listener)]);
        if let Some(held_back) = self.accept_errors.allow() {
            warn!(listener, %error, ?retry_in, held_back, "HTTP accept failed; retrying");
        }
    }
}

pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

/// Enforces the bearer token (when configured) on every request that reads or changes data.
async fn guard(State(st): St, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        if needs_token(&st, req.uri().path()) && !bearer_matches(req.headers(), token) {
            st.metrics
                .inc("umeme_http_rejected_total", &[("reason", "unauthorized")]);
            warn!(
                method = %Untrusted(req.method().as_str()),
                path = %Untrusted(req.uri().path()),
                "API request without a valid bearer token refused"
            );
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
            return r;
        }
    }
    next.run(req).await
}

/// Probes carry no data; metrics stay open to a scraper on the same host only.
fn needs_token(st: &ApiState, path: &str) -> bool {
    match path {
        "/health" | "/ready" => false,
        "/metrics" => !st.config.listen.ip().is_loopback(),
        _ => true,
    }
}

/// Counts every response by status class.
async fn count(State(st): St, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let class = match resp.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    st.metrics
        .inc("umeme_http_requests_total", &[("status", class)]);
    resp
}

fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())))
}

fn bad_request(st: &ApiState, reason: &'static str, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    st.metrics
        .inc("umeme_http_rejected_total", &[("reason", reason)]);
    warn!(reason, error = %Untrusted(&msg), "API request refused");
    error(StatusCode::BAD_REQUEST, msg)
}

fn parse_body<T: serde::de::DeserializeOwned>(st: &ApiState, body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(st, "bad_json", format!("invalid JSON body: {e}")))
}

fn parse_meter(st: &ApiState, id: &str) -> Result<MeterId, Response> {
    MeterId::parse(id).map_err(|e| bad_request(st, "bad_meter_id", e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> Response {
    warn!(error = %e, "API request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn ready(State(st): St) -> Response {
    let store_ok = st.reader.run(store::last_event_seq).await.is_ok();
    let broker_ok = st.broker_ready.load(Ordering::Acquire);
    let body = json!({"ready": store_ok && broker_ok, "store": store_ok, "broker": broker_ok, "plugins": true});
    let status = if store_ok && broker_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(st): St) -> Response {
    st.metrics
        .set("umeme_mqtt_sessions", &[], st.hub.connected() as f64);
    if let Ok(o) = outbox_status(&st).await {
        st.metrics
            .set("umeme_events_last_seq", &[], o.last_seq as f64);
        st.metrics
            .set("umeme_outbox_used_bytes", &[], o.used_bytes as f64);
        for s in &o.sinks {
            let label = [("sink", s.name.as_str())];
            st.metrics
                .set("umeme_outbox_backlog", &label, s.backlog as f64);
            let age = s.oldest_undelivered_ms.unwrap_or(0) as f64 / 1000.0;
            st.metrics
                .set("umeme_outbox_oldest_undelivered_seconds", &label, age);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn list_meters(State(st): St) -> Response {
    match st.reader.run(store::meters).await {
        Ok(rows) => {
            let rows: Vec<Value> = rows.into_iter().map(|m| meter_json(&st, m)).collect();
            Json(json!({ "meters": rows })).into_response()
        }
        Err(e) => internal(e),
    }
}

fn meter_json(st: &ApiState, m: store::MeterRow) -> Value {
    let connected = st.hub.is_connected(&m.id);
    let money = m.money.clone();
    let mut v = serde_json::to_value(m).unwrap_or_default();
    v["connected"] = json!(connected);
    // The money ledger (issue 16), once the meter is on it.
    if let Some(m) = money {
        use crate::consumption::cents_kes;
        v["balance_kes"] = json!(cents_kes(m.balance_cents));
        v["debt_kes"] = json!({"emergency": cents_kes(m.debt.emergency),
            "standing": cents_kes(m.debt.standing), "arrears": cents_kes(m.debt.arrears)});
        v["emergency_in_use"] = json!(m.emergency_armed);
    }
    v
}

async fn show_meter(State(st): St, Path(id): Path<String>) -> Response {
    let id = match parse_meter(&st, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let lookup = id.clone();
    match st.reader.run(move |c| store::meter(c, &lookup)).await {
        Ok(Some(m)) => Json(meter_json(&st, m)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown meter {id}")),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMeterBody {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    secret: Option<String>,
}

async fn add_meter(State(st): St, body: Bytes) -> Response {
    let b: NewMeterBody = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let id = match parse_meter(&st, &b.id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let generated = b.secret.is_none();
    let secret = b.secret.unwrap_or_else(auth::generate_secret);
    if let Err(e) = auth::check_secret(&secret) {
        return bad_request(&st, "weak_secret", e.to_string());
    }
    for (field, v) in [("name", &b.name), ("phone", &b.phone)] {
        if v.as_ref()
            .is_some_and(|v| v.chars().count() > 100 || v.chars().any(char::is_control))
        {
            return bad_request(
                &st,
                "bad_field",
                format!("{field} must be at most 100 printable characters"),
            );
        }
    }
    let hash = tokio::task::spawn_blocking({
        let s = secret.clone();
        move || auth::hash_secret(&s)
    })
    .await
    .unwrap_or_default();
    let op = Op::AddMeter {
        meter: id.clone(),
        name: b.name,
        phone: b.phone,
        secret_hash: hash,
        at: now_ms(),
    };
    match st.writer.submit(op).await {
        Ok(_) => {
            let mut body = json!({"id": id});
            if generated {
                body["secret"] = json!(secret);
            }
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Err(LedgerError::MeterExists(_)) => {
            error(StatusCode::CONFLICT, format!("meter {id} already exists"))
        }
        Err(e) => internal(e),
    }
}

async fn meter_payments(State(st): St, Path(id): Path<String>) -> Response {
    let id = match parse_meter(&st, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let lookup = id.clone();
    let r = st
        .reader
        .run(move |c| Ok((store::meter(c, &lookup)?, store::payments_of(c, &lookup)?)))
        .await;
    match r {
        Ok((Some(_), payments)) => Json(json!({"meter": id, "payments": payments})).into_response(),
        Ok((None, _)) => error(StatusCode::NOT_FOUND, format!("unknown meter {id}")),
        Err(e) => internal(e),
    }
}

/// `POST /api/meters/{id}/emergency`: the tenant's request for emergency credit, as if from
/// the meter (`command/emergency`); 409 with the reason when the tariff offers none or it is
/// already in use.
async fn meter_emergency(State(st): St, Path(id): Path<String>) -> Response {
    let id = match parse_meter(&st, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let op = Op::Emergency {
        meter: id.clone(),
        at: now_ms(),
    };
    match st.writer.submit(op).await {
        Ok(_) => {
            let lookup = id.clone();
            match st.reader.run(move |c| store::meter(c, &lookup)).await {
                Ok(Some(m)) => {
                    Json(json!({"emergency": true, "meter": meter_json(&st, m)})).into_response()
                }
                Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown meter {id}")),
                Err(e) => internal(e),
            }
        }
        Err(e @ LedgerError::UnknownMeter(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ LedgerError::Emergency(_)) => {
            st.metrics.inc(
                "umeme_http_rejected_total",
                &[("reason", "emergency_refused")],
            );
            warn!(meter = %id, error = %e, "emergency credit refused");
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => internal(e),
    }
}

/// `GET /api/meters/{id}/statement?month=YYYY-MM` (default: this month, local time).
async fn meter_statement(
    State(st): St,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let id = match parse_meter(&st, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let month = q
        .get("month")
        .cloned()
        .unwrap_or_else(|| current_month(st.pricing.zone));
    let pricing = st.pricing.clone();
    let lookup = id.clone();
    let m = month.clone();
    let r = st
        .reader
        .run(move |c| Ok(crate::statement::build(c, &pricing, &lookup, &m)))
        .await;
    match r {
        Ok(Ok(s)) => {
            let adds_up = s.adds_up();
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["addsUp"] = json!(adds_up);
            Json(v).into_response()
        }
        Ok(Err(e @ crate::statement::StatementError::BadMonth(_))) => {
            bad_request(&st, "bad_month", e.to_string())
        }
        Ok(Err(e @ crate::statement::StatementError::UnknownMeter(_))) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// This month (`YYYY-MM`) in the site's zone.
pub fn current_month(zone: crate::tariff::calendar::SiteZone) -> String {
    let d = zone.date(now_ms());
    format!("{:04}-{:02}", d.year, d.month)
}

/// Payments a source kept because they credited no meter, not applied yet (oldest first).
async fn unapplied_payments(State(st): St) -> Response {
    match st.reader.run(|c| store::unapplied(c, true)).await {
        Ok(rows) => Json(json!({ "unapplied": rows })).into_response(),
        Err(e) => internal(e),
    }
}

/// `POST /api/payments/unapplied/{reference}/apply {"meter","source"?}`: the CLI's
/// `payment apply`, credited once under the payment's own (source, reference).
async fn apply_unapplied(State(st): St, Path(reference): Path<String>, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        meter: String,
        #[serde(default)]
        source: Option<String>,
    }
    let b: Body = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let meter = match parse_meter(&st, &b.meter) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let op = Op::ApplyUnapplied {
        reference,
        source: b.source,
        meter,
        at: now_ms(),
    };
    match st.writer.submit(op).await {
        Ok(Outcome::Credited { payment, .. }) => {
            Json(json!({"applied": true, "payment": payment})).into_response()
        }
        Ok(_) => internal("unexpected ledger outcome"),
        Err(e @ (LedgerError::NotUnapplied(_) | LedgerError::UnknownMeter(_))) => {
            error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ LedgerError::AlreadyApplied { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ LedgerError::AmbiguousReference { .. }) => {
            bad_request(&st, "ambiguous_reference", e.to_string())
        }
        Err(e) => internal(e),
    }
}

async fn outbox_status(st: &ApiState) -> Result<store::OutboxStatus, store::StoreError> {
    let (sinks, max) = (st.sinks.clone(), st.max_bytes);
    st.reader
        .run(move |c| store::outbox_status(c, &sinks, max, now_ms()))
        .await
}

async fn outbox(State(st): St) -> Response {
    match outbox_status(&st).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => internal(e),
    }
}

/// The original backend's `POST /daraja/simulate {"meter_no","amount"}`.
async fn simulate(State(st): St, body: Bytes) -> Response {
    #[derive(Deserialize)]
    struct Body {
        meter_no: String,
        amount: Value,
        #[serde(default)]
        reference: Option<String>,
    }
    let b: Body = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let meter = match parse_meter(&st, &b.meter_no) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let amount = match &b.amount {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let Some(cents) = amount.and_then(kes_to_cents) else {
        return bad_request(
            &st,
            "bad_amount",
            "amount must be a positive KES amount with at most two decimals, at most 1000000",
        );
    };
    let reference = match b.reference {
        Some(r) => format!("SIM-{r}"),
        None => format!("SIM-{}-{}", now_ms(), &auth::generate_secret()[..8]),
    };
    let credit = Credit {
        meter: meter.clone(),
        source: "simulate".into(),
        reference,
        amount_cents: cents,
        at: now_ms(),
        phone: None,
    };
    match st.writer.submit(Op::Credit(credit)).await {
        Ok(Outcome::Credited { payment, duplicate }) => {
            st.metrics.inc(
                "umeme_payments_total",
                &[
                    ("source", "simulate"),
                    ("outcome", if duplicate { "duplicate" } else { "credited" }),
                ],
            );
            // A superset of the original backend's answer (Daraja's C2B simulate answer plus
            // `transaction_id`, `status`, `balance_updated`): its payment dialog shows success
            // on `status == "SUCCESS"` or `ResponseCode == "0"`.
            Json(json!({
                "ResponseCode": "0",
                "ResponseDescription": "Accept the service request successfully.",
                "OriginatorCoversationID": payment.reference,
                "transaction_id": payment.reference,
                "status": "SUCCESS",
                "balance_updated": true,
                "meter_no": meter,
                "amount": payment.amount_cents as f64 / 100.0,
                "reference": payment.reference,
                "units_added": wh_to_units(payment.credit_wh),
                "balance": wh_to_units(payment.balance_after_wh),
                "balance_wh": payment.balance_after_wh,
                "duplicate": duplicate,
            }))
            .into_response()
        }
        Ok(_) => internal("unexpected ledger outcome"),
        Err(LedgerError::UnknownMeter(m)) => {
            st.metrics.inc(
                "umeme_payments_total",
                &[("source", "simulate"), ("outcome", "unknown_meter")],
            );
            error(StatusCode::NOT_FOUND, format!("unknown meter {m}"))
        }
        Err(e @ LedgerError::BadReference) => bad_request(&st, "bad_reference", e.to_string()),
        Err(e @ LedgerError::ReferenceConflict) => {
            st.metrics.inc(
                "umeme_payments_total",
                &[("source", "simulate"), ("outcome", "conflict")],
            );
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e) => internal(e),
    }
}

/// The original backend's `GET /users/{meter}/balance`, answers included.
async fn legacy_balance(State(st): St, Path(id): Path<String>) -> Response {
    let not_found = json!({ "error": format!("No user found with meter_no: {id}") });
    legacy(st, id, not_found, |m| {
        json!({
            "meter_no": m.id,
            "availableUnits": round2(m.balance_units),
            "timestamp": iso8601(now_ms()),
        })
    })
    .await
}

/// The original backend's `GET /users/by-meter/{meter}`: `'Unknown User'` and `''` stand for
/// missing fields, as the original firmware expects; the meter number stands in for the
/// original's Firebase user id.
async fn legacy_user(State(st): St, Path(id): Path<String>) -> Response {
    let not_found = json!({"error": "User not found", "meter_no": id});
    legacy(st, id, not_found, |m| {
        let text = |v: Option<String>| v.filter(|s| !s.is_empty());
        json!({
            "user_id": m.id,
            "name": text(m.name).unwrap_or_else(|| "Unknown User".into()),
            "email": "",
            "phone_number": text(m.phone).unwrap_or_default(),
            "meter_no": m.id,
            "balance": round2(m.balance_units),
        })
    })
    .await
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn legacy(
    st: Arc<ApiState>,
    id: String,
    not_found: Value,
    f: impl FnOnce(store::MeterRow) -> Value,
) -> Response {
    let not_found = (StatusCode::NOT_FOUND, Json(not_found)).into_response();
    let Ok(id) = MeterId::parse(&id) else {
        return not_found;
    };
    match st.reader.run(move |c| store::meter(c, &id)).await {
        Ok(Some(m)) => Json(f(m)).into_response(),
        Ok(None) => not_found,
        Err(e) => internal(e),
    }
}

pub use umeme_plugin_sdk::iso8601_utc as iso8601;

#[cfg(test)]
mod tests {
    #[test]
    fn iso8601_formats_utc() {
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::iso8601(1_764_230_400_123),
            "2025-11-27T08:00:00.123Z"
        );
        assert_eq!(super::iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
