"""The dashboard in a real browser: headless Chromium against a registry fed by simulated nodes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import BrokerFactory, RegistryFactory, skip_missing
from tests.support.net import wait_until
from tests.support.registry import Registry
from tests.support.simnode import SimNodes

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
HOSTILE_REASON = "exit 1 <script>document.title='owned'</script><b>bold</b>"
T = TypeVar("T")


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium driven by the system chromedriver; nothing is downloaded."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            skip_missing(f"{binary} is not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_missing("selenium is not installed (pip install 'edge-agent[test]')")
    # Selenium Manager must not look for (or fetch) a browser or a driver of its own.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1100",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def retried(action: Callable[[], T], timeout: float = 10.0) -> T:
    """`action()`, again while the page is reloading under it (it reloads every few seconds)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )

    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except (StaleElementReferenceException, NoSuchElementException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def table_rows(driver: Any, selector: str, *attributes: str) -> list[tuple[str, ...]]:
    """The given attributes of the rows matching `selector`, read in one go (no reload between)."""
    script = ("return Array.from(document.querySelectorAll(arguments[0]))"
              ".map(r => arguments[1].map(a => r.getAttribute(a)));")
    return [tuple(row) for row in driver.execute_script(script, selector, list(attributes))]


@pytest.fixture
def fleet(broker_factory: BrokerFactory, registry_factory: RegistryFactory,
          sim_nodes: SimNodes, tmp_path: Path) -> Registry:
    """A registry with four nodes: healthy, offline, online-backlogged and stale."""
    broker = broker_factory(name="cloud")
    broker.start()
    registry = registry_factory(broker, f"sqlite://{tmp_path / 'registry.db'}",
                                extra=["--stale-after", "2", "--backlog-depth", "100"])
    now = time.time()
    gateway = sim_nodes(broker.port, "gw-1")
    gateway_doc: dict[str, Any] = {
        "profile": "rpi4", "labels": {"site": "lab", "role": "gateway"},
        "services": [
            {"name": "mqtt-bridge", "state": "running", "reason": None, "pid": 311,
             "restarts": 0, "last_exit": None, "source": "config"},
            {"name": "camera", "state": "crash-looping", "reason": HOSTILE_REASON, "pid": None,
             "restarts": 6, "last_exit": 1, "source": "desired"},
        ],
        "peers": [{"node": "cam-2", "state": "lost", "addresses": ["10.0.0.12"],
                   "last_seen": now - 400},
                  {"node": "edge-3", "state": "up", "addresses": ["10.0.0.13", "fe80::13"],
                   "last_seen": now - 2}],
    }
    gateway.reported(5, **gateway_doc)
    gateway.online()
    camera = sim_nodes(broker.port, "cam-2")
    camera.reported(7, labels={"site": "yard"})
    camera.online()
    camera.die()
    backlogged = sim_nodes(broker.port, "edge-3")
    backlogged.reported(3, labels={"site": "lab"})
    backlogged.online(depth=4200, oldest_age=1800.0)
    # Heartbeats every 0.5s promised, none sent after this one: stale after 2 of them.
    quiet = sim_nodes(broker.port, "old-4", heartbeat=0.5)
    quiet.reported(9)
    quiet.online()

    status, answer = registry.request("PUT", "/api/v1/nodes/gw-1/desired", {
        "services": {"camera": {"command": ["/usr/bin/camera", "--fps", "5"]}},
        "config": {"telemetry": {"interval": "30s"}},
    })
    assert status == 200, answer
    # What the node says after applying it: one item failed, one applied.
    gateway.reported(6, **gateway_doc, desired_applied=answer["version"], desired={
        "version": answer["version"], "ts": time.time(), "items": {
            "services.camera": {"result": "failed", "reason": "exits at once"},
            "config.telemetry.interval": {"result": "applied", "reason": None},
        }})

    expected = {"gw-1": "healthy", "cam-2": "offline", "edge-3": "online-backlogged",
                "old-4": "stale"}

    def all_there() -> bool:
        nodes = registry.nodes()
        return ({n: v["health"] for n, v in nodes.items()} == expected
                and nodes["gw-1"]["reported_version"] == 6)

    wait_until(all_there, 15, what=f"the registry showing {expected}")
    return registry


def test_fleet_page_shows_each_health_and_leads_to_a_node(fleet: Registry, browser: Any,
                                                          tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(fleet.url + "/")
    assert "edge registry" in browser.title
    rows = table_rows(browser, "#nodes tbody tr[data-node]", "data-node", "data-health")
    assert rows == [("cam-2", "offline"), ("edge-3", "online-backlogged"),
                    ("gw-1", "healthy"), ("old-4", "stale")]
    badges = table_rows(browser, "#nodes tbody tr[data-node] .badge", "class")
    assert [b[0] for b in badges] == ["badge health-offline", "badge health-online-backlogged",
                                      "badge health-healthy", "badge health-stale"]
    colour = browser.find_element(By.CSS_SELECTOR, 'tr[data-node="gw-1"] .badge') \
        .value_of_css_property("background-color")
    assert colour == "rgba(220, 252, 231, 1)"  # the green of .health-healthy
    fleet_png = tmp_path / "dashboard-fleet.png"
    browser.save_screenshot(str(fleet_png))

    # The filter: a link, and the page it leads to keeps it when it reloads.
    retried(lambda: browser.find_element(By.CSS_SELECTOR, 'a[data-filter="stale"]').click())
    WebDriverWait(browser, 10).until(ec.url_contains("health=stale"))
    assert table_rows(browser, "#nodes tbody tr[data-node]", "data-node") == [("old-4",)]
    refresh = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="refresh"]')
    assert refresh.get_attribute("content") == "5; url=/?health=stale"
    retried(lambda: browser.find_element(By.CSS_SELECTOR, 'a[data-filter="all"]').click())
    WebDriverWait(browser, 10).until(
        lambda d: len(table_rows(d, "#nodes tbody tr[data-node]", "data-node")) == 4)

    retried(lambda: browser.find_element(By.CSS_SELECTOR,
                                         'tr[data-node="gw-1"] td.node a').click())
    WebDriverWait(browser, 10).until(ec.url_to_be(fleet.url + "/nodes/gw-1"))
    WebDriverWait(browser, 10).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#services tr[data-service]")))
    assert browser.find_element(By.ID, "node-id").text == "gw-1"
    services = table_rows(browser, "#services tr[data-service]", "data-service", "data-state")
    assert services == [("mqtt-bridge", "running"), ("camera", "crash-looping")]
    # The device's reason is shown as text: no markup of its own, no script run.
    reason = browser.find_element(By.CSS_SELECTOR, 'tr[data-service="camera"] td.reason')
    assert reason.text == HOSTILE_REASON
    assert browser.find_elements(By.CSS_SELECTOR, "#services b") == []
    assert "owned" not in browser.title
    peers = table_rows(browser, "#peers tr[data-peer]", "data-peer", "data-state")
    assert peers == [("cam-2", "lost"), ("edge-3", "up")]
    items = table_rows(browser, "#desired-items tr[data-item]", "data-item", "data-result")
    assert sorted(items) == [("config.telemetry.interval", "applied"),
                             ("services.camera", "failed")]
    assert "applied version" in browser.find_element(By.ID, "desired-applied").text

    node_png = tmp_path / "dashboard-node.png"
    browser.save_screenshot(str(node_png))
    assert node_png.stat().st_size > 10_000
    print(f"screenshots: {fleet_png} {node_png}")
