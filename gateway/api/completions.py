"""POST /v1/completions (legacy): raw prompts, one or many, each with n choices."""

from __future__ import annotations

import itertools
from typing import AsyncIterator

from fastapi import APIRouter, Request

from engines.base import Delta, Engine, TokenLogprob
from gateway.api.generation import ChoiceResult, Reply, fit_max_tokens, merge, produce, start_generations
from gateway.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
    now,
)
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch

router = APIRouter(route_class=OwnBodyRoute)


@router.post("/v1/completions", response_model=CompletionResponse, openapi_extra=json_body(CompletionRequest))
async def create_completion(request: Request):
    return await dispatch(request, CompletionRequest)


async def serve_locally(engine: Engine, body: CompletionRequest):
    prompts = [await engine.encode_prompt(p) for p in body.prompts()]
    budgets = [fit_max_tokens(engine, len(p.token_ids), body.max_tokens, param="prompt") for p in prompts]
    streams = list(
        itertools.chain.from_iterable(
            start_generations(engine, prompt, body.sampling_params(budget, body.logprobs, None), body.n)
            for prompt, budget in zip(prompts, budgets)
        )
    )
    merged = merge(streams)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    reply = _CompletionReply(new_id("cmpl"), now(), body.model, prompt_tokens, len(streams))
    return await produce(reply, merged, body.stream, body.wants_usage())


class _CompletionReply(Reply):
    def response(self, results: list[ChoiceResult]) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=r.text,
                logprobs=_logprobs(r.logprobs) if r.logprobs else None,
                finish_reason=r.finish_reason,
            )
            for i, r in enumerate(results)
        ]
        usage = self.usage(sum(r.tokens for r in results))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    async def chunks(self, stream: AsyncIterator[tuple[int, Delta]], include_usage: bool) -> AsyncIterator[str]:
        completion = 0
        async for index, delta in stream:
            completion += delta.tokens
            if delta.text and not (delta.logprobs or delta.finish_reason):
                yield self.text_chunk(index, delta.text)
            elif delta.logprobs or delta.finish_reason:
                logprobs = _logprobs(delta.logprobs) if delta.logprobs else None
                choice = CompletionChoice(
                    index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                )
                yield self._chunk([choice])
        if include_usage:
            yield self._chunk([], usage=self.usage(completion))

    def render_text_chunk(self, index: int, text: str) -> str:
        return self._chunk([CompletionChoice(index=index, text=text)])

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return chunk.model_dump_json()


def _logprobs(entries: list[TokenLogprob]) -> CompletionLogprobs:
    offsets = list(itertools.accumulate((len(e.token) for e in entries[:-1]), initial=0))
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries],
        text_offset=offsets,
    )
