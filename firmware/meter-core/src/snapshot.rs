//! The meter's durable state as bytes: register, next seq, balance anchor, the acknowledged
//! history and every report still waiting in the outbox. Little-endian, versioned; the flash
//! log around it adds the checksum.

use crate::balance::{BalanceView, Relay};
use crate::energy::Register;
use crate::meter::{Meter, MeterConfig, ACKED_HISTORY};
use crate::report::Report;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 8 + 8 + 1 + 8 + 8 + 1 + 8 + 1 + 1 + 2;
const ACKED_LEN: usize = 12;
const REPORT_LEN: usize = 4 + 8 + 4 + 4 + 4 + 1 + 8;

/// Bytes needed for the state of a `Meter<N>`.
pub const fn state_len(n: usize) -> usize {
    HEADER_LEN + ACKED_HISTORY * ACKED_LEN + n * REPORT_LEN
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
        Ok(o.at)
    }

    /// The meter as it was when `bytes` were written (after a reboot). `config` supplies what
    /// is not saved; a saved low-balance threshold from `command/config` wins.
    pub fn restore(config: MeterConfig, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut i = In { buf: bytes, at: 0 };
        if i.u8()? != VERSION {
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
}
