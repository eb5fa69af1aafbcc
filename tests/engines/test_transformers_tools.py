"""The transformers engine's tool calls and compact JSON (issue 27), in process on the default model's Hugging Face
copy (no gateway process), with a small Hermes-style chat template that takes `tools` and `tool_calls`: calls
that always parse, forced or lazy, and the chats the template renders."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import jsonschema
import pytest

from engines.base import ChatTemplateRefused, EngineConfig, SamplingParams, ToolCallConstraint, UnsupportedFeature
from tests.conftest import ENGINES, require
from tests.engines.test_hf_engines import base_model_copy

# ChatML as SmolLM2's own template, with Hermes' tool prompt and call sections.
HERMES = """\
{%- if messages[0].role == 'system' or tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}
{%- if tools %}
You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as a JSON object inside <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{%- endif %}
{%- if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}{% if not loop.first %}
{% endif %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role in ('user', 'assistant') %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role != 'system' %}{{ raise_exception('Unexpected role ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "when": {
            "type": "object",
            "properties": {
                "day": {"type": "integer", "minimum": 1, "maximum": 31},
                "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
            },
            "required": ["day", "hours"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "unit", "when"],
    "additionalProperties": False,
}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_forecast", "description": "The weather forecast of a city.",
                                           "parameters": FORECAST}}]  # fmt: skip
# One call in the generic format: the function's name first, then its arguments.
CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_forecast"}, "arguments": FORECAST},
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
BEGIN, END = "<tool_call>\n", "\n</tool_call>"
FORCED = ToolCallConstraint(CALL, BEGIN, END)
QUESTION = {"role": "user", "content": "What is the weather in Paris on the 3rd, at 9 and 15 o'clock?"}
# An earlier exchange with a call, the tool's answer and the assistant's reply.
EXAMPLE = [
    {"role": "user", "content": "What is the weather in Rome on the 2nd at 10?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_forecast", "arguments": {"city": "Rome", "unit": "celsius", "when": {"day": 2, "hours": [10]}}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees."},
    {"role": "assistant", "content": "It will be sunny in Rome, 24 degrees."},
]  # fmt: skip
# Strings in JSON text, to find what lies between them.
JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the engine's worker thread reports to the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, loop):
    require(ENGINES["transformers"])
    from engines.transformers.engine import TransformersEngine

    model = base_model_copy(tmp_path_factory.mktemp("hermes") / "smollm2-hermes")
    (model / "chat_template.jinja").write_text(HERMES)
    engine = TransformersEngine(EngineConfig(model_path=str(model), served_name="smollm2-hermes", context_length=2048,
                                             parallel=1))  # fmt: skip
    loop.run_until_complete(engine.load())
    yield engine
    loop.run_until_complete(engine.close())


def generate(loop, engine, messages: list[dict], **params) -> tuple[list, str]:
    """The deltas of one generation from `messages` rendered with TOOLS, and their text."""

    async def run():
        prompt = await engine.render_chat(messages, tools=TOOLS)
        return [delta async for delta in engine.generate(prompt, SamplingParams(**params))]

    deltas = loop.run_until_complete(run())
    return deltas, "".join(delta.text for delta in deltas)


def calls_in(text: str) -> list[dict]:
    """The JSON of each call in `text`, which must be call sections and nothing else, one newline between them (the
    last may be cut short by max_tokens), their JSON compact. Compact JSON holds no newline, so the sections' lines
    go in threes."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        marker = ("<tool_call>", None, "</tool_call>")[i % 3]
        assert marker is None or line == marker or (i == len(lines) - 1 and marker.startswith(line)), text
    complete = [lines[i] for i in range(1, len(lines) - 1, 3)]  # each JSON line that a newline ends
    for line in complete:
        assert_compact(line)
    return [json.loads(line) for line in complete]


def assert_compact(text: str) -> None:
    """No whitespace in JSON text outside its strings."""
    between = JSON_STRING.sub('""', text)
    assert not re.search(r"\s", between), text


def test_forced_call_is_one_valid_section_of_compact_json(loop, engine):
    deltas, text = generate(loop, engine, [QUESTION], max_tokens=120, temperature=0.7, seed=11, tool_calls=FORCED)
    assert deltas[-1].finish_reason == "stop", text
    assert text.startswith(BEGIN) and text.endswith(END), text
    (call,) = calls_in(text)
    jsonschema.validate(call, CALL)
    assert list(call) == ["name", "arguments"]  # the name first, as the schema orders it


def test_repeated_calls_follow_each_other_after_one_newline(loop, engine):
    schema = {**CALL, "properties": {**CALL["properties"], "arguments": CITY}}
    repeat = ToolCallConstraint(schema, BEGIN, END, repeat=True)
    question = {"role": "user", "content": "What is the weather in Paris, in Rome and in Oslo?"}
    # Without the end of text the model must go on: with `repeat` the grammar allows only a newline and a section.
    deltas, text = generate(loop, engine, [question], max_tokens=60, temperature=0, ignore_eos=True, tool_calls=repeat)
    calls = calls_in(text)
    assert len(calls) >= 2, text
    for call in calls:
        jsonschema.validate(call, schema)
    assert deltas[-1].finish_reason == "length"


def test_lazy_call_starts_where_the_model_writes_begin_and_completes(loop, engine):
    lazy = dataclasses.replace(FORCED, lazy=True)
    messages = [*EXAMPLE[:2], QUESTION]  # after a question answered with a call, the model calls by itself
    deltas, text = generate(loop, engine, messages, max_tokens=120, temperature=0, tool_calls=lazy)
    assert BEGIN in text, text
    _, _, after = text.partition(BEGIN)
    (call,) = calls_in(BEGIN + after)
    jsonschema.validate(call, CALL)
    assert deltas[-1].finish_reason == "stop"

    # The same request with the first token of `begin` barred: free text, no call, ended by the model.
    first = engine._tokenizer.encode(BEGIN, add_special_tokens=False)[0]
    deltas, text = generate(loop, engine, messages, max_tokens=60, temperature=0, tool_calls=lazy,
                            logit_bias={first: -100.0})  # fmt: skip
    assert BEGIN not in text and text.strip(), text
    assert deltas[-1].finish_reason in ("stop", "length")


def test_json_schema_output_is_compact(loop, engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
              "required": ["city", "days"]}  # fmt: skip
    _, text = generate(loop, engine, [QUESTION], max_tokens=60, temperature=0, json_schema=schema)
    jsonschema.validate(json.loads(text), schema)
    assert_compact(text)


def test_json_object_nests_at_most_eight_levels(engine):
    from engines.llguidance_grammars import json_matcher

    def accepted(value: str) -> bool:
        matcher = json_matcher(engine._grammar_tokenizer, {"type": "object"})
        tokens = engine._tokenizer.encode(value, add_special_tokens=False)
        return matcher.validate_tokens(tokens) == len(tokens)

    assert accepted('{"a":' + "[" * 7 + "1" + "]" * 7 + "}")  # 8 levels: the object and 7 arrays inside
    assert not accepted('{"a":' + "[" * 8 + "1" + "]" * 8 + "}")
    assert not accepted('{"a": 1}')  # whitespace


def test_a_special_token_in_a_marker_is_written_as_that_token_and_kept_in_the_text(loop, engine):
    """As Mistral's `[TOOL_CALLS]`: the grammar asks for the token itself, and the text keeps it for the parser."""
    begin = "<issue_start>"  # one of SmolLM2's special tokens, which decoding otherwise leaves out
    constraint = ToolCallConstraint(CITY, begin)
    deltas, text = generate(loop, engine, [QUESTION], max_tokens=30, temperature=0, tool_calls=constraint)
    assert deltas[0].text == begin and deltas[0].tokens == 1, deltas[0]
    jsonschema.validate(json.loads(text[len(begin) :]), CITY)
    assert deltas[-1].finish_reason == "stop"


def test_render_chat_passes_tools_tool_calls_and_template_args(loop, engine):
    messages = [{"role": "system", "content": "Be brief."}, *EXAMPLE, QUESTION]
    rendering = engine.render_chat(messages, tools=TOOLS, template_args={"enable_thinking": False})
    prompt = loop.run_until_complete(rendering)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt.text
    assert '<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Rome"' in prompt.text
    assert "<tool_response>\nSunny, 24 degrees.\n</tool_response>" in prompt.text
    assert "Be brief." in prompt.text and "/no_think" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.token_ids == engine._tokenizer.encode(prompt.text, add_special_tokens=False)
    without = loop.run_until_complete(engine.render_chat([QUESTION]))
    assert "<tools>" not in without.text
    assert loop.run_until_complete(engine.chat_template()) == HERMES


def test_a_template_error_is_a_400_naming_messages(loop, engine):
    with pytest.raises(ChatTemplateRefused, match="Unexpected role narrator") as raised:
        loop.run_until_complete(engine.render_chat([{"role": "narrator", "content": "Once"}, QUESTION]))
    assert (raised.value.status_code, raised.value.param) == (400, "messages")
    with pytest.raises(UnsupportedFeature) as raised:
        loop.run_until_complete(engine.render_chat([QUESTION], template_args={"tokenize": True}))
    assert raised.value.param == "chat_template_kwargs"


def test_a_tool_schema_the_grammar_cannot_take_is_a_400_naming_tools(loop, engine):
    unusable = ToolCallConstraint({"type": "string", "format": "no-such-format"}, BEGIN, END)
    with pytest.raises(UnsupportedFeature, match="no-such-format") as raised:
        generate(loop, engine, [QUESTION], max_tokens=5, tool_calls=unusable)
    assert (raised.value.status_code, raised.value.param) == (400, "tools")
