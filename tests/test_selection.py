"""`bimedix select-for-translation`: exact stratified counts, reproducibility, fractions and bad input."""

from __future__ import annotations

import json

import pytest

from bimedix.cli import main
from bimedix.data.selection import select_for_translation, summary_path

# (task, source): English records in the pool
POOL = {("mcqa", "medmcqa"): 50, ("mcqa", "medqa"): 30, ("qa", "healthcaremagic"): 15, ("chat", "chats"): 5}


def _record(task: str, source: str, i: int, language: str = "en") -> dict:
    turns = [{"from": "human", "value": f"{source} question {i}"}, {"from": "gpt", "value": f"answer {i}"}]
    meta = {"options": ["yes", "no"], "answer": "A"} if task == "mcqa" else {}
    return {"id": f"{source}-{language}-{i}", "source": source, "task": task, "language": language,
            "conversations": turns, "meta": meta}


@pytest.fixture
def pool(tmp_path):
    folder = tmp_path / "converted"
    folder.mkdir()
    for (task, source), n in POOL.items():
        records = [_record(task, source, i) for i in range(n)] + [_record(task, source, 0, "ar")]
        (folder / f"{source}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "medqa.rejects.jsonl").write_text('{"reason": "a reject log, not records"}\n')  # skipped
    return folder


def _picked(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_target_is_split_over_task_and_source_in_proportion(pool, tmp_path):
    selection = select_for_translation(pool, tmp_path / "pick.jsonl", target=40)
    assert (selection.pool, selection.target, selection.picked,
            selection.skipped_non_english) == (100, 40, 40, 4)
    assert {key: entry["picked"] for key, entry in selection.strata.items()} == {
        "mcqa|medmcqa": 20, "mcqa|medqa": 12, "qa|healthcaremagic": 6, "chat|chats": 2}
    picked = _picked(tmp_path / "pick.jsonl")
    assert len(picked) == 40 == len({r["id"] for r in picked}) and {r["language"] for r in picked} == {"en"}
    assert "| mcqa | medmcqa | 50 | 20 | 40.0% |" in summary_path(tmp_path / "pick.jsonl").read_text()


def test_same_seed_same_picks_whatever_the_file_order(pool, tmp_path):
    select_for_translation(pool, tmp_path / "a.jsonl", target=0.51, seed=3)
    merged = tmp_path / "merged.jsonl"  # the same records, one file, another order
    merged.write_text("".join(reversed([line + "\n" for f in sorted(pool.glob("*.jsonl"))
                                         for line in f.read_text().splitlines() if "rejects" not in f.name])))
    selection = select_for_translation(merged, tmp_path / "b.jsonl", target=0.51, seed=3)
    assert selection.target == 51
    assert {r["id"] for r in _picked(tmp_path / "a.jsonl")} == {r["id"]
                                                                for r in _picked(tmp_path / "b.jsonl")}
    other = select_for_translation(pool, tmp_path / "c.jsonl", target=0.51, seed=4)
    assert other.picked == 51 and {r["id"] for r in _picked(tmp_path / "c.jsonl")} != {
        r["id"] for r in _picked(tmp_path / "a.jsonl")}


def test_stratify_by_task_only(pool, tmp_path):
    selection = select_for_translation(pool, tmp_path / "pick.jsonl", target=20, by=["task"])
    assert {key: entry["picked"] for key,
            entry in selection.strata.items()} == {"chat": 1, "mcqa": 16, "qa": 3}


def test_bad_input(pool, tmp_path):
    with pytest.raises(ValueError, match=r"--target 101 is larger than the English pool of 100 records"):
        select_for_translation(pool, tmp_path / "pick.jsonl", target=101)
    assert not (tmp_path / "pick.jsonl").exists()
    with pytest.raises(ValueError, match="a count .* or a fraction"):
        select_for_translation(pool, tmp_path / "pick.jsonl", target=2.5)
    with pytest.raises(ValueError, match="--by 'language'"):
        select_for_translation(pool, tmp_path / "pick.jsonl", target=5, by=["language"])
    (tmp_path / "taken.jsonl").write_text("keep me\n")
    with pytest.raises(ValueError, match="already exists"):
        select_for_translation(pool, tmp_path / "taken.jsonl", target=5)
    assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"
    (pool / "medqa.jsonl").write_text('{"id": "x", "source": "medqa", "task": "mcqa"}\n')
    with pytest.raises(ValueError, match=r"medqa\.jsonl:1: field `language`"):
        select_for_translation(pool, tmp_path / "pick.jsonl", target=5)


def test_cli(pool, tmp_path, capsys):
    assert main(["select-for-translation", "--input", str(pool), "--output", str(tmp_path / "p.jsonl"),
                 "--target", "10"]) == 0
    out = capsys.readouterr().out
    assert "picked 10 of 100 English records (target 10; 4 non-English records ignored)" in out
    assert main(["select-for-translation", "--input", str(pool), "--output", str(tmp_path / "q.jsonl"),
                 "--target", "444995"]) == 2
    assert "--target 444,995 is larger than the English pool of 100 records" in capsys.readouterr().err
