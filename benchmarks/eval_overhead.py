"""Overhead of ``bimedix eval`` over plain ``lm_eval.simple_evaluate`` on equivalent task YAMLs.

Same tiny random Mixtral, same questions (the bundled slice: 9 English + 6 Arabic subsets), hf backend on
CPU. The plain run uses YAMLs that read the same Parquet files through ``dataset_path: parquet`` +
``dataset_kwargs.data_files`` and the same prompt functions; the bimedix run adds data checks, the
``custom_dataset`` loader, the bilingual consistency metric and writing results, samples and tables.
Runs alternate (plain first, then bimedix first) and the median of each is reported, as wall time and as
process CPU time (less sensitive to other load on a shared machine). Inside each bimedix run, the time
spent outside ``simple_evaluate`` (checks, loading, consistency, writing) is also measured directly.
Target: overhead <= 5%.

    python benchmarks/eval_overhead.py [--repeats 4] [--limit 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def plain_tasks(folder: Path) -> list[str]:
    """Write plain lm-eval YAMLs (parquet + data_files) equivalent to the bundled bimedix tasks."""
    from bimedix.eval.bench import available_configs, bundled_data_dir, subset_path
    from bimedix.eval.run import tasks_dir

    shutil.copy(tasks_dir() / "utils.py", folder / "utils.py")
    template = yaml.safe_load((tasks_dir() / "_template.yaml").read_text().replace("!function ", ""))
    names = []
    for config in available_configs(bundled_data_dir()):
        subset, language = config.rsplit("_", 1)
        original = (tasks_dir() / f"bimedix_{subset}_{language}.yaml").read_text(encoding="utf-8")
        description = yaml.safe_load(original).get("description", "")
        name = f"plain_{subset}_{language}"
        body = {k: v for k, v in template.items() if k != "custom_dataset"}
        body |= {"task": name, "dataset_path": "parquet", "description": description,
                 "dataset_kwargs": {"data_files": {"test": str(subset_path(subset, language))}}}
        text = yaml.safe_dump(body, allow_unicode=True, sort_keys=False)
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
            text = text.replace(f"{key}: utils.", f"{key}: !function utils.")
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--limit", type=int, default=5, help="questions per subset (the slice has 15)")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from bimedix.eval.run import auto_tasks, evaluate
    from bimedix.training.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "model", arch="mixtral", seed=0)
        (tmp / "plain").mkdir()
        plain = plain_tasks(tmp / "plain")
        manager = TaskManager(include_path=str(tmp / "plain"), include_defaults=False)
        model_args = {"pretrained": str(model), "dtype": "auto", "use_kernels": False}  # as `evaluate` loads
        inner: list[float] = []
        simple_evaluate = lm_eval.simple_evaluate

        def timed_simple_evaluate(*a, **k):
            start = time.perf_counter()
            try:
                return simple_evaluate(*a, **k)
            finally:
                inner.append(time.perf_counter() - start)

        def run_plain():
            return simple_evaluate(model="hf", model_args=model_args, tasks=plain, task_manager=manager,
                                   limit=args.limit, batch_size=1, device="cpu", log_samples=True)

        def run_bimedix():
            lm_eval.simple_evaluate = timed_simple_evaluate
            try:
                return evaluate(str(model), tasks=auto_tasks(), limit=args.limit, device="cpu",
                                output_dir=tmp / "out")
            finally:
                lm_eval.simple_evaluate = simple_evaluate

        questions = sum(n["effective"] for n in run_plain()["n-samples"].values())  # warm-up, not counted
        run_bimedix()
        inner.clear()
        wall: dict[str, list[float]] = {"plain": [], "bimedix": []}
        cpu: dict[str, list[float]] = {"plain": [], "bimedix": []}
        outside: list[float] = []
        for repeat in range(args.repeats):
            order = [("plain", run_plain), ("bimedix", run_bimedix)]
            for name, run in order if repeat % 2 == 0 else order[::-1]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
                if name == "bimedix":
                    outside.append(wall[name][-1] - inner[-1])
    med = {kind: {name: statistics.median(v) for name, v in d.items()} for kind,
           d in (("wall", wall), ("cpu", cpu))}
    print(f"questions per run: {questions} ({len(plain)} tasks, limit {args.limit}), tiny Mixtral, hf "
          f"backend, CPU, {args.repeats} alternating repeats")
    for kind in ("wall", "cpu"):
        plain_s, bimedix_s = med[kind]["plain"], med[kind]["bimedix"]
        print(f"{kind:4s}  plain simple_evaluate {plain_s:7.2f} s ({questions / plain_s:5.1f} q/s)   "
              f"bimedix evaluate {bimedix_s:7.2f} s ({questions / bimedix_s:5.1f} "
              f"q/s)   ratio {bimedix_s / plain_s:.3f}")
    share = statistics.median(o / (w - o) for o, w in zip(outside, wall["bimedix"]))
    print("bimedix time outside simple_evaluate: median "
          f"{statistics.median(outside):.2f} s = {100 * share:.1f}% "
          "of the lm-eval run (target <= 5%)")

if __name__ == "__main__":
    main()
