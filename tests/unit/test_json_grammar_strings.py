"""JSON strings under the llama.cpp engine's grammars leave out the raw control characters JSON forbids, whatever
bounds the schema puts on them (a length bound made the library add its own character rule, which lets them in)."""

from __future__ import annotations

import re

import pytest

from engines.llamacpp.native import json_grammar

CHARACTER_RULE = re.compile(r"^(char\w*) ::= (.*)$", re.MULTILINE)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string"},
        {"type": "string", "maxLength": 5},
        {"type": "string", "minLength": 2, "maxLength": 4},
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "note": {"type": "string"}}},
    ],
)
def test_every_string_character_rule_leaves_out_control_characters(schema):
    rules = dict(CHARACTER_RULE.findall(json_grammar(schema)))
    assert list(rules) == ["char"], rules
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F]'), rules
