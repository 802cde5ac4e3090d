//! The dashboard's pages, actions and exports. Reads through the store's readers, writes
//! through the ledger writer's ops (as `api.rs` does), every value escaped by [`html`].

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html as HtmlResponse, IntoResponse, Redirect, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::csv::{
    decimal,
    Cell::{Num, Text},
    Csv,
};
use super::html::{ago, csrf_field, esc, kes, kwh, local_time, page, Html, Tab};
use super::session::Signed;
use super::{today, Form};
use crate::api::{error, ApiState};
use crate::hub::Outgoing;
use crate::meter::{kes_to_cents, MeterId};
use crate::store::{self, MeterRow, PaymentRow};
use crate::untrusted::Untrusted;
use crate::writer::{Credit, LedgerError, Op, Outcome};

type St = State<Arc<ApiState>>;

pub(super) fn internal(e: impl std::fmt::Display) -> Response {
    warn!(error = %e, "dashboard request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the gateway could not read its database",
    )
}

fn html_page(body: String) -> Response {
    HtmlResponse(body).into_response()
}

pub fn login_form(message: Option<&str>) -> Response {
    let mut h = Html::default();
    h.raw("<section class=\"card login\"><h1>Sign in</h1>");
    if let Some(m) = message {
        h.raw("<p class=\"error\">").text(m).raw("</p>");
    }
    h.raw("<form method=\"post\" action=\"/dashboard/login\">")
        .raw("<label>Admin token or operator password<input type=\"password\" name=\"secret\" id=\"secret\" autocomplete=\"current-password\" required autofocus></label>")
        .raw("<button id=\"signin\">Sign in</button></form></section>");
    html_page(page("Sign in", None, None, None, &h.into_string()))
}

struct Badges {
    online: bool,
    low: bool,
}

fn badges(h: &mut Html, m: &MeterRow, b: Badges) {
    if b.online {
        h.raw("<span class=\"b ok\">online</span>");
    } else {
        h.raw("<span class=\"b off\">offline</span>");
    }
    if m.balance_wh <= 0 {
        h.raw("<span class=\"b bad\">relay off</span>");
    } else {
        h.raw("<span class=\"b ok\">relay on</span>");
    }
    if m.balance_wh < 0 || super::money::debt_cents(m) > 0 {
        h.raw("<span class=\"b bad\">debt</span>");
    } else if b.low && m.balance_wh > 0 {
        h.raw("<span class=\"b warn\">low</span>");
    }
}

fn stat(h: &mut Html, id: &str, label: &str, value: &str, note: &str) {
    let _ = id;
    h.raw("<div class=\"stat\"><span class=\"k\">")
        .text(label)
        .raw("</span><span class=\"v\">")
        .text(value)
        .raw("</span><span class=\"n\">")
        .text(note)
        .raw("</span></div>");
}

/// A bar chart: bars as inline SVG stretched to the box (no text in it, so nothing is
/// distorted), the scale and labels as HTML beside it. `(label, value)` pairs; every few
/// labels shown.
pub fn bar_chart(points: &[(String, f64)], unit: &str) -> String {
    if points.iter().all(|(_, v)| *v <= 0.0) {
        return "<p class=\"nodata\">no data</p>".into();
    }
    let max = points.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let n = points.len();
    let mut s = format!(
        "<div class=\"chart\"><span class=\"ymax\">{} {}</span><svg viewBox=\"0 0 {n} 100\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{}\">",
        esc(&format!("{max:.1}")),
        esc(unit),
        esc(unit)
    );
    for (i, (label, v)) in points.iter().enumerate() {
        let h = if max > 0.0 { v / max * 100.0 } else { 0.0 };
        let _ = write!(
            s,
            "<rect x=\"{}.15\" y=\"{:.2}\" width=\"0.7\" height=\"{h:.2}\"><title>{}: {v:.2} {}</title></rect>",
            i,
            100.0 - h,
            esc(label),
            esc(unit)
        );
    }
    s.push_str("</svg><div class=\"xl\">");
    let every = n.div_ceil(8).max(1);
    for (i, (label, _)) in points.iter().enumerate() {
        s.push_str("<span>");
        if i % every == 0 {
            s.push_str(&esc(label));
        }
        s.push_str("</span>");
    }
    s.push_str("</div></div>");
    s
}

struct Overview {
    meters: Vec<MeterRow>,
    outbox: store::OutboxStatus,
    alerts: Vec<store::Event>,
    open: Vec<super::alerts::Open>,
    paid_today: Vec<PaymentRow>,
    /// This month by local day, from the hourly usage store (every meter but the main one).
    days: Vec<crate::usage::SitePoint>,
    loss: Vec<crate::alerts::SiteDay>,
}

pub async fn overview(State(st): St, Extension(s): Extension<Signed>) -> Response {
    use crate::tariff::calendar::LocalDate;
    let now = super::now();
    let zone = st.dashboard.settings.zone;
    let (day, _, day_start, month_start) = today(zone, now);
    let month_end = zone.midnight(next_month(zone.date(now)));
    let st2 = st.clone();
    let r = st
        .reader
        .run(move |c| {
            let days = crate::usage::site_points(
                c,
                zone,
                month_start,
                month_end,
                crate::usage::Step::Day,
            )?
            .unwrap_or_default();
            let mut open: Vec<super::alerts::Open> = store::open_alerts(c)?
                .into_iter()
                .map(|((m, a), at)| (m, a, at))
                .collect();
            open.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| x.0.cmp(&y.0)));
            Ok(Overview {
                meters: store::meters(c)?,
                outbox: store::outbox_status(c, &st2.sinks, st2.max_bytes, now)?,
                alerts: store::recent_events(c, &st2.gateway_id, Some("alert"), None, 10)?,
                open,
                paid_today: store::payments_between(c, day_start, i64::MAX, 10_000)?,
                days,
                loss: crate::alerts::site_days(
                    c,
                    zone,
                    LocalDate::from_days(day - 29),
                    LocalDate::from_days(day),
                )?,
            })
        })
        .await;
    let o = match r {
        Ok(o) => o,
        Err(e) => return internal(e),
    };
    let energy_today = o
        .days
        .iter()
        .find(|p| p.at == day_start)
        .map_or(0, |p| p.wh);
    let energy_month: i64 = o
        .days
        .iter()
        .filter(|p| p.at <= day_start)
        .map(|p| p.wh)
        .sum();
    let low = st.dashboard.settings.low_balance_wh;
    let connected = o
        .meters
        .iter()
        .filter(|m| st.hub.is_connected(&m.id))
        .count();
    let low_n = o
        .meters
        .iter()
        .filter(|m| m.balance_wh > 0 && m.balance_wh < low)
        .count();
    let cut_n = o.meters.iter().filter(|m| m.balance_wh <= 0).count();
    let paid: i64 = o.paid_today.iter().map(|p| p.amount_cents).sum();
    let mut h = Html::default();
    h.raw("<h1>Site overview</h1><div id=\"stats\" class=\"stats\" data-live>");
    stat(
        &mut h,
        "connected",
        "Meters connected",
        &format!("{connected} / {}", o.meters.len()),
        "online now",
    );
    stat(
        &mut h,
        "today",
        "Energy today",
        &format!("{} kWh", kwh(energy_today)),
        "since midnight",
    );
    stat(
        &mut h,
        "month",
        "Energy this month",
        &format!("{} kWh", kwh(energy_month)),
        "since the 1st",
    );
    stat(
        &mut h,
        "paid",
        "Payments today",
        &format!("KES {}", kes(paid)),
        &format!("{} payments", o.paid_today.len()),
    );
    stat(&mut h, "low", "Low balance", &low_n.to_string(), "meters");
    stat(
        &mut h,
        "cut",
        "Cut off",
        &cut_n.to_string(),
        "meters, relay off",
    );
    let up = st.dashboard.uptime().as_secs();
    let uptime = match up {
        0..=3599 => format!("{} min", up / 60),
        3600..=86_399 => format!("{} h {} min", up / 3600, up / 60 % 60),
        _ => format!("{} d {} h", up / 86_400, up / 3600 % 24),
    };
    stat(&mut h, "uptime", "Uptime", &uptime, "since start");
    let free = disk_free(&st.dashboard.settings.data_dir);
    let used = o.outbox.used_bytes as f64;
    stat(
        &mut h,
        "disk",
        "Database",
        &if used < 1_048_576.0 {
            format!("{:.0} KiB", used / 1024.0)
        } else {
            format!("{:.1} MiB", used / 1_048_576.0)
        },
        &match free {
            Some(f) => format!("{:.1} GiB free on disk", f as f64 / 1_073_741_824.0),
            None => String::new(),
        },
    );
    h.raw("</div>");
    let points: Vec<(String, f64)> = o
        .days
        .iter()
        .map(|p| (zone.date(p.at).day.to_string(), p.wh as f64 / 1000.0))
        .collect();
    h.raw("<section class=\"card\" id=\"energy\" data-live><h2>Energy by day, this month</h2>")
        .raw(&bar_chart(&points, "kWh"))
        .raw("</section>");
    h.raw("<section class=\"card\" id=\"loss\" data-live>");
    super::alerts::loss_chart(&mut h, &o.loss);
    h.raw("</section>");
    h.raw("<div class=\"cols\"><section class=\"card\" id=\"alerts\" data-live><h2>Alerts</h2>");
    super::alerts::panel(&mut h, zone, now, &o.open, &o.alerts, true);
    h.raw("</section><section class=\"card\" id=\"outbox\" data-live><h2>Outbox</h2>");
    if o.outbox.sinks.is_empty() {
        h.raw("<p class=\"muted\">No sinks configured.</p>");
    } else {
        h.raw("<table><thead><tr><th>Sink</th><th>Backlog</th><th>Oldest</th><th>Last error</th></tr></thead><tbody>");
        for sk in &o.outbox.sinks {
            h.raw("<tr><td>")
                .text(&sk.name)
                .raw("</td><td>")
                .text(&sk.backlog.to_string())
                .raw("</td><td>");
            h.text(&sk.oldest_undelivered_ms.map_or("–".into(), |ms| ago(ms, 0)));
            h.raw("</td><td>")
                .text(sk.last_error.as_deref().unwrap_or("–"))
                .raw("</td></tr>");
        }
        h.raw("</tbody></table>");
    }
    h.raw("</section></div>");
    html_page(page(
        "Overview",
        Some(Tab::Overview),
        Some(&s.csrf),
        s.flash.as_deref(),
        &h.into_string(),
    ))
}

/// One line of an event's data for people.
fn describe(data: &serde_json::Value) -> String {
    for k in ["message", "description", "kind", "type", "alert", "action"] {
        if let Some(v) = data.get(k).and_then(|v| v.as_str()) {
            let state = data.get("state").and_then(|v| v.as_str()).unwrap_or("");
            return format!("{v} {state}").trim().to_string();
        }
    }
    let t = data.to_string();
    t.chars().take(120).collect()
}

fn disk_free(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct for a NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut s) == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
    }
}

#[derive(Deserialize, Default)]
pub struct MetersQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    sort: String,
}

pub async fn meters(
    State(st): St,
    Extension(s): Extension<Signed>,
    Query(q): Query<MetersQuery>,
) -> Response {
    let mut rows = match st.reader.run(store::meters).await {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let needle = q.q.trim().to_lowercase();
    if !needle.is_empty() {
        rows.retain(|m| {
            m.id.as_str().to_lowercase().contains(&needle)
                || m.name
                    .as_deref()
                    .unwrap_or("")
                    .to_lowercase()
                    .contains(&needle)
                || m.phone.as_deref().unwrap_or("").contains(&needle)
        });
    }
    match q.sort.as_str() {
        "name" => rows.sort_by(|a, b| a.name.cmp(&b.name)),
        "balance" => rows.sort_by_key(super::money::balance_key),
        "seen" => rows.sort_by_key(|m| std::cmp::Reverse(m.last_seen)),
        _ => {}
    }
    let low = st.dashboard.settings.low_balance_wh;
    let zone = st.dashboard.settings.zone;
    let now = super::now();
    let mut h = Html::default();
    h.raw("<h1>Meters</h1><form class=\"search\" method=\"get\"><input type=\"search\" name=\"q\" placeholder=\"Search id, name, phone\" value=\"")
        .text(&q.q)
        .raw("\"><input type=\"hidden\" name=\"sort\" value=\"")
        .text(&q.sort)
        .raw("\"><button>Search</button></form>");
    h.raw("<div class=\"scroll\"><table id=\"meters\" data-live><thead><tr>");
    for (key, label) in [
        ("id", "Meter"),
        ("name", "Name"),
        ("balance", "Balance"),
        ("seen", "Last seen"),
    ] {
        h.raw("<th><a href=\"/dashboard/meters?q=")
            .text(&urlenc(&q.q))
            .raw("&amp;sort=")
            .raw(key)
            .raw("\">")
            .raw(label)
            .raw(if q.sort == key || (key == "id" && q.sort.is_empty()) {
                " ▾"
            } else {
                ""
            })
            .raw("</a></th>");
    }
    h.raw("<th class=\"num\">Debt</th><th>Tariff</th><th>Status</th></tr></thead><tbody>");
    for m in &rows {
        h.raw("<tr><td><a href=\"/dashboard/meters/")
            .text(m.id.as_str())
            .raw("\">")
            .text(m.id.as_str())
            .raw("</a></td><td>");
        h.text(m.name.as_deref().unwrap_or(""))
            .raw("</td><td class=\"num\">");
        h.text(&super::money::balance_text(m)).raw("</td><td>");
        h.text(&m.last_seen.map_or("never".into(), |t| ago(now, t)));
        h.raw("<span class=\"sub\">")
            .text(&m.last_seen.map_or(String::new(), |t| local_time(zone, t)))
            .raw("</span></td><td class=\"num\">");
        let debt = super::money::debt_cents(m);
        h.text(&if debt > 0 { kes(debt) } else { "–".into() })
            .raw("</td><td>")
            .text(&super::money::tariff_text(m, &st.pricing))
            .raw("</td><td>");
        badges(
            &mut h,
            m,
            Badges {
                online: st.hub.is_connected(&m.id),
                low: m.balance_wh < low,
            },
        );
        h.raw("</td></tr>");
    }
    if rows.is_empty() {
        h.raw("<tr><td colspan=\"7\" class=\"muted\">No meters match.</td></tr>");
    }
    h.raw("</tbody></table></div>");
    html_page(page(
        "Meters",
        Some(Tab::Meters),
        Some(&s.csrf),
        s.flash.as_deref(),
        &h.into_string(),
    ))
}

fn urlenc(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|e| e[1..].to_string())
        .unwrap_or_default()
}

pub(super) fn parse_meter(id: &str) -> Result<MeterId, Response> {
    MeterId::parse(id).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

struct MeterView {
    m: Option<MeterRow>,
    payments: Vec<PaymentRow>,
    events: Vec<store::Event>,
    alerts: Vec<store::Event>,
    open: Vec<super::alerts::Open>,
    statement: Option<Result<crate::statement::Statement, crate::statement::StatementError>>,
}

pub async fn meter(
    State(st): St,
    Extension(s): Extension<Signed>,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Response {
    let id = match parse_meter(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let (lookup, gw) = (id.clone(), st.gateway_id.clone());
    let month = super::money::month_of(&q, st.dashboard.settings.zone, super::now());
    let pricing = st.pricing.clone();
    let r = st
        .reader
        .run(move |c| {
            let m = store::meter(c, &lookup)?;
            let statement = m
                .as_ref()
                .map(|_| crate::statement::build(c, &pricing, &lookup, &month));
            let mut open: Vec<super::alerts::Open> = store::open_alerts(c)?
                .into_iter()
                .filter(|((m, _), _)| m == lookup.as_str())
                .map(|((m, a), at)| (m, a, at))
                .collect();
            open.sort_by_key(|o| std::cmp::Reverse(o.2));
            Ok(MeterView {
                m,
                payments: store::payments_of(c, &lookup)?,
                events: store::recent_events(c, &gw, None, Some(&lookup), 15)?,
                alerts: store::recent_events(c, &gw, Some("alert"), Some(&lookup), 10)?,
                open,
                statement,
            })
        })
        .await;
    let v = match r {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    let Some(m) = v.m else {
        return error(StatusCode::NOT_FOUND, format!("unknown meter {id}"));
    };
    let zone = st.dashboard.settings.zone;
    let now = super::now();
    let (_, _, day_start, month_start) = today(zone, now);
    let csrf = csrf_field(&s.csrf);
    let base = format!("/dashboard/meters/{}", esc(m.id.as_str()));
    let mut h = Html::default();
    h.raw("<p class=\"crumb\"><a href=\"/dashboard/meters\">Meters</a> › </p><h1>")
        .text(m.id.as_str())
        .raw(" <span class=\"sub\">")
        .text(m.name.as_deref().unwrap_or(""))
        .raw("</span></h1>");
    h.raw("<div id=\"summary\" class=\"stats\" data-live>");
    h.raw(
        "<div class=\"stat big\"><span class=\"k\">Balance</span><span class=\"v\" id=\"balance\">",
    )
    .text(&super::money::balance_text(&m))
    .raw("</span><span class=\"n\">");
    badges(
        &mut h,
        &m,
        Badges {
            online: st.hub.is_connected(&m.id),
            low: m.balance_wh < st.dashboard.settings.low_balance_wh,
        },
    );
    h.raw("</span></div>");
    stat(
        &mut h,
        "used",
        "Consumed in all",
        &format!("{} kWh", kwh(m.total_consumed_wh)),
        "since provisioning",
    );
    stat(
        &mut h,
        "seen",
        "Last report",
        &m.last_seen.map_or("never".into(), |t| ago(now, t)),
        &m.last_seen.map_or(String::new(), |t| local_time(zone, t)),
    );
    stat(
        &mut h,
        "phone",
        "Phone",
        m.phone.as_deref().unwrap_or("–"),
        "",
    );
    stat(
        &mut h,
        "debt",
        "Debt",
        &format!("KES {}", kes(super::money::debt_cents(&m))),
        &format!("{} kWh of energy left", kwh(m.balance_wh)),
    );
    stat(
        &mut h,
        "tariff",
        "Tariff",
        &super::money::tariff_text(&m, &st.pricing),
        "",
    );
    h.raw("</div>");
    h.raw("<section class=\"card\"><h2>Consumption</h2><div class=\"seg\" id=\"range\">")
        .raw("<button type=\"button\" data-step=\"hour\" class=\"on\">Today, by hour</button>")
        .raw("<button type=\"button\" data-step=\"day\">This month, by day</button></div>")
        .raw("<div id=\"chart\" data-meter=\"")
        .text(m.id.as_str())
        .raw("\" data-day=\"")
        .text(&day_start.to_string())
        .raw("\" data-month=\"")
        .text(&month_start.to_string())
        .raw("\" data-month-end=\"")
        .text(&zone.midnight(next_month(zone.date(now))).to_string())
        .raw("\" data-offset=\"")
        .text(&zone.offset_minutes().to_string())
        .raw("\"><p class=\"nodata\">no data</p></div></section>");
    h.raw("<div class=\"cols\">");
    // Actions.
    h.raw("<section class=\"card\"><h2>Cash top-up</h2><form method=\"post\" id=\"topup\" action=\"").raw(&base).raw("/topup\">").raw(&csrf)
        .raw("<label>Amount (KES)<input name=\"amount\" id=\"amount\" inputmode=\"decimal\" required></label>")
        .raw("<label>Receipt / reference<input name=\"reference\" id=\"reference\" required maxlength=\"100\"></label>")
        .raw("<button>Top up</button></form></section>");
    h.raw("<section class=\"card\"><h2>Relay</h2><form method=\"post\" id=\"relay\" action=\"").raw(&base).raw("/relay\">").raw(&csrf)
        .raw("<label>Reason<input name=\"reason\" id=\"reason\" required maxlength=\"200\" placeholder=\"maintenance\"></label>")
        .raw("<div class=\"row\"><button name=\"relay\" value=\"off\" id=\"relay-off\" class=\"danger\">Cut (off)</button>")
        .raw("<button name=\"relay\" value=\"on\" id=\"relay-on\">Restore (on)</button></div></form>")
        .raw("<p class=\"muted\">Sent to the meter if it is connected; the ledger's own command follows the next balance change.</p></section>");
    h.raw("<section class=\"card\"><h2>Details</h2><form method=\"post\" id=\"details\" action=\"").raw(&base).raw("/details\">").raw(&csrf)
        .raw("<label>Name<input name=\"name\" maxlength=\"100\" value=\"").text(m.name.as_deref().unwrap_or("")).raw("\"></label>")
        .raw("<label>Phone<input name=\"phone\" maxlength=\"100\" value=\"").text(m.phone.as_deref().unwrap_or("")).raw("\"></label>")
        .raw("<button>Save</button></form>")
        .raw("<form method=\"post\" class=\"secret\" action=\"").raw(&base).raw("/secret\">").raw(&csrf)
        .raw("<button class=\"danger\" id=\"rotate\" data-confirm=\"Replace this meter's secret? The meter must be given the new one.\">Rotate secret</button></form></section>");
    h.raw("</div><div class=\"cols\">");
    super::money::card(&mut h, &m, &st.pricing, &s.csrf, &base);
    if let Some(statement) = &v.statement {
        super::money::statement(&mut h, zone, statement);
    }
    h.raw("</div><div class=\"cols\"><section class=\"card\" id=\"payments\" data-live><h2>Payments</h2>");
    payments_table(&mut h, zone, v.payments.iter().rev().take(20), false);
    h.raw("</section><section class=\"card\" id=\"events\" data-live><h2>Events</h2><ul class=\"list\">");
    for e in &v.events {
        h.raw("<li><span class=\"t\">")
            .text(&local_time(zone, e.at))
            .raw("</span> <b>")
            .text(&e.kind)
            .raw("</b> ");
        h.text(&event_line(zone, e)).raw("</li>");
    }
    h.raw("</ul></section></div><section class=\"card\" id=\"meter-alerts\" data-live><h2>Alerts</h2>");
    super::alerts::panel(&mut h, zone, now, &v.open, &v.alerts, false);
    h.raw("</section>");
    html_page(page(
        m.id.as_str(),
        Some(Tab::Meters),
        Some(&s.csrf),
        s.flash.as_deref(),
        &h.into_string(),
    ))
}

/// The first day of the month after `date`'s.
fn next_month(date: crate::tariff::calendar::LocalDate) -> crate::tariff::calendar::LocalDate {
    let (year, month) = if date.month == 12 {
        (date.year + 1, 1)
    } else {
        (date.year, date.month + 1)
    };
    crate::tariff::calendar::LocalDate {
        year,
        month,
        day: 1,
    }
}

fn event_line(zone: crate::tariff::calendar::SiteZone, e: &store::Event) -> String {
    let d = &e.data;
    let field = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    match e.kind.as_str() {
        "status" => match (field("status"), field("source")) {
            (st, src) if src == "connection" => format!("{st} (connection)"),
            (st, _) if !st.is_empty() => st,
            _ => describe(d),
        },
        "meter" => field("action").replace('_', " "),
        "alert" => super::alerts::line(zone, d),
        "consumption" => format!(
            "{} Wh used, balance {} kWh",
            d.get("debitWh").and_then(|v| v.as_i64()).unwrap_or(0),
            kwh(d.get("balanceWh").and_then(|v| v.as_i64()).unwrap_or(0))
        ),
        "payment" => format!(
            "KES {} ({})",
            d.get("amount").map(|v| v.to_string()).unwrap_or_default(),
            d.get("source").and_then(|v| v.as_str()).unwrap_or("")
        ),
        _ => describe(d),
    }
}

fn payments_table<'a>(
    h: &mut Html,
    zone: crate::tariff::calendar::SiteZone,
    rows: impl Iterator<Item = &'a PaymentRow>,
    with_meter: bool,
) {
    h.raw("<div class=\"scroll\"><table><thead><tr><th>When</th>");
    if with_meter {
        h.raw("<th>Meter</th>");
    }
    h.raw("<th>Source</th><th>Reference</th><th class=\"num\">KES</th><th class=\"num\">kWh</th></tr></thead><tbody>");
    let mut any = false;
    for p in rows {
        any = true;
        h.raw("<tr><td>").text(&local_time(zone, p.at)).raw("</td>");
        if with_meter {
            h.raw("<td><a href=\"/dashboard/meters/")
                .text(&p.meter)
                .raw("\">")
                .text(&p.meter)
                .raw("</a></td>");
        }
        h.raw("<td>")
            .text(&p.source)
            .raw("</td><td>")
            .text(&p.reference)
            .raw("</td><td class=\"num\">");
        h.text(&kes(p.amount_cents))
            .raw("</td><td class=\"num\">")
            .text(&kwh(p.credit_wh))
            .raw("</td></tr>");
    }
    if !any {
        h.raw("<tr><td colspan=\"6\" class=\"muted\">No payments.</td></tr>");
    }
    h.raw("</tbody></table></div>");
}

pub(super) fn back(st: &ApiState, s: &Signed, to: &str, message: String) -> Response {
    st.dashboard.sessions.set_flash(&s.id, message);
    Redirect::to(to).into_response()
}

/// An action refused for its input: a warn line, a counter, and the reason shown on the page.
pub(super) fn refused(
    st: &ApiState,
    s: &Signed,
    to: &str,
    reason: &'static str,
    message: String,
) -> Response {
    st.metrics
        .inc("umeme_dashboard_refused_total", &[("reason", reason)]);
    warn!(reason, to = %Untrusted(to), message = %Untrusted(&message), "dashboard action refused");
    back(st, s, to, message)
}

pub(super) fn meter_url(id: &MeterId) -> String {
    format!("/dashboard/meters/{}", urlenc(id.as_str()))
}

pub async fn topup(
    State(st): St,
    Extension(s): Extension<Signed>,
    Extension(f): Extension<Form>,
    Path(id): Path<String>,
) -> Response {
    let meter = match parse_meter(&id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let to = meter_url(&meter);
    let Some(cents) = f
        .get("amount")
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(kes_to_cents)
    else {
        return refused(
            &st,
            &s,
            &to,
            "bad_amount",
            "Top-up refused: the amount must be a positive KES amount with at most two decimals."
                .into(),
        );
    };
    let credit = Credit {
        meter: meter.clone(),
        source: "cash".into(),
        reference: f.get("reference").trim().to_string(),
        amount_cents: cents,
        at: super::now(),
        phone: None,
    };
    let msg = match st.writer.submit(Op::Credit(credit)).await {
        Ok(Outcome::Credited { payment, duplicate }) => {
            st.metrics.inc(
                "umeme_payments_total",
                &[
                    ("source", "cash"),
                    ("outcome", if duplicate { "duplicate" } else { "credited" }),
                ],
            );
            info!(meter = %meter, reference = %Untrusted(&payment.reference), cents, "dashboard cash top-up");
            if duplicate {
                format!(
                    "Receipt {} was already credited; nothing added.",
                    payment.reference
                )
            } else {
                format!(
                    "KES {} credited ({} kWh).",
                    kes(payment.amount_cents),
                    kwh(payment.credit_wh)
                )
            }
        }
        Ok(_) => "Top-up: unexpected ledger answer.".into(),
        Err(
            e @ (LedgerError::BadReference
            | LedgerError::ReferenceConflict
            | LedgerError::UnknownMeter(_)),
        ) => {
            return refused(
                &st,
                &s,
                &to,
                "topup_refused",
                format!("Top-up refused: {e}."),
            );
        }
        Err(e) => return internal(e),
    };
    back(&st, &s, &to, msg)
}

pub async fn relay(
    State(st): St,
    Extension(s): Extension<Signed>,
    Extension(f): Extension<Form>,
    Path(id): Path<String>,
) -> Response {
    let meter = match parse_meter(&id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let to = meter_url(&meter);
    let state = f.get("relay");
    let reason = f.get("reason").trim();
    if !matches!(state, "on" | "off")
        || reason.is_empty()
        || reason.chars().count() > 200
        || reason.chars().any(char::is_control)
    {
        return refused(
            &st,
            &s,
            &to,
            "bad_relay",
            "Relay: choose on or off and give a reason (at most 200 characters).".into(),
        );
    }
    let payload = json!({"relay": state, "reason": reason}).to_string();
    let sent = st.hub.send(
        &meter,
        Outgoing::Command {
            leaf: "relay",
            payload: payload.into(),
        },
    );
    info!(meter = %meter, relay = state, reason = %Untrusted(reason), sent, "dashboard relay command");
    let msg = if sent {
        format!("Relay {state} sent to {meter}.")
    } else {
        format!("{meter} is not connected: relay command not sent.")
    };
    back(&st, &s, &to, msg)
}

pub async fn rotate_secret(
    State(st): St,
    Extension(s): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let meter = match parse_meter(&id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let secret = crate::auth::generate_secret();
    let hash = tokio::task::spawn_blocking({
        let s = secret.clone();
        move || crate::auth::hash_secret(&s)
    })
    .await
    .unwrap_or_default();
    let op = Op::SetSecret {
        meter: meter.clone(),
        secret_hash: hash,
        at: super::now(),
    };
    match st.writer.submit(op).await {
        Ok(_) => {}
        Err(e @ LedgerError::UnknownMeter(_)) => {
            return error(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => return internal(e),
    }
    info!(meter = %meter, "dashboard rotated a meter secret");
    // Shown on this answer only (a POST answer, not stored, not cached).
    let mut h = Html::default();
    h.raw("<section class=\"card\"><h1>New secret for ").text(meter.as_str()).raw("</h1>")
        .raw("<p>Enter it in the meter's settings now: it is shown once and cannot be read again. The meter's current session was closed.</p>")
        .raw("<p><code id=\"new-secret\" class=\"secret\">").text(&secret).raw("</code></p>")
        .raw("<p><a href=\"").raw(&meter_url(&meter)).raw("\">Back to the meter</a></p></section>");
    html_page(page(
        "New secret",
        Some(Tab::Meters),
        Some(&s.csrf),
        None,
        &h.into_string(),
    ))
}

pub async fn details(
    State(st): St,
    Extension(s): Extension<Signed>,
    Extension(f): Extension<Form>,
    Path(id): Path<String>,
) -> Response {
    let meter = match parse_meter(&id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let to = meter_url(&meter);
    let clean = |v: &str| {
        let v = v.trim();
        (!v.is_empty()).then(|| v.to_string())
    };
    let (name, phone) = (clean(f.get("name")), clean(f.get("phone")));
    for v in [&name, &phone].into_iter().flatten() {
        if v.chars().count() > 100 || v.chars().any(char::is_control) {
            return refused(
                &st,
                &s,
                &to,
                "bad_details",
                "Name and phone must be at most 100 printable characters.".into(),
            );
        }
    }
    let op = Op::SetMeterDetails {
        meter,
        name,
        phone,
        at: super::now(),
    };
    match st.writer.submit(op).await {
        Ok(_) => back(&st, &s, &to, "Details saved.".into()),
        Err(e @ LedgerError::UnknownMeter(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => internal(e),
    }
}

pub async fn payments(State(st): St, Extension(s): Extension<Signed>) -> Response {
    let r = st
        .reader
        .run(|c| {
            Ok((
                store::payments_between(c, 0, i64::MAX, 200)?,
                store::unapplied(c, true)?,
            ))
        })
        .await;
    let (rows, unapplied) = match r {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    let zone = st.dashboard.settings.zone;
    let (_, _, _, month_start) = today(zone, super::now());
    let this_month = zone.date(month_start);
    let mut h = Html::default();
    h.raw("<h1>Payments</h1><section class=\"card\"><h2>Export</h2><form method=\"get\" action=\"/dashboard/export/payments.csv\" class=\"row\">")
        .raw("<label>From<input type=\"date\" name=\"from\" value=\"")
        .text(&format!("{:04}-{:02}-01", this_month.year, this_month.month))
        .raw("\"></label><label>To (inclusive)<input type=\"date\" name=\"to\"></label><button id=\"export-payments\">Payments CSV</button></form>")
        .raw("<form method=\"get\" action=\"/dashboard/export/month.csv\" class=\"row\"><label>Month<input type=\"month\" name=\"month\" value=\"")
        .text(&format!("{:04}-{:02}", this_month.year, this_month.month))
        .raw("\"></label><button id=\"export-month\">Monthly summary CSV</button></form></section>");
    h.raw("<section class=\"card\" id=\"unapplied\" data-live><h2>Unapplied payments</h2>");
    if unapplied.is_empty() {
        h.raw("<p class=\"muted\">None: every payment credited a meter.</p>");
    } else {
        h.raw("<div class=\"scroll\"><table><thead><tr><th>Received</th><th>Source</th><th>Reference</th><th>Account given</th><th class=\"num\">KES</th><th>Apply to meter</th></tr></thead><tbody>");
        for u in &unapplied {
            h.raw("<tr><td>")
                .text(&local_time(zone, u.received_at))
                .raw("</td><td>")
                .text(&u.source)
                .raw("</td><td>")
                .text(&u.reference);
            h.raw("</td><td>")
                .text(&u.account)
                .raw("</td><td class=\"num\">")
                .text(&kes(u.amount_cents))
                .raw("</td><td>");
            h.raw("<form method=\"post\" action=\"/dashboard/payments/apply\" class=\"inline\">").raw(&csrf_field(&s.csrf))
                .raw("<input type=\"hidden\" name=\"reference\" value=\"").text(&u.reference).raw("\">")
                .raw("<input type=\"hidden\" name=\"source\" value=\"").text(&u.source).raw("\">")
                .raw("<input name=\"meter\" placeholder=\"meter\" required size=\"10\"><button>Apply</button></form></td></tr>");
        }
        h.raw("</tbody></table></div>");
    }
    h.raw(
        "</section><section class=\"card\" id=\"all-payments\" data-live><h2>Latest payments</h2>",
    );
    payments_table(&mut h, zone, rows.iter(), true);
    h.raw("</section>");
    html_page(page(
        "Payments",
        Some(Tab::Payments),
        Some(&s.csrf),
        s.flash.as_deref(),
        &h.into_string(),
    ))
}

pub async fn apply(
    State(st): St,
    Extension(s): Extension<Signed>,
    Extension(f): Extension<Form>,
) -> Response {
    let to = "/dashboard/payments";
    let meter = match MeterId::parse(f.get("meter").trim()) {
        Ok(m) => m,
        Err(e) => return refused(&st, &s, to, "bad_meter_id", format!("Apply refused: {e}.")),
    };
    let source = Some(f.get("source").to_string()).filter(|v| !v.is_empty());
    let op = Op::ApplyUnapplied {
        reference: f.get("reference").to_string(),
        source,
        meter: meter.clone(),
        at: super::now(),
    };
    let msg = match st.writer.submit(op).await {
        Ok(Outcome::Credited { payment, .. }) => {
            info!(meter = %meter, reference = %Untrusted(&payment.reference), "dashboard applied an unapplied payment");
            format!("Payment {} credited to {meter}.", payment.reference)
        }
        Ok(_) => "Apply: unexpected ledger answer.".into(),
        Err(
            e @ (LedgerError::NotUnapplied(_)
            | LedgerError::UnknownMeter(_)
            | LedgerError::AlreadyApplied { .. }
            | LedgerError::AmbiguousReference { .. }),
        ) => return refused(&st, &s, to, "apply_refused", format!("Apply refused: {e}.")),
        Err(e) => return internal(e),
    };
    back(&st, &s, to, msg)
}

#[derive(Deserialize, Default)]
pub struct RangeQuery {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    pub(super) month: String,
}

fn csv_response(name: &str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

pub(super) fn bad_range(st: &ApiState, msg: &str) -> Response {
    st.metrics
        .inc("umeme_dashboard_refused_total", &[("reason", "bad_range")]);
    error(StatusCode::BAD_REQUEST, msg)
}

/// `GET /dashboard/export/payments.csv?from=YYYY-MM-DD&to=YYYY-MM-DD` (local dates, `to`
/// inclusive; either may be empty).
pub async fn export_payments(State(st): St, Query(q): Query<RangeQuery>) -> Response {
    use crate::tariff::calendar::LocalDate;
    let zone = st.dashboard.settings.zone;
    let parse = |s: &str| -> Result<Option<LocalDate>, ()> {
        if s.is_empty() {
            Ok(None)
        } else {
            LocalDate::parse(s).map(Some).ok_or(())
        }
    };
    let (Ok(from), Ok(to)) = (parse(&q.from), parse(&q.to)) else {
        return bad_range(&st, "from and to must be dates YYYY-MM-DD");
    };
    let from_ms = from.map_or(0, |d| zone.midnight(d));
    let to_ms = to.map_or(i64::MAX, |d| {
        zone.midnight(LocalDate::from_days(d.days() + 1))
    });
    let r = st
        .dashboard
        .settings
        .export_reader
        .run(move |c| store::payments_between(c, from_ms, to_ms, usize::MAX >> 1))
        .await;
    let mut rows = match r {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    rows.reverse();
    let mut csv = Csv::default();
    csv.row(&[
        "time",
        "meter",
        "source",
        "reference",
        "amount_kes",
        "credit_wh",
        "balance_after_wh",
    ]);
    for p in &rows {
        csv.cells(vec![
            Text(local_time(zone, p.at)),
            Text(p.meter.clone()),
            Text(p.source.clone()),
            Text(p.reference.clone()),
            Num(decimal(p.amount_cents)),
            Num(p.credit_wh.to_string()),
            Num(p.balance_after_wh.to_string()),
        ]);
    }
    csv_response("payments.csv", csv.into_string())
}

/// `GET /dashboard/export/month.csv?month=YYYY-MM`: per meter, the month's statement in KES
/// when the site configured `[[tariffs]]` ([`super::money::export_statements`]); else energy,
/// payments and the balance at both ends of the month in Wh.
pub async fn export_month(State(st): St, Query(q): Query<RangeQuery>) -> Response {
    use crate::tariff::calendar::LocalDate;
    let zone = st.dashboard.settings.zone;
    let Some(first) = LocalDate::parse(&format!("{}-01", q.month)).filter(|_| q.month.len() == 7)
    else {
        return bad_range(&st, "month must be YYYY-MM");
    };
    if st.pricing.configured() {
        return match super::money::export_statements(&st, q.month.clone()).await {
            // `month` is a checked YYYY-MM here.
            Ok(csv) => csv_response(&format!("statements-{}.csv", q.month), csv.into_string()),
            Err(r) => r,
        };
    }
    let next = next_month(first);
    let (from, to) = (zone.midnight(first), zone.midnight(next));
    let rows = match st
        .dashboard
        .settings
        .export_reader
        .run(move |c| store::period_summary(c, from, to))
        .await
    {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut csv = Csv::default();
    csv.row(&[
        "month",
        "meter",
        "name",
        "energy_wh",
        "payments",
        "paid_kes",
        "credit_wh",
        "opening_balance_wh",
        "closing_balance_wh",
    ]);
    let opt = |v: Option<i64>| Num(v.map_or(String::new(), |v| v.to_string()));
    for r in &rows {
        csv.cells(vec![
            Text(q.month.clone()),
            Text(r.meter.clone()),
            Text(r.name.clone().unwrap_or_default()),
            Num(r.energy_wh.to_string()),
            Num(r.payments.to_string()),
            Num(decimal(r.paid_cents)),
            Num(r.credit_wh.to_string()),
            opt(r.opening_wh),
            opt(r.closing_wh),
        ]);
    }
    // `month` is a checked YYYY-MM here (it parsed as a date).
    csv_response(&format!("month-{}.csv", q.month), csv.into_string())
}
