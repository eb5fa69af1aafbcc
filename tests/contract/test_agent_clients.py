"""The agent frameworks users point at the gateway, run as their users run them against the local model: LangChain
(`bind_tools`, `with_structured_output`), the openai-agents SDK, instructor in TOOLS mode and pydantic-ai."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from tests.conftest import MODEL

API_KEY = "unused"  # the test gateway has no keys; the clients insist on one
QUESTION = "What is the weather in Paris, in celsius?"


class Weather(BaseModel):
    """The weather report to fill in."""

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


def get_weather(city: Annotated[str, Field(max_length=30)], unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"Sunny and 21 degrees {unit} in {city}."


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.v1, api_key=API_KEY, temperature=0, max_tokens=120)
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(QUESTION)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert {"city", "unit"} <= set(call["args"]) and call["args"]["unit"] in ("celsius", "fahrenheit")
    report = llm.with_structured_output(Weather, method="function_calling").invoke(QUESTION)
    assert isinstance(report, Weather)


def test_openai_agents_runs_a_function_tool(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no trace upload to OpenAI from a test
    ran: list[dict] = []

    @function_tool
    def weather(city: Annotated[str, Field(max_length=30)]) -> str:
        """The current weather in a city."""
        ran.append({"city": city})
        return f"Sunny in {city}."

    model = OpenAIChatCompletionsModel(model=MODEL, openai_client=AsyncOpenAI(base_url=server.v1, api_key=API_KEY))
    agent = Agent(
        name="forecaster", instructions="Answer with the weather tool.", model=model, tools=[weather],
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=80),
    )  # fmt: skip
    result = Runner.run_sync(agent, QUESTION, max_turns=4)
    assert ran and all(isinstance(call["city"], str) for call in ran)  # the tool really ran
    assert isinstance(result.final_output, str)


def test_instructor_tools_mode_fills_a_model(server):
    import instructor

    client = instructor.from_openai(OpenAI(base_url=server.v1, api_key=API_KEY), mode=instructor.Mode.TOOLS)
    report = client.chat.completions.create(
        model=MODEL, response_model=Weather, messages=[{"role": "user", "content": QUESTION}], max_tokens=120,
        temperature=0, max_retries=0,
    )  # fmt: skip
    assert isinstance(report, Weather)


def test_pydantic_ai_returns_a_structured_output(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=server.v1, api_key=API_KEY))
    agent = Agent(model, output_type=Weather, model_settings={"temperature": 0, "max_tokens": 120})
    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, Weather)


@pytest.fixture(autouse=True)
def _no_openai_environment(monkeypatch):
    """The clients read OPENAI_* variables; a developer's own must not send these tests elsewhere."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
