"""The machine-readable README of a built dataset folder: YAML front matter whose ``configs:``
`datasets.load_dataset` reads.

Builders write only this part; the prose card (statistics, sources, licences, limitations) is rendered from
the ``hub_cards/`` templates by `bimedix.hub.cards`, which keeps these ``configs``.
"""

from __future__ import annotations

import yaml


def configs_readme(configs: list[dict]) -> str:
    """A README holding only the YAML front matter ``configs: ...``."""
    return "---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False, allow_unicode=True) + "---\n"
