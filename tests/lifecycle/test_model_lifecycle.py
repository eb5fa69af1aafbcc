"""Model lifecycle on real gateways: downloads from a real local HTTP server (retries, checksum, offline),
loading states, idle unload, pre-warm, explicit unload, and 507 when a model cannot fit the budget."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.models.registry import ModelRegistry, what_would_fit
from gateway.settings import Settings
from tests.conftest import LOAD_WITHIN, MODEL, free_port, start_server, wait_for, wait_for_state

SMALL = {"LLM_CTX": "256", "LLM_PARALLEL": "1", "LLM_EMBEDDING": "false"}  # a ~100 MB footprint
HELLO = [{"role": "user", "content": "hi"}]


def model_file() -> Path:
    settings = Settings()
    return settings.models_dir / ModelRegistry.load(settings.registry).entries[MODEL].file


class FileServer(http.server.ThreadingHTTPServer):
    """Serves one file slowly at `path` (/files/<name>), after failing the first `failures` requests with 503."""

    def __init__(self, source: Path, failures: int = 0, seconds: float = 0.0, path: str | None = None):
        self.requests = 0
        server = self
        payload = source.read_bytes()
        served = path or f"/files/{source.name}"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if server.requests <= failures or self.path != served:
                    self.send_error(503 if server.requests <= failures else 404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                chunks = 50
                step = len(payload) // chunks + 1
                for start in range(0, len(payload), step):
                    self.wfile.write(payload[start : start + step])
                    time.sleep(seconds / chunks)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server_address[1]}"
        self.url = self.root + served
        threading.Thread(target=self.serve_forever, daemon=True).start()


def chat(server, model: str = MODEL) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 3}
    return server.post("/v1/chat/completions", json=body, timeout=120)


def test_download_retries_verifies_and_answers_503_while_loading(tmp_path):
    source = model_file()
    files = FileServer(source, failures=1, seconds=3.0)
    checksum = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    env = {"LLM_MODEL_URL": files.url, "LLM_MODELS_DIR": str(tmp_path / "models"), "LLM_MODEL_CHECKSUM": checksum,
           "LLM_DOWNLOAD_RETRIES": "2", "LLM_LOAD_WAIT_SECONDS": "0", **SMALL}  # fmt: skip
    server = start_server(tmp_path, env, wait_ready=False)
    try:
        busy = wait_for(lambda: (r := chat(server)).status_code == 503 and r, 30, "503 while downloading")
        assert busy.headers["Retry-After"] and busy.json()["error"]["code"] == "model_not_ready"
        assert "loading" in busy.json()["error"]["message"]
        assert server.get("/ready").status_code == 503
        wait_for(lambda: server.get("/ready").status_code == 200, LOAD_WITHIN, "ready")
        assert chat(server).status_code == 200
        assert files.requests == 2  # one failure, one retry
        downloaded = tmp_path / "models" / source.name
        assert downloaded.read_bytes() == source.read_bytes()
        assert not list((tmp_path / "models").glob("*.part"))
        assert '"message": "downloading ' in server.log() and "100%" in server.log()
    finally:
        server.stop()
        files.shutdown()


def test_a_hub_id_downloads_from_the_hub_endpoint(tmp_path):
    source = model_file()
    files = FileServer(source, path=f"/org/smol/resolve/main/{source.name}")
    env = {"LLM_MODEL_URL": f"hf://org/smol/{source.name}", "HF_ENDPOINT": files.root,
           "LLM_MODELS_DIR": str(tmp_path / "models"), **SMALL}  # fmt: skip
    server = start_server(tmp_path, env)
    try:
        assert chat(server).status_code == 200 and files.requests == 1
        assert (tmp_path / "models" / source.name).stat().st_size == source.stat().st_size
    finally:
        server.stop()
        files.shutdown()


def test_checksum_mismatch_fails_clearly(tmp_path):
    files = FileServer(model_file())
    env = {"LLM_MODEL_URL": files.url, "LLM_MODELS_DIR": str(tmp_path / "models"),
           "LLM_MODEL_CHECKSUM": "sha256:" + "0" * 64, "LLM_DOWNLOAD_RETRIES": "0", **SMALL}  # fmt: skip
    server = start_server(tmp_path, env, wait_ready=False)
    try:
        wait_for_state(server, "failed")
        error = server.health()["models"][0]["error"]
        assert "checksum mismatch" in error
        response = chat(server)
        assert response.status_code == 503 and "checksum mismatch" in response.json()["error"]["message"]
        assert server.get("/ready").status_code == 503
        assert not list((tmp_path / "models").iterdir())  # nothing half-written is kept
    finally:
        server.stop()
        files.shutdown()


def cached_copy_failing_its_checksum(tmp_path) -> tuple[Path, dict]:
    """A models folder whose copy of the model is cut short, and settings naming the real file's checksum."""
    source = model_file()
    models = tmp_path / "models"
    models.mkdir()
    (models / source.name).write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    checksum = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    return models / source.name, {"LLM_MODELS_DIR": str(models), "LLM_MODEL_CHECKSUM": checksum,
                                  "LLM_DOWNLOAD_RETRIES": "0", **SMALL}  # fmt: skip


def test_a_cached_file_failing_its_checksum_is_downloaded_again(tmp_path):
    cached, env = cached_copy_failing_its_checksum(tmp_path)
    files = FileServer(model_file())
    server = start_server(tmp_path, {"LLM_MODEL_URL": files.url, **env})
    try:
        assert files.requests == 1  # the cut copy was not loaded (it could not be): it was fetched again
        assert cached.read_bytes() == model_file().read_bytes()
        assert chat(server).status_code == 200
    finally:
        server.stop()
        files.shutdown()


def test_offline_a_cached_file_failing_its_checksum_is_named_as_such(tmp_path):
    cached, env = cached_copy_failing_its_checksum(tmp_path)
    unreachable = f"http://127.0.0.1:{free_port()}/files/{cached.name}"
    server = start_server(tmp_path, {"LLM_MODEL_URL": unreachable, **env}, wait_ready=False)
    try:
        wait_for_state(server, "failed")
        error = server.health()["models"][0]["error"]
        assert str(cached) in error and unreachable in error
        assert "checksum" in error and "not cached" not in error
    finally:
        server.stop()


def test_offline_uses_the_cache_and_names_what_is_missing(tmp_path):
    unreachable = f"http://127.0.0.1:{free_port()}/files/{model_file().name}"
    cached = start_server(tmp_path, {"LLM_MODEL_URL": unreachable, "LLM_MODELS_DIR": str(model_file().parent), **SMALL})
    try:
        assert chat(cached).status_code == 200  # the cached file, no network needed
    finally:
        cached.stop()
    empty = tmp_path / "empty"
    env = {"LLM_MODEL_URL": unreachable, "LLM_MODELS_DIR": str(empty), "LLM_DOWNLOAD_RETRIES": "0", **SMALL}
    missing = start_server(tmp_path, env, wait_ready=False)
    try:
        wait_for_state(missing, "failed")
        error = missing.health()["models"][0]["error"]
        assert f"{empty / model_file().name} is not cached" in error and unreachable in error
    finally:
        missing.stop()


def test_a_failed_model_loads_again_once_its_file_is_fixed(tmp_path):
    path = tmp_path / "fixable.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_server(tmp_path, {"LLM_MODEL": str(path), **SMALL}, wait_ready=False)
    try:
        wait_for_state(server, "failed", "fixable")
        assert chat(server, "fixable").status_code == 503
        path.write_bytes(model_file().read_bytes())
        loaded = server.post("/v1/models/fixable/load", timeout=120)
        assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
        assert chat(server, "fixable").status_code == 200
        assert server.get("/ready").status_code == 200
    finally:
        server.stop()


def test_idle_unload_prewarm_and_explicit_unload(tmp_path):
    server = start_server(tmp_path, {"LLM_UNLOAD_AFTER_SECONDS": "2", **SMALL})
    try:
        wait_for_state(server, "unloaded", within=30)  # idle for 2 s
        health = server.health()
        assert health["status"] == "ok" and health["governor"]["used_bytes"] == 0
        assert server.get("/ready").status_code == 200  # it reloads on the next request
        warm = server.post(f"/v1/models/{MODEL}/load", timeout=120).json()
        assert (warm["state"], warm["location"]) == ("ready", "cpu") and warm["memory_bytes"] > 50_000_000
        assert server.health()["governor"]["models"] == {MODEL: warm["memory_bytes"]}
        cold = server.post(f"/v1/models/{MODEL}/unload").json()
        assert cold == {"id": MODEL, "object": "model.state", "state": "unloaded", "location": "unloaded",
                        "memory_bytes": 0}  # fmt: skip
        assert server.get("/ready").json() == {"status": "ready", "model": MODEL}  # as after an idle unload
        assert chat(server).status_code == 200  # loads again on first use
        metrics = server.get("/metrics").text
        assert f'llm_model_events_total{{event="unload_idle",model="{MODEL}"}} 1.0' in metrics
        assert f'llm_model_events_total{{event="unload_request",model="{MODEL}"}} 1.0' in metrics
        assert f'llm_model_events_total{{event="load",model="{MODEL}"}} 3.0' in metrics
        assert server.post("/v1/models/nope/load").json()["error"]["code"] == "model_not_found"
    finally:
        server.stop()


def test_the_idle_clock_starts_when_a_load_ends(tmp_path):
    """A load longer than the idle timeout (here a 6 s download against 4 s) is not undone by the next sweep."""
    files = FileServer(model_file(), seconds=6.0)
    env = {"LLM_MODEL_URL": files.url, "LLM_MODELS_DIR": str(tmp_path / "models"), "LLM_UNLOAD_AFTER_SECONDS": "4",
           **SMALL}  # fmt: skip
    server = start_server(tmp_path, env, wait_ready=False)
    try:
        wait_for_state(server, "ready")
        loaded = time.monotonic()
        while time.monotonic() - loaded < 2.0:  # well inside the 4 s, well past a sweep (every second)
            assert server.model_state() == "ready"
            time.sleep(0.1)
        wait_for_state(server, "unloaded", within=30)  # idle for 4 s
    finally:
        server.stop()
        files.shutdown()


def test_a_default_model_that_cannot_fit_stays_unloaded_and_gets_507(tmp_path):
    """Not `failed`: /health stays 200 ok, /ready 503 unloaded, and every request gets 507 saying why."""
    server = start_server(tmp_path, {"LLM_MEMORY_BUDGET_MB": "50", **SMALL})
    try:
        response = chat(server)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["type"] == "insufficient_storage" and error["code"] == "insufficient_memory"
        assert error["param"] == "model" and "MB short" in error["message"]
        assert "No model in the registry fits" in error["message"]
        health = server.get("/health")
        assert (health.status_code, health.json()["status"], server.model_state()) == (200, "ok", "unloaded")
        ready = server.get("/ready")
        assert (ready.status_code, ready.json()) == (503, {"status": "unloaded", "model": MODEL})
    finally:
        server.stop()


@pytest.mark.parametrize(
    "model, available_gb, expected",
    [
        ("qwen2.5-7b-instruct-gguf", 5.5, "The q5_k_m quantization of qwen2.5-7b-instruct-gguf (5.1 GB) would fit."),
        ("llama-3.1-8b-instruct-gguf", 4.5, "A smaller model would fit: qwen2.5-7b-instruct-gguf (4.1 GB)."),
        ("qwen2.5-7b-instruct-gguf", 0.01, "No model in the registry fits"),
    ],
)
def test_what_would_fit(model, available_gb, expected):
    registry = ModelRegistry.load(Settings().registry)
    assert what_would_fit(registry, registry.entries[model], int(available_gb * (1 << 30))).startswith(expected)
