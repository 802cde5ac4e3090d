//! Alerts on the dashboard: the alert store's open episodes and events in plain words, and the
//! site's daily loss chart (from [`crate::alerts::site_days`]). Every value through
//! [`Html::text`] / [`esc`].

use serde_json::Value;

use super::html::{ago, local_time, Html};
use super::pages::bar_chart;
use crate::alerts::SiteDay;
use crate::store::Event;
use crate::tariff::calendar::{LocalDate, SiteZone};

/// An alert's name as an operator reads it.
pub fn words(name: &str) -> String {
    match name {
        "spike" => "Consumption far above this meter's usual".into(),
        "bypass" => "Power drawn while the relay is off (tamper or bypass)".into(),
        "no_consumption" => "No consumption for a long time while the relay is on".into(),
        "register_backwards" => "Energy register went backwards".into(),
        "silent" => "Meter silent".into(),
        "site_loss" => "Site loss above tolerance".into(),
        "power_trip" => "Power limit tripped".into(),
        "low_balance" => "Low balance".into(),
        "balance_exhausted" => "Balance used up".into(),
        other => other.replace('_', " "),
    }
}

fn num(d: &Value, k: &str) -> Option<f64> {
    d.get(k).and_then(Value::as_f64)
}

/// The facts of a raised alert worth a glance (the rest is in the event).
fn facts(d: &Value) -> Option<String> {
    match d.get("alert").and_then(Value::as_str)? {
        "spike" => Some(format!(
            "{} Wh in one hour, over {} Wh (usual {} Wh)",
            num(d, "wh")?,
            num(d, "thresholdWh")?,
            num(d, "medianWh")?
        )),
        "bypass" => Some(format!("{} W with the relay off", num(d, "powerW")?)),
        "site_loss" => Some(format!(
            "{}: {:.1} % of the supply lost ({:.2} kWh)",
            d.get("day").and_then(Value::as_str)?,
            num(d, "lossShare")? * 100.0,
            num(d, "lossWh")? / 1000.0
        )),
        _ => None,
    }
}

/// One alert event in a line: what, raised or resolved (with since when), and its facts.
pub fn line(zone: SiteZone, d: &Value) -> String {
    let name = d.get("alert").and_then(Value::as_str).unwrap_or("alert");
    let mut s = words(name);
    match d.get("state").and_then(Value::as_str) {
        Some("raised") => s.push_str(": raised"),
        Some("resolved") => {
            s.push_str(": resolved");
            if let Some(since) = d.get("since").and_then(Value::as_i64) {
                s.push_str(&format!(" (raised {})", local_time(zone, since)));
            }
        }
        _ => {}
    }
    if let Some(f) = facts(d) {
        s.push_str(" — ");
        s.push_str(&f);
    }
    s
}

/// An open episode: `(meter, or "" for the site; alert name; raised at)`.
pub type Open = (String, String, i64);

/// The open episodes (newest first), then the recent alert events; `with_meter` links each
/// to its meter (the overview).
pub fn panel(
    h: &mut Html,
    zone: SiteZone,
    now: i64,
    open: &[Open],
    recent: &[Event],
    with_meter: bool,
) {
    h.raw("<h3>Open now</h3>");
    if open.is_empty() {
        h.raw("<p class=\"muted\" id=\"no-open-alerts\">Nothing open.</p>");
    } else {
        h.raw("<ul class=\"list open-alerts\">");
        for (meter, alert, at) in open {
            h.raw("<li><span class=\"b bad\">open</span> ");
            if with_meter {
                if meter.is_empty() {
                    h.raw("<b>Site</b> ");
                } else {
                    h.raw("<a href=\"/dashboard/meters/")
                        .text(meter)
                        .raw("\">")
                        .text(meter)
                        .raw("</a> ");
                }
            }
            h.text(&words(alert))
                .raw(" <span class=\"t\">since ")
                .text(&local_time(zone, *at))
                .raw(" (")
                .text(&ago(now, *at))
                .raw(")</span></li>");
        }
        h.raw("</ul>");
    }
    h.raw("<h3>Recent</h3>");
    if recent.is_empty() {
        h.raw("<p class=\"muted\">No alerts.</p>");
        return;
    }
    h.raw("<ul class=\"list recent-alerts\">");
    for a in recent {
        h.raw("<li><span class=\"t\">")
            .text(&local_time(zone, a.at))
            .raw("</span> ");
        if with_meter {
            match &a.meter {
                Some(m) => {
                    h.raw("<a href=\"/dashboard/meters/")
                        .text(m)
                        .raw("\">")
                        .text(m)
                        .raw("</a> ");
                }
                None => {
                    h.raw("<b>Site</b> ");
                }
            }
        }
        h.text(&line(zone, &a.data)).raw("</li>");
    }
    h.raw("</ul>");
}

/// The daily loss chart: kWh lost per day (supply minus the other meters), days without a
/// supply at 0; the newest day with a supply in words below.
pub fn loss_chart(h: &mut Html, days: &[SiteDay]) {
    h.raw("<h2>Site loss by day, last 30 days</h2>");
    let Some(latest) = days.iter().rev().find(|d| d.main_wh.is_some()) else {
        h.raw("<p class=\"muted\" id=\"no-loss\">No main supply yet: mark the bulk meter with <code>umeme-gateway meter set METER --main</code> or enter the day's reading (<code>umeme-gateway site reading</code>).</p>");
        return;
    };
    let points: Vec<(String, f64)> = days
        .iter()
        .map(|d| {
            let label = LocalDate::parse(&d.day).map_or(String::new(), |x| x.day.to_string());
            (label, d.loss_wh.unwrap_or(0).max(0) as f64 / 1000.0)
        })
        .collect();
    h.raw(&bar_chart(&points, "kWh lost"));
    let share = latest
        .loss_share
        .map_or(String::new(), |s| format!(" ({:.1} %)", s * 100.0));
    h.raw("<p class=\"muted\" id=\"loss-latest\">")
        .text(&format!(
            "{}: supply {:.2} kWh ({}), meters {:.2} kWh, loss {:.2} kWh{share}",
            latest.day,
            latest.main_wh.unwrap_or(0) as f64 / 1000.0,
            if latest.main_source == Some("reading") {
                "reading by hand"
            } else {
                "main meter"
            },
            latest.sub_wh as f64 / 1000.0,
            latest.loss_wh.unwrap_or(0) as f64 / 1000.0,
        ))
        .raw("</p>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_resolved_alert_reads_in_plain_words_with_when_it_was_raised() {
        let d = json!({"alert": "bypass", "state": "resolved", "since": 0, "powerW": 800.0});
        assert_eq!(
            line(SiteZone::NAIROBI, &d),
            "Power drawn while the relay is off (tamper or bypass): resolved (raised 1970-01-01 03:00) — 800 W with the relay off"
        );
        assert_eq!(words("made_up_kind"), "made up kind");
    }
}
