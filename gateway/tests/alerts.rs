//! Alerts and the usage behind the dashboard's charts (issue 17), through the real binary.
//!
//! Time is the daemon's own: a debug build serves `POST /api/debug/clock`, which sets the clock
//! every event is stamped with and then folds (the fold runs the alert rules), so a scenario
//! walks through days in milliseconds. Meters are raw MQTT clients that publish exactly the
//! reports a scenario needs.

mod common;

use common::*;
use serde_json::Value;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
const SECRET: &str = "alert-test-secret";

/// UTC midnight two days from now: the test's day 0, later than the meters' creation (the
/// CLI stamps that with the real clock).
fn day0() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    now - now.rem_euclid(DAY) + 2 * DAY
}

fn set_clock(gw: &Gateway, ms: i64) {
    let (status, v) = gw.http(
        "POST",
        "/api/debug/clock",
        Some(&format!(r#"{{"nowMs":{ms}}}"#)),
    );
    assert_eq!(status, 200, "{v}");
}

/// `(raised, resolved)` counts of `alert` events named `name` (of `meter`, or the site's).
fn episodes(gw: &Gateway, meter: Option<&str>, name: &str) -> (usize, usize) {
    let path = match meter {
        Some(m) => format!("/api/alerts?meter={m}&limit=1000"),
        None => "/api/alerts?limit=1000".to_string(),
    };
    let (status, v) = gw.http("GET", &path, None);
    assert_eq!(status, 200, "{v}");
    let mine: Vec<&Value> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["alert"] == name)
        .filter(|e| meter.is_some() || e["meter"].is_null())
        .collect();
    let count = |state: &str| mine.iter().filter(|e| e["data"]["state"] == state).count();
    (count("raised"), count("resolved"))
}

fn alert_event(gw: &Gateway, meter: Option<&str>, name: &str, state: &str) -> Value {
    let (_, v) = gw.http("GET", "/api/alerts?limit=1000", None);
    v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["data"]["alert"] == name
                && e["data"]["state"] == state
                && meter.map_or(e["meter"].is_null(), |m| e["meter"] == m)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no {name} {state} event: {v}"))
}

/// A v2 meter that publishes reports with the power and relay it is told.
struct Meter {
    id: String,
    raw: RawMeter,
    seq: u32,
    energy: u64,
    pkid: u16,
}

impl Meter {
    fn connect(gw: &Gateway, id: &str) -> Meter {
        gw.add_meter(id, SECRET);
        Meter {
            id: id.to_string(),
            raw: gw.connect(id, SECRET),
            seq: 0,
            energy: 0,
            pkid: 0,
        }
    }

    /// Publishes a report `wh` after the last one and waits for its PUBACK (the commit).
    fn report(&mut self, wh: u64, power_w: f64, relay: &str) {
        self.seq += 1;
        self.energy += wh;
        self.send(power_w, relay);
    }

    fn send(&mut self, power_w: f64, relay: &str) {
        self.pkid = self.pkid % 60_000 + 1;
        let body = format!(
            r#"{{"v":2,"meterNo":"{}","seq":{},"energyWh":{},"powerW":{power_w},"relay":"{relay}"}}"#,
            self.id, self.seq, self.energy
        );
        let topic = format!("smartmeter/{}/consumption", self.id);
        self.raw.publish_acked(&topic, &body, self.pkid);
    }
}

#[test]
fn a_spike_over_three_times_the_hours_median_is_raised_once_and_resolved_once() {
    let mut gw = Gateway::new("");
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0 + 10 * HOUR + 60_000);
    let mut m = Meter::connect(&gw, "SPIKE1");
    m.report(0, 100.0, "on"); // baseline
                              // Three ordinary days: 200 Wh between 10:00 and 11:00 UTC.
    for day in 0..3 {
        set_clock(&gw, t0 + day * DAY + 10 * HOUR + 5 * 60_000);
        m.report(200, 200.0, "on");
        set_clock(&gw, t0 + day * DAY + 11 * HOUR + 5 * 60_000);
        assert_eq!(episodes(&gw, Some("SPIKE1"), "spike"), (0, 0));
    }
    // Day 3: 2 kWh in that hour (the median is 200, the threshold 600).
    set_clock(&gw, t0 + 3 * DAY + 10 * HOUR + 5 * 60_000);
    m.report(2000, 2500.0, "on");
    set_clock(&gw, t0 + 3 * DAY + 11 * HOUR + 5 * 60_000);
    assert_eq!(episodes(&gw, Some("SPIKE1"), "spike"), (1, 0));
    let raised = alert_event(&gw, Some("SPIKE1"), "spike", "raised");
    assert_eq!(raised["data"]["wh"], 2000, "{raised}");
    assert_eq!(raised["data"]["medianWh"], 200, "{raised}");
    assert_eq!(raised["data"]["thresholdWh"], 600, "{raised}");
    let metrics = gw.metrics();
    assert!(
        metrics.contains(r#"umeme_alerts_total{alert="spike",state="raised"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"umeme_alerts_open{alert="spike"} 1"#),
        "{metrics}"
    );
    let at = raised["at"].as_i64().unwrap() - (t0 + 3 * DAY + 11 * HOUR + 5 * 60_000);
    assert!(
        (0..10_000).contains(&at),
        "stamped by the daemon's clock: {raised}"
    );

    // A restart (SIGKILL) does not raise the open episode again.
    drop(m);
    gw.kill();
    gw.start();
    set_clock(&gw, t0 + 3 * DAY + 11 * HOUR + 6 * 60_000);
    assert_eq!(episodes(&gw, Some("SPIKE1"), "spike"), (1, 0));

    // The next hour is ordinary again: resolved, once.
    let mut m = Meter {
        raw: gw.connect("SPIKE1", SECRET),
        id: "SPIKE1".into(),
        seq: 5,
        energy: 2600,
        pkid: 100,
    };
    m.report(100, 100.0, "on");
    set_clock(&gw, t0 + 3 * DAY + 12 * HOUR + 5 * 60_000);
    set_clock(&gw, t0 + 3 * DAY + 13 * HOUR + 5 * 60_000);
    assert_eq!(episodes(&gw, Some("SPIKE1"), "spike"), (1, 1));
    let resolved = alert_event(&gw, Some("SPIKE1"), "spike", "resolved");
    assert_eq!(resolved["data"]["since"], raised["at"], "{resolved}");
    // Counted by the process that saw it (the raise was counted before the restart).
    let metrics = gw.metrics();
    assert!(
        metrics.contains(r#"umeme_alerts_total{alert="spike",state="resolved"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"umeme_alerts_open{alert="spike"} 0"#),
        "{metrics}"
    );

    // The hourly usage behind the chart: every hour of day 3, zeros included.
    let (status, v) = gw.http(
        "GET",
        &format!(
            "/api/meters/SPIKE1/usage?from={}&to={}&step=hour",
            t0 + 3 * DAY,
            t0 + 4 * DAY
        ),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 24);
    assert_eq!(points[10]["at"], t0 + 3 * DAY + 10 * HOUR);
    assert_eq!(points[10]["wh"], 2000);
    assert_eq!(points[11]["wh"], 100);
    let total: i64 = points.iter().map(|p| p["wh"].as_i64().unwrap()).sum();
    assert_eq!(total, 2100);
    // By local day (Nairobi, UTC+3): the four days' use, each on its own day.
    let (status, v) = gw.http(
        "GET",
        &format!(
            "/api/meters/SPIKE1/usage?from={}&to={}&step=day",
            t0,
            t0 + 3 * DAY + 12 * HOUR
        ),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let wh: Vec<i64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["wh"].as_i64().unwrap())
        .collect();
    assert_eq!(wh, [200, 200, 200, 2100]);
    // The CLI shows the same day in local time: 10:00 UTC is 13:00 in Nairobi.
    let date = umeme_plugin_sdk::iso8601_utc(t0 + 3 * DAY)[..10].to_string();
    let out = gw.cli(&["meter", "usage", "SPIKE1", "--day", &date]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{date} 13:00")) && l.ends_with("2.000")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("total") && l.ends_with("2.100")),
        "{text}"
    );
}

#[test]
fn power_drawn_while_the_relay_reports_off_is_a_bypass_raised_once_and_resolved_once() {
    let mut gw = Gateway::new("");
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0);
    let mut m = Meter::connect(&gw, "BYPASS1");
    m.report(0, 0.0, "off");
    m.report(0, 5.0, "off"); // standby noise under the 20 W threshold
    set_clock(&gw, t0 + 60_000);
    assert_eq!(episodes(&gw, Some("BYPASS1"), "bypass"), (0, 0));
    // Someone wires around the relay: 800 W with the relay off, for several reports.
    for i in 0..3 {
        m.report(15, 800.0, "off");
        set_clock(&gw, t0 + (2 + i) * 60_000);
    }
    assert_eq!(episodes(&gw, Some("BYPASS1"), "bypass"), (1, 0));
    let raised = alert_event(&gw, Some("BYPASS1"), "bypass", "raised");
    assert_eq!(raised["data"]["powerW"], 800.0, "{raised}");
    // A window without reports says nothing: still open, not raised again.
    set_clock(&gw, t0 + 6 * 60_000);
    assert_eq!(episodes(&gw, Some("BYPASS1"), "bypass"), (1, 0));
    // The bypass is removed: no power while off.
    m.report(0, 0.0, "off");
    set_clock(&gw, t0 + 7 * 60_000);
    m.report(0, 0.0, "off");
    set_clock(&gw, t0 + 8 * 60_000);
    assert_eq!(episodes(&gw, Some("BYPASS1"), "bypass"), (1, 1));
}

#[test]
fn a_register_going_backwards_without_a_reboot_is_raised_once_and_resolved_once() {
    let mut gw = Gateway::new("");
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0);
    let mut m = Meter::connect(&gw, "BACK1");
    m.report(0, 100.0, "on");
    m.report(1000, 100.0, "on");
    set_clock(&gw, t0 + 60_000);
    // seq goes on, energyWh falls: the register was tampered with or its flash replaced.
    m.seq += 1;
    m.energy = 400;
    m.send(100.0, "on");
    set_clock(&gw, t0 + 2 * 60_000);
    set_clock(&gw, t0 + 3 * 60_000);
    assert_eq!(episodes(&gw, Some("BACK1"), "register_backwards"), (1, 0));
    m.report(50, 100.0, "on");
    set_clock(&gw, t0 + 4 * 60_000);
    assert_eq!(episodes(&gw, Some("BACK1"), "register_backwards"), (1, 1));
}

#[test]
fn a_meter_silent_longer_than_ten_report_intervals_is_raised_once_and_resolved_once() {
    let mut gw = Gateway::new("[alerts]\nreport_interval = \"30s\"\nsilent_intervals = 10\n");
    gw.start();
    let t0 = day0();
    // The daemon's clock first: the meter's connection counts as hearing from it.
    set_clock(&gw, t0);
    let mut m = Meter::connect(&gw, "QUIET1");
    m.report(0, 100.0, "on");
    // The clock runs on from each setting, so the checks keep seconds clear of the limit.
    set_clock(&gw, t0 + 4 * 60_000 + 50_000);
    assert_eq!(episodes(&gw, Some("QUIET1"), "silent"), (0, 0));
    set_clock(&gw, t0 + 5 * 60_000 + 20_000);
    assert_eq!(episodes(&gw, Some("QUIET1"), "silent"), (1, 0));
    set_clock(&gw, t0 + 60 * 60_000);
    assert_eq!(episodes(&gw, Some("QUIET1"), "silent"), (1, 0));
    // Heard from again.
    m.report(10, 100.0, "on");
    set_clock(&gw, t0 + 61 * 60_000);
    assert_eq!(episodes(&gw, Some("QUIET1"), "silent"), (1, 1));
    let resolved = alert_event(&gw, Some("QUIET1"), "silent", "resolved");
    let since = resolved["data"]["since"].as_i64().unwrap() - (t0 + 5 * 60_000 + 20_000);
    assert!((0..10_000).contains(&since), "{resolved}");
}

#[test]
fn a_fifteen_percent_site_loss_is_raised_once_and_resolved_once_and_charted_per_day() {
    let mut gw = Gateway::new("");
    gw.start();
    // Local (Nairobi) days: day D starts at 21:00 UTC the evening before.
    let d = day0() - 3 * HOUR;
    set_clock(&gw, d + 8 * HOUR);
    let mut main = Meter::connect(&gw, "MAIN");
    let out = gw.cli(&["meter", "set", "MAIN", "--main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s1 = Meter::connect(&gw, "FLAT1");
    let mut s2 = Meter::connect(&gw, "FLAT2");
    set_clock(&gw, d + 8 * HOUR);
    for m in [&mut main, &mut s1, &mut s2] {
        m.report(0, 100.0, "on");
    }
    // Day D: the bulk meter supplies 10 kWh, the flats use 8.5: 15 % is lost.
    set_clock(&gw, d + 10 * HOUR);
    main.report(10_000, 900.0, "on");
    s1.report(5_000, 500.0, "on");
    s2.report(3_500, 300.0, "on");
    set_clock(&gw, d + 20 * HOUR);
    assert_eq!(
        episodes(&gw, None, "site_loss"),
        (0, 0),
        "the day is not over"
    );
    set_clock(&gw, d + DAY + HOUR);
    assert_eq!(episodes(&gw, None, "site_loss"), (1, 0));
    let raised = alert_event(&gw, None, "site_loss", "raised");
    assert_eq!(raised["data"]["mainWh"], 10_000, "{raised}");
    assert_eq!(raised["data"]["subWh"], 8_500, "{raised}");
    assert_eq!(raised["data"]["lossShare"], 0.15, "{raised}");
    assert_eq!(raised["data"]["mainSource"], "meter", "{raised}");
    // Day D+1: 2 % lost, within the 10 % tolerance.
    set_clock(&gw, d + DAY + 10 * HOUR);
    main.report(10_000, 900.0, "on");
    s1.report(5_000, 500.0, "on");
    s2.report(4_800, 300.0, "on");
    set_clock(&gw, d + 2 * DAY + HOUR);
    set_clock(&gw, d + 2 * DAY + 2 * HOUR);
    assert_eq!(episodes(&gw, None, "site_loss"), (1, 1));

    // The daily loss series for the chart.
    let day = |n: i64| umeme_plugin_sdk::iso8601_utc(d + n * DAY + 3 * HOUR)[..10].to_string();
    let (status, v) = gw.http(
        "GET",
        &format!("/api/site/loss?from={}&to={}", day(0), day(1)),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let days = v["days"].as_array().unwrap();
    assert_eq!(days.len(), 2);
    assert_eq!(days[0]["day"], day(0));
    assert_eq!(days[0]["at"], d);
    assert_eq!(days[0]["lossWh"], 1_500);
    assert_eq!(days[1]["lossShare"], 0.02);

    // The site's use per day for the overview: the flats, and the bulk meter apart.
    let (status, v) = gw.http(
        "GET",
        &format!("/api/site/usage?from={}&to={}&step=day", day(0), day(2)),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["points"][0]["wh"], 8_500, "{v}");
    assert_eq!(v["points"][0]["mainWh"], 10_000, "{v}");
    assert_eq!(v["points"][1]["wh"], 9_800, "{v}");
    // A report not folded yet already counts.
    set_clock(&gw, d + 2 * DAY + 3 * HOUR);
    s1.report(123, 100.0, "on");
    let (_, v) = gw.http(
        "GET",
        &format!("/api/site/usage?from={}&to={}&step=day", day(2), day(3)),
        None,
    );
    assert_eq!(v["points"][0]["wh"], 123, "{v}");

    // A reading by hand wins over the main meter for its day.
    let (status, v) = gw.http(
        "POST",
        "/api/site/readings",
        Some(&format!(r#"{{"day":"{}","kwh":9.0}}"#, day(1))),
    );
    assert_eq!(status, 201, "{v}");
    let out = gw.cli(&["site", "loss", "--from", &day(0), "--to", &day(1)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text.lines().find(|l| l.starts_with(&day(1))).unwrap();
    assert!(
        line.contains("reading") && line.contains("-0.800"),
        "{text}"
    );
    // Bad input is refused with a reason.
    let (status, v) = gw.http(
        "POST",
        "/api/site/readings",
        Some(r#"{"day":"2026-02-30","kwh":1}"#),
    );
    assert_eq!(status, 400, "{v}");
    let out = gw.cli(&["site", "reading", "--day", &day(1), "--kwh", "-1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_meter_using_nothing_for_an_hour_with_its_relay_on_is_raised_once_and_resolved_once() {
    let mut gw = Gateway::new("[alerts]\nidle_after = \"1h\"\n");
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0);
    let mut m = Meter::connect(&gw, "IDLE1");
    m.report(0, 0.0, "on");
    // Reports keep coming (every 9 minutes: never silent), none with use.
    for i in 1..=6 {
        set_clock(&gw, t0 + i * 9 * 60_000);
        m.report(0, 0.0, "on");
    }
    set_clock(&gw, t0 + 55 * 60_000);
    assert_eq!(episodes(&gw, Some("IDLE1"), "no_consumption"), (0, 0));
    set_clock(&gw, t0 + 62 * 60_000);
    m.report(0, 0.0, "on");
    set_clock(&gw, t0 + 63 * 60_000);
    assert_eq!(episodes(&gw, Some("IDLE1"), "no_consumption"), (1, 0));
    set_clock(&gw, t0 + 70 * 60_000);
    assert_eq!(episodes(&gw, Some("IDLE1"), "no_consumption"), (1, 0));
    m.report(40, 300.0, "on");
    set_clock(&gw, t0 + 71 * 60_000);
    assert_eq!(episodes(&gw, Some("IDLE1"), "no_consumption"), (1, 1));
}

#[test]
fn alert_episodes_reach_a_sink_as_raised_and_resolved_events() {
    let export = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(&format!(
        "[[sink]]\nname = \"audit\"\nbuiltin = \"jsonl\"\nevents = [\"alert\"]\n[sink.config]\ndir = {:?}\n",
        export.path().display().to_string()
    ));
    gw.start();
    let t0 = day0();
    set_clock(&gw, t0);
    let mut m = Meter::connect(&gw, "SINK1");
    m.report(0, 100.0, "on");
    set_clock(&gw, t0 + 11 * 60_000);
    m.report(1, 100.0, "on");
    set_clock(&gw, t0 + 12 * 60_000);
    let file = export.path().join("events.jsonl");
    let lines = eventually("both silent events in the sink's file", || {
        let text = std::fs::read_to_string(&file).ok()?;
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|e: &Value| e["data"]["alert"] == "silent")
            .collect();
        (events.len() == 2).then_some(events)
    });
    assert_eq!(lines[0]["kind"], "alert");
    assert_eq!(lines[0]["meter"], "SINK1");
    assert_eq!(lines[0]["data"]["state"], "raised");
    assert_eq!(lines[1]["data"]["state"], "resolved");
}

#[test]
fn usage_ranges_are_bounded_and_bad_queries_are_refused() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("RANGE1", SECRET);
    for (query, status) in [
        ("step=week", 400),
        ("from=0&to=1000000000000&step=hour", 400),
        ("from=2026-11-01&to=2026-11-02&step=hour", 200),
        ("from=10&to=5", 400),
        ("from=yesterday", 400),
    ] {
        let (s, v) = gw.http("GET", &format!("/api/meters/RANGE1/usage?{query}"), None);
        assert_eq!(s, status, "{query}: {v}");
    }
    let (s, _) = gw.http("GET", "/api/meters/NOPE/usage", None);
    assert_eq!(s, 404);
    let (s, v) = gw.http("GET", "/api/site/loss?from=2020-01-01&to=2026-01-01", None);
    assert_eq!(s, 400, "{v}");
}

// ---- the usage store, through the library on a real SQLite file ----

mod store_level {
    use rusqlite::Connection;
    use umeme_gateway::config::Tariff;
    use umeme_gateway::ledger::Rules;
    use umeme_gateway::meter::MeterId;
    use umeme_gateway::payload::{Report, V2Report};
    use umeme_gateway::store;
    use umeme_gateway::writer::{apply, apply_now, LedgerSettings, Op};

    const HOUR: i64 = 3_600_000;

    fn settings() -> LedgerSettings {
        LedgerSettings {
            rules: Rules { low_balance_wh: 0 },
            tariff: Tariff::try_from(0.05).unwrap(),
        }
    }

    fn add(conn: &mut Connection, meter: &str) {
        let op = Op::AddMeter {
            meter: MeterId::parse(meter).unwrap(),
            name: None,
            phone: None,
            secret_hash: "unused".into(),
            at: 1,
        };
        apply_now(conn, &op, &settings())
            .map_err(|e| e.to_string())
            .unwrap();
    }

    /// A v2 report applied in its own transaction without a fold, as the daemon's writer does.
    fn report(conn: &mut Connection, meter: &str, seq: u32, energy_wh: u64, at: i64) {
        let op = Op::Report {
            meter: MeterId::parse(meter).unwrap(),
            report: Report::V2(V2Report {
                seq,
                energy_wh,
                power_w: Some(100.0),
                current_a: None,
                voltage_v: None,
                relay: Some("on".into()),
                timestamp: None,
            }),
            at,
        };
        let tx = conn.transaction().unwrap();
        apply(&tx, &op, &settings())
            .map_err(|e| e.to_string())
            .unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn hourly_usage_is_added_once_at_fold_and_reads_the_same_before_and_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = store::open(&dir.path().join("gateway.db"), "site").unwrap();
        add(&mut conn, "M1");
        let h = 1_000 * HOUR;
        report(&mut conn, "M1", 1, 0, h + 10); // baseline
        report(&mut conn, "M1", 2, 30, h + 20);
        report(&mut conn, "M1", 3, 100, h + HOUR + 5);
        report(&mut conn, "M1", 4, 100, h + HOUR + 6); // no use
        let expect = vec![(h, 30), (h + HOUR, 70)];
        // Before the fold the reader overlays the unfolded reports.
        assert_eq!(
            store::usage_hours(&conn, "M1", h, h + 2 * HOUR).unwrap(),
            expect
        );
        let rows = |c: &Connection| -> i64 {
            c.query_row("SELECT COUNT(*) FROM usage_hours", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(rows(&conn), 0, "a report writes nothing but its event");
        let tx = conn.transaction().unwrap();
        let folded = store::fold(&tx, std::iter::empty()).unwrap();
        tx.commit().unwrap();
        assert_eq!(folded.reports["M1"].len(), 4);
        assert_eq!(rows(&conn), 2, "one row per meter and hour");
        assert_eq!(
            store::usage_hours(&conn, "M1", h, h + 2 * HOUR).unwrap(),
            expect
        );
        // Folding again adds nothing: each event is counted once.
        let tx = conn.transaction().unwrap();
        assert!(store::fold(&tx, std::iter::empty())
            .unwrap()
            .reports
            .is_empty());
        tx.commit().unwrap();
        assert_eq!(
            store::usage_hours(&conn, "M1", h, h + 2 * HOUR).unwrap(),
            expect
        );
        // A report in an hour already folded adds to its row.
        report(&mut conn, "M1", 5, 150, h + HOUR + 7);
        let tx = conn.transaction().unwrap();
        store::fold(&tx, std::iter::empty()).unwrap();
        tx.commit().unwrap();
        assert_eq!(
            store::usage_hours(&conn, "M1", h, h + 2 * HOUR).unwrap(),
            vec![(h, 30), (h + HOUR, 120)]
        );
    }

    #[test]
    fn a_removed_meter_takes_its_open_episodes_along_but_leaves_its_usage() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = store::open(&dir.path().join("gateway.db"), "site").unwrap();
        add(&mut conn, "GONE1");
        report(&mut conn, "GONE1", 1, 0, 10);
        report(&mut conn, "GONE1", 2, 70, 20);
        store::set_alert_open(&conn, "GONE1", "silent", Some(30)).unwrap();
        let remove = Op::RemoveMeter {
            meter: MeterId::parse("GONE1").unwrap(),
            at: 40,
        };
        apply_now(&mut conn, &remove, &settings())
            .map_err(|e| e.to_string())
            .unwrap();
        assert!(store::open_alerts(&conn).unwrap().is_empty());
        add(&mut conn, "GONE1");
        let watched = store::watched_meters(&conn).unwrap();
        assert_eq!(
            watched[0].last_report_at, None,
            "starts without the old reports"
        );
        assert_eq!(
            store::usage_hours(&conn, "GONE1", 0, HOUR).unwrap(),
            vec![(0, 70)]
        );
    }

    #[test]
    fn a_schema_3_database_is_upgraded_to_the_current_schema_in_place_by_the_daemon_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        {
            let mut conn = store::open(&path, "site").unwrap();
            add(&mut conn, "M1");
            report(&mut conn, "M1", 1, 0, 10);
            report(&mut conn, "M1", 2, 40, 20);
            // Back to what schema 3 had: no main column, none of the usage or alert tables.
            conn.execute_batch(
                "ALTER TABLE meters DROP COLUMN main;
                 ALTER TABLE meters DROP COLUMN tariff;
                 ALTER TABLE meters DROP COLUMN money;
                 DROP TABLE usage_hours; DROP TABLE site_readings;
                 DROP TABLE alert_state; DROP TABLE meter_watch;
                 UPDATE meta SET value = '3' WHERE key = 'schema_version';",
            )
            .unwrap();
        }
        let err = store::open_without_upgrade(&path, "site").unwrap_err();
        assert!(
            err.to_string().contains("schema version 3 is older"),
            "{err}"
        );
        let mut conn = store::open(&path, "site").unwrap();
        let version: String = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, "6", "3 → 4 → 5 → 6");
        let m1 = MeterId::parse("M1").unwrap();
        assert!(!store::meter(&conn, &m1).unwrap().unwrap().main);
        apply_now(
            &mut conn,
            &Op::SetMain {
                meter: m1.clone(),
                main: true,
                at: 30,
            },
            &settings(),
        )
        .map_err(|e| e.to_string())
        .unwrap();
        assert!(store::meter(&conn, &m1).unwrap().unwrap().main);
        assert_eq!(store::main_meter(&conn).unwrap().as_deref(), Some("M1"));
        // The reports not folded before the upgrade are counted by the first fold after it.
        assert_eq!(
            store::usage_hours(&conn, "M1", 0, HOUR).unwrap(),
            vec![(0, 40)]
        );
    }

    /// `cargo test -p umeme-gateway --release --test alerts -- --ignored --nocapture measure`:
    /// what the alert rules add to a fold at 1,000 meters with 14 days of hourly history and a
    /// 2-minute window of 12,000 reports (1,000 meters every 10 s). The baseline is the same
    /// fold, in the same run, on a copy of the database, without the rules.
    #[test]
    #[ignore]
    fn measure_the_cost_of_a_fold_with_the_alert_rules_at_1000_meters() {
        use std::time::Instant;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let mut conn = store::open(&path, "site").unwrap();
        let meters: Vec<String> = (0..1000).map(|i| format!("M{i:04}")).collect();
        let tx = conn.transaction().unwrap();
        for m in &meters {
            let op = Op::AddMeter {
                meter: MeterId::parse(m).unwrap(),
                name: None,
                phone: None,
                secret_hash: "unused".into(),
                at: 1,
            };
            apply(&tx, &op, &settings())
                .map_err(|e| e.to_string())
                .unwrap();
        }
        let hour = 1_000_000 * HOUR;
        {
            let mut ins = tx
                .prepare("INSERT INTO usage_hours (meter, hour, wh) VALUES (?1, ?2, ?3)")
                .unwrap();
            for m in &meters {
                for h in 0..14 * 24 {
                    ins.execute(rusqlite::params![m, hour - (h + 1) * HOUR, 100 + h % 7])
                        .unwrap();
                }
            }
        }
        tx.commit().unwrap();
        // The window is the hour's last two minutes: nobody is silent when it is judged.
        let mut at = hour + HOUR - 120_000;
        for round in 0..13u32 {
            let tx = conn.transaction().unwrap();
            for m in &meters {
                at += 1;
                let op = Op::Report {
                    meter: MeterId::parse(m).unwrap(),
                    report: Report::V2(V2Report {
                        seq: round + 1,
                        energy_wh: u64::from(round) * 3,
                        power_w: Some(300.0),
                        current_a: None,
                        voltage_v: None,
                        relay: Some("on".into()),
                        timestamp: None,
                    }),
                    at,
                };
                apply(&tx, &op, &settings())
                    .map_err(|e| e.to_string())
                    .unwrap();
            }
            tx.commit().unwrap();
            if round == 0 {
                // The baselines are folded before the measured window.
                let tx = conn.transaction().unwrap();
                store::fold(&tx, std::iter::empty()).unwrap();
                tx.commit().unwrap();
            }
        }
        let copy = dir.path().join("baseline.db");
        conn.execute("VACUUM INTO ?1", [copy.display().to_string()])
            .unwrap();
        // Both on a fresh connection, so neither starts with a warm page cache of its own.
        drop(conn);
        let mut base = store::open(&copy, "site").unwrap();
        let mut conn = store::open(&path, "site").unwrap();
        let now = hour + HOUR + 60_000;
        let t = umeme_gateway::alerts::Thresholds::default();

        let started = Instant::now();
        let tx = base.transaction().unwrap();
        let f = store::fold(&tx, std::iter::empty()).unwrap();
        tx.commit().unwrap();
        let baseline = started.elapsed();
        let window: usize = f.reports.values().map(Vec::len).sum();

        let started = Instant::now();
        let tx = conn.transaction().unwrap();
        let f = store::fold(&tx, std::iter::empty()).unwrap();
        let folded = started.elapsed();
        let raised = umeme_gateway::alerts::evaluate(&tx, &t, now, 0, &f.reports).unwrap();
        tx.commit().unwrap();
        let with_rules = started.elapsed();
        // The next fold, within the same hour: spikes are not judged again.
        let started = Instant::now();
        let tx = conn.transaction().unwrap();
        let f = store::fold(&tx, std::iter::empty()).unwrap();
        umeme_gateway::alerts::evaluate(&tx, &t, now + 120_000, 0, &f.reports).unwrap();
        tx.commit().unwrap();
        let next = started.elapsed();
        println!(
            "fold of {window} reports from 1000 meters: {baseline:?} without the rules (copy), \
             {folded:?} fold + {:?} rules = {with_rules:?} with them at an hour's first fold \
             ({} episodes raised); the next fold with nothing new: {next:?}",
            with_rules - folded,
            raised.len()
        );
    }
}
