"""``bimedix --help`` start-up time (issue 22): prints measured figures, asserts nothing.

Runs ``python -m bimedix --help`` ``--runs`` times in fresh processes (after two warm-up runs each, so the
file cache is warm) and prints each time and the median; with ``--against DIR`` (another checkout, e.g. the
main branch) the two alternate run by run, so load on the machine hits both alike.

Usage::

    python benchmarks/cli_startup.py --runs 5 --against /work/main
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def help_seconds(checkout: Path) -> float:
    """Wall time of one ``python -m bimedix --help`` importing bimedix from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bimedix", "--help"], env=env, stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per checkout (default: 5)")
    parser.add_argument("--against", type=Path, help="another checkout to time alongside this one")
    args = parser.parse_args()
    checkouts = {"this checkout": HERE}
    if args.against:
        checkouts[str(args.against)] = args.against.resolve()
    for _ in range(2):
        for checkout in checkouts.values():
            help_seconds(checkout)
    times = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, checkout in checkouts.items():
            times[name].append(help_seconds(checkout))
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.3f} s over {args.runs} runs "
              f"({', '.join(f'{s:.3f}' for s in seconds)})")
    if args.against:
        this, other = (statistics.median(seconds) for seconds in times.values())
        print(f"this checkout vs {args.against}: {100 * (this / other - 1):+.1f}%")


if __name__ == "__main__":
    main()
