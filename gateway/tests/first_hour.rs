//! A newcomer's first hour (issue 15, items 10 and 13–16): the README's commands on a machine
//! where another broker holds the port, which data directory the development defaults use, one
//! `command/balance` per balance change, the metrics an operator is told to watch, and where a
//! configuration error points.

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::mqttbytes::v4::Packet;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `cmd` to its end, killing it if it takes longer than `WAIT` (a daemon that should
/// have refused to start but did not).
fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn umeme-gateway");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap");
            panic!("still running after {WAIT:?}; stderr:\n{}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// A config on loopback with the given listeners, on its own data dir.
fn config_with(dir: &Path, broker: SocketAddr, api: SocketAddr) -> PathBuf {
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\ndata_dir = {:?}\n[broker]\nlisten = \"{broker}\"\n[api]\nlisten = \"{api}\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    cfg
}

fn loopback(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn a_taken_meter_port_names_the_port_and_points_at_another_mqtt_broker() {
    let dir = tempfile::tempdir().unwrap();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let cfg = config_with(dir.path(), loopback(port), loopback(free_port()));
    let out = run_bounded(Command::new(BIN).args(["run", "--config"]).arg(&cfg));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (broker.listen)"
        )),
        "{err}"
    );
    assert!(
        err.contains("another MQTT broker (mosquitto?) is listening: stop it"),
        "{err}"
    );
    assert!(err.contains("or set [broker] listen"), "{err}");
    assert!(err.contains(&format!("sport = :{port}")), "{err}");
}

#[test]
fn a_taken_api_port_names_the_port_and_the_api_listen_key() {
    let dir = tempfile::tempdir().unwrap();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let cfg = config_with(dir.path(), loopback(free_port()), loopback(port));
    let out = run_bounded(Command::new(BIN).args(["run", "--config"]).arg(&cfg));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port} (api.listen)")),
        "{err}"
    );
    assert!(
        err.contains("another program is listening: stop it or set [api] listen"),
        "{err}"
    );
}

/// Finds `name` on PATH or in the sbin folders (mosquitto lives in /usr/sbin).
fn sbin_tool(name: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: run scripts/test-all (it installs mosquitto)")
        })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The README's order on a machine where Debian's mosquitto came up on the meter port: the
/// first command (`run`) must fail at once with an error that says what to do. A real
/// mosquitto holds the port here (a free one, not 1883: other test runs share this machine).
#[test]
fn run_after_a_real_mosquitto_took_the_meter_port_says_to_stop_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "{}listener {port} 127.0.0.1\nallow_anonymous true\n",
            if is_root { "user root\n" } else { "" }
        ),
    )
    .unwrap();
    let mut mosquitto = KillOnDrop(
        Command::new(sbin_tool("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    eventually("mosquitto to listen", || {
        assert!(
            mosquitto.0.try_wait().unwrap().is_none(),
            "mosquitto exited"
        );
        TcpStream::connect(loopback(port)).ok()
    });
    let cfg = config_with(dir.path(), loopback(port), loopback(free_port()));
    let out = run_bounded(Command::new(BIN).args(["run", "--config"]).arg(&cfg));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another MQTT broker (mosquitto?) is listening"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("sudo systemctl disable --now mosquitto"),
        "{}",
        stderr(&out)
    );
}

/// A folder that looks like a source checkout: the workspace manifest and the gateway crate's.
fn fake_checkout(root: &Path) {
    std::fs::create_dir_all(root.join("gateway/src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"gateway\"]\n",
    )
    .unwrap();
    std::fs::write(
        root.join("gateway/Cargo.toml"),
        "[package]\nname = \"umeme-gateway\"\n",
    )
    .unwrap();
}

fn dev_cli(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run the CLI")
}

#[test]
fn development_defaults_use_the_checkout_root_data_dir_from_any_sub_folder_and_say_so() {
    // Only meaningful where the packaged configuration is absent (a developer's machine).
    if Path::new(umeme_gateway::config::DEFAULT_CONFIG_PATH).exists() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkout");
    fake_checkout(&root);
    let data = root.join("umeme-data");
    let said = format!(
        "using data dir {} (development defaults: no configuration file)",
        data.display()
    );

    let out = dev_cli(&root, &["meter", "add", "DEV1", "--secret", "dev-secret-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));

    // From a sub-folder: the same ledger, not a second empty one.
    let sub = root.join("gateway/src");
    let out = dev_cli(&sub, &["meter", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("DEV1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!sub.join("umeme-data").exists());
    assert!(data.join("gateway.db").exists());
}

#[test]
fn development_defaults_outside_a_checkout_refuse_to_create_a_data_dir_unless_given_one() {
    if Path::new(umeme_gateway::config::DEFAULT_CONFIG_PATH).exists() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = dev_cli(tmp.path(), &["meter", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not inside an umeme-gateway source checkout"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--data-dir"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing is created"
    );

    // check-config touches no state, so it needs no data dir.
    let out = dev_cli(tmp.path(), &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let data = tmp.path().join("my-data");
    let out = dev_cli(
        tmp.path(),
        &[
            "meter",
            "add",
            "DEV2",
            "--secret",
            "dev-secret-2",
            "--data-dir",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "--data-dir needs a value");
    let out = Command::new(BIN)
        .args([
            "meter",
            "add",
            "DEV2",
            "--secret",
            "dev-secret-2",
            "--data-dir",
        ])
        .arg(&data)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("using data dir {}", data.display())),
        "{}",
        stderr(&out)
    );
    assert!(data.join("gateway.db").exists());
}

/// Counts every publish on `topic` that arrives within `window` (acknowledging QoS 1 ones).
/// The one fixed wait of these tests: proving that nothing more arrives needs a window. It
/// starts only after the awaited first message, and is longer than the daemon's once-a-second
/// look at outside changes, which is where a duplicate came from.
fn count_publishes_within(m: &mut RawMeter, topic: &str, window: Duration) -> usize {
    let end = Instant::now() + window;
    let mut n = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return n;
        }
        match m.recv_within(left) {
            Some(Packet::Publish(p)) => {
                if p.qos == rumqttc::QoS::AtLeastOnce {
                    m.send(Packet::PubAck(rumqttc::PubAck::new(p.pkid)));
                }
                if p.topic == topic {
                    n += 1;
                }
            }
            Some(_) => {}
            None if Instant::now() >= end => return n,
            None => panic!("connection closed"),
        }
    }
}

const BALANCE: &str = "smartmeter/METER001/command/balance";
const QUIET: Duration = Duration::from_millis(2500);

#[test]
fn one_payment_sends_the_meter_one_balance_command() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", "meter-001-secret");
    let mut m = gw.connect("METER001", "meter-001-secret");
    m.subscribe("smartmeter/METER001/command/#", 1);
    // The retained balance at subscribe.
    assert_eq!(balance_json(&m.next_publish(BALANCE))["balance"], 0.0);

    gw.simulate("METER001", 100.0);
    assert_eq!(balance_json(&m.next_publish(BALANCE))["balance"], 5.0);
    assert_eq!(
        count_publishes_within(&mut m, BALANCE, QUIET),
        0,
        "one balance change, one command/balance"
    );

    // A credit at the command line (another process) also arrives once.
    let out = gw.cli(&["credit", "METER001", "--kes", "40", "--ref", "CASH-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(balance_json(&m.next_publish(BALANCE))["balance"], 7.0);
    assert_eq!(count_publishes_within(&mut m, BALANCE, QUIET), 0);
}

#[test]
fn watched_metrics_are_exposed_at_zero_and_a_cli_credit_counts_as_a_payment() {
    let mut gw = Gateway::new("");
    gw.start();
    let text = gw.metrics();
    for series in [
        "umeme_ledger_errors_total{reason=\"commit\"} 0",
        "umeme_ledger_alerts_total{alert=\"low_balance\"} 0",
        "umeme_mqtt_rejected_total{reason=\"acl_publish\"} 0",
        "umeme_mqtt_rejected_total{reason=\"malformed\"} 0",
        "umeme_mqtt_connect_refused_total{reason=\"bad_credentials\"} 0",
        "umeme_payments_total{source=\"manual\",outcome=\"credited\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    for family in [
        "umeme_ledger_errors_total",
        "umeme_ledger_alerts_total",
        "umeme_mqtt_rejected_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} counter")),
            "{family}:\n{text}"
        );
    }

    gw.add_meter("METER001", "meter-001-secret");
    let out = gw.cli(&["credit", "METER001", "--kes", "200", "--ref", "CASH-0042"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let series = "umeme_payments_total{source=\"manual\",outcome=\"credited\"}";
    eventually("the daemon to count the CLI credit", || {
        (gw.metric(series) == 1.0).then_some(())
    });
    // The same reference again credits nothing and counts nothing.
    let out = gw.cli(&["credit", "METER001", "--kes", "200", "--ref", "CASH-0042"]);
    assert!(out.status.success(), "{}", stderr(&out));
    gw.simulate("METER001", 10.0);
    eventually("the simulated payment to count", || {
        (gw.metric("umeme_payments_total{source=\"simulate\",outcome=\"credited\"}") == 1.0)
            .then_some(())
    });
    assert_eq!(gw.metric(series), 1.0, "counted once, not per tick");
}

/// README's "Logs and metrics" promises that the metrics it tells operators to watch exist at 0
/// from the start, so an alert on them works before their first increment. This reads the
/// paragraph itself: a metric or reason added there must be exposed, or this fails.
#[test]
fn every_metric_and_reason_the_readme_says_to_watch_is_exposed_at_zero_from_the_start() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("read README.md");
    let start = readme
        .find("Metrics to watch:")
        .expect("README's metrics paragraph");
    let end = start
        + readme[start..]
            .find("These counters exist at 0")
            .expect("README's promise that the watched metrics exist at 0");
    let mut gw = Gateway::new("");
    gw.start();
    let text = gw.metrics();
    let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();

    let (mut family, mut checked, mut missing) = (None::<String>, 0, Vec::new());
    // Code spans are the odd pieces between backticks: a metric, or a reason of the last one.
    for span in readme[start..end].split('`').skip(1).step_by(2) {
        if span.starts_with("umeme_") {
            let name = span.split('{').next().unwrap_or(span).to_owned();
            let exposed = series.iter().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            });
            if !exposed {
                missing.push(name.clone());
            }
            if !text.contains(&format!("# TYPE {name} ")) {
                missing.push(format!("# TYPE {name}"));
            }
            family = Some(name);
        } else if let Some(name) = &family {
            let want = format!("{name}{{reason=\"{span}\"}} 0");
            if !series.contains(&want.as_str()) {
                missing.push(want);
            }
        }
        checked += 1;
    }
    assert!(
        checked >= 30,
        "only {checked} names read from the README's paragraph"
    );
    assert!(
        missing.is_empty(),
        "not exposed at start: {missing:#?}\n{text}"
    );
}

#[test]
fn a_wrong_sha256_points_at_the_sha256_line() {
    let lib = built_plugin("umeme-testkit-sink");
    let dir = tempfile::tempdir().unwrap();
    let plugins = install_plugins(dir.path(), &[lib]);
    let cfg = dir.path().join("gateway.toml");
    let mut f = std::fs::File::create(&cfg).unwrap();
    write!(
        f,
        "[gateway]\ndata_dir = {:?}\nplugin_dir = {:?}\n\n[[sink]]\nname = \"tk\"\nplugin = \"libumeme_testkit_sink.so\"\nevents = [\"payment\"]\nsha256 = \"{}\"\n",
        dir.path().join("data").display().to_string(),
        plugins.display().to_string(),
        "0".repeat(64)
    )
    .unwrap();
    drop(f);
    for cmd in ["check-config", "run"] {
        let out = run_bounded(Command::new(BIN).args([cmd, "--config"]).arg(&cfg));
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        let want = format!("{}:9:10:", cfg.display());
        assert!(
            stderr(&out).contains(&want),
            "{cmd}: want {want} in {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("sha256 is"), "{}", stderr(&out));
    }
}

#[test]
fn a_toml_syntax_error_names_file_line_and_column_and_shows_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, "[gateway]\nid = site-001\n").unwrap();
    let out = run_bounded(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&cfg),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}:2:6: string values must be quoted",
            cfg.display()
        )),
        "{err}"
    );
    assert!(err.contains("\n  2 | id = site-001\n    |      ^"), "{err}");
}

/// The README's try-it with the real `mosquitto_sub`: the retained balance when it subscribes,
/// then exactly one line for the payment. `-W` ends the subscriber after a fixed time, the
/// window in which a duplicate would show (the daemon looks at outside changes every second).
#[test]
fn the_readmes_mosquitto_sub_prints_the_retained_balance_then_one_line_per_payment() {
    use std::io::BufRead;
    let sub = require_tool("mosquitto_sub");
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", "meter-001-secret");
    let port = gw.broker.port().to_string();
    let mut child = KillOnDrop(
        Command::new(sub)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-i",
                "METER001",
                "-u",
                "METER001",
            ])
            .args(["-P", "meter-001-secret", "-q", "1", "-v", "-W", "6"])
            .args(["-t", "smartmeter/METER001/command/#"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub"),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let retained = rx.recv_timeout(WAIT).expect("the retained balance");
    assert!(retained.starts_with(BALANCE), "{retained}");
    gw.simulate("METER001", 100.0);
    let mut lines = Vec::new();
    // Ends when mosquitto_sub's -W window closes its stdout.
    while let Ok(line) = rx.recv_timeout(WAIT) {
        lines.push(line);
    }
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("\"balance\":5.0"), "{lines:?}");
}
