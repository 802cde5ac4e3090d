//! Payment references on the real binary: a reference credits at most once per site, whatever
//! its source, its surrounding whitespace or its ASCII case; the same reference for another
//! meter or amount is an error that says nothing of the first payment.

mod common;
#[path = "../../plugins/source-daraja/tests/fake_daraja/mod.rs"]
mod fake_daraja;

use std::net::SocketAddr;

use common::*;
use fake_daraja::*;

fn site() -> Gateway {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("METER001", "meter-001-secret");
    gw.add_meter("METER002", "meter-002-secret");
    gw
}

fn simulate(gw: &Gateway, meter: &str, amount: f64, reference: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"meter_no": meter, "amount": amount, "reference": reference});
    gw.http("POST", "/daraja/simulate", Some(&body.to_string()))
}

#[test]
fn a_conflicting_duplicate_via_simulate_is_a_409_that_reveals_nothing_of_the_first_meter() {
    let gw = site();
    let (status, first) = simulate(&gw, "METER001", 250.0, "R-77");
    assert_eq!(status, 200, "{first}");
    let balance_1 = first["balance_wh"].as_i64().unwrap();

    let (status, answer) = simulate(&gw, "METER002", 250.0, "R-77");
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"error": "payment reference already used for another payment"})
    );
    let text = answer.to_string();
    assert!(!text.contains("METER001") && !text.contains(&balance_1.to_string()));
    assert_eq!(gw.balance_wh("METER002"), 0, "nothing credited");

    // Another amount for the same meter is a conflict too, not "the first result".
    let (status, _) = simulate(&gw, "METER001", 300.0, "R-77");
    assert_eq!(status, 409);
    assert_eq!(gw.balance_wh("METER001"), balance_1);

    gw.wait_log("its reference was already used for another meter or amount");
    assert_eq!(
        gw.metric(r#"umeme_payments_total{source="simulate",outcome="conflict"}"#),
        2.0
    );
    assert_eq!(
        gw.metric(r#"umeme_ledger_errors_total{reason="reference_conflict"}"#),
        2.0
    );
}

#[test]
fn the_same_reference_with_a_trailing_space_or_another_case_credits_once() {
    let gw = site();
    let out = gw.cli(&["credit", "METER001", "--kes", "100", "--ref", "QK1234"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let once = gw.balance_wh("METER001");
    for again in ["QK1234 ", " qk1234", "Qk1234\t"] {
        let out = gw.cli(&["credit", "METER001", "--kes", "100", "--ref", again]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("already credited"),
            "{again:?}: {text}"
        );
    }
    assert_eq!(gw.balance_wh("METER001"), once);
}

#[test]
fn a_reference_credited_by_one_source_is_a_conflict_from_another_source_for_another_meter() {
    let gw = site();
    let (status, first) = simulate(&gw, "METER001", 50.0, "X1");
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["reference"], "SIM-X1");
    // The operator's manual credit (source `manual`) reuses the simulated payment's reference.
    let out = gw.cli(&["credit", "METER002", "--kes", "50", "--ref", "SIM-X1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already used for another payment"), "{err}");
    assert!(!err.contains("METER001"), "{err}");
    assert_eq!(gw.balance_wh("METER002"), 0);
    // The same payment arriving by another path (same meter and amount) credits once.
    let out = gw.cli(&["credit", "METER001", "--kes", "50", "--ref", "sim-x1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        gw.balance_wh("METER001"),
        first["balance_wh"].as_i64().unwrap()
    );
}

#[test]
fn an_mpesa_receipt_credited_by_the_daraja_source_is_a_conflict_for_another_meter_from_any_source()
{
    let scratch = tempfile::tempdir().unwrap();
    let plugins = install_plugins(scratch.path(), &[built_plugin("umeme-source-daraja")]);
    let daraja = FakeDaraja::start();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = plugin_config(scratch.path(), &daraja, listen);
    let table: String = config
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let mut gw = Gateway::with_plugins(
        &plugins,
        &format!("[[source]]\nname = \"mpesa\"\nplugin = \"libumeme_source_daraja.so\"\n[source.config]\n{table}"),
    );
    gw.add_meter("METER001", "meter-001-secret");
    gw.add_meter("METER002", "meter-002-secret");
    gw.start();
    gw.assert_log("Daraja source listening");

    let paid = c2b_body("RKTQDM7W6S", "10.00", "METER001", true);
    let (status, _) = post(listen, &path("c2b/confirmation"), &paid);
    assert_eq!(status, 200);
    let balance_1 = eventually("the M-Pesa credit", || {
        Some(gw.balance_wh("METER001")).filter(|b| *b > 0)
    });

    // The operator (source `manual`) types the same receipt for another meter: refused.
    let out = gw.cli(&["credit", "METER002", "--kes", "10", "--ref", "RKTQDM7W6S"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already used for another payment"), "{err}");
    assert!(!err.contains("METER001"), "{err}");
    assert_eq!(gw.balance_wh("METER002"), 0);
    // The same receipt, meter and amount, in lower case with a space: the same payment.
    let out = gw.cli(&["credit", "METER001", "--kes", "10", "--ref", "rktqdm7w6s "]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("already credited"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(gw.balance_wh("METER001"), balance_1);
}
