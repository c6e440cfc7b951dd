"""The ``bimedix`` command line.

Each module in this package registers its own sub-commands through ``register(subparsers)``;
handlers import heavy dependencies (torch, trl, openai, lm_eval) only when they run, so
``bimedix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from .. import __version__
from ..core.command import INTERRUPTED, run_command

INCOMPLETE = 3  # exit status of a run that stopped early (budget, transient errors): re-running continues it


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="bimedix", description="Bilingual English/Arabic medical chat models on Mixture-of-Experts LLMs."
    )
    parser.add_argument("--version", action="version", version=f"bimedix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):  # _options: the shared flags, no command
            importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bimedix`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # while the sub-command modules load
        print(f"\nbimedix: {INTERRUPTED}", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(f"bimedix {args.command}", lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
