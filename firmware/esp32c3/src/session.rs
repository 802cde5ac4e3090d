//! MQTT 3.1.1 sessions to the gateway over embassy-net TCP, with meter-core's packet codec.
//!
//! One session: CONNECT (client id = username = meter number, password = secret), SUBSCRIBE
//! `{prefix}/{meter}/command/#`, then replay every unacknowledged report oldest first and keep
//! up to `WINDOW` QoS 1 publishes in flight. A report leaves the outbox only on its PUBACK (or a
//! balance command's `ackSeq`); anything unexpected ends the session and the next one replays.
//!
//! Besides the reports: the power limiter's trips go out as `power_trip` statuses (QoS 1, kept
//! until their PUBACK and sent again after a reconnect), a refused `command/config` is answered
//! with an `error` status, the relay is applied again after every command, and the OTA state
//! machine's actions (`crate::updates`) are carried out in order.

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
use meter_core::command::CommandError;
use meter_core::identity::MAX_METER_ID;
use meter_core::limits::{self, Trip};
use meter_core::meter::{Applied, MeterCommandError};
use meter_core::mqtt::{self, Connect, Incoming, QoS};
use meter_core::ota::{Action, CHUNK_HEADER};
use meter_core::report::max_v2_len;

use crate::identity;
use crate::link::Link;
use crate::updates::Updates;
use crate::{change_and_save, config, persisted_reports, with_meter, APPLY_RELAY, REPORT_READY};

/// Raised once when the balance falls to the low threshold: publish a `low_balance` status.
pub static LOW_BALANCE: Signal<CriticalSectionRawMutex, ()> = Signal::new();

/// QoS 1 reports in flight at once.
const WINDOW: usize = 4;
const KEEP_ALIVE_S: u16 = 60;
/// The MQTT receive buffer: an OTA chunk's publish (`MAX_OTA_CHUNK` bytes, its 8-byte header,
/// a topic of at most 96 bytes, 2 bytes of topic length, up to 5 of fixed header) fits whole.
const RX: usize = 1152;
const TX: usize = 1024;
const TOPIC_MAX: usize = 96;
/// The largest OTA chunk this meter asks for (the gateway's default `chunk_size` is 1024).
pub const MAX_OTA_CHUNK: u16 = (RX - 5 - 2 - TOPIC_MAX - CHUNK_HEADER) as u16;
/// After the OTA machine says reset: wait this long at most for the last status's PUBACK.
const RESET_GRACE: Duration = Duration::from_secs(5);

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
    consumption: String<TOPIC_MAX>,
    status: String<TOPIC_MAX>,
    commands: String<TOPIC_MAX>,
    command_prefix: String<TOPIC_MAX>,
    ota_request: String<TOPIC_MAX>,
    ota_status: String<TOPIC_MAX>,
}

/// A power trip taken from the meter, until the gateway acknowledged its status.
struct PendingTrip {
    trip: Trip,
    timestamp_ms: u64,
    /// Its publish on this session, if sent.
    pkid: Option<u16>,
}

fn topics() -> Topics {
    let mut t = Topics {
        consumption: String::new(),
        status: String::new(),
        commands: String::new(),
        command_prefix: String::new(),
        ota_request: String::new(),
        ota_status: String::new(),
    };
    let (p, m) = (config::TOPIC_PREFIX, identity::get().meter_id);
    // Meter numbers have at most 32 bytes (`identity`); 96 cannot overflow.
    let _ = write!(t.consumption, "{p}/{m}/consumption");
    let _ = write!(t.status, "{p}/{m}/status");
    let _ = write!(t.commands, "{p}/{m}/command/#");
    let _ = write!(t.command_prefix, "{p}/{m}/command/");
    let _ = write!(t.ota_request, "{p}/{m}/ota/request");
    let _ = write!(t.ota_status, "{p}/{m}/ota/status");
    t
}

/// Reconnects forever: 1 s after a clean end, backing off to 60 s while the gateway is away.
pub async fn run_forever(stack: Stack<'static>, updates: &mut Updates) -> ! {
    let broker =
        Ipv4Addr::from_str(identity::get().gateway_host).unwrap_or(Ipv4Addr::new(192, 168, 4, 1));
    let mut rx = [0u8; RX];
    let mut tx = [0u8; TX];
    let mut backoff = Duration::from_secs(1);
    let mut trip: Option<PendingTrip> = None;
    loop {
        stack.wait_config_up().await;
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        socket.set_timeout(Some(Duration::from_secs(u64::from(KEEP_ALIVE_S) * 2)));
        let started = Instant::now();
        let end = match socket.connect((broker, config::GATEWAY_PORT)).await {
            Ok(()) => on(&mut socket, updates, &mut trip).await,
            Err(e) => {
                println!("tcp connect to {broker}: {e:?}");
                SessionEnd::Tcp
            }
        };
        if updates.reset_pending() {
            // The boot slot is switched; the status could not wait for its PUBACK.
            reboot_into_update().await;
        }
        updates.session_ended(Instant::now());
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
async fn on(
    socket: &mut TcpSocket<'_>,
    updates: &mut Updates,
    trip: &mut Option<PendingTrip>,
) -> SessionEnd {
    match session(socket, updates, trip).await {
        Err(end) => end,
        Ok(never) => match never {},
    }
}

/// A session on a connected socket: the TLS handshake first (the record buffers live in this
/// future, inside `run_forever`'s).
#[cfg(gateway_tls)]
async fn on(
    socket: &mut TcpSocket<'_>,
    updates: &mut Updates,
    trip: &mut Option<PendingTrip>,
) -> SessionEnd {
    let mut read = [0u8; crate::link::TLS_READ];
    let mut write = [0u8; crate::link::TLS_WRITE];
    let socket = core::cell::RefCell::new(socket);
    match crate::link::open(&socket, &mut read, &mut write).await {
        Ok(mut tls) => match session(&mut tls, updates, trip).await {
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

/// The next packet id for a QoS 1 publish (1 is the SUBSCRIBE's).
fn bump(pkid: &mut u16) -> u16 {
    *pkid = if *pkid == u16::MAX { 2 } else { *pkid + 1 };
    *pkid
}

/// Publishes `payload` on `topic`.
async fn publish<L: Link>(
    socket: &mut L,
    out: &mut [u8],
    topic: &str,
    payload: &[u8],
    qos: QoS,
    pkid: u16,
) -> Result<(), SessionEnd> {
    let n = mqtt::publish(out, topic, payload, qos, false, pkid, false)
        .map_err(|_| SessionEnd::Protocol)?;
    send(socket, &out[..n]).await
}

/// Saves the meter's state (the energy since the last report too) and boots the new slot.
async fn reboot_into_update() -> ! {
    change_and_save(|_| ((), true)).await;
    println!("ota: resetting into the new image");
    esp_hal::system::software_reset()
}

async fn session<L: Link>(
    socket: &mut L,
    updates: &mut Updates,
    trip: &mut Option<PendingTrip>,
) -> Result<core::convert::Infallible, SessionEnd> {
    let t = topics();
    let id = identity::get();
    let mut out = [0u8; 512];
    let mut buf = [0u8; RX];
    let mut have = 0usize;

    let n = mqtt::connect(
        &mut out,
        &Connect {
            client_id: id.meter_id,
            username: id.meter_id,
            password: id.secret.as_bytes(),
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
    println!("mqtt: connected to the gateway as {}", id.meter_id);

    // (packet id, report seq) of QoS 1 reports awaiting PUBACK.
    let mut in_flight: heapless::Vec<(u16, u32), WINDOW> = heapless::Vec::new();
    let mut next_pkid: u16 = 2;
    let mut last_sent = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    // A trip sent on an earlier session without its PUBACK goes again.
    if let Some(p) = trip.as_mut() {
        p.pkid = None;
    }
    // The OTA machine said reset: after the PUBACK of this status, or at the deadline.
    let mut reset: Option<(Option<u16>, Instant)> = None;
    let mut last_status: Option<u16> = None;
    loop {
        // Fill the window from the outbox, with reports already on flash.
        let batch: heapless::Vec<_, WINDOW> = persisted_reports(WINDOW - in_flight.len()).await;
        for r in batch.iter() {
            let mut json = [0u8; max_v2_len(64)];
            let Ok(len) = r.encode_v2(id.meter_id, &mut json) else {
                return Err(SessionEnd::Protocol);
            };
            let pkid = bump(&mut next_pkid);
            publish(
                socket,
                &mut out,
                &t.consumption,
                &json[..len],
                QoS::AtLeastOnce,
                pkid,
            )
            .await?;
            let _ = in_flight.push((pkid, r.seq));
            last_sent = Instant::now();
        }
        if LOW_BALANCE.try_take().is_some() {
            let mut json: String<224> = String::new();
            let balance = with_meter(|m| m.balance_wh()).unwrap_or(0);
            let _ = write!(
                json,
                r#"{{"meterNo":"{}","status":"low_balance","message":"balance low","balance":{},"loadOn":true,"timestamp":{}}}"#,
                id.meter_id,
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

        // A power trip: taken from the meter (and the state saved) only now that it can go out.
        if trip.is_none() {
            *trip = change_and_save(|m| {
                let taken = m.take_trip().map(|trip| PendingTrip {
                    trip,
                    timestamp_ms: m.clock_ms().unwrap_or(Instant::now().as_millis()),
                    pkid: None,
                });
                let save = taken.is_some();
                (taken, save)
            })
            .await;
        }
        if let Some(p) = trip.as_mut().filter(|p| p.pkid.is_none()) {
            let mut json = [0u8; limits::max_trip_status_len(MAX_METER_ID)];
            let n = p
                .trip
                .encode_status(id.meter_id, p.timestamp_ms, &mut json)
                .map_err(|_| SessionEnd::Protocol)?;
            let pkid = bump(&mut next_pkid);
            publish(
                socket,
                &mut out,
                &t.status,
                &json[..n],
                QoS::AtLeastOnce,
                pkid,
            )
            .await?;
            p.pkid = Some(pkid);
            println!(
                "power trip reported ({} in 30 min{})",
                p.trip.trips,
                if p.trip.locked_out {
                    ", locked out"
                } else {
                    ""
                }
            );
        }

        // The OTA machine's actions, in order.
        while reset.is_none() {
            let now = Instant::now();
            let Some(action) = updates.next(now) else {
                break;
            };
            match action {
                Action::Request { offset, len } => {
                    let mut json = [0u8; 96];
                    let Some(n) = updates.request_json(offset, len, &mut json) else {
                        continue;
                    };
                    publish(
                        socket,
                        &mut out,
                        &t.ota_request,
                        &json[..n],
                        QoS::AtMostOnce,
                        0,
                    )
                    .await?;
                    updates.asked(now);
                }
                Action::Report(status) => {
                    let mut json = [0u8; 160];
                    let Some(n) = status.to_json(&mut json) else {
                        continue;
                    };
                    let pkid = bump(&mut next_pkid);
                    publish(
                        socket,
                        &mut out,
                        &t.ota_status,
                        &json[..n],
                        QoS::AtLeastOnce,
                        pkid,
                    )
                    .await?;
                    last_status = Some(pkid);
                    println!("ota: {} {}", status.phase.name(), status.version);
                }
                Action::Backoff => updates.busy(now),
                Action::Reset => {
                    updates.set_reset_pending();
                    reset = Some((last_status, now + RESET_GRACE));
                }
            }
        }
        if let Some((_, deadline)) = reset {
            if Instant::now() >= deadline {
                reboot_into_update().await;
            }
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
                        // The first acknowledged report confirms an image on trial.
                        updates.on_report_acked();
                    } else if trip.as_ref().is_some_and(|p| p.pkid == Some(pkid)) {
                        *trip = None;
                    } else if reset.is_some_and(|(p, _)| p == Some(pkid)) {
                        reboot_into_update().await;
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
                    match leaf {
                        "ota" => updates.on_offer(payload),
                        "ota/chunk" => updates.on_chunk(payload),
                        _ => {
                            let r = change_and_save(|m| {
                                let r = m.on_command(leaf, payload);
                                let changed = r.is_ok();
                                (r, changed)
                            })
                            .await;
                            // A balance, mayCut, relay or config command can change the relay.
                            APPLY_RELAY.signal(());
                            match r {
                                Ok(Applied::Balance { balance_wh, acked }) => {
                                    println!("balance {balance_wh} Wh ({acked} reports confirmed)")
                                }
                                Ok(other) => println!("command {leaf}: {other:?}"),
                                Err(MeterCommandError::Parse(
                                    e @ CommandError::ConfigRefused { .. },
                                )) => {
                                    println!("command {leaf} refused: {e}");
                                    let mut json = [0u8; 256];
                                    let n = limits::encode_error_status(id.meter_id, e, &mut json)
                                        .map_err(|_| SessionEnd::Protocol)?;
                                    let pkid = bump(&mut next_pkid);
                                    publish(
                                        socket,
                                        &mut out,
                                        &t.status,
                                        &json[..n],
                                        QoS::AtLeastOnce,
                                        pkid,
                                    )
                                    .await?;
                                }
                                Err(e) => println!("command {leaf} ignored: {e}"),
                            }
                        }
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
