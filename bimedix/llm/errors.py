"""The errors an LLM client raises: failed requests, the budget stop, and requests parked for the Batch
API."""

from __future__ import annotations


class LLMError(RuntimeError):
    """A request that failed for good: a non-transient HTTP error, or transient ones past ``max_retries``.

    Attributes:
        status (`int | None`): the HTTP status, ``None`` for connection-level failures.
        transient (`bool`): whether re-running later may succeed.
    """

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


class BudgetExceeded(RuntimeError):
    """Sending the next request could take the ledger past the budget."""


class Deferred(Exception):
    """A request was parked for the Batch API; retry after `LLMClient.flush_batch`."""
