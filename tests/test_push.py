"""`bimedix push`: dry run, idempotent commits, licence gate, token masking. Only `HfApi` calls are mocked."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from test_cards import _records, write_dataset_folder

from bimedix.cli import main
from bimedix.hub.cards import summarize_dataset
from bimedix.hub.push import LicenseError, check_licenses, license_class, push

SECRET = "hf_bimedixTESTtoken0123456789"
BASE = "mistralai/Mixtral-8x7B-v0.1"


class FakeHub:
    """The Hub side of `HfApi`: repositories as {path: bytes}, with LFS for binary files and a call log."""

    def __init__(self):
        self.files: dict[str, bytes] = {".gitattributes": b"*.safetensors filter=lfs\n"}
        self.calls: list[tuple[str, dict]] = []

    def install(self, monkeypatch):
        """Replace the four `HfApi` methods bimedix calls; the fakes receive the `HfApi` instance first."""
        for name in ("create_repo", "create_branch", "list_repo_tree", "create_commit"):
            method = getattr(self, name)
            monkeypatch.setattr(HfApi, name, lambda api, *args, _method=method,
                                **kwargs: _method(api, *args, **kwargs))

    def create_repo(self, api, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, "token": api.token, **kwargs}))

    def create_branch(self, api, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def list_repo_tree(self, api, repo_id, **kwargs):
        self.calls.append(("list_repo_tree", {"repo_id": repo_id, **kwargs}))
        for path, data in self.files.items():
            lfs = None
            if path.endswith((".safetensors", ".parquet")):
                lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=git_oid, lfs=lfs)

    def create_commit(self, api, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                self.files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            elif isinstance(op, CommitOperationDelete):
                del self.files[op.path_in_repo]
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.calls)}")

    def commits(self) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == "create_commit"]


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    fake = FakeHub()
    fake.install(monkeypatch)
    return fake


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return write_dataset_folder(tmp_path / "bimed", _records())


def test_dry_run_writes_exactly_what_a_push_uploads(tmp_path, tiny_adapter_dir, hub):
    dry = push("adapter", tiny_adapter_dir, repo_id="me/tiny", dry_run=tmp_path / "dry", base_model=BASE)
    assert hub.calls == []  # a dry run contacts nobody
    assert "README.md" in dry.files and "adapter_model.safetensors" in dry.files
    assert "adapter_config.json" in dry.files
    assert all(not f.startswith("checkpoint-") for f in dry.files)
    result = push("adapter", tiny_adapter_dir, repo_id="me/tiny", private=True, base_model=BASE)
    (create_repo,) = [kw for name, kw in hub.calls if name == "create_repo"]
    assert create_repo["exist_ok"] is True and create_repo["private"] is True
    assert create_repo["repo_type"] == "model"
    (commit,) = hub.commits()
    assert sorted(op.path_in_repo for op in commit["operations"]) == dry.files == result.uploaded
    for path in dry.files:  # byte-identical to the dry-run folder
        assert hub.files[path] == (dry.folder / path).read_bytes()


def test_unchanged_content_makes_no_commit(tiny_adapter_dir, hub):
    push("adapter", tiny_adapter_dir, repo_id="me/tiny", base_model=BASE)
    again = push("adapter", tiny_adapter_dir, repo_id="me/tiny", base_model=BASE)
    assert len(hub.commits()) == 1
    assert again.commit_url is None and again.uploaded == [] and again.deleted == []


def test_only_changed_files_are_committed_and_stale_ones_deleted(tiny_adapter_dir, hub):
    push("adapter", tiny_adapter_dir, repo_id="me/tiny", base_model=BASE)
    hub.files["old-notes.txt"] = b"from an earlier push"
    # card changes
    result = push("adapter", tiny_adapter_dir, repo_id="me/tiny", base_model=BASE, license="mit")
    assert result.uploaded == ["README.md"] and result.deleted == ["old-notes.txt"]
    assert "license: mit" in hub.files["README.md"].decode()
    assert ".gitattributes" in hub.files  # never deleted


def test_revision_branch_is_created_and_targeted(dataset_dir, hub):
    push("dataset", dataset_dir, repo_id="me/bimed", revision="v1")
    branch = [kw for name, kw in hub.calls if name == "create_branch"]
    assert branch == [{"repo_id": "me/bimed", "branch": "v1", "repo_type": "dataset", "exist_ok": True}]
    (commit,) = hub.commits()
    assert commit["revision"] == "v1" and commit["repo_type"] == "dataset"
    assert {"README.md", "stats.md", "data/en/train-00000.parquet",
            "data/ar/train-00000.parquet"} <= set(hub.files)


def test_token_never_leaks(tmp_path, tiny_adapter_dir, hub, monkeypatch, capsys, caplog):
    def refuse(api, repo_id, **kwargs):
        logging.getLogger("huggingface_hub").warning("request with Authorization: Bearer %s", api.token)
        response = httpx2.Response(401, request=httpx2.Request("POST",
                                                               "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError(f"401 Client Error: invalid token {api.token} for {repo_id}", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with caplog.at_level(logging.INFO):
        with pytest.raises(RuntimeError) as err:
            push("adapter", tiny_adapter_dir, repo_id="me/tiny", base_model=BASE)
        assert SECRET not in str(err.value) and "401 Client Error" in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
        code = main(["push", "adapter", str(tiny_adapter_dir), "--repo-id", "me/tiny", "--base-model", BASE])
    assert code == 2
    out = capsys.readouterr()
    assert "invalid token ***" in out.err
    assert SECRET not in out.out + out.err + caplog.text
    assert "Bearer ***" in caplog.text


def test_successful_push_output_has_no_token(tiny_adapter_dir, hub, capsys, caplog):
    with caplog.at_level(logging.DEBUG):
        assert main(["push", "adapter", str(tiny_adapter_dir), "--repo-id", "me/tiny", "--base-model",
                     BASE]) == 0
        assert main(["push", "adapter", str(tiny_adapter_dir), "--repo-id", "me/tiny", "--base-model",
                     BASE]) == 0
    out = capsys.readouterr().out
    assert "pushed" in out and "up to date" in out
    assert SECRET not in out + caplog.text
    # but it is used
    assert [kw["token"] for name, kw in hub.calls if name == "create_repo"] == [SECRET, SECRET]


def test_adapter_push_needs_a_hub_base_model(tiny_adapter_dir, hub):
    with pytest.raises(ValueError, match="--base-model"):
        push("adapter", tiny_adapter_dir, repo_id="me/tiny")  # its base is a local folder


def test_dry_run_refuses_a_non_empty_folder(tmp_path, tiny_adapter_dir):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        push("adapter", tiny_adapter_dir, repo_id="me/tiny", dry_run=tmp_path)


def _with_sources(tmp_path: Path, *extra: tuple[str, str | None]) -> Path:
    from bimedix.data.schema import make_record

    records = _records() + [make_record(
        id=f"{source}-x", source=source, task="qa", language="en", license=license,
        conversations=[{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a."}]) for source,
                            license in extra]
    return write_dataset_folder(tmp_path, records)


@pytest.mark.parametrize("source, license", [("medicationqa", "none stated (research use only)"),
                                             ("liveqa", "none stated (research use only)"),
                                             ("some-forum-dump", None)])
def test_research_only_sources_need_acknowledgement(tmp_path, hub, source, license):
    folder = _with_sources(tmp_path / "d", (source, license))
    with pytest.raises(LicenseError, match=rf"research-only sources .*'{source}' \(") as err:
        push("dataset", folder, repo_id="me/bimed", dry_run=tmp_path / "dry")
    assert "--acknowledge-research-only" in str(err.value)
    assert not (tmp_path / "dry").exists() or not any((tmp_path / "dry").iterdir())
    result = push("dataset", folder, repo_id="me/bimed", dry_run=tmp_path / "dry2",
                  acknowledge_research_only=True)
    assert any(source in note and "acknowledged" in note for note in result.warnings)
    assert f"| {source} |" in (result.folder / "README.md").read_text()


def test_forbidden_source_is_refused_even_when_acknowledged(tmp_path):
    folder = _with_sources(tmp_path / "d", ("medarabiq", "internal non-commercial research only"),
                           ("liveqa", "none stated (research use only)"))
    with pytest.raises(LicenseError, match="forbids redistribution: 'medarabiq'"):
        check_licenses(summarize_dataset(folder), acknowledge_research_only=True)


def test_copyleft_sources_pass_with_a_note(dataset_dir):
    notes = check_licenses(summarize_dataset(dataset_dir))
    assert notes == ["'meadow' (GPL-3.0, 2 rows): copyleft, the pushed rows stay under GPL-3.0"]


def test_push_cli_dry_run(tmp_path, dataset_dir, capsys):
    assert main(["push", "dataset", str(dataset_dir), "--repo-id", "me/bimed", "--dry-run",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # README, stats.md, stats.json, 2 shards
    assert "dry run: 5 files" in out and "licence note: 'meadow'" in out
    assert (tmp_path / "out" / "README.md").read_text().startswith("---\n")


@pytest.mark.parametrize("source", ["MedArabiQ", "MedArabiQ-v2", "medarabiq ", " Med Arabi Q",
                                    "MEDARABIQ_test"])
@pytest.mark.parametrize("license", ["MIT", None, "internal non-commercial research only"])
def test_medarabiq_is_refused_by_any_casing_spacing_or_suffix(tmp_path, source, license):
    folder = _with_sources(tmp_path / "d", (source, license))
    with pytest.raises(LicenseError,
                       match=rf"forbids redistribution: {re.escape(repr(source))}.*does not apply"):
        check_licenses(summarize_dataset(folder), acknowledge_research_only=True)


@pytest.mark.parametrize("license", ["No redistribution permitted", "Internal use only", "do not distribute"])
def test_licences_that_forbid_redistribution_are_refused_even_when_acknowledged(tmp_path, license):
    folder = _with_sources(tmp_path / "d", ("clinic-notes", license))
    with pytest.raises(LicenseError, match=r"forbids redistribution: 'clinic-notes'"):
        check_licenses(summarize_dataset(folder), acknowledge_research_only=True)


@pytest.mark.parametrize("license", ["Proprietary", "CC-BY-NC-9.0", "see website"])
def test_unknown_licences_are_refused_naming_source_and_licence(tmp_path, license):
    folder = _with_sources(tmp_path / "d", ("forum", license))
    with pytest.raises(LicenseError,
                       match=rf"does not know: 'forum' \({re.escape(license)}, 1 rows\).*SPDX id"):
        check_licenses(summarize_dataset(folder), acknowledge_research_only=True)


@pytest.mark.parametrize("source, license, expected", [
    ("mentalqa", "MIT", "open"), ("x", "apache 2.0", "open"), ("x", "CC-BY-SA-4.0", "open"),
    ("x", "LGPL-2.1-or-later", "open"), ("x", "none stated (research use only)", "research-only"),
    ("x", None, "research-only"), ("x", "Research use only", "research-only"),
    ("liveqa", "MIT", "research-only"), ("LiveQA ", "MIT", "research-only"),
    ("medarabiq-v2", "MIT", "forbidden"), ("x", "Proprietary", "unknown"),
])
def test_license_class_table(source, license, expected):
    assert license_class(source, license)[0] == expected


def test_research_only_rows_are_not_pushed_under_an_open_licence_name(tmp_path):
    """Rows of a non-redistributable source stay research-only even when they claim an open licence."""
    folder = _with_sources(tmp_path / "d", ("icliniq", "MIT"))
    with pytest.raises(LicenseError, match=r"research-only sources .*'icliniq' \(MIT"):
        check_licenses(summarize_dataset(folder))


def test_dry_run_folder_may_not_be_inside_what_is_pushed(tmp_path, dataset_dir):
    before = sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*"))
    with pytest.raises(ValueError, match=r"--dry-run .* would overwrite the input PATH"):
        push("dataset", dataset_dir, repo_id="me/bimed", dry_run=dataset_dir / "staged")
    assert sorted(p.relative_to(dataset_dir) for p in dataset_dir.rglob("*")) == before


def test_an_interrupted_dry_run_leaves_no_partial_folder(tmp_path, tiny_adapter_dir, hub, monkeypatch):
    """The dry-run folder is written whole beside its path and swapped in: stopped half-way, it leaves nothing
    (before, a partial folder that the next dry run refused as not empty)."""
    import shutil

    copy, copies = shutil.copy2, []

    def interrupted(source, target, **kwargs):
        copies.append(target)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return copy(source, target, **kwargs)

    (tmp_path / "dry-runs").mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copy2", interrupted)
        with pytest.raises(KeyboardInterrupt):
            push("adapter", tiny_adapter_dir, repo_id="me/tiny", dry_run=tmp_path / "dry-runs" / "dry",
                 base_model=BASE)
    assert list((tmp_path / "dry-runs").iterdir()) == []
    dry = push("adapter", tiny_adapter_dir, repo_id="me/tiny", dry_run=tmp_path / "dry-runs" / "dry",
               base_model=BASE)
    assert "README.md" in dry.files and [p.name for p in (tmp_path / "dry-runs").iterdir()] == ["dry"]
