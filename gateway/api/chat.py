"""POST /v1/chat/completions: messages → the model's chat template → the engine → chunks or one body."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import APIRouter, Request

from engines.base import Delta, Engine, Prompt, TokenLogprob
from engines.json_schema import check_schema
from gateway.api.chat_output import ChatOutput
from gateway.api.generation import ChoiceResult, Reply, fit_max_tokens, merge, produce, start_generations
from gateway.api.protocol import (
    THINKING,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    TokenLogprobOut,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from gateway.core.tool_calls import ToolSpec, check_parameters
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch

router = APIRouter(route_class=OwnBodyRoute)


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, openapi_extra=json_body(ChatCompletionRequest)
)
async def create_chat_completion(request: Request):
    return await dispatch(request, ChatCompletionRequest)


async def serve_locally(engine: Engine, body: ChatCompletionRequest):
    schema = body.response_format.schema_for_engine() if body.response_format else None
    output, prompt = await render_prompt(engine, body)
    if schema is not None or output.tools:  # most requests have neither: no thread hop for them
        await asyncio.to_thread(_check_schemas, schema, output.tools)
    output = output.after_prompt(prompt.text)
    max_tokens = fit_max_tokens(engine, len(prompt.token_ids), body.requested_max_tokens())
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.sampling_params(max_tokens, logprobs, schema)
    params.tool_calls = output.constraint(body)
    merged = merge(start_generations(engine, prompt, params, body.n))
    reply = _ChatReply(new_id("chatcmpl"), now(), body.model, len(prompt.token_ids), body.n)
    reply.output = output if output.parses() else None
    return await produce(reply, merged, body.stream, body.wants_usage())


async def render_prompt(engine: Engine, body: ChatCompletionRequest,
                        add_generation_prompt: bool = True) -> tuple[ChatOutput, Prompt]:  # fmt: skip
    """A chat request's prompt as the model's template renders it (its tools in the model's tool format, its thinking
    switch), and how the output will be read: what generating, counting and /tokenize all use."""
    output = ChatOutput.of(body, await engine.chat_template(), engine.tool_format)
    messages, tools = output.prompt_messages(body)
    thinking = {"enable_thinking": THINKING[body.reasoning_effort]} if body.reasoning_effort else None
    if body.continue_final_message:
        opening = await engine.render_chat(messages[:-1], tools, thinking)
        return output, await _continuing(engine, opening, body.messages[-1].text())
    opens = add_generation_prompt and body.add_generation_prompt
    prompt = await engine.render_chat(messages, tools, thinking, add_generation_prompt=opens)
    return output, prompt


async def _continuing(engine: Engine, opening: Prompt, text: str) -> Prompt:
    """The prompt that goes on from an assistant's `text`: the turns before it up to the assistant's opening, then the
    text as plain text (no special tokens read into it). Templates put an assistant message there, so this is the
    chat with that message last and no new turn (vLLM's continue_final_message), whatever a template does to the
    ends of a message's text."""
    tail = await engine.encode_prompt(text, add_special=False)
    return Prompt(opening.text + text, opening.token_ids + tail.token_ids)


def _check_schemas(response_schema: dict | None, tools: list[ToolSpec]) -> None:
    """Every schema a local engine will turn into a constraint, checked first; remote providers get them unchanged."""
    if response_schema is not None:
        check_schema(response_schema, "response_format.json_schema.schema")
    for index, tool in enumerate(tools):
        check_schema(tool.parameters, f"tools[{index}].function.parameters")  # limits, as for response formats
        check_parameters(tool.parameters, f"tools[{index}].function.parameters")  # and valid for the validator


class _ChatReply(Reply):
    output: ChatOutput | None = None  # set where the output holds tool calls or reasoning to parse

    def response(self, results: list[ChoiceResult]) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=message,
                logprobs=_logprobs(r.logprobs) if r.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=r.stop_sequence,
            )
            for i, r in enumerate(results)
            for message, finish_reason in [self._message(r)]
        ]
        completion = sum(r.tokens for r in results)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(completion)
        )

    def _message(self, result: ChoiceResult) -> tuple[ChatMessageOut, str | None]:
        if self.output is None:
            return ChatMessageOut(content=result.text), result.finish_reason
        return self.output.message(result.text, result.finish_reason)

    async def chunks(self, stream: AsyncIterator[tuple[int, Delta]], include_usage: bool) -> AsyncIterator[str]:
        for index in range(self.choices):
            yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        if self.output is not None:
            async for chunk in self._parsed_chunks(stream, include_usage):
                yield chunk
            return
        completion = 0
        async for index, delta in stream:
            completion += delta.tokens
            if delta.text and not delta.logprobs:
                yield self.text_chunk(index, delta.text)
            elif delta.logprobs:
                logprobs = _logprobs(delta.logprobs)
                yield self._chunk(
                    [ChatChunkChoice(index=index, delta=ChatDelta(content=delta.text), logprobs=logprobs)]
                )
            if delta.finish_reason:
                yield self._finish_chunk(index, delta.finish_reason, delta.stop_sequence)
        if include_usage:
            yield self._chunk([], usage=self.usage(completion))

    async def _parsed_chunks(self, stream: AsyncIterator[tuple[int, Delta]], include_usage: bool) -> AsyncIterator[str]:
        """Chunks of an output with tool calls or reasoning: each choice's text through its own parser."""
        parsers = [self.output.parser() for _ in range(self.choices)]
        completion = 0
        async for index, delta in stream:
            completion += delta.tokens
            events = parsers[index].feed(delta.text)
            finish_reason = delta.finish_reason
            if finish_reason:
                held, finish_reason = self.output.finish(parsers[index], finish_reason)
                events += held
            logprobs = _logprobs(delta.logprobs) if delta.logprobs else None
            for chat_delta in self.output.deltas(events):
                yield self._chunk([ChatChunkChoice(index=index, delta=chat_delta, logprobs=logprobs)])
                logprobs = None  # a delta's logprobs go out once, with its first chunk
            if logprobs is not None:
                yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=logprobs)])
            if finish_reason:
                yield self._finish_chunk(index, finish_reason, delta.stop_sequence)
        if include_usage:
            yield self._chunk([], usage=self.usage(completion))

    def opening(self) -> int:
        return self.choices  # a role chunk each

    def _finish_chunk(self, index: int, finish_reason: str, stop_sequence: str | None) -> str:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason, stop_reason=stop_sequence)
        return self._chunk([choice])

    def render_text_chunk(self, index: int, text: str) -> str:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text))])

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return chunk.model_dump_json()


def _logprobs(entries: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top],
            )
            for e in entries
        ]
    )
