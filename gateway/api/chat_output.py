"""What a local chat answer holds besides text: tool calls and reasoning, parsed from the model's output (by the
core's `OutputParser`) into OpenAI's message and delta fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from engines.base import ToolCallConstraint
from gateway.api.protocol import (
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    FunctionCallOut,
    FunctionDelta,
    ToolCallDelta,
    ToolCallOut,
)
from gateway.core.output_parser import (
    CallArguments,
    CallStart,
    Event,
    InvalidToolCall,
    OutputParser,
    Reasoning,
    ReasoningFormat,
    Text,
    reasoning_format,
    starts_inside,
)
from gateway.core.tool_calls import ToolFormat, ToolSpec, chat_messages, constraint, format_for
from gateway.errors import APIError, invalid_param
from gateway.routing.targets import TargetFailure


@dataclass(frozen=True)
class ChatOutput:
    """How one request's output is read: which tools it may call, in which format, and whether the model thinks."""

    tools: list[ToolSpec]
    format: ToolFormat
    reasoning: ReasoningFormat | None
    legacy: bool  # answered as the deprecated `function_call`
    inside_reasoning: bool = False  # the prompt leaves the model inside a think block

    @classmethod
    def of(cls, body: ChatCompletionRequest, template: str | None, format_name: str | None) -> ChatOutput:
        tools = body.tool_specs() if body.tool_mode().mode != "none" else []
        try:
            tool_format = format_for(template, format_name)
        except ValueError as error:  # a target's `tool_parser` option that names no format: the operator's fault
            raise APIError(500, f"Unknown tool_parser: {error}", type="server_error", code="bad_tool_parser") from None
        return cls(tools, tool_format, reasoning_format(template), body.legacy_functions())

    def prompt_messages(self, body: ChatCompletionRequest) -> tuple[list[dict], list[dict] | None]:
        """The messages and tools the chat template gets."""
        return chat_messages([message.for_template() for message in body.messages], self.tools, self.format)

    def constraint(self, body: ChatCompletionRequest) -> ToolCallConstraint | None:
        if not self.tools:
            return None
        if body.response_format is not None and body.response_format.type != "text":
            raise invalid_param("response_format", "A local model cannot follow a response_format and offer tools "
                                "in one request.", "unsupported_parameter")  # fmt: skip
        parallel = body.parallel_tool_calls is not False and not self.legacy
        return constraint(self.tools, body.tool_mode(), self.format, parallel)

    def after_prompt(self, prompt_text: str) -> ChatOutput:
        inside = self.reasoning is not None and starts_inside(prompt_text, self.reasoning)
        return dataclasses.replace(self, inside_reasoning=inside)

    def parses(self) -> bool:
        """Whether the output needs parsing at all (most requests: no tools, a model that does not think)."""
        return bool(self.tools) or self.reasoning is not None

    def parser(self) -> OutputParser:
        return OutputParser(self.format if self.tools else None, self.tools, self.reasoning, self.inside_reasoning)

    def message(self, text: str, finish_reason: str | None) -> tuple[ChatMessageOut, str | None]:
        """The whole answer of one choice, and its finish reason ("tool_calls" when it called)."""
        parser = self.parser()
        try:
            events = parser.feed(text)
        except InvalidToolCall as error:
            events, finish_reason = [], self._unfinished(error, finish_reason)
        else:
            held, finish_reason = self.finish(parser, finish_reason)
            events += held
        content = "".join(e.text for e in events if isinstance(e, Text))
        reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                 for c in parser.calls]  # fmt: skip
        message = ChatMessageOut(content=content or (None if calls else ""), reasoning_content=reasoning or None)
        if calls and self.legacy:
            message.function_call = calls[0].function
        elif calls:
            message.tool_calls = calls
        return message, finish_reason

    def _finish_reason(self, called: bool, finish_reason: str | None) -> str | None:
        if called and finish_reason == "stop":
            return "function_call" if self.legacy else "tool_calls"
        return finish_reason

    def finish(self, parser: OutputParser, finish_reason: str | None) -> tuple[list[Event], str | None]:
        """The events still held at the end of a choice, and its finish reason ("tool_calls" when it called)."""
        try:
            events = parser.finish(cut_off=finish_reason == "length")
        except InvalidToolCall as error:
            return [], self._unfinished(error, finish_reason)
        return events, self._finish_reason(bool(parser.calls), finish_reason)

    def deltas(self, events: Iterable[Event]) -> Iterable[ChatDelta]:
        """Stream deltas for parsed events (text goes out as content)."""
        for event in events:
            if isinstance(event, Text):
                yield ChatDelta(content=event.text)
            elif isinstance(event, Reasoning):
                yield ChatDelta(reasoning_content=event.text)
            elif isinstance(event, CallStart) and self.legacy:
                yield ChatDelta(function_call=FunctionDelta(name=event.name, arguments=""))
            elif isinstance(event, CallStart):
                function = FunctionDelta(name=event.name, arguments="")
                yield ChatDelta(tool_calls=[ToolCallDelta(index=event.index, id=event.id, type="function",
                                                          function=function)])  # fmt: skip
            elif isinstance(event, CallArguments) and self.legacy:
                yield ChatDelta(function_call=FunctionDelta(arguments=event.text))
            elif isinstance(event, CallArguments):
                arguments = FunctionDelta(arguments=event.text)
                yield ChatDelta(tool_calls=[ToolCallDelta(index=event.index, function=arguments)])

    @staticmethod
    def _unfinished(error: InvalidToolCall, finish_reason: str | None) -> str:
        """A call cut off by the token budget is left out and the answer ends with "length". Any other invalid call
        got past the decoding constraint: the target failed, and the chain tries again (an answer not yet sent)."""
        if finish_reason == "length":
            return "length"
        failure = APIError(502, f"The model produced an invalid tool call: {error}", type="server_error",
                           code="invalid_tool_call")  # fmt: skip
        raise TargetFailure(failure, retry_here=True, unhealthy=False) from error
