//! Payment references on the real binary: a reference credits at most once per site, whatever
//! its source, its surrounding whitespace or its ASCII case; the same reference for another
//! meter or amount is an error that says nothing of the first payment.

mod common;

use common::*;

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
