"""Data recipes: the YAML files under ``recipes/data/`` that drive ``bimedix build-data``.

A recipe names its sources (converter, file, options, sampling weight), the benchmarks to
decontaminate against, the near-duplicate settings and the language mix (with the composition targets the
build reports against). YAML keys map
one-to-one onto the dataclasses below; an unknown key is an error that names the file and the key.

Paths are relative to ``sources_dir``, which is itself relative to the recipe file (``--sources``
overrides it). A path (or ``sources_dir``) of the form ``bimedix:<path>`` or ``recipes:<path>`` points
inside the installed package (`bimedix.resources.resource_path`), so a recipe over the bundled data
works from a wheel with no checkout around it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.conventions import LANGUAGES, ON_ERROR_POLICIES
from ..core.outputs import safe_name
from ..resources import RESOURCE_PREFIXES, resolve_resource
from .schema import TASKS

RECORDS_CONVERTER = "records"
BENCHMARK_READERS = ("pubmedqa", "medmcqa", "medqa", "mmlu", "medarabench")


@dataclass
class SourceSpec:
    """One input of the mixture: an original source file and how to convert it."""

    name: str = field(metadata={"help": "Unique name of this input, used in "
                                        "counts, reports and cache files."})
    path: str = field(metadata={"help": "File or folder, relative to `sources_dir`."})
    converter: str | None = field(default=None, metadata={
        "help": "A `bimedix convert` source name (defaults to `name`), or `records` for files already in the "
                "bimedix schema (translations, generated chats)."})
    language: str | None = field(default=None, metadata={"help": "Passed to the converter: `en` or `ar`."})
    weight: float = field(default=1.0, metadata={
        "help": "Fraction of this source's records to keep, in "
                "(0, 1], chosen by a seeded hash of the record id."})
    options: dict[str, Any] = field(default_factory=dict,
                                    metadata={"help": "Extra keyword arguments of the converter."})
    on_error: str | None = field(default=None, metadata={
        "help": "`raise` or `skip` for this source only, overriding `--on-error` (e.g. `skip` for a source "
                "with known corrupted upstream rows); rejected records "
                "still go to the rejects file and the counts."})
    files: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Extra file arguments (e.g. PubMedQA `ground_truth`), relative to `sources_dir`."})

    def __post_init__(self):
        safe_name(self.name, "source name")  # it names cache files under OUTPUT/.work
        self.converter = self.converter or self.name
        if self.on_error not in (None, *ON_ERROR_POLICIES):
            raise ValueError(f"source {self.name!r}: on_error {self.on_error!r} must be `raise` or `skip`")
        if self.language is not None and self.language not in LANGUAGES:
            raise ValueError(f"source {self.name!r}: language "
                             f"{self.language!r} is not one of {list(LANGUAGES)}")
        if not 0 < float(self.weight) <= 1:
            raise ValueError(f"source {self.name!r}: weight {self.weight!r} "
                             "must be in (0, 1]; bimedix samples down "
                             "but never repeats records (train for more epochs instead)")
        self.weight = float(self.weight)


@dataclass
class BenchmarkSpec:
    """An evaluation benchmark whose items must not appear in the training data."""

    name: str = field(metadata={"help": "Name used in the decontamination report, e.g. `medqa-test`."})
    reader: str = field(metadata={"help": f"A `bimedix.data.mcqa` reader: one of {list(BENCHMARK_READERS)}."})
    path: str = field(metadata={"help": "File or folder, relative to `sources_dir`."})
    language: str | None = field(default=None, metadata={"help": "Passed to the reader: `en` or `ar`."})
    options: dict[str, Any] = field(default_factory=dict,
                                    metadata={"help": "Extra keyword arguments of the reader."})
    files: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Extra file arguments (e.g. PubMedQA `ground_truth`), relative to `sources_dir`."})

    def __post_init__(self):
        if self.reader not in BENCHMARK_READERS:
            raise ValueError(f"benchmark {self.name!r}: unknown reader {self.reader!r}; "
                             f"expected one of {list(BENCHMARK_READERS)}")


@dataclass
class DecontamSpec:
    """N-gram overlap test against the evaluation benchmarks."""

    ngram: int = field(default=8, metadata={"help": "Words per n-gram (after `normalize_for_match`)."})
    threshold: float = field(default=0.5, metadata={
        "help": "Remove a record holding at least this fraction of a benchmark item's n-grams."})
    max_item_frequency: int = field(default=10, metadata={
        "help": "Ignore n-grams found in more benchmark items than this (boilerplate such as "
                "'which of the following is the most likely')."})
    benchmarks: list[BenchmarkSpec] = field(default_factory=list, metadata={"help": "The benchmark files."})

    def __post_init__(self):
        if self.ngram < 1 or not 0 < self.threshold <= 1 or self.max_item_frequency < 1:
            raise ValueError(f"decontaminate: need ngram >= 1, 0 < threshold <= 1 and max_item_frequency >= "
                             f"1 (got {self.ngram}, {self.threshold}, {self.max_item_frequency})")


@dataclass
class DedupSpec:
    """Exact and MinHash near-duplicate removal."""

    num_perm: int = field(default=64, metadata={"help": "MinHash permutations."})
    threshold: float = field(default=0.8,
                             metadata={"help": "Jaccard similarity above which records are duplicates."})
    shingle: int = field(default=3, metadata={"help": "Words per shingle."})

    def __post_init__(self):
        if self.num_perm < 2 or not 0 < self.threshold < 1 or self.shingle < 1:
            raise ValueError(f"dedup: need num_perm >= 2, 0 < threshold < 1 and shingle >= 1 "
                             f"(got {self.num_perm}, {self.threshold}, {self.shingle})")


@dataclass
class MixSpec:
    """How the languages are combined, and the composition the build is measured against.

    By default every record that survives cleaning is kept: English is never down-sampled, and the Arabic
    share comes from how much was translated (`bimedix.data.selection`), as in the paper. ``ar_en_ratio``
    is the explicit alternative: sample the larger language down to a fixed Arabic:English ratio.
    """

    ar_en_ratio: str | None = field(default=None, metadata={
        "help": "Arabic:English samples, e.g. `1:2`, met by down-sampling the larger language; unset "
                "(default) keeps every clean record."})
    per_task: bool = field(default=True, metadata={"help": "With `ar_en_ratio`: meet it within each task."})
    targets: dict[str, dict[str, int]] = field(default_factory=dict, metadata={
        "help": "Samples the build is compared against, `{task or all: {en, ar or all: n}}` (e.g. the "
                "paper's Fig. 3); reported, never enforced."})
    target_tokens: int | None = field(default=None, metadata={"help": "Training tokens to compare against."})

    def __post_init__(self):
        self.ratio  # validates
        for task, row in self.targets.items():
            if task not in (*TASKS, "all") or not isinstance(row, dict):
                raise ValueError(f"mix.targets: key {task!r} must be one "
                                 f"of {[*TASKS, 'all']} and map languages "
                                 "to sample counts")
            for language, value in row.items():
                if language not in (*LANGUAGES, "all") or not isinstance(value, int) or value < 0:
                    raise ValueError(f"mix.targets.{task}.{language}: need a language in "
                                     f"{[*LANGUAGES, 'all']} and a count >= 0, got {value!r}")

    @property
    def ratio(self) -> float | None:
        """Arabic samples per English sample, or ``None`` when no ratio is imposed."""
        if self.ar_en_ratio is None:
            return None
        try:
            arabic, english = (float(part) for part in str(self.ar_en_ratio).split(":"))
        except ValueError:
            raise ValueError(f"mix.ar_en_ratio {self.ar_en_ratio!r} must look like `1:2`") from None
        if arabic <= 0 or english <= 0:
            raise ValueError(f"mix.ar_en_ratio {self.ar_en_ratio!r}: both sides must be positive")
        return arabic / english


@dataclass
class DataRecipe:
    """A whole ``build-data`` recipe."""

    name: str = field(metadata={"help": "Dataset name, used in the README."})
    sources: list[SourceSpec] = field(metadata={"help": "The inputs, in priority order "
                                                        "(earlier wins a duplicate)."})
    sources_dir: str = field(default=".", metadata={
        "help": "Root of the source paths, relative to the recipe "
                "file; `bimedix:<path>` points into the package."})
    seed: int = field(default=42, metadata={"help": "Seed of every sampling decision."})
    mix: MixSpec = field(default_factory=MixSpec, metadata={"help": "Language mix and composition targets."})
    dedup: DedupSpec = field(default_factory=DedupSpec, metadata={"help": "Near-duplicate settings."})
    decontaminate: DecontamSpec = field(default_factory=DecontamSpec,
                                        metadata={"help": "Benchmark overlap test."})
    shard_size: int = field(default=100_000, metadata={"help": "Rows per Parquet shard."})
    description: str = field(default="", metadata={"help": "One paragraph for the dataset README."})
    recipe_path: str | None = field(default=None, metadata={"help": "Set by `load_data_recipe`."})

    def __post_init__(self):
        names = [source.name for source in self.sources]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"recipe {self.name!r}: source names must be unique, repeated: {duplicated}")
        if not self.sources:
            raise ValueError(f"recipe {self.name!r}: `sources` is empty")
        if self.shard_size < 1:
            raise ValueError(f"recipe {self.name!r}: shard_size must be >= 1")

    def resolve(self, path: str, sources_dir: str | os.PathLike | None = None) -> Path:
        """Return the absolute path of a source or benchmark ``path`` under the sources root.

        Args:
            path (`str`): relative to the root (absolute paths are kept).
            sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        """
        if path.startswith(RESOURCE_PREFIXES):
            return resolve_resource(path)
        return self.root(sources_dir) / path

    def rooted(self, sources_dir: str | os.PathLike | None = None) -> DataRecipe:
        """Return a copy whose source and benchmark paths (``path`` and ``files``) are absolute, resolved once
        under `root`; a rooted recipe roots to itself.

        Args:
            sources_dir (`str | os.PathLike`, *optional*): overrides the recipe's ``sources_dir``.
        """
        def root_spec(spec):
            return dataclasses.replace(spec, path=str(self.resolve(spec.path, sources_dir)),
                                       files={key: str(self.resolve(value, sources_dir))
                                              for key, value in spec.files.items()})

        benchmarks = [root_spec(spec) for spec in self.decontaminate.benchmarks]
        decontaminate = dataclasses.replace(self.decontaminate, benchmarks=benchmarks)
        return dataclasses.replace(self, sources=[root_spec(spec) for spec in self.sources],
                                   decontaminate=decontaminate, sources_dir=str(self.root(sources_dir)))

    def root(self, sources_dir: str | os.PathLike | None = None) -> Path:
        """Return the sources root: ``sources_dir`` if given, else the recipe's, resolved."""
        if sources_dir is not None:
            return Path(sources_dir).resolve()
        if self.sources_dir.startswith(RESOURCE_PREFIXES):
            return resolve_resource(self.sources_dir)
        base = Path(self.recipe_path).parent if self.recipe_path else Path.cwd()
        return (base / self.sources_dir).resolve()


def load_data_recipe(path: str | os.PathLike) -> DataRecipe:
    """Load a data recipe from YAML; ``recipes/data/<name>.yaml`` may be given as just ``<name>``.

    Args:
        path (`str | os.PathLike`): a YAML file, or the name of a shipped recipe (``mini``, ``bimed1.3m``).

    Returns:
        `DataRecipe`: the validated recipe.

    Raises:
        `ValueError`: naming the file and the key for unknown keys, wrong types and bad values.
    """
    import yaml

    path = Path(path)
    if not path.exists() and path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        from ..resources import resource_path

        path = resource_path("recipes", "data", f"{path.name}.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at "
                         f"byte {err.start}); save the recipe as UTF-8") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}: {where}not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a data recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = _from_dict(DataRecipe, {**data, "recipe_path": str(path.resolve())}, "")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    return recipe


_NESTED = {"mix": MixSpec, "dedup": DedupSpec, "decontaminate": DecontamSpec}
_LISTS = {"sources": SourceSpec, "benchmarks": BenchmarkSpec}


def _from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"`{where or cls.__name__}` must be a mapping, got {data!r:.80}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key `{where + '.' if where else ''}{unknown[0]}`; "
                         f"expected one of {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing key `{where + '.' if where else ''}{missing[0]}`")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if name in _NESTED:
            value = _from_dict(_NESTED[name], value or {}, key)
        elif name in _LISTS:
            if not isinstance(value, list):
                raise ValueError(f"`{key}` must be a list, got {value!r:.80}")
            value = [_from_dict(_LISTS[name], item, f"{key}[{i}]") for i, item in enumerate(value)]
        elif name in ("options", "files", "targets"):
            if not isinstance(value or {}, dict):
                raise ValueError(f"`{key}` must be a mapping, got {value!r:.80}")
            value = value or {}
        else:
            _check_type(key, value, fields[name].type)
        kwargs[name] = value
    return cls(**kwargs)


_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Refuse a scalar of the wrong YAML type (``seed: "abc"``, ``weight: "0.5"``), naming the key."""
    optional = annotation.endswith(" | None")
    allowed = _SCALARS.get(annotation.removesuffix(" | None"))
    if allowed is None or value is None and optional:
        return
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        expected = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[
            annotation.removesuffix(" | None")]
        raise ValueError(f"`{key}` must be {expected}{' or null' if optional else ''}, got {value!r:.80} "
                         f"({type(value).__name__}); in YAML write numbers without quotes and quote text")
