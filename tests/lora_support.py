"""Shared pieces of the LoRA tests: which adapter group a LoRA module belongs to, and which groups trained."""

from __future__ import annotations


def lora_group(name: str) -> str:
    """``router`` (the MoE gate), ``experts`` (fused expert parameters) or the projection name."""
    return "router" if ".gate" in name else "experts" if ".experts" in name else name.rsplit(".", 1)[-1]


def updated_lora_groups(model) -> dict[str, bool]:
    """Per `lora_group`, whether any of its ``lora_B`` weights left zero (where PEFT starts them)."""
    moved: dict[str, bool] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            group = lora_group(name)
            moved[group] = moved.get(group, False) or bool(module.lora_B["default"].weight.abs().sum() > 0)
    return moved
