"""The request every protocol front end hands to the routing chain, and the limits on what one request may hold.

`ModelRequest` is the base of each endpoint's wire model: the chain reads its `model`, `timeout` and token budget,
and forwards `as_sent()` to remote targets. The limits (LLM_MAX_*) are compiled into the wire models' schemas
(`Capped`) and checked while a body is validated, before any tokenizing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import CoreSchema, from_json, to_json

from gateway.errors import invalid_param, invalid_request, request_too_large
from gateway.settings import Settings


@dataclasses.dataclass
class Limits:
    """What one request may hold: the LLM_MAX_* setting of each field's name. All are checked while the body is
    validated, before any tokenizing, in time linear in the body's size."""

    json_values: int  # in the body, bounded from its commas and brackets before it is parsed
    messages: int  # messages of a chat request; also the parts or tool calls of one message
    prompt_chars: int  # text of the messages, prompts or inputs, summed
    logit_bias: int
    choices: int  # sequences generated: n, times the prompts of a legacy completion
    embedding_inputs: int
    rerank_documents: int
    input_tokens: int  # token ids given as a prompt or as inputs, summed
    stop_chars: int  # of each stop sequence

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(**{field.name: getattr(settings, f"max_{field.name}") for field in dataclasses.fields(cls)})


LIMITS = Limits.from_settings(Settings.model_construct())  # the defaults, until `set_limits`


@dataclasses.dataclass(frozen=True)
class Capped:
    """A field bounded by LIMITS.<limit>, compiled into its schema: a list or dict at most that long (`bound`
    max_length), an int at most that large (`bound` le). Lists and dicts stop at the first item past the limit
    or the first bad item, so a huge or broken one costs no more to refuse than a short one."""

    limit: str
    bound: Literal["max_length", "le"] = "max_length"

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        fail_fast = {"fail_fast": True} if schema["type"] in ("list", "dict") else {}
        return {**schema, **fail_fast, self.bound: getattr(LIMITS, self.limit)}


def at_most(items: int) -> Any:
    """A fixed bound on a list or dict (OpenAI's own), which stops at the first item past it or the first bad one."""
    return Field(max_length=items, fail_fast=True)


def set_limits(settings: Settings) -> None:
    """Hold every request to the limits `settings` name, from now on (in place: modules keep LIMITS imported)."""
    for name, value in dataclasses.asdict(Limits.from_settings(settings)).items():
        setattr(LIMITS, name, value)


def _check_values(body: bytes) -> None:
    """413 for a body with more JSON values than the limit: their number, not the bytes, sets the parse time,
    whatever fields they sit in. Each value but the first in an array or object follows a comma (an upper bound:
    commas and brackets inside strings count too)."""
    values = body.count(b",") + body.count(b"{") + body.count(b"[") + 1
    if values > LIMITS.json_values:
        raise request_too_large(f"The request body holds up to {values} JSON values; at most {LIMITS.json_values} "
                                "are allowed.")  # fmt: skip


def check_size(items: list[str] | list[list[int]], param: str) -> None:
    """400 when a request's prompts or inputs hold more text, or more token ids, than the limits allow."""
    size = sum(map(len, items))
    if items and isinstance(items[0], str):
        check_chars(size, param)
    elif size > LIMITS.input_tokens:
        raise invalid_param(param, f"'{param}' holds {size} token ids; at most {LIMITS.input_tokens} are allowed.")


def check_chars(chars: int, param: str) -> None:
    if chars > LIMITS.prompt_chars:
        raise invalid_param(param, f"'{param}' holds {chars} characters; at most {LIMITS.prompt_chars} are allowed.")



class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRequest(Request):
    """A request the gateway routes by its `model` to a chain of targets."""

    # The JSON body as the client sent it, set by `parse`; and for a request translated from another protocol's,
    # that request (`origin`). Slots: a pydantic private attribute costs a set-up per request.
    __slots__ = ("_sent", "_origin")
    # The endpoint this wire model is sent to (under /v1/): a provider that speaks it gets the request natively.
    endpoint: ClassVar[str] = ""

    model: str
    # Seconds the whole request may take (as self-hosted servers accept it); the gateway caps it.
    timeout: float | None = Field(None, gt=0)

    @classmethod
    def parse(cls, body: bytes) -> Self:
        """A JSON request body, validated (a 400 naming the first bad parameter if it is not valid)."""
        # A body holds fewer JSON values than bytes, and no more characters of text or token ids either: each
        # count below is taken only where the body is long enough to pass its limit.
        if len(body) > LIMITS.json_values:
            _check_values(body)
        try:
            request = cls.model_validate_json(body)
        except ValidationError as error:
            raise invalid_request(error.errors()) from None
        if len(body) > min(LIMITS.prompt_chars, LIMITS.input_tokens):
            request.check_size()
        object.__setattr__(request, "_sent", body)  # past pydantic's __setattr__, which checks for fields
        object.__setattr__(request, "_origin", None)
        return request

    @classmethod
    def translated(cls, fields: dict[str, Any], origin: ModelRequest) -> Self:
        """This protocol's request made from another's (`origin`, as its client sent it): what a front end of
        another protocol hands the chain. Its limits are checked as for a request sent as it is."""
        request = cls.parse(to_json(fields))
        object.__setattr__(request, "_origin", origin)
        return request

    @property
    def origin(self) -> ModelRequest | None:
        """The request of another protocol this one was translated from, if any."""
        return self._origin

    def check_size(self) -> None:
        """400 when the request's text or token ids pass their limits."""

    def most_tokens(self, default_completion: int) -> int:
        """The most tokens the request may use, which a key's tokens-per-minute limit holds while it runs: its
        prompt at about four bytes a token (of the whole body, which holds more than the prompt), plus what it
        may generate (`default_completion`, the context window, for a choice without `max_tokens`)."""
        return len(self._sent) // 4 + self.most_completion_tokens(default_completion)

    def most_completion_tokens(self, default_completion: int) -> int:
        """What the request may generate, at most (nothing, for embeddings)."""
        return 0

    def as_sent(self) -> dict[str, Any]:
        """The body as the client sent it, less the gateway's own `timeout`: what a remote provider gets.
        (Decoding the body again is cheaper than dumping the model.)"""
        fields = from_json(self._sent)
        fields.pop("timeout", None)
        return fields

    def unsupported_locally(self) -> str | None:
        """The first parameter set that local engines cannot honour (remote providers can), or None."""
        return None
