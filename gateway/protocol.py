"""The OpenAI wire format, modelled once: requests, responses and stream chunks for every endpoint.

Requests forbid unknown fields (OpenAI answers 400 for them too); fields we know but do not
implement are listed in UNSUPPORTED_* and rejected with a 400 naming the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.base import SamplingParams
from gateway.errors import invalid_param

# ---- shared ------------------------------------------------------------------------------------


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # of prompt_tokens, how many came from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def count(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class StreamOptions(Request):
    include_usage: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Probability = Annotated[float, Field(ge=0, le=1)]


# Seconds the whole request may take (as self-hosted servers accept it); the gateway caps it.
RequestTimeout = Annotated[float | None, Field(gt=0)]


class SamplingFields(Request):
    """The sampling fields chat and legacy completions share (plus vLLM/llama-server extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    timeout: RequestTimeout = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions that vLLM and llama-server accept as well.
    top_k: int | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check_stop(self):
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise invalid_param("stop", "At most 4 stop sequences are allowed.")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None, json_schema: dict | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop_list(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=logprobs,
            json_schema=json_schema,
            ignore_eos=self.ignore_eos,
        )


# ---- chat completions ---------------------------------------------------------------------------


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class JsonSchemaFormat(Request):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid_param("response_format.json_schema", "json_schema is required when type is 'json_schema'.")
        return self

    def schema_for_engine(self) -> dict | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            return self.json_schema.schema_
        return None


# Fields of OpenAI's chat API that this gateway does not implement (400 naming them, never silence).
UNSUPPORTED_CHAT_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio",
    "modalities", "prediction", "web_search_options", "reasoning_effort",
)  # fmt: skip


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked in _reject_unknown

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Accepted and ignored, as they only matter to OpenAI's own storage and billing.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _reject_unknown(self):
        _reject_extra_fields(self, UNSUPPORTED_CHAT_FIELDS)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true.")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- legacy completions -------------------------------------------------------------------------

UNSUPPORTED_COMPLETION_FIELDS = ("suffix",)

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")

    prompt: PromptInput
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _reject_unknown(self):
        _reject_extra_fields(self, UNSUPPORTED_COMPLETION_FIELDS)
        if self.echo:
            raise invalid_param("echo", "Echoing the prompt is not supported by this server.")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_param("best_of", "Only best_of equal to n is supported by this server.")
        if self.prompt == [] or any(p == [] for p in self.prompt if isinstance(p, list)):
            raise invalid_param("prompt", "The prompt must not be empty.")
        return self

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---- embeddings ---------------------------------------------------------------------------------


class EmbeddingRequest(Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    timeout: RequestTimeout = None

    @model_validator(mode="after")
    def _non_empty(self):
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items or any(len(item) == 0 for item in items if not isinstance(item, int)):
            raise invalid_param("input", "Input must be a non-empty string or a list of non-empty items.")
        return self

    def inputs(self) -> list[str] | list[list[int]]:
        data = self.input
        if isinstance(data, str):
            return [data]
        if all(isinstance(item, int) for item in data):
            return [list(data)]
        return list(data)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---- models -------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "local-llm-gateway"


class ModelState(BaseModel):
    """The answer to POST /v1/models/{id}/load and /unload (a gateway extension)."""

    id: str
    object: Literal["model.state"] = "model.state"
    state: Literal["unloaded", "loading", "ready", "unloading", "failed"]
    memory_bytes: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _reject_extra_fields(request: BaseModel, unsupported: tuple[str, ...]) -> None:
    for name in request.model_extra or {}:
        if name in unsupported:
            raise invalid_param(
                name, f"The parameter '{name}' is not supported by this server.", "unsupported_parameter"
            )
        raise invalid_param(name, f"Unrecognized request argument supplied: {name}")
