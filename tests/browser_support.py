"""Shared pieces of the browser tests: headless Chromium through Playwright, free ports, waiting for a
server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def get_json(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> dict:
    """GET ``url`` as JSON, retrying until the server answers (its port is open) or ``timeout`` passes.

    With ``process`` (the server, its stdout a pipe), fail at once with its output if it exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if process is not None and process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode} before answering {url}:\n"
                            f"{process.stdout.read() if process.stdout else ''}")
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
