//! Payments that moved money but credit no meter (an unknown or missing account, a meter
//! removed since the push, a paid callback for a push this plugin never started). They are
//! handed to the gateway (`Host::record_unapplied`), which keeps them where the operator sees
//! them (`umeme-gateway payment list --unapplied`) and can credit them once with
//! `payment apply REF METER`. A gateway older than ABI minor 1 has no such store: the record
//! then goes to the plugin's key-value store under `legacy_key`, as before.

use umeme_plugin_sdk::untrusted::Untrusted;
use umeme_plugin_sdk::{HostError, Unapplied};

use crate::Shared;

/// Why an unapplied payment could not be kept; nothing was written.
#[derive(Debug)]
pub enum NotKept {
    /// The gateway refused it for good (its store of unapplied payments is full).
    Refused(String),
    /// Not now; Daraja's retry may bring it again.
    Busy(String),
}

impl std::fmt::Display for NotKept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotKept::Refused(why) => write!(f, "refused by the gateway: {}", Untrusted(why)),
            NotKept::Busy(why) => write!(f, "the gateway is busy: {}", Untrusted(why)),
        }
    }
}

/// Keeps `u` for the operator: in the gateway, or under `legacy_key` in an old one.
pub fn keep(shared: &Shared, u: &Unapplied, legacy_key: &str) -> Result<(), NotKept> {
    let busy = |e: HostError| NotKept::Busy(e.to_string());
    match shared.host.record_unapplied(u) {
        Ok(()) => Ok(()),
        Err(HostError::Unsupported) => {
            let text = serde_json::to_string(u).map_err(|e| NotKept::Busy(e.to_string()))?;
            shared.host.kv_put(legacy_key, &text).map_err(|e| match e {
                HostError::Rejected(why) => NotKept::Refused(why),
                other => busy(other),
            })
        }
        Err(HostError::Rejected(why)) => Err(NotKept::Refused(why)),
        Err(e) => Err(busy(e)),
    }
}
