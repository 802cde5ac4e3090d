//! The connection to the broker, on the plugin's own thread and tokio runtime.
//!
//! Two tasks: the *driver* owns rumqttc's `EventLoop` and only ever polls it (a poll is never
//! cancelled halfway, so no half-written packet is left behind); the *controller* owns every
//! publish, maps each QoS 1 publish to its packet id in request order, and counts PUBACKs.
//! The controller decides when the driver may (re)connect: after a failure it waits out an
//! exponential backoff with jitter, so a refused password or an unknown CA never turns into a
//! busy loop.
//!
//! Architecture invariant: nothing is resent by rumqttc. Before every connection attempt the
//! driver drops what rumqttc kept from the previous one (`pending`, queued requests, stale
//! events); a batch that was not entirely PUBACKed on one connection fails as a whole, and the
//! gateway's outbox sends it again. So a subscriber sees an event twice only as a retry of the
//! same `id`. The session is persistent (`clean_session = false`) only so the broker keeps
//! commands for us while we are away.
//!
//! Commands run on a third, plain thread (the gateway's host calls block until the ledger
//! commits): incoming QoS 1 publishes are acknowledged in arrival order, each only after its
//! command was carried out and its result queued for publishing.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode, Transport,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use umeme_plugin_sdk::untrusted::Untrusted;

use crate::command::{self, Downlink};
use crate::config::{CommandRules, Settings};
use crate::tls::{self, Failure, FailureKind};

/// One event as an MQTT message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Why a batch did not go, and when trying again makes sense.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: String,
    pub retry_after: Option<Duration>,
}

/// Counters and state for `health`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    pub connected: bool,
    pub subscribed: bool,
    pub attempts: u64,
    pub connections: u64,
    pub last_error: Option<String>,
    pub published: u64,
    pub acked: u64,
    pub commands: u64,
    /// Commands answered `ok:false` (unsigned, bad signature, expired, out of bounds, over a
    /// cap, refused by the gateway).
    pub commands_refused: u64,
}

enum Request {
    Publish {
        messages: Vec<Message>,
        reply: std_mpsc::SyncSender<Result<(), Refusal>>,
    },
    Shutdown,
}

/// A handle on the link thread; dropping it disconnects and joins the thread.
pub struct Link {
    requests: mpsc::UnboundedSender<Request>,
    pub stats: Arc<Mutex<Stats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Pauses between asking a busy gateway again to carry out a command.
const BUSY_PAUSES: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

impl Link {
    /// Starts connecting at once; commands go to `downlink` when given.
    pub fn start(
        settings: Settings,
        downlink: Option<Box<dyn Downlink + Send>>,
    ) -> Result<Link, String> {
        let transport = match &settings.tls {
            Some(t) => Transport::tls_with_config(tls::client_config(t)?),
            None => Transport::Tcp,
        };
        let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
        options
            .set_transport(transport)
            .set_keep_alive(settings.keep_alive)
            .set_clean_session(!settings.commands)
            .set_manual_acks(true)
            .set_inflight(settings.inflight)
            .set_max_packet_size(settings.max_packet_size, settings.max_packet_size);
        if let Some((user, password)) = &settings.login {
            options.set_credentials(user, password);
        }
        let capacity = usize::from(settings.inflight) * 2 + 64;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(settings.connect_timeout.as_secs());
        eventloop.set_network_options(network);

        let (requests, requests_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name("umeme-sink-mqtt".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        log::error!("cannot start the MQTT runtime: {e}");
                        return;
                    }
                };
                let (work_tx, work_rx) = std_mpsc::channel::<Work>();
                let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
                let worker = downlink.map(|d| {
                    let done_tx = done_tx.clone();
                    let rules = settings.command_rules.clone();
                    std::thread::Builder::new()
                        .name("umeme-sink-mqtt-commands".into())
                        .spawn(move || run_commands(&*d, &rules, work_rx, done_tx))
                        .expect("spawn the command thread")
                });
                let commands = worker.is_some().then_some(work_tx);
                runtime.block_on(async move {
                    let (go, go_rx) = mpsc::unbounded_channel();
                    let (events_tx, events) = mpsc::unbounded_channel();
                    tokio::spawn(drive(eventloop, go_rx, events_tx));
                    let mut c = Controller {
                        window: usize::from(settings.inflight),
                        s: settings,
                        client,
                        go,
                        events,
                        requests: requests_rx,
                        done: done_rx,
                        _done_tx: done_tx,
                        work: commands,
                        phase: Phase::Connecting,
                        failures: 0,
                        last: None,
                        connection: 0,
                        batch: None,
                        next_batch: 0,
                        outbound: VecDeque::new(),
                        awaiting: VecDeque::new(),
                        inflight: HashMap::new(),
                        collided: None,
                        stats: shared,
                    };
                    c.run().await;
                });
                if let Some(w) = worker {
                    let _ = w.join();
                }
            })
            .map_err(|e| format!("cannot start the MQTT thread: {e}"))?;
        Ok(Link {
            requests,
            stats,
            thread: Some(thread),
        })
    }

    /// Publishes `messages` QoS 1; `Ok` once every one of them is PUBACKed, on one connection.
    pub fn publish(&self, messages: Vec<Message>, budget: Duration) -> Result<(), Refusal> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        let n = messages.len();
        self.requests
            .send(Request::Publish { messages, reply })
            .map_err(|_| Refusal {
                reason: "the MQTT link thread has stopped".into(),
                retry_after: None,
            })?;
        match answer.recv_timeout(budget) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(Refusal {
                reason: format!(
                    "not every one of {n} events was acknowledged (PUBACK) within {budget:?}"
                ),
                retry_after: None,
            }),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(Refusal {
                reason: "the batch was dropped by the MQTT link".into(),
                retry_after: None,
            }),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls the event loop, one connection at a time, when the controller says so.
async fn drive(
    mut eventloop: EventLoop,
    mut go: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<Result<Event, ConnectionError>>,
) {
    while go.recv().await.is_some() {
        // Nothing from an earlier connection is resent or reported: the outbox owns retries.
        eventloop.clean();
        eventloop.pending.clear();
        eventloop.state.events.clear();
        loop {
            let r = eventloop.poll().await;
            let failed = r.is_err();
            if events.send(r).is_err() {
                return;
            }
            if failed {
                break;
            }
        }
    }
}

struct Work {
    connection: u64,
    publish: Publish,
    command: Option<String>,
}

struct Done {
    connection: u64,
    publish: Publish,
    answer: Option<command::Answer>,
}

fn run_commands(
    downlink: &dyn Downlink,
    rules: &CommandRules,
    work: std_mpsc::Receiver<Work>,
    done: mpsc::UnboundedSender<Done>,
) {
    for w in work {
        let answer = w.command.as_deref().map(|name| {
            let cx = command::Context {
                rules,
                now: unix_now(),
                busy_pauses: &BUSY_PAUSES,
            };
            let a = command::run(name, &w.publish.payload, downlink, &cx);
            let id = a.id.as_deref().unwrap_or("(no usable id)");
            let topic = Untrusted(&w.publish.topic);
            let result = a.result.to_string();
            if a.ok() {
                log::info!("command {id} from {topic}: {}", Untrusted(&result));
            } else {
                log::warn!("command {id} from {topic} refused: {}", Untrusted(&result));
            }
            a
        });
        let d = Done {
            connection: w.connection,
            publish: w.publish,
            answer,
        };
        if done.send(d).is_err() {
            return;
        }
    }
}

/// The gateway's clock in Unix seconds (0 before 1970: every signed command is then expired).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Waiting out the backoff after a failure.
    Down {
        until: Instant,
    },
    Connecting,
    Up,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tag {
    /// An event of the batch with this number.
    Event(u64),
    /// A command's result.
    Result,
}

enum Out {
    Publish(Tag, Message),
    Ack(Publish),
}

struct Batch {
    id: u64,
    /// Not yet queued (the batch came while connecting).
    waiting: Option<Vec<Message>>,
    left: usize,
    reply: std_mpsc::SyncSender<Result<(), Refusal>>,
}

struct Controller {
    s: Settings,
    window: usize,
    client: AsyncClient,
    go: mpsc::UnboundedSender<()>,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    requests: mpsc::UnboundedReceiver<Request>,
    done: mpsc::UnboundedReceiver<Done>,
    /// Keeps `done` open when there is no command thread.
    _done_tx: mpsc::UnboundedSender<Done>,
    work: Option<std_mpsc::Sender<Work>>,
    phase: Phase,
    /// Failed attempts since the last CONNACK.
    failures: u32,
    last: Option<Failure>,
    /// Counts connections, so a command answered after a reconnect is not acked on the new one.
    connection: u64,
    batch: Option<Batch>,
    next_batch: u64,
    outbound: VecDeque<Out>,
    /// Publishes handed to rumqttc whose packet id is not known yet, in request order.
    awaiting: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    collided: Option<(u16, Tag)>,
    stats: Arc<Mutex<Stats>>,
}

impl Controller {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attempt(&mut self) {
        self.phase = Phase::Connecting;
        let n = {
            let mut st = self.stats();
            st.attempts += 1;
            st.attempts
        };
        log::info!(
            "mqtt: connecting to {}:{} as {} (attempt {n})",
            self.s.host,
            self.s.port,
            self.s.client_id
        );
        let _ = self.go.send(());
    }

    async fn run(&mut self) {
        self.attempt();
        loop {
            if self.phase == Phase::Up {
                self.flush();
            }
            let until = match self.phase {
                Phase::Down { until } => Some(until),
                _ => None,
            };
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                _ = tokio::time::sleep_until(until.unwrap_or(far)), if until.is_some() => self.attempt(),
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                req = self.requests.recv() => match req {
                    Some(Request::Publish { messages, reply }) => self.on_batch(messages, reply),
                    Some(Request::Shutdown) | None => break,
                },
                Some(d) = self.done.recv() => self.on_done(d),
            }
        }
        self.shutdown().await;
    }

    /// Says goodbye to the broker when connected (bounded), so the session ends cleanly.
    async fn shutdown(&mut self) {
        if self.phase != Phase::Up || self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(ev) = self.events.recv().await {
                if matches!(ev, Err(_) | Ok(Event::Outgoing(Outgoing::Disconnect))) {
                    break;
                }
            }
        })
        .await;
    }

    fn on_batch(
        &mut self,
        messages: Vec<Message>,
        reply: std_mpsc::SyncSender<Result<(), Refusal>>,
    ) {
        // A batch given up on by the gateway (timed out) is superseded by this one.
        if let Some(old) = self.batch.take() {
            self.outbound
                .retain(|o| !matches!(o, Out::Publish(Tag::Event(id), _) if *id == old.id));
        }
        if messages.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        self.next_batch += 1;
        let id = self.next_batch;
        let left = messages.len();
        match self.phase {
            Phase::Down { until } => {
                let reason = self
                    .last
                    .as_ref()
                    .map_or("not connected".to_string(), |f| f.message.clone());
                let _ = reply.send(Err(Refusal {
                    reason,
                    retry_after: Some(until.saturating_duration_since(Instant::now())),
                }));
            }
            Phase::Connecting => {
                self.batch = Some(Batch {
                    id,
                    waiting: Some(messages),
                    left,
                    reply,
                })
            }
            Phase::Up => {
                self.queue(id, messages);
                self.batch = Some(Batch {
                    id,
                    waiting: None,
                    left,
                    reply,
                });
            }
        }
    }

    fn queue(&mut self, id: u64, messages: Vec<Message>) {
        self.outbound.extend(
            messages
                .into_iter()
                .map(|m| Out::Publish(Tag::Event(id), m)),
        );
    }

    /// Hands queued publishes and acks to rumqttc, publishes within the in-flight window.
    fn flush(&mut self) {
        while let Some(front) = self.outbound.front() {
            match front {
                Out::Publish(tag, m) => {
                    if self.awaiting.len() + self.inflight.len() >= self.window {
                        return;
                    }
                    let (tag, topic, payload) = (*tag, m.topic.clone(), m.payload.clone());
                    if self
                        .client
                        .try_publish(topic, QoS::AtLeastOnce, false, payload)
                        .is_err()
                    {
                        return; // the request channel is full; an event will bring us back
                    }
                    self.awaiting.push_back(tag);
                    self.stats().published += 1;
                }
                Out::Ack(p) => {
                    if self.client.try_ack(p).is_err() {
                        return;
                    }
                }
            }
            self.outbound.pop_front();
        }
    }

    fn on_event(&mut self, ev: Result<Event, ConnectionError>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => return self.on_failure(&e),
        };
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.phase = Phase::Up;
                self.connection += 1;
                let recovered = self.last.take().is_some();
                self.failures = 0;
                {
                    let mut st = self.stats();
                    st.connected = true;
                    st.connections += 1;
                    st.last_error = None;
                }
                log::info!(
                    "mqtt: connected to {}:{} (session present: {}){}",
                    self.s.host,
                    self.s.port,
                    ack.session_present,
                    if recovered { " again" } else { "" }
                );
                if self.s.commands {
                    let filter = self.s.topics.command_filter();
                    if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                        log::error!("mqtt: cannot subscribe to commands: {e}");
                    }
                }
                if let Some(b) = self.batch.as_mut() {
                    if let Some(m) = b.waiting.take() {
                        let id = b.id;
                        self.queue(id, m);
                    }
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let filter = self.s.topics.command_filter();
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    log::error!("mqtt: the broker refused the subscription to {filter}: check the credential's permissions (ACL)");
                    self.stats().subscribed = false;
                } else {
                    log::info!("mqtt: taking commands on {filter}");
                    self.stats().subscribed = true;
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(tag) = self.inflight.remove(&ack.pkid) {
                    self.acked(tag);
                }
            }
            Event::Incoming(Packet::Publish(p)) => self.on_incoming(p),
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                let tag = match self.collided.take() {
                    Some((c, tag)) if c == pkid => Some(tag),
                    other => {
                        self.collided = other;
                        self.awaiting.pop_front()
                    }
                };
                if let Some(tag) = tag {
                    self.inflight.insert(pkid, tag);
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                self.collided = self.awaiting.pop_front().map(|t| (pkid, t));
            }
            _ => {}
        }
    }

    fn acked(&mut self, tag: Tag) {
        let Tag::Event(id) = tag else { return };
        self.stats().acked += 1;
        let done = match self.batch.as_mut() {
            Some(b) if b.id == id => {
                b.left -= 1;
                b.left == 0
            }
            _ => false,
        };
        if done {
            if let Some(b) = self.batch.take() {
                let _ = b.reply.send(Ok(()));
            }
        }
    }

    fn on_incoming(&mut self, p: Publish) {
        let command = self.s.topics.command_of(&p.topic).map(str::to_string);
        match &self.work {
            Some(work) => {
                let w = Work {
                    connection: self.connection,
                    publish: p,
                    command,
                };
                if work.send(w).is_err() {
                    log::error!("mqtt: the command thread has stopped");
                }
            }
            None => {
                log::warn!(
                    "mqtt: unexpected message on {} (commands are off)",
                    Untrusted(&p.topic)
                );
                self.outbound.push_back(Out::Ack(p));
            }
        }
    }

    fn on_done(&mut self, d: Done) {
        if d.connection != self.connection || self.phase != Phase::Up {
            // The broker sends the command again on the next connection and it is acknowledged
            // then: answered from its nonce's stored result, or run again if that was not
            // stored (credits are idempotent by reference).
            log::info!(
                "mqtt: a command from {} finished after its connection closed; the broker redelivers it",
                Untrusted(&d.publish.topic)
            );
            return;
        }
        if let Some(a) = d.answer {
            let topic = self
                .s
                .topics
                .command_result(a.id.as_deref().unwrap_or("invalid"));
            self.outbound.push_back(Out::Publish(
                Tag::Result,
                Message {
                    topic,
                    payload: a.result.to_string().into_bytes(),
                },
            ));
            let mut st = self.stats();
            st.commands += 1;
            if !a.ok() {
                st.commands_refused += 1;
            }
            drop(st);
        }
        self.outbound.push_back(Out::Ack(d.publish));
    }

    fn on_failure(&mut self, e: &ConnectionError) {
        let failure = tls::classify(e, &self.s.host, self.s.port);
        let was_up = self.phase == Phase::Up;
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(self.failures, self.s.reconnect_min, self.s.reconnect_max);
        self.phase = Phase::Down {
            until: Instant::now() + wait,
        };
        self.outbound.clear();
        self.awaiting.clear();
        self.inflight.clear();
        self.collided = None;
        if let Some(b) = self.batch.take() {
            let _ = b.reply.send(Err(Refusal {
                reason: failure.message.clone(),
                retry_after: Some(wait),
            }));
        }
        {
            let mut st = self.stats();
            st.connected = false;
            st.subscribed = false;
            st.last_error = Some(failure.message.clone());
        }
        // A first, actionable refusal (password, CA, host name) is an error; then warnings.
        let repeated = self.last.as_ref() == Some(&failure);
        if was_up {
            log::warn!(
                "mqtt: connection lost: {}; reconnecting in {wait:?}",
                failure.message
            );
        } else if failure.kind == FailureKind::Network || repeated {
            log::warn!("mqtt: {}; next attempt in {wait:?}", failure.message);
        } else {
            log::error!("mqtt: {}; next attempt in {wait:?}", failure.message);
        }
        self.last = Some(failure);
    }
}

/// `min`, doubling per failure up to `max`, each drawn from [½, 1] of its step.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let step = min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_min_to_max_with_jitter() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(8));
        for failures in 1..40 {
            let step = (min * (1u32 << (failures - 1).min(16))).min(max);
            let d = backoff(failures, min, max);
            assert!(d >= step / 2 && d <= step, "{failures}: {d:?}");
        }
    }
}
