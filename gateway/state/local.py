"""State in this process: each replica counts its own limits and cooldowns (and keeps its own stored responses)."""

from __future__ import annotations

import collections
import time

from gateway.state.shared import NO_HOLD, WINDOW_S, Circuit, Cooling, Hold, Refusal, Responses, Window


class LocalWindow:
    """Exact sliding windows over the last minute. Concurrent requests overshoot the tokens per minute by at most
    one request's maximum, as consecutive ones do."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._requests: collections.deque[float] = collections.deque()
        self._tokens: collections.deque[tuple[float, int]] = collections.deque()
        self._charged = 0  # the sum of _tokens
        self._held = 0  # the maxima of the requests in flight

    async def admit(self, tokens: int = 0) -> Hold | Refusal:
        now = time.monotonic()
        self._forget(now)
        if self.rpm is not None and len(self._requests) >= self.rpm:
            return Refusal("requests", self.rpm, self._requests[0] + WINDOW_S - now)
        if refusal := self._over_tokens(now):
            return refusal
        if self.rpm is not None:
            self._requests.append(now)
        if self.tpm is None:
            return NO_HOLD
        self._held += tokens
        return Hold(tokens)

    def settle(self, hold: Hold, used: int) -> None:
        self._held -= hold.tokens
        if self.tpm is not None and used:
            self._tokens.append((time.monotonic(), used))
            self._charged += used

    def _over_tokens(self, now: float) -> Refusal | None:
        if self.tpm is None or self._charged + self._held < self.tpm:
            return None
        # Requests in flight may end any moment, using less than they hold.
        return Refusal("tokens", self.tpm, self._tokens[0][0] + WINDOW_S - now if self._tokens else 1)

    def _forget(self, now: float) -> None:
        while self._requests and self._requests[0] <= now - WINDOW_S:
            self._requests.popleft()
        while self._tokens and self._tokens[0][0] <= now - WINDOW_S:
            self._charged -= self._tokens.popleft()[1]


class Unlimited:
    """Admits every request (limits fail open: LLM_REDIS_FAIL_OPEN while Redis is unreachable)."""

    async def admit(self, tokens: int = 0) -> Hold:
        return NO_HOLD

    def settle(self, hold: Hold, used: int) -> None:
        return None


class LocalCircuit:
    def __init__(self, failures_to_cool: int, cooldown: float):
        self.failures_to_cool, self.cooldown = failures_to_cool, cooldown
        self.failures = 0
        self.cool_until = 0.0

    async def read(self) -> Cooling:
        return Cooling(self.failures, max(0.0, self.cool_until - time.monotonic()))

    async def failed(self) -> Cooling:
        self.failures += 1
        if self.failures < self.failures_to_cool:
            return await self.read()
        self.cool_until = time.monotonic() + self.cooldown
        return Cooling(self.failures, self.cooldown, started=True)

    async def succeeded(self) -> None:
        self.failures = 0
        self.cool_until = 0.0


class LocalState:
    """Every replica on its own: N replicas admit up to N times a key's limits and each learns alone that a
    target is down. Stored responses stay in this replica's SQLite file."""

    def window(self, owner: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> Window:
        return LocalWindow(requests_per_minute, tokens_per_minute)

    def circuit(self, target: str, failures_to_cool: int, cooldown: float) -> Circuit:
        return LocalCircuit(failures_to_cool, cooldown)

    def responses(self, local: Responses, max_count: int, max_age_s: float) -> Responses:
        return local

    async def start(self) -> None:
        return None

    async def settled(self) -> None:
        return None  # each settle is applied at once

    async def close(self) -> None:
        return None
