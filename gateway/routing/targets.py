"""Targets: where a request can be served. A local in-process engine or a remote OpenAI-compatible API.

Both answer `serve(endpoint, body)` with an `Outcome`: a whole JSON body, or a stream of SSE `data`
payloads whose first item has already arrived (so a failure before it can still fall back). A failure
worth trying elsewhere is a `TargetFailure`; anything else (a 400 caused by the request) is final.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Mapping

from pydantic import BaseModel
from pydantic_core import to_json

from engines.base import Engine, EngineError, EngineOverloaded
from gateway.core.request import ModelRequest
from gateway.core.streams import primed
from gateway.errors import APIError, from_engine_error, invalid_param
from gateway.models.lifecycle import ManagedModel
from gateway.routing.breaker import Breaker
from gateway.routing.config import RemoteTargetConfig
from gateway.telemetry.requests import current_request
from gateway.telemetry.usage import StreamTally, record_body_usage
from gateway.upstream.client import HttpClient, UpstreamResponse, UpstreamUnavailable

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
AUTH_STATUS = {401, 403}  # the provider refuses the gateway's own key


@dataclass
class Outcome:
    target: str
    endpoint: str
    body: bytes | None = None
    events: AsyncIterator[str] | None = None
    # The endpoint whose wire format body and events are in: the internal request's, or the origin's where a
    # provider that speaks the client's protocol was sent the client's request as it is.
    endpoint: str


class TargetFailure(APIError):
    """A target could not serve this request; the next one in the chain may. Shown as `error` if none can."""

    def __init__(self, error: APIError, *, retry_here: bool, unhealthy: bool, retry_after: float | None = None):
        super().__init__(
            error.status_code, error.message, type=error.type, param=error.param, code=error.code, headers=error.headers
        )
        self.retry_here = retry_here  # worth another attempt on the same target after a backoff
        self.unhealthy = unhealthy  # counts towards the target's cooldown
        self.retry_after = retry_after


class CapabilityMismatch(TargetFailure):
    """The target cannot do what the request asks (tools for a local model). No fault of the target:
    the chain moves on without counting it, and the client hears of it only if no target can serve."""

    def __init__(self, param: str, target: str):
        error = invalid_param(
            param, f"The parameter '{param}' is not supported by target '{target}' (a local model); route "
            "this model to a provider that supports it.", "unsupported_parameter",
        )  # fmt: skip
        super().__init__(error, retry_here=False, unhealthy=False)


# How a local model answers one endpoint (the api modules' `serve_locally`); the app factory wires them by endpoint.
LocalHandler = Callable[[Engine, ModelRequest], Awaitable[BaseModel | AsyncIterator[str]]]


class LocalTarget:
    kind = "local"

    def __init__(self, name: str, model: ManagedModel, handlers: Mapping[str, LocalHandler], breaker: Breaker):
        self.name, self.model, self.handlers, self.breaker = name, model, handlers, breaker

    async def serve(self, endpoint: str, body: ModelRequest, remaining: float) -> Outcome:
        if (param := body.unsupported_locally()) is not None:
            raise CapabilityMismatch(param, self.name)
        if self.model.readiness() == "stalled":
            # It would wait behind a step that may never end, past its deadline, with no time left to fall back.
            raise TargetFailure(self._stalled(), retry_here=False, unhealthy=True)
        # Held from the first engine call (rendering, tokenizing) until the handler returns; a stream's own hold
        # (ManagedModel.generate) begins before that, with its first delta, and lasts until it is closed.
        with self.model.serving():
            try:
                result = await self.handlers[endpoint](self.model, body)
            except EngineError as error:
                raise self._failure(error) from error
        if isinstance(result, BaseModel):
            return Outcome(self.name, endpoint, body=result.model_dump_json().encode())
        return Outcome(self.name, endpoint, events=result)

    def _stalled(self) -> APIError:
        return APIError(
            503, f"Target '{self.name}' is stalled: its engine has been inside one step for "
            f"{self.model.info().busy_s:.0f} s.", type="server_error", code="model_stalled",
        )  # fmt: skip

    @staticmethod
    def _failure(error: EngineError) -> APIError | TargetFailure:
        api_error = from_engine_error(error)
        if error.status_code < 500:
            return api_error
        # A full queue says nothing about the engine's health; not-ready and crashes do.
        return TargetFailure(api_error, retry_here=False, unhealthy=not isinstance(error, EngineOverloaded))

    def health(self) -> dict:
        return {"type": self.kind, "engine": self.model.name, **self.breaker.health()}


class RemoteTarget:
    kind = "openai"

    def __init__(self, name: str, config: RemoteTargetConfig, client: HttpClient, breaker: Breaker):
        self.name, self.config, self.client, self.breaker = name, config, client, breaker
        self.base_url = config.base_url.rstrip("/")
        key = config.api_key()  # read once at start-up: a missing variable stops it there
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        # The body goes out encoded (bytes), so its type is ours to name, unless the config names one itself.
        own_type = any(name.lower() == "content-type" for name in config.headers)
        json_type = {} if own_type else {"Content-Type": "application/json"}
        self.headers = {**json_type, **config.headers, **auth}

    async def serve(self, endpoint: str, body: ModelRequest, remaining: float) -> Outcome:
        payload = body.as_sent()
        payload["model"] = self.config.model
        # Another gateway (or any server that reads it) stops at the same deadline as this one.
        headers = {**self.headers, "x-request-timeout": f"{remaining:.3f}"}
        url = f"{self.base_url}/{endpoint}"
        if payload.get("stream"):
            tally = StreamTally(current_request(), client_wants_usage=body.wants_usage())
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
            return Outcome(self.name, endpoint, events=await primed(self._events(url, to_json(payload), headers, tally)))
        try:  # pydantic-core's JSON encoder and decoder (tally.py) take a fifth to a third of the json module's time
            async with self._post(url, to_json(payload), headers) as response:
                content = await self._read_ok(response)
        except UpstreamUnavailable as error:
            raise self._unreachable(error) from error
        record_body_usage(current_request(), content)
        return Outcome(self.name, endpoint, body=content)

    def _post(self, url: str, body: bytes, headers: dict[str, str]):
        return self.client.post(url, body, headers, self.config.connect_timeout, self.config.read_timeout)

    async def _events(self, url: str, body: bytes, headers: dict[str, str], tally: StreamTally,
                      ) -> AsyncIterator[str]:  # fmt: skip
        """The upstream's `data` payloads, relayed one by one as they arrive, without `[DONE]`."""
        try:
            async with self._post(url, body, headers) as response:
                await self._read_ok(response, streaming=True)
                first = True
                async for line in response.lines():
                    if not line.startswith("data:"):
                        continue  # comments (pings), blank separators, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        tally.finished = True
                        return
                    if first and data.startswith('{"error"'):
                        raise self._failure(500, response.headers, data.encode())  # failed before any output
                    first = False
                    if tally.passes(data):
                        yield data
        except UpstreamUnavailable as error:
            raise self._unreachable(error) from error
        finally:
            tally.settle()
        error = APIError(502, f"target {self.name!r} closed the stream before it finished", type="server_error")
        # Before its first chunk nothing has reached the client: the next target in the chain may still answer.
        raise TargetFailure(error, retry_here=False, unhealthy=True) if first else error

    async def _read_ok(self, response: UpstreamResponse, streaming: bool = False) -> bytes:
        if response.status < 400:
            return b"" if streaming else await response.read()
        raise self._failure(response.status, response.headers, await response.read())

    def _failure(self, status: int, headers, content: bytes) -> APIError | TargetFailure:
        if status in AUTH_STATUS:
            return self._refused_credentials()
        error = _upstream_error(status, content)
        if status not in RETRYABLE_STATUS:
            return error  # the request's own fault: the client sees the provider's answer
        retry_after = _seconds(headers.get("retry-after"))
        return TargetFailure(error, retry_here=True, unhealthy=True, retry_after=retry_after)

    def _refused_credentials(self) -> TargetFailure:
        """The provider's 401/403 is the gateway's configuration at fault, not the client's: a 502 that moves on
        to the next target. The provider's message never reaches the client (it can quote a piece of the key)."""
        error = APIError(
            502, f"The provider rejected the gateway's credentials for target '{self.name}'.", type="server_error",
            code="upstream_auth_failed",
        )  # fmt: skip
        return TargetFailure(error, retry_here=False, unhealthy=True)

    def _unreachable(self, error: UpstreamUnavailable) -> TargetFailure:
        status = 504 if error.timed_out else 502
        # The provider's address goes to the log only: clients learn the target's name, not where it is.
        log.warning("target %s at %s: %s", self.name, self.base_url, error)
        api_error = APIError(status, f"target {self.name!r} {error}", type="server_error", code="upstream_unavailable")
        # Never sent to the same provider again once it may have reached it (POST is not idempotent); the next
        # target in the chain may still serve it.
        return TargetFailure(api_error, retry_here=not error.sent, unhealthy=True)

    def health(self) -> dict:
        return {"type": self.kind, "base_url": self.base_url, **self.breaker.health()}


def _upstream_error(status: int, content: bytes) -> APIError:
    """The provider's OpenAI-shaped error as ours, or a plain one when it sent something else."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        detail = json.loads(content)["error"]
        return APIError(
            status, str(detail.get("message") or "upstream error"), type=detail.get("type") or "server_error",
            param=detail.get("param"), code=detail.get("code"),
        )  # fmt: skip
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, f"upstream answered {status}", type=error_type)


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (HTTP dates are rare from APIs and read as absent)."""
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(value))
    return None
