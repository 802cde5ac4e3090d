//! meter-core: everything a Umeme prepaid meter decides, without hardware, allocator or clock.
//!
//! The board crate (`firmware/esp32c3`) and the simulator (`firmware/meter-sim`) only move data
//! between this crate and the world: ADC samples in, relay level and MQTT packets out, a flash
//! region to keep state in. Everything here is tested on the host.
//!
//! Modules:
//! - [`sensor`]: ACS712 current sensor: millivolts to RMS milliamps, zero calibration, noise floor.
//! - [`energy`]: power and the cumulative Wh register (the sub-Wh remainder is carried).
//! - [`balance`]: the prepaid balance as the meter sees it, relay decision, low-balance state,
//!   stale-command rejection by `ledgerSeq`.
//! - [`report`]: a numbered consumption report and its v2 JSON (contract §4).
//! - [`command`]: parsing the gateway's `command/*` payloads.
//! - [`outbox`]: the ring of reports not yet acknowledged, keyed by `seq`, replayed on reconnect.
//! - [`limits`]: the power cap (trip, reclose, lockout) and the daily allowance, and the
//!   settings `command/config` changes.
//! - [`meter`]: the meter: all of the above behind one state machine.
//! - [`snapshot`]: the meter's durable state as bytes.
//! - [`identity`]: a meter's provisioned identity record (number, secret, WiFi) on flash.
//! - [`flashlog`]: a wear-levelled, power-cut-safe record log on NOR flash.
//! - [`mqtt`]: the few MQTT 3.1.1 packets a meter needs, encoded and decoded without allocation.
//! - [`ota`]: over-the-air updates: download into the inactive slot, SHA-256 and Ed25519 checks,
//!   trial boot, confirm or roll back (the board implements [`ota::OtaFlash`]).
//! - [`nor_slot`]: an OTA slot on NOR flash written chunk by chunk (lazy erase, any alignment),
//!   for a board's `OtaFlash`.
//!
//! Architecture invariant: no floating point in the accounting path. Energy, balance and seq
//! are integers; floats appear only at the JSON edge (`powerW`, `balance` in units).
#![no_std]

#[cfg(test)]
extern crate std;

pub mod balance;
pub mod command;
pub mod energy;
pub mod flashlog;
pub mod identity;
pub mod limits;
pub mod meter;
pub mod mqtt;
pub mod nor_slot;
pub mod ota;
pub mod outbox;
pub mod report;
pub mod sensor;
pub mod snapshot;

pub use balance::{BalanceState, Relay};
pub use meter::{Meter, MeterConfig};
pub use report::Report;
