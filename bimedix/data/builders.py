"""A `datasets.GeneratorBasedBuilder` that builds BiMed1.3M from a folder of original source files.

``datasets`` 5 runs no loading scripts, so this builder is used in process, shaped like
``datasets/packaged_modules/text/text.py``: a `BuilderConfig` dataclass plus ``_info``,
``_split_generators`` and ``_generate_examples``. It runs the same convert → clean → mix stages as
``bimedix build-data`` (`bimedix.data.build.prepare`), so it yields the same rows in the same order.

Examples:

```python
>>> from bimedix.data.builders import BiMed
>>> builder = BiMed(config_name="ar", recipe="bimed1.3m", sources_dir="/data/originals")  # doctest: +SKIP
>>> builder.download_and_prepare()  # doctest: +SKIP
>>> arabic = builder.as_dataset(split="train")  # doctest: +SKIP

```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.builder import Key

from .build import CONFIGS, prepare
from .recipe import load_data_recipe
from .schema import FEATURES

_DESCRIPTION = ("BiMed1.3M-style bilingual (English/Arabic) medical instructions: multiple-choice QA, open "
                "QA and multi-turn chats in the bimedix conversation schema (BiMediX, arXiv 2402.13253).")


@dataclass
class BiMedConfig(datasets.BuilderConfig):
    """BuilderConfig for BiMed.

    Args:
        recipe (`str`, defaults to ``"mini"``): a data recipe YAML path or shipped recipe name.
        sources_dir (`str`, *optional*): the folder holding the original source files (overrides the
            recipe's).
        language (`str`, *optional*): keep only ``"en"`` or ``"ar"`` records.
        task (`str`, *optional*): keep only ``"mcqa"``, ``"qa"`` or ``"chat"`` records.
        on_error (`str`, defaults to ``"raise"``): ``"raise"`` or ``"skip"`` malformed source records.
        work_dir (`str`, *optional*): where converted and cleaned records are cached; defaults to a folder in
            the builder's cache.
    """

    recipe: str = "mini"
    sources_dir: str | None = None
    language: str | None = None
    task: str | None = None
    on_error: str = "raise"
    work_dir: str | None = None


class BiMed(datasets.GeneratorBasedBuilder):
    """BiMed1.3M built from original source files by a bimedix data recipe."""

    BUILDER_CONFIG_CLASS = BiMedConfig
    BUILDER_CONFIGS = [
        BiMedConfig(name=name, language=None if language == "*" else language, task=None if task == "*"
                    else task,
                    description=f"BiMed records: language {language}, task {task}")
        for name, (language, task) in CONFIGS.items()
    ]
    DEFAULT_CONFIG_NAME = "all"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=_DESCRIPTION, features=FEATURES,
                                    homepage="https://github.com/mbzuai-oryx/BiMediX")

    def _split_generators(self, dl_manager):
        recipe = load_data_recipe(self.config.recipe)
        work_dir = Path(self.config.work_dir or Path(self._cache_dir_root) / "bimedix-work" / recipe.name)
        prepared = prepare(recipe, work_dir, sources_dir=self.config.sources_dir,
                           on_error=self.config.on_error)
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"prepared": prepared})]

    def _generate_examples(self, prepared):
        index = 0
        for _, record in prepared.iter_records():
            if self.config.language in (None,
                                        record["language"]) and self.config.task in (None, record["task"]):
                yield Key(0, index), record
                index += 1
