//! Anomaly and site-loss alerts (issue 17): pure rules, and [`evaluate`], which the ledger
//! writer runs inside every fold's transaction.
//!
//! Each alert is an episode: one `alert` event `{"alert": NAME, "state": "raised", …}` when it
//! starts and one with `"state": "resolved"` when it ends. Open episodes live in
//! `alert_state`, written in the same transaction as their events, so a restart (even after
//! `kill -9`) neither raises an open episode again nor forgets to resolve it. The ledger's own
//! one-shot alerts (`low_balance`, `balance_exhausted`: a crossing, not an episode) keep their
//! shape and carry no `state`.
//!
//! A rule answers `Some(true)` (the anomaly is there), `Some(false)` (it is not) or `None`
//! (no evidence either way: an open episode stays open, none is raised).

use std::collections::HashMap;

use rusqlite::Connection;
use serde_json::{json, Value};

use crate::meter::MeterId;
use crate::store::{self, ReportFact, StoreError, Watched};
use crate::tariff::calendar::{LocalDate, SiteZone};

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;
/// Site loss looks back this many local days for the newest one with a main reading (a
/// reading by hand is often entered a day or two late).
const SITE_LOSS_LOOKBACK_DAYS: i64 = 7;
/// `meta` key: the UTC hour the spike rule judged last.
const SPIKE_JUDGED_HOUR: &str = "alerts_spike_hour";

/// `[alerts]`: every threshold, with the defaults README documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub enabled: bool,
    /// A complete hour above `spike_factor` × the median of the same hour on the meter's past
    /// `baseline_days` days (and above `spike_floor_wh`) is a spike.
    pub spike_factor: f64,
    pub spike_floor_wh: i64,
    pub baseline_days: i64,
    /// Fewer days of history than this: no spike judgement (a new meter has no baseline).
    pub baseline_min_days: usize,
    /// Power above this while the meter reports its relay off is a bypass.
    pub bypass_power_w: f64,
    /// No consumption for this long while the relay is on.
    pub idle_after_ms: i64,
    /// Not heard from for this long (`report_interval` × `silent_intervals`).
    pub silent_after_ms: i64,
    /// Site loss above this share of the main meter's supply, per local day.
    pub site_loss_share: f64,
    /// The local day of site loss and of daily usage.
    pub zone: SiteZone,
    pub usage_retention_days: i64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            enabled: true,
            spike_factor: 3.0,
            spike_floor_wh: 500,
            baseline_days: 14,
            baseline_min_days: 3,
            bypass_power_w: 20.0,
            idle_after_ms: 24 * MS_PER_HOUR,
            silent_after_ms: 10 * 60_000,
            site_loss_share: 0.10,
            zone: SiteZone::NAIROBI,
            usage_retention_days: store::USAGE_RETENTION_DAYS,
        }
    }
}

/// The episodic alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Spike,
    Bypass,
    NoConsumption,
    RegisterBackwards,
    Silent,
    SiteLoss,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Spike,
        Kind::Bypass,
        Kind::NoConsumption,
        Kind::RegisterBackwards,
        Kind::Silent,
        Kind::SiteLoss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spike => "spike",
            Kind::Bypass => "bypass",
            Kind::NoConsumption => "no_consumption",
            Kind::RegisterBackwards => "register_backwards",
            Kind::Silent => "silent",
            Kind::SiteLoss => "site_loss",
        }
    }
}

// ---- the rules (pure) ----

/// The median of `v` (the mean of the middle two for an even count), 0 for none.
pub fn median(v: &[i64]) -> i64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    match s.len() {
        0 => 0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2,
    }
}

/// Spike: `hour_wh` against the same hour's `history`. `None` with too little history.
/// Returns (spike?, threshold in Wh, median).
pub fn spike(hour_wh: i64, history: &[i64], t: &Thresholds) -> Option<(bool, i64, i64)> {
    if history.len() < t.baseline_min_days {
        return None;
    }
    let med = median(history);
    let threshold = ((med as f64 * t.spike_factor).ceil() as i64).max(t.spike_floor_wh);
    Some((hour_wh > threshold, threshold, med))
}

/// Bypass: power drawn while the meter says its relay is off. `None` without reports; the
/// highest such power when there is one.
pub fn bypass(reports: &[ReportFact], t: &Thresholds) -> Option<(bool, f64)> {
    if reports.is_empty() {
        return None;
    }
    let worst = reports
        .iter()
        .filter(|r| r.relay_reported && !r.relay_on)
        .filter_map(|r| r.power_w)
        .fold(0.0_f64, f64::max);
    Some((worst > t.bypass_power_w, worst))
}

/// The register went backwards without a reboot (v2: `energyWh` fell while `seq` went on).
/// A v1 counter restarts at 0 on every reboot, so its falls are never this alert.
pub fn register_backwards(reports: &[ReportFact]) -> Option<bool> {
    (!reports.is_empty()).then(|| reports.iter().any(|r| r.register_backwards))
}

/// No consumption for `idle_after` while the relay is on, for a meter that is reporting.
pub fn no_consumption(w: &Watched, now: i64, t: &Thresholds) -> Option<bool> {
    let (relay_on, last_report) = (w.relay_on?, w.last_report_at?);
    if !relay_on {
        return Some(false);
    }
    if now - last_report > t.silent_after_ms {
        // A silent meter says nothing about its load: that is the silent alert's business.
        return None;
    }
    let last_use = w.last_use_at.or(w.watched_since)?;
    Some(now - last_use > t.idle_after_ms)
}

/// Silent: not heard from for `silent_after`, counted from no earlier than the gateway's
/// start (`up_since`), so a gateway that was down does not call every meter silent at once.
/// A meter never heard from is not judged.
pub fn silent(last_seen: Option<i64>, up_since: i64, now: i64, t: &Thresholds) -> Option<bool> {
    let heard = last_seen?.max(up_since);
    Some(now - heard > t.silent_after_ms)
}

/// Site loss of a day: (loss above tolerance?, loss share). `None` without supply.
pub fn site_loss(main_wh: i64, sub_wh: i64, t: &Thresholds) -> Option<(bool, f64)> {
    if main_wh <= 0 {
        return None;
    }
    let share = (main_wh - sub_wh) as f64 / main_wh as f64;
    Some((share > t.site_loss_share, share))
}

/// What an episode does given whether it is open and a rule's verdict.
pub fn step(open: bool, verdict: Option<bool>) -> Option<State> {
    match (open, verdict) {
        (false, Some(true)) => Some(State::Raised),
        (true, Some(false)) => Some(State::Resolved),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Raised,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Raised => "raised",
            State::Resolved => "resolved",
        }
    }
}

/// One episode starting or ending, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub meter: Option<MeterId>,
    pub kind: Kind,
    pub state: State,
    pub data: Value,
}

// ---- the site's days ----

/// `from..to` in UTC ms of a local day.
pub fn day_range(zone: SiteZone, day: LocalDate) -> (i64, i64) {
    let start = zone.midnight(day);
    (start, start + MS_PER_DAY)
}

/// One local day of the site: the main supply (a reading by hand wins over the main meter),
/// the sum of the other meters, and the loss.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteDay {
    pub day: String,
    /// Local midnight, UTC ms (the chart's x).
    pub at: i64,
    pub main_wh: Option<i64>,
    /// `"reading"` (by hand) or `"meter"` (the main meter).
    pub main_source: Option<&'static str>,
    pub sub_wh: i64,
    pub loss_wh: Option<i64>,
    pub loss_share: Option<f64>,
}

/// The site's days `from..=to`.
pub fn site_days(
    conn: &Connection,
    zone: SiteZone,
    from: LocalDate,
    to: LocalDate,
) -> Result<Vec<SiteDay>, StoreError> {
    let readings = store::site_readings(conn, &from.to_string(), &to.to_string())?;
    let starts: Vec<i64> = (from.days()..=to.days())
        .map(|d| zone.midnight(LocalDate::from_days(d)))
        .collect();
    let end = day_range(zone, to).1;
    let (meter_wh, sub) = store::site_usage(conn, &starts, end)?;
    let mut out = Vec::new();
    for (i, d) in (from.days()..=to.days()).enumerate() {
        let name = LocalDate::from_days(d).to_string();
        let meter = meter_wh.as_ref().map(|m| m[i]);
        let (main_wh, main_source) = match (readings.get(&name), meter) {
            (Some(&wh), _) => (Some(wh), Some("reading")),
            (None, Some(wh)) if wh > 0 => (Some(wh), Some("meter")),
            _ => (None, None),
        };
        let sub_wh = sub[i];
        out.push(SiteDay {
            day: name,
            at: starts[i],
            main_wh,
            main_source,
            sub_wh,
            loss_wh: main_wh.map(|m| m - sub_wh),
            loss_share: main_wh
                .filter(|&m| m > 0)
                .map(|m| (m - sub_wh) as f64 / m as f64),
        });
    }
    Ok(out)
}

/// The newest complete local day (within the look-back) that has a main supply, judged.
fn newest_site_day(
    conn: &Connection,
    t: &Thresholds,
    now: i64,
) -> Result<Option<SiteDay>, StoreError> {
    let today = t.zone.day(now);
    let from = LocalDate::from_days(today - SITE_LOSS_LOOKBACK_DAYS);
    let to = LocalDate::from_days(today - 1);
    // Cheap first: which days have a supply (readings, and the main meter alone); only that
    // day's other meters are then summed.
    let readings = store::site_readings(conn, &from.to_string(), &to.to_string())?;
    let main = store::main_meter(conn)?;
    if readings.is_empty() && main.is_none() {
        return Ok(None);
    }
    for d in (from.days()..=to.days()).rev() {
        let day = LocalDate::from_days(d);
        let has_supply = readings.contains_key(&day.to_string())
            || match &main {
                Some(m) => {
                    let (start, end) = day_range(t.zone, day);
                    store::usage_hours(conn, m, start, end)?
                        .iter()
                        .any(|(_, wh)| *wh > 0)
                }
                None => false,
            };
        if has_supply {
            return Ok(site_days(conn, t.zone, day, day)?.pop());
        }
    }
    Ok(None)
}

// ---- the driver ----

/// Runs every rule at `now` inside the fold's transaction `tx`, after [`store::fold_keeping`]
/// (`reports` are what it folded), writes the episodes that start or end (events and
/// `alert_state`) and returns them; the caller counts and logs them after the commit.
/// `up_since` is when the daemon started.
pub fn evaluate(
    tx: &Connection,
    t: &Thresholds,
    now: i64,
    up_since: i64,
    reports: &HashMap<String, Vec<ReportFact>>,
) -> Result<Vec<Transition>, StoreError> {
    if !t.enabled {
        return Ok(Vec::new());
    }
    let open = store::open_alerts(tx)?;
    let mut out = Vec::new();
    let is_open = |meter: &str, k: Kind| open.contains_key(&(meter.to_string(), k.as_str().into()));
    let raised_at =
        |meter: &str, k: Kind| open.get(&(meter.to_string(), k.as_str().into())).copied();
    // The newest complete UTC hour: a fold runs within minutes of its end. Its usage no
    // longer changes, so spikes are judged once per hour, not at every fold. Any other hour
    // than the last judged one, not only a later one: a clock that ran ahead and was put right
    // must not stop the rule until real time catches up.
    let hour = now - now.rem_euclid(MS_PER_HOUR) - MS_PER_HOUR;
    let judge_spikes = store::meta_value(tx, SPIKE_JUDGED_HOUR)? != hour;
    if judge_spikes {
        store::set_meta_value(tx, SPIKE_JUDGED_HOUR, hour)?;
    }
    let none = Vec::new();
    for w in store::watched_meters(tx)? {
        let Ok(meter) = MeterId::parse(&w.id) else {
            continue;
        };
        let mine = reports.get(&w.id).unwrap_or(&none);
        let mut judge = |k: Kind, verdict: Option<bool>, data: Value| {
            if let Some(state) = step(is_open(&w.id, k), verdict) {
                out.push(Transition {
                    meter: Some(meter.clone()),
                    kind: k,
                    state,
                    data: with_since(data, state, raised_at(&w.id, k)),
                });
            }
        };
        // The main meter's use is the site's supply, not a household's: no spike rule.
        if !w.main && judge_spikes {
            let hour_wh: i64 = store::usage_hours(tx, &w.id, hour, hour + MS_PER_HOUR)?
                .iter()
                .map(|(_, wh)| wh)
                .sum();
            let history = store::same_hour_history(tx, &w.id, hour, t.baseline_days)?;
            let s = spike(hour_wh, &history, t);
            judge(
                Kind::Spike,
                s.map(|(over, _, _)| over),
                json!({"hour": hour, "wh": hour_wh,
                       "thresholdWh": s.map(|x| x.1), "medianWh": s.map(|x| x.2),
                       "days": history.len()}),
            );
        }
        let b = bypass(mine, t);
        judge(
            Kind::Bypass,
            b.map(|x| x.0),
            json!({"powerW": b.map(|x| x.1), "thresholdW": t.bypass_power_w}),
        );
        judge(
            Kind::RegisterBackwards,
            register_backwards(mine),
            json!({"reports": mine.len()}),
        );
        judge(
            Kind::NoConsumption,
            no_consumption(&w, now, t),
            json!({"lastUseAt": w.last_use_at, "idleAfterMs": t.idle_after_ms}),
        );
        judge(
            Kind::Silent,
            silent(w.last_seen, up_since, now, t),
            json!({"lastSeen": w.last_seen, "silentAfterMs": t.silent_after_ms}),
        );
    }
    // Site loss: the newest complete local day that has a main supply.
    if let Some(d) = newest_site_day(tx, t, now)? {
        let verdict = site_loss(d.main_wh.unwrap_or(0), d.sub_wh, t);
        if let Some(state) = step(is_open("", Kind::SiteLoss), verdict.map(|v| v.0)) {
            let data = json!({"day": d.day, "mainWh": d.main_wh, "mainSource": d.main_source,
                              "subWh": d.sub_wh, "lossWh": d.loss_wh, "lossShare": d.loss_share,
                              "toleranceShare": t.site_loss_share});
            out.push(Transition {
                meter: None,
                kind: Kind::SiteLoss,
                state,
                data: with_since(data, state, raised_at("", Kind::SiteLoss)),
            });
        }
    }
    for tr in &out {
        let mut data = json!({"alert": tr.kind.as_str(), "state": tr.state.as_str()});
        if let (Value::Object(d), Value::Object(extra)) = (&mut data, &tr.data) {
            d.extend(extra.clone());
        }
        store::append_event(tx, "alert", tr.meter.as_ref(), now, &data)?;
        let key = tr.meter.as_ref().map_or("", MeterId::as_str);
        let raised = (tr.state == State::Raised).then_some(now);
        store::set_alert_open(tx, key, tr.kind.as_str(), raised)?;
    }
    Ok(out)
}

fn with_since(mut data: Value, state: State, raised_at: Option<i64>) -> Value {
    if let (State::Resolved, Some(at), Value::Object(d)) = (state, raised_at, &mut data) {
        d.insert("since".into(), json!(at));
    }
    data
}

/// Open episodes per alert, for the `umeme_alerts_open` gauge.
pub fn open_counts(conn: &Connection) -> Result<HashMap<&'static str, usize>, StoreError> {
    let open = store::open_alerts(conn)?;
    Ok(Kind::ALL
        .iter()
        .map(|k| {
            (
                k.as_str(),
                open.keys().filter(|(_, a)| a == k.as_str()).count(),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(power_w: Option<f64>, relay_on: bool, backwards: bool) -> ReportFact {
        ReportFact {
            at: 0,
            debit_wh: 1,
            power_w,
            relay_on,
            relay_reported: true,
            register_backwards: backwards,
        }
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), 0);
        assert_eq!(median(&[5, 1, 3]), 3);
        assert_eq!(median(&[4, 1, 3, 100]), 3);
    }

    #[test]
    fn a_spike_needs_enough_history_and_more_than_both_factor_times_median_and_floor() {
        let t = Thresholds::default();
        assert_eq!(
            spike(10_000, &[200, 200], &t),
            None,
            "two days are no baseline"
        );
        // 3 × 200 = 600 > floor 500: exactly the threshold is not a spike, one Wh more is.
        assert_eq!(spike(600, &[200, 200, 200], &t), Some((false, 600, 200)));
        assert_eq!(spike(601, &[200, 200, 200], &t), Some((true, 600, 200)));
        // A meter that uses nothing at that hour: only the floor counts.
        assert_eq!(spike(500, &[0, 0, 0], &t), Some((false, 500, 0)));
        assert_eq!(spike(501, &[0, 0, 0], &t), Some((true, 500, 0)));
    }

    #[test]
    fn bypass_is_power_above_the_threshold_while_the_meter_reports_its_relay_off() {
        let t = Thresholds::default();
        assert_eq!(bypass(&[], &t), None);
        assert_eq!(
            bypass(&[fact(Some(500.0), true, false)], &t),
            Some((false, 0.0))
        );
        assert_eq!(
            bypass(&[fact(Some(20.0), false, false)], &t),
            Some((false, 20.0))
        );
        assert_eq!(
            bypass(
                &[
                    fact(Some(1.0), false, false),
                    fact(Some(20.5), false, false)
                ],
                &t
            ),
            Some((true, 20.5))
        );
        // The relay as the ledger commands it is no evidence: only the meter's own word.
        let mut commanded = fact(Some(900.0), false, false);
        commanded.relay_reported = false;
        assert_eq!(bypass(&[commanded], &t), Some((false, 0.0)));
    }

    #[test]
    fn a_register_going_backwards_is_judged_only_on_reports() {
        assert_eq!(register_backwards(&[]), None);
        assert_eq!(register_backwards(&[fact(None, true, false)]), Some(false));
        assert_eq!(
            register_backwards(&[fact(None, true, false), fact(None, true, true)]),
            Some(true)
        );
    }

    fn watched(relay_on: bool, last_report: i64, last_use: Option<i64>) -> Watched {
        Watched {
            id: "M1".into(),
            main: false,
            created_at: 0,
            last_seen: Some(last_report),
            relay_on: Some(relay_on),
            last_report_at: Some(last_report),
            last_use_at: last_use,
            watched_since: Some(0),
        }
    }

    #[test]
    fn no_consumption_counts_from_the_last_use_only_while_the_relay_is_on_and_reports_come() {
        let t = Thresholds::default();
        let day = t.idle_after_ms;
        let now = 10 * day;
        assert_eq!(
            no_consumption(&watched(true, now, Some(now - day)), now, &t),
            Some(false)
        );
        assert_eq!(
            no_consumption(&watched(true, now, Some(now - day - 1)), now, &t),
            Some(true)
        );
        // Never used since it is watched: counted from then.
        assert_eq!(
            no_consumption(&watched(true, now, None), now, &t),
            Some(true)
        );
        assert_eq!(
            no_consumption(&watched(false, now, None), now, &t),
            Some(false)
        );
        // Silent: no word either way.
        let quiet = now - t.silent_after_ms - 1;
        assert_eq!(no_consumption(&watched(true, quiet, None), now, &t), None);
        let mut unknown = watched(true, now, None);
        unknown.relay_on = None;
        assert_eq!(no_consumption(&unknown, now, &t), None);
    }

    #[test]
    fn silence_counts_from_the_later_of_last_seen_and_the_gateways_start() {
        let t = Thresholds::default();
        let n = t.silent_after_ms;
        assert_eq!(silent(None, 0, 10 * n, &t), None);
        assert_eq!(silent(Some(0), 0, n, &t), Some(false));
        assert_eq!(silent(Some(0), 0, n + 1, &t), Some(true));
        assert_eq!(silent(Some(0), 5 * n, 5 * n + 1, &t), Some(false));
    }

    #[test]
    fn site_loss_is_the_share_of_the_supply_the_sub_meters_do_not_account_for() {
        let t = Thresholds::default();
        assert_eq!(site_loss(0, 100, &t), None);
        assert_eq!(site_loss(1000, 900, &t), Some((false, 0.1)));
        assert_eq!(site_loss(1000, 850, &t), Some((true, 0.15)));
        // More measured than supplied (a main meter read late): no loss.
        assert_eq!(site_loss(1000, 1100, &t).map(|x| x.0), Some(false));
    }

    #[test]
    fn an_episode_is_raised_once_and_resolved_once() {
        assert_eq!(step(false, Some(true)), Some(State::Raised));
        assert_eq!(step(true, Some(true)), None);
        assert_eq!(step(true, None), None);
        assert_eq!(step(true, Some(false)), Some(State::Resolved));
        assert_eq!(step(false, Some(false)), None);
        assert_eq!(step(false, None), None);
    }
}
