//! Write umeme-gateway plugins in safe Rust.
//!
//! A sink receives the gateway's stored events (contract §6) in batches and says whether they
//! are delivered; a payment source turns payments from outside (M-Pesa, …) into credits. Write a
//! plain trait impl and one macro call; the SDK generates the C ABI ([`abi`]), catches every
//! panic, forwards your `log` lines (and your dependencies') into the gateway's log, and keeps
//! `unsafe` out of your code.
//!
//! ```no_run
//! use std::time::Duration;
//! use umeme_plugin_sdk::{export_sink, Delivery, Event, Host, Sink};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { prefix: String }
//!
//! struct Printer { prefix: String }
//!
//! impl Sink for Printer {
//!     const NAME: &'static std::ffi::CStr = c"printer";
//!     type Config = Config;
//!     fn create(config: Config, _host: Host) -> Result<Self, String> {
//!         Ok(Printer { prefix: config.prefix })
//!     }
//!     fn deliver(&mut self, batch: &[Event], _timeout: Duration) -> Delivery {
//!         for e in batch {
//!             log::info!("{} {} {}", self.prefix, e.id, e.kind);
//!         }
//!         Delivery::Delivered
//!     }
//! }
//!
//! export_sink!(Printer);
//! ```
//!
//! Build it as a `cdylib` with `panic = "unwind"` (the default); see the README.

pub mod abi;
mod ffi;
pub mod secret;
pub mod testing;
pub mod untrusted;

pub use secret::{read_secret_file, SecretFileError};

use std::ffi::CStr;
use std::time::Duration;

pub use log;
pub use serde;
pub use serde_json;

#[doc(hidden)]
pub mod __private {
    pub use crate::ffi::*;
}

/// The SDK's version, recorded in every plugin's declaration.
pub const SDK_VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("version has no NUL"),
    };
/// The rustc that built the SDK (and so the plugin).
pub const RUSTC_VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("UMEME_SDK_RUSTC"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("rustc version has no NUL"),
    };

/// The proleptic Gregorian `(year, month, day)` of a day number (days since 1970-01-01): Howard
/// Hinnant's `civil_from_days`, valid for any `i64` the callers pass (no time-zone database).
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m as u8, d as u8)
}

/// `2026-11-27T11:21:18.123Z` from milliseconds since the Unix epoch (UTC), for plugins and the
/// gateway alike.
pub fn iso8601_utc(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A stored gateway event (contract §6). `id` is unique forever: use it to make retries
/// idempotent at the far end.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub id: String,
    pub seq: i64,
    pub gateway: String,
    /// consumption, payment, balance, status, alert or meter.
    pub kind: String,
    pub meter: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub data: serde_json::Value,
}

/// A sink's answer for one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Every event is delivered.
    Delivered,
    /// Nothing of the batch counts; the gateway retries with backoff, or after `after`.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The whole batch can never be delivered: every event goes to the dead letters.
    Permanent(String),
    /// The sink's configuration or credentials are refused by the far end. The gateway keeps
    /// the batch (nothing is dead-lettered), backs off up to the sink's `retry_max`, and reports
    /// a configuration problem until a person fixes it.
    BadConfig(String),
    /// These events (by `seq`) can never be delivered; all the others are delivered.
    Rejected(Vec<(i64, String)>),
}

impl Delivery {
    pub fn retry(reason: impl Into<String>) -> Delivery {
        Delivery::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Delivery {
        Delivery::Retry {
            after: Some(after),
            reason: reason.into(),
        }
    }
}

/// What `health` reports; shown by the gateway next to the plugin.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    pub ok: bool,
    pub detail: serde_json::Value,
}

impl Health {
    pub fn ok() -> Health {
        Health {
            ok: true,
            detail: serde_json::Value::Null,
        }
    }

    pub fn failing(detail: impl Into<String>) -> Health {
        Health {
            ok: false,
            detail: serde_json::Value::String(detail.into()),
        }
    }
}

/// A destination for events.
///
/// The gateway calls an instance from one thread at a time (not always the same one), never
/// from its async runtime: blocking I/O is fine, and a sink that wants async keeps its own
/// runtime and `block_on`s. After a panic the instance is dropped and created again.
pub trait Sink: Sized + Send + 'static {
    /// Shown in logs and `plugin inspect`.
    const NAME: &'static CStr;
    /// The `[sink.config]` table; `#[serde(deny_unknown_fields)]` is recommended.
    type Config: serde::de::DeserializeOwned;
    fn create(config: Self::Config, host: Host) -> Result<Self, String>;
    /// Delivers events in order; `timeout` is how long the gateway waits for the answer.
    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery;
    fn health(&mut self) -> Health {
        Health::ok()
    }
}

/// A source of payments. `start` begins the source's own threads (an HTTP listener, a poller);
/// they credit meters through [`Host::submit_payment`]. `stop` must end and join them.
pub trait PaymentSource: Sized + Send + 'static {
    const NAME: &'static CStr;
    type Config: serde::de::DeserializeOwned;
    fn create(config: Self::Config, host: Host) -> Result<Self, String>;
    fn start(&mut self) -> Result<(), String>;
    fn health(&mut self) -> Health {
        Health::ok()
    }
    fn stop(&mut self);
}

/// A payment for [`Host::submit_payment`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Payment {
    pub meter: String,
    /// KES cents.
    pub amount_cents: i64,
    /// The idempotency key (M-Pesa TransID or receipt): the same reference credits once.
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The payment as received, kept with the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
}

/// A payment that moved money but credits no meter, for [`Host::record_unapplied`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Unapplied {
    /// The reference the payment would have credited with (M-Pesa TransID or receipt); the
    /// operator's `payment apply` credits with the same one, so it still credits once.
    pub reference: String,
    /// KES cents.
    pub amount_cents: i64,
    /// The account the payer gave (empty for a Buy Goods payment without one).
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Why it was not credited.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
}

/// What the gateway answered for a payment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PaymentResult {
    /// The reference was credited before; this is the first result.
    pub duplicate: bool,
    pub credit_wh: i64,
    pub balance_wh: i64,
}

/// A downlink for a meter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    pub meter: String,
    /// `relay` or `config`.
    pub command: String,
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// Refused for good, with the reason (unknown meter, bad amount).
    Rejected(String),
    /// The gateway is busy; try again shortly.
    Busy(String),
    /// The gateway does not offer this to this plugin.
    Unsupported,
    /// Anything else (including a host that panicked).
    Failed(String),
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Rejected(r) => write!(f, "rejected: {r}"),
            HostError::Busy(r) => write!(f, "busy: {r}"),
            HostError::Unsupported => f.write_str("not supported by the host"),
            HostError::Failed(r) => write!(f, "failed: {r}"),
        }
    }
}

impl std::error::Error for HostError {}

/// The gateway's services for a plugin instance. Cheap to clone; usable from any thread the
/// plugin starts, until `stop` (sources) or `destroy` returns.
#[derive(Clone, Copy)]
pub struct Host {
    api: *const abi::HostApi,
}

// The host table is immutable and its functions are thread-safe (an ABI rule).
unsafe impl Send for Host {}
unsafe impl Sync for Host {}

impl Host {
    /// # Safety
    /// `api` must point to a valid host table that outlives every use of this `Host`.
    pub(crate) unsafe fn from_raw(api: *const abi::HostApi) -> Host {
        Host { api }
    }

    fn call(
        &self,
        f: impl FnOnce(&abi::HostApi, *mut abi::Writer) -> abi::Status,
    ) -> (abi::Status, String) {
        let mut buf = Vec::new();
        let mut w = ffi::writer_into(&mut buf);
        // SAFETY: `api` is valid for the instance's lifetime (ABI rule), `w` outlives the call.
        let status = unsafe { f(&*self.api, &mut w) };
        (status, String::from_utf8_lossy(&buf).into_owned())
    }

    fn result(status: abi::Status, text: String) -> Result<String, HostError> {
        match status {
            abi::OK => Ok(text),
            abi::REJECTED | abi::PERMANENT => Err(HostError::Rejected(text)),
            abi::BUSY | abi::RETRYABLE => Err(HostError::Busy(text)),
            abi::UNSUPPORTED => Err(HostError::Unsupported),
            _ => Err(HostError::Failed(text)),
        }
    }

    /// Credits a payment; returns after the gateway committed it.
    pub fn submit_payment(&self, payment: &Payment) -> Result<PaymentResult, HostError> {
        let json = serde_json::to_string(payment).map_err(|e| HostError::Failed(e.to_string()))?;
        let (status, text) =
            self.call(|api, w| unsafe { (api.submit_payment)(api.ctx, abi::Str::new(&json), w) });
        let text = Self::result(status, text)?;
        serde_json::from_str(&text).map_err(|e| HostError::Failed(format!("host answer: {e}")))
    }

    /// Whether a meter number exists at this site.
    pub fn validate_account(&self, meter: &str) -> Result<bool, HostError> {
        let (status, text) =
            self.call(|api, w| unsafe { (api.validate_account)(api.ctx, abi::Str::new(meter), w) });
        match Self::result(status, text) {
            Ok(_) => Ok(true),
            Err(HostError::Rejected(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether a payer may pay `amount_cents` to `meter` now (before money moves: M-Pesa C2B
    /// validation). `Err(HostError::Rejected(why))` names why (`unknown_meter: …`,
    /// `below_minimum_topup: …`); [`HostError::Unsupported`] from a gateway older than ABI
    /// minor 2 (then only [`Host::validate_account`] can be asked).
    pub fn validate_payment(&self, meter: &str, amount_cents: i64) -> Result<(), HostError> {
        // SAFETY: `api` is valid for the instance's lifetime (ABI rule).
        if !unsafe { &*self.api }.has_validate_payment() {
            return Err(HostError::Unsupported);
        }
        let (status, text) = self.call(|api, w| unsafe {
            (api.validate_payment)(api.ctx, abi::Str::new(meter), amount_cents, w)
        });
        Self::result(status, text).map(drop)
    }

    /// Queues a command for a meter.
    pub fn submit_command(&self, command: &Command) -> Result<(), HostError> {
        let json = serde_json::to_string(command).map_err(|e| HostError::Failed(e.to_string()))?;
        let (status, text) =
            self.call(|api, w| unsafe { (api.submit_command)(api.ctx, abi::Str::new(&json), w) });
        Self::result(status, text).map(drop)
    }

    /// Reads a key of this plugin's durable store.
    pub fn kv_get(&self, key: &str) -> Result<Option<String>, HostError> {
        let (status, text) =
            self.call(|api, w| unsafe { (api.kv_get)(api.ctx, abi::Str::new(key), w) });
        match Self::result(status, text) {
            Ok(v) => Ok(Some(v)),
            Err(HostError::Rejected(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores a key durably (before returning).
    pub fn kv_put(&self, key: &str, value: &str) -> Result<(), HostError> {
        if value.is_empty() {
            return Err(HostError::Rejected(
                "values must not be empty; use kv_delete".into(),
            ));
        }
        let (status, text) = self.call(|api, w| unsafe {
            (api.kv_put)(api.ctx, abi::Str::new(key), abi::Str::new(value), w)
        });
        Self::result(status, text).map(drop)
    }

    /// Hands a payment that credits no meter to the gateway, which keeps it for the operator.
    /// [`HostError::Unsupported`] from a gateway older than ABI minor 1.
    pub fn record_unapplied(&self, unapplied: &Unapplied) -> Result<(), HostError> {
        // SAFETY: `api` is valid for the instance's lifetime (ABI rule).
        if !unsafe { &*self.api }.has_record_unapplied() {
            return Err(HostError::Unsupported);
        }
        let json =
            serde_json::to_string(unapplied).map_err(|e| HostError::Failed(e.to_string()))?;
        let (status, text) =
            self.call(|api, w| unsafe { (api.record_unapplied)(api.ctx, abi::Str::new(&json), w) });
        Self::result(status, text).map(drop)
    }

    pub fn kv_delete(&self, key: &str) -> Result<(), HostError> {
        let (status, text) = self.call(|api, w| unsafe {
            (api.kv_put)(api.ctx, abi::Str::new(key), abi::Str::new(""), w)
        });
        Self::result(status, text).map(drop)
    }
}

/// Exports a [`Sink`] implementation as the plugin of this `cdylib`.
#[macro_export]
macro_rules! export_sink {
    ($t:ty) => {
        #[cfg(panic = "abort")]
        compile_error!("umeme plugins must be built with panic = \"unwind\": with abort, one panic takes the gateway down");

        #[unsafe(no_mangle)]
        pub extern "C" fn umeme_plugin_declare() -> *const $crate::abi::Declaration {
            static VTABLE: $crate::abi::SinkVTable = $crate::abi::SinkVTable {
                struct_size: ::core::mem::size_of::<$crate::abi::SinkVTable>() as u32,
                _reserved: 0,
                create: $crate::__private::sink_create::<$t>,
                deliver: $crate::__private::sink_deliver::<$t>,
                health: $crate::__private::sink_health::<$t>,
                destroy: $crate::__private::sink_destroy::<$t>,
            };
            static DECLARATION: $crate::abi::Declaration = $crate::abi::Declaration {
                magic: $crate::abi::MAGIC,
                abi_major: $crate::abi::ABI_MAJOR,
                abi_minor: $crate::abi::ABI_MINOR,
                struct_size: ::core::mem::size_of::<$crate::abi::Declaration>() as u32,
                kind: $crate::abi::KIND_SINK,
                _reserved: 0,
                name: <$t as $crate::Sink>::NAME.as_ptr(),
                plugin_version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const ::core::ffi::c_char,
                sdk_version: $crate::SDK_VERSION.as_ptr(),
                rustc_version: $crate::RUSTC_VERSION.as_ptr(),
                sink: &VTABLE,
                source: ::core::ptr::null(),
            };
            &DECLARATION
        }
    };
}

/// Exports a [`PaymentSource`] implementation as the plugin of this `cdylib`.
#[macro_export]
macro_rules! export_source {
    ($t:ty) => {
        #[cfg(panic = "abort")]
        compile_error!("umeme plugins must be built with panic = \"unwind\": with abort, one panic takes the gateway down");

        #[unsafe(no_mangle)]
        pub extern "C" fn umeme_plugin_declare() -> *const $crate::abi::Declaration {
            static VTABLE: $crate::abi::SourceVTable = $crate::abi::SourceVTable {
                struct_size: ::core::mem::size_of::<$crate::abi::SourceVTable>() as u32,
                _reserved: 0,
                create: $crate::__private::source_create::<$t>,
                start: $crate::__private::source_start::<$t>,
                health: $crate::__private::source_health::<$t>,
                stop: $crate::__private::source_stop::<$t>,
                destroy: $crate::__private::source_destroy::<$t>,
            };
            static DECLARATION: $crate::abi::Declaration = $crate::abi::Declaration {
                magic: $crate::abi::MAGIC,
                abi_major: $crate::abi::ABI_MAJOR,
                abi_minor: $crate::abi::ABI_MINOR,
                struct_size: ::core::mem::size_of::<$crate::abi::Declaration>() as u32,
                kind: $crate::abi::KIND_SOURCE,
                _reserved: 0,
                name: <$t as $crate::PaymentSource>::NAME.as_ptr(),
                plugin_version: concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const ::core::ffi::c_char,
                sdk_version: $crate::SDK_VERSION.as_ptr(),
                rustc_version: $crate::RUSTC_VERSION.as_ptr(),
                sink: ::core::ptr::null(),
                source: &VTABLE,
            };
            &DECLARATION
        }
    };
}
