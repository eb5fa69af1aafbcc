"""The stream machinery every front end shares: SSE responses, client disconnects, and holding an answer back
until its first item, so that a failure before any output is still an HTTP error (and can fall back)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import APIError, as_api_error

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody is left to read it
WATCH_AFTER = 0.05  # seconds into a request before a watcher waits for its client to go away
PING_S = 15  # seconds between SSE comment lines that keep idle proxies from closing a stream


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item before answering, so failures before any output become HTTP errors."""
    first = await anext(stream)

    async def rest() -> AsyncIterator[T]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item

    return rest()


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


@dataclass(frozen=True)
class Framing:
    """How a protocol writes its stream: each event (a JSON string), an error once the headers are gone, the end."""

    event: Callable[[str], bytes]
    error: Callable[[APIError], bytes]
    end: bytes = b""


def data_frame(event: str) -> bytes:
    return b"data: %s\n\n" % event.encode()


def named_frame(event: str) -> bytes:
    """An SSE event named by its JSON's `type` (the Responses and Messages APIs' streams)."""
    kind = json.loads(event)["type"]
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), event.encode())


# Chat and legacy completions: `data:` events, an error as one more, then `[DONE]`.
OPENAI_FRAMING = Framing(data_frame, lambda error: data_frame(json.dumps(error.body())), b"data: [DONE]\n\n")


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 framing: Framing = OPENAI_FRAMING) -> EventSourceResponse:  # fmt: skip
    """Send JSON strings as SSE events, in `framing`; an error mid-stream becomes a last event."""

    async def framed() -> AsyncIterator[bytes]:
        # Events go out as encoded bytes, which sse-starlette passes through: no event object per token.
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield framing.event(event)
        except Exception as error:  # headers are gone already: report in the stream, as the providers do
            yield framing.error(as_api_error(error))
        if framing.end:
            yield framing.end

    return _EventStream.streaming(framed(), headers or {})


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
