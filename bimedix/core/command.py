"""Running a command: its user-facing errors become one line on stderr and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable

INTERRUPTED = "interrupted; re-run the same command to resume"


def run_command(name: str, command: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run ``command`` and turn user-facing failures into one line on stderr and an exit status.

    Shared by every ``bimedix`` sub-command and by scripts such as ``recipes/sft.py``.

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
