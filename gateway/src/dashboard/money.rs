//! Money on the dashboard (issue 16's ledger): balance in KES, debt and tariff of a meter, the
//! tariff selector and emergency credit (the same writer ops as `meter set --tariff` and
//! `POST /api/meters/{id}/emergency`), the month's statement, and the monthly export as
//! statements when the site configured `[[tariffs]]`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Extension;
use tracing::info;

use super::csv::{
    decimal,
    Cell::{Num, Text},
    Csv,
};
use super::html::{csrf_field, kes, kwh, local_time, Html};
use super::pages::{back, internal, meter_url, parse_meter, refused, RangeQuery};
use super::session::Signed;
use super::Form;
use crate::api::ApiState;
use crate::config::Tariff as Pricing;
use crate::statement::{Statement, StatementError};
use crate::store::MeterRow;
use crate::tariff::calendar::SiteZone;
use crate::writer::{LedgerError, Op};

type St = State<Arc<ApiState>>;

/// Debt owed in all (emergency, standing charges, arrears), in cents.
pub fn debt_cents(m: &MeterRow) -> i64 {
    m.money.as_ref().map_or(0, |a| a.debt.total())
}

/// The balance as the ledger keeps it: KES once the meter is on the money ledger, else kWh.
pub fn balance_text(m: &MeterRow) -> String {
    match &m.money {
        Some(a) => format!("KES {}", kes(a.balance_cents)),
        None => format!("{} kWh", kwh(m.balance_wh)),
    }
}

/// The meter's tariff, or the site's default by name.
pub fn tariff_text(m: &MeterRow, pricing: &Pricing) -> String {
    match &m.tariff {
        Some(t) => t.clone(),
        None => format!("{} (site default)", pricing.default_name()),
    }
}

/// What the meters table sorts "balance" by: net of debt, in cents where known.
pub fn balance_key(m: &MeterRow) -> i64 {
    match &m.money {
        Some(a) => a.balance_cents - a.debt.total(),
        None => m.balance_wh,
    }
}

/// The meter page's money card: debt by kind, the tariff selector, emergency credit.
pub fn card(h: &mut Html, m: &MeterRow, pricing: &Pricing, csrf: &str, base: &str) {
    h.raw("<section class=\"card\" id=\"money\"><h2>Money</h2><p>");
    h.raw("Balance <b id=\"balance-kes\">")
        .text(&balance_text(m))
        .raw("</b>, debt <b id=\"debt\">KES ")
        .text(&kes(debt_cents(m)))
        .raw("</b>");
    if let Some(a) = &m.money {
        if a.debt.total() > 0 {
            h.raw(" <span class=\"sub\">")
                .text(&format!(
                    "emergency {}, standing {}, arrears {}",
                    kes(a.debt.emergency),
                    kes(a.debt.standing),
                    kes(a.debt.arrears)
                ))
                .raw("</span>");
        }
        if a.emergency_armed {
            h.raw(" <span class=\"b warn\">emergency credit in use</span>");
        }
    }
    h.raw("</p><form method=\"post\" id=\"tariff\" action=\"")
        .raw(base)
        .raw("/tariff\" class=\"row\">")
        .raw(&csrf_field(csrf))
        .raw("<label>Tariff<select name=\"tariff\" id=\"tariff-select\">");
    let current = m.tariff.as_deref();
    h.raw("<option value=\"default\"")
        .raw(if current.is_none() { " selected" } else { "" })
        .raw(">")
        .text(&format!("{} (site default)", pricing.default_name()))
        .raw("</option>");
    for name in pricing.names() {
        h.raw("<option value=\"")
            .text(&name)
            .raw("\"")
            .raw(if current == Some(name.as_str()) {
                " selected"
            } else {
                ""
            })
            .raw(">")
            .text(&name)
            .raw("</option>");
    }
    h.raw("</select></label><button>Set tariff</button></form>")
        .raw("<form method=\"post\" id=\"emergency\" action=\"")
        .raw(base)
        .raw("/emergency\">")
        .raw(&csrf_field(csrf))
        .raw("<button id=\"emergency-grant\" data-confirm=\"Grant this meter its tariff's emergency credit?\">Grant emergency credit</button></form>")
        .raw("<p class=\"muted\">A tariff applies from the next report; the past keeps its price. Emergency credit is what the tenant's own request on the meter gives (refused when the tariff has none or it is in use).</p></section>");
}

/// The month's statement on the meter page.
pub fn statement(h: &mut Html, zone: SiteZone, s: &Result<Statement, StatementError>) {
    h.raw("<section class=\"card\" id=\"statement\" data-live><h2>Statement, ");
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            h.raw("this month</h2><p class=\"error\">")
                .text(&e.to_string())
                .raw("</p></section>");
            return;
        }
    };
    h.text(&s.month).raw("</h2>");
    if !s.adds_up() {
        h.raw("<p class=\"error\">This statement does not add up: events are missing or damaged (see the gateway's log).</p>");
    }
    let row = |h: &mut Html, k: &str, v: String| {
        h.raw("<tr><td>")
            .text(k)
            .raw("</td><td class=\"num\">")
            .text(&v)
            .raw("</td></tr>");
    };
    h.raw("<div class=\"scroll\"><table><tbody>");
    row(
        h,
        if s.opening_derived {
            "Opening balance (derived)"
        } else {
            "Opening balance"
        },
        format!("KES {}", kes(s.opening.balance_cents)),
    );
    row(
        h,
        "Opening debt",
        format!("KES {}", kes(s.opening.debt_cents)),
    );
    row(
        h,
        &format!("Payments ({})", s.payments.len()),
        format!("KES {}", kes(s.payments_cents)),
    );
    row(
        h,
        &format!("Energy ({} kWh)", kwh(s.energy_wh)),
        format!("KES {}", kes(s.consumption_debited_cents)),
    );
    row(
        h,
        "Standing charges",
        format!("KES {}", kes(s.standing_cents)),
    );
    if s.emergency_requests > 0 {
        row(
            h,
            "Emergency credit requests",
            s.emergency_requests.to_string(),
        );
    }
    row(
        h,
        "Closing balance",
        format!("KES {}", kes(s.closing.balance_cents)),
    );
    row(
        h,
        "Closing debt",
        format!("KES {}", kes(s.closing.debt_cents)),
    );
    h.raw("</tbody></table></div>");
    let lines: Vec<_> = s.energy.iter().chain(&s.charges).chain(&s.taxes).collect();
    if !lines.is_empty() {
        h.raw("<details><summary>Itemised (exact)</summary><div class=\"scroll\"><table><thead><tr><th>Tariff</th><th>Item</th><th class=\"num\">kWh</th><th class=\"num\">KES</th></tr></thead><tbody>");
        for l in lines {
            h.raw("<tr><td>")
                .text(&l.tariff)
                .raw("</td><td>")
                .text(&l.name)
                .raw("</td><td class=\"num\">")
                .text(&if l.wh != 0 { kwh(l.wh) } else { String::new() })
                .raw("</td><td class=\"num\">")
                .text(&l.kes)
                .raw("</td></tr>");
        }
        h.raw("</tbody></table></div></details>");
    }
    if !s.payments.is_empty() {
        h.raw("<p class=\"muted\">Payments: ");
        for (i, p) in s.payments.iter().enumerate() {
            if i > 0 {
                h.raw("; ");
            }
            h.text(&format!(
                "{} {} KES {}",
                local_time(zone, p.at),
                p.reference,
                kes(p.amount_cents)
            ));
        }
        h.raw("</p>");
    }
    h.raw("</section>");
}

/// `POST /dashboard/meters/{id}/tariff` with `tariff` (a configured name, or `default`).
pub async fn set_tariff(
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
    let chosen = f.get("tariff").trim();
    let tariff = (chosen != "default").then(|| chosen.to_string());
    let op = Op::SetTariff {
        meter: meter.clone(),
        tariff: tariff.clone(),
        at: super::now(),
    };
    match st.writer.submit(op).await {
        Ok(_) => {
            let name = tariff
                .unwrap_or_else(|| format!("{} (the site's default)", st.pricing.default_name()));
            info!(meter = %meter, tariff = %crate::untrusted::Untrusted(&name), "dashboard set a meter's tariff");
            back(&st, &s, &to, format!("{meter}: tariff {name}."))
        }
        Err(e @ (LedgerError::UnknownTariff { .. } | LedgerError::UnknownMeter(_))) => refused(
            &st,
            &s,
            &to,
            "tariff_refused",
            format!("Tariff refused: {e}."),
        ),
        Err(e) => internal(e),
    }
}

/// `POST /dashboard/meters/{id}/emergency`: `Op::Emergency`, as the admin API's.
pub async fn emergency(
    State(st): St,
    Extension(s): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let meter = match parse_meter(&id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let to = meter_url(&meter);
    let op = Op::Emergency {
        meter: meter.clone(),
        at: super::now(),
    };
    match st.writer.submit(op).await {
        Ok(_) => {
            info!(meter = %meter, "dashboard granted emergency credit");
            back(
                &st,
                &s,
                &to,
                format!("Emergency credit granted to {meter}."),
            )
        }
        Err(LedgerError::Emergency(why)) => refused(
            &st,
            &s,
            &to,
            "emergency_refused",
            format!("Emergency credit refused: {why}."),
        ),
        Err(e @ LedgerError::UnknownMeter(_)) => refused(
            &st,
            &s,
            &to,
            "emergency_refused",
            format!("Emergency credit refused: {e}."),
        ),
        Err(e) => internal(e),
    }
}

/// The monthly export as statements (one row per meter), for a site with `[[tariffs]]`.
pub async fn export_statements(st: &Arc<ApiState>, month: String) -> Result<Csv, Response> {
    let pricing = st.pricing.clone();
    let m = month.clone();
    let built = st
        .reader
        .run(move |c| {
            let rows = crate::store::meters(c)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let s = crate::statement::build(c, &pricing, &r.id, &m);
                    (r, s)
                })
                .collect::<Vec<_>>())
        })
        .await
        .map_err(internal)?;
    let mut csv = Csv::default();
    csv.row(&[
        "month",
        "meter",
        "name",
        "tariffs",
        "opening_balance_kes",
        "opening_debt_kes",
        "payments",
        "paid_kes",
        "energy_wh",
        "consumption_kes",
        "standing_kes",
        "emergency_requests",
        "closing_balance_kes",
        "closing_debt_kes",
        "adds_up",
    ]);
    for (r, s) in built {
        let s = match s {
            Ok(s) => s,
            Err(StatementError::BadMonth(m)) => {
                return Err(super::pages::bad_range(
                    st,
                    &format!("month must be YYYY-MM, got {m:?}"),
                ))
            }
            Err(e) => return Err(internal(e)),
        };
        let mut tariffs: Vec<&str> = s
            .energy
            .iter()
            .chain(&s.charges)
            .map(|l| l.tariff.as_str())
            .collect();
        tariffs.dedup();
        csv.cells(vec![
            Text(month.clone()),
            Text(r.id.to_string()),
            Text(r.name.clone().unwrap_or_default()),
            Text(tariffs.join(" ")),
            Num(decimal(s.opening.balance_cents)),
            Num(decimal(s.opening.debt_cents)),
            Num(s.payments.len().to_string()),
            Num(decimal(s.payments_cents)),
            Num(s.energy_wh.to_string()),
            Num(decimal(s.consumption_debited_cents)),
            Num(decimal(s.standing_cents)),
            Num(s.emergency_requests.to_string()),
            Num(decimal(s.closing.balance_cents)),
            Num(decimal(s.closing.debt_cents)),
            Text(if s.adds_up() { "yes" } else { "no" }.into()),
        ]);
    }
    Ok(csv)
}

/// `GET /dashboard/meters/{id}?month=` picks the statement's month.
pub fn month_of(q: &RangeQuery, zone: SiteZone, now: i64) -> String {
    if q.month.is_empty() {
        let d = zone.date(now);
        format!("{:04}-{:02}", d.year, d.month)
    } else {
        q.month.clone()
    }
}
