"""Two gateway replicas on one Redis (LLM_REDIS_URL): they share a key's limits, a target's cooldown and the stored
responses, and keep serving from their own state when Redis is killed, until it is back.

Both replicas serve the default model on llama.cpp, and remote targets on the misbehaving upstream
(tests/upstream.py); Redis is Debian's redis-server, started here (tests/redis_server.py)."""

from __future__ import annotations

import hashlib

import openai
import pytest
import yaml

from tests.conftest import MODEL, start_server, wait_for
from tests.redis_server import running_redis
from tests.routing.test_routing import sample

KEY, OTHER_KEY = "sk-shared-reader", "sk-shared-other"
LIMITED = {"sk-rpm-shared": 2, "sk-rpm-outage": 1, "sk-rpm-after": 2}  # key -> its requests per minute
TOKENS_KEY = "sk-tpm-shared"  # 5 tokens per minute: one answer of the `good` upstream (3 + 2 tokens)


def replica_config(upstream) -> dict:
    def remote(name: str) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "upstream-model"}

    return {
        "targets": {"local": {"type": "local"}, "flaky": remote("shared-500"), "good": remote("shared-ok")},
        "models": {
            MODEL: {"targets": ["local"]},
            "flaky-then-good": {"targets": ["flaky", "good"]},
            "remote": {"targets": ["good"]},
        },
        "retry": {"attempts": 1, "failures_to_cool": 1, "cooldown": 300},
        "api_keys": [
            {"key": KEY},
            {"key": OTHER_KEY},
            {"key": TOKENS_KEY, "tokens_per_minute": 5},
            *({"key": key, "requests_per_minute": rpm} for key, rpm in LIMITED.items()),
        ],
    }


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, upstream, redis_server):
    folder = tmp_path_factory.mktemp("replicas")
    (folder / "gateway.yaml").write_text(yaml.safe_dump(replica_config(upstream), sort_keys=False))  # MODEL first
    # A loaded 2-core machine can stall a loopback call past the default 0.25 s; a killed server refuses at once.
    env = {"LLM_CONFIG": str(folder / "gateway.yaml"), "LLM_REDIS_URL": redis_server.url, "LLM_REDIS_TIMEOUT": "5"}
    started = []
    try:
        for n in (1, 2):
            started.append(start_server(tmp_path_factory.mktemp(f"replica{n}"), env))  # each its own LLM_DATA_DIR
        yield started
    finally:
        for server in started:
            server.stop()


def models(server, key: str):
    return server.get("/v1/models", headers={"Authorization": f"Bearer {key}"})


def test_replicas_share_a_keys_requests_per_minute(replicas, redis_server):
    one, two = replicas
    key = "sk-rpm-shared"
    assert models(one, key).status_code == 200 and models(two, key).status_code == 200
    third = models(one, key)
    assert third.status_code == 429 and third.json()["error"]["type"] == "requests"
    assert 1 <= int(third.headers["retry-after"]) <= 61 and models(two, key).status_code == 429
    names = redis_server.client().keys("llm:*")
    owner = hashlib.sha256(key.encode()).hexdigest()[:32]
    assert f"llm:limits:{owner}:r" in names and not any("sk-" in name for name in names)  # never a key itself


def test_tokens_charged_on_one_replica_count_on_the_other(replicas):
    one, two = replicas
    answer = one.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TOKENS_KEY}"},
        json={"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert answer.status_code == 200 and answer.json()["usage"]["total_tokens"] == 5
    refused = models(two, TOKENS_KEY)  # by the request's hold until its settle lands, by its charge after
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    # Charged tokens leave the window a minute after their use; a hold alone may end any moment (Retry-After: 1).
    wait_for(lambda: int(models(two, TOKENS_KEY).headers["retry-after"]) > 1, 10, "the charge to land in Redis")


def test_a_target_cooled_down_on_one_replica_is_skipped_by_the_other(replicas, upstream):
    one, two = replicas
    for server in (one, two):
        raw = server.client(api_key=KEY).chat.completions.with_raw_response.create(
            model="flaky-then-good", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.headers["x-llm-target"] == "good"
    assert upstream.hits["shared-500"] == 1  # replica two never tried it
    flaky = two.health()["targets"]["flaky"]
    assert flaky["state"] == "cooling" and flaky["cooldown_remaining_s"] > 200


def test_a_response_stored_on_one_replica_is_read_and_continued_on_the_other(replicas):
    one, two = replicas
    created = one.client(api_key=KEY).responses.create(model=MODEL, input="Say hi.", max_output_tokens=16)
    read = two.client(api_key=KEY).responses.retrieve(created.id)
    assert read.id == created.id and read.output_text == created.output_text
    continued = two.client(api_key=KEY).responses.create(model=MODEL, input="Again.", max_output_tokens=16,
                                                         previous_response_id=created.id)  # fmt: skip
    assert continued.previous_response_id == created.id
    with pytest.raises(openai.NotFoundError):
        one.client(api_key=OTHER_KEY).responses.retrieve(created.id)  # another key's


def test_replicas_keep_serving_from_their_own_state_while_redis_is_down(replicas, redis_server):
    one, two = replicas
    key = "sk-rpm-outage"
    redis_server.stop()
    try:
        # Limits fail closed: each replica counts the key's one request a minute on its own.
        assert models(one, key).status_code == 200 and models(one, key).status_code == 429
        assert models(two, key).status_code == 200 and models(two, key).status_code == 429
        raw = one.client(api_key=KEY).chat.completions.with_raw_response.create(
            model="remote", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.headers["x-llm-target"] == "good"
        for server in (one, two):
            assert sample(server, "llm_shared_state_up", backend="redis") == 0
            assert sample(server, "llm_shared_state_fallbacks_total", state="limits") >= 2
            assert sum("is unreachable" in line for line in server.log().splitlines()) == 1  # once per outage
    finally:
        redis_server.start()
    for server in (one, two):
        wait_for(lambda: sample(server, "llm_shared_state_up", backend="redis") == 1, 15, "Redis seen again")
    key = "sk-rpm-after"  # shared again: Redis came back empty
    assert models(one, key).status_code == 200 and models(two, key).status_code == 200
    assert models(one, key).status_code == 429
