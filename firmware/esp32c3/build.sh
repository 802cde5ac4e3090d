#!/usr/bin/env bash
# Builds the ESP32-C3 meter firmware with Debian's Rust toolchain into an ELF and a flashable
# app image, and prints their sizes. Installs what it needs when missing (Debian: rustc-web,
# cargo-web, rust-web-src, lld-19, openssl; PyPI: esptool). Idempotent: a second run only relinks.
#
# Updates: METER_RELEASE_PUBLIC_KEY (hex, from `umeme-gateway firmware keygen`) is the key
# images must be signed with, METER_FW_VERSION the version this image runs as (the one given to
# `firmware sign/add --version`; default: Cargo.toml's).
#
# Meter settings come from the environment at build time (see src/config.rs), e.g.
#   METER_ID=METER001 METER_SECRET=… WIFI_SSID=… WIFI_PASSWORD=… GATEWAY_HOST=192.168.4.1 ./build.sh
#
# TLS to the gateway (its [broker] tls_listen, 8883) is built in when GATEWAY_CA_FILE names the
# site CA (`tls/ca.crt` under the gateway's data directory, written by `umeme-gateway tls init`),
# with GATEWAY_TLS_NAME the name in the gateway's certificate (default umeme-gateway.local).
# GATEWAY_TLS=off builds a plain-TCP meter (port 1883). With neither, the build uses the
# development gateway's CA (umeme-data/tls/ca.crt at the checkout root) if there is one, else a
# throwaway CA made for this build only: that image talks TLS but trusts no real gateway.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=""
for p in rustc-web cargo-web rust-web-src lld-19 openssl; do
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
if [ "${GATEWAY_TLS:-on}" = "off" ]; then
  export GATEWAY_CA_FILE=""
  echo "build.sh: plain TCP to the gateway (GATEWAY_TLS=off)"
else
  if [ -z "${GATEWAY_CA_FILE:-}" ]; then
    dev_ca="$here/../../umeme-data/tls/ca.crt"
    if [ -f "$dev_ca" ]; then
      GATEWAY_CA_FILE="$(cd "$(dirname "$dev_ca")" && pwd)/ca.crt"
    else
      GATEWAY_CA_FILE="$here/target/throwaway-ca.crt"
      if [ ! -f "$GATEWAY_CA_FILE" ]; then
        mkdir -p "$here/target"
        # Key discarded at once: nobody can make a certificate this image trusts.
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
          -subj "/CN=throwaway CA (build.sh)" -keyout /dev/null -out "$GATEWAY_CA_FILE" 2>/dev/null
      fi
      echo "build.sh: no GATEWAY_CA_FILE: TLS with a throwaway CA (this image trusts no real gateway)"
    fi
  fi
  export GATEWAY_CA_FILE
  echo "build.sh: TLS to ${GATEWAY_TLS_NAME:-umeme-gateway.local}, trusting $GATEWAY_CA_FILE"
fi
# Updates over the air verify against the site's release key (`umeme-gateway firmware keygen`,
# its public half in hex). Without one: a throwaway key made for this build, its private half
# discarded, so the image carries the OTA code but accepts no update.
if [ -z "${METER_RELEASE_PUBLIC_KEY:-}" ]; then
  throwaway_key="$here/target/throwaway-release.pub"
  if [ ! -f "$throwaway_key" ]; then
    mkdir -p "$here/target"
    openssl genpkey -algorithm ed25519 2>/dev/null | openssl pkey -pubout -outform DER 2>/dev/null \
      | tail -c 32 | od -An -tx1 | tr -d ' \n' > "$throwaway_key"
  fi
  METER_RELEASE_PUBLIC_KEY="$(cat "$throwaway_key")"
  echo "build.sh: no METER_RELEASE_PUBLIC_KEY: a throwaway release key (this image accepts no update)"
fi
export METER_RELEASE_PUBLIC_KEY
# A build for one meter (METER_ID set) names the meter in its version (`0.1.0+METER001`): a
# meter without an identity record takes over the air only versions ending in its `+METER_ID`.
# A site image (no METER_ID: the meters' identity records say who they are) is plain `0.1.0`.
if [ -z "${METER_FW_VERSION:-}" ]; then
  METER_FW_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)"
  if [ -n "${METER_ID:-}" ]; then METER_FW_VERSION="$METER_FW_VERSION+$METER_ID"; fi
fi
export METER_FW_VERSION
echo "build.sh: firmware version $METER_FW_VERSION"
start=$(date +%s)
/usr/bin/cargo build --release --locked --target-dir "$here/target"
built=$(date +%s)

pt="$here/target/partitions.bin"
python3 "$here/partitions.py" "$here/partitions.csv" "$pt" 0x400000 \
  "${METER_FLASH_OFFSET:-0x3f0000}" "${METER_OTA_STATE_OFFSET:-0x9000}" "${METER_OTA_STATE_SECTORS:-2}" \
  "${METER_IDENTITY_OFFSET:-0xb000}"
elf="$here/target/riscv32imc-unknown-none-elf/release/meter-fw-esp32c3"
img="$here/target/meter-fw-esp32c3.bin"
python3 -m esptool --chip esp32c3 elf2image --flash-mode dio --flash-size 4MB -o "$img" "$elf" >/dev/null
python3 -m esptool --chip esp32c3 image-info "$img" | grep -E "Checksum|Validation hash" 

echo "== ESP32-C3 firmware =="
if command -v llvm-size >/dev/null; then llvm-size "$elf"; fi
elf_bytes=$(stat -c %s "$elf")
img_bytes=$(stat -c %s "$img")
slot=$((0x1f0000))
if [ "$img_bytes" -gt "$slot" ]; then
  echo "build.sh: the image ($img_bytes bytes) does not fit an OTA slot ($slot bytes)" >&2
  exit 1
fi
echo "ELF:   $elf ($elf_bytes bytes)"
echo "image: $img ($img_bytes bytes, $((img_bytes * 100 / slot))% of one $((slot / 1024)) KiB OTA slot; flash at 0x10000 (ota_0))"
echo "partition table: $pt (flash at 0x8000)"
if [ -n "${METER_ID:-}" ]; then
  # This meter's identity record, for its identity partition (flash once over USB).
  python3 "$here/identity.py" "$here/target/identity-$METER_ID.bin"
  echo "identity record: $here/target/identity-$METER_ID.bin (flash at 0xb000)"
fi
if command -v llvm-size >/dev/null; then
  # Static RAM: what the linker placed in DRAM/IRAM (data, bss, the stack reserve, IRAM code).
  echo "sections in RAM (bytes):"
  llvm-size -A "$elf" | grep -E '^\.(data|bss|stack|rwtext|rwtext\.wifi|dram2_uninit|noinit|trap) ' || true
fi
echo "build: $((built - start)) s"
