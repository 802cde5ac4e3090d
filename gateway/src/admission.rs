//! Who may spend the meter port's resources before CONNACK: per-IP caps on unauthenticated
//! connections and on password checks in flight, failed-attempt backoff per source address and
//! per meter, and a rate limit on the refusal log lines themselves.
//!
//! Everything here is bounded in memory: the backoff maps hold at most [`MAX_TRACKED`] keys
//! each and forget the oldest when full, so a flood of new addresses or client ids costs a
//! fixed amount of RAM.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys remembered per backoff map (source addresses; meter numbers).
pub const MAX_TRACKED: usize = 4096;
/// Password checks (argon2) one source address may have running at once; more are refused
/// with CONNACK 3 and cost nothing. Meters each have their own address on a site's LAN.
pub const MAX_CHECKS_PER_IP: u32 = 2;
/// First backoff after a failed password check; it doubles per further failure up to
/// `[broker] auth_backoff_max_ms`.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Refusal log lines written per [`LOG_WINDOW`]; the rest are counted and reported with the
/// next line that is written.
pub const LOG_LINES_PER_WINDOW: u32 = 20;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

pub struct Admission {
    max_pending_per_ip: usize,
    backoff_max: Duration,
    pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
    by_ip: Mutex<Tracker<IpAddr>>,
    by_meter: Mutex<Tracker<String>>,
    pub log: LogLimiter,
}

/// Holds one of a source address's unauthenticated-connection places until dropped.
pub struct Pending {
    ip: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A password check in flight for one source address, released when dropped.
pub struct Checking<'a> {
    admission: &'a Admission,
    ip: IpAddr,
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        let mut t = self
            .admission
            .by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.map.get_mut(&self.ip) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    until: Option<Instant>,
    in_flight: u32,
}

struct Tracker<K> {
    map: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    fn new() -> Self {
        Tracker {
            map: HashMap::new(),
        }
    }

    fn entry(&mut self, k: &K, now: Instant) -> &mut Entry {
        if !self.map.contains_key(k) && self.map.len() >= MAX_TRACKED {
            // Full: forget entries that no longer hold anything back, else the one freed
            // soonest. O(n) only when full, over a bounded n.
            self.map
                .retain(|_, e| e.in_flight > 0 || e.until.is_some_and(|u| u > now));
            if self.map.len() >= MAX_TRACKED {
                if let Some(victim) = self
                    .map
                    .iter()
                    .filter(|(_, e)| e.in_flight == 0)
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&victim);
                }
            }
        }
        self.map.entry(k.clone()).or_default()
    }

    fn blocked(&self, k: &K, now: Instant) -> bool {
        self.map
            .get(k)
            .and_then(|e| e.until)
            .is_some_and(|u| u > now)
    }

    fn fail(&mut self, k: &K, now: Instant, max: Duration) {
        let e = self.entry(k, now);
        e.failures = e.failures.saturating_add(1);
        let wait = BACKOFF_BASE
            .saturating_mul(1u32 << (e.failures - 1).min(16))
            .min(max);
        e.until = Some(now + wait);
    }

    fn clear(&mut self, k: &K) {
        if let Some(e) = self.map.get_mut(k) {
            e.failures = 0;
            e.until = None;
            if e.in_flight == 0 {
                self.map.remove(k);
            }
        }
    }
}

impl Admission {
    pub fn new(max_pending_per_ip: usize, backoff_max: Duration) -> Admission {
        Admission {
            max_pending_per_ip,
            backoff_max,
            pending: Arc::new(Mutex::new(HashMap::new())),
            by_ip: Mutex::new(Tracker::new()),
            by_meter: Mutex::new(Tracker::new()),
            log: LogLimiter::new(LOG_LINES_PER_WINDOW, LOG_WINDOW),
        }
    }

    /// Takes one of `ip`'s places for a connection that has not been answered CONNACK yet;
    /// `None` when it has none left.
    pub fn enter(&self, ip: IpAddr) -> Option<Pending> {
        let mut m = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.max_pending_per_ip {
            return None;
        }
        *n += 1;
        Some(Pending {
            ip,
            map: self.pending.clone(),
        })
    }

    /// May a password check (argon2) run for `meter` from `ip` now? `Err(reason)` when the
    /// address or the meter is backing off after failures, or the address has too many
    /// checks running.
    pub fn check(&self, ip: IpAddr, meter: &str) -> Result<Checking<'_>, &'static str> {
        let now = Instant::now();
        if self
            .by_meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocked(&meter.to_string(), now)
        {
            return Err("auth_backoff_meter");
        }
        let mut t = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if t.blocked(&ip, now) {
            return Err("auth_backoff_ip");
        }
        let e = t.entry(&ip, now);
        if e.in_flight >= MAX_CHECKS_PER_IP {
            return Err("auth_busy_ip");
        }
        e.in_flight += 1;
        Ok(Checking {
            admission: self,
            ip,
        })
    }

    pub fn failed(&self, ip: IpAddr, meter: &str) {
        let now = Instant::now();
        self.by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail(&ip, now, self.backoff_max);
        self.by_meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail(&meter.to_string(), now, self.backoff_max);
    }

    pub fn succeeded(&self, ip: IpAddr, meter: &str) {
        self.by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(&ip);
        self.by_meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(&meter.to_string());
    }

    /// Keys currently remembered (for tests of the memory bound).
    pub fn tracked(&self) -> (usize, usize) {
        let a = self
            .by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len();
        let b = self
            .by_meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len();
        (a, b)
    }
}

/// At most `per_window` log lines per `window`; the others are only counted.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimiter {
    pub fn new(per_window: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            per_window,
            window,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(n)` when a line may be written now, `n` lines having been suppressed since the
    /// last one written; `None` when this one is suppressed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(s.0) >= self.window {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.per_window {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_places_per_ip_are_capped_and_given_back() {
        let a = Admission::new(2, Duration::from_secs(1));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let (p1, _p2) = (a.enter(ip).unwrap(), a.enter(ip).unwrap());
        assert!(a.enter(ip).is_none());
        assert!(
            a.enter([10, 0, 0, 2].into()).is_some(),
            "other addresses unaffected"
        );
        drop(p1);
        assert!(a.enter(ip).is_some());
    }

    #[test]
    fn failures_back_off_per_ip_and_meter_and_success_clears_them() {
        let a = Admission::new(8, Duration::from_secs(5));
        let ip: IpAddr = [10, 0, 0, 1].into();
        drop(a.check(ip, "M1").unwrap());
        a.failed(ip, "M1");
        assert_eq!(a.check(ip, "M2").err(), Some("auth_backoff_ip"));
        assert_eq!(
            a.check([10, 0, 0, 2].into(), "M1").err(),
            Some("auth_backoff_meter")
        );
        a.succeeded(ip, "M1");
        assert!(a.check(ip, "M1").is_ok());
    }

    #[test]
    fn checks_in_flight_per_ip_are_capped() {
        let a = Admission::new(8, Duration::from_secs(5));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let held: Vec<_> = (0..MAX_CHECKS_PER_IP)
            .map(|i| a.check(ip, &format!("M{i}")).unwrap())
            .collect();
        assert_eq!(a.check(ip, "MX").err(), Some("auth_busy_ip"));
        drop(held);
        assert!(a.check(ip, "MX").is_ok());
    }

    #[test]
    fn backoff_memory_stays_bounded_under_a_flood_of_new_keys() {
        let a = Admission::new(8, Duration::from_secs(60));
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            a.failed(ip, &format!("M{i}"));
        }
        let (ips, meters) = a.tracked();
        assert!(
            ips <= MAX_TRACKED && meters <= MAX_TRACKED,
            "{ips} {meters}"
        );
    }

    #[test]
    fn log_limiter_reports_how_many_lines_it_suppressed() {
        let l = LogLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(11)), Some(2));
    }
}
