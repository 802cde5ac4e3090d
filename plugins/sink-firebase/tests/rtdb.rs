//! The sink against a local fake Realtime Database and token endpoint (tests/fake_rtdb), driven
//! through its C entry points by the SDK's harness, as the gateway drives it.

mod fake_rtdb;
mod test_key;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use fake_rtdb::{FakeRtdb, Fault, State};
use serde_json::{json, Value};
use umeme_plugin_sdk::testing::{event, SinkHarness};
use umeme_plugin_sdk::{Delivery, Event};
use umeme_sink_firebase::Firebase;

const EMAIL: &str = "umeme-gateway@test-project.iam.gserviceaccount.com";

/// A throwaway RSA key made with openssl for this test run (never used outside tests):
/// the PKCS#8 PEM the service-account file carries and the PKCS#1 DER public key the fake
/// token endpoint verifies with.
struct TestKey {
    _dir: tempfile::TempDir,
    pem: String,
    public_der: Vec<u8>,
}

fn make_key() -> TestKey {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = test_key::generate(dir.path());
    TestKey {
        pem: std::fs::read_to_string(&pem).unwrap(),
        public_der: std::fs::read(&der).unwrap(),
        _dir: dir,
    }
}

fn key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(make_key)
}

/// A second key, for a service account the token endpoint does not know.
fn other_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(make_key)
}

fn service_account_file(dir: &Path, fake: &FakeRtdb, key: &TestKey) -> PathBuf {
    let path = dir.join("firebase.json");
    let sa = json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-key-1",
        "private_key": key.pem,
        "client_email": EMAIL,
        "client_id": "1",
        "token_uri": format!("{}/token", fake.url()),
    });
    std::fs::write(&path, sa.to_string()).unwrap();
    private(&path);
    path
}

/// The dashboard's own data before the gateway writes: Alice's account linked to METER001.
fn seeded() -> Value {
    json!({
        "users": {"uid-alice": {"name": "Alice", "meter_no": "METER001", "balance": 0}},
        "meters": {"METER001": {"user_id": "uid-alice"}},
    })
}

/// The `.indexOn` rules the plugin README asks for (`users`/`meter_no`), and the ones the
/// original backend's queries use (`user_id`, `mpesa_receipt`), so replayed reads work too.
fn indexes() -> Vec<(String, String)> {
    [
        ("users", "meter_no"),
        ("transactions", "user_id"),
        ("transactions", "mpesa_receipt"),
        ("unit_consumption", "user_id"),
    ]
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .to_vec()
}

fn fake_with(tree: Value, indexes: Vec<(String, String)>) -> FakeRtdb {
    FakeRtdb::start(State {
        tree,
        public_key: Some(key().public_der.clone()),
        client_email: EMAIL.into(),
        secret: Some("legacy-secret".into()),
        indexes,
        ..State::default()
    })
}

fn fake() -> FakeRtdb {
    fake_with(seeded(), indexes())
}

struct Setup {
    fake: FakeRtdb,
    sink: SinkHarness<Firebase>,
    _dir: tempfile::TempDir,
}

fn with_service_account(fake: FakeRtdb) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sa = service_account_file(dir.path(), &fake, key());
    let sink = SinkHarness::<Firebase>::new(json!({
        "database_url": fake.url(),
        "service_account_file": sa,
    }))
    .unwrap();
    Setup {
        fake,
        sink,
        _dir: dir,
    }
}

fn payment(seq: i64, meter: &str, reference: &str, kes: i64, balance_wh: i64) -> Event {
    let credit_wh = kes * 50;
    event(
        seq,
        "payment",
        meter,
        json!({"source": "mpesa", "reference": reference, "amount": kes as f64,
               "amountCents": kes * 100, "creditWh": credit_wh, "units": credit_wh as f64 / 1000.0,
               "balanceWh": balance_wh, "balance": balance_wh as f64 / 1000.0}),
    )
}

fn consumption(seq: i64, meter: &str, debit_wh: i64, balance_wh: i64, total_wh: i64) -> Event {
    event(
        seq,
        "consumption",
        meter,
        json!({"v": 2, "seq": seq, "energyWh": total_wh, "debitWh": debit_wh,
               "unitsDebited": debit_wh as f64 / 1000.0, "balanceWh": balance_wh,
               "balance": balance_wh as f64 / 1000.0, "totalConsumedWh": total_wh,
               "outcome": "applied"}),
    )
}

fn status(seq: i64, meter: &str, status: &str) -> Event {
    event(
        seq,
        "status",
        meter,
        json!({"status": status, "message": "relay on", "report": {}}),
    )
}

/// Payments, consumption, status, the meter's own balance view, an alert and a meter change,
/// for a linked meter (METER001) and an unlinked one (METER002).
fn day_of_events() -> Vec<Event> {
    vec![
        payment(1, "METER001", "QGH1ABC", 100, 5000),
        consumption(2, "METER001", 1200, 3800, 1200),
        status(3, "METER001", "online"),
        payment(4, "METER002", "QGH2DEF", 50, 2500),
        consumption(5, "METER002", 500, 2000, 500),
        event(
            6,
            "balance",
            "METER001",
            json!({"meterNo": "METER001", "balance": 3.8}),
        ),
        event(
            7,
            "alert",
            "METER002",
            json!({"alert": "low_balance", "balanceWh": 2000, "balance": 2.0, "relay": "on"}),
        ),
        event(
            8,
            "meter",
            "METER003",
            json!({"action": "added", "name": "Flat 3", "phone": null}),
        ),
        consumption(9, "METER001", 300, 3500, 1500),
    ]
}

fn at(seq: i64) -> i64 {
    1_764_230_400_000 + seq
}

fn iso(seq: i64) -> String {
    umeme_plugin_sdk::iso8601_utc(at(seq))
}

/// The tree the original dashboard reads after `day_of_events`.
fn expected_tree() -> Value {
    json!({
        "users": {"uid-alice": {
            "name": "Alice", "meter_no": "METER001",
            "balance": 3.5,
            "latest_transaction_id": "test-site-000000000001",
            "last_payment_timestamp": iso(1),
            "last_payment_amount": 100.0,
            "last_units_purchased": 5.0,
        }},
        "meters": {
            "METER001": {
                "user_id": "uid-alice",
                "balance": 3.5,
                "total_consumed": 1.5,
                "last_seen": at(9),
                "last_update": at(9),
                "online": true,
                "relay": "on",
                "status": {"status": "online", "message": "relay on", "last_seen": at(3)},
            },
            "METER002": {
                "balance": 2.0,
                "total_consumed": 0.5,
                "last_seen": at(5),
                "last_update": at(5),
                "online": true,
                "last_alert": {"alert": "low_balance", "balance": 2.0, "relay": "on",
                               "timestamp": at(7), "event_id": "test-site-000000000007"},
            },
        },
        "transactions": {
            "test-site-000000000001": {
                "transaction_id": "test-site-000000000001", "meter_no": "METER001",
                "user_id": "uid-alice", "amount": 100.0, "units": 5.0, "balance_after": 5.0,
                "status": "SUCCESS", "timestamp": iso(1), "reference": "QGH1ABC",
                "source": "mpesa", "gateway": "test-site", "seq": 1,
            },
            "test-site-000000000004": {
                "transaction_id": "test-site-000000000004", "meter_no": "METER002",
                "amount": 50.0, "units": 2.5, "balance_after": 2.5,
                "status": "SUCCESS", "timestamp": iso(4), "reference": "QGH2DEF",
                "source": "mpesa", "gateway": "test-site", "seq": 4,
            },
        },
        "unit_consumption": {
            "test-site-000000000002": {
                "meter_no": "METER001", "user_id": "uid-alice", "units_consumed": 1.2,
                "units_after": 3.8, "total_consumed": 1.2, "timestamp": at(2), "date": iso(2),
                "source": "gateway", "gateway": "test-site", "seq": 2,
            },
            "test-site-000000000005": {
                "meter_no": "METER002", "units_consumed": 0.5,
                "units_after": 2.0, "total_consumed": 0.5, "timestamp": at(5), "date": iso(5),
                "source": "gateway", "gateway": "test-site", "seq": 5,
            },
            "test-site-000000000009": {
                "meter_no": "METER001", "user_id": "uid-alice", "units_consumed": 0.3,
                "units_after": 3.5, "total_consumed": 1.5, "timestamp": at(9), "date": iso(9),
                "source": "gateway", "gateway": "test-site", "seq": 9,
            },
        },
    })
}

fn db_requests(fake: &FakeRtdb, method: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == method && r.path != "/token")
        .count()
}

/// Delivers until the sink says delivered (bounded), as the gateway's retries would.
fn deliver_until_done(sink: &mut SinkHarness<Firebase>, batch: &[Event]) -> usize {
    for attempt in 1..=10 {
        match sink.deliver_within(batch, Duration::from_secs(2)) {
            Delivery::Delivered => return attempt,
            Delivery::Retry { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("still not delivered after 10 attempts");
}

#[test]
fn a_batch_lands_in_the_layout_the_dashboard_reads_with_one_patch() {
    let mut s = with_service_account(fake());
    assert_eq!(s.sink.deliver(&day_of_events()), Delivery::Delivered);
    assert_eq!(s.fake.tree(), expected_tree());

    let reqs = s.fake.requests();
    let summary: Vec<(String, String)> = reqs
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("POST", "/token"),
            ("GET", "/meters/METER001/user_id.json"),
            ("GET", "/meters/METER002/user_id.json"),
            ("GET", "/users.json"),
            ("PATCH", "/.json"),
        ]
        .map(|(m, p)| (m.to_string(), p.to_string())),
        "one token, one GET per meter's user link, a query by meter_no for the unlinked \
         meter, one PATCH"
    );
    assert_eq!(
        reqs[3].query,
        "orderBy=%22meter_no%22&equalTo=%22METER002%22"
    );
    assert_eq!(reqs[4].query, "print=silent");
    assert!(reqs.iter().all(|r| r.status == 200 || r.status == 204));
    assert!(s.sink.health().ok);
}

#[test]
fn the_next_batch_costs_one_request_with_the_cached_token_and_user_links() {
    let mut s = with_service_account(fake());
    assert_eq!(s.sink.deliver(&day_of_events()), Delivery::Delivered);
    let before = s.fake.requests().len();
    let next = [
        consumption(10, "METER001", 500, 3000, 2000),
        consumption(11, "METER002", 100, 1900, 600),
    ];
    assert_eq!(s.sink.deliver(&next), Delivery::Delivered);
    let reqs = s.fake.requests();
    assert_eq!(reqs.len() - before, 1, "{:?}", &reqs[before..]);
    assert_eq!(reqs[before].method, "PATCH");
    let tree = s.fake.tree();
    assert_eq!(tree["users"]["uid-alice"]["balance"], json!(3.0));
    assert_eq!(tree["meters"]["METER002"]["balance"], json!(1.9));
}

#[test]
fn redelivering_a_batch_changes_nothing_and_never_posts() {
    let mut s = with_service_account(fake());
    let batch = day_of_events();
    assert_eq!(s.sink.deliver(&batch), Delivery::Delivered);
    assert_eq!(s.sink.deliver(&batch), Delivery::Delivered);
    assert_eq!(s.sink.deliver(&batch[3..]), Delivery::Delivered);
    assert_eq!(s.fake.tree(), expected_tree());
    assert_eq!(db_requests(&s.fake, "POST"), 0);
    assert_eq!(db_requests(&s.fake, "PUT"), 0);
}

#[test]
fn the_legacy_database_secret_authenticates_with_the_auth_parameter() {
    let fake = fake();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "legacy-secret\n").unwrap();
    private(&secret);
    let mut sink = SinkHarness::<Firebase>::new(json!({
        "database_url": format!("{}/", fake.url()),
        "database_secret_file": secret,
    }))
    .unwrap();
    assert_eq!(sink.deliver(&day_of_events()), Delivery::Delivered);
    assert_eq!(fake.tree(), expected_tree());
    let reqs = fake.requests();
    assert!(reqs.iter().all(|r| r.path != "/token"));
    assert!(reqs.iter().all(|r| r.query.contains("auth=legacy-secret")));
}

#[test]
fn after_503s_timeouts_and_dropped_connections_the_tree_is_complete_without_duplicates() {
    let mut s = with_service_account(fake());
    let events = day_of_events();
    // A first, clean batch so the token and both meters' user links are cached: every
    // fault below hits the PATCH.
    assert_eq!(s.sink.deliver(&events[..4]), Delivery::Delivered);

    s.fake.fault(Fault::Status(503, Some(7)));
    match s.sink.deliver(&events[4..7]) {
        Delivery::Retry { after, reason } => {
            assert_eq!(
                after,
                Some(Duration::from_secs(7)),
                "Retry-After is honoured"
            );
            assert!(reason.contains("503"), "{reason}");
        }
        other => panic!("503 must be retryable, got {other:?}"),
    }
    assert!(!s.sink.health().ok, "health shows the outage");

    s.fake.fault(Fault::Hang);
    match s
        .sink
        .deliver_within(&events[4..7], Duration::from_millis(800))
    {
        Delivery::Retry { reason, .. } => assert!(reason.contains("no answer"), "{reason}"),
        other => panic!("a timeout must be retryable, got {other:?}"),
    }

    s.fake.fault(Fault::Drop);
    assert!(matches!(
        s.sink.deliver(&events[4..7]),
        Delivery::Retry { .. }
    ));

    // The write lands but the answer is lost: the retry writes the same keys again.
    s.fake.fault(Fault::DropAfterWrite);
    assert!(matches!(
        s.sink.deliver(&events[4..7]),
        Delivery::Retry { .. }
    ));
    assert_eq!(deliver_until_done(&mut s.sink, &events[4..7]), 1);

    for f in [
        Fault::Status(500, None),
        Fault::Status(429, None),
        Fault::Status(412, None),
    ] {
        s.fake.fault(f);
    }
    assert_eq!(deliver_until_done(&mut s.sink, &events[7..]), 4);
    assert!(s.sink.health().ok, "health recovers");

    assert_eq!(s.fake.tree(), expected_tree());
    assert_eq!(db_requests(&s.fake, "POST"), 0);
}

#[test]
fn a_token_revoked_mid_run_is_replaced_within_the_same_delivery() {
    let mut s = with_service_account(fake());
    let events = day_of_events();
    assert_eq!(s.sink.deliver(&events[..4]), Delivery::Delivered);
    s.fake.fault(Fault::RevokeTokens);
    assert_eq!(s.sink.deliver(&events[4..]), Delivery::Delivered);
    assert_eq!(s.fake.state().tokens_issued, 2);
    assert_eq!(s.fake.tree(), expected_tree());
}

#[test]
fn a_token_endpoint_outage_is_retryable() {
    let s = with_service_account(fake());
    let mut sink = s.sink;
    s.fake
        .state()
        .token_faults
        .push_back(Fault::Status(503, None));
    s.fake.state().token_faults.push_back(Fault::Drop);
    for _ in 0..2 {
        match sink.deliver(&day_of_events()) {
            Delivery::Retry { reason, .. } => assert!(reason.contains("token"), "{reason}"),
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    assert_eq!(sink.deliver(&day_of_events()), Delivery::Delivered);
    assert_eq!(s.fake.tree(), expected_tree());
}

#[test]
fn a_service_account_the_token_endpoint_refuses_is_bad_config_and_health_says_so() {
    let fake = fake();
    let dir = tempfile::tempdir().unwrap();
    let sa = service_account_file(dir.path(), &fake, other_key());
    let mut sink = SinkHarness::<Firebase>::new(json!({
        "database_url": fake.url(), "service_account_file": sa,
    }))
    .unwrap();
    match sink.deliver(&day_of_events()) {
        Delivery::BadConfig(e) => {
            assert!(e.contains("refused the service account"), "{e}");
            assert!(e.contains("Invalid JWT Signature"), "{e}");
        }
        other => panic!("expected bad config, got {other:?}"),
    }
    let health = sink.health();
    assert!(!health.ok);
    assert!(
        health.detail.as_str().unwrap().contains("bad credentials"),
        "{health:?}"
    );
    assert_eq!(fake.tree(), seeded(), "nothing written");
}

#[test]
fn a_wrong_database_secret_is_bad_config() {
    let fake = fake();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "not-the-secret").unwrap();
    private(&secret);
    let mut sink = SinkHarness::<Firebase>::new(json!({
        "database_url": fake.url(), "database_secret_file": secret,
    }))
    .unwrap();
    match sink.deliver(&day_of_events()) {
        Delivery::BadConfig(e) => assert!(e.contains("(401): Permission denied"), "{e}"),
        other => panic!("expected bad config, got {other:?}"),
    }
    assert!(!sink.health().ok);
}

#[test]
fn an_event_the_database_refuses_is_rejected_alone_and_the_rest_are_written() {
    let mut s = with_service_account(fake());
    s.fake.state().refuse_marker = Some("QGH2DEF".into());
    let events = day_of_events();
    assert_eq!(
        s.sink.deliver(&events),
        Delivery::Rejected(vec![(
            4,
            "Invalid data; couldn't parse JSON object.".into()
        )])
    );
    let mut expected = expected_tree();
    expected["transactions"]
        .as_object_mut()
        .unwrap()
        .remove("test-site-000000000004");
    assert_eq!(s.fake.tree(), expected);
    let patches = db_requests(&s.fake, "PATCH");
    assert!(
        patches <= 9,
        "narrowing costs at most 2n-1 PATCHes, got {patches}"
    );
}

#[test]
fn events_with_keys_the_database_cannot_hold_are_rejected_before_sending() {
    let mut s = with_service_account(fake());
    let mut batch = day_of_events();
    batch.push(consumption(10, "MET.ER9", 1, 1, 1));
    batch.push(event(11, "payment", "METER001", json!("not an object")));
    match s.sink.deliver(&batch) {
        Delivery::Rejected(r) => {
            let seqs: Vec<i64> = r.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, [10, 11], "{r:?}");
            assert!(r[0].1.contains("'.'"), "{r:?}");
        }
        other => panic!("expected rejected events, got {other:?}"),
    }
    assert_eq!(s.fake.tree(), expected_tree());
    assert_eq!(db_requests(&s.fake, "PATCH"), 1);
}

#[test]
fn an_access_token_is_renewed_before_it_expires() {
    let fake = FakeRtdb::start(State {
        tree: seeded(),
        public_key: Some(key().public_der.clone()),
        client_email: EMAIL.into(),
        token_lifetime_secs: 1,
        indexes: indexes(),
        ..State::default()
    });
    let mut s = with_service_account(fake);
    let events = day_of_events();
    assert_eq!(s.sink.deliver(&events[..3]), Delivery::Delivered);
    // A 1 s token is renewed at half its life; nothing to await but the clock.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(s.sink.deliver(&events[3..]), Delivery::Delivered);
    let st = s.fake.state();
    assert_eq!(st.tokens_issued, 2);
    assert!(st.requests.iter().all(|r| r.status != 401), "never refused");
}

#[test]
fn bad_configuration_is_refused_at_create() {
    let fake = fake();
    let dir = tempfile::tempdir().unwrap();
    let sa = service_account_file(dir.path(), &fake, key());
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    private(&secret);
    let not_sa = dir.path().join("not-sa.json");
    std::fs::write(&not_sa, r#"{"type":"authorized_user"}"#).unwrap();
    private(&not_sa);
    let cases = [
        (json!({"database_url": fake.url()}), "exactly one"),
        (
            json!({"database_url": fake.url(), "service_account_file": sa, "database_secret_file": secret}),
            "exactly one",
        ),
        (
            json!({"database_url": "ftp://x", "database_secret_file": secret}),
            "https://",
        ),
        (
            json!({"database_url": fake.url(), "database_secret_file": dir.path().join("missing")}),
            "missing",
        ),
        (
            json!({"database_url": fake.url(), "service_account_file": not_sa}),
            "service-account",
        ),
        (
            json!({"database_url": fake.url(), "database_secret_file": secret, "secret": "inline"}),
            "unknown field",
        ),
    ];
    for (config, needle) in cases {
        match SinkHarness::<Firebase>::new(config.clone()) {
            Err(e) => assert!(e.contains(needle), "{config}: {e}"),
            Ok(_) => panic!("{config} was accepted"),
        }
    }
}

/// The original tree for a tenant the dashboard registered (`POST /users` pushes
/// `users/{pushId}` with `meter_no` and `phone_number`): no `meters/{m}/user_id` link at all.
fn dashboard_registered() -> Value {
    json!({
        "users": {"-Nbob000000000001": {
            "name": "Bob", "email": "bob@example.com", "meter_no": "METER002",
            "phone_number": "254712345678", "balance": 0,
            "created_at": "2025-11-01T08:00:00.000Z", "latest_transaction_id": null,
        }},
    })
}

/// A GET on the fake with the legacy secret, as a reader of the database would make it.
fn read(fake: &FakeRtdb, path_and_query: &str) -> Value {
    use std::io::{Read, Write};
    let sep = if path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    let mut conn = std::net::TcpStream::connect(fake.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        conn,
        "GET {path_and_query}{sep}auth=legacy-secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    serde_json::from_str(body).unwrap()
}

#[test]
fn a_tenant_the_dashboard_registered_by_meter_no_gets_the_balance_and_linked_records() {
    let mut s = with_service_account(fake_with(dashboard_registered(), indexes()));
    let batch = [
        payment(1, "METER002", "QGH2DEF3GH", 100, 5000),
        consumption(2, "METER002", 1200, 3800, 1200),
    ];
    assert_eq!(s.sink.deliver(&batch), Delivery::Delivered);
    let bob = "-Nbob000000000001";

    // The dashboard's own read: `users/{uid}/balance` (useRealtimeBalance).
    assert_eq!(
        read(&s.fake, &format!("/users/{bob}/balance.json")),
        json!(3.8)
    );
    // The original backend's reads behind the dashboard's transaction list and chart.
    let q = |child: &str, v: &str| format!("?orderBy=%22{child}%22&equalTo=%22{v}%22");
    let txs = read(&s.fake, &format!("/transactions.json{}", q("user_id", bob)));
    assert_eq!(
        txs,
        json!({"test-site-000000000001": {
            "transaction_id": "test-site-000000000001", "meter_no": "METER002",
            "user_id": bob, "amount": 100.0, "units": 5.0, "balance_after": 5.0,
            "status": "SUCCESS", "timestamp": iso(1), "reference": "QGH2DEF3GH",
            "mpesa_receipt": "QGH2DEF3GH", "phone_number": "254712345678",
            "source": "mpesa", "gateway": "test-site", "seq": 1,
        }})
    );
    // The original duplicate check finds the receipt.
    let dup = read(
        &s.fake,
        &format!("/transactions.json{}", q("mpesa_receipt", "QGH2DEF3GH")),
    );
    assert_eq!(dup.as_object().unwrap().len(), 1);
    let used = read(
        &s.fake,
        &format!("/unit_consumption.json{}", q("user_id", bob)),
    );
    assert_eq!(used["test-site-000000000002"]["units_consumed"], json!(1.2));
    // The link is the dashboard's to write: the sink adds none.
    assert_eq!(s.fake.tree()["meters"]["METER002"].get("user_id"), None);
    assert_eq!(s.fake.tree()["users"][bob]["name"], json!("Bob"));
}

#[test]
fn without_the_meter_no_index_the_batch_is_held_and_the_error_names_the_rule_to_add() {
    let mut s = with_service_account(fake_with(dashboard_registered(), Vec::new()));
    let before = s.fake.tree();
    let batch = [payment(1, "METER002", "QGH2DEF3GH", 100, 5000)];
    match s.sink.deliver(&batch) {
        Delivery::BadConfig(e) => assert!(
            e.contains(r#""users": {".indexOn": ["meter_no"]}"#) && e.contains("Index not defined"),
            "{e}"
        ),
        other => panic!("expected BadConfig, got {other:?}"),
    }
    assert_eq!(s.fake.tree(), before, "nothing written unlinked");
    assert!(!s.sink.health().ok);
    assert!(
        s.sink
            .logs()
            .iter()
            .any(|(l, m)| *l == log::Level::Error && m.contains(".indexOn")),
        "{:?}",
        s.sink.logs()
    );

    // The operator adds the rule; the held batch goes through, linked.
    s.fake.state().indexes = indexes();
    assert_eq!(s.sink.deliver(&batch), Delivery::Delivered);
    assert_eq!(
        s.fake.tree()["transactions"]["test-site-000000000001"]["user_id"],
        json!("-Nbob000000000001")
    );
    assert!(s.sink.health().ok);
}

#[test]
fn a_tenant_registered_after_the_meter_was_first_seen_is_found_on_a_later_batch() {
    let fake = fake_with(
        json!({"users": {"uid-x": {"meter_no": "OTHER"}}}),
        indexes(),
    );
    let dir = tempfile::tempdir().unwrap();
    let sa = service_account_file(dir.path(), &fake, key());
    let mut sink = SinkHarness::<Firebase>::new(json!({
        "database_url": fake.url(),
        "service_account_file": sa,
        "user_miss_secs": 0,
    }))
    .unwrap();
    assert_eq!(
        sink.deliver(&[consumption(1, "METER002", 100, 900, 100)]),
        Delivery::Delivered
    );
    assert_eq!(
        fake.tree()["unit_consumption"]["test-site-000000000001"].get("user_id"),
        None
    );
    // The tenant registers through the dashboard.
    fake.state().tree["users"]["-Ncarol0000000001"] =
        json!({"name": "Carol", "meter_no": "METER002", "balance": 0});
    assert_eq!(
        sink.deliver(&[consumption(2, "METER002", 100, 800, 200)]),
        Delivery::Delivered
    );
    let tree = fake.tree();
    assert_eq!(tree["users"]["-Ncarol0000000001"]["balance"], json!(0.8));
    assert_eq!(
        tree["unit_consumption"]["test-site-000000000002"]["user_id"],
        json!("-Ncarol0000000001")
    );
}

#[test]
fn a_meter_without_a_user_is_looked_up_at_most_once_per_user_miss_secs() {
    let mut s = with_service_account(fake_with(json!(null), indexes()));
    for seq in 1..=5 {
        assert_eq!(
            s.sink
                .deliver(&[consumption(seq, "METER009", 10, 1000 - seq * 10, seq * 10)]),
            Delivery::Delivered
        );
    }
    assert_eq!(db_requests(&s.fake, "GET"), 2, "one link read, one query");
    assert_eq!(db_requests(&s.fake, "PATCH"), 5);
}

/// A status as the original firmware publishes it (`publishStatus`), inside the gateway's
/// status event.
fn firmware_status(seq: i64, meter: &str, status: &str, load_on: bool) -> Event {
    event(
        seq,
        "status",
        meter,
        json!({"status": status, "message": "Balance exhausted",
               "report": {"meterNo": meter, "status": status, "message": "Balance exhausted",
                          "balance": 0.0, "wifi_rssi": -60, "loadOn": load_on,
                          "timestamp": 123456}}),
    )
}

#[test]
fn a_disconnected_status_over_a_live_connection_keeps_the_meter_online_with_the_relay_off() {
    let mut s = with_service_account(fake());
    assert_eq!(
        s.sink
            .deliver(&[firmware_status(1, "METER001", "disconnected", false)]),
        Delivery::Delivered
    );
    let m = &s.fake.tree()["meters"]["METER001"];
    assert_eq!(m["online"], json!(true));
    assert_eq!(m["relay"], json!("off"));
    assert_eq!(
        m["status"],
        json!({"status": "disconnected", "message": "Balance exhausted", "last_seen": at(1)})
    );

    // The connection really ends (the gateway's own status): offline, relay left as it was.
    let gone = event(
        2,
        "status",
        "METER001",
        json!({"status": "offline", "source": "connection"}),
    );
    assert_eq!(s.sink.deliver(&[gone]), Delivery::Delivered);
    let m = &s.fake.tree()["meters"]["METER001"];
    assert_eq!(m["online"], json!(false));
    assert_eq!(m["relay"], json!("off"));
}

#[test]
fn a_payment_carrying_the_payers_phone_records_it_over_the_registered_one() {
    let mut s = with_service_account(fake_with(dashboard_registered(), indexes()));
    let mut p = payment(1, "METER002", "SIM-1764230400123-ab12cd34", 100, 5000);
    p.data["phone"] = json!("254700000001");
    let mut bad = payment(2, "METER002", "QGH2DEF3GX", 50, 7500);
    bad.data["phone"] = json!("2547 ***** 126");
    assert_eq!(s.sink.deliver(&[p, bad]), Delivery::Delivered);
    let txs = &s.fake.tree()["transactions"];
    let first = &txs["test-site-000000000001"];
    assert_eq!(first["phone_number"], json!("254700000001"));
    assert_eq!(
        first.get("mpesa_receipt"),
        None,
        "a simulated reference is no receipt"
    );
    // A masked MSISDN is not a number: the registered one is used.
    assert_eq!(
        txs["test-site-000000000002"]["phone_number"],
        json!("254712345678")
    );
}

/// Secret files are read only at mode 0600 (`umeme_plugin_sdk::read_secret_file`).
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
