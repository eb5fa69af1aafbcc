"""Hardening of request limits and bodies, against a real gateway with the real model.

Every limit on what one request may hold answers with the OpenAI error shape and a status that names the problem
(413 for the body as a whole, 400 naming the parameter, 415 for a body that is not JSON) before any tokenizing,
while other clients are served: a concurrent GET /health answers within HEALTH_BOUND, the process lives, and
nothing of the request reaches the log.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from typing import Callable, TypeVar

import httpx
import openai
import pytest

from tests.conftest import MODEL, Server, start_server

T = TypeVar("T")
HEALTH_BOUND = 0.5  # seconds a /health may take while an attack is being refused, on a loaded 2-core machine
MARKER = f"secret-{uuid.uuid4().hex}"  # request content that must never reach the log
HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory) -> Server:
    """A gateway with the default limits."""
    server = start_server(tmp_path_factory.mktemp("limits"))
    yield server
    server.stop()


def while_probing(server: Server, attack: Callable[[], T]) -> tuple[T, float]:
    """What `attack` returns, run on a thread, and the slowest of the GET /health answers sent meanwhile (at least
    five, so some are in flight while the gateway works on the attack)."""
    slowest, probes = 0.0, 0
    with httpx.Client(base_url=server.base_url, timeout=30) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        client.get("/health")  # connected before the attack starts
        pending = pool.submit(attack)
        while not pending.done() or probes < 5:
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            slowest, probes = max(slowest, time.monotonic() - started), probes + 1
        return pending.result(), slowest


def assert_refused(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    if code is not None:
        assert error["code"] == code
    assert MARKER not in response.text


def post(server: Server, path: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.v1 + path, content=content, headers=JSON, timeout=timeout)


def test_a_body_over_the_limit_is_refused_before_it_is_read(defaults):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": MARKER * 1_400_000}]}).encode()  # 56 MB
    started = time.monotonic()
    response, slowest = while_probing(defaults, lambda: post(defaults, "/chat/completions", body))
    assert_refused(response, 413, None, "request_too_large")
    assert time.monotonic() - started < 10
    assert slowest < HEALTH_BOUND
    assert defaults.process.poll() is None


def test_a_chunked_body_is_cut_off_at_the_limit(defaults):
    """No length declared: the gateway counts what arrives and answers 413 once past the limit."""

    def chunks():
        for _ in range(60):
            yield MARKER.encode() * 25_000  # 60 chunks of ~1 MB

    response, slowest = while_probing(defaults, lambda: httpx.post(defaults.v1 + "/chat/completions", content=chunks(),
                                                                  headers=JSON, timeout=60))  # fmt: skip
    assert_refused(response, 413, None, "request_too_large")
    assert slowest < HEALTH_BOUND


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain;charset=UTF-8"},  # fetch() with a string body
        {"content-type": "application/x-www-form-urlencoded"},  # an HTML form, and curl -d
        {"content-type": "multipart/form-data; boundary=x"},
        {},  # fetch() with a Blob body names no type
    ],
)
def test_bodies_that_are_not_json_get_415(defaults, headers):
    """What a web page may send cross-site without a CORS preflight is never read as JSON."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": MARKER}], "max_tokens": 1})
    response = httpx.post(defaults.v1 + "/chat/completions", content=body, headers=headers, timeout=60)
    assert_refused(response, 415, None, "unsupported_content_type")
    unload = httpx.post(defaults.v1 + f"/models/{MODEL}/unload", content=body, headers=headers, timeout=60)
    assert_refused(unload, 415, None, "unsupported_content_type")  # every route, not only the model endpoints
    assert defaults.health()["models"][0]["state"] == "ready"


def test_json_with_a_charset_is_json(defaults):
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 1})
    headers = {"content-type": "application/json; charset=utf-8"}
    assert httpx.post(defaults.v1 + "/chat/completions", content=body, headers=headers, timeout=60).status_code == 200


def test_too_many_messages_are_refused_before_tokenizing(defaults):
    messages = [{"role": "user", "content": MARKER}] * 100_000
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 1}).encode()  # not on the probes' time
    started = time.monotonic()
    response, slowest = while_probing(defaults, lambda: post(defaults, "/chat/completions", body))
    assert_refused(response, 400, "messages")
    assert time.monotonic() - started < 3  # 7 MB sent, parsed only as far as the 2,049th message
    assert slowest < HEALTH_BOUND
    assert defaults.process.poll() is None


def test_logit_bias_is_capped_and_its_keys_are_token_ids(defaults):
    client = defaults.client(timeout=60)
    for logit_bias in ({str(i): 1 for i in range(301)}, {"hello": 5}, {"-1": 5}, {"1.5": 5}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, logit_bias=logit_bias)
        assert refused.value.body["param"] == "logit_bias", logit_bias
    allowed = {str(i): -1 for i in range(300)}
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, logit_bias=allowed).choices


def test_a_million_logit_bias_entries_do_not_stall_the_gateway(defaults):
    body = json.dumps({"model": MODEL, "messages": HI, "logit_bias": {str(i): 1 for i in range(1_000_000)}}).encode()
    response, slowest = while_probing(defaults, lambda: post(defaults, "/chat/completions", body))
    assert_refused(response, 413, None, "request_too_large")  # more JSON values than any request needs
    assert slowest < HEALTH_BOUND


def test_prompts_times_n_are_capped(defaults):
    client = defaults.client(timeout=60)
    started = time.monotonic()

    def attack():
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt=[MARKER] * 200, n=128, max_tokens=1)
        return refused.value

    error, slowest = while_probing(defaults, attack)
    assert (error.status_code, error.body["param"]) == (400, "prompt")
    assert time.monotonic() - started < 2
    assert slowest < HEALTH_BOUND
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt=["a", "b", "c"], n=43, max_tokens=1)  # 129 sequences
    assert refused.value.body["param"] == "n"
    assert len(client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=1).choices) == 4


def test_embedding_inputs_are_capped(defaults):
    client = defaults.client(timeout=60)
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=[MARKER] * 2049)
    assert refused.value.body["param"] == "input"
    assert time.monotonic() - started < 2  # refused before the engine embeds any of them
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input=[[1] * 1000] * 301)  # 301,000 token ids
    assert refused.value.body["param"] == "input"


def test_the_log_holds_no_request_content(defaults):
    """Run after the attacks above: none of them put what it sent into the log."""
    assert '"status": 413' in defaults.log()  # the attacks were logged, with their outcome only
    assert MARKER not in defaults.log()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Server:
    """A gateway whose limits are all set low, so each can be met exactly and passed by one."""
    env = {"LLM_MAX_BODY_BYTES": "4096", "LLM_MAX_JSON_VALUES": "200", "LLM_MAX_MESSAGES": "3",
           "LLM_MAX_PROMPT_CHARS": "40", "LLM_MAX_LOGIT_BIAS": "2", "LLM_MAX_CHOICES": "4",
           "LLM_MAX_EMBEDDING_INPUTS": "2", "LLM_MAX_INPUT_TOKENS": "10", "LLM_MAX_STOP_CHARS": "5"}  # fmt: skip
    server = start_server(tmp_path_factory.mktemp("small-limits"), env)
    yield server
    server.stop()


BODIES = {
    "/chat/completions": {"model": MODEL, "messages": HI, "max_tokens": 1},
    "/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/embeddings": {"model": MODEL},
}


def parts(count: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "a"}] * count}]


def texts(*lengths: int) -> list[dict]:
    return [{"role": "user", "content": "a" * length} for length in lengths]


@pytest.mark.parametrize(
    ("path", "allowed", "refused", "param"),
    [
        ("/chat/completions", {"messages": HI * 3}, {"messages": HI * 4}, "messages"),
        ("/chat/completions", {"messages": parts(3)}, {"messages": parts(4)}, "messages[0].content"),
        ("/chat/completions", {"messages": texts(40)}, {"messages": texts(20, 21)}, "messages"),
        ("/chat/completions", {"logit_bias": {"1": 1, "2": 1}}, {"logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias"),
        ("/chat/completions", {"n": 4}, {"n": 5}, "n"),
        ("/chat/completions", {"stop": ["abcde"]}, {"stop": ["abcdef"]}, "stop"),
        ("/completions", {"prompt": ["a", "b"], "n": 2}, {"prompt": ["a", "b"], "n": 3}, "n"),
        ("/completions", {"prompt": [1] * 10}, {"prompt": [1] * 11}, "prompt"),
        ("/completions", {"prompt": [[1] * 5, [2] * 5]}, {"prompt": [[1] * 5, [2] * 6]}, "prompt"),
        ("/embeddings", {"input": ["a", "b"]}, {"input": ["a", "b", "c"]}, "input"),
        ("/embeddings", {"input": ["a" * 20, "b" * 20]}, {"input": ["a" * 20, "b" * 21]}, "input"),
        ("/embeddings", {"input": [[1] * 5, [2] * 5]}, {"input": [[1] * 5, [2] * 6]}, "input"),
    ],
)
def test_each_limit_is_its_setting(small, path, allowed, refused, param):
    """Met exactly, a limit lets the request through; passed by one, it is a 400 naming the parameter."""
    answer = post(small, path, {**BODIES[path], **allowed})
    assert answer.status_code == 200, answer.text
    assert_refused(post(small, path, {**BODIES[path], **refused}), 400, param)


def test_the_body_limits_are_settings(small):
    chat = BODIES["/chat/completions"]
    assert post(small, "/chat/completions", {**chat, "user": "a" * 3900}).status_code == 200
    assert_refused(post(small, "/chat/completions", {**chat, "user": "a" * 4100}), 413, None, "request_too_large")
    assert_refused(post(small, "/chat/completions", {**chat, "stop": [""] * 200}), 413, None, "request_too_large")


def test_openapi_shows_the_limits(small):
    schemas = small.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 3
