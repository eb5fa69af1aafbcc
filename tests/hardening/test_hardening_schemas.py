"""Hardening (issue 26): JSON schemas in `response_format` are checked before any engine turns them into a grammar.

Each attack goes to a real gateway (every installed engine); the gateway must answer an OpenAI-shaped 400 naming
the place in the schema, stay alive, keep answering /health meanwhile, and keep the schema out of its log.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from enum import Enum
from typing import Literal

import httpx
import pytest
import yaml
from pydantic import BaseModel, Field

from tests.conftest import MODEL, start_server
from tests.contract.test_errors import assert_error, post

SCHEMA = "response_format.json_schema.schema"
CANARY = "canary_7c1e"  # a property name in every bad schema: it must never reach the log
HEALTH_BOUND_S = 1.0  # the slowest /health answer allowed while an attack is served


def chat(schema, **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 8, **fields}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return body


def with_canary(schema: dict) -> dict:
    return {"type": "object", "properties": {CANARY: schema}, "required": [CANARY]}


def nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@contextmanager
def health_watch(server):
    """Polls /health while the block runs; fails if the process died or an answer took longer than the bound."""
    slowest, statuses, stop = [0.0], set(), threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    statuses.add(http.get(server.base_url + "/health").status_code)
                except httpx.HTTPError as error:
                    statuses.add(repr(error))
                slowest[0] = max(slowest[0], time.monotonic() - started)
                polling.set()
                stop.wait(0.05)

    polling = threading.Event()
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    polling.wait(timeout=10)
    log_start = len(server.log())
    try:
        yield
    finally:
        stop.set()
        poller.join(timeout=15)
    assert server.process.poll() is None, server.log()[-2000:]
    assert server.health()["status"] == "ok"
    assert statuses == {200}
    assert slowest[0] < HEALTH_BOUND_S, f"/health took {slowest[0]:.2f} s"
    new_log = server.log()[log_start:]
    assert CANARY not in new_log
    assert "Traceback" not in new_log and "unexpected error" not in new_log


BAD_SCHEMAS = [
    ({"type": "string", "maxLength": 1_000_000}, f"{SCHEMA}.properties.{CANARY}.maxLength"),
    ({"type": "string", "minLength": 1_000_000}, f"{SCHEMA}.properties.{CANARY}.minLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**9}, f"{SCHEMA}.properties.{CANARY}.minItems"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 10**6}, f"{SCHEMA}.properties.{CANARY}.maxItems"),
    ({"type": "string", "pattern": "^a{0,1000000}$"}, f"{SCHEMA}.properties.{CANARY}.pattern"),
    ({"type": "string", "pattern": "("}, f"{SCHEMA}.properties.{CANARY}.pattern"),
    ({"type": "string", "pattern": "^a]$"}, f"{SCHEMA}.properties.{CANARY}.pattern"),  # llama.cpp's converter looped
    ({"type": "strng"}, f"{SCHEMA}.properties.{CANARY}.type"),
    ({"$ref": "#/$defs/missing"}, f"{SCHEMA}.properties.{CANARY}.$ref"),
    ({"$ref": "https://example.com/schema.json"}, f"{SCHEMA}.properties.{CANARY}.$ref"),
    ({"enum": "abc"}, f"{SCHEMA}.properties.{CANARY}.enum"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, f"{SCHEMA}.properties.{CANARY}.minLength"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5001)},
      "required": [f"p{i}" for i in range(5001)]}, f"{SCHEMA}.properties.{CANARY}.properties"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(501)}},
     f"{SCHEMA}.properties.{CANARY}.properties"),  # optional: llama.cpp's converter took seconds on such
    (nested(100), f"{SCHEMA}.properties.{CANARY}" + ".items" * 63),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "param"), BAD_SCHEMAS, ids=lambda value: str(value)[:40])
def test_bad_schema_is_a_400_naming_its_place(server, schema, param):
    with health_watch(server):
        response = post(server, "/chat/completions", chat(with_canary(schema)))
    assert_error(response, 400, param, code="invalid_json_schema")
    assert CANARY not in response.json()["error"]["message"]


def test_max_length_of_a_million_leaves_the_process_alive(server):
    # Before the check, llama.cpp's grammar parser overflowed the engine thread's stack on this: the process died.
    with health_watch(server):
        response = post(server, "/chat/completions", chat({"type": "string", "maxLength": 1_000_000}))
        time.sleep(0.5)  # the crash came within 0.2 s of the request
    assert_error(response, 400, f"{SCHEMA}.maxLength", code="invalid_json_schema")


def test_schema_nested_past_the_body_parser_is_a_400(server):
    levels = 1000  # written as text: Python's own JSON encoder stops short of this
    schema = '{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels
    body = json.dumps(chat(with_canary({}))).replace("{}", schema)
    with health_watch(server):
        response = post(server, "/chat/completions", body)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


LLAMACPP_UNLOADABLE = [
    {"type": "string", "maxLength": 5000},  # within the schema limits, but groups nested 5000 deep
    {"type": "string", "pattern": "^a{0,5000}$"},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 5000},
    {"type": "string", "pattern": "^\\d{5}$"},  # an escape its grammars lack: the parser printed the grammar
    {"type": "string", "pattern": "^[^\\x00-\\U0010FFFF]$"},  # no character allowed: llama.cpp aborted
    {"enum": ["a\u0000b"]},  # NUL, which no token may carry through a grammar: llama.cpp aborted
]


@pytest.mark.parametrize("schema", LLAMACPP_UNLOADABLE, ids=lambda value: str(value)[:40])
def test_llamacpp_refuses_a_grammar_it_cannot_load(server, schema):
    if server.engine.name != "llamacpp":
        pytest.skip("a limit of llama.cpp's grammars")
    with health_watch(server):
        response = post(server, "/chat/completions", chat(with_canary(schema)))
    assert_error(response, 400, "response_format", code="invalid_json_schema")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ignore_eos_under_a_finished_grammar_does_not_abort(server, seed):
    # Once `true` is written the grammar allows only the end, which ignore_eos had biased to -inf: llama.cpp then
    # drew a token the grammar forbids and aborted the process.
    with health_watch(server):
        response = post(server, "/chat/completions", chat({"type": "boolean"}, ignore_eos=True, temperature=1.0,
                                                          seed=seed))  # fmt: skip
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"].strip()
    if server.engine.name == "vllm":  # vLLM lets generation go on, unconstrained, past a grammar's end
        assert content.startswith(("true", "false")), content
    else:  # the end, the only token the finished grammar allows, is drawn
        assert content in {"true", "false"}, content


class Size(str, Enum):
    small = "small"
    large = "large"


class Item(BaseModel):
    name: str = Field(max_length=12)
    size: Size
    count: int


class Order(BaseModel):
    items: list[Item] = Field(max_length=2)
    priority: Literal["low", "high"]
    gift: bool


def test_pydantic_schema_from_the_sdk_still_works(server, client):
    # What `response_format=Order` sends: a strict schema with $defs, $refs, enums and bounds.
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Order two small cups as JSON."}],
        response_format=Order, max_tokens=200, temperature=0,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Order)
    assert len(choice.message.parsed.items) <= 2


def test_remote_provider_gets_the_schema_unchanged(tmp_path, upstream):
    # The limits are the local engines': a provider judges the schemas it is sent itself.
    config = tmp_path / "gateway.yaml"
    target = {"type": "openai", "base_url": upstream.base_url("schemas-ok"), "model": "upstream-model"}
    config.write_text(yaml.safe_dump({"targets": {"remote": target}, "models": {"remote": {"targets": ["remote"]}}}))
    gateway = start_server(tmp_path, {"LLM_CONFIG": str(config)})
    try:
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 1_000_000}}}
        response = post(gateway, "/chat/completions", {**chat(schema), "model": "remote"})
    finally:
        gateway.stop()
    assert response.status_code == 200, response.text
    assert upstream.received["schemas-ok"]["response_format"]["json_schema"]["schema"] == schema
