"""What the gateway reads from a remote target's replies while relaying them: when the first token
arrived, and how many tokens were used. Both go on the request's record, for metrics, the access log
and the key's tokens-per-minute limit, as local engines put theirs there while generating. Until a reply
told its usage (or a stream showed its end) the record's usage is pending: a request cut short then is
charged its whole reservation."""

from __future__ import annotations

import contextlib
import time

from pydantic_core import from_json

from gateway.telemetry import metrics
from gateway.telemetry.requests import RequestRecord

# The events that end a Messages or a Responses stream (an OpenAI chat stream ends with `[DONE]`).
END_EVENTS = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed"})


def record_usage(record: RequestRecord, usage: dict) -> None:
    """A provider's `usage` object as the record's token counts: in Chat Completions' names, or the Responses and
    Messages APIs' (input and output tokens; Anthropic counts the tokens read from and written to its cache apart)."""
    record.prompt_tokens = _tokens(usage, "prompt_tokens", "input_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens")  # fmt: skip
    record.completion_tokens = _tokens(usage, "completion_tokens", "output_tokens")
    if not record.prompt_tokens and not record.completion_tokens:  # a rerank provider (Jina) that gives a total only
        record.prompt_tokens = _tokens(usage, "total_tokens")
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    record.cached_tokens = cached + _tokens(usage, "cache_read_input_tokens")


def _tokens(usage: dict, *names: str) -> int:
    """The sum of the counts under `names` (a provider uses one name of each kind; absent ones count 0)."""
    return sum(int(usage.get(name) or 0) for name in names)


def record_body_usage(record: RequestRecord, body: bytes) -> None:
    """The usage of a whole reply (nothing when the provider sent none)."""
    record.usage_pending = False
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        record_usage(record, from_json(body)["usage"] or {})


class StreamTally:
    """Counts a remote stream chunk by chunk. The gateway always asks the provider for usage; the chunk
    carrying it is hidden from a client that did not ask for it itself. Without usage from the provider,
    each content delta counts as one completion token. A Messages or Responses stream (relayed as the provider sent
    it) is counted from its typed events, all of which pass."""

    def __init__(self, record: RequestRecord, client_wants_usage: bool):
        self.record, self.client_wants_usage = record, client_wants_usage
        self.usage: dict | None = None
        self.deltas = 0
        self.finished = False  # the provider ended the stream ([DONE])

    def passes(self, data: str) -> bool:
        """Count one `data` payload; False when it is only the usage the client did not ask for."""
        chunk: dict = {}
        with contextlib.suppress(ValueError):
            chunk = from_json(data)
        if not isinstance(chunk, dict):
            return True  # not a chunk the gateway understands: the client gets it as the provider sent it
        if "type" in chunk:
            self._typed_event(chunk)
            return True
        choices = chunk.get("choices") or []
        self._outputs(sum(1 for choice in choices if _has_output(choice)))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        return self.client_wants_usage or bool(choices) or not usage

    def _typed_event(self, event: dict) -> None:
        """A Messages or Responses event: output in its deltas; usage in message_start (input) and message_delta
        (output), or in the response of a Responses stream's last event."""
        kind = event["type"]
        self._outputs(int(kind == "content_block_delta" or (isinstance(kind, str) and kind.endswith(".delta"))))
        holder = event.get("message") or event.get("response")
        usage = event.get("usage") or (holder.get("usage") if isinstance(holder, dict) else None)
        if isinstance(usage, dict):
            self.usage = {**(self.usage or {}), **usage}

    def _outputs(self, count: int) -> None:
        if count and self.record.first_token_at is None:
            self.record.first_token_at = time.perf_counter()
            metrics.observe_first_token(self.record)
        self.deltas += count

    def settle(self) -> None:
        """Put the stream's tokens on the record, once it ended (or was cut). Cut before the provider finished
        and without its usage, what it generated is unknown: the usage stays pending."""
        if self.usage:
            record_usage(self.record, self.usage)
        else:
            self.record.prompt_tokens, self.record.completion_tokens = 0, self.deltas
        self.record.usage_pending = not (self.usage or self.finished)


def _has_output(choice) -> bool:
    """Whether a choice of a chunk carries generated output: text, content, a refusal, tool calls..."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    in_delta = isinstance(delta, dict) and any(value for key, value in delta.items() if key != "role")
    return in_delta or bool(choice.get("text"))
