//! The guarded HTTP/1.1 server behind every HTTP listener of umeme-gateway: the admin API, the
//! original firmware's legacy listener (both in the gateway) and the Daraja listener (in the
//! `source-daraja` plugin, which may not depend on the gateway crate, hence this small crate).
//!
//! `axum::serve` keeps a connection open for as long as the peer likes; on a unit with a few
//! thousand file descriptors that lets anyone who reaches a port starve the meter listener. So
//! [`serve`] adds, per listener:
//!
//! - a header-read timeout, which hyper also runs while a keep-alive connection sits idle between
//!   requests (so it is the idle timeout too);
//! - a whole-request timeout around the handler, which reads the body: a stalled body gets 408;
//! - a cap on open connections for the listener and one per source address (IPv6 by /64);
//!   a connection over either cap is closed at once, before a byte is read;
//! - accept errors (EMFILE above all) retried with a growing pause, never a busy loop.
//!
//! What happens is reported through [`Events`], so the gateway counts it in its metrics and logs
//! with `tracing`, and a plugin with `log`; [`Throttle`] keeps those log lines few under a flood.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send a request's headers, counted from the connection's start or
    /// from the end of the previous response (so also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// Time from the end of the headers to the handler's answer, body reading included.
    pub request_timeout: Duration,
    /// Open connections on this listener.
    pub max_connections: usize,
    /// Open connections from one source address (one IPv6 /64) on this listener.
    pub max_connections_per_ip: usize,
}

impl Limits {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 16;
}

/// The most connections a plugin's listener may be configured for: the gateway's descriptor
/// budget sets this many aside for each payment source.
pub const PLUGIN_MAX_CONNECTIONS: usize = Limits::DEFAULT_MAX_CONNECTIONS;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: Self::DEFAULT_MAX_CONNECTIONS_PER_IP,
        }
    }
}

/// Why a connection was closed right after it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has `max_connections` open.
    ListenerFull,
    /// The source address has `max_connections_per_ip` open.
    PeerFull,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::PeerFull => "peer_full",
        }
    }
}

/// Which timeout closed a connection or answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// No complete request head in time on a new connection.
    Header,
    /// A keep-alive connection that had served requests sent no complete new head in time:
    /// usually a client keeping its connection open, so not worth a warning.
    Idle,
    /// The request's body or its handler took too long; answered 408 and closed.
    Request,
}

impl Timeout {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::Idle => "idle",
            Timeout::Request => "request",
        }
    }
}

/// What a listener reports; every method may be called from any tokio worker and must not block.
pub trait Events: Send + Sync + 'static {
    fn refused(&self, _peer: SocketAddr, _why: Refusal) {}
    fn timed_out(&self, _peer: SocketAddr, _what: Timeout) {}
    /// `accept` failed (EMFILE, ENFILE, ENOBUFS…); the listener tries again after `retry_in`.
    fn accept_failed(&self, _error: &io::Error, _retry_in: Duration) {}
}

/// Lets one log line through per interval and counts the ones it held back.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` when this one is to be held back.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// Open connections per source address.
#[derive(Default)]
struct PerPeer {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one of a source address's connection slots until dropped.
struct PeerSlot {
    peers: Arc<PerPeer>,
    key: IpAddr,
}

impl PerPeer {
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let key = peer_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            key,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address a per-peer cap counts against: IPv4 as is, IPv6 by its /64 (one subscriber's
/// prefix, which holds more addresses than any cap). Public so the meter port's per-address
/// limits count the same way.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// First and longest pause after a failed `accept`.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// Largest request head and read buffer per connection.
const MAX_BUF: usize = 64 * 1024;

/// Serves `app` on `listener` under `limits` until `shutdown` resolves, then lets open
/// connections finish their current request (at most `request_timeout`) and returns.
///
/// The handler can read the peer with `axum::extract::ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    events: Arc<dyn Events>,
    shutdown: impl Future<Output = ()>,
) {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let peers = Arc::new(PerPeer::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut backoff = ACCEPT_BACKOFF.0;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = ACCEPT_BACKOFF.0;
                a
            }
            Err(e) => {
                events.accept_failed(&e, backoff);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            events.refused(peer, Refusal::ListenerFull);
            drop(stream);
            continue;
        };
        let Some(peer_slot) = peers.try_take(peer.ip(), limits.max_connections_per_ip) else {
            events.refused(peer, Refusal::PeerFull);
            drop(stream);
            continue;
        };
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            events.clone(),
            stop_rx.clone(),
            (slot, peer_slot),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every slot back means every connection ended; bounded so a stop never hangs.
    let grace = limits.request_timeout + Duration::from_secs(1);
    let _ = tokio::time::timeout(grace, slots.acquire_many(max as u32)).await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    events: Arc<dyn Events>,
    mut stop: watch::Receiver<bool>,
    _slots: (OwnedSemaphorePermit, PeerSlot),
) {
    let _ = stream.set_nodelay(true);
    let request_timeout = limits.request_timeout;
    let ev = events.clone();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        count.fetch_add(1, Ordering::Relaxed);
        req.extensions_mut().insert(ConnectInfo(peer));
        let call = app.clone().oneshot(req);
        let ev = ev.clone();
        async move {
            match tokio::time::timeout(request_timeout, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    ev.timed_out(peer, Timeout::Request);
                    Ok(request_timeout_answer())
                }
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async move { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(request_timeout, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            let what = match served.load(Ordering::Relaxed) {
                0 => Timeout::Header,
                _ => Timeout::Idle,
            };
            events.timed_out(peer, what);
        }
    }
}

fn request_timeout_answer() -> Response<axum::body::Body> {
    let mut r = Response::new(axum::body::Body::from(
        r#"{"error":"the request took too long"}"#,
    ));
    *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The body may be half read: the connection cannot carry another request.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_peers_count_by_their_64_prefix_and_ipv4_by_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(peer_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        let t0 = Throttle::new(Duration::ZERO);
        assert_eq!(t0.allow(), Some(0));
        assert_eq!(t0.allow(), Some(0));
    }

    #[test]
    fn a_peer_slot_is_given_back_when_dropped() {
        let peers = Arc::new(PerPeer::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let one = peers.try_take(ip, 1).expect("first slot");
        assert!(peers.try_take(ip, 1).is_none());
        drop(one);
        assert!(peers.try_take(ip, 1).is_some());
        assert!(peers.open.lock().unwrap().is_empty());
    }
}
