//! The Firebase sink plugin end to end: the real gateway loads `libumeme_sink_firebase.so` from
//! a `[[sink]]` block, meters report over MQTT, payments arrive, and the fake Realtime Database
//! (plugins/sink-firebase/examples/fake_rtdb, which verifies the service account's signed JWT)
//! ends with the gateway's balances in the layout the original dashboard reads.

mod common;
#[path = "../../plugins/sink-firebase/tests/test_key.rs"]
mod test_key;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "fake-admin-secret";
const EMAIL: &str = "umeme-gateway@test-project.iam.gserviceaccount.com";

/// Builds the plugin and the fake database (an example of the plugin crate).
fn build() {
    cargo_build(&[
        "-p",
        "umeme-sink-firebase",
        "--lib",
        "--example",
        "fake_rtdb",
    ]);
}

/// A throwaway service-account key for this run: the key file and the public key (DER).
fn service_account(dir: &Path, token_uri: &str) -> PathBuf {
    let (pem, _der) = test_key::generate(dir);
    let file = dir.join("firebase.json");
    let sa = json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "k1",
        "private_key": std::fs::read_to_string(&pem).unwrap(),
        "client_email": EMAIL,
        "token_uri": token_uri,
    });
    std::fs::write(&file, sa.to_string()).unwrap();
    private(&file);
    file
}

/// The fake database process; killed when dropped.
struct FakeDb {
    child: Child,
    addr: SocketAddr,
}

impl FakeDb {
    /// Listens on a port the fake picks and prints it.
    fn start(public_key: &Path, seed: &Value) -> FakeDb {
        let mut child = Command::new(target_debug().join("examples").join("fake_rtdb"))
            .args(["--email", EMAIL, "--secret", SECRET, "--public-key"])
            .arg(public_key)
            .args(["--seed", &seed.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fake database");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the fake's address");
        let addr = line
            .trim()
            .strip_prefix("listening http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        FakeDb { child, addr }
    }

    fn tree(&self) -> Value {
        let (status, v) = http(
            self.addr,
            "GET",
            &format!("/.json?auth={SECRET}"),
            None,
            &[],
        );
        assert_eq!(status, 200, "{v}");
        v
    }
}

impl Drop for FakeDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn units(wh: i64) -> Value {
    json!(wh as f64 / 1000.0)
}

#[test]
fn the_gateway_keeps_the_dashboards_firebase_tree_in_step_with_its_ledger() {
    build();
    let scratch = tempfile::tempdir().unwrap();
    let keys = scratch.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let seed = json!({
        "users": {"uid-alice": {"name": "Alice", "meter_no": "METER001", "balance": 0}},
        "meters": {"METER001": {"user_id": "uid-alice"}},
    });
    // The fake needs the public key to start, and the key file needs the fake's address.
    let sa = service_account(&keys, "http://unused/token");
    let fake = FakeDb::start(&keys.join("pub.der"), &seed);
    let mut file: Value = serde_json::from_str(&std::fs::read_to_string(&sa).unwrap()).unwrap();
    file["token_uri"] = json!(format!("http://{}/token", fake.addr));
    std::fs::write(&sa, file.to_string()).unwrap();

    let lib = "libumeme_sink_firebase.so";
    let plugins = install_plugins(scratch.path(), &[target_debug().join(lib)]);

    let cfg = format!(
        "[[sink]]\nname = \"firebase\"\nplugin = \"{lib}\"\nevents = [\"consumption\", \"payment\", \"status\", \"alert\"]\n[sink.config]\ndatabase_url = \"http://{}\"\nservice_account_file = {:?}\n",
        fake.addr,
        sa.display().to_string()
    );
    let mut gw = Gateway::with_plugins(&plugins, &cfg);
    gw.add_meter("METER001", "firebase-test-secret-1");
    gw.add_meter("METER002", "firebase-test-secret-2");
    gw.start();

    gw.simulate("METER001", 100.0);
    gw.simulate("METER002", 50.0);
    let mut m1 = gw.connect("METER001", "firebase-test-secret-1");
    let mut m2 = gw.connect("METER002", "firebase-test-secret-2");
    let topic = |m: &str| format!("smartmeter/{m}/consumption");
    for (seq, wh) in [(1u32, 0u64), (2, 1200), (3, 1500)] {
        m1.publish_acked(
            &topic("METER001"),
            &v2_payload("METER001", seq, wh),
            seq as u16,
        );
    }
    for (seq, wh) in [(1u32, 0u64), (2, 500)] {
        m2.publish_acked(
            &topic("METER002"),
            &v2_payload("METER002", seq, wh),
            seq as u16,
        );
    }
    gw.simulate("METER001", 20.0);

    let (b1, b2) = (gw.balance_wh("METER001"), gw.balance_wh("METER002"));
    assert_eq!((b1, b2), (6000 - 1500, 2500 - 500), "the ledger's own view");
    let tree = eventually("the fake database to catch up with the ledger", || {
        let t = fake.tree();
        let done = t["meters"]["METER001"]["balance"] == units(b1)
            && t["meters"]["METER002"]["balance"] == units(b2)
            && t["transactions"].as_object().map_or(0, |o| o.len()) == 3
            && t["unit_consumption"].as_object().map_or(0, |o| o.len()) == 5;
        done.then_some(t)
    });

    assert_eq!(tree["users"]["uid-alice"]["balance"], units(b1));
    assert_eq!(
        tree["users"]["uid-alice"]["name"], "Alice",
        "the dashboard's own data stays"
    );
    assert_eq!(tree["meters"]["METER001"]["user_id"], "uid-alice");
    assert_eq!(tree["meters"]["METER001"]["total_consumed"], json!(1.5));
    assert_eq!(tree["meters"]["METER002"]["total_consumed"], json!(0.5));
    for m in ["METER001", "METER002"] {
        assert_eq!(tree["meters"][m]["online"], true);
        assert_eq!(tree["meters"][m]["status"]["status"], "online");
    }
    let tx = tree["transactions"].as_object().unwrap();
    let mut amounts: Vec<f64> = tx.values().map(|t| t["amount"].as_f64().unwrap()).collect();
    amounts.sort_by(f64::total_cmp);
    assert_eq!(amounts, [20.0, 50.0, 100.0]);
    for (id, t) in tx {
        assert_eq!(t["transaction_id"], id.as_str(), "keyed by the event id");
        assert_eq!(t["status"], "SUCCESS");
    }
    let alice: Vec<&Value> = tx
        .values()
        .filter(|t| t["user_id"] == "uid-alice")
        .collect();
    assert_eq!(alice.len(), 2, "METER001's payments carry Alice's uid");
    let used: f64 = tree["unit_consumption"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["units_consumed"].as_f64().unwrap())
        .sum();
    assert!(
        (used - 2.0).abs() < 1e-9,
        "1.5 + 0.5 units used, got {used}"
    );

    // The sink's cursor is committed just after its delivery.
    eventually("the sink's cursor to pass every event", || {
        let (status, outbox) = gw.http("GET", "/api/outbox", None);
        (status == 200 && outbox["sinks"][0]["backlog"] == 0).then_some(())
    });
    assert!(
        !gw.log_text().contains("refuses the sink's configuration"),
        "{}",
        gw.log_text()
    );
}

/// Secret files are read only at mode 0600 (`umeme_plugin_sdk::read_secret_file`).
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
