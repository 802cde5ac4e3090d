#!/usr/bin/env bash
# Builds the umeme-gateway .deb for amd64 and arm64 and proves them without a device:
# lintian; the arm64 binary and plugins under qemu-user; a fresh Debian bookworm root
# (debootstrap) where the amd64 package installs, passes check-config, boots under a real
# systemd (systemd-nspawn --boot) and answers /health, upgrades keeping an edited config and the
# ledger, and is removed and purged; systemd-analyze verify and security.
#
# Needs root on Debian 12 (bookworm) with the Debian mirror and crates.io reachable. Idempotent:
# tools, builds and the bookworm base root are kept under target/packaging and reused.
# Usage: packaging/ci.sh            (every step, then a summary table)
#        packaging/ci.sh --step NAME (one step; the steps depend on the earlier ones' files)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$REPO/packaging/ci.sh
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
WORK=$TARGET_DIR/packaging
TOOLS=$WORK/tools
OUT=$WORK/out
ARM=aarch64-unknown-linux-gnu
ARM_TARGET_DIR=$TARGET_DIR/deb-arm64
BASE=$WORK/bookworm-base # debootstrap minbase; never changed once made
ROOT=$WORK/bookworm-root # a fresh copy of BASE per run, where the package is tested
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CARGO_DEB_VERSION=3.8.0
# First-party plugins, shipped when they are workspace members at build time.
FIRST_PARTY_PLUGINS="sink-firebase sink-mqtt source-daraja"
export CARGO_TERM_COLOR=never DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

cd "$REPO"
mkdir -p "$WORK"

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
note() { echo "   $*"; }

# Directories under plugins/ whose crate is a workspace member now.
present_plugins() {
    local d
    for d in $FIRST_PARTY_PLUGINS; do
        if [ -f "plugins/$d/Cargo.toml" ] && grep -q "\"plugins/$d\"" Cargo.toml; then
            echo "$d"
        fi
    done
}
plugin_file() { echo "libumeme_${1//-/_}.so"; }

deb_amd64() { ls "$OUT"/umeme-gateway_*_amd64.deb; }
deb_arm64() { ls "$OUT"/umeme-gateway_*_arm64.deb; }
deb_upgrade() { ls "$OUT"/upgrade/umeme-gateway_*_amd64.deb; }

# Debian's rustc-web and cargo for arm64 (rustup's toolchain has no aarch64 std here): PATH
# without ~/.cargo/bin and RUSTC set, or /usr/bin/cargo would pick rustup's rustc.
arm64_env() {
    export PATH=/usr/sbin:/usr/bin:/sbin:/bin RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=$ARM_TARGET_DIR
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
    # The package is stripped anyway; this target dir is ours alone, so no one else's
    # fingerprints change.
    export CARGO_PROFILE_RELEASE_DEBUG=false
}

# ---------------------------------------------------------------------------------------------
step_apt() {
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update -qq
    # libc6-dev-arm64-cross is only a Recommends of the cross gcc, but the C parts (sqlite, ring)
    # need its headers.
    apt-get install -y -qq --no-install-recommends \
        rustc-web cargo-web libstd-rust-web-dev:arm64 \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu \
        qemu-user lintian debootstrap systemd-container dpkg-dev file curl >/dev/null
    note "rustc (Debian): $(/usr/bin/rustc --version); qemu: $(qemu-aarch64 --version | head -1)"
}

step_cargo_deb() {
    if [ "$("$TOOLS/bin/cargo-deb" --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ]; then
        note "cargo-deb $CARGO_DEB_VERSION already in $TOOLS"
        return
    fi
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --root "$TOOLS" --quiet
}

step_build_amd64() {
    local args=(-p umeme-gateway) d
    for d in $(present_plugins); do args+=(-p "umeme-$d"); done
    note "cargo $(cargo --version | cut -d' ' -f2) build --release ${args[*]}"
    cargo build --release --locked "${args[@]}"
}

step_build_arm64() {
    local args=(-p umeme-gateway -p umeme-testkit-sink) d
    for d in $(present_plugins); do args+=(-p "umeme-$d"); done
    arm64_env
    note "$(cargo --version) build --release --target $ARM ${args[*]}"
    cargo build --release --locked --target "$ARM" "${args[@]}"
}

# Stages what cargo-deb packs for one architecture, in <release dir>/deb-stage: the stripped
# binary and plugins (stripped here, so the sha256 written into the config is the shipped
# file's), SHA256SUMS, conf.d/10-plugins.toml, the man page and the examples.
stage() {
    local rel=$1 strip=$2 S=$1/deb-stage d f h
    rm -rf "$S"
    mkdir -p "$S/plugins" "$S/examples"
    "$strip" --strip-unneeded --remove-section=.comment -o "$S/umeme-gateway" "$rel/umeme-gateway"
    : >"$S/plugins/SHA256SUMS"
    {
        echo "## Plugins shipped in /usr/lib/umeme-gateway/plugins by this package, with the sha256"
        echo "## of each file (also in /usr/lib/umeme-gateway/plugins/SHA256SUMS). Nothing here is"
        echo "## active. To use a plugin, copy its block into a file of your own (for example"
        echo "## conf.d/50-firebase.toml), remove the leading \"# \" and add its [sink.config] or"
        echo "## [source.config] (see /usr/share/doc/umeme-gateway/examples/). Keep the sha256 line:"
        echo "## the gateway refuses a plugin file that does not match it."
    } >"$S/10-plugins.toml"
    for d in $(present_plugins); do
        f=$(plugin_file "$d")
        "$strip" --strip-unneeded --remove-section=.comment -o "$S/plugins/$f" "$rel/$f"
        chmod 644 "$S/plugins/$f"
        h=$(sha256sum "$S/plugins/$f" | cut -d' ' -f1)
        echo "$h  $f" >>"$S/plugins/SHA256SUMS"
        # Name, kind and version from the amd64 build (the same source for both architectures).
        local info=$WORK/inspect/$f.txt
        local kind name version
        kind=$(sed -n 's/^kind: *//p' "$info") # "sink" or "payment source"
        kind=${kind##* }
        name=$(sed -n 's/^name: *//p' "$info")
        version=$(sed -n 's/^plugin version: *//p' "$info")
        {
            echo
            echo "## umeme-$d $version ($kind \"$name\")"
            echo "# [[$kind]]"
            echo "# name = \"$name\""
            echo "# plugin = \"$f\""
            echo "# sha256 = \"$h\""
        } >>"$S/10-plugins.toml"
        if [ -f "plugins/$d/README.md" ]; then cp "plugins/$d/README.md" "$S/examples/README.$d.md"; fi
        # Example drop-ins naming this plugin get its sha256 filled in.
        for e in configs/conf.d-examples/*.toml; do
            [ -f "$e" ] && grep -q "plugin = \"$f\"" "$e" || continue
            sed "s|^# *sha256 = \"…\".*|sha256 = \"$h\"   # $f as shipped in this package|" \
                "$e" >"$S/examples/$(basename "$e")"
        done
    done
    cp configs/gateway.toml "$S/examples/gateway.toml" # the shipped defaults, to compare with /etc
    gzip -9n <packaging/umeme-gateway.8 >"$S/umeme-gateway.8.gz"
}

step_package() {
    # The packaged configuration must keep its state where StateDirectory= makes it writable.
    grep -qx 'data_dir = "/var/lib/umeme-gateway"' configs/gateway.toml ||
        fail "configs/gateway.toml: data_dir must be /var/lib/umeme-gateway"
    grep -qx 'plugin_dir = "/usr/lib/umeme-gateway/plugins"' configs/gateway.toml ||
        fail "configs/gateway.toml: plugin_dir must be /usr/lib/umeme-gateway/plugins"
    local d f
    rm -rf "$WORK/inspect" "$OUT"
    mkdir -p "$WORK/inspect" "$OUT/upgrade"
    for d in $(present_plugins); do
        f=$(plugin_file "$d")
        RUST_LOG=warn "$TARGET_DIR/release/umeme-gateway" plugin inspect "$TARGET_DIR/release/$f" >"$WORK/inspect/$f.txt"
    done
    stage "$TARGET_DIR/release" strip
    stage "$ARM_TARGET_DIR/$ARM/release" aarch64-linux-gnu-strip
    note "plugins: $(present_plugins | tr '\n' ' ')"
    local deb="$TOOLS/bin/cargo-deb -p umeme-gateway --no-build --no-strip --no-dbgsym"
    $deb -o "$OUT/"
    (arm64_env && $deb --target "$ARM" -o "$OUT/")
    # The same payload as a newer version, for the upgrade test.
    local v
    v=$(dpkg-deb -f "$(deb_amd64)" Version)
    $deb --deb-version "$v+ci1" -o "$OUT/upgrade/"
    for f in "$(deb_amd64)" "$(deb_arm64)"; do
        note "$(basename "$f"): $(du -k "$f" | cut -f1) KiB; Depends: $(dpkg-deb -f "$f" Depends)"
        dpkg-deb --ctrl-tarfile "$f" | tar -xO ./conffiles | sort | diff -u - <(printf '%s\n' \
            /etc/umeme-gateway/conf.d/10-plugins.toml /etc/umeme-gateway/conf.d/README \
            /etc/umeme-gateway/gateway.toml) || fail "$(basename "$f"): conffiles"
    done
    local want
    for f in "$(deb_amd64)" "$(deb_arm64)"; do
        want=$([ "$(dpkg-deb -f "$f" Architecture)" = arm64 ] && echo aarch64 || echo x86-64)
        local x
        x=$(mktemp -d)
        dpkg-deb -x "$f" "$x"
        for b in "$x"/usr/bin/umeme-gateway "$x"/usr/lib/umeme-gateway/plugins/*.so; do
            [ -e "$b" ] || continue
            file -b "$b" | grep -q -- "$want" || fail "$(basename "$f"): $b is not $want"
        done
        (cd "$x/usr/lib/umeme-gateway/plugins" && sha256sum --quiet -c SHA256SUMS) ||
            fail "$(basename "$f"): SHA256SUMS does not match the plugins"
        rm -rf "$x"
    done
}

step_lintian() {
    local f rc=0
    : >"$WORK/lintian.txt"
    for f in "$(deb_amd64)" "$(deb_arm64)"; do
        echo "-- lintian $(basename "$f")" | tee -a "$WORK/lintian.txt"
        lintian -I --show-overrides --fail-on error "$f" 2>&1 | tee -a "$WORK/lintian.txt" || rc=1
    done
    return $rc
}

step_security() {
    local out
    # --threshold is on systemd's internal 0-100 scale: 20 fails above an exposure of 2.0.
    out=$(systemd-analyze security --offline=yes --threshold=20 --no-pager \
        packaging/debian/umeme-gateway.service 2>&1) || {
        echo "$out"
        fail "systemd-analyze security above 2.0"
    }
    echo "$out" | tail -1 | tee "$WORK/security.txt"
}

step_qemu_arm64() {
    local X=$WORK/arm64-run GW q pid api n
    rm -rf "$X"
    mkdir -p "$X/etc/conf.d" "$X/run" "$X/state"
    dpkg-deb -x "$(deb_arm64)" "$X/root"
    GW=$X/root/usr/bin/umeme-gateway
    # No `-L /usr/aarch64-linux-gnu`: with the multiarch libc6:arm64 installed it mixes two
    # glibc builds and hangs at the first thread (research/packaging.md §1.3).
    q() { timeout 120 qemu-aarch64 "$GW" "$@"; }
    note "$(q --version) under $(qemu-aarch64 --version | head -1)"
    q check-config --config "$X/root/etc/umeme-gateway/gateway.toml"
    # The shipped plugin blocks enabled: check-config loads each arm64 plugin with every check
    # (owner, mode, sha256, ABI, kind).
    cat >"$X/etc/gateway.toml" <<EOF
[gateway]
data_dir = "$X/state"
plugin_dir = "$X/root/usr/lib/umeme-gateway/plugins"
EOF
    sed -n 's/^# //p' "$X/root/etc/umeme-gateway/conf.d/10-plugins.toml" >"$X/etc/conf.d/10-plugins.toml"
    q check-config --config "$X/etc/gateway.toml" | tee "$X/check.log"
    n=$(grep -c '^ok: plugin' "$X/check.log" || true)
    [ "$n" = "$(present_plugins | wc -l)" ] || fail "arm64: $n plugins loaded"
    q plugin inspect "$ARM_TARGET_DIR/$ARM/release/libumeme_testkit_sink.so" | tee "$X/inspect.log"
    grep -q '^kind: *sink' "$X/inspect.log" || fail "arm64 testkit sink not loaded"
    # The daemon on loopback, ports chosen by the kernel; /health over HTTP.
    cat >"$X/run/gateway.toml" <<EOF
[gateway]
data_dir = "$X/state"
plugin_dir = "$X/root/usr/lib/umeme-gateway/plugins"
[broker]
listen = "127.0.0.1:0"
[api]
listen = "127.0.0.1:0"
EOF
    timeout 120 qemu-aarch64 "$GW" run --config "$X/run/gateway.toml" 2>"$X/run.log" &
    pid=$!
    for _ in $(seq 90); do
        api=$(sed -n 's/.*umeme-gateway ready.* api=\([0-9.:]*\).*/\1/p' "$X/run.log" | head -1)
        [ -n "$api" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    [ -n "$api" ] || {
        cat "$X/run.log"
        fail "arm64 daemon did not start"
    }
    note "GET http://$api/health -> $(curl -fsS --max-time 10 "http://$api/health")"
    kill -TERM "$pid"
    wait "$pid" || fail "arm64 daemon did not stop cleanly on SIGTERM"
    grep -q 'shutting down' "$X/run.log" || fail "arm64 daemon: no clean shutdown"
}

# Runs a command in ROOT as in a chroot, with /proc, /dev and the host's network. (nspawn's
# "Attempted to remove disk file system" on exit is harmless on this host.)
in_root() {
    systemd-nspawn -q -D "$ROOT" --register=no --keep-unit --pipe -E DEBIAN_FRONTEND=noninteractive \
        -- "$@" 2> >(grep -v 'Attempted to remove disk file system' >&2)
}
as_daemon() { echo setpriv --reuid=umeme-gateway --regid=umeme-gateway --init-groups; }

step_rootfs() {
    if [ ! -f "$BASE/.umeme-ci-base" ]; then
        rm -rf "$BASE.tmp"
        debootstrap --variant=minbase bookworm "$BASE.tmp" "$MIRROR" >"$WORK/debootstrap.log"
        # Download (not install) what the package will pull in, so later runs need no mirror.
        ROOT=$BASE.tmp in_root sh -c 'apt-get update -qq &&
            apt-get install -y -qq -d --no-install-recommends systemd >/dev/null'
        touch "$BASE.tmp/.umeme-ci-base"
        mv "$BASE.tmp" "$BASE"
    else
        note "reusing $BASE"
    fi
    rm -rf "$ROOT"
    cp -a "$BASE" "$ROOT"
}

step_install() {
    local a u
    cp "$(deb_amd64)" "$(deb_upgrade)" "$ROOT/var/tmp/"
    a=/var/tmp/$(basename "$(deb_amd64)")
    # apt resolves the Depends (systemd for sysusers) from the mirror.
    in_root sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $a >/dev/null"
    in_root getent passwd umeme-gateway >/dev/null || fail "no umeme-gateway user"
    [ "$(in_root dpkg-statoverride --list /etc/umeme-gateway/gateway.toml)" = \
        "root umeme-gateway 640 /etc/umeme-gateway/gateway.toml" ] || fail "gateway.toml statoverride"
    [ -L "$ROOT/etc/systemd/system/multi-user.target.wants/umeme-gateway.service" ] || fail "unit not enabled"
    [ "$(in_root stat -c '%U:%G %a' /etc/umeme-gateway/secrets)" = "root:umeme-gateway 750" ] || fail "secrets dir"
    note "installed: $(in_root dpkg-query -W -f='${Package} ${Version} ${Architecture}' umeme-gateway)"
    # check-config on the shipped configuration, as the daemon's user (what ExecStartPre runs).
    in_root $(as_daemon) umeme-gateway check-config
    # ... and with every shipped plugin block of conf.d/10-plugins.toml enabled: the installed
    # files pass the gateway's owner, mode and sha256 checks.
    sed -n 's/^# //p' "$ROOT/etc/umeme-gateway/conf.d/10-plugins.toml" >"$ROOT/etc/umeme-gateway/conf.d/90-ci.toml"
    u=$(in_root env RUST_LOG=warn $(as_daemon) umeme-gateway check-config)
    echo "$u"
    u=$(echo "$u" | grep -c '^ok: plugin' || true)
    rm "$ROOT/etc/umeme-gateway/conf.d/90-ci.toml"
    [ "$u" = "$(present_plugins | wc -l)" ] || fail "amd64: $u plugins passed check-config"
    # systemd-analyze verify exits 0 even on warnings: any output is a failure. --man=no: the
    # minimal root has no man(1); the man page itself is checked here instead.
    [ -f "$ROOT/usr/share/man/man8/umeme-gateway.8.gz" ] || fail "no man page"
    u=$(in_root systemd-analyze verify --man=no umeme-gateway.service 2>&1) || fail "systemd-analyze verify: $u"
    [ -z "$u" ] || fail "systemd-analyze verify: $u"
    note "systemd-analyze verify umeme-gateway.service: no output"
}

# The booted container (step_boot): its PID 1, and commands inside it.
ns() { nsenter -t "$LEADER" -a "$@"; }
health() {
    ns bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET /health HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null |
        grep -q '"status":"ok"'
}
wait_health() {
    local i
    for i in $(seq 30); do
        health && return 0
        sleep 1
    done
    ns journalctl -u umeme-gateway --no-pager | tail -30
    fail "no answer from GET /health"
}
main_pid() { ns systemctl show -p MainPID --value umeme-gateway; }

step_boot() {
    local NSPAWN i s p1 p2 v
    # A private network namespace (loopback only): the packaged ports 1883/8080 do not meet
    # anything else running on this machine.
    systemd-nspawn -q -D "$ROOT" --boot --register=no --keep-unit --private-network \
        --console=passive -M umeme-ci >"$WORK/nspawn.log" 2>&1 &
    NSPAWN=$!
    trap 'kill '"$NSPAWN"' 2>/dev/null || true' EXIT
    LEADER=
    for i in $(seq 60); do
        LEADER=$(pgrep -P "$NSPAWN" -x systemd || true)
        [ -n "$LEADER" ] && break
        sleep 1
    done
    [ -n "$LEADER" ] || fail "container did not boot: $(cat "$WORK/nspawn.log")"
    for i in $(seq 60); do
        s=$(ns systemctl is-system-running 2>/dev/null || true)
        case $s in running | degraded) break ;; esac
        sleep 1
    done
    note "container systemd: $s after ${i}s"
    # Type=notify: "active" means the daemon sent READY=1.
    for i in $(seq 30); do
        [ "$(ns systemctl is-active umeme-gateway || true)" = active ] && break
        sleep 1
    done
    [ "$(ns systemctl is-active umeme-gateway || true)" = active ] || {
        ns journalctl -u umeme-gateway --no-pager | tail -30
        fail "umeme-gateway not active after boot"
    }
    wait_health
    p1=$(main_pid)
    note "active (READY=1 received), GET /health answers; MainPID $p1"
    note "$(ns grep -E '^(Uid|NoNewPrivs|Seccomp|CapEff):' /proc/"$p1"/status | tr -s '\t\n' '  ')"
    note "live: $(ns systemd-analyze security umeme-gateway --no-pager | tail -1)"
    note "$(ns systemctl show -p WatchdogUSec -p WatchdogTimestamp -p NRestarts umeme-gateway | tr '\n' ' ')"
    echo "   journal:"
    ns journalctl -u umeme-gateway --no-pager -o short-iso | tail -6 | sed 's/^/     /'

    # Every shipped plugin loaded (dlopen, ABI, sha256, owner) under the unit's full sandbox
    # (MemoryDenyWriteExecute, seccomp, PrivateUsers): the shipped unit as a oneshot running
    # check-config with the blocks of conf.d/10-plugins.toml enabled.
    sed -n 's/^# //p' "$ROOT/etc/umeme-gateway/conf.d/10-plugins.toml" >"$ROOT/etc/umeme-gateway/conf.d/90-ci.toml"
    sed -e 's/^Type=notify/Type=oneshot/' -e '/^WatchdogSec=/d' -e '/^ExecStartPre=/d' \
        -e 's|^ExecStart=.*|ExecStart=/usr/bin/umeme-gateway check-config|' \
        "$ROOT/usr/lib/systemd/system/umeme-gateway.service" >"$ROOT/etc/systemd/system/umeme-ci-plugins.service"
    ns systemctl daemon-reload
    ns systemctl start umeme-ci-plugins.service || true
    rm "$ROOT/etc/umeme-gateway/conf.d/90-ci.toml" "$ROOT/etc/systemd/system/umeme-ci-plugins.service"
    ns systemctl daemon-reload
    i=$(ns journalctl -u umeme-ci-plugins --no-pager -o cat | grep -c '^ok: plugin' || true)
    [ "$i" = "$(present_plugins | wc -l)" ] || {
        ns journalctl -u umeme-ci-plugins --no-pager -o cat | tail -20
        fail "under the unit's sandbox $i of $(present_plugins | wc -l) plugins loaded"
    }
    note "under the unit's sandbox, check-config loaded all $i shipped plugins"

    # Ledger and an administrator's edit, then the upgrade.
    ns $(as_daemon) umeme-gateway meter add CI0001 --secret ci-secret-0001 >/dev/null
    note "$(ns $(as_daemon) umeme-gateway credit CI0001 --kes 100 --ref CI-0001)"
    sed -i 's/^low_balance_units = 3.0$/low_balance_units = 2.5   # edited on site/' "$ROOT/etc/umeme-gateway/gateway.toml"
    grep -q 'edited on site' "$ROOT/etc/umeme-gateway/gateway.toml" || fail "edit not applied"
    ns dpkg -i --force-confdef --force-confold "/var/tmp/$(basename "$(deb_upgrade)")" </dev/null >/dev/null
    v=$(ns dpkg-query -W -f='${Version}' umeme-gateway)
    [ "$v" = "$(dpkg-deb -f "$(deb_upgrade)" Version)" ] || fail "upgrade: version $v"
    grep -q 'edited on site' "$ROOT/etc/umeme-gateway/gateway.toml" || fail "upgrade lost the edit"
    wait_health
    p2=$(main_pid)
    [ "$p2" != "$p1" ] || fail "upgrade did not restart the daemon"
    ns $(as_daemon) umeme-gateway meter show CI0001 | grep '^balance: *5.000 units' >/dev/null ||
        fail "upgrade lost the ledger"
    note "upgraded to $v: edit kept, MainPID $p1 -> $p2, meter CI0001 still at 5.000 units"

    # An upgrade onto a configuration the new version rejects leaves the old process serving.
    printf '[api]\nno_such_key = 1\n' >"$ROOT/etc/umeme-gateway/conf.d/50-broken.toml"
    ns dpkg -i "/var/tmp/$(basename "$(deb_upgrade)")" </dev/null >"$WORK/upgrade-rejected.log" 2>&1
    grep -q 'NOT restarted' "$WORK/upgrade-rejected.log" || fail "no warning for a rejected configuration"
    [ "$(main_pid)" = "$p2" ] || fail "restarted onto a configuration check-config rejects"
    health || fail "the old process stopped serving"
    rm "$ROOT/etc/umeme-gateway/conf.d/50-broken.toml"
    note "upgrade with a bad conf.d file: not restarted, MainPID $p2 still serving, the error printed"

    ns dpkg -r umeme-gateway </dev/null >/dev/null
    [ "$(ns systemctl is-active umeme-gateway || true)" != active ] || fail "still running after remove"
    grep -q 'edited on site' "$ROOT/etc/umeme-gateway/gateway.toml" || fail "remove dropped the config"
    [ -f "$ROOT/var/lib/umeme-gateway/gateway.db" ] || fail "remove dropped the ledger"
    note "remove: stopped; config (with the edit) and ledger kept"

    ns dpkg --purge umeme-gateway </dev/null >/dev/null 2>&1
    [ ! -e "$ROOT/etc/umeme-gateway" ] || fail "purge left $(find "$ROOT/etc/umeme-gateway")"
    [ -z "$(ns dpkg-statoverride --list /etc/umeme-gateway/gateway.toml)" ] || fail "purge left the statoverride"
    [ -f "$ROOT/var/lib/umeme-gateway/gateway.db" ] || fail "purge removed the ledger without being asked"
    note "purge: /etc/umeme-gateway gone; ledger kept (not asked)"

    # Reinstalled, the gateway finds the kept ledger; a purge that asks removes it.
    ns dpkg -i "/var/tmp/$(basename "$(deb_amd64)")" </dev/null >/dev/null 2>&1
    wait_health
    ns $(as_daemon) umeme-gateway meter show CI0001 | grep '^balance: *5.000 units' >/dev/null ||
        fail "reinstall did not find the kept ledger"
    ns env UMEME_GATEWAY_PURGE_STATE=yes dpkg --purge umeme-gateway </dev/null >/dev/null 2>&1
    [ ! -e "$ROOT/var/lib/umeme-gateway" ] || fail "UMEME_GATEWAY_PURGE_STATE=yes purge left the state"
    note "reinstall found the ledger; purge with UMEME_GATEWAY_PURGE_STATE=yes removed it"

    ns systemctl poweroff 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$NSPAWN" 2>/dev/null || break
        sleep 1
    done
    ! kill -0 "$NSPAWN" 2>/dev/null || fail "container did not power off"
    note "container powered off after ${i}s"
}

# ---------------------------------------------------------------------------------------------
if [ "${1:-}" = "--step" ]; then
    "step_$2"
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "run as root (apt, debootstrap, systemd-nspawn)"
exec 9>"$WORK/lock"
flock -w 1200 9 || fail "another packaging/ci.sh holds $WORK/lock"

T0=$SECONDS
SUMMARY=()
summary() {
    echo
    echo "packaging summary"
    printf '  %-12s %8s  %s\n' step seconds result
    printf '  %s\n' "${SUMMARY[@]}"
    [ -f "$WORK/security.txt" ] && echo "  security: $(cat "$WORK/security.txt")"
    if [ -f "$WORK/lintian.txt" ]; then
        echo "  lintian: $(grep -c '^E:' "$WORK/lintian.txt" || true) errors," \
            "$(grep -c '^W:' "$WORK/lintian.txt" || true) warnings," \
            "$(grep -c '^I:' "$WORK/lintian.txt" || true) info, $(grep -c '^O:' "$WORK/lintian.txt" || true) overridden"
    fi
    [ -d "$OUT" ] && ls "$OUT"/*.deb 2>/dev/null | sed 's/^/  /'
    echo "  total: $((SECONDS - T0))s"
}
run_step() {
    local name=$1 limit=$2 t=$SECONDS rc=0
    printf '\n== [%4ds] %s (limit %ss)\n' $((SECONDS - T0)) "$name" "$limit"
    timeout --kill-after=15 "$limit" "$SELF" --step "$name" || rc=$?
    record "$name" $rc $((SECONDS - t))
}
record() {
    local name=$1 rc=$2 dt=$3 result=ok
    [ "$rc" = 0 ] || result="FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"
    SUMMARY+=("$(printf '%-12s %8s  %s' "$name" "$dt" "$result")")
    printf '   [%4ds] %s: %s in %ss\n' $((SECONDS - T0)) "$name" "$result" "$dt"
    if [ "$rc" != 0 ]; then
        local b
        for b in "${BACKGROUND[@]}"; do pkill -TERM -P "${b#*:}" 2>/dev/null || true; done
        summary
        echo "packaging: 0 passed, 1 failed"
        exit 1
    fi
}
# Steps that do not depend on each other run beside the amd64 build; their output is shown
# when they end. (Two cores: the builds' single-threaded phases, such as gcc on sqlite3.c,
# leave a core free, and debootstrap mostly waits for the network and the disk.)
BACKGROUND=()
start_background() {
    local name=$1 limit=$2
    printf '\n== [%4ds] %s (limit %ss, in the background)\n' $((SECONDS - T0)) "$name" "$limit"
    (
        t=$SECONDS rc=0
        timeout --kill-after=15 "$limit" "$SELF" --step "$name" >"$WORK/$name.log" 2>&1 || rc=$?
        echo "$rc $((SECONDS - t))" >"$WORK/$name.rc"
    ) &
    BACKGROUND+=("$name:$!")
}
wait_background() {
    local b name rc dt
    for b in "${BACKGROUND[@]}"; do
        name=${b%%:*}
        wait "${b#*:}" || true
        read -r rc dt <"$WORK/$name.rc"
        printf '\n== [%4ds] %s (background) output:\n' $((SECONDS - T0)) "$name"
        tail -n 40 "$WORK/$name.log"
        record "$name" "$rc" "$dt"
    done
    BACKGROUND=()
}

run_step apt 600
start_background cargo_deb 900
start_background rootfs 900
start_background build_arm64 1500
run_step build_amd64 1500
wait_background
run_step package 300
run_step lintian 300
run_step security 60
run_step qemu_arm64 300
run_step install 300
run_step boot 300
summary
echo "packaging: 1 passed, 0 failed"
