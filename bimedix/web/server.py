"""Running a web app: the install hint, `make_app` (the guards both apps share), a free-port check and a
uvicorn server.

`make_app` builds every bimedix web app the same way, so the review app and the chat page hold up alike under
hostile use:

- **Exposure.** `check_exposure` refuses, before anything starts, a bind other than this machine
  (``localhost``, ``127.x``, ``::1``) without a shared token, and a token that is empty or holds control
  characters.
- **DNS rebinding.** Without a token, a request whose ``Host`` header names anything other than
  ``localhost``, ``127.0.0.1``, ``::1`` or the ``--host`` given gets 400: a page of another site whose name
  was re-pointed at 127.0.0.1 cannot read or write through the app.
- **Token.** With a token, the page is opened once as ``/?token=...``; the answer sets an HTTP-only,
  same-site cookie holding the token's SHA-256 (any Unicode token works; the token itself is never echoed),
  and every request without it gets 401. After `LOGIN_ATTEMPTS` wrong tokens or cookies within
  `LOGIN_WINDOW_S` seconds, a client address gets 429 until the window has passed.
- **Size.** A request body over `MAX_BODY_BYTES` gets 413: at once when its ``Content-Length`` says so,
  else as soon as that much has arrived; it is never held in memory whole.
- **Errors** are JSON ``{"error": message}`` (HTTP errors, validation errors, and 500 for a bug, whose
  traceback goes to the server log); every answer carries headers that forbid framing, sniffing, caching and
  referrers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import deque

logger = logging.getLogger(__name__)

INSTALL_HINT = "the web apps need the `web` extra: pip install 'bimedix[web]' (FastAPI and uvicorn)"
MAX_BODY_BYTES = 1_000_000
LOGIN_ATTEMPTS = 10
LOGIN_WINDOW_S = 60.0
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_HEADER_BYTES = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]


def require_web() -> None:
    """Raise a `RuntimeError` with the install hint when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{INSTALL_HINT} ({err})") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, *, app: str, token_env: str) -> None:
    """Refuse a bind other machines can reach without a token, and a token no browser can send.

    Args:
        host (`str`): the address the app will listen on.
        token (`str`, *optional*): the shared secret (``--token``).
        app (`str`): the app's name for the message (``"the review app"``).
        token_env (`str`): the environment variable that can hold the token, for the message.

    Raises:
        `ValueError`: naming ``--host`` or ``--token`` and the fix.
    """
    if token is not None and (not token.strip() or any(ord(char) < 32 or ord(char) == 127 for char in token)):
        raise ValueError("--token must be non-empty text without control characters (tabs, newlines); "
                         "any letters work, Arabic included")
    if token is None and not is_loopback(host):
        raise ValueError(f"--host {host} lets other machines reach {app}; give a shared secret with --token "
                         f"(or ${token_env}), or keep the default --host 127.0.0.1")


def check_port(host: str, port: int) -> None:
    """Raise a `ValueError` naming the port when it cannot be bound on ``host`` (another server has it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port} ({err.strerror}); "
                             "another server may be using it: "
                             "pass a free --port") from None


def page(name: str) -> str:
    """A page shipped in ``bimedix/web/static``, rendered: each page extends ``base.html``, which holds the
    head and the CSS they share (inline, as the CSP of `SECURITY_HEADERS` allows; nothing else is fetched)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "static"), autoescape=True,
                                      undefined=jinja2.StrictUndefined, trim_blocks=True,
                                      keep_trailing_newline=True)
    return environment.get_template(name).render()


def make_app(title: str, *, host: str, token: str | None, cookie: str, token_env: str, lifespan=None,
             max_body_bytes: int = MAX_BODY_BYTES):
    """A FastAPI app with the shared guards (see the module docstring); add the routes to it.

    Args:
        title (`str`): the app's title.
        host (`str`): the address it listens on (accepted in ``Host`` headers besides the local names).
        token (`str`, *optional*): shared secret every browser must give; checked with `check_exposure` here.
        cookie (`str`): the name of the cookie that carries the token's hash (one per app).
        token_env (`str`): the environment variable the command reads the token from, for messages.
        lifespan (*optional*): FastAPI lifespan context manager.
        max_body_bytes (`int`, *optional*, defaults to `MAX_BODY_BYTES`): largest request body accepted.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException  # FastAPI's is a subclass

    check_exposure(host, token, app=title, token_env=token_env)
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, host=host, token=token, cookie=cookie, max_body_bytes=max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return JSONResponse({"error": err.detail}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        problems = ["{}: {}".format(".".join(str(part) for part in problem["loc"][1:]) or "body",
                                    problem["msg"]) for problem in err.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    return app


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _host_name(header: str) -> str:
    """The name in a ``Host`` header (``[::1]:8080`` -> ``::1``, ``localhost:8080`` -> ``localhost``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _Guard:
    """ASGI middleware: the ``Host`` check, the token gate with its attempt limit, the body limit, security
    headers, and a JSON 500 for an unhandled error."""

    def __init__(self, app, *, host: str, token: str | None, cookie: str, max_body_bytes: int):
        self.app, self.token, self.cookie, self.max_body_bytes = app, token, cookie, max_body_bytes
        self.digest = _digest(token) if token is not None else None
        self.hosts = {*LOCAL_HOSTS, host.strip("[]").lower()}
        self.failures: dict[str, deque[float]] = {}
        self.failures_lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        started, received = False, 0
        too_large = f"the request body is over {self.max_body_bytes:,} bytes"

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, too_large)  # answered as JSON by the app's handler
            return message

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *_HEADER_BYTES]
            await send(message)

        request = Request(scope)
        response = self._refusal(request)
        if response is None and int(request.headers.get("content-length") or 0) > self.max_body_bytes:
            response = JSONResponse({"error": too_large}, status_code=413)
        if response is None:
            try:
                return await self.app(scope, receive_limited, send_with_headers)
            except Exception as err:  # a bug: a JSON message for the page, the traceback for the server log
                if started:
                    raise
                logger.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"error": f"internal error: {type(err).__name__}: {err}"},
                                        status_code=500)
        await response(scope, receive, send_with_headers)

    def _refusal(self, request):
        """The response refusing ``request``, or ``None`` to let it through."""
        from starlette.responses import JSONResponse, RedirectResponse

        if self.token is None:
            name = _host_name(request.headers.get("host", "")).lower()
            if name not in self.hosts:
                known = ", ".join(sorted(self.hosts))
                return JSONResponse({"error": f"this app answers only for {known}, not the host name "
                                              f"{name!r} (start it with --host NAME and --token to reach it "
                                              "under another name)"}, status_code=400)
            return None
        given_cookie = request.cookies.get(self.cookie)
        given_token = request.query_params.get("token") if request.url.path == "/" else None
        if given_cookie is None and given_token is None:
            return JSONResponse({"error": "this app needs its token: open it as /?token=..."},
                                status_code=401)
        client = request.client.host if request.client else ""
        if self._locked(client):
            return JSONResponse({"error": f"too many wrong tokens from {client}; wait a minute and open the "
                                          "page as /?token=... again"}, status_code=429)
        if given_cookie is not None and secrets.compare_digest(given_cookie.encode(), self.digest.encode()):
            return None
        if given_token is not None and secrets.compare_digest(given_token.encode("utf-8"),
                                                              self.token.encode("utf-8")):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(self.cookie, self.digest, httponly=True, samesite="strict")
            return response
        self._fail(client)
        return JSONResponse({"error": "wrong token: open the app as /?token=... with the token it was "
                                      "started with"}, status_code=401)

    def _locked(self, client: str) -> bool:
        with self.failures_lock:
            times = self.failures.get(client)
            while times and times[0] < time.monotonic() - LOGIN_WINDOW_S:
                times.popleft()
            if times is not None and not times:
                del self.failures[client]
            return bool(times) and len(times) >= LOGIN_ATTEMPTS

    def _fail(self, client: str) -> None:
        with self.failures_lock:
            self.failures.setdefault(client, deque()).append(time.monotonic())


class WebServer:
    """A uvicorn server for ``app`` on ``host:port``, in this thread (`run`) or a background one (`start`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 7860):
        import uvicorn

        check_port(host, port)
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve until Ctrl-C."""
        self.server.run()

    def start(self, timeout: float = 30.0) -> WebServer:
        """Serve from a daemon thread; return once the server accepts connections."""
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        """Stop a server started with `start`."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
