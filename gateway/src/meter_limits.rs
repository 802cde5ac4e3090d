//! Per-meter limits after CONNACK: how many messages a meter may publish, and how many warnings
//! it may put into the log.
//!
//! One meter's secret is enough to flood: every accepted message becomes an event (disk, sinks)
//! and every refused one a log line. The state here is kept per meter, not per connection, so
//! reconnecting does not refill a bucket or reset a warning budget; it is bounded by the
//! meters provisioned (only authenticated meters get an entry).
//!
//! Over the limit ([`crate::broker`] decides): a consumption report is not dropped but read
//! later (the connection waits for its token, so TCP slows the meter down and the PUBACK still
//! means "committed"); any other message is acknowledged and dropped, counted as
//! `umeme_mqtt_rejected_total{reason="rate_limited"}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::config::{MessageRate, SessionLimits};
use crate::meter::MeterId;
use crate::metrics::Metrics;

const WARNING_WINDOW: Duration = Duration::from_secs(60);

/// Which bucket a publish draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Report,
    Status,
    /// A firmware chunk request (`…/ota/request`).
    OtaChunk,
}

/// The guards of every meter seen since start.
#[derive(Default)]
pub struct MeterGuards {
    meters: Mutex<HashMap<MeterId, Arc<Mutex<MeterGuard>>>>,
}

impl MeterGuards {
    /// The meter's guard, created with `limits` the first time the meter is seen.
    pub fn guard(&self, meter: &MeterId, limits: &SessionLimits) -> Arc<Mutex<MeterGuard>> {
        let mut m = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(meter.clone())
            .or_insert_with(|| Arc::new(Mutex::new(MeterGuard::new(limits, Instant::now()))))
            .clone()
    }
}

/// One meter's buckets and warning budget.
pub struct MeterGuard {
    reports: TokenBucket,
    status: TokenBucket,
    ota_chunks: TokenBucket,
    warnings: WarningBudget,
}

impl MeterGuard {
    pub fn new(limits: &SessionLimits, now: Instant) -> Self {
        MeterGuard {
            reports: TokenBucket::full(limits.reports, now),
            status: TokenBucket::full(limits.status, now),
            ota_chunks: TokenBucket::full(limits.ota_chunks, now),
            warnings: WarningBudget {
                per_window: limits.warnings_per_minute,
                window_start: now,
                logged: 0,
                suppressed: 0,
            },
        }
    }

    /// Takes one message of `kind` from its bucket; `false` when the meter is over its rate.
    pub fn admit(&mut self, kind: MessageKind, now: Instant) -> bool {
        self.bucket(kind).take(now)
    }

    /// Takes one message of `kind` from its bucket even when it is empty, and returns how long
    /// the caller must wait before handling it: zero within the rate.
    pub fn reserve(&mut self, kind: MessageKind, now: Instant) -> Duration {
        self.bucket(kind).reserve(now)
    }

    fn bucket(&mut self, kind: MessageKind) -> &mut TokenBucket {
        match kind {
            MessageKind::Report => &mut self.reports,
            MessageKind::Status => &mut self.status,
            MessageKind::OtaChunk => &mut self.ota_chunks,
        }
    }
}

/// Whether a warning about `meter` may be logged now. Past the budget the warning is counted
/// (`umeme_mqtt_warnings_suppressed_total`) instead; the first warning of a new minute is
/// preceded by one line saying how many were suppressed in the last.
pub fn may_warn(guard: &Mutex<MeterGuard>, meter: &MeterId, metrics: &Metrics) -> bool {
    let verdict = guard
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .warnings
        .allow(Instant::now());
    match verdict {
        Warning::Log { suppressed_before } => {
            if suppressed_before > 0 {
                warn!(%meter, suppressed = suppressed_before, "more warnings about this meter were suppressed in the last minute");
            }
            true
        }
        Warning::Suppress => {
            metrics.inc("umeme_mqtt_warnings_suppressed_total", &[]);
            false
        }
    }
}

/// Logs how many warnings were suppressed since the last summary (at the end of a session, so
/// a flood that stops still leaves its count in the log).
pub fn flush_warnings(guard: &Mutex<MeterGuard>, meter: &MeterId) {
    let suppressed = std::mem::take(
        &mut guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warnings
            .suppressed,
    );
    if suppressed > 0 {
        warn!(%meter, suppressed, "more warnings about this meter were suppressed");
    }
}

/// `burst` tokens at most, refilled continuously at `per_minute`.
struct TokenBucket {
    rate: MessageRate,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn full(rate: MessageRate, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.rate.per_minute) / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second();
        self.tokens = (self.tokens + refill).min(f64::from(self.rate.burst));
        self.last = now;
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Goes into debt when empty: the debt is paid by waiting, so two connections of one meter
    /// (a takeover) still share one rate.
    fn reserve(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second())
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Warning {
    Log { suppressed_before: u64 },
    Suppress,
}

/// The first `per_window` warnings of each minute are logged, the rest counted.
struct WarningBudget {
    per_window: u32,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl WarningBudget {
    fn allow(&mut self, now: Instant) -> Warning {
        let mut suppressed_before = 0;
        if now.saturating_duration_since(self.window_start) >= WARNING_WINDOW {
            suppressed_before = std::mem::take(&mut self.suppressed);
            self.window_start = now;
            self.logged = 0;
        }
        if self.logged < self.per_window {
            self.logged += 1;
            Warning::Log { suppressed_before }
        } else {
            self.suppressed += 1;
            Warning::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            reports: MessageRate {
                per_minute: 60,
                burst: 3,
            },
            ..SessionLimits::default()
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut g = MeterGuard::new(&limits(), t0);
        assert!((0..3).all(|_| g.admit(MessageKind::Report, t0)));
        assert!(!g.admit(MessageKind::Report, t0));
        // 60 a minute: one more token each second, never more than the burst.
        assert!(g.admit(MessageKind::Report, t0 + Duration::from_secs(1)));
        assert!(!g.admit(MessageKind::Report, t0 + Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| g.admit(MessageKind::Report, later)));
        assert!(!g.admit(MessageKind::Report, later));
    }

    #[test]
    fn a_reservation_past_the_burst_waits_for_its_token() {
        let t0 = Instant::now();
        let mut g = MeterGuard::new(&limits(), t0);
        for _ in 0..3 {
            assert_eq!(g.reserve(MessageKind::Report, t0), Duration::ZERO);
        }
        assert_eq!(g.reserve(MessageKind::Report, t0), Duration::from_secs(1));
        assert_eq!(g.reserve(MessageKind::Report, t0), Duration::from_secs(2));
        // Having waited, the next one is due a second after the last.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(g.reserve(MessageKind::Report, t2), Duration::from_secs(1));
    }

    #[test]
    fn reports_and_status_messages_have_separate_buckets() {
        let t0 = Instant::now();
        let mut g = MeterGuard::new(&limits(), t0);
        while g.admit(MessageKind::Status, t0) {}
        assert!(g.admit(MessageKind::Report, t0));
    }

    #[test]
    fn warnings_past_the_budget_are_counted_and_summarised_in_the_next_minute() {
        let t0 = Instant::now();
        let mut w = MeterGuard::new(&limits(), t0).warnings;
        for _ in 0..5 {
            assert_eq!(
                w.allow(t0),
                Warning::Log {
                    suppressed_before: 0
                }
            );
        }
        for _ in 0..1000 {
            assert_eq!(w.allow(t0), Warning::Suppress);
        }
        assert_eq!(
            w.allow(t0 + WARNING_WINDOW),
            Warning::Log {
                suppressed_before: 1000
            }
        );
    }
}
