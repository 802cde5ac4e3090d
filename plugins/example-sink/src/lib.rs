//! An example umeme-gateway sink: POSTs every event to an HTTP webhook, one request per event,
//! with the event's `id` as the `Idempotency-Key` header so the receiver can drop the duplicates
//! that at-least-once delivery produces.
//!
//! ```toml
//! [[sink]]
//! name = "office-webhook"
//! plugin = "libumeme_example_sink.so"
//! sha256 = "…"
//! [sink.config]
//! url = "http://10.0.0.5:8000/umeme/events"
//! token_file = "/etc/umeme-gateway/secrets/webhook-token"   # optional: Authorization: Bearer …
//! timeout_ms = 5000                                         # optional, per request
//! ```
//!
//! What the receiver's answer means:
//!
//! | answer | result |
//! |---|---|
//! | 2xx, 409 (already have it) | delivered |
//! | 400, 413, 422 | this event is rejected for good (dead letter); the others go on |
//! | 401, 403 | bad config: the token is refused |
//! | 408, 429, 5xx, no answer | retry the batch, after `Retry-After` seconds if given |
//! | anything else (3xx, 404, …) | permanent: the batch goes to the dead letters |
//!
//! Plain HTTP over `std::net` only, to keep the example free of dependencies: put a TLS proxy in
//! front of a remote receiver, or keep the receiver on the site's LAN.

use std::collections::{HashSet, VecDeque};
use std::ffi::CStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use umeme_plugin_sdk::{export_sink, Delivery, Event, Health, Host, Sink};

/// The `[sink.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `http://host[:port][/path]`.
    pub url: String,
    /// A file holding a bearer token (secrets never go inline in the TOML).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long one request may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

pub struct Webhook {
    /// `host:port`, for connecting and for the `Host` header.
    authority: String,
    path: String,
    token: Option<String>,
    timeout: Duration,
    /// Ids delivered recently: a retried batch does not send them again. Only a saving: after a
    /// restart they are sent again, and the receiver's idempotency key makes that harmless.
    delivered: RecentIds,
    delivered_total: u64,
    last_error: Option<String>,
}

impl Sink for Webhook {
    const NAME: &'static CStr = c"webhook";
    type Config = Config;

    fn create(config: Config, _host: Host) -> Result<Self, String> {
        let (authority, path) = parse_url(&config.url)?;
        if !(100..=60_000).contains(&config.timeout_ms) {
            return Err(format!(
                "timeout_ms must be 100..=60000, not {}",
                config.timeout_ms
            ));
        }
        let token = match &config.token_file {
            None => None,
            // The SDK refuses a secret other users could read, a symlink, an empty file.
            Some(file) => Some(
                umeme_plugin_sdk::read_secret_file(file).map_err(|e| format!("token_file: {e}"))?,
            ),
        };
        log::info!("posting events to http://{authority}{path}");
        Ok(Webhook {
            authority,
            path,
            token,
            timeout: Duration::from_millis(config.timeout_ms),
            delivered: RecentIds::new(10_000),
            delivered_total: 0,
            last_error: None,
        })
    }

    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        // Answer before the gateway stops waiting (`timeout`), with a little room to spare.
        let deadline = Instant::now() + timeout * 9 / 10;
        let mut rejected = Vec::new();
        let mut sent = 0;
        for event in batch {
            if self.delivered.contains(&event.id) {
                continue;
            }
            let budget = deadline
                .saturating_duration_since(Instant::now())
                .min(self.timeout);
            if budget.is_zero() {
                return self.retry(
                    None,
                    format!("out of time after {sent} of {} events", batch.len()),
                );
            }
            let answer = match self.post(event, budget) {
                Ok(answer) => answer,
                Err(e) => return self.retry(None, format!("{}: {e}", self.authority)),
            };
            match answer.status {
                200..=299 | 409 => {
                    self.delivered.insert(&event.id);
                    self.delivered_total += 1;
                    sent += 1;
                }
                400 | 413 | 422 => {
                    log::warn!(
                        "event {} rejected: HTTP {} {}",
                        event.id,
                        answer.status,
                        answer.body
                    );
                    rejected.push((
                        event.seq,
                        format!("HTTP {}: {}", answer.status, answer.body),
                    ));
                }
                401 | 403 => {
                    self.last_error = Some(format!("token refused (HTTP {})", answer.status));
                    return Delivery::BadConfig(format!("HTTP {}: {}", answer.status, answer.body));
                }
                408 | 429 | 500..=599 => {
                    return self.retry(
                        answer.retry_after,
                        format!("HTTP {}: {}", answer.status, answer.body),
                    )
                }
                other => {
                    self.last_error = Some(format!("unexpected HTTP {other}"));
                    return Delivery::Permanent(format!(
                        "unexpected HTTP {other}: {}",
                        answer.body
                    ));
                }
            }
        }
        self.last_error = None;
        log::info!(
            "delivered {sent} events, {} rejected, {} total",
            rejected.len(),
            self.delivered_total
        );
        if rejected.is_empty() {
            Delivery::Delivered
        } else {
            Delivery::Rejected(rejected)
        }
    }

    fn health(&mut self) -> Health {
        Health {
            ok: self.last_error.is_none(),
            detail: serde_json::json!({
                "url": format!("http://{}{}", self.authority, self.path),
                "delivered": self.delivered_total,
                "last_error": self.last_error,
            }),
        }
    }
}

export_sink!(Webhook);

/// What the receiver answered.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    /// The start of the body, for messages.
    body: String,
}

impl Webhook {
    fn retry(&mut self, after: Option<Duration>, reason: String) -> Delivery {
        log::warn!("will retry: {reason}");
        self.last_error = Some(reason.clone());
        Delivery::Retry { after, reason }
    }

    /// One `POST` with `Connection: close`: simple, and a site sends a few events a second.
    fn post(&self, event: &Event, timeout: Duration) -> std::io::Result<Answer> {
        let body = serde_json::to_string(event)?;
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Idempotency-Key: {}\r\nConnection: close\r\n",
            self.path,
            self.authority,
            body.len(),
            event.id,
        );
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");

        let mut stream = connect(&self.authority, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response)?;
        parse_answer(&String::from_utf8_lossy(&response))
            .ok_or_else(|| std::io::Error::other("the answer is not HTTP"))
    }
}

fn connect(authority: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = authority.to_socket_addrs()?.collect();
    let mut last = std::io::Error::other(format!("{authority} has no address"));
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `http://host[:port][/path]` → (`host:port`, `/path`).
fn parse_url(url: &str) -> Result<(String, String), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "url {url:?}: only http:// is supported; put a TLS proxy in front of an https receiver"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("url {url:?} has no host"));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// Parses `HTTP/1.1 503 …`, the `Retry-After` seconds, and the start of the body.
fn parse_answer(text: &str) -> Option<Answer> {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let retry_after = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, value)| value.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs.min(3_600)));
    let body = body.trim().chars().take(200).collect();
    Some(Answer {
        status,
        retry_after,
        body,
    })
}

/// The last `capacity` ids, oldest forgotten first.
struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> RecentIds {
        RecentIds {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_default_to_port_80_and_path_slash() {
        assert_eq!(
            parse_url("http://10.0.0.5").unwrap(),
            ("10.0.0.5:80".into(), "/".into())
        );
        assert_eq!(
            parse_url("http://h:8000/a?b=1").unwrap(),
            ("h:8000".into(), "/a?b=1".into())
        );
        assert_eq!(
            parse_url("http://[::1]/x").unwrap(),
            ("[::1]:80".into(), "/x".into())
        );
        assert!(parse_url("https://h/").unwrap_err().contains("TLS proxy"));
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn answers_give_status_retry_after_and_body() {
        let a = parse_answer("HTTP/1.1 429 Too Many\r\nretry-after: 7\r\n\r\nslow down").unwrap();
        assert_eq!(
            (a.status, a.retry_after, a.body.as_str()),
            (429, Some(Duration::from_secs(7)), "slow down")
        );
        assert!(parse_answer("garbage").is_none());
    }
}
