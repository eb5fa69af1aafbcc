"""Several local models under a tiny memory budget (the default GGUF served under several names): the
least recently used idle model is evicted, a model serving a request never is, and 507 says why."""

from __future__ import annotations

import threading

import httpx
import yaml

from tests.conftest import start_server
from tests.lifecycle.test_model_lifecycle import chat, model_file, model_state

MiB = 1 << 20


def models_config(tmp_path, contexts: dict[str, int]) -> str:
    """A routing config with one local target per name, each a link to the same GGUF file."""
    targets, models = {}, {}
    for name, context in contexts.items():
        link = tmp_path / f"{name}.gguf"
        link.symlink_to(model_file())
        targets[name] = {"type": "local", "model": str(link), "context_length": context, "parallel": 1,
                         "embedding": False}  # fmt: skip
        models[name] = {"targets": [name]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"targets": targets, "models": models}))
    return str(path)


def unloads(server, model: str, reason: str) -> float:
    line = f'llm_model_events_total{{event="unload_{reason}",model="{model}"}} '
    text = httpx.get(server.base_url + "/metrics").text
    return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0)


def test_least_recently_used_idle_model_is_evicted(tmp_path):
    # ~98 MiB each (weights and a 256-token KV cache); 250 MiB holds two of the three.
    config = models_config(tmp_path, {"model-a": 256, "model-b": 256, "model-c": 256})
    server = start_server(tmp_path, {"LLM_CONFIG": config, "LLM_MEMORY_BUDGET_MB": "250"})
    try:
        health = server.health()
        assert [model_state(server, m) for m in ("model-a", "model-b", "model-c")] == ["ready", "unloaded", "unloaded"]
        assert health["governor"]["budget_bytes"] == 250 * MiB
        assert chat(server, "model-b").status_code == 200  # loads on first use, both fit
        assert chat(server, "model-a").status_code == 200  # a is now the most recently used
        assert chat(server, "model-c").status_code == 200  # no room for c: b (least recent) leaves
        states = {m: model_state(server, m) for m in ("model-a", "model-b", "model-c")}
        assert states == {"model-a": "ready", "model-b": "unloaded", "model-c": "ready"}
        assert unloads(server, "model-b", "memory") == 1 and unloads(server, "model-a", "memory") == 0
        governor = server.health()["governor"]
        assert set(governor["models"]) == {"model-a", "model-c"}
        assert governor["used_bytes"] == sum(governor["models"].values()) <= 250 * MiB
    finally:
        server.stop()


def test_a_model_serving_a_request_is_never_evicted(tmp_path):
    # a: ~126 MiB (1024-token cache, room for a long answer); b needs ~92 MiB; 200 MiB holds one.
    config = models_config(tmp_path, {"model-a": 1024, "model-b": 256})
    server = start_server(tmp_path, {"LLM_CONFIG": config, "LLM_MEMORY_BUDGET_MB": "200"})
    try:
        streaming = threading.Event()
        release = threading.Event()

        def long_answer():
            body = {"model": "model-a", "messages": [{"role": "user", "content": "Tell a long story."}],
                    "max_tokens": 900, "stream": True, "ignore_eos": True}  # fmt: skip
            with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=300) as response:
                for _ in response.iter_lines():
                    streaming.set()
                    if release.is_set():
                        return  # leaving closes the stream, which cancels the generation

        reader = threading.Thread(target=long_answer)
        reader.start()
        assert streaming.wait(60)
        refused = chat(server, "model-b")
        assert refused.status_code == 507
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory" and "model-a" in error["message"]
        assert "MB short" in error["message"] and model_state(server, "model-a") == "ready"
        release.set()
        reader.join(120)
        assert chat(server, "model-b").status_code == 200  # a is idle now, so it makes room
        assert model_state(server, "model-a") == "unloaded" and unloads(server, "model-a", "memory") == 1
    finally:
        server.stop()
