"""GET /v1/models and /v1/models/{id}: the public model names this gateway answers to."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    created = request.app.state.started
    return ModelList(data=[ModelCard(id=name, created=created) for name in request.app.state.router.names()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    request.app.state.router.resolve(model_id)  # 404 model_not_found when unknown
    return ModelCard(id=model_id, created=request.app.state.started)
