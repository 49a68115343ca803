"""Headless Chromium for the page tests (Debian's chromium + chromium-driver, through selenium); the tests
that use it skip where either is missing."""
from __future__ import annotations

import shutil
import time

import pytest

# the video's current picture through a canvas (same origin) as a data URL, or null before its first frame
CAPTURE = """const v = document.getElementById('view');
if (!v.videoWidth) return null;
const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
c.getContext('2d').drawImage(v, 0, 0); return c.toDataURL('image/png');"""


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_paths() -> tuple[str, str]:
    chromium = _find("chromium", "/usr/bin/chromium", "chromium-browser", "/usr/bin/chromium-browser")
    driver = _find("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


def chromium_driver(request, tmp_path):
    """Headless Chromium through selenium (skips where neither is installed), with a fake microphone and
    host ICE candidates not hidden behind mDNS names (aiortc, on the server's end, does not resolve them);
    quit at the test's end."""
    chromium, chromedriver = browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
                 "--disable-features=WebRtcHideLocalIpsWithMdns"):
        options.add_argument(flag)
    # the page is ready when its document is (its scripts run): its first frame waits for the model's first
    # chunk, which a busy 2-core CI machine can take longer than the page-load timeout to make; the tests
    # wait for frames themselves
    options.page_load_strategy = "eager"
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    request.addfinalizer(driver.quit)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def browser(request, tmp_path):
    """The headless Chromium of chromium_driver (import this fixture into a test module to use it)."""
    return chromium_driver(request, tmp_path)
