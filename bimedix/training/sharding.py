"""4-bit experts under FSDP: packed NF4 bytes and their statistics as parameters FSDP can shard.

bitsandbytes' parametrization (`bimedix.training.moe.quantize`) keeps an expert stack's packed bytes in the
parameter ``parametrizations.<name>.original`` but its block statistics (absmax, double-quant absmax and
offset) in a `QuantState` object that FSDP never sees: sharding the bytes alone would separate them from
their scales. `make_experts_shardable` moves the statistics into parameters of the parametrization itself
(`shardable_parametrization`: byte tensors like the packed weights), so that FSDP2's `fully_shard`, applied
per decoder layer and then to the root, gives each rank 1/world of every byte at rest, gathers one layer for
its forward and backward, and frees it after. FSDP casts only floating-point parameters for mixed
precision, so these byte parameters travel bit-exact whatever ``mixed_precision`` says. The dequantized
weight is rebuilt on access from the gathered tensors, for the folded expert LoRA and PEFT's path alike.

The rest of the module is what a sharded run needs around it: one launch check (`check_one_job`), FSDP on
CPU processes for tests (`enable_fsdp_on_cpu`), loading in turns per node (`load_in_turns`), the start-up
placement line (`placement_line`) and the adapter save (`save_sharded_adapter`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch import nn
from transformers import TrainerCallback

from .moe.experts import EXPERT_PARAMETERS, bnb_parametrization, flat_dequantize, fused_experts

logger = logging.getLogger(__name__)

#: Environment variables of launchers that start several tasks (MPI, PMI, Slurm), by what they count.
TASK_COUNTS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")


def make_experts_shardable(model: nn.Module) -> list[str]:
    """Give every 4-bit expert parameter of ``model`` the `shardable_parametrization` class (in place).

    The packed bytes stay where they are; the statistics move from the `QuantState` object into byte
    parameters, and bitsandbytes' state-dict hook (which renames keys and adds the statistics) is removed, so
    that the state dict holds plain tensors under their module paths, as FSDP's checkpointing expects.

    Returns:
        `list[str]`: the names of the converted parameters (``model.layers.0.mlp.experts.gate_up_proj``).
    """
    from bitsandbytes.nn.parametrize import _parametrized_state_dict_post_hook

    names = []
    for module_name, module in fused_experts(model).items():
        for param_name in EXPERT_PARAMETERS:
            parametrization = bnb_parametrization(module, param_name)
            if parametrization is None or isinstance(parametrization, shardable_parametrization()):
                continue
            chain = module.parametrizations[param_name]
            index = next(i for i, p in enumerate(chain) if p is parametrization)
            chain[index] = shardable_parametrization()(parametrization.quant_state)
            names.append(f"{module_name}.{param_name}")
        for key, hook in list(module._state_dict_hooks.items()):
            if getattr(hook, "func", None) is _parametrized_state_dict_post_hook:
                del module._state_dict_hooks[key]
    return names


@functools.cache
def shardable_parametrization() -> type:
    """The class `make_experts_shardable` installs: bitsandbytes' `Bnb4bitParametrization` with its block
    statistics held as byte parameters (built on first use, so that importing bimedix needs no
    bitsandbytes)."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    class ShardableNF4(Bnb4bitParametrization):
        """Same values and `quant_state` as bitsandbytes' class; ``absmax`` (and ``nested_absmax``) are
        parameters FSDP shards, the code books and offset constant buffers. Under FSDP, read `quant_state`
        inside the forward, where the layer is gathered."""

        def __init__(self, state: QuantState):
            nn.Module.__init__(self)
            self.absmax = nn.Parameter(_bytes(state.absmax), requires_grad=False)
            self.register_buffer("code", state.code)
            self.shape, self.dtype, self.blocksize = state.shape, state.dtype, state.blocksize
            self.quant_type, self.nested = state.quant_type, state.nested
            self.absmax_dtype = state.absmax.dtype
            if self.nested:
                self.nested_absmax = nn.Parameter(_bytes(state.state2.absmax), requires_grad=False)
                self.register_buffer("nested_code", state.state2.code)
                self.register_buffer("offset", state.offset)
                self.nested_blocksize, self.nested_dtype = state.state2.blocksize, state.state2.dtype
                self.nested_absmax_dtype = state.state2.absmax.dtype

        @property
        def quant_state(self) -> QuantState:
            state2 = None
            if self.nested:
                state2 = QuantState(absmax=self.nested_absmax.view(self.nested_absmax_dtype),
                                    code=self.nested_code, blocksize=self.nested_blocksize,
                                    dtype=self.nested_dtype)
            return QuantState(absmax=self.absmax.view(self.absmax_dtype), shape=self.shape, code=self.code,
                              blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                              offset=self.offset if self.nested else None, state2=state2)

        @torch.no_grad()
        def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
            return flat_dequantize(quantized_param, self.quant_state)

    return ShardableNF4


def fsdp_plugin(training_args):
    """accelerate's `FullyShardedDataParallelPlugin` of the run: from ``fsdp``/``fsdp_config`` (training
    arguments) or the ``FSDP_*`` environment `accelerate launch --config_file fsdp.yaml` sets; else None."""
    from accelerate import FullyShardedDataParallelPlugin

    if training_args.fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    elif _env_true("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()
    else:
        return None
    mixed = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    if mixed and plugin.fsdp_version == 2:
        plugin.set_mixed_precision(mixed)
    return plugin


def check_one_job(fsdp: bool) -> None:
    """Refuse processes that are not one distributed job (they would each train alone into one folder).

    Args:
        fsdp (`bool`): the run asks for FSDP (recipe or accelerate config).

    Raises:
        `ValueError`: MPI/PMI/Slurm started several tasks but no launcher set ``WORLD_SIZE``; or FSDP under
        `accelerate launch --cpu`, which starts one process and drops the FSDP config.
    """
    if os.environ.get("WORLD_SIZE") is None:
        for name in TASK_COUNTS:
            tasks = os.environ.get(name, "1")
            if tasks.isdigit() and int(tasks) > 1:
                raise ValueError(
                    f"{name}={tasks}: {tasks} tasks were started, but WORLD_SIZE is unset, so each would "
                    "train alone and write the same output_dir. Start one job: `torchrun --nproc_per_node N` "
                    "or `accelerate launch --config_file ...` per node (with srun: one launcher task per "
                    "node).")
    if fsdp and _env_true("ACCELERATE_USE_CPU") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise ValueError(
            "FSDP (`fsdp` in the recipe or the accelerate config) under `accelerate launch --cpu`: "
            "accelerate starts one process and drops the FSDP config there. On CPU run FSDP as "
            "`python -m torch.distributed.run --nproc_per_node N recipes/sft.py --config ... --fsdp true`.")


def enable_fsdp_on_cpu(trainer, plugin) -> bool:
    """Let a CPU (gloo) job train under FSDP: accelerate marks CPU processes `MULTI_CPU` (DDP) whatever the
    plugin says. Marks its process state and accelerator state FSDP with ``plugin``, as it does on GPUs
    (both: a later `AcceleratorState()` copies the process state's type); returns whether it changed them."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if plugin is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


@contextlib.contextmanager
def load_in_turns():
    """Run the block on one process of each node at a time (local rank 0 first), so that a node holds one
    process's full-precision copy of the model in host memory at once, not one per process.

    Each turn waits for the previous one at a barrier, so the process group's timeout (``ddp_timeout``,
    30 minutes by default) must cover the turns before the last.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    for _ in range(local_rank):
        dist.barrier()
    # every process loads real weights: transformers would load them on local rank 0 only under
    # `fsdp_cpu_ram_efficient_loading` (meta tensors elsewhere), and each process packs its own experts
    saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved
    for _ in range(local_rank, local_world):
        dist.barrier()


def shard_4bit_experts(model: nn.Module, quant_type: str, device, plugin) -> nn.Module:
    """Pack each decoder layer's experts to 4 bit on ``device``, make them shardable and shard the layer, one
    layer at a time, then shard the root: a device never holds more than one layer whole.

    Args:
        model (`nn.Module`): the model with its LoRA adapters (`peft.get_peft_model`), on CPU.
        quant_type (`str`): `"nf4"` or `"fp4"` (see `bimedix.training.moe.quantize.quantize_experts`).
        device (`torch.device`): this process's device.
        plugin (`accelerate.FullyShardedDataParallelPlugin`): see `fsdp_plugin`.
    """
    from .moe.quantize import quantize_experts

    def pack(layer: nn.Module) -> None:
        if fused_experts(layer):
            quantize_experts(layer, quant_type=quant_type, device=device)
            make_experts_shardable(layer)

    return shard_model(model, plugin, prepare=pack, device=device)


def shard_model(model: nn.Module, plugin, prepare=None, device=None) -> nn.Module:
    """Apply FSDP2 `fully_shard` as accelerate would: to each decoder layer (``transformer_layer_cls_to_wrap``
    of the FSDP config, else the model's ``_no_split_modules``), then to the root, with the plugin's
    resharding, mixed precision and offload; accelerate then leaves the model as it is.

    ``prepare(layer)`` runs on each layer just before it is sharded. bitsandbytes 4-bit Linears stored in
    uint8 (no ``bnb_4bit_quant_storage``) stay whole on every rank, as accelerate keeps them, and are moved
    to ``device`` here.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    layers = [m for m in model.modules() if m is not model and policy is not None and policy(m)]
    if not layers:
        raise ValueError(f"FSDP found no decoder layer to shard in {type(model).__name__}: set `fsdp_config: "
                         "{transformer_layer_cls_to_wrap: [<DecoderLayer class>]}` in the recipe.")
    for layer in layers:
        if prepare is not None:
            prepare(layer)
        fully_shard(layer, **kwargs, ignored_params=_whole_params(layer, device) or None)
    return fully_shard(model, **kwargs, ignored_params=_whole_params(model, device) or None)


def placement(model: nn.Module) -> dict[str, int]:
    """Bytes of frozen weights (and of 4-bit expert storage) this rank holds, and the whole model's."""
    from torch.distributed.tensor import DTensor

    sizes = {"held": 0, "whole": 0, "experts_held": 0, "experts_whole": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        whole = param.numel() * param.element_size()
        held = (param.to_local() if isinstance(param, DTensor) else param).numel() * param.element_size()
        sizes["held"] += held
        sizes["whole"] += whole
        if ".experts." in f".{name}" and ".parametrizations." in name:
            sizes["experts_held"] += held
            sizes["experts_whole"] += whole
    return sizes


def placement_line(model: nn.Module, kind: str, processes: int, rank: int = 0) -> str:
    """``rank 0 holds 1.2 MiB of 2.4 MiB frozen weights (FSDP full_shard, 2 processes)`` (+ 4-bit experts)."""
    sizes = placement(model)
    line = (f"rank {rank} holds {_size(sizes['held'])} of {_size(sizes['whole'])} frozen weights "
            + (f"({kind}, {processes} processes)" if processes > 1 else f"({kind})"))
    if sizes["experts_whole"]:
        line += f"; 4-bit experts {_size(sizes['experts_held'])} of {_size(sizes['experts_whole'])}"
    return line


def placement_kind(accelerator) -> str:
    """How accelerate placed the model: ``FSDP full_shard``, ``DDP``, ``DeepSpeed ZeRO-2`` or ``one
    process``."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        resharded = plugin.reshard_after_forward
        if isinstance(resharded, bool):
            return f"FSDP{'' if plugin.fsdp_version == 2 else plugin.fsdp_version} " \
                   f"{'full_shard' if resharded else 'shard_grad_op'}"
        return f"FSDP {str(getattr(resharded, 'name', resharded)).lower()}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "one process" if accelerator.num_processes == 1 else "DDP"


class PlacementReport(TrainerCallback):
    """Log `placement_line` once the trainer has placed (and sharded) the model, before the first step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        logger.info(placement_line(model, placement_kind(self.accelerator), self.accelerator.num_processes,
                                   self.accelerator.process_index))


def save_sharded_adapter(trainer, output_dir: str | os.PathLike) -> None:
    """Save the adapter of an FSDP run as a normal PEFT adapter: gather the trainable tensors only (not the
    frozen base, which FSDP's full state dict would gather too) to rank 0, which writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state_dict = get_model_state_dict(trainer.model, options=options)
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(output_dir, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()


# --- helpers -------------------------------------------------------------------------------------------


def _whole_params(module: nn.Module, device) -> set[nn.Parameter]:
    """The uint8 bitsandbytes `Params4bit` of ``module``, which FSDP cannot shard (moved to ``device``)."""
    whole = set()
    for child in module.modules():
        weight = getattr(child, "weight", None)
        if type(weight).__name__ == "Params4bit" and not weight.is_floating_point():
            if device is not None and weight.device != torch.device(device):
                child.to(device)
            whole.add(child.weight)
    return whole


def _size(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).clone()
