"""The on-error policy: raise or skip, the rejects file, and the tolerant JSON Lines / CSV readers."""

from __future__ import annotations

import json

import pytest

from bimedix.core.io import iter_jsonl, read_delimited, read_json
from bimedix.data.rejects import RejectLog, failer, flat_map_records, map_records, on_error_for
from bimedix.data.schema import RecordError, validate_record


@pytest.mark.parametrize("data, rows, bad", [
    (b'{"a": 1}\n{"a": 2}\n', [(1, {"a": 1}), (2, {"a": 2})], []),
    (b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": 2}', [(1, {"a": 1}), (3, {"a": 2})],
     []),  # BOM, CRLF, blank line, no final \n
    (b'{"a": 1}\n{"a": \n{"a": 3}\n', [(1, {"a": 1}), (3, {"a": 3})], [(2, "invalid JSON")]),
    ('{"a": 1}\n{"a": "ب"}\n'.encode("cp1256") + b'{"a": 3}\n', [(1, {"a": 1}), (3, {"a": 3})],
     [(2, "not valid UTF-8")]),
])
def test_read_jsonl(tmp_path, data, rows, bad):
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    errors: list[RecordError] = []
    assert list(iter_jsonl(path, on_error=errors.append)) == rows
    assert [(e.record, e.reason.split(" (")[0]) for e in errors] == bad
    if bad:
        with pytest.raises(RecordError, match=rf"x\.jsonl:{bad[0][0]}: {bad[0][1]}"):
            list(iter_jsonl(path))


@pytest.mark.parametrize("data, rows, bad", [
    (b'a,b\r\n"x\r\ny",z', [(1, ["a", "b"]), (2, ["x\ny", "z"])], []),
    (b'\xef\xbb\xbfa,b\n\n"multi\nline",2\nc,d\n', [(1, ["a", "b"]), (3, ["multi\nline", "2"]),
                                                    (5, ["c", "d"])], []),
    ("a,b\n\"س\nline\",2\nc,d\n".encode("cp1256"), [(1, ["a", "b"]), (4, ["c", "d"])], [2]),
])
def test_read_delimited(tmp_path, data, rows, bad):
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    errors: list[RecordError] = []
    assert list(read_delimited(path, on_error=errors.append)) == rows
    assert [e.record for e in errors] == bad
    assert all("not valid UTF-8" in e.reason and e.raw for e in errors)


def test_read_json_errors(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xef\xbb\xbf[1, 2]")
    assert read_json(path) == [1, 2]
    path.write_text("[1, 2")
    with pytest.raises(RecordError, match=r"x\.json: invalid JSON"):
        read_json(path)


def test_reject_log_writes_reason_location_and_raw(tmp_path):
    out = tmp_path / "rejects.jsonl"
    with RejectLog(out) as log:
        log(RecordError("answer 'Z' is not an option", path="a.csv", record=7, field="answer",
                        raw=["q", "Z"]))
        log(RecordError("invalid JSON", path="b.jsonl", record=3, raw="{oops"))
        assert not out.exists()  # written atomically on exit
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert log.count == 2 and log.reasons["invalid JSON"] == 1
    assert entries[0] == {"path": "a.csv", "record": 7, "field": "answer",
                          "reason": "answer 'Z' is not an option",
                          "error": "a.csv:7: field `answer`: answer 'Z' is not an option", "raw": ["q", "Z"]}
    assert entries[1]["raw"] == "{oops" and entries[1]["field"] is None


def test_reject_log_leaves_nothing_behind_on_crash(tmp_path):
    out = tmp_path / "rejects.jsonl"
    with pytest.raises(KeyboardInterrupt), RejectLog(out) as log:
        log(RecordError("bad", path="a", record=1))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_policies_and_map_records():
    good = {"id": "1", "source": "s", "task": "qa", "language": "en",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {**good, "id": "2", "language": "fr"}
    assert on_error_for("raise") is None
    with pytest.raises(ValueError, match="needs a RejectLog"):
        on_error_for("skip")
    with pytest.raises(ValueError, match="unknown on-error policy"):
        on_error_for("ignore")
    with pytest.raises(RecordError, match="field `language`"):
        list(map_records(validate_record, [good, bad]))
    log = RejectLog()
    assert [r["id"] for r in map_records(validate_record, [good, bad, good],
                                         on_error=on_error_for("skip", log))] == ["1", "1"]
    assert log.count == 1


def test_flat_map_records_yields_each_items_results_and_sets_bad_ones_aside():
    def parse(entry):
        line, count = entry
        fail = failer("x.jsonl", line, count)
        if count < 0:
            raise fail("count", "is negative")
        yield from [line] * count

    entries = [(1, 2), (2, -1), (3, 0), (4, 1)]
    errors: list[RecordError] = []
    assert list(flat_map_records(parse, entries, on_error=errors.append)) == [1, 1, 4]
    assert [(e.record, e.field, e.raw, str(e)) for e in errors] == [
        (2, "count", -1, "x.jsonl:2: field `count`: is negative")]
    with pytest.raises(RecordError, match=r"x\.jsonl:2: field `count`"):
        list(flat_map_records(parse, entries))
