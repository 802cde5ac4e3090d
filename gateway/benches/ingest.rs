//! Ingest benchmark: how many consumption reports per second the gateway commits.
//!
//! N meters connect over MQTT 3.1.1 (127.0.0.1) to a gateway running in this process and
//! publish QoS 1 v2 reports, each keeping up to `--window` publishes unacknowledged. A PUBACK
//! means the report is committed to SQLite (WAL, `synchronous = FULL`) by the ledger writer's
//! group commit, so PUBACKs per second is the committed ingest rate. Reported: committed
//! reports/s, ledger commits/s (one WAL fsync each), reports per commit, publish→PUBACK
//! latency, disk bytes and CPU per report, and a plain SQLite insert loop with the same
//! durability settings as the baseline (one row per transaction, and 500 rows per transaction
//! as the group-commit ceiling).
//!
//! ```text
//! cargo bench -p umeme-gateway --bench ingest [-- --meters N --seconds S --window W --baseline-seconds B]
//! ```
//!
//! `UMEME_BENCH_TARIFF=banded-tou` puts every meter on a banded time-of-use tariff with
//! charges and taxes instead of the implicit flat one.
//!
//! The same settings can come from `UMEME_BENCH_METERS`, `UMEME_BENCH_SECONDS`,
//! `UMEME_BENCH_WINDOW` and `UMEME_BENCH_BASELINE_SECONDS`; arguments win. Without `--bench`
//! (which `cargo bench` passes, and `cargo test --benches` does not) it runs a tiny smoke
//! configuration instead of a measurement. The table goes to stdout, progress and the
//! gateway's warnings (`RUST_LOG`, default `warn`) to stderr.

mod common;

use common::*;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, timeout_at};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use umeme_gateway::config::Config;
use umeme_gateway::daemon::Gateway;
use umeme_gateway::metrics::Metrics;

const USAGE: &str = "usage: cargo bench -p umeme-gateway --bench ingest \
[-- --meters N --seconds S --window W --baseline-seconds B]";
const TOPIC_PREFIX: &str = "smartmeter";
/// Longest wait for every meter to connect (each first CONNECT costs one argon2 check).
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for the PUBACKs still outstanding when the load window closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the presence ops of the connect phase to be committed.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Each report adds this much to the meter's cumulative register.
const WH_PER_REPORT: u64 = 3;
/// The kernel's USER_HZ: the unit of utime and stime in /proc/*/stat.
const USER_HZ: f64 = 100.0;
/// Thread name of the load generator's runtime; its CPU is not the gateway's.
const LOAD_THREAD: &str = "load-rt";
/// The gateway's ledger writer thread (named in `umeme_gateway::writer`).
const WRITER_THREAD: &str = "ledger-writer";

fn main() {
    if let Err(e) = run() {
        eprintln!("ingest bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let opts = Options::parse()?;
    let log = LogCounts::install();
    let dir = tempfile::Builder::new()
        .prefix("umeme-ingest-")
        .tempdir()
        .context("creating the temporary directory")?;
    if !opts.measuring {
        eprintln!("[ingest] smoke run (no --bench argument): not a measurement");
    }
    eprintln!(
        "[ingest] {} meters, window {}, {:.1} s of load, data in {}",
        opts.meters,
        opts.window,
        opts.seconds,
        dir.path().display()
    );
    let config_path = write_config(dir.path(), opts.meters)?;
    let config = Config::load(Some(&config_path)).context("loading the benchmark configuration")?;
    let meters: Vec<String> = (1..=opts.meters).map(|i| format!("BENCH{i:05}")).collect();
    provision(&config, meters.iter())?;
    // fsync latency on a shared VM drifts; the 1-row baseline brackets the load in time.
    let single_before = sqlite_baseline(dir.path(), "before", &meters, 1, opts.baseline())?;

    let gateway_rt = runtime("gw-rt")?;
    let load_rt = runtime(LOAD_THREAD)?;
    let gateway = gateway_rt
        .block_on(Gateway::start(config))
        .context("starting the gateway")?;
    let metrics = gateway.metrics.clone();
    let load = load_rt.block_on(drive_load(
        &opts,
        gateway.broker_addr.expect("the plain meter port is on"),
        &meters,
        metrics.clone(),
    ));
    gateway_rt.block_on(gateway.stop());
    drop(load_rt);
    gateway_rt.shutdown_timeout(Duration::from_secs(5));
    let load = load?;
    let counters = gateway_counters(&metrics);

    let baselines = Baselines::finish(dir.path(), &meters, single_before, opts.baseline())?;
    print!(
        "{}",
        render_report(&opts, dir.path(), &load, &counters, &log, &baselines)
    );
    Ok(())
}

// ---- options ----

#[derive(Debug, Clone)]
struct Options {
    meters: usize,
    seconds: f64,
    window: usize,
    baseline_seconds: f64,
    /// Run by `cargo bench` (a measurement) rather than as a smoke test.
    measuring: bool,
    /// The settings given in the environment and as arguments, for the report's command line.
    env_given: Vec<String>,
    args_given: Vec<String>,
}

impl Options {
    fn parse() -> Result<Options> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let measuring = args.iter().any(|a| a == "--bench");
        let mut o = if measuring {
            Options {
                meters: 500,
                seconds: 10.0,
                window: 4,
                baseline_seconds: 3.0,
                measuring,
                env_given: Vec::new(),
                args_given: Vec::new(),
            }
        } else {
            Options {
                meters: 4,
                seconds: 1.0,
                window: 4,
                baseline_seconds: 0.3,
                measuring,
                env_given: Vec::new(),
                args_given: Vec::new(),
            }
        };
        for (var, slot) in [
            ("UMEME_BENCH_METERS", Setting::Meters),
            ("UMEME_BENCH_SECONDS", Setting::Seconds),
            ("UMEME_BENCH_WINDOW", Setting::Window),
            ("UMEME_BENCH_BASELINE_SECONDS", Setting::BaselineSeconds),
        ] {
            if let Ok(v) = std::env::var(var) {
                o.set(slot, &v).with_context(|| format!("{var}={v:?}"))?;
                o.env_given.push(format!("{var}={v}"));
            }
        }
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let slot = match a.as_str() {
                "--bench" => continue,
                "--meters" => Setting::Meters,
                "--seconds" => Setting::Seconds,
                "--window" => Setting::Window,
                "--baseline-seconds" => Setting::BaselineSeconds,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other if measuring => bail!("unknown argument {other:?}\n{USAGE}"),
                // Under `cargo test` the arguments are libtest's: not ours.
                _ => continue,
            };
            let v = it
                .next()
                .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))?;
            o.set(slot, v).with_context(|| format!("{a} {v}"))?;
            o.args_given.extend([a.clone(), v.clone()]);
        }
        Ok(o)
    }

    fn set(&mut self, slot: Setting, v: &str) -> Result<()> {
        match slot {
            Setting::Meters => self.meters = in_range(v, 1, 5_000)?,
            Setting::Seconds => self.seconds = in_range(v, 0.5, 600.0)?,
            // The broker stops reading a connection at 64 publishes awaiting their commit.
            Setting::Window => self.window = in_range(v, 1, 64)?,
            Setting::BaselineSeconds => self.baseline_seconds = in_range(v, 0.1, 60.0)?,
        }
        Ok(())
    }

    fn load_duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn baseline(&self) -> Duration {
        Duration::from_secs_f64(self.baseline_seconds)
    }

    fn command(&self) -> String {
        let mut words = self.env_given.clone();
        words.push("cargo bench -p umeme-gateway --bench ingest".into());
        if !self.args_given.is_empty() {
            words.push("--".into());
            words.extend(self.args_given.iter().cloned());
        }
        words.join(" ")
    }
}

#[derive(Clone, Copy)]
enum Setting {
    Meters,
    Seconds,
    Window,
    BaselineSeconds,
}

// ---- set-up ----

fn write_config(dir: &Path, meters: usize) -> Result<PathBuf> {
    let data_dir = toml::Value::String(dir.join("data").display().to_string());
    let text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = {data_dir}\n\n\
         [broker]\nlisten = \"127.0.0.1:0\"\nmax_connections = {}\n{UNLIMITED_REPORTS}\n\
         max_unauthenticated_per_ip = {}\n\n\
         [api]\nlisten = \"127.0.0.1:0\"\n",
        meters + 16,
        // Every bench meter connects from 127.0.0.1 at once.
        meters + 16
    );
    let mut text = text;
    // `UMEME_BENCH_TARIFF=banded-tou`: every meter on a banded, time-of-use tariff with dated
    // charges and taxes (issue 16: within 10 % of the implicit flat tariff).
    if std::env::var("UMEME_BENCH_TARIFF").as_deref() == Ok("banded-tou") {
        text.push_str(BANDED_TOU);
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const BANDED_TOU: &str = r#"
[ledger]
default_tariff = "domestic-tou"

[[tariffs]]
name = "domestic-tou"
bands = [
  { from_kwh = 0, to_kwh = 30, price = "12.14" },
  { from_kwh = 30, to_kwh = 100, price = "16.50" },
  { from_kwh = 100, price = "18.57" },
]
tou = [
  { name = "peak", days = "all", from_hour = 18, to_hour = 22, multiplier = "1.2" },
  { name = "off-peak", days = "all", from_hour = 22, to_hour = 18, multiplier = "0.9" },
]
charges = [
  { name = "fuel_energy", rates = [{ from = "2026-01-01", price = "3.10" }] },
  { name = "forex", rates = [{ from = "2026-01-01", price = "0.85" }] },
  { name = "epra_levy", rates = [{ from = "2026-01-01", price = "0.08" }] },
]
taxes = [
  { name = "rep_levy", percent = "5", on = ["energy"] },
  { name = "vat", percent = "16", on = ["energy", "fuel_energy", "forex"] },
]
"#;

fn runtime(name: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("building the {name} runtime"))
}

// ---- the load ----

/// Shared between the meter tasks and the driver.
#[derive(Default)]
struct Progress {
    connected: AtomicUsize,
    failed: AtomicUsize,
    acked: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct LoadWindow {
    deadline: Instant,
}

/// One meter's view of the run.
#[derive(Debug, Default)]
struct ClientStats {
    sent: u64,
    /// PUBACKs received before the window closed.
    acked_in_window: u64,
    /// PUBACKs received while draining after the window.
    acked_after: u64,
    /// Publishes still unacknowledged when the drain gave up.
    unacked: u64,
    /// PUBACKs that did not answer the oldest publish in flight.
    out_of_order: u64,
    /// PUBACKs for no publish in flight.
    unexpected_acks: u64,
    /// Packets other than PUBACK during the load.
    other_packets: u64,
    /// Publish→PUBACK times of `acked_in_window`, in µs.
    latencies_us: Vec<u32>,
}

impl ClientStats {
    /// Matches a packet against the publishes in flight; the send time of the one it acks.
    fn take_ack(
        &mut self,
        packet: Packet,
        inflight: &mut VecDeque<(u16, Instant)>,
    ) -> Option<Instant> {
        let Packet::PubAck(ack) = packet else {
            self.other_packets += 1;
            return None;
        };
        match inflight.iter().position(|(pkid, _)| *pkid == ack.pkid) {
            Some(0) => inflight.pop_front().map(|(_, sent)| sent),
            Some(i) => {
                self.out_of_order += 1;
                inflight.remove(i).map(|(_, sent)| sent)
            }
            None => {
                self.unexpected_acks += 1;
                None
            }
        }
    }
}

/// One meter: connect, wait for the start, publish until the window closes, drain.
async fn run_meter(
    addr: SocketAddr,
    meter: String,
    window: usize,
    progress: Arc<Progress>,
    mut start: watch::Receiver<Option<LoadWindow>>,
) -> Result<ClientStats> {
    let mut conn = match MqttStream::connect(addr, &meter, true, CONNECT_PHASE_LIMIT).await {
        Ok(c) => {
            progress.connected.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err(e) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let load = wait_for_start(&mut start).await?;
    publish_reports(&mut conn, &meter, window, load, &progress).await
}

async fn wait_for_start(start: &mut watch::Receiver<Option<LoadWindow>>) -> Result<LoadWindow> {
    let started = timeout(
        CONNECT_PHASE_LIMIT + SETTLE_LIMIT + Duration::from_secs(10),
        start.wait_for(Option::is_some),
    )
    .await
    .context("no start signal")?
    .map_err(|_| anyhow!("the benchmark stopped before the load phase"))?;
    (*started).ok_or_else(|| anyhow!("start signal without a load window"))
}

async fn publish_reports(
    conn: &mut MqttStream,
    meter: &str,
    window: usize,
    load: LoadWindow,
    progress: &Progress,
) -> Result<ClientStats> {
    let topic = format!("{TOPIC_PREFIX}/{meter}/consumption");
    let deadline = tokio::time::Instant::from_std(load.deadline);
    let mut stats = ClientStats::default();
    let mut inflight: VecDeque<(u16, Instant)> = VecDeque::with_capacity(window);
    let (mut seq, mut energy_wh, mut pkid) = (0u32, 10_000u64, 0u16);
    while Instant::now() < load.deadline {
        if inflight.len() < window {
            while inflight.len() < window {
                seq += 1;
                energy_wh += WH_PER_REPORT;
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                let payload = format!(
                    r#"{{"v":2,"meterNo":"{meter}","seq":{seq},"energyWh":{energy_wh},"powerW":100.0}}"#
                );
                let mut publish = Publish::new(topic.as_str(), QoS::AtLeastOnce, payload);
                publish.pkid = pkid;
                conn.queue(Packet::Publish(publish))?;
                inflight.push_back((pkid, Instant::now()));
                stats.sent += 1;
            }
            conn.flush().await?;
        }
        match timeout_at(deadline, conn.read_more()).await {
            Err(_) => break,
            Ok(read) => read?,
        }
        let now = Instant::now();
        while let Some(packet) = conn.next_buffered()? {
            let Some(sent) = stats.take_ack(packet, &mut inflight) else {
                continue;
            };
            if now < load.deadline {
                stats.acked_in_window += 1;
                let us = (now - sent).as_micros();
                stats
                    .latencies_us
                    .push(u32::try_from(us).unwrap_or(u32::MAX));
                progress.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.acked_after += 1;
            }
        }
    }
    let drain_deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    while !inflight.is_empty() {
        match timeout_at(drain_deadline, conn.read_more()).await {
            Err(_) => break,
            Ok(read) => read?,
        }
        while let Some(packet) = conn.next_buffered()? {
            if stats.take_ack(packet, &mut inflight).is_some() {
                stats.acked_after += 1;
            }
        }
    }
    stats.unacked = inflight.len() as u64;
    conn.queue(Packet::Disconnect)?;
    // The counts are complete; a failed goodbye changes nothing in them.
    let _ = conn.flush().await;
    Ok(stats)
}

/// What the gateway showed during the load window.
struct LoadOutcome {
    meters: usize,
    connected: usize,
    connect_time: Duration,
    before: Snapshot,
    after: Snapshot,
    totals: ClientStats,
    /// Sorted.
    latencies_us: Vec<u32>,
    per_meter_acks: (u64, u64),
    errors: Vec<String>,
    /// Most threads seen in the process during the connect phase and the load.
    peak_threads: u64,
    /// Peak resident memory of the process so far (VmHWM, KiB) when the meters started to
    /// connect, when they had connected, and after the load.
    peak_rss_kib: [Option<u64>; 3],
}

impl LoadOutcome {
    fn seconds(&self) -> f64 {
        (self.after.at - self.before.at).as_secs_f64()
    }
}

async fn drive_load(
    opts: &Options,
    addr: SocketAddr,
    meters: &[String],
    metrics: Arc<Metrics>,
) -> Result<LoadOutcome> {
    let progress = Arc::new(Progress::default());
    let (start_tx, start_rx) = watch::channel(None);
    let rss_at_start = proc_status("VmHWM:");
    let connect_began = Instant::now();
    let tasks: Vec<_> = meters
        .iter()
        .map(|m| {
            let task = tokio::spawn(run_meter(
                addr,
                m.clone(),
                opts.window,
                progress.clone(),
                start_rx.clone(),
            ));
            (m.clone(), task)
        })
        .collect();
    drop(start_rx);

    let n = meters.len();
    let mut next_report = connect_began + PROGRESS_EVERY;
    let mut peak_threads = 0;
    loop {
        peak_threads = peak_threads.max(proc_status("Threads:").unwrap_or(0));
        let (ok, failed) = (
            progress.connected.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
        );
        if ok + failed >= n {
            break;
        }
        if connect_began.elapsed() > CONNECT_PHASE_LIMIT {
            eprintln!("[connect] gave up waiting: {ok}/{n} connected, {failed} failed");
            break;
        }
        if Instant::now() >= next_report {
            eprintln!(
                "[connect] {ok}/{n} meters connected ({failed} failed) after {:.1} s",
                connect_began.elapsed().as_secs_f64()
            );
            next_report += PROGRESS_EVERY;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let connect_time = connect_began.elapsed();
    let rss_after_connect = proc_status("VmHWM:");
    let connected = progress.connected.load(Ordering::Relaxed);
    eprintln!(
        "[connect] {connected}/{n} meters connected in {:.1} s",
        connect_time.as_secs_f64()
    );

    // Each CONNECT queued a presence op; let those commit before measuring.
    let settle_until = Instant::now() + SETTLE_LIMIT;
    while metrics.get("umeme_ledger_ops_total", &[]) < connected as f64
        && Instant::now() < settle_until
    {
        sleep(Duration::from_millis(20)).await;
    }

    let before = Snapshot::take(&metrics);
    let deadline = before.at + opts.load_duration();
    if connected > 0 {
        start_tx.send_replace(Some(LoadWindow { deadline }));
        let mut last = (before.at, 0u64, before.commits);
        while Instant::now() < deadline {
            let next = (Instant::now() + PROGRESS_EVERY).min(deadline);
            sleep_until(next.into()).await;
            if Instant::now() >= deadline {
                break;
            }
            peak_threads = peak_threads.max(proc_status("Threads:").unwrap_or(0));
            let (now, acked) = (Instant::now(), progress.acked.load(Ordering::Relaxed));
            let commits = metrics.get("umeme_ledger_commits_total", &[]);
            let dt = (now - last.0).as_secs_f64();
            eprintln!(
                "[load] {:.0}/{:.0} s: {acked} reports committed, {:.0} reports/s, {:.0} commits/s",
                (now - before.at).as_secs_f64(),
                opts.seconds,
                (acked - last.1) as f64 / dt,
                (commits - last.2) / dt,
            );
            last = (now, acked, commits);
        }
        sleep_until(deadline.into()).await;
    }
    let after = Snapshot::take(&metrics);
    // Meters still waiting for the start learn that there is none.
    drop(start_tx);
    if connected > 0 {
        eprintln!("[load] window closed; draining outstanding PUBACKs");
    }

    let mut totals = ClientStats::default();
    let mut per_meter_acks = (u64::MAX, 0u64);
    let mut errors = Vec::new();
    for (meter, task) in tasks {
        match task.await {
            Ok(Ok(s)) => {
                totals.sent += s.sent;
                totals.acked_in_window += s.acked_in_window;
                totals.acked_after += s.acked_after;
                totals.unacked += s.unacked;
                totals.out_of_order += s.out_of_order;
                totals.unexpected_acks += s.unexpected_acks;
                totals.other_packets += s.other_packets;
                totals.latencies_us.extend_from_slice(&s.latencies_us);
                per_meter_acks.0 = per_meter_acks.0.min(s.acked_in_window);
                per_meter_acks.1 = per_meter_acks.1.max(s.acked_in_window);
            }
            Ok(Err(e)) => errors.push(format!("{meter}: {e:#}")),
            Err(e) => errors.push(format!("{meter}: client task failed: {e}")),
        }
    }
    if connected == 0 {
        let first = errors.first().map_or("no error recorded", String::as_str);
        bail!("no meter could connect (first error: {first})");
    }
    if per_meter_acks.0 == u64::MAX {
        per_meter_acks.0 = 0;
    }
    let mut latencies_us = std::mem::take(&mut totals.latencies_us);
    latencies_us.sort_unstable();
    Ok(LoadOutcome {
        meters: n,
        connected,
        connect_time,
        before,
        after,
        totals,
        latencies_us,
        per_meter_acks,
        errors,
        peak_threads,
        peak_rss_kib: [rss_at_start, rss_after_connect, proc_status("VmHWM:")],
    })
}

// ---- measurements from the process ----

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    commits: f64,
    ops: f64,
    write_bytes: Option<u64>,
    cpu: Option<Cpu>,
}

impl Snapshot {
    fn take(metrics: &Metrics) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            commits: metrics.get("umeme_ledger_commits_total", &[]),
            ops: metrics.get("umeme_ledger_ops_total", &[]),
            write_bytes: own_write_bytes(),
            cpu: Cpu::read(),
        }
    }
}

/// A numeric field of /proc/self/status (`Threads:`, `VmHWM:` in KiB).
fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// CPU time in clock ticks: the whole process, the benchmark's own threads (load generator
/// runtime and main thread), and the ledger writer thread.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    process: u64,
    harness: u64,
    writer: u64,
}

impl Cpu {
    fn read() -> Option<Cpu> {
        let (_, process) = stat_ticks(Path::new("/proc/self/stat"))?;
        let main_tid = std::process::id().to_string();
        let mut cpu = Cpu {
            process,
            ..Cpu::default()
        };
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Some((name, ticks)) = stat_ticks(&entry.path().join("stat")) else {
                continue;
            };
            if name == LOAD_THREAD || entry.file_name().to_str() == Some(main_tid.as_str()) {
                cpu.harness += ticks;
            } else if name == WRITER_THREAD {
                cpu.writer += ticks;
            }
        }
        Some(cpu)
    }
}

/// `(comm, utime + stime)` from a /proc stat file.
fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let name = text.get(open + 1..close)?.to_string();
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// Non-zero gateway counters that mean something went wrong, plus the report outcomes.
struct Counters {
    problems: Vec<(String, f64)>,
    outcomes: Vec<(String, f64)>,
}

fn gateway_counters(metrics: &Metrics) -> Counters {
    let mut counters = Counters {
        problems: Vec::new(),
        outcomes: Vec::new(),
    };
    for line in metrics.render().lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let bad = ["refused", "rejected", "errors"]
            .iter()
            .any(|w| series.contains(w));
        if bad && value > 0.0 {
            counters.problems.push((series.to_string(), value));
        } else if series.starts_with("umeme_mqtt_reports_total") {
            counters.outcomes.push((series.to_string(), value));
        }
    }
    counters
}

/// Counts the warnings and errors the gateway logged, and prints them to stderr.
#[derive(Clone, Default)]
struct LogCounts(Arc<[AtomicU64; 2]>);

impl LogCounts {
    fn install() -> LogCounts {
        let counts = LogCounts::default();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let installed = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .with(
                counts
                    .clone()
                    .with_filter(tracing::level_filters::LevelFilter::WARN),
            )
            .try_init();
        if let Err(e) = installed {
            eprintln!("[ingest] gateway log not captured: {e}");
        }
        counts
    }

    fn warnings(&self) -> u64 {
        self.0[0].load(Ordering::Relaxed)
    }

    fn errors(&self) -> u64 {
        self.0[1].load(Ordering::Relaxed)
    }
}

impl<S: tracing::Subscriber> Layer<S> for LogCounts {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: LayerContext<'_, S>) {
        match *event.metadata().level() {
            tracing::Level::WARN => self.0[0].fetch_add(1, Ordering::Relaxed),
            tracing::Level::ERROR => self.0[1].fetch_add(1, Ordering::Relaxed),
            _ => return,
        };
    }
}

// ---- the baseline ----

// ---- the report ----

fn render_report(
    opts: &Options,
    dir: &Path,
    load: &LoadOutcome,
    counters: &Counters,
    log: &LogCounts,
    baselines: &Baselines,
) -> String {
    let secs = load.seconds();
    let acked = load.totals.acked_in_window;
    let reports_per_s = acked as f64 / secs;
    let commits = load.after.commits - load.before.commits;
    let ops = load.after.ops - load.before.ops;
    let bytes = load
        .after
        .write_bytes
        .zip(load.before.write_bytes)
        .map(|(a, b)| a.saturating_sub(b));
    let per_report = |x: f64| {
        if acked > 0 {
            x / acked as f64
        } else {
            f64::NAN
        }
    };
    let cpu = load.after.cpu.zip(load.before.cpu).map(|(a, b)| Cpu {
        process: a.process.saturating_sub(b.process),
        harness: a.harness.saturating_sub(b.harness),
        writer: a.writer.saturating_sub(b.writer),
    });

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "\n## umeme-gateway ingest benchmark\n");
    if !opts.measuring {
        let _ = writeln!(w, "**Smoke run (no `--bench`): not a measurement.**\n");
    }
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| date | {} |", utc_now());
    let _ = writeln!(w, "| command | `{}` |", opts.command());
    let _ = writeln!(w, "| machine | {} |", machine());
    let _ = writeln!(w, "| data directory | `{}` |", dir.display());
    let _ = writeln!(
        w,
        "| meters | {} connected of {} (connect phase {:.1} s), up to {} unacknowledged QoS 1 publishes each |",
        load.connected,
        load.meters,
        load.connect_time.as_secs_f64(),
        opts.window
    );
    let _ = writeln!(w, "| load window | {secs:.1} s |");

    let _ = writeln!(
        w,
        "\n### Gateway: publish → SQLite commit (WAL, synchronous=FULL) → PUBACK\n"
    );
    let _ = writeln!(w, "| metric | value |\n|---|---:|");
    let _ = writeln!(w, "| committed reports/s (PUBACKs) | {reports_per_s:.0} |");
    let _ = writeln!(w, "| reports committed in the window | {acked} |");
    let _ = writeln!(
        w,
        "| ledger commits/s (one WAL fsync each) | {:.0} |",
        commits / secs
    );
    let _ = writeln!(
        w,
        "| wall time per ledger commit (1 ÷ commits/s) | {} |",
        if commits > 0.0 {
            format!("{:.1} ms", secs / commits * 1000.0)
        } else {
            "n/a".into()
        }
    );
    let _ = writeln!(
        w,
        "| ledger ops per commit (average) | {:.1} |",
        if commits > 0.0 {
            ops / commits
        } else {
            f64::NAN
        }
    );
    let sorted = &load.latencies_us;
    let _ = writeln!(
        w,
        "| publish→PUBACK p50 | {} |",
        ms(percentile(sorted, 50.0))
    );
    let _ = writeln!(
        w,
        "| publish→PUBACK p99 | {} |",
        ms(percentile(sorted, 99.0))
    );
    let _ = writeln!(w, "| publish→PUBACK max | {} |", ms(sorted.last().copied()));
    let _ = writeln!(
        w,
        "| disk bytes written per report | {} |",
        bytes.map_or("n/a".into(), |b| format!("{:.0}", per_report(b as f64)))
    );
    match cpu {
        Some(c) => {
            let s = |ticks: u64| ticks as f64 / USER_HZ;
            let gateway = c.process.saturating_sub(c.harness);
            let _ = writeln!(
                w,
                "| CPU s per 1000 reports, whole process | {:.3} |",
                per_report(s(c.process)) * 1000.0
            );
            let _ = writeln!(
                w,
                "| CPU s per 1000 reports, gateway only (load generator excluded) | {:.3} |",
                per_report(s(gateway)) * 1000.0
            );
            let _ = writeln!(
                w,
                "| CPU used, gateway / load generator | {:.0} % / {:.0} % of one core |",
                s(gateway) / secs * 100.0,
                s(c.harness) / secs * 100.0
            );
            let _ = writeln!(
                w,
                "| ledger-writer thread on CPU | {:.0} % of the window |",
                s(c.writer) / secs * 100.0
            );
        }
        None => {
            let _ = writeln!(w, "| CPU | n/a (/proc unreadable) |");
        }
    }
    let _ = writeln!(
        w,
        "| reports per meter in the window, min / max | {} / {} |",
        load.per_meter_acks.0, load.per_meter_acks.1
    );

    let _ = writeln!(
        w,
        "\n### Baseline: plain SQLite insert loop, same file system, WAL, synchronous=FULL\n"
    );
    baselines.write_table(w, "the load");
    let Baselines {
        single_before: before,
        single_after: after,
        batch,
    } = baselines;

    let _ = writeln!(w, "\n### Ratios\n");
    let _ = writeln!(w, "| ratio | value |\n|---|---:|");
    let _ = writeln!(
        w,
        "| gateway reports/s ÷ baseline 1-row-per-commit inserts/s (before / after the load) | {:.2} / {:.2} |",
        reports_per_s / before.rows_per_s(),
        reports_per_s / after.rows_per_s()
    );
    let _ = writeln!(
        w,
        "| gateway reports/s ÷ baseline {BASELINE_BATCH}-rows-per-commit inserts/s (group-commit ceiling) | {:.3} |",
        reports_per_s / batch.rows_per_s()
    );
    let _ = writeln!(
        w,
        "| gateway commits/s ÷ baseline 1-row commits/s (before / after the load) | {:.3} / {:.3} |",
        commits / secs / before.txs_per_s(),
        commits / secs / after.txs_per_s()
    );

    let _ = writeln!(w, "\n### Health during the run\n");
    let _ = writeln!(w, "| check | value |\n|---|---|");
    let t = &load.totals;
    let _ = writeln!(
        w,
        "| client errors (connect or connection) | {} |",
        load.errors.len()
    );
    for e in load.errors.iter().take(5) {
        let _ = writeln!(w, "| ↳ | {} |", e.replace('|', "\\|"));
    }
    let _ = writeln!(
        w,
        "| publishes sent / acked in window / acked after / never acked | {} / {} / {} / {} |",
        t.sent, t.acked_in_window, t.acked_after, t.unacked
    );
    let _ = writeln!(
        w,
        "| out-of-order / unexpected PUBACKs, other packets | {} / {}, {} |",
        t.out_of_order, t.unexpected_acks, t.other_packets
    );
    let mib = |k: Option<u64>| k.map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
    let _ = writeln!(w, "| most threads in the process | {} |", load.peak_threads);
    let [rss_start, rss_connected, rss_end] = load.peak_rss_kib;
    let _ = writeln!(
        w,
        "| peak resident memory before connecting / after the connect phase / after the load | {} / {} / {} |",
        mib(rss_start),
        mib(rss_connected),
        mib(rss_end)
    );
    let _ = writeln!(
        w,
        "| gateway log warnings / errors | {} / {} |",
        log.warnings(),
        log.errors()
    );
    if counters.problems.is_empty() {
        let _ = writeln!(w, "| gateway error/refusal counters | all zero |");
    }
    for (series, v) in &counters.problems {
        let _ = writeln!(w, "| `{series}` | {v} |");
    }
    for (series, v) in &counters.outcomes {
        let _ = writeln!(w, "| `{series}` | {v} |");
    }
    out
}
