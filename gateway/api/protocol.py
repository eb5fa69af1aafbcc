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
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.base import SamplingParams
from gateway.core.request import LIMITS, Capped, ModelRequest, Request, at_most, check_chars, check_size, set_limits
from gateway.core.tool_calls import ToolChoice, ToolSpec
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

# What local engines read of a chat request: messages made of text (with function tool calls and their results),
# function tools, and the sampling fields. The rest of OpenAI's chat format below is for remote targets
# (`unsupported_locally`).
LOCAL_CONTENT_PARTS = ("text",)
MAX_TOOLS = 128  # OpenAI's limit on tools (and functions) in a request
MAX_METADATA = 16  # OpenAI's limit on metadata pairs
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function that takes no parameters
REMOTE_ONLY_MESSAGE_FIELDS = ("refusal", "audio")
REMOTE_ONLY_CHAT_FIELDS = ("audio", "modalities", "prediction", "verbosity", "web_search_options")
# reasoning_effort → the chat template's thinking switch (templates that think read `enable_thinking`).
THINKING = {"none": False, "minimal": True, "low": True, "medium": True, "high": True}


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
        unsupported = [name for name in REMOTE_ONLY_MESSAGE_FIELDS if getattr(self, name) is not None]
        unsupported += [f"tool_calls[{i}]" for i, call in enumerate(self.tool_calls or ()) if call.type != "function"]
        if isinstance(self.content, list):
            parts = enumerate(self.content)
            unsupported += [f"content[{i}]" for i, part in parts if part.type not in LOCAL_CONTENT_PARTS]
        return unsupported[0] if unsupported else None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: OpenAI's shape, text content, legacy function calls as tool calls."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        calls = [call.function for call in self.tool_calls or () if call.function is not None]
        ids = [call.id for call in self.tool_calls or ()]
        if self.function_call is not None:
            calls, ids = [self.function_call], [LEGACY_CALL_ID]
        if calls:
            message["tool_calls"] = [
                {"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for id, call in zip(ids, calls)
            ]
        if self.role in ("tool", "function"):
            message.update(role="tool", tool_call_id=self.tool_call_id or LEGACY_CALL_ID)
        if self.name is not None:
            message["name"] = self.name
        return message


LEGACY_CALL_ID = "call_function"  # the one call of a legacy `function_call`, which has no id of its own


class FunctionDefinition(Request):
    name: str = Field(..., pattern=FUNCTION_NAME)
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
    """Also the gateway's internal request: the Responses and Messages front ends translate theirs to it."""

    model_config = ConfigDict(extra="allow")  # unknown fields are checked in _reject_unknown
    endpoint: ClassVar[str] = "chat/completions"

    messages: Annotated[list[ChatMessage], Field(min_length=1), Capped("messages")]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], at_most(MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], at_most(MAX_TOOLS)] | None = None  # deprecated for tools
    function_call: Literal["none", "auto"] | ToolName | None = None  # deprecated for tool_choice
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # vLLM's: the prompt ends inside the last message, an assistant's, and the answer goes on from its text (no new
    # turn is opened: add_generation_prompt false). How a stream broken on one target is finished on another.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # For remote targets only (REMOTE_ONLY_CHAT_FIELDS).
    audio: AudioOutput | None = None
    modalities: Annotated[list[Literal["text", "audio"]], at_most(2)] | None = None
    prediction: Prediction | None = None
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

    @model_validator(mode="after")
    def _check_tools(self):
        """What OpenAI refuses too: a choice of a tool that is not offered, parameters that are not an object
        schema, a tool result that answers no earlier call."""
        for index, tool in enumerate(self.tools or ()):
            schema = tool.function.parameters if tool.function else None
            if schema is not None and schema.get("type", "object") != "object":
                raise invalid_param(f"tools[{index}].function.parameters", "A function's parameters must be a JSON "
                                    "schema of type 'object'.")  # fmt: skip
        for param, chosen, offered in (
            ("tool_choice", self._named_choice(), [t.function.name for t in self.tools or () if t.function]),
            ("function_call", getattr(self.function_call, "name", None), [f.name for f in self.functions or ()]),
        ):
            if chosen is not None and chosen not in offered:
                raise invalid_param(param, f"The function '{chosen}' is not among the tools of this request.")
        if self.tool_choice in ("auto", "required") and not self.tools:
            raise invalid_param("tool_choice", "tool_choice is only allowed when tools are specified.")
        calls = {LEGACY_CALL_ID}
        for index, message in enumerate(self.messages):
            calls.update(call.id for call in message.tool_calls or ())
            if message.role == "tool" and message.tool_call_id not in calls:
                raise invalid_param(f"messages[{index}].tool_call_id", "A 'tool' message must answer a tool "
                                    f"call of an earlier assistant message, and '{message.tool_call_id}' is "
                                    "not one.")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _continuable(self):
        """vLLM's rules: the message continued is the last, an assistant's text, and no new turn is opened."""
        if not self.continue_final_message:
            return self
        if self.add_generation_prompt:
            raise invalid_param("add_generation_prompt", "continue_final_message needs add_generation_prompt false: "
                                "the answer goes on inside the last message rather than in a new one.")  # fmt: skip
        last = self.messages[-1]
        if last.role != "assistant" or last.tool_calls or last.function_call:
            raise invalid_param("continue_final_message", "continue_final_message goes on from the last message, "
                                "which must be an assistant's text.")  # fmt: skip
        return self

    def _named_choice(self) -> str | None:
        choice = self.tool_choice
        return choice.function.name if isinstance(choice, NamedToolChoice) and choice.function else None

    def check_size(self) -> None:
        check_chars(sum(len(message.text()) for message in self.messages), "messages")

    def tool_specs(self) -> list[ToolSpec]:
        """The function tools offered (legacy `functions` too), in the core's terms."""
        functions = [tool.function for tool in self.tools or () if tool.function] or self.functions or []
        return [ToolSpec(f.name, f.description, f.parameters or EMPTY_PARAMETERS, bool(f.strict)) for f in functions]

    def tool_mode(self) -> ToolChoice:
        """OpenAI's defaults: "auto" when tools are offered, else "none"; a named choice forces that function."""
        choice = self.tool_choice if self.tools else self.function_call
        if isinstance(choice, (NamedToolChoice, ToolName)):
            return ToolChoice("required", self._named_choice() or choice.name)
        if choice is None:
            return ToolChoice("auto" if self.tools or self.functions else "none")
        return ToolChoice(choice)

    def legacy_functions(self) -> bool:
        """Whether the client speaks the deprecated `functions` dialect (answered with `function_call`)."""
        return bool(self.functions) and not self.tools

    def unsupported_locally(self) -> str | None:
        for name in REMOTE_ONLY_CHAT_FIELDS:
            if getattr(self, name) is not None:
                return name
        for index, tool in enumerate(self.tools or ()):
            if tool.type != "function":
                return f"tools[{index}]"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.type != "function":
            return "tool_choice"
        for index, message in enumerate(self.messages):
            if (part := message.unsupported_locally()) is not None:
                return f"messages[{index}].{part}"
        return None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def most_completion_tokens(self, default_completion: int) -> int:
        return (self.requested_max_tokens() or default_completion) * self.n


def _absent_if_none(default: Any = None) -> Any:
    """A reply field left out of the JSON while None: OpenAI's replies omit tool calls and reasoning they lack."""
    return Field(default, exclude_if=lambda value: value is None)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = _absent_if_none()  # the thinking of a reasoning model (vLLM's field)
    tool_calls: list[ToolCallOut] | None = _absent_if_none()
    function_call: FunctionCallOut | None = _absent_if_none()  # the legacy `functions` dialect


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
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"] | None
    stop_reason: str | None = _absent_if_none()  # vLLM's field: the stop sequence that ended the answer


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionDelta(BaseModel):
    name: str | None = _absent_if_none()
    arguments: str | None = _absent_if_none()


class ToolCallDelta(BaseModel):
    """A piece of a streamed call: id, type and name in its first chunk, then fragments of the arguments."""

    index: int
    id: str | None = _absent_if_none()
    type: Literal["function"] | None = _absent_if_none()
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = _absent_if_none()
    tool_calls: list[ToolCallDelta] | None = _absent_if_none()
    function_call: FunctionDelta | None = _absent_if_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"] | None = None
    stop_reason: str | None = _absent_if_none()  # vLLM's field, on the finish chunk: the stop sequence that ended it


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
    endpoint: ClassVar[str] = "completions"

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
        return _items(self.prompt)


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
    endpoint: ClassVar[str] = "embeddings"
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
        return _items(self.input)


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
    # A gateway extension: what its first local model is; left out for a name served by providers only.
    kind: Literal["chat", "embedding", "rerank"] | None = _absent_if_none()


class ModelState(BaseModel):
    """The answer to POST /v1/models/{id}/load and /unload (a gateway extension)."""

    id: str
    object: Literal["model.state"] = "model.state"
    state: Literal["unloaded", "loading", "ready", "unloading", "failed", "offloading", "offloaded", "restoring"]
    # Where the weights are: on the GPU (or the CPU, for a model run there), in the warm pool in host RAM, or nowhere.
    location: Literal["gpu", "cpu", "cpu_warm", "unloaded"]
    memory_bytes: int  # what the weights (and caches) take where they are


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_LIMITED_MODELS = (ChatMessage, Prediction, SamplingFields, ChatCompletionRequest, CompletionRequest, EmbeddingRequest)


def _items(value: str | list) -> list:
    """A prompt or input field as a list of items: a text or one list of token ids is one item."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(item, int) for item in value):
        return [list(value)]
    return list(value)


def _reject_extra_fields(request: BaseModel) -> None:
    """OpenAI's answer to a field it does not know (pydantic's own says less)."""
    for name in request.model_extra or {}:
        raise invalid_param(name, f"Unrecognized request argument supplied: {name}")



def apply_limits(settings: Settings, more: tuple[type[BaseModel], ...] = ()) -> None:
    """Validate every request against the limits `settings` name, from now on (called once, at start-up): OpenAI's
    request models and `more`, the other front ends' (after these, as some build on the chat request)."""
    set_limits(settings)
    for model in (*_LIMITED_MODELS, *more):  # inner models first: the outer ones build on their schemas
        model.model_rebuild(force=True)
