"""The Redis state (gateway/state/redis_state.py and its Lua scripts) against a real redis-server: two `RedisState`s
on one server stand for two replicas. Windows, holds and their leases, circuits, stored responses, and an outage:
local state serves, a warning once, the metric counts, and Redis is used again once it is back. A request's admission
is one call to Redis; its settle lands in the background (`settled`, and `close`, await it)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest

from gateway.routing.breaker import FRESH_S, Breaker
from gateway.state.redis_state import MAX_CONNECTIONS, PROBE_EVERY, RedisState
from gateway.state.shared import NO_HOLD, Hold, Refusal
from gateway.telemetry.metrics import REGISTRY
from tests.redis_server import running_redis

OWNER = "0123456789abcdef0123456789abcdef"  # an owner hash, as front/keys.py makes them


@pytest.fixture
def redis_server(tmp_path):
    with running_redis(tmp_path) as server:
        yield server


class Store:
    """A `Responses` in memory: this replica's own store."""

    def __init__(self):
        self.items: dict[tuple[str, str], tuple[str, str]] = {}

    async def put(self, owner, response_id, response, input):
        self.items[owner, response_id] = (response, input)

    async def get(self, owner, response_id):
        return self.items.get((owner, response_id))

    async def delete(self, owner, response_id):
        return self.items.pop((owner, response_id), None) is not None


# A loaded 2-core machine can stall a loopback call past the default 0.25 s; a killed server refuses at once.
TIMEOUT = 5.0


def replicas(url: str, count: int = 2, **options) -> list[RedisState]:
    options = {"timeout": TIMEOUT, "fail_open": False, "lease_s": 60, **options}
    return [RedisState(url, **options) for _ in range(count)]


def run(scenario):
    """Runs `scenario(a, b)` with two started replicas, closed afterwards."""

    async def main(states):
        for state in states:
            await state.start()
        try:
            return await scenario(*states)
        finally:
            for state in states:
                await state.close()

    return main


def test_replicas_count_one_window_of_requests(redis_server):
    async def scenario(a, b):
        first, second = a.window(OWNER, 2, None), b.window(OWNER, 2, None)
        assert await first.admit() == NO_HOLD and await second.admit() == NO_HOLD
        refusal = await first.admit()
        assert refusal.unit == "requests" and refusal.limit == 2 and 59 <= refusal.wait <= 61
        assert await a.window("another-owner", 2, None).admit() == NO_HOLD  # each key its own window

    asyncio.run(run(scenario)(replicas(redis_server.url)))


def test_tokens_held_and_charged_on_one_replica_count_on_the_other(redis_server):
    async def scenario(a, b):
        first, second = a.window(OWNER, None, 100), b.window(OWNER, None, 100)
        held = await first.admit(60)
        assert isinstance(held, Hold) and held.id is not None
        other = await second.admit(60)  # 60 held < 100: admitted (one request's maximum of overshoot)
        refused = await first.admit(1)
        assert isinstance(refused, Refusal) and refused.unit == "tokens" and refused.wait == 1  # none charged yet
        first.settle(held, 10)
        second.settle(other, 89)
        await a.settled()
        await b.settled()
        assert await second.admit() == NO_HOLD  # 99 charged
        first.settle(await first.admit(5), 1)
        await a.settled()
        refused = await second.admit()
        assert refused.unit == "tokens" and 59 <= refused.wait <= 61

    asyncio.run(run(scenario)(replicas(redis_server.url)))


def test_a_hold_lapses_after_its_lease(redis_server):
    async def scenario(a, b):
        await a.window(OWNER, None, 100).admit(100)  # its replica dies before it settles
        assert isinstance(await b.window(OWNER, None, 100).admit(1), Refusal)
        await asyncio.sleep(0.6)
        assert isinstance(await b.window(OWNER, None, 100).admit(1), Hold)

    asyncio.run(run(scenario)(replicas(redis_server.url, lease_s=0.5)))


def script_calls(redis_server) -> int:
    return redis_server.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_an_admission_is_one_call_and_a_settle_lands_in_the_background(redis_server):
    client = redis_server.client()
    tokens, holds = (f"llm:limits:{OWNER}:{part}" for part in ("t", "h"))

    async def scenario(a, b):
        window = a.window(OWNER, 2, 100)
        await a.window("another-owner", 2, 100).admit(1)  # Redis learns the script
        before = script_calls(redis_server)
        held = await window.admit(60)
        assert isinstance(held, Hold) and script_calls(redis_server) == before + 1  # counted and held in one call
        other = await b.window(OWNER, 2, 100).admit(30)
        assert (await window.admit(1)).unit == "requests"  # both requests were counted
        window.settle(held, 10)
        assert set(client.zrange(holds, 0, -1)) == {held.id, other.id}  # nobody waits for it: still held...
        await a.settled()
        assert client.zrange(holds, 0, -1) == [other.id] and client.hgetall(tokens) != {}  # ... until it lands
        window.settle(other, 20)  # at shutdown: `close` applies it

    asyncio.run(run(scenario)(replicas(redis_server.url)))
    assert client.zrange(holds, 0, -1) == [] and sum(map(int, client.hgetall(tokens).values())) == 30


def test_replicas_share_a_targets_failures_and_cooldown(redis_server):
    async def scenario(a, b):
        first, second = a.circuit("upstream", 2, 30), b.circuit("upstream", 2, 30)
        assert (await first.failed()).started is False
        cooling = await second.failed()
        assert cooling.started and cooling.failures == 2 and cooling.remaining == 30
        seen = await first.read()
        assert seen.failures == 2 and 29 < seen.remaining <= 30
        assert (await first.failed()).started  # one failure after the threshold cools it again
        await second.succeeded()
        assert (await first.read()).failures == 0 and (await first.read()).remaining == 0
        assert (await a.circuit("another", 2, 30).read()).failures == 0

    asyncio.run(run(scenario)(replicas(redis_server.url)))


def test_a_breaker_sees_another_replicas_cooldown_within_its_freshness(redis_server):
    async def scenario(a, b):
        first, second = Breaker(a.circuit("upstream", 1, 30)), Breaker(b.circuit("upstream", 1, 30))
        assert await first.check() == 0
        assert await second.failed() is True
        assert await first.check() == 0  # what it read is trusted for FRESH_S: no call to Redis
        await asyncio.sleep(FRESH_S)
        assert await first.check() > 29 and first.health()["state"] == "cooling"

    asyncio.run(run(scenario)(replicas(redis_server.url)))


def test_responses_are_shared_scoped_by_owner_and_bounded(redis_server):
    async def scenario(a, b):
        first, second = a.responses(Store(), 2, 3600), b.responses(Store(), 2, 3600)
        await first.put(OWNER, "resp_1", '{"output": []}', "[]")
        assert await second.get(OWNER, "resp_1") == ('{"output": []}', "[]")
        assert await second.get("another-owner", "resp_1") is None
        await first.put(OWNER, "resp_2", "{}", "[]")
        await second.put(OWNER, "resp_3", "{}", "[]")  # past the count: the oldest goes
        assert await first.get(OWNER, "resp_1") is None and await first.get(OWNER, "resp_2") is not None
        assert await second.delete(OWNER, "resp_2") is True and await first.delete(OWNER, "resp_2") is False
        young = a.responses(Store(), 10, 0.3)
        await young.put(OWNER, "resp_4", "{}", "[]")
        await asyncio.sleep(0.5)
        assert await young.get(OWNER, "resp_4") is None

    asyncio.run(run(scenario)(replicas(redis_server.url)))


def fallbacks(state: str) -> float:
    return REGISTRY.get_sample_value("llm_shared_state_fallbacks_total", {"state": state}) or 0.0


def redis_up() -> float | None:
    return REGISTRY.get_sample_value("llm_shared_state_up", {"backend": "redis"})


def test_more_requests_at_once_than_connections_wait_for_one(redis_server):
    """A busy connection pool is no outage: requests past its size wait for a connection. (redis-py's default pool
    refused the 101st call at once, the replica counted Redis unreachable and left its holds behind.)"""
    client = redis_server.client()
    requests, holds = (f"llm:limits:{OWNER}:{part}" for part in ("r", "h"))
    at_once = MAX_CONNECTIONS * 8

    async def scenario(a, b):
        window = a.window(OWNER, 10**6, 10**9)
        before = fallbacks("limits")
        admitted = await asyncio.gather(*(window.admit(10) for _ in range(at_once)))
        assert all(isinstance(hold, Hold) and hold.id is not None for hold in admitted)  # each held in Redis
        for hold in admitted:
            window.settle(hold, 1)
        await a.settled()
        assert fallbacks("limits") == before and redis_up() == 1

    asyncio.run(run(scenario)(replicas(redis_server.url)))
    assert sum(map(int, client.hgetall(requests).values())) == at_once and client.zcard(holds) == 0


def test_a_redis_that_stops_answering_costs_each_call_its_timeout_at_most(redis_server):
    """A Redis that hangs (stopped, as behind a lost network) holds each call for its timeout at most, however many
    wait for a connection meanwhile; then the replica serves from its own state, and from Redis again once it
    answers."""
    timeout = 0.5

    async def scenario(a):
        window = a.window(OWNER, 10**6, None)
        assert await window.admit() == NO_HOLD
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            answers = await asyncio.gather(*(window.admit() for _ in range(MAX_CONNECTIONS * 2)))
            waited = time.monotonic() - started
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert answers == [NO_HOLD] * len(answers) and redis_up() == 0  # admitted by this replica's own count
        assert waited < timeout * 6  # a connection's wait, then the call's: not one call after another
        await asyncio.sleep(PROBE_EVERY * 3)
        assert redis_up() == 1 and await window.admit() == NO_HOLD

    asyncio.run(run(scenario)(replicas(redis_server.url, count=1, timeout=timeout)))


def test_an_outage_falls_back_to_local_state_warns_once_and_recovers(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.state.redis_state")
    store = Store()

    async def scenario(a, b):
        window, circuit, responses = a.window(OWNER, 1, None), a.circuit("upstream", 1, 30), a.responses(store, 9, 60)
        assert redis_up() == 1
        redis_server.stop()
        before = fallbacks("limits")
        assert await window.admit() == NO_HOLD  # the first call finds Redis gone: served locally
        refused = await window.admit()  # limits fail closed: this replica's own count
        assert refused is not None and refused.unit == "requests"
        assert fallbacks("limits") == before + 2 and redis_up() == 0
        assert (await circuit.failed()).started
        await responses.put(OWNER, "resp_outage", "{}", "[]")
        assert store.items == {(OWNER, "resp_outage"): ("{}", "[]")}  # this replica's own store
        open_window = b.window(OWNER, 1, None)
        for _ in range(3):
            assert await open_window.admit() == NO_HOLD  # fail open: no limit until Redis is back
        redis_server.start()
        await asyncio.sleep(PROBE_EVERY * 3)
        assert redis_up() == 1
        assert await window.admit() == NO_HOLD  # Redis's window again: it counted nothing
        assert await a.responses(Store(), 9, 60).get(OWNER, "resp_outage") is None  # kept where it was stored...
        assert await responses.get(OWNER, "resp_outage") == ("{}", "[]")  # ... and found there

    b = RedisState(redis_server.url, timeout=TIMEOUT, fail_open=True, lease_s=60)
    asyncio.run(run(scenario)([*replicas(redis_server.url, count=1), b]))
    messages = [record.getMessage() for record in caplog.records]
    # Once per replica and outage, however many calls failed meanwhile.
    assert sum("is unreachable" in m for m in messages) == 2 and sum("answers again:" in m for m in messages) == 2
