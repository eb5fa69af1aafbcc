"""A prompt too long for a target's context window: not the request's fault while another target of its chain has
a larger window, so the chain moves on (docs/routing.md#context-window-fallback).

Local engines and OpenAI say so with the code `context_length_exceeded`; llama-server with the type
`exceed_context_size_error`; vLLM only in its message ("This model's maximum context length is ..."); Anthropic in
its message too ("prompt is too long: ...").
"""

from __future__ import annotations

from gateway.errors import APIError
from gateway.routing.targets import CapabilityMismatch

CODES = frozenset({"context_length_exceeded"})  # OpenAI's code, and the gateway's own
TYPES = frozenset({"exceed_context_size_error"})  # llama-server's
MESSAGES = ("maximum context length is", "prompt is too long")  # vLLM's, Anthropic's (lower case)


class PromptTooLong(CapabilityMismatch):
    """The prompt (with the tokens asked for) does not fit the target's context: a target with a larger one may
    serve it. No fault of the target: it does not count towards its cooldown."""


def too_long(error: APIError) -> bool:
    """Whether a target's 400 says that the request does not fit its context window."""
    if error.status_code != 400:
        return False
    message = error.message.lower()
    return error.code in CODES or error.type in TYPES or any(words in message for words in MESSAGES)
