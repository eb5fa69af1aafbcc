"""Anthropic's Messages API wire format (POST /v1/messages, /v1/messages/count_tokens), modelled once: requests and
their content blocks, the reply, the stream's events and the token count.

Requests forbid unknown fields (a 400 naming them, in Anthropic's error shape on these routes). Every string and list
a client sends is bounded (`Capped` by the LLM_MAX_* limits, `at_most` by Anthropic's own). Replies and events are
modelled as Anthropic sends them; reading a provider's, blocks and events of other types are kept as they are.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from gateway.api.protocol import FUNCTION_NAME, MAX_TOOLS, Probability
from gateway.core.request import LIMITS, Capped, ModelRequest, Request, at_most, check_chars
from gateway.errors import invalid_param

MAX_STOP_SEQUENCES = 4  # what the internal (chat) request carries
MAX_USER_ID = 256  # Anthropic's limit on metadata.user_id
MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens
# Thinking budgets and chat's reasoning_effort levels, both ways: a budget is the highest level it reaches.
EFFORT_BUDGETS = {"low": MIN_THINKING_BUDGET, "medium": 4096, "high": 16384}
# Blocks of Anthropic's server tools (search, code execution, containers): only Anthropic runs them.
SERVER_BLOCKS = (
    "search_result", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
    "code_execution_tool_result", "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
    "tool_search_tool_result", "container_upload", "mcp_tool_use", "mcp_tool_result",
)  # fmt: skip


def new_message_id() -> str:
    return f"msg_{os.urandom(12).hex()}"


def _absent_if_none(default: Any = None) -> Any:
    """A reply field left out of the JSON while None, as Anthropic leaves it out."""
    return Field(default, exclude_if=lambda value: value is None)


def _type_of(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def by_type(*models: type[BaseModel], other: type[BaseModel] | None = None) -> Any:
    """A union of blocks (or events) told apart by their `type`; one of another type is `other`'s, else refused.
    (The tags are in brackets, which error messages leave out of the parameter they name.)"""
    tags = {kind: f"[{model.__name__}]" for model in models for kind in get_args(model.model_fields["type"].annotation)}
    members = [Annotated[model, Tag(f"[{model.__name__}]")] for model in (*models, *([other] if other else []))]

    def tag(value: Any) -> str | None:
        return tags.get(_type_of(value), f"[{other.__name__}]" if other else None)

    known = ", ".join(repr(kind) for kind in tags)
    return Annotated[Union[tuple(members)], Discriminator(tag, custom_error_type="invalid_type",
                                                          custom_error_message=f"'type' must be one of {known}.")]


def text_or(blocks: Any) -> Any:
    """A string, or a list of blocks (the content of a message, a system prompt, a tool result)."""
    return Annotated[Annotated[str, Tag("str")] | Annotated[blocks, Tag("list[]")],
                     Discriminator(lambda value: "str" if isinstance(value, str) else "list[]")]


# ---- request content blocks ----------------------------------------------------------------------


class CacheControl(Request):
    """A provider's prompt-caching hint; local engines cache prompt prefixes by themselves."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class Block(Request):
    cache_control: CacheControl | None = None


class TextBlock(Block):
    type: Literal["text"]
    text: str
    # Where an earlier answer's text came from: kept by the client, of no use to a model reading it again.
    citations: Annotated[list[dict[str, Any]], Capped("messages")] | None = None


class Base64Source(Request):
    type: Literal["base64"]
    media_type: str = Field(max_length=100)
    data: str


class UrlSource(Request):
    type: Literal["url"]
    url: str


class FileSource(Request):
    type: Literal["file"]
    file_id: str = Field(max_length=200)


class PlainTextSource(Request):
    type: Literal["text"]
    media_type: Literal["text/plain"]
    data: str


class ImageBlock(Block):
    type: Literal["image"]
    source: by_type(Base64Source, UrlSource, FileSource)


class ContentSource(Request):
    """A document made of blocks."""

    type: Literal["content"]
    content: text_or(Annotated[list[by_type(TextBlock, ImageBlock)], Capped("messages")])


class CitationsConfig(Request):
    enabled: bool = False


class DocumentBlock(Block):
    type: Literal["document"]
    source: by_type(Base64Source, PlainTextSource, ContentSource, UrlSource, FileSource)
    title: str | None = Field(None, max_length=500)
    context: str | None = None
    citations: CitationsConfig | None = None


class ToolUseBlock(Block):
    """A call an assistant turn made, sent back with the conversation."""

    type: Literal["tool_use"]
    id: str = Field(max_length=200)
    name: str = Field(max_length=200)
    input: dict[str, Any]




class ToolResultBlock(Block):
    """What a tool call gave, in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=200)
    content: text_or(Annotated[list[by_type(TextBlock, ImageBlock, DocumentBlock)], Capped("messages")]) | None = None
    is_error: bool = False


class ThinkingBlock(Request):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(Request):
    type: Literal["redacted_thinking"]
    data: str


class ServerBlock(Request):
    """A block of Anthropic's own server tools, which no other server can read: not modelled further."""

    model_config = ConfigDict(extra="allow")
    type: Literal[SERVER_BLOCKS]


ContentBlock = by_type(TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
                       RedactedThinkingBlock, ServerBlock)


class InputMessage(Request):
    role: Literal["user", "assistant"]
    content: text_or(Annotated[list[ContentBlock], Capped("messages")])

    def blocks(self) -> list:
        """The content as blocks (a string is one text block)."""
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content

    def text_chars(self) -> int:
        if isinstance(self.content, str):
            return len(self.content)
        return sum(len(getattr(block, "text", None) or "") for block in self.content)


# ---- tools, choices, thinking --------------------------------------------------------------------


class CustomTool(Request):
    """A tool the client runs: the model calls it with an input that follows `input_schema`."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None
    strict: bool | None = None


class ServerTool(Request):
    """A tool Anthropic runs itself (web search, code execution, ...), named by a versioned `type`."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=100)
    name: str = Field(max_length=200)


# A tool without a `type`, or of type "custom", is the client's; any other type names one of Anthropic's.
AnyTool = Annotated[Annotated[CustomTool, Tag("[custom]")] | Annotated[ServerTool, Tag("[server]")],
                    Discriminator(lambda value: "[custom]" if _type_of(value) in (None, "custom") else "[server]")]


class ToolChoiceAuto(Request):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Request):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Request):
    type: Literal["tool"]
    name: str = Field(max_length=200)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Request):
    type: Literal["none"]


ToolChoice = by_type(ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone)


class ThinkingEnabled(Request):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=MIN_THINKING_BUDGET)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(Request):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(Request):
    type: Literal["disabled"]


Thinking = by_type(ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled)


class JsonOutputFormat(Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Request):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonOutputFormat | None = None


class Metadata(Request):
    user_id: str | None = Field(None, max_length=MAX_USER_ID)


class Diagnostics(Request):
    previous_message_id: str | None = Field(None, max_length=200)


# ---- requests ------------------------------------------------------------------------------------


class Conversation(ModelRequest):
    """What a Messages request and a token count share: the conversation, its tools and how the model thinks."""

    messages: Annotated[list[InputMessage], Field(min_length=1), Capped("messages")]
    system: text_or(Annotated[list[TextBlock], Capped("messages")]) | None = None
    tools: Annotated[list[AnyTool], at_most(MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # Hints about a provider's caching, speed and accounts, accepted and of no effect on a local answer.
    cache_control: CacheControl | None = None
    speed: Literal["standard", "fast"] | None = None
    user_profile_id: str | None = Field(None, max_length=200)
    workspace_id: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _check_tools(self):
        """What Anthropic refuses too: an input schema that is not an object's, a choice of a tool not offered."""
        for index, tool in enumerate(self.tools or ()):
            if isinstance(tool, CustomTool) and tool.input_schema.get("type") != "object":
                raise invalid_param(f"tools[{index}].input_schema", "A tool's input_schema must be a JSON schema of "
                                    "type 'object'.")  # fmt: skip
        chosen = self.tool_choice.name if isinstance(self.tool_choice, ToolChoiceTool) else None
        if chosen is not None and chosen not in [tool.name for tool in self.tools or ()]:
            raise invalid_param("tool_choice.name", f"The tool '{chosen}' is not among the tools of this request.")
        return self

    def unsupported_locally(self) -> str | None:
        """The first image or PDF (local engines read text), as a path: the chain moves on to a provider."""
        for index, message in enumerate(self.messages):
            for place, block in enumerate(message.blocks()):
                if (found := _not_text(block, f"messages[{index}].content[{place}]")) is not None:
                    return found
        return None

    def check_size(self) -> None:
        system = self.system if isinstance(self.system, str) else "".join(block.text for block in self.system or ())
        check_chars(len(system) + sum(message.text_chars() for message in self.messages), "messages")


def _not_text(block: Any, at: str) -> str | None:
    """Where in `block` (at `at`) an image or a PDF is, if anywhere: text documents are carried as text."""
    inner = []
    if isinstance(block, ImageBlock):
        return at
    if isinstance(block, DocumentBlock) and isinstance(block.source, ContentSource):
        inner = [] if isinstance(block.source.content, str) else block.source.content
        at = f"{at}.source"
    elif isinstance(block, DocumentBlock) and not isinstance(block.source, PlainTextSource):
        return at
    elif isinstance(block, ToolResultBlock) and isinstance(block.content, list):
        inner = block.content
    found = (_not_text(part, f"{at}.content[{index}]") for index, part in enumerate(inner))
    return next((place for place in found if place is not None), None)


class MessagesRequest(Conversation):
    endpoint: ClassVar[str] = "messages"

    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[str], at_most(MAX_STOP_SEQUENCES)] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: Probability | None = None
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = Field(None, max_length=100)
    diagnostics: Diagnostics | None = None
    container: str | dict[str, Any] | None = None  # Anthropic's code-execution sandbox

    @model_validator(mode="after")
    def _check_limits(self):
        if any(len(stop) > LIMITS.stop_chars for stop in self.stop_sequences or ()):
            raise invalid_param("stop_sequences", f"A stop sequence may be at most {LIMITS.stop_chars} characters "
                                "long.")  # fmt: skip
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise invalid_param("thinking.budget_tokens", "thinking.budget_tokens must be less than max_tokens.")
        return self

    def most_completion_tokens(self, default_completion: int) -> int:
        return self.max_tokens


class CountTokensRequest(Conversation):
    endpoint: ClassVar[str] = "messages/count_tokens"


class TokenCount(BaseModel):
    input_tokens: int


# ---- the reply -----------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                     "model_context_window_exceeded"]  # fmt: skip


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: list[dict[str, Any]] | None = _absent_if_none()


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class ThinkingOut(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # Anthropic's proof of its own thinking; a local model's has none


class RedactedThinkingOut(BaseModel):
    type: Literal["redacted_thinking"] = "redacted_thinking"
    data: str


class Other(BaseModel):
    """A block, delta or event of a type not modelled here (a provider's server tools, a kind Anthropic added since),
    kept as it came: a reader passes over it."""

    model_config = ConfigDict(extra="allow")
    type: str


OutBlock = by_type(TextOut, ToolUseOut, ThinkingOut, RedactedThinkingOut, other=Other)


class MessageUsage(BaseModel):
    input_tokens: int  # of the prompt, less those read from the cache
    output_tokens: int
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0  # of the prompt, served from the engine's prefix cache
    service_tier: str | None = "standard"  # "standard", "priority", "batch"


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutBlock]
    stop_reason: StopReason | str | None = None  # a provider's may be one added since
    stop_sequence: str | None = None
    usage: MessageUsage


# ---- stream events -------------------------------------------------------------------------------


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class SignatureDelta(BaseModel):
    type: Literal["signature_delta"] = "signature_delta"
    signature: str


BlockDelta = by_type(TextDelta, InputJsonDelta, ThinkingDelta, SignatureDelta, other=Other)


class MessageStart(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutBlock


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: BlockDelta


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class StopDelta(BaseModel):
    stop_reason: StopReason | str | None = None
    stop_sequence: str | None = None


class DeltaUsage(BaseModel):
    """Totals at the end of the stream: what message_start could not know yet is given here."""

    output_tokens: int
    input_tokens: int | None = _absent_if_none()
    cache_read_input_tokens: int | None = _absent_if_none()


class MessageDelta(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


class ErrorObject(BaseModel):
    type: str
    message: str


class ErrorEvent(BaseModel):
    """An error once the stream has begun; also the body of an error response."""

    type: Literal["error"] = "error"
    error: ErrorObject


StreamEvent = by_type(MessageStart, ContentBlockStart, ContentBlockDelta, ContentBlockStop, MessageDelta, MessageStop,
                      Ping, ErrorEvent, other=Other)

# The models that hold a limit, inner ones first: rebuilt with the limits of the settings at start-up.
LIMITED_MODELS = (TextBlock, ContentSource, DocumentBlock, ToolResultBlock, InputMessage, Conversation,
                  MessagesRequest, CountTokensRequest)  # fmt: skip
