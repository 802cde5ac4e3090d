//! Signed commands: the envelope, its HMAC-SHA256 and the timestamp window (README "Signed
//! commands").
//!
//! The MQTT payload is `{"payload":"<command JSON>","sig":"<hex>"}`; `sig` is HMAC-SHA256 with
//! the site's key over the exact bytes of the `payload` string (after JSON unescaping), so an
//! operator can make one with `openssl dgst -sha256 -hmac`. The command JSON carries `ts` (Unix
//! seconds) and `nonce` besides its own fields. Pure: the clock is an argument.

use serde_json::{Map, Value};

use crate::config::CommandRules;

/// The longest nonce, in characters; nonces use the id's charset.
pub const MAX_NONCE_CHARS: usize = 64;

/// A command that passed the checks, ready to parse.
#[derive(Debug, PartialEq)]
pub enum Opened {
    /// Signed and within the window; `body` is the command without `ts` and `nonce`.
    Signed {
        body: Map<String, Value>,
        ts: i64,
        nonce: String,
    },
    /// Taken without a signature (`allow_unsigned_commands`).
    Unsigned { body: Map<String, Value> },
}

impl Opened {
    pub fn body(&self) -> &Map<String, Value> {
        match self {
            Opened::Signed { body, .. } | Opened::Unsigned { body } => body,
        }
    }
}

/// Why a command was not opened, and the command JSON when it could be read (for its id).
#[derive(Debug, PartialEq)]
pub struct Refused {
    pub reason: String,
    pub body: Option<Map<String, Value>>,
}

fn refuse(reason: impl Into<String>, body: Option<&Map<String, Value>>) -> Refused {
    Refused {
        reason: reason.into(),
        body: body.cloned(),
    }
}

/// Checks `value` (the MQTT payload as JSON) against `rules` at `now` (Unix seconds).
pub fn open(rules: &CommandRules, value: Value, now: i64) -> Result<Opened, Refused> {
    let Value::Object(mut outer) = value else {
        return Err(refuse("a command is a JSON object", None));
    };
    let is_envelope =
        outer.len() == 2 && outer.contains_key("payload") && outer.contains_key("sig");
    if !is_envelope {
        if !rules.allow_unsigned {
            return Err(refuse(
                "unsigned command refused: send {\"payload\",\"sig\"} signed with this site's key",
                Some(&outer),
            ));
        }
        // `ts` and `nonce` may be there; unsigned, they prove nothing.
        outer.remove("ts");
        outer.remove("nonce");
        return Ok(Opened::Unsigned { body: outer });
    }
    let (Some(Value::String(payload)), Some(Value::String(sig))) =
        (outer.get("payload"), outer.get("sig"))
    else {
        return Err(refuse("payload and sig must be strings", None));
    };
    let body = match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    };
    let Some(key) = &rules.key else {
        return Err(refuse(
            "this gateway has no command_key_file: it takes no commands",
            body.as_ref(),
        ));
    };
    let Some(sig) = hex_32(sig) else {
        return Err(refuse("sig must be 64 hex digits", body.as_ref()));
    };
    // Constant time (ring).
    if ring::hmac::verify(key, payload.as_bytes(), &sig).is_err() {
        return Err(refuse("bad signature", body.as_ref()));
    }
    let Some(mut body) = body else {
        return Err(refuse("the signed payload is not a JSON object", None));
    };
    let ts = match body.remove("ts") {
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or_default(),
        _ => {
            return Err(refuse(
                "ts (Unix seconds, an integer) is missing",
                Some(&body),
            ))
        }
    };
    let nonce = match body.remove("nonce") {
        Some(Value::String(n)) if is_token(&n, MAX_NONCE_CHARS) => n,
        _ => {
            return Err(refuse(
                format!("nonce must be 1 to {MAX_NONCE_CHARS} of A-Z a-z 0-9 . _ : -"),
                Some(&body),
            ))
        }
    };
    let window = rules.window.as_secs() as i64;
    let skew = now.saturating_sub(ts);
    if skew.abs() > window {
        return Err(refuse(
            format!(
                "expired: ts is {skew} s from the gateway's clock, at most {window} s either way are taken"
            ),
            Some(&body),
        ));
    }
    Ok(Opened::Signed { body, ts, nonce })
}

/// A short token a topic level and a log line can carry as is: ids and nonces.
pub fn is_token(s: &str, max_chars: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_chars
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn hex_32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The envelope for `payload` signed with `key` (for tests and tools).
pub fn sign(key: &[u8], payload: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, payload.as_bytes());
    let sig: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({"payload": payload, "sig": sig}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn rules(allow_unsigned: bool) -> CommandRules {
        CommandRules {
            key: Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY)),
            allow_unsigned,
            window: Duration::from_secs(300),
            max_credit_cents_per_command: 1_000_000,
            max_credit_cents_per_day: 10_000_000,
        }
    }

    fn envelope(payload: &str) -> Value {
        serde_json::from_str(&sign(KEY, payload)).unwrap()
    }

    #[test]
    fn a_signed_command_within_the_window_opens_without_ts_and_nonce() {
        let p = json!({"id": "c1", "meter": "METER001", "ts": NOW - 299, "nonce": "n-1"});
        let opened = open(&rules(false), envelope(&p.to_string()), NOW).unwrap();
        assert_eq!(
            opened,
            Opened::Signed {
                body: json!({"id": "c1", "meter": "METER001"})
                    .as_object()
                    .unwrap()
                    .clone(),
                ts: NOW - 299,
                nonce: "n-1".into()
            }
        );
    }

    #[test]
    fn a_signature_matches_what_openssl_dgst_hmac_prints() {
        // printf '%s' '{"a":1}' | openssl dgst -sha256 -hmac k -r
        let env = sign(b"k", r#"{"a":1}"#);
        assert!(
            env.contains("c3a92ff9e274cdcce27a58c15a78ec6dcbbdbd0038a87e7a11baef2028fd8bff"),
            "{env}"
        );
    }

    #[test]
    fn unsigned_tampered_expired_and_nonceless_commands_are_refused_with_the_reason() {
        let good = json!({"id": "c1", "ts": NOW, "nonce": "n"}).to_string();
        let unsigned = json!({"id": "c1", "meter": "METER001"});
        let r = open(&rules(false), unsigned.clone(), NOW).unwrap_err();
        assert!(r.reason.starts_with("unsigned command refused"), "{r:?}");
        assert_eq!(r.body.unwrap()["id"], "c1");
        assert!(matches!(
            open(&rules(true), unsigned, NOW),
            Ok(Opened::Unsigned { .. })
        ));

        let mut tampered = envelope(&good);
        tampered["payload"] = good.replace("c1", "c2").into();
        assert_eq!(
            open(&rules(false), tampered, NOW).unwrap_err().reason,
            "bad signature"
        );
        let mut short = envelope(&good);
        short["sig"] = "abcd".into();
        assert!(open(&rules(false), short, NOW)
            .unwrap_err()
            .reason
            .contains("64 hex"));

        let r = open(&rules(false), envelope(&good), NOW + 301).unwrap_err();
        assert!(r.reason.starts_with("expired: ts is 301 s"), "{r:?}");
        assert!(open(&rules(false), envelope(&good), NOW - 301).is_err());

        let no_nonce = json!({"id": "c1", "ts": NOW}).to_string();
        assert!(open(&rules(false), envelope(&no_nonce), NOW)
            .unwrap_err()
            .reason
            .starts_with("nonce"));
        let bad_nonce = json!({"id": "c1", "ts": NOW, "nonce": "a/b"}).to_string();
        assert!(open(&rules(false), envelope(&bad_nonce), NOW).is_err());

        let mut no_key = rules(false);
        no_key.key = None;
        assert!(open(&no_key, envelope(&good), NOW)
            .unwrap_err()
            .reason
            .contains("no command_key_file"));
    }
}
