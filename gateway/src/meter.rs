//! Domain values checked once at the edge: meter numbers, energy and money.

use std::fmt;

/// A meter number (`METER001`). It is the meter's MQTT client id, username and topic level,
/// and a Firebase key, so only `A-Z a-z 0-9 - _` are allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct MeterId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("meter number {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'")]
pub struct MeterIdError(pub String);

impl MeterId {
    pub fn parse(s: &str) -> Result<MeterId, MeterIdError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(MeterId(s.to_string()))
        } else {
            Err(MeterIdError(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MeterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for MeterId {
    type Err = MeterIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MeterId::parse(s)
    }
}

/// Energy units as the original system shows them (1 unit = 1 kWh) from whole Wh.
pub fn wh_to_units(wh: i64) -> f64 {
    wh as f64 / 1000.0
}

/// Parses a KES amount (`100`, `99.5`, `"250.00"`) into cents. At most two decimals, positive,
/// at most one million KES in one payment.
pub fn kes_to_cents(amount: f64) -> Option<i64> {
    if !amount.is_finite() || amount <= 0.0 || amount > 1_000_000.0 {
        return None;
    }
    let cents = (amount * 100.0).round();
    if ((amount * 100.0) - cents).abs() > 1e-6 {
        return None;
    }
    Some(cents as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_ids_are_safe_topic_levels() {
        assert!(MeterId::parse("METER001").is_ok());
        assert!(MeterId::parse("m-1_2").is_ok());
        for bad in ["", "a/b", "a+", "#", "$SYS", "a b", "é", &"x".repeat(65)] {
            assert!(MeterId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kes_amounts_become_cents() {
        assert_eq!(kes_to_cents(100.0), Some(10_000));
        assert_eq!(kes_to_cents(0.1), Some(10));
        assert_eq!(kes_to_cents(19.99), Some(1_999));
        assert_eq!(kes_to_cents(0.001), None);
        assert_eq!(kes_to_cents(-5.0), None);
        assert_eq!(kes_to_cents(f64::NAN), None);
        assert_eq!(kes_to_cents(1e12), None);
    }
}
