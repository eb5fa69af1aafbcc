"""Routing, fallback, retries, cooldowns, timeouts, queues and keys, against real HTTP upstreams.

One gateway (`routed`) is configured from a YAML file: its local SmolLM2 engine (one slot, no waiting
room), a second real gateway (`peer`, which wants its own key), and targets on a misbehaving server
started here (tests/upstream.py) that refuses, fails, stalls or cuts streams.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HTTP_TIMEOUT, MODEL, free_port, start_server, wait_for, wait_for_state, wait_until_idle
from tests.upstream import Upstream

GATEWAY_KEY = "sk-right-key-for-tests"
LIMITED_KEY = "sk-limited-key"
PEER_KEY = "sk-peer-secret"
COOLDOWN = 3.0
LONG = {"max_tokens": 3000, "ignore_eos": True}
TOKENS_PER_MINUTE = {"sk-tpm-usage": 20, "sk-tpm-deltas": 12, "sk-tpm-local": 100}  # key -> its limit


def routing_config(upstream: Upstream, peer_url: str) -> dict:
    def remote(name: str, **extra) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "upstream-model", **extra}

    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    targets = {
        "local": {"type": "local", "parallel": 1, "max_waiting": 0},
        "peer": {"type": "openai", "base_url": peer_url, "model": MODEL, "api_key_env": "PEER_KEY"},
        "refused": {"type": "openai", "base_url": closed, "model": "x"},
        **{name: remote(name) for name in ["a-500", "b-500", "c-429", "d-400", "e-cut3", "f-fail2", "breaker-ok",
                                           "k-500", "l-500", "m-empty"]},
        "stalled": remote("g-stall", read_timeout=1),
        "slow": remote("h-stall"),  # outlasts a short request timeout
        "echo-tools": remote("i-tools"),
        "no-usage": remote("j-nousage"),
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
        "empty-then-local": ["m-empty", "local"],
        "flaky": ["f-fail2"],
        "all-down": ["refused", "b-500"],
        "breaker-then-spare": ["breaker-ok", "spare"],
        "soon-all-cooling": ["k-500", "l-500"],
        "slow-only": ["slow"],
        "tools-anywhere": ["local", "echo-tools"],
        "first-token": ["good"],
        "usage-stream": ["good"],
        "no-usage-stream": ["no-usage"],
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
                     {"key": LIMITED_KEY, "name": "limited", "requests_per_minute": 2},
                     *({"key": key, "tokens_per_minute": limit} for key, limit in TOKENS_PER_MINUTE.items())],
    }  # fmt: skip


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


def stream_chunks(client: openai.OpenAI, model: str, **extra) -> tuple[httpx.Headers, list]:
    """A streamed chat completion through the SDK: its headers and every chunk."""
    extra.setdefault("messages", [{"role": "user", "content": "hi"}])
    with client.chat.completions.with_streaming_response.create(
        model=model, max_tokens=extra.pop("max_tokens", 4), stream=True, **extra
    ) as response:
        return response.headers, list(response.parse())


def stream_text(client: openai.OpenAI, model: str, **extra) -> tuple[httpx.Headers, str]:
    headers, chunks = stream_chunks(client, model, **extra)
    return headers, "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def hits(upstream: Upstream, name: str) -> int:
    return upstream.hits[name]


def sample(server, name: str, **labels: str) -> float:
    """A sample from the gateway's /metrics (0 when it has not been recorded yet)."""
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for found in family.samples:
            if found.name == name and labels.items() <= found.labels.items():
                return found.value
    return 0.0


def counter(server, name: str, **labels: str) -> float:
    return sample(server, name + "_total", **labels)


def access_line(server, model: str) -> dict:
    """The access-log record of the one request for `model` (written just after its response ended)."""

    (line,) = wait_for(lambda: [line for line in server.access_log() if line.get("model") == model], 10,
                       f"no access-log line for {model}")  # fmt: skip
    return line


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


def test_a_stream_that_ends_before_its_first_chunk_falls_back(client):
    headers, text = stream_text(client, "empty-then-local")
    assert headers["x-llm-target"] == "local" and text


def test_all_targets_failing_gives_a_final_error_that_says_do_not_retry(client):
    with pytest.raises(openai.InternalServerError) as error:
        ask(client, "all-down")
    assert error.value.response.headers["x-should-retry"] == "false"
    assert error.value.response.headers["x-llm-target"] == "b-500"
    assert error.value.body["code"] == "upstream_500"


def test_a_failing_target_cools_down_is_skipped_and_recovers(client, routed, upstream):
    control = f"http://127.0.0.1:{upstream.port}/control/breaker-ok"
    httpx.put(control, json={"mode": "500"}, timeout=HTTP_TIMEOUT)
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "spare"
    target = routed.health()["targets"]["breaker-ok"]
    assert target["state"] == "cooling" and target["cooldown_remaining_s"] > 0
    assert counter(routed, "llm_cooldowns", target="breaker-ok") == 1
    tried = hits(upstream, "breaker-ok")
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "spare"
    assert hits(upstream, "breaker-ok") == tried  # skipped while cold
    httpx.put(control, json={"mode": "ok"}, timeout=HTTP_TIMEOUT)
    time.sleep(COOLDOWN + 0.5)
    assert ask(client, "breaker-then-spare")[0]["x-llm-target"] == "breaker-ok"
    assert routed.health()["targets"]["breaker-ok"]["state"] == "ok"


def test_when_every_target_is_cooling_down_the_answer_is_503_targets_unavailable(client, upstream):
    with pytest.raises(openai.InternalServerError) as first:
        ask(client, "soon-all-cooling")  # three tries on each: both cool down
    assert first.value.body["code"] == "upstream_500"
    tried = hits(upstream, "k-500"), hits(upstream, "l-500")
    assert tried == (3, 3)
    with pytest.raises(openai.InternalServerError) as error:
        ask(client, "soon-all-cooling")
    assert (error.value.status_code, error.value.body["code"], error.value.body["type"]) == (
        503, "targets_unavailable", "server_error")  # fmt: skip
    headers = error.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= math.ceil(COOLDOWN) and headers["x-should-retry"] == "false"
    assert "x-llm-target" not in headers  # no target was tried
    assert (hits(upstream, "k-500"), hits(upstream, "l-500")) == tried


# ---- timeouts, disconnects, queues -------------------------------------------------------------------


def test_timeout_gives_504_and_frees_the_engine(client, routed):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as error:
        ask(client, "local-only", extra_body={"timeout": 1, "ignore_eos": True}, max_tokens=3000)
    assert error.value.status_code == 504
    assert error.value.response.headers["x-llm-target"] == "local"
    assert time.monotonic() - started < 10
    wait_until_idle(routed)
    response = httpx.post(
        routed.v1 + "/chat/completions",
        json={"model": "local-only", "messages": [{"role": "user", "content": "hi"}], **LONG},
        headers={"Authorization": f"Bearer {GATEWAY_KEY}", "x-request-timeout": "1"},
        timeout=30,
    )  # fmt: skip
    assert (response.status_code, response.headers["x-llm-target"]) == (504, "local")
    assert response.json()["error"]["type"] == "timeout_error"
    wait_until_idle(routed)


def test_a_stalled_local_engine_is_passed_over_for_the_next_target(tmp_path, upstream):
    """A local engine inside one step for longer than LLM_STALL_AFTER is skipped: without that, a request would
    wait behind the step past its deadline and never reach the fallback. Here the step is a real 500-token
    embedding and the limit 50 ms; the embedding itself still completes."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {"local": {"type": "local"},
                    "cloud": {"type": "openai", "base_url": upstream.base_url("stallcloud-ok"), "model": "m"}},
        "models": {MODEL: {"targets": ["local", "cloud"]}},
    }))  # fmt: skip
    server = start_server(tmp_path, {"LLM_CONFIG": str(config), "LLM_STALL_AFTER": "0.05"})
    try:
        done = []
        embedding = threading.Thread(target=lambda: done.append(
            server.client().embeddings.create(model=MODEL, input=[[100 + i for i in range(500)]])
        ))  # fmt: skip
        embedding.start()
        while embedding.is_alive() and server.health()["status"] != "stalled":
            time.sleep(0.01)
        headers, reply = ask(server.client(), MODEL)
        assert headers["x-llm-target"] == "cloud"
        assert reply.choices[0].message.content == "from stallcloud-ok"
        assert embedding.is_alive()  # the answer did not wait for the step to end
        embedding.join()
        assert len(done[0].data[0].embedding) > 0
    finally:
        server.stop()


def test_a_remote_target_outlasting_the_deadline_gives_504_naming_it(client, routed):
    with pytest.raises(openai.APIStatusError) as error:
        ask(client, "slow-only", extra_body={"timeout": 1})
    assert error.value.status_code == 504
    assert error.value.response.headers["x-llm-target"] == "slow"
    body = {"model": "slow-only", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "x-request-timeout": "1"}
    response = httpx.post(routed.v1 + "/chat/completions", json=body, headers=headers, timeout=30)
    assert (response.status_code, response.headers["x-llm-target"]) == (504, "slow")
    assert response.json()["error"]["code"] == "timeout"


def test_a_deadline_passing_mid_stream_ends_it_with_a_timeout_event_and_frees_the_engine(routed):
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "x-request-timeout": "4"}  # the first token comes sooner
    body = {"model": "local-only", "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", routed.v1 + "/chat/completions", json={**body, **LONG}, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < 15  # 3000 tokens take minutes on this machine
    assert any('"content":"' in event for event in events[:-2])
    assert json.loads(events[-2])["error"]["type"] == "timeout_error"
    assert events[-1] == "[DONE]"
    wait_until_idle(routed)


def test_a_client_too_slow_to_send_its_body_gets_408(routed):
    host, port = routed.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\nx-request-timeout: 1\r\nx-api-key: " + GATEWAY_KEY.encode() + b"\r\n\r\n"
            + b'{"model": "small",'
        )  # and the remaining bytes never come
        started = time.monotonic()
        reply = b""
        while b'"code"' not in reply and (chunk := sock.recv(4096)):  # headers and body may come apart
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408")
    assert '"code":"timeout"' in reply
    assert time.monotonic() - started < 10


def test_a_client_leaving_before_its_body_is_sent_is_logged_as_499_without_an_error(routed):
    request_id = "left-mid-body"
    host, port = routed.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\nx-request-id: " + request_id.encode() + b"\r\nx-api-key: "
            + GATEWAY_KEY.encode() + b"\r\n\r\n" + b'{"model": "small",'
        )
        time.sleep(0.3)  # the gateway is waiting for the rest of the body
    wait_for(lambda: any(line.get("request_id") == request_id for line in routed.access_log()), 10, "no access line")
    lines = [json.loads(line) for line in routed.log().splitlines() if request_id in line]
    assert [line["status"] for line in lines if line.get("message") == "request"] == [499]
    assert all(line["level"] == "info" for line in lines)  # no unexpected error, no traceback


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
        wait_until_idle(engine_host)


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
    wait_until_idle(routed)


# ---- what only remote providers can do ----------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
CONVERSATION = [
    {"role": "user", "content": [
        {"type": "text", "text": "What is the weather where this photo was taken?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
]  # fmt: skip
TOOL_REQUEST = {
    "messages": CONVERSATION, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": {"type": "object"}}},
}  # fmt: skip


def assert_forwarded_unchanged(received: dict, stream: bool) -> None:
    for field, value in TOOL_REQUEST.items():
        assert received[field] == value, field
    assert (received["model"], received.get("stream", False)) == ("upstream-model", stream)


def test_tools_reach_a_remote_target_unchanged_and_its_tool_calls_come_back(client, routed):
    raw = client.chat.completions.with_raw_response.create(model="tools-anywhere", max_tokens=3, **TOOL_REQUEST)
    assert raw.headers["x-llm-target"] == "echo-tools"  # the local model cannot read the image: the chain moved on
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name) == ("call_echo", "get_weather")
    assert_forwarded_unchanged(json.loads(call.function.arguments), stream=False)

    headers, chunks = stream_chunks(client, "tools-anywhere", **TOOL_REQUEST)
    assert headers["x-llm-target"] == "echo-tools"
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert (calls[0].id, calls[0].function.name) == ("call_echo", "get_weather")
    assert_forwarded_unchanged(json.loads("".join(c.function.arguments for c in calls)), stream=True)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # Not reading images is no failure of the local model: nothing counts towards its cooldown.
    assert routed.health()["targets"]["local"]["consecutive_failures"] == 0


HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "sql"}}]}, "tools[0]"),
        ({"modalities": ["text"]}, "modalities"),
        ({"messages": CONVERSATION}, "messages[0].content[1]"),
        ({"messages": [HI, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "custom", "custom": {"name": "sql", "input": "select 1"}}]}]},
         "messages[1].tool_calls[0]"),
        ({"messages": [HI, {"role": "assistant", "content": "no", "refusal": "no"}]}, "messages[1].refusal"),
    ],
)
def test_a_local_only_model_answers_400_naming_what_it_cannot_do(client, change, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="local-only", max_tokens=3, **{"messages": [HI], **change})
    assert (error.value.code, error.value.param) == ("unsupported_parameter", param)
    assert error.value.response.headers["x-llm-target"] == "local"


# ---- keys and limits ---------------------------------------------------------------------------------


def test_api_keys(routed):
    chat = routed.v1 + "/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert routed.get("/health").status_code == 200  # open for probes
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


def streamed_until_limited(server, key: str, model: str, **extra) -> int:
    """How many streamed requests `key` gets through before its tokens-per-minute limit answers 429."""
    client = server.client(api_key=key)
    for admitted in range(20):
        try:
            stream_text(client, model, **extra)
        except openai.RateLimitError as error:
            assert error.code == "rate_limit_exceeded" and int(error.response.headers["retry-after"]) >= 1
            return admitted
    raise AssertionError(f"{key} was never limited")


@pytest.mark.parametrize(
    ("key", "model", "tokens"),
    [
        ("sk-tpm-usage", "usage-stream", 8),  # the usage the gateway asked the provider for: 3 prompt + 5
        ("sk-tpm-deltas", "no-usage-stream", 5),  # a provider that sends no usage: one per content delta
    ],
)
def test_remote_streams_charge_their_tokens_to_the_key(routed, key, model, tokens):
    # A key is admitted while what it was charged is under its limit: ceil(limit / tokens) requests.
    # Charging SSE events instead (6 per stream, the role chunk first) would let a different number through.
    assert streamed_until_limited(routed, key, model) == math.ceil(TOKENS_PER_MINUTE[key] / tokens)


def test_the_usage_the_gateway_asks_for_reaches_only_clients_that_asked(client, upstream):
    _, chunks = stream_chunks(client, "usage-stream")
    assert upstream.received["good-ok"]["stream_options"] == {"include_usage": True}
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    _, chunks = stream_chunks(client, "usage-stream", stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 8


def test_local_streams_charge_the_engine_s_token_counts(routed, client):
    same_tokens = {"extra_body": {"ignore_eos": True}}  # the same prompt and 4 tokens every time
    _, chunks = stream_chunks(client, "local-only", stream_options={"include_usage": True}, **same_tokens)
    tokens = chunks[-1].usage.total_tokens
    assert streamed_until_limited(routed, "sk-tpm-local", "local-only", **same_tokens) == math.ceil(100 / tokens)


def test_remote_streams_record_time_to_first_token(client, routed):
    stream_text(client, "first-token")
    labels = {"model": "first-token", "target": "good"}
    assert sample(routed, "llm_time_to_first_token_seconds_count", **labels) == 1
    assert sample(routed, "llm_time_to_first_token_seconds_sum", **labels) > 0
    line = access_line(routed, "first-token")
    assert line["target"] == "good" and line["latency_ms"] >= line["ttft_ms"] > 0
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 5)  # from the usage the gateway asked for


# ---- the simple case: env vars only, the other HTTP clients ---------------------------------------


@pytest.mark.parametrize("http_client", ["httpx", "aiohttp"])
def test_env_only_fallback_through_the_other_clients(tmp_path, upstream, http_client):
    """No config file: a local model that failed to load falls back to LLM_FALLBACK_BASE_URL, through the
    clients other than the default (which every other test here uses)."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    env = {
        "LLM_MODEL": str(broken), "LLM_FALLBACK_BASE_URL": upstream.base_url("env-ok"),
        "LLM_FALLBACK_API_KEY_ENV": "FALLBACK_KEY", "FALLBACK_KEY": "sk-upstream", "LLM_HTTP_CLIENT": http_client,
    }  # fmt: skip
    server = start_server(tmp_path, env, wait_ready=False)
    try:
        wait_for_state(server, "failed", "broken")
        client = server.client()
        headers, reply = ask(client, "broken")
        assert headers["x-llm-target"] == "fallback"
        assert reply.choices[0].message.content == "from env-ok"
        headers, text = stream_text(client, "broken")
        assert (headers["x-llm-target"], text) == ("fallback", "from env-ok upstream")
        assert [m.id for m in client.models.list().data] == ["broken"]
    finally:
        server.stop()
