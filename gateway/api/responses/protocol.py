"""OpenAI's Responses API wire format (POST /v1/responses and the stored-response routes), modelled once: the
request and its items, the response, every stream event, and the stored-response answers.

Input and output items are the same models: a response's output goes back as the next request's input, as OpenAI's
clients send it (and as `previous_response_id` replays it). Requests forbid unknown fields (a 400 naming them), and
what the gateway cannot carry is refused the same way, naming the field: items and tools of other types (OpenAI's
built-in tools), `truncation: "auto"`, `background`. Every list is bounded (`Capped` by the LLM_MAX_* limits,
`at_most` by OpenAI's own); the text of the input is counted against LLM_MAX_PROMPT_CHARS.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from gateway.api.protocol import FUNCTION_NAME, MAX_METADATA, MAX_TOOLS, Probability, Temperature
from gateway.core.request import Capped, ModelRequest, Request, at_most, check_chars
from gateway.errors import invalid_param

MAX_ID = 200  # characters of an id a client sends back (a response's, a call's, an item's)
MAX_INCLUDE = 8
Status = Literal["in_progress", "completed", "incomplete"]
Effort = Literal["none", "minimal", "low", "medium", "high"]  # what the internal request's reasoning_effort takes
Summary = Literal["auto", "concise", "detailed"]
Id = Annotated[str, Field(max_length=MAX_ID)]


def new_id(prefix: str) -> str:
    """An id in OpenAI's form: resp_…, msg_…, fc_…, rs_…."""
    return f"{prefix}_{os.urandom(16).hex()}"


def _absent_if_none(default: Any = None) -> Any:
    """A field left out of the JSON while None, as OpenAI leaves out what an item lacks."""
    return Field(default, exclude_if=lambda value: value is None)


def by_type(*models: type[BaseModel], default: str | None = None) -> Any:
    """A union told apart by `type` (`default` where it is absent), refusing other types with a 400 that lists
    the accepted ones. (Tags are in brackets, which error messages leave out of the parameter they name.)"""
    tags = {kind: f"[{model.__name__}]" for model in models for kind in get_args(model.model_fields["type"].annotation)}

    def tag(value: Any) -> str | None:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind)

    known = ", ".join(repr(kind) for kind in tags)
    members = tuple(Annotated[model, Tag(f"[{model.__name__}]")] for model in models)
    return Annotated[Union[members], Discriminator(tag, custom_error_type="unsupported_type",
                                                   custom_error_message=f"'type' must be one of {known}.")]  # fmt: skip


def text_or(items: Any) -> Any:
    """A string, or a list (of items, or of content parts): a bad list is told of as a list, not as a bad string."""
    return Annotated[Annotated[str, Tag("str")] | Annotated[items, Tag("list[]")],
                     Discriminator(lambda value: "str" if isinstance(value, str) else "list[]")]  # fmt: skip


# ---- items: a request's input, a response's output ----------------------------------------------


class InputText(Request):
    type: Literal["input_text"]
    text: str


class OutputText(Request):
    type: Literal["output_text"]
    text: str
    annotations: Annotated[list[dict[str, Any]], Capped("messages")] = Field(default_factory=list)
    logprobs: Annotated[list[dict[str, Any]], Capped("input_tokens")] = Field(default_factory=list)


class Refusal(Request):
    type: Literal["refusal"]
    refusal: str


class InputImage(Request):
    """An image: for remote providers (a local model reads text only)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: Id | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputFile(Request):
    """A file: for remote providers."""

    type: Literal["input_file"]
    file_data: str | None = None
    file_id: Id | None = None
    file_url: str | None = None
    filename: str | None = Field(None, max_length=MAX_ID)


class ReasoningText(Request):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(Request):
    type: Literal["summary_text"]
    text: str


ContentPart = by_type(InputText, OutputText, Refusal, InputImage, InputFile)


class Message(Request):
    """A message of the conversation: the client's (or an instruction), or an answer of the model's."""

    type: Literal["message"] = "message"  # clients may leave it out
    role: Literal["user", "assistant", "system", "developer"]
    content: text_or(Annotated[list[ContentPart], Capped("messages")])
    id: Id | None = _absent_if_none()
    status: Status | None = _absent_if_none()
    phase: Literal["commentary", "final_answer"] | None = _absent_if_none()

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(getattr(part, "text", None) or getattr(part, "refusal", "") for part in self.content)


class FunctionCall(Request):
    """A call of one of the request's function tools, as the model made it."""

    type: Literal["function_call"]
    call_id: Id
    name: str = Field(max_length=MAX_ID)
    arguments: str  # JSON text, as the model wrote it
    id: Id | None = _absent_if_none()
    status: Status | None = _absent_if_none()

    def text(self) -> str:
        return self.arguments


class FunctionCallOutput(Request):
    """What a call gave, sent by the client."""

    type: Literal["function_call_output"]
    call_id: Id
    output: text_or(Annotated[list[by_type(InputText, InputImage, InputFile)], Capped("messages")])
    id: Id | None = _absent_if_none()
    status: Status | None = _absent_if_none()

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(getattr(part, "text", "") for part in self.output)


class Reasoning(Request):
    """The model's thinking: its text in `content` (a local model's own words; there is no separate summary)."""

    type: Literal["reasoning"]
    id: Id | None = None
    summary: Annotated[list[SummaryText], Capped("messages")] = Field(default_factory=list)
    content: Annotated[list[ReasoningText], Capped("messages")] | None = _absent_if_none()
    encrypted_content: str | None = _absent_if_none()
    status: Status | None = _absent_if_none()

    def text(self) -> str:
        return "".join(part.text for part in self.content or ())


InputItem = by_type(Message, FunctionCall, FunctionCallOutput, Reasoning, default="message")
OutputItem = by_type(Message, FunctionCall, Reasoning)


# ---- the request ---------------------------------------------------------------------------------


class FunctionTool(Request):
    type: Literal["function"]  # OpenAI's built-in tools (web_search, file_search, ...) run on OpenAI only
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class FunctionChoice(Request):
    type: Literal["function"]
    name: str = Field(max_length=MAX_ID)


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


class TextFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=FUNCTION_NAME, exclude_if=lambda value: value is None)
    schema_: dict[str, Any] | None = Field(None, alias="schema", exclude_if=lambda value: value is None)
    description: str | None = _absent_if_none()
    strict: bool | None = _absent_if_none()

    @model_validator(mode="after")
    def _schema_named(self):
        for field in ("name", "schema_"):
            if self.type == "json_schema" and getattr(self, field) is None:
                raise invalid_param(f"text.format.{field.rstrip('_')}", "A json_schema format needs a name and a "
                                    "schema.")  # fmt: skip
        return self


class TextConfig(Request):
    format: TextFormat = TextFormat(type="text")
    verbosity: Literal["low", "medium", "high"] | None = _absent_if_none()  # remote providers only


class ReasoningConfig(Request):
    effort: Effort | None = None
    summary: Summary | None = None  # a local model's reasoning comes as its text: there is no summary to ask for
    generate_summary: Summary | None = _absent_if_none()


class StreamOptions(Request):
    include_obfuscation: bool | None = None  # padding against length side channels; local streams need none


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     at_most(MAX_METADATA)]  # fmt: skip


class ResponsesRequest(ModelRequest):
    endpoint: ClassVar[str] = "responses"

    input: text_or(Annotated[list[InputItem], Capped("messages")])
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], at_most(MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: Probability | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Metadata | None = None
    store: bool | None = None  # true unless false, as OpenAI
    previous_response_id: Id | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_ID)
    truncation: Literal["disabled"] | None = None  # "auto" would drop earlier turns; a prompt too long gets a 400
    include: Annotated[list[Literal["reasoning.encrypted_content"]], at_most(MAX_INCLUDE)] | None = None
    background: Literal[False] | None = None
    # Passed on: they matter to a provider's caching, abuse checks and billing only.
    service_tier: str | None = Field(None, max_length=MAX_ID)
    prompt_cache_key: str | None = Field(None, max_length=MAX_ID)
    safety_identifier: str | None = Field(None, max_length=MAX_ID)

    def items(self) -> list[Any]:
        """The input as a list of items: a string is one user message."""
        return [Message(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def check_size(self) -> None:
        chars = len(self.instructions or "") + sum(len(item.text()) for item in self.items())
        check_chars(chars, "input")

    def stores(self) -> bool:
        return self.store is not False


# ---- the response --------------------------------------------------------------------------------


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # of input_tokens, how many came from the engine's prefix cache
    cache_write_tokens: int = 0  # a provider's prompt-cache writes; a local engine's prefix cache costs nothing more


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    """A response, with the request's settings as it was served (OpenAI echoes them)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    completed_at: int | None = None
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ReasoningConfig
    store: bool
    temperature: float
    text: TextConfig
    tool_choice: ToolChoice
    tools: list[FunctionTool]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]

    @classmethod
    def begun(cls, request: ResponsesRequest, created_at: int) -> ResponseObject:
        """The response to `request`, in progress, with nothing written yet."""
        return cls(
            id=new_id("resp"), created_at=created_at, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, model=request.model,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id, reasoning=request.reasoning or ReasoningConfig(),
            store=request.stores(), temperature=1.0 if request.temperature is None else request.temperature,
            text=request.text or TextConfig(), tool_choice=request.tool_choice or "auto", tools=request.tools or [],
            top_p=1.0 if request.top_p is None else request.top_p, user=request.user, metadata=request.metadata or {},
        )  # fmt: skip

    def serialized(self) -> str:
        return self.model_dump_json(by_alias=True)


# ---- stream events (each with its place in the stream, `sequence_number`) -------------------------


class ResponseEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]  # fmt: skip
    sequence_number: int = 0
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int = 0
    output_index: int
    item: OutputItem


class ItemEvent(BaseModel):
    """An event of one output item's (`item_id`, at `output_index`)."""

    sequence_number: int = 0
    item_id: str
    output_index: int


class ContentEvent(ItemEvent):
    """An event of the item's content part at `content_index` (the only one: items here hold one part)."""

    content_index: int = 0


class ContentPartEvent(ContentEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    part: OutputText | ReasoningText


class TextDeltaEvent(ContentEvent):
    type: Literal["response.output_text.delta", "response.reasoning_text.delta"]
    delta: str
    logprobs: list[dict[str, Any]] | None = _absent_if_none()  # output text has them (empty), reasoning not


class TextDoneEvent(ContentEvent):
    type: Literal["response.output_text.done", "response.reasoning_text.done"]
    text: str
    logprobs: list[dict[str, Any]] | None = _absent_if_none()


class ArgumentsDeltaEvent(ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class ArgumentsDoneEvent(ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    """A failure after the stream began, where no response can tell it (a provider's relayed stream)."""

    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (ResponseEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
               | ArgumentsDeltaEvent | ArgumentsDoneEvent)  # fmt: skip


# ---- stored responses ----------------------------------------------------------------------------


class InputItemsQuery(Request):
    """GET /v1/responses/{id}/input_items: a page of the items the response was made from."""

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: Id | None = None


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InputItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# The models with LLM_MAX_* limits in their schemas, inner ones first: `apply_limits` rebuilds them.
LIMITED_MODELS = (OutputText, Message, FunctionCallOutput, Reasoning, ResponsesRequest)
