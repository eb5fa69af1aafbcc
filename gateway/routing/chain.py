"""One request through its model's chain of targets: retries, cooldowns, fallback, deadline, relay.

Each target gets up to `retry.attempts` tries for transient failures (exponential backoff with full
jitter, or the provider's Retry-After); when it is out of tries, or cooling down, the next target in
the chain is tried. Nothing has reached the client until a target produced its first output, so a
fallback is invisible; a failure after that ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.types import Receive
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from gateway.core.request import ModelRequest
from gateway.core.streams import CLIENT_CLOSED_REQUEST, sse_response, until_disconnected
from gateway.errors import APIError, invalid_param
from gateway.routing.config import OpenAITargetConfig, RetryPolicy
from gateway.routing.continuation import finishing
from gateway.routing.router import Route, Target
from gateway.routing.targets import CapabilityMismatch, LocalTarget, Outcome, RemoteTarget, TargetFailure
from gateway.routing.window import PromptTooLong, too_long
from gateway.telemetry import metrics
from gateway.telemetry.requests import RequestRecord, current_request

log = logging.getLogger(__name__)
TARGET_HEADER = "x-llm-target"
TIMEOUT_HEADER = "x-request-timeout"
T = TypeVar("T")


class FrontEnd(Protocol):
    """A protocol served through the internal one (Chat Completions, `ChatCompletionRequest`): its requests
    translated down before routing, the chain's answers translated back."""

    async def internal(self, body: ModelRequest) -> ModelRequest:
        """The internal request for `body` (made with `translated`, so it keeps `body` as its origin)."""

    def answer(self, body: ModelRequest, outcome: Outcome, events: AsyncIterator[str] | None,
               headers: dict[str, str]) -> Response:  # fmt: skip
        """The client's response: `outcome.body`, or `events` (the outcome's, under the deadline), in the format
        of `outcome.endpoint`, rendered in this protocol's."""


async def dispatch(request: Request, request_type: type[ModelRequest], front: FrontEnd | None = None) -> Response:
    """Read a request of `request_type` and serve it from the first target of its model's chain that can; through
    `front`'s translations for a protocol other than the internal one."""
    state = request.app.state
    record = current_request()
    # One timer for the whole request, from its start: the x-request-timeout header (or the default)
    # while the body arrives, then the body's own `timeout` if it has one.
    started = asyncio.get_running_loop().time()
    seconds = request_timeout(request.headers.get(TIMEOUT_HEADER), state.settings)
    alarm = Alarm(started + seconds)
    try:
        body = await _read_body(request, request_type, alarm)
        if body.timeout is not None:
            seconds = request_timeout(body.timeout, state.settings)
            alarm.reset(started + seconds)
        deadline = Deadline(started + seconds, seconds)
        served = body if front is None else await front.internal(body)
        route = state.router.resolve(served.model)
        record.model = served.model  # once known: metrics take no label values from unknown names
        if record.limits is not None:  # counted and its maximum held in one step (429 at a limit); settled as it ends
            record.reserved = await record.limits.admit(served.most_tokens(state.settings.ctx))
        chain = _Chain(route, served.endpoint, served, deadline.at, state.retry, record)
        outcome = await until_disconnected(request, _within(alarm, deadline, chain.serve(), record))
    finally:
        alarm.disarm()
    if isinstance(outcome, Response):
        return outcome  # the client left; the work is cancelled
    headers = {TARGET_HEADER: outcome.target}
    events = None if outcome.events is None else _relay(outcome, deadline)
    if front is not None:
        return front.answer(body, outcome, events, headers)
    if events is not None:
        return sse_response(events, headers)
    return Response(outcome.body, media_type="application/json", headers=headers)


async def _read_body(request: Request, request_type: type[ModelRequest], alarm: Alarm) -> ModelRequest:
    """The validated body; 408 when the client is too slow to send it. (Parsed here rather than by FastAPI,
    whose body handling is costly: docs/design/own-body-lane.md.)"""
    try:
        return request_type.parse(await alarm.wait(_receive_body(request.receive)))
    except TimeoutError:
        raise APIError(408, "The request body did not arrive in time.", type="timeout_error", code="timeout") from None


async def _receive_body(receive: Receive) -> bytes:
    """The request's body, from its ASGI messages, at most LLM_MAX_BODY_BYTES long (`BodyGuard` has checked its
    declared length, or counts what arrives). (Starlette's `Request.body` is much slower.)"""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # nobody reads the answer; the status is for the log and metrics
            raise APIError(CLIENT_CLOSED_REQUEST, "The client closed the connection.", code="client_closed")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def request_timeout(value: float | str | None, settings) -> float:
    """Seconds as asked (the body's `timeout` or the x-request-timeout header), else the default; capped at
    the maximum; 400 unless a positive number."""
    if value is None:
        return settings.request_timeout
    try:
        seconds = float(value)
        if not seconds > 0:
            raise ValueError(value)
    except ValueError:
        raise invalid_param("timeout", f"The timeout must be a positive number of seconds, got {value!r}.") from None
    return min(seconds, settings.max_request_timeout)


@dataclass(frozen=True)
class Deadline:
    at: float  # on the event loop's clock
    seconds: float

    def expired(self, target: str) -> APIError:
        """The 504, naming the target that was being tried when time ran out."""
        return APIError(
            504, f"The request timed out after {self.seconds:g}s.", type="timeout_error", code="timeout",
            headers={TARGET_HEADER: target},
        )  # fmt: skip


async def _within(alarm: Alarm, deadline: Deadline, work: Awaitable[Outcome], record: RequestRecord) -> Outcome:
    try:
        return await alarm.wait(work)
    except TimeoutError:
        raise deadline.expired(record.target) from None


async def _relay(outcome: Outcome, deadline: Deadline) -> AsyncIterator[str]:
    """Pass events on as they come, until the deadline."""
    alarm = Alarm(deadline.at)
    try:
        async with contextlib.aclosing(outcome.events) as events:
            while True:
                try:
                    event = await alarm.wait(anext(events))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise deadline.expired(outcome.target) from None
                yield event
    finally:
        alarm.disarm()


class Alarm:
    """One loop timer that cuts short only the waits run through `wait`: for a whole request, or a whole
    stream. (asyncio.timeout around each wait armed and cancelled a timer each time, per token in a stream.)"""

    def __init__(self, at: float):
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_at(at, self._ring)
        self._rang = False
        self._waiting: asyncio.Task | None = None  # the task inside `wait`, if any

    def reset(self, at: float) -> None:
        self._timer.cancel()
        self._timer = self._loop.call_at(at, self._ring)

    def _ring(self) -> None:
        self._rang = True
        if self._waiting is not None:
            self._waiting.cancel()

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """What `awaitable` gives, or TimeoutError once the alarm rings (at once if it has rung already)."""
        if self._rang:
            raise TimeoutError
        # Given the loop, Python 3.11 skips the getpid() system call it makes to look the running loop up.
        self._waiting = task = asyncio.current_task(self._loop)
        try:
            return await awaitable
        except asyncio.CancelledError:
            # Having rung, the alarm cancelled this task: only `wait` waits, and it starts no wait once rung.
            if self._rang and task.uncancel() == 0:
                raise TimeoutError from None
            raise  # cancelled by someone else too (a disconnect, a shutdown)
        finally:
            self._waiting = None

    def disarm(self) -> None:
        self._timer.cancel()


class _Chain:
    def __init__(self, route: Route, endpoint: str, body: ModelRequest, deadline: float, policy: RetryPolicy,
                 record: RequestRecord, first_token_at: float | None = None):  # fmt: skip
        self.route, self.endpoint, self.body, self.deadline = route, endpoint, body, deadline
        self.policy, self.record = policy, record
        self.first_token_at = first_token_at  # set where the chain finishes a stream that had its first token
        self.loop = asyncio.get_running_loop()

    async def serve(self, after: Target | None = None) -> Outcome:
        """The first answer of the chain's targets (`after` is the one that failed before them, if any)."""
        last: TargetFailure | None = None
        tried = after
        for position, target in enumerate(self.route.targets):
            if await target.breaker.check():
                log.info("skipping target %s: cooling down", target.name)
                continue
            if tried is not None:
                metrics.record_fallback(self.route.name, tried.name, target.name)
            tried = target
            try:
                return self._finishing(await self._with_retries(target), target, self.route.targets[position + 1 :])
            except TargetFailure as failure:
                log.warning("target %s failed (%s): %s", target.name, failure.status_code, failure.message)
                if last is None or _tells(failure) >= max(_tells(last), 1):
                    last = _tagged(failure, target)
        raise self._exhausted(last)

    async def _with_retries(self, target: Target) -> Outcome:
        # Most requests succeed at once: only a retryable failure pays for tenacity's set-up.
        try:
            return await self._attempt(target)
        except TargetFailure as failure:
            if not failure.retry_here:
                raise
            seen = [failure]

        async def attempt() -> Outcome:
            if seen:  # tenacity's first attempt is the one that just failed: it backs off from there
                raise seen.pop()
            return await self._attempt(target)

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda error: isinstance(error, TargetFailure) and error.retry_here),
            wait=self._wait,
            stop=lambda state: self._give_up(target, state),
            before_sleep=lambda state: metrics.record_retry(target.name),
            reraise=True,
        )
        return await retrying(attempt)

    async def _attempt(self, target: Target) -> Outcome:
        # Logs and metrics name the target that answered, or failed last.
        self.record.attempt(target.name, remote=isinstance(target, RemoteTarget))
        self.record.first_token_at = self.first_token_at
        try:
            outcome = await target.serve(self.endpoint, self.body, self.deadline - self.loop.time())
        except TargetFailure as failure:
            self.record.usage_pending = False  # it answered with an error, or not at all: nothing to bill
            if failure.unhealthy and await target.breaker.failed():
                metrics.record_cooldown(target.name)
            raise
        except APIError as error:  # the request's own fault: no other target would do better
            self.record.usage_pending = False
            if too_long(error):  # but one with a larger context window may hold it
                raise PromptTooLong(error) from None
            raise _tagged(error, target) from None
        await target.breaker.succeeded()
        return outcome

    def _finishing(self, outcome: Outcome, target: Target, rest: list[Target]) -> Outcome:
        """With the model's `continue_on_failure`, a chat stream that breaks after output is finished by the rest of
        the chain's targets that can continue an answer (gateway/routing/continuation.py)."""
        if not self.route.continue_on_failure or outcome.events is None or outcome.endpoint != "chat/completions":
            return outcome
        continuing = [t for t in rest if _continues(t)]
        if not continuing:
            return outcome
        route = replace(self.route, targets=continuing)

        async def finish(body: ModelRequest) -> Outcome:
            chain = _Chain(route, self.endpoint, body, self.deadline, self.policy, self.record,
                           self.record.first_token_at)  # fmt: skip
            return await chain.serve(after=target)

        outcome.events = finishing(outcome.events, self.body, finish, self.record)
        return outcome

    def _wait(self, state: RetryCallState) -> float:
        retry_after = getattr(state.outcome.exception(), "retry_after", None)
        if retry_after is not None:
            return retry_after
        backoff = wait_random_exponential(multiplier=self.policy.backoff_initial, max=self.policy.backoff_max)
        return backoff(state)

    def _give_up(self, target: Target, state: RetryCallState) -> bool:
        upcoming = state.upcoming_sleep
        return (
            state.attempt_number >= self.policy.attempts
            or target.breaker.remaining() > 0
            or upcoming > self.policy.max_retry_after
            or self.loop.time() + upcoming >= self.deadline
        )

    def _exhausted(self, last: TargetFailure | None) -> APIError:
        """The final answer when no target could serve; clients should not retry it blindly."""
        if last is None:
            wait = min(t.breaker.remaining() for t in self.route.targets)
            last = APIError(
                503, f"Every target of model '{self.route.name}' is cooling down after failures.",
                type="server_error", code="targets_unavailable", headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )  # fmt: skip
        last.headers = {**(last.headers or {}), "x-should-retry": "false"}
        return last


def _tells(failure: TargetFailure) -> int:
    """How much a failure tells as the final answer: a real failure most, a prompt too long for a target's window
    more than another "cannot do that". Of two that tell alike the later is kept (further down a chain, a larger
    window), but of two "cannot do that" the first."""
    if isinstance(failure, PromptTooLong):
        return 1
    return 0 if isinstance(failure, CapabilityMismatch) else 2


def _continues(target: Target) -> bool:
    """Whether a target can go on from an answer's text: a local engine, or a provider configured as taking vLLM's
    `continue_final_message`."""
    if isinstance(target, LocalTarget):
        return True
    return isinstance(target.config, OpenAITargetConfig) and target.config.continue_final_message


def _tagged(error: APIError, target: Target) -> APIError:
    error.headers = {**(error.headers or {}), TARGET_HEADER: target.name}
    return error
