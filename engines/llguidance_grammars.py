"""What constrained generation may write, as llguidance grammars (the transformers engine's matcher, and vLLM's
guidance backend): JSON matching a schema, and tool-call sections.

JSON under any constraint is compact, with no whitespace between its tokens: a small model allowed free whitespace
can write it until max_tokens. A tool call is `begin`, JSON, `end` (ToolCallConstraint); lazily, a lazy lexeme of
free text ending at the first `begin` starts it, so free text runs until the model writes `begin`, and from there
the grammar holds it to complete sections. A marker piece that is one of the tokenizer's special tokens (Mistral's
`[TOOL_CALLS]`) is that token in the grammar, as the model writes it.
"""

from __future__ import annotations

import json
import re

import llguidance

from engines.base import ToolCallConstraint
from engines.json_schema import INTEGER_BOUNDS, MOST_INTEGER

# llguidance's JSON options: no whitespace anywhere; a client's own `x-guidance` options give way to these.
COMPACT = {"whitespace_flexible": False}
# json_object mode (schema {"type": "object"}): values nest this many levels at most, the outer object included.
JSON_OBJECT_DEPTH = 8
JSON_OBJECT = {"type": "object"}
# Free text: anything, across lines (special tokens are not text: llguidance's regexes never match them).
FREE_TEXT = r"TEXT: /(.|\n)*/"

Piece = str | int  # a marker's text, or the id of a special token in it


def compact_schema(schema: dict) -> dict:
    """`schema` with llguidance's options for compact JSON; json_object's schema bounded in depth, integers in size."""
    if schema == JSON_OBJECT:
        schema = bounded_object(JSON_OBJECT_DEPTH)
    schema = _bounded_integers(schema)
    return {**{key: value for key, value in schema.items() if key != "x-guidance"}, "x-guidance": COMPACT}


def _bounded_integers(node):
    """A copy of a schema in which every integer without bounds gets MOST_INTEGER's (its subschemas too)."""
    if isinstance(node, list):
        return [_bounded_integers(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _bounded_integers(value) for key, value in node.items()}
    types = node.get("type")
    if (types == "integer" or isinstance(types, list) and "integer" in types) and not any(
        key in node for key in INTEGER_BOUNDS
    ):
        copy.update(minimum=-MOST_INTEGER, maximum=MOST_INTEGER)
    return copy


def bounded_object(depth: int) -> dict:
    """Any JSON object whose values nest `depth` levels at most: `level<k>` is any value nesting k levels at most."""
    scalars = ["null", "boolean", "number", "string"]
    levels = {"level0": {"type": scalars}}
    for k in range(1, depth):
        inner = {"$ref": f"#/$defs/level{k - 1}"}
        levels[f"level{k}"] = {"type": [*scalars, "array", "object"], "items": inner, "additionalProperties": inner}
    return {"type": "object", "additionalProperties": {"$ref": f"#/$defs/level{depth - 1}"}, "$defs": levels}


def json_matcher(tokenizer: llguidance.LLTokenizer, schema: dict) -> llguidance.LLMatcher:
    """A matcher that only lets through compact JSON valid against `schema`; ValueError if the schema is unusable."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(compact_schema(schema))
    except Exception as exc:  # what llguidance cannot even read is a schema error too, never a 500
        raise ValueError(f"unsupported JSON schema: {type(exc).__name__}: {str(exc)[:200]}") from None
    return _matcher(tokenizer, grammar, "JSON schema")


def tool_call_matcher(tokenizer: llguidance.LLTokenizer, constraint: ToolCallConstraint,
                      specials: dict[str, int]) -> llguidance.LLMatcher:  # fmt: skip
    """A matcher for `constraint`'s call sections; ValueError if its schema is unusable. `specials` maps the text of
    each of the tokenizer's special tokens to its id."""
    return _matcher(tokenizer, tool_call_grammar(constraint, specials), "tool schema")


def tool_call_grammar(constraint: ToolCallConstraint, specials: dict[str, int]) -> str:
    """Lark for llguidance: call sections (begin, JSON, end), with `repeat` more after one newline each; lazily,
    free text first, its end being the first `begin`."""
    begin, end = marker_pieces(constraint.begin, specials), marker_pieces(constraint.end, specials)
    more = f' ("\\n" {_sequence(begin)} call {_sequence(end)})*' if constraint.repeat else ""
    rules = ["%llguidance {}", f"call: %json {json.dumps(compact_schema(constraint.schema))}"]
    if constraint.lazy:
        rules += [f"start: TEXT | opening call {_sequence(end)}{more}", *_opening(begin), FREE_TEXT]
    else:
        rules.append(f"start: {_sequence(begin)} call {_sequence(end)}{more}")
    return "\n".join(rules) + "\n"


def _opening(begin: list[Piece]) -> list[str]:
    """Rules for free text followed by `begin`. Text cannot hold a special token, so one ends it by itself; a
    textual start of `begin` ends it through a lazy lexeme, which ends where `begin` first appears."""
    first, rest = begin[0], begin[1:]
    if isinstance(first, int):
        return [f"opening: TEXT {_sequence(begin)}"]
    return [f"opening_text[lazy]: TEXT {json.dumps(first)}", f"opening: opening_text {_sequence(rest)}"]


def marker_pieces(marker: str, specials: dict[str, int]) -> list[Piece]:
    """`marker` split into text and the ids of the special tokens written in it."""
    inside = sorted((text for text in specials if text in marker), key=len, reverse=True)
    if not inside:
        return [marker] if marker else []
    parts = re.split("(" + "|".join(map(re.escape, inside)) + ")", marker)
    return [specials.get(part, part) for part in parts if part]


def _sequence(pieces: list[Piece]) -> str:
    return " ".join(f"<[{piece}]>" if isinstance(piece, int) else json.dumps(piece) for piece in pieces)


def _matcher(tokenizer: llguidance.LLTokenizer, grammar: str, what: str) -> llguidance.LLMatcher:
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():
        raise ValueError(f"unsupported {what}: {matcher.get_error()[:300]}")
    return matcher


def special_tokens(tokenizer) -> dict[str, int]:
    """The text of each of a Hugging Face tokenizer's special tokens (those decoding leaves out) → its id."""
    return {token.content: i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
