"""``bimedix chat --web`` and `ChatSession.launch`: a streaming bilingual chat page over a `ChatSession`.

Routes: ``/`` (the page), ``/api/info`` (the not-medical-advice notice) and ``POST /api/chat``, which
answers a message as JSON lines: ``{"direction": "rtl"|"ltr"}``, then ``{"piece": text}`` as the model
generates, then ``{"done": true}`` (or ``{"error": message}``). The page keeps its own conversation and
sends it with each message, so every browser tab has its own; replies are generated one at a time, and a
client that goes away stops its generation at the next token and frees the model for the next one.
A conversation over `MAX_HISTORY_TURNS` turns gets 422 (the page says to reset); the guards (token,
``Host`` check, body limit, JSON errors) are `bimedix.web.server.make_app`'s.
A reply is laid out in the direction of the language it was asked in (Arabic turn: right to left).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from .server import make_app, page

logger = logging.getLogger(__name__)

ROLES = ("user", "assistant")
COOKIE = "bimedix_chat_token"
TOKEN_ENV = "BIMEDIX_CHAT_TOKEN"
MAX_HISTORY_TURNS = 400
_END = object()


def create_chat_app(session, *, notice: str, language_of: Callable[[str], str], token: str | None = None,
                    host: str = "127.0.0.1"):
    """The FastAPI app of the chat page.

    Args:
        session (`bimedix.chat.ChatSession`): the model, template and system prompts.
        notice (`str`): the not-medical-advice notice shown at the top of the page (one line per language).
        language_of (`Callable[[str], str]`): ``"ar"`` or ``"en"`` for a text
            (`bimedix.chat.detect_language`).
        token (`str`, *optional*): shared secret required from every browser (needed for a non-local bind).
        host (`str`, *optional*, defaults to `"127.0.0.1"`): the address the app listens on.
    """
    import anyio
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel

    class Message(BaseModel):
        message: str
        history: list[dict[str, str]] = []

    class ClosingStream(StreamingResponse):
        """Closes its generator however the response ends (a client gone included), so the generation stops
        and the model lock is released at once rather than whenever the generator is garbage-collected."""

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()

    app = make_app("the chat page", host=host, token=token, cookie=COOKIE, token_env=TOKEN_ENV)
    lock = asyncio.Lock()  # one generation at a time on the one model

    html = page("chat.html")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return html

    @app.get("/api/info")
    def info() -> dict:
        return {"notice": [{"text": line, "direction": _direction(language_of(line))}
                           for line in notice.splitlines() if line.strip()]}

    @app.post("/api/chat")
    def chat(message: Message):
        text = message.message.strip()
        if len(message.history) > MAX_HISTORY_TURNS:
            return JSONResponse({"error": f"the conversation is too long ({len(message.history)} turns, "
                                          f"at most {MAX_HISTORY_TURNS}); press Reset to start a new one"},
                                status_code=422)
        bad = [turn for turn in message.history if turn.get("role") not in ROLES
               or not isinstance(turn.get("content"), str)]
        if not text or bad:
            return JSONResponse({"error": "empty message" if not text else
                                 f"history turns need a role in {list(ROLES)} and a content"},
                                status_code=400)
        return ClosingStream(_reply(text, message.history), media_type="application/x-ndjson")

    async def _reply(text: str, history: list[dict[str, str]]) -> AsyncIterator[str]:
        yield json.dumps({"direction": _direction(language_of(text))}) + "\n"
        async with lock:
            session.history = [{"role": turn["role"], "content": turn["content"]} for turn in history]
            stream = session.stream(text)
            try:
                while (piece := await anyio.to_thread.run_sync(next, stream, _END)) is not _END:
                    yield json.dumps({"piece": piece}, ensure_ascii=False) + "\n"
            except Exception as err:  # the page shows it; the traceback stays in the server log
                logger.exception("chat app: generation failed")
                yield json.dumps({"error": f"generation failed: {type(err).__name__}: {err}"}) + "\n"
                return
            finally:  # stops a generation still running (the client went away) before the lock is released
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(stream.close)
        yield json.dumps({"done": True}) + "\n"

    return app


def _direction(language: str) -> str:
    return "rtl" if language == "ar" else "ltr"
