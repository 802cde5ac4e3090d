//! umeme-gateway sink: keeps the original Umeme dashboard's Firebase Realtime Database live.
//!
//! - [`layout`]: the tree the dashboard reads and what each gateway event writes into it.
//! - [`rtdb`]: the two REST calls (root multi-path PATCH, GET) and what each answer means.
//! - [`auth`]: service account → signed JWT → access token (cached), or the legacy secret.
//!
//! One batch costs one PATCH, plus, per meter whose link is not cached, one GET of
//! `meters/{m}/user_id` and (when that is absent) one query of `users` by `meter_no`. Writes are keyed by event id, so a retried batch cannot duplicate a record.
//! See README.md for the configuration and the status mapping.

pub mod auth;
pub mod layout;
pub mod rtdb;

use std::collections::HashMap;
use std::ffi::CStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};
use umeme_plugin_sdk::untrusted::Untrusted;
use umeme_plugin_sdk::{export_sink, Delivery, Event, Health, Host, Sink};

use auth::{Credential, ServiceAccount};
use layout::User;
use rtdb::{Failure, Rtdb};

/// The `[sink.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `https://<db>.firebaseio.com` or `https://<db>.<region>.firebasedatabase.app`.
    pub database_url: String,
    /// A Google service-account key file (JSON); the recommended credential.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    /// A file holding the legacy database secret (deprecated by Google).
    #[serde(default)]
    pub database_secret_file: Option<PathBuf>,
    /// How long a meter's `user_id` link is trusted before it is read again.
    #[serde(default = "default_user_cache_secs")]
    pub user_cache_secs: u64,
    /// How long "no user has this meter" is trusted: a tenant who registers later is found
    /// within this time, and an unregistered meter costs at most one lookup per period.
    #[serde(default = "default_user_miss_secs")]
    pub user_miss_secs: u64,
}

fn default_user_cache_secs() -> u64 {
    300
}

fn default_user_miss_secs() -> u64 {
    30
}

enum Auth {
    ServiceAccount(Box<ServiceAccount>),
    Secret(String),
}

/// The sink instance.
pub struct Firebase {
    db: Rtdb,
    auth: Auth,
    /// meter → (its dashboard user, when looked up).
    users: HashMap<String, (Option<User>, Instant)>,
    user_ttl: Duration,
    miss_ttl: Duration,
    /// The last failure, for `health`; `None` after a delivered batch.
    trouble: Option<Trouble>,
}

enum Trouble {
    Denied(String),
    Retrying(String),
}

/// Time kept back from the gateway's budget to answer before it gives up waiting.
const ANSWER_MARGIN: Duration = Duration::from_millis(200);

impl Sink for Firebase {
    const NAME: &'static CStr = c"firebase";
    type Config = Config;

    fn create(config: Config, _host: Host) -> Result<Self, String> {
        let url = config.database_url.trim_end_matches('/');
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or("database_url must start with https:// (or http:// for a local emulator)")?;
        if rest.is_empty() || rest.contains(['?', '#']) {
            return Err(format!("database_url {url:?} is not a database root URL"));
        }
        if url.starts_with("http://") {
            log::warn!("database_url {url} is plain http: only for a local emulator or test");
        }
        let auth = match (&config.service_account_file, &config.database_secret_file) {
            (Some(path), None) => Auth::ServiceAccount(Box::new(ServiceAccount::from_file(path)?)),
            (None, Some(path)) => Auth::Secret(auth::read_secret("database_secret_file", path)?),
            _ => {
                return Err(
                    "set exactly one of service_account_file and database_secret_file".into(),
                )
            }
        };
        Ok(Firebase {
            db: Rtdb::new(url),
            auth,
            users: HashMap::new(),
            user_ttl: Duration::from_secs(config.user_cache_secs),
            miss_ttl: Duration::from_secs(config.user_miss_secs),
            trouble: None,
        })
    }

    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        let deadline = Instant::now() + timeout.saturating_sub(ANSWER_MARGIN);
        let outcome = self.deliver_by(batch, deadline);
        self.trouble = match &outcome {
            Ok(_) => None,
            Err(Failure::Denied(e)) => Some(Trouble::Denied(e.clone())),
            Err(e) => Some(Trouble::Retrying(e.to_string())),
        };
        match outcome {
            Ok(rejected) if rejected.is_empty() => Delivery::Delivered,
            Ok(rejected) => Delivery::Rejected(rejected),
            Err(Failure::Retry { reason, after }) => Delivery::Retry { after, reason },
            Err(Failure::Denied(e)) => {
                log::error!("{e}");
                Delivery::BadConfig(e)
            }
            // Only a GET refused as invalid gets here (keys are checked first, so not today).
            Err(Failure::Invalid(e)) => Delivery::Permanent(e),
        }
    }

    fn health(&mut self) -> Health {
        match &self.trouble {
            None => Health::ok(),
            Some(Trouble::Denied(e)) => Health::failing(format!("bad credentials or rules: {e}")),
            Some(Trouble::Retrying(e)) => Health::failing(format!("retrying: {e}")),
        }
    }
}

impl Firebase {
    /// Writes the batch; returns the events refused for good (by seq).
    fn deliver_by(
        &mut self,
        batch: &[Event],
        deadline: Instant,
    ) -> Result<Vec<(i64, String)>, Failure> {
        let mut rejected = Vec::new();
        let mut valid = Vec::new();
        for e in batch {
            match layout::meter_of(e).and_then(|m| layout::check_key(&e.id).map(|()| m)) {
                Ok(m) => valid.push((e, m)),
                Err(reason) => {
                    log::warn!("event {} refused: {reason}", e.id);
                    rejected.push((e.seq, reason));
                }
            }
        }
        let mut writes = Vec::new();
        for (e, meter) in valid {
            let user = match meter.filter(|_| layout::needs_user(e)) {
                Some(m) => self.user_of(m, deadline)?,
                None => None,
            };
            match layout::writes_for(e, user.as_ref()) {
                Ok(w) => writes.push((e.seq, w)),
                Err(reason) => {
                    log::warn!("event {} refused: {reason}", e.id);
                    rejected.push((e.seq, reason));
                }
            }
        }
        self.write_narrowing(&writes, deadline, &mut rejected)?;
        Ok(rejected)
    }

    /// Writes events in one PATCH; when the database refuses the data (400), halves the batch
    /// until the refused events are alone, so they are rejected and the others written.
    fn write_narrowing(
        &mut self,
        events: &[(i64, layout::Writes)],
        deadline: Instant,
        rejected: &mut Vec<(i64, String)>,
    ) -> Result<(), Failure> {
        let mut updates = Map::new();
        for (_, w) in events {
            for (path, value) in w {
                // Later events win: the batch is in seq order.
                updates.insert(path.clone(), value.clone());
            }
        }
        if updates.is_empty() {
            return Ok(());
        }
        match self.authorized(deadline, |db, cred, budget| {
            db.patch_root(&updates, cred, budget)
        }) {
            Err(Failure::Invalid(reason)) if events.len() == 1 => {
                log::warn!(
                    "event seq {} refused by the database: {reason}",
                    events[0].0
                );
                rejected.push((events[0].0, reason));
                Ok(())
            }
            Err(Failure::Invalid(_)) => {
                let (a, b) = events.split_at(events.len() / 2);
                self.write_narrowing(a, deadline, rejected)?;
                self.write_narrowing(b, deadline, rejected)
            }
            other => other,
        }
    }

    /// The meter's dashboard user, from the cache while fresh: `meters/{meter}/user_id` (the
    /// original backend's link), else the user whose `meter_no` is the meter (how the
    /// dashboard registers a tenant).
    fn user_of(&mut self, meter: &str, deadline: Instant) -> Result<Option<User>, Failure> {
        if let Some((user, at)) = self.users.get(meter) {
            let ttl = if user.is_some() {
                self.user_ttl
            } else {
                self.miss_ttl
            };
            if at.elapsed() < ttl {
                return Ok(user.clone());
            }
        }
        let path = format!("meters/{meter}/user_id");
        let value = self.authorized(deadline, |db, cred, budget| db.get(&path, cred, budget))?;
        let linked = match value {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
        .filter(|uid| usable_uid(uid, &path));
        let user = match linked {
            Some(uid) => Some(User { uid, phone: None }),
            None => self.user_by_meter_no(meter, deadline)?,
        };
        self.users
            .insert(meter.to_string(), (user.clone(), Instant::now()));
        Ok(user)
    }

    /// `users?orderBy="meter_no"&equalTo="{meter}"`: the tenant the dashboard registered.
    fn user_by_meter_no(
        &mut self,
        meter: &str,
        deadline: Instant,
    ) -> Result<Option<User>, Failure> {
        let found = self.authorized(deadline, |db, cred, budget| {
            db.query_equal("users", "meter_no", meter, cred, budget)
        });
        let found = match found {
            // Without the index the database refuses the query; holding the batch until the
            // operator adds it keeps `user_id` on every record (nothing is written unlinked).
            Err(Failure::Invalid(reason)) => {
                return Err(Failure::Denied(format!(
                    "finding the user of meter {meter} by users/*/meter_no needs an index: add \
                     \"users\": {{\".indexOn\": [\"meter_no\"]}} to the database rules \
                     (the database said: {})",
                    Untrusted(&reason)
                )))
            }
            other => other?,
        };
        let Value::Object(users) = found else {
            return Ok(None);
        };
        // Several users claiming one meter is the dashboard's data error; pick one the same
        // way every time and say so.
        let mut uids: Vec<&String> = users
            .keys()
            .filter(|uid| usable_uid(uid, "users"))
            .collect();
        uids.sort();
        let Some(uid) = uids.first() else {
            return Ok(None);
        };
        if uids.len() > 1 {
            log::warn!(
                "{} users have meter_no {meter}; using {}",
                uids.len(),
                Untrusted(uid)
            );
        }
        let phone = users[*uid]
            .get("phone_number")
            .and_then(Value::as_str)
            .filter(|p| layout::usable_phone(p))
            .map(str::to_string);
        Ok(Some(User {
            uid: (*uid).clone(),
            phone,
        }))
    }

    /// Runs `call` with a credential. A refused access token that came from the cache is
    /// replaced once (it may have been revoked or expired early); a fresh one refused means
    /// the credentials or the rules are wrong.
    fn authorized<T>(
        &mut self,
        deadline: Instant,
        call: impl Fn(&Rtdb, &Credential, Duration) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let budget = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Failure::Retry {
                    reason: "out of time for this batch".into(),
                    after: None,
                })
            } else {
                Ok(left)
            }
        };
        let db = &self.db;
        match &mut self.auth {
            Auth::Secret(s) => call(db, &Credential::Secret(s.clone()), budget()?),
            Auth::ServiceAccount(sa) => {
                let (token, fresh) = sa.token(db.agent(), budget()?)?;
                match call(db, &Credential::Bearer(token), budget()?) {
                    Err(Failure::Denied(e)) if !fresh => {
                        log::info!("access token refused ({e}); minting a new one");
                        sa.forget_token();
                        let (token, _) = sa.token(db.agent(), budget()?)?;
                        call(db, &Credential::Bearer(token), budget()?)
                    }
                    other => other,
                }
            }
        }
    }
}

/// Whether a user id read at `from` can be a key under `users/` (logged when not).
fn usable_uid(uid: &str, from: &str) -> bool {
    match layout::check_key(uid) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("{from}: user id not usable: {}", Untrusted(e.as_str()));
            false
        }
    }
}

export_sink!(Firebase);
