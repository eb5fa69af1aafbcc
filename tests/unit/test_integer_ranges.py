"""llama.cpp grammars hold integers to their schema's bounds (llama-cpp-python's converter leaves them out)."""

from __future__ import annotations

import random
import re

import pytest

from engines.llamacpp.native import _integer_range, json_grammar


def _as_regex(expression: str) -> re.Pattern:
    """The grammar expression of `_integer_range` (literals, digit classes, groups) as a Python regex."""
    return re.compile("^" + re.sub(r'"(-|\d)"', r"\1", expression).replace(" ", "") + "$")


@pytest.mark.parametrize(
    ("low", "high"),
    [(1, 30), (0, 0), (-5, 17), (7, 1234), (-1000, -3), (95, 105), (0, 10**16 - 1), (-(10**16) + 1, 5)],
)
def test_an_integer_range_matches_exactly_its_members(low, high):
    pattern = _as_regex(_integer_range(low, high))
    rng = random.Random(low ^ high)
    numbers = [*range(low - 3, low + 40), *range(high - 40, high + 3), *(rng.randint(low, high) for _ in range(300))]
    for number in numbers:
        assert bool(pattern.match(str(number))) == (low <= number <= high), number
    assert not pattern.match("0" + str(max(low, 1))) and not pattern.match("-0")


def test_schema_bounds_reach_the_grammar():
    grammar = json_grammar({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 30}}})
    assert '( [1-9] | [1-2] [0-9] | "3" [0-0] )' in grammar
    with pytest.raises(Exception, match="no integer lies within"):
        json_grammar({"type": "integer", "minimum": 5, "exclusiveMaximum": 5})
