//! A sink for the gateway's plugin tests. Its behaviour is read from `dir/mode` before every
//! call, so a test can flip it while the gateway runs: `ok`, `retry`, `retry_after`,
//! `permanent`, `bad_config`, `reject_odd`, `panic_create`, `panic_deliver`, `panic_health`,
//! `hang`. Delivered events go to `dir/delivered.jsonl`; every `create` appends to `dir/creates`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use umeme_plugin_sdk::{export_sink, Delivery, Event, Health, Host, Sink};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    dir: PathBuf,
}

struct Testkit {
    dir: PathBuf,
}

fn mode(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("mode"))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|_| "ok".into())
}

fn append(path: PathBuf, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

impl Sink for Testkit {
    const NAME: &'static std::ffi::CStr = c"testkit-sink";
    type Config = Config;

    fn create(config: Config, _host: Host) -> Result<Self, String> {
        if mode(&config.dir) == "panic_create" {
            panic!("testkit: panic in create");
        }
        append(config.dir.join("creates"), "x\n").map_err(|e| e.to_string())?;
        umeme_plugin_sdk::log::info!("testkit sink created in {}", config.dir.display());
        Ok(Testkit { dir: config.dir })
    }

    fn deliver(&mut self, batch: &[Event], _timeout: Duration) -> Delivery {
        match mode(&self.dir).as_str() {
            "retry" => Delivery::retry("testkit: down"),
            "retry_after" => Delivery::retry_after(Duration::from_millis(1500), "testkit: 429"),
            "permanent" => Delivery::Permanent("testkit: refused".into()),
            "bad_config" => Delivery::BadConfig("testkit: 401 unauthorized".into()),
            "panic_deliver" => panic!("testkit: panic in deliver"),
            "hang" => {
                std::thread::sleep(Duration::from_secs(3600));
                Delivery::Delivered
            }
            m => {
                let odd = m == "reject_odd";
                let mut lines = String::new();
                let mut rejected = Vec::new();
                for e in batch {
                    if odd && e.seq % 2 == 1 {
                        rejected.push((e.seq, "testkit: odd seq".to_string()));
                    } else {
                        lines.push_str(&serde_json::to_string(e).unwrap_or_default());
                        lines.push('\n');
                    }
                }
                if let Err(e) = append(self.dir.join("delivered.jsonl"), &lines) {
                    return Delivery::retry(e.to_string());
                }
                if rejected.is_empty() {
                    Delivery::Delivered
                } else {
                    Delivery::Rejected(rejected)
                }
            }
        }
    }

    fn health(&mut self) -> Health {
        if mode(&self.dir) == "panic_health" {
            panic!("testkit: panic in health");
        }
        Health::ok()
    }
}

export_sink!(Testkit);
