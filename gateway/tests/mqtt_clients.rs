//! Real MQTT client libraries against the meter port: MQTT.js (npm `mqtt` v5) and Eclipse
//! paho-mqtt (PyPI) asking for MQTT 5 or 3.1 must get CONNACK 1 (unacceptable protocol
//! version) and stop, instead of a silent close they retry blindly (issue 15 item 8).
//!
//! The libraries are installed by this test into `target/mqtt-clients/` (npm and pip, once);
//! the test is skipped with a message only when node (or python3, for paho) is not installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::*;

const MQTT_JS: &str = "mqtt@5";
const PAHO: &str = "paho-mqtt==2.*";

fn clients_dir() -> PathBuf {
    target_debug()
        .parent()
        .expect("target")
        .join("mqtt-clients")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs an install command once per test binary unless `done` already exists.
fn install_once(done: &Path, cmd: &mut Command) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if done.exists() {
        return;
    }
    let out = cmd.output().expect("run the installer");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gateway() -> Gateway {
    let mut gw = Gateway::new("");
    gw.start();
    gw
}

const MQTT_JS_PROBE: &str = r#"
const mqtt = require(process.argv[1]);
const c = mqtt.connect(process.argv[2], {
  protocolVersion: Number(process.argv[3]), clientId: 'm1', reconnectPeriod: 0, connectTimeout: 10000,
});
const done = (o) => { console.log(JSON.stringify(o)); c.end(true); process.exit(0); };
c.on('connect', () => done({ connected: true }));
c.on('error', (e) => done({ code: e.code, error: e.message }));
c.on('close', () => done({ closed: true }));
setTimeout(() => done({ timeout: true }), 12000);
"#;

#[test]
fn mqtt_js_asking_for_mqtt_5_or_3_1_is_told_the_protocol_version_is_unacceptable() {
    if !have("node") || !have("npm") {
        eprintln!("SKIPPED: node/npm are not installed, so MQTT.js cannot be tried");
        return;
    }
    let dir = clients_dir().join("node");
    let module = dir.join("node_modules/mqtt");
    install_once(
        &module.join("package.json"),
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg(MQTT_JS),
    );
    let gw = gateway();
    for version in ["5", "3"] {
        let out = Command::new("node")
            .args(["-e", MQTT_JS_PROBE])
            .arg(&module)
            .arg(format!("mqtt://{}", gw.broker))
            .arg(version)
            .output()
            .expect("run node");
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|_| panic!("{line}{}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(v["code"], 1, "protocol version {version}: {v}");
    }
    assert_eq!(
        gw.metric(r#"umeme_mqtt_connect_refused_total{reason="protocol_version"}"#),
        2.0
    );
}

const PAHO_PROBE: &str = r#"
import sys, json
import paho.mqtt.client as mqtt
host, port, version = sys.argv[1], int(sys.argv[2]), sys.argv[3]
proto = {"5": mqtt.MQTTv5, "3": mqtt.MQTTv31}[version]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="m1", protocol=proto)
result = {}
def on_connect(client, userdata, flags, reason_code, properties):
    result["rc"] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
    client.disconnect()
c.on_connect = on_connect
c.connect(host, port, keepalive=60)
c.loop_start()
import time
deadline = time.time() + 10
while "rc" not in result and time.time() < deadline:
    time.sleep(0.05)
c.loop_stop()
print(json.dumps(result))
"#;

#[test]
fn paho_asking_for_mqtt_5_or_3_1_is_told_the_protocol_version_is_unacceptable() {
    if !have("python3") {
        eprintln!("SKIPPED: python3 is not installed, so paho-mqtt cannot be tried");
        return;
    }
    let dir = clients_dir().join("python");
    install_once(
        &dir.join("paho"),
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg(PAHO),
    );
    let gw = gateway();
    for version in ["5", "3"] {
        let out = Command::new("python3")
            .args(["-c", PAHO_PROBE])
            .arg(gw.broker.ip().to_string())
            .arg(gw.broker.port().to_string())
            .arg(version)
            .env("PYTHONPATH", &dir)
            .output()
            .expect("run python3");
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|_| panic!("{line}{}", String::from_utf8_lossy(&out.stderr)));
        // paho 2's callbacks turn a CONNACK 1 into the reason code "Unsupported protocol
        // version" (132), for either version asked; a close without CONNACK leaves no rc.
        assert_eq!(v["rc"], 132, "protocol version {version}: {v}");
    }
}
