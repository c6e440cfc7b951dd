"""Run the ``bimedix_*`` lm-eval tasks (and any built-in lm-eval task beside them) on a model.

`evaluate` is what ``bimedix eval`` and the quickstart call: it checks task names, data and adapter
before loading anything, runs `lm_eval.simple_evaluate` with the packaged tasks
(``TaskManager(include_path=tasks_dir(), include_defaults=False)``, plus lm-eval's own tasks only when
one is asked for), adds the bilingual consistency metric, and writes the results.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bimedix.core.conventions import LANGUAGES
from bimedix.core.io import atomic_open, write_json
from bimedix.core.outputs import OutputFolder, safe_name
from bimedix.resources import resource_path

from ..deprecations import quiet_peft_checkpointing_warning
from ..hub_kernels import hub_kernel_errors
from ..resources import check_model_folder
from .bench import PAPER_SUBSETS, available_configs, subset_path
from .consistency import bilingual_consistency

logger = logging.getLogger(__name__)

DEFAULT_TASKS = "auto"  # every bimedix task the data folder has data for (see `auto_tasks`)
BACKENDS = ("hf", "vllm")
# LoRA ranks vLLM accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Names of fused MoE expert parameters (transformers 5) that PEFT `target_parameters` may adapt.
EXPERT_PARAMETER_NAMES = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


def tasks_dir() -> Path:
    """The folder of packaged lm-eval task YAMLs (``lm_eval --include_path $(...)``)."""

    return resource_path("bimedix", "eval", "tasks")


def evaluate(model: Any, *, peft: str | None = None, tasks: str | Iterable[str] = DEFAULT_TASKS,
             backend: str = "hf", data_dir: str | Path | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int | str = 1, device: str | None = None,
             model_args: dict[str, Any] | None = None, output_dir: str | Path | None = None,
             cache: str | Path | None = None, overwrite: bool = False, use_kernels: bool = False) -> dict:
    """Evaluate a model on bimedix tasks with lm-eval and return lm-eval's results (with per-sample logs).

    Args:
        model (`str` or `lm_eval.api.model.LM`): a local model folder or Hub id, or a ready lm-eval ``LM``.
        peft (`str`, *optional*): a PEFT adapter folder; its base model must match ``model``.
        tasks (`str | Iterable[str]`, *optional*, defaults to `"auto"`): task or group names, comma-separated
            or a list; ``bimedix_*`` names and any lm-eval built-in task. ``"auto"``: `auto_tasks`.
        backend (`str`, *optional*, defaults to `"hf"`): ``"hf"`` or ``"vllm"``.
        data_dir (`str | Path`, *optional*): a ``bimedix build-bench`` folder or its Hub id; the bundled slice
            if unset.
        limit (`int | float`, *optional*): questions per task (or a fraction).
        num_fewshot (`int`, *optional*): few-shot examples per prompt (lm-eval samples them from the same
            subset).
        batch_size (`int | str`, *optional*, defaults to `1`): lm-eval batch size (``"auto"`` works for hf).
        device (`str`, *optional*): ``"cuda"``, ``"cpu"``, ...; defaults to CUDA when available.
        model_args (`dict`, *optional*): extra backend arguments (e.g. ``{"dtype": "bfloat16"}``).
        output_dir (`str | Path`, *optional*): where to write ``results.json`` (lm-eval JSON),
            ``samples_<task>.jsonl``, ``consistency.json`` and ``tables.md``.
        cache (`str | Path`, *optional*): lm-eval's request cache (SQLite, ``use_cache``): answered requests
            are stored as they finish, so an interrupted run resumes where it stopped.
        overwrite (`bool`, *optional*, defaults to `False`): allow a non-empty ``output_dir`` no evaluation
            made (checked before evaluating; the model, adapter, data and cache are never written).
        use_kernels (`bool`, *optional*, defaults to `False`): load the model (hf backend) with hub kernels
            (`bimedix.hub_kernels`); off, it loads offline and without the `kernels` package.

    Returns:
        `dict`: lm-eval's results dict plus ``"bimedix_consistency"`` (see `bimedix.eval.consistency`).

    Examples:

    ```python
    from bimedix.eval.run import evaluate
    from bimedix.eval.tables import format_tables
    results = evaluate("runs/quickstart/model", tasks="bimedix_en", limit=10, output_dir="runs/eval")
    print(format_tables(results))
    ```
    """
    import lm_eval
    from lm_eval.api.model import LM

    folder = None
    if output_dir is not None:
        inputs = {"--model": model if isinstance(model, (str, Path)) and Path(model).exists() else None,
                  "--peft": peft, "--data-dir": data_dir if data_dir and Path(data_dir).exists() else None,
                  "--cache": cache}
        folder = OutputFolder(output_dir, "eval", inputs=inputs, overwrite=overwrite)
    names, manager = resolve_tasks(auto_tasks(data_dir) if tasks == "auto" else tasks, data_dir)
    check_data(names, data_dir)
    if isinstance(model, LM):
        if peft is not None:
            raise ValueError("pass an adapter with a model path, not with a ready LM object")
        lm, lm_args = model, None
    else:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        check_model_folder(str(model))
        if peft is not None:
            check_adapter(model, peft)
        lm, lm_args = backend, backend_model_args(backend, model, peft=peft, device=device, extra=model_args,
                                                  use_kernels=use_kernels)
    logging.getLogger("lm_eval.api.task").addFilter(_quiet_custom_dataset_notice)
    # lm-eval wraps an adapter in PEFT
    with hub_kernel_errors(use_kernels and lm_args is not None and backend == "hf"), \
            quiet_peft_checkpointing_warning():
        results = lm_eval.simple_evaluate(
            model=lm, model_args=lm_args, tasks=names, task_manager=manager, limit=limit,
            num_fewshot=num_fewshot, batch_size=batch_size,
            device=None if backend == "vllm" else (device or _default_device()),
            log_samples=True, use_cache=None if cache is None else str(cache))
    if results is None:  # only non-zero ranks of a distributed run get None
        return {}
    results["bimedix_consistency"] = bilingual_consistency(results.get("samples", {}))
    if folder is not None:
        write_results(results, folder, model_name=_model_name(model, peft))
    return results


def auto_tasks(data_dir: str | Path | None = None) -> list[str]:
    """Every paper subset the data folder has: ``bimedix_<subset>_bilingual`` where it has both languages,
    else ``bimedix_<subset>_<language>`` (the bundled slice has Arabic for the MMLU subsets only)."""

    present = set(available_configs(data_dir))
    names = []
    for subset in PAPER_SUBSETS:
        languages = [lang for lang in LANGUAGES if f"{subset}_{lang}" in present]
        if len(languages) == 2:
            names.append(f"bimedix_{subset}_bilingual")
        elif languages:
            names.append(f"bimedix_{subset}_{languages[0]}")
    if not names:
        raise ValueError(f"{data_dir or 'the bundled slice'} has no evaluation data; name --tasks explicitly "
                         "for a Hub dataset, or build a folder with `bimedix build-bench`")
    return names


def resolve_tasks(tasks: str | Iterable[str], data_dir: str | Path | None = None):
    """Split and check task names; return them with the `TaskManager` that loads them.

    ``bimedix_*`` names come from the packaged YAMLs (``include_defaults=False``); lm-eval's own tasks
    (e.g. ``arabic_leaderboard_arabic_mmlu_anatomy``) are indexed only when another name is asked for.
    The manager hands ``data_dir`` to the bimedix tasks as metadata.

    Raises:
        `ValueError`: for a name neither knows, with the closest bimedix names.
    """
    from lm_eval.tasks import TaskManager

    names = [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if n.strip()]
    if not names:
        raise ValueError("no task given; try --tasks bimedix_bilingual")
    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)
    ours = manager.all_tasks
    others = [name for name in names if name not in ours]
    unknown = [name for name in others if name.startswith("bimedix_")]
    if others and not unknown:
        manager = TaskManager(include_path=str(tasks_dir()), include_defaults=True, metadata=metadata)
        unknown = [name for name in others if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, ours, n=3) for name in unknown}
        groups = sorted(name for name in ours if not name.endswith(("_en", "_ar")))
        raise ValueError(f"unknown task(s) {unknown} (closest: {hints}); "
                         f"bimedix groups: {', '.join(groups)}; "
                         "tasks: bimedix_<subset>_<en|ar>; or any lm-eval task such as "
                         "arabic_leaderboard_arabic_mmlu_anatomy")
    return names, manager


def leaf_subsets(names: list[str]) -> list[tuple[str, str]]:
    """The ``(subset, language)`` pairs the bimedix tasks among ``names`` read (groups expanded)."""
    from lm_eval.tasks import TaskManager

    index = TaskManager(include_path=str(tasks_dir()), include_defaults=False).task_index
    found: list[tuple[str, str]] = []

    def visit(name: str) -> None:
        entry = index.get(name)
        if entry is None:
            return
        cfg = entry.cfg or {}
        if isinstance(cfg.get("task"), list):
            for child in cfg["task"]:
                visit(child if isinstance(child, str) else child.get("task") or child.get("group"))
        elif "dataset_kwargs" in cfg:
            pair = (cfg["dataset_kwargs"]["subset"], cfg["dataset_kwargs"]["language"])
            if pair not in found:
                found.append(pair)

    for name in names:
        visit(name)
    return found


def check_data(names: list[str], data_dir: str | Path | None = None) -> None:
    """Fail early, naming the subset, when the data folder lacks one the tasks need."""
    for subset, language in leaf_subsets(names):
        subset_path(subset, language, data_dir)


def check_adapter(model: str, adapter: str) -> dict:
    """Read an adapter's config and check that it was trained on ``model``; return the config dict.

    The base matches when the names agree (same path, or same final path/repo component) or, for two
    local folders, when their ``config.json`` agree on architecture and sizes.

    Raises:
        `ValueError`: the adapter's base model is a different model.
    """
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--peft {adapter}: no adapter_config.json (not a PEFT adapter folder)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base and not _same_model(str(base), str(model)):
        raise ValueError(f"adapter {adapter} was trained on base model {base!r}, but --model is {model!r}; "
                         f"evaluate it with --model {base}")
    return config


def backend_model_args(backend: str, model: str, *, peft: str | None = None, device: str | None = None,
                       extra: dict[str, Any] | None = None, use_kernels: bool = False) -> dict[str, Any]:
    """lm-eval ``model_args`` for the hf or vllm backend, with the adapter wired in.

    The hf backend loads through `from_pretrained` with ``use_kernels`` passed explicitly (hub kernels off
    unless asked, `bimedix.hub_kernels`).

    vLLM needs ``max_lora_rank`` at least the adapter's rank (lm-eval defaults to 16; BiMediX uses 128):
    it is set to the smallest rank vLLM accepts that covers ``r`` and every ``rank_pattern`` value.
    """
    args: dict[str, Any] = {"pretrained": str(model)}
    if backend == "hf":
        args["dtype"] = "auto"
        args["use_kernels"] = use_kernels
        if peft is not None:
            args["peft"] = str(peft)
    elif backend == "vllm":
        if device not in (None, "cuda"):
            raise ValueError(f"the vllm backend runs on CUDA only (got --device {device})")
        if peft is not None:
            config = check_adapter(str(model), str(peft))
            experts = expert_lora_targets(config)
            if experts:
                raise ValueError(
                    f"adapter {peft} has LoRA on fused MoE experts "
                    f"(target_parameters {experts}); vLLM's fused-MoE "
                    "LoRA may drop or mis-shape those deltas, so "
                    "bimedix does not serve it as a LoRA. Merge it "
                    f"first: `bimedix merge --base {model} --adapter "
                    f"{peft} --output MERGED` (checks the merged "
                    "logits), then evaluate or serve MERGED (`bimedix eval --model MERGED --backend vllm`, "
                    "`vllm serve MERGED`). `bimedix eval --backend "
                    "vllm --peft` does this in a temporary folder."
                )
            rank = adapter_rank(config)
            args["lora_local_path"] = str(peft)
            args["max_lora_rank"] = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    return args | (extra or {})


def expert_lora_targets(config: dict) -> list[str]:
    """The ``target_parameters`` of an adapter config that adapt fused MoE experts (empty for
    attention/router).

    PEFT stores LoRA on a fused expert parameter per expert in the transposed ``[E, in, out]`` reading;
    vLLM's fused-MoE LoRA expects ``[out, in]``, so such adapters are served merged, never as LoRA.
    """
    return [name for name in config.get("target_parameters") or []
            if ".experts." in f".{name}" or name.rsplit(".", 1)[-1] in EXPERT_PARAMETER_NAMES]


def adapter_rank(config: dict) -> int:
    """The largest LoRA rank in an adapter config (``r`` and ``rank_pattern`` values)."""
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def write_results(results: dict, output_dir: str | Path | OutputFolder, *, model_name: str = "model") -> Path:
    """Write lm-eval's JSON (``results.json``), per-sample logs, the consistency metric and the markdown
    tables.

    ``output_dir`` is an `bimedix.core.outputs.OutputFolder` (a path is opened as one); task names must be
    safe file names.
    """
    from lm_eval.utils import handle_non_serializable

    from .tables import format_tables  # looked up at call time: tests replace it

    folder = output_dir if isinstance(output_dir, OutputFolder) else OutputFolder(output_dir, "eval")
    summary = {k: v for k, v in results.items() if k != "samples"}
    write_json(folder.path("results.json"), json.loads(json.dumps(summary, default=handle_non_serializable)))
    for task, samples in (results.get("samples") or {}).items():
        with atomic_open(folder.path(f"samples_{safe_name(task, 'task name')}.jsonl")) as handle:
            for sample in samples:
                handle.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
    write_json(folder.path("consistency.json"), results.get("bimedix_consistency", {}))
    with atomic_open(folder.path("tables.md")) as handle:
        handle.write(format_tables(results, model_name=model_name, markdown=True))
    return folder.root


# ----------------------------------------------------------------------------- private helpers


def _quiet_custom_dataset_notice(record: logging.LogRecord) -> bool:
    """Drop lm-eval's per-task hint about ``--metadata`` for ``custom_dataset`` tasks (ours pass
    ``data_dir``)."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_name(model: Any, peft: str | None) -> str:
    name = Path(str(peft if peft is not None else getattr(model, "name", None) or model)).name
    return name or str(model)


def _same_model(base: str, model: str) -> bool:
    if base == model or Path(base).name.lower() == Path(model.rstrip("/")).name.lower():
        return True
    base_dir, model_dir = Path(base), Path(model)
    if base_dir.is_dir() and model_dir.is_dir():
        if base_dir.resolve() == model_dir.resolve():
            return True
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "num_local_experts", "intermediate_size")
        try:
            configs = [json.loads((d / "config.json").read_text(encoding="utf-8"))
                       for d in (base_dir, model_dir)]
        except OSError:
            return False
        return all(configs[0].get(k) == configs[1].get(k) for k in keys)
    return False
