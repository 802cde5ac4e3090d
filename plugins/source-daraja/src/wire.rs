//! Daraja's formats, as values: amounts, phone numbers, EAT timestamps, the STK password, and
//! the callback bodies. Nothing here does I/O; a malformed body is an `Err` with the reason.

use serde_json::Value;

/// Words Safaricom refuses in registered and callback URLs (any case), plus the tunnel
/// hosts it blocks (research/apis.md §1.g).
const FORBIDDEN_URL_WORDS: [&str; 11] = [
    "m-pesa",
    "mpesa",
    "safaricom",
    "exe",
    "exec",
    "cmd",
    "sql",
    "query",
    "ngrok",
    "mockbin",
    "requestbin",
];

/// Daraja's limit on an STK push's `AccountReference` (research/apis.md §1.d).
pub const ACCOUNT_REFERENCE_MAX: usize = 12;

/// The first word Daraja forbids that `url` contains.
pub fn forbidden_word(url: &str) -> Option<&'static str> {
    let lower = url.to_ascii_lowercase();
    FORBIDDEN_URL_WORDS
        .iter()
        .copied()
        .find(|w| lower.contains(w))
}

/// Money as KES cents, in the forms Safaricom sends: a string with or without decimals
/// ("100.00", "100", "2.5"), or a JSON number (100, 100.0; STK callbacks and some C2B
/// deliveries). Positive, at most two decimals, at most KES 1,000,000; anything else is an
/// `Err` that says what is wrong (negative, not a number, too many decimals, out of range).
pub fn amount_cents(v: &Value) -> Result<i64, String> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("amount is not a number: {other}")),
    };
    if text.starts_with('-') {
        return Err(format!("amount {text:?} is negative"));
    }
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(frac) {
        return Err(format!(
            "amount {text:?} is not a plain decimal number of KES"
        ));
    }
    if frac.len() > 2 {
        return Err(format!(
            "amount {text:?} has more than two decimals (KES has cents only)"
        ));
    }
    if whole.len() > 7 {
        return Err(format!("amount {text:?} is out of range"));
    }
    let frac_cents = match frac.len() {
        0 => 0,
        1 => frac.parse::<i64>().unwrap_or(0) * 10,
        _ => frac.parse::<i64>().unwrap_or(0),
    };
    let cents = whole.parse::<i64>().unwrap_or(0) * 100 + frac_cents;
    if cents <= 0 || cents > 100_000_000 {
        return Err(format!(
            "amount {text:?} is out of range (more than 0, at most 1000000 KES)"
        ));
    }
    Ok(cents)
}

/// A Kenyan mobile number as Daraja wants it: `2547XXXXXXXX` or `2541XXXXXXXX`, from
/// `07…`, `01…`, `+254…`, `254…` or `7…` (spaces and dashes ignored).
pub fn normalise_phone(input: &str) -> Result<String, String> {
    let compact: String = input
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    let digits = compact.strip_prefix('+').unwrap_or(&compact);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("phone {input:?} is not a number"));
    }
    let national = if let Some(rest) = digits.strip_prefix("254") {
        rest
    } else if let Some(rest) = digits.strip_prefix('0') {
        rest
    } else {
        digits
    };
    if national.len() == 9 && (national.starts_with('7') || national.starts_with('1')) {
        Ok(format!("254{national}"))
    } else {
        Err(format!("phone {input:?} is not a Kenyan mobile number"))
    }
}

/// Standard base64 with padding (only the STK password needs it).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `base64(shortcode + passkey + timestamp)`, Daraja's STK password.
pub fn stk_password(shortcode: &str, passkey: &str, timestamp: &str) -> String {
    base64(format!("{shortcode}{passkey}{timestamp}").as_bytes())
}

/// `YYYYMMDDHHmmss` in East Africa Time (UTC+3, no DST) for Unix seconds `unix`.
pub fn eat_timestamp(unix: u64) -> String {
    let iso = umeme_plugin_sdk::iso8601_utc((unix as i64 + 3 * 3600) * 1000);
    iso.chars().filter(char::is_ascii_digit).take(14).collect()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Compares secrets without leaking where they differ through timing.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An M-Pesa transaction id or receipt: 1 to 32 ASCII letters and digits.
fn receipt(field: &str, v: Option<&Value>) -> Result<String, String> {
    match v {
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            Ok(s.clone())
        }
        Some(other) => Err(format!("{field} {other} is not an M-Pesa receipt")),
        None => Err(format!("{field} is missing")),
    }
}

fn string_field(body: &Value, field: &str) -> Result<String, String> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{field} is not a string: {other}")),
        None => Err(format!("{field} is missing")),
    }
}

/// A C2B validation or confirmation notice (all values are strings).
#[derive(Debug, Clone, PartialEq)]
pub struct C2bNotice {
    pub trans_id: String,
    pub amount_cents: i64,
    pub shortcode: String,
    /// The account the customer typed: the meter number. Empty for a Buy Goods (till)
    /// payment, which has none.
    pub bill_ref: String,
    /// `Pay Bill` or `Buy Goods` as Daraja says (empty when absent).
    pub transaction_type: String,
    /// Plain, hashed or masked; kept as given, never used as a key.
    pub msisdn: Option<String>,
}

impl C2bNotice {
    /// A till (Buy Goods) payment rather than a PayBill one.
    pub fn is_buy_goods(&self) -> bool {
        self.transaction_type
            .to_ascii_lowercase()
            .replace(' ', "")
            .contains("buygoods")
    }

    pub fn parse(body: &Value) -> Result<C2bNotice, String> {
        if !body.is_object() {
            return Err("the body is not a JSON object".into());
        }
        let amount = body.get("TransAmount").ok_or("TransAmount is missing")?;
        // Till payments carry an empty (or no, or null) BillRefNumber: the payment is still
        // real and is kept as unapplied by the caller.
        let bill_ref = match body.get("BillRefNumber") {
            None | Some(Value::Null) => String::new(),
            Some(_) => string_field(body, "BillRefNumber")?.trim().to_string(),
        };
        let transaction_type = match body.get("TransactionType") {
            Some(Value::String(s)) => s.trim().to_string(),
            _ => String::new(),
        };
        Ok(C2bNotice {
            trans_id: receipt("TransID", body.get("TransID"))?,
            amount_cents: amount_cents(amount)?,
            shortcode: string_field(body, "BusinessShortCode")?,
            bill_ref,
            transaction_type,
            msisdn: match body.get("MSISDN") {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        })
    }
}

/// The outcome an STK callback reports.
#[derive(Debug, Clone, PartialEq)]
pub enum StkOutcome {
    Paid {
        receipt: String,
        amount_cents: i64,
        phone: Option<String>,
    },
    Failed {
        code: i64,
        desc: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StkCallback {
    pub checkout_id: String,
    pub outcome: StkOutcome,
}

/// A result code, a JSON number in callbacks and a string in query answers.
pub fn result_code(v: Option<&Value>) -> Result<i64, String> {
    match v {
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("ResultCode {n}")),
        Some(Value::String(s)) => s.trim().parse().map_err(|_| format!("ResultCode {s:?}")),
        Some(other) => Err(format!("ResultCode {other} is not a code")),
        None => Err("ResultCode is missing".into()),
    }
}

/// A CheckoutRequestID: `ws_CO_…`, printable ASCII without `/`, at most 64 bytes.
pub fn checkout_id(v: Option<&Value>) -> Result<String, String> {
    match v {
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Ok(s.clone())
        }
        Some(other) => Err(format!("CheckoutRequestID {other} is not valid")),
        None => Err("CheckoutRequestID is missing".into()),
    }
}

impl StkCallback {
    pub fn parse(body: &Value) -> Result<StkCallback, String> {
        let cb = body
            .get("Body")
            .and_then(|b| b.get("stkCallback"))
            .filter(|c| c.is_object())
            .ok_or("Body.stkCallback is missing")?;
        let checkout_id = checkout_id(cb.get("CheckoutRequestID"))?;
        let code = result_code(cb.get("ResultCode"))?;
        let desc = match cb.get("ResultDesc") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        if code != 0 {
            return Ok(StkCallback {
                checkout_id,
                outcome: StkOutcome::Failed { code, desc },
            });
        }
        // Item order is not guaranteed: look items up by name.
        let items = cb
            .get("CallbackMetadata")
            .and_then(|m| m.get("Item"))
            .and_then(Value::as_array)
            .ok_or("CallbackMetadata.Item is missing on a successful callback")?;
        let item = |name: &str| {
            items
                .iter()
                .find(|i| i.get("Name").and_then(Value::as_str) == Some(name))
                .and_then(|i| i.get("Value"))
        };
        let amount = item("Amount").ok_or("the Amount item is missing")?;
        Ok(StkCallback {
            checkout_id,
            outcome: StkOutcome::Paid {
                receipt: receipt("MpesaReceiptNumber", item("MpesaReceiptNumber"))?,
                amount_cents: amount_cents(amount)?,
                phone: item("PhoneNumber").map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_positive_kes_with_at_most_two_decimals() {
        assert_eq!(amount_cents(&json!("10.00")), Ok(1000));
        assert_eq!(amount_cents(&json!("5")), Ok(500));
        assert_eq!(amount_cents(&json!("2.5")), Ok(250));
        assert_eq!(amount_cents(&json!(1.0)), Ok(100));
        assert_eq!(amount_cents(&json!(300)), Ok(30000));
        assert_eq!(amount_cents(&json!("100")), Ok(10000));
        assert_eq!(amount_cents(&json!(" 100.00 ")), Ok(10000));
        assert_eq!(amount_cents(&json!(100.5)), Ok(10050));
        assert_eq!(amount_cents(&json!(1e2)), Ok(10000));
        assert_eq!(amount_cents(&json!("1000000.00")), Ok(100_000_000));
        let why = |v: Value| amount_cents(&v).unwrap_err();
        assert!(why(json!("-5.00")).contains("negative"));
        assert!(why(json!(-0.5)).contains("negative"));
        assert!(why(json!("NaN")).contains("not a plain decimal"));
        assert!(why(json!("inf")).contains("not a plain decimal"));
        assert!(why(json!("1.234")).contains("more than two decimals"));
        assert!(why(json!(1.001)).contains("more than two decimals"));
        assert!(why(json!("1000000.01")).contains("out of range"));
        for bad in [
            json!("abc"),
            json!("-5"),
            json!(-5),
            json!("0"),
            json!("0.00"),
            json!("1.234"),
            json!("1e3"),
            json!(""),
            json!(null),
            json!("99999999"),
        ] {
            assert!(amount_cents(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kenyan_phone_numbers_are_normalised_to_254() {
        for p in [
            "0712345678",
            "+254712345678",
            "254712345678",
            "712345678",
            "0712 345 678",
        ] {
            assert_eq!(normalise_phone(p).as_deref(), Ok("254712345678"), "{p}");
        }
        assert_eq!(normalise_phone("0110123456").as_deref(), Ok("254110123456"));
        for bad in [
            "",
            "abc",
            "0812345678",
            "07123456",
            "+1 555 0100",
            "25471234567890",
        ] {
            assert!(normalise_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stk_password_matches_the_documented_sample() {
        // research/apis.md §1.d: the docs' sample password decodes to these three parts.
        let passkey = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919";
        assert_eq!(
            stk_password("174379", passkey, "20210628092408"),
            "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMjEwNjI4MDkyNDA4"
        );
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn timestamps_are_east_africa_time() {
        // 2021-06-28 06:24:08 UTC is 09:24:08 in Nairobi.
        assert_eq!(eat_timestamp(1_624_861_448), "20210628092408");
        // Crossing midnight and a leap day.
        assert_eq!(eat_timestamp(1_709_234_000), "20240229221320");
        assert_eq!(eat_timestamp(1_709_240_400), "20240301000000");
    }

    #[test]
    fn forbidden_url_words_are_found_in_any_case() {
        assert_eq!(forbidden_word("https://gw.example.org/daraja/x"), None);
        assert_eq!(forbidden_word("https://MPESA.example.org"), Some("mpesa"));
        assert_eq!(forbidden_word("https://x.org/Query"), Some("query"));
        assert_eq!(forbidden_word("https://a.ngrok.io"), Some("ngrok"));
    }

    #[test]
    fn stk_callbacks_are_read_by_item_name_and_failures_carry_no_metadata() {
        let ok = json!({"Body":{"stkCallback":{"MerchantRequestID":"1","CheckoutRequestID":"ws_CO_1",
            "ResultCode":0,"ResultDesc":"ok","CallbackMetadata":{"Item":[
            {"Name":"PhoneNumber","Value":254708374149u64},{"Name":"Balance"},
            {"Name":"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"Amount","Value":1.00}]}}}});
        assert_eq!(
            StkCallback::parse(&ok).unwrap().outcome,
            StkOutcome::Paid {
                receipt: "NLJ7RT61SV".into(),
                amount_cents: 100,
                phone: Some("254708374149".into())
            }
        );
        let cancelled = json!({"Body":{"stkCallback":{"MerchantRequestID":"1","CheckoutRequestID":"ws_CO_2",
            "ResultCode":1032,"ResultDesc":"Request cancelled by user"}}});
        assert!(matches!(
            StkCallback::parse(&cancelled).unwrap().outcome,
            StkOutcome::Failed { code: 1032, .. }
        ));
        let no_receipt = json!({"Body":{"stkCallback":{"CheckoutRequestID":"ws_CO_3","ResultCode":0,
            "CallbackMetadata":{"Item":[{"Name":"Amount","Value":1}]}}}});
        assert!(StkCallback::parse(&no_receipt).is_err());
    }
}
