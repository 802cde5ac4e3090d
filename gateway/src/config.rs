//! TOML configuration: `gateway.toml` plus `conf.d/*.toml` merged in name order.
//!
//! Every key has a default and unknown keys are errors. Values are validated while they are
//! parsed (the newtypes below), so every error carries the file, line and column of the value
//! that caused it. Checks that need the file system (secret files) run in [`Config::check_files`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::meter::MeterIdError;

/// Where the packaged configuration lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/umeme-gateway/gateway.toml";

/// A configuration problem, located in its file when it comes from one.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    /// 1-based line and column of the offending value, when known.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.position) {
            (Some(file), Some((line, col))) => {
                write!(f, "{}:{line}:{col}: {}", file.display(), self.message)
            }
            (Some(file), None) => write!(f, "{}: {}", file.display(), self.message),
            (None, _) => f.write_str(&self.message),
        }
    }
}

impl ConfigError {
    /// An error at `span` of `text`; the message ends with the offending line and a caret, so
    /// a syntax error ("string values must be quoted") shows what the parser saw.
    fn in_file(file: &Path, text: &str, span: Option<std::ops::Range<usize>>, msg: String) -> Self {
        let position = span.map(|s| line_col(text, s.start));
        let message = match position {
            Some((line, col)) => format!("{msg}{}", excerpt(text, line, col)),
            None => msg,
        };
        ConfigError {
            file: Some(file.to_path_buf()),
            position,
            message,
        }
    }
}

impl ConfigError {
    /// An error found after parsing (a plugin's checks), at a remembered `(file, line, col)`.
    pub fn at(location: &(PathBuf, usize, usize), message: String) -> Self {
        ConfigError {
            file: Some(location.0.clone()),
            position: Some((location.1, location.2)),
            message,
        }
    }
}

/// `\n  12 | listen = 0.0.0.0:1883\n     |          ^`: line `line` of `text` with a caret
/// under column `col` (both 1-based). Control characters are shown as `?` so the excerpt
/// cannot garble the terminal.
fn excerpt(text: &str, line: usize, col: usize) -> String {
    let Some(src) = text.lines().nth(line - 1) else {
        return String::new();
    };
    let shown: String = src
        .chars()
        .take(200)
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect();
    let pad: String = shown
        .chars()
        .take(col.saturating_sub(1))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let gutter = " ".repeat(line.to_string().len());
    format!("\n  {line} | {shown}\n  {gutter} | {pad}^")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where the running configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// No file was found: built-in development defaults.
    BuiltInDefaults,
    /// The main file, then the `conf.d` files in the order they were merged.
    Files(Vec<PathBuf>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: ConfigSource,
    pub gateway: GatewayConfig,
    pub broker: BrokerConfig,
    pub ledger: LedgerConfig,
    pub api: ApiConfig,
    pub outbox: OutboxConfig,
    /// `[limits]`: `None` when no file has the section (no `command/config` is sent).
    pub limits: Option<MeterLimits>,
    pub ota: OtaConfig,
    pub sinks: Vec<SinkConfig>,
    pub sources: Vec<SourceConfig>,
    /// `[alerts]`: anomaly and site-loss thresholds.
    pub alerts: crate::alerts::Thresholds,
    /// Secret files named by `*_file` keys, with where they were named, for `check_files`.
    secret_files: Vec<Located<SecretFile>>,
}

/// A secret file and the key that names it (`token_file`, `password_file`, …).
#[derive(Debug, Clone)]
struct SecretFile {
    key: String,
    path: PathBuf,
}

#[derive(Debug, Clone)]
struct Located<T> {
    value: T,
    file: PathBuf,
    position: (usize, usize),
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: GatewayId,
    pub data_dir: PathBuf,
    pub plugin_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The plain MQTT listener (1883); `None` when `listen = "off"`.
    pub listen: Option<SocketAddr>,
    /// The TLS listener (`tls_listen`, off unless set; 8883 by convention).
    pub tls_listen: Option<SocketAddr>,
    /// The server certificate (chain) and key the TLS listener serves; by default the files
    /// `tls init` writes under `data_dir/tls/`.
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// Time a new TLS connection has to finish its handshake.
    pub tls_handshake_timeout_ms: u64,
    /// TLS handshakes one source address may have in flight (they cost the gateway the most
    /// CPU of anything before CONNECT).
    pub max_tls_handshakes_per_ip: usize,
    pub max_connections: usize,
    pub topic_prefix: TopicPrefix,
    /// Largest MQTT packet a meter may send; larger ones close the connection.
    pub max_packet_bytes: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Connections one source address may hold open before their CONNACK.
    pub max_unauthenticated_per_ip: usize,
    /// Longest wait imposed on a source address or meter number after failed password checks.
    pub auth_backoff_max_ms: u64,
    /// What one authenticated meter may do after CONNACK.
    pub session: SessionLimits,
}

/// The meter port's limits after CONNACK, all in one place (README "Meters: limits";
/// `docs/security.md` "Meters as attackers"). Rates and the warning budget are per meter,
/// across its connections, so reconnecting does not refill them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Consumption reports (`…/consumption`).
    pub reports: MessageRate,
    /// Everything else a meter publishes (`…/status`, `…/balance`, unknown topics).
    pub status: MessageRate,
    /// Filters one session may hold; more get SUBACK failure (0x80).
    pub max_subscriptions: usize,
    /// Firmware chunk requests (`…/ota/request`, `[ota] chunk_requests_per_second`).
    pub ota_chunks: MessageRate,
    /// Longest topic filter accepted in a SUBSCRIBE.
    pub max_filter_bytes: usize,
    /// Warnings logged per meter per minute; the rest are counted and summarised once a minute.
    pub warnings_per_minute: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            // A real meter reports every few seconds (contract §4) and replays at most its
            // outbox (96 reports on the ESP32) at once after an outage.
            reports: MessageRate {
                per_minute: 60,
                burst: 120,
            },
            // Status changes and the meter's own balance view: a few a minute at most.
            status: MessageRate {
                per_minute: 30,
                burst: 30,
            },
            max_subscriptions: 16,
            // 20 chunks of 1 KiB a second: a 1 MB image in under a minute; burst twice that.
            ota_chunks: MessageRate {
                per_minute: 1200,
                burst: 40,
            },
            max_filter_bytes: 256,
            warnings_per_minute: 5,
        }
    }
}

/// `[limits]`: what the v2 meters enforce themselves, sent to each in `command/config`
/// (issue 16). One struct so that it can become a per-tariff table. The ranges are meter-core's
/// (`meter_core::command::ranges`): a value outside them would make the meter refuse the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterLimits {
    /// 0: no power cap.
    pub power_cap_w: u32,
    pub trip_after_s: u32,
    pub reclose_after_s: u32,
    pub max_trips: u8,
    /// 0: no daily allowance.
    pub daily_allowance_wh: u32,
    pub cap_in_friendly_hours: bool,
}

impl Default for MeterLimits {
    /// All off; the timings the meter would use anyway.
    fn default() -> Self {
        MeterLimits {
            power_cap_w: 0,
            trip_after_s: 10,
            reclose_after_s: 60,
            max_trips: 3,
            daily_allowance_wh: 0,
            cap_in_friendly_hours: true,
        }
    }
}

impl fmt::Display for MeterLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.power_cap_w == 0 {
            f.write_str("no power cap")?;
        } else {
            write!(
                f,
                "power cap {} W (trip after {} s above it, reclose after {} s, off after {} trips in 30 minutes, {})",
                self.power_cap_w,
                self.trip_after_s,
                self.reclose_after_s,
                self.max_trips,
                if self.cap_in_friendly_hours {
                    "also in friendly hours"
                } else {
                    "not in friendly hours"
                }
            )?;
        }
        match self.daily_allowance_wh {
            0 => f.write_str(", no daily allowance"),
            wh => write!(f, ", daily allowance {}.{:03} kWh", wh / 1000, wh % 1000),
        }
    }
}

impl MeterLimits {
    /// The `command/config` a meter receives. `low_balance_wh` is `[ledger]`'s threshold (left
    /// out when beyond the meter's range); `utc_offset_min` the site's offset from UTC.
    pub fn config_command(
        &self,
        low_balance_wh: i64,
        utc_offset_min: i16,
    ) -> crate::payload::ConfigCommand {
        crate::payload::ConfigCommand {
            publish_interval_ms: None,
            low_balance_units: (0..=10_000_000)
                .contains(&low_balance_wh)
                .then(|| low_balance_wh as f64 / 1000.0),
            power_cap_w: Some(self.power_cap_w),
            power_trip_after_s: Some(self.trip_after_s),
            power_reclose_after_s: Some(self.reclose_after_s),
            power_max_trips: Some(self.max_trips),
            power_cap_in_friendly_hours: Some(self.cap_in_friendly_hours),
            daily_allowance_wh: Some(self.daily_allowance_wh),
            utc_offset_min: Some(utc_offset_min),
        }
    }
}

/// A token bucket's size: `burst` messages at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRate {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub tariff: Tariff,
    pub low_balance_wh: i64,
    /// See [`crate::writer::WriterOptions::commit_delay`].
    pub commit_delay: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub allow_simulate: bool,
    pub token_file: Option<PathBuf>,
    /// The original firmware's boot-time lookups, on a listener of their own.
    pub legacy_listen: Option<SocketAddr>,
    /// The admin listener's limits.
    pub limits: HttpLimits,
    /// The legacy listener's limits (its timeouts are the admin listener's).
    pub legacy_limits: HttpLimits,
    /// The dashboard's session cookie carries `Secure` (the admin API is reached over HTTPS,
    /// through a TLS-terminating proxy).
    pub dashboard_secure_cookies: bool,
}

/// One HTTP listener's timeouts and connection caps (`[api]` keys).
pub use umeme_http_guard::Limits as HttpLimits;

/// Connection caps of the legacy listener: one connection per meter at boot, quickly done.
pub const LEGACY_MAX_CONNECTIONS: usize = 128;
pub const LEGACY_MAX_CONNECTIONS_PER_IP: usize = 4;

/// `[ota]`: firmware updates over the meters' MQTT sessions (README "Firmware updates").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaConfig {
    /// The site's Ed25519 release public key: `firmware add` accepts only images it signed.
    pub release_public_key: Option<[u8; 32]>,
    /// Bytes per chunk a meter may ask for (it must fit the meter's MQTT receive buffer).
    pub chunk_size: u16,
    /// Meters downloading at once; the others are told to ask again later.
    pub max_downloads: usize,
    /// Largest image `firmware add` stores.
    pub max_image_bytes: u64,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            release_public_key: None,
            chunk_size: 1024,
            max_downloads: 50,
            max_image_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Disk cap for the database's live pages; when exceeded, telemetry is dropped oldest-first.
    pub max_bytes: u64,
    /// Delivered events are kept this long.
    pub retention: std::time::Duration,
}

/// One `[[sink]]`: where events go, with its own cursor.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub name: String,
    pub implementation: SinkImplementation,
    /// Event kinds delivered to this sink; the others are skipped (the cursor passes them).
    pub events: Vec<String>,
    pub batch_size: usize,
    /// Replay rate limit after an outage.
    pub max_events_per_second: u32,
    /// A deliver call that takes longer counts as a retryable failure.
    pub timeout: std::time::Duration,
    /// Cap of the exponential backoff between retries.
    pub retry_max: std::time::Duration,
    /// `[sink.config]`, passed to the sink as JSON.
    pub config: serde_json::Value,
    /// Where the sink was declared, for errors found later (its own config's validation).
    pub declared_at: (PathBuf, usize, usize),
    /// Where its `sha256` value stands, for a plugin file that does not match it.
    pub sha256_at: Option<(PathBuf, usize, usize)>,
}

/// What delivers a sink's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkImplementation {
    /// Built into the gateway (`builtin = "jsonl"`).
    Builtin(String),
    /// A plugin library in `plugin_dir` (`plugin = "lib….so"`, optional `sha256`).
    Plugin {
        file: String,
        sha256: Option<String>,
    },
}

/// One `[[source]]`: a payment-source plugin.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub plugin: String,
    pub sha256: Option<String>,
    /// `[source.config]`, passed to the plugin as JSON.
    pub config: serde_json::Value,
    pub declared_at: (PathBuf, usize, usize),
    /// Where its `sha256` value stands, for a plugin file that does not match it.
    pub sha256_at: Option<(PathBuf, usize, usize)>,
}

/// The event kinds of contract §6.
pub const EVENT_KINDS: [&str; 7] = [
    "consumption",
    "payment",
    "balance",
    "status",
    "alert",
    "meter",
    "ota",
];

impl Config {
    /// The configuration the daemon runs on when no file exists: everything on loopback,
    /// data in `umeme-data` (the CLI places it at the checkout's root), the simulate endpoint
    /// enabled for trying the gateway out.
    pub fn development_defaults() -> Config {
        let mut c = Config::from_partial(PartialConfig::default(), ConfigSource::BuiltInDefaults);
        c.gateway.data_dir = PathBuf::from("umeme-data");
        c.broker.listen = Some(([127, 0, 0, 1], 1883).into());
        c.api.allow_simulate = true;
        c
    }

    /// Loads `path` (or the packaged path), merging `conf.d/*.toml` beside it. With no `path`
    /// and no packaged file, returns the development defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let main = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !p.exists() {
                    return Ok(Config::development_defaults());
                }
                p
            }
        };
        let mut files = vec![main.clone()];
        let conf_d = main.parent().unwrap_or(Path::new(".")).join("conf.d");
        if conf_d.is_dir() {
            let mut extra: Vec<PathBuf> = std::fs::read_dir(&conf_d)
                .map_err(|e| io_error(&conf_d, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            extra.sort();
            files.extend(extra);
        }
        let mut merged = PartialConfig::default();
        let mut secret_files = Vec::new();
        let mut sinks: Vec<SinkConfig> = Vec::new();
        let mut sources: Vec<SourceConfig> = Vec::new();
        let mut exposure = ApiExposure::default();
        let mut meter_ports = MeterPorts::default();
        let mut tariff_book = TariffBook::default();
        for file in &files {
            let text = std::fs::read_to_string(file).map_err(|e| io_error(file, e))?;
            let mut part: PartialConfig = toml::from_str(&text).map_err(|e| {
                ConfigError::in_file(file, &text, e.span(), e.message().trim().to_string())
            })?;
            for s in part.sink.drain(..) {
                let span = s.name.span();
                let at = |msg: String| ConfigError::in_file(file, &text, Some(span.clone()), msg);
                let sha256_at =
                    locate_sha256(file, &text, s.sha256.as_ref(), "sink", &s.name.get_ref().0)?;
                if sinks.iter().any(|o| o.name == s.name.get_ref().0) {
                    return Err(at(format!(
                        "a sink named {:?} is already configured",
                        s.name.get_ref().0
                    )));
                }
                let (line, col) = line_col(&text, span.start);
                let mut sink = s.resolve((file.clone(), line, col)).map_err(at)?;
                sink.sha256_at = sha256_at;
                sinks.push(sink);
            }
            for s in part.source.drain(..) {
                let span = s.name.span();
                let at = |msg: String| ConfigError::in_file(file, &text, Some(span.clone()), msg);
                let sha256_at = locate_sha256(
                    file,
                    &text,
                    s.sha256.as_ref(),
                    "source",
                    &s.name.get_ref().0,
                )?;
                if sources
                    .iter()
                    .any(|o: &SourceConfig| o.name == s.name.get_ref().0)
                {
                    return Err(at(format!(
                        "a source named {:?} is already configured",
                        s.name.get_ref().0
                    )));
                }
                let (line, col) = line_col(&text, span.start);
                let mut source = s.resolve((file.clone(), line, col)).map_err(at)?;
                source.sha256_at = sha256_at;
                sources.push(source);
            }
            secret_files.extend(plugin_secret_files(file, &text));
            if let Some(tf) = part.api.as_ref().and_then(|a| a.token_file.as_ref()) {
                secret_files.push(Located {
                    value: SecretFile {
                        key: "token_file".into(),
                        path: tf.get_ref().clone(),
                    },
                    file: file.clone(),
                    position: line_col(&text, tf.span().start),
                });
            }
            if let Some(a) = &part.api {
                exposure.note(a, file, &text);
            }
            if let Some(b) = &part.broker {
                meter_ports.note(b, file, &text);
            }
            tariff_book.note(&part, file, &text)?;
            merged.merge(part);
        }
        let mut config = Config::from_partial(merged, ConfigSource::Files(files));
        tariff_book.check(&mut config.ledger.tariff)?;
        exposure.check(&config.api)?;
        meter_ports.check(&config.broker)?;
        config.secret_files = secret_files;
        config.sinks = sinks;
        config.sources = sources;
        Ok(config)
    }

    fn from_partial(p: PartialConfig, source: ConfigSource) -> Config {
        let g = p.gateway.unwrap_or_default();
        let b = p.broker.unwrap_or_default();
        let l = p.ledger.unwrap_or_default();
        let a = p.api.unwrap_or_default();
        let o = p.outbox.unwrap_or_default();
        let limits = p.limits.map(MeterLimits::from);
        let site_zone = p
            .site
            .as_ref()
            .and_then(|s| s.timezone)
            .map_or(crate::tariff::calendar::SiteZone::NAIROBI, |z| z.0);
        let ota = p.ota.unwrap_or_default();
        let ota_chunks_per_s = ota.chunk_requests_per_second.map_or(20, |n| n.0 as u32);
        let data_dir: PathBuf = g
            .data_dir
            .map_or_else(|| "/var/lib/umeme-gateway".into(), |p| p.0);
        Config {
            source,
            gateway: GatewayConfig {
                id: g.id.unwrap_or_else(|| GatewayId("site-001".into())),
                data_dir: data_dir.clone(),
                plugin_dir: g
                    .plugin_dir
                    .map_or_else(|| "/usr/lib/umeme-gateway/plugins".into(), |p| p.0),
            },
            broker: BrokerConfig {
                listen: b
                    .listen
                    .map_or(Some(([0, 0, 0, 0], 1883).into()), |l| l.into_inner().0),
                tls_listen: b.tls_listen.and_then(|l| l.into_inner().0),
                tls_cert_file: b.tls_cert_file.map_or_else(
                    || {
                        data_dir
                            .join(crate::tls::TLS_DIR)
                            .join(crate::tls::SERVER_CERT)
                    },
                    |p| p.0,
                ),
                tls_key_file: b.tls_key_file.map_or_else(
                    || {
                        data_dir
                            .join(crate::tls::TLS_DIR)
                            .join(crate::tls::SERVER_KEY)
                    },
                    |p| p.0,
                ),
                tls_handshake_timeout_ms: b.tls_handshake_timeout_ms.map_or(10_000, |n| n.0 as u64),
                max_tls_handshakes_per_ip: b.max_tls_handshakes_per_ip.map_or(4, |n| n.0),
                max_connections: b.max_connections.map_or(2000, |n| n.0),
                topic_prefix: b
                    .topic_prefix
                    .unwrap_or_else(|| TopicPrefix("smartmeter".into())),
                max_packet_bytes: b.max_packet_bytes.map_or(4096, |n| n.0),
                connect_timeout_ms: b.connect_timeout_ms.map_or(5_000, |n| n.0 as u64),
                session: {
                    let d = SessionLimits::default();
                    SessionLimits {
                        reports: MessageRate {
                            per_minute: b
                                .reports_per_minute
                                .map_or(d.reports.per_minute, |n| n.0 as u32),
                            burst: b.report_burst.map_or(d.reports.burst, |n| n.0 as u32),
                        },
                        status: MessageRate {
                            per_minute: b
                                .status_per_minute
                                .map_or(d.status.per_minute, |n| n.0 as u32),
                            burst: b.status_burst.map_or(d.status.burst, |n| n.0 as u32),
                        },
                        max_subscriptions: b.max_subscriptions.map_or(d.max_subscriptions, |n| n.0),
                        ota_chunks: MessageRate {
                            per_minute: ota_chunks_per_s * 60,
                            burst: ota_chunks_per_s * 2,
                        },
                        ..d
                    }
                },
                max_unauthenticated_per_ip: b.max_unauthenticated_per_ip.map_or(32, |n| n.0),
                auth_backoff_max_ms: b.auth_backoff_max_ms.map_or(10_000, |n| n.0 as u64),
            },
            ledger: LedgerConfig {
                tariff: {
                    let mut t = l
                        .units_per_kes
                        .unwrap_or(Tariff::from_units_per_kes_unchecked(0.05));
                    t.zone = site_zone;
                    t.site_limits = limits;
                    t.versions = p
                        .tariffs
                        .into_iter()
                        .map(|v| Arc::new(v.into_inner()))
                        .collect();
                    t.versions.sort_by(|a, b| {
                        (&a.name, a.effective_from).cmp(&(&b.name, b.effective_from))
                    });
                    if let Some(d) = l.default_tariff {
                        t.default = d.into_inner();
                    } else if let Some(first) = t.versions.first() {
                        t.default = first.name.clone();
                    }
                    t
                },
                low_balance_wh: l.low_balance_units.map_or(3_000, |u| u.0),
                commit_delay: l.commit_delay.map_or(DEFAULT_COMMIT_DELAY, |d| d.0),
            },
            api: {
                let header_timeout = a
                    .header_timeout
                    .map_or(HttpLimits::DEFAULT_HEADER_TIMEOUT, |d| d.0);
                let request_timeout = a
                    .request_timeout
                    .map_or(HttpLimits::DEFAULT_REQUEST_TIMEOUT, |d| d.0);
                ApiConfig {
                    listen: a
                        .listen
                        .map_or_else(|| ([127, 0, 0, 1], 8080).into(), Spanned::into_inner),
                    allow_simulate: a.allow_simulate.is_some_and(Spanned::into_inner),
                    token_file: a.token_file.map(Spanned::into_inner),
                    legacy_listen: a.legacy_listen,
                    dashboard_secure_cookies: a.dashboard_secure_cookies.unwrap_or(false),
                    limits: HttpLimits {
                        header_timeout,
                        request_timeout,
                        max_connections: a
                            .max_connections
                            .map_or(HttpLimits::DEFAULT_MAX_CONNECTIONS, |n| n.0),
                        max_connections_per_ip: a
                            .max_connections_per_ip
                            .map_or(HttpLimits::DEFAULT_MAX_CONNECTIONS_PER_IP, |n| n.0),
                    },
                    legacy_limits: HttpLimits {
                        header_timeout,
                        request_timeout,
                        max_connections: a
                            .legacy_max_connections
                            .map_or(LEGACY_MAX_CONNECTIONS, |n| n.0),
                        max_connections_per_ip: a
                            .legacy_max_connections_per_ip
                            .map_or(LEGACY_MAX_CONNECTIONS_PER_IP, |n| n.0),
                    },
                }
            },
            outbox: OutboxConfig {
                max_bytes: o.max_bytes.map_or(512 << 20, |b| b.0),
                retention: o
                    .retention
                    .map_or(std::time::Duration::from_secs(30 * 86_400), |d| d.0),
            },
            limits,
            ota: {
                let d = OtaConfig::default();
                OtaConfig {
                    release_public_key: ota.release_public_key.map(|k| k.0),
                    chunk_size: ota.chunk_size.map_or(d.chunk_size, |n| n.0 as u16),
                    max_downloads: ota.max_downloads.map_or(d.max_downloads, |n| n.0),
                    max_image_bytes: ota.max_image_bytes.map_or(d.max_image_bytes, |b| b.0),
                }
            },
            sinks: Vec::new(),
            sources: Vec::new(),
            alerts: {
                let a = p.alerts.unwrap_or_default();
                // `[alerts] timezone` overrides; the site's zone is the default.
                let own_zone = a.timezone.is_some();
                let mut t = a.resolve();
                if !own_zone {
                    t.zone = site_zone;
                }
                t
            },
            secret_files: Vec::new(),
        }
    }

    /// Checks what the configuration names on disk without touching state: every secret file
    /// (`[api] token_file`, and each `*_file` key of a plugin's config) passes the SDK's
    /// [`umeme_plugin_sdk::read_secret_file`], the function the plugins read them with.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for s in &self.secret_files {
            umeme_plugin_sdk::read_secret_file(&s.value.path).map_err(|e| ConfigError {
                file: Some(s.file.clone()),
                position: Some(s.position),
                message: format!("{}: {e}", s.value.key),
            })?;
        }
        Ok(())
    }

    /// Reads the API bearer token, when one is configured.
    pub fn api_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.api.token_file else {
            return Ok(None);
        };
        let token = umeme_plugin_sdk::read_secret_file(path).map_err(|e| ConfigError {
            file: Some(path.clone()),
            position: None,
            message: e.to_string(),
        })?;
        // Surrounding blanks are never part of a bearer token.
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError {
                file: Some(path.clone()),
                position: None,
                message: "token file is empty".into(),
            });
        }
        Ok(Some(token))
    }

    pub fn db_path(&self) -> PathBuf {
        self.gateway.data_dir.join("gateway.db")
    }
}

/// `*_file` keys that name public files rather than secrets: a CA certificate is meant to be
/// world-readable (and is often a symlink into `/etc/ssl/certs`).
const PUBLIC_FILE_KEYS: [&str; 1] = ["ca_file"];

/// Every `*_file` key (string value) inside the `[sink.config]` and `[source.config]` tables of
/// one file, nested tables and arrays too, located at the key. The gateway cannot know a
/// plugin's keys; the naming rule (README: secrets are `*_file` keys) is what it checks.
fn plugin_secret_files(file: &Path, text: &str) -> Vec<Located<SecretFile>> {
    use toml::de::{DeTable, DeValue};
    fn walk(value: &DeValue<'_>, file: &Path, text: &str, out: &mut Vec<Located<SecretFile>>) {
        match value {
            DeValue::Table(t) => {
                for (key, v) in t.iter() {
                    let name = key.get_ref().as_ref();
                    match v.get_ref() {
                        DeValue::String(path)
                            if name.ends_with("_file") && !PUBLIC_FILE_KEYS.contains(&name) =>
                        {
                            out.push(Located {
                                value: SecretFile {
                                    key: name.to_string(),
                                    path: PathBuf::from(path.as_ref()),
                                },
                                file: file.to_path_buf(),
                                position: line_col(text, key.span().start),
                            })
                        }
                        other => walk(other, file, text, out),
                    }
                }
            }
            DeValue::Array(a) => a.iter().for_each(|v| walk(v.get_ref(), file, text, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    // The text already parsed as a `PartialConfig`; this second parse keeps every key's span.
    let Ok(doc) = DeTable::parse(text) else {
        return out;
    };
    for section in ["sink", "source"] {
        let Some(DeValue::Array(entries)) = doc.get_ref().get(section).map(|v| v.get_ref()) else {
            continue;
        };
        for entry in entries.iter() {
            if let DeValue::Table(t) = entry.get_ref() {
                if let Some(config) = t.get("config") {
                    walk(config.get_ref(), file, text, &mut out);
                }
            }
        }
    }
    out
}

/// Checks a plugin's `sha256` value where it stands and returns where it stands, so a wrong
/// value and, later, a file that does not match both point at the `sha256` line.
fn locate_sha256(
    file: &Path,
    text: &str,
    sha256: Option<&Spanned<String>>,
    what: &str,
    name: &str,
) -> Result<Option<(PathBuf, usize, usize)>, ConfigError> {
    let Some(h) = sha256 else { return Ok(None) };
    check_sha256(h.get_ref()).map_err(|e| {
        ConfigError::in_file(file, text, Some(h.span()), format!("{what} {name:?}: {e}"))
    })?;
    let (line, col) = line_col(text, h.span().start);
    Ok(Some((file.to_path_buf(), line, col)))
}

fn io_error(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError {
        file: Some(path.to_path_buf()),
        position: None,
        message: e.to_string(),
    }
}

// ---- the file format: every key optional, merged file after file ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialConfig {
    gateway: Option<PartialGateway>,
    site: Option<PartialSite>,
    /// Tariff versions (issue 16); checked in [`Config::load`], where spans are known.
    #[serde(default)]
    tariffs: Vec<Spanned<crate::tariff::Tariff>>,
    broker: Option<PartialBroker>,
    ledger: Option<PartialLedger>,
    api: Option<PartialApi>,
    outbox: Option<PartialOutbox>,
    limits: Option<PartialLimits>,
    alerts: Option<PartialAlerts>,
    ota: Option<PartialOta>,
    #[serde(default)]
    sink: Vec<PartialSink>,
    #[serde(default)]
    source: Vec<PartialSource>,
}

/// `[alerts]` (README "Alerts"); every key optional, validated here so errors carry their
/// file:line:col.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialAlerts {
    enabled: Option<bool>,
    spike_factor: Option<SpikeFactor>,
    spike_floor_wh: Option<Bounded<0, 1_000_000>>,
    baseline_days: Option<Bounded<1, 60>>,
    baseline_min_days: Option<Bounded<1, 60>>,
    bypass_power_w: Option<Watts>,
    idle_after: Option<BoundedDuration<60_000, 2_592_000_000>>,
    report_interval: Option<BoundedDuration<1_000, 3_600_000>>,
    silent_intervals: Option<Bounded<2, 10_000>>,
    site_loss_percent: Option<Percent>,
    timezone: Option<Zone>,
    usage_retention_days: Option<Bounded<31, 3_660>>,
}

impl PartialAlerts {
    fn merge(&mut self, o: PartialAlerts) {
        merge_opt(&mut self.enabled, o.enabled);
        merge_opt(&mut self.spike_factor, o.spike_factor);
        merge_opt(&mut self.spike_floor_wh, o.spike_floor_wh);
        merge_opt(&mut self.baseline_days, o.baseline_days);
        merge_opt(&mut self.baseline_min_days, o.baseline_min_days);
        merge_opt(&mut self.bypass_power_w, o.bypass_power_w);
        merge_opt(&mut self.idle_after, o.idle_after);
        merge_opt(&mut self.report_interval, o.report_interval);
        merge_opt(&mut self.silent_intervals, o.silent_intervals);
        merge_opt(&mut self.site_loss_percent, o.site_loss_percent);
        merge_opt(&mut self.timezone, o.timezone);
        merge_opt(&mut self.usage_retention_days, o.usage_retention_days);
    }

    fn resolve(self) -> crate::alerts::Thresholds {
        let d = crate::alerts::Thresholds::default();
        let ms = |x: std::time::Duration| x.as_millis() as i64;
        let baseline_days = self.baseline_days.map_or(d.baseline_days, |n| n.0 as i64);
        let interval = self.report_interval.map_or(60_000, |x| ms(x.0));
        crate::alerts::Thresholds {
            enabled: self.enabled.unwrap_or(d.enabled),
            spike_factor: self.spike_factor.map_or(d.spike_factor, |x| x.0),
            spike_floor_wh: self.spike_floor_wh.map_or(d.spike_floor_wh, |n| n.0 as i64),
            baseline_days,
            // Never more days than the baseline looks at.
            baseline_min_days: self
                .baseline_min_days
                .map_or(d.baseline_min_days, |n| n.0)
                .min(baseline_days as usize),
            bypass_power_w: self.bypass_power_w.map_or(d.bypass_power_w, |x| x.0),
            idle_after_ms: self.idle_after.map_or(d.idle_after_ms, |x| ms(x.0)),
            silent_after_ms: interval * self.silent_intervals.map_or(10, |n| n.0 as i64),
            site_loss_share: self
                .site_loss_percent
                .map_or(d.site_loss_share, |p| p.0 / 100.0),
            zone: self.timezone.map_or(d.zone, |z| z.0),
            usage_retention_days: self
                .usage_retention_days
                .map_or(d.usage_retention_days, |n| n.0 as i64),
        }
    }
}

/// `[alerts] spike_factor`: more than 1, at most 100.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
struct SpikeFactor(f64);

impl TryFrom<f64> for SpikeFactor {
    type Error = String;
    fn try_from(x: f64) -> Result<Self, String> {
        if x.is_finite() && x > 1.0 && x <= 100.0 {
            Ok(SpikeFactor(x))
        } else {
            Err(format!(
                "{x} is out of range: expected more than 1 and at most 100"
            ))
        }
    }
}

/// Watts, 0 to 100 kW.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
struct Watts(f64);

impl TryFrom<f64> for Watts {
    type Error = String;
    fn try_from(x: f64) -> Result<Self, String> {
        if x.is_finite() && (0.0..=100_000.0).contains(&x) {
            Ok(Watts(x))
        } else {
            Err(format!("{x} is out of range: expected 0 to 100000 W"))
        }
    }
}

/// A percentage, more than 0 and less than 100.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
struct Percent(f64);

impl TryFrom<f64> for Percent {
    type Error = String;
    fn try_from(x: f64) -> Result<Self, String> {
        if x.is_finite() && x > 0.0 && x < 100.0 {
            Ok(Percent(x))
        } else {
            Err(format!(
                "{x} is out of range: expected more than 0 and less than 100 (percent)"
            ))
        }
    }
}

/// A site time zone: a name such as `Africa/Nairobi` or a fixed `UTC+03:00`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct Zone(crate::tariff::calendar::SiteZone);

impl TryFrom<String> for Zone {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::tariff::calendar::SiteZone::parse(&s)
            .map(Zone)
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialOta {
    release_public_key: Option<PublicKeyHex>,
    chunk_size: Option<Bounded<64, 4096>>,
    max_downloads: Option<Bounded<1, 10_000>>,
    chunk_requests_per_second: Option<Bounded<1, 1_000>>,
    max_image_bytes: Option<ByteSize>,
}

/// An Ed25519 public key as 64 hex digits (`umeme-gateway firmware keygen` prints it).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct PublicKeyHex([u8; 32]);

impl TryFrom<String> for PublicKeyHex {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::ota::parse_hex::<32>(s.trim())
            .map(PublicKeyHex)
            .ok_or_else(|| {
                "release_public_key must be 64 hex digits (the public key `umeme-gateway firmware keygen` printed)".to_string()
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialOutbox {
    max_bytes: Option<ByteSize>,
    retention: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialSink {
    name: Spanned<SinkName>,
    builtin: Option<String>,
    plugin: Option<String>,
    sha256: Option<Spanned<String>>,
    events: Option<Vec<EventKind>>,
    batch_size: Option<Bounded<1, 10_000>>,
    max_events_per_second: Option<Bounded<1, 1_000_000>>,
    timeout: Option<HumanDuration>,
    retry_max: Option<HumanDuration>,
    #[serde(default)]
    config: toml::Table,
}

impl PartialSink {
    fn resolve(self, declared_at: (PathBuf, usize, usize)) -> Result<SinkConfig, String> {
        let name = self.name.into_inner().0;
        let sha256 = self.sha256.map(Spanned::into_inner);
        let implementation = match (self.builtin, self.plugin, sha256) {
            (Some(b), None, None) if b == "jsonl" => SinkImplementation::Builtin(b),
            (Some(b), None, None) => {
                return Err(format!(
                    "sink {name:?}: unknown builtin {b:?} (available: \"jsonl\")"
                ))
            }
            (None, Some(file), sha256) => SinkImplementation::Plugin {
                file: plugin_file(&file).map_err(|e| format!("sink {name:?}: {e}"))?,
                sha256: sha256
                    .map(|h| check_sha256(&h))
                    .transpose()
                    .map_err(|e| format!("sink {name:?}: {e}"))?,
            },
            (Some(_), Some(_), _) => {
                return Err(format!(
                    "sink {name:?}: set either builtin or plugin, not both"
                ))
            }
            (_, None, Some(_)) => return Err(format!("sink {name:?}: sha256 belongs to a plugin")),
            (None, None, None) => {
                return Err(format!(
                    "sink {name:?}: set builtin = \"jsonl\" or plugin = \"lib….so\""
                ))
            }
        };
        let events = match self.events {
            Some(e) if e.is_empty() => {
                return Err(format!("sink {name:?}: events must not be empty"))
            }
            Some(e) => e.into_iter().map(|k| k.0).collect(),
            None => EVENT_KINDS.iter().map(|k| k.to_string()).collect(),
        };
        let config = toml_to_json(&toml::Value::Table(self.config));
        let timeout = self
            .timeout
            .map_or(std::time::Duration::from_secs(30), |d| d.0);
        let retry_max = self
            .retry_max
            .map_or(std::time::Duration::from_secs(300), |d| d.0);
        if timeout.is_zero() || retry_max.is_zero() {
            return Err(format!(
                "sink {name:?}: timeout and retry_max must be more than 0"
            ));
        }
        let sink = SinkConfig {
            name,
            implementation,
            events,
            batch_size: self.batch_size.map_or(100, |n| n.0),
            max_events_per_second: self.max_events_per_second.map_or(500, |n| n.0 as u32),
            timeout,
            retry_max,
            config,
            declared_at,
            sha256_at: None,
        };
        crate::outbox::check_sink_config(&sink)
            .map_err(|e| format!("sink {:?}: {e}", sink.name))?;
        Ok(sink)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialGateway {
    id: Option<GatewayId>,
    data_dir: Option<NonEmptyPath>,
    plugin_dir: Option<NonEmptyPath>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialSite {
    timezone: Option<Zone>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialBroker {
    listen: Option<Spanned<ListenOrOff>>,
    tls_listen: Option<Spanned<ListenOrOff>>,
    tls_cert_file: Option<NonEmptyPath>,
    tls_key_file: Option<NonEmptyPath>,
    tls_handshake_timeout_ms: Option<Bounded<100, 600_000>>,
    max_tls_handshakes_per_ip: Option<Bounded<1, 100_000>>,
    max_connections: Option<Bounded<1, 100_000>>,
    topic_prefix: Option<TopicPrefix>,
    max_packet_bytes: Option<Bounded<256, 1_048_576>>,
    connect_timeout_ms: Option<Bounded<100, 600_000>>,
    reports_per_minute: Option<Bounded<1, 6_000_000>>,
    report_burst: Option<Bounded<1, 1_000_000>>,
    status_per_minute: Option<Bounded<1, 6_000_000>>,
    status_burst: Option<Bounded<1, 1_000_000>>,
    max_subscriptions: Option<Bounded<1, 1_000>>,
    max_unauthenticated_per_ip: Option<Bounded<1, 100_000>>,
    auth_backoff_max_ms: Option<Bounded<250, 600_000>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialLimits {
    power_cap_w: Option<PowerCapW>,
    trip_after_s: Option<Bounded<1, 3_600>>,
    reclose_after_s: Option<Bounded<5, 86_400>>,
    max_trips: Option<Bounded<1, 10>>,
    daily_allowance_kwh: Option<AllowanceKwh>,
    cap_in_friendly_hours: Option<bool>,
}

impl From<PartialLimits> for MeterLimits {
    fn from(x: PartialLimits) -> MeterLimits {
        let d = MeterLimits::default();
        MeterLimits {
            power_cap_w: x.power_cap_w.map_or(d.power_cap_w, |n| n.0),
            trip_after_s: x.trip_after_s.map_or(d.trip_after_s, |n| n.0 as u32),
            reclose_after_s: x.reclose_after_s.map_or(d.reclose_after_s, |n| n.0 as u32),
            max_trips: x.max_trips.map_or(d.max_trips, |n| n.0 as u8),
            daily_allowance_wh: x.daily_allowance_kwh.map_or(d.daily_allowance_wh, |n| n.0),
            cap_in_friendly_hours: x.cap_in_friendly_hours.unwrap_or(d.cap_in_friendly_hours),
        }
    }
}

/// A `[[tariffs]]` entry's `limits = { … }`: the keys, ranges and errors of `[limits]`
/// (the error's span is the value's, so it is reported at file:line:col like any other).
pub(crate) fn tariff_limits<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<MeterLimits>, D::Error> {
    Ok(Some(PartialLimits::deserialize(d)?.into()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialLedger {
    units_per_kes: Option<Tariff>,
    default_tariff: Option<Spanned<String>>,
    low_balance_units: Option<UnitsAsWh>,
    commit_delay: Option<CommitDelay>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialApi {
    listen: Option<Spanned<SocketAddr>>,
    allow_simulate: Option<Spanned<bool>>,
    #[allow(dead_code)] // only ever false: true is refused while parsing
    legacy_meter_http: Option<LegacyMeterHttp>,
    token_file: Option<Spanned<PathBuf>>,
    legacy_listen: Option<SocketAddr>,
    header_timeout: Option<BoundedDuration<100, 10_000>>,
    request_timeout: Option<BoundedDuration<1_000, 600_000>>,
    max_connections: Option<Bounded<1, 10_000>>,
    max_connections_per_ip: Option<Bounded<1, 10_000>>,
    legacy_max_connections: Option<Bounded<1, 10_000>>,
    legacy_max_connections_per_ip: Option<Bounded<1, 10_000>>,
    dashboard_secure_cookies: Option<bool>,
}

/// `[api] legacy_meter_http`, kept so an old file gets a pointer to its replacement.
#[derive(Debug, Deserialize)]
#[serde(try_from = "bool")]
struct LegacyMeterHttp;

impl TryFrom<bool> for LegacyMeterHttp {
    type Error = &'static str;
    fn try_from(on: bool) -> Result<Self, Self::Error> {
        if on {
            Err("legacy_meter_http is replaced by legacy_listen = \"ADDRESS:PORT\": the original firmware's lookups now have a listener of their own, apart from the admin API")
        } else {
            Ok(LegacyMeterHttp)
        }
    }
}

/// Where `[api] listen` and `allow_simulate` were last set, to refuse an exposed admin API at
/// the key that exposes it.
#[derive(Default)]
struct ApiExposure {
    listen: Option<Located<SocketAddr>>,
    simulate: Option<Located<bool>>,
}

impl ApiExposure {
    fn note(&mut self, a: &PartialApi, file: &Path, text: &str) {
        let at = |start: usize| (file.to_path_buf(), line_col(text, start));
        if let Some(l) = &a.listen {
            let (file, position) = at(l.span().start);
            self.listen = Some(Located {
                value: *l.get_ref(),
                file,
                position,
            });
        }
        if let Some(s) = &a.allow_simulate {
            let (file, position) = at(s.span().start);
            self.simulate = Some(Located {
                value: *s.get_ref(),
                file,
                position,
            });
        }
    }

    /// The admin API off loopback needs a token for every request, and never takes simulated
    /// payments.
    fn check(&self, api: &ApiConfig) -> Result<(), ConfigError> {
        let Some(listen) = &self.listen else {
            return Ok(()); // the default is loopback
        };
        if listen.value.ip().is_loopback() {
            return Ok(());
        }
        fn err<T>(at: &Located<T>, message: String) -> ConfigError {
            ConfigError {
                file: Some(at.file.clone()),
                position: Some(at.position),
                message,
            }
        }
        if let Some(sim) = self.simulate.as_ref().filter(|s| s.value) {
            return Err(err(sim, format!(
                "allow_simulate = true is refused when [api] listen ({}) is not a loopback address: anyone on the network could credit meters",
                listen.value
            )));
        }
        if api.token_file.is_none() {
            return Err(err(listen, format!(
                "[api] listen = \"{}\" is not a loopback address: set [api] token_file so every request needs the bearer token",
                listen.value
            )));
        }
        Ok(())
    }
}

/// Later values win, key by key.
fn merge_opt<T>(into: &mut Option<T>, from: Option<T>) {
    if from.is_some() {
        *into = from;
    }
}

impl PartialConfig {
    fn merge(&mut self, o: PartialConfig) {
        if let Some(x) = o.site {
            let s = self.site.get_or_insert_with(Default::default);
            merge_opt(&mut s.timezone, x.timezone);
        }
        self.tariffs.extend(o.tariffs);
        if let Some(g) = o.gateway {
            let s = self.gateway.get_or_insert_with(Default::default);
            merge_opt(&mut s.id, g.id);
            merge_opt(&mut s.data_dir, g.data_dir);
            merge_opt(&mut s.plugin_dir, g.plugin_dir);
        }
        if let Some(b) = o.broker {
            let s = self.broker.get_or_insert_with(Default::default);
            merge_opt(&mut s.listen, b.listen);
            merge_opt(&mut s.tls_listen, b.tls_listen);
            merge_opt(&mut s.tls_cert_file, b.tls_cert_file);
            merge_opt(&mut s.tls_key_file, b.tls_key_file);
            merge_opt(&mut s.tls_handshake_timeout_ms, b.tls_handshake_timeout_ms);
            merge_opt(
                &mut s.max_tls_handshakes_per_ip,
                b.max_tls_handshakes_per_ip,
            );
            merge_opt(&mut s.max_connections, b.max_connections);
            merge_opt(&mut s.topic_prefix, b.topic_prefix);
            merge_opt(&mut s.max_packet_bytes, b.max_packet_bytes);
            merge_opt(&mut s.connect_timeout_ms, b.connect_timeout_ms);
            merge_opt(&mut s.reports_per_minute, b.reports_per_minute);
            merge_opt(&mut s.report_burst, b.report_burst);
            merge_opt(&mut s.status_per_minute, b.status_per_minute);
            merge_opt(&mut s.status_burst, b.status_burst);
            merge_opt(&mut s.max_subscriptions, b.max_subscriptions);
            merge_opt(
                &mut s.max_unauthenticated_per_ip,
                b.max_unauthenticated_per_ip,
            );
            merge_opt(&mut s.auth_backoff_max_ms, b.auth_backoff_max_ms);
        }
        if let Some(l) = o.ledger {
            let s = self.ledger.get_or_insert_with(Default::default);
            merge_opt(&mut s.units_per_kes, l.units_per_kes);
            merge_opt(&mut s.default_tariff, l.default_tariff);
            merge_opt(&mut s.low_balance_units, l.low_balance_units);
            merge_opt(&mut s.commit_delay, l.commit_delay);
        }
        if let Some(x) = o.limits {
            let s = self.limits.get_or_insert_with(Default::default);
            merge_opt(&mut s.power_cap_w, x.power_cap_w);
            merge_opt(&mut s.trip_after_s, x.trip_after_s);
            merge_opt(&mut s.reclose_after_s, x.reclose_after_s);
            merge_opt(&mut s.max_trips, x.max_trips);
            merge_opt(&mut s.daily_allowance_kwh, x.daily_allowance_kwh);
            merge_opt(&mut s.cap_in_friendly_hours, x.cap_in_friendly_hours);
        }
        if let Some(x) = o.alerts {
            self.alerts.get_or_insert_with(Default::default).merge(x);
        }
        if let Some(x) = o.ota {
            let s = self.ota.get_or_insert_with(Default::default);
            merge_opt(&mut s.release_public_key, x.release_public_key);
            merge_opt(&mut s.chunk_size, x.chunk_size);
            merge_opt(&mut s.max_downloads, x.max_downloads);
            merge_opt(
                &mut s.chunk_requests_per_second,
                x.chunk_requests_per_second,
            );
            merge_opt(&mut s.max_image_bytes, x.max_image_bytes);
        }
        if let Some(x) = o.outbox {
            let s = self.outbox.get_or_insert_with(Default::default);
            merge_opt(&mut s.max_bytes, x.max_bytes);
            merge_opt(&mut s.retention, x.retention);
        }
        if let Some(a) = o.api {
            let s = self.api.get_or_insert_with(Default::default);
            merge_opt(&mut s.listen, a.listen);
            merge_opt(&mut s.allow_simulate, a.allow_simulate);
            merge_opt(&mut s.legacy_meter_http, a.legacy_meter_http);
            merge_opt(&mut s.token_file, a.token_file);
            merge_opt(&mut s.legacy_listen, a.legacy_listen);
            merge_opt(&mut s.dashboard_secure_cookies, a.dashboard_secure_cookies);
            merge_opt(&mut s.header_timeout, a.header_timeout);
            merge_opt(&mut s.request_timeout, a.request_timeout);
            merge_opt(&mut s.max_connections, a.max_connections);
            merge_opt(&mut s.max_connections_per_ip, a.max_connections_per_ip);
            merge_opt(&mut s.legacy_max_connections, a.legacy_max_connections);
            merge_opt(
                &mut s.legacy_max_connections_per_ip,
                a.legacy_max_connections_per_ip,
            );
        }
    }
}

// ---- validated values ----

/// The site's id: goes into every event id, so it must be safe as a Firebase key and an MQTT
/// topic level.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct GatewayId(String);

impl GatewayId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GatewayId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(GatewayId(s))
        } else {
            Err(format!(
                "gateway id {s:?} must be 1 to 32 characters of A-Z, a-z, 0-9, '-' or '_'"
            ))
        }
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The first topic levels of every meter topic (`smartmeter` in the original project).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TopicPrefix(String);

impl TopicPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TopicPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = s.is_empty()
            || s.len() > 64
            || s.starts_with('$')
            || s.starts_with('/')
            || s.ends_with('/')
            || s.split('/').any(|l| l.is_empty())
            || s.contains(['+', '#', '\0']);
        if bad {
            Err(format!(
                "topic prefix {s:?} must be non-empty topic levels without wildcards, '$', or empty levels"
            ))
        } else {
            Ok(TopicPrefix(s))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "PathBuf")]
struct NonEmptyPath(PathBuf);

/// A listener's address, or `"off"` (`[broker] listen` and `tls_listen`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct ListenOrOff(Option<SocketAddr>);

impl TryFrom<String> for ListenOrOff {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == "off" {
            return Ok(ListenOrOff(None));
        }
        s.parse().map(|a| ListenOrOff(Some(a))).map_err(|_| {
            format!("expected an address and port such as \"0.0.0.0:8883\", or \"off\"; got {s:?}")
        })
    }
}

/// Where `[broker] listen` and `tls_listen` were last set, to refuse a meter port with both
/// listeners off at the key that turned the last one off.
#[derive(Default)]
struct MeterPorts {
    listen: Option<(PathBuf, usize, usize)>,
}

impl MeterPorts {
    fn note(&mut self, b: &PartialBroker, file: &Path, text: &str) {
        if let Some(l) = &b.listen {
            let (line, col) = line_col(text, l.span().start);
            self.listen = Some((file.to_path_buf(), line, col));
        }
    }

    fn check(&self, b: &BrokerConfig) -> Result<(), ConfigError> {
        match (&self.listen, b.listen, b.tls_listen) {
            (Some(at), None, None) => Err(ConfigError::at(
                at,
                "[broker] listen = \"off\" needs [broker] tls_listen: meters would have no way in"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

impl TryFrom<PathBuf> for NonEmptyPath {
    type Error = &'static str;
    fn try_from(p: PathBuf) -> Result<Self, Self::Error> {
        if p.as_os_str().is_empty() {
            Err("path must not be empty")
        } else {
            Ok(NonEmptyPath(p))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialSource {
    name: Spanned<SinkName>,
    plugin: String,
    sha256: Option<Spanned<String>>,
    #[serde(default)]
    config: toml::Table,
}

impl PartialSource {
    fn resolve(self, declared_at: (PathBuf, usize, usize)) -> Result<SourceConfig, String> {
        let name = self.name.into_inner().0;
        Ok(SourceConfig {
            plugin: plugin_file(&self.plugin).map_err(|e| format!("source {name:?}: {e}"))?,
            sha256: self
                .sha256
                .map(|h| check_sha256(h.get_ref()))
                .transpose()
                .map_err(|e| format!("source {name:?}: {e}"))?,
            config: toml_to_json(&toml::Value::Table(self.config)),
            name,
            declared_at,
            sha256_at: None,
        })
    }
}

fn plugin_file(file: &str) -> Result<String, String> {
    let ok =
        file.ends_with(".so") && file.len() > 3 && !file.contains('/') && !file.starts_with('.');
    if ok {
        Ok(file.to_string())
    } else {
        Err(format!("plugin {file:?} must be a bare file name ending in .so (it is looked up in plugin_dir)"))
    }
}

fn check_sha256(h: &str) -> Result<String, String> {
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(format!(
            "sha256 {h:?} must be 64 hexadecimal digits (sha256sum's output)"
        ))
    }
}

/// TOML to JSON for plugin configs; datetimes become RFC 3339 strings.
pub fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// A sink's name: names its cursor, so it must be stable and simple.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
struct SinkName(String);

impl TryFrom<String> for SinkName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 40
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(SinkName(s))
        } else {
            Err(format!(
                "sink name {s:?} must be 1 to 40 characters of A-Z, a-z, 0-9, '-' or '_'"
            ))
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
struct EventKind(String);

impl TryFrom<String> for EventKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if EVENT_KINDS.contains(&s.as_str()) {
            Ok(EventKind(s))
        } else {
            Err(format!(
                "unknown event kind {s:?}; kinds are {}",
                EVENT_KINDS.join(", ")
            ))
        }
    }
}

/// `"512MiB"`, `"64MB"`, `"4096"`, or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub struct ByteSize(pub u64);

impl TryFrom<toml::Value> for ByteSize {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        let text = match v {
            toml::Value::Integer(n) if n > 0 => return Ok(ByteSize(n as u64)),
            toml::Value::String(s) => s,
            other => return Err(format!("expected a size such as \"512MiB\", got {other}")),
        };
        parse_byte_size(&text).map(ByteSize)
    }
}

pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"512MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {text:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(b) if b > 0 => Ok(b),
        _ => Err(format!("{text:?} is out of range")),
    }
}

/// `"30d"`, `"12h"`, `"5m"`, `"30s"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub std::time::Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as \"30d\""))?;
        let ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            u => {
                return Err(format!(
                    "unknown duration unit {u:?} in {text:?} (ms, s, m, h, d)"
                ))
            }
        };
        n.checked_mul(ms)
            .filter(|ms| *ms <= 10 * 365 * 86_400_000)
            .map(|ms| HumanDuration(std::time::Duration::from_millis(ms)))
            .ok_or_else(|| format!("{text:?} is out of range (at most ten years)"))
    }
}

/// Meters hardly notice 20 ms before a PUBACK; at 100 reports/s it halves the bytes written
/// per report (docs/benchmarks.md).
const DEFAULT_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// `[ledger] commit_delay`: a duration of at most one second (meters wait for their PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
struct CommitDelay(std::time::Duration);

impl TryFrom<String> for CommitDelay {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let d = HumanDuration::try_from(text.clone())?.0;
        if d > std::time::Duration::from_secs(1) {
            return Err(format!(
                "{text:?} is too long: at most \"1s\" (each report waits this long for its PUBACK)"
            ));
        }
        Ok(CommitDelay(d))
    }
}

/// A duration of `MIN_MS..=MAX_MS` milliseconds, written as `"10s"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "String")]
struct BoundedDuration<const MIN_MS: u64, const MAX_MS: u64>(std::time::Duration);

impl<const MIN_MS: u64, const MAX_MS: u64> TryFrom<String> for BoundedDuration<MIN_MS, MAX_MS> {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let d = HumanDuration::try_from(text.clone())?.0;
        let ms = d.as_millis();
        if ms < u128::from(MIN_MS) || ms > u128::from(MAX_MS) {
            return Err(format!(
                "{text:?} is out of range: expected {MIN_MS}ms to {MAX_MS}ms"
            ));
        }
        Ok(BoundedDuration(d))
    }
}

/// An integer that must lie in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "i64")]
struct Bounded<const MIN: i64, const MAX: i64>(usize);

impl<const MIN: i64, const MAX: i64> TryFrom<i64> for Bounded<MIN, MAX> {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        if (MIN..=MAX).contains(&n) {
            Ok(Bounded(n as usize))
        } else {
            Err(format!("{n} is out of range: expected {MIN} to {MAX}"))
        }
    }
}

/// `[limits] power_cap_w`: 0 (off) or 100 to 50000 W, the meter's range.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "i64")]
struct PowerCapW(u32);

impl TryFrom<i64> for PowerCapW {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        if n == 0 || (100..=50_000).contains(&n) {
            Ok(PowerCapW(n as u32))
        } else {
            Err(format!(
                "{n} is out of range: expected 0 (no cap) or 100 to 50000 W"
            ))
        }
    }
}

/// `[limits] daily_allowance_kwh`: 0 (off) or 0.1 to 1000 kWh, whole Wh inside.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
struct AllowanceKwh(u32);

impl TryFrom<f64> for AllowanceKwh {
    type Error = String;
    fn try_from(k: f64) -> Result<Self, String> {
        if k == 0.0 || (k.is_finite() && (0.1..=1000.0).contains(&k)) {
            Ok(AllowanceKwh((k * 1000.0).round() as u32))
        } else {
            Err(format!(
                "{k} is out of range: expected 0 (no allowance) or 0.1 to 1000 kWh"
            ))
        }
    }
}

/// Energy units (kWh) in the file, whole Wh inside.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
struct UnitsAsWh(i64);

impl TryFrom<f64> for UnitsAsWh {
    type Error = String;
    fn try_from(u: f64) -> Result<Self, String> {
        if u.is_finite() && (0.0..=1_000_000.0).contains(&u) {
            Ok(UnitsAsWh((u * 1000.0).round() as i64))
        } else {
            Err(format!("{u} is out of range: expected 0 to 1000000 units"))
        }
    }
}

/// The site's pricing (issue 16): `[site] timezone`, the `[[tariffs]]` versions and
/// `[ledger] default_tariff`; without `[[tariffs]]`, one implicit flat tariff named
/// [`IMPLICIT_TARIFF`] at `1 / [ledger] units_per_kes` KES per kWh. (The type kept its name
/// from when it was only `units_per_kes`, held exactly as nano-units per KES.)
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Tariff {
    nano_units_per_kes: i64,
    /// `[site] timezone`.
    pub zone: crate::tariff::calendar::SiteZone,
    /// Every version of every tariff, by name then `effective_from` (none first).
    versions: Vec<Arc<crate::tariff::Tariff>>,
    /// `[ledger] default_tariff` (else the first tariff by name, or the implicit one).
    default: String,
    /// The implicit flat tariff, built once (the report path must not allocate it).
    implicit: Arc<crate::tariff::Tariff>,
    /// `[limits]`: what a meter whose tariff has no `limits` enforces.
    pub site_limits: Option<MeterLimits>,
}

/// The name of the flat tariff a site without `[[tariffs]]` has.
pub const IMPLICIT_TARIFF: &str = "flat";

impl Tariff {
    fn from_units_per_kes_unchecked(u: f64) -> Tariff {
        Tariff::from_nano_units((u * 1e9) as i64)
    }

    fn from_nano_units(nano_units_per_kes: i64) -> Tariff {
        Tariff {
            nano_units_per_kes,
            zone: crate::tariff::calendar::SiteZone::NAIROBI,
            versions: Vec::new(),
            default: IMPLICIT_TARIFF.into(),
            implicit: Arc::new(Tariff::implicit(nano_units_per_kes)),
            site_limits: None,
        }
    }

    /// The implicit flat tariff: `1 / units_per_kes` KES per kWh, rounded to the nearest
    /// 0.0001 KES (exact for the usual 0.05, 0.1, 0.04, …).
    fn implicit(nano_units_per_kes: i64) -> crate::tariff::Tariff {
        let price = (10_000_000_000_000i128 + i128::from(nano_units_per_kes) / 2)
            / i128::from(nano_units_per_kes.max(1));
        crate::tariff::Tariff::flat(
            IMPLICIT_TARIFF,
            crate::tariff::Decimal(price.min(i128::from(crate::tariff::MAX_DECIMAL)) as i64),
        )
    }

    /// Whether `[[tariffs]]` (or the implicit tariff) has a tariff of this name.
    pub fn knows(&self, name: &str) -> bool {
        if self.versions.is_empty() {
            return name == IMPLICIT_TARIFF;
        }
        self.versions.iter().any(|v| v.name == name)
    }

    /// The tariff names, for messages.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.versions.iter().map(|v| v.name.clone()).collect();
        n.dedup();
        if n.is_empty() {
            n.push(IMPLICIT_TARIFF.into());
        }
        n
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// Whether the site configured `[[tariffs]]` (else it has the implicit flat one).
    pub fn configured(&self) -> bool {
        !self.versions.is_empty()
    }

    /// The version of a meter's tariff (`None`: the default) in force at `at_ms`: the newest
    /// whose `effective_from` has begun (local midnight), else the oldest. A name no longer
    /// configured falls back to the default (the caller warns).
    pub fn in_force(&self, meter_tariff: Option<&str>, at_ms: i64) -> Arc<crate::tariff::Tariff> {
        if self.versions.is_empty() {
            return self.implicit.clone();
        }
        let name = meter_tariff
            .filter(|n| self.knows(n))
            .unwrap_or(&self.default);
        let mut chosen = None;
        for v in self.versions.iter().filter(|v| v.name == name) {
            let starts = v.effective_from.map_or(i64::MIN, |d| self.zone.midnight(d));
            if chosen.is_none() || starts <= at_ms {
                chosen = Some(v);
            }
        }
        chosen
            .or_else(|| self.versions.first())
            .cloned()
            .expect("versions is not empty")
    }

    /// The limits a meter on `meter_tariff` enforces at `at_ms`: its tariff version's
    /// `limits`, else the site's `[limits]`, else none (no `command/config` is sent).
    pub fn limits_for(&self, meter_tariff: Option<&str>, at_ms: i64) -> Option<MeterLimits> {
        self.in_force(meter_tariff, at_ms)
            .limits
            .or(self.site_limits)
    }

    /// Every configured version (empty without `[[tariffs]]`: the implicit tariff has no
    /// friendly hours).
    pub fn versions(&self) -> &[Arc<crate::tariff::Tariff>] {
        &self.versions
    }

    pub fn units_per_kes(&self) -> f64 {
        self.nano_units_per_kes as f64 / 1e9
    }

    /// Energy bought by `cents`: floor(A × units_per_kes × 1000) Wh for A = cents / 100 KES.
    pub fn credit_wh(&self, cents: i64) -> i64 {
        let wh = i128::from(cents) * i128::from(self.nano_units_per_kes) / 100_000_000;
        wh.clamp(0, i128::from(i64::MAX)) as i64
    }
}

impl TryFrom<f64> for Tariff {
    type Error = String;
    fn try_from(u: f64) -> Result<Self, String> {
        if u.is_finite() && u > 0.0 && u <= 1000.0 {
            Ok(Tariff::from_nano_units((u * 1e9).round() as i64))
        } else {
            Err(format!(
                "{u} is out of range: expected more than 0 and at most 1000"
            ))
        }
    }
}

/// A tariff version's name, effective date and where it stands.
type TariffEntry = (
    String,
    Option<crate::tariff::calendar::LocalDate>,
    (PathBuf, usize, usize),
);

/// Where each `[[tariffs]]` entry and `default_tariff` stood, for the checks that need every
/// file (a version repeated across files, a default naming no tariff).
#[derive(Default)]
struct TariffBook {
    entries: Vec<TariffEntry>,
    default_at: Option<(PathBuf, usize, usize)>,
}

impl TariffBook {
    /// Checks each tariff of one file with [`crate::tariff::Tariff::validate`], located at the
    /// field it names (else at the entry).
    fn note(&mut self, part: &PartialConfig, file: &Path, text: &str) -> Result<(), ConfigError> {
        for (i, t) in part.tariffs.iter().enumerate() {
            let at = line_col(text, t.span().start);
            if let Err(errors) = t.get_ref().validate() {
                let first = &errors[0];
                let span = locate_field(text, i, &first.field).unwrap_or(t.span());
                let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                return Err(ConfigError::in_file(
                    file,
                    text,
                    Some(span),
                    format!("tariff {:?}: {}", t.get_ref().name, all.join("; ")),
                ));
            }
            let key = (t.get_ref().name.clone(), t.get_ref().effective_from);
            if self
                .entries
                .iter()
                .any(|(n, d, _)| (n, d) == (&key.0, &key.1))
            {
                let when = key.1.map_or("without effective_from".into(), |d| {
                    format!("effective from {d}")
                });
                return Err(ConfigError::in_file(
                    file,
                    text,
                    Some(t.span()),
                    format!("tariff {:?} {when} is configured twice", key.0),
                ));
            }
            self.entries
                .push((key.0, key.1, (file.to_path_buf(), at.0, at.1)));
        }
        if let Some(d) = part.ledger.as_ref().and_then(|l| l.default_tariff.as_ref()) {
            let (line, col) = line_col(text, d.span().start);
            self.default_at = Some((file.to_path_buf(), line, col));
        }
        Ok(())
    }

    fn check(&self, t: &mut Tariff) -> Result<(), ConfigError> {
        if let Some(at) = &self.default_at {
            if !t.knows(&t.default) {
                return Err(ConfigError::at(
                    at,
                    format!(
                        "default_tariff {:?} is not a configured tariff (known: {})",
                        t.default,
                        t.names().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The span of `tariffs[entry].<field>` (`bands[1].from_kwh`, `tou`) in `text`: the deepest
/// part of the path that exists.
fn locate_field(text: &str, entry: usize, field: &str) -> Option<std::ops::Range<usize>> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let tariffs = doc.get_ref().get("tariffs")?;
    let DeValue::Array(a) = tariffs.get_ref() else {
        return None;
    };
    let mut at = a.get(entry)?;
    let mut span = at.span();
    for part in field.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let DeValue::Table(t) = at.get_ref() else {
            break;
        };
        let Some(v) = t.get(key) else { break };
        at = v;
        span = at.span();
        if let Some(i) = index {
            let DeValue::Array(a) = at.get_ref() else {
                break;
            };
            let Some(v) = a.get(i) else { break };
            at = v;
            span = at.span();
        }
    }
    Some(span)
}

impl From<MeterIdError> for ConfigError {
    fn from(e: MeterIdError) -> Self {
        ConfigError {
            file: None,
            position: None,
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn limits_are_off_without_the_section_and_checked_and_located_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nlisten = \"0.0.0.0:1883\"\n",
        );
        assert_eq!(Config::load(Some(&p)).unwrap().limits, None);
        let p = write(
            dir.path(),
            "g.toml",
            "[limits]\npower_cap_w = 1500\ndaily_allowance_kwh = 2\n",
        );
        let l = Config::load(Some(&p)).unwrap().limits.unwrap();
        assert_eq!(
            l,
            MeterLimits {
                power_cap_w: 1500,
                daily_allowance_wh: 2000,
                ..MeterLimits::default()
            }
        );
        for (text, pos, needle) in [
            (
                "[limits]\npower_cap_w = 50\n",
                (2, 15),
                "0 (no cap) or 100 to 50000",
            ),
            ("[limits]\ntrip_after_s = 0\n", (2, 16), "1 to 3600"),
            ("[limits]\nreclose_after_s = 2\n", (2, 19), "5 to 86400"),
            ("[limits]\nmax_trips = 11\n", (2, 13), "1 to 10"),
            (
                "[limits]\ndaily_allowance_kwh = 0.05\n",
                (2, 23),
                "0.1 to 1000 kWh",
            ),
            ("[limits]\ncap_in_friendly_hours = 1\n", (2, 25), "bool"),
            ("[limits]\ncap_per_tenant = 1\n", (2, 1), "cap_per_tenant"),
        ] {
            let p = write(dir.path(), "g.toml", text);
            let e = Config::load(Some(&p)).unwrap_err();
            assert_eq!(e.position, Some(pos), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_located_by_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nlisten = \"0.0.0.0:1883\"\nlistne = 1\n",
        );
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((3, 1)), "{e}");
        assert!(e.to_string().contains("g.toml:3:1"), "{e}");
        assert!(e.message.contains("listne"), "{e}");
    }

    #[test]
    fn broker_admission_limits_are_checked_and_located() {
        let dir = tempfile::tempdir().unwrap();
        for (text, col) in [
            ("[broker]\nmax_unauthenticated_per_ip = 0\n", 30),
            ("[broker]\nauth_backoff_max_ms = 10\n", 23),
        ] {
            let p = write(dir.path(), "g.toml", text);
            let e = Config::load(Some(&p)).unwrap_err();
            assert_eq!(e.position, Some((2, col)), "{e}");
            assert!(e.message.contains("out of range"), "{e}");
        }
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nmax_unauthenticated_per_ip = 4\nauth_backoff_max_ms = 2000\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.broker.max_unauthenticated_per_ip, 4);
        assert_eq!(c.broker.auth_backoff_max_ms, 2000);
    }

    #[test]
    fn the_plain_meter_port_can_be_turned_off_when_tls_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "g.toml", "[gateway]\ndata_dir = \"/srv/u\"\n");
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.broker.listen, Some(([0, 0, 0, 0], 1883).into()));
        assert_eq!(c.broker.tls_listen, None, "TLS is off unless set");
        assert_eq!(c.broker.tls_cert_file, Path::new("/srv/u/tls/server.crt"));
        assert_eq!(c.broker.tls_key_file, Path::new("/srv/u/tls/server.key"));
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nlisten = \"off\"\ntls_listen = \"0.0.0.0:8883\"\ntls_handshake_timeout_ms = 2000\nmax_tls_handshakes_per_ip = 2\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.broker.listen, None);
        assert_eq!(c.broker.tls_listen, Some(([0, 0, 0, 0], 8883).into()));
        assert_eq!(c.broker.tls_handshake_timeout_ms, 2000);
        assert_eq!(c.broker.max_tls_handshakes_per_ip, 2);
    }

    #[test]
    fn both_meter_listeners_off_is_refused_at_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "g.toml", "[broker]\nlisten = \"off\"\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 10)), "{e}");
        assert!(e.message.contains("tls_listen"), "{e}");
        let p = write(dir.path(), "g.toml", "[broker]\ntls_listen = \"8883\"\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 14)), "{e}");
        assert!(e.message.contains("\"off\""), "{e}");
    }

    #[test]
    fn bad_value_is_located_at_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "g.toml", "[ledger]\nunits_per_kes = -1.0\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 17)), "{e}");
        let p = write(dir.path(), "g.toml", "[broker]\nlisten = \"nowhere\"\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 10)), "{e}");
        let p = write(dir.path(), "g.toml", "[broker]\ntopic_prefix = \"a/#\"\n");
        assert!(Config::load(Some(&p)).is_err());
        let p = write(dir.path(), "g.toml", "[gateway]\nid = \"has space\"\n");
        assert!(Config::load(Some(&p)).is_err());
    }

    #[test]
    fn conf_d_files_override_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "gateway.toml",
            "[api]\nlisten = \"127.0.0.1:1\"\n",
        );
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        write(
            &dir.path().join("conf.d"),
            "20-b.toml",
            "[api]\nlisten = \"127.0.0.1:3\"\n",
        );
        write(
            &dir.path().join("conf.d"),
            "10-a.toml",
            "[api]\nlisten = \"127.0.0.1:2\"\nallow_simulate = true\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.api.listen.port(), 3);
        assert!(c.api.allow_simulate);
        let bad = write(&dir.path().join("conf.d"), "30-c.toml", "[api\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.file.as_deref(), Some(bad.as_path()));
    }

    #[test]
    fn ota_keys_are_validated_at_their_position() {
        let dir = tempfile::tempdir().unwrap();
        for (text, line, col) in [
            ("[ota]\nrelease_public_key = \"abc\"\n", 2, 22),
            ("[ota]\nchunk_size = 10000\n", 2, 14),
            ("[ota]\nmax_downloads = 0\n", 2, 17),
            ("[ota]\nchunk_requests_per_second = 0\n", 2, 29),
            ("[ota]\nmax_image_bytes = \"4 parsecs\"\n", 2, 19),
            ("[ota]\nrelease_key = \"x\"\n", 2, 1),
        ] {
            let p = write(dir.path(), "g.toml", text);
            let e = Config::load(Some(&p)).unwrap_err();
            assert_eq!(e.position, Some((line, col)), "{text}: {e}");
        }
        let key = "ab".repeat(32);
        let p = write(
            dir.path(),
            "g.toml",
            &format!("[ota]\nrelease_public_key = \"{key}\"\nchunk_size = 512\nchunk_requests_per_second = 5\n"),
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.ota.release_public_key, Some([0xab; 32]));
        assert_eq!(c.ota.chunk_size, 512);
        assert_eq!(
            c.broker.session.ota_chunks,
            MessageRate {
                per_minute: 300,
                burst: 10
            }
        );
    }

    #[test]
    fn shipped_config_parses_and_matches_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/gateway.toml");
        let c = Config::load(Some(&shipped)).unwrap();
        let d = Config::from_partial(PartialConfig::default(), ConfigSource::BuiltInDefaults);
        assert_eq!(c.gateway.id, d.gateway.id);
        assert_eq!(c.gateway.data_dir, d.gateway.data_dir);
        assert_eq!(c.broker.listen, d.broker.listen);
        assert_eq!(c.broker.max_packet_bytes, d.broker.max_packet_bytes);
        assert_eq!(c.broker.session, d.broker.session);
        assert_eq!(
            c.broker.max_unauthenticated_per_ip,
            d.broker.max_unauthenticated_per_ip
        );
        assert_eq!(c.broker.auth_backoff_max_ms, d.broker.auth_backoff_max_ms);
        assert_eq!(c.ledger.tariff, d.ledger.tariff);
        assert_eq!(c.ledger.low_balance_wh, d.ledger.low_balance_wh);
        assert_eq!(c.api.listen, d.api.listen);
        assert!(!c.api.allow_simulate);
        assert_eq!(c.api.limits, d.api.limits);
        assert_eq!(c.api.legacy_limits, d.api.legacy_limits);
        assert_eq!(c.api.legacy_listen, None);
        assert_eq!(
            c.limits, None,
            "the shipped [limits] is commented out: nothing is sent"
        );
        // Uncommented, that block gives the defaults.
        let text = std::fs::read_to_string(&shipped).unwrap();
        let block: String = text
            .lines()
            .skip_while(|l| *l != "# [limits]")
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[')
                    || l.split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "limits.toml", &block);
        let limits = Config::load(Some(&p)).unwrap().limits;
        assert_eq!(limits, Some(MeterLimits::default()), "{block}");
        assert_eq!(c.ota, d.ota);
        assert_eq!(c.ota, OtaConfig::default());
        assert_eq!(c.alerts, d.alerts);
    }

    #[test]
    fn alert_thresholds_are_validated_where_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        for (text, position) in [
            ("[alerts]\nspike_factor = 1.0\n", (2, 16)),
            ("[alerts]\nsite_loss_percent = 100\n", (2, 21)),
            ("[alerts]\ntimezone = \"Mars/Olympus\"\n", (2, 12)),
            ("[alerts]\nidle_after = \"10s\"\n", (2, 14)),
            ("[alerts]\nsilent_intervals = 1\n", (2, 20)),
            ("[alerts]\nbypass_power_w = -5\n", (2, 18)),
            ("[alerts]\nspike = 3\n", (2, 1)),
        ] {
            let p = write(dir.path(), "g.toml", text);
            let e = Config::load(Some(&p)).unwrap_err();
            assert_eq!(e.position, Some(position), "{text}: {e}");
        }
        let p = write(
            dir.path(),
            "g.toml",
            "[alerts]\nreport_interval = \"30s\"\nsilent_intervals = 4\nsite_loss_percent = 15\nbaseline_days = 2\ntimezone = \"UTC+05:30\"\n",
        );
        let a = Config::load(Some(&p)).unwrap().alerts;
        assert_eq!(a.silent_after_ms, 120_000);
        assert_eq!(a.site_loss_share, 0.15);
        assert_eq!(
            a.baseline_min_days, 2,
            "never more than the baseline's days"
        );
        assert_eq!(a.zone.offset_minutes(), 330);
    }

    #[test]
    fn http_limits_have_their_defaults_and_merge_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = Config::from_partial(PartialConfig::default(), ConfigSource::BuiltInDefaults);
        assert_eq!(d.api.limits, HttpLimits::default());
        assert_eq!(d.api.limits.header_timeout.as_secs(), 10);
        assert_eq!(d.api.legacy_limits.max_connections, LEGACY_MAX_CONNECTIONS);
        let main = write(
            dir.path(),
            "gateway.toml",
            "[api]\nheader_timeout = \"2s\"\nmax_connections = 8\n",
        );
        std::fs::create_dir_all(dir.path().join("conf.d")).unwrap();
        write(
            &dir.path().join("conf.d"),
            "10-legacy.toml",
            "[api]\nlegacy_listen = \"0.0.0.0:8081\"\nlegacy_max_connections_per_ip = 2\n",
        );
        let c = Config::load(Some(&main)).unwrap();
        assert_eq!(
            c.api.limits.header_timeout,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(
            c.api.legacy_limits.header_timeout,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(c.api.limits.max_connections, 8);
        assert_eq!(c.api.legacy_limits.max_connections_per_ip, 2);
        assert_eq!(c.api.legacy_listen, Some(([0, 0, 0, 0], 8081).into()));
    }

    #[test]
    fn dashboard_secure_cookies_is_off_by_default_and_a_non_boolean_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "g.toml", "[api]\n");
        assert!(!Config::load(Some(&p)).unwrap().api.dashboard_secure_cookies);
        let p = write(
            dir.path(),
            "g.toml",
            "[api]\ndashboard_secure_cookies = true\n",
        );
        assert!(Config::load(Some(&p)).unwrap().api.dashboard_secure_cookies);
        let p = write(
            dir.path(),
            "g.toml",
            "[api]\ndashboard_secure_cookies = \"yes\"\n",
        );
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 28)), "{e}");
    }

    #[test]
    fn meter_session_limits_parse_and_a_zero_rate_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nreports_per_minute = 600\nreport_burst = 1000\nstatus_per_minute = 6\nstatus_burst = 3\nmax_subscriptions = 4\n",
        );
        let s = Config::load(Some(&p)).unwrap().broker.session;
        assert_eq!((s.reports.per_minute, s.reports.burst), (600, 1000));
        assert_eq!((s.status.per_minute, s.status.burst), (6, 3));
        assert_eq!(s.max_subscriptions, 4);
        assert_eq!(
            s.max_filter_bytes,
            SessionLimits::default().max_filter_bytes
        );
        let p = write(dir.path(), "g.toml", "[broker]\nstatus_per_minute = 0\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 21)), "{e}");
        let p = write(
            dir.path(),
            "g.toml",
            "[broker]\nmax_subscriptions = 100000\n",
        );
        assert!(Config::load(Some(&p)).is_err());
    }

    #[test]
    fn sinks_and_outbox_parse_with_sizes_and_durations() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[outbox]\nmax_bytes = \"64MiB\"\nretention = \"7d\"\n\n[[sink]]\nname = \"audit\"\nbuiltin = \"jsonl\"\nevents = [\"payment\"]\ntimeout = \"2s\"\n[sink.config]\ndir = \"/tmp/x\"\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.outbox.max_bytes, 64 << 20);
        assert_eq!(c.outbox.retention.as_secs(), 7 * 86_400);
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.sinks[0].events, ["payment"]);
        assert_eq!(c.sinks[0].config["dir"], "/tmp/x");
        assert_eq!(c.sinks[0].declared_at.1, 6);

        let p = write(dir.path(), "g.toml", "[[sink]]\nname = \"a\"\nbuiltin = \"jsonl\"\nevents = [\"bogus\"]\n[sink.config]\ndir = \"/tmp/x\"\n");
        assert_eq!(
            Config::load(Some(&p)).unwrap_err().position.map(|p| p.0),
            Some(4)
        );
        let p = write(
            dir.path(),
            "g.toml",
            "[[sink]]\nname = \"a\"\nplugin = \"../libx.so\"\n",
        );
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 8)), "{e}");
        assert!(e.message.contains("bare file name"), "{e}");
        let p = write(
            dir.path(),
            "g.toml",
            "[[sink]]\nname = \"a\"\nplugin = \"libx.so\"\nsha256 = \"abc\"\n",
        );
        assert!(Config::load(Some(&p))
            .unwrap_err()
            .message
            .contains("64 hexadecimal"));
        let p = write(
            dir.path(),
            "g.toml",
            "[[source]]\nname = \"m\"\nplugin = \"libd.so\"\n[source.config]\nwhen = 2026-11-27T10:00:00Z\nn = 1.5\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(
            c.sources[0].config["when"], "2026-11-27T10:00:00Z",
            "datetimes become RFC 3339 strings"
        );
        assert_eq!(c.sources[0].config["n"], 1.5);
        let p = write(
            dir.path(),
            "g.toml",
            "[[sink]]\nname = \"a\"\nbuiltin = \"jsonl\"\n",
        );
        assert!(Config::load(Some(&p)).unwrap_err().message.contains("dir"));
        let p = write(
            dir.path(),
            "g.toml",
            "[outbox]\nmax_bytes = \"12 parsecs\"\n",
        );
        assert_eq!(Config::load(Some(&p)).unwrap_err().position, Some((2, 13)));
        let p = write(dir.path(), "g.toml", "[ledger]\ncommit_delay = \"2s\"\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 16)));
        assert!(e.message.contains("at most"), "{}", e.message);
        let p = write(dir.path(), "g.toml", "[ledger]\ncommit_delay = \"150ms\"\n");
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.ledger.commit_delay, std::time::Duration::from_millis(150));
    }

    #[test]
    fn a_malformed_sha256_points_at_the_sha256_line_and_remembers_where_it_stands() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[[source]]\nname = \"m\"\nplugin = \"libd.so\"\nsha256 = \"abc\"\n",
        );
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((4, 10)), "{e}");
        assert!(e.message.contains("64 hexadecimal"), "{e}");
        let good = "ab".repeat(32);
        let p = write(
            dir.path(),
            "g.toml",
            &format!("[[sink]]\nname = \"a\"\nplugin = \"libx.so\"\n\nsha256 = \"{good}\"\n"),
        );
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.sinks[0].sha256_at, Some((p.clone(), 5, 10)));
        assert_eq!(c.sinks[0].declared_at, (p, 2, 8));
    }

    #[test]
    fn a_located_error_shows_its_line_with_a_caret_under_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "g.toml", "[ledger]\n\tunits_per_kes = -1.0\n");
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position, Some((2, 18)), "{e}");
        assert!(
            e.message
                .ends_with("\n  2 | \tunits_per_kes = -1.0\n    | \t                ^"),
            "{e}"
        );
        assert_eq!(excerpt("a\x1b[2Jb", 1, 2), "\n  1 | a?[2Jb\n    |  ^");
        assert_eq!(excerpt("x", 3, 1), "", "no line, no excerpt");
    }

    #[test]
    fn a_tariff_version_is_in_force_from_local_midnight_of_its_date_and_meters_fall_back_to_the_default(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            "[site]\ntimezone = \"Africa/Nairobi\"\n[ledger]\ndefault_tariff = \"home\"\n\
             [[tariffs]]\nname = \"home\"\nbands = [{ from_kwh = 0, price = \"20\" }]\n\
             [[tariffs]]\nname = \"home\"\neffective_from = \"2026-07-01\"\n\
             bands = [{ from_kwh = 0, price = \"22.50\" }]\n\
             [[tariffs]]\nname = \"shop\"\nbands = [{ from_kwh = 0, price = \"30\" }]\n",
        );
        let c = Config::load(Some(&p)).unwrap();
        let t = &c.ledger.tariff;
        // 2026-07-01 00:00 in Nairobi is 2026-06-30 21:00 UTC.
        let edge = crate::tariff::calendar::SiteZone::NAIROBI
            .midnight(crate::tariff::calendar::LocalDate::parse("2026-07-01").unwrap());
        let price = |name: Option<&str>, at: i64| t.in_force(name, at).bands[0].price.0;
        assert_eq!(price(None, edge - 1), 200_000);
        assert_eq!(price(None, edge), 225_000);
        assert_eq!(price(Some("home"), edge), 225_000);
        assert_eq!(price(Some("shop"), edge), 300_000);
        assert_eq!(
            price(Some("gone"), edge),
            225_000,
            "an unknown name: the default"
        );
        assert_eq!(t.names(), ["home", "shop"]);

        // The same version twice is refused at the second.
        let p = write(
            dir.path(),
            "twice.toml",
            "[[tariffs]]\nname = \"a\"\nbands = [{ from_kwh = 0, price = \"1\" }]\n\
             [[tariffs]]\nname = \"a\"\nbands = [{ from_kwh = 0, price = \"2\" }]\n",
        );
        let e = Config::load(Some(&p)).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(4), "{e}");
        assert!(e.message.contains("configured twice"), "{e}");
    }

    #[test]
    fn tariff_credits_exact_whole_wh() {
        let t = Tariff::try_from(0.05).unwrap();
        assert_eq!(t.credit_wh(100 * 100), 5_000);
        assert_eq!(t.credit_wh(1), 0); // 0.01 KES buys 0.5 Wh: floor
        assert_eq!(t.credit_wh(3), 1);
        let t = Tariff::try_from(0.1).unwrap();
        assert_eq!(t.credit_wh(7 * 100), 700);
    }

    #[test]
    fn world_readable_secret_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tok = write(dir.path(), "token", "s3cret\n");
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
        let p = write(
            dir.path(),
            "g.toml",
            &format!("[api]\ntoken_file = {:?}\n", tok.display().to_string()),
        );
        let c = Config::load(Some(&p)).unwrap();
        let e = c.check_files().unwrap_err();
        assert_eq!(e.position, Some((2, 14)), "{e}");
        std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.check_files().unwrap();
        assert_eq!(c.api_token().unwrap().as_deref(), Some("s3cret"));
    }

    #[test]
    fn every_file_key_of_a_plugin_config_is_a_secret_checked_at_the_key_nested_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = write(dir.path(), "private", "pw\n");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
        let open = write(dir.path(), "open", "pw\n");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (private, open) = (private.display().to_string(), open.display().to_string());
        let cases = [
            // (config, where the 0644 file is named, or None when it must pass)
            (
                format!("[[sink]]\nname = \"up\"\nplugin = \"libx.so\"\n[sink.config]\nhost = \"h\"\npassword_file = {open:?}\n"),
                Some((6, 1)),
            ),
            (
                format!("[[source]]\nname = \"m\"\nplugin = \"libd.so\"\n[source.config]\nconsumer_key_file = {private:?}\n[source.config.stk]\n  passkey_file = {open:?}\n"),
                Some((7, 3)),
            ),
            (
                format!("[[sink]]\nname = \"up\"\nplugin = \"libx.so\"\nconfig = {{ creds = [{{ key_file = {open:?} }}] }}\n"),
                Some((4, 23)),
            ),
            // A CA certificate is public; other keys are not paths to check.
            (
                format!("[[sink]]\nname = \"up\"\nplugin = \"libx.so\"\n[sink.config]\nca_file = {open:?}\npassword_file = {private:?}\nfile = {open:?}\n"),
                None,
            ),
        ];
        for (text, want) in cases {
            let p = write(dir.path(), "g.toml", &text);
            let c = Config::load(Some(&p)).unwrap();
            match want {
                Some(at) => {
                    let e = c.check_files().unwrap_err();
                    assert_eq!(e.position, Some(at), "{e}\n{text}");
                    assert!(e.message.contains("chmod 600"), "{e}");
                    assert!(e.message.contains("mode 644"), "{e}");
                    assert!(
                        e.message.contains("_file: secret file"),
                        "names the key: {e}"
                    );
                }
                None => c.check_files().unwrap(),
            }
        }
    }
}
