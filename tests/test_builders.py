"""The BiMed GeneratorBasedBuilder yields the same rows as `bimedix build-data`."""

from __future__ import annotations

import datasets
import pytest
from bimed_sources import EXPECTED, write_sources

from bimedix.data.build import build_data
from bimedix.data.builders import BiMed, BiMedConfig
from bimedix.data.schema import FEATURES


@pytest.fixture(scope="module")
def sources_and_built(tmp_path_factory, mixtral_tokenizer):
    root = tmp_path_factory.mktemp("bimed-builder")
    recipe = write_sources(root / "sources")
    build_data(recipe, root / "out", on_error="skip", tokenizer=mixtral_tokenizer, progress=False)
    return root, recipe


@pytest.mark.parametrize("config", ["all", "ar", "qa"])
def test_builder_rows_equal_build_data(sources_and_built, config):
    root, recipe = sources_and_built
    builder = BiMed(config_name=config, recipe=str(recipe), on_error="skip",
                    cache_dir=str(root / "builder-cache"),
                    work_dir=str(root / "builder-work"))
    builder.download_and_prepare()
    built = builder.as_dataset(split="train")
    loaded = datasets.load_dataset(str(root / "out"), config, split="train", cache_dir=str(root / "hf-cache"))
    assert built.features == FEATURES
    assert len(built) == EXPECTED["configs"][config]
    assert sorted(built.to_list(), key=lambda r: r["id"]) == sorted(loaded.to_list(), key=lambda r: r["id"])


def test_builder_configs_mirror_parquet_configs():
    names = [config.name for config in BiMed.BUILDER_CONFIGS]
    assert names == list(EXPECTED["configs"])
    assert BiMed.BUILDER_CONFIG_CLASS is BiMedConfig
    ar = next(c for c in BiMed.BUILDER_CONFIGS if c.name == "ar")
    assert (ar.language, ar.task) == ("ar", None)
