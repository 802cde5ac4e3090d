//! Commands from the cloud: what each one looks like and how the gateway carries it out.
//!
//! `{prefix}/{gateway}/command/credit` `{"id","meter","reference","amount_kes"|"amount_cents"}`
//! credits through the ledger (a reference credits once per site: the same reference, meter and
//! amount again answers the first result with `"duplicate":true`; another meter or amount is
//! refused). `…/command/relay` `{"id","meter","relay":"on"|"off","reason"}` and
//! `…/command/config` `{"id","meter","config":{…}}` go to the meter (contract §4).
//! Every command is signed ([`crate::signature`]) and answered on `…/command_result/{id}`.
//!
//! Every field is bounded ([`MAX_COMMAND_BYTES`], [`MAX_ID_CHARS`], …): a bad command gets an
//! error result, never a topic or a packet the broker would refuse.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use umeme_plugin_sdk::{Command, Host, HostError, Payment, PaymentResult};

use crate::config::CommandRules;
use crate::kv;
use crate::signature::{self, is_token, Opened};

/// The largest command payload read (the envelope included); anything larger is refused
/// unread.
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;
/// An id names the result topic: 1 to 64 of `A-Z a-z 0-9 . _ : -`.
pub const MAX_ID_CHARS: usize = 64;
/// Meter numbers and references, in characters.
pub const MAX_METER_CHARS: usize = 64;
pub const MAX_REFERENCE_CHARS: usize = 64;
pub const MAX_PHONE_CHARS: usize = 32;
pub const MAX_REASON_CHARS: usize = 200;
/// A meter's `config` object, as JSON.
pub const MAX_CONFIG_BYTES: usize = 1024;
/// An error text in a result, in characters (it may quote what the cloud sent).
const MAX_ERROR_CHARS: usize = 200;

/// What commands act on: the gateway ([`Host`]), or a fake in tests.
pub trait Downlink {
    fn credit(&self, payment: &Payment) -> Result<PaymentResult, HostError>;
    fn command(&self, command: &Command) -> Result<(), HostError>;
    fn kv_get(&self, key: &str) -> Result<Option<String>, HostError>;
    /// `None` deletes.
    fn kv_put(&self, key: &str, value: Option<&str>) -> Result<(), HostError>;
}

impl Downlink for Host {
    fn credit(&self, payment: &Payment) -> Result<PaymentResult, HostError> {
        self.submit_payment(payment)
    }
    fn command(&self, command: &Command) -> Result<(), HostError> {
        self.submit_command(command)
    }
    fn kv_get(&self, key: &str) -> Result<Option<String>, HostError> {
        Host::kv_get(self, key)
    }
    fn kv_put(&self, key: &str, value: Option<&str>) -> Result<(), HostError> {
        match value {
            Some(v) => Host::kv_put(self, key, v),
            None => Host::kv_delete(self, key),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    meter: String,
    reference: String,
    amount_kes: Option<f64>,
    amount_cents: Option<i64>,
    phone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Relay {
    meter: String,
    relay: String,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterConfig {
    meter: String,
    config: Map<String, Value>,
}

/// A command's answer: its id (when it had a usable one) and the result JSON to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub id: Option<String>,
    pub result: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.result["ok"] == true
    }
}

/// What a command runs with besides itself.
pub struct Context<'a> {
    pub rules: &'a CommandRules,
    /// The gateway's clock, Unix seconds.
    pub now: i64,
    /// A busy gateway is asked again after each of these pauses.
    pub busy_pauses: &'a [Duration],
}

/// A parsed command, ready to run.
#[derive(Debug, PartialEq)]
enum Action {
    Credit(Payment),
    Meter(Command),
}

fn chars_at_most(key: &str, s: &str, max: usize) -> Result<(), String> {
    if s.chars().count() > max {
        return Err(format!("{key} is longer than {max} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{key} must not hold control characters"));
    }
    Ok(())
}

fn meter_of(meter: &str) -> Result<(), String> {
    if meter.is_empty() {
        return Err("meter must not be empty".into());
    }
    chars_at_most("meter", meter, MAX_METER_CHARS)
}

fn parse(command: &str, body: &Map<String, Value>, rules: &CommandRules) -> Result<Action, String> {
    // The id was checked by the caller; the rest must be exactly the command's fields.
    let mut fields = body.clone();
    fields.remove("id");
    let value = Value::Object(fields);
    match command {
        "credit" => {
            let c: Credit = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
            meter_of(&c.meter)?;
            let amount_cents = match (c.amount_kes, c.amount_cents) {
                (Some(kes), None) if kes.is_finite() && kes > 0.0 && kes <= 1e9 => {
                    (kes * 100.0).round() as i64
                }
                (None, Some(cents)) if cents > 0 => cents,
                (None, None) | (Some(_), Some(_)) => {
                    return Err("give exactly one of amount_kes and amount_cents".into())
                }
                _ => return Err("the amount must be positive".into()),
            };
            if amount_cents > rules.max_credit_cents_per_command {
                return Err(format!(
                    "over the cap per command: at most KES {} (max_credit_kes_per_command)",
                    rules.max_credit_cents_per_command / 100
                ));
            }
            // The gateway trims and compares references ignoring ASCII case; the bound is ours.
            let reference = c.reference.trim();
            if reference.is_empty() {
                return Err("reference must not be empty".into());
            }
            chars_at_most("reference", reference, MAX_REFERENCE_CHARS)?;
            if let Some(phone) = &c.phone {
                chars_at_most("phone", phone, MAX_PHONE_CHARS)?;
            }
            Ok(Action::Credit(Payment {
                meter: c.meter,
                amount_cents,
                reference: reference.to_string(),
                phone: c.phone,
                raw: Some(Value::Object(body.clone())),
            }))
        }
        "relay" => {
            let r: Relay = serde_json::from_value(value).map_err(|e| e.to_string())?;
            meter_of(&r.meter)?;
            if r.relay != "on" && r.relay != "off" {
                return Err("relay must be \"on\" or \"off\"".into());
            }
            let mut payload = json!({"relay": r.relay});
            if let Some(reason) = r.reason {
                chars_at_most("reason", &reason, MAX_REASON_CHARS)?;
                payload["reason"] = reason.into();
            }
            Ok(Action::Meter(Command {
                meter: r.meter,
                command: "relay".into(),
                payload,
            }))
        }
        "config" => {
            let c: MeterConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
            meter_of(&c.meter)?;
            if c.config.is_empty() {
                return Err("config must not be empty".into());
            }
            let payload = Value::Object(c.config);
            if payload.to_string().len() > MAX_CONFIG_BYTES {
                return Err(format!(
                    "config is larger than {MAX_CONFIG_BYTES} bytes as JSON"
                ));
            }
            Ok(Action::Meter(Command {
                meter: c.meter,
                command: "config".into(),
                payload,
            }))
        }
        _ => Err("unknown command (credit, relay, config)".into()),
    }
}

/// `s` cut to [`MAX_ERROR_CHARS`] characters.
fn bounded(s: String) -> String {
    match s.char_indices().nth(MAX_ERROR_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// The command name as a result may echo it.
fn shown(command: &str) -> &str {
    if is_token(command, 32) {
        command
    } else {
        "(unknown)"
    }
}

fn failure(id: Option<&str>, command: &str, retryable: bool, error: String) -> Value {
    json!({"id": id, "command": shown(command), "ok": false, "retryable": retryable,
           "error": bounded(error)})
}

/// An id the result topic can carry.
fn usable_id(body: &Map<String, Value>) -> Option<String> {
    body.get("id")
        .and_then(Value::as_str)
        .filter(|id| is_token(id, MAX_ID_CHARS))
        .map(str::to_string)
}

/// Runs one command: reads and checks it (size, signature, window, nonce, fields, caps), then
/// has the gateway carry it out. The answer comes only once the gateway has committed
/// (credit) or handed over (relay, config) the command, or refused it.
pub fn run(command: &str, payload: &[u8], target: &dyn Downlink, cx: &Context<'_>) -> Answer {
    let refused = |id: Option<String>, error: String| Answer {
        result: failure(id.as_deref(), command, false, error),
        id,
    };
    if payload.len() > MAX_COMMAND_BYTES {
        return refused(
            None,
            format!(
                "the command is {} bytes; at most {MAX_COMMAND_BYTES} are read",
                payload.len()
            ),
        );
    }
    let value: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return refused(None, format!("not JSON: {e}")),
    };
    let opened = match signature::open(cx.rules, value, cx.now) {
        Ok(o) => o,
        Err(r) => return refused(r.body.as_ref().and_then(usable_id), r.reason),
    };
    let Some(id) = usable_id(opened.body()) else {
        return refused(
            None,
            format!("id must be 1 to {MAX_ID_CHARS} of A-Z a-z 0-9 . _ : -"),
        );
    };
    let retry_later = |e: HostError| Answer {
        result: failure(
            Some(&id),
            command,
            true,
            format!("the gateway's store: {e}"),
        ),
        id: Some(id.clone()),
    };
    if let Opened::Signed { ts, nonce, .. } = &opened {
        match kv::seen(target, *ts, nonce) {
            Ok(Some(mut first)) => {
                first["replayed"] = true.into();
                return Answer {
                    id: Some(id),
                    result: first,
                };
            }
            Ok(None) => {}
            Err(e) => return retry_later(e),
        }
        match kv::has_room(target, *ts) {
            Ok(true) => {}
            Ok(false) => {
                return Answer {
                    result: failure(
                        Some(&id),
                        command,
                        true,
                        format!(
                            "more than {} signed commands with a ts in one minute",
                            kv::MAX_COMMANDS_PER_MINUTE
                        ),
                    ),
                    id: Some(id),
                }
            }
            Err(e) => return retry_later(e),
        }
    }
    let result = execute(command, &id, opened.body(), target, cx);
    // A final answer uses the nonce up; after a retryable one the same signed command may be
    // sent again within the window.
    if let Opened::Signed { ts, nonce, .. } = &opened {
        if result["retryable"] != true {
            let window = cx.rules.window.as_secs() as i64;
            if let Err(e) = kv::record(target, *ts, nonce, &result, cx.now, window) {
                log::warn!("command {id}: its nonce could not be stored ({e}); a replay within the window would run it again");
            }
        }
    }
    Answer {
        id: Some(id),
        result,
    }
}

fn execute(
    command: &str,
    id: &str,
    body: &Map<String, Value>,
    target: &dyn Downlink,
    cx: &Context<'_>,
) -> Value {
    let action = match parse(command, body, cx.rules) {
        Ok(a) => a,
        Err(e) => return failure(Some(id), command, false, e),
    };
    let meter = match &action {
        Action::Credit(p) => p.meter.clone(),
        Action::Meter(c) => c.meter.clone(),
    };
    let day = cx.now.div_euclid(86_400);
    if let Action::Credit(p) = &action {
        match kv::reserve_credit(
            target,
            day,
            p.amount_cents,
            cx.rules.max_credit_cents_per_day,
        ) {
            Ok(Ok(())) => {}
            Ok(Err(kv::OverCap(why))) => return failure(Some(id), command, false, why),
            Err(e) => return failure(Some(id), command, true, format!("the gateway's store: {e}")),
        }
    }
    let mut pauses = cx.busy_pauses.iter();
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
    if let Action::Credit(p) = &action {
        let credited = matches!(&outcome, Ok(v) if v["duplicate"] == false);
        if !credited {
            if let Err(e) = kv::release_credit(target, day, p.amount_cents) {
                log::warn!("command {id}: the day's cloud credit total could not be corrected ({e}); it counts KES {} too many", p.amount_cents as f64 / 100.0);
            }
        }
    }
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
            result["error"] = bounded(e.to_string()).into();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::sign;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    const KEY: &str = "0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    #[derive(Default)]
    struct Fake {
        credited: RefCell<Vec<Payment>>,
        commands: RefCell<Vec<Command>>,
        busy_for: RefCell<u32>,
        kv: RefCell<BTreeMap<String, String>>,
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
        fn kv_get(&self, key: &str) -> Result<Option<String>, HostError> {
            Ok(self.kv.borrow().get(key).cloned())
        }
        fn kv_put(&self, key: &str, value: Option<&str>) -> Result<(), HostError> {
            let mut kv = self.kv.borrow_mut();
            match value {
                Some(v) => kv.insert(key.into(), v.into()),
                None => kv.remove(key),
            };
            Ok(())
        }
    }

    fn rules(allow_unsigned: bool) -> CommandRules {
        CommandRules {
            key: Some(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                KEY.as_bytes(),
            )),
            allow_unsigned,
            window: Duration::from_secs(300),
            max_credit_cents_per_command: 10_000 * 100,
            max_credit_cents_per_day: 25_000 * 100,
        }
    }

    fn at(fake: &Fake, rules: &CommandRules, now: i64, command: &str, payload: &str) -> Answer {
        let cx = Context {
            rules,
            now,
            busy_pauses: &[Duration::ZERO; 3],
        };
        run(command, payload.as_bytes(), fake, &cx)
    }

    /// `body` plus `ts` and `nonce`, signed.
    fn signed(mut body: Value, ts: i64, nonce: &str) -> String {
        body["ts"] = ts.into();
        body["nonce"] = nonce.into();
        sign(KEY.as_bytes(), &body.to_string())
    }

    fn answer(fake: &Fake, command: &str, body: Value, nonce: &str) -> Value {
        at(fake, &rules(false), NOW, command, &signed(body, NOW, nonce)).result
    }

    fn credit(id: &str, reference: &str, kes: f64) -> Value {
        json!({"id": id, "meter": "METER001", "reference": reference, "amount_kes": kes})
    }

    #[test]
    fn a_credit_with_the_same_reference_twice_credits_once() {
        let fake = Fake::default();
        let first = answer(&fake, "credit", credit("c1", "HQ-1", 100.0), "n1");
        assert_eq!(first["ok"], true, "{first}");
        assert_eq!(first["duplicate"], false);
        assert_eq!(first["balance_wh"], 5000);
        let again = answer(&fake, "credit", credit("c2", "HQ-1", 100.0), "n2");
        assert_eq!(again["duplicate"], true);
        assert_eq!(fake.credited.borrow().len(), 1);
        assert_eq!(fake.credited.borrow()[0].amount_cents, 10_000);
    }

    #[test]
    fn a_replayed_signed_command_runs_once_and_is_answered_with_the_first_result() {
        let fake = Fake::default();
        let relay = json!({"id": "r1", "meter": "METER001", "relay": "off"});
        let msg = signed(relay, NOW, "once");
        let first = at(&fake, &rules(false), NOW, "relay", &msg);
        assert!(first.ok(), "{:?}", first.result);
        let replay = at(&fake, &rules(false), NOW + 200, "relay", &msg);
        assert_eq!(replay.result["replayed"], true);
        assert_eq!(replay.result["ok"], true);
        assert_eq!(
            fake.commands.borrow().len(),
            1,
            "the relay was switched once"
        );
        // Past the window the same message is expired, not run.
        let late = at(&fake, &rules(false), NOW + 301, "relay", &msg);
        assert!(late.result["error"]
            .as_str()
            .unwrap()
            .starts_with("expired"));
        assert_eq!(fake.commands.borrow().len(), 1);
    }

    #[test]
    fn unsigned_and_badly_signed_commands_are_refused_and_nothing_runs() {
        let fake = Fake::default();
        let body = credit("c1", "R", 100.0);
        let r = at(&fake, &rules(false), NOW, "credit", &body.to_string());
        assert_eq!(r.id.as_deref(), Some("c1"));
        assert!(r.result["error"]
            .as_str()
            .unwrap()
            .starts_with("unsigned command refused"));
        let wrong_key = {
            let mut b = body.clone();
            b["ts"] = NOW.into();
            b["nonce"] = "x".into();
            sign(b"another site's key, 32 bytes long", &b.to_string())
        };
        let r = at(&fake, &rules(false), NOW, "credit", &wrong_key);
        assert_eq!(r.result["error"], "bad signature");
        assert!(fake.credited.borrow().is_empty());
        // With allow_unsigned_commands the plain form is taken (caps still apply).
        let r = at(&fake, &rules(true), NOW, "credit", &body.to_string());
        assert!(r.ok(), "{:?}", r.result);
    }

    #[test]
    fn credits_over_the_per_command_cap_or_the_days_cap_are_refused_and_the_day_is_counted_in_the_store(
    ) {
        let fake = Fake::default();
        let r = answer(&fake, "credit", credit("c0", "R0", 10_000.01), "n0");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("max_credit_kes_per_command"),
            "{r}"
        );
        let r = answer(&fake, "credit", credit("c1", "R1", 10_000.0), "n1");
        assert!(r["ok"] == true, "{r}");
        // A duplicate credits nothing, so it uses none of the day's cap.
        let r = answer(&fake, "credit", credit("d", "R1", 10_000.0), "nd");
        assert_eq!(r["duplicate"], true, "{r}");
        let r = answer(&fake, "credit", credit("c2", "R2", 10_000.0), "n2");
        assert!(r["ok"] == true, "{r}");
        let r = answer(&fake, "credit", credit("c3", "R3", 5_000.01), "n3");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("max_credit_kes_per_day"),
            "{r}"
        );
        assert_eq!(r["retryable"], false);
        assert_eq!(
            answer(&fake, "credit", credit("c4", "R4", 5_000.0), "n4")["ok"],
            true
        );
        assert_eq!(kv::credited_on(&fake, NOW / 86_400).unwrap(), 25_000 * 100);
        // The next UTC day starts at 0.
        let next_day = (NOW / 86_400 + 1) * 86_400;
        let msg = signed(credit("c5", "R5", 100.0), next_day, "n5");
        assert!(at(&fake, &rules(false), next_day, "credit", &msg).ok());
    }

    #[test]
    fn a_seventy_thousand_character_id_is_refused_unread_and_a_long_id_gets_no_result_topic() {
        let fake = Fake::default();
        let huge = credit(&"x".repeat(70_000), "R", 1.0);
        let r = at(&fake, &rules(true), NOW, "credit", &huge.to_string());
        assert_eq!(r.id, None);
        assert!(
            r.result["error"].as_str().unwrap().contains("at most 8192"),
            "{}",
            r.result
        );
        let long = answer(&fake, "credit", credit(&"x".repeat(65), "R", 1.0), "n");
        assert_eq!(long["id"], Value::Null);
        assert!(long["error"].as_str().unwrap().starts_with("id must be"));
        let slash = answer(&fake, "credit", credit("a/b", "R", 1.0), "n2");
        assert_eq!(slash["id"], Value::Null);
        assert!(fake.credited.borrow().is_empty());
    }

    #[test]
    fn every_field_is_bounded_and_errors_do_not_echo_long_input() {
        let fake = Fake::default();
        for (cmd, body) in [
            ("credit", credit("a", &"R".repeat(65), 1.0)),
            (
                "credit",
                json!({"id": "b", "meter": "M".repeat(65), "reference": "R", "amount_kes": 1}),
            ),
            (
                "credit",
                json!({"id": "c", "meter": "METER001", "reference": "R", "amount_kes": 1, "phone": "7".repeat(33)}),
            ),
            (
                "relay",
                json!({"id": "d", "meter": "METER001", "relay": "off", "reason": "r".repeat(201)}),
            ),
            (
                "config",
                json!({"id": "e", "meter": "METER001", "config": {"k": "v".repeat(1100)}}),
            ),
            (
                "relay",
                json!({"id": "f", "meter": "METER001", "relay": "x".repeat(5000)}),
            ),
            (
                "credit",
                json!({"id": "g", "meter": "METER001", "reference": "R", "amount_kes": 1, "z".repeat(5000): 1}),
            ),
        ] {
            let r = answer(
                &fake,
                cmd,
                body.clone(),
                &format!("n-{}", body["id"].as_str().unwrap()),
            );
            assert_eq!(r["ok"], false, "{cmd} {body}");
            assert!(r.to_string().len() < 600, "{r}");
        }
        let r = answer(
            &fake,
            &"c".repeat(100),
            json!({"id": "h", "meter": "METER001"}),
            "n-h",
        );
        assert_eq!(r["command"], "(unknown)");
        assert!(fake.credited.borrow().is_empty() && fake.commands.borrow().is_empty());
    }

    #[test]
    fn a_trailing_space_in_the_reference_is_the_same_reference() {
        let fake = Fake::default();
        answer(&fake, "credit", credit("c1", "HQ-9", 10.0), "n1");
        let r = answer(&fake, "credit", credit("c2", "HQ-9 ", 10.0), "n2");
        assert_eq!(r["duplicate"], true, "{r}");
    }

    #[test]
    fn a_busy_gateway_is_asked_again_and_a_retryable_answer_leaves_the_nonce_usable() {
        let fake = Fake::default();
        *fake.busy_for.borrow_mut() = 2;
        assert_eq!(
            answer(&fake, "credit", credit("c1", "R", 5.0), "n1")["ok"],
            true
        );
        *fake.busy_for.borrow_mut() = 10;
        let msg = signed(credit("c2", "S", 5.0), NOW, "n2");
        let r = at(&fake, &rules(false), NOW, "credit", &msg).result;
        assert_eq!(r["ok"], false);
        assert_eq!(r["retryable"], true);
        *fake.busy_for.borrow_mut() = 0;
        let again = at(&fake, &rules(false), NOW + 5, "credit", &msg).result;
        assert_eq!(again["ok"], true, "{again}");
        assert_eq!(again.get("replayed"), None);
        assert_eq!(
            kv::credited_on(&fake, NOW / 86_400).unwrap(),
            1_000,
            "busy counted nothing"
        );
    }

    #[test]
    fn relay_and_config_go_to_the_meter_as_contract_commands() {
        let fake = Fake::default();
        let r = answer(
            &fake,
            "relay",
            json!({"id": "r1", "meter": "METER001", "relay": "off", "reason": "maintenance"}),
            "n1",
        );
        assert_eq!(r["ok"], true, "{r}");
        let r = answer(
            &fake,
            "config",
            json!({"id": "k1", "meter": "METER001", "config": {"publishIntervalMs": 5000}}),
            "n2",
        );
        assert_eq!(r["ok"], true, "{r}");
        let sent = fake.commands.borrow();
        assert_eq!(sent[0].command, "relay");
        assert_eq!(
            sent[0].payload,
            json!({"relay": "off", "reason": "maintenance"})
        );
        assert_eq!(sent[1].payload, json!({"publishIntervalMs": 5000}));
        drop(sent);
        let unknown = answer(
            &fake,
            "relay",
            json!({"id": "r2", "meter": "NOPE", "relay": "on"}),
            "n3",
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
            let nonce = format!("n-{}", payload["id"].as_str().unwrap());
            let r = at(
                &fake,
                &rules(false),
                NOW,
                cmd,
                &signed(payload.clone(), NOW, &nonce),
            );
            assert_eq!(r.result["ok"], false, "{cmd} {payload}");
            assert!(r.id.is_some());
        }
        let r = at(&fake, &rules(false), NOW, "credit", "{oops");
        assert_eq!(r.id, None);
        assert!(fake.credited.borrow().is_empty() && fake.commands.borrow().is_empty());
    }

    #[test]
    fn nonces_are_kept_only_for_minutes_inside_the_window() {
        let fake = Fake::default();
        for i in 0..30 {
            let now = NOW + i * 60;
            let msg = signed(
                json!({"id": format!("r{i}"), "meter": "METER001", "relay": "on"}),
                now,
                &format!("n{i}"),
            );
            assert!(at(&fake, &rules(false), now, "relay", &msg).ok());
        }
        let minutes = fake
            .kv
            .borrow()
            .keys()
            .filter(|k| k.starts_with("nonce/"))
            .count();
        // 300 s either way: the minutes since now − 300 s, plus the list itself.
        assert!(
            minutes <= 8,
            "{minutes} keys: {:?}",
            fake.kv.borrow().keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_full_minute_of_signed_commands_is_refused_as_retryable() {
        let fake = Fake::default();
        for i in 0..kv::MAX_COMMANDS_PER_MINUTE {
            let msg = signed(
                json!({"id": format!("r{i}"), "meter": "METER001", "relay": "on"}),
                NOW,
                &format!("n{i}"),
            );
            assert!(at(&fake, &rules(false), NOW, "relay", &msg).ok());
        }
        let biggest = fake.kv.borrow().values().map(String::len).max().unwrap();
        assert!(biggest < 64 * 1024, "{biggest} bytes in one key");
        let msg = signed(
            json!({"id": "over", "meter": "METER001", "relay": "on"}),
            NOW,
            "over",
        );
        let r = at(&fake, &rules(false), NOW, "relay", &msg).result;
        assert_eq!(r["retryable"], true, "{r}");
    }
}
