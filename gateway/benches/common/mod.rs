//! What the `ingest` and `suite` benches share: the plain SQLite baseline, percentiles, the
//! machine's description and the small parsing and formatting helpers.

// Each bench uses its own subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use rusqlite::params;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};
use umeme_gateway::auth;
use umeme_gateway::config::Config;
use umeme_gateway::ledger::Rules;
use umeme_gateway::meter::MeterId;
use umeme_gateway::store;
use umeme_gateway::writer::{apply_now, Credit, LedgerSettings, Op};

/// Every bench meter has its own row but the same secret, so argon2 hashes it only once.
pub const SECRET: &str = "bench-meter-secret";
/// Largest MQTT packet either side of a bench connection sends.
pub const MAX_PACKET: usize = 64 * 1024;
/// `[broker]` keys lifting the per-meter report rate (default 60 a minute, burst 120): the
/// benches push each meter's reports flat out to measure the ledger, not the meter's limit.
pub const UNLIMITED_REPORTS: &str = "reports_per_minute = 6000000\nreport_burst = 1000000\n";
/// Keep-alive of bench meters: longer than any run, so no PINGREQ is needed.
const KEEP_ALIVE_S: u16 = 300;
/// Credit per meter: far more than a run uses, so no relay ever opens.
const CREDIT_CENTS: i64 = 1_000_000;

/// Rows per transaction of the group-commit baseline.
pub const BASELINE_BATCH: usize = 500;
/// A bound on the baseline loop whatever the disk does.
const MAX_BASELINE_TXS: u64 = 1_000_000;
/// Energy added by each of the baseline's fake reports.
const WH_PER_ROW: u64 = 3;

/// `v` parsed and within `lo..=hi`.
pub fn in_range<T>(v: &str, lo: T, hi: T) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    T::Err: std::fmt::Display,
{
    let x: T = v.parse().map_err(|e| anyhow!("{v:?}: {e}"))?;
    if x < lo || x > hi {
        bail!("{x} is out of range: expected {lo} to {hi}");
    }
    Ok(x)
}

/// The `p`th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Microseconds as `"12.3 ms"`, or `"n/a"`.
pub fn ms(us: Option<u32>) -> String {
    us.map_or("n/a".into(), |us| {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    })
}

pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Bytes this process caused to be written to storage (`write_bytes` of `/proc/self/io`).
pub fn own_write_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/io")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU model, cores, memory, kernel and load average.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("?".into(), |kib| format!("{:.1}", kib / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string());
    let load = std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    format!("{cpu}, nproc {nproc}, {mem_gib} GiB RAM, Linux {kernel}, load average {load}")
}

/// `2026-11-27 12:00:00 UTC`.
pub fn utc_now() -> String {
    let iso = umeme_gateway::api::iso8601(umeme_gateway::store::now_ms());
    format!("{} {} UTC", &iso[..10], &iso[11..19])
}

/// One run of the plain SQLite insert loop.
pub struct Baseline {
    /// When it ran, relative to the gateway's load (`before`, `after`).
    pub when: &'static str,
    pub rows_per_tx: usize,
    pub rows: u64,
    pub txs: u64,
    pub elapsed: Duration,
    pub write_bytes: Option<u64>,
    /// BEGIN to COMMIT of each transaction, µs; sorted.
    pub tx_us: Vec<u32>,
}

impl Baseline {
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }

    pub fn txs_per_s(&self) -> f64 {
        self.txs as f64 / self.elapsed.as_secs_f64()
    }
}

/// The baseline loops of one bench run: one row per transaction before and after the load,
/// and `BASELINE_BATCH` rows per transaction after it.
pub struct Baselines {
    pub single_before: Baseline,
    pub single_after: Baseline,
    pub batch: Baseline,
}

impl Baselines {
    /// Runs the loops that follow the load.
    pub fn finish(
        dir: &Path,
        meters: &[String],
        single_before: Baseline,
        duration: Duration,
    ) -> Result<Baselines> {
        Ok(Baselines {
            single_before,
            single_after: sqlite_baseline(dir, "after", meters, 1, duration)?,
            batch: sqlite_baseline(dir, "after", meters, BASELINE_BATCH, duration)?,
        })
    }

    /// The loops as a markdown table; `what` names the load they ran before or after.
    pub fn write_table(&self, w: &mut String, what: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(
            w,
            "| loop | rows/s | commits (fsyncs)/s | disk bytes per row | commit p50 | commit p99 |"
        );
        let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|");
        for b in [&self.single_before, &self.single_after, &self.batch] {
            let _ = writeln!(
                w,
                "| {} row(s) per transaction, {} {what}: {} rows | {:.0} | {:.0} | {} | {} | {} |",
                b.rows_per_tx,
                b.when,
                b.rows,
                b.rows_per_s(),
                b.txs_per_s(),
                b.write_bytes.map_or("n/a".into(), |x| format!(
                    "{:.0}",
                    x as f64 / b.rows.max(1) as f64
                )),
                ms(percentile(&b.tx_us, 50.0)),
                ms(percentile(&b.tx_us, 99.0)),
            );
        }
    }
}

/// Inserts report-like rows for `duration`, `rows_per_tx` per transaction, into a fresh database
/// in `dir` with the gateway's durability settings (WAL, `synchronous = FULL`): the ceiling for
/// storing reports on this disk.
pub fn sqlite_baseline(
    dir: &Path,
    when: &'static str,
    meters: &[String],
    rows_per_tx: usize,
    duration: Duration,
) -> Result<Baseline> {
    eprintln!(
        "[baseline] SQLite {when}, {rows_per_tx} row(s) per transaction, {:.1} s",
        duration.as_secs_f64()
    );
    let path = dir.join(format!("baseline-{rows_per_tx}-{when}.db"));
    let mut conn =
        rusqlite::Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE readings (id INTEGER PRIMARY KEY, meter TEXT NOT NULL, seq INTEGER NOT NULL,
         energy INTEGER NOT NULL, payload TEXT NOT NULL) STRICT;",
    )?;
    let io_before = own_write_bytes();
    let started = Instant::now();
    let (mut rows, mut txs, mut tx_us) = (0u64, 0u64, Vec::new());
    while started.elapsed() < duration && txs < MAX_BASELINE_TXS {
        let t0 = Instant::now();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO readings (meter, seq, energy, payload) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for _ in 0..rows_per_tx {
                let meter = &meters[rows as usize % meters.len()];
                let seq = rows / meters.len() as u64 + 1;
                let energy = 10_000 + seq * WH_PER_ROW;
                let payload = format!(
                    r#"{{"v":2,"meterNo":"{meter}","seq":{seq},"energyWh":{energy},"powerW":100.0}}"#
                );
                insert.execute(params![meter, seq, energy, payload])?;
                rows += 1;
            }
        }
        tx.commit()?;
        txs += 1;
        tx_us.push(micros(t0.elapsed()));
    }
    let elapsed = started.elapsed();
    let write_bytes = own_write_bytes()
        .zip(io_before)
        .map(|(a, b)| a.saturating_sub(b));
    tx_us.sort_unstable();
    Ok(Baseline {
        when,
        rows_per_tx,
        rows,
        txs,
        elapsed,
        write_bytes,
        tx_us,
    })
}

/// Adds and credits every meter through the ledger's own ops before the gateway starts. The
/// provisioning connection alone runs with `synchronous = OFF`: it is set-up, not measured.
pub fn provision<'a>(config: &Config, meters: impl Iterator<Item = &'a String>) -> Result<()> {
    let started = Instant::now();
    let mut conn = store::open(&config.db_path(), config.gateway.id.as_str())
        .context("opening the gateway database for provisioning")?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let settings = LedgerSettings {
        rules: Rules {
            low_balance_wh: config.ledger.low_balance_wh,
        },
        tariff: config.ledger.tariff.clone(),
    };
    let secret_hash = auth::hash_secret(SECRET);
    let mut next_note = started + Duration::from_secs(2);
    let mut n = 0;
    for id in meters {
        let meter = MeterId::parse(id)?;
        let at = store::now_ms();
        let add = Op::AddMeter {
            meter: meter.clone(),
            name: None,
            phone: None,
            secret_hash: secret_hash.clone(),
            at,
        };
        apply_now(&mut conn, &add, &settings).with_context(|| format!("adding {id}"))?;
        let credit = Op::Credit(Credit {
            meter,
            source: "bench".into(),
            reference: format!("bench-{id}"),
            amount_cents: CREDIT_CENTS,
            at,
            phone: None,
        });
        apply_now(&mut conn, &credit, &settings).with_context(|| format!("crediting {id}"))?;
        n += 1;
        if Instant::now() >= next_note {
            eprintln!("[provision] {n} meters");
            next_note += Duration::from_secs(2);
        }
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    eprintln!(
        "[provision] {n} meters added and credited in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---- the meter side of MQTT ----

/// An MQTT 3.1.1 connection from a meter's side, framed with rumqtt's codec.
pub struct MqttStream {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl MqttStream {
    /// Connects as `client_id` (with `SECRET` when `login`) and waits for a successful CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        login: bool,
        connack_within: Duration,
    ) -> Result<MqttStream> {
        let stream = timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .context("TCP connect timed out")?
            .context("TCP connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = MqttStream {
            stream,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_S;
        if login {
            connect.set_login(client_id, SECRET);
        }
        conn.queue(Packet::Connect(connect))?;
        conn.flush().await?;
        match timeout(connack_within, conn.next_packet())
            .await
            .context("no CONNACK in time")??
        {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(conn),
            Packet::ConnAck(ack) => bail!("CONNECT refused: {:?}", ack.code),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to `filter` at QoS 1 and waits for the SUBACK, acknowledging what comes first.
    pub async fn subscribe(&mut self, filter: &str) -> Result<()> {
        let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
        sub.pkid = 1;
        self.queue(Packet::Subscribe(sub))?;
        self.flush().await?;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(p) = self.next_buffered()? {
                match p {
                    Packet::SubAck(_) => return self.flush().await,
                    Packet::Publish(p) if p.qos == QoS::AtLeastOnce => {
                        self.queue(Packet::PubAck(PubAck::new(p.pkid)))?;
                    }
                    _ => {}
                }
            }
            self.read_until(until).await.context("no SUBACK")?;
        }
    }

    /// Room for this many more bytes in the read buffer (a subscriber that reads in bulk).
    pub fn reserve_read(&mut self, bytes: usize) {
        self.rbuf.reserve(bytes);
    }

    pub fn queue(&mut self, packet: Packet) -> Result<()> {
        packet
            .write(&mut self.wbuf, MAX_PACKET)
            .map_err(|e| anyhow!("encoding a packet: {e}"))?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await.context("writing")?;
            self.wbuf.clear();
        }
        Ok(())
    }

    pub async fn read_more(&mut self) -> Result<()> {
        if self
            .stream
            .read_buf(&mut self.rbuf)
            .await
            .context("reading")?
            == 0
        {
            bail!("the server closed the connection");
        }
        Ok(())
    }

    pub async fn read_until(&mut self, until: tokio::time::Instant) -> Result<()> {
        timeout_at(until, self.read_more())
            .await
            .map_err(|_| anyhow!("timed out"))?
    }

    pub fn next_buffered(&mut self) -> Result<Option<Packet>> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.rbuf, MAX_PACKET) {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(anyhow!("malformed packet: {e}")),
        }
    }

    pub async fn next_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = self.next_buffered()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    pub async fn goodbye(mut self) {
        if self.queue(Packet::Disconnect).is_ok() {
            let _ = self.flush().await;
        }
    }
}
