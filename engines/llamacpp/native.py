"""Thin helpers over llama-cpp-python's ctypes bindings (the C API of llama.cpp).

We use the C API rather than `llama_cpp.Llama`: `Llama` decodes one sequence at a time and needs
`logits_all` for logprobs, while the scheduler here batches many sequences in one context.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import re
from typing import Iterator

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

from engines.base import END_OFF, SamplingParams, ToolCallConstraint
from engines.json_schema import INTEGER_BOUNDS, InvalidSchema, integer_bounds
from engines.llamacpp.steps import SlotSampling

PENALTY_WINDOW = 256  # tokens the repetition/presence/frequency penalties look back over
SPLIT_SPECIALS = 256  # special tokens in each part of a prompt handed to llama.cpp's tokenizer (Vocab.split_prompt)
# llama.cpp parses a grammar's groups, and matches them, recursively on the engine thread's stack: a grammar nested
# deep enough overflows that stack and kills the process, so grammars nested deeper than this are refused before it
# sees them, with a wide margin to what even a small thread stack survives (it refuses optional groups nested not
# much deeper itself, gracefully).
MAX_GRAMMAR_NESTING = 1_000
MAX_GRAMMAR_CHARS = 1 << 20  # the engine thread parses the grammar of every sequence that uses one
MAX_JSON_NESTING = 8  # objects and arrays in free-form JSON (json_object): a small model may open them forever
# A quoted literal, or a character class (its ^ and its body): the grammar's terminals.
_GBNF_TERMINALS = re.compile(r'"((?:\\.|[^"\\])*)"|\[(\^?)((?:\\.|[^\]\\])*)\]', re.DOTALL)
_GBNF_CHAR = re.compile(r"\\x([0-9a-fA-F]{2})|\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})|\\(.)|(.)", re.DOTALL)
_GBNF_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]"}
_GROUP_MARKS = re.compile(r"[()]")
LAST_CODE_POINT = 0x10FFFF
_native_log = logging.getLogger("llama-cpp-python")
# ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error; 5 continues the previous message's level.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@llama_cpp.llama_log_callback
def _log_to_python(level: int, text: bytes, _user_data) -> None:
    # llama.cpp would print to stderr itself; through logging its lines become JSON like ours.
    if level != 5:
        _last_level[0] = _LOG_LEVELS.get(level, logging.DEBUG)
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        _native_log.log(_last_level[0], message)


# A C function that ignores the log line: libc's `abs` reads only its first argument (the level), and its
# result is dropped, which the platform's C calling convention allows.
_DISCARD = ctypes.cast(ctypes.CDLL(None).abs, llama_cpp.llama_log_callback)


@contextlib.contextmanager
def native_logs_while_loading() -> Iterator[None]:
    """llama.cpp's log lines reach Python logging while a model loads (what was loaded, and why it failed);
    after that they are dropped in C unless the gateway logs at debug level. A Python callback takes the
    GIL for every line, and CUDA builds log one on every decode step ("CUDA Graph id ... reused"), which kept
    the engine thread waiting for the GIL (docs/benchmarks-history.md)."""
    llama_cpp.llama_log_set(_log_to_python, ctypes.c_void_p(0))
    try:
        yield
    finally:
        if not _native_log.isEnabledFor(logging.DEBUG):
            llama_cpp.llama_log_set(_DISCARD, ctypes.c_void_p(0))


class Vocab:
    """Tokenizer and detokenizer of a loaded model; read-only, so safe from any thread."""

    def __init__(self, model):
        self.ptr = llama_cpp.llama_model_get_vocab(model)
        self.size = llama_cpp.llama_vocab_n_tokens(self.ptr)
        self.bos = llama_cpp.llama_vocab_bos(self.ptr)
        self.eos = llama_cpp.llama_vocab_eos(self.ptr)
        # Every end-of-generation token, not just EOS and EOT (SmolLM2 has three): `ignore_eos` biases them all
        # off, as llama-server does, and the C steps look each sampled token up in a table made from them.
        self.eog_ids = frozenset(t for t in range(self.size) if llama_cpp.llama_vocab_is_eog(self.ptr, t))
        self._pieces: dict[tuple[int, bool], bytes] = {}  # token pieces never change; writes race harmlessly
        attributes = [llama_cpp.llama_vocab_get_attr(self.ptr, t) for t in range(self.size)]
        # The most input bytes one token covers: its piece, plus 4 for an unknown token standing for one character.
        # Vocabularies that normalise their input (WordPiece, Unigram, ...) may drop text: no such bound for them.
        exact = llama_cpp.llama_vocab_type(self.ptr) in (llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE)
        longest = max(len(self._piece(t, True)) for t in range(self.size))
        self.longest_piece: int | None = max(longest, 4) if exact else None
        # A special token with one of these attributes swallows the whitespace beside it.
        strip = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
        self._strips_spaces = any(attribute & strip for attribute in attributes)
        # A text split after a special token tokenizes as the whole does, unless a token is added at its end.
        self._splittable = exact and not self._strips_spaces and not llama_cpp.llama_vocab_get_add_eos(self.ptr)
        self._specials = {parse: self._special_texts(attributes, parse) for parse in (True, False)}
        controls = (t for t, attribute in enumerate(attributes) if attribute & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)
        self._controls = {llama_cpp.llama_vocab_get_text(self.ptr, t): t for t in controls}

    def _special_texts(self, attributes: list[int], parse_special: bool) -> list[bytes]:
        """The texts llama.cpp cuts out of a text before tokenizing the rest, in its order (longest first). Without
        `parse_special` it skips control and unknown tokens but still cuts out user-defined ones."""
        cut = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        if parse_special:
            cut |= llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        tokens = [t for t, attribute in enumerate(attributes) if attribute & cut]
        texts = filter(None, (llama_cpp.llama_vocab_get_text(self.ptr, t) for t in tokens))
        return sorted(texts, key=len, reverse=True)

    def control_tokens_in(self, text: str) -> frozenset[int]:
        """The control tokens whose texts occur in `text`: a sequence that must show them as text asks for these."""
        data = text.encode()
        return frozenset(t for piece, t in self._controls.items() if piece and piece in data)

    def split_prompt(self, data: bytes, *, parse_special: bool, most: int) -> tuple[list[bytes], int]:
        """`data` in parts to tokenize one after the other, and a lower bound on its tokens, exact enough to refuse
        a text that cannot fit `most` tokens before tokenizing it (no parts then).

        No token covers more bytes than `longest_piece`, and each special token llama.cpp cuts out of the text
        first is one token. That cutting takes time growing with the square of their number, so the text is split
        after every SPLIT_SPECIALS-th: llama.cpp tokenizes the text between special tokens piece by piece, so the
        parts give the whole's tokens."""
        if self.longest_piece is None:
            return [data], 0
        counted = len(data)
        if self._strips_spaces:
            counted -= sum(data.count(space) for space in b" \t\n\v\f\r")
        least = -(-counted // self.longest_piece)
        if least > most:
            return [], least
        pieces, specials = self._partition(data, parse_special, most)
        if specials > most:
            return [], specials
        parts = _split_after_specials(pieces) if self._splittable and specials > SPLIT_SPECIALS else [data]
        return parts, max(least, specials)

    def _partition(self, data: bytes, parse_special: bool, most: int) -> tuple[list[tuple[bytes, bool]], int]:
        """`data` cut as llama.cpp cuts it before tokenizing: each special token's text in turn, longest first, out
        of the text left between those already cut. The pieces (text, whether a special token) and the number of
        special tokens, counted up to `most` + 1."""
        pieces, found = [(data, False)], 0
        for special in self._specials[parse_special]:
            if special not in data:
                continue
            cut = []
            for text, is_special in pieces:
                if is_special or special not in text:
                    cut.append((text, is_special))
                    continue
                parts = text.split(special)
                found += len(parts) - 1
                if found > most:
                    return [], found
                cut.append((parts[0], False))
                for part in parts[1:]:
                    cut += ((special, True), (part, False))
            pieces = [(text, is_special) for text, is_special in cut if text]
        return pieces, found

    def tokenize(self, parts: list[bytes], *, add_special: bool, parse_special: bool) -> list[int]:
        """The tokens of a text split by `split_prompt`: BOS (if `add_special` asks for it) before the first part."""
        tokens = []
        for index, part in enumerate(parts):
            tokens += self._tokenize(part, add_special and index == 0, parse_special)
        return tokens

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:  # buffer too small: the negative value is the size needed
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.ptr, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The token's bytes; cached, since the scheduler asks for one per generated token."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            cached = self._pieces[key] = self._piece(token, special)
        return cached

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self.ptr, token, buffer, len(buffer), 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.ptr, token, buffer, len(buffer), 0, special)
        return buffer.raw[:size]


def _split_after_specials(pieces: list[tuple[bytes, bool]]) -> list[bytes]:
    """Partitioned text joined back into parts of SPLIT_SPECIALS special tokens each, every part but the last
    ending with one."""
    parts, current, specials = [], [], 0
    for text, is_special in pieces:
        current.append(text)
        specials += is_special
        if specials == SPLIT_SPECIALS:
            parts.append(b"".join(current))
            current, specials = [], 0
    if current:
        parts.append(b"".join(current))
    return parts


def model_metadata(model, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(1 << 16)
    size = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    if size < 0:
        return None
    if size >= len(buffer):
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace")


def json_grammar(schema: dict) -> str:
    """GBNF for compact JSON matching `schema`. A schema it cannot express, or whose grammar is beyond what llama.cpp
    can safely load, is a 400."""
    return _checked(_grammar(json.dumps(schema), None), "response_format")


def tool_call_grammar(calls: ToolCallConstraint) -> str:
    """GBNF for `calls`' sections: from the first token when forced; when lazy, after free text that holds no `begin`
    up to the first `begin`. One grammar from the start rather than llama.cpp's lazy grammar: that one, once its
    trigger matches, replays the rest of the token that completed it into the grammar, and a rest the grammar
    refuses (a "\\n\\n" token after "<tool_call>") throws a C++ exception through the C steps: the process aborts."""
    sections = (calls.begin, calls.end, calls.lazy, calls.repeat)
    return _checked(_grammar(json.dumps(calls.schema), sections), "tools")


def exact_grammar(tokens: list[int]) -> str:
    """GBNF for exactly these tokens, then the end: a JSON answer's closing (engines/json_budget.py)."""
    return "root ::= " + (" ".join(f"<[{token}]>" for token in tokens) or '""')


def text_tokens(vocab: Vocab, text: str, shown: frozenset[int]) -> list[int]:
    """The tokens a closing text is written in: a marker's control tokens (`shown`) as themselves."""
    return vocab.tokenize([text.encode()], add_special=False, parse_special=bool(shown))


def _checked(result: tuple[str, str | None], param: str) -> str:
    grammar, error = result
    if error is not None:
        raise InvalidSchema(error, param=param)
    return grammar


@functools.lru_cache(maxsize=16)
def _grammar(schema_json: str, sections: tuple[str, str, bool, bool] | None) -> tuple[str, str | None]:
    """The grammar, or why there is none. Cached, failures included: every choice of a request converts the
    schema, and clients repeat theirs."""
    converter = _CompactConverter()
    try:
        schema = converter.resolve_refs(json.loads(schema_json), "stdin")
        value = converter.visit(schema, "" if sections is None else "call")
    except Exception as exc:  # its converter asserts, and raises KeyError or RecursionError on what it cannot read
        return "", f"llama.cpp cannot turn this JSON schema into a grammar: {type(exc).__name__}: {str(exc)[:200]}"
    if sections is not None:
        converter.add_sections(value, *sections)
    grammar = converter.format_grammar()
    if len(grammar) > MAX_GRAMMAR_CHARS:
        return "", f"The JSON schema's grammar is longer than {MAX_GRAMMAR_CHARS} characters; make it smaller."
    if _deepest_group(grammar) > MAX_GRAMMAR_NESTING:
        return "", (
            f"The JSON schema's grammar nests groups more than {MAX_GRAMMAR_NESTING} deep, which llama.cpp cannot "
            "load: lower its maxLength, maxItems or pattern repetition counts."
        )
    return grammar, _terminals_error(grammar)


def _integer_range(low: int, high: int) -> str:
    """A grammar expression for the integers from `low` to `high`, exactly (no leading zeros)."""
    alternatives = []
    if low < 0:
        negative = _natural_range(max(1, -high), -low)
        alternatives.append(f'"-" ( {" | ".join(negative)} )')
    if high >= 0:
        alternatives += _natural_range(max(0, low), high)
    return "( " + " | ".join(alternatives) + " )"


def _natural_range(low: int, high: int) -> list[str]:
    """Sequences matching the naturals from `low` to `high`: one range of equal length each, split digit by digit."""
    parts = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(high, 10**digits - 1)
        parts += _same_length(str(first), str(last))
    return parts


def _same_length(low: str, high: str) -> list[str]:
    """Sequences matching the numbers from `low` to `high`, both written with the same number of digits."""
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [f'"{low[0]}" {rest}' for rest in _same_length(low[1:], high[1:])]
    width = len(low) - 1
    parts, start, end = [], int(low[0]), int(high[0])
    if low[1:] != "0" * width:  # the first digit's numbers from `low` up, then whole decades
        parts += [f'"{low[0]}" {rest}' for rest in _same_length(low[1:], "9" * width)]
        start += 1
    tail = []
    if high[1:] != "9" * width:
        tail = [f'"{high[0]}" {rest}' for rest in _same_length("0" * width, high[1:])]
        end -= 1
    if start <= end:
        parts.append(f"[{start}-{end}]" + " [0-9]" * width)
    return parts + tail


class _CompactConverter(SchemaConverter):
    """llama-cpp-python's schema converter (the version pinned in pyproject.toml), writing compact JSON: no
    whitespace between tokens (strings keep theirs), so a small model cannot loop on free whitespace; and free-form
    values (`{"type": "object"}`, json_object) nest at most MAX_JSON_NESTING objects and arrays deep, so it cannot
    open brackets until `max_tokens` either. A string's characters leave out the control characters JSON forbids
    unescaped (the library's allow them: a small model wrote a raw newline into a key, which no JSON parser reads)."""

    def __init__(self):
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._rules["space"] = '""'
        hex4 = " ".join(["[0-9a-fA-F]"] * 4)
        self._rules["char"] = rf'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" {hex4})'

    def visit(self, schema, name):
        """The library's converter, plus integer bounds, which it leaves out (a small model then writes a number
        past them, and the call fails validation)."""
        if isinstance(schema, dict) and schema.get("type") == "integer" and any(k in schema for k in INTEGER_BOUNDS):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, _integer_range(*integer_bounds(schema)) + " space")
        return super().visit(schema, name)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if rule is PRIMITIVE_RULES["char"]:  # a string with a length bound asks for the library's own char again
            return "char"
        kind = _FREE_FORM.get(id(rule))
        if kind is None:
            return super()._add_primitive(name, rule)
        bounded = self._bounded_values()[kind]
        return bounded if name == kind else self._add_rule(name, bounded)

    def _bounded_values(self) -> dict[str, str]:
        """Rules for free-form JSON, one set per level, the innermost first: "value" (and "object", "array") at the
        outermost level, then "value-2" and so on; below the last level only scalars."""
        base = super()._add_primitive
        names = [base(kind, PRIMITIVE_RULES[kind]) for kind in ("string", "number", "boolean", "null")]
        scalars = " | ".join(names)
        inner = self._add_rule(f"value-{MAX_JSON_NESTING + 1}", scalars)
        for level in range(MAX_JSON_NESTING, 0, -1):
            suffix = "" if level == 1 else f"-{level}"
            member = f'{names[0]} ":" {inner}'
            rules = {
                "object": self._add_rule("object" + suffix, f'"{{" ( {member} ( "," {member} )* )? "}}"'),
                "array": self._add_rule("array" + suffix, f'"[" ( {inner} ( "," {inner} )* )? "]"'),
            }
            value = f"{rules['object']} | {rules['array']} | {scalars}"
            inner = rules["value"] = self._add_rule("value" + suffix, value)
        return rules

    def add_sections(self, value: str, begin: str, end: str, lazy: bool, repeat: bool) -> None:
        """The root: call sections (`begin`, the JSON `value`, `end`), after free text when `lazy`."""
        section = self._add_rule("section", f"{_literal(begin)} {value} {_literal(end)}")
        more = f' ( "\\n" {section} )*' if repeat else ""
        if not lazy:
            self._add_rule("root", section + more)
            return
        rest = self._add_rule("calls", f"{value} {_literal(end)}{more}")
        self._add_rule("root", self._free_text(begin, rest))

    def _free_text(self, begin: str, then: str) -> str:
        """Rules for any text up to and including the first `begin`, after which `then` follows; the text may also
        end before any `begin`. One rule per state of a matcher for `begin` (Knuth-Morris-Pratt): state i has seen
        `begin`'s first i characters at the end of the text."""
        prefix = self._fresh_prefix("text")
        for state in range(len(begin)):
            targets: dict[int, str] = {}  # the characters that move the matcher on, by the state they lead to
            for char in sorted(set(begin)):
                if target := _next_state(begin, state, char):
                    targets[target] = targets.get(target, "") + _class_char(char)
            alternatives = [f"[^{''.join(targets.values())}] {prefix}-0"]
            for target, chars in sorted(targets.items()):
                alternatives.append(f"[{chars}] {then if target == len(begin) else f'{prefix}-{target}'}")
            self._rules[f"{prefix}-{state}"] = " | ".join([*alternatives, '""'])
        return f"{prefix}-0"

    def _fresh_prefix(self, base: str) -> str:
        """A rule-name prefix no rule uses yet: schema-derived names are the client's choice ($defs keys)."""
        index = 0
        while any(name.startswith(f"{base}{index}-") for name in self._rules):
            index += 1
        return f"{base}{index}"


_FREE_FORM = {id(PRIMITIVE_RULES[kind]): kind for kind in ("value", "object", "array")}
# Characters written as themselves in a GBNF literal or class; every other is escaped.
_PLAIN_GBNF = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 <>/_.,:;!?@#$%&'*+=|~{}()")


def _next_state(pattern: str, state: int, char: str) -> int:
    """How many of `pattern`'s first characters end `pattern[:state] + char`: the matcher's next state."""
    seen = pattern[:state] + char
    return next(n for n in range(len(seen), -1, -1) if seen.endswith(pattern[:n]))


def _class_char(char: str) -> str:
    if char in _PLAIN_GBNF:
        return char
    code = ord(char)
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _literal(text: str) -> str:
    return f'"{"".join(_class_char(c) for c in text)}"'


def _deepest_group(grammar: str) -> int:
    """How deep the grammar's parentheses nest, outside its quoted literals and character classes."""
    depth = deepest = 0
    for mark in _GROUP_MARKS.findall(_GBNF_TERMINALS.sub("", grammar)):
        depth = depth + 1 if mark == "(" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def _terminals_error(grammar: str) -> str | None:
    """Why llama.cpp must not get the grammar's literals and character classes, if it must not.

    An escape its parser does not know fails the load, and the parser prints the whole grammar (the client's
    schema) to stderr. A terminal that needs a character no token carries (none at all, or only NUL, which llama.cpp
    never lets through) leaves the sampler without an allowed token: it draws a forbidden one and llama.cpp aborts
    the process."""
    for terminal in _GBNF_TERMINALS.finditer(grammar):
        literal, negated, body = terminal.groups()
        try:
            chars = _gbnf_chars(literal if literal is not None else body)
        except ValueError:
            return (
                "The JSON schema has a pattern escape that llama.cpp's grammars do not support (such as \\d, \\w, "
                "\\s or \\.): write a character class such as [0-9] instead."
            )
        if literal is not None:
            producible = all(char != "\0" for char, _ in chars)
        else:
            producible = _class_matches(chars, negated)
        if not producible:
            return "The JSON schema requires a character no token produces (NUL, or a class that matches nothing)."
    return None


def _gbnf_chars(text: str) -> list[tuple[str, bool]]:
    """The characters of a GBNF literal or class body as llama.cpp reads them, each with whether it is a bare '-'."""
    chars = []
    for hex2, hex4, hex8, escaped, plain in _GBNF_CHAR.findall(text):
        if plain:
            chars.append((plain, plain == "-"))
        elif escaped in _GBNF_ESCAPES:
            chars.append((_GBNF_ESCAPES[escaped], False))
        elif escaped:
            raise ValueError(f"llama.cpp's grammars have no escape \\{escaped}")
        else:
            chars.append((chr(int(hex2 or hex4 or hex8, 16)), False))
    return chars


def _class_matches(chars: list[tuple[str, bool]], negated: str) -> bool:
    """Whether a character class matches a character other than NUL (`a-z` is a range, as llama.cpp reads it)."""
    ranges, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1][1]:
            ranges.append((ord(chars[i][0]), ord(chars[i + 2][0])))
            i += 3
        else:
            ranges.append((ord(chars[i][0]),) * 2)
            i += 1
    if not negated:
        return any(high >= max(low, 1) for low, high in ranges)
    reached = 1  # the first code point after NUL that the ranges so far leave out
    for low, high in sorted(ranges):
        if low > reached:
            break
        reached = max(reached, high + 1)
    return reached <= LAST_CODE_POINT


def build_sampling(vocab: Vocab, params: SamplingParams, grammar: str | None) -> SlotSampling:
    """How C picks one sequence's tokens: greedy with its biases, or else llama.cpp's sampler chain.

    The chain copies all n_vocab logits into a candidate array on every call, many times the cost of steps.c's
    argmax (docs/design/c-steps.md). Greedy with biases needs none of that; penalties and grammars keep the
    chain (they have state)."""
    if params.temperature == 0 and grammar is None and not _penalized(params):
        biases = _biases(vocab, params)
        ids = sorted(biases)
        return SlotSampling(
            bias_ids=np.array(ids, dtype=np.int32), bias_values=np.array([biases[t] for t in ids], dtype=np.float32)
        )
    sampling = SlotSampling(grammar=grammar_sampler(vocab, grammar) if grammar is not None else None)
    try:
        sampling.chain = native_sampler(vocab, params)
    except ValueError:
        sampling.free()
        raise
    return sampling


def _biases(vocab: Vocab, params: SamplingParams) -> dict[int, float]:
    biases = {token: bias for token, bias in params.logit_bias.items() if 0 <= token < vocab.size}
    if params.ignore_eos:
        biases.update({token: END_OFF for token in vocab.eog_ids})
    return biases


def _penalized(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def grammar_sampler(vocab: Vocab, grammar: str):
    sampler = llama_cpp.llama_sampler_init_grammar(vocab.ptr, grammar.encode(), b"root")
    if not sampler:
        raise ValueError("llama.cpp refused the grammar")
    return sampler


def native_sampler(vocab: Vocab, params: SamplingParams):
    """llama.cpp's sampler chain, in the order llama-server uses; a grammar is checked apart (`grammar_sampler`)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler) -> None:
        if not sampler:
            llama_cpp.llama_sampler_free(chain)
            raise ValueError("llama.cpp refused the sampler settings (invalid grammar?)")
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    biases = _biases(vocab, params)
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))()
        for slot, (token, bias) in zip(array, biases.items()):
            slot.token, slot.bias = token, bias
        add(llama_cpp.llama_sampler_init_logit_bias(vocab.size, len(biases), array))
    if _penalized(params):
        add(
            llama_cpp.llama_sampler_init_penalties(
                vocab.size, PENALTY_WINDOW, params.repetition_penalty, params.frequency_penalty, params.presence_penalty
            )
        )
    if params.temperature == 0:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


# llama_get_logits with the address as an int: the binding's float pointer costs a ctypes.cast per call.
_get_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
    ctypes.cast(llama_cpp.llama_get_logits, ctypes.c_void_p).value
)


def output_logits(ctx, outputs: int, n_vocab: int) -> np.ndarray:
    """The last decode's logits, one row per output in batch order (a view, valid until the next decode).

    One call into llama.cpp for the whole step (it waits for the GPU there), not one per sequence: a
    llama_get_logits_ith, ctypes.cast and np.frombuffer per sequence was slow right after a step. The view
    here is made once per buffer and size."""
    address = _get_logits_address(ctx)
    if not address:
        raise RuntimeError("llama.cpp returned no logits")
    return _logits_view(address, outputs, n_vocab)


@functools.lru_cache(maxsize=64)
def _logits_view(address: int, rows: int, n_vocab: int) -> np.ndarray:
    # Safe to reuse while llama.cpp's buffer starts at `address`: it holds at least the `rows` just decoded.
    array = (ctypes.c_float * (rows * n_vocab)).from_address(address)
    view = np.frombuffer(array, dtype=np.float32).reshape(rows, n_vocab)
    view.flags.writeable = False  # llama.cpp's memory: samplers rank copies
    return view


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Batch:
    """A reusable llama_batch over numpy arrays, filled a run of one sequence's tokens at a time.

    A run is a few slice assignments, not a token at a time through the ctypes fields, which put Python
    inside every prefill step (docs/design/c-steps.md). Each token belongs to one sequence: `seq_id[i]`
    points at `_seq[i]`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._token = np.zeros(capacity, dtype=np.int32)
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        # The addresses of _seq's entries: llama.cpp's array of per-token pointers to sequence ids.
        self._seq_ids = self._seq.ctypes.data + np.arange(capacity, dtype=np.uintp) * self._seq.itemsize
        self.native = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            pos=self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ids.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    @property
    def size(self) -> int:
        return self.native.n_tokens

    def clear(self) -> None:
        self.native.n_tokens = 0

    def add(self, tokens: list[int], first_pos: int, seq_id: int, outputs: int) -> int:
        """Append `tokens` of sequence `seq_id` at positions from `first_pos`; the last `outputs` of them produce
        logits (or embeddings). Returns the batch index of the last token."""
        start = self.size
        end = start + len(tokens)
        if len(tokens) == 1:  # a decoding sequence's token: scalar stores are cheaper than slice assignments
            self._token[start], self._pos[start] = tokens[0], first_pos
            self._seq[start], self._logits[start] = seq_id, outputs
            self.native.n_tokens = end
            return start
        self._token[start:end] = tokens
        self._pos[start:end] = np.arange(first_pos, first_pos + len(tokens), dtype=np.int32)
        self._seq[start:end] = seq_id
        self._logits[start:end] = 0
        self._logits[end - outputs : end] = 1
        self.native.n_tokens = end
        return end - 1
