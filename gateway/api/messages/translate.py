"""The Messages API on the gateway's one core: a Messages request as the fields of the internal (chat) request, and
the chat answer, one body or its stream of chunks, as a Message or as Anthropic's stream events.

What the chat request cannot carry (Anthropic's server tools and their blocks, its containers, files by id, PDFs by
URL, citations) is a 400 naming the field. Images and PDFs are carried as chat content parts: a local engine refuses
them and the chain moves on to a provider that reads them. Chat answers are read as JSON rather than through the
chat models, as providers' answers hold more than those describe (other finish reasons, vLLM's `stop_reason`).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from pydantic_core import from_json, to_json

from gateway.api.messages.protocol import (
    EFFORT_BUDGETS,
    Base64Source,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    ContentSource,
    Conversation,
    DeltaUsage,
    DocumentBlock,
    ImageBlock,
    InputJsonDelta,
    InputMessage,
    Message,
    MessageDelta,
    MessagesRequest,
    MessageStart,
    MessageStop,
    MessageUsage,
    Ping,
    PlainTextSource,
    RedactedThinkingBlock,
    ServerTool,
    StopDelta,
    TextBlock,
    TextDelta,
    TextOut,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingDelta,
    ThinkingDisabled,
    ThinkingOut,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseOut,
    UrlSource,
    new_message_id,
)
from gateway.errors import APIError, invalid_param

# Chat finish reasons as Anthropic's stop reasons (any other finish ends the turn).
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}  # fmt: skip
# Anthropic's effort levels as chat's reasoning_effort.
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
TOOL_ERROR = "Error: "  # what a tool result with is_error starts with: chat's tool messages have no such flag


def not_carried(param: str, what: str) -> APIError:
    return invalid_param(param, f"{what} cannot be carried to a chat-completions target (the local engines and "
                         "OpenAI-compatible providers).", "unsupported_parameter")  # fmt: skip


# ---- the request ---------------------------------------------------------------------------------


def chat_fields(body: Conversation) -> dict[str, Any]:
    """The internal chat request's fields for a Messages request (or a token count: no sampling)."""
    if isinstance(body, MessagesRequest) and body.container is not None:
        raise not_carried("container", "A container")
    fields = {"model": body.model, "messages": _messages(body), **_tools(body),
              "reasoning_effort": _effort(body), "response_format": _response_format(body)}  # fmt: skip
    if isinstance(body, MessagesRequest):
        fields.update(_sampling(body))
    return {name: value for name, value in fields.items() if value is not None}


def _sampling(body: MessagesRequest) -> dict[str, Any]:
    return {
        "max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "stop": body.stop_sequences, "user": body.metadata.user_id if body.metadata else None,
        "stream": body.stream, "stream_options": {"include_usage": True} if body.stream else None,
    }  # fmt: skip


def _effort(body: Conversation) -> str | None:
    """Thinking as chat's reasoning_effort: none when disabled; output_config.effort, or else the budget, sets the
    level when enabled. Without `thinking` the model thinks as its template does by default."""
    thinking = body.thinking
    if thinking is None:
        return None
    if isinstance(thinking, ThinkingDisabled):
        return "none"
    if body.output_config is not None and body.output_config.effort is not None:
        return EFFORTS[body.output_config.effort]
    if isinstance(thinking, ThinkingAdaptive):
        return "medium"
    return [level for level, least in EFFORT_BUDGETS.items() if thinking.budget_tokens >= least][-1]


def _response_format(body: Conversation) -> dict[str, Any] | None:
    output = body.output_config.format if body.output_config else None
    if output is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output.schema_, "strict": True}}


def _tools(body: Conversation) -> dict[str, Any]:
    tools = []
    for index, tool in enumerate(body.tools or ()):
        if isinstance(tool, ServerTool):
            raise not_carried(f"tools[{index}]", f"Anthropic's server tool '{tool.type}'")
        function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema,
                    "strict": tool.strict}  # fmt: skip
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    choice = body.tool_choice
    fields: dict[str, Any] = {"tools": tools or None}
    if isinstance(choice, ToolChoiceNone):
        fields["tool_choice"] = "none"
    elif isinstance(choice, ToolChoiceAny):
        fields["tool_choice"] = "required"
    elif isinstance(choice, ToolChoiceTool):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    if isinstance(choice, (ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool)) and choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False if tools else None
    return fields


def _messages(body: Conversation) -> list[dict[str, Any]]:
    """The conversation as chat messages: the system prompt first, a user turn's tool results as tool messages."""
    messages = []
    if body.system:
        messages.append({"role": "system", "content": _text_of(body.system)})
    calls: set[str] = set()
    for index, message in enumerate(body.messages):
        if message.role == "assistant":
            messages.append(_assistant(message, f"messages[{index}]", calls))
        else:
            messages += _user(message, f"messages[{index}]", calls)
    return messages


def _text_of(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(block.text for block in content)


def _assistant(message: InputMessage, where: str, calls: set[str]) -> dict[str, Any]:
    """Text and tool calls; earlier thinking is left out, as chat templates leave it out of past turns."""
    text, tool_calls = [], []
    for index, block in enumerate(message.blocks()):
        if isinstance(block, TextBlock):
            text.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.add(block.id)
            function = {"name": block.name, "arguments": to_json(block.input).decode()}
            tool_calls.append({"id": block.id, "type": "function", "function": function})
        elif not isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
            raise not_carried(f"{where}.content[{index}]", f"A '{block.type}' block in an assistant turn")
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(text) or (None if tool_calls else "")}
    if tool_calls:
        turn["tool_calls"] = tool_calls
    return turn


def _user(message: InputMessage, where: str, calls: set[str]) -> list[dict[str, Any]]:
    """Tool results first, as tool messages (Anthropic puts them first too), then the rest as one user message."""
    results, parts = [], []
    for index, block in enumerate(message.blocks()):
        at = f"{where}.content[{index}]"
        if isinstance(block, ToolResultBlock):
            if block.tool_use_id not in calls:
                raise invalid_param(f"{at}.tool_use_id", f"A tool_result must answer a tool_use block of an earlier "
                                    f"assistant turn, and '{block.tool_use_id}' is not one.")  # fmt: skip
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result(block, at)})
        elif isinstance(block, (TextBlock, ImageBlock, DocumentBlock)):
            parts += _parts(block, at)
        elif not isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
            raise not_carried(at, f"A '{block.type}' block in a user turn")
    return results + ([{"role": "user", "content": _content(parts)}] if parts else [])


def _result(block: ToolResultBlock, at: str) -> str | list[dict[str, Any]]:
    content = block.content or ""
    parts = [_text(content)] if isinstance(content, str) else [
        part for index, item in enumerate(content) for part in _parts(item, f"{at}.content[{index}]")
    ]  # fmt: skip
    return _content([_text(TOOL_ERROR), *parts] if block.is_error else parts)


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat content: a string when it is all text, else the parts."""
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _parts(block: TextBlock | ImageBlock | DocumentBlock, at: str) -> list[dict[str, Any]]:
    """A block as chat content parts."""
    if isinstance(block, TextBlock):
        return [_text(block.text)]
    source = block.source
    if isinstance(block, ImageBlock) and isinstance(source, (Base64Source, UrlSource)):
        return [{"type": "image_url", "image_url": {"url": _url(source)}}]
    if isinstance(block, DocumentBlock) and block.citations is not None and block.citations.enabled:
        raise not_carried(f"{at}.citations", "Citations")
    if isinstance(source, PlainTextSource):
        return [_text(source.data)]
    if isinstance(source, ContentSource):
        inner = [TextBlock(type="text", text=source.content)] if isinstance(source.content, str) else source.content
        return [part for index, item in enumerate(inner) for part in _parts(item, f"{at}.source.content[{index}]")]
    if isinstance(source, Base64Source):
        return [{"type": "file", "file": {"file_data": _url(source), "filename": block.title or "document.pdf"}}]
    raise not_carried(f"{at}.source", f"A {block.type} given by {source.type}")


def _url(source: Base64Source | UrlSource) -> str:
    return source.url if isinstance(source, UrlSource) else f"data:{source.media_type};base64,{source.data}"


# ---- the answer ----------------------------------------------------------------------------------


def stop_reason(choice: dict[str, Any], stops: list[str]) -> tuple[str | None, str | None]:
    """A chat choice's finish as Anthropic's stop reason, and the stop sequence that ended it where the answer names
    it (vLLM's `stop_reason`)."""
    finish, matched = choice.get("finish_reason"), choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return (STOP_REASONS.get(finish, "end_turn") if finish else None), None


def usage(chat_usage: dict[str, Any] | None) -> MessageUsage:
    """Chat usage as Anthropic's: input_tokens leaves out what the prompt cache served."""
    chat_usage = chat_usage or {}
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    prompt, completion = chat_usage.get("prompt_tokens") or 0, chat_usage.get("completion_tokens") or 0
    return MessageUsage(input_tokens=prompt - cached, output_tokens=completion, cache_read_input_tokens=cached)


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text) as the object Anthropic's tool_use `input` is."""
    try:
        value = from_json(arguments or "{}")
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise APIError(502, "The model's tool call arguments are not a JSON object.", type="server_error",
                       code="invalid_tool_call")  # fmt: skip
    return value


def message_body(content: bytes, model: str, stops: list[str]) -> bytes:
    """A chat completion body as a Message (of `model`, as the client named it, as a stream's is)."""
    chat = from_json(content)
    choice = chat["choices"][0]
    reply = choice.get("message") or {}
    blocks: list[Any] = []
    if reasoning := reply.get("reasoning_content"):
        blocks.append(ThinkingOut(thinking=reasoning))
    if text := reply.get("content"):
        blocks.append(TextOut(text=text))
    for call in reply.get("tool_calls") or ():
        function = call["function"]
        blocks.append(ToolUseOut(id=call["id"], name=function["name"], input=tool_input(function["arguments"])))
    reason, sequence = stop_reason(choice, stops)
    message = Message(id=new_message_id(), model=model, content=blocks, stop_reason=reason,
                      stop_sequence=sequence, usage=usage(chat.get("usage")))  # fmt: skip
    return message.model_dump_json().encode()


async def message_events(chunks: AsyncIterator[str], model: str, stops: list[str]) -> AsyncIterator[str]:
    """Chat chunks (JSON strings) as Anthropic's stream events: message_start and a ping, each block's start, deltas
    and stop, then message_delta with the stop reason and the usage, and message_stop."""
    blocks = _Blocks()
    finish: dict[str, Any] = {}
    chat_usage = None
    # The prompt's tokens are known at the end, with the usage: message_delta gives them.
    opening = Message(id=new_message_id(), model=model, content=[], usage=MessageUsage(input_tokens=0, output_tokens=0))
    yield MessageStart(message=opening).model_dump_json()
    yield Ping().model_dump_json()
    async for raw in chunks:
        chunk = from_json(raw)
        if "error" in chunk:  # a provider's error in the stream
            detail = chunk["error"] if isinstance(chunk["error"], dict) else {}
            raise APIError(502, str(detail.get("message") or "upstream error"), type="server_error")
        chat_usage = chunk.get("usage") or chat_usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                for event in blocks.feed(choice.get("delta") or {}):
                    yield event
                finish = choice if choice.get("finish_reason") else finish
    for event in blocks.close():
        yield event
    reason, sequence = stop_reason(finish, stops)
    totals = usage(chat_usage)
    delta_usage = DeltaUsage(output_tokens=totals.output_tokens, input_tokens=totals.input_tokens,
                             cache_read_input_tokens=totals.cache_read_input_tokens)  # fmt: skip
    yield MessageDelta(delta=StopDelta(stop_reason=reason, stop_sequence=sequence), usage=delta_usage).model_dump_json()
    yield MessageStop().model_dump_json()


class _Blocks:
    """The content blocks of a streamed answer: a chat delta's reasoning, text or call opens a block (closing the
    one before) unless it continues the open one."""

    def __init__(self):
        self.index = -1
        self.open: Any = None  # "thinking", "text", or a chat call's index

    def feed(self, delta: dict[str, Any]) -> list[str]:
        events = []
        if reasoning := delta.get("reasoning_content"):
            events += self._start("thinking", ThinkingOut(thinking=""))
            events.append(self._delta(ThinkingDelta(thinking=reasoning)))
        if text := delta.get("content"):
            events += self._start("text", TextOut(text=""))
            events.append(self._delta(TextDelta(text=text)))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if call.get("id"):  # a call's first piece
                block = ToolUseOut(id=call["id"], name=function.get("name") or "", input={})
                events += self._start(("call", call.get("index", 0)), block)
            if arguments := function.get("arguments"):
                events.append(self._delta(InputJsonDelta(partial_json=arguments)))
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [ContentBlockStop(index=self.index).model_dump_json()]

    def _start(self, kind: Any, block: Any) -> list[str]:
        if self.open == kind:
            return []
        events = self.close()
        self.index += 1
        self.open = kind
        return [*events, ContentBlockStart(index=self.index, content_block=block).model_dump_json()]

    def _delta(self, delta: Any) -> str:
        return ContentBlockDelta(index=self.index, delta=delta).model_dump_json()
