"""Mid-stream failover that finishes the answer, for a public model with `continue_on_failure`: a chat stream that
breaks after output was sent goes on from the text sent so far, on the next target of its chain that can continue an
answer (docs/routing.md#finishing-a-broken-stream).

The text so far goes to that target as a last assistant message with vLLM's `continue_final_message` (and
`add_generation_prompt: false`), so its answer continues that text instead of starting a new turn. Its chunks are
spliced into the broken stream as its own: the same id, created and model, no second role chunk, its finish_reason
and usage at the end. Where a text prefix cannot carry the answer (a tool call, reasoning or a refusal under way,
several choices, a constrained answer, an answer that had finished) the break ends the stream as without the setting.

Chunks are read as the JSON the client gets (the routing layer knows no front end's models), and only on such models.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Awaitable, Callable

from pydantic_core import from_json, to_json

from gateway.core.request import ModelRequest
from gateway.errors import APIError
from gateway.routing.targets import Outcome
from gateway.telemetry.requests import RequestRecord

log = logging.getLogger(__name__)
IDENTITY = ("id", "created", "model")  # what makes the continuing target's chunks the broken stream's own
TEXT_FIELDS = frozenset({"role", "content"})  # a delta with anything else in it is not plain text

# Serves a continuing request on the rest of the chain (retries, cooldowns and fallback as for any request).
Finisher = Callable[[ModelRequest], Awaitable[Outcome]]


async def finishing(events: AsyncIterator[str], body: ModelRequest, finish: Finisher,
                    record: RequestRecord) -> AsyncIterator[str]:  # fmt: skip
    """`events` (chat chunks), and where they break after output, the rest of the answer from `finish`; where it
    cannot go on, the break as it came."""
    answer = _Answer()
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                answer.read(event)
                yield event
        return
    except Exception as error:
        request = answer.continuation(body) if _broken(error) else None
        if request is None:
            raise
        broken = error
    log.warning("a stream broke after %d chunks (%s); finishing it on the next target", answer.chunks, broken)
    spent = (record.prompt_tokens, record.completion_tokens, record.usage_pending)
    try:
        outcome = await _served(finish, request, broken)
        async for event in answer.spliced(outcome.events):
            yield event
    finally:  # the key is charged what the broken target used too
        record.prompt_tokens += spent[0]
        record.completion_tokens += spent[1]
        record.usage_pending |= spent[2]


async def _served(finish: Finisher, request: ModelRequest, broken: Exception) -> Outcome:
    try:
        return await finish(request)
    except APIError:  # no target could go on: the client hears of the break itself
        raise broken from None


def _broken(error: Exception) -> bool:
    """A failure of the target (a server error, a cut stream), not of the request (a 4xx)."""
    return getattr(error, "status_code", 500) >= 500


class _Answer:
    """What a chat stream has sent: whose stream it is, and its answer's text, while a text prefix can carry it."""

    def __init__(self):
        self.identity: dict = {}
        self.text: list[str] = []
        self.chunks = 0  # content deltas, about a token each
        self.plain = True  # False once it sent something a text prefix cannot carry

    def read(self, event: str) -> None:
        if not self.plain:
            return  # past help: nothing more to read
        try:
            chunk = from_json(event)
            self.identity = self.identity or {name: chunk[name] for name in IDENTITY}
            choices = chunk["choices"]
        except (ValueError, KeyError, TypeError):  # not a chat chunk this module knows
            self.plain = False
            return
        for choice in choices:
            delta = choice.get("delta") or {}
            if _carries_more(choice, delta):
                self.plain = False
                return
            if delta.get("content"):
                self.text.append(delta["content"])
                self.chunks += 1

    def continuation(self, body: ModelRequest) -> ModelRequest | None:
        """The request that goes on from the text sent so far; None where it cannot."""
        fields = body.as_sent()
        if not (self.plain and self.text) or fields.get("n", 1) != 1 or "messages" not in fields:
            return None
        if (fields.get("response_format") or {}).get("type", "text") != "text":
            return None  # a constraint starts from the answer's beginning, not from inside it
        for name in ("max_tokens", "max_completion_tokens"):  # what is left of the budget
            if fields.get(name) is not None:
                fields[name] -= self.chunks
                if fields[name] < 1:
                    return None
        text = "".join(self.text)
        messages = fields["messages"]
        if fields.get("continue_final_message"):  # it was a continuation already: its last message grows
            messages[-1] = _extended(messages[-1], text)
        else:
            messages.append({"role": "assistant", "content": text})
        fields.update(stream=True, continue_final_message=True, add_generation_prompt=False)
        try:
            return type(body).parse(to_json(fields))
        except APIError:  # past a limit once the answer is added
            return None

    async def spliced(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """The continuing target's chunks as the broken stream's own: its identity, no second role chunk."""
        async with contextlib.aclosing(events):
            async for event in events:
                chunk = from_json(event)
                choices = chunk.get("choices") or []
                for choice in choices:
                    (choice.get("delta") or {}).pop("role", None)
                if choices and not any(map(_says_something, choices)):
                    continue  # the role chunk, left empty
                yield to_json({**chunk, **self.identity}).decode()


def _carries_more(choice: dict, delta: dict) -> bool:
    """Whether a choice's chunk holds what a text prefix cannot carry: another choice, a finish, or a delta with more
    than text (tool calls, reasoning, a refusal)."""
    extra = any(value for name, value in delta.items() if name not in TEXT_FIELDS)
    return choice.get("index") != 0 or bool(choice.get("finish_reason")) or extra


def _says_something(choice: dict) -> bool:
    return any((choice.get("delta") or {}).values()) or bool(choice.get("finish_reason") or choice.get("logprobs"))


def _extended(message: dict, text: str) -> dict:
    content = message.get("content") or ""
    if isinstance(content, list):
        return {**message, "content": [*content, {"type": "text", "text": text}]}
    return {**message, "content": content + text}
