"""The vLLM engine behind a pipe, for tests/engines/test_vllm_tools.py: run in vLLM's own virtualenv
(`python -m tests.engines.vllm_pipe`), it loads the default model's Hugging Face copy once, answers one JSON line
with one JSON line, and closes the engine at the end of its input."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from engines.base import EngineConfig, EngineError, SamplingParams, ToolCallConstraint
from scripts.fetch_model import MEMBER, default_models_dir

GGUF = default_models_dir() / Path(MEMBER).name


async def serve(replies) -> None:
    from engines.vllm import VllmEngine  # only where vLLM is installed (the tests import this module for GGUF)

    config = EngineConfig(model_path=str(GGUF), served_name="smollm2", context_length=2048, parallel=2,
                          options={"enforce_eager": True})  # fmt: skip
    engine = VllmEngine(config)
    await engine.load()
    send(replies, {"ready": True})
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            send(replies, await answer(engine, json.loads(line)))
    finally:
        await engine.close()


async def answer(engine, request: dict) -> dict:
    """{"encode": text} gets the text's token ids; {"messages", "params"} the text and finish generated for the
    chat, or the engine's error."""
    if "encode" in request:
        return {"ids": (await engine.encode_prompt(request["encode"])).token_ids}
    params = request["params"]
    if "tool_calls" in params:
        params["tool_calls"] = ToolCallConstraint(**params["tool_calls"])
    params["logit_bias"] = {int(token): bias for token, bias in params.get("logit_bias", {}).items()}
    try:
        prompt = await engine.render_chat(request["messages"])
        text, finish = "", None
        async for delta in engine.generate(prompt, SamplingParams(**params)):
            text, finish = text + delta.text, delta.finish_reason or finish
    except EngineError as exc:
        return {"error": {"type": type(exc).__name__, "message": exc.message, "param": exc.param}}
    return {"text": text, "finish_reason": finish}


def send(replies, message: dict) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()


if __name__ == "__main__":
    # Replies get the pipe to the tests alone: vLLM (and its engine process) log to stdout, sent to stderr here.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    asyncio.run(serve(replies))
