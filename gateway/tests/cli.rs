//! The command line: config validation with file:line:col, provisioning, manual credits, and
//! changes made by the CLI while the daemon runs.

mod common;

use std::process::Command;

use common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn broken_config_is_located_and_run_refuses_before_touching_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("gateway.toml");
    let broken = [
        ("[gateway]\ndata_dir = {d:?}\n\n[ledger]\nunits_per_kes = \"cheap\"\n", 5, 17),
        ("[gateway]\ndata_dir = {d:?}\n[broker]\nlisten = \"0.0.0.0:1883\"\nmax_conections = 5\n", 5, 1),
        ("[gateway]\ndata_dir = {d:?}\n[api]\nlisten = \"localhost\"\n", 4, 10),
        ("[gateway]\ndata_dir = {d:?}\nid = \"bad id\"\n", 3, 6),
        ("[gateway\n", 1, 9),
    ];
    for (text, line, col) in broken {
        let text = text.replace("{d:?}", &format!("{:?}", data.display().to_string()));
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let want = format!("{}:{line}:{col}:", cfg.display());
        assert!(
            stderr(&out).contains(&want),
            "expected {want} in: {}",
            stderr(&out)
        );

        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(&want), "{}", stderr(&out));
        assert!(
            !data.exists(),
            "run on a broken config must not create the data directory"
        );
    }

    std::fs::write(
        &cfg,
        format!("[gateway]\ndata_dir = {:?}\n", data.display().to_string()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!data.exists(), "check-config does not touch state");

    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["meter", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad usage exits 2");
}

#[test]
fn meters_are_provisioned_listed_and_credited_once_per_reference() {
    let gw = Gateway::new("");
    let out = gw.cli(&[
        "meter",
        "add",
        "METER001",
        "--name",
        "Flat 1",
        "--phone",
        "0712345678",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("secret: ").map(str::to_string))
        .expect("generated secret printed once");
    assert_eq!(secret.len(), 32);
    let out = gw.cli(&["meter", "add", "METER001"]);
    assert_eq!(out.status.code(), Some(1), "a duplicate is refused");
    let out = gw.cli(&["meter", "add", "bad/id"]);
    assert_eq!(out.status.code(), Some(2));

    let out = gw.cli(&["credit", "METER001", "--kes", "100", "--ref", "CASH-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("balance 5.000 units"),
        "{}",
        stdout(&out)
    );
    let out = gw.cli(&["credit", "METER001", "--kes", "100", "--ref", "CASH-1"]);
    assert!(
        stdout(&out).starts_with("already credited"),
        "{}",
        stdout(&out)
    );
    let out = gw.cli(&["credit", "METER404", "--kes", "1", "--ref", "X"]);
    assert_eq!(out.status.code(), Some(1));
    let out = gw.cli(&["credit", "METER001", "--kes", "-3", "--ref", "X"]);
    assert_eq!(out.status.code(), Some(2));

    let list = stdout(&gw.cli(&["meter", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("METER001") && l.contains("5.000")),
        "{list}"
    );
    let show = stdout(&gw.cli(&["meter", "show", "METER001"]));
    assert!(
        show.contains("Flat 1") && show.contains("manual:CASH-1"),
        "{show}"
    );

    // The stored secret is a salted hash, never the secret itself.
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let hash: String = db
        .query_row(
            "SELECT secret_hash FROM meters WHERE id = 'METER001'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        hash.starts_with("$argon2id$") && !hash.contains(&secret),
        "{hash}"
    );
}

#[test]
fn cli_changes_reach_the_running_daemon_and_its_meters() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", "old-secret-001");
    let mut m = gw.connect("METER001", "old-secret-001");
    m.subscribe("smartmeter/METER001/command/balance", 1);
    m.next_publish("smartmeter/METER001/command/balance");

    // A cash top-up at the CLI while the daemon runs reaches the connected meter.
    let out = gw.cli(&["credit", "METER001", "--kes", "40", "--ref", "CASH-7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cmd = balance_json(&m.next_publish("smartmeter/METER001/command/balance"));
    assert_eq!(cmd["balance"], 2.0);

    // A new secret ends the session and the old secret stops working.
    let out = gw.cli(&[
        "meter",
        "set-secret",
        "METER001",
        "--secret",
        "new-secret-001",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        m.recv().is_none(),
        "the session is closed when its secret changes"
    );
    let (_, code) = RawMeter::connect(
        gw.broker,
        "METER001",
        "METER001",
        "old-secret-001",
        true,
        None,
    );
    assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword);
    let m = gw.connect("METER001", "new-secret-001");

    // Removing the meter closes its session too; its payments stay for audit.
    let out = gw.cli(&["meter", "remove", "METER001"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut m = m;
    assert!(m.recv().is_none());
    let (_, code) = RawMeter::connect(
        gw.broker,
        "METER001",
        "METER001",
        "new-secret-001",
        true,
        None,
    );
    assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword);
    let db = rusqlite::Connection::open(gw.db_path()).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM payments", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn api_token_guards_writes() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-for-tests\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut gw = Gateway::new(&format!("token_file = {:?}\n", token.display().to_string()));
    gw.start();
    let body = r#"{"id":"METER001","name":"Wanjiku","phone":"0712000000"}"#;
    let (status, _) = gw.http("POST", "/api/meters", Some(body));
    assert_eq!(status, 401);
    let (status, v) = http(
        gw.api,
        "POST",
        "/api/meters",
        Some(body),
        &[("Authorization", "Bearer t0ken-for-tests")],
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["secret"].as_str().map(str::len), Some(32));
    let (status, _) = http(
        gw.api,
        "POST",
        "/api/meters",
        Some(body),
        &[("Authorization", "Bearer t0ken-for-tests")],
    );
    assert_eq!(status, 409);
    let (status, _) = gw.http(
        "POST",
        "/daraja/simulate",
        Some(r#"{"meter_no":"METER001","amount":10}"#),
    );
    assert_eq!(status, 401);
    let (status, _) = http(
        gw.api,
        "POST",
        "/daraja/simulate",
        Some(r#"{"meter_no":"METER001","amount":"10"}"#),
        &[("Authorization", "Bearer t0ken-for-tests")],
    );
    assert_eq!(status, 200);

    let (status, v) = gw.http("GET", "/ready", None);
    assert_eq!((status, v["ready"].as_bool()), (200, Some(true)));
    let metrics = gw.metrics();
    assert!(
        metrics.contains("# TYPE umeme_ledger_commits_total counter"),
        "{metrics}"
    );
}

#[test]
fn no_config_file_check_config_reports_the_development_defaults() {
    // The packaged path does not exist here, so `check-config` reports the built-in defaults.
    // Where their data dir goes: tests/first_hour.rs.
    if std::path::Path::new(umeme_gateway::config::DEFAULT_CONFIG_PATH).exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("built-in development defaults"));
}

#[test]
fn under_systemd_log_lines_carry_their_journal_priority_and_no_timestamp() {
    use std::io::BufRead;
    let gw = Gateway::new("");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&gw.config)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let ready = loop {
        let line = rx.recv_timeout(WAIT).expect("a ready line");
        if line.contains("umeme-gateway ready") {
            break line;
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready.starts_with("<6>"), "{ready}");
    assert!(
        !ready.starts_with("<6>20"),
        "no timestamp of its own: {ready}"
    );
}
