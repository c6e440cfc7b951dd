"""``bimedix eval-chat`` end to end on the bundled examples and the fake OpenAI-compatible server: English
and Arabic, scores equal to HealthBench's formula computed here, free re-runs, kill -9 resumes, injected
faults."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from llm_support import MODEL, PRICES, SECRET, read_jsonl
from process_support import WatchedProcess

from bimedix.cli import main
from bimedix.llm.cache import RequestCache
from bimedix.llm.fake_server import FakeOpenAIServer, Fault, Reply, default_responder
from bimedix.resources import resource_path

EXAMPLES = resource_path("bimedix", "eval", "rubric_examples")
JUDGE = "test-judge"


REVIEWED_ARABIC = ("--languages", "en,ar", "--data-ar", str(EXAMPLES / "examples_ar.jsonl"))


def command(base_url: str, tmp_path, out: str = "out", *extra: str) -> list[str]:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({**PRICES, JUDGE: {"input": 2.0, "output": 8.0}}))
    return [
        "eval-chat",
        "--data",
        str(EXAMPLES / "examples_en.jsonl"),
        "--output",
        str(tmp_path / out),
        "--model",
        MODEL,
        "--base-url",
        base_url,
        "--judge-base-url",
        base_url,
        "--judge-model",
        JUDGE,
        "--prices",
        str(prices),
        "--concurrency",
        "4",
        "--timeout",
        "10",
        *extra,
    ]


def expected_results(lines: list[dict]) -> dict[str, float]:
    """HealthBench's overall score per language, recomputed from examples.jsonl with the fake judge's rule."""
    scores: dict[str, list[float]] = {}
    for line in lines:
        met = [
            hashlib.sha256(f"{c['criterion']}\n{line['reply']}".encode()).digest()[0] % 2 == 0
            for c in line["criteria"]
        ]
        assert [c["criteria_met"] for c in line["criteria"]] == met
        possible = sum(c["points"] for c in line["criteria"] if c["points"] > 0)
        achieved = sum(c["points"] for c, hit in zip(line["criteria"], met) if hit)
        scores.setdefault(line["language"], []).append(achieved / possible)
    return {language: min(1.0, max(0.0, sum(values) / len(values))) for language, values in scores.items()}


def test_english_and_arabic_scores_match_healthbench_formula_and_rerun_is_free(
    server, api_key, tmp_path, capsys
):
    argv = command(server.base_url, tmp_path, "out", "--languages", "en,ar", "--calibration-sample", "4")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "EN score [95% CI]" in printed and "AR score [95% CI]" in printed and "EN↔AR" in printed
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    lines = read_jsonl(out / "examples.jsonl")
    assert sorted((line["language"], line["prompt_id"]) for line in lines) == sorted(
        (language, f"bx-00{i}") for language in ("en", "ar") for i in range(1, 9)
    )
    for line in lines:
        assert all(c["explanation"].startswith("Fake verdict") for c in line["criteria"])
        if line["language"] == "en":  # the fake model echoes the last user turn
            assert line["reply"] == f"echo: {line['prompt'][-1]['content'][:200]}"
        else:
            assert line["translation"]["machine_translated"] is True and not line["translation"]["reviewed"]
    expected = expected_results(lines)
    for language in ("en", "ar"):
        assert results[language]["score"] == pytest.approx(expected[language])
        assert results[language]["n"] == 8 and results[language]["n_failed"] == 0
        low, high = results[language]["ci95"]
        assert low <= results[language]["score"] <= high
        assert set(results[language]["by_theme"]) == {
            "emergency_referrals",
            "context_seeking",
            "global_health",
            "health_data_tasks",
            "communication",
            "hedging",
            "complex_responses",
        }
        assert results[language]["by_theme"]["context_seeking"]["n"] == 2
    assert results["en_ar_agreement"]["n"] == 8 and results["en_ar_agreement"]["criteria"] == 30
    assert results["run"]["complete"] and results["run"]["cost_this_run_usd"] > 0
    arabic = read_jsonl(out / "data_ar.jsonl")
    assert len(arabic) == 8 and all(a["translation"]["machine_translated"] for a in arabic)
    with open(out / "data_ar.review.csv", encoding="utf-8-sig", newline="") as handle:
        queue = list(csv.DictReader(handle))
    english = {x["prompt_id"]: x for x in read_jsonl(out / "examples.jsonl") if x["language"] == "en"}
    assert queue and all(row["decision"] == "" for row in queue)
    for row in queue:  # every queued text next to its English original
        kind, index = row["field"].split(".")
        source = english[row["id"]]
        expected = (
            source["prompt"][int(index)]["content"]
            if kind == "prompt"
            else source["criteria"][int(index)]["criterion"]
        )
        assert row["english"] == expected
    assert "| Overall |" in (out / "table.md").read_text()
    with open(out / "calibration.csv", encoding="utf-8-sig", newline="") as handle:
        sheet = list(csv.DictReader(handle))
    assert len(sheet) == 8 and "criteria_met" not in sheet[0] and "judge" not in " ".join(sheet[0])

    sent, ledger = server.count(), RequestCache(out / "eval-chat.llm.sqlite").total_cost()
    snapshot = {
        name: (out / name).read_bytes() for name in ("results.json", "examples.jsonl", "data_ar.jsonl")
    }
    sheet_before = (out / "calibration.csv").read_bytes()
    assert main(argv) == 0
    assert server.count() == sent  # nothing asked again
    assert RequestCache(out / "eval-chat.llm.sqlite").total_cost() == ledger
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["run"]["cost_this_run_usd"] == 0
    for name, data in snapshot.items():
        if name != "results.json":
            assert (out / name).read_bytes() == data
    assert {k: v for k, v in rerun.items() if k != "run"} == {k: v for k, v in results.items() if k != "run"}
    assert (out / "calibration.csv").read_bytes() == sheet_before  # clinicians' sheet never rewritten
    assert "not rewritten" in capsys.readouterr().out


def test_faults_and_malformed_verdicts_change_nothing(api_key, tmp_path):
    with FakeOpenAIServer() as server:
        assert main(command(server.base_url, tmp_path, "clean")) == 0
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())

    judged: dict[str, int] = {}

    def flaky(body):  # the first answer to every grader prompt is not JSON, the second lacks criteria_met
        key = json.dumps(body["messages"])
        if "# Rubric item" in key and body.get("seed") in (0, 1) and judged.get(key, 0) < 2:
            judged[key] = judged.get(key, 0) + 1
            return Reply("I think it is met." if judged[key] == 1 else '{"explanation": "x"}')
        return default_responder(body)

    with FakeOpenAIServer(flaky) as server:
        server.inject(
            Fault("status", 429, {"Retry-After": "0.01"}),
            Fault("status", 500),
            Fault("malformed"),
            Fault("truncated"),
            Fault("status", 503),
        )
        assert main(command(server.base_url, tmp_path, "faulty", "--max-retries", "3")) == 0
    faulty = json.loads((tmp_path / "faulty" / "results.json").read_text())
    assert {k: v for k, v in faulty.items() if k != "run"} == {k: v for k, v in clean.items() if k != "run"}
    assert judged and all(count == 2 for count in judged.values())


def test_always_malformed_verdict_is_a_counted_failure(api_key, tmp_path, capsys):
    def stubborn(body):
        text = body["messages"][-1]["content"]
        if "# Rubric item" in text and "[-10] Advises waiting" in text:
            return Reply('{"explanation": "x", "criteria_met": "false"}')
        return default_responder(body)

    with FakeOpenAIServer(stubborn) as server:
        assert main(command(server.base_url, tmp_path, "out", "--judge-attempts", "2")) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["en"]["n"] == 7 and results["en"]["n_failed"] == 1
    line = next(x for x in read_jsonl(tmp_path / "out" / "examples.jsonl") if x["prompt_id"] == "bx-001")
    failed = line["criteria"][2]
    assert line["score"] is None and failed["criteria_met"] is None
    assert failed["failure"].count("not true or false") == 2
    assert "1 example(s) left out" in capsys.readouterr().out


def test_reviewed_arabic_set_and_judge_agreement(server, api_key, tmp_path, capsys):
    argv = command(
        server.base_url,
        tmp_path,
        "out",
        *REVIEWED_ARABIC,
        "--calibration-sample",
        "30",
    )
    assert main(argv) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert "--data-ar" in results["run"]["arabic_source"] and not (out / "data_ar.jsonl").exists()
    assert server.count() == 16 + 60  # replies + one verdict per criterion, no translation
    lines = {(x["language"], x["prompt_id"]): x for x in read_jsonl(out / "examples.jsonl")}
    assert lines["ar", "bx-003"]["prompt"][0]["content"].startswith("هل من الآمن")

    # a clinician agrees with the judge except on the first two Arabic pairs
    with open(out / "calibration.csv", encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60
    truth = {}
    for index, row in enumerate(rows):
        language, prompt_id, criterion = row["pair_id"].split(":")
        judge = lines[language, prompt_id]["criteria"][int(criterion)]["criteria_met"]
        flip = language == "ar" and index - next(i for i, r in enumerate(rows) if r["language"] == "ar") < 2
        row.update(clinician_met="yes" if judge != flip else "no", clinician="dr-a")
        truth[row["pair_id"]] = (judge, judge != flip)
    with open(tmp_path / "filled.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["eval-chat", "--output", str(out), "--agreement", str(tmp_path / "filled.csv")]) == 0
    report = json.loads((out / "agreement.json").read_text())
    for language in ("en", "ar"):
        pairs = [v for k, v in truth.items() if k.startswith(language)]
        tp = sum(j and c for j, c in pairs)
        fp = sum(j and not c for j, c in pairs)
        fn = sum(c and not j for j, c in pairs)
        tn = sum(not j and not c for j, c in pairs)
        macro = (2 * tp / (2 * tp + fp + fn) + 2 * tn / (2 * tn + fp + fn)) / 2
        assert report[language]["macro_f1"] == pytest.approx(macro)
        assert report[language]["pairs"] == 30
    assert report["en"]["macro_f1"] == 1.0 and report["ar"]["macro_f1"] < 1.0
    assert "macro F1" in capsys.readouterr().out

    rows[0]["clinician_met"] = "maybe"
    with open(tmp_path / "bad.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["eval-chat", "--output", str(out), "--agreement", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv:row 2: column `clinician_met`: 'maybe' is not yes or no" in capsys.readouterr().err


def test_bad_input_one_line_error_or_skip(server, api_key, tmp_path, capsys):
    lines = (EXAMPLES / "examples_en.jsonl").read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[1])
    broken["rubrics"][0]["points"] = 0
    data = tmp_path / "hb.jsonl"
    data.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:4]]) + "\n", encoding="utf-8")
    argv = command(server.base_url, tmp_path, "out")
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{data}:2: field `rubrics[0].points`: is 0" in err
    assert main(argv + ["--on-error", "skip", "--overwrite"]) == 0
    assert "skipped 1 bad input line(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["en"]["n"] == 3
    assert main(argv[: argv.index("--judge-model")] + ["--output", str(tmp_path / "x")]) == 2


def test_budget_stop_then_rerun_finishes(server, api_key, tmp_path, capsys):
    argv = command(server.base_url, tmp_path, "out", "--judge-max-tokens", "200", "--max-new-tokens", "100")
    assert main(argv + ["--budget-usd", "0.01"]) == 3
    assert "stopped early: budget" in capsys.readouterr().out
    assert RequestCache(tmp_path / "out" / "eval-chat.llm.sqlite").total_cost() <= 0.01
    assert not json.loads((tmp_path / "out" / "results.json").read_text())["run"]["complete"]
    assert main(argv + ["--budget-usd", "1"]) == 0


def test_kill9_resumes_without_paying_twice(api_key, tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with FakeOpenAIServer(latency=0.02) as server:
        argv = [
            sys.executable,
            "-m",
            "bimedix",
            *command(server.base_url, tmp_path, "out", "--languages", "en,ar"),
        ]
        cache_path = tmp_path / "out" / "eval-chat.llm.sqlite"
        with WatchedProcess(argv, env=env) as run:
            # the signal: requests reaching the server; fails at once, with the output, if it ends first
            run.wait_until(lambda: server.count() >= 40, "40 requests", poll=0.005)
            run.send_signal(signal.SIGKILL)
            run.finish()
        # The server logs a request before it answers, so everything the cache holds is in the log by now;
        # requests still in flight land later and were not recorded (nothing to wait for).
        recorded = RequestCache(cache_path).keys()
        count_at_kill = server.count()
        assert 0 < len(recorded) <= count_at_kill
        final = subprocess.run(argv, env=env, capture_output=True, timeout=300)
        assert final.returncode == 0, final.stderr.decode()[-2000:]
        log = list(server.log)
    assert len(recorded) < len(RequestCache(cache_path).keys())  # the kill came part-way
    assert [item for item in log[count_at_kill:] if item.body_hash in recorded] == []
    served = [item for item in log if item.outcome == "ok"]
    assert len(served) - len({item.body_hash for item in served}) <= 4  # only requests in flight at the kill
    with FakeOpenAIServer() as clean_server:
        assert main(command(clean_server.base_url, tmp_path, "clean", "--languages", "en,ar")) == 0
    resumed = json.loads((tmp_path / "out" / "results.json").read_text())
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "run"} == {k: v for k, v in clean.items() if k != "run"}
    assert all(SECRET.encode() not in path.read_bytes() for path in (tmp_path / "out").iterdir())


def test_local_model_replies_are_generated_once(tiny_model_dir, api_key, server, tmp_path, monkeypatch):
    from bimedix.chat import ChatSession

    loads = []
    original = ChatSession.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "from_pretrained", classmethod(counting))
    data = tmp_path / "two.jsonl"
    data.write_text(
        "".join((EXAMPLES / "examples_en.jsonl").read_text(encoding="utf-8").splitlines(True)[:2]),
        encoding="utf-8",
    )
    argv = command(server.base_url, tmp_path, "out", "--max-new-tokens", "8", "--device", "cpu")
    argv[argv.index("--data") + 1] = str(data)
    argv[argv.index("--model") + 1] = str(tiny_model_dir)
    del argv[argv.index("--base-url") : argv.index("--base-url") + 2]
    assert main(argv) == 0
    first = read_jsonl(tmp_path / "out" / "examples.jsonl")
    assert len(first) == 2 and len(loads) == 1
    assert main(argv) == 0
    assert len(loads) == 1  # every reply came from the run's cache
    assert read_jsonl(tmp_path / "out" / "examples.jsonl") == first


def test_push_dry_run_puts_the_table_in_the_model_card(server, api_key, tmp_path, tiny_adapter_dir):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    assert (
        main(
            command(
                server.base_url,
                tmp_path,
                "out",
                *REVIEWED_ARABIC,
            )
        )
        == 0
    )
    staged = tmp_path / "staged"
    assert (
        main(
            [
                "push",
                "adapter",
                str(tiny_adapter_dir),
                "--repo-id",
                "me/tiny",
                "--dry-run",
                str(staged),
                "--eval-chat",
                str(out),
            ]
        )
        == 0
    )
    text = (staged / "README.md").read_text(encoding="utf-8")
    assert "### Open-ended answers (rubric grading)" in text
    assert (out / "table.md").read_text(encoding="utf-8").strip() in text
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(staged / "README.md")
    scores = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert scores == {
        f"Rubric-graded open-ended answers ({language})": round(results[language]["score"], 4)
        for language in ("en", "ar")
    }


def test_clinician_review_of_the_arabic_translation(server, api_key, tmp_path, capsys):
    argv = command(server.base_url, tmp_path, "out", "--languages", "en,ar")
    assert main(argv) == 0
    out = tmp_path / "out"
    with open(out / "data_ar.review.csv", encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    queued = sorted({row["id"] for row in rows})
    assert len(queued) >= 2
    approve, edit = queued[0], queued[1]
    rows = [row for row in rows if row["id"] in (approve, edit)]
    for row in rows:
        row["decision"] = "approve"
    target = next(row for row in rows if row["id"] == edit and row["field"] == "rubrics.0")
    target.update(arabic="معيار مصحح من الطبيب", decision="edit")
    reject = next(row for row in read_jsonl(out / "data_ar.jsonl") if row["prompt_id"] not in queued)
    rows.append(
        {
            **rows[0],
            "id": reject["prompt_id"],
            "field": "prompt.0",
            "arabic": reject["prompt"][0]["content"],
            "decision": "reject",
        }
    )

    def write(name, table):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        return str(tmp_path / name)

    bad = [dict(row) for row in rows]
    bad[0]["decision"] = "ok"
    assert (
        main(
            ["eval-chat", "--output", str(out), "--apply-review", write("bad.csv", bad), "--reviewer", "dr-a"]
        )
        == 2
    )
    assert "bad.csv:row 2: column `decision`: 'ok' is not one of" in capsys.readouterr().err
    assert not (out / "data_ar.reviewed.jsonl").exists()

    assert (
        main(
            [
                "eval-chat",
                "--output",
                str(out),
                "--apply-review",
                write("done.csv", rows),
                "--reviewer",
                "dr-a",
            ]
        )
        == 0
    )
    assert "1 approved, 1 edited, 1 rejected (left out)" in capsys.readouterr().out
    reviewed = {row["prompt_id"]: row for row in read_jsonl(out / "data_ar.reviewed.jsonl")}
    assert len(reviewed) == 7 and reject["prompt_id"] not in reviewed
    assert reviewed[edit]["rubrics"][0]["criterion"] == "معيار مصحح من الطبيب"
    assert reviewed[edit]["translation"]["review_state"] == "edited"
    assert reviewed[approve]["translation"] | {"reviewed": True} == reviewed[approve]["translation"]
    audit = read_jsonl(out / "data_ar.reviewed.audit.jsonl")
    assert len(audit) == len(rows) and {entry["reviewer"] for entry in audit} == {"dr-a"}

    assert (
        main(
            command(
                server.base_url,
                tmp_path,
                "rev",
                "--languages",
                "en,ar",
                "--data-ar",
                str(out / "data_ar.reviewed.jsonl"),
            )
        )
        == 0
    )
    results = json.loads((tmp_path / "rev" / "results.json").read_text())
    assert results["ar"]["n"] == 7 and "2 of 7 examples marked reviewed" in results["run"]["arabic_source"]
    assert results["run"]["untranslated"] == [
        {"prompt_id": reject["prompt_id"], "reason": f"not in {out / 'data_ar.reviewed.jsonl'}"}
    ]


def test_batch_api_gives_the_same_scores_at_half_the_judge_price(api_key, tmp_path):
    with FakeOpenAIServer() as server:
        assert main(command(server.base_url, tmp_path, "online", "--languages", "en,ar")) == 0
    with FakeOpenAIServer() as server:
        argv = command(
            server.base_url,
            tmp_path,
            "batch",
            "--languages",
            "en,ar",
            "--batch-api",
            "--batch-poll-interval",
            "0.01",
        )
        assert main(argv) == 0
        assert server.count() == 16  # only the replies of the model under test were asked directly
        assert server.count("batch") > 60 and server.count("/v1/batches") >= 2
        served = server.count("batch")
        assert main(argv) == 0 and server.count("batch") == served and server.count() == 16
    online = json.loads((tmp_path / "online" / "results.json").read_text())
    batch = json.loads((tmp_path / "batch" / "results.json").read_text())
    assert {k: v for k, v in batch.items() if k != "run"} == {k: v for k, v in online.items() if k != "run"}
    assert batch["run"]["ledger_usd"] < online["run"]["ledger_usd"]


def test_arabic_only_limit_and_mismatched_arabic_set(server, api_key, tmp_path, capsys):
    argv = command(
        server.base_url,
        tmp_path,
        "out",
        "--languages",
        "ar",
        "--limit",
        "3",
        "--data-ar",
        str(EXAMPLES / "examples_ar.jsonl"),
    )
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"ar", "run"} and results["ar"]["n"] == 3
    assert server.count() == 3 + sum(
        len(x["criteria"]) for x in read_jsonl(tmp_path / "out" / "examples.jsonl")
    )
    arabic = [
        json.loads(line) for line in (EXAMPLES / "examples_ar.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    arabic[2]["rubrics"][0]["points"] = 1
    (tmp_path / "ar.jsonl").write_text(
        "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in arabic), encoding="utf-8"
    )
    argv[argv.index("--data-ar") + 1] = str(tmp_path / "ar.jsonl")
    assert main(argv[:-4] + ["--data-ar", str(tmp_path / "ar.jsonl"), "--overwrite"]) == 2
    assert (
        "prompt_id 'bx-003': field `rubrics`: the criteria's points [1, 5, -10] differ"
        in capsys.readouterr().err
    )
