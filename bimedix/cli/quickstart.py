"""``bimedix quickstart --output DIR``: the whole pipeline on CPU, from bundled real data to a dry-run Hub
push.

Steps, each built on the public function of its area, everything written under ``--output``::

    data/         `bimedix.data.build.build_data` with the shipped ``mini`` recipe (bundled real data)
    base-model/   a tiny random Mixtral-shaped MoE (`bimedix.training.tiny.save_tiny_model`), real tokenizer
    adapter/      LoRA on attention + router + experts, plus the output head, trained by
    `bimedix.training.sft.main`
                  (recipe ``recipes/tiny/sft.yaml``, data swapped for ``data/``)
    eval/         `bimedix.eval.run.evaluate` on the bundled benchmark slices, English and Arabic
    hub/adapter/  the dry-run push of the adapter (README.md = the model card), `bimedix.hub.push.push`
    hub/dataset/  the dry-run push of the dataset (README.md = the dataset card)

Re-running resumes the data build and redoes the rest. ``--output`` must be new, empty or an earlier
quickstart's folder (``--overwrite`` allows another non-empty folder; its other files are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.outputs import OutputFolder
from ..resources import resource_path
from ..training.masking import assistant_token_mask, mask_summary, render_mask
from ..training.template import apply_vicuna_template, to_messages
from . import _options

DEFAULT_REPO = "your-name/bimedix-tiny-quickstart"
EAGER_EXPERTS = {"experts_implementation": "eager"}


def register(subparsers) -> None:
    parser = _options.add_command(
        subparsers, "quickstart", run,
        help="run the whole pipeline on CPU: data, masked sample, tiny MoE LoRA training, EN/AR eval, "
             "model card, dry-run push")
    _options.add_output(parser, "folder for everything the run writes")
    parser.add_argument("--max-steps", type=int, default=30,
                        help="optimizer steps of the LoRA run (default: 30)")
    parser.add_argument("--limit", type=int, default=10,
                        help="questions per benchmark subset and language "
                             "(default: 10; the bundled slices hold 15)")
    parser.add_argument("--tasks", default="auto",
                        help="lm-eval tasks (default: auto = every bundled "
                             "subset, bilingual where both languages ship)")
    parser.add_argument("--repo-id", default=DEFAULT_REPO,
                        help=f"repo id written into the cards (default: {DEFAULT_REPO})")
    _options.add_seed(parser, 42, "the tiny model and of training")
    _options.add_no_progress(parser)
    _options.add_overwrite(parser, "quickstart")


def run(args: argparse.Namespace) -> int:
    """Build the mini BiMed dataset from bundled real data, train a tiny random MoE with LoRA on attention +
    router + experts (and its output head), evaluate it in English and Arabic, render its card and write a
    dry-run Hub push. A few minutes on 2 CPU cores; nothing is downloaded."""
    start = time.monotonic()

    out = args.output
    folder = OutputFolder(out, "quickstart", overwrite=args.overwrite)
    paths = {name: folder.folder(name) for name in ("data", "base-model", "adapter", "eval")}
    paths["hub"] = out / "hub"

    _step(1, "Build the mini BiMed dataset from the bundled real data (bimedix build-data --recipe mini)")
    from ..data.build import build_data
    from ..hub.cards import save_dataset_card

    built = build_data("mini", paths["data"], progress=not args.no_progress,  # with its card, as build-data
                       finish=lambda staging: save_dataset_card(staging, name=paths["data"]))
    print(built.stats.to_markdown())
    print(f"\n{built.counts.equation()}")

    _step(2, "One training sample: green = trained (assistant answer + </s>), dim = not trained")
    _show_masked_sample(paths["data"], plain=not sys.stdout.isatty())

    _step(3, f"Train a tiny random MoE with LoRA on attention + router + experts, and its output head "
             f"({args.max_steps} steps, CPU)")
    trainer = _train(paths, args)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"\ntraining loss: {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step)"
          + ("" if losses[-1] < losses[0] else "  [did not fall: try more --max-steps]"))

    _step(4, "Evaluate on the bundled benchmark slices in English and Arabic (lm-eval, log-likelihood MCQA)")
    from ..eval.run import evaluate
    from ..eval.tables import format_tables

    results = evaluate(str(paths["base-model"]), peft=str(paths["adapter"]), tasks=args.tasks,
                       limit=args.limit, device="cpu", batch_size=8, model_args=EAGER_EXPERTS,
                       output_dir=paths["eval"])
    print(format_tables(results, model_name="quickstart (tiny random MoE + LoRA)"))

    _step(5, "Render the model and dataset cards and write the dry-run Hub pushes")
    from ..hub.push import push

    folder.remove_tree("hub")  # the dry-run folders must be new: remove the files an earlier run staged there
    folder.folder("hub")  # made (and recorded) by this run, so the folders staged inside are removed with it
    adapter_push = push("adapter", paths["adapter"], repo_id=args.repo_id, dry_run=paths["hub"] / "adapter",
                        eval_dir=paths["eval"], data_dir=paths["data"])
    data_repo = args.repo_id.rsplit("/", 1)[0] + "/bimed-mini"
    dataset_push = push("dataset", paths["data"], repo_id=data_repo, dry_run=paths["hub"] / "dataset")
    for kind, result in (("adapter", adapter_push), ("dataset", dataset_push)):
        for file in result.files:  # recorded, so the next run may remove them
            folder.path("hub", kind, *file.split("/"))
    for note in adapter_push.warnings + dataset_push.warnings:
        print(f"licence note: {note}")
    card = (paths["hub"] / "adapter" / "README.md").read_text(encoding="utf-8")
    # the rest is in the file
    print(card[card.index("## Model details"):card.index("## Training data")].strip())

    _step(6, f"Done in {time.monotonic() - start:.0f} s. Everything is under {out}/")
    rows = [
        ("dataset (Parquet + README configs)", paths["data"]),
        ("dataset statistics", paths["data"] / "stats.md"),
        ("tiny base model", paths["base-model"]),
        ("LoRA adapter", paths["adapter"]),
        ("eval results (lm-eval JSON)", paths["eval"] / "results.json"),
        ("eval tables (markdown)", paths["eval"] / "tables.md"),
        ("model card", paths["hub"] / "adapter" / "README.md"),
        (f"dry-run push of the adapter ({len(adapter_push.files)} files)", paths["hub"] / "adapter"),
        (f"dry-run push of the dataset ({len(dataset_push.files)} files)", paths["hub"] / "dataset"),
    ]
    for label, path in rows:
        print(f"  {label:<42} {path}")
    print(f"\nChat with it:  bimedix chat --model {paths['base-model']} --peft {paths['adapter']}")
    print(f"Publish it:    bimedix push adapter {paths['adapter']} --repo-id ORG/NAME --base-model ORG/BASE")
    return 0


def _step(number: int, title: str) -> None:
    print(f"\n=== [{number}/6] {title}\n", flush=True)


def _show_masked_sample(data_dir: Path, *, plain: bool) -> None:
    """Print the first Arabic training conversation with its trained tokens marked, as TRL will mask it."""
    from datasets import load_dataset

    from ..data.tokenizer import load_mixtral_tokenizer

    tokenizer = load_mixtral_tokenizer()
    apply_vicuna_template(tokenizer)
    dataset = load_dataset(str(data_dir), "ar", split="train")
    # shortest: fits a screen
    record = min(dataset, key=lambda r: sum(len(turn["value"]) for turn in r["conversations"]))
    ids, mask = assistant_token_mask(tokenizer, to_messages(record))
    print(render_mask(tokenizer, ids, mask, plain=plain))
    print(f"\n[{record['id']} ({record['source']}, {record['license']}): {mask_summary(mask)}]")


def _train(paths: dict[str, Path], args: argparse.Namespace):
    """Run the tiny SFT recipe on the built dataset with a saved tiny base model; return the trainer."""
    from trl.scripts.utils import DatasetConfig

    from ..training.sft import main, parse_args
    from ..training.tiny import save_tiny_model

    save_tiny_model(paths["base-model"], arch="mixtral", seed=args.seed)
    flags = ["--config", str(resource_path("recipes", "tiny", "sft.yaml")), "--output_dir",
             str(paths["adapter"]),
             "--max_steps", str(args.max_steps), "--seed", str(args.seed), "--save_strategy", "no",
             # 768 tokens keep the answer of all but the 3 longest mini records (MentalQA, PubMedQA
             # abstracts).
             "--max_length", "768", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
             "1",
             # transformers' default grouped_mm experts are ~10x slower than eager ones on CPU at this size.
             "--model_init_kwargs", json.dumps(EAGER_EXPERTS),
             "--disable_tqdm", str(args.no_progress).lower(),
             # an adapter/ folder no sft run made (an older quickstart's) is written into only when asked
             "--overwrite", str(args.overwrite).lower()]
    script_args, training_args, model_args, mixture_args, bimedix_args = parse_args(flags)
    # Train the saved base model (so the adapter names a folder `eval`, `chat` and `merge` can load) on the
    # built data.
    bimedix_args.tiny_model = None
    model_args.model_name_or_path = str(paths["base-model"].resolve())
    mixture_args.datasets = [DatasetConfig(path=str(paths["data"]))]
    trainer = main(script_args, training_args, model_args, mixture_args, bimedix_args)
    trainer.save_state()  # trainer_state.json (steps, losses) next to the adapter, for the model card
    return trainer
