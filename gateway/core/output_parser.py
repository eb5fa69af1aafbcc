"""A model's output, as it streams, split into text, reasoning and tool calls: the same for every protocol and engine.

Feed the output in any pieces; the events come out the same, only cut differently. Rules:
- Text that may be the start of a marker (`<tool_call>`, `<think>`) is held back until it is known not to be one,
  so no part of a marker ever reaches Text. Whitespace next to a marker is layout, not content: it is dropped
  (before a marker at most WS_HOLD characters of it, which is all that is held back).
- Reasoning (a think block at the start of the reply, or from the start when the prompt opened one) goes to
  Reasoning events only.
- Once a call section begins, nothing of it is Text. Its JSON is read as it arrives: CallStart as soon as the
  function's name is known, then CallArguments with the exact text of the arguments' JSON value as it comes (the
  pieces join to the final `arguments` string; nothing after the value is included).
- A call is checked when its JSON object closes (a known tool, arguments that match its schema), and the output
  when it ends: `feed` raises InvalidToolCall as soon as a call is certainly bad (not JSON, an unknown tool, too
  long), `finish` for a call left incomplete. A missing end marker after a complete call loses nothing and passes.

JSON is scanned by hand here: partial-JSON libraries (partial-json-parser, jiter's partial mode) return values
re-serialized, not where the arguments lie in the text, which is what exact fragments need. The values themselves
are parsed by `json` and checked by `jsonschema`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import jsonschema
import referencing.exceptions

from gateway.core.tool_calls import ToolFormat, ToolSpec, new_call_id

WS_HOLD = 64  # whitespace before a marker that is held back to be dropped; past that, it is text
MAX_SECTION_CHARS = 1 << 18  # the JSON of one call section: ~64K tokens, more than a local model writes at once
MAX_DEPTH = 64  # JSON containers open at once in a section (json_schema.py's bound on schemas); json.loads recurses
ARGUMENT_KEYS = ("arguments", "parameters")  # either names a call's arguments (Llama 3.x writes both)
_STRING_STOP = re.compile(r'["\\]')
_SCALAR = re.compile(r'[^\s,:\[\]{}"]+')
_LITERAL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Event = Text | Reasoning | CallStart | CallArguments


@dataclass(frozen=True)
class ParsedCall:
    """A complete, valid call: `arguments` is the JSON text the model wrote for them."""

    index: int
    id: str
    name: str
    arguments: str


class InvalidToolCall(Exception):
    """The model wrote a call that is not valid: not JSON, an unknown tool, arguments against the schema, cut off."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"


REASONING_FORMATS = (
    ReasoningFormat(),  # Qwen3, DeepSeek-R1 and most others
    ReasoningFormat("[THINK]", "[/THINK]"),  # Magistral
    ReasoningFormat("<seed:think>", "</seed:think>"),  # Seed-OSS
)


@functools.lru_cache(maxsize=64)  # read on every chat request, from a template that stays the same
def reasoning_format(template: str | None) -> ReasoningFormat | None:
    """The think markers of a template that writes or strips think blocks (its end marker appears), or None."""
    return next((fmt for fmt in REASONING_FORMATS if template and fmt.end in template), None)


def starts_inside(prompt_text: str, fmt: ReasoningFormat) -> bool:
    """The rendered prompt ends with an open think block (DeepSeek-R1's generation prompt), so the output starts
    as reasoning."""
    return prompt_text.rstrip().endswith(fmt.start)


class OutputParser:
    """Splits one output into events. `fmt` None: no tool calls are read (all is text or reasoning)."""

    def __init__(
        self, fmt: ToolFormat | None, tools: list[ToolSpec], reasoning: ReasoningFormat | None = None,
        inside_reasoning: bool = False,
    ):  # fmt: skip
        self.calls: list[ParsedCall] = []
        self._fmt = fmt
        self._begin = (fmt.begin.strip(),) if fmt else ()
        self._end = fmt.end.strip() if fmt else ""
        self._validators = {tool.name: _validator(tool.parameters) for tool in tools}
        self._reasoning = reasoning
        self._may_reason = reasoning is not None and not inside_reasoning
        self._state = "reasoning" if reasoning is not None and inside_reasoning else "start"
        self._drop_leading = self._state == "reasoning"  # whitespace just after a marker
        self._buf = ""
        self._events: list[Event] = []
        self._section: _Section | None = None
        self._started = 0  # call objects begun: the next call's index

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self, cut_off: bool = False) -> list[Event]:
        """The events still held back; raises InvalidToolCall if the output ended inside a call. An output `cut_off`
        by its token budget may end in part of a call marker: a call that never began, left out like one cut off."""
        if cut_off and self._state == "text" and self._begin:
            self._buf = self._buf[: len(self._buf) - _partial(self._buf, self._begin)]
        self._run(final=True)
        if self._state == "call":
            raise InvalidToolCall("The model's output ended inside a tool call.")
        return self._take()

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _run(self, final: bool) -> None:
        while _STEPS[self._state](self, final):
            pass

    def _start(self, final: bool) -> bool:
        """At the start of the reply: a think block may open, or (bare formats) the reply may be a call."""
        if self._drop_leading:
            self._buf = self._buf.lstrip()
            self._drop_leading = not self._buf
        rest = self._buf.lstrip()
        if len(self._buf) - len(rest) <= WS_HOLD and (rest or not final):
            opened = self._opens(rest)
            if opened is None and not final:
                return False  # too little yet to tell
            if opened == "reasoning":
                self._buf, self._state, self._drop_leading = rest[len(self._reasoning.start) :], "reasoning", True
                return True
            if opened == "call":
                self._buf = rest
                self._open_section()
                return True
        self._state = "text"
        return True

    def _opens(self, rest: str) -> str | None:
        """What the reply starting with `rest` opens: "reasoning", "call", "" (neither) or None (cannot tell yet)."""
        if self._may_reason:
            start = self._reasoning.start
            if rest.startswith(start):
                return "reasoning"
            if start.startswith(rest):
                return None
        if self._fmt is not None and self._fmt.bare:
            return _bare_call(rest)
        return ""

    def _text(self, final: bool) -> bool:
        text, found = self._free(self._begin, final)
        if text:
            self._events.append(Text(text))
        if found:
            self._open_section()
        return found

    def _in_reasoning(self, final: bool) -> bool:
        text, found = self._free((self._reasoning.end,), final)
        if text:
            self._events.append(Reasoning(text))
        if found:
            self._state, self._may_reason, self._drop_leading = "start", False, True
        return found

    def _free(self, markers: tuple[str, ...], final: bool) -> tuple[str, bool]:
        """Take the free text that is certain from the buffer: (that text, whether one of `markers` followed it)."""
        buf = self._buf
        if self._drop_leading:
            buf = buf.lstrip()
            self._drop_leading = not buf
        at, marker = min(((buf.find(m), m) for m in markers if m in buf), default=(-1, ""))
        if marker:
            self._buf = buf[at + len(marker) :]
            return buf[: _layout_cut(buf[:at])], True
        cut = len(buf) if final or not markers else _layout_cut(buf[: len(buf) - _partial(buf, markers)])
        self._buf = buf[cut:]
        return buf[:cut], False

    def _open_section(self) -> None:
        self._state = "call"
        self._section = _Section(self, self._fmt.array)

    def _in_call(self, final: bool) -> bool:
        rest = self._section.feed(self._buf)
        self._buf = ""
        if rest is None:
            return False
        self._buf, self._state = rest, "after"
        return True

    def _after(self, final: bool) -> bool:
        """Between a section's JSON and its end marker; then back to text."""
        rest = self._buf.lstrip()
        if rest.startswith(self._end):
            self._buf = rest[len(self._end) :]
        elif self._end.startswith(rest):
            self._buf = rest
            if not final:
                return False
            self._buf = ""  # a complete call whose end marker never came
        else:
            raise InvalidToolCall(f"The model wrote {rest[:20]!r} after a tool call instead of {self._end!r}.")
        self._state, self._drop_leading, self._section = "text", True, None
        return True

    def _new_call(self) -> _Call:
        self._started += 1
        return _Call(self._started - 1)

    def _named(self, call: _Call, name: Any) -> None:
        if name not in self._validators:
            raise InvalidToolCall(f"The model called {name!r}, which is not one of the tools.")
        call.name, call.id = name, new_call_id()
        self._events.append(CallStart(call.index, call.id, name))
        self._send_arguments(call)

    def _send_arguments(self, call: _Call | None) -> None:
        """The arguments read so far, once the call's name is out."""
        if call is not None and call.id and call.sent < len(call.arguments):
            self._events.append(CallArguments(call.index, "".join(call.arguments[call.sent :])))
            call.sent = len(call.arguments)

    def _complete(self, call: _Call) -> None:
        if call.name is None or not call.arguments_done:
            missing = "name" if call.name is None else "arguments"
            raise InvalidToolCall(f"The model wrote a tool call without its {missing}.")
        self._send_arguments(call)
        arguments = "".join(call.arguments)
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise InvalidToolCall(f"The arguments of the model's call to '{call.name}' are not valid JSON.") from e
        try:  # the schema passed check_parameters, but a $ref may still lead nowhere
            error = jsonschema.exceptions.best_match(self._validators[call.name].iter_errors(value))
        except (jsonschema.exceptions.SchemaError, referencing.exceptions.Unresolvable) as e:
            raise InvalidToolCall(f"The schema of '{call.name}' cannot check the model's arguments: {e}") from e
        if error is not None:
            raise InvalidToolCall(f"The arguments of the model's call to '{call.name}' do not match its schema: "
                                  f"{error.message}")  # fmt: skip
        self.calls.append(ParsedCall(call.index, call.id, call.name, arguments))


_STEPS: dict[str, Callable[[OutputParser, bool], bool]] = {
    "start": OutputParser._start,
    "text": OutputParser._text,
    "reasoning": OutputParser._in_reasoning,
    "call": OutputParser._in_call,
    "after": OutputParser._after,
}


def _validator(schema: dict[str, Any]) -> Any:
    return jsonschema.validators.validator_for(schema)(schema)


def _bare_call(rest: str) -> str | None:
    """Whether a reply starting with `rest` is a bare JSON call: it opens with {"name" (whitespace between)."""
    if not rest:
        return None
    if not rest.startswith("{"):
        return ""
    inner = rest[1:].lstrip()
    if len(rest) - 1 - len(inner) > WS_HOLD:
        return ""
    if inner.startswith('"name"'):
        return "call"
    return None if '"name"'.startswith(inner) else ""


def _partial(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `markers`."""
    longest = min(len(text), max(len(m) for m in markers) - 1)
    return next((n for n in range(longest, 0, -1) if any(m.startswith(text[-n:]) for m in markers)), 0)


def _layout_cut(text: str) -> int:
    """Where the whitespace at the end of `text` that is dropped (when a marker follows) begins."""
    return len(text) - min(len(text) - len(text.rstrip()), WS_HOLD)


@dataclass
class _Call:
    index: int
    id: str = ""
    name: str | None = None
    arguments: list[str] = field(default_factory=list)  # pieces of the arguments' JSON text
    arguments_done: bool = False
    sent: int = 0  # pieces already in CallArguments events
    keys: set[str] = field(default_factory=set)


@dataclass
class _Frame:
    """An open JSON container (or the root) and what may come next in it."""

    kind: str  # "root", "{" or "["
    expect: str  # "value", "value|end", "key", "key|end", ":", ",|end" or "done"
    key: str | None = None  # in an object: the key whose value comes next
    call: _Call | None = None  # this object is a call


class _Section:
    """The JSON of one call section, read as it arrives: its syntax checked, each call reported to the parser.

    It is scanned piece by piece (no piece is scanned twice): what a piece leaves open (a string, an escape, a
    number) is carried to the next. Only the arguments' text and the keys and name of a call are kept.
    """

    def __init__(self, parser: OutputParser, array: bool):
        self.parser = parser
        self.array = array
        self.frames = [_Frame("root", "value")]
        self.size = 0
        self.piece = ""
        self.in_string = self.escaped = self.string_is_key = False
        self.scalar: list[str] | None = None  # a number or literal under way
        self.captured: list[str] | None = None  # the string under way, where it is a call's key or name
        self.capture_from: int | None = None
        self.call: _Call | None = None
        self.arguments_from: int | None = None  # where in this piece the current call's arguments resume

    def feed(self, piece: str) -> str | None:
        """Scan `piece`; once the section's JSON has ended, the text after it."""
        self.piece, at = piece, 0
        self.arguments_from = 0 if self.arguments_from is not None else None
        self.capture_from = 0 if self.capture_from is not None else None
        while at < len(piece) and self.frames[0].expect != "done":
            at = self._step(at)
        self.size += at
        if self.size > MAX_SECTION_CHARS:
            raise InvalidToolCall(f"A tool call of the model is longer than {MAX_SECTION_CHARS} characters.")
        if self.arguments_from is not None:
            self.call.arguments.append(piece[self.arguments_from : at])
        if self.capture_from is not None:
            self.captured.append(piece[self.capture_from : at])
        self.parser._send_arguments(self.call)
        return piece[at:] if self.frames[0].expect == "done" else None

    def _step(self, at: int) -> int:
        if self.in_string:
            return self._string(at)
        if self.scalar is not None:
            return self._scalar(at)
        char = self.piece[at]
        if char in _WHITESPACE:
            return at + 1
        if char == '"':
            return self._open_string(at)
        if char in "{[":
            self._open(at, char)
            return at + 1
        if char in "}]":
            return self._close(at, char)
        if char in ":,":
            return self._punctuation(at, char)
        self._value_start(at, "scalar")
        self.scalar = []
        return self._scalar(at)

    def _bad(self) -> InvalidToolCall:
        return InvalidToolCall("A tool call of the model is not valid JSON.")

    def _value_start(self, at: int, kind: str) -> bool:
        """A value begins at `at` in the innermost frame; whether it is a call object."""
        parent = self.frames[-1]
        if parent.expect not in ("value", "value|end"):
            raise self._bad()
        parent.expect = "inside"
        depth = len(self.frames)  # 1: the section's value; 2: an element of an array section
        if depth == 1 and kind != ("[" if self.array else "{"):
            raise InvalidToolCall("A tool call must be a JSON " + ("array of calls." if self.array else "object."))
        if depth == 2 and self.array and kind != "{":
            raise InvalidToolCall("Each tool call must be a JSON object.")
        if parent.call is not None:
            self._call_value(at, kind, parent)
        return kind == "{" and depth == (2 if self.array else 1)

    def _call_value(self, at: int, kind: str, parent: _Frame) -> None:
        if parent.key == "name":
            if kind != '"':
                raise InvalidToolCall("The name in a tool call of the model is not a string.")
            self.captured, self.capture_from = [], at
        elif parent.key in ARGUMENT_KEYS:
            self.arguments_from = at

    def _value_end(self, at: int) -> None:
        """The value that began in the innermost frame ended just before `at`."""
        parent = self.frames[-1]
        parent.expect = "done" if parent.kind == "root" else ",|end"
        if parent.call is None:
            return
        if parent.key == "name":
            self.parser._named(parent.call, self._captured_string(at))
        elif parent.key in ARGUMENT_KEYS:
            parent.call.arguments.append(self.piece[self.arguments_from : at])
            parent.call.arguments_done, self.arguments_from = True, None

    def _captured_string(self, at: int) -> str:
        """The JSON string captured from its opening quote up to `at`, decoded."""
        self.captured.append(self.piece[self.capture_from : at])
        text, self.captured, self.capture_from = "".join(self.captured), None, None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise self._bad() from None

    def _open(self, at: int, kind: str) -> None:
        is_call = self._value_start(at, kind)
        if len(self.frames) > MAX_DEPTH:
            raise InvalidToolCall(f"A tool call of the model nests deeper than {MAX_DEPTH} levels.")
        self.frames.append(_Frame(kind, "key|end" if kind == "{" else "value|end"))
        if is_call:
            self.call = self.frames[-1].call = self.parser._new_call()

    def _close(self, at: int, char: str) -> int:
        frame = self.frames[-1]
        if frame.kind != {"}": "{", "]": "["}[char] or not frame.expect.endswith("end"):
            raise self._bad()
        self.frames.pop()
        self._value_end(at + 1)
        if frame.call is not None:
            self.parser._complete(frame.call)
        elif len(self.frames) == 1 and self.array and frame.expect == "value|end":
            raise InvalidToolCall("The model wrote an empty list of tool calls.")
        return at + 1

    def _punctuation(self, at: int, char: str) -> int:
        frame = self.frames[-1]
        if char == ":" and frame.expect == ":":
            frame.expect = "value"
        elif char == "," and frame.expect == ",|end":
            frame.expect = "key" if frame.kind == "{" else "value"
        else:
            raise self._bad()
        return at + 1

    def _open_string(self, at: int) -> int:
        frame = self.frames[-1]
        self.in_string, self.string_is_key = True, frame.expect in ("key", "key|end")
        if self.string_is_key:
            frame.expect = "key-inside"
            if frame.call is not None:
                self.captured, self.capture_from = [], at
        else:
            self._value_start(at, '"')
        return self._string(at + 1)

    def _string(self, at: int) -> int:
        piece = self.piece
        if self.escaped:
            self.escaped, at = False, at + 1
        found = _STRING_STOP.search(piece, at)
        if found is None:
            return len(piece)
        at = found.start()
        if piece[at] == "\\":
            self.escaped = at + 1 == len(piece)
            return min(at + 2, len(piece))
        self.in_string = False
        if self.string_is_key:
            self._key_end(at + 1)
        else:
            self._value_end(at + 1)
        return at + 1

    def _key_end(self, at: int) -> None:
        frame = self.frames[-1]
        frame.expect = ":"
        if frame.call is None:
            return
        frame.key = self._captured_string(at)
        if frame.key == "name" or frame.key in ARGUMENT_KEYS:
            kind = "name" if frame.key == "name" else "arguments"
            if kind in frame.call.keys:
                raise InvalidToolCall(f"A tool call of the model has its {kind} twice.")
            frame.call.keys.add(kind)

    def _scalar(self, at: int) -> int:
        match = _SCALAR.match(self.piece, at)
        end = match.end() if match else at
        self.scalar.append(self.piece[at:end])
        if end == len(self.piece):
            return end  # it may go on in the next piece
        literal, self.scalar = "".join(self.scalar), None
        if not _LITERAL.fullmatch(literal):
            raise self._bad()
        self._value_end(end)
        return end
