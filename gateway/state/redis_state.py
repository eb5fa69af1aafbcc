"""Shared state in Redis (LLM_REDIS_URL): every replica that names the same server counts one window per key, sees
one cooldown per target and reads every stored response.

Each update is one Lua script (scripts.py), atomic in Redis: a request's admission (its count and its tokens' hold)
is one call before its first byte, and its settle another after its last, which nobody waits for. Every call has a
short timeout (LLM_REDIS_TIMEOUT).
When one fails, Redis counts as unreachable until a probe (every PROBE_EVERY seconds) finds it again: a warning is
logged once, `llm_shared_state_up` is 0, and each operation is served by this replica's local state meanwhile
(counted in `llm_shared_state_fallbacks_total`): cooldowns and stored responses always, limits unless
LLM_REDIS_FAIL_OPEN. What was kept locally during an outage stays local: a hold is settled where it was made, and a
response stored in this replica is still found here.

Redis keys never hold an API key: a key is named by its owner hash (front/keys.py). They are `llm:limits:<owner>:*`,
`llm:circuit:<target>`, `llm:response:<owner>:<id>` and the index `llm:responses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Awaitable, Callable, Coroutine
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.state import scripts
from gateway.state.local import LocalCircuit, LocalWindow, Unlimited
from gateway.state.shared import NO_HOLD, WINDOW_S, Circuit, Cooling, Hold, Refusal, Responses, Window
from gateway.telemetry import metrics

log = logging.getLogger(__name__)
PROBE_EVERY = 1.0  # seconds between attempts to reach Redis again during an outage
# Connections to Redis per replica; a call finding them all busy waits for one (within the call's timeout), since a
# busy pool is no outage. One command at a time per connection: 32 keep ~300k calls/s in flight at 100 us each.
MAX_CONNECTIONS = 32
RESPONSE_INDEX = "llm:responses"
UNITS = {1: "requests", 2: "tokens"}  # the scripts' refusals
SCRIPTS = ("ADMIT", "SETTLE", "CIRCUIT_READ", "CIRCUIT_FAILED", "RESPONSE_PUT", "RESPONSE_DELETE")


class RedisLink:
    """The client, and whether Redis answers. A call that fails or times out makes it unreachable until a probe
    answers: meanwhile no call waits on it."""

    def __init__(self, url: str, timeout: float):
        # No retries: a call that fails is served locally at once; the probe finds Redis again.
        pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=timeout,
                                               socket_timeout=timeout, socket_connect_timeout=timeout,
                                               retry=Retry(NoBackoff(), 0))  # fmt: skip
        self.client = Redis(connection_pool=pool)
        self.where = _where(url)
        self.up = True
        self._probe: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # updates nobody waits for (settles), until they end
        self.scripts = {name: self.client.register_script(getattr(scripts, name)) for name in SCRIPTS}

    async def script(self, state: str, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self.run(state, self.scripts[name], keys, args)

    async def run(self, state: str, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """What `call(*args)` answers (never None: the scripts answer a value); None when Redis is unreachable, and
        local state serves `state` (limits, cooldowns or responses)."""
        if self.up:
            try:
                return await call(*args)
            except (RedisError, OSError) as error:  # OSError: refused connections and timeouts
                self._lost(error)
        metrics.record_shared_state_fallback(state)
        return None

    def later(self, state: str, update: Coroutine[Any, Any, None]) -> None:
        """Runs `update` of `state` in the background; `settled` awaits it. What it raises is logged, never raised:
        nobody waits for it (Redis's own failures it has served locally, and counted, already)."""
        task = asyncio.create_task(update)
        self._background.add(task)
        task.add_done_callback(lambda ended: self._ended(state, ended))

    def _ended(self, state: str, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("a background update of the %s in Redis failed", state, exc_info=error)

    async def settled(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def start(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as error:
            self._lost(error)
            return
        metrics.set_shared_state_up(True)
        log.info("shared state in Redis at %s", self.where)

    def _lost(self, error: Exception) -> None:
        if not self.up:
            return
        self.up = False
        metrics.set_shared_state_up(False)
        log.warning("Redis at %s is unreachable (%s: %s): limits, cooldowns and stored responses are kept in this "
                    "replica until it answers again", self.where, type(error).__name__, error)  # fmt: skip
        self._probe = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY)
            with contextlib.suppress(RedisError, OSError):
                await self.client.ping()
                break
        self.up = True
        metrics.set_shared_state_up(True)
        log.warning("Redis at %s answers again: limits, cooldowns and stored responses are shared again", self.where)

    async def close(self) -> None:
        await self.settled()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()


def _where(url: str) -> str:
    """The server a URL names, for logs: never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path


class RedisWindow:
    """A key's windows in Redis; during an outage its `fallback` (this replica's own count, or no limit)."""

    def __init__(self, link: RedisLink, owner: str, rpm: int | None, tpm: int | None, fallback: Window,
                 lease_ms: int):  # fmt: skip
        self.link, self.rpm, self.tpm, self.fallback, self.lease_ms = link, rpm, tpm, fallback, lease_ms
        self.requests, self.tokens, self.holds = (f"llm:limits:{owner}:{part}" for part in ("r", "t", "h"))

    async def admit(self, tokens: int = 0) -> Hold | Refusal:
        if self.rpm is None and self.tpm is None:
            return NO_HOLD
        hold = Hold(tokens, f"{os.urandom(8).hex()}:{tokens}") if self.tpm is not None and tokens else NO_HOLD
        keys = [self.requests, self.tokens, self.holds]
        args = [WINDOW_S * 1000, self.rpm or 0, self.tpm or 0, hold.id or "", self.lease_ms]
        answer = await self.link.script("limits", "ADMIT", keys, args)
        if answer is None:
            return await self.fallback.admit(tokens)
        return self._refusal(answer) or hold

    def settle(self, hold: Hold, used: int) -> None:
        # Until it lands, the key's next requests (on any replica) still see the hold: the request's maximum, at
        # least what it used, so limits err on the side of refusing.
        if hold.id is None:  # held in this replica (or nothing held)
            return self.fallback.settle(hold, used)
        self.link.later("limits", self._settle(hold, used))

    async def _settle(self, hold: Hold, used: int) -> None:
        args = [WINDOW_S * 1000, hold.id, used]
        if await self.link.script("limits", "SETTLE", [self.tokens, self.holds], args) is None:
            self.fallback.settle(NO_HOLD, used)  # charged here; its hold in Redis ends with its lease

    def _refusal(self, answer: list[int]) -> Refusal | None:
        unit = UNITS.get(answer[0])
        if unit is None:
            return None
        return Refusal(unit, self.rpm if unit == "requests" else self.tpm, answer[1] / 1000)


class RedisCircuit:
    def __init__(self, link: RedisLink, target: str, failures_to_cool: int, cooldown: float, fallback: Circuit):
        self.link, self.key, self.fallback = link, f"llm:circuit:{target}", fallback
        self.failures_to_cool, self.cooldown_ms = failures_to_cool, round(cooldown * 1000)

    async def read(self) -> Cooling:
        answer = await self.link.script("cooldowns", "CIRCUIT_READ", [self.key], [])
        return await self.fallback.read() if answer is None else _cooling(answer)

    async def failed(self) -> Cooling:
        args = [self.failures_to_cool, self.cooldown_ms]
        answer = await self.link.script("cooldowns", "CIRCUIT_FAILED", [self.key], args)
        return await self.fallback.failed() if answer is None else _cooling(answer)

    async def succeeded(self) -> None:
        await self.fallback.succeeded()  # what it counted during an outage is stale too
        await self.link.run("cooldowns", self.link.client.delete, self.key)


def _cooling(answer: list[int]) -> Cooling:
    failures, remaining_ms, started = answer
    return Cooling(failures, remaining_ms / 1000, started=bool(started))


class RedisResponses:
    """Stored responses in Redis, each with the age limit as its expiry; during an outage, and for what was stored
    during one, this replica's own store (`local`)."""

    def __init__(self, link: RedisLink, local: Responses, max_count: int, max_age_s: float):
        self.link, self.local, self.max_count, self.max_age_ms = link, local, max_count, round(max_age_s * 1000)

    async def put(self, owner: str, response_id: str, response: str, input: str) -> None:
        keys = [RESPONSE_INDEX, _response_key(owner, response_id)]
        args = [response, input, self.max_count, self.max_age_ms]
        if await self.link.script("responses", "RESPONSE_PUT", keys, args) is None:
            await self.local.put(owner, response_id, response, input)

    async def get(self, owner: str, response_id: str) -> tuple[str, str] | None:
        found = await self.link.run("responses", self.link.client.hmget, _response_key(owner, response_id),
                                    "response", "input")  # fmt: skip
        if found is None or found[0] is None:  # Redis is unreachable, or it was stored here during an outage
            return await self.local.get(owner, response_id)
        return found[0].decode(), found[1].decode()

    async def delete(self, owner: str, response_id: str) -> bool:
        keys = [RESPONSE_INDEX, _response_key(owner, response_id)]
        removed = await self.link.script("responses", "RESPONSE_DELETE", keys, [])
        return await self.local.delete(owner, response_id) or bool(removed)


def _response_key(owner: str, response_id: str) -> str:
    return f"llm:response:{owner}:{response_id}"


class RedisState:
    """Limits, cooldowns and stored responses in Redis, with this replica's local state during an outage. With
    `fail_open`, limits are not enforced during an outage; else each replica enforces them from its own count (N
    replicas may then admit up to N times a key's limit, never more). A hold lapses after `lease_s` (longer than any
    request may run), so one whose replica died does not hold tokens for ever."""

    def __init__(self, url: str, timeout: float, fail_open: bool, lease_s: float):
        self.link = RedisLink(url, timeout)
        self.fail_open, self.lease_ms = fail_open, round(lease_s * 1000)

    def window(self, owner: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> Window:
        rpm, tpm = requests_per_minute, tokens_per_minute
        fallback = Unlimited() if self.fail_open else LocalWindow(rpm, tpm)
        return RedisWindow(self.link, owner, rpm, tpm, fallback, self.lease_ms)

    def circuit(self, target: str, failures_to_cool: int, cooldown: float) -> Circuit:
        return RedisCircuit(self.link, target, failures_to_cool, cooldown, LocalCircuit(failures_to_cool, cooldown))

    def responses(self, local: Responses, max_count: int, max_age_s: float) -> Responses:
        return RedisResponses(self.link, local, max_count, max_age_s)

    async def start(self) -> None:
        await self.link.start()

    async def settled(self) -> None:
        await self.link.settled()

    async def close(self) -> None:
        await self.link.close()
