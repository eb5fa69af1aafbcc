"""Request ids and the per-request log line."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_log = logging.getLogger("gateway.access")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # llama.cpp reports every tensor it loads; keep that for debugging only.
    logging.getLogger("llama-cpp-python").setLevel("DEBUG" if level == "debug" else "WARNING")


class RequestIdMiddleware:
    """Echo the client's x-request-id (or make one), put it on every log line, and log each request.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would buffer streams and hide disconnects.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming[:128] or uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            access_log.info("%s %s %s %.1fms", scope["method"], scope["path"], status, elapsed_ms)
            request_id.reset(token)
