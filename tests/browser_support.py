"""Shared pieces of the browser tests: headless Chromium through Playwright, free ports, waiting for a
server."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from process_support import free_port  # noqa: F401 - the browser tests' ports

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str | None:
    """Debian's ``chromium`` (or ``$BIMEDIX_CHROMIUM``)."""
    return os.environ.get("BIMEDIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module", name="browser")
def browser_fixture():
    """A headless Chromium; skipped (failed under CI, which must install it) when it or Playwright is missing.

    Module-scoped: Playwright's sync API holds an event loop in this thread while it runs, which would break
    the `asyncio.run` of later test modules.
    """
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        reason = ("no headless browser: install Chromium (apt-get install chromium) and Playwright "
                  "(pip install playwright)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs both")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def get_json(url: str, timeout: float = 60.0) -> dict:
    """GET ``url`` as JSON, retrying until the server answers or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """Save a full-page screenshot in the test's output folder (and in ``$BIMEDIX_SCREENSHOTS`` when set)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("BIMEDIX_SCREENSHOTS"):
        target = Path(os.environ["BIMEDIX_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path
