"""Tool calling (issue 27) on the llama.cpp engine, driven directly on the real default model (no gateway process):
chat templates that take tools, and grammars that keep tool calls and JSON answers parseable."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from pathlib import Path

import jsonschema
import pytest

from engines.base import ContextLengthExceeded, EngineConfig, SamplingParams, ToolCallConstraint
from engines.json_schema import InvalidSchema
from scripts.fetch_model import MEMBER, default_models_dir
from tests.conftest import ENGINES, require, skip_unless_ci

BEGIN, END = "<tool_call>\n", "\n</tool_call>"  # the generic format's markers
ARGUMENTS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"day": {"type": "integer"}, "hourly": {"type": "boolean"}},
                "required": ["day", "hourly"],
            },
            "maxItems": 3,
        },
    },
    "required": ["city", "unit", "days"],
}
CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": ARGUMENTS},
    "required": ["name", "arguments"],
}
SYSTEM = {
    "role": "system",
    "content": f'You call tools. To call one, write {BEGIN}{{"name": ..., "arguments": ...}}{END}',
}
ASK = [SYSTEM, {"role": "user", "content": "What is the weather in Paris for the next two days?"}]
# One call written by hand before the question: the model then starts a call of its own, with only a city.
FEW_SHOT = [
    SYSTEM,
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": f'{BEGIN}{{"name":"get_weather","arguments":{{"city":"Rome"}}}}{END}'},
    {"role": "user", "content": "What is the weather in Paris?"},
]
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')


class Driver:
    """The engine on an event loop of the test's own (its scheduler posts results to the loop that loaded it)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def prompt(self, messages, **kwargs):
        return self.run(self.engine.render_chat(messages, **kwargs))

    def generate(self, messages, **params) -> tuple[str, str]:
        prompt = self.prompt(messages)
        return self.run(self._generate(prompt, SamplingParams(**params)))

    async def _generate(self, prompt, params) -> tuple[str, str]:
        text, finish = "", None
        async for delta in self.engine.generate(prompt, params):
            text, finish = text + delta.text, delta.finish_reason or finish
        return text, finish


@pytest.fixture(scope="module")
def llama():
    require(ENGINES["llamacpp"])
    from engines.llamacpp.engine import LlamaCppEngine

    path = default_models_dir() / Path(MEMBER).name
    if not path.exists():
        skip_unless_ci(f"{path} is missing: run `make models`")
    config = EngineConfig(model_path=str(path), served_name="smollm2", context_length=2048, parallel=2,
                          embedding=False)  # fmt: skip
    loop = asyncio.new_event_loop()
    engine = LlamaCppEngine(config)
    loop.run_until_complete(engine.load())
    yield Driver(engine, loop)
    loop.run_until_complete(engine.close())
    loop.close()


def sections(text: str, begin: str, end: str, cut: bool = False) -> list:
    """The JSON values of `text`'s call sections, checking that nothing else is there: sections one after the other,
    each after one newline. A `cut` text (by max_tokens) ends inside a section: its values are those before it."""
    values, position = [], 0
    while True:
        tail = text[position:]
        if cut and end + "\n" not in tail:  # the last section, cut short
            assert tail.startswith(begin) or begin.startswith(tail), text
            return values
        assert text.startswith(begin, position), text
        value, position = json.JSONDecoder().raw_decode(text, position + len(begin))
        assert text.startswith(end, position), text
        values.append(value)
        position += len(end)
        if position == len(text):
            return values
        assert text[position] == "\n", text
        position += 1


def assert_compact(text: str) -> None:
    """No whitespace between JSON tokens: outside its strings the text has none."""
    outside = _STRINGS.sub('""', text)
    assert not re.search(r"\s", outside), text


def deepest(text: str) -> int:
    depth = most = 0
    for char in _STRINGS.sub('""', text):
        depth += char in "[{"
        depth -= char in "]}"
        most = max(most, depth)
    return most


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_forced_call_is_begin_json_end_and_nothing_else(llama, temperature, seed):
    calls = ToolCallConstraint(CALL, BEGIN, END)
    text, finish = llama.generate(ASK, max_tokens=300, temperature=temperature, seed=seed, tool_calls=calls)
    (call,) = sections(text, BEGIN, END)
    jsonschema.validate(call, CALL)
    assert_compact(text[len(BEGIN) : -len(END)])
    assert finish == "stop"


def test_repeat_gives_more_sections_each_after_one_newline(llama):
    """With the end of generation biased off, a newline and another section is all the grammar leaves after each."""
    calls = ToolCallConstraint(CALL, BEGIN, END, repeat=True)
    text, finish = llama.generate(ASK, max_tokens=250, temperature=0, tool_calls=calls, ignore_eos=True)
    assert finish == "length"
    values = sections(text, BEGIN, END, cut=True)
    assert len(values) >= 2, text
    for value in values:
        jsonschema.validate(value, CALL)


def test_mistral_style_marker_and_an_array_of_calls(llama):
    """Mistral's marker, then the calls as one JSON array, no end marker: brackets in a marker are literal text."""
    schema = {"type": "array", "items": CALL, "minItems": 1, "maxItems": 2}
    calls = ToolCallConstraint(schema, "[TOOL_CALLS]")
    text, finish = llama.generate(ASK, max_tokens=300, temperature=0, tool_calls=calls)
    (value,) = sections(text, "[TOOL_CALLS]", "")
    jsonschema.validate(value, schema)
    assert finish == "stop"


def test_lazy_call_is_constrained_from_its_marker_on(llama):
    free, _ = llama.generate(FEW_SHOT, max_tokens=60, temperature=0)
    (unconstrained,) = sections(free, BEGIN, END)
    with pytest.raises(jsonschema.ValidationError):  # the model's own call leaves out what the schema requires
        jsonschema.validate(unconstrained, CALL)
    lazy = ToolCallConstraint(CALL, BEGIN, END, lazy=True)
    text, finish = llama.generate(FEW_SHOT, max_tokens=200, temperature=0, tool_calls=lazy)
    (call,) = sections(text, BEGIN, END)
    jsonschema.validate(call, CALL)
    assert finish == "stop"


def test_lazy_call_survives_a_token_running_past_its_marker(llama):
    """A "\\n\\n" token right after "<tool_call>" completes the marker and goes on past it. llama.cpp's own lazy
    grammar replays such a token into the grammar once triggered, and the refusal (a C++ exception) aborted the
    process; here the grammar refuses that token before it is drawn."""
    (double_newline,) = llama.engine._vocab.tokenize([b"\n\n"], add_special=False, parse_special=False)
    free, _ = llama.generate(FEW_SHOT, max_tokens=20, temperature=0, logit_bias={double_newline: 10.0})
    assert free.startswith("<tool_call>\n\n"), free  # what the model writes unconstrained
    lazy = ToolCallConstraint(CALL, BEGIN, END, lazy=True)
    text, _ = llama.generate(FEW_SHOT, max_tokens=200, temperature=0, tool_calls=lazy,
                             logit_bias={double_newline: 10.0})  # fmt: skip
    (call,) = sections(text, BEGIN, END)
    jsonschema.validate(call, CALL)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7)])
def test_lazy_without_a_call_leaves_the_text_as_it_was(llama, temperature, seed):
    messages = [{"role": "user", "content": "Write a short poem about the sea, with a degree sign: °."}]
    plain = llama.generate(messages, max_tokens=60, temperature=temperature, seed=seed)
    lazy = ToolCallConstraint(CALL, BEGIN, END, lazy=True)
    text, finish = llama.generate(messages, max_tokens=60, temperature=temperature, seed=seed, tool_calls=lazy)
    assert BEGIN not in text
    assert (text, finish) == plain


def test_a_control_token_in_a_marker_shows_in_the_text(llama):
    """A marker may hold a control token (Mistral's [TOOL_CALLS]): the client's parser must see its text, though
    control tokens are otherwise left out of the output."""
    (start,) = llama.engine._vocab.tokenize([b"<|im_start|>"], add_special=False, parse_special=True)
    calls = ToolCallConstraint(CALL, "<|im_start|>call\n", "")
    text, _ = llama.generate(ASK, max_tokens=200, temperature=0, tool_calls=calls, logit_bias={start: 30.0})
    assert text.startswith("<|im_start|>call\n{"), text


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 1), (1.0, 2)])
def test_json_schema_output_is_compact(llama, temperature, seed):
    text, finish = llama.generate(ASK, max_tokens=300, temperature=temperature, seed=seed, json_schema=CALL)
    jsonschema.validate(json.loads(text), CALL)
    assert_compact(text)
    assert finish == "stop"


def test_json_object_nests_at_most_eight_levels(llama):
    """Openers biased up: the model nests as deep as the grammar lets it, then has to close."""
    vocab = llama.engine._vocab
    openers = {vocab.tokenize([text], add_special=False, parse_special=False)[0]: 10.0 for text in (b"[", b"[[", b'{"')}
    text, finish = llama.generate(ASK, max_tokens=120, temperature=0, json_schema={"type": "object"},
                                  logit_bias=openers)  # fmt: skip
    assert deepest(text) == 8, text  # driven to the limit, and no further
    assert finish == "stop"
    assert isinstance(json.loads(text), dict)
    assert_compact(text)


def test_json_object_with_a_tiny_budget_is_closed_in_time(llama):
    """Left to the model (ignore_eos), an answer that reaches max_tokens stops mid-value; the engine closes it in
    time (engines/json_budget.py, tests/engines/test_json_budget.py)."""
    text, finish = llama.generate(ASK, max_tokens=6, temperature=0, json_schema={"type": "object"}, ignore_eos=True)
    assert finish == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    text, finish = llama.generate(ASK, max_tokens=6, temperature=0, json_schema={"type": "object"})
    assert finish == "stop" and isinstance(json.loads(text), dict)


# A template of this test's own that uses what real tool templates use: tools, tojson, namespace, loop controls,
# raise_exception, strftime_now, an extra variable, and assistant tool calls and tool results.
TOOL_TEMPLATE = """\
{%- set ns = namespace(calls=0) -%}
{%- if tools %}TOOLS {{ tools | tojson }}
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' and not loop.first %}{{ raise_exception('the system message must come first') }}
{%- elif message.role == 'skip' %}{% continue %}
{%- elif message.tool_calls -%}
{%- for call in message.tool_calls %}{% set ns.calls = ns.calls + 1 %}CALL {{ call.function.name }} \
{{ call.function.arguments | tojson }}
{% endfor -%}
{%- elif message.role == 'tool' %}RESULT {{ message.tool_call_id }} {{ message.content }}
{% else %}{{ message.role }} {{ message.content }}
{% endif -%}
{%- endfor -%}
calls={{ ns.calls }} thinking={{ enable_thinking }} year={{ strftime_now('%Y') }}
<|im_start|>assistant
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": ARGUMENTS}}]
CALLED = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "skip", "content": "left out"},
    {"role": "assistant", "content": None, "tool_calls": [CALLED]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


@pytest.fixture
def tool_template(llama):
    """The engine renders with TOOL_TEMPLATE for one test, as if the GGUF carried it."""
    engine = llama.engine
    saved = engine._chat_template, engine._chat_formatter
    engine._chat_template = TOOL_TEMPLATE
    engine._chat_formatter = engine._load_chat_formatter()
    yield llama
    engine._chat_template, engine._chat_formatter = saved


def test_chat_template_is_the_models_own(llama):
    template = llama.run(llama.engine.chat_template())
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def test_render_chat_passes_tools_tool_calls_and_template_args(tool_template):
    prompt = tool_template.prompt(CONVERSATION, tools=TOOLS, template_args={"enable_thinking": False})
    year = datetime.datetime.now().strftime("%Y")
    assert prompt.text == (
        f'TOOLS {json.dumps(TOOLS)}\nuser Weather in Paris?\nCALL get_weather {{"city": "Paris"}}\n'
        f"RESULT c1 sunny\ncalls=1 thinking=False year={year}\n<|im_start|>assistant"
    )
    (start,) = tool_template.engine._vocab.tokenize([b"<|im_start|>"], add_special=False, parse_special=True)
    assert start in prompt.token_ids  # special tokens in the rendered text are still read as such


def test_a_template_that_refuses_the_messages_is_a_400(tool_template):
    from engines.base import ChatTemplateRefused

    late_system = [*CONVERSATION, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateRefused, match="the system message must come first") as refused:
        tool_template.prompt(late_system)
    assert (refused.value.status_code, refused.value.param) == (400, "messages")


def test_a_template_without_tool_support_cannot_render_a_call_is_a_400(llama):
    """SmolLM2's template concatenates every message's content: an assistant call without content is a TypeError
    inside the template, which must reach the client as its mistake, not as a server error."""
    from engines.base import ChatTemplateRefused

    with pytest.raises(ChatTemplateRefused) as refused:
        llama.prompt(CONVERSATION[:1] + CONVERSATION[2:])
    assert (refused.value.status_code, refused.value.param) == (400, "messages")


def test_a_long_conversation_is_still_refused_before_tokenizing(llama):
    with pytest.raises(ContextLengthExceeded):
        llama.prompt([{"role": "user", "content": "word " * 200_000}], tools=TOOLS)


def test_a_tool_schema_llamacpp_cannot_load_is_a_400_naming_tools():
    require(ENGINES["llamacpp"])
    from engines.llamacpp.native import tool_call_grammar

    schema = {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^\\d{5}$"}}}
    with pytest.raises(InvalidSchema) as refused:
        tool_call_grammar(ToolCallConstraint(schema, BEGIN, END, lazy=True))
    assert refused.value.param == "tools"
