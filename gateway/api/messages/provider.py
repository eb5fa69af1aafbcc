"""The reverse translations, for a provider of `type: anthropic` serving a chat request: the chat request's JSON as a
Messages request, and the provider's Message, or its stream's events, as a chat completion or chat chunks.

A chat field the Messages API has no place for (n > 1, logprobs, logit_bias, penalties, seeds, json_object, audio,
...) is a 400 naming it. Requests are built through the Messages models, so what Anthropic would refuse (a
temperature over 1, a tool name it does not allow) is refused here, naming the field.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from gateway.api.messages.protocol import (
    EFFORT_BUDGETS,
    MIN_THINKING_BUDGET,
    ContentBlockDelta,
    ContentBlockStart,
    ErrorEvent,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    StreamEvent,
    TextDelta,
    TextOut,
    ThinkingDelta,
    ThinkingOut,
    ToolUseOut,
)
from gateway.api.messages.translate import not_carried, tool_input
from gateway.api.protocol import (
    LEGACY_CALL_ID,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatMessageOut,
    ContentPart,
    FunctionCallOut,
    FunctionDelta,
    NamedToolChoice,
    ToolCallDelta,
    ToolCallOut,
    ToolName,
    Usage,
    now,
)
from gateway.errors import APIError, invalid_param, invalid_request
from gateway.routing.targets import TargetFailure

DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; a chat request may leave it out
# Anthropic's stop reasons as chat finish reasons.
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "model_context_window_exceeded": "length"}  # fmt: skip
# Chat fields with no place in a Messages request, and the values that mean "not set".
UNCARRIED = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (None,), "logit_bias": (None,), "seed": (None,),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "min_p": (None,), "repetition_penalty": (None,),
    "ignore_eos": (False,), "audio": (None,), "modalities": (None,), "prediction": (None,), "verbosity": (None,),
    "web_search_options": (None,),
}  # fmt: skip
EVENTS = TypeAdapter(StreamEvent)


class AnthropicTranslation:
    """What a `type: anthropic` target hands a chat request through: `request` before, `response` or `events` after."""

    endpoint = "messages"

    def request(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A chat request's JSON (as its client sent it, with the provider's model name) as a Messages request's."""
        chat = ChatCompletionRequest.model_validate(fields)
        for name, unset in UNCARRIED.items():
            if getattr(chat, name) not in unset:
                raise not_carried(name, f"'{name}'")
        system, messages = _conversation(chat.messages)
        max_tokens = chat.requested_max_tokens() or DEFAULT_MAX_TOKENS
        message = {
            "model": chat.model, "max_tokens": max_tokens, "messages": messages, "system": system or None,
            "stop_sequences": chat.stop_list() or None, "temperature": chat.temperature, "top_p": chat.top_p,
            "top_k": chat.top_k if chat.top_k is not None and chat.top_k >= 0 else None, "stream": chat.stream,
            "metadata": {"user_id": chat.user} if chat.user else None, **_tools(chat),
            "thinking": _thinking(chat.reasoning_effort, max_tokens), "output_config": _output(chat),
        }  # fmt: skip
        try:
            return MessagesRequest.model_validate(message).model_dump(by_alias=True, exclude_none=True)
        except ValidationError as error:
            raise invalid_request(error.errors()) from None

    def response(self, content: bytes) -> bytes:
        """A Message as a chat completion body."""
        message = Message.model_validate_json(content)
        text = "".join(block.text for block in message.content if isinstance(block, TextOut))
        reasoning = "".join(block.thinking for block in message.content if isinstance(block, ThinkingOut))
        calls = [ToolCallOut(id=block.id, function=FunctionCallOut(name=block.name, arguments=to_json(block.input)
                                                                    .decode()))  # fmt: skip
                 for block in message.content if isinstance(block, ToolUseOut)]  # fmt: skip
        reply = ChatMessageOut(content=text or (None if calls else ""), reasoning_content=reasoning or None,
                               tool_calls=calls or None)  # fmt: skip
        choice = ChatChoice(index=0, message=reply, finish_reason=_finish(message.stop_reason))
        usage = _usage(message.usage.model_dump())
        completion = ChatCompletionResponse(id=message.id, created=now(), model=message.model, choices=[choice],
                                            usage=usage)  # fmt: skip
        return completion.model_dump_json().encode()

    async def events(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """The provider's stream events (their `data` JSON) as chat chunks: the role, content, reasoning and call
        deltas, the finish, and the usage."""
        stream = _ChunkWriter()
        async for data in events:
            event = EVENTS.validate_json(data)
            if isinstance(event, ErrorEvent):
                raise stream.failed(event)
            for chunk in stream.chunks(event):
                yield chunk


# ---- the request ---------------------------------------------------------------------------------


def _conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System and developer messages as the system prompt; the rest as turns. A tool message is a user turn with a
    tool_result (Anthropic joins consecutive turns of one role itself)."""
    system, turns = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role in ("system", "developer"):
            system += _blocks(message, where)
        elif message.role in ("tool", "function"):
            result = {"type": "tool_result", "tool_use_id": message.tool_call_id or LEGACY_CALL_ID,
                      "content": _blocks(message, where)}  # fmt: skip
            turns.append({"role": "user", "content": [result]})
        elif message.role == "assistant":
            turns.append({"role": "assistant", "content": _blocks(message, where) + _calls(message, where)})
        else:
            turns.append({"role": "user", "content": _blocks(message, where)})
    return system, turns


def _blocks(message: ChatMessage, where: str) -> list[dict[str, Any]]:
    """A chat message's content as Messages blocks (no empty text block: Anthropic refuses them)."""
    if message.audio is not None:
        raise not_carried(f"{where}.audio", "Audio")
    if not isinstance(message.content, list):
        return [{"type": "text", "text": message.content}] if message.content else []
    return [_block(part, f"{where}.content[{index}]") for index, part in enumerate(message.content)]


def _block(part: ContentPart, where: str) -> dict[str, Any]:
    if part.type in ("text", "refusal"):
        return {"type": "text", "text": part.text or part.refusal or ""}
    if part.type == "image_url":
        return {"type": "image", "source": _source(part.image_url.url)}
    if part.type == "file" and part.file.file_data is not None:
        return {"type": "document", "source": _source(part.file.file_data), "title": part.file.filename}
    raise not_carried(where, f"A '{part.type}' content part")


def _source(url: str) -> dict[str, Any]:
    """A data: URL as a base64 source, any other URL as a URL source."""
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    head, _, data = url[5:].partition(",")
    return {"type": "base64", "media_type": head.split(";")[0], "data": data}


def _calls(message: ChatMessage, where: str) -> list[dict[str, Any]]:
    calls = [(call.id, call.function) for call in message.tool_calls or () if call.function is not None]
    if message.function_call is not None:
        calls = [(LEGACY_CALL_ID, message.function_call)]
    blocks = []
    for index, (call_id, function) in enumerate(calls):
        try:
            arguments = tool_input(function.arguments)
        except APIError:
            raise invalid_param(f"{where}.tool_calls[{index}].function.arguments", "A tool call's arguments must be "
                                "a JSON object.") from None  # fmt: skip
        blocks.append({"type": "tool_use", "id": call_id, "name": function.name, "input": arguments})
    return blocks


def _tools(chat: ChatCompletionRequest) -> dict[str, Any]:
    """Function tools (and legacy functions) as custom tools, the choice as Anthropic's."""
    if chat.tools and any(tool.type != "function" for tool in chat.tools):
        raise not_carried("tools", "A custom (free-form) tool")
    # Chat's parameters may leave out `type` (an object's, by default); Anthropic's input_schema names it.
    tools = [{"name": spec.name, "description": spec.description, "input_schema": {"type": "object", **spec.parameters},
              "strict": spec.strict or None} for spec in chat.tool_specs()]  # fmt: skip
    choice = chat.tool_choice if chat.tools else chat.function_call
    if isinstance(choice, NamedToolChoice) and choice.type != "function":
        raise not_carried("tool_choice", f"A tool_choice of type '{choice.type}'")
    if isinstance(choice, (NamedToolChoice, ToolName)):
        named = {"type": "tool", "name": choice.function.name if isinstance(choice, NamedToolChoice) else choice.name}
    else:
        named = {"type": {"required": "any"}.get(choice, choice)} if choice else None
    if chat.parallel_tool_calls is False and tools:
        named = {**(named or {"type": "auto"}), "disable_parallel_tool_use": True}
    return {"tools": tools or None, "tool_choice": named}


def _thinking(effort: str | None, max_tokens: int) -> dict[str, Any] | None:
    if effort is None:
        return None
    if effort == "none":
        return {"type": "disabled"}
    # Anthropic wants the budget below max_tokens, and at least MIN_THINKING_BUDGET.
    budget = min(EFFORT_BUDGETS.get(effort, MIN_THINKING_BUDGET), max_tokens - 1)
    if budget < MIN_THINKING_BUDGET:
        raise invalid_param("reasoning_effort", f"Thinking on this provider needs max_tokens above "
                            f"{MIN_THINKING_BUDGET}.", "unsupported_parameter")  # fmt: skip
    return {"type": "enabled", "budget_tokens": budget}


def _output(chat: ChatCompletionRequest) -> dict[str, Any] | None:
    output = chat.response_format
    if output is None or output.type == "text":
        return None
    if output.type == "json_object":
        raise not_carried("response_format", "A json_object response_format (name a json_schema instead)")
    return {"format": {"type": "json_schema", "schema": output.json_schema.schema_}}


# ---- the answer ----------------------------------------------------------------------------------


def _finish(reason: str | None) -> str:
    return FINISH_REASONS.get(reason or "end_turn", "stop")


def _usage(usage: dict[str, Any]) -> Usage:
    """Anthropic's usage as chat's: prompt_tokens counts what the cache served or stored too."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cached + (usage.get("cache_creation_input_tokens") or 0)
    return Usage.count(prompt, usage.get("output_tokens") or 0, cached)


class _ChunkWriter:
    """Chat chunks for a Messages stream: the message's id and model, and which block is which tool call."""

    def __init__(self):
        self.id, self.model, self.created = "", "", now()
        self.usage: dict[str, Any] = {}
        self.calls: dict[int, int] = {}  # a tool_use block's index → its call's index
        self.started = False

    def chunks(self, event: Any) -> list[str]:
        if isinstance(event, MessageStart):
            self.id, self.model, self.started = event.message.id, event.message.model, True
            self.usage = event.message.usage.model_dump()
            return [self._chunk(ChatDelta(role="assistant", content=""))]
        if isinstance(event, ContentBlockStart) and isinstance(event.content_block, ToolUseOut):
            index = self.calls[event.index] = len(self.calls)
            block = event.content_block
            call = ToolCallDelta(index=index, id=block.id, type="function",
                                 function=FunctionDelta(name=block.name, arguments=""))  # fmt: skip
            return [self._chunk(ChatDelta(tool_calls=[call]))]
        if isinstance(event, ContentBlockDelta):
            return [self._chunk(delta) for delta in [self._delta(event)] if delta is not None]
        if isinstance(event, MessageDelta):
            self.usage.update(event.usage.model_dump(exclude_none=True))
            finish = _finish(event.delta.stop_reason)
            return [self._chunk(ChatDelta(), finish_reason=finish), self._usage_chunk()]
        return []  # block starts of text and thinking, block stops, pings, message_stop, events of other types

    def _delta(self, event: ContentBlockDelta) -> ChatDelta | None:
        delta = event.delta
        if isinstance(delta, TextDelta):
            return ChatDelta(content=delta.text)
        if isinstance(delta, ThinkingDelta):
            return ChatDelta(reasoning_content=delta.thinking)
        if isinstance(delta, InputJsonDelta) and event.index in self.calls:
            call = ToolCallDelta(index=self.calls[event.index], function=FunctionDelta(arguments=delta.partial_json))
            return ChatDelta(tool_calls=[call])
        return None  # a signature, citations: chat has no place for them

    def failed(self, event: ErrorEvent) -> APIError:
        """The provider's error event; before the first chunk the chain may still try the next target."""
        error = APIError(502, f"The provider failed: {event.error.message}", type="server_error",
                         code=event.error.type)  # fmt: skip
        return error if self.started else TargetFailure(error, retry_here=False, unhealthy=True)

    def _chunk(self, delta: ChatDelta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])
        return chunk.model_dump_json()

    def _usage_chunk(self) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                    usage=_usage(self.usage))  # fmt: skip
        return chunk.model_dump_json()
