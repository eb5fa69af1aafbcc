"""POST /v1/embeddings: float or base64 vectors, as OpenAI sends them."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from engines.base import Engine
from gateway.api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from gateway.errors import invalid_param
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch
from gateway.telemetry.requests import current_request

router = APIRouter(route_class=OwnBodyRoute)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, openapi_extra=json_body(EmbeddingRequest))
async def create_embeddings(request: Request):
    return await dispatch(request, EmbeddingRequest)


async def serve_locally(engine: Engine, body: EmbeddingRequest) -> EmbeddingResponse:
    native = engine.info().embedding_dimensions
    if body.dimensions is not None and body.dimensions != native:
        raise invalid_param("dimensions", f"This model only produces {native}-dimensional embeddings.")
    result = await engine.embed(body.inputs())
    current_request().prompt_tokens = result.prompt_tokens
    data = [
        EmbeddingData(index=i, embedding=_encode(vector, body.encoding_format))
        for i, vector in enumerate(result.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingResponse(data=data, model=body.model, usage=usage)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, which is what the OpenAI SDK decodes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
