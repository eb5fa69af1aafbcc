"""Routes that read their own request body (see `fallback.dispatch`): the lane that serves them, and how their
bodies still appear in /openapi.json. FastAPI documents only the bodies it parses, so each such route names its
model with `json_body`."""

from __future__ import annotations

from typing import Iterable

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import as_api_error

REF = "#/components/schemas/{model}"
_BODY_MODELS: list[type[BaseModel]] = []


def json_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra`: its request body is `model`, as JSON."""
    _BODY_MODELS.append(model)
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def include_body_schemas(app: FastAPI) -> None:
    """Add the models named by `json_body` (and those they use) to the app's OpenAPI components."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = FastAPI.openapi(app).setdefault("components", {}).setdefault("schemas", {})
            for model in _BODY_MODELS:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi


class OwnBodyRoute(APIRoute):
    """A model endpoint: called with the bare Request by `OwnBodyLane`, which serves its POSTs. (Registered
    as a route all the same, for /openapi.json and for the 405 that other methods get.)"""


class OwnBodyLane:
    """Serves POSTs to the OwnBodyRoutes straight from the ASGI scope, and passes everything else on to `app`.

    FastAPI's handler (dependencies solved for parameters these endpoints do not have), Starlette's error and
    exception middlewares, FastAPI's exit stack and the router's matching would take a fifth of a relayed
    request's CPU, for nothing here. Errors become OpenAI-shaped answers as the app's handlers make them.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]):
        self.app = app
        self.routes = {route.path: route for route in routes if isinstance(route, OwnBodyRoute)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        scope["route"] = route  # the access log and the metrics name a request by its route
        try:
            response = await route.endpoint(Request(scope, receive))
        except Exception as error:
            response = as_api_error(error).response()
        await response(scope, receive, send)
