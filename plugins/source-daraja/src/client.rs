//! The Daraja API as this plugin uses it: the OAuth token (one owner, cached: every new token
//! invalidates the previous one), C2B URL registration, STK push and the STK status query.
//! Blocking (`ureq`); called from the plugin's own blocking threads only.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umeme_plugin_sdk::untrusted::Untrusted;

use crate::config::Settings;
use crate::wire;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Transport failure or an answer that is not Daraja's JSON.
    Unreachable(String),
    /// Daraja's error envelope (`errorCode`, `errorMessage`) or another HTTP error.
    Refused {
        status: u16,
        code: String,
        message: String,
        body: Value,
    },
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Unreachable(e) => write!(f, "Daraja unreachable: {}", Untrusted(e)),
            ApiError::Refused {
                status,
                code,
                message,
                ..
            } => write!(
                f,
                "Daraja refused (HTTP {status}) {}: {}",
                Untrusted(code),
                Untrusted(message)
            ),
        }
    }
}

struct Token {
    value: String,
    good_until: Instant,
}

pub struct Daraja {
    agent: ureq::Agent,
    base_url: String,
    basic: String,
    /// Held while a token is fetched, so concurrent callers never mint two.
    token: Mutex<Option<Token>>,
}

/// What an STK status query said.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryAnswer {
    /// Still waiting for the customer (Daraja's HTTP 500 "being processed").
    Pending,
    Settled {
        code: i64,
        desc: String,
    },
}

fn is_invalid_token(code: &str) -> bool {
    matches!(code, "404.001.03" | "400.003.01")
}

impl Daraja {
    pub fn new(s: &Settings) -> Daraja {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(s.http_timeout))
            .http_status_as_error(false)
            .user_agent("umeme-source-daraja")
            .build()
            .into();
        Daraja {
            agent,
            base_url: s.base_url.clone(),
            basic: wire::base64(
                format!("{}:{}", s.secrets.consumer_key, s.secrets.consumer_secret).as_bytes(),
            ),
            token: Mutex::new(None),
        }
    }

    fn read(
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value), ApiError> {
        let mut resp = resp.map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(256 * 1024)
            .read_to_string()
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let body: Value = serde_json::from_str(&text).map_err(|_| {
            // An HTML gateway page is not an answer (research/apis.md §1.g.9).
            ApiError::Unreachable(format!(
                "HTTP {status}, not JSON: {}",
                text.chars().take(120).collect::<String>()
            ))
        })?;
        Ok((status, body))
    }

    fn refused(status: u16, body: Value) -> ApiError {
        let text = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        ApiError::Refused {
            status,
            code: text("errorCode"),
            message: text("errorMessage"),
            body,
        }
    }

    /// A valid access token, fetched when none is cached or it is about to expire.
    fn token(&self, renew: bool) -> Result<String, ApiError> {
        let mut slot = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = slot
            .as_ref()
            .filter(|t| !renew && Instant::now() < t.good_until)
        {
            return Ok(t.value.clone());
        }
        *slot = None;
        let url = format!(
            "{}/oauth/v1/generate?grant_type=client_credentials",
            self.base_url
        );
        let resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Basic {}", self.basic))
            .call();
        let (status, body) = Self::read(resp)?;
        let value = body.get("access_token").and_then(Value::as_str);
        let (true, Some(value)) = (status == 200, value) else {
            return Err(Self::refused(status, body));
        };
        // `expires_in` is a string in the real API and a number on one docs page.
        let secs = match body.get("expires_in") {
            Some(Value::String(s)) => s.parse().unwrap_or(3599),
            Some(Value::Number(n)) => n.as_u64().unwrap_or(3599),
            _ => 3599,
        };
        // Renew five minutes early (at most halfway through a short lifetime).
        let margin = (secs / 2).min(300);
        *slot = Some(Token {
            value: value.to_string(),
            good_until: Instant::now() + Duration::from_secs(secs - margin),
        });
        log::info!("Daraja access token obtained, valid {secs} s");
        Ok(value.to_string())
    }

    /// POSTs a product API call; an "invalid token" answer renews the token and retries once.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), ApiError> {
        let url = format!("{}{path}", self.base_url);
        let payload = body.to_string();
        for attempt in 0..2 {
            let token = self.token(attempt > 0)?;
            let resp = self
                .agent
                .post(&url)
                .header("Authorization", &format!("Bearer {token}"))
                .content_type("application/json")
                .send(payload.as_str());
            let (status, answer) = Self::read(resp)?;
            let code = answer
                .get("errorCode")
                .and_then(Value::as_str)
                .unwrap_or("");
            if is_invalid_token(code) && attempt == 0 {
                log::warn!("Daraja says the access token is invalid ({code}); renewing it");
                continue;
            }
            return Ok((status, answer));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Registers the C2B URLs; "already registered" counts as done.
    pub fn register_urls(&self, s: &Settings) -> Result<(), ApiError> {
        let body = json!({
            "ShortCode": s.shortcode,
            "ResponseType": s.response_type,
            "ConfirmationURL": s.confirmation_url,
            "ValidationURL": s.validation_url,
        });
        let (status, answer) = self.post(&s.register_path, &body)?;
        if status == 200 && answer.get("ResponseCode").and_then(Value::as_str) == Some("0") {
            return Ok(());
        }
        let err = Self::refused(status, answer);
        if let ApiError::Refused { message, .. } = &err {
            if message.to_ascii_lowercase().contains("already registered") {
                log::info!(
                    "C2B URLs are already registered with Safaricom for {}",
                    s.shortcode
                );
                return Ok(());
            }
        }
        Err(err)
    }

    fn password(s: &Settings) -> Result<(String, String), ApiError> {
        let passkey = s.secrets.passkey.as_deref().ok_or_else(|| {
            ApiError::Unreachable("no passkey_file configured; STK push is off".into())
        })?;
        let timestamp = wire::eat_timestamp(wire::now_unix());
        Ok((
            wire::stk_password(&s.shortcode, passkey, &timestamp),
            timestamp,
        ))
    }

    /// Starts an STK push; returns Daraja's answer (with the CheckoutRequestID).
    pub fn stk_push(
        &self,
        s: &Settings,
        phone: &str,
        amount_kes: i64,
        account: &str,
    ) -> Result<Value, ApiError> {
        if account.chars().count() > wire::ACCOUNT_REFERENCE_MAX {
            // Cutting it would credit whichever meter the cut number names.
            return Err(ApiError::Unreachable(format!(
                "account {account} is longer than {} characters; not sent",
                wire::ACCOUNT_REFERENCE_MAX
            )));
        }
        let (password, timestamp) = Self::password(s)?;
        let body = json!({
            "BusinessShortCode": s.shortcode,
            "Password": password,
            "Timestamp": timestamp,
            "TransactionType": s.transaction_type,
            "Amount": amount_kes.to_string(),
            "PartyA": phone,
            "PartyB": s.party_b,
            "PhoneNumber": phone,
            "CallBackURL": s.stk_callback_url,
            "AccountReference": account,
            "TransactionDesc": "Umeme units",
        });
        let (status, answer) = self.post("/mpesa/stkpush/v1/processrequest", &body)?;
        let accepted = answer.get("ResponseCode").and_then(Value::as_str) == Some("0");
        if status == 200 && accepted && wire::checkout_id(answer.get("CheckoutRequestID")).is_ok() {
            Ok(answer)
        } else {
            Err(Self::refused(status, answer))
        }
    }

    /// Asks Daraja how a push ended.
    pub fn stk_query(&self, s: &Settings, checkout_id: &str) -> Result<QueryAnswer, ApiError> {
        let (password, timestamp) = Self::password(s)?;
        let body = json!({
            "BusinessShortCode": s.shortcode,
            "Password": password,
            "Timestamp": timestamp,
            "CheckoutRequestID": checkout_id,
        });
        let (status, answer) = self.post("/mpesa/stkpushquery/v1/query", &body)?;
        if status == 200 {
            if let Ok(code) = wire::result_code(answer.get("ResultCode")) {
                let desc = answer
                    .get("ResultDesc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                return Ok(QueryAnswer::Settled { code, desc });
            }
        }
        let message = answer
            .get("errorMessage")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        if message.contains("being processed") {
            return Ok(QueryAnswer::Pending);
        }
        Err(Self::refused(status, answer))
    }
}
