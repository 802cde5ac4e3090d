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
}

/// `command/balance`: only the integer v2 fields are used; `balance` (float units) and
/// `timestamp` are for v1 firmware and ignored here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceCommand {
    pub balance_wh: i64,
    pub ledger_seq: i64,
    /// Highest consumption `seq` the gateway has applied; absent before the first v2 report.
    pub ack_seq: Option<u32>,
}

/// `command/relay`: maintenance switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayCommand {
    pub relay: Relay,
}

/// `command/config`: settings the gateway may change at run time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConfigCommand {
    pub publish_interval_ms: Option<u32>,
    pub low_balance_wh: Option<i64>,
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
}

#[derive(Deserialize)]
struct RelayWire<'a> {
    #[serde(borrow)]
    relay: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigWire {
    publish_interval_ms: Option<u32>,
    low_balance_units: Option<f64>,
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
                let low_balance_wh = match w.low_balance_units {
                    Some(u) if u.is_finite() && (0.0..1e9).contains(&u) => {
                        Some((u * 1000.0) as i64)
                    }
                    Some(_) => return Err(CommandError::Malformed),
                    None => None,
                };
                Ok(Command::Config(ConfigCommand {
                    publish_interval_ms: w.publish_interval_ms,
                    low_balance_wh,
                }))
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
                ack_seq: Some(7)
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
                low_balance_wh: Some(2500)
            }))
        );
    }
}
