"""OpenAI's Responses API on the local engines, through the real openai SDK and the openai-agents SDK: responses,
their stream of typed events, conversations continued by `previous_response_id`, function tools, structured output,
the stored responses (per API key, across a restart), and the fallback chain: to a provider that speaks Chat
Completions, and one that speaks Responses."""

from __future__ import annotations

import json
from typing import Annotated

import jsonschema
import openai
import pytest
import yaml
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from tests.conftest import MODEL, start_server
from tests.upstream import Upstream

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": WEATHER_SCHEMA, "strict": True}  # fmt: skip
IMAGE_URL = "https://example.com/a.png"
# A message item's events, in OpenAI's order (the deltas repeat).
MESSAGE_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                  "response.output_text.done", "response.content_part.done", "response.output_item.done"]  # fmt: skip


class City(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


def _not_found(call) -> dict:
    """The error of a call that must not find its response: OpenAI's 404 shape."""
    with pytest.raises(openai.NotFoundError) as caught:
        call()
    return caught.value.body


def test_a_response_is_stored_listed_and_deleted(client):
    question = "What is the capital of France?"
    response = client.responses.create(model=MODEL, instructions="Answer in one short sentence.", input=question,
                                       max_output_tokens=30, temperature=0, metadata={"case": "plain"})  # fmt: skip
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.output_text and response.status in ("completed", "incomplete")
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 30
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.instructions == "Answer in one short sentence." and response.metadata == {"case": "plain"}
    assert response.store is True and response.temperature == 0 and response.max_output_tokens == 30

    assert client.responses.retrieve(response.id).output_text == response.output_text
    [item] = client.responses.input_items.list(response.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == question
    client.responses.delete(response.id)
    body = _not_found(lambda: client.responses.retrieve(response.id))
    assert body["type"] == "invalid_request_error" and response.id in body["message"]
    _not_found(lambda: client.responses.delete(response.id))


def test_a_stream_sends_typed_events_in_order_and_is_stored(server, client):
    # The SDK's stream helper checks each event against the response it builds from them, and wants it completed.
    ask = "Say hello in one word."
    with client.responses.stream(model=MODEL, input=ask, max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{final.status}"
    assert [k for i, k in enumerate(kinds[2:-1]) if k != kinds[i + 1]] == MESSAGE_EVENTS  # runs of one kind
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == final.output_text == client.responses.retrieve(final.id).output_text
    assert final.usage.output_tokens > 0

    # On the wire: events named by their type, and no "[DONE]".
    raw = server.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 3, "stream": True})
    frames = [frame.split("\n") for frame in raw.text.strip().split("\n\n") if not frame.startswith(":")]
    assert all(name == f"event: {json.loads(data[6:])['type']}" for name, data in frames)
    assert "[DONE]" not in raw.text and frames[-1][0] in ("event: response.completed", "event: response.incomplete")


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="My name is Zorblax.", max_output_tokens=20, temperature=0)
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=20, temperature=0)  # fmt: skip
    # The second prompt holds the first turn: its question and its answer.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items[1].content[0].text == first.output_text
    [newest] = client.responses.input_items.list(second.id, limit=1).data  # newest first, as OpenAI
    assert newest.content[0].text == "What is my name?"
    body = _not_found(lambda: client.responses.create(model=MODEL, previous_response_id="resp_unknown", input="Hi"))
    assert body["param"] == "previous_response_id"


def test_a_function_call_and_its_output_round_trip(client):
    ask = "What is the weather in Paris, in celsius?"
    called = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=100, temperature=0)  # fmt: skip
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    assert called.status == "completed" and called.tool_choice == "required"

    answered = client.responses.create(
        model=MODEL, previous_response_id=called.id, tools=[WEATHER], max_output_tokens=20, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C."}],
    )  # fmt: skip
    # The second prompt holds the tools, the question, the call and its output.
    assert answered.output and answered.usage.input_tokens > called.usage.input_tokens + called.usage.output_tokens
    for item in answered.output:
        assert item.type == "message" or jsonschema.validate(json.loads(item.arguments), WEATHER_SCHEMA) is None
    assert [item.call_id for item in client.responses.input_items.list(answered.id).data[:2]] == [call.call_id] * 2


def test_a_json_schema_format_is_followed(client):
    parsed = client.responses.parse(model=MODEL, input="Name a city in Italy.", text_format=City,
                                    max_output_tokens=60, temperature=0)  # fmt: skip
    assert isinstance(parsed.output_parsed, City)
    jsonschema.validate(json.loads(parsed.output_text), City.model_json_schema())


def test_a_cut_answer_is_incomplete_and_bad_requests_name_their_field(server, client):
    cut = client.responses.create(model=MODEL, input="Count from one to fifty.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3

    for body, param in [
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0]"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "Hi", "truncation": "auto"}, "truncation"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "?"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                 {"type": "input_image", "image_url": IMAGE_URL}]}]},
         "input[0].content[1]"),  # a local model reads no images: no other target here
    ]:  # fmt: skip
        reply = server.post("/v1/responses", json={"model": MODEL, **body})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.input_items.list(cut.id, limit=101)
    assert caught.value.body["param"] == "limit"


def test_the_agents_sdk_default_model_runs_a_function_tool(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no trace upload to OpenAI from a test
    ran: list[str] = []

    @function_tool
    def weather(city: Annotated[str, Field(max_length=30)]) -> str:
        """The current weather in a city."""
        ran.append(city)
        return f"Sunny in {city}."

    model = OpenAIResponsesModel(model=MODEL, openai_client=AsyncOpenAI(base_url=server.v1, api_key="unused"))
    # The run ends with the tool's result: a tiny model's free-text turn after it may run past any budget.
    agent = Agent(
        name="forecaster", instructions="Answer with the weather tool.", model=model, tools=[weather],
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=100),
        tool_use_behavior="stop_on_first_tool",
    )  # fmt: skip
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert ran and all(isinstance(city, str) for city in ran)  # the tool really ran
    assert result.final_output == f"Sunny in {ran[0]}."


def test_responses_stay_with_their_key_across_a_restart_and_fall_back(tmp_path, upstream: Upstream):
    """One key's responses are another's 404s, and outlive the gateway. A request a local model cannot serve (an
    image) goes on to a provider that speaks Chat Completions; a stream cut after it began ends failed; a provider
    that speaks Responses gets the conversation itself, and its responses are stored here."""
    config = tmp_path / "routing.yaml"
    config.write_text(yaml.safe_dump({
        "targets": {"local": {"type": "local"},
                    "provider": {"type": "openai", "base_url": upstream.base_url("provider-ok"), "model": "up"},
                    "cutter": {"type": "openai", "base_url": upstream.base_url("cutter-cut3"), "model": "up"},
                    "native": {"type": "openai", "base_url": upstream.base_url("native-responses"), "model": "up",
                               "responses_api": True}},
        "models": {MODEL: {"targets": ["local"]}, "with-fallback": {"targets": ["local", "provider"]},
                   "cut": {"targets": ["cutter"]}, "native": {"targets": ["native"]}},
    }))  # fmt: skip
    env = {"LLM_CONFIG": str(config), "LLM_API_KEYS": "sk-first,sk-second", "LLM_DATA_DIR": str(tmp_path / "data")}
    server = start_server(tmp_path, env)
    try:
        first, second = server.client(api_key="sk-first"), server.client(api_key="sk-second")
        kept = first.responses.create(model=MODEL, input="Hi", max_output_tokens=5)
        for call in (second.responses.retrieve, second.responses.delete, second.responses.input_items.list):
            _not_found(lambda: call(kept.id))
        _not_found(lambda: second.responses.create(model=MODEL, previous_response_id=kept.id, input="Hi"))

        parts = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": IMAGE_URL}]
        image = [{"role": "user", "content": parts}]
        relayed = first.responses.create(model="with-fallback", input=image, max_output_tokens=20)
        assert "from provider-ok" in relayed.output_text and relayed.usage.output_tokens > 0
        assert upstream.received["provider-ok"]["messages"][0]["content"][1]["type"] == "image_url"
        with first.responses.stream(model="with-fallback", input=image, max_output_tokens=20) as stream:
            assert "from provider-ok" in stream.get_final_response().output_text
        *_, last = first.responses.create(model="cut", input="Hi", stream=True)
        assert last.type == "response.failed" and last.response.error.code == "server_error"

        native = first.responses.create(model="native", input="Hi")
        assert native.output_text == "from native-responses" and native.store is True
        again = first.responses.create(model="native", input="And now?", previous_response_id=native.id, stream=True)
        assert list(again)[-1].response.previous_response_id == native.id
        sent = upstream.received["native-responses"]
        assert sent["store"] is False and "previous_response_id" not in sent
        assert [item["role"] for item in sent["input"]] == ["user", "assistant", "user"]
    finally:
        server.stop()
    server = start_server(tmp_path, env)
    try:
        assert server.client(api_key="sk-first").responses.retrieve(kept.id).output_text == kept.output_text
        _not_found(lambda: server.client(api_key="sk-second").responses.retrieve(kept.id))
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch):
    """The clients read OPENAI_* variables; a developer's own must not send these tests elsewhere."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
