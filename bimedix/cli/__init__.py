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
from collections.abc import Callable

from .. import __version__

INTERRUPTED = "interrupted; re-run the same command to resume"
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


def run_command(name: str, command: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run ``command`` and turn user-facing failures into one line on stderr and an exit status.

    Shared by every sub-command and by scripts such as ``recipes/sft.py``.

    Args:
        name (`str`): how the messages name the command, e.g. ``"bimedix build-data"``.
        command (`Callable`): does the work; returns the exit status (``None`` means 0).
        verbose (`bool`, *optional*, defaults to `False`): re-raise errors, with their traceback.

    Returns:
        `int`: the command's status; 2 after an error (`ValueError`, `OSError`, `RuntimeError`); 130 after
        Ctrl-C (nothing half-written is left: outputs are written atomically or resumably).
    """
    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print(f"\n{name}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:  # user-facing failures: message, no traceback
        if verbose:
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
