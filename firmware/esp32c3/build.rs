//! Builds the site CA into the firmware: `GATEWAY_CA_FILE` names the PEM certificate that
//! `umeme-gateway tls init` wrote (`tls/ca.crt` under the gateway's data directory); its DER
//! goes to `$OUT_DIR/gateway-ca.der`, which `config::GATEWAY_CA_DER` includes, and the cfg
//! `gateway_tls` is set. Without it the meter speaks plain MQTT on TCP (the original
//! firmware's way) and no TLS code is compiled in: a cfg, not a `const` test, because an
//! async state machine keeps every branch's code whatever a constant says.

use std::path::PathBuf;

fn main() {
    release_key();
    fw_version();
    println!("cargo:rerun-if-env-changed=GATEWAY_CA_FILE");
    println!("cargo::rustc-check-cfg=cfg(gateway_tls)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("gateway-ca.der");
    let der = match std::env::var("GATEWAY_CA_FILE") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            let pem = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("GATEWAY_CA_FILE {path}: {e}"));
            first_certificate(&pem)
                .unwrap_or_else(|| panic!("GATEWAY_CA_FILE {path}: no PEM CERTIFICATE in it"))
        }
        _ => Vec::new(),
    };
    if !der.is_empty() {
        println!("cargo::rustc-cfg=gateway_tls");
    }
    std::fs::write(&out, der).expect("write gateway-ca.der");
}

/// `METER_RELEASE_PUBLIC_KEY` (64 hex digits, the public half from `umeme-gateway firmware
/// keygen`) as 32 raw bytes in `$OUT_DIR/release-key.bin` (`config::RELEASE_PUBLIC_KEY`);
/// an empty file without it. A malformed key fails the build rather than making a meter that
/// refuses every update.
fn release_key() {
    println!("cargo:rerun-if-env-changed=METER_RELEASE_PUBLIC_KEY");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("release-key.bin");
    let key = match std::env::var("METER_RELEASE_PUBLIC_KEY") {
        Ok(hex) if !hex.trim().is_empty() => {
            let hex = hex.trim();
            let bytes: Option<Vec<u8>> = (hex.len() == 64)
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                        .collect()
                })
                .flatten();
            bytes.unwrap_or_else(|| {
                panic!("METER_RELEASE_PUBLIC_KEY: expected 64 hex digits (32 bytes), got {hex:?}")
            })
        }
        _ => Vec::new(),
    };
    std::fs::write(&out, key).expect("write release-key.bin");
}

/// `METER_FW_VERSION` must be a version the OTA protocol can carry (1 to 24 bytes of
/// `[0-9A-Za-z.+_-]`, as `firmware add --version`), or the meter could not recognise itself.
fn fw_version() {
    println!("cargo:rerun-if-env-changed=METER_FW_VERSION");
    if let Ok(v) = std::env::var("METER_FW_VERSION") {
        let ok = (1..=24).contains(&v.len())
            && v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'+' | b'_' | b'-'));
        assert!(
            ok,
            "METER_FW_VERSION {v:?}: 1 to 24 bytes of [0-9A-Za-z.+_-]"
        );
    }
}

/// The DER of the first `-----BEGIN CERTIFICATE-----` block.
fn first_certificate(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    base64(&pem[start..end])
}

fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}
