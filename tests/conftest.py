"""Test servers are real: `python -m gateway serve` on a free loopback port with the real default model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
STARTUP_SECONDS = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key=kwargs.pop("api_key", "anything"), max_retries=0, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.base_url + "/health", timeout=10).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(tmp_dir: Path, env: dict[str, str] | None = None, wait_ready: bool = True) -> Server:
    port = free_port()
    log_path = tmp_dir / f"gateway-{port}.log"
    environment = {**os.environ, "LLM_HOST": "127.0.0.1", "LLM_PORT": str(port), "LLM_THREADS": "2", **(env or {})}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], cwd=ROOT, env=environment, stdout=log_file, stderr=log_file
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
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


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    instance = start_server(tmp_path_factory.mktemp("server"))
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def client(server) -> OpenAI:
    return server.client()
