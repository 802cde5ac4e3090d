//! The HTTP listeners on the real binary: the bearer token on reads, the legacy listener and
//! the original backend's answers, `check-config`'s refusals for an exposed admin API, and a
//! flood of half-open connections under a small open-file limit.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "t0ken-for-tests";

fn token_file(dir: &Path) -> PathBuf {
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    token
}

fn with_token(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    http(
        addr,
        method,
        path,
        body,
        &[("Authorization", auth.as_str())],
    )
}

fn loopback_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[test]
fn with_a_token_file_every_data_read_needs_the_token_and_probes_and_local_metrics_do_not() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let mut gw = Gateway::new(&format!("token_file = {:?}\n", token.display().to_string()));
    gw.start();
    gw.add_meter("METER001", "secret-of-meter-1");
    for path in [
        "/api/meters",
        "/api/meters/METER001",
        "/api/meters/METER001/payments",
        "/api/outbox",
        "/api/nothing-here",
    ] {
        let (status, v) = gw.http("GET", path, None);
        assert_eq!(status, 401, "{path}: {v}");
        assert!(v["error"].is_string(), "{path}: {v}");
        let (status, v) = with_token(gw.api, "GET", path, None);
        let expected = if path == "/api/nothing-here" {
            404
        } else {
            200
        };
        assert_eq!(status, expected, "{path}: {v}");
    }
    let (status, v) = with_token(gw.api, "GET", "/api/meters", None);
    assert_eq!(
        (status, v["meters"][0]["id"].as_str()),
        (200, Some("METER001"))
    );
    let wrong = http(
        gw.api,
        "GET",
        "/api/meters",
        None,
        &[("Authorization", "Bearer t0ken")],
    );
    assert_eq!(wrong.0, 401);
    assert_eq!(gw.http("GET", "/health", None).0, 200);
    assert_eq!(gw.http("GET", "/ready", None).0, 200);
    // The listener is loopback: a local scraper needs no token.
    assert!(gw.metrics().starts_with("HTTP/1.1 200"));
    assert!(
        gw.metric(r#"umeme_http_rejected_total{reason="unauthorized"}"#) >= 6.0,
        "{}",
        gw.metrics()
    );
    gw.assert_log("API request without a valid bearer token refused");
}

#[test]
fn untrusted_fields_of_a_refused_request_are_escaped_in_the_log() {
    let mut gw = Gateway::new("");
    gw.start();
    // serde names the unknown field in its error: the decoded control characters must not
    // reach the journal raw.
    let body = r#"{"id":"METER001","\u001b[2J\n<3>FORGED":1}"#;
    let (status, _) = gw.http("POST", "/api/meters", Some(body));
    assert_eq!(status, 400);
    gw.assert_log(r"\u{1b}[2J\n<3>FORGED");
    assert!(!gw.log_text().contains('\u{1b}'), "raw escape in the log");
    assert!(!gw.log_text().lines().any(|l| l.starts_with("<3>FORGED")));
}

#[test]
fn the_original_firmwares_lookups_are_served_on_the_legacy_listener_and_nowhere_else() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let legacy = loopback_addr();
    let mut gw = Gateway::new(&format!(
        "token_file = {:?}\nlegacy_listen = \"{legacy}\"\n",
        token.display().to_string()
    ));
    gw.start();
    let body = r#"{"id":"METER001","name":"Wanjiku","phone":"0712000000"}"#;
    assert_eq!(with_token(gw.api, "POST", "/api/meters", Some(body)).0, 201);
    let (status, _) = with_token(
        gw.api,
        "POST",
        "/daraja/simulate",
        Some(r#"{"meter_no":"METER001","amount":"10"}"#),
    );
    assert_eq!(status, 200);

    // No token: the original firmware cannot send one.
    let (status, v) = http(legacy, "GET", "/users/METER001/balance", None, &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["meter_no"], "METER001");
    assert_eq!(v["availableUnits"], 0.5);
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    let (status, v) = http(legacy, "GET", "/users/by-meter/METER001", None, &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        serde_json::json!({
            "user_id": "METER001",
            "name": "Wanjiku",
            "email": "",
            "phone_number": "0712000000",
            "meter_no": "METER001",
            "balance": 0.5,
        })
    );

    // Nothing of the admin API on the legacy listener, with or without the token.
    for path in [
        "/api/meters",
        "/api/meters/METER001",
        "/api/outbox",
        "/metrics",
        "/health",
    ] {
        let (status, _) = with_token(legacy, "GET", path, None);
        assert_eq!(status, 404, "{path} on the legacy listener");
    }
    let (status, _) = with_token(
        legacy,
        "POST",
        "/daraja/simulate",
        Some(r#"{"meter_no":"METER001","amount":"10"}"#),
    );
    assert_eq!(status, 404);
    let (status, _) = http(legacy, "POST", "/users/by-meter/METER001", Some("{}"), &[]);
    assert_eq!(status, 405);
    // And the lookups are gone from the admin API.
    let (status, _) = with_token(gw.api, "GET", "/users/by-meter/METER001", None);
    assert_eq!(status, 404);
}

#[test]
fn by_meter_answers_like_the_original_backend_for_missing_fields_and_unknown_meters() {
    let legacy = loopback_addr();
    let mut gw = Gateway::new(&format!("legacy_listen = \"{legacy}\"\n"));
    gw.add_meter("METER002", "secret-of-meter-2");
    gw.start();
    let (status, v) = http(legacy, "GET", "/users/by-meter/METER002", None, &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "Unknown User");
    assert_eq!(v["phone_number"], "");
    assert_eq!(v["email"], "");
    assert_eq!(v["balance"], 0.0);
    let (status, v) = http(legacy, "GET", "/users/by-meter/NOPE1", None, &[]);
    assert_eq!(status, 404);
    assert_eq!(
        v,
        serde_json::json!({"error": "User not found", "meter_no": "NOPE1"})
    );
    let (status, v) = http(legacy, "GET", "/users/NOPE1/balance", None, &[]);
    assert_eq!(status, 404);
    assert_eq!(v["error"], "No user found with meter_no: NOPE1");
}

#[test]
fn simulate_answers_what_the_original_payment_dialog_takes_for_success() {
    let mut gw = Gateway::new("");
    gw.add_meter("METER001", "secret-of-meter-1");
    gw.start();
    let v = gw.simulate("METER001", 100.0);
    // The original dialog: `status === 'SUCCESS'` or `ResponseCode === '0'`, and
    // `transaction_id || OriginatorCoversationID`.
    assert_eq!(v["ResponseCode"], "0");
    assert_eq!(v["status"], "SUCCESS");
    assert!(
        v["transaction_id"]
            .as_str()
            .is_some_and(|t| t.starts_with("SIM-")),
        "{v}"
    );
    assert_eq!(v["transaction_id"], v["reference"]);
    // The gateway's own fields stay.
    assert_eq!(v["units_added"], 5.0);
    assert_eq!(v["duplicate"], false);
}

fn check_config(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &path,
        format!(
            "[gateway]\ndata_dir = {:?}\n{text}",
            data.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_refuses_an_admin_api_off_loopback_without_a_token_at_the_listen_key() {
    let (ok, _, err) = check_config("[api]\nlisten = \"0.0.0.0:8080\"\n");
    assert!(!ok);
    assert!(err.contains("gateway.toml:4:10:"), "{err}");
    assert!(err.contains("token_file"), "{err}");
}

#[test]
fn check_config_refuses_simulate_on_an_admin_api_off_loopback_at_the_allow_simulate_key() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let (ok, _, err) = check_config(&format!(
        "[api]\nlisten = \"192.0.2.1:8080\"\ntoken_file = {:?}\nallow_simulate = true\n",
        token.display().to_string()
    ));
    assert!(!ok);
    assert!(err.contains("gateway.toml:6:18:"), "{err}");
    assert!(err.contains("allow_simulate"), "{err}");
}

#[test]
fn check_config_points_legacy_meter_http_at_legacy_listen() {
    let (ok, _, err) = check_config("[api]\nlegacy_meter_http = true\n");
    assert!(!ok);
    assert!(err.contains("gateway.toml:4:21:"), "{err}");
    assert!(err.contains("legacy_listen"), "{err}");
}

#[test]
fn check_config_refuses_a_header_timeout_over_ten_seconds() {
    let (ok, _, err) = check_config("[api]\nheader_timeout = \"11s\"\n");
    assert!(!ok);
    assert!(err.contains("gateway.toml:4:18:"), "{err}");
}

#[test]
fn check_config_prints_the_fd_budget_and_every_listeners_limits() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let (ok, out, err) = check_config(&format!(
        "[api]\nlisten = \"0.0.0.0:8080\"\ntoken_file = {:?}\nlegacy_listen = \"0.0.0.0:8081\"\n",
        token.display().to_string()
    ));
    assert!(ok, "{err}");
    assert!(out.contains("fd budget: RLIMIT_NOFILE"), "{out}");
    assert!(
        out.contains("admin API on 0.0.0.0:8080: header/idle timeout 10s"),
        "{out}"
    );
    assert!(out.contains("legacy listener on 0.0.0.0:8081"), "{out}");
}

/// A connection from `source` (an address of 127.0.0.0/8) to `to`, sending half a request head.
fn half_open(rt: &tokio::runtime::Runtime, source: [u8; 4], to: SocketAddr) -> Option<TcpStream> {
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().ok()?;
        s.bind(SocketAddr::from((source, 0))).ok()?;
        let s = tokio::time::timeout(Duration::from_secs(5), s.connect(to))
            .await
            .ok()?
            .ok()?;
        let s = s.into_std().ok()?;
        s.set_nonblocking(false).ok()?;
        // A write to a connection the gateway already closed may fail: it still counts.
        let _ = (&s).write_all(b"GET /api/meters HTTP/1.1\r\nHost: x\r\n");
        Some(s)
    })
}

#[test]
fn a_flood_of_half_open_http_connections_under_a_1024_fd_limit_leaves_meters_connecting() {
    const FLOOD: usize = 1_100;
    const ATTEMPTS: usize = 40;
    let legacy = loopback_addr();
    let mut gw = Gateway::new(&format!(
        "legacy_listen = \"{legacy}\"\nheader_timeout = \"3s\"\n"
    ));
    gw.nofile_limit = Some(1024);
    for i in 1..=4 {
        gw.add_meter(&format!("METER00{i}"), &format!("secret-of-meter-{i}"));
    }
    gw.start();
    // The default 2000 meter connections do not fit in 1024 descriptors: lowered, and said so.
    gw.assert_log("fd budget: RLIMIT_NOFILE 1024");
    gw.assert_log("(broker.max_connections 2000 lowered to fit)");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Spread over 110 source addresses so the listener caps, not only the per-address ones,
    // are what holds; half at the admin API, half at the legacy listener.
    let flood_started = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let source = [127, 0, 2 + (i % 2) as u8, 1 + (i / 10) as u8];
        let to = if i % 2 == 0 { gw.api } else { legacy };
        if let Some(s) = half_open(&rt, source, to) {
            flood.push(s);
        }
    }
    assert!(
        flood.len() >= FLOOD * 9 / 10,
        "only {} connections opened",
        flood.len()
    );

    // With the flood held open, meters keep connecting.
    // Bounded: an attempt left when the minute is up counts as failed.
    let until = Instant::now() + Duration::from_secs(60);
    let mut connected = 0;
    for n in (0..ATTEMPTS).take_while(|_| Instant::now() < until) {
        let id = format!("METER00{}", 1 + n % 4);
        let secret = format!("secret-of-meter-{}", 1 + n % 4);
        if let Some((_m, code)) = RawMeter::try_connect(gw.broker, &id, &id, &secret, true, None) {
            if code == rumqttc::ConnectReturnCode::Success {
                connected += 1;
            }
        }
    }
    eprintln!("{connected} of {ATTEMPTS} meter CONNECTs succeeded during the flood");
    assert!(
        connected * 10 >= ATTEMPTS * 9,
        "only {connected} of {ATTEMPTS} meter CONNECTs succeeded during the flood"
    );

    // Every flood connection is closed by the gateway within 60 s of the flood's start.
    let deadline = flood_started + Duration::from_secs(60);
    for s in &mut flood {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a flood connection still open after 60 s: {e}"),
            }
        }
    }
    eprintln!(
        "all {} flood connections closed by the gateway {:?} after the flood began",
        flood.len(),
        flood_started.elapsed()
    );
    drop(flood);
    let refused = gw
        .metric(r#"umeme_http_connections_refused_total{listener="admin",reason="listener_full"}"#)
        + gw.metric(
            r#"umeme_http_connections_refused_total{listener="legacy",reason="listener_full"}"#,
        );
    assert!(refused > 0.0, "{}", gw.metrics());
    assert!(
        gw.metric(r#"umeme_http_timeouts_total{kind="header",listener="admin"}"#) > 0.0
            || gw.metric(r#"umeme_http_timeouts_total{listener="admin",kind="header"}"#) > 0.0,
        "{}",
        gw.metrics()
    );
    assert!(
        !gw.log_text().contains("Too many open files"),
        "{}",
        gw.log_text()
    );
    // And the API answers again.
    assert_eq!(gw.http("GET", "/health", None).0, 200);
}

#[test]
fn off_loopback_the_metrics_need_the_token_too() {
    let keys = tempfile::tempdir().unwrap();
    let token = token_file(keys.path());
    let mut gw = Gateway::new(&format!("token_file = {:?}\n", token.display().to_string()));
    // The same port on every address: the test still reaches it on 127.0.0.1.
    let conf_d = gw.config.parent().unwrap().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(
        conf_d.join("50-exposed.toml"),
        format!(
            "[api]\nlisten = \"0.0.0.0:{}\"\nallow_simulate = false\n",
            gw.api.port()
        ),
    )
    .unwrap();
    gw.start();
    let (status, _) = gw.http("GET", "/metrics", None);
    assert_eq!(status, 401);
    let (status, text) = with_token(gw.api, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        text.as_str()
            .is_some_and(|t| t.contains("umeme_http_rejected_total")),
        "{text}"
    );
    assert_eq!(gw.http("GET", "/health", None).0, 200);
}
