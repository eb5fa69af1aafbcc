"""POST /tokenize and POST /detokenize, in vLLM's shapes (with llama-server's `with_pieces`): a raw prompt, or chat
messages rendered as the chat endpoint renders them, as the model's tokens; tokens back to text. Served by the first
local target of the model's chain: tokens belong to a local model, and no provider is asked."""

from __future__ import annotations

import asyncio
from typing import Annotated, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, model_validator

from engines.base import Prompt
from gateway.api.chat import render_prompt
from gateway.api.protocol import MAX_TOOLS, ChatCompletionRequest, ChatMessage, TokenId, Tool
from gateway.core.request import LIMITS, Capped, ModelRequest, at_most, check_chars
from gateway.errors import APIError, invalid_param
from gateway.front.body import OwnBodyRoute, json_body
from gateway.routing.chain import request_timeout
from gateway.routing.targets import CapabilityMismatch, LocalTarget
from gateway.telemetry.requests import current_request

router = APIRouter(route_class=OwnBodyRoute)
Body = TypeVar("Body", bound=ModelRequest)


class TokenizeRequest(ModelRequest):
    """vLLM's two forms in one model: `prompt` (a completion prompt) or `messages` (a chat)."""

    model: str | None = None  # the gateway's default model when left out
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1), Capped("messages")] | None = None
    tools: Annotated[list[Tool], at_most(MAX_TOOLS)] | None = None
    # For a prompt: the special tokens the tokenizer adds (BOS), by default. A chat's template writes its own.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    with_pieces: bool = False  # llama-server's: each token as {"id", "piece"}

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise invalid_param("prompt", "Give either 'prompt' (a text) or 'messages' (a chat), not both or neither.")
        if self.prompt is not None and self.tools is not None:
            raise invalid_param("tools", "'tools' go with 'messages': a prompt is tokenized as it is.")
        if self.messages is not None and self.add_special_tokens:
            raise invalid_param("add_special_tokens", "A chat is tokenized as the model reads it: its template "
                                "writes the special tokens, and no more are added.")  # fmt: skip
        return self

    def check_size(self) -> None:
        if self.prompt is not None:
            check_chars(len(self.prompt), "prompt")
        else:
            check_chars(sum(len(message.text()) for message in self.messages), "messages")

    def chat(self, model: str) -> ChatCompletionRequest:
        """The chat request these messages and tools would make: its checks, and its prompt as the model sees it."""
        return ChatCompletionRequest.model_validate({"model": model, "messages": self.messages, "tools": self.tools})


class TokenPiece(BaseModel):
    id: int
    piece: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(ModelRequest):
    model: str | None = None  # the gateway's default model when left out
    tokens: list[TokenId]

    def check_size(self) -> None:
        if len(self.tokens) > LIMITS.input_tokens:
            raise invalid_param("tokens", f"'tokens' holds {len(self.tokens)} token ids; at most "
                                f"{LIMITS.input_tokens} are allowed.")  # fmt: skip


class DetokenizeResponse(BaseModel):
    prompt: str


# Their schemas hold limits (`Capped`): rebuilt once the settings' limits are applied, after the models they use.
LIMITED_MODELS = (TokenizeRequest, DetokenizeRequest)


@router.post("/tokenize", response_model=TokenizeResponse, openapi_extra=json_body(TokenizeRequest))
async def tokenize(request: Request):
    return await _on_local_model(request, TokenizeRequest, _tokenize)


@router.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=json_body(DetokenizeRequest))
async def detokenize(request: Request):
    return await _on_local_model(request, DetokenizeRequest, _detokenize)


async def _tokenize(target: LocalTarget, body: TokenizeRequest, name: str) -> TokenizeResponse:
    engine = target.model
    if body.prompt is not None:
        prompt = await engine.encode_prompt(body.prompt, add_special=body.add_special_tokens is not False)
    else:
        prompt = await _chat_prompt(target, body.chat(name), body.add_generation_prompt)
    tokens: list[int] | list[TokenPiece] = prompt.token_ids
    if body.with_pieces:
        pieces = await engine.decode([[token] for token in prompt.token_ids])
        tokens = [TokenPiece(id=token, piece=piece) for token, piece in zip(prompt.token_ids, pieces)]
    return TokenizeResponse(count=len(prompt.token_ids), max_model_len=engine.context_length(), tokens=tokens)


async def _chat_prompt(target: LocalTarget, chat: ChatCompletionRequest, add_generation_prompt: bool) -> Prompt:
    """The prompt the chat endpoint would give this model for `chat`: tools in the model's format, its template."""
    if (param := chat.unsupported_locally()) is not None:
        raise CapabilityMismatch.local(param, target.name)
    _, prompt = await render_prompt(target.model, chat, add_generation_prompt)
    return prompt


async def _detokenize(target: LocalTarget, body: DetokenizeRequest, name: str) -> DetokenizeResponse:
    (text,) = await target.model.decode([body.tokens])
    return DetokenizeResponse(prompt=text)


async def _on_local_model(request: Request, request_type: type[Body],
                          work: Callable[[LocalTarget, Body, str], Awaitable[BaseModel]]) -> Response:  # fmt: skip
    """Read the body and do `work` on the first local target of its model's chain, within the request's timeout."""
    body = request_type.parse(await request.body())
    state = request.app.state
    name = body.model or state.default_model
    target = _first_local(state.router.resolve(name).targets, name)
    record = current_request()
    record.model, record.target = name, target.name
    seconds = request_timeout(body.timeout, state.settings)
    try:
        async with asyncio.timeout(seconds):
            with target.model.serving():  # not unloaded while its tokenizer works
                result = await work(target, body, name)
    except TimeoutError:
        message = f"The request timed out after {seconds:g}s."
        raise APIError(504, message, type="timeout_error", code="timeout") from None
    return Response(result.model_dump_json(), media_type="application/json")


def _first_local(targets: list, name: str) -> LocalTarget:
    local = next((target for target in targets if isinstance(target, LocalTarget)), None)
    if local is None:
        raise invalid_param("model", f"Model '{name}' is served by remote targets only: only a local model's "
                            "tokenizer can answer.", "model_not_local")  # fmt: skip
    return local
