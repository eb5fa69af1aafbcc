"""Constrained JSON that finishes within `max_tokens`: when an engine stops sampling and writes the closing text.

A constraint (response_format json_object / json_schema, tool-call sections) keeps every token valid, but a model
that runs out of tokens inside an array or a string still leaves the client cut-off JSON. So each engine watches
a constrained sequence: `closing_plan` reads the request's schema once, a `BudgetWatch` per sequence follows its
text (engines/json_closing.py) and, from the tokens left, says when to look again and when to write the closing
instead of sampling: exactly those tokens, then the end. The answer is then complete and valid, with finish `stop`.

Costs are the closing's tokens in the engine's own tokenizer, plus one for the end of generation. Between two
looks, one token can lengthen the closing by at most `growth` tokens (it opens a value the closing did not need
yet: an optional member, another array item, an enum value); looks are spaced so that such growth cannot outrun
the budget, so they are rare until the budget nears the closing's length. The closing is written once one more
token could make it too long, or up to EARLY tokens before that where it then adds no value the model has not
begun. Where a lazy tool call (`auto`) may begin, the looks keep a whole call's length in reserve; after a call,
another parallel call may begin only while twice its shortest form still fits, else the answer ends there.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable

import jsonschema

from engines.base import SamplingParams, ToolCallConstraint
from engines.json_closing import JsonTracker, SchemaIndex, SectionTracker

MARGIN = 2  # tokens of growth allowed beyond the longest single opening: a token may also end what it opens
EARLY = 3  # tokens a closing may come early, where it then adds no value the model has not begun
OPENINGS = 8  # the longest openings (in bytes) whose tokens a watch counts
ESCAPE_OPENING = '0000"'  # a string's own opening: "\u" started, four hex digits and the quote to come
Count = Callable[[str], int]  # the tokens an engine writes a text in
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What an engine does next for a watched sequence: write `force` (then end), or look again after `wait` tokens."""

    force: str | None = None
    wait: int = 1


class ClosingPlan:
    """What closing needs of one constraint, computed once per schema: its index, validator, shortest value."""

    def __init__(self, schema: Any, calls: ToolCallConstraint | None):
        self.calls = calls
        self._index = SchemaIndex(schema)
        self._validator = jsonschema.validators.validator_for(schema)(schema)
        minimal = self._index.minimal(schema)
        self.minimal = minimal if minimal is not None and self._validator.is_valid(json.loads(minimal)) else None
        self.section = "" if calls is None else calls.begin + (self.minimal or "") + calls.end
        openings = {*self._index.openings(), ESCAPE_OPENING}
        self.openings = sorted(openings, key=lambda text: len(text.encode()), reverse=True)[:OPENINGS]

    def tracker(self) -> JsonTracker | SectionTracker:
        if self.calls is None:
            return self._json_tracker()
        return SectionTracker(self.calls, self.minimal, self._json_tracker)

    def _json_tracker(self) -> JsonTracker:
        return JsonTracker(self._index, self._validator)

    def watch(self, count: Count) -> BudgetWatch:
        return BudgetWatch(self, count)


class BudgetWatch:
    """One sequence's watch: its text, fed as it is written, and the next `Decision`."""

    def __init__(self, plan: ClosingPlan, count: Count):
        self._plan, self._count = plan, count
        self._tracker = plan.tracker()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = False  # the text ends inside a character: look again after the next token
        self._growth = max(count(text) for text in plan.openings) + MARGIN
        calls = plan.calls
        section = count(plan.section) + 1 if calls is not None else 0  # with the newline before it
        self._start = section if calls is not None and calls.lazy else 0  # a call begun in free text
        self._again = section if calls is not None and calls.repeat else 0  # another call after this one

    def feed_bytes(self, data: bytes) -> None:
        """The bytes of tokens written since the last feed."""
        self._tracker.feed(self._decoder.decode(data))
        self._pending = bool(self._decoder.getstate()[0])

    def decide(self, left: int) -> Decision:
        """`left`: tokens the sequence may still generate."""
        growth = self._growth
        if self._tracker.free:  # nothing to close, but a call may begin and must then fit
            return Decision(wait=max(1, (left - self._start) // (growth + 1)))
        closing = None if self._pending else self._tracker.closing()
        if closing is None:
            return Decision(wait=1 if self._pending else max(1, left // (growth + 1)))
        slack = left - self._count(closing) - 1  # one token for the end of generation
        if slack < 0:
            return Decision(wait=1)  # it does not fit; the model may still close some of it itself
        # After a finished call, another may begin only with room for twice its shortest form: no call of nothing
        # but the shortest values.
        reserve = growth + (2 * self._again if self._tracker.done else 0)
        if slack <= reserve or slack <= reserve + EARLY and self._tracker.at_rest:  # (early: no empty value added)
            return Decision(force=closing)
        return Decision(wait=max(1, (slack - EARLY - 2 * self._again) // (growth + 1)))


class TokenCloser:
    """A watch on an engine that picks tokens in Python (transformers, vLLM's logits processors), with llguidance's
    tokenizer: which token the sequence must write next, if any. Asked again about the same step (vLLM samples
    rows it then drops), it answers the same."""

    def __init__(self, watch: BudgetWatch, tokenizer, accepts: Callable[[list[int]], bool] | None = None):
        """`tokenizer`: an llguidance.LLTokenizer; `accepts`: whether the sequence's grammar takes these tokens next."""
        self._watch, self._tokenizer, self._accepts = watch, tokenizer, accepts
        self._seen = 0  # tokens whose bytes the watch has
        self._mark: int | None = None  # look again once `left` is down to this
        self._forced: list[int] = []  # the closing's tokens and the end, from the `_forced_at`-th token on
        self._forced_at = 0

    def next_token(self, generated: list[int], left: int) -> int | None:
        """`generated`: the sequence's tokens so far; `left`: tokens it may still write, this one included."""
        if self._forced:
            index = len(generated) - self._forced_at
            if generated[self._forced_at :] == self._forced[:index]:
                return self._forced[index] if index < len(self._forced) else None
            self._forced, self._mark = [], -1  # the engine wrote another token (its grammar refused): watch no more
        if self._mark is not None and left > self._mark:
            return None
        try:
            forced, wait = self._look(generated, left)
        except Exception:  # it goes on unwatched, rather than fail (in vLLM, with every request of its engine)
            log.exception("the JSON budget watch failed")
            forced, wait = None, left + 1
        if forced is not None:
            self._forced, self._forced_at = [*forced, self._tokenizer.eos_token], len(generated)
            return self._forced[0]
        self._mark = left - wait
        return None

    def _look(self, generated: list[int], left: int) -> tuple[list[int] | None, int]:
        """The closing's tokens where it is due, else how many tokens until the next look."""
        self._watch.feed_bytes(self._tokenizer.decode_bytes(generated[self._seen :]))
        self._seen = len(generated)
        decision = self._watch.decide(left)
        forced = None if decision.force is None else self._tokenizer.tokenize_str(decision.force)
        if forced is not None and (self._accepts is None or self._accepts(forced)):
            return forced, 0
        return None, decision.wait  # (a closing the grammar refuses: look again after the next token)


def closing_plan(params: SamplingParams) -> ClosingPlan | None:
    """The plan for a request's constraint, or None (see `closed_constraint`; or a schema whose shortest value it
    cannot find, or that does not validate)."""
    constraint = closed_constraint(params)
    return None if constraint is None else plan_for(*constraint)


def closed_constraint(params: SamplingParams) -> tuple[Any, ToolCallConstraint | None] | None:
    """The schema (and tool-call sections) to close in time, or None: no constraint, or `ignore_eos` (the client
    asked for max_tokens tokens, not for an end)."""
    if params.ignore_eos:
        return None
    if params.tool_calls is not None:
        return params.tool_calls.schema, params.tool_calls
    return None if params.json_schema is None else (params.json_schema, None)


def plan_for(schema: Any, calls: ToolCallConstraint | None) -> ClosingPlan | None:
    sections = None if calls is None else (calls.begin, calls.end, calls.lazy, calls.repeat)
    return _plan(json.dumps(schema), sections)


@functools.lru_cache(maxsize=32)
def _plan(schema_json: str, sections: tuple[str, str, bool, bool] | None) -> ClosingPlan | None:
    """Cached: clients repeat their schemas, and every choice of a request asks."""
    schema = json.loads(schema_json)
    try:
        plan = ClosingPlan(schema, None if sections is None else ToolCallConstraint(schema, *sections))
    except (jsonschema.SchemaError, RecursionError, re.error, TypeError, ValueError):
        return None
    return plan if plan.minimal is not None else None
