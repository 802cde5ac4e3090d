//! Meter-enforced limits end to end (issue 16, issue 18 items 2 and 4): virtual meters on
//! meter-core get `[limits]` from the real gateway in `command/config`, enforce them, and
//! their trips reach the gateway as alert events.

mod common;

use std::time::{Duration, Instant};

use common::{alerts, gateway_with, logs, SECRET};
use meter_sim::profile::Profile;
use meter_sim::{Mode, SimConfig};
use umeme_gateway::daemon::Gateway;

/// 10 A at 230 V: 2.3 kW, about 38 Wh per one-minute step.
const LOAD_MA: u32 = 10_000;
const WH_PER_STEP: u64 = 2300 / 60 + 1;

fn sim(gw: &Gateway, meters: usize, minutes: u64) -> SimConfig {
    SimConfig {
        broker: gw.broker_addr.expect("the plain meter port is on"),
        api: gw.api_addr,
        meters,
        mode: Mode::V2,
        profile: Profile::Constant { ma: LOAD_MA },
        duration: Duration::from_secs(minutes * 60),
        step: Duration::from_secs(60),
        report_every: 5,
        speed: 3600.0,
        outage_fraction: 0.0,
        reboot_fraction: 0.0,
        // 0.05 units per KES: 200 KES = 10 kWh, more than any of these runs uses.
        initial_kes: 200.0,
        topups: 0,
        seed: 16,
        secret: SECRET.into(),
        provision: false,
        settle_timeout: Duration::from_secs(60),
        ..SimConfig::default()
    }
}

/// Polls the store until `pred` holds for its alerts (bounded).
async fn alerts_when(
    dir: &tempfile::TempDir,
    pred: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut pause = Duration::from_millis(10);
    loop {
        let a = alerts(dir);
        if pred(&a) || Instant::now() >= deadline {
            return a;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_over_the_cap_trips_recloses_locks_out_after_k_trips_and_the_gateway_raises_alerts()
{
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    // Over the cap for one step (60 s) trips; 5 minutes off; the third trip locks out.
    let limits =
        "[limits]\npower_cap_w = 2000\ntrip_after_s = 60\nreclose_after_s = 300\nmax_trips = 3\n";
    let gw = gateway_with(&dir, 3, limits).await;
    let summary = meter_sim::run(sim(&gw, 3, 90)).await.expect("run");
    println!("{summary}");
    assert!(summary.all_agree(), "{summary}");
    assert_eq!(summary.configs_refused, 0);
    assert_eq!(
        (summary.power_trips, summary.lockouts),
        (9, 3),
        "three trips each (two reclosed), the third locked out: {summary}"
    );
    // Each meter drew power only in the three steps that tripped, nothing once locked out
    // (plus at most one step if the clock ticked between the balance and the config after it).
    assert!(
        summary.meter_energy_wh <= 3 * (3 + 1) * WH_PER_STEP,
        "{summary}"
    );
    let want = |a: &[(String, String)]| {
        a.iter().filter(|(_, k)| k == "power_trip").count() == 6
            && a.iter().filter(|(_, k)| k == "power_lockout").count() == 3
    };
    let got = alerts_when(&dir, want).await;
    assert!(want(&got), "alerts in the store: {got:?}");
    for m in ["SIM0001", "SIM0002", "SIM0003"] {
        let kinds: Vec<&str> = got
            .iter()
            .filter(|(meter, _)| meter == m)
            .map(|(_, k)| k.as_str())
            .collect();
        assert_eq!(kinds, ["power_trip", "power_trip", "power_lockout"], "{m}");
    }
    assert_eq!(
        gw.metrics
            .get("umeme_ledger_alerts_total", &[("alert", "power_lockout")]),
        3.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_with_a_daily_allowance_stops_at_it() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway_with(&dir, 3, "[limits]\ndaily_allowance_kwh = 0.5\n").await;
    let summary = meter_sim::run(sim(&gw, 3, 60)).await.expect("run");
    println!("{summary}");
    assert!(summary.all_agree(), "{summary}");
    assert!(summary.allowance_off_steps > 0, "{summary}");
    // The relay opens in the step that reaches 500 Wh: at most one step beyond it in any
    // local day (the meter's day, whatever the real clock says).
    assert!(
        (500..500 + WH_PER_STEP).contains(&summary.max_used_today_wh),
        "{summary}"
    );
    assert_eq!(summary.power_trips, 0);
    gw.stop().await;
}
