//! The `[sink.config]` table, checked once at create, and the topics it names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use umeme_plugin_sdk::Event;

/// The `[sink.config]` table (see README.md for an example).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The broker's DNS name: sent as SNI and checked against its certificate.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// `false` only for a broker on the same machine or a lab network.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// PEM file of the CA(s) that sign the broker's certificate; without it, the public web
    /// roots bundled with the plugin (what HiveMQ Cloud needs).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    /// A file holding the password (surrounding whitespace is ignored).
    pub password_file: Option<PathBuf>,
    /// This site's gateway id (`[gateway] id`): names the topics, commands included.
    pub gateway_id: String,
    /// Default `umeme-{gateway_id}`. Must be unique at the broker: the session lives on it.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "default_prefix")]
    pub upstream_prefix: String,
    /// Where each event goes; `{prefix}`, `{gateway}`, `{kind}`, `{meter}` and `{id}` are
    /// replaced (`{meter}` is `_` for an event without a meter).
    #[serde(default = "default_template")]
    pub topic_template: String,
    /// Take commands from `{prefix}/{gateway}/command/#`.
    #[serde(default = "default_true")]
    pub commands: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// The largest MQTT packet the broker takes (HiveMQ Cloud: 5 MB on the free tier; mosquitto
    /// `max_packet_size`). A bigger event is refused for good instead of breaking the link.
    #[serde(default = "default_max_packet")]
    pub max_packet_size: usize,
    /// QoS 1 publishes awaiting their PUBACK at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// First reconnect delay; doubles (with jitter) up to `reconnect_max_secs`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
    /// This site's key for command signatures (HMAC-SHA256): a file of at least 32 characters
    /// (`openssl rand -hex 32`), not accessible to other users. Without it every command is
    /// refused, unless `allow_unsigned_commands`.
    #[serde(default)]
    pub command_key_file: Option<PathBuf>,
    /// Take commands without a signature (a lab, or a broker only the operator can publish on).
    #[serde(default)]
    pub allow_unsigned_commands: bool,
    /// A signed command's `ts` may differ from the gateway's clock by this much, either way.
    #[serde(default = "default_command_window")]
    pub command_window_secs: u64,
    /// The most one cloud credit command may credit.
    #[serde(default = "default_credit_per_command")]
    pub max_credit_kes_per_command: u64,
    /// The most cloud credit commands may credit at this site per calendar day (UTC), all
    /// meters together; counted durably across restarts.
    #[serde(default = "default_credit_per_day")]
    pub max_credit_kes_per_day: u64,
}

fn default_port() -> u16 {
    8883
}
fn default_true() -> bool {
    true
}
fn default_prefix() -> String {
    "umeme".into()
}
fn default_template() -> String {
    "{prefix}/{gateway}/{kind}/{meter}".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_max_packet() -> usize {
    256 * 1024
}
fn default_inflight() -> u16 {
    32
}
fn default_reconnect_min() -> u64 {
    1000
}
fn default_reconnect_max() -> u64 {
    60
}
fn default_command_window() -> u64 {
    300
}
fn default_credit_per_command() -> u64 {
    10_000
}
fn default_credit_per_day() -> u64 {
    100_000
}

/// Everything the link needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: Option<Tls>,
    pub login: Option<(String, String)>,
    pub client_id: String,
    pub topics: Topics,
    pub commands: bool,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    pub inflight: u16,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub command_rules: CommandRules,
}

/// How commands are checked before they run (see README "Signed commands").
#[derive(Clone)]
pub struct CommandRules {
    /// The HMAC key; `None`: no key configured.
    pub key: Option<ring::hmac::Key>,
    pub allow_unsigned: bool,
    pub window: Duration,
    pub max_credit_cents_per_command: i64,
    pub max_credit_cents_per_day: i64,
}

impl std::fmt::Debug for CommandRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandRules")
            .field("key", &self.key.as_ref().map(|_| "(set)"))
            .field("allow_unsigned", &self.allow_unsigned)
            .field("window", &self.window)
            .field(
                "max_credit_cents_per_command",
                &self.max_credit_cents_per_command,
            )
            .field("max_credit_cents_per_day", &self.max_credit_cents_per_day)
            .finish()
    }
}

/// The shortest command key accepted, in bytes.
pub const MIN_COMMAND_KEY_BYTES: usize = 32;
/// The largest credit cap accepted (the gateway refuses payments over KES 1,000,000).
const MAX_CREDIT_CAP_KES: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub enum Tls {
    /// The bundled public roots (webpki-roots).
    PublicRoots,
    /// CA certificates read from `ca_file` (DER).
    Cas(PathBuf, Vec<Vec<u8>>),
}

impl Config {
    pub fn settings(self) -> Result<Settings, String> {
        let command_rules = self.command_rules()?;
        if self.host.trim().is_empty() || self.host.contains(['/', ' ', ':']) {
            return Err(format!(
                "host {:?} must be a bare DNS name (no scheme, port or path)",
                self.host
            ));
        }
        if self.port == 0 {
            return Err("port must not be 0".into());
        }
        check_level("gateway_id", &self.gateway_id)?;
        for level in self.upstream_prefix.split('/') {
            check_level("upstream_prefix", level)?;
        }
        let tls = match (self.tls, self.ca_file) {
            (true, None) => Some(Tls::PublicRoots),
            (true, Some(path)) => {
                let cas = crate::tls::read_cas(&path)?;
                Some(Tls::Cas(path, cas))
            }
            (false, None) => {
                log::warn!("tls = false: events and the password cross the network in clear text");
                None
            }
            (false, Some(_)) => return Err("ca_file needs tls = true".into()),
        };
        let login = match (self.username, self.password_file) {
            (Some(u), Some(p)) => Some((u, read_secret("password_file", &p)?)),
            (Some(u), None) => {
                return Err(format!(
                    "username {u:?} needs password_file (the password never goes in the TOML)"
                ))
            }
            (None, Some(_)) => return Err("password_file needs username".into()),
            (None, None) => None,
        };
        let client_id = self
            .client_id
            .unwrap_or_else(|| format!("umeme-{}", self.gateway_id));
        if client_id.is_empty() || client_id.len() > 128 {
            return Err("client_id must be 1 to 128 bytes".into());
        }
        let topics = Topics::new(
            &self.upstream_prefix,
            &self.gateway_id,
            &self.topic_template,
        )?;
        if !(1..=3600).contains(&self.keep_alive_secs) {
            return Err("keep_alive_secs must be 1 to 3600".into());
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            return Err("connect_timeout_secs must be 1 to 300".into());
        }
        if self.max_packet_size < 1024 {
            return Err("max_packet_size must be at least 1024 bytes".into());
        }
        if !(1..=1000).contains(&self.inflight) {
            return Err("inflight must be 1 to 1000".into());
        }
        if self.reconnect_min_ms < 100 || self.reconnect_max_secs == 0 {
            return Err("reconnect_min_ms must be ≥ 100 and reconnect_max_secs ≥ 1".into());
        }
        Ok(Settings {
            host: self.host,
            port: self.port,
            tls,
            login,
            client_id,
            topics,
            commands: self.commands,
            keep_alive: Duration::from_secs(self.keep_alive_secs),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            max_packet_size: self.max_packet_size,
            inflight: self.inflight,
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_secs(self.reconnect_max_secs)
                .max(Duration::from_millis(self.reconnect_min_ms)),
            command_rules,
        })
    }

    fn command_rules(&self) -> Result<CommandRules, String> {
        let key = match &self.command_key_file {
            Some(path) => {
                let key = read_secret("command_key_file", path)?;
                if key.len() < MIN_COMMAND_KEY_BYTES {
                    return Err(format!(
                        "command_key_file {} holds {} bytes; use at least {MIN_COMMAND_KEY_BYTES} (openssl rand -hex 32)",
                        path.display(),
                        key.len()
                    ));
                }
                Some(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    key.as_bytes(),
                ))
            }
            None => None,
        };
        if self.commands && self.allow_unsigned_commands {
            log::warn!("allow_unsigned_commands = true: anyone who may publish on the command topic can credit meters and switch relays");
        } else if self.commands && key.is_none() {
            log::warn!("commands are on but there is no command_key_file: every command will be refused (set command_key_file, or commands = false)");
        }
        if !(10..=3600).contains(&self.command_window_secs) {
            return Err("command_window_secs must be 10 to 3600".into());
        }
        let caps = (self.max_credit_kes_per_command, self.max_credit_kes_per_day);
        if !(1..=MAX_CREDIT_CAP_KES).contains(&caps.0)
            || !(1..=MAX_CREDIT_CAP_KES * 100).contains(&caps.1)
        {
            return Err(format!("max_credit_kes_per_command must be 1 to {MAX_CREDIT_CAP_KES}, max_credit_kes_per_day 1 to {}", MAX_CREDIT_CAP_KES * 100));
        }
        if caps.0 > caps.1 {
            return Err("max_credit_kes_per_command must not exceed max_credit_kes_per_day".into());
        }
        Ok(CommandRules {
            key,
            allow_unsigned: self.allow_unsigned_commands,
            window: Duration::from_secs(self.command_window_secs),
            max_credit_cents_per_command: caps.0 as i64 * 100,
            max_credit_cents_per_day: caps.1 as i64 * 100,
        })
    }
}

fn check_level(key: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['/', '+', '#', '\0']) {
        return Err(format!(
            "{key} {s:?} must be non-empty topic levels without '+', '#' or NUL"
        ));
    }
    Ok(())
}

/// Reads a secret file with the SDK's checks (mode, no symlink, size).
pub fn read_secret(key: &str, path: &Path) -> Result<String, String> {
    umeme_plugin_sdk::read_secret_file(path).map_err(|e| format!("{key}: {e}"))
}

/// The topics of one gateway.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    gateway: String,
    template: String,
}

const PLACEHOLDERS: [&str; 5] = ["{prefix}", "{gateway}", "{kind}", "{meter}", "{id}"];

impl Topics {
    pub fn new(prefix: &str, gateway: &str, template: &str) -> Result<Topics, String> {
        let mut rest = template.to_string();
        for p in PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if rest.contains(['{', '}', '+', '#', '\0']) {
            return Err(format!(
                "topic_template {template:?}: only {} may be used, and no '+' or '#'",
                PLACEHOLDERS.join(", ")
            ));
        }
        if template.is_empty() || template.starts_with('/') {
            return Err(format!(
                "topic_template {template:?} must not be empty or start with '/'"
            ));
        }
        Ok(Topics {
            prefix: prefix.into(),
            gateway: gateway.into(),
            template: template.into(),
        })
    }

    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Where `event` is published. Values are made safe as single topic levels.
    pub fn event(&self, event: &Event) -> String {
        self.template
            .replace("{prefix}", &self.prefix)
            .replace("{gateway}", &level(&event.gateway))
            .replace("{kind}", &level(&event.kind))
            .replace("{meter}", &level(event.meter.as_deref().unwrap_or("_")))
            .replace("{id}", &level(&event.id))
    }

    /// The filter the downlink subscribes to.
    pub fn command_filter(&self) -> String {
        format!("{}/{}/command/#", self.prefix, self.gateway)
    }

    /// The command named by a topic under the filter (`…/command/credit` → `credit`).
    pub fn command_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix('/')?
            .strip_prefix(&self.gateway)?
            .strip_prefix("/command/")?;
        rest.split('/').next().filter(|c| !c.is_empty())
    }

    pub fn command_result(&self, id: &str) -> String {
        format!(
            "{}/{}/command_result/{}",
            self.prefix,
            self.gateway,
            level(id)
        )
    }
}

/// A value as one topic level: separators and wildcards become `_`.
fn level(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c => c,
        })
        .collect()
}

/// The size of a QoS 1 PUBLISH packet on the wire (MQTT 3.1.1 §3.3).
pub fn publish_packet_size(topic: &str, payload_len: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + payload_len;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

#[cfg(test)]
mod tests {
    use super::*;
    use umeme_plugin_sdk::testing::event;

    fn topics(template: &str) -> Topics {
        Topics::new("umeme", "site-001", template).unwrap()
    }

    #[test]
    fn the_default_template_is_prefix_gateway_kind_meter() {
        let mut e = event(42, "payment", "METER001", serde_json::json!({}));
        e.gateway = "site-001".into();
        assert_eq!(
            topics(&default_template()).event(&e),
            "umeme/site-001/payment/METER001"
        );
        e.meter = None;
        assert_eq!(
            topics(&default_template()).event(&e),
            "umeme/site-001/payment/_"
        );
    }

    #[test]
    fn a_template_may_use_the_event_id_and_values_cannot_add_levels_or_wildcards() {
        let mut e = event(7, "alert", "M/+#1", serde_json::json!({}));
        e.gateway = "site-001".into();
        let t = topics("sites/{gateway}/events/{id}/{meter}");
        assert_eq!(
            t.event(&e),
            "sites/site-001/events/test-site-000000000007/M___1"
        );
    }

    #[test]
    fn a_template_with_unknown_placeholders_or_wildcards_is_refused() {
        for bad in ["{prefix}/{site}", "{prefix}/+/x", "a/#", "", "/lead"] {
            assert!(Topics::new("umeme", "g", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_are_named_by_the_level_after_command() {
        let t = topics(&default_template());
        assert_eq!(t.command_filter(), "umeme/site-001/command/#");
        assert_eq!(
            t.command_of("umeme/site-001/command/credit"),
            Some("credit")
        );
        assert_eq!(
            t.command_of("umeme/site-001/command/relay/METER001"),
            Some("relay")
        );
        assert_eq!(t.command_of("umeme/site-002/command/credit"), None);
        assert_eq!(t.command_of("umeme/site-001/command/"), None);
        assert_eq!(t.command_result("c/1"), "umeme/site-001/command_result/c_1");
    }

    #[test]
    fn packet_size_counts_the_header_topic_packet_id_and_payload() {
        assert_eq!(publish_packet_size("a/b", 10), 1 + 1 + 2 + 3 + 2 + 10);
        assert_eq!(publish_packet_size("t", 200), 1 + 2 + 2 + 1 + 2 + 200);
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"host": "x.s1.eu.hivemq.cloud", "gateway_id": "site-001"})
    }

    fn parse(v: serde_json::Value) -> Result<Settings, String> {
        serde_json::from_value::<Config>(v)
            .map_err(|e| e.to_string())?
            .settings()
    }

    #[test]
    fn defaults_are_tls_with_public_roots_on_8883_and_commands_on() {
        let s = parse(base()).unwrap();
        assert_eq!(s.port, 8883);
        assert!(matches!(s.tls, Some(Tls::PublicRoots)));
        assert_eq!(s.client_id, "umeme-site-001");
        assert!(s.commands);
    }

    #[test]
    fn bad_settings_are_refused_with_the_key_named() {
        let mut v = base();
        v["username"] = "u".into();
        assert!(parse(v).unwrap_err().contains("password_file"));
        let mut v = base();
        v["host"] = "mqtts://x:8883".into();
        assert!(parse(v).unwrap_err().contains("host"));
        let mut v = base();
        v["gateway_id"] = "a/b".into();
        assert!(parse(v).unwrap_err().contains("gateway_id"));
        let mut v = base();
        v["password"] = "inline".into();
        assert!(parse(v).unwrap_err().contains("unknown field"));
        let mut v = base();
        v["ca_file"] = "/nonexistent/ca.pem".into();
        assert!(parse(v).unwrap_err().contains("ca_file"));
    }

    #[test]
    fn the_hivemq_example_in_configs_is_a_valid_sink_config() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/conf.d-examples/hivemq.toml"
        );
        let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let sink = &doc["sink"].as_array().unwrap()[0];
        assert_eq!(sink["plugin"].as_str(), Some("libumeme_sink_mqtt.so"));
        let json = serde_json::to_value(&sink["config"]).unwrap();
        let config: Config = serde_json::from_value(json).unwrap();
        assert!(config.tls && config.ca_file.is_none());
        assert_eq!(config.gateway_id, "site-001");
    }

    #[test]
    fn the_command_key_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("command.key");
        let with_key = || {
            let mut v = base();
            v["command_key_file"] = key.display().to_string().into();
            parse(v)
        };
        std::fs::write(&key, format!("{}\n", "k".repeat(64))).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(with_key()
            .unwrap_err()
            .contains("command_key_file: secret file"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(
            with_key().unwrap_err().contains("(mode 660)"),
            "a group-writable key is refused like every secret file"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(with_key().unwrap().command_rules.key.is_some());
        std::fs::write(&key, "short").unwrap();
        assert!(with_key().unwrap_err().contains("at least 32"));
    }

    #[test]
    fn commands_default_to_signed_only_with_caps_and_a_five_minute_window() {
        let r = parse(base()).unwrap().command_rules;
        assert!(r.key.is_none() && !r.allow_unsigned);
        assert_eq!(r.window, Duration::from_secs(300));
        assert_eq!(r.max_credit_cents_per_command, 10_000 * 100);
        assert_eq!(r.max_credit_cents_per_day, 100_000 * 100);
        let mut v = base();
        v["max_credit_kes_per_command"] = 5_000.into();
        v["max_credit_kes_per_day"] = 1_000.into();
        assert!(parse(v).unwrap_err().contains("must not exceed"));
        let mut v = base();
        v["command_window_secs"] = 0.into();
        assert!(parse(v).unwrap_err().contains("command_window_secs"));
    }
}
