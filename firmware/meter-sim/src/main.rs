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
    /// OTA mode: meters that take a firmware rollout, trusting this release public key (64
    /// hex digits, `umeme-gateway firmware keygen`). They connect, report, wait for the
    /// rollout you start (`umeme-gateway firmware rollout --all`), update and report again.
    #[arg(long, value_name = "HEX")]
    ota_public_key: Option<String>,
    /// OTA mode: every tenth meter gets an induced fault (a dropped connection, a corrupted
    /// chunk or a power cut during a flash write).
    #[arg(long)]
    ota_faults: bool,
    /// Write an image the simulated meters can boot (version VERSION, --ota-image-bytes long)
    /// to FILE and exit: sign and add it as usual. Any other image is rolled back by them.
    #[arg(long, num_args = 2, value_names = ["VERSION", "FILE"])]
    ota_make_image: Option<Vec<String>>,
    #[arg(long, default_value_t = 20_000)]
    ota_image_bytes: usize,
    /// OTA mode: give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    ota_timeout_s: u64,
    /// An alert scenario (repeatable): spike:METER:FROM_STEP:STEPS:FACTOR,
    /// bypass:METER:FROM:STEPS, site-loss:MAIN:FROM:STEPS:SHARE
    /// (METER counts from 0; mark the site-loss MAIN meter with `meter set ID --main`).
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Drive a debug-build gateway's clock (`POST /api/debug/clock`) with the simulated one,
    /// from the next UTC midnight, so hourly and daily alert rules see the simulated days.
    #[arg(long)]
    gateway_clock: bool,
}

/// OTA mode: one thread per meter (`meter_sim::ota`), a summary at the end. Exit 0 when every
/// meter finished its update and none is bricked.
async fn run_ota(a: &Args, key: &str) -> ExitCode {
    use meter_sim::ota::{Fault, OtaMeter};
    let public: Option<[u8; 32]> = (key.len() == 64)
        .then(|| {
            let mut k = [0u8; 32];
            for (i, b) in k.iter_mut().enumerate() {
                *b = u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(k)
        })
        .flatten();
    let Some(public) = public else {
        eprintln!("meter-sim: --ota-public-key must be 64 hex digits");
        return ExitCode::from(2);
    };
    let ids: Vec<String> = (1..=a.meters)
        .map(|n| format!("{}{n:04}", a.prefix))
        .collect();
    let api = meter_sim::api::Api { addr: a.api };
    if !a.no_provision {
        for id in &ids {
            if let Err(e) = api.provision(id, &a.secret).await {
                eprintln!("meter-sim: provisioning {id}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(a.ota_timeout_s);
    let (tx, rx) = std::sync::mpsc::channel();
    let threads: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let fault = if a.ota_faults {
                Fault::for_index(i)
            } else {
                Fault::None
            };
            let m = OtaMeter::new(id, &a.secret, a.broker, public, fault, 1000);
            let tx = tx.clone();
            std::thread::spawn(move || {
                m.run(
                    move || {
                        let _ = tx.send(());
                    },
                    deadline,
                )
            })
        })
        .collect();
    drop(tx);
    let connected = rx.iter().take(ids.len()).count();
    eprintln!(
        "meter-sim: {connected} meters connected and reporting; start the rollout now (umeme-gateway firmware rollout --version V --all)"
    );
    let (mut versions, mut bricked, mut errors) = (std::collections::BTreeMap::new(), 0, 0);
    for t in threads {
        match t.join() {
            Ok(Ok(r)) if r.bricked => bricked += 1,
            Ok(Ok(r)) => *versions.entry(r.version).or_insert(0) += 1,
            Ok(Err(e)) => {
                errors += 1;
                eprintln!("meter-sim: {e}");
            }
            Err(_) => errors += 1,
        }
    }
    println!("meter-sim OTA summary");
    for (v, n) in &versions {
        println!("  on {v:<12} {n} meters");
    }
    println!("  bricked        {bricked}");
    println!("  unfinished     {errors}");
    if bricked == 0 && errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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
    if let Some([version, file]) = a.ota_make_image.as_deref() {
        let image = meter_core::ota::sim::make_image(version, a.ota_image_bytes, 2);
        return match std::fs::write(file, &image) {
            Ok(()) => {
                println!(
                    "{file}: a bootable simulated image of version {version}, {} bytes",
                    image.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meter-sim: {file}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(key) = a.ota_public_key.clone() {
        return run_ota(&a, &key).await;
    }
    let profile = match Profile::parse(&a.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("meter-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let mut scenarios = Vec::new();
    for s in &a.scenarios {
        match meter_sim::Scenario::parse(s) {
            Ok(sc) => scenarios.push(sc),
            Err(e) => {
                eprintln!("meter-sim: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let gateway_clock_from = a.gateway_clock.then(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        now - now.rem_euclid(86_400_000) + 86_400_000
    });
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
        scenarios,
        gateway_clock_from,
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
