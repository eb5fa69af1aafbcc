"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, served through the internal chat
request by every target of the model's chain; a provider that speaks it is sent the request as it is."""

from __future__ import annotations

import json
from typing import AsyncIterator, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engines.base import Engine
from gateway.api.chat import render_prompt
from gateway.api.messages import protocol
from gateway.api.messages.protocol import CountTokensRequest, Message, MessagesRequest, TokenCount
from gateway.api.messages.translate import chat_fields, message_body, message_events
from gateway.api.protocol import ChatCompletionRequest
from gateway.core.streams import Framing, named_frame, sse_response
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import dispatch
from gateway.routing.targets import Outcome

router = APIRouter(route_class=OwnBodyRoute)
# Anthropic's events, named by their type; an error once the stream has begun is an `error` event.
MESSAGES_FRAMING = Framing(named_frame, lambda error: named_frame(json.dumps(error.anthropic_body())))


class MessagesChat(ChatCompletionRequest):
    """The internal request of a Messages request: what a local engine cannot read is named as its client named it
    (else as the chat request names it)."""

    def unsupported_locally(self) -> str | None:
        return self.origin.unsupported_locally() or super().unsupported_locally()


class ChatTokenCount(MessagesChat):
    """A chat request whose prompt is only counted: a local target renders and tokenizes it (`count_locally`)."""

    endpoint: ClassVar[str] = "messages/count_tokens"

    def most_completion_tokens(self, default_completion: int) -> int:
        return 0


class _MessagesFront:
    async def internal(self, body: MessagesRequest) -> MessagesChat:
        return MessagesChat.translated(chat_fields(body), origin=body)

    def answer(self, body: MessagesRequest, outcome: Outcome, events: AsyncIterator[str] | None,
               headers: dict[str, str]) -> Response:  # fmt: skip
        native = outcome.endpoint == body.endpoint  # a provider that speaks Messages answered in them
        stops = body.stop_sequences or []
        if events is not None:
            events = events if native else message_events(events, body.model, stops)
            return sse_response(events, headers, MESSAGES_FRAMING)
        content = outcome.body if native else message_body(outcome.body, body.model, stops)
        return Response(content, media_type="application/json", headers=headers)


class _CountFront:
    async def internal(self, body: CountTokensRequest) -> ChatTokenCount:
        return ChatTokenCount.translated(chat_fields(body), origin=body)

    def answer(self, body: CountTokensRequest, outcome: Outcome, events: AsyncIterator[str] | None,
               headers: dict[str, str]) -> Response:  # fmt: skip
        return Response(outcome.body, media_type="application/json", headers=headers)  # a count, from either side


MESSAGES, COUNT = _MessagesFront(), _CountFront()
# Rebuilt, in this order, with the limits of the settings at start-up.
LIMITED_MODELS = (*protocol.LIMITED_MODELS, MessagesChat, ChatTokenCount)


@router.post("/v1/messages", response_model=Message, openapi_extra=json_body(MessagesRequest))
async def create_message(request: Request):
    return await dispatch(request, MessagesRequest, front=MESSAGES)


@router.post("/v1/messages/count_tokens", response_model=TokenCount, openapi_extra=json_body(CountTokensRequest))
async def count_tokens(request: Request):
    return await dispatch(request, CountTokensRequest, front=COUNT)


async def count_locally(engine: Engine, body: ChatTokenCount) -> TokenCount:
    """The prompt's tokens as the model's chat template renders it with these tools: what a Messages request with the
    same input reports in usage.input_tokens (cache reads included)."""
    _, prompt = await render_prompt(engine, body)
    return TokenCount(input_tokens=len(prompt.token_ids))
