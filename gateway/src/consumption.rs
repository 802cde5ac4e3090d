//! Consumption events on disk: a compact binary record instead of JSON.
//!
//! Consumption reports are nearly every event a site stores, and on an SD card every byte is
//! written twice (WAL, then checkpoint). So a consumption event stores its facts as a small
//! record of varints (about 35 bytes instead of about 200 bytes of JSON) and the JSON that sinks
//! see (contract §6) is rendered from it when they read. The record also carries the account as
//! it was after the report, which is what lets the ledger skip rewriting the meter's row on every
//! report: the row is brought up to date from these records later ([`crate::store::fold`]).
//!
//! Layout (format 1): `[format][flags][fields]`, fields as LEB128 varints (signed ones
//! zig-zagged), floats as an exact thousandth count when they have one, else 8 raw bytes.
//! Format 2 (issue 16, the money ledger) appends `[money flags]`, the money account after the
//! report (balance in cents, sub-cent carry, debt buckets, band counter and its month,
//! standing-charge due time, last priced report) and the report's itemised price (tariff
//! name, energy by band and time-of-use period, each charge, each tax, cents debited and
//! what went to debt). A record without a money account is still written as format 1, and
//! format-1 records (older databases) still decode.

use serde_json::{json, Value};

use crate::ledger::{Account, ReportKind};
use crate::meter::wh_to_units;
use crate::payload::{Report, V2Report};

const FORMAT: u8 = 1;
/// Format 1 plus the money account and the itemised price.
const FORMAT_MONEY: u8 = 2;

// money flags, after the format-1 fields of a format-2 record
const HAS_MONEY: u8 = 1;
const ARMED: u8 = 2;
const HAS_ITEMS: u8 = 4;
/// `MoneyAccount::emergency_auto_used` (the money column's first byte: 2).
const AUTO_USED: u8 = 8;

// flags, byte 1
const KIND_MASK: u8 = 0b0000_0111;
const V2: u8 = 0b0000_1000;
/// v2: the account's `v2_seq`/`v2_energy_wh` are the report's `seq`/`energyWh`.
const STATE_IS_REPORT: u8 = 0b0001_0000;
const HAS_V2_SEQ: u8 = 0b0010_0000;
const HAS_V2_ENERGY: u8 = 0b0100_0000;

// optional fields of a v2 report, byte 2
const POWER: u8 = 1;
const CURRENT: u8 = 2;
const VOLTAGE: u8 = 4;
const RELAY: u8 = 8;
const TIMESTAMP: u8 = 16;

/// One applied consumption report and the account after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumption {
    pub report: Report,
    pub kind: ReportKind,
    pub debit_wh: i64,
    pub account: Account,
    /// How the report was priced (money ledger, a report that used energy).
    pub itemised: Option<Itemised>,
}

/// A report's price, itemised, in fine units (10⁻¹² cent, [`FINE_PER_CENT`]): indexes refer
/// to the tariff named (its version in force when the report was applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Itemised {
    pub tariff: String,
    pub energy: Vec<EnergyItem>,
    /// One per charge of the tariff, in its order.
    pub charges: Vec<i128>,
    /// One per tax of the tariff, in its order.
    pub taxes: Vec<i128>,
    /// Whole cents debited (the exact total plus the carry before, rounded down).
    pub debit_cents: i64,
    /// Of those, cents the balance could not cover (emergency credit or arrears).
    pub to_debt_cents: i64,
    /// Standing charges that fell due by this report and were charged with it.
    pub standing_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnergyItem {
    pub band: u32,
    pub tou: Option<u32>,
    pub wh: i64,
    pub fine: i128,
}

impl Itemised {
    /// What a report did to the money: its price (`None` when it used no energy) and the
    /// standing charges that fell due with it; `None` when neither.
    pub fn from_applied(
        tariff: &str,
        c: Option<&crate::tariff::account::ConsumptionApplied>,
        standing_cents: i64,
    ) -> Option<Itemised> {
        if c.is_none() && standing_cents == 0 {
            return None;
        }
        let mut it = Itemised {
            tariff: tariff.to_owned(),
            standing_cents,
            ..Itemised::default()
        };
        if let Some(c) = c {
            it.energy = c
                .priced
                .energy
                .iter()
                .map(|l| EnergyItem {
                    band: l.band as u32,
                    tou: l.tou.map(|t| t as u32),
                    wh: l.wh,
                    fine: l.fine,
                })
                .collect();
            it.charges = c.priced.charges.iter().map(|l| l.fine).collect();
            it.taxes = c.priced.taxes.iter().map(|l| l.fine).collect();
            it.debit_cents = c.debit_cents;
            it.to_debt_cents = c.to_emergency + c.to_arrears;
        }
        Some(it)
    }

    /// The exact total of the lines.
    pub fn total_fine(&self) -> i128 {
        self.energy.iter().map(|e| e.fine).sum::<i128>()
            + self.charges.iter().sum::<i128>()
            + self.taxes.iter().sum::<i128>()
    }

    fn to_json(&self) -> Value {
        json!({
            "tariff": self.tariff,
            "energy": self.energy.iter().map(|e| json!({
                "band": e.band, "tou": e.tou, "wh": e.wh, "kes": fine_kes(e.fine)
            })).collect::<Vec<_>>(),
            "charges": self.charges.iter().enumerate().map(|(i, f)| json!({
                "charge": i, "kes": fine_kes(*f)
            })).collect::<Vec<_>>(),
            "taxes": self.taxes.iter().enumerate().map(|(i, f)| json!({
                "tax": i, "kes": fine_kes(*f)
            })).collect::<Vec<_>>(),
            "totalKes": fine_kes(self.total_fine()),
            "debitCents": self.debit_cents,
            "toDebtCents": self.to_debt_cents,
            "standingCents": self.standing_cents,
        })
    }
}

use crate::tariff::price::FINE_PER_CENT;

/// An exact amount in fine units as KES text with at least two decimals and no more than
/// it needs (`"15.175"`, `"303.50"`).
pub fn fine_kes(fine: i128) -> String {
    let sign = if fine < 0 { "-" } else { "" };
    let a = fine.unsigned_abs();
    // 10⁻¹² cent = 10⁻¹⁴ KES.
    let unit = 100 * FINE_PER_CENT as u128;
    let mut frac = format!("{:014}", a % unit);
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}{}.{frac}", a / unit)
}

/// Cents as KES text (`"500.00"`).
pub fn cents_kes(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let a = cents.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}

/// A money account as stored in `meters.money` and in a format-2 record.
pub fn encode_money(m: &MoneyAccount, out: &mut Vec<u8>) {
    for v in [
        m.balance_cents,
        m.carry_fine as i64,
        m.debt.emergency,
        m.debt.standing,
        m.debt.arrears,
        m.month.month.0,
        m.month.wh,
        m.standing_due_ms,
        m.last_report_ms,
    ] {
        put_signed(out, v);
    }
}

/// [`encode_money`]'s bytes (the `meters.money` column) back; the armed flag is its own byte
/// there.
pub fn money_column(m: &MoneyAccount) -> Vec<u8> {
    let mut out = vec![u8::from(m.emergency_armed) | (u8::from(m.emergency_auto_used) << 1)];
    encode_money(m, &mut out);
    out
}

pub fn money_from_column(bytes: &[u8]) -> Result<MoneyAccount, DecodeError> {
    let mut r = Cursor { bytes, at: 0 };
    let flags = r.byte()?;
    let m = decode_money(&mut r, flags & 1 != 0, flags & 2 != 0)?;
    if r.at != bytes.len() {
        return Err(DecodeError::BadField);
    }
    Ok(m)
}

fn decode_money(
    r: &mut Cursor<'_>,
    armed: bool,
    auto_used: bool,
) -> Result<MoneyAccount, DecodeError> {
    Ok(MoneyAccount {
        balance_cents: r.signed()?,
        carry_fine: i128::from(r.signed()?),
        debt: Debt {
            emergency: r.signed()?,
            standing: r.signed()?,
            arrears: r.signed()?,
        },
        month: MonthUsage {
            month: MonthKey(r.signed()?),
            wh: r.signed()?,
        },
        emergency_armed: armed,
        emergency_auto_used: auto_used,
        standing_due_ms: r.signed()?,
        last_report_ms: r.signed()?,
    })
}

/// An exact amount (≥ 0) of the itemised price as `mantissa << 4 | exponent` (`v = m × 10^e`,
/// `e ≤ 15`): prices have few significant digits and many trailing zeros in fine units (a
/// charge is always a multiple of 10⁷), so this is 2–3 bytes where the plain varint is 6–7.
fn put_fine(out: &mut Vec<u8>, v: i128) {
    let mut m = v.max(0) as u128;
    let mut e = 0u128;
    while e < 15 && m != 0 && m % 10 == 0 {
        m /= 10;
        e += 1;
    }
    // Far beyond any real amount (10³⁶ fine is 10²² KES); saturate rather than wrap.
    put_u128(out, (m.min(u128::MAX >> 4) << 4) | e);
}

fn put_u128(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

use crate::tariff::account::{Debt, MoneyAccount};
use crate::tariff::calendar::MonthKey;
use crate::tariff::price::MonthUsage;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("consumption record ends early")]
    Truncated,
    #[error("consumption record format {0} is not known")]
    Format(u8),
    #[error("consumption record has a bad field")]
    BadField,
}

impl Consumption {
    /// The record stored in the `data` column of a consumption event.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        let a = &self.account;
        let mut flags = kind_code(self.kind);
        let state_is_report = match &self.report {
            Report::V2(r) => {
                a.v2_seq == Some(r.seq) && a.v2_energy_wh.map(|e| e as u64) == Some(r.energy_wh)
            }
            Report::V1 { .. } => false,
        };
        if matches!(self.report, Report::V2(_)) {
            flags |= V2;
        }
        if state_is_report {
            flags |= STATE_IS_REPORT;
        } else {
            if a.v2_seq.is_some() {
                flags |= HAS_V2_SEQ;
            }
            if a.v2_energy_wh.is_some() {
                flags |= HAS_V2_ENERGY;
            }
        }
        let money = self.account.money.is_some() || self.itemised.is_some();
        out.push(if money { FORMAT_MONEY } else { FORMAT });
        out.push(flags);
        for v in [
            self.debit_wh,
            a.balance_wh,
            a.total_consumed_wh,
            a.ledger_seq,
            a.v1_total_wh,
        ] {
            put_signed(&mut out, v);
        }
        match &self.report {
            Report::V1 {
                total_consumed_units,
                remaining_balance_units,
                units_consumed,
                timestamp,
            } => {
                for x in [
                    *total_consumed_units,
                    *remaining_balance_units,
                    *units_consumed,
                    *timestamp,
                ] {
                    put_float(&mut out, x);
                }
            }
            Report::V2(r) => {
                let mut optional = 0;
                for (bit, present) in [
                    (POWER, r.power_w.is_some()),
                    (CURRENT, r.current_a.is_some()),
                    (VOLTAGE, r.voltage_v.is_some()),
                    (RELAY, r.relay.is_some()),
                    (TIMESTAMP, r.timestamp.is_some()),
                ] {
                    if present {
                        optional |= bit;
                    }
                }
                out.push(optional);
                put_varint(&mut out, u64::from(r.seq));
                put_varint(&mut out, r.energy_wh);
                for x in [r.power_w, r.current_a, r.voltage_v].into_iter().flatten() {
                    put_float(&mut out, x);
                }
                if let Some(relay) = &r.relay {
                    put_varint(&mut out, relay.len() as u64);
                    out.extend_from_slice(relay.as_bytes());
                }
                if let Some(t) = r.timestamp {
                    put_float(&mut out, t);
                }
            }
        }
        if !state_is_report {
            if let Some(s) = a.v2_seq {
                put_varint(&mut out, u64::from(s));
            }
            if let Some(e) = a.v2_energy_wh {
                put_signed(&mut out, e);
            }
        }
        if money {
            let mut mf = 0;
            if let Some(m) = &a.money {
                mf |= HAS_MONEY;
                if m.emergency_armed {
                    mf |= ARMED;
                }
                if m.emergency_auto_used {
                    mf |= AUTO_USED;
                }
            }
            if self.itemised.is_some() {
                mf |= HAS_ITEMS;
            }
            out.push(mf);
            if let Some(m) = &a.money {
                encode_money(m, &mut out);
            }
            if let Some(it) = &self.itemised {
                put_varint(&mut out, it.tariff.len() as u64);
                out.extend_from_slice(it.tariff.as_bytes());
                put_varint(&mut out, it.energy.len() as u64);
                for e in &it.energy {
                    put_varint(&mut out, u64::from(e.band));
                    put_varint(&mut out, e.tou.map_or(0, |t| u64::from(t) + 1));
                    put_signed(&mut out, e.wh);
                    put_fine(&mut out, e.fine);
                }
                for list in [&it.charges, &it.taxes] {
                    put_varint(&mut out, list.len() as u64);
                    for f in list {
                        put_fine(&mut out, *f);
                    }
                }
                put_signed(&mut out, it.debit_cents);
                put_signed(&mut out, it.to_debt_cents);
                put_signed(&mut out, it.standing_cents);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Consumption, DecodeError> {
        let mut r = Cursor { bytes, at: 0 };
        let format = r.byte()?;
        if format != FORMAT && format != FORMAT_MONEY {
            return Err(DecodeError::Format(format));
        }
        let flags = r.byte()?;
        let kind = kind_from(flags & KIND_MASK)?;
        let debit_wh = r.signed()?;
        let mut account = Account {
            balance_wh: r.signed()?,
            total_consumed_wh: r.signed()?,
            ledger_seq: r.signed()?,
            v1_total_wh: r.signed()?,
            v2_seq: None,
            v2_energy_wh: None,
            money: None,
        };
        let report = if flags & V2 == 0 {
            Report::V1 {
                total_consumed_units: r.float()?,
                remaining_balance_units: r.float()?,
                units_consumed: r.float()?,
                timestamp: r.float()?,
            }
        } else {
            let optional = r.byte()?;
            let seq = u32::try_from(r.varint()?).map_err(|_| DecodeError::BadField)?;
            let energy_wh = r.varint()?;
            let mut float_if = |bit: u8| -> Result<Option<f64>, DecodeError> {
                if optional & bit != 0 {
                    r.float().map(Some)
                } else {
                    Ok(None)
                }
            };
            let power_w = float_if(POWER)?;
            let current_a = float_if(CURRENT)?;
            let voltage_v = float_if(VOLTAGE)?;
            let relay = if optional & RELAY != 0 {
                let len = usize::try_from(r.varint()?).map_err(|_| DecodeError::BadField)?;
                let raw = r.take(len)?;
                Some(String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadField)?)
            } else {
                None
            };
            let timestamp = if optional & TIMESTAMP != 0 {
                Some(r.float()?)
            } else {
                None
            };
            if flags & STATE_IS_REPORT != 0 {
                account.v2_seq = Some(seq);
                account.v2_energy_wh =
                    Some(i64::try_from(energy_wh).map_err(|_| DecodeError::BadField)?);
            }
            Report::V2(V2Report {
                seq,
                energy_wh,
                power_w,
                current_a,
                voltage_v,
                relay,
                timestamp,
            })
        };
        if flags & STATE_IS_REPORT == 0 {
            if flags & HAS_V2_SEQ != 0 {
                account.v2_seq =
                    Some(u32::try_from(r.varint()?).map_err(|_| DecodeError::BadField)?);
            }
            if flags & HAS_V2_ENERGY != 0 {
                account.v2_energy_wh = Some(r.signed()?);
            }
        }
        let mut itemised = None;
        if format == FORMAT_MONEY {
            let mf = r.byte()?;
            if mf & HAS_MONEY != 0 {
                account.money = Some(decode_money(&mut r, mf & ARMED != 0, mf & AUTO_USED != 0)?);
            }
            if mf & HAS_ITEMS != 0 {
                let len = usize::try_from(r.varint()?).map_err(|_| DecodeError::BadField)?;
                let tariff =
                    String::from_utf8(r.take(len)?.to_vec()).map_err(|_| DecodeError::BadField)?;
                let n = r.varint()?;
                let mut energy = Vec::new();
                for _ in 0..n {
                    let band = u32::try_from(r.varint()?).map_err(|_| DecodeError::BadField)?;
                    let tou = match r.varint()? {
                        0 => None,
                        t => Some(u32::try_from(t - 1).map_err(|_| DecodeError::BadField)?),
                    };
                    energy.push(EnergyItem {
                        band,
                        tou,
                        wh: r.signed()?,
                        fine: r.fine()?,
                    });
                }
                let mut lists = [Vec::new(), Vec::new()];
                for list in &mut lists {
                    for _ in 0..r.varint()? {
                        list.push(r.fine()?);
                    }
                }
                let [charges, taxes] = lists;
                itemised = Some(Itemised {
                    tariff,
                    energy,
                    charges,
                    taxes,
                    debit_cents: r.signed()?,
                    to_debt_cents: r.signed()?,
                    standing_cents: r.signed()?,
                });
            }
        }
        if r.at != bytes.len() {
            return Err(DecodeError::BadField);
        }
        Ok(Consumption {
            report,
            kind,
            debit_wh,
            account,
            itemised,
        })
    }

    /// The event's `data` as sinks see it (contract §6).
    pub fn to_json(&self) -> Value {
        let (version, mut data) = match &self.report {
            Report::V1 {
                total_consumed_units,
                remaining_balance_units,
                units_consumed,
                timestamp,
            } => (
                1,
                json!({"totalConsumed": total_consumed_units, "unitsConsumed": units_consumed,
                       "remainingBalance": remaining_balance_units, "meterTimestamp": timestamp}),
            ),
            Report::V2(r) => (2, serde_json::to_value(r).unwrap_or_default()),
        };
        let a = &self.account;
        if let Some(obj) = data.as_object_mut() {
            obj.insert("v".into(), json!(version));
            obj.insert("debitWh".into(), json!(self.debit_wh));
            obj.insert("unitsDebited".into(), json!(wh_to_units(self.debit_wh)));
            obj.insert("balanceWh".into(), json!(a.balance_wh));
            obj.insert("balance".into(), json!(wh_to_units(a.balance_wh)));
            obj.insert("totalConsumedWh".into(), json!(a.total_consumed_wh));
            obj.insert(
                "outcome".into(),
                json!(format!("{:?}", self.kind).to_lowercase()),
            );
            // The money ledger's fields are added; the original dashboard's stay as they are.
            if let Some(m) = &a.money {
                obj.insert("balanceKes".into(), json!(cents_kes(m.balance_cents)));
                obj.insert("debtKes".into(), json!(cents_kes(m.debt.total())));
            }
            if let Some(it) = &self.itemised {
                obj.insert("priced".into(), it.to_json());
            }
        }
        data
    }
}

fn kind_code(kind: ReportKind) -> u8 {
    match kind {
        ReportKind::Debited => 0,
        ReportKind::Baseline => 1,
        ReportKind::Stale => 2,
        ReportKind::Repeat => 3,
        ReportKind::Reboot => 4,
        ReportKind::RegisterReset => 5,
    }
}

fn kind_from(code: u8) -> Result<ReportKind, DecodeError> {
    Ok(match code {
        0 => ReportKind::Debited,
        1 => ReportKind::Baseline,
        2 => ReportKind::Stale,
        3 => ReportKind::Repeat,
        4 => ReportKind::Reboot,
        5 => ReportKind::RegisterReset,
        _ => return Err(DecodeError::BadField),
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_signed(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Thousandths when the float is exactly `n / 1000.0` (readings such as 230.1 or 0.35), tagged
/// with a 0 low bit; otherwise a 1 and the 8 bytes of the float.
fn put_float(out: &mut Vec<u8>, x: f64) {
    if let Some(milli) = exact_thousandths(x) {
        put_varint(out, (((milli << 1) ^ (milli >> 63)) as u64) << 1);
    } else {
        put_varint(out, 1);
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn exact_thousandths(x: f64) -> Option<i64> {
    // Below 2^52 / 1000 so the count, shifted twice for its tags, fits the varint's u64.
    const LIMIT: f64 = 4.0e12;
    if !x.is_finite() || x.abs() >= LIMIT {
        return None;
    }
    let milli = (x * 1000.0).round() as i64;
    ((milli as f64 / 1000.0).to_bits() == x.to_bits()).then_some(milli)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadField)
    }

    fn fine(&mut self) -> Result<i128, DecodeError> {
        let x = self.u128()?;
        let e = (x & 15) as u32;
        (x >> 4)
            .checked_mul(10u128.pow(e))
            .and_then(|v| i128::try_from(v).ok())
            .ok_or(DecodeError::BadField)
    }

    fn u128(&mut self) -> Result<u128, DecodeError> {
        let mut v: u128 = 0;
        for shift in (0..127).step_by(7) {
            let b = self.byte()?;
            v |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadField)
    }

    fn signed(&mut self) -> Result<i64, DecodeError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn float(&mut self) -> Result<f64, DecodeError> {
        let v = self.varint()?;
        if v & 1 == 0 {
            let z = v >> 1;
            let milli = ((z >> 1) as i64) ^ -((z & 1) as i64);
            Ok(milli as f64 / 1000.0)
        } else {
            let raw = self.take(8)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            Ok(f64::from_le_bytes(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(seq: u32, energy_wh: u64) -> V2Report {
        V2Report {
            seq,
            energy_wh,
            power_w: Some(1234.5),
            current_a: Some(5.37),
            voltage_v: Some(229.9),
            relay: Some("on".into()),
            timestamp: Some(1_764_250_000.0),
        }
    }

    fn account(seq: u32, energy: i64) -> Account {
        Account {
            balance_wh: 48_250,
            ledger_seq: 412,
            v2_seq: Some(seq),
            v2_energy_wh: Some(energy),
            v1_total_wh: 0,
            total_consumed_wh: 1_751_750,
            money: None,
        }
    }

    #[test]
    fn a_typical_v2_record_is_small_and_round_trips() {
        let c = Consumption {
            report: Report::V2(v2(9_411, 1_751_750)),
            kind: ReportKind::Debited,
            debit_wh: 12,
            account: account(9_411, 1_751_750),
            itemised: None,
        };
        let bytes = c.encode();
        assert!(bytes.len() <= 40, "{} bytes", bytes.len());
        assert_eq!(Consumption::decode(&bytes), Ok(c.clone()));
        let json = c.to_json();
        assert_eq!(json["powerW"], 1234.5);
        assert_eq!(json["voltageV"], 229.9);
        assert_eq!(json["relay"], "on");
        assert_eq!(json["balanceWh"], 48_250);
        assert_eq!(json["outcome"], "debited");
        assert_eq!(json["v"], 2);
    }

    #[test]
    fn a_v1_record_keeps_the_floats_exactly() {
        let c = Consumption {
            report: Report::V1 {
                total_consumed_units: 0.1 + 0.2,
                remaining_balance_units: 48.25,
                units_consumed: 1.0 / 3.0,
                timestamp: 123_456.0,
            },
            kind: ReportKind::Reboot,
            debit_wh: 300,
            account: Account {
                balance_wh: 48_250,
                ledger_seq: 3,
                v2_seq: None,
                v2_energy_wh: None,
                v1_total_wh: 300,
                total_consumed_wh: 900,
                money: None,
            },
            itemised: None,
        };
        let back = Consumption::decode(&c.encode()).expect("decodes");
        assert_eq!(back, c);
        assert_eq!(back.to_json()["totalConsumed"], 0.1 + 0.2);
    }

    #[test]
    fn damaged_records_are_errors() {
        let bytes = Consumption {
            report: Report::V2(v2(1, 2)),
            kind: ReportKind::Baseline,
            debit_wh: 0,
            account: account(1, 2),
            itemised: None,
        }
        .encode();
        for n in 0..bytes.len() {
            assert!(Consumption::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Consumption::decode(&longer), Err(DecodeError::BadField));
        let mut other = bytes;
        other[0] = 9;
        assert_eq!(Consumption::decode(&other), Err(DecodeError::Format(9)));
    }

    fn money() -> MoneyAccount {
        MoneyAccount {
            balance_cents: 163,
            carry_fine: 500_000_000_000,
            debt: Debt {
                emergency: 0,
                standing: 500,
                arrears: 22_410,
            },
            month: MonthUsage {
                month: MonthKey(2026 * 12 + 2),
                wh: 35_000,
            },
            emergency_armed: true,
            emergency_auto_used: true,
            standing_due_ms: 1_772_398_800_000,
            last_report_ms: 1_772_470_000_123,
        }
    }

    #[test]
    fn a_money_record_keeps_the_account_and_the_itemised_price_and_old_records_still_decode() {
        let flat = Consumption {
            report: Report::V2(v2(9_411, 1_751_750)),
            kind: ReportKind::Debited,
            debit_wh: 12,
            account: account(9_411, 1_751_750),
            itemised: None,
        };
        let old = flat.encode();
        assert_eq!(old[0], 1, "no money account: still format 1");
        let mut a = account(9_411, 1_751_750);
        a.money = Some(money());
        let priced = Consumption {
            account: a,
            itemised: Some(Itemised {
                tariff: "flat".into(),
                energy: vec![EnergyItem {
                    band: 0,
                    tou: None,
                    wh: 12,
                    fine: 24_000_000_000_000,
                }],
                charges: vec![],
                taxes: vec![],
                debit_cents: 24,
                to_debt_cents: 0,
                standing_cents: 0,
            }),
            ..flat.clone()
        };
        let bytes = priced.encode();
        assert_eq!(bytes[0], 2);
        // This report is 39 bytes without the money ledger and 88 with it (the money account
        // about 37 bytes, the itemised price about 12): under half of the JSON it replaces.
        assert_eq!((bytes.len(), old.len()), (88, 39));
        assert_eq!(Consumption::decode(&bytes), Ok(priced.clone()));
        assert_eq!(Consumption::decode(&old), Ok(flat));
        let json = priced.to_json();
        assert_eq!(json["balanceKes"], "1.63");
        assert_eq!(json["debtKes"], "229.10");
        assert_eq!(json["priced"]["totalKes"], "0.24");
        assert_eq!(json["balanceWh"], 48_250, "the original fields stay");
        for n in 0..bytes.len() {
            assert!(Consumption::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
        assert_eq!(
            money_from_column(&money_column(&money())),
            Ok(money()),
            "the meters.money column round-trips"
        );
    }

    #[test]
    fn fine_amounts_print_as_exact_kes() {
        assert_eq!(fine_kes(15_175 * FINE_PER_CENT / 10), "15.175");
        assert_eq!(fine_kes(30_350 * FINE_PER_CENT), "303.50");
        assert_eq!(fine_kes(1), "0.00000000000001");
        assert_eq!(cents_kes(-22_410), "-224.10");
    }

    fn any_float() -> impl Strategy<Value = f64> {
        prop_oneof![
            (-1_000_000_000i64..1_000_000_000).prop_map(|m| m as f64 / 1000.0),
            any::<f64>().prop_filter("finite", |x| x.is_finite()),
            Just(-0.0),
        ]
    }

    fn any_report() -> impl Strategy<Value = Report> {
        prop_oneof![
            (any_float(), any_float(), any_float(), any_float()).prop_map(|(a, b, c, d)| {
                Report::V1 {
                    total_consumed_units: a,
                    remaining_balance_units: b,
                    units_consumed: c,
                    timestamp: d,
                }
            }),
            (
                any::<u32>(),
                0u64..(1 << 53),
                proptest::option::of(any_float()),
                proptest::option::of(any_float()),
                proptest::option::of(any_float()),
                proptest::option::of("[a-z]{0,5}"),
                proptest::option::of(any_float()),
            )
                .prop_map(|(seq, energy_wh, p, c, v, relay, t)| {
                    Report::V2(V2Report {
                        seq,
                        energy_wh,
                        power_w: p,
                        current_a: c,
                        voltage_v: v,
                        relay,
                        timestamp: t,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn every_exact_amount_round_trips(mantissa in 0u128..(1 << 100), zeros in 0u32..20) {
            let v = (mantissa.saturating_mul(10u128.pow(zeros)) >> 4) as i128;
            let mut out = Vec::new();
            put_fine(&mut out, v);
            let mut r = Cursor { bytes: &out, at: 0 };
            prop_assert_eq!(r.fine(), Ok(v));
            prop_assert_eq!(r.at, out.len());
        }

        #[test]
        fn every_record_round_trips(
            report in any_report(),
            kind in 0u8..6,
            debit in any::<i64>(),
            balance in any::<i64>(),
            ledger_seq in any::<i64>(),
            v1_total in any::<i64>(),
            total in any::<i64>(),
            v2_seq in proptest::option::of(any::<u32>()),
            v2_energy in proptest::option::of(any::<i64>()),
            same_as_report in any::<bool>(),
        ) {
            let (v2_seq, v2_energy) = match (&report, same_as_report) {
                (Report::V2(r), true) => (Some(r.seq), Some(r.energy_wh as i64)),
                _ => (v2_seq, v2_energy),
            };
            let c = Consumption {
                report,
                kind: kind_from(kind).expect("kind"),
                debit_wh: debit,
                account: Account {
                    balance_wh: balance,
                    ledger_seq,
                    v2_seq,
                    v2_energy_wh: v2_energy,
                    v1_total_wh: v1_total,
                    total_consumed_wh: total,
                    money: None,
                },
                itemised: None,
            };
            let back = Consumption::decode(&c.encode()).expect("decodes");
            // Compare bit for bit: -0.0 and 0.0 must stay apart.
            prop_assert_eq!(format!("{back:?}"), format!("{c:?}"));
            prop_assert_eq!(back.to_json(), c.to_json());
        }
    }
}
