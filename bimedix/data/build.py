"""``bimedix build-data``: original source files → converted, cleaned, mixed BiMed1.3M-style dataset.

Stages, each cached under ``<output>/.work`` and skipped when its inputs have not changed:

1. **convert** every recipe source with `bimedix.data.converters.convert` (or read schema JSON Lines
   for ``converter: records``) into ``.work/sources/<name>-<key>.jsonl``; the key hashes the source
   file(s), converter, options and on-error policy;
2. **clean**: sample by source weight, drop records that overlap a benchmark (`decontam`), exact and
   near duplicates (`dedup`) and duplicate ids, in recipe order, into ``.work/clean-<key>.jsonl``, and
   plan the Arabic:English ratio per task (`mixing`);
3. **write** the records the plan keeps as Parquet shards ``data/<language>/<task>/train-NNNNN.parquet``
   (`bimedix.data.schema.FEATURES`), each written atomically with its statistics in a sidecar, so a
   re-run skips finished shards; then ``stats.{json,md,png}``, ``decontamination.jsonl``,
   ``duplicates.jsonl``, ``rejects.jsonl`` and a ``README.md`` whose ``configs:`` (``all``, ``en``,
   ``ar``, ``mcqa``, ``qa``, ``chat``; a config with no rows is left out, since ``datasets`` cannot load an
   empty split) make ``datasets.load_dataset(output, "ar", split="train")`` work.

The counts always balance: ``read = written + rejected + deduplicated + decontaminated +
dropped_weight + dropped_ratio``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .decontam import BenchmarkIndex, load_benchmark_items, report_entry
from .dedup import Deduplicator, record_text
from .io import atomic_open, iter_jsonl, write_json
from .mixing import RatioPlanner, keep_by_weight, keeps
from .outputs import OutputFolder
from .recipe import RECORDS_CONVERTER, DataRecipe, SourceSpec, load_data_recipe
from .rejects import RejectLog, on_error_for, report
from .schema import FEATURES, LANGUAGES, TASKS, RecordError, validate_record
from .stats import DataStats

logger = logging.getLogger(__name__)

CONFIGS = {"all": ("*", "*"), "en": ("en", "*"), "ar": ("ar", "*"), "mcqa": ("*", "mcqa"), "qa": ("*", "qa"),
           "chat": ("*", "chat")}
WORK_DIR = ".work"
_FORMAT_VERSION = "1"
_ROW_GROUP = 1000


@dataclass
class Counts:
    """Where every read record went. ``balanced`` checks the equation the CLI prints."""

    read: int = 0
    rejected: int = 0
    dropped_weight: int = 0
    decontaminated: int = 0
    deduplicated_exact: int = 0
    deduplicated_near: int = 0
    dropped_ratio: int = 0
    written: int = 0

    @property
    def deduplicated(self) -> int:
        return self.deduplicated_exact + self.deduplicated_near

    @property
    def balanced(self) -> bool:
        return self.read == (self.written + self.rejected + self.deduplicated + self.decontaminated
                             + self.dropped_weight + self.dropped_ratio)

    def add(self, other: Counts) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def equation(self) -> str:
        """``read N = written + rejected + deduplicated + decontaminated + dropped (...)`` with numbers."""
        return (f"read {self.read:,} = written {self.written:,} + rejected {self.rejected:,} + deduplicated "
                f"{self.deduplicated:,} (exact {self.deduplicated_exact:,}, near {self.deduplicated_near:,}) + "
                f"decontaminated {self.decontaminated:,} + dropped by weight {self.dropped_weight:,} + dropped "
                f"for the AR:EN ratio {self.dropped_ratio:,}" + ("" if self.balanced else "  [DOES NOT BALANCE]"))


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


def build_data(recipe: DataRecipe | str | os.PathLike, output: str | os.PathLike, *,
               sources_dir: str | os.PathLike | None = None, on_error: str = "raise", tokenizer=None,
               progress: bool = True, overwrite: bool = False) -> BuildResult:
    """Build a BiMed1.3M-style dataset folder from a data recipe.

    The folder is an `bimedix.data.outputs.OutputFolder`: no input is ever written or deleted, and a rebuild
    deletes only the files an earlier build recorded writing there.

    Args:
        recipe (`DataRecipe | str | os.PathLike`): a recipe, a YAML path, or a shipped recipe name (``mini``).
        output (`str | os.PathLike`): the dataset folder (created; re-running resumes).
        sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        on_error (`str`, *optional*, defaults to ``"raise"``): ``"raise"`` stops at the first bad record
            (file:record:field); ``"skip"`` sets it aside in ``rejects.jsonl`` and goes on.
        tokenizer (`PreTrainedTokenizerFast`, *optional*): for the statistics; defaults to Mixtral's.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
        overwrite (`bool`, *optional*, defaults to `False`): allow a non-empty ``output`` that no build made
            (its other files are kept).

    Returns:
        `BuildResult`: counts (balanced), per-source counts and statistics.

    Raises:
        `bimedix.data.outputs.OutputError`: ``output`` is or holds an input it would overwrite, or is a foreign
            non-empty folder without ``overwrite``.
    """
    if not isinstance(recipe, DataRecipe):
        recipe = load_data_recipe(recipe)
    output = Path(output)
    folder = OutputFolder(output, "build-data", inputs=recipe_inputs(recipe, sources_dir), overwrite=overwrite)
    work_dir = folder.folder(WORK_DIR)
    prepared = prepare(recipe, work_dir, sources_dir=sources_dir, on_error=on_error, progress=progress)
    if tokenizer is None:
        from .tokenizer import load_mixtral_tokenizer

        tokenizer = load_mixtral_tokenizer()
    build_key = _digest([prepared.key, recipe.shard_size, _FORMAT_VERSION])
    marker = work_dir / "build.json"
    if not marker.is_file() or json.loads(marker.read_text())["key"] != build_key:
        folder.remove_tree("data")
        folder.remove_tree(WORK_DIR, "shards")
        write_json(folder.path(WORK_DIR, marker.name), {"key": build_key})
    per_source = {name: dataclasses.replace(counts) for name, counts in prepared.counts.items()}
    stats = DataStats()
    writers = {group: _ShardWriter(folder, group, recipe.shard_size, tokenizer)
               for group in ((language, task) for language in LANGUAGES for task in TASKS)}
    dropped: Counter[str] = Counter()
    try:
        for name, record in tqdm(prepared.iter_records(dropped), desc="write", unit="rec", disable=not progress):
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
    _write_reports(folder, recipe, prepared, total, per_source, stats)
    logger.info("%s", total.equation())
    return BuildResult(output, total, per_source, stats, sum(w.written for w in writers.values()),
                       sum(w.skipped for w in writers.values()))


def recipe_inputs(recipe: DataRecipe, sources_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Label → path of every file a recipe reads: the recipe itself, each source's files and benchmarks."""
    inputs = {"--recipe": Path(recipe.recipe_path)} if recipe.recipe_path else {}
    for kind, specs in (("source", recipe.sources), ("benchmark", recipe.decontaminate.benchmarks)):
        for spec in specs:
            for key, path in [("path", spec.path), *spec.files.items()]:
                inputs[f"{kind} {spec.name!r} {key}"] = recipe.resolve(path, sources_dir)
    return inputs


def prepare(recipe: DataRecipe, work_dir: str | os.PathLike, *, sources_dir: str | os.PathLike | None = None,
            on_error: str = "raise", progress: bool = True) -> Prepared:
    """Run the convert and clean stages (cached in ``work_dir``) and plan the mixture.

    Args:
        recipe (`DataRecipe`): the recipe.
        work_dir (`str | os.PathLike`): where converted and cleaned records are cached.
        sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        on_error (`str`, *optional*, defaults to ``"raise"``): ``"raise"`` or ``"skip"``.
        progress (`bool`, *optional*, defaults to `True`): show progress bars.

    Returns:
        `Prepared`: the cleaned records, the ratio plan and the counts so far.
    """
    on_error_for(on_error, RejectLog())  # validates the policy name
    work_dir = Path(work_dir)
    wanted = [(spec.name, path) for spec in [*recipe.sources, *recipe.decontaminate.benchmarks]
              for path in [spec.path, *spec.files.values()]]
    missing = [f"{name}: {recipe.resolve(path, sources_dir)}" for name, path in wanted
               if not recipe.resolve(path, sources_dir).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input(s) of recipe {recipe.name!r} do not exist under "
                                f"{recipe.root(sources_dir)} (check the paths and --sources):\n  " + "\n  ".join(missing))
    shards = [_convert_source(recipe, spec, work_dir / "sources", sources_dir, spec.on_error or on_error, progress)
              for spec in recipe.sources]
    benchmark_files = [recipe.resolve(spec.path, sources_dir) for spec in recipe.decontaminate.benchmarks]
    key = _digest([[shard["key"] for shard in shards], dataclasses.asdict(recipe.decontaminate),
                   dataclasses.asdict(recipe.dedup), dataclasses.asdict(recipe.mix), recipe.seed,
                   [[spec.name, spec.weight, spec.on_error] for spec in recipe.sources],
                   [_content_hash(p) for p in benchmark_files], on_error, _FORMAT_VERSION])
    clean_path = work_dir / f"clean-{key}.jsonl"
    manifest_path = work_dir / f"clean-{key}.json"
    source_rejects = [Path(shard["rejects"]) for shard in shards if shard["rejects"]]
    if manifest_path.is_file():
        logger.info("clean stage %s is up to date, skipping it", key)
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = _clean(recipe, shards, work_dir, key, sources_dir, on_error, progress)
        write_json(manifest_path, manifest)
        _remove_stale(work_dir, "clean", key)
    rejects = source_rejects + [work_dir / f"clean-{key}.rejects.jsonl"]
    return Prepared(recipe, work_dir, key, clean_path, manifest["plan"], manifest["ranges"],
                    {name: Counts(**counts) for name, counts in manifest["counts"].items()}, rejects)


def iter_source(recipe: DataRecipe, spec: SourceSpec, *, sources_dir: str | os.PathLike | None = None,
                on_error=None) -> Iterator[dict]:
    """Stream the schema records of one recipe source (converted, or read for ``converter: records``)."""
    path = recipe.resolve(spec.path, sources_dir)
    if spec.converter == RECORDS_CONVERTER:
        if not path.is_file():
            raise FileNotFoundError(f"source {spec.name!r}: {path} does not exist")
        for line, obj in iter_jsonl(path, on_error=on_error):
            try:
                record = validate_record(obj, path=str(path), line=line)
            except RecordError as err:
                report(RecordError(err.reason, path=err.path, record=err.record, field=err.field, raw=obj), on_error)
                continue
            yield record
        return
    from .converters import convert

    files = {name: recipe.resolve(value, sources_dir) for name, value in spec.files.items()}
    yield from convert(spec.converter, path, language=spec.language, on_error=on_error, **spec.options, **files)


def _convert_source(recipe: DataRecipe, spec: SourceSpec, folder: Path, sources_dir, on_error: str,
                    progress: bool) -> dict:
    path = recipe.resolve(spec.path, sources_dir)
    files = [path, *(recipe.resolve(value, sources_dir) for value in spec.files.values())]
    key = _digest([spec.converter, spec.language, spec.options, sorted(spec.files), [_content_hash(p) for p in files],
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
        for record in tqdm(iter_source(recipe, spec, sources_dir=sources_dir, on_error=policy),
                           desc=f"convert {spec.name}", unit="rec", disable=not progress):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    manifest = {"name": spec.name, "key": key, "path": str(stem.with_suffix(".jsonl")), "written": written,
                "rejected": rejects.count, "rejects": str(rejects_path) if rejects_path else None}
    write_json(manifest_path, manifest)
    _remove_stale(folder, spec.name, key)
    return manifest


def _clean(recipe: DataRecipe, shards: list[dict], work_dir: Path, key: str, sources_dir, on_error: str,
           progress: bool) -> dict:
    index = None
    if recipe.decontaminate.benchmarks:
        skipped = RejectLog()
        spec = recipe.decontaminate
        items = load_benchmark_items(spec.benchmarks, lambda path: recipe.resolve(path, sources_dir), on_error=skipped)
        if skipped.count:
            logger.warning("decontamination: %d malformed benchmark rows could not be indexed (%s)", skipped.count,
                           ", ".join(f"{n}× {reason}" for reason, n in skipped.reasons.most_common(3)))
        index = BenchmarkIndex(items, ngram=spec.ngram, threshold=spec.threshold,
                               max_item_frequency=spec.max_item_frequency)
    dedup = Deduplicator(recipe.dedup.num_perm, recipe.dedup.threshold, recipe.dedup.shingle)
    planner = RatioPlanner(recipe.seed, recipe.mix.ratio, recipe.mix.per_task)
    counts: dict[str, dict] = {}
    ranges: dict[str, list[int]] = {}
    seen_ids: set[int] = set()
    line = 0
    with RejectLog(work_dir / f"clean-{key}.rejects.jsonl") as rejects, \
            atomic_open(work_dir / f"clean-{key}.jsonl") as clean, \
            atomic_open(work_dir / f"clean-{key}.decontamination.jsonl") as contaminated, \
            atomic_open(work_dir / f"clean-{key}.duplicates.jsonl") as duplicates:
        for spec, shard in zip(recipe.sources, shards):
            policy = on_error_for(spec.on_error or on_error, rejects)
            tally = Counts(read=shard["written"] + shard["rejected"], rejected=shard["rejected"])
            start = line
            for _, record in tqdm(iter_jsonl(shard["path"]), desc=f"clean {spec.name}", unit="rec",
                                  total=shard["written"], disable=not progress):
                if not keep_by_weight(recipe.seed, record["id"], spec.weight, spec.name):
                    tally.dropped_weight += 1
                    continue
                text = record_text(record)
                found = index.match(text, normalized=True) if index is not None else None
                if found is not None:
                    tally.decontaminated += 1
                    contaminated.write(_json_line(report_entry(record, found, index.ngram)))
                    continue
                duplicate = dedup.check(record, text)
                if duplicate is not None:
                    if duplicate.kind == "exact":
                        tally.deduplicated_exact += 1
                    else:
                        tally.deduplicated_near += 1
                    duplicates.write(_json_line({"id": record["id"], "source": spec.name, "kind": duplicate.kind,
                                                 "kept_id": duplicate.kept_id}))
                    continue
                id_hash = hash(record["id"])
                if id_hash in seen_ids:
                    tally.rejected += 1
                    report(RecordError("duplicate id (an earlier record with different content has it); make ids "
                                       "unique across the recipe's sources", path=str(recipe.resolve(spec.path,
                                       sources_dir)), record=record["id"], field="id", raw=record), policy)
                    continue
                seen_ids.add(id_hash)
                clean.write(_json_line(record))
                planner.add(record)
                line += 1
            ranges[spec.name] = [start, line]
            counts[spec.name] = dataclasses.asdict(tally)
    return {"key": key, "ranges": ranges, "counts": counts, "plan": planner.plan()}


class _ShardWriter:
    """Writes one language × task group as Parquet shards of ``shard_size`` rows, atomically, with stats."""

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

    def _path(self) -> Path:
        return self.output.root / "data" / self.group[0] / self.group[1] / self._name()

    def _name(self) -> str:
        return f"train-{self.index:05d}.parquet"

    def _sidecar(self) -> Path:
        return self.output.root / WORK_DIR / "shards" / f"{self.prefix}-{self.index:05d}.json"

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._context = atomic_open(self.output.path("data", *self.group, self._name()), "wb")
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
                   per_source: dict[str, Counts], stats: DataStats) -> None:
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
               "ratio_plan": prepared.plan, **stats.to_dict()}
    write_json(output.path("stats.json"), summary)
    with atomic_open(output.path("stats.md")) as handle:
        handle.write(stats.to_markdown())
    with atomic_open(output.path("stats.png"), "wb") as handle:
        stats.plot(handle)
    with atomic_open(output.path("README.md")) as handle:
        handle.write(render_readme(recipe, total, per_source, stats, _decontamination_summary(output.root)))


def render_readme(recipe: DataRecipe, total: Counts, per_source: dict[str, Counts], stats: DataStats,
                  decontamination: dict[str, int]) -> str:
    """The dataset README: YAML ``configs:`` for `datasets.load_dataset`, then statistics and provenance."""
    import yaml

    from .converters import SOURCE_INFO

    configs = [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{lang}/{task}/*.parquet"}],
                **({"default": True} if name == "all" else {})} for name, (lang, task) in CONFIGS.items()
               if stats.cell(None if task == "*" else task, None if lang == "*" else lang).samples]
    header = {"pretty_name": recipe.name, "language": list(LANGUAGES), "license": "other",
              "task_categories": ["question-answering", "text-generation"], "tags": ["medical", "bimedix"],
              "configs": configs}
    rows = []
    for spec in recipe.sources:
        info = SOURCE_INFO.get(spec.converter)
        counts = per_source[spec.name]
        rows.append(f"| {spec.name} | {spec.converter} | {info.license if info else 'see the source'} | "
                    f"{counts.read:,} | {counts.written:,} |")
    contamination = "\n".join(f"- {name}: {n:,} records removed" for name, n in decontamination.items()) or "- none"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n# {recipe.name}\n\n"
        f"{recipe.description.strip()}\n\nBuilt with `bimedix build-data` from recipe `{Path(recipe.recipe_path or '').name}` "
        f"(seed {recipe.seed}, Arabic:English {recipe.mix.ar_en_ratio} by samples"
        f"{' per task' if recipe.mix.per_task else ''}).\n\n"
        "```python\nfrom datasets import load_dataset\n\n"
        "data = load_dataset(\"path/to/this/folder\", \"ar\", split=\"train\")  # all, en, ar, mcqa, qa, chat\n```\n\n"
        f"## Statistics (Mixtral-8x7B tokenizer)\n\n{stats.to_markdown()}\n![statistics](stats.png)\n\n"
        f"## Counts\n\n{total.equation()}\n\n| source | converter | licence | read | written |\n|---|---|---|---:|---:|\n"
        + "\n".join(rows) + "\n\n"
        f"## Decontamination\n\nRecords holding at least {recipe.decontaminate.threshold:.0%} of a benchmark item's "
        f"word {recipe.decontaminate.ngram}-grams (question and options, Arabic-normalised; see bimedix "
        "`docs/data-pipeline.md`) were removed; `decontamination.jsonl` names both sides of each match.\n\n"
        f"{contamination}\n\n## Licences\n\nEach record keeps its source's licence in `license`. Check them before "
        "redistributing: several sources state no licence (research use only).\n"
    )


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
