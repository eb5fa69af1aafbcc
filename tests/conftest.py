"""Test servers are real: `python -m gateway serve` on a free loopback port with the real default model.

The contract suite runs once per engine: the `server` fixture is parametrised over ENGINES (narrow it
with LLM_TEST_ENGINES=llamacpp,transformers). Only engine-specific facts differ, in `EngineUnderTest`.

Tests live in one folder per purpose, and each folder is a pytest marker of the same name (LANES, applied
from the path below and registered in pyproject.toml): `pytest -m unit` is the fast lane (`make test-unit`),
`pytest -m "not engines"` leaves out the slow engine checks.

Tests must hold on a loaded 2-core machine: they wait for effects through `wait_for` and the helpers built on it,
with the margins below, and make HTTP calls through `Server.get` / `Server.post` or name their own timeout
(tests/unit/test_suite_rules.py checks that).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme
from openai import OpenAI

from tests.upstream import Upstream

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
STARTUP_SECONDS = 420  # vLLM on two busy cores spawns its engine processes and loads two models
# pytest-timeout's limit (pyproject.toml) counts fixture set-up, so a test that may start a vLLM gateway
# (the engine-parametrised `server` fixture, tests/engines/) gets the start allowance on top of its own time.
STARTING_TEST_TIMEOUT = STARTUP_SECONDS + 180
# Cancelled work stops at the engine's next decode step, which a loaded 2-core machine stretches to seconds;
# the long requests the tests cancel (3000 tokens) would keep an engine busy well past this if they went on.
IDLE_WITHIN = 10.0
# A small model's load, or its failure, on a loaded 2-core machine (a vLLM start has STARTUP_SECONDS).
LOAD_WITHIN = 120.0
# The tests' own HTTP calls: httpx's 5 s default is too short for an answer on a loaded 2-core machine.
HTTP_TIMEOUT = 60.0
LANES = ("unit", "contract", "routing", "lifecycle", "engines", "hardening", "operations")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    """Each test gets the marker of its folder (tests/<lane>/...), and a longer timeout where it may start vLLM."""
    for item in items:
        parts = item.path.resolve().relative_to(TESTS).parts
        lane = parts[0] if len(parts) > 1 else None
        if lane in LANES:
            item.add_marker(getattr(pytest.mark, lane))
        if ("server" in getattr(item, "fixturenames", ()) or lane == "engines") and not item.get_closest_marker(
            "timeout"
        ):
            item.add_marker(pytest.mark.timeout(STARTING_TEST_TIMEOUT))


@dataclass(frozen=True)
class EngineUnderTest:
    name: str
    python: Path  # vLLM lives in its own virtualenv (`make setup-vllm`)
    embedding_model: str  # the name /v1/embeddings answers to
    embedding_dimensions: int
    env: dict[str, str] = field(default_factory=dict)
    needs: str = ""  # a module the engine imports, to tell a missing install from a failure

    def missing(self) -> str | None:
        if not self.python.exists():
            return f"{self.python} is missing: run `make setup`"
        probe = subprocess.run([str(self.python), "-c", f"import {self.needs}"], capture_output=True)
        return f"{self.needs} is not installed for {self.python}: run `make setup`" if probe.returncode else None


ENGINES = {
    "llamacpp": EngineUnderTest("llamacpp", Path(sys.executable), MODEL, 576, needs="llama_cpp"),
    # Local model files only: no hub look-ups (HF_HUB_OFFLINE would also stop the gateway's own downloads).
    "transformers": EngineUnderTest("transformers", Path(sys.executable), "all-minilm-l6-v2", 384,
                                    env={"HF_HUB_OFFLINE": "1"}, needs="transformers"),  # fmt: skip
    # Eager mode: torch.compile of the model costs minutes on two cores and buys little for 135M parameters.
    "vllm": EngineUnderTest("vllm", ROOT / ".venv-vllm" / "bin" / "python", "all-minilm-l6-v2", 384,
                            env={"LLM_ENFORCE_EAGER": "true", "HF_HUB_OFFLINE": "1"}, needs="vllm"),  # fmt: skip
}
SELECTED = [name for name in os.environ.get("LLM_TEST_ENGINES", ",".join(ENGINES)).split(",") if name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    engine: EngineUnderTest = ENGINES["llamacpp"]

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key=kwargs.pop("api_key", "anything"), max_retries=0, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        """GET `path` under the server's root, with HTTP_TIMEOUT unless `timeout` is given."""
        return httpx.get(self.base_url + path, **{"timeout": HTTP_TIMEOUT, **kwargs})

    def post(self, path: str, **kwargs) -> httpx.Response:
        """POST to `path` under the server's root, with HTTP_TIMEOUT unless `timeout` is given."""
        return httpx.post(self.base_url + path, **{"timeout": HTTP_TIMEOUT, **kwargs})

    def health(self) -> dict:
        return self.get("/health").json()

    def model_state(self, model: str = MODEL) -> str:
        return next(m["state"] for m in self.health()["models"] if m["model"] == model)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        """The access-log records written so far (one per finished request, `gateway.access`)."""
        lines = [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line["logger"] == "gateway.access"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(tmp_dir: Path, env: dict[str, str] | None = None, wait_ready: bool = True,
                 engine: EngineUnderTest = ENGINES["llamacpp"]) -> Server:  # fmt: skip
    port = free_port()
    log_path = tmp_dir / f"gateway-{port}.log"
    environment = {
        **os.environ, "LLM_HOST": "127.0.0.1", "LLM_PORT": str(port), "LLM_THREADS": "2",
        # Shared 2-core machines can stretch a test's requests past the 60 s default; the timeout
        # tests set their own.
        "LLM_REQUEST_TIMEOUT": "300",
        "LLM_DATA_DIR": str(tmp_dir / "data"),  # stored responses: each test server's own
        "LLM_ENGINE": engine.name, **engine.env, **(env or {}),
    }  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(engine.python), "-m", "gateway", "serve"], cwd=ROOT, env=environment, stdout=log_file, stderr=log_file
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, engine)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{server.log()}")
        try:
            if server.health()["status"] == "ok" or not wait_ready:
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"gateway not ready after {STARTUP_SECONDS}s:\n{server.log()}")


def wait_for(condition, within: float, what, interval: float = 0.05):
    """Polls `condition` until it returns something true, which is returned; after `within` seconds fails
    with `what` (a string, or a callable for a message made at that moment)."""
    deadline = time.monotonic() + within
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {within}s")
        time.sleep(interval)


def wait_until_idle(server: Server, within: float = IDLE_WITHIN) -> float:
    """Waits until no engine of `server` runs or queues a request; returns the seconds it took."""
    started = time.monotonic()
    wait_for(
        lambda: all(m["running"] == 0 and m["waiting"] == 0 for m in server.health()["models"]),
        within, lambda: f"engine still busy: {server.health()['models']}",
    )  # fmt: skip
    return time.monotonic() - started


def wait_for_state(server: Server, state: str, model: str = MODEL, within: float = LOAD_WITHIN) -> None:
    """Waits until `model` of `server` is in `state` (as /health shows it)."""
    wait_for(
        lambda: server.model_state(model) == state, within,
        lambda: f"{model} is {server.model_state(model)}, not {state}",
    )  # fmt: skip


def require(engine: EngineUnderTest) -> None:
    """For tests of one engine: skipped when LLM_TEST_ENGINES leaves it out or it is not installed."""
    if engine.name not in SELECTED:
        pytest.skip(f"LLM_TEST_ENGINES leaves out {engine.name}")
    if reason := engine.missing():
        skip_unless_ci(reason)


def skip_unless_ci(reason: str) -> None:
    """CI installs every engine and model: there a missing one is a broken set-up, so the test fails."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session", params=SELECTED)
def server(request, tmp_path_factory) -> Server:
    """One gateway per engine; pytest runs every test on one engine before it starts the next."""
    engine = ENGINES[request.param]
    require(engine)
    instance = start_server(tmp_path_factory.mktemp(f"server-{engine.name}"), engine=engine)
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def client(server) -> OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def upstream() -> Upstream:
    """The misbehaving OpenAI-compatible server of tests/upstream.py, one per test module."""
    server = Upstream(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def tls_server_context(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server certificate for localhost from a CA that this test's clients trust (through SSL_CERT_FILE,
    which the default TLS context reads when it is made) and no other does."""
    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(context)
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    return context
