"""benchmarks/gpu_check.sh --cpu: the GPU check's steps at tiny sizes on CPU (stack benchmark, full QLoRA from
a checkpoint, merge with its logit check, hf evaluation; vLLM skipped), so the script is known to run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_its_cpu_steps(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--output",
                             str(tmp_path / "check")], capture_output=True, text=True, env=env, timeout=900)
    out = result.stdout
    assert result.returncode == 0, (out + result.stderr)[-3000:]
    for name in ("bf16 experts, PEFT LoRA, grouped_mm", "bf16 experts, folded LoRA",
                 "nf4 experts, PEFT LoRA, grouped_mm", "nf4 experts, folded LoRA"):
        assert re.search(re.escape(name) + r" +experts at rest .* tokens/s", out), name
    assert "experts at rest, bf16 / nf4" in out and "step time, nf4: PEFT / folded" in out
    assert re.search(r"losses: \[[0-9.]+, [0-9.]+\]", out)
    assert "max |merged - adapter| logit difference" in out
    assert (tmp_path / "check" / "eval-hf" / "results.json").is_file()
    assert (tmp_path / "check" / "sft-qlora" / "trainer_state.json").is_file()
    assert "skipped: the vllm backend runs on CUDA only" in out
    existing = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu", "--output",
                               str(tmp_path / "check")], capture_output=True, text=True, env=env, timeout=60)
    assert existing.returncode == 2 and "exists" in existing.stderr
