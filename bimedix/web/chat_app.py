"""``bimedix chat --web`` and `ChatSession.launch`: a streaming bilingual chat page over a `ChatSession`.

Routes: ``/`` (the page), ``/api/info`` (the not-medical-advice notice) and ``POST /api/chat``, which
answers a message as JSON lines: ``{"direction": "rtl"|"ltr"}``, then ``{"piece": text}`` as the model
generates, then ``{"done": true}`` (or ``{"error": message}``). The page keeps its own conversation and
sends it with each message, so every browser tab has its own; replies are generated one at a time.
A reply is laid out in the direction of the language it was asked in (Arabic turn: right to left).
"""

import json
import logging
import threading
from collections.abc import Callable, Iterator

from .server import page

logger = logging.getLogger(__name__)

ROLES = ("user", "assistant")


def create_chat_app(session, *, notice: str, language_of: Callable[[str], str]):
    """The FastAPI app of the chat page.

    Args:
        session (`bimedix.chat.ChatSession`): the model, template and system prompts.
        notice (`str`): the not-medical-advice notice shown at the top of the page (one line per language).
        language_of (`Callable[[str], str]`): ``"ar"`` or ``"en"`` for a text
            (`bimedix.chat.detect_language`).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel

    class Message(BaseModel):
        message: str
        history: list[dict[str, str]] = []

    app = FastAPI(title="bimedix chat", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one generation at a time on the one model

    @app.middleware("http")
    async def no_tracebacks(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as err:  # shown in the page as a message, logged with its traceback here
            logger.exception("chat app: %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page("chat.html")

    @app.get("/api/info")
    def info() -> dict:
        return {"notice": [{"text": line, "direction": _direction(language_of(line))}
                           for line in notice.splitlines() if line.strip()]}

    @app.post("/api/chat")
    def chat(message: Message):
        text = message.message.strip()
        bad = [turn for turn in message.history if turn.get("role") not in ROLES
               or not isinstance(turn.get("content"), str)]
        if not text or bad:
            return JSONResponse({"error": "empty message" if not text else
                                 f"history turns need a role in {list(ROLES)} and a content"},
                                status_code=400)
        return StreamingResponse(_reply(text, message.history), media_type="application/x-ndjson")

    def _reply(text: str, history: list[dict[str, str]]) -> Iterator[str]:
        yield json.dumps({"direction": _direction(language_of(text))}) + "\n"
        with lock:
            session.history = [{"role": turn["role"], "content": turn["content"]} for turn in history]
            try:
                for piece in session.stream(text):
                    yield json.dumps({"piece": piece}, ensure_ascii=False) + "\n"
            except Exception as err:  # the page shows it; the traceback stays in the server log
                logger.exception("chat app: generation failed")
                yield json.dumps({"error": f"generation failed: {type(err).__name__}: {err}"}) + "\n"
                return
        yield json.dumps({"done": True}) + "\n"

    return app


def _direction(language: str) -> str:
    return "rtl" if language == "ar" else "ltr"
