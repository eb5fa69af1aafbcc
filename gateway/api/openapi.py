"""Request bodies in /openapi.json for the routes that read their own (see `fallback.dispatch`): FastAPI
documents only the bodies it parses, so each such route names its model with `json_body`."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

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
