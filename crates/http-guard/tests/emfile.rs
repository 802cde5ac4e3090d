//! A listener out of file descriptors: `accept` fails with EMFILE, and the guard must pause and
//! retry (growing pauses, never a busy loop), then serve again once descriptors are free.
//! Its own test binary, because it lowers the whole process's open-file limit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use umeme_http_guard::{serve, Events, Limits};

#[derive(Default)]
struct AcceptErrors(AtomicUsize);

impl Events for AcceptErrors {
    fn accept_failed(&self, error: &std::io::Error, _retry_in: Duration) {
        assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[allow(clippy::unnecessary_cast)] // rlim_t is 32 bits on 32-bit ARM
fn set_soft_nofile(n: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let old = lim.rlim_cur as u64;
        lim.rlim_cur = n as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        old
    }
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn get_ok(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[test]
fn accept_failing_with_emfile_backs_off_instead_of_spinning_and_serving_resumes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let events = Arc::new(AcceptErrors::default());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        header_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let app = Router::new().route("/", get(|| async { "ok" }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(serve(listener, app, limits, events.clone(), async {
        let _ = stopped.await;
    }));
    assert!(get_ok(addr));

    // Leave a handful of descriptors, then use them up with idle connections.
    let old = set_soft_nofile(open_fds() + 6);
    let mut held = Vec::new();
    for _ in 0..100 {
        match TcpStream::connect(addr) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.0.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "accept never failed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Out of descriptors for a whole second: a handful of retries, not thousands.
    let before = events.0.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(1));
    let retries = events.0.load(Ordering::SeqCst) - before;
    assert!(retries <= 10, "{retries} accept retries in one second");

    drop(held);
    set_soft_nofile(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get_ok(addr) {
        assert!(Instant::now() < deadline, "the listener never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), task).await })
        .expect("serve returns")
        .unwrap();
}
