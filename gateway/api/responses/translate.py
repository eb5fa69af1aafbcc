"""Between the Responses API and the gateway's internal request and stream (Chat Completions): a request's items
become chat messages; a chat answer, whole or chunk by chunk, becomes output items and the stream's events.

Messages map to messages of the same role, `function_call` items to the tool calls of an assistant message,
`function_call_output` items to tool messages; earlier `reasoning` items are left out of the prompt, as chat
templates leave out earlier thinking. An answer's reasoning (`reasoning_content`) becomes a `reasoning` item, its
text a `message` item, each tool call a `function_call` item.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic_core import to_json

from gateway.api.protocol import ChatCompletionChunk, ChatCompletionResponse, Usage
from gateway.api.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCall,
    FunctionCallOutput,
    FunctionChoice,
    IncompleteDetails,
    InputFile,
    InputImage,
    InputText,
    InputTokensDetails,
    Message,
    OutputItemEvent,
    OutputText,
    OutputTokensDetails,
    Reasoning,
    ReasoningText,
    Refusal,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
    new_id,
)
from gateway.errors import APIError, invalid_param

ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# Copied as they are: the sampling, and what matters to a provider's caching, abuse checks and billing.
SAME_FIELDS = {"temperature", "top_p", "user", "service_tier", "prompt_cache_key", "safety_identifier"}
IMAGE_DETAILS = ("auto", "low", "high")  # what a chat image part takes
# The chat request's names for the client's fields (the rest keep theirs, or are renamed in `client_param`).
CHAT_PARAMS = {
    "messages": "input", "max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}  # fmt: skip
ITEM_OF_TEXT = {"output_text": "message", "reasoning_text": "reasoning"}  # the item each kind of text is written in


# ---- the request ---------------------------------------------------------------------------------


def native_request(body: ResponsesRequest, earlier: list[dict[str, Any]]) -> ResponsesRequest:
    """`body` as a provider that speaks Responses gets it: after the earlier turns' items (`previous_response_id`
    expanded, as that provider never stored them), and stored nowhere but here."""
    fields = body.as_sent()
    fields.pop("previous_response_id", None)
    fields["store"] = False
    if earlier:
        fields["input"] = earlier + [item.model_dump(by_alias=True) for item in body.items()]
    return ResponsesRequest.parse(to_json(fields))


class ChatTranslation:
    """The internal (chat) request's fields for `request`, whose first `earlier` items are earlier turns'; and the
    way back from the chat request's parameter names to the client's, for the 400s that name them (a local target
    that cannot read an image part, the chat request's own checks, an engine's)."""

    def __init__(self, request: ResponsesRequest, earlier: int):
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []  # where each chat message came from: an item, or the instructions
        self.calls: set[str] = set()  # the call ids so far, which outputs must answer
        self.earlier = earlier
        if request.instructions is not None:
            self._message({"role": "system", "content": request.instructions}, "instructions")
        for index, item in enumerate(request.items()):
            self._add(index, item)
        if not self.messages:
            raise invalid_param("input", "The input must hold at least one item, or instructions must be given.")
        self.fields = {"model": request.model, "messages": self.messages, **_settings(request)}

    def client_param(self, param: str) -> str:
        """The client's name for a chat request's parameter (`messages[3].content[1]` → `input[2].content[1]`)."""
        if match := re.fullmatch(r"messages\[(\d+)\](.*)", param):
            index, rest = int(match[1]), match[2]
            output = self.messages[index]["role"] == "tool"  # a function_call_output's content is its `output`
            return self.origins[index] + (rest.replace(".content", ".output", 1) if output else rest)
        if match := re.fullmatch(r"tools\[(\d+)\]\.function(.*)", param):
            return f"tools[{match[1]}]{match[2]}"
        if param.startswith("response_format"):
            return "text.format" + param.removeprefix("response_format").removeprefix(".json_schema")
        return CHAT_PARAMS.get(param, param)

    def _add(self, index: int, item: Any) -> None:
        # An earlier turn's item was checked when it was sent: a fault there is the earlier response's.
        param = f"input[{index - self.earlier}]" if index >= self.earlier else "previous_response_id"
        if isinstance(item, Message):
            self._message({"role": item.role, "content": _content(item.content, f"{param}.content")}, param)
        elif isinstance(item, FunctionCall):
            self._call(item, param)
        elif isinstance(item, FunctionCallOutput):
            if item.call_id not in self.calls:
                raise invalid_param(f"{param}.call_id", f"No function_call item before this output has the call_id "
                                    f"'{item.call_id}'.")  # fmt: skip
            content = _content(item.output, f"{param}.output")
            self._message({"role": "tool", "tool_call_id": item.call_id, "content": content}, param)

    def _message(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def _call(self, item: FunctionCall, param: str) -> None:
        """A call joins the assistant message before it (its text, its other calls), as one turn of the model's."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self._message({"role": "assistant", "content": None}, param)
        function = {"name": item.name, "arguments": item.arguments}
        self.messages[-1].setdefault("tool_calls", []).append({"id": item.call_id, "type": "function",
                                                                "function": function})  # fmt: skip
        self.calls.add(item.call_id)


def _content(content: str | list, param: str) -> str | list[dict[str, Any]]:
    """Content parts as chat's: text, refusals as text, images and files (which local models refuse) as chat's."""
    if isinstance(content, str):
        return content
    return [_part(part, f"{param}[{index}]") for index, part in enumerate(content)]


def _part(part: Any, param: str) -> dict[str, Any]:
    if isinstance(part, Refusal):
        return {"type": "text", "text": part.refusal}
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise invalid_param(param, "An image must be given by its image_url here.", "unsupported_parameter")
        detail = part.detail if part.detail in IMAGE_DETAILS else "high"
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": detail}}
    if isinstance(part, InputFile):
        if part.file_url is not None:
            raise invalid_param(f"{param}.file_url", "A file must be given by its file_data or file_id here.",
                                "unsupported_parameter")  # fmt: skip
        file = part.model_dump(include={"file_data", "file_id", "filename"}, exclude_none=True)
        return {"type": "file", "file": file}
    return {"type": "text", "text": part.text}


def _settings(request: ResponsesRequest) -> dict[str, Any]:
    """The chat request's fields besides its messages."""
    fields = {**request.model_dump(include=SAME_FIELDS, exclude_none=True), **_tool_fields(request)}
    if request.stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    if request.max_output_tokens is not None:
        fields["max_completion_tokens"] = request.max_output_tokens
    if request.reasoning is not None and request.reasoning.effort is not None:
        fields["reasoning_effort"] = request.reasoning.effort
    if request.text is not None:
        fields.update(_text_fields(request))
    return fields


def _text_fields(request: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"verbosity": request.text.verbosity} if request.text.verbosity else {}
    text_format = request.text.format
    if text_format.type == "json_schema":
        schema = text_format.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif text_format.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    return fields


def _tool_fields(request: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                           for tool in request.tools]  # fmt: skip
        if request.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = request.parallel_tool_calls
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice):
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and (request.tools or choice == "required"):  # "required" without tools: a 400
        fields["tool_choice"] = choice
    return fields


def stored_items(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's items as they are stored and listed: each with an id, message content as parts."""
    items = []
    for item in request.items():
        update: dict[str, Any] = {} if item.id is not None else {"id": new_id(ID_PREFIXES[item.type])}
        if isinstance(item, Message) and isinstance(item.content, str):
            text = item.content
            update["content"] = [OutputText(type="output_text", text=text) if item.role == "assistant" else
                                 InputText(type="input_text", text=text)]  # fmt: skip
        items.append(item.model_copy(update=update).model_dump(mode="json", by_alias=True))
    return items


# ---- the answer ----------------------------------------------------------------------------------


class ResponseWriter:
    """A response written from the internal answer's parts as they come (reasoning, text, calls), with the stream
    events that tell each step, numbered in order. An item is open until the next one begins or the answer ends."""

    def __init__(self, response: ResponseObject):
        self.response = response
        self.sequence = 0
        self.item: Message | Reasoning | FunctionCall | None = None  # the open item
        self.pieces: list[str] = []  # the open item's text so far
        self.calls: dict[int, tuple[int, FunctionCall]] = {}  # the chat call's index → output index, item
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def started(self) -> list[str]:
        return [self._event(ResponseEvent(type=kind, response=self.response))
                for kind in ("response.created", "response.in_progress")]  # fmt: skip

    def reasoning(self, text: str) -> list[str]:
        return self._text("reasoning_text", text)

    def text(self, text: str) -> list[str]:
        return self._text("output_text", text)

    def call(self, index: int, call_id: str, name: str) -> list[str]:
        item = FunctionCall(type="function_call", call_id=call_id, name=name, arguments="", id=new_id("fc"),
                            status="in_progress")  # fmt: skip
        events = self._open(item)
        self.calls[index] = (len(self.response.output) - 1, item)
        return events

    def arguments(self, index: int, delta: str) -> list[str]:
        output_index, item = self.calls[index]
        item.arguments += delta
        return [self._event(ArgumentsDeltaEvent(item_id=item.id, output_index=output_index, delta=delta))]

    def finished(self) -> list[str]:
        """The rest of the stream: the open item closed, and the response as it ended."""
        response = self.response
        incomplete = self.finish_reason in ("length", "content_filter")
        events = [] if response.output else self._text("output_text", "")  # an empty answer is an empty message
        events += self._close("incomplete" if incomplete else "completed")
        if incomplete:
            reason = "content_filter" if self.finish_reason == "content_filter" else "max_output_tokens"
            response.status, response.incomplete_details = "incomplete", IncompleteDetails(reason=reason)
        else:
            response.status, response.completed_at = "completed", int(time.time())
        response.usage = _usage(self.usage)
        return events + [self._event(ResponseEvent(type=f"response.{response.status}", response=response))]

    def failed(self, error: APIError) -> str:
        """The last event of a stream that failed after it began."""
        self.response.status = "failed"
        self.response.error = ResponseError(code="server_error", message=error.message)
        return self._event(ResponseEvent(type="response.failed", response=self.response))

    def _text(self, kind: str, text: str) -> list[str]:
        events = []
        if self.item is None or self.item.type != ITEM_OF_TEXT[kind]:
            item = (Message(role="assistant", content=[], id=new_id("msg"), status="in_progress") if kind ==
                    "output_text" else Reasoning(type="reasoning", id=new_id("rs"), content=[]))  # fmt: skip
            events = self._open(item)
            events.append(self._part_event("response.content_part.added", item, kind, ""))
        if text:
            self.pieces.append(text)
            delta = TextDeltaEvent(type=f"response.{kind}.delta", item_id=self.item.id, output_index=self._index(),
                                   delta=text, logprobs=_logprobs(kind))  # fmt: skip
            events.append(self._event(delta))
        return events

    def _open(self, item: Message | Reasoning | FunctionCall) -> list[str]:
        events = self._close("completed")
        self.response.output.append(item)
        self.item, self.pieces = item, []
        return events + [self._event(OutputItemEvent(type="response.output_item.added", output_index=self._index(),
                                                     item=item))]  # fmt: skip

    def _close(self, status: str) -> list[str]:
        item, index = self.item, self._index()
        if item is None:
            return []
        self.item = None
        if isinstance(item, FunctionCall):
            events = [self._event(ArgumentsDoneEvent(item_id=item.id, output_index=index, name=item.name,
                                                     arguments=item.arguments))]  # fmt: skip
        else:
            kind, text = ("output_text" if isinstance(item, Message) else "reasoning_text"), "".join(self.pieces)
            events = [self._event(TextDoneEvent(type=f"response.{kind}.done", item_id=item.id, output_index=index,
                                                text=text, logprobs=_logprobs(kind)))]  # fmt: skip
            events.append(self._part_event("response.content_part.done", item, kind, text))
            item.content = [self._part(kind, text)]
        if not isinstance(item, Reasoning):
            item.status = status
        return events + [self._event(OutputItemEvent(type="response.output_item.done", output_index=index, item=item))]

    def _part_event(self, event_type: str, item: Message | Reasoning, kind: str, text: str) -> str:
        part = self._part(kind, text)
        return self._event(ContentPartEvent(type=event_type, item_id=item.id, output_index=self._index(), part=part))

    @staticmethod
    def _part(kind: str, text: str) -> OutputText | ReasoningText:
        return OutputText(type=kind, text=text) if kind == "output_text" else ReasoningText(type=kind, text=text)

    def _index(self) -> int:
        return len(self.response.output) - 1

    def _event(self, event: StreamEvent) -> str:
        event.sequence_number = self.sequence
        self.sequence += 1
        return event.model_dump_json(by_alias=True)


def _logprobs(kind: str) -> list | None:
    return [] if kind == "output_text" else None  # output text carries logprobs (none here); reasoning text none


def write_answer(writer: ResponseWriter, answer: ChatCompletionResponse) -> None:
    """A whole chat answer into `writer`."""
    choice = answer.choices[0]
    message = choice.message
    if message.reasoning_content:
        writer.reasoning(message.reasoning_content)
    if message.content:
        writer.text(message.content)
    for index, call in enumerate(message.tool_calls or ()):
        writer.call(index, call.id, call.function.name)
        writer.arguments(index, call.function.arguments)
    writer.finish_reason, writer.usage = choice.finish_reason, answer.usage
    writer.finished()


def write_chunk(writer: ResponseWriter, chunk: ChatCompletionChunk) -> list[str]:
    """One chat chunk into `writer`: the events it makes."""
    events = []
    for choice in chunk.choices:
        delta = choice.delta
        if delta.reasoning_content:
            events += writer.reasoning(delta.reasoning_content)
        if delta.content:
            events += writer.text(delta.content)
        for call in delta.tool_calls or ():
            if call.index not in writer.calls:  # a call's first delta (some providers repeat its id later)
                events += writer.call(call.index, call.id or new_id("call"), call.function.name or "")
            if call.function.arguments:
                events += writer.arguments(call.index, call.function.arguments)
        writer.finish_reason = choice.finish_reason or writer.finish_reason
    writer.usage = chunk.usage or writer.usage
    return events


def _usage(usage: Usage | None) -> ResponseUsage | None:
    if usage is None:
        return None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens, output_tokens_details=OutputTokensDetails(),
        total_tokens=usage.total_tokens,
    )  # fmt: skip
