"""Client API keys (Authorization: Bearer, or x-api-key) and optional per-key rate limits."""

from __future__ import annotations

import collections
import hmac
import math
import time

from gateway.config import ApiKey
from gateway.errors import APIError
from gateway.observability import current_request

WINDOW = 60.0  # rate limits are per minute, over a sliding window


class KeyLimits:
    """Requests and tokens a key used in the last minute; tokens are charged when a reply is done."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: collections.deque[float] = collections.deque()
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()

    def admit(self) -> None:
        now = time.monotonic()
        self._forget(now)
        if self.rpm is not None and len(self._requests) >= self.rpm:
            raise _limited("requests", self.rpm, self._requests[0] + WINDOW - now)
        if self.tpm is not None and sum(t for _, t in self._tokens) >= self.tpm:
            raise _limited("tokens", self.tpm, self._tokens[0][0] + WINDOW - now)
        self._requests.append(now)

    def charge(self, tokens: int) -> None:
        if self.tpm is not None and tokens:
            self._tokens.append((time.monotonic(), tokens))

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None

    def _forget(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - WINDOW:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= now - WINDOW:
            self._tokens.popleft()


def _limited(unit: str, limit: int, wait: float) -> APIError:
    seconds = max(1, math.ceil(wait))
    return APIError(
        429, f"Rate limit reached for {unit} per minute: limit {limit}. Please try again in {seconds}s.",
        type=unit, code="rate_limit_exceeded", headers={"Retry-After": str(seconds)},
    )  # fmt: skip


class KeyRing:
    """The accepted keys. Empty means the gateway is open (the default, for a local process)."""

    def __init__(self, keys: list[ApiKey]):
        self._keys = [(k.secret().encode(), KeyLimits(k.requests_per_minute, k.tokens_per_minute)) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def match(self, presented: str) -> KeyLimits | None:
        """Compare against every key in constant time, so timing reveals neither key nor position."""
        found = None
        candidate = presented.encode()
        for secret, limits in self._keys:
            if hmac.compare_digest(secret, candidate):
                found = limits
        return found


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1") or None


class ApiKeyMiddleware:
    """401 without a valid key and 429 over the key's limits, for every path under /v1/; the key's limits go on
    the request's record, to be charged with the tokens used. Health, readiness and metrics stay open for
    probes, balancers and scrapers.

    A plain ASGI middleware: a FastAPI dependency on each route cost more than the rest of the check.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and (keys := scope["app"].state.keys):
            try:
                current_request().limits = _admit(keys, dict(scope["headers"]))
            except APIError as error:
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _admit(keys: KeyRing, headers: dict[bytes, bytes]) -> KeyLimits:
    presented = presented_key(headers)
    limits = keys.match(presented) if presented else None
    if limits is None:
        message = "Incorrect API key provided." if presented else "You didn't provide an API key."
        raise APIError(401, message, code="invalid_api_key")
    limits.admit()
    return limits
