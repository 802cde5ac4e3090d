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

/// A gateway for alert scenarios on the debug clock: every meter sends a simulated day's
/// reports within seconds, far above a real meter's rate, so the per-meter report limit is
/// lifted (over it, reports would wait and be stamped late); `main`, when given, is marked as
/// the site's main (bulk) meter, as `meter set ID --main` does.
pub async fn gateway_for_alerts(
    dir: &tempfile::TempDir,
    meters: usize,
    main: Option<&str>,
) -> Gateway {
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "[gateway]\nid = \"sim-site\"\ndata_dir = {:?}\n\n[broker]\nlisten = \"127.0.0.1:0\"\nreports_per_minute = 6000000\nreport_burst = 1000000\n\n[api]\nlisten = \"127.0.0.1:0\"\nallow_simulate = true\n\n[alerts]\nsilent_intervals = 10000\n",
        dir.path().join("data").display().to_string()
    );
    // These scenarios judge spikes, bypasses and site loss. The lockstep clock may pass ten
    // report intervals while a loaded machine delays one meter's report, which would raise
    // `silent` episodes nobody staged; the silent rule has its own test in the gateway
    // (`gateway/tests/alerts.rs`).
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(Some(&path)).expect("valid config");
    std::fs::create_dir_all(&config.gateway.data_dir).expect("data dir");
    provision(&config, meters);
    if let Some(main) = main {
        mark_main(dir, main);
    }
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

/// Marks a provisioned meter as the site's main (bulk) meter, as `meter set ID --main` does
/// (before the gateway starts: the daemon owns the store after that).
pub fn mark_main(dir: &tempfile::TempDir, meter: &str) {
    let path = dir.path().join("data").join("gateway.db");
    let mut conn = store::open(&path, "sim-site").expect("store");
    let settings = LedgerSettings {
        rules: Rules { low_balance_wh: 0 },
        tariff: umeme_gateway::config::Tariff::try_from(0.05).expect("tariff"),
    };
    let op = Op::SetMain {
        meter: MeterId::parse(meter).expect("meter id"),
        main: true,
        at: 0,
    };
    writer::apply_now(&mut conn, &op, &settings).expect("mark main");
}

/// The episodic `alert` events in the gateway's store: (meter, alert, state), oldest first,
/// with their data.
pub fn episodes(dir: &tempfile::TempDir) -> Vec<(String, String, String, serde_json::Value)> {
    let path = dir.path().join("data").join("gateway.db");
    let conn = store::open_read_only(&path).expect("open the store");
    store::events_after(&conn, "sim-site", 0, 10_000_000)
        .expect("read events")
        .into_iter()
        .filter(|e| e.kind == "alert" && e.data.get("state").is_some())
        .map(|e| {
            let s = |k: &str| e.data[k].as_str().unwrap_or_default().to_string();
            (
                e.meter.clone().unwrap_or_default(),
                s("alert"),
                s("state"),
                e.data.clone(),
            )
        })
        .collect()
}
