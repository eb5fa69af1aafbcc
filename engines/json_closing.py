"""The shortest text that closes a partly written JSON value into one valid against its schema.

`JsonTracker` follows compact JSON as a constrained engine writes it (character by character: the state of every
open object, array, string, number), and `closing()` says what completes it with the least text: the open string
or number ended, the members the schema requires added with their shortest values, `minItems` met, the brackets
closed. It offers a closing only where the document it completes validates (jsonschema). `SectionTracker` does
the same for tool-call sections: `begin`, the call's JSON, `end`. engines/json_budget.py decides when an engine
writes it.

The members added follow the `properties` order, required ones only, which is the order both grammar engines write
them in (llama.cpp: required properties first; llguidance: `properties` order).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from engines.base import ToolCallConstraint
from engines.json_schema import MOST_INTEGER, integer_bounds

LITERALS = ("true", "false", "null")
NUMBER_CHARS = frozenset("0123456789+-.eE")
WHITESPACE = frozenset(" \t\n\r")
ALL_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")  # the order minimal values try
KIND_OF = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}
_BUSY = object()  # a minimal value being computed: a schema that needs itself has none


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class SchemaIndex:
    """A schema's subschemas as closing needs them: references followed, minimal values, allowed members."""

    def __init__(self, root: Any):
        self.root = root
        self._resolved: dict[int, Any] = {}
        self._minimal: dict[int, Any] = {}
        self._fixed: dict[tuple[int, ...], list[str] | None] = {}
        # Schemas the caches hold by id(), kept alive. Engines' threads may fill the caches at once: they compute
        # the same values, and one that meets a value being computed takes it as none for this look.
        self._keep: list[Any] = []

    def resolve(self, schema: Any, depth: int = 0) -> Any:
        """`schema` with `$ref` followed (its siblings kept) and `allOf` merged in."""
        if not isinstance(schema, dict) or not ("$ref" in schema or "allOf" in schema):
            return schema
        cached = self._resolved.get(id(schema))
        if cached is not None:
            return cached
        merged = {key: value for key, value in schema.items() if key not in ("$ref", "allOf")}
        parts = [self._target(schema["$ref"])] if "$ref" in schema else []
        parts += schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []
        for part in parts:
            part = self.resolve(part, depth + 1) if depth < 64 else True
            if part is False:
                merged = False
                break
            if isinstance(part, dict):
                _merge(merged, part)
        self._keep.append(merged)
        self._resolved[id(schema)] = merged
        return merged

    def _target(self, ref: Any) -> Any:
        node = self.root
        if not isinstance(ref, str) or not ref.startswith("#"):
            return True
        for token in filter(None, ref[1:].split("/")):
            key = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return True
        return node

    def branches(self, schema: Any) -> list[Any]:
        """The alternatives a value of `schema` may take: anyOf/oneOf flattened, each resolved."""
        schema = self.resolve(schema)
        choices = schema.get("anyOf") or schema.get("oneOf") if isinstance(schema, dict) else None
        if not isinstance(choices, list):
            return [schema]
        return [branch for choice in choices for branch in self.branches(choice)]

    def fitting(self, schema: Any, kind: str) -> list[Any]:
        """The alternatives of `schema` that a value of this kind (as its first character tells) can match."""
        return [branch for branch in self.branches(schema) if _admits(branch, kind)]

    def property(self, schema: Any, key: str) -> Any:
        """The schema of member `key` of an object of `schema`: False where it may not be there."""
        if not isinstance(schema, dict):
            return schema
        properties = schema.get("properties", {})
        if key in properties:
            return properties[key]
        for pattern, value in schema.get("patternProperties", {}).items():
            if re.search(pattern, key):
                return value
        return schema.get("additionalProperties", True)

    def item(self, schema: Any, index: int) -> Any:
        if not isinstance(schema, dict):
            return schema
        prefix = schema.get("prefixItems", schema.get("items") if isinstance(schema.get("items"), list) else [])
        if index < len(prefix):
            return prefix[index]
        items = schema.get("items", True)
        return schema.get("additionalItems", True) if isinstance(items, list) else items

    def required(self, schema: Any) -> list[str]:
        """Required members in the order the engines' grammars write them: `properties`' order, then the rest."""
        if not isinstance(schema, dict):
            return []
        required = [key for key in schema.get("required", []) if isinstance(key, str)]
        declared = [key for key in schema.get("properties", {}) if key in required]
        return declared + [key for key in required if key not in declared]

    def minimal(self, schema: Any) -> str | None:
        """The shortest compact JSON text this schema probably accepts (validation decides), or None."""
        known = self._minimal.get(id(schema))
        if known is not None:
            return None if known is _BUSY else known
        self._minimal[id(schema)] = _BUSY
        self._keep.append(schema)
        text = self._minimal_of(self.resolve(schema))
        self._minimal[id(schema)] = text if text is not None else _BUSY
        return text

    def _minimal_of(self, schema: Any) -> str | None:
        if schema is True or schema == {}:
            return "0"
        if not isinstance(schema, dict):
            return None
        if "const" in schema:
            return compact(schema["const"])
        if isinstance(schema.get("enum"), list):
            return _shortest(compact(value) for value in schema["enum"])
        if len(branches := self.branches(schema)) > 1:
            return _shortest(self.minimal(branch) for branch in branches)
        return _shortest(self._minimal_typed(schema, kind) for kind in _types(schema))

    def _minimal_typed(self, schema: dict, kind: str) -> str | None:
        if kind in ("null", "boolean"):
            return "null" if kind == "null" else "true"
        if kind in ("integer", "number"):
            return _nearest_zero(schema)
        if kind == "string":
            return '"' + "a" * schema.get("minLength", 0) + '"'
        if kind == "array":
            items = [self.minimal(self.item(schema, i)) for i in range(schema.get("minItems", 0))]
            return None if None in items else "[" + ",".join(items) + "]"
        members = self.members(schema, self.required(schema))
        return None if members is None else "{" + members + "}"

    def members(self, schema: Any, keys: list[str], lead: str = "") -> str | None:
        """`"key":minimal` for each of `keys`, joined by commas, `lead` before the first."""
        parts = []
        for key in keys:
            value = self.minimal(self.property(schema, key))
            if value is None:
                return None
            parts.append(compact(key) + ":" + value)
        return lead + ",".join(parts) if parts else ""

    def fixed_texts(self, schemas: list[Any]) -> list[str] | None:
        """The texts a value may be where every alternative is a const or an enum (as any engine writes them)."""
        key = tuple(map(id, schemas))
        if key not in self._fixed:
            self._fixed[key] = _fixed_texts(schemas)
        return self._fixed[key]

    def openings(self) -> list[str]:
        """Texts one newly opened value can add to a closing at once: an optional member, an array item beyond
        minItems, an alternative, an enum value (the root's own value is in the closing from the start)."""
        texts, seen, pending = [], set(), [self.root]
        while pending:
            schema = self.resolve(pending.pop())
            if isinstance(schema, dict) and id(schema) not in seen:
                seen.add(id(schema))
                texts += self._openings(schema)
                pending += _children(schema)
        return [text for text in texts if text is not None]

    def _openings(self, schema: dict) -> list[str | None]:
        texts = [compact(value) for value in schema.get("enum", [])]
        if len(branches := self.branches(schema)) > 1:
            texts += [self.minimal(branch) for branch in branches]
        if len(types := _types(schema)) > 1:
            texts += [self._minimal_typed(schema, kind) for kind in types]
        required = set(self.required(schema))
        optional = [key for key in schema.get("properties", {}) if key not in required]
        if schema.get("additionalProperties", True) is not False:
            optional.append("")
        texts += [self.members(schema, [key], ",") for key in optional]
        items = [self.item(schema, i) for i in range(len(schema.get("prefixItems", [])) + 1)]
        return texts + ["," + (self.minimal(item) or "") for item in items if item is not False]


def _fixed_texts(schemas: list[Any]) -> list[str] | None:
    texts = []
    for schema in schemas or [True]:
        if not isinstance(schema, dict) or not ("const" in schema or isinstance(schema.get("enum"), list)):
            return None
        for value in [schema["const"]] if "const" in schema else schema["enum"]:
            for ascii_only in (False, True):
                texts.append(json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_only))
                texts.append(json.dumps(value, ensure_ascii=ascii_only))
    return texts


def _merge(into: dict, part: dict) -> None:
    """allOf, simply: properties and required joined, other keywords kept where set first."""
    for key, value in part.items():
        if key == "properties" and isinstance(value, dict):
            into["properties"] = {**value, **into.get("properties", {})}
        elif key == "required" and isinstance(value, list):
            into["required"] = list(dict.fromkeys([*into.get("required", []), *value]))
        else:
            into.setdefault(key, value)


def _children(schema: dict) -> list[Any]:
    children = list(schema.get("properties", {}).values()) + list(schema.get("patternProperties", {}).values())
    for key in ("additionalProperties", "items", "additionalItems"):
        value = schema.get(key)
        children += value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    for key in ("prefixItems", "anyOf", "oneOf"):
        children += schema.get(key, []) if isinstance(schema.get(key), list) else []
    return children


def _types(schema: dict) -> list[str]:
    declared = schema.get("type")
    if declared is None:
        return list(ALL_TYPES)
    names = declared if isinstance(declared, list) else [declared]
    return [kind for kind in ALL_TYPES if kind in names]


def _admits(schema: Any, kind: str) -> bool:
    """Whether a value of `kind` ("number" for integers too) may match `schema` (first-character precision)."""
    if not isinstance(schema, dict):
        return schema is not False
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return any(_kind(value) == kind for value in values)
    types = _types(schema)
    return kind in types or kind == "number" and "integer" in types


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "null")


def _shortest(texts) -> str | None:
    return min((text for text in texts if text is not None), key=len, default=None)


def _integer_range(schema: dict) -> tuple[int, int] | None:
    try:
        return integer_bounds(schema)
    except ValueError:
        return None


def _nearest_zero(schema: dict) -> str | None:
    """The integer nearest zero within the schema's bounds (for numbers too: validation checks the exclusive ones)."""
    bounds = _integer_range(schema)
    if bounds is None:
        return None
    low, high = bounds
    return str(0 if low <= 0 <= high else low if low > 0 else high)


def _integer_rest(written: str, schema: dict) -> str | None:
    """Digits that complete a partly written integer (`-`, `-1`, `12`) into one within the schema's bounds."""
    negative, digits = written.startswith("-"), written.lstrip("-")
    bounds = _integer_range(schema)
    if bounds is None:
        return None
    low, high = bounds
    if negative:
        low, high = -high, -low
    if digits == "0":
        return "" if low <= 0 <= high else None
    for more in range(0 if digits else 1, len(str(MOST_INTEGER)) - len(digits) + 1):
        scale = 10**more
        first = int(digits or "0") * scale + (scale // 10 if not digits and more > 1 else 0)  # no leading zero
        start, end = max(first, low), min(int(digits or "0") * scale + scale - 1, high)
        if start <= end:
            return str(start)[len(digits) :]
    return None


class _Value:
    """An open JSON value: a container with the state of its members, or a scalar (or an object's key) being
    written."""

    __slots__ = ("kind", "schemas", "start", "state", "keys", "items", "raw", "escape")

    def __init__(self, kind: str, schemas: list[Any], start: int, raw: str = ""):
        self.kind, self.schemas, self.start, self.raw = kind, schemas, start, raw
        self.state = "first"  # containers: first, key, colon, value, child, next; the root: value, child, done
        self.keys: list[str] = []
        self.items = 0
        self.escape = 0  # strings: 1 after a backslash, 2 + n after "\u" and n hex digits

    @property
    def schema(self) -> Any:
        return self.schemas[0] if self.schemas else True


class JsonTracker:
    """Follows compact JSON as it is written, character by character, and tells the shortest text that closes it
    into a document valid against `schema` (None where there is none it can find)."""

    free = False  # (a SectionTracker's is true in free text)

    def __init__(self, index: SchemaIndex, validator):
        self._index = index
        self._validator = validator
        root = _Value("root", [index.root], 0)
        root.state = "value"
        self._stack = [root]
        self._text: list[str] = []
        self._length = 0
        self.broken = False  # text the tracker cannot follow: it offers no closing

    @property
    def done(self) -> bool:
        return self._stack[0].state == "done" and len(self._stack) == 1

    @property
    def at_rest(self) -> bool:
        """Whether a closing from here adds no value the model has not begun (beyond what the schema requires): right
        after a value, or inside a string or number it has begun. In an array of strings most tokens end inside
        a string (`apple`, then `","`), so those count."""
        top = self._stack[-1]
        if top.state in ("next", "done"):
            return True
        begun = top.kind in ("string", "number") and top.raw != "" and not top.escape
        return begun and self._index.fixed_texts(top.schemas) is None  # (a const or enum is not the model's to cut)

    def feed(self, text: str) -> None:
        for char in text:
            if not self.take(char):  # text after the value
                self.broken = True

    def take(self, char: str) -> bool:
        """Takes one character; False where the value has ended before it (the character is not JSON's)."""
        if self.broken:
            return True
        top = self._stack[-1]
        if top.kind == "number" and char not in NUMBER_CHARS:
            self._end_value()
            top = self._stack[-1]
        if self.done:
            return False
        self._text.append(char)
        self._length += 1
        if top.kind in ("string", "key"):
            self._in_string(top, char)
        elif top.kind in ("number", "literal"):
            self._in_scalar(top, char)
        elif char not in WHITESPACE:
            self._structure(top, char)
        return True

    def _in_string(self, string: _Value, char: str) -> None:
        if string.escape == 1:
            string.escape = 2 if char == "u" else 0
        elif string.escape >= 2:
            string.escape = 0 if string.escape == 5 else string.escape + 1
        elif char == "\\":
            string.escape = 1
        elif char == '"' and string.kind == "key":
            self._end_key()
            return
        elif char == '"':
            self._end_value()
            return
        string.raw += char

    def _end_key(self) -> None:
        key = self._stack.pop()
        parent = self._stack[-1]
        try:
            parent.keys.append(json.loads('"' + key.raw + '"'))
        except ValueError:
            self.broken = True
            return
        parent.state = "colon"
        allowed = [s for s in parent.schemas if self._index.property(s, parent.keys[-1]) is not False]
        parent.schemas = allowed or parent.schemas

    def _in_scalar(self, scalar: _Value, char: str) -> None:
        scalar.raw += char
        if scalar.kind == "literal":
            if scalar.raw in LITERALS:
                self._end_value()
            elif not any(literal.startswith(scalar.raw) for literal in LITERALS):
                self.broken = True

    def _structure(self, top: _Value, char: str) -> None:
        state, kind = top.state, top.kind
        if kind == "object" and state in ("first", "key") and char == '"':
            self._stack.append(_Value("key", [], self._length - 1))
        elif kind == "object" and state == "colon" and char == ":":
            top.state = "value"
        elif state == "next" and char == ",":
            top.state = "key" if kind == "object" else "value"
        elif (state == "next" or state == "first") and char == ("}" if kind == "object" else "]"):
            self._end_value()
        elif state == "value" or kind == "array" and state == "first":
            self._open(top, char)
        else:
            self.broken = True

    def _open(self, parent: _Value, char: str) -> None:
        """A value starts with `char` inside `parent`."""
        if parent.kind == "object":
            schema = self._index.property(parent.schema, parent.keys[-1])
        elif parent.kind == "array":
            schema = self._index.item(parent.schema, parent.items)
            parent.items += 1
        else:
            schema = parent.schema
        kind = KIND_OF.get(char) or ("number" if char == "-" or char.isdigit() else None)
        if kind is None:
            self.broken = True
            return
        parent.state = "child"
        value_kind = kind if kind in ("object", "array", "string", "number") else "literal"
        fitting = self._index.fitting(schema, kind)
        value = _Value(value_kind, fitting or [schema], self._length - 1, "" if value_kind == "string" else char)
        self._stack.append(value)

    def _end_value(self) -> None:
        self._stack.pop()
        parent = self._stack[-1]
        parent.state = "done" if parent.kind == "root" else "next"

    # ---- closing ----------------------------------------------------------------------------

    def closing(self) -> str | None:
        if self.broken:
            return None
        text = "".join(self._text)
        self._text = [text]
        try:
            rest = self._rest(text)
            valid = rest is not None and self._validator.is_valid(json.loads(text + rest))
        except ValueError:  # a string or key written in a way JSON does not read
            return None
        return rest if valid else None

    def _rest(self, text: str) -> str | None:
        stack = self._stack
        for depth, value in enumerate(stack[1:], 1):  # the outermost value held to fixed texts decides its rest
            fixed = self._index.fixed_texts(value.schemas) if value.kind != "key" else None
            if fixed is not None:
                written = text[value.start :]
                rest = _shortest(option[len(written) :] for option in fixed if option.startswith(written))
                return self._outer(stack[:depth], rest)
        top = stack[-1]
        if top.kind == "key":
            return self._outer(stack[:-2], self._key_rest(stack[-2], top))
        if top.kind in ("string", "number", "literal"):
            return self._outer(stack[:-1], self._scalar_rest(top))
        return self._outer(stack, "")

    def _outer(self, containers: list[_Value], rest: str | None) -> str | None:
        """`rest` (what closes the innermost open value), then what closes each container around it."""
        parts = [rest] + [self._container_rest(container) for container in reversed(containers)]
        return None if None in parts else "".join(parts)

    def _container_rest(self, value: _Value) -> str | None:
        index, state = self._index, value.state
        if value.kind == "root":
            return index.minimal(value.schema) if state == "value" else ""
        if value.kind == "array":
            wanted = value.schema.get("minItems", 0) if isinstance(value.schema, dict) else 0
            if state == "value":  # after a comma: one more item at least
                wanted = max(wanted, value.items + 1)
            lead = "," if state in ("next", "child") else ""
            items = [index.minimal(index.item(value.schema, i)) for i in range(value.items, wanted)]
            return None if None in items else (lead + ",".join(items) if items else "") + "]"
        missing = [key for key in index.required(value.schema) if key not in value.keys]
        if state in ("colon", "value"):
            return self._member_rest(value, ":" if state == "colon" else "", value.keys[-1], missing)
        if state == "key" and not missing:  # after a comma: one more member at least
            extra = self._extra_member(value)
            return None if extra is None else extra + "}"
        members = index.members(value.schema, missing, "," if state in ("next", "child") else "")
        return None if members is None else members + "}"

    def _member_rest(self, value: _Value, before: str, key: str, missing: list[str]) -> str | None:
        """`before`, the value of member `key`, the missing members other than it, and the object's end."""
        member = self._index.minimal(self._index.property(value.schema, key))
        others = self._index.members(value.schema, [k for k in missing if k != key], ",")
        return None if member is None or others is None else before + member + others + "}"

    def _extra_member(self, value: _Value) -> str | None:
        """The shortest member an object may still take: any key where others are allowed (the grammars put those
        last), else an optional property declared after the last one written."""
        schema = value.schema
        if not isinstance(schema, dict) or schema.get("additionalProperties", True) is not False:
            return self._index.members(schema, [""])
        declared = list(schema.get("properties", {}))
        after = declared[max((declared.index(k) + 1 for k in value.keys if k in declared), default=0) :]
        return _shortest(self._index.members(schema, [key]) for key in after if key not in value.keys)

    def _key_rest(self, value: _Value, key: _Value) -> str | None:
        """Completes a key being written into a member: the first missing required property it starts, else the
        optional ones it starts, else (where other keys are allowed) the key as written."""
        index, schema = self._index, value.schema
        missing = [k for k in index.required(schema) if k not in value.keys]
        declared = schema.get("properties", {}) if isinstance(schema, dict) else {}
        started = [k for k in missing if compact(k)[1:].startswith(key.raw)][:1] or [
            k for k in declared if k not in value.keys and compact(k)[1:].startswith(key.raw)
        ]
        rests = [self._member_rest(value, compact(k)[1 + len(key.raw) :] + ":", k, missing) for k in started]
        escape = _escape_rest(key)
        written = json.loads('"' + key.raw + escape + '"')
        if not started and index.property(schema, written) is not False:
            rests.append(self._member_rest(value, escape + '":', written, missing))
        return _shortest(rests)

    def _scalar_rest(self, value: _Value) -> str | None:
        if value.kind == "literal":
            return next((literal[len(value.raw) :] for literal in LITERALS if literal.startswith(value.raw)), None)
        schema = value.schema if isinstance(value.schema, dict) else {}
        if value.kind == "number":
            if all(isinstance(s, dict) and _types(s) == ["integer"] for s in value.schemas):
                return _integer_rest(value.raw, schema)
            return "" if value.raw[-1].isdigit() else "0"
        rest = _escape_rest(value)
        length = len(json.loads('"' + value.raw + rest + '"'))
        return rest + "a" * max(0, schema.get("minLength", 0) - length) + '"'


def _escape_rest(string: _Value) -> str:
    """What completes an escape a string (or key) ends inside: `\\n`, or `\\u` and four hex digits."""
    return "n" if string.escape == 1 else "0" * (6 - string.escape) if string.escape else ""


class SectionTracker:
    """Tool-call sections (ToolCallConstraint): `begin`, JSON, `end`, with `repeat` more after one newline each;
    when lazy, free text until the first `begin`. The closing finishes the section being written."""

    def __init__(self, calls: ToolCallConstraint, minimal: str, new_json: Callable[[], JsonTracker]):
        """`minimal`: the shortest valid call; `new_json`: a tracker for the JSON of a new section."""
        self._calls, self._minimal, self._new_json = calls, minimal, new_json
        self._json: JsonTracker | None = None
        self._phase = "free" if calls.lazy else "marker"
        self._marker = calls.begin  # the marker being matched, and how much of it
        self._matched = 0
        self._tail = ""  # free text: its end, where the start of `begin` may be

    @property
    def free(self) -> bool:
        """Free text (lazy, no call begun): nothing to close."""
        return self._phase == "free"

    @property
    def at_rest(self) -> bool:
        return self._phase in ("end", "after") or self._phase == "json" and self._json.at_rest

    @property
    def done(self) -> bool:
        """The section's JSON is complete: at most the rest of its end marker is left to write."""
        return self._phase in ("end", "after") or self._phase == "json" and self._json.done

    def feed(self, text: str) -> None:
        for char in text:
            self._char(char)

    def _char(self, char: str) -> None:
        if self._phase == "free":
            self._tail = (self._tail + char)[-len(self._calls.begin) :]
            if self._tail == self._calls.begin:
                self._start_json()
        elif self._phase == "json":
            if not self._json.take(char):
                self._expect(self._calls.end, "end")
                self._char(char)
            elif self._json.done and not self._calls.end:
                self._phase = "after"
        elif self._phase in ("marker", "end", "sep"):
            if not self._marker.startswith(char, self._matched):
                self._phase = "broken"
                return
            self._matched += 1
            if self._matched == len(self._marker) and self._phase == "end":
                self._phase = "after"
            elif self._matched == len(self._marker):
                self._start_json()
        elif self._phase == "after" and self._calls.repeat:
            self._expect("\n" + self._calls.begin, "sep")
            self._char(char)
        else:
            self._phase = "broken"

    def _start_json(self) -> None:
        self._phase, self._json = "json", self._new_json()

    def _expect(self, marker: str, phase: str) -> None:
        self._phase, self._marker, self._matched = phase if marker else "after", marker, 0

    def closing(self) -> str | None:
        calls, phase = self._calls, self._phase
        if phase in ("free", "after"):
            return ""
        if phase == "json":
            rest = self._json.closing() if not self._json.done else ""
            return None if rest is None else rest + calls.end
        if phase == "end":
            return self._marker[self._matched :]
        if phase in ("marker", "sep"):
            return self._marker[self._matched :] + self._minimal + calls.end
        return None
