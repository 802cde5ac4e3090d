//! The site's own web dashboard, served by the admin API under `/dashboard` (issue 17).
//!
//! Server-rendered HTML ([`html`]: one escaping helper for every value), a small hand-written
//! script and style sheet embedded in the binary, charts as inline SVG. A session
//! ([`session`]) comes from the admin token or the operator password
//! (`umeme-gateway operator password`); every POST needs the session's CSRF token and a
//! same-origin `Origin` (or `Referer`). Writes go through the ledger writer's ops, reads
//! through the store's readers, as the admin API's. Live updates: `GET /dashboard/live`, a
//! server-sent event stream woken by the writer's commit [`Bell`].
//!
//! Not behind the session: the sign-in page and the two static assets (no data in them).

// Helpers return a ready error `Response` as their `Err`, which is axum's idiom.
#![allow(clippy::result_large_err)]

mod alerts;
pub mod csv;
pub mod html;
mod money;
mod pages;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::ApiState;
use crate::outbox::Bell;
use crate::store::{self, now_ms};
use crate::tariff::calendar::SiteZone;
use crate::untrusted::Untrusted;
use session::{Sessions, SignInLimit, Signed};

pub const COOKIE: &str = "umeme_session";
/// Live streams open at once, over all sessions.
pub const MAX_STREAMS: usize = 16;
/// At most one live update per this interval per stream: a busy site's commits are batched.
pub const LIVE_THROTTLE: Duration = Duration::from_millis(500);
/// A comment line on an idle stream, so proxies and the browser keep it open.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Form bodies are small; anything bigger is refused.
const MAX_FORM: usize = 16 * 1024;

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// What the dashboard needs besides the admin API's state.
pub struct DashboardSettings {
    pub secure_cookies: bool,
    pub low_balance_wh: i64,
    pub data_dir: PathBuf,
    /// TODO(lead, after the tariff merge): `[site] timezone`.
    pub zone: SiteZone,
    /// A read connection of the exports' own: an export reads a whole period (seconds on a
    /// big events table), and the shared reader is what every meter CONNECT needs for its
    /// secret.
    pub export_reader: store::Reader,
}

pub struct Dashboard {
    pub settings: DashboardSettings,
    pub sessions: Sessions,
    signin: SignInLimit,
    /// Password checks (argon2) running at once.
    checks: tokio::sync::Semaphore,
    started: Instant,
    changes: watch::Sender<u64>,
    streams: AtomicUsize,
    /// Set when the daemon stops: live streams end (else each would hold the shutdown for
    /// the HTTP guard's whole grace period).
    stopping: std::sync::atomic::AtomicBool,
}

impl Dashboard {
    /// The dashboard, with a thread that turns the writer's commit bell into a watch channel
    /// (it ends within a second of the dashboard being dropped).
    pub fn new(settings: DashboardSettings, bell: Arc<Bell>) -> Arc<Dashboard> {
        let (changes, _) = watch::channel(0);
        let d = Arc::new(Dashboard {
            settings,
            sessions: Sessions::default(),
            signin: SignInLimit::default(),
            checks: tokio::sync::Semaphore::new(2),
            started: Instant::now(),
            changes,
            streams: AtomicUsize::new(0),
            stopping: Default::default(),
        });
        let weak: Weak<Dashboard> = Arc::downgrade(&d);
        let spawned = std::thread::Builder::new()
            .name("dashboard-bell".into())
            .spawn(move || {
                let mut seen = 0;
                loop {
                    let rung = bell.wait(seen, Duration::from_secs(1));
                    let Some(d) = weak.upgrade() else { return };
                    if rung != seen {
                        seen = rung;
                        d.changes.send_replace(rung);
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the dashboard's live-update thread; pages still work");
        }
        d
    }

    /// Ends the live streams within a second (the daemon is stopping).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

pub fn router(state: Arc<ApiState>) -> Router<Arc<ApiState>> {
    let signed_in = Router::new()
        .route("/dashboard", get(pages::overview))
        .route("/dashboard/meters", get(pages::meters))
        .route("/dashboard/meters/{id}", get(pages::meter))
        .route("/dashboard/meters/{id}/topup", post(pages::topup))
        .route("/dashboard/meters/{id}/relay", post(pages::relay))
        .route("/dashboard/meters/{id}/secret", post(pages::rotate_secret))
        .route("/dashboard/meters/{id}/details", post(pages::details))
        .route("/dashboard/meters/{id}/tariff", post(money::set_tariff))
        .route("/dashboard/meters/{id}/emergency", post(money::emergency))
        .route("/dashboard/payments", get(pages::payments))
        .route("/dashboard/payments/apply", post(pages::apply))
        .route(
            "/dashboard/export/payments.csv",
            get(pages::export_payments),
        )
        .route("/dashboard/export/month.csv", get(pages::export_month))
        .route("/dashboard/live", get(live))
        .route("/dashboard/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    Router::new()
        .route("/dashboard/login", get(login_page).post(login))
        .route(
            "/dashboard/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .merge(signed_in)
        .layer(middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Headers on every dashboard answer: no inline script, no framing, no caching of pages.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The session id in the request's cookie, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether the request carries a live dashboard session (the admin API's GETs accept it in
/// place of the bearer token, so the dashboard's scripts can read `/api/…`).
pub async fn has_session(st: &ApiState, headers: &HeaderMap) -> bool {
    let Some(id) = session_cookie(headers) else {
        return false;
    };
    match st.dashboard.sessions.credential(id) {
        Some(credential) => credential_current(st, id, credential.as_deref()).await,
        None => false,
    }
}

/// Whether a session's sign-in credential still holds: a `password` session whose hash is no
/// longer the stored one (the operator set a new password with the CLI, another process) is
/// ended here. The token is read once at start, so a token session needs no check.
async fn credential_current(st: &ApiState, id: &str, signed_with: Option<&str>) -> bool {
    let Some(signed_with) = signed_with else {
        return true;
    };
    let stored = st.reader.run(store::operator_password_hash).await;
    // An unreadable database ends nothing (the request fails on its own reads, if any).
    if stored
        .as_ref()
        .is_ok_and(|h| h.as_deref() != Some(signed_with))
    {
        st.dashboard.sessions.remove(id);
        info!("dashboard session ended: the operator password changed since its sign-in");
        return false;
    }
    true
}

/// A parsed form body, for the handlers behind [`require_session`].
#[derive(Clone, Default)]
pub struct Form(pub HashMap<String, String>);

impl Form {
    pub fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or("")
    }
}

fn refuse(st: &ApiState, status: StatusCode, reason: &'static str, msg: &str) -> Response {
    st.metrics
        .inc("umeme_dashboard_refused_total", &[("reason", reason)]);
    crate::api::error(status, msg)
}

/// Signs the request in from its cookie (else a redirect to sign-in, or 401 for data), and
/// for a POST checks the origin and the CSRF token (else 403).
async fn require_session(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    tracing::debug!(method = %req.method(), path = %Untrusted(&path), "dashboard request");
    let mut signed =
        session_cookie(req.headers()).and_then(|id| st.dashboard.sessions.use_session(id));
    if let Some(s) = &signed {
        if !credential_current(&st, &s.id, s.credential.as_deref()).await {
            signed = None;
        }
    }
    let Some(signed) = signed else {
        let data = path.starts_with("/dashboard/live") || path.starts_with("/dashboard/export/");
        if data || req.method() != Method::GET {
            return refuse(
                &st,
                StatusCode::UNAUTHORIZED,
                "no_session",
                "sign in to the dashboard first",
            );
        }
        return Redirect::to("/dashboard/login").into_response();
    };
    if req.method() != Method::POST {
        let mut req = req;
        req.extensions_mut().insert(signed);
        return next.run(req).await;
    }
    if !same_origin(req.headers()) {
        warn!(path = %Untrusted(&path), origin = %Untrusted(req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or("")), "dashboard POST from another origin refused");
        return refuse(
            &st,
            StatusCode::FORBIDDEN,
            "cross_origin",
            "cross-origin request refused",
        );
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
        return refuse(
            &st,
            StatusCode::PAYLOAD_TOO_LARGE,
            "form_too_large",
            "form too large",
        );
    };
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
    let given = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .or(form.get("csrf").map(String::as_str))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(signed.csrf.as_bytes())) {
        warn!(path = %Untrusted(&path), "dashboard POST without its CSRF token refused");
        return refuse(
            &st,
            StatusCode::FORBIDDEN,
            "csrf",
            "missing or wrong CSRF token",
        );
    }
    let mut req = Request::from_parts(parts, Body::from(Bytes::new()));
    req.extensions_mut().insert(signed);
    req.extensions_mut().insert(Form(form));
    next.run(req).await
}

/// `Origin` (or, without it, `Referer`) names this host: a form posted from another site, or
/// a script on one, is refused even with a stolen token. Neither header: refused too (every
/// browser sends `Origin` on a POST).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let matches = |url: &str| {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        rest.is_some_and(|r| r.split('/').next() == Some(host))
    };
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => matches(origin),
        None => headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(matches),
    }
}

fn set_cookie(st: &ApiState, value: &str, max_age: Option<u64>) -> HeaderValue {
    let secure = if st.dashboard.settings.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let age = max_age.map_or("; Max-Age=0".to_string(), |s| format!("; Max-Age={s}"));
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

async fn login_page(State(st): State<Arc<ApiState>>) -> Response {
    if st.token.is_none() {
        let has_password = st
            .reader
            .run(store::operator_password_hash)
            .await
            .ok()
            .flatten()
            .is_some();
        if !has_password {
            return pages::login_form(Some(
                "No admin token and no operator password are set: run `umeme-gateway operator password` on the gateway first.",
            ));
        }
    }
    pages::login_form(None)
}

/// `POST /dashboard/login` with `secret` (the admin token or the operator password).
async fn login(
    State(st): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return refuse(
            &st,
            StatusCode::FORBIDDEN,
            "cross_origin",
            "cross-origin request refused",
        );
    }
    let ip = peer.ip();
    if !st.dashboard.signin.try_begin(ip) {
        st.metrics
            .inc("umeme_dashboard_signin_total", &[("outcome", "throttled")]);
        warn!(peer = %Untrusted(&ip.to_string()), "dashboard sign-in refused: too many failures from this address");
        let mut r = pages::login_form(Some(
            "Too many failed sign-ins from this address; try again in 10 minutes.",
        ));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        return r;
    }
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let secret = form
        .get("secret")
        .map(String::as_str)
        .unwrap_or("")
        .to_string();
    let (who, credential) = match verify(&st, &secret).await {
        Some(v) => v,
        None => {
            // Already counted by `try_begin`.
            st.metrics
                .inc("umeme_dashboard_signin_total", &[("outcome", "failed")]);
            warn!(peer = %Untrusted(&ip.to_string()), "dashboard sign-in failed");
            let mut r = pages::login_form(Some("Wrong token or password."));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return r;
        }
    };
    st.dashboard.signin.succeeded(ip);
    st.metrics
        .inc("umeme_dashboard_signin_total", &[("outcome", "ok")]);
    let s = st.dashboard.sessions.create(who, credential);
    info!(peer = %Untrusted(&ip.to_string()), how = who, "dashboard sign-in");
    let mut r = Redirect::to("/dashboard").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&st, &s.id, Some(session::ABSOLUTE.as_secs())),
    );
    r
}

/// `token` when `secret` is the admin token, `password` (with the stored hash it matched)
/// when it is the operator password.
async fn verify(st: &ApiState, secret: &str) -> Option<(&'static str, Option<String>)> {
    if secret.is_empty() || secret.len() > 256 {
        return None;
    }
    if let Some(token) = &st.token {
        if bool::from(secret.as_bytes().ct_eq(token.as_bytes())) {
            return Some(("token", None));
        }
    }
    let hash = st
        .reader
        .run(store::operator_password_hash)
        .await
        .ok()
        .flatten()?;
    let _permit = st.dashboard.checks.acquire().await.ok()?;
    let secret = secret.to_string();
    let checked = hash.clone();
    let ok = tokio::task::spawn_blocking(move || crate::auth::verify_password(&checked, &secret))
        .await
        .unwrap_or(false);
    ok.then_some(("password", Some(hash)))
}

async fn logout(
    State(st): State<Arc<ApiState>>,
    axum::Extension(s): axum::Extension<Signed>,
) -> Response {
    st.dashboard.sessions.remove(&s.id);
    let mut r = Redirect::to("/dashboard/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&st, "", None));
    r
}

/// Releases a stream's slot when the stream is dropped.
struct StreamSlot(Arc<ApiState>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.dashboard.streams.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.set(
            "umeme_dashboard_streams",
            &[],
            self.0.dashboard.streams.load(Ordering::Acquire) as f64,
        );
    }
}

/// `GET /dashboard/live`: an event `change` after commits (at most one per
/// [`LIVE_THROTTLE`]), a heartbeat comment when idle, and the end of the stream once the
/// session is gone (sign-out or expiry).
async fn live(
    State(st): State<Arc<ApiState>>,
    axum::Extension(s): axum::Extension<Signed>,
) -> Response {
    let d = &st.dashboard;
    if d.streams.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
        d.streams.fetch_sub(1, Ordering::AcqRel);
        return refuse(
            &st,
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many live streams open",
        );
    }
    st.metrics.set(
        "umeme_dashboard_streams",
        &[],
        d.streams.load(Ordering::Acquire) as f64,
    );
    let slot = StreamSlot(st.clone());
    let rx = d.changes.subscribe();
    let state = (slot, rx, s.id, true);
    let stream = futures_util::stream::unfold(state, |(slot, mut rx, id, first)| async move {
        if first {
            // Tells the page the stream is up (it shows the live dot).
            let ev = SseEvent::default().event("hello").data("1");
            return Some((Ok::<_, std::convert::Infallible>(ev), (slot, rx, id, false)));
        }
        loop {
            let changed = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            let d = &slot.0.dashboard;
            if !d.sessions.alive(&id) || d.stopping.load(Ordering::Acquire) {
                return None;
            }
            match changed {
                Ok(Ok(())) => {
                    tokio::time::sleep(LIVE_THROTTLE).await;
                    tracing::debug!("dashboard live change sent");
                    let seq = *rx.borrow_and_update();
                    let ev = SseEvent::default().event("change").data(seq.to_string());
                    return Some((Ok(ev), (slot, rx, id, false)));
                }
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT).text("heartbeat"))
        .into_response()
}

/// Today's start and this month's first day, as local day numbers, and the UTC ms of both.
pub fn today(zone: SiteZone, now: i64) -> (i64, i64, i64, i64) {
    let day = zone.day(now);
    let date = zone.date(now);
    let first = crate::tariff::calendar::LocalDate { day: 1, ..date };
    let month_day = first.days();
    (
        day,
        month_day,
        zone.midnight(zone.date(now)),
        zone.midnight(first),
    )
}

pub fn now() -> i64 {
    now_ms()
}
