"""Files the package ships and reads at run time: recipes, card templates, task YAMLs, bundled data.

In a wheel, the repository's top-level ``recipes/`` and ``hub_cards/`` are installed as
``bimedix/recipes`` and ``bimedix/hub_cards`` (see ``setup.cfg``); an editable install maps them
to the checkout. Always reach them through `resource_path`, never through ``__file__`` arithmetic.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_PACKAGES = {"recipes": "bimedix.recipes", "hub_cards": "bimedix.hub_cards", "bimedix": "bimedix"}


def resource_path(kind: str, *parts: str) -> Path:
    """Return the path of a shipped file or folder.

    Args:
        kind (`str`): ``"recipes"``, ``"hub_cards"`` or ``"bimedix"`` (the package itself).
        *parts (`str`): path components below it, e.g. ``resource_path("recipes", "tiny", "sft.yaml")``.

    Raises:
        `FileNotFoundError`: if the file is not part of this installation.
    """
    if kind not in _PACKAGES:
        raise ValueError(f"Unknown resource kind {kind!r}; choose one of {sorted(_PACKAGES)}.")
    root = resources.files(_PACKAGES[kind])
    path = Path(str(root.joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"{'/'.join(parts)} is not shipped in {_PACKAGES[kind]} (looked in {path}).")
    return path
