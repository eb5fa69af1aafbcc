"""A model that thinks: with a template whose generation prompt opens a think block (as reasoning templates do when
thinking is on), the answer's thinking comes back as `reasoning_content`, never in `content`; `reasoning_effort:
"none"` turns thinking off through the template's `enable_thinking`, and the answer is plain content again."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, require, start_server
from tests.engines.test_hf_engines import HF_ENGINES, base_model_copy

# Qwen 3's switch: thinking on, the model writes inside <think> first; off, the template closes an empty block.
THINKING = """{%- for message in messages -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif -%}
{%- endif -%}"""
ASK = [{"role": "user", "content": "Is the sky blue?"}]


@pytest.fixture(scope="module", params=HF_ENGINES.args[1], ids=lambda engine: engine.name)
def thinking_server(request, tmp_path_factory):
    engine = request.param
    require(engine)
    folder = tmp_path_factory.mktemp(f"thinking-{engine.name}")
    model = base_model_copy(folder / "smollm2-thinking")
    (model / "chat_template.jinja").write_text(THINKING)
    env = {"LLM_MODEL": str(model), "LLM_SERVED_MODEL_NAME": MODEL, "LLM_EMBEDDING_MODEL": "none"}
    server = start_server(folder, env, engine=engine)
    yield server
    server.stop()


def test_thinking_goes_to_reasoning_content_and_none_turns_it_off(thinking_server):
    client = thinking_server.client()
    kwargs = dict(model=MODEL, messages=ASK, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    thinking = client.chat.completions.create(**kwargs).choices[0].message
    assert thinking.model_extra["reasoning_content"] and not thinking.content
    assert "<think>" not in thinking.model_extra["reasoning_content"]
    plain = client.chat.completions.create(reasoning_effort="none", **kwargs).choices[0].message
    assert plain.content and "reasoning_content" not in (plain.model_extra or {})
    assert "think>" not in plain.content

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [choice.delta for chunk in chunks for choice in chunk.choices]
    streamed = "".join((delta.model_extra or {}).get("reasoning_content") or "" for delta in deltas)
    assert streamed == thinking.model_extra["reasoning_content"]
    assert not any(delta.content for delta in deltas)
