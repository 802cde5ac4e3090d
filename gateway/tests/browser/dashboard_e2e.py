"""End-to-end: the dashboard in headless Chromium against a real gateway started by
gateway/tests/dashboard.rs. Exits 0 when every step held; prints each step."""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import browser

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--token", required=True)
p.add_argument("--broker", required=True)
p.add_argument("--meter", required=True)
p.add_argument("--secret", required=True)
a = p.parse_args()
host, port = a.broker.rsplit(":", 1)
BASE = a.url.rstrip("/")


def step(msg):
    print(f"[e2e] {msg}", flush=True)


def wait(d, cond, what, timeout=10):
    try:
        # Live updates replace elements under the test's feet: a stale one is just read again.
        return WebDriverWait(d, timeout, poll_frequency=0.05,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda _: cond())
    except TimeoutException:
        for region in ("summary", "events", "payments"):
            print(f"#{region}: {text(d, '#' + region)!r}")
        raise SystemExit(f"timed out: {what}")


def text(d, css):
    # A live update swaps the page's regions at any moment (every commit rings the stream, the
    # daemon's timers included): read again from a fresh lookup when the node went stale.
    for _ in range(20):
        els = d.find_elements(By.CSS_SELECTOR, css)
        try:
            return els[0].text if els else ""
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise SystemExit(f"{css}: stale on every read")


def publish(seq, energy):
    payload = json.dumps({"v": 2, "meterNo": a.meter, "seq": seq, "energyWh": energy, "powerW": 150.0, "relay": "on"})
    subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-V", "mqttv311", "-i", a.meter, "-u", a.meter,
                    "-P", a.secret, "-q", "1", "-t", f"smartmeter/{a.meter}/consumption", "-m", payload],
                   check=True, timeout=10)


# The browser runs in another zone than the site (Nairobi): charts must still show the site's
# day and hours.
os.environ["TZ"] = "America/Los_Angeles"
d = browser.start()
try:
    step("refused without sign-in: /dashboard goes to the sign-in page")
    d.get(BASE + "/dashboard/meters/" + a.meter)
    wait(d, lambda: d.current_url.endswith("/dashboard/login"), "redirect to sign-in")
    d.get(BASE + "/dashboard/export/payments.csv")
    assert "sign in to the dashboard first" in d.page_source, d.page_source[:500]

    step("a wrong token is refused")
    d.get(BASE + "/dashboard/login")
    d.find_element(By.ID, "secret").send_keys("not-the-token")
    d.find_element(By.ID, "signin").click()
    wait(d, lambda: "Wrong token or password" in d.page_source, "refusal message")

    step("sign in with the admin token")
    d.find_element(By.ID, "secret").send_keys(a.token)
    d.find_element(By.ID, "signin").click()
    wait(d, lambda: "Site overview" in d.page_source, "overview")
    cookie = d.get_cookie("umeme_session")
    assert cookie and cookie["httpOnly"] and cookie.get("sameSite") == "Strict", cookie

    step("meter page: cash top-up changes the balance")
    d.get(BASE + "/dashboard/meters/" + a.meter)
    before = text(d, "#balance")
    d.find_element(By.ID, "amount").send_keys("250")
    d.find_element(By.ID, "reference").send_keys("CASH-0001")
    d.find_element(By.CSS_SELECTOR, "#topup button").click()
    wait(d, lambda: "KES 250.00 credited" in d.page_source, "top-up confirmation")
    after = text(d, "#balance")
    assert after != before, (before, after)
    step(f"balance {before} -> {after}")

    step("a report arrives live while the page is open")
    wait(d, lambda: "on" in d.find_element(By.ID, "live").get_attribute("class"), "live stream up")
    publish(1, 10_000)
    wait(d, lambda: "consumption" in text(d, "#events"), "first report shown live")
    shown = text(d, "#balance")
    published_at = datetime.datetime.now(datetime.timezone.utc)
    publish(2, 12_500)
    t0 = time.monotonic()
    wait(d, lambda: text(d, "#balance") != shown, "balance after the second report", timeout=5)
    took = time.monotonic() - t0
    step(f"balance {shown} -> {text(d, '#balance')} {took:.2f} s after the publish")
    assert took < 2.0, f"live update took {took:.2f} s"

    step("the meter chart draws bars from /api/meters/{id}/usage after the reports")
    bars = "return Array.from(document.querySelectorAll('#chart svg rect'))" \
           ".filter(function (r) { return Number(r.getAttribute('height')) > 0; }).length"
    wait(d, lambda: d.execute_script(bars) > 0, "bars in today's hourly chart")
    # The bar's label is the site's hour (UTC+3), whatever the browser's zone.
    site_hours = {f"{(published_at + datetime.timedelta(hours=3, seconds=s)).hour}:00: 2.500 kWh"
                  for s in (0, 5)}
    titles = d.execute_script("return Array.from(document.querySelectorAll('#chart svg rect title'))"
                              ".map(function (t) { return t.textContent; })")
    assert site_hours & set(titles), (site_hours, [t for t in titles if not t.endswith(" 0.000 kWh")])
    d.find_element(By.CSS_SELECTOR, "#range button[data-step=day]").click()
    wait(d, lambda: d.execute_script(bars) > 0, "bars in this month's daily chart")
    label = text(d, "#chart .ymax")
    assert label.endswith("kWh"), label
    step(f"chart: {d.execute_script(bars)} bar(s), top {label}")

    step("cut the relay: the connected meter receives command/relay")
    sub = subprocess.Popen(["mosquitto_sub", "-h", host, "-p", port, "-V", "mqttv311", "-i", a.meter, "-u", a.meter,
                            "-P", a.secret, "-q", "1", "-t", f"smartmeter/{a.meter}/command/relay", "-C", "1", "-W", "15"],
                           stdout=subprocess.PIPE, text=True)
    wait(d, lambda: "online" in text(d, "#summary"), "meter shown online")
    d.find_element(By.ID, "reason").send_keys("wiring repair")
    d.find_element(By.ID, "relay-off").click()
    wait(d, lambda: "Relay off sent" in d.page_source, "relay confirmation")
    out, _ = sub.communicate(timeout=15)
    got = json.loads(out.strip())
    assert got == {"relay": "off", "reason": "wiring repair"}, got
    step(f"meter received {got}")

    step("export CSV in the signed-in browser")
    csv_text = d.execute_async_script(
        "var done = arguments[0]; fetch('/dashboard/export/payments.csv').then(r => r.text()).then(done);")
    lines = csv_text.strip().splitlines()
    assert lines[0] == "time,meter,source,reference,amount_kes,credit_wh,balance_after_wh", lines[0]
    assert any(f",{a.meter},cash,CASH-0001,250.00," in l for l in lines), lines
    step(f"payments.csv: {len(lines) - 1} row(s)")

    step("CSRF: a POST without the token is refused with 403")
    status = d.execute_async_script("""
        var done = arguments[0];
        fetch('/dashboard/meters/%s/topup', {method: 'POST',
              headers: {'Content-Type': 'application/x-www-form-urlencoded'},
              body: 'amount=1000&reference=FORGED'}).then(r => done(r.status));""" % a.meter)
    assert status == 403, status

    step("CSRF: the right token from a foreign Origin is refused with 403")
    csrf = d.find_element(By.CSS_SELECTOR, "#topup input[name=csrf]").get_attribute("value")
    req = urllib.request.Request(BASE + f"/dashboard/meters/{a.meter}/topup", method="POST",
                                 data=f"csrf={csrf}&amount=1000&reference=FORGED2".encode(),
                                 headers={"Cookie": f"umeme_session={cookie['value']}",
                                          "Origin": "http://evil.example",
                                          "Content-Type": "application/x-www-form-urlencoded"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise SystemExit("a foreign-origin POST was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code

    step("at 360 px wide nothing overflows sideways")
    d.set_window_size(360, 800)
    for path in ("/dashboard", "/dashboard/meters", "/dashboard/meters/" + a.meter, "/dashboard/payments"):
        d.get(BASE + path)
        inner, scroll = d.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]")
        assert scroll <= inner, f"{path}: {scroll} px wide in a {inner} px window"
    d.set_window_size(1280, 900)

    step("sign out: the session no longer opens pages")
    d.find_element(By.CSS_SELECTOR, "form.out button").click()
    wait(d, lambda: d.current_url.endswith("/dashboard/login"), "signed out")
    d.get(BASE + "/dashboard")
    wait(d, lambda: d.current_url.endswith("/dashboard/login"), "refused after sign-out")
    step("all steps passed")
finally:
    d.quit()
