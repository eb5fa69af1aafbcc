"""Routes that read their own request body (see `fallback.dispatch`): how they are called, and how their bodies
still appear in /openapi.json. FastAPI documents only the bodies it parses, so each such route names its
model with `json_body`."""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

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
    """Calls its endpoint with the bare Request and sends what it returns. FastAPI's own wrapper solves
    dependencies (parsing query string, cookies and headers for parameters these endpoints do not have) and
    opens exit stacks for dependencies with `yield`: 12 % of a relayed request's CPU, for nothing here.
    Exceptions still reach the app's handlers, from Starlette's exception middleware."""

    def __init__(self, path: str, endpoint: Callable[[Request], Awaitable[Response]], **kwargs):
        super().__init__(path, endpoint, **kwargs)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app
