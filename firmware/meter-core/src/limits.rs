//! Limits the meter enforces on its own (issue 16, issue 18 items 2 and 4): a power cap with
//! trip / reclose / lockout, and a daily energy allowance counted from local midnight.
//!
//! Both run on time the meter is given: the power limiter on the sampling windows' `dt_ms`
//! (powered time; time switched off does not count), the allowance on the gateway's clock
//! (the `timestamp` of every balance command) carried forward by the same windows.

use core::fmt::Write;

use heapless::Deque;

use crate::report::{check_meter_no, EncodeError, Milli, SliceWriter};

/// Trips are counted over this sliding window for the lockout.
pub const TRIP_WINDOW_MS: u64 = 30 * 60 * 1000;
/// Most trips the lockout can be set to count (`powerMaxTrips` range 1..=10).
pub const MAX_TRIPS: usize = 10;
pub const MS_PER_DAY: i64 = 86_400_000;

/// The power cap's settings (`command/config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerLimits {
    /// 0: no cap.
    pub cap_w: u32,
    pub trip_after_s: u32,
    pub reclose_after_s: u32,
    /// The trip that makes this many within [`TRIP_WINDOW_MS`] locks the relay off.
    pub max_trips: u8,
    /// Whether the cap applies while the gateway says the meter may not cut (friendly hours).
    pub in_friendly_hours: bool,
}

impl Default for PowerLimits {
    fn default() -> Self {
        PowerLimits {
            cap_w: 0,
            trip_after_s: 10,
            reclose_after_s: 60,
            max_trips: 3,
            in_friendly_hours: true,
        }
    }
}

/// Every setting `command/config` may change besides the low-balance threshold (which is in
/// [`crate::MeterConfig`]). Kept on flash (snapshot version 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `None`: the board's compiled-in interval.
    pub publish_interval_ms: Option<u32>,
    pub power: PowerLimits,
    /// 0: no allowance.
    pub daily_allowance_wh: u32,
    /// The site's offset from UTC, for local midnight.
    pub utc_offset_min: i16,
}

/// One trip, as reported in the `power_trip` status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trip {
    /// The power that tripped it.
    pub power_mw: u32,
    pub cap_w: u32,
    /// Trips within the last 30 minutes, this one included.
    pub trips: u8,
    /// This trip locked the relay off.
    pub locked_out: bool,
}

impl Trip {
    /// `{"meterNo","status":"power_trip","powerW","capW","trips","lockedOut","timestamp"}`.
    pub fn encode_status(
        &self,
        meter_no: &str,
        timestamp_ms: u64,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        check_meter_no(meter_no)?;
        let mut w = SliceWriter::new(out);
        write!(
            w,
            r#"{{"meterNo":"{}","status":"power_trip","powerW":{},"capW":{},"trips":{},"lockedOut":{},"timestamp":{}}}"#,
            meter_no,
            Milli(self.power_mw as u64),
            self.cap_w,
            self.trips,
            self.locked_out,
            timestamp_ms
        )
        .map_err(|_| EncodeError::BufferTooSmall)?;
        Ok(w.len)
    }
}

/// The largest `power_trip` status for a meter number of `meter_no_len` bytes.
pub const fn max_trip_status_len(meter_no_len: usize) -> usize {
    110 + meter_no_len + 11 + 10 + 3 + 5 + 20
}

/// `{"meterNo","status":"error","message":"<message>"}`: a refused command (the firmware's
/// `command_result` report). `message` is the error's text, from this crate (no quotes).
pub fn encode_error_status(
    meter_no: &str,
    message: impl core::fmt::Display,
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    check_meter_no(meter_no)?;
    let mut w = SliceWriter::new(out);
    write!(
        w,
        r#"{{"meterNo":"{}","status":"error","message":"{}"}}"#,
        meter_no, message
    )
    .map_err(|_| EncodeError::BufferTooSmall)?;
    Ok(w.len)
}

/// The power limiter's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLimiter {
    /// Powered time, ms, summed from the sampling windows.
    pub(crate) now_ms: u64,
    /// How long power has been above the cap without a dip.
    pub(crate) over_ms: u32,
    /// Time left before the relay recloses after a trip; 0 = not tripped.
    pub(crate) off_left_ms: u32,
    pub(crate) locked_out: bool,
    /// `now_ms` of the trips in the last window, oldest first.
    pub(crate) trips: Deque<u64, MAX_TRIPS>,
}

impl PowerLimiter {
    /// One sampling window of `dt_ms` at `power_mw` (measured with the relay as it was).
    /// `active`: the cap applies now. Returns a trip when this window caused one.
    pub fn step(
        &mut self,
        limits: &PowerLimits,
        active: bool,
        power_mw: u32,
        dt_ms: u32,
    ) -> Option<Trip> {
        self.now_ms = self.now_ms.saturating_add(dt_ms as u64);
        self.forget_old_trips();
        if self.locked_out {
            return None;
        }
        if self.off_left_ms > 0 {
            self.off_left_ms = self.off_left_ms.saturating_sub(dt_ms);
            return None;
        }
        let cap_mw = (limits.cap_w as u64) * 1000;
        if !active || limits.cap_w == 0 || (power_mw as u64) <= cap_mw {
            // A dip to or below the cap starts the count again.
            self.over_ms = 0;
            return None;
        }
        self.over_ms = self.over_ms.saturating_add(dt_ms);
        if (self.over_ms as u64) < limits.trip_after_s as u64 * 1000 {
            return None;
        }
        self.over_ms = 0;
        if self.trips.is_full() {
            self.trips.pop_front();
        }
        let _ = self.trips.push_back(self.now_ms);
        let trips = self.trips.len() as u8;
        self.locked_out = trips >= limits.max_trips.max(1);
        self.off_left_ms = if self.locked_out {
            0
        } else {
            limits.reclose_after_s.saturating_mul(1000).max(1)
        };
        Some(Trip {
            power_mw,
            cap_w: limits.cap_w,
            trips,
            locked_out: self.locked_out,
        })
    }

    fn forget_old_trips(&mut self) {
        while let Some(&t) = self.trips.front() {
            if self.now_ms.saturating_sub(t) >= TRIP_WINDOW_MS {
                self.trips.pop_front();
            } else {
                break;
            }
        }
    }

    /// The relay must be open: tripped and waiting to reclose, or locked out.
    pub fn holds_off(&self) -> bool {
        self.locked_out || self.off_left_ms > 0
    }

    pub fn locked_out(&self) -> bool {
        self.locked_out
    }

    /// Trips in the last 30 minutes.
    pub fn recent_trips(&self) -> usize {
        self.trips.len()
    }

    /// The gateway cleared the lockout (or changed the limits): start afresh.
    pub fn clear(&mut self) {
        self.over_ms = 0;
        self.off_left_ms = 0;
        self.locked_out = false;
        self.trips.clear();
    }
}

/// The daily allowance's state: which local day it is and the register at its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    /// Local day number (days since 1970-01-01 local); `None` before the meter knows the time.
    pub(crate) day: Option<i64>,
    /// The register when the day started (or when the meter started counting it).
    pub(crate) day_start_wh: u64,
}

impl Allowance {
    /// Rolls the day over when the local date changed. `clock_ms`: Unix ms if known.
    pub fn advance(&mut self, clock_ms: Option<u64>, utc_offset_min: i16, register_wh: u64) {
        let Some(now) = clock_ms else { return };
        let local = now as i64 + utc_offset_min as i64 * 60_000;
        let day = local.div_euclid(MS_PER_DAY);
        if self.day != Some(day) {
            // A clock that jumps back a day (a gateway whose time was fixed) also starts a
            // new count: the allowance never carries more than one day's use.
            self.day = Some(day);
            self.day_start_wh = register_wh;
        }
    }

    /// Wh used today.
    pub fn used_wh(&self, register_wh: u64) -> u64 {
        register_wh.saturating_sub(self.day_start_wh)
    }

    /// The allowance is used up: the relay stays off until local midnight.
    pub fn exhausted(&self, allowance_wh: u32, register_wh: u64) -> bool {
        allowance_wh > 0 && self.used_wh(register_wh) >= allowance_wh as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PowerLimits {
        PowerLimits {
            cap_w: 1000,
            trip_after_s: 5,
            reclose_after_s: 60,
            max_trips: 3,
            in_friendly_hours: true,
        }
    }

    const OVER: u32 = 1_500_000; // 1.5 kW
    const UNDER: u32 = 900_000;

    /// Seconds of `power_mw`, one window per second; returns the trips.
    fn run(l: &mut PowerLimiter, lim: &PowerLimits, power_mw: u32, secs: u32) -> usize {
        (0..secs)
            .filter(|_| l.step(lim, true, power_mw, 1000).is_some())
            .count()
    }

    #[test]
    fn power_above_the_cap_for_exactly_n_seconds_trips() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        assert_eq!(run(&mut l, &lim, OVER, 4), 0, "4 s is not yet 5 s");
        assert!(!l.holds_off());
        let t = l
            .step(&lim, true, OVER, 1000)
            .expect("the fifth second trips");
        assert_eq!(
            t,
            Trip {
                power_mw: OVER,
                cap_w: 1000,
                trips: 1,
                locked_out: false
            }
        );
        assert!(l.holds_off());
    }

    #[test]
    fn power_exactly_at_the_cap_never_trips() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        assert_eq!(run(&mut l, &lim, 1_000_000, 600), 0);
    }

    #[test]
    fn a_dip_below_the_cap_restarts_the_count() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        assert_eq!(run(&mut l, &lim, OVER, 4), 0);
        assert_eq!(run(&mut l, &lim, UNDER, 1), 0);
        assert_eq!(run(&mut l, &lim, OVER, 4), 0, "counting from the dip");
        assert_eq!(run(&mut l, &lim, OVER, 1), 1);
    }

    #[test]
    fn the_relay_recloses_after_m_seconds() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        assert_eq!(run(&mut l, &lim, OVER, 5), 1);
        // Off: the load draws nothing.
        run(&mut l, &lim, 0, 59);
        assert!(l.holds_off(), "59 s of 60");
        run(&mut l, &lim, 0, 1);
        assert!(!l.holds_off(), "closed again after 60 s");
    }

    #[test]
    fn the_kth_trip_within_30_minutes_locks_the_relay_off_until_cleared() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        for k in 1..=3u8 {
            let mut trip = None;
            for _ in 0..5 {
                trip = trip.or(l.step(&lim, true, OVER, 1000));
            }
            let t = trip.expect("trips");
            assert_eq!((t.trips, t.locked_out), (k, k == 3));
            run(&mut l, &lim, 0, 60);
        }
        assert!(l.locked_out() && l.holds_off());
        // Hours later, still off.
        run(&mut l, &lim, 0, 4 * 3600);
        assert!(l.holds_off());
        l.clear();
        assert!(!l.holds_off());
        assert_eq!(l.recent_trips(), 0);
    }

    #[test]
    fn trips_older_than_30_minutes_slide_out_of_the_window() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        // Trip 1 at 5 s, trip 2 at 70 s (after the 60 s reclose).
        assert_eq!(run(&mut l, &lim, OVER, 70), 2);
        run(&mut l, &lim, 0, 60);
        // Until 30 min after trip 1 (1805 s) both count; wait that out below the cap.
        let now = l.now_ms / 1000;
        run(&mut l, &lim, UNDER, (1805 - now) as u32 - 1);
        assert_eq!(l.recent_trips(), 2, "1804 s: trip 1 still in the window");
        run(&mut l, &lim, UNDER, 1);
        assert_eq!(l.recent_trips(), 1, "1805 s: trip 1 left the window");
        let mut trip = None;
        for _ in 0..5 {
            trip = trip.or(l.step(&lim, true, OVER, 1000));
        }
        let t = trip.expect("trips");
        assert_eq!(
            (t.trips, t.locked_out),
            (2, false),
            "the third trip counts as the second"
        );
    }

    #[test]
    fn an_inactive_cap_and_a_zero_cap_do_nothing() {
        let lim = limits();
        let mut l = PowerLimiter::default();
        for _ in 0..100 {
            assert!(l.step(&lim, false, OVER, 1000).is_none());
        }
        let off = PowerLimits { cap_w: 0, ..lim };
        assert_eq!(run(&mut l, &off, u32::MAX, 100), 0);
    }

    #[test]
    fn allowance_counts_from_local_midnight() {
        // 2025-11-27 20:59 UTC = 23:59 in Nairobi (UTC+3).
        let t = 1_764_277_140_000u64;
        let mut a = Allowance::default();
        a.advance(Some(t), 180, 1000);
        assert!(!a.exhausted(500, 1499));
        assert!(a.exhausted(500, 1500));
        // One minute later it is the next local day, though not yet in UTC.
        a.advance(Some(t + 60_000), 180, 1500);
        assert_eq!(a.used_wh(1500), 0);
        assert!(!a.exhausted(500, 1500));
        // In UTC it was still the same day: the offset is what moved midnight.
        let mut utc = Allowance::default();
        utc.advance(Some(t), 0, 1000);
        utc.advance(Some(t + 60_000), 0, 1500);
        assert_eq!(utc.used_wh(1500), 500);
    }

    #[test]
    fn trip_status_encodes_and_fits_its_bound() {
        let t = Trip {
            power_mw: 2_345_678,
            cap_w: 2000,
            trips: 3,
            locked_out: true,
        };
        let mut buf = [0u8; max_trip_status_len(8)];
        let n = t
            .encode_status("METER001", 1_764_230_400_123, &mut buf)
            .unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"meterNo":"METER001","status":"power_trip","powerW":2345.678,"capW":2000,"trips":3,"lockedOut":true,"timestamp":1764230400123}"#
        );
        let widest = Trip {
            power_mw: u32::MAX,
            cap_w: u32::MAX,
            trips: u8::MAX,
            locked_out: false,
        };
        let mut buf = [0u8; max_trip_status_len(20)];
        assert!(widest
            .encode_status("M0123456789012345678", u64::MAX, &mut buf)
            .is_ok());
    }
}
