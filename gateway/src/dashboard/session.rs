//! Dashboard sessions (random 32-byte ids in an HttpOnly cookie, a CSRF token each, idle and
//! absolute expiry, a bounded table) and the per-address limit on failed sign-ins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// A session unused this long ends.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, used or not.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; signing in beyond it ends the least recently used one.
pub const MAX_SESSIONS: usize = 64;

/// Failed sign-ins an address may make per [`SIGNIN_WINDOW`] before it is refused (429).
pub const SIGNIN_FAILURES: u32 = 5;
pub const SIGNIN_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Addresses remembered at most (the oldest window is forgotten first).
const SIGNIN_ADDRESSES: usize = 4096;

/// 32 random bytes as 64 hex characters.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Session {
    csrf: String,
    who: &'static str,
    credential: Option<String>,
    created: Instant,
    last: Instant,
    flash: Option<String>,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last) > IDLE || now.duration_since(self.created) > ABSOLUTE
    }
}

/// What a request learns of its session.
#[derive(Debug, Clone)]
pub struct Signed {
    pub id: String,
    pub csrf: String,
    /// `token` or `password`: how the operator signed in.
    pub who: &'static str,
    /// The operator password's stored hash at sign-in (`password` sessions): a session ends
    /// once the stored one differs (a new password set with the CLI).
    pub credential: Option<String>,
    /// A message from the previous action (shown once).
    pub flash: Option<String>,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session; the least recently used one ends when the table is full.
    pub fn create(&self, who: &'static str, credential: Option<String>) -> Signed {
        let now = Instant::now();
        let mut map = self.map();
        map.retain(|_, s| !s.expired(now));
        while map.len() >= MAX_SESSIONS {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        let id = random_token();
        let csrf = random_token();
        map.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                who,
                credential: credential.clone(),
                created: now,
                last: now,
                flash: None,
            },
        );
        Signed {
            id,
            csrf,
            who,
            credential,
            flash: None,
        }
    }

    /// The live session `id`, marked as used now (its flash message is taken).
    pub fn use_session(&self, id: &str) -> Option<Signed> {
        self.use_at(id, Instant::now())
    }

    fn use_at(&self, id: &str, now: Instant) -> Option<Signed> {
        let mut map = self.map();
        let s = map.get_mut(id)?;
        if s.expired(now) {
            map.remove(id);
            return None;
        }
        s.last = now;
        Some(Signed {
            id: id.to_string(),
            csrf: s.csrf.clone(),
            who: s.who,
            credential: s.credential.clone(),
            flash: s.flash.take(),
        })
    }

    /// The password hash a live session `id` signed in with (`Some(None)`: the token), without
    /// counting as use.
    pub fn credential(&self, id: &str) -> Option<Option<String>> {
        let now = Instant::now();
        let map = self.map();
        let s = map.get(id).filter(|s| !s.expired(now))?;
        Some(s.credential.clone())
    }

    /// Whether `id` is a live session, without counting as use (a live stream's check).
    pub fn alive(&self, id: &str) -> bool {
        let now = Instant::now();
        self.map().get(id).is_some_and(|s| !s.expired(now))
    }

    pub fn set_flash(&self, id: &str, message: String) {
        if let Some(s) = self.map().get_mut(id) {
            s.flash = Some(message);
        }
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.map().values().filter(|s| !s.expired(now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Failed sign-ins per address (an IPv4 address or an IPv6 /64, as the HTTP guard counts).
#[derive(Default)]
pub struct SignInLimit {
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl SignInLimit {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `peer` may try to sign in now; if so the try counts as a failure at once, and
    /// [`SignInLimit::succeeded`] forgets it. Checked and counted under one lock: guesses sent
    /// in parallel (the password check is slow) cannot all pass before any is counted.
    pub fn try_begin(&self, peer: IpAddr) -> bool {
        let key = umeme_http_guard::peer_key(peer);
        let now = Instant::now();
        let mut map = self.map();
        if !map.contains_key(&key) && map.len() >= SIGNIN_ADDRESSES {
            map.retain(|_, (_, since)| now.duration_since(*since) <= SIGNIN_WINDOW);
            if map.len() >= SIGNIN_ADDRESSES {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let e = map.entry(key).or_insert((0, now));
        if now.duration_since(e.1) > SIGNIN_WINDOW {
            *e = (0, now);
        }
        if e.0 >= SIGNIN_FAILURES {
            return false;
        }
        e.0 += 1;
        true
    }

    pub fn succeeded(&self, peer: IpAddr) {
        self.map().remove(&umeme_http_guard::peer_key(peer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_session_table_ends_the_least_recently_used_session() {
        let s = Sessions::default();
        let first = s.create("token", None);
        let others: Vec<_> = (1..MAX_SESSIONS).map(|_| s.create("token", None)).collect();
        assert!(s.use_session(&first.id).is_some());
        s.create("password", None);
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.alive(&first.id), "recently used: kept");
        assert!(!s.alive(&others[0].id), "least recently used: ended");
    }

    #[test]
    fn a_session_ends_after_its_idle_time_and_after_its_absolute_lifetime_however_used() {
        let s = Sessions::default();
        let a = s.create("token", None);
        let t0 = Instant::now();
        assert!(s
            .use_at(&a.id, t0 + IDLE - Duration::from_secs(1))
            .is_some());
        assert!(
            s.use_at(&a.id, t0 + IDLE * 2 - Duration::from_secs(2))
                .is_some(),
            "use renews the idle time"
        );
        assert!(s.use_at(&a.id, t0 + IDLE * 4).is_none(), "idle too long");
        assert!(!s.alive(&a.id), "and removed");
        let b = s.create("password", None);
        let t0 = Instant::now();
        let mut t = t0;
        // Used every IDLE/2 right up to the absolute lifetime: never idle, still ended.
        while t + IDLE / 2 < t0 + ABSOLUTE {
            t += IDLE / 2;
            assert!(s.use_at(&b.id, t).is_some());
        }
        assert!(s
            .use_at(&b.id, t0 + ABSOLUTE + Duration::from_secs(1))
            .is_none());
    }

    #[test]
    fn a_flash_message_is_shown_once() {
        let s = Sessions::default();
        let a = s.create("token", None);
        s.set_flash(&a.id, "done".into());
        assert_eq!(s.use_session(&a.id).unwrap().flash.as_deref(), Some("done"));
        assert_eq!(s.use_session(&a.id).unwrap().flash, None);
    }

    #[test]
    fn an_address_is_refused_after_five_failures_and_one_of_its_64_is_too() {
        let l = SignInLimit::default();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..SIGNIN_FAILURES {
            assert!(l.try_begin(a));
        }
        assert!(!l.try_begin(a));
        assert!(!l.try_begin(b), "same /64");
        assert!(l.try_begin("10.0.0.1".parse().unwrap()));
        l.succeeded(a);
        assert!(l.try_begin(b), "a success forgets the address's tries");
    }
}
