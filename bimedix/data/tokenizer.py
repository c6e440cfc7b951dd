"""The real Mixtral-8x7B tokenizer, loaded without the Hub.

`mistral_common` ships ``tokenizer.model.v1``, the 32,000-piece SentencePiece vocabulary of
Mistral-7B / Mixtral-8x7B (bos=1, eos=2, unk=0). We turn it into a fast tokenizer once (about 2 s,
needs `protobuf`) and keep the result in a cache folder, so later loads take a fraction of a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MIXTRAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 32768,
}


def mixtral_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a folder holding the Mixtral tokenizer in Hugging Face format, building it if needed.

    Args:
        cache_dir (`str | os.PathLike`, *optional*): where to keep it; defaults to ``$BIMEDIX_CACHE``
            or ``~/.cache/bimedix``.

    Returns:
        `Path`: a folder that `AutoTokenizer.from_pretrained` loads offline.
    """
    root = Path(cache_dir or os.environ.get("BIMEDIX_CACHE") or Path.home() / ".cache" / "bimedix")
    target = root / "tokenizers" / "mixtral-8x7b-v1"
    if (target / "tokenizer.json").is_file():
        return target
    source = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    root.joinpath("tokenizers").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mixtral-", dir=root / "tokenizers"))
    try:
        with resources.as_file(source) as model_file:
            shutil.copyfile(model_file, staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(json.dumps(MIXTRAL_TOKENIZER_CONFIG))
        logger.info("Converting the Mixtral SentencePiece model to a fast tokenizer in %s", target)
        AutoTokenizer.from_pretrained(staging).save_pretrained(staging)
        (staging / "tokenizer.model").unlink()
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_mixtral_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Load the Mixtral-8x7B fast tokenizer offline (pad token = ``<unk>``, BOS added)."""
    return AutoTokenizer.from_pretrained(mixtral_tokenizer_dir(cache_dir))
