"""Routes that read their own request body (see `fallback.dispatch`): the lane that serves them, and how their
bodies still appear in /openapi.json. FastAPI documents only the bodies it parses, so each such route names its
model with `json_body`. Before any route, `BodyGuard` checks every request body's type and length."""

from __future__ import annotations

from typing import Iterable

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError, as_api_error, request_too_large

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
    exception middlewares, FastAPI's exit stack and the router's matching would cost a relayed request CPU for
    nothing here (docs/design/own-body-lane.md). Errors become answers in the route's protocol's shape, as the
    app's handlers make them.
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
            response = as_api_error(error).response(scope["path"])
        await response(scope, receive, send)


class BodyGuard:
    """Every request body must be JSON and at most LLM_MAX_BODY_BYTES long, for every route.

    A body of another type (or none named) gets 415: text/plain, form and multipart bodies, and a fetch() of a
    Blob, are what any web page may send cross-site without a CORS preflight. A body declared longer than the
    limit gets 413 before any of it is read; one sent in chunks gets 413 as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length, chunked, media_type = _body_headers(scope["headers"])
            if length or chunked:  # a POST without a body (load, unload) has nothing to check
                limit = scope["app"].state.settings.max_body_bytes
                if (error := _refusal(media_type, length, limit)) is not None:
                    return await error(scope, receive, send)
                if chunked:  # no length was declared: count what arrives
                    receive = _counted(receive, limit)
        await self.app(scope, receive, send)


def _body_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool, bytes]:
    """Content-Length (0 if absent), whether the body is chunked, and the media type (lower case, b"" if none)."""
    length, chunked, media_type = 0, False, b""
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0  # the HTTP parser has refused malformed ones
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"content-type":
            media_type = value.partition(b";")[0].strip().lower()
    return length, chunked, media_type


def _refusal(media_type: bytes, length: int, limit: int) -> APIError | None:
    if not _is_json(media_type):
        shown = media_type.decode("latin-1") or "none"
        return APIError(
            415, f"Unsupported content type: '{shown}'. Request bodies must be JSON: send the header "
            "'Content-Type: application/json'.", code="unsupported_content_type",
        )  # fmt: skip
    if length > limit:
        return _too_large(limit)
    return None


def _is_json(media_type: bytes) -> bool:
    structured = media_type.startswith(b"application/") and media_type.endswith(b"+json")  # application/merge+json
    return media_type == b"application/json" or structured


def _counted(receive: Receive, limit: int) -> Receive:
    received = 0

    async def counted_receive() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return counted_receive


def _too_large(limit: int) -> APIError:
    return request_too_large(f"The request body is longer than {limit} bytes, the most this server accepts.")
