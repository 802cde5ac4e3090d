//! A throwaway RSA key for tests, made with the `openssl` CLI (no key is committed). Shared by
//! this crate's tests and the gateway's end-to-end test (`#[path]`), so both sign and verify the
//! same way.

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed to make a test key (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `dir/key.pem` (PKCS#8 private key) and `dir/pub.der` (PKCS#1 public key, DER).
pub fn generate(dir: &Path) -> (PathBuf, PathBuf) {
    let (pem, der) = (dir.join("key.pem"), dir.join("pub.der"));
    let (pem_s, der_s) = (pem.to_str().unwrap(), der.to_str().unwrap());
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        pem_s,
    ]);
    openssl(&[
        "rsa",
        "-in",
        pem_s,
        "-RSAPublicKey_out",
        "-outform",
        "DER",
        "-out",
        der_s,
    ]);
    (pem, der)
}
