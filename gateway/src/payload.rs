//! The JSON that meters send and receive (contract §4). Parsing is strict about the fields the
//! ledger uses and tolerant of extra ones; a bad payload is a [`PayloadError`] value, never a panic.

use serde::{Deserialize, Serialize};

use crate::meter::MeterId;

/// Largest meter payload accepted, in bytes. The original firmware's reports are ~120 bytes.
pub const MAX_PAYLOAD_BYTES: usize = 2048;
/// A cumulative register above this (2^53) cannot be represented exactly in JSON numbers.
const MAX_ENERGY_WH: u64 = 1 << 53;
/// The original firmware counts kWh in a float; ten million kWh is far beyond any meter.
const MAX_TOTAL_UNITS: f64 = 10_000_000.0;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
    #[error("payload is not valid JSON for this topic: {0}")]
    Malformed(String),
    #[error("payload names meter {claimed:?} on the topic of {topic}")]
    MeterMismatch { claimed: String, topic: MeterId },
    #[error("{field} = {value} is out of range")]
    OutOfRange { field: &'static str, value: String },
}

impl PayloadError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::TooLarge(_) => "oversize",
            PayloadError::Malformed(_) => "malformed",
            PayloadError::MeterMismatch { .. } => "meter_mismatch",
            PayloadError::OutOfRange { .. } => "out_of_range",
        }
    }
}

/// A consumption report in either firmware's format.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The original Arduino firmware: a float kWh counter that restarts at 0 on reboot.
    V1 {
        total_consumed_units: f64,
        remaining_balance_units: f64,
        units_consumed: f64,
        timestamp: f64,
    },
    /// Our firmware: a numbered report with a cumulative Wh register kept in flash.
    V2(V2Report),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct V2Report {
    pub seq: u32,
    pub energy_wh: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_a: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voltage_v: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V1Wire {
    units_consumed: f64,
    remaining_balance: f64,
    total_consumed: f64,
    #[serde(default)]
    timestamp: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    meter_no: String,
    #[serde(default)]
    v: Option<u32>,
}

fn malformed(e: serde_json::Error) -> PayloadError {
    PayloadError::Malformed(e.to_string())
}

fn check_size(payload: &[u8]) -> Result<(), PayloadError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        Err(PayloadError::TooLarge(payload.len()))
    } else {
        Ok(())
    }
}

fn check_meter(claimed: &str, topic: &MeterId) -> Result<(), PayloadError> {
    if claimed == topic.as_str() {
        Ok(())
    } else {
        Err(PayloadError::MeterMismatch {
            claimed: claimed.chars().take(80).collect(),
            topic: topic.clone(),
        })
    }
}

fn finite_in(field: &'static str, x: f64, lo: f64, hi: f64) -> Result<f64, PayloadError> {
    if x.is_finite() && x >= lo && x <= hi {
        Ok(x)
    } else {
        Err(PayloadError::OutOfRange {
            field,
            value: x.to_string(),
        })
    }
}

impl Report {
    /// Parses a `…/consumption` payload published on `topic_meter`'s topic.
    pub fn parse(payload: &[u8], topic_meter: &MeterId) -> Result<Report, PayloadError> {
        check_size(payload)?;
        let head: Head = serde_json::from_slice(payload).map_err(malformed)?;
        check_meter(&head.meter_no, topic_meter)?;
        match head.v {
            None | Some(1) => {
                let w: V1Wire = serde_json::from_slice(payload).map_err(malformed)?;
                Ok(Report::V1 {
                    total_consumed_units: finite_in(
                        "totalConsumed",
                        w.total_consumed,
                        0.0,
                        MAX_TOTAL_UNITS,
                    )?,
                    remaining_balance_units: finite_in(
                        "remainingBalance",
                        w.remaining_balance,
                        -MAX_TOTAL_UNITS,
                        MAX_TOTAL_UNITS,
                    )?,
                    units_consumed: finite_in(
                        "unitsConsumed",
                        w.units_consumed,
                        0.0,
                        MAX_TOTAL_UNITS,
                    )?,
                    timestamp: w.timestamp,
                })
            }
            Some(2) => {
                let r: V2Report = serde_json::from_slice(payload).map_err(malformed)?;
                if r.energy_wh > MAX_ENERGY_WH {
                    return Err(PayloadError::OutOfRange {
                        field: "energyWh",
                        value: r.energy_wh.to_string(),
                    });
                }
                for (field, x) in [
                    ("powerW", r.power_w),
                    ("currentA", r.current_a),
                    ("voltageV", r.voltage_v),
                ] {
                    if let Some(x) = x {
                        finite_in(field, x, -1e7, 1e7)?;
                    }
                }
                Ok(Report::V2(r))
            }
            Some(v) => Err(PayloadError::OutOfRange {
                field: "v",
                value: v.to_string(),
            }),
        }
    }
}

/// A `…/status` payload, or the bare `offline` a Last Will often carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusReport {
    pub status: String,
    pub message: Option<String>,
    /// The whole payload as the meter sent it, for the event.
    pub raw: serde_json::Value,
    /// `status = "power_trip"`: the v2 meter's power limiter opened the relay.
    pub trip: Option<PowerTrip>,
}

/// A `power_trip` status: `{"status":"power_trip","powerW","capW","trips","lockedOut"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PowerTrip {
    /// The power that tripped it.
    pub power_w: f64,
    pub cap_w: u32,
    /// Trips within the last 30 minutes, this one included.
    pub trips: u32,
    /// This trip locked the relay off until the operator switches it on or the limits change.
    pub locked_out: bool,
}

impl PowerTrip {
    /// The alert it raises: `power_lockout` when it locked the relay off, else `power_trip`.
    pub fn alert(&self) -> &'static str {
        if self.locked_out {
            "power_lockout"
        } else {
            "power_trip"
        }
    }
}

const STATUSES: [&str; 5] = ["online", "low_balance", "disconnected", "error", "offline"];
/// Statuses only v2 meters send, always as JSON with their fields.
const POWER_TRIP: &str = "power_trip";

impl StatusReport {
    pub fn parse(payload: &[u8], topic_meter: &MeterId) -> Result<StatusReport, PayloadError> {
        check_size(payload)?;
        let trimmed = std::str::from_utf8(payload).map(str::trim).unwrap_or("");
        if STATUSES.contains(&trimmed) {
            return Ok(StatusReport {
                status: trimmed.to_string(),
                message: None,
                raw: serde_json::Value::String(trimmed.to_string()),
                trip: None,
            });
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            meter_no: Option<String>,
            status: String,
            #[serde(default)]
            message: Option<String>,
        }
        let raw: serde_json::Value = serde_json::from_slice(payload).map_err(malformed)?;
        let w: Wire = serde_json::from_value(raw.clone()).map_err(malformed)?;
        if let Some(m) = &w.meter_no {
            check_meter(m, topic_meter)?;
        }
        let trip = if w.status == POWER_TRIP {
            let t: PowerTrip = serde_json::from_value(raw.clone()).map_err(malformed)?;
            finite_in("powerW", t.power_w, 0.0, 1e7)?;
            Some(t)
        } else if STATUSES.contains(&w.status.as_str()) {
            None
        } else {
            return Err(PayloadError::OutOfRange {
                field: "status",
                value: w.status.chars().take(40).collect(),
            });
        };
        Ok(StatusReport {
            status: w.status,
            message: w.message.map(|m| m.chars().take(200).collect()),
            raw,
            trip,
        })
    }
}

/// A `…/balance` payload: the meter's own view, informational only.
pub fn parse_meter_balance(
    payload: &[u8],
    topic_meter: &MeterId,
) -> Result<serde_json::Value, PayloadError> {
    check_size(payload)?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        meter_no: String,
        balance: f64,
    }
    let raw: serde_json::Value = serde_json::from_slice(payload).map_err(malformed)?;
    let w: Wire = serde_json::from_value(raw.clone()).map_err(malformed)?;
    check_meter(&w.meter_no, topic_meter)?;
    finite_in("balance", w.balance, -MAX_TOTAL_UNITS, MAX_TOTAL_UNITS)?;
    Ok(raw)
}

/// `…/command/balance`: what v1 firmware reads (`balance` in units) plus the v2 fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceCommand {
    pub balance: f64,
    pub timestamp: i64,
    pub balance_wh: i64,
    pub ledger_seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_seq: Option<u32>,
    pub relay: Relay,
    /// The money ledger's balance in KES net of debt (issue 16): negative while in debt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_kes: Option<f64>,
    /// `false` in the tariff's friendly hours: the v2 meter does not cut for lack of credit
    /// (the power cap still applies unless `[limits] cap_in_friendly_hours = false`). Sent only
    /// when false; a meter reads an absent one as true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub may_cut: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// `…/command/config`: settings a v2 meter applies at once and keeps on flash. Every field is
/// optional (an absent one keeps the meter's value); the meter refuses the whole command when
/// one is out of its range (firmware/README.md) and says so in an `error` status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigCommand {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_interval_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_balance_units: Option<f64>,
    /// 0: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_cap_w: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_trip_after_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_reclose_after_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_max_trips: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_cap_in_friendly_hours: Option<bool>,
    /// 0: no allowance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_allowance_wh: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_min: Option<i16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relay {
    On,
    Off,
}

impl Relay {
    /// At ≤ 0 the relay is off; at > 0 on (contract §5).
    pub fn for_balance(balance_wh: i64) -> Relay {
        if balance_wh > 0 {
            Relay::On
        } else {
            Relay::Off
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> MeterId {
        MeterId::parse("METER001").unwrap()
    }

    #[test]
    fn original_firmware_payload_parses_as_v1() {
        let p = br#"{"meterNo":"METER001","unitsConsumed":0.04,"remainingBalance":4.96,"totalConsumed":0.04,"timestamp":123456}"#;
        match Report::parse(p, &m()).unwrap() {
            Report::V1 {
                total_consumed_units,
                ..
            } => assert_eq!(total_consumed_units, 0.04),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn v2_payload_parses() {
        let p =
            br#"{"v":2,"meterNo":"METER001","seq":7,"energyWh":1234,"powerW":60.5,"relay":"on"}"#;
        match Report::parse(p, &m()).unwrap() {
            Report::V2(r) => assert_eq!((r.seq, r.energy_wh), (7, 1234)),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn bad_payloads_are_values_not_panics() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "malformed"),
            (b"{}", "malformed"),
            (br#"{"meterNo":"METER002","unitsConsumed":1,"remainingBalance":1,"totalConsumed":1}"#, "meter_mismatch"),
            (br#"{"meterNo":"METER001","unitsConsumed":"1","remainingBalance":1,"totalConsumed":1}"#, "malformed"),
            (br#"{"meterNo":"METER001","unitsConsumed":1,"remainingBalance":1,"totalConsumed":-1}"#, "out_of_range"),
            (br#"{"meterNo":"METER001","unitsConsumed":1,"remainingBalance":1,"totalConsumed":1e300}"#, "out_of_range"),
            (br#"{"v":2,"meterNo":"METER001","seq":-1,"energyWh":1}"#, "malformed"),
            (br#"{"v":2,"meterNo":"METER001","seq":1,"energyWh":18446744073709551615}"#, "out_of_range"),
            (br#"{"v":2,"meterNo":"METER001","seq":1,"energyWh":1.5}"#, "malformed"),
            (br#"{"v":3,"meterNo":"METER001"}"#, "out_of_range"),
        ];
        for (p, reason) in cases {
            let e = Report::parse(p, &m()).unwrap_err();
            assert_eq!(e.reason(), *reason, "{} -> {e}", String::from_utf8_lossy(p));
        }
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        assert_eq!(Report::parse(&big, &m()).unwrap_err().reason(), "oversize");
    }

    #[test]
    fn status_accepts_json_and_bare_will() {
        assert_eq!(
            StatusReport::parse(b"offline", &m()).unwrap().status,
            "offline"
        );
        let s = StatusReport::parse(
            br#"{"meterNo":"METER001","status":"low_balance","message":"x","balance":1.0}"#,
            &m(),
        )
        .unwrap();
        assert_eq!(s.status, "low_balance");
        assert!(StatusReport::parse(br#"{"status":"exploded"}"#, &m()).is_err());
    }

    #[test]
    fn a_power_trip_status_carries_its_fields_and_names_its_alert() {
        let s = StatusReport::parse(
            br#"{"meterNo":"METER001","status":"power_trip","powerW":2345.678,"capW":2000,"trips":3,"lockedOut":true,"timestamp":1}"#,
            &m(),
        )
        .unwrap();
        let t = s.trip.expect("a trip");
        assert_eq!(
            t,
            PowerTrip {
                power_w: 2345.678,
                cap_w: 2000,
                trips: 3,
                locked_out: true
            }
        );
        assert_eq!(t.alert(), "power_lockout");
        let cases: &[(&[u8], &str)] = &[
            (b"power_trip", "malformed"),
            (br#"{"status":"power_trip"}"#, "malformed"),
            (br#"{"status":"power_trip","powerW":1,"capW":-1,"trips":1,"lockedOut":false}"#, "malformed"),
            (br#"{"status":"power_trip","powerW":1e300,"capW":1,"trips":1,"lockedOut":false}"#, "out_of_range"),
            (br#"{"meterNo":"METER002","status":"power_trip","powerW":1,"capW":1,"trips":1,"lockedOut":false}"#, "meter_mismatch"),
        ];
        for (p, reason) in cases {
            let e = StatusReport::parse(p, &m()).unwrap_err();
            assert_eq!(e.reason(), *reason, "{} -> {e}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn may_cut_is_sent_only_when_false_and_config_only_with_its_fields() {
        let mut c = BalanceCommand {
            balance: 1.0,
            timestamp: 5,
            balance_wh: 1000,
            ledger_seq: 2,
            ack_seq: None,
            relay: Relay::On,
            balance_kes: None,
            may_cut: true,
        };
        let j = serde_json::to_value(&c).unwrap();
        assert!(j.get("mayCut").is_none(), "{j}");
        c.may_cut = false;
        assert_eq!(serde_json::to_value(&c).unwrap()["mayCut"], false);
        let cfg = ConfigCommand {
            power_cap_w: Some(2000),
            utc_offset_min: Some(180),
            ..ConfigCommand::default()
        };
        assert_eq!(
            serde_json::to_string(&cfg).unwrap(),
            r#"{"powerCapW":2000,"utcOffsetMin":180}"#
        );
    }
}
