"""Look at the report as a person would: render ``report.html`` in headless Chromium.

``check_report(report_html)`` loads the page in a real browser, writes a screenshot (``report.png``
beside the page), and returns what the browser saw: every ``<img>`` with whether it loaded, and the
number of tables. The page itself stays static; the check runs on a copy with a small script that
records each image's load state into the DOM, which Chromium's ``--dump-dom`` then prints.
``python -m analysis`` runs it when Chromium is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => `${i.getAttribute("src")}|${i.complete && i.naturalWidth > 0}`);
  document.body.setAttribute("data-images", images.join(";"));
  document.body.setAttribute("data-tables", document.querySelectorAll("table").length);
});
</script>"""


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(browser: str, *args: str) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def check_report(report_html: Path, width: int = 1366, height: int = 900) -> dict:
    """{"images": {src: loaded}, "tables": n, "screenshot": path} as headless Chromium saw the page."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    report_html = Path(report_html).resolve()
    probe = report_html.with_name(".browser-check.html")  # same folder: the same relative image paths
    probe.write_text(report_html.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = _run(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink(missing_ok=True)
    images = re.search(r'data-images="([^"]*)"', dom)
    tables = re.search(r'data-tables="(\d+)"', dom)
    if images is None or tables is None:
        raise RuntimeError(f"{report_html}: Chromium did not finish loading the page")
    loaded = {}
    for item in filter(None, images.group(1).split(";")):
        src, ok = item.rsplit("|", 1)
        loaded[src] = ok == "true"
    screenshot = report_html.with_name("report.png")
    _run(browser, f"--window-size={width},{height}", f"--screenshot={screenshot}", report_html.as_uri())
    return {"images": loaded, "tables": int(tables.group(1)), "screenshot": screenshot}
