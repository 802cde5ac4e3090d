//! The webhook sink driven through its C entry points by the SDK's harness, against a fake
//! receiver on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use umeme_example_sink::Webhook;
use umeme_plugin_sdk::testing::{event, SinkHarness};
use umeme_plugin_sdk::{Delivery, Event, Sink};

/// A request as the receiver saw it.
#[derive(Debug, Clone)]
struct Request {
    idempotency_key: String,
    authorization: Option<String>,
    body: serde_json::Value,
}

/// A webhook receiver that answers each request with `answer(request, how many came before)`,
/// a raw HTTP response.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    fn start(answer: impl Fn(&Request, usize) -> String + Send + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let request = read_request(&mut stream);
                let count = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(request.clone());
                    seen.len() - 1
                };
                let _ = stream.write_all(answer(&request, count).as_bytes());
            }
        });
        Receiver { url, requests }
    }

    fn keys(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.idempotency_key.clone())
            .collect()
    }
}

fn read_request(stream: &mut std::net::TcpStream) -> Request {
    let mut reader = BufReader::new(stream);
    let (mut length, mut key, mut authorization) = (0, String::new(), None);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_string();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap(),
                "idempotency-key" => key = value,
                "authorization" => authorization = Some(value),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    Request {
        idempotency_key: key,
        authorization,
        body: serde_json::from_slice(&body).unwrap(),
    }
}

fn http(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn batch(seqs: std::ops::RangeInclusive<i64>) -> Vec<Event> {
    seqs.map(|seq| event(seq, "payment", "METER001", json!({"amount_cents": 10_000})))
        .collect()
}

fn webhook(url: &str) -> SinkHarness<Webhook> {
    SinkHarness::new(json!({ "url": url, "timeout_ms": 2000 })).unwrap()
}

#[test]
fn each_event_is_posted_with_its_id_as_idempotency_key_and_the_bearer_token() {
    let receiver = Receiver::start(|_, _| http("204 No Content", "", ""));
    let token_file =
        std::env::temp_dir().join(format!("umeme-webhook-token-{}", std::process::id()));
    std::fs::write(&token_file, "s3cret\n").unwrap();
    private(&token_file);
    let mut sink =
        SinkHarness::<Webhook>::new(json!({ "url": receiver.url, "token_file": token_file }))
            .unwrap();
    std::fs::remove_file(&token_file).unwrap();

    assert_eq!(sink.deliver(&batch(1..=3)), Delivery::Delivered);

    let requests = receiver.requests.lock().unwrap().clone();
    let ids: Vec<_> = batch(1..=3).into_iter().map(|e| e.id).collect();
    assert_eq!(receiver.keys(), ids);
    assert_eq!(requests[0].body["seq"], 1);
    assert_eq!(requests[0].body["id"], ids[0].as_str());
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Bearer s3cret")));
    assert!(sink.health().ok);
    assert!(sink
        .logs()
        .iter()
        .any(|(level, line)| *level == log::Level::Info && line.contains("delivered 3 events")));
}

#[test]
fn a_busy_receiver_is_retried_after_its_retry_after_and_delivered_events_are_not_resent() {
    // The third event is refused once with 503 and Retry-After: 7.
    let receiver = Receiver::start(|_, count| match count {
        2 => http(
            "503 Service Unavailable",
            "Retry-After: 7\r\n",
            "maintenance",
        ),
        _ => http("200 OK", "", "{}"),
    });
    let mut sink = webhook(&receiver.url);

    let first = sink.deliver(&batch(1..=4));
    let Delivery::Retry { after, reason } = first else {
        panic!("expected a retry, got {first:?}")
    };
    assert_eq!(after, Some(Duration::from_secs(7)));
    assert!(
        reason.contains("503") && reason.contains("maintenance"),
        "{reason}"
    );
    assert!(!sink.health().ok);

    // The gateway sends the whole batch again: events 1 and 2 are not posted twice.
    assert_eq!(sink.deliver(&batch(1..=4)), Delivery::Delivered);
    let ids: Vec<_> = batch(1..=4).into_iter().map(|e| e.id).collect();
    assert_eq!(
        receiver.keys(),
        [&*ids[0], &ids[1], &ids[2], &ids[2], &ids[3]]
    );
    assert!(sink.health().ok);
}

#[test]
fn an_unreachable_receiver_is_retried() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut sink = webhook(&format!("http://{closed}/events"));

    match sink.deliver(&batch(1..=1)) {
        Delivery::Retry {
            after: None,
            reason,
        } => assert!(reason.contains(&closed.to_string()), "{reason}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let health = sink.health();
    assert!(!health.ok);
    assert!(health.detail["last_error"]
        .as_str()
        .unwrap()
        .contains(&closed.to_string()));
}

#[test]
fn an_event_the_receiver_refuses_is_rejected_and_the_others_delivered() {
    let receiver = Receiver::start(|request, _| match request.body["seq"].as_i64() {
        Some(2) => http("422 Unprocessable Entity", "", "unknown meter"),
        _ => http("201 Created", "", ""),
    });
    let mut sink = webhook(&receiver.url);

    assert_eq!(
        sink.deliver(&batch(1..=3)),
        Delivery::Rejected(vec![(2, "HTTP 422: unknown meter".into())])
    );
    assert_eq!(receiver.keys().len(), 3);
}

#[test]
fn a_duplicate_the_receiver_already_has_counts_as_delivered() {
    let receiver = Receiver::start(|_, _| http("409 Conflict", "", "seen it"));
    let mut sink = webhook(&receiver.url);
    assert_eq!(sink.deliver(&batch(1..=2)), Delivery::Delivered);
}

#[test]
fn a_refused_token_is_bad_config_and_a_wrong_path_is_permanent() {
    let receiver = Receiver::start(|_, _| http("401 Unauthorized", "", "bad token"));
    let mut sink = webhook(&receiver.url);
    assert_eq!(
        sink.deliver(&batch(1..=2)),
        Delivery::BadConfig("HTTP 401: bad token".into())
    );
    assert!(!sink.health().ok);

    let receiver = Receiver::start(|_, _| http("404 Not Found", "", "no such path"));
    let mut sink = webhook(&receiver.url);
    assert_eq!(
        sink.deliver(&batch(1..=2)),
        Delivery::Permanent("unexpected HTTP 404: no such path".into())
    );
    assert_eq!(
        receiver.keys().len(),
        1,
        "the batch stops at the first permanent failure"
    );
}

#[test]
fn a_bad_config_is_refused_by_create_with_the_reason() {
    let refused = |config| match SinkHarness::<Webhook>::new(config) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    assert!(refused(json!({"url": "https://example.org/x"})).contains("only http://"));
    assert!(refused(json!({"url": "http://h/", "retries": 3})).contains("unknown field `retries`"));
    assert!(refused(json!({"url": "http://h/", "timeout_ms": 10})).contains("timeout_ms must be"));
    assert!(
        refused(json!({"url": "http://h/", "token_file": "/nonexistent/token"}))
            .contains("/nonexistent/token")
    );
    assert!(refused(json!({})).contains("missing field `url`"));
}

/// A bug in a sink: it panics on a kind of event it did not expect.
struct Buggy(Webhook);

impl Sink for Buggy {
    const NAME: &'static std::ffi::CStr = c"buggy-webhook";
    type Config = <Webhook as Sink>::Config;

    fn create(config: Self::Config, host: umeme_plugin_sdk::Host) -> Result<Self, String> {
        Webhook::create(config, host).map(Buggy)
    }

    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        if batch.iter().any(|e| e.kind == "alert") {
            panic!("unexpected alert {}", batch[0].id);
        }
        self.0.deliver(batch, timeout)
    }
}

#[test]
fn a_panic_in_deliver_is_a_retry_and_the_poisoned_instance_refuses_further_calls() {
    let receiver = Receiver::start(|_, _| http("200 OK", "", ""));
    let mut sink = SinkHarness::<Buggy>::new(json!({ "url": receiver.url })).unwrap();
    let alert = [event(9, "alert", "METER001", json!({"low_balance": true}))];

    match sink.deliver(&alert) {
        Delivery::Retry {
            after: None,
            reason,
        } => {
            assert!(
                reason.starts_with(
                    "panicked: plugin panicked: unexpected alert test-site-000000000009"
                ),
                "{reason}"
            );
            assert!(
                reason.contains("tests/webhook.rs"),
                "the message says where: {reason}"
            );
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(sink
        .logs()
        .iter()
        .any(|(level, line)| *level == log::Level::Error && line.contains("unexpected alert")));

    // Until the gateway recreates it, the instance answers every call with a panic status.
    match sink.deliver(&batch(1..=1)) {
        Delivery::Retry { reason, .. } => assert!(reason.contains("panicked earlier"), "{reason}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let health = sink.health();
    assert!(
        !health.ok && health.detail.as_str().unwrap().contains("panicked earlier"),
        "{health:?}"
    );
    assert!(receiver.keys().is_empty());

    // What the gateway does: a new instance, the same batch.
    let mut sink = SinkHarness::<Buggy>::new(json!({ "url": receiver.url })).unwrap();
    assert_eq!(sink.deliver(&batch(1..=1)), Delivery::Delivered);
}

/// Secret files are read only at mode 0600 (`umeme_plugin_sdk::read_secret_file`).
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
