"""GET /v1/models and /v1/models/{id}: the public model names this gateway answers to; POST
/v1/models/{id}/load (pre-warm) and /v1/models/{id}/unload for the local models' lifecycle, with an admin key
(403 `insufficient_permissions` for another key) whenever any key is configured."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.api.protocol import ModelCard, ModelList, ModelState
from gateway.errors import APIError, invalid_param
from gateway.front.keys import require_admin
from gateway.models.lifecycle import ManagedModel
from gateway.routing.targets import LocalTarget

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request, name) for name in request.app.state.router.names()])


@router.post("/v1/models/{model_id:path}/load", response_model=ModelState)
async def load_model(model_id: str, request: Request) -> ModelState:
    """Load now (making room as the governor allows), so the first real request is fast."""
    _require_admin(request)
    model = _local_model(request, model_id)
    await model.load()  # 507 when it cannot fit, 503 while a long load goes on
    return _state(model)


@router.post("/v1/models/{model_id:path}/unload", response_model=ModelState)
async def unload_model(model_id: str, request: Request) -> ModelState:
    _require_admin(request)
    model = _local_model(request, model_id)
    if model.state != "unloaded" and not await model.unload("request"):
        message = f"Model '{model_id}' is loading or serving requests; it cannot be unloaded now."
        raise APIError(409, message, param="model", code="model_busy")
    return _state(model)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    return _card(request, model_id)


def _card(request: Request, name: str) -> ModelCard:
    """A public name's card, with the kind of the first local model in its chain (404 model_not_found when
    unknown)."""
    local = _first_local(request.app.state.router.resolve(name).targets)
    return ModelCard(id=name, created=request.app.state.started, kind=local.kind if local else None)


def _require_admin(request: Request) -> None:
    """Loading and unloading change what every client gets: an admin's, once any key is configured."""
    require_admin(request.app.state.keys, dict(request.scope["headers"]))


def _local_model(request: Request, model_id: str) -> ManagedModel:
    """A local model by its own name, or the first local model in a public name's chain."""
    model = request.app.state.models.get(model_id)
    if model is not None:
        return model
    local = _first_local(request.app.state.router.resolve(model_id).targets)  # 404 model_not_found when unknown
    if local is None:
        raise invalid_param("model", f"Model '{model_id}' is served by remote targets only; nothing to load.")
    return local


def _first_local(targets: list) -> ManagedModel | None:
    return next((target.model for target in targets if isinstance(target, LocalTarget)), None)


def _state(model: ManagedModel) -> ModelState:
    return ModelState(id=model.served_name, state=model.state, location=model.location(),
                      memory_bytes=model.footprint() or model.warm_bytes())  # fmt: skip
