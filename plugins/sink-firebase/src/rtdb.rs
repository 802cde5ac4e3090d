//! The Realtime Database REST calls the sink makes (a root multi-path PATCH, a small GET and
//! an `orderBy`/`equalTo` query), and what each answer means for delivery.

use std::time::Duration;

use serde_json::Value;

use crate::auth::Credential;

/// Why a call did not succeed, sorted by what the sink does about it.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// 412, 429, 5xx, a timeout or a broken connection: try the batch again later.
    #[error("{reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// 401/403 (bad credentials or rules), 404 (no such database), a refused key: the batch
    /// cannot go through until the configuration changes.
    #[error("{0}")]
    Denied(String),
    /// 400: the database refuses the data written.
    #[error("the database refused the data: {0}")]
    Invalid(String),
}

/// The database at `base` (`https://<db>.firebaseio.com`, no trailing slash).
pub struct Rtdb {
    base: String,
    agent: ureq::Agent,
}

impl Rtdb {
    pub fn new(base: &str) -> Rtdb {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("umeme-sink-firebase/", env!("CARGO_PKG_VERSION")))
            .build();
        Rtdb {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }

    fn url(&self, path: &str, cred: &Credential, print_silent: bool) -> String {
        self.url_with(path, cred, print_silent, &[])
    }

    fn url_with(
        &self,
        path: &str,
        cred: &Credential,
        print_silent: bool,
        params: &[(&str, &str)],
    ) -> String {
        let mut url = format!("{}/", self.base);
        for (i, seg) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
            if i > 0 {
                url.push('/');
            }
            url.push_str(&encode(seg));
        }
        url.push_str(".json");
        let mut sep = '?';
        if print_silent {
            url.push_str("?print=silent");
            sep = '&';
        }
        for (k, v) in params {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&encode(v));
            sep = '&';
        }
        if let Credential::Secret(s) = cred {
            url.push(sep);
            url.push_str("auth=");
            url.push_str(&encode(s));
        }
        url
    }

    /// Multi-path update at the root: `{"a/b": v, …}` sets each path, nothing else changes.
    pub fn patch_root(
        &self,
        updates: &serde_json::Map<String, Value>,
        cred: &Credential,
        budget: Duration,
    ) -> Result<(), Failure> {
        let body = serde_json::to_string(updates).map_err(|e| Failure::Invalid(e.to_string()))?;
        let req = self
            .agent
            .patch(&self.url("", cred, true))
            .header("Content-Type", "application/json");
        let req = with_bearer(req, cred)
            .config()
            .timeout_global(Some(budget))
            .build();
        let resp = req
            .send(body.as_str())
            .map_err(|e| classify_transport("the database", e))?;
        answer(resp).map(drop)
    }

    /// The value at `path` (`null` when absent).
    pub fn get(&self, path: &str, cred: &Credential, budget: Duration) -> Result<Value, Failure> {
        self.get_url(path, &self.url(path, cred, false), cred, budget)
    }

    /// The children of `path` whose `child` equals the string `value`
    /// (`?orderBy="child"&equalTo="value"`); an object, `{}` or `null` when none match. The
    /// database answers 400 "Index not defined" unless the rules have `.indexOn` for `child`.
    pub fn query_equal(
        &self,
        path: &str,
        child: &str,
        value: &str,
        cred: &Credential,
        budget: Duration,
    ) -> Result<Value, Failure> {
        let order_by = Value::from(child).to_string();
        let equal_to = Value::from(value).to_string();
        let url = self.url_with(
            path,
            cred,
            false,
            &[("orderBy", &order_by), ("equalTo", &equal_to)],
        );
        self.get_url(path, &url, cred, budget)
    }

    fn get_url(
        &self,
        path: &str,
        url: &str,
        cred: &Credential,
        budget: Duration,
    ) -> Result<Value, Failure> {
        let req = with_bearer(self.agent.get(url), cred)
            .config()
            .timeout_global(Some(budget))
            .build();
        let resp = req
            .call()
            .map_err(|e| classify_transport("the database", e))?;
        let body = answer(resp)?;
        serde_json::from_str(&body).map_err(|e| Failure::Retry {
            reason: format!("GET {path}: the answer is not JSON: {e}"),
            after: None,
        })
    }
}

fn with_bearer<B>(req: ureq::RequestBuilder<B>, cred: &Credential) -> ureq::RequestBuilder<B> {
    match cred {
        Credential::Bearer(t) => req.header("Authorization", format!("Bearer {t}")),
        Credential::Secret(_) => req,
    }
}

/// The body of a 2xx answer, or what the status means (research/apis.md §2.4).
fn answer(mut resp: ureq::http::Response<ureq::Body>) -> Result<String, Failure> {
    let status = resp.status().as_u16();
    let after = retry_after(resp.headers());
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    let message = || {
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| body.trim().chars().take(200).collect())
    };
    match status {
        200..=299 => Ok(body),
        400 => Err(Failure::Invalid(message())),
        401 | 403 => Err(Failure::Denied(format!(
            "the database refused the credentials or its rules denied the write ({status}): {}",
            message()
        ))),
        404 => Err(Failure::Denied(format!(
            "no such database at database_url (404): {}",
            message()
        ))),
        _ => Err(Failure::Retry {
            reason: format!("the database answered {status}: {}", message()),
            after,
        }),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from Google and treated as absent).
pub fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// A request that got no HTTP answer.
pub fn classify_transport(what: &str, e: ureq::Error) -> Failure {
    match e {
        ureq::Error::BadUri(_) | ureq::Error::RequireHttpsOnly(_) => {
            Failure::Denied(format!("cannot reach {what}: {e}"))
        }
        _ => Failure::Retry {
            reason: format!("no answer from {what}: {e}"),
            after: None,
        },
    }
}

/// Percent-encodes one path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
