//! umeme-gateway sink: events up to HiveMQ Cloud or any MQTT 3.1.1 broker, commands back down.
//!
//! - [`config`]: the `[sink.config]` table, checked at create, and the topics it names.
//! - [`tls`]: rustls (ring) toward the broker, and what a failed connection means.
//! - [`link`]: the connection on the plugin's own thread: QoS 1 publishes counted by PUBACK,
//!   reconnects with backoff and jitter, commands acknowledged after they are carried out.
//! - [`command`]: the commands the cloud may send (credit, relay, config), their bounds and
//!   caps, and their answers.
//! - [`signature`]: the signed envelope (HMAC-SHA256 with the site's key) and the `ts` window.
//! - [`kv`]: what commands keep in the gateway's store: nonces against replay, the day's credits.
//!
//! Each event goes QoS 1 to `{prefix}/{gateway}/{kind}/{meter}` with the event JSON. A batch
//! is delivered only when every event of it was PUBACKed on one connection; otherwise the
//! gateway's outbox sends it again, so a subscriber sees duplicates only as retries of the same
//! event `id`. See README.md for the configuration and the command topics.

pub mod command;
pub mod config;
pub mod kv;
pub mod link;
pub mod signature;
pub mod tls;

use std::ffi::CStr;
use std::time::Duration;

use umeme_plugin_sdk::{export_sink, Delivery, Event, Health, Host, Sink};

use config::{publish_packet_size, Topics};
use link::{Link, Message};

/// The sink instance.
pub struct MqttSink {
    link: Link,
    topics: Topics,
    max_packet_size: usize,
    warned_gateway: bool,
}

/// Time kept back from the gateway's budget to answer before it gives up waiting.
const ANSWER_MARGIN: Duration = Duration::from_millis(300);

impl Sink for MqttSink {
    const NAME: &'static CStr = c"mqtt";
    type Config = config::Config;

    fn create(config: config::Config, host: Host) -> Result<Self, String> {
        let settings = config.settings()?;
        let topics = settings.topics.clone();
        let max_packet_size = settings.max_packet_size;
        let downlink = settings
            .commands
            .then(|| Box::new(host) as Box<dyn command::Downlink + Send>);
        log::info!(
            "mqtt sink for {}:{} created; events to {}",
            settings.host,
            settings.port,
            if settings.commands {
                format!("the broker, commands from {}", topics.command_filter())
            } else {
                "the broker (commands off)".into()
            }
        );
        Ok(MqttSink {
            link: Link::start(settings, downlink)?,
            topics,
            max_packet_size,
            warned_gateway: false,
        })
    }

    fn deliver(&mut self, batch: &[Event], timeout: Duration) -> Delivery {
        let budget = timeout
            .saturating_sub(ANSWER_MARGIN)
            .max(Duration::from_millis(100));
        let (messages, rejected) = self.messages(batch);
        match self.link.publish(messages, budget) {
            Ok(()) if rejected.is_empty() => Delivery::Delivered,
            Ok(()) => Delivery::Rejected(rejected),
            Err(r) => Delivery::Retry {
                after: r.retry_after,
                reason: format!("mqtt: {}", r.reason),
            },
        }
    }

    fn health(&mut self) -> Health {
        let st = self
            .link
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Health {
            ok: st.connected,
            detail: serde_json::to_value(&st).unwrap_or_default(),
        }
    }
}

impl MqttSink {
    /// The batch as messages, and the events too large for the broker (by seq, with why).
    fn messages(&mut self, batch: &[Event]) -> (Vec<Message>, Vec<(i64, String)>) {
        let mut messages = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for e in batch {
            if e.gateway != self.topics.gateway() && !self.warned_gateway {
                self.warned_gateway = true;
                log::warn!(
                    "events come from gateway {:?} but gateway_id is {:?}: commands are taken for {:?}",
                    e.gateway,
                    self.topics.gateway(),
                    self.topics.gateway()
                );
            }
            let topic = self.topics.event(e);
            let payload = match serde_json::to_vec(e) {
                Ok(p) => p,
                Err(err) => {
                    rejected.push((e.seq, format!("cannot encode the event: {err}")));
                    continue;
                }
            };
            let size = publish_packet_size(&topic, payload.len());
            if size > self.max_packet_size {
                let why = format!(
                    "event {} is {size} bytes as an MQTT packet; the broker takes at most {} (max_packet_size)",
                    e.id, self.max_packet_size
                );
                log::warn!("mqtt: {why}");
                rejected.push((e.seq, why));
                continue;
            }
            messages.push(Message { topic, payload });
        }
        (messages, rejected)
    }
}

export_sink!(MqttSink);

#[cfg(test)]
mod tests {
    use super::*;
    use umeme_plugin_sdk::testing::{event, SinkHarness};

    /// A broker that never answers: a listening socket nobody accepts from.
    fn silent_broker() -> (std::net::TcpListener, u16) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    #[test]
    fn an_event_larger_than_the_broker_takes_is_rejected_with_the_reason_and_the_rest_must_be_acked(
    ) {
        let (_l, port) = silent_broker();
        let config = serde_json::json!({
            "host": "localhost", "port": port, "tls": false, "gateway_id": "test-site",
            "max_packet_size": 1024, "commands": false, "connect_timeout_secs": 1,
        });
        let mut sink = SinkHarness::<MqttSink>::new(config).unwrap();
        let big = event(
            1,
            "status",
            "METER001",
            serde_json::json!({"pad": "x".repeat(2000)}),
        );
        assert_eq!(
            sink.deliver(std::slice::from_ref(&big)),
            Delivery::Rejected(vec![(
                1,
                format!(
                    "event {} is {} bytes as an MQTT packet; the broker takes at most 1024 (max_packet_size)",
                    big.id,
                    publish_packet_size(
                        "umeme/test-site/status/METER001",
                        serde_json::to_vec(&big).unwrap().len()
                    )
                )
            )])
        );
        // A small one cannot be confirmed by a silent broker: retried, never "delivered".
        let small = event(2, "status", "METER001", serde_json::json!({}));
        let d = sink.deliver(&[big, small]);
        assert!(matches!(d, Delivery::Retry { .. }), "{d:?}");
    }

    #[test]
    fn a_broker_that_is_down_means_retry_with_the_reason() {
        let port = {
            let (l, port) = silent_broker();
            drop(l);
            port
        };
        let config = serde_json::json!({
            "host": "localhost", "port": port, "tls": false, "gateway_id": "test-site",
            "commands": false, "reconnect_min_ms": 5000,
        });
        let mut sink = SinkHarness::<MqttSink>::new(config).unwrap();
        let d = sink.deliver(&[event(1, "status", "METER001", serde_json::json!({}))]);
        match d {
            Delivery::Retry { reason, after } => {
                assert!(reason.contains("connection refused"), "{reason}");
                assert!(after.is_some_and(|a| a <= Duration::from_secs(5)));
            }
            other => panic!("{other:?}"),
        }
    }
}
