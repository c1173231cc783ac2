"""Headless Chromium driven by selenium: Debian's chromium + chromium-driver (.ci/run installs them), or the
Chrome and chromedriver a CI runner has (CHROME_BIN, CHROMEDRIVER or CHROMEWEBDRIVER)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")  # fmt: skip


def find(env: str, names: tuple[str, ...], folder_env: str = "") -> str:
    candidates = [os.environ.get(env, "")]
    if folder_env and os.environ.get(folder_env):
        candidates += [str(Path(os.environ[folder_env]) / name) for name in names]
    candidates += [shutil.which(name) or "" for name in names]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError(f"no {names[0]} found: apt-get install -y chromium chromium-driver (or set {env})")


def chromium(profile: Path, width: int = 1280, height: int = 800) -> webdriver.Chrome:
    """A fresh headless browser with its own profile folder, logging the console."""
    options = webdriver.ChromeOptions()
    options.binary_location = find("CHROME_BIN", ("chromium", "chromium-browser", "google-chrome"))
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = find("CHROMEDRIVER", ("chromedriver",), folder_env="CHROMEWEBDRIVER")
    return webdriver.Chrome(options=options, service=DriverService(driver_path))


def set_viewport(driver: webdriver.Chrome, width: int, height: int, mobile: bool = False) -> None:
    """The exact CSS viewport (the window's size includes nothing else in headless mode, but be sure)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
