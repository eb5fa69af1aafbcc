"""The compose profiles are valid as Docker Compose reads them (`docker-compose config`, no engine needed)
and say what the README promises; the images they build are the Dockerfiles in the repository, and the cloud
profile's balancer config streams to every replica."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from gateway.settings import Settings
from tests.conftest import ROOT, skip_unless_ci

COMPOSE = shutil.which("docker-compose")
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}


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


def nginx_directives() -> dict[str, list[str]]:
    """The balancer's directives (one a line, comments dropped), each name with the arguments of each use."""
    found: dict[str, list[str]] = {}
    for line in NGINX_CONF.read_text().splitlines():
        if match := re.match(r"\s*(\w+)\s*([^;{#]*?)\s*[;{]", line):
            found.setdefault(match[1], []).append(match[2])
    return found


def test_cloud_profile(monkeypatch):
    monkeypatch.delenv("GATEWAY_REPLICAS", raising=False)
    assert compose_config("-f", "docker-compose.cloud.yml")["services"]["gateway"]["deploy"]["replicas"] == 1
    monkeypatch.setenv("GATEWAY_REPLICAS", "3")
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    config = compose_config("-f", "docker-compose.cloud.yml")
    service, redis, lb = (config["services"][name] for name in ("gateway", "redis", "lb"))
    assert service["deploy"]["replicas"] == 3
    # replicas publish no host port (several could not share one): the balancer serves 8081, Redis nothing
    assert "ports" not in service and "container_name" not in service and "ports" not in redis
    assert lb["ports"] == [{"published": 8081, "target": 8081}]
    assert config["networks"]["gateway"]["driver"] == "bridge"
    assert all(list(each["networks"]) == ["gateway"] and "network_mode" not in each for each in (service, redis, lb))
    assert any("http://127.0.0.1:8081/ready" in part for part in service["healthcheck"]["test"])
    env = service["environment"]
    assert env["LLM_PORT"] == "8081" and env["LLM_HOST"] == "0.0.0.0"
    assert int(env["LLM_PARALLEL"]) >= 8 and int(env["LLM_MAX_QUEUE"]) >= 256
    assert env["LLM_TENSOR_PARALLEL_SIZE"] == "4"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert "hf-cache:/cache/huggingface:rw" in service["volumes"] and "hf-cache" in config["volumes"]
    assert _gpu_reservation(service)["count"] == "all"
    # every replica shares the Redis service, started first; limits fail closed unless asked otherwise
    assert env["LLM_REDIS_URL"] == "redis://redis:6379/0" and env["LLM_REDIS_FAIL_OPEN"] == "false"
    assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert redis["image"].startswith("redis:") and "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    # the balancer runs the repository's config, aimed at the service name Docker resolves to every replica
    assert lb["image"].startswith("nginx:") and lb["volumes"] == [f"{NGINX_CONF}:/etc/nginx/nginx.conf:ro"]
    assert lb["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    nginx = nginx_directives()
    assert [args.split()[:2] for args in nginx["server"] if args] == [[f"gateway:{env['LLM_PORT']}", "resolve"]]
    assert nginx["listen"] == [str(lb["ports"][0]["target"])]


def test_balancer_streams_to_every_replica():
    nginx = nginx_directives()
    assert nginx["upstream"] == ["gateway"] and nginx["proxy_pass"] == ["http://gateway"]
    assert "least_conn" in nginx and nginx["resolver"][0].startswith("127.0.0.11 ")  # Docker's DNS
    assert nginx["proxy_buffering"] == ["off"]  # an SSE event reaches the client when the replica sends it
    # keep-alive to the replicas, closed by nginx before the gateway closes an idle connection
    assert nginx["proxy_http_version"] == ["1.1"] and 'Connection ""' in nginx["proxy_set_header"]
    assert int(nginx["keepalive"][0]) > 0
    assert int(nginx["keepalive_timeout"][0].removesuffix("s")) < DEFAULTS["keepalive_timeout"]
    # a whole answer may take LLM_MAX_REQUEST_TIMEOUT; a body past LLM_MAX_BODY_BYTES gets the gateway's 413
    assert int(nginx["proxy_read_timeout"][0].removesuffix("s")) > DEFAULTS["max_request_timeout"]
    assert int(nginx["client_max_body_size"][0].removesuffix("m")) << 20 > DEFAULTS["max_body_bytes"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_serve_the_gateway(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert 'CMD ["llm-gateway", "serve"]' in text and "scripts/fetch_model.py" in text
    # the cloud profile's replicas share state in Redis and send traces: both extras are installed
    extras = re.search(r"pip install .* -e '\.\[([^\]]*)\]'", text)[1].split(",")
    assert {"redis", "otel"} <= set(extras)
    # every path the image copies exists in the repository
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
