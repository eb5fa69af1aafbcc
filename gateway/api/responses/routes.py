"""POST /v1/responses; GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: OpenAI's Responses API
on every target, through the internal chat request (translate.py), with the stored responses of each API key
(store.py)."""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json, to_json

from gateway.api.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from gateway.api.responses.protocol import (
    DeletedResponse,
    ErrorEvent,
    InputItemList,
    InputItemsQuery,
    ResponseObject,
    ResponsesRequest,
)
from gateway.api.responses.store import ResponseStore
from gateway.api.responses.translate import (
    ChatTranslation,
    ResponseWriter,
    native_request,
    stored_items,
    write_answer,
    write_chunk,
)
from gateway.core.streams import Framing, named_frame, sse_response
from gateway.errors import APIError, invalid_param, invalid_request
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch
from gateway.routing.targets import Outcome
from gateway.telemetry.requests import current_request

ENDED = ("response.completed", "response.incomplete")  # the events that end a stream with a response to keep

router = APIRouter()


async def create_response(request: Request) -> Response:
    front = ResponsesFront(_store(request), current_request().owner)
    try:
        answer = await dispatch(request, ResponsesRequest, front)
    except APIError as error:
        raise front.in_client_terms(error) from None
    await front.keep()
    return answer


router.add_api_route(
    "/v1/responses", create_response, methods=["POST"], route_class_override=OwnBodyRoute,
    response_model=ResponseObject, openapi_extra=json_body(ResponsesRequest),
)  # fmt: skip


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, request: Request) -> Response:
    stored = await _store(request).get(current_request().owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    return Response(stored.response, media_type="application/json")


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not await _store(request).delete(current_request().owner, response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList)
async def list_input_items(response_id: str, request: Request) -> InputItemList:
    try:
        query = InputItemsQuery.model_validate(dict(request.query_params))
    except ValidationError as error:
        raise invalid_request(error.errors()) from None
    stored = await _store(request).get(current_request().owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    items = from_json(stored.input)
    ordered = items if query.order == "asc" else items[::-1]
    if query.after is not None:
        ids = [item["id"] for item in ordered]
        if query.after not in ids:
            raise invalid_param("after", f"No input item of response '{response_id}' has the id '{query.after}'.")
        ordered = ordered[ids.index(query.after) + 1 :]
    page = ordered[: query.limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                         has_more=len(ordered) > len(page))  # fmt: skip


class ResponsesFront:
    """One Responses request's way through the chain (a `FrontEnd`): its items, after the earlier turns', as the
    internal chat request; the answer as a response or its events, kept when the request asks (`store`)."""

    def __init__(self, store: ResponseStore, owner: str):
        self.store, self.owner = store, owner
        self.native: ResponsesRequest | None = None  # the request as a provider of Responses gets it
        self.translation: ChatTranslation | None = None
        self.stores = False  # whether the client asked to store the response (`store`)
        self.finished: tuple[str, str] | None = None  # a whole answer to keep: its id and JSON
        self.sequence = -1  # the last event number of a provider's stream relayed

    async def internal(self, body: ResponsesRequest) -> ChatCompletionRequest:
        earlier = await self._earlier(body.previous_response_id)
        self.native, self.stores = native_request(body, earlier), body.stores()
        self.translation = ChatTranslation(self.native, len(earlier))
        return ChatCompletionRequest.translated(self.translation.fields, origin=self.native)

    def in_client_terms(self, error: APIError) -> APIError:
        """`error` naming the client's field where it names one of the chat request's."""
        if self.translation is not None and error.param is not None:
            param = self.translation.client_param(error.param)
            error.message, error.param = error.message.replace(f"'{error.param}'", f"'{param}'"), param
        return error

    async def _earlier(self, previous: str | None) -> list[dict[str, Any]]:
        """The items of the conversation `previous` ends (its inputs and outputs, and the turns before), if any."""
        if previous is None:
            return []
        items = await self.store.conversation(self.owner, previous)
        if items is None:
            raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")  # fmt: skip
        return items

    def answer(self, body: ResponsesRequest, outcome: Outcome, events: AsyncIterator[str] | None,
               headers: dict[str, str]) -> Response:  # fmt: skip
        if outcome.endpoint == ResponsesRequest.endpoint:
            return self._relayed(body, outcome, events, headers)
        writer = ResponseWriter(ResponseObject.begun(body, int(time.time())))
        if events is None:
            write_answer(writer, _read(ChatCompletionResponse, outcome.body))
            self.finished = (writer.response.id, writer.response.serialized())
            return Response(self.finished[1], media_type="application/json", headers=headers)
        framing = Framing(named_frame, lambda error: named_frame(writer.failed(error)))
        return sse_response(self._translated(writer, events), headers, framing)

    async def keep(self) -> None:
        """Store a whole answer, once made (a stream keeps its own as it ends)."""
        if self.finished is not None:
            await self._keep(*self.finished)

    async def _translated(self, writer: ResponseWriter, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        for event in writer.started():
            yield event
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                for event in write_chunk(writer, _read(ChatCompletionChunk, chunk)):
                    yield event
        *events, last = writer.finished()
        for event in events:
            yield event
        await self._keep(writer.response.id, writer.response.serialized())  # before the end, when a client may ask
        yield last

    async def _keep(self, response_id: str, response: str) -> None:
        if self.stores:
            items = to_json(stored_items(self.native)).decode()
            await self.store.put(self.owner, response_id, response, items)

    def _relayed(self, body: ResponsesRequest, outcome: Outcome, events: AsyncIterator[str] | None,
                 headers: dict[str, str]) -> Response:  # fmt: skip
        """A provider that speaks Responses answered: its response or events go out as they came, with this request's
        own `store` and `previous_response_id`, and the response is kept as ours are."""
        if events is None:
            response = _as_asked(body, from_json(outcome.body))
            self.finished = (response["id"], to_json(response).decode())
            return Response(self.finished[1], media_type="application/json", headers=headers)
        return sse_response(self._relay(body, events), headers, Framing(named_frame, self._relay_error))

    async def _relay(self, body: ResponsesRequest, events: AsyncIterator[str]) -> AsyncIterator[str]:
        async with contextlib.aclosing(events):
            async for event in events:
                fields = from_json(event)
                self.sequence = fields.get("sequence_number", self.sequence + 1)
                if fields.get("type") in ENDED:
                    fields["response"] = response = _as_asked(body, fields["response"])
                    await self._keep(response["id"], to_json(response).decode())
                    event = to_json(fields).decode()
                yield event

    def _relay_error(self, error: APIError) -> bytes:
        event = ErrorEvent(sequence_number=self.sequence + 1, code=error.code, message=error.message, param=error.param)
        return named_frame(event.model_dump_json())


def _as_asked(body: ResponsesRequest, response: dict[str, Any]) -> dict[str, Any]:
    """A provider's response as this request asked for it (the provider was sent it unstored, earlier turns and all)."""
    return {**response, "store": body.stores(), "previous_response_id": body.previous_response_id}


def _read(model: type[BaseModel], data: str | bytes) -> Any:
    """A target's chat answer or chunk; a 502 when it is not one."""
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        raise APIError(502, f"The target's answer is not Chat Completions: {error.errors()[0]['msg']}",
                       type="server_error", code="bad_upstream_answer") from None  # fmt: skip


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.")


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses  # SQLite, or Redis shared by replicas: the app factory wires it
