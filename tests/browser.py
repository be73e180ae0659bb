"""Headless Chromium for tests: Debian's ``chromium`` and ``chromium-driver`` packages driven by selenium.

Nothing is ever downloaded: the driver is named by path (selenium-manager is never asked) and
``SE_OFFLINE`` forbids it anyway. Tests skip only where the browser is absent; ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra")


@contextlib.contextmanager
def chromium(tmp_path: Path, width: int = 1280, height: int = 2000) -> Iterator[object]:
    """A headless Chromium with its own profile under ``tmp_path``, logging the page's console."""
    require_chromium()
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
