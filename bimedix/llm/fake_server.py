"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for tests, benchmarks and dry runs.

It speaks the parts of the OpenAI API the engines use: ``POST /v1/chat/completions``, ``POST /v1/files``,
``GET /v1/files/{id}/content``, ``POST /v1/batches`` and ``GET /v1/batches/{id}``. Replies come from a
*responder* (``body -> text`` or `Reply`); the default one understands the bimedix prompts (their user
message is a JSON payload with a ``task`` key, or HealthBench's grader prompt) and returns deterministic,
invariant-preserving fake Arabic, judge scores, dialogues and rubric verdicts (`fake_criteria_met`), so a
whole pipeline can be dry-run without paying anyone::

    bimedix fake-openai-server --port 8000 --latency 0.2 &
    OPENAI_API_KEY=dry-run bimedix translate --input en.jsonl --output ar.jsonl \\
        --base-url http://127.0.0.1:8000/v1 --model fake

Faults are injected per request with `FakeOpenAIServer.inject` (429 with ``Retry-After``, 5xx, delays
past the client timeout, a body dripped one byte at a time, connection resets, malformed or truncated
JSON, ``finish_reason="length"``),
and every request is logged (`FakeOpenAIServer.log`) with the hash of its body and the usage it was
served, so tests can count requests and check the cost ledger. Nothing here is meant for production.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


@dataclass
class Reply:
    """A scripted completion: its text and finish reason."""

    text: str
    finish_reason: str = "stop"


@dataclass
class Fault:
    """One injected failure for the next chat-completion request.

    Args:
        kind (`str`): ``"status"`` (HTTP error), ``"delay"`` (sleep, then answer normally), ``"drip"`` (send
            the headers at once, then the body one byte every ``delay`` seconds), ``"reset"`` (drop the
            connection), ``"malformed"`` (200 with a body that is not JSON), ``"truncated"`` (200 whose body
            stops half way) or ``"length"`` (a completion cut off at ``max_tokens``).
        status (`int`, *optional*, defaults to `500`): the HTTP status of a ``"status"`` fault.
        headers (`dict`, *optional*): extra response headers, e.g. ``{"Retry-After": "1"}``.
        delay (`float`, *optional*, defaults to `0`): seconds to sleep for a ``"delay"`` fault, or between two
            bytes of a ``"drip"`` fault.
    """

    kind: str
    status: int = 500
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class ServedRequest:
    """One request as the server saw it: its route, body hash, outcome and the usage it was served."""

    path: str
    body_hash: str
    outcome: str  # "ok", "length", or the fault kind ("reset", "status:429", ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def request_hash(body: dict) -> str:
    """The hash of a request body, computed exactly as `bimedix.llm.cache.request_key` keys the cache."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def count_tokens(text: str) -> int:
    """The server's token count: one token per 4 characters, at least one."""
    return max(1, (len(text) + 3) // 4)


class FakeOpenAIServer:
    """A threaded OpenAI-compatible server on 127.0.0.1; use as a context manager.

    Args:
        responder (`Callable[[dict], str | Reply]`, *optional*): makes the reply from the request body;
            defaults to `default_responder`.
        latency (`float`, *optional*, defaults to `0`): seconds every chat completion waits before answering.
        port (`int`, *optional*, defaults to `0`): the port, ``0`` for a free one.
        batch_polls (`int`, *optional*, defaults to `1`): how many ``GET /v1/batches/{id}`` calls see
            ``in_progress`` before the batch reports ``completed``.

    Examples:

    ```python
    with FakeOpenAIServer() as server:
        server.inject(Fault("status", 429, {"Retry-After": "0.1"}))
        client = AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    ```
    """

    def __init__(self, responder: Callable[[dict], str | Reply] | None = None, *, latency: float = 0.0,
                 port: int = 0, batch_polls: int = 1):
        self.responder = responder or default_responder
        self.latency = latency
        self.batch_polls = batch_polls
        self.log: list[ServedRequest] = []
        self._faults: list[Fault] = []
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd = _Server(("127.0.0.1", port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an OpenAI client, ending in ``/v1``."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        try:
            self._httpd.serve_forever(poll_interval=0.1)
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop the background thread and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each chat-completion request consumes the next one."""
        with self._lock:
            self._faults.extend(faults)

    def count(self, path: str = "/v1/chat/completions") -> int:
        """How many requests reached ``path`` (``"batch"`` counts requests served inside batches)."""
        with self._lock:
            return sum(1 for item in self.log if item.path == path)

    def served_usage(self) -> tuple[int, int]:
        """``(prompt_tokens, completion_tokens)`` summed over every completion served in full."""
        with self._lock:
            return (sum(item.prompt_tokens for item in self.log),
                    sum(item.completion_tokens for item in self.log))

    def complete(self, body: dict, *, forced: str | None = None, digest: str | None = None
                 ) -> tuple[dict, ServedRequest]:
        """Build the chat-completion object for ``body`` (``forced="length"`` cuts it off)."""
        reply = self.responder(body)
        if isinstance(reply, str):
            reply = Reply(reply)
        text, finish = reply.text, reply.finish_reason
        if forced == "length":
            text, finish = text[: max(1, len(text) // 2)], "length"
        prompt_tokens = count_tokens(json.dumps(body.get("messages", []), ensure_ascii=False))
        completion_tokens = count_tokens(text)
        completion = {
            "id": self._new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish,
                         "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        served = ServedRequest("/v1/chat/completions", digest or request_hash(body),
                               "length" if finish == "length" else "ok", prompt_tokens, completion_tokens)
        return completion, served

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _record(self, item: ServedRequest) -> None:
        with self._lock:
            self.log.append(item)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"


@contextmanager
def fake_server_process(latency: float = 0.0) -> Iterator[str]:
    """Run ``bimedix fake-openai-server`` on a free port in its own process (so its threads do not compete
    with the caller's for the GIL) and yield its ``base_url``; the process is stopped on exit."""
    process = subprocess.Popen([sys.executable, "-m", "bimedix", "fake-openai-server", "--port", "0",
                                "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()  # "fake OpenAI-compatible server on http://127.0.0.1:PORT/v1 ..."
        url = re.search(r"http://\S+/v1", banner)
        if url is None:
            raise RuntimeError(f"bimedix fake-openai-server did not start (exit code {process.poll()}): "
                               f"{banner!r}")
        yield url.group(0)
    finally:
        process.terminate()
        process.wait()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        logger.debug("fake server: connection from %s ended abruptly", client_address)


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 1 << 16  # headers and body leave in one write, flushed after each request

        def setup(self) -> None:
            super().setup()
            # no Nagle/delayed-ACK stalls
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
            logger.debug("fake server: " + format, *args)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            route = self.path.rstrip("/")
            if route == "/v1/chat/completions":
                self._chat(raw)
            elif route == "/v1/files":
                self._upload(raw)
            elif route == "/v1/batches":
                self._create_batch(raw)
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_GET(self) -> None:
            match = re.fullmatch(r"/v1/files/([^/]+)/content", self.path)
            if match and match.group(1) in server._files:
                self._send(200, server._files[match.group(1)], "application/octet-stream")
                return
            match = re.fullmatch(r"/v1/batches/([^/]+)", self.path)
            if match and match.group(1) in server._batches:
                batch = server._batches[match.group(1)]
                with server._lock:
                    batch["_polls"] -= 1
                    if batch["_polls"] < 0:
                        batch["status"] = "completed"
                self._send_json(200, {k: v for k, v in batch.items() if not k.startswith("_")})
                return
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def _chat(self, raw: bytes) -> None:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send_json(400, {"error": {"message": "request body is not JSON",
                                                "type": "invalid_request"}})
                return
            fault = server._next_fault()
            if server.latency:
                time.sleep(server.latency)
            digest = request_hash(body)
            # logged on arrival: the client will have given up
            if fault is not None and fault.kind == "delay":
                server._record(ServedRequest(self.path, digest, "delay"))
                time.sleep(fault.delay)
                completion, _ = server.complete(body)
                self._send_json(200, completion)
                return
            if fault is not None and fault.kind == "drip":  # each byte comes within any read timeout
                server._record(ServedRequest(self.path, digest, "drip"))
                payload = json.dumps(server.complete(body)[0], ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.flush()
                for index in range(len(payload)):
                    time.sleep(fault.delay)
                    self.wfile.write(payload[index:index + 1])
                    self.wfile.flush()
                return
            if fault is not None and fault.kind == "status":
                server._record(ServedRequest(self.path, digest, f"status:{fault.status}"))
                self._send_json(fault.status, {"error": {"message": f"scripted {fault.status}",
                                                         "type": "fault"}},
                                fault.headers)
                return
            if fault is not None and fault.kind == "reset":
                server._record(ServedRequest(self.path, digest, "reset"))
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None and fault.kind == "malformed":
                server._record(ServedRequest(self.path, digest, "malformed"))
                self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": oops', "application/json")
                return
            completion, served = server.complete(body, forced="length" if fault and fault.kind == "length"
                                                 else None,
                                                 digest=digest)
            payload = json.dumps(completion, ensure_ascii=False).encode()
            if fault is not None and fault.kind == "truncated":
                server._record(ServedRequest(self.path, digest, "truncated"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            server._record(served)
            self._send(200, payload, "application/json")

        def _upload(self, raw: bytes) -> None:
            message = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            parts = {part.get_param("name", header="content-disposition"): part
                     for part in message.iter_parts()}
            if "file" not in parts:
                self._send_json(400, {"error": {"message": "missing file part", "type": "invalid_request"}})
                return
            content = parts["file"].get_payload(decode=True)
            file_id = server._new_id("file")
            server._files[file_id] = content
            server._record(ServedRequest(self.path, hashlib.sha256(content).hexdigest(), "ok"))
            self._send_json(200, {"id": file_id, "object": "file", "bytes": len(content),
                                  "created_at": int(time.time()), "filename": parts["file"].get_filename()
                                  or "input",
                                  "purpose": "batch", "status": "processed"})

        def _create_batch(self, raw: bytes) -> None:
            request = json.loads(raw)
            lines = server._files.get(request.get("input_file_id"), b"").decode().splitlines()
            out = []
            for line in filter(None, lines):
                item = json.loads(line)
                completion, served = server.complete(item["body"])
                served.path = "batch"
                server._record(served)
                out.append(json.dumps({"id": server._new_id("batch_req"), "custom_id": item["custom_id"],
                                       "response": {"status_code": 200, "request_id": server._new_id("req"),
                                                    "body": completion}, "error": None}, ensure_ascii=False))
            output_id = server._new_id("file")
            server._files[output_id] = ("\n".join(out) + "\n").encode()
            batch_id = server._new_id("batch")
            batch = {"id": batch_id, "object": "batch", "endpoint": request.get("endpoint"), "errors": None,
                     "input_file_id": request.get("input_file_id"),
                     "completion_window": request.get("completion_window"), "status": "in_progress",
                     "output_file_id": output_id, "error_file_id": None, "created_at": int(time.time()),
                     "request_counts": {"total": len(out), "completed": len(out), "failed": 0},
                     "_polls": server.batch_polls}
            server._batches[batch_id] = batch
            server._record(ServedRequest(self.path, batch_id, "ok"))
            self._send_json(200, {k: v for k, v in batch.items() if not k.startswith("_")})

        def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

        def _send(self, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def default_responder(body: dict) -> Reply:
    """Answer the bimedix prompts deterministically: fake translations, judge scores and dialogues.

    The last user message must hold a JSON object with a ``task`` of ``translate``, ``refine``, ``judge``
    or ``dialogue`` (see ``bimedix/llm/prompts/``); anything else is echoed back.
    """
    messages = body.get("messages") or [{}]
    text = messages[-1].get("content") or ""
    if all(marker in text for marker in _GRADER_MARKERS):
        return _fake_rubric_verdict(text)
    try:
        payload = json.loads(text[text.index("{"):])
    except ValueError:
        return Reply(f"echo: {text[:200]}")
    task = payload.get("task")
    if task in ("translate", "refine"):
        keep = set(payload.get("keep") or [])
        variant = "" if task == "translate" else " ،"
        out = {"turns": [fake_arabic(t, keep) + variant for t in payload.get("turns", [])]}
        if payload.get("options"):
            out["options"] = [fake_arabic(o, keep) for o in payload["options"]]
        return Reply(json.dumps(out, ensure_ascii=False))
    if task == "judge":
        digest = hashlib.sha256(json.dumps(payload.get("translation"), ensure_ascii=False).encode()).digest()
        return Reply(json.dumps({"score": 60 + digest[0] % 40,
                                 "comments": "Fake judgement: check terminology."}))
    if task == "dialogue":
        return Reply(json.dumps({"conversation": _fake_dialogue(payload)}, ensure_ascii=False))
    return Reply(f"echo: {text[:200]}")


_GRADER_MARKERS = ("# Conversation\n", "\n\n# Rubric item\n", "\n\n# Instructions\n")


def fake_criteria_met(criterion: str, reply: str) -> bool:
    """The fake grader's verdict: is the first byte of SHA-256 of ``criterion + "\\n" + reply`` even?"""
    return hashlib.sha256(f"{criterion}\n{reply}".encode()).digest()[0] % 2 == 0


def _fake_rubric_verdict(text: str) -> Reply:
    """Answer HealthBench's grader prompt with `fake_criteria_met` of its criterion and last assistant
    turn."""
    start, item, end = (text.index(marker) for marker in _GRADER_MARKERS)
    conversation = text[start + len(_GRADER_MARKERS[0]):item]
    reply = conversation[conversation.rindex("assistant: ") + len("assistant: "):]
    criterion = text[item + len(_GRADER_MARKERS[1]):end].split("] ", 1)[-1]
    met = fake_criteria_met(criterion, reply)
    return Reply(json.dumps({"explanation": f"Fake verdict: {'met' if met else 'not met'}.",
                             "criteria_met": met}))


_LETTERS = dict(zip("abcdefghijklmnopqrstuvwxyz", "ابكدهفغحيجكلمنوبقرستوفوكيز"))


def fake_arabic(text: str, keep: set[str] | frozenset[str] = frozenset()) -> str:
    """Turn English into Arabic-looking text, keeping numbers, upper-case tokens and ``keep`` verbatim."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        if word.isupper() or len(word) == 1 or any(ch.isdigit() for ch in word):
            return word
        return "".join(_LETTERS.get(ch, ch) for ch in word.lower())

    if not keep:
        return re.sub(r"[A-Za-z][A-Za-z0-9]*", swap, text)
    protected = re.compile("(" + "|".join(rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])"
                                          for term in sorted(keep, key=len, reverse=True)) + ")")
    parts = protected.split(text)  # odd positions are protected terms
    return "".join(part if index % 2 else re.sub(r"[A-Za-z][A-Za-z0-9]*", swap, part)
                   for index, part in enumerate(parts))


def _fake_dialogue(payload: dict) -> list[dict]:
    answer = payload.get("answer_text") or ""
    question = (payload.get("question") or "a health problem").split("\n")[0][:300]
    exchanges = max(int(payload.get("min_turns") or 2), 2)
    conversation = [{"from": "human", "value": f"Hello doctor, I have a question. {question}"},
                    {"from": "gpt",
                     "value": "Thank you for reaching out. Can you tell me more about your symptoms?"}]
    for index in range(exchanges - 2):
        conversation += [{"from": "human",
                          "value": f"Here is more detail about my situation, part {index + 1}."},
                         {"from": "gpt", "value": "I understand. That detail helps narrow things down."}]
    conversation += [{"from": "human", "value": "So what do you think it is?"},
                     {"from": "gpt",
                      "value": f"Based on what you describe, the most likely answer is {answer}. "
                                              "Please see your physician to confirm."}]
    return conversation
