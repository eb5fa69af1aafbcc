"""408 for clients too slow to send their request body, within the same timeout the request asked for.

A plain ASGI middleware: it reads the body first (API request bodies are small), under the deadline,
then hands it to the app, and after that passes `receive` through so disconnects are still seen.
"""

from __future__ import annotations

import asyncio

from gateway.errors import APIError
from gateway.fallback import TIMEOUT_HEADER, capped_timeout
from gateway.settings import Settings


class BodyTimeoutMiddleware:
    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            async with asyncio.timeout(self._seconds(scope)):
                messages = await _read_body(receive)
        except TimeoutError:
            error = APIError(408, "The request body did not arrive in time.", type="timeout_error", code="timeout")
            return await error.response()(scope, receive, send)
        pending = list(messages)

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    def _seconds(self, scope) -> float:
        """The header's timeout, else the default: the body's own `timeout` field is not readable yet."""
        try:
            return capped_timeout(dict(scope["headers"])[TIMEOUT_HEADER.encode()], self.settings)
        except (KeyError, ValueError):
            return self.settings.request_timeout  # a bad header gets its 400 once the body is read


async def _read_body(receive) -> list[dict]:
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            return messages
