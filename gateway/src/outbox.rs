//! Store-and-forward: delivers stored events to each configured sink, at least once, in `seq`
//! order, with one durable cursor per sink.
//!
//! Every event is already in SQLite (appended by [`crate::writer`] in the transaction of the
//! change that caused it) before a runner sees it. A [`SinkRunner`] is one OS thread per sink:
//! it reads the next batch after its cursor through its own read-only connection, hands it to
//! the sink on a second thread (so a hung call times out instead of stalling the runner), and
//! asks the writer to move the cursor only after the sink said the batch is delivered.
//!
//! Architecture invariant: a sink is never called on a tokio worker thread, and a slow, hung or
//! failing sink delays only its own runner: never the ledger, the broker or another sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{info, warn};

use crate::config::{SinkConfig, SinkImplementation};
use crate::metrics::Metrics;
use crate::store::{self, Event};
use crate::writer::{Op, Writer};

/// What a sink says about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Every event of the batch is delivered.
    Delivered,
    /// Nothing of the batch counts as delivered; try again later (after `after` if given).
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// These events (by `seq`) can never be delivered; every other event of the batch is.
    Rejected(Vec<(i64, String)>),
}

/// A destination for events. Implementations block; the runner calls them on their own thread.
pub trait Sink: Send {
    /// Called once on the sink's own thread before the first batch.
    fn start(&mut self) {}
    fn deliver(&mut self, batch: &[Event]) -> Delivery;
}

/// Validates a built-in sink's `[sink.config]` without side effects (for `check-config`);
/// a plugin's config is the plugin's to check when it is created.
pub fn check_sink_config(c: &SinkConfig) -> Result<(), String> {
    match &c.implementation {
        SinkImplementation::Builtin(b) if b == "jsonl" => {
            crate::jsonl::JsonlSink::from_config(&c.config).map(drop)
        }
        SinkImplementation::Builtin(other) => Err(format!("unknown builtin sink {other:?}")),
        SinkImplementation::Plugin { .. } => Ok(()),
    }
}

/// Rung by the writer after every commit so idle runners pick up new events at once.
#[derive(Default)]
pub struct Bell {
    rings: Mutex<u64>,
    cv: Condvar,
}

impl Bell {
    pub fn ring(&self) {
        *self.rings.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }

    /// Waits until a ring newer than `seen` or `timeout`; returns the latest ring count.
    pub fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let guard = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, timeout, |r| *r == seen)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// Exponential backoff with full jitter: 1 s, 2 s, 4 s … up to `cap`, each drawn from [½, 1]
/// of its step so that many gateways coming back together do not retry in lockstep.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let step = Duration::from_secs(1)
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap);
    let jitter = rand::thread_rng().gen_range(0.5..=1.0);
    step.mul_f64(jitter)
}

/// Spends events at most `rate` per second (a token bucket one second deep).
struct RateLimit {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        RateLimit {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    /// How long to wait before `n` events may go.
    fn wait_for(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        let need = n as f64 - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate)
        }
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// The sink on a thread of its own, so a call that hangs can be abandoned by the runner.
struct SinkThread {
    calls: mpsc::Sender<Vec<Event>>,
    results: mpsc::Receiver<Delivery>,
    busy: bool,
}

impl SinkThread {
    fn spawn(name: &str, mut sink: Box<dyn Sink>) -> SinkThread {
        let (calls, call_rx) = mpsc::channel::<Vec<Event>>();
        let (result_tx, results) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.start())).is_err()
                {
                    warn!(sink = "start", "the sink panicked while starting");
                }
                for batch in call_rx {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        sink.deliver(&batch)
                    }))
                    .unwrap_or_else(|_| Delivery::Retry {
                        after: None,
                        error: "the sink panicked".into(),
                    });
                    if result_tx.send(r).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn sink thread");
        SinkThread {
            calls,
            results,
            busy: false,
        }
    }

    fn deliver(&mut self, batch: Vec<Event>, timeout: Duration) -> Delivery {
        if self.busy {
            // The previous call timed out; its late answer no longer counts.
            match self.results.recv_timeout(timeout) {
                Ok(_) => self.busy = false,
                Err(_) => {
                    return Delivery::Retry {
                        after: None,
                        error: format!("the previous call is still running after {timeout:?}"),
                    }
                }
            }
        }
        if self.calls.send(batch).is_err() {
            return Delivery::Retry {
                after: None,
                error: "the sink thread has stopped".into(),
            };
        }
        match self.results.recv_timeout(timeout) {
            Ok(d) => d,
            Err(_) => {
                self.busy = true;
                Delivery::Retry {
                    after: None,
                    error: format!("timed out after {timeout:?}"),
                }
            }
        }
    }
}

/// A handle on a running sink runner.
pub struct SinkRunner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkRunner {
    /// Starts delivering to `sink` from its stored cursor.
    pub fn start(
        config: SinkConfig,
        sink: Box<dyn Sink>,
        db_path: &std::path::Path,
        gateway: String,
        writer: Writer,
        bell: Arc<Bell>,
        metrics: Arc<Metrics>,
    ) -> Result<SinkRunner, store::StoreError> {
        let conn = store::open_read_only(db_path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("outbox-{}", config.name))
            .spawn(move || {
                let mut r = Runner {
                    sink: SinkThread::spawn(&config.name, sink),
                    rate: RateLimit::new(config.max_events_per_second),
                    config,
                    conn,
                    gateway,
                    writer,
                    bell,
                    metrics,
                    stop: flag,
                };
                r.run();
            })
            .expect("spawn outbox runner thread");
        Ok(SinkRunner {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Runner {
    config: SinkConfig,
    sink: SinkThread,
    rate: RateLimit,
    conn: rusqlite::Connection,
    gateway: String,
    writer: Writer,
    bell: Arc<Bell>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

impl Runner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sleeps up to `d`, waking early when stopped.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    fn run(&mut self) {
        let name = self.config.name.clone();
        let label = [("sink", name.as_str())];
        let mut cursor = match store::sink_cursor(&self.conn, &name) {
            Ok(c) => c,
            Err(e) => {
                warn!(sink = %name, error = %e, "cannot read the sink's cursor; runner not started");
                return;
            }
        };
        info!(sink = %name, cursor, "outbox runner started");
        self.metrics.set("umeme_sink_up", &label, 1.0);
        let mut attempt = 0u32;
        let mut rings = 0;
        // A batch never exceeds one second's worth of the rate limit.
        let limit = self
            .config
            .batch_size
            .min(self.config.max_events_per_second as usize)
            .max(1);
        while !self.stopped() {
            let next = next_batch(
                &self.conn,
                &self.gateway,
                cursor,
                &self.config.events,
                limit,
            );
            let (last, batch) = match next {
                Ok(Some(b)) => b,
                Ok(None) => {
                    rings = self.bell.wait(rings, Duration::from_secs(1));
                    continue;
                }
                Err(e) => {
                    warn!(sink = %name, error = %e, "reading events failed");
                    self.pause(Duration::from_secs(1));
                    continue;
                }
            };
            let delivery = if batch.is_empty() {
                Delivery::Delivered
            } else {
                let wait = self.rate.wait_for(batch.len());
                if !wait.is_zero() {
                    self.pause(wait);
                    continue;
                }
                self.rate.spend(batch.len());
                self.sink.deliver(batch.clone(), self.config.timeout)
            };
            let op = match settle(&name, last, &batch, delivery) {
                Ok(op) => op,
                Err((after, error)) => {
                    self.metrics.inc("umeme_outbox_failures_total", &label);
                    self.metrics.set("umeme_sink_up", &label, 0.0);
                    let wait = after
                        .map(|a| a.clamp(Duration::from_millis(100), Duration::from_secs(3600)))
                        .unwrap_or_else(|| backoff(attempt, self.config.retry_max));
                    warn!(sink = %name, error = %error, first = %batch[0].id, retry_in = ?wait, "sink delivery failed; will retry");
                    let op = Op::SinkFailure {
                        sink: name.clone(),
                        error,
                        at: store::now_ms(),
                    };
                    let _ = self.writer.submit_blocking(op);
                    attempt = attempt.saturating_add(1);
                    self.pause(wait);
                    continue;
                }
            };
            let Op::SinkProgress {
                delivered, dead, ..
            } = &op
            else {
                unreachable!("settle returns SinkProgress")
            };
            let (delivered, dead_n) = (*delivered as u64, dead.len() as u64);
            for (seq, _, why) in dead {
                warn!(sink = %name, seq, reason = %why, "event refused permanently; moved to dead letters");
            }
            match self.writer.submit_blocking(op) {
                Ok(_) => {
                    cursor = last;
                    if attempt > 0 {
                        info!(sink = %name, cursor, "sink delivering again");
                    }
                    attempt = 0;
                    self.metrics.set("umeme_sink_up", &label, 1.0);
                    self.metrics
                        .add("umeme_outbox_delivered_total", &label, delivered);
                    self.metrics
                        .add("umeme_outbox_dead_letters_total", &label, dead_n);
                }
                Err(e) => {
                    // Delivered but not recorded: the batch goes again (at least once).
                    warn!(sink = %name, error = %e, "could not store the sink's cursor");
                    self.pause(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The events after `cursor` (at most `limit`): the `seq` of the last one read, and those of
/// them whose kind the sink takes (possibly none: the cursor then just passes them).
/// `None` when there is nothing new.
pub fn next_batch(
    conn: &rusqlite::Connection,
    gateway: &str,
    cursor: i64,
    kinds: &[String],
    limit: usize,
) -> Result<Option<(i64, Vec<Event>)>, store::StoreError> {
    let events = store::events_after(conn, gateway, cursor, limit)?;
    let Some(last) = events.last().map(|e| e.seq) else {
        return Ok(None);
    };
    let batch = events
        .into_iter()
        .filter(|e| kinds.contains(&e.kind))
        .collect();
    Ok(Some((last, batch)))
}

/// Turns a sink's answer for `batch` (read through `last`) into the cursor move to store, or
/// the retry to schedule (`Err((retry_after, error))`).
pub fn settle(
    sink: &str,
    last: i64,
    batch: &[Event],
    delivery: Delivery,
) -> Result<Op, (Option<Duration>, String)> {
    let dead: Vec<(i64, String, String)> = match delivery {
        Delivery::Delivered => Vec::new(),
        Delivery::Retry { after, error } => return Err((after, error)),
        Delivery::Rejected(list) => list
            .into_iter()
            .filter_map(|(seq, why)| {
                let e = batch.iter().find(|e| e.seq == seq)?;
                Some((seq, serde_json::to_string(e).unwrap_or_default(), why))
            })
            .collect(),
    };
    Ok(Op::SinkProgress {
        sink: sink.to_string(),
        through: last,
        delivered: (batch.len() - dead.len()) as i64,
        dead,
        at: store::now_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let cap = Duration::from_secs(60);
        for attempt in 0..30 {
            let d = backoff(attempt, cap);
            let step = Duration::from_secs(1u64 << attempt.min(20)).min(cap);
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn rate_limit_spreads_a_backlog() {
        let mut r = RateLimit::new(100);
        assert_eq!(r.wait_for(100), Duration::ZERO);
        r.spend(100);
        let w = r.wait_for(50);
        assert!(
            w > Duration::from_millis(400) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }

    struct Hang;
    impl Sink for Hang {
        fn deliver(&mut self, _: &[Event]) -> Delivery {
            std::thread::sleep(Duration::from_millis(300));
            Delivery::Delivered
        }
    }

    #[test]
    fn a_hung_call_times_out_and_its_late_answer_does_not_count() {
        let mut t = SinkThread::spawn("hang", Box::new(Hang));
        let d = t.deliver(Vec::new(), Duration::from_millis(20));
        assert!(matches!(d, Delivery::Retry { .. }), "{d:?}");
        // The next call first waits for the abandoned one, then runs normally.
        assert_eq!(
            t.deliver(Vec::new(), Duration::from_secs(5)),
            Delivery::Delivered
        );
    }
}
