"""Unit tests for the routing config, the cooldown breaker and the key ring (no server needed)."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from gateway.errors import APIError
from gateway.front.keys import KeyLimits, KeyRing
from gateway.routing.breaker import Breaker
from gateway.routing.config import ApiKey, GatewayConfig, load_config
from gateway.settings import PROJECT_ROOT
from gateway.state.local import LocalCircuit, LocalState, LocalWindow

EXAMPLES = sorted((PROJECT_ROOT / "configs").glob("gateway*.yaml"))


def test_there_are_example_configs():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid_and_local_first(path):
    config = load_config(path)
    for name, chain in config.routes().items():
        assert chain, name
    first = config.targets[next(iter(config.targets))]
    assert first.type == "local"


def minimal(**changes) -> dict:
    data = {"targets": {"a": {"type": "local"}}, "models": {"m": {"targets": ["a"], "aliases": ["alias"]}}}
    data.update(changes)
    return data


def test_routes_cover_names_aliases_and_tiers():
    config = GatewayConfig.model_validate(minimal(tiers={"low": "m"}))
    assert config.routes() == {"m": ["a"], "alias": ["a"], "low": ["a"]}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"models": {"m": {"targets": ["nowhere"]}}}, "unknown targets"),
        ({"tiers": {"low": "missing"}}, "unknown model"),
        ({"tiers": {"alias": "m"}}, "defined twice"),
        ({"targets": {"a": {"type": "openai", "model": "x"}}}, "base_url"),
        ({"api_keys": [{"key": "k", "key_env": "K"}]}, "exactly one"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_configs_are_refused_with_a_reason(changes, message):
    with pytest.raises(ValidationError, match=message):
        GatewayConfig.model_validate(minimal(**changes))


def test_breaker_cools_after_consecutive_failures_and_recovers():
    breaker = Breaker(LocalCircuit(failures_to_cool=2, cooldown=1.0))  # a second: still cooling when checked

    async def scenario():
        assert await breaker.failed() is False and not breaker.remaining()
        assert await breaker.failed() is True and breaker.remaining() > 0
        assert breaker.health()["state"] == "cooling"
        time.sleep(1.05)
        assert breaker.health()["state"] == "ok" and await breaker.check() == 0
        assert await breaker.failed() is True  # one failure after a cooldown cools it again
        await breaker.succeeded()
        assert breaker.health() == {"state": "ok", "consecutive_failures": 0, "cooldown_remaining_s": 0.0}

    asyncio.run(scenario())


def test_key_ring_matches_only_exact_keys(monkeypatch):
    monkeypatch.setenv("KEY_FROM_ENV", "sk-env")
    ring = KeyRing([ApiKey(key="sk-one"), ApiKey(key_env="KEY_FROM_ENV")], LocalState())
    assert ring.match("sk-one") is not None and ring.match("sk-env") is not None
    assert ring.match("sk-on") is None and ring.match("sk-one ") is None and ring.match("") is None
    assert not KeyRing([], LocalState())


def test_limits_count_requests_and_tokens_per_minute():
    requests = LocalWindow(requests_per_minute=2, tokens_per_minute=None)
    tokens = LocalWindow(requests_per_minute=None, tokens_per_minute=100)

    async def scenario():
        await KeyLimits(requests).admit()
        await KeyLimits(requests).admit()
        with pytest.raises(APIError) as refused:
            await KeyLimits(requests).admit()
        assert (refused.value.status_code, refused.value.code, refused.value.type) == (
            429, "rate_limit_exceeded", "requests")  # fmt: skip
        charged = KeyLimits(tokens)
        assert await charged.admit(30) == 30
        charged.settle(100)
        with pytest.raises(APIError) as refused:
            await KeyLimits(tokens).admit()
        assert refused.value.type == "tokens" and int(refused.value.headers["Retry-After"]) >= 1

    asyncio.run(scenario())
