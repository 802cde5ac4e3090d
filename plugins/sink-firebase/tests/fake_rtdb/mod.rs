//! A local stand-in for the Firebase Realtime Database REST API and Google's OAuth2 token
//! endpoint, following research/apis.md §2 (test code only).
//!
//! - `/<path>.json`: GET, PUT, PATCH (multi-path keys at any level), POST (push ids), DELETE;
//!   `print=silent` → 204; writing `null` or `{}` removes a node and empty parents vanish;
//!   invalid keys or overlapping PATCH paths → 400; errors as `{"error": …}`.
//! - Queries on GET: `orderBy="child"&equalTo=<JSON value>` answers the matching children
//!   (`{}` when none), and 400 `Index not defined, …` unless `indexes` has (path, child), as
//!   the real database does without `.indexOn` in its rules; `orderBy="$key"` needs no index.
//! - Auth: `Authorization: Bearer <token>` or `?access_token=` with a token this fake issued and
//!   has not revoked, or `?auth=<secret>`; anything else → 401 `Permission denied`.
//! - `POST /token`: the JWT-bearer grant; the RS256 signature is verified with the test public
//!   key, and `iss`, `aud`, `scope`, `iat`/`exp` are checked.
//! - Faults, consumed one per database request: an HTTP status (with `Retry-After`), a hang
//!   until the client gives up, a dropped connection (before or after applying the write),
//!   revoking every issued token, or a 400 for any write mentioning a marker.
//!
//! One request per connection (`Connection: close`); a thread per connection.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
pub enum Fault {
    Status(u16, Option<u64>),
    /// Read the request, never answer; wait for the client to close (bounded).
    Hang,
    /// Close without an answer, before applying the request.
    Drop,
    /// Apply the request, then close without an answer (an ambiguous write).
    DropAfterWrite,
    /// Revoke every issued token, then serve the request (which then fails with 401).
    RevokeTokens,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
}

#[derive(Default)]
pub struct State {
    pub tree: Value,
    pub secret: Option<String>,
    /// PKCS#1 DER of the service account's public key.
    pub public_key: Option<Vec<u8>>,
    pub client_email: String,
    pub token_lifetime_secs: u64,
    pub tokens: HashMap<String, bool>,
    pub tokens_issued: u32,
    pub faults: VecDeque<Fault>,
    pub token_faults: VecDeque<Fault>,
    /// Writes whose body contains this are refused with 400 (data the database will not take).
    pub refuse_marker: Option<String>,
    pub requests: Vec<Request>,
    pub push_counter: u64,
    /// `.indexOn` rules: (path without slashes, e.g. `users`; child, e.g. `meter_no`).
    pub indexes: Vec<(String, String)>,
}

pub struct FakeRtdb {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl FakeRtdb {
    pub fn start(state: State) -> FakeRtdb {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake database");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            token_lifetime_secs: if state.token_lifetime_secs == 0 {
                3599
            } else {
                state.token_lifetime_secs
            },
            ..state
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || serve(conn, &state, addr));
                }
            })
        };
        FakeRtdb {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn tree(&self) -> Value {
        self.state().tree.clone()
    }

    pub fn fault(&self, f: Fault) {
        self.state().faults.push_back(f);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }
}

impl Drop for FakeRtdb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Http {
    method: String,
    path: String,
    query: HashMap<String, String>,
    raw_query: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> Option<Http> {
    let mut r = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(16 << 20)];
    r.read_exact(&mut body).ok()?;
    let (path, raw_query) = target.split_once('?').unwrap_or((&target, ""));
    let query = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Http {
        method,
        path: path.to_string(),
        query,
        raw_query: raw_query.to_string(),
        headers,
        body,
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(conn: &mut TcpStream, status: u16, body: &str, extra: &[(&str, String)]) {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    let _ = conn.flush();
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, addr: SocketAddr) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let Some(req) = read_request(&conn) else {
        return;
    };
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let token_request = req.path == "/token";
    let fault = {
        let mut s = lock();
        if token_request {
            s.token_faults.pop_front()
        } else {
            s.faults.pop_front()
        }
    };
    let mut after_write_drop = false;
    match fault {
        Some(Fault::Status(code, after)) => {
            let extra: Vec<(&str, String)> = after
                .map(|a| ("Retry-After", a.to_string()))
                .into_iter()
                .collect();
            log(state, &req, code);
            return respond(
                &mut conn,
                code,
                "{\n  \"error\" : \"Service Unavailable\"\n}",
                &extra,
            );
        }
        Some(Fault::Hang) => {
            log(state, &req, 0);
            // The client gives up and closes; read returns then (bounded by the read timeout).
            let mut sink = [0u8; 64];
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        Some(Fault::Drop) => {
            log(state, &req, 0);
            return;
        }
        Some(Fault::DropAfterWrite) => after_write_drop = true,
        Some(Fault::RevokeTokens) => {
            let mut s = lock();
            for valid in s.tokens.values_mut() {
                *valid = false;
            }
        }
        None => {}
    }
    let (status, body, extra) = if token_request {
        token(&req, &mut lock(), addr)
    } else {
        database(&req, &mut lock())
    };
    log(state, &req, status);
    if after_write_drop {
        return;
    }
    respond(&mut conn, status, &body, &extra);
}

fn log(state: &Mutex<State>, req: &Http, status: u16) {
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .requests
        .push(Request {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.raw_query.clone(),
            status,
        });
}

type Answer = (u16, String, Vec<(&'static str, String)>);

fn error(status: u16, msg: &str) -> Answer {
    (status, json!({"error": msg}).to_string(), Vec::new())
}

fn token(req: &Http, s: &mut State, addr: SocketAddr) -> Answer {
    let bad = |d: &str| {
        (
            400,
            json!({"error": "invalid_grant", "error_description": d}).to_string(),
            Vec::new(),
        )
    };
    if req.method != "POST" {
        return error(404, "not found");
    }
    let form: HashMap<String, String> = String::from_utf8_lossy(&req.body)
        .split('&')
        .filter_map(|p| p.split_once('=').map(|(k, v)| (decode(k), decode(v))))
        .collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return bad("Invalid grant_type");
    }
    let Some(jwt) = form.get("assertion") else {
        return bad("No assertion");
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return bad("Invalid JWT");
    }
    let (Ok(header), Ok(claims), Ok(sig)) = (
        URL_SAFE_NO_PAD.decode(parts[0]),
        URL_SAFE_NO_PAD.decode(parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]),
    ) else {
        return bad("Invalid JWT encoding");
    };
    let Some(key) = s.public_key.clone() else {
        return bad("No key configured");
    };
    let signed = format!("{}.{}", parts[0], parts[1]);
    let verified =
        ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
            .verify(signed.as_bytes(), &sig);
    if verified.is_err() {
        return bad("Invalid JWT Signature.");
    }
    let header: Value = serde_json::from_slice(&header).unwrap_or_default();
    let claims: Value = serde_json::from_slice(&claims).unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    let scope = claims["scope"].as_str().unwrap_or("");
    if header["alg"] != "RS256"
        || claims["iss"] != s.client_email.as_str()
        || claims["aud"] != format!("http://{addr}/token").as_str()
        || !scope
            .split(' ')
            .any(|x| x == "https://www.googleapis.com/auth/firebase.database")
        || iat > now + 60
        || exp <= now
        || exp > iat + 3600
    {
        return bad("Invalid JWT: claims");
    }
    s.tokens_issued += 1;
    let token = format!("ya29.fake-{}", s.tokens_issued);
    s.tokens.insert(token.clone(), true);
    (
        200,
        json!({"access_token": token, "expires_in": s.token_lifetime_secs, "token_type": "Bearer"})
            .to_string(),
        Vec::new(),
    )
}

fn authorized(req: &Http, s: &State) -> bool {
    let bearer = req
        .headers
        .get("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string)
        .or_else(|| req.query.get("access_token").cloned());
    if let Some(t) = bearer {
        return s.tokens.get(&t).copied().unwrap_or(false);
    }
    matches!((&s.secret, req.query.get("auth")), (Some(a), Some(b)) if a == b)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 768
        && !k
            .chars()
            .any(|c| matches!(c, '.' | '$' | '#' | '[' | ']' | '/') || c.is_ascii_control())
}

fn segments(path: &str) -> Option<Vec<String>> {
    path.split('/')
        .filter(|p| !p.is_empty())
        .map(decode)
        .map(|k| valid_key(&k).then_some(k))
        .collect()
}

/// Every key in `v` is a valid database key.
fn valid_value(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().all(|(k, v)| valid_key(k) && valid_value(v)),
        Value::Array(a) => a.iter().all(valid_value),
        _ => true,
    }
}

fn database(req: &Http, s: &mut State) -> Answer {
    let Some(path) = req.path.strip_suffix(".json") else {
        return error(404, "Not Found: paths end in .json");
    };
    let Some(segs) = segments(path) else {
        return error(400, "Invalid path: Invalid token in path");
    };
    if !authorized(req, s) {
        return (
            401,
            "{\n  \"error\" : \"Permission denied\"\n}".to_string(),
            Vec::new(),
        );
    }
    let silent = req.query.get("print").map(String::as_str) == Some("silent");
    let body = || -> Result<Value, Answer> {
        let text = String::from_utf8_lossy(&req.body);
        if let Some(m) = &s.refuse_marker {
            if text.contains(m.as_str()) {
                return Err(error(400, "Invalid data; couldn't parse JSON object."));
            }
        }
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            error(
                400,
                "Invalid data; couldn't parse JSON object, array, or value.",
            )
        })?;
        // A PATCH's top-level keys are paths; everything below them must be plain keys.
        let checked = match (&v, req.method.as_str()) {
            (Value::Object(m), "PATCH") => m.values().all(valid_value),
            _ => valid_value(&v),
        };
        if !checked {
            return Err(error(
                400,
                "Invalid data; couldn't parse key beginning at 1:2",
            ));
        }
        Ok(v)
    };
    let written = |v: Value| -> Answer {
        if silent {
            (204, String::new(), Vec::new())
        } else {
            (200, v.to_string(), Vec::new())
        }
    };
    match req.method.as_str() {
        "GET" if req.query.contains_key("orderBy") => query(req, s, &segs),
        "GET" => {
            let v = get(&s.tree, &segs);
            if silent {
                (204, String::new(), Vec::new())
            } else {
                (200, v.to_string(), Vec::new())
            }
        }
        "PUT" => match body() {
            Ok(v) => {
                set(&mut s.tree, &segs, v.clone());
                written(v)
            }
            Err(e) => e,
        },
        "PATCH" => {
            let v = match body() {
                Ok(Value::Object(m)) => m,
                Ok(_) => return error(400, "Invalid data; couldn't parse JSON object."),
                Err(e) => return e,
            };
            let mut paths: Vec<Vec<String>> = Vec::new();
            for k in v.keys() {
                match segments(k) {
                    Some(p) if !p.is_empty() => paths.push(p),
                    _ => return error(400, "Invalid data; couldn't parse key beginning at 1:2"),
                }
            }
            for (i, a) in paths.iter().enumerate() {
                for b in &paths[i + 1..] {
                    let n = a.len().min(b.len());
                    if a[..n] == b[..n] {
                        return error(400, "Invalid data; paths overlap");
                    }
                }
            }
            for (p, value) in paths.into_iter().zip(v.values()) {
                let full: Vec<String> = segs.iter().cloned().chain(p).collect();
                set(&mut s.tree, &full, value.clone());
            }
            written(Value::Object(v))
        }
        "POST" => match body() {
            Ok(v) => {
                s.push_counter += 1;
                let id = format!("-Fake{:015}", s.push_counter);
                let full: Vec<String> = segs.iter().cloned().chain([id.clone()]).collect();
                set(&mut s.tree, &full, v);
                written(json!({ "name": id }))
            }
            Err(e) => e,
        },
        "DELETE" => {
            set(&mut s.tree, &segs, Value::Null);
            (200, "null".into(), Vec::new())
        }
        _ => error(405, "Method not allowed"),
    }
}

/// `orderBy`/`equalTo` on the children of `segs` (research/apis.md §2.2).
fn query(req: &Http, s: &State, segs: &[String]) -> Answer {
    let parse = |k: &str| -> Option<Value> { serde_json::from_str(req.query.get(k)?).ok() };
    let Some(Value::String(child)) = parse("orderBy") else {
        return error(400, "orderBy must be a valid JSON encoded path");
    };
    let path = segs.join("/");
    if child != "$key"
        && !s
            .indexes
            .iter()
            .any(|(p, c)| p.trim_matches('/') == path && *c == child)
    {
        return error(
            400,
            &format!(
                "Index not defined, add \".indexOn\": \"{child}\", for path \"/{path}\", to the rules"
            ),
        );
    }
    let wanted = parse("equalTo");
    let mut out = Map::new();
    if let Value::Object(children) = get(&s.tree, segs) {
        for (k, v) in children {
            let value = if child == "$key" {
                Value::String(k.clone())
            } else {
                v.get(child.as_str()).cloned().unwrap_or(Value::Null)
            };
            if wanted.as_ref().is_none_or(|w| *w == value) {
                out.insert(k, v);
            }
        }
    }
    (200, Value::Object(out).to_string(), Vec::new())
}

pub fn get(tree: &Value, path: &[String]) -> Value {
    let mut node = tree;
    for k in path {
        match node.get(k.as_str()) {
            Some(n) => node = n,
            None => return Value::Null,
        }
    }
    node.clone()
}

/// Sets `path` to `value`; null and empty objects remove the node, and empty parents vanish.
pub fn set(tree: &mut Value, path: &[String], value: Value) {
    let value = prune(value);
    let Some((first, rest)) = path.split_first() else {
        *tree = value;
        return;
    };
    if !tree.is_object() {
        if value.is_null() {
            return;
        }
        *tree = Value::Object(Map::new());
    }
    let map = tree.as_object_mut().unwrap();
    let child = map.entry(first.clone()).or_insert(Value::Null);
    set(child, rest, value);
    if child.is_null() {
        map.remove(first);
    }
    if map.is_empty() {
        *tree = Value::Null;
    }
}

fn prune(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let m: Map<String, Value> = m
                .into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !v.is_null())
                .collect();
            if m.is_empty() {
                Value::Null
            } else {
                Value::Object(m)
            }
        }
        other => other,
    }
}
