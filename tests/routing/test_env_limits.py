"""The queue, the keys' rate limits and the timeout cap set by environment variables alone (no routing file), as
docs/routing.md describes them, on real gateways."""

from __future__ import annotations

import concurrent.futures
import math
import time

import httpx
import pytest

from tests.conftest import IDLE_WITHIN, MODEL, start_server, wait_for, wait_until_idle

KEYS = {"rpm": "sk-env-rpm", "other": "sk-env-other", "tpm": "sk-env-tpm", "body": "sk-env-body",
        "header": "sk-env-header"}  # fmt: skip
REQUESTS_PER_MINUTE = 3
TOKENS_PER_MINUTE = 50  # the chat template alone makes SmolLM2's prompts longer than 20 tokens
MAX_REQUEST_TIMEOUT = 2
LONG = {"max_tokens": 3000, "ignore_eos": True}  # minutes of decoding on these CPUs


def chat(server, key: str | None = None, headers: dict | None = None, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 3, **body}
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return server.post("/v1/chat/completions", json=body, headers={**auth, **(headers or {})})


def assert_refused(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    return error


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """One slot and room for one request to wait."""
    server = start_server(tmp_path_factory.mktemp("queued"), {"LLM_PARALLEL": "1", "LLM_MAX_QUEUE": "1"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    env = {
        "LLM_API_KEYS": ",".join(KEYS.values()), "LLM_RATE_LIMIT_RPM": str(REQUESTS_PER_MINUTE),
        "LLM_RATE_LIMIT_TPM": str(TOKENS_PER_MINUTE), "LLM_MAX_REQUEST_TIMEOUT": str(MAX_REQUEST_TIMEOUT),
    }  # fmt: skip
    server = start_server(tmp_path_factory.mktemp("keyed"), env)
    yield server
    server.stop()


def test_llm_max_queue_lets_that_many_wait_and_refuses_the_next(queued):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True, **LONG}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", queued.v1 + "/chat/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: a reader collected closes its connection
            assert next(lines).startswith("data: ")  # the one slot is taken
            waiting = pool.submit(chat, queued)
            wait_for(lambda: queued.health()["models"][0]["waiting"] == 1, IDLE_WITHIN, "no request waits")
            refused = chat(queued)
            assert_refused(refused, 503, "server_error", "engine_overloaded")
            assert refused.headers["Retry-After"] == "1"
            assert not waiting.done()
        # The stream's client left: the waiting request gets the slot.
        assert waiting.result(timeout=IDLE_WITHIN * 3).status_code == 200
    wait_until_idle(queued)


def test_llm_rate_limit_rpm_limits_each_key_of_llm_api_keys(keyed):
    for _ in range(REQUESTS_PER_MINUTE):
        assert keyed.get("/v1/models", headers={"x-api-key": KEYS["rpm"]}).status_code == 200
    refused = keyed.get("/v1/models", headers={"x-api-key": KEYS["rpm"]})
    assert_refused(refused, 429, "requests", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert keyed.get("/v1/models", headers={"x-api-key": KEYS["other"]}).status_code == 200  # a key of its own


def test_llm_rate_limit_tpm_charges_each_key_its_tokens(keyed):
    # The same prompt and 3 tokens each time: a key is admitted while it was charged less than its limit.
    first = chat(keyed, KEYS["tpm"], ignore_eos=True)
    assert first.status_code == 200, first.text
    tokens = first.json()["usage"]["total_tokens"]
    admitted = 1
    while (response := chat(keyed, KEYS["tpm"], ignore_eos=True)).status_code == 200:
        admitted += 1
    assert_refused(response, 429, "tokens", "rate_limit_exceeded")
    assert admitted == math.ceil(TOKENS_PER_MINUTE / tokens)
    listed = keyed.get("/v1/models", headers={"x-api-key": KEYS["tpm"]})  # no tokens, but the key has none left
    assert_refused(listed, 429, "tokens", "rate_limit_exceeded")


@pytest.mark.parametrize("asked", ["body", "header"])
def test_llm_max_request_timeout_caps_the_timeout_a_request_asks_for(keyed, asked):
    timeout = {"timeout": 600} if asked == "body" else {}
    headers = {"x-request-timeout": "600"} if asked == "header" else {}
    started = time.monotonic()
    response = chat(keyed, KEYS[asked], headers=headers, **LONG, **timeout)
    elapsed = time.monotonic() - started
    error = assert_refused(response, 504, "timeout_error", "timeout")
    assert error["message"] == f"The request timed out after {MAX_REQUEST_TIMEOUT}s."
    assert response.headers["x-llm-target"] == "local"
    assert MAX_REQUEST_TIMEOUT <= elapsed < 60, elapsed  # cut at the cap, far from the 600 s asked for
    wait_until_idle(keyed)
