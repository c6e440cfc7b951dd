"""Hub kernels are opt-in: every bimedix model load goes through `load_pretrained`.

transformers 5.25 turns hub kernels on by default (``from_pretrained(use_kernels=None)`` means *on* unless
the environment sets ``USE_HUB_KERNELS=0``). It then needs the `kernels` package ("Kernels are not
available" otherwise, on CPU too) and, on CUDA, fetches kernels such as ``kernels-community/rotary`` from
the Hub, which fails offline when they are not cached. Hospitals and many clusters run offline, so bimedix
loads models without hub kernels unless the user asks (``--use-kernels`` on ``chat``/``eval``/``merge``,
``use_kernels: true`` in an SFT recipe).

What they gain, on CUDA only (no kernel is mapped for CPU): transformers swaps some layers of Mixtral-family
models for fused kernels from the Hub (``kernels-community/liger-kernels`` RMSNorm,
``kernels-community/rotary`` rotary embeddings, activation kernels at inference), which saves kernel
launches and some activation memory. The results are the same up to rounding.

Examples:

```python
>>> from transformers import AutoModelForCausalLM
>>> from bimedix.hub_kernels import load_pretrained
>>> model = load_pretrained(AutoModelForCausalLM, "runs/merged", dtype="auto")  # doctest: +SKIP
```
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

#: How a user asks for hub kernels, for the messages.
ASK = "--use-kernels / `use_kernels: true`"


class HubKernelsError(RuntimeError):
    """Hub kernels were asked for but cannot be used here (package missing, or not cached while offline)."""


def load_pretrained(cls, path: str | os.PathLike, *, use_kernels: bool = False, **kwargs):
    """``cls.from_pretrained(path, use_kernels=use_kernels, **kwargs)``, with hub kernels off unless asked.

    Args:
        cls: a class with `from_pretrained`, e.g. `transformers.AutoModelForCausalLM`.
        path (`str | os.PathLike`): a model folder or Hub id.
        use_kernels (`bool`, *optional*, defaults to `False`): let transformers swap in hub kernels
            (`kernels` package; on CUDA they come from the Hub or its cache).
        **kwargs: passed to `from_pretrained`.

    Raises:
        `HubKernelsError`: ``use_kernels`` and the `kernels` package is not importable, or a kernel is not
            in the local cache while the Hub is offline; one line with the fix.
    """
    with hub_kernel_errors(use_kernels):
        return cls.from_pretrained(path, use_kernels=use_kernels, **kwargs)


def apply_kernels(model) -> None:
    """Kernelize a model built in-process (``from_config``) as `load_pretrained` does with
    ``use_kernels``."""
    with hub_kernel_errors(True):
        model.set_use_kernels(True)


@contextlib.contextmanager
def hub_kernel_errors(use_kernels: bool) -> Iterator[None]:
    """Run a model load; when ``use_kernels``, check that `kernels` imports first and turn failures raised
    inside the `kernels` package into one-line `HubKernelsError`\\ s with the fix."""
    if use_kernels:
        check_kernels_importable()
    try:
        yield
    except (ValueError, OSError, RuntimeError) as err:
        if not use_kernels or isinstance(err, HubKernelsError) or not _raised_in_kernels(err.__traceback__):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _hub_offline():
            fix = ("run the command once with the Hub reachable (without HF_HUB_OFFLINE=1) to cache the "
                   f"kernels, or drop {ASK} to load without hub kernels")
        else:
            fix = f"check the Hub connection and the kernel's name, or drop {ASK} to load without hub kernels"
        raise HubKernelsError(f"hub kernels were asked for ({ASK}) but could not be loaded: {first_line} "
                              f"Fix: {fix}.") from err


def check_kernels_importable() -> None:
    """Raise `HubKernelsError` when the `kernels` package (in the version transformers needs) is not
    importable."""
    from transformers.utils.import_utils import KERNELS_MAX_VERSION, KERNELS_MIN_VERSION, is_kernels_available

    if not is_kernels_available():
        raise HubKernelsError(
            f"hub kernels were asked for ({ASK}) but the `kernels` package is not importable here "
            f"(transformers needs {KERNELS_MIN_VERSION} <= version < {KERNELS_MAX_VERSION}). Fix: "
            f"`pip install 'kernels>={KERNELS_MIN_VERSION},<{KERNELS_MAX_VERSION}'`, or drop {ASK} to load "
            "without hub kernels.")


def _raised_in_kernels(traceback: TracebackType | None) -> bool:
    """Whether a frame of ``traceback`` runs code of the `kernels` package."""
    try:
        import kernels
    except ImportError:
        return False
    package = Path(kernels.__file__).resolve().parent
    while traceback is not None:
        if package in Path(traceback.tb_frame.f_code.co_filename).resolve().parents:
            return True
        traceback = traceback.tb_next
    return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
