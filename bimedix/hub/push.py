"""Publishing to the Hugging Face Hub: stage a folder with its card, gate licences, push only what changed.

`push` has two halves. `stage` writes exactly the folder that would be uploaded (the weights or data
files plus a README card rendered by `bimedix.hub.cards`); ``--dry-run DIR`` stops there. `sync_folder`
then makes the repository revision mirror that folder with one ``create_commit``: files whose content
matches the remote (git blob id, or LFS sha256) are skipped, remote files the folder lacks are deleted,
and when nothing differs no commit is made, so pushing unchanged content twice is a no-op.

Licence policy for data pushes (``dataset``, ``bench``), per source, from the rows' ``source``/``license``
(`license_class`):

- forbidden: a source whose terms forbid redistribution (`FORBIDDEN_SOURCES`, e.g. MedArabiQ, matched by
  any casing, spacing or suffix: ``MedArabiQ-v2``, ``medarabiq ``), or a licence that says so
  (``no redistribution``, ``internal ... only``): always refused, even when acknowledged;
- research-only: no licence stated, a licence marked research use only, or a source bimedix knows to be
  non-redistributable (LiveQA, MedicationQA, MedAraBench, ...): refused unless
  ``acknowledge_research_only=True`` (``--acknowledge-research-only``); the card then lists them;
- open: a licence on the allow-list `REDISTRIBUTABLE_LICENSES` (SPDX ids, any casing), copyleft included
  (GPL-3.0 Medical Meadow): allowed; the card lists every licence and says share-alike terms apply;
- anything else is an unknown licence: refused, naming the source and the licence.

Review policy for ``dataset`` pushes (`bimedix.data.review_policy`, the one ``build-data`` applies):
rows holding a reviewer-rejected translation are always refused; translations pending review or below
the judge threshold are refused unless ``include_unreviewed=True`` (``--include-unreviewed``), and the
card counts every review status.

The token is never printed or logged: it is read by `huggingface_hub` (``HF_TOKEN`` or ``hf auth login``),
and every message that leaves `push` (exceptions and log records) has it masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.hf_api import RepoFile

from ..core.outputs import OutputFolder, check_outputs, staged_folder
from ..data.review_policy import UNREVIEWED
from .cards import (
    DatasetSummary,
    is_hub_id,
    render_bench_card,
    render_dataset_card,
    render_model_card,
    summarize_dataset,
)

logger = logging.getLogger(__name__)

KINDS = {"adapter": "model", "model": "model", "dataset": "dataset", "bench": "dataset"}
# Files that make up each kind of repository (globs relative to the source folder); README.md is rendered.
ALLOW_PATTERNS = {
    "adapter": ["adapter_config.json", "adapter_model*.safetensors", "bimedix_base.json", "tokenizer*",
                "special_tokens_map.json", "chat_template.jinja", "generation_config.json"],
    "model": ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
              "merge_report.json", "tokenizer*", "special_tokens_map.json", "chat_template.jinja"],
    # Not decontamination.jsonl: it quotes the benchmark test items the data was checked against.
    "dataset": ["**/*.parquet", "stats.json", "stats.md", "stats.png"],
    "bench": ["**/*.parquet"],
}
# Sources whose terms forbid redistribution, keyed by their name lower-cased without spaces or punctuation; a
# name that starts with a key (``MedArabiQ-v2`` → ``medarabiqv2``) is refused too.
FORBIDDEN_SOURCES = {
    "medarabiq": "its licence allows internal non-commercial research only and forbids redistribution",
}
# SPDX ids (lower-case) under which redistribution is allowed; copyleft and non-commercial terms travel with
# the rows.
REDISTRIBUTABLE_LICENSES = frozenset(
    ["mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "odc-by", "pddl", "unlicense"]
    + [f"cc-by{variant}-{version}" for variant in ("", "-sa", "-nc", "-nc-sa", "-nd", "-nc-nd")
       for version in ("3.0", "4.0")]
    + [f"{gpl}-{version}{suffix}" for gpl in ("gpl", "lgpl") for version in ("2.0", "2.1", "3.0")
       for suffix in ("", "-only", "-or-later")])
COPYLEFT = re.compile(r"(l?gpl|cc-by(-nc)?-sa)", re.IGNORECASE)
NO_REDISTRIBUTION = re.compile(r"(no|not for|without|forbids?)[- ]+redistribution|do not (re)?distribute|"
                               r"\binternal\b.*\bonly\b", re.IGNORECASE)
RESEARCH_ONLY = re.compile(r"^(|none( stated)?\b.*|no licen[cs]e( "
                           r"stated)?|unknown)$|research[- ](use[- ])?only",
                           re.IGNORECASE)


class LicenseError(ValueError):
    """Data whose licence forbids redistribution (or is research-only and not acknowledged)."""


class ReviewError(ValueError):
    """Data holding translations the review policy does not allow (rejected, or unreviewed and not
    acknowledged)."""


@dataclass
class PushResult:
    """What `push` did.

    Attributes:
        folder (`Path`): the staged folder (the ``--dry-run`` folder, or a temporary one that is removed).
        files (`list[str]`): paths in the staged folder, relative, sorted.
        uploaded (`list[str]`): files added or changed by the commit (empty for a dry run or no change).
        deleted (`list[str]`): remote files removed by the commit.
        commit_url (`str`, *optional*): the new commit, ``None`` for a dry run or when nothing changed.
        warnings (`list[str]`): licence notes (copyleft, acknowledged research-only sources).
    """

    folder: Path
    files: list[str]
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    commit_url: str | None = None
    warnings: list[str] = field(default_factory=list)


def push(
    kind: str,
    source: str | os.PathLike,
    *,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: str | os.PathLike | None = None,
    acknowledge_research_only: bool = False,
    eval_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    include_unreviewed: bool = False,
    eval_chat_dir: str | os.PathLike | None = None,
) -> PushResult:
    """Stage ``source`` as a ``kind`` repository and push it to ``repo_id`` (or only write it, for a dry run).

    Args:
        kind (`str`): ``"adapter"``, ``"model"``, ``"dataset"`` or ``"bench"``.
        source (`str` or `os.PathLike`): the adapter/model folder, the ``build-data`` output, or the bench
            folder.
        repo_id (`str`): ``ORG/NAME`` on the Hub.
        private (`bool`, *optional*, defaults to `False`): create the repository private (if it does not
            exist).
        revision (`str`, *optional*): branch to push to (created from the default branch if missing).
        dry_run (`str` or `os.PathLike`, *optional*): write the staged folder here and contact nobody.
        acknowledge_research_only (`bool`, *optional*, defaults to `False`): allow data from research-only
            sources.
        include_unreviewed (`bool`, *optional*, defaults to `False`): allow translations pending review or
            below the judge threshold in a ``dataset`` push (rejected ones are always refused).
        eval_dir, eval_chat_dir, data_dir, base_model, license: card inputs, see
            `bimedix.hub.cards.render_model_card`.

    Returns:
        `PushResult`.

    Raises:
        `LicenseError`: data from a source whose licence forbids redistribution.
        `RuntimeError`: the Hub refused a call (message with the token masked).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown push kind {kind!r}; choose one of {sorted(KINDS)}.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"--repo-id {repo_id!r} is not of the form ORG/NAME.")
    if kind in ("adapter", "model") and not dry_run:
        base = base_model or _adapter_base(Path(source))
        if kind == "adapter" and not (base and is_hub_id(base)):
            raise ValueError(f"the adapter's base model {base!r} is not "
                             "a Hub id, so nobody could load the adapter "
                             "from the Hub; pass --base-model ORG/NAME (the model it was trained on).")
    if dry_run:
        folder = Path(dry_run)
        check_outputs({"--dry-run": folder}, {"PATH": source, "--eval": eval_dir, "--data": data_dir,
                                              "--eval-chat": eval_chat_dir})
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"--dry-run folder {folder} is not empty; pass a new or empty folder.")
        inputs = {"PATH": source, "--eval": eval_dir, "--data": data_dir, "--eval-chat": eval_chat_dir}
        with staged_folder(OutputFolder(folder, "push", inputs=inputs, flag="--dry-run")) as staging:
            warnings = stage(kind, source, staging.root, repo_id=repo_id,  # whole, then swapped in
                             acknowledge_research_only=acknowledge_research_only,
                             eval_dir=eval_dir, data_dir=data_dir, base_model=base_model, license=license,
                             include_unreviewed=include_unreviewed, eval_chat_dir=eval_chat_dir)
        return PushResult(folder=folder, files=_list_files(folder), warnings=warnings)
    with tempfile.TemporaryDirectory(prefix="bimedix-push-") as tmp:
        folder = Path(tmp)
        warnings = stage(kind, source, folder, repo_id=repo_id,
                         acknowledge_research_only=acknowledge_research_only,
                         eval_dir=eval_dir, data_dir=data_dir, base_model=base_model, license=license,
                         include_unreviewed=include_unreviewed, eval_chat_dir=eval_chat_dir)
        result = sync_folder(folder, repo_id=repo_id, repo_type=KINDS[kind], private=private,
                             revision=revision,
                             commit_message=f"Upload {kind} with bimedix")
        result.warnings = warnings
        return result


def stage(kind: str, source: str | os.PathLike, output_dir: str | os.PathLike, *, repo_id: str,
          acknowledge_research_only: bool = False, eval_dir=None, data_dir=None, base_model: str
          | None = None,
          license: str = "apache-2.0", include_unreviewed: bool = False, eval_chat_dir=None) -> list[str]:
    """Write the folder a ``kind`` push uploads: the allowed files of ``source`` plus a rendered
    ``README.md``.

    Returns:
        `list[str]`: licence notes to show the user (the push goes ahead with them).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown push kind {kind!r}; choose one of {sorted(KINDS)}.")
    source = Path(source)
    if kind == "bench" and (source / "arabic-bench").is_dir():
        source = source / "arabic-bench"  # a whole `build-bench` output: publish its Arabic benchmark
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: folder not found.")
    warnings: list[str] = []
    if kind in ("dataset", "bench"):
        summary = summarize_dataset(source)
        warnings = check_licenses(summary, acknowledge_research_only=acknowledge_research_only)
        warnings += check_review(summary, include_unreviewed=include_unreviewed)
        card = (render_dataset_card if kind == "dataset" else render_bench_card)(source, repo_id=repo_id)
    else:
        card = render_model_card(source, repo_id=repo_id, base_model=base_model, eval_dir=eval_dir,
                                 data_dir=data_dir, license=license, eval_chat_dir=eval_chat_dir)
    files = sorted({path for pattern in ALLOW_PATTERNS[kind] for path in source.glob(pattern)
                    if path.is_file()})
    if not files:
        raise FileNotFoundError(f"{source}: nothing to push for `{kind}` "
                                f"(looked for {ALLOW_PATTERNS[kind]}).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = output_dir / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    card.save(output_dir / "README.md")
    return warnings


def check_licenses(summary: DatasetSummary, *, acknowledge_research_only: bool = False) -> list[str]:
    """Apply the licence policy (module docstring) to a dataset's sources.

    Returns:
        `list[str]`: notes for sources that pass with conditions (copyleft, acknowledged research-only).

    Raises:
        `LicenseError`: listing every offending source with its licence and row count, and the fix.
    """
    forbidden, unknown, research_only, notes = [], [], [], []
    for entry in summary.sources:
        label = f"{entry.source!r} ({entry.license or 'no licence stated'}, {entry.count:,} rows)"
        kind, reason = license_class(entry.source, entry.license)
        if kind == "forbidden":
            forbidden.append(f"{label}: {reason}")
        elif kind == "unknown":
            unknown.append(label)
        elif kind == "research-only":
            research_only.append(label)
        elif COPYLEFT.match((entry.license or "").strip()):
            notes.append(f"{label}: copyleft, the pushed rows stay under {entry.license}")
    if forbidden:
        raise LicenseError("refusing to push data whose licence forbids redistribution: "
                           + "; ".join(forbidden)
                           + ". Rebuild the dataset without these sources "
                             "(--acknowledge-research-only does not "
                           "apply to them).")
    if unknown:
        raise LicenseError("refusing to push data under licences bimedix does not know: " + "; ".join(unknown)
                           + ". If a licence allows redistribution, set "
                             "the rows' `license` to its SPDX id (one of "
                           f"{', '.join(sorted(REDISTRIBUTABLE_LICENSES)[:6])}, ...: see "
                           "bimedix.hub.push.REDISTRIBUTABLE_LICENSES); "
                           "otherwise rebuild without these sources.")
    if research_only and not acknowledge_research_only:
        raise LicenseError("refusing to push data from research-only sources (no licence that allows "
                           f"redistribution): {'; '.join(research_only)}. Rebuild without them, or pass "
                           "--acknowledge-research-only if you have the "
                           "right to share them (the card will list them).")
    notes += [f"{label}: research-only, pushed because you acknowledged it" for label in research_only]
    return notes


def check_review(summary: DatasetSummary, *, include_unreviewed: bool = False) -> list[str]:
    """Apply the review policy (module docstring) to a dataset's translation review statuses.

    Returns:
        `list[str]`: a note when unreviewed translations go out because ``include_unreviewed`` allows them.

    Raises:
        `ReviewError`: rejected translations, or unreviewed ones without ``include_unreviewed``, with counts.
    """
    states = summary.review_states
    if states.get("rejected"):
        raise ReviewError(f"refusing to push {states['rejected']:,} "
                          "reviewer-rejected translation(s); rebuild the "
                          "dataset with `bimedix build-data`, which leaves them out.")
    unreviewed = {state: states[state] for state in UNREVIEWED if states.get(state)}
    if unreviewed and not include_unreviewed:
        raise ReviewError(f"refusing to push translations nobody approved: {unreviewed}. Rebuild without "
                          "--include-unreviewed, or pass --include-unreviewed "
                          "to publish them (the card counts them).")
    return [f"{n:,} {state} translation(s) pushed because of --include-unreviewed" for state,
            n in unreviewed.items()]


def sync_folder(folder: str | os.PathLike, *, repo_id: str, repo_type: str = "model", private: bool = False,
                revision: str | None = None, commit_message: str = "Upload with bimedix") -> PushResult:
    """Make ``repo_id`` (at ``revision``) mirror ``folder`` in one commit, or make no commit if nothing
    differs.

    Every network call goes through `huggingface_hub.HfApi` (``create_repo(exist_ok=True)``,
    ``create_branch``, ``list_repo_tree``, ``create_commit``); errors come back as `RuntimeError` with the
    token masked.
    """

    token = get_token()
    if not token:
        raise RuntimeError("no Hugging Face token: run `hf auth login` "
                           "or set HF_TOKEN (or use --dry-run DIR).")
    folder = Path(folder)
    files = _list_files(folder)
    with _masking(token):
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        tree = api.list_repo_tree(repo_id, recursive=True, revision=revision, repo_type=repo_type)
        remote = {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
        changed = [path for path in files if not _same_content(folder / path, remote.get(path))]
        stale = sorted(set(remote) - set(files) - {".gitattributes"})
        if not changed and not stale:
            logger.info("%s is up to date: no commit made", repo_id)
            return PushResult(folder=folder, files=files)
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
                      for path in changed]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                 repo_type=repo_type, revision=revision)
    return PushResult(folder=folder, files=files, uploaded=changed, deleted=stale,
                      commit_url=str(info.commit_url))


def _adapter_base(source: Path) -> str | None:
    config = source / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def license_class(source: str, license: str | None) -> tuple[str, str]:
    """Classify one source of a dataset for the licence gate (module docstring).

    Returns:
        `tuple[str, str]`: ``("forbidden" | "research-only" | "open" | "unknown", reason)``.
    """
    from ..data.converters import SOURCE_INFO

    key = re.sub(r"[^a-z0-9]", "", source.lower())
    for name, reason in FORBIDDEN_SOURCES.items():
        if key.startswith(name):
            return "forbidden", reason
    text = " ".join((license or "").split())
    if NO_REDISTRIBUTION.search(text):
        return "forbidden", f"its licence {text!r} forbids redistribution"
    info = SOURCE_INFO.get(source.strip().lower())
    if info is not None and not info.redistributable:
        return "research-only", f"bimedix knows {info.name} as not redistributable ({info.license})"
    if RESEARCH_ONLY.search(text):
        return "research-only", "no licence that allows redistribution"
    if text.lower().replace(" ", "-") in REDISTRIBUTABLE_LICENSES:
        return "open", text
    return "unknown", f"licence {text!r} is not on the allow-list"


def _list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())


def _same_content(path: Path, remote) -> bool:
    """Whether a local file equals a remote `RepoFile`: LFS sha256 for LFS files, git blob id otherwise."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    data = path.read_bytes()
    if remote.lfs is not None:
        return hashlib.sha256(data).hexdigest() == remote.lfs.sha256
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == remote.blob_id


class _MaskFilter(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "***"), None
        return True


@contextlib.contextmanager
def _masking(token: str) -> Iterator[None]:
    """Mask ``token`` in log records (every handler of the root and huggingface_hub loggers) and in errors."""
    handlers = [*logging.getLogger().handlers, *logging.getLogger("huggingface_hub").handlers]
    mask = _MaskFilter(token)
    for handler in handlers:
        handler.addFilter(mask)
    try:
        yield
    except Exception as err:  # re-raised with the secret masked; the original (with its traceback) is dropped
        message = f"{type(err).__name__}: {err}".replace(token, "***")
        raise RuntimeError(f"push to the Hub failed: {message}") from None
    finally:
        for handler in handlers:
            handler.removeFilter(mask)
