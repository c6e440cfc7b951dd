"""ReviewSession (what `review serve` runs on), judge-vs-reviewer statistics, and the web server's guards:
token (non-ASCII, attempt limit), Host names, body size, security headers on every answer, stale decisions,
ids with `/`, audit path, busy port, missing extra, bad inputs; the pages' shared base. The browser itself is
driven in tests/test_review_app.py."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import sys
import urllib.parse
import urllib.request

import pytest
from browser_support import free_port
from llm_support import mcqa_record, read_jsonl, write_jsonl
from test_review import SCORES, _translated

from bimedix.cli import main
from bimedix.core.outputs import OutputError
from bimedix.llm.review import import_reviews, read_audit
from bimedix.llm.review_session import ReviewSession
from bimedix.llm.review_stats import review_agreement, roc_auc


@pytest.fixture
def files(tmp_path):
    english = write_jsonl(tmp_path / "en.jsonl", [mcqa_record(i) for i in range(len(SCORES))])
    translated = write_jsonl(tmp_path / "ar.jsonl", [_translated(i, s) for i, s in enumerate(SCORES)])
    return english, translated


def test_session_decisions_survive_a_crash_and_equal_review_import(files, tmp_path):
    english, translated = files
    out = tmp_path / "out.jsonl"
    # demo-ar-000 and demo-ar-002 (< 80)
    session = ReviewSession(translated, out, source=english, fraction=0.0)
    assert list(session.items) == ["demo-ar-000", "demo-ar-002"] and session.progress()["left"] == 2
    view = session.view("demo-ar-000")
    assert view["texts"][0]["english"].startswith("Answer the following") and view["score"] == 55
    session.decide("demo-ar-000", "edit", {"options.1": "خيار ب المصحح"}, reviewer="Dr. Amal")
    with open(session.audit, "ab") as trail:  # a crash in the middle of the next decision's write
        trail.write(b'{"id": "demo-ar-002", "fie')
    restarted = ReviewSession(translated, out, source=english, fraction=0.0)
    assert restarted.state("demo-ar-000") == "edited" and restarted.state("demo-ar-002") == "undecided"
    with pytest.raises(ValueError, match="needs a reason"):
        restarted.decide("demo-ar-002", "reject", {}, reviewer="Dr. Badr")
    restarted.decide("demo-ar-002", "reject", {}, reviewer="Dr. Badr", comment="meaning lost")
    assert restarted.progress() == {"total": 2, "done": 2, "left": 0,
                                    "by_state": {"undecided": 0, "approved": 0, "edited": 1, "rejected": 1}}
    rows = [{"id": e["id"], "field": e["field"], "arabic": e["after"], "decision": e["decision"]}
            for e in read_audit(restarted.audit) if "after" in e]
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    import_reviews(translated, tmp_path / "reviews.jsonl", tmp_path / "imported.jsonl", reviewer="x")
    restarted.write_output()
    assert read_jsonl(out) == read_jsonl(tmp_path / "imported.jsonl")


@pytest.mark.parametrize("make, expected", [
    (lambda t, e, tmp: ReviewSession(t, tmp / "o.jsonl", source=write_jsonl(tmp / "other.jsonl", [])),
     "holds none of the English originals"),
    (lambda t, e, tmp: ReviewSession(t, t), "--output .* would overwrite the input --input"),
    (lambda t, e, tmp: ReviewSession(t, tmp / "o.jsonl", queue=write_jsonl(
        tmp / "q.jsonl", [{"id": "demo-ar-999", "field": "conversations.0", "arabic": "", "decision": ""}])),
     "q.jsonl:row 1: column `id`: 'demo-ar-999' is not a machine-translated record"),
], ids=["source-mismatch", "output-is-input", "queue-mismatch"])
def test_bad_inputs_are_named(files, tmp_path, make, expected):
    english, translated = files
    with pytest.raises(ValueError, match=expected):
        make(translated, english, tmp_path)


def test_fully_reviewed_input_has_nothing_to_review(files, tmp_path, capsys):
    _, translated = files
    session = ReviewSession(translated, tmp_path / "first.jsonl", fraction=1.0)
    for item_id in session.items:
        session.decide(item_id, "approve", {}, reviewer="r")
    session.write_output()
    assert main(["review", "serve", "--input", str(tmp_path / "first.jsonl"), "--port",
                 str(free_port())]) == 2
    assert "nothing to review" in capsys.readouterr().err


def test_review_stats_buckets_and_auc(tmp_path, capsys):
    records = []
    for i, (score, state) in enumerate([(55, "rejected"), (75, "edited"), (85, "approved"), (88, "edited"),
                                        (95, "approved"), (99, "approved"), (90, None)]):
        record = _translated(i, score)
        record["meta"]["translation"].update(reviewed=state is not None, review_state=state or "unreviewed")
        records.append(record)
    stats = review_agreement(records)
    assert stats["reviewed"] == 6
    buckets = {b["range"]: b for b in stats["buckets"]}
    assert buckets["80-90"] == {"range": "80-90", "count": 2, "approved": 0.5, "edited": 0.5, "rejected": 0.0}
    # 100 is in the last bucket
    assert buckets["90-100"]["count"] == 2 and buckets["90-100"]["approved"] == 1.0
    assert buckets["60-70"]["approved"] is None
    # 8 of the 9 approved/corrected pairs are ordered (85 < 88)
    assert stats["roc_auc"] == pytest.approx(8 / 9)
    write_jsonl(tmp_path / "reviewed.jsonl", records)
    assert main(["review", "stats", "--input", str(tmp_path / "reviewed.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "6 reviewed translations" in out
    assert "ROC AUC (score: approved vs edited-or-rejected): 0.889" in out
    assert main(["review", "stats", "--input", str(tmp_path / "reviewed.jsonl"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == stats


@pytest.mark.parametrize("positives, negatives, expected", [
    ([90, 95, 80], [70, 85], 5 / 6), ([80], [80], 0.5), ([60], [90], 0.0), ([], [1], None),
])
def test_roc_auc(positives, negatives, expected):
    assert roc_auc(positives, negatives) == (pytest.approx(expected) if expected is not None else None)


@pytest.fixture
def review_server(files, tmp_path):
    """`review serve`'s app on a free port (no token) over the two queued records of `files`."""
    from bimedix.web.review_app import create_review_app
    from bimedix.web.server import WebServer

    english, translated = files
    session = ReviewSession(translated, tmp_path / "out.jsonl", source=english, fraction=0.0)
    server = WebServer(create_review_app(session), port=free_port()).start()
    yield session, server
    server.close()


def _call(server, method: str, path: str, body: dict | bytes | None = None,
          headers: dict | None = None) -> tuple[int, dict]:
    """One request; the status and the JSON answer."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body, ensure_ascii=False).encode()
    try:
        connection.request(method, path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_token_guards_every_route(files, tmp_path):
    from bimedix.web.review_app import create_review_app
    from bimedix.web.server import WebServer

    english, translated = files
    session = ReviewSession(translated, tmp_path / "out.jsonl", source=english, fraction=0.0)
    server = WebServer(create_review_app(session, token="كلمة"), port=free_port()).start()
    try:
        for path in ("/", "/api/state", "/?token=wrong"):
            status, body = _call(server, "GET", path)
            assert status == 401 and "token" in body["error"]
        status, _ = _call(server, "GET", "/api/state", headers={"Cookie": "bimedix_review_token=x"})
        assert status == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        # a non-ASCII token sets the cookie (once a 500: the raw token does not fit a latin-1 header)
        assert b"bimedix translation review" in opener.open(
            server.url + "?token=" + urllib.parse.quote("كلمة")).read()
        assert json.loads(opener.open(server.url + "api/state").read())["progress"]["total"] == 2
        digest = hashlib.sha256("كلمة".encode()).hexdigest()  # the cookie holds the hash, not the token
        assert _call(server, "GET", "/api/state",
                     headers={"Cookie": f"bimedix_review_token={digest}"})[0] == 200
        for _ in range(8):  # 1 + 1 + 8 = 10 wrong tokens from this address: locked out for a minute
            assert _call(server, "GET", "/?token=guess")[0] == 401
        status, body = _call(server, "GET", "/?token=" + urllib.parse.quote("كلمة"))
        assert status == 429 and "too many wrong tokens" in body["error"]
    finally:
        server.close()


def test_requests_for_another_host_name_are_refused(review_server):
    session, server = review_server
    evil = {"Host": f"evil.example.com:{server.port}"}  # DNS rebinding: a foreign name pointed at 127.0.0.1
    status, body = _call(server, "GET", "/api/state", headers=evil)
    assert status == 400 and "'evil.example.com'" in body["error"]
    view = session.view("demo-ar-000")
    status, _ = _call(server, "POST", "/api/item/demo-ar-000", {"action": "approve", "version": 0,
                                                                "reviewer": "attacker"}, headers=evil)
    assert status == 400 and not session.audit.exists() and view["version"] == 0
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert _call(server, "GET", "/api/state", headers={"Host": host})[0] == 200


def test_request_bodies_are_limited(review_server):
    session, server = review_server
    huge = {"action": "edit", "version": 0, "reviewer": "r", "texts": {"conversations.1": "ب" * 600_000}}
    status, body = _call(server, "POST", "/api/item/demo-ar-000", huge)
    assert status == 413 and body == {"error": "the request body is over 1,000,000 bytes"}
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)  # no Content-Length
    connection.request("POST", "/api/item/demo-ar-000", body=iter([b"{" + b" " * 600_000] * 2),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"].startswith("the request body")
    connection.close()
    assert not session.audit.exists()
    status, body = _call(server, "GET", "/api/nothing-here")
    assert status == 404 and body == {"error": "Not Found"}


def test_every_answer_carries_the_security_headers(review_server):
    from bimedix.web.server import SECURITY_HEADERS

    _, server = review_server
    requests = [("GET", "/", {}), ("GET", "/api/state", {}), ("GET", "/api/item/demo-ar-000", {}),
                ("GET", "/api/item/no-such-id", {}), ("GET", "/api/nothing-here", {}),
                ("POST", "/api/item/demo-ar-000", {}),  # no body: 422
                ("GET", "/api/state", {"Host": "evil.example.com"})]
    statuses = []
    for method, path, headers in requests:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        statuses.append(response.status)
        assert {name: response.getheader(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS, path
    assert statuses == [200, 200, 200, 404, 404, 422, 400]


@pytest.mark.parametrize("name, title", [("chat.html", "BiMediX chat"), ("review.html", "bimedix review")])
def test_pages_extend_the_shared_base(name, title):
    from bimedix.web.server import page

    html = page(name)
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert f"<title>{title}</title>" in html and "--ar-font" in html  # the base's head and CSS
    assert "{%" not in html and html.count("<style>") == 1 and html.count("<body>") == 1


def test_a_decision_on_a_stale_page_is_refused(review_server):
    session, server = review_server
    status, seen_by_a = _call(server, "GET", "/api/item/demo-ar-000")
    seen_by_b = _call(server, "GET", "/api/item/demo-ar-000")[1]
    assert status == 200 and seen_by_a["version"] == seen_by_b["version"] == 0
    edit = {"action": "edit", "version": seen_by_a["version"], "reviewer": "A",
            "texts": {"options.1": "خيار ب المصحح"}}
    status, _ = _call(server, "POST", "/api/item/demo-ar-000", edit)
    assert status == 200
    status, body = _call(server, "POST", "/api/item/demo-ar-000",
                         {"action": "approve", "version": seen_by_b["version"], "reviewer": "B"})
    assert status == 409
    assert body["error"].startswith("'demo-ar-000' changed after you opened it (A decided it")
    status, body = _call(server, "POST", "/api/item/demo-ar-000", {"action": "approve", "reviewer": "B"})
    assert status == 422 and body == {"error": "version: Field required"}
    session.write_output()
    [record] = [r for r in read_jsonl(session.output) if r["id"] == "demo-ar-000"]
    assert record["meta"]["options"][1] == "خيار ب المصحح"  # A's edit stands
    reloaded = _call(server, "GET", "/api/item/demo-ar-000")[1]
    assert _call(server, "POST", "/api/item/demo-ar-000",
                 {"action": "approve", "version": reloaded["version"], "reviewer": "B"})[0] == 200


def test_record_ids_with_a_slash_can_be_reviewed(files, tmp_path):
    from bimedix.web.review_app import create_review_app
    from bimedix.web.server import WebServer

    record = _translated(0, 50)
    record["id"] = "medqa/ar/0"
    translated = write_jsonl(tmp_path / "slash.jsonl", [record])
    session = ReviewSession(translated, tmp_path / "out.jsonl", fraction=0.0)
    server = WebServer(create_review_app(session), port=free_port()).start()
    try:
        status, view = _call(server, "GET", "/api/item/" + urllib.parse.quote("medqa/ar/0", safe=""))
        assert status == 200 and view["id"] == "medqa/ar/0"
        status, _ = _call(server, "POST", "/api/item/medqa%2Far%2F0", {"action": "approve", "version": 0,
                                                                       "reviewer": "r"})
        assert status == 200 and session.state("medqa/ar/0") == "approved"
    finally:
        server.close()


@pytest.mark.parametrize("audit", ["input", "output", "source"])
def test_the_audit_trail_is_never_an_input_or_the_output(files, tmp_path, capsys, audit):
    english, translated = files
    out = tmp_path / "out.jsonl"
    before = {path: path.read_bytes() for path in (english, translated)}
    path = {"input": translated, "output": out, "source": english}[audit]
    with pytest.raises(OutputError, match=f"--audit {path}"):
        ReviewSession(translated, out, source=english, audit=path, fraction=0.0)
    assert main(["review", "serve", "--input", str(translated), "--source", str(english), "--output",
                 str(out), "--audit", str(path), "--port", str(free_port())]) == 2
    assert f"--audit {path}" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in (english, translated)} == before and not out.exists()


def test_server_guards(files, tmp_path, capsys, monkeypatch):
    _, translated = files
    assert main(["review", "serve", "--input", str(translated), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    for token in ("", " ", "a\nb"):
        assert main(["review", "serve", "--input", str(translated), "--token", token]) == 2
        assert "--token must be non-empty text without control characters" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["review", "serve", "--input", str(translated), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["review", "serve", "--input", str(translated)]) == 2
    assert "pip install 'bimedix[web]'" in capsys.readouterr().err
