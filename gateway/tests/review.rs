//! Findings of the security and correctness review of the first wave (dashboard, TLS, OTA,
//! alerts/usage, limits), each as the attack that found it, through the real binary.

mod common;

use common::*;

const SECRET: &str = "review-test-secret";

/// Times at the ends of `i64` overflowed the range arithmetic: a panic on the reader's
/// blocking thread (a 500 in a release build, an overflow panic in a debug one) instead of a
/// clear refusal.
#[test]
fn usage_ranges_at_the_ends_of_the_time_line_are_refused_not_panicked_on() {
    let mut gw = Gateway::new("");
    gw.start();
    gw.add_meter("EDGE1", SECRET);
    let (min, max) = (i64::MIN, i64::MAX);
    for path in ["/api/meters/EDGE1/usage", "/api/site/usage"] {
        for query in [
            format!("from={min}&to=0&step=hour"),
            format!("from={min}&to=0&step=day"),
            format!("from=0&to={max}&step=day"),
            format!("to={min}&step=hour"),
            format!("to={min}&step=day"),
            format!("from={}&to={max}&step=hour", max - 1),
            format!("from={min}&to={}&step=day", min + 1),
        ] {
            let (s, v) = gw.http("GET", &format!("{path}?{query}"), None);
            assert_eq!(s, 400, "{path}?{query}: {v}");
        }
    }
    // A sane range still answers.
    let (s, v) = gw.http(
        "GET",
        "/api/meters/EDGE1/usage?from=2026-11-01&to=2026-11-02&step=hour",
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert!(!gw.log_text().contains("panicked"), "{}", gw.log_text());
}
