//! The meter's identity (number, MQTT secret, WiFi, gateway address): the record on the
//! `identity` partition (meter-core `identity`, written once over USB, see firmware/README.md),
//! field by field over the build's settings (`config`). A meter provisioned so runs any image of
//! the site as itself, which is what lets one image go to every meter over the air.

use core::cell::Cell;

use embassy_sync::blocking_mutex::raw::CriticalSectionRawMutex;
use embassy_sync::blocking_mutex::Mutex;
use esp_println::println;
use meter_core::identity::{self as record, IdentityError, MAX_LEN};
use static_cell::StaticCell;

use crate::{config, flash};

pub struct Identity {
    pub meter_id: &'static str,
    pub secret: &'static str,
    pub wifi_ssid: &'static str,
    pub wifi_password: &'static str,
    pub gateway_host: &'static str,
    /// The meter number came from the identity partition, not from the image.
    pub provisioned: bool,
}

static RECORD: StaticCell<[u8; MAX_LEN]> = StaticCell::new();
static IDENTITY: StaticCell<Identity> = StaticCell::new();
static CURRENT: Mutex<CriticalSectionRawMutex, Cell<Option<&'static Identity>>> =
    Mutex::new(Cell::new(None));

/// Reads the record (once, in `main`, after `flash::init`).
pub fn load() -> &'static Identity {
    let buf = RECORD.init([0xFF; MAX_LEN]);
    let read = flash::with(|f| f.read_nor(config::IDENTITY_OFFSET, buf));
    let buf: &'static [u8; MAX_LEN] = buf;
    let parsed = match read {
        Ok(Ok(())) => record::parse(buf),
        _ => {
            println!("identity: the partition could not be read");
            Err(IdentityError::Missing)
        }
    };
    let fields = match parsed {
        Ok(f) => f,
        Err(IdentityError::Missing) => Default::default(),
        Err(e) => {
            println!("identity: record refused ({e}); using the build's settings");
            Default::default()
        }
    };
    let id = IDENTITY.init(Identity {
        meter_id: fields.meter_id.unwrap_or(config::METER_ID),
        secret: fields.meter_secret.unwrap_or(config::METER_SECRET),
        wifi_ssid: fields.wifi_ssid.unwrap_or(config::WIFI_SSID),
        wifi_password: fields.wifi_password.unwrap_or(config::WIFI_PASSWORD),
        gateway_host: fields.gateway_host.unwrap_or(config::GATEWAY_HOST),
        provisioned: fields.meter_id.is_some(),
    });
    CURRENT.lock(|c| c.set(Some(id)));
    id
}

/// The identity `load` settled on.
pub fn get() -> &'static Identity {
    // Set in `main` before any task starts.
    CURRENT.lock(|c| c.get()).expect("identity loaded in main")
}
