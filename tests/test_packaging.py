"""The built wheel carries everything the package reads at run time (not just an editable checkout)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Top-level folders installed inside the package, and where they land in the wheel.
SHIPPED = {"bimedix": "bimedix", "recipes": "bimedix/recipes", "hub_cards": "bimedix/hub_cards"}


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", *SHIPPED], cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if "__pycache__" not in line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    out_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out_dir), str(REPO)], check=True, capture_output=True)
    (path,) = out_dir.glob("bimedix-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_contains_every_tracked_package_file(wheel):
    wheel_names = set(wheel.namelist())
    expected = set()
    for path in _tracked_files():
        top, _, rest = path.partition("/")
        expected.add(f"{SHIPPED[top]}/{rest}")
    missing = sorted(expected - wheel_names)
    assert not missing, \
        f"files tracked in git but missing from the wheel (fix setup.cfg package_data): {missing}"


def test_wheel_ships_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "bimedix = bimedix.cli:main" in wheel.read(entry_points).decode()
