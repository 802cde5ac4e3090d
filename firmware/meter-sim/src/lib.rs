//! meter-sim: N virtual meters on `meter-core`, speaking MQTT 3.1.1 to a umeme-gateway.
//!
//! Used for demos, tests and load. Each meter is one tokio task with its own MQTT connection
//! (rumqttc); a controller provisions and credits meters through the gateway's admin API and,
//! at the end, checks that every meter's balance equals the gateway's.
//!
//! Modules:
//! - [`profile`]: load profiles (constant, daily curve, random).
//! - [`api`]: the few admin-API calls the simulator needs (a tiny HTTP/1.1 client).
//! - [`virtual_meter`]: one meter: v2 (our firmware, on `meter-core`) or v1 (the Arduino
//!   firmware's payloads), online/offline episodes, reboots.
//! - [`sim`]: the run: configuration, schedule, controller, summary.
//! - [`ota`]: meters that take a firmware rollout (meter-core's OTA machine on a simulated
//!   two-slot board), with induced drops, corrupted chunks and power cuts.

pub mod api;
pub mod ota;
pub mod profile;
pub mod sim;
pub mod virtual_meter;

pub use sim::{run, Mode, Scenario, SimConfig, Summary};
