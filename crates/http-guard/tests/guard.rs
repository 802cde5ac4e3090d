//! The guarded server on real loopback TCP: timeouts close what they should, caps refuse at once,
//! and a handler still sees its peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use umeme_http_guard::{serve, Events, Limits, Refusal, Timeout};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counted {
    listener_full: AtomicUsize,
    peer_full: AtomicUsize,
    header: AtomicUsize,
    idle: AtomicUsize,
    request: AtomicUsize,
}

impl Events for Counted {
    fn refused(&self, _peer: SocketAddr, why: Refusal) {
        match why {
            Refusal::ListenerFull => &self.listener_full,
            Refusal::PeerFull => &self.peer_full,
        }
        .fetch_add(1, Ordering::SeqCst);
    }
    fn timed_out(&self, _peer: SocketAddr, what: Timeout) {
        match what {
            Timeout::Header => &self.header,
            Timeout::Idle => &self.idle,
            Timeout::Request => &self.request,
        }
        .fetch_add(1, Ordering::SeqCst);
    }
}

struct Server {
    addr: SocketAddr,
    events: Arc<Counted>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(limits: Limits) -> Server {
        let app = Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(p): ConnectInfo<SocketAddr>| async move { p.ip().to_string() }),
            )
            .route("/echo", post(|b: Bytes| async move { b }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Counted::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, limits, events.clone(), async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            events,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

fn limits(header_ms: u64, request_ms: u64, max: usize, per_ip: usize) -> Limits {
    Limits {
        header_timeout: Duration::from_millis(header_ms),
        request_timeout: Duration::from_millis(request_ms),
        max_connections: max,
        max_connections_per_ip: per_ip,
    }
}

/// Reads until the peer closes; returns what came and how long it took.
async fn read_to_close(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection in time")
        .ok();
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// A connection from `source` (any 127.0.0.0/8 address) to `to`.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((source, 0))).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test]
async fn a_connection_that_sends_half_a_header_is_closed_after_the_header_timeout() {
    let srv = Server::start(limits(300, 5_000, 8, 8)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_to_close(&mut s).await;
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert_eq!(srv.events.header.load(Ordering::SeqCst), 1);
    srv.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let srv = Server::start(limits(300, 5_000, 8, 8)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let (got, _) = read_to_close(&mut s).await;
    assert_eq!(got, "");
    srv.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let srv = Server::start(limits(300, 5_000, 8, 8)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, took) = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("127.0.0.1"), "{got}");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert_eq!(srv.events.idle.load(Ordering::SeqCst), 1);
    assert_eq!(srv.events.header.load(Ordering::SeqCst), 0);
    srv.stop().await;
}

#[tokio::test]
async fn a_request_whose_body_stalls_is_answered_408_after_the_request_timeout() {
    let srv = Server::start(limits(2_000, 300, 8, 8)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    assert_eq!(srv.events.request.load(Ordering::SeqCst), 1);
    srv.stop().await;
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_closed_at_once() {
    let srv = Server::start(limits(5_000, 5_000, 100, 3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(srv.addr).await.unwrap();
    let (got, took) = read_to_close(&mut extra).await;
    assert_eq!(got, "");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    assert_eq!(srv.events.peer_full.load(Ordering::SeqCst), 1);
    // Another address still gets in.
    let mut other = connect_from([127, 0, 0, 2], srv.addr).await;
    other
        .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut other).await;
    assert!(got.ends_with("127.0.0.2"), "{got}");
    // A slot comes back when its connection ends.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        if read_to_close(&mut s).await.0.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn connections_over_the_listener_cap_are_closed_at_once() {
    let srv = Server::start(limits(5_000, 5_000, 4, 4)).await;
    let mut held = Vec::new();
    for i in 0..4u8 {
        held.push(connect_from([127, 0, 1, 10 + i], srv.addr).await);
    }
    let mut extra = connect_from([127, 0, 1, 99], srv.addr).await;
    let (got, took) = read_to_close(&mut extra).await;
    assert_eq!(got, "");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    assert_eq!(srv.events.listener_full.load(Ordering::SeqCst), 1);
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_returns() {
    let srv = Server::start(limits(60_000, 1_000, 8, 8)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    srv.stop().await;
    let (_, took) = read_to_close(&mut s).await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
}
