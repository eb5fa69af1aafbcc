"""POST /tokenize and /detokenize (vLLM's shapes, llama-server's `with_pieces`) on a real gateway, on every engine:
a chat counts the tokens the chat endpoint bills, a prompt goes round trip, bad input gets a 400 naming it."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
TEXT = "The lighthouse keeper counted 12 ships, then 3 more."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}  # fmt: skip


def tokenize(server, **body) -> dict:
    response = server.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def detokenize(server, tokens: list[int], **body) -> str:
    response = server.post("/detokenize", json={"tokens": tokens, **body})
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def context_length(server) -> int:
    return next(m["context_length"] for m in server.health()["models"] if m["model"] == MODEL)


def error(server, path: str, body: dict, status: int = 400) -> dict:
    response = server.post(path, json=body)
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_chat_counts_what_the_chat_endpoint_bills(server, client):
    counted = tokenize(server, model=MODEL, messages=CHAT)
    assert counted["count"] == len(counted["tokens"]) > 5
    assert counted["max_model_len"] == context_length(server)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert reply.usage.prompt_tokens == counted["count"]


def test_tools_count_as_the_chat_endpoint_renders_them(server, client):
    counted = tokenize(server, messages=CHAT, tools=[WEATHER])  # the default model
    assert counted["count"] > tokenize(server, messages=CHAT)["count"]
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, tools=[WEATHER], max_tokens=1)
    assert reply.usage.prompt_tokens == counted["count"]


def test_without_the_generation_prompt_the_chat_ends_with_its_last_message(server):
    whole = tokenize(server, messages=CHAT)["tokens"]
    bare = tokenize(server, messages=CHAT, add_generation_prompt=False)["tokens"]
    assert len(bare) < len(whole) and whole[: len(bare)] == bare
    assert detokenize(server, bare).rstrip().endswith("Name a colour.<|im_end|>")


def test_a_prompt_goes_round_trip(server):
    plain = tokenize(server, prompt=TEXT, add_special_tokens=False)["tokens"]
    assert detokenize(server, plain, model=MODEL) == TEXT
    default = tokenize(server, prompt=TEXT)["tokens"]  # with whatever the tokenizer adds (SmolLM2: nothing)
    assert default[len(default) - len(plain) :] == plain
    assert tokenize(server, prompt="", add_special_tokens=False) == {
        "count": 0, "max_model_len": context_length(server), "tokens": []
    }  # fmt: skip
    assert detokenize(server, []) == ""


def test_pieces_are_each_tokens_text(server):
    counted = tokenize(server, prompt=TEXT, add_special_tokens=False, with_pieces=True)
    assert counted["count"] == len(counted["tokens"])
    assert "".join(token["piece"] for token in counted["tokens"]) == TEXT
    ids = [token["id"] for token in counted["tokens"]]
    assert ids == tokenize(server, prompt=TEXT, add_special_tokens=False)["tokens"]
    chat = tokenize(server, messages=CHAT, with_pieces=True)["tokens"]
    assert chat[0]["piece"] == "<|im_start|>"  # special tokens written out, as the template wrote them


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": TEXT, "messages": CHAT}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": TEXT, "tools": [WEATHER]}, "tools"),
        ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
        ("/tokenize", {"prompt": TEXT, "return_tokens_as": "ids"}, "return_tokens_as"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "tool", "content": "4", "tool_call_id": "c1"}]},
         "messages[0].tool_call_id"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
        ("/tokenize", {"prompt": TEXT, "timeout": 0}, "timeout"),
        ("/detokenize", {"tokens": [1, -2]}, "tokens[1]"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_it(server, path, body, param):
    assert error(server, path, body)["param"] == param


def test_an_unknown_model_is_a_404(server):
    assert error(server, "/tokenize", {"model": "no-such-model", "prompt": TEXT}, 404)["code"] == "model_not_found"


def test_a_prompt_past_the_context_window_is_refused_before_tokenizing(server):
    refused = error(server, "/tokenize", {"prompt": "word " * 200_000})
    assert refused["code"] == "context_length_exceeded" and refused["param"] == "prompt"
