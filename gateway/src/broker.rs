//! The meter-facing MQTT 3.1.1 listener: the gateway's front door.
//!
//! Two listeners feed this front door, `[broker] listen` (plain TCP) and `tls_listen` (a TLS
//! handshake first, [`Door::Tls`]); after the handshake nothing here knows which one a meter
//! used.
//!
//! Each connection is one task. It reads CONNECT ([`crate::connect`]), authenticates the meter
//! (username = meter number, client id = the username or an original firmware's form around it,
//! secret checked by [`crate::auth`] within the limits of [`crate::admission`]; or a meter
//! opted in to the original firmware's anonymous CONNECT), then checks every PUBLISH and
//! SUBSCRIBE against that identity before anything else sees it:
//! - a meter may publish only
//!   `{prefix}/{meter}/consumption|balance|status|ota/request|ota/status|command/emergency`;
//!   a publish under another meter's tree is a spoofing attempt and closes the connection;
//! - a meter may subscribe only inside `{prefix}/{meter}/command/…`; other filters get a
//!   SUBACK failure (0x80).
//!
//! Accepted publishes become ledger [`Op`]s, handed to the writer in arrival order; a QoS 1
//! PUBACK is written only when the writer has committed the op, and PUBACKs leave in the order
//! the publishes came. The wire format is rumqtt's MQTT 3.1.1 codec (`rumqttc::mqttbytes`).
//!
//! Architecture invariant: nothing a meter sends reaches the ledger before it passed the
//! identity checks here, and the ledger never learns a meter number from a payload alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use rumqttc::mqttbytes::{self, matches, valid_filter};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

pub use crate::admission::Admission;
use crate::admission::Pending;
use crate::auth::{Verdict, Verifier};
use crate::config::BrokerConfig;
use crate::connect::{self, ConnectError, FirmwareForm};
use crate::hub::{Hub, Outgoing};
use crate::meter::MeterId;
use crate::meter_limits::{self, MessageKind, MeterGuard, MeterGuards};
use crate::metrics::Metrics;
use crate::ota::{self, ChunkAnswer, ChunkRequest, OtaOp, OtaServer};
use crate::payload::{self, Report, StatusReport};
use crate::store::{self, now_ms, Reader};
use crate::untrusted::Untrusted;
use crate::writer::{self, LedgerError, Op, Outcome, Writer};

/// Publishes from one meter that may wait for their commit at once; past this the connection
/// stops reading until commits catch up.
const MAX_PENDING: usize = 64;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection task needs.
pub struct Broker {
    pub config: BrokerConfig,
    pub hub: Arc<Hub>,
    pub writer: Writer,
    pub verifier: Arc<Verifier>,
    pub reader: Reader,
    pub metrics: Arc<Metrics>,
    /// Per-meter message rates and warning budgets (`config.session`).
    pub guards: MeterGuards,
    /// Per-IP and per-meter limits before CONNACK, and the refusal log's rate limit.
    pub admission: Admission,
    /// The tariffs and rules: a subscribing meter's balance is priced by its tariff (friendly
    /// hours: `mayCut`, relay), and it gets its tariff's `limits` (else `[limits]`) as
    /// `command/config` (nothing without either, as before).
    pub ledger: writer::LedgerSettings,
    /// Firmware offers and chunks (`crate::ota`).
    pub ota: Arc<OtaServer>,
    /// `max_connections` places shared by the plain and the TLS listener.
    pub slots: Arc<Semaphore>,
}

impl Broker {
    fn reject(&self, reason: &'static str) {
        self.metrics
            .inc("umeme_mqtt_rejected_total", &[("reason", reason)]);
    }

    fn refuse_connect(&self, reason: &'static str) {
        self.metrics
            .inc("umeme_mqtt_connect_refused_total", &[("reason", reason)]);
    }

    fn handshake_failed(&self, peer: SocketAddr, reason: &'static str, e: &dyn std::fmt::Display) {
        self.metrics.inc(
            "umeme_mqtt_tls_handshake_failures_total",
            &[("reason", reason)],
        );
        if let Some(suppressed) = self.refusal_log() {
            // rustls's messages can quote what the peer sent (SNI, alerts).
            let error = e.to_string();
            warn!(%peer, reason, error = %Untrusted(&error), suppressed, "TLS handshake failed; closing");
        }
    }

    /// Whether a refusal may be logged now: `Some(lines suppressed since the last one)`. A
    /// flood of refusals must not become a flood of log lines (the SD card, the journal).
    fn refusal_log(&self) -> Option<u64> {
        let r = self.admission.log.allow();
        if r.is_none() {
            self.metrics
                .inc("umeme_mqtt_refusal_logs_suppressed_total", &[]);
        }
        r
    }
}

/// How a listener's connections reach the MQTT session: as they are, or after a TLS
/// handshake.
#[derive(Clone)]
pub enum Door {
    Plain,
    Tls(tokio_rustls::TlsAcceptor),
}

/// Accepts meter connections until `shutdown` fires. Both listeners run this: the same
/// per-address admission, one pool of `max_connections` places (`Broker::slots`), and the same
/// session code whatever the stream.
pub async fn serve(
    listener: TcpListener,
    door: Door,
    broker: Arc<Broker>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: wait, then try again rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        broker.metrics.inc("umeme_mqtt_connections_total", &[]);
        // Checked first: one host's idle sockets must not take the slots real meters need.
        let Some(pending) = broker.admission.enter(peer.ip().to_canonical()) else {
            broker.refuse_connect("unauthenticated_per_ip");
            if let Some(suppressed) = broker.refusal_log() {
                warn!(%peer, max = broker.config.max_unauthenticated_per_ip, suppressed, "connection refused: broker.max_unauthenticated_per_ip reached for this address");
            }
            drop(stream);
            continue;
        };
        let Ok(permit) = broker.slots.clone().try_acquire_owned() else {
            broker.refuse_connect("max_connections");
            if let Some(suppressed) = broker.refusal_log() {
                warn!(%peer, max = broker.config.max_connections, suppressed, "connection refused: broker.max_connections reached");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        match &door {
            Door::Plain => {
                let broker = broker.clone();
                tokio::spawn(async move {
                    Connection::new(stream, peer, &broker).run(pending).await;
                    drop(permit);
                });
            }
            Door::Tls(acceptor) => {
                let Some(handshake) = broker.admission.handshake(peer.ip().to_canonical()) else {
                    broker.refuse_connect("tls_handshakes_per_ip");
                    if let Some(suppressed) = broker.refusal_log() {
                        warn!(%peer, max = broker.config.max_tls_handshakes_per_ip, suppressed, "connection refused: broker.max_tls_handshakes_per_ip reached for this address");
                    }
                    continue;
                };
                let (broker, acceptor) = (broker.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let limit = Duration::from_millis(broker.config.tls_handshake_timeout_ms);
                    let stream = match timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            return broker.handshake_failed(peer, handshake_reason(&e), &e)
                        }
                        Err(_) => {
                            return broker.handshake_failed(
                                peer,
                                "timeout",
                                &"no TLS handshake in time",
                            )
                        }
                    };
                    drop(handshake);
                    broker.metrics.inc("umeme_mqtt_tls_connections_total", &[]);
                    Connection::new(stream, peer, &broker).run(pending).await;
                    drop(permit);
                });
            }
        }
    }
}

/// A metrics reason for a failed TLS handshake. `alert` is the client refusing us (most often
/// our certificate: wrong CA, or a name it does not carry).
fn handshake_reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(_)) => "alert",
        Some(_) => "protocol",
        None => "io",
    }
}

#[derive(Debug)]
enum Close {
    /// The meter sent DISCONNECT: no Last Will.
    Clean,
    /// Another connection took over this meter's session: no Will, no presence change.
    TakenOver,
    /// Anything else: the Will (if any) is published.
    Abnormal(&'static str),
}

struct Session {
    meter: MeterId,
    conn: u64,
    clean_session: bool,
    keep_alive: u16,
    will: Option<rumqttc::LastWill>,
    subscriptions: Vec<(String, QoS)>,
    next_pkid: u16,
    guard: Arc<Mutex<MeterGuard>>,
}

struct Connection<'a, S> {
    stream: S,
    peer: SocketAddr,
    broker: &'a Broker,
    buf: BytesMut,
    out: BytesMut,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Connection<'a, S> {
    fn new(stream: S, peer: SocketAddr, broker: &'a Broker) -> Self {
        Connection {
            stream,
            peer,
            broker,
            buf: BytesMut::with_capacity(512),
            out: BytesMut::with_capacity(512),
        }
    }

    fn prefix(&self) -> &str {
        self.broker.config.topic_prefix.as_str()
    }

    /// `pending` is this connection's place among its address's unauthenticated ones, given
    /// back once CONNACK is written.
    async fn run(&mut self, pending: Pending) {
        let limit = Duration::from_millis(self.broker.config.connect_timeout_ms);
        let connect = match timeout(limit, self.read_connect()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let reason = e.reason();
                self.broker.refuse_connect(reason);
                if let Some(suppressed) = self.broker.refusal_log() {
                    warn!(peer = %self.peer, reason, error = %e, suppressed, "CONNECT refused; closing");
                }
                if let ConnectError::ProtocolVersion(_) = e {
                    // MQTT 3.1.1 §3.1.2.2: answer 0x01 so MQTT 3.1/5 clients stop, not retry.
                    let _ = self
                        .write(Packet::ConnAck(ConnAck::new(
                            ConnectReturnCode::RefusedProtocolVersion,
                            false,
                        )))
                        .await;
                }
                return;
            }
            Err(_) => {
                self.broker.refuse_connect("connect_timeout");
                debug!(peer = %self.peer, "no CONNECT in time; closing");
                return;
            }
        };
        let Some(mut session) = self.authenticate(connect).await else {
            return;
        };
        let registration = self
            .broker
            .hub
            .register(&session.meter, session.clean_session);
        session.conn = registration.conn;
        let session_present = registration.restored.is_some();
        if let Some(subs) = registration.restored {
            session.subscriptions = subs;
        }
        if self
            .write(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                session_present,
            )))
            .await
            .is_err()
        {
            self.broker
                .hub
                .unregister(&session.meter, session.conn, session.clean_session);
            return;
        }
        drop(pending);
        info!(meter = %session.meter, peer = %self.peer, session_present, "meter connected");
        self.presence(&session.meter, true).await;
        if session_present {
            self.send_current_balance(&mut session).await;
            // Restored subscriptions come without a SUBSCRIBE: a rollout started while the
            // meter was away is offered here, else it would never be.
            self.send_ota_offer(&mut session).await;
        }
        let close = self.serve(&mut session, registration.rx).await;
        self.finish(&session, close).await;
    }

    /// Checks CONNECT; answers refusals with the MQTT 3.1.1 return code and returns `None`.
    ///
    /// Identity: the username is the meter number and the client id is the same or one of the
    /// original firmwares' forms around it (`ESP32_METER_<meter>_<hex>`, `ESP32_<meter>_<hex>`).
    /// Without credentials, only a meter opted in to legacy-anonymous CONNECT gets in, named
    /// by its firmware's client id.
    async fn authenticate(&mut self, c: connect::Connect) -> Option<Session> {
        let refuse = |code, reason: &'static str| (code, reason);
        let verdict = async {
            let anonymous = match (c.username.as_deref(), c.password.as_deref()) {
                // The Clean firmware sends no credentials at all; the Modified one sends its
                // empty MQTT_USER / MQTT_PASS constants.
                (None, None) => Some(FirmwareForm::Clean),
                (Some(""), None | Some(b"")) => Some(FirmwareForm::Modified),
                _ => None,
            };
            let meter = match anonymous {
                Some(form) => self.anonymous_meter(form, &c.client_id).await?,
                None => self.checked_meter(&c).await?,
            };
            if let Some(w) = &c.will {
                if w.topic != format!("{}/{}/status", self.prefix(), meter) {
                    return Err(refuse(ConnectReturnCode::NotAuthorized, "acl_will"));
                }
            }
            Ok(meter)
        }
        .await;
        match verdict {
            Ok(meter) => Some(Session {
                guard: self
                    .broker
                    .guards
                    .guard(&meter, &self.broker.config.session),
                meter,
                conn: 0,
                clean_session: c.clean_session,
                keep_alive: c.keep_alive,
                will: c.will,
                subscriptions: Vec::new(),
                next_pkid: 0,
            }),
            Err((code, reason)) => {
                self.broker.refuse_connect(reason);
                if let Some(suppressed) = self.broker.refusal_log() {
                    let user = c.username.as_deref().unwrap_or("");
                    warn!(peer = %self.peer, client_id = %Untrusted(&c.client_id), username = %Untrusted(user), reason, suppressed, "meter CONNECT refused");
                }
                let _ = self.write(Packet::ConnAck(ConnAck::new(code, false))).await;
                None
            }
        }
    }

    /// A meter that sent a username: its password checked by argon2 unless the source
    /// address or the meter number is backing off after failures.
    async fn checked_meter(
        &self,
        c: &connect::Connect,
    ) -> Result<MeterId, (ConnectReturnCode, &'static str)> {
        let user = c.username.as_deref().unwrap_or("");
        if !connect::client_id_fits(&c.client_id, user) {
            return Err((ConnectReturnCode::BadClientId, "client_id_mismatch"));
        }
        let Ok(meter) = MeterId::parse(user) else {
            return Err((ConnectReturnCode::BadClientId, "bad_client_id"));
        };
        let ip = self.peer.ip().to_canonical();
        let admission = &self.broker.admission;
        let password = c.password.as_deref().unwrap_or_default();
        let wait = Duration::from_millis(self.broker.config.connect_timeout_ms);
        let verdict = self
            .broker
            .verifier
            .verify_gated(&meter, password, || async {
                let checking = admission.check(ip, meter.as_str(), wait).await?;
                let later = checking.suspect;
                Ok((checking, later))
            })
            .await;
        match verdict {
            Ok(Verdict::Good) => {
                admission.succeeded(meter.as_str());
                Ok(meter)
            }
            Ok(Verdict::Bad) => {
                admission.failed(ip, meter.as_str());
                Err((ConnectReturnCode::BadUserNamePassword, "bad_credentials"))
            }
            // Refused without argon2: "come back later", which meters do on their own.
            Ok(Verdict::Refused(reason)) => {
                if reason == "auth_backoff_ip" {
                    admission.hammering(ip);
                }
                Err((ConnectReturnCode::ServiceUnavailable, reason))
            }
            Err(e) => {
                warn!(error = %e, "credential lookup failed");
                Err((ConnectReturnCode::ServiceUnavailable, "store"))
            }
        }
    }

    /// A CONNECT without credentials: the original firmware's, for a meter opted in with
    /// `meter set METER --legacy-anonymous true` (and from its pinned address, if any).
    async fn anonymous_meter(
        &self,
        form: FirmwareForm,
        client_id: &str,
    ) -> Result<MeterId, (ConnectReturnCode, &'static str)> {
        let no = (ConnectReturnCode::BadUserNamePassword, "no_credentials");
        let meter = form
            .meter_in(client_id)
            .and_then(|m| MeterId::parse(m).ok())
            .ok_or(no)?;
        let id = meter.clone();
        match self
            .broker
            .reader
            .run(move |c| store::legacy_access(c, &id))
            .await
        {
            Ok(Some((true, None))) => {}
            Ok(Some((true, Some(pin)))) => {
                let from = self.peer.ip().to_canonical();
                if pin.parse::<std::net::IpAddr>().ok() != Some(from) {
                    return Err((ConnectReturnCode::NotAuthorized, "legacy_source"));
                }
            }
            Ok(_) => return Err(no),
            Err(e) => {
                warn!(error = %e, "legacy meter lookup failed");
                return Err((ConnectReturnCode::ServiceUnavailable, "store"));
            }
        }
        self.broker
            .metrics
            .inc("umeme_mqtt_legacy_anonymous_connects_total", &[]);
        info!(meter = %meter, peer = %self.peer, "meter connecting without credentials (legacy anonymous)");
        Ok(meter)
    }

    async fn serve(
        &mut self,
        s: &mut Session,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    ) -> Close {
        // MQTT: 1.5 × keep-alive without a packet ends the session; 0 means none was asked
        // for, and a day of silence still frees the slot.
        let idle_limit = match s.keep_alive {
            0 => Duration::from_secs(86_400),
            k => Duration::from_millis(u64::from(k) * 1500),
        };
        let mut deadline = Instant::now() + idle_limit;
        let mut pending: FuturesOrdered<PendingFuture> = FuturesOrdered::new();
        loop {
            // Frame whatever complete packets are buffered before reading more.
            loop {
                if pending.len() >= MAX_PENDING {
                    break;
                }
                match self.next_buffered_packet() {
                    Ok(Some(packet)) => {
                        match self.handle(s, packet, &mut pending).await {
                            // From the end of handling: a report held to its meter's rate
                            // may have waited for its token.
                            Ok(()) => deadline = Instant::now() + idle_limit,
                            Err(close) => return self.drain(pending, close).await,
                        }
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        self.broker.reject(reason);
                        if self.may_warn(s) {
                            warn!(meter = %s.meter, reason, "malformed MQTT packet; closing");
                        }
                        return self.drain(pending, Close::Abnormal(reason)).await;
                    }
                }
            }
            tokio::select! {
                r = self.stream.read_buf(&mut self.buf), if pending.len() < MAX_PENDING => match r {
                    Ok(0) | Err(_) => return self.drain(pending, Close::Abnormal("connection_lost")).await,
                    Ok(_) => {}
                },
                Some(ack) = pending.next() => {
                    match ack {
                        Ok(Some(pkid)) => {
                            if self.write(Packet::PubAck(PubAck::new(pkid))).await.is_err() {
                                return self.drain(pending, Close::Abnormal("write_failed")).await;
                            }
                        }
                        Ok(None) => {}
                        Err(reason) => return self.drain(pending, Close::Abnormal(reason)).await,
                    }
                }
                msg = rx.recv() => match msg {
                    Some(Outgoing::Command { leaf, payload }) => {
                        if self.publish_command(s, leaf, payload, false).await.is_err() {
                            return self.drain(pending, Close::Abnormal("write_failed")).await;
                        }
                    }
                    Some(Outgoing::TakenOver) | None => return self.drain(pending, Close::TakenOver).await,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.broker.reject("keep_alive_timeout");
                    return self.drain(pending, Close::Abnormal("keep_alive_timeout")).await;
                }
            }
        }
    }

    /// Waits for the commits of publishes already handed to the writer, acknowledging those
    /// that succeed while the socket is still usable.
    async fn drain(&mut self, mut pending: FuturesOrdered<PendingFuture>, close: Close) -> Close {
        while let Some(ack) = pending.next().await {
            if let Ok(Some(pkid)) = ack {
                let _ = self.write(Packet::PubAck(PubAck::new(pkid))).await;
            }
        }
        close
    }

    async fn handle(
        &mut self,
        s: &mut Session,
        packet: Packet,
        pending: &mut FuturesOrdered<PendingFuture>,
    ) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.on_publish(s, p, pending).await,
            Packet::Subscribe(sub) => {
                let limits = self.broker.config.session;
                let mut codes = Vec::with_capacity(sub.filters.len());
                let mut balance_granted = false;
                let mut ota_granted = false;
                for f in sub.filters {
                    let known = s.subscriptions.iter().any(|(p, _)| *p == f.path);
                    let refusal = if f.path.len() > limits.max_filter_bytes {
                        Some((
                            "filter_too_long",
                            "topic filter longer than broker limit refused",
                        ))
                    } else if !self.may_subscribe(&s.meter, &f.path) {
                        Some((
                            "acl_subscribe",
                            "subscription outside the meter's command tree refused",
                        ))
                    } else if !known && s.subscriptions.len() >= limits.max_subscriptions {
                        // A meter needs a handful; each kept filter costs memory (also after
                        // a persistent session ends) and a match for every command.
                        Some((
                            "max_subscriptions",
                            "subscription over broker.max_subscriptions refused",
                        ))
                    } else {
                        None
                    };
                    if let Some((reason, message)) = refusal {
                        self.broker.reject(reason);
                        if self.may_warn(s) {
                            warn!(meter = %s.meter, filter = %Untrusted(&f.path), reason, "{message}");
                        }
                        codes.push(SubscribeReasonCode::Failure);
                    } else {
                        let qos = if f.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        s.subscriptions.retain(|(p, _)| *p != f.path);
                        balance_granted |=
                            matches(&self.command_topic(&s.meter, "balance"), &f.path);
                        ota_granted |= matches(&self.command_topic(&s.meter, "ota"), &f.path);
                        s.subscriptions.push((f.path, qos));
                        codes.push(SubscribeReasonCode::Success(qos));
                    }
                }
                self.broker
                    .hub
                    .set_subscriptions(&s.meter, s.conn, &s.subscriptions);
                self.write(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                    .await
                    .map_err(|_| Close::Abnormal("write_failed"))?;
                if balance_granted {
                    self.send_current_balance(s).await;
                }
                if ota_granted {
                    self.send_ota_offer(s).await;
                }
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                s.subscriptions.retain(|(p, _)| !u.topics.contains(p));
                self.broker
                    .hub
                    .set_subscriptions(&s.meter, s.conn, &s.subscriptions);
                self.write(Packet::UnsubAck(UnsubAck::new(u.pkid)))
                    .await
                    .map_err(|_| Close::Abnormal("write_failed"))
            }
            Packet::PingReq => self
                .write(Packet::PingResp)
                .await
                .map_err(|_| Close::Abnormal("write_failed")),
            // Acks of our QoS 1 commands: a lost one is covered by the balance sent at the
            // next SUBSCRIBE or session resumption, so nothing is tracked.
            Packet::PubAck(_) => Ok(()),
            Packet::Disconnect => Err(Close::Clean),
            other => {
                let reason = match other {
                    Packet::Connect(_) => "second_connect",
                    Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => "qos2",
                    _ => "unexpected_packet",
                };
                self.broker.reject(reason);
                if self.may_warn(s) {
                    warn!(meter = %s.meter, packet = packet_name(&other), "protocol violation; closing");
                }
                Err(Close::Abnormal(reason))
            }
        }
    }

    async fn on_publish(
        &mut self,
        s: &mut Session,
        p: Publish,
        pending: &mut FuturesOrdered<PendingFuture>,
    ) -> Result<(), Close> {
        let pkid = match p.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(p.pkid),
            QoS::ExactlyOnce => {
                self.broker.reject("qos2");
                if self.may_warn(s) {
                    warn!(meter = %s.meter, "QoS 2 publish refused (meters use QoS 0 or 1); closing");
                }
                return Err(Close::Abnormal("qos2"));
            }
        };
        let own = format!("{}/{}/", self.prefix(), s.meter);
        let Some(leaf) = p.topic.strip_prefix(&own) else {
            self.broker.reject("acl_publish");
            // Closing bounds this per connection; the budget bounds a reconnecting meter.
            if self.may_warn(s) {
                warn!(meter = %s.meter, topic = %Untrusted(&p.topic), "publish outside the meter's own topic tree refused; closing");
            }
            return Err(Close::Abnormal("acl_publish"));
        };
        if leaf == "consumption" {
            // Reports carry money: over the rate they are not dropped but handled late. This
            // connection stops reading meanwhile, so TCP slows the meter down, and a PUBACK
            // still means "committed".
            let wait = s
                .guard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reserve(MessageKind::Report, Instant::now());
            if !wait.is_zero() {
                self.broker
                    .metrics
                    .inc("umeme_mqtt_reports_delayed_total", &[]);
                if self.may_warn(s) {
                    warn!(meter = %s.meter, wait_ms = wait.as_millis() as u64, "meter over its report rate: its reports are read more slowly");
                }
                tokio::time::sleep(wait).await;
            }
        } else {
            // Chunk requests have a bucket of their own: a download is many of them.
            let kind = if leaf == "ota/request" {
                MessageKind::OtaChunk
            } else {
                MessageKind::Status
            };
            let admitted = s
                .guard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(kind, Instant::now());
            if !admitted {
                // Acknowledged and dropped, like a poison message: a flooding meter's excess
                // never becomes an event, and a real meter does not retry it. Nothing here
                // carries money; the next status says the same or newer.
                self.broker.reject("rate_limited");
                if self.may_warn(s) {
                    warn!(meter = %s.meter, topic = %Untrusted(leaf), "meter over its message rate: publish acknowledged and dropped");
                }
                pending.push_back(Box::pin(ready(pkid)));
                return Ok(());
            }
        }
        let at = now_ms();
        let meter = s.meter.clone();
        let parsed: Result<(Op, &'static str), payload::PayloadError> = match leaf {
            "consumption" => Report::parse(&p.payload, &meter).map(|report| {
                let what = if matches!(report, Report::V2(_)) {
                    "v2"
                } else {
                    "v1"
                };
                (
                    Op::Report {
                        meter: meter.clone(),
                        report,
                        at,
                    },
                    what,
                )
            }),
            "status" => StatusReport::parse(&p.payload, &meter).map(|status| {
                let what = status.trip.map_or("status", |t| t.alert());
                (
                    Op::Status {
                        meter: meter.clone(),
                        status,
                        at,
                    },
                    what,
                )
            }),
            "ota/request" => {
                self.serve_chunk(s, &p.payload).await?;
                pending.push_back(Box::pin(ready(pkid)));
                return Ok(());
            }
            "ota/status" => match ota::StatusReport::parse(&p.payload) {
                Ok(report) => {
                    if report.state != "downloading" {
                        self.broker.ota.release(&meter);
                    }
                    self.broker.metrics.inc(
                        "umeme_ota_status_total",
                        &[("state", ota_state_label(&report.state))],
                    );
                    Ok((
                        Op::Ota(OtaOp::Status {
                            meter: meter.clone(),
                            report,
                            at,
                        }),
                        "ota_status",
                    ))
                }
                Err(e) => {
                    self.broker.reject("ota_payload");
                    if self.may_warn(s) {
                        warn!(meter = %s.meter, error = %Untrusted(&e), "meter ota/status refused");
                    }
                    pending.push_back(Box::pin(ready(pkid)));
                    return Ok(());
                }
            },
            // A tenant's request for emergency credit (issue 16), from a button on the meter;
            // the payload is not read.
            "command/emergency" => Ok((
                Op::Emergency {
                    meter: meter.clone(),
                    at,
                },
                "emergency",
            )),
            "balance" => payload::parse_meter_balance(&p.payload, &meter).map(|data| {
                (
                    Op::MeterBalance {
                        meter: meter.clone(),
                        data,
                        at,
                    },
                    "balance",
                )
            }),
            _ => {
                self.broker.reject("unknown_topic");
                if self.may_warn(s) {
                    warn!(meter = %s.meter, topic = %Untrusted(&p.topic), "publish to an unknown topic dropped");
                }
                pending.push_back(Box::pin(ready(pkid)));
                return Ok(());
            }
        };
        match parsed {
            Ok((op, what)) => {
                let reply = self
                    .broker
                    .writer
                    .enqueue(op)
                    .await
                    .map_err(|_| Close::Abnormal("ledger_stopped"))?;
                let metrics = self.broker.metrics.clone();
                let meter = s.meter.clone();
                let guard = s.guard.clone();
                pending.push_back(Box::pin(committed(
                    pkid, reply, what, meter, guard, metrics,
                )));
            }
            Err(e) => {
                // Acknowledged and dropped: a meter must not retry a payload that can never
                // be applied. The counter and the log line are how it is noticed.
                self.broker.reject(e.reason());
                if self.may_warn(s) {
                    // The error quotes what the meter sent (a status value, a meter number).
                    warn!(meter = %s.meter, topic = %Untrusted(leaf), error = %Untrusted(&e.to_string()), "meter payload refused");
                }
                pending.push_back(Box::pin(ready(pkid)));
            }
        }
        Ok(())
    }

    /// Whether a warning about this session's meter may be logged (per-meter budget).
    fn may_warn(&self, s: &Session) -> bool {
        meter_limits::may_warn(&s.guard, &s.meter, &self.broker.metrics)
    }

    fn command_topic(&self, meter: &MeterId, leaf: &str) -> String {
        format!("{}/{}/command/{leaf}", self.prefix(), meter)
    }

    fn may_subscribe(&self, meter: &MeterId, filter: &str) -> bool {
        let own = format!("{}/{}/command", self.prefix(), meter);
        valid_filter(filter)
            && (filter == own
                || filter
                    .strip_prefix(&own)
                    .is_some_and(|rest| rest.starts_with('/')))
    }

    async fn send_current_balance(&mut self, s: &mut Session) {
        let meter = s.meter.clone();
        let account = self
            .broker
            .reader
            .run(move |c| store::account_and_tariff(c, &meter))
            .await;
        match account {
            Ok(Some((a, tariff))) => {
                let (cmd, config) =
                    writer::meter_commands(&a, tariff.as_deref(), &self.broker.ledger, now_ms());
                let payload = Bytes::from(serde_json::to_vec(&cmd).unwrap_or_default());
                let _ = self.publish_command(s, "balance", payload, true).await;
                // The limits follow, at every subscription: a restart with a changed
                // `[limits]` reaches every meter as it reconnects. A meter keeps a lockout
                // when the same limits come again.
                if let Some(cfg) = &config {
                    let payload = Bytes::from(serde_json::to_vec(cfg).unwrap_or_default());
                    let _ = self.publish_command(s, "config", payload, true).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                warn!(meter = %s.meter, error = %e, "could not read balance for a new subscription")
            }
        }
    }

    /// Sends the meter its firmware offer when a rollout includes it and it has not finished;
    /// a `pending` meter becomes `offered`.
    async fn send_ota_offer(&mut self, s: &mut Session) {
        let Some((payload, rollout, pending)) = self.broker.ota.offer_for(&s.meter) else {
            return;
        };
        if self.publish_command(s, "ota", payload, false).await.is_ok() && pending {
            let op = Op::Ota(OtaOp::Offered {
                meter: s.meter.clone(),
                rollout,
                at: now_ms(),
            });
            // Informational, like presence: its commit is not waited for.
            let _ = self.broker.writer.enqueue(op).await;
        }
    }

    /// Answers an `ota/request` with a `command/ota/chunk` (data, busy or no offer).
    async fn serve_chunk(&mut self, s: &mut Session, payload: &[u8]) -> Result<(), Close> {
        let request = match ChunkRequest::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                self.broker.reject("ota_payload");
                if self.may_warn(s) {
                    warn!(meter = %s.meter, error = %Untrusted(&e), "meter ota/request refused");
                }
                return Ok(());
            }
        };
        let answer = match self.broker.ota.chunk(&s.meter, &request).await {
            Ok(a) => a,
            Err(e) => {
                // The stored image is unreadable or changed: nobody gets a chunk of it.
                warn!(meter = %s.meter, error = %e, "firmware chunk could not be served");
                ChunkAnswer::NoOffer(Bytes::copy_from_slice(&ota::chunk_header(
                    request.offset,
                    0,
                    2,
                )))
            }
        };
        let (result, bytes) = match answer {
            ChunkAnswer::Data(b) => ("data", b),
            ChunkAnswer::Busy(b) => ("busy", b),
            ChunkAnswer::NoOffer(b) => ("no_offer", b),
        };
        self.broker
            .metrics
            .inc("umeme_ota_chunks_total", &[("result", result)]);
        self.publish_command(s, "ota/chunk", bytes, false)
            .await
            .map_err(|_| Close::Abnormal("write_failed"))
    }

    /// Publishes on `…/command/{leaf}` at the granted QoS if a subscription matches.
    async fn publish_command(
        &mut self,
        s: &mut Session,
        leaf: &str,
        payload: Bytes,
        retain: bool,
    ) -> std::io::Result<()> {
        let topic = self.command_topic(&s.meter, leaf);
        let Some(qos) = s
            .subscriptions
            .iter()
            .filter(|(f, _)| matches(&topic, f))
            .map(|(_, q)| *q)
            .max_by_key(|q| *q as u8)
        else {
            return Ok(());
        };
        // Chunks go at QoS 0: a lost one costs the meter a timeout and the same request again,
        // and the gateway keeps no state per chunk.
        let qos = if leaf == "ota/chunk" {
            QoS::AtMostOnce
        } else {
            qos
        };
        let mut p = Publish::from_bytes(topic, qos, payload);
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            s.next_pkid = s.next_pkid.checked_add(1).unwrap_or(1);
            p.pkid = s.next_pkid;
        }
        self.broker.metrics.inc(
            "umeme_mqtt_commands_sent_total",
            &[(
                "command",
                if leaf == "balance" {
                    "balance"
                } else {
                    "other"
                },
            )],
        );
        self.write(Packet::Publish(p)).await
    }

    async fn presence(&self, meter: &MeterId, online: bool) {
        let op = Op::Presence {
            meter: meter.clone(),
            online,
            at: now_ms(),
        };
        // Presence is informational; its commit is not waited for.
        let _ = self.broker.writer.enqueue(op).await;
    }

    async fn finish(&mut self, s: &Session, close: Close) {
        self.broker
            .hub
            .unregister(&s.meter, s.conn, s.clean_session);
        meter_limits::flush_warnings(&s.guard, &s.meter);
        match close {
            Close::TakenOver => {
                info!(meter = %s.meter, "meter session taken over by a new connection");
                return;
            }
            Close::Clean => info!(meter = %s.meter, "meter disconnected"),
            Close::Abnormal(reason) => info!(meter = %s.meter, reason, "meter connection ended"),
        }
        let will = match (&close, &s.will) {
            (Close::Abnormal(_), Some(w)) => StatusReport::parse(&w.message, &s.meter).ok(),
            _ => None,
        };
        match will {
            Some(status) => {
                let op = Op::Status {
                    meter: s.meter.clone(),
                    status,
                    at: now_ms(),
                };
                let _ = self.broker.writer.enqueue(op).await;
            }
            None => self.presence(&s.meter, false).await,
        }
    }

    /// Reads the first packet, which must be a whole CONNECT of at most `max_packet_bytes`.
    /// `Ok(None)` when the peer closed first.
    async fn read_connect(&mut self) -> Result<Option<connect::Connect>, ConnectError> {
        loop {
            if let Some((start, len)) =
                connect::frame(&self.buf).map_err(ConnectError::Malformed)?
            {
                let total = start + len;
                if total > self.broker.config.max_packet_bytes {
                    return Err(ConnectError::Malformed("oversize_packet"));
                }
                if self.buf.len() >= total {
                    let packet = self.buf.split_to(total);
                    return connect::parse(&packet).map(Some);
                }
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    fn next_buffered_packet(&mut self) -> Result<Option<Packet>, &'static str> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.buf, self.broker.config.max_packet_bytes) {
            Ok(p) => Ok(Some(p)),
            Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(mqttbytes::Error::PayloadSizeLimitExceeded(_)) => Err("oversize_packet"),
            Err(_) => Err("malformed_packet"),
        }
    }

    async fn write(&mut self, packet: Packet) -> std::io::Result<()> {
        self.out.clear();
        packet
            .write(&mut self.out, usize::MAX)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        // The flush matters for TLS: the record may still sit in the session's buffer.
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

type PendingFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u16>, &'static str>> + Send>>;

async fn ready(pkid: Option<u16>) -> Result<Option<u16>, &'static str> {
    Ok(pkid)
}

/// Waits for a publish's commit; `Ok(pkid)` to acknowledge, `Err` to drop the connection
/// unacknowledged so the meter sends it again later.
async fn committed(
    pkid: Option<u16>,
    reply: oneshot::Receiver<Result<Outcome, LedgerError>>,
    what: &'static str,
    meter: MeterId,
    guard: Arc<Mutex<MeterGuard>>,
    metrics: Arc<Metrics>,
) -> Result<Option<u16>, &'static str> {
    let may_warn = || meter_limits::may_warn(&guard, &meter, &metrics);
    match reply.await {
        Ok(Ok(Outcome::Report(applied))) => {
            metrics.inc(
                "umeme_mqtt_reports_total",
                &[("version", what), ("outcome", kind_label(applied.kind))],
            );
            for alert in &applied.alerts {
                metrics.inc("umeme_ledger_alerts_total", &[("alert", alert.as_str())]);
                info!(%meter, alert = alert.as_str(), "alert raised");
            }
            if let Some(drift) = applied.balance_drift_wh {
                metrics.inc("umeme_ledger_v1_balance_drift_total", &[]);
                if may_warn() {
                    warn!(%meter, drift_wh = drift, "v1 remainingBalance disagrees with the ledger");
                }
            }
            debug!(%meter, debit_wh = applied.debit_wh, kind = ?applied.kind, "report applied");
            Ok(pkid)
        }
        Ok(Ok(_)) => {
            if matches!(what, "power_trip" | "power_lockout") {
                metrics.inc("umeme_ledger_alerts_total", &[("alert", what)]);
                info!(%meter, alert = what, "alert raised");
            }
            Ok(pkid)
        }
        Ok(Err(
            e
            @ (LedgerError::Refused(_) | LedgerError::UnknownMeter(_) | LedgerError::Emergency(_)),
        )) => {
            metrics.inc("umeme_mqtt_rejected_total", &[("reason", e.reason())]);
            if may_warn() {
                warn!(%meter, what, error = %e, "meter publish refused by the ledger");
            }
            Ok(pkid)
        }
        Ok(Err(e)) => {
            warn!(%meter, what, error = %e, "ledger could not commit; the meter will resend");
            Err("ledger_error")
        }
        Err(_) => Err("ledger_stopped"),
    }
}

/// A metrics label for a state the parser accepted.
fn ota_state_label(state: &str) -> &'static str {
    ota::METER_STATES
        .iter()
        .find(|s| **s == state)
        .copied()
        .unwrap_or("other")
}

fn kind_label(k: crate::ledger::ReportKind) -> &'static str {
    use crate::ledger::ReportKind::*;
    match k {
        Debited => "debited",
        Baseline => "baseline",
        Stale => "stale",
        Repeat => "repeat",
        Reboot => "reboot",
        RegisterReset => "register_reset",
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}
