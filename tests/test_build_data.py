"""`bimedix build-data`: configs and counts through `datasets.load_dataset`, balance, resumption,
atomicity."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
from bimed_sources import EXPECTED, write_sources

from bimedix.data.build import Counts, build_data
from bimedix.data.recipe import load_data_recipe
from bimedix.data.schema import FEATURES, RecordError
from bimedix.resources import resource_path


@pytest.fixture(scope="session")
def built(tmp_path_factory, mixtral_tokenizer):
    """The hand-made recipe built once with ``on_error="skip"``: (recipe path, output folder, result)."""
    root = tmp_path_factory.mktemp("bimed-build")
    recipe = write_sources(root / "sources")
    result = build_data(recipe, root / "out", on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    return recipe, root / "out", result


def test_load_dataset_configs_and_counts(built):
    import datasets

    _, out, _ = built
    assert sorted(datasets.get_dataset_config_names(str(out))) == sorted(EXPECTED["configs"])
    cache = out.parent / "hf-cache"
    for config, count in EXPECTED["configs"].items():
        data = datasets.load_dataset(str(out), config, split="train", cache_dir=str(cache))
        assert len(data) == count, config
        assert data.features == FEATURES
    arabic = datasets.load_dataset(str(out), "ar", split="train", cache_dir=str(cache))
    assert set(arabic["language"]) == {"ar"}
    assert "ar-qa-leaked" not in arabic["id"]


def test_counts_balance_and_match_hand_count(built):
    _, out, result = built
    assert dataclasses.asdict(result.counts) == EXPECTED["counts"]
    assert result.counts.balanced
    for counts in result.sources.values():
        assert counts.balanced
    assert result.sources["en_qa"].dropped_ratio == 4  # 10 clean English QA → 6 for 1:2 with 3 Arabic
    summary = json.loads((out / "stats.json").read_text())
    assert summary["counts"]["balanced"] and summary["counts"]["written"] == 18
    for name in ("README.md", "stats.md", "stats.png", "decontamination.jsonl", "duplicates.jsonl",
                 "rejects.jsonl"):
        assert (out / name).stat().st_size > 0, name
    rejected = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["record"], r["field"]) for r in rejected] == [(4, "conversations")]
    assert rejected[0]["raw"]["id"] == "en-qa-bad"
    duplicates = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert [(d["id"], d["kind"], d["kept_id"]) for d in duplicates] == [
        ("en-qa-exact-copy", "exact", "en-qa-1"), ("en-qa-near-copy", "near", "en-qa-2")]


def test_ratio_is_one_to_two_per_task(built):
    _, _, result = built
    for task in ("mcqa", "qa", "chat"):
        assert result.stats.cell(task, "en").samples == 2 * result.stats.cell(task, "ar").samples


def test_rerun_skips_finished_shards(built, mixtral_tokenizer):
    recipe, out, first = built
    shards = sorted(out.glob("data/*/*/*.parquet"))
    converted = sorted((out / ".work" / "sources").glob("*.jsonl"))
    before = {path: path.stat().st_mtime_ns for path in [*shards, *converted]}
    again = build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == len(shards) == first.shards_written
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert again.counts == first.counts and again.stats.to_dict() == first.stats.to_dict()


def test_crash_mid_write_leaves_no_partial_shard(built, tmp_path, mixtral_tokenizer, monkeypatch):
    import pyarrow.parquet as pq

    recipe, _, first = built
    out = tmp_path / "out"
    from bimedix.data import build as build_module

    calls = {"n": 0}
    original = build_module.DataStats.update

    def crash_on_second_shard(self, records, tokenizer, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash while writing a shard")
        return original(self, records, tokenizer, **kwargs)

    monkeypatch.setattr(build_module.DataStats, "update", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    finished = sorted(out.glob(".work/shards/*.shard"))  # the resumable work; no dataset is there yet
    assert len(finished) == 1 and pq.read_table(finished[0]).num_rows > 0
    assert not (out / "data").exists() and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(build_module.DataStats, "update", original)
    resumed = build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    assert resumed.shards_skipped == 1 and resumed.counts == first.counts


def test_on_error_raise_names_file_record_field(tmp_path, mixtral_tokenizer):
    recipe = write_sources(tmp_path / "sources")
    with pytest.raises(RecordError, match=r"en_qa\.jsonl:4: field `conversations`"):
        build_data(recipe, tmp_path / "out", tokenizer=mixtral_tokenizer, progress=False)
    assert not list((tmp_path / "out").glob("data/**/*.parquet"))


def test_cli_build_data_and_stats(built, tmp_path, capsys):
    from bimedix.cli import main

    recipe, out, _ = built
    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Total | All | 18 |" in printed and "read 27 = written 18" in printed
    copy = tmp_path / "copy"
    shutil.copytree(out / "data", copy / "data")
    assert main(["stats", str(copy)]) == 0  # no stats.json: counted from the Parquet files
    assert "| Total | All | 18 |" in capsys.readouterr().out
    assert main(["build-data", "--recipe", str(recipe), "--output", str(out), "--on-error", "skip",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Total: read 27 = written 18 + rejected 1" in printed and "0 written" in printed


@pytest.mark.parametrize("content, message", [
    (b'{"groups": [', "invalid JSON (Expecting value at line 1, column 13)"),
    (b'{"groups": [{"task": "qa"}]}',
     "not the stats.json that `bimedix build-data` writes (cannot read KeyError"),
    (b'{"groups": [], "counts": [1, 2]}', "not the stats.json that `bimedix build-data` writes"),
    (b'{"groups": "\xff"}', "not valid UTF-8"),
])
def test_corrupt_stats_json_is_named(tmp_path, capsys, content, message):
    from bimedix.cli import main

    (tmp_path / "stats.json").write_bytes(content)
    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'stats.json'}" in err and message in err and "Traceback" not in err


def test_recipe_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsources:\n  - {name: a, path: a.jsonl, wieght: 0.5}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key `sources\[0\]\.wieght`"):
        load_data_recipe(path)


@pytest.mark.parametrize("line, message", [
    ('seed: "abc"', "`seed` must be an integer, got 'abc' (str)"),
    ("seed: 4.5", "`seed` must be an integer, got 4.5 (float)"),
    ("shard_size: true", "`shard_size` must be an integer, got True (bool)"),
    ("name: [x]", "`name` must be a string, got ['x'] (list)"),
    ("dedup: {threshold: high}", "`dedup.threshold` must be a number, got 'high' (str)"),
    ("mix: {ar_en_ratio: 1:2}",
     "`mix.ar_en_ratio` must be a string or null, got 62 (int)"),  # YAML 1.1 reads 1:2 as 62
])
def test_recipe_values_are_type_checked_naming_the_key(tmp_path, line, message):
    path = tmp_path / "bad.yaml"
    key = line.split(":")[0]
    base = {"name": "name: x", "seed": "seed: 1", "shard_size": "shard_size: 10"}
    body = "\n".join(v for k, v in base.items() if k != key)
    path.write_text(f"{body}\n{line}\nsources:\n  - {{name: a, path: a.jsonl, weight: 1}}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_data_recipe(path)
    path.write_text("name: x\nsources:\n  - {name: a, path: a.jsonl, weight: '0.5', language: 1}\n")
    with pytest.raises(ValueError, match=re.escape("`sources[0].weight` must be a number, got '0.5' (str)")):
        load_data_recipe(path)


@pytest.mark.parametrize("name", ["mini", "bimed1.3m", "bimed1.3m-en", "bimed1.3m-ar"])
def test_shipped_recipes_parse(name):
    recipe = load_data_recipe(name)
    assert recipe.mix.ratio == (0.5 if name == "mini" else None)  # the BiMed1.3M recipes keep English whole
    assert recipe.sources and recipe.decontaminate.benchmarks
    assert Path(recipe.recipe_path) == resource_path("recipes", "data", f"{name}.yaml")


def test_single_language_variants_follow_the_full_recipe():
    full, english, arabic = (load_data_recipe(name) for name in ("bimed1.3m", "bimed1.3m-en", "bimed1.3m-ar"))
    assert english.sources == [spec for spec in full.sources if spec.name != "translated-ar"]
    assert arabic.sources == [spec for spec in full.sources if spec.name == "translated-ar"]
    assert english.decontaminate == full.decontaminate == arabic.decontaminate and english.dedup == full.dedup
    targets = english.mix.targets["all"]["en"] + arabic.mix.targets["all"]["ar"]
    assert targets == full.mix.targets["all"]["all"]
    assert english.mix.target_tokens + arabic.mix.target_tokens == full.mix.target_tokens
    assert sum(full.mix.targets[task]["all"] for task in ("mcqa", "qa",
                                                          "chat")) == full.mix.targets["all"]["all"]


def test_counts_equation_reports_imbalance():
    counts = Counts(read=3, written=1, rejected=1)
    assert not counts.balanced and "DOES NOT BALANCE" in counts.equation()


def test_changed_source_is_reconverted_alone(tmp_path, mixtral_tokenizer):
    recipe = write_sources(tmp_path / "sources")
    out = tmp_path / "out"
    build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    converted = out / ".work" / "sources"
    before = {path.name: path.stat().st_mtime_ns for path in converted.glob("*.json")}
    chat = tmp_path / "sources" / "chat.jsonl"
    extra = json.loads(chat.read_text().splitlines()[0])
    extra.update(id="chat-en-new", conversations=[{"from": "human",
                                                   "value": "A brand new question about sleep"},
                                                  {"from": "gpt", "value": "A brand new answer about sleep"}])
    chat.write_text(chat.read_text() + json.dumps(extra) + "\n")
    result = build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    after = {path.name: path.stat().st_mtime_ns for path in converted.glob("*.json")}
    unchanged = {name for name in before if not name.startswith("chat-")}
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    assert len([name for name in after if name.startswith("chat-")]) == 1  # the stale conversion is gone
    assert result.counts.read == EXPECTED["counts"]["read"] + 1 and result.counts.balanced
    # clean, decontamination, duplicates, rejects
    assert len(list((out / ".work").glob("clean-*.jsonl"))) == 4


@pytest.mark.slow
def test_bimed13m_recipe_runs_on_stand_in_files(shared_data, fixtures_dir, tmp_path, mixtral_tokenizer):
    """Every source and benchmark of ``bimed1.3m`` converts and the build balances, on stand-ins in its
    layout.

    Real files where ``../shared/data`` has them (test/dev splits stand in for missing train splits, so
    decontamination has plenty to remove), the real LiveQA training files when ``BIMEDIX_LIVEQA_TRAIN`` points
    at them (else fixtures in their layout), format fixtures for the sources only on Google Drive / the Hub,
    the hand-made schema records for the generated chats, and translations in every review state for the
    Arabic.
    """
    import os

    recipe = load_data_recipe("bimed1.3m")
    live = Path(os.environ.get("BIMEDIX_LIVEQA_TRAIN") or fixtures_dir / "sources")
    live_pairs = (388, 246) if os.environ.get("BIMEDIX_LIVEQA_TRAIN") else (4, 2)
    stand_ins = {
        "pubmedqa/data/ori_pqaa.json": shared_data / "pubmedqa/data/ori_pqal.json",
        "medmcqa/data/train.json": shared_data / "medmcqa/data/dev.json",
        "medqa_usmle/data_clean/questions/US/train.jsonl":
            shared_data / "medqa_usmle/data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl",
        "chatdoctor/HealthCareMagic-100k.json": fixtures_dir / "sources/HealthCareMagic-100k.json",
        "chatdoctor/iCliniq.json": fixtures_dir / "sources/iCliniq.json",
        "medical_meadow/medical_meadow_wikidoc.json": fixtures_dir
        / "sources/medical_meadow_health_advice.json",
        "medical_meadow/medical_meadow_flashcards.json": fixtures_dir
        / "sources/medical_meadow_flashcards.json",
        "pmc_llama/umls.jsonl": fixtures_dir / "sources/umls_release.json",
        "liveqa_medical_trec2017/TrainingDatasets/TREC-2017-LiveQA-Medical-Train-1.xml":
            live / "TREC-2017-LiveQA-Medical-Train-1.xml",
        "liveqa_medical_trec2017/TrainingDatasets/TREC-2017-LiveQA-Medical-Train-2.xml":
            live / "TREC-2017-LiveQA-Medical-Train-2.xml",
    }
    handmade = write_sources(tmp_path / "handmade", with_bad_record=False)
    stand_ins["generated/chats.jsonl"] = handmade.parent / "chat.jsonl"
    translated = [json.loads(line) for line in (handmade.parent / "ar_qa.jsonl").read_text().splitlines()]
    states = ["approved", "rejected", "queued", "unreviewed"]  # ar-qa-0, the leaked one, ar-qa-1, ar-qa-2
    for record, state in zip(translated, states, strict=True):
        record["meta"]["translation"] = {"model": "m", "score": 90.0, "review_state": state}
    (tmp_path / "bimed_ar.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                     for r in translated))
    stand_ins["translated/bimed_ar.jsonl"] = tmp_path / "bimed_ar.jsonl"
    root = tmp_path / "originals"
    paths = {spec.path for spec in [*recipe.sources, *recipe.decontaminate.benchmarks]}
    paths |= {path for spec in [*recipe.sources, *recipe.decontaminate.benchmarks]
              for path in spec.files.values()}
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(stand_ins.get(path, shared_data / path))
    result = build_data(recipe, tmp_path / "out", sources_dir=root, on_error="skip",
                        tokenizer=mixtral_tokenizer,
                        progress=False)
    assert result.counts.balanced and result.counts.written > 0
    assert all(counts.read > 0 for counts in result.sources.values())
    assert result.counts.dropped_ratio == 0  # English is kept whole: no ratio sampling
    sources = result.sources  # the dev/test stand-ins are removed in full, real training data is not touched
    assert sources["medmcqa"].decontaminated == sources["medmcqa"].read == 3346
    assert sources["medqa"].decontaminated == sources["medqa"].read == 1018
    assert sources["pubmedqa-a"].decontaminated == 400 and sources["pubmedqa-l"].decontaminated == 0
    assert sources["meadow-wikidoc-patient-information"].decontaminated == 0
    assert sources["medicationqa"].decontaminated == sources["liveqa-1"].decontaminated == 0
    assert (sources["liveqa-1"].read, sources["liveqa-2"].read) == live_pairs
    assert sources["liveqa-1"].written + sources["liveqa-1"].deduplicated == live_pairs[0]
    # rejected never; queued (pending) left out by default; approved and judge-passed used (ar-qa-0, ar-qa-2)
    assert sources["translated-ar"].excluded_review == 2 and sources["translated-ar"].written == 2
    summary = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert {s: c["used"] for s, c in summary["review"]["states"].items()} == {
        "original": result.counts.read - result.counts.rejected - 4, "approved": 1, "judge-passed": 1,
        "pending": 0, "rejected": 0}
    rows = {(r["task"], r["language"]): r for r in summary["composition"]["rows"]}
    assert rows["all", "ar"]["target"] == 444995 and rows["mcqa", "all"]["target"] == 638100
    assert summary["composition"]["tokens"]["target"] == 632300000
    assert rows["all", "all"]["achieved"] == result.counts.written


def test_reused_id_is_rejected_or_raises(tmp_path, mixtral_tokenizer):
    first = {"id": "same", "source": "a", "task": "qa", "language": "en", "conversations": [
        {"from": "human", "value": "How long does a common cold last in adults?"},
        {"from": "gpt", "value": "Usually seven to ten days."}]}
    second = json.loads(json.dumps(first))
    second["conversations"][0]["value"] = "Which vitamin deficiency causes scurvy in sailors?"
    second["conversations"][1]["value"] = "Vitamin C."
    (tmp_path / "a.jsonl").write_text(json.dumps(first) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(second) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: ids\nsources:\n  - {name: a, converter: records, path: a.jsonl}\n"
                      "  - {name: b, converter: records, path: b.jsonl}\n")
    with pytest.raises(RecordError, match=r"b\.jsonl: record 'same': field `id`: duplicate id"):
        build_data(recipe, tmp_path / "raise", tokenizer=mixtral_tokenizer, progress=False)
    result = build_data(recipe, tmp_path / "skip", on_error="skip", tokenizer=mixtral_tokenizer,
                        progress=False)
    assert (result.counts.read, result.counts.written, result.counts.rejected) == (2, 1, 1)
    assert json.loads((tmp_path / "skip" / "rejects.jsonl").read_text())["field"] == "id"


def test_num_proc_output_is_byte_identical(built, tmp_path, mixtral_tokenizer):
    recipe, out, result = built  # built with the default: every core
    single = build_data(recipe, tmp_path / "out", on_error="skip", tokenizer=mixtral_tokenizer,
                        progress=False,
                        num_proc=1)
    assert single.counts == result.counts
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and ".work" not in p.parts)
    assert files and files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
                                     if p.is_file() and ".work" not in p.parts)
    # `out` was last built by the CLI, whose README also holds the prose card (naming its folder): compare its
    # configs
    assert [name for name in files if name != Path("README.md")
            and (out / name).read_bytes() != (tmp_path / "out" / name).read_bytes()] == []
    assert _configs(out) == _configs(tmp_path / "out")
    three = build_data(recipe, tmp_path / "out3", on_error="skip", tokenizer=mixtral_tokenizer,
                       progress=False,
                       num_proc=3)
    assert (tmp_path / "out3" / "data").is_dir() and three.counts == result.counts
    assert all((tmp_path / "out" / name).read_bytes() == (tmp_path / "out3" / name).read_bytes()
               for name in files)


def _configs(folder: Path) -> list[dict]:
    from huggingface_hub import DatasetCard

    return DatasetCard.load(folder / "README.md").data.to_dict()["configs"]


_KILL_AFTER_THE_REPORTS = """
import os, signal, sys
from bimedix.cli import main
from bimedix.data import build

write_reports = build._write_reports

def killed(*args, **kwargs):  # the new shards and statistics are written: the last step of a build
    write_reports(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

build._write_reports = killed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stop", ["exception", "kill -9"])
def test_a_rebuild_stopped_late_leaves_the_earlier_dataset_whole(tmp_path, mixtral_tokenizer, monkeypatch,
                                                                 capsys, stop):
    """Repro (issue 20, probe item 4): a rebuild with a changed recipe removed the old shards first, so a
    build stopped late left new shards beside the old statistics until a rerun finished."""
    import subprocess
    import sys

    import datasets

    recipe = write_sources(tmp_path / "sources")
    out = tmp_path / "out"
    first = build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    before = _dataset_files(out)
    recipe.write_text(recipe.read_text().replace("shard_size: 4\n", "shard_size: 3\n"))  # new shards
    args = ["build-data", "--recipe", str(recipe), "--output", str(out), "--on-error", "skip",
            "--no-progress"]
    if stop == "exception":
        from bimedix.data import build as build_module

        write_reports = build_module._write_reports

        def fail(*args, **kwargs) -> None:
            write_reports(*args, **kwargs)
            raise RuntimeError("stopped after writing the new dataset")

        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="stopped after"):
            patch.setattr(build_module, "_write_reports", fail)
            build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    else:
        killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_THE_REPORTS, *args], capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
    assert _dataset_files(out) == before
    assert len(list(tmp_path.glob(".out.*.staging"))) == (stop == "kill -9")  # the new one, never swapped in
    loaded = datasets.load_dataset(str(out), "all", split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(loaded) == first.counts.written
    monkeypatch.setattr("bimedix.data.tokenizer.load_mixtral_tokenizer", lambda: mixtral_tokenizer)
    from bimedix.cli import main

    assert main(args) == 0
    assert "Shards: 0 written, 8 already finished (skipped)" in capsys.readouterr().out  # resumed from .work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-cache", "out", "sources"]
    fresh = build_data(recipe, tmp_path / "fresh", on_error="skip", tokenizer=mixtral_tokenizer,
                       progress=False)
    resumed, rebuilt = _dataset_files(out), _dataset_files(tmp_path / "fresh")
    assert resumed.pop("README.md") != rebuilt.pop("README.md")  # the prose card the CLI adds
    assert resumed == rebuilt and resumed != {k: v for k, v in before.items() if k != "README.md"}
    assert _configs(out) == _configs(tmp_path / "fresh") and fresh.counts == first.counts


def _dataset_files(folder: Path) -> dict[str, bytes]:
    """The bytes of a built folder's files, without the build's own hidden work and manifest."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.relative_to(folder).parts[0].startswith(".")}
