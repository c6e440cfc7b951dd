"""What happens to a bad source record: stop (the default) or set it aside in a rejects file and go on.

Every reader and converter in bimedix takes one ``on_error`` argument, a `bimedix.core.io.OnError`:

- ``None`` — raise the `RecordError` (its message names ``file:record: field``);
- a callable — hand it the `RecordError` and continue with the next record. `RejectLog` is that
  callable for ``--on-error skip``: it writes each rejected record, with its reason, file, record
  and field, to a JSON Lines file and counts them, so that callers can print
  ``read = written + rejected + ...``.

The tolerant file readers (`bimedix.core.io.iter_jsonl`, `bimedix.core.io.read_delimited`) apply the policy
record by record, so one bad line (invalid JSON, bytes that are not UTF-8) does not end the file.

Examples:

```python
>>> from bimedix.data.mcqa import read_medmcqa
>>> with RejectLog("rejects.jsonl") as rejects:  # doctest: +SKIP
...     items = list(read_medmcqa("dev.json", on_error=rejects))
>>> rejects.count  # doctest: +SKIP
0

```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..core.conventions import ON_ERROR_POLICIES
from ..core.io import OnError, atomic_open, report
from .schema import RecordError

logger = logging.getLogger(__name__)


def failer(path: str | os.PathLike, record: str | int | None,
           raw: Any = None) -> Callable[[str | None, str], RecordError]:
    """Return ``fail(field, message)``: it builds a `RecordError` located at ``path:record`` carrying
    ``raw``."""

    def fail(field: str | None, message: str) -> RecordError:
        return RecordError(message, path=str(path), record=record, field=field, raw=raw)

    return fail


def object_failer(path: str | os.PathLike, record: str | int | None,
                  obj: Any) -> Callable[[str | None, str], RecordError]:
    """`failer` for a record that must be a JSON object: anything else is a bad record at once."""
    fail = failer(path, record, obj)
    if not isinstance(obj, dict):
        raise fail(None, f"expected a JSON object, got {type(obj).__name__}")
    return fail


def row_cells(path: str | os.PathLike, header: list[str], line: int, row: list[str], *,
              kind: str = "") -> tuple[dict[str, str], Callable[[str | None, str], RecordError]]:
    """The cells of one delimited row by column name and its ``fail`` (see `failer`); a row whose width is not
    the header's is a bad record (``kind`` names the columns, e.g. ``"tab-separated "``)."""
    cell = dict(zip(header, row))
    fail = failer(path, line, cell)
    if len(row) != len(header):
        raise fail(None, f"expected {len(header)} {kind}columns, got {len(row)}")
    return cell, fail


def map_records(func: Callable[[Any], Any], items: Iterable[Any], *,
                on_error: OnError = None) -> Iterator[Any]:
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


def flat_map_records(parse: Callable[[Any], Iterable[Any]], items: Iterable[Any], *,
                     on_error: OnError = None) -> Iterator[Any]:
    """Yield everything ``parse(item)`` yields, for every item; a `RecordError` goes through the policy.

    The per-row loop of the readers: ``parse`` builds its errors with `failer` (so they carry the record as
    read) and yields nothing, one or several results for its item; after a bad item the next one follows.

    Args:
        parse (`Callable`): the per-record step, a generator.
        items (`Iterable`): the records.
        on_error (`OnError`, *optional*, defaults to `None`): ``None`` raises, a callable receives the error.
    """
    for item in items:
        try:
            yield from parse(item)
        except RecordError as err:
            report(err, on_error)


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
    if policy not in ON_ERROR_POLICIES:
        raise ValueError(f"unknown on-error policy {policy!r}; choose one of {list(ON_ERROR_POLICIES)}")
    if policy == "raise":
        return None
    if rejects is None:
        raise ValueError("the 'skip' policy needs a RejectLog to record what it skips")
    return rejects
