//! The SDK's sink glue, driven through the C entry points by `testing::SinkHarness`: every
//! answer crosses the ABI unchanged, panics in each entry point are contained, log lines reach
//! the host of the instance that wrote them.

use std::ffi::CStr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use umeme_plugin_sdk::testing::{event, SinkHarness};
use umeme_plugin_sdk::{abi, export_sink, Delivery, Event, Health, Host, Sink};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Written into every log line, to tell instances apart.
    tag: String,
    /// `create`, `deliver`, `health` or `drop`.
    #[serde(default)]
    panic_in: Option<String>,
    /// `create` refuses the config with this reason.
    #[serde(default)]
    refuse: Option<String>,
}

/// Answers what the first event's `data.answer` asks for.
struct Scripted {
    tag: String,
    panic_in: Option<String>,
}

impl Sink for Scripted {
    const NAME: &'static CStr = c"scripted";
    type Config = Config;

    fn create(config: Config, _host: Host) -> Result<Self, String> {
        if config.panic_in.as_deref() == Some("create") {
            panic!("boom in create");
        }
        if let Some(reason) = config.refuse {
            return Err(reason);
        }
        log::info!("{} created", config.tag);
        Ok(Scripted {
            tag: config.tag,
            panic_in: config.panic_in,
        })
    }

    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        if self.panic_in.as_deref() == Some("deliver") {
            panic!("boom in deliver");
        }
        log::warn!("{} got {} events", self.tag, batch.len());
        log::trace!("{} trace", self.tag);
        let data = &batch[0].data;
        match data["answer"].as_str().unwrap_or("ok") {
            "ok" => Delivery::Delivered,
            "retry" => Delivery::retry("far end down"),
            "retry_after" => Delivery::retry_after(Duration::from_millis(1500), "429"),
            "permanent" => Delivery::Permanent("never".into()),
            "bad_config" => Delivery::BadConfig("token refused".into()),
            "reject" => Delivery::Rejected(vec![(2, "bad meter".into()), (3, "too big".into())]),
            "timeout" => Delivery::Permanent(format!("{}ms", timeout.as_millis())),
            other => panic!("unknown answer {other}"),
        }
    }

    fn health(&mut self) -> Health {
        if self.panic_in.as_deref() == Some("health") {
            panic!("boom in health");
        }
        Health {
            ok: true,
            detail: json!({"tag": self.tag}),
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        if self.panic_in.as_deref() == Some("drop") {
            panic!("boom in drop");
        }
    }
}

export_sink!(Scripted);

fn sink(config: serde_json::Value) -> SinkHarness<Scripted> {
    SinkHarness::new(config).unwrap()
}

fn asking(answer: &str) -> Vec<Event> {
    (1..=3)
        .map(|seq| event(seq, "consumption", "METER001", json!({"answer": answer})))
        .collect()
}

#[test]
fn every_answer_of_deliver_crosses_the_abi_unchanged() {
    let mut s = sink(json!({"tag": "a"}));
    assert_eq!(s.deliver(&asking("ok")), Delivery::Delivered);
    assert_eq!(s.deliver(&asking("retry")), Delivery::retry("far end down"));
    assert_eq!(
        s.deliver(&asking("retry_after")),
        Delivery::retry_after(Duration::from_millis(1500), "429")
    );
    assert_eq!(
        s.deliver(&asking("permanent")),
        Delivery::Permanent("never".into())
    );
    assert_eq!(
        s.deliver(&asking("bad_config")),
        Delivery::BadConfig("token refused".into())
    );
    assert_eq!(
        s.deliver(&asking("reject")),
        Delivery::Rejected(vec![(2, "bad meter".into()), (3, "too big".into())])
    );
    assert_eq!(
        s.deliver_within(&asking("timeout"), Duration::from_millis(1234)),
        Delivery::Permanent("1234ms".into())
    );
    assert_eq!(
        s.health(),
        Health {
            ok: true,
            detail: json!({"tag": "a"})
        }
    );
}

#[test]
fn a_config_the_plugin_cannot_read_or_refuses_is_bad_config_from_create() {
    let err = SinkHarness::<Scripted>::new(json!({"tag": "a", "colour": "red"}))
        .err()
        .unwrap();
    assert!(
        err.starts_with(&format!(
            "create failed ({}): plugin config: unknown field `colour`",
            abi::BAD_CONFIG
        )),
        "{err}"
    );
    let err = SinkHarness::<Scripted>::new(json!({})).err().unwrap();
    assert!(err.contains("missing field `tag`"), "{err}");
    let err = SinkHarness::<Scripted>::new(json!({"tag": "a", "refuse": "url must be http"}))
        .err()
        .unwrap();
    assert_eq!(
        err,
        format!("create failed ({}): url must be http", abi::BAD_CONFIG)
    );
}

#[test]
fn a_panic_in_create_is_reported_with_its_message_and_creates_nothing() {
    let err = SinkHarness::<Scripted>::new(json!({"tag": "a", "panic_in": "create"}))
        .err()
        .unwrap();
    assert!(
        err.starts_with(&format!(
            "create failed ({}): plugin panicked: boom in create at ",
            abi::PANICKED
        )),
        "{err}"
    );
    assert!(err.contains("tests/sink.rs"), "{err}");
}

#[test]
fn a_panic_in_deliver_is_a_retry_and_the_instance_refuses_every_call_after_it() {
    let mut s = sink(json!({"tag": "a", "panic_in": "deliver"}));
    match s.deliver(&asking("ok")) {
        Delivery::Retry {
            after: None,
            reason,
        } => {
            assert!(
                reason.starts_with("panicked: plugin panicked: boom in deliver at "),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let poisoned = "the instance panicked earlier; the host must recreate it";
    assert_eq!(
        s.deliver(&asking("ok")),
        Delivery::retry(format!("panicked: {poisoned}"))
    );
    assert_eq!(
        s.health(),
        Health::failing(format!("health failed ({}): {poisoned}", abi::PANICKED))
    );
    let logs = s.logs();
    assert_eq!(logs[1].0, log::Level::Error, "{logs:?}");
    assert!(
        logs[1].1.starts_with("plugin panicked: boom in deliver"),
        "{logs:?}"
    );
}

#[test]
fn a_panic_in_health_reports_failing_health_and_poisons_the_instance() {
    let mut s = sink(json!({"tag": "a", "panic_in": "health"}));
    let health = s.health();
    assert!(!health.ok);
    let detail = health.detail.as_str().unwrap();
    assert!(
        detail.starts_with(&format!(
            "health failed ({}): plugin panicked: boom in health",
            abi::PANICKED
        )),
        "{detail}"
    );
    match s.deliver(&asking("ok")) {
        Delivery::Retry { reason, .. } => assert!(reason.contains("panicked earlier"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_panic_while_the_instance_is_destroyed_is_contained() {
    let mut s = sink(json!({"tag": "a", "panic_in": "drop"}));
    assert_eq!(s.deliver(&asking("ok")), Delivery::Delivered);
    drop(s); // destroy: the panic in Drop is caught and logged; the process goes on
    let mut other = sink(json!({"tag": "b"}));
    assert_eq!(other.deliver(&asking("ok")), Delivery::Delivered);
}

#[test]
fn log_lines_of_each_call_reach_the_host_of_their_own_instance_with_their_level() {
    let mut a = sink(json!({"tag": "a"}));
    let mut b = sink(json!({"tag": "b"}));
    a.deliver(&asking("ok"));
    b.deliver(&asking("ok"));
    a.deliver(&asking("ok"));
    let expect = |tag: &str, delivers: usize| {
        let mut v = vec![(log::Level::Info, format!("{tag} created"))];
        for _ in 0..delivers {
            v.push((log::Level::Warn, format!("{tag} got 3 events")));
            v.push((log::Level::Trace, format!("{tag} trace")));
        }
        v
    };
    assert_eq!(a.logs(), expect("a", 2));
    assert_eq!(b.logs(), expect("b", 1));
}

#[test]
fn the_declaration_names_the_plugin_its_versions_and_the_abi() {
    let decl = unsafe { &*umeme_plugin_declare() };
    assert_eq!(
        (decl.magic, decl.abi_major, decl.abi_minor),
        (abi::MAGIC, abi::ABI_MAJOR, abi::ABI_MINOR)
    );
    assert_eq!(decl.struct_size as usize, size_of::<abi::Declaration>());
    assert_eq!(decl.kind, abi::KIND_SINK);
    let text = |p| unsafe { CStr::from_ptr(p) }.to_str().unwrap();
    assert_eq!(text(decl.name), "scripted");
    assert_eq!(text(decl.plugin_version), env!("CARGO_PKG_VERSION"));
    assert_eq!(text(decl.sdk_version), env!("CARGO_PKG_VERSION"));
    assert!(
        text(decl.rustc_version).starts_with("rustc 1."),
        "{}",
        text(decl.rustc_version)
    );
    assert!(decl.source.is_null());
    let vtable = unsafe { &*decl.sink };
    assert_eq!(vtable.struct_size as usize, size_of::<abi::SinkVTable>());
}
