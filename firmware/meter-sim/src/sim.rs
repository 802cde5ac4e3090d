//! A simulation run: provision and credit the meters, run them on a compressed clock with
//! outages, reboots and top-ups, then check every meter's balance against the gateway's.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::info;

use crate::api::Api;
use crate::profile::Profile;
pub use crate::virtual_meter::Mode;
use crate::virtual_meter::{Clock, Control, Endpoint, MeterPlan, MeterStats, VirtualMeter};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub broker: SocketAddr,
    pub api: SocketAddr,
    pub meters: usize,
    /// Meter numbers are `{prefix}{n:04}`.
    pub id_prefix: String,
    pub secret: String,
    pub mode: Mode,
    pub profile: Profile,
    /// Simulated duration.
    pub duration: Duration,
    /// Simulated time per step (one measurement).
    pub step: Duration,
    /// A report every this many steps.
    pub report_every: u32,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Share of meters with one offline episode, and with one reboot.
    pub outage_fraction: f64,
    pub reboot_fraction: f64,
    /// Credit per meter before the run, and how many random top-ups during it.
    pub initial_kes: f64,
    pub topups: usize,
    /// Add the meters to the gateway first (through the admin API).
    pub provision: bool,
    pub seed: u64,
    /// How long to wait, at the end, for reports and balances to settle.
    pub settle_timeout: Duration,
    /// Moves a debug-build gateway's clock (`POST /api/debug/clock`) with the simulated one,
    /// from this Unix time at the first step: the gateway then prices the reports by
    /// simulated time (tariff bands, time of use, month ends). `None`: its clock is left alone.
    pub gateway_clock_from_ms: Option<i64>,
    /// Alert scenarios (issue 17), each on one meter (an index into the meters, from 0).
    pub scenarios: Vec<Scenario>,
    /// Drive the gateway's clock (a debug build's `POST /api/debug/clock`) with the simulated
    /// one, step 0 at this UTC ms: the gateway stamps reports with its own clock, so without
    /// this a simulated week reaches it as a few real seconds and no hourly or daily rule
    /// (spike, site loss) could ever see it.
    pub gateway_clock_from: Option<i64>,
}

/// A load or fault that should raise one alert episode and then end it.
#[derive(Clone, Debug, PartialEq)]
pub enum Scenario {
    /// The meter draws `factor` × its load during `steps`.
    Spike {
        meter: usize,
        steps: Range<u32>,
        factor: f64,
    },
    /// The meter gets no credit (its relay is off) and is wired around its relay during `steps`.
    Bypass { meter: usize, steps: Range<u32> },
    /// The meter is the site's main (bulk) meter (mark it `--main` on the gateway): it supplies
    /// every other meter's load (all on the same profile), and `share` more of its supply is
    /// lost during `steps` (drawn by nobody metered: theft, a leak).
    SiteLoss {
        main: usize,
        steps: Range<u32>,
        share: f64,
    },
}

impl Scenario {
    /// Parses `spike:METER:FROM_STEP:STEPS:FACTOR`, `bypass:METER:FROM:STEPS` or
    /// `site-loss:MAIN:FROM:STEPS:SHARE` (the command line's `--scenario`).
    pub fn parse(s: &str) -> Result<Scenario, String> {
        let p: Vec<&str> = s.split(':').collect();
        let int = |i: usize| -> Result<u32, String> {
            p.get(i)
                .ok_or_else(|| format!("scenario {s:?} needs more numbers"))?
                .parse()
                .map_err(|e| format!("scenario {s:?}: {e}"))
        };
        let float = |i: usize| -> Result<f64, String> {
            p.get(i)
                .ok_or_else(|| format!("scenario {s:?} needs more numbers"))?
                .parse()
                .map_err(|e| format!("scenario {s:?}: {e}"))
        };
        let meter = int(1)? as usize;
        let steps = int(2)?..int(2)?.saturating_add(int(3)?);
        match p[0] {
            "spike" => Ok(Scenario::Spike {
                meter,
                steps,
                factor: float(4)?,
            }),
            "bypass" => Ok(Scenario::Bypass { meter, steps }),
            "site-loss" => Ok(Scenario::SiteLoss {
                main: meter,
                steps,
                share: float(4)?,
            }),
            other => Err(format!(
                "unknown scenario {other:?} (spike, bypass, site-loss)"
            )),
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            broker: ([127, 0, 0, 1], 1883).into(),
            api: ([127, 0, 0, 1], 8080).into(),
            meters: 10,
            id_prefix: "SIM".into(),
            secret: "sim-meter-secret".into(),
            mode: Mode::V2,
            profile: Profile::Daily {
                base_ma: 300,
                peak_ma: 9000,
            },
            duration: Duration::from_secs(4 * 3600),
            step: Duration::from_secs(60),
            report_every: 5,
            speed: 1800.0,
            outage_fraction: 0.3,
            reboot_fraction: 0.1,
            initial_kes: 20.0,
            topups: 50,
            provision: true,
            seed: 1,
            settle_timeout: Duration::from_secs(30),
            gateway_clock_from_ms: None,
            scenarios: Vec::new(),
            gateway_clock_from: None,
        }
    }
}

/// The end-of-run summary.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub meters: usize,
    pub mode: String,
    pub simulated: Duration,
    pub real: Duration,
    /// Of `real`, the time spent provisioning, crediting and connecting before the clock starts.
    pub setup: Duration,
    pub reports: u64,
    pub publishes: u64,
    pub acknowledged: u64,
    pub dropped: u64,
    pub commands: u64,
    pub stale_commands: u64,
    pub connects: u64,
    /// Planned offline episodes and reboots cut connections; so can the network.
    pub outages: u64,
    pub connection_errors: u64,
    pub reboots: u64,
    pub credits: u64,
    pub meter_energy_wh: u64,
    /// Energy the meters counted after their baseline report: what the ledger must debit.
    pub billable_wh: u64,
    pub gateway_consumed_wh: i64,
    pub lost_at_reboot_wh: u64,
    /// Meters whose balance equals the gateway's, and the worst difference.
    pub agreeing: usize,
    pub max_difference_wh: i64,
    pub disagreements: Vec<(String, Option<i64>, i64)>,
    /// Power-limiter trips, lockouts among them, and `power_trip` statuses published.
    pub power_trips: u64,
    pub lockouts: u64,
    pub trip_reports: u64,
    /// Meter-steps ended with the daily allowance used up; the most any meter used in a day.
    pub allowance_off_steps: u64,
    pub max_used_today_wh: u64,
    pub configs_refused: u64,
}

impl Summary {
    pub fn all_agree(&self) -> bool {
        self.agreeing == self.meters
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "meter-sim summary ({} mode)", self.mode)?;
        writeln!(
            f,
            "  meters            {} over {:.1} simulated hours in {:.1} s ({:.1} s of it setting up and connecting)",
            self.meters,
            self.simulated.as_secs_f64() / 3600.0,
            self.real.as_secs_f64(),
            self.setup.as_secs_f64()
        )?;
        writeln!(
            f,
            "  reports           {} taken, {} publishes (incl. replays), {} acknowledged, {} dropped",
            self.reports, self.publishes, self.acknowledged, self.dropped
        )?;
        writeln!(
            f,
            "  commands          {} applied or seen, {} stale ignored",
            self.commands, self.stale_commands
        )?;
        writeln!(
            f,
            "  episodes          {} connects, {} outages, {} reboots, {} connection errors, {} credits",
            self.connects, self.outages, self.reboots, self.connection_errors, self.credits
        )?;
        writeln!(
            f,
            "  energy            meters {} Wh ({} Wh after their baseline reports), gateway debited {} Wh, lost at power cuts {} Wh",
            self.meter_energy_wh, self.billable_wh, self.gateway_consumed_wh, self.lost_at_reboot_wh
        )?;
        writeln!(
            f,
            "  limits            {} power trips ({} lockouts, {} reported), {} steps off at the daily allowance (most in a day {} Wh), {} configs refused",
            self.power_trips,
            self.lockouts,
            self.trip_reports,
            self.allowance_off_steps,
            self.max_used_today_wh,
            self.configs_refused
        )?;
        write!(
            f,
            "  balance agreement {}/{} meters equal to the gateway (max difference {} Wh)",
            self.agreeing, self.meters, self.max_difference_wh
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Runs `f` over the meters with at most `limit` at a time.
async fn for_each_meter<F, Fut>(ids: &[String], limit: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(limit));
    let mut set = JoinSet::new();
    for id in ids {
        let permit = gate.clone().acquire_owned().await?;
        let fut = f(id.clone());
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

pub async fn run(cfg: SimConfig) -> anyhow::Result<Summary> {
    if cfg.meters == 0 || cfg.report_every == 0 || cfg.speed <= 0.0 || cfg.step.is_zero() {
        bail!("meters, report_every, speed and step must be positive");
    }
    let started = Instant::now();
    let api = Api { addr: cfg.api };
    let ids: Vec<String> = (1..=cfg.meters)
        .map(|n| format!("{}{n:04}", cfg.id_prefix))
        .collect();
    if cfg.provision {
        let (api, secret) = (api.clone(), cfg.secret.clone());
        for_each_meter(&ids, 4, move |id| {
            let (api, secret) = (api.clone(), secret.clone());
            async move {
                api.provision(&id, &secret)
                    .await
                    .with_context(|| format!("provisioning {id}"))
            }
        })
        .await?;
        info!(meters = ids.len(), "meters provisioned");
    }
    let mut credits = 0u64;
    // A bypass needs its relay off: that meter gets no credit.
    let unpaid: Vec<String> = cfg
        .scenarios
        .iter()
        .filter_map(|s| match s {
            Scenario::Bypass { meter, .. } => ids.get(*meter).cloned(),
            _ => None,
        })
        .collect();
    let paid: Vec<String> = ids
        .iter()
        .filter(|id| !unpaid.contains(id))
        .cloned()
        .collect();
    if cfg.initial_kes > 0.0 {
        let (api, kes) = (api.clone(), cfg.initial_kes);
        for_each_meter(&paid, 8, move |id| {
            let api = api.clone();
            async move {
                api.credit(&id, kes)
                    .await
                    .map(drop)
                    .with_context(|| format!("crediting {id}"))
            }
        })
        .await?;
        credits += paid.len() as u64;
    }
    if let Some(t0) = cfg.gateway_clock_from {
        api.debug_clock(t0)
            .await
            .context("setting the gateway's debug clock (a debug build of the gateway?)")?;
    }

    let steps = (cfg.duration.as_millis() / cfg.step.as_millis()).max(1) as u32;
    let clock = Clock {
        steps,
        step_ms: cfg.step.as_millis() as u32,
        step_real: cfg.step.div_f64(cfg.speed),
        report_every: cfg.report_every,
        start_unix_ms: now_ms(),
        start_of_day_s: 6 * 3600,
    };
    let endpoint = Endpoint {
        broker: cfg.broker,
        topic_prefix: "smartmeter",
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (start_tx, start_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (drained_tx, mut drained_rx) = mpsc::unbounded_channel();
    let (gate_tx, gate_rx) = watch::channel(if cfg.gateway_clock_from.is_some() {
        0
    } else {
        u32::MAX
    });
    let control = Arc::new(Control {
        start: start_rx,
        ready: ready_tx,
        stop: stop_rx,
        drained: drained_tx,
        views: Mutex::new(HashMap::new()),
        progress: Mutex::new(HashMap::new()),
        stepped: tokio::sync::Notify::new(),
        gate: gate_rx,
    });
    let mut meters = JoinSet::new();
    for id in &ids {
        let mut offline = Vec::new();
        if rng.gen_bool(cfg.outage_fraction.clamp(0.0, 1.0)) && steps > 4 {
            let start = rng.gen_range(1..steps - 2);
            let len = rng.gen_range(2..=(steps / 4).max(3));
            offline.push(start..(start + len).min(steps - 1));
        }
        let mut reboots = Vec::new();
        if rng.gen_bool(cfg.reboot_fraction.clamp(0.0, 1.0)) && steps > 2 {
            // Half of the reboots happen during the outage, when unacknowledged reports wait.
            let at = match offline.first() {
                Some(r) if rng.gen_bool(0.5) && r.len() > 1 => rng.gen_range(r.clone()),
                _ => rng.gen_range(1..steps),
            };
            reboots.push(at);
        }
        let mut plan = MeterPlan {
            id: id.clone(),
            secret: cfg.secret.clone(),
            mode: cfg.mode,
            profile: cfg.profile,
            offline,
            reboots,
            seed: rng.gen(),
            demand_factor: 1.0,
            demand_windows: Vec::new(),
            bypass: Vec::new(),
        };
        for s in &cfg.scenarios {
            match s {
                Scenario::Spike {
                    meter,
                    steps,
                    factor,
                } if ids.get(*meter) == Some(id) => {
                    plan.demand_windows.push((steps.clone(), *factor));
                }
                Scenario::Bypass { meter, steps } if ids.get(*meter) == Some(id) => {
                    plan.bypass.push(steps.clone());
                }
                Scenario::SiteLoss { main, steps, share } if ids.get(*main) == Some(id) => {
                    plan.demand_factor = (ids.len() - 1) as f64;
                    plan.demand_windows
                        .push((steps.clone(), 1.0 / (1.0 - share.clamp(0.0, 0.9))));
                }
                _ => {}
            }
        }
        let vm = VirtualMeter::new(plan, clock, endpoint);
        meters.spawn(vm.run(control.clone()));
    }

    // Every meter connected (bounded), then the clock starts.
    let deadline = Instant::now() + cfg.settle_timeout;
    let mut ready = 0;
    while ready < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    info!(ready, meters = ids.len(), "meters connected; clock starts");
    let connected_at = started.elapsed();
    let _ = start_tx.send(true);
    // The gateway's clock follows the simulated one, a step at a time.
    let clock_driver = cfg.gateway_clock_from_ms.map(|from| {
        let api = api.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(clock.step_real);
            for step in 0..=i64::from(steps) {
                tick.tick().await;
                let _ = api
                    .debug_clock(from + step * i64::from(clock.step_ms))
                    .await;
            }
        })
    });
    let driver = cfg.gateway_clock_from.map(|t0| {
        tokio::spawn(drive_gateway_clock(
            api.clone(),
            control.clone(),
            ids.clone(),
            t0,
            clock,
            gate_tx,
        ))
    });

    // Top-ups while the meters run, spread over the run.
    let run_real = clock.step_real * steps;
    if cfg.topups > 0 {
        let gap = run_real / cfg.topups as u32;
        for _ in 0..cfg.topups {
            tokio::time::sleep(gap).await;
            let id = &ids[rng.gen_range(0..ids.len())];
            let kes = rng.gen_range(1..=10) as f64 * 10.0;
            api.credit(id, kes)
                .await
                .with_context(|| format!("top-up of {id}"))?;
            credits += 1;
        }
    }

    // In lockstep with the gateway's clock the run takes as long as the gateway's folds do,
    // not `run_real`: wait for the driver (bounded: 100 ms of real time per step at most).
    if let Some(driver) = driver {
        let bound = cfg.settle_timeout + Duration::from_millis(100) * steps;
        if tokio::time::timeout(bound, driver).await.is_err() {
            bail!("the meters did not finish their steps within {bound:?} of the gateway's clock");
        }
    }
    // Every meter settled: final report acknowledged (v2) or retained balance fetched (v1).
    let deadline = Instant::now() + run_real + cfg.settle_timeout;
    let mut drained = 0;
    while drained < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, drained_rx.recv()).await {
            Ok(Some(_)) => drained += 1,
            Ok(None) => break,
            Err(_) => break,
        }
    }
    info!(drained, meters = ids.len(), "meters settled");
    if let Some(driver) = clock_driver {
        let _ = driver.await;
    }
    if let Some(t0) = cfg.gateway_clock_from {
        // The end of the run, one report interval on: the rules judge the last reports.
        let end = t0 + i64::from(clock.step_ms) * i64::from(steps + clock.report_every);
        api.debug_clock(end)
            .await
            .context("the gateway's debug clock")?;
    }

    // Balance commands may trail the PUBACKs a little: poll until all agree (bounded).
    let settle_deadline = Instant::now() + cfg.settle_timeout;
    let mut pause = Duration::from_millis(20);
    let (gateway, views) = loop {
        let gateway = api.meters().await?;
        let views = control
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let agree = ids
            .iter()
            .all(|id| gateway.get(id).map(|g| Some(g.balance_wh)) == views.get(id).copied());
        if agree || Instant::now() >= settle_deadline {
            break (gateway, views);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    };
    let _ = stop_tx.send(true);
    let mut stats: Vec<MeterStats> = Vec::new();
    while let Some(s) = meters.join_next().await {
        stats.push(s.context("meter task")?);
    }

    let mut s = Summary {
        meters: ids.len(),
        mode: format!("{:?}", cfg.mode).to_lowercase(),
        simulated: cfg.step * steps,
        real: started.elapsed(),
        setup: connected_at,
        credits,
        ..Summary::default()
    };
    for m in &stats {
        s.reports += m.reports;
        s.publishes += m.publishes;
        s.acknowledged += m.acked;
        s.dropped += m.dropped;
        s.commands += m.commands;
        s.stale_commands += m.stale_commands;
        s.connects += m.connects;
        s.outages += m.outages;
        s.connection_errors += m.connection_errors;
        s.reboots += m.reboots;
        s.meter_energy_wh += m.energy_wh;
        s.billable_wh += m.energy_wh - m.baseline_wh.unwrap_or(0).min(m.energy_wh);
        s.lost_at_reboot_wh += m.lost_at_reboot_wh;
        s.power_trips += m.power_trips;
        s.lockouts += m.lockouts;
        s.trip_reports += m.trip_reports;
        s.allowance_off_steps += m.allowance_off_steps;
        s.max_used_today_wh = s.max_used_today_wh.max(m.max_used_today_wh);
        s.configs_refused += m.configs_refused;
    }
    for id in &ids {
        let g = gateway.get(id);
        let gw_balance = g.map(|g| g.balance_wh).unwrap_or_default();
        s.gateway_consumed_wh += g.map(|g| g.total_consumed_wh).unwrap_or_default();
        let mine = views.get(id).copied().flatten();
        if mine == Some(gw_balance) {
            s.agreeing += 1;
        } else {
            let diff = mine.map_or(i64::MAX, |b| (b - gw_balance).abs());
            s.max_difference_wh = s.max_difference_wh.max(diff);
            s.disagreements.push((id.clone(), mine, gw_balance));
        }
    }
    Ok(s)
}

/// Runs the meters in lockstep with the gateway's clock: the clock is set to step `g`'s
/// time (which folds, so the alert rules judge it), then the meters may run one report
/// interval, and the driver waits until every one of them has. A report is stamped with the
/// time of its own interval (or the next, if it arrives after the clock moved on), so no
/// meter looks silent or early for being scheduled later than another.
async fn drive_gateway_clock(
    api: Api,
    control: Arc<Control>,
    ids: Vec<String>,
    t0: i64,
    clock: Clock,
    gate: watch::Sender<u32>,
) {
    let mut g = 0u32;
    loop {
        let at = t0 + i64::from(clock.step_ms) * i64::from(g);
        if let Err(e) = api.debug_clock(at).await {
            tracing::warn!(error = %e, "cannot move the gateway's debug clock");
        }
        if g >= clock.steps {
            gate.send_replace(u32::MAX);
            return;
        }
        g = g.saturating_add(clock.report_every).min(clock.steps);
        gate.send_replace(g);
        loop {
            let slowest = {
                let p = control.progress.lock().unwrap_or_else(|e| e.into_inner());
                ids.iter()
                    .map(|id| p.get(id).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(g)
            };
            if slowest >= g {
                break;
            }
            control.stepped.notified().await;
        }
    }
}
