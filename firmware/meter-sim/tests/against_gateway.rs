//! meter-sim against the real gateway, started in-process on loopback ports: many meters, a few
//! simulated hours with outages, reboots and top-ups, and at the end every meter's balance
//! equals the gateway's.

mod common;

use std::time::Duration;

use common::{gateway, logs, SECRET};
use meter_sim::profile::Profile;
use meter_sim::{Mode, SimConfig};
use umeme_gateway::daemon::Gateway;

fn sim(gw: &Gateway, meters: usize, mode: Mode) -> SimConfig {
    SimConfig {
        broker: gw.broker_addr.expect("the plain meter port is on"),
        api: gw.api_addr,
        meters,
        mode,
        profile: Profile::Daily {
            base_ma: 400,
            peak_ma: 12_000,
        },
        duration: Duration::from_secs(4 * 3600),
        step: Duration::from_secs(60),
        report_every: 5,
        // 4 simulated hours in about 4 real seconds.
        speed: 3600.0,
        outage_fraction: 0.3,
        reboot_fraction: 0.15,
        initial_kes: 20.0,
        topups: 60,
        seed: 9,
        secret: SECRET.into(),
        provision: false,
        // An upper bound for connecting and settling, not a wait.
        settle_timeout: Duration::from_secs(90),
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_v2_meters_with_outages_and_reboots_end_with_the_gateways_balance() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway(&dir, 200).await;
    let summary = meter_sim::run(sim(&gw, 200, Mode::V2)).await.expect("run");
    println!("{summary}");
    assert!(
        summary.all_agree(),
        "{summary}\n{:?}",
        summary.disagreements
    );
    assert!(summary.outages > 0 && summary.reboots > 0, "{summary}");
    assert_eq!(summary.dropped, 0, "no report dropped");
    // A reboot restores reports saved before their PUBACK; they are sent and acked again.
    assert!(
        summary.acknowledged >= summary.reports,
        "every report acknowledged"
    );
    // The gateway debited exactly what the meters counted after their baseline report.
    assert!(summary.gateway_consumed_wh > 0);
    assert_eq!(
        summary.gateway_consumed_wh, summary.billable_wh as i64,
        "{summary}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_firmware_payloads_end_with_the_gateways_balance() {
    logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let gw = gateway(&dir, 20).await;
    let summary = meter_sim::run(sim(&gw, 20, Mode::V1)).await.expect("run");
    println!("{summary}");
    assert!(
        summary.all_agree(),
        "{summary}\n{:?}",
        summary.disagreements
    );
    gw.stop().await;
}
