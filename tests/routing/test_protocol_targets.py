"""Providers of other protocols, against real upstream servers (tests/upstream.py): a `type: anthropic` target serving
chat clients through the Messages translation, Messages and Responses requests sent natively to providers that speak
them, a Messages request translated for an OpenAI chat provider; and /tokenize's keys and routing.

One gateway (`routed`) with a key, its local SmolLM2 engine, a target that refuses connections (to fall back from),
and Anthropic, Responses and chat targets on the test upstream.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import yaml

from tests.conftest import MODEL, free_port, start_server
from tests.routing.test_routing import access_line, counter
from tests.upstream import ANTHROPIC_USAGE, COUNTED_TOKENS, RESPONSES_USAGE, Upstream

GATEWAY_KEY = "sk-protocols-key"
ANTHROPIC_KEY = "sk-ant-for-tests"
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}  # fmt: skip


def protocols_config(upstream: Upstream) -> dict:
    def claude(name: str) -> dict:
        return {"type": "anthropic", "base_url": upstream.anthropic_url(name), "model": "claude-upstream",
                "api_key_env": "ANTHROPIC_TEST_KEY"}  # fmt: skip

    def openai_target(name: str, **extra) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "gpt-upstream", **extra}

    targets = {
        "local": {"type": "local", "parallel": 1, "max_waiting": 0},
        "refused": {"type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "x"},
        "claude": claude("claude-anthropic"),
        "claude-tools": claude("tools-anthropictools"),
        "claude-flaky": claude("flaky-anthropicfail2"),
        "claude-denied": claude("denied-anthropic401"),
        "claude-strict": claude("strict-anthropic400"),
        "claude-overloaded": claude("overloaded-anthropicoverload"),
        "claude-spare": claude("spare-anthropic"),
        "claude-usage": claude("usage-anthropic"),
        "responses": openai_target("native-responses", responses_api=True),
        "responses-usage": openai_target("usage-responses", responses_api=True),
        "chat": openai_target("chat-ok"),
    }
    chains = {
        MODEL: ["local"],
        "via-claude": ["refused", "claude"],
        "local-then-claude": ["local", "claude"],
        "claude-only": ["claude"],
        "claude-tools": ["refused", "claude-tools"],
        "claude-flaky": ["claude-flaky"],
        "claude-denied": ["claude-denied"],
        "claude-strict": ["claude-strict"],
        "overloaded-then-claude": ["claude-overloaded", "claude-spare"],
        **{f"usage-claude-{form}": ["claude-usage"] for form in ("body", "stream")},
        "via-responses": ["refused", "responses"],
        **{f"usage-responses-{form}": ["responses-usage"] for form in ("body", "stream")},
        "via-chat": ["refused", "chat"],
    }
    return {
        "targets": targets,
        "models": {name: {"targets": chain} for name, chain in chains.items()},
        # Quick retries; the refused target never cools down, so every request falls back from it.
        "retry": {"attempts": 3, "backoff_initial": 0.05, "backoff_max": 0.2, "failures_to_cool": 1000},
        "api_keys": [{"key": GATEWAY_KEY, "name": "tests"}],
    }


@pytest.fixture(scope="module")
def routed(tmp_path_factory, upstream):
    folder = tmp_path_factory.mktemp("protocols")
    config = folder / "gateway.yaml"
    config.write_text(yaml.safe_dump(protocols_config(upstream)))
    server = start_server(folder, {"LLM_CONFIG": str(config), "ANTHROPIC_TEST_KEY": ANTHROPIC_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(routed) -> openai.OpenAI:
    return routed.client(api_key=GATEWAY_KEY)


@pytest.fixture(scope="module")
def claude_client(routed) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=routed.base_url, api_key=GATEWAY_KEY, max_retries=0)


# ---- chat clients, served by Anthropic through the translation ---------------------------------------------------


def test_chat_falls_back_to_anthropic_translated(client, routed, upstream):
    fallbacks = counter(routed, "llm_fallbacks", from_target="refused", to_target="claude")
    raw = client.chat.completions.with_raw_response.create(model="via-claude", messages=HI, max_tokens=7)
    reply = raw.parse()
    assert raw.headers["x-llm-target"] == "claude"
    assert reply.choices[0].message.content == "from claude-anthropic"
    assert reply.choices[0].finish_reason == "stop"
    usage = ANTHROPIC_USAGE
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (usage["input_tokens"], usage["output_tokens"])
    sent = upstream.received["claude-anthropic"]  # a Messages request, at /v1/messages
    assert (sent["model"], sent["max_tokens"], sent["messages"]) == ("claude-upstream", 7, [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])  # fmt: skip
    headers = upstream.headers["claude-anthropic"]
    assert (headers["x-api-key"], headers["anthropic-version"]) == (ANTHROPIC_KEY, "2023-06-01")
    assert "authorization" not in headers
    assert counter(routed, "llm_fallbacks", from_target="refused", to_target="claude") == fallbacks + 1


def test_chat_streams_from_anthropic_with_usage_only_when_asked(client):
    chunks = list(client.chat.completions.create(model="via-claude", messages=HI, max_tokens=7, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "from claude-anthropic upstream"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)
    chunks = list(client.chat.completions.create(model="via-claude", messages=HI, max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert (chunks[-1].choices, chunks[-1].usage.completion_tokens) == ([], ANTHROPIC_USAGE["output_tokens"])


def test_a_local_target_that_cannot_read_an_image_falls_back_to_anthropic(client, upstream):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    raw = client.chat.completions.with_raw_response.create(model="local-then-claude", messages=messages, max_tokens=9)
    assert raw.headers["x-llm-target"] == "claude"
    source = upstream.received["claude-anthropic"]["messages"][0]["content"][1]["source"]
    assert source == {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_come_back_from_anthropic(client, upstream, stream):
    request = dict(model="claude-tools", messages=HI, tools=[WEATHER], max_tokens=30)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **request))
        calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
        name, arguments = calls[0].function.name, "".join(call.function.arguments or "" for call in calls)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        [choice] = client.chat.completions.create(**request).choices
        [call] = choice.message.tool_calls
        name, arguments, finish = call.function.name, call.function.arguments, choice.finish_reason
    assert (name, finish) == ("get_weather", "tool_calls")
    # The upstream echoes the Messages request it received as the call's input: the tool in Anthropic's shape.
    assert json.loads(arguments) == upstream.received["tools-anthropictools"]
    assert upstream.received["tools-anthropictools"]["tools"] == [{
        "name": "get_weather", "description": "The weather in a city.",
        "input_schema": WEATHER["function"]["parameters"]}]  # fmt: skip


def test_overloaded_529_is_retried_on_the_same_target(client, routed, upstream):
    retries = counter(routed, "llm_retries", target="claude-flaky")
    raw = client.chat.completions.with_raw_response.create(model="claude-flaky", messages=HI, max_tokens=5)
    assert raw.parse().choices[0].message.content == "from flaky-anthropicfail2"
    assert upstream.hits["flaky-anthropicfail2"] == 3
    assert counter(routed, "llm_retries", target="claude-flaky") == retries + 2


def test_an_overloaded_stream_before_any_output_falls_back(client):
    with client.chat.completions.with_streaming_response.create(
        model="overloaded-then-claude", messages=HI, max_tokens=5, stream=True
    ) as response:
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert response.headers["x-llm-target"] == "claude-spare"
    assert text == "from spare-anthropic upstream"


def test_refused_credentials_are_a_502(client):
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model="claude-denied", messages=HI, max_tokens=5)
    assert (error.value.status_code, error.value.code) == (502, "upstream_auth_failed")
    assert ANTHROPIC_KEY not in error.value.message


def test_anthropics_own_refusal_reaches_the_client(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="claude-strict", messages=HI, max_tokens=5)
    assert (error.value.body["message"], error.value.body["type"]) == ("upstream says 400", "invalid_request_error")


def test_what_messages_cannot_carry_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="claude-only", messages=HI, max_tokens=5, logprobs=True)
    assert error.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model="claude-only", input="a cat")
    assert error.value.code == "unsupported_endpoint"


# ---- clients of other protocols: natively where the provider speaks theirs, else translated --------------------


def test_messages_go_to_anthropic_natively(claude_client, upstream):
    request = dict(max_tokens=50, messages=HI, system="Be brief.", metadata={"user_id": "u-1"},
                   stop_sequences=["\n\n"])
    raw = claude_client.messages.with_raw_response.create(model="via-claude", **request)
    assert raw.headers["x-llm-target"] == "claude"
    message = raw.parse()
    assert [block.text for block in message.content] == ["from claude-anthropic"]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, ANTHROPIC_USAGE["output_tokens"])
    assert upstream.received["claude-anthropic"] == {**request, "model": "claude-upstream"}  # the client's body
    with claude_client.messages.stream(model="via-claude", **request) as stream:
        assert "".join(stream.text_stream) == "from claude-anthropic upstream"
        assert stream.get_final_message().stop_reason == "end_turn"
    assert upstream.received["claude-anthropic"] == {**request, "model": "claude-upstream", "stream": True}
    counted = claude_client.messages.count_tokens(model="via-claude", messages=HI, system="Be brief.")
    assert counted.input_tokens == COUNTED_TOKENS
    assert upstream.received["claude-anthropic"] == {"messages": HI, "system": "Be brief.", "model": "claude-upstream"}


def test_responses_go_natively_to_an_openai_target_that_has_them(client, upstream):
    raw = client.responses.with_raw_response.create(model="via-responses", input="hi", instructions="Be brief.")
    assert raw.headers["x-llm-target"] == "responses"
    assert raw.parse().output_text == "from native-responses"
    # The client's body, stored by the gateway rather than the provider.
    expected = {"input": "hi", "instructions": "Be brief.", "model": "gpt-upstream", "store": False}
    assert upstream.received["native-responses"] == expected
    deltas = [event.delta for event in client.responses.create(model="via-responses", input="hi", stream=True)
              if event.type == "response.output_text.delta"]  # fmt: skip
    assert "".join(deltas) == "from native-responses upstream"


def test_messages_fall_back_to_an_openai_chat_provider_translated(claude_client, upstream):
    raw = claude_client.messages.with_raw_response.create(model="via-chat", max_tokens=20, messages=HI)
    assert raw.headers["x-llm-target"] == "chat"
    assert [block.text for block in raw.parse().content] == ["from chat-ok"]
    sent = upstream.received["chat-ok"]  # a chat request, at /v1/chat/completions
    assert (sent["model"], sent["messages"], sent["max_tokens"]) == ("gpt-upstream", HI, 20)
    with claude_client.messages.stream(model="via-chat", max_tokens=20, messages=HI) as stream:
        assert "".join(stream.text_stream) == "from chat-ok upstream"


@pytest.mark.parametrize("stream", [False, True])
def test_native_answers_are_counted_from_their_own_usage(claude_client, client, routed, stream):
    model = f"usage-claude-{'stream' if stream else 'body'}"
    if stream:
        with claude_client.messages.stream(model=model, max_tokens=20, messages=HI) as events:
            events.until_done()
    else:
        claude_client.messages.create(model=model, max_tokens=20, messages=HI)
    line = access_line(routed, model)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, ANTHROPIC_USAGE["output_tokens"])
    assert (line["ttft_ms"] is not None) == stream  # a stream's first text delta is its first token
    model = f"usage-responses-{'stream' if stream else 'body'}"
    answer = client.responses.create(model=model, input="hi", stream=stream)
    if stream:
        list(answer)
    line = access_line(routed, model)
    usage = RESPONSES_USAGE
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["input_tokens"], usage["output_tokens"])


# ---- /tokenize and /detokenize: keys, and only local models ------------------------------------------------------


def test_tokenize_needs_a_key_and_a_local_model(routed):
    assert routed.post("/tokenize", json={"prompt": "hi"}).status_code == 401
    assert routed.post("/detokenize", json={"tokens": [1]}).status_code == 401
    key = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    counted = routed.post("/tokenize", json={"model": MODEL, "prompt": "hi"}, headers=key)
    assert counted.status_code == 200 and counted.json()["count"] >= 1, counted.text
    refused = routed.post("/tokenize", json={"model": "claude-only", "prompt": "hi"}, headers=key)
    assert refused.status_code == 400
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("model", "model_not_local")
