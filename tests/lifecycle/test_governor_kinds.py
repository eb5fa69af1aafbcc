"""One memory governor over every kind of model, on running gateways: chat models and the embedding model
all-minilm-l6-v2 (transformers) share one budget and one least-recently-used order. Under a budget that holds two
of three: on a CPU the embedding model is unloaded like a chat model (the warm pool is off there); on a GPU it moves
to the warm pool in host RAM and back on its next request, with the same embeddings; a chat model is unloaded; and
a model serving a long request is never freed (507).

The GPU test needs CUDA, nvidia-ml-py (the `cuda` extra) and the transformers engine; elsewhere it skips:
    .venv/bin/python -m pytest -p no:cacheprovider tests/lifecycle/test_governor_kinds.py -k gpu -v
On a machine without the models, LLM_TEST_CHAT_HF_DIR and LLM_TEST_EMBEDDER_DIR name stand-ins of the same shapes
(a directory named all-minilm-l6-v2 for the embedding model).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.models import devices
from tests.conftest import ENGINES, require, start_server
from tests.lifecycle.test_memory_governor import long_answer
from tests.lifecycle.test_model_lifecycle import chat, model_file

MiB = 1 << 20
EMBEDDER = "all-minilm-l6-v2"  # ~87 MiB of fp32 weights
# The default chat model as transformers reads it (bf16, ~257 MiB): the directory `make models-hf` writes.
CHAT_HF_DIR = Path(os.environ.get("LLM_TEST_CHAT_HF_DIR") or model_file().with_name(model_file().stem + "-hf"))
EMBEDDER_SOURCE = os.environ.get("LLM_TEST_EMBEDDER_DIR") or EMBEDDER  # a registry name, or a directory
TRANSFORMERS = ENGINES["transformers"]


def kinds_config(tmp_path: Path, source: Path, engine: str, contexts: dict[str, int]) -> str:
    """A routing config: one chat target per name, each a link to `source` (so each has a name of its own), and the
    embedding model on the transformers engine under its own name."""
    targets, models = {}, {}
    for name, context in contexts.items():
        link = tmp_path / (name + source.suffix)
        link.symlink_to(source)
        targets[name] = {"type": "local", "engine": engine, "model": str(link), "context_length": context,
                         "parallel": 1, "embedding": False}  # fmt: skip
        models[name] = {"targets": [name]}
    targets["embedder"] = {"type": "local", "engine": "transformers", "model": EMBEDDER_SOURCE,
                           "options": {"task": "embed"}}  # fmt: skip
    models[EMBEDDER] = {"targets": ["embedder"]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"targets": targets, "models": models}, sort_keys=False))  # the first is the default
    return str(path)


def placement(server) -> dict[str, tuple[str, str, str]]:
    """Each model's kind, state and location, as /health shows them."""
    return {m["model"]: (m["kind"], m["state"], m["location"]) for m in server.health()["models"]}


def embed(server) -> list[float]:
    response = server.post("/v1/embeddings", json={"model": EMBEDDER, "input": "where the weights live"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["embedding"]


def counted(server, name: str, **labels: str) -> float:
    """A counter's value for the series with these labels (0 before its first increment)."""
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_one_lru_across_kinds_and_on_a_cpu_the_embedding_model_is_unloaded_not_kept_warm(tmp_path):
    require(TRANSFORMERS)
    # ~98 MiB per chat model (a 256-token cache; estimated 102 MiB), ~87 MiB for the embedding model: 250 MiB holds
    # two of the three, whichever two. LLM_WARM_POOL_MB is set, and ignored on a CPU.
    config = kinds_config(tmp_path, model_file(), "llamacpp", {"chat-a": 256, "chat-b": 256})
    env = {"LLM_CONFIG": config, "LLM_MEMORY_BUDGET_MB": "250", "LLM_WARM_POOL_MB": "512", **TRANSFORMERS.env}
    server = start_server(tmp_path, env)
    try:
        first = embed(server)  # loads beside chat-a, the default model
        assert placement(server) == {"chat-a": ("chat", "ready", "cpu"), "chat-b": ("chat", "unloaded", "unloaded"),
                                     EMBEDDER: ("embedding", "ready", "cpu")}  # fmt: skip
        assert chat(server, "chat-a").status_code == 200  # chat-a is now more recent than the embedding model
        assert chat(server, "chat-b").status_code == 200  # room for chat-b: the embedding model leaves, unloaded
        assert placement(server) == {"chat-a": ("chat", "ready", "cpu"), "chat-b": ("chat", "ready", "cpu"),
                                     EMBEDDER: ("embedding", "unloaded", "unloaded")}  # fmt: skip
        governor = server.health()["governor"]
        assert governor["device"] == "cpu" and governor["warm_pool"] == {"budget_bytes": 0, "used_bytes": 0,
                                                                         "models": {}}  # fmt: skip
        assert counted(server, "llm_model_events_total", model=EMBEDDER, event="unload_memory") == 1
        assert counted(server, "llm_model_offloads_total", model=EMBEDDER) == 0

        assert embed(server) == pytest.approx(first, abs=1e-6)  # loads again; chat-a, now the least recent, leaves
        assert placement(server) == {"chat-a": ("chat", "unloaded", "unloaded"), "chat-b": ("chat", "ready", "cpu"),
                                     EMBEDDER: ("embedding", "ready", "cpu")}  # fmt: skip
        assert counted(server, "llm_model_events_total", model="chat-a", event="unload_memory") == 1
        assert counted(server, "llm_model_events_total", model=EMBEDDER, event="load") == 2
        governor = server.health()["governor"]
        assert set(governor["models"]) == {"chat-b", EMBEDDER} and governor["used_bytes"] <= 250 * MiB

        # Unloading and pre-warming work for the embedding model as for a chat model, and say where it is.
        cold = server.post(f"/v1/models/{EMBEDDER}/unload").json()
        assert (cold["state"], cold["location"], cold["memory_bytes"]) == ("unloaded", "unloaded", 0)
        warm = server.post(f"/v1/models/{EMBEDDER}/load", timeout=120).json()
        assert (warm["state"], warm["location"]) == ("ready", "cpu") and 80 * MiB < warm["memory_bytes"] < 100 * MiB
    finally:
        server.stop()


def test_an_embedding_model_gets_507_while_the_model_it_would_free_serves_a_long_request(tmp_path):
    require(TRANSFORMERS)
    # chat-a: ~126 MiB (a 1024-token cache, room for a long answer); the embedding model needs ~87 MiB; 200 holds one.
    config = kinds_config(tmp_path, model_file(), "llamacpp", {"chat-a": 1024})
    server = start_server(tmp_path, {"LLM_CONFIG": config, "LLM_MEMORY_BUDGET_MB": "200", **TRANSFORMERS.env})
    try:
        with long_answer(server, "chat-a"):
            refused = server.post("/v1/embeddings", json={"model": EMBEDDER, "input": "hi"}, timeout=120)
            assert refused.status_code == 507, refused.text
            error = refused.json()["error"]
            assert (error["code"], error["param"]) == ("insufficient_memory", "model")
            assert "(chat-a)" in error["message"] and "MB short" in error["message"]
            assert placement(server)[EMBEDDER] == ("embedding", "unloaded", "unloaded")
        embed(server)  # chat-a is idle now, so it makes room
        assert placement(server) == {"chat-a": ("chat", "unloaded", "unloaded"),
                                     EMBEDDER: ("embedding", "ready", "cpu")}  # fmt: skip
    finally:
        server.stop()


def gpu_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if devices.gpu() is None:
        return "NVML does not see the GPU (install the cuda extra, nvidia-ml-py): the governor would budget RAM"
    return None if CHAT_HF_DIR.is_dir() else f"{CHAT_HF_DIR} is missing: run `make models-hf`"


def test_on_a_gpu_the_embedding_model_moves_to_the_warm_pool_and_back_with_the_same_embeddings(tmp_path):
    require(TRANSFORMERS)
    if reason := gpu_missing():
        pytest.skip(reason)
    # On CUDA, transformers counts the weights: ~257 MiB per chat model (bf16), ~87 MiB for the embedding model.
    # 560 MiB holds both chat models or one and the embedding model, never all three.
    config = kinds_config(tmp_path, CHAT_HF_DIR, "transformers", {"chat-a": 256, "chat-b": 256})
    env = {"LLM_CONFIG": config, "LLM_ENGINE": "transformers", "LLM_MEMORY_BUDGET_MB": "560",
           "LLM_WARM_POOL_MB": "512", **TRANSFORMERS.env}  # fmt: skip
    server = start_server(tmp_path, env, engine=TRANSFORMERS)
    try:
        first = embed(server)
        assert placement(server)[EMBEDDER] == ("embedding", "ready", "gpu")
        assert chat(server, "chat-a").status_code == 200
        assert chat(server, "chat-b").status_code == 200  # room for chat-b: the embedding model goes to the pool
        assert placement(server) == {"chat-a": ("chat", "ready", "gpu"), "chat-b": ("chat", "ready", "gpu"),
                                     EMBEDDER: ("embedding", "offloaded", "cpu_warm")}  # fmt: skip
        governor = server.health()["governor"]
        assert governor["device"].startswith("cuda") and governor["budget_bytes"] == 560 * MiB
        assert set(governor["models"]) == {"chat-a", "chat-b"}  # it counts 0 against the GPU's budget...
        warm = governor["warm_pool"]  # ...and its bytes against the pool's
        assert warm["budget_bytes"] == 512 * MiB and set(warm["models"]) == {EMBEDDER}
        assert 80 * MiB < warm["used_bytes"] == warm["models"][EMBEDDER] < 100 * MiB
        assert counted(server, "llm_memory_warm_pool_used_bytes") == warm["used_bytes"]
        assert counted(server, "llm_model_offloads_total", model=EMBEDDER, reason="memory") == 1

        # The next request moves it back; chat-a, the least recently used, is unloaded (a chat model is never warm).
        assert embed(server) == pytest.approx(first, abs=1e-5)
        assert placement(server) == {"chat-a": ("chat", "unloaded", "unloaded"), "chat-b": ("chat", "ready", "gpu"),
                                     EMBEDDER: ("embedding", "ready", "gpu")}  # fmt: skip
        assert counted(server, "llm_model_restores_total", model=EMBEDDER) == 1
        assert counted(server, "llm_model_events_total", model=EMBEDDER, event="load") == 1  # restored, not reloaded
        assert counted(server, "llm_model_events_total", model="chat-a", event="unload_memory") == 1
        assert server.health()["governor"]["warm_pool"]["used_bytes"] == 0

        # Offloaded again, a pre-warm moves it back too and says where it is.
        assert chat(server, "chat-b").status_code == 200
        assert chat(server, "chat-a").status_code == 200
        assert placement(server)[EMBEDDER] == ("embedding", "offloaded", "cpu_warm")
        state = server.post(f"/v1/models/{EMBEDDER}/load", timeout=120).json()
        assert (state["state"], state["location"]) == ("ready", "gpu") and state["memory_bytes"] > 80 * MiB
        assert counted(server, "llm_model_restores_total", model=EMBEDDER) == 2
        assert embed(server) == pytest.approx(first, abs=1e-5)
    finally:
        server.stop()

