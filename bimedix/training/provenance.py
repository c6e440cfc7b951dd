"""Which base model an adapter belongs to, and which adapters a merged model already holds.

Training records the base next to the adapter (``bimedix_base.json``): its name and a fingerprint of
three parts, each a SHA-256:

- ``config``: the model config without load-time keys (name, dtype, quantization, version);
- ``shapes``: the names and shapes of the parameters (a bitsandbytes 4-bit weight counts with its original
  shape, so a QLoRA base loaded with ``load_in_4bit`` matches the same base loaded in full);
- ``tensors``: the values, rounded to bfloat16 so fp32 and bf16 loads agree, of the input embedding, the
  output embedding and the first and last norm weights (tensors that 4-bit loading never quantizes).

`check_merge` compares the fingerprint of ``--base`` with that record (for an adapter without one, the
base name in ``adapter_config.json``) and refuses a mismatch; it also refuses a ``--base`` that is a
merged model whose ``merge_report.json`` lists this adapter, since merging it again would apply it twice.
``force`` turns each refusal into a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BASE_RECORD = "bimedix_base.json"
MERGE_REPORT = "merge_report.json"
_LOAD_TIME_KEYS = {"_name_or_path", "name_or_path", "dtype", "torch_dtype", "transformers_version",
                   "quantization_config", "use_cache", "_commit_hash", "_attn_implementation_autoset"}


class ProvenanceError(ValueError):
    """An adapter merged into a model it was not trained on, or into a model that already holds it."""


def base_fingerprint(model) -> dict[str, str]:
    """The ``config``, ``shapes`` and ``tensors`` hashes of a (not yet PEFT-wrapped) model; see the module
    doc."""
    config = {key: value for key, value in model.config.to_dict().items() if key not in _LOAD_TIME_KEYS}
    parameters = dict(model.named_parameters())
    shapes = sorted((name, list(getattr(getattr(p, "quant_state", None), "shape", None) or p.shape))
                    for name, p in parameters.items())
    norms = [name for name in parameters if name.endswith("norm.weight")]
    tensors = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tensors[0]:
        tensors.append(output.weight)
    tensors += [parameters[name] for name in norms[:1] + norms[-1:]]
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu",
                                         torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return {"config": _sha256(json.dumps(config, sort_keys=True, default=str)),
            "shapes": _sha256(json.dumps(shapes)), "tensors": digest.hexdigest()}


def adapter_fingerprint(adapter_dir: str | os.PathLike) -> str:
    """SHA-256 of an adapter's weight file(s): what identifies it in a merged model's report."""
    files = (sorted(Path(adapter_dir).glob("adapter_model*.safetensors"))
             or sorted(Path(adapter_dir).glob("adapter_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors: not a saved PEFT adapter.")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def write_base_record(adapter_dir: str | os.PathLike, base: str | None, fingerprint: dict[str, str]) -> Path:
    """Write ``bimedix_base.json`` (base name and fingerprint) into a saved adapter folder; return its
    path."""
    from ..core.io import write_json

    path = Path(adapter_dir) / BASE_RECORD
    write_json(path, {"base_model": base, "fingerprint": fingerprint})
    return path


def check_merge(base: str, model, adapter_dir: str | os.PathLike, *, force: bool = False) -> dict:
    """Check that ``adapter_dir`` belongs on ``model`` (loaded from ``base``) and is not merged into it
    already.

    Args:
        base (`str`): the ``--base`` given (folder, Hub id or ``tiny:...``).
        model (`PreTrainedModel`): that base, loaded and not yet wrapped.
        adapter_dir (`str | os.PathLike`): the adapter folder.
        force (`bool`, *optional*, defaults to `False`): warn instead of refusing.

    Returns:
        `dict`: what the merged model records: ``adapter_fingerprint``, ``base_fingerprint``,
        ``merged_adapters`` (earlier merges of ``base`` plus this one) and ``provenance`` (how the base was
        checked).

    Raises:
        `ProvenanceError`: naming the recorded and the given base and what differs; ``--force`` merges anyway.
    """
    adapter_dir = Path(adapter_dir)
    adapter = adapter_fingerprint(adapter_dir)
    previous = _merge_report(base)
    merged_before = list(previous.get("merged_adapters") or [])
    problems = []
    if any(entry.get("fingerprint") == adapter for entry in merged_before):
        problems.append(f"--base {base} is a merged model that already holds the adapter {adapter_dir} (see "
                        f"its {MERGE_REPORT}); merging it again would "
                        "apply it twice. Merge into the original base")
    fingerprint = base_fingerprint(model)
    record_path = adapter_dir / BASE_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        differs = [part for part, value in (record.get("fingerprint") or {}).items()
                   if fingerprint.get(part) != value]
        provenance = "fingerprint"
        if differs:
            problems.append(f"the adapter {adapter_dir} was trained on {record.get('base_model')!r}, and "
                            f"--base {base} differs from it in {' and '.join(differs)} "
                            f"({BASE_RECORD} holds the fingerprint). "
                            "Pass the base it was trained on")
    else:
        recorded = _adapter_base_name(adapter_dir)
        provenance = "name"
        if recorded is None:
            provenance = "unchecked"
            logger.warning("%s records no base model (no %s, no base_model_name_or_path): cannot check that "
                           "--base %s is the model it was trained on.", adapter_dir, BASE_RECORD, base)
        elif not _same_model(recorded, base):
            problems.append(f"the adapter {adapter_dir} was trained on {recorded!r} (adapter_config.json), "
                            f"not --base {base}. Pass the base it was trained on")
    for problem in problems:
        if not force:
            raise ProvenanceError(problem + ", or --force to merge anyway.")
        logger.warning("--force: %s.", problem)
    return {"adapter_fingerprint": adapter, "base_fingerprint": fingerprint, "provenance": provenance,
            "merged_adapters": [*merged_before, {"adapter": str(adapter_dir), "fingerprint": adapter}]}


def _merge_report(base: str) -> dict:
    path = Path(base) / MERGE_REPORT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _adapter_base_name(adapter_dir: Path) -> str | None:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")


def _same_model(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    recorded_path, given_path = Path(recorded).expanduser(), Path(given).expanduser()
    return recorded_path.exists() and given_path.exists() and recorded_path.resolve() == given_path.resolve()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
