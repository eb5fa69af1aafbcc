"""Tool-call formats: detection from chat templates, the conversation each template is handed (rendered by the
llama.cpp engine's own Jinja renderer, on the real default model's template where it applies), call schemas and
constraints, and calls written as a constraint demands read back by the output parser."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from gateway.core.output_parser import OutputParser
from gateway.core.tool_calls import (
    FORMATS,
    ToolChoice,
    ToolSpec,
    call_schema,
    chat_messages,
    check_parameters,
    constraint,
    format_for,
    new_call_id,
)
from gateway.errors import APIError
from gateway.settings import Settings

WEATHER = ToolSpec(
    "get_weather", "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)  # fmt: skip
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {}})
TOOLS = [WEATHER, TIME]

# Small templates in the manner of each family (markers and how they read tools and calls), written for these tests.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% for key, value in c.function.arguments.items() %}[{{ key }}]{% endfor %}{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
)
CHATML_WITH_CALLS_TEMPLATE = "{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}"  # lists no tools
LLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>{% if tools %}Reply with JSON: "
    '{"name": function name, "parameters": arguments}{% endif %}<|eot_id|>'
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}"
    "{% if c.id | length != 9 %}{{ raise_exception('Tool call ids must be 9 characters') }}{% endif %}"
    '{"name":"{{ c.function.name }}","id":"{{ c.id }}"}{% endfor %}]'
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.tool_call_id }}:{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]},
    {"role": "tool", "tool_call_id": "call_a", "content": "Sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """The chat template of the default model, as the llama.cpp engine reads it from the GGUF file."""
    path = Settings().models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return model.metadata["tokenizer.chat_template"]


def render(template: str, messages: list[dict], tools: list[dict] | None) -> str:
    return Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages, tools=tools).prompt


# --- formats -----------------------------------------------------------------------------------------------------


def test_the_generic_format_is_hermes_markers_without_template_tools():
    generic, hermes = FORMATS["generic"], FORMATS["hermes"]
    assert (generic.begin, generic.end, generic.arguments_key) == ("<tool_call>\n", "\n</tool_call>", "arguments")
    assert (hermes.begin, hermes.end) == (generic.begin, generic.end)
    assert hermes.template_tools and not generic.template_tools
    assert FORMATS["llama3"].arguments_key == "parameters" and FORMATS["llama3"].begin == "<|python_tag|>"
    assert FORMATS["mistral"].array and FORMATS["mistral"].begin == "[TOOL_CALLS]"


def test_format_detected_from_the_template(smollm2_template):
    assert format_for(None) == FORMATS["generic"]
    assert format_for(smollm2_template) == FORMATS["generic"]
    assert format_for(HERMES_TEMPLATE) == FORMATS["hermes"]
    assert format_for(LLAMA_TEMPLATE) == FORMATS["llama3"]
    assert format_for(MISTRAL_TEMPLATE) == FORMATS["mistral"]
    assert format_for("{% if tools %}<|python_tag|>{% endif %}").name == "llama3"


def test_markers_without_tools_in_the_template_mean_the_gateway_lists_them():
    fmt = format_for(CHATML_WITH_CALLS_TEMPLATE)
    assert fmt.name == "hermes" and not fmt.template_tools


def test_override(smollm2_template):
    assert format_for(HERMES_TEMPLATE, "generic") == FORMATS["generic"]
    forced = format_for(smollm2_template, "mistral")
    assert forced.name == "mistral" and not forced.template_tools  # SmolLM2's template cannot list tools
    with pytest.raises(ValueError, match="Unknown tool-call format 'qwen'"):
        format_for(HERMES_TEMPLATE, "qwen")


# --- messages for templates that know tools ----------------------------------------------------------------------


def test_template_gets_openai_tools_and_arguments_as_dicts():
    messages, tools = chat_messages(CONVERSATION, TOOLS, FORMATS["hermes"])
    assert tools == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                          "parameters": WEATHER.parameters}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]  # fmt: skip
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[1]["content"] == ""
    assert messages[2:] == CONVERSATION[2:]
    prompt = render(HERMES_TEMPLATE, messages, tools)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>[city]' in prompt
    assert '"name": "get_time"' in prompt.split("<|im_end|>")[0]  # the template listed the tools
    assert "None" not in prompt


def test_template_without_tools_gets_the_messages_unchanged():
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_messages(plain, [], FORMATS["hermes"]) == (plain, None)
    assert chat_messages(plain, [], FORMATS["generic"]) == (plain, None)


def test_empty_tool_calls_key_is_dropped():
    """Llama templates test `'tool_calls' in message`, so a key with nothing in it would read as a call."""
    messages, _ = chat_messages([{"role": "assistant", "content": "Hi", "tool_calls": None}], [], FORMATS["llama3"])
    assert messages == [{"role": "assistant", "content": "Hi"}]


def test_arguments_that_are_not_json_are_a_400_naming_them():
    bad = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{oops"}}]}]  # fmt: skip
    for fmt in (FORMATS["hermes"], FORMATS["generic"]):
        with pytest.raises(APIError) as caught:
            chat_messages(bad, TOOLS, fmt)
        assert caught.value.status_code == 400 and caught.value.param == "messages[0].tool_calls[0].function.arguments"


def test_mistral_gets_call_ids_it_accepts_and_results_that_match():
    messages, tools = chat_messages(CONVERSATION, TOOLS, FORMATS["mistral"])
    ids = [c["id"] for c in messages[1]["tool_calls"]]
    assert all(re.fullmatch("[0-9a-zA-Z]{9}", i) for i in ids) and len(set(ids)) == 2
    assert [messages[2]["tool_call_id"], messages[3]["tool_call_id"]] == ids
    again, _ = chat_messages(CONVERSATION, TOOLS, FORMATS["mistral"])
    assert again == messages  # the same conversation renders the same prompt (prefix caching)
    prompt = render(MISTRAL_TEMPLATE, messages, tools)
    assert f"[TOOL_RESULTS]{ids[0]}:Sunny, 21 C[/TOOL_RESULTS]" in prompt
    kept = [{**CONVERSATION[1], "tool_calls": [{**CONVERSATION[1]["tool_calls"][0], "id": "abcDEF123"}]}]
    assert chat_messages(kept, TOOLS, FORMATS["mistral"])[0][0]["tool_calls"][0]["id"] == "abcDEF123"


# --- messages for templates that do not know tools (the generic format) -------------------------------------------


def test_generic_describes_the_tools_in_a_system_message(smollm2_template):
    messages, tools = chat_messages(CONVERSATION[:1], TOOLS, FORMATS["generic"])
    assert tools is None and messages[1:] == CONVERSATION[:1]
    system = messages[0]
    assert system["role"] == "system"
    assert json.dumps({"name": "get_weather", "description": "The weather in a city.",
                       "parameters": WEATHER.parameters}, separators=(",", ":")) in system["content"]  # fmt: skip
    assert '<tool_call>\n{"name":"<tool name>","arguments":{<its arguments>}}\n</tool_call>' in system["content"]
    prompt = render(smollm2_template, messages, None)
    assert prompt.startswith("<|im_start|>system\nYou can call tools.")
    assert "named SmolLM" not in prompt  # the template's default system message gave way to ours


def test_generic_merges_into_the_first_system_message():
    conversation = [{"role": "user", "content": "x"}, {"role": "system", "content": "Be brief."}]
    messages, _ = chat_messages(conversation, [TIME], FORMATS["generic"])
    assert messages[0] == conversation[0]
    assert messages[1]["content"].startswith("Be brief.\n\nYou can call tools.")
    assert len(messages) == 2


def test_generic_writes_calls_and_results_as_text(smollm2_template):
    messages, _ = chat_messages(CONVERSATION, TOOLS, FORMATS["generic"])
    assert messages[2] == {"role": "assistant", "content": (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>')}  # fmt: skip
    assert messages[3] == {"role": "user", "content": (
        '<tool_response>\n{"name":"get_weather","id":"call_a"}\nSunny, 21 C\n</tool_response>\n'
        '<tool_response>\n{"name":"get_time","id":"call_b"}\n14:05\n</tool_response>')}  # fmt: skip
    assert len(messages) == 4
    prompt = render(smollm2_template, messages, None)
    assert "<|im_start|>user\n<tool_response>" in prompt and "<|im_start|>assistant\n<tool_call>" in prompt


def test_generic_keeps_text_beside_calls_and_an_unknown_call_id():
    conversation = [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "elsewhere", "content": "?"},
        {"role": "user", "content": "And?"},
    ]  # fmt: skip
    messages, _ = chat_messages(conversation, TOOLS, FORMATS["generic"])
    assert messages[1]["content"] == 'Checking.\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert messages[2]["content"] == '<tool_response>\n{"id":"elsewhere"}\n?\n</tool_response>'
    assert messages[3] == conversation[2]


def test_calls_written_as_history_read_back_as_the_same_calls():
    for name in ("generic", "mistral", "llama3"):
        fmt = dataclasses.replace(FORMATS[name], template_tools=False)
        messages, _ = chat_messages(CONVERSATION[:2], TOOLS, fmt)
        parser = OutputParser(fmt, TOOLS)
        parser.feed(messages[-1]["content"])
        parser.finish()
        assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [
            ("get_weather", {"city": "Paris"}),
            ("get_time", {}),
        ]


# --- schemas and constraints ---------------------------------------------------------------------------------------


def _valid(schema: dict, instance) -> bool:
    return jsonschema.validators.validator_for(schema)(schema).is_valid(instance)


def test_call_schema_accepts_exactly_the_calls():
    schema = call_schema(TOOLS, FORMATS["hermes"])
    assert _valid(schema, {"name": "get_weather", "arguments": {"city": "Paris"}})
    assert _valid(schema, {"name": "get_time", "arguments": {}})
    assert not _valid(schema, {"name": "get_weather", "arguments": {}})
    assert not _valid(schema, {"name": "rm", "arguments": {}})
    assert not _valid(schema, {"name": "get_time"})
    assert not _valid(schema, {"name": "get_time", "arguments": {}, "extra": 1})
    assert all(list(one["properties"]) == ["name", "arguments"] for one in schema["anyOf"])


def test_call_schema_per_family():
    llama = call_schema([TIME], FORMATS["llama3"])
    assert llama["properties"]["parameters"] == TIME.parameters and "anyOf" not in llama
    assert _valid(llama, {"name": "get_time", "parameters": {}})
    mistral = call_schema(TOOLS, FORMATS["mistral"])
    assert _valid(mistral, [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}])
    assert not _valid(mistral, []) and not _valid(mistral, {"name": "get_time", "arguments": {}})
    with pytest.raises(ValueError):
        call_schema([], FORMATS["hermes"])


def test_constraint_per_choice():
    hermes = FORMATS["hermes"]
    assert constraint(TOOLS, ToolChoice("none"), hermes, True) is None
    assert constraint([], ToolChoice("auto"), hermes, True) is None
    auto = constraint(TOOLS, ToolChoice("auto"), hermes, True)
    assert auto.lazy and auto.repeat and auto.begin == "<tool_call>\n" and auto.end == "\n</tool_call>"
    assert auto.schema == call_schema(TOOLS, hermes)
    required = constraint(TOOLS, ToolChoice("required"), hermes, False)
    assert not required.lazy and not required.repeat
    named = constraint(TOOLS, ToolChoice("required", "get_time"), hermes, False)
    assert named.schema == call_schema([TIME], hermes) and not named.lazy
    with pytest.raises(ValueError, match="not one of the tools"):
        constraint(TOOLS, ToolChoice("required", "rm"), hermes, False)
    with pytest.raises(ValueError):
        constraint([], ToolChoice("required"), hermes, False)


def test_constraint_for_array_sections():
    mistral = FORMATS["mistral"]
    single = constraint(TOOLS, ToolChoice("auto"), mistral, False)
    assert single.schema["maxItems"] == 1 and not single.repeat
    assert not _valid(single.schema, [{"name": "get_time", "arguments": {}}] * 2)
    parallel = constraint(TOOLS, ToolChoice("required"), mistral, True)
    assert "maxItems" not in parallel.schema and not parallel.repeat  # parallel calls share the one array


@pytest.mark.parametrize("name", list(FORMATS))
def test_output_as_a_constraint_demands_is_read_back(name):
    """begin + compact JSON + end, sections one newline apart: what every engine writes under the constraint."""
    fmt = FORMATS[name]
    held = constraint(TOOLS, ToolChoice("required"), fmt, True)
    calls = [{"name": "get_weather", fmt.arguments_key: {"city": "Köln"}}, {"name": "get_time", fmt.arguments_key: {}}]
    values = [calls] if fmt.array else calls
    for value in values:
        assert _valid(held.schema, value)
    output = "\n".join(held.begin + json.dumps(v, ensure_ascii=False, separators=(",", ":")) + held.end
                       for v in values)  # fmt: skip
    parser = OutputParser(fmt, TOOLS)
    events = parser.feed(output) + parser.finish()
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city":"Köln"}'), ("get_time", "{}")]
    assert not [e for e in events if type(e).__name__ == "Text"]


def test_call_ids():
    ids = {new_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch("call_[0-9A-Za-z]{24}", i) for i in ids)


def test_check_parameters_names_the_bad_part():
    check_parameters(WEATHER.parameters, "tools[0].function.parameters")
    bad = {"type": "object", "properties": {"city": {"type": "string", "pattern": "(unclosed"}}}
    with pytest.raises(APIError) as caught:
        check_parameters(bad, "tools[1].function.parameters")
    assert caught.value.status_code == 400
    assert caught.value.param == "tools[1].function.parameters.properties.city.pattern"
    with pytest.raises(APIError, match="'strin' is not valid"):
        check_parameters({"type": "strin"}, "tools[0].function.parameters")
