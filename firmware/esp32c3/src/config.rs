//! Settings from the build environment: `METER_ID=… METER_SECRET=… WIFI_SSID=… ./build.sh`.
//! Unset values fall back to the development defaults below, so CI builds without secrets.

const fn or(v: Option<&'static str>, default: &'static str) -> &'static str {
    match v {
        Some(v) => v,
        None => default,
    }
}

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n: u32 = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "expected a decimal number");
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}

pub const METER_ID: &str = or(option_env!("METER_ID"), "METER001");
pub const METER_SECRET: &str = or(option_env!("METER_SECRET"), "change-this-secret");
pub const WIFI_SSID: &str = or(option_env!("WIFI_SSID"), "umeme-site");
pub const WIFI_PASSWORD: &str = or(option_env!("WIFI_PASSWORD"), "change-this-password");
/// The gateway's broker: an IPv4 address on the site LAN.
pub const GATEWAY_HOST: &str = or(option_env!("GATEWAY_HOST"), "192.168.4.1");
/// The site CA (DER) from `GATEWAY_CA_FILE` at build time (build.rs).
#[cfg(gateway_tls)]
pub const GATEWAY_CA_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gateway-ca.der"));
/// TLS to the gateway's `[broker] tls_listen` when a site CA is built in (cfg `gateway_tls`,
/// set by build.rs); plain MQTT on TCP (the gateway's `[broker] listen`) otherwise.
pub const TLS: bool = cfg!(gateway_tls);
/// The name the gateway's certificate must carry (a DNS SAN given to `tls init --name`);
/// checked on every connect, whatever address `GATEWAY_HOST` reaches it at.
#[cfg(gateway_tls)]
pub const GATEWAY_TLS_NAME: &str = or(option_env!("GATEWAY_TLS_NAME"), "umeme-gateway.local");
pub const GATEWAY_PORT: u16 = parse_u32(or(
    option_env!("GATEWAY_PORT"),
    if TLS { "8883" } else { "1883" },
)) as u16;
pub const TOPIC_PREFIX: &str = or(option_env!("TOPIC_PREFIX"), "smartmeter");
pub const REPORT_S: u64 = parse_u32(or(option_env!("METER_REPORT_S"), "60")) as u64;
pub const VOLTAGE_MV: u32 = parse_u32(or(option_env!("METER_VOLTAGE_MV"), "230000"));
pub const POWER_FACTOR_PERMILLE: u32 = parse_u32(or(option_env!("METER_PF_PERMILLE"), "1000"));
pub const LOW_BALANCE_WH: i64 = parse_u32(or(option_env!("METER_LOW_BALANCE_WH"), "3000")) as i64;
/// The state log: the last 64 KiB of a 4 MiB flash (16 sectors), outside the app image.
pub const FLASH_OFFSET: u32 = parse_u32(or(option_env!("METER_FLASH_OFFSET"), "4128768"));
pub const FLASH_SECTORS: u32 = parse_u32(or(option_env!("METER_FLASH_SECTORS"), "16"));
/// The version this image runs, as the gateway's rollout names it (`firmware add --version`):
/// the OTA state machine compares offers with it, and a new image proves it booted by it.
pub const FW_VERSION: &str = or(option_env!("METER_FW_VERSION"), env!("CARGO_PKG_VERSION"));
/// The OTA state record's own log: the `otastate` partition (0x9000, 2 sectors).
pub const OTA_STATE_OFFSET: u32 = parse_u32(or(option_env!("METER_OTA_STATE_OFFSET"), "36864"));
pub const OTA_STATE_SECTORS: u32 = parse_u32(or(option_env!("METER_OTA_STATE_SECTORS"), "2"));
/// The meter's identity record (the `identity` partition, 0xB000): see `identity`.
pub const IDENTITY_OFFSET: u32 = parse_u32(or(option_env!("METER_IDENTITY_OFFSET"), "45056"));
/// The site's release public key (Ed25519, `METER_RELEASE_PUBLIC_KEY` in hex at build time,
/// from `umeme-gateway firmware keygen`); `None` when the build had none: then every offer is
/// answered `failed`/`bad_signature` without downloading anything.
pub const RELEASE_PUBLIC_KEY: Option<[u8; 32]> = {
    const RAW: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/release-key.bin"));
    if RAW.len() == 32 {
        let mut k = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            k[i] = RAW[i];
            i += 1;
        }
        Some(k)
    } else {
        None
    }
};
