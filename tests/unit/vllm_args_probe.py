"""Run in vLLM's virtualenv by tests/unit/test_vllm_parallel.py (`python -m tests.unit.vllm_args_probe MODEL_DIR`):
prints as one JSON line the parallelism of the AsyncEngineArgs the vLLM engine builds from the LLM_* settings in
its environment, from a target's own options, from no settings at all, and vLLM's own defaults."""

from __future__ import annotations

import json
import os
import sys

import vllm

from engines.vllm.engine import PARALLEL_OPTIONS, VllmEngine
from gateway.app import engine_config
from gateway.models.registry import ResolvedModel
from gateway.routing.config import LocalTargetConfig
from gateway.settings import Settings


def parallelism(model: str, options: dict) -> dict:
    """What the engine asks vLLM for, given the environment's settings and a local target's `options`."""
    target = LocalTargetConfig(type="local", options=options)
    config = engine_config(Settings(), target, ResolvedModel(model, "probe", None))
    args = VllmEngine(config)._engine_args(model)
    return {name: getattr(args, name) for name in PARALLEL_OPTIONS}


def main() -> None:
    model = sys.argv[1]
    answers = {
        "settings": parallelism(model, {}),
        "target": parallelism(model, {"data_parallel_size": 4, "distributed_executor_backend": "mp"}),
    }
    for name in [name for name in os.environ if name.startswith("LLM_")]:
        del os.environ[name]
    answers["unset"] = parallelism(model, {})
    answers["vllm"] = {name: getattr(vllm.AsyncEngineArgs, name) for name in PARALLEL_OPTIONS}
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
