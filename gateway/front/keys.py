"""Client API keys (Authorization: Bearer, or x-api-key), optional per-key rate limits, and the admin scope."""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass

from gateway.errors import APIError
from gateway.routing.config import ApiKey
from gateway.state.shared import NO_HOLD, Refusal, SharedState, Window
from gateway.telemetry.requests import current_request

# Paths outside /v1/ that read a model all the same (vLLM's and llama-server's names): guarded like /v1/ ones.
GUARDED_PATHS = frozenset({"/tokenize", "/detokenize", "/rerank", "/v2/rerank"})
# The routes of model requests (POSTs served by routing/chain.py `dispatch`): dispatch admits them once their body says
# how many tokens they may use, counting the request and holding its tokens in one step (one call to shared state).
MODEL_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank",
})  # fmt: skip


class KeyLimits:
    """One request's use of its key's requests and tokens per minute (the `TokenAllowance` on its record), counted in
    the key's window: this replica's, or the replicas' shared one (gateway/state/).

    A request is admitted while the key's requests, or its tokens charged in the last minute plus what its requests
    in flight hold, are under the limit. A model request is admitted once its body is read, holding its maximum
    (`ModelRequest.most_tokens`); it is charged what it used when it ends, however it ends: concurrent requests
    overshoot the limit by at most one request's maximum, as consecutive ones do."""

    def __init__(self, window: Window):
        self.window = window
        self.hold = NO_HOLD

    async def admit(self, tokens: int = 0) -> int:
        """Count the request and hold `tokens` until it ends, in one step (429 when the key is at a limit); what it
        holds."""
        hold = await self.window.admit(tokens)
        if isinstance(hold, Refusal):
            raise _limited(hold)
        self.hold = hold
        return hold.tokens

    def settle(self, used: int) -> None:
        """The request ended: it gives back what it held and is charged what it used (without waiting for shared
        state: see `Window.settle`)."""
        self.window.settle(self.hold, used)


def _limited(refusal: Refusal) -> APIError:
    seconds, unit = max(1, math.ceil(refusal.wait)), refusal.unit
    return APIError(
        429, f"Rate limit reached for {unit} per minute: limit {refusal.limit}. Please try again in {seconds}s.",
        type=unit, code="rate_limit_exceeded", headers={"Retry-After": str(seconds)},
    )  # fmt: skip


@dataclass(frozen=True)
class Key:
    window: Window  # its requests and tokens per minute
    admin: bool  # may load and unload models and see target URLs in /health
    owner: str  # a stable id of the key (a hash of it): what it stores, such as responses, is its own


class KeyRing:
    """The accepted keys. Without client keys the gateway is open (the default, for a local process); admin
    keys alone guard only what needs an admin."""

    def __init__(self, keys: list[ApiKey], state: SharedState):
        self._keys = [
            (secret, Key(state.window(owner, k.requests_per_minute, k.tokens_per_minute), k.admin, owner))
            for k in keys
            for secret in [k.secret().encode()]
            for owner in [_owner(secret)]
        ]
        self.closed = any(not key.admin for _, key in self._keys)  # every /v1/ path needs a key
        self.guards_admin = bool(self._keys)  # load and unload need an admin key

    def __bool__(self) -> bool:
        return self.closed

    def match(self, presented: str) -> Key | None:
        """Compare against every key in constant time, so timing reveals neither key nor position."""
        found = None
        candidate = presented.encode()
        for secret, key in self._keys:
            if hmac.compare_digest(secret, candidate):
                found = key
        return found

    def find(self, headers: dict[bytes, bytes]) -> Key | None:
        """The key a request's headers present, if it is one of these."""
        presented = presented_key(headers)
        return self.match(presented) if presented else None

    def is_admin(self, headers: dict[bytes, bytes]) -> bool:
        key = self.find(headers)
        return key is not None and key.admin


def _owner(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:32]


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1") or None


class ApiKeyMiddleware:
    """401 without a valid key and 429 over the key's limits, for every path under /v1/ and GUARDED_PATHS; the
    key's limits go on the request's record, to be charged with the tokens used. A model request (MODEL_ROUTES) is
    admitted later, by dispatch: one refused before that (its body, its model) is not counted. Health, readiness and
    metrics stay open for probes, balancers and scrapers.

    A plain ASGI middleware: a FastAPI dependency on each route cost more than the rest of the check.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _guarded(scope["path"]) and (keys := scope["app"].state.keys):
            try:
                record = current_request()
                key = _identify(keys, dict(scope["headers"]))
                limits = KeyLimits(key.window)
                if not _model_request(scope):
                    await limits.admit()
                record.limits, record.owner = limits, key.owner
            except APIError as error:
                return await error(scope, receive, send)
        await self.app(scope, receive, send)


def _guarded(path: str) -> bool:
    return path.startswith("/v1/") or path in GUARDED_PATHS


def _model_request(scope) -> bool:
    return scope["method"] == "POST" and scope["path"] in MODEL_ROUTES


def _identify(keys: KeyRing, headers: dict[bytes, bytes]) -> Key:
    key = keys.find(headers)
    if key is None:
        message = "Incorrect API key provided." if presented_key(headers) else "You didn't provide an API key."
        raise APIError(401, message, code="invalid_api_key")
    return key


def require_admin(keys: KeyRing, headers: dict[bytes, bytes]) -> None:
    """401 without a valid key, 403 for a key that is not an admin's, once any key is configured; a gateway
    without keys (a local process) lets anyone load and unload."""
    if keys.guards_admin and not _identify(keys, headers).admin:
        raise APIError(
            403, "You have insufficient permissions for this operation: it needs an admin key (admin: true in "
            "api_keys, or one of LLM_ADMIN_KEYS).", code="insufficient_permissions",
        )  # fmt: skip
