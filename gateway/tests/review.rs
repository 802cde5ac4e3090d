//! Findings of the security and correctness review of the first wave (dashboard, TLS, OTA,
//! alerts/usage, limits), each as the attack that found it, through the real binary.

mod common;

use common::*;

const SECRET: &str = "review-test-secret";

/// Times at the ends of `i64` overflowed the range arithmetic: a panic on the reader's
/// blocking thread (a 500 in a release build, an overflow panic in a debug one) instead of a
/// clear refusal.
#[test]
fn usage_ranges_at_the_ends_of_the_time_line_are_refused_not_panicked_on() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("EDGE1", SECRET);
    let (min, max) = (i64::MIN, i64::MAX);
    for path in ["/api/meters/EDGE1/usage", "/api/site/usage"] {
        for query in [
            format!("from={min}&to=0&step=hour"),
            format!("from={min}&to=0&step=day"),
            format!("from=0&to={max}&step=day"),
            format!("to={min}&step=hour"),
            format!("to={min}&step=day"),
            format!("from={}&to={max}&step=hour", max - 1),
            format!("from={min}&to={}&step=day", min + 1),
        ] {
            let (s, v) = gw.http("GET", &format!("{path}?{query}"), None);
            assert_eq!(s, 400, "{path}?{query}: {v}");
        }
    }
    // A sane range still answers.
    let (s, v) = gw.http(
        "GET",
        "/api/meters/EDGE1/usage?from=2026-11-01&to=2026-11-02&step=hour",
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert!(!gw.log_text().contains("panicked"), "{}", gw.log_text());
}

/// Sets the dashboard's operator password through the CLI, as an operator does.
fn set_operator_password(gw: &Gateway, password: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(BIN)
        .args(["operator", "password", "--config"])
        .arg(&gw.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The limit was checked before the (slow, argon2) password check and counted after it, so
/// guesses sent at once all passed the check: 16 parallel connections (the API's per-address
/// cap) made 16 guesses where 5 are allowed per window.
#[test]
fn parallel_sign_in_guesses_from_one_address_get_no_more_than_five_tries() {
    let mut gw = Gateway::new("");
    gw.start();
    set_operator_password(&gw, "caretaker-pass-2026");
    let api = gw.api;
    // The harness's client sends `Host: localhost`; the same-origin check compares with it.
    let origin = "http://localhost".to_string();
    let start = std::sync::Arc::new(std::sync::Barrier::new(12));
    let guesses: Vec<_> = (0..12)
        .map(|i| {
            let (start, origin) = (start.clone(), origin.clone());
            std::thread::spawn(move || {
                let body = format!("secret=wrong-guess-{i:04}");
                start.wait();
                http(
                    api,
                    "POST",
                    "/dashboard/login",
                    Some(&body),
                    &[("Origin", &origin)],
                )
                .0
            })
        })
        .collect();
    let statuses: Vec<u16> = guesses.into_iter().map(|g| g.join().unwrap()).collect();
    let tried = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((tried, throttled), (5, 7), "{statuses:?}");
}

const TOKEN: &str = "review-admin-token-0123456789";

/// A started gateway whose admin API needs [`TOKEN`].
fn with_token() -> Gateway {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap().keep();
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut gw = Gateway::new(&format!("token_file = {:?}\n", token.display().to_string()));
    gw.start();
    gw
}

/// Signs in to the dashboard through the harness's client (`Host: localhost`); the cookie.
fn dashboard_sign_in(gw: &Gateway, secret: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let body = format!("secret={secret}");
    write!(
        s,
        "POST /dashboard/login HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 303"), "{raw}");
    raw.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

/// A caretaker's password leaked, the operator set a new one with the CLI: sessions signed in
/// with the old one kept every right (credit cash, rotate secrets) for up to 12 hours, since
/// the daemon never learned of the change.
#[test]
fn a_new_operator_password_ends_the_sessions_signed_in_with_the_old_one() {
    let gw = with_token();
    set_operator_password(&gw, "caretaker-pass-2026");
    let cookie = dashboard_sign_in(&gw, "caretaker-pass-2026");
    let (s, _) = http(
        gw.api,
        "GET",
        "/dashboard/meters",
        None,
        &[("Cookie", &cookie)],
    );
    assert_eq!(s, 200);
    let (s, _) = http(gw.api, "GET", "/api/meters", None, &[("Cookie", &cookie)]);
    assert_eq!(s, 200, "a session reads the admin API");

    set_operator_password(&gw, "a-new-pass-after-the-leak");
    let (s, v) = http(
        gw.api,
        "GET",
        "/dashboard/export/month.csv?month=2026-11",
        None,
        &[("Cookie", &cookie)],
    );
    assert_eq!(s, 401, "{v}");
    let (s, _) = http(
        gw.api,
        "GET",
        "/dashboard/meters",
        None,
        &[("Cookie", &cookie)],
    );
    assert_eq!(s, 303, "back to the sign-in page");
    let (s, _) = http(gw.api, "GET", "/api/meters", None, &[("Cookie", &cookie)]);
    assert_eq!(s, 401);
    // The new password signs in.
    let fresh = dashboard_sign_in(&gw, "a-new-pass-after-the-leak");
    let (s, _) = http(
        gw.api,
        "GET",
        "/dashboard/meters",
        None,
        &[("Cookie", &fresh)],
    );
    assert_eq!(s, 200);
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn set_clock(gw: &Gateway, ms: i64) {
    let (status, v) = gw.http(
        "POST",
        "/api/debug/clock",
        Some(&format!(r#"{{"nowMs":{ms}}}"#)),
    );
    assert_eq!(status, 200, "{v}");
}

fn spike_events(gw: &Gateway, meter: &str) -> usize {
    let (status, v) = gw.http(
        "GET",
        &format!("/api/alerts?meter={meter}&limit=1000"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["alert"] == "spike" && e["data"]["state"] == "raised")
        .count()
}

/// The spike rule remembered the newest hour it judged and judged only later hours: a clock
/// that ran ahead (a wrong NTP answer, a mistyped `date`) and was put right left that hour in
/// the future, and no spike was judged until real time caught up with it.
#[test]
fn a_clock_put_back_after_running_ahead_does_not_stop_spike_judgements() {
    let mut gw = Gateway::new("");
    gw.start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = now - now.rem_euclid(DAY) + 2 * DAY;
    set_clock(&gw, t0 + 10 * HOUR + 60_000);
    gw.add_meter("JUMP1", SECRET);
    let mut m = gw.connect("JUMP1", SECRET);
    let (mut seq, mut energy) = (0u32, 0u64);
    let mut report = |m: &mut RawMeter, wh: u64| {
        seq += 1;
        energy += wh;
        m.publish_acked(
            "smartmeter/JUMP1/consumption",
            &v2_payload("JUMP1", seq, energy),
            seq as u16,
        );
    };
    report(&mut m, 0);
    for day in 0..3 {
        set_clock(&gw, t0 + day * DAY + 10 * HOUR + 5 * 60_000);
        report(&mut m, 200);
        set_clock(&gw, t0 + day * DAY + 11 * HOUR + 5 * 60_000);
    }
    // The clock runs 30 days ahead for a fold, then is put right.
    set_clock(&gw, t0 + 33 * DAY);
    set_clock(&gw, t0 + 3 * DAY + 10 * HOUR + 5 * 60_000);
    report(&mut m, 2000);
    set_clock(&gw, t0 + 3 * DAY + 11 * HOUR + 5 * 60_000);
    assert_eq!(spike_events(&gw, "JUMP1"), 1);
}

fn usage_wh(gw: &Gateway, meter: &str, from: i64, to: i64) -> i64 {
    let (status, v) = gw.http(
        "GET",
        &format!("/api/meters/{meter}/usage?from={from}&to={to}&step=hour"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["wh"].as_i64().unwrap())
        .sum()
}

/// Hourly usage was pruned against the wall clock alone: one fold while the clock ran more
/// than `usage_retention_days` ahead deleted every meter's whole history (charts, spike
/// baselines, site loss), for good.
#[test]
fn a_clock_that_runs_years_ahead_for_a_moment_does_not_delete_the_usage_history() {
    let mut gw = Gateway::new("");
    gw.start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = now - now.rem_euclid(DAY) + 2 * DAY;
    set_clock(&gw, t0 + 10 * HOUR);
    gw.add_meter("HIST1", SECRET);
    let mut m = gw.connect("HIST1", SECRET);
    m.publish_acked(
        "smartmeter/HIST1/consumption",
        &v2_payload("HIST1", 1, 0),
        1,
    );
    m.publish_acked(
        "smartmeter/HIST1/consumption",
        &v2_payload("HIST1", 2, 300),
        2,
    );
    // Two days on, the history is folded and pruned as usual.
    set_clock(&gw, t0 + 2 * DAY);
    assert_eq!(usage_wh(&gw, "HIST1", t0, t0 + DAY), 300);
    // Two years ahead for a fold, then put right.
    set_clock(&gw, t0 + 730 * DAY);
    set_clock(&gw, t0 + 3 * DAY);
    assert_eq!(usage_wh(&gw, "HIST1", t0, t0 + DAY), 300);
}

/// The bound on the prune's step leaves ordinary pruning as it was: a day past the retention,
/// an hour's usage is gone; younger hours stay.
#[test]
fn hourly_usage_older_than_the_retention_is_pruned_as_days_pass() {
    let mut gw = Gateway::new("[alerts]\nusage_retention_days = 31\n");
    gw.start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = now - now.rem_euclid(DAY) + 2 * DAY;
    set_clock(&gw, t0 + 10 * HOUR);
    gw.add_meter("OLD1", SECRET);
    let mut m = gw.connect("OLD1", SECRET);
    m.publish_acked("smartmeter/OLD1/consumption", &v2_payload("OLD1", 1, 0), 1);
    m.publish_acked(
        "smartmeter/OLD1/consumption",
        &v2_payload("OLD1", 2, 300),
        2,
    );
    set_clock(&gw, t0 + 2 * DAY + 10 * HOUR);
    m.publish_acked(
        "smartmeter/OLD1/consumption",
        &v2_payload("OLD1", 3, 400),
        3,
    );
    // One fold a day, as a running gateway has.
    for day in 3..=32 {
        set_clock(&gw, t0 + day * DAY + HOUR);
        if day == 31 {
            assert_eq!(usage_wh(&gw, "OLD1", t0, t0 + DAY), 300, "31 days: kept");
        }
    }
    assert_eq!(usage_wh(&gw, "OLD1", t0, t0 + DAY), 0, "32 days: pruned");
    assert_eq!(usage_wh(&gw, "OLD1", t0 + 2 * DAY, t0 + 3 * DAY), 100);
}

fn cli_ok(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A meter on a persistent session (clean session 0) that was away when a rollout started
/// comes back with its subscriptions restored and sends no SUBSCRIBE: it got its balance but
/// never the offer, so it stayed `pending` for the whole rollout.
#[test]
fn a_meter_resuming_a_persistent_session_is_offered_the_rollout_it_missed() {
    let mut gw = Gateway::new("");
    let key = gw.dir.path().join("release.key");
    cli_ok(&gw, &["firmware", "keygen", "--out", key.to_str().unwrap()]);
    let public = std::fs::read_to_string(key.with_extension("key.pub")).unwrap();
    let mut text = std::fs::read_to_string(&gw.config).unwrap();
    text.push_str(&format!(
        "\n[ota]\nrelease_public_key = \"{}\"\n",
        public.trim()
    ));
    std::fs::write(&gw.config, text).unwrap();
    let image = gw.dir.path().join("fw.bin");
    std::fs::write(&image, vec![7u8; 600]).unwrap();
    let file = image.to_str().unwrap();
    let sig = cli_ok(
        &gw,
        &[
            "firmware",
            "sign",
            file,
            "--key",
            key.to_str().unwrap(),
            "--version",
            "2.0.0",
        ],
    );
    cli_ok(
        &gw,
        &[
            "firmware",
            "add",
            file,
            "--version",
            "2.0.0",
            "--signature",
            sig.trim(),
        ],
    );
    gw.add_meter("PERS1", SECRET);
    gw.start();

    let (mut m, _) = RawMeter::connect(gw.broker, "PERS1", "PERS1", SECRET, false, None);
    m.subscribe("smartmeter/PERS1/command/#", 1);
    m.next_publish("smartmeter/PERS1/command/balance");
    m.disconnect();
    gw.wait_log("meter disconnected");
    cli_ok(
        &gw,
        &[
            "firmware",
            "rollout",
            "--version",
            "2.0.0",
            "--meters",
            "PERS1",
        ],
    );
    gw.wait_log("firmware rollout: announcing");

    let (mut m, code) = RawMeter::connect(gw.broker, "PERS1", "PERS1", SECRET, false, None);
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let offer = m.next_publish("smartmeter/PERS1/command/ota");
    let o: serde_json::Value = serde_json::from_slice(&offer.payload).unwrap();
    assert_eq!(o["version"], "2.0.0");
}

/// The monthly summary summed a month's energy from its consumption events, which the outbox
/// removes `[outbox] retention` (30 days) after delivery: last month exported mid-month showed
/// part of its energy, an older month 0 kWh for every meter, with nothing to tell. The hourly
/// usage store keeps 400 days.
#[test]
fn the_monthly_summary_keeps_a_months_energy_after_its_events_were_pruned() {
    let gw = with_token();
    let auth = format!("Bearer {TOKEN}");
    let clock = |ms: i64| {
        let body = format!(r#"{{"nowMs":{ms}}}"#);
        let (s, v) = http(
            gw.api,
            "POST",
            "/api/debug/clock",
            Some(&body),
            &[("Authorization", &auth)],
        );
        assert_eq!(s, 200, "{v}");
    };
    let march_10 = 1_804_680_000_000; // 2027-03-10T12:00Z
    clock(march_10);
    gw.add_meter("MONTH1", SECRET);
    let mut m = gw.connect("MONTH1", SECRET);
    m.publish_acked(
        "smartmeter/MONTH1/consumption",
        &v2_payload("MONTH1", 1, 0),
        1,
    );
    m.publish_acked(
        "smartmeter/MONTH1/consumption",
        &v2_payload("MONTH1", 2, 300),
        2,
    );
    drop(m);
    let cookie = dashboard_sign_in(&gw, TOKEN);
    let energy = || {
        let (s, v) = http(
            gw.api,
            "GET",
            "/dashboard/export/month.csv?month=2027-03",
            None,
            &[("Cookie", &cookie)],
        );
        assert_eq!(s, 200, "{v}");
        let csv = v.as_str().unwrap().to_string();
        let row = csv
            .lines()
            .find(|l| l.contains("MONTH1"))
            .unwrap()
            .to_string();
        row.split(',').nth(3).unwrap().to_string()
    };
    clock(march_10 + DAY);
    assert_eq!(energy(), "300");
    // Two months on, the outbox's housekeeping (every 5 s) removes March's events.
    clock(1_810_814_400_000); // 2027-05-20T12:00Z
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    eventually("March's consumption events to be pruned", || {
        let n: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM events WHERE kind = 'consumption' AND at < ?1",
                [march_10 + DAY],
                |r| r.get(0),
            )
            .unwrap();
        (n == 0).then_some(())
    });
    assert_eq!(energy(), "300");
}

/// README's "Behind HTTPS" has a reverse proxy on the gateway forward to the loopback admin
/// API, where no `token_file` is needed: the dashboard then asked for a password while every
/// `/api/…` route (meters with names and phones, applying payments, adding meters, firmware
/// rollouts) answered anyone reaching the proxy. A token-less API now answers local requests
/// only: a proxy's forwarding headers or a Host that is not loopback (the name a proxy passes
/// through, or a DNS-rebinding page's) get 403 and a pointer to `token_file`.
#[test]
fn a_token_less_admin_api_refuses_requests_through_a_proxy_or_under_a_foreign_host() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("PROXY1", SECRET);
    let api = gw.api.to_string();
    for headers in [
        vec![("Host", "gateway.example.com")],
        vec![("Host", "192.168.1.10:443")],
        vec![("Host", api.as_str()), ("X-Forwarded-For", "203.0.113.7")],
        vec![("Host", api.as_str()), ("Forwarded", "for=203.0.113.7")],
        vec![("Host", api.as_str()), ("X-Real-IP", "203.0.113.7")],
        vec![("Host", "evil.example:8080")],
    ] {
        for (method, path) in [
            ("GET", "/api/meters"),
            ("GET", "/metrics"),
            ("GET", "/dashboard/login"),
        ] {
            let (s, v) = raw_http(&gw, method, path, &headers);
            assert_eq!(s, 403, "{method} {path} {headers:?}: {v}");
            if path.starts_with("/api") {
                assert!(v.contains("token_file"), "{v}");
            }
        }
    }
    // Local requests as before, and probes from anywhere.
    for host in [api.as_str(), "localhost:8080", "127.0.0.1", "[::1]:8080"] {
        let (s, v) = raw_http(&gw, "GET", "/api/meters", &[("Host", host)]);
        assert_eq!(s, 200, "{host}: {v}");
    }
    let (s, _) = raw_http(&gw, "GET", "/health", &[("Host", "gateway.example.com")]);
    assert_eq!(s, 200);
    assert!(gw.metric("umeme_http_rejected_total{reason=\"not_local\"}") >= 18.0);
}

/// One request with exactly `headers` (and `Connection: close`): status and body.
fn raw_http(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// The dashboard's exports read the whole period (the monthly summary scans the events table
/// three times: 4.3 s for 2 million events on the review machine) on the daemon's one shared
/// read connection, which every meter CONNECT also needs for its secret: during an export no
/// meter could sign in. Exports now read on a connection of their own.
#[test]
fn a_meter_signs_in_while_a_long_monthly_export_runs() {
    let gw = with_token();
    gw.add_meter("BUSY1", SECRET);
    // Two million consumption events of the last 23 days, straight into the file (already
    // folded: the export reads them, the writer has nothing to do).
    {
        let db = rusqlite::Connection::open(gw.db_path()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        db.execute_batch(&format!(
            "BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000)
             INSERT INTO events (kind, meter, at, data)
               SELECT 'consumption', 'BUSY1', {start} + i, zeroblob(35) FROM n;
             UPDATE meta SET value = (SELECT MAX(seq) FROM events) WHERE key = 'folded_seq';
             COMMIT;",
            start = now - 23 * DAY
        ))
        .unwrap();
    }
    let cookie = dashboard_sign_in(&gw, TOKEN);
    // The current UTC month: the local one but for 3 hours at its edges; either holds events.
    let month = {
        let days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            / 86_400;
        let (y, m, _) = umeme_plugin_sdk::civil_from_days(days);
        format!("{y:04}-{m:02}")
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = || !done.load(std::sync::atomic::Ordering::SeqCst);
    let export = {
        let (api, done) = (gw.api, done.clone());
        std::thread::spawn(move || {
            let (s, _) = http(
                api,
                "GET",
                &format!("/dashboard/export/month.csv?month={month}"),
                None,
                &[("Cookie", &cookie)],
            );
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            s
        })
    };
    // Sign-ins one after another while the export runs: with the reader held by the export,
    // at most the first slips in before it.
    let mut during = 0;
    while running() && during < 3 {
        let m = gw.connect("BUSY1", SECRET);
        if running() {
            during += 1;
        }
        m.disconnect();
    }
    assert_eq!(export.join().unwrap(), 200);
    assert_eq!(during, 3, "meters could not sign in during the export");
}
