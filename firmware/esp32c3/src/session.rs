//! MQTT 3.1.1 sessions to the gateway over embassy-net TCP, with meter-core's packet codec.
//!
//! One session: CONNECT (client id = username = meter number, password = secret), SUBSCRIBE
//! `{prefix}/{meter}/command/#`, then replay every unacknowledged report oldest first and keep
//! up to `WINDOW` QoS 1 publishes in flight. A report leaves the outbox only on its PUBACK (or a
//! balance command's `ackSeq`); anything unexpected ends the session and the next one replays.

use core::fmt::Write as _;
use core::net::Ipv4Addr;
use core::str::FromStr;

use embassy_futures::select::{select3, Either3};
use embassy_net::tcp::TcpSocket;
use embassy_net::Stack;
use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::signal::Signal;
use embassy_time::{with_timeout, Duration, Instant, Timer};
use esp_println::println;
use heapless::String;
use meter_core::meter::Applied;
use meter_core::mqtt::{self, Connect, Incoming, QoS};
use meter_core::report::max_v2_len;

use crate::link::Link;
use crate::{change_and_save, config, persisted_reports, with_meter, REPORT_READY};

/// Raised once when the balance falls to the low threshold: publish a `low_balance` status.
pub static LOW_BALANCE: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// QoS 1 reports in flight at once.
const WINDOW: usize = 4;
const KEEP_ALIVE_S: u16 = 60;
const RX: usize = 1024;
const TX: usize = 1024;

#[derive(Debug, Clone, Copy)]
enum SessionEnd {
    Tcp,
    /// The TLS handshake failed: a gateway without the site CA's certificate for
    /// `GATEWAY_TLS_NAME`, or not speaking TLS on that port.
    #[cfg(gateway_tls)]
    Tls,
    Refused(u8),
    Protocol,
    Timeout,
}

struct Topics {
    consumption: String<96>,
    status: String<96>,
    commands: String<96>,
    command_prefix: String<96>,
}

fn topics() -> Topics {
    let mut t = Topics {
        consumption: String::new(),
        status: String::new(),
        commands: String::new(),
        command_prefix: String::new(),
    };
    let (p, m) = (config::TOPIC_PREFIX, config::METER_ID);
    // Meter numbers are short; 96 bytes cannot overflow for valid ids.
    let _ = write!(t.consumption, "{p}/{m}/consumption");
    let _ = write!(t.status, "{p}/{m}/status");
    let _ = write!(t.commands, "{p}/{m}/command/#");
    let _ = write!(t.command_prefix, "{p}/{m}/command/");
    t
}

/// Reconnects forever: 1 s after a clean end, backing off to 60 s while the gateway is away.
pub async fn run_forever(stack: Stack<'static>) -> ! {
    let broker = Ipv4Addr::from_str(config::GATEWAY_HOST).unwrap_or(Ipv4Addr::new(192, 168, 4, 1));
    let mut rx = [0u8; RX];
    let mut tx = [0u8; TX];
    let mut backoff = Duration::from_secs(1);
    loop {
        stack.wait_config_up().await;
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        socket.set_timeout(Some(Duration::from_secs(u64::from(KEEP_ALIVE_S) * 2)));
        let started = Instant::now();
        let end = match socket.connect((broker, config::GATEWAY_PORT)).await {
            Ok(()) => on(&mut socket).await,
            Err(e) => {
                println!("tcp connect to {broker}: {e:?}");
                SessionEnd::Tcp
            }
        };
        if let SessionEnd::Refused(code) = end {
            // 4/5: wrong secret or unknown meter; provision it in the gateway.
            println!("gateway refused the meter (code {code})");
        }
        socket.abort();
        let _ = with_timeout(Duration::from_secs(1), socket.flush()).await;
        println!("mqtt session ended: {end:?}; retry in {backoff:?}");
        Timer::after(backoff).await;
        // A session that lasted a while resets the backoff.
        backoff = if started.elapsed() > Duration::from_secs(120) {
            Duration::from_secs(1)
        } else {
            (backoff * 2).min(Duration::from_secs(60))
        };
    }
}

/// A session on a connected socket: plain MQTT.
#[cfg(not(gateway_tls))]
async fn on(socket: &mut TcpSocket<'_>) -> SessionEnd {
    match session(socket).await {
        Err(end) => end,
        Ok(never) => match never {},
    }
}

/// A session on a connected socket: the TLS handshake first (the record buffers live in this
/// future, inside `run_forever`'s).
#[cfg(gateway_tls)]
async fn on(socket: &mut TcpSocket<'_>) -> SessionEnd {
    let mut read = [0u8; crate::link::TLS_READ];
    let mut write = [0u8; crate::link::TLS_WRITE];
    let socket = core::cell::RefCell::new(socket);
    match crate::link::open(&socket, &mut read, &mut write).await {
        Ok(mut tls) => match session(&mut tls).await {
            Err(end) => end,
            Ok(never) => match never {},
        },
        Err(e) => {
            println!("tls to {}: {e:?}", config::GATEWAY_TLS_NAME);
            SessionEnd::Tls
        }
    }
}

async fn send<L: Link>(socket: &mut L, bytes: &[u8]) -> Result<(), SessionEnd> {
    socket.write_all(bytes).await.map_err(|_| SessionEnd::Tcp)?;
    socket.push().await.map_err(|_| SessionEnd::Tcp)
}

async fn session<L: Link>(socket: &mut L) -> Result<core::convert::Infallible, SessionEnd> {
    let t = topics();
    let mut out = [0u8; 512];
    let mut buf = [0u8; RX];
    let mut have = 0usize;

    let n = mqtt::connect(
        &mut out,
        &Connect {
            client_id: config::METER_ID,
            username: config::METER_ID,
            password: config::METER_SECRET.as_bytes(),
            keep_alive_s: KEEP_ALIVE_S,
            clean_session: true,
            will: Some((t.status.as_str(), b"offline")),
        },
    )
    .map_err(|_| SessionEnd::Protocol)?;
    send(socket, &out[..n]).await?;
    match with_timeout(
        Duration::from_secs(10),
        next_packet(socket, &mut buf, &mut have),
    )
    .await
    {
        Ok(Ok((Incoming::ConnAck { code: 0, .. }, used))) => consume(&mut buf, &mut have, used),
        Ok(Ok((Incoming::ConnAck { code, .. }, _))) => return Err(SessionEnd::Refused(code)),
        Ok(Ok(_)) | Ok(Err(_)) => return Err(SessionEnd::Protocol),
        Err(_) => return Err(SessionEnd::Timeout),
    }
    let n = mqtt::subscribe(&mut out, 1, &t.commands, QoS::AtLeastOnce)
        .map_err(|_| SessionEnd::Protocol)?;
    send(socket, &out[..n]).await?;
    with_meter(|m| m.on_connected());
    println!("mqtt: connected to the gateway as {}", config::METER_ID);

    // (packet id, report seq) of QoS 1 reports awaiting PUBACK.
    let mut in_flight: heapless::Vec<(u16, u32), WINDOW> = heapless::Vec::new();
    let mut next_pkid: u16 = 2;
    let mut last_sent = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    loop {
        // Fill the window from the outbox, with reports already on flash.
        let batch: heapless::Vec<_, WINDOW> = persisted_reports(WINDOW - in_flight.len()).await;
        for r in batch.iter() {
            let mut json = [0u8; max_v2_len(64)];
            let Ok(len) = r.encode_v2(config::METER_ID, &mut json) else {
                return Err(SessionEnd::Protocol);
            };
            next_pkid = if next_pkid == u16::MAX {
                2
            } else {
                next_pkid + 1
            };
            let n = mqtt::publish(
                &mut out,
                &t.consumption,
                &json[..len],
                QoS::AtLeastOnce,
                false,
                next_pkid,
                false,
            )
            .map_err(|_| SessionEnd::Protocol)?;
            send(socket, &out[..n]).await?;
            let _ = in_flight.push((next_pkid, r.seq));
            last_sent = Instant::now();
        }
        if LOW_BALANCE.try_take().is_some() {
            let mut json: String<160> = String::new();
            let balance = with_meter(|m| m.balance_wh()).unwrap_or(0);
            let _ = write!(
                json,
                r#"{{"meterNo":"{}","status":"low_balance","message":"balance low","balance":{},"loadOn":true,"timestamp":{}}}"#,
                config::METER_ID,
                balance as f64 / 1000.0,
                Instant::now().as_millis()
            );
            let n = mqtt::publish(
                &mut out,
                &t.status,
                json.as_bytes(),
                QoS::AtMostOnce,
                false,
                0,
                false,
            )
            .map_err(|_| SessionEnd::Protocol)?;
            send(socket, &out[..n]).await?;
        }

        // Keep-alive: ping after half the interval of silence, give up after the full one.
        if let Some(at) = ping_sent {
            if at.elapsed() > Duration::from_secs(u64::from(KEEP_ALIVE_S)) {
                return Err(SessionEnd::Timeout);
            }
        } else if last_sent.elapsed() > Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2) {
            let n = mqtt::pingreq(&mut out).map_err(|_| SessionEnd::Protocol)?;
            send(socket, &out[..n]).await?;
            ping_sent = Some(Instant::now());
            last_sent = Instant::now();
        }

        // Wait for bytes, a report or the tick; read only once bytes are there, outside the
        // select, so no read is ever cancelled halfway (see `Link::readable`).
        let ready = select3(
            socket.readable(),
            REPORT_READY.wait(),
            Timer::after(Duration::from_secs(1)),
        )
        .await;
        match ready {
            Either3::First(()) => match socket.read(&mut buf[have..]).await {
                Ok(0) | Err(_) => return Err(SessionEnd::Tcp),
                Ok(n) => have += n,
            },
            Either3::Second(()) | Either3::Third(()) => continue,
        }
        // Handle every complete packet in the buffer (bounded by the bytes received).
        loop {
            let (packet, used) = match mqtt::decode(&buf[..have], RX) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => return Err(SessionEnd::Protocol),
            };
            let mut ack: Option<u16> = None;
            match packet {
                Incoming::PubAck { pkid } => {
                    if let Some(i) = in_flight.iter().position(|(p, _)| *p == pkid) {
                        let (_, seq) = in_flight.swap_remove(i);
                        with_meter(|m| m.on_puback(seq));
                    }
                }
                Incoming::Publish {
                    topic,
                    payload,
                    pkid,
                    ..
                } => {
                    ack = pkid;
                    let leaf = topic.strip_prefix(t.command_prefix.as_str()).unwrap_or("");
                    let r = change_and_save(|m| {
                        let r = m.on_command(leaf, payload);
                        let changed = r.is_ok();
                        (r, changed)
                    })
                    .await;
                    match r {
                        Ok(Applied::Balance { balance_wh, acked }) => {
                            println!("balance {balance_wh} Wh ({acked} reports confirmed)")
                        }
                        Ok(other) => println!("command {leaf}: {other:?}"),
                        Err(e) => println!("command {leaf} ignored: {e}"),
                    }
                }
                Incoming::PingResp => ping_sent = None,
                Incoming::SubAck { granted, .. } if granted > 1 => {
                    return Err(SessionEnd::Refused(granted))
                }
                Incoming::SubAck { .. } | Incoming::ConnAck { .. } | Incoming::Other(_) => {}
            }
            consume(&mut buf, &mut have, used);
            if let Some(pkid) = ack {
                let n = mqtt::puback(&mut out, pkid).map_err(|_| SessionEnd::Protocol)?;
                send(socket, &out[..n]).await?;
            }
        }
    }
}

/// Reads until one whole packet is buffered.
async fn next_packet<'b, L: Link>(
    socket: &mut L,
    buf: &'b mut [u8; RX],
    have: &mut usize,
) -> Result<(Incoming<'b>, usize), SessionEnd> {
    // Bounded: every pass reads at least one byte into a buffer of RX bytes.
    for _ in 0..=RX {
        if mqtt::decode(&buf[..*have], RX)
            .map_err(|_| SessionEnd::Protocol)?
            .is_some()
        {
            break;
        }
        match socket.read(&mut buf[*have..]).await {
            Ok(0) | Err(_) => return Err(SessionEnd::Tcp),
            Ok(n) => *have += n,
        }
    }
    mqtt::decode(&buf[..*have], RX)
        .map_err(|_| SessionEnd::Protocol)?
        .ok_or(SessionEnd::Protocol)
}

fn consume(buf: &mut [u8; RX], have: &mut usize, used: usize) {
    buf.copy_within(used..*have, 0);
    *have -= used;
}
