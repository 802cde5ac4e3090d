//! Cloud commands as `sink-mqtt` receives them from the site's uplink broker: any payload on
//! `…/command/{credit,relay,config,…}` is answered, never a panic, and
//! - with the signing key required, nothing the fuzzer makes (it cannot sign) credits or
//!   reaches a meter;
//! - with unsigned commands allowed, no credit passes the per-command cap and the day's credits
//!   stay under the daily cap;
//! - a result topic's id is bounded.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use umeme_plugin_sdk::{Command, HostError, Payment, PaymentResult};
use umeme_sink_mqtt::command::{run, Context, Downlink};
use umeme_sink_mqtt::config::CommandRules;

const PER_COMMAND: i64 = 1_000_000;
const PER_DAY: i64 = 5_000_000;

#[derive(Default)]
struct Fake {
    credited: RefCell<Vec<Payment>>,
    commands: RefCell<usize>,
    kv: RefCell<BTreeMap<String, String>>,
}

impl Downlink for Fake {
    fn credit(&self, p: &Payment) -> Result<PaymentResult, HostError> {
        let mut done = self.credited.borrow_mut();
        let duplicate = done.iter().any(|q| q.reference == p.reference);
        if !duplicate {
            done.push(p.clone());
        }
        Ok(PaymentResult {
            duplicate,
            credit_wh: p.amount_cents / 2,
            balance_wh: p.amount_cents / 2,
        })
    }
    fn command(&self, _: &Command) -> Result<(), HostError> {
        *self.commands.borrow_mut() += 1;
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

/// Whether `payload` is the signed envelope `{"payload": "...", "sig": "<hex HMAC>"}` with a
/// signature that verifies under the site key (the corpus holds a few; the fuzzer cannot make
/// new ones).
fn validly_signed(payload: &[u8], rules: &CommandRules) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    let (Some(inner), Some(sig)) = (v["payload"].as_str(), v["sig"].as_str()) else {
        return false;
    };
    let Some(sig) = (0..sig.len())
        .step_by(2)
        .map(|i| {
            sig.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = rules.key.as_ref().expect("the target sets a key");
    ring::hmac::verify(key, inner.as_bytes(), &sig).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let command = ["credit", "relay", "config", "other", ""][usize::from(selector % 5)];
    let allow_unsigned = selector & 0x80 != 0;
    let rules = CommandRules {
        key: Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7u8; 32])),
        allow_unsigned,
        window: Duration::from_secs(300),
        max_credit_cents_per_command: PER_COMMAND,
        max_credit_cents_per_day: PER_DAY,
    };
    let cx = Context {
        rules: &rules,
        now: 1_764_230_400,
        busy_pauses: &[],
    };
    let fake = Fake::default();
    // The same payload twice: a replay must not credit twice.
    for _ in 0..2 {
        let answer = run(command, payload, &fake, &cx);
        assert!(answer.result.is_object());
        if let Some(id) = &answer.id {
            assert!(id.chars().count() <= 64, "unbounded result id");
        }
    }
    let credited = fake.credited.borrow();
    if !allow_unsigned && !validly_signed(payload, &rules) {
        assert!(credited.is_empty(), "an unsigned command credited");
        assert_eq!(
            *fake.commands.borrow(),
            0,
            "an unsigned command reached a meter"
        );
    }
    assert!(credited.len() <= 1, "one payload credited twice");
    for p in credited.iter() {
        assert!(
            p.amount_cents > 0 && p.amount_cents <= PER_COMMAND,
            "over the cap: {p:?}"
        );
    }
    assert!(credited.iter().map(|p| p.amount_cents).sum::<i64>() <= PER_DAY);
});
