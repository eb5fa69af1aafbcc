"""The HTTP/1.1 front: uvicorn's httptools protocol with the limits uvicorn lacks for it.

uvicorn bounds neither the size nor the count of a request's header fields under httptools, nor the time a request
head or body may take to arrive (its keep-alive timer runs only between requests), and its `limit_concurrency`
answers in plain text. `GatewayHttpProtocol` adds these, one method per rule. Only the reading of a request is
timed: once a request has arrived, its response (a long stream, a slow generation) is never cut here.

It reaches into uvicorn's `HttpToolsProtocol` (its parser callbacks, `cycle`, `flow`, `app`, `send_400_response`):
pyproject.toml bounds uvicorn's version, and tests/test_hardening_server.py fails if those move.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import APIError
from gateway.settings import Settings

log = logging.getLogger(__name__)


class HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a head that breaks a limit (its answer is in `refusal`)."""


def raw_error_response(error: APIError, path: str) -> bytes:
    """An error written straight to the socket, for answers given before any request exists (in the shape of the
    route at `path`, as far as the request line was read)."""
    body = json.dumps(error.body(path)).encode()
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return STATUS_LINE[error.status_code] + head + body


def http_protocol(settings: Settings) -> type[GatewayHttpProtocol]:
    """The protocol class to hand uvicorn (`http=`), bound to these settings' limits."""
    too_many_connections = APIError(
        503, f"The server has reached its limit of {settings.max_connections} connections; retry shortly.",
        type="server_error", code="too_many_connections", headers={"Retry-After": "1", "Connection": "close"},
    )  # fmt: skip
    return type(
        "GatewayHttpProtocol", (GatewayHttpProtocol,), {"settings": settings, "over_capacity": too_many_connections}
    )


class GatewayHttpProtocol(HttpToolsProtocol):
    settings: Settings  # bound by http_protocol()
    over_capacity: APIError

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Bytes fed since the parser last completed a head or passed on body data: the header fields (or a
        # chunked body's trailer fields) it may be buffering.
        self.head_bytes = 0
        self.refusal: tuple[int, str] | None = None  # the status and message for a head a callback stopped
        self.read_window = 0.0  # seconds the client was given to send what is missing
        self.read_deadline: float | None = None  # None: the client owes nothing (a request is being answered)
        self.read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A new connection must deliver its first request head within the header timeout, or it is closed.
        self._expect_data(self.settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        # Fed in pieces no larger than the room left under the head limit, so the parser (which joins a field's
        # pieces by copying) never holds more than the limit of one head; a pipelined head that starts inside a
        # piece counts from the next piece, so it may reach twice the limit before it is refused.
        while data and not self.transport.is_closing():
            room = self.settings.max_header_bytes - self.head_bytes
            if room <= 0:
                self._refuse(431, f"The request's header fields exceed {self.settings.max_header_bytes} bytes.")
                return
            piece, data = data[:room], data[room:]  # no copy when it all fits
            self.head_bytes += len(piece)
            super().data_received(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A later request on a kept-alive connection gets the header timeout from its first byte.
        if self.cycle is not None:
            self._expect_data(self.settings.header_timeout)

    def on_headers_complete(self) -> None:
        # More header fields than the limit: 431 before the request reaches the application (counted once the
        # head is in, which the byte limit keeps small).
        if len(self.headers) > self.settings.max_headers:
            self.refusal = (431, f"The request has more than {self.settings.max_headers} header fields.")
            raise HeadRefused()
        self.head_bytes = 0
        # The body, if any, must keep coming: no pause longer than the body timeout.
        self._expect_data(self.settings.body_timeout)
        # Beyond the connection limit a request is answered 503 (in its route's error shape) and its connection closed.
        over_limit = len(self.connections) > self.settings.max_connections
        self.app = self.over_capacity if over_limit else self.config.loaded_app
        if over_limit:
            log.warning("refused a request at the HTTP front: %d connections are open", len(self.connections))
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.head_bytes = 0
        # Body that arrives once the request is answered is discarded, and only until the current deadline: a
        # client cannot keep a connection busy sending a body that nobody reads.
        if not self.cycle.response_complete:
            self._expect_data(self.settings.body_timeout)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.head_bytes = 0
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body ended, the connection is now idle: uvicorn disarmed its keep-alive timer
            # when the rest of the body arrived, so the idle limit is kept here.
            self._expect_data(self.timeout_keep_alive)
        else:
            self.read_deadline = None
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers every parser error with 400; a head stopped by a limit gets that limit's answer.
        if self.refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self.refusal)

    def _expect_data(self, seconds: float) -> None:
        """The client must send what is missing within `seconds` (of silence, for a body), or it is closed."""
        self.read_window = seconds
        self.read_deadline = self.loop.time() + seconds
        # One timer per connection, moved only when the new deadline is earlier: body data re-arms it for free.
        if self.read_timer is not None and self.read_timer.when() > self.read_deadline:
            self.read_timer.cancel()
            self.read_timer = None
        if self.read_timer is None:
            self.read_timer = self.loop.call_at(self.read_deadline, self._check_read_deadline)

    def _check_read_deadline(self) -> None:
        self.read_timer = None
        if self.read_deadline is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            # The server stopped reading (back-pressure, a pipelined request waiting) or has not yet asked for the
            # body (Expect: 100-continue): the client is not late.
            self.read_deadline = now + self.read_window
        if now < self.read_deadline:
            self.read_timer = self.loop.call_at(self.read_deadline, self._check_read_deadline)
        elif self.head_bytes:
            self._refuse(408, "The request was not sent in time.")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answers `status` and closes; while a response is under way only closes (an answer would corrupt it)."""
        log.warning("refused a request at the HTTP front: %s", message)
        if self.cycle is None or self.cycle.response_complete:
            code = "request_header_fields_too_large" if status == 431 else "request_timeout"
            # The request line's target as uvicorn has buffered it (set once a request begins).
            path = getattr(self, "url", b"").partition(b"?")[0].decode("latin-1")
            self.transport.write(raw_error_response(APIError(status, message, code=code), path))
        self.transport.close()
