//! Who may spend the meter port's resources before CONNACK: a per-IP cap on unauthenticated
//! connections, a per-IP cap on password checks in flight, failed-attempt backoff per source
//! address and per meter number, and a rate limit on the refusal log lines themselves.
//!
//! Everything here is bounded in memory: the backoff maps hold at most [`MAX_TRACKED`] keys
//! each and forget the oldest when full, so a flood of new addresses or client ids costs a
//! fixed amount of RAM; the per-IP maps only hold addresses with connections open.
//!
//! "Per address" means per [`umeme_http_guard::peer_key`], as on the HTTP listeners: an IPv4
//! address, or an IPv6 /64. A host picks its own interface identifier (SLAAC privacy
//! addresses, or simply `ip addr add`), so counting IPv6 by full address would give one host
//! a fresh set of places, checks and free failures per address it makes up.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use umeme_http_guard::peer_key;

/// Keys remembered per backoff map (source addresses; meter numbers).
pub const MAX_TRACKED: usize = 4096;
/// Password checks (argon2) one source address may have running at once; more wait for one of
/// these (at most `[broker] connect_timeout_ms`, then CONNACK 3), so one host's storm queues
/// behind itself instead of in front of every other meter.
pub const MAX_CHECKS_PER_IP: usize = 2;
/// Consecutive failed password checks a source address or meter number gets before backoff
/// starts: a meter with a mistyped secret, or an operator testing, is not slowed at once.
pub const FREE_FAILURES: u32 = 3;
/// First backoff after the free failures; it doubles per further failure up to
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
    /// TLS handshakes in flight per address (`[broker] max_tls_handshakes_per_ip`).
    max_handshakes_per_ip: usize,
    handshakes: Arc<Mutex<HashMap<IpAddr, usize>>>,
    by_ip: Mutex<Tracker<IpAddr>>,
    by_meter: Mutex<Tracker<String>>,
    /// Per address with checks running or waiting; removed when the last one is done.
    checks: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
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
    /// The address or the meter number failed a password check recently: its check waits
    /// behind those of clean callers.
    pub suspect: bool,
    admission: &'a Admission,
    ip: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.admission.forget_idle(self.ip);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    last_failure: Option<Instant>,
    until: Option<Instant>,
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

    fn entry(&mut self, k: &K, now: Instant, max: Duration) -> &mut Entry {
        if !self.map.contains_key(k) && self.map.len() >= MAX_TRACKED {
            // Full: forget keys quiet for longer than the longest backoff, else the one
            // freed soonest. O(n) only when full, over a bounded n.
            self.map.retain(|_, e| {
                e.last_failure
                    .is_some_and(|t| now.saturating_duration_since(t) <= max)
            });
            if self.map.len() >= MAX_TRACKED {
                if let Some(victim) = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| (e.until, e.last_failure))
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

    /// Failed within the longest backoff.
    fn suspect(&self, k: &K, now: Instant, max: Duration) -> bool {
        self.map
            .get(k)
            .and_then(|e| e.last_failure)
            .is_some_and(|t| now.saturating_duration_since(t) <= max)
    }

    fn fail(&mut self, k: &K, now: Instant, max: Duration) {
        let e = self.entry(k, now, max);
        // A key quiet for longer than the longest backoff starts over.
        if e.last_failure
            .is_some_and(|t| now.saturating_duration_since(t) > max)
        {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = Some(now);
        if e.failures > FREE_FAILURES {
            let doublings = (e.failures - FREE_FAILURES - 1).min(16);
            e.until = Some(now + BACKOFF_BASE.saturating_mul(1u32 << doublings).min(max));
        }
    }
}

fn take_place(map: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Pending> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    let n = m.entry(ip).or_insert(0);
    if *n >= max {
        return None;
    }
    *n += 1;
    Some(Pending {
        ip,
        map: map.clone(),
    })
}

impl Admission {
    pub fn new(max_pending_per_ip: usize, backoff_max: Duration) -> Admission {
        Admission {
            max_pending_per_ip,
            backoff_max,
            pending: Arc::new(Mutex::new(HashMap::new())),
            max_handshakes_per_ip: usize::MAX,
            handshakes: Arc::new(Mutex::new(HashMap::new())),
            by_ip: Mutex::new(Tracker::new()),
            by_meter: Mutex::new(Tracker::new()),
            checks: Mutex::new(HashMap::new()),
            log: LogLimiter::new(LOG_LINES_PER_WINDOW, LOG_WINDOW),
        }
    }

    /// Caps the TLS handshakes one address may have in flight at once.
    pub fn with_tls_handshakes_per_ip(mut self, max: usize) -> Admission {
        self.max_handshakes_per_ip = max;
        self
    }

    /// Takes one of `ip`'s places for a connection that has not been answered CONNACK yet;
    /// `None` when it has none left.
    pub fn enter(&self, ip: IpAddr) -> Option<Pending> {
        take_place(&self.pending, peer_key(ip), self.max_pending_per_ip)
    }

    /// Takes one of `ip`'s places for a TLS handshake, held until the handshake ends;
    /// `None` when it has none left.
    pub fn handshake(&self, ip: IpAddr) -> Option<Pending> {
        take_place(&self.handshakes, peer_key(ip), self.max_handshakes_per_ip)
    }

    /// May a password check (argon2) run for `meter` from `ip`? `Err(reason)` when the address
    /// or the meter is backing off after failures, or when `ip`'s checks already running did
    /// not leave room within `wait`.
    pub async fn check(
        &self,
        ip: IpAddr,
        meter: &str,
        wait: Duration,
    ) -> Result<Checking<'_>, &'static str> {
        let ip = peer_key(ip);
        let now = Instant::now();
        let meter_suspect = {
            let t = self.by_meter.lock().unwrap_or_else(|e| e.into_inner());
            if t.blocked(&meter.to_string(), now) {
                return Err("auth_backoff_meter");
            }
            t.suspect(&meter.to_string(), now, self.backoff_max)
        };
        let ip_suspect = {
            let t = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if t.blocked(&ip, now) {
                return Err("auth_backoff_ip");
            }
            t.suspect(&ip, now, self.backoff_max)
        };
        let sem = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_CHECKS_PER_IP)))
            .clone();
        let permit = tokio::time::timeout(wait, sem.acquire_owned()).await;
        let checking = Checking {
            suspect: meter_suspect || ip_suspect,
            admission: self,
            ip,
            permit: permit.ok().and_then(Result::ok),
        };
        if checking.permit.is_none() {
            return Err("auth_busy_ip");
        }
        Ok(checking)
    }

    fn forget_idle(&self, ip: IpAddr) {
        let mut m = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map's own reference left: nobody is checking or waiting.
        if m.get(&ip).is_some_and(|s| Arc::strong_count(s) == 1) {
            m.remove(&ip);
        }
    }

    pub fn failed(&self, ip: IpAddr, meter: &str) {
        let ip = peer_key(ip);
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

    /// An attempt from an address already backing off: its backoff grows, so a host that keeps
    /// hammering stays shut out for longer (up to the maximum). Meter numbers do not grow this
    /// way, or a real meter retrying on its own schedule would never get its turn.
    pub fn hammering(&self, ip: IpAddr) {
        let ip = peer_key(ip);
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner()).fail(
            &ip,
            Instant::now(),
            self.backoff_max,
        );
    }

    /// Clears the meter's failures. The address's are left to expire: one good login of its
    /// own must not buy a host a fresh run of guesses at other meters.
    pub fn succeeded(&self, meter: &str) {
        self.by_meter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .remove(meter);
    }

    /// Keys currently remembered by the two backoff maps.
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

    const WAIT: Duration = Duration::from_secs(5);

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

    #[tokio::test]
    async fn failures_back_off_per_ip_and_meter_after_the_free_ones() {
        let a = Admission::new(8, Duration::from_secs(5));
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..FREE_FAILURES {
            drop(a.check(ip, "M1", WAIT).await.unwrap());
            a.failed(ip, "M1");
        }
        let free = a.check(ip, "M1", WAIT).await.unwrap();
        assert!(free.suspect, "free failures cost no wait, but queue later");
        drop(free);
        let clean = a.check([10, 0, 0, 3].into(), "M3", WAIT).await.unwrap();
        assert!(!clean.suspect);
        drop(clean);
        a.failed(ip, "M1");
        assert_eq!(a.check(ip, "M2", WAIT).await.err(), Some("auth_backoff_ip"));
        let other: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(
            a.check(other, "M1", WAIT).await.err(),
            Some("auth_backoff_meter")
        );
        a.succeeded("M1");
        assert!(a.check(other, "M1", WAIT).await.is_ok());
        let before = a.by_ip.lock().unwrap().map[&ip].until;
        a.hammering(ip);
        assert!(
            a.by_ip.lock().unwrap().map[&ip].until > before,
            "hammering grows it"
        );
        assert_eq!(
            a.check(ip, "M1", WAIT).await.err(),
            Some("auth_backoff_ip"),
            "a success clears the meter, not the address"
        );
    }

    #[tokio::test]
    async fn checks_in_flight_per_ip_wait_for_room_and_give_up_in_time() {
        let a = Admission::new(8, Duration::from_secs(5));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let mut held = Vec::new();
        for i in 0..MAX_CHECKS_PER_IP {
            held.push(a.check(ip, &format!("M{i}"), WAIT).await.unwrap());
        }
        let short = Duration::from_millis(50);
        assert_eq!(a.check(ip, "MX", short).await.err(), Some("auth_busy_ip"));
        assert!(
            a.check([10, 0, 0, 2].into(), "MX", short).await.is_ok(),
            "other addresses unaffected"
        );
        let (waiting, ()) = tokio::join!(a.check(ip, "MX", WAIT), async {
            tokio::task::yield_now().await;
            held.pop();
        });
        assert!(waiting.is_ok());
        drop(waiting);
        drop(held);
        assert!(
            a.checks.lock().unwrap().is_empty(),
            "idle addresses forgotten"
        );
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_of_one_64_share_one_set_of_unauthenticated_places() {
        let a = Admission::new(2, Duration::from_secs(1));
        let _held = (
            a.enter(v6("2001:db8:1:2::1")).unwrap(),
            a.enter(v6("2001:db8:1:2::2")).unwrap(),
        );
        assert!(
            a.enter(v6("2001:db8:1:2:dead:beef:0:3")).is_none(),
            "a third made-up address in the same /64 gets no place"
        );
        assert!(
            a.enter(v6("2001:db8:1:3::1")).is_some(),
            "the next /64 is another host"
        );
        let mapped = v6("::ffff:10.0.0.1");
        let _m = (a.enter(mapped).unwrap(), a.enter(mapped).unwrap());
        assert!(
            a.enter([10, 0, 0, 1].into()).is_none(),
            "an IPv4-mapped address counts as its IPv4 address"
        );
        assert!(a.enter([10, 0, 0, 2].into()).is_some());
    }

    #[tokio::test]
    async fn ipv6_addresses_of_one_64_share_one_backoff_and_one_set_of_checks() {
        let a = Admission::new(8, Duration::from_secs(5));
        // Every failure from a new address of the same /64: the free ones run out all the same.
        for i in 0..=FREE_FAILURES {
            let ip = v6(&format!("2001:db8::{:x}", i + 1));
            drop(a.check(ip, &format!("M{i}"), WAIT).await.unwrap());
            a.failed(ip, &format!("M{i}"));
        }
        assert_eq!(
            a.check(v6("2001:db8::ffff"), "MX", WAIT).await.err(),
            Some("auth_backoff_ip"),
            "a fresh address of the same /64 is backing off too"
        );
        let b = Admission::new(8, Duration::from_secs(5));
        let mut held = Vec::new();
        for i in 0..MAX_CHECKS_PER_IP {
            let ip = v6(&format!("2001:db8::{:x}", i + 1));
            held.push(b.check(ip, &format!("M{i}"), WAIT).await.unwrap());
        }
        let short = Duration::from_millis(50);
        assert_eq!(
            b.check(v6("2001:db8::abcd"), "MY", short).await.err(),
            Some("auth_busy_ip"),
            "checks in flight are counted per /64"
        );
        drop(held);
        assert!(b.checks.lock().unwrap().is_empty(), "idle /64s forgotten");
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
