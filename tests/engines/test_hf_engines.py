"""What the engines that load Hugging Face models (transformers, vLLM) refuse, at start-up and at load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts.fetch_model import MEMBER, default_models_dir
from tests.conftest import ENGINES, LOAD_WITHIN, require, skip_unless_ci, start_server, wait_for

TRANSFORMERS, VLLM = ENGINES["transformers"], ENGINES["vllm"]
HF_ENGINES = pytest.mark.parametrize("engine", [TRANSFORMERS, VLLM], ids=lambda engine: engine.name)


def test_int8_without_a_gpu_stops_start_up(tmp_path):
    require(TRANSFORMERS)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: int8 loads here")
    with pytest.raises(RuntimeError, match="LLM_QUANTIZATION=int8 needs bitsandbytes on a CUDA GPU"):
        start_server(tmp_path, {"LLM_QUANTIZATION": "int8"}, engine=TRANSFORMERS)


def base_model_copy(target: Path) -> Path:
    """The converted default model without its chat template, as a base (not instruction-tuned) model is."""
    source = default_models_dir() / (Path(MEMBER).stem + "-hf")
    if not (source / "config.json").exists():
        skip_unless_ci(f"{source} is missing: run `make models-hf`")
    target.mkdir()
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            (target / item.name).symlink_to(item)  # the weights are large and only read
        elif item.name != "chat_template.jinja":
            shutil.copy(item, target)
    assert "chat_template" not in (target / "tokenizer_config.json").read_text()
    return target


@HF_ENGINES
def test_model_without_chat_template_is_refused_at_load(tmp_path, engine):
    require(engine)
    model = base_model_copy(tmp_path / "base-model")
    server = start_server(tmp_path, {"LLM_MODEL": str(model), "LLM_EMBEDDING_MODEL": "none"}, wait_ready=False,
                          engine=engine)  # fmt: skip
    try:
        # The check comes right after the tokenizer loads.
        health = wait_for(lambda: (h := server.health())["status"] != "loading" and h, LOAD_WITHIN, "still loading")
        assert health["models"][0]["state"] == "failed", health
        assert "has no chat template: only instruction-tuned models can serve chat" in health["models"][0]["error"]
        body = {"model": "base-model", "messages": [{"role": "user", "content": "hi"}]}
        response = server.post("/v1/chat/completions", json=body)
        assert response.status_code == 503
        assert "has no chat template" in response.json()["error"]["message"]
    finally:
        server.stop()
