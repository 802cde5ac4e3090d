//! One virtual meter: `meter-core` (v2) or the Arduino firmware's behaviour (v1), a load
//! profile, and a schedule of offline episodes and reboots, over its own MQTT connection.
//!
//! Each online episode is a fresh rumqttc connection; an outage drops it without DISCONNECT,
//! as a WiFi loss would. In v2 every unacknowledged report is replayed on the next connection
//! (`Meter::on_connected`), and a reboot restores the state last saved (after each report and
//! each applied command), exactly as the firmware does with its flash log.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meter_core::command::CommandError;
use meter_core::meter::{Applied, MeterCommandError};
use meter_core::snapshot::state_len;
use meter_core::{Meter, MeterConfig, Relay};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::profile::Profile;

/// Reports a virtual meter keeps while offline.
pub const OUTBOX: usize = 512;
/// Reconnect backoff bounds (real time), as the firmware's 1 s…60 s scaled down.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// QoS 1 reports in flight per connection.
const WINDOW: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Our firmware: numbered QoS 1 reports with a cumulative register, replayed until acked.
    V2,
    /// The original Arduino firmware: QoS 0 retained reports, kWh since boot.
    V1,
}

#[derive(Clone, Debug)]
pub struct MeterPlan {
    pub id: String,
    pub secret: String,
    pub mode: Mode,
    pub profile: Profile,
    /// Steps during which the meter has no network.
    pub offline: Vec<Range<u32>>,
    /// Steps at which the meter loses power and reboots.
    pub reboots: Vec<u32>,
    pub seed: u64,
    /// The load: the profile's current times `demand_factor`, and times each window's factor
    /// while a step is in it (a spike; a main meter's supply).
    pub demand_factor: f64,
    pub demand_windows: Vec<(Range<u32>, f64)>,
    /// Steps during which current flows whatever the relay says: wired around it (a bypass).
    pub bypass: Vec<Range<u32>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub steps: u32,
    /// Simulated time per step.
    pub step_ms: u32,
    /// Real time per step (time compression).
    pub step_real: Duration,
    pub report_every: u32,
    pub start_unix_ms: u64,
    /// Simulated time of day at step 0, seconds after midnight.
    pub start_of_day_s: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub broker: SocketAddr,
    pub topic_prefix: &'static str,
}

/// What one meter did, for the summary.
#[derive(Clone, Debug, Default)]
pub struct MeterStats {
    pub reports: u64,
    pub publishes: u64,
    pub acked: u64,
    pub dropped: u64,
    pub commands: u64,
    pub stale_commands: u64,
    pub connects: u64,
    pub outages: u64,
    pub connection_errors: u64,
    pub reboots: u64,
    pub energy_wh: u64,
    /// v2: the register in the first report, the gateway's baseline (it debits nothing).
    pub baseline_wh: Option<u64>,
    /// Energy measured after the last save and lost at a reboot (v2) or the v1 counter reset.
    pub lost_at_reboot_wh: u64,
    pub balance_wh: Option<i64>,
    /// Power-limiter trips, and of them the ones that locked the relay off.
    pub power_trips: u64,
    pub lockouts: u64,
    /// `power_trip` statuses handed to the connection (a trip while offline is reported on
    /// the next connection; only the latest one waits).
    pub trip_reports: u64,
    /// Steps that ended with the relay off because today's allowance was used up.
    pub allowance_off_steps: u64,
    /// The most Wh the meter counted within one local day (its allowance's view).
    pub max_used_today_wh: u64,
    /// `command/config` refused for a value out of range (an `error` status was published).
    pub configs_refused: u64,
}

/// Shared between the meters and the controller.
pub struct Control {
    /// Raised once every meter is connected: the simulated clock starts.
    pub start: watch::Receiver<bool>,
    pub ready: mpsc::UnboundedSender<String>,
    pub stop: watch::Receiver<bool>,
    pub drained: mpsc::UnboundedSender<String>,
    pub views: Mutex<HashMap<String, Option<i64>>>,
    /// Each meter's next step, for the driver of the gateway's debug clock, and a wake-up
    /// after every step.
    pub progress: Mutex<HashMap<String, u32>>,
    pub stepped: tokio::sync::Notify,
    /// Meters run steps below this only (`u32::MAX`: free running); the driver of the
    /// gateway's debug clock opens it one report interval at a time.
    pub gate: watch::Receiver<u32>,
}

enum Brain {
    V2 {
        meter: Box<Meter<OUTBOX>>,
        saved: Vec<u8>,
    },
    V1(V1Meter),
}

/// The Arduino firmware: balance in float units overwritten by every command, decremented
/// locally by each interval's consumption; kWh counter restarting at 0 on boot.
struct V1Meter {
    balance_units: Option<f64>,
    since_boot: meter_core::energy::Register,
    last_total: f64,
}

#[derive(Clone, Copy, Debug)]
enum Tag {
    Report(u32),
    Barrier,
    Fire,
}

struct Conn {
    client: AsyncClient,
    events: EventLoop,
    connected: bool,
    /// Publishes handed to rumqttc, in order, not yet given a packet id.
    awaiting: VecDeque<Tag>,
    by_pkid: HashMap<u16, Tag>,
}

pub struct VirtualMeter {
    plan: MeterPlan,
    clock: Clock,
    endpoint: Endpoint,
    brain: Brain,
    conn: Option<Conn>,
    stats: MeterStats,
    rng: StdRng,
    topic_consumption: String,
    topic_commands: String,
    command_prefix: String,
    v1: V1Settle,
    /// v1: energy counted before the last reboot (the Arduino's counter restarts at 0).
    v1_earlier_boots_wh: u64,
    /// A power trip not yet published as a `power_trip` status.
    trip_to_send: Option<meter_core::limits::Trip>,
    /// `error` statuses (a refused config) not yet published.
    errors_to_send: VecDeque<String>,
    /// Real-time reconnect backoff after a failed or lost connection.
    backoff: Duration,
    reconnect_at: tokio::time::Instant,
}

/// The v1 meter's way to a settled balance at the end of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V1Settle {
    Running,
    SendFinal,
    WaitBarrier,
    BarrierAcked,
    WaitRetained,
    Done,
}

impl VirtualMeter {
    pub fn new(plan: MeterPlan, clock: Clock, endpoint: Endpoint) -> Self {
        let brain = match plan.mode {
            Mode::V2 => Brain::V2 {
                meter: Box::new(Meter::new(MeterConfig::default())),
                saved: Vec::new(),
            },
            Mode::V1 => Brain::V1(V1Meter {
                balance_units: None,
                since_boot: Default::default(),
                last_total: 0.0,
            }),
        };
        let p = endpoint.topic_prefix;
        VirtualMeter {
            topic_consumption: format!("{p}/{}/consumption", plan.id),
            topic_commands: format!("{p}/{}/command/#", plan.id),
            command_prefix: format!("{p}/{}/command/", plan.id),
            rng: StdRng::seed_from_u64(plan.seed),
            plan,
            clock,
            endpoint,
            brain,
            conn: None,
            stats: MeterStats::default(),
            v1: V1Settle::Running,
            v1_earlier_boots_wh: 0,
            trip_to_send: None,
            errors_to_send: VecDeque::new(),
            backoff: MIN_BACKOFF,
            reconnect_at: tokio::time::Instant::now(),
        }
    }

    fn online_at(&self, step: u32) -> bool {
        !self.plan.offline.iter().any(|r| r.contains(&step))
    }

    fn relay(&self) -> Relay {
        match &self.brain {
            Brain::V2 { meter, .. } => meter.relay(),
            Brain::V1(m) => match m.balance_units {
                Some(b) if b > 0.0 => Relay::On,
                _ => Relay::Off,
            },
        }
    }

    fn balance_wh(&self) -> Option<i64> {
        match &self.brain {
            Brain::V2 { meter, .. } => meter.balance_wh(),
            Brain::V1(m) => m.balance_units.map(|b| (b * 1000.0).round() as i64),
        }
    }

    /// Steps between reports: the `publishIntervalMs` the gateway set, else the run's.
    fn report_every(&self) -> u32 {
        match &self.brain {
            Brain::V2 { meter, .. } => meter
                .publish_interval_ms()
                .map_or(self.clock.report_every, |ms| {
                    (ms / self.clock.step_ms.max(1)).max(1)
                }),
            Brain::V1(_) => self.clock.report_every,
        }
    }

    fn may_connect(&self) -> bool {
        tokio::time::Instant::now() >= self.reconnect_at
    }

    fn connect(&mut self) {
        let mut opts = MqttOptions::new(
            self.plan.id.clone(),
            self.endpoint.broker.ip().to_string(),
            self.endpoint.broker.port(),
        );
        opts.set_credentials(self.plan.id.clone(), self.plan.secret.clone());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        opts.set_inflight(WINDOW as u16 * 2);
        opts.set_last_will(LastWill::new(
            format!("{}/{}/status", self.endpoint.topic_prefix, self.plan.id),
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
        let (client, mut events) = AsyncClient::new(opts, 64);
        // A first CONNECT waits for the gateway's password hashing, queued behind the others.
        events.network_options.set_connection_timeout(30);
        // Queued until the CONNACK; the gateway answers with the retained balance.
        let _ = client.try_subscribe(self.topic_commands.clone(), QoS::AtLeastOnce);
        if let Brain::V2 { meter, .. } = &mut self.brain {
            meter.on_connected();
        }
        self.conn = Some(Conn {
            client,
            events,
            connected: false,
            awaiting: VecDeque::new(),
            by_pkid: HashMap::new(),
        });
        self.stats.connects += 1;
    }

    /// Drops the connection without DISCONNECT (WiFi gone, power cut).
    fn cut(&mut self) {
        if self.conn.take().is_some() {
            self.stats.outages += 1;
        }
    }

    fn save(&mut self) {
        if let Brain::V2 { meter, saved } = &mut self.brain {
            saved.resize(state_len(OUTBOX), 0);
            match meter.encode_state(saved) {
                Ok(n) => saved.truncate(n),
                Err(e) => warn!(meter = %self.plan.id, error = %e, "state too large to save"),
            }
        }
    }

    fn reboot(&mut self) {
        self.conn = None;
        self.stats.reboots += 1;
        match &mut self.brain {
            Brain::V2 { meter, saved } => {
                let before = meter.energy_wh();
                let restored = if saved.is_empty() {
                    Meter::new(MeterConfig::default())
                } else {
                    Meter::restore(MeterConfig::default(), saved).unwrap_or_else(|e| {
                        warn!(error = %e, "saved state unreadable; factory state");
                        Meter::new(MeterConfig::default())
                    })
                };
                self.stats.lost_at_reboot_wh += before - restored.energy_wh();
                **meter = restored;
            }
            Brain::V1(m) => {
                self.stats.lost_at_reboot_wh += m.since_boot.wh() - (m.last_total * 1000.0) as u64;
                self.v1_earlier_boots_wh += m.since_boot.wh();
                *m = V1Meter {
                    balance_units: None,
                    since_boot: Default::default(),
                    last_total: 0.0,
                };
            }
        }
    }

    fn measure(&mut self, step: u32) {
        let sim_s = self.clock.start_of_day_s + step as u64 * self.clock.step_ms as u64 / 1000;
        let mut factor = self.plan.demand_factor;
        for (steps, f) in &self.plan.demand_windows {
            if steps.contains(&step) {
                factor *= f;
            }
        }
        let demand = (self.plan.profile.current_ma(sim_s, &mut self.rng) as f64 * factor) as u32;
        let bypassed = self.plan.bypass.iter().any(|r| r.contains(&step));
        let current = if self.relay() == Relay::On || bypassed {
            demand
        } else {
            0
        };
        let dt = self.clock.step_ms;
        match &mut self.brain {
            Brain::V2 { meter, .. } => {
                meter.measure(current, dt);
                if meter.allowance_exhausted() {
                    self.stats.allowance_off_steps += 1;
                }
                self.stats.max_used_today_wh =
                    self.stats.max_used_today_wh.max(meter.used_today_wh());
                if let Some(t) = meter.take_trip() {
                    self.stats.power_trips += 1;
                    self.stats.lockouts += t.locked_out as u64;
                    // Reported by `pump` once connected; a newer trip replaces an unsent one
                    // (its `trips` count says how many there were), as on the board.
                    self.trip_to_send = Some(t);
                }
            }
            Brain::V1(m) => {
                let p = meter_core::energy::power_mw(current, 230_000, 1000);
                m.since_boot.integrate(p, dt);
            }
        }
    }

    fn report(&mut self, step: u32) {
        let ts = self.clock.start_unix_ms + step as u64 * self.clock.step_ms as u64;
        self.stats.reports += 1;
        match &mut self.brain {
            Brain::V2 { meter, .. } => {
                let r = meter.report(ts);
                self.stats.baseline_wh.get_or_insert(r.energy_wh);
                self.save();
            }
            Brain::V1(m) => {
                // The Arduino publishes QoS 0 retained, only when connected: offline reports are lost.
                let total = m.since_boot.wh() as f64 / 1000.0;
                let used = total - m.last_total;
                m.last_total = total;
                if let Some(b) = m.balance_units.as_mut() {
                    *b -= used;
                }
                let body = serde_json::json!({
                    "meterNo": self.plan.id, "unitsConsumed": used,
                    "remainingBalance": m.balance_units.unwrap_or(0.0),
                    "totalConsumed": total, "timestamp": ts,
                });
                if let Some(c) = self.conn.as_mut().filter(|c| c.connected) {
                    if c.client
                        .try_publish(
                            &self.topic_consumption,
                            QoS::AtMostOnce,
                            true,
                            body.to_string(),
                        )
                        .is_ok()
                    {
                        c.awaiting.push_back(Tag::Fire);
                        self.stats.publishes += 1;
                    }
                }
            }
        }
    }

    /// v2: publishes pending statuses (power trips, refused configs), then fills the
    /// in-flight window from the outbox.
    fn pump(&mut self) {
        let Brain::V2 { meter, .. } = &mut self.brain else {
            return;
        };
        let Some(c) = self.conn.as_mut().filter(|c| c.connected) else {
            return;
        };
        let topic_status = format!("{}/{}/status", self.endpoint.topic_prefix, self.plan.id);
        if let Some(t) = self.trip_to_send {
            let mut buf = [0u8; meter_core::limits::max_trip_status_len(32)];
            let ts = meter.clock_ms().unwrap_or_default();
            match t.encode_status(&self.plan.id, ts, &mut buf) {
                Ok(n) => {
                    if c.client
                        .try_publish(&topic_status, QoS::AtLeastOnce, false, buf[..n].to_vec())
                        .is_ok()
                    {
                        c.awaiting.push_back(Tag::Fire);
                        self.trip_to_send = None;
                        self.stats.trip_reports += 1;
                    }
                }
                Err(e) => {
                    warn!(meter = %self.plan.id, error = %e, "trip status does not encode");
                    self.trip_to_send = None;
                }
            }
        }
        while let Some(body) = self.errors_to_send.pop_front() {
            if c.client
                .try_publish(&topic_status, QoS::AtLeastOnce, false, body.clone())
                .is_err()
            {
                self.errors_to_send.push_front(body);
                break;
            }
            c.awaiting.push_back(Tag::Fire);
        }
        while c.awaiting.len() + c.by_pkid.len() < WINDOW {
            let Some(r) = meter.next_to_send() else { break };
            let mut buf = [0u8; 256];
            let Ok(n) = r.encode_v2(&self.plan.id, &mut buf) else {
                warn!(meter = %self.plan.id, "report does not encode");
                break;
            };
            if c.client
                .try_publish(
                    &self.topic_consumption,
                    QoS::AtLeastOnce,
                    false,
                    buf[..n].to_vec(),
                )
                .is_err()
            {
                // The session is going away; the report is replayed on the next one.
                break;
            }
            c.awaiting.push_back(Tag::Report(r.seq));
            self.stats.publishes += 1;
        }
    }

    fn on_event(&mut self, ev: Event) {
        let Some(c) = self.conn.as_mut() else { return };
        match ev {
            Event::Incoming(Packet::ConnAck(a)) => {
                if a.code == ConnectReturnCode::Success {
                    c.connected = true;
                    self.backoff = MIN_BACKOFF;
                } else {
                    warn!(meter = %self.plan.id, code = ?a.code, "gateway refused the meter");
                    self.conn = None;
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(tag) = c.awaiting.pop_front() {
                    if !matches!(tag, Tag::Fire) {
                        c.by_pkid.insert(pkid, tag);
                    }
                }
            }
            Event::Incoming(Packet::PubAck(a)) => match c.by_pkid.remove(&a.pkid) {
                Some(Tag::Report(seq)) => {
                    if let Brain::V2 { meter, .. } = &mut self.brain {
                        if meter.on_puback(seq) {
                            self.stats.acked += 1;
                        }
                    }
                }
                Some(Tag::Barrier) => self.v1 = V1Settle::BarrierAcked,
                Some(Tag::Fire) | None => {}
            },
            Event::Incoming(Packet::Publish(p)) => {
                let Some(leaf) = p.topic.strip_prefix(&self.command_prefix) else {
                    return;
                };
                let leaf = leaf.to_string();
                self.on_command(&leaf, &p.payload);
            }
            _ => {}
        }
    }

    fn on_command(&mut self, leaf: &str, payload: &[u8]) {
        self.stats.commands += 1;
        match &mut self.brain {
            Brain::V2 { meter, .. } => match meter.on_command(leaf, payload) {
                Ok(Applied::Balance { acked, .. }) => {
                    self.stats.acked += acked as u64;
                    self.save();
                }
                Ok(_) => self.save(),
                Err(MeterCommandError::Parse(e @ CommandError::ConfigRefused { .. })) => {
                    // The firmware's `command_result`: an `error` status naming the field.
                    self.stats.configs_refused += 1;
                    warn!(meter = %self.plan.id, error = %e, "config refused");
                    let mut buf = [0u8; 256];
                    if let Ok(n) =
                        meter_core::limits::encode_error_status(&self.plan.id, e, &mut buf)
                    {
                        self.errors_to_send
                            .push_back(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
                Err(MeterCommandError::Stale(s)) => {
                    self.stats.stale_commands += 1;
                    debug!(meter = %self.plan.id, %s, "stale command ignored");
                }
                Err(e) => warn!(meter = %self.plan.id, error = %e, "command ignored"),
            },
            Brain::V1(m) => {
                if leaf == "balance" {
                    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
                    if let Some(b) = v["balance"].as_f64() {
                        m.balance_units = Some(b);
                        if self.v1 == V1Settle::WaitRetained {
                            self.v1 = V1Settle::Done;
                        }
                    }
                }
            }
        }
    }

    /// The next MQTT event, or never when offline.
    async fn next_event(conn: &mut Option<Conn>) -> Result<Event, rumqttc::ConnectionError> {
        match conn {
            Some(c) => c.events.poll().await,
            None => std::future::pending().await,
        }
    }

    fn handle(&mut self, ev: Result<Event, rumqttc::ConnectionError>) {
        match ev {
            Ok(ev) => self.on_event(ev),
            Err(e) => {
                debug!(meter = %self.plan.id, error = %e, "connection lost");
                if self.stats.connection_errors == 0 {
                    warn!(meter = %self.plan.id, error = %e, "connection lost");
                }
                self.stats.connection_errors += 1;
                self.conn = None;
                self.reconnect_at = tokio::time::Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn drained(&self) -> bool {
        match &self.brain {
            Brain::V2 { meter, .. } => {
                meter.outbox().is_empty()
                    && self.conn.as_ref().is_some_and(|c| {
                        c.connected && c.by_pkid.is_empty() && c.awaiting.is_empty()
                    })
            }
            Brain::V1(_) => self.v1 == V1Settle::Done,
        }
    }

    fn publish_view(&self, control: &Control) {
        let mut views = control.views.lock().unwrap_or_else(|e| e.into_inner());
        views.insert(self.plan.id.clone(), self.balance_wh());
    }

    /// Runs the schedule, then settles: online, no load, a final report, everything
    /// acknowledged; then keeps applying commands until the controller says stop.
    pub async fn run(mut self, control: Arc<Control>) -> MeterStats {
        // Connect first and wait for the common start, so the schedule runs with every meter
        // online (first connections queue behind the gateway's password hashing).
        let mut start = control.start.clone();
        let mut announced_ready = false;
        loop {
            if self.conn.is_none() && self.may_connect() {
                self.connect();
            }
            if !announced_ready && self.conn.as_ref().is_some_and(|c| c.connected) {
                announced_ready = true;
                let _ = control.ready.send(self.plan.id.clone());
            }
            tokio::select! {
                ev = Self::next_event(&mut self.conn) => self.handle(ev),
                _ = tokio::time::sleep_until(self.reconnect_at), if self.conn.is_none() => {}
                changed = start.changed() => {
                    if changed.is_err() || *start.borrow() {
                        break;
                    }
                }
            }
        }
        let mut tick = tokio::time::interval(self.clock.step_real);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut step = 0u32;
        let mut gate = control.gate.clone();
        let mut reached = 0u32;
        while step < self.clock.steps {
            let open = step < *gate.borrow();
            tokio::select! {
                ev = Self::next_event(&mut self.conn) => self.handle(ev),
                // A dropped sender leaves the gate as it is, open or not: the run is ending.
                r = gate.changed(), if !open => if r.is_err() { break },
                // A lost connection comes back while the gate is shut too (the driver waits
                // for this meter's reports).
                _ = tokio::time::sleep_until(self.reconnect_at), if !open && self.conn.is_none() && self.online_at(step) => {
                    if self.may_connect() {
                        self.connect();
                    }
                }
                _ = tick.tick(), if open => {
                    if self.plan.reboots.contains(&step) {
                        self.reboot();
                    }
                    match (self.online_at(step), self.conn.is_some()) {
                        (true, false) if self.may_connect() => self.connect(),
                        (true, false) => {}
                        (false, true) => self.cut(),
                        _ => {}
                    }
                    self.measure(step);
                    if step.is_multiple_of(self.report_every()) {
                        self.report(step);
                    }
                    step += 1;
                }
            }
            self.pump();
            // Caught up for the driver of the gateway's clock once every report so far is
            // acknowledged (committed, so stamped by the gateway), or the meter is offline.
            if step > reached && (self.drained() || !self.online_at(step - 1)) {
                reached = step;
                control
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(self.plan.id.clone(), step);
                control.stepped.notify_one();
            }
        }
        // The last steps' reports are settled below, with the others'; the driver need not
        // wait for them (nothing here would tell it once this loop is left).
        control
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.plan.id.clone(), step);
        control.stepped.notify_one();

        if self.plan.mode == Mode::V1 {
            self.v1 = V1Settle::SendFinal;
        }
        // Settle: the network is back for good and the load is off.
        let mut stop = control.stop.clone();
        let mut announced = false;
        if self.plan.mode == Mode::V2 {
            // v2: one last report of the register; it goes out with the replay.
            self.report(self.clock.steps);
        }
        loop {
            if self.conn.is_none() && self.may_connect() {
                self.connect();
                if self.v1 == V1Settle::WaitBarrier {
                    self.v1 = V1Settle::SendFinal;
                }
            }
            let ready = self.conn.as_ref().is_some_and(|c| c.connected);
            if ready && self.v1 == V1Settle::SendFinal && self.plan.mode == Mode::V1 {
                self.report(self.clock.steps);
                if let Some(c) = self.conn.as_mut() {
                    // Everything published before this QoS 1 message on the connection is
                    // committed when its PUBACK arrives.
                    let p = self.endpoint.topic_prefix;
                    let body = format!(
                        r#"{{"meterNo":"{}","balance":0,"timestamp":1}}"#,
                        self.plan.id
                    );
                    if c.client
                        .try_publish(
                            format!("{p}/{}/balance", self.plan.id),
                            QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .is_ok()
                    {
                        c.awaiting.push_back(Tag::Barrier);
                        self.v1 = V1Settle::WaitBarrier;
                    }
                }
            }
            if self.v1 == V1Settle::BarrierAcked {
                // A fresh session brings the retained balance, like the Arduino's boot-time fetch.
                self.conn = None;
                self.connect();
                self.v1 = V1Settle::WaitRetained;
            }
            self.pump();
            self.publish_view(&control);
            if !announced && self.drained() {
                announced = true;
                let _ = control.drained.send(self.plan.id.clone());
            }
            tokio::select! {
                ev = Self::next_event(&mut self.conn) => self.handle(ev),
                _ = tokio::time::sleep_until(self.reconnect_at), if self.conn.is_none() => {}
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
        }
        if let Brain::V2 { meter, .. } = &self.brain {
            self.stats.dropped = meter.outbox().dropped() as u64;
            self.stats.energy_wh = meter.energy_wh();
        }
        if let Brain::V1(m) = &self.brain {
            self.stats.energy_wh = self.v1_earlier_boots_wh + m.since_boot.wh();
        }
        self.stats.balance_wh = self.balance_wh();
        self.stats
    }
}
