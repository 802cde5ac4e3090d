"""Fills a debug-build gateway with a week of a demo site for the screenshots (scripts/screenshots):
meters added and paid on day one, reports at five times a day, a reading of the bulk supply by
hand each day (one day losing 16 %), a bypass on the cut-off meter. The daemon's clock is walked
through the week with the debug build's POST /api/debug/clock, which folds at each step, so
usage, alerts and site loss are what they would be after a real week."""
import argparse
import json
import random
import subprocess
import time
import urllib.request

p = argparse.ArgumentParser()
p.add_argument("--api", required=True)
p.add_argument("--broker", required=True)
p.add_argument("--token", required=True)
a = p.parse_args()
host, port = a.broker.rsplit(":", 1)
HOUR, DAY, TZ = 3_600_000, 86_400_000, 3 * 3_600_000

METERS = [("KPLC-A01", "Wanjiku Kamau", 500, 4.2), ("KPLC-A02", "Otieno Ouma", 250, 2.1),
          ("KPLC-A03", "Achieng Atieno", 1000, 6.0), ("KPLC-B01", "Mwangi Njoroge", 120, 3.5),
          ("KPLC-B02", "Kiprop Cheruiyot", 300, 3.0), ("KPLC-B03", "Fatuma Hassan", 0, 0.0),
          ("KPLC-C01", "Mutua Musyoka", 50, 2.8), ("KPLC-C02", "Nafula Wekesa", 750, 5.1)]
# Share of a day's use reported at each local hour.
SHAPE = {6: 0.10, 8: 0.25, 13: 0.15, 19: 0.30, 21: 0.20}
LOSS = [0.05, 0.07, 0.04, 0.16, 0.06, 0.08, 0.05]


def api(method, path, body=None):
    req = urllib.request.Request(a.api + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {a.token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def clock(ms):
    api("POST", "/api/debug/clock", {"nowMs": ms})


seq = {m: 0 for m, *_ in METERS}
energy = {m: 100_000 for m, *_ in METERS}


def report(meter, wh, power_w, relay="on"):
    seq[meter] += 1
    energy[meter] += wh
    payload = json.dumps({"v": 2, "meterNo": meter, "seq": seq[meter], "energyWh": energy[meter],
                          "powerW": power_w, "relay": relay})
    subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv311", "-i", meter, "-u", meter,
                    "-P", "secret-" + meter, "-q", "1", "-t", f"smartmeter/{meter}/consumption",
                    "-m", payload], check=True, timeout=10)


rng = random.Random(17)
now = int(time.time() * 1000)
local_midnight = now - (now + TZ) % DAY
start = local_midnight - 6 * DAY
clock(start + 5 * HOUR)
for i, (m, name, kes, _) in enumerate(METERS):
    api("POST", "/api/meters", {"id": m, "name": name, "phone": f"07120000{i}{i}", "secret": "secret-" + m})
    if kes:
        api("POST", "/daraja/simulate", {"meter_no": m, "amount": kes})
for m, *_ in METERS:
    report(m, 0, 0.0, "off" if m == "KPLC-B03" else "on")
for day in range(7):
    base = start + day * DAY
    used = 0
    for hour, share in SHAPE.items():
        at = base + hour * HOUR
        if at > now:
            break
        clock(at)
        for m, _, _, kwh in METERS:
            wh = int(kwh * 1000 * share * rng.uniform(0.7, 1.3))
            used += wh
            report(m, wh, round(wh / 1.2, 1), "off" if m == "KPLC-B03" else "on")
        if day == 6 and hour >= 13:
            # Someone wires around the cut-off meter's relay.
            report("KPLC-B03", 0, 650.0, "off")
    date = time.strftime("%Y-%m-%d", time.gmtime((base + TZ) / 1000))
    api("POST", "/api/site/readings", {"day": date, "kwh": round(used * (1 + LOSS[day]) / 1000, 2)})
clock(now)
print("demo site ready")
