"""Checks a client's JSON schema (`response_format`, a tool's parameters) before any engine turns it into a grammar.

Engines compile schemas into grammars whose size grows with the schema's bounds (`maxLength: 1000` is a thousand
nested optional groups for llama.cpp), and their converters fail in their own ways on schemas they cannot read.
This check is the same for every engine: it refuses what is malformed or too large with a 400 that names the
place (`response_format.json_schema.schema.properties.name.maxLength`), and bounds the work a conversion can take.
The limits follow OpenAI's structured outputs where it has one (properties, enum values), with room to spare.
"""

from __future__ import annotations

import math
import re
from typing import Any, NoReturn
from urllib.parse import unquote

from engines.base import EngineError

KNOWN_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
MAX_DEPTH = 64  # subschemas inside subschemas (OpenAI: 10 levels of objects)
MAX_SUBSCHEMAS = 10_000
MAX_PROPERTIES = 5_000  # in all objects together, as OpenAI
MAX_ENUM_VALUES = 1_000  # in all enums together, as OpenAI
MAX_BOUND = 10_000  # minLength, maxLength, minItems, maxItems, minProperties, maxProperties and {n,m} in patterns
MAX_BOUNDS_TOTAL = 100_000  # all of those together: grammars grow with their sum
MAX_PATTERN_LENGTH = 1_000
MAX_PATTERNS_LENGTH = 20_000  # all patterns together
# Optional properties (those not in `required`): a grammar lists the orders in which they may follow each other,
# so its size and the work of building it grow with the square of their number in each object.
MAX_OPTIONAL_PROPERTIES = 500  # in one object; the sum of their squares over all objects stays under its square

BOUND_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
# Every engine's grammar gives an integer at most 16 digits (llama.cpp's own JSON grammars do): under compact JSON a
# small model has no whitespace to stop on and can write digits until max_tokens.
MOST_INTEGER = 10**16 - 1
INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "unevaluatedProperties",
                 "not", "if", "then", "else", "contains", "propertyNames")  # fmt: skip
# A {n}, {n,} or {n,m} quantifier, or a lone ] or } (an error in ECMA-262's unicode mode, on which llama.cpp's
# converter never returns); escapes and character classes are matched first so that their brackets are skipped.
_PATTERN_TOKENS = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]|\{(\d*)(?:,(\d*))?\}|([\]}])", re.DOTALL)


class InvalidSchema(EngineError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_json_schema"


def check_schema(schema: Any, param: str) -> None:
    """Raise InvalidSchema naming the first part of `schema` that is malformed or beyond a limit."""
    _SchemaCheck(schema, param).run()


class _SchemaCheck:
    def __init__(self, root: Any, param: str):
        self.root = root
        self.param = param
        self.subschemas = self.properties = self.enum_values = self.bounds = self.pattern_chars = 0
        self.optional_weight = 0

    def run(self) -> None:
        pending: list[tuple[Any, tuple, int]] = [(self.root, (), 1)]
        seen: set[int] = set()
        while pending:  # iterative: a schema nested past any limit must not exhaust the stack of this check
            node, path, depth = pending.pop()
            if isinstance(node, bool) or id(node) in seen:
                continue
            if depth > MAX_DEPTH:
                self.fail(path, f"The schema nests more than {MAX_DEPTH} levels deep.")
            seen.add(id(node))
            if not isinstance(node, dict):
                self.fail(path, "A schema must be a JSON object or a boolean.")
            self.check_keywords(node, path)
            for child, child_path in self.children(node, path):
                self.subschemas += 1
                if self.subschemas > MAX_SUBSCHEMAS:
                    self.fail(child_path, f"The schema has more than {MAX_SUBSCHEMAS} subschemas.")
                pending.append((child, child_path, depth + 1))

    def check_keywords(self, node: dict, path: tuple) -> None:
        if "type" in node:
            self.check_type(node["type"], (*path, "type"))
        for keyword in BOUND_KEYWORDS:
            if keyword in node:
                self.check_bound(node[keyword], (*path, keyword))
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
            if node.get(low, 0) > node.get(high, MAX_BOUND):
                self.fail((*path, low), f"{low} is larger than {high}.")
        if "pattern" in node:
            self.check_pattern(node["pattern"], (*path, "pattern"))
        if "enum" in node:
            self.check_enum(node["enum"], (*path, "enum"))
        if "required" in node and not _is_list_of(node["required"], str):
            self.fail((*path, "required"), "required must be an array of property names.")
        if isinstance(node.get("properties"), dict):
            self.check_optional(node["properties"], node.get("required", []), (*path, "properties"))

    def check_optional(self, properties: dict, required: list[str], path: tuple) -> None:
        optional = len(properties.keys() - set(required))
        self.optional_weight += optional**2
        if self.optional_weight > MAX_OPTIONAL_PROPERTIES**2:
            self.fail(path, f"The schema has too many optional properties (not in required): at most "
                            f"{MAX_OPTIONAL_PROPERTIES} in one object, fewer where several have many.")  # fmt: skip

    def check_type(self, value: Any, path: tuple) -> None:
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(name, str) and name in KNOWN_TYPES for name in names):
            self.fail(path, f"type must be one of {', '.join(sorted(KNOWN_TYPES))}, or an array of them.")

    def check_bound(self, value: Any, path: tuple) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BOUND:
            self.fail(path, f"{path[-1]} must be an integer from 0 to {MAX_BOUND}.")
        self.add_to_bounds(value, path)

    def add_to_bounds(self, value: int, path: tuple) -> None:
        self.bounds += value
        if self.bounds > MAX_BOUNDS_TOTAL:
            self.fail(path, f"The schema's length, item, property and repetition bounds add up to more than "
                            f"{MAX_BOUNDS_TOTAL}.")  # fmt: skip

    def check_pattern(self, pattern: Any, path: tuple) -> None:
        if not isinstance(pattern, str):
            self.fail(path, "pattern must be a string.")
        if len(pattern) > MAX_PATTERN_LENGTH:
            self.fail(path, f"pattern is longer than {MAX_PATTERN_LENGTH} characters.")
        self.pattern_chars += len(pattern)
        if self.pattern_chars > MAX_PATTERNS_LENGTH:
            self.fail(path, f"The schema's patterns are longer than {MAX_PATTERNS_LENGTH} characters together.")
        for token in _PATTERN_TOKENS.finditer(pattern):
            low, high, lone_bracket = token.groups()
            if lone_bracket:
                self.fail(path, "pattern has an unescaped ']' or '}': write \\] or \\} for the character.")
            for count in filter(None, (low, high)):
                if int(count) > MAX_BOUND:
                    self.fail(path, f"A repetition count in pattern is larger than {MAX_BOUND}.")
                self.add_to_bounds(int(count), path)
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError, ValueError):
            self.fail(path, "pattern is not a valid regular expression.")

    def check_enum(self, values: Any, path: tuple) -> None:
        if not isinstance(values, list):
            self.fail(path, "enum must be an array.")
        self.enum_values += len(values)
        if self.enum_values > MAX_ENUM_VALUES:
            self.fail(path, f"The schema has more than {MAX_ENUM_VALUES} enum values.")

    def children(self, node: dict, path: tuple):
        """The subschemas of `node`, with their paths."""
        for keyword in SCHEMA_MAPS:
            if keyword in node:
                mapping = node[keyword]
                if not isinstance(mapping, dict):
                    self.fail((*path, keyword), f"{keyword} must be an object of schemas.")
                if keyword == "properties":
                    self.properties += len(mapping)
                    if self.properties > MAX_PROPERTIES:
                        self.fail((*path, keyword), f"The schema has more than {MAX_PROPERTIES} properties.")
                for name, child in mapping.items():
                    if keyword == "patternProperties":
                        self.check_pattern(name, (*path, keyword, name))
                    yield child, (*path, keyword, name)
        for keyword in SCHEMA_LISTS:
            if keyword in node:
                if not isinstance(node[keyword], list):
                    self.fail((*path, keyword), f"{keyword} must be an array of schemas.")
                yield from ((child, (*path, keyword, i)) for i, child in enumerate(node[keyword]))
        for keyword in SCHEMA_VALUES:
            if keyword in node:
                value = node[keyword]
                if keyword == "items" and isinstance(value, list):  # the older form of prefixItems
                    yield from ((child, (*path, keyword, i)) for i, child in enumerate(value))
                else:
                    yield value, (*path, keyword)
        if "$ref" in node:
            yield self.resolve(node["$ref"], (*path, "$ref"))

    def resolve(self, ref: Any, path: tuple) -> tuple[Any, tuple]:
        """The subschema a local reference (`#` or a JSON pointer `#/...`) names, and its path."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            self.fail(path, "Only local references ('#' or '#/...') are supported in $ref.")
        target, target_path = self.root, ()
        for token in ref[2:].split("/") if ref != "#" else []:
            key = unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and key in target:
                target, target_path = target[key], (*target_path, key)
            elif isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target, target_path = target[int(key)], (*target_path, int(key))
            else:
                self.fail(path, "$ref does not resolve to a part of this schema.")
        return target, target_path

    def fail(self, path: tuple, message: str) -> NoReturn:
        where = self.param.split(".")[0]  # response_format, or tools[i]
        raise InvalidSchema(f"Invalid schema for {where}: {message}", param=self.param + _render(path))


def _render(path: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)


def integer_bounds(schema: dict) -> tuple[int, int]:
    """The smallest and largest integer a schema allows, within MOST_INTEGER (every engine's grammar keeps to them);
    ValueError where its bounds are not numbers or no integer lies within them."""
    low, high = -MOST_INTEGER, MOST_INTEGER
    if any(isinstance(schema.get(k, 0), bool) or not isinstance(schema.get(k, 0), int | float) for k in INTEGER_BOUNDS):
        raise ValueError(f"integer bounds must be numbers: {schema}")
    if "minimum" in schema:
        low = max(low, math.ceil(schema["minimum"]))
    if "exclusiveMinimum" in schema:
        low = max(low, math.floor(schema["exclusiveMinimum"]) + 1)
    if "maximum" in schema:
        high = min(high, math.floor(schema["maximum"]))
    if "exclusiveMaximum" in schema:
        high = min(high, math.ceil(schema["exclusiveMaximum"]) - 1)
    if low > high:
        raise ValueError(f"no integer lies within the bounds {low}..{high}")
    return low, high
