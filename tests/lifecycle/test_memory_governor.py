"""The memory governor on running gateways. Under a tiny budget, several local models (the default GGUF served
under several names): the least recently used idle model is evicted, a model serving a request never is, and 507
says why. Under each pressure level, an idle model leaves after that level's idle time."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import yaml

from tests.conftest import MODEL, start_server, wait_for
from tests.lifecycle.test_model_lifecycle import SMALL, chat, model_file

MiB = 1 << 20
# Budgets that put the default model with SMALL settings (~98 MiB: weights and a 256-token KV cache) at each
# pressure level: ~70 %, ~85 %, ~93 %. Its load needs room for the registry's estimate (0.1 GiB) too. Critical is
# started last and used first: its model leaves 5 s after its load, longer than a start-up on a loaded machine.
PRESSURE_BUDGETS_MIB = {"moderate": 140, "high": 115, "critical": 105}


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
    text = server.get("/metrics").text
    return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0)


@contextlib.contextmanager
def long_answer(server, model: str):
    """Holds `model` busy with a long streamed answer while the block runs; leaving closes the stream, which cancels
    the generation."""
    streaming, release = threading.Event(), threading.Event()

    def read():
        body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900,
                "stream": True, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=300) as response:
            for _ in response.iter_lines():
                streaming.set()
                if release.is_set():
                    return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert streaming.wait(60)
        yield
    finally:
        release.set()
        reader.join(120)


def test_least_recently_used_idle_model_is_evicted(tmp_path):
    # ~98 MiB each (weights and a 256-token KV cache); 250 MiB holds two of the three.
    config = models_config(tmp_path, {"model-a": 256, "model-b": 256, "model-c": 256})
    server = start_server(tmp_path, {"LLM_CONFIG": config, "LLM_MEMORY_BUDGET_MB": "250"})
    try:
        health = server.health()
        assert [server.model_state(m) for m in ("model-a", "model-b", "model-c")] == ["ready", "unloaded", "unloaded"]
        assert [(m["kind"], m["location"]) for m in health["models"]] == [("chat", "cpu"), *[("chat", "unloaded")] * 2]
        assert health["governor"]["budget_bytes"] == 250 * MiB
        assert chat(server, "model-b").status_code == 200  # loads on first use, both fit
        assert chat(server, "model-a").status_code == 200  # a is now the most recently used
        assert chat(server, "model-c").status_code == 200  # no room for c: b (least recent) leaves
        states = {m: server.model_state(m) for m in ("model-a", "model-b", "model-c")}
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
        with long_answer(server, "model-a"):
            refused = chat(server, "model-b")
            assert refused.status_code == 507
            error = refused.json()["error"]
            assert error["code"] == "insufficient_memory" and "model-a" in error["message"]
            assert "MB short" in error["message"] and server.model_state("model-a") == "ready"
        assert chat(server, "model-b").status_code == 200  # a is idle now, so it makes room
        assert server.model_state("model-a") == "unloaded" and unloads(server, "model-a", "memory") == 1
    finally:
        server.stop()


def test_each_pressure_level_unloads_an_idle_model_after_its_own_idle_time(tmp_path):
    """One model idles on three gateways whose budgets put it at critical, high and moderate pressure: it leaves
    after 5 s at critical and 30 s at high, and stays at moderate (120 s; LLM_UNLOAD_AFTER_SECONDS is 300)."""
    servers = {level: start_server(tmp_path, {"LLM_MEMORY_BUDGET_MB": str(mib), **SMALL})
               for level, mib in PRESSURE_BUDGETS_MIB.items()}  # fmt: skip
    try:
        idle_from, unloaded_after = {}, {}
        for level, server in reversed(servers.items()):  # the last started first
            assert server.health()["governor"]["pressure"] == level, server.health()["governor"]
            assert chat(server).status_code == 200
            idle_from[level] = time.monotonic()  # the model's idle clock started a moment before

        def high_unloaded() -> bool:
            for level, server in servers.items():
                if level not in unloaded_after and server.model_state() == "unloaded":
                    unloaded_after[level] = time.monotonic() - idle_from[level]
            return "high" in unloaded_after

        wait_for(high_unloaded, 60, lambda: f"unloaded after (s): {unloaded_after}", interval=0.2)
        assert 4 < unloaded_after["critical"] < 15, unloaded_after  # 5 s, and a sweep every second
        assert 29 < unloaded_after["high"], unloaded_after
        assert "moderate" not in unloaded_after and servers["moderate"].model_state() == "ready"
        for level in ("critical", "high"):
            assert unloads(servers[level], MODEL, f"pressure_{level}") == 1
            governor = servers[level].health()["governor"]
            assert (governor["pressure"], governor["used_bytes"]) == ("none", 0)
    finally:
        for server in servers.values():
            server.stop()
