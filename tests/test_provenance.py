"""Merge provenance: an adapter merges only into the base it was trained on, once, never over its inputs."""

from __future__ import annotations

import json
import os
import stat

import pytest
from peft import get_peft_model

from bimedix.core.outputs import OutputError
from bimedix.training.merge import merge_adapter
from bimedix.training.moe.targets import build_lora_config
from bimedix.training.provenance import BASE_RECORD, ProvenanceError, base_fingerprint, write_base_record
from bimedix.training.tiny import build_tiny_model


def _adapter(tmp_path, seed: int = 0, *, record: bool = True, name: str | None = None):
    """A LoRA adapter (random router deltas) trained, as it were, on ``tiny:mixtral:<seed>``."""
    base = build_tiny_model("mixtral", seed=seed)
    model = get_peft_model(base, build_lora_config(build_tiny_model(), "paper", r=4))
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B and ".gate" in module_name:
            module.lora_B["default"].weight.data.normal_(0, 0.5)
    folder = tmp_path / f"adapter-{seed}"
    model.save_pretrained(folder)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": name}))
    if record:
        write_base_record(folder, f"tiny:mixtral:{seed}",
                          base_fingerprint(build_tiny_model("mixtral", seed=seed)))
    return folder


def test_fingerprint_tells_same_shaped_bases_apart_and_ignores_dtype():
    first, again, other = (base_fingerprint(build_tiny_model("mixtral", seed=s)) for s in (0, 0, 1))
    assert first == again
    assert first["config"] == other["config"] and first["shapes"] == other["shapes"]
    assert first["tensors"] != other["tensors"]
    assert base_fingerprint(build_tiny_model("mixtral",
                                             seed=0).to(dtype=__import__("torch").bfloat16)) == first


def test_adapter_trained_on_another_base_of_the_same_shape_is_refused(tmp_path, caplog):
    adapter = _adapter(tmp_path, seed=0)
    with pytest.raises(ProvenanceError,
                       match=r"trained on 'tiny:mixtral:0'.*differs from it in tensors.*--force"):
        merge_adapter("tiny:mixtral:1", adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    report = merge_adapter("tiny:mixtral:1", adapter, tmp_path / "merged", force=True)
    assert report["provenance"] == "fingerprint" and "--force" in caplog.text
    assert merge_adapter("tiny:mixtral:0", adapter, None)["max_abs_diff_merged_vs_adapter"] <= 1e-3


def test_adapter_without_a_record_is_checked_by_its_base_name(tmp_path):
    adapter = _adapter(tmp_path, seed=0, record=False, name="tiny:mixtral:0")
    with pytest.raises(ProvenanceError,
                       match=r"trained on 'tiny:mixtral:0' \(adapter_config.json\), not --base"):
        merge_adapter("tiny:mixtral:1", adapter, None)
    assert merge_adapter("tiny:mixtral:0", adapter, None)["provenance"] == "name"


def test_merging_the_same_adapter_twice_is_refused(tmp_path, tiny_model_dir):
    adapter = _adapter(tmp_path, seed=0)
    first = merge_adapter("tiny:mixtral:0", adapter, tmp_path / "once")
    assert first["merged"] and [entry["adapter"] for entry in first["merged_adapters"]] == [str(adapter)]
    with pytest.raises(ProvenanceError, match=r"already holds the adapter .*apply it twice"):
        merge_adapter(str(tmp_path / "once"), adapter, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("target", ["base", "adapter", "inside-adapter"])
def test_output_may_not_be_the_base_or_adapter_folder(tmp_path, tiny_model_dir, target):
    from bimedix.cli import main

    adapter = _adapter(tmp_path, seed=0, record=False)
    before = {path: path.read_bytes() for folder in (tiny_model_dir, adapter) for path in folder.iterdir()}
    output = {"base": tiny_model_dir, "adapter": adapter, "inside-adapter": adapter / "merged"}[target]
    with pytest.raises(OutputError, match=r"would overwrite the input --(base|adapter)"):
        merge_adapter(str(tiny_model_dir), adapter, output)
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--output", str(output),
                 "--overwrite", "--force"]) == 2
    assert {path: path.read_bytes() for folder in (tiny_model_dir, adapter)
            for path in folder.iterdir()} == before


def test_merged_files_get_the_default_mode_and_a_manifest(tmp_path):
    adapter = _adapter(tmp_path, seed=0)
    merge_adapter("tiny:mixtral:0", adapter, tmp_path / "merged")
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "merged").iterdir()
             if not path.name.startswith(".")}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}
    assert (adapter / BASE_RECORD).is_file()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        merge_adapter("tiny:mixtral:0", adapter, tmp_path / "foreign")
    # a re-run into its own folder needs no flag
    merge_adapter("tiny:mixtral:0", adapter, tmp_path / "merged")
