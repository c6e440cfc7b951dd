"""`bimedix.data.parallel`: ordered results whatever the process count, errors intact across processes."""

from __future__ import annotations

import pytest

from bimedix.data.parallel import OffsetReader, ordered_map
from bimedix.data.schema import RecordError


def _square_plus(context: int, task: int) -> int:
    if task < 0:
        raise RecordError("negative task", path="tasks.jsonl", record=-task, field="value",
                          raw={"value": task})
    return task * task + context


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_ordered_map_keeps_task_order(num_proc):
    assert list(ordered_map(_square_plus, iter(range(50)), context=1, num_proc=num_proc, prefetch=2)) == \
        [i * i + 1 for i in range(50)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_worker_errors_keep_file_record_and_field(num_proc):
    with pytest.raises(RecordError) as error:
        list(ordered_map(_square_plus, [1, 2, -7], context=0, num_proc=num_proc))
    assert str(error.value) == "tasks.jsonl:7: field `value`: negative task"
    assert error.value.raw == {"value": -7}


def test_offset_reader_chunks_and_rereads(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "text": "é{i}"}}\n' for i in range(5)), encoding="utf-8")
    reader = OffsetReader([path])
    chunks = list(reader.chunks(0, size=2))
    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    offset = chunks[1][1][0]
    assert reader.record(0, offset) == {"id": "r3", "text": "é3"}
    reader.close()
