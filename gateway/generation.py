"""What chat and legacy completions share: token budgets, n choices, streaming and disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic_core import to_json
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from engines.base import Delta, Engine, Prompt, SamplingParams, TokenLogprob
from gateway import metrics
from gateway.errors import APIError, as_api_error
from gateway.observability import RequestRecord, current_request
from gateway.protocol import Usage

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody is left to read it
WATCH_AFTER = 0.05  # seconds into a request before a watcher waits for its client to go away
PING_S = 15  # seconds between SSE comment lines that keep idle proxies from closing a stream
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


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item before answering, so failures before any output become HTTP errors."""
    first = await anext(stream)

    async def rest() -> AsyncIterator[T]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item

    return rest()


@dataclass
class ChoiceResult:
    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens += delta.tokens
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason


async def collect(merged: AsyncIterator[tuple[int, Delta]], count: int) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in range(count)]
    async with contextlib.aclosing(merged):
        async for index, delta in merged:
            results[index].add(delta)
    return results


def start_generations(engine: Engine, prompt: Prompt, params: SamplingParams, n: int) -> list[AsyncIterator[Delta]]:
    return [engine.generate(prompt, p) for p in choice_params(params, n)]


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work` unless the client goes away first; then cancel it, which frees the engine.

    The watch starts WATCH_AFTER seconds in: most answers come sooner, and a watcher task for each of those
    would be a noticeable share of a relayed request's CPU. A client gone by then is still seen.
    """
    serving = asyncio.current_task()
    watcher: asyncio.Task | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, serving))

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if not _client_left(watcher, serving):
            raise  # cancelled from elsewhere (server shutdown), not by the watcher
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()


def _client_left(watcher: asyncio.Task | None, task: asyncio.Task) -> bool:
    """Whether `task` was cancelled by its `_cancel_on_disconnect` watcher alone; if so, that cancellation is
    taken back, so the task can finish quietly."""
    return watcher is not None and watcher.done() and not watcher.cancelled() and task.uncancel() == 0


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
    """SSE chunks once the first token is there (a failure before it can still fall back), or one body."""
    record = current_request()
    record.prompt_tokens = reply.prompt_tokens
    merged = metered(merged, record)
    if stream:
        return reply.chunks(await primed(merged), include_usage)
    return reply.response(await collect(merged, reply.choices))


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


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> EventSourceResponse:
    """Send JSON strings as SSE `data:` events, then `[DONE]`; an error mid-stream becomes a last event."""

    async def with_done() -> AsyncIterator[bytes]:
        # Events go out as encoded bytes, which sse-starlette passes through: no event object per token.
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield b"data: %s\n\n" % event.encode()
        except Exception as error:  # headers are gone already: report in the stream, as OpenAI does
            yield b"data: %s\n\n" % json.dumps(as_api_error(error).body()).encode()
        yield b"data: [DONE]\n\n"

    return _EventStream.streaming(with_done(), headers or {})


class _EventStream(EventSourceResponse):
    """sse-starlette's response (its headers, its stream with the clean-up on failure, its pings and its
    disconnect watch) run under plain asyncio tasks. Its own `__call__` starts an anyio task group of four
    tasks per stream, which costs more than a whole relayed request (docs/design/sse-splice.md); its
    fourth task ends streams at server shutdown, which uvicorn's graceful shutdown does here instead."""

    @classmethod
    def streaming(cls, events: AsyncIterator[bytes], headers: dict[str, str]) -> _EventStream:
        """A copy of one response made per set of headers, with its own events, headers list and send lock.
        sse-starlette's constructor builds the headers and an anyio lock each time, between a stream's first
        token and its first byte on the wire. (tests/unit/test_units.py checks that a copy shares nothing
        mutable with its template.)"""
        template = _template(tuple(headers.items()))
        stream = copy.copy(template)
        stream.body_iterator, stream.raw_headers, stream._send_lock = events, list(template.raw_headers), asyncio.Lock()
        return stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        watcher: asyncio.Task | None = None
        pings: asyncio.Task | None = None

        def start_helpers() -> None:
            nonlocal watcher, pings
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, streaming))
            pings = asyncio.create_task(self._ping(send)) if self.ping_interval > 0 else None

        # In the next loop iteration: by then the first event (there as the stream starts) has been sent,
        # so starting the two tasks is not part of the time to first token.
        starting = asyncio.get_running_loop().call_soon(start_helpers)
        try:
            await self._stream_response(send)
        except asyncio.CancelledError:
            if not _client_left(watcher, streaming):
                raise  # cancelled from elsewhere (server shutdown), not because the client left
        finally:
            starting.cancel()
            for helper in (watcher, pings):
                if helper is not None:
                    helper.cancel()

    async def _send_with_timeout(self, send, message) -> None:
        """Without the per-send timeout, which we never set: it still opened an anyio cancel scope around
        every event, per streamed token."""
        await send(message)


@functools.lru_cache(maxsize=64)
def _template(headers: tuple[tuple[str, str], ...]) -> _EventStream:
    return _EventStream(_no_events(), sep="\n", headers=dict(headers), ping=PING_S)


async def _no_events() -> AsyncIterator[bytes]:
    return
    yield
