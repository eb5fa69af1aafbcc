"""The compose profiles are valid as Docker Compose reads them (`docker-compose config`, no engine needed)
and say what the README promises; the images they build are the Dockerfiles in the repository."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, skip_unless_ci

COMPOSE = shutil.which("docker-compose")


def compose_config(*args: str) -> dict:
    if COMPOSE is None:  # skipped with the reason, but a failure under CI, which must check the profiles
        skip_unless_ci("docker-compose is not installed (`make test` installs Debian's package with apt as root)")
    result = subprocess.run([COMPOSE, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _gpu_reservation(service: dict) -> dict:
    return service["deploy"]["resources"]["reservations"]["devices"][0]


def test_local_profile():
    config = compose_config("-f", "docker-compose.yml")
    gpu, cpu = config["services"]["gateway"], config["services"]["gateway-cpu"]
    for service in (gpu, cpu):
        assert service["network_mode"] == "host" and "ports" not in service
        assert "models:/models:rw" in service["volumes"]
        assert int(service["environment"]["LLM_PARALLEL"]) <= 2
        assert int(service["environment"]["LLM_BATCH_SIZE"]) <= 256
    assert _gpu_reservation(gpu) == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert gpu["environment"]["LLM_GPU_LAYERS"] == "-1"
    assert (gpu["build"]["dockerfile"], cpu["build"]["dockerfile"]) == ("Dockerfile.cuda", "Dockerfile")
    # a plain `up` starts the GPU service; the CPU one only with --profile cpu
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]


def test_cloud_profile(monkeypatch):
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    config = compose_config("-f", "docker-compose.cloud.yml")
    service = config["services"]["gateway"]
    assert service["ports"] == [{"published": 8081, "target": 8081}]
    assert config["networks"]["gateway"]["driver"] == "bridge" and "network_mode" not in service
    assert any("http://127.0.0.1:8081/ready" in part for part in service["healthcheck"]["test"])
    env = service["environment"]
    assert env["LLM_PORT"] == "8081" and env["LLM_HOST"] == "0.0.0.0"
    assert int(env["LLM_PARALLEL"]) >= 8 and int(env["LLM_MAX_QUEUE"]) >= 256
    assert env["LLM_TENSOR_PARALLEL_SIZE"] == "4"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert "hf-cache:/cache/huggingface:rw" in service["volumes"] and "hf-cache" in config["volumes"]
    assert _gpu_reservation(service)["count"] == "all"


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_serve_the_gateway(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert 'CMD ["llm-gateway", "serve"]' in text and "scripts/fetch_model.py" in text
    # every path the image copies exists in the repository
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
