"""Running a web app: the install hint, the localhost/token rule, a free-port check and a uvicorn server."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from importlib import resources

logger = logging.getLogger(__name__)

INSTALL_HINT = "the web apps need the `web` extra: pip install 'bimedix[web]' (FastAPI and uvicorn)"


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


def token_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time check of a shared token; always true when no token is set."""
    return expected is None or (given is not None
                                and secrets.compare_digest(expected.encode(), given.encode()))


def page(name: str) -> str:
    """The text of a page shipped in ``bimedix/web/static``."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


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
