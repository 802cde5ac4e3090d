//! The M-Pesa Daraja source plugin end to end: the real gateway binary loads the built
//! `libumeme_source_daraja.so`, a local fake Daraja plays Safaricom's API, and the tests play
//! Safaricom's callbacks with the documented bodies. The ledger is read back through the
//! admin API. Plugin-only behaviour is tested in `plugins/source-daraja/tests/`.

mod common;
#[path = "../../plugins/source-daraja/tests/fake_daraja/mod.rs"]
mod fake_daraja;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use common::*;
use fake_daraja::*;
use serde_json::{json, Value};

const PLUGIN: &str = "libumeme_source_daraja.so";
const METER: &str = "METER001";

/// Builds the plugin once per test binary; returns the built library.
fn built() -> PathBuf {
    built_plugin("umeme-source-daraja")
}

/// TOML `key = value` lines for a flat JSON object (strings, numbers, booleans, arrays).
fn toml_lines(table: &Value) -> String {
    table
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

struct Site {
    gw: Gateway,
    daraja: FakeDaraja,
    plugin: SocketAddr,
    _scratch: tempfile::TempDir,
}

impl Site {
    /// A gateway with meter METER001 and the Daraja source named "mpesa", started.
    fn start() -> Site {
        Site::start_with(|_| {})
    }

    /// [`Site::start`] with the plugin's `[source.config]` edited first.
    fn start_with(edit: impl FnOnce(&mut Value)) -> Site {
        Site::start_on("", edit)
    }

    /// [`Site::start_with`] with `extra` (e.g. `[[tariffs]]`) in the gateway's config.
    fn start_on(extra: &str, edit: impl FnOnce(&mut Value)) -> Site {
        let scratch = tempfile::tempdir().unwrap();
        let plugins = install_plugins(scratch.path(), &[built()]);
        let daraja = FakeDaraja::start();
        let plugin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut config = plugin_config(scratch.path(), &daraja, plugin);
        edit(&mut config);
        let source = format!(
            "[[source]]\nname = \"mpesa\"\nplugin = \"{PLUGIN}\"\n[source.config]\n{}",
            toml_lines(&config)
        );
        let gw = Gateway::with_plugins(&plugins, &format!("{extra}\n{source}"));
        gw.add_meter(METER, "daraja-test-secret");
        let mut site = Site {
            gw,
            daraja,
            plugin,
            _scratch: scratch,
        };
        site.boot();
        site
    }

    /// Starts the gateway and waits for the plugin's listener (which may come up before or
    /// after the gateway says it is ready).
    fn boot(&mut self) {
        let before = self.listening();
        self.gw.start();
        eventually("the Daraja listener", || {
            (self.listening() > before).then_some(())
        });
    }

    fn listening(&self) -> usize {
        self.gw
            .log_text()
            .matches("Daraja source listening")
            .count()
    }

    fn payments(&self) -> Vec<Value> {
        let (status, v) = self
            .gw
            .http("GET", &format!("/api/meters/{METER}/payments"), None);
        assert_eq!(status, 200, "{v}");
        v["payments"].as_array().unwrap().clone()
    }

    fn references(&self) -> Vec<String> {
        self.payments()
            .iter()
            .map(|p| p["reference"].as_str().unwrap().to_string())
            .collect()
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.gw.cli(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Bytes of the database and its WAL: any write shows here.
    fn db_bytes(&self) -> u64 {
        let db = self.gw.db_path();
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        [db, wal]
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum()
    }

    fn push(&self, amount: i64) -> String {
        let body = json!({"phone": "0708374149", "amount": amount, "meter_no": METER});
        let (status, v) = post(self.plugin, &path("stkpush"), &body);
        assert_eq!(status, 200, "{v}");
        v["CheckoutRequestID"].as_str().unwrap().to_string()
    }
}

#[test]
fn c2b_paybill_payments_credit_the_meter_once_and_unknown_accounts_are_rejected_with_c2b00012() {
    let site = Site::start();
    let validate = |account: &str| {
        post(
            site.plugin,
            &path("c2b/validation"),
            &c2b_body("RKTQDM7W6S", "10.00", account, false),
        )
    };
    assert_eq!(
        validate(METER),
        (200, json!({"ResultCode": "0", "ResultDesc": "Accepted"}))
    );
    assert_eq!(
        validate("METER404"),
        (
            200,
            json!({"ResultCode": "C2B00012", "ResultDesc": "Rejected"})
        )
    );

    // The same confirmation, concurrently and again: one credit.
    let body = c2b_body("RKTQDM7W6S", "10.00", METER, true);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|_| s.spawn(|| post(site.plugin, &path("c2b/confirmation"), &body)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in answers {
        assert_eq!(a, (200, json!({"ResultCode": 0, "ResultDesc": "Success"})));
    }
    assert_eq!(post(site.plugin, &path("c2b/confirmation"), &body).0, 200);
    let payments = site.payments();
    assert_eq!(payments.len(), 1, "{payments:?}");
    assert_eq!(payments[0]["source"], "mpesa");
    assert_eq!(payments[0]["reference"], "RKTQDM7W6S");
    assert_eq!(payments[0]["amount_cents"], 1000);
    // KES 10 at 0.05 units per KES: 0.5 kWh.
    assert_eq!(site.gw.balance_wh(METER), 500);
    assert!(
        site.daraja.recorded().requests.is_empty(),
        "C2B needs no call to Safaricom"
    );
}

#[test]
fn a_gateway_killed_between_credit_and_answer_credits_the_retried_confirmation_exactly_once() {
    let mut site = Site::start();
    let body = c2b_body("RKTQDM7W6K", "40.00", METER, true).to_string();
    // Daraja's first delivery: the gateway dies once the credit is committed, before Daraja
    // reads any answer.
    let mut first = TcpStream::connect(site.plugin).unwrap();
    write!(
        first,
        "POST {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        path("c2b/confirmation"),
        body.len()
    )
    .unwrap();
    site.gw.wait_log("payment credited");
    site.gw.kill();
    drop(first);

    site.boot();
    assert_eq!(
        site.gw.balance_wh(METER),
        2000,
        "the committed credit survived"
    );
    // Daraja retries: success, and no second credit.
    let (status, v) = post_raw(
        site.plugin,
        &path("c2b/confirmation"),
        "application/json",
        body.as_bytes(),
    );
    assert_eq!(
        (status, v),
        (200, json!({"ResultCode": 0, "ResultDesc": "Success"}))
    );
    assert_eq!(site.references(), vec!["RKTQDM7W6K"]);
    assert_eq!(site.gw.balance_wh(METER), 2000);
    site.gw.assert_log("duplicate: true");
}

#[test]
fn stk_push_success_cancellation_and_a_lost_callback_settled_by_query_never_credit_a_receipt_twice()
{
    let site = Site::start();
    // Success: the callback credits with the receipt; the same payment seen by C2B does not.
    let paid = site.push(10);
    assert_eq!(
        post(
            site.plugin,
            &path("stk/callback"),
            &stk_paid(&paid, "NLJ7RT61SV", 10.0)
        )
        .0,
        200
    );
    assert_eq!(
        post(
            site.plugin,
            &path("stk/callback"),
            &stk_paid(&paid, "NLJ7RT61SV", 10.0)
        )
        .0,
        200
    );
    assert_eq!(
        post(
            site.plugin,
            &path("c2b/confirmation"),
            &c2b_body("NLJ7RT61SV", "10.00", METER, true)
        )
        .0,
        200
    );
    assert_eq!(site.references(), vec!["NLJ7RT61SV"]);

    // Cancelled by the customer: recorded, nothing credited, the poller leaves it alone.
    let cancelled = site.push(15);
    let cb = stk_failed(&cancelled, 1032, "Request cancelled by user");
    assert_eq!(post(site.plugin, &path("stk/callback"), &cb).0, 200);
    site.daraja
        .settle(&cancelled, 0, "would be wrong to believe");

    // Lost callback: the status query settles it, once.
    let lost = site.push(20);
    eventually("a status query for the lost push", || {
        let r = site.daraja.recorded();
        r.requests
            .iter()
            .any(|(p, b)| p.ends_with("stkpushquery/v1/query") && b["CheckoutRequestID"] == lost)
            .then_some(())
    });
    site.daraja
        .settle(&lost, 0, "The service request is processed successfully.");
    eventually("the credit by query", || {
        (site.payments().len() == 2).then_some(())
    });
    // Its callback arrives late after all: no second credit.
    assert_eq!(
        post(
            site.plugin,
            &path("stk/callback"),
            &stk_paid(&lost, "NLJ7RT61SW", 20.0)
        )
        .0,
        200
    );
    let refs = site.references();
    assert_eq!(refs, vec!["NLJ7RT61SV".to_string(), lost.clone()]);
    // KES 10 + KES 20 at 50 Wh per KES.
    assert_eq!(site.gw.balance_wh(METER), 1500);
    assert_eq!(
        site.daraja.count("GET /oauth/v1/generate"),
        1,
        "one token for everything"
    );
    site.gw.assert_log("ended without payment: 1032");
}

#[test]
fn hostile_requests_on_the_callback_endpoints_are_refused_logged_and_the_plugin_serves_on() {
    let site = Site::start();
    let good = c2b_body("RKTQDM7W6H", "10.00", METER, true);
    let confirm = path("c2b/confirmation");
    let wrong_token = format!("/daraja/{}/c2b/confirmation", "f".repeat(32));
    assert_eq!(post(site.plugin, &wrong_token, &good), (404, json!("")));
    assert_eq!(
        post(
            site.plugin,
            &format!("/daraja/{CALLBACK_TOKEN}x/stkpush"),
            &good
        )
        .0,
        404
    );
    assert_eq!(
        post_raw(
            site.plugin,
            &confirm,
            "application/x-www-form-urlencoded",
            b"TransID=X"
        )
        .0,
        415
    );
    assert_eq!(
        post_raw(
            site.plugin,
            &confirm,
            "application/json",
            &vec![b'{'; 64 * 1024]
        )
        .0,
        413
    );
    assert_eq!(
        post_raw(
            site.plugin,
            &confirm,
            "application/json",
            b"{\"TransID\":\"RK"
        )
        .0,
        400
    );
    for (field, value) in [
        ("TransAmount", json!("abc")),
        ("TransAmount", json!("-10.00")),
        ("TransID", Value::Null),
    ] {
        let mut b = good.clone();
        b[field] = value;
        assert_eq!(post(site.plugin, &confirm, &b).0, 400, "{field}");
    }
    let mut not_text = good.clone();
    not_text["BillRefNumber"] = json!({"meter": METER});
    assert_eq!(post(site.plugin, &confirm, &not_text).0, 400);
    let mut bad_amount = stk_paid("ws_CO_0", "NLJ7RT61SZ", 1.0);
    bad_amount["Body"]["stkCallback"]["CallbackMetadata"]["Item"][4]["Value"] = json!("abc");
    assert_eq!(post(site.plugin, &path("stk/callback"), &bad_amount).0, 400);

    assert!(site.payments().is_empty(), "nothing credited");
    // Every refusal is logged (lines reach the log file a moment after they are written).
    eventually("every refusal in the log", || {
        (site.gw.log_text().matches("refused").count() >= 9).then_some(())
    });
    assert_eq!(site.gw.http("GET", "/health", None).0, 200);
    assert_eq!(
        post(site.plugin, &confirm, &good).0,
        200,
        "the plugin serves on"
    );
    assert_eq!(site.references(), vec!["RKTQDM7W6H"]);
}

#[test]
fn a_buy_goods_payment_without_an_account_is_kept_listed_and_credited_exactly_once_by_payment_apply(
) {
    let site = Site::start();
    let mut till = c2b_body("RKTQDM7WA1", "150.00", "", true);
    till["TransactionType"] = json!("Buy Goods");
    let confirm = path("c2b/confirmation");
    assert_eq!(
        post(site.plugin, &confirm, &till),
        (200, json!({"ResultCode": 0, "ResultDesc": "Success"})),
        "acknowledged, not lost"
    );
    let unknown = c2b_body("RKTQDM7WA2", "20", "HOUSE-B-7", true);
    assert_eq!(post(site.plugin, &confirm, &unknown).0, 200);
    assert!(site.payments().is_empty(), "nothing credited yet");

    let (ok, listed, err) = site.cli(&["payment", "list", "--unapplied"]);
    assert!(ok, "{err}");
    assert!(
        listed.contains("RKTQDM7WA1") && listed.contains("150.00"),
        "{listed}"
    );
    assert!(
        listed.contains("RKTQDM7WA2") && listed.contains("HOUSE-B-7"),
        "{listed}"
    );

    let before = site.gw.balance_wh(METER);
    let (ok, out, err) = site.cli(&["payment", "apply", "RKTQDM7WA1", METER]);
    assert!(ok, "{err}");
    assert!(out.contains("applied: 150.00 KES to METER001"), "{out}");
    assert!(site.gw.balance_wh(METER) > before);
    let credited = site.gw.balance_wh(METER);

    // A second apply, to any meter, is an error naming where it went.
    let (ok, _, err) = site.cli(&["payment", "apply", "RKTQDM7WA1", METER]);
    assert!(!ok);
    assert!(err.contains("already applied to meter METER001"), "{err}");
    // Daraja delivering the same confirmation again credits nothing either.
    assert_eq!(post(site.plugin, &confirm, &till).0, 200);
    let (ok, _, err) = site.cli(&["payment", "apply", "NOSUCHREF", METER]);
    assert!(!ok && err.contains("no unapplied payment"), "{err}");

    assert_eq!(site.references(), vec!["RKTQDM7WA1"]);
    assert_eq!(site.gw.balance_wh(METER), credited);
    let (_, open, _) = site.cli(&["payment", "list", "--unapplied"]);
    assert!(
        !open.contains("RKTQDM7WA1") && open.contains("RKTQDM7WA2"),
        "{open}"
    );
    let (_, all, _) = site.cli(&["payment", "list"]);
    assert!(all.contains("RKTQDM7WA1") && all.contains(METER), "{all}");

    // The admin API shows and applies them too.
    let (status, v) = site.gw.http("GET", "/api/payments/unapplied", None);
    assert_eq!(status, 200, "{v}");
    let open: Vec<&str> = v["unapplied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["reference"].as_str().unwrap())
        .collect();
    assert_eq!(open, vec!["RKTQDM7WA2"]);
    let apply = "/api/payments/unapplied/RKTQDM7WA2/apply";
    let body = json!({ "meter": METER }).to_string();
    let (status, v) = site.gw.http("POST", apply, Some(&body));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["payment"]["amount_cents"], 2000);
    let (status, v) = site.gw.http("POST", apply, Some(&body));
    assert_eq!(status, 409, "{v}");
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("already applied to meter METER001"));
    assert_eq!(site.references().len(), 2);
}

#[test]
fn with_the_default_allow_list_a_caller_outside_safaricoms_addresses_writes_nothing_at_all() {
    let site = Site::start_with(|c| {
        c.as_object_mut().unwrap().remove("allowed_ips");
    });
    // Settle the start-up writes before measuring.
    let settled = site.db_bytes();
    eventually("the database to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        (site.db_bytes() == settled).then_some(())
    });
    let before = site.db_bytes();
    let started = std::time::Instant::now();
    for i in 0..400 {
        let id = format!("JUNK{i:06}");
        let (endpoint, body) = if i % 2 == 0 {
            (
                "c2b/confirmation",
                c2b_body(&id, "1000000.00", "NOSUCH", true),
            )
        } else {
            (
                "stk/callback",
                stk_paid(&format!("ws_CO_{id}"), &id, 1000.0),
            )
        };
        assert_eq!(post(site.plugin, &path(endpoint), &body).0, 403);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "bounded"
        );
    }
    assert_eq!(site.db_bytes(), before, "not one byte written");
    assert!(site.payments().is_empty());
    let (_, listed, _) = site.cli(&["payment", "list"]);
    assert!(listed.contains("no unapplied payments"), "{listed}");
}

#[test]
fn forged_junk_with_the_token_from_an_allowed_address_grows_the_database_only_by_bounded_records() {
    let site = Site::start();
    let before = site.db_bytes();
    let started = std::time::Instant::now();
    let mut padded = c2b_body("X", "1.00", "NOSUCH", true);
    // Fields the plugin does not read, to make each request as large as the body limit allows.
    padded["FirstName"] = json!("x".repeat(14 * 1024));
    for i in 0..400 {
        let id = format!("JUNK{i:06}");
        let (endpoint, body) = if i % 2 == 0 {
            let mut b = padded.clone();
            b["TransID"] = json!(id);
            ("c2b/confirmation", b)
        } else {
            let cb = stk_failed(&format!("ws_CO_{id}"), 1032, &"x".repeat(14 * 1024));
            ("stk/callback", cb)
        };
        assert_eq!(post(site.plugin, &path(endpoint), &body).0, 200);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "bounded"
        );
    }
    let (_, listed, _) = site.cli(&["payment", "list", "--unapplied"]);
    assert_eq!(
        listed.matches("JUNK").count(),
        200,
        "the confirmations, nothing else"
    );
    let grown = site.db_bytes().saturating_sub(before);
    println!("400 forged callbacks (200 unknown-account confirmations, 200 unpaid STK callbacks for unknown pushes, ~14 KiB each): database + WAL grew {grown} bytes in {:?}", started.elapsed());
    // 200 records without their oversized bodies; before the limits this was 6.2 MB.
    assert!(grown < 1024 * 1024, "grew {grown} bytes");
}

#[test]
fn a_meter_number_over_12_characters_is_warned_at_meter_add_and_refused_for_stk_push() {
    let site = Site::start();
    let (ok, _, warning) = site.cli(&[
        "meter",
        "add",
        "HOUSE-A-00012",
        "--secret",
        "daraja-test-secret",
    ]);
    assert!(ok);
    assert!(
        warning.contains("longer than 12 characters") && warning.contains("STK push cannot pay it"),
        "{warning}"
    );
    site.gw.add_meter("HOUSE-A-0001", "daraja-test-secret");
    let body = json!({"phone": "0708374149", "amount": 10, "meter_no": "HOUSE-A-00012"});
    let (status, v) = post(site.plugin, &path("stkpush"), &body);
    assert_eq!(status, 400, "{v}");
    assert!(
        site.daraja.recorded().pushes.is_empty(),
        "never sent, never cut"
    );
    let (status, _) = post(
        site.plugin,
        &path("stkpush"),
        &json!({"phone": "0708374149", "amount": 10, "meter_no": "HOUSE-A-0001"}),
    );
    assert_eq!(status, 200);
    assert_eq!(
        site.daraja.recorded().pushes[0]["AccountReference"],
        "HOUSE-A-0001"
    );
}

#[test]
fn with_an_stkpush_token_the_loaded_plugin_refuses_a_push_that_carries_only_the_callback_token() {
    const PUSH_TOKEN: &str = "site-push-0123456789abcdef012345";
    let site = Site::start_with(|c| {
        let dir = PathBuf::from(c["passkey_file"].as_str().unwrap());
        let p = dir.parent().unwrap().join("stkpush_token");
        std::fs::write(&p, PUSH_TOKEN).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        c["stkpush_token_file"] = json!(p);
    });
    let body = json!({"phone": "0708374149", "amount": 10, "meter_no": METER});
    let (status, v) = post(site.plugin, &path("stkpush"), &body);
    assert_eq!(status, 401, "{v}");
    let (status, v) = post_bearer(site.plugin, &path("stkpush"), CALLBACK_TOKEN, &body);
    assert_eq!(status, 401, "{v}");
    assert!(
        site.daraja.recorded().pushes.is_empty(),
        "Safaricom is never asked"
    );
    let (status, v) = post_bearer(site.plugin, &path("stkpush"), PUSH_TOKEN, &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(site.daraja.recorded().pushes.len(), 1);
    assert!(!site.gw.log_text().contains("no stkpush_token_file"));
}

#[test]
fn c2b_validation_refuses_an_amount_below_the_tariffs_minimum_top_up_and_one_that_arrives_is_kept_not_credited(
) {
    let site = Site::start_on(
        "[[tariffs]]\nname = \"domestic\"\nbands = [{ from_kwh = 0, price = \"20\" }]\nminimum_topup = \"20.00\"\n",
        |_| {},
    );
    let validate = |amount: &str| {
        post(
            site.plugin,
            &path("c2b/validation"),
            &c2b_body("RKTQDM7W7A", amount, METER, false),
        )
    };
    let (status, v) = validate("10.00");
    assert_eq!(status, 200);
    // Daraja's "invalid amount", with the reason for the payer.
    assert_eq!(v["ResultCode"], "C2B00013", "{v}");
    assert_eq!(
        v["ResultDesc"], "Rejected: the minimum top-up for meter METER001 is KES 20.00",
        "{v}"
    );
    assert_eq!(validate("20.00").1["ResultCode"], "0");
    // Paid anyway (validation is optional for Safaricom): acknowledged, not credited, kept.
    let body = c2b_body("RKTQDM7W7A", "10.00", METER, true);
    assert_eq!(
        post(site.plugin, &path("c2b/confirmation"), &body),
        (200, json!({"ResultCode": 0, "ResultDesc": "Success"}))
    );
    assert!(site.payments().is_empty());
    assert_eq!(site.gw.balance_wh(METER), 0);
    let (ok, listed, err) = site.cli(&["payment", "list", "--unapplied"]);
    assert!(ok, "{err}");
    assert_eq!(listed.matches("RKTQDM7W7A").count(), 1, "{listed}");
    assert!(listed.contains("below_minimum_topup"), "{listed}");
}
