"""The MLflow UI as a person meets it: the addresses that open a job's runs, a local `mlflow ui`,
and the system Chromium driven headless on them (the README's screenshot, the browser test).

MLflow 3.17's UI opens an experiment on its GenAI overview unless the address says otherwise
(`workflowType=machine_learning`; the experiment's `mlflow.experimentKind` tag is not what it
reads), so the job prints addresses that land on the training runs. The browser is Debian's
`chromium` with its `chromium-driver` (`apt-get install -y chromium chromium-driver`): nothing
is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")
TRAINING_VIEW = {"workflowType": "machine_learning"}


class BrowserMissing(RuntimeError):
    """No Chromium and driver on this machine; the message says how to install them."""


def runs_url(base: str, experiment_id: str, chart: bool = False, runs_filter: str = "") -> str:
    """The experiment's training runs (table, or with `chart` the charts comparing them), those
    that `runs_filter` (MLflow's search syntax) selects."""
    query = {
        **TRAINING_VIEW,
        **({"compareRunsMode": "CHART"} if chart else {}),
        **({"searchFilter": runs_filter} if runs_filter else {}),
    }
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query)}"


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """MLflow's compare page for these runs ('' as base: a link inside the UI)."""
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(run_ids)), "experiments": json.dumps([experiment_id])}
    )
    return f"{base.rstrip('/')}/#/compare-runs?{query}"


# ---------------------------------------------------------------------------------------------
# A local UI and a headless browser


@contextmanager
def local_ui(store_uri: str, port: int, timeout: float = 120) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1:`port` over `store_uri` for the block; yields its address and
    stops only the server it started."""
    # MLflow's own command, not `python -m mlflow`: that would import from the current folder
    # first, where any file named like one of MLflow's modules would break the server.
    command = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(command) if command.is_file() else "mlflow",
            "ui",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # one person looks: MLflow's default 4 each take seconds of CPU to start
            "1",
            "--backend-store-uri",
            store_uri,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with code {server.returncode}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"mlflow ui did not answer at {base} in {timeout:.0f}s"
                    ) from err
                time.sleep(0.5)
        yield base
    finally:
        # The whole session: `mlflow ui` leaves uvicorn's workers and MLflow's job runners
        # behind (about 2 GB) if only the command itself is killed.
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserMissing saying how to install them."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    if not browser or not driver:
        raise BrowserMissing(
            "no system Chromium and chromedriver found; on Debian or Ubuntu: "
            "apt-get update && apt-get install -y chromium chromium-driver"
        )
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1700, height: int = 1000):
    """A Selenium driver on the system Chromium, headless, closed after the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, texts: Sequence[str], timeout: float = 60) -> str:
    """The page's source once every one of `texts` is in it (the UI renders after loading)."""
    deadline = time.monotonic() + timeout
    while True:
        source = driver.page_source
        missing = [t for t in texts if t not in source]
        if not missing:
            return source
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never showed {missing} ({driver.current_url})")
        time.sleep(0.5)


def wait_for_elements(driver, css: str, timeout: float = 60) -> list:
    """The elements matching `css`, once there is at least one."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never showed {css} ({driver.current_url})")
        time.sleep(0.5)


def show_comparison(
    driver,
    base: str,
    experiment_id: str,
    run_names: Sequence[str],
    metrics_filter: str = "accuracy",
    timeout: float = 60,
    runs_filter: str = "",
) -> str:
    """Open the training runs (those `runs_filter` selects) as charts, close the assistant panel,
    expand every job run so its (cycle, arch) runs are drawn, and keep the charts whose name holds
    `metrics_filter`. Returns the page source once `run_names` are shown."""
    from selenium.webdriver.common.by import By

    driver.get(runs_url(base, experiment_id, chart=True, runs_filter=runs_filter))
    wait_for_text(driver, ["Model metrics"], timeout)
    for close in driver.find_elements(
        By.CSS_SELECTOR, '[data-component-id="mlflow.assistant.chat_panel.close"]'
    ):
        close.click()
    # The run-name cell's expander button: a job run's children are hidden until it is opened.
    # Wait for the table's rows first (the charts' frame is drawn before the runs arrive).
    expanders = wait_for_elements(
        driver, 'button[data-component-id*="runnamecellrenderer"]', timeout
    )
    time.sleep(1)  # the row settles before it takes clicks
    for expander in expanders:
        expander.click()
    source = wait_for_text(driver, list(run_names), timeout)
    boxes = driver.find_elements(By.CSS_SELECTOR, 'input[placeholder="Search metric charts"]')
    if boxes and metrics_filter:
        boxes[0].send_keys(metrics_filter)
        time.sleep(2)  # the charts redraw
        source = driver.page_source
    return source


def show_images(
    driver, base: str, experiment_id: str, arch: str, key: str = "cam_grid", timeout: float = 60
) -> list[str]:
    """MLflow's image view of `arch`'s (cycle, arch) runs: the charts of its runs, the `key` card
    without the wall of run parameters MLflow writes above each image, opened full screen so the
    cycles stand side by side. Returns the ids of the runs whose image it shows, once every one
    has loaded."""
    from selenium.webdriver.common.by import By

    show_comparison(driver, base, experiment_id, [], key, timeout, f"tags.arch = '{arch}'")
    card = _card(driver, key, timeout)
    card.find_element(
        By.CSS_SELECTOR, '[data-testid="experiment-view-compare-runs-card-menu"]'
    ).click()
    _shown(driver, '[role="menuitem"]', timeout, "Configure").click()
    switch = _shown(driver, '[role="switch"]', timeout)
    if switch.get_attribute("aria-checked") == "true":  # "Show run parameters"
        switch.click()
    _shown(driver, "button", timeout, "Save changes").click()
    # The card's full-screen view: the runs' images side by side, full width (a card in the grid
    # is a third of it, a run's image a row each).
    _card(driver, key, timeout).find_element(
        By.CSS_SELECTOR, '[data-component-id="fullscreen_button_chartcard"]'
    ).click()
    deadline = time.monotonic() + timeout
    while True:
        shown = _images_by_run(_full_screen(driver, timeout))
        if shown and all(shown.values()):
            return sorted(shown)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the images of {key} never loaded: {shown}")
        time.sleep(0.5)


# Scroll the card's scrolling ancestor so the card's top sits just under the chart search box.
_SCROLL_BELOW_SEARCH = """
const card = arguments[0];
card.scrollIntoView({block: 'start'});
const box = document.querySelector('input[placeholder="Search metric charts"]');
const gap = (box ? box.getBoundingClientRect().bottom + 12 : 0) - card.getBoundingClientRect().top;
let area = card.parentElement;
while (area && area.scrollTop === 0) area = area.parentElement;
if (area && gap > 0) area.scrollTop -= gap;
"""


def scroll_to_metric_charts(driver, metrics_filter: str) -> None:
    """Scroll the chart area to the first card whose title holds `metrics_filter`: MLflow's chart
    search keeps every image card (the CAM grids, ROC/PR) above the metric charts it matched."""
    from selenium.webdriver.common.by import By

    for card in driver.find_elements(
        By.CSS_SELECTOR, '[data-testid="experiment-view-compare-runs-card"]'
    ):
        if metrics_filter in card.find_element(By.TAG_NAME, "h4").text:
            driver.execute_script(_SCROLL_BELOW_SEARCH, card)
            time.sleep(1)  # the charts that come into view draw
            return


def _card(driver, title: str, timeout: float):
    """The chart card titled `title`."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        for card in driver.find_elements(
            By.CSS_SELECTOR, '[data-testid="experiment-view-compare-runs-card"]'
        ):
            if card.find_element(By.TAG_NAME, "h4").text == title:
                return card
        if time.monotonic() > deadline:
            raise TimeoutError(f"no chart card {title!r} ({driver.current_url})")
        time.sleep(0.5)


def _shown(driver, css: str, timeout: float, text: str | None = None):
    """The first element matching `css` (with `text`, if given) that is on screen: a menu or a
    dialog is in the page before its animation shows it, and a click on it then fails."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        for element in driver.find_elements(By.CSS_SELECTOR, css):
            if element.is_displayed() and (text is None or element.text == text):
                return element
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never showed {css} {text or ''} ({driver.current_url})")
        time.sleep(0.2)


def _full_screen(driver, timeout: float):
    """The open full-screen view of a chart card."""
    return wait_for_elements(driver, '[role="dialog"]', timeout)[0]


def _images_by_run(card) -> dict[str, bool]:
    """{the run id an image of the card names: whether it has loaded}."""
    from selenium.webdriver.common.by import By

    shown = {}
    for img in card.find_elements(By.TAG_NAME, "img"):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(img.get_attribute("src")).query)
        loaded = img.get_property("complete") and img.get_property("naturalWidth") > 0
        shown[query.get("run_uuid", [""])[0]] = bool(loaded)
    return shown


def screenshot(driver, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    driver.save_screenshot(str(tmp))
    tmp.replace(path)  # atomic: a reader never sees half a picture
    return path
