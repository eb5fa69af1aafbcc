"""The closing of partly written JSON (engines/json_closing.py) and when engines write it (engines/json_budget.py):
every prefix of a valid answer closes into a document valid against its schema, with the least text, and a
watched answer that never ends by itself still fits its token budget."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engines.base import SamplingParams, ToolCallConstraint
from engines.json_budget import ClosingPlan, TokenCloser, closing_plan

WORDS = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"}}},
         "required": ["words"]}  # fmt: skip
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "note": {"type": ["string", "null"]},
        "days": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"day": {"type": "integer", "minimum": 100, "maximum": 131}, "rain": {"type": "number"},
                               "hourly": {"type": "boolean"}},
                "required": ["day", "hourly"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}  # fmt: skip
TREE = {
    "$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"},
                                                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["name"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip
PICK = {"anyOf": [{"type": "integer", "minimum": -50, "maximum": -7},
                  {"type": "array", "items": {"const": "x"}, "minItems": 2}]}  # fmt: skip
PAIR = {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "string"}]}
CHOICE = {"type": "object", "properties": {"pick": PICK, "pair": PAIR}, "required": ["pick", "pair"]}
DOCUMENTS = [
    ({"type": "object"}, {"a": [1, -2.5e-3, {"b\\\"\u00e9": [True, False, None, "x\\ny\u1234"]}, []], "": {}}),
    (WORDS, {"words": ["one", "tw\\\"o", "", "d\u00e9j\u00e0"]}),
    (WEATHER, {"city": "Paris", "unit": "fahrenheit", "note": None,
               "days": [{"day": 117, "rain": 0.25, "hourly": True}, {"day": 131, "hourly": False}]}),  # fmt: skip
    (TREE, {"name": "root", "kids": [{"name": "a", "kids": []}, {"name": "b"}]}),
    (CHOICE, {"pick": -12, "pair": [False, "no"]}),
    (CHOICE, {"pick": ["x", "x", "x"], "pair": [True, "yes"]}),
]
BEGIN, END = "<tool_call>\n", "\n</tool_call>"
CALL = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
        "required": ["name", "arguments"]}  # fmt: skip
SHORTEST_CALL = '{"name":"get_weather","arguments":{"city":"aa","unit":"celsius","days":[{"day":100,"hourly":true}]}}'


def closing(schema: dict, text: str, calls: ToolCallConstraint | None = None) -> str | None:
    tracker = ClosingPlan(schema, calls).tracker()
    tracker.feed(text)
    return tracker.closing()


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(("schema", "document"), DOCUMENTS)
def test_every_prefix_of_a_valid_answer_closes_into_a_valid_document(schema, document):
    text = compact(document)
    jsonschema.validate(document, schema)
    for end in range(len(text) + 1):
        rest = closing(schema, text[:end])
        assert rest is not None, text[:end]
        jsonschema.validate(json.loads(text[:end] + rest), schema)
    assert closing(schema, text) == ""


@pytest.mark.parametrize(
    ("schema", "written", "rest"),
    [
        (WORDS, "", '{"words":[]}'),
        (WORDS, '{"words":["ab', '"]}'),
        (WORDS, '{"words":["a\\', 'n"]}'),  # an escape is completed
        (WORDS, '{"words":["a\\u00', '00"]}'),
        (WORDS, '{"words":["a",', '""]}'),  # after a comma, one more item
        (WORDS, '{"words":[],', '"":0}'),  # after a comma, one more member: any key is allowed here
        (WORDS, '{"wo', 'rds":[]}'),  # a key becomes the required property it starts
        (WEATHER, '{"city":"P', 'a","unit":"celsius","days":[{"day":100,"hourly":true}]}'),  # minLength, then required
        (WEATHER, '{"city":"Po","unit":"fahr', 'enheit","days":[{"day":100,"hourly":true}]}'),  # the enum it starts
        (WEATHER, '{"city":"Po","unit":"celsius","days":[{"day":1', '00,"hourly":true}]}'),  # within the bounds
        (WEATHER, '{"city":"Po","unit":"celsius","days":[{"day":12', '0,"hourly":true}]}'),
        (WEATHER, '{"city":"Po","unit":"celsius","note":n', 'ull,"days":[{"day":100,"hourly":true}]}'),
        (CHOICE, '{"pick":-', '7,"pair":[]}'),
        (CHOICE, '{"pick":[', '"x","x"],"pair":[]}'),
        ({"type": "number"}, "-1.", "0"),
        ({"type": "number"}, "3e+", "0"),
    ],
)
def test_the_closing_is_the_shortest_valid_rest(schema, written, rest):
    assert closing(schema, written) == rest


def test_no_closing_where_none_validates():
    digits = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]+$"}}, "required": ["code"]}
    assert closing(digits, '{"code":"12') == '"}'
    assert closing(digits, '{"code":"12a') is None  # the pattern cannot match whatever follows
    assert closing({"type": "integer", "minimum": 10, "maximum": 20}, "3") is None
    params = SamplingParams(max_tokens=10, json_schema=digits)
    assert closing_plan(params) is None  # its shortest value ("") does not validate: nothing to close with


def test_a_call_section_closes_with_its_end_marker():
    calls = ToolCallConstraint(CALL, BEGIN, END)
    assert closing(CALL, "", calls) == BEGIN + SHORTEST_CALL + END
    assert closing(CALL, "<tool", calls) == "_call>\n" + SHORTEST_CALL + END
    text = BEGIN + '{"name":"get_weather","arguments":{"city":"Rome","unit":"celsius","days":[]'
    assert closing(CALL, text, calls) is None  # minItems: the array is closed already, and short of an item
    text = BEGIN + '{"name":"get_weather","arguments":{"city":"Rome","unit":"celsius","days":[{"day":101,"hourly":true}'
    assert closing(CALL, text, calls) == "]}}" + END
    assert closing(CALL, text + "]}}\n</to", calls) == "ol_call>"


def test_lazy_calls_close_only_once_begun_and_repeated_ones_between_sections():
    calls = ToolCallConstraint(CALL, BEGIN, END, lazy=True, repeat=True)
    assert closing(CALL, "Sure, <tool_ca", calls) == ""  # free text: nothing to close
    started = closing(CALL, "Sure, <tool_call>\n{", calls)
    assert started.startswith('"name":"get_weather"') and started.endswith("}" + END)
    days = [{"day": 105, "hourly": False}]
    call = compact({"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius", "days": days}})
    section = BEGIN + call + END
    assert closing(CALL, "Sure, " + section, calls) == ""
    assert closing(CALL, "Sure, " + section + "\n<to", calls) == "ol_call>\n" + SHORTEST_CALL + END


def endless(schema: dict, seed: int) -> str:
    """A valid answer far longer than any budget below: what a model that never closes on its own writes."""
    rng = random.Random(seed)
    if schema is WORDS:
        words = ["".join(rng.choice("abc\u00e9\\n") for _ in range(rng.randint(0, 9))) for _ in range(400)]
        return compact({"words": words})
    days = [{"day": rng.randint(100, 131), "hourly": rng.random() < 0.5} for _ in range(300)]
    return compact({"city": "Oslo" * rng.randint(1, 30), "unit": "fahrenheit", "days": days})


def endless_calls(seed: int, lazy: bool) -> str:
    """Free text (when lazy), then one complete call after another, each after a newline."""
    rng = random.Random(seed)
    calls = []
    for _ in range(40):
        days = [{"day": rng.randint(100, 131), "hourly": rng.random() < 0.5} for _ in range(rng.randint(1, 4))]
        arguments = {"city": "Rome" * rng.randint(1, 3), "unit": "celsius", "days": days}
        calls.append(BEGIN + compact({"name": "get_weather", "arguments": arguments}) + END)
    return ("Let me look that up. " if lazy else "") + "\n".join(calls)


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def per_token(size: int):
    """A tokenizer's count for a model that writes `size` bytes a token."""
    return lambda text: -(-len(text.encode()) // size)


def watched(plan, tokens: list[str], budget: int, count) -> str:
    """What a model that writes `tokens` leaves when only its watch ends it: the text it wrote and the closing forced
    on it, which must fit the budget with the end of generation."""
    watch, mark, written = plan.watch(count), budget, 0
    for left in range(budget, 0, -1):  # one token a step
        if left <= mark:  # the engine looks only when the watch asks
            decision = watch.decide(left)
            if decision.force is not None:
                assert budget - left + count(decision.force) + 1 <= budget, (budget, tokens[:written], decision.force)
                return "".join(tokens[:written]) + decision.force
            mark = left - decision.wait
        watch.feed_bytes(tokens[written].encode())
        written += 1
    raise AssertionError(f"no closing within {budget} tokens: {tokens[:written]}")


@pytest.mark.parametrize("schema", [WORDS, WEATHER])
@pytest.mark.parametrize("size", [1, 3])
def test_a_watched_answer_that_never_ends_by_itself_closes_within_its_budget(schema, size):
    """For every budget that can hold the shortest answer, the answer is complete, valid, and within the budget."""
    plan = closing_plan(SamplingParams(max_tokens=1, json_schema=schema))
    count = per_token(size)
    for seed, budget in enumerate(range(count(plan.minimal) + 1, 160)):
        answer = watched(plan, chunks(endless(schema, seed), size), budget, count)
        jsonschema.validate(json.loads(answer), schema)


def test_an_array_of_strings_closes_with_the_model_s_own_items():
    """Tokens as a BPE vocabulary cuts such an array (`apple`, then `","`): the closing comes where it ends an item
    the model began, a little early, rather than add an empty one."""
    plan = closing_plan(SamplingParams(max_tokens=1, json_schema=WORDS))
    words = ["apple", "pear", "fig", "plum", "quince"] * 20
    tokens = ['{"words":["'] + [piece for word in words for piece in (word, '","')]
    for budget in range(20, 80):
        answer = json.loads(watched(plan, tokens, budget, per_token(3)))
        assert answer["words"] and all(answer["words"]), (budget, answer)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_parallel_calls_end_after_a_complete_call_and_never_with_one_of_nothing_but_defaults(lazy, size):
    """A model that calls and calls again: each budget ends with whole, valid calls, the last one closed in time,
    and no call made up of the closing's shortest values alone."""
    calls = ToolCallConstraint(CALL, BEGIN, END, lazy=lazy, repeat=True)
    plan = closing_plan(SamplingParams(max_tokens=1, tool_calls=calls))
    count = per_token(size)
    shortest = count(BEGIN + SHORTEST_CALL + END) + 1
    for seed, budget in enumerate(range(2 * shortest, 2 * shortest + 120, 2)):  # room for some of the model's own
        answer = watched(plan, chunks(endless_calls(seed, lazy), size), budget, count)
        free = "Let me look that up. " if lazy else ""
        assert answer.startswith(free + BEGIN) and answer.endswith(END), answer
        for call in answer[len(free + BEGIN) : -len(END)].split(END + "\n" + BEGIN):
            jsonschema.validate(json.loads(call), CALL)
            assert call != SHORTEST_CALL, answer


class CharTokenizer:
    """llguidance's tokenizer, as TokenCloser uses it, for a vocabulary of one token per character (eos: -1)."""

    eos_token = -1

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return "".join(map(chr, tokens)).encode()

    def tokenize_str(self, text: str) -> list[int]:
        return list(map(ord, text))


def test_a_token_closer_forces_the_closing_then_the_end_and_answers_a_step_twice_alike():
    plan = closing_plan(SamplingParams(max_tokens=1, json_schema=WORDS))
    closer = TokenCloser(plan.watch(len), CharTokenizer())
    text, generated, budget = endless(WORDS, 0), [], 40
    for left in range(budget, 0, -1):
        token = closer.next_token(generated, left)
        assert closer.next_token(generated, left) == token  # vLLM may ask about a step whose sample it drops
        if token == CharTokenizer.eos_token:
            break
        generated.append(token if token is not None else ord(text[len(generated)]))
    else:
        raise AssertionError("no end within the budget")
    answer = "".join(map(chr, generated))
    assert len(answer) > len('{"words":[]}') and answer[:20] == text[:20], answer  # closed late, not at once
    jsonschema.validate(json.loads(answer), WORDS)


def test_a_closer_whose_closing_the_engine_did_not_write_stops_watching():
    plan = closing_plan(SamplingParams(max_tokens=1, json_schema=WORDS))
    closer = TokenCloser(plan.watch(len), CharTokenizer())
    generated = list(map(ord, '{"words":["x'))
    assert closer.next_token(generated, 4) == ord('"')
    generated.append(ord("y"))  # the grammar refused the closing's token: the engine wrote another
    assert closer.next_token(generated, 3) is None and closer.next_token(generated, 2) is None


def test_ignore_eos_and_unconstrained_requests_have_no_plan():
    assert closing_plan(SamplingParams(max_tokens=5)) is None
    assert closing_plan(SamplingParams(max_tokens=5, json_schema=WORDS, ignore_eos=True)) is None
    assert closing_plan(SamplingParams(max_tokens=5, json_schema=WORDS)) is not None
