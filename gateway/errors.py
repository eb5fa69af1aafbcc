"""Every failure leaves the gateway in its route's protocol's error shape: Anthropic's on the Messages API's routes
({"type": "error", "error": {type, message}}), OpenAI's everywhere else ({"error": {message, type, param, code}}).
`APIError.body(path)` holds that one rule; every place that renders an error goes through it."""

from __future__ import annotations

import logging
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from engines.base import EngineError

log = logging.getLogger(__name__)
ANTHROPIC_ROUTES = "/v1/messages"  # the Messages API (and /v1/messages/...): errors in Anthropic's shape
# Anthropic's error type for a status; any other is "invalid_request_error" below 500 and "api_error" from it.
ANTHROPIC_TYPES = {
    401: "authentication_error", 402: "billing_error", 403: "permission_error", 404: "not_found_error",
    408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}  # fmt: skip


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self, path: str = "") -> dict:
        """The error as the protocol of the route at `path` shapes it."""
        if path == ANTHROPIC_ROUTES or path.startswith(ANTHROPIC_ROUTES + "/"):
            return self.anthropic_body()
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's shape has no `param`: the message names it, as Anthropic's own messages do ("tools.0: ...")."""
        default = "invalid_request_error" if self.status_code < 500 else "api_error"
        named = self.param is None or f"'{self.param}'" in self.message
        message = self.message if named else f"{self.param}: {self.message}"
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(self.status_code, default), "message": message}}

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status_code, headers=self.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request with this error, as an ASGI app, in the shape of the request's route."""
        await self.response(scope.get("path", ""))(scope, receive, send)


def invalid_param(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def request_too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or you do not have access to it.",
        param="model", code="model_not_found",
    )  # fmt: skip


def from_engine_error(error: EngineError) -> APIError:
    headers = {"Retry-After": "1"} if error.status_code == 503 else None
    return APIError(
        error.status_code, error.message, type=error.error_type, param=error.param, code=error.code, headers=headers
    )


def as_api_error(error: BaseException) -> APIError:
    """Any failure as the APIError a client should see; unexpected ones become a bare 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineError):
        return from_engine_error(error)
    log.error("unexpected error", exc_info=error)
    return APIError(500, "The server had an error while processing your request.", type="server_error")


def _param_from_location(location: tuple) -> str | None:
    if "[key]" in location:  # a bad key of a dict: name the dict, not the client's key
        location = location[: location.index("[key]") - 1]
    parts = [str(p) for p in location if p != "body"]
    # pydantic names union members ("str", "list[...]", "literal[...]", model classes), which mean nothing
    # to a client; the wire format's own names are lower case.
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in {"str", "int", "list", "function-after"}
             and not p[:1].isupper()]  # fmt: skip
    if not parts:
        return None
    param = parts[0]
    for part in parts[1:]:
        param += f"[{part}]" if part.isdigit() else f".{part}"
    return param


def _validation_message(error: dict) -> str:
    if error.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request. It must be valid JSON."
    if error.get("type") == "missing":
        return "Missing required parameter."
    if error.get("type") == "too_long":
        return f"At most {error['ctx']['max_length']} items are allowed."
    return error.get("msg", "Invalid value.")


def invalid_request(errors: Sequence[dict]) -> APIError:
    """The 400 for a body that failed validation (pydantic's errors), naming the first bad parameter; a limit
    exceeded first, as a union's other forms fail only for not being that form."""
    first = next((error for error in errors if error.get("type") == "too_long"), errors[0] if errors else {})
    json_broken = first.get("type") == "json_invalid"
    param = None if json_broken else _param_from_location(tuple(first.get("loc", ())))
    message = _validation_message(first)
    if param:
        message = f"Invalid value for '{param}': {message}"
    return invalid_param(param, message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response(request.url.path)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return from_engine_error(error).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return invalid_request(error.errors()).response(request.url.path)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        api_error = APIError(error.status_code, str(error.detail), code=code, headers=error.headers)
        return api_error.response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return as_api_error(error).response(request.url.path)
