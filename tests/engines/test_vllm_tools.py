"""The vLLM engine's constrained generation (issue 27): tool-call sections and compact JSON, on the default model's
Hugging Face copy. vLLM lives in its own virtualenv, so one engine for all these tests runs there
(tests/engines/vllm_pipe.py), and the tests send it requests over a pipe: a start takes minutes on two cores."""

from __future__ import annotations

import copy
import json
import os
import re
import select
import subprocess
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import ENGINES, ROOT, STARTUP_SECONDS, require, skip_unless_ci
from tests.engines.vllm_pipe import GGUF

VLLM = ENGINES["vllm"]
BEGIN, END = "<tool_call>\n", "\n</tool_call>"  # the generic format's markers
WEATHER_ARGUMENTS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "when": {
            "type": "object",
            "properties": {
                "day": {"enum": ["today", "tomorrow"]},
                "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
            },
            "required": ["day", "hours"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "when"],
    "additionalProperties": False,
}
CALL = {  # one call in the generic format: name first, then the arguments it decides
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_ARGUMENTS},
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
ASK = [
    {"role": "system", "content": "You can call get_weather(city, when). To call it, write " + BEGIN
     + '{"name":"get_weather","arguments":{"city":"...","when":{"day":"today","hours":[9]}}}' + END},
    {"role": "user", "content": "What will the weather be in Paris tomorrow morning?"},
]  # fmt: skip
STRING = re.compile(r'"(?:\\.|[^"\\])*"')


# ---- the engine, in vLLM's virtualenv ---------------------------------------------------------


class Engine:
    """The engine process: one JSON line a request, one a reply."""

    def __init__(self, process: subprocess.Popen, log: Path):
        self.process, self.log = process, log

    def ask(self, request: dict, within: float) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.reply(within)

    def reply(self, within: float) -> dict:
        readable, _, _ = select.select([self.process.stdout], [], [], within)
        line = self.process.stdout.readline() if readable else ""
        assert line, f"no reply from the vLLM engine within {within}s:\n{self.log.read_text()[-4000:]}"
        return json.loads(line)

    def generate(self, messages: list[dict], **params) -> dict:
        reply = self.ask({"messages": messages, "params": {"temperature": 0, **params}}, within=120)
        assert "error" not in reply, reply
        return reply

    def first_token(self, text: str) -> int:
        return self.ask({"encode": text}, within=30)["ids"][0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    require(VLLM)
    if not (GGUF.with_name(GGUF.stem + "-hf") / "config.json").exists():
        skip_unless_ci(f"the Hugging Face copy of {GGUF.name} is missing: run `make models-hf`")
    log = tmp_path_factory.mktemp("vllm-tools") / "engine.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([str(VLLM.python), "-m", "tests.engines.vllm_pipe"], cwd=ROOT, text=True,
                                   env={**os.environ, **VLLM.env},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink)  # fmt: skip
    served = Engine(process, log)
    try:
        assert served.reply(STARTUP_SECONDS) == {"ready": True}
        yield served
    finally:
        process.stdin.close()  # vllm_pipe closes the engine at the end of its input
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


# ---- what the output must be ------------------------------------------------------------------


def sections(text: str) -> list[dict]:
    """The calls of `text`, which must be nothing but complete call sections, one newline between two."""
    assert text.startswith(BEGIN) and text.endswith(END), text
    bodies = text[len(BEGIN) : -len(END)].split(END + "\n" + BEGIN)
    return [compact_json(body) for body in bodies]


def compact_json(text: str) -> dict:
    """`text` parsed, after checking it has no whitespace between its tokens (only inside strings)."""
    assert not re.search(r"\s", STRING.sub('""', text)), f"whitespace between JSON tokens: {text!r}"
    return json.loads(text)


def valid(call: dict) -> dict:
    jsonschema.validate(call, CALL)
    return call


def depth(text: str) -> int:
    """How deep objects and arrays nest in `text` (also in JSON cut off before its end)."""
    deepest = level = 0
    for char in STRING.sub('""', text):
        level += {"{": 1, "[": 1, "}": -1, "]": -1}.get(char, 0)
        deepest = max(deepest, level)
    return deepest


def forced(**fields) -> dict:
    return {"schema": CALL, "begin": BEGIN, "end": END, **fields}


# ---- the tests --------------------------------------------------------------------------------


def test_a_forced_call_is_one_valid_compact_section_and_then_the_end(engine):
    reply = engine.generate(ASK, max_tokens=200, tool_calls=forced())
    assert reply["finish_reason"] == "stop"
    [call] = sections(reply["text"])
    assert valid(call)["arguments"]["city"]
    # ignore_eos with only one call allowed: the end is all that may follow, and it ends the output (vLLM would let
    # any text through once its grammar has taken an end token).
    endless = engine.generate(ASK, max_tokens=200, ignore_eos=True, tool_calls=forced())
    assert endless["finish_reason"] == "stop" and len(sections(endless["text"])) == 1


def test_repeated_calls_follow_one_newline_each(engine):
    # ignore_eos keeps the model writing sections until the budget ends; the last one is cut off.
    reply = engine.generate(ASK, max_tokens=240, ignore_eos=True, tool_calls=forced(repeat=True))
    assert reply["finish_reason"] == "length"
    complete = reply["text"][: reply["text"].rindex(END) + len(END)]
    calls = sections(complete)
    assert len(calls) >= 2 and all(valid(call) for call in calls)
    cut = reply["text"][len(complete) :]  # the start of one more section, after its newline
    assert cut and (("\n" + BEGIN).startswith(cut) or cut.startswith("\n" + BEGIN)), cut


def test_lazy_leaves_text_alone_until_a_call_begins_and_then_completes_it(engine):
    # Cities the prompt never names: the model, asked about Paris, writes one only where the grammar holds it.
    elsewhere = copy.deepcopy(CALL)
    elsewhere["properties"]["arguments"]["properties"]["city"] = {"enum": ["Lyon", "Nice"]}
    lazy = forced(schema=elsewhere, lazy=True)
    plain = engine.generate(ASK, max_tokens=60, tool_calls=lazy)
    assert plain["text"].strip() and "<tool_call>" not in plain["text"], plain
    # A bias on the marker's first token makes the model start a call (a larger one makes it write "<" again and
    # again); from there on the call must complete validly.
    started = engine.generate(ASK, max_tokens=200, logit_bias={engine.first_token(BEGIN): 5}, tool_calls=lazy)
    assert started["finish_reason"] == "stop"
    [call] = sections(started["text"])
    jsonschema.validate(call, elsewhere)


def test_markers_that_are_special_tokens_stay_in_the_text(engine):
    # Mistral's [TOOL_CALLS] is a special token; SmolLM2 has none in its tool format, so two of its own stand in.
    reply = engine.generate(ASK, max_tokens=200, tool_calls=forced(begin="<jupyter_code>", end="<jupyter_output>"))
    assert reply["text"].startswith("<jupyter_code>{") and reply["text"].endswith("}<jupyter_output>"), reply
    valid(compact_json(reply["text"][len("<jupyter_code>") : -len("<jupyter_output>")]))


@pytest.mark.parametrize("constraint", ["json_schema", "tool_calls"])
def test_no_whitespace_between_json_tokens_even_when_the_model_leans_to_it(engine, constraint):
    bias = {engine.first_token(space): 8 for space in (" ", "\n", "  ")}
    fields = {"json_schema": CALL} if constraint == "json_schema" else {"tool_calls": forced()}
    reply = engine.generate(ASK, max_tokens=200, logit_bias=bias, **fields)
    assert reply["finish_reason"] == "stop"
    text = reply["text"] if constraint == "json_schema" else reply["text"][len(BEGIN) : -len(END)]
    valid(compact_json(text))


def test_json_object_nests_eight_levels_at_most(engine):
    nested = '{"a":' * 13 + "1" + "}" * 13
    ask = [{"role": "user", "content": f"Repeat this JSON exactly: {nested}"}]
    assert depth(engine.generate(ask, max_tokens=120)["text"]) > 8  # unconstrained, the model nests deeper
    reply = engine.generate(ask, max_tokens=120, json_schema={"type": "object"})
    assert reply["finish_reason"] == "stop" and compact_json(reply["text"]) and depth(reply["text"]) == 8, reply


def test_a_schema_its_grammar_engine_refuses_is_a_client_error_naming_tools(engine):
    pattern = {**CALL, "properties": {**CALL["properties"], "arguments": {"type": "string", "pattern": "(?=a)b"}}}
    reply = engine.ask({"messages": ASK, "params": {"max_tokens": 10, "tool_calls": forced(schema=pattern)}}, 120)
    assert reply["error"]["type"] == "UnsupportedFeature" and reply["error"]["param"] == "tools", reply
    assert "look-around" in reply["error"]["message"]
