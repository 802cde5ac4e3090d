#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target (fuzz/corpus/<target>/), from the shapes the tests
use. Run from anywhere; the files are committed, so this is only needed to change them."""
import hashlib, os, struct, sys

root = os.path.dirname(os.path.abspath(__file__))

def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(root, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)

# Meter payloads (contract §4).
for p in [
    '{"meterNo":"METER001","unitsConsumed":1.25,"remainingBalance":3.75,"totalConsumed":1.25,"timestamp":123456}',
    '{"v":2,"meterNo":"METER001","seq":7,"energyWh":1250,"powerW":120.5,"relay":"on"}',
    '{"v":2,"meterNo":"METER001","seq":4294967295,"energyWh":0}',
    'online', 'disconnected', '{"meterNo":"METER001","status":"low_balance","message":"x"}',
    '{"meterNo":"METER001","balance":4.96}', '{"meterNo":"METER002","balance":-1e308}',
    '{"v":3}', '',
]:
    put("meter_payloads", p)

# Configuration files.
repo = os.path.dirname(root)
for f in ["configs/gateway.toml", "configs/conf.d-examples/hivemq.toml"]:
    with open(os.path.join(repo, f), "rb") as fh:
        put("config_toml", fh.read())
put("config_toml", '[broker]\nlisten = "0.0.0.0:1883"\nmax_connections = 0\n')
put("config_toml", '[[sink]]\nname = "a"\nplugin = "x.so"\nsha256 = "00"\n[sink.config]\nk = 1\n')
put("config_toml", '[ledger]\ncommit_delay = "2s"\nunits_per_kes = -1\n')

# The front door: first byte even = from the connection's start, odd = after a good CONNECT.
def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x

def packet(first, body):
    n, rl = len(body), b""
    while True:
        b = n % 128; n //= 128
        rl += bytes([b | (0x80 if n else 0)])
        if not n:
            break
    return bytes([first]) + rl + body

def connect(cid, user=None, pw=None, level=4, flags=None, name="MQTT", will=None):
    f = 0x02 if flags is None else flags
    if user is not None: f |= 0x80
    if pw is not None: f |= 0x40
    body = s(name) + bytes([level, f]) + struct.pack(">H", 60) + s(cid)
    if will: body += s(will[0]) + s(will[1])
    if user is not None: body += s(user)
    if pw is not None: body += s(pw)
    return packet(0x10, body)

def publish(topic, payload, qos=0, pkid=1, retain=False):
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload.encode()
    return packet(0x30 | (qos << 1) | int(retain), body)

def subscribe(*filters, pkid=1):
    return packet(0x82, struct.pack(">H", pkid) + b"".join(s(f) + b"\x01" for f in filters))

good = connect("METER001", "METER001", "fuzz-secret-0001")
for raw in [
    good, connect("METER001", "METER001", "wrong"), connect("ESP32_METER001_a1b2"),
    connect("ESP32_METER_METER001_c3d4", "METER001", "fuzz-secret-0001"),
    connect("METER001", "METER001", "x", level=5), connect("METER001", "METER001", "x", level=3, name="MQIsdp"),
    connect("METER001", "METER001", "x", flags=0x03), good + b"\x00\x00",
    connect("METER001", "METER001", "fuzz-secret-0001", flags=0x2e, will=("smartmeter/METER001/status", "offline")),
    b"\x10\xff\xff\xff\x7f", b"\xc0\x00", b"GET / HTTP/1.1\r\n\r\n",
]:
    put("front_door", b"\x00" + raw)
v1 = '{"meterNo":"METER001","unitsConsumed":1.25,"remainingBalance":3.75,"totalConsumed":1.25,"timestamp":123456}'
for raw in [
    publish("smartmeter/METER001/consumption", v1, retain=True),
    publish("smartmeter/METER001/consumption", '{"v":2,"meterNo":"METER001","seq":1,"energyWh":10}', qos=1),
    publish("smartmeter/METER001/status", "online"), publish("smartmeter/METER002/consumption", v1),
    subscribe("smartmeter/METER001/command/#"), subscribe("#", "smartmeter/+/command/balance"),
    packet(0xc0, b""), packet(0xe0, b""), packet(0xa2, struct.pack(">H", 2) + s("smartmeter/METER001/command/#")),
    publish("smartmeter/METER001/consumption", v1, qos=2),
]:
    put("front_door", b"\x01" + raw)

# The plugin declaration reader: a tiny shared library that exports the symbol and one that
# does not (built with cc when it is there), and a few broken headers.
import shutil, subprocess, tempfile
if shutil.which("cc"):
    with tempfile.TemporaryDirectory() as t:
        for name, src in [("yes", "int umeme_plugin_declare(void){return 0;}\n"),
                          ("no", "int other(void){return 0;}\n")]:
            c, so = os.path.join(t, name + ".c"), os.path.join(t, name + ".so")
            open(c, "w").write(src)
            subprocess.run(["cc", "-shared", "-fPIC", "-nostdlib", "-Wl,--build-id=none",
                            "-Wl,-z,max-page-size=4096", "-o", so, c], check=True)
            subprocess.run(["strip", "--strip-unneeded", so], check=True)
            put("plugin_declaration", open(so, "rb").read())
put("plugin_declaration", b"\x7fELF\x02\x01\x01" + b"\x00" * 57)
put("plugin_declaration", b"\x7fELF")

# Cloud commands: selector byte (low bits: credit/relay/config/other/empty; 0x80: unsigned
# commands allowed), then the payload. Signed ones use the target's key (32 bytes of 7).
import hmac, json
key = bytes([7]) * 32
def signed(cmd):
    inner = json.dumps(cmd, separators=(",", ":"))
    sig = hmac.new(key, inner.encode(), "sha256").hexdigest()
    return json.dumps({"payload": inner, "sig": sig}).encode()
ts = 1764230400
credit = {"id": "c-1", "meter": "METER001", "reference": "QKJ7XYZ123", "amount_kes": 100,
          "ts": ts, "nonce": "n-1"}
relay = {"id": "r-1", "meter": "METER001", "relay": "off", "reason": "arrears", "ts": ts, "nonce": "n-2"}
config = {"id": "g-1", "meter": "METER001", "config": {"publishIntervalMs": 10000}, "ts": ts, "nonce": "n-3"}
for sel, cmd in [(0, credit), (1, relay), (2, config)]:
    put("cloud_commands", bytes([sel]) + signed(cmd))
    put("cloud_commands", bytes([sel | 0x80]) + json.dumps(cmd).encode())
put("cloud_commands", bytes([0x80]) + json.dumps(dict(credit, amount_cents=99999999999)).encode())
put("cloud_commands", bytes([0]) + json.dumps({"payload": json.dumps(credit), "sig": "00" * 32}).encode())
put("cloud_commands", bytes([0x83]) + b'{"id":"' + b"x" * 200 + b'"}')

# Daraja callbacks: selector byte (0 validation, 1 confirmation, 2 STK callback), then the body.
def c2b(trans, amount, account, confirmation):
    return {"TransactionType": "Pay Bill", "TransID": trans, "TransTime": "20191122063845",
            "TransAmount": amount, "BusinessShortCode": "600999", "BillRefNumber": account,
            "InvoiceNumber": "", "OrgAccountBalance": "25.00" if confirmation else "",
            "ThirdPartyTransID": "", "MSISDN": "254708374149", "FirstName": "NICHOLAS"}
put("daraja_callbacks", b"\x00" + json.dumps(c2b("RKTQDM7W6S", "100.00", "METER001", False)).encode())
put("daraja_callbacks", b"\x01" + json.dumps(c2b("RKTQDM7W6S", "100.00", "METER001", True)).encode())
put("daraja_callbacks", b"\x01" + json.dumps(dict(c2b("RKTQDM7W6T", 50, "", True), TransactionType="Buy Goods")).encode())
put("daraja_callbacks", b"\x01" + json.dumps(c2b("RKTQDM7W6U", "-5", "METER002", True)).encode())
put("daraja_callbacks", b"\x02" + json.dumps({"Body": {"stkCallback": {
    "MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": "ws_CO_191220191020363925",
    "ResultCode": 0, "ResultDesc": "The service request is processed successfully.",
    "CallbackMetadata": {"Item": [{"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
        {"Name": "Balance"}, {"Name": "TransactionDate", "Value": 20191219102115},
        {"Name": "PhoneNumber", "Value": 254708374149}, {"Name": "Amount", "Value": 1.0}]}}}}).encode())
put("daraja_callbacks", b"\x02" + json.dumps({"Body": {"stkCallback": {
    "MerchantRequestID": "1", "CheckoutRequestID": "ws_CO_1", "ResultCode": 1032,
    "ResultDesc": "Request cancelled by user"}}}).encode())
