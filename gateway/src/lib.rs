//! umeme-gateway: the site gateway for prepaid electricity.
//!
//! Where things go:
//! - a consumption report: [`broker`] (front door: authentication, per-meter topic checks) →
//!   [`payload`] (parse) → [`writer`] (one thread, group commit) → [`ledger`] (rules) →
//!   [`store`] (SQLite, with its event) → PUBACK, and a balance command back through [`hub`];
//! - a payment: [`api`] (`POST /daraja/simulate`) or [`cli`] (`credit`) → [`writer`] → [`ledger`]
//!   → [`store`] → [`hub`] → the meter's `command/balance`;
//! - an event (every change above stores one): [`store`] → [`outbox`] runner → a sink.
//!
//! Modules:
//! - [`config`]: TOML files, defaults, validation with file:line:col errors.
//! - [`meter`]: validated domain values (meter numbers, KES, units).
//! - [`payload`]: the meters' JSON (contract §4).
//! - [`ledger`]: the prepaid rules, pure.
//! - [`tariff`]: pricing for the money ledger (bands, time of use, charges, taxes, debt), pure;
//!   not wired in yet.
//! - [`store`]: the schema and all SQL.
//! - [`consumption`]: the compact on-disk record of consumption events.
//! - [`writer`]: ledger operations and the group-commit writer thread.
//! - [`outbox`]: sink runners delivering stored events, one cursor per sink.
//! - [`jsonl`]: the built-in JSON Lines file sink.
//! - [`plugin`]: the plugin host: loading checks, and plugins as sinks and payment sources.
//! - [`auth`]: meter secrets.
//! - [`hub`]: connected meter sessions and commands to them.
//! - [`broker`]: the meter-facing MQTT 3.1.1 listener.
//! - [`meter_limits`]: per-meter message rates and warning budgets after CONNECT.
//! - [`tls`]: the meter port's TLS: site CA and server certificate (`tls init`), checks,
//!   the rustls server configuration.
//! - [`connect`]: the meter port's CONNECT parser and the original firmwares' client ids.
//! - [`admission`]: limits before CONNACK (per-IP, backoff after failed passwords).
//! - [`api`]: the admin HTTP API and the original firmware's legacy listener.
//! - [`dashboard`]: the operator's web pages on the admin API (sessions, CSRF, live updates).
//! - [`fds`]: the file-descriptor budget shared by the listeners.
//! - [`metrics`]: counters for `/metrics`.
//! - [`daemon`]: wiring for `run`.
//! - [`cli`]: the command line.

pub mod admission;
pub mod alerts;
pub mod api;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connect;
pub mod consumption;
pub mod daemon;
pub mod dashboard;
pub mod fds;
pub mod hub;
pub mod jsonl;
pub mod ledger;
pub mod meter;
pub mod meter_limits;
pub mod metrics;
pub mod ota;
pub mod outbox;
pub mod payload;
pub mod plugin;
pub mod statement;
pub mod store;
pub mod tariff;
pub mod tls;
pub mod usage;
pub mod writer;

/// Untrusted text in log lines: [`untrusted::Untrusted`] escapes control characters and caps
/// the length (shared with the plugins through the SDK).
pub use umeme_plugin_sdk::untrusted;
