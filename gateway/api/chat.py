"""POST /v1/chat/completions: messages → the model's chat template → the engine → chunks or one body."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import APIRouter, Request

from engines.base import Delta, Engine, TokenLogprob
from engines.json_schema import check_schema
from gateway.api.generation import ChoiceResult, Reply, fit_max_tokens, merge, produce, start_generations
from gateway.api.protocol import (
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
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch

router = APIRouter(route_class=OwnBodyRoute)


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, openapi_extra=json_body(ChatCompletionRequest)
)
async def create_chat_completion(request: Request):
    return await dispatch(request, "chat/completions", ChatCompletionRequest)


async def serve_locally(engine: Engine, body: ChatCompletionRequest):
    schema = body.response_format.schema_for_engine() if body.response_format else None
    if schema is not None:  # checked before any engine converts it; remote providers get it unchanged
        await asyncio.to_thread(check_schema, schema, "response_format.json_schema.schema")
    messages = [{"role": _template_role(m.role), "content": m.text()} for m in body.messages]
    prompt = await engine.render_chat(messages)
    max_tokens = fit_max_tokens(engine, len(prompt.token_ids), body.requested_max_tokens())
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.sampling_params(max_tokens, logprobs, schema)
    merged = merge(start_generations(engine, prompt, params, body.n))
    reply = _ChatReply(new_id("chatcmpl"), now(), body.model, len(prompt.token_ids), body.n)
    return await produce(reply, merged, body.stream, body.wants_usage())


def _template_role(role: str) -> str:
    return "system" if role == "developer" else role  # chat templates predate the developer role


class _ChatReply(Reply):
    def response(self, results: list[ChoiceResult]) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=r.text),
                logprobs=_logprobs(r.logprobs) if r.logprobs else None,
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        completion = sum(r.tokens for r in results)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage(completion)
        )

    async def chunks(self, stream: AsyncIterator[tuple[int, Delta]], include_usage: bool) -> AsyncIterator[str]:
        for index in range(self.choices):
            yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
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
                yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=delta.finish_reason)])
        if include_usage:
            yield self._chunk([], usage=self.usage(completion))

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
