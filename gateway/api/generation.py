"""What chat and legacy completions share: token budgets, n choices, streaming and disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from pydantic_core import to_json

from engines.base import Delta, Engine, Prompt, SamplingParams, TokenLogprob
from gateway.api.protocol import Usage
from gateway.errors import APIError
from gateway.telemetry import metrics
from gateway.telemetry.requests import RequestRecord, current_request

# Stands for a delta's text in a chunk rendered once per stream; random, so no request can contain it.
TEXT_PLACEHOLDER = uuid.uuid4().hex


def fit_max_tokens(engine: Engine, prompt_tokens: int, requested: int | None, param: str = "messages") -> int:
    """The completion budget: what was asked, or all that is left of the context; 400 if it cannot fit."""
    # Not info(): that also measures the model's memory, which no request needs.
    context = engine.context_length()
    available = context - prompt_tokens
    if requested is None and available > 0:
        return available
    if requested is None or prompt_tokens + requested > context:
        asked = f"{prompt_tokens} in the prompt" + (f" and {requested} to generate" if requested else "")
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + (requested or 0)} tokens ({asked}). Please reduce the length of the "
            "messages or completion.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One parameter set per choice: with a seed, choice i uses seed+i so choices differ but repeat."""
    return [params if params.seed is None or i == 0 else replace(params, seed=params.seed + i) for i in range(n)]


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several generations as (index, delta) in arrival order; closing it closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    await queue.put((index, delta))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            finished += item.finish_reason is not None
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ChoiceResult:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens += delta.tokens
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_sequence = delta.stop_sequence or self.stop_sequence


async def collect(merged: AsyncIterator[tuple[int, Delta]], count: int) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in range(count)]
    async with contextlib.aclosing(merged):
        async for index, delta in merged:
            results[index].add(delta)
    return results


def start_generations(engine: Engine, prompt: Prompt, params: SamplingParams, n: int) -> list[AsyncIterator[Delta]]:
    return [engine.generate(prompt, p) for p in choice_params(params, n)]


class Reply:
    """How one endpoint renders results; `produce` drives it for streaming and non-streaming alike."""

    def __init__(self, id: str, created: int, model: str, prompt_tokens: int, choices: int):
        self.id, self.created, self.model = id, created, model
        self.prompt_tokens, self.choices = prompt_tokens, choices
        self._text_halves: dict[int, list[str]] = {}

    def usage(self, completion_tokens: int) -> Usage:
        return Usage.count(self.prompt_tokens, completion_tokens, current_request().cached_tokens)

    def response(self, results: list[ChoiceResult]):
        raise NotImplementedError

    def chunks(self, stream: AsyncIterator[tuple[int, Delta]], include_usage: bool) -> AsyncIterator[str]:
        raise NotImplementedError

    def opening(self) -> int:
        """How many chunks a stream sends before any output (chat's role chunks)."""
        return 0

    def text_chunk(self, index: int, text: str) -> str:
        """The chunk of a delta that carries text only (most of a stream). Its JSON is rendered once per choice
        by the wire model, with a placeholder for the text, and each token's chunk is that text's JSON between
        the two halves: building and dumping two models per token was a large share of the event loop's work
        per streamed token (docs/design/sse-splice.md)."""
        halves = self._text_halves.get(index)
        if halves is None:
            rendered = self.render_text_chunk(index, TEXT_PLACEHOLDER)
            halves = self._text_halves[index] = rendered.split(to_json(TEXT_PLACEHOLDER).decode())
        return halves[0] + to_json(text).decode() + halves[1]

    def render_text_chunk(self, index: int, text: str) -> str:
        """The chunk of a text-only delta, rendered by the wire model."""
        raise NotImplementedError


async def produce(reply: Reply, merged: AsyncIterator[tuple[int, Delta]], stream: bool, include_usage: bool):
    """SSE chunks once the first output is there (a failure before it can still fall back), or one body."""
    record = current_request()
    record.prompt_tokens = reply.prompt_tokens
    merged = metered(merged, record)
    if stream:
        return await _from_first_output(reply.chunks(merged, include_usage), reply.opening())
    return reply.response(await collect(merged, reply.choices))


async def _from_first_output(chunks: AsyncIterator[str], opening: int) -> AsyncIterator[str]:
    """`chunks` once the first after the `opening` ones is there. A first token may show nothing yet (part of a
    character or of a stop sequence, markup the output parser holds), and until output a failure can fall back."""
    held = []
    with contextlib.suppress(StopAsyncIteration):
        while len(held) <= opening:
            held.append(await anext(chunks))

    async def rest() -> AsyncIterator[str]:
        async with contextlib.aclosing(chunks):
            for chunk in held:
                yield chunk
            async for chunk in chunks:
                yield chunk

    return rest()


async def metered(merged: AsyncIterator[tuple[int, Delta]], record: RequestRecord) -> AsyncIterator[tuple[int, Delta]]:
    """Pass deltas through, counting completion tokens and timing the first token and the gaps after it.

    The first token's metrics are recorded after it has been sent (next loop iteration), and the gap
    histogram is looked up at the second: neither belongs on the time to first token."""
    last_at: dict[int, float] = {}
    observe_gap = None
    async with contextlib.aclosing(merged):
        async for index, delta in merged:
            # n choices share one prompt: the best reuse among them is what the prompt cost less.
            record.cached_tokens = max(record.cached_tokens, delta.cached_tokens)
            if delta.tokens:
                arrived = time.perf_counter()
                record.completion_tokens += delta.tokens
                if record.first_token_at is None:
                    record.first_token_at = arrived
                    asyncio.get_running_loop().call_soon(metrics.observe_first_token, record)
                elif index in last_at:
                    observe_gap = observe_gap or metrics.token_gap_observer(record)
                    # A delta can carry several tokens (held back for a stop sequence or UTF-8): share the gap.
                    for _ in range(delta.tokens):
                        observe_gap((arrived - last_at[index]) / delta.tokens)
                last_at[index] = arrived
            yield index, delta
