"""POST /v1/rerank, /rerank and /v2/rerank (the paths vLLM serves; Cohere's v2 client posts to the last): served
by every target of the model's chain, a local reranker or a provider that serves /rerank."""

from __future__ import annotations

from fastapi import APIRouter, Request

from engines.base import Engine
from gateway.api.protocol import new_id
from gateway.api.rerank.protocol import DocumentText, RerankRequest, RerankResponse, RerankResult, RerankUsage
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch
from gateway.telemetry.requests import current_request

router = APIRouter(route_class=OwnBodyRoute)
BODY = json_body(RerankRequest)


@router.post("/v1/rerank", response_model=RerankResponse, openapi_extra=BODY)
@router.post("/rerank", response_model=RerankResponse, openapi_extra=BODY)
@router.post("/v2/rerank", response_model=RerankResponse, openapi_extra=BODY)
async def rerank(request: Request):
    return await dispatch(request, RerankRequest)


async def serve_locally(engine: Engine, body: RerankRequest) -> RerankResponse:
    texts = body.texts()
    scored = await engine.rerank(body.query, texts)
    current_request().prompt_tokens = scored.prompt_tokens
    # The most relevant first; equal scores keep the documents' order (a stable sort).
    ranked = sorted(range(len(texts)), key=scored.scores.__getitem__, reverse=True)[: body.top_n]
    results = [
        RerankResult(index=i, relevance_score=scored.scores[i],
                     document=DocumentText(text=texts[i]) if body.return_documents else None)
        for i in ranked
    ]  # fmt: skip
    usage = RerankUsage(prompt_tokens=scored.prompt_tokens, total_tokens=scored.prompt_tokens)
    return RerankResponse(id=new_id("rerank"), model=body.model, results=results, usage=usage)
