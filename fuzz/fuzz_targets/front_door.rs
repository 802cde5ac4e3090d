//! The meter front door: raw bytes on a real TCP connection to the broker of an in-process
//! gateway, in two connection states chosen by the first input byte:
//! - even: from the first byte of the connection (CONNECT parsing, refusals, spec checks);
//! - odd: after a good CONNECT as a provisioned meter and its CONNACK (PUBLISH, SUBSCRIBE,
//!   PINGREQ, … from an authenticated meter: topic checks, payloads, the ledger behind them).
//!
//! A panic anywhere in the gateway aborts the process (libFuzzer's panic hook), so a crash in a
//! connection task is found even though it runs on another thread. Every 128 inputs a fresh
//! meter must still get CONNACK 0: the broker is not wedged.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

const METER: &str = "METER001";
const SECRET: &str = "fuzz-secret-0001";

struct Target {
    broker: SocketAddr,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(start)
}

fn start() -> Target {
    let dir = std::env::temp_dir().join(format!("umeme-fuzz-door-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let toml = format!(
        "[gateway]\nid = \"fuzz\"\ndata_dir = \"{d}\"\nplugin_dir = \"{d}\"\n\
         [broker]\nlisten = \"127.0.0.1:0\"\nconnect_timeout_ms = 1000\n\
         [api]\nlisten = \"127.0.0.1:0\"\n[ledger]\ncommit_delay = \"0ms\"\n",
        d = dir.display()
    );
    let file = dir.join("gateway.toml");
    std::fs::write(&file, toml).expect("write config");
    let config = umeme_gateway::config::Config::load(Some(&file)).expect("fuzz config");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let gw = umeme_gateway::daemon::Gateway::start(config)
                .await
                .expect("gateway starts");
            tx.send((gw.broker_addr.expect("plain meter port"), gw.api_addr))
                .expect("send addresses");
            std::future::pending::<()>().await;
            drop(gw);
        });
    });
    let (broker, api) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("gateway up");
    add_meter(api);
    Target { broker }
}

/// `POST /api/meters` on the admin API (loopback, no token configured).
fn add_meter(api: SocketAddr) {
    let body = format!("{{\"id\":\"{METER}\",\"secret\":\"{SECRET}\"}}");
    let mut s = TcpStream::connect(api).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /api/meters HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "meter not added: {answer}"
    );
}

fn connect_packet() -> Vec<u8> {
    let field = |v: &mut Vec<u8>, s: &str| {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 60]);
    field(&mut body, METER);
    field(&mut body, METER);
    field(&mut body, SECRET);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Connects as the meter and reads its CONNACK: `Some(return code)`.
fn connect_as_meter(broker: SocketAddr) -> Option<(TcpStream, u8)> {
    let mut s = TcpStream::connect(broker).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(&connect_packet()).ok()?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).ok()?;
    Some((s, connack[3]))
}

fn drain(mut s: TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&state, bytes)) = data.split_first() else {
        return;
    };
    if bytes.len() > 16 * 1024 {
        return;
    }
    let t = target();
    static RUNS: AtomicU64 = AtomicU64::new(0);
    if RUNS.fetch_add(1, Ordering::Relaxed) % 128 == 0 {
        let (_, code) = connect_as_meter(t.broker).expect("the broker still answers a CONNECT");
        assert_eq!(code, 0, "a good CONNECT is still accepted");
    }
    let stream = if state % 2 == 0 {
        TcpStream::connect(t.broker).expect("connect")
    } else {
        match connect_as_meter(t.broker) {
            Some((s, 0)) => s,
            // Backoff or a session takeover in flight: nothing to fuzz in this state now.
            _ => return,
        }
    };
    let mut s = stream;
    let _ = s.write_all(bytes);
    drain(s);
});
