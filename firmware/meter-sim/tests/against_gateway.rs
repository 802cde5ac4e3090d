//! meter-sim against the real gateway, started in-process on loopback ports: many meters, a few
//! simulated hours with outages, reboots and top-ups, and at the end every meter's balance
//! equals the gateway's.

use std::time::Duration;

use meter_sim::profile::Profile;
use meter_sim::{Mode, SimConfig};
use umeme_gateway::config::Config;
use umeme_gateway::daemon::Gateway;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::writer::{self, LedgerSettings, Op};
use umeme_gateway::{auth, store};

const SECRET: &str = "sim-meter-secret";

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,meter_sim=info"))
        .with_test_writer()
        .try_init();
}

/// Adds the meters straight to the store before the gateway starts, with one password hash
/// for all: through the API each would cost an argon2 hash, seconds in a debug build.
fn provision(config: &Config, meters: usize) {
    let mut conn = store::open(&config.db_path(), config.gateway.id.as_str()).expect("store");
    let settings = LedgerSettings {
        rules: Rules {
            low_balance_wh: config.ledger.low_balance_wh,
        },
        tariff: config.ledger.tariff,
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

async fn gateway(dir: &tempfile::TempDir, meters: usize) -> Gateway {
    let path = dir.path().join("gateway.toml");
    let text = format!(
        "[gateway]\nid = \"sim-site\"\ndata_dir = {:?}\n\n[broker]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\nallow_simulate = true\n",
        dir.path().join("data").display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(Some(&path)).expect("valid config");
    std::fs::create_dir_all(&config.gateway.data_dir).expect("data dir");
    provision(&config, meters);
    Gateway::start(config).await.expect("gateway starts")
}

fn sim(gw: &Gateway, meters: usize, mode: Mode) -> SimConfig {
    SimConfig {
        broker: gw.broker_addr,
        api: gw.api_addr,
        meters,
        mode,
        profile: Profile::Daily {
            base_ma: 400,
            peak_ma: 12_000,
        },
        duration: Duration::from_secs(4 * 3600),
        step: Duration::from_secs(60),
        report_every: 5,
        // 4 simulated hours in about 4 real seconds.
        speed: 3600.0,
        outage_fraction: 0.3,
        reboot_fraction: 0.15,
        initial_kes: 20.0,
        topups: 60,
        seed: 9,
        secret: SECRET.into(),
        provision: false,
        settle_timeout: Duration::from_secs(30),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_v2_meters_with_outages_and_reboots_end_with_the_gateways_balance() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway(&dir, 200).await;
    let summary = meter_sim::run(sim(&gw, 200, Mode::V2)).await.expect("run");
    println!("{summary}");
    assert!(
        summary.all_agree(),
        "{summary}\n{:?}",
        summary.disagreements
    );
    assert!(summary.outages > 0 && summary.reboots > 0, "{summary}");
    assert_eq!(summary.dropped, 0, "no report dropped");
    // A reboot restores reports saved before their PUBACK; they are sent and acked again.
    assert!(
        summary.acknowledged >= summary.reports,
        "every report acknowledged"
    );
    assert!(
        summary.publishes > summary.reports,
        "outages caused replays"
    );
    // The gateway debited exactly what the meters counted after their baseline report.
    assert!(summary.gateway_consumed_wh > 0);
    assert_eq!(
        summary.gateway_consumed_wh, summary.billable_wh as i64,
        "{summary}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_firmware_payloads_end_with_the_gateways_balance() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway(&dir, 20).await;
    let summary = meter_sim::run(sim(&gw, 20, Mode::V1)).await.expect("run");
    println!("{summary}");
    assert!(
        summary.all_agree(),
        "{summary}\n{:?}",
        summary.disagreements
    );
    gw.stop().await;
}
