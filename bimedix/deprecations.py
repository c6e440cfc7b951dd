"""Deprecation warnings raised inside dependencies on bimedix's own paths, silenced narrowly.

PEFT 0.21 reads ``model.is_gradient_checkpointing`` whenever it wraps a model (`peft.PeftModel`), and
transformers 5.25 deprecates that property with a `FutureWarning` ("use `is_activation_checkpointing`").
bimedix cannot call the current API there, as the read is inside PEFT, so each PEFT wrap bimedix makes (or
has TRL and lm-eval make) runs in `quiet_peft_checkpointing_warning`, which drops that one message and
nothing else.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

#: The start of the message transformers 5.25 gives.
PEFT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def quiet_peft_checkpointing_warning() -> Iterator[None]:
    """Ignore transformers' `FutureWarning` about ``is_gradient_checkpointing`` (read by PEFT) in this block.

    Examples:

    ```python
    >>> with quiet_peft_checkpointing_warning():  # doctest: +SKIP
    ...     model = PeftModel.from_pretrained(base, adapter_dir)
    ```
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)
        yield
