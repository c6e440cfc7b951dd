"""Shared fixtures: offline Hub, the real Mixtral tokenizer, tiny random MoE models, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data in ``../shared/data`` (see its SOURCES.md); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _bimedix_cache(tmp_path_factory) -> None:
    """Keep the converted tokenizer in one per-run cache so tests never touch the user's home."""
    os.environ.setdefault("BIMEDIX_CACHE", str(tmp_path_factory.mktemp("bimedix-cache")))


@pytest.fixture(scope="session")
def mixtral_tokenizer(_bimedix_cache):
    """The real Mixtral-8x7B tokenizer with the Vicuna chat template installed."""
    from bimedix.data.tokenizer import load_mixtral_tokenizer
    from bimedix.training.template import apply_vicuna_template

    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _bimedix_cache) -> Path:
    """A saved tiny random Mixtral (2 layers, 4 experts, top-2) with tokenizer and chat template."""
    from bimedix.training.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), arch="mixtral", seed=0)
