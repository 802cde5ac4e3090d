//! The Daraja source driven through its C entry points by the SDK's harness (a fake gateway
//! host), against a local fake Daraja. End-to-end tests with the real gateway are in
//! `gateway/tests/daraja.rs`.

mod fake_daraja;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fake_daraja::*;
use serde_json::{json, Value};
use umeme_plugin_sdk::testing::SourceHarness;
use umeme_source_daraja::DarajaSource;

const METER: &str = "METER001";

struct Setup {
    plugin: SourceHarness<DarajaSource>,
    daraja: FakeDaraja,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn setup_with(edit: impl FnOnce(&mut Value)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let mut config = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    edit(&mut config);
    let mut plugin = SourceHarness::<DarajaSource>::new(config, &[METER, "METER002"]).unwrap();
    plugin.start().unwrap();
    let addr = plugin.health().detail["listen"]
        .as_str()
        .expect("health names the listen address")
        .parse()
        .unwrap();
    Setup {
        plugin,
        daraja,
        addr,
        _dir: dir,
    }
}

fn setup() -> Setup {
    setup_with(|_| {})
}

impl Setup {
    fn credits(&self) -> Vec<(String, i64, String)> {
        self.plugin
            .host()
            .payments
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.meter.clone(), p.amount_cents, p.reference.clone()))
            .collect()
    }

    fn kv(&self, key: &str) -> Option<Value> {
        let kv = self.plugin.host().kv.lock().unwrap();
        kv.get(key).map(|v| serde_json::from_str(v).unwrap())
    }

    fn unapplied(&self) -> Vec<umeme_plugin_sdk::Unapplied> {
        self.plugin.host().unapplied.lock().unwrap().clone()
    }

    fn logs_containing(&self, needle: &str) -> usize {
        self.plugin
            .host()
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .count()
    }

    fn push(&self, phone: &str, amount: Value) -> (u16, Value) {
        post(
            self.addr,
            &path("stkpush"),
            &json!({"phone": phone, "amount": amount, "meter_no": METER}),
        )
    }
}

/// Polls until `f` holds (bounded).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn config_refuses_forbidden_url_words_bad_tokens_and_unreadable_or_exposed_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let base = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    let create = |edit: &dyn Fn(&mut Value)| {
        let mut c = base.clone();
        edit(&mut c);
        SourceHarness::<DarajaSource>::new(c, &[METER]).err()
    };
    assert_eq!(create(&|_| {}), None);
    for url in [
        "https://mpesa.example.org",
        "https://gw.example.org/Query",
        "https://x.ngrok.io",
    ] {
        let err = create(&|c| c["callback_base_url"] = json!(url)).expect(url);
        assert!(err.contains("Daraja refuses"), "{err}");
    }
    let token = dir.path().join("bad_token");
    std::fs::write(&token, "exec0123456789abcdef").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let err = create(&|c| c["callback_token_file"] = json!(token)).unwrap();
    assert!(
        err.contains("the callback token") && !err.contains("exec0123"),
        "{err}"
    );
    std::fs::write(&token, "short").unwrap();
    assert!(create(&|c| c["callback_token_file"] = json!(token))
        .unwrap()
        .contains("16 to 128"));
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert!(create(&|c| c["callback_token_file"] = json!(token))
        .unwrap()
        .contains("other users"));
    assert!(create(&|c| c["passkey_file"] = json!("/nonexistent"))
        .unwrap()
        .contains("/nonexistent"));
    assert!(create(&|c| c["register_url_version"] = json!("v3")).is_some());
    assert!(create(&|c| c["response_type"] = json!("completed")).is_some());
    assert!(create(&|c| c["consumer_key"] = json!("inline secrets are unknown keys")).is_some());
    assert_eq!(
        daraja.recorded().requests.len(),
        0,
        "create never contacts Daraja"
    );
}

#[test]
fn the_plugin_starts_without_contacting_safaricom() {
    let s = setup();
    let (status, _) = post(
        s.addr,
        &path("c2b/validation"),
        &c2b_body("RKTQDM7W6S", "10.00", METER, false),
    );
    assert_eq!(status, 200);
    assert_eq!(s.daraja.recorded().requests.len(), 0);
}

#[test]
fn c2b_validation_accepts_a_known_meter_and_rejects_an_unknown_account_with_c2b00012() {
    let s = setup();
    let (status, v) = post(
        s.addr,
        &path("c2b/validation"),
        &c2b_body("RKTQDM7W6S", "10.00", METER, false),
    );
    assert_eq!(
        (status, v),
        (200, json!({"ResultCode": "0", "ResultDesc": "Accepted"}))
    );
    // Customers type account numbers in any case.
    let (_, v) = post(
        s.addr,
        &path("c2b/validation"),
        &c2b_body("RKTQDM7W6T", "10.00", "meter002", false),
    );
    assert_eq!(v["ResultCode"], "0");
    let (status, v) = post(
        s.addr,
        &path("c2b/validation"),
        &c2b_body("RKTQDM7W6U", "10.00", "NOSUCH", false),
    );
    assert_eq!(
        (status, v),
        (
            200,
            json!({"ResultCode": "C2B00012", "ResultDesc": "Rejected"})
        )
    );
    assert!(s.credits().is_empty(), "validation never credits");
}

#[test]
fn a_c2b_confirmation_credits_once_by_trans_id_even_when_delivered_twice_and_concurrently() {
    let s = setup();
    let body = c2b_body("RKTQDM7W6S", "10.00", METER, true);
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| post(s.addr, &path("c2b/confirmation"), &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert_eq!(a, &(200, json!({"ResultCode": 0, "ResultDesc": "Success"})));
    }
    assert_eq!(post(s.addr, &path("c2b/confirmation"), &body).0, 200);
    assert_eq!(
        s.credits(),
        vec![(METER.to_string(), 1000, "RKTQDM7W6S".to_string())]
    );
    let host = s.plugin.host();
    let p = &host.payments.lock().unwrap()[0];
    assert_eq!(
        p.phone.as_deref(),
        Some("94c392c311d522da950619227b3361752a42042db7e1e699b26e628305c68a88"),
        "the MSISDN is stored as given"
    );
    assert_eq!(p.raw.as_ref().unwrap()["TransID"], "RKTQDM7W6S");
}

#[test]
fn a_confirmation_for_an_unknown_account_is_acknowledged_kept_for_reconciliation_and_not_credited()
{
    let s = setup();
    let (status, v) = post(
        s.addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6Z", "50.00", "NOSUCH", true),
    );
    assert_eq!((status, v["ResultCode"].clone()), (200, json!(0)));
    assert!(s.credits().is_empty());
    let kept = s.unapplied();
    assert_eq!(kept.len(), 1, "handed to the gateway");
    assert_eq!(
        (
            kept[0].reference.as_str(),
            kept[0].amount_cents,
            kept[0].account.as_str()
        ),
        ("RKTQDM7W6Z", 5000, "NOSUCH")
    );
    assert_eq!(
        s.kv("c2b-unapplied/RKTQDM7W6Z"),
        None,
        "not in the plugin's store"
    );
}

#[test]
fn with_a_gateway_of_abi_minor_0_an_unapplied_payment_is_kept_in_the_plugins_store_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let config = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    let mut plugin = SourceHarness::<DarajaSource>::on_minor_0(config, &[METER]).unwrap();
    plugin.start().unwrap();
    let addr = plugin.health().detail["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, _) = post(
        addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6Z", "50.00", "NOSUCH", true),
    );
    assert_eq!(status, 200);
    let kept = plugin.host().kv.lock().unwrap()["c2b-unapplied/RKTQDM7W6Z"].clone();
    let kept: Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(
        (kept["account"].clone(), kept["amount_cents"].clone()),
        (json!("NOSUCH"), json!(5000))
    );
    assert!(plugin.host().unapplied.lock().unwrap().is_empty());
    // Credits work as before.
    let (status, _) = post(
        addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6Y", "5", METER, true),
    );
    assert_eq!(status, 200);
    assert_eq!(plugin.host().payments.lock().unwrap().len(), 1);
}

#[test]
fn when_the_gateway_cannot_keep_more_unapplied_payments_daraja_is_told_to_retry_and_nothing_is_written(
) {
    let mut s = setup();
    *s.plugin.host().refuse_unapplied.lock().unwrap() =
        Some("1000 unapplied payments of mpesa wait for the operator".into());
    let (status, v) = post(
        s.addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6Z", "50.00", "NOSUCH", true),
    );
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"], "cannot record the payment now");
    let (status, _) = post(
        s.addr,
        &path("stk/callback"),
        &stk_paid("ws_CO_unknown", "NLJ7RT61SW", 15.0),
    );
    assert_eq!(status, 503);
    assert!(
        s.plugin.host().kv.lock().unwrap().is_empty(),
        "no fallback write"
    );
    assert!(s.credits().is_empty());
    assert_eq!(s.plugin.health().detail["unapplied_not_kept"], 2);
    assert!(s.logs_containing("could not be kept") >= 2);
    // A payment for a known meter is not held up.
    let (status, _) = post(
        s.addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6Y", "50.00", METER, true),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_buy_goods_payment_without_an_account_is_accepted_kept_as_unapplied_and_not_lost() {
    let s = setup();
    let mut till = c2b_body("RKTQDM7W70", "100", "", false);
    till["TransactionType"] = json!("Buy Goods");
    assert_eq!(
        post(s.addr, &path("c2b/validation"), &till),
        (200, json!({"ResultCode": "0", "ResultDesc": "Accepted"})),
        "a till payment has no account: let the money move"
    );
    till["OrgAccountBalance"] = json!("125.00");
    assert_eq!(
        post(s.addr, &path("c2b/confirmation"), &till),
        (200, json!({"ResultCode": 0, "ResultDesc": "Success"}))
    );
    // Daraja also sends the field as null, or not at all.
    let mut null_ref = till.clone();
    null_ref["TransID"] = json!("RKTQDM7W71");
    null_ref["BillRefNumber"] = Value::Null;
    assert_eq!(post(s.addr, &path("c2b/confirmation"), &null_ref).0, 200);
    assert!(s.credits().is_empty());
    let kept = s.unapplied();
    assert_eq!(
        kept.iter()
            .map(|u| (u.reference.as_str(), u.amount_cents, u.account.as_str()))
            .collect::<Vec<_>>(),
        vec![("RKTQDM7W70", 10000, ""), ("RKTQDM7W71", 10000, "")]
    );
    // A PayBill payment with an empty account is a typing slip: refused before money moves.
    let paybill = c2b_body("RKTQDM7W72", "100", "", false);
    assert_eq!(
        post(s.addr, &path("c2b/validation"), &paybill).1["ResultCode"],
        "C2B00012"
    );
}

#[test]
fn amounts_in_every_form_safaricom_sends_credit_and_malformed_ones_are_refused_with_the_reason() {
    let s = setup();
    let forms = [
        ("RKTQDM7W80", json!("100.00")),
        ("RKTQDM7W81", json!("100")),
        ("RKTQDM7W82", json!(100)),
        ("RKTQDM7W83", json!(100.5)),
        ("RKTQDM7W84", json!("2.5")),
    ];
    for (id, amount) in &forms {
        let mut b = c2b_body(id, "0", METER, true);
        b["TransAmount"] = amount.clone();
        assert_eq!(
            post(s.addr, &path("c2b/confirmation"), &b).0,
            200,
            "{amount}"
        );
    }
    assert_eq!(
        s.credits().iter().map(|c| c.1).collect::<Vec<_>>(),
        vec![10000, 10000, 10000, 10050, 250]
    );
    for (amount, reason) in [
        (json!("-100.00"), "negative"),
        (json!(-1), "negative"),
        (json!("NaN"), "not a plain decimal"),
        (json!("1.005"), "more than two decimals"),
        (json!("1e3"), "not a plain decimal"),
    ] {
        let mut b = c2b_body("RKTQDM7W89", "0", METER, true);
        b["TransAmount"] = amount.clone();
        let (status, v) = post(s.addr, &path("c2b/confirmation"), &b);
        assert_eq!(status, 400, "{amount}");
        assert!(
            v["error"].as_str().unwrap().contains(reason),
            "{amount}: {v}"
        );
    }
    assert_eq!(s.credits().len(), forms.len());
}

#[test]
fn daraja_fields_reach_the_log_with_control_characters_escaped() {
    let s = setup();
    let forged = "NOSUCH\n<3>gateway: FAKE LINE\u{1b}[2J";
    let body = c2b_body("RKTQDM7W90", "10.00", forged, true);
    assert_eq!(post(s.addr, &path("c2b/confirmation"), &body).0, 200);
    let mut shortcode = c2b_body("RKTQDM7W91", "10.00", METER, true);
    shortcode["BusinessShortCode"] = json!("1\n<3>FAKE");
    assert_eq!(post(s.addr, &path("c2b/confirmation"), &shortcode).0, 400);
    let logs = s.plugin.host().logs.lock().unwrap().clone();
    assert!(
        logs.iter()
            .all(|(_, l)| !l.contains('\n') && !l.contains('\u{1b}')),
        "no raw control character in any line: {logs:?}"
    );
    assert!(s.logs_containing(r"NOSUCH\n<3>gateway: FAKE LINE\u{1b}[2J") >= 1);
    assert!(s.logs_containing(r"1\n<3>FAKE") >= 1);
}

#[test]
fn an_stk_push_to_a_meter_number_longer_than_12_characters_is_refused_and_never_cut() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let config = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    // Cut to 12 characters, the first number would name the second meter.
    let mut plugin =
        SourceHarness::<DarajaSource>::new(config, &["HOUSE-A-00012", "HOUSE-A-0001"]).unwrap();
    plugin.start().unwrap();
    let addr = plugin.health().detail["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, v) = post(
        addr,
        &path("stkpush"),
        &json!({"phone": "0708374149", "amount": 10, "meter_no": "HOUSE-A-00012"}),
    );
    assert_eq!(status, 400, "{v}");
    let why = v["error"].as_str().unwrap();
    assert!(
        why.contains("longer than 12 characters") && why.contains("HOUSE-A-00012"),
        "{why}"
    );
    assert!(
        daraja.recorded().pushes.is_empty(),
        "Safaricom is never asked"
    );
    // Exactly 12 is fine, and sent whole.
    let (status, v) = post(
        addr,
        &path("stkpush"),
        &json!({"phone": "0708374149", "amount": 10, "meter_no": "HOUSE-A-0001"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        daraja.recorded().pushes[0]["AccountReference"],
        "HOUSE-A-0001"
    );
}

#[test]
fn by_default_only_safaricoms_callback_addresses_may_post_and_any_must_be_asked_for() {
    let s = setup_with(|c| {
        c.as_object_mut().unwrap().remove("allowed_ips");
    });
    for (endpoint, body) in [
        (
            "c2b/confirmation",
            c2b_body("RKTQDM7W6S", "1000000.00", METER, true),
        ),
        (
            "c2b/confirmation",
            c2b_body("RKTQDM7W6T", "10.00", "NOSUCH", true),
        ),
        ("stk/callback", stk_paid("ws_CO_forged", "NLJ7RT61SV", 10.0)),
    ] {
        assert_eq!(post(s.addr, &path(endpoint), &body).0, 403, "{endpoint}");
    }
    assert!(s.credits().is_empty());
    assert!(s.unapplied().is_empty(), "a refused caller writes nothing");
    assert!(s.plugin.host().kv.lock().unwrap().is_empty());

    let open = setup_with(|c| c["allowed_ips"] = json!(["any"]));
    let body = c2b_body("RKTQDM7W6S", "10.00", METER, true);
    assert_eq!(post(open.addr, &path("c2b/confirmation"), &body).0, 200);
    assert!(
        open.logs_containing("allowed_ips = [\"any\"]") >= 1,
        "said loudly"
    );

    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let base = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    for (list, says) in [
        (json!([]), "would refuse every callback"),
        (json!(["any", "196.201.214.200"]), "cannot be mixed"),
        (json!(["196.201.214.0/24"]), "is not an IP address"),
    ] {
        let mut c = base.clone();
        c["allowed_ips"] = list.clone();
        let err = SourceHarness::<DarajaSource>::new(c, &[METER])
            .err()
            .expect("refused");
        assert!(err.contains(says), "{list}: {err}");
    }
}

#[test]
fn a_callback_for_a_push_never_started_keeps_nothing_unless_it_was_paid() {
    let s = setup();
    for i in 0..50 {
        let cb = stk_failed(&format!("ws_CO_junk{i}"), 1032, "Request cancelled by user");
        assert_eq!(post(s.addr, &path("stk/callback"), &cb).0, 200);
    }
    assert!(
        s.plugin.host().kv.lock().unwrap().is_empty(),
        "unpaid junk writes nothing"
    );
    assert!(s.unapplied().is_empty());
    let paid = stk_paid("ws_CO_unknown", "NLJ7RT61SW", 15.0);
    assert_eq!(post(s.addr, &path("stk/callback"), &paid).0, 200);
    let kept = s.unapplied();
    assert_eq!(
        (kept.len(), kept[0].reference.as_str(), kept[0].amount_cents),
        (1, "NLJ7RT61SW", 1500)
    );
    assert!(s.credits().is_empty());
}

#[test]
fn hostile_input_on_the_callback_endpoints_is_rejected_logged_and_credits_nothing() {
    let mut s = setup_with(|c| c["max_body_bytes"] = json!(4096));
    let good = c2b_body("RKTQDM7W6S", "10.00", METER, true);
    let confirm = path("c2b/confirmation");
    let mut refused = 1;
    // A wrong or missing token: a bare 404, the same as a path that does not exist.
    let wrong = format!("/daraja/{}/c2b/confirmation", "0".repeat(32));
    let (status, body) = post(s.addr, &wrong, &good);
    assert_eq!((status, body), (404, json!("")));
    let mut expect = |(status, body): (u16, Value), want: u16, what: &str| {
        assert_eq!(status, want, "{what}: {body}");
        refused += 1;
    };
    expect(
        post(s.addr, "/daraja/c2b/confirmation", &good),
        404,
        "no token",
    );
    expect(
        post(s.addr, &path("c2b/other"), &good),
        404,
        "unknown endpoint",
    );
    expect(
        post_raw(s.addr, &confirm, "text/plain", good.to_string().as_bytes()),
        415,
        "content type",
    );
    expect(
        post_raw(s.addr, &confirm, "application/json", &vec![b' '; 64 * 1024]),
        413,
        "huge body",
    );
    expect(
        post_raw(s.addr, &confirm, "application/json", b"{\"TransID\": "),
        400,
        "broken JSON",
    );
    expect(
        post_raw(s.addr, &confirm, "application/json", b"[1,2]"),
        400,
        "not an object",
    );
    for (field, value) in [
        ("TransAmount", json!("abc")),
        ("TransAmount", json!("-10.00")),
        ("TransAmount", json!("0.00")),
        ("TransAmount", json!(null)),
        ("TransID", json!("RK/../x")),
        ("TransID", json!(42)),
        ("BillRefNumber", json!(["METER001"])),
        ("BusinessShortCode", json!("999999")),
    ] {
        let mut b = good.clone();
        b[field] = value.clone();
        expect(
            post(s.addr, &confirm, &b),
            400,
            &format!("{field} = {value}"),
        );
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("TransID");
    expect(post(s.addr, &confirm, &missing), 400, "missing TransID");
    let stk = path("stk/callback");
    let mut negative = stk_paid("ws_CO_1", "NLJ7RT61SV", 1.0);
    negative["Body"]["stkCallback"]["CallbackMetadata"]["Item"][4]["Value"] = json!(-5);
    expect(post(s.addr, &stk, &negative), 400, "negative STK amount");
    expect(
        post(s.addr, &stk, &json!({"Body": {}})),
        400,
        "missing stkCallback",
    );
    expect(
        post(
            s.addr,
            &stk,
            &json!({"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1"}}}),
        ),
        400,
        "missing ResultCode",
    );
    expect(
        post(
            s.addr,
            &path("stkpush"),
            &json!({"phone": "0712345678", "amount": "abc", "meter_no": METER}),
        ),
        400,
        "push amount",
    );

    assert!(s.credits().is_empty(), "nothing credited");
    assert!(
        s.logs_containing("refused") >= refused,
        "every refusal is logged"
    );
    let counted = s.plugin.health().detail["rejected_requests"]
        .as_u64()
        .unwrap();
    assert_eq!(counted, refused as u64, "every refusal is counted");
    // The listener serves on.
    assert_eq!(post(s.addr, &confirm, &good).0, 200);
    assert_eq!(s.credits().len(), 1);
}

#[test]
fn the_source_ip_allow_list_guards_the_callbacks() {
    let s = setup_with(|c| c["allowed_ips"] = json!(["196.201.214.200"]));
    let (status, _) = post(
        s.addr,
        &path("c2b/confirmation"),
        &c2b_body("RKTQDM7W6S", "10.00", METER, true),
    );
    assert_eq!(status, 403);
    assert!(s.credits().is_empty());
}

#[test]
fn an_stk_push_credits_its_meter_with_the_receipt_and_the_c2b_of_the_same_receipt_credits_nothing()
{
    let s = setup();
    let (status, v) = s.push("0708 374 149", json!(10));
    assert_eq!(status, 200, "{v}");
    let id = v["CheckoutRequestID"].as_str().unwrap().to_string();
    let sent = s.daraja.recorded().pushes[0].clone();
    assert_eq!(sent["PhoneNumber"], "254708374149");
    assert_eq!(sent["PartyA"], "254708374149");
    assert_eq!(sent["Amount"], "10");
    assert_eq!(sent["AccountReference"], METER);
    assert_eq!(
        sent["CallBackURL"],
        format!("https://gw.example.org{}", path("stk/callback"))
    );
    assert_eq!(s.kv(&format!("stk/{id}")).unwrap()["meter"], METER);

    let cb = stk_paid(&id, "NLJ7RT61SV", 10.0);
    assert_eq!(
        post(s.addr, &path("stk/callback"), &cb),
        (200, json!({"ResultCode": 0, "ResultDesc": "Success"}))
    );
    assert_eq!(
        post(s.addr, &path("stk/callback"), &cb).0,
        200,
        "a repeated callback is acknowledged"
    );
    let c2b = c2b_body("NLJ7RT61SV", "10.00", METER, true);
    assert_eq!(post(s.addr, &path("c2b/confirmation"), &c2b).0, 200);
    assert_eq!(
        s.credits(),
        vec![(METER.to_string(), 1000, "NLJ7RT61SV".to_string())]
    );
    assert_eq!(s.kv(&format!("stk/{id}")).unwrap()["state"], "credited");
    assert_eq!(s.kv("stk-pending"), None);
}

#[test]
fn a_cancelled_stk_push_is_recorded_without_credit() {
    let s = setup();
    let (_, v) = s.push("+254708374149", json!("5"));
    let id = v["CheckoutRequestID"].as_str().unwrap().to_string();
    let cb = stk_failed(&id, 1032, "Request cancelled by user");
    assert_eq!(post(s.addr, &path("stk/callback"), &cb).0, 200);
    let stored = s.kv(&format!("stk/{id}")).unwrap();
    assert_eq!(
        (stored["state"].clone(), stored["result_code"].clone()),
        (json!("failed"), json!(1032))
    );
    assert!(s.credits().is_empty());
    // A late "paid" for a push already settled as failed credits nothing either.
    assert_eq!(
        post(
            s.addr,
            &path("stk/callback"),
            &stk_paid(&id, "NLJ7RT61SX", 5.0)
        )
        .0,
        200
    );
    assert!(s.credits().is_empty());
}

#[test]
fn a_push_whose_callback_is_lost_is_settled_by_the_status_query_and_a_late_callback_credits_nothing(
) {
    let s = setup();
    let (_, v) = s.push("254708374149", json!(20));
    let id = v["CheckoutRequestID"].as_str().unwrap().to_string();
    // While the customer has not answered, the query says "being processed".
    eventually("a status query", || {
        s.daraja.count("POST /mpesa/stkpushquery/v1/query") >= 1
    });
    assert!(s.credits().is_empty());
    s.daraja
        .settle(&id, 0, "The service request is processed successfully.");
    eventually("the credit by query", || !s.credits().is_empty());
    assert_eq!(s.credits(), vec![(METER.to_string(), 2000, id.clone())]);
    assert_eq!(
        post(
            s.addr,
            &path("stk/callback"),
            &stk_paid(&id, "NLJ7RT61SV", 20.0)
        )
        .0,
        200
    );
    assert_eq!(
        s.credits().len(),
        1,
        "the late callback does not credit again"
    );
    assert_eq!(s.kv(&format!("stk/{id}")).unwrap()["receipt"], "NLJ7RT61SV");

    // A lost callback of a cancelled push: settled as failed, no credit.
    let (_, v) = s.push("254708374149", json!(30));
    let other = v["CheckoutRequestID"].as_str().unwrap().to_string();
    s.daraja
        .settle(&other, 1037, "DS timeout user cannot be reached");
    eventually("the failure by query", || {
        s.kv(&format!("stk/{other}"))
            .is_some_and(|p| p["state"] == "failed")
    });
    assert_eq!(s.credits().len(), 1);
}

#[test]
fn the_access_token_is_fetched_once_and_renewed_once_when_daraja_invalidates_it() {
    let s = setup();
    for _ in 0..3 {
        assert_eq!(s.push("0708374149", json!(1)).0, 200);
    }
    assert_eq!(
        s.daraja.count("GET /oauth/v1/generate"),
        1,
        "the token is cached"
    );
    s.daraja.revoke_token();
    assert_eq!(s.push("0708374149", json!(1)).0, 200);
    assert_eq!(s.daraja.count("GET /oauth/v1/generate"), 2);
}

#[test]
fn stk_push_requests_are_checked_before_safaricom_is_asked() {
    let s = setup();
    let (status, v) = post(
        s.addr,
        &path("stkpush"),
        &json!({"phone": "0708374149", "amount": 10, "meter_no": "NOSUCH"}),
    );
    assert_eq!(status, 404, "{v}");
    assert_eq!(s.push("12345", json!(10)).0, 400);
    assert_eq!(s.push("0708374149", json!(10.5)).0, 400);
    assert_eq!(s.push("0708374149", json!(0)).0, 400);
    assert!(s.daraja.recorded().pushes.is_empty());
}

#[test]
fn c2b_urls_are_registered_at_start_on_the_configured_path_and_already_registered_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    {
        let mut r = daraja.recorded();
        r.registered = true;
        r.one_shot_registration = true;
    }
    let mut config = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    config["register_urls"] = json!(true);
    config["register_url_version"] = json!("v2");
    let mut plugin = SourceHarness::<DarajaSource>::new(config, &[METER]).unwrap();
    plugin.start().unwrap();
    eventually("registration", || {
        plugin.health().detail["urls_registered"] == true
    });
    let r = daraja.recorded();
    let (what, body) = r
        .requests
        .iter()
        .find(|(p, _)| p.contains("registerurl"))
        .unwrap();
    assert_eq!(what, "POST /mpesa/c2b/v2/registerurl");
    assert_eq!(
        body["ValidationURL"],
        format!("https://gw.example.org{}", path("c2b/validation"))
    );
    assert_eq!(body["ResponseType"], "Completed");
}

/// Reads from `s` until the plugin closes it (bounded); how long that took.
fn closed_after(s: &mut std::net::TcpStream) -> Duration {
    use std::io::Read;
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("the listener kept the connection open: {e}"),
        }
    }
}

#[test]
fn a_half_open_connection_to_the_listener_is_closed_after_the_header_timeout_and_counted() {
    use std::io::Write;
    let mut s = setup_with(|c| c["header_timeout_ms"] = json!(300));
    let mut conn = std::net::TcpStream::connect(s.addr).unwrap();
    conn.write_all(b"POST /daraja/").unwrap();
    let took = closed_after(&mut conn);
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    eventually("the timeout is counted", || {
        s.plugin.health().detail["http_timeouts"] == json!(1)
    });
}

#[test]
fn connections_over_the_listeners_per_address_cap_are_closed_at_once_and_counted() {
    let mut s = setup_with(|c| c["max_connections_per_ip"] = json!(2));
    let _held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(s.addr).unwrap())
        .collect();
    let mut extra = std::net::TcpStream::connect(s.addr).unwrap();
    let took = closed_after(&mut extra);
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    assert_eq!(s.plugin.health().detail["refused_connections"], json!(1));
}

#[test]
fn listener_limits_outside_their_bounds_are_refused_at_create() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let base = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    for (key, value) in [
        ("header_timeout_ms", 11_000),
        ("request_timeout_ms", 1_000),
        ("max_connections", 65),
        ("max_connections_per_ip", 0),
    ] {
        let mut c = base.clone();
        c[key] = json!(value);
        let err = SourceHarness::<DarajaSource>::new(c, &[METER])
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} accepted"));
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn with_an_stkpush_token_the_callback_token_alone_cannot_prompt_a_phone() {
    const PUSH_TOKEN: &str = "push-0123456789abcdef0123456789";
    let mut s = setup_with(|c| {
        let dir = std::path::Path::new(c["passkey_file"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_path_buf();
        let p = dir.join("stkpush_token");
        std::fs::write(&p, format!("{PUSH_TOKEN}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        c["stkpush_token_file"] = json!(p);
    });
    let body = json!({"phone": "0708374149", "amount": 10, "meter_no": METER});
    let (status, v) = post(s.addr, &path("stkpush"), &body);
    assert_eq!(status, 401, "the path token alone: {v}");
    for wrong in ["wrong-0123456789abcdef0123456789", CALLBACK_TOKEN] {
        let (status, v) = post_bearer(s.addr, &path("stkpush"), wrong, &body);
        assert_eq!(status, 401, "{wrong}: {v}");
    }
    assert!(
        s.daraja.recorded().pushes.is_empty(),
        "Safaricom is never asked"
    );
    assert_eq!(s.plugin.health().detail["rejected_requests"], 3);
    let (status, v) = post_bearer(s.addr, &path("stkpush"), PUSH_TOKEN, &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.daraja.recorded().pushes.len(), 1);
    assert_eq!(s.logs_containing("no stkpush_token_file"), 0);
    let without = setup();
    assert_eq!(
        without.logs_containing("no stkpush_token_file"),
        1,
        "STK on without its own token is warned at start"
    );
}

#[test]
fn an_stkpush_token_that_is_the_callback_token_or_too_short_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let base = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    let p = dir.path().join("stkpush_token");
    for (token, expect) in [
        (CALLBACK_TOKEN, "must be another one"),
        ("short", "16 to 128"),
    ] {
        std::fs::write(&p, token).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut c = base.clone();
        c["stkpush_token_file"] = json!(p);
        let err = SourceHarness::<DarajaSource>::new(c, &[METER])
            .err()
            .unwrap();
        assert!(
            err.contains(expect) && !err.contains(CALLBACK_TOKEN),
            "{err}"
        );
    }
}

/// The plugin on a fake host with a KES 20 minimum top-up, of ABI minor 2 or minor 1.
fn start_on_host(
    host: umeme_plugin_sdk::testing::FakeHost,
) -> (
    SourceHarness<DarajaSource>,
    SocketAddr,
    tempfile::TempDir,
    FakeDaraja,
) {
    let dir = tempfile::tempdir().unwrap();
    let daraja = FakeDaraja::start();
    let config = plugin_config(dir.path(), &daraja, "127.0.0.1:0".parse().unwrap());
    let mut plugin = SourceHarness::<DarajaSource>::with_host(host, config, &[METER]).unwrap();
    plugin.start().unwrap();
    let addr = plugin.health().detail["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (plugin, addr, dir, daraja)
}

#[test]
fn c2b_validation_refuses_an_amount_below_the_minimum_top_up_with_c2b00013_and_a_minor_1_gateway_accepts_it(
) {
    let host = || umeme_plugin_sdk::testing::FakeHost {
        minimum_topup_cents: 2_000,
        ..Default::default()
    };
    let (_p, addr, _d, _f) = start_on_host(host());
    let validate = |amount: &str| {
        post(
            addr,
            &path("c2b/validation"),
            &c2b_body("RKTQDM7W8A", amount, METER, false),
        )
        .1
    };
    let v = validate("19.99");
    assert_eq!(v["ResultCode"], "C2B00013", "{v}");
    assert_eq!(
        v["ResultDesc"], "Rejected: the minimum top-up is KES 20.00",
        "{v}"
    );
    assert_eq!(validate("20.00")["ResultCode"], "0");

    // A gateway of minor 1 cannot check amounts: accepted (its ledger keeps a small payment
    // as unapplied when it arrives).
    let old = umeme_plugin_sdk::testing::FakeHost {
        minor_1: true,
        ..host()
    };
    let (_p, addr, _d, _f) = start_on_host(old);
    let (_, v) = post(
        addr,
        &path("c2b/validation"),
        &c2b_body("RKTQDM7W8B", "19.99", METER, false),
    );
    assert_eq!(v["ResultCode"], "0", "{v}");
}
