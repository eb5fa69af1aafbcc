"""Request ids, the per-request record, JSON logs (one line per request) and metrics at the end of it.

The access middleware opens a `RequestRecord` for each request; handlers fill it in (`current_request()`:
model, target, tokens) and when the response is done the middleware charges the client key's tokens, writes
one JSON log line and updates the metrics from it. Prompt text and API keys are never put on the record, so
never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from gateway.telemetry import metrics, tracing

access_log = logging.getLogger("gateway.access")


class TokenAllowance(Protocol):
    """A request's share of its client key's tokens per minute (front/keys.py), charged as the request ends."""

    def settle(self, used: int) -> None: ...


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "unmatched"  # the route template, so ids in paths do not multiply label values
    model: str | None = None
    target: str = "local"  # routing sets the target that finally answered
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine did not compute again (prefix reuse)
    first_token_at: float | None = None
    limits: TokenAllowance | None = None  # the client key's, charged with the tokens used when the request ends
    owner: str = ""  # the client key's stable id ("" on a gateway without keys): what it stores is its own
    reserved: int = 0  # the request's maximum, held against the key's tokens per minute while it runs
    # A remote target is answering and has not yet said (or shown, in a stream that ended) what it used.
    usage_pending: bool = False

    def attempt(self, target: str, remote: bool) -> None:
        """`target` tries to serve the request now: what an earlier target counted before failing is dropped."""
        self.target = target
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.first_token_at = None
        self.usage_pending = remote

    def settle(self) -> None:
        """Charge the client key, once: the counts on the record; the whole reservation when the request ended
        (deadline, client gone, stream cut) before a provider told its usage, which it may bill in full. Nobody
        waits: shared state (Redis) applies it in the background, and until it lands the key's next requests still
        count the request's hold, its maximum, so the limits err on the side of refusing."""
        if self.limits is None:
            return
        limits, self.limits = self.limits, None
        counted = self.prompt_tokens + self.completion_tokens
        limits.settle(max(counted, self.reserved) if self.usage_pending else counted)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def log_fields(self) -> dict:
        ttft = self.ttft()
        return {
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "model": self.model,
            "target": self.target,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "latency_ms": round(self.elapsed() * 1000, 1),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
        }


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request_record", default=None)


def current_request() -> RequestRecord:
    """The record of the request being served; outside a request, a throwaway one."""
    return _current.get() or RequestRecord(request_id="-", method="-", path="-")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed as `extra={"fields": {...}}` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        current = _current.get()
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": current.request_id if current else None,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # llama.cpp reports every tensor it loads; keep that for debugging only.
    logging.getLogger("llama-cpp-python").setLevel("DEBUG" if level == "debug" else "WARNING")
    # httpx logs every upstream request at INFO; the access log already has one line per request.
    logging.getLogger("httpx").setLevel("DEBUG" if level == "debug" else "WARNING")


class RequestIdMiddleware:
    """Echo the client's x-request-id (or make one), keep the request's record, and log and count it.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would buffer streams and hide disconnects.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        record = RequestRecord(request_id=incoming[:128] or os.urandom(16).hex(), method=scope["method"],
                               path=scope["path"])  # fmt: skip
        token = _current.set(record)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                record.route = getattr(scope.get("route"), "path", record.route)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.settle()  # as the client sees the end: its next request finds the key charged (or still held)
            await send(message)

        try:
            with tracing.span(record):
                await self.app(scope, receive, send_with_id)
        except BaseException:
            record.status = record.status or 500  # Starlette's error middleware, inside, has answered it
            raise
        finally:
            record.settle()  # a request that ended with no answer sent (the client left, a crash) is charged too
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("request", extra={"fields": record.log_fields()})
            metrics.observe_request(record)
            _current.reset(token)
