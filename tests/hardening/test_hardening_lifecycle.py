"""A model is never freed while anything uses it, and tokenizing is bounded, on real gateways.

Freeing a llama.cpp model while a thread still tokenizes a prompt with its vocabulary kills the process. Here a
long prompt keeps a thread tokenizing for over a second: unload (by a request, or by the idle sweep) waits for
it, also after the request that started it timed out or its client went away. A prompt whose bytes or special
tokens cannot fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import ENGINES, IDLE_WITHIN, MODEL, require, start_server, wait_for, wait_for_state

CTX = 16384
# 81 bytes, one token each (SmolLM2's longest piece: a newline and 80 spaces), and the slowest text to tokenize
# found: a prompt of nearly a whole context of them keeps a thread busy for over a second on a 2-core machine.
SLOW_PIECE = "\n" + " " * 80
LONGEST_PIECE_BYTES = 81
SETTINGS = {"LLM_CTX": str(CTX), "LLM_PARALLEL": "1", "LLM_EMBEDDING": "false"}
SLOW_TOKENIZING_S = 0.3  # the least a slow prompt must take for the test to mean anything
HEALTH_BOUND_S = 0.5  # the longest /health may take while another request is refused or tokenized
RACE_MARGIN_S = 0.3  # from the server's answer to a request until its client thread has read it, at most


def slow_chat() -> dict:
    """A prompt that fits the byte check but takes over a second to tokenize; asking for `CTX` tokens more, it is
    refused (400) once tokenized, so the request ends when its tokenizing does."""
    content = SLOW_PIECE * (CTX - 20)
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": CTX}


def unload(server) -> httpx.Response:
    return httpx.post(f"{server.v1}/models/{MODEL}/unload", timeout=30)


def load(server) -> None:
    assert httpx.post(f"{server.v1}/models/{MODEL}/load", timeout=120).json()["state"] == "ready"


def in_background(work) -> tuple[threading.Thread, dict]:
    """Run `work()` on a thread; its result (or error) and when it ended land in the returned dict."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as error:  # noqa: BLE001 (reported by the test that reads it)
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def result_of(outcome: dict):
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def unload_until_done(server, thread: threading.Thread) -> list[tuple[float, httpx.Response]]:
    """POST unload every 20 ms while `thread` runs: each answer and when it was asked for."""
    answers = []
    while thread.is_alive():
        asked = time.monotonic()
        answers.append((asked, unload(server)))
        time.sleep(0.02)
    return answers


def assert_model_busy(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "model_busy" and error["param"] == "model"


def unload_once_free(server, within: float, what: str) -> None:
    """POST unload until it succeeds; every answer before is 409 model_busy."""

    def unloaded() -> bool:
        response = unload(server)
        if response.status_code != 200:
            assert_model_busy(response)
        return response.status_code == 200

    wait_for(unloaded, within, what, interval=0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    instance = start_server(tmp_path_factory.mktemp("hardening-lifecycle"), SETTINGS)
    yield instance
    instance.stop()


def test_unload_waits_for_a_prompt_being_tokenized(server):
    load(server)
    started = time.monotonic()
    thread, outcome = in_background(
        lambda: httpx.post(server.v1 + "/chat/completions", json=slow_chat(), timeout=120)
    )
    time.sleep(0.2)  # the request has arrived and is being tokenized (which takes about a second)
    answers = unload_until_done(server, thread)
    response = result_of(outcome)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert outcome["ended"] - started > SLOW_TOKENIZING_S  # it did tokenize for a while
    # Asked well before the client had its answer (an unload asked as the server sends it may succeed).
    during = [answer for asked, answer in answers if asked < outcome["ended"] - RACE_MARGIN_S]
    assert len(during) >= 3, answers
    for answer in during:  # never freed under the tokenizer thread
        assert_model_busy(answer)
    assert server.process.poll() is None
    after = unload(server)
    assert after.status_code == 200 and after.json()["state"] == "unloaded"


def test_a_stream_holds_the_model_until_it_ends_or_its_client_leaves(server):
    load(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**body, "max_tokens": 2000}, timeout=60) as left:
        lines = left.iter_lines()  # kept: once collected, it closes the connection
        assert next(lines).startswith("data:")
        assert_model_busy(unload(server))  # streaming
    unload_once_free(server, IDLE_WITHIN, "still held after its client left")  # its stream is closed
    load(server)
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**body, "max_tokens": 3}, timeout=60) as read:
        assert list(read.iter_lines())[-2:] == ["data: [DONE]", ""]
    assert unload(server).status_code == 200  # read to its end


@pytest.mark.parametrize("how", ["deadline", "client_gone"])
def test_a_cancelled_request_holds_the_model_until_its_thread_ends(server, how):
    """The request ends (504, or its client leaves) while its prompt is still being tokenized: the model stays
    loaded until that thread is done, then unloads."""
    load(server)
    started = time.monotonic()
    if how == "deadline":
        headers = {"x-request-timeout": "0.3"}
        response = httpx.post(server.v1 + "/chat/completions", json=slow_chat(), headers=headers, timeout=120)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.v1 + "/chat/completions", json=slow_chat(), timeout=httpx.Timeout(120, read=0.3))
    assert time.monotonic() - started < 1.0
    assert_model_busy(unload(server))  # the request is over; its thread is not
    unload_once_free(server, 60, "still busy after the request ended")
    assert server.process.poll() is None
    assert server.model_state() == "unloaded"


@pytest.mark.parametrize(
    "endpoint, body, param",
    [
        # More bytes than a whole context of the longest token covers (under the limit on characters).
        ("chat/completions", {"messages": [{"role": "user", "content": "x" * (LONGEST_PIECE_BYTES * CTX + 1)}]},
         "messages"),
        # 10 bytes a special token: the bytes would fit, the special tokens (one token each) do not. (llama.cpp
        # cuts them out of a text in time growing with the square of their number.)
        ("chat/completions", {"messages": [{"role": "user", "content": "<|im_end|>" * 20_000}]}, "messages"),
        ("completions", {"prompt": "é" * (LONGEST_PIECE_BYTES * CTX // 2 + 1)}, "prompt"),
    ],
    ids=["bytes", "special_tokens", "completion_bytes"],
)  # fmt: skip
def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server, endpoint, body, param):
    load(server)
    assert_refused_before_tokenizing(server, endpoint, body, param, CTX)


def test_the_transformers_engine_refuses_a_prompt_that_cannot_fit_before_tokenizing(tmp_path):
    require(ENGINES["transformers"])
    settings = {"LLM_CTX": "2048", "LLM_PARALLEL": "1", "LLM_EMBEDDING": "false", "LLM_EMBEDDING_MODEL": "none"}
    hf = start_server(tmp_path, settings, engine=ENGINES["transformers"])
    try:
        content = "x" * (LONGEST_PIECE_BYTES * 2048 + 1)
        assert_refused_before_tokenizing(hf, "chat/completions", {"messages": [{"role": "user", "content": content}]},
                                         "messages", 2048)  # fmt: skip
        assert_refused_before_tokenizing(hf, "completions", {"prompt": content}, "prompt", 2048)
    finally:
        hf.stop()


def assert_refused_before_tokenizing(server, endpoint: str, body: dict, param: str, context: int) -> None:
    """A 400 `context_length_exceeded` within a second, from the check before tokenizing; /health answers
    meanwhile."""
    thread, outcome = in_background(
        lambda: httpx.post(f"{server.v1}/{endpoint}", json={"model": MODEL, "max_tokens": 1, **body}, timeout=60)
    )
    started = time.monotonic()
    slowest_health = 0.0
    while thread.is_alive():
        asked = time.monotonic()
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        slowest_health = max(slowest_health, time.monotonic() - asked)
    response = result_of(outcome)
    assert outcome["ended"] - started < 1.0
    assert slowest_health < HEALTH_BOUND_S
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert f"maximum context length is {context} tokens" in error["message"]
    assert "would take at least" in error["message"]  # refused by the check before tokenizing
    log = server.log()
    assert not any(piece in log for piece in ("<|im_end|>" * 2, "x" * 64, "é" * 64))  # nothing of the prompt


def test_the_idle_sweep_never_unloads_under_a_prompt_being_tokenized(tmp_path):
    """Idle for 0.2 s unloads (the sweep runs every 0.05 s); a prompt tokenized for longer holds the model. The
    request loads the model (the sweep has unloaded it since start-up), then tokenizes."""
    idle = start_server(tmp_path, {**SETTINGS, "LLM_UNLOAD_AFTER_SECONDS": "0.2"})
    try:
        wait_for_state(idle, "unloaded", within=30)
        thread, outcome = in_background(
            lambda: httpx.post(idle.v1 + "/chat/completions", json=slow_chat(), timeout=120)
        )
        states = []  # (when, state) while the request runs
        while thread.is_alive():
            state = idle.model_state()
            states.append((time.monotonic(), state))
            time.sleep(0.05)
        assert result_of(outcome).status_code == 400
        states = [(at, state) for at, state in states if at < outcome["ended"] - RACE_MARGIN_S]
        ready = [i for i, (_, state) in enumerate(states) if state == "ready"]
        assert ready, states
        held = states[ready[0] :]
        assert {state for _, state in held} == {"ready"}, states  # once loaded, never unloaded under the request
        assert held[-1][0] - held[0][0] > 0.2 + SLOW_TOKENIZING_S  # well past the idle timeout and a sweep
        assert idle.process.poll() is None
        wait_for_state(idle, "unloaded", within=30)  # idle again: the sweep does unload it
    finally:
        idle.stop()
