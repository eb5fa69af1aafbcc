"""Every error leaves in OpenAI's shape with the right status, type, param and code."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server, path: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return server.post("/v1" + path, content=body, headers={"content-type": "application/json"}, **kwargs)
    return server.post("/v1" + path, json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None, type_=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert error["type"] == (type_ or "invalid_request_error")
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 2.1}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"tools": [{"type": "function", "function": {"name": "f", "frobnicate": 1}}]}, "tools[0].function.frobnicate"),
        ({"tool_choice": {"type": "function"}}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": "v"}]}]}, "messages[0].content"),
        ({"frobnicate": True}, "frobnicate"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"model": None}, "model"),
    ],
)
def test_chat_bad_fields(server, change, param):
    assert_error(post(server, "/chat/completions", {**CHAT, **change}), 400, param)


def test_missing_field(server):
    assert_error(post(server, "/chat/completions", {"model": MODEL}), 400, "messages")


def test_invalid_json_body(server):
    assert_error(post(server, "/chat/completions", b"{not json"), 400, None)


def test_unknown_model(server, client):
    assert_error(post(server, "/chat/completions", {**CHAT, "model": "gpt-9"}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-9")
    assert raised.value.code == "model_not_found"


def test_context_length_exceeded(server, client):
    response = post(server, "/chat/completions", {**CHAT, "max_tokens": 100_000})
    assert_error(response, 400, "messages", "context_length_exceeded")
    long_prompt = "hello " * 5000
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=5)
    assert raised.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
        ("/completions", {"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix"),
        ("/completions", {"model": MODEL, "prompt": "hi", "logprobs": 9}, "logprobs"),
        ("/completions", {"model": MODEL, "prompt": []}, "prompt"),
        ("/completions", {"model": MODEL, "prompt": [[1, 2], []]}, "prompt"),
        ("/completions", {"model": MODEL, "prompt": [99999999]}, "prompt"),
        ("/embeddings", {"input": ""}, "input"),
        ("/embeddings", {"input": []}, "input"),
        ("/embeddings", {"input": "hi", "dimensions": 10}, "dimensions"),
        ("/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ("/embeddings", {"input": "word " * 2000}, "input"),
    ],
)
def test_other_endpoints_bad_fields(server, path, body, param):
    model = server.engine.embedding_model if path == "/embeddings" else MODEL
    assert_error(post(server, path, {"model": model, **body}), 400, param)


def test_unknown_route_and_method(server):
    assert_error(server.get("/v1/nothing-here"), 404, None, "not_found")
    assert_error(server.get("/v1/chat/completions"), 405, None, "method_not_allowed")


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert raised.value.param == "temperature"


def test_request_id_header(server):
    echoed = post(server, "/chat/completions", CHAT, headers={"x-request-id": "my-request-42"})
    assert echoed.headers["x-request-id"] == "my-request-42"
    generated = post(server, "/chat/completions", CHAT)
    assert len(generated.headers["x-request-id"]) >= 16
    failed = post(server, "/chat/completions", {**CHAT, "n": 0}, headers={"x-request-id": "bad-1"})
    assert failed.headers["x-request-id"] == "bad-1"
    assert "my-request-42" in server.log()
