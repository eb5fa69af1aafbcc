"""Anthropic's Messages API on the local engines, through the real anthropic SDK pointed at the gateway: text,
streams, forced tool calls and their results, stop sequences, token counts, and Anthropic's error shape."""

from __future__ import annotations

import anthropic
import jsonschema
import pytest

from tests.conftest import ENGINES, HTTP_TIMEOUT, MODEL, require, start_server
from tests.engines.test_hf_engines import base_model_copy
from tests.engines.test_reasoning import THINKING

HELLO = [{"role": "user", "content": "Say hello to Ann."}]
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
GREEDY = {"temperature": 0}  # not among this SDK's arguments: sent as an extra field, which the API accepts


def _client(server, **kwargs) -> anthropic.Anthropic:
    """The SDK on the gateway's root (the SDK adds /v1 itself)."""
    return anthropic.Anthropic(base_url=server.base_url, api_key=kwargs.pop("api_key", "anything"), max_retries=0,
                               timeout=HTTP_TIMEOUT, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return _client(server)


def test_create_answers_text_with_usage_that_count_tokens_matches(claude):
    system = [{"type": "text", "text": "You are brief."}]
    counted = claude.messages.count_tokens(model=MODEL, system=system, messages=HELLO)
    message = claude.messages.create(model=MODEL, system=system, messages=HELLO, max_tokens=12, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == MODEL
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens == 12 or message.stop_reason == "end_turn"
    # Anthropic's input_tokens leaves out what the prompt cache served.
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted.input_tokens > 10


def test_stream_sends_anthropics_events_in_order(claude):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=12, extra_body=GREEDY)
    whole = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream if event.type not in ("text",)]  # "text": the SDK's own helper event
        final = stream.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]  # the ping is passed over by the SDK
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    )


ONE_CALL = {"disable_parallel_tool_use": True}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _call(message) -> anthropic.types.ToolUseBlock:
    """The answer's one call, after checking its input against the tool's schema."""
    [call] = [block for block in message.content if block.type == "tool_use"]
    jsonschema.validate(call.input, WEATHER["input_schema"])
    assert call.name == "get_weather" and call.id and message.stop_reason == "tool_use"
    return call


def test_a_required_tool_call_streamed_and_its_result(claude):
    kwargs = dict(model=MODEL, tools=[WEATHER], max_tokens=60, extra_body=GREEDY)
    message = claude.messages.create(messages=ASK_WEATHER, tool_choice={"type": "any", **ONE_CALL}, **kwargs)
    call = _call(message)
    with claude.messages.stream(messages=ASK_WEATHER, tool_choice={"type": "any", **ONE_CALL}, **kwargs) as stream:
        assert _call(stream.get_final_message()).input == call.input  # the input, streamed in pieces

    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "Sunny, 21 C"}]}
    conversation = [*ASK_WEATHER, {"role": "assistant", "content": message.content},
                    {"role": "user", "content": [result]}]  # fmt: skip
    answer = claude.messages.create(messages=conversation, tool_choice={"type": "none"}, **{**kwargs, "max_tokens": 16})
    assert answer.content and all(block.type == "text" for block in answer.content)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    counted = claude.messages.count_tokens(model=MODEL, tools=[WEATHER], tool_choice={"type": "none"},
                                           messages=conversation)  # fmt: skip
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens == counted.input_tokens


def test_a_named_tool_is_the_one_called(claude):
    choice = {"type": "tool", "name": "get_weather", **ONE_CALL}
    message = claude.messages.create(model=MODEL, tools=[WEATHER], tool_choice=choice, messages=ASK_WEATHER,
                                     max_tokens=60, extra_body=GREEDY)  # fmt: skip
    _call(message)


def test_stop_sequences_cut_the_text(claude):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=24, extra_body=GREEDY)
    full = claude.messages.create(**kwargs).content[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    message = claude.messages.create(stop_sequences=[stop, "never-seen-stop"], **kwargs)
    assert message.content[0].text == full[: full.index(stop)]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_errors_come_in_anthropics_shape(server, claude):
    def error(response) -> tuple[int, str]:
        body = response.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return response.status_code, body["error"]["type"]

    valid = {"model": MODEL, "max_tokens": 5, "messages": HELLO}
    assert error(server.post("/v1/messages", json={**valid, "top_n": 3})) == (400, "invalid_request_error")
    missing = server.post("/v1/messages", json={"model": MODEL, "messages": HELLO})
    assert error(missing) == (400, "invalid_request_error") and "max_tokens" in missing.json()["error"]["message"]
    assert error(server.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})) == (
        400, "invalid_request_error"
    )  # fmt: skip
    assert error(server.get("/v1/messages")) == (405, "invalid_request_error")
    assert error(server.post("/v1/messages/count_tokens", json={"model": "no-such-model", "messages": HELLO})) == (
        404, "not_found_error"
    )  # fmt: skip
    tool = {"type": "web_search_20250305", "name": "web_search"}
    refused = server.post("/v1/messages", json={**valid, "tools": [tool]})
    assert error(refused) == (400, "invalid_request_error") and "tools[0]" in refused.json()["error"]["message"]
    image = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    looking = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    refused = server.post("/v1/messages", json={**valid, "system": "Be brief.", "messages": looking})
    assert error(refused) == (400, "invalid_request_error")
    assert "messages[0].content[1]" in refused.json()["error"]["message"]  # as the client named it
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert raised.value.body["error"]["type"] == "not_found_error"
    # Elsewhere, OpenAI's shape.
    assert server.post("/v1/chat/completions", json={"model": MODEL}).json()["error"]["param"] == "messages"


def test_keys_by_x_api_key_and_errors_in_anthropics_shape(tmp_path):
    server = start_server(tmp_path, {"LLM_API_KEYS": "sk-right", "LLM_EMBEDDING_MODEL": "none"})
    try:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            _client(server, api_key="sk-wrong").messages.count_tokens(model=MODEL, messages=HELLO)
        assert raised.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                                "message": "Incorrect API key provided."}}  # fmt: skip
        beta = {"anthropic-beta": "token-counting-2024-11-01"}  # the SDK sends anthropic-version itself
        counted = _client(server, api_key="sk-right", default_headers=beta).messages.count_tokens(
            model=MODEL, messages=HELLO)  # fmt: skip
        assert counted.input_tokens > 0
    finally:
        server.stop()


def test_thinking_comes_in_thinking_blocks_and_disabled_turns_it_off(tmp_path):
    """With a template that thinks (transformers only: a quick check of the mapping, which every engine shares)."""
    require(ENGINES["transformers"])
    model = base_model_copy(tmp_path / "smollm2-thinking")
    (model / "chat_template.jinja").write_text(THINKING)
    env = {"LLM_MODEL": str(model), "LLM_SERVED_MODEL_NAME": MODEL, "LLM_EMBEDDING_MODEL": "none"}
    server = start_server(tmp_path, env, engine=ENGINES["transformers"])
    try:
        claude = _client(server)
        kwargs = dict(model=MODEL, messages=HELLO, max_tokens=16, extra_body=GREEDY)
        thought = claude.messages.create(thinking={"type": "adaptive"}, **kwargs)
        assert thought.content[0].type == "thinking" and thought.content[0].thinking
        assert "<think>" not in thought.content[0].thinking and thought.content[0].signature == ""
        with claude.messages.stream(thinking={"type": "adaptive"}, **kwargs) as stream:
            deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
            assert stream.get_final_message().content[0].thinking == thought.content[0].thinking
        assert "thinking_delta" in deltas
        plain = claude.messages.create(thinking={"type": "disabled"}, **kwargs)
        assert [block.type for block in plain.content] == ["text"] and "think>" not in plain.content[0].text
    finally:
        server.stop()
