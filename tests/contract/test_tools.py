"""Tool calling on the local engines, through the real OpenAI SDK: every call that reaches the client parses and
validates against its tool's schema, in OpenAI's exact shapes, streamed and not."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
BOOKING = {
    "type": "function",
    "function": {
        "name": "book_trip",
        "description": "Book a trip for some travellers.",
        "parameters": {
            "type": "object",
            "properties": {
                "destination": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                                 "nights": {"type": "integer", "minimum": 1,
                                                                            "maximum": 30}},
                                "required": ["city", "nights"], "additionalProperties": False},
                "travellers": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1,
                               "maxItems": 3},
            },
            "required": ["destination", "travellers"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TOOLS = [WEATHER, BOOKING]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(call) -> dict:
    """The call's arguments, after checking the call's shape and its arguments against its tool's schema."""
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) > 10
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}])
def test_required_answers_with_a_valid_call(client, sampling):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, **sampling
    )
    [choice] = reply.choices
    # With parallel calls allowed a small model may go on to another call until the budget ends: that one, cut
    # off, is left out, and the answer says "length".
    assert choice.finish_reason == "tool_calls" or reply.usage.completion_tokens == 120
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _valid(call)


def test_a_named_choice_calls_that_function_with_nested_arguments(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Book two nights in Rome for Ann and Bo."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "book_trip"}}, max_tokens=150, temperature=0,
        parallel_tool_calls=False,
    )  # fmt: skip
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "book_trip"
    arguments = _valid(call)
    assert isinstance(arguments["destination"]["nights"], int)


def test_a_streamed_call_comes_as_index_keyed_chunks_and_matches_the_whole_answer(client):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0, parallel_tool_calls=False,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or ()]
    first, rest = pieces[0], pieces[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id.startswith("call_")
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_weather"])
    assert not any(choice.delta.content for chunk in chunks for choice in chunk.choices)
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["tool_calls"]


def test_parallel_calls_each_validate_and_one_call_when_parallel_is_off(client):
    # ignore_eos keeps the model from ending after its first call: where parallel calls are allowed it writes
    # more until the budget ends (the last, cut off, is left out); where they are not, the end is all it may write.
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=200,
                  extra_body={"ignore_eos": True})  # fmt: skip
    calls = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert len(calls) >= 2 and len({call.id for call in calls}) == len(calls)
    for call in calls:
        _valid(call)
    kwargs.pop("extra_body")  # the end is all the grammar allows after one call; ignore_eos would write on
    single = client.chat.completions.create(parallel_tool_calls=False, **kwargs).choices[0]
    assert len(single.message.tool_calls) == 1 and single.finish_reason == "tool_calls"
    _valid(single.message.tool_calls[0])


def test_auto_leaves_text_alone_and_a_started_call_completes_validly(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    message = plain.choices[0].message
    assert "<tool_call>" not in (message.content or "")
    for call in message.tool_calls or ():
        _valid(call)
    # Asked to start with the marker, the model writes it unconstrained: from there on the lazy constraint holds
    # it to a valid call.
    asked = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Call get_weather for Paris. Begin your reply with "
                                "<tool_call>"}], tools=TOOLS, max_tokens=120, temperature=0, parallel_tool_calls=False,
    )  # fmt: skip
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        _valid(call)


def test_a_round_trip_from_call_to_tool_result_to_answer(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
        parallel_tool_calls=False,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    answer = client.chat.completions.create(
        model=MODEL, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=30, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content and not choice.message.tool_calls


def test_legacy_functions_answer_with_function_call(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
        max_tokens=120, temperature=0,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), SCHEMAS["get_weather"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "text"}}}}}]},
         "tools[1].function.parameters.properties.x.type"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_unknown", "content": "{}"}]},
         "messages[1].tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ],
)  # fmt: skip
def test_bad_tool_input_is_a_400_naming_the_parameter(client, change, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 5, **change})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
