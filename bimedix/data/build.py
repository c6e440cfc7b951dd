"""``bimedix build-data``: original source files → converted, cleaned, mixed BiMed1.3M-style dataset.

Stages, each cached under ``<output>/.work`` and skipped when its inputs have not changed:

1. **convert** every recipe source with `bimedix.data.converters.convert` (or read schema JSON Lines
   for ``converter: records``) into ``.work/sources/<name>-<key>.jsonl``; the key hashes the source
   file(s), converter, options and on-error policy;
2. **clean**: drop translations the review policy excludes (`review_policy`: rejected always, pending and
   below-threshold unless ``include_unreviewed``), sample by source weight, drop records that overlap a
   benchmark (`decontam`), exact and near duplicates (`dedup`) and duplicate ids, in recipe order, into
   ``.work/clean-<key>.jsonl``, and plan the mix (`mixing`: keep everything, or an explicit
   ``mix.ar_en_ratio``);
3. **write** the records the plan keeps as Parquet shards (`bimedix.data.schema.FEATURES`) as
   ``.work/shards/<language>-<task>-NNNNN.shard``, each written atomically with its statistics in a
   sidecar, so a re-run skips finished shards;
4. **finish** the dataset in a hidden sibling of the output (`bimedix.core.outputs.staged_folder`): the
   shards linked in as ``data/<language>/<task>/train-NNNNN.parquet``, ``stats.{json,md,png}`` (with the
   review counts and the target vs achieved composition, `composition`), ``decontamination.jsonl``,
   ``duplicates.jsonl``, ``rejects.jsonl`` and a ``README.md`` whose ``configs:`` (``all``, ``en``,
   ``ar``, ``mcqa``, ``qa``, ``chat``; a config with no rows is left out, since ``datasets`` cannot load an
   empty split) make ``datasets.load_dataset(output, "ar", split="train")`` work (the command
   ``bimedix build-data`` renders the prose dataset card into it there,
   `bimedix.hub.cards.save_dataset_card`); then swap it in whole. Until then a folder an earlier build
   finished stays as it was, and loadable.

The counts always balance: ``read = written + rejected + excluded_review + deduplicated + decontaminated +
dropped_weight + dropped_ratio``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.conventions import LANGUAGES
from ..core.io import atomic_open, iter_jsonl, raw_lines, report, write_json
from ..core.outputs import OutputFolder, check_outputs, link_or_copy, staged_folder
from .composition import composition
from .dataset_readme import configs_readme
from .decontam import BenchmarkIndex, load_benchmark_items, report_entry
from .dedup import Deduplicator, Signature, record_text
from .mixing import RatioPlanner, keep_by_weight, keeps
from .parallel import OffsetReader, OrderedPool, default_num_proc, ordered_map
from .recipe import RECORDS_CONVERTER, DataRecipe, SourceSpec, load_data_recipe
from .rejects import RejectLog, on_error_for
from .review_policy import ReviewPolicy
from .schema import FEATURES, TASKS, RecordError, read_records_lines
from .stats import DataStats

logger = logging.getLogger(__name__)

CONFIGS = {"all": ("*", "*"), "en": ("en", "*"), "ar": ("ar", "*"), "mcqa": ("*", "mcqa"), "qa": ("*", "qa"),
           "chat": ("*", "chat")}
WORK_DIR = ".work"
_FORMAT_VERSION = "2"
_ROW_GROUP = 1000


@dataclass
class Counts:
    """Where every read record went. ``balanced`` checks the equation the CLI prints."""

    read: int = 0
    rejected: int = 0
    excluded_review: int = 0
    dropped_weight: int = 0
    decontaminated: int = 0
    deduplicated_exact: int = 0
    deduplicated_near: int = 0
    near_candidates: int = 0  # LSH candidates, of which `deduplicated_near` were confirmed by exact Jaccard
    dropped_ratio: int = 0
    written: int = 0

    @property
    def deduplicated(self) -> int:
        return self.deduplicated_exact + self.deduplicated_near

    @property
    def balanced(self) -> bool:
        return self.read == (self.written + self.rejected + self.excluded_review + self.deduplicated
                             + self.decontaminated
                             + self.dropped_weight + self.dropped_ratio)

    def add(self, other: Counts) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def equation(self) -> str:
        """``read N = written + rejected + excluded by review + deduplicated + ...`` with numbers."""
        return (f"read {self.read:,} = written {self.written:,} + rejected {self.rejected:,} + excluded by "
                f"the review policy {self.excluded_review:,} + deduplicated "
                f"{self.deduplicated:,} (exact {self.deduplicated_exact:,}, near {self.deduplicated_near:,} "
                f"of {self.near_candidates:,} LSH candidates) + "
                f"decontaminated {self.decontaminated:,} + dropped by weight {self.dropped_weight:,} + "
                f"dropped for the AR:EN ratio {self.dropped_ratio:,}"
                + ("" if self.balanced else "  [DOES NOT BALANCE]"))


@dataclass
class Prepared:
    """The cleaned records and the mixing plan, ready to be written (by `build_data` or a builder)."""

    recipe: DataRecipe
    work_dir: Path
    key: str
    clean_path: Path
    plan: dict
    ranges: dict[str, list[int]]
    counts: dict[str, Counts]
    rejects: list[Path] = field(default_factory=list)
    review: dict = field(default_factory=dict)

    def iter_records(self, dropped: Counter | None = None) -> Iterator[tuple[str, dict]]:
        """Yield ``(source name, record)`` for each record of the mixture, in a fixed order.

        Args:
            dropped (`collections.Counter`, *optional*): counts, per source, the records the ratio plan drops.
        """
        names = [(name, start, end) for name, (start, end) in self.ranges.items()]
        with open(self.clean_path, encoding="utf-8") as handle:
            position = 0
            for line_no, line in enumerate(handle):
                while line_no >= names[position][2]:
                    position += 1
                record = json.loads(line)
                if keeps(self.plan, self.recipe.seed, record):
                    yield names[position][0], record
                elif dropped is not None:
                    dropped[names[position][0]] += 1


@dataclass
class BuildResult:
    """What `build_data` produced."""

    output: Path
    counts: Counts
    sources: dict[str, Counts]
    stats: DataStats
    shards_written: int
    shards_skipped: int
    review: dict = field(default_factory=dict)
    composition: dict = field(default_factory=dict)


def build_data(recipe: DataRecipe | str | os.PathLike, output: str | os.PathLike, *,
               sources_dir: str | os.PathLike | None = None, on_error: str = "raise", tokenizer=None,
               progress: bool = True, include_unreviewed: bool = False, num_proc: int | None = None,
               overwrite: bool = False, finish: Callable[[Path], object] | None = None) -> BuildResult:
    """Build a BiMed1.3M-style dataset folder from a data recipe.

    The folder is an `bimedix.core.outputs.OutputFolder`: no input is ever written or deleted, and a rebuild
    deletes only the files an earlier build recorded writing there. The dataset is written whole in a hidden
    sibling and swapped in at the end (`bimedix.core.outputs.staged_folder`), keeping the resumable work in
    ``output/.work``: a build killed at any point leaves the earlier dataset as it was.

    Args:
        recipe (`DataRecipe | str | os.PathLike`): a recipe, a YAML path, or a shipped recipe name (``mini``).
        output (`str | os.PathLike`): the dataset folder (created; re-running resumes).
        sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        on_error (`str`, *optional*, defaults to ``"raise"``): ``"raise"`` stops at the first bad record
            (file:record:field); ``"skip"`` sets it aside in ``rejects.jsonl`` and goes on.
        tokenizer (`PreTrainedTokenizerFast`, *optional*): for the statistics; defaults to Mixtral's.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
        include_unreviewed (`bool`, *optional*, defaults to `False`): also use translations still pending
            review or below the judge threshold (`bimedix.data.review_policy`); they are counted in
            ``stats.json``.
        num_proc (`int`, *optional*, defaults to all cores): processes for the convert and clean stages; the
            output is byte-identical to ``num_proc=1``.
        overwrite (`bool`, *optional*, defaults to `False`): allow a non-empty ``output`` that no build made
            (its other files are kept).
        finish (`Callable[[Path], object]`, *optional*): called with the staging folder once the dataset is
            written in it, before it is swapped in (the CLI renders the dataset card there).

    Returns:
        `BuildResult`: counts (balanced), per-source counts, statistics, review counts and composition.

    Raises:
        `bimedix.core.outputs.OutputError`: ``output`` is or holds an input it would overwrite, or is a
        foreign non-empty folder without ``overwrite``.
    """
    if not isinstance(recipe, DataRecipe):
        recipe = load_data_recipe(recipe)
    recipe = recipe.rooted(sources_dir)
    output = Path(output)
    inputs = recipe_inputs(recipe, sources_dir)
    check_outputs({"--output": output, "--output's data folder": output / "data"}, inputs)  # before any work
    folder = OutputFolder(output, "build-data", inputs=inputs, overwrite=overwrite)
    work_dir = folder.folder(WORK_DIR)
    try:
        prepared = prepare(recipe, work_dir, on_error=on_error, progress=progress,
                           include_unreviewed=include_unreviewed, num_proc=num_proc)
    # e.g. Ctrl-C: the worker processes were stopped mid-write; remove their temporaries
    except BaseException:
        folder.remove_stale_temporaries()
        raise
    if tokenizer is None:
        from .tokenizer import load_mixtral_tokenizer

        tokenizer = load_mixtral_tokenizer()
    build_key = _digest([prepared.key, recipe.shard_size, _FORMAT_VERSION])
    marker = work_dir / "build.json"
    if not marker.is_file() or json.loads(marker.read_text())["key"] != build_key:
        folder.remove_tree(WORK_DIR, "shards")  # the dataset itself is replaced whole at the end
        write_json(folder.path(WORK_DIR, marker.name), {"key": build_key})
    per_source = {name: dataclasses.replace(counts) for name, counts in prepared.counts.items()}
    stats = DataStats()
    writers = {group: _ShardWriter(folder, group, recipe.shard_size, tokenizer)
               for group in ((language, task) for language in LANGUAGES for task in TASKS)}
    dropped: Counter[str] = Counter()
    try:
        for name, record in tqdm(prepared.iter_records(dropped), desc="write", unit="rec",
                                 disable=not progress):
            writers[(record["language"], record["task"])].add(record)
            per_source[name].written += 1
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        stats.merge(writer.stats)
    for name, counts in per_source.items():
        counts.dropped_ratio = dropped[name]
    total = Counts()
    for counts in per_source.values():
        total.add(counts)
    mix = composition(stats, recipe.mix.targets, recipe.mix.target_tokens)
    with staged_folder(folder, keep=(WORK_DIR,)) as staging:
        for writer in writers.values():
            writer.link_into(staging)
        _write_reports(staging, recipe, prepared, total, per_source, stats, mix)
        if finish is not None:
            finish(staging.root)
    logger.info("%s", total.equation())
    return BuildResult(output, total, per_source, stats, sum(w.written for w in writers.values()),
                       sum(w.skipped for w in writers.values()), prepared.review, mix)


def recipe_inputs(recipe: DataRecipe, sources_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Label → path of everything a recipe reads: the recipe itself, each source's files and benchmarks, and
    the ``--sources`` folder when given (the whole folder is an input: its README and licence files too)."""
    recipe = recipe.rooted(sources_dir)
    inputs = {"--recipe": Path(recipe.recipe_path)} if recipe.recipe_path else {}
    for kind, specs in (("source", recipe.sources), ("benchmark", recipe.decontaminate.benchmarks)):
        for spec in specs:
            for key, path in [("path", spec.path), *spec.files.items()]:
                inputs[f"{kind} {spec.name!r} {key}"] = Path(path)
    if sources_dir is not None:  # named last: a file's own label is the clearer one
        inputs["--sources"] = recipe.root(sources_dir)
    return inputs


def prepare(recipe: DataRecipe, work_dir: str | os.PathLike, *, sources_dir: str | os.PathLike | None = None,
            on_error: str = "raise", progress: bool = True, include_unreviewed: bool = False,
            num_proc: int | None = None) -> Prepared:
    """Run the convert and clean stages (cached in ``work_dir``) and plan the mixture.

    Args:
        recipe (`DataRecipe`): the recipe.
        work_dir (`str | os.PathLike`): where converted and cleaned records are cached.
        sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        on_error (`str`, *optional*, defaults to ``"raise"``): ``"raise"`` or ``"skip"``.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
        include_unreviewed (`bool`, *optional*, defaults to `False`): see `build_data`.
        num_proc (`int`, *optional*, defaults to all cores): sources are converted in parallel, and the clean
            stage's per-record work (normalising, benchmark matching, MinHash) runs in parallel while its
            decisions stay in recipe order; the output does not depend on it.

    Returns:
        `Prepared`: the cleaned records, the mixing plan, the counts so far and the review counts.
    """
    on_error_for(on_error, RejectLog())  # validates the policy name
    recipe = recipe.rooted(sources_dir)
    work_dir = Path(work_dir)
    wanted = [(spec.name, path) for spec in [*recipe.sources, *recipe.decontaminate.benchmarks]
              for path in [spec.path, *spec.files.values()]]
    missing = [f"{name}: {path}" for name, path in wanted if not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input(s) of recipe {recipe.name!r} do not exist under "
                                f"{recipe.sources_dir} (check the paths and --sources):\n  "
                                + "\n  ".join(missing))
    resolved = [(name, Path(path)) for name, path in wanted]
    special = [f"{name}: {path}" for name, path in resolved if not (path.is_file() or path.is_dir())]
    if special:
        raise ValueError(f"recipe {recipe.name!r}: {'; '.join(special)} is not a regular file or folder (a "
                         "device such as /dev/zero, a FIFO or a socket never ends or blocks); point the "
                         "recipe at files")
    num_proc = default_num_proc() if num_proc is None else num_proc
    folder = work_dir / "sources"
    converted = [index for index, spec in enumerate(recipe.sources) if spec.converter != RECORDS_CONVERTER]
    shards = dict(zip(converted, ordered_map(_convert_task, converted,
                                             num_proc=max(min(num_proc, len(converted)), 1),
                                             context=(recipe, folder, on_error, progress),
                                             prefetch=1)))
    for index, spec in enumerate(recipe.sources):  # record files: one file at a time, its lines in parallel
        if index not in shards:
            shards[index] = _convert_source(spec, folder, spec.on_error or on_error, progress, num_proc)
    shards = [shards[index] for index in range(len(recipe.sources))]
    benchmark_files = [Path(spec.path) for spec in recipe.decontaminate.benchmarks]
    key = _digest([[shard["key"] for shard in shards], dataclasses.asdict(recipe.decontaminate),
                   dataclasses.asdict(recipe.dedup), dataclasses.asdict(recipe.mix), recipe.seed,
                   [[spec.name, spec.weight, spec.on_error] for spec in recipe.sources],
                   [_content_hash(p) for p in benchmark_files], on_error, include_unreviewed,
                   _FORMAT_VERSION])
    clean_path = work_dir / f"clean-{key}.jsonl"
    manifest_path = work_dir / f"clean-{key}.json"
    source_rejects = [Path(shard["rejects"]) for shard in shards if shard["rejects"]]
    if manifest_path.is_file():
        logger.info("clean stage %s is up to date, skipping it", key)
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = _clean(recipe, shards, work_dir, key, on_error, progress, include_unreviewed, num_proc)
        write_json(manifest_path, manifest)
        _remove_stale(work_dir, "clean", key)
    rejects = source_rejects + [work_dir / f"clean-{key}.rejects.jsonl"]
    return Prepared(recipe, work_dir, key, clean_path, manifest["plan"], manifest["ranges"],
                    {name: Counts(**counts) for name, counts in manifest["counts"].items()}, rejects,
                    manifest["review"])


def iter_source(recipe: DataRecipe, spec: SourceSpec, *, sources_dir: str | os.PathLike | None = None,
                on_error=None) -> Iterator[dict]:
    """Stream the schema records of one recipe source (converted, or read for ``converter: records``)."""
    spec = recipe.rooted(sources_dir).sources[recipe.sources.index(spec)]
    for line in _source_lines(spec, on_error, num_proc=1):
        yield json.loads(line)


def _convert_task(context: tuple, index: int) -> dict:
    recipe, folder, on_error, progress = context
    spec = recipe.sources[index]
    return _convert_source(spec, folder, spec.on_error or on_error, progress)


def _convert_source(spec: SourceSpec, folder: Path, on_error: str, progress: bool, num_proc: int = 1) -> dict:
    """Convert one rooted source into a cached JSON Lines shard under ``folder``; return its manifest."""
    files = [Path(spec.path), *(Path(value) for value in spec.files.values())]
    key = _digest([spec.converter, spec.language, spec.options, sorted(spec.files),
                   [_content_hash(p) for p in files],
                   on_error, _FORMAT_VERSION])
    stem = folder / f"{spec.name}-{key}"
    manifest_path = stem.with_suffix(".json")
    if manifest_path.is_file():
        logger.info("source %s: converted shard %s is up to date, skipping it", spec.name, stem.name)
        return json.loads(manifest_path.read_text())
    rejects_path = stem.with_suffix(".rejects.jsonl") if on_error == "skip" else None
    written = 0
    with RejectLog(rejects_path) as rejects, atomic_open(stem.with_suffix(".jsonl")) as handle:
        policy = on_error_for(on_error, rejects)
        for line in tqdm(_source_lines(spec, policy, num_proc),
                         desc=f"convert {spec.name}", unit="rec", disable=not progress):
            handle.write(line)
            written += 1
    manifest = {"name": spec.name, "key": key, "path": str(stem.with_suffix(".jsonl")), "written": written,
                "rejected": rejects.count, "rejects": str(rejects_path) if rejects_path else None}
    write_json(manifest_path, manifest)
    _remove_stale(folder, spec.name, key)
    return manifest


def _source_lines(spec: SourceSpec, policy, num_proc: int) -> Iterator[str]:
    """The records of one rooted source as JSON lines: converted from the original file, or, for
    ``converter: records``, validated in ``num_proc`` processes."""
    path = Path(spec.path)
    if spec.converter != RECORDS_CONVERTER:
        from .converters import convert

        files = {name: Path(value) for name, value in spec.files.items()}
        for record in convert(spec.converter, path, language=spec.language, on_error=policy, **spec.options,
                              **files):
            yield json.dumps(record, ensure_ascii=False) + "\n"
        return
    if not path.is_file():
        raise FileNotFoundError(f"source {spec.name!r}: {path} does not exist")
    lines = raw_lines(path)
    chunks = iter(lambda: list(itertools.islice(lines, 1000)), [])
    for results in ordered_map(read_records_lines, chunks, context=str(path), num_proc=num_proc):
        for line, error in results:
            if error is not None:
                report(error, policy)
            else:
                yield line


def _clean(recipe: DataRecipe, shards: list[dict], work_dir: Path, key: str, on_error: str, progress: bool,
           include_unreviewed: bool, num_proc: int) -> dict:
    index = None
    if recipe.decontaminate.benchmarks:
        skipped = RejectLog()
        spec = recipe.decontaminate
        items = load_benchmark_items(spec.benchmarks, Path, on_error=skipped)
        if skipped.count:
            logger.warning("decontamination: %d malformed benchmark rows could not be indexed (%s)",
                           skipped.count,
                           ", ".join(f"{n}× {reason}" for reason, n in skipped.reasons.most_common(3)))
        index = BenchmarkIndex(items, ngram=spec.ngram, threshold=spec.threshold,
                               max_item_frequency=spec.max_item_frequency)
    readers = OffsetReader([shard["path"] for shard in shards])
    dedup = Deduplicator(recipe.dedup.num_perm, recipe.dedup.threshold, recipe.dedup.shingle,
                         text_of=lambda ref: record_text(readers.record(*ref)))
    signer = Deduplicator(recipe.dedup.num_perm, recipe.dedup.threshold, recipe.dedup.shingle)  # for workers
    planner = RatioPlanner(recipe.seed, recipe.mix.ratio, recipe.mix.per_task)
    review = ReviewPolicy(include_unreviewed=include_unreviewed)
    counts: dict[str, dict] = {}
    ranges: dict[str, list[int]] = {}
    seen_ids: set[int] = set()
    line = 0
    with RejectLog(work_dir / f"clean-{key}.rejects.jsonl") as rejects, \
            atomic_open(work_dir / f"clean-{key}.jsonl") as clean, \
            atomic_open(work_dir / f"clean-{key}.decontamination.jsonl") as contaminated, \
            atomic_open(work_dir / f"clean-{key}.duplicates.jsonl") as duplicates, \
            OrderedPool(_clean_task, context=(recipe.seed, index, signer, review),
                        num_proc=num_proc) as workers:
        for shard_index, (spec, shard) in enumerate(zip(recipe.sources, shards)):
            policy = on_error_for(spec.on_error or on_error, rejects)
            tally = Counts(read=shard["written"] + shard["rejected"], rejected=shard["rejected"])
            start = line
            source_path = Path(spec.path)
            candidates = dedup.candidates
            results = _clean_results(workers, readers, shard_index, spec, source_path)
            for offset, raw, (status, result) in tqdm(results, desc=f"clean {spec.name}", unit="rec",
                                                      total=shard["written"], disable=not progress):
                if isinstance(status, RecordError):
                    tally.rejected += 1
                    report(status, policy)
                    continue
                if not review.count(status):
                    tally.excluded_review += 1
                    continue
                if result is None:
                    tally.dropped_weight += 1
                    continue
                record_id, found, signature = result
                if signature is not None:
                    digest, band_keys, shingles = signature
                    signature = Signature(digest, band_keys, np.frombuffer(shingles, dtype=np.uint32))
                if found is not None:
                    tally.decontaminated += 1
                    contaminated.write(_json_line(report_entry(json.loads(raw), found, index.ngram)))
                    continue
                # given the signature, check reads only the id: duplicates are never decoded here
                duplicate = dedup.check({"id": record_id}, signature=signature, ref=(shard_index, offset))
                if duplicate is not None:
                    if duplicate.kind == "exact":
                        tally.deduplicated_exact += 1
                    else:
                        tally.deduplicated_near += 1
                    duplicates.write(_json_line({"id": record_id, "source": spec.name, "kind": duplicate.kind,
                                                 "kept_id": duplicate.kept_id}))
                    continue
                record = json.loads(raw)
                id_hash = hash(record["id"])
                if id_hash in seen_ids:
                    tally.rejected += 1
                    report(RecordError("duplicate id (an earlier record with different content has it); make "
                                       "ids unique across the recipe's sources",
                                       path=spec.path, record=record["id"], field="id", raw=record), policy)
                    continue
                seen_ids.add(id_hash)
                clean.write(_json_line(record))
                planner.add(record)
                line += 1
            ranges[spec.name] = [start, line]
            tally.near_candidates = dedup.candidates - candidates
            counts[spec.name] = dataclasses.asdict(tally)
    readers.close()
    return {"key": key, "ranges": ranges, "counts": counts, "plan": planner.plan(),
            "review": review.summary()}


def _clean_results(workers: OrderedPool, readers: OffsetReader, shard_index: int, spec: SourceSpec,
                   source_path: Path) -> Iterator[tuple[int, bytes, tuple]]:
    """Yield ``(offset, line, result of _clean_task)`` for every line of a converted shard, in order."""
    sent: deque[list[tuple[int, bytes]]] = deque()

    def tasks():
        for chunk in readers.chunks(shard_index):
            sent.append(chunk)
            yield spec.weight, spec.name, str(source_path), [line for _, line in chunk]

    for results in workers.map(tasks()):
        for (offset, line), result in zip(sent.popleft(), results):
            yield offset, line, result


def _clean_task(context: tuple, task: tuple) -> list:
    """The per-record clean work of one chunk: ``(review status, outcome)`` per line.

    The status is a `bimedix.data.review_policy` status, or the `RecordError` of a translation the policy
    cannot place; the outcome is `None` when the policy leaves the record out or it is sampled out by weight,
    else ``(record id, benchmark match or None, dedup signature or None)``. The main process counts the
    statuses (`ReviewPolicy.count`) and makes every keep/drop decision in order.
    """
    seed, index, signer, review = context
    weight, name, source_path, lines = task
    results = []
    for line in lines:
        record = json.loads(line)
        try:
            status = review.status(record, path=source_path)
        except RecordError as err:
            results.append((RecordError(err.reason, path=err.path, record=err.record, field=err.field,
                                        raw=record),
                            None))
            continue
        if not review.uses(status) or not keep_by_weight(seed, record["id"], weight, name):
            results.append((status, None))
            continue
        text = record_text(record)
        found = index.match(text, normalized=True) if index is not None else None
        signature = None if found is not None else signer.signature(text)
        if signature is not None:  # raw bytes pickle far cheaper than a numpy array: one per record
            signature = (signature.digest, signature.band_keys, signature.shingles.tobytes())
        results.append((status, (record["id"], found, signature)))
    return results


class _ShardWriter:
    """Writes one language × task group as Parquet shards of ``shard_size`` rows under ``.work/shards``,
    atomically, each with a stats sidecar."""

    def __init__(self, output: OutputFolder, group: tuple[str, str], shard_size: int, tokenizer):
        self.output = output
        self.group = group
        self.prefix = f"{group[0]}-{group[1]}"
        self.shard_size = shard_size
        self.tokenizer = tokenizer
        self.stats = DataStats()
        self.index = 0
        self.rows = 0
        self.written = 0
        self.skipped = 0
        self._buffer: list[dict] = []
        self._shard_stats = DataStats()
        self._context = None
        self._writer = None
        self._done = None

    def add(self, record: dict) -> None:
        if self._done is None:
            self._done = self._sidecar().is_file() and self._path().is_file()
        self.rows += 1
        if not self._done:
            self._buffer.append(record)
            if len(self._buffer) >= _ROW_GROUP:
                self._flush()
        if self.rows == self.shard_size:
            self._close_shard()

    def finish(self) -> None:
        if self.rows:
            self._close_shard()

    def abort(self) -> None:
        if self._context is not None:
            import sys

            self._writer.close()  # release the file; the temporary file is then removed, never renamed
            self._context.__exit__(*sys.exc_info())
            self._context = self._writer = None

    def link_into(self, dataset: OutputFolder) -> None:
        """Link (or copy) the finished shards into ``dataset`` as
        ``data/<language>/<task>/train-NNNNN.parquet``."""
        for index in range(self.index):
            link_or_copy(self._path(index), dataset.path("data", *self.group, f"train-{index:05d}.parquet"))

    def _path(self, index: int | None = None) -> Path:
        """The Parquet shard, named ``.shard`` so that nothing globbing ``*.parquet`` in the output (`push
        dataset`, a folder upload) picks up this second name of ``data/``'s files."""
        return self._sidecar(index).with_suffix(".shard")

    def _sidecar(self, index: int | None = None) -> Path:
        index = self.index if index is None else index
        return self.output.root / WORK_DIR / "shards" / f"{self.prefix}-{index:05d}.json"

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._context = atomic_open(self.output.path(WORK_DIR, "shards", self._path().name), "wb")
            self._writer = pq.ParquetWriter(self._context.__enter__(), FEATURES.arrow_schema)
        if not self._buffer:
            return
        self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=FEATURES.arrow_schema))
        self._shard_stats.update(self._buffer, self.tokenizer)
        self._buffer = []

    def _close_shard(self) -> None:
        if self._done:
            stats = DataStats.from_dict(json.loads(self._sidecar().read_text()))
            self.skipped += 1
        else:
            self._flush()
            self._writer.close()
            self._context.__exit__(None, None, None)
            self._context = self._writer = None
            stats = self._shard_stats
            write_json(self.output.path(WORK_DIR, "shards", self._sidecar().name), stats.to_dict())
            self.written += 1
        self.stats.merge(stats)
        self._shard_stats = DataStats()
        self.index += 1
        self.rows = 0
        self._done = None


def _write_reports(output: OutputFolder, recipe: DataRecipe, prepared: Prepared, total: Counts,
                   per_source: dict[str, Counts], stats: DataStats, mix: dict) -> None:
    work = prepared.work_dir
    for name in ("decontamination", "duplicates"):
        _copy(work / f"clean-{prepared.key}.{name}.jsonl", output.path(f"{name}.jsonl"))
    with atomic_open(output.path("rejects.jsonl")) as handle:
        for path in prepared.rejects:
            if path.is_file():
                with open(path, encoding="utf-8") as rejects:
                    shutil.copyfileobj(rejects, handle)
    summary = {"recipe": recipe.name, "counts": {**dataclasses.asdict(total), "balanced": total.balanced},
               "sources": {name: dataclasses.asdict(counts) for name, counts in per_source.items()},
               "ratio_plan": prepared.plan, "review": prepared.review, "composition": mix,
               "build": {"description": recipe.description.strip(),
                         "recipe_file": Path(recipe.recipe_path or "").name,
                         "seed": recipe.seed, "mix": _mix_words(recipe)},
               "decontamination": {"threshold": recipe.decontaminate.threshold,
                                   "ngram": recipe.decontaminate.ngram,
                                   "removed": _decontamination_summary(output.root)},
               **stats.to_dict()}
    write_json(output.path("stats.json"), summary)
    with atomic_open(output.path("stats.md")) as handle:
        handle.write(stats.to_markdown())
    with atomic_open(output.path("stats.png"), "wb") as handle:
        stats.plot(handle)
    with atomic_open(output.path("README.md")) as handle:  # `bimedix build-data` adds the prose card
        handle.write(configs_readme(dataset_configs(stats)))


def dataset_configs(stats: DataStats) -> list[dict]:
    """The ``configs:`` of a built folder's README (`CONFIGS` that hold records; ``all`` is the default)."""
    return [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{lang}/{task}/*.parquet"}],
             **({"default": True} if name == "all" else {})} for name, (lang, task) in CONFIGS.items()
            if stats.cell(None if task == "*" else task, None if lang == "*" else lang).samples]


def _mix_words(recipe: DataRecipe) -> str:
    if recipe.mix.ratio is None:
        return ("every clean record kept: English is not down-sampled, Arabic is what was translated and "
                "passed review")
    per_task = " per task" if recipe.mix.per_task else ""
    return f"Arabic:English {recipe.mix.ar_en_ratio} by samples{per_task}, met by down-sampling"


def _decontamination_summary(output: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, entry in iter_jsonl(output / "decontamination.jsonl"):
        counts[entry["benchmark"]] = counts.get(entry["benchmark"], 0) + 1
    return counts


def _remove_stale(folder: Path, stem: str, key: str) -> None:
    """Delete the cache files of ``stem`` made under other keys (inputs or settings that have changed)."""
    pattern = re.compile(rf"{re.escape(stem)}-(?!{key})[0-9a-f]{{16}}\..*")
    for path in folder.iterdir():
        if pattern.fullmatch(path.name):
            path.unlink()


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, atomic_open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer)


def _json_line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _digest(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _content_hash(path: Path) -> str:
    """Hash a file's bytes, or a folder's files (names and bytes), so edited inputs are re-converted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (check the recipe path and --sources)")
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
