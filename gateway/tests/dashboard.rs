//! The web dashboard on the real binary: sessions, CSRF, headers, live updates, exports,
//! page weight, and the end-to-end run in headless Chromium (`tests/browser/`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_tool, v2_payload, Gateway};
use rumqttc::mqttbytes::QoS;

const TOKEN: &str = "dashboard-test-token-0123456789";

/// A gateway whose admin API has a token file.
fn gateway(extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.keep().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut gw = Gateway::new(&format!(
        "token_file = {:?}\n{extra}",
        token.display().to_string()
    ));
    gw.start();
    gw
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 request with the Host the browser would send.
fn request(
    api: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Answer {
        status: head.split(' ').nth(1).unwrap().parse().unwrap(),
        head: head.to_string(),
        body: body.to_string(),
    }
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

fn origin(api: SocketAddr) -> String {
    format!("http://{api}")
}

/// Signs in; returns the cookie header value and the session's CSRF token.
fn sign_in(gw: &Gateway, secret: &str) -> (String, String) {
    let o = origin(gw.api);
    let a = request(
        gw.api,
        "POST",
        "/dashboard/login",
        &[FORM, ("Origin", &o)],
        &format!("secret={secret}"),
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let set = a.header("Set-Cookie").expect("a session cookie");
    let cookie = set.split(';').next().unwrap().to_string();
    let page = request(gw.api, "GET", "/dashboard", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200);
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF field")
        .to_string();
    (cookie, csrf)
}

#[test]
fn nothing_of_the_dashboard_or_its_data_is_served_without_a_session() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let page = request(gw.api, "GET", "/dashboard/meters/METER001", &[], "");
    assert_eq!(page.status, 303);
    assert_eq!(page.header("Location").as_deref(), Some("/dashboard/login"));
    for path in [
        "/dashboard/live",
        "/dashboard/export/payments.csv",
        "/dashboard/export/month.csv?month=2026-11",
        "/api/meters",
    ] {
        let a = request(gw.api, "GET", path, &[], "");
        assert_eq!(a.status, 401, "{path}: {}", a.body);
        assert!(!a.body.contains("METER001"), "{path}");
    }
    let o = origin(gw.api);
    let post = request(
        gw.api,
        "POST",
        "/dashboard/meters/METER001/topup",
        &[FORM, ("Origin", &o)],
        "amount=10&reference=X",
    );
    assert_eq!(post.status, 401);
    let forged = request(
        gw.api,
        "GET",
        "/dashboard",
        &[("Cookie", "umeme_session=00ff")],
        "",
    );
    assert_eq!(forged.status, 303, "an unknown session id is no session");
    assert_eq!(gw.balance_wh_with_token("METER001"), 0);
}

trait TokenReads {
    fn balance_wh_with_token(&self, id: &str) -> i64;
}

impl TokenReads for Gateway {
    fn balance_wh_with_token(&self, id: &str) -> i64 {
        let (status, v) = common::http(
            self.api,
            "GET",
            &format!("/api/meters/{id}"),
            None,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        );
        assert_eq!(status, 200, "{v}");
        v["balance_wh"].as_i64().unwrap()
    }
}

#[test]
fn a_post_without_the_csrf_token_or_from_another_origin_is_refused_with_403() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    let path = "/dashboard/meters/METER001/topup";
    let no_token = request(
        gw.api,
        "POST",
        path,
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        "amount=100&reference=R1",
    );
    assert_eq!(no_token.status, 403, "{}", no_token.body);
    let wrong = request(
        gw.api,
        "POST",
        path,
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        "csrf=00&amount=100&reference=R1",
    );
    assert_eq!(wrong.status, 403);
    let body = format!("csrf={csrf}&amount=100&reference=R1");
    let foreign = request(
        gw.api,
        "POST",
        path,
        &[FORM, ("Origin", "http://evil.example"), ("Cookie", &cookie)],
        &body,
    );
    assert_eq!(foreign.status, 403);
    let no_origin = request(gw.api, "POST", path, &[FORM, ("Cookie", &cookie)], &body);
    assert_eq!(no_origin.status, 403, "neither Origin nor Referer");
    assert_eq!(gw.balance_wh_with_token("METER001"), 0, "nothing credited");
    assert_eq!(
        gw.metric("umeme_dashboard_refused_total{reason=\"csrf\"}"),
        2.0
    );
    assert_eq!(
        gw.metric("umeme_dashboard_refused_total{reason=\"cross_origin\"}"),
        2.0
    );
    // The header form of the token, from this origin, is accepted.
    let ok = request(
        gw.api,
        "POST",
        path,
        &[
            FORM,
            ("Origin", &o),
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
        ],
        "amount=100&reference=R1",
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert!(gw.balance_wh_with_token("METER001") > 0);
    // A session reads the admin API's data (the chart's fetch) but cannot write through it.
    let read = request(
        gw.api,
        "GET",
        "/api/meters/METER001",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(read.status, 200);
    let write = request(
        gw.api,
        "POST",
        "/api/meters",
        &[("Cookie", &cookie), ("Content-Type", "application/json")],
        r#"{"id":"METER002"}"#,
    );
    assert_eq!(write.status, 401);
}

#[test]
fn pages_carry_a_csp_without_inline_script_deny_framing_and_are_not_cached() {
    let gw = gateway("");
    let (cookie, _) = sign_in(&gw, TOKEN);
    for path in [
        "/dashboard",
        "/dashboard/login",
        "/dashboard/meters",
        "/dashboard/payments",
    ] {
        let a = request(gw.api, "GET", path, &[("Cookie", &cookie)], "");
        assert_eq!(a.status, 200, "{path}");
        let csp = a.header("Content-Security-Policy").unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"));
        assert_eq!(a.header("X-Frame-Options").as_deref(), Some("DENY"));
        assert_eq!(a.header("Cache-Control").as_deref(), Some("no-store"));
        assert!(!a.body.contains("<script>"), "no inline script in {path}");
        assert!(!a.body.contains("style=\""), "no inline style in {path}");
    }
}

#[test]
fn the_session_cookie_is_httponly_samesite_strict_and_secure_when_configured() {
    let gw = gateway("dashboard_secure_cookies = true\n");
    let o = origin(gw.api);
    let a = request(
        gw.api,
        "POST",
        "/dashboard/login",
        &[FORM, ("Origin", &o)],
        &format!("secret={TOKEN}"),
    );
    let c = a.header("Set-Cookie").unwrap();
    assert!(c.starts_with("umeme_session="), "{c}");
    let value = c
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("umeme_session=")
        .unwrap();
    assert_eq!(value.len(), 64, "32 random bytes in hex");
    for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(c.contains(part), "{part} in {c}");
    }
    let plain = gateway("");
    let a = request(
        plain.api,
        "POST",
        "/dashboard/login",
        &[FORM, ("Origin", &origin(plain.api))],
        &format!("secret={TOKEN}"),
    );
    assert!(!a.header("Set-Cookie").unwrap().contains("Secure"));
}

#[test]
fn the_operator_password_from_the_cli_signs_in_and_failed_sign_ins_are_limited_per_address() {
    let mut gw = Gateway::new("");
    gw.start();
    let mut child = Command::new(common::BIN)
        .args(["operator", "password", "--config"])
        .arg(&gw.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"caretaker-pass-2026\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let stored: String = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'operator_password'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        stored.starts_with("$argon2id$"),
        "hashed, not stored: {stored}"
    );

    let (cookie, _) = sign_in(&gw, "caretaker-pass-2026");
    assert!(cookie.starts_with("umeme_session="));
    let o = origin(gw.api);
    for _ in 0..5 {
        let a = request(
            gw.api,
            "POST",
            "/dashboard/login",
            &[FORM, ("Origin", &o)],
            "secret=wrong-password-<x>",
        );
        assert_eq!(a.status, 401);
    }
    let a = request(
        gw.api,
        "POST",
        "/dashboard/login",
        &[FORM, ("Origin", &o)],
        "secret=caretaker-pass-2026",
    );
    assert_eq!(a.status, 429, "throttled even with the right password");
    assert!(a.header("Set-Cookie").is_none());
    assert_eq!(
        gw.metric("umeme_dashboard_signin_total{outcome=\"failed\"}"),
        5.0
    );
    assert_eq!(
        gw.metric("umeme_dashboard_signin_total{outcome=\"throttled\"}"),
        1.0
    );
    let line = gw.wait_log("dashboard sign-in failed");
    assert!(line.contains("127.0.0.1"), "{line}");
    // A sign-in form posted from another site is refused before any check.
    let a = request(
        gw.api,
        "POST",
        "/dashboard/login",
        &[FORM, ("Origin", "http://evil.example")],
        "secret=caretaker-pass-2026",
    );
    assert_eq!(a.status, 403);
}

#[test]
fn a_short_operator_password_is_refused_by_the_cli() {
    let gw = Gateway::new("");
    let mut child = Command::new(common::BIN)
        .args(["operator", "password", "--config"])
        .arg(&gw.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"short\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("10 to 128 characters"));
}

/// Reads server-sent events from `/dashboard/live` on a raw connection.
struct Stream(BufReader<TcpStream>);

impl Stream {
    fn open(api: SocketAddr, cookie: &str) -> Stream {
        let mut s = TcpStream::connect(api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /dashboard/live HTTP/1.1\r\nHost: {api}\r\nCookie: {cookie}\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        Stream(r)
    }

    /// The next `event:` name, or `None` when the stream ended.
    fn next_event(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.0.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {
                    if let Some(e) = line.trim().strip_prefix("event: ") {
                        return Some(e.to_string());
                    }
                    // A chunked body ends with a zero-length chunk.
                    if line.trim() == "0" {
                        return None;
                    }
                }
                Err(e) => panic!("stream read failed: {e}"),
            }
        }
    }
}

#[test]
fn a_report_reaches_the_live_stream_within_two_seconds_and_the_stream_ends_at_sign_out() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let mut live = Stream::open(gw.api, &cookie);
    assert_eq!(live.next_event().as_deref(), Some("hello"));
    let mut meter = gw.connect("METER001", "secret-001");
    // The connection's own presence change may come first; wait for it to pass.
    assert_eq!(live.next_event().as_deref(), Some("change"));
    let t0 = Instant::now();
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 500),
        1,
    );
    assert_eq!(live.next_event().as_deref(), Some("change"));
    let took = t0.elapsed();
    println!("report → live event: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A payment too.
    let t0 = Instant::now();
    let (status, v) = common::http(
        gw.api,
        "POST",
        "/daraja/simulate",
        Some(r#"{"meter_no":"METER001","amount":20}"#),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(live.next_event().as_deref(), Some("change"));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let o = origin(gw.api);
    let out = request(
        gw.api,
        "POST",
        "/dashboard/logout",
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        &format!("csrf={csrf}"),
    );
    assert_eq!(out.status, 303);
    assert!(out.header("Set-Cookie").unwrap().contains("Max-Age=0"));
    let t0 = Instant::now();
    assert_eq!(live.next_event(), None, "the stream ends after sign-out");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let after = request(gw.api, "GET", "/dashboard", &[("Cookie", &cookie)], "");
    assert_eq!(after.status, 303);
    drop(meter);
    let _ = QoS::AtLeastOnce;
}

#[test]
fn live_streams_are_bounded() {
    let gw = gateway("max_connections_per_ip = 64\n");
    let (cookie, _) = sign_in(&gw, TOKEN);
    let streams: Vec<Stream> = (0..16).map(|_| Stream::open(gw.api, &cookie)).collect();
    let a = request(gw.api, "GET", "/dashboard/live", &[("Cookie", &cookie)], "");
    assert_eq!(a.status, 503);
    assert_eq!(gw.metric("umeme_dashboard_streams"), 16.0);
    drop(streams);
}

#[test]
fn the_csv_exports_are_injection_safe_and_add_up() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    for (amount, reference) in [("100", "%3D1%2B1"), ("50.5", "R%2C2")] {
        let a = request(
            gw.api,
            "POST",
            "/dashboard/meters/METER001/topup",
            &[FORM, ("Origin", &o), ("Cookie", &cookie)],
            &format!("csrf={csrf}&amount={amount}&reference={reference}"),
        );
        assert_eq!(a.status, 303);
    }
    let mut meter = gw.connect("METER001", "secret-001");
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 1_000),
        1,
    );
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 1_400),
        2,
    );
    let overview = request(gw.api, "GET", "/dashboard", &[("Cookie", &cookie)], "");
    assert!(
        overview
            .body
            .contains("Energy today</span><span class=\"v\">0.40 kWh"),
        "{}",
        overview.body
    );
    assert!(
        overview
            .body
            .contains("Payments today</span><span class=\"v\">KES 150.50"),
        "{}",
        overview.body
    );
    let csv = request(
        gw.api,
        "GET",
        "/dashboard/export/payments.csv",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(csv.status, 200);
    assert!(csv.header("Content-Type").unwrap().starts_with("text/csv"));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(
        lines[0],
        "time,meter,source,reference,amount_kes,credit_wh,balance_after_wh"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(",METER001,cash,'=1+1,100.00,")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(",METER001,cash,\"R,2\",50.50,")),
        "{lines:?}"
    );
    assert!(csv.body.contains("\r\n"));
    for (range, rows) in [
        ("from=2099-01-01", 0),
        ("to=2000-01-01", 0),
        ("from=2000-01-01&to=2099-12-31", 2),
    ] {
        let a = request(
            gw.api,
            "GET",
            &format!("/dashboard/export/payments.csv?{range}"),
            &[("Cookie", &cookie)],
            "",
        );
        assert_eq!(a.status, 200);
        assert_eq!(a.body.lines().count(), 1 + rows, "{range}: {}", a.body);
    }
    let bad = request(
        gw.api,
        "GET",
        "/dashboard/export/payments.csv?from=yesterday",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(bad.status, 400);

    let month = {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        umeme_plugin_sdk::iso8601_utc(ms + 3 * 3600 * 1000)[..7].to_string()
    };
    let m = request(
        gw.api,
        "GET",
        &format!("/dashboard/export/month.csv?month={month}"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(m.status, 200, "{}", m.body);
    let row = m
        .body
        .lines()
        .find(|l| l.contains("METER001"))
        .unwrap()
        .to_string();
    let cells: Vec<&str> = row.split(',').collect();
    // month, meter, name, energy_wh, payments, paid_kes, credit_wh, opening, closing
    assert_eq!(cells[4], "2");
    assert_eq!(cells[5], "150.50");
    let (energy, credit, opening, closing): (i64, i64, i64, i64) = (
        cells[3].parse().unwrap(),
        cells[6].parse().unwrap(),
        cells[7].parse().unwrap(),
        cells[8].parse().unwrap(),
    );
    assert_eq!(opening, 0, "provisioned this month");
    assert_eq!(closing, opening + credit - energy, "{row}");
    assert_eq!(closing, gw.balance_wh_with_token("METER001"));
    let bad = request(
        gw.api,
        "GET",
        "/dashboard/export/month.csv?month=2026-13",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(bad.status, 400);
}

#[test]
fn the_overview_with_its_assets_weighs_under_300_kb() {
    let gw = gateway("");
    for i in 0..20 {
        gw.add_meter(&format!("M{i:05}"), "secret-001");
    }
    let (cookie, _) = sign_in(&gw, TOKEN);
    let page = request(gw.api, "GET", "/dashboard", &[("Cookie", &cookie)], "");
    let mut total = page.body.len();
    for asset in ["/dashboard/assets/app.css", "/dashboard/assets/app.js"] {
        assert!(page.body.contains(asset));
        let a = request(gw.api, "GET", asset, &[], "");
        assert_eq!(a.status, 200);
        total += a.body.len();
    }
    let meters = request(
        gw.api,
        "GET",
        "/dashboard/meters",
        &[("Cookie", &cookie)],
        "",
    );
    println!(
        "overview with assets: {total} bytes; meters table of 20: {} bytes",
        meters.body.len()
    );
    assert!(total <= 300 * 1024, "{total}");
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no external resource"
    );
}

#[test]
fn a_meter_name_is_escaped_wherever_it_is_shown() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    let evil = "%3Cscript%3Ealert(1)%3C%2Fscript%3E%22";
    let a = request(
        gw.api,
        "POST",
        "/dashboard/meters/METER001/details",
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        &format!("csrf={csrf}&name={evil}&phone=0712000000"),
    );
    assert_eq!(a.status, 303);
    for path in ["/dashboard/meters", "/dashboard/meters/METER001"] {
        let p = request(gw.api, "GET", path, &[("Cookie", &cookie)], "");
        assert!(!p.body.contains("<script>alert"), "{path}");
        assert!(
            p.body
                .contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;"),
            "{path}"
        );
    }
    let (status, v) = common::http(
        gw.api,
        "GET",
        "/api/meters/METER001",
        None,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(status, 200);
    assert_eq!(v["name"], "<script>alert(1)</script>\"");
    assert_eq!(v["phone"], "0712000000");
}

#[test]
fn rotating_a_secret_shows_the_new_one_once_and_it_connects() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    let a = request(
        gw.api,
        "POST",
        "/dashboard/meters/METER001/secret",
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        &format!("csrf={csrf}"),
    );
    assert_eq!(a.status, 200);
    let secret = a
        .body
        .split("id=\"new-secret\" class=\"secret\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(secret.len(), 32);
    let page = request(
        gw.api,
        "GET",
        "/dashboard/meters/METER001",
        &[("Cookie", &cookie)],
        "",
    );
    assert!(!page.body.contains(&secret), "never shown again");
    gw.connect("METER001", &secret);
}

fn browser_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(name)
}

#[test]
fn in_headless_chromium_an_operator_signs_in_sees_a_report_live_tops_up_cuts_the_relay_and_exports()
{
    require_tool("chromium");
    require_tool("chromedriver");
    require_tool("mosquitto_pub");
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let out = Command::new("python3")
        .arg(browser_script("dashboard_e2e.py"))
        .args(["--url", &format!("http://{}", gw.api)])
        .args(["--token", TOKEN])
        .args(["--broker", &gw.broker.to_string()])
        .args(["--meter", "METER001", "--secret", "secret-001"])
        .current_dir(browser_script(""))
        .output()
        .expect("python3 runs");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!("gateway log:\n{}", gw.log_text());
        eprintln!("streams open: {}", gw.metric("umeme_dashboard_streams"));
    }
    assert!(
        out.status.success(),
        "the browser run failed: {:?}",
        out.status
    );
}

#[test]
fn an_unapplied_payment_is_applied_to_a_meter_from_the_payments_page_once() {
    use umeme_gateway::store::{self, UnappliedRow};
    use umeme_gateway::writer::{self, LedgerSettings, Op};
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    // Kept as a payment source keeps one (the ledger's own op, on the same file, as the CLI
    // writes beside the daemon).
    let mut conn = store::open(&gw.db_path(), "test-site").unwrap();
    let op = Op::RecordUnapplied(UnappliedRow {
        source: "mpesa".into(),
        reference: "RKTQDM7W6S".into(),
        amount_cents: 30_000,
        account: "METER0O1".into(),
        phone: None,
        reason: "unknown account".into(),
        raw: None,
        received_at: store::now_ms(),
        applied_meter: None,
        applied_at: None,
    });
    let settings = LedgerSettings {
        rules: umeme_gateway::ledger::Rules { low_balance_wh: 0 },
        tariff: umeme_gateway::config::Tariff::try_from(0.05).unwrap(),
    };
    writer::apply_now(&mut conn, &op, &settings).unwrap();
    drop(conn);

    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let page = request(
        gw.api,
        "GET",
        "/dashboard/payments",
        &[("Cookie", &cookie)],
        "",
    );
    assert!(page.body.contains("RKTQDM7W6S") && page.body.contains("METER0O1"));
    let o = origin(gw.api);
    let body = format!("csrf={csrf}&reference=RKTQDM7W6S&source=mpesa&meter=METER001");
    for expected in ["Payment RKTQDM7W6S credited to METER001", "Apply refused"] {
        let a = request(
            gw.api,
            "POST",
            "/dashboard/payments/apply",
            &[FORM, ("Origin", &o), ("Cookie", &cookie)],
            &body,
        );
        assert_eq!(a.status, 303, "{}", a.body);
        let after = request(
            gw.api,
            "GET",
            "/dashboard/payments",
            &[("Cookie", &cookie)],
            "",
        );
        assert!(after.body.contains(expected), "{expected}: {}", after.body);
    }
    // 300 KES at the default 0.05 units per KES: 15 units, once.
    assert_eq!(gw.balance_wh_with_token("METER001"), 15_000);
    assert_eq!(
        gw.metric("umeme_dashboard_refused_total{reason=\"apply_refused\"}"),
        1.0
    );
    gw.assert_log("dashboard action refused");
}

#[test]
fn an_open_live_stream_does_not_hold_up_the_daemons_stop() {
    let mut gw = gateway("");
    let (cookie, _) = sign_in(&gw, TOKEN);
    let mut live = Stream::open(gw.api, &cookie);
    assert_eq!(live.next_event().as_deref(), Some("hello"));
    let t0 = Instant::now();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(gw.pid().unwrap() as i32, libc::SIGTERM) };
    // A commit at stop (the last fold, a timer's op) may still ring the stream first.
    let mut before_end = 0;
    while let Some(event) = live.next_event() {
        assert_eq!(event, "change", "only changes before the end");
        before_end += 1;
        assert!(before_end <= 5, "the stream ends");
    }
    common::eventually("the daemon to exit", || (!gw.is_running()).then_some(()));
    println!(
        "stopped {:?} after SIGTERM with a live stream open",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A bearer-token call of the admin API.
fn api(gw: &Gateway, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let (status, v) = common::http(
        gw.api,
        method,
        path,
        body,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {v}"
    );
    v
}

/// The region of a page with this id, up to the next region (enough for `contains`).
fn region<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {page}"));
    let rest = &page[start..];
    let end = rest.find("</section>").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn an_alert_shows_open_with_since_when_in_plain_words_then_resolved_on_the_overview_and_meter_page()
{
    let gw = gateway("");
    gw.add_meter("BYPASS1", "secret-001");
    let (cookie, _) = sign_in(&gw, TOKEN);
    let get = |path: &str| request(gw.api, "GET", path, &[("Cookie", &cookie)], "").body;
    let overview = get("/dashboard");
    assert!(region(&overview, "alerts").contains("Nothing open."));
    let mut meter = gw.connect("BYPASS1", "secret-001");
    let report = |meter: &mut common::RawMeter, seq: u32, power: f64| {
        let body = format!(
            r#"{{"v":2,"meterNo":"BYPASS1","seq":{seq},"energyWh":{},"powerW":{power},"relay":"off"}}"#,
            seq * 10
        );
        meter.publish_acked("smartmeter/BYPASS1/consumption", &body, seq as u16);
    };
    report(&mut meter, 1, 800.0);
    let now = api(&gw, "POST", "/api/debug/clock", Some("{}"))["nowMs"]
        .as_i64()
        .unwrap();
    let words = "Power drawn while the relay is off (tamper or bypass)";
    for path in ["/dashboard", "/dashboard/meters/BYPASS1"] {
        let page = get(path);
        let id = if path == "/dashboard" {
            "alerts"
        } else {
            "meter-alerts"
        };
        let panel = region(&page, id);
        let open = panel
            .split("class=\"list open-alerts\"")
            .nth(1)
            .unwrap_or_else(|| panic!("{path}: no open episode in {panel}"));
        assert!(
            open.contains(words) && open.contains("since "),
            "{path}: {panel}"
        );
        assert!(panel.contains(&format!("{words}: raised — 800 W with the relay off")));
    }
    assert!(region(&get("/dashboard"), "alerts").contains("href=\"/dashboard/meters/BYPASS1\""));
    // The bypass is removed: the episode ends, and says since when it was open.
    report(&mut meter, 2, 0.0);
    api(
        &gw,
        "POST",
        "/api/debug/clock",
        Some(&format!(r#"{{"nowMs":{}}}"#, now + 60_000)),
    );
    let page = get("/dashboard");
    let panel = region(&page, "alerts");
    assert!(panel.contains("Nothing open."), "{panel}");
    assert!(
        panel.contains(&format!("{words}: resolved (raised ")),
        "{panel}"
    );
    let meter_page = get("/dashboard/meters/BYPASS1");
    assert!(region(&meter_page, "events").contains(&format!("{words}: resolved")));
}

#[test]
fn the_overview_charts_the_site_loss_per_day_from_the_main_supply() {
    let gw = gateway("");
    gw.add_meter("METER001", "secret-001");
    let (cookie, _) = sign_in(&gw, TOKEN);
    let get = |path: &str| request(gw.api, "GET", path, &[("Cookie", &cookie)], "").body;
    assert!(region(&get("/dashboard"), "loss").contains("No main supply yet"));
    let mut meter = gw.connect("METER001", "secret-001");
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 1_000),
        1,
    );
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 9_500),
        2,
    );
    // Today's bulk supply read by hand: 10 kWh, of which the meter used 8.5.
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let today = umeme_plugin_sdk::iso8601_utc(ms + 3 * 3600 * 1000)[..10].to_string();
    api(
        &gw,
        "POST",
        "/api/site/readings",
        Some(&format!(r#"{{"day":"{today}","kwh":10}}"#)),
    );
    let page = get("/dashboard");
    let loss = region(&page, "loss");
    assert!(loss.contains("<svg"), "{loss}");
    assert!(
        loss.contains("1.50 kWh lost") || loss.contains("1.5 kWh lost"),
        "{loss}"
    );
    assert!(
        loss.contains(&format!(
            "{today}: supply 10.00 kWh (reading by hand), meters 8.50 kWh, loss 1.50 kWh (15.0 %)"
        )),
        "{loss}"
    );
    // Energy today comes from the hourly usage store, reports not folded yet included.
    assert!(
        page.contains("Energy today</span><span class=\"v\">8.50 kWh"),
        "{}",
        region(&page, "stats")
    );
}

const TARIFFS: &str = r#"
[ledger]
default_tariff = "domestic"

[[tariffs]]
name = "domestic"
bands = [{ from_kwh = 0, price = "20" }]
emergency_credit = "100.00"

[[tariffs]]
name = "plain"
bands = [{ from_kwh = 0, price = "25" }]
"#;

#[test]
fn money_shows_in_kes_and_the_tariff_and_emergency_credit_are_set_from_the_meter_page() {
    let gw = gateway(TARIFFS);
    gw.add_meter("METER001", "secret-001");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    let get = |path: &str| request(gw.api, "GET", path, &[("Cookie", &cookie)], "").body;
    let post = |path: &str, body: &str| {
        let a = request(
            gw.api,
            "POST",
            path,
            &[FORM, ("Origin", &o), ("Cookie", &cookie)],
            body,
        );
        assert_eq!(a.status, 303, "{path}: {}", a.body);
    };
    post(
        "/dashboard/meters/METER001/topup",
        &format!("csrf={csrf}&amount=500&reference=CASH-1"),
    );
    let mut meter = gw.connect("METER001", "secret-001");
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 1_000),
        1,
    );
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 3_000),
        2,
    );
    // 2 kWh at KES 20: KES 460 left.
    let table = get("/dashboard/meters");
    assert!(table.contains("KES 460.00"), "{table}");
    assert!(table.contains("domestic (site default)"), "{table}");
    let page = get("/dashboard/meters/METER001");
    assert!(
        page.contains("id=\"balance\">KES 460.00<"),
        "{}",
        region(&page, "summary")
    );
    assert!(region(&page, "summary").contains("domestic (site default)"));
    let statement = region(&page, "statement");
    for part in [
        "Payments (1)",
        "KES 500.00",
        "Energy (2.00 kWh)",
        "KES 40.00",
        "Closing balance",
    ] {
        assert!(statement.contains(part), "{part}: {statement}");
    }
    assert!(!statement.contains("does not add up"), "{statement}");

    // The tariff: the same op as `meter set --tariff`; an unknown name is refused.
    post(
        "/dashboard/meters/METER001/tariff",
        &format!("csrf={csrf}&tariff=plain"),
    );
    assert_eq!(
        api(&gw, "GET", "/api/meters/METER001", None)["tariff"],
        "plain"
    );
    let page = get("/dashboard/meters/METER001");
    assert!(page.contains("METER001: tariff plain."), "flash");
    assert!(page.contains("<option value=\"plain\" selected>"));
    post(
        "/dashboard/meters/METER001/tariff",
        &format!("csrf={csrf}&tariff=%3Cb%3Enope"),
    );
    let page = get("/dashboard/meters/METER001");
    assert!(page.contains("Tariff refused: unknown tariff"), "{page}");
    assert!(!page.contains("<b>nope"), "escaped");
    assert_eq!(
        gw.metric("umeme_dashboard_refused_total{reason=\"tariff_refused\"}"),
        1.0
    );
    // Emergency credit: refused on a tariff without it, granted once on one with it.
    post(
        "/dashboard/meters/METER001/emergency",
        &format!("csrf={csrf}"),
    );
    assert!(get("/dashboard/meters/METER001")
        .contains("Emergency credit refused: this tariff offers no emergency credit."));
    post(
        "/dashboard/meters/METER001/tariff",
        &format!("csrf={csrf}&tariff=default"),
    );
    assert!(api(&gw, "GET", "/api/meters/METER001", None)["tariff"].is_null());
    post(
        "/dashboard/meters/METER001/emergency",
        &format!("csrf={csrf}"),
    );
    let page = get("/dashboard/meters/METER001");
    assert!(page.contains("Emergency credit granted to METER001."));
    assert!(page.contains("emergency credit in use"));
    assert_eq!(
        api(&gw, "GET", "/api/meters/METER001", None)["emergency_in_use"],
        true
    );
    post(
        "/dashboard/meters/METER001/emergency",
        &format!("csrf={csrf}"),
    );
    assert!(get("/dashboard/meters/METER001").contains("emergency credit is already in use"));
    // Without the CSRF token nothing changes.
    let forged = request(
        gw.api,
        "POST",
        "/dashboard/meters/METER001/tariff",
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        "tariff=plain",
    );
    assert_eq!(forged.status, 403);
    assert!(api(&gw, "GET", "/api/meters/METER001", None)["tariff"].is_null());
}

#[test]
fn with_tariffs_the_monthly_export_is_each_meters_statement_and_adds_up() {
    let gw = gateway(TARIFFS);
    gw.add_meter("METER001", "secret-001");
    gw.add_meter("METER002", "secret-002");
    let (cookie, csrf) = sign_in(&gw, TOKEN);
    let o = origin(gw.api);
    let a = request(
        gw.api,
        "POST",
        "/dashboard/meters/METER001/topup",
        &[FORM, ("Origin", &o), ("Cookie", &cookie)],
        &format!("csrf={csrf}&amount=300&reference=CASH-2"),
    );
    assert_eq!(a.status, 303);
    let mut meter = gw.connect("METER001", "secret-001");
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 1, 0),
        1,
    );
    meter.publish_acked(
        "smartmeter/METER001/consumption",
        &v2_payload("METER001", 2, 1_234),
        2,
    );
    let month = api(&gw, "GET", "/api/meters/METER001/statement", None)["month"]
        .as_str()
        .unwrap()
        .to_string();
    let csv = request(
        gw.api,
        "GET",
        &format!("/dashboard/export/month.csv?month={month}"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert!(csv
        .header("Content-Disposition")
        .unwrap()
        .contains(&format!("statements-{month}.csv")));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(
        lines[0],
        "month,meter,name,tariffs,opening_balance_kes,opening_debt_kes,payments,paid_kes,energy_wh,consumption_kes,standing_kes,emergency_requests,closing_balance_kes,closing_debt_kes,adds_up"
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    let row: Vec<&str> = lines
        .iter()
        .find(|l| l.contains(",METER001,"))
        .unwrap()
        .split(',')
        .collect();
    // 1.234 kWh at KES 20 = KES 24.68; 300 − 24.68 = 275.32.
    assert_eq!(row[3], "domestic");
    assert_eq!(row[7], "300.00");
    assert_eq!(row[8], "1234");
    assert_eq!(row[9], "24.68");
    assert_eq!(row[12], "275.32");
    assert_eq!(row[14], "yes");
    assert_eq!(
        api(&gw, "GET", "/api/meters/METER001", None)["balance_kes"],
        "275.32"
    );
    let bad = request(
        gw.api,
        "GET",
        "/dashboard/export/month.csv?month=2026-1",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(bad.status, 400);
}
