"""Targets: where a request can be served. A local in-process engine, or a remote API: OpenAI-compatible, or
Anthropic's Messages API.

All answer `serve(endpoint, body)` with an `Outcome`: a whole JSON body, or a stream of SSE `data`
payloads whose first output has already arrived (so a failure before it can still fall back). A failure
worth trying elsewhere is a `TargetFailure`; anything else (a 400 caused by the request) is final.

A remote target that speaks the protocol a client's request came in (`body.origin`: Messages for Anthropic,
Responses for an OpenAI target with `responses_api`) is sent that request as the client sent it, and its answer
comes back as the provider sent it (`Outcome.endpoint` says so). Otherwise it gets the internal chat request, in
its own protocol: as it is (OpenAI), or through a `ProviderAdapter` (Anthropic).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Protocol

from pydantic import BaseModel
from pydantic_core import to_json

from engines.base import Engine, EngineError, EngineOverloaded
from gateway.core.request import ModelRequest
from gateway.core.streams import primed
from gateway.errors import APIError, from_engine_error, invalid_param
from gateway.models.lifecycle import ManagedModel
from gateway.routing.breaker import Breaker
from gateway.routing.config import AnthropicTargetConfig, OpenAITargetConfig, RemoteTargetConfig
from gateway.routing.pool import Endpoint, Pool
from gateway.telemetry.requests import current_request
from gateway.telemetry.usage import END_EVENTS, StreamTally, record_body_usage
from gateway.upstream.client import HttpClient, UpstreamResponse, UpstreamUnavailable

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}  # 529: Anthropic's "overloaded"
AUTH_STATUS = {401, 403}  # the provider refuses the gateway's own key
# A stream's error event names its kind, not a status: Anthropic's kinds, as its HTTP answers would carry them.
STREAM_ERROR_STATUS = {"invalid_request_error": 400, "request_too_large": 413, "rate_limit_error": 429,
                       "api_error": 500, "overloaded_error": 529}  # fmt: skip
NOT_COUNTED = contextlib.nullcontext()  # a try at a target of one base_url: no pool counts it


@dataclass
class Outcome:
    target: str
    # The endpoint whose wire format body and events are in: the internal request's, or the origin's where a
    # provider that speaks the client's protocol was sent the client's request as it is.
    endpoint: str
    body: bytes | None = None
    events: AsyncIterator[str] | None = None


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
    """The target cannot do what the request asks (images for a local model, logprobs for Anthropic). No fault of
    the target: the chain moves on without counting it, and the client hears of it only if no target can serve."""

    def __init__(self, error: APIError):
        super().__init__(error, retry_here=False, unhealthy=False)

    @classmethod
    def local(cls, param: str, target: str) -> CapabilityMismatch:
        return cls(invalid_param(
            param, f"The parameter '{param}' is not supported by target '{target}' (a local model); route "
            "this model to a provider that supports it.", "unsupported_parameter",
        ))  # fmt: skip


# How a local model answers one endpoint (the api modules' `serve_locally`); the app factory wires them by endpoint.
LocalHandler = Callable[[Engine, ModelRequest], Awaitable[BaseModel | AsyncIterator[str]]]


class LocalTarget:
    kind = "local"

    def __init__(self, name: str, model: ManagedModel, handlers: Mapping[str, LocalHandler], breaker: Breaker):
        self.name, self.model, self.handlers, self.breaker = name, model, handlers, breaker

    async def serve(self, endpoint: str, body: ModelRequest, remaining: float) -> Outcome:
        if (param := body.unsupported_locally()) is not None:
            raise CapabilityMismatch.local(param, self.name)
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


class ProviderAdapter(Protocol):
    """The internal chat request in a provider's own protocol, and its answers back as chat (for `type: anthropic`,
    the Messages front end's; the app factory wires it in, as this layer imports no front end)."""

    endpoint: str  # where the provider takes the request, under its /v1/

    def request(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The provider's request for a chat request's fields; an APIError (400) naming a field it cannot carry."""

    def response(self, content: bytes) -> bytes:
        """A chat completion's JSON for the provider's whole answer."""

    def events(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Chat chunks (JSON strings) for the provider's stream events (its `data` payloads)."""


@dataclass(frozen=True)
class _Exchange:
    """What one request to a provider is: where it goes, what is sent, and how the answer reads."""

    endpoint: str  # where it goes, under the target's base URL
    payload: dict[str, Any]
    answers: str  # the endpoint whose format the outcome is in
    adapter: ProviderAdapter | None = None  # reads the answer back into that format


class RemoteTarget:
    """An OpenAI-compatible API: the internal request goes to it as it is."""

    kind = "openai"
    # Headers every request to this kind of provider carries (the config's own win).
    default_headers: Mapping[str, str] = {}
    # The internal requests' endpoints it serves (a request of another protocol may still go to it natively);
    # `rerank` at the base URL's /rerank, as vLLM, llama-server, Jina and Cohere serve it.
    endpoints = frozenset({"chat/completions", "completions", "embeddings", "rerank"})

    def __init__(self, name: str, config: RemoteTargetConfig, client: HttpClient, breaker: Breaker):
        self.name, self.config, self.client, self.breaker = name, config, client, breaker
        self.base_url = None if config.base_url is None else self._root(config.base_url)
        key = config.api_key()  # read once at start-up: a missing variable stops it there
        auth = self._auth(key) if key else {}
        # The body goes out encoded (bytes), so its type is ours to name, unless the config names one itself.
        own_type = any(name.lower() == "content-type" for name in config.headers)
        json_type = {} if own_type else {"Content-Type": "application/json"}
        self.headers = {**json_type, **self.default_headers, **config.headers, **auth}
        self.pool = None if config.endpoints is None else Pool(
            name, [Endpoint(i, self._root(e.url), e.weight) for i, e in enumerate(config.endpoints)], config.balance,
            config.pool, self.headers,
        )  # fmt: skip
        # The client protocols it takes as they are: their requests go to it natively.
        self.native = {"responses"} if isinstance(config, OpenAITargetConfig) and config.responses_api else set()

    @staticmethod
    def _auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @staticmethod
    def _root(url: str) -> str:
        """Where the provider's endpoints are, for a configured URL."""
        return url.rstrip("/")

    async def serve(self, endpoint: str, body: ModelRequest, remaining: float) -> Outcome:
        exchange = self._exchange(endpoint, body)
        exchange.payload["model"] = self.config.model
        # Another gateway (or any server that reads it) stops at the same deadline as this one.
        headers = {**self.headers, "x-request-timeout": f"{remaining:.3f}"}
        if self.pool is None:
            return await self._send(self.base_url, exchange, headers, body)
        return await self._pooled(exchange, headers, body)

    async def _pooled(self, exchange: _Exchange, headers: dict[str, str], body: ModelRequest) -> Outcome:
        """A try on the endpoint of the pool its balance picks; after a failure worth retrying (the request did not
        reach it, or it answered a retryable status), on another at once, while one is left."""
        key = self.pool.affinity_key(exchange.endpoint, exchange.payload)
        tried: list[Endpoint] = []
        last: TargetFailure | None = None
        while (server := self.pool.pick(key, tried)) is not None:
            tried.append(server)
            try:
                return await self._send(server.url, exchange, headers, body, server)
            except TargetFailure as failure:
                if not failure.retry_here:
                    raise
                last = failure
        raise last or self._no_endpoint()

    async def _send(self, base_url: str, exchange: _Exchange, headers: dict[str, str], body: ModelRequest,
                    server: Endpoint | None = None) -> Outcome:  # fmt: skip
        """One try at `base_url`: a pool's `server`, counted in its pool until the answer or the stream ends."""
        url = f"{base_url}/{exchange.endpoint}"
        # pydantic-core's JSON encoder and decoder (tally.py) take a fifth to a third of the json module's time
        data = to_json(exchange.payload)
        if exchange.payload.get("stream"):
            tally = StreamTally(current_request(), client_wants_usage=body.wants_usage())
            events = self._events(url, data, headers, tally, exchange.adapter)
            if server is not None:  # inside `primed`, which starts it: it counts the stream until it is closed
                events = self._counted_events(server, events)
            return Outcome(self.name, exchange.answers, events=await primed(events))
        with NOT_COUNTED if server is None else self._counted(server):
            try:
                async with self._post(url, data, headers) as response:
                    content = await self._read_ok(response)
            except UpstreamUnavailable as error:
                raise self._unreachable(error, url) from error
        record_body_usage(current_request(), content)
        if exchange.adapter is not None:
            content = exchange.adapter.response(content)
        return Outcome(self.name, exchange.answers, body=content)

    @contextlib.contextmanager
    def _counted(self, server: Endpoint) -> Iterator[None]:
        """A request in flight to a pool endpoint, and whether it failed there."""
        self.pool.start(server)
        failed = False
        try:
            yield
        except BaseException as error:
            failed = _endpoint_fault(error)
            raise
        finally:
            self.pool.finish(server, failed)

    async def _counted_events(self, server: Endpoint, events: AsyncIterator[str]) -> AsyncIterator[str]:
        with self._counted(server):
            async with contextlib.aclosing(events):
                async for data in events:
                    yield data

    def _no_endpoint(self) -> TargetFailure:
        error = APIError(
            503, f"No endpoint of target '{self.name}' is available: each is ejected after failures or failing its "
            "health check.", type="server_error", code="endpoints_unavailable",
        )  # fmt: skip
        return TargetFailure(error, retry_here=False, unhealthy=True)

    def _exchange(self, endpoint: str, body: ModelRequest) -> _Exchange:
        """The client's own request where this provider speaks its protocol, else the internal one."""
        origin = body.origin
        if origin is not None and origin.endpoint in self.native:
            return _Exchange(origin.endpoint, origin.as_sent(), origin.endpoint)
        if endpoint not in self.endpoints:
            raise CapabilityMismatch(APIError(
                400, f"Target '{self.name}' ({self.kind} API) does not serve /v1/{endpoint}; route this model to a "
                "target that does.", code="unsupported_endpoint",
            ))  # fmt: skip
        return self._translated(endpoint, body)

    def _translated(self, endpoint: str, body: ModelRequest) -> _Exchange:
        payload = body.as_sent()
        if payload.get("stream"):  # usage comes in a last chunk, which the tally hides unless the client asked
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        return _Exchange(endpoint, payload, endpoint)

    def _post(self, url: str, body: bytes, headers: dict[str, str]):
        return self.client.post(url, body, headers, self.config.connect_timeout, self.config.read_timeout)

    async def _events(self, url: str, body: bytes, headers: dict[str, str], tally: StreamTally,
                      adapter: ProviderAdapter | None) -> AsyncIterator[str]:  # fmt: skip
        """The provider's events (through `adapter`, if any) relayed as they arrive. Those before the first output
        are held back: until it, an error or an early end leaves the next target in the chain to answer."""
        try:
            async with self._post(url, body, headers) as response:
                await self._read_ok(response, streaming=True)
                payloads = self._payloads(response, tally)
                adapted = payloads if adapter is None else adapter.events(payloads)
                async with contextlib.aclosing(payloads), contextlib.aclosing(adapted):
                    held = []
                    async for data in adapted:
                        if tally.passes(data):
                            held.append(data)
                            if tally.deltas:
                                break
                    if tally.deltas or tally.finished:  # else the stream was cut before any output
                        for data in held:
                            yield data
                        async for data in adapted:
                            if tally.passes(data):
                                yield data
        except UpstreamUnavailable as error:
            raise self._unreachable(error, url) from error
        finally:
            tally.settle()
        if not tally.finished:
            error = APIError(502, f"target {self.name!r} closed the stream before it finished", type="server_error")
            # Before its first output nothing has reached the client: the next target in the chain may still answer.
            raise error if tally.deltas else TargetFailure(error, retry_here=False, unhealthy=True)

    async def _payloads(self, response: UpstreamResponse, tally: StreamTally) -> AsyncIterator[str]:
        """The provider's SSE `data` payloads as they arrive, up to its stream's end: OpenAI's `[DONE]` (left out),
        or the Messages and Responses streams' last event. An error event raises."""
        event = ""
        async for line in response.lines():
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue  # comments (pings), blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                tally.finished = True
                return
            if event == "error" or data.startswith('{"error"'):
                raise self._stream_failure(response.headers, data)
            yield data
            if event in END_EVENTS:
                tally.finished = True
                return

    def _stream_failure(self, headers, data: str) -> APIError | TargetFailure:
        """An error event: treated as the HTTP answer its kind stands for (a server error when it names none)."""
        kind = None
        with contextlib.suppress(ValueError):
            kind = (_error_detail(json.loads(data)) or {}).get("type")
        return self._failure(STREAM_ERROR_STATUS.get(kind, 500), headers, data.encode())

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

    def _unreachable(self, error: UpstreamUnavailable, url: str) -> TargetFailure:
        status = 504 if error.timed_out else 502
        # The provider's address goes to the log only: clients learn the target's name, not where it is.
        log.warning("target %s at %s: %s", self.name, url, error)
        api_error = APIError(status, f"target {self.name!r} {error}", type="server_error", code="upstream_unavailable")
        # Never sent to the same provider again once it may have reached it (POST is not idempotent); the next
        # target in the chain may still serve it.
        return TargetFailure(api_error, retry_here=not error.sent, unhealthy=True)

    def health(self) -> dict:
        where = {"base_url": self.base_url} if self.pool is None else {"endpoints": self.pool.health()}
        return {"type": self.kind, **where, **self.breaker.health()}


class AnthropicTarget(RemoteTarget):
    """Anthropic's Messages API: a Messages request goes to it natively, the internal chat request through the
    Messages front end's adapter."""

    kind = "anthropic"
    default_headers = {"anthropic-version": "2023-06-01"}
    endpoints = frozenset({"chat/completions"})

    def __init__(self, name: str, config: AnthropicTargetConfig, client: HttpClient, breaker: Breaker,
                 adapter: ProviderAdapter):  # fmt: skip
        super().__init__(name, config, client, breaker)
        self.adapter = adapter
        self.native = {"messages", "messages/count_tokens"}

    @staticmethod
    def _auth(key: str) -> dict[str, str]:
        return {"x-api-key": key}

    @staticmethod
    def _root(url: str) -> str:
        return url.rstrip("/").removesuffix("/v1") + "/v1"  # the API's root, written with /v1 or without

    def _translated(self, endpoint: str, body: ModelRequest) -> _Exchange:
        try:
            payload = self.adapter.request(body.as_sent())
        except APIError as error:  # a field Messages cannot carry: another target of the chain may
            if error.status_code >= 500:
                raise
            raise CapabilityMismatch(error) from None
        return _Exchange(self.adapter.endpoint, payload, endpoint, self.adapter)


def _endpoint_fault(error: BaseException) -> bool:
    """Whether a failed try counts against the pool endpoint it went to: unreachable, a 5xx or 429, a cut stream;
    not the request's own fault (a 400), nor a cancellation."""
    if isinstance(error, TargetFailure):
        return error.unhealthy
    return isinstance(error, APIError) and error.status_code >= 500


def _error_detail(body: Any) -> dict | None:
    """A provider's error object: under `error` for OpenAI and Anthropic; a Responses stream's error event itself."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("error"), dict):
        return body["error"]
    return body if body.get("type") == "error" else None


def _upstream_error(status: int, content: bytes) -> APIError:
    """The provider's error as ours, or a plain one when it sent something else."""
    detail = None
    with contextlib.suppress(ValueError):
        detail = _error_detail(json.loads(content))
    if detail:
        return APIError(
            status, str(detail.get("message") or "upstream error"), type=str(detail.get("type") or "server_error"),
            param=detail.get("param"), code=detail.get("code"),
        )  # fmt: skip
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, f"upstream answered {status}", type=error_type)


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (HTTP dates are rare from APIs and read as absent)."""
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(value))
    return None
