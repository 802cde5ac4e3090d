//! Builds the site CA into the firmware: `GATEWAY_CA_FILE` names the PEM certificate that
//! `umeme-gateway tls init` wrote (`tls/ca.crt` under the gateway's data directory); its DER
//! goes to `$OUT_DIR/gateway-ca.der`, which `config::GATEWAY_CA_DER` includes, and the cfg
//! `gateway_tls` is set. Without it the meter speaks plain MQTT on TCP (the original
//! firmware's way) and no TLS code is compiled in: a cfg, not a `const` test, because an
//! async state machine keeps every branch's code whatever a constant says.

use std::path::PathBuf;

fn main() {
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
