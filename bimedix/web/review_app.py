"""``bimedix review serve``: the translation review app over a `ReviewSession`.

Routes: ``/`` (the page), ``/api/state`` (progress, filtered item list, agreement statistics),
``/api/item/{id}`` (one item; ids may hold ``/``, URL-encoded by the page) and ``POST /api/item/{id}`` (a
decision, carrying the item's ``version`` as the page loaded it: a decision on an item someone else decided
since gets 409 and the page offers to reload it). Nothing else is served: no static folder, no path taken
from a request. The guards (token, ``Host`` check, body limit, JSON errors) are
`bimedix.web.server.make_app`'s.
"""

import logging
import threading
from contextlib import asynccontextmanager

from ..llm.review_session import ReviewSession, StaleDecision
from .server import make_app, page

logger = logging.getLogger(__name__)

COOKIE = "bimedix_review_token"
TOKEN_ENV = "BIMEDIX_REVIEW_TOKEN"


def create_review_app(session: ReviewSession, *, reviewer: str = "", token: str | None = None,
                      host: str = "127.0.0.1"):
    """The FastAPI app of the review page.

    Args:
        session (`ReviewSession`): the queue and its decisions.
        reviewer (`str`, *optional*): the name filled in the page (each reviewer can change it there).
        token (`str`, *optional*): shared secret required from every browser (for a non-localhost bind).
        host (`str`, *optional*, defaults to `"127.0.0.1"`): the address the app listens on.
    """
    from fastapi import BackgroundTasks
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel

    class Decision(BaseModel):
        action: str
        version: int
        texts: dict[str, str] = {}
        comment: str = ""
        reviewer: str = ""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        session.write_output()  # the last decisions, when the server stops

    app = make_app("the review app", host=host, token=token, cookie=COOKIE, token_env=TOKEN_ENV,
                   lifespan=lifespan)
    lock = threading.Lock()  # one request at a time on the session

    html = page("review.html")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return html

    @app.get("/api/state")
    def state(filter_state: str = "", min_score: float | None = None, max_score: float | None = None) -> dict:
        with lock:
            return {"progress": session.progress(), "warnings": session.warnings, "reviewer": reviewer,
                    "items": session.listing(filter_state or None, min_score, max_score),
                    "stats": session.stats(),
                    "output": session.output.name, "audit": session.audit.name}

    @app.get("/api/item/{item_id:path}")
    def item(item_id: str):
        with lock:
            try:
                return session.view(item_id)
            except KeyError as err:
                return JSONResponse({"error": str(err.args[0])}, status_code=404)

    @app.post("/api/item/{item_id:path}")
    def decide(item_id: str, decision: Decision, background: BackgroundTasks):
        with lock:
            try:
                view = session.decide(item_id, decision.action, decision.texts, reviewer=decision.reviewer,
                                      comment=decision.comment, version=decision.version)
            except KeyError as err:
                return JSONResponse({"error": str(err.args[0])}, status_code=404)
            except StaleDecision as err:
                return JSONResponse({"error": str(err), "stale": True}, status_code=409)
            except ValueError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            progress = session.progress()
        background.add_task(session.write_output)  # after the answer: the decision is already on disk
        return {"item": view, "progress": progress}

    return app
