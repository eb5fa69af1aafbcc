"""Unit tests of engine pools (gateway/routing/pool.py): the balancing math, the prefix digest, ejection, slow return
and health-check states, on a clock the tests move; and the config's rules for `endpoints`."""

from __future__ import annotations

import collections
import math

import pytest
from pydantic import ValidationError

from gateway.routing import pool as pool_module
from gateway.routing.config import GatewayConfig, PoolPolicy
from gateway.routing.pool import (
    MIN_SHARE,
    PROMPT_FIELDS,
    Endpoint,
    Pool,
    bounded_rendezvous,
    health_url,
    least_outstanding,
    prefix_digest,
    smooth_round_robin,
)

SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def endpoints(*weights: float) -> list[Endpoint]:
    return [Endpoint(i, f"http://10.0.0.{i}:8080/v1", weight) for i, weight in enumerate(weights)]


def weighted(servers: list[Endpoint]) -> list[tuple[Endpoint, float]]:
    return [(server, server.weight) for server in servers]


def key(number: int) -> bytes:
    return prefix_digest({"messages": [{"role": "user", "content": f"conversation {number}"}]}, ("messages",), 2048)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(pool_module, "monotonic", clock)
    return clock


def a_pool(*weights: float, **policy) -> Pool:
    return Pool("t", endpoints(*weights), "least_outstanding", PoolPolicy(**policy), {})


# ---- balancing ------------------------------------------------------------------------------------------------


def test_least_outstanding_takes_the_fewest_in_flight_per_weight():
    a, b, c = servers = endpoints(1, 1, 2)
    a.outstanding, b.outstanding, c.outstanding = 2, 1, 3  # loads with this one: 3, 2, 2 per unit of weight
    picked = {least_outstanding(weighted(servers)) for _ in range(200)}
    assert picked == {b, c}  # ties go to either
    c.outstanding = 1
    assert least_outstanding(weighted(servers)) is c


def test_round_robin_gives_each_its_weight_share_spread_out():
    a, b, c = servers = endpoints(1, 2, 1)
    picks = [smooth_round_robin(weighted(servers)) for _ in range(8)]
    assert collections.Counter(picks) == {a: 2, b: 4, c: 2}
    assert all(first is not second for first, second in zip(picks, picks[1:]) if first is not b)


def test_rendezvous_is_stable_and_an_endpoint_leaving_moves_only_its_own_keys():
    servers = endpoints(1, 1, 1, 1)
    before = {n: bounded_rendezvous(key(n), weighted(servers), 1.25) for n in range(400)}
    assert before == {n: bounded_rendezvous(key(n), weighted(servers), 1.25) for n in range(400)}
    gone = servers[2]
    after = {n: bounded_rendezvous(key(n), weighted([s for s in servers if s is not gone]), 1.25) for n in range(400)}
    moved = [n for n in before if before[n] is not after[n]]
    assert moved and all(before[n] is gone for n in moved)
    assert len(moved) == sum(1 for server in before.values() if server is gone)


def test_rendezvous_shares_follow_the_weights():
    servers = endpoints(1, 1, 2)
    counts = collections.Counter(bounded_rendezvous(key(n), weighted(servers), 1.25) for n in range(4000))
    shares = [counts[server] / 4000 for server in servers]
    assert shares == pytest.approx([0.25, 0.25, 0.5], abs=0.03)


def test_bounded_load_spreads_one_hot_conversation_within_the_bound():
    servers = endpoints(1, 1, 1)
    first = bounded_rendezvous(key(7), weighted(servers), 1.25)
    for held in range(1, 13):  # twelve requests of one conversation in flight at once
        bounded_rendezvous(key(7), weighted(servers), 1.25).outstanding += 1
        bound = math.ceil(1.25 * held / 3)
        assert max(server.outstanding for server in servers) <= bound
    assert first.outstanding == 5  # its own endpoint holds its bound, and the others take the rest
    assert sorted(server.outstanding for server in servers) == [2, 5, 5]


def test_affinity_keeps_a_conversation_on_its_endpoint_below_the_bound():
    servers = endpoints(1, 1, 1)
    home = bounded_rendezvous(key(3), weighted(servers), 1.25)
    for other in servers:
        other.outstanding = 3
    assert bounded_rendezvous(key(3), weighted(servers), 1.25) is home  # 3 < ceil(1.25 x 10 / 3)
    home.outstanding = 5
    assert bounded_rendezvous(key(3), weighted(servers), 1.25) is not home  # 5 >= ceil(1.25 x 12 / 3)


# ---- the prefix digest -----------------------------------------------------------------------------------------


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [SYSTEM, *({"role": role, "content": turn} for role, turn in zip(roles, turns))]}


def digest(payload: dict, endpoint: str = "chat/completions", limit: int = 2048) -> bytes | None:
    return prefix_digest(payload, PROMPT_FIELDS.get(endpoint, ()), limit)


def test_every_turn_of_a_conversation_has_one_digest_and_conversations_differ():
    opening = digest(chat("Plan a trip to Lyon."))
    assert digest(chat("Plan a trip to Lyon.", "Sure: day one...", "And day two?")) == opening
    assert digest(chat("Plan a trip to Porto.")) != opening
    other_system = chat("Plan a trip to Lyon.")
    other_system["messages"][0] = {"role": "system", "content": "You are a verbose assistant."}
    assert digest(other_system) != opening


def test_the_digest_reads_each_message_up_to_its_limit():
    long_turn = "x" * 5000
    assert digest(chat(long_turn + "a"), limit=100) == digest(chat(long_turn + "b"), limit=100)
    assert digest(chat(long_turn + "a"), limit=10000) != digest(chat(long_turn + "b"), limit=10000)


def test_each_protocol_opens_its_conversations_in_its_own_fields():
    messages = {"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    later = {**messages, "messages": [*messages["messages"], {"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": "more"}]}  # fmt: skip
    assert digest(messages, "messages") == digest(later, "messages") is not None
    assert digest({**messages, "system": "Be long."}, "messages") != digest(messages, "messages")
    responses = {"instructions": "Be brief.", "input": "hi"}
    assert digest(responses, "responses") != digest({**responses, "input": "bye"}, "responses")
    assert digest({"prompt": "Once upon a time"}, "completions") is not None
    assert digest({"input": ["a cat"]}, "embeddings") is None  # nothing to keep warm: balanced by load
    assert digest({"messages": []}) is None


# ---- a pool: picks, ejection, slow return, health checks -------------------------------------------------------


def test_the_pick_leaves_out_endpoints_already_tried():
    pool = a_pool(1, 1)
    first = pool.pick(None, [])
    second = pool.pick(None, [first])
    assert second is not first
    assert pool.pick(None, [first, second]) is None


def test_an_endpoint_is_ejected_after_failures_in_a_row_and_returns_slowly(clock):
    pool = a_pool(1, 1, eject_after=2, eject_seconds=10, slow_return_seconds=20)
    bad, good = pool.endpoints
    for _ in range(2):
        pool.start(bad)
        pool.finish(bad, failed=True)
    assert [pool.pick(None, []) for _ in range(20)] == [good] * 20
    assert pool.health()[0]["state"] == "ejected"
    assert pool.counts()[0].ejected and pool.counts()[0].ejections == 1
    clock.now += 10  # back, with a small share that grows
    assert pool.health()[0]["state"] == "returning"
    assert pool._weight(bad, clock.now) == pytest.approx(MIN_SHARE)
    clock.now += 10
    assert pool._weight(bad, clock.now) == pytest.approx(0.5)
    pool.start(bad)
    pool.finish(bad, failed=True)  # one failure right after its return ejects it again
    assert pool.health()[0]["state"] == "ejected"
    clock.now += 30 + 10
    assert pool.health()[0]["state"] == "up"
    pool.start(bad)
    pool.finish(bad, failed=False)  # a success clears the failures in a row
    pool.start(bad)
    pool.finish(bad, failed=True)
    assert pool.health()[0]["state"] == "up"
    assert (pool.counts()[0].requests, pool.counts()[0].failures, pool.counts()[0].outstanding) == (5, 4, 0)


def test_a_failed_health_check_marks_an_endpoint_down_until_one_passes(clock):
    pool = a_pool(1, 1, slow_return_seconds=30)
    down, up = pool.endpoints
    pool.checked(down, False, "ConnectError")
    assert pool.health()[0]["state"] == "down"
    assert {pool.pick(None, []) for _ in range(20)} == {up}
    pool.checked(down, True)
    assert pool.health()[0]["state"] == "returning"
    clock.now += 30
    assert pool.health()[0]["state"] == "up"


def test_health_checks_stay_on_the_endpoints_own_host():
    assert health_url("http://10.0.0.1:8080/v1", "/health") == "http://10.0.0.1:8080/health"
    assert health_url("http://10.0.0.1:8080/v1", "models") == "http://10.0.0.1:8080/v1/models"
    assert health_url("http://10.0.0.1:8080/v1", "//elsewhere/x") == "http://10.0.0.1:8080//elsewhere/x"


# ---- the config ------------------------------------------------------------------------------------------------


def target(**fields) -> dict:
    config = {"targets": {"pool": {"type": "openai", "model": "m", **fields}}, "models": {"m": {"targets": ["pool"]}}}
    return GatewayConfig.model_validate(config).targets["pool"]


def test_endpoints_take_urls_or_urls_with_weights():
    config = target(endpoints=["http://a:8080/v1", {"url": "http://b:8080/v1", "weight": 3}], balance="round_robin")
    assert [(e.url, e.weight) for e in config.endpoints] == [("http://a:8080/v1", 1), ("http://b:8080/v1", 3)]
    assert config.base_url is None
    anthropic = GatewayConfig.model_validate({
        "targets": {"pool": {"type": "anthropic", "model": "m", "endpoints": ["http://a:8080"]}},
        "models": {"m": {"targets": ["pool"]}},
    }).targets["pool"]  # fmt: skip
    assert anthropic.base_url is None  # its default gives way


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "needs a base_url"),
        ({"base_url": "http://a/v1", "endpoints": ["http://b/v1"]}, "not both"),
        ({"base_url": "http://a/v1", "balance": "round_robin"}, "apply to a target with endpoints"),
        ({"endpoints": []}, "at least 1"),
        ({"endpoints": ["ftp://b/v1"]}, "http:// or https://"),
        ({"endpoints": ["http://b:99999/v1"]}, "Port out of range"),
        ({"endpoints": [{"url": "http://b/v1", "weight": 0}]}, "greater than 0"),
        ({"endpoints": ["http://b/v1"], "balance": "random"}, "affinity"),
        ({"endpoints": ["http://b/v1"], "pool": {"health_path": "/he alth"}}, "pattern"),
        ({"endpoints": ["http://b/v1"], "pool": {"load_factor": 0.5}}, "greater than or equal to 1"),
        ({"endpoints": [f"http://b{i}/v1" for i in range(65)]}, "at most 64"),
    ],
)
def test_pool_configs_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        target(**fields)
