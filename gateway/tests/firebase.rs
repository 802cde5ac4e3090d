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
    /// Listens on a port the fake picks and prints it. The rules have the `.indexOn` the
    /// plugin README asks for (`users`/`meter_no`) and those the original backend's queries
    /// use, so the dashboard's reads can be replayed.
    fn start(public_key: &Path, seed: &Value) -> FakeDb {
        let mut child = Command::new(target_debug().join("examples").join("fake_rtdb"))
            .args(["--email", EMAIL, "--secret", SECRET, "--public-key"])
            .arg(public_key)
            .args(["--seed", &seed.to_string()])
            .args([
                "--index",
                "users:meter_no",
                "--index",
                "transactions:user_id",
            ])
            .args(["--index", "unit_consumption:user_id"])
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
        self.read("/.json")
    }

    /// A read as the dashboard or the original backend makes it (`?orderBy=…` allowed).
    fn read(&self, path_and_query: &str) -> Value {
        let sep = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let (status, v) = http(
            self.addr,
            "GET",
            &format!("{path_and_query}{sep}auth={SECRET}"),
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

/// The original project's tree for a tenant registered through the dashboard (its `POST
/// /users` pushes `users/{pushId}` with `meter_no` and `phone_number`; nothing writes
/// `meters/{m}/user_id`), next to an earlier tenant's history the gateway must leave alone.
fn original_tree() -> Value {
    json!({
        "users": {
            "-Nbob000000000001": {
                "name": "Bob", "email": "bob@example.com", "meter_no": "METER007",
                "phone_number": "254712345678", "balance": 0,
                "created_at": "2025-11-01T08:00:00.000Z",
            },
            "-Nann000000000001": {
                "name": "Ann", "email": "ann@example.com", "meter_no": "METER001",
                "phone_number": "254711111111", "balance": 1.5,
            },
        },
        "transactions": {"-Nold0000000000001": {
            "transaction_id": "-Nold0000000000001", "user_id": "-Nann000000000001",
            "meter_no": "METER001", "amount": 50, "units": 2, "status": "SUCCESS",
            "mpesa_receipt": "QKJ4ABC123", "timestamp": "2025-11-02T09:00:00.000Z",
        }},
    })
}

#[test]
fn a_tenant_registered_through_the_dashboard_sees_the_ledgers_balance_and_transactions() {
    build();
    let scratch = tempfile::tempdir().unwrap();
    let keys = scratch.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let sa = service_account(&keys, "http://unused/token");
    let fake = FakeDb::start(&keys.join("pub.der"), &original_tree());
    let mut file: Value = serde_json::from_str(&std::fs::read_to_string(&sa).unwrap()).unwrap();
    file["token_uri"] = json!(format!("http://{}/token", fake.addr));
    std::fs::write(&sa, file.to_string()).unwrap();
    let lib = "libumeme_sink_firebase.so";
    // A payment source (the test kit's) pays 20 KES by M-Pesa, with the payer's phone.
    let source = built_plugin("umeme-testkit-source");
    let plugins = install_plugins(scratch.path(), &[target_debug().join(lib), source]);
    let work = scratch.path().join("srcwork");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = format!(
        "[[sink]]\nname = \"firebase\"\nplugin = \"{lib}\"\nevents = [\"consumption\", \"payment\", \"status\", \"alert\"]\n[sink.config]\ndatabase_url = \"http://{}\"\nservice_account_file = {:?}\n\n[[source]]\nname = \"mpesa\"\nplugin = \"libumeme_testkit_source.so\"\n[source.config]\ndir = {:?}\npayments = [{{ meter = \"METER007\", amount_cents = 2000, reference = \"QKJ7XYZ123\", phone = \"254700000001\" }}]\n",
        fake.addr,
        sa.display().to_string(),
        work.display().to_string()
    );
    let mut gw = Gateway::with_plugins(&plugins, &cfg);
    gw.add_meter("METER007", "firebase-test-secret-7");
    gw.start();
    eventually("the source's payment", || {
        std::fs::metadata(work.join("results.json")).ok()
    });

    // 20 + 100 KES buy 6 units; the meter uses all of them, its relay goes off and the
    // firmware says `disconnected` over its live connection; then 50 KES more.
    gw.simulate("METER007", 100.0);
    let mut m = gw.connect("METER007", "firebase-test-secret-7");
    let topic = "smartmeter/METER007/consumption";
    m.publish_acked(topic, &v2_payload("METER007", 1, 0), 1);
    m.publish_acked(topic, &v2_payload("METER007", 2, 1200), 2);
    m.publish_acked(topic, &v2_payload("METER007", 3, 6000), 3);
    let out_of_credit = r#"{"meterNo":"METER007","status":"disconnected","message":"Balance exhausted","balance":0,"wifi_rssi":-61,"loadOn":false,"timestamp":99000}"#;
    m.publish_acked("smartmeter/METER007/status", out_of_credit, 4);
    let row = gw.meter("METER007");
    assert_eq!(row["online"], true, "still connected: {row}");
    assert_eq!(row["status"], "disconnected");
    gw.simulate("METER007", 50.0);
    assert_eq!(gw.balance_wh("METER007"), 2500);

    let bob = "-Nbob000000000001";
    eventually("the sink to deliver both payments and the reports", || {
        let t = fake.tree();
        (t["users"][bob]["balance"] == json!(2.5)
            && t["transactions"].as_object().map_or(0, |o| o.len()) == 4
            && t["meters"]["METER007"]["relay"] == "off")
            .then_some(())
    });

    // The dashboard's reads, as its code makes them.
    // useRealtimeBalance: `users/{uid}/balance`.
    assert_eq!(fake.read(&format!("/users/{bob}/balance.json")), json!(2.5));
    // GET /users/by-meter/:m and findUserIdByMeter: `users` by `meter_no`.
    let by_meter = fake.read("/users.json?orderBy=%22meter_no%22&equalTo=%22METER007%22");
    assert_eq!(by_meter.as_object().unwrap().len(), 1);
    assert_eq!(by_meter[bob]["balance"], json!(2.5));
    // GET /transactions/:userId: `transactions` by `user_id`, newest first.
    let txs = fake.read(&format!(
        "/transactions.json?orderBy=%22user_id%22&equalTo=%22{bob}%22"
    ));
    let mut txs: Vec<Value> = txs.as_object().unwrap().values().cloned().collect();
    txs.sort_by(|a, b| b["timestamp"].as_str().cmp(&a["timestamp"].as_str()));
    let shown: Vec<(f64, f64, &str)> = txs
        .iter()
        .map(|t| {
            (
                t["amount"].as_f64().unwrap(),
                t["units"].as_f64().unwrap(),
                t["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (50.0, 2.5, "SUCCESS"),
            (100.0, 5.0, "SUCCESS"),
            (20.0, 1.0, "SUCCESS")
        ]
    );
    for t in &txs {
        assert_eq!(t["meter_no"], "METER007");
        assert!(t["timestamp"].as_str().unwrap().ends_with('Z'), "{t}");
    }
    // The M-Pesa payment: the payer's phone and the receipt the original duplicate check reads.
    assert_eq!(txs[2]["phone_number"], "254700000001");
    assert_eq!(txs[2]["mpesa_receipt"], "QKJ7XYZ123");
    // Simulated ones: no receipt, the number the tenant registered with.
    for t in &txs[..2] {
        assert_eq!(t["phone_number"], "254712345678", "{t}");
        assert_eq!(t.get("mpesa_receipt"), None, "{t}");
    }
    // GET /analytics/consumption/:userId: `unit_consumption` by `user_id`.
    let used = fake.read(&format!(
        "/unit_consumption.json?orderBy=%22user_id%22&equalTo=%22{bob}%22"
    ));
    let used: f64 = used
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["units_consumed"].as_f64().unwrap())
        .sum();
    assert!((used - 6.0).abs() < 1e-9, "6 units used, got {used}");
    // GET /meters/:m/status reads `meters/{m}`: online, with the relay off for no credit.
    let meter = fake.read("/meters/METER007.json");
    assert_eq!(meter["online"], true, "{meter}");
    assert_eq!(meter["relay"], "off");
    assert_eq!(meter["status"]["status"], "disconnected");
    assert_eq!(meter["balance"], json!(2.5));

    // Ann's history from the original backend is untouched.
    let tree = fake.tree();
    assert_eq!(tree["transactions"]["-Nold0000000000001"]["amount"], 50);
    assert_eq!(tree["users"]["-Nann000000000001"]["balance"], json!(1.5));
}

/// Secret files are read only at mode 0600 (`umeme_plugin_sdk::read_secret_file`).
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
