"""What gateway replicas must agree on, behind one interface (`SharedState`): each API key's rate-limit window,
each target's consecutive failures and cooldown, and the stored Responses-API objects.

`LocalState` (local.py) keeps them in this process, each replica its own; `RedisState` (redis_state.py) keeps them in
Redis (LLM_REDIS_URL), shared by every replica that names the same server. The app factory picks one at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

WINDOW_S = 60  # rate limits are per minute


@dataclass(frozen=True)
class Refusal:
    """A key over its limit: which one (`requests` or `tokens`), and seconds until its oldest use leaves the window."""

    unit: str
    limit: int
    wait: float


@dataclass(frozen=True)
class Hold:
    """Tokens a request holds against its key's tokens per minute until it ends."""

    tokens: int
    id: str | None = None  # its entry in Redis; None for a hold in this process (or none at all)


NO_HOLD = Hold(0)


@dataclass(frozen=True)
class Cooling:
    """A target's consecutive failures and the seconds of cooldown it has left."""

    failures: int
    remaining: float
    started: bool = False  # the failure just counted started a cooldown


class Window(Protocol):
    """One key's requests and tokens in the last minute, and the tokens its requests in flight hold. A request is
    admitted while the key's requests, or its tokens charged plus held, are under the limit."""

    async def admit(self, tokens: int = 0) -> Hold | Refusal:
        """Count a request and hold `tokens` for it until it ends (none without a tokens per minute), in one step,
        unless the key is at a limit."""

    def settle(self, hold: Hold, used: int) -> None:
        """A request ended: it gives back what it held and is charged what it used. Nobody waits for it: shared
        state applies it in the background (`SharedState.settled`)."""


class Circuit(Protocol):
    """One target's consecutive failures and cooldown: `failures_to_cool` failures in a row cool it down for
    `cooldown` seconds, and one failure after a cooldown cools it again."""

    async def read(self) -> Cooling: ...

    async def failed(self) -> Cooling:
        """Count a failure."""

    async def succeeded(self) -> None:
        """Forget the failures and the cooldown."""


class Responses(Protocol):
    """Stored Responses-API objects (JSON text: the response and the input items it was made from), each readable
    by the key owner that stored it; bounded by count and age."""

    async def put(self, owner: str, response_id: str, response: str, input: str) -> None: ...

    async def get(self, owner: str, response_id: str) -> tuple[str, str] | None:
        """The response and its input, if `owner` stored it and it has not expired."""

    async def delete(self, owner: str, response_id: str) -> bool: ...


class SharedState(Protocol):
    def window(self, owner: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> Window:
        """The rate-limit window of the key whose owner hash is `owner` (never the key itself)."""

    def circuit(self, target: str, failures_to_cool: int, cooldown: float) -> Circuit: ...

    def responses(self, local: Responses, max_count: int, max_age_s: float) -> Responses:
        """Where stored responses live, given this process's own store."""

    async def start(self) -> None: ...

    async def settled(self) -> None:
        """Once the settles under way have been applied."""

    async def close(self) -> None:
        """Applies the settles under way, then lets go."""
