"""The one place that talks to an OpenAI-compatible endpoint (OpenAI, vLLM, ``transformers serve``, ...).

`LLMClient.complete` sends one chat completion through `openai.AsyncOpenAI` and adds what long data
jobs need:

* **bounded concurrency** and optional requests/tokens-per-minute limits;
* a **wall-clock deadline** of ``timeout`` seconds on every attempt, from connecting to the last byte of the
  response, so a server that trickles bytes cannot hold a request past it (the SDK's timeout only bounds
  each read);
* **retries owned here** (the SDK's own retries are switched off with ``max_retries=0``, so request
  counts are exact): only transient failures are retried (429, 408, 409, 5xx, timeouts, dropped
  connections, malformed or truncated response bodies), with exponential backoff and jitter, and a
  ``Retry-After``/``retry-after-ms`` header wins over the backoff. Any other 4xx fails fast;
* the **SQLite request cache and cost ledger** of `bimedix.llm.cache` (a recorded request is never
  sent again), priced with an overridable table of USD per million tokens;
* a **budget**: a request whose worst-case cost (prompt estimate + ``max_tokens``) would take the
  ledger past ``budget_usd`` is not sent; `BudgetExceeded` is raised instead;
* the **Batch API** mode: a cache miss is parked in the database and `Deferred` is raised; the caller
  runs `flush_batch` (see `bimedix.llm.batch`) and tries again, now hitting the cache.

The API key is read from the environment (``OPENAI_API_KEY`` or the variable named by
``api_key_env``) and is never written to the cache, logs or error messages.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..resources import resource_path
from .batch import run_batches
from .cache import CachedResponse, RequestCache, request_key
from .errors import BudgetExceeded, Deferred, LLMError

logger = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 600.0
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Completion:
    """One chat completion: its text, why it stopped, its usage and cost, and whether it came from the
    cache."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cached: bool
    key: str


@dataclass
class ClientConfig:
    """How to reach the endpoint and how hard to push it.

    Args:
        base_url (`str`): the endpoint, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model (`str`): the model name sent with every request.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`): environment variable holding the key.
        concurrency (`int`, *optional*, defaults to `32`): requests in flight at once.
        requests_per_minute (`int`, *optional*): client-side request rate limit.
        tokens_per_minute (`int`, *optional*): client-side token rate limit (prompt estimate + max_tokens).
        timeout (`float`, *optional*, defaults to `120`): seconds one attempt may take from connecting to the
            last byte of the response (a wall-clock deadline, also the SDK's connect/read/write timeout).
        max_retries (`int`, *optional*, defaults to `6`): retries of one request on transient failures.
        backoff_base (`float`, *optional*, defaults to `1`): first backoff in seconds, doubled each retry.
        backoff_max (`float`, *optional*, defaults to `60`): longest backoff between retries.
        budget_usd (`float`, *optional*): stop before the ledger could exceed this many USD.
        prices (`dict`, *optional*): ``{model: {"input": usd_per_1M, "output": usd_per_1M}}`` overriding the
            shipped table (``bimedix/llm/prices.json``).
        batch (`bool`, *optional*, defaults to `False`): park cache misses for the Batch API (half price).
        batch_poll_interval (`float`, *optional*, defaults to `30`): seconds between batch status checks.
        max_tokens_field (`str`, *optional*, defaults to `"max_tokens"`): the request field of the completion
            limit; OpenAI's reasoning models want ``"max_completion_tokens"``.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    timeout: float = 120.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    budget_usd: float | None = None
    prices: dict = field(default_factory=dict)
    batch: bool = False
    batch_poll_interval: float = 30.0
    max_tokens_field: str = "max_tokens"

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0, got {self.budget_usd}")
        if self.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_field must be max_tokens or max_completion_tokens, "
                             f"got {self.max_tokens_field!r}")


def load_prices(path: str | os.PathLike | None = None) -> dict:
    """The shipped price table (USD per million tokens), updated with the JSON file at ``path`` if given."""
    prices = json.loads(resource_path("bimedix", "llm", "prices.json").read_text())
    prices.pop("_comment", None)
    if path is not None:
        try:
            extra = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON in price table "
                             f"({err.msg} at line {err.lineno})") from None
        for model, entry in extra.items():
            if not (isinstance(entry, dict) and {"input", "output"} <= set(entry)):
                raise ValueError(f"{path}: price of {model!r} must be "
                                 f"{{\"input\": USD/1M, \"output\": USD/1M}}, got {entry!r}")
        prices.update(extra)
    return prices


class LLMClient:
    """Cached, budgeted, rate-limited chat completions over `openai.AsyncOpenAI`.

    Args:
        config (`ClientConfig`): endpoint, model and limits.
        cache (`RequestCache`): the request cache and cost ledger.

    Examples:

    ```python
    client = LLMClient(ClientConfig(base_url="http://127.0.0.1:8000/v1", model="m"),
    RequestCache("run.sqlite")) completion = await client.complete([{"role": "user", "content": "Hi"}],
    max_tokens=64) await client.aclose()
    ```
    """

    def __init__(self, config: ClientConfig, cache: RequestCache):
        self.config = config
        self.cache = cache
        prices = {**load_prices(), **config.prices}
        self.price = prices.get(config.model)
        if self.price is None:
            if config.budget_usd is not None:
                raise ValueError(f"no price for model {config.model!r}, so "
                                 "--budget-usd cannot be enforced; pass "
                                 "--prices FILE with {\"" + config.model + "\": {\"input\": USD_PER_1M, "
                                 "\"output\": USD_PER_1M}}")
            logger.warning("no price for model %r: costs are recorded as 0 (pass --prices to set one)",
                           config.model)
            self.price = {"input": 0.0, "output": 0.0}
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ValueError(f"environment variable {config.api_key_env} "
                             "is not set: export the API key there "
                             "(for a local server any non-empty value "
                             "works) or name another with --api-key-env")
        self._api_key = api_key
        self._openai = None
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._limiter = _RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._spent = cache.total_cost()
        self._reserved = 0.0
        self.sent = 0
        self.retried = 0

    @property
    def spent_usd(self) -> float:
        """The ledger total in USD (every run on this cache)."""
        return self._spent

    def cost(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """USD for the given usage at this model's price (half with the Batch API)."""
        usd = (prompt_tokens * self.price["input"] + completion_tokens * self.price["output"]) / 1e6
        return usd * (BATCH_DISCOUNT if batch else 1.0)

    def request_body(self, messages: list[dict], **params) -> dict:
        """The exact body sent for ``messages``: model, messages and the non-``None`` parameters."""
        return {"model": self.config.model, "messages": messages,
                **{k: v for k, v in params.items() if v is not None}}

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float | None = None,
                       seed: int | None = None, response_format: dict | None = None) -> Completion:
        """Return the completion of ``messages``: from the cache if recorded, else from the endpoint.

        Args:
            messages (`list[dict]`): OpenAI chat messages.
            max_tokens (`int`): the completion limit (also the worst case the budget check assumes).
            temperature (`float`, *optional*): sampling temperature.
            seed (`int`, *optional*): sampling seed; vary it to get a fresh sample of the same prompt.
            response_format (`dict`, *optional*): e.g. ``{"type": "json_object"}``.

        Raises:
            `LLMError`: a non-transient error, or transient errors past ``max_retries``.
            `BudgetExceeded`: the request could take the ledger past ``budget_usd``.
            `Deferred`: batch mode parked the request.
        """
        body = self.request_body(messages, temperature=temperature, seed=seed,
                                 response_format=response_format,
                                 **{self.config.max_tokens_field: max_tokens})
        key = request_key(body)
        hit = self.cache.get(key)
        if hit is not None:
            return Completion(hit.text, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens,
                              hit.cost_usd,
                              True, key)
        estimate = self.cost(_estimate_tokens(messages), max_tokens, batch=self.config.batch)
        budget = self.config.budget_usd
        if budget is not None and self._spent + self._reserved + estimate > budget:
            raise BudgetExceeded(f"budget of ${budget:.4f} reached (spent ${self._spent:.4f}, "
                                 f"next request could cost up to ${estimate:.4f})")
        if self.config.batch:
            self.cache.add_pending(key, body)
            self._reserved += estimate  # until the batch is collected
            raise Deferred(key)
        self._reserved += estimate
        try:
            response = await self._send(body, estimate_tokens=_estimate_tokens(messages) + max_tokens)
        finally:
            self._reserved -= estimate
        response = CachedResponse(response.text, response.finish_reason, response.prompt_tokens,
                                  response.completion_tokens,
                                  self.cost(response.prompt_tokens, response.completion_tokens))
        self.cache.put(key, self.config.model, response)
        self._spent += response.cost_usd
        return Completion(response.text, response.finish_reason, response.prompt_tokens,
                          response.completion_tokens, response.cost_usd, False, key)

    async def flush_batch(self) -> int:
        """Submit parked requests as Batch API jobs, wait for them and record their results; return how
        many."""
        recorded = await run_batches(self._client(), self.cache, model=self.config.model,
                                     price=lambda prompt,
                                     completion: self.cost(prompt, completion, batch=True),
                                     call_timeout=self.config.timeout, server=self.config.base_url,
                                     poll_interval=self.config.batch_poll_interval)
        self._spent, self._reserved = self.cache.total_cost(), 0.0
        return recorded

    def progress(self, total: int, desc: str) -> tqdm:
        """A tqdm bar over records (rate and ETA from tqdm); call `show_cost` to refresh the cost."""
        return tqdm(total=total, desc=desc, unit="rec", dynamic_ncols=True, mininterval=0.5)

    def show_cost(self, bar: tqdm) -> None:
        """Put the ledger total on ``bar``."""
        bar.set_postfix_str(f"${self._spent:.4f}", refresh=False)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        if self._openai is not None:
            await self._openai.close()
            self._openai = None

    def _client(self):
        if self._openai is None:
            from openai import AsyncOpenAI

            self._openai = AsyncOpenAI(base_url=self.config.base_url, api_key=self._api_key, max_retries=0,
                                       timeout=self.config.timeout)
        return self._openai

    async def _send(self, body: dict, *, estimate_tokens: int) -> CachedResponse:
        import httpx2
        import openai

        client = self._client()
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            wait = None
            try:
                await self._limiter.acquire(estimate_tokens)
                async with self._semaphore:
                    self.sent += 1
                    # connect + whole body, however it trickles
                    async with asyncio.timeout(self.config.timeout):
                        response = await client.post("/chat/completions", body=body, cast_to=httpx2.Response)
                        content = await response.aread()
                return _parse(content)
            except openai.APIStatusError as err:
                status = err.status_code
                reason = f"HTTP {status}: {_error_message(err)}"
                if status not in TRANSIENT_STATUSES:
                    raise LLMError(f"{self.config.base_url} answered {reason}; "
                                   "not retried (check the model name, "
                                   "the API key and the request)", status=status) from None
                wait = _retry_after(err.response.headers)
            except (openai.APITimeoutError, TimeoutError):
                reason, status = f"no complete response within {self.config.timeout:g} s", None
            except openai.APIConnectionError as err:
                reason, status = f"connection failed ({_root_cause(err)})", None
            except _MalformedResponse as err:
                reason, status = f"malformed response body ({str(err)[:160]})", None
            if attempt + 1 == attempts:
                raise LLMError(f"{self.config.base_url}: gave up after "
                               f"{attempts} attempts; last error: {reason}",
                               status=status, transient=True)
            if wait is None:
                wait = min(self.config.backoff_max, self.config.backoff_base
                           * 2 ** attempt) * random.uniform(0.5, 1)
            self.retried += 1
            logger.info("retrying in %.2f s (attempt %d/%d): %s", wait, attempt + 2, attempts, reason)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")


class _MalformedResponse(Exception):
    pass


def _parse(content: bytes) -> CachedResponse:
    """Pull text, finish reason and usage out of a chat-completion body, or raise `_MalformedResponse`."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        text, usage = choice["message"]["content"], data["usage"]
        prompt_tokens, completion_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _MalformedResponse(f"{type(err).__name__}: {err}; body starts {content[:80]!r}") from None
    if not isinstance(text, str):
        raise _MalformedResponse(f"the first choice has no text content; body starts {content[:80]!r}")
    return CachedResponse(text, choice.get("finish_reason") or "stop", prompt_tokens, completion_tokens, 0.0)


def _retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), capped at 10 minutes."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(value) * scale))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return min(MAX_RETRY_AFTER, max(0.0, email.utils.mktime_tz(parsed) - time.time()))
    return None


def _error_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message)[:300]
    return str(getattr(err, "message", err))[:300]


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"[:200]


def _estimate_tokens(messages: list[dict]) -> int:
    """A cheap over-estimate of prompt tokens (3 characters per token) for budget and rate checks."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 3 + 4 * len(messages)


class _RateLimiter:
    """Sliding ``window``-second window (a minute) over requests and tokens; a no-op when both limits are
    ``None``."""

    def __init__(self, rpm: int | None, tpm: int | None, window: float = 60.0):
        self.rpm, self.tpm, self.window = rpm, tpm, window
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._tokens = 0

    async def acquire(self, tokens: int) -> None:
        if self.rpm is None and self.tpm is None:
            return
        while True:
            now = time.monotonic()
            while self._window and now - self._window[0][0] >= self.window:
                self._tokens -= self._window.popleft()[1]
            fits_rpm = self.rpm is None or len(self._window) < self.rpm
            fits_tpm = self.tpm is None or not self._window or self._tokens + tokens <= self.tpm
            if fits_rpm and fits_tpm:
                self._window.append((now, tokens))
                self._tokens += tokens
                return
            await asyncio.sleep(self.window - (now - self._window[0][0]) + 0.001)
