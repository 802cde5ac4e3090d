"""Screenshots of the dashboard's overview and a meter page at 1280 and 360 px wide, for the
README. Run by scripts/screenshots against a gateway it filled with demo data."""
import argparse
import os

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import browser

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--token", required=True)
p.add_argument("--meter", required=True)
p.add_argument("--out", required=True)
a = p.parse_args()
base = a.url.rstrip("/")
os.makedirs(a.out, exist_ok=True)

d = browser.start(1280, 900)
try:
    d.get(base + "/dashboard/login")
    d.find_element(By.ID, "secret").send_keys(a.token)
    d.find_element(By.ID, "signin").click()
    WebDriverWait(d, 10).until(lambda _: "Site overview" in d.page_source)
    for width in (1280, 360):
        for name, path in (("overview", "/dashboard"), ("meter", "/dashboard/meters/" + a.meter)):
            d.set_window_size(width, 900)
            d.get(base + path)
            WebDriverWait(d, 10).until(lambda _: "on" in d.find_element(By.ID, "live").get_attribute("class"))
            height = d.execute_script("return document.documentElement.scrollHeight")
            # The window's size includes what is not page (headless Chromium keeps a margin).
            extra = d.execute_script("return window.outerHeight - window.innerHeight")
            d.set_window_size(width, min(height, 2400) + extra)
            out = os.path.join(a.out, f"{name}-{width}.png")
            d.save_screenshot(out)
            print(out, os.path.getsize(out), "bytes")
finally:
    d.quit()
