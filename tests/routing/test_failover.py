"""Streams that fail: before their first output (a role chunk alone), they fall back invisibly; after it, a model
with `continue_on_failure` has its answer finished by a later target (the local SmolLM2 engine, or a provider that
takes vLLM's `continue_final_message`), and the client (the openai SDK) reads one stream.

The first targets are the misbehaving server of tests/upstream.py: `cut<N>` sends N chunks (the role chunk first,
then "from", " ", its own name) and drops the connection.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import yaml

from engines.base import Delta, EngineError
from tests.conftest import Server, start_server
from tests.routing.test_routing import access_line, counter, stream_chunks, stream_text

KEY = "sk-failover-key"
QUESTION = [{"role": "user", "content": "Name a colour."}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
BUDGET = 12  # max_tokens of the continued answers
SENT = 3  # content chunks a cut4 stream sends before it drops: "from", " ", its name


def failover_config(upstream) -> dict:
    def remote(name: str, **extra) -> dict:
        return {"type": "openai", "base_url": upstream.base_url(name), "model": "upstream-model", **extra}

    targets = {
        "local": {"type": "local", "parallel": 2},
        "role-only": remote("a-cut1"),
        "good": remote("b-ok"),
        "cut-to-local": remote("c-cut4"),
        "cut-off": remote("d-cut4"),
        "tools-cut": remote("e-toolscut2"),
        "cut-to-provider": remote("f-cut4"),
        "plain-provider": remote("g-ok"),  # not configured as continuing answers: skipped
        "continuing-provider": remote("h-ok", continue_final_message=True),
    }
    models = {
        "role-then-good": {"targets": ["role-only", "good"]},
        "finish-locally": {"targets": ["cut-to-local", "local"], "continue_on_failure": True},
        "not-finished": {"targets": ["cut-off", "local"]},
        "tool-call-cut": {"targets": ["tools-cut", "local"], "continue_on_failure": True},
        "finish-on-provider": {"targets": ["cut-to-provider", "plain-provider", "continuing-provider"],
                               "continue_on_failure": True},
        "local-only": {"targets": ["local"]},
    }  # fmt: skip
    return {"targets": targets, "models": models, "api_keys": [{"key": KEY}]}


def configured(tmp_path_factory, name: str, config: dict) -> Server:
    """A gateway of its own, from `config` (the routing file)."""
    folder = tmp_path_factory.mktemp(name)
    (folder / "gateway.yaml").write_text(yaml.safe_dump(config))
    return start_server(folder, {"LLM_CONFIG": str(folder / "gateway.yaml")})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    server = configured(tmp_path_factory, "failover", failover_config(upstream))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return gateway.client(api_key=KEY)


def text_of(chunks: list) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def one_stream(chunks: list) -> None:
    """What a client may rely on in a stream, whichever targets made it: one id, created and model, one role chunk
    (the first), a finish reason on the last choice chunk only (the test server's streams send none)."""
    assert len({(chunk.id, chunk.created, chunk.model) for chunk in chunks}) == 1
    roles = [i for i, chunk in enumerate(chunks) if chunk.choices and chunk.choices[0].delta.role]
    assert roles == [0]
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert not any(finishes[:-1])


# ---- the first output, not the first event ------------------------------------------------------------------


def test_a_stream_that_dies_after_its_role_chunk_falls_back_invisibly(client, upstream):
    headers, chunks = stream_chunks(client, "role-then-good")
    assert upstream.hits["a-cut1"] == 1  # it was tried, sent its role chunk, and died
    assert headers["x-llm-target"] == "good"
    assert text_of(chunks) == "from b-ok upstream"
    one_stream(chunks)


def test_a_local_stream_is_held_until_its_first_output():
    """A local engine's first token may show nothing yet (part of a character, of a stop sequence): the stream (its
    role chunk first) is not answered until output comes, so a failure in between is an HTTP error that still falls
    back. (In process: the engines offer no way to fail on purpose.)"""
    from gateway.api.chat import _ChatReply
    from gateway.api.generation import produce

    async def deltas(fail: bool):
        yield 0, Delta(text="", tokens=1)  # a token held back
        if fail:
            raise EngineError("the engine died")
        yield 0, Delta(text="red", tokens=1, finish_reason="stop")

    async def answer(fail: bool):
        reply = _ChatReply("chatcmpl-1", 0, "m", prompt_tokens=3, choices=1)
        return await produce(reply, deltas(fail), stream=True, include_usage=False)

    async def chunks() -> list[str]:
        return [chunk async for chunk in await answer(fail=False)]

    with pytest.raises(EngineError):  # from the answer itself, before any chunk: the chain can still move on
        asyncio.run(answer(fail=True))
    assert len(asyncio.run(chunks())) == 3  # role, "red", finish


# ---- finishing a broken stream ------------------------------------------------------------------------------


def test_a_stream_cut_after_output_is_finished_by_the_local_engine(client, gateway):
    same = {"max_tokens": BUDGET, "temperature": 0, "extra_body": {"ignore_eos": True}}
    headers, chunks = stream_chunks(client, "finish-locally", messages=QUESTION,
                                    stream_options={"include_usage": True}, **same)  # fmt: skip
    assert headers["x-llm-target"] == "cut-to-local"  # sent with the first byte
    one_stream(chunks)
    partial = "from c-cut4"
    text = text_of(chunks)
    assert text.startswith(partial) and len(text) > len(partial)
    assert chunks[-2].choices[0].finish_reason == "length"  # the budget left after the cut, used up
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == BUDGET - SENT
    assert counter(gateway, "llm_fallbacks", from_target="cut-to-local", to_target="local") == 1
    line = access_line(gateway, "finish-locally")  # the key is charged what both targets generated
    assert line["target"] == "local" and line["completion_tokens"] == BUDGET

    # The same continuation asked of the local engine directly: the answer goes on from the partial text.
    extra = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    direct = client.chat.completions.create(
        model="local-only", messages=[*QUESTION, {"role": "assistant", "content": partial}], temperature=0,
        max_tokens=BUDGET - SENT, extra_body=extra,
    )  # fmt: skip
    assert text == partial + direct.choices[0].message.content
    # Its prompt is the conversation up to the assistant's opening, then the partial text: no end of turn, no new one.
    auth = {"Authorization": f"Bearer {KEY}"}
    opening = gateway.post("/tokenize", json={"model": "local-only", "messages": QUESTION}, headers=auth)
    words = gateway.post("/tokenize", json={"model": "local-only", "prompt": partial, "add_special_tokens": False},
                         headers=auth)  # fmt: skip
    assert direct.usage.prompt_tokens == opening.json()["count"] + words.json()["count"]


def test_a_provider_that_takes_continue_final_message_finishes_the_stream(client, upstream):
    _, chunks = stream_chunks(client, "finish-on-provider", messages=QUESTION, max_tokens=BUDGET)
    one_stream(chunks)
    assert text_of(chunks) == "from f-cut4" + "from h-ok upstream"
    assert upstream.hits["g-ok"] == 0  # cannot continue an answer: passed over
    sent = upstream.received["h-ok"]
    assert sent["messages"] == [*QUESTION, {"role": "assistant", "content": "from f-cut4"}]
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_tokens"] == BUDGET - SENT


@pytest.mark.parametrize(
    "model, extra",
    [("not-finished", {}),  # the model does not ask for it
     ("tool-call-cut", {"tools": TOOLS}),  # a tool call was under way
     ("finish-locally", {"n": 2})],  # several choices
)  # fmt: skip
def test_where_a_stream_cannot_be_finished_it_ends_with_the_error_event(client, model, extra):
    with pytest.raises(openai.APIError, match="target"):
        stream_text(client, model, messages=QUESTION, **extra)


def test_continue_final_message_follows_vllms_rules(client):
    ends_with_user = {"continue_final_message": True, "add_generation_prompt": False}
    for extra, param in [(ends_with_user, "continue_final_message"),
                         ({"continue_final_message": True}, "add_generation_prompt")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="local-only", messages=QUESTION, max_tokens=2, extra_body=extra)
        assert error.value.body["param"] == param
