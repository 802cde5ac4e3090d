//! The meter's durable state as bytes: register, next seq, balance anchor, the acknowledged
//! history and every report still waiting in the outbox. Little-endian, versioned; the flash
//! log around it adds the checksum.
//!
//! Version 2 appends, after the outbox, the settings from `command/config`, `mayCut`, the
//! clock, the power limiter and the daily allowance. A version-1 record (firmware before the
//! limits) still loads: those fields take their defaults.

use crate::balance::{BalanceView, Relay};
use crate::energy::Register;
use crate::limits::{Trip, MAX_TRIPS};
use crate::meter::{Meter, MeterConfig, ACKED_HISTORY};
use crate::report::Report;

const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
/// version, next seq, register (Wh, remainder), anchor and ledgerSeq (flag + i64 each),
/// remote off, low threshold, low announced, acked count, outbox count.
const HEADER_LEN: usize = 1 + 4 + 8 + 8 + (1 + 8) + (1 + 8) + 1 + 8 + 1 + 1 + 2;
const ACKED_LEN: usize = 12;
const REPORT_LEN: usize = 4 + 8 + 4 + 4 + 4 + 1 + 8;
/// Version 2's tail: settings (5 + 4·3 + 1 + 1 + 4 + 2), mayCut, clock (1 + 8), limiter
/// (8 + 4 + 4 + 1 + 1 + 8·MAX_TRIPS), allowance (1 + 8 + 8), pending trip (1 + 4 + 4 + 1 + 1).
const TAIL_LEN: usize = 25 + 1 + 9 + (18 + 8 * MAX_TRIPS) + 17 + 11;

/// Bytes needed for the state of a `Meter<N>`.
pub const fn state_len(n: usize) -> usize {
    HEADER_LEN + ACKED_HISTORY * ACKED_LEN + n * REPORT_LEN + TAIL_LEN
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("state buffer too small")]
    BufferTooSmall,
    #[error("saved state is truncated or of an unknown version")]
    Corrupt,
}

struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        let end = self.at + b.len();
        self.buf
            .get_mut(self.at..end)
            .ok_or(SnapshotError::BufferTooSmall)?
            .copy_from_slice(b);
        self.at = end;
        Ok(())
    }
}

struct In<'a> {
    buf: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn take<const K: usize>(&mut self) -> Result<[u8; K], SnapshotError> {
        let end = self.at + K;
        let s = self.buf.get(self.at..end).ok_or(SnapshotError::Corrupt)?;
        self.at = end;
        let mut a = [0u8; K];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn flag(&mut self) -> Result<bool, SnapshotError> {
        Ok(self.u8()? == 1)
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, SnapshotError> {
        let present = self.u8()?;
        let v = self.i64()?;
        Ok((present == 1).then_some(v))
    }
}

fn put_opt_i64(o: &mut Out, v: Option<i64>) -> Result<(), SnapshotError> {
    o.put(&[v.is_some() as u8])?;
    o.put(&v.unwrap_or(0).to_le_bytes())
}

impl<const N: usize> Meter<N> {
    /// Writes the durable state; returns its length (at most [`state_len`]`(N)`).
    pub fn encode_state(&self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        let mut o = Out { buf, at: 0 };
        o.put(&[VERSION])?;
        o.put(&self.next_seq.to_le_bytes())?;
        o.put(&self.register.wh().to_le_bytes())?;
        o.put(&self.register.remainder_mw_ms().to_le_bytes())?;
        put_opt_i64(&mut o, self.balance.anchor_wh())?;
        put_opt_i64(&mut o, self.balance.ledger_seq())?;
        o.put(&[self.balance.remote_off as u8])?;
        o.put(&self.config.low_balance_wh.to_le_bytes())?;
        o.put(&[self.low_announced as u8])?;
        o.put(&[self.acked.len() as u8])?;
        o.put(&(self.outbox.len() as u16).to_le_bytes())?;
        for (seq, wh) in self.acked.iter() {
            o.put(&seq.to_le_bytes())?;
            o.put(&wh.to_le_bytes())?;
        }
        for r in self.outbox.iter() {
            o.put(&r.seq.to_le_bytes())?;
            o.put(&r.energy_wh.to_le_bytes())?;
            o.put(&r.power_mw.to_le_bytes())?;
            o.put(&r.current_ma.to_le_bytes())?;
            o.put(&r.voltage_mv.to_le_bytes())?;
            o.put(&[(r.relay == Relay::On) as u8])?;
            o.put(&r.timestamp_ms.to_le_bytes())?;
        }
        self.encode_tail(&mut o)?;
        Ok(o.at)
    }

    fn encode_tail(&self, o: &mut Out) -> Result<(), SnapshotError> {
        let s = &self.settings;
        o.put(&[s.publish_interval_ms.is_some() as u8])?;
        o.put(&s.publish_interval_ms.unwrap_or(0).to_le_bytes())?;
        o.put(&s.power.cap_w.to_le_bytes())?;
        o.put(&s.power.trip_after_s.to_le_bytes())?;
        o.put(&s.power.reclose_after_s.to_le_bytes())?;
        o.put(&[s.power.max_trips, s.power.in_friendly_hours as u8])?;
        o.put(&s.daily_allowance_wh.to_le_bytes())?;
        o.put(&s.utc_offset_min.to_le_bytes())?;
        o.put(&[self.may_cut as u8])?;
        o.put(&[self.clock_ms.is_some() as u8])?;
        o.put(&self.clock_ms.unwrap_or(0).to_le_bytes())?;
        let l = &self.limiter;
        o.put(&l.now_ms.to_le_bytes())?;
        o.put(&l.over_ms.to_le_bytes())?;
        o.put(&l.off_left_ms.to_le_bytes())?;
        o.put(&[l.locked_out as u8, l.trips.len() as u8])?;
        for t in l.trips.iter() {
            o.put(&t.to_le_bytes())?;
        }
        put_opt_i64(o, self.allowance.day)?;
        o.put(&self.allowance.day_start_wh.to_le_bytes())?;
        let t = self.pending_trip;
        o.put(&[t.is_some() as u8])?;
        let t = t.unwrap_or(Trip {
            power_mw: 0,
            cap_w: 0,
            trips: 0,
            locked_out: false,
        });
        o.put(&t.power_mw.to_le_bytes())?;
        o.put(&t.cap_w.to_le_bytes())?;
        o.put(&[t.trips, t.locked_out as u8])
    }

    fn restore_tail(&mut self, i: &mut In) -> Result<(), SnapshotError> {
        let has_interval = i.flag()?;
        let interval = i.u32()?;
        let s = &mut self.settings;
        s.publish_interval_ms = has_interval.then_some(interval);
        s.power.cap_w = i.u32()?;
        s.power.trip_after_s = i.u32()?;
        s.power.reclose_after_s = i.u32()?;
        s.power.max_trips = i.u8()?;
        s.power.in_friendly_hours = i.flag()?;
        s.daily_allowance_wh = i.u32()?;
        s.utc_offset_min = i16::from_le_bytes(i.take()?);
        self.may_cut = i.flag()?;
        let has_clock = i.flag()?;
        let clock = i.u64()?;
        self.clock_ms = has_clock.then_some(clock);
        let l = &mut self.limiter;
        l.now_ms = i.u64()?;
        l.over_ms = i.u32()?;
        l.off_left_ms = i.u32()?;
        l.locked_out = i.flag()?;
        let trips = i.u8()? as usize;
        if trips > MAX_TRIPS {
            return Err(SnapshotError::Corrupt);
        }
        for _ in 0..trips {
            let _ = l.trips.push_back(i.u64()?);
        }
        self.allowance.day = i.opt_i64()?;
        self.allowance.day_start_wh = i.u64()?;
        let pending = i.flag()?;
        let t = Trip {
            power_mw: i.u32()?,
            cap_w: i.u32()?,
            trips: i.u8()?,
            locked_out: i.flag()?,
        };
        self.pending_trip = pending.then_some(t);
        Ok(())
    }

    /// The meter as it was when `bytes` were written (after a reboot). `config` supplies what
    /// is not saved; a saved low-balance threshold from `command/config` wins. Reads versions
    /// 1 and 2.
    pub fn restore(config: MeterConfig, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut i = In { buf: bytes, at: 0 };
        let version = i.u8()?;
        if version != VERSION && version != VERSION_1 {
            return Err(SnapshotError::Corrupt);
        }
        let mut m = Meter::new(config);
        m.next_seq = i.u32()?;
        let wh = i.u64()?;
        let rem = i.u64()?;
        m.register = Register::restore(wh, rem);
        let anchor = i.opt_i64()?;
        let ledger_seq = i.opt_i64()?;
        let remote_off = i.u8()? == 1;
        m.balance = BalanceView::restore(anchor, ledger_seq, remote_off);
        m.config.low_balance_wh = i.i64()?;
        m.low_announced = i.u8()? == 1;
        let acked = i.u8()? as usize;
        let pending = i.u16()? as usize;
        if acked > ACKED_HISTORY {
            return Err(SnapshotError::Corrupt);
        }
        for _ in 0..acked {
            let seq = i.u32()?;
            let wh = i.u64()?;
            let _ = m.acked.push_back((seq, wh));
        }
        for _ in 0..pending {
            let r = Report {
                seq: i.u32()?,
                energy_wh: i.u64()?,
                power_mw: i.u32()?,
                current_ma: i.u32()?,
                voltage_mv: i.u32()?,
                relay: if i.u8()? == 1 { Relay::On } else { Relay::Off },
                timestamp_ms: i.u64()?,
            };
            // A smaller N than the writer's keeps the newest reports.
            m.outbox.push(r);
        }
        if version == VERSION {
            m.restore_tail(&mut i)?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_bytes() {
        let mut m: Meter<8> = Meter::new(MeterConfig::default());
        for i in 0..5 {
            m.measure(10_000, 60_000);
            m.report(i);
        }
        m.on_puback(1);
        m.on_command(
            "balance",
            br#"{"balanceWh":700,"ledgerSeq":3,"ackSeq":2,"relay":"on"}"#,
        )
        .unwrap();
        let mut buf = [0u8; state_len(8)];
        let n = m.encode_state(&mut buf).unwrap();
        let back: Meter<8> = Meter::restore(MeterConfig::default(), &buf[..n]).unwrap();
        assert_eq!(back.register(), m.register());
        assert_eq!(back.next_seq(), m.next_seq());
        assert_eq!(back.balance_wh(), m.balance_wh());
        assert_eq!(back.ledger_seq(), Some(3));
        let a: std::vec::Vec<_> = m.outbox().iter().copied().collect();
        let b: std::vec::Vec<_> = back.outbox().iter().copied().collect();
        assert_eq!(a, b);
        assert_eq!(
            Meter::<8>::restore(MeterConfig::default(), &buf[..n - 1]).err(),
            Some(SnapshotError::Corrupt)
        );
    }

    /// A version-1 record written field by field as firmware before the limits wrote it:
    /// next seq 8, register 1234 Wh, anchor 5000, ledgerSeq 4, low threshold 2000, one
    /// acknowledged pair and one report waiting.
    fn version_1_record() -> std::vec::Vec<u8> {
        let mut v = std::vec![1u8];
        v.extend(8u32.to_le_bytes());
        v.extend(1234u64.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        v.push(1);
        v.extend(5000i64.to_le_bytes());
        v.push(1);
        v.extend(4i64.to_le_bytes());
        v.push(0); // remote_off
        v.extend(2000i64.to_le_bytes());
        v.push(0); // low_announced
        v.push(1); // acked pairs
        v.extend(1u16.to_le_bytes()); // reports waiting
        v.extend(6u32.to_le_bytes());
        v.extend(1200u64.to_le_bytes());
        v.extend(7u32.to_le_bytes());
        v.extend(1234u64.to_le_bytes());
        v.extend(500_000u32.to_le_bytes());
        v.extend(2_174u32.to_le_bytes());
        v.extend(230_000u32.to_le_bytes());
        v.push(1);
        v.extend(1_764_230_400_123u64.to_le_bytes());
        v
    }

    #[test]
    fn a_version_1_snapshot_still_loads_with_default_limits() {
        let old = version_1_record();
        let m: Meter<8> = Meter::restore(MeterConfig::default(), &old).unwrap();
        assert_eq!((m.next_seq(), m.energy_wh()), (8, 1234));
        assert_eq!(m.ledger_seq(), Some(4));
        assert_eq!(m.balance_wh(), Some(5000 - 1234));
        assert_eq!(m.config.low_balance_wh, 2000);
        assert_eq!(m.outbox().len(), 1);
        assert_eq!(m.settings(), &crate::limits::Settings::default());
        assert!(m.may_cut() && m.clock_ms().is_none());
        // Saved again, it is a version-2 record.
        let mut buf = [0u8; state_len(8)];
        let n = m.encode_state(&mut buf).unwrap();
        assert_eq!(buf[0], VERSION);
        let back: Meter<8> = Meter::restore(MeterConfig::default(), &buf[..n]).unwrap();
        assert_eq!(back.balance_wh(), m.balance_wh());
    }

    #[test]
    fn limits_and_a_lockout_survive_a_reboot() {
        let mut m: Meter<8> = Meter::new(MeterConfig::default());
        m.on_command(
            "balance",
            br#"{"balanceWh":100000,"ledgerSeq":1,"timestamp":1764230400000,"mayCut":false}"#,
        )
        .unwrap();
        m.on_command(
            "config",
            br#"{"publishIntervalMs":20000,"powerCapW":1000,"powerTripAfterS":2,"powerRecloseAfterS":30,"powerMaxTrips":2,"powerCapInFriendlyHours":true,"dailyAllowanceWh":8000,"utcOffsetMin":180}"#,
        )
        .unwrap();
        // 2 kW: a trip after 2 s, then 30 s off, then the second trip locks out.
        for _ in 0..2 {
            m.measure(8_696, 1000);
        }
        let first = m.take_trip().expect("first trip");
        assert_eq!((first.trips, first.locked_out), (1, false));
        // Power cut in the middle of the reclose wait, 10 s into it.
        for _ in 0..10 {
            m.measure(0, 1000);
        }
        let mut buf = [0u8; state_len(8)];
        let n = m.encode_state(&mut buf).unwrap();
        let mut back: Meter<8> = Meter::restore(MeterConfig::default(), &buf[..n]).unwrap();
        assert_eq!(back.settings(), m.settings());
        assert_eq!(back.limiter(), m.limiter());
        assert_eq!((back.may_cut(), back.clock_ms()), (false, m.clock_ms()));
        assert_eq!(back.relay(), Relay::Off, "still waiting to reclose");
        for _ in 0..19 {
            back.measure(0, 1000);
        }
        assert_eq!(back.relay(), Relay::Off, "29 s of 30");
        back.measure(0, 1000);
        assert_eq!(back.relay(), Relay::On);
        for _ in 0..2 {
            back.measure(8_696, 1000);
        }
        let second = back.take_trip().expect("second trip");
        assert_eq!((second.trips, second.locked_out), (2, true));
        let n = back.encode_state(&mut buf).unwrap();
        let again: Meter<8> = Meter::restore(MeterConfig::default(), &buf[..n]).unwrap();
        assert!(
            again.limiter().locked_out(),
            "a reboot does not lift a lockout"
        );
        assert_eq!(again.relay(), Relay::Off);
        assert_eq!(again.publish_interval_ms(), Some(20000));
    }

    /// Before this test `state_len` was one byte short (one option flag uncounted): a meter
    /// with a full outbox and a full acknowledged history could not save its state.
    #[test]
    fn the_fullest_state_takes_exactly_state_len() {
        let mut m: Meter<4> = Meter::new(MeterConfig::default());
        m.on_command(
            "balance",
            br#"{"balanceWh":100000,"ledgerSeq":1,"timestamp":1764230400000}"#,
        )
        .unwrap();
        m.on_command(
            "config",
            br#"{"publishIntervalMs":20000,"powerCapW":100,"powerTripAfterS":1,"powerRecloseAfterS":5,"powerMaxTrips":10,"dailyAllowanceWh":1000000}"#,
        )
        .unwrap();
        // Ten trips (the most the window keeps), the tenth one pending.
        for _ in 0..10 {
            m.measure(8_696, 1000);
            for _ in 0..5 {
                m.measure(0, 1000);
            }
        }
        assert!(m.limiter().locked_out());
        assert_eq!(m.limiter().recent_trips(), crate::limits::MAX_TRIPS);
        for i in 0..ACKED_HISTORY as u64 + 4 {
            let r = m.report(i);
            if i < ACKED_HISTORY as u64 {
                m.on_puback(r.seq);
            }
        }
        assert_eq!(m.outbox().len(), 4);
        let mut buf = [0u8; state_len(4)];
        assert_eq!(m.encode_state(&mut buf), Ok(state_len(4)));
        assert_eq!(state_len(96), 3_573, "firmware/README.md quotes it");
    }
}
