"""Routing, fallback, retries, cooldowns, timeouts, queues and keys, against real HTTP upstreams.

One gateway (`routed`) is configured from a YAML file: its local SmolLM2 engine (one slot, no waiting
room), a second real gateway (`peer`, which wants its own key), and targets on a misbehaving server
started here (tests/upstream.py) that refuses, fails, stalls or cuts streams.
"""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, free_port, start_server
from tests.upstream import Upstream

GATEWAY_KEY = "sk-right-key-for-tests"
LIMITED_KEY = "sk-limited-key"
PEER_KEY = "sk-peer-secret"
COOLDOWN = 3.0
LONG = {"max_tokens": 3000, "ignore_eos": True}


def routing_config(upstream: Upstream, peer_url: str) -> dict:
    def remote(name: str, **extra) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "upstream-model", **extra}

    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    targets = {
        "local": {"type": "local", "parallel": 1, "max_waiting": 0},
        "peer": {"type": "openai", "base_url": peer_url, "model": MODEL, "api_key_env": "PEER_KEY"},
        "refused": {"type": "openai", "base_url": closed, "model": "x"},
        **{name: remote(name) for name in ["a-500", "b-500", "c-429", "d-400", "e-cut3", "f-fail2", "breaker-ok"]},
        "stalled": remote("g-stall", read_timeout=1),
        "good": remote("good-ok"),
        "spare": remote("spare-ok"),
    }
    chains = {
        MODEL: ["local", "peer"],
        "local-only": ["local"],
        "big": ["peer"],
        "refused-then-local": ["refused", "local"],
        "broken-then-peer": ["a-500", "peer"],
        "stalled-then-good": ["stalled", "good"],
        "limited-then-good": ["c-429", "good"],
        "bad-request-then-good": ["d-400", "good"],
        "cut-then-good": ["e-cut3", "good"],
        "flaky": ["f-fail2"],
        "all-down": ["refused", "b-500"],
        "breaker-then-spare": ["breaker-ok", "spare"],
    }
    models = {name: {"targets": chain} for name, chain in chains.items()}
    models[MODEL]["aliases"] = ["small"]
    return {
        "targets": targets,
        "models": models,
        "tiers": {"low": MODEL, "high": "big"},
        "retry": {"attempts": 3, "backoff_initial": 0.05, "backoff_max": 0.2, "failures_to_cool": 3,
                  "cooldown": COOLDOWN},
        "api_keys": [{"key_env": "GATEWAY_KEY", "name": "tests"},
                     {"key": LIMITED_KEY, "name": "limited", "requests_per_minute": 2}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def upstream():
    server = Upstream(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("peer"), {"LLM_API_KEYS": PEER_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def routed(tmp_path_factory, upstream, peer):
    folder = tmp_path_factory.mktemp("routed")
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump(routing_config(upstream, peer.v1)))
    env = {"LLM_CONFIG": str(config), "PEER_KEY": PEER_KEY, "GATEWAY_KEY": GATEWAY_KEY}
    server = start_server(folder, env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(routed) -> openai.OpenAI:
    return routed.client(api_key=GATEWAY_KEY)


def ask(client: openai.OpenAI, model: str, **extra):
    """A chat completion through the SDK, with the raw response for its headers."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=extra.pop("max_tokens", 3), **extra
    )
    return raw.headers, raw.parse()


def stream_text(client: openai.OpenAI, model: str) -> tuple[httpx.Headers, str]:
    with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    ) as response:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
        return response.headers, text


def hits(upstream: Upstream, name: str) -> int:
    return upstream.hits[name]


def counter(server, name: str, **labels: str) -> float:
    """A counter from the gateway's /metrics (0 when it has not been incremented yet)."""
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name + "_total" and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def wait_idle(server, within: float) -> None:
    """Wait for the engine to drop cancelled work: at its next decode step, which a loaded 2-core machine
    can stretch to seconds; 3000 tokens would still be running for minutes if the work went on."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        engines = server.health()["models"]
        if all(e["running"] == 0 and e["waiting"] == 0 for e in engines):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {within}s: {server.health()['models']}")


# ---- names ------------------------------------------------------------------------------------------


def test_models_lists_names_aliases_and_tiers(client):
    names = {m.id for m in client.models.list().data}
    assert {MODEL, "small", "low", "high", "big", "all-down"} <= names
    with pytest.raises(openai.NotFoundError) as error:
        ask(client, "no-such-model")
    assert error.value.code == "model_not_found"


def test_tiers_and_aliases_route_to_their_chains(client):
    assert ask(client, "low")[0]["x-llm-target"] == "local"
    assert ask(client, "small")[0]["x-llm-target"] == "local"
    headers, reply = ask(client, "high")  # the peer gateway, which needs the key from PEER_KEY
    assert headers["x-llm-target"] == "peer"
    assert reply.usage.completion_tokens >= 1
    vectors = client.embeddings.with_raw_response.create(model="high", input=["a cat"])
    assert vectors.headers["x-llm-target"] == "peer"
    assert len(vectors.parse().data[0].embedding) == 576


# ---- fallback ---------------------------------------------------------------------------------------


def test_non_streaming_falls_back_on_refused_and_500(client, routed, upstream):
    assert ask(client, "refused-then-local")[0]["x-llm-target"] == "local"
    headers, reply = ask(client, "broken-then-peer")
    assert headers["x-llm-target"] == "peer"
    assert reply.choices[0].message.content is not None
    assert hits(upstream, "a-500") == 3  # retried with backoff before moving on
    assert counter(routed, "llm_fallbacks", from_target="refused", to_target="local") == 1
    assert counter(routed, "llm_fallbacks", from_target="a-500", to_target="peer") == 1


def test_streaming_fallback_before_the_first_chunk_is_invisible(client, upstream):
    headers, text = stream_text(client, "broken-then-peer")
    assert headers["x-llm-target"] == "peer"
    assert text
    started = time.monotonic()
    headers, text = stream_text(client, "stalled-then-good")  # the stalled target times out after 1 s
    assert headers["x-llm-target"] == "good"
    assert text == "from good-ok upstream"
    assert time.monotonic() - started < 20


def test_retry_after_is_honoured_before_falling_back(client, upstream):
    started = time.monotonic()
    headers, reply = ask(client, "limited-then-good")
    elapsed = time.monotonic() - started
    assert headers["x-llm-target"] == "good"
    assert hits(upstream, "c-429") == 3
    assert elapsed >= 1.9  # two waits of Retry-After: 1, not the 0.05 s backoff


def test_retry_then_success_on_the_same_target(client, routed, upstream):
    headers, reply = ask(client, "flaky")
    assert headers["x-llm-target"] == "f-fail2"
    assert reply.choices[0].message.content == "from f-fail2"
    assert hits(upstream, "f-fail2") == 3
    assert counter(routed, "llm_retries", target="f-fail2") == 2


def test_request_errors_are_not_retried_or_routed_elsewhere(client, upstream):
    good_before = hits(upstream, "good-ok")
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "bad-request-then-good")
    assert error.value.code == "upstream_400"
    assert error.value.response.headers["x-llm-target"] == "d-400"
    assert hits(upstream, "d-400") == 1
    assert hits(upstream, "good-ok") == good_before


def test_failure_after_output_ends_the_stream_with_an_error_event(routed):
    body = {"model": "cut-then-good", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    with httpx.stream("POST", routed.v1 + "/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["x-llm-target"] == "e-cut3"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) == 5  # three chunks, the error, [DONE]
    assert '"error"' in events[3]
    assert events[4] == "[DONE]"


def test_all_targets_failing_gives_a_final_error_that_says_do_not_retry(client):
    with pytest.raises(openai.InternalServerError) as error:
        ask(client, "all-down")
    assert error.value.response.headers["x-should-retry"] == "false"
    assert error.value.response.headers["x-llm-target"] == "b-500"
    assert error.value.body["code"] == "upstream_500"


def test_a_failing_target_cools_down_is_skipped_and_recovers(client, routed, upstream):
    control = f"http://127.0.0.1:{upstream.port}/control/breaker-ok"
    httpx.put(control, json={"mode": "500"})
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "spare"
    target = routed.health()["targets"]["breaker-ok"]
    assert target["state"] == "cooling" and target["cooldown_remaining_s"] > 0
    assert counter(routed, "llm_cooldowns", target="breaker-ok") == 1
    tried = hits(upstream, "breaker-ok")
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "spare"
    assert hits(upstream, "breaker-ok") == tried  # skipped while cold
    httpx.put(control, json={"mode": "ok"})
    time.sleep(COOLDOWN + 0.5)
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "breaker-ok"
    assert routed.health()["targets"]["breaker-ok"]["state"] == "ok"


# ---- timeouts, disconnects, queues -------------------------------------------------------------------


def test_timeout_gives_504_and_frees_the_engine(client, routed):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as error:
        ask(client, "local-only", extra_body={"timeout": 1, "ignore_eos": True}, max_tokens=3000)
    assert error.value.status_code == 504
    assert time.monotonic() - started < 10
    wait_idle(routed, within=10.0)
    response = httpx.post(
        routed.v1 + "/chat/completions",
        json={"model": "local-only", "messages": [{"role": "user", "content": "hi"}], **LONG},
        headers={"Authorization": f"Bearer {GATEWAY_KEY}", "x-request-timeout": "1"},
        timeout=30,
    )  # fmt: skip
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    wait_idle(routed, within=10.0)


def test_a_client_too_slow_to_send_its_body_gets_408(routed):
    host, port = routed.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\nx-request-timeout: 1\r\n\r\n" + b'{"model": "small",'
        )  # and the remaining bytes never come
        started = time.monotonic()
        reply = b""
        while b'"code"' not in reply and (chunk := sock.recv(4096)):  # headers and body may come apart
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408")
    assert '"code":"timeout"' in reply
    assert time.monotonic() - started < 10


def long_stream(server, model: str, key: str):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True, **LONG}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.stream("POST", server.v1 + "/chat/completions", json=body, headers=headers, timeout=30)


def test_disconnect_frees_the_local_engine_and_the_upstream(routed, peer):
    for model, engine_host in (("local-only", routed), ("high", peer)):
        with long_stream(routed, model, GATEWAY_KEY) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
            assert engine_host.health()["models"][0]["running"] == 1
        wait_idle(engine_host, within=10.0)


def test_full_queue_gives_503_or_the_next_target(client, routed):
    with long_stream(routed, "local-only", GATEWAY_KEY) as response:
        lines = response.iter_lines()
        next(lines)  # the one slot is busy; no request may wait
        with pytest.raises(openai.InternalServerError) as error:
            ask(client, "local-only")
        assert error.value.status_code == 503
        assert error.value.code == "engine_overloaded"
        assert "retry-after" in error.value.response.headers
        assert ask(client, MODEL)[0]["x-llm-target"] == "peer"
    wait_idle(routed, within=10.0)


# ---- keys and limits ---------------------------------------------------------------------------------


def test_api_keys(routed):
    chat = routed.v1 + "/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.get(routed.base_url + "/health").status_code == 200  # open for probes
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}):
        response = httpx.post(chat, json=body, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(chat, json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        routed.client(api_key="sk-wrong").models.list()
    assert GATEWAY_KEY not in routed.log() and "sk-wrong" not in routed.log()


def test_rate_limit_per_key(routed):
    limited = routed.client(api_key=LIMITED_KEY)
    limited.models.list()
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as error:
        limited.models.list()
    assert error.value.code == "rate_limit_exceeded"
    assert int(error.value.response.headers["retry-after"]) >= 1
    routed.client(api_key=GATEWAY_KEY).models.list()  # other keys are not affected


# ---- the simple case: env vars only, the other HTTP client ----------------------------------------


def test_env_only_fallback_through_the_httpx_client(tmp_path, upstream):
    """No config file: a local model that failed to load falls back to LLM_FALLBACK_BASE_URL."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    env = {
        "LLM_MODEL": str(broken), "LLM_FALLBACK_BASE_URL": upstream.base_url("env-ok"),
        "LLM_FALLBACK_API_KEY_ENV": "FALLBACK_KEY", "FALLBACK_KEY": "sk-upstream", "LLM_HTTP_CLIENT": "httpx",
    }  # fmt: skip
    server = start_server(tmp_path, env, wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while server.health()["models"][0]["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.1)
        client = server.client()
        headers, reply = ask(client, "broken")
        assert headers["x-llm-target"] == "fallback"
        assert reply.choices[0].message.content == "from env-ok"
        headers, text = stream_text(client, "broken")
        assert (headers["x-llm-target"], text) == ("fallback", "from env-ok upstream")
        assert [m.id for m in client.models.list().data] == ["broken"]
    finally:
        server.stop()
