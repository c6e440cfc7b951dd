"""Supervised fine-tuning of an MoE chat model: a thin layer over TRL's `SFTTrainer`, PEFT and accelerate.

Configuration is TRL's own dataclasses plus `BimedixArguments` for what TRL lacks, parsed by
`make_parser` from a YAML recipe and CLI flags (unknown keys are errors)::

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]
    bimedix sft --config recipes/tiny/sft.yaml [--key value ...]

What bimedix adds to TRL: LoRA targets from a preset (`bimedix.training.moe.targets`), the Vicuna chat
template with ``{% generation %}`` markers for ``assistant_only_loss``, schema-record datasets turned
into ``messages``, a tiny random MoE for CPU runs, a check that every batch has trained tokens, and
the router load by language (`bimedix.training.router_stats`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import set_seed
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser
from trl.scripts.utils import DatasetConfig
from trl.trainer.utils import get_quantization_config

from ..core.outputs import OutputFolder, check_outputs, staging_path, swap_in_folder
from ..deprecations import quiet_peft_checkpointing_warning
from ..resources import check_model_folder, resolve_resource
from .fused_kernels import apply_fused_kernels, check_fused_kernels, recipe_request
from .moe.expert_lora import EXPERT_LORA_MODES, set_expert_lora_mode
from .moe.quantize import fused_experts, quantize_experts
from .moe.targets import PRESETS, build_lora_config, meta_model
from .provenance import base_fingerprint, write_base_record
from .sharding import (
    PlacementReport,
    check_one_job,
    enable_fsdp_on_cpu,
    fsdp_plugin,
    load_in_turns,
    save_sharded_adapter,
)
from .template import apply_vicuna_template, to_messages
from .tiny import TINY_CONFIGS, build_tiny_model, tiny_config

logger = logging.getLogger(__name__)


@dataclass
class BimedixArguments:
    """bimedix options for SFT that TRL's `SFTConfig`, `ModelConfig` and `ScriptArguments` do not have."""

    tiny_model: str | None = field(
        default=None,
        metadata={"choices": tuple(TINY_CONFIGS),
                  "help": "Train a tiny random model of this architecture, built in-process with the Mixtral "
                          "tokenizer, instead of `model_name_or_path`. For CPU runs and tests; nothing is "
                          "downloaded."},
    )
    tiny_model_config: dict | str | None = field(
        default=None,
        metadata={"help": "Config overrides for `tiny_model`, e.g. {\"hidden_size\": 128, "
                          "\"num_hidden_layers\": 4} (a mapping in "
                          "YAML, a JSON string on the command line)."},
    )
    lora_preset: str = field(
        default="paper",
        metadata={"choices": tuple(PRESETS),
                  "help": "LoRA targets when `lora_target_modules`/`lora_target_parameters` are unset "
                          "(paper = q,k,v + router + experts)."},
    )
    lora_rank_pattern: dict | str | None = field(
        default=None,
        metadata={"help": "Per-weight LoRA ranks (PEFT `rank_pattern`): {name or regex: rank}, matched "
                          "against the end of full module names (attention, shared experts) and parameter "
                          "names (router `mlp.gate.weight`, experts `mlp.experts.gate_up_proj`), e.g. "
                          "{\"experts.gate_up_proj\": 8, \"experts.down_proj\": 8}. Every key must match a "
                          "weight LoRA adapts. A mapping in YAML, a JSON string on the command line."},
    )
    lora_alpha_pattern: dict | str | None = field(
        default=None,
        metadata={"help": "Per-weight LoRA alphas (PEFT `alpha_pattern`), keyed like `lora_rank_pattern`."},
    )
    chat_template: Literal["vicuna", "model"] = field(
        default="vicuna",
        metadata={"help": "`vicuna`: the BiMediX Vicuna v1.1 template with generation markers; `model`: keep "
                          "the tokenizer's own template."},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt for records that have none (none by default, as in the paper)."}
    )
    router_report: bool = field(
        default=True,
        metadata={"help": "For MoE models, log the expert load per layer by sample language and write "
                          "`router_load.json` in `output_dir`."},
    )
    quantize_experts: Literal["nf4", "fp4"] | None = field(
        default=None,
        metadata={"help": "`nf4` (or `fp4`): store the fused MoE experts in 4 bit with double quantization "
                          "(`bimedix.training.moe.quantize`); `load_in_4bit` alone leaves them in bf16. The "
                          "model loads on CPU, gets its LoRA, then "
                          "reaches the device one packed layer at a time."},
    )
    use_kernels: bool = field(
        default=False,
        metadata={"help": "Load the model with transformers' hub kernels (the `kernels` package): on CUDA, "
                          "fused RMSNorm and rotary kernels fetched from the Hub or its cache (fewer kernel "
                          "launches, a little less activation memory; nothing changes on CPU). Off by "
                          "default, so runs work offline and without `kernels` (`bimedix.hub_kernels`)."},
    )
    fused_kernels: Literal["auto", "liger", "off"] = field(
        default="auto",
        metadata={"help": "Liger's fused Triton RMSNorm and rotary kernels: `auto` uses them when "
                          "liger-kernel is installed (`pip install 'bimedix[liger]'`), the run trains on "
                          "CUDA, Liger supports the model type and its kernels pass a self-test on the "
                          "device, else transformers' own layers (the log says why); `liger` requires them; "
                          "`off`. The MoE experts and the loss keep "
                          "bimedix's and TRL's paths (`bimedix.training.fused_kernels`)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Write into a non-empty `output_dir` that no `bimedix sft` run made (its other "
                          "files are kept; files with the names a run writes, such as README.md, are "
                          "replaced)."},
    )
    expert_lora: str = field(
        default="peft",
        metadata={"choices": EXPERT_LORA_MODES,
                  "help": "LoRA on fused experts: `peft` (PEFT's path, W + ΔW for the whole expert stack on "
                          "every forward) or `folded` (x·Wᵀ + s·(x·Aᵀ)·Bᵀ per routed expert: same adapter, "
                          "less time and memory; `bimedix.training.moe.expert_lora`)."},
    )

    def meta_model(self, model_name_or_path: str | None) -> torch.nn.Module:
        """The recipe's model on the meta device: `tiny_model` (with its overrides), else the named model."""
        name = self.tiny_model or model_name_or_path
        if not name:
            raise ValueError("The recipe sets neither `model_name_or_path` nor `tiny_model`.")
        return meta_model(name, **(self.tiny_model_config or {}) if self.tiny_model else {})

    def __post_init__(self):
        if isinstance(self.tiny_model_config, str):
            try:
                self.tiny_model_config = json.loads(self.tiny_model_config)
            except json.JSONDecodeError as err:
                raise ValueError(f"tiny_model_config={self.tiny_model_config!r:.80} is not a JSON object "
                                 f"({err}).") from None
        if self.tiny_model_config is not None and not isinstance(self.tiny_model_config, dict):
            raise ValueError(f"tiny_model_config={self.tiny_model_config!r:.80}: give a mapping of config "
                             "key to value, e.g. {\"num_hidden_layers\": 2}.")
        for key in ("lora_rank_pattern", "lora_alpha_pattern"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{key}={value!r} is not a JSON object ({err}).") from None
            if value is not None and (not isinstance(value, dict)
                                      or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in value.values())):
                raise ValueError(f"{key}={value!r}: give a mapping of "
                                 "module/parameter name (or regex) to a positive "
                                 "integer, e.g. {\"experts.down_proj\": 8}.")
            setattr(self, key, value)


DATACLASS_TYPES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, BimedixArguments)


def make_parser(prog: str | None = None) -> TrlParser:
    """Return the `TrlParser` shared by ``recipes/sft.py`` and ``bimedix sft`` (YAML, then CLI overrides).

    Flags with declared values (a `Literal` type or ``choices`` metadata) keep them in ``--help`` but leave
    the check to `check_values`, which checks the recipe's values too: one check, one message for both.
    """
    parser = TrlParser(DATACLASS_TYPES, prog=prog)
    for action in parser._actions:
        if action.dest == "fsdp":  # transformers' `--fsdp` takes legacy strings only: accept `--fsdp true`
            action.type = _fsdp_flag
        if action.choices is not None:
            action.metavar = action.metavar or "{" + ",".join(map(str, action.choices)) + "}"
            action.choices = None
    return parser


class SFTRecipe(typing.NamedTuple):
    """A parsed SFT recipe; unpacks as ``script, training, model, mixture, bimedix`` (``main(*recipe)``)."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    mixture: DatasetMixtureConfig
    bimedix: BimedixArguments


def parse_args(argv: Iterable[str] | None = None, *, prog: str | None = None) -> SFTRecipe:
    """Parse ``--config FILE`` and flags (default: ``sys.argv[1:]``) into an `SFTRecipe`, checked once for
    value types, allowed values (`check_values`) and keys that contradict each other (`check_conflicts`).

    ``recipes/sft.py``, ``bimedix sft`` and `load_recipe` all parse here; `main` trusts what this returns.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    source = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    recipe = SFTRecipe(*make_parser(prog).parse_args_and_config(argv))
    check_values(*recipe, source=source)
    check_conflicts(recipe.model, recipe.bimedix, source=source)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                use_cpu: bool = False) -> SFTRecipe:
    """Load the YAML recipe at `path` with CLI-style `overrides` (``["--learning_rate", "1e-4"]``);
    `use_cpu` lets a GPU recipe parse on a machine without one, for commands that train nothing."""
    return parse_args(["--config", str(path), *(["--use_cpu", "true"] if use_cpu else []), *overrides])


def check_values(*configs, source: str | None = None) -> None:
    """Refuse recipe values that argparse lets through unchecked from YAML (it takes them as defaults): a
    value outside a field's declared ones (a `Literal` type or ``choices`` metadata: ``lora_preset:
    experts_only``), or of the wrong type (``seed: 1.5``, ``lora_r: [8]``).

    Types are checked for ``int``, ``float``, ``bool`` and ``str`` fields (optional or not); lists, dicts,
    enums and mixed unions are checked by their owners. The message names the key, the value, what is
    allowed, and the recipe file `source` when given.
    """
    where = f"{source}: " if source else ""
    for config in configs:
        hints = typing.get_type_hints(type(config))
        for item in dataclasses.fields(config):
            hint, value = hints.get(item.name), getattr(config, item.name)
            options = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
                typing.get_origin(hint) is typing.Union else (hint,)
            allowed = _allowed_values(item, options)
            if allowed is None:
                problem = _type_problem(item.name, options, value)
            elif value in allowed or value is None and type(None) in options:
                problem = None
            else:
                problem = (f"{item.name}={value!r:.80} is not one of {list(allowed)}"
                           + (" (or unset)" if type(None) in options else ""))
            if problem:
                raise ValueError(f"{where}{problem}; fix it in the recipe or on the command line")


def check_conflicts(model_args: ModelConfig, bimedix_args: BimedixArguments, *,
                    source: str | None = None) -> None:
    """Raise one `ValueError` naming every pair of recipe keys that contradict each other (and the recipe file
    `source` when given).

    Such keys would otherwise be silently ignored: ``tiny_model`` builds its own model, so
    ``model_name_or_path`` and ``model_revision`` would have no effect, and ``tiny_model_config`` has none
    without it; explicit ``lora_target_modules``/``lora_target_parameters`` replace ``lora_preset``;
    ``expert_lora`` and ``quantize_experts`` act on LoRA only. A key counts as set when it differs from its
    default (YAML or command line alike). Combinations that are consistent but unsupported (e.g.
    ``quantize_experts`` with ``load_in_8bit``) are refused by `check_compatible`.
    """
    conflicts = []
    if bimedix_args.tiny_model:
        for key, value in (("model_name_or_path", model_args.model_name_or_path),
                           ("model_revision", None if model_args.model_revision == "main"
                            else model_args.model_revision)):
            if value is not None:
                conflicts.append(f"`tiny_model: {bimedix_args.tiny_model}` builds a random model in-process, "
                                 f"so `{key}: {value}` would be ignored; "
                                 "remove one of the two (to train your own "
                                 "model, use a recipe without `tiny_model`)")
    elif bimedix_args.tiny_model_config:
        conflicts.append("`tiny_model_config` configures `tiny_model`, which is not set: set both or neither")
    targets = [key for key in ("lora_target_modules", "lora_target_parameters") if getattr(model_args, key)]
    if targets and bimedix_args.lora_preset != "paper":
        conflicts.append(f"`lora_preset: {bimedix_args.lora_preset}` is ignored "
                         f"when {' and '.join(f'`{k}`' for k in targets)} "
                         "is set; keep either the preset or the explicit target lists")
    if not model_args.use_peft:
        if bimedix_args.expert_lora != "peft":
            conflicts.append(f"`expert_lora: {bimedix_args.expert_lora}` "
                             "needs LoRA: set `use_peft: true` or drop it")
        if bimedix_args.quantize_experts:
            conflicts.append(f"`quantize_experts: {bimedix_args.quantize_experts}` "
                             "needs LoRA (`use_peft: true`): "
                             "4-bit experts cannot be trained directly")
    if conflicts:
        raise ValueError((f"{source}: the" if source else "The") + " recipe sets keys that contradict each "
                         "other:" + "".join(f"\n  - {conflict}" for conflict in conflicts))


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig,
         mixture_args: DatasetMixtureConfig, bimedix_args: BimedixArguments, callbacks: list | None = None,
         finish: Callable[[str], object] | None = None):
    """Train, save the adapter (or model) and the router report; return the trainer.

    The recipe's values were checked when it was loaded (`parse_args`, `load_recipe`); what depends on the
    model and the launch (`check_lora_patterns`, `check_compatible`, one job per output) is checked here.

    Args:
        script_args, training_args, model_args, mixture_args, bimedix_args: the parsed recipe, an `SFTRecipe`
            (``main(*load_recipe(path))``).
        callbacks (`list[TrainerCallback]`, *optional*): extra trainer callbacks.
        finish (`Callable[[str], object]`, *optional*): called on the main process with the folder of the
            final files before they are swapped into ``output_dir``, to add to them (``bimedix sft`` and
            ``recipes/sft.py`` write the model card, `bimedix.hub.cards.save_model_card`).
    """

    check_lora_patterns(model_args, bimedix_args)
    check_compatible(training_args, model_args, bimedix_args)
    fsdp = parameter_sharding(training_args) == "FSDP"
    check_one_job(fsdp)

    inputs = [model_args.model_name_or_path, script_args.dataset_name,
              *(config.path for config in mixture_args.datasets
                or [])]  # the local ones: Hub ids are not paths
    inputs = {f"input {path}": path for path in inputs if path and os.path.exists(path)}
    check_outputs({"--output_dir": training_args.output_dir}, inputs)
    # a non-empty folder no run made (the user's README.md...) needs `overwrite`; the model card is this run's
    OutputFolder(training_args.output_dir, "sft", inputs=inputs, overwrite=bimedix_args.overwrite,
                 flag="--output_dir").path("README.md")
    tokenizer = load_tokenizer(model_args, bimedix_args)
    dataset = load_sft_dataset(script_args, mixture_args, system_prompt=bimedix_args.system_prompt)
    plugin = fsdp_plugin(training_args) if fsdp and training_args.world_size > 1 else None
    shard_experts = plugin is not None and bool(bimedix_args.quantize_experts)
    set_seed(training_args.seed)  # the same adapter initialisation on every process
    # packing 4-bit experts needs the bf16 model in host memory: one process of a node at a time
    turns = bool(bimedix_args.quantize_experts) and training_args.world_size > 1
    with load_in_turns() if turns else contextlib.nullcontext():
        model = load_model(model_args, training_args, bimedix_args)
        fingerprint = base_fingerprint(model)
        peft_config = make_peft_config(model, model_args, bimedix_args)
        if bimedix_args.quantize_experts:
            model, peft_config = _quantize_experts(model, peft_config, model_args, training_args,
                                                   bimedix_args, plugin if shard_experts else None)
    staging = _final_staging(training_args.output_dir)
    trainer = make_trainer(training_args, model_args, bimedix_args, model, tokenizer,
                           dataset[script_args.dataset_train_split], peft_config=peft_config,
                           eval_dataset=dataset[script_args.dataset_test_split]
                           if training_args.eval_strategy != "no" else None, callbacks=callbacks,
                           router_report_path=staging / "router_load.json")
    if plugin is not None:
        enable_fsdp_on_cpu(trainer, plugin)
    trainer.add_callback(PlacementReport(trainer.accelerator))
    train_result = trainer.train(resume_from_checkpoint=_resume_value(training_args.resume_from_checkpoint,
                                                                      training_args.output_dir))
    with _staged_output_dir(trainer, staging):
        _save_run(trainer, train_result)
        if trainer.accelerator.is_main_process:
            from .template import save_chat_settings

            tokenizer.save_pretrained(staging)
            save_chat_settings(staging, chat_template=bimedix_args.chat_template,
                               system_prompt=bimedix_args.system_prompt)
            if model_args.use_peft:  # what `bimedix merge` checks --base against
                write_base_record(staging, model.name_or_path or None, fingerprint)
            if finish is not None:
                finish(str(staging))
    logger.info("Saved to %s", training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    # No `trainer.end()`: it unregisters the gloo process group, whose last owner is then DDP's reducer,
    # freed with the trainer while holding the GIL; ~ProcessGroupGloo joins a gloo thread that is still
    # freeing an all-gather's tensors and waits for the GIL: a deadlock at the end of 2-process CPU runs
    # (1 run in 4 here). The group is released at exit.
    return trainer


def make_trainer(training_args: SFTConfig, model_args: ModelConfig, bimedix_args: BimedixArguments, model,
                 tokenizer, train_dataset, peft_config=None, eval_dataset=None,
                 callbacks: list | None = None, router_report_path: str | os.PathLike | None = None):
    """TRL's `SFTTrainer` for a loaded model plus what bimedix adds: the trained-token check on every batch,
    the folded expert LoRA, Liger's fused kernels where they apply (`bimedix.training.fused_kernels`), the
    router report, padding-free micro-batches without packing. `main` and
    ``benchmarks/recipe_speed.py`` build trainers here.

    ``padding_free: true`` with ``packing: false``: TRL refuses it when ``max_length`` is set (it would not
    truncate); here TRL truncates the rows as usual and TRL's own padding-free collator then concatenates
    the samples of each micro-batch into one row whose ``position_ids`` restart at every sample, so that the
    attention kernel keeps samples apart and no pad token is computed.
    """
    apply_fused_kernels(model, **recipe_request(training_args, bimedix_args))
    training_args.use_liger_kernel = False  # applied above: the Trainer's own call would swap the experts too
    padding_free = bool(training_args.padding_free and not training_args.packing)
    training_args.padding_free = training_args.padding_free and not padding_free
    try:
        with quiet_peft_checkpointing_warning():  # TRL wraps the model in PEFT
            trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=callbacks)
    finally:
        training_args.padding_free = training_args.padding_free or padding_free
    _check_rows_left(trainer, train_dataset, training_args)
    if padding_free:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer.data_collator = DataCollatorForLanguageModeling(
            pad_token_id=trainer.processing_class.pad_token_id, padding_free=True,
            pad_to_multiple_of=training_args.pad_to_multiple_of)
    trainer.data_collator = RequireTrainedTokens(trainer.data_collator)
    if model_args.use_peft and bimedix_args.expert_lora == "folded":
        set_expert_lora_mode(trainer.model, "folded")
    if bimedix_args.router_report and is_moe(trainer.model):
        from transformers import Trainer

        from .router_stats import RouterLoadCallback

        # transformers' own `log`: TRL's would copy its step metrics (entropy, aux_loss...) into this entry
        # too
        trainer.add_callback(RouterLoadCallback(tokenizer, log=functools.partial(Trainer.log, trainer),
                                                report_path=router_report_path))
    return trainer


def load_tokenizer(model_args: ModelConfig, bimedix_args: BimedixArguments):
    """The tokenizer of the model (the Mixtral one for tiny models), with the Vicuna template if asked."""
    from transformers import AutoTokenizer

    from ..data.tokenizer import load_mixtral_tokenizer

    if bimedix_args.tiny_model:
        tokenizer = load_mixtral_tokenizer()
    else:
        _require_model(model_args)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                  revision=model_args.model_revision)
    if bimedix_args.chat_template == "vicuna":
        apply_vicuna_template(tokenizer)
    return tokenizer


def load_model(model_args: ModelConfig, training_args: SFTConfig, bimedix_args: BimedixArguments):
    """Build the tiny model in-process, or load ``model_name_or_path`` (4/8-bit when the recipe asks).

    With `quantize_experts` the model is loaded on CPU (bitsandbytes' `load_in_4bit` quantizes its Linear
    layers there) and reaches the device later, one packed experts layer at a time. A tiny model with
    `load_in_4bit` goes through the same `from_pretrained` path from a temporary folder.
    """
    from transformers import AutoModelForCausalLM

    from ..hub_kernels import apply_kernels, load_pretrained

    quantization_config = get_quantization_config(model_args)
    device_map = None
    if quantization_config is not None:
        device_map = "cpu" if bimedix_args.quantize_experts else {"": training_args.device}
    if bimedix_args.tiny_model:
        attention = {"attn_implementation": model_args.attn_implementation} \
            if model_args.attn_implementation else {}  # the recipe's kernel, as `from_pretrained` takes it
        model = build_tiny_model(bimedix_args.tiny_model, seed=training_args.seed,
                                 **{**attention, **(bimedix_args.tiny_model_config or {})})
        name = (None if bimedix_args.tiny_model_config
                else f"tiny:{bimedix_args.tiny_model}:{training_args.seed}")
        if quantization_config is not None:
            model = _reload_quantized(model, quantization_config, device_map, model_args.dtype,
                                      use_kernels=bimedix_args.use_kernels,
                                      attn_implementation=model.config._attn_implementation)
        elif bimedix_args.use_kernels:
            apply_kernels(model)
        if name:  # PEFT records it as the base model, which `bimedix merge` rebuilds
            model.name_or_path = model.config.name_or_path = name
        return model
    _require_model(model_args)
    kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation,
                  dtype=model_args.dtype,
                  trust_remote_code=getattr(training_args, "trust_remote_code", False),
                  quantization_config=quantization_config, device_map=device_map)
    kwargs.update(training_args.model_init_kwargs or {})
    use_kernels = bool(kwargs.pop("use_kernels", False)) or bimedix_args.use_kernels
    return load_pretrained(AutoModelForCausalLM, model_args.model_name_or_path, use_kernels=use_kernels,
                           **kwargs)


def check_compatible(training_args: SFTConfig, model_args: ModelConfig,
                     bimedix_args: BimedixArguments) -> None:
    """Refuse, before anything is loaded, recipe options that cannot work together.

    `quantize_experts` needs LoRA and a model with fused experts, composes with `load_in_4bit` but not
    `load_in_8bit`, and is refused under DeepSpeed ZeRO-3 (it would partition the packed bytes without their
    quantization state). Under FSDP it needs FSDP2 and the recipe's `activation_checkpointing` (bimedix shards
    the 4-bit layers itself, `bimedix.training.sharding`).

    Raises:
        `ValueError`: naming the recipe keys at fault and what to do.
    """
    check_fused_kernels(training_args, bimedix_args)
    if not bimedix_args.quantize_experts:
        return
    key = f"`quantize_experts: {bimedix_args.quantize_experts}`"
    if not model_args.use_peft:
        raise ValueError(f"{key} needs LoRA (`use_peft: true`): 4-bit experts cannot be trained directly.")
    if model_args.load_in_8bit:
        raise ValueError(f"{key} composes with `load_in_4bit: true` (full QLoRA), not with `load_in_8bit`: "
                         "8-bit bitsandbytes models cannot be moved to "
                         "the GPU after loading. Use `load_in_4bit`.")
    sharding = parameter_sharding(training_args)
    if sharding == "DeepSpeed ZeRO-3":
        raise ValueError(
            f"{key} is not supported under DeepSpeed ZeRO-3: it would partition the packed 4-bit experts "
            "without their quantization state. Use FSDP (recipes/accelerate_configs/fsdp.yaml, or "
            "`fsdp: true` in the recipe), which shards both, or DDP / DeepSpeed ZeRO-2 "
            "(recipes/accelerate_configs/deepspeed_zero2.yaml), which keep whole parameters on every GPU."
        )
    if sharding == "FSDP":
        config = training_args.fsdp_config or {}
        version = int(config.get("version", os.environ.get("FSDP_VERSION", "2")) if training_args.fsdp
                      else os.environ.get("FSDP_VERSION", "1"))
        if version != 2:
            raise ValueError(
                f"{key} shards under FSDP2 only, but the launch asks for FSDP{version} (`fsdp_config: "
                f"{{version: {version}}}` or `fsdp_version: {version}` in the accelerate config). "
                "Set version 2.")
        if _env_true("FSDP_ACTIVATION_CHECKPOINTING") or str(config.get("activation_checkpointing",
                                                                         "false")).lower() == "true":
            raise ValueError(
                f"{key} under FSDP with FSDP's own activation checkpointing (`fsdp_config: "
                "{activation_checkpointing: true}` or `fsdp_activation_checkpointing: true` in the "
                "accelerate config): bimedix shards the 4-bit layers itself, so set "
                "`activation_checkpointing: true` in the recipe instead.")
    name = bimedix_args.tiny_model or model_args.model_name_or_path
    if name and not _has_fused_experts(name, bimedix_args, model_args,
                                       trust_remote_code=getattr(training_args, "trust_remote_code", False)):
        source = f"`tiny_model: {name}`" if bimedix_args.tiny_model else f"`model_name_or_path: {name}`"
        raise ValueError(
            f"{key} with {source}: that model has no fused MoE "
            "experts (3-D `mlp.experts.gate_up_proj`/`down_proj`), "
            "so there is nothing to quantize. Drop `quantize_experts` (`load_in_4bit: true` quantizes dense "
            "Linear layers) or use an MoE model (Mixtral, Qwen2/3-MoE, OLMoE)."
        )


def parameter_sharding(training_args: SFTConfig) -> str | None:
    """``"FSDP"`` or ``"DeepSpeed ZeRO-3"`` when the launch shards parameters across processes, else None.

    Reads the training arguments (`fsdp`, `deepspeed`) and the environment `accelerate launch` sets from its
    config file (``ACCELERATE_USE_FSDP``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``).
    """
    if training_args.fsdp or _env_true("ACCELERATE_USE_FSDP"):
        return "FSDP"
    stage = None
    if training_args.deepspeed:
        config = training_args.deepspeed
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        stage = config.get("zero_optimization", {}).get("stage")
    elif _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        plugin = getattr(training_args, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None) or stage
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None


def make_peft_config(model, model_args: ModelConfig, bimedix_args: BimedixArguments):
    """The `LoraConfig` of the recipe (preset or explicit lists), or None for full fine-tuning."""

    if not model_args.use_peft:
        return None
    return build_lora_config(
        model, preset=bimedix_args.lora_preset, r=model_args.lora_r, alpha=model_args.lora_alpha,
        dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules,
        target_parameters=model_args.lora_target_parameters, use_rslora=model_args.use_rslora,
        modules_to_save=model_args.lora_modules_to_save, rank_pattern=bimedix_args.lora_rank_pattern,
        alpha_pattern=bimedix_args.lora_alpha_pattern,
    )


def check_lora_patterns(model_args: ModelConfig, bimedix_args: BimedixArguments) -> None:
    """Refuse `lora_rank_pattern` / `lora_alpha_pattern` keys that match no adapted weight before any data or
    weights are loaded, on a meta-device model (when the config is tiny, shipped or cached; the loaded model
    is checked again in `make_peft_config`)."""
    if not model_args.use_peft or not (bimedix_args.lora_rank_pattern or bimedix_args.lora_alpha_pattern):
        return

    try:
        model = bimedix_args.meta_model(model_args.model_name_or_path)
    except (OSError, ValueError, TypeError):
        return
    make_peft_config(model, model_args, bimedix_args)


def load_sft_dataset(script_args: ScriptArguments, mixture_args: DatasetMixtureConfig,
                     system_prompt: str | None = None):
    """Load the recipe's data as a `DatasetDict` with a ``messages`` column.

    Each mixture entry (or ``dataset_name``) may be a schema-record JSONL file or folder of them (validated;
    errors name file, line and field), a built Parquet folder, or anything `datasets.load_dataset` takes
    (a Hub id, ``json`` + ``data_files``). Schema records (Vicuna ``conversations``) become ``messages``
    with `bimedix.training.template.to_messages`; ``fraction`` mixes as in TRL's `get_dataset`.
    """
    from datasets import DatasetDict, concatenate_datasets

    configs = list(mixture_args.datasets)
    if not configs:
        if not script_args.dataset_name:
            raise ValueError("No data: set `datasets:` (a mixture) or `dataset_name` in the recipe.")
        configs = [DatasetConfig(path=script_args.dataset_name, name=script_args.dataset_config,
                                 split=script_args.dataset_train_split)]
    parts = [_as_messages(_load_one(config), system_prompt, config.path) for config in configs]
    fractions = [config.fraction for config in configs]
    if any(f is not None for f in fractions):
        if any(f is None for f in fractions):
            raise ValueError("`fraction` must be set for every dataset of the mixture or for none.")
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(part) / w for part, w in zip(parts, weights) if w > 0)
        parts = [part.select(range(round(w * total))) for part, w in zip(parts, weights)]
    train = concatenate_datasets(parts)
    if mixture_args.test_split_size is not None:
        split = train.train_test_split(test_size=mixture_args.test_split_size, seed=0)
        return DatasetDict({script_args.dataset_train_split: split["train"],
                            script_args.dataset_test_split: split["test"]})
    return DatasetDict({script_args.dataset_train_split: train})


def is_moe(model) -> bool:
    """True when the model routes tokens to experts (its config has ``output_router_logits``)."""
    return hasattr(model.config.get_text_config(), "output_router_logits")


class RequireTrainedTokens:
    """Wrap a data collator and fail on a batch with no trained token (all labels -100).

    Such a batch means the template or truncation hides every assistant turn: the loss would be NaN or
    silently zero. The check costs one comparison over the labels.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if not (batch["labels"] != -100).any():
            raise RuntimeError(
                f"A training batch of {len(examples)} example(s) has no trained token (every label is -100). "
                "Check that `assistant_only_loss` has a template with {% generation %} markers "
                "(`chat_template: vicuna`) and that `max_length` keeps the assistant turns."
            )
        return batch


# --- helpers -------------------------------------------------------------------------------------------


def _check_rows_left(trainer, rows, training_args: SFTConfig) -> None:
    """Say how many rows TRL dropped for having no trained token left, and stop when it dropped them all."""
    if not (hasattr(rows, "__len__") and hasattr(trainer.train_dataset, "__len__")):
        return  # streamed data: RequireTrainedTokens still guards every batch
    dropped = len(rows) - len(trainer.train_dataset)
    why = (f"after truncation to max_length={training_args.max_length} "
           "they have no assistant token left to train "
           "on (with assistant_only_loss every label outside the assistant turns is masked)")
    if len(rows) and not len(trainer.train_dataset):
        raise ValueError(f"all {len(rows)} training rows were dropped: "
                         f"{why}. Raise `max_length` (or shorten the "
                         "system prompt and user turns) so that some assistant text fits.")
    if dropped > 0:
        logger.warning("%d of %d training rows were dropped: %s.", dropped, len(rows), why)


def _require_model(model_args: ModelConfig) -> None:
    if not model_args.model_name_or_path:
        raise ValueError("Set `model_name_or_path` (a local folder or Hub id) or `tiny_model` in the recipe.")
    check_model_folder(model_args.model_name_or_path, "model_name_or_path")


def _quantize_experts(model, peft_config, model_args: ModelConfig, training_args: SFTConfig,
                      bimedix_args: BimedixArguments, plugin=None):
    """Add the LoRA adapters (so they nest as on a bf16 base), then pack the experts to 4 bit on the device.

    With `load_in_4bit` too, bitsandbytes has already quantized the Linear layers on CPU: they follow the
    experts to the device once every layer is packed (full QLoRA; the router stays trainable through LoRA).
    Under FSDP (``plugin``) each layer is packed and sharded in turn (`bimedix.training.sharding`).
    """
    from peft import get_peft_model

    with quiet_peft_checkpointing_warning():
        model = get_peft_model(model, peft_config)
    if plugin is not None:
        from .sharding import shard_4bit_experts

        if model_args.load_in_4bit:  # SFTTrainer's bf16 cast of a quantized model's adapter, done before FSDP
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        model = shard_4bit_experts(model, bimedix_args.quantize_experts, training_args.device, plugin)
        if model_args.load_in_4bit:
            model.base_model.model.hf_device_map = {"": training_args.device}
        return model, None
    quantize_experts(model, quant_type=bimedix_args.quantize_experts, device=training_args.device)
    if model_args.load_in_4bit:
        model.to(training_args.device)
        model.base_model.model.hf_device_map = {"": training_args.device}
    return model, None


def _reload_quantized(model, quantization_config, device_map, dtype: str | None, *,
                      use_kernels: bool = False, attn_implementation: str | None = None):
    """Load an in-process model again through `from_pretrained` with a `BitsAndBytesConfig` (tiny runs)."""

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ..hub_kernels import load_pretrained

    with tempfile.TemporaryDirectory(prefix="bimedix-tiny-") as folder:
        # written by every process: `save_pretrained` writes on rank 0 only once torch.distributed is
        # initialized
        model.config.save_pretrained(folder)
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return load_pretrained(AutoModelForCausalLM, folder, use_kernels=use_kernels, dtype=dtype,
                               quantization_config=quantization_config, device_map=device_map,
                               attn_implementation=attn_implementation)


def _has_fused_experts(name: str, bimedix_args: BimedixArguments, model_args: ModelConfig,
                       trust_remote_code: bool = False) -> bool:
    """Whether the model's architecture has fused experts, built from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if bimedix_args.tiny_model:
        config = tiny_config(name, **(bimedix_args.tiny_model_config or {}))
    else:
        config = AutoConfig.from_pretrained(name, revision=model_args.model_revision,
                                            trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return bool(fused_experts(model))


def _allowed_values(item: dataclasses.Field, options: tuple) -> tuple | None:
    """The values a field declares (its `Literal` type, or its ``choices`` metadata), else None."""
    literals = [option for option in options if typing.get_origin(option) is Literal]
    if literals and len(literals) + (type(None) in options) == len(options):
        return tuple(value for literal in literals for value in typing.get_args(literal))
    return tuple(item.metadata["choices"]) if "choices" in item.metadata else None


def _type_problem(name: str, options: tuple, value) -> str | None:
    """What is wrong with the type of ``value`` for a field typed as the union of ``options``, if anything."""
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    scalars = [kind for kind in options if kind in expected]
    if not scalars or len(scalars) + (type(None) in options) != len(options):
        return None  # lists, dicts, enums and mixed unions are checked by their owners
    if value is None and type(None) in options or isinstance(value, enum.Enum):
        return None
    if name == "fsdp" and isinstance(value, bool):  # `fsdp: true` (transformers: str | bool)
        return None
    accepted = tuple(scalars) + ((int,) if float in scalars else ())
    if isinstance(value, bool) and bool not in scalars or not isinstance(value, accepted):
        return (f"`{name}` must be {' or '.join(expected[kind] for kind in scalars)}, "
                f"got {value!r:.80} ({type(value).__name__})")
    return None


def _fsdp_flag(value: str) -> str | bool | None:
    """``--fsdp true``/``false`` as booleans; other values stay strings (``"full_shard auto_wrap"``)."""
    lowered = value.lower()
    return True if lowered in ("true", "1", "yes") else None if lowered in ("false", "0", "no") else value


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _final_staging(output_dir: str | os.PathLike) -> Path:
    """The hidden sibling of ``output_dir`` that the run's final files are written in (`_staged_output_dir`);
    every process gets rank 0's."""
    import torch.distributed as dist

    path = [str(staging_path(Path(output_dir)))]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


@contextlib.contextmanager
def _staged_output_dir(trainer, staging: Path) -> Iterator[Path]:
    """Point the trainer's ``output_dir`` at ``staging`` for the run's final files (metrics, state, adapter,
    tokenizer, chat settings, base record; the router report is written there at the end of training), then
    swap it in whole, carrying over the checkpoints and logs (`bimedix.core.outputs.swap_in_folder`): a kill
    while saving leaves the earlier final files or the new ones, never a mix."""
    output_dir = trainer.args.output_dir
    main_process = trainer.accelerator.is_main_process
    if main_process:
        staging.mkdir(exist_ok=True)
    trainer.args.output_dir = str(staging)
    try:
        yield staging
        trainer.accelerator.wait_for_everyone()
        if main_process:
            swap_in_folder(staging, Path(output_dir), carry=lambda path: True)
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        trainer.args.output_dir = output_dir


def _save_run(trainer, train_result) -> None:
    """Save what alignment-handbook's ``sft.py`` saves, whatever `save_strategy` is: the train metrics
    (``train_results.json``, ``all_results.json``), ``trainer_state.json`` and the adapter (or model)."""
    metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.is_fsdp_enabled and _is_peft(trainer.model):
        save_sharded_adapter(trainer, trainer.args.output_dir)
    else:
        trainer.save_model(trainer.args.output_dir)


def _resume_value(value: str | bool | None, output_dir: str) -> str | bool | None:
    """``true``/``last`` resume from the newest complete checkpoint in ``output_dir``; a path resumes from it.

    A checkpoint is complete once the trainer wrote its ``trainer_state.json`` (its last file): a process
    killed while saving leaves a newer folder without it, which is skipped with a warning.
    """
    if isinstance(value, str) and value.lower() in ("false", ""):
        return None
    if not (value is True or isinstance(value, str) and value.lower() in ("true", "last")):
        return value
    checkpoints = sorted((path for path in Path(output_dir).glob("checkpoint-*")
                          if path.is_dir() and path.name.removeprefix("checkpoint-").isdigit()),
                         key=lambda path: int(path.name.removeprefix("checkpoint-")))
    while checkpoints and not (checkpoints[-1] / "trainer_state.json").is_file():
        logger.warning("Skipping %s: it has no trainer_state.json (interrupted while saving).",
                       checkpoints.pop())
    return str(checkpoints[-1]) if checkpoints else True


def _load_one(config):
    """One mixture entry as a `Dataset`."""
    from datasets import Dataset, load_dataset

    from ..data.schema import FEATURES, normalize_record, read_records

    path = resolve_resource(config.path)
    record_files = []
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        record_files = [path]
    elif path.is_dir() and not config.data_files and not list(path.rglob("*.parquet")):
        record_files = sorted(path.rglob("*.jsonl"))
    if record_files:
        records = [normalize_record(r) for f in record_files for r in read_records(f)]
        if not records:
            raise ValueError(f"{config.path}: no records found.")
        return Dataset.from_list(records, features=FEATURES)
    if path.is_dir() and not config.data_files and not (path / "README.md").is_file():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        return load_dataset("parquet", data_files=files, split=config.split)
    return load_dataset(str(path) if path.exists() else config.path, name=config.name,
                        data_dir=config.data_dir, data_files=config.data_files,
                        split=config.split)


def _as_messages(dataset, system_prompt: str | None, source: str):
    """Keep only a ``messages`` column, converting schema records with `to_messages`."""

    columns = dataset.column_names
    if "conversations" in columns:
        def convert(record: Mapping) -> dict:
            return {"messages": to_messages(record, system=system_prompt)}
    elif "messages" in columns:
        def convert(record: Mapping) -> dict:
            messages = list(record["messages"])
            if system_prompt and messages and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": system_prompt})
            return {"messages": messages}
    else:
        raise ValueError(f"{source}: no `conversations` (schema records) "
                         f"or `messages` column (found: {columns}).")
    return dataset.map(convert, remove_columns=columns, desc=f"Formatting {os.path.basename(source)}")
