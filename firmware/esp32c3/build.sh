#!/usr/bin/env bash
# Builds the ESP32-C3 meter firmware with Debian's Rust toolchain into an ELF and a flashable
# app image, and prints their sizes. Installs what it needs when missing (Debian: rustc-web,
# cargo-web, rust-web-src, lld-19; PyPI: esptool). Idempotent: a second run only relinks.
#
# Meter settings come from the environment at build time (see src/config.rs), e.g.
#   METER_ID=METER001 METER_SECRET=… WIFI_SSID=… WIFI_PASSWORD=… GATEWAY_HOST=192.168.4.1 ./build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=""
for p in rustc-web cargo-web rust-web-src lld-19; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "build.sh: installing Debian packages:$missing"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi
if ! python3 -m esptool version >/dev/null 2>&1; then
  echo "build.sh: installing esptool from PyPI"
  python3 -m pip install -q esptool
fi

# Only Debian's cargo honours [unstable] build-std; keep the host's settings out of this build.
unset RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR RUSTC_WRAPPER
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
start=$(date +%s)
/usr/bin/cargo build --release --locked --target-dir "$here/target"
built=$(date +%s)

elf="$here/target/riscv32imc-unknown-none-elf/release/meter-fw-esp32c3"
img="$here/target/meter-fw-esp32c3.bin"
python3 -m esptool --chip esp32c3 elf2image --flash-mode dio --flash-size 4MB -o "$img" "$elf" >/dev/null
python3 -m esptool --chip esp32c3 image-info "$img" | grep -E "Checksum|Validation hash" 

echo "== ESP32-C3 firmware =="
if command -v llvm-size >/dev/null; then llvm-size "$elf"; fi
elf_bytes=$(stat -c %s "$elf")
img_bytes=$(stat -c %s "$img")
partition=$((0x3f0000))
echo "ELF:   $elf ($elf_bytes bytes)"
echo "image: $img ($img_bytes bytes, $((img_bytes * 100 / partition))% of the 4 MB factory partition; flash at 0x10000)"
echo "build: $((built - start)) s"
