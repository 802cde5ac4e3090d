//! The `[source.config]` table (contract §8.2) and the settings checked out of it at `create`:
//! secrets read from their files, callback URLs built and checked against the words Daraja
//! refuses. Nothing here contacts Safaricom.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use umeme_http_guard::Limits;

use crate::wire;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8090))
}
fn default_base_url() -> String {
    "https://sandbox.safaricom.co.ke".into()
}
fn default_register_version() -> String {
    "v1".into()
}
fn default_response_type() -> String {
    "Completed".into()
}
fn default_transaction_type() -> String {
    "CustomerPayBillOnline".into()
}
fn default_max_body() -> usize {
    16 * 1024
}
fn default_validation_timeout_ms() -> u64 {
    5_000
}
fn default_http_timeout_secs() -> u64 {
    30
}
fn default_query_after() -> u64 {
    60
}
fn default_query_interval() -> u64 {
    30
}
fn default_query_attempts() -> u32 {
    20
}
fn default_max_pending() -> usize {
    500
}
fn default_header_timeout_ms() -> u64 {
    Limits::DEFAULT_HEADER_TIMEOUT.as_millis() as u64
}
fn default_request_timeout_ms() -> u64 {
    60_000
}
fn default_max_connections() -> usize {
    umeme_http_guard::PLUGIN_MAX_CONNECTIONS
}
fn default_max_connections_per_ip() -> usize {
    Limits::DEFAULT_MAX_CONNECTIONS_PER_IP
}

/// Safaricom's callback (egress) addresses: the list Safaricom gives integrators for
/// allow-listing, as published in its go-live notes and repeated by the Daraja SDKs (pesafy
/// `SAFARICOM_IPS`, mpesakit `is_mpesa_ip_allowed`, daraja-mcp). It changes now and then:
/// widen it in the config, or turn the check off with `allowed_ips = ["any"]` (dangerous).
pub const SAFARICOM_CALLBACK_IPS: [&str; 12] = [
    "196.201.214.200",
    "196.201.214.206",
    "196.201.213.114",
    "196.201.214.207",
    "196.201.214.208",
    "196.201.213.44",
    "196.201.212.127",
    "196.201.212.138",
    "196.201.212.129",
    "196.201.212.136",
    "196.201.212.74",
    "196.201.212.69",
];

fn default_allowed_ips() -> Vec<String> {
    SAFARICOM_CALLBACK_IPS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The `allowed_ips` word that turns the source-address check off.
const ANY_ADDRESS: &str = "any";

/// `allowed_ips` checked: `None` is the explicit `["any"]`.
fn allowed_ips(list: &[String]) -> Result<Option<Vec<IpAddr>>, String> {
    if list.iter().any(|s| s == ANY_ADDRESS) {
        if list.len() > 1 {
            return Err(format!(
                "allowed_ips: \"{ANY_ADDRESS}\" turns the check off and cannot be mixed with addresses"
            ));
        }
        return Ok(None);
    }
    if list.is_empty() {
        return Err(format!(
            "allowed_ips is empty, which would refuse every callback; list Safaricom's addresses, or [\"{ANY_ADDRESS}\"] to accept any address (dangerous: anyone who learns the callback token can then post payments)"
        ));
    }
    list.iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| {
                    format!("allowed_ips: {s:?} is not an IP address (or \"{ANY_ADDRESS}\")")
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The plugin's own HTTP listener (callbacks and the STK push endpoint).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `https://sandbox.safaricom.co.ke` or `https://api.safaricom.co.ke`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The PayBill (or till) number; `BusinessShortCode` of pushes and registrations.
    pub shortcode: String,
    pub consumer_key_file: PathBuf,
    pub consumer_secret_file: PathBuf,
    /// Needed for STK push; without it `/stkpush` answers 503.
    #[serde(default)]
    pub passkey_file: Option<PathBuf>,
    /// The public URL Safaricom calls, without the `/daraja/…` part.
    pub callback_base_url: String,
    pub callback_token_file: PathBuf,
    /// A token of its own for `/stkpush` (`Authorization: Bearer …`). The callback token is in
    /// every URL Safaricom and any proxy sees, so it should not be what starts a payment prompt.
    #[serde(default)]
    pub stkpush_token_file: Option<PathBuf>,
    #[serde(default)]
    pub register_urls: bool,
    /// `v1` or `v2`: which `registerurl` path (apisupport has moved integrators both ways).
    #[serde(default = "default_register_version")]
    pub register_url_version: String,
    /// What M-Pesa does when the validation URL does not answer in time.
    #[serde(default = "default_response_type")]
    pub response_type: String,
    /// Source addresses allowed to call the callback endpoints: Safaricom's by default,
    /// `["any"]` to turn the check off.
    #[serde(default = "default_allowed_ips")]
    pub allowed_ips: Vec<String>,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// `CustomerPayBillOnline` or `CustomerBuyGoodsOnline`.
    #[serde(default = "default_transaction_type")]
    pub transaction_type: String,
    /// PartyB of pushes: the till for Buy Goods; the shortcode by default.
    #[serde(default)]
    pub party_b: Option<String>,
    /// Budget for answering a validation (Daraja waits about 8 s).
    #[serde(default = "default_validation_timeout_ms")]
    pub validation_timeout_ms: u64,
    #[serde(default = "default_http_timeout_secs")]
    pub http_timeout_secs: u64,
    /// A push whose callback has not come after this long is settled with the status query.
    #[serde(default = "default_query_after")]
    pub stk_query_after_secs: u64,
    #[serde(default = "default_query_interval")]
    pub stk_query_interval_secs: u64,
    /// After this many inconclusive queries a push is given up (logged for reconciliation).
    #[serde(default = "default_query_attempts")]
    pub stk_query_max_attempts: u32,
    /// Pushes waiting for their outcome at most; more are refused with 503.
    #[serde(default = "default_max_pending")]
    pub max_pending_pushes: usize,
    /// The listener's limits (the shared HTTP guard): time for a request's headers (also the
    /// keep-alive idle time), for a whole request, and open connections in all and per address.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
}

/// Secrets, read once at `create`.
pub struct Secrets {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub passkey: Option<String>,
    pub callback_token: String,
    /// `/stkpush` needs it as a bearer token when set.
    pub stkpush_token: Option<String>,
}

/// A checked configuration.
pub struct Settings {
    pub listen: SocketAddr,
    pub base_url: String,
    pub shortcode: String,
    pub secrets: Secrets,
    pub validation_url: String,
    pub confirmation_url: String,
    pub stk_callback_url: String,
    pub register_urls: bool,
    pub register_path: String,
    pub response_type: String,
    /// `None`: any address (the operator's explicit `["any"]`).
    pub allowed_ips: Option<Vec<IpAddr>>,
    pub max_body_bytes: usize,
    pub transaction_type: String,
    pub party_b: String,
    pub validation_timeout: Duration,
    pub http_timeout: Duration,
    pub query_after: Duration,
    pub query_interval: Duration,
    pub query_max_attempts: u32,
    pub max_pending: usize,
    pub limits: Limits,
}

/// Reads a secret file with the SDK's checks (mode, no symlink, size), like every plugin.
fn read_secret(key: &str, path: &Path) -> Result<String, String> {
    umeme_plugin_sdk::read_secret_file(path).map_err(|e| format!("{key}: {e}"))
}

fn http_url(key: &str, url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("https://") || url.starts_with("http://"))
        || url.contains(char::is_whitespace)
    {
        return Err(format!("{key} {url:?} is not an http(s) URL"));
    }
    Ok(url.to_string())
}

impl Settings {
    pub fn from_config(c: Config) -> Result<Settings, String> {
        let base_url = http_url("base_url", &c.base_url)?;
        let callback_base = http_url("callback_base_url", &c.callback_base_url)?;
        if !callback_base.starts_with("https://") {
            log::warn!(
                "callback_base_url {callback_base} is not https; Safaricom production refuses it"
            );
        }
        if c.shortcode.is_empty() || !c.shortcode.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("shortcode {:?} is not a number", c.shortcode));
        }
        let register_path = match c.register_url_version.as_str() {
            "v1" | "v2" => format!("/mpesa/c2b/{}/registerurl", c.register_url_version),
            other => {
                return Err(format!(
                    "register_url_version {other:?}: expected \"v1\" or \"v2\""
                ))
            }
        };
        if !matches!(c.response_type.as_str(), "Completed" | "Cancelled") {
            return Err(format!(
                "response_type {:?}: expected \"Completed\" or \"Cancelled\" (exact spelling)",
                c.response_type
            ));
        }
        if !matches!(
            c.transaction_type.as_str(),
            "CustomerPayBillOnline" | "CustomerBuyGoodsOnline"
        ) {
            return Err(format!(
                "transaction_type {:?}: expected CustomerPayBillOnline or CustomerBuyGoodsOnline",
                c.transaction_type
            ));
        }
        if !(256..=1024 * 1024).contains(&c.max_body_bytes) {
            return Err("max_body_bytes must be between 256 and 1048576".into());
        }
        if !(100..=7_500).contains(&c.validation_timeout_ms) {
            return Err(
                "validation_timeout_ms must be between 100 and 7500 (Daraja waits ~8 s)".into(),
            );
        }
        if !(100..=10_000).contains(&c.header_timeout_ms) {
            return Err("header_timeout_ms must be between 100 and 10000".into());
        }
        // A push waits for Safaricom for up to http_timeout_secs inside its request.
        let min_request_ms = c
            .http_timeout_secs
            .saturating_mul(1000)
            .saturating_add(5_000);
        if !(min_request_ms..=600_000).contains(&c.request_timeout_ms) {
            return Err(format!(
                "request_timeout_ms must be between {min_request_ms} (http_timeout_secs + 5 s) and 600000"
            ));
        }
        let max = umeme_http_guard::PLUGIN_MAX_CONNECTIONS;
        if !(1..=max).contains(&c.max_connections)
            || !(1..=c.max_connections).contains(&c.max_connections_per_ip)
        {
            return Err(format!("max_connections must be between 1 and {max} (the gateway's descriptor budget counts {max} per source), max_connections_per_ip between 1 and max_connections"));
        }
        if c.stk_query_interval_secs == 0 || c.http_timeout_secs == 0 || c.max_pending_pushes == 0 {
            return Err("stk_query_interval_secs, http_timeout_secs and max_pending_pushes must be positive".into());
        }
        let allowed_ips = allowed_ips(&c.allowed_ips)?;
        if allowed_ips.is_none() {
            log::warn!(
                "allowed_ips = [\"any\"]: callbacks are accepted from every address; the callback token is the only guard"
            );
        }
        let secrets = Secrets {
            consumer_key: read_secret("consumer_key_file", &c.consumer_key_file)?,
            consumer_secret: read_secret("consumer_secret_file", &c.consumer_secret_file)?,
            passkey: c
                .passkey_file
                .as_deref()
                .map(|p| read_secret("passkey_file", p))
                .transpose()?,
            callback_token: read_secret("callback_token_file", &c.callback_token_file)?,
            stkpush_token: c
                .stkpush_token_file
                .as_deref()
                .map(|p| read_secret("stkpush_token_file", p))
                .transpose()?,
        };
        let token = &secrets.callback_token;
        if token.len() < 16
            || token.len() > 128
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "callback_token_file {}: the token must be 16 to 128 characters of A-Z a-z 0-9 _ - (e.g. `openssl rand -hex 32`)",
                c.callback_token_file.display()
            ));
        }
        match &secrets.stkpush_token {
            Some(t) if t.len() < 16 || t.len() > 128 || t.bytes().any(|b| !b.is_ascii_graphic()) => {
                return Err(format!(
                    "stkpush_token_file {}: the token must be 16 to 128 printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)",
                    c.stkpush_token_file.as_deref().unwrap_or(Path::new("")).display()
                ));
            }
            Some(t) if t == token => {
                return Err("stkpush_token_file holds the callback token; it must be another one (the callback token is in the URLs Safaricom and proxies see)".into());
            }
            Some(_) => {}
            None if secrets.passkey.is_some() => log::warn!(
                "no stkpush_token_file: /stkpush is guarded only by the callback token, which Safaricom and every proxy in front of the listener see; anyone holding it can prompt phones to pay for a meter of their choosing"
            ),
            None => {}
        }
        let url = |tail: &str| format!("{callback_base}/daraja/{token}/{tail}");
        let settings = Settings {
            listen: c.listen,
            base_url,
            validation_url: url("c2b/validation"),
            confirmation_url: url("c2b/confirmation"),
            stk_callback_url: url("stk/callback"),
            party_b: c.party_b.unwrap_or_else(|| c.shortcode.clone()),
            shortcode: c.shortcode,
            secrets,
            register_urls: c.register_urls,
            register_path,
            response_type: c.response_type,
            allowed_ips,
            max_body_bytes: c.max_body_bytes,
            transaction_type: c.transaction_type,
            validation_timeout: Duration::from_millis(c.validation_timeout_ms),
            http_timeout: Duration::from_secs(c.http_timeout_secs),
            query_after: Duration::from_secs(c.stk_query_after_secs),
            query_interval: Duration::from_secs(c.stk_query_interval_secs),
            query_max_attempts: c.stk_query_max_attempts,
            max_pending: c.max_pending_pushes,
            limits: Limits {
                header_timeout: Duration::from_millis(c.header_timeout_ms),
                request_timeout: Duration::from_millis(c.request_timeout_ms),
                max_connections: c.max_connections,
                max_connections_per_ip: c.max_connections_per_ip,
            },
        };
        for u in [
            &settings.validation_url,
            &settings.confirmation_url,
            &settings.stk_callback_url,
        ] {
            if let Some(word) = wire::forbidden_word(u) {
                // Say where without printing the secret token.
                let place = if wire::forbidden_word(&callback_base).is_some() {
                    "callback_base_url"
                } else {
                    "the callback token"
                };
                return Err(format!(
                    "{place} contains {word:?}, which Daraja refuses in callback URLs"
                ));
            }
        }
        Ok(settings)
    }
}
