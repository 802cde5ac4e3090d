//! The power limiter against an independent model written from the rules (issue 18 item 4):
//! trip when power stays strictly above the cap for N s, reclose after M s, stay off after the
//! K-th trip within 30 minutes. Random loads, window lengths, limits and reboots (the state
//! goes through the flash snapshot) must give the model's trips, lockout and relay, window by
//! window.

use meter_core::energy::power_mw;
use meter_core::snapshot::state_len;
use meter_core::{Meter, MeterConfig, Relay};
use proptest::prelude::*;

const WINDOW_MS: u64 = 30 * 60 * 1000;

#[derive(Debug, Default)]
struct Model {
    now: u64,
    /// When the current run above the cap began.
    over_since: Option<u64>,
    closes_at: Option<u64>,
    locked: bool,
    trips: Vec<u64>,
}

impl Model {
    /// One window; returns `Some((trips in the window, locked))` when it tripped.
    fn step(
        &mut self,
        power_mw: u32,
        dt: u64,
        cap_w: u32,
        n_s: u32,
        m_s: u32,
        k: u8,
    ) -> Option<(usize, bool)> {
        let start = self.now;
        self.now += dt;
        if self.locked {
            return None;
        }
        if let Some(at) = self.closes_at {
            if self.now >= at {
                self.closes_at = None;
            }
            return None;
        }
        if power_mw as u64 <= cap_w as u64 * 1000 {
            self.over_since = None;
            return None;
        }
        let since = *self.over_since.get_or_insert(start);
        if self.now - since < n_s as u64 * 1000 {
            return None;
        }
        self.over_since = None;
        let now = self.now;
        self.trips.retain(|t| now - t < WINDOW_MS);
        self.trips.push(now);
        self.locked = self.trips.len() >= k as usize;
        if !self.locked {
            self.closes_at = Some(now + m_s as u64 * 1000);
        }
        Some((self.trips.len(), self.locked))
    }

    fn holds_off(&self) -> bool {
        self.locked || self.closes_at.is_some()
    }
}

fn window() -> impl Strategy<Value = (u32, u32, bool)> {
    // Current (up to 20 A; 10 A is exactly 2300 W), window length (0.1 to 120 s, often whole
    // seconds so that "exactly N s" and "exactly 30 minutes" happen), reboot after it.
    (
        prop_oneof![0u32..20_000, Just(10_000)],
        prop_oneof![100u32..120_000, (1u32..=60).prop_map(|s| s * 1000)],
        prop::bool::weighted(0.03),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn the_limiter_trips_recloses_and_locks_out_exactly_as_the_rules_say(
        cap_w in prop_oneof![100u32..5_000, Just(2_300)],
        n_s in 1u32..300,
        m_s in 5u32..900,
        k in 1u8..=10,
        windows in prop::collection::vec(window(), 1..600),
    ) {
        let mut meter: Meter<4> = Meter::new(MeterConfig::default());
        meter
            .on_command("balance", br#"{"balanceWh":1000000000,"ledgerSeq":1}"#)
            .unwrap();
        let cfg = format!(
            r#"{{"powerCapW":{cap_w},"powerTripAfterS":{n_s},"powerRecloseAfterS":{m_s},"powerMaxTrips":{k}}}"#
        );
        meter.on_command("config", cfg.as_bytes()).unwrap();
        let mut model = Model::default();
        for (current_ma, dt, reboot) in windows {
            // The load draws nothing while the relay is open.
            let current = if meter.relay() == Relay::On { current_ma } else { 0 };
            let p = power_mw(current, 230_000, 1000);
            meter.measure(current, dt);
            let want = model.step(p, dt as u64, cap_w, n_s, m_s, k);
            let got = meter.take_trip().map(|t| (t.trips as usize, t.locked_out));
            prop_assert_eq!(got, want, "at {} ms", model.now);
            prop_assert_eq!(meter.relay() == Relay::Off, model.holds_off(), "at {} ms", model.now);
            if reboot {
                let mut buf = [0u8; state_len(4)];
                let n = meter.encode_state(&mut buf).unwrap();
                meter = Meter::restore(MeterConfig::default(), &buf[..n]).unwrap();
            }
        }
    }
}
