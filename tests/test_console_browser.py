"""The fleet console in a real headless browser (Debian chromium + chromedriver through selenium) against a
live cloud worker with devices on a real mosquitto: the page shows the registry's devices, versions and
rollout state, follows a staged rollout as it advances, and shows a bad release stopping itself and why.

With POCKETFLEET_SCREENSHOT=PATH the final page is also saved there (docs/console.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.cloud import wait_for
from cloud_sync.console.settings import ConsoleSettings
from cloud_sync.staged import parse_rate, parse_stages

pytestmark = pytest.mark.mosquitto

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1500")


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if os.path.exists(p)), None)


def require_browser() -> tuple[str, str]:
    browser, driver = _first(CHROMIUM), _first(CHROMEDRIVER)
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser is None or driver is None:
        msg = "chromium, chromium-driver (apt) and selenium (pip, the dev extra) are needed for the console test"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return browser, driver


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = require_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


_READ_DEVICES = """
const out = {};
for (const tr of document.querySelectorAll('#devices tbody tr')) {
  const row = {};
  for (const td of tr.querySelectorAll('td')) row[td.dataset.col] = td.textContent;
  out[tr.dataset.device] = row;
}
return out;"""
_READ_ROLLOUT = """
const box = document.querySelector('[data-rollout="' + arguments[0] + '"]');
if (!box) return null;
const stages = box.querySelector('[data-field="stages"]');
return {state: box.dataset.state, stage: stages ? Number(stages.dataset.stage) : null, text: box.innerText};"""


def _page_devices(driver: Any) -> dict[str, dict[str, str]]:
    """What the page shows, read in one script (the page re-renders between separate element reads)."""
    return driver.execute_script(_READ_DEVICES)


def _page_rollout(driver: Any, rollout_id: str) -> dict[str, Any] | None:
    return driver.execute_script(_READ_ROLLOUT, rollout_id)


def test_the_console_shows_the_registry_and_follows_a_rollout_that_advances_and_one_that_stops(
        tmp_path: Path, browser: Any) -> None:
    from cloud_sync.fleet_view import device_rows
    from cloud_sync.rollout import RolloutConfig
    from pocketfleet.sim.fleet import Fleet, make_digits_package
    from pocketfleet.sim.traffic import TrafficSettings
    from tests.mosquitto import Mosquitto

    ids = ["edge-0", "edge-1", "edge-2"]
    accounts = {d: ("device", "lab") for d in ids} | {"cloud-1": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", mqtt_for=broker.mqtt_config, device_dirs={d: tmp_path / d for d in ids},
                      traffic=TrafficSettings(rate_hz=10, telemetry_interval_s=0.5, drain_interval_s=0.3),
                      rollout=RolloutConfig(tick_s=0.2, resend_s=10.0, probe_runs=3),
                      console=ConsoleSettings(listen="127.0.0.1:0", refresh_s=0.5))
        try:
            fleet.start(start_devices=False)
            sim = {"service_ms": 10.0}
            v1 = make_digits_package(tmp_path / "v1.pfpkg", 1, fleet.key, hidden=32, extra={"sim": sim})
            v2 = make_digits_package(tmp_path / "v2.pfpkg", 2, fleet.key, hidden=32, head_seed=1, extra={"sim": sim})
            slow = make_digits_package(tmp_path / "v3.pfpkg", 3, fleet.key, hidden=32, head_seed=2,
                                       extra={"sim": {"service_ms": 30.0}})
            for d in ids:
                fleet.store(d).install(v1)
            fleet.start_devices()
            url = fleet.workers[0].console.url
            browser.get(url)
            reg = fleet.registry()
            try:
                # the page lists the registry's devices with their versions and telemetry
                def same_as_registry() -> bool:
                    page = _page_devices(browser)
                    rows = {r["device"]: r for r in device_rows(reg)}
                    return sorted(page) == sorted(rows) == ids and all(
                        page[d]["version"] == str(rows[d]["version"]) and page[d]["online"] == "yes"
                        and page[d]["health"] == rows[d]["health"] == "ok" for d in ids)

                wait_for(same_as_registry, 30, 0.3)
                assert "3/3 devices online" in browser.find_element("id", "summary").text

                # a good staged release: the page follows it from stage 1 to complete
                out = fleet.release(v2, plan=parse_stages("34%", soak_s=2.5), abort=["p95_ratio>2@1"])
                assert out["stages"] == [2, 3]
                seen = wait_for(lambda: (r := _page_rollout(browser, out["rollout_id"])) and r["stage"] == 1 and r, 30,
                                0.2)
                assert seen["state"] == "staged"
                wait_for(lambda: (r := _page_rollout(browser, out["rollout_id"])) and r["state"] == "complete", 60, 0.3)
                assert fleet.rollout(out["rollout_id"])["state"] == "complete"
                wait_for(lambda: {p["version"] for p in _page_devices(browser).values()} == {"2"}, 20, 0.3)

                # a 3x slower release stops itself on its first device; the page says why
                bad = fleet.release(slow, plan=parse_rate("1,2", soak_s=8.0), abort=["p95_ratio>2@1"])
                page = wait_for(lambda: (r := _page_rollout(browser, bad["rollout_id"])) and r["state"] == "aborted"
                                and r, 60, 0.3)
                final = fleet.rollout(bad["rollout_id"])
                assert final["state"] == "aborted" and len(final["devices"]) == 1
                assert "p95_ratio = " in page["text"] and "abort if p95_ratio>2@1" in page["text"]
                wait_for(lambda: {p["version"] for p in _page_devices(browser).values()} == {"2"}, 30, 0.3)
                time.sleep(1.5)  # one more telemetry bucket in the charts
                series = browser.execute_script(
                    "return [...document.querySelectorAll('[data-chart] polyline')].map(p => p.dataset.series)")
                assert set(series) >= {"1", "2", "3"}  # a latency line per version of the model
                shot = tmp_path / "console.png"
                browser.save_screenshot(str(shot))
                assert shot.stat().st_size > 10_000
                if os.environ.get("POCKETFLEET_SCREENSHOT"):
                    shutil.copy(shot, os.environ["POCKETFLEET_SCREENSHOT"])
            finally:
                reg.close()
        finally:
            fleet.stop()
