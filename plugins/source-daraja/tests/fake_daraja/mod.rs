//! A local fake of Safaricom Daraja on 127.0.0.1 for the Daraja plugin's tests, following the
//! documented shapes (research/apis.md §1.i): OAuth with Basic auth (every new token
//! invalidates the previous one), the Bearer check with its error envelope, C2B URL
//! registration (optionally one-shot, like production), STK push with the password check and
//! field limits, and the STK status query (HTTP 500 "being processed" until an outcome is
//! scripted). Callbacks are delivered by the tests themselves with [`post`], using the
//! documented bodies built here. Also included by `gateway/tests/daraja.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post as route_post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub const SHORTCODE: &str = "174379";
pub const KEY: &str = "test-consumer-key";
pub const SECRET: &str = "test-consumer-secret";
/// The public sandbox passkey.
pub const PASSKEY: &str = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919";
pub const CALLBACK_TOKEN: &str = "3f9c2a7d41b8e6f0a5d2c8b1e7f4a9d3";

#[derive(Default)]
pub struct Recorded {
    /// Every request: (method and path, JSON body or Null).
    pub requests: Vec<(String, Value)>,
    pub tokens_issued: u32,
    pub current_token: Option<String>,
    pub registered: bool,
    /// Production behaviour: a second registration says "already registered".
    pub one_shot_registration: bool,
    pub pushes: Vec<Value>,
    /// CheckoutRequestID → (ResultCode, ResultDesc) the status query reports.
    pub outcomes: HashMap<String, (i64, String)>,
}

pub struct FakeDaraja {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Recorded>>,
    _runtime: tokio::runtime::Runtime,
}

type Shared = Arc<Mutex<Recorded>>;

fn envelope(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"requestId": "fake-1234-5678", "errorCode": code, "errorMessage": message});
    (status, Json(body)).into_response()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                A[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Recorded> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn oauth(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    lock(&s)
        .requests
        .push(("GET /oauth/v1/generate".into(), Value::Null));
    if q.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.008.02",
            "Invalid grant type passed",
        );
    }
    let expected = format!("Basic {}", base64(format!("{KEY}:{SECRET}").as_bytes()));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.008.01",
            "Invalid authentication type passed",
        );
    }
    let mut r = lock(&s);
    r.tokens_issued += 1;
    let token = format!("fake-token-{}", r.tokens_issued);
    // Each request invalidates the previous token (Daraja FAQ).
    r.current_token = Some(token.clone());
    Json(json!({"access_token": token, "expires_in": "3599"})).into_response()
}

/// The Bearer check every product API does: the refusal, when the token is not the current one.
fn unauthorised(s: &Shared, headers: &HeaderMap, path: &str, body: &Value) -> Option<Response> {
    let mut r = lock(s);
    r.requests.push((format!("POST {path}"), body.clone()));
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match (&r.current_token, bearer) {
        (Some(t), Some(b)) if t == b => None,
        _ => Some(envelope(
            StatusCode::NOT_FOUND,
            "404.001.03",
            "Invalid Access Token",
        )),
    }
}

const FORBIDDEN: [&str; 8] = [
    "m-pesa",
    "mpesa",
    "safaricom",
    "exe",
    "exec",
    "cmd",
    "sql",
    "query",
];

async fn register(
    State(s): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = unauthorised(&s, &headers, uri.path(), &body) {
        return r;
    }
    let rt = body["ResponseType"].as_str().unwrap_or("");
    if rt != "Completed" && rt != "Cancelled" {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.002.05",
            "Invalid Request Payload",
        );
    }
    for k in ["ConfirmationURL", "ValidationURL"] {
        let url = body[k].as_str().unwrap_or("").to_ascii_lowercase();
        if url.is_empty() || FORBIDDEN.iter().any(|w| url.contains(w)) {
            return envelope(
                StatusCode::BAD_REQUEST,
                "400.002.05",
                "Invalid Request Payload",
            );
        }
    }
    let mut r = lock(&s);
    if r.registered && r.one_shot_registration {
        return envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500.003.1001",
            "Urls are already registered",
        );
    }
    r.registered = true;
    Json(
        json!({"OriginatorCoversationID": "6e86-45dd-91ac-fd5d4178ab523408729",
        "ResponseCode": "0", "ResponseDescription": "Success"}),
    )
    .into_response()
}

async fn stk_push(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = unauthorised(&s, &headers, "/mpesa/stkpush/v1/processrequest", &body) {
        return r;
    }
    let text = |k: &str| body[k].as_str().unwrap_or("").to_string();
    let expected = base64(
        format!(
            "{}{PASSKEY}{}",
            text("BusinessShortCode"),
            text("Timestamp")
        )
        .as_bytes(),
    );
    if text("Password") != expected || text("Timestamp").len() != 14 {
        return envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500.001.1001",
            "Wrong credentials",
        );
    }
    if text("AccountReference").len() > 12 || text("AccountReference").is_empty() {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.002.02",
            "Bad Request - Invalid AccountReference",
        );
    }
    if text("TransactionDesc").len() > 13 {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.002.02",
            "Bad Request - Invalid TransactionDesc",
        );
    }
    if !text("PhoneNumber").starts_with("254") || text("PhoneNumber").len() != 12 {
        return envelope(
            StatusCode::BAD_REQUEST,
            "400.002.02",
            "Bad Request - Invalid PhoneNumber",
        );
    }
    let mut r = lock(&s);
    r.pushes.push(body.clone());
    let n = r.pushes.len();
    Json(json!({
        "MerchantRequestID": format!("2654-4b64-97ff-{n}"),
        "CheckoutRequestID": format!("ws_CO_1007202409152617{n:06}"),
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing"
    }))
    .into_response()
}

async fn stk_query(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = unauthorised(&s, &headers, "/mpesa/stkpushquery/v1/query", &body) {
        return r;
    }
    let id = body["CheckoutRequestID"].as_str().unwrap_or("").to_string();
    let r = lock(&s);
    match r.outcomes.get(&id) {
        None => envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "500.001.1001",
            "The transaction is being processed",
        ),
        Some((code, desc)) => Json(json!({
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successfully",
            "MerchantRequestID": "2654-4b64-97ff-1",
            "CheckoutRequestID": id,
            "ResultCode": code.to_string(),
            "ResultDesc": desc
        }))
        .into_response(),
    }
}

impl FakeDaraja {
    pub fn start() -> FakeDaraja {
        let state: Shared = Arc::default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake Daraja runtime");
        let app = Router::new()
            .route("/oauth/v1/generate", get(oauth))
            .route("/mpesa/c2b/v1/registerurl", route_post(register))
            .route("/mpesa/c2b/v2/registerurl", route_post(register))
            .route("/mpesa/stkpush/v1/processrequest", route_post(stk_push))
            .route("/mpesa/stkpushquery/v1/query", route_post(stk_query))
            .with_state(state.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake Daraja");
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        FakeDaraja {
            addr,
            state,
            _runtime: runtime,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        lock(&self.state)
    }

    /// How many requests went to a path ("POST /mpesa/…" or "GET /oauth/v1/generate").
    pub fn count(&self, what: &str) -> usize {
        self.recorded()
            .requests
            .iter()
            .filter(|(p, _)| p == what)
            .count()
    }

    /// Scripts what the status query says about a push.
    pub fn settle(&self, checkout_id: &str, code: i64, desc: &str) {
        self.recorded()
            .outcomes
            .insert(checkout_id.to_string(), (code, desc.to_string()));
    }

    /// Invalidates the current token, as a newer token minted elsewhere would.
    pub fn revoke_token(&self) {
        self.recorded().current_token = Some("minted-by-someone-else".into());
    }
}

/// A C2B validation/confirmation body as Daraja sends it (all values strings).
pub fn c2b_body(trans_id: &str, amount: &str, account: &str, confirmation: bool) -> Value {
    json!({
        "TransactionType": "Pay Bill",
        "TransID": trans_id,
        "TransTime": "20191122063845",
        "TransAmount": amount,
        "BusinessShortCode": SHORTCODE,
        "BillRefNumber": account,
        "InvoiceNumber": "",
        "OrgAccountBalance": if confirmation { "25.00" } else { "" },
        "ThirdPartyTransID": "",
        "MSISDN": "94c392c311d522da950619227b3361752a42042db7e1e699b26e628305c68a88",
        "FirstName": "NICHOLAS",
        "MiddleName": "JOHN",
        "LastName": "SONGOK"
    })
}

/// A successful STK callback (numbers where Daraja sends numbers; items out of order).
pub fn stk_paid(checkout_id: &str, receipt: &str, amount: f64) -> Value {
    json!({"Body": {"stkCallback": {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "CallbackMetadata": {"Item": [
            {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"},
            {"Name": "TransactionDate", "Value": 20191219102115u64},
            {"Name": "PhoneNumber", "Value": 254708374149u64},
            {"Name": "Amount", "Value": amount}
        ]}
    }}})
}

/// A failed STK callback: no CallbackMetadata.
pub fn stk_failed(checkout_id: &str, code: i64, desc: &str) -> Value {
    json!({"Body": {"stkCallback": {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": desc
    }}})
}

/// The path of a callback endpoint under the right token.
pub fn path(tail: &str) -> String {
    format!("/daraja/{CALLBACK_TOKEN}/{tail}")
}

/// One HTTP/1.1 request with a raw body; returns the status and the body (JSON when it is).
pub fn post_raw(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    post_with_headers(
        addr,
        path,
        &format!("Content-Type: {content_type}\r\n"),
        body,
    )
}

/// A JSON POST with `Authorization: Bearer {token}` (the `stkpush` token).
pub fn post_bearer(addr: SocketAddr, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let headers = format!("Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n");
    post_with_headers(addr, path, &headers, body.to_string().as_bytes())
}

/// `headers`: complete header lines, each ending in CRLF.
fn post_with_headers(addr: SocketAddr, path: &str, headers: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect to the plugin");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A peer may answer (413) and close before reading everything.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, json)
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    post_raw(addr, path, "application/json", body.to_string().as_bytes())
}

/// Writes the plugin's secret files (mode 0600) into `dir` and returns the `[source.config]`.
pub fn plugin_config(dir: &std::path::Path, daraja: &FakeDaraja, listen: SocketAddr) -> Value {
    use std::os::unix::fs::PermissionsExt;
    let secret = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    json!({
        "listen": listen.to_string(),
        "base_url": daraja.base_url(),
        "shortcode": SHORTCODE,
        "consumer_key_file": secret("consumer_key", KEY),
        "consumer_secret_file": secret("consumer_secret", SECRET),
        "passkey_file": secret("passkey", PASSKEY),
        "callback_base_url": "https://gw.example.org",
        "callback_token_file": secret("callback_token", CALLBACK_TOKEN),
        "stk_query_after_secs": 0,
        "stk_query_interval_secs": 1,
        // The tests play Safaricom from loopback; the default is Safaricom's addresses.
        "allowed_ips": ["127.0.0.1"],
    })
}
