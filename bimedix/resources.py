"""Files the package ships and reads at run time: recipes, card templates, task YAMLs, bundled data.

In a wheel, the repository's top-level ``recipes/`` and ``hub_cards/`` are installed as
``bimedix/recipes`` and ``bimedix/hub_cards`` (see ``setup.cfg``); an editable install maps them
to the checkout. Always reach them through `resource_path`, never through ``__file__`` arithmetic.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_PACKAGES = {"recipes": "bimedix.recipes", "hub_cards": "bimedix.hub_cards", "bimedix": "bimedix"}
RESOURCE_PREFIXES = ("bimedix:", "recipes:")


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


def resolve_resource(path: str | os.PathLike) -> Path:
    """Resolve a ``bimedix:<path>`` or ``recipes:<path>`` reference to the installed file; other paths are
    returned as they are.

    ``bimedix:<path>`` is a path inside the package (``bimedix:data/bundled/...``); ``recipes:<path>`` and
    ``bimedix:recipes/<path>`` are shipped recipe files, which a wheel installs as ``bimedix/recipes``.

    Examples:

    ```python
    >>> resolve_resource("recipes:tiny/sft.yaml") == resource_path("recipes", "tiny", "sft.yaml")
    True
    >>> resolve_resource("bimedix:recipes/tiny/sft.yaml") == resolve_resource("recipes:tiny/sft.yaml")
    True
    >>> resolve_resource("data/train.jsonl")
    PosixPath('data/train.jsonl')

    ```
    """
    text = os.fspath(path)
    if not text.startswith(RESOURCE_PREFIXES):
        return Path(text)
    prefix, _, rest = text.partition(":")
    parts = Path(rest).parts
    if prefix == "bimedix" and parts[:1] == ("recipes",):
        prefix, parts = "recipes", parts[1:]
    return resource_path(prefix, *parts)


def check_model_folder(name: str, option: str = "--model") -> None:
    """Refuse a model name that can only be a local path (absolute, ``./``, ``../``, ``~``, or with more than
    one ``/``) when no such folder exists, instead of letting transformers report it as a bad Hub id.

    Args:
        name (`str`): a local folder or a Hub id (``org/name`` or ``name``).
        option (`str`, *optional*, defaults to `"--model"`): the option that named it, for the message.

    Raises:
        `FileNotFoundError`: naming the folder and the fix.
    """
    looks_local = (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name
                   or name in (".", ".."))
    path = Path(name).expanduser()
    if looks_local and not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{option} {name}: no such model folder "
                                f"({path} {what}); pass the folder that "
                                "holds config.json and the weights, or a Hub id such as org/name")
