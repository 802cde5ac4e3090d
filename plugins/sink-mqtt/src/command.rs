//! Commands from the cloud: what each one looks like and how the gateway carries it out.
//!
//! `{prefix}/{gateway}/command/credit` `{"id","meter","reference","amount_kes"|"amount_cents"}`
//! credits through the ledger (idempotent by `reference`: the same reference twice credits
//! once and answers the first result with `"duplicate":true`).
//! `…/command/relay` `{"id","meter","relay":"on"|"off","reason"}` and
//! `…/command/config` `{"id","meter","config":{…}}` go to the meter (contract §4).
//! Every command is answered on `…/command_result/{id}`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use umeme_plugin_sdk::{Command, Host, HostError, Payment, PaymentResult};

/// What commands act on: the gateway ([`Host`]), or a fake in tests.
pub trait Downlink {
    fn credit(&self, payment: &Payment) -> Result<PaymentResult, HostError>;
    fn command(&self, command: &Command) -> Result<(), HostError>;
}

impl Downlink for Host {
    fn credit(&self, payment: &Payment) -> Result<PaymentResult, HostError> {
        self.submit_payment(payment)
    }
    fn command(&self, command: &Command) -> Result<(), HostError> {
        self.submit_command(command)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    id: String,
    meter: String,
    reference: String,
    amount_kes: Option<f64>,
    amount_cents: Option<i64>,
    phone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Relay {
    id: String,
    meter: String,
    relay: String,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterConfig {
    id: String,
    meter: String,
    config: Map<String, Value>,
}

/// A command's answer: its id (when it had one) and the result JSON to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub id: Option<String>,
    pub result: Value,
}

/// A parsed command, ready to run.
#[derive(Debug, PartialEq)]
enum Action {
    Credit(Payment),
    Meter(Command),
}

fn parse(command: &str, payload: &[u8]) -> Result<(String, Action), (Option<String>, String)> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| (None, format!("not JSON: {e}")))?;
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let bad = |e: String| (id.clone(), e);
    match command {
        "credit" => {
            let c: Credit =
                serde_json::from_value(value.clone()).map_err(|e| bad(e.to_string()))?;
            let amount_cents = match (c.amount_kes, c.amount_cents) {
                (Some(kes), None) if kes.is_finite() && kes > 0.0 => (kes * 100.0).round() as i64,
                (None, Some(cents)) if cents > 0 => cents,
                (None, None) | (Some(_), Some(_)) => {
                    return Err(bad("give exactly one of amount_kes and amount_cents".into()))
                }
                _ => return Err(bad("the amount must be positive".into())),
            };
            if c.reference.trim().is_empty() {
                return Err(bad("reference must not be empty".into()));
            }
            Ok((
                c.id,
                Action::Credit(Payment {
                    meter: c.meter,
                    amount_cents,
                    reference: c.reference,
                    phone: c.phone,
                    raw: Some(value),
                }),
            ))
        }
        "relay" => {
            let r: Relay = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            if r.relay != "on" && r.relay != "off" {
                return Err(bad(format!(
                    "relay must be \"on\" or \"off\", not {:?}",
                    r.relay
                )));
            }
            let mut payload = json!({"relay": r.relay});
            if let Some(reason) = r.reason {
                payload["reason"] = reason.into();
            }
            Ok((
                r.id,
                Action::Meter(Command {
                    meter: r.meter,
                    command: "relay".into(),
                    payload,
                }),
            ))
        }
        "config" => {
            let c: MeterConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            if c.config.is_empty() {
                return Err(bad("config must not be empty".into()));
            }
            Ok((
                c.id,
                Action::Meter(Command {
                    meter: c.meter,
                    command: "config".into(),
                    payload: Value::Object(c.config),
                }),
            ))
        }
        other => Err(bad(format!(
            "unknown command {other:?} (credit, relay, config)"
        ))),
    }
}

/// Runs one command. A busy gateway is asked again after each pause of `busy_pauses`; the
/// answer comes only once the gateway has committed (credit) or handed over (relay, config)
/// the command, or refused it.
pub fn run(
    command: &str,
    payload: &[u8],
    target: &dyn Downlink,
    busy_pauses: &[Duration],
) -> Answer {
    let (id, action) = match parse(command, payload) {
        Ok(p) => p,
        Err((id, error)) => {
            return Answer {
                result: json!({"id": id, "command": command, "ok": false, "retryable": false, "error": error}),
                id,
            }
        }
    };
    let meter = match &action {
        Action::Credit(p) => p.meter.clone(),
        Action::Meter(c) => c.meter.clone(),
    };
    let mut pauses = busy_pauses.iter();
    let outcome = loop {
        let r = match &action {
            Action::Credit(p) => target.credit(p).map(|r| {
                json!({"duplicate": r.duplicate, "credit_wh": r.credit_wh, "balance_wh": r.balance_wh})
            }),
            Action::Meter(c) => target.command(c).map(|()| json!({})),
        };
        match (r, pauses.next()) {
            (Err(HostError::Busy(_)), Some(pause)) => std::thread::sleep(*pause),
            (r, _) => break r,
        }
    };
    let mut result = json!({"id": id, "command": command, "meter": meter});
    match outcome {
        Ok(Value::Object(fields)) => {
            result["ok"] = true.into();
            for (k, v) in fields {
                result[k] = v;
            }
        }
        Ok(_) => result["ok"] = true.into(),
        Err(e) => {
            result["ok"] = false.into();
            result["retryable"] = matches!(e, HostError::Busy(_)).into();
            result["error"] = e.to_string().into();
        }
    }
    Answer {
        id: Some(id),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Fake {
        credited: RefCell<Vec<Payment>>,
        commands: RefCell<Vec<Command>>,
        busy_for: RefCell<u32>,
    }

    impl Downlink for Fake {
        fn credit(&self, p: &Payment) -> Result<PaymentResult, HostError> {
            let mut busy = self.busy_for.borrow_mut();
            if *busy > 0 {
                *busy -= 1;
                return Err(HostError::Busy("writer full".into()));
            }
            let mut done = self.credited.borrow_mut();
            let duplicate = done.iter().any(|q| q.reference == p.reference);
            if !duplicate {
                done.push(p.clone());
            }
            let total: i64 = done.iter().map(|q| q.amount_cents / 2).sum();
            Ok(PaymentResult {
                duplicate,
                credit_wh: p.amount_cents / 2,
                balance_wh: total,
            })
        }
        fn command(&self, c: &Command) -> Result<(), HostError> {
            if c.meter != "METER001" {
                return Err(HostError::Rejected(format!("unknown meter {}", c.meter)));
            }
            self.commands.borrow_mut().push(c.clone());
            Ok(())
        }
    }

    fn answer(fake: &Fake, command: &str, payload: Value) -> Value {
        run(
            command,
            payload.to_string().as_bytes(),
            fake,
            &[Duration::ZERO; 3],
        )
        .result
    }

    #[test]
    fn a_credit_with_the_same_reference_twice_credits_once() {
        let fake = Fake::default();
        let c = json!({"id": "c1", "meter": "METER001", "reference": "HQ-1", "amount_kes": 100});
        let first = answer(&fake, "credit", c.clone());
        assert_eq!(first["ok"], true);
        assert_eq!(first["duplicate"], false);
        assert_eq!(first["balance_wh"], 5000);
        let again = answer(&fake, "credit", c);
        assert_eq!(again["duplicate"], true);
        assert_eq!(fake.credited.borrow().len(), 1);
        assert_eq!(fake.credited.borrow()[0].amount_cents, 10_000);
    }

    #[test]
    fn a_busy_gateway_is_asked_again_within_the_pauses_then_reported_retryable() {
        let fake = Fake::default();
        *fake.busy_for.borrow_mut() = 2;
        let c = json!({"id": "c1", "meter": "METER001", "reference": "R", "amount_cents": 500});
        assert_eq!(answer(&fake, "credit", c.clone())["ok"], true);
        *fake.busy_for.borrow_mut() = 10;
        let r = answer(
            &fake,
            "credit",
            json!({"id": "c2", "meter": "METER001", "reference": "S", "amount_cents": 5}),
        );
        assert_eq!(r["ok"], false);
        assert_eq!(r["retryable"], true);
    }

    #[test]
    fn relay_and_config_go_to_the_meter_as_contract_commands() {
        let fake = Fake::default();
        let r = answer(
            &fake,
            "relay",
            json!({"id": "r1", "meter": "METER001", "relay": "off", "reason": "maintenance"}),
        );
        assert_eq!(r["ok"], true, "{r}");
        let r = answer(
            &fake,
            "config",
            json!({"id": "k1", "meter": "METER001", "config": {"publishIntervalMs": 5000}}),
        );
        assert_eq!(r["ok"], true, "{r}");
        let sent = fake.commands.borrow();
        assert_eq!(sent[0].command, "relay");
        assert_eq!(
            sent[0].payload,
            json!({"relay": "off", "reason": "maintenance"})
        );
        assert_eq!(sent[1].payload, json!({"publishIntervalMs": 5000}));
        let unknown = answer(
            &fake,
            "relay",
            json!({"id": "r2", "meter": "NOPE", "relay": "on"}),
        );
        assert_eq!(unknown["ok"], false);
        assert_eq!(unknown["retryable"], false);
    }

    #[test]
    fn malformed_commands_are_answered_not_run() {
        let fake = Fake::default();
        for (cmd, payload) in [
            (
                "credit",
                json!({"id": "a", "meter": "METER001", "reference": "R"}),
            ),
            (
                "credit",
                json!({"id": "b", "meter": "METER001", "reference": "R", "amount_kes": -1}),
            ),
            (
                "credit",
                json!({"id": "c", "meter": "METER001", "reference": "R", "amount_kes": 1, "amount_cents": 100}),
            ),
            (
                "relay",
                json!({"id": "d", "meter": "METER001", "relay": "maybe"}),
            ),
            (
                "config",
                json!({"id": "e", "meter": "METER001", "config": {}}),
            ),
            ("reboot", json!({"id": "f", "meter": "METER001"})),
            (
                "relay",
                json!({"id": "g", "meter": "METER001", "relay": "on", "extra": 1}),
            ),
        ] {
            let r = run(cmd, payload.to_string().as_bytes(), &fake, &[]);
            assert_eq!(r.result["ok"], false, "{cmd} {payload}");
            assert!(r.id.is_some());
        }
        let r = run("credit", b"{oops", &fake, &[]);
        assert_eq!(r.id, None);
        assert!(fake.credited.borrow().is_empty() && fake.commands.borrow().is_empty());
    }
}
