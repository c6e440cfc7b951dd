"""Ordered parallel map for the stages of `bimedix build-data` (`--num-proc`).

`ordered_map` runs ``func(context, task)`` for every task, in worker processes when ``num_proc > 1``, and
yields the results in task order, so whatever the caller writes from them is byte-identical to a
``num_proc=1`` run (which runs the same function inline). ``context`` (read-only state such as a benchmark
index) reaches the workers once, by ``fork`` where the platform has it, instead of once per task.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_num_proc() -> int:
    """The CPU cores this process may use (its affinity set, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_map(func: Callable[[Any, T], R], tasks: Iterable[T], *, context: Any = None, num_proc: int = 1,
                prefetch: int = 4) -> Iterator[R]:
    """Yield ``func(context, task)`` for each task, in order, using ``num_proc`` processes.

    Args:
        func (`Callable`): a module-level function (workers import it by name).
        tasks (`Iterable`): the work items, consumed lazily (at most ``prefetch`` per process in flight).
        context (`Any`, *optional*): read-only state handed to every call.
        num_proc (`int`, *optional*, defaults to `1`): ``1`` runs inline, in this process.
        prefetch (`int`, *optional*, defaults to `4`): tasks queued per process.
    """
    with OrderedPool(func, context=context, num_proc=num_proc, prefetch=prefetch) as pool:
        yield from pool.map(tasks)


class OrderedPool:
    """`ordered_map` over several task streams with one set of worker processes (a context manager).

    Start it before the caller builds large state (e.g. a dedup index): forked workers then do not carry it.
    Arguments as for `ordered_map`.
    """

    def __init__(self, func: Callable[[Any, T], R], *, context: Any = None, num_proc: int = 1,
                 prefetch: int = 4):
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        self.func, self.context, self.num_proc, self.prefetch = func, context, num_proc, prefetch
        self._pool = None

    def __enter__(self) -> Self:
        if self.num_proc > 1:
            methods = multiprocessing.get_all_start_methods()
            pool_context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = pool_context.Pool(self.num_proc, initializer=_set_context,
                                           initargs=(self.func, self.context))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()
            self._pool = None

    def map(self, tasks: Iterable[T]) -> Iterator[R]:
        """Yield ``func(context, task)`` for each task, in order."""
        if self._pool is None:
            for task in tasks:
                yield self.func(self.context, task)
            return
        pending = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(_call, (task,)))
            if len(pending) >= self.num_proc * self.prefetch:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker: dict[str, Any] = {}  # the function and context of this worker process, set once by the pool


def _set_context(func: Callable, context: Any) -> None:
    _worker["func"], _worker["context"] = func, context


def _call(task: Any) -> Any:
    return _worker["func"](_worker["context"], task)


class OffsetReader:
    """JSON Lines files written by bimedix, read in chunks of ``(byte offset, line)`` and re-read by offset.

    The clean stage sends the chunks to `ordered_map` workers, and fetches a kept record again by its offset
    when a near-duplicate candidate must be confirmed, instead of holding every kept text in memory.

    Args:
        paths (`list[str | os.PathLike]`): the files, addressed by their index in this list.
    """

    def __init__(self, paths: list[str | os.PathLike]):
        self.paths = list(paths)
        self._handles: dict[int, Any] = {}

    def chunks(self, index: int, size: int = 1000) -> Iterator[list[tuple[int, bytes]]]:
        """Yield the lines of file ``index`` as lists of up to ``size`` ``(offset, line)`` pairs."""
        chunk, offset = [], 0
        with open(self.paths[index], "rb") as handle:
            for line in handle:
                chunk.append((offset, line))
                offset += len(line)
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def record(self, index: int, offset: int) -> dict:
        """The JSON object on the line starting at byte ``offset`` of file ``index``."""

        handle = self._handles.get(index)
        if handle is None:
            handle = self._handles[index] = open(self.paths[index], "rb")  # noqa: SIM115 - closed by close()
        handle.seek(offset)
        return json.loads(handle.readline())

    def close(self) -> None:
        """Close the files opened by `record`."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
