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


def record_usage(record: RequestRecord, usage: dict) -> None:
    """A provider's `usage` object as the record's token counts."""
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    record.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def record_body_usage(record: RequestRecord, body: bytes) -> None:
    """The usage of a whole reply (nothing when the provider sent none)."""
    record.usage_pending = False
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        record_usage(record, from_json(body)["usage"] or {})


class StreamTally:
    """Counts a remote stream chunk by chunk. The gateway always asks the provider for usage; the chunk
    carrying it is hidden from a client that did not ask for it itself. Without usage from the provider,
    each content delta counts as one completion token."""

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
        choices = chunk.get("choices") or []
        outputs = sum(1 for choice in choices if _has_output(choice))
        if outputs and self.record.first_token_at is None:
            self.record.first_token_at = time.perf_counter()
            metrics.observe_first_token(self.record)
        self.deltas += outputs
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        return self.client_wants_usage or bool(choices) or not usage

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
