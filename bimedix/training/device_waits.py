"""Count the operations of a block of PyTorch code that make the host wait for the accelerator.

On a GPU these ops read a value back (``.item()``, ``bool(tensor)``, ``int(tensor)``, a copy to the host) or
size their output from the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``,
``bincount``, ``repeat_interleave`` without ``output_size``): the host stops queuing kernels until the device
has caught up. They are seen at PyTorch's dispatcher, so the same code counts the same on CPU, where these
ops cost nothing: a CPU test proves what a GPU step would wait for. Not seen: waits inside another op's C++
kernel (``torch.cuda.set_sync_debug_mode`` or the profiler's ``cudaStreamSynchronize`` catch those on a GPU)
and ``.tolist()``/``.numpy()`` of CPU tensors, which skip the dispatcher (on a GPU they are copies to the
host and are counted).

>>> import torch
>>> with DeviceWaits() as waits:
...     x = torch.arange(6)
...     _ = x[x > 2]
...     _ = x.sum().item()
>>> sorted(op for op, _ in waits.counts)
['_local_scalar_dense', 'index']
"""

from __future__ import annotations

import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

WAITING_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique",
                         "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"})
_TORCH = os.path.dirname(torch.__file__) + os.sep


class DeviceWaits(TorchDispatchMode):
    """Context manager: ``counts`` maps ``(op, source)`` to how many times ``op`` made the host wait, where
    ``source`` is ``path:line`` of the innermost caller outside torch (the path below ``site-packages``, or
    below the working folder)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if _waits(name, args, kwargs):
            self.counts[(name, _caller())] += 1
        return func(*args, **kwargs)

    def by_source(self) -> dict[str, int]:
        """Waits per source, most first."""
        totals: collections.Counter[str] = collections.Counter()
        for (_, source), count in self.counts.items():
            totals[source] += count
        return dict(totals.most_common())


class StepWaits(TrainerCallback):
    """Trainer callback: the `DeviceWaits` of every optimizer step from ``first_step`` (0-based) on, in
    ``steps``: its micro-batches (forward, backward) and gradient clipping. The optimizer's update is left
    out: torch's AdamW reads step counters that stay on the host on a GPU too."""

    def __init__(self, first_step: int = 0):
        self.first_step = first_step
        self.steps: list[DeviceWaits] = []
        self._waits: DeviceWaits | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.first_step:
            self._waits = DeviceWaits().__enter__()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._waits is not None:
            self._waits.__exit__(None, None, None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._waits is not None:
            self._waits.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._waits is not None:
            self._waits.__exit__(None, None, None)
            self.steps.append(self._waits)
            self._waits = None

    def by_source(self) -> dict[str, float]:
        """Mean waits per counted step, by source, most first."""
        totals: collections.Counter[str] = collections.Counter()
        for waits in self.steps:
            totals.update(waits.by_source())
        return {source: count / len(self.steps) for source, count in totals.most_common()}


def _waits(name: str, args: tuple, kwargs: dict) -> bool:
    if name in WAITING_OPS:
        return True
    if name == "repeat_interleave":  # (repeats) or (self, repeats, dim); output_size is keyword-only
        repeats = args[1] if len(args) > 1 else args[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if name in ("_to_copy", "copy_"):
        source, target = (args[0], kwargs.get("device")) if name == "_to_copy" else (args[1], args[0].device)
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


def _caller() -> str:
    """``path:line`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_TORCH) or frame.filename == __file__:
            continue
        path = frame.filename
        if "-packages" + os.sep in path:
            path = path.rsplit("-packages" + os.sep, 1)[1]
        elif path.startswith(os.getcwd() + os.sep):
            path = os.path.relpath(path)
        return f"{path}:{frame.lineno}"
    return "torch"
