//! A payment source for the gateway's plugin tests. On `start` its own thread submits the
//! configured payments, checks accounts and uses the key-value store, and writes what the
//! gateway answered to `dir/results.json`. `panic` = "create" or "start" panics there.

use std::path::PathBuf;
use std::thread::JoinHandle;

use umeme_plugin_sdk::{export_source, Host, Payment, PaymentSource};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    dir: PathBuf,
    payments: Vec<Payment>,
    #[serde(default)]
    check_meters: Vec<String>,
    #[serde(default)]
    panic: Option<String>,
}

struct Testkit {
    config: Option<Config>,
    host: Host,
    worker: Option<JoinHandle<()>>,
}

impl PaymentSource for Testkit {
    const NAME: &'static std::ffi::CStr = c"testkit-source";
    type Config = Config;

    fn create(config: Config, host: Host) -> Result<Self, String> {
        if config.panic.as_deref() == Some("create") {
            panic!("testkit: panic in create");
        }
        Ok(Testkit {
            config: Some(config),
            host,
            worker: None,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        let config = self.config.take().ok_or("started twice")?;
        if config.panic.as_deref() == Some("start") {
            panic!("testkit: panic in start");
        }
        let host = self.host;
        self.worker = Some(std::thread::spawn(move || {
            let payments: Vec<serde_json::Value> = config
                .payments
                .iter()
                .map(|p| match host.submit_payment(p) {
                    Ok(r) => serde_json::json!({"ok": r}),
                    Err(e) => serde_json::json!({"err": e.to_string()}),
                })
                .collect();
            let accounts: Vec<bool> = config
                .check_meters
                .iter()
                .map(|m| host.validate_account(m).unwrap_or(false))
                .collect();
            let kv_before = host.kv_get("checkout").ok().flatten();
            let put = host.kv_put("checkout", "ws_CO_123").is_ok();
            let kv_after = host.kv_get("checkout").ok().flatten();
            umeme_plugin_sdk::log::info!("testkit source submitted {} payments", payments.len());
            let out = serde_json::json!({"payments": payments, "accounts": accounts,
                "kv_before": kv_before, "kv_put": put, "kv_after": kv_after});
            // Written whole, then renamed: a reader never sees a half-written file.
            let partial = config.dir.join("results.json.partial");
            if std::fs::write(&partial, out.to_string()).is_ok() {
                let _ = std::fs::rename(partial, config.dir.join("results.json"));
            }
        }));
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

export_source!(Testkit);
