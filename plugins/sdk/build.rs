//! Records the compiler that builds the SDK (and so the plugin) for the plugin declaration.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=UMEME_SDK_RUSTC={}", version.trim());
    println!("cargo:rerun-if-env-changed=RUSTC");
}
