"""Reading and writing record files: JSON, JSON Lines and CSV/TSV in, atomic JSON Lines / JSON out.

Reading tolerates what real files carry (a UTF-8 BOM, CRLF line endings, blank lines) and turns
everything else (bad JSON, bytes that are not UTF-8, a malformed CSV row) into a `RecordError` naming
``file:line``. The record-by-record readers (`iter_jsonl`, `read_delimited`) take one on-error policy, an
`OnError`: ``None`` raises the error, a callable (e.g. `bimedix.data.rejects.RejectLog`) receives it and
reading goes on; `report` applies it. The readers of schema records (`bimedix.data.schema.read_records`)
validate on top of these.
Writing goes to a temporary file in the same folder and is renamed into place, so a crash never
leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .outputs import remove_stale_temporaries_of

BLANK = object()  # what `decode_jsonl_line` returns for a blank line


class RecordError(ValueError):
    """A bad record (unreadable, or breaking the schema); its message names the file, the record and the
    field.

    Args:
        message (`str`): what is wrong and, where possible, how to fix it.
        path (`str`, *optional*): the file the record came from.
        record (`str | int`, *optional*): the record's line number (int) or id (str).
        field (`str`, *optional*): the dotted field name, e.g. ``conversations[2].from``.
        raw (`Any`, *optional*): the offending record as read (written to rejects files).
    """

    def __init__(self, message: str, *, path: str | None = None, record: str | int | None = None,
                 field: str | None = None, raw: Any = None):
        self.reason = message
        self.path = path
        self.record = record
        self.field = field
        self.raw = raw  # the offending record as read, kept for rejects files
        super().__init__(self._format())

    def __reduce__(self):
        # rebuilt from its parts (not from the formatted message) when it crosses a process boundary
        return functools.partial(type(self), self.reason, path=self.path, record=self.record,
                                 field=self.field,
                                 raw=self.raw), ()

    def _format(self) -> str:
        where = str(self.path) if self.path else "<input>"
        if isinstance(self.record, int):
            where += f":{self.record}"
        elif self.record is not None:
            where += f": record {self.record!r}"
        if self.field:
            where += f": field `{self.field}`"
        return f"{where}: {self.reason}"

    def located(self, *, path: str | None = None, record: str | int | None = None) -> RecordError:
        """Return a copy with the file and record filled in where they were unknown."""
        return RecordError(self.reason, path=self.path or path,
                           record=self.record if self.record is not None else record, field=self.field,
                           raw=self.raw)


#: What to do with a bad record: ``None`` raises it, a callable receives it and reading goes on.
OnError = Callable[[RecordError], None] | None

#: The largest CSV/TSV cell the readers accept, in characters: Python's default (131,072) is below what a long
# medical answer or a reviewer's edit can hold.
CSV_FIELD_LIMIT = 64 * 2**20


def report(error: RecordError, on_error: OnError) -> None:
    """Apply the on-error policy to one bad record: raise ``error`` or pass it to ``on_error``."""
    if on_error is None:
        raise error
    on_error(error)


def iter_jsonl(path: str | os.PathLike, *, on_error: OnError = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, decoded_object)`` for every non-blank line of a JSON Lines file.

    Args:
        path (`str | os.PathLike`): the file to read.
        on_error (`OnError`, *optional*): receives each bad line (not UTF-8, not JSON)
            and reading goes on; by default the first bad line raises.

    Raises:
        `RecordError`: for a line that is not valid JSON or not UTF-8, naming ``path:line``.
    """
    for line_no, raw in raw_lines(path):
        obj, error = decode_jsonl_line(path, line_no, raw)
        if error is not None:
            report(error, on_error)
        elif obj is not BLANK:
            yield line_no, obj


def decode_jsonl_line(path: str | os.PathLike, line_no: int, raw: bytes) -> tuple[Any, RecordError | None]:
    """Decode one JSON Lines line: ``(object, None)``, ``(BLANK, None)`` for a blank line, or ``(None,
    error)``."""
    try:
        text = raw.decode("utf-8").strip()
        return (json.loads(text) if text else BLANK), None
    except UnicodeDecodeError as err:
        return None, RecordError(not_utf8_message(err), path=str(path), record=line_no,
                                 raw=raw.decode("utf-8", "replace"))
    except json.JSONDecodeError as err:
        return None, RecordError(f"invalid JSON ({err.msg} at column {err.colno})", path=str(path),
                                 record=line_no, raw=text)


def raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, bytes)`` for every line of a file, numbered from 1, without a leading UTF-8
    BOM."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield line_no, raw


def not_utf8_message(err: UnicodeDecodeError) -> str:
    """The message for bytes that are not UTF-8 (e.g. a cp1256 export), with the fix."""
    return f"not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8"


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

    reader = csv_reader(lines(), delimiter=delimiter)
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


def csv_reader(lines: Iterable[str], *, dict_rows: bool = False, **kwargs):
    """`csv.reader` (or `csv.DictReader`) over ``lines`` that accepts cells up to `CSV_FIELD_LIMIT`
    characters."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide; only ever raised
    return csv.DictReader(lines, **kwargs) if dict_rows else csv.reader(lines, **kwargs)


def iter_parquet_records(path: str | os.PathLike, columns: Iterable[str],
                         optional: Iterable[str] = ()) -> Iterator[dict]:
    """Yield the rows of a Parquet file of schema records, reading only ``columns`` (and ``optional`` ones,
    ``None`` where absent).

    Raises:
        `ValueError`: naming the file and field when a column is missing, or ``conversations`` is not a list
            of ``{from, value}`` turns (e.g. a JSON string).
    """
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    for name in columns:
        if name not in schema.names:
            raise ValueError(f"{path}: field `{name}` is missing (columns: {schema.names}); expected schema "
                             "records as `bimedix build-data` writes them")
    if "conversations" in columns:
        kind = schema.field("conversations").type
        turn = getattr(kind, "value_type", None)
        if turn is None or not hasattr(turn, "get_field_index") or \
                min(turn.get_field_index("from"), turn.get_field_index("value")) < 0:
            raise ValueError(f"{path}: field `conversations` is `{kind}`, not a list of {{from, value}} "
                             "turns; expected schema records as `bimedix build-data` writes them")
    present = [*columns, *(name for name in optional if name in schema.names)]
    absent = dict.fromkeys(name for name in optional if name not in schema.names)
    for batch in parquet.iter_batches(columns=present):
        for row in batch.to_pylist():
            yield {**row, **absent}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing and rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was. The temporary is named
    ``.NAME.PID.XXXXXXXX.tmp``, so after a ``kill -9`` the next write of ``path`` can tell it is stale and
    removes it (`bimedix.core.outputs.remove_stale_temporaries_of`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries_of(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        give_default_mode(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def give_default_mode(path: str | os.PathLike) -> None:
    """Set ``path`` to the mode ``open()`` would give a new file (0666 less the umask, usually 0644)."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> int:
    """Atomically write ``records`` as JSON Lines (UTF-8, Arabic kept readable); return the count."""
    count = 0
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented UTF-8 JSON."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
