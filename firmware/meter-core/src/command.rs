//! The gateway's commands to a meter (`{prefix}/{meter}/command/{leaf}`, contract §4).

use serde::Deserialize;

use crate::balance::Relay;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command payload is not valid JSON for its topic")]
    Malformed,
    #[error("balance command without balanceWh and ledgerSeq (a v1-only gateway)")]
    NotV2,
    #[error("unknown command topic")]
    UnknownTopic,
    /// A `command/config` value outside its range: the whole command is refused.
    #[error("config refused: {field} must be {range}")]
    ConfigRefused {
        field: &'static str,
        range: &'static str,
    },
}

/// `command/balance`: only the integer v2 fields are used; `balance` (float units) and
/// `timestamp` are for v1 firmware and ignored here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceCommand {
    pub balance_wh: i64,
    pub ledger_seq: i64,
    /// Highest consumption `seq` the gateway has applied; absent before the first v2 report.
    pub ack_seq: Option<u32>,
    /// The gateway's clock (Unix ms) when it sent this; the meter's time of day comes from it.
    pub timestamp_ms: Option<u64>,
    /// `false` in the tariff's friendly hours: no cut for lack of credit. Absent = true.
    pub may_cut: bool,
}

/// `command/relay`: maintenance switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayCommand {
    pub relay: Relay,
}

/// `command/config`: settings the gateway may change at run time. Every field is optional;
/// an absent one keeps its value. Ranges are checked by [`Command::parse`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConfigCommand {
    pub publish_interval_ms: Option<u32>,
    pub low_balance_wh: Option<i64>,
    pub power_cap_w: Option<u32>,
    pub power_trip_after_s: Option<u32>,
    pub power_reclose_after_s: Option<u32>,
    pub power_max_trips: Option<u8>,
    pub power_cap_in_friendly_hours: Option<bool>,
    pub daily_allowance_wh: Option<u32>,
    pub utc_offset_min: Option<i16>,
}

/// The ranges `command/config` accepts (firmware/README.md lists them).
pub mod ranges {
    pub const PUBLISH_INTERVAL_MS: (i64, i64) = (5_000, 3_600_000);
    pub const LOW_BALANCE_UNITS: (f64, f64) = (0.0, 10_000.0);
    /// 0 turns the cap off.
    pub const POWER_CAP_W: (i64, i64) = (100, 50_000);
    pub const POWER_TRIP_AFTER_S: (i64, i64) = (1, 3_600);
    pub const POWER_RECLOSE_AFTER_S: (i64, i64) = (5, 86_400);
    pub const POWER_MAX_TRIPS: (i64, i64) = (1, crate::limits::MAX_TRIPS as i64);
    /// 0 turns the allowance off.
    pub const DAILY_ALLOWANCE_WH: (i64, i64) = (100, 1_000_000);
    pub const UTC_OFFSET_MIN: (i64, i64) = (-720, 840);
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    Balance(BalanceCommand),
    Relay(RelayCommand),
    Config(ConfigCommand),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BalanceWire {
    balance_wh: Option<i64>,
    ledger_seq: Option<i64>,
    ack_seq: Option<u32>,
    timestamp: Option<f64>,
    may_cut: Option<bool>,
}

#[derive(Deserialize)]
struct RelayWire<'a> {
    #[serde(borrow)]
    relay: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigWire {
    // Integers are read wide so that a negative or huge value is refused by name, not as
    // "malformed".
    publish_interval_ms: Option<i64>,
    low_balance_units: Option<f64>,
    power_cap_w: Option<i64>,
    power_trip_after_s: Option<i64>,
    power_reclose_after_s: Option<i64>,
    power_max_trips: Option<i64>,
    power_cap_in_friendly_hours: Option<bool>,
    daily_allowance_wh: Option<i64>,
    utc_offset_min: Option<i64>,
}

/// `v` within `(lo, hi)`, or 0 when `zero_is_off`; else the whole command is refused.
fn in_range(
    field: &'static str,
    range: &'static str,
    v: Option<i64>,
    (lo, hi): (i64, i64),
    zero_is_off: bool,
) -> Result<Option<i64>, CommandError> {
    match v {
        None => Ok(None),
        Some(0) if zero_is_off => Ok(Some(0)),
        Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
        Some(_) => Err(CommandError::ConfigRefused { field, range }),
    }
}

impl ConfigWire {
    fn check(self) -> Result<ConfigCommand, CommandError> {
        use ranges::*;
        let low_balance_wh = match self.low_balance_units {
            Some(u)
                if u.is_finite() && (LOW_BALANCE_UNITS.0..=LOW_BALANCE_UNITS.1).contains(&u) =>
            {
                Some((u * 1000.0) as i64)
            }
            Some(_) => {
                return Err(CommandError::ConfigRefused {
                    field: "lowBalanceUnits",
                    range: "0 to 10000",
                })
            }
            None => None,
        };
        Ok(ConfigCommand {
            publish_interval_ms: in_range(
                "publishIntervalMs",
                "5000..=3600000",
                self.publish_interval_ms,
                PUBLISH_INTERVAL_MS,
                false,
            )?
            .map(|x| x as u32),
            low_balance_wh,
            power_cap_w: in_range(
                "powerCapW",
                "0 (off) or 100..=50000",
                self.power_cap_w,
                POWER_CAP_W,
                true,
            )?
            .map(|x| x as u32),
            power_trip_after_s: in_range(
                "powerTripAfterS",
                "1..=3600",
                self.power_trip_after_s,
                POWER_TRIP_AFTER_S,
                false,
            )?
            .map(|x| x as u32),
            power_reclose_after_s: in_range(
                "powerRecloseAfterS",
                "5..=86400",
                self.power_reclose_after_s,
                POWER_RECLOSE_AFTER_S,
                false,
            )?
            .map(|x| x as u32),
            power_max_trips: in_range(
                "powerMaxTrips",
                "1..=10",
                self.power_max_trips,
                POWER_MAX_TRIPS,
                false,
            )?
            .map(|x| x as u8),
            power_cap_in_friendly_hours: self.power_cap_in_friendly_hours,
            daily_allowance_wh: in_range(
                "dailyAllowanceWh",
                "0 (off) or 100..=1000000",
                self.daily_allowance_wh,
                DAILY_ALLOWANCE_WH,
                true,
            )?
            .map(|x| x as u32),
            utc_offset_min: in_range(
                "utcOffsetMin",
                "-720..=840",
                self.utc_offset_min,
                UTC_OFFSET_MIN,
                false,
            )?
            .map(|x| x as i16),
        })
    }
}

fn json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, CommandError> {
    serde_json_core::from_slice::<T>(payload)
        .map(|(v, _)| v)
        .map_err(|_| CommandError::Malformed)
}

impl Command {
    /// Parses the payload of `…/command/{leaf}`.
    pub fn parse(leaf: &str, payload: &[u8]) -> Result<Command, CommandError> {
        match leaf {
            "balance" => {
                let w: BalanceWire = json(payload)?;
                match (w.balance_wh, w.ledger_seq) {
                    (Some(balance_wh), Some(ledger_seq)) => Ok(Command::Balance(BalanceCommand {
                        balance_wh,
                        ledger_seq,
                        ack_seq: w.ack_seq,
                        // A gateway clock before 2001 or beyond 2286 is no clock.
                        timestamp_ms: w
                            .timestamp
                            .filter(|t| t.is_finite() && (1e12..1e13).contains(t))
                            .map(|t| t as u64),
                        may_cut: w.may_cut.unwrap_or(true),
                    })),
                    _ => Err(CommandError::NotV2),
                }
            }
            "relay" => {
                let w: RelayWire = json(payload)?;
                let relay = match w.relay {
                    "on" => Relay::On,
                    "off" => Relay::Off,
                    _ => return Err(CommandError::Malformed),
                };
                Ok(Command::Relay(RelayCommand { relay }))
            }
            "config" => {
                let w: ConfigWire = json(payload)?;
                Ok(Command::Config(w.check()?))
            }
            _ => Err(CommandError::UnknownTopic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_balance_command_parses() {
        let p = br#"{"balance":4.96,"timestamp":1764230400123,"balanceWh":4960,"ledgerSeq":12,"ackSeq":7,"relay":"on"}"#;
        assert_eq!(
            Command::parse("balance", p),
            Ok(Command::Balance(BalanceCommand {
                balance_wh: 4960,
                ledger_seq: 12,
                ack_seq: Some(7),
                timestamp_ms: Some(1764230400123),
                may_cut: true,
            }))
        );
    }

    #[test]
    fn balance_command_before_the_first_v2_report_has_no_ack_seq() {
        let p = br#"{"balance":-0.5,"timestamp":1,"balanceWh":-500,"ledgerSeq":1,"relay":"off"}"#;
        match Command::parse("balance", p) {
            Ok(Command::Balance(c)) => assert_eq!((c.balance_wh, c.ack_seq), (-500, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_only_and_garbage_commands_are_errors() {
        assert_eq!(
            Command::parse("balance", br#"{"balance":4.96,"timestamp":1}"#),
            Err(CommandError::NotV2)
        );
        assert_eq!(
            Command::parse("balance", b"garbage"),
            Err(CommandError::Malformed)
        );
        assert_eq!(
            Command::parse("relay", br#"{"relay":"maybe"}"#),
            Err(CommandError::Malformed)
        );
        assert_eq!(
            Command::parse("reboot", b"{}"),
            Err(CommandError::UnknownTopic)
        );
    }

    #[test]
    fn relay_and_config_commands_parse() {
        assert_eq!(
            Command::parse("relay", br#"{"relay":"off","reason":"maintenance"}"#),
            Ok(Command::Relay(RelayCommand { relay: Relay::Off }))
        );
        assert_eq!(
            Command::parse(
                "config",
                br#"{"publishIntervalMs":30000,"lowBalanceUnits":2.5}"#
            ),
            Ok(Command::Config(ConfigCommand {
                publish_interval_ms: Some(30000),
                low_balance_wh: Some(2500),
                ..ConfigCommand::default()
            }))
        );
    }

    #[test]
    fn may_cut_is_true_unless_the_gateway_says_false() {
        let p = br#"{"balance":0,"timestamp":1764230400123,"balanceWh":0,"ledgerSeq":1,"relay":"off","mayCut":false}"#;
        match Command::parse("balance", p) {
            Ok(Command::Balance(c)) => assert!(!c.may_cut),
            other => panic!("{other:?}"),
        }
        match Command::parse("balance", br#"{"balanceWh":0,"ledgerSeq":1}"#) {
            Ok(Command::Balance(c)) => assert!(c.may_cut && c.timestamp_ms.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_limit_setting_parses() {
        let p = br#"{"publishIntervalMs":15000,"lowBalanceUnits":3,"powerCapW":2000,"powerTripAfterS":10,"powerRecloseAfterS":60,"powerMaxTrips":3,"powerCapInFriendlyHours":false,"dailyAllowanceWh":5000,"utcOffsetMin":180}"#;
        assert_eq!(
            Command::parse("config", p),
            Ok(Command::Config(ConfigCommand {
                publish_interval_ms: Some(15000),
                low_balance_wh: Some(3000),
                power_cap_w: Some(2000),
                power_trip_after_s: Some(10),
                power_reclose_after_s: Some(60),
                power_max_trips: Some(3),
                power_cap_in_friendly_hours: Some(false),
                daily_allowance_wh: Some(5000),
                utc_offset_min: Some(180),
            }))
        );
        assert_eq!(
            Command::parse("config", br#"{"powerCapW":0,"dailyAllowanceWh":0}"#),
            Ok(Command::Config(ConfigCommand {
                power_cap_w: Some(0),
                daily_allowance_wh: Some(0),
                ..ConfigCommand::default()
            })),
            "0 turns the cap and the allowance off"
        );
    }

    #[test]
    fn a_value_out_of_range_refuses_the_whole_config_by_name() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"publishIntervalMs":999}"#, "publishIntervalMs"),
            (br#"{"publishIntervalMs":-1}"#, "publishIntervalMs"),
            (br#"{"lowBalanceUnits":-0.5}"#, "lowBalanceUnits"),
            (br#"{"powerCapW":99}"#, "powerCapW"),
            (br#"{"powerCapW":50001}"#, "powerCapW"),
            (br#"{"powerTripAfterS":0}"#, "powerTripAfterS"),
            (br#"{"powerRecloseAfterS":4}"#, "powerRecloseAfterS"),
            (br#"{"powerMaxTrips":11}"#, "powerMaxTrips"),
            (br#"{"dailyAllowanceWh":50}"#, "dailyAllowanceWh"),
            (br#"{"utcOffsetMin":900}"#, "utcOffsetMin"),
            (br#"{"powerCapW":2000,"utcOffsetMin":-721}"#, "utcOffsetMin"),
        ];
        for (p, field) in cases {
            match Command::parse("config", p) {
                Err(CommandError::ConfigRefused { field: f, .. }) => assert_eq!(f, *field),
                other => panic!("{}: {other:?}", core::str::from_utf8(p).unwrap()),
            }
        }
        let e = Command::parse("config", br#"{"powerCapW":7}"#).unwrap_err();
        assert_eq!(
            std::format!("{e}"),
            "config refused: powerCapW must be 0 (off) or 100..=50000"
        );
    }
}
