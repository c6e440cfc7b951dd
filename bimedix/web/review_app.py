"""``bimedix review serve``: the translation review app over a `ReviewSession`.

Routes: ``/`` (the page), ``/api/state`` (progress, filtered item list, agreement statistics),
``/api/item/{id}`` (one item) and ``POST /api/item/{id}`` (a decision). Nothing else is served: no static
folder, no path taken from a request. With a token, the page must first be opened as ``/?token=...``,
which sets a cookie; every API call without it gets 401.
"""

import logging
import threading
from contextlib import asynccontextmanager

from ..llm.review_session import ReviewSession
from .server import page, token_matches

logger = logging.getLogger(__name__)

COOKIE = "bimedix_review_token"


def create_review_app(session: ReviewSession, *, reviewer: str = "", token: str | None = None):
    """The FastAPI app of the review page.

    Args:
        session (`ReviewSession`): the queue and its decisions.
        reviewer (`str`, *optional*): the name filled in the page (each reviewer can change it there).
        token (`str`, *optional*): shared secret required from every browser (for a non-localhost bind).
    """

    from fastapi import BackgroundTasks, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
    from pydantic import BaseModel

    class Decision(BaseModel):
        action: str
        texts: dict[str, str] = {}
        comment: str = ""
        reviewer: str = ""

    @asynccontextmanager
    async def lifespan(_app):
        yield
        session.write_output()  # the last decisions, when the server stops

    app = FastAPI(title="bimedix review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    lock = threading.Lock()  # one request at a time on the session

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is not None and not token_matches(token, request.cookies.get(COOKIE)):
            if request.url.path == "/" and token_matches(token, request.query_params.get("token")):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
            return JSONResponse({"error": "this review app needs its token: open it as /?token=..."},
                                status_code=401)
        try:
            return await call_next(request)
        except Exception as err:  # shown in the page as a message, logged with its traceback here
            logger.exception("review app: %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page("review.html")

    @app.get("/api/state")
    def state(filter_state: str = "", min_score: float | None = None, max_score: float | None = None) -> dict:
        with lock:
            return {"progress": session.progress(), "warnings": session.warnings, "reviewer": reviewer,
                    "items": session.listing(filter_state or None, min_score, max_score),
                    "stats": session.stats(),
                    "output": session.output.name, "audit": session.audit.name}

    @app.get("/api/item/{item_id}")
    def item(item_id: str):
        with lock:
            try:
                return session.view(item_id)
            except KeyError as err:
                return JSONResponse({"error": str(err.args[0])}, status_code=404)

    @app.post("/api/item/{item_id}")
    def decide(item_id: str, decision: Decision, background: BackgroundTasks):
        with lock:
            try:
                view = session.decide(item_id, decision.action, decision.texts, reviewer=decision.reviewer,
                                      comment=decision.comment)
            except KeyError as err:
                return JSONResponse({"error": str(err.args[0])}, status_code=404)
            except ValueError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            progress = session.progress()
        background.add_task(session.write_output)  # after the answer: the decision is already on disk
        return {"item": view, "progress": progress}

    return app
