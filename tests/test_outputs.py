"""Output safety (`bimedix.core.outputs`): no command writes over its inputs or deletes what it did not
write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bimed_sources import write_sources

from bimedix.cli import main
from bimedix.core.outputs import OutputError, OutputFolder, check_outputs, safe_name
from bimedix.data.build import build_data
from bimedix.data.recipe import load_data_recipe


def _snapshot(folder) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_check_outputs_refuses_inputs_symlinks_folders_and_clashes(tmp_path):
    data = tmp_path / "data.json"
    data.write_text("[]")
    (tmp_path / "link.json").symlink_to(data)
    (tmp_path / "mmlu").mkdir()
    check_outputs({"--output": tmp_path / "out.jsonl"}, {"--input": data, "--other": None})
    for output in (data, tmp_path / "link.json", tmp_path / "sub" / ".." / "data.json"):
        with pytest.raises(OutputError, match=r"--output .* would overwrite the input --input .*data\.json"):
            check_outputs({"--output": output}, {"--input": data})
    with pytest.raises(OutputError, match="input --input"):
        check_outputs({"--output": tmp_path / "mmlu" / "x.jsonl"}, {"--input": tmp_path / "mmlu"})
    with pytest.raises(OutputError, match="--rejects .* is the same file as --output"):
        check_outputs({"--output": tmp_path / "o.jsonl", "--rejects": tmp_path / "o.jsonl"}, {})


@pytest.mark.parametrize("name", ["../../../x", "/etc/passwd", "a/b", "..", ".hidden", "", "a\\b", "x..y"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(OutputError, match="cannot be used in a file name"):
        safe_name(name, "source name")


def test_output_folder_deletes_only_what_it_wrote(tmp_path):
    root = tmp_path / "out"
    (root / "data").mkdir(parents=True)
    (root / "data" / "mine.parquet").write_bytes(b"user data")
    with pytest.raises(OutputError, match=r"not empty and was not made by `bimedix build-data`.*--overwrite"):
        OutputFolder(root, "build-data")
    folder = OutputFolder(root, "build-data", overwrite=True)
    folder.path("data", "en", "train.parquet").write_bytes(b"ours")
    folder.path("data", "ar.parquet").write_bytes(b"ours")
    with pytest.raises(OutputError, match="not a single file or folder name"):
        folder.path("..", "escape.txt")
    assert folder.remove_tree("data") == 2
    assert _snapshot(root
                     / "data") == {root.joinpath("data",
                                                 "mine.parquet").relative_to(root / "data"): b"user data"}
    assert not (root / "data" / "en").exists()  # the folder it made, now empty, is gone
    with pytest.raises(OutputError, match="not made by `bimedix eval`"):
        OutputFolder(root, "eval")  # another command's folder is foreign
    again = OutputFolder(root, "build-data")  # its own folder (manifest present): no --overwrite needed
    assert not again.remove(root / "data" / "mine.parquet") and (root / "data" / "mine.parquet").exists()


def _kill_mid_write(target) -> None:
    """Run `atomic_open` in a child process that `kill -9`s itself mid-write, leaving its temporary behind."""
    code = ("import os, signal, sys\nfrom bimedix.core.io import atomic_open\n"
            "with atomic_open(sys.argv[1], 'wb') as handle:\n"
            "    handle.write(b'partial'); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code, str(target)], check=False).returncode == -9


def test_build_data_into_project_root_never_deletes_the_sources(tmp_path, monkeypatch, capsys,
                                                                mixtral_tokenizer):
    """Repro: `build-data --output .` with sources in ./data cleared ./data (the user's source files)."""
    project = tmp_path / "project"
    recipe = write_sources(project / "data")
    before = _snapshot(project / "data")
    monkeypatch.chdir(project)
    monkeypatch.setattr("bimedix.data.tokenizer.load_mixtral_tokenizer", lambda: mixtral_tokenizer)
    args = ["build-data", "--recipe", str(recipe), "--output", ".", "--on-error", "skip", "--no-progress"]
    assert main(args) == 2
    assert "not empty and was not made by `bimedix build-data`" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert all((project / "data" / path).read_bytes() == data for path, data in before.items())
    assert list(project.glob("data/en/*/train-00000.parquet"))
    assert main([*args, "--overwrite"]) == 0  # a rebuild deletes only its own shards
    assert all((project / "data" / path).read_bytes() == data for path, data in before.items())


@pytest.mark.parametrize("output, overwrite", [("src/out", []), ("src", ["--overwrite"])])
def test_build_data_never_writes_inside_its_sources(tmp_path, capsys, output, overwrite):
    """Repro: `--sources src --output src/out` was accepted; `--sources src --output src --overwrite`
    replaced src/README.md, the sources' licence and attribution file."""
    recipe = write_sources(tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("Licence and attribution of these sources.\n")
    before = _snapshot(tmp_path / "src")
    code = main(["build-data", "--recipe", str(recipe), "--sources", str(tmp_path / "src"), "--output",
                 str(tmp_path / output), "--on-error", "skip", "--no-progress", *overwrite])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"would overwrite the input --sources {tmp_path / 'src'}" in err
    assert _snapshot(tmp_path / "src") == before


@pytest.mark.parametrize("kind", ["source", "benchmark"])
def test_build_data_refuses_a_fifo_or_device_as_an_input(tmp_path, kind):
    """Repro: a recipe whose benchmark path is /dev/zero made build-data read forever."""
    recipe = write_sources(tmp_path / "src")
    os.mkfifo(tmp_path / "src" / "pipe")
    text = recipe.read_text(encoding="utf-8")
    if kind == "source":
        text = text.replace("path: chat.jsonl}", "path: pipe}")
    else:
        text = text.replace("path: benchmarks/medqa_test.jsonl}", "path: /dev/zero}")
    recipe.write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "bimedix", "build-data", "--recipe", str(recipe),
                             "--output", str(tmp_path / "out"), "--no-progress", "--on-error", "skip"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    name, path = ("chat", tmp_path / "src" / "pipe") if kind == "source" else ("medqa-test", "/dev/zero")
    assert f"{name}: {path} is not a regular file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_build_data_keeps_a_users_files_in_an_existing_folder(tmp_path, mixtral_tokenizer):
    """Repro: building into an existing folder deleted the user's Parquet file and overwrote their
    README.md."""
    recipe = write_sources(tmp_path / "sources")
    out = tmp_path / "existing"
    (out / "data").mkdir(parents=True)
    (out / "data" / "mine.parquet").write_bytes(b"PAR1 user rows")
    (out / "README.md").write_text("my notes")
    with pytest.raises(OutputError, match="--overwrite"):
        build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    assert (out / "README.md").read_text() == "my notes" and (out / "data" / "mine.parquet").exists()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data"]
    build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False, overwrite=True)
    (tmp_path / "sources" / "chat.jsonl").write_text((tmp_path / "sources" / "chat.jsonl").read_text()[:-1]
                                                     + " \n")
    # rebuild: clears its shards
    build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    assert (out / "data" / "mine.parquet").read_bytes() == b"PAR1 user rows"


@pytest.mark.parametrize("name", ["../../../x", "/tmp/abs"])
def test_recipe_source_names_cannot_escape_the_output(tmp_path, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: r\nsources:\n  - "
                      f"{{name: {json.dumps(name)}, converter: records, path: a.jsonl}}\n")
    with pytest.raises(ValueError, match=r"source name .* cannot be used in a file name"):
        load_data_recipe(recipe)


def test_build_data_output_inside_an_input_folder_is_refused(tmp_path, mixtral_tokenizer):
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "mmlu").mkdir()
    recipe.write_text("name: r\nsources:\n  - {name: m, converter: mmlu, path: mmlu}\n")
    with pytest.raises(OutputError, match=r"would overwrite the input source 'm' path"):
        build_data(recipe, tmp_path / "mmlu" / "built", tokenizer=mixtral_tokenizer, progress=False)
    assert list((tmp_path / "mmlu").iterdir()) == []


def test_next_build_removes_temporaries_of_a_killed_run(tmp_path, mixtral_tokenizer):
    """Repro: `kill -9` during build-data left hidden .tmp files that later runs never removed."""
    recipe = write_sources(tmp_path / "sources")
    out = tmp_path / "out"
    build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    _kill_mid_write(out / "data" / "en" / "qa" / "train-00000.parquet")
    _kill_mid_write(out / ".work" / "sources" / "en_qa-0123456789abcdef.jsonl")
    (out / "notes").mkdir()
    (out / "notes" / ".draft.123.abcdefgh.tmp").write_text("a user's file that only looks like ours")
    stale = [p for p in out.rglob("*.tmp") if "notes" not in p.parts]
    assert len(stale) == 2
    build_data(recipe, out, on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    assert not any(path.exists() for path in stale)
    assert (out / "notes" / ".draft.123.abcdefgh.tmp").exists()
    assert (out / ".bimedix-build-data.jsonl").is_file()
    assert os.path.getsize(out / "data" / "en" / "qa" / "train-00000.parquet") > len(b"partial")


MEDMCQA = {"id": "a", "question": "Which nerve?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1}


@pytest.mark.parametrize("flags, message", [
    (["--output", "{input}"], "--output .*same.json would overwrite the input --input"),
    (["--output", "{link}"], "--output .*link.json would overwrite the input --input"),
    (["--output", "{out}", "--on-error", "skip", "--rejects", "{input}"],
     "--rejects .* would overwrite the input"),
    (["--output", "{out}", "--on-error", "skip", "--rejects", "{out}"],
     "--rejects .* is the same file as --output"),
], ids=["output=input", "output=symlink-to-input", "rejects=input", "rejects=output"])
def test_convert_never_writes_over_its_input(tmp_path, capsys, flags, message):
    """Repro: `convert medmcqa --input same.json --output same.json` replaced the input; `--rejects` = input
    truncated it to 0 bytes."""
    import re

    source = tmp_path / "same.json"
    source.write_text(json.dumps(MEDMCQA) + "\n{broken\n")
    (tmp_path / "link.json").symlink_to(source)
    before = source.read_bytes()
    paths = {"input": source, "link": tmp_path / "link.json", "out": tmp_path / "out.jsonl"}
    assert main(["convert", "medmcqa", "--input", str(source), *[f.format(**paths) for f in flags]]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert source.read_bytes() == before and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["translate", "generate-chats"])
@pytest.mark.parametrize("flag", ["--output", "--cache"])
def test_llm_commands_never_write_over_their_input(tmp_path, capsys, command, flag):
    source = tmp_path / "en.jsonl"
    source.write_text('{"id": "x"}\n')
    args = {"--input": source, "--output": tmp_path / "out.jsonl", flag: source}
    assert main([command, *[str(part) for item in args.items() for part in item], "--base-url",
                 "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    assert f"{flag} {source} would overwrite the input --input" in capsys.readouterr().err
    assert source.read_text() == '{"id": "x"}\n' and not list(tmp_path.glob("*.sqlite"))


def test_sft_output_dir_may_not_be_the_model_or_data(tmp_path, tiny_model_dir):
    from bimedix.training.sft import main as sft_main
    from bimedix.training.sft import parse_args

    data = tmp_path / "train.jsonl"
    data.write_text("")
    for output in (tiny_model_dir, data):
        script, training, model, mixture, bimedix = parse_args(
            ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir",
             str(output),
             "--use_cpu", "true"])
        with pytest.raises(OutputError, match="--output_dir .* would overwrite the input"):
            sft_main(script, training, model, mixture, bimedix)
    assert data.read_text() == ""


def test_writes_through_a_symlink_out_of_the_folder_are_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data").symlink_to(tmp_path / "elsewhere")
    folder = OutputFolder(tmp_path / "out", "build-data", overwrite=True)
    with pytest.raises(OutputError, match="outside --output"):
        folder.path("data", "train.parquet")
    with pytest.raises(OutputError, match="outside --output"):
        folder.path("data", "en", "train.parquet")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_next_write_of_a_file_removes_the_temporary_a_killed_write_left(tmp_path, capsys):
    """`kill -9` during `convert` leaves `.out.jsonl.PID.XXXXXXXX.tmp`; the next convert to that file removes
    it."""
    source = tmp_path / "medmcqa.json"
    source.write_text(json.dumps(MEDMCQA) + "\n")
    _kill_mid_write(tmp_path / "out.jsonl")
    _kill_mid_write(tmp_path / "other.jsonl")
    assert len(list(tmp_path.glob(".*.tmp"))) == 2
    assert main(["convert", "medmcqa", "--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 0
    # another file's: not ours to judge
    assert [p.name.split(".")[1] for p in tmp_path.glob(".*.tmp")] == ["other"]


def test_eval_output_is_checked_before_evaluating(tmp_path, tiny_model_dir):
    from bimedix.eval.run import evaluate

    before = _snapshot(tiny_model_dir)
    with pytest.raises(OutputError, match="--output .* would overwrite the input --model"):
        evaluate(str(tiny_model_dir), tasks="bimedix_en", limit=1, output_dir=tiny_model_dir / "eval")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("mine")
    with pytest.raises(OutputError, match="not made by `bimedix eval`"):
        evaluate(str(tiny_model_dir), tasks="bimedix_en", limit=1, output_dir=tmp_path / "notes")
    assert _snapshot(tiny_model_dir) == before and _snapshot(tmp_path / "notes") == {Path("todo.md"): b"mine"}


def test_remove_tree_clears_folders_made_inside_a_folder_it_created(tmp_path):
    """What `quickstart` relies on to re-stage its dry-run pushes: files another function wrote are recorded
    after the fact, and the empty folders they left under a folder this command created go too."""
    folder = OutputFolder(tmp_path / "out", "quickstart")
    folder.folder("hub")
    staged = tmp_path / "out" / "hub" / "dataset" / "data" / "en" / "train.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"rows")
    folder.path("hub", "dataset", "data", "en", "train.parquet")
    again = OutputFolder(tmp_path / "out", "quickstart")
    assert again.remove_tree("hub") == 1 and not (tmp_path / "out" / "hub").exists()


def test_sft_keeps_a_users_readme_in_output_dir_without_overwrite(tmp_path, capsys):
    """Repro: `sft --output_dir d` replaced the user's d/README.md with the model card."""
    from bimedix.resources import resource_path

    out = tmp_path / "d"
    out.mkdir()
    (out / "README.md").write_text("My notes.\n")
    args = ["sft", "--config", str(resource_path("recipes", "tiny", "sft.yaml")), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--max_length", "64", "--save_strategy", "no", "--router_report", "false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output_dir {out} is not empty and was not made by `bimedix sft`" \
        in err
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert (out / "README.md").read_text() == "My notes.\n"
    assert main([*args, "--overwrite", "true"]) == 0  # asked for: the card replaces it, other files stay
    assert (out / "README.md").read_text() != "My notes.\n" and (out / "adapter_config.json").is_file()
    assert main(args) == 0  # a folder a run made: no --overwrite needed to run again


@pytest.mark.parametrize("exchange", ["renameat2", "rename aside"])
def test_staged_folder_swaps_in_a_whole_folder_and_keeps_a_users_files(tmp_path, monkeypatch, exchange):
    from bimedix.core.outputs import staged_folder

    if exchange == "rename aside":  # no renameat2 (not Linux, or a file system without RENAME_EXCHANGE)
        monkeypatch.setattr("bimedix.core.outputs._exchange", lambda first, second: False)
    out = tmp_path / "out"
    with staged_folder(OutputFolder(out, "merge")) as staging:
        staging.path("weights").write_text("1")
        staging.path("report").write_text("1")
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError), staged_folder(OutputFolder(out, "merge")) as staging:
        staging.path("weights").write_text("2")
        raise RuntimeError("killed before the report")
    assert {path.name: path.read_text() for path in out.iterdir() if path.suffix != ".jsonl"} == \
        {"weights": "1", "report": "1", "notes.txt": "the user's"}
    with staged_folder(OutputFolder(out, "merge")) as staging:
        staging.path("weights").write_text("3")
        staging.path("report").write_text("3")
    assert {path.name: path.read_text() for path in out.iterdir() if path.suffix != ".jsonl"} == \
        {"weights": "3", "report": "3", "notes.txt": "the user's"}
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging or old folder left


def test_staged_folder_keeps_a_cache_as_its_own_and_swaps_the_working_folder(tmp_path, monkeypatch):
    """`keep` carries a resumable cache written in place (build-data's `.work`) with its manifest entries;
    `.` swaps the folder itself and the process stays in it; a mount point inside is refused whole."""
    from bimedix.core.outputs import staged_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    folder = OutputFolder(out, "build-data", overwrite=True)
    folder.path(".work", "cache.json").write_text("resumable")
    with staged_folder(folder, keep=(".work",)) as staging:
        staging.path("stats.json").write_text("1")
    again = OutputFolder(out, "build-data")  # no --overwrite needed: its manifest came along
    assert again.owns(out / ".work" / "cache.json") and again.owns(out / "stats.json")
    assert not again.owns(out / "mine.txt")
    assert '{"path": "./"}' not in again.manifest.read_text()  # the folder is still the user's
    monkeypatch.chdir(out)
    with staged_folder(OutputFolder(Path("."), "build-data"), keep=(".work",)) as staging:
        staging.path("stats.json").write_text("2")
    assert Path.cwd() == out and Path("stats.json").read_text() == "2"
    assert sorted(p.name for p in out.iterdir()) == [".bimedix-build-data.jsonl", ".work", "mine.txt",
                                                     "stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr("os.path.ismount", lambda path: Path(path).name == ".work")
    with pytest.raises(OutputError, match=r"\.work is a mount point inside the output folder"), \
            staged_folder(OutputFolder(out, "build-data")) as staging:
        staging.path("stats.json").write_text("3")
    assert (out / "stats.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
