"""Ctrl-C (a real SIGINT) in long commands: one line, exit 130, no traceback, no partial files, re-run
resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from llm_support import MODEL, PRICES, SECRET, mcqa_record, read_jsonl, write_jsonl
from process_support import WatchedProcess

from bimedix.cli import INTERRUPTED
from bimedix.llm.fake_server import FakeOpenAIServer


def _interrupt(command: list[str], ready, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start ``command``, send SIGINT once ``ready()`` is true (failing at once, with the output, if the
    command ends first), and return the finished process."""
    with WatchedProcess(command, env=env) as run:
        run.wait_until(ready, what)
        run.send_signal(signal.SIGINT)
        return run.finish()


def _assert_clean_interrupt(result: subprocess.CompletedProcess, command: str, output: Path) -> None:
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"bimedix {command}: {INTERRUPTED}"
    assert result.stderr.count(INTERRUPTED) == 1
    assert [p for p in output.rglob("*") if p.name.endswith(".tmp")] == []  # nothing half-written left behind


def test_ctrl_c_in_build_data_then_rerun(tmp_path):
    output = tmp_path / "data"
    command = [sys.executable, "-m", "bimedix", "build-data", "--recipe", "mini", "--output", str(output)]
    result = _interrupt(command, lambda: (output / ".work" / "sources").exists(), "the convert stage")
    _assert_clean_interrupt(result, "build-data", output)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Total: read 155 = written 141" in rerun.stdout


def test_ctrl_c_in_translate_then_rerun(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(6)])
    (tmp_path / "prices.json").write_text(json.dumps(PRICES))
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with FakeOpenAIServer(latency=0.3) as server:
        command = [sys.executable, "-m", "bimedix", "translate", "--input", str(tmp_path / "en.jsonl"),
                   "--output", str(tmp_path / "out" / "ar.jsonl"), "--base-url", server.base_url, "--model",
                   MODEL,
                   "--prices", str(tmp_path / "prices.json"), "--concurrency", "2"]
        result = _interrupt(command, lambda: server.count() >= 3, "3 requests", env)
        _assert_clean_interrupt(result, "translate", tmp_path / "out")
        rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    written = read_jsonl(tmp_path / "out" / "ar.jsonl") + read_jsonl(tmp_path / "out" / "ar.rejects.jsonl")
    assert len(written) == 6
