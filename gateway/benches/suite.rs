//! The comparison suite (issue 8): the release gateway against what a site would otherwise run,
//! measured in one run on one machine.
//!
//! The gateway runs as a child process (the `umeme-gateway` binary of this build, `run
//! --config`), so its CPU, resident memory and disk writes come from `/proc/<pid>` alone; the
//! meters are tasks in this process, each with its own TCP connection to 127.0.0.1. The suite:
//!
//! 1. provisions the meters in the gateway's database and runs a plain SQLite insert loop with
//!    the gateway's durability settings (WAL, `synchronous = FULL`, one row per transaction);
//! 2. starts the gateway, reads its idle RSS, then for each size (100, 1,000 and 5,000 meters)
//!    connects that many meters (RSS with them connected) and lets each publish v2 reports flat
//!    out, QoS 1, `WINDOW` unacknowledged: PUBACKs per second is the committed ingest rate;
//! 3. paced load: 1,000 meters subscribed to their `command/balance`, each publishing one report
//!    every 10 s (real time, phases spread over the interval), while payments go through
//!    `POST /daraja/simulate` to probe meters that do not report: publish→PUBACK and
//!    payment→`command/balance` latency;
//! 4. the paced load again, reports only, on the gateway restarted with each
//!    `[ledger] commit_delay` of `--commit-delays`: bytes written per report against latency;
//! 5. the same flat-out load against Debian's mosquitto (no auth, no persistence) with one
//!    subscriber that only counts: the relay ceiling;
//! 6. the SQLite insert loop again, one row and 500 rows per transaction.
//!
//! ```text
//! cargo bench -p umeme-gateway --bench suite [-- --full | --sizes 100,1000 --seconds S --paced-seconds P --commit-delays 0,200]
//! ```
//!
//! Without `--bench` (as under `cargo test --benches`) it does a 4-meter smoke run that is not
//! a measurement. Tables go to stdout as markdown, progress to stderr. Every child process is
//! killed on every path: on drop, and by the kernel (`PR_SET_PDEATHSIG`) if this process dies.

mod common;

use common::*;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, timeout_at};

use umeme_gateway::config::Config;

const USAGE: &str = "usage: cargo bench -p umeme-gateway --bench suite \
[-- --full | --sizes 100,1000,5000 --seconds S --paced-seconds P --baseline-seconds B \
--commit-delays 0,20,200,500|none]";
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_umeme-gateway");
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const TOPIC_PREFIX: &str = "smartmeter";
/// Unacknowledged QoS 1 publishes per meter in the flat-out runs.
const WINDOW: usize = 4;
/// CONNECTs in flight at once. The gateway's verifier queue holds 1024 checks and refuses
/// (as bad credentials) the CONNECTs it cannot queue, so a storm of 5,000 at once fails.
const CONNECT_CONCURRENCY: usize = 256;
const CONNECT_LIMIT: Duration = Duration::from_secs(180);
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
const START_LIMIT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// The paced load: each meter reports this often, as the issue's goal says.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
const PACED_METERS: usize = 1_000;
/// Meters that only receive payments (they do not report) in the paced run.
const PROBES: usize = 5;
const PAYMENT_EVERY: Duration = Duration::from_millis(250);
const PAYMENT_LIMIT: Duration = Duration::from_secs(5);
const WH_PER_REPORT: u64 = 3;
const USER_HZ: f64 = 100.0;

fn main() {
    if let Err(e) = run() {
        eprintln!("suite bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let opts = Options::parse()?;
    let fd_limit = raise_fd_limit(opts.sizes.iter().max().copied().unwrap_or(0) + 512)?;
    let dir = tempfile::Builder::new()
        .prefix("umeme-suite-")
        .tempdir()
        .context("creating the temporary directory")?;
    if !opts.measuring {
        eprintln!("[suite] smoke run (no --bench argument): not a measurement");
    }
    let most = opts
        .sizes
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(opts.paced_meters);
    let meters: Vec<String> = (1..=most).map(|i| format!("BENCH{i:05}")).collect();
    let probes: Vec<String> = (1..=PROBES).map(|i| format!("PROBE{i:02}")).collect();
    let gw = GatewayFiles::write(dir.path(), most + PROBES, None)?;
    provision(&gw.config, meters.iter().chain(&probes))?;
    let single_before = sqlite_baseline(dir.path(), "before", &meters, 1, opts.baseline())?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load-rt")
        .enable_all()
        .build()
        .context("building the load runtime")?;
    let gateway = rt.block_on(gateway_runs(&opts, &gw, &meters, &probes))?;
    let mosquitto = match mosquitto_available(&opts)? {
        true => Some(rt.block_on(mosquitto_runs(&opts, dir.path(), &meters))?),
        false => None,
    };
    drop(rt);
    let baselines = Baselines::finish(dir.path(), &meters, single_before, opts.baseline())?;
    print!(
        "{}",
        render(&opts, fd_limit, &gateway, mosquitto.as_ref(), &baselines)
    );
    Ok(())
}

// ---- options ----

#[derive(Debug, Clone)]
struct Options {
    sizes: Vec<usize>,
    seconds: f64,
    paced_meters: usize,
    paced_seconds: f64,
    baseline_seconds: f64,
    /// Extra paced runs, each on a gateway restarted with this `[ledger] commit_delay` (ms).
    commit_delays: Vec<u64>,
    measuring: bool,
    args_given: Vec<String>,
}

impl Options {
    fn parse() -> Result<Options> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let measuring = args.iter().any(|a| a == "--bench");
        let mut o = if measuring {
            Options {
                sizes: vec![100, 1_000, 5_000],
                seconds: 6.0,
                paced_meters: PACED_METERS,
                paced_seconds: 30.0,
                baseline_seconds: 3.0,
                commit_delays: vec![0, 20, 200, 500],
                measuring,
                args_given: Vec::new(),
            }
        } else {
            Options {
                sizes: vec![4],
                seconds: 0.5,
                paced_meters: 4,
                paced_seconds: 1.0,
                baseline_seconds: 0.2,
                commit_delays: vec![10],
                measuring,
                args_given: Vec::new(),
            }
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--bench" => continue,
                "--full" => {
                    o.sizes = vec![100, 1_000, 5_000, 10_000];
                    o.seconds = 15.0;
                    o.paced_seconds = 60.0;
                    o.baseline_seconds = 5.0;
                    o.args_given.push(a.clone());
                }
                "--sizes" => {
                    let v = value()?;
                    o.sizes = v
                        .split(',')
                        .map(|s| in_range(s.trim(), 1, 20_000))
                        .collect::<Result<_>>()?;
                    o.args_given.extend([a.clone(), v]);
                }
                "--seconds" => {
                    let v = value()?;
                    o.seconds = in_range(&v, 0.5, 600.0)?;
                    o.args_given.extend([a.clone(), v]);
                }
                "--paced-seconds" => {
                    let v = value()?;
                    o.paced_seconds = in_range(&v, 1.0, 3_600.0)?;
                    o.args_given.extend([a.clone(), v]);
                }
                "--commit-delays" => {
                    let v = value()?;
                    o.commit_delays = v
                        .split(',')
                        .filter(|s| !s.trim().is_empty() && s.trim() != "none")
                        .map(|s| in_range(s.trim(), 0, 1_000))
                        .collect::<Result<_>>()?;
                    o.args_given.extend([a.clone(), v]);
                }
                "--baseline-seconds" => {
                    let v = value()?;
                    o.baseline_seconds = in_range(&v, 0.1, 60.0)?;
                    o.args_given.extend([a.clone(), v]);
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other if measuring => bail!("unknown argument {other:?}\n{USAGE}"),
                // Under `cargo test` the arguments are libtest's.
                _ => continue,
            }
        }
        Ok(o)
    }

    fn baseline(&self) -> Duration {
        Duration::from_secs_f64(self.baseline_seconds)
    }

    fn window(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn command(&self) -> String {
        let mut words = vec!["cargo bench -p umeme-gateway --bench suite".to_string()];
        if !self.args_given.is_empty() {
            words.push("--".into());
            words.extend(self.args_given.iter().cloned());
        }
        words.join(" ")
    }
}

/// Raises this process's open-file limit (inherited by the gateway and mosquitto) so every
/// meter's socket fits: each process holds one side of every connection.
fn raise_fd_limit(needed: usize) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    if (lim.rlim_cur as usize) < needed {
        bail!(
            "the open-file limit is {} (hard), {needed} are needed: raise it (ulimit -Hn) or use --sizes",
            lim.rlim_cur
        );
    }
    Ok(lim.rlim_cur)
}

// ---- set-up ----

struct GatewayFiles {
    config: Config,
    config_path: PathBuf,
    log_path: PathBuf,
    broker: SocketAddr,
    api: SocketAddr,
}

impl GatewayFiles {
    /// A configuration on `dir/data`, with `[ledger] commit_delay` of `commit_delay_ms` or the
    /// gateway's default.
    fn write(dir: &Path, meters: usize, commit_delay_ms: Option<u64>) -> Result<GatewayFiles> {
        let broker = loopback(free_port()?);
        let api = loopback(free_port()?);
        let data_dir = toml::Value::String(dir.join("data").display().to_string());
        let text = format!(
            "[gateway]\nid = \"bench\"\ndata_dir = {data_dir}\n\n\
             [broker]\nlisten = \"{broker}\"\nmax_connections = {}\n{UNLIMITED_REPORTS}\n\
             {}\
             [api]\nlisten = \"{api}\"\nallow_simulate = true\n",
            meters + 64,
            commit_delay_ms.map_or(String::new(), |ms| format!(
                "[ledger]\ncommit_delay = \"{ms}ms\"\n\n"
            )),
        );
        let name = match commit_delay_ms {
            None => "gateway".to_string(),
            Some(ms) => format!("gateway-delay-{ms}ms"),
        };
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config = Config::load(Some(&config_path)).context("loading the bench configuration")?;
        Ok(GatewayFiles {
            config,
            config_path,
            log_path: dir.join(format!("{name}.log")),
            broker,
            api,
        })
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

// ---- child processes ----

/// A child process that is killed when this value drops, and by the kernel when this process
/// dies (`PR_SET_PDEATHSIG`, set before exec).
struct Guarded {
    name: &'static str,
    child: Option<Child>,
}

impl Guarded {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Guarded> {
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Guarded {
            name,
            child: Some(child),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[{}] no exit 10 s after SIGTERM; killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until something accepts TCP connections on `addr` (bounded).
async fn wait_listening(addr: SocketAddr, child: &mut Guarded) -> Result<()> {
    let until = Instant::now() + START_LIMIT;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(c) = child.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("{} exited during start-up: {status}", child.name);
            }
        }
        if Instant::now() > until {
            bail!(
                "{} is not listening on {addr} after {START_LIMIT:?}",
                child.name
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// CPU ticks, resident memory and bytes written of one process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    ticks: u64,
    rss_kib: u64,
    write_bytes: Option<u64>,
}

impl ProcSample {
    fn of(pid: u32) -> ProcSample {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let ticks = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|t| {
                let rest: Vec<&str> = t.get(t.rfind(')')? + 1..)?.split_whitespace().collect();
                // utime and stime are fields 14 and 15; `rest` starts at field 3.
                Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        let field = |file: &str, key: &str| {
            std::fs::read_to_string(dir.join(file)).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        };
        ProcSample {
            ticks,
            rss_kib: field("status", "VmRSS:").unwrap_or(0),
            write_bytes: field("io", "write_bytes:"),
        }
    }
}

// ---- HTTP, for the gateway's admin API ----

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await?;
        anyhow::Ok(resp)
    };
    let resp = timeout(Duration::from_secs(10), exchange)
        .await
        .context("HTTP request timed out")??;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "no HTTP status in {:?}",
                text.chars().take(80).collect::<String>()
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The ledger's commit and op counters from `/metrics`.
async fn ledger_counters(api: SocketAddr) -> (f64, f64) {
    let Ok((200, text)) = http(api, "GET", "/metrics", "").await else {
        return (f64::NAN, f64::NAN);
    };
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (
        get("umeme_ledger_commits_total"),
        get("umeme_ledger_ops_total"),
    )
}

/// Waits until the gateway's ledger has been idle for 300 ms (the presence ops of a connect or
/// disconnect wave committed), bounded.
async fn settle(api: Option<SocketAddr>) {
    let Some(api) = api else {
        sleep(Duration::from_millis(500)).await;
        return;
    };
    let until = Instant::now() + SETTLE_LIMIT;
    let mut last = ledger_counters(api).await.1;
    let mut still_since = Instant::now();
    while Instant::now() < until {
        sleep(Duration::from_millis(100)).await;
        let now = ledger_counters(api).await.1;
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if still_since.elapsed() >= Duration::from_millis(300) {
            return;
        }
    }
}

// ---- the MQTT client side ----

/// What the meters do once connected.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Publish until `deadline`, keeping `WINDOW` publishes unacknowledged.
    FlatOut { deadline: Instant },
    /// One publish every `REPORT_INTERVAL` from `first + phase(meter)` until `deadline`.
    Paced { first: Instant, deadline: Instant },
}

/// Reports each meter has sent so far, across runs: the ledger drops a `seq` it has seen
/// (a repeat), so a meter that reconnects continues its sequence and its energy register.
type Sent = Arc<Vec<AtomicU32>>;

#[derive(Default)]
struct Progress {
    connected: AtomicUsize,
    failed: AtomicUsize,
    acked: AtomicU64,
}

#[derive(Debug, Default)]
struct ClientStats {
    sent: u64,
    acked_in_window: u64,
    acked_after: u64,
    unacked: u64,
    out_of_order: u64,
    /// Publishes received (balance commands), acknowledged if QoS 1.
    received: u64,
    other_packets: u64,
    latencies_us: Vec<u32>,
}

impl ClientStats {
    fn add(&mut self, s: &ClientStats) {
        self.sent += s.sent;
        self.acked_in_window += s.acked_in_window;
        self.acked_after += s.acked_after;
        self.unacked += s.unacked;
        self.out_of_order += s.out_of_order;
        self.received += s.received;
        self.other_packets += s.other_packets;
        self.latencies_us.extend_from_slice(&s.latencies_us);
    }
}

/// One meter's connection during a run.
struct Meter {
    conn: MqttStream,
    topic: String,
    id: String,
    seq: u32,
    pkid: u16,
    inflight: VecDeque<(u16, Instant)>,
    stats: ClientStats,
}

impl Meter {
    fn publish(&mut self) -> Result<()> {
        self.seq += 1;
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        let energy_wh = 10_000 + u64::from(self.seq) * WH_PER_REPORT;
        let payload = format!(
            r#"{{"v":2,"meterNo":"{}","seq":{},"energyWh":{energy_wh},"powerW":100.0}}"#,
            self.id, self.seq
        );
        let mut publish = Publish::new(self.topic.as_str(), QoS::AtLeastOnce, payload);
        publish.pkid = self.pkid;
        self.conn.queue(Packet::Publish(publish))?;
        self.inflight.push_back((self.pkid, Instant::now()));
        self.stats.sent += 1;
        Ok(())
    }

    /// Handles the buffered packets; `in_window` decides where a PUBACK is counted.
    fn take_packets(&mut self, in_window: bool, progress: &Progress) -> Result<()> {
        let now = Instant::now();
        while let Some(packet) = self.conn.next_buffered()? {
            match packet {
                Packet::PubAck(ack) => {
                    let sent = match self.inflight.iter().position(|(p, _)| *p == ack.pkid) {
                        Some(0) => self.inflight.pop_front().map(|(_, t)| t),
                        Some(i) => {
                            self.stats.out_of_order += 1;
                            self.inflight.remove(i).map(|(_, t)| t)
                        }
                        None => None,
                    };
                    let Some(sent) = sent else {
                        self.stats.other_packets += 1;
                        continue;
                    };
                    if in_window {
                        self.stats.acked_in_window += 1;
                        let us = u32::try_from((now - sent).as_micros()).unwrap_or(u32::MAX);
                        self.stats.latencies_us.push(us);
                        progress.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.stats.acked_after += 1;
                    }
                }
                Packet::Publish(p) => {
                    self.stats.received += 1;
                    if p.qos == QoS::AtLeastOnce {
                        self.conn.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                    }
                }
                _ => self.stats.other_packets += 1,
            }
        }
        Ok(())
    }

    async fn run(
        mut self,
        plan: Plan,
        phase: Duration,
        progress: &Progress,
        sent: &AtomicU32,
    ) -> Result<ClientStats> {
        match plan {
            Plan::FlatOut { deadline } => {
                let until = tokio::time::Instant::from_std(deadline);
                while Instant::now() < deadline {
                    while self.inflight.len() < WINDOW {
                        self.publish()?;
                    }
                    self.conn.flush().await?;
                    match timeout_at(until, self.conn.read_more()).await {
                        Err(_) => break,
                        Ok(read) => read?,
                    }
                    self.take_packets(Instant::now() < deadline, progress)?;
                }
            }
            Plan::Paced { first, deadline } => {
                let until = tokio::time::Instant::from_std(deadline);
                let mut next = tokio::time::Instant::from_std(first + phase);
                while next < until {
                    tokio::select! {
                        _ = sleep_until(next) => {
                            self.publish()?;
                            next += REPORT_INTERVAL;
                        }
                        read = self.conn.read_more() => {
                            read?;
                            // Every report of a paced run is a latency sample.
                            self.take_packets(true, progress)?;
                        }
                    }
                    self.conn.flush().await?;
                }
                // Stay connected through the window: a meter leaving early would put its
                // disconnect (a ledger op) into the measured window.
                while tokio::time::Instant::now() < until {
                    match timeout_at(until, self.conn.read_more()).await {
                        Err(_) => break,
                        Ok(read) => read?,
                    }
                    self.take_packets(true, progress)?;
                    self.conn.flush().await?;
                }
            }
        }
        let until = tokio::time::Instant::now() + DRAIN_LIMIT;
        let paced = matches!(plan, Plan::Paced { .. });
        while !self.inflight.is_empty() {
            match timeout_at(until, self.conn.read_more()).await {
                Err(_) => break,
                Ok(read) => read?,
            }
            self.take_packets(paced, progress)?;
            self.conn.flush().await?;
        }
        self.stats.unacked = self.inflight.len() as u64;
        sent.store(self.seq, Ordering::Relaxed);
        let stats = std::mem::take(&mut self.stats);
        self.conn.goodbye().await;
        Ok(stats)
    }
}

/// Connects, optionally subscribes to its balance, waits for the plan, runs it.
/// One meter of a run: its number, whether it subscribes to its balance (paced runs), its
/// phase in the report interval, and its slot in the run's `Sent` counters.
struct MeterSpec {
    id: String,
    subscribe: bool,
    phase: Duration,
    sent: (Sent, usize),
}

async fn meter_task(
    target: Target,
    spec: MeterSpec,
    gate: Arc<Semaphore>,
    progress: Arc<Progress>,
    mut start: watch::Receiver<Option<Plan>>,
) -> Result<ClientStats> {
    let MeterSpec {
        id,
        subscribe,
        phase,
        sent,
    } = spec;
    let connected = async {
        let _permit = gate.acquire().await?;
        let mut conn = MqttStream::connect(target.broker, &id, target.login, CONNECT_LIMIT).await?;
        if subscribe {
            conn.subscribe(&format!("{TOPIC_PREFIX}/{id}/command/balance"))
                .await?;
        }
        anyhow::Ok(conn)
    }
    .await;
    let conn = match connected {
        Ok(c) => {
            progress.connected.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err(e) => {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let plan = timeout(
        CONNECT_LIMIT + SETTLE_LIMIT,
        start.wait_for(Option::is_some),
    )
    .await
    .context("no start signal")?
    .map_err(|_| anyhow!("the run ended before its load phase"))?
    .ok_or_else(|| anyhow!("no plan"))?;
    let meter = Meter {
        conn,
        topic: format!("{TOPIC_PREFIX}/{id}/consumption"),
        id,
        seq: sent.0[sent.1].load(Ordering::Relaxed),
        pkid: 0,
        inflight: VecDeque::with_capacity(WINDOW),
        stats: ClientStats::default(),
    };
    meter.run(plan, phase, &progress, &sent.0[sent.1]).await
}

/// Where the meters connect and which process serves them.
#[derive(Debug, Clone, Copy)]
struct Target {
    broker: SocketAddr,
    pid: u32,
    login: bool,
    /// The gateway's admin API (ledger counters); none for mosquitto.
    api: Option<SocketAddr>,
}

/// One load phase's figures.
#[derive(Debug, Default)]
struct RunResult {
    meters: usize,
    connected: usize,
    connect_time: Duration,
    rss_connected_kib: u64,
    rss_after_kib: u64,
    window: Duration,
    totals: ClientStats,
    /// Sorted.
    latencies_us: Vec<u32>,
    errors: Vec<String>,
    server_cpu_s: f64,
    client_cpu_s: f64,
    write_bytes: Option<u64>,
    commits: f64,
    ops: f64,
    /// Publishes the counting subscriber saw in the window, and in all (mosquitto only).
    relayed_in_window: Option<u64>,
    relayed_total: Option<u64>,
}

impl RunResult {
    fn acked_per_s(&self) -> f64 {
        self.totals.acked_in_window as f64 / self.window.as_secs_f64()
    }

    fn per_1000(&self, x: f64, count: u64) -> f64 {
        if count == 0 {
            f64::NAN
        } else {
            x / count as f64 * 1000.0
        }
    }
}

/// Payment→balance latency samples from the paced run.
#[derive(Debug, Default)]
struct PaymentStats {
    /// POST sent → the probe meter received the `command/balance` with the new balance; sorted.
    to_balance_us: Vec<u32>,
    /// POST sent → HTTP answer (credit committed); sorted.
    http_us: Vec<u32>,
    failures: Vec<String>,
}

/// A meter that only receives its balance: every `command/balance` it gets, with its time.
struct Probe {
    id: String,
    seen: Arc<Mutex<Vec<(Instant, i64)>>>,
}

async fn probe_task(
    target: Target,
    id: String,
    seen: Arc<Mutex<Vec<(Instant, i64)>>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut conn = MqttStream::connect(target.broker, &id, target.login, CONNECT_LIMIT).await?;
    conn.subscribe(&format!("{TOPIC_PREFIX}/{id}/command/balance"))
        .await?;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            read = conn.read_more() => read?,
        }
        let now = Instant::now();
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::Publish(p) = packet {
                if p.qos == QoS::AtLeastOnce {
                    conn.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                }
                let balance = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    .ok()
                    .and_then(|v| v["balanceWh"].as_i64());
                if let Some(b) = balance {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((now, b));
                }
            }
        }
        conn.flush().await?;
    }
    conn.goodbye().await;
    Ok(())
}

/// Pays 1 KES every `PAYMENT_EVERY` through `POST /daraja/simulate`, round robin over the
/// probes, until `deadline`; each payment waits (bounded) for its balance to reach the probe.
async fn pay_until(api: SocketAddr, probes: &[Probe], deadline: Instant) -> PaymentStats {
    let mut stats = PaymentStats::default();
    let mut k = 0usize;
    while !probes.is_empty() && Instant::now() + PAYMENT_EVERY <= deadline && k < 1_000_000 {
        let probe = &probes[k % probes.len()];
        let sent = Instant::now();
        // References are unique across the run's gateways: a repeated one credits nothing.
        static REFERENCE: AtomicUsize = AtomicUsize::new(0);
        let reference = format!("bench-{}", REFERENCE.fetch_add(1, Ordering::Relaxed));
        let body = serde_json::json!({
            "meter_no": probe.id, "amount": 1, "reference": reference
        })
        .to_string();
        k += 1;
        let answer = http(api, "POST", "/daraja/simulate", &body).await;
        let balance = match answer {
            Ok((200, text)) => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["balance_wh"].as_i64()),
            Ok((status, text)) => {
                stats.failures.push(format!("HTTP {status}: {text}"));
                None
            }
            Err(e) => {
                stats.failures.push(format!("{e:#}"));
                None
            }
        };
        if let Some(expected) = balance {
            stats.http_us.push(micros(sent.elapsed()));
            let until = Instant::now() + PAYMENT_LIMIT;
            loop {
                let arrived = probe
                    .seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|(at, b)| *at >= sent && *b >= expected)
                    .map(|(at, _)| *at);
                if let Some(at) = arrived {
                    stats.to_balance_us.push(micros(at - sent));
                    break;
                }
                if Instant::now() > until {
                    stats.failures.push(format!(
                        "{}: no balance {expected} Wh within {PAYMENT_LIMIT:?}",
                        probe.id
                    ));
                    break;
                }
                sleep(Duration::from_millis(1)).await;
            }
        }
        sleep_until((sent + PAYMENT_EVERY).into()).await;
    }
    stats.to_balance_us.sort_unstable();
    stats.http_us.sort_unstable();
    stats
}

/// What one load phase runs beside the meters.
struct Extras<'a> {
    /// The counting subscriber's total (mosquitto runs).
    relayed: Option<Arc<AtomicU64>>,
    /// Payments to these probes during the window (paced run).
    payments: Option<&'a [Probe]>,
}

/// Connects `meters` to `target` (at most `CONNECT_CONCURRENCY` CONNECTs at once), runs a flat-out
/// or paced window, and measures it: the server's CPU, RSS and bytes written from /proc, the
/// ledger's commits from `/metrics`, every PUBACK from the meters.
async fn load_run(
    label: &str,
    target: Target,
    meters: &[String],
    sent: &Sent,
    paced: bool,
    window: Duration,
    extras: Extras<'_>,
) -> Result<(RunResult, PaymentStats)> {
    let n = meters.len();
    let progress = Arc::new(Progress::default());
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let (start_tx, start_rx) = watch::channel(None);
    let began = Instant::now();
    let tasks: Vec<_> = meters
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // Paced meters report at phases spread evenly over the interval, in a fixed
            // shuffled order.
            let phase = REPORT_INTERVAL.mul_f64(((i * 7919) % n) as f64 / n as f64);
            let spec = MeterSpec {
                id: m.clone(),
                subscribe: paced,
                phase,
                sent: (sent.clone(), i),
            };
            let task = tokio::spawn(meter_task(
                target,
                spec,
                gate.clone(),
                progress.clone(),
                start_rx.clone(),
            ));
            (m.clone(), task)
        })
        .collect();
    drop(start_rx);
    let mut next_note = began + PROGRESS_EVERY;
    loop {
        let (ok, failed) = (
            progress.connected.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
        );
        if ok + failed >= n {
            break;
        }
        if began.elapsed() > CONNECT_LIMIT {
            eprintln!("[{label}] gave up waiting: {ok}/{n} connected, {failed} failed");
            break;
        }
        if Instant::now() >= next_note {
            eprintln!("[{label}] {ok}/{n} connected ({failed} failed)");
            next_note += PROGRESS_EVERY;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let mut r = RunResult {
        meters: n,
        connected: progress.connected.load(Ordering::Relaxed),
        connect_time: began.elapsed(),
        window,
        ..RunResult::default()
    };
    eprintln!(
        "[{label}] {}/{n} connected in {:.1} s",
        r.connected,
        r.connect_time.as_secs_f64()
    );
    settle(target.api).await;
    r.rss_connected_kib = ProcSample::of(target.pid).rss_kib;

    let ledger_before = match target.api {
        Some(api) => ledger_counters(api).await,
        None => (0.0, 0.0),
    };
    let relayed_before = extras.relayed.as_ref().map(|c| c.load(Ordering::Relaxed));
    let server_before = ProcSample::of(target.pid);
    let client_before = ProcSample::of(std::process::id());
    let t0 = Instant::now();
    let deadline = t0 + window;
    let mut payments = PaymentStats::default();
    if r.connected > 0 {
        start_tx.send_replace(Some(if paced {
            Plan::Paced {
                first: t0,
                deadline,
            }
        } else {
            Plan::FlatOut { deadline }
        }));
        match (extras.payments, target.api) {
            (Some(probes), Some(api)) => payments = pay_until(api, probes, deadline).await,
            _ => {
                let mut last = (t0, 0u64);
                while Instant::now() + PROGRESS_EVERY < deadline {
                    sleep(PROGRESS_EVERY).await;
                    let (now, acked) = (Instant::now(), progress.acked.load(Ordering::Relaxed));
                    eprintln!(
                        "[{label}] {:.0} s: {:.0} PUBACKs/s",
                        (now - t0).as_secs_f64(),
                        (acked - last.1) as f64 / (now - last.0).as_secs_f64()
                    );
                    last = (now, acked);
                }
            }
        }
        sleep_until(deadline.into()).await;
    }
    let server_after = ProcSample::of(target.pid);
    let client_after = ProcSample::of(std::process::id());
    let relayed_after = extras.relayed.as_ref().map(|c| c.load(Ordering::Relaxed));
    let ledger_after = match target.api {
        Some(api) => ledger_counters(api).await,
        None => (0.0, 0.0),
    };
    r.rss_after_kib = server_after.rss_kib;
    r.server_cpu_s = server_after.ticks.saturating_sub(server_before.ticks) as f64 / USER_HZ;
    r.client_cpu_s = client_after.ticks.saturating_sub(client_before.ticks) as f64 / USER_HZ;
    r.write_bytes = server_after
        .write_bytes
        .zip(server_before.write_bytes)
        .map(|(a, b)| a.saturating_sub(b));
    r.commits = ledger_after.0 - ledger_before.0;
    r.ops = ledger_after.1 - ledger_before.1;
    r.relayed_in_window = relayed_after.zip(relayed_before).map(|(a, b)| a - b);
    drop(start_tx);

    for (meter, task) in tasks {
        match timeout(DRAIN_LIMIT + Duration::from_secs(20), task).await {
            Ok(Ok(Ok(s))) => r.totals.add(&s),
            Ok(Ok(Err(e))) => r.errors.push(format!("{meter}: {e:#}")),
            Ok(Err(e)) => r.errors.push(format!("{meter}: task failed: {e}")),
            Err(_) => r.errors.push(format!("{meter}: did not finish in time")),
        }
    }
    r.latencies_us = std::mem::take(&mut r.totals.latencies_us);
    r.latencies_us.sort_unstable();
    if let (Some(count), Some(before)) = (&extras.relayed, relayed_before) {
        // Let the subscriber catch up with what was acknowledged before reading its total.
        let until = Instant::now() + Duration::from_secs(5);
        let mut last = count.load(Ordering::Relaxed);
        while Instant::now() < until {
            sleep(Duration::from_millis(200)).await;
            let now = count.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        r.relayed_total = Some(last - before);
    }
    settle(target.api).await;
    eprintln!(
        "[{label}] {:.0} PUBACKs/s in the window, {} errors",
        r.acked_per_s(),
        r.errors.len()
    );
    if r.connected == 0 {
        let first = r.errors.first().map_or("no error recorded", String::as_str);
        bail!("[{label}] no meter could connect (first error: {first})");
    }
    Ok((r, payments))
}

fn sent_counters(meters: usize) -> Sent {
    Arc::new((0..meters).map(|_| AtomicU32::new(0)).collect())
}

// ---- the gateway ----

struct GatewayRuns {
    startup: Duration,
    idle_rss_kib: u64,
    runs: Vec<RunResult>,
    paced: RunResult,
    payments: PaymentStats,
    /// The main runs' `[ledger] commit_delay`: the gateway's default.
    commit_delay: Duration,
    /// Paced runs (reports only) on the gateway restarted with `[ledger] commit_delay` = the
    /// ms given.
    delayed: Vec<(u64, RunResult)>,
    log_warnings: usize,
    log_errors: usize,
    log_first: Vec<String>,
}

/// Starts the release gateway on `gw` and waits until it is ready.
async fn start_gateway(gw: &GatewayFiles) -> Result<(Guarded, Duration)> {
    let log = std::fs::File::create(&gw.log_path).context("creating the gateway log")?;
    let started = Instant::now();
    let mut child = Guarded::spawn(
        "gateway",
        Command::new(GATEWAY_BIN)
            .args(["run", "--config"])
            .arg(&gw.config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    wait_listening(gw.api, &mut child).await?;
    let until = Instant::now() + START_LIMIT;
    while !matches!(http(gw.api, "GET", "/ready", "").await, Ok((200, _))) {
        if Instant::now() > until {
            bail!("the gateway is not ready after {START_LIMIT:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok((child, started.elapsed()))
}

/// The paced load with payments to the probe meters (which listen throughout).
async fn paced_with_payments(
    opts: &Options,
    label: &str,
    target: Target,
    meters: &[String],
    probes: &[String],
    sent: &Sent,
) -> Result<(RunResult, PaymentStats)> {
    let (stop_probes, stop_rx) = watch::channel(false);
    let probes: Vec<Probe> = probes
        .iter()
        .map(|id| Probe {
            id: id.clone(),
            seen: Arc::default(),
        })
        .collect();
    let probe_tasks: Vec<_> = probes
        .iter()
        .map(|p| {
            tokio::spawn(probe_task(
                target,
                p.id.clone(),
                p.seen.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let with_payments = Extras {
        relayed: None,
        payments: Some(&probes),
    };
    let paced_run = load_run(
        label,
        target,
        &meters[..opts.paced_meters],
        sent,
        true,
        Duration::from_secs_f64(opts.paced_seconds),
        with_payments,
    )
    .await;
    stop_probes.send_replace(true);
    for t in probe_tasks {
        match timeout(Duration::from_secs(10), t).await {
            Ok(Ok(Ok(()))) => {}
            other => eprintln!("[{label}] a probe meter failed: {other:?}"),
        }
    }
    paced_run
}

async fn gateway_runs(
    opts: &Options,
    gw: &GatewayFiles,
    meters: &[String],
    probes: &[String],
) -> Result<GatewayRuns> {
    let (mut child, startup) = start_gateway(gw).await?;
    sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = ProcSample::of(child.pid()).rss_kib;
    eprintln!(
        "[gateway] pid {} ready in {:.0} ms, idle RSS {idle_rss_kib} KiB",
        child.pid(),
        startup.as_secs_f64() * 1000.0
    );
    let target = Target {
        broker: gw.broker,
        pid: child.pid(),
        login: true,
        api: Some(gw.api),
    };
    let sent = sent_counters(meters.len());
    let mut runs = Vec::new();
    for &n in &opts.sizes {
        let none = Extras {
            relayed: None,
            payments: None,
        };
        let (r, _) = load_run(
            &format!("gateway {n}"),
            target,
            &meters[..n],
            &sent,
            false,
            opts.window(),
            none,
        )
        .await?;
        runs.push(r);
    }

    let (paced, payments) =
        paced_with_payments(opts, "gateway paced", target, meters, probes, &sent).await?;
    if let Ok((_, text)) = http(gw.api, "GET", "/metrics", "").await {
        let counters: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        eprintln!("[gateway] counters at the end:\n{}", counters.join("\n"));
    }
    child.stop();
    let mut logs = vec![std::fs::read_to_string(&gw.log_path).unwrap_or_default()];

    // The same paced load on the same database, the gateway restarted with a commit delay.
    let dir = gw.config_path.parent().unwrap_or(Path::new("."));
    let mut delayed = Vec::new();
    for &ms in &opts.commit_delays {
        let files = GatewayFiles::write(dir, meters.len() + probes.len(), Some(ms))?;
        let (mut child, _) = start_gateway(&files).await?;
        let target = Target {
            broker: files.broker,
            pid: child.pid(),
            login: true,
            api: Some(files.api),
        };
        // Reports only: what a report costs, without the (frequent, for latency samples)
        // payments of the main paced run.
        let label = format!("gateway paced, commit_delay {ms} ms");
        let none = Extras {
            relayed: None,
            payments: None,
        };
        let (run, _) = load_run(
            &label,
            target,
            &meters[..opts.paced_meters],
            &sent,
            true,
            Duration::from_secs_f64(opts.paced_seconds),
            none,
        )
        .await?;
        child.stop();
        logs.push(std::fs::read_to_string(&files.log_path).unwrap_or_default());
        delayed.push((ms, run));
    }

    let text = logs.concat();
    let lines: Vec<&str> = text.lines().collect();
    let count = |level: &str| lines.iter().filter(|l| l.contains(level)).count();
    Ok(GatewayRuns {
        startup,
        idle_rss_kib,
        runs,
        paced,
        payments,
        commit_delay: gw.config.ledger.commit_delay,
        delayed,
        log_warnings: count(" WARN "),
        log_errors: count(" ERROR "),
        log_first: lines.iter().take(5).map(|l| l.to_string()).collect(),
    })
}

// ---- the mosquitto baseline ----

struct MosquittoRuns {
    version: String,
    idle_rss_kib: u64,
    runs: Vec<RunResult>,
}

/// Whether mosquitto can be run; in a measurement its absence is an error.
fn mosquitto_available(opts: &Options) -> Result<bool> {
    if Path::new(MOSQUITTO).exists() {
        return Ok(true);
    }
    if opts.measuring {
        bail!("{MOSQUITTO} not found: the baseline needs it (apt-get install -y mosquitto)");
    }
    eprintln!("[mosquitto] not installed: baseline skipped in the smoke run");
    Ok(false)
}

async fn mosquitto_runs(opts: &Options, dir: &Path, meters: &[String]) -> Result<MosquittoRuns> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    // No auth, nothing stored; no limit on messages in flight or queued towards the one
    // subscriber, so nothing is dropped for being slow.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_connections -1\nmax_inflight_messages 0\nmax_queued_messages 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )?;
    let version = Command::new(MOSQUITTO)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mosquitto".into());
    let log = std::fs::File::create(dir.join("mosquitto.log"))?;
    let mut child = Guarded::spawn(
        "mosquitto",
        Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let addr = loopback(port);
    wait_listening(addr, &mut child).await?;
    sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = ProcSample::of(child.pid()).rss_kib;
    let target = Target {
        broker: addr,
        pid: child.pid(),
        login: false,
        api: None,
    };
    let count = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscriber = {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(counting_subscriber(addr, count.clone(), ready_tx, stop_rx));
        timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("the counting subscriber did not subscribe")??;
        task
    };
    let sent = sent_counters(meters.len());
    let mut runs = Vec::new();
    let mut failure = None;
    for &n in &opts.sizes {
        let relay = Extras {
            relayed: Some(count.clone()),
            payments: None,
        };
        match load_run(
            &format!("mosquitto {n}"),
            target,
            &meters[..n],
            &sent,
            false,
            opts.window(),
            relay,
        )
        .await
        {
            Ok((r, _)) => runs.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    stop_tx.send_replace(true);
    match timeout(Duration::from_secs(10), subscriber).await {
        Ok(Ok(Ok(()))) => {}
        other => eprintln!("[mosquitto] the counting subscriber failed: {other:?}"),
    }
    child.stop();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(MosquittoRuns {
        version,
        idle_rss_kib,
        runs,
    })
}

/// Subscribes to every meter's reports at QoS 1 and counts them; acknowledges each at once.
async fn counting_subscriber(
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    ready: tokio::sync::oneshot::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut conn = MqttStream::connect(addr, "bench-counter", false, CONNECT_LIMIT).await?;
    conn.subscribe(&format!("{TOPIC_PREFIX}/+/consumption"))
        .await?;
    conn.reserve_read(256 * 1024);
    let _ = ready.send(());
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            read = conn.read_more() => read?,
        }
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::Publish(p) = packet {
                count.fetch_add(1, Ordering::Relaxed);
                if p.qos == QoS::AtLeastOnce {
                    conn.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                }
            }
        }
        conn.flush().await?;
    }
    conn.goodbye().await;
    Ok(())
}

// ---- the SQLite baseline ----

// ---- the report ----

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn render(
    opts: &Options,
    fd_limit: u64,
    gw: &GatewayRuns,
    mq: Option<&MosquittoRuns>,
    b: &Baselines,
) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "\n## umeme-gateway comparison suite\n");
    if !opts.measuring {
        let _ = writeln!(w, "**Smoke run (no `--bench`): not a measurement.**\n");
    }
    let _ = writeln!(w, "| | |\n|---|---|");
    let _ = writeln!(w, "| date | {} |", utc_now());
    let _ = writeln!(w, "| command | `{}` |", opts.command());
    let _ = writeln!(w, "| machine | {} |", machine());
    let _ = writeln!(
        w,
        "| gateway | release binary as a child process, `RUST_LOG=warn`; ready {:.0} ms after exec |",
        gw.startup.as_secs_f64() * 1000.0
    );
    if let Some(m) = mq {
        let _ = writeln!(
            w,
            "| baseline broker | {} (no auth, persistence off) |",
            m.version
        );
    }
    let _ = writeln!(
        w,
        "| load | meters are tasks in the bench process, one TCP connection each, QoS 1; flat out: {WINDOW} unacknowledged per meter, {:.0} s window; open-file limit {fd_limit} |",
        opts.seconds
    );

    let _ = writeln!(w, "\n### Ingest, flat out\n");
    let _ = writeln!(
        w,
        "| meters | gateway committed reports/s | mosquitto relayed/s (subscriber) | mosquitto PUBACKs/s | gateway ÷ mosquitto relay | gateway CPU s / 1000 reports | mosquitto CPU s / 1000 relayed | load generator CPU, gateway / mosquitto run | gateway fsyncs/s (ledger commits) | ops per commit | disk bytes per report | gateway publish→PUBACK p50 / p99 |"
    );
    let _ = writeln!(
        w,
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
    );
    for (i, g) in gw.runs.iter().enumerate() {
        let m = mq.and_then(|m| m.runs.get(i));
        let secs = g.window.as_secs_f64();
        let relay = m.and_then(|m| m.relayed_in_window).map(|x| x as f64 / secs);
        let acked = g.totals.acked_in_window;
        let _ = writeln!(
            w,
            "| {} | {:.0} | {} | {} | {} | {:.3} | {} | {:.0} % / {} | {:.0} | {:.0} | {} | {} / {} |",
            g.meters,
            g.acked_per_s(),
            relay.map_or("n/a".into(), |r| format!("{r:.0}")),
            m.map_or("n/a".into(), |m| format!("{:.0}", m.acked_per_s())),
            relay.map_or("n/a".into(), |r| format!("{:.2}", g.acked_per_s() / r)),
            g.per_1000(g.server_cpu_s, acked),
            m.map_or("n/a".into(), |m| format!(
                "{:.3}",
                m.per_1000(m.server_cpu_s, m.relayed_in_window.unwrap_or(0))
            )),
            g.client_cpu_s / secs * 100.0,
            m.map_or("n/a".into(), |m| format!(
                "{:.0} %",
                m.client_cpu_s / m.window.as_secs_f64() * 100.0
            )),
            g.commits / secs,
            g.ops / g.commits,
            g.write_bytes.map_or("n/a".into(), |x| format!(
                "{:.0}",
                x as f64 / acked.max(1) as f64
            )),
            ms(percentile(&g.latencies_us, 50.0)),
            ms(percentile(&g.latencies_us, 99.0)),
        );
    }

    let p = &gw.paced;
    let psecs = p.window.as_secs_f64();
    let _ = writeln!(
        w,
        "\n### Latency at a paced load: {} meters, one report each every {} s (real time, phases spread over the interval), subscribed to their `command/balance`; {:.0} s window\n",
        p.meters,
        REPORT_INTERVAL.as_secs(),
        psecs
    );
    let _ = writeln!(w, "| metric | value |\n|---|---:|");
    let _ = writeln!(
        w,
        "| reports acknowledged / sent | {} / {} ({:.0} reports/s) |",
        p.totals.acked_in_window + p.totals.acked_after,
        p.totals.sent,
        p.totals.sent as f64 / psecs
    );
    let _ = writeln!(
        w,
        "| publish→PUBACK p50 / p99 / max | {} / {} / {} |",
        ms(percentile(&p.latencies_us, 50.0)),
        ms(percentile(&p.latencies_us, 99.0)),
        ms(p.latencies_us.last().copied())
    );
    let pay = &gw.payments;
    let _ = writeln!(
        w,
        "| payment (`POST /daraja/simulate`) → meter has its `command/balance`, p50 / p99 / max of {} | {} / {} / {} |",
        pay.to_balance_us.len(),
        ms(percentile(&pay.to_balance_us, 50.0)),
        ms(percentile(&pay.to_balance_us, 99.0)),
        ms(pay.to_balance_us.last().copied())
    );
    let _ = writeln!(
        w,
        "| payment → HTTP answer (credit committed), p50 / p99 | {} / {} |",
        ms(percentile(&pay.http_us, 50.0)),
        ms(percentile(&pay.http_us, 99.0))
    );
    let _ = writeln!(
        w,
        "| balance commands received by the reporting meters | {} |",
        p.totals.received
    );
    let _ = writeln!(
        w,
        "| gateway fsyncs/s (ledger commits), ops per commit | {:.1}, {:.1} |",
        p.commits / psecs,
        p.ops / p.commits
    );
    let _ = writeln!(
        w,
        "| disk bytes written per report (payments included) | {} |",
        p.write_bytes.map_or("n/a".into(), |x| format!(
            "{:.0}",
            x as f64 / p.totals.sent.max(1) as f64
        ))
    );
    let _ = writeln!(
        w,
        "| gateway CPU | {:.1} % of one core, {:.3} s per 1000 reports |",
        p.server_cpu_s / psecs * 100.0,
        p.server_cpu_s / p.totals.sent.max(1) as f64 * 1000.0
    );

    if !gw.delayed.is_empty() {
        let _ = writeln!(
            w,
            "\n### SD-card wear against latency: the same paced load with `[ledger] commit_delay`\n\n\
             The first row is the run above (with its payments); the others restart the gateway \
             on the same database with the delay shown and send the same reports, without \
             payments: what a report costs.\n"
        );
        let _ = writeln!(
            w,
            "| commit_delay | fsyncs/s | reports per fsync | disk bytes per report | publish→PUBACK p50 / p99 / max | reports acknowledged / sent |"
        );
        let _ = writeln!(w, "|---:|---:|---:|---:|---|---:|");
        let default = format!(
            "{} ms (default), with payments",
            gw.commit_delay.as_millis()
        );
        let runs = std::iter::once((default, p)).chain(
            gw.delayed
                .iter()
                .map(|(delay, r)| (format!("{delay} ms"), r)),
        );
        for (delay, r) in runs {
            let secs = r.window.as_secs_f64();
            let _ = writeln!(
                w,
                "| {delay} | {:.1} | {:.1} | {} | {} / {} / {} | {} / {} |",
                r.commits / secs,
                r.totals.sent as f64 / r.commits.max(1.0),
                r.write_bytes.map_or("n/a".into(), |x| format!(
                    "{:.0}",
                    x as f64 / r.totals.sent.max(1) as f64
                )),
                ms(percentile(&r.latencies_us, 50.0)),
                ms(percentile(&r.latencies_us, 99.0)),
                ms(r.latencies_us.last().copied()),
                r.totals.acked_in_window + r.totals.acked_after,
                r.totals.sent,
            );
        }
    }

    let _ = writeln!(
        w,
        "\n### Memory: resident set of the server process (VmRSS), meters connected and idle before their load window\n"
    );
    let _ = writeln!(
        w,
        "| meters | gateway RSS | gateway per meter over idle | gateway RSS after the window | mosquitto RSS | mosquitto per meter over idle |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|");
    let mq_idle = mq.map(|m| m.idle_rss_kib);
    let _ = writeln!(
        w,
        "| 0 (idle) | {} | | | {} | |",
        mib(gw.idle_rss_kib),
        mq_idle.map_or("n/a".into(), mib)
    );
    let per = |rss: u64, idle: u64, n: usize| {
        format!("{:.1} KiB", (rss as f64 - idle as f64) / n.max(1) as f64)
    };
    for (i, g) in gw.runs.iter().enumerate() {
        let m = mq.and_then(|m| m.runs.get(i));
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            g.connected,
            mib(g.rss_connected_kib),
            per(g.rss_connected_kib, gw.idle_rss_kib, g.connected),
            mib(g.rss_after_kib),
            m.map_or("n/a".into(), |m| mib(m.rss_connected_kib)),
            m.zip(mq_idle).map_or("n/a".into(), |(m, idle)| per(
                m.rss_connected_kib,
                idle,
                m.connected
            )),
        );
    }
    if let [.., a, z] = gw.runs.as_slice() {
        let _ = writeln!(
            w,
            "\nMarginal gateway RSS per meter from {} to {} connected: {}.",
            a.connected,
            z.connected,
            per(
                z.rss_connected_kib,
                a.rss_connected_kib,
                z.connected.saturating_sub(a.connected)
            )
        );
    }

    let _ = writeln!(
        w,
        "\n### Baseline: plain SQLite insert loop, WAL, synchronous=FULL, same file system\n"
    );
    b.write_table(w, "the gateway and mosquitto runs");
    let _ = writeln!(w, "\n| gateway committed reports/s ÷ | 1-row loop (before / after) | {BASELINE_BATCH}-row loop |\n|---:|---:|---:|");
    for g in &gw.runs {
        let r = g.acked_per_s();
        let _ = writeln!(
            w,
            "| {} meters | {:.2} / {:.2} | {:.3} |",
            g.meters,
            r / b.single_before.rows_per_s(),
            r / b.single_after.rows_per_s(),
            r / b.batch.rows_per_s()
        );
    }

    let _ = writeln!(w, "\n### Health\n\n| check | value |\n|---|---|");
    let runs = gw
        .runs
        .iter()
        .map(|r| ("gateway", r))
        .chain(std::iter::once(("gateway paced", &gw.paced)))
        .chain(
            gw.delayed
                .iter()
                .map(|(_, r)| ("gateway paced with commit_delay", r)),
        )
        .chain(
            mq.into_iter()
                .flat_map(|m| m.runs.iter().map(|r| ("mosquitto", r))),
        );
    for (name, r) in runs {
        let t = &r.totals;
        let _ = writeln!(
            w,
            "| {name} {} meters: connected in / errors / sent / acked (window + after) / never acked / out of order / other packets{} | {:.1} s / {} / {} / {} + {} / {} / {} / {}{} |",
            r.meters,
            if r.relayed_total.is_some() { " / relayed in all" } else { "" },
            r.connect_time.as_secs_f64(),
            r.errors.len(),
            t.sent,
            t.acked_in_window,
            t.acked_after,
            t.unacked,
            t.out_of_order,
            t.other_packets,
            r.relayed_total.map_or(String::new(), |x| format!(" / {x}")),
        );
        for e in r.errors.iter().take(3) {
            let _ = writeln!(w, "| ↳ | {} |", e.replace('|', "\\|"));
        }
    }
    for f in gw.payments.failures.iter().take(3) {
        let _ = writeln!(w, "| payment failure | {} |", f.replace('|', "\\|"));
    }
    let _ = writeln!(
        w,
        "| gateway log warnings / errors | {} / {} |",
        gw.log_warnings, gw.log_errors
    );
    for l in &gw.log_first {
        let _ = writeln!(w, "| ↳ | `{}` |", l.replace('|', "\\|"));
    }
    out
}
