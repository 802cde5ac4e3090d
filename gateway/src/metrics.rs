//! Counters and gauges, rendered as Prometheus text at `GET /metrics`.
//!
//! Every refusal (bad password, ACL violation, malformed payload, hostile HTTP) increments a
//! counter here with a `reason` label, next to its `warn` log line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Help text for each metric family; a family not listed here renders without HELP.
const HELP: &[(&str, &str, &str)] = &[
    (
        "umeme_mqtt_connections_total",
        "counter",
        "Meter connections accepted (before CONNECT).",
    ),
    (
        "umeme_mqtt_connect_refused_total",
        "counter",
        "CONNECTs refused, by reason.",
    ),
    (
        "umeme_mqtt_tls_connections_total",
        "counter",
        "Meter connections that completed a TLS handshake on [broker] tls_listen.",
    ),
    (
        "umeme_mqtt_tls_handshake_failures_total",
        "counter",
        "TLS handshakes on the meter port that failed, by reason (timeout, alert, protocol, io).",
    ),
    (
        "umeme_mqtt_sessions",
        "gauge",
        "Meters connected and authenticated now.",
    ),
    (
        "umeme_mqtt_rejected_total",
        "counter",
        "Meter packets refused or dropped, by reason.",
    ),
    (
        "umeme_mqtt_reports_delayed_total",
        "counter",
        "Consumption reports over their meter's rate, handled late instead of dropped.",
    ),
    (
        "umeme_mqtt_warnings_suppressed_total",
        "counter",
        "Warnings about a meter not logged (over its per-minute budget); summarised in the log.",
    ),
    (
        "umeme_mqtt_reports_total",
        "counter",
        "Consumption reports applied, by firmware version and outcome.",
    ),
    (
        "umeme_mqtt_commands_sent_total",
        "counter",
        "Commands published to meters.",
    ),
    (
        "umeme_ota_chunks_total",
        "counter",
        "Firmware chunk requests answered, by result (data, busy, no_offer).",
    ),
    (
        "umeme_ota_status_total",
        "counter",
        "Firmware update status reports from meters, by state.",
    ),
    (
        "umeme_ledger_commits_total",
        "counter",
        "SQLite transactions committed by the ledger writer (each one fsync).",
    ),
    (
        "umeme_ledger_ops_total",
        "counter",
        "Ledger operations committed.",
    ),
    (
        "umeme_ledger_folds_total",
        "counter",
        "Folds of recent reports into the meters table (each its own commit).",
    ),
    (
        "umeme_ledger_folded_meters_total",
        "counter",
        "Meter rows brought up to date by folds.",
    ),
    (
        "umeme_ledger_errors_total",
        "counter",
        "Ledger operations that failed, by reason.",
    ),
    (
        "umeme_ledger_alerts_total",
        "counter",
        "Alerts raised, by kind.",
    ),
    (
        "umeme_alerts_total",
        "counter",
        "Alert episodes raised and resolved (spike, bypass, no_consumption, register_backwards, silent, site_loss), by alert and state.",
    ),
    (
        "umeme_alerts_open",
        "gauge",
        "Alert episodes open now, by alert (updated at every fold).",
    ),
    (
        "umeme_ledger_v1_balance_drift_total",
        "counter",
        "v1 reports whose remainingBalance disagreed with the ledger.",
    ),
    (
        "umeme_payments_total",
        "counter",
        "Payments credited, by source and outcome.",
    ),
    (
        "umeme_http_requests_total",
        "counter",
        "HTTP requests of the admin API and the legacy listener, by status class.",
    ),
    (
        "umeme_dashboard_signin_total",
        "counter",
        "Dashboard sign-ins, by outcome (ok, failed, throttled).",
    ),
    (
        "umeme_dashboard_refused_total",
        "counter",
        "Dashboard requests refused, by reason (no_session, csrf, cross_origin, ...).",
    ),
    (
        "umeme_dashboard_streams",
        "gauge",
        "Dashboard live-update streams open now.",
    ),
    (
        "umeme_http_rejected_total",
        "counter",
        "Admin API requests refused, by reason.",
    ),
    (
        "umeme_http_connections_refused_total",
        "counter",
        "HTTP connections closed at once by a connection cap, by listener and reason.",
    ),
    (
        "umeme_http_timeouts_total",
        "counter",
        "HTTP connections closed (header) or requests answered 408 (request) by a timeout, by listener.",
    ),
    (
        "umeme_http_accept_errors_total",
        "counter",
        "Failed accepts on an HTTP listener (EMFILE and the like), by listener.",
    ),
    (
        "umeme_events_last_seq",
        "gauge",
        "Sequence number of the newest stored event.",
    ),
    (
        "umeme_mqtt_refusal_logs_suppressed_total",
        "counter",
        "CONNECT refusals not logged (over the refusal log's rate); counted in the next line's suppressed=.",
    ),
    (
        "umeme_mqtt_legacy_anonymous_connects_total",
        "counter",
        "CONNECTs accepted without credentials from meters opted in as legacy-anonymous.",
    ),
    (
        "umeme_outbox_used_bytes",
        "gauge",
        "Bytes of the state database's pages in use (capped by [outbox] max_bytes).",
    ),
    (
        "umeme_outbox_full",
        "gauge",
        "1 when only events that are never dropped are left over the disk cap.",
    ),
    (
        "umeme_outbox_dropped_total",
        "counter",
        "Telemetry events dropped by the disk cap.",
    ),
    (
        "umeme_outbox_dropped_undelivered_total",
        "counter",
        "Telemetry events dropped by the disk cap before every sink had them.",
    ),
    (
        "umeme_outbox_expired_total",
        "counter",
        "Delivered events removed after [outbox] retention.",
    ),
    (
        "umeme_outbox_backlog",
        "gauge",
        "Events not yet delivered, by sink.",
    ),
    (
        "umeme_outbox_oldest_undelivered_seconds",
        "gauge",
        "Age of the oldest event not yet delivered, by sink.",
    ),
    (
        "umeme_outbox_delivered_total",
        "counter",
        "Events delivered, by sink.",
    ),
    (
        "umeme_outbox_dead_letters_total",
        "counter",
        "Events a sink refused for good (moved to dead_letters), by sink.",
    ),
    (
        "umeme_outbox_failures_total",
        "counter",
        "Failed deliveries (retried with backoff), by sink.",
    ),
    (
        "umeme_sink_up",
        "gauge",
        "0 while a sink's deliveries fail (backing off), else 1, by sink.",
    ),
    (
        "umeme_source_up",
        "gauge",
        "1 while a payment source plugin runs, 0 once it stopped, by source.",
    ),
    (
        "umeme_source_failures_total",
        "counter",
        "Payment source plugin starts that failed (retried with backoff), by source.",
    ),
];

pub struct Metrics {
    series: Mutex<BTreeMap<String, (String, f64)>>,
}

/// Series rendered from the start, at 0: README lists them "to watch", and an alert rule on a
/// series that does not exist yet never fires (nor can `rate()` see its first increment).
const EXPOSED_AT_ZERO: &[(&str, &[(&str, &str)])] = &[
    ("umeme_ledger_errors_total", &[("reason", "commit")]),
    ("umeme_ledger_errors_total", &[("reason", "store")]),
    ("umeme_ledger_alerts_total", &[("alert", "low_balance")]),
    (
        "umeme_ledger_alerts_total",
        &[("alert", "balance_exhausted")],
    ),
    ("umeme_ledger_alerts_total", &[("alert", "power_trip")]),
    ("umeme_ledger_alerts_total", &[("alert", "power_lockout")]),
    ("umeme_mqtt_rejected_total", &[("reason", "acl_publish")]),
    ("umeme_mqtt_rejected_total", &[("reason", "acl_subscribe")]),
    ("umeme_mqtt_rejected_total", &[("reason", "malformed")]),
    ("umeme_mqtt_rejected_total", &[("reason", "out_of_range")]),
    ("umeme_mqtt_rejected_total", &[("reason", "oversize")]),
    ("umeme_mqtt_rejected_total", &[("reason", "implausible")]),
    ("umeme_mqtt_rejected_total", &[("reason", "rate_limited")]),
    (
        "umeme_mqtt_rejected_total",
        &[("reason", "max_subscriptions")],
    ),
    (
        "umeme_mqtt_rejected_total",
        &[("reason", "filter_too_long")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "bad_credentials")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "no_credentials")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "client_id_mismatch")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "protocol_version")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "reserved_flag")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "trailing_bytes")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "unauthenticated_per_ip")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "auth_backoff_ip")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "auth_backoff_meter")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "auth_busy_ip")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "legacy_source")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "connect_timeout")],
    ),
    (
        "umeme_mqtt_connect_refused_total",
        &[("reason", "tls_handshakes_per_ip")],
    ),
    ("umeme_mqtt_refusal_logs_suppressed_total", &[]),
    ("umeme_mqtt_tls_connections_total", &[]),
    ("umeme_mqtt_legacy_anonymous_connects_total", &[]),
    ("umeme_mqtt_reports_delayed_total", &[]),
    ("umeme_mqtt_warnings_suppressed_total", &[]),
    ("umeme_ledger_commits_total", &[]),
    (
        "umeme_payments_total",
        &[("source", "simulate"), ("outcome", "credited")],
    ),
    (
        "umeme_payments_total",
        &[("source", "manual"), ("outcome", "credited")],
    ),
];

impl Default for Metrics {
    fn default() -> Metrics {
        let m = Metrics {
            series: Mutex::new(BTreeMap::new()),
        };
        for (name, labels) in EXPOSED_AT_ZERO {
            m.add(name, labels, 0);
        }
        m
    }
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut s = format!("{name}{{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

impl Metrics {
    pub fn add(&self, name: &str, labels: &[(&str, &str)], by: u64) {
        let key = series_key(name, labels);
        let mut m = self.series.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key).or_insert_with(|| (name.to_string(), 0.0)).1 += by as f64;
    }

    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }

    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let key = series_key(name, labels);
        let mut m = self.series.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, (name.to_string(), value));
    }

    /// The current value of one series (0 when never touched); for tests and status output.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m = self.series.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&series_key(name, labels)).map_or(0.0, |v| v.1)
    }

    pub fn render(&self) -> String {
        let m = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_family: BTreeMap<&str, Vec<(&str, f64)>> = BTreeMap::new();
        for (key, (name, v)) in m.iter() {
            by_family.entry(name).or_default().push((key, *v));
        }
        let mut out = String::new();
        for (name, rows) in by_family {
            if let Some((_, kind, help)) = HELP.iter().find(|h| h.0 == name) {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            }
            for (key, v) in rows {
                let _ = writeln!(out, "{key} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_family_is_listed_in_the_readme() {
        let readme = include_str!("../../README.md");
        let undocumented: Vec<&str> = HELP
            .iter()
            .map(|h| h.0)
            .filter(|name| !readme.contains(&format!("`{name}")))
            .collect();
        assert!(
            undocumented.is_empty(),
            "add to README's metrics table: {undocumented:?}"
        );
    }

    #[test]
    fn renders_prometheus_text_with_escaped_labels() {
        let m = Metrics::default();
        m.inc("umeme_mqtt_rejected_total", &[("reason", "acl\"x")]);
        m.add("umeme_mqtt_rejected_total", &[("reason", "acl\"x")], 2);
        m.set("umeme_mqtt_sessions", &[], 4.0);
        let text = m.render();
        assert!(
            text.contains("# TYPE umeme_mqtt_rejected_total counter"),
            "{text}"
        );
        assert!(
            text.contains("umeme_mqtt_rejected_total{reason=\"acl\\\"x\"} 3"),
            "{text}"
        );
        assert!(text.contains("umeme_mqtt_sessions 4"), "{text}");
        assert_eq!(
            m.get("umeme_mqtt_rejected_total", &[("reason", "acl\"x")]),
            3.0
        );
    }
}
