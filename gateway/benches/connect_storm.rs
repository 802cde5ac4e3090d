//! A real meter's first CONNECT during a wrong-password storm (issue 14 item 3).
//!
//! Starts the release gateway binary as a child process on a fresh database with `REAL` real
//! meters, then measures each real meter's first CONNECT (TCP connect → CONNACK 0; the first
//! one after a start always costs an argon2 check) from 127.0.0.1:
//! - baseline: no storm;
//! - storm from one address: `STORM` parallel clients on 127.0.0.2 sending CONNECTs with wrong
//!   passwords for unknown meter numbers (no per-meter backoff helps), each reconnecting at once
//!   after its refusal, for the whole phase;
//! - storm from many addresses: the same number of clients spread over `ADDRS` addresses
//!   (127.0.1.x), the case the per-IP limits help least.
//!
//! Every phase is bounded in time and every client in attempts. Figures go to stdout as a
//! markdown table (docs/benchmarks.md, "Connect storm"). Without `--bench` (`cargo test
//! --benches`) it does a 10-client smoke run that is not a measurement.
//!
//!     cargo bench -p umeme-gateway --bench connect_storm
//!     # UMEME_STORM_CLIENTS (300), UMEME_STORM_ADDRS (50), UMEME_STORM_REAL (10 per phase)

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_umeme-gateway");
const SECRET: &str = "storm-bench-secret-1";
/// Upper bound on one client's attempts in a phase, whatever the gateway does.
const MAX_ATTEMPTS_PER_CLIENT: u64 = 100_000;
/// Storm running before the real meters start connecting, and the bound on the whole phase.
const WARM_UP: Duration = Duration::from_secs(2);
const PHASE_LIMIT: Duration = Duration::from_secs(120);
const CONNACK_WITHIN: Duration = Duration::from_secs(30);

fn env_or(name: &str, default: usize, max: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => {
            let n: usize = v.parse().with_context(|| format!("{name}={v:?}"))?;
            if n == 0 || n > max {
                bail!("{name}={n}: expected 1 to {max}");
            }
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

/// PubSubClient's CONNECT (MQTT 3.1.1, clean session, keep-alive 60) with a login.
fn connect_packet(meter: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60];
    for s in [meter, meter, password] {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    }
    assert!(body.len() < 128);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// One CONNECT from `source`: the CONNACK's return code, or `None` when closed without one.
async fn attempt(source: Ipv4Addr, broker: SocketAddr, packet: &[u8]) -> Result<Option<u8>> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((source, 0)))?;
    let mut stream = s.connect(broker).await?;
    stream.write_all(packet).await?;
    let mut ack = [0u8; 4];
    match tokio::time::timeout(CONNACK_WITHIN, stream.read_exact(&mut ack)).await {
        Ok(Ok(_)) if ack[0] == 0x20 => Ok(Some(ack[3])),
        Ok(Ok(_)) => bail!("not a CONNACK: {ack:?}"),
        Ok(Err(_)) => Ok(None),
        Err(_) => bail!("no answer within {CONNACK_WITHIN:?}"),
    }
}

struct Gateway {
    child: Child,
    broker: SocketAddr,
    api: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(dir: &std::path::Path, real: usize) -> Result<Gateway> {
    let broker = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"storm\"\ndata_dir = {:?}\n[broker]\nlisten = \"{broker}\"\n\
             [api]\nlisten = \"{api}\"\n",
            dir.join("data").display().to_string()
        ),
    )?;
    for i in 0..real {
        let out = Command::new(GATEWAY_BIN)
            .args(["meter", "add", &format!("REAL{i:03}"), "--secret", SECRET])
            .arg("--config")
            .arg(&config)
            .output()?;
        if !out.status.success() {
            bail!("meter add: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let mut child = Command::new(GATEWAY_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the gateway")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(tx);
        // Keep draining so the child never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("umeme-gateway ready") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let gw = Gateway { child, broker, api };
    rx.recv_timeout(Duration::from_secs(30))
        .context("gateway not ready within 30 s")?;
    Ok(gw)
}

fn metric(api: SocketAddr, series: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(api) else {
        return f64::NAN;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[derive(Default)]
struct Storm {
    attempts: AtomicU64,
    refused_4: AtomicU64,
    refused_3: AtomicU64,
    closed: AtomicU64,
    errors: AtomicU64,
}

struct Phase {
    name: String,
    latencies_ms: Vec<f64>,
    storm_attempts: u64,
    storm_refused_4: u64,
    storm_refused_3: u64,
    storm_closed: u64,
    password_checks: f64,
    seconds: f64,
}

async fn phase(
    gw: &Gateway,
    name: &str,
    real: std::ops::Range<usize>,
    clients: usize,
    sources: Vec<Ipv4Addr>,
) -> Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let storm = Arc::new(Storm::default());
    let checks_before = metric(
        gw.api,
        r#"umeme_mqtt_connect_refused_total{reason="bad_credentials"}"#,
    );
    let began = Instant::now();
    let mut tasks = Vec::new();
    if !sources.is_empty() {
        for i in 0..clients {
            let (stop, storm, broker) = (stop.clone(), storm.clone(), gw.broker);
            let source = sources[i % sources.len()];
            let packet = connect_packet(&format!("STORM{i:04}"), "wrong-password-x");
            tasks.push(tokio::spawn(async move {
                for _ in 0..MAX_ATTEMPTS_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    storm.attempts.fetch_add(1, Ordering::Relaxed);
                    match attempt(source, broker, &packet).await {
                        Ok(Some(4)) => storm.refused_4.fetch_add(1, Ordering::Relaxed),
                        Ok(Some(3)) => storm.refused_3.fetch_add(1, Ordering::Relaxed),
                        Ok(None) => storm.closed.fetch_add(1, Ordering::Relaxed),
                        _ => storm.errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        tokio::time::sleep(WARM_UP).await;
    }
    let mut latencies_ms = Vec::new();
    for i in real {
        if began.elapsed() > PHASE_LIMIT {
            bail!("{name}: phase over {PHASE_LIMIT:?}");
        }
        let meter = format!("REAL{i:03}");
        let t = Instant::now();
        let code = attempt(
            Ipv4Addr::LOCALHOST,
            gw.broker,
            &connect_packet(&meter, SECRET),
        )
        .await?;
        if code != Some(0) {
            bail!("{name}: {meter} got {code:?}");
        }
        latencies_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let seconds = began.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(CONNACK_WITHIN * 2, t).await;
    }
    let checks_after = metric(
        gw.api,
        r#"umeme_mqtt_connect_refused_total{reason="bad_credentials"}"#,
    );
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Phase {
        name: name.to_string(),
        latencies_ms,
        storm_attempts: storm.attempts.load(Ordering::Relaxed),
        storm_refused_4: storm.refused_4.load(Ordering::Relaxed),
        storm_refused_3: storm.refused_3.load(Ordering::Relaxed),
        storm_closed: storm.closed.load(Ordering::Relaxed),
        password_checks: checks_after - checks_before,
        seconds,
    })
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: a smoke run then.
    let full = std::env::args().any(|a| a == "--bench");
    let (c, a, r) = if full { (300, 50, 10) } else { (10, 2, 2) };
    let clients = env_or("UMEME_STORM_CLIENTS", c, 5_000)?;
    let addrs = env_or("UMEME_STORM_ADDRS", a, 250)?;
    let real = env_or("UMEME_STORM_REAL", r, 200)?;
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let gw = start(dir.path(), real * 3)?;
    let many: Vec<Ipv4Addr> = (0..addrs)
        .map(|i| Ipv4Addr::new(127, 0, 1, 1 + i as u8))
        .collect();
    let phases = rt.block_on(async {
        Ok::<_, anyhow::Error>(vec![
            phase(&gw, "no storm (baseline)", 0..real, 0, vec![]).await?,
            phase(
                &gw,
                &format!("{clients} wrong-password clients on 1 address"),
                real..2 * real,
                clients,
                vec![Ipv4Addr::new(127, 0, 0, 2)],
            )
            .await?,
            phase(
                &gw,
                &format!("{clients} wrong-password clients on {addrs} addresses"),
                2 * real..3 * real,
                clients,
                many,
            )
            .await?,
        ])
    })?;
    println!(
        "| phase | real meter first CONNECT: median | max | storm CONNECTs sent | CONNACK 4 (argon2 ran) | CONNACK 3 (backoff, no argon2) | closed (per-IP cap) | password checks/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in &phases {
        let median = p.latencies_ms[p.latencies_ms.len() / 2];
        let max = p.latencies_ms.last().copied().unwrap_or(f64::NAN);
        println!(
            "| {} | {median:.1} ms | {max:.1} ms | {} | {} | {} | {} | {:.0} |",
            p.name,
            p.storm_attempts,
            p.storm_refused_4,
            p.storm_refused_3,
            p.storm_closed,
            p.password_checks / p.seconds,
        );
    }
    Ok(())
}
