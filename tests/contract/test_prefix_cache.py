"""Prefix reuse in the llama.cpp engine: a prompt that starts like an earlier one is not computed again,
and the reply says how much was reused (`usage.prompt_tokens_details.cached_tokens`, as OpenAI does)."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, start_server

SYSTEM = (
    "You are the support assistant of a small shipping company. Answer in one short sentence, "
    "politely, and never invent tracking numbers, prices or delivery dates you were not given."
)


def ask(client, question: str):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("prefix-cache"))
    yield server.client()
    server.stop()


def test_a_repeated_prompt_is_served_from_the_cache_and_answers_the_same(client):
    first = ask(client, "Where is my parcel?")
    again = ask(client, "Where is my parcel?")
    # Everything but the last prompt token, which is decoded again for the next token's logits.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_a_shared_system_prompt_is_reused_and_the_rest_computed(client):
    ask(client, "Where is my parcel?")
    other = ask(client, "How much does a letter to Spain cost?")
    cached = other.usage.prompt_tokens_details.cached_tokens
    assert 30 <= cached < other.usage.prompt_tokens - 5  # the system prompt, not the new question


def test_prefix_reuse_can_be_turned_off(tmp_path):
    server = start_server(tmp_path, {"LLM_ENABLE_PREFIX_CACHING": "false"})
    try:
        client = server.client()
        replies = [ask(client, "Where is my parcel?") for _ in range(2)]
    finally:
        server.stop()
    assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [0, 0]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
