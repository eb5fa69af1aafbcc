"""In-process inference engines, chosen by name (`LLM_ENGINE`).

Engines import heavy libraries (llama.cpp, torch, vLLM), so the registry names a module path and
imports it only when that engine is asked for.
"""

from __future__ import annotations

import importlib

from engines.base import Engine, EngineConfig

ENGINES: dict[str, str] = {
    "llamacpp": "engines.llamacpp:LlamaCppEngine",
    "transformers": "engines.transformers:TransformersEngine",
    "vllm": "engines.vllm:VllmEngine",
}

# The embedding model each engine serves beside its chat model (LLM_EMBEDDING_MODEL overrides it);
# llama.cpp embeds with the chat model itself.
DEFAULT_EMBEDDING_MODELS: dict[str, str] = {
    "transformers": "all-minilm-l6-v2",
    "vllm": "all-minilm-l6-v2",
}


def create_engine(name: str, config: EngineConfig) -> Engine:
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(sorted(ENGINES))}") from None
    module_name, class_name = target.split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class(config)
