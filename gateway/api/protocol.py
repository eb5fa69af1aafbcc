"""The OpenAI wire format, modelled once: requests, responses and stream chunks for every endpoint.

Requests forbid unknown fields (OpenAI answers 400 for them too, naming the parameter). Everything
OpenAI defines is accepted, including what only remote providers can do (tools, images, audio, ...):
it is validated here and forwarded unchanged to remote targets, while a local target answers what
`unsupported_locally()` names with 400 `unsupported_parameter` and the chain moves on. What local
engines read is listed in LOCAL_*. Replies of remote targets are relayed as the provider sent them.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.base import SamplingParams
from gateway.core.request import LIMITS, Capped, ModelRequest, Request, at_most, check_chars, check_size, set_limits
from gateway.errors import invalid_param
from gateway.settings import Settings


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
    include_obfuscation: bool | None = None  # padding against length side channels; local streams need none


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(16).hex()}"


def now() -> int:
    return int(time.time())


Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Probability = Annotated[float, Field(ge=0, le=1)]
TokenId = Annotated[int, Field(ge=0)]


class SamplingFields(ModelRequest):
    """The sampling fields chat and legacy completions share (plus vLLM/llama-server extensions)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1), Capped("choices", "le")] = 1
    stop: str | Annotated[list[str], at_most(4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Token ids (JSON keys are strings) to biases; checked here, as a remote provider would check them.
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-100, le=100)]], Capped("logit_bias")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions that vLLM and llama-server accept as well.
    top_k: int | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check_stop(self):
        if self.stop is not None and any(len(stop) > LIMITS.stop_chars for stop in self.stop_list()):
            raise invalid_param("stop", f"A stop sequence may be at most {LIMITS.stop_chars} characters long.")
        return self

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

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
            logit_bias=dict(self.logit_bias or {}),
            logprobs=logprobs,
            json_schema=json_schema,
            ignore_eos=self.ignore_eos,
        )


# ---- chat completions ---------------------------------------------------------------------------

# What local engines read of a chat request: messages of these roles made of text, and the sampling
# fields. The rest of OpenAI's chat format below is for remote targets (`unsupported_locally`).
LOCAL_ROLES = ("system", "developer", "user", "assistant")
LOCAL_CONTENT_PARTS = ("text",)
MAX_TOOLS = 128  # OpenAI's limit on tools (and functions) in a request
MAX_METADATA = 16  # OpenAI's limit on metadata pairs
REMOTE_ONLY_MESSAGE_FIELDS = ("tool_calls", "function_call", "refusal", "audio")
REMOTE_ONLY_CHAT_FIELDS = (
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "audio", "modalities",
    "prediction", "reasoning_effort", "verbosity", "web_search_options",
)  # fmt: skip


class Tagged(Request):
    """OpenAI's tagged objects: `type` names the field that carries the content ({"type": "text", "text": ...})."""

    @model_validator(mode="after")
    def _tagged_field_present(self):
        if getattr(self, self.type, None) is None:
            raise ValueError(f"'{self.type}' is required when type is '{self.type}'.")
        return self


class ImageUrl(Request):
    url: str  # https or a data: URL
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(Request):
    data: str  # base64
    format: Literal["wav", "mp3"]


class FileInput(Request):
    file_data: str | None = None  # base64
    file_id: str | None = None
    filename: str | None = None


class ContentPart(Tagged):
    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None
    image_url: ImageUrl | None = None
    input_audio: InputAudio | None = None
    file: FileInput | None = None
    refusal: str | None = None


class FunctionCall(Request):
    name: str
    arguments: str  # JSON text, as the model wrote it


class CustomCall(Request):
    name: str
    input: str


class ToolCall(Tagged):
    """A call an assistant message made, sent back with the conversation."""

    id: str
    type: Literal["function", "custom"]
    function: FunctionCall | None = None
    custom: CustomCall | None = None


class AssistantAudio(Request):
    id: str  # a previous audio reply, by reference


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Capped("messages")] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Capped("messages")] | None = None
    function_call: FunctionCall | None = None  # deprecated for tool_calls
    refusal: str | None = None
    audio: AssistantAudio | None = None
    tool_call_id: str | None = None  # a tool message answers this call

    @model_validator(mode="after")
    def _tool_answers_a_call(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("A message with role 'tool' needs the tool_call_id it answers.")
        return self

    def unsupported_locally(self) -> str | None:
        """The first part of this message that a local engine cannot read, as a path inside it."""
        if self.role not in LOCAL_ROLES:
            return "role"
        unsupported = [name for name in REMOTE_ONLY_MESSAGE_FIELDS if getattr(self, name) is not None]
        if isinstance(self.content, list):
            parts = enumerate(self.content)
            unsupported += [f"content[{i}]" for i, part in parts if part.type not in LOCAL_CONTENT_PARTS]
        return unsupported[0] if unsupported else None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class FunctionDefinition(Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class CustomToolDefinition(Request):
    name: str
    description: str | None = None
    format: dict[str, Any] | None = None  # free text, or a grammar


class Tool(Tagged):
    type: Literal["function", "custom"]
    function: FunctionDefinition | None = None
    custom: CustomToolDefinition | None = None


class ToolName(Request):
    name: str


class AllowedTools(Request):
    mode: Literal["auto", "required"]
    tools: Annotated[list[dict[str, Any]], at_most(MAX_TOOLS)]


class NamedToolChoice(Tagged):
    type: Literal["function", "custom", "allowed_tools"]
    function: ToolName | None = None
    custom: ToolName | None = None
    allowed_tools: AllowedTools | None = None


class AudioOutput(Request):
    voice: str | Annotated[dict[str, str], at_most(MAX_METADATA)]
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class Prediction(Tagged):
    type: Literal["content"]
    content: str | Annotated[list[ContentPart], Capped("messages")]


class WebSearchOptions(Request):
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: dict[str, Any] | None = None


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


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked in _reject_unknown

    messages: Annotated[list[ChatMessage], Field(min_length=1), Capped("messages")]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # For remote targets only (REMOTE_ONLY_CHAT_FIELDS).
    tools: Annotated[list[Tool], at_most(MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], at_most(MAX_TOOLS)] | None = None  # deprecated for tools
    function_call: Literal["none", "auto"] | ToolName | None = None  # deprecated for tool_choice
    audio: AudioOutput | None = None
    modalities: Annotated[list[Literal["text", "audio"]], at_most(2)] | None = None
    prediction: Prediction | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: WebSearchOptions | None = None
    # Accepted and ignored locally, as they only matter to a provider's own storage, caching and billing.
    store: bool | None = None
    metadata: Annotated[dict[str, str], at_most(MAX_METADATA)] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _reject_unknown(self):
        _reject_extra_fields(self)
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_param("top_logprobs", "top_logprobs requires logprobs to be true.")
        return self

    def check_size(self) -> None:
        check_chars(sum(len(message.text()) for message in self.messages), "messages")

    def unsupported_locally(self) -> str | None:
        for name in REMOTE_ONLY_CHAT_FIELDS:
            if getattr(self, name) is not None:
                return name
        for index, message in enumerate(self.messages):
            if (part := message.unsupported_locally()) is not None:
                return f"messages[{index}].{part}"
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def most_completion_tokens(self, default_completion: int) -> int:
        return (self.requested_max_tokens() or default_completion) * self.n


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

# As many prompts as sequences may be generated; token ids up to the limit on them.
TokenIds = Annotated[list[int], Capped("input_tokens")]
PromptInput = str | Annotated[list[str], Capped("choices")] | TokenIds | Annotated[list[TokenIds], Capped("choices")]


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")

    prompt: PromptInput
    logprobs: int | None = Field(None, ge=0, le=5)
    # For remote targets only: local engines neither insert, echo the prompt nor rank extra candidates.
    suffix: str | None = None
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _reject_unknown(self):
        _reject_extra_fields(self)
        # Only a list is scanned: walking a string prompt character by character would hold the event loop.
        if self.prompt == [] or (isinstance(self.prompt, list) and any(p == [] for p in self.prompt)):
            raise invalid_param("prompt", "The prompt must not be empty.")
        sequences = len(self.prompts()) * self.n
        if sequences > LIMITS.choices:
            raise invalid_param("n", f"{sequences // self.n} prompts times n={self.n} ask for {sequences} sequences; "
                                f"at most {LIMITS.choices} are allowed.")  # fmt: skip
        return self

    def check_size(self) -> None:
        check_size(self.prompts(), "prompt")

    def most_completion_tokens(self, default_completion: int) -> int:
        return (self.max_tokens or default_completion) * self.n * len(self.prompts())

    def unsupported_locally(self) -> str | None:
        if self.suffix is not None:
            return "suffix"
        if self.echo:
            return "echo"
        return "best_of" if self.best_of not in (None, self.n) else None

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


class EmbeddingRequest(ModelRequest):
    input: (
        str
        | Annotated[list[str], Capped("embedding_inputs")]
        | TokenIds
        | Annotated[list[TokenIds], Capped("embedding_inputs")]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @model_validator(mode="after")
    def _non_empty(self):
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items or any(len(item) == 0 for item in items if not isinstance(item, int)):
            raise invalid_param("input", "Input must be a non-empty string or a list of non-empty items.")
        return self

    def check_size(self) -> None:
        check_size(self.inputs(), "input")

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


_LIMITED_MODELS = (ChatMessage, Prediction, SamplingFields, ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


def _reject_extra_fields(request: BaseModel) -> None:
    """OpenAI's answer to a field it does not know (pydantic's own says less)."""
    for name in request.model_extra or {}:
        raise invalid_param(name, f"Unrecognized request argument supplied: {name}")



def apply_limits(settings: Settings) -> None:
    """Validate every request against the limits `settings` name, from now on (called once, at start-up)."""
    set_limits(settings)
    for model in _LIMITED_MODELS:  # inner models first: the outer ones build on their schemas
        model.model_rebuild(force=True)
