"""The RefinementPanel in a real browser: Voilà serves tests/browser_panel.ipynb on 127.0.0.1,
Playwright drives Debian's Chromium (/usr/bin/chromium, never a downloaded browser).

The page runs the notebook (a 3-frame quartz refinement) and shows the panel; the test clicks
Step and checks, in the browser, that the loss curve's Bokeh data source gained a point and that
the parameter table's shifts changed; then Run (3 steps) for a picture with curves. The
screenshot goes to the test's tmp_path, and to docs/panel.png when EDKIT_SCREENSHOT is set (the
README shows it). Run with ``make test-browser`` (installs the ``browser`` extra and Chromium).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edkit.plot import FIGURES

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tests" / "browser_panel.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
#: Seconds for Voilà to execute the notebook (imports, grid search) and for one step to compile.
PAGE_TIMEOUT = 240
STEP_TIMEOUT = 240

# Longest column of every Bokeh ColumnDataSource in the page, by column name (null before
# BokehJS has loaded). BokehJS 3 keeps ``data`` as a Map; older versions as a plain object.
COLUMN_LENGTHS = """() => {
  if (!window.Bokeh || !window.Bokeh.documents) return null;
  const lengths = {};
  for (const doc of window.Bokeh.documents) {
    for (const model of doc.all_models) {
      if (model.type !== "ColumnDataSource") continue;
      const data = model.data;
      const keys = data instanceof Map ? [...data.keys()] : Object.keys(data);
      for (const key of keys) {
        const column = data instanceof Map ? data.get(key) : data[key];
        lengths[key] = Math.max(lengths[key] || 0, column.length);
      }
    }
  }
  return lengths;
}"""


def _loss_points_at_least(n: int) -> str:
    """A JS predicate: the loss curve's source has at least ``n`` points."""
    return f"() => {{ const l = ({COLUMN_LENGTHS})(); return !!l && (l.loss || 0) >= {n}; }}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Voilà exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "voila/static/", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # the server answers (a 404 for the folder itself is fine)
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"Voilà did not start within {timeout} s:\n{log.read_text()[-3000:]}")


def _click_until_taken(page, selector: str, sign: str, tries: int = 3) -> None:
    """Click ``selector`` until the panel's status shows ``sign`` (or "running step").

    A click that lands while the widget's comm is still being opened is dropped by the page;
    the status line tells whether the kernel received it.
    """
    status = ".edkit-status"
    predicate = (
        f"() => {{ const t = document.querySelector('{status}').innerText; "
        f"return t.includes({sign!r}) || t.includes('running step'); }}"
    )
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(tries):
        try:
            page.click(selector, timeout=30_000)
            page.wait_for_function(predicate, timeout=30_000)
            return
        except PlaywrightTimeout:
            continue
    pytest.fail(f"{selector}: no reaction after {tries} clicks; status: {page.inner_text(status)}")


@pytest.fixture
def voila_url(tmp_path):
    """Serve the panel notebook with Voilà on a free local port; shut it down afterwards."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; make test-browser does)")
    for module in ("voila", "playwright.sync_api"):
        pytest.importorskip(module, reason="the browser extra is missing (make test-browser)")
    port = _free_port()
    log = tmp_path / "voila.log"
    command = [
        sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}",
        "--Voila.ip=127.0.0.1", "--show_tracebacks=True",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT, env=env
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_for_server(url, process, log, timeout=60)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


def test_panel_steps_in_the_browser(voila_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        remote: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "request",
            lambda request: (
                remote.append(request.url)
                if not request.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                else None
            ),
        )
        try:
            _drive(page, voila_url, tmp_path)
            assert not errors, errors
            # BokehJS, Panel and their CSS are inlined (works offline); Voilà's own template
            # may still ask a CDN for its icon font, which does not matter.
            plotting = [url for url in remote if re.search(r"bokeh|holoviz|panel|pyviz", url)]
            assert not plotting, plotting
        except Exception:
            # Evidence of a failure: the page as it was, and Voilà's log (pytest shows stdout).
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'failure.png'}")
            if page.query_selector(".edkit-status"):
                print(f"status line: {page.inner_text('.edkit-status')}")
            print((tmp_path / "voila.log").read_text()[-5000:])
            raise
        finally:
            browser.close()


def _status_shows(text: str) -> str:
    return f"() => document.querySelector('.edkit-status').innerText.includes({text!r})"


def _run_ended() -> str:
    """A JS predicate: the status line no longer says a run is in progress."""
    return (
        "() => { const t = document.querySelector('.edkit-status').innerText; "
        "return !t.includes('running step') && !t.includes('stopping after'); }"
    )


def _drive(page, voila_url: str, tmp_path: Path) -> None:
    """Load the page, Step, check the curve and the table, Run, take the screenshot."""
    page.goto(voila_url, timeout=PAGE_TIMEOUT * 1000)
    page.wait_for_selector("button.edkit-step", timeout=PAGE_TIMEOUT * 1000)
    page.wait_for_function(_loss_points_at_least(0), timeout=60_000)  # BokehJS has drawn
    assert page.evaluate(COLUMN_LENGTHS)["loss"] == 0
    table_before = page.inner_text(".edkit-param-table")
    assert "O1" in table_before and "+0.000000" in table_before

    _click_until_taken(page, "button.edkit-step", "1 step(s) taken")
    page.wait_for_function(_loss_points_at_least(1), timeout=STEP_TIMEOUT * 1000)
    page.wait_for_function(_status_shows("done: 1 step(s)"), timeout=60_000)
    lengths = page.evaluate(COLUMN_LENGTHS)
    assert lengths["loss"] == 1 and lengths["wr_obs"] == 1
    table_after = page.inner_text(".edkit-param-table")
    assert table_after != table_before  # the shifts column moved off +0.000000
    assert "1 step(s) taken" in page.inner_text(".edkit-status")

    # Run (3 steps): the curves grow point by point, and the screenshot shows them.
    _click_until_taken(page, "button.edkit-run", "done: 3 step(s)")
    page.wait_for_function(_loss_points_at_least(4), timeout=STEP_TIMEOUT * 1000)
    # Wait for the run to end however it ends, then say what the status line shows (a CI run
    # once timed out here with nothing to tell why).
    page.wait_for_function(_run_ended(), timeout=STEP_TIMEOUT * 1000)
    status = page.inner_text(".edkit-status")
    assert "done: 3 step(s)" in status and "4 step(s) taken" in status, status
    assert not page.query_selector(".edkit-error"), page.inner_text(".edkit-status")
    page.wait_for_timeout(500)  # let Bokeh finish drawing the last point
    screenshot = tmp_path / "panel.png"
    page.locator(".edkit-dashboard").screenshot(path=str(screenshot))  # tabs and the panel
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("EDKIT_SCREENSHOT"):
        target = ROOT / "docs" / "panel.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, target)


def test_html_report_opens_offline_in_chromium(data_dir, tmp_path):
    """``report.html`` of a tiny ``edkit refine``: Chromium loads it from file:// with no
    request beyond the file and its data: images, every image decodes, and the tables show."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; make test-browser does)")
    pytest.importorskip("playwright.sync_api", reason="the browser extra is missing")
    from playwright.sync_api import sync_playwright

    from edkit.cli import main

    out = tmp_path / "out"
    argv = [
        "refine", "--structure", str(data_dir / "structures" / "quartz_kinematical.cif"),
        "--data", str(data_dir / "pets" / "quartz_experimental.cif_pets"), "--out", str(out),
        "--steps", "3", "--every", "11", "--n-sub", "9", "--g-max", "1.2", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    page_url = (out / "report.html").as_uri()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_url)
            page.wait_for_load_state("networkidle")
            others = [u for u in requests if u != page_url and not u.startswith("data:")]
            assert not others, others
            decoded = page.evaluate(
                "() => [...document.images].map(i => i.complete && i.naturalWidth > 0)"
            )
            assert len(decoded) == len(FIGURES) and all(decoded)
            text = page.inner_text("body")
            assert "Figures of merit" in text and "Refined parameters" in text and "Si1" in text
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            if os.environ.get("EDKIT_SCREENSHOT"):
                shutil.copy(tmp_path / "report.png", ROOT / "docs" / "report.png")
        finally:
            browser.close()
