//! `meter-sim`: runs N virtual meters against a umeme-gateway and prints a summary.
//! Exit code 0 when every meter's balance equals the gateway's, 1 otherwise.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use meter_sim::profile::Profile;
use meter_sim::{Mode, SimConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    V2,
    V1,
}

/// Runs N virtual prepaid meters over MQTT against a umeme-gateway.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The gateway's meter broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    /// The gateway's admin API (needs `[api] allow_simulate = true` for credits).
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    #[arg(long, short = 'n', default_value_t = 10)]
    meters: usize,
    /// v2: our firmware (meter-core); v1: the original Arduino payloads.
    #[arg(long, value_enum, default_value_t = ModeArg::V2)]
    mode: ModeArg,
    /// constant:MA, daily:BASE_MA:PEAK_MA or random:MAX_MA.
    #[arg(long, default_value = "daily:300:9000")]
    profile: String,
    /// Simulated hours.
    #[arg(long, default_value_t = 4.0)]
    hours: f64,
    /// Simulated seconds per measurement step.
    #[arg(long, default_value_t = 60)]
    step_s: u64,
    /// A report every this many steps.
    #[arg(long, default_value_t = 5)]
    report_every: u32,
    /// Time compression: simulated seconds per real second.
    #[arg(long, default_value_t = 1800.0)]
    speed: f64,
    /// Share of meters with an offline episode.
    #[arg(long, default_value_t = 0.3)]
    outages: f64,
    /// Share of meters that reboot once.
    #[arg(long, default_value_t = 0.1)]
    reboots: f64,
    /// KES credited to each meter before the run (0: none).
    #[arg(long, default_value_t = 20.0)]
    initial_kes: f64,
    /// Random top-ups during the run.
    #[arg(long, default_value_t = 50)]
    topups: usize,
    /// Meter numbers are PREFIX0001, PREFIX0002, …
    #[arg(long, default_value = "SIM")]
    prefix: String,
    /// The secret of every simulated meter.
    #[arg(long, default_value = "sim-meter-secret")]
    secret: String,
    /// The meters exist already; do not add them.
    #[arg(long)]
    no_provision: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let profile = match Profile::parse(&a.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("meter-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = SimConfig {
        broker: a.broker,
        api: a.api,
        meters: a.meters,
        id_prefix: a.prefix,
        secret: a.secret,
        mode: match a.mode {
            ModeArg::V2 => Mode::V2,
            ModeArg::V1 => Mode::V1,
        },
        profile,
        duration: Duration::from_secs_f64(a.hours.max(0.0) * 3600.0),
        step: Duration::from_secs(a.step_s.max(1)),
        report_every: a.report_every,
        speed: a.speed,
        outage_fraction: a.outages,
        reboot_fraction: a.reboots,
        initial_kes: a.initial_kes,
        topups: a.topups,
        provision: !a.no_provision,
        seed: a.seed,
        ..SimConfig::default()
    };
    match meter_sim::run(cfg).await {
        Ok(summary) => {
            println!("{summary}");
            for (id, mine, gw) in summary.disagreements.iter().take(10) {
                println!("  differs: {id} meter {mine:?} Wh, gateway {gw} Wh");
            }
            if summary.all_agree() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("meter-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
