#!/usr/bin/env python3
"""partitions.csv -> the ESP-IDF binary partition table (0xC00 bytes at flash 0x8000).

Checks what the bootloader and the firmware rely on: entries in order without overlap, app
slots 64 KiB aligned, everything inside the flash, two OTA slots of the same size and an
otadata of 0x2000, the state log where `config::FLASH_OFFSET` puts it and the OTA state log
where `config::OTA_STATE_OFFSET` puts it, at least two sectors, and the identity record where
`config::IDENTITY_OFFSET` puts it. Prints the slots.
Usage: partitions.py partitions.csv out.bin [flash_bytes] [state_log_offset] [ota_state_offset ota_state_sectors [identity_offset]]
"""
import hashlib
import struct
import sys

TYPES = {"app": 0x00, "data": 0x01}
SUBTYPES = {
    "app": {"factory": 0x00, **{f"ota_{i}": 0x10 + i for i in range(16)}},
    "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "undefined": 0x06},
}


def parse(path):
    rows = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        f = [x.strip() for x in line.split(",")]
        name, typ, sub, off, size = f[:5]
        rows.append((name, typ, sub, int(off, 0), int(size, 0)))
    return rows


def main():
    src, out = sys.argv[1], sys.argv[2]
    flash = int(sys.argv[3], 0) if len(sys.argv) > 3 else 4 << 20
    state_log = int(sys.argv[4], 0) if len(sys.argv) > 4 else None
    ota_state = int(sys.argv[5], 0) if len(sys.argv) > 5 else None
    ota_sectors = int(sys.argv[6], 0) if len(sys.argv) > 6 else 2
    identity = int(sys.argv[7], 0) if len(sys.argv) > 7 else None
    rows = parse(src)
    table = b""
    end = 0x9000  # bootloader below 0x8000, this table at 0x8000
    for name, typ, sub, off, size in rows:
        assert off >= end, f"{name} at {off:#x} overlaps what ends at {end:#x}"
        if typ == "app":
            assert off % 0x10000 == 0, f"{name}: app partitions start on 64 KiB"
        assert off % 0x1000 == 0 and size % 0x1000 == 0, f"{name}: 4 KiB sectors"
        end = off + size
        assert end <= flash, f"{name} ends at {end:#x}, past the {flash:#x}-byte flash"
        label = name.encode()
        assert len(label) <= 16
        table += struct.pack(
            "<2sBBLL16sL", b"\xaa\x50", TYPES[typ], SUBTYPES[typ][sub], off, size, label, 0
        )
    table += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(table).digest()
    assert len(table) <= 0xC00
    open(out, "wb").write(table + b"\xff" * (0xC00 - len(table)))

    slots = [r for r in rows if r[1] == "app" and r[2].startswith("ota_")]
    assert len(slots) == 2 and slots[0][4] == slots[1][4], "two OTA slots of one size"
    otadata = [r for r in rows if r[1] == "data" and r[2] == "ota"]
    assert len(otadata) == 1 and otadata[0][4] == 0x2000, "otadata of 0x2000"
    if state_log is not None:
        log = [r for r in rows if r[0] == "meterlog"]
        assert log and log[0][3] == state_log, "meterlog must sit at config::FLASH_OFFSET"
    if ota_state is not None:
        st = [r for r in rows if r[0] == "otastate"]
        assert st and st[0][3] == ota_state, "otastate must sit at config::OTA_STATE_OFFSET"
        assert ota_sectors >= 2, "the OTA state log needs two sectors to rotate"
        assert ota_sectors * 0x1000 <= st[0][4], "OTA_STATE_SECTORS must fit otastate"
    if identity is not None:
        ident = [r for r in rows if r[0] == "identity"]
        assert ident and ident[0][3] == identity, "identity must sit at config::IDENTITY_OFFSET"
    for name, _, _, off, size in slots:
        print(f"OTA slot {name}: {off:#x}, {size} bytes ({size // 1024} KiB)")


if __name__ == "__main__":
    main()
