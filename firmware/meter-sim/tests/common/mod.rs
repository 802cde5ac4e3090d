//! The real gateway in-process on loopback ports, with meters added straight to its store.
#![allow(dead_code)]

use umeme_gateway::config::Config;
use umeme_gateway::daemon::Gateway;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::writer::{self, LedgerSettings, Op};
use umeme_gateway::{auth, store};

pub const SECRET: &str = "sim-meter-secret";

pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,meter_sim=info"))
        .with_test_writer()
        .try_init();
}

/// Adds `SIM0001`… straight to the store before the gateway starts, with one password hash
/// for all: through the API each would cost an argon2 hash, seconds in a debug build.
fn provision(config: &Config, meters: usize) {
    let mut conn = store::open(&config.db_path(), config.gateway.id.as_str()).expect("store");
    let settings = LedgerSettings {
        rules: Rules {
            low_balance_wh: config.ledger.low_balance_wh,
        },
        tariff: config.ledger.tariff.clone(),
    };
    let hash = auth::hash_secret(SECRET);
    for n in 1..=meters {
        let op = Op::AddMeter {
            meter: MeterId::parse(&format!("SIM{n:04}")).expect("meter id"),
            name: None,
            phone: None,
            secret_hash: hash.clone(),
            at: 0,
        };
        writer::apply_now(&mut conn, &op, &settings).expect("add meter");
    }
}

/// A gateway with `meters` provisioned meters and `POST /daraja/simulate` enabled.
pub async fn gateway(dir: &tempfile::TempDir, meters: usize) -> Gateway {
    gateway_with(dir, meters, "").await
}

/// [`gateway`] with `extra` appended to its config (a `[limits]` section, …).
pub async fn gateway_with(dir: &tempfile::TempDir, meters: usize, extra: &str) -> Gateway {
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "[gateway]\nid = \"sim-site\"\ndata_dir = {:?}\n\n[broker]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\nallow_simulate = true\n{extra}",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(Some(&path)).expect("valid config");
    std::fs::create_dir_all(&config.gateway.data_dir).expect("data dir");
    provision(&config, meters);
    Gateway::start(config).await.expect("gateway starts")
}

/// The `alert` events in the gateway's store, as (meter, alert kind), oldest first.
pub fn alerts(dir: &tempfile::TempDir) -> Vec<(String, String)> {
    let path = dir.path().join("data").join("gateway.db");
    let conn = store::open_read_only(&path).expect("open the store");
    store::events_after(&conn, "sim-site", 0, 1_000_000)
        .expect("read events")
        .into_iter()
        .filter(|e| e.kind == "alert")
        .map(|e| {
            (
                e.meter.unwrap_or_default(),
                e.data["alert"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
