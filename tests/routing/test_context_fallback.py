"""A prompt too long for a target's context window moves on to the next target of its chain, whether the local
engine (a SmolLM2 with a small window) or a provider (the test server, answering as OpenAI, vLLM or llama-server do)
says so; when no target can hold it, the client gets the 400 of the last one that said so.
"""

from __future__ import annotations

import openai
import pytest

from tests.routing.test_failover import configured
from tests.routing.test_routing import counter, stream_text

KEY = "sk-context-key"
WINDOW = 96  # tokens of the small local target: a short question fits, LONG does not
SHORT = [{"role": "user", "content": "Name a colour."}]
LONG = [{"role": "user", "content": "Please read these words and name a colour. " + "words " * 120}]
PROVIDER_SHAPES = ["ctxopenai", "ctxvllm", "ctxllama"]


def context_config(upstream) -> dict:
    def remote(name: str) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "upstream-model"}

    targets = {
        "small": {"type": "local", "context_length": WINDOW, "parallel": 1},
        "large": remote("large-ok"),
        "also-small": remote("x-ctxopenai"),
        **{shape: remote(f"p-{shape}") for shape in PROVIDER_SHAPES},
    }
    chains = {
        "small-then-large": ["small", "large"],
        "none-holds-it": ["small", "also-small"],
        **{f"{shape}-then-small": [shape, "small"] for shape in PROVIDER_SHAPES},
    }
    models = {name: {"targets": chain} for name, chain in chains.items()}
    return {"targets": targets, "models": models, "api_keys": [{"key": KEY}]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    server = configured(tmp_path_factory, "context", context_config(upstream))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return gateway.client(api_key=KEY)


def ask(client: openai.OpenAI, model: str, messages: list[dict]):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
    return raw.headers["x-llm-target"], raw.parse()


def test_a_prompt_too_long_for_the_local_window_is_served_by_the_next_target(client, gateway, upstream):
    assert ask(client, "small-then-large", SHORT)[0] == "small"  # what fits stays local
    target, reply = ask(client, "small-then-large", LONG)
    assert target == "large" and reply.choices[0].message.content == "from large-ok"
    headers, text = stream_text(client, "small-then-large", messages=LONG)
    assert headers["x-llm-target"] == "large" and text == "from large-ok upstream"
    assert counter(gateway, "llm_fallbacks", from_target="small", to_target="large") == 2
    small = gateway.health()["targets"]["small"]
    assert small["state"] == "ok" and small["consecutive_failures"] == 0  # no fault of the target's


@pytest.mark.parametrize("shape", PROVIDER_SHAPES)
def test_a_providers_context_error_moves_on_in_each_servers_shape(client, upstream, shape):
    target, reply = ask(client, f"{shape}-then-small", SHORT)
    assert target == "small" and reply.choices[0].message.content
    assert upstream.hits[f"p-{shape}"] == 1  # not retried there


def test_when_no_target_can_hold_the_prompt_the_last_ones_400_comes_back(client):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "none-holds-it", LONG)
    assert error.value.code == "context_length_exceeded"
    assert error.value.response.headers["x-llm-target"] == "also-small"
    assert error.value.response.headers["x-should-retry"] == "false"
