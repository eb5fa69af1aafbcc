"""vLLM's parallelism settings (LLM_TENSOR_PARALLEL_SIZE, LLM_DATA_PARALLEL_SIZE, LLM_PIPELINE_PARALLEL_SIZE,
LLM_DISTRIBUTED_EXECUTOR_BACKEND): bounded, and passed to vLLM's AsyncEngineArgs only where set."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from pydantic import ValidationError

from gateway.settings import PROJECT_ROOT, Settings
from tests.conftest import ENGINES, require

VLLM = ENGINES["vllm"]
PARALLEL = {"LLM_TENSOR_PARALLEL_SIZE": "2", "LLM_DATA_PARALLEL_SIZE": "2", "LLM_PIPELINE_PARALLEL_SIZE": "3",
            "LLM_DISTRIBUTED_EXECUTOR_BACKEND": "ray"}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_DATA_PARALLEL_SIZE", "0"),
        ("LLM_PIPELINE_PARALLEL_SIZE", "65"),
        ("LLM_DISTRIBUTED_EXECUTOR_BACKEND", "slurm"),
    ],
)
def test_a_parallel_setting_out_of_range_is_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("LLM_").lower()):
        Settings()


def test_parallel_settings_reach_vllms_engine_args_and_unset_ones_stay_vllms(tmp_path):
    require(VLLM)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("LLM_")}
    probe = subprocess.run(
        [str(VLLM.python), "-m", "tests.unit.vllm_args_probe", str(tmp_path)], cwd=PROJECT_ROOT,
        env={**environment, **VLLM.env, **PARALLEL}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    answers = json.loads(probe.stdout.splitlines()[-1])
    settings = {"tensor_parallel_size": 2, "data_parallel_size": 2, "pipeline_parallel_size": 3,
                "distributed_executor_backend": "ray"}  # fmt: skip
    assert answers["settings"] == settings
    assert answers["target"] == {**settings, "data_parallel_size": 4, "distributed_executor_backend": "mp"}
    assert answers["unset"] == answers["vllm"]
    assert answers["vllm"] == {"tensor_parallel_size": 1, "data_parallel_size": 1, "pipeline_parallel_size": 1,
                               "distributed_executor_backend": None}  # fmt: skip
