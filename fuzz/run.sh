#!/usr/bin/env bash
# Builds every fuzz target (cargo-fuzz, libFuzzer) with Debian's rustc and runs each for a
# bounded time, from the committed seed corpus. Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET…]
# Exits non-zero when a target crashes; the input is then in fuzz/artifacts/<target>/ and
# `fuzz/run.sh repro <target> <file>` replays it. New inputs go to a temporary folder, not
# into the committed corpus. docs/security.md records the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! [ -x /usr/bin/rustc ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rustc-web cargo-web >/dev/null
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz@0.13.2

# Debian's rustc is a release toolchain: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags. It
# ships no AddressSanitizer runtime, so the targets run without one (`-s none`): the code is
# safe Rust and what we hunt is panics, hangs and unbounded memory, which libFuzzer sees.
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$PWD/target/fuzz"
flags=(-s none --fuzz-dir fuzz)

if [ "${1:-}" = repro ]; then
  cargo fuzz run "${flags[@]}" "$2" "$3"
  exit
fi
seconds="${1:-20}"
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)

echo "== fuzz: building ${#targets[@]} targets"
cargo fuzz build "${flags[@]}" >/dev/null
for t in "${targets[@]}"; do
  work="$(mktemp -d)"
  log="$work/log"
  echo "== fuzz: $t for ${seconds}s"
  if ! cargo fuzz run "${flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t crashed; see fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "fuzz: $t: ${runs:-?} executions in ${seconds}s, corpus $(ls "$work" | wc -l) new inputs, crashes: 0"
  rm -rf "$work"
done
