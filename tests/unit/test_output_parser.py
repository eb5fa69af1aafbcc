"""The output parser: the same events whatever the pieces an output streams in, no marker in the text, arguments
as exact pieces of what the model wrote, and bad calls refused."""

from __future__ import annotations

import json
import random

import pytest

from gateway.core.output_parser import (
    MAX_DEPTH,
    MAX_SECTION_CHARS,
    WS_HOLD,
    CallArguments,
    CallStart,
    InvalidToolCall,
    OutputParser,
    Reasoning,
    ReasoningFormat,
    Text,
    reasoning_format,
    starts_inside,
)
from gateway.core.tool_calls import FORMATS, ToolSpec

WEATHER = ToolSpec(
    "get_weather", "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
)  # fmt: skip
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {}})
TOOLS = [WEATHER, TIME]
THINK = ReasoningFormat()


def _pieces(output: str) -> list[list[str]]:
    """The output in one piece, char by char, and cut at random places (seeded, so a failure repeats)."""
    ways = [[output], list(output)]
    for seed in range(12):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(output)), min(len(output) - 1, rng.randint(1, 12)))) if output else []
        ways.append([output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)])])
    return ways


def _parser(fmt: str | None, reasoning: ReasoningFormat | None, inside: bool) -> OutputParser:
    return OutputParser(FORMATS[fmt] if fmt else None, TOOLS, reasoning, inside)


def _run(parser: OutputParser, pieces: list[str]) -> list:
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def _merged(events: list) -> list:
    """Adjacent pieces of the same kind joined, call ids checked against the calls and left out."""
    out: list = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, (Text, Reasoning)) and type(last) is type(event):
            out[-1] = type(event)(last.text + event.text)
        elif isinstance(event, CallArguments) and isinstance(last, CallArguments) and last.index == event.index:
            out[-1] = CallArguments(event.index, last.text + event.text)
        elif isinstance(event, CallStart):
            out.append(("start", event.index, event.name))
        else:
            out.append(event)
    return out


def parse(output: str, fmt: str | None = "hermes", reasoning: ReasoningFormat | None = None, inside: bool = False):
    """Events (merged) and calls, the same for every way of cutting the output into pieces."""
    seen = []
    for pieces in _pieces(output):
        parser = _parser(fmt, reasoning, inside)
        events = _run(parser, pieces)
        starts = [e for e in events if isinstance(e, CallStart)]
        assert [(s.index, s.id, s.name) for s in starts] == [(c.index, c.id, c.name) for c in parser.calls]
        for call in parser.calls:
            assert "".join(e.text for e in events if isinstance(e, CallArguments) and e.index == call.index) == (
                call.arguments
            )
        assert all(e.text for e in events if isinstance(e, (Text, Reasoning, CallArguments)))
        seen.append((_merged(events), [(c.index, c.name, c.arguments) for c in parser.calls]))
    assert all(result == seen[0] for result in seen), "the events depend on how the output was cut"
    return seen[0]


def refused(output: str, match: str, fmt: str = "hermes", reasoning: ReasoningFormat | None = None) -> None:
    """Every way of cutting the output raises InvalidToolCall, from feed or finish."""
    for pieces in _pieces(output):
        with pytest.raises(InvalidToolCall, match=match):
            _run(_parser(fmt, reasoning, False), pieces)


def call(index: int, name: str, arguments: str) -> list:
    return [("start", index, name), CallArguments(index, arguments)]


# --- text only ---------------------------------------------------------------------------------------------------


def test_plain_text_passes_exactly():
    text = '  Hello,\n\nworld! <b>bold</b> a < b and {"json": 1}\n\n'
    assert parse(text) == ([Text(text)], [])


def test_without_a_format_markers_are_text():
    text = '<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call><think>x</think>'
    assert parse(text, fmt=None) == ([Text(text)], [])


def test_text_like_a_marker_is_text_once_it_cannot_be_one():
    text = "Use <tool> or <tool_cal or <think> here <tool_call"
    assert parse(text, reasoning=THINK) == ([Text(text)], [])


def test_empty_output():
    assert parse("") == ([], [])
    assert parse("", reasoning=THINK, inside=True) == ([], [])


# --- calls, by family --------------------------------------------------------------------------------------------


def test_hermes_call_as_constrained():
    output = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
    assert parse(output) == (call(0, "get_weather", '{"city":"Paris"}'), [(0, "get_weather", '{"city":"Paris"}')])


def test_hermes_call_as_qwen_writes_it_unconstrained():
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    assert parse(output)[0] == call(0, "get_weather", '{"city": "Paris", "days": 3}')


def test_generic_format_reads_as_hermes():
    output = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert parse(output, fmt="generic")[0] == call(0, "get_time", "{}")


def test_parallel_hermes_calls():
    output = (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    )
    events, calls = parse(output)
    assert events == call(0, "get_weather", '{"city":"Paris"}') + call(1, "get_time", "{}")
    assert [c[0] for c in calls] == [0, 1]


def test_llama3_call_after_python_tag():
    output = '<|python_tag|>{"name":"get_weather","parameters":{"city":"Oslo"}}'
    assert parse(output, fmt="llama3")[0] == call(0, "get_weather", '{"city":"Oslo"}')


def test_llama3_parallel_sections():
    output = '<|python_tag|>{"name":"get_time","parameters":{}}\n<|python_tag|>{"name":"get_time","parameters":{}}'
    assert parse(output, fmt="llama3")[0] == call(0, "get_time", "{}") + call(1, "get_time", "{}")


def test_llama3_bare_json_call_as_its_template_writes_it():
    output = '\n{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert parse(output, fmt="llama3")[0] == call(0, "get_weather", '{"city": "Oslo"}')


def test_llama3_json_that_is_not_a_call_is_text():
    for text in ['{"answer": 42}', '{ "nam', "{}", "{ }", 'Here: {"name": "x"}']:
        assert parse(text, fmt="llama3") == ([Text(text)], [])


def test_bare_json_only_counts_for_formats_that_write_it():
    text = '{"name":"get_time","arguments":{}}'
    assert parse(text, fmt="hermes") == ([Text(text)], [])


def test_mistral_array_of_calls():
    output = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "get_time", "arguments": {}, "id": "abcdefghi"}]'
    )
    assert parse(output, fmt="mistral")[0] == call(0, "get_weather", '{"city": "Rome"}') + call(1, "get_time", "{}")


def test_mistral_compact():
    output = '[TOOL_CALLS][{"name":"get_time","arguments":{}}]'
    assert parse(output, fmt="mistral")[0] == call(0, "get_time", "{}")


def test_arguments_before_the_name():
    output = '<tool_call>\n{"arguments": {"city": "Lima"}, "name": "get_weather"}\n</tool_call>'
    assert parse(output)[0] == call(0, "get_weather", '{"city": "Lima"}')


def test_arguments_keep_escapes_and_unicode_exactly():
    arguments = '{"city":"Z\\u00fcrich \\"old\\" \\\\ town\\n","days":2}'
    output = f'<tool_call>\n{{"name":"get_weather","arguments":{arguments}}}\n</tool_call>'
    events, calls = parse(output)
    assert calls == [(0, "get_weather", arguments)]
    assert json.loads(calls[0][2]) == {"city": 'Zürich "old" \\ town\n', "days": 2}


def test_nested_arguments_with_brackets_in_strings():
    tool = ToolSpec("f", None, {"type": "object"})
    arguments = '{"a":[1,{"b":"}]{["}],"name":"not the name","c":{"d":null,"e":true}}'
    output = f'<tool_call>\n{{"name":"f","arguments":{arguments}}}\n</tool_call>'
    parser = OutputParser(FORMATS["hermes"], [tool])
    events = _run(parser, list(output))
    assert [c.arguments for c in parser.calls] == [arguments]
    assert [e.name for e in events if isinstance(e, CallStart)] == ["f"]


def test_missing_end_marker_after_a_complete_call_passes():
    for cut in ["", "\n", "\n</tool"]:
        output = '<tool_call>\n{"name":"get_time","arguments":{}}' + cut
        assert parse(output) == (call(0, "get_time", "{}"), [(0, "get_time", "{}")])


# --- text and calls together ---------------------------------------------------------------------------------------


def test_text_before_a_call():
    output = 'Let me look that up.\n\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>'
    assert parse(output)[0] == [Text("Let me look that up."), *call(0, "get_time", "{}")]


def test_text_after_calls_and_separators_dropped():
    output = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>\n\nDone.'
    assert parse(output)[0] == [*call(0, "get_time", "{}"), Text("Done.")]


def test_only_so_much_whitespace_before_a_marker_is_dropped():
    spaces = "\n" * (WS_HOLD + 36)
    output = f'Hi{spaces}<tool_call>\n{{"name":"get_time","arguments":{{}}}}\n</tool_call>'
    assert parse(output)[0] == [Text("Hi" + "\n" * 36), *call(0, "get_time", "{}")]


def test_marker_split_across_pieces_never_reaches_text():
    parser = _parser("hermes", None, False)
    assert parser.feed("Sure <tool") == [Text("Sure")]
    assert parser.feed("_") == []
    assert parser.feed('call>\n{"name":"get_ti') == []
    (start,) = parser.feed('me"')
    assert start.name == "get_time"


def test_text_held_back_only_while_it_may_be_a_marker():
    parser = _parser("hermes", None, False)
    assert parser.feed("a <tool") == [Text("a")]
    assert parser.feed("box>") == [Text(" <toolbox>")]
    assert parser.finish() == []


# --- streaming of a call -----------------------------------------------------------------------------------------


def test_call_start_as_soon_as_the_name_is_known():
    parser = _parser("hermes", None, False)
    assert parser.feed('<tool_call>\n{"name":"get_weat') == []
    (start,) = parser.feed('her",')
    assert isinstance(start, CallStart) and start.name == "get_weather" and start.index == 0
    assert start.id.startswith("call_") and len(start.id) == 29


def test_arguments_stream_as_they_arrive_without_the_closing_part():
    parser = _parser("hermes", None, False)
    head = parser.feed('<tool_call>\n{"name":"get_weather","arguments":{"city":"Par')
    assert head[1:] == [CallArguments(0, '{"city":"Par')]
    assert parser.feed('is"}') == [CallArguments(0, 'is"}')]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish() == []
    assert parser.calls[0].arguments == '{"city":"Paris"}'


def test_arguments_before_the_name_wait_for_it():
    parser = _parser("hermes", None, False)
    assert parser.feed('<tool_call>\n{"arguments":{"city":"Lima"},') == []
    events = parser.feed('"name":"get_weather"}')
    assert [type(e) for e in events] == [CallStart, CallArguments] and events[1].text == '{"city":"Lima"}'


def test_events_come_in_order_with_the_call_in_one_piece():
    parser = _parser("hermes", THINK, False)
    events = parser.feed('<think>hm</think>Ok.<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>')
    assert [type(e) for e in events] == [Reasoning, Text, CallStart, CallArguments]


# --- reasoning ---------------------------------------------------------------------------------------------------


def test_reasoning_then_answer():
    output = "<think>\nThe user greets me.\n</think>\n\nHello!"
    assert parse(output, reasoning=THINK) == ([Reasoning("The user greets me."), Text("Hello!")], [])


def test_reasoning_then_call():
    output = (
        '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Nice"}}'
        "\n</tool_call>"
    )
    assert parse(output, reasoning=THINK)[0] == [
        Reasoning("I need the weather."),
        *call(0, "get_weather", '{"city":"Nice"}'),
    ]


def test_reasoning_then_bare_llama_call():
    output = '<think>x</think>\n{"name":"get_time","parameters":{}}'
    assert parse(output, fmt="llama3", reasoning=THINK)[0] == [Reasoning("x"), *call(0, "get_time", "{}")]


def test_prompt_that_opened_the_think_block():
    output = "Let me think.\n</think>\n\nAnswer."
    assert parse(output, reasoning=THINK, inside=True) == ([Reasoning("Let me think."), Text("Answer.")], [])


def test_reasoning_cut_off_is_still_reasoning():
    assert parse("<think>still thinking", reasoning=THINK) == ([Reasoning("still thinking")], [])


def test_call_marker_inside_reasoning_is_reasoning():
    output = "<think>maybe <tool_call> later</think>no"
    assert parse(output, reasoning=THINK) == ([Reasoning("maybe <tool_call> later"), Text("no")], [])


def test_think_block_only_at_the_start():
    text = "Hi <think>not reasoning</think>"
    assert parse(text, reasoning=THINK) == ([Text(text)], [])
    assert parse("Hi</think>x", reasoning=THINK) == ([Text("Hi</think>x")], [])


def test_other_reasoning_markers():
    fmt = ReasoningFormat("[THINK]", "[/THINK]")
    assert parse("[THINK]a[/THINK]b", reasoning=fmt) == ([Reasoning("a"), Text("b")], [])


def test_reasoning_format_from_templates():
    assert reasoning_format("{{ '<think>\\n' }}{{ content.split('</think>')[-1] }}") == THINK
    assert reasoning_format("{{ '[THINK]' + thinking + '[/THINK]' }}") == ReasoningFormat("[THINK]", "[/THINK]")
    assert reasoning_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert reasoning_format(None) is None


def test_starts_inside():
    assert starts_inside("<|User|>Hi<|Assistant|><think>\n", THINK)
    assert not starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)
    assert not starts_inside("<|im_start|>assistant\n", THINK)


# --- refused calls -----------------------------------------------------------------------------------------------


def test_unknown_tool_is_refused_as_soon_as_named():
    parser = _parser("hermes", None, False)
    with pytest.raises(InvalidToolCall, match="not one of the tools"):
        parser.feed('<tool_call>\n{"name":"rm_rf","arguments":')
    refused('<tool_call>\n{"name":"rm_rf","arguments":{}}\n</tool_call>', "not one of the tools")


def test_arguments_against_the_schema():
    refused('<tool_call>\n{"name":"get_weather","arguments":{"days":1}}\n</tool_call>', "'city' is a required")
    refused('<tool_call>\n{"name":"get_weather","arguments":{"city":7}}\n</tool_call>', "do not match its schema")
    refused('<tool_call>\n{"name":"get_weather","arguments":"{\\"city\\":\\"x\\"}"}\n</tool_call>', "not of type")


def test_incomplete_calls():
    for output in ["<tool_call>", "<tool_call>\n", '<tool_call>\n{"name":"get_time","arguments":{', "[TOOL_CALLS]["]:
        refused(output, "ended inside a tool call", fmt="mistral" if output.startswith("[") else "hermes")


def test_not_json():
    refused("<tool_call>\nget_time()\n</tool_call>", "must be a JSON object")
    refused('<tool_call>\n{"name":"get_time" "arguments":{}}\n</tool_call>', "not valid JSON")
    refused('<tool_call>\n{"name":"get_time","arguments":{"a":tru}}\n</tool_call>', "not valid JSON")
    refused('<tool_call>\n{"name":"get_time","arguments":{}]\n</tool_call>', "not valid JSON")
    refused('<tool_call>\n{"name":"get\\x","arguments":{}}\n</tool_call>', "not valid JSON")
    refused('<tool_call>\n{"name":"get_time","arguments":{},}\n</tool_call>', "not valid JSON")


def test_something_else_instead_of_the_end_marker():
    refused('<tool_call>\n{"name":"get_time","arguments":{}}}\n</tool_call>', "after a tool call")


def test_call_without_name_or_arguments():
    refused('<tool_call>\n{"arguments":{}}\n</tool_call>', "without its name")
    refused('<tool_call>\n{"name":"get_time"}\n</tool_call>', "without its arguments")
    refused('<tool_call>\n{"name":["get_time"],"arguments":{}}\n</tool_call>', "not a string")


def test_twice_the_name_or_the_arguments():
    refused('<tool_call>\n{"name":"get_time","name":"get_time","arguments":{}}\n</tool_call>', "name twice")
    refused('<tool_call>\n{"name":"get_time","arguments":{},"parameters":{}}\n</tool_call>', "arguments twice")


def test_mistral_shapes():
    refused('[TOOL_CALLS]{"name":"get_time","arguments":{}}', "array of calls", fmt="mistral")
    refused("[TOOL_CALLS][]", "empty list", fmt="mistral")
    refused('[TOOL_CALLS]["get_time"]', "must be a JSON object", fmt="mistral")


def test_section_longer_than_the_limit():
    tool = ToolSpec("write", None, {"type": "object"})
    long = '<tool_call>\n{"name":"write","arguments":{"text":"' + "x" * MAX_SECTION_CHARS + '"}}\n</tool_call>'
    for size in (len(long), 1000):
        parser = OutputParser(FORMATS["hermes"], [tool])
        with pytest.raises(InvalidToolCall, match="longer than"):
            for at in range(0, len(long), size):
                parser.feed(long[at : at + size])
    fits = '<tool_call>\n{"name":"write","arguments":{"text":"' + "x" * (MAX_SECTION_CHARS - 100) + '"}}'
    parser = OutputParser(FORMATS["hermes"], [tool])
    for at in range(0, len(fits), 1000):
        parser.feed(fits[at : at + 1000])
    parser.finish()
    assert len(parser.calls[0].arguments) == MAX_SECTION_CHARS - 100 + len('{"text":""}')


def test_arguments_with_a_raw_control_character_are_not_json():
    refused('<tool_call>\n{"name":"get_weather","arguments":{"city":"a\nb"}}\n</tool_call>', "are not valid JSON")


def test_nesting_past_the_limit():
    tool = ToolSpec("deep", None, {"type": "object"})
    deep = '{"a":' * (MAX_DEPTH - 2) + "1" + "}" * (MAX_DEPTH - 2)
    parser = OutputParser(FORMATS["hermes"], [tool])
    parser.feed(f'<tool_call>\n{{"name":"deep","arguments":{deep}}}\n</tool_call>')
    assert json.loads(parser.calls[0].arguments) == json.loads(deep)
    parser = OutputParser(FORMATS["hermes"], [tool])
    with pytest.raises(InvalidToolCall, match=f"deeper than {MAX_DEPTH}"):
        parser.feed('<tool_call>\n{"name":"deep","arguments":' + '{"a":' * MAX_DEPTH)


def test_a_schema_that_cannot_check_is_a_refused_call_not_a_crash():
    tool = ToolSpec("f", None, {"$ref": "#/$defs/missing"})
    parser = OutputParser(FORMATS["hermes"], [tool])
    with pytest.raises(InvalidToolCall, match="cannot check"):
        parser.feed('<tool_call>\n{"name":"f","arguments":{}}\n</tool_call>')


def test_a_call_marker_cut_off_by_the_budget_never_reaches_text():
    parser = _parser("hermes", None, False)
    first = '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>\n<tool_ca'
    events = parser.feed(first) + parser.finish(cut_off=True)
    assert not [event for event in events if isinstance(event, Text)]
    assert len(parser.calls) == 1
    ended = _parser("hermes", None, False)
    assert ended.feed("Sure <tool") + ended.finish() == [Text("Sure"), Text(" <tool")]  # not cut: it was text
