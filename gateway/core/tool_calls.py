"""Tool calling for every front end and engine: the call formats of chat templates, the conversation a template is
handed, and the constraint under which a model's calls always parse.

A format says how a model writes one call section: `begin`, the compact JSON of one call (an array of calls for
Mistral), `end`. Templates that know tools get OpenAI-shaped tools and messages. For the others (the generic
format) the gateway describes the tools in a system message, and writes past calls and their results as text in
the same format, so the model sees what it is asked to write.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

from engines.base import ToolCallConstraint
from gateway.errors import invalid_param

ID_ALPHABET = string.ascii_letters + string.digits
ID_CHARS = 24  # random characters of a call id after "call_", as OpenAI's ids


@dataclass(frozen=True)
class ToolSpec:
    """One function a model may call; `parameters` is the JSON schema of its arguments."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    """What the model must do with the tools: "required" with a `name` calls that function only."""

    mode: Literal["none", "auto", "required"]
    name: str | None = None


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes a call section: `begin`, the JSON of a call, `end`."""

    name: str
    begin: str
    end: str
    arguments_key: str  # "arguments" or "parameters" (Llama 3.x)
    array: bool = False  # a section is a JSON array of calls (Mistral), not one call
    template_tools: bool = True  # the chat template renders `tools` itself; else the gateway describes them
    bare: bool = False  # a call may also be the whole reply without `begin`, as Llama 3.x writes custom-tool calls
    id_chars: int = 0  # the template accepts only call ids of this many letters and digits (Mistral: 9); 0: any


_HERMES = {"begin": "<tool_call>\n", "end": "\n</tool_call>", "arguments_key": "arguments"}
FORMATS: dict[str, ToolFormat] = {
    "generic": ToolFormat("generic", template_tools=False, **_HERMES),
    "hermes": ToolFormat("hermes", **_HERMES),  # Hermes 2/3, Qwen2.5, Qwen3
    # Llama 3.1-3.3 templates write custom-tool calls as bare JSON and keep <|python_tag|> for built-in tools; the
    # models also write it before JSON calls, and a constrained call needs a marker to start at.
    "llama3": ToolFormat("llama3", "<|python_tag|>", "", "parameters", bare=True),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", array=True, id_chars=9),
}
_USES_TOOLS = re.compile(r"\{[{%][^}]*?\btools\b")  # a Jinja expression or statement that reads `tools`


def check_parameters(schema: dict[str, Any], param: str) -> None:
    """A 400 naming the place, for tool parameters that are not a JSON schema (checked against its metaschema,
    regex patterns included): a model's arguments are later checked against them, which must not fail."""
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema, format_checker=validator.FORMAT_CHECKER)
    except jsonschema.exceptions.SchemaError as error:
        where = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise invalid_param(where, f"Invalid value for '{where}': {error.message}") from None


@functools.lru_cache(maxsize=64)  # read on every chat request, from a template that stays the same
def format_for(template: str | None, override: str | None = None) -> ToolFormat:
    """The format named by `override`, else the one the template's markers show, else the generic one."""
    if override is not None and override not in FORMATS:
        raise ValueError(f"Unknown tool-call format '{override}'; known: {', '.join(FORMATS)}.")
    fmt = FORMATS[override] if override is not None else _detect(template or "")
    if fmt.template_tools and not _USES_TOOLS.search(template or ""):
        return dataclasses.replace(fmt, template_tools=False)  # the markers are known, the tools are ours to list
    return fmt


def _detect(template: str) -> ToolFormat:
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return FORMATS["llama3"]
    return FORMATS["generic"]


def chat_messages(
    messages: list[dict[str, Any]], tools: list[ToolSpec], fmt: ToolFormat
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` list to hand to `Engine.render_chat`. Messages without tool calls or results,
    and without tools to describe, come back as they were."""
    if fmt.template_tools:
        return [_for_template(m, i, fmt) for i, m in enumerate(messages)], _openai_tools(tools) or None
    return _as_text(messages, tools, fmt), None


def _openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": _describe(tool)} for tool in tools]


def _describe(tool: ToolSpec) -> dict[str, Any]:
    described = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
    return {key: value for key, value in described.items() if value is not None}


def _for_template(message: dict[str, Any], index: int, fmt: ToolFormat) -> dict[str, Any]:
    """HF templates read `function.arguments` as a dict, and test `'tool_calls' in message` (so no empty key)."""
    if message.get("role") == "tool" and fmt.id_chars:
        return {**message, "tool_call_id": _template_id(message.get("tool_call_id") or "", fmt)}
    if "tool_calls" not in message:
        return message
    out = {key: value for key, value in message.items() if key != "tool_calls"}
    if message["tool_calls"]:
        out["tool_calls"] = [
            {"id": _template_id(call_id, fmt), "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in _calls(message, index)
        ]
        out["content"] = out.get("content") or ""  # Jinja writes None as "None"
    return out


def _template_id(call_id: str, fmt: ToolFormat) -> str:
    """The id as the template accepts it; the same id always maps to the same one, so a call and its result match."""
    if not fmt.id_chars or (len(call_id) == fmt.id_chars and call_id.isascii() and call_id.isalnum()):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[: fmt.id_chars]


def _calls(message: dict[str, Any], index: int) -> list[tuple[str, str, Any]]:
    """(id, name, arguments as a JSON value) of each call an assistant message made."""
    calls = []
    for number, call in enumerate(message["tool_calls"]):
        function = call["function"]
        param = f"messages[{index}].tool_calls[{number}].function.arguments"
        calls.append((call.get("id") or "", function["name"], _arguments(function.get("arguments"), param)))
    return calls


def _arguments(arguments: Any, param: str) -> Any:
    if not isinstance(arguments, str):
        return {} if arguments is None else arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        raise invalid_param(param, f"Invalid value for '{param}': the arguments of a tool call must be JSON.") from None


def _as_text(messages: list[dict[str, Any]], tools: list[ToolSpec], fmt: ToolFormat) -> list[dict[str, Any]]:
    """Calls become assistant text in the format; results become user messages (one per run of results)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id → the function called, to name the call each result answers
    answering = False  # the last message out holds tool results, so the next result joins it
    for index, message in enumerate(messages):
        if message.get("role") == "tool":
            block = _result_text(message, names)
            if answering:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
            answering = True
            continue
        answering = False
        if message.get("tool_calls"):
            calls = _calls(message, index)
            names.update((call_id, name) for call_id, name, _ in calls)
            texts = [message.get("content") or "", _calls_text(calls, fmt)]
            out.append({"role": "assistant", "content": "\n".join(text for text in texts if text)})
        else:
            out.append({key: value for key, value in message.items() if key != "tool_calls"})
    return _with_system(out, _tools_prompt(tools, fmt)) if tools else out


def _compact(value: Any) -> str:
    """JSON as a constrained model writes it: no whitespace between tokens."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _calls_text(calls: list[tuple[str, str, Any]], fmt: ToolFormat) -> str:
    objects = [{"name": name, fmt.arguments_key: arguments} for _, name, arguments in calls]
    if fmt.array:
        return fmt.begin + _compact(objects) + fmt.end
    return "\n".join(fmt.begin + _compact(one) + fmt.end for one in objects)


def _result_text(message: dict[str, Any], names: dict[str, str]) -> str:
    call_id = message.get("tool_call_id") or ""
    answered = {"name": names[call_id], "id": call_id} if call_id in names else {"id": call_id}
    return f"<tool_response>\n{_compact(answered)}\n{message.get('content') or ''}\n</tool_response>"


def _tools_prompt(tools: list[ToolSpec], fmt: ToolFormat) -> str:
    example = '{"name":"<tool name>","' + fmt.arguments_key + '":{<its arguments>}}'
    several = (
        "To call several tools, put all the calls in that one list."
        if fmt.array
        else "To call several tools, write one such block for each, one after another."
    )
    return "\n".join([
        "You can call tools. Each line below describes one tool: its name, what it does, and the JSON schema of "
        "its arguments.",
        *(_compact(_describe(tool)) for tool in tools),
        "To call a tool, reply with exactly this, the arguments being one JSON object that matches the tool's "
        "schema:",
        fmt.begin + (f"[{example}]" if fmt.array else example) + fmt.end,
        several,
        "Each result comes back in a user message as a <tool_response> block whose first line names the call it "
        "answers. When no tool is needed, answer normally.",
    ])  # fmt: skip


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` appended to the first system message, or a system message of its own at the start."""
    at = next((i for i, m in enumerate(messages) if m.get("role") == "system"), None)
    if at is None:
        return [{"role": "system", "content": text}, *messages]
    content = messages[at].get("content") or ""
    merged = {**messages[at], "content": f"{content}\n\n{text}" if content else text}
    return [*messages[:at], merged, *messages[at + 1 :]]


def call_schema(tools: list[ToolSpec], fmt: ToolFormat) -> dict[str, Any]:
    """The JSON schema of one call section: {"name": <a tool>, <arguments_key>: <its arguments>}, name first (the
    name is written before the arguments it decides), or an array of those for array formats."""
    if not tools:
        raise ValueError("A tool-call schema needs at least one tool.")
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, fmt.arguments_key: tool.parameters},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    call = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    return {"type": "array", "items": call, "minItems": 1} if fmt.array else call


def constraint(tools: list[ToolSpec], choice: ToolChoice, fmt: ToolFormat, parallel: bool) -> ToolCallConstraint | None:
    """What the engine must hold the output to: nothing for "none" (or "auto" without tools); calls from the first
    token for "required" or a named function; free text until a call begins for "auto"."""
    if choice.mode == "none" or (choice.mode == "auto" and not tools):
        return None
    if choice.name is not None:
        tools = [tool for tool in tools if tool.name == choice.name]
        if not tools:
            raise ValueError(f"tool_choice names '{choice.name}', which is not one of the tools.")
        parallel = False  # a named function is called once: a small model would repeat the call until max_tokens
    schema = call_schema(tools, fmt)
    if fmt.array and not parallel:
        schema = {**schema, "maxItems": 1}
    # An array section already holds parallel calls: more sections would only let a model loop on them.
    return ToolCallConstraint(schema, fmt.begin, fmt.end, lazy=choice.mode == "auto", repeat=parallel and not fmt.array)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_CHARS))
