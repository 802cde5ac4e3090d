"""Debian's Chromium under Selenium, started the way this machine allows (no sandbox as root,
no background networking, an empty profile). Nothing here downloads a browser or a driver."""
import os
import tempfile

os.environ.setdefault("SE_AVOID_STATS", "true")
os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def start(width=1280, height=900):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: apt-get install chromium chromium-driver (scripts/test-all does)")
    profile = tempfile.mkdtemp(prefix="umeme-chromium-")
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "--hide-scrollbars"):
        o.add_argument(flag)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=o)
    d.set_page_load_timeout(20)
    d.set_script_timeout(20)
    return d
