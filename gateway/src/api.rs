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
    /// The site's local day (`[alerts] timezone`): daily usage and site loss.
    pub zone: crate::tariff::calendar::SiteZone,
    /// Firmware rollouts (`crate::ota`).
    pub ota: Arc<crate::ota::OtaServer>,
    pub ota_config: crate::config::OtaConfig,
    pub data_dir: std::path::PathBuf,
    /// The web dashboard's sessions and live updates (`/dashboard`).
    pub dashboard: Arc<crate::dashboard::Dashboard>,
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
        .route("/api/meters/{id}/usage", get(meter_usage))
        .route("/api/alerts", get(alerts))
        .route("/api/site/loss", get(site_loss))
        .route("/api/site/usage", get(site_usage))
        .route("/api/site/readings", post(site_reading))
        .route("/api/meters/{id}/emergency", post(meter_emergency))
        .route("/api/meters/{id}/statement", get(meter_statement))
        .route("/api/outbox", get(outbox))
        .route("/api/payments/unapplied", get(unapplied_payments))
        .route(
            "/api/payments/unapplied/{reference}/apply",
            post(apply_unapplied),
        )
        .route(
            "/api/firmware",
            get(firmware_list)
                .post(add_firmware)
                .layer(DefaultBodyLimit::max(
                    // The image itself; one byte more so a too large one gets our error.
                    usize::try_from(state.ota_config.max_image_bytes)
                        .unwrap_or(usize::MAX)
                        .saturating_add(1),
                )),
        )
        .route("/api/firmware/rollout", get(rollout_status))
        .route("/api/firmware/rollouts", post(start_rollout));
    if state.config.allow_simulate {
        app = app.route("/daraja/simulate", post(simulate));
    }
    // Tests move the daemon's clock through hours and days; a release build has no such route.
    #[cfg(debug_assertions)]
    {
        app = app.route("/api/debug/clock", post(debug_clock));
    }
    app = app.merge(crate::dashboard::router(state.clone()));
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
    let path = req.uri().path();
    // Without a token (allowed on loopback only) and for the loopback-only open `/metrics`,
    // only local requests: a reverse proxy on the gateway (README "Behind HTTPS") or a
    // DNS-rebinding page in a browser there would make them anyone's.
    let open_locally = match &st.token {
        None => !matches!(path, "/health" | "/ready"),
        Some(token) => {
            path == "/metrics" && !needs_token(&st, path) && !bearer_matches(req.headers(), token)
        }
    };
    if open_locally && !local_request(req.headers()) {
        st.metrics
            .inc("umeme_http_rejected_total", &[("reason", "not_local")]);
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        warn!(
            path = %Untrusted(path),
            host = %Untrusted(host.unwrap_or("")),
            "admin API request through a proxy or under another host name refused: it has no token"
        );
        return error(
            StatusCode::FORBIDDEN,
            "this admin API answers local requests only (this one came through a proxy or under \
             another host name): set [api] token_file to reach it from elsewhere",
        );
    }
    if let Some(token) = &st.token {
        // A dashboard session reads what the token reads (its scripts fetch `/api/…`), never
        // writes: a POST still needs the token, so a session cannot be ridden by a forged form.
        let needs = needs_token(&st, req.uri().path()) && !bearer_matches(req.headers(), token);
        let session_read = needs
            && req.method() == axum::http::Method::GET
            && crate::dashboard::has_session(&st, req.headers()).await;
        if needs && !session_read {
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

/// Whether a request is local: no proxy's forwarding header, and a `Host` (if any) that names
/// loopback (`localhost`, `127.0.0.1`, `[::1]`, with or without a port).
fn local_request(headers: &HeaderMap) -> bool {
    const FORWARDED: [&str; 4] = [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
    ];
    if FORWARDED.iter().any(|h| headers.contains_key(*h)) {
        return false;
    }
    let Some(host) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Probes carry no data; metrics stay open to a scraper on the same host only.
fn needs_token(st: &ApiState, path: &str) -> bool {
    match path {
        "/health" | "/ready" => false,
        "/metrics" => !st.config.listen.ip().is_loopback(),
        // The dashboard signs its own requests in with a session (`dashboard.rs`).
        p if p == "/dashboard" || p.starts_with("/dashboard/") => false,
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

/// `GET /api/firmware`: the stored images (`firmware list`).
async fn firmware_list(State(st): St) -> Response {
    match st.reader.run(store::firmware_list).await {
        Ok(rows) => Json(json!({ "firmware": rows })).into_response(),
        Err(e) => internal(e),
    }
}

/// `POST /api/firmware?version=V&signature=HEX` with the image as the body (`firmware add`):
/// stored only when the signature verifies with `[ota] release_public_key`.
async fn add_firmware(State(st): St, uri: axum::http::Uri, body: Bytes) -> Response {
    let mut version = None;
    let mut signature = None;
    for pair in uri.query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("version", v)) => version = Some(v.to_string()),
            Some(("signature", s)) => signature = Some(s.to_string()),
            _ => {}
        }
    }
    let (Some(version), Some(signature)) = (version, signature) else {
        return bad_request(
            &st,
            "bad_query",
            "give ?version=V&signature=HEX (the signature `firmware sign` printed)",
        );
    };
    let v = version.clone();
    match st.reader.run(move |c| store::firmware(c, &v)).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            return error(
                StatusCode::CONFLICT,
                format!("firmware {version} exists already; give the new image another version"),
            )
        }
        Err(e) => return internal(e),
    }
    let (config, dir) = (st.ota_config.clone(), st.data_dir.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        crate::ota::prepare_image_bytes(&config, &dir, &body, &version, &signature, now_ms())
    })
    .await;
    let row = match prepared {
        Ok(Ok(row)) => row,
        Ok(Err(e @ (crate::ota::OtaError::Io { .. } | crate::ota::OtaError::Other(_)))) => {
            return internal(e)
        }
        Ok(Err(e)) => return bad_request(&st, "bad_firmware", e.to_string()),
        Err(e) => return internal(e),
    };
    match st
        .writer
        .submit(Op::Ota(crate::ota::OtaOp::AddFirmware(row.clone())))
        .await
    {
        Ok(_) => (StatusCode::CREATED, Json(json!({ "firmware": row }))).into_response(),
        Err(e @ LedgerError::Ota(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => internal(e),
    }
}

/// `GET /api/firmware/rollout`: the current rollout and its meters (`firmware status`).
async fn rollout_status(State(st): St) -> Response {
    let read = st
        .reader
        .run(|c| {
            let Some(r) = store::current_rollout(c)? else {
                return Ok((None, Vec::new()));
            };
            let meters = store::rollout_meters(c, r.id)?;
            Ok((Some(r), meters))
        })
        .await;
    match read {
        Ok((rollout, meters)) => {
            Json(json!({ "rollout": rollout, "meters": meters })).into_response()
        }
        Err(e) => internal(e),
    }
}

/// `POST /api/firmware/rollouts {"version", "meters": [...] | "all": true,
/// "maxFailurePercent"?}` (`firmware rollout`): announced to connected meters at once.
async fn start_rollout(State(st): St, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Body {
        version: String,
        #[serde(default)]
        meters: Option<Vec<String>>,
        #[serde(default)]
        all: bool,
        #[serde(default)]
        max_failure_percent: Option<u8>,
    }
    let b: Body = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let targets = match (b.all, b.meters) {
        (true, None) => crate::ota::Targets::All,
        (false, Some(ms)) if !ms.is_empty() => {
            let mut ids = Vec::with_capacity(ms.len());
            for m in &ms {
                match parse_meter(&st, m) {
                    Ok(id) => ids.push(id),
                    Err(r) => return r,
                }
            }
            crate::ota::Targets::Meters(ids)
        }
        _ => {
            return bad_request(
                &st,
                "bad_body",
                "give either \"meters\": [...] or \"all\": true",
            )
        }
    };
    let pct = b.max_failure_percent.unwrap_or(10);
    if pct > 100 {
        return bad_request(&st, "bad_body", "maxFailurePercent is 0 to 100");
    }
    let op = Op::Ota(crate::ota::OtaOp::StartRollout {
        version: b.version,
        targets,
        max_failure_percent: i64::from(pct),
        at: now_ms(),
    });
    match st.writer.submit(op).await {
        Ok(Outcome::Rollout { id }) => {
            st.ota.wake.notify_one();
            Json(json!({ "rollout": id })).into_response()
        }
        Ok(_) => internal("unexpected ledger outcome"),
        Err(e @ LedgerError::UnknownMeter(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ LedgerError::Ota(_)) => error(StatusCode::CONFLICT, e.to_string()),
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

/// `key=value` pairs of a query string (values here are numbers, dates and words: no
/// percent-decoding needed, anything else is refused by the parsers).
fn query_pairs(q: Option<&str>) -> std::collections::HashMap<&str, &str> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// A time in a query: milliseconds since the epoch, or a local date `YYYY-MM-DD` (its
/// midnight in the site's zone).
fn query_time(st: &ApiState, name: &str, v: &str) -> Result<i64, Response> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    crate::tariff::calendar::LocalDate::parse(v)
        .map(|d| st.zone.midnight(d))
        .ok_or_else(|| {
            bad_request(
                st,
                "bad_query",
                format!("{name} must be milliseconds since the epoch or a date YYYY-MM-DD"),
            )
        })
}

/// `GET /api/meters/{id}/usage?from=&to=&step=hour|day`: `{"points":[{"at","wh"}]}`, a point
/// for every hour (UTC) or local day starting in `from..to`. Defaults: the last 24 hours by
/// hour, the last 30 days by day.
async fn meter_usage(
    State(st): St,
    Path(id): Path<String>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let id = match parse_meter(&st, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let q = query_pairs(q.as_deref());
    let Some(step) = crate::usage::Step::parse(q.get("step").copied().unwrap_or("hour")) else {
        return bad_request(&st, "bad_query", "step must be hour or day");
    };
    let to = match q.get("to").map(|v| query_time(&st, "to", v)).transpose() {
        Ok(t) => t.unwrap_or_else(now_ms),
        Err(r) => return r,
    };
    let span = match step {
        crate::usage::Step::Hour => 24 * 3_600_000,
        crate::usage::Step::Day => 30 * 86_400_000,
    };
    let from = match q
        .get("from")
        .map(|v| query_time(&st, "from", v))
        .transpose()
    {
        // Saturating: an extreme `to` is refused by `usage::buckets`, not overflowed here.
        Ok(f) => f.unwrap_or(to.saturating_sub(span)),
        Err(r) => return r,
    };
    let (zone, lookup) = (st.zone, id.clone());
    let r = st
        .reader
        .run(move |c| {
            Ok(match store::meter(c, &lookup)? {
                Some(_) => Some(crate::usage::points(
                    c,
                    zone,
                    lookup.as_str(),
                    from,
                    to,
                    step,
                )?),
                None => None,
            })
        })
        .await;
    match r {
        Ok(Some(Ok(points))) => Json(json!({
            "meter": id, "step": q.get("step").copied().unwrap_or("hour"),
            "from": from, "to": to, "points": points,
        }))
        .into_response(),
        Ok(Some(Err(e))) => bad_request(&st, "bad_range", e.to_string()),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown meter {id}")),
        Err(e) => internal(e),
    }
}

/// `GET /api/site/usage?from=&to=&step=hour|day`: the site's use per bucket, as
/// `/api/meters/{id}/usage` (same bounds and defaults): `wh` is every meter but the main one,
/// `mainWh` the main meter's (absent when none is marked).
async fn site_usage(
    State(st): St,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let q = query_pairs(q.as_deref());
    let step_name = q.get("step").copied().unwrap_or("hour");
    let Some(step) = crate::usage::Step::parse(step_name) else {
        return bad_request(&st, "bad_query", "step must be hour or day");
    };
    let to = match q.get("to").map(|v| query_time(&st, "to", v)).transpose() {
        Ok(t) => t.unwrap_or_else(now_ms),
        Err(r) => return r,
    };
    let span = match step {
        crate::usage::Step::Hour => 24 * 3_600_000,
        crate::usage::Step::Day => 30 * 86_400_000,
    };
    let from = match q
        .get("from")
        .map(|v| query_time(&st, "from", v))
        .transpose()
    {
        // Saturating: an extreme `to` is refused by `usage::buckets`, not overflowed here.
        Ok(f) => f.unwrap_or(to.saturating_sub(span)),
        Err(r) => return r,
    };
    let zone = st.zone;
    match st
        .reader
        .run(move |c| crate::usage::site_points(c, zone, from, to, step))
        .await
    {
        Ok(Ok(points)) => {
            Json(json!({"step": step_name, "from": from, "to": to, "points": points}))
                .into_response()
        }
        Ok(Err(e)) => bad_request(&st, "bad_range", e.to_string()),
        Err(e) => internal(e),
    }
}

/// `GET /api/alerts?meter=&limit=`: alert events, newest first (at most 1000, default 100).
async fn alerts(State(st): St, axum::extract::RawQuery(q): axum::extract::RawQuery) -> Response {
    let q = query_pairs(q.as_deref());
    let meter = match q.get("meter").map(|m| parse_meter(&st, m)).transpose() {
        Ok(m) => m,
        Err(r) => return r,
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return bad_request(&st, "bad_query", "limit must be 1 to 1000"),
    };
    let gateway = st.gateway_id.clone();
    let r = st
        .reader
        .run(move |c| {
            let events =
                store::alert_events(c, &gateway, meter.as_ref().map(MeterId::as_str), limit)?;
            let open = store::open_alerts(c)?;
            Ok((events, open))
        })
        .await;
    match r {
        Ok((events, open)) => {
            let open: Vec<Value> = open
                .into_iter()
                .map(|((m, a), at)| json!({"meter": (!m.is_empty()).then_some(m), "alert": a, "raisedAt": at}))
                .collect();
            Json(json!({"alerts": events, "open": open})).into_response()
        }
        Err(e) => internal(e),
    }
}

/// `GET /api/site/loss?from=YYYY-MM-DD&to=YYYY-MM-DD` (local days, both included; default the
/// last 30 days, at most 400): per day the main supply, the other meters' sum and the loss.
async fn site_loss(State(st): St, axum::extract::RawQuery(q): axum::extract::RawQuery) -> Response {
    use crate::tariff::calendar::LocalDate;
    let q = query_pairs(q.as_deref());
    let today = st.zone.day(now_ms());
    let day = |name: &str, default: i64| -> Result<LocalDate, Response> {
        match q.get(name) {
            None => Ok(LocalDate::from_days(default)),
            Some(v) => LocalDate::parse(v).ok_or_else(|| {
                bad_request(
                    &st,
                    "bad_query",
                    format!("{name} must be a date YYYY-MM-DD"),
                )
            }),
        }
    };
    let (from, to) = match (day("from", today - 30), day("to", today)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let n = to.days() - from.days() + 1;
    if !(1..=crate::usage::MAX_DAYS).contains(&n) {
        return bad_request(
            &st,
            "bad_range",
            format!("from..to must be 1 to {} days", crate::usage::MAX_DAYS),
        );
    }
    let zone = st.zone;
    match st
        .reader
        .run(move |c| crate::alerts::site_days(c, zone, from, to))
        .await
    {
        Ok(days) => Json(json!({ "days": days })).into_response(),
        Err(e) => internal(e),
    }
}

/// `POST /api/site/readings {"day":"YYYY-MM-DD","kwh":123.4}`: the site's bulk supply of a
/// local day read by hand (replaces an earlier reading of that day).
async fn site_reading(State(st): St, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        day: String,
        kwh: f64,
    }
    let b: Body = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (day, wh) = match site_reading_values(&b.day, b.kwh) {
        Ok(v) => v,
        Err(msg) => return bad_request(&st, "bad_field", msg),
    };
    let op = Op::SiteReading {
        day: day.clone(),
        wh,
        at: now_ms(),
    };
    match st.writer.submit(op).await {
        Ok(_) => (StatusCode::CREATED, Json(json!({"day": day, "wh": wh}))).into_response(),
        Err(e) => internal(e),
    }
}

/// A reading by hand checked: a real date, and 0 to 1,000,000 kWh (a whole site's day).
pub fn site_reading_values(day: &str, kwh: f64) -> Result<(String, i64), String> {
    let d = crate::tariff::calendar::LocalDate::parse(day)
        .ok_or_else(|| "day must be a date YYYY-MM-DD".to_string())?;
    if !kwh.is_finite() || !(0.0..=1_000_000.0).contains(&kwh) {
        return Err("kwh must be 0 to 1000000".into());
    }
    Ok((d.to_string(), (kwh * 1000.0).round() as i64))
}

/// Debug builds only: `POST /api/debug/clock {"nowMs": n}` sets the daemon's clock
/// ([`store::set_debug_clock`]; omit `nowMs` to keep it), then folds, which runs the alert
/// rules at that time.
#[cfg(debug_assertions)]
async fn debug_clock(State(st): St, body: Bytes) -> Response {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default, rename = "nowMs")]
        now_ms: Option<i64>,
    }
    let b: Body = match parse_body(&st, &body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(now) = b.now_ms {
        store::set_debug_clock(now);
    }
    match st.writer.fold().await {
        Ok(()) => Json(json!({"nowMs": now_ms()})).into_response(),
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
        Ok(Outcome::Unapplied { reason }) => error(StatusCode::UNPROCESSABLE_ENTITY, reason),
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
