"""Shared fixtures: offline Hub, the real Mixtral tokenizer, tiny random MoE models, the shared data, the fake
OpenAI-compatible server and a headless browser."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from browser_support import CHROMIUM_ARGS, chromium_path
from llm_support import SECRET

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# A runner that started pytest in the background (`cmd &` in a script, nohup) may pass SIGINT down ignored,
# and an ignored signal stays ignored across exec: the child commands the Ctrl-C tests interrupt would not
# stop. A caught signal resets to the default on exec, so catching it here gives every child Python's usual
# handler.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data in ``../shared/data`` (see its SOURCES.md); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _bimedix_cache(tmp_path_factory) -> None:
    """Keep the converted tokenizer in one per-run cache so tests never touch the user's home."""
    os.environ.setdefault("BIMEDIX_CACHE", str(tmp_path_factory.mktemp("bimedix-cache")))


@pytest.fixture(scope="session")
def mixtral_tokenizer(_bimedix_cache):
    """The real Mixtral-8x7B tokenizer with the Vicuna chat template installed."""
    from bimedix.data.tokenizer import load_mixtral_tokenizer
    from bimedix.training.template import apply_vicuna_template

    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _bimedix_cache) -> Path:
    """A saved tiny random Mixtral (2 layers, 4 experts, top-2) with tokenizer and chat template."""
    from bimedix.training.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), arch="mixtral", seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A saved PEFT LoRA adapter (attention + router + fused experts, r=4) on `tiny_model_dir`, with
    tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bimedix.hub_kernels import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj",
                                           "mlp.experts.down_proj"],
                        init_lora_weights=False)
    output_dir = tmp_path_factory.mktemp("tiny-adapter")
    get_peft_model(model, config).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def eval_bench_dir(tmp_path_factory, fixtures_dir) -> Path:
    """An eval data folder with all nine subsets in English and Arabic: the bundled slice (real rows) plus
    the BiMediX-layout Arabic fixtures for MedQA, MedMCQA and PubMedQA (`tests/fixtures/bimedix_arabic`)."""
    from bimedix.eval.arabic_bench import import_bimedix_arabic
    from bimedix.eval.bench import read_bench, subset_of, write_bench

    tables = read_bench()
    for row in import_bimedix_arabic(fixtures_dir / "bimedix_arabic"):
        if subset_of(row) in ("medqa", "medmcqa", "pubmedqa"):
            tables.setdefault((subset_of(row), "ar"), []).append(row)
    output = tmp_path_factory.mktemp("eval-bench")
    write_bench(tables, output)
    return output


# The fake OpenAI-compatible server and its API key (LLM engine tests), and a headless browser (web apps).
@pytest.fixture(name="api_key")
def api_key_fixture(monkeypatch) -> str:
    """A recognisable fake key in OPENAI_API_KEY, to check it never leaks."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


@pytest.fixture(name="server")
def server_fixture():
    """A fresh scripted server with the default (bimedix-prompt-aware) responder."""
    from bimedix.llm.fake_server import FakeOpenAIServer

    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(scope="module", name="browser")
def browser_fixture():
    """A headless Chromium; skipped (failed under CI, which must install it) when it or Playwright is missing.

    Module-scoped: Playwright's sync API holds an event loop in this thread while it runs, which would break
    the `asyncio.run` of later test modules.
    """
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        reason = ("no headless browser: install Chromium (apt-get install chromium) and Playwright "
                  "(pip install playwright)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs both")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def pytest_terminal_summary(terminalreporter) -> None:
    """Print how many bad inputs the fuzz tests tried (cases x commands), when they ran."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    tried = getattr(fuzz, "TRIED", None)
    if tried:
        ended = ", ".join(f"{count} {outcome}" for outcome, count in sorted(fuzz.OUTCOMES.items()))
        failed = [report for report in terminalreporter.stats.get("failed", [])
                  if "test_fuzz.py" in report.nodeid]
        verdict = f"{len(failed)} fuzz test(s) FAILED" if failed else "0 tracebacks, inputs unchanged"
        terminalreporter.write_line(f"fuzz: {sum(tried.values())} bad inputs tried over {len(tried)} "
                                    f"commands ({', '.join(f'{c} {n}' for c, n in sorted(tried.items()))}); "
                                    f"ended: {ended}; {verdict}")
