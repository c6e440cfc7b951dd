"""Driving a child process in tests: wait for a signal it gives (a line printed, a port open, a file written),
never for a fixed time, and fail fast with its output when the signal does not come.

```python
with WatchedProcess([sys.executable, "-m", "bimedix", "chat", ...], stdin=subprocess.PIPE) as chat:
    chat.write(b"What is anemia?\\n")
    chat.wait_for_output("bimedix> ")          # the reply has started
    chat.send_signal(signal.SIGINT)
    result = chat.finish(b"/exit\\n")           # rc, stdout and stderr as text
```
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

#: How long a test waits for a signal before it fails, showing the output: generous, as the machines running
# the suite can be loaded (two CPU burners on two cores); a process that exits fails at once.
TIMEOUT = 600.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class WatchedProcess:
    """A child process whose stdout and stderr are collected by reader threads while the test waits on it.

    Args:
        command (`list[str]`): the command line.
        stdin (*optional*): ``subprocess.PIPE`` to write to it with `write`; by default it reads nothing.
        **popen_kwargs: passed to `subprocess.Popen` (``env``, ``cwd``).
    """

    def __init__(self, command: list[str], *, stdin=subprocess.DEVNULL, **popen_kwargs):
        self.command = command
        self.process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        **popen_kwargs)
        self._chunks = {"stdout": bytearray(), "stderr": bytearray()}
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                         for name in self._chunks]
        for reader in self._readers:
            reader.start()

    def __enter__(self) -> WatchedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (a launcher such as torchrun passes it to its workers), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()

    @property
    def stdout(self) -> str:
        return self._chunks["stdout"].decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self._chunks["stderr"].decode("utf-8", "replace")

    def output(self, limit: int = 4000) -> str:
        """The tail of what the process printed so far, for failure messages."""
        return f"$ {' '.join(map(str, self.command))}\n--- stdout\n{self.stdout[-limit:]}\n--- stderr\n" \
               f"{self.stderr[-limit:]}"

    def write(self, data: bytes) -> None:
        """Write ``data`` to the process's stdin (started with ``stdin=subprocess.PIPE``)."""
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send_signal(self, sig: int = signal.SIGINT) -> None:
        if self.process.poll() is not None:
            pytest.fail(f"the process exited (rc {self.process.returncode}) before it could get signal "
                        f"{signal.Signals(sig).name}\n{self.output()}")
        self.process.send_signal(sig)

    def wait_for_output(self, pattern: str | re.Pattern, *, stream: str = "stdout",
                        timeout: float = TIMEOUT) -> re.Match:
        """Wait until ``stream`` contains ``pattern`` (a literal string or a compiled regex); return the
        match.

        Fails the test at once when the process exits first, or after ``timeout`` seconds, with its output.
        """
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        found: list[re.Match] = []

        def seen() -> bool:
            match = regex.search(self._chunks[stream].decode("utf-8", "replace"))
            if match:
                found.append(match)
            return match is not None

        self.wait_until(seen, f"{regex.pattern!r} on {stream}", timeout=timeout)
        return found[0]

    def wait_for_port(self, port: int, host: str = "127.0.0.1", *, timeout: float = TIMEOUT) -> None:
        """Wait until something accepts connections on ``host:port``."""

        def is_open() -> bool:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                return False
            return True

        self.wait_until(is_open, f"port {host}:{port} to open", timeout=timeout, poll=0.05)

    def wait_until(self, predicate: Callable[[], bool], what: str, *, timeout: float = TIMEOUT,
                   poll: float = 0.01, exit_ok: bool = False) -> bool:
        """Wait until ``predicate()`` is true (checked at each output and every ``poll`` seconds); return
        True.

        Fails the test at once, with the output, when the process exits before (unless ``exit_ok``: then it
        returns False), or after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                if self.process.poll() is not None and not any(reader.is_alive() for reader in self._readers):
                    if predicate():
                        return True
                    if exit_ok:
                        return False
                    pytest.fail(f"the process exited (rc {self.process.returncode}) before {what}\n"
                                f"{self.output()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {what} after {timeout:.0f} s\n{self.output()}")
                self._changed.wait(poll)
        return True

    def finish(self, stdin: bytes | None = None, *, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        """Write ``stdin`` (then close it), wait for the exit, and return rc, stdout and stderr as text.

        Fails the test with the output when the process is still running after ``timeout`` seconds.
        """
        if self.process.stdin is not None:
            try:
                if stdin:
                    self.process.stdin.write(stdin)
                self.process.stdin.close()
            except BrokenPipeError:  # it exited already: its rc and output tell why
                pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the process did not exit within {timeout:.0f} s\n{self.output()}")
        for reader in self._readers:
            reader.join()
        return subprocess.CompletedProcess(self.command, self.process.returncode, self.stdout, self.stderr)

    def _read(self, name: str) -> None:
        handle = getattr(self.process, name)
        while chunk := os.read(handle.fileno(), 65536):
            with self._changed:
                self._chunks[name] += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()
