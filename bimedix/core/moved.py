"""Old module paths that keep working for one release: a module-level ``__getattr__`` (PEP 562) that forwards
each public name to its new module and warns, naming the new path.

Examples:

```python
# bimedix/data/io.py, after the module moved to bimedix/core/io.py
__getattr__ = moved("bimedix.data.io", "bimedix.core.io")
```
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved(old: str, new: str, elsewhere: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """Return the ``__getattr__`` of a module that moved from ``old`` to ``new``.

    Args:
        old (`str`): the deprecated module path, e.g. ``"bimedix.data.io"``.
        new (`str`): the module that now holds its names.
        elsewhere (`Mapping[str, str]`, *optional*): name → module, for names that moved elsewhere.

    Returns:
        `Callable[[str], Any]`: looks a public name up in its new module and emits a `DeprecationWarning`
        naming it there; other names raise `AttributeError`.
    """
    elsewhere = dict(elsewhere or {})

    def __getattr__(name: str) -> Any:
        target = elsewhere.get(name, new)
        module = importlib.import_module(target)
        if name.startswith("_") or not hasattr(module, name):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated and goes in the next release; import {name} from {target}",
                      DeprecationWarning, stacklevel=2)
        return getattr(module, name)

    return __getattr__
