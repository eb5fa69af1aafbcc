"""The Messages API's translations, as pure functions: a chat request to an Anthropic provider and its answers back
(provider.py), and a Messages request to the internal chat request and the chat answers back (translate.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic_core import from_json

from gateway.api.messages.protocol import MessagesRequest
from gateway.api.messages.provider import AnthropicTranslation
from gateway.api.messages.translate import chat_fields, message_body, message_events
from gateway.errors import APIError
from gateway.routing.targets import TargetFailure

PROVIDER = AnthropicTranslation()
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT = {
    "model": "claude-x",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather.", "parameters": SCHEMA}}],
    "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 8000, "stop": "END", "user": "u1",
    "reasoning_effort": "medium", "stream": True,
}  # fmt: skip


def _run(stream) -> list[dict]:
    async def collect():
        return [from_json(item) for item in [item async for item in stream]]

    return asyncio.run(collect())


async def _items(items: list) -> ...:
    for item in items:
        yield json.dumps(item)


def test_a_chat_request_as_a_messages_request():
    assert PROVIDER.request(CHAT) == {
        "model": "claude-x", "max_tokens": 8000, "stream": True, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "is_error": False,
                                          "content": [{"type": "text", "text": "Sunny"}]}]},
        ],
        "tools": [{"name": "weather", "description": "Weather.", "input_schema": SCHEMA}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 4096},
    }  # fmt: skip


def test_the_messages_request_comes_back_as_the_same_chat_request():
    fields = chat_fields(MessagesRequest.model_validate(PROVIDER.request(CHAT)))
    assert fields["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": CHAT["messages"][1]["content"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]  # fmt: skip
    assert fields["tools"] == CHAT["tools"] and fields["tool_choice"] == "required"
    assert fields["parallel_tool_calls"] is False and fields["stop"] == ["END"] and fields["user"] == "u1"
    assert fields["reasoning_effort"] == "medium"


@pytest.mark.parametrize("field, value", [("n", 2), ("logprobs", True), ("seed", 7), ("presence_penalty", 0.5),
                                          ("logit_bias", {"5": 1}), ("response_format", {"type": "json_object"}),
                                          ("temperature", 1.5)])  # fmt: skip
def test_chat_fields_anthropic_has_no_place_for_are_refused_by_name(field, value):
    with pytest.raises(APIError) as refused:
        PROVIDER.request({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], field: value})
    assert refused.value.status_code == 400 and refused.value.param == field


def test_a_message_as_a_chat_completion():
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
        "content": [{"type": "thinking", "thinking": "Hm.", "signature": "s"}, {"type": "text", "text": "Let me see."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}}],
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 30, "service_tier": "priority"},
    }  # fmt: skip
    chat = json.loads(PROVIDER.response(json.dumps(message).encode()))
    [choice] = chat["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me see." and choice["message"]["reasoning_content"] == "Hm."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]
    assert chat["usage"]["prompt_tokens"] == 40 and chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 30


# A Messages stream with thinking, text and a call, as Anthropic sends it (its `data` payloads).
EVENTS = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                          "content": [], "usage": {"input_tokens": 12, "output_tokens": 1}}},
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Let "}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "me see."}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2,
     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "some_future_event", "detail": 1},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 9}},
    {"type": "message_stop"},
]  # fmt: skip


def test_a_messages_stream_as_chat_chunks():
    chunks = _run(PROVIDER.events(_items(EVENTS)))
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Hm."
    assert "".join(d.get("content") or "" for d in deltas) == "Let me see."
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    assert calls[0]["id"] == "toolu_1" and calls[0]["function"]["name"] == "weather"
    assert {call["index"] for call in calls} == {0}
    assert "".join(call["function"]["arguments"] for call in calls) == '{"city": "Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert chunks[-1]["usage"]["prompt_tokens"] == 12


def test_a_provider_error_before_any_output_falls_back_and_after_it_ends_the_stream():
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(TargetFailure):
        _run(PROVIDER.events(_items([error])))
    with pytest.raises(APIError) as raised:
        _run(PROVIDER.events(_items([EVENTS[0], error])))
    assert not isinstance(raised.value, TargetFailure) and "Overloaded" in raised.value.message


def test_chat_chunks_as_anthropic_events_and_back():
    """The chat chunks of the stream above, rendered as Anthropic's events, are those events again (less the ping's
    place, the signature, which chat has no place for, and the unknown event)."""
    chunks = _run(PROVIDER.events(_items(EVENTS)))
    events = _run(message_events(_items(chunks), "claude-x", []))
    kinds = [event["type"] for event in events]
    expected = [e["type"] for e in EVENTS if e["type"] != "some_future_event" and e.get("delta", {}).get("type")
                != "signature_delta"]  # fmt: skip
    assert kinds == expected
    blocks = [event["content_block"] for event in events if event["type"] == "content_block_start"]
    assert [block["type"] for block in blocks] == ["thinking", "text", "tool_use"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] == 9


def test_a_chat_completion_as_a_message():
    chat = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "finish_reason": "stop", "stop_reason": "END",
         "message": {"role": "assistant", "content": "Hi", "reasoning_content": "Hm."}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3,
                  "prompt_tokens_details": {"cached_tokens": 8}}}  # fmt: skip
    message = json.loads(message_body(json.dumps(chat).encode(), "m", ["END"]))
    assert [block["type"] for block in message["content"]] == ["thinking", "text"]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")
    assert message["usage"]["input_tokens"] == 12 and message["usage"]["cache_read_input_tokens"] == 8
