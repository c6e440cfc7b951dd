"""Per-criterion grading (strict JSON verdicts, re-asks, counted failures) and HealthBench's score formula."""

from __future__ import annotations

import hashlib
import json

import pytest
from llm_support import make_client, run_closing

from bimedix.data.rubric import Criterion
from bimedix.eval.rubric_scores import axis_scores, bootstrap, example_score, language_agreement, summarize
from bimedix.llm.client import Completion
from bimedix.llm.fake_server import FakeOpenAIServer, Reply, default_responder
from bimedix.llm.grading import GradingConfig, RubricGrader, grader_conversation, parse_verdict
from bimedix.llm.prompts import load_prompt

PROMPT = [{"role": "user", "content": "My chest hurts when I climb stairs."}]
CRITERION = Criterion("Advises seeing a doctor soon", 6, ("axis:accuracy",))


def completion(text: str, finish: str = "stop") -> Completion:
    return Completion(text, finish, 1, 1, 0.0, False, "k")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"explanation": "ok", "criteria_met": true}', (True, "ok")),
        ('```json\n{"explanation": "no", "criteria_met": false}\n```', (False, "no")),
        ("The reply meets it.", "not JSON"),
        ('{"explanation": "x"}', "no `criteria_met`"),
        ('{"explanation": "x", "criteria_met": "true"}', "not true or false"),
        ('{"explanation": "x", "criteria_met": 1}', "not true or false"),
        ("[true]", "not an object"),
    ],
)
def test_parse_verdict_is_strict(text, expected):
    parsed = parse_verdict(completion(text))
    if isinstance(expected, tuple):
        assert parsed == expected
    else:
        assert isinstance(parsed, str) and expected in parsed


def test_cut_off_verdict_is_malformed():
    assert "finish_reason=length" in parse_verdict(completion('{"criteria_met": true', "length"))


def test_grader_prompt_is_healthbench_template():
    messages = load_prompt("grader").render(
        {"conversation": grader_conversation(PROMPT, "See a doctor."), "rubric_item": str(CRITERION)}
    )
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    user = messages[1]["content"]
    assert user.startswith("Your job is to look at a conversation and a rubric item")
    assert (
        "# Conversation\nuser: My chest hurts when I climb stairs.\n\nassistant: See a doctor.\n\n"
        "# Rubric item\n[6] Advises seeing a doctor soon\n\n# Instructions"
    ) in user
    assert user.endswith(
        "Return just the json object in markdown format. Do not include any other text in the response."
    )


def test_grade_with_fake_judge(tmp_path, api_key):
    reply = "Please see a doctor this week."
    with FakeOpenAIServer() as server:
        client = make_client(server.base_url, tmp_path / "c.sqlite")
        verdict = run_closing(
            client, lambda c: RubricGrader(c, GradingConfig()).grade(PROMPT, reply, CRITERION)
        )
    expected = hashlib.sha256(f"{CRITERION.criterion}\n{reply}".encode()).digest()[0] % 2 == 0
    assert verdict.met is expected and verdict.failure is None and verdict.attempts == 1


def test_malformed_verdicts_are_reasked_then_counted_failed(tmp_path, api_key):
    answers = iter(["not json", '{"explanation": "x", "criteria_met": "yes"}'])

    def flaky(body):
        return Reply(next(answers, None) or default_responder(body).text)

    with FakeOpenAIServer(flaky) as server:
        client = make_client(server.base_url, tmp_path / "c.sqlite")
        verdict = run_closing(
            client, lambda c: RubricGrader(c, GradingConfig()).grade(PROMPT, "ok", CRITERION)
        )
        assert verdict.met is not None and verdict.attempts == 3 and server.count() == 3
    with FakeOpenAIServer(lambda body: Reply('{"explanation": "x"}')) as server:
        client = make_client(server.base_url, tmp_path / "d.sqlite")
        verdict = run_closing(
            client, lambda c: RubricGrader(c, GradingConfig(judge_attempts=2)).grade(PROMPT, "ok", CRITERION)
        )
        assert verdict.met is None and verdict.attempts == 2 and server.count() == 2
        assert verdict.failure.count("no `criteria_met`") == 2
        # a re-run asks nothing: every attempt is in the cache
        client = make_client(server.base_url, tmp_path / "d.sqlite")
        again = run_closing(
            client, lambda c: RubricGrader(c, GradingConfig(judge_attempts=2)).grade(PROMPT, "ok", CRITERION)
        )
        assert again == verdict and server.count() == 2


def test_example_score_matches_healthbench_formula():
    criteria = [
        Criterion("a", 5, ("axis:accuracy",)),
        Criterion("b", 3, ("axis:completeness",)),
        Criterion("c", -4, ("axis:accuracy",)),
        Criterion("d", -10, ("axis:completeness",)),
    ]
    assert example_score(criteria, [True, False, True, False]) == pytest.approx((5 - 4) / 8)
    assert example_score(criteria, [False, False, True, True]) == pytest.approx(-14 / 8)  # not clipped here
    assert axis_scores(criteria, [True, True, True, False]) == {
        "accuracy": pytest.approx(1 / 5),
        "completeness": pytest.approx(1.0),
    }
    assert axis_scores([Criterion("n", -2, ("axis:accuracy",))], [True]) == {}  # no positive points


def test_summary_clips_and_bootstraps_reproducibly():
    examples = [
        {"score": s, "themes": [t], "axis_scores": {"accuracy": s}}
        for s, t in [(-0.5, "hedging"), (0.25, "hedging"), (0.5, "communication"), (None, "hedging")]
    ]
    summary = summarize(examples, seed=3)
    assert summary["score"] == pytest.approx(0.25 / 3) and summary["n"] == 3 and summary["n_failed"] == 1
    assert summary["by_theme"]["hedging"]["score"] == 0.0  # mean -0.125, clipped
    lo, hi = summary["ci95"]
    assert 0 <= lo <= summary["score"] <= hi <= 1
    assert summarize(examples, seed=3) == summary
    assert bootstrap([0.5] * 4)["ci95"] == [0.5, 0.5]
    assert summarize([])["score"] is None


def test_language_agreement_pairs_by_prompt_id():
    def graded(pid, score, verdicts):
        return {"prompt_id": pid, "score": score, "criteria": [{"criteria_met": v} for v in verdicts]}

    english = [graded("a", 0.5, [True, False]), graded("b", 1.0, [True, True]), graded("c", None, [None])]
    arabic = [graded("b", 0.5, [True, False]), graded("a", 0.5, [True, False])]
    report = language_agreement(english, arabic)
    assert report["n"] == 2 and report["criteria"] == 4 and report["criterion_agreement"] == 0.75
    assert report["en_higher"] == 1 and report["ar_higher"] == 0
    assert json.loads(json.dumps(report)) == report
