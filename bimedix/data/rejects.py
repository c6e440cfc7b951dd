"""What happens to a bad source record: stop (the default) or set it aside in a rejects file and go on.

Every reader and converter in bimedix takes one ``on_error`` argument, an `OnError`:

- ``None`` — raise the `RecordError` (its message names ``file:record: field``);
- a callable — hand it the `RecordError` and continue with the next record. `RejectLog` is that
  callable for ``--on-error skip``: it writes each rejected record, with its reason, file, record
  and field, to a JSON Lines file and counts them, so that callers can print
  ``read = written + rejected + ...``.

The tolerant file readers (`bimedix.data.io.iter_jsonl`, `read_delimited` below) apply the policy record by record,
so one bad line (invalid JSON, bytes that are not UTF-8) does not end the file.

Examples:

```python
>>> from bimedix.data.mcqa import read_medmcqa
>>> with RejectLog("rejects.jsonl") as rejects:
...     items = list(read_medmcqa("dev.json", on_error=rejects))
>>> rejects.count
0
```
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .io import atomic_open, not_utf8_message, raw_lines
from .schema import RecordError

logger = logging.getLogger(__name__)

OnError = Callable[[RecordError], None] | None
POLICIES = ("raise", "skip")


def report(error: RecordError, on_error: OnError) -> None:
    """Apply the on-error policy to one bad record: raise ``error`` or pass it to ``on_error``."""
    if on_error is None:
        raise error
    on_error(error)


def failer(path: str | os.PathLike, record: str | int | None,
           raw: Any = None) -> Callable[[str | None, str], RecordError]:
    """Return ``fail(field, message)``: it builds a `RecordError` located at ``path:record`` carrying ``raw``."""

    def fail(field: str | None, message: str) -> RecordError:
        return RecordError(message, path=str(path), record=record, field=field, raw=raw)

    return fail


def map_records(func: Callable[[Any], Any], items: Iterable[Any], *, on_error: OnError = None) -> Iterator[Any]:
    """Yield ``func(item)`` for every item, routing each `RecordError` through the policy.

    Args:
        func (`Callable`): the per-record step, e.g. `bimedix.data.schema.validate_record`.
        items (`Iterable`): the records.
        on_error (`OnError`, *optional*, defaults to `None`): ``None`` raises, a callable receives the error.
    """
    for item in items:
        try:
            yield func(item)
        except RecordError as err:
            report(err if err.raw is not None else RecordError(err.reason, path=err.path, record=err.record,
                                                                field=err.field, raw=item), on_error)


class RejectLog:
    """A context manager that collects rejected records into a JSON Lines file, written atomically.

    Each line holds ``path``, ``record`` (line number or id), ``field``, ``reason``, ``error`` (the full
    message) and ``raw`` (the record as read, when known). Call the log with a `RecordError`, or pass it
    as ``on_error`` to any reader.

    Args:
        path (`str | os.PathLike`, *optional*): where to write; ``None`` keeps only the counts.

    Attributes:
        count (`int`): records rejected so far.
        reasons (`collections.Counter`): rejected records per reason, for summaries.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = path
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self._context = None
        self._handle = None

    def __enter__(self) -> RejectLog:
        if self.path is not None:
            self._context = atomic_open(self.path)
            self._handle = self._context.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._context is not None:
            self._context.__exit__(*exc_info)
            self._context = self._handle = None

    def __call__(self, error: RecordError) -> None:
        self.count += 1
        self.reasons[error.reason] += 1
        logger.info("rejected %s", error)
        if self._handle is not None:
            raw = dataclasses.asdict(error.raw) if dataclasses.is_dataclass(error.raw) else error.raw
            entry = {"path": error.path, "record": error.record, "field": error.field, "reason": error.reason,
                     "error": str(error), "raw": raw}
            self._handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")


def on_error_for(policy: str, rejects: RejectLog | None = None) -> OnError:
    """Turn a ``--on-error`` policy name into an `OnError`.

    Args:
        policy (`str`): ``"raise"`` or ``"skip"``.
        rejects (`RejectLog`, *optional*): where skipped records go; required for ``"skip"``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown on-error policy {policy!r}; choose one of {list(POLICIES)}")
    if policy == "raise":
        return None
    if rejects is None:
        raise ValueError("the 'skip' policy needs a RejectLog to record what it skips")
    return rejects


def read_json(path: str | os.PathLike) -> Any:
    """Load a whole JSON file (BOM tolerated); a file that does not parse raises `RecordError`."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except UnicodeDecodeError as err:
        raise RecordError(not_utf8_message(err), path=str(path)) from None
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})",
                          path=str(path)) from None


def read_delimited(path: str | os.PathLike, *, delimiter: str = ",",
                   on_error: OnError = None) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(first_line_number, row)`` for each row of a CSV/TSV file, header included.

    Quoted cells may span lines (their line breaks come back as ``\\n``); CRLF or LF endings, a missing final
    newline and a UTF-8 BOM are all accepted. A row that touches bytes that are not UTF-8 (e.g. cp1256) is
    a bad record: it goes through ``on_error`` and reading continues.
    """
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for line_no, raw in raw_lines(path):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad_lines[line_no] = not_utf8_message(err)
                yield raw.decode("utf-8", "replace")

    reader = csv.reader(lines(), delimiter=delimiter)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            report(RecordError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({err})", path=str(path),
                               record=start), on_error)
            start = reader.line_num + 1
            continue
        end = reader.line_num
        bad = [bad_lines[n] for n in range(start, end + 1) if n in bad_lines]
        if bad:
            report(RecordError(bad[0], path=str(path), record=start, raw=row), on_error)
        elif row:
            yield start, [cell.replace("\r\n", "\n").replace("\r", "\n") for cell in row]
        start = end + 1
