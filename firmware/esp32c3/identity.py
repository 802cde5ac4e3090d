#!/usr/bin/env python3
"""Writes a meter's identity record (meter-core `identity`) for the `identity` partition (0xB000,
4 KiB), from the same settings as the build: METER_ID, METER_SECRET, WIFI_SSID, WIFI_PASSWORD,
GATEWAY_HOST (each optional; unset ones are left to the image's built-in values).
Usage: METER_ID=METER001 METER_SECRET=... identity.py out.bin
Flash:  python3 -m esptool --chip esp32c3 write-flash 0xb000 out.bin
"""
import os
import re
import sys

FIELDS = [
    ("meter_id", "METER_ID", lambda v: re.fullmatch(r"[0-9A-Za-z_-]{1,32}", v)),
    ("meter_secret", "METER_SECRET", lambda v: 1 <= len(v) <= 64),
    ("wifi_ssid", "WIFI_SSID", lambda v: 1 <= len(v) <= 32),
    ("wifi_password", "WIFI_PASSWORD", lambda v: 8 <= len(v) <= 64),
    ("gateway_host", "GATEWAY_HOST",
     lambda v: re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})", v)
     and all(int(p) <= 255 for p in v.split("."))),
]


def main():
    lines = ["umeme-identity 1"]
    for key, env, ok in FIELDS:
        v = os.environ.get(env)
        if v is None or v == "":
            continue
        if not all(0x20 <= ord(c) < 0x7F for c in v) or not ok(v):
            sys.exit(f"identity.py: {env} is out of range for the identity record")
        lines.append(f"{key}={v}")
    record = ("\n".join(lines) + "\n").encode()
    assert len(record) <= 512, "the record must fit 512 bytes"
    # The rest of the sector erased, as flash is after an erase.
    with open(sys.argv[1], "wb") as f:
        f.write(record + b"\xff" * (4096 - len(record)))


if __name__ == "__main__":
    main()
