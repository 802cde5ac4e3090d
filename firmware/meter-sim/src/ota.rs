//! Meters that take firmware updates: meter-core's OTA state machine on a simulated two-slot
//! board (`meter_core::ota::sim`), each on its own thread and its own blocking MQTT 3.1.1
//! connection, reporting consumption before, during and after its update. Faults can be
//! induced: a dropped connection mid-download, a corrupted chunk, a power cut during a flash
//! write. A meter ends on the new version, rolled back or failed, or bricked (its board cannot
//! boot: the simulator's measure of a broken update).
//!
//! Used by `gateway/tests/ota.rs` (200 meters against the real gateway binary) and by
//! `meter-sim --ota-public-key` against a running gateway.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use meter_core::ota::sim::{make_image, RamBoard};
use meter_core::ota::{Action, Ota, Phase};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::ConnectReturnCode;

/// The version of the simulated factory image.
pub const FACTORY_VERSION: &str = "1.0.0";
/// Bytes of one simulated slot.
pub const SLOT_BYTES: usize = 64 * 1024;
/// Wait for a chunk before asking again.
const CHUNK_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause after "busy, ask later".
const BUSY_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum OtaSimError {
    #[error("{meter}: {what}")]
    Meter { meter: String, what: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The connection drops without DISCONNECT past half the image.
    Drop,
    /// One chunk arrives with a flipped byte.
    Corrupt,
    /// The power goes during a flash write.
    PowerLoss,
}

impl Fault {
    /// Every tenth meter gets a fault, the three kinds in turn.
    pub fn for_index(i: usize) -> Fault {
        match (i % 10, (i / 10) % 3) {
            (0, 0) => Fault::Drop,
            (0, 1) => Fault::Corrupt,
            (0, _) => Fault::PowerLoss,
            _ => Fault::None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OtaMeterResult {
    pub id: String,
    pub fault: Fault,
    /// The version running at the end (empty when bricked).
    pub version: String,
    /// The board could not boot.
    pub bricked: bool,
    /// The energy register of the first report (the gateway's baseline) and of the last one.
    pub first_energy: u64,
    pub last_energy: u64,
    pub resets: u32,
    /// `downloading` statuses sent: one per start or resume of a download.
    pub downloads: u32,
}

/// A small blocking MQTT 3.1.1 client: what a meter's firmware does, nothing more.
struct Link {
    stream: TcpStream,
    buf: BytesMut,
}

impl Link {
    fn connect(
        addr: SocketAddr,
        id: &str,
        secret: &str,
    ) -> std::io::Result<(Link, ConnectReturnCode)> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut link = Link {
            stream,
            buf: BytesMut::new(),
        };
        let mut c = Connect::new(id);
        c.keep_alive = 60;
        c.clean_session = true;
        c.login = Some(Login::new(id, secret));
        link.send(Packet::Connect(c))?;
        match link.recv(Duration::from_secs(30))? {
            Some(Packet::ConnAck(a)) => Ok((link, a.code)),
            _ => Err(std::io::Error::other("no CONNACK")),
        }
    }

    fn send(&mut self, p: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        p.write(&mut out, usize::MAX)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.stream.write_all(&out)
    }

    fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16) -> std::io::Result<()> {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p))
    }

    /// The next packet within `wait`: `Ok(None)` when none came; an error when the connection
    /// is gone.
    fn recv(&mut self, wait: Duration) -> std::io::Result<Option<Packet>> {
        let deadline = Instant::now() + wait;
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(Some(p)),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::ConnectionAborted.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One simulated meter that takes updates.
pub struct OtaMeter {
    pub id: String,
    pub secret: String,
    pub topic_prefix: String,
    pub addr: SocketAddr,
    /// The release public key built into the simulated firmware.
    pub public: [u8; 32],
    pub fault: Fault,
    /// Size of the factory image.
    pub factory_size: usize,
    seq: u32,
    /// The Wh register; +7 per report.
    energy: u64,
    pkid: u16,
}

impl OtaMeter {
    pub fn new(
        id: &str,
        secret: &str,
        addr: SocketAddr,
        public: [u8; 32],
        fault: Fault,
        energy: u64,
    ) -> OtaMeter {
        OtaMeter {
            id: id.to_string(),
            secret: secret.to_string(),
            topic_prefix: "smartmeter".into(),
            addr,
            public,
            fault,
            factory_size: 3000,
            seq: 0,
            energy,
            pkid: 0,
        }
    }

    fn err(&self, what: impl std::fmt::Display) -> OtaSimError {
        OtaSimError::Meter {
            meter: self.id.clone(),
            what: what.to_string(),
        }
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.topic_prefix, self.id)
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }

    /// Connects as the firmware does: CONNACK 3 ("come back later", e.g. the gateway's
    /// password checks per address are all busy) means a retry after a backoff.
    fn connect(&self, deadline: Instant) -> Result<Link, OtaSimError> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let (link, code) =
                Link::connect(self.addr, &self.id, &self.secret).map_err(|e| self.err(e))?;
            match code {
                ConnectReturnCode::Success => return Ok(link),
                ConnectReturnCode::ServiceUnavailable if Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return Err(self.err(format!("CONNACK {other:?}"))),
            }
        }
    }

    fn report(&mut self, m: &mut Link) -> Result<(), OtaSimError> {
        self.seq += 1;
        self.energy += 7;
        let pkid = self.next_pkid();
        let body = format!(
            r#"{{"v":2,"meterNo":"{}","seq":{},"energyWh":{},"powerW":120.5,"relay":"on"}}"#,
            self.id, self.seq, self.energy
        );
        m.publish(
            &self.topic("consumption"),
            body.as_bytes(),
            QoS::AtLeastOnce,
            pkid,
        )
        .map_err(|e| self.err(e))
    }

    /// Runs until the meter has finished an update (confirmed, rolled back or failed) or is
    /// bricked, or `deadline` passes. `connected` is called once, after the first CONNACK and
    /// report.
    pub fn run(
        mut self,
        connected: impl FnOnce(),
        deadline: Instant,
    ) -> Result<OtaMeterResult, OtaSimError> {
        let mut board = RamBoard::new(
            &make_image(FACTORY_VERSION, self.factory_size, 1),
            SLOT_BYTES,
        );
        let mut version = board
            .reset()
            .map_err(|_| self.err("factory image does not boot"))?;
        let (mut ota, mut acts) = Ota::boot(board, &version, self.public);
        let first_energy = self.energy + 7;
        let mut result = OtaMeterResult {
            id: self.id.clone(),
            fault: self.fault,
            version: String::new(),
            bricked: false,
            first_energy,
            last_energy: 0,
            resets: 0,
            downloads: 0,
        };
        let (mut dropped, mut corrupted, mut armed) = (false, false, false);
        let mut chunks = 0u32;
        let mut connected = Some(connected);
        'session: loop {
            if Instant::now() >= deadline {
                return Err(self.err("out of time"));
            }
            let mut m = self.connect(deadline)?;
            let pkid = self.next_pkid();
            let sub = Subscribe::new(self.topic("command/#"), QoS::AtLeastOnce);
            let mut sub = sub;
            sub.pkid = pkid;
            m.send(Packet::Subscribe(sub)).map_err(|e| self.err(e))?;
            self.report(&mut m)?;
            if let Some(f) = connected.take() {
                f();
            }
            if ota.on_trial() {
                // Reconnected and reported on the new image: it is good.
                acts.extend(ota.on_reported());
            }
            let mut queue: Vec<Action> = acts.drain(..).collect();
            loop {
                if Instant::now() >= deadline {
                    return Err(self.err(format!("out of time in {:?}", ota.state().phase)));
                }
                while !queue.is_empty() {
                    match queue.remove(0) {
                        Action::Request { offset, len } => {
                            let mut buf = [0u8; 96];
                            let n = ota.request_json(offset, len, &mut buf).unwrap_or(0);
                            m.publish(&self.topic("ota/request"), &buf[..n], QoS::AtMostOnce, 0)
                                .map_err(|e| self.err(e))?;
                        }
                        Action::Report(s) => {
                            result.downloads += u32::from(s.phase == Phase::Downloading);
                            let mut buf = [0u8; 160];
                            let n = s.to_json(&mut buf).unwrap_or(0);
                            let pkid = self.next_pkid();
                            m.publish(&self.topic("ota/status"), &buf[..n], QoS::AtLeastOnce, pkid)
                                .map_err(|e| self.err(e))?;
                        }
                        Action::Backoff => {
                            // The gateway serves its maximum of meters: ask again later.
                            std::thread::sleep(BUSY_BACKOFF);
                            queue.extend(ota.next_request());
                        }
                        Action::Reset => {
                            result.resets += 1;
                            drop(m);
                            let mut board = ota.into_flash();
                            version = match board.reset() {
                                Ok(v) => v,
                                Err(_) => {
                                    result.bricked = true;
                                    result.last_energy = self.energy;
                                    return Ok(result);
                                }
                            };
                            (ota, acts) = Ota::boot(board, &version, self.public);
                            continue 'session;
                        }
                    }
                }
                let phase = ota.state().phase;
                let finished = matches!(phase, Phase::RolledBack | Phase::Failed)
                    || (phase == Phase::Confirmed && !ota.on_trial());
                if finished {
                    // A last report, acknowledged: everything before it on this connection
                    // (the final status too) is committed.
                    self.report(&mut m)?;
                    let last = self.pkid;
                    loop {
                        if Instant::now() >= deadline {
                            return Err(self.err("no PUBACK for the last report"));
                        }
                        match m.recv(CHUNK_TIMEOUT).map_err(|e| self.err(e))? {
                            Some(Packet::PubAck(a)) if a.pkid == last => break,
                            Some(Packet::Publish(p)) if p.qos == QoS::AtLeastOnce => m
                                .send(Packet::PubAck(PubAck::new(p.pkid)))
                                .map_err(|e| self.err(e))?,
                            _ => {}
                        }
                    }
                    let _ = m.send(Packet::Disconnect);
                    result.version = version;
                    result.last_energy = self.energy;
                    return Ok(result);
                }
                let half = ota.state().offer.as_ref().map_or(u32::MAX, |o| o.size / 2);
                if self.fault == Fault::Drop && !dropped && ota.state().offset > half {
                    dropped = true;
                    let _ = m.stream.shutdown(std::net::Shutdown::Both);
                    continue 'session;
                }
                let packet = match m.recv(CHUNK_TIMEOUT) {
                    Ok(p) => p,
                    // The gateway closed the connection: connect again, as the firmware does.
                    Err(_) => continue 'session,
                };
                match packet {
                    Some(Packet::Publish(p)) => {
                        if p.qos == QoS::AtLeastOnce {
                            m.send(Packet::PubAck(PubAck::new(p.pkid)))
                                .map_err(|e| self.err(e))?;
                        }
                        let leaf = p.topic.rsplit_once("/command/").map_or("", |(_, l)| l);
                        if leaf == "ota" {
                            if self.fault == Fault::PowerLoss && !armed {
                                armed = true;
                                // Erase, a few chunk writes and their saves, then the cut.
                                ota.flash_mut().power_left = Some(9);
                            }
                            queue.extend(ota.on_offer(&p.payload));
                            power_cut(&ota, &mut queue);
                        } else if leaf == "ota/chunk" {
                            chunks += 1;
                            let mut payload = p.payload.to_vec();
                            if self.fault == Fault::Corrupt && !corrupted && payload.len() > 20 {
                                corrupted = true;
                                payload[12] ^= 0x5a;
                            }
                            queue.extend(ota.on_chunk(&payload));
                            power_cut(&ota, &mut queue);
                            if chunks.is_multiple_of(5) {
                                // Readings go on during the download.
                                self.report(&mut m)?;
                            }
                        }
                    }
                    Some(_) => {}
                    // A lost chunk (or nothing offered yet): ask again.
                    None => queue.extend(ota.next_request()),
                }
            }
        }
    }
}

/// A power cut mid-write: nothing the machine meant to send goes out (the board is dark); it
/// reboots from what its flash holds.
fn power_cut(ota: &Ota<RamBoard>, queue: &mut Vec<Action>) {
    if ota.flash().power_left == Some(0) {
        queue.clear();
        queue.push(Action::Reset);
    }
}
