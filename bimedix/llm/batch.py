"""OpenAI Batch API mode: submit parked requests as a batch job, wait for it, record the results (half price).

In batch mode `LLMClient.complete` parks every cache miss in the database and raises `Deferred`;
`run_batches` then (1) writes the parked requests as Batch JSONL (``custom_id`` = cache key), uploads it
with ``purpose="batch"`` and creates a ``/v1/chat/completions`` batch, remembering its id in the
database in the same transaction that marks the requests submitted; (2) polls every open batch until it
ends; (3) downloads the output file and records each answer in the cache and ledger at the batch price.
A run killed while waiting finds its open batches in the database and keeps polling them instead of
submitting again. Requests a batch did not answer go back to the pool and are resubmitted next pass.
The few management calls (upload, create, poll, download) use the SDK's own retries (up to
``MANAGEMENT_RETRIES``); each call, retries included, has a wall-clock deadline of ``MANAGEMENT_RETRIES + 1``
times the client's ``timeout``, past which the run stops with a transient `LLMError` (re-run to continue:
submitted batches are remembered).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from .cache import CachedResponse, RequestCache
from .errors import LLMError

logger = logging.getLogger(__name__)

MAX_REQUESTS_PER_BATCH = 50_000
MANAGEMENT_RETRIES = 5
TERMINAL_STATES = ("completed", "failed", "expired", "cancelled")


async def run_batches(openai_client, cache: RequestCache, *, model: str, price: Callable[[int, int], float],
                      call_timeout: float, server: str, poll_interval: float = 30.0,
                      completion_window: str = "24h") -> int:
    """Submit unsubmitted parked requests, wait for every open batch, record the answers; return how many.

    Args:
        openai_client (`openai.AsyncOpenAI`): the SDK client.
        cache (`RequestCache`): where parked requests wait and answers are recorded.
        model (`str`): the model the answers are recorded under.
        price (`Callable[[int, int], float]`): the cost of an answer from its prompt and completion tokens
            (batch discount applied).
        call_timeout (`float`): the client's per-request timeout in seconds, which sets the management
            deadline.
        server (`str`): the API base URL, named in errors.
        poll_interval (`float`, *optional*, defaults to `30`): seconds between status checks.
        completion_window (`str`, *optional*, defaults to `"24h"`): the Batch API completion window.
    """
    api = openai_client.with_options(max_retries=MANAGEMENT_RETRIES)
    seconds = call_timeout * (MANAGEMENT_RETRIES + 1)

    async def within(what: str, call):
        try:
            async with asyncio.timeout(seconds):
                return await call
        except TimeoutError:
            raise LLMError(f"{server}: {what} took more than {seconds:g} s (the Batch API "
                           "management calls' deadline); re-run to continue", transient=True) from None

    pending = cache.unsubmitted()
    for start in range(0, len(pending), MAX_REQUESTS_PER_BATCH):
        chunk = pending[start:start + MAX_REQUESTS_PER_BATCH]
        lines = "".join(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                    "body": body},
                                   ensure_ascii=False) + "\n" for key, body in chunk)
        uploaded = await within("uploading the batch file", api.files.create(
            file=("bimedix-batch.jsonl", lines.encode(), "application/jsonl"), purpose="batch"))
        batch = await within("creating the batch", api.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=completion_window))
        cache.record_batch(batch.id, uploaded.id, [key for key, _ in chunk])
        logger.info("submitted batch %s with %d requests", batch.id, len(chunk))
    recorded = 0
    for batch_id in cache.open_batches():
        batch = await within(f"polling batch {batch_id}", api.batches.retrieve(batch_id))
        while batch.status not in TERMINAL_STATES:
            await asyncio.sleep(poll_interval)
            batch = await within(f"polling batch {batch_id}", api.batches.retrieve(batch_id))
        if batch.status != "completed":
            logger.warning("batch %s ended %s; its unanswered requests will be resubmitted", batch_id,
                           batch.status)
        if batch.output_file_id:
            content = await within(f"downloading the output of batch {batch_id}",
                                   api.files.content(batch.output_file_id))
            recorded += _record_output(content.text, cache, model, price)
        cache.close_batch(batch_id)
    return recorded


def _record_output(text: str, cache: RequestCache, model: str, price: Callable[[int, int], float]) -> int:
    recorded = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        response = item.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200 or not body.get("choices"):
            logger.warning("batch output line %d (%s) failed: %s", line_no, item.get("custom_id"),
                           item.get("error") or response.get("status_code"))
            continue
        choice, usage = body["choices"][0], body.get("usage") or {}
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens",
                                                         0)), int(usage.get("completion_tokens", 0))
        cache.put(item["custom_id"], model, CachedResponse(
            choice["message"].get("content") or "", choice.get("finish_reason") or "stop", prompt_tokens,
            completion_tokens, price(prompt_tokens, completion_tokens)), mode="batch")
        recorded += 1
    return recorded
