//! A numbered consumption report and its v2 JSON (contract §4).

use core::fmt::Write;

use crate::balance::Relay;

/// One consumption report. `seq` grows by one per report and survives reboots; `energy_wh` is
/// the cumulative register and never decreases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub seq: u32,
    pub energy_wh: u64,
    pub power_mw: u32,
    pub current_ma: u32,
    pub voltage_mv: u32,
    pub relay: Relay,
    /// Unix ms when the meter knows the time, else ms since boot (as the original firmware).
    pub timestamp_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("output buffer too small")]
    BufferTooSmall,
    #[error("meter number must be printable ASCII without quotes or backslashes")]
    BadMeterNo,
}

/// `core::fmt::Write` into a byte slice.
pub(crate) struct SliceWriter<'a> {
    buf: &'a mut [u8],
    pub(crate) len: usize,
}

impl<'a> SliceWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        SliceWriter { buf, len: 0 }
    }
}

impl Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A milli-unit integer as a JSON decimal with three places, without floats: 1234 → `1.234`.
pub(crate) struct Milli(pub u64);

impl core::fmt::Display for Milli {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

pub(crate) fn check_meter_no(meter_no: &str) -> Result<(), EncodeError> {
    let ok = !meter_no.is_empty()
        && meter_no
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(EncodeError::BadMeterNo)
    }
}

impl Report {
    /// Writes the v2 consumption payload; returns its length.
    pub fn encode_v2(&self, meter_no: &str, out: &mut [u8]) -> Result<usize, EncodeError> {
        check_meter_no(meter_no)?;
        let mut w = SliceWriter::new(out);
        write!(
            w,
            r#"{{"v":2,"meterNo":"{}","seq":{},"energyWh":{},"powerW":{},"currentA":{},"voltageV":{},"relay":"{}","timestamp":{}}}"#,
            meter_no,
            self.seq,
            self.energy_wh,
            Milli(self.power_mw as u64),
            Milli(self.current_ma as u64),
            Milli(self.voltage_mv as u64),
            self.relay.as_str(),
            self.timestamp_ms,
        )
        .map_err(|_| EncodeError::BufferTooSmall)?;
        Ok(w.len)
    }
}

/// The largest v2 payload for a meter number of `meter_no_len` bytes.
pub const fn max_v2_len(meter_no_len: usize) -> usize {
    // Fixed text plus the widest numbers (u32, u64, and three Milli(u32) values).
    110 + meter_no_len + 10 + 20 + 3 * 11 + 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_payload_has_every_contract_field() {
        let r = Report {
            seq: 42,
            energy_wh: 123_456,
            power_mw: 1_150_500,
            current_ma: 5_002,
            voltage_mv: 230_000,
            relay: Relay::On,
            timestamp_ms: 1_764_230_400_123,
        };
        let mut buf = [0u8; 256];
        let n = r.encode_v2("METER001", &mut buf).unwrap();
        assert_eq!(
            core::str::from_utf8(&buf[..n]).unwrap(),
            r#"{"v":2,"meterNo":"METER001","seq":42,"energyWh":123456,"powerW":1150.500,"currentA":5.002,"voltageV":230.000,"relay":"on","timestamp":1764230400123}"#
        );
    }

    #[test]
    fn widest_report_fits_the_stated_bound() {
        let r = Report {
            seq: u32::MAX,
            energy_wh: u64::MAX,
            power_mw: u32::MAX,
            current_ma: u32::MAX,
            voltage_mv: u32::MAX,
            relay: Relay::Off,
            timestamp_ms: u64::MAX,
        };
        let id = "M0123456789012345678";
        let mut buf = [0u8; max_v2_len(20)];
        assert!(r.encode_v2(id, &mut buf).is_ok());
        assert_eq!(
            r.encode_v2(id, &mut [0u8; 20]),
            Err(EncodeError::BufferTooSmall)
        );
        assert_eq!(r.encode_v2("a\"b", &mut buf), Err(EncodeError::BadMeterNo));
    }
}
