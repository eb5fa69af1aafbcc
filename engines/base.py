"""The one interface every in-process engine implements.

The gateway never talks to llama.cpp, transformers or vLLM directly: it renders a prompt through
`Engine.render_chat`/`Engine.encode_prompt`, then consumes `Engine.generate` as an async iterator of
`Delta`s. Engines may run many generations at once; each call to `generate` is one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable


class EngineError(Exception):
    """An engine failure the gateway maps to an OpenAI-shaped error."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class EngineNotReady(EngineError):
    status_code = 503
    error_type = "server_error"
    code = "model_not_ready"


class EngineOverloaded(EngineError):
    status_code = 503
    error_type = "server_error"
    code = "engine_overloaded"


class GenerationFailed(EngineError):
    """One sequence's step failed in the engine (its forward or its sampling); the others go on. The server's fault,
    not the request's: a 502, as a model's invalid tool call is."""

    status_code = 502
    error_type = "server_error"
    code = "generation_failed"


class ContextLengthExceeded(EngineError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "context_length_exceeded"


def too_long_to_tokenize(window: int, least: int, param: str) -> ContextLengthExceeded:
    """For a prompt refused before it is tokenized: it cannot take fewer than `least` tokens."""
    return ContextLengthExceeded(
        f"This model's maximum context length is {window} tokens. However, the {param} would take at least "
        f"{least} tokens. Please reduce the length of the {param}.", param=param,
    )  # fmt: skip


class UnsupportedFeature(EngineError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "unsupported_parameter"


class ChatTemplateRefused(EngineError):
    """The model's chat template cannot render these messages (its `raise_exception`, or data it cannot read): the
    request's fault, a 400 naming `messages` on every engine."""

    status_code = 400
    error_type = "invalid_request_error"

    @classmethod
    def because(cls, error: Exception) -> ChatTemplateRefused:
        return cls(f"The model's chat template cannot render these messages: {str(error)[:300]}", param="messages")


@dataclass
class EngineConfig:
    """What one engine instance loads and how; engine-specific knobs go in `options`."""

    model_path: str
    served_name: str
    context_length: int = 4096
    threads: int | None = None
    gpu_layers: int = 0
    parallel: int = 4
    batch_size: int = 512
    embedding: bool = True
    max_waiting: int = 256
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for generation: the rendered text and its token ids."""

    text: str
    token_ids: list[int]


# `ignore_eos`'s bias on the end-of-generation tokens: finite, so that where a grammar allows nothing but the end
# the end is still drawn. With every logit -inf there is nothing to draw from (llama.cpp then draws a token the
# grammar forbids, and aborts).
END_OFF = -1e30


@dataclass(frozen=True)
class ToolCallConstraint:
    """Tool calls that always parse: each call section is `begin`, then JSON matching `schema`, then `end`.

    Forced (`lazy` False): the output is call sections from its first token, and nothing else. Lazy (`lazy` True,
    tool_choice "auto"): free text until the model writes `begin`; from there on only call sections, so a call
    once started always completes validly. With `repeat`, more sections may follow, each after one newline
    (parallel calls); the output ends after the last section. JSON inside is compact: no free whitespace.
    """

    schema: dict[str, Any]  # the JSON value of one section (one call, or an array of calls for some families)
    begin: str  # e.g. "<tool_call>\n" (Hermes, Qwen and the generic format), "[TOOL_CALLS]" (Mistral)
    end: str = ""  # e.g. "\n</tool_call>"
    lazy: bool = False
    repeat: bool = False


@dataclass
class SamplingParams:
    """Engine-level generation options, already validated by the gateway."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; N: the chosen token plus N alternatives
    json_schema: dict[str, Any] | None = None  # constrain the output to JSON matching this schema
    tool_calls: ToolCallConstraint | None = None  # constrain tool calls (never together with json_schema)
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of one generated sequence: new text, how many tokens it covers, and the finish."""

    text: str = ""
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    stop_sequence: str | None = None  # on the last delta: the stop sequence that ended the output, if one did
    cached_tokens: int = 0  # on a sequence's first delta: prompt tokens served from the engine's KV cache


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class Scores:
    """A reranker's answer: each document's relevance to the query, in the documents' order, as a probability
    (the sigmoid of a one-label cross-encoder's logit, as vLLM and sentence-transformers report it)."""

    scores: list[float]
    prompt_tokens: int


@dataclass
class EngineInfo:
    engine: str
    model: str
    device: str
    state: str  # "loading" | "ready" | "failed" | "closed"; a managed model also "unloaded", "stalled"
    context_length: int
    embedding_dimensions: int | None
    memory_bytes: int
    running: int = 0
    waiting: int = 0
    error: str | None = None
    busy_s: float = 0.0  # how long the engine's current step has run (0 between steps, or where not known)


@runtime_checkable
class Engine(Protocol):
    """One loaded model in this process. All methods are safe to call from the event loop."""

    name: str

    async def load(self) -> None: ...

    async def close(self) -> None: ...

    def info(self) -> EngineInfo: ...

    def context_length(self) -> int:
        """Tokens a request may use (prompt and completion): what every request's budget reads, so cheap."""
        ...

    async def chat_template(self) -> str | None:
        """The model's own chat template (Jinja source), or None: the gateway reads its tool-call format from it."""
        ...

    async def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        template_args: dict[str, Any] | None = None, add_generation_prompt: bool = True,
    ) -> Prompt:  # fmt: skip
        """Apply the model's chat template and tokenize. `messages` are OpenAI-shaped dicts (assistant messages may
        hold `tool_calls` with `function.arguments` as a dict, `tool` messages a `tool_call_id`); `tools` (OpenAI's
        list) goes to templates that take it; `template_args` are extra template variables (`enable_thinking`);
        without `add_generation_prompt` the prompt ends with the last message (for counting, not generating)."""
        ...

    async def encode_prompt(self, prompt: str | list[int], add_special: bool = True) -> Prompt:
        """Tokenize a raw completion prompt (or accept token ids as they are); with `add_special`, the special
        tokens the tokenizer adds (BOS), and at least one token for generation to start from."""
        ...

    async def decode(self, sequences: list[list[int]]) -> list[str]:
        """Each sequence's text, special tokens written out (/detokenize; one token's text, its piece). A 400
        naming `tokens` for an id outside the vocabulary."""
        ...

    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Stream one sequence. Closing the iterator early cancels the work in the engine."""
        ...

    async def embed(self, inputs: list[str] | list[list[int]]) -> Embeddings: ...

    async def rerank(self, query: str, documents: list[str]) -> Scores:
        """Score each (query, document) pair with a reranker (a model loaded with `options.task: rerank`); a 400
        naming `model` from a model of another kind, and `documents` for a pair longer than its window."""
        ...

    async def offload(self) -> bool:
        """Move the loaded weights from the accelerator to host RAM, keeping them for a fast `restore`: True once
        done, False where this engine or device cannot (then the model is unloaded instead)."""
        ...

    async def restore(self) -> None:
        """Move offloaded weights back onto the accelerator."""
        ...

    def prompt_work(self) -> int:
        """Blocking work on the model (rendering, tokenizing) still running on threads, also for requests already
        cancelled: while there is any, the model must not be freed."""
        ...
