"""Constrained JSON that finishes (issue 27): as `max_tokens` runs out, the engines write only what closes the value,
so a JSON answer or a tool call is complete and valid whenever it fits the budget (engines/json_budget.py).

Through the real gateway and the OpenAI SDK on every selected engine, and on the llama.cpp engine in this process
for what only its C steps do. The prompt asks the tiny default model for a list it cannot finish in the budget;
each test first shows that it does run out when nothing closes its answer (`ignore_eos`, which leaves the answer to
the model), then that the same request comes back complete."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from engines.base import SamplingParams
from tests.conftest import MODEL
from tests.engines.test_llamacpp_tools import llama  # noqa: F401 (the engine in this process, as a fixture)

FRUITS = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "items": {"type": "string"}}},
    "required": ["fruits"],
    "additionalProperties": False,
}
LIST = [{"role": "user", "content": 'List one hundred fruits as JSON: {"fruits": ["apple", "banana", ...]}'}]
FORMATS = {
    "json_schema": {"type": "json_schema", "json_schema": {"name": "fruits", "schema": FRUITS}},
    "json_object": {"type": "json_object"},
}
BUDGET = 40  # tokens: about ten fruits, far from a hundred
SHOW = {"type": "function", "function": {"name": "show_fruits", "description": "Shows fruits.", "parameters": FRUITS}}
CALL_LIST = [{"role": "user", "content": 'Call show_fruits with the numbers from one to one hundred in words: '
                                         '{"fruits": ["one", "two", ...]}'}]  # fmt: skip
CALL_BUDGET = 60  # a call also writes its markers and the function's name


def ask(client, messages, max_tokens=BUDGET, **fields):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens,
                                          **fields)  # fmt: skip


def unclosed(client, messages, **fields):
    """The same request, left to the model: `ignore_eos` turns the closing off."""
    return ask(client, messages, **fields, extra_body={"ignore_eos": True})


# ---- through the gateway, on every engine --------------------------------------------------------


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_a_json_answer_that_would_run_out_is_closed_within_max_tokens(client, format_name):
    cut = unclosed(client, LIST, response_format=FORMATS[format_name]).choices[0]
    assert cut.finish_reason == "length", cut.message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.message.content)

    reply = ask(client, LIST, response_format=FORMATS[format_name])
    [choice] = reply.choices
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    jsonschema.validate(value, FRUITS if format_name == "json_schema" else {"type": "object"})
    assert reply.usage.completion_tokens <= BUDGET
    # It wrote on until the budget neared, and kept what it wrote.
    assert len(choice.message.content) > len(cut.message.content) // 2, (cut.message.content, choice.message.content)


def test_a_streamed_json_answer_ends_closed_too(client):
    stream = ask(client, LIST, response_format=FORMATS["json_schema"], stream=True)
    chunks = [choice for chunk in stream for choice in chunk.choices]
    text = "".join(choice.delta.content or "" for choice in chunks)
    assert chunks[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text), FRUITS)


def test_a_forced_call_whose_arguments_would_run_out_is_closed_within_max_tokens(client):
    named = {"type": "function", "function": {"name": "show_fruits"}}
    fields = dict(tools=[SHOW], tool_choice=named, parallel_tool_calls=False, max_tokens=CALL_BUDGET)
    cut = unclosed(client, CALL_LIST, **fields).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls  # a call cut off is left out

    reply = ask(client, CALL_LIST, **fields)
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "show_fruits"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, FRUITS)
    assert len(arguments["fruits"]) >= 3 and all(arguments["fruits"]), arguments  # the model's own, none empty
    assert reply.usage.completion_tokens <= CALL_BUDGET


def test_an_answer_that_cannot_fit_still_ends_with_length(client):
    """The shortest valid answer is longer than max_tokens: nothing can close it, so OpenAI's `length` stays."""
    greeting = {"type": "object", "properties": {"greeting": {"const": "a greeting of many words that never fits"}},
                "required": ["greeting"]}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "greeting", "schema": greeting}}
    reply = client.chat.completions.create(model=MODEL, messages=LIST, temperature=0, max_tokens=4,
                                           response_format=response_format)  # fmt: skip
    assert reply.choices[0].finish_reason == "length"


# ---- the llama.cpp engine in this process: its C steps stop at a watched sequence's mark ------------


async def _generate(engine, messages, params: SamplingParams) -> tuple[str, str, int]:
    prompt = await engine.render_chat(messages)
    text, finish, tokens = "", None, 0
    async for delta in engine.generate(prompt, params):
        text, finish, tokens = text + delta.text, delta.finish_reason or finish, tokens + delta.tokens
    return text, finish, tokens


def test_watched_and_unwatched_sequences_step_together_in_c(llama):  # noqa: F811 (the fixture)
    """A plain answer beside two watched ones (one with logprobs, so stepped in Python): the plain answer is what it
    is alone, and each watched one closes within its own budget."""
    engine, loop = llama.engine, llama.loop
    plain = SamplingParams(max_tokens=60, temperature=0.8, seed=5)
    alone = loop.run_until_complete(_generate(engine, LIST, plain))

    async def together():
        watched = [SamplingParams(max_tokens=budget, temperature=0, json_schema=FRUITS, logprobs=logprobs)
                   for budget, logprobs in ((25, None), (33, 2))]  # fmt: skip
        return await asyncio.gather(*(_generate(engine, LIST, params) for params in [plain, *watched]))

    beside, *closed = loop.run_until_complete(together())
    assert beside == alone
    for (text, finish, tokens), budget in zip(closed, (25, 33)):
        assert finish == "stop" and tokens <= budget, text
        jsonschema.validate(json.loads(text), FRUITS)
