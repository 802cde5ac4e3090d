//! The SDK's payment-source glue and host services, driven by `testing::SourceHarness`: a
//! source's thread credits payments through the host (once per reference, unknown meters
//! refused), the key-value store, commands, a start that fails or panics.

use std::ffi::CStr;
use std::sync::Mutex;
use std::thread::JoinHandle;

use serde::Deserialize;
use serde_json::json;
use umeme_plugin_sdk::testing::SourceHarness;
use umeme_plugin_sdk::{
    abi, export_source, Command, Host, HostError, Payment, PaymentResult, PaymentSource,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Names the test, to hand the `Host` to it (see [`host_of`]).
    test: String,
    #[serde(default)]
    payments: Vec<Payment>,
    /// `start` fails with this reason.
    #[serde(default)]
    fail_start: Option<String>,
    #[serde(default)]
    panic_in_start: bool,
}

/// A cash desk: on `start`, a thread submits the configured payments and writes each outcome
/// to the key-value store as `outcome/{index}`.
struct Teller {
    host: Host,
    payments: Vec<Payment>,
    fail_start: Option<String>,
    panic_in_start: bool,
    thread: Option<JoinHandle<()>>,
}

/// The `Host` each test's source was created with, by test name.
static HOSTS: Mutex<Vec<(String, Host)>> = Mutex::new(Vec::new());

fn host_of(test: &str) -> Host {
    let hosts = HOSTS.lock().unwrap();
    hosts
        .iter()
        .find(|(t, _)| t == test)
        .map(|(_, h)| *h)
        .unwrap()
}

impl PaymentSource for Teller {
    const NAME: &'static CStr = c"teller";
    type Config = Config;

    fn create(config: Config, host: Host) -> Result<Self, String> {
        HOSTS.lock().unwrap().push((config.test, host));
        log::info!("teller with {} payments", config.payments.len());
        Ok(Teller {
            host,
            payments: config.payments,
            fail_start: config.fail_start,
            panic_in_start: config.panic_in_start,
            thread: None,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        if self.panic_in_start {
            panic!("boom in start");
        }
        if let Some(reason) = &self.fail_start {
            return Err(reason.clone());
        }
        let (host, payments) = (self.host, self.payments.clone());
        self.thread = Some(std::thread::spawn(move || {
            for (i, payment) in payments.iter().enumerate() {
                let outcome = match host.submit_payment(payment) {
                    Ok(result) => serde_json::to_string(&result).unwrap(),
                    Err(e) => e.to_string(),
                };
                host.kv_put(&format!("outcome/{i}"), &outcome).unwrap();
            }
        }));
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.host.kv_put("stopped", "yes").unwrap();
    }
}

export_source!(Teller);

fn pay(meter: &str, kes: i64, reference: &str) -> Payment {
    Payment {
        meter: meter.into(),
        amount_cents: kes * 100,
        reference: reference.into(),
        phone: Some("254700000001".into()),
        raw: None,
    }
}

fn teller(config: serde_json::Value) -> SourceHarness<Teller> {
    SourceHarness::new(config, &["METER001", "METER002"]).unwrap()
}

fn outcome(source: &SourceHarness<Teller>, i: usize) -> String {
    source.host().kv.lock().unwrap()[&format!("outcome/{i}")].clone()
}

fn result(source: &SourceHarness<Teller>, i: usize) -> PaymentResult {
    serde_json::from_str(&outcome(source, i)).unwrap()
}

#[test]
fn a_payment_submitted_twice_with_one_reference_is_credited_once() {
    let payments = [
        pay("METER001", 100, "QK1"),
        pay("METER001", 100, "QK1"),
        pay("METER001", 50, "QK2"),
    ];
    let mut source = teller(json!({"test": "credit", "payments": payments}));
    source.start().unwrap();
    source.stop(); // joins the thread

    // The fake host's tariff: 0.05 units per KES, i.e. 0.5 Wh per cent.
    assert_eq!(
        result(&source, 0),
        PaymentResult {
            duplicate: false,
            credit_wh: 5_000,
            balance_wh: 5_000
        }
    );
    assert_eq!(
        result(&source, 1),
        PaymentResult {
            duplicate: true,
            credit_wh: 5_000,
            balance_wh: 5_000
        }
    );
    assert_eq!(
        result(&source, 2),
        PaymentResult {
            duplicate: false,
            credit_wh: 2_500,
            balance_wh: 7_500
        }
    );
    let refs: Vec<_> = source
        .host()
        .payments
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.reference.clone())
        .collect();
    assert_eq!(refs, ["QK1", "QK2"]);
    assert_eq!(source.host().balances_wh.lock().unwrap()["METER001"], 7_500);
    assert_eq!(source.host().kv.lock().unwrap()["stopped"], "yes");
}

#[test]
fn a_payment_for_an_unknown_meter_or_of_no_amount_is_rejected_with_the_reason() {
    let payments = [pay("NOPE", 100, "QK1"), pay("METER002", 0, "QK2")];
    let mut source = teller(json!({"test": "unknown", "payments": payments}));
    source.start().unwrap();
    source.stop();

    assert_eq!(outcome(&source, 0), "rejected: unknown meter NOPE");
    assert_eq!(outcome(&source, 1), "rejected: amount must be positive");
    assert!(source.host().payments.lock().unwrap().is_empty());
}

#[test]
fn validate_account_answers_whether_the_meter_exists() {
    let _source = teller(json!({"test": "validate"}));
    let host = host_of("validate");
    assert_eq!(host.validate_account("METER002"), Ok(true));
    assert_eq!(host.validate_account("METER999"), Ok(false));
}

#[test]
fn commands_for_known_meters_are_queued_and_others_rejected() {
    let source = teller(json!({"test": "command"}));
    let host = host_of("command");
    let relay_off = Command {
        meter: "METER001".into(),
        command: "relay".into(),
        payload: json!({"on": false}),
    };
    host.submit_command(&relay_off).unwrap();
    assert_eq!(
        source.host().commands.lock().unwrap().as_slice(),
        std::slice::from_ref(&relay_off)
    );

    let unknown = Command {
        meter: "NOPE".into(),
        ..relay_off
    };
    assert_eq!(
        host.submit_command(&unknown),
        Err(HostError::Rejected("unknown meter NOPE".into()))
    );
}

#[test]
fn the_key_value_store_puts_gets_and_deletes() {
    let source = teller(json!({"test": "kv"}));
    let host = host_of("kv");
    assert_eq!(host.kv_get("token"), Ok(None));
    host.kv_put("token", "abc").unwrap();
    host.kv_put("token", "def").unwrap();
    assert_eq!(host.kv_get("token"), Ok(Some("def".into())));
    assert_eq!(source.host().kv.lock().unwrap()["token"], "def");
    host.kv_delete("token").unwrap();
    assert_eq!(host.kv_get("token"), Ok(None));
    assert!(matches!(
        host.kv_put("token", ""),
        Err(HostError::Rejected(_))
    ));
    host.kv_delete("never-there").unwrap();
}

#[test]
fn a_start_that_fails_reports_why_and_the_source_is_not_stopped() {
    let mut source = teller(json!({"test": "fail", "fail_start": "port 8090 in use"}));
    assert_eq!(
        source.start(),
        Err(format!(
            "start failed ({}): port 8090 in use",
            abi::BAD_CONFIG
        ))
    );
    source.stop();
    assert!(!source.host().kv.lock().unwrap().contains_key("stopped"));
}

#[test]
fn a_panic_in_start_is_reported_and_poisons_the_instance() {
    let mut source = teller(json!({"test": "panic", "panic_in_start": true}));
    let err = source.start().unwrap_err();
    assert!(
        err.starts_with(&format!(
            "start failed ({}): plugin panicked: boom in start at ",
            abi::PANICKED
        )),
        "{err}"
    );
    let health = source.health();
    assert!(
        !health.ok && health.detail.as_str().unwrap().contains("panicked earlier"),
        "{health:?}"
    );
    assert!(source
        .host()
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|(level, line)| *level == log::Level::Error && line.contains("boom in start")));
}

#[test]
fn log_lines_of_create_reach_the_fake_host() {
    let source = teller(json!({"test": "log", "payments": [pay("METER001", 1, "X")]}));
    assert_eq!(
        *source.host().logs.lock().unwrap(),
        [(log::Level::Info, "teller with 1 payments".to_string())]
    );
}
