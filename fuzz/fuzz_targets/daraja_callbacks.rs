//! Daraja callback bodies: any body POSTed to the plugin's C2B validation, C2B confirmation or
//! STK callback endpoint (with the right path token, from an allowed address) gets an answer
//! and never a panic; no payment is credited without a positive amount and a meter.
//!
//! The plugin runs through its C entry points under the SDK's fake host, its listener on
//! loopback; Safaricom's API (for STK status queries) points at a closed local port.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use umeme_plugin_sdk::testing::SourceHarness;
use umeme_source_daraja::DarajaSource;

const TOKEN: &str = "fuzz-callback-token-0123456789";

struct Target {
    harness: Mutex<SourceHarness<DarajaSource>>,
    addr: SocketAddr,
}

// The harness holds raw pointers; the fuzzer's one thread is the only user.
unsafe impl Sync for Target {}
unsafe impl Send for Target {}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("umeme-fuzz-daraja-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let secret = |name: &str, value: &str| {
            let p = dir.join(name);
            std::fs::write(&p, value).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p.display().to_string()
        };
        let config = serde_json::json!({
            "listen": "127.0.0.1:0",
            "base_url": "http://127.0.0.1:9",
            "shortcode": "600999",
            "consumer_key_file": secret("key", "fuzz-key"),
            "consumer_secret_file": secret("secret", "fuzz-secret"),
            "passkey_file": secret("passkey", "fuzz-passkey"),
            "callback_base_url": "https://gw.example.org",
            "callback_token_file": secret("token", TOKEN),
            "allowed_ips": ["127.0.0.1"],
        });
        let mut h = SourceHarness::<DarajaSource>::new(config, &["METER001", "METER002"])
            .expect("plugin created");
        h.start().expect("plugin started");
        let addr = h.health().detail["listen"]
            .as_str()
            .expect("listen address")
            .parse()
            .expect("an address");
        Target {
            harness: Mutex::new(h),
            addr,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    if body.len() > 32 * 1024 {
        return;
    }
    let endpoint =
        ["c2b/validation", "c2b/confirmation", "stk/callback"][usize::from(selector % 3)];
    let t = target();
    let mut s = TcpStream::connect(t.addr).expect("connect to the listener");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /daraja/{TOKEN}/{endpoint} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.starts_with(b"HTTP/1.1 "), "no HTTP answer");
    let h = t.harness.lock().unwrap();
    let mut payments = h.host().payments.lock().unwrap();
    for p in payments.iter() {
        assert!(p.amount_cents > 0, "credited a non-positive amount: {p:?}");
        assert!(!p.meter.is_empty());
    }
    payments.clear();
});
